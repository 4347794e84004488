//! Health-check node ports (LoadBalancer Services with externalTrafficPolicy Local): an external
//! load balancer asks every node and sends traffic only to those answering 200, the nodes with
//! local endpoints. Answers in kube-proxy's format, so existing load balancers understand it;
//! like kube-proxy's, every port answers 503 with `serviceProxyHealthy: false` while the agent's
//! programming keeps failing (what it would send there may be stale).

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, RwLock},
};

use anyhow::{Context, Result};
use axum::{extract::State, http::StatusCode, Json, Router};
use serde_json::{json, Value};
use tokio::task::JoinHandle;

use crate::{health::Health, model::service::HealthCheck};

type Checks = Arc<RwLock<BTreeMap<u16, HealthCheck>>>;

pub struct HealthCheckServers {
    checks: Checks,
    health: Arc<Health>,
    servers: BTreeMap<u16, JoinHandle<()>>,
}

impl HealthCheckServers {
    pub fn new(health: Arc<Health>) -> HealthCheckServers {
        HealthCheckServers {
            checks: Checks::default(),
            health,
            servers: BTreeMap::new(),
        }
    }

    /// Serves exactly the ports of `desired` with their current counts. A port that cannot be
    /// bound is reported and tried again on the next update.
    pub async fn update(&mut self, desired: &BTreeMap<u16, HealthCheck>) -> Vec<anyhow::Error> {
        *self.checks.write().expect("health check state poisoned") = desired.clone();
        self.servers.retain(|port, server| {
            let keep = desired.contains_key(port) && !server.is_finished();
            if !keep {
                server.abort();
            }
            keep
        });
        let mut errors = Vec::new();
        for port in desired.keys() {
            if self.servers.contains_key(port) {
                continue;
            }
            match serve(*port, self.checks.clone(), self.health.clone()).await {
                Ok(server) => {
                    self.servers.insert(*port, server);
                }
                Err(e) => errors.push(e),
            }
        }
        errors
    }
}

async fn serve(port: u16, checks: Checks, health: Arc<Health>) -> Result<JoinHandle<()>> {
    let address = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("binding health check node port {port}"))?;
    let app = Router::new()
        .fallback(move |state| answer(state, port, health.clone()))
        .with_state(checks);
    Ok(tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    }))
}

async fn answer(
    State(checks): State<Checks>,
    port: u16,
    health: Arc<Health>,
) -> (StatusCode, Json<Value>) {
    let checks = checks.read().expect("health check state poisoned");
    let Some(check) = checks.get(&port) else {
        return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({})));
    };
    let (namespace, name) = check
        .service
        .split_once('/')
        .unwrap_or(("", &check.service));
    let healthy = health.check().is_ok();
    let status = if healthy && check.local_endpoints > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "service": {"namespace": namespace, "name": name},
        "localEndpoints": check.local_endpoints,
        "serviceProxyHealthy": healthy,
    });
    (status, Json(body))
}
