//! IPv4 fragments through BPF_PROG_TEST_RUN: a datagram's later fragments carry no L4 header,
//! so the Classifier gives them the ports their first fragment carried (FRAGMENTS), and they meet
//! the same Service and the same policy. A later fragment whose first was never seen is dropped
//! and counted (`FragmentWithoutFirst`).

use aya::maps::lpm_trie::Key;
use sluice_agent::model::policy::PolicyLpmKey;
use sluice_common::{
    scope, DropReason, EndpointPolicy, Identity, IpKey, PolicyKey, PolicyRule, IP_KEY_PREFIX_BITS,
    POLICY_KEY_EXACT_BITS,
};
use sluice_tests::test_run::*;

mod service_fixtures;
use service_fixtures::*;

/// UDP payload of the datagram: 40 bytes, so that the first fragment's 24 bytes of L4 (header
/// and 16 bytes) end on an 8-byte boundary and the later one carries the other 24.
const DATAGRAM_PAYLOAD: [u8; 40] = *b"0123456789abcdefghijklmnopqrstuvwxyzABCD";
const FIRST_L4_BYTES: usize = 24;
const L4: usize = 34;

/// The two fragments of a UDP datagram of `flow` with IP identification `id`, checksums valid
/// for the datagram as a whole.
fn fragments(flow: Flow, id: u16, src_mac: [u8; 6]) -> [Vec<u8>; 2] {
    let (std::net::IpAddr::V4(src), std::net::IpAddr::V4(dst)) = (flow.src, flow.dst) else {
        panic!("IPv4 fragments");
    };
    let mut l4 = Vec::new();
    l4.extend(flow.src_port.to_be_bytes());
    l4.extend(flow.dst_port.to_be_bytes());
    l4.extend((8 + DATAGRAM_PAYLOAD.len() as u16).to_be_bytes());
    l4.extend([0, 0]);
    l4.extend(DATAGRAM_PAYLOAD);
    let sum = udp_checksum(src.octets(), dst.octets(), &l4);
    l4[6..8].copy_from_slice(&sum.to_be_bytes());
    let fragment = |chunk: &[u8], flags_offset: u16| {
        let mut p = eth(GW_MAC, src_mac, 0x0800);
        p.extend([0x45, 0]);
        p.extend((20 + chunk.len() as u16).to_be_bytes());
        p.extend(id.to_be_bytes());
        p.extend(flags_offset.to_be_bytes());
        p.extend([64, IPPROTO_UDP, 0, 0]);
        p.extend(src.octets());
        p.extend(dst.octets());
        p.extend(chunk);
        let sum = ipv4_header_checksum(&p);
        p[24..26].copy_from_slice(&sum.to_be_bytes());
        p
    };
    let more_fragments = 0x2000;
    let later_offset = (FIRST_L4_BYTES / 8) as u16;
    [
        fragment(&l4[..FIRST_L4_BYTES], more_fragments),
        fragment(&l4[FIRST_L4_BYTES..], later_offset),
    ]
}

fn udp_checksum(src: [u8; 4], dst: [u8; 4], segment: &[u8]) -> u16 {
    let mut data = Vec::new();
    data.extend(src);
    data.extend(dst);
    data.extend([0, IPPROTO_UDP]);
    data.extend((segment.len() as u16).to_be_bytes());
    let mut segment = segment.to_vec();
    segment[6..8].fill(0);
    data.extend(segment);
    match checksum(&data) {
        0 => 0xffff,
        sum => sum,
    }
}

/// The datagram the receiver reassembles from two output fragments: its addresses (the later
/// fragment's must agree), ports, and whether its UDP checksum holds.
fn reassemble(first: &[u8], later: &[u8]) -> ([u8; 4], [u8; 4], u16, u16, bool) {
    assert_eq!(
        first[26..34],
        later[26..34],
        "both fragments carry the same addresses"
    );
    for fragment in [first, later] {
        assert_eq!(
            u16::from_be_bytes([fragment[24], fragment[25]]),
            ipv4_header_checksum(fragment),
            "IPv4 header checksum"
        );
    }
    let mut segment = first[L4..].to_vec();
    segment.extend(&later[L4..]);
    let src: [u8; 4] = first[26..30].try_into().unwrap();
    let dst: [u8; 4] = first[30..34].try_into().unwrap();
    let carried = u16::from_be_bytes([segment[6], segment[7]]);
    let valid = carried == udp_checksum(src, dst, &segment);
    let port = |at: usize| u16::from_be_bytes([segment[at], segment[at + 1]]);
    (src, dst, port(0), port(2), valid)
}

fn udp_client() -> Flow {
    Flow {
        src: ip(POD_V4),
        dst: ip(CLUSTER_IP_V4),
        proto: IPPROTO_UDP,
        src_port: CLIENT_PORT,
        dst_port: SERVICE_PORT,
    }
}

