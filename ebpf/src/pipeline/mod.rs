//! The order of the stages, for each attach point. Every stage is a function from the packet
//! metadata to the next step or a `DropReason`; this file is the only place that chains them.

mod arp_responder;
mod classifier;
mod conntrack;
mod l3_forwarding;
mod metrics;
mod nat_lifetime;
mod network_policy;
mod output;
mod quoted_nat;
mod reject;
mod service_lb;
mod socket_lb;
mod spoof_guard;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use sluice_common::{nat_flags, scope, DropReason, IpKey, NodeConfig, Stage, HAIRPIN_IPV4};

use crate::{ENDPOINT_POLICY, NODE_CONFIG};
pub use classifier::IpMeta;
use classifier::Packet;
use l3_forwarding::Next;
pub use reject::Scratch as RejectScratch;
use service_lb::Lb;
pub use service_lb::Scratch as NatScratch;
pub use socket_lb::connect4;

/// A TC action (`TC_ACT_*`) or the reason the packet is dropped.
pub type StageResult = Result<i32, DropReason>;

pub fn verdict(result: StageResult) -> i32 {
    match result {
        Ok(action) => action,
        Err(reason) => {
            metrics::count_drop(reason);
            TC_ACT_SHOT
        }
    }
}

/// Classifier → SpoofGuard → (ARPResponder | SessionAffinity → ServiceLB → EndpointDNAT →
/// ConntrackState → EgressRule → IngressRule (a local receiver's) → L3Forwarding → Output).
pub fn from_pod(ctx: &TcContext) -> StageResult {
    let node = node_config()?;
    let port = ingress_ifindex(ctx);
    match classifier::classify(ctx)? {
        Packet::Arp(arp) => {
            spoof_guard::check_arp(port, &arp)?;
            arp_responder::reply(ctx, port, &arp, node)
        }
        Packet::Ip(meta) => {
            spoof_guard::check_ip(port, meta)?;
            // ServiceLB may rewrite the source (the hairpin address for a pod reaching itself,
            // the gateway's for SNAT); policy judges the pod that sent it.
            let sender = meta.src;
            let lb = service_lb::balance(ctx, meta, Some(scope::INTERNAL), node)?;
            if matches!(lb, Lb::Reject) {
                return reject::answer(ctx, meta);
            }
            security(meta, Some(&sender), false)?;
            forward(ctx, meta, lb, node)
        }
    }
}

/// Classifier → ServiceLB → EndpointDNAT → ConntrackState → IngressRule → L3Forwarding →
/// Output: the node reaching pods, local or (encap) remote, and Services. Anything else (its own
/// IPv6 router solicitations, ARP) has nowhere to go.
pub fn from_gateway(ctx: &TcContext) -> StageResult {
    let node = node_config()?;
    match classifier::classify(ctx)? {
        Packet::Arp(_) => Err(DropReason::UnsupportedArp),
        Packet::Ip(meta) => {
            let lb = service_lb::balance(ctx, meta, Some(scope::INTERNAL), node)?;
            if matches!(lb, Lb::Reject) {
                return reject::answer(ctx, meta);
            }
            security(meta, None, false)?;
            match lb {
                // A host-network endpoint answering.
                Lb::Reverse => reply(ctx, meta, node),
                _ => match l3_forwarding::lookup(meta, node) {
                    Next::LocalPod(endpoint) => output::to_pod(ctx, endpoint, node),
                    Next::RemoteNode(remote) => output::to_tunnel(ctx, &remote, node),
                    // The node's own host-network endpoint, the hairpin address as its client.
                    Next::Node
                        if matches!(lb, Lb::Forward) && meta.src == IpKey::v4(HAIRPIN_IPV4) =>
                    {
                        output::to_gateway(ctx, node)
                    }
                    // noEncap: a ClusterIP's endpoint on another node, through the node's routes
                    // (its own stack would refuse the gateway's address coming back in).
                    Next::Node if matches!(lb, Lb::Forward) => output::to_fib(ctx, meta),
                    Next::Node => Err(DropReason::UnknownDestination),
                },
            }
        }
    }
}

/// Classifier → EndpointDNAT (replies) → ConntrackState → IngressRule → L3Forwarding → Output:
/// another node's pods or the node itself (from its own address, or replying to this node's
/// gateway address) reaching this node. Never back into the tunnel: no transit.
pub fn from_tunnel(ctx: &TcContext) -> StageResult {
    let node = node_config()?;
    match classifier::classify(ctx)? {
        Packet::Arp(_) => Err(DropReason::UnsupportedArp),
        Packet::Ip(meta) => {
            let lb = service_lb::balance(ctx, meta, None, node)?;
            security(meta, None, false)?;
            match lb {
                Lb::Reverse => reply(ctx, meta, node),
                _ => match l3_forwarding::lookup(meta, node) {
                    Next::LocalPod(endpoint) => {
                        l3_forwarding::learn_tunnel_client(ctx, meta);
                        output::to_pod(ctx, endpoint, node)
                    }
                    Next::RemoteNode(_) | Next::Node => output::to_gateway(ctx, node),
                },
            }
        }
    }
}

