//! Classifier: parses the frame once. Later stages read `IpMeta` / `ArpMeta`, not the packet.

use core::mem::size_of;

use aya_ebpf::programs::TcContext;

use crate::{FRAGMENTS, META};
use sluice_common::{DropReason, FragKey, FragPorts, IpKey, Stage};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_HLEN: usize = size_of::<EthHdr>();

#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    /// Big-endian EtherType.
    pub proto: u16,
}

#[repr(C)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    pub frag_off: u16,
    pub ttl: u8,
    pub protocol: u8,
    pub check: u16,
    pub src: [u8; 4],
    pub dst: [u8; 4],
}

#[repr(C)]
pub struct Ipv6Hdr {
    pub version_tc_flow: [u8; 4],
    pub payload_len: u16,
    pub next_header: u8,
    pub hop_limit: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
}

/// ARP for IPv4 over Ethernet, the only kind pods send.
#[repr(C)]
pub struct ArpHdr {
    pub htype: u16,
    pub ptype: u16,
    pub hlen: u8,
    pub plen: u8,
    pub oper: u16,
    pub sha: [u8; 6],
    pub spa: [u8; 4],
    pub tha: [u8; 6],
    pub tpa: [u8; 4],
}

pub const ARP_REQUEST: u16 = 1;
pub const ARP_REPLY: u16 = 2;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_SCTP: u8 = 132;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

pub struct IpMeta {
    pub src_mac: [u8; 6],
    pub src: IpKey,
    pub dst: IpKey,
    /// IP protocol; ports are 0 for protocols without them. An IPv4 fragment after the first
    /// has the ports of its datagram's first fragment.
    pub proto: u8,
    pub src_port: u16,
    pub dst_port: u16,
    pub tcp_flags: u8,
    /// Total length of the frame, for the byte counters.
    pub len: u32,
    /// Where the L4 header starts (meaningful when the ports are).
    pub l4_offset: u32,
    /// An IPv4 fragment after the first: no L4 header in this packet, nothing there to rewrite.
    pub later_fragment: bool,
    /// For an ICMP error, the packet it quotes.
    pub quoted: Quoted,
}

/// The packet an ICMP error (destination unreachable, time exceeded, parameter problem, and
/// ICMPv6's packet too big) quotes: its connection is the one the error belongs to.
pub struct Quoted {
    /// False when the packet is no ICMP error, or quotes too little to tell the connection.
    pub present: bool,
    pub src: IpKey,
    pub dst: IpKey,
    pub proto: u8,
    pub src_port: u16,
    pub dst_port: u16,
    /// Where the quoted IP header and its L4 header start.
    pub ip_offset: u32,
    pub l4_offset: u32,
}

impl Quoted {
    const NONE: Quoted = Quoted {
        present: false,
        src: IpKey::UNSPECIFIED,
        dst: IpKey::UNSPECIFIED,
        proto: 0,
        src_port: 0,
        dst_port: 0,
        ip_offset: 0,
        l4_offset: 0,
    };
}

pub struct ArpMeta {
    pub src_mac: [u8; 6],
    pub oper: u16,
    pub sender_mac: [u8; 6],
    pub sender_ip: [u8; 4],
    pub target_ip: [u8; 4],
}

pub enum Packet {
    Ip(&'static mut IpMeta),
    Arp(ArpMeta),
}

/// A bounds-checked pointer into the linear packet data.
#[inline(always)]
pub fn ptr_at<T>(ctx: &TcContext, offset: usize) -> Result<*mut T, DropReason> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return Err(DropReason::Truncated);
    }
    Ok((start + offset) as *mut T)
}

/// The longest header chain any stage reads: Ethernet + IPv6.
const HEADERS_LEN: u32 = (ETH_HLEN + size_of::<Ipv6Hdr>()) as u32;