/// POD's datagram to a ClusterIP with a local endpoint (PEER), in two fragments.
fn load_balanced() -> (Harness, Flow) {
    let mut h = harness(Setup::Encap);
    local_pods(&mut h);
    let client = udp_client();
    add_service(
        &mut h,
        frontend(client, scope::INTERNAL),
        0,
        &[(ip(PEER_V4), TARGET_PORT)],
    );
    (h, client)
}

#[test]
fn a_load_balanced_datagram_in_fragments_reaches_the_endpoint_whole() {
    let (mut h, client) = load_balanced();
    let [first, later] = fragments(client, 0x1234, POD_MAC);
    let (verdict, first_out) = h.run("from_pod", &first);
    assert_eq!(verdict, TC_ACT_REDIRECT, "first fragment to the endpoint");
    let (verdict, later_out) = h.run("from_pod", &later);
    assert_eq!(verdict, TC_ACT_REDIRECT, "later fragment to the endpoint");
    assert_eq!(
        &later_out[L4..],
        &later[L4..],
        "nothing written into the later fragment's payload"
    );
    assert_eq!(
        &later_out[14..24],
        &later[14..24],
        "identification and fragment offset kept"
    );
    assert_eq!(
        reassemble(&first_out, &later_out),
        (POD_V4, PEER_V4, CLIENT_PORT, TARGET_PORT, true),
        "the endpoint reassembles the datagram DNATed, its UDP checksum valid"
    );
}

#[test]
fn the_endpoint_answers_in_fragments_from_the_frontend() {
    let (mut h, client) = load_balanced();
    let [first, _] = fragments(client, 0x1234, POD_MAC);
    assert_eq!(h.run("from_pod", &first).0, TC_ACT_REDIRECT);
    let reply = Flow {
        src: ip(PEER_V4),
        dst: ip(POD_V4),
        proto: IPPROTO_UDP,
        src_port: TARGET_PORT,
        dst_port: CLIENT_PORT,
    };
    let [first, later] = fragments(reply, 0x4321, PEER_MAC);
    let (verdict, first_out) = h.run("from_pod", &first);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let (verdict, later_out) = h.run("from_pod", &later);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(
        reassemble(&first_out, &later_out),
        (CLUSTER_IP_V4, POD_V4, SERVICE_PORT, CLIENT_PORT, true),
        "the client reassembles a datagram from the frontend"
    );
}

#[test]
fn a_later_fragment_without_its_first_is_dropped_and_counted() {
    let (mut h, client) = load_balanced();
    let [_, later] = fragments(client, 0x0777, POD_MAC);
    h.expect_drop("from_pod", &later, DropReason::FragmentWithoutFirst);
    // Another datagram's first fragment (same addresses, another identification) is no help.
    let [first, _] = fragments(client, 0x0778, POD_MAC);
    assert_eq!(h.run("from_pod", &first).0, TC_ACT_REDIRECT);
    h.expect_drop("from_pod", &later, DropReason::FragmentWithoutFirst);
}

/// PEER isolated for ingress, allowing UDP to SERVICE_PORT from POD only.
fn isolated_peer() -> Harness {
    let mut h = harness(Setup::Encap);
    local_pods(&mut h);
    let (policy, pod_identity) = (2, 300);
    let isolation = EndpointPolicy {
        ingress_policy: policy,
        egress_policy: 0,
    };
    h.maps
        .endpoint_policy
        .insert(IpKey::v4(PEER_V4), isolation, 0)
        .unwrap();
    let pod = Key::new(IP_KEY_PREFIX_BITS + 32, IpKey::v4(POD_V4));
    h.maps
        .ipcache
        .insert(&pod, Identity { id: pod_identity }, 0)
        .unwrap();
    let key = PolicyKey {
        policy,
        peer: pod_identity,
        proto: IPPROTO_UDP,
        _pad: 0,
        port: SERVICE_PORT.to_be_bytes(),
    };
    let lpm = PolicyLpmKey {
        key,
        prefix_len: POLICY_KEY_EXACT_BITS + 16,
    };
    h.maps.insert_policy(&lpm, PolicyRule { rule: 9 }).unwrap();
    h
}

fn to_peer(dst_port: u16) -> Flow {
    Flow {
        dst: ip(PEER_V4),
        dst_port,
        ..udp_client()
    }
}

#[test]
fn later_fragments_meet_the_policy_of_their_first() {
    let mut h = isolated_peer();
    let [first, later] = fragments(to_peer(SERVICE_PORT), 0x0100, POD_MAC);
    assert_eq!(h.run("from_pod", &first).0, TC_ACT_REDIRECT, "allowed port");
    assert_eq!(
        h.run("from_pod", &later).0,
        TC_ACT_REDIRECT,
        "its later fragment"
    );

    // Denied: the later fragment is judged by its datagram's port, not let through port-less.
    let [first, later] = fragments(to_peer(SERVICE_PORT + 1), 0x0101, POD_MAC);
    h.expect_drop("from_pod", &first, DropReason::IngressDenied);
    h.expect_drop("from_pod", &later, DropReason::IngressDenied);
}
