//! The Kubernetes NetworkPolicy compiler: NetworkPolicies, Pods and Namespaces in, the entries of
//! IPCACHE, ENDPOINT_POLICY and POLICY out. Plain data, so the agent diffs it against what the
//! maps hold and `sluicectl` prints it.
//!
//! The tables are shaped by how the kernel judges a new connection: the local pod's
//! ENDPOINT_POLICY entry names one policy id per direction (absent or 0: not isolated); IPCACHE
//! turns the peer address into an identity (longest prefix; a miss is WORLD); POLICY is looked up
//! with (policy, peer, proto, port), then with any protocol, then with any peer, then both; a hit
//! allows. So all the policies selecting a pod are folded into that pod's one policy id per
//! direction, and the union of their rules becomes its POLICY entries.
//!
//! Identities are per prefix: every pod address, and every CIDR and except an ipBlock names.
//! Because IPCACHE answers with the longest prefix, the addresses of an ipBlock {cidr C, except
//! X..} are exactly those whose identity's prefix lies inside C and inside no X. A rule with that
//! ipBlock therefore gets one entry per such identity, pod addresses included.

mod allocator;
mod cluster;
mod display;
mod index;
mod parse;
mod parsed;
mod ports;
mod prefix;
mod rules;
mod selector;
#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
    sync::Arc,
};

use crate::k8s::Pod;
use k8s_openapi::api::{core::v1::Namespace, networking::v1::NetworkPolicy};
use sluice_common::{
    EndpointPolicy, Identity, IpKey, PolicyKey, PolicyRule, MAX_RULES, POLICY_PENDING,
};

use super::{ip_key, CidrKey, LocalEndpoint};
pub use allocator::Allocator;
pub(in crate::model) use allocator::Pool;
use cluster::{Cluster, PodEndpoint};
pub use index::{PodIndex, PodKey};
pub(crate) use parse::FieldError;
use parse::ParsedPolicy;
pub use parsed::ParsedPolicies;
pub use ports::port_prefixes;
pub use ports::protocol_name;
pub(in crate::model) use ports::{protocol_number, valid_port};
use rules::{ingress_named_ports, needs_peer_pods, shared_allows};
pub(crate) use selector::Selector;

/// The label the API server puts on every namespace, holding its name.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    pub const BOTH: [Direction; 2] = [Direction::Ingress, Direction::Egress];

    fn index(self) -> usize {
        self as usize
    }

    /// The pipeline stage that applies this direction's rules.
    pub fn stage(self) -> &'static str {
        match self {
            Direction::Ingress => "IngressRule",
            Direction::Egress => "EgressRule",
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        })
    }
}

/// A POLICY (LPM trie) key: `prefix_len` bits of `key` are significant (from
/// `POLICY_KEY_EXACT_BITS`, any port, to 96, one port). `key` comes first so the entries sort
/// by policy id, then peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyLpmKey {
    pub key: PolicyKey,
    pub prefix_len: u32,
}

/// Which rule of which policy a rule id stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleRef {
    /// "namespace/name".
    pub policy: String,
    pub direction: Direction,
    /// Position in `spec.ingress` or `spec.egress`.
    pub index: usize,
}

impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}[{}]", self.policy, self.direction, self.index)
    }
}

/// A policy that cannot be applied as written. It then allows nothing, but still isolates the
/// pods it selects.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("policy {policy}: field {field}: value {value:?}: {reason}")]
pub struct PolicyError {
    /// "namespace/name".
    pub policy: String,
    pub field: String,
    pub value: String,
    pub reason: String,
}

/// The policy maps of one node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyTables {
    /// Every pod address of the cluster (as a /32 or /128), every CIDR and except prefix a
    /// policy names, and this node's own addresses (`identity::HOST`).
    pub ipcache: BTreeMap<CidrKey, Identity>,
    /// This node's pods selected by at least one policy, by address.
    pub endpoint_policy: BTreeMap<IpKey, EndpointPolicy>,
    /// Allow entries of this node's policy ids.
    pub policy: BTreeMap<PolicyLpmKey, PolicyRule>,
    /// What each rule id of `policy` stands for.
    pub rules: BTreeMap<u32, RuleRef>,
    pub errors: Vec<PolicyError>,
}