#[inline(always)]
pub fn classify(ctx: &TcContext) -> Result<Packet, DropReason> {
    make_headers_linear(ctx);
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    // SAFETY: `ptr_at` checked the header lies inside the packet.
    let (proto, src_mac) = unsafe { (u16::from_be((*eth).proto), (*eth).src) };
    let packet = match proto {
        ETH_P_IP => Packet::Ip(ipv4(ctx, src_mac)?),
        ETH_P_IPV6 => Packet::Ip(ipv6(ctx, src_mac)?),
        ETH_P_ARP => Packet::Arp(arp(ctx, src_mac)?),
        _ => return Err(DropReason::UnsupportedEtherType),
    };
    super::passed(Stage::Classifier);
    Ok(packet)
}

/// Direct packet access sees only the linear part of the skb; a sender may hand over headers in
/// fragments. Pull only when needed: pulling a cloned skb copies it.
#[inline(always)]
fn make_headers_linear(ctx: &TcContext) {
    let linear = (ctx.data_end() - ctx.data()) as u32;
    let want = if ctx.len() < HEADERS_LEN {
        ctx.len()
    } else {
        HEADERS_LEN
    };
    if linear < want {
        // On failure the bounds checks below report the packet as truncated.
        let _ = ctx.pull_data(want);
    }
}

/// The packet's metadata lives in a per-CPU slot, not on the 512-byte BPF stack that the
/// Service and security stages need for their keys. One program runs at a time per CPU.
#[inline(always)]
fn scratch() -> Result<&'static mut IpMeta, DropReason> {
    match META.get_ptr_mut(0) {
        // SAFETY: the slot belongs to this CPU for the whole run of the program.
        Some(meta) => Ok(unsafe { &mut *meta }),
        None => Err(DropReason::NotConfigured),
    }
}

#[inline(always)]
fn ipv4(ctx: &TcContext, src_mac: [u8; 6]) -> Result<&'static mut IpMeta, DropReason> {
    let ip = ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN)?;
    // SAFETY: bounds checked by `ptr_at`.
    let (version_ihl, tot_len, src, dst) = unsafe {
        (
            (*ip).version_ihl,
            u16::from_be((*ip).tot_len),
            (*ip).src,
            (*ip).dst,
        )
    };
    let header_len = ((version_ihl & 0x0f) as usize) * 4;
    if version_ihl >> 4 != 4 || header_len < size_of::<Ipv4Hdr>() {
        return Err(DropReason::Malformed);
    }
    let datagram = ip_length(ctx, tot_len, 0);
    if datagram < header_len {
        return Err(DropReason::Malformed);
    }
    // The datagram must be all there: the receiver would drop what its length says is cut
    // short, after this node had judged it and kept state for it.
    if (ctx.len() as usize).saturating_sub(ETH_HLEN) < datagram {
        return Err(DropReason::Truncated);
    }
    // SAFETY: bounds checked by `ptr_at` above.
    let (proto, frag_off, id) = unsafe { ((*ip).protocol, u16::from_be((*ip).frag_off), (*ip).id) };
    let meta = scratch()?;
    *meta = IpMeta {
        src_mac,
        src: IpKey::v4(src),
        dst: IpKey::v4(dst),
        proto,
        src_port: 0,
        dst_port: 0,
        tcp_flags: 0,
        len: ctx.len(),
        l4_offset: (ETH_HLEN + (header_len & 0x3c)) as u32,
        later_fragment: false,
        quoted: Quoted::NONE,
    };
    if frag_off & IP_OFFSET == 0 {
        l4(
            ctx,
            meta,
            ETH_HLEN + (header_len & 0x3c),
            datagram - header_len,
        )?;
        if frag_off & IP_MORE_FRAGMENTS != 0 && has_ports(proto) {
            let ports = FragPorts {
                src_port: meta.src_port,
                dst_port: meta.dst_port,
            };
            // A full LRU makes room by itself; a failed insert only drops the later fragments.
            let _ = FRAGMENTS.insert(&fragment_key(src, dst, id, proto), &ports, 0);
        }
    } else {
        // No L4 header: the datagram's ports are those its first fragment carried, so every
        // fragment meets the same Service and the same policy as the first.
        meta.later_fragment = true;
        if has_ports(proto) {
            match FRAGMENTS.get_ptr(&fragment_key(src, dst, id, proto)) {
                // SAFETY: a pointer into the map from a successful lookup, read once.
                Some(ports) => unsafe {
                    meta.src_port = (*ports).src_port;
                    meta.dst_port = (*ports).dst_port;
                },
                None => return Err(DropReason::FragmentWithoutFirst),
            }
        }
    }
    Ok(meta)
}

