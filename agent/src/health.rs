//! `/healthz` (the process serves), `/readyz` (the cluster state is programmed and programming
//! is not failing) and `/metrics` (Prometheus).

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        Arc, RwLock,
    },
};

use anyhow::{Context, Result};
use axum::{extract::State, http::StatusCode, routing::get, Router};

use crate::metrics::Metrics;

/// Failed programming rounds in a row after which the agent reports itself unhealthy: one or
/// two are a transient error the retry fixes; more mean the node drifts from the cluster.
pub const UNHEALTHY_AFTER: u32 = 3;

/// Whether the datapath follows the cluster: read by `/readyz` and by the health-check node
/// ports (`serviceProxyHealthy`), written by the programming rounds.
#[derive(Debug, Default)]
pub struct Health {
    programmed_once: AtomicBool,
    failed_rounds: AtomicU32,
    last_error: RwLock<String>,
}

impl Health {
    /// A round programmed everything.
    pub fn programmed(&self) {
        self.failed_rounds.store(0, Ordering::Release);
        self.programmed_once.store(true, Ordering::Release);
    }

    /// A round failed with `error`; returns the failed rounds in a row.
    pub fn failed(&self, error: String) -> u32 {
        *self.last_error.write().expect("health state poisoned") = error;
        self.failed_rounds.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Ready and healthy, or why not.
    pub fn check(&self) -> Result<(), String> {
        let failed = self.failed_rounds.load(Ordering::Acquire);
        if failed >= UNHEALTHY_AFTER {
            let error = self.last_error.read().expect("health state poisoned");
            return Err(format!(
                "programming has failed {failed} rounds in a row: {error}"
            ));
        }
        if !self.programmed_once.load(Ordering::Acquire) {
            return Err("the cluster state is not programmed yet".into());
        }
        Ok(())
    }
}

pub async fn serve(address: SocketAddr, health: Arc<Health>, metrics: Arc<Metrics>) -> Result<()> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(health)
        .route("/metrics", get(move || async move { metrics.render() }));
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("binding the health endpoint {address}"))?;
    axum::serve(listener, app).await?;
    Ok(())
}

async fn readyz(State(health): State<Arc<Health>>) -> (StatusCode, String) {
    match health.check() {
        Ok(()) => (StatusCode::OK, "ready".into()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unhealthy_only_while_rounds_keep_failing() {
        let health = Health::default();
        assert!(health.check().unwrap_err().contains("not programmed yet"));
        health.programmed();
        assert_eq!(health.check(), Ok(()));
        for n in 1..UNHEALTHY_AFTER {
            assert_eq!(health.failed(format!("error {n}")), n);
            assert_eq!(health.check(), Ok(()), "a transient failure");
        }
        health.failed("services: map SERVICES is full".into());
        assert_eq!(
            health.check().unwrap_err(),
            "programming has failed 3 rounds in a row: services: map SERVICES is full"
        );
        health.programmed();
        assert_eq!(health.check(), Ok(()));
    }

    #[test]
    fn a_first_round_that_fails_is_not_ready() {
        let health = Health::default();
        health.failed("routes: no route".into());
        assert!(health.check().is_err());
    }
}