/// The node a compile is for.
pub struct LocalNode<'a> {
    pub name: &'a str,
    /// The node's own addresses (`identity::HOST`).
    pub host_ips: &'a [IpAddr],
    /// The pod interfaces the CNI wired here. A pod's addresses are taken from these before
    /// the kubelet has written them to its status; an interface whose Pod is not (yet) known
    /// allows nothing (`POLICY_PENDING`).
    pub endpoints: &'a [LocalEndpoint],
}

/// Compiles the cluster's NetworkPolicies for `node`. Numbers come from `alloc`, which must be
/// the same across calls for them to stay stable. Never fails: what cannot be applied is in
/// `errors` and fails closed. Indexes every pod anew: the agent keeps a [`PodIndex`] instead.
pub fn compile<'a>(
    pods: impl IntoIterator<Item = &'a Pod>,
    namespaces: impl IntoIterator<Item = &'a Namespace>,
    policies: impl IntoIterator<Item = &'a NetworkPolicy>,
    node: &LocalNode,
    alloc: &mut Allocator,
) -> PolicyTables {
    let mut index = PodIndex::default();
    let pods = pods
        .into_iter()
        .map(|pod| (pod_key(pod), Some(Arc::new(pod.clone()))));
    index.update(pods, node.endpoints, node.name, alloc);
    let mut parsed = ParsedPolicies::default();
    let tables = compile_indexed(&index, namespaces, policies, &mut parsed, node, alloc);
    index.clear(alloc);
    tables
}

/// A Pod's key in the index.
pub fn pod_key(pod: &Pod) -> PodKey {
    (
        pod.metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        pod.metadata.name.clone().unwrap_or_default(),
    )
}

/// As [`compile`], with the pods from `index`, which must be up to date with `node.endpoints`,
/// and the policies parsed through `cache` (kept between compiles like `index`).
pub fn compile_indexed<'a, 'b>(
    index: &'b PodIndex,
    namespaces: impl IntoIterator<Item = &'a Namespace>,
    policies: impl IntoIterator<Item = &'a NetworkPolicy>,
    cache: &mut ParsedPolicies,
    node: &LocalNode,
    alloc: &mut Allocator,
) -> PolicyTables {
    let mut cluster = Cluster::new(index, namespaces);
    let (parsed, errors) = cache.update(policies);
    let mut tables = PolicyTables {
        errors,
        ..PolicyTables::default()
    };

    cluster.assign_identities(&parsed, node.host_ips, alloc);
    tables.ipcache = cluster.ipcache();

    let selected: Vec<Vec<&PodEndpoint>> = parsed.iter().map(|p| cluster.selected_by(p)).collect();
    let policy_ids = isolate(&parsed, &selected, alloc, &mut tables.endpoint_policy);
    isolate_unknown(&cluster, node.endpoints, &mut tables.endpoint_policy);
    for (policy, pods) in parsed.iter().zip(&selected) {
        if !policy.broken && !pods.is_empty() {
            add_rules(&cluster, policy, pods, &policy_ids, alloc, &mut tables);
        }
    }
    alloc.sweep();
    tables
}

/// Gives every address of a selected local pod one policy id per direction it is isolated in,
/// whether or not any rule allows something there.
fn isolate(
    parsed: &[&ParsedPolicy],
    selected: &[Vec<&PodEndpoint>],
    alloc: &mut Allocator,
    endpoint_policy: &mut BTreeMap<IpKey, EndpointPolicy>,
) -> BTreeMap<(IpKey, Direction), u32> {
    let mut isolated = BTreeSet::new();
    for (policy, pods) in parsed.iter().zip(selected) {
        for direction in Direction::BOTH {
            if policy.isolates[direction.index()] {
                for ep in pods {
                    isolated.extend(ep.ips.iter().map(|&ip| (ip_key(ip), direction)));
                }
            }
        }
    }
    let mut ids = BTreeMap::new();
    for (pod_ip, direction) in isolated {
        // Out of ids (never in practice: 2^32 - 2 of them), the pod allows nothing.
        let id = alloc.policy(pod_ip, direction).unwrap_or(POLICY_PENDING);
        ids.insert((pod_ip, direction), id);
        let entry = endpoint_policy.entry(pod_ip).or_default();
        match direction {
            Direction::Ingress => entry.ingress_policy = id,
            Direction::Egress => entry.egress_policy = id,
        }
    }
    ids
}

