//! The Sluice node agent, its CNI plugin, its operator CLI and the cluster-wide controller share
//! this library.

pub mod cni;
pub mod config;
pub mod controller;
pub mod datapath;
pub mod endpoints;
pub mod external_ip;
pub mod follower;
pub mod health;
pub mod ipam;
pub mod k8s;
pub mod masquerade;
pub mod metrics;
pub mod model;
pub mod names;
pub mod net;
pub mod overlap;
pub mod service_health;
pub mod table;

/// Logs to stderr, filtered by `RUST_LOG` (default `info`), for the daemons.
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
}
