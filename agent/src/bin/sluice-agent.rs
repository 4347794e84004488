//! sluice-agent: the node daemon. Sets up the node's pod network, adopts what a previous agent
//! left, follows the other nodes through the Kubernetes API, and serves the CNI plugin.

use std::{path::PathBuf, sync::Arc};

use anyhow::{Context, Result};
use clap::Parser;
use sluice_agent::{
    cni::{
        rounds::ProgramRounds,
        server::{serve, PodNetwork},
    },
    config::Config,
    datapath::ebpf::EbpfDatapath,
    follower::{self, release_freed_memory, Setup},
    health::{self, Health},
    k8s::{self, ClusterStore},
    metrics::Metrics,
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

fn main() -> Result<()> {
    // One malloc arena: glibc gives every thread that allocates an arena of its own, and memory
    // freed in one cannot serve another. The agent allocates little on its hot paths, and the
    // watch stores (every Service and EndpointSlice of the cluster) are built by whichever
    // worker thread polls the watch: with per-thread arenas their churn left tens of MiB
    // stranded (measured by `cargo xtask bench service`).
    // SAFETY: plain libc call, before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?
        .block_on(agent())
}

async fn agent() -> Result<()> {
    sluice_agent::init_logging();
    let args = Args::parse();
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("reading the config file {}", args.config.display()))?;
    let in_file = || format!("in {}", args.config.display());
    let config = Config::parse(&text).with_context(in_file)?;
    let settings = config
        .validate(std::env::var("NODE_NAME").ok())
        .with_context(in_file)?;

    let health = Arc::new(Health::default());
    let metrics = Arc::new(Metrics::default());
    if let Some(address) = settings.health_address {
        let health = health.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            if let Err(e) = health::serve(address, health, metrics).await {
                warn!("health endpoint stopped: {e:#}");
            }
        });
    }

    let cluster = match &settings.kubernetes {
        Some(kube) => {
            let client = k8s::client(kube.kubeconfig.as_deref()).await?;
            let cluster = ClusterStore::start(client.clone(), settings.feature_gates);
            cluster
                .wait_until_ready()
                .await
                .context("waiting for the first list of every watched kind")?;
            Some((cluster, kube.node_name.clone(), client))
        }
        None => None,
    };
    let pod_cidr = match (settings.pod_cidr, &cluster) {
        (Some(cidr), _) => cidr,
        (None, Some((cluster, name, _))) => cluster.own_pod_cidr(name).await,
        (None, None) => unreachable!("validated: standalone mode has a podCIDR"),
    };
    let node = settings
        .node_network(pod_cidr)
        .with_context(|| format!("the Node's podCIDR {pod_cidr}"))?;
    let mut datapath =
        EbpfDatapath::load(&config.bpffs_dir, node.tc_attach_mode, &settings.map_sizes)?;
    if let Some(dir) = &config.cgroup_dir {
        datapath.attach_sockets(dir)?;
    }
    info!(attach = ?datapath.attach_mode(), pins = %config.bpffs_dir.display(), pod_cidr = %node.pod_cidr, encap = ?node.encap, "eBPF datapath loaded");
    let pods = Arc::new(Mutex::new(
        PodNetwork::start(node, Box::new(datapath), &config.state_dir).await?,
    ));
    let rounds = match cluster {
        Some((cluster, own, client)) => Some(
            follower::start(Setup {
                cluster,
                client,
                own,
                pods: pods.clone(),
                settings: settings.clone(),
                state_dir: config.state_dir.clone(),
                metrics,
                health: health.clone(),
            })
            .await?,
        ),
        None => {
            // Standalone: nothing to follow, the node is programmed once started.
            health.programmed();
            None
        }
    };
    release_freed_memory();
    info!("serving CNI requests");
    run(&config, pods, rounds, health).await
}

async fn run(
    config: &Config,
    pods: Arc<Mutex<PodNetwork>>,
    rounds: Option<ProgramRounds>,
    health: Arc<Health>,
) -> Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        result = serve(&config.cni_socket, pods.clone(), rounds, health) => result,
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
