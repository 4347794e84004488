//! L3Forwarding: where the destination lives. A local pod by exact address; in encap mode,
//! another node by the longest pod-CIDR prefix, or the node whose own address opened the
//! connection being answered; otherwise the node itself (its routes decide).

use core::mem::size_of;

use aya_ebpf::{
    bindings::{bpf_tunnel_key, BPF_F_TUNINFO_IPV6},
    helpers::bpf_skb_get_tunnel_key,
    maps::lpm_trie::Key,
    programs::TcContext,
};
use sluice_common::{Endpoint, FlowKey, IpKey, NodeConfig, RemoteNode, Stage, IP_KEY_PREFIX_BITS};

use super::classifier::{IpMeta, IPPROTO_TCP, TCP_ACK, TCP_SYN};
use crate::{ENDPOINTS, REMOTE_NODES, TUNNEL_REPLIES};

pub enum Next {
    LocalPod(Endpoint),
    RemoteNode(RemoteNode),
    Node,
}

#[inline(always)]
pub fn lookup(meta: &IpMeta, node: &NodeConfig) -> Next {
    super::passed(Stage::L3Forwarding);
    if let Some(endpoint) = ENDPOINTS.get_ptr(meta.dst) {
        // SAFETY: the value is copied out right away.
        return Next::LocalPod(unsafe { *endpoint });
    }
    if node.tunnel_ifindex != 0 {
        if let Some(remote) = remote_node(&meta.dst) {
            return Next::RemoteNode(remote);
        }
    }
    Next::Node
}

/// `lookup` for what a local pod sends: an answer to another node's own address goes back
/// through the tunnel when that node opened the connection through it (`learn_tunnel_client`).
#[inline(always)]
pub fn lookup_from_pod(meta: &IpMeta, node: &NodeConfig) -> Next {
    match lookup(meta, node) {
        Next::Node if node.tunnel_ifindex != 0 => match tunnel_reply(meta) {
            Some(remote) => Next::RemoteNode(remote),
            None => Next::Node,
        },
        next => next,
    }
}

/// Out of line: the flow key gets a stack frame of its own (the BPF stack is 512 bytes).
#[inline(never)]
fn tunnel_reply(meta: &IpMeta) -> Option<RemoteNode> {
    let key = FlowKey::new(meta.src, meta.dst, meta.src_port, meta.dst_port, meta.proto);
    // SAFETY: the value is copied out right away.
    TUNNEL_REPLIES
        .get_ptr(&key)
        .map(|remote| unsafe { *remote })
}

#[inline(always)]
fn remote_node(addr: &IpKey) -> Option<RemoteNode> {
    let key = Key::new(IP_KEY_PREFIX_BITS + 128, *addr);
    REMOTE_NODES.get(&key).copied()
}

/// A packet from the tunnel to a local pod whose source is no pod of another node: a node's
/// own address (a host-network client, or `sock_connect4` balancing a node's connect to a
/// NodePort here). The pod's answers must go back through the tunnel: through this node's stack,
/// which never saw the connection, they would leave masqueraded and never match the client's
/// socket. Remembers the connection (its first packet for TCP) with the tunnel's outer source.
/// Out of line: the tunnel key and the flow key get a stack frame of their own.
#[inline(never)]
pub fn learn_tunnel_client(ctx: &TcContext, meta: &IpMeta) {
    if meta.proto == IPPROTO_TCP && meta.tcp_flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        return;
    }
    if remote_node(&meta.src).is_some() {
        return;
    }
    let Some(node_ip) = outer_source(ctx) else {
        return;
    };
    let reply = FlowKey::new(meta.dst, meta.src, meta.dst_port, meta.src_port, meta.proto);
    // A full LRU evicts the oldest entry; a failed insert only sends the answers through the
    // node's stack, as before the map existed.
    let _ = TUNNEL_REPLIES.insert(&reply, &RemoteNode { node_ip }, 0);
}

/// The tunnel's outer source address of the packet being received (none outside a tunnel,
/// e.g. under BPF_PROG_TEST_RUN).
#[inline(always)]
fn outer_source(ctx: &TcContext) -> Option<IpKey> {
    // SAFETY: bpf_tunnel_key is plain data; all-zero is a valid buffer to fill in.
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    let size = size_of::<bpf_tunnel_key>() as u32;
    // SAFETY: `key` lives for the call; the size is the struct's.
    if unsafe { bpf_skb_get_tunnel_key(ctx.skb.skb, &mut key, size, 0) } == 0 {
        // Host byte order, as `to_tunnel` gives it.
        // SAFETY: a union of plain integers.
        let addr = unsafe { key.__bindgen_anon_1.remote_ipv4 };
        return Some(IpKey::v4(addr.to_be_bytes()));
    }
    // SAFETY: as above; an IPv6 underlay answers only with the IPv6 flag.
    let ret =
        unsafe { bpf_skb_get_tunnel_key(ctx.skb.skb, &mut key, size, BPF_F_TUNINFO_IPV6 as u64) };
    if ret != 0 {
        return None;
    }
    // SAFETY: as above; the kernel copies the address bytes in network order.
    let [a, b, c, d] = unsafe { key.__bindgen_anon_1.remote_ipv6 }.map(u32::to_ne_bytes);
    Some(IpKey::v6([
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ]))
}
