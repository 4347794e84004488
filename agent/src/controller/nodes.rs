//! NodeIPAM against the API: a watch on Nodes feeds [`NodeIpam`]; a Node without a podCIDR gets
//! one block per cluster CIDR in `spec.podCIDR`/`spec.podCIDRs`. Every (re)list rebuilds the
//! bookkeeping from the Nodes, so a deletion the watch missed is not a leak.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::Duration,
};

use anyhow::Result;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::{
    api::{Patch, PatchParams},
    runtime::{
        events::{Event, EventType},
        watcher::{self, Event as WatchEvent},
        WatchStreamExt,
    },
    Api,
};
use serde_json::json;
use tracing::{debug, info, warn};

use crate::k8s::{self, EventSink};

use super::{
    config::NodeIpamSettings,
    node_ipam::{Conflict, NodeIpam},
};

/// How soon a Node whose podCIDR could not be written (API error, exhaustion) is tried again.
const RETRY: Duration = Duration::from_secs(5);

/// Writes of a Node's podCIDR refused as stale (409: the kubelet, a label, a taint changed the
/// Node since it was read), each retried at once on a fresh read, before the Node waits for
/// [`RETRY`].
const STALE_WRITES: usize = 4;

pub struct NodeIpamController {
    api: Api<Node>,
    settings: NodeIpamSettings,
    ipam: NodeIpam,
    events: EventSink,
    /// Nodes still waiting for a podCIDR after a failed attempt.
    retry: BTreeSet<String>,
    /// Nodes whose exhaustion was reported: once, not every retry.
    exhausted: BTreeSet<String>,
    /// Nodes whose podCIDR was written and whose watch event for it has not come yet: the events
    /// before it are older than the write (a podCIDR, once set, never goes).
    written: BTreeSet<String>,
    /// Each Node's addresses as last checked against the cluster CIDRs.
    addresses: BTreeMap<String, Vec<(IpAddr, String)>>,
}

impl NodeIpamController {
    pub fn new(api: Api<Node>, settings: NodeIpamSettings, events: EventSink) -> Self {
        NodeIpamController {
            api,
            ipam: NodeIpam::new(&settings),
            settings,
            events,
            retry: BTreeSet::new(),
            exhausted: BTreeSet::new(),
            written: BTreeSet::new(),
            addresses: BTreeMap::new(),
        }
    }

    /// Follows the Nodes until the stream ends (it does not: the watcher relists on errors).
    pub async fn run(mut self) -> Result<()> {
        let mut stream = watcher::watcher(self.api.clone(), watcher::Config::default())
            .default_backoff()
            .boxed();
        let mut listed: Vec<Node> = Vec::new();
        let mut tick = tokio::time::interval(RETRY);
        loop {
            tokio::select! {
                event = stream.next() => match event {
                    None => return Ok(()),
                    Some(Err(e)) => warn!("watching Nodes: {e}"),
                    Some(Ok(WatchEvent::Init)) => listed.clear(),
                    Some(Ok(WatchEvent::InitApply(node))) => listed.push(node),
                    Some(Ok(WatchEvent::InitDone)) => self.rebuild(std::mem::take(&mut listed)).await,
                    Some(Ok(WatchEvent::Apply(node))) => self.apply(&node).await,
                    Some(Ok(WatchEvent::Delete(node))) => {
                        let name = node.metadata.name.unwrap_or_default();
                        self.ipam.release(&name);
                        self.retry.remove(&name);
                        self.exhausted.remove(&name);
                        self.written.remove(&name);
                        self.addresses.remove(&name);
                    }
                },
                _ = tick.tick(), if !self.retry.is_empty() => self.retry_pending().await,
            }
        }
    }

    /// A full list: what every Node holds first, so that no block goes to a Node while a later
    /// one in the list still holds it; then the Nodes without a podCIDR.
    async fn rebuild(&mut self, nodes: Vec<Node>) {
        self.ipam = NodeIpam::new(&self.settings);
        self.retry.clear();
        self.written.clear();
        self.addresses.clear();
        let (with, without): (Vec<Node>, Vec<Node>) = nodes
            .into_iter()
            .partition(|n| !k8s::all_pod_cidrs(n).0.is_empty());
        for node in &with {
            self.apply(node).await;
        }
        for node in &without {
            self.apply(node).await;
        }
        info!(
            "NodeIPAM: {} Nodes with podCIDRs, {} assigned now",
            with.len(),
            without.len() - self.retry.len()
        );
    }

