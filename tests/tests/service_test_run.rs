//! SessionAffinity, ServiceLB and EndpointDNAT (with the reject of Services without endpoints,
//! and the uplink's ARPResponder) with crafted packets through BPF_PROG_TEST_RUN. Each case
//! fills SERVICES and BACKENDS the way the Service compiler does, sends packets with valid
//! checksums, and checks the verdict, the output frame byte for byte (checksums recomputed from
//! scratch) and what SERVICE_NAT and AFFINITY hold.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use aya::maps::lpm_trie::Key;
use sluice_agent::model::ip_key;
use sluice_common::{
    identity, nat_flags, scope, service_flags, AffinityEntry, AffinityKey, DropReason, ExternalIp,
    FlowKey, Identity, IpKey, NatEntry, Service, ServiceKey, HAIRPIN_IPV4, IP_KEY_PREFIX_BITS,
};
use sluice_tests::test_run::*;

mod service_fixtures;
use service_fixtures::*;

fn affinity_entries(h: &Harness) -> BTreeMap<AffinityKey, AffinityEntry> {
    h.maps.affinity.iter().map(Result::unwrap).collect()
}

/// The SERVICE_NAT entries of one connection as designed: the client's packets leave as
/// `natted`, the endpoint's replies (`natted` reversed) leave as the client's flow reversed.
fn connection(client: Flow, natted: Flow, reverse_flags: u32) -> BTreeMap<FlowKey, NatEntry> {
    let entry = |to: Flow, flags| NatEntry {
        src: ip_key(to.src),
        dst: ip_key(to.dst),
        src_port: to.src_port,
        dst_port: to.dst_port,
        flags,
    };
    BTreeMap::from([
        (client.key(), entry(natted, 0)),
        (
            natted.reply().key(),
            entry(client.reply(), nat_flags::REVERSE | reverse_flags),
        ),
    ])
}

/// The IPv4 destination of a frame.
fn destination(frame: &[u8]) -> IpAddr {
    ip(<[u8; 4]>::try_from(&frame[30..34]).unwrap())
}

/// The packet kinds whose rewrite differs: family (IPv4 has a header checksum, IPv6 folds the
/// address difference into the L4 checksum), protocol (checksum offset), and UDP over IPv4
/// without a checksum, which must stay without one.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Ipv4Tcp,
    Ipv4Udp,
    Ipv4UdpNoChecksum,
    Ipv6Tcp,
    Ipv6Udp,
}

impl Kind {
    const ALL: [Kind; 5] = [
        Kind::Ipv4Tcp,
        Kind::Ipv4Udp,
        Kind::Ipv4UdpNoChecksum,
        Kind::Ipv6Tcp,
        Kind::Ipv6Udp,
    ];

    /// POD's connection to the ClusterIP frontend.
    fn client(self) -> Flow {
        let (src, dst) = match self {
            Kind::Ipv6Tcp | Kind::Ipv6Udp => (ip(POD_V6), ip(CLUSTER_IP_V6)),
            _ => (ip(POD_V4), ip(CLUSTER_IP_V4)),
        };
        let proto = match self {
            Kind::Ipv4Tcp | Kind::Ipv6Tcp => IPPROTO_TCP,
            _ => IPPROTO_UDP,
        };
        Flow {
            src,
            dst,
            proto,
            src_port: CLIENT_PORT,
            dst_port: SERVICE_PORT,
        }
    }

    /// The endpoint on this node (PEER) or on the other one.
    fn endpoint(self, local: bool) -> IpAddr {
        match (self, local) {
            (Kind::Ipv6Tcp | Kind::Ipv6Udp, true) => ip(PEER_V6),
            (Kind::Ipv6Tcp | Kind::Ipv6Udp, false) => ip(REMOTE_POD_V6),
            (_, true) => ip(PEER_V4),
            (_, false) => ip(REMOTE_POD_V4),
        }
    }

    fn frame(self, flow: Flow, dst_mac: [u8; 6], src_mac: [u8; 6]) -> Vec<u8> {
        let mut frame = flow.frame(dst_mac, src_mac);
        if self == Kind::Ipv4UdpNoChecksum {
            let offset = l4_checksum_offset(&frame);
            frame[offset..offset + 2].fill(0);
        }
        frame
    }
}

