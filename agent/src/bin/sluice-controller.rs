//! sluice-controller: the cluster-wide decisions (NodeIPAM, ServiceExternalIP's allocation), by
//! one replica at a time under a `coordination.k8s.io` Lease.

use std::path::PathBuf;

use anyhow::{Context, Result};
use axum::{routing::get, Router};
use clap::Parser;
use sluice_agent::{
    controller::{self, config::ControllerConfig, Setup},
    k8s,
};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};

#[derive(Parser)]
#[command(
    version,
    about = "Sluice controller: NodeIPAM and LoadBalancer IP allocation under a Lease"
)]
struct Args {
    /// The controller config file (YAML).
    #[arg(
        long,
        env = "SLUICE_CONTROLLER_CONFIG",
        default_value = "/etc/sluice/controller.yaml"
    )]
    config: PathBuf,
}

#[tokio::main]
async fn main() -> Result<()> {
    sluice_agent::init_logging();
    let args = Args::parse();
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("reading the config file {}", args.config.display()))?;
    let in_file = || format!("in {}", args.config.display());
    let config = ControllerConfig::parse(&text).with_context(in_file)?;
    let node_ipam = config.node_ipam().with_context(in_file)?;
    let lease_duration = config.lease_duration().with_context(in_file)?;
    // The pod's name tells replicas apart; outside a pod, host and process do.
    let identity = std::env::var("POD_NAME").unwrap_or_else(|_| {
        let host = nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "unknown".into());
        format!("{host}-{}", std::process::id())
    });
    let lease_namespace = std::env::var("POD_NAMESPACE")
        .ok()
        .filter(|n| !n.is_empty())
        .unwrap_or(config.lease_namespace.clone());
    if let Some(address) = &config.health_address {
        let address: std::net::SocketAddr = address
            .parse()
            .with_context(|| format!("healthAddress {address:?} is not ip:port ({})", in_file()))?;
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| format!("binding the health endpoint {address}"))?;
        tokio::spawn(async move {
            let app = Router::new().route("/healthz", get(|| async { "ok" }));
            if let Err(e) = axum::serve(listener, app).await {
                warn!("health endpoint stopped: {e}");
            }
        });
    }
    let client = k8s::client(config.kubeconfig.as_deref()).await?;
    info!(%identity, lease = %format!("{lease_namespace}/{}", config.lease_name), "starting");
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    };
    controller::run(
        Setup {
            client,
            lease_namespace,
            lease_name: config.lease_name.clone(),
            identity,
            lease_duration,
            node_ipam,
            external_ips: config.feature_gates.service_external_ip,
        },
        shutdown,
    )
    .await
}
