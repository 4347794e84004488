//! Sluice's TC programs. This file holds only the maps and the entry points; the stages live in
//! `pipeline/`, one file per stage, and `pipeline/mod.rs` is the one place that orders them.
#![no_std]
#![no_main]

mod pipeline;

use aya_ebpf::{
    macros::{cgroup_sock_addr, classifier, map},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
    programs::{SockAddrContext, TcContext},
};
use sluice_common::{
    AffinityEntry, AffinityKey, BackendKey, CtEntry, CtKey, DropReason, Endpoint, EndpointPolicy,
    ExternalIp, FlowKey, FragKey, FragPorts, Identity, IpKey, NatEntry, NatTarget, NodeConfig,
    PolicyKey, PolicyRule, RemoteNode, RuleStats, Service, ServiceKey, SpoofGuardEntry,
    SpoofGuardKey, Stage, MAX_AFFINITY, MAX_BACKENDS, MAX_CONNTRACK, MAX_ENDPOINTS,
    MAX_EXTERNAL_IPS, MAX_FRAGMENTS, MAX_IPCACHE, MAX_POLICY_ENTRIES, MAX_REMOTE_CIDRS, MAX_RULES,
    MAX_SERVICES, MAX_SERVICE_NAT, MAX_TUNNEL_REPLIES, POLICY_EVENTS_BYTES,
};

// Map statics carry the names of `sluice_common::map_names`; user space pins and opens them by
// those names.

/// L3Forwarding: local pod address → pod port.
#[map]
static ENDPOINTS: HashMap<IpKey, Endpoint> = HashMap::with_max_entries(MAX_ENDPOINTS, 0);

/// SpoofGuard: (pod port, address) → the pod's MAC.
#[map]
static SPOOF_GUARD: HashMap<SpoofGuardKey, SpoofGuardEntry> =
    HashMap::with_max_entries(MAX_ENDPOINTS, 0);

/// L3Forwarding: other nodes' pod CIDRs (longest prefix match) → the node to tunnel to.
#[map]
static REMOTE_NODES: LpmTrie<IpKey, RemoteNode> = LpmTrie::with_max_entries(MAX_REMOTE_CIDRS, 0);

/// L3Forwarding: replies of this node's pods to connections another node's own address opened
/// through the tunnel (reply direction) → that node.
#[map]
static TUNNEL_REPLIES: LruHashMap<FlowKey, RemoteNode> =
    LruHashMap::with_max_entries(MAX_TUNNEL_REPLIES, 0);

/// Peer identities: every pod address of the cluster and the CIDRs policies name (LPM).
#[map]
static IPCACHE: LpmTrie<IpKey, Identity> = LpmTrie::with_max_entries(MAX_IPCACHE, 0);

/// This node's pods that a NetworkPolicy isolates: their ingress and egress policy ids.
#[map]
static ENDPOINT_POLICY: HashMap<IpKey, EndpointPolicy> =
    HashMap::with_max_entries(MAX_ENDPOINTS, 0);

/// EgressRule / IngressRule: (policy id, peer identity, protocol, port prefix) → allowing rule.
#[map]
static POLICY: LpmTrie<PolicyKey, PolicyRule> = LpmTrie::with_max_entries(MAX_POLICY_ENTRIES, 0);

/// EgressRule / IngressRule entries without a port range, hashed (see `POLICY_ANY_PORT`).
#[map]
static POLICY_EXACT: HashMap<PolicyKey, PolicyRule> =
    HashMap::with_max_entries(MAX_POLICY_ENTRIES, 0);

/// ConntrackState: connections of isolated pods, both directions under one canonical key.
#[map]
static CONNTRACK: LruHashMap<CtKey, CtEntry> = LruHashMap::with_max_entries(MAX_CONNTRACK, 0);

/// The format of every map (by its index in `map_names::ALL`), written by the agent that created
/// the pins, so the next one knows what it adopts. Never read by the programs.
#[map]
static LAYOUT: Array<u32> = Array::with_max_entries(32, 0);

