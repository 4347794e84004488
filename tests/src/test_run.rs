//! BPF_PROG_TEST_RUN (aya `test_run`) harness: the real programs loaded with fresh, unpinned
//! maps, a small node set up in them, and builders for crafted packets. The test-run skb arrives
//! on `lo` (ifindex 1), which plays the pod's port.

use crate::require_root;
use aya::maps::lpm_trie::Key;
use aya::{
    programs::{SchedClassifier, TestRun, TestRunOptions},
    Ebpf,
};
use sluice_agent::datapath::ebpf::{Maps, EBPF_OBJECT};
use sluice_common::{
    DropReason, Endpoint, IpKey, NodeConfig, RemoteNode, SpoofGuardEntry, SpoofGuardKey,
    IP_KEY_PREFIX_BITS,
};

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
        let result = prog.test_run(opts).expect("BPF_PROG_TEST_RUN");
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
