//! Types shared by the kernel programs and user space: map names, map keys and values, pipeline
//! stage ids and drop reasons. Every struct is `#[repr(C)]` with explicit padding, and its size is
//! asserted at compile time so both sides agree on the layout.
#![no_std]

/// Names of the BPF maps. The kernel side declares statics with exactly these names; user space
/// opens and pins them through these constants only.
pub mod map_names {
    pub const ENDPOINTS: &str = "ENDPOINTS";
    pub const SPOOF_GUARD: &str = "SPOOF_GUARD";
    pub const REMOTE_NODES: &str = "REMOTE_NODES";
    pub const IPCACHE: &str = "IPCACHE";
    pub const ENDPOINT_POLICY: &str = "ENDPOINT_POLICY";
    pub const POLICY: &str = "POLICY";
    pub const POLICY_EXACT: &str = "POLICY_EXACT";
    pub const CONNTRACK: &str = "CONNTRACK";
    pub const SERVICES: &str = "SERVICES";
    pub const BACKENDS: &str = "BACKENDS";
    pub const SERVICE_NAT: &str = "SERVICE_NAT";
    pub const AFFINITY: &str = "AFFINITY";
    pub const EXTERNAL_IPS: &str = "EXTERNAL_IPS";
    pub const RULE_STATS: &str = "RULE_STATS";
    pub const POLICY_EVENTS: &str = "POLICY_EVENTS";
    pub const NODE_CONFIG: &str = "NODE_CONFIG";
    pub const STAGE_PACKETS: &str = "STAGE_PACKETS";
    pub const DROPS: &str = "DROPS";
    pub const FRAGMENTS: &str = "FRAGMENTS";
    pub const LAYOUT: &str = "LAYOUT";
    pub const TUNNEL_REPLIES: &str = "TUNNEL_REPLIES";

    /// The maps whose size the agent config may set (`bpfMapSizes`), with the size the object
    /// declares. The per-pod maps (ENDPOINTS, SPOOF_GUARD, ENDPOINT_POLICY) are sized for any
    /// pod CIDR and RULE_STATS for every rule id, so they are not among them.
    pub const RESIZABLE: [(&str, u32); 10] = [
        (REMOTE_NODES, super::MAX_REMOTE_CIDRS),
        (IPCACHE, super::MAX_IPCACHE),
        (POLICY, super::MAX_POLICY_ENTRIES),
        (POLICY_EXACT, super::MAX_POLICY_ENTRIES),
        (CONNTRACK, super::MAX_CONNTRACK),
        (SERVICES, super::MAX_SERVICES),
        (BACKENDS, super::MAX_BACKENDS),
        (SERVICE_NAT, super::MAX_SERVICE_NAT),
        (AFFINITY, super::MAX_AFFINITY),
        (EXTERNAL_IPS, super::MAX_EXTERNAL_IPS),
    ];

    /// Format numbers of the maps whose keys or values changed meaning at an unchanged size; a
    /// map not listed is at format 1. The agent records each map's format in LAYOUT (by its
    /// index in `ALL`) and replaces a pin of another format rather than adopt it.
    pub const FORMATS: [(&str, u32); 0] = [];

    /// Every map, in the order LAYOUT indexes them (append only).
    pub const ALL: [&str; 21] = [
        ENDPOINTS,
        SPOOF_GUARD,
        REMOTE_NODES,
        IPCACHE,
        ENDPOINT_POLICY,
        POLICY,
        POLICY_EXACT,
        CONNTRACK,
        SERVICES,
        BACKENDS,
        SERVICE_NAT,
        AFFINITY,
        EXTERNAL_IPS,
        RULE_STATS,
        POLICY_EVENTS,
        NODE_CONFIG,
        STAGE_PACKETS,
        DROPS,
        FRAGMENTS,
        LAYOUT,
        TUNNEL_REPLIES,
    ];
}

