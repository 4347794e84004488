//! Output: rewrite the Ethernet header for the next hop and hand the packet over.

use aya_ebpf::{
    bindings::BPF_F_INGRESS,
    helpers::{bpf_redirect, bpf_redirect_peer},
    programs::TcContext,
};
use sluice_common::{DropReason, Endpoint, NodeConfig, Stage};

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