/// POD connects to the ClusterIP frontend of one endpoint; returns the harness, the client's
/// flow, the flow it leaves with, and the output frame after the checks every case shares.
fn dnat(kind: Kind, local: bool) -> (Harness, Flow, Flow, Vec<u8>) {
    let mut h = harness(Setup::Encap);
    local_pods(&mut h);
    let client = kind.client();
    let endpoint = kind.endpoint(local);
    add_service(
        &mut h,
        frontend(client, scope::INTERNAL),
        0,
        &[(endpoint, TARGET_PORT)],
    );
    let (verdict, out) = h.run("from_pod", &kind.frame(client, GW_MAC, POD_MAC));
    let natted = Flow {
        dst: endpoint,
        dst_port: TARGET_PORT,
        ..client
    };
    // A remote endpoint's frame goes into the tunnel with the gateway MAC both ways.
    let (dst_mac, src_mac) = if local {
        (PEER_MAC, GW_MAC)
    } else {
        (GW_MAC, GW_MAC)
    };
    assert_eq!(
        verdict, TC_ACT_REDIRECT,
        "{kind:?}: redirected to the endpoint"
    );
    assert_checksums(&out);
    assert_eq!(
        out,
        kind.frame(natted, dst_mac, src_mac),
        "{kind:?}: destination rewritten to the endpoint, nothing else"
    );
    assert_eq!(
        nat_entries(&h),
        connection(client, natted, 0),
        "{kind:?}: SERVICE_NAT holds the DNAT and its reverse"
    );
    (h, client, natted, out)
}

#[test]
fn cluster_ip_dnat_ipv4_tcp() {
    dnat(Kind::Ipv4Tcp, true);
}

#[test]
fn cluster_ip_dnat_ipv4_udp() {
    dnat(Kind::Ipv4Udp, true);
}

#[test]
fn cluster_ip_dnat_keeps_a_zero_udp_checksum_zero() {
    let (_, _, _, out) = dnat(Kind::Ipv4UdpNoChecksum, true);
    let offset = l4_checksum_offset(&out);
    assert_eq!(&out[offset..offset + 2], &[0, 0], "still no UDP checksum");
}

#[test]
fn cluster_ip_dnat_ipv6_tcp() {
    dnat(Kind::Ipv6Tcp, true);
}

#[test]
fn cluster_ip_dnat_ipv6_udp() {
    dnat(Kind::Ipv6Udp, true);
}

/// The endpoint answers through `program`; its reply must reach POD from the frontend.
fn reply_gets_the_frontend_back(local: bool) {
    for kind in Kind::ALL {
        let (mut h, client, natted, _) = dnat(kind, local);
        let (program, src_mac) = if local {
            ("from_pod", PEER_MAC)
        } else {
            ("from_tunnel", GW_MAC)
        };
        let (verdict, out) = h.run(program, &kind.frame(natted.reply(), GW_MAC, src_mac));
        assert_eq!(verdict, TC_ACT_REDIRECT, "{kind:?}: delivered to POD");
        assert_checksums(&out);
        assert_eq!(
            out,
            kind.frame(client.reply(), POD_MAC, GW_MAC),
            "{kind:?}: source rewritten back to the frontend"
        );
    }
}

#[test]
fn replies_of_a_local_endpoint_come_from_the_frontend() {
    reply_gets_the_frontend_back(true);
}

#[test]
fn replies_of_a_remote_endpoint_through_the_tunnel_come_from_the_frontend() {
    reply_gets_the_frontend_back(false);
}

/// A ClusterIP frontend over PEER and two remote pods; returns its backend set and their
/// addresses.
fn three_endpoints(h: &mut Harness, flags: u32) -> (u32, [IpAddr; 3]) {
    local_pods(h);
    let endpoints = [ip(PEER_V4), ip(REMOTE_POD_V4), ip(OTHER_REMOTE_POD_V4)];
    let targets: Vec<_> = endpoints.iter().map(|e| (*e, TARGET_PORT)).collect();
    let set = add_service(
        h,
        frontend(Kind::Ipv4Tcp.client(), scope::INTERNAL),
        flags,
        &targets,
    );
    (set, endpoints)
}

fn connect(h: &mut Harness, src_port: u16) -> Vec<u8> {
    let client = Flow {
        src_port,
        ..Kind::Ipv4Tcp.client()
    };
    let (verdict, out) = h.run("from_pod", &client.frame(GW_MAC, POD_MAC));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    out
}