/// Names of the TC programs (the entry points of the eBPF object).
pub mod program_names {
    /// tc ingress on the host side of a pod's veth: packets sent by the pod.
    pub const FROM_POD: &str = "from_pod";
    /// tc ingress on the datapath side of the gateway veth: packets the node sends to pods.
    pub const FROM_GATEWAY: &str = "from_gateway";
    /// tc ingress on the tunnel device: decapsulated packets from other nodes.
    pub const FROM_TUNNEL: &str = "from_tunnel";
    /// tc ingress on the node's uplink: NodePort, LoadBalancer and externalIPs from outside,
    /// ARP for the LoadBalancer IPs this node owns, and replies to load-balanced connections.
    pub const FROM_UPLINK: &str = "from_uplink";
    /// cgroup connect4 on the node's cgroup: the node's sockets connecting to its own NodePorts.
    pub const SOCK_CONNECT4: &str = "sock_connect4";
}

/// Capacity of the per-endpoint maps (ENDPOINTS, SPOOF_GUARD).
pub const MAX_ENDPOINTS: u32 = 65_536;
/// Capacity of REMOTE_NODES (pod CIDRs of other nodes, several per node when dual-stack).
pub const MAX_REMOTE_CIDRS: u32 = 16_384;
/// The VXLAN/Geneve network identifier Sluice puts on its tunnel packets.
pub const TUNNEL_VNI: u32 = 1;
/// Bits of an `IpKey` before the address (family byte and padding): an LPM prefix for a CIDR of
/// length N is `IP_KEY_PREFIX_BITS + N`.
pub const IP_KEY_PREFIX_BITS: u32 = 32;

pub const FAMILY_IPV4: u8 = 4;
pub const FAMILY_IPV6: u8 = 6;

/// An IPv4 or IPv6 address as a map key.
///
/// Layout (20 bytes): family (4 or 6), 3 bytes padding, 16 address bytes. An IPv4 address uses
/// the first 4 address bytes; the other 12 are zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpKey {
    pub family: u8,
    pub _pad: [u8; 3],
    pub addr: [u8; 16],
}

impl IpKey {
    /// No address (family 0): what a key holds before it is filled.
    pub const UNSPECIFIED: IpKey = IpKey {
        family: 0,
        _pad: [0; 3],
        addr: [0; 16],
    };

    #[inline(always)]
    pub const fn v4(octets: [u8; 4]) -> Self {
        let mut addr = [0u8; 16];
        addr[0] = octets[0];
        addr[1] = octets[1];
        addr[2] = octets[2];
        addr[3] = octets[3];
        Self {
            family: FAMILY_IPV4,
            _pad: [0; 3],
            addr,
        }
    }

    #[inline(always)]
    pub const fn v6(addr: [u8; 16]) -> Self {
        Self {
            family: FAMILY_IPV6,
            _pad: [0; 3],
            addr,
        }
    }
}

/// L3Forwarding: where a local pod's address is delivered.
///
/// Layout (16 bytes): host-side veth ifindex, pod MAC, 2 bytes padding, flags (reserved, 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub ifindex: u32,
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
    pub flags: u32,
}

/// SpoofGuard key: a pod port (host-side veth ifindex) and one address the pod owns.
///
/// Layout (24 bytes): ifindex, then the address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpoofGuardKey {
    pub ifindex: u32,
    pub addr: IpKey,
}

/// SpoofGuard value: the MAC the pod must send from with that address.
///
/// Layout (8 bytes): MAC, 2 bytes padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpoofGuardEntry {
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}

/// The node's datapath parameters, slot 0 of NODE_CONFIG.
///
/// Layout (32 bytes): gateway ifindex (`sluice-gw0`, where packets for the node are delivered),
/// tunnel ifindex (0 in noEncap mode: other nodes' pods are reached through the node's routes),
/// gateway MAC (the MAC pods talk to), 2 bytes padding, the gateway's IPv4 address (the source
/// of SNATed Service traffic), 4 bytes padding, the cookie of the node's network namespace (the
/// sockets `sock_connect4` balances; 0: none).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NodeConfig {
    pub gateway_ifindex: u32,
    pub tunnel_ifindex: u32,
    pub gateway_mac: [u8; 6],
    pub _pad: [u8; 2],
    pub gateway_ipv4: [u8; 4],
    pub _pad2: u32,
    pub host_netns_cookie: u64,
}

