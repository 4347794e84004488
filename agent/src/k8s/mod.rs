//! Kubernetes: kube-rs watchers (with backoff; a 410 Gone makes the watcher relist) feed
//! reflector stores — the cluster store. Nothing here touches the kernel: `remote_routes` turns the
//! store into plain data for the pipeline.

pub mod access;
mod changes;
mod node_changes;
mod pod;
mod slice;

pub use changes::{Changed, PodChanges};
pub use pod::{Container, Pod, PodSpec, PodStatus};
pub use slice::{Endpoint, EndpointSlice};

use std::{
    net::IpAddr,
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{Context, Result};
use futures::StreamExt;
use ipnetwork::IpNetwork;
use k8s_openapi::api::{
    core::v1::{Namespace, Node, ObjectReference, Service},
    networking::v1::NetworkPolicy,
};
use kube::{
    api::DynamicObject,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        events::{Event, Recorder, Reporter},
        reflector::{self, store::Writer, Store},
        watcher, WatchStreamExt,
    },
    Api, Client, Resource,
};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tracing::warn;

use crate::{config::FeatureGates, external_ip, model::RemoteRoute};

/// The cluster as this node's agent sees it.
#[derive(Clone)]
pub struct ClusterStore {
    pub nodes: Store<Node>,
    pub namespaces: Store<Namespace>,
    /// Every pod: NetworkPolicy peers live on any node.
    pub pods: Store<Pod>,
    /// Which of `pods` changed since the policy compiler last took them.
    pub pod_changes: PodChanges,
    pub services: Store<Service>,
    pub endpoint_slices: Store<EndpointSlice>,
    pub network_policies: Store<NetworkPolicy>,
    /// Antrea ExternalIPPools (`crd.antrea.io/v1beta1`); watched only with the ServiceExternalIP
    /// feature gate. Kept as JSON: a malformed pool must not break the watch, `external_ip`
    /// checks each pool and reports it.
    pub external_ip_pools: Option<Store<DynamicObject>>,
    /// Signalled after every watch event of any kind.
    pub changed: Arc<Notify>,
    /// Per watched kind, the highest resourceVersion its stream carried: what the store has seen
    /// of that kind. Kept apart because the streams are independent: one may be ahead of
    /// another, so a maximum across them would claim events not yet received.
    pub observed: Vec<(&'static str, Arc<AtomicU64>)>,
    /// Events of the kinds the Service tables are compiled from (Node, Service,
    /// EndpointSlice; of Nodes only those that change what the tables read, not heartbeats):
    /// unchanged, the tables need no recompiling.
    pub service_events: Arc<AtomicU64>,
    /// Events of the kinds NetworkPolicy is compiled from (Pod, Namespace, NetworkPolicy; and
    /// Nodes as for `service_events`, since the node's own addresses are HOST): unchanged, the
    /// policy tables need no recompiling.
    pub policy_events: Arc<AtomicU64>,
    /// Node events that change more than heartbeats (the routes to the other nodes and the
    /// overlap check read them).
    pub node_events: Arc<AtomicU64>,
    /// Events of the kinds ServiceExternalIP plans from (ExternalIPPool, Service; Nodes as for
    /// `service_events`): unchanged, the LoadBalancer IPs this node answers for are the same.
    pub external_ip_events: Arc<AtomicU64>,
}

/// Publishes Events that are each said once, when what they report changes. kube's `Recorder`
/// folds events that differ only in their note into one series (its key leaves the note out),
/// which would hide a second, different conflict of the same reason: each event gets a recorder
/// of its own.
#[derive(Clone)]
pub struct EventSink {
    client: Client,
    reporter: Reporter,
}

impl EventSink {
    pub fn new(client: Client, controller: &str, instance: &str) -> EventSink {
        EventSink {
            client,
            reporter: Reporter {
                controller: controller.into(),
                instance: Some(instance.into()),
            },
        }
    }

    /// Records `event` on the Node `name`; a failure is only logged.
    pub async fn on_node(&self, name: &str, uid: Option<String>, event: &Event) {
        let regarding = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(name.to_string()),
            uid,
            ..ObjectReference::default()
        };
        let recorder = Recorder::new(self.client.clone(), self.reporter.clone());
        if let Err(e) = recorder.publish(event, &regarding).await {
            warn!(
                node = name,
                "recording the Node event {}: {e}", event.reason
            );
        }
    }
}

