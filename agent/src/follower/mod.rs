//! The agent's control loop: reprograms what the cluster store drives after every change of it.
//! A round has independent parts — routes to the other nodes, NetworkPolicy, the uplink,
//! Services, external IPs, the names `sluicectl` shows — and one that fails does not stop the
//! others. A failed round is retried with backoff until one succeeds, and a periodic resync
//! re-derives everything from the store, so a write lost to a transient error is not kept lost.
//! Each part diffs, so an unchanged part costs no map write.

mod overlaps;
mod report;
mod services;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
    path::PathBuf,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::Node;
use kube::runtime::reflector::ObjectRef;
use tokio::{sync::Mutex, time::MissedTickBehavior};
use tracing::{info, warn};

use crate::{
    cni::{rounds::ProgramRounds, server::PodNetwork},
    config::Settings,
    external_ip::ExternalIpError,
    health::{Health, UNHEALTHY_AFTER},
    k8s::{self, ClusterStore},
    metrics::Metrics,
    model::{
        policy::{self, Allocator, LocalNode, ParsedPolicies, PodIndex, PodKey, PolicyError},
        service::{ServiceError, SetAllocator},
        LocalEndpoint, Mac,
    },
    names::Names,
    service_health::HealthCheckServers,
};

/// How often everything is re-derived from the store though nothing changed.
pub const RESYNC_PERIOD: Duration = Duration::from_secs(300);

/// What the follower works with.
pub struct Setup {
    pub cluster: ClusterStore,
    pub client: kube::Client,
    /// This node's name.
    pub own: String,
    pub pods: Arc<Mutex<PodNetwork>>,
    pub settings: Settings,
    pub state_dir: PathBuf,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
}

/// Programs the cluster state once, then follows it in the background. The first round may
/// fail (it is retried like any other); returns the rounds a CNI ADD waits for.
pub async fn start(setup: Setup) -> Result<ProgramRounds> {
    let kernel_policy = setup
        .pods
        .lock()
        .await
        .current_policy()
        .context("reading the policy maps a previous agent left")?;
    let rounds = ProgramRounds::new(setup.cluster.changed.clone());
    let mut follower = Follower {
        alloc: Allocator::seeded(&kernel_policy),
        pod_index: PodIndex::default(),
        index_whole: true,
        parsed_policies: ParsedPolicies::default(),
        rounds: rounds.clone(),
        events: k8s::EventSink::new(setup.client, "sluice-agent", &setup.own),
        policy_sync_error: None,
        health_checks: HealthCheckServers::new(setup.health.clone()),
        metrics: setup.metrics,
        health: setup.health,
        cluster: setup.cluster,
        owned: BTreeSet::new(),
        external_ip_errors: Vec::new(),
        own: setup.own,
        pods: setup.pods,
        state_dir: setup.state_dir,
        errors: Vec::new(),
        settings: setup.settings,
        sets: SetAllocator::new(),
        service_errors: Vec::new(),
        uplink: None,
        services_compiled_at: None,
        policy_compiled_for: None,
        routes_at: None,
        external_ips_at: None,
        names: Names::default(),
        programmed_revisions: BTreeMap::new(),
        overlaps_checked: None,
        overlaps: Vec::new(),
    };
    let names_socket = crate::names::socket(&follower.state_dir);
    let (names, pods) = (follower.names.clone(), follower.cluster.pods.clone());
    tokio::spawn(async move {
        if let Err(e) = crate::names::serve(&names_socket, names, pods).await {
            warn!("the names socket for sluicectl stopped: {e:#}");
        }
    });
    let mut backoff = Backoff::default();
    follower.round(&mut backoff).await;
    tokio::spawn(follower.run(backoff));
    Ok(rounds)
}

