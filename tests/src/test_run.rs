//! BPF_PROG_TEST_RUN (aya `test_run`) harness: the real programs loaded with fresh, unpinned
//! maps, a small node set up in them, and builders for crafted packets. The test-run skb arrives
//! on `lo` (ifindex 1), which plays the pod's port.

use std::net::IpAddr;

use crate::require_root;
use aya::maps::lpm_trie::Key;
use aya::{
    programs::{SchedClassifier, TestRun, TestRunOptions},
    Ebpf,
};
use sluice_agent::{
    datapath::ebpf::{Maps, EBPF_OBJECT},
    model::{ip_key, policy::PolicyLpmKey},
};
use sluice_common::{
    DropReason, Endpoint, EndpointPolicy, FlowKey, Identity, IpKey, NodeConfig, PolicyKey,
    PolicyRule, RemoteNode, SpoofGuardEntry, SpoofGuardKey, IP_KEY_PREFIX_BITS,
    POLICY_KEY_EXACT_BITS, PROTO_ANY,
};

pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

pub const PORT: u32 = 1; // lo
pub const GW_IFINDEX: u32 = 42;
pub const TUNNEL_IFINDEX: u32 = 43;
pub const REMOTE_POD_V4: [u8; 4] = [10, 244, 1, 5];
pub const PEER_IFINDEX: u32 = 7;
pub const GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const POD_MAC: [u8; 6] = [0x0a, 0x58, 10, 244, 0, 2];
pub const PEER_MAC: [u8; 6] = [0x0a, 0x58, 10, 244, 0, 3];
pub const POD_V4: [u8; 4] = [10, 244, 0, 2];
pub const PEER_V4: [u8; 4] = [10, 244, 0, 3];
pub const GW_V4: [u8; 4] = [10, 244, 0, 1];
pub const OUTSIDE_V4: [u8; 4] = [8, 8, 8, 8];
pub const POD_V6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
pub const PEER_V6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3];

pub struct Harness {
    pub bpf: Ebpf,
    pub maps: Maps,
}

#[derive(PartialEq)]
pub enum Setup {
    Unconfigured,
    Encap,
    NoEncap,
}

pub fn harness(setup: Setup) -> Harness {
    require_root();
    let mut bpf = Ebpf::load(EBPF_OBJECT).expect("load the eBPF object");
    for name in ["from_pod", "from_gateway", "from_tunnel", "from_uplink"] {
        let prog: &mut SchedClassifier = bpf.program_mut(name).unwrap().try_into().unwrap();
        prog.load().expect("verifier accepts the program");
    }
    let mut maps = Maps::take(&mut bpf).unwrap();
    if setup != Setup::Unconfigured {
        let tunnel_ifindex = if setup == Setup::Encap {
            TUNNEL_IFINDEX
        } else {
            0
        };
        maps.node_config
            .set(
                0,
                NodeConfig {
                    gateway_ifindex: GW_IFINDEX,
                    tunnel_ifindex,
                    gateway_mac: GW_MAC,
                    _pad: [0; 2],
                    gateway_ipv4: GW_V4,
                    _pad2: 0,
                    host_netns_cookie: 0,
                },
                0,
            )
            .unwrap();
        for addr in [IpKey::v4(POD_V4), IpKey::v6(POD_V6)] {
            maps.spoof_guard
                .insert(
                    SpoofGuardKey {
                        ifindex: PORT,
                        addr,
                    },
                    SpoofGuardEntry {
                        mac: POD_MAC,
                        _pad: [0; 2],
                    },
                    0,
                )
                .unwrap();
        }
        for addr in [IpKey::v4(PEER_V4), IpKey::v6(PEER_V6)] {
            maps.endpoints
                .insert(
                    addr,
                    Endpoint {
                        ifindex: PEER_IFINDEX,
                        mac: PEER_MAC,
                        _pad: [0; 2],
                        flags: 0,
                    },
                    0,
                )
                .unwrap();
        }
        // Another node's pod CIDR 10.244.1.0/24 lives on 192.168.77.2.
        let cidr = Key::new(IP_KEY_PREFIX_BITS + 24, IpKey::v4([10, 244, 1, 0]));
        let node = RemoteNode {
            node_ip: IpKey::v4([192, 168, 77, 2]),
        };
        maps.remote_nodes.insert(&cidr, node, 0).unwrap();
    }
    Harness { bpf, maps }
}

