//! SessionAffinity, ServiceLB and EndpointDNAT. A connection to a Service frontend gets an
//! endpoint (the client's affine one, else one at random among the frontend's BACKENDS) and two
//! SERVICE_NAT entries: its DNAT, and the reverse rewrite its replies need. Later packets of
//! either direction find their entry, so a connection keeps its endpoint; the agent deletes the
//! entries of an endpoint that goes away, and the next packet starts over (a TCP peer that never
//! saw the connection answers with a reset). Checksums are updated incrementally, pseudo-header
//! included, so partial checksums left for offload stay valid.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::{bpf_csum_diff, bpf_get_prandom_u32, bpf_ktime_get_ns},
    programs::TcContext,
};
use sluice_common::{
    nat_flags, scope, service_flags, AffinityEntry, AffinityKey, BackendKey, DropReason, FlowKey,
    IpKey, NatEntry, NatTarget, NodeConfig, Service, ServiceKey, Stage, FAMILY_IPV4, HAIRPIN_IPV4,
};

use super::{
    classifier::{IpMeta, ETH_HLEN, IPPROTO_ICMP, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP},
    nat_lifetime, network_policy, quoted_nat,
};
use crate::{AFFINITY, BACKENDS, NAT_SCRATCH, SERVICES, SERVICE_NAT};

/// What ServiceLB made of a packet.
pub enum Lb {
    /// Not part of a load-balanced connection.
    Pass,
    /// Rewritten to its endpoint; `meta` now holds the endpoint tuple.
    Forward,
    /// A reply: `reverse` rewrites it after the security stages, which know the connection by
    /// its endpoint tuple.
    Reverse,
    /// To a Service without endpoints: the client gets a reset or an ICMP unreachable.
    Reject,
}

/// ServiceLB's keys and entries: in a per-CPU slot rather than on the 512-byte BPF stack.
pub struct Scratch {
    frontend: ServiceKey,
    key: FlowKey,
    entry: NatEntry,
    reverse_key: FlowKey,
    reverse: NatEntry,
    pick: Pick,
}

/// What choosing an endpoint needs: in the TC programs' per-CPU slot, on the stack of the
/// socket program (which may be preempted, so cannot share a per-CPU slot).
pub struct Pick {
    pub endpoint: NatTarget,
    affinity_key: AffinityKey,
    affinity: AffinityEntry,
}

impl Pick {
    pub const fn new() -> Pick {
        Pick {
            endpoint: NatTarget {
                addr: IpKey::UNSPECIFIED,
                port: 0,
                _pad: 0,
            },
            affinity_key: AffinityKey {
                backend_set: 0,
                client: IpKey::UNSPECIFIED,
            },
            affinity: AffinityEntry {
                endpoint: NatTarget {
                    addr: IpKey::UNSPECIFIED,
                    port: 0,
                    _pad: 0,
                },
                index: 0,
                _pad: 0,
                last_used: 0,
            },
        }
    }
}

#[inline(always)]
fn scratch() -> Option<&'static mut Scratch> {
    // SAFETY: the slot belongs to this CPU for the whole run of the program.
    NAT_SCRATCH.get_ptr_mut(0).map(|slot| unsafe { &mut *slot })
}

// The out-of-line functions below return plain numbers: returned as a `Result` of enums, the
// unused half of the value is left undefined by LLVM, and the verifier refuses to read it.
const PASS: u32 = 0;
const FORWARD: u32 = 1;
const REVERSE: u32 = 2;
const REJECT: u32 = 3;
const OK: u32 = 0;
/// Added to a `DropReason` to tell it apart from a success value.
const FAILED: u32 = 1 << 16;

#[inline(always)]
fn failed(reason: DropReason) -> u32 {
    FAILED + reason as u32
}

#[inline(always)]
fn reason(code: u32) -> DropReason {
    DropReason::from_index(code - FAILED).unwrap_or(DropReason::NatFailed)
}

