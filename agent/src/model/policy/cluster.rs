//! The cluster as policy sees it: the pods that have addresses of their own, the namespaces'
//! labels, the identity of every prefix, and which of them a rule's peers name.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use k8s_openapi::api::core::v1::Namespace;

use crate::{
    k8s::{Pod, PodStatus},
    model::CidrKey,
};
use sluice_common::{identity, Identity};

use super::{
    index::{IndexedPod, PodIndex},
    parse::{Namespaces, ParsedPolicy, Peer, Rule},
    ports::named_port,
    prefix::Prefix,
    Allocator, NAMESPACE_NAME_LABEL,
};

/// A pod that can be selected or be a peer: not host-network (it has the node's address), not
/// finished, and with at least one address.
pub(super) struct PodEndpoint<'a> {
    pub namespace: &'a str,
    labels: &'a BTreeMap<String, String>,
    pub local: bool,
    pub ips: &'a [IpAddr],
    pod: &'a Pod,
}

static NO_LABELS: BTreeMap<String, String> = BTreeMap::new();

impl<'a> PodEndpoint<'a> {
    fn new(indexed: &'a IndexedPod) -> Option<PodEndpoint<'a>> {
        if indexed.ips.is_empty() {
            return None;
        }
        let pod = indexed.pod.as_ref();
        Some(PodEndpoint {
            namespace: pod.metadata.namespace.as_deref().unwrap_or("default"),
            labels: pod.metadata.labels.as_ref().unwrap_or(&NO_LABELS),
            local: indexed.local,
            ips: &indexed.ips,
            pod,
        })
    }

    pub(super) fn port(&self, name: &str, proto: u8) -> Option<u16> {
        named_port(self.pod, name, proto)
    }
}

/// The addresses policy knows `pod` by: none for a host-network pod (it has the node's) or a
/// finished one (its address goes back to IPAM and may already be another pod's); `wired`, the
/// addresses this node's CNI gave it, when it is one of this node's; else its status's.
pub(super) fn endpoint_ips(pod: &Pod, wired: &[IpAddr]) -> Vec<IpAddr> {
    if pod.spec.as_ref().and_then(|s| s.host_network) == Some(true) {
        return Vec::new();
    }
    let status = pod.status.as_ref();
    if matches!(
        status.and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    ) {
        return Vec::new();
    }
    let mut ips = wired.to_vec();
    if ips.is_empty() {
        ips.extend(status_ips(status));
    }
    ips.sort();
    ips.dedup();
    ips
}

/// `status.podIPs`, or the older `status.podIP`.
fn status_ips(status: Option<&PodStatus>) -> Vec<IpAddr> {
    let Some(status) = status else {
        return Vec::new();
    };
    let ips: Vec<IpAddr> = status
        .pod_ips
        .iter()
        .flatten()
        .filter_map(|p| p.ip.parse().ok())
        .collect();
    if !ips.is_empty() {
        return ips;
    }
    status
        .pod_ip
        .as_deref()
        .and_then(|ip| ip.parse().ok())
        .into_iter()
        .collect()
}

pub(super) struct Cluster<'a> {
    /// In namespace and name order, so every compile walks them in the same order.
    pub endpoints: Vec<PodEndpoint<'a>>,
    /// Which of `endpoints` are this node's: the only ones a policy can select here, a few
    /// among the cluster's thousands.
    local: Vec<usize>,
    namespace_labels: BTreeMap<String, BTreeMap<String, String>>,
    /// The pod addresses' identities.
    index: &'a PodIndex,
    /// The other prefixes': the host's addresses (HOST, over a pod's) and the CIDRs and
    /// excepts of healthy policies.
    pub named: BTreeMap<Prefix, u32>,
}

