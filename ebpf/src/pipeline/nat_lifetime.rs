//! How long a SERVICE_NAT entry lives: like a conntrack entry, by protocol and TCP state
//! (`ct_timeout`). A connection's DNAT entry that outlived its timeout, while its reverse entry
//! did too, counts as absent: the next packet is balanced anew. An entry records when it was
//! last used in the upper bits of its flags (`nat_flags::SEEN_SHIFT`), rewritten at most once a
//! tick, so a busy connection does not write its entry on every packet.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use sluice_common::{ct_timeout, nat_flags, NatEntry};

use super::classifier::{IpMeta, IPPROTO_TCP, IPPROTO_UDP, TCP_ACK, TCP_FIN, TCP_RST};

const TICK_SHIFT: u32 = 30;
const TICKS: u32 = 1 << (32 - nat_flags::SEEN_SHIFT);

/// The current tick, as entries record it.
#[inline(always)]
pub fn now() -> u32 {
    // SAFETY: plain helper call.
    ((unsafe { bpf_ktime_get_ns() } >> TICK_SHIFT) as u32) % TICKS
}

/// Whether the entry is within its timeout at tick `now`.
#[inline(always)]
pub fn fresh(entry: &NatEntry, proto: u8, now: u32) -> bool {
    let seen = entry.flags >> nat_flags::SEEN_SHIFT;
    // An entry of an agent that kept no time: fresh, and timed from its next packet on, so an
    // upgrade does not rebalance every connection.
    if seen == 0 {
        return true;
    }
    let age = now.wrapping_sub(seen) % TICKS;
    let timeout = match proto {
        IPPROTO_TCP if entry.flags & nat_flags::CLOSING != 0 => ct_timeout::TCP_CLOSING,
        IPPROTO_TCP if entry.flags & nat_flags::ESTABLISHED != 0 => ct_timeout::TCP_ESTABLISHED,
        IPPROTO_TCP => ct_timeout::TCP_OPENING,
        IPPROTO_UDP => ct_timeout::UDP,
        _ => ct_timeout::OTHER,
    };
    // Rounded up: an entry used within the timeout is never taken for expired.
    age <= (timeout >> TICK_SHIFT) as u32 + 1
}

/// `flags` (of an entry, or of one being made) after a packet of `meta` used it at `now`.
#[inline(always)]
pub fn used(flags: u32, meta: &IpMeta, now: u32) -> u32 {
    let mut kept = flags & nat_flags::MASK;
    if meta.proto == IPPROTO_TCP {
        if meta.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
            kept |= nat_flags::CLOSING;
        } else if meta.tcp_flags & TCP_ACK != 0 {
            kept |= nat_flags::ESTABLISHED;
        }
    }
    kept | (now << nat_flags::SEEN_SHIFT)
}

/// Records the packet in the entry, writing only what changed.
#[inline(always)]
pub fn touch(entry: &mut NatEntry, meta: &IpMeta, now: u32) {
    let flags = used(entry.flags, meta, now);
    if flags != entry.flags {
        entry.flags = flags;
    }
}