/// Frontends are looked up in `scope` (`None`: only known connections, for packets that were
/// load-balanced on the node they came from).
#[inline(always)]
pub fn balance(
    ctx: &TcContext,
    meta: &mut IpMeta,
    frontends: Option<u8>,
    node: &NodeConfig,
) -> Result<Lb, DropReason> {
    let scope = frontends.map_or(NO_FRONTENDS, |scope| scope as u32);
    match balance_code(ctx, meta, scope, node) {
        PASS => Ok(Lb::Pass),
        FORWARD => Ok(Lb::Forward),
        REVERSE => Ok(Lb::Reverse),
        REJECT => Ok(Lb::Reject),
        code => Err(reason(code)),
    }
}

const NO_FRONTENDS: u32 = u32::MAX;

#[inline(never)]
fn balance_code(ctx: &TcContext, meta: &mut IpMeta, scope: u32, node: &NodeConfig) -> u32 {
    let icmp_error = meta.proto == IPPROTO_ICMP && meta.quoted.present;
    if !icmp_error && !matches!(meta.proto, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP) {
        return PASS;
    }
    let Some(s) = scratch() else {
        return failed(DropReason::NotConfigured);
    };
    if icmp_error {
        // About a load-balanced connection's packet, on its way back to the client.
        quoted_nat::reply_key(meta, &mut s.key);
        return match SERVICE_NAT.get_ptr(&s.key) {
            // SAFETY: a pointer into the map from a successful lookup, read once.
            Some(entry) if unsafe { (*entry).flags } & nat_flags::REVERSE != 0 => REVERSE,
            _ => PASS,
        };
    }
    flow(meta, &mut s.key);
    if let Some(entry) = SERVICE_NAT.get_ptr_mut(&s.key) {
        // Read only for packets of load-balanced connections: a pod's other packets do not pay
        // for the clock.
        let now = nat_lifetime::now();
        // SAFETY: a pointer into the map from a successful lookup; other CPUs may only make its
        // time fresher. Not copied out: LLVM copies with a memcpy call whose return value the
        // verifier cannot follow.
        let entry = unsafe { &mut *entry };
        if entry.flags & nat_flags::REVERSE != 0 {
            // A reply is translated back however long its connection was quiet.
            nat_lifetime::touch(entry, meta, now);
            return REVERSE;
        }
        if nat_lifetime::fresh(entry, meta.proto, now) || replied_lately(entry, meta, now, s) {
            nat_lifetime::touch(entry, meta, now);
            super::passed(Stage::ServiceLB);
            let code = rewrite(ctx, meta, entry);
            if code != OK {
                return code;
            }
            super::passed(Stage::EndpointDNAT);
            return FORWARD;
        }
        // Quiet in both directions for longer than its timeout: balanced anew below, and its
        // entries overwritten.
    }
    if scope == NO_FRONTENDS {
        return PASS;
    }
    let scope = scope as u8;
    s.frontend = ServiceKey {
        addr: meta.dst,
        port: meta.dst_port,
        proto: meta.proto,
        scope,
    };
    let Some(service) = SERVICES.get_ptr(&s.frontend) else {
        return PASS;
    };
    // SAFETY: as above.
    let service = unsafe { &*service };
    if service.count == 0 {
        return if service.flags & service_flags::NO_LOCAL_ENDPOINTS != 0 {
            failed(DropReason::NoEndpoints)
        } else {
            REJECT
        };
    }
    if !pick(&meta.src, service, &mut s.pick) {
        return failed(DropReason::NoEndpoints);
    }
    let now = nat_lifetime::now();
    super::passed(Stage::ServiceLB);
    // Written field by field into the per-CPU slot: whole-struct temporaries would take stack.
    // A client reaching itself: a pod, or the node reaching a host-network endpoint on itself
    // (from its gateway address, which the node would refuse coming back in as martian). The
    // hairpin address stands in for the client; the node routes it back through the gateway.
    let hairpin = scope == scope::INTERNAL
        && (s.pick.endpoint.addr == meta.src
            || (meta.src == IpKey::v4(node.gateway_ipv4)
                && network_policy::is_host(&s.pick.endpoint.addr)));
    s.entry.src = if meta.src.family != FAMILY_IPV4 {
        meta.src
    } else if hairpin {
        IpKey::v4(HAIRPIN_IPV4)
    } else if service.flags & service_flags::SNAT != 0 {
        IpKey::v4(node.gateway_ipv4)
    } else {
        meta.src
    };
    s.entry.dst = s.pick.endpoint.addr;
    s.entry.src_port = meta.src_port;
    s.entry.dst_port = s.pick.endpoint.port;
    s.entry.flags = nat_lifetime::used(0, meta, now);
    s.reverse_key.src = s.pick.endpoint.addr;
    s.reverse_key.dst = s.entry.src;
    s.reverse_key.src_port = s.pick.endpoint.port;
    s.reverse_key.dst_port = meta.src_port;
    s.reverse_key.proto = meta.proto;
    s.reverse_key._pad = [0; 3];
    if s.entry.src != meta.src && !free_source_port(s, meta) {
        return failed(DropReason::NatFailed);
    }
    s.reverse.src = meta.dst;
    s.reverse.dst = meta.src;
    s.reverse.src_port = meta.dst_port;
    s.reverse.dst_port = meta.src_port;
    let reverse_flags = if scope == scope::EXTERNAL {
        nat_flags::REVERSE | nat_flags::TO_EXTERNAL
    } else {
        nat_flags::REVERSE
    };
    s.reverse.flags = reverse_flags | (now << nat_flags::SEEN_SHIFT);
    // The reverse entry first: a reply must never exist without its way back. A full LRU map
    // evicts its oldest entry; a failed insert leaves the packet to be balanced again.
    let _ = SERVICE_NAT.insert(&s.reverse_key, &s.reverse, 0);
    let _ = SERVICE_NAT.insert(&s.key, &s.entry, 0);
    let code = rewrite(ctx, meta, &s.entry);
    if code != OK {
        return code;
    }
    super::passed(Stage::EndpointDNAT);
    FORWARD
}