const IP_MORE_FRAGMENTS: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;

#[inline(always)]
fn has_ports(proto: u8) -> bool {
    matches!(proto, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP)
}

#[inline(always)]
fn fragment_key(src: [u8; 4], dst: [u8; 4], id: u16, proto: u8) -> FragKey {
    FragKey {
        src,
        dst,
        id,
        proto,
        _pad: 0,
    }
}

#[inline(always)]
fn ipv6(ctx: &TcContext, src_mac: [u8; 6]) -> Result<&'static mut IpMeta, DropReason> {
    let ip = ptr_at::<Ipv6Hdr>(ctx, ETH_HLEN)?;
    // SAFETY: bounds checked by `ptr_at`.
    let (version, payload_len, next, src, dst) = unsafe {
        (
            (*ip).version_tc_flow[0] >> 4,
            u16::from_be((*ip).payload_len),
            (*ip).next_header,
            (*ip).src,
            (*ip).dst,
        )
    };
    if version != 6 {
        return Err(DropReason::Malformed);
    }
    let header = size_of::<Ipv6Hdr>();
    let payload = ip_length(ctx, payload_len, header) - header;
    if (ctx.len() as usize) < ETH_HLEN + header + payload {
        return Err(DropReason::Truncated);
    }
    let meta = scratch()?;
    *meta = IpMeta {
        src_mac,
        src: IpKey::v6(src),
        dst: IpKey::v6(dst),
        proto: next,
        src_port: 0,
        dst_port: 0,
        tcp_flags: 0,
        len: ctx.len(),
        l4_offset: (ETH_HLEN + size_of::<Ipv6Hdr>()) as u32,
        later_fragment: false,
        quoted: Quoted::NONE,
    };
    // Extension headers are not walked: such packets are classified without ports.
    l4(ctx, meta, ETH_HLEN + size_of::<Ipv6Hdr>(), payload)?;
    Ok(meta)
}

#[inline(always)]
fn arp(ctx: &TcContext, src_mac: [u8; 6]) -> Result<ArpMeta, DropReason> {
    let arp = ptr_at::<ArpHdr>(ctx, ETH_HLEN)?;
    // SAFETY: bounds checked by `ptr_at`.
    let a = unsafe { &*arp };
    if u16::from_be(a.htype) != 1 || u16::from_be(a.ptype) != ETH_P_IP || a.hlen != 6 || a.plen != 4
    {
        return Err(DropReason::Malformed);
    }
    Ok(ArpMeta {
        src_mac,
        oper: u16::from_be(a.oper),
        sender_mac: a.sha,
        sender_ip: a.spa,
        target_ip: a.tpa,
    })
}

/// The length of the IP datagram whose header says `claimed` (IPv4's total length, or IPv6's
/// payload length after the `fixed` header). A BIG TCP packet (over 64 KiB) says 0, as the
/// kernel writes it: its length is the frame's.
#[inline(always)]
fn ip_length(ctx: &TcContext, claimed: u16, fixed: usize) -> usize {
    let frame = (ctx.len() as usize).saturating_sub(ETH_HLEN);
    if claimed == 0 && frame > 0xffff {
        frame
    } else {
        fixed + claimed as usize
    }
}

/// The shortest header of each protocol whose ports the Classifier reads.
#[inline(always)]
fn l4_header_len(proto: u8) -> usize {
    match proto {
        IPPROTO_TCP => 20,
        IPPROTO_UDP => 8,
        IPPROTO_SCTP => 12,
        _ => 0,
    }
}