#[test]
fn a_connection_keeps_its_endpoint() {
    let mut h = harness(Setup::Encap);
    let (_, endpoints) = three_endpoints(&mut h, 0);
    let first = connect(&mut h, CLIENT_PORT);
    assert!(endpoints.contains(&destination(&first)));
    // A fresh pick would leave the first endpoint with probability 2/3 each time.
    for _ in 0..20 {
        assert_eq!(
            connect(&mut h, CLIENT_PORT),
            first,
            "same endpoint, same rewrite"
        );
    }
    assert_eq!(nat_entries(&h).len(), 2, "one connection, two entries");
}

#[test]
fn new_connections_are_spread_over_every_endpoint() {
    let mut h = harness(Setup::Encap);
    let (_, endpoints) = three_endpoints(&mut h, 0);
    // 300 connections all missing one of three endpoints: probability 3 * (2/3)^300.
    let chosen: BTreeSet<IpAddr> = (0..300)
        .map(|i| destination(&connect(&mut h, CLIENT_PORT + i)))
        .collect();
    assert_eq!(chosen, BTreeSet::from(endpoints));
    assert_eq!(nat_entries(&h).len(), 600);
}

#[test]
fn client_ip_affinity_keeps_the_client_on_one_endpoint() {
    let mut h = harness(Setup::Encap);
    let (set, endpoints) = three_endpoints(&mut h, service_flags::AFFINITY);
    let first = destination(&connect(&mut h, CLIENT_PORT));
    for i in 1..30 {
        assert_eq!(
            destination(&connect(&mut h, CLIENT_PORT + i)),
            first,
            "connection {i} of the same client"
        );
    }
    let affinity = affinity_entries(&h);
    let key = AffinityKey {
        backend_set: set,
        client: IpKey::v4(POD_V4),
    };
    let entry = affinity[&key];
    assert_eq!(affinity.len(), 1);
    assert_eq!(entry.endpoint, target(first, TARGET_PORT));
    assert_eq!(
        endpoints[entry.index as usize], first,
        "its index in the set"
    );
}

#[test]
fn an_affinity_entry_whose_index_holds_another_endpoint_is_ignored() {
    let mut h = harness(Setup::Encap);
    let (set, mut endpoints) = three_endpoints(&mut h, service_flags::AFFINITY);
    let gone = destination(&connect(&mut h, CLIENT_PORT));
    let key = AffinityKey {
        backend_set: set,
        client: IpKey::v4(POD_V4),
    };
    // The endpoint's pod is replaced: its index in the set now holds another address.
    let index = affinity_entries(&h)[&key].index;
    let replacement = ip([10, 244, 1, 7]);
    set_backend(&mut h, set, index, replacement, TARGET_PORT);
    endpoints[index as usize] = replacement;
    let now = destination(&connect(&mut h, CLIENT_PORT + 1));
    assert_ne!(now, gone, "not sent to the endpoint that is gone");
    let entry = affinity_entries(&h)[&key];
    assert_eq!(
        (entry.endpoint, endpoints[entry.index as usize]),
        (target(now, TARGET_PORT), now),
        "the stale entry was replaced by the new pick"
    );
}

/// POD's packet to a ClusterIP frontend without endpoints: the answer sent back out of POD's
/// port, which counts the packet itself as dropped for NoEndpoints.
fn rejected(packet: &[u8]) -> Vec<u8> {
    let mut h = harness(Setup::Encap);
    add_service(
        &mut h,
        frontend(Kind::Ipv4Tcp.client(), scope::INTERNAL),
        0,
        &[],
    );
    add_service(
        &mut h,
        frontend(Kind::Ipv4Udp.client(), scope::INTERNAL),
        0,
        &[],
    );
    let drops = |h: &Harness| {
        h.maps
            .counters()
            .unwrap()
            .drops_for(DropReason::NoEndpoints)
    };
    let before = drops(&h);
    let (verdict, out) = h.run("from_pod", packet);
    assert_eq!(verdict, TC_ACT_REDIRECT, "answered out of the pod's port");
    assert_eq!(drops(&h), before + 1);
    assert!(nat_entries(&h).is_empty());
    out
}

