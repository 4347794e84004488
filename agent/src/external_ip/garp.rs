//! Gratuitous ARP. When an IP moves to this node, the hosts and routers of the segment still map
//! it to the old owner's MAC until their neighbour entries expire; a broadcast ARP request for the
//! IP from this node's MAC (RFC 5227's ARP Announcement) makes them update at once.

use std::{net::Ipv4Addr, os::fd::AsRawFd};

use anyhow::{bail, Context, Result};
use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};

const BROADCAST: [u8; 6] = [0xff; 6];
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IP: u16 = 0x0800;
const ARPHRD_ETHER: u16 = 1;
const ARPOP_REQUEST: u16 = 1;

/// Ethernet header (14 bytes) and an ARP payload for Ethernet/IPv4 (28 bytes).
const GARP_LEN: usize = 42;

/// Sends one gratuitous ARP request for `ip` out of `ifname`, from its MAC: sender and target
/// protocol address both `ip`, target hardware address zero, to the broadcast address. Needs
/// CAP_NET_RAW. Callers may repeat it, as switches and hosts can miss a single frame.
///
/// IPv4 only: the IPv6 counterpart, an unsolicited Neighbor Advertisement, is not implemented, so
/// IPv6 neighbours of a moved IP find its new owner only when their entry goes stale and they
/// probe again.
pub fn announce(ifname: &str, ip: Ipv4Addr) -> Result<()> {
    let (index, mac) = link(ifname)?;
    let frame = garp_frame(mac, ip);
    // Protocol 0: the socket only sends, the kernel delivers it no frames.
    let sock = socket(
        AddressFamily::Packet,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("opening an AF_PACKET socket (needs CAP_NET_RAW)")?;
    let to = libc::sockaddr_ll {
        sll_family: libc::AF_PACKET as u16,
        sll_protocol: ETH_P_ARP.to_be(),
        sll_ifindex: i32::try_from(index).context("interface index")?,
        sll_hatype: 0,
        sll_pkttype: 0,
        sll_halen: 6,
        sll_addr: [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0],
    };
    // SAFETY: `frame` and `to` are live for the call and their lengths are passed with them.
    let sent = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&to as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("sending a gratuitous ARP for {ip} on {ifname}"));
    }
    if sent as usize != frame.len() {
        bail!("gratuitous ARP for {ip} on {ifname}: sent {sent} of {GARP_LEN} bytes");
    }
    Ok(())
}

/// The interface's index and MAC, in the calling thread's network namespace.
fn link(ifname: &str) -> Result<(usize, [u8; 6])> {
    let found = nix::ifaddrs::getifaddrs()
        .context("listing interfaces")?
        .filter(|a| a.interface_name == ifname)
        .find_map(|a| {
            let link = a.address?;
            let link = link.as_link_addr()?;
            Some((link.ifindex(), link.addr()))
        });
    match found {
        Some((index, Some(mac))) if mac != [0; 6] => Ok((index, mac)),
        Some(_) => bail!("interface {ifname} has no MAC address to announce from"),
        None => bail!("no interface {ifname}"),
    }
}

/// The frame [`announce`] sends.
fn garp_frame(mac: [u8; 6], ip: Ipv4Addr) -> [u8; GARP_LEN] {
    let mut frame = [0u8; GARP_LEN];
    let fields: [&[u8]; 11] = [
        &BROADCAST,
        &mac,
        &ETH_P_ARP.to_be_bytes(),
        &ARPHRD_ETHER.to_be_bytes(),
        &ETH_P_IP.to_be_bytes(),
        &[6, 4], // hardware and protocol address lengths
        &ARPOP_REQUEST.to_be_bytes(),
        &mac,
        &ip.octets(),
        &[0; 6],
        &ip.octets(),
    ];
    let mut at = 0;
    for field in fields {
        frame[at..at + field.len()].copy_from_slice(field);
        at += field.len();
    }
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_frame_is_an_arp_announcement() {
        let mac = [0x02, 0, 0, 0, 0, 0x0a];
        let frame = garp_frame(mac, Ipv4Addr::new(192, 0, 2, 10));
        #[rustfmt::skip]
        let expected: [u8; GARP_LEN] = [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02, 0, 0, 0, 0, 0x0a, 0x08, 0x06, // Ethernet
            0, 1, 0x08, 0, 6, 4, 0, 1,                // Ethernet/IPv4, request
            0x02, 0, 0, 0, 0, 0x0a, 192, 0, 2, 10,    // sender: our MAC, the IP
            0, 0, 0, 0, 0, 0, 192, 0, 2, 10,          // target: no MAC, the IP
        ];
        assert_eq!(frame, expected);
    }

    #[test]
    fn unknown_interfaces_are_named() {
        let err = announce("no-such-if0", Ipv4Addr::new(192, 0, 2, 10)).unwrap_err();
        assert_eq!(err.to_string(), "no interface no-such-if0");
    }
}
