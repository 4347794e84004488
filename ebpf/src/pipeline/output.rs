//! Output: rewrite the Ethernet header for the next hop and hand the packet over.

use core::mem::size_of;

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup, bpf_redir_neigh, bpf_tunnel_key, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS, BPF_F_INGRESS, BPF_F_TUNINFO_IPV6,
    },
    helpers::{
        bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer,
        bpf_skb_set_tunnel_key,
    },
    programs::TcContext,
};
use sluice_common::{
    DropReason, Endpoint, NodeConfig, RemoteNode, Stage, FAMILY_IPV4, FAMILY_IPV6, TUNNEL_VNI,
};

use super::classifier::{ptr_at, EthHdr, IpMeta};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

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

/// Out through the node's FIB, skipping its IP stack: replies to clients outside the cluster
/// (their source is a node address, which the stack would refuse as martian on `sluice-gw0`)
/// and external connections balanced to an endpoint the node reaches by a route (noEncap).
#[inline(never)]
pub fn to_fib(ctx: &TcContext, meta: &IpMeta) -> Result<i32, DropReason> {
    // SAFETY: bpf_fib_lookup is plain data; all-zero is a valid request to fill in.
    let mut fib: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    fib.l4_protocol = meta.proto;
    fib.sport = meta.src_port.to_be();
    fib.dport = meta.dst_port.to_be();
    fib.ifindex = super::ingress_ifindex(ctx);
    let (src, dst) = (meta.src.addr, meta.dst.addr);
    if meta.dst.family == FAMILY_IPV4 {
        fib.family = AF_INET;
        fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes([src[0], src[1], src[2], src[3]]);
        fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes([dst[0], dst[1], dst[2], dst[3]]);
    } else {
        fib.family = AF_INET6;
        // SAFETY: both are 16 plain bytes.
        unsafe {
            fib.__bindgen_anon_3.ipv6_src = core::mem::transmute::<[u8; 16], [u32; 4]>(src);
            fib.__bindgen_anon_4.ipv6_dst = core::mem::transmute::<[u8; 16], [u32; 4]>(dst);
        }
    }
    // SAFETY: `fib` lives for the call; the size is the struct's.
    let ret = unsafe {
        fib_lookup(
            ctx.skb.skb as *mut _,
            &mut fib,
            size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    match ret as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => {
            let eth = ptr_at::<EthHdr>(ctx, 0)?;
            // SAFETY: bounds checked by `ptr_at`.
            unsafe {
                (*eth).dst = fib.dmac;
                (*eth).src = fib.smac;
            }
            super::passed(Stage::Output);
            // SAFETY: plain helper call.
            Ok(unsafe { bpf_redirect(fib.ifindex, 0) } as i32)
        }
        BPF_FIB_LKUP_RET_NO_NEIGH => {
            // The lookup left the next hop in the destination field: resolve it on the way out.
            // SAFETY: bpf_redir_neigh is plain data.
            let mut next_hop: bpf_redir_neigh = unsafe { core::mem::zeroed() };
            // SAFETY: reading back what the lookup wrote, of the family it was asked for.
            unsafe {
                if meta.dst.family == FAMILY_IPV4 {
                    next_hop.nh_family = AF_INET as u32;
                    next_hop.__bindgen_anon_1.ipv4_nh = fib.__bindgen_anon_4.ipv4_dst;
                } else {
                    next_hop.nh_family = AF_INET6 as u32;
                    next_hop.__bindgen_anon_1.ipv6_nh = fib.__bindgen_anon_4.ipv6_dst;
                }
            }
            super::passed(Stage::Output);
            // SAFETY: `next_hop` lives for the call; the size is the struct's.
            Ok(unsafe {
                bpf_redirect_neigh(
                    fib.ifindex,
                    &mut next_hop,
                    size_of::<bpf_redir_neigh>() as i32,
                    0,
                )
            } as i32)
        }
        _ => Err(DropReason::NoRoute),
    }
}