/// Whether the connection's reverse entry (its replies) is within its timeout: a connection
/// whose client went quiet while its endpoint kept sending is alive.
#[inline(always)]
fn replied_lately(entry: &NatEntry, meta: &IpMeta, now: u32, s: &mut Scratch) -> bool {
    s.reverse_key = FlowKey::new(
        entry.dst,
        entry.src,
        entry.dst_port,
        entry.src_port,
        meta.proto,
    );
    match SERVICE_NAT.get_ptr(&s.reverse_key) {
        // SAFETY: a pointer into the map from a successful lookup, only read.
        Some(reverse) => nat_lifetime::fresh(unsafe { &*reverse }, meta.proto, now),
        None => false,
    }
}

/// With the source rewritten (SNAT), two clients may bring the same source port to the same
/// endpoint: their replies would be indistinguishable. The client's port is kept when it is
/// free, else a few random ones in the ephemeral range are tried, as conntrack's NAT does.
#[inline(always)]
fn free_source_port(s: &mut Scratch, meta: &IpMeta) -> bool {
    for attempt in 0..SNAT_PORT_ATTEMPTS {
        let taken = match SERVICE_NAT.get_ptr(&s.reverse_key) {
            // SAFETY: a pointer into the map from a successful lookup, only read.
            Some(other) => unsafe {
                (*other).dst != meta.src || (*other).dst_port != meta.src_port
            },
            None => false,
        };
        if !taken {
            return true;
        }
        if attempt + 1 < SNAT_PORT_ATTEMPTS {
            // SAFETY: plain helper call.
            let random = unsafe { bpf_get_prandom_u32() };
            let port = EPHEMERAL_FIRST + (random % EPHEMERAL_COUNT) as u16;
            s.entry.src_port = port;
            s.reverse_key.dst_port = port;
        }
    }
    false
}

const SNAT_PORT_ATTEMPTS: u32 = 8;
const EPHEMERAL_FIRST: u16 = 32_768;
const EPHEMERAL_COUNT: u32 = 28_232;

/// EndpointDNAT undone on a reply: the source becomes the frontend the client talked to (and
/// the destination the client, when its source was rewritten). Returns the entry's `nat_flags`.
#[inline(always)]
pub fn reverse(ctx: &TcContext, meta: &mut IpMeta) -> Result<u32, DropReason> {
    match reverse_code(ctx, meta) {
        code if code >= FAILED => Err(reason(code)),
        flags => Ok(flags),
    }
}