#[test]
fn a_cluster_ip_without_endpoints_resets_tcp() {
    let mut syn = Kind::Ipv4Tcp.client().frame(GW_MAC, POD_MAC);
    syn[34 + 13] = 0x02; // TCP flags: SYN instead of PSH|ACK
    set_checksums(&mut syn);
    let mut reset = eth(POD_MAC, GW_MAC, 0x0800);
    reset.extend([0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, IPPROTO_TCP, 0, 0]);
    reset.extend(CLUSTER_IP_V4);
    reset.extend(POD_V4);
    reset.extend(SERVICE_PORT.to_be_bytes());
    reset.extend(CLIENT_PORT.to_be_bytes());
    // RST|ACK acknowledging the SYN and its payload (RFC 9293 3.10.7.1).
    let ack = 1 + PAYLOAD.len() as u32 + 1;
    reset.extend(0u32.to_be_bytes());
    reset.extend(ack.to_be_bytes());
    reset.extend([0x50, 0x14, 0, 0, 0, 0, 0, 0]);
    set_checksums(&mut reset);
    let out = rejected(&syn);
    assert_checksums(&out);
    assert_eq!(out, reset);
}

#[test]
fn a_cluster_ip_without_endpoints_answers_udp_with_port_unreachable() {
    let datagram = Kind::Ipv4Udp.client().frame(GW_MAC, POD_MAC);
    let mut icmp = vec![3, 3, 0, 0, 0, 0, 0, 0];
    icmp.extend(&datagram[14..42]); // its IP header and first 8 bytes
    let sum = checksum(&icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let mut unreachable = eth(POD_MAC, GW_MAC, 0x0800);
    unreachable.extend([
        0x45,
        0,
        0,
        20 + icmp.len() as u8,
        0,
        0,
        0x40,
        0,
        64,
        1,
        0,
        0,
    ]);
    unreachable.extend(CLUSTER_IP_V4);
    unreachable.extend(POD_V4);
    let sum = ipv4_header_checksum(&unreachable);
    unreachable[24..26].copy_from_slice(&sum.to_be_bytes());
    unreachable.extend(icmp);
    assert_eq!(rejected(&datagram), unreachable);
}

#[test]
fn a_node_port_local_without_endpoints_drops() {
    let mut h = harness(Setup::Encap);
    let client = node_port_client(OUTSIDE_V4);
    // externalTrafficPolicy Local on a node without endpoints (other nodes have some): the load
    // balancer's health check steers traffic away, so nothing is answered.
    let flags = service_flags::NO_LOCAL_ENDPOINTS;
    add_service(&mut h, frontend(client, scope::EXTERNAL), flags, &[]);
    h.expect_drop(
        "from_uplink",
        &client.frame(UPLINK_MAC, ROUTER_MAC),
        DropReason::NoEndpoints,
    );
    assert!(nat_entries(&h).is_empty());
}

#[test]
fn a_cluster_ip_local_without_local_endpoints_drops() {
    // internalTrafficPolicy Local, endpoints only on other nodes: dropped like kube-proxy,
    // not answered with a reset.
    let mut h = harness(Setup::Encap);
    let client = Kind::Ipv4Tcp.client();
    let flags = service_flags::NO_LOCAL_ENDPOINTS;
    add_service(&mut h, frontend(client, scope::INTERNAL), flags, &[]);
    h.expect_drop(
        "from_pod",
        &client.frame(GW_MAC, POD_MAC),
        DropReason::NoEndpoints,
    );
    assert!(nat_entries(&h).is_empty());
}

#[test]
fn a_pod_reaching_itself_through_a_service_is_hairpinned() {
    let mut h = harness(Setup::Encap);
    local_pods(&mut h);
    let client = Kind::Ipv4Tcp.client();
    add_service(
        &mut h,
        frontend(client, scope::INTERNAL),
        0,
        &[(ip(POD_V4), TARGET_PORT)],
    );
    let (verdict, out) = h.run("from_pod", &client.frame(GW_MAC, POD_MAC));
    // Without the source rewrite the pod would answer itself inside its own namespace.
    let natted = Flow {
        src: ip(HAIRPIN_IPV4),
        dst: ip(POD_V4),
        dst_port: TARGET_PORT,
        ..client
    };
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_checksums(&out);
    assert_eq!(out, natted.frame(POD_MAC, GW_MAC), "back into the pod");
    assert_eq!(nat_entries(&h), connection(client, natted, 0));
    let (verdict, out) = h.run("from_pod", &natted.reply().frame(GW_MAC, POD_MAC));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_checksums(&out);
    assert_eq!(
        out,
        client.reply().frame(POD_MAC, GW_MAC),
        "the reply comes from the frontend"
    );
}

/// A pod reaching itself through a Service leaves with the hairpin address as its source, but
/// policy judges the pod: its egress isolation holds (found by Cyclonus: a pod under an egress
/// deny-all reached itself through its own Service), and its ingress rules see itself, not the
/// hairpin address.
#[test]
fn a_pod_hairpinning_through_a_service_is_judged_as_itself() {
    const POD_IDENTITY: u32 = 300;
    let hairpinned = |h: &mut Harness| {
        local_pods(h);
        let client = Kind::Ipv4Tcp.client();
        add_service(
            h,
            frontend(client, scope::INTERNAL),
            0,
            &[(ip(POD_V4), TARGET_PORT)],
        );
        client.frame(GW_MAC, POD_MAC)
    };
    // Egress isolated, no rule: not a packet out, to itself neither.
    let mut h = harness(Setup::Encap);
    let packet = hairpinned(&mut h);
    h.isolate(POD_V4, 0, 1);
    h.expect_drop("from_pod", &packet, DropReason::EgressDenied);
    // Ingress isolated, no rule: nothing in, from itself neither.
    let mut h = harness(Setup::Encap);
    let packet = hairpinned(&mut h);
    h.isolate(POD_V4, 2, 0);
    h.expect_drop("from_pod", &packet, DropReason::IngressDenied);
    // Both directions allow the pod's own identity: it reaches itself, hairpinned.
    let mut h = harness(Setup::Encap);
    let packet = hairpinned(&mut h);
    h.isolate(POD_V4, 2, 1);
    h.identity_of(POD_V4, 32, POD_IDENTITY);
    h.allow(1, POD_IDENTITY, Some((6, TARGET_PORT, 16)), 11);
    h.allow(2, POD_IDENTITY, Some((6, TARGET_PORT, 16)), 12);
    let (verdict, out) = h.run("from_pod", &packet);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(
        &out[26..30],
        &HAIRPIN_IPV4,
        "the hairpin address as the source"
    );
    assert_eq!(&out[30..34], &POD_V4, "back into the pod");
}

#[test]
fn the_node_reaching_its_own_host_network_endpoint_is_hairpinned() {
    // A hostNetwork client connects to a ClusterIP from the gateway address; the endpoint is a
    // hostNetwork pod on the same node, i.e. the node's own address.
    let mut h = harness(Setup::Encap);
    let host = Key::new(IP_KEY_PREFIX_BITS + 32, IpKey::v4(NODE_V4));
    h.maps
        .ipcache
        .insert(&host, Identity { id: identity::HOST }, 0)
        .unwrap();
    let client = Flow {
        src: ip(GW_V4),
        ..Kind::Ipv4Tcp.client()
    };
    add_service(
        &mut h,
        frontend(client, scope::INTERNAL),
        0,
        &[(ip(NODE_V4), TARGET_PORT)],
    );
    let (verdict, out) = h.run("from_gateway", &client.frame(GW_MAC, GW_MAC));
    // Both ends local, the node would drop it as martian: the hairpin address is the client,
    // and the packet goes back up into the node (gateway MAC, gateway's ingress).
    let natted = Flow {
        src: ip(HAIRPIN_IPV4),
        dst: ip(NODE_V4),
        dst_port: TARGET_PORT,
        ..client
    };
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_checksums(&out);
    assert_eq!(out, natted.frame(GW_MAC, GW_MAC), "back up into the node");
    assert_eq!(nat_entries(&h), connection(client, natted, 0));
    // The node answers the hairpin address through the gateway (its route to it).
    let (verdict, out) = h.run("from_gateway", &natted.reply().frame(GW_MAC, GW_MAC));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_checksums(&out);
    assert_eq!(
        out,
        client.reply().frame(GW_MAC, GW_MAC),
        "the reply comes from the frontend, to the gateway address"
    );
    // Another address of the cluster from the gateway is not hairpinned (the node's FIB).
    let other = Flow {
        src_port: CLIENT_PORT + 1,
        ..client
    };
    let frontend_other = frontend(
        Flow {
            dst: ip([10, 96, 0, 11]),
            ..other
        },
        scope::INTERNAL,
    );
    add_service(&mut h, frontend_other, 0, &[(ip(PEER_V4), TARGET_PORT)]);
    let to_pod = Flow {
        dst: ip([10, 96, 0, 11]),
        ..other
    };
    let (verdict, out) = h.run("from_gateway", &to_pod.frame(GW_MAC, GW_MAC));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(
        &out[26..30],
        &GW_V4,
        "a pod endpoint sees the gateway address"
    );
}

/// A client outside the cluster reaching this node's NodePort.
fn node_port_client(client: [u8; 4]) -> Flow {
    Flow {
        src: ip(client),
        dst: ip(NODE_V4),
        proto: IPPROTO_TCP,
        src_port: CLIENT_PORT,
        dst_port: NODE_PORT,
    }
}

/// A NodePort over PEER with `flags`, reached from the uplink by OUTSIDE_V4; returns the client
/// flow and the output frame.
fn node_port(h: &mut Harness, flags: u32) -> (Flow, Vec<u8>) {
    let client = node_port_client(OUTSIDE_V4);
    add_service(
        h,
        frontend(client, scope::EXTERNAL),
        flags,
        &[(ip(PEER_V4), TARGET_PORT)],
    );
    let (verdict, out) = h.run("from_uplink", &client.frame(UPLINK_MAC, ROUTER_MAC));
    assert_eq!(verdict, TC_ACT_REDIRECT, "into the local endpoint");
    assert_checksums(&out);
    (client, out)
}

#[test]
fn uplink_snat_makes_the_gateway_the_source() {
    let mut h = harness(Setup::Encap);
    let (client, out) = node_port(&mut h, service_flags::SNAT);
    let natted = Flow {
        src: ip(GW_V4),
        dst: ip(PEER_V4),
        dst_port: TARGET_PORT,
        ..client
    };
    assert_eq!(out, natted.frame(PEER_MAC, GW_MAC));
    assert_eq!(
        nat_entries(&h),
        connection(client, natted, nat_flags::TO_EXTERNAL),
        "the reply leaves through the node's FIB"
    );
}

#[test]
fn uplink_without_snat_keeps_the_client_address() {
    let mut h = harness(Setup::Encap);
    let (client, out) = node_port(&mut h, 0);
    let natted = Flow {
        dst: ip(PEER_V4),
        dst_port: TARGET_PORT,
        ..client
    };
    assert_eq!(out, natted.frame(PEER_MAC, GW_MAC));
    assert_eq!(
        nat_entries(&h),
        connection(client, natted, nat_flags::TO_EXTERNAL)
    );
}

/// Two outside clients that happen to use the same source port: SNATed to the one gateway
/// address, the endpoint must still see two connections, and each needs its own way back, so
/// one of them must leave with another source port (as conntrack's NAT does on a clash).
#[test]
fn uplink_snat_keeps_clients_with_the_same_port_apart() {
    let mut h = harness(Setup::Encap);
    let (_, first) = node_port(&mut h, service_flags::SNAT);
    let other = node_port_client([1, 1, 1, 1]);
    let (verdict, second) = h.run("from_uplink", &other.frame(UPLINK_MAC, ROUTER_MAC));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    // Source address and port (and the destination, which is the same endpoint).
    let tuple = |frame: &[u8]| frame[26..38].to_vec();
    assert_ne!(
        tuple(&first),
        tuple(&second),
        "two connections leave with the same tuple: the endpoint merges them"
    );
    let reverse = nat_entries(&h)
        .values()
        .filter(|entry| entry.flags & nat_flags::REVERSE != 0)
        .count();
    assert_eq!(reverse, 2, "each client keeps its reverse entry");
}

#[test]
fn uplink_passes_what_is_no_external_frontend() {
    let mut h = harness(Setup::Encap);
    let cluster_ip = Kind::Ipv4Tcp.client();
    add_service(
        &mut h,
        frontend(cluster_ip, scope::INTERNAL),
        0,
        &[(ip(PEER_V4), TARGET_PORT)],
    );
    let ssh = Flow {
        dst_port: 22,
        ..node_port_client(OUTSIDE_V4)
    };
    // The ClusterIP exists only for pods and the node: from outside it is no frontend.
    let to_cluster_ip = Flow {
        src: ip(OUTSIDE_V4),
        ..cluster_ip
    };
    for flow in [ssh, to_cluster_ip] {
        let frame = flow.frame(UPLINK_MAC, ROUTER_MAC);
        assert_eq!(
            h.run("from_uplink", &frame),
            (TC_ACT_OK, frame),
            "{flow:?} goes on to the node untouched"
        );
    }
    assert!(nat_entries(&h).is_empty());
}

#[test]
fn uplink_answers_arp_for_owned_external_ips_only() {
    let mut h = harness(Setup::Encap);
    let owned = ExternalIp {
        mac: UPLINK_MAC,
        _pad: [0; 2],
    };
    h.maps
        .external_ips
        .insert(IpKey::v4(LB_IP_V4), owned, 0)
        .unwrap();
    let (verdict, out) = h.run("from_uplink", &arp(1, ROUTER_MAC, ROUTER_V4, LB_IP_V4));
    let mut reply = eth(ROUTER_MAC, UPLINK_MAC, 0x0806);
    reply.extend([0, 1, 0x08, 0, 6, 4, 0, 2]);
    reply.extend(UPLINK_MAC);
    reply.extend(LB_IP_V4);
    reply.extend(ROUTER_MAC);
    reply.extend(ROUTER_V4);
    assert_eq!(verdict, TC_ACT_REDIRECT, "sent back out of the uplink");
    assert_eq!(out, reply);
    let not_owned = arp(1, ROUTER_MAC, ROUTER_V4, NODE_V4);
    assert_eq!(
        h.run("from_uplink", &not_owned),
        (TC_ACT_OK, not_owned),
        "the node answers for its own address"
    );
}

#[test]
fn icmp_to_a_cluster_ip_passes_untouched() {
    let mut h = harness(Setup::Encap);
    local_pods(&mut h);
    let client = Kind::Ipv4Tcp.client();
    add_service(
        &mut h,
        frontend(client, scope::INTERNAL),
        0,
        &[(ip(PEER_V4), TARGET_PORT)],
    );
    // An echo request: type 8, code 0 where ports would be.
    let echo = ipv4_l4(POD_MAC, POD_V4, CLUSTER_IP_V4, 1, (0x0800, 0), 0);
    let (verdict, out) = h.run("from_pod", &echo);
    assert_eq!(
        verdict, TC_ACT_REDIRECT,
        "up to the node, like any address no pod has"
    );
    assert_eq!(out, echo);
    assert!(nat_entries(&h).is_empty());
}

/// The checksum helper the assertions above rely on: RFC 1071's own example, and a frame whose
/// payload changed no longer verifies.
#[test]
fn the_checksum_helper_is_rfc_1071() {
    assert_eq!(
        checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
        !0xddf2
    );
    let mut frame = Kind::Ipv4Tcp.client().frame(GW_MAC, POD_MAC);
    let offset = l4_checksum_offset(&frame);
    let carried = u16::from_be_bytes([frame[offset], frame[offset + 1]]);
    assert_eq!(carried, l4_checksum(&frame));
    let last = frame.len() - 1;
    frame[last] ^= 1;
    assert_ne!(carried, l4_checksum(&frame));
}

/// CRC32c (Castagnoli, reflected), SCTP's checksum (RFC 9260 appendix B).
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for byte in data {
        crc ^= *byte as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// An SCTP common header plus one chunk, its CRC32c (little-endian on the wire) filled in.
fn sctp_frame(src: [u8; 4], dst: [u8; 4], ports: (u16, u16)) -> Vec<u8> {
    let mut sctp = Vec::new();
    sctp.extend(ports.0.to_be_bytes());
    sctp.extend(ports.1.to_be_bytes());
    sctp.extend([0, 0, 0, 1, 0, 0, 0, 0]); // verification tag, checksum
    sctp.extend([1, 0, 0, 20, 0, 0, 0, 7, 0, 1, 0, 0, 0, 1, 0, 1, 0, 0, 0, 7]); // INIT
    let crc = crc32c(&sctp);
    sctp[8..12].copy_from_slice(&crc.to_le_bytes());
    let mut p = eth(GW_MAC, POD_MAC, 0x0800);
    p.extend([0x45, 0]);
    p.extend((20 + sctp.len() as u16).to_be_bytes());
    p.extend([0, 1, 0x40, 0, 64, 132, 0, 0]);
    p.extend(src);
    p.extend(dst);
    let sum = ipv4_header_checksum(&p);
    p[24..26].copy_from_slice(&sum.to_be_bytes());
    p.extend(sctp);
    p
}

/// SCTP reaches its endpoint: the destination address is rewritten and the IP header checksum
/// kept valid; SCTP's CRC32c covers no IP address (no pseudo-header), so with the Service port
/// equal to the target port it stays valid untouched. A port-changing SCTP Service would need
/// the CRC recomputed over the whole packet, which the datapath does not do (docs/services.md).
#[test]
fn sctp_reaches_its_endpoint_with_its_crc_intact() {
    let mut h = harness(Setup::Encap);
    local_pods(&mut h);
    let client = Flow {
        src: ip(POD_V4),
        dst: ip(CLUSTER_IP_V4),
        proto: 132,
        src_port: CLIENT_PORT,
        dst_port: 9000,
    };
    add_service(
        &mut h,
        frontend(client, scope::INTERNAL),
        0,
        &[(ip(PEER_V4), 9000)],
    );
    let (verdict, out) = h.run(
        "from_pod",
        &sctp_frame(POD_V4, CLUSTER_IP_V4, (CLIENT_PORT, 9000)),
    );
    assert_eq!(verdict, TC_ACT_REDIRECT, "redirected to the endpoint");
    assert_eq!(destination(&out), ip(PEER_V4));
    assert_eq!(
        ipv4_header_checksum(&out),
        u16::from_be_bytes([out[24], out[25]])
    );
    let mut sctp = out[34..].to_vec();
    let sent = u32::from_le_bytes(sctp[8..12].try_into().unwrap());
    sctp[8..12].fill(0);
    assert_eq!(crc32c(&sctp), sent, "the CRC32c still verifies");
    assert_eq!(nat_entries(&h).len(), 2, "the DNAT and its reverse");
}

/// Affinity lasts `timeoutSeconds` after the client's last connection: an entry older than that
/// is ignored, and the client is balanced again (and remembered anew).
#[test]
fn an_affinity_entry_past_its_timeout_is_ignored() {
    let mut h = harness(Setup::Encap);
    let (set, _) = three_endpoints(&mut h, service_flags::AFFINITY);
    let frontends: Vec<(ServiceKey, Service)> =
        h.maps.services.iter().map(Result::unwrap).collect();
    for (frontend, mut service) in frontends {
        service.affinity_timeout = 1;
        h.maps.services.insert(frontend, service, 0).unwrap();
    }
    let key = AffinityKey {
        backend_set: set,
        client: IpKey::v4(POD_V4),
    };
    let mut seen = BTreeSet::new();
    for i in 0..30 {
        seen.insert(destination(&connect(&mut h, CLIENT_PORT + i)));
        // Last used at boot: more than the 1 s timeout ago.
        let mut entry = affinity_entries(&h)[&key];
        entry.last_used = 0;
        h.maps.affinity.insert(key, entry, 0).unwrap();
    }
    assert!(
        seen.len() > 1,
        "expired affinity lets the client move: {seen:?}"
    );
    connect(&mut h, CLIENT_PORT + 30);
    assert!(
        affinity_entries(&h)[&key].last_used > 0,
        "the new pick is remembered"
    );
}

/// The uplink carries all of the node's traffic: what the programs cannot parse (a VLAN tag, an
/// IPv4 header announcing options it lacks) goes on to the node rather than being dropped, and
/// so does everything on a node whose datapath is not configured yet.
#[test]
fn uplink_never_drops_what_it_cannot_parse() {
    let inner = ipv4_tcp(ROUTER_MAC, OUTSIDE_V4, NODE_V4);
    let mut tagged = eth(UPLINK_MAC, ROUTER_MAC, 0x8100);
    tagged.extend([0, 100, 0x08, 0x00]);
    tagged.extend(&inner[14..]);
    let mut bad_ihl = inner.clone();
    bad_ihl[14] = 0x4f;
    let mut h = harness(Setup::Encap);
    for frame in [&tagged, &bad_ihl] {
        assert_eq!(h.run("from_uplink", frame), (TC_ACT_OK, frame.clone()));
    }
    let mut unconfigured = harness(Setup::Unconfigured);
    assert_eq!(
        unconfigured.run("from_uplink", &inner),
        (TC_ACT_OK, inner.clone())
    );
    let drops: u64 = h
        .maps
        .counters()
        .unwrap()
        .drops
        .iter()
        .map(|(_, n)| n)
        .sum();
    assert_eq!(drops, 0, "nothing counted as dropped");
}