struct Follower {
    cluster: ClusterStore,
    /// Rounds CNI ADDs wait for.
    rounds: ProgramRounds,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    /// Events on this agent's Node.
    events: k8s::EventSink,
    /// Why the last policy sync failed (closed), if it did.
    policy_sync_error: Option<String>,
    /// The LoadBalancer IPs this node answers for (ServiceExternalIP).
    owned: BTreeSet<IpAddr>,
    external_ip_errors: Vec<ExternalIpError>,
    own: String,
    pods: Arc<Mutex<PodNetwork>>,
    state_dir: PathBuf,
    alloc: Allocator,
    /// The cluster's pods as policy sees them, brought up to date by the watch's changes.
    pod_index: PodIndex,
    /// Bring every pod of the store into `pod_index` at the next compile, not only the changed:
    /// at start, after a relist, at a periodic resync.
    index_whole: bool,
    /// The NetworkPolicies parsed, kept by resourceVersion.
    parsed_policies: ParsedPolicies,
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
    /// `policy_events` and the pods wired here when the policy was last programmed: a change of
    /// anything else (a Service, a heartbeat) does not recompile it.
    policy_compiled_for: Option<(u64, Vec<LocalEndpoint>)>,
    /// `node_events` when the routes to the other nodes were last programmed: a heartbeat
    /// neither reprograms them nor reruns the overlap check.
    routes_at: Option<u64>,
    /// `external_ip_events` when the LoadBalancer IPs this node answers for were last programmed.
    external_ips_at: Option<u64>,
    /// Rule ids and backend set ids by name, for `sluicectl`.
    names: Names,
    /// Per kind, the store's revision the last round that programmed everything had read.
    programmed_revisions: BTreeMap<&'static str, u64>,
    /// The cluster networks the overlap check last ran on (`None`: run it), and what it found.
    overlaps_checked: Option<Vec<crate::overlap::Network>>,
    overlaps: Vec<crate::overlap::Overlap>,
}

/// A part of a round that failed.
struct PartError {
    part: &'static str,
    error: anyhow::Error,
}

impl fmt::Display for PartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {:#}", self.part, self.error)
    }
}

/// Collects the parts that failed.
#[derive(Default)]
struct Failures(Vec<PartError>);

impl Failures {
    fn part<T>(&mut self, part: &'static str, result: Result<T>) -> Option<T> {
        result
            .map_err(|error| self.0.push(PartError { part, error }))
            .ok()
    }
}