    async fn apply(&mut self, node: &Node) {
        let name = node.metadata.name.clone().unwrap_or_default();
        let addresses: Vec<(IpAddr, String)> = node
            .status
            .iter()
            .flat_map(|s| s.addresses.iter().flatten())
            .filter_map(|a| Some((a.address.parse().ok()?, a.type_.clone())))
            .collect();
        if self.addresses.get(&name) != Some(&addresses) {
            for conflict in self.ipam.address_conflicts(&addresses) {
                self.report_conflict(node, &conflict).await;
            }
            self.addresses.insert(name.clone(), addresses);
        }
        let (cidrs, bad) = k8s::all_pod_cidrs(node);
        for text in bad {
            self.report(
                node,
                "InvalidPodCIDR",
                format!("podCIDR {text:?} is not a CIDR"),
            )
            .await;
        }
        if !cidrs.is_empty() {
            self.retry.remove(&name);
            self.written.remove(&name);
            for conflict in self.ipam.observe(&name, &cidrs) {
                self.report_conflict(node, &conflict).await;
            }
            return;
        }
        if self.written.contains(&name) {
            debug!(node = %name, "an event from before its podCIDR was written");
            return;
        }
        if let Err(e) = self.assign(node).await {
            warn!(node = %name, "assigning a podCIDR: {e:#}");
            self.retry.insert(name);
        }
    }

    async fn retry_pending(&mut self) {
        for name in std::mem::take(&mut self.retry) {
            match self.api.get_opt(&name).await {
                Ok(Some(node)) => self.apply(&node).await,
                Ok(None) => self.ipam.release(&name),
                Err(e) => {
                    warn!(node = %name, "reading the Node: {e}");
                    self.retry.insert(name);
                }
            }
        }
    }

    /// Allocates and writes the Node's blocks. The patch carries the resourceVersion the Node
    /// was read at, so that a podCIDR another writer (kube-controller-manager's allocator, a
    /// platform) set meanwhile is never overwritten: a refused write is retried on a fresh read
    /// unless that read has a podCIDR, which the watch then brings to [`NodeIpam::observe`]. The
    /// blocks stay the Node's until then, so a retry writes the same ones.
    async fn assign(&mut self, node: &Node) -> Result<()> {
        let name = node.metadata.name.clone().unwrap_or_default();
        let blocks = match self.ipam.allocate(&name) {
            Ok(blocks) => blocks,
            Err(exhausted) => {
                if self.exhausted.insert(name) {
                    self.report(node, "PodCIDRExhausted", exhausted.to_string())
                        .await;
                }
                anyhow::bail!(exhausted);
            }
        };
        let texts: Vec<String> = blocks.iter().map(ToString::to_string).collect();
        let mut resource_version = node.metadata.resource_version.clone();
        for _ in 0..STALE_WRITES {
            let patch = json!({
                "metadata": {"resourceVersion": resource_version},
                "spec": {"podCIDR": texts[0], "podCIDRs": texts},
            });
            match self
                .api
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    self.exhausted.remove(&name);
                    self.written.insert(name.clone());
                    info!(node = %name, podCIDRs = ?texts, "assigned");
                    return Ok(());
                }
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    info!(node = %name, "the Node changed since it was read: writing its podCIDR on a fresh read");
                    let Some(fresh) = self.api.get_opt(&name).await? else {
                        self.ipam.release(&name);
                        return Ok(());
                    };
                    if !k8s::all_pod_cidrs(&fresh).0.is_empty() {
                        info!(node = %name, "the Node got a podCIDR from another writer");
                        return Ok(());
                    }
                    resource_version = fresh.metadata.resource_version;
                }
                Err(e) => return Err(e.into()),
            }
        }
        anyhow::bail!("{STALE_WRITES} writes refused as stale: the Node changes faster than it can be written")
    }

    async fn report_conflict(&self, node: &Node, conflict: &Conflict) {
        let reason = match conflict {
            Conflict::OutsideClusterCidrs { .. } => "PodCIDROutsideClusterCIDRs",
            Conflict::HeldByNode { .. } => "PodCIDRConflict",
            Conflict::OverlapsServiceCidr { .. } => "PodCIDROverlapsServiceCIDR",
            Conflict::HoldsNodeAddress { .. } => "ClusterCIDROverlapsNodeAddress",
        };
        self.report(node, reason, conflict.to_string()).await;
    }

    async fn report(&self, node: &Node, reason: &str, note: String) {
        let name = node.metadata.name.as_deref().unwrap_or_default();
        warn!(node = name, reason, "{note}");
        let event = Event {
            type_: EventType::Warning,
            reason: reason.into(),
            note: Some(note),
            action: "AllocatePodCIDR".into(),
            secondary: None,
        };
        self.events
            .on_node(name, node.metadata.uid.clone(), &event)
            .await;
    }
}
