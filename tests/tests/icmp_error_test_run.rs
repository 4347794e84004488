//! ICMP errors that belong to a connection, through BPF_PROG_TEST_RUN: they pass an isolated
//! pod's policy as related traffic (path MTU discovery, port unreachable), and one about a
//! load-balanced connection reaches the client quoting the Service's address, with the quoted
//! header's and the ICMP checksums valid (recomputed from scratch).

use sluice_common::{scope, DropReason, EndpointPolicy, IpKey};
use sluice_tests::test_run::*;

mod service_fixtures;
use service_fixtures::*;

/// ICMP type 3 code 4 (fragmentation needed, next-hop MTU 1400) from `from` to `to`, quoting
/// the IPv4 header and first 8 bytes of `quoted` (a frame).
fn frag_needed(from: [u8; 4], to: [u8; 4], quoted: &[u8], dst_mac: [u8; 6]) -> Vec<u8> {
    let mut icmp = vec![3, 4, 0, 0, 0, 0, 0x05, 0x78];
    icmp.extend(&quoted[14..14 + 20 + 8]);
    let sum = checksum(&icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let mut frame = eth(dst_mac, GW_MAC, 0x0800);
    frame.extend([0x45, 0xc0]);
    frame.extend((20 + icmp.len() as u16).to_be_bytes());
    frame.extend([0, 0, 0, 0, 64, 1, 0, 0]);
    frame.extend(from);
    frame.extend(to);
    frame.extend(icmp);
    let sum = ipv4_header_checksum(&frame);
    frame[24..26].copy_from_slice(&sum.to_be_bytes());
    frame
}

/// Both checksums of an ICMPv4 error frame, and the quoted header's, are right.
fn assert_icmp_checksums(frame: &[u8]) {
    assert_eq!(
        u16::from_be_bytes([frame[24], frame[25]]),
        ipv4_header_checksum(frame),
        "outer IPv4 header checksum"
    );
    let icmp = &frame[34..];
    let mut zeroed = icmp.to_vec();
    zeroed[2..4].fill(0);
    assert_eq!(
        u16::from_be_bytes([icmp[2], icmp[3]]),
        checksum(&zeroed),
        "ICMP checksum"
    );
    let mut quoted = icmp[8..28].to_vec();
    let carried = u16::from_be_bytes([quoted[10], quoted[11]]);
    quoted[10..12].fill(0);
    assert_eq!(carried, checksum(&quoted), "quoted IPv4 header checksum");
}

fn deny_all_ingress(h: &mut Harness, pod: [u8; 4]) {
    let isolated = EndpointPolicy {
        ingress_policy: 7,
        egress_policy: 0,
    };
    h.maps
        .endpoint_policy
        .insert(IpKey::v4(pod), isolated, 0)
        .unwrap();
}

#[test]
fn an_error_about_a_tracked_connection_reaches_an_isolated_pod() {
    let mut h = harness(Setup::Encap);
    local_pods(&mut h);
    deny_all_ingress(&mut h, POD_V4);
    // POD (isolated for ingress, free to connect out) talks to a remote pod.
    let out = Flow {
        src: ip(POD_V4),
        dst: ip(REMOTE_POD_V4),
        proto: IPPROTO_TCP,
        src_port: CLIENT_PORT,
        dst_port: TARGET_PORT,
    };
    let segment = out.frame(GW_MAC, POD_MAC);
    assert_eq!(h.run("from_pod", &segment).0, TC_ACT_REDIRECT);
    // The node on the way answers that the segment is too big.
    let error = frag_needed(GW_V4, POD_V4, &segment, POD_MAC);
    let (verdict, delivered) = h.run("from_gateway", &error);
    assert_eq!(verdict, TC_ACT_REDIRECT, "related: delivered to POD");
    assert_eq!(delivered, error, "nothing to translate");

    // About a connection POD never had: judged as new ingress, and POD lets nothing in.
    let other = Flow {
        src_port: CLIENT_PORT + 1,
        ..out
    };
    let unrelated = frag_needed(GW_V4, POD_V4, &other.frame(GW_MAC, POD_MAC), POD_MAC);
    let before = h
        .maps
        .counters()
        .unwrap()
        .drops_for(DropReason::IngressDenied);
    assert_eq!(h.run("from_tunnel", &unrelated).0, TC_ACT_SHOT);
    assert_eq!(
        h.maps
            .counters()
            .unwrap()
            .drops_for(DropReason::IngressDenied),
        before + 1
    );
}

#[test]
fn an_error_about_a_load_balanced_packet_quotes_the_frontend() {
    let mut h = harness(Setup::Encap);
    local_pods(&mut h);
    let client = Flow {
        src: ip(POD_V4),
        dst: ip(CLUSTER_IP_V4),
        proto: IPPROTO_UDP,
        src_port: CLIENT_PORT,
        dst_port: SERVICE_PORT,
    };
    add_service(
        &mut h,
        frontend(client, scope::INTERNAL),
        0,
        &[(ip(PEER_V4), TARGET_PORT)],
    );
    let (verdict, natted) = h.run("from_pod", &client.frame(GW_MAC, POD_MAC));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    // The endpoint, PEER, has nothing listening: its stack answers port unreachable, quoting
    // the datagram as it arrived (to PEER:8080).
    let mut unreachable = frag_needed(PEER_V4, POD_V4, &natted, GW_MAC);
    unreachable[34 + 1] = 3; // code 3: port unreachable
    unreachable[6..12].copy_from_slice(&PEER_MAC);
    let mut icmp = unreachable[34..].to_vec();
    icmp[2..4].fill(0);
    let sum = checksum(&icmp);
    unreachable[36..38].copy_from_slice(&sum.to_be_bytes());
    let (verdict, out) = h.run("from_pod", &unreachable);
    assert_eq!(verdict, TC_ACT_REDIRECT, "delivered to POD");
    assert_icmp_checksums(&out);
    // The quoted datagram is POD's own, to the frontend: what POD's socket knows.
    let quoted = &out[34 + 8..];
    assert_eq!(&quoted[12..16], &POD_V4, "quoted source");
    assert_eq!(&quoted[16..20], &CLUSTER_IP_V4, "quoted destination");
    assert_eq!(&quoted[20..22], &CLIENT_PORT.to_be_bytes());
    assert_eq!(&quoted[22..24], &SERVICE_PORT.to_be_bytes());
    // Header and ports as POD sent them; the quoted UDP checksum stays as the endpoint got it
    // (no receiver checks a quoted L4 checksum).
    let original = client.frame(GW_MAC, POD_MAC);
    assert_eq!(
        &quoted[..26],
        &original[14..40],
        "the datagram as POD sent it"
    );
    assert_eq!(
        &out[26..34],
        &[PEER_V4, POD_V4].concat(),
        "outer addresses kept"
    );
}
