//! Output: rewrite the Ethernet header for the next hop and hand the packet over.

use core::mem::size_of;

use aya_ebpf::{
    bindings::{bpf_tunnel_key, BPF_F_INGRESS, BPF_F_TUNINFO_IPV6},
    helpers::{bpf_redirect, bpf_redirect_peer, bpf_skb_set_tunnel_key},
    programs::TcContext,
};
use sluice_common::{DropReason, Endpoint, NodeConfig, RemoteNode, Stage, FAMILY_IPV6, TUNNEL_VNI};

use super::classifier::{ptr_at, EthHdr};

/// Into a local pod: straight into its namespace (`bpf_redirect_peer` skips the backlog queue),
/// as if the gateway had sent the frame.
#[inline(always)]
pub fn to_pod(ctx: &TcContext, endpoint: Endpoint, node: &NodeConfig) -> Result<i32, DropReason> {
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    // SAFETY: bounds checked by `ptr_at`.
    unsafe {
        (*eth).dst = endpoint.mac;
        (*eth).src = node.gateway_mac;
    }
    super::passed(Stage::Output);
    // SAFETY: plain helper call.
    Ok(unsafe { bpf_redirect_peer(endpoint.ifindex, 0) } as i32)
}

/// Up to the node: the packet arrives on `sluice-gw0` as if the pod had sent it there, so the
/// node routes (and masquerades) it like any packet from its pod network.
#[inline(always)]
pub fn to_gateway(ctx: &TcContext, node: &NodeConfig) -> Result<i32, DropReason> {
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    // SAFETY: bounds checked by `ptr_at`.
    unsafe { (*eth).dst = node.gateway_mac };
    super::passed(Stage::Output);
    // SAFETY: plain helper call.
    Ok(unsafe { bpf_redirect(node.gateway_ifindex, BPF_F_INGRESS as u64) } as i32)
}

/// Into the tunnel towards the node that owns the destination's pod CIDR (encap mode). The
/// tunnel device (VXLAN or Geneve in external mode) builds the outer headers from the key.
#[inline(always)]
pub fn to_tunnel(
    ctx: &TcContext,
    remote: &RemoteNode,
    node: &NodeConfig,
) -> Result<i32, DropReason> {
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    // SAFETY: bounds checked by `ptr_at`. The receiving node rewrites both MACs.
    unsafe {
        (*eth).src = node.gateway_mac;
        (*eth).dst = node.gateway_mac;
    }
    // SAFETY: bpf_tunnel_key is plain data; all-zero is its "unset" value.
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    key.tunnel_id = TUNNEL_VNI;
    key.tunnel_ttl = 64;
    let addr = remote.node_ip.addr;
    let flags = if remote.node_ip.family == FAMILY_IPV6 {
        // The kernel copies the IPv6 address bytes as they are (network order).
        key.__bindgen_anon_1.remote_ipv6 = [
            u32::from_ne_bytes([addr[0], addr[1], addr[2], addr[3]]),
            u32::from_ne_bytes([addr[4], addr[5], addr[6], addr[7]]),
            u32::from_ne_bytes([addr[8], addr[9], addr[10], addr[11]]),
            u32::from_ne_bytes([addr[12], addr[13], addr[14], addr[15]]),
        ];
        BPF_F_TUNINFO_IPV6 as u64
    } else {
        // The IPv4 address is taken in host byte order.
        key.__bindgen_anon_1.remote_ipv4 = u32::from_be_bytes([addr[0], addr[1], addr[2], addr[3]]);
        0
    };
    // SAFETY: `key` lives for the call; the size is the struct's.
    let ret = unsafe {
        bpf_skb_set_tunnel_key(
            ctx.skb.skb,
            &mut key,
            size_of::<bpf_tunnel_key>() as u32,
            flags,
        )
    };
    if ret < 0 {
        return Err(DropReason::TunnelKeyFailed);
    }
    super::passed(Stage::Output);
    // SAFETY: plain helper call.
    Ok(unsafe { bpf_redirect(node.tunnel_ifindex, 0) } as i32)
}
