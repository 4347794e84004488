//! ARPResponder: every pod resolves every IPv4 neighbour to the gateway MAC, so all pod traffic
//! is routed by L3Forwarding, as Antrea does for its gateway.

use aya_ebpf::{bindings::TC_ACT_OK, helpers::bpf_redirect, programs::TcContext};
use sluice_common::{DropReason, IpKey, NodeConfig, Stage};

use super::classifier::{ptr_at, ArpHdr, ArpMeta, EthHdr, ARP_REPLY, ARP_REQUEST, ETH_HLEN};
use crate::EXTERNAL_IPS;

/// Answers a pod's request with the gateway MAC.
#[inline(always)]
pub fn reply(
    ctx: &TcContext,
    port: u32,
    arp: &ArpMeta,
    node: &NodeConfig,
) -> Result<i32, DropReason> {
    answer(ctx, port, arp, node.gateway_mac)
}

/// On the uplink: answers for the LoadBalancer IPs this node owns (with the uplink's MAC); any
/// other ARP goes on to the node.
#[inline(always)]
pub fn reply_external(ctx: &TcContext, port: u32, arp: &ArpMeta) -> Result<i32, DropReason> {
    let owned = match EXTERNAL_IPS.get_ptr(&IpKey::v4(arp.target_ip)) {
        // SAFETY: copied out of a successful lookup.
        Some(owned) => unsafe { *owned },
        None => return Ok(TC_ACT_OK),
    };
    if arp.oper != ARP_REQUEST || arp.sender_ip == arp.target_ip {
        return Ok(TC_ACT_OK);
    }
    answer(ctx, port, arp, owned.mac)
}

/// Turns the request into the reply in place and sends it back out of the port it came in on.
#[inline(always)]
fn answer(ctx: &TcContext, port: u32, arp: &ArpMeta, mac: [u8; 6]) -> Result<i32, DropReason> {
    // A gratuitous announcement (sender == target) must not be answered: the pod would see its
    // own address claimed by the gateway.
    if arp.oper != ARP_REQUEST || arp.sender_ip == arp.target_ip {
        return Err(DropReason::UnsupportedArp);
    }
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    let hdr = ptr_at::<ArpHdr>(ctx, ETH_HLEN)?;
    // SAFETY: both headers were bounds checked by `ptr_at`.
    unsafe {
        (*eth).dst = arp.sender_mac;
        (*eth).src = mac;
        (*hdr).oper = ARP_REPLY.to_be();
        (*hdr).sha = mac;
        (*hdr).spa = arp.target_ip;
        (*hdr).tha = arp.sender_mac;
        (*hdr).tpa = arp.sender_ip;
    }
    super::passed(Stage::ArpResponder);
    super::passed(Stage::Output);
    // SAFETY: plain helper call; egress of the pod's own port delivers to the pod.
    Ok(unsafe { bpf_redirect(port, 0) } as i32)
}
