//! What the Service BPF_PROG_TEST_RUN suites share: the addresses of the crafted packets, the
//! local pods, and frontends and backends written as the Service compiler writes them.
// Each suite uses a part of it.
#![allow(dead_code)]

use std::{collections::BTreeMap, net::IpAddr};

use aya::maps::lpm_trie::Key;
use sluice_agent::model::ip_key;
use sluice_common::{
    nat_flags, service_flags, BackendKey, Endpoint, FlowKey, IpKey, NatEntry, NatTarget,
    RemoteNode, Service, ServiceKey, SpoofGuardEntry, SpoofGuardKey, IP_KEY_PREFIX_BITS,
};
use sluice_tests::test_run::*;

pub const CLUSTER_IP_V4: [u8; 4] = [10, 96, 0, 10];
pub const CLUSTER_IP_V6: [u8; 16] = [0xfd, 0, 0, 0x96, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x0a];
/// Another node's pod, in the IPv6 pod CIDR `local_pods` routes to that node.
pub const REMOTE_POD_V6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 5];
pub const OTHER_REMOTE_POD_V4: [u8; 4] = [10, 244, 1, 6];
pub const NODE_V4: [u8; 4] = [192, 168, 77, 1];
pub const LB_IP_V4: [u8; 4] = [192, 168, 77, 100];
pub const ROUTER_V4: [u8; 4] = [192, 168, 77, 254];
pub const UPLINK_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x77, 0x01];
pub const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x77, 0xfe];
pub const SERVICE_PORT: u16 = 80;
pub const NODE_PORT: u16 = 30080;
pub const TARGET_PORT: u16 = 8080;
pub const CLIENT_PORT: u16 = 40000;
pub const AFFINITY_TIMEOUT: u32 = 10_800;

pub fn ip(addr: impl Into<IpAddr>) -> IpAddr {
    addr.into()
}

/// POD (the client) and PEER (a local endpoint) each send and receive. BPF_PROG_TEST_RUN has
/// one port, lo, so PEER's replies are sent from it too; POD is delivered to it.
pub fn local_pods(h: &mut Harness) {
    for addr in [IpKey::v4(PEER_V4), IpKey::v6(PEER_V6)] {
        let key = SpoofGuardKey {
            ifindex: PORT,
            addr,
        };
        let entry = SpoofGuardEntry {
            mac: PEER_MAC,
            _pad: [0; 2],
        };
        h.maps.spoof_guard.insert(key, entry, 0).unwrap();
    }
    for addr in [IpKey::v4(POD_V4), IpKey::v6(POD_V6)] {
        let pod = Endpoint {
            ifindex: PORT,
            mac: POD_MAC,
            _pad: [0; 2],
            flags: 0,
        };
        h.maps.endpoints.insert(addr, pod, 0).unwrap();
    }
    // The remote node's IPv6 pod CIDR, fd00:0:0:1::/64, next to the harness's IPv4 one.
    let mut cidr = [0; 16];
    cidr[..8].copy_from_slice(&REMOTE_POD_V6[..8]);
    let node = RemoteNode {
        node_ip: IpKey::v4([192, 168, 77, 2]),
    };
    h.maps
        .remote_nodes
        .insert(&Key::new(IP_KEY_PREFIX_BITS + 64, IpKey::v6(cidr)), node, 0)
        .unwrap();
}

/// The frontend a flow's destination is, reached from `scope`.
pub fn frontend(flow: Flow, scope: u8) -> ServiceKey {
    ServiceKey {
        addr: ip_key(flow.dst),
        port: flow.dst_port,
        proto: flow.proto,
        scope,
    }
}

/// Writes a frontend and its endpoints (a backend set of their own); returns the set.
pub fn add_service(
    h: &mut Harness,
    frontend: ServiceKey,
    flags: u32,
    endpoints: &[(IpAddr, u16)],
) -> u32 {
    let set = h.maps.services.keys().count() as u32 + 1;
    for (index, (addr, port)) in endpoints.iter().enumerate() {
        set_backend(h, set, index as u32, *addr, *port);
    }
    let affinity_timeout = if flags & service_flags::AFFINITY != 0 {
        AFFINITY_TIMEOUT
    } else {
        0
    };
    let service = Service {
        backend_set: set,
        count: endpoints.len() as u32,
        flags,
        affinity_timeout,
    };
    h.maps.services.insert(frontend, service, 0).unwrap();
    set
}

pub fn set_backend(h: &mut Harness, set: u32, index: u32, addr: IpAddr, port: u16) {
    h.maps
        .backends
        .insert(BackendKey { set, index }, target(addr, port), 0)
        .unwrap();
}

pub fn target(addr: IpAddr, port: u16) -> NatTarget {
    NatTarget {
        addr: ip_key(addr),
        port,
        _pad: 0,
    }
}

/// SERVICE_NAT's entries with their kind flags only (`REVERSE`, `TO_EXTERNAL`): when they were
/// last used and the TCP state are `nat_lifetime_test_run`'s to check.
pub fn nat_entries(h: &Harness) -> BTreeMap<FlowKey, NatEntry> {
    h.maps
        .service_nat
        .iter()
        .map(Result::unwrap)
        .map(|(key, entry)| {
            let kind = nat_flags::REVERSE | nat_flags::TO_EXTERNAL;
            (
                key,
                NatEntry {
                    flags: entry.flags & kind,
                    ..entry
                },
            )
        })
        .collect()
}