pub async fn client(kubeconfig: Option<&Path>) -> Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?
        }
        None => kube::Config::infer()
            .await
            .context("no kubeconfig given and no in-cluster config")?,
    };
    Ok(Client::try_from(config)?)
}

/// What every watch event touches: the shared "something changed" signal, the highest
/// resourceVersion of this kind's stream, and the counters of the parts this kind feeds.
#[derive(Clone)]
struct Signals {
    changed: Arc<Notify>,
    observed: Arc<AtomicU64>,
    events: Vec<Arc<AtomicU64>>,
}

impl Signals {
    fn counting(&self, events: &[&Arc<AtomicU64>]) -> Signals {
        Signals {
            events: events.iter().map(|e| Arc::clone(e)).collect(),
            ..self.clone()
        }
    }

    /// These signals with a resourceVersion of its own for `kind`, registered in `observed`.
    fn kind(
        &self,
        kind: &'static str,
        observed: &mut Vec<(&'static str, Arc<AtomicU64>)>,
    ) -> Signals {
        let rv = Arc::new(AtomicU64::new(0));
        observed.push((kind, rv.clone()));
        Signals {
            observed: rv,
            ..self.clone()
        }
    }
}

fn watch<K>(api: Api<K>, config: watcher::Config, signals: Signals) -> Store<K>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    watch_with(api, Default::default(), config, signals, |_| true, |_| {})
}

/// As [`watch`], for kinds known only at run time (`DynamicObject` with its `ApiResource`);
/// `counts` tells the events that count in `signals.events` (every one changes the store), and
/// `trim` drops what of an object the agent never reads before the store keeps it.
fn watch_with<K>(
    api: Api<K>,
    dyntype: K::DynamicType,
    config: watcher::Config,
    signals: Signals,
    mut counts: impl FnMut(&watcher::Event<K>) -> bool + Send + 'static,
    mut trim: impl FnMut(&mut K) + Send + 'static,
) -> Store<K>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    let kind = K::kind(&dyntype).into_owned();
    let writer = Writer::new(dyntype);
    let reader = writer.as_reader();
    // managedFields are never read and are often the bulk of an object: not kept.
    let objects = watcher(api, config).default_backoff().modify(move |obj| {
        obj.meta_mut().managed_fields = None;
        trim(obj);
    });
    let stream = reflector::reflector(writer, objects);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(event) => {
                    if let watcher::Event::Apply(obj)
                    | watcher::Event::Delete(obj)
                    | watcher::Event::InitApply(obj) = &event
                    {
                        let rv = obj
                            .meta()
                            .resource_version
                            .as_deref()
                            .and_then(|rv| rv.parse().ok());
                        signals
                            .observed
                            .fetch_max(rv.unwrap_or(0), Ordering::AcqRel);
                    }
                    if counts(&event) {
                        for events in &signals.events {
                            events.fetch_add(1, Ordering::AcqRel);
                        }
                    }
                    signals.changed.notify_one()
                }
                // The backoff retries; a 410 Gone makes the watcher relist.
                Err(e) => warn!(%kind, "watch failed, retrying: {e}"),
            }
        }
    });
    reader
}

/// A reflector store of every object of a kind, with `changed` signalled after each event:
/// for the controller, which needs a few kinds, not the agent's whole [`ClusterStore`].
pub fn follow<K>(api: Api<K>, dyntype: K::DynamicType, changed: Arc<Notify>) -> Store<K>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    let signals = Signals {
        changed,
        observed: Arc::default(),
        events: Vec::new(),
    };
    watch_with(
        api,
        dyntype,
        watcher::Config::default(),
        signals,
        |_| true,
        |_| {},
    )
}