impl<'a> Cluster<'a> {
    pub(super) fn new<'n>(
        index: &'a PodIndex,
        namespaces: impl IntoIterator<Item = &'n Namespace>,
    ) -> Cluster<'a> {
        let endpoints: Vec<PodEndpoint> =
            index.pods.values().filter_map(PodEndpoint::new).collect();

        // The API server guarantees the name label; a pod's namespace without an object (yet)
        // still has that one.
        let mut namespace_labels = BTreeMap::new();
        for ns in namespaces {
            let Some(name) = ns.metadata.name.clone() else {
                continue;
            };
            let mut labels = ns.metadata.labels.clone().unwrap_or_default();
            labels.insert(NAMESPACE_NAME_LABEL.into(), name.clone());
            namespace_labels.insert(name, labels);
        }
        for ep in &endpoints {
            if !namespace_labels.contains_key(ep.namespace) {
                namespace_labels.insert(
                    ep.namespace.to_string(),
                    BTreeMap::from([(NAMESPACE_NAME_LABEL.to_string(), ep.namespace.to_string())]),
                );
            }
        }
        let local = (0..endpoints.len())
            .filter(|&e| endpoints[e].local)
            .collect();
        Cluster {
            endpoints,
            local,
            namespace_labels,
            index,
            named: BTreeMap::new(),
        }
    }

    /// The host's addresses are HOST; every prefix a healthy policy names gets an identity of
    /// its own (the pod addresses hold theirs in the index; a CIDR that is one shares it).
    pub(super) fn assign_identities(
        &mut self,
        parsed: &[&ParsedPolicy],
        host_ips: &[IpAddr],
        alloc: &mut Allocator,
    ) {
        let mut ids: BTreeMap<Prefix, u32> = host_ips
            .iter()
            .map(|&ip| (Prefix::host(ip), identity::HOST))
            .collect();
        let mut named: BTreeSet<Prefix> = BTreeSet::new();
        for policy in parsed.iter().filter(|p| !p.broken) {
            for rule in policy.rules.iter().flatten() {
                for peer in rule.peers.iter().flatten() {
                    if let Peer::Block(block) = peer {
                        named.insert(block.cidr);
                        named.extend(block.except.iter().copied());
                    }
                }
            }
        }
        for prefix in named {
            if ids.contains_key(&prefix) {
                continue;
            }
            if let Some(id) = alloc.identity(prefix.cidr_key()) {
                ids.insert(prefix, id);
            }
        }
        self.named = ids;
    }

    /// Every prefix with its identity, as IPCACHE holds them.
    pub(super) fn ipcache(&self) -> BTreeMap<CidrKey, Identity> {
        let mut out = self.index.ipcache.clone();
        out.extend(
            self.named
                .iter()
                .map(|(prefix, &id)| (prefix.cidr_key(), Identity { id })),
        );
        out
    }

    pub(super) fn identity_of(&self, ip: IpAddr) -> Option<u32> {
        let prefix = Prefix::host(ip);
        self.named
            .get(&prefix)
            .copied()
            .or_else(|| self.index.identity(&prefix))
    }

    /// This node's pods.
    pub(super) fn local(&self) -> impl Iterator<Item = &PodEndpoint<'a>> {
        self.local.iter().map(|&e| &self.endpoints[e])
    }

    /// This node's pods the policy selects (a broken podSelector: all of its namespace).
    pub(super) fn selected_by(&self, policy: &ParsedPolicy) -> Vec<&PodEndpoint<'a>> {
        self.local()
            .filter(|ep| ep.namespace == policy.namespace)
            .filter(|ep| {
                policy
                    .selector
                    .as_ref()
                    .is_none_or(|sel| sel.matches(ep.labels))
            })
            .collect()
    }

    /// `want_pods`: also list the pod addresses among the peers (for named ports resolved
    /// against the destination pod).
    pub(super) fn peers(&self, policy: &ParsedPolicy, rule: &Rule, want_pods: bool) -> Peers {
        let mut out = Peers {
            any: rule.peers.is_none(),
            ids: BTreeSet::new(),
            pods: Vec::new(),
        };
        let list = rule.peers.as_deref().unwrap_or_default();
        for (e, ep) in self.endpoints.iter().enumerate() {
            for &ip in ep.ips {
                let by_selector = list.iter().any(|peer| match peer {
                    Peer::Pods { namespaces, pods } => {
                        pods.matches(ep.labels) && self.in_namespaces(namespaces, policy, ep)
                    }
                    Peer::Block(_) => false,
                });
                if by_selector {
                    out.ids.extend(self.identity_of(ip));
                }
                if want_pods
                    && (out.any
                        || by_selector
                        || list.iter().any(|peer| match peer {
                            Peer::Block(block) => block.admits(&Prefix::host(ip)),
                            Peer::Pods { .. } => false,
                        }))
                {
                    out.pods.push((e, ip));
                }
            }
        }
        // Every identity whose prefix lies inside the block and outside its excepts: with
        // IPCACHE's longest-prefix answer, that is exactly the block's addresses.
        for peer in list {
            if let Peer::Block(block) = peer {
                let named = self.named.range(block.cidr.range()).map(|(p, &id)| (p, id));
                let pods = self
                    .index
                    .identities_in(block.cidr.range())
                    .filter(|(prefix, _)| !self.named.contains_key(prefix));
                out.ids.extend(
                    named
                        .chain(pods)
                        .filter(|(prefix, _)| block.admits(prefix))
                        .map(|(_, id)| id),
                );
            }
        }
        out
    }

    fn in_namespaces(
        &self,
        namespaces: &Namespaces,
        policy: &ParsedPolicy,
        ep: &PodEndpoint,
    ) -> bool {
        match namespaces {
            Namespaces::Own => ep.namespace == policy.namespace,
            Namespaces::Matching(sel) => sel.matches(
                self.namespace_labels
                    .get(ep.namespace)
                    .unwrap_or(&NO_LABELS),
            ),
        }
    }
}

/// The peers of one rule.
pub(super) struct Peers {
    /// No `from`/`to` (or an empty one): every peer, `identity::ANY`.
    pub any: bool,
    pub ids: BTreeSet<u32>,
    /// Pod addresses among the peers, by endpoint index (only when asked for).
    pub pods: Vec<(usize, IpAddr)>,
}

impl Peers {
    pub(super) fn identities(&self) -> Vec<u32> {
        if self.any {
            vec![identity::ANY]
        } else {
            self.ids.iter().copied().collect()
        }
    }
}