/// Ports (and TCP flags) of TCP, UDP and SCTP, which all start with source and destination port,
/// from a header that must fit in the `available` bytes the IP header says follow it. Read with
/// `bpf_skb_load_bytes`: the offset varies with IPv4 options and the L4 header may sit beyond
/// the linear part.
#[inline(always)]
fn l4(
    ctx: &TcContext,
    meta: &mut IpMeta,
    offset: usize,
    available: usize,
) -> Result<(), DropReason> {
    if available < l4_header_len(meta.proto) {
        return Err(DropReason::Truncated);
    }
    match meta.proto {
        IPPROTO_TCP => {
            let head: [u8; 14] = ctx.load(offset).map_err(|_| DropReason::Truncated)?;
            meta.src_port = u16::from_be_bytes([head[0], head[1]]);
            meta.dst_port = u16::from_be_bytes([head[2], head[3]]);
            meta.tcp_flags = head[13];
        }
        IPPROTO_UDP | IPPROTO_SCTP => {
            let ports: [u8; 4] = ctx.load(offset).map_err(|_| DropReason::Truncated)?;
            meta.src_port = u16::from_be_bytes([ports[0], ports[1]]);
            meta.dst_port = u16::from_be_bytes([ports[2], ports[3]]);
        }
        IPPROTO_ICMP => quoted_ipv4(ctx, meta, offset),
        IPPROTO_ICMPV6 => quoted_ipv6(ctx, meta, offset),
        _ => {}
    }
    Ok(())
}

/// ICMP header length: type, code, checksum, 4 bytes the type defines.
const ICMP_HLEN: usize = 8;

/// The IPv4 header and ports an ICMP error quotes. A quote too short to name its connection
/// leaves the error unrelated (judged as ICMP of its own), never dropped here. Out of line: the
/// quote's bytes get a stack frame of their own, off the program's.
#[inline(never)]
fn quoted_ipv4(ctx: &TcContext, meta: &mut IpMeta, offset: usize) {
    let Ok(head) = ctx.load::<[u8; 2]>(offset) else {
        return;
    };
    // Destination unreachable, time exceeded, parameter problem.
    if !matches!(head[0], 3 | 11 | 12) {
        return;
    }
    let ip_offset = offset + ICMP_HLEN;
    let Ok(ip) = ctx.load::<[u8; 20]>(ip_offset) else {
        return;
    };
    let header_len = ((ip[0] & 0x0f) as usize) * 4;
    if ip[0] >> 4 != 4 || header_len < 20 {
        return;
    }
    let q = &mut meta.quoted;
    q.src = IpKey::v4([ip[12], ip[13], ip[14], ip[15]]);
    q.dst = IpKey::v4([ip[16], ip[17], ip[18], ip[19]]);
    quoted_ports(ctx, q, ip[9], ip_offset, ip_offset + (header_len & 0x3c));
}

/// The IPv6 header and ports an ICMPv6 error quotes (extension headers are not walked).
#[inline(never)]
fn quoted_ipv6(ctx: &TcContext, meta: &mut IpMeta, offset: usize) {
    let Ok(head) = ctx.load::<[u8; 2]>(offset) else {
        return;
    };
    // Destination unreachable, packet too big, time exceeded, parameter problem.
    if !matches!(head[0], 1..=4) {
        return;
    }
    let ip_offset = offset + ICMP_HLEN;
    let Ok(ip) = ctx.load::<Ipv6Hdr>(ip_offset) else {
        return;
    };
    if ip.version_tc_flow[0] >> 4 != 6 {
        return;
    }
    let q = &mut meta.quoted;
    q.src = IpKey::v6(ip.src);
    q.dst = IpKey::v6(ip.dst);
    quoted_ports(
        ctx,
        q,
        ip.next_header,
        ip_offset,
        ip_offset + size_of::<Ipv6Hdr>(),
    );
}

#[inline(always)]
fn quoted_ports(ctx: &TcContext, q: &mut Quoted, proto: u8, ip_offset: usize, l4_offset: usize) {
    q.proto = proto;
    q.ip_offset = ip_offset as u32;
    q.l4_offset = l4_offset as u32;
    if matches!(proto, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP) {
        // An error quotes at least 8 bytes of what it is about: the ports are among them.
        let Ok(ports) = ctx.load::<[u8; 4]>(l4_offset) else {
            return;
        };
        q.src_port = u16::from_be_bytes([ports[0], ports[1]]);
        q.dst_port = u16::from_be_bytes([ports[2], ports[3]]);
    }
    q.present = true;
}