#[inline(never)]
fn reverse_code(ctx: &TcContext, meta: &mut IpMeta) -> u32 {
    let Some(s) = scratch() else {
        return failed(DropReason::NotConfigured);
    };
    let icmp_error = meta.proto == IPPROTO_ICMP;
    if icmp_error {
        quoted_nat::reply_key(meta, &mut s.key);
    } else {
        flow(meta, &mut s.key);
    }
    let Some(entry) = SERVICE_NAT.get_ptr(&s.key) else {
        // Evicted between the two lookups: the packet goes on as it is.
        return 0;
    };
    // SAFETY: a pointer into the map from a successful lookup, only read (see `balance_code`).
    let entry = unsafe { &*entry };
    let code = if icmp_error {
        match quoted_nat::undo(ctx, meta, entry) {
            Ok(()) => OK,
            Err(reason) => failed(reason),
        }
    } else {
        rewrite(ctx, meta, entry)
    };
    if code != OK {
        return code;
    }
    super::passed(Stage::EndpointDNAT);
    entry.flags & nat_flags::MASK
}

/// SessionAffinity (when the Service asks for it), else a uniform pick among the endpoints,
/// into `s.endpoint`. False when the Service has no endpoint.
#[inline(always)]
pub fn pick(client: &IpKey, service: &Service, s: &mut Pick) -> bool {
    if service.count == 0 {
        return false;
    }
    // SAFETY: plain helper calls.
    let (now, random) = unsafe { (bpf_ktime_get_ns(), bpf_get_prandom_u32()) };
    let affine = service.flags & service_flags::AFFINITY != 0;
    if affine {
        s.affinity_key = AffinityKey {
            backend_set: service.backend_set,
            client: *client,
        };
        if let Some(entry) = AFFINITY.get_ptr_mut(&s.affinity_key) {
            // SAFETY: a pointer into the map from a successful lookup.
            let entry = unsafe { &mut *entry };
            let fresh = now.saturating_sub(entry.last_used)
                <= service.affinity_timeout as u64 * 1_000_000_000;
            // An entry whose index now holds another endpoint (scaled, replaced) is stale.
            if fresh && entry.index < service.count && backend(service, entry.index, s) {
                if s.endpoint == entry.endpoint {
                    entry.last_used = now;
                    super::passed(Stage::SessionAffinity);
                    return true;
                }
            }
        }
    }
    let index = random % service.count;
    if !backend(service, index, s) {
        return false;
    }
    if affine {
        s.affinity = AffinityEntry {
            endpoint: s.endpoint,
            index,
            _pad: 0,
            last_used: now,
        };
        let _ = AFFINITY.insert(&s.affinity_key, &s.affinity, 0);
    }
    true
}

/// Endpoint `index` of the Service's set, into `s.endpoint`.
#[inline(always)]
fn backend(service: &Service, index: u32, s: &mut Pick) -> bool {
    let key = BackendKey {
        set: service.backend_set,
        index,
    };
    match BACKENDS.get_ptr(&key) {
        Some(endpoint) => {
            // SAFETY: a pointer into the map from a successful lookup.
            let endpoint = unsafe { &*endpoint };
            s.endpoint.addr = endpoint.addr;
            s.endpoint.port = endpoint.port;
            true
        }
        None => false,
    }
}

#[inline(always)]
fn flow(meta: &IpMeta, key: &mut FlowKey) {
    *key = FlowKey::new(meta.src, meta.dst, meta.src_port, meta.dst_port, meta.proto);
}

pub(super) const IPV4_CSUM: usize = ETH_HLEN + 10;
const IPV4_SRC: usize = ETH_HLEN + 12;
pub(super) const IPV4_DST: usize = ETH_HLEN + 16;
const IPV6_SRC: usize = ETH_HLEN + 8;
const IPV6_DST: usize = ETH_HLEN + 24;

/// Rewrites the packet's addresses and ports to `to`'s, field by field, and `meta` with them.
/// Out of line: one copy for both directions, with a stack frame of its own.
#[inline(never)]
fn rewrite(ctx: &TcContext, meta: &mut IpMeta, to: &NatEntry) -> u32 {
    match rewrite_fields(ctx, meta, to) {
        Ok(()) => OK,
        Err(reason) => failed(reason),
    }
}

