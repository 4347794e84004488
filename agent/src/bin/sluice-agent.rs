//! sluice-agent: the node daemon. Sets up the node's pod network, adopts what a previous agent
//! left, follows the other nodes through the Kubernetes API, and serves the CNI plugin.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use anyhow::{Context, Result};
use clap::Parser;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use sluice_agent::{
    cni::{
        rounds::ProgramRounds,
        server::{serve, PodNetwork},
    },
    config::{Config, Settings},
    datapath::ebpf::EbpfDatapath,
    external_ip::{self, ExternalIpError},
    health,
    k8s::{self, ClusterStore},
    metrics::Metrics,
    model::{
        policy::{self, Allocator, LocalNode, PolicyError, PolicyTables},
        service::{self, ServiceError, ServiceInputs, SetAllocator},
        Mac,
    },
    service_health::HealthCheckServers,
};
use sluice_common::{ExternalIp, IpKey};
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
    let metrics = Arc::new(Metrics::default());
    if let Some(address) = settings.health_address {
        let ready = ready.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            if let Err(e) = health::serve(address, ready, metrics).await {
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
    let datapath = EbpfDatapath::load(&config.bpffs_dir, node.tc_attach_mode, &settings.map_sizes)?;
    info!(attach = ?datapath.attach_mode(), pins = %config.bpffs_dir.display(), pod_cidr = %node.pod_cidr, encap = ?node.encap, "eBPF datapath loaded");
    let pods = Arc::new(Mutex::new(
        PodNetwork::start(node, Box::new(datapath), &config.state_dir).await?,
    ));
    let rounds = cluster
        .as_ref()
        .map(|(cluster, _, _)| ProgramRounds::new(cluster.changed.clone()));
    if let Some((cluster, own, client)) = cluster {
        let kernel_policy = pods
            .lock()
            .await
            .current_policy()
            .context("reading the policy maps a previous agent left")?;
        let mut follower = Follower {
            alloc: Allocator::seeded(&kernel_policy),
            rounds: rounds.clone().expect("made above with the cluster"),
            metrics,
            recorder: Recorder::new(
                client.clone(),
                Reporter {
                    controller: "sluice-agent".into(),
                    instance: Some(own.clone()),
                },
            ),
            policy_sync_error: None,
            cluster,
            client,
            owned: BTreeSet::new(),
            external_ip_errors: Vec::new(),
            own,
            pods: pods.clone(),
            state_dir: config.state_dir.clone(),
            errors: Vec::new(),
            settings: settings.clone(),
            sets: SetAllocator::new(),
            service_errors: Vec::new(),
            uplink: None,
            health_checks: HealthCheckServers::default(),
            services_compiled_at: None,
            service_names: BTreeMap::new(),
        };
        follower.program().await?;
        release_freed_memory();
        tokio::spawn(follower.run());
    }
    ready.store(true, Ordering::Release);
    info!("ready");
    run(&config, pods, rounds).await
}

/// Reprograms what the cluster store drives after every change of it: routes to the other
/// nodes, NetworkPolicy and Services. Each step diffs, so an unchanged part costs no map write.
struct Follower {
    cluster: ClusterStore,
    /// Rounds CNI ADDs wait for.
    rounds: ProgramRounds,
    metrics: Arc<Metrics>,
    /// Events on this agent's Node.
    recorder: Recorder,
    /// Why the last policy sync failed (closed), if it did.
    policy_sync_error: Option<String>,
    client: kube::Client,
    /// The LoadBalancer IPs this node answers for (ServiceExternalIP).
    owned: BTreeSet<IpAddr>,
    external_ip_errors: Vec<ExternalIpError>,
    own: String,
    pods: Arc<Mutex<PodNetwork>>,
    state_dir: PathBuf,
    alloc: Allocator,
    errors: Vec<PolicyError>,
    settings: Settings,
    sets: SetAllocator,
    service_errors: Vec<ServiceError>,
    /// The uplink (name, MAC), once the Node's addresses have shown which interface it is.
    uplink: Option<(String, Mac)>,
    health_checks: HealthCheckServers,
    /// `service_events` when the Service tables were last programmed: a change of anything
    /// else (a pod, a policy) does not recompile them.
    services_compiled_at: Option<u64>,
    service_names: BTreeMap<u32, String>,
}

impl Follower {
    async fn program(&mut self) -> Result<()> {
        // Read before the stores: everything up to this version is in what gets programmed.
        let revision = self
            .cluster
            .observed
            .load(std::sync::atomic::Ordering::Acquire);
        let service_events = self
            .cluster
            .service_events
            .load(std::sync::atomic::Ordering::Acquire);
        let nodes = self.cluster.nodes.state();
        let pod_network = self.pods.clone();
        let mut pods = pod_network.lock().await;
        pods.set_remote_routes(k8s::remote_routes(&nodes, &self.own))
            .await?;
        let mut host = k8s::node_addresses(&nodes, &self.own);
        host.push(pods.gateway_ip());
        let all_pods = self.cluster.pods.state();
        let namespaces = self.cluster.namespaces.state();
        let policies = self.cluster.network_policies.state();
        let endpoints = pods.endpoints()?;
        let tables = policy::compile(
            all_pods.iter().map(|p| p.as_ref()),
            namespaces.iter().map(|n| n.as_ref()),
            policies.iter().map(|p| p.as_ref()),
            &LocalNode {
                name: &self.own,
                host_ips: &host,
                endpoints: &endpoints,
            },
            &mut self.alloc,
        );
        if tables.errors != self.errors {
            for error in &tables.errors {
                warn!(
                    "{error}: the pods it selects are isolated and it allows nothing until fixed"
                );
            }
            self.errors = tables.errors.clone();
        }
        let policy_sync = pods.set_policy(&tables).err().map(|e| format!("{e:#}"));
        self.report_policy_sync(policy_sync, &nodes).await;
        let node_addresses = k8s::node_addresses(&nodes, &self.own);
        if self.uplink.is_none() && !node_addresses.is_empty() {
            let uplink = pods.attach_uplink(&node_addresses).await?;
            info!(uplink = %uplink.0, "Services from outside: program attached to the uplink");
            self.uplink = Some(uplink);
        }
        if self.services_compiled_at != Some(service_events) {
            self.program_services(&mut pods, &node_addresses).await?;
            self.services_compiled_at = Some(service_events);
        }
        drop(pods);
        self.external_ips(&nodes).await?;
        write_names(
            &self.state_dir,
            &tables,
            &self.service_names,
            &all_pods,
            revision,
        )
    }

    /// A policy sync that failed left the node tighter than desired (see
    /// `Maps::sync_policy`): said once per change of the error, in the log and as a Node
    /// event, and counted every time.
    async fn report_policy_sync(
        &mut self,
        error: Option<String>,
        nodes: &[Arc<k8s_openapi::api::core::v1::Node>],
    ) {
        self.metrics
            .policy_fail_closed
            .store(error.is_some(), Ordering::Relaxed);
        if error.is_some() {
            self.metrics
                .policy_sync_failures
                .fetch_add(1, Ordering::Relaxed);
        }
        if error == self.policy_sync_error {
            return;
        }
        let event = match &error {
            Some(e) => {
                warn!("programming NetworkPolicy failed closed: {e}");
                Event {
                    type_: EventType::Warning,
                    reason: "PolicyProgrammingFailed".into(),
                    // The API server caps a note at 1 kB.
                    note: Some(e.chars().take(1000).collect()),
                    action: "ProgramNetworkPolicy".into(),
                    secondary: None,
                }
            }
            None => {
                info!("NetworkPolicy is programmed in full again");
                Event {
                    type_: EventType::Normal,
                    reason: "PolicyProgrammed".into(),
                    note: Some("every NetworkPolicy entry is programmed again".into()),
                    action: "ProgramNetworkPolicy".into(),
                    secondary: None,
                }
            }
        };
        self.policy_sync_error = error;
        let reference = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(self.own.clone()),
            uid: nodes
                .iter()
                .find(|n| n.metadata.name.as_deref() == Some(&self.own))
                .and_then(|n| n.metadata.uid.clone()),
            ..ObjectReference::default()
        };
        if let Err(e) = self.recorder.publish(&event, &reference).await {
            warn!("recording the Node event {}: {e}", event.reason);
        }
    }

    /// Services: compiled, synced, health-check ports served.
    async fn program_services(
        &mut self,
        pods: &mut PodNetwork,
        node_addresses: &[IpAddr],
    ) -> Result<()> {
        // Compiled from references into the watch stores: copying 10,000 Services and their
        // slices on every change would double the agent's memory.
        let service_store = self.cluster.services.state();
        let slice_store = self.cluster.endpoint_slices.state();
        let services: Vec<_> = service_store.iter().map(AsRef::as_ref).collect();
        let slices: Vec<_> = slice_store.iter().map(AsRef::as_ref).collect();
        let node_ports = self.settings.node_port_addresses(node_addresses);
        let tables = service::compile(
            &ServiceInputs {
                services: &services,
                slices: &slices,
                node_name: &self.own,
                node_port_addresses: &node_ports,
            },
            &mut self.sets,
        );
        if tables.errors != self.service_errors {
            for error in &tables.errors {
                warn!("{error}: that part of the Service is not programmed until fixed");
            }
            self.service_errors = tables.errors.clone();
        }
        pods.set_services(&tables, &live_endpoints(&slices))?;
        for error in self.health_checks.update(&tables.health_checks).await {
            warn!("{error:#}");
        }
        self.service_names = tables.names;
        Ok(())
    }

    /// ServiceExternalIP: LoadBalancer IPs handed out from the pools (by one agent), and the
    /// ones this node owns answered for on its uplink, announced when they arrive.
    async fn external_ips(
        &mut self,
        nodes: &[Arc<k8s_openapi::api::core::v1::Node>],
    ) -> Result<()> {
        let Some(pools) = &self.cluster.external_ip_pools else {
            return Ok(());
        };
        let pools = pools.state();
        let services = self.cluster.services.state();
        let plan = external_ip::plan(
            pools.iter().map(|p| p.as_ref()),
            services.iter().map(|s| s.as_ref()),
            nodes.iter().map(|n| n.as_ref()),
            &self.own,
        );
        if plan.errors != self.external_ip_errors {
            for error in &plan.errors {
                warn!("{error}");
            }
            self.external_ip_errors = plan.errors.clone();
        }
        if let Err(e) = external_ip::apply_writes(&self.client, &plan.writes).await {
            warn!("ServiceExternalIP: {e} (retried on the next change)");
        }
        let Some((uplink, mac)) = &self.uplink else {
            return Ok(());
        };
        let entries: BTreeMap<IpKey, ExternalIp> = plan
            .owned
            .iter()
            .filter_map(|ip| match ip {
                IpAddr::V4(v4) => Some((
                    IpKey::v4(v4.octets()),
                    ExternalIp {
                        mac: mac.0,
                        _pad: [0; 2],
                    },
                )),
                IpAddr::V6(_) => None,
            })
            .collect();
        self.pods.lock().await.set_external_ips(&entries)?;
        for ip in plan.owned.difference(&self.owned) {
            info!(%ip, "ServiceExternalIP: this node now answers for the address");
            if let IpAddr::V4(v4) = ip {
                if let Err(e) = external_ip::announce(uplink, *v4) {
                    warn!("announcing {ip}: {e:#}");
                }
            }
        }
        self.owned = plan.owned;
        Ok(())
    }

    async fn run(mut self) {
        loop {
            self.cluster.changed.notified().await;
            let covered = self.rounds.start();
            let result = self.program().await;
            self.rounds.finish(covered);
            if let Err(e) = result {
                warn!("programming the cluster state failed (retried on the next change): {e:#}");
            }
            release_freed_memory();
        }
    }
}

