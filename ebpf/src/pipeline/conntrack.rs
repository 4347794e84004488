//! ConntrackState: connections of isolated pods. One entry per connection, under a canonical key
//! (lower address and port first) so that both directions find it; an entry that outlived its
//! timeout (by protocol and TCP state) counts as absent, and the LRU map makes room by itself.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use sluice_common::{ct_flags, ct_timeout, CtEntry, CtKey, DropReason, IpKey, Stage};

use super::{
    classifier::{IpMeta, IPPROTO_TCP, IPPROTO_UDP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    metrics,
};
use crate::CONNTRACK;

#[inline(always)]
fn key(meta: &IpMeta) -> (CtKey, bool) {
    key_of(
        &meta.src,
        &meta.dst,
        meta.src_port,
        meta.dst_port,
        meta.proto,
    )
}

#[inline(always)]
fn key_of(src: &IpKey, dst: &IpKey, src_port: u16, dst_port: u16, proto: u8) -> (CtKey, bool) {
    let src_first = (src.addr, src_port) <= (dst.addr, dst_port);
    let (lo, hi, lo_port, hi_port) = if src_first {
        (*src, *dst, src_port, dst_port)
    } else {
        (*dst, *src, dst_port, src_port)
    };
    let key = CtKey {
        lo,
        hi,
        lo_port,
        hi_port,
        proto,
        _pad: [0; 3],
    };
    (key, src_first)
}

/// An ICMP error about a live tracked connection is related traffic: it passes as the
/// connection does (path MTU discovery, port unreachable, time exceeded), unjudged.
#[inline(always)]
pub fn related(meta: &IpMeta) -> bool {
    let q = &meta.quoted;
    if !q.present {
        return false;
    }
    let (key, _) = key_of(&q.src, &q.dst, q.src_port, q.dst_port, q.proto);
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    match CONNTRACK.get_ptr(&key) {
        // SAFETY: a pointer into the map from a successful lookup, read once.
        Some(entry) => unsafe {
            now.saturating_sub((*entry).last_seen) <= timeout(q.proto, (*entry).flags)
        },
        None => false,
    }
}

#[inline(always)]
fn timeout(proto: u8, flags: u32) -> u64 {
    match proto {
        IPPROTO_TCP if flags & ct_flags::CLOSING != 0 => ct_timeout::TCP_CLOSING,
        IPPROTO_TCP if flags & ct_flags::SYN_ACK != 0 => ct_timeout::TCP_ESTABLISHED,
        IPPROTO_TCP => ct_timeout::TCP_OPENING,
        IPPROTO_UDP => ct_timeout::UDP,
        _ => ct_timeout::OTHER,
    }
}

#[inline(always)]
fn tcp_flags(meta: &IpMeta) -> u32 {
    let mut flags = 0;
    if meta.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK {
        flags |= ct_flags::SYN_ACK;
    }
    if meta.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        flags |= ct_flags::CLOSING;
    }
    flags
}

/// An established connection passes (its rules are counted); a new one is judged by `judge`,
/// which returns the allowing (egress rule, ingress rule), and is remembered if allowed.
#[inline(always)]
pub fn track(
    meta: &IpMeta,
    judge: impl FnOnce() -> Result<(u32, u32), DropReason>,
) -> Result<(), DropReason> {
    let (key, src_is_lo) = key(meta);
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(entry) = CONNTRACK.get_ptr_mut(&key) {
        // SAFETY: a pointer into the map from a successful lookup; concurrent writers on other
        // CPUs can only make the timestamps and flags fresher.
        let entry = unsafe { &mut *entry };
        if now.saturating_sub(entry.last_seen) <= timeout(meta.proto, entry.flags) {
            entry.last_seen = now;
            entry.flags |= tcp_flags(meta);
            metrics::count_rule(entry.egress_rule, meta.len);
            metrics::count_rule(entry.ingress_rule, meta.len);
            super::passed(Stage::ConntrackState);
            return Ok(());
        }
    }
    let (egress_rule, ingress_rule) = judge()?;
    let from_lo = if src_is_lo { ct_flags::FROM_LO } else { 0 };
    let entry = CtEntry {
        last_seen: now,
        flags: from_lo | tcp_flags(meta),
        egress_rule,
        ingress_rule,
        _pad: 0,
    };
    // A full LRU evicts the oldest entry; a failed insert only means the next packet is judged
    // again, which the policy allows just the same.
    let _ = CONNTRACK.insert(&key, &entry, 0);
    metrics::count_rule(egress_rule, meta.len);
    metrics::count_rule(ingress_rule, meta.len);
    Ok(())
}
