//! sluice-agent: the node daemon. Sets up the node's pod network, adopts what a previous agent
//! left, and serves the CNI plugin.

use std::{path::PathBuf, sync::Arc};

use anyhow::{Context, Result};
use clap::Parser;
use sluice_agent::{
    cni::server::{serve, PodNetwork},
    config::Config,
    datapath::ebpf::EbpfDatapath,
};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::Mutex,
};
use tracing::info;

#[derive(Parser)]
#[command(version, about = "Sluice node agent: eBPF pod networking")]
struct Args {
    /// The agent config file (YAML).
    #[arg(long, env = "SLUICE_CONFIG", default_value = "/etc/sluice/agent.yaml")]
    config: PathBuf,
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("reading the config file {}", args.config.display()))?;
    let config = Config::parse(&text).with_context(|| format!("in {}", args.config.display()))?;
    let node = config
        .validate()
        .with_context(|| format!("in {}", args.config.display()))?;
    let datapath = EbpfDatapath::load(&config.bpffs_dir, node.tc_attach_mode)?;
    info!(attach = ?datapath.attach_mode(), pins = %config.bpffs_dir.display(), "eBPF datapath loaded");
    let pods = PodNetwork::start(node, Box::new(datapath), &config.state_dir).await?;
    let pods = Arc::new(Mutex::new(pods));
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        result = serve(&config.cni_socket, pods.clone()) => result,
        _ = term.recv() => Ok(()),
        _ = int.recv() => Ok(()),
    }?;
    // Wait for a request in progress, then leave: pinned maps and attached programs keep
    // forwarding until the next agent adopts them.
    let _guard = pods.lock().await;
    let _ = std::fs::remove_file(&config.cni_socket);
    info!("agent stopped; the datapath keeps forwarding");
    Ok(())
}