/// REMOTE_NODES value: the node that owns a pod CIDR, as the tunnel destination.
///
/// Layout (20 bytes): the node's address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RemoteNode {
    pub node_ip: IpKey,
}

/// Capacity of IPCACHE (pods of the cluster and the CIDRs policies name).
pub const MAX_IPCACHE: u32 = 262_144;
/// Capacity of POLICY (allow entries of this node's pods).
pub const MAX_POLICY_ENTRIES: u32 = 262_144;
/// Capacity of CONNTRACK (an LRU: the least recently used entries make room).
pub const MAX_CONNTRACK: u32 = 262_144;
/// Capacity of TUNNEL_REPLIES (an LRU: connections other nodes' own addresses opened to this
/// node's pods through the tunnel).
pub const MAX_TUNNEL_REPLIES: u32 = 16_384;
/// Capacity of RULE_STATS (rule ids are below this).
pub const MAX_RULES: u32 = 65_536;

/// Peer identities. IPCACHE maps an address (longest prefix) to one; POLICY keys name one.
pub mod identity {
    /// Wildcard in a POLICY key: any peer.
    pub const ANY: u32 = 0;
    /// This node itself (its gateway and node addresses): always allowed in (kubelet probes).
    pub const HOST: u32 = 1;
    /// An address IPCACHE does not know.
    pub const WORLD: u32 = 2;
    /// Pods and policy CIDRs get identities from here up.
    pub const FIRST_ALLOCATED: u32 = 256;
}

/// The policy id of a local pod whose Pod object (labels, namespace) the agent does not know yet,
/// or whose own policy id could not be given: no POLICY entry ever names it, so it allows
/// nothing. Written at CNI ADD, before the pod's interface comes up, so a new pod is isolated
/// from its first packet until its real policies replace it. The policy id pool ends below it.
pub const POLICY_PENDING: u32 = u32::MAX;

/// Wildcard protocol in a POLICY key (a rule without ports: every protocol, every port).
pub const PROTO_ANY: u8 = 0;

/// ENDPOINT_POLICY value for a local pod (key: its `IpKey`). A policy id of 0 means the pod is
/// not isolated in that direction. A pod without an entry is isolated in neither and its
/// traffic skips conntrack and policy entirely. Under Kubernetes a new pod's entry is written
/// at CNI ADD, `POLICY_PENDING` both ways, and stays until the compiler knows its policies.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct EndpointPolicy {
    pub ingress_policy: u32,
    pub egress_policy: u32,
}

/// POLICY (LPM) key. Layout (12 bytes): policy id, peer identity (or `identity::ANY`), IP
/// protocol (or `PROTO_ANY`), 1 byte padding, destination port in network byte order. The
/// first `POLICY_KEY_EXACT_BITS` are always matched exactly; the port adds 0 bits (any port)
/// to 16 (one port), a prefix in between covering a port range.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    pub policy: u32,
    pub peer: u32,
    pub proto: u8,
    pub _pad: u8,
    pub port: [u8; 2],
}

pub const POLICY_KEY_EXACT_BITS: u32 = 80;

/// POLICY_EXACT holds the entries whose key needs no prefix match — one port, any port of a
/// protocol (`_pad` = `POLICY_ANY_PORT`, port 0), any protocol — so that their lookup is a hash
/// lookup whose cost does not grow with the number of rules; POLICY (LPM) keeps port ranges.
pub const POLICY_ANY_PORT: u8 = 1;

/// POLICY value: the rule that allows (for RULE_STATS and events).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyRule {
    pub rule: u32,
}

/// IPCACHE value.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub id: u32,
}

/// RULE_STATS value (per CPU): traffic of the connections a rule allowed.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RuleStats {
    pub packets: u64,
    pub bytes: u64,
}

/// CONNTRACK key: a connection, with the endpoints in canonical order (the lower address, then
/// port, first) so both directions find the same entry. Layout (48 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtKey {
    pub lo: IpKey,
    pub hi: IpKey,
    pub lo_port: u16,
    pub hi_port: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// FRAGMENTS key: an IPv4 datagram in fragments, as each of its fragments carries it: addresses,