impl Follower {
    async fn run(mut self, mut backoff: Backoff) {
        let mut resync =
            tokio::time::interval_at(tokio::time::Instant::now() + RESYNC_PERIOD, RESYNC_PERIOD);
        resync.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            let retry = backoff.pending();
            tokio::select! {
                () = self.cluster.changed.notified() => {}
                () = tokio::time::sleep(retry.unwrap_or_default()), if retry.is_some() => {}
                _ = resync.tick() => {
                    info!("periodic resync: every part re-derived from the store");
                    self.services_compiled_at = None;
                    self.policy_compiled_for = None;
                    self.index_whole = true;
                    self.external_ips_at = None;
                    self.overlaps_checked = None;
                    self.routes_at = None;
                }
            }
            self.round(&mut backoff).await;
        }
    }

    /// One round: programs, reports the outcome, schedules the retry of a failure.
    async fn round(&mut self, backoff: &mut Backoff) {
        let covered = self.rounds.start();
        let failures = self.program().await;
        self.rounds.finish(covered);
        if failures.0.is_empty() {
            if backoff.pending().is_some() {
                info!("programming the cluster state succeeded again");
            }
            backoff.reset();
            self.health.programmed();
        } else {
            let error = failures
                .0
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ");
            let delay = backoff.failed();
            let in_a_row = self.health.failed(error.clone());
            self.metrics
                .program_round_failures
                .fetch_add(1, Ordering::Relaxed);
            warn!(
                in_a_row,
                unhealthy = in_a_row >= UNHEALTHY_AFTER,
                "programming the cluster state failed ({error}); retried in {delay:?} or on the next change"
            );
        }
        release_freed_memory();
    }

    async fn program(&mut self) -> Failures {
        let mut failures = Failures::default();
        // Read before the stores: everything up to these versions is in what gets programmed.
        let revisions: Vec<(&'static str, u64)> = self
            .cluster
            .observed
            .iter()
            .map(|(kind, rv)| (*kind, rv.load(Ordering::Acquire)))
            .collect();
        let service_events = self.cluster.service_events.load(Ordering::Acquire);
        let policy_events = self.cluster.policy_events.load(Ordering::Acquire);
        let external_ip_events = self.cluster.external_ip_events.load(Ordering::Acquire);
        let node_events = self.cluster.node_events.load(Ordering::Acquire);
        let nodes_changed = self.routes_at != Some(node_events);
        let nodes = self.cluster.nodes.state();
        let node_addresses = k8s::node_addresses(&nodes, &self.own);
        // The pod network is locked only to read it and to write the datapath: a CNI ADD or DEL
        // waits for a map sync at most, never for a compile.
        let endpoints = {
            let mut pods = self.pods.lock().await;
            if nodes_changed {
                let routes = pods
                    .set_remote_routes(k8s::remote_routes(&nodes, &self.own))
                    .await;
                if failures.part("routes", routes).is_some() {
                    self.routes_at = Some(node_events);
                }
            }
            if self.uplink.is_none() && !node_addresses.is_empty() {
                if let Some(uplink) =
                    failures.part("uplink", pods.attach_uplink(&node_addresses).await)
                {
                    info!(uplink = %uplink.0, "Services from outside: program attached to the uplink");
                    self.uplink = Some(uplink);
                    self.external_ips_at = None;
                }
            }
            failures.part("policy", pods.endpoints())
        };
        if let Some(endpoints) = endpoints {
            let inputs = (policy_events, endpoints);
            if self.policy_compiled_for.as_ref() != Some(&inputs) {
                let programmed = self.program_policy(&inputs.1, &node_addresses, &nodes);
                if failures.part("policy", programmed.await).is_some() {
                    self.policy_compiled_for = Some(inputs);
                }
            }
        }
        if self.services_compiled_at != Some(service_events) {
            let programmed = self.program_services(&node_addresses).await;
            if failures.part("services", programmed).is_some() {
                self.services_compiled_at = Some(service_events);
            }
        }
        // Diagnostics only: a failed check does not fail the round.
        if nodes_changed || self.overlaps_checked.is_none() {
            if let Err(e) = self.check_overlaps(&nodes).await {
                warn!("checking for overlapping networks: {e:#}");
                self.overlaps_checked = None;
            }
        }
        if self.external_ips_at != Some(external_ip_events) {
            let programmed = self.external_ips(&nodes).await;
            if failures.part("external IPs", programmed).is_some() {
                self.external_ips_at = Some(external_ip_events);
            }
        }
        // Only a round that programmed everything may say it caught up.
        if failures.0.is_empty() {
            self.programmed_revisions.extend(revisions);
        }
        let written = report::write_programmed(&self.state_dir, &self.programmed_revisions);
        failures.part("report", written);
        failures
    }

    /// NetworkPolicy for the pods wired here (`endpoints`): compiled off the async workers and
    /// with the pod network unlocked, then synced.
    async fn program_policy(
        &mut self,
        endpoints: &[LocalEndpoint],
        node_addresses: &[IpAddr],
        nodes: &[Arc<Node>],
    ) -> Result<()> {
        let gateway_ip = self.pods.lock().await.gateway_ip();
        let mut host = node_addresses.to_vec();
        host.push(gateway_ip);
        // Taken before the store is read: a change after this is in the next take.
        let changed = self.cluster.pod_changes.take();
        let whole = std::mem::take(&mut self.index_whole) || changed.all;
        let namespaces = self.cluster.namespaces.state();
        let policies = self.cluster.network_policies.state();
        let mut tables = tokio::task::block_in_place(|| {
            let store = &self.cluster.pods;
            let keys: BTreeSet<PodKey> = if whole {
                let in_store = store.state().iter().map(|p| policy::pod_key(p)).collect();
                let indexed: BTreeSet<PodKey> = self.pod_index.keys().cloned().collect();
                indexed.union(&in_store).cloned().collect()
            } else {
                changed.keys
            };
            let pods = keys.into_iter().map(|key| {
                let pod = store.get(&ObjectRef::new(&key.1).within(&key.0));
                (key, pod)
            });
            self.pod_index
                .update(pods, endpoints, &self.own, &mut self.alloc);
            policy::compile_indexed(
                &self.pod_index,
                namespaces.iter().map(|n| n.as_ref()),
                policies.iter().map(|p| p.as_ref()),
                &mut self.parsed_policies,
                &LocalNode {
                    name: &self.own,
                    host_ips: &host,
                    endpoints,
                },
                &mut self.alloc,
            )
        });
        if tables.errors != self.errors {
            for error in &tables.errors {
                warn!(
                    "{error}: the pods it selects are isolated and it allows nothing until fixed"
                );
            }
            self.errors = tables.errors.clone();
        }
        let synced = {
            let mut pods = self.pods.lock().await;
            // A pod wired while the compile ran is not in it: it stays isolated pending (as its
            // ADD left it) until the next round, which its ADD asked for.
            pods.endpoints().map(|now| {
                policy::isolate_new(&mut tables, endpoints, &now);
                tokio::task::block_in_place(|| pods.set_policy(&tables))
            })
        }
        .and_then(|synced| synced);
        self.report_policy_sync(synced.as_ref().err().map(|e| format!("{e:#}")), nodes)
            .await;
        synced?;
        self.names.set_rules(
            tables
                .rules
                .iter()
                .map(|(id, r)| (*id, r.to_string()))
                .collect(),
        );
        Ok(())
    }
}