impl Harness {
    pub fn run(&mut self, program: &str, packet: &[u8]) -> (u32, Vec<u8>) {
        let prog: &mut SchedClassifier = self.bpf.program_mut(program).unwrap().try_into().unwrap();
        let mut out = vec![0u8; packet.len() + 256];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(packet);
        opts.data_out = Some(&mut out);
        let result = prog.test_run(opts).unwrap_or_else(|e| {
            panic!(
                "BPF_PROG_TEST_RUN of {program} on {} bytes {packet:02x?}: {e:?}",
                packet.len()
            )
        });
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    }

    /// Runs and expects a drop for `reason`, counted once.
    pub fn expect_drop(&mut self, program: &str, packet: &[u8], reason: DropReason) {
        let before = self.maps.counters().unwrap().drops_for(reason);
        let (verdict, _) = self.run(program, packet);
        assert_eq!(
            verdict,
            TC_ACT_SHOT,
            "expected a drop for {}",
            reason.name()
        );
        assert_eq!(
            self.maps.counters().unwrap().drops_for(reason),
            before + 1,
            "{} counter",
            reason.name()
        );
    }
}

impl Harness {
    /// Lets POD send from the gateway's MAC. Repeats of a test run run on the packet the
    /// previous repeat left, and a forwarded packet leaves with the gateway's source MAC: with
    /// this, the rewrite is a no-op and every repeat is the same packet (otherwise all but the
    /// first would be SpoofGuard drops).
    pub fn pod_sends_from_gateway_mac(&mut self) {
        let pod = SpoofGuardKey {
            ifindex: PORT,
            addr: IpKey::v4(POD_V4),
        };
        let mac = SpoofGuardEntry {
            mac: GW_MAC,
            _pad: [0; 2],
        };
        self.maps.spoof_guard.insert(pod, mac, 0).unwrap();
    }

    /// Puts `pod` under `ingress_policy` and `egress_policy` (0: that direction not isolated),
    /// as the policy compiler writes ENDPOINT_POLICY.
    pub fn isolate(&mut self, pod: [u8; 4], ingress_policy: u32, egress_policy: u32) {
        let value = EndpointPolicy {
            ingress_policy,
            egress_policy,
        };
        self.maps
            .endpoint_policy
            .insert(IpKey::v4(pod), value, 0)
            .unwrap();
    }

    /// `addr`/`prefix` has identity `id` in IPCACHE.
    pub fn identity_of(&mut self, addr: [u8; 4], prefix: u32, id: u32) {
        let key = Key::new(IP_KEY_PREFIX_BITS + prefix, IpKey::v4(addr));
        self.maps.ipcache.insert(&key, Identity { id }, 0).unwrap();
    }

    /// `policy` allows `peer` as `rule`; `port`: None = any protocol, Some((proto, port, prefix
    /// bits of the port)).
    pub fn allow(&mut self, policy: u32, peer: u32, port: Option<(u8, u16, u32)>, rule: u32) {
        let (proto, port, bits) = port.unwrap_or((PROTO_ANY, 0, 0));
        let key = PolicyKey {
            policy,
            peer,
            proto,
            _pad: 0,
            port: port.to_be_bytes(),
        };
        let lpm = PolicyLpmKey {
            key,
            prefix_len: POLICY_KEY_EXACT_BITS + bits,
        };
        self.maps.insert_policy(&lpm, PolicyRule { rule }).unwrap();
    }
}

pub fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend(dst);
    p.extend(src);
    p.extend(ethertype.to_be_bytes());
    p
}

pub fn ipv4_tcp(src_mac: [u8; 6], src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
    let mut p = eth(GW_MAC, src_mac, 0x0800);
    p.extend([0x45, 0, 0, 40, 0, 1, 0x40, 0, 64, 6, 0, 0]);
    p.extend(src);
    p.extend(dst);
    p.extend([
        0x30, 0x39, 0, 80, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0,
    ]);
    p
}