#[inline(always)]
fn rewrite_fields(ctx: &TcContext, meta: &mut IpMeta, to: &NatEntry) -> Result<(), DropReason> {
    let l4 = meta.l4_offset as usize;
    // Offset of the L4 checksum, and whether a zero one means "none" (UDP over IPv4). SCTP's
    // CRC32c covers neither addresses nor a pseudo-header, so only its ports would need it: a
    // port-changing SCTP Service is not supported. A later fragment has no L4 header: the
    // first fragment's checksum update covered the whole datagram.
    let csum = match meta.proto {
        _ if meta.later_fragment => None,
        IPPROTO_TCP => Some((l4 + 16, 0)),
        IPPROTO_UDP => Some((l4 + 6, BPF_F_MARK_MANGLED_0 as u64)),
        _ => None,
    };
    if meta.src != to.src {
        address(
            ctx,
            meta.src.family,
            IPV4_SRC,
            IPV6_SRC,
            &meta.src,
            &to.src,
            csum,
        )?;
        meta.src = to.src;
    }
    if meta.dst != to.dst {
        address(
            ctx,
            meta.dst.family,
            IPV4_DST,
            IPV6_DST,
            &meta.dst,
            &to.dst,
            csum,
        )?;
        meta.dst = to.dst;
    }
    if meta.src_port != to.src_port {
        if !meta.later_fragment {
            port(ctx, l4, meta.src_port, to.src_port, csum)?;
        }
        meta.src_port = to.src_port;
    }
    if meta.dst_port != to.dst_port {
        if !meta.later_fragment {
            port(ctx, l4 + 2, meta.dst_port, to.dst_port, csum)?;
        }
        meta.dst_port = to.dst_port;
    }
    Ok(())
}

#[inline(always)]
fn address(
    ctx: &TcContext,
    family: u8,
    v4_offset: usize,
    v6_offset: usize,
    old: &IpKey,
    new: &IpKey,
    csum: Option<(usize, u64)>,
) -> Result<(), DropReason> {
    let failed = |_| DropReason::NatFailed;
    if family == FAMILY_IPV4 {
        let old = u32::from_ne_bytes([old.addr[0], old.addr[1], old.addr[2], old.addr[3]]);
        let new = u32::from_ne_bytes([new.addr[0], new.addr[1], new.addr[2], new.addr[3]]);
        if let Some((offset, zero)) = csum {
            let flags = BPF_F_PSEUDO_HDR as u64 | zero | 4;
            ctx.l4_csum_replace(offset, old as u64, new as u64, flags)
                .map_err(failed)?;
        }
        ctx.l3_csum_replace(IPV4_CSUM, old as u64, new as u64, 4)
            .map_err(failed)?;
        ctx.store(v4_offset, &new, 0).map_err(failed)
    } else {
        // IPv6 has no header checksum; the L4 one takes the difference of the two addresses.
        if let Some((offset, zero)) = csum {
            let mut from = old.addr;
            let mut to = new.addr;
            // SAFETY: both buffers are 16 bytes on this stack frame.
            let diff = unsafe {
                bpf_csum_diff(
                    from.as_mut_ptr() as *mut u32,
                    16,
                    to.as_mut_ptr() as *mut u32,
                    16,
                    0,
                )
            };
            if diff < 0 {
                return Err(DropReason::NatFailed);
            }
            let flags = BPF_F_PSEUDO_HDR as u64 | zero;
            ctx.l4_csum_replace(offset, 0, diff as u64, flags)
                .map_err(failed)?;
        }
        ctx.store(v6_offset, &new.addr, 0).map_err(failed)
    }
}

#[inline(always)]
fn port(
    ctx: &TcContext,
    offset: usize,
    old: u16,
    new: u16,
    csum: Option<(usize, u64)>,
) -> Result<(), DropReason> {
    let failed = |_| DropReason::NatFailed;
    let (old, new) = (old.to_be(), new.to_be());
    if let Some((csum_offset, zero)) = csum {
        ctx.l4_csum_replace(csum_offset, old as u64, new as u64, zero | 2)
            .map_err(failed)?;
    }
    ctx.store(offset, &new, 0).map_err(failed)
}
