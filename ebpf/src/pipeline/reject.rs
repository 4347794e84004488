//! ServiceLB's answer for a Service without endpoints, as Antrea and kube-proxy give it: a TCP
//! reset, or an ICMP port unreachable for UDP, sent back out of the port the packet came in on,
//! so the client fails at once instead of waiting for a timeout. The packet is rewritten in
//! place into the answer. IPv4 without IP options only; anything else is dropped.

use aya_ebpf::{
    helpers::{bpf_redirect, bpf_skb_change_tail, bpf_skb_load_bytes},
    programs::TcContext,
};
use sluice_common::{DropReason, Stage, FAMILY_IPV4};

use crate::REJECT_SCRATCH;

use super::classifier::{
    IpMeta, ETH_HLEN, IPPROTO_TCP, IPPROTO_UDP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN,
};

const IP: usize = ETH_HLEN;
const IP_LEN: usize = 20;
const L4: usize = IP + IP_LEN;
const TCP_LEN: usize = 20;
const UDP_LEN: usize = 8;
const ICMP_LEN: usize = 8;
const IPPROTO_ICMP: u8 = 1;

/// The packet read and the answer built: in a per-CPU slot, as the BPF stack has no room.
pub struct Scratch {
    frame: [u8; L4 + TCP_LEN],
    tcp: [u8; L4 + TCP_LEN],
    icmp: [u8; L4 + ICMP_LEN + IP_LEN + UDP_LEN],
}

#[inline(never)]
pub fn answer(ctx: &TcContext, meta: &IpMeta) -> Result<i32, DropReason> {
    // A later fragment: its first fragment got the answer.
    if meta.src.family != FAMILY_IPV4 || meta.l4_offset as usize != L4 || meta.later_fragment {
        return Err(DropReason::NoEndpoints);
    }
    let s = match REJECT_SCRATCH.get_ptr_mut(0) {
        // SAFETY: the slot belongs to this CPU for the whole run of the program.
        Some(slot) => unsafe { &mut *slot },
        None => return Err(DropReason::NotConfigured),
    };
    match meta.proto {
        IPPROTO_TCP if meta.tcp_flags & TCP_RST == 0 => tcp_reset(ctx, s)?,
        IPPROTO_UDP => port_unreachable(ctx, s)?,
        _ => return Err(DropReason::NoEndpoints),
    }
    // The packet itself goes no further: counted as dropped, whatever it was answered with.
    super::metrics::count_drop(DropReason::NoEndpoints);
    super::passed(Stage::Output);
    // SAFETY: plain helper call; the egress of the port the packet came in on takes the answer
    // back to the sender.
    Ok(unsafe { bpf_redirect(super::ingress_ifindex(ctx), 0) } as i32)
}

/// RFC 9293's reset for a segment that reached no connection: the sequence number the segment
/// acknowledged, or else 0 acknowledging everything the segment carried.
#[inline(always)]
fn tcp_reset(ctx: &TcContext, s: &mut Scratch) -> Result<(), DropReason> {
    load(ctx, &mut s.frame, L4 + TCP_LEN)?;
    let frame = &s.frame;
    let ip_total = u16::from_be_bytes([frame[IP + 2], frame[IP + 3]]) as u32;
    let tcp = &frame[L4..];
    let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    let flags = tcp[13];
    let payload = ip_total.saturating_sub((IP_LEN + (tcp[12] >> 4) as usize * 4) as u32);
    let (reply_seq, reply_ack, reply_flags) = if flags & TCP_ACK != 0 {
        (
            u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]),
            0,
            TCP_RST,
        )
    } else {
        let consumed = payload + (flags & TCP_SYN != 0) as u32 + (flags & TCP_FIN != 0) as u32;
        (0, seq.wrapping_add(consumed), TCP_RST | TCP_ACK)
    };
    let out = &mut s.tcp;
    *out = [0; L4 + TCP_LEN];
    ethernet_back(frame, out);
    ip_back(frame, out, IPPROTO_TCP, (IP_LEN + TCP_LEN) as u16);
    let t = L4;
    out[t..t + 2].copy_from_slice(&frame[L4 + 2..L4 + 4]);
    out[t + 2..t + 4].copy_from_slice(&frame[L4..L4 + 2]);
    out[t + 4..t + 8].copy_from_slice(&reply_seq.to_be_bytes());
    out[t + 8..t + 12].copy_from_slice(&reply_ack.to_be_bytes());
    out[t + 12] = (TCP_LEN as u8 / 4) << 4;
    out[t + 13] = reply_flags;
    let mut sum = pseudo_header(out, IPPROTO_TCP, TCP_LEN as u16);
    sum = add_words(sum, &out[t..t + TCP_LEN]);
    out[t + 16..t + 18].copy_from_slice(&fold(sum).to_be_bytes());
    write(ctx, out)
}

