//! Which node answers for an IP: of the Ready nodes that the pool's nodeSelector matches, the one
//! with the highest rendezvous weight for (IP, node name). A node's weights do not depend on the
//! other nodes, so when a node leaves only the IPs it owned move (each to its runner-up), and a
//! node that joins takes only the IPs it now weighs most for.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::Node;

/// The Ready condition is True (a node being drained but still Ready keeps its IPs).
pub(super) fn is_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True")
}

/// The owner of `ip` among `nodes`; ties (which need a 64-bit collision) go to the lower name.
pub(super) fn owner<'a>(ip: IpAddr, nodes: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    nodes
        .into_iter()
        .max_by_key(|node| (weight(ip, node), std::cmp::Reverse(*node)))
}

/// FNV-1a over the node name, a NUL (which no node name holds) and the address bytes, then
/// MurmurHash3's 64-bit finalizer. Fixed forever: agents built by different Rust releases must
/// agree, and std's hashers may change between releases. FNV-1a alone barely mixes the last
/// bytes; the finalizer spreads them over every bit, so each node wins its share of IPs.
pub(super) fn weight(ip: IpAddr, node: &str) -> u64 {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let octets = match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    let mut h = node
        .bytes()
        .chain([0])
        .chain(octets)
        .fold(FNV_OFFSET, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(FNV_PRIME)
        });
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}