/// A program round allocates and frees tens of MiB with thousands of Services (the compiled
/// tables, the map diffs); glibc keeps freed memory mapped unless asked to hand it back.
fn release_freed_memory() {
    // SAFETY: malloc_trim only returns unused heap pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Every endpoint address in an EndpointSlice, whatever its conditions: connections to those
/// keep their endpoint (a terminating pod still finishes its connections).
fn live_endpoints(slices: &[&k8s::EndpointSlice]) -> std::collections::BTreeSet<IpKey> {
    slices
        .iter()
        .flat_map(|slice| slice.endpoints.iter().flatten())
        .flat_map(|endpoint| endpoint.addresses.iter())
        .filter_map(|address| address.parse::<std::net::IpAddr>().ok())
        .map(|ip| match ip {
            std::net::IpAddr::V4(v4) => IpKey::v4(v4.octets()),
            std::net::IpAddr::V6(v6) => IpKey::v6(v6.octets()),
        })
        .collect()
}

/// Names for `sluicectl` (rule ids → policy rules, pod addresses → pods, backend sets →
/// Services) and how far the
/// programmed state has caught up with the API server.
fn write_names(
    state_dir: &std::path::Path,
    tables: &PolicyTables,
    services: &BTreeMap<u32, String>,
    pods: &[Arc<k8s_openapi::api::core::v1::Pod>],
    revision: u64,
) -> Result<()> {
    let rules: std::collections::BTreeMap<u32, String> = tables
        .rules
        .iter()
        .map(|(id, r)| (*id, r.to_string()))
        .collect();
    let mut addresses = std::collections::BTreeMap::new();
    for pod in pods {
        let name = format!(
            "{}/{}",
            pod.metadata.namespace.as_deref().unwrap_or(""),
            pod.metadata.name.as_deref().unwrap_or("")
        );
        for ip in pod.status.iter().flat_map(|s| s.pod_ips.iter().flatten()) {
            addresses.insert(ip.ip.clone(), name.clone());
        }
    }
    // `programmedResourceVersion` tells the lab (and operators) how far the datapath has caught
    // up with the API server.
    let names = serde_json::json!({
        "rules": rules,
        "pods": addresses,
        "services": services,
        "programmedResourceVersion": revision,
    });
    let path = state_dir.join("names.json");
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&names)?)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .with_context(|| format!("writing {}", path.display()))
}

async fn run(
    config: &Config,
    pods: Arc<Mutex<PodNetwork>>,
    rounds: Option<ProgramRounds>,
) -> Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        result = serve(&config.cni_socket, pods.clone(), rounds) => result,
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