pub fn ipv6_udp(src_mac: [u8; 6], src: [u8; 16], dst: [u8; 16]) -> Vec<u8> {
    let mut p = eth(GW_MAC, src_mac, 0x86dd);
    p.extend([0x60, 0, 0, 0, 0, 8, 17, 64]);
    p.extend(src);
    p.extend(dst);
    p.extend([0x30, 0x39, 0, 53, 0, 8, 0, 0]);
    p
}

pub fn arp(oper: u16, sender_mac: [u8; 6], sender_ip: [u8; 4], target_ip: [u8; 4]) -> Vec<u8> {
    let mut p = eth([0xff; 6], sender_mac, 0x0806);
    p.extend([0, 1, 0x08, 0, 6, 4]);
    p.extend(oper.to_be_bytes());
    p.extend(sender_mac);
    p.extend(sender_ip);
    p.extend([0; 6]);
    p.extend(target_ip);
    p
}

/// An IPv4 packet of any protocol whose header starts with source and destination port (TCP,
/// UDP, SCTP); `tcp_flags` lands at TCP's flags byte.
pub fn ipv4_l4(
    src_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    proto: u8,
    ports: (u16, u16),
    tcp_flags: u8,
) -> Vec<u8> {
    let mut p = eth(GW_MAC, src_mac, 0x0800);
    p.extend([0x45, 0, 0, 40, 0, 1, 0x40, 0, 64, proto, 0, 0]);
    p.extend(src);
    p.extend(dst);
    p.extend(ports.0.to_be_bytes());
    p.extend(ports.1.to_be_bytes());
    p.extend([
        0, 0, 0, 1, 0, 0, 0, 0, 0x50, tcp_flags, 0xff, 0xff, 0, 0, 0, 0,
    ]);
    p
}

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// What `Flow::frame` carries after its L4 header: an odd length, so that checksums cover a
/// padded last byte.
pub const PAYLOAD: &[u8] = b"GET /healthz\n";

/// One direction of a TCP or UDP connection, as its packets carry it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub src_port: u16,
    pub dst_port: u16,
}

impl Flow {
    /// The other direction of the connection.
    pub fn reply(self) -> Flow {
        Flow {
            src: self.dst,
            dst: self.src,
            proto: self.proto,
            src_port: self.dst_port,
            dst_port: self.src_port,
        }
    }

    /// The SERVICE_NAT key of a packet of this flow.
    pub fn key(self) -> FlowKey {
        FlowKey {
            src: ip_key(self.src),
            dst: ip_key(self.dst),
            src_port: self.src_port,
            dst_port: self.dst_port,
            proto: self.proto,
            _pad: [0; 3],
        }
    }

    /// A frame of this flow carrying `PAYLOAD` (TCP: PSH|ACK), with valid IPv4 header and L4
    /// checksums: what a rewrite must keep valid.
    pub fn frame(self, dst_mac: [u8; 6], src_mac: [u8; 6]) -> Vec<u8> {
        let mut l4 = Vec::new();
        l4.extend(self.src_port.to_be_bytes());
        l4.extend(self.dst_port.to_be_bytes());
        match self.proto {
            IPPROTO_TCP => l4.extend([0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0]),
            IPPROTO_UDP => {
                l4.extend((8 + PAYLOAD.len() as u16).to_be_bytes());
                l4.extend([0, 0]);
            }
            other => panic!("Flow::frame builds TCP and UDP, not protocol {other}"),
        }
        l4.extend(PAYLOAD);
        let mut p = match (self.src, self.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                let mut p = eth(dst_mac, src_mac, 0x0800);
                p.extend([0x45, 0]);
                p.extend((20 + l4.len() as u16).to_be_bytes());
                p.extend([0, 1, 0x40, 0, 64, self.proto, 0, 0]);
                p.extend(src.octets());
                p.extend(dst.octets());
                p
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                let mut p = eth(dst_mac, src_mac, 0x86dd);
                p.extend([0x60, 0, 0, 0]);
                p.extend((l4.len() as u16).to_be_bytes());
                p.extend([self.proto, 64]);
                p.extend(src.octets());
                p.extend(dst.octets());
                p
            }
            _ => panic!("a flow has one address family"),
        };
        p.extend(l4);
        set_checksums(&mut p);
        p
    }
}