impl ClusterStore {
    pub fn start(client: Client, gates: FeatureGates) -> ClusterStore {
        let signals = Signals {
            changed: Arc::new(Notify::new()),
            observed: Arc::default(),
            events: Vec::new(),
        };
        let service_events = Arc::new(AtomicU64::new(0));
        let policy_events = Arc::new(AtomicU64::new(0));
        let node_events = Arc::new(AtomicU64::new(0));
        let external_ip_events = Arc::new(AtomicU64::new(0));
        let mut observed = Vec::new();
        let all = watcher::Config::default;
        let external_ip_pools = gates.service_external_ip.then(|| {
            let pools = external_ip::pool_resource();
            watch_with(
                Api::<DynamicObject>::all_with(client.clone(), &pools),
                pools,
                all(),
                signals
                    .counting(&[&external_ip_events])
                    .kind("ExternalIPPool", &mut observed),
                |_| true,
                |_| {},
            )
        });
        // Heartbeats recompile neither the Services nor the policy.
        let mut node_changes = node_changes::NodeChanges::default();
        let nodes = watch_with(
            Api::<Node>::all(client.clone()),
            (),
            all(),
            signals
                .counting(&[
                    &service_events,
                    &policy_events,
                    &node_events,
                    &external_ip_events,
                ])
                .kind("Node", &mut observed),
            move |event| node_changes.relevant(event),
            |_| {},
        );
        let namespaces = watch(
            Api::<Namespace>::all(client.clone()),
            all(),
            signals
                .counting(&[&policy_events])
                .kind("Namespace", &mut observed),
        );
        let pod_changes = PodChanges::default();
        let recorder = pod_changes.clone();
        let pods = watch_with(
            Api::<Pod>::all(client.clone()),
            (),
            all(),
            signals
                .counting(&[&policy_events])
                .kind("Pod", &mut observed),
            move |event| {
                recorder.record(event);
                true
            },
            pod::trim,
        );
        let services = watch(
            Api::<Service>::all(client.clone()),
            all(),
            signals
                .counting(&[&service_events, &external_ip_events])
                .kind("Service", &mut observed),
        );
        let endpoint_slices = watch(
            Api::<EndpointSlice>::all(client.clone()),
            all(),
            signals
                .counting(&[&service_events])
                .kind("EndpointSlice", &mut observed),
        );
        let network_policies = watch(
            Api::<NetworkPolicy>::all(client),
            all(),
            signals
                .counting(&[&policy_events])
                .kind("NetworkPolicy", &mut observed),
        );
        ClusterStore {
            nodes,
            namespaces,
            pods,
            pod_changes,
            services,
            endpoint_slices,
            network_policies,
            external_ip_pools,
            changed: signals.changed,
            observed,
            service_events,
            policy_events,
            node_events,
            external_ip_events,
        }
    }

    /// Waits for the first full list of every kind.
    pub async fn wait_until_ready(&self) -> Result<()> {
        self.nodes.wait_until_ready().await?;
        self.namespaces.wait_until_ready().await?;
        self.pods.wait_until_ready().await?;
        self.services.wait_until_ready().await?;
        self.endpoint_slices.wait_until_ready().await?;
        self.network_policies.wait_until_ready().await?;
        if let Some(pools) = &self.external_ip_pools {
            pools.wait_until_ready().await?;
        }
        Ok(())
    }