/// IP identification (network order), protocol. Layout (12 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FragKey {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub id: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// FRAGMENTS value: the ports the datagram's first fragment carried, which its later fragments
/// are classified with.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FragPorts {
    pub src_port: u16,
    pub dst_port: u16,
}

/// Capacity of FRAGMENTS (LRU: datagrams whose later fragments may still come).
pub const MAX_FRAGMENTS: u32 = 8_192;

/// CONNTRACK value. Layout (24 bytes): last packet (ns, `bpf_ktime_get_ns`), state flags
/// (`ct_flags`), the rules that allowed it out and in (0: not judged in that direction).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtEntry {
    pub last_seen: u64,
    pub flags: u32,
    pub egress_rule: u32,
    pub ingress_rule: u32,
    pub _pad: u32,
}

/// Capacity of SERVICES (frontends: address, port, protocol, scope) and BACKENDS.
pub const MAX_SERVICES: u32 = 131_072;
pub const MAX_BACKENDS: u32 = 262_144;
/// Capacity of SERVICE_NAT (two entries per load-balanced connection).
pub const MAX_SERVICE_NAT: u32 = 262_144;
/// Capacity of AFFINITY (one entry per client and Service with ClientIP affinity).
pub const MAX_AFFINITY: u32 = 65_536;
/// Capacity of EXTERNAL_IPS (LoadBalancer IPs this node answers ARP for).
pub const MAX_EXTERNAL_IPS: u32 = 4_096;

/// Where a frontend is reached from: the pods and the node (ClusterIP, and NodePort /
/// LoadBalancer / externalIPs used from inside) or the node's uplink (NodePort, LoadBalancer and
/// externalIPs from outside). The two may load-balance over different endpoints
/// (internalTrafficPolicy / externalTrafficPolicy Local).
pub mod scope {
    pub const INTERNAL: u8 = 0;
    pub const EXTERNAL: u8 = 1;
}

/// Flags of a Service frontend.
pub mod service_flags {
    /// The client's source is rewritten to the node's gateway address, so replies come back
    /// through this node (externalTrafficPolicy Cluster, reached from outside).
    pub const SNAT: u32 = 1 << 0;
    /// sessionAffinity ClientIP: a client keeps its endpoint for `affinity_timeout` seconds.
    pub const AFFINITY: u32 = 1 << 1;
    /// Only this node's endpoints serve the frontend (internal or external traffic policy
    /// Local), it has none, and other nodes have some: packets are dropped, as kube-proxy drops
    /// them ("has no local endpoints"). An empty frontend without it rejects (no endpoints at
    /// all: TCP reset, ICMP unreachable).
    pub const NO_LOCAL_ENDPOINTS: u32 = 1 << 2;
}

/// Flags of a SERVICE_NAT entry.
pub mod nat_flags {
    /// A reply going back to a client outside the cluster: it leaves through the node's FIB
    /// (its source is now a node address, which the node's own stack would refuse as martian).
    pub const TO_EXTERNAL: u32 = 1 << 0;
    /// The entry undoes a DNAT (a reply); without it the entry is a connection's DNAT.
    pub const REVERSE: u32 = 1 << 1;
    /// TCP: an ACK went this way (the handshake is done): the established timeout applies.
    pub const ESTABLISHED: u32 = 1 << 2;
    /// TCP: a FIN or RST went this way: the closing timeout applies.
    pub const CLOSING: u32 = 1 << 3;
    /// The flags are the low byte; the upper 24 bits hold when a packet last used the entry,
    /// in ticks of 2^30 ns (about a second, `bpf_ktime_get_ns` >> 30) modulo 2^24 (about 208
    /// days). Packed so the entry keeps its 48-byte layout, which pinned maps of earlier agents
    /// share.
    pub const MASK: u32 = 0xff;
    pub const SEEN_SHIFT: u32 = 8;
}

/// The source address a pod sees when it reaches itself through a Service (hairpin): without a
/// rewrite its reply would never leave its namespace. Antrea uses the same link-local address.
pub const HAIRPIN_IPV4: [u8; 4] = [169, 254, 0, 253];

/// EXTERNAL_IPS value: the MAC this node answers ARP with for a LoadBalancer IP it owns (its
/// uplink's). Layout (8 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExternalIp {
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}

