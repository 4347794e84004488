//! sluice-agent: the node daemon. Sets up the node's pod network, adopts what a previous agent
//! left, follows the other nodes through the Kubernetes API, and serves the CNI plugin.

use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use anyhow::{Context, Result};
use clap::Parser;
use sluice_agent::{
    cni::server::{serve, PodNetwork},
    config::{Config, Settings},
    datapath::ebpf::EbpfDatapath,
    health,
    k8s::{self, ClusterStore},
};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::Mutex,
};
use tracing::{info, warn};

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
    let in_file = || format!("in {}", args.config.display());
    let config = Config::parse(&text).with_context(in_file)?;
    let settings = config
        .validate(std::env::var("NODE_NAME").ok())
        .with_context(in_file)?;

    let ready = Arc::new(AtomicBool::new(false));
    if let Some(address) = settings.health_address {
        let ready = ready.clone();
        tokio::spawn(async move {
            if let Err(e) = health::serve(address, ready).await {
                warn!("health endpoint stopped: {e:#}");
            }
        });
    }

    let cluster = match &settings.kubernetes {
        Some(kube) => {
            let client = k8s::client(kube.kubeconfig.as_deref()).await?;
            let cluster = ClusterStore::start(client, &kube.node_name);
            cluster
                .wait_until_ready()
                .await
                .context("waiting for the first list of every watched kind")?;
            Some((cluster, kube.node_name.clone()))
        }
        None => None,
    };
    let pod_cidr = match (settings.pod_cidr, &cluster) {
        (Some(cidr), _) => cidr,
        (None, Some((cluster, name))) => cluster.own_pod_cidr(name).await,
        (None, None) => unreachable!("validated: standalone mode has a podCIDR"),
    };
    let node = settings
        .node_network(pod_cidr)
        .with_context(|| format!("the Node's podCIDR {pod_cidr}"))?;
    let datapath = EbpfDatapath::load(&config.bpffs_dir, node.tc_attach_mode)?;
    info!(attach = ?datapath.attach_mode(), pins = %config.bpffs_dir.display(), pod_cidr = %node.pod_cidr, encap = ?node.encap, "eBPF datapath loaded");
    let pods = Arc::new(Mutex::new(
        PodNetwork::start(node, Box::new(datapath), &config.state_dir).await?,
    ));
    if let Some((cluster, name)) = cluster {
        pods.lock()
            .await
            .set_remote_routes(k8s::remote_routes(&cluster.nodes.state(), &name))
            .await?;
        tokio::spawn(follow_nodes(cluster, name, pods.clone()));
    }
    ready.store(true, Ordering::Release);
    info!("ready");
    run(&settings, &config, pods).await
}

/// Reprograms other nodes' routes after every change of the cluster store.
async fn follow_nodes(cluster: ClusterStore, own: String, pods: Arc<Mutex<PodNetwork>>) {
    loop {
        cluster.changed.notified().await;
        let routes = k8s::remote_routes(&cluster.nodes.state(), &own);
        if let Err(e) = pods.lock().await.set_remote_routes(routes).await {
            warn!("programming routes to other nodes failed (retried on the next change): {e:#}");
        }
    }
}

async fn run(_settings: &Settings, config: &Config, pods: Arc<Mutex<PodNetwork>>) -> Result<()> {
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
