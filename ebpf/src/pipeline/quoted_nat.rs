//! EndpointDNAT undone inside an ICMP error. An error about a load-balanced connection's packet
//! (fragmentation needed on the way to the endpoint, say) quotes the packet as the endpoint's
//! side saw it, but the client's socket knows the connection by the Service's address: the
//! quoted addresses and ports become the client's view, as conntrack's NAT does for ICMP. IPv4
//! errors; an ICMPv6 error passes as it is.

use aya_ebpf::programs::TcContext;
use sluice_common::{DropReason, FlowKey, IpKey, NatEntry, FAMILY_IPV4};

use super::{
    classifier::IpMeta,
    service_lb::{IPV4_CSUM, IPV4_DST},
};

/// The flow of the quoted packet's replies: the connection's reverse SERVICE_NAT key.
#[inline(always)]
pub fn reply_key(meta: &IpMeta, key: &mut FlowKey) {
    let q = &meta.quoted;
    *key = FlowKey {
        src: q.dst,
        dst: q.src,
        src_port: q.dst_port,
        dst_port: q.src_port,
        proto: q.proto,
        _pad: [0; 3],
    };
}

/// `entry` rewrites a reply (endpoint → client as the endpoint knows it) to the client's view
/// (frontend → client). The quoted packet went the other way: its source becomes `entry.dst`
/// (as does the error's destination, which was that source), its destination `entry.src`.
/// The quoted IPv4 header's checksum is kept right, so its bytes change the ICMP checksum by
/// nothing; only the quoted ports need it updated. The quoted L4 checksum is left as it was
/// (no receiver checks it; the quote may not even hold it).
#[inline(always)]
pub fn undo(ctx: &TcContext, meta: &mut IpMeta, entry: &NatEntry) -> Result<(), DropReason> {
    if meta.src.family != FAMILY_IPV4 || meta.quoted.src.family != FAMILY_IPV4 {
        return Ok(());
    }
    let ip = meta.quoted.ip_offset as usize;
    let l4 = meta.quoted.l4_offset as usize;
    let icmp_csum = meta.l4_offset as usize + 2;
    if meta.quoted.src != entry.dst {
        if meta.dst == meta.quoted.src {
            replace_address(ctx, IPV4_DST, IPV4_CSUM, &meta.dst, &entry.dst)?;
            meta.dst = entry.dst;
        }
        replace_address(ctx, ip + 12, ip + 10, &meta.quoted.src, &entry.dst)?;
        meta.quoted.src = entry.dst;
    }
    if meta.quoted.dst != entry.src {
        replace_address(ctx, ip + 16, ip + 10, &meta.quoted.dst, &entry.src)?;
        meta.quoted.dst = entry.src;
    }
    if meta.quoted.src_port != entry.dst_port {
        replace_port(ctx, l4, icmp_csum, meta.quoted.src_port, entry.dst_port)?;
        meta.quoted.src_port = entry.dst_port;
    }
    if meta.quoted.dst_port != entry.src_port {
        replace_port(ctx, l4 + 2, icmp_csum, meta.quoted.dst_port, entry.src_port)?;
        meta.quoted.dst_port = entry.src_port;
    }
    Ok(())
}

/// An IPv4 address at `offset`, and the header checksum at `csum` that covers it.
#[inline(always)]
fn replace_address(
    ctx: &TcContext,
    offset: usize,
    csum: usize,
    old: &IpKey,
    new: &IpKey,
) -> Result<(), DropReason> {
    let failed = |_| DropReason::NatFailed;
    let old = u32::from_ne_bytes([old.addr[0], old.addr[1], old.addr[2], old.addr[3]]);
    let new = u32::from_ne_bytes([new.addr[0], new.addr[1], new.addr[2], new.addr[3]]);
    ctx.l3_csum_replace(csum, old as u64, new as u64, 4)
        .map_err(failed)?;
    ctx.store(offset, &new, 0).map_err(failed)
}

/// A quoted port, and the ICMP checksum (no pseudo-header) over it.
#[inline(always)]
fn replace_port(
    ctx: &TcContext,
    offset: usize,
    icmp_csum: usize,
    old: u16,
    new: u16,
) -> Result<(), DropReason> {
    let failed = |_| DropReason::NatFailed;
    let (old, new) = (old.to_be(), new.to_be());
    ctx.l4_csum_replace(icmp_csum, old as u64, new as u64, 2)
        .map_err(failed)?;
    ctx.store(offset, &new, 0).map_err(failed)
}
