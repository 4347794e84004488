//! `/healthz` (the process serves), `/readyz` (the first full sync is programmed) and
//! `/metrics` (Prometheus).

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use anyhow::{Context, Result};
use axum::{extract::State, http::StatusCode, routing::get, Router};

use crate::metrics::Metrics;

pub async fn serve(
    address: SocketAddr,
    ready: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
) -> Result<()> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(ready)
        .route("/metrics", get(move || async move { metrics.render() }));
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("binding the health endpoint {address}"))?;
    axum::serve(listener, app).await?;
    Ok(())
}

async fn readyz(State(ready): State<Arc<AtomicBool>>) -> (StatusCode, &'static str) {
    if ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not synced yet")
    }
}