/// SERVICES key: a Service frontend. Layout (24 bytes): address, port (host order), IP
/// protocol, scope.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub addr: IpKey,
    pub port: u16,
    pub proto: u8,
    pub scope: u8,
}

/// SERVICES value: the frontend's backend set (indices 0..count in BACKENDS), `service_flags`
/// and the affinity timeout in seconds. Layout (16 bytes). `count` 0 means the Service has no
/// endpoints: new connections are rejected.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Service {
    pub backend_set: u32,
    pub count: u32,
    pub flags: u32,
    pub affinity_timeout: u32,
}

/// BACKENDS key. Layout (8 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendKey {
    pub set: u32,
    pub index: u32,
}

/// BACKENDS value: an endpoint's address and port (host order). Layout (24 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NatTarget {
    pub addr: IpKey,
    pub port: u16,
    pub _pad: u16,
}

/// SERVICE_NAT key: one direction of a connection as the packet carries it. Layout (48 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub src: IpKey,
    pub dst: IpKey,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

impl FlowKey {
    pub const fn new(src: IpKey, dst: IpKey, src_port: u16, dst_port: u16, proto: u8) -> Self {
        Self {
            src,
            dst,
            src_port,
            dst_port,
            proto,
            _pad: [0; 3],
        }
    }
}

/// SERVICE_NAT value: the tuple a packet of that direction leaves with, and `nat_flags`. The
/// DNAT entry (client → frontend) holds client (or SNAT address) → endpoint; the reverse entry
/// (endpoint → client or SNAT address) holds frontend → client. Layout (48 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NatEntry {
    pub src: IpKey,
    pub dst: IpKey,
    pub src_port: u16,
    pub dst_port: u16,
    pub flags: u32,
}

/// AFFINITY key: a backend set and a client address. Layout (24 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AffinityKey {
    pub backend_set: u32,
    pub client: IpKey,
}

/// AFFINITY value: the endpoint the client was last sent to, its index in the set (an entry
/// whose index now holds another endpoint is stale), and when (ns since boot).
/// Layout (40 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AffinityEntry {
    pub endpoint: NatTarget,
    pub index: u32,
    pub _pad: u32,
    pub last_used: u64,
}

/// A policy verdict on a new connection, sent to user space through the POLICY_EVENTS ring
/// buffer (never per packet: only new connections and drops). Layout (64 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyEvent {
    pub src: IpKey,
    pub dst: IpKey,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    /// `DIRECTION_*`.
    pub direction: u8,
    /// `VERDICT_*`.
    pub verdict: u8,
    pub _pad: u8,
    /// The allowing rule, 0 for a drop.
    pub rule: u32,
    pub _pad2: [u8; 12],
}

pub const DIRECTION_INGRESS: u8 = 0;
pub const DIRECTION_EGRESS: u8 = 1;
pub const VERDICT_ALLOW: u8 = 0;
pub const VERDICT_DROP: u8 = 1;
/// Size of POLICY_EVENTS in bytes (a power of two, page aligned).
pub const POLICY_EVENTS_BYTES: u32 = 1 << 20;

pub mod ct_flags {
    /// The connection was opened from the `lo` side.
    pub const FROM_LO: u32 = 1 << 0;
    /// The opening side's SYN was seen, and the answer's SYN-ACK.
    pub const SYN_ACK: u32 = 1 << 1;
    /// A FIN or RST was seen: the connection is closing.
    pub const CLOSING: u32 = 1 << 2;
}

/// Conntrack timeouts by protocol and TCP state, in nanoseconds.
pub mod ct_timeout {
    const S: u64 = 1_000_000_000;
    pub const TCP_OPENING: u64 = 60 * S;
    pub const TCP_ESTABLISHED: u64 = 3600 * S;
    pub const TCP_CLOSING: u64 = 10 * S;
    pub const UDP: u64 = 60 * S;
    pub const OTHER: u64 = 60 * S;
}

