//! ServiceLB at connect time, for the node reaching a NodePort on one of its own addresses. That
//! traffic goes over the loopback device, which no TC program sees; so the node's sockets are
//! balanced when they connect (as Cilium's host-reachable Services and kube-proxy's
//! short-circuit of local traffic): the destination becomes an endpoint before the first packet
//! exists, and nothing needs translating back. Only sockets of the node's own network namespace
//! are touched: a pod's traffic to a NodePort reaches ServiceLB in `from_pod` like the rest.

use aya_ebpf::{helpers::bpf_get_netns_cookie, programs::SockAddrContext, EbpfContext};
use sluice_common::{scope, IpKey, ServiceKey};

use super::{
    classifier::{IPPROTO_TCP, IPPROTO_UDP},
    network_policy,
    service_lb::{self, Pick},
};
use crate::{NODE_CONFIG, SERVICES};

/// The connect goes on (1); a sock_addr program's 0 would fail it with EPERM.
const PROCEED: i32 = 1;

#[inline(always)]
pub fn connect4(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the context the kernel passed; these fields are readable and (user_ip4,
    // user_port) writable in connect4.
    let sa = unsafe { &mut *ctx.sock_addr };
    let proto = match sa.protocol as u8 {
        p @ (IPPROTO_TCP | IPPROTO_UDP) => p,
        _ => return PROCEED,
    };
    let Some(node) = NODE_CONFIG.get(0) else {
        return PROCEED;
    };
    // SAFETY: plain helper call on the program's own context.
    if node.host_netns_cookie == 0
        || unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } != node.host_netns_cookie
    {
        return PROCEED;
    }
    // Both fields hold network byte order as they lie in memory.
    let addr = IpKey::v4(sa.user_ip4.to_ne_bytes());
    let frontend = ServiceKey {
        addr,
        port: u16::from_be(sa.user_port as u16),
        proto,
        scope: scope::INTERNAL,
    };
    let Some(service) = SERVICES.get_ptr(&frontend) else {
        return PROCEED;
    };
    // SAFETY: a pointer into the map from a successful lookup, only read.
    let service = unsafe { &*service };
    // A Service on another address is routed to the gateway, where ServiceLB sees it; one
    // without endpoints is left to the loopback, where nothing listens: the client is refused.
    if !network_policy::is_host(&addr) {
        return PROCEED;
    }
    // The node is the client: its address stands in for the client's in SessionAffinity.
    let mut pick = Pick::new();
    if !service_lb::pick(&addr, service, &mut pick) {
        return PROCEED;
    }
    let endpoint = &pick.endpoint.addr.addr;
    sa.user_ip4 = u32::from_ne_bytes([endpoint[0], endpoint[1], endpoint[2], endpoint[3]]);
    sa.user_port = pick.endpoint.port.to_be() as u32;
    PROCEED
}