/// A pod interface of this node whose Pod the cluster store does not hold (yet), or holds
/// without knowing it is that pod, allows nothing in either direction: it is not isolated less
/// than its policies will say.
fn isolate_unknown(
    cluster: &Cluster,
    endpoints: &[LocalEndpoint],
    endpoint_policy: &mut BTreeMap<IpKey, EndpointPolicy>,
) {
    let known: BTreeSet<IpAddr> = cluster
        .local()
        .flat_map(|ep| ep.ips.iter().copied())
        .collect();
    for net in endpoints.iter().flat_map(|ep| &ep.ips) {
        if !known.contains(&net.ip()) {
            endpoint_policy.insert(
                ip_key(net.ip()),
                EndpointPolicy {
                    ingress_policy: POLICY_PENDING,
                    egress_policy: POLICY_PENDING,
                },
            );
        }
    }
}

/// Isolates pending, in `tables` compiled for the pod interfaces `compiled_for`, every address
/// of an interface in `wired` (wired since) that `compiled_for` did not have: a pod the
/// compile did not see allows nothing until the next compile, as its CNI ADD left it.
pub fn isolate_new(
    tables: &mut PolicyTables,
    compiled_for: &[LocalEndpoint],
    wired: &[LocalEndpoint],
) {
    let known: BTreeSet<IpAddr> = compiled_for
        .iter()
        .flat_map(|ep| ep.ips.iter().map(|n| n.ip()))
        .collect();
    for net in wired.iter().flat_map(|ep| &ep.ips) {
        if !known.contains(&net.ip()) {
            tables.endpoint_policy.insert(
                ip_key(net.ip()),
                EndpointPolicy {
                    ingress_policy: POLICY_PENDING,
                    egress_policy: POLICY_PENDING,
                },
            );
        }
    }
}

/// The allow entries of one healthy policy, under the policy id of every local pod address it
/// selects. Where two rules produce the same entry the first (by policy name, then rule order)
/// keeps it, so counters do not move between rules from one compile to the next.
fn add_rules(
    cluster: &Cluster,
    policy: &ParsedPolicy,
    pods: &[&PodEndpoint],
    policy_ids: &BTreeMap<(IpKey, Direction), u32>,
    alloc: &mut Allocator,
    tables: &mut PolicyTables,
) {
    for direction in Direction::BOTH {
        if !policy.isolates[direction.index()] {
            continue;
        }
        for (index, rule) in policy.rules(direction).iter().enumerate() {
            let Some(rule_id) = alloc.rule(&policy.key, direction, index) else {
                tables.errors.push(PolicyError {
                    policy: policy.key.clone(),
                    field: format!("spec.{direction}[{index}]"),
                    value: String::new(),
                    reason: format!("no rule id left ({} in use on this node)", MAX_RULES - 1),
                });
                continue;
            };
            tables.rules.insert(
                rule_id,
                RuleRef {
                    policy: policy.key.clone(),
                    direction,
                    index,
                },
            );
            let peers = cluster.peers(policy, rule, needs_peer_pods(rule, direction));
            let shared = shared_allows(cluster, rule, direction, &peers);
            for ep in pods {
                let own = match direction {
                    Direction::Ingress => ingress_named_ports(rule, ep, &peers),
                    Direction::Egress => Vec::new(),
                };
                for ip in ep.ips {
                    let Some(&id) = policy_ids.get(&(ip_key(*ip), direction)) else {
                        continue;
                    };
                    for allow in shared.iter().chain(&own) {
                        tables
                            .policy
                            .entry(allow.key(id))
                            .or_insert(PolicyRule { rule: rule_id });
                    }
                }
            }
        }
    }
}