const _: () = assert!(core::mem::size_of::<IpKey>() == 20);
const _: () = assert!(core::mem::size_of::<EndpointPolicy>() == 8);
const _: () = assert!(core::mem::size_of::<PolicyKey>() == 12);
const _: () = assert!(core::mem::size_of::<CtKey>() == 48);
const _: () = assert!(core::mem::size_of::<CtEntry>() == 24);
const _: () = assert!(core::mem::size_of::<FragKey>() == 12);
const _: () = assert!(core::mem::size_of::<FragPorts>() == 4);
const _: () = assert!(core::mem::size_of::<PolicyEvent>() == 64);
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 24);
const _: () = assert!(core::mem::size_of::<Service>() == 16);
const _: () = assert!(core::mem::size_of::<NatEntry>() == 48);
const _: () = assert!(core::mem::size_of::<ExternalIp>() == 8);
const _: () = assert!(core::mem::size_of::<AffinityKey>() == 24);
const _: () = assert!(core::mem::size_of::<AffinityEntry>() == 40);
const _: () = assert!(core::mem::size_of::<BackendKey>() == 8);
const _: () = assert!(core::mem::size_of::<NatTarget>() == 24);
const _: () = assert!(core::mem::size_of::<FlowKey>() == 48);
const _: () = assert!(core::mem::size_of::<Endpoint>() == 16);
const _: () = assert!(core::mem::size_of::<SpoofGuardKey>() == 24);
const _: () = assert!(core::mem::size_of::<SpoofGuardEntry>() == 8);
const _: () = assert!(core::mem::size_of::<NodeConfig>() == 32);
const _: () = assert!(core::mem::size_of::<RemoteNode>() == 20);