/// The delay before retrying a failed round: doubling from 200 ms up to 30 s, back to the start
/// after a round that succeeds.
#[derive(Debug, Default)]
struct Backoff {
    /// The delay of the retry scheduled now, if a round failed.
    pending: Option<Duration>,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(200);
    const MAX: Duration = Duration::from_secs(30);

    fn failed(&mut self) -> Duration {
        let delay = self
            .pending
            .map_or(Self::FIRST, |last| (last * 2).min(Self::MAX));
        self.pending = Some(delay);
        delay
    }

    fn pending(&self) -> Option<Duration> {
        self.pending
    }

    fn reset(&mut self) {
        self.pending = None;
    }
}

/// A program round allocates and frees tens of MiB with thousands of Services (the compiled
/// tables, the map diffs); glibc keeps freed memory mapped unless asked to hand it back.
pub fn release_freed_memory() {
    // SAFETY: malloc_trim only returns unused heap pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_cap_and_resets() {
        let mut backoff = Backoff::default();
        assert_eq!(backoff.pending(), None);
        let delays: Vec<_> = (0..10).map(|_| backoff.failed()).collect();
        assert_eq!(delays[0], Duration::from_millis(200));
        assert_eq!(delays[1], Duration::from_millis(400));
        assert_eq!(delays[4], Duration::from_millis(3200));
        assert_eq!(delays[8], Duration::from_secs(30));
        assert_eq!(delays[9], Duration::from_secs(30));
        assert_eq!(backoff.pending(), Some(Duration::from_secs(30)));
        backoff.reset();
        assert_eq!(backoff.pending(), None);
        assert_eq!(backoff.failed(), Duration::from_millis(200));
    }

    #[test]
    fn failures_name_their_part() {
        let mut failures = Failures::default();
        assert_eq!(failures.part("routes", Ok::<_, anyhow::Error>(7)), Some(7));
        assert!(failures
            .part::<()>("services", Err(anyhow::anyhow!("map SERVICES is full")))
            .is_none());
        let said: Vec<_> = failures.0.iter().map(ToString::to_string).collect();
        assert_eq!(said, ["services: map SERVICES is full"]);
    }
}