/// Writes the checksums computed from scratch into a TCP or UDP frame of either family (after
/// a test changed a field).
pub fn set_checksums(frame: &mut [u8]) {
    if be16(frame, 12) == 0x0800 {
        let sum = ipv4_header_checksum(frame);
        frame[24..26].copy_from_slice(&sum.to_be_bytes());
    }
    let (offset, sum) = (l4_checksum_offset(frame), l4_checksum(frame));
    frame[offset..offset + 2].copy_from_slice(&sum.to_be_bytes());
}

/// RFC 1071 Internet checksum: the one's complement of the one's complement sum of `data` as
/// big-endian 16-bit words, an odd last byte padded with zero.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|word| u32::from(u16::from_be_bytes([word[0], *word.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn be16(frame: &[u8], offset: usize) -> u16 {
    u16::from_be_bytes([frame[offset], frame[offset + 1]])
}

/// The L4 header's offset in an Ethernet + IPv4/IPv6 frame, its protocol and its length.
fn l4_of(frame: &[u8]) -> (usize, u8, usize) {
    match be16(frame, 12) {
        0x0800 => {
            let header = usize::from(frame[14] & 0x0f) * 4;
            (
                14 + header,
                frame[23],
                usize::from(be16(frame, 16)) - header,
            )
        }
        0x86dd => (54, frame[20], usize::from(be16(frame, 18))),
        other => panic!("not an IP frame (EtherType {other:#06x})"),
    }
}

/// Where the TCP or UDP checksum of `frame` sits.
pub fn l4_checksum_offset(frame: &[u8]) -> usize {
    let (l4, proto, _) = l4_of(frame);
    match proto {
        IPPROTO_TCP => l4 + 16,
        IPPROTO_UDP => l4 + 6,
        other => panic!("no TCP/UDP checksum in protocol {other}"),
    }
}

/// The IPv4 header checksum `frame` should carry, computed from scratch.
pub fn ipv4_header_checksum(frame: &[u8]) -> u16 {
    let mut header = frame[14..14 + usize::from(frame[14] & 0x0f) * 4].to_vec();
    header[10..12].fill(0);
    checksum(&header)
}

/// The TCP or UDP checksum `frame` should carry, computed from scratch over the pseudo-header
/// (RFC 793 / RFC 8200 8.1) and the segment. UDP sends a computed 0 as 0xffff (RFC 768).
pub fn l4_checksum(frame: &[u8]) -> u16 {
    let (l4, proto, len) = l4_of(frame);
    let mut data = Vec::new();
    if be16(frame, 12) == 0x0800 {
        data.extend(&frame[26..34]);
        data.extend([0, proto]);
        data.extend((len as u16).to_be_bytes());
    } else {
        data.extend(&frame[22..54]);
        data.extend((len as u32).to_be_bytes());
        data.extend([0, 0, 0, proto]);
    }
    let field = l4_checksum_offset(frame) - l4;
    let mut segment = frame[l4..l4 + len].to_vec();
    segment[field..field + 2].fill(0);
    data.extend(segment);
    match checksum(&data) {
        0 if proto == IPPROTO_UDP => 0xffff,
        sum => sum,
    }
}

/// Asserts that `frame` carries the checksums computed from scratch: BPF_PROG_TEST_RUN skbs are
/// CHECKSUM_NONE, so nothing downstream would complete a partial one. A zero UDP checksum over
/// IPv4 means "none" and is valid as it is.
pub fn assert_checksums(frame: &[u8]) {
    if be16(frame, 12) == 0x0800 {
        assert_eq!(
            be16(frame, 24),
            ipv4_header_checksum(frame),
            "IPv4 header checksum"
        );
    }
    let offset = l4_checksum_offset(frame);
    let carried = be16(frame, offset);
    let (_, proto, _) = l4_of(frame);
    if carried == 0 && proto == IPPROTO_UDP && be16(frame, 12) == 0x0800 {
        return;
    }
    assert_eq!(carried, l4_checksum(frame), "L4 checksum");
}