/// Classifier → (ARPResponder | SessionAffinity → ServiceLB → EndpointDNAT → ConntrackState →
/// IngressRule → L3Forwarding → Output) for Services reached from outside the cluster. Anything
/// that is not theirs goes on to the node untouched, having cost two hash lookups.
pub fn from_uplink(ctx: &TcContext) -> StageResult {
    // The node's own traffic crosses this program: what it cannot parse (VLAN tags, LLDP, other
    // protocols) or a node not configured yet is none of its business, never a drop.
    let Ok(node) = node_config() else {
        return Ok(TC_ACT_OK);
    };
    let Ok(packet) = classifier::classify(ctx) else {
        return Ok(TC_ACT_OK);
    };
    match packet {
        Packet::Arp(arp) => arp_responder::reply_external(ctx, ingress_ifindex(ctx), &arp),
        Packet::Ip(meta) => {
            let lb = service_lb::balance(ctx, meta, Some(scope::EXTERNAL), node)?;
            match lb {
                Lb::Pass => return Ok(TC_ACT_OK),
                Lb::Reject => return reject::answer(ctx, meta),
                Lb::Forward | Lb::Reverse => {}
            }
            // Rewritten to this node's gateway address (externalTrafficPolicy Cluster): judged
            // as any other node judges that address, never as the node itself.
            let snat = matches!(lb, Lb::Forward) && meta.src == IpKey::v4(node.gateway_ipv4);
            security(meta, None, snat)?;
            match lb {
                // noEncap: replies from another node's endpoint arrive here.
                Lb::Reverse => reply(ctx, meta, node),
                _ => match l3_forwarding::lookup(meta, node) {
                    Next::LocalPod(endpoint) => output::to_pod(ctx, endpoint, node),
                    Next::RemoteNode(remote) => output::to_tunnel(ctx, &remote, node),
                    Next::Node => output::to_fib(ctx, meta),
                },
            }
        }
    }
}

/// L3Forwarding → Output for a packet of a pod (load-balanced, or a reply to be un-NATed).
#[inline(always)]
fn forward(ctx: &TcContext, meta: &mut IpMeta, lb: Lb, node: &NodeConfig) -> StageResult {
    if matches!(lb, Lb::Reverse) {
        return reply(ctx, meta, node);
    }
    match l3_forwarding::lookup_from_pod(meta, node) {
        Next::LocalPod(endpoint) => output::to_pod(ctx, endpoint, node),
        Next::RemoteNode(remote) => output::to_tunnel(ctx, &remote, node),
        Next::Node => output::to_gateway(ctx, node),
    }
}

/// EndpointDNAT undone, then L3Forwarding → Output towards the client: a pod, the node, or a
/// host outside the cluster (through the node's FIB).
#[inline(always)]
fn reply(ctx: &TcContext, meta: &mut IpMeta, node: &NodeConfig) -> StageResult {
    let flags = service_lb::reverse(ctx, meta)?;
    match l3_forwarding::lookup(meta, node) {
        Next::LocalPod(endpoint) => output::to_pod(ctx, endpoint, node),
        Next::RemoteNode(remote) => output::to_tunnel(ctx, &remote, node),
        Next::Node if flags & nat_flags::TO_EXTERNAL != 0 => output::to_fib(ctx, meta),
        Next::Node => output::to_gateway(ctx, node),
    }
}

/// ConntrackState → EgressRule (for a local sender, `from_pod`) → IngressRule (for a local
/// receiver). Traffic between pods that no policy isolates skips all of it: two hash lookups.
/// `sender`: the local pod that sent the packet, as it sent it (before ServiceLB); its egress
/// rules apply, and a receiver's ingress rules judge it, not the address the packet now
/// carries. `snat`: the source is this node's gateway address standing in for a client outside
/// the cluster. Kept out of line: its keys get a stack frame of their own (the BPF stack is 512
/// bytes).
#[inline(never)]
fn security(meta: &IpMeta, sender: Option<&IpKey>, snat: bool) -> Result<(), DropReason> {
    // Each entry is read right after its lookup: testing both pointers for null together makes
    // LLVM OR them, which the verifier rejects.
    let mut isolated = false;
    let mut egress_policy = 0;
    if let Some(sender) = sender {
        if let Some(policy) = ENDPOINT_POLICY.get_ptr(sender) {
            isolated = true;
            // SAFETY: pointer from a successful lookup, read once.
            egress_policy = unsafe { (*policy).egress_policy };
        }
    }
    let mut ingress_policy = 0;
    if let Some(policy) = ENDPOINT_POLICY.get_ptr(meta.dst) {
        isolated = true;
        // SAFETY: as above.
        ingress_policy = unsafe { (*policy).ingress_policy };
    }
    if !isolated {
        return Ok(());
    }
    if conntrack::related(meta) {
        passed(Stage::ConntrackState);
        return Ok(());
    }
    conntrack::track(meta, || {
        let egress = match egress_policy {
            0 => 0,
            policy => network_policy::egress(policy, meta)?,
        };
        let ingress = match ingress_policy {
            0 => 0,
            policy => network_policy::ingress(policy, meta, sender.unwrap_or(&meta.src), snat)?,
        };
        Ok((egress, ingress))
    })
}

#[inline(always)]
fn node_config() -> Result<&'static NodeConfig, DropReason> {
    match NODE_CONFIG.get(0) {
        Some(node) if node.gateway_ifindex != 0 => Ok(node),
        _ => Err(DropReason::NotConfigured),
    }
}

#[inline(always)]
pub fn ingress_ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: `skb` is the context pointer the kernel handed to the program.
    unsafe { (*ctx.skb.skb).ifindex }
}

#[inline(always)]
fn passed(stage: Stage) {
    metrics::count_stage(stage);
}