    /// This node's pod CIDR from its Node object (NodeIPAM), waiting for it to be assigned.
    pub async fn own_pod_cidr(&self, node_name: &str) -> IpNetwork {
        loop {
            let node = self
                .nodes
                .state()
                .into_iter()
                .find(|n| n.metadata.name.as_deref() == Some(node_name));
            match node.as_deref().map(|n| (pod_cidrs(n), n)) {
                Some((cidrs, _)) if !cidrs.is_empty() => return cidrs[0],
                Some((_, n)) if n.spec.as_ref().is_some_and(|s| s.pod_cidr.is_some()) => warn!(
                    node = node_name,
                    "waiting for an IPv4 podCIDR: the Node has only IPv6 (or invalid) podCIDRs, \
                     and IPv6 pods are not supported yet"
                ),
                Some(_) => warn!(
                    node = node_name,
                    "waiting for the Node's spec.podCIDR: turn on NodeIPAM in sluice-controller \
                     (chart values nodeIPAM.enable and nodeIPAM.clusterCIDRs), or let \
                     kube-controller-manager allocate (--allocate-node-cidrs, as kubeadm \
                     --pod-network-cidr does), or set it on the Node"
                ),
                None => warn!(node = node_name, "waiting for the Node object"),
            }
            tokio::select! {
                _ = self.changed.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        }
    }
}

/// Every pod CIDR of a node, both families (`spec.podCIDRs`, or the older `spec.podCIDR`), and
/// the entries that do not parse.
pub fn all_pod_cidrs(node: &Node) -> (Vec<IpNetwork>, Vec<String>) {
    let spec = node.spec.as_ref();
    let texts: Vec<&String> = match spec.and_then(|s| s.pod_cidrs.as_ref()) {
        Some(list) if !list.is_empty() => list.iter().collect(),
        _ => spec.and_then(|s| s.pod_cidr.as_ref()).into_iter().collect(),
    };
    let mut cidrs = Vec::new();
    let mut bad = Vec::new();
    for text in texts {
        match text.parse() {
            Ok(cidr) => cidrs.push(cidr),
            Err(_) => bad.push(text.clone()),
        }
    }
    (cidrs, bad)
}

/// IPv4 pod CIDRs of a node. Unparsable entries are skipped with a warning: one bad Node must
/// not stop the others.
pub fn pod_cidrs(node: &Node) -> Vec<IpNetwork> {
    let (cidrs, bad) = all_pod_cidrs(node);
    for text in bad {
        warn!(node = ?node.metadata.name, podCIDR = %text, "ignoring invalid podCIDR");
    }
    cidrs.into_iter().filter(IpNetwork::is_ipv4).collect()
}

fn internal_ip(node: &Node) -> Option<IpAddr> {
    node.status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .filter(|a| a.type_ == "InternalIP")
        .find_map(|a| a.address.parse::<IpAddr>().ok().filter(IpAddr::is_ipv4))
}

/// Every other node's pod CIDRs with its InternalIP. A node without either is skipped (it cannot
/// be reached yet); it is picked up when its object changes.
pub fn remote_routes(nodes: &[Arc<Node>], own: &str) -> Vec<RemoteRoute> {
    let mut routes: Vec<RemoteRoute> = nodes
        .iter()
        .filter(|n| n.metadata.name.as_deref() != Some(own))
        .flat_map(|node| {
            let name = node.metadata.name.clone().unwrap_or_default();
            let ip = internal_ip(node);
            pod_cidrs(node).into_iter().filter_map(move |pod_cidr| {
                Some(RemoteRoute {
                    node_name: name.clone(),
                    pod_cidr,
                    node_ip: ip?,
                })
            })
        })
        .collect();
    routes.sort();
    routes
}

/// This node's own addresses (the NetworkPolicy `HOST` identity): its Node's addresses.
pub fn node_addresses(nodes: &[Arc<Node>], own: &str) -> Vec<IpAddr> {
    nodes
        .iter()
        .filter(|n| n.metadata.name.as_deref() == Some(own))
        .flat_map(|n| n.status.iter().flat_map(|s| s.addresses.iter().flatten()))
        .filter_map(|a| a.address.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, cidr: Option<&str>, ip: Option<&str>) -> Arc<Node> {
        let value = serde_json::json!({
            "metadata": {"name": name},
            "spec": {"podCIDR": cidr},
            "status": {"addresses": ip.map(|ip| vec![
                serde_json::json!({"type": "Hostname", "address": name}),
                serde_json::json!({"type": "InternalIP", "address": ip}),
            ])},
        });
        Arc::new(serde_json::from_value(value).unwrap())
    }

    #[test]
    fn remote_routes_skip_self_and_incomplete_nodes() {
        let nodes = [
            node("a", Some("10.244.0.0/24"), Some("192.168.77.1")),
            node("b", Some("10.244.1.0/24"), Some("192.168.77.2")),
            node("c", None, Some("192.168.77.3")),
            node("d", Some("10.244.3.0/24"), None),
            node("e", Some("not-a-cidr"), Some("192.168.77.5")),
        ];
        let routes = remote_routes(&nodes, "a");
        assert_eq!(
            routes,
            vec![RemoteRoute {
                node_name: "b".into(),
                pod_cidr: "10.244.1.0/24".parse().unwrap(),
                node_ip: "192.168.77.2".parse().unwrap(),
            }]
        );
    }
}