/// ICMP destination unreachable (port) quoting the datagram's IP header and first 8 bytes.
#[inline(always)]
fn port_unreachable(ctx: &TcContext, s: &mut Scratch) -> Result<(), DropReason> {
    load(ctx, &mut s.frame, L4 + UDP_LEN)?;
    let frame = &s.frame;
    let out = &mut s.icmp;
    *out = [0; L4 + ICMP_LEN + IP_LEN + UDP_LEN];
    ethernet_back(frame, out);
    let icmp_len = ICMP_LEN + IP_LEN + UDP_LEN;
    ip_back(frame, out, IPPROTO_ICMP, (IP_LEN + icmp_len) as u16);
    out[L4] = 3; // destination unreachable
    out[L4 + 1] = 3; // port unreachable
    out[L4 + ICMP_LEN..].copy_from_slice(&frame[IP..L4 + UDP_LEN]);
    let sum = add_words(0, &out[L4..]);
    out[L4 + 2..L4 + 4].copy_from_slice(&fold(sum).to_be_bytes());
    write(ctx, out)
}

/// The answer goes back to where the packet came from: the MACs swap.
#[inline(always)]
fn ethernet_back(frame: &[u8], out: &mut [u8]) {
    out[0..6].copy_from_slice(&frame[6..12]);
    out[6..12].copy_from_slice(&frame[0..6]);
    out[12..14].copy_from_slice(&frame[12..14]);
}

/// An IPv4 header from the packet's destination (the frontend) to its source.
#[inline(always)]
fn ip_back(frame: &[u8], out: &mut [u8], proto: u8, total: u16) {
    out[IP] = 0x45;
    out[IP + 2..IP + 4].copy_from_slice(&total.to_be_bytes());
    out[IP + 6] = 0x40; // don't fragment
    out[IP + 8] = 64;
    out[IP + 9] = proto;
    out[IP + 12..IP + 16].copy_from_slice(&frame[IP + 16..IP + 20]);
    out[IP + 16..IP + 20].copy_from_slice(&frame[IP + 12..IP + 16]);
    let sum = add_words(0, &out[IP..IP + IP_LEN]);
    out[IP + 10..IP + 12].copy_from_slice(&fold(sum).to_be_bytes());
}

#[inline(always)]
fn pseudo_header(out: &[u8], proto: u8, len: u16) -> u32 {
    let sum = add_words(0, &out[IP + 12..IP + 20]);
    sum + proto as u32 + len as u32
}

/// The one's-complement sum of big-endian 16-bit words (RFC 1071), unfolded.
#[inline(always)]
fn add_words(mut sum: u32, bytes: &[u8]) -> u32 {
    let mut i = 0;
    while i + 1 < bytes.len() {
        sum += u16::from_be_bytes([bytes[i], bytes[i + 1]]) as u32;
        i += 2;
    }
    sum
}

#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// The frame's first `len` bytes (a constant: the verifier wants a known size).
#[inline(always)]
fn load(ctx: &TcContext, into: &mut [u8; L4 + TCP_LEN], len: usize) -> Result<(), DropReason> {
    // SAFETY: `into` holds at least `len` bytes.
    let ret = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb as *const _,
            0,
            into.as_mut_ptr() as *mut _,
            len as u32,
        )
    };
    if ret != 0 {
        return Err(DropReason::Truncated);
    }
    Ok(())
}

/// Sizes the packet to the answer and writes it over.
#[inline(always)]
fn write<const N: usize>(ctx: &TcContext, out: &[u8; N]) -> Result<(), DropReason> {
    // SAFETY: plain helper call on the program's own packet.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, N as u32, 0) } != 0 {
        return Err(DropReason::NoEndpoints);
    }
    ctx.store(0, out, 0).map_err(|_| DropReason::NoEndpoints)
}