/// Declares a `#[repr(u32)]` enum with a stable name for every variant, the number of variants
/// and a lookup from the raw index, so user space prints names, never numbers.
macro_rules! named_enum {
    ($(#[$m:meta])* pub enum $name:ident { $($(#[$vm:meta])* $variant:ident = $value:literal => $text:literal,)+ }) => {
        $(#[$m])*
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum $name { $($(#[$vm])* $variant = $value,)+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];
            pub const COUNT: u32 = Self::ALL.len() as u32;

            pub const fn name(self) -> &'static str {
                match self { $($name::$variant => $text,)+ }
            }

            pub const fn from_index(index: u32) -> Option<$name> {
                match index { $($value => Some($name::$variant),)+ _ => None }
            }
        }
    };
}

named_enum! {
    /// Pipeline stages of the eBPF datapath, in pipeline order (Antrea's names).
    pub enum Stage {
        /// Parses the frame once into the packet metadata every later stage reads.
        Classifier = 0 => "Classifier",
        /// Source IP and MAC (and ARP sender) must be the pod's own.
        SpoofGuard = 1 => "SpoofGuard",
        /// Answers the pod's ARP requests with the gateway MAC: every pod talks L3 to the gateway.
        ArpResponder = 2 => "ARPResponder",
        /// A client with ClientIP affinity goes back to the endpoint it used last.
        SessionAffinity = 3 => "SessionAffinity",
        /// A Service frontend: the connection keeps its endpoint, or a new one gets one at random.
        ServiceLB = 4 => "ServiceLB",
        /// The destination rewritten to the endpoint (and replies' source back to the frontend).
        EndpointDNAT = 5 => "EndpointDNAT",
        /// Finds the connection in conntrack: an established one skips the policy stages.
        ConntrackState = 6 => "ConntrackState",
        /// A new connection out of an egress-isolated pod: allowed by a rule...
        EgressRule = 7 => "EgressRule",
        /// ...or dropped.
        EgressDefaultRule = 8 => "EgressDefaultRule",
        /// Finds where the destination lives: a local pod (exact address), another node's pod
        /// CIDR (longest prefix), or else the node itself.
        L3Forwarding = 9 => "L3Forwarding",
        /// A new connection into an ingress-isolated local pod: allowed by a rule...
        IngressRule = 10 => "IngressRule",
        /// ...or dropped.
        IngressDefaultRule = 11 => "IngressDefaultRule",
        /// Delivers: into a local pod, into the tunnel to another node, or up to the node
        /// through the gateway.
        Output = 12 => "Output",
    }
}

named_enum! {
    /// Why a packet was dropped. Each reason belongs to one stage (`DropReason::stage`).
    pub enum DropReason {
        /// The frame ends before a header it announces.
        Truncated = 0 => "Truncated",
        /// A header is inconsistent (IP version, IHL, ARP sizes).
        Malformed = 1 => "Malformed",
        /// An EtherType the datapath does not forward (VLAN tags included).
        UnsupportedEtherType = 2 => "UnsupportedEtherType",
        /// The source IP is not one of the pod port's addresses.
        SpoofedSourceIp = 3 => "SpoofedSourceIP",
        /// The source MAC (or ARP sender MAC) is not the pod's.
        SpoofedSourceMac = 4 => "SpoofedSourceMAC",
        /// ARP whose sender IP is not the pod's.
        SpoofedArp = 5 => "SpoofedARP",
        /// ARP that is not a request (pods only ever need answers from the gateway).
        UnsupportedArp = 6 => "UnsupportedARP",
        /// No local pod owns the destination of a packet coming from the gateway.
        UnknownDestination = 7 => "UnknownDestination",
        /// The datapath has no node configuration yet (agent never started).
        NotConfigured = 8 => "NotConfigured",
        /// The kernel refused the tunnel metadata for an encapsulated packet.
        TunnelKeyFailed = 9 => "TunnelKeyFailed",
        /// No egress rule of the pod's policies allows the new connection.
        EgressDenied = 10 => "EgressDenied",
        /// No ingress rule of the destination pod's policies allows the new connection.
        IngressDenied = 11 => "IngressDenied",
        /// A Service frontend without endpoints.
        NoEndpoints = 12 => "NoEndpoints",
        /// The kernel refused a NAT rewrite (checksum or store helper).
        NatFailed = 13 => "NatFailed",
        /// The node's FIB has no route (or no usable neighbour) for a packet leaving through it.
        NoRoute = 14 => "NoRoute",
        /// An IPv4 fragment after the first whose first fragment this node has not seen (or no
        /// longer remembers): its ports, and so its Service and its policy, are unknown.
        FragmentWithoutFirst = 15 => "FragmentWithoutFirst",
    }
}

impl DropReason {
    pub const fn stage(self) -> Stage {
        match self {
            DropReason::Truncated
            | DropReason::Malformed
            | DropReason::UnsupportedEtherType
            | DropReason::NotConfigured
            | DropReason::FragmentWithoutFirst => Stage::Classifier,
            DropReason::SpoofedSourceIp | DropReason::SpoofedSourceMac | DropReason::SpoofedArp => {
                Stage::SpoofGuard
            }
            DropReason::UnsupportedArp => Stage::ArpResponder,
            DropReason::UnknownDestination => Stage::L3Forwarding,
            DropReason::TunnelKeyFailed => Stage::Output,
            DropReason::EgressDenied => Stage::EgressDefaultRule,
            DropReason::IngressDenied => Stage::IngressDefaultRule,
            DropReason::NoEndpoints => Stage::ServiceLB,
            DropReason::NatFailed => Stage::EndpointDNAT,
            DropReason::NoRoute => Stage::Output,
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all types are repr(C), Copy, with explicit padding and no pointers.
    unsafe impl aya::Pod for IpKey {}
    unsafe impl aya::Pod for Endpoint {}
    unsafe impl aya::Pod for SpoofGuardKey {}
    unsafe impl aya::Pod for SpoofGuardEntry {}
    unsafe impl aya::Pod for NodeConfig {}
    unsafe impl aya::Pod for RemoteNode {}
    unsafe impl aya::Pod for EndpointPolicy {}
    unsafe impl aya::Pod for PolicyKey {}
    unsafe impl aya::Pod for PolicyRule {}
    unsafe impl aya::Pod for Identity {}
    unsafe impl aya::Pod for RuleStats {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtEntry {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for FragPorts {}
    unsafe impl aya::Pod for PolicyEvent {}
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for Service {}
    unsafe impl aya::Pod for BackendKey {}
    unsafe impl aya::Pod for NatTarget {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for NatEntry {}
    unsafe impl aya::Pod for ExternalIp {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityEntry {}
}