/// Classifier: the ports of IPv4 datagrams whose first fragment went by, for their later
/// fragments.
#[map]
static FRAGMENTS: LruHashMap<FragKey, FragPorts> = LruHashMap::with_max_entries(MAX_FRAGMENTS, 0);

/// ServiceLB: Service frontends (address, port, protocol, scope) → their backend set.
#[map]
static SERVICES: HashMap<ServiceKey, Service> = HashMap::with_max_entries(MAX_SERVICES, 0);

/// ServiceLB: (backend set, index) → endpoint.
#[map]
static BACKENDS: HashMap<BackendKey, NatTarget> = HashMap::with_max_entries(MAX_BACKENDS, 0);

/// EndpointDNAT: each direction of a load-balanced connection → the tuple it leaves with.
#[map]
static SERVICE_NAT: LruHashMap<FlowKey, NatEntry> =
    LruHashMap::with_max_entries(MAX_SERVICE_NAT, 0);

/// SessionAffinity: (backend set, client) → the endpoint it used last.
#[map]
static AFFINITY: LruHashMap<AffinityKey, AffinityEntry> =
    LruHashMap::with_max_entries(MAX_AFFINITY, 0);

/// ARPResponder on the uplink: the LoadBalancer IPs this node answers for.
#[map]
static EXTERNAL_IPS: HashMap<IpKey, ExternalIp> = HashMap::with_max_entries(MAX_EXTERNAL_IPS, 0);

/// EgressMetric / IngressMetric: packets and bytes of the connections each rule allowed.
#[map]
static RULE_STATS: PerCpuArray<RuleStats> = PerCpuArray::with_max_entries(MAX_RULES, 0);

/// Policy verdicts on new connections and drops, for `sluicectl events`.
#[map]
static POLICY_EVENTS: RingBuf = RingBuf::with_byte_size(POLICY_EVENTS_BYTES, 0);

/// Slot 0: the node's gateway and tunnel.
#[map]
static NODE_CONFIG: Array<NodeConfig> = Array::with_max_entries(1, 0);

/// The Classifier's output for the packet being processed (one slot per CPU).
#[map]
static META: PerCpuArray<pipeline::IpMeta> = PerCpuArray::with_max_entries(1, 0);

/// ServiceLB's keys and entries for the packet being processed (one slot per CPU).
#[map]
static NAT_SCRATCH: PerCpuArray<pipeline::NatScratch> = PerCpuArray::with_max_entries(1, 0);

/// The reject answer being built (one slot per CPU).
#[map]
static REJECT_SCRATCH: PerCpuArray<pipeline::RejectScratch> = PerCpuArray::with_max_entries(1, 0);

/// Packets that passed each stage, per CPU, indexed by `Stage`.
#[map]
static STAGE_PACKETS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Stage::COUNT, 0);

/// Packets dropped, per CPU, indexed by `DropReason`.
#[map]
static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DropReason::COUNT, 0);

/// tc ingress on the host side of a pod's veth: everything the pod sends.
#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    pipeline::verdict(pipeline::from_pod(&ctx))
}

/// tc ingress on `sluice-gw0`'s datapath peer: everything the node sends towards pods.
#[classifier]
pub fn from_gateway(ctx: TcContext) -> i32 {
    pipeline::verdict(pipeline::from_gateway(&ctx))
}

/// tc ingress on the tunnel device: packets other nodes encapsulated for this node's pods.
#[classifier]
pub fn from_tunnel(ctx: TcContext) -> i32 {
    pipeline::verdict(pipeline::from_tunnel(&ctx))
}

/// tc ingress on the node's uplink: Services reached from outside, ARP for owned LoadBalancer
/// IPs; everything else goes on to the node untouched.
#[classifier]
pub fn from_uplink(ctx: TcContext) -> i32 {
    pipeline::verdict(pipeline::from_uplink(&ctx))
}

/// cgroup connect4 on the node's cgroup: the node's own sockets connecting to a NodePort on one
/// of its addresses (loopback traffic, which no TC program sees).
#[cgroup_sock_addr(connect4)]
pub fn sock_connect4(ctx: SockAddrContext) -> i32 {
    pipeline::connect4(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual BSD/GPL\0";
