//! ConntrackState, EgressRule/EgressDefaultRule, IngressRule/IngressDefaultRule and their
//! metrics and events, with crafted packets through BPF_PROG_TEST_RUN. The maps are filled by
//! hand here, the way the policy compiler fills them.

use sluice_agent::model::policy::PolicyLpmKey;
use sluice_common::{
    ct_flags, identity, DropReason, EndpointPolicy, IpKey, PolicyEvent, PolicyKey, PolicyRule,
    DIRECTION_EGRESS, DIRECTION_INGRESS, POLICY_KEY_EXACT_BITS, PROTO_ANY, VERDICT_ALLOW,
    VERDICT_DROP,
};
use sluice_tests::test_run::*;

const TCP: u8 = 6;
const UDP: u8 = 17;
const SCTP: u8 = 132;
const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const FIN: u8 = 0x01;
const PEER_ID: u32 = 300;
const EGRESS_POLICY: u32 = 1;
const INGRESS_POLICY: u32 = 2;

fn packet(proto: u8, src: [u8; 4], dst: [u8; 4], ports: (u16, u16), flags: u8) -> Vec<u8> {
    ipv4_l4(POD_MAC, src, dst, proto, ports, flags)
}

fn from_pod_to_peer(proto: u8, dport: u16) -> Vec<u8> {
    packet(proto, POD_V4, PEER_V4, (40000, dport), SYN)
}

fn events(h: &mut Harness) -> Vec<PolicyEvent> {
    let mut out = Vec::new();
    while let Some(item) = h.maps.policy_events.next() {
        // SAFETY: the programs write whole PolicyEvents into this ring.
        out.push(unsafe { std::ptr::read_unaligned(item.as_ptr() as *const PolicyEvent) });
    }
    out
}

#[test]
fn pods_no_policy_isolates_skip_conntrack_and_policy() {
    let mut h = harness(Setup::Encap);
    let (verdict, _) = h.run("from_pod", &from_pod_to_peer(TCP, 80));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(
        h.maps.conntrack.keys().count(),
        0,
        "no conntrack entry without isolation"
    );
}

#[test]
fn egress_isolation_without_rules_denies_and_reports() {
    let mut h = harness(Setup::Encap);
    h.isolate(POD_V4, 0, EGRESS_POLICY);
    h.expect_drop(
        "from_pod",
        &from_pod_to_peer(TCP, 80),
        DropReason::EgressDenied,
    );
    let events = events(&mut h);
    assert_eq!(events.len(), 1);
    assert_eq!(
        (events[0].direction, events[0].verdict, events[0].rule),
        (DIRECTION_EGRESS, VERDICT_DROP, 0)
    );
    assert_eq!(
        (events[0].src, events[0].dst, events[0].dst_port),
        (IpKey::v4(POD_V4), IpKey::v4(PEER_V4), 80)
    );
}

#[test]
fn egress_rule_matches_peer_protocol_and_port_and_counts() {
    let mut h = harness(Setup::Encap);
    h.isolate(POD_V4, 0, EGRESS_POLICY);
    h.identity_of(PEER_V4, 32, PEER_ID);
    h.allow(EGRESS_POLICY, PEER_ID, Some((TCP, 80, 16)), 7);
    let allowed = from_pod_to_peer(TCP, 80);
    assert_eq!(h.run("from_pod", &allowed).0, TC_ACT_REDIRECT);
    h.expect_drop(
        "from_pod",
        &from_pod_to_peer(TCP, 81),
        DropReason::EgressDenied,
    );
    h.expect_drop(
        "from_pod",
        &from_pod_to_peer(UDP, 80),
        DropReason::EgressDenied,
    );
    // Another peer (not the identity the rule names) is denied.
    h.expect_drop(
        "from_pod",
        &packet(TCP, POD_V4, OUTSIDE_V4, (40000, 80), SYN),
        DropReason::EgressDenied,
    );
    let stats = h.maps.rule_stats.get(&7, 0).unwrap();
    let packets: u64 = stats.iter().map(|s| s.packets).sum();
    let bytes: u64 = stats.iter().map(|s| s.bytes).sum();
    assert_eq!(
        (packets, bytes),
        (1, allowed.len() as u64),
        "EgressMetric of rule 7"
    );
    let first = &events(&mut h)[0];
    assert_eq!((first.verdict, first.rule), (VERDICT_ALLOW, 7));
}

#[test]
fn port_ranges_are_lpm_prefixes() {
    let mut h = harness(Setup::Encap);
    h.isolate(POD_V4, 0, EGRESS_POLICY);
    // 1024..=2047 is the 6-bit port prefix 0b000001.
    h.allow(EGRESS_POLICY, identity::ANY, Some((TCP, 1024, 6)), 9);
    for port in [1024, 1500, 2047] {
        assert_eq!(
            h.run("from_pod", &from_pod_to_peer(TCP, port)).0,
            TC_ACT_REDIRECT,
            "port {port}"
        );
    }
    for port in [1023, 2048, 80] {
        h.expect_drop(
            "from_pod",
            &from_pod_to_peer(TCP, port),
            DropReason::EgressDenied,
        );
    }
}

#[test]
fn sctp_and_any_protocol_rules() {
    let mut h = harness(Setup::Encap);
    h.isolate(POD_V4, 0, EGRESS_POLICY);
    h.identity_of(PEER_V4, 32, PEER_ID);
    h.allow(EGRESS_POLICY, PEER_ID, Some((SCTP, 9000, 16)), 11);
    assert_eq!(
        h.run("from_pod", &from_pod_to_peer(SCTP, 9000)).0,
        TC_ACT_REDIRECT
    );
    h.expect_drop(
        "from_pod",
        &from_pod_to_peer(SCTP, 9001),
        DropReason::EgressDenied,
    );
    h.expect_drop(
        "from_pod",
        &from_pod_to_peer(UDP, 9000),
        DropReason::EgressDenied,
    );
    // A rule without ports: every protocol and port to that peer.
    h.allow(EGRESS_POLICY, PEER_ID, None, 12);
    assert_eq!(
        h.run("from_pod", &from_pod_to_peer(UDP, 53)).0,
        TC_ACT_REDIRECT
    );
}

#[test]
fn ip_blocks_use_the_longest_prefix_identity() {
    let mut h = harness(Setup::Encap);
    h.isolate(POD_V4, 0, EGRESS_POLICY);
    // ipBlock 10.0.0.0/8 except 10.1.0.0/16: the except is its own identity without the rule.
    h.identity_of([10, 0, 0, 0], 8, 400);
    h.identity_of([10, 1, 0, 0], 16, 401);
    h.allow(EGRESS_POLICY, 400, None, 13);
    assert_eq!(
        h.run(
            "from_pod",
            &packet(UDP, POD_V4, [10, 2, 3, 4], (5000, 53), 0)
        )
        .0,
        TC_ACT_REDIRECT
    );
    h.expect_drop(
        "from_pod",
        &packet(UDP, POD_V4, [10, 1, 2, 3], (5000, 53), 0),
        DropReason::EgressDenied,
    );
    h.expect_drop(
        "from_pod",
        &packet(UDP, POD_V4, OUTSIDE_V4, (5000, 53), 0),
        DropReason::EgressDenied,
    );
}

#[test]
fn established_connections_are_not_judged_again() {
    let mut h = harness(Setup::Encap);
    // The pod may open connections to the peer's port 80, and nothing may come in.
    h.isolate(POD_V4, INGRESS_POLICY, EGRESS_POLICY);
    h.identity_of(PEER_V4, 32, PEER_ID);
    h.allow(EGRESS_POLICY, PEER_ID, Some((TCP, 80, 16)), 7);
    assert_eq!(
        h.run("from_pod", &from_pod_to_peer(TCP, 80)).0,
        TC_ACT_REDIRECT
    );
    // The reply comes back (through the tunnel here): established, so not judged.
    let reply = ipv4_l4(GW_MAC, PEER_V4, POD_V4, TCP, (80, 40000), SYN | ACK);
    assert_eq!(
        h.run("from_tunnel", &reply).0,
        TC_ACT_REDIRECT,
        "reply of an allowed connection"
    );
    // A new connection from the peer is judged, and no ingress rule allows it.
    let new = ipv4_l4(GW_MAC, PEER_V4, POD_V4, TCP, (41000, 22), SYN);
    h.expect_drop("from_tunnel", &new, DropReason::IngressDenied);
    let entries: Vec<_> = h.maps.conntrack.iter().map(|e| e.unwrap().1).collect();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].egress_rule, 7);
    assert!(
        entries[0].flags & ct_flags::SYN_ACK != 0,
        "SYN-ACK seen: established timeout"
    );
    // FIN marks it closing (short timeout).
    let fin = packet(TCP, POD_V4, PEER_V4, (40000, 80), FIN | ACK);
    assert_eq!(h.run("from_pod", &fin).0, TC_ACT_REDIRECT);
    let flags = h
        .maps
        .conntrack
        .iter()
        .map(|e| e.unwrap().1.flags)
        .next()
        .unwrap();
    assert!(flags & ct_flags::CLOSING != 0);
}

#[test]
fn ingress_rules_and_the_host_exception() {
    let mut h = harness(Setup::Encap);
    h.isolate(PEER_V4, INGRESS_POLICY, 0);
    h.identity_of(GW_V4, 32, identity::HOST);
    h.identity_of(REMOTE_POD_V4, 32, 500);
    h.allow(INGRESS_POLICY, 500, Some((UDP, 53, 16)), 21);
    // From a remote pod: only UDP 53.
    let dns = ipv4_l4(GW_MAC, REMOTE_POD_V4, PEER_V4, UDP, (5353, 53), 0);
    assert_eq!(h.run("from_tunnel", &dns).0, TC_ACT_REDIRECT);
    let other = ipv4_l4(GW_MAC, REMOTE_POD_V4, PEER_V4, UDP, (5353, 54), 0);
    h.expect_drop("from_tunnel", &other, DropReason::IngressDenied);
    // From a local pod (same node): judged in from_pod.
    h.expect_drop(
        "from_pod",
        &from_pod_to_peer(TCP, 80),
        DropReason::IngressDenied,
    );
    // From the node (kubelet probes): always in.
    let probe = ipv4_l4(GW_MAC, GW_V4, PEER_V4, TCP, (33000, 8080), SYN);
    assert_eq!(h.run("from_gateway", &probe).0, TC_ACT_REDIRECT);
    let seen = events(&mut h);
    assert!(seen
        .iter()
        .any(|e| e.direction == DIRECTION_INGRESS && e.verdict == VERDICT_ALLOW && e.rule == 21));
}

/// The agent's sync writes and removes entries where the datapath looks (POLICY_EXACT for
/// single ports, any port and any protocol; POLICY for ranges) and reads them back the same.
#[test]
fn policy_sync_round_trips_through_both_maps() {
    use sluice_agent::model::policy::PolicyTables;
    let mut h = harness(Setup::Encap);
    let entry = |peer: u32, proto: u8, port: u16, bits: u32| {
        let key = PolicyKey {
            policy: EGRESS_POLICY,
            peer,
            proto,
            _pad: 0,
            port: port.to_be_bytes(),
        };
        (
            PolicyLpmKey {
                key,
                prefix_len: POLICY_KEY_EXACT_BITS + bits,
            },
            PolicyRule { rule: peer },
        )
    };
    let mut first = PolicyTables::default();
    first.policy.extend([
        entry(300, PROTO_ANY, 0, 0),
        entry(301, TCP, 0, 0),
        entry(302, TCP, 80, 16),
        entry(303, TCP, 1024, 6),
    ]);
    first.endpoint_policy.insert(
        IpKey::v4(POD_V4),
        EndpointPolicy {
            ingress_policy: 0,
            egress_policy: EGRESS_POLICY,
        },
    );
    h.maps.sync_policy(&first).unwrap();
    assert_eq!(h.maps.policy_tables().unwrap().policy, first.policy);
    let mut second = PolicyTables::default();
    second.policy.extend([entry(304, UDP, 53, 16)]);
    second.endpoint_policy = first.endpoint_policy.clone();
    h.maps.sync_policy(&second).unwrap();
    assert_eq!(h.maps.policy_tables().unwrap().policy, second.policy);
    assert_eq!(h.maps.policy_exact.keys().count(), 1);
    assert_eq!(h.maps.policy.keys().count(), 0);
}

/// A sync diffs against what the previous one wrote, plus what was isolated pending since (a
/// CNI ADD): a pending entry the next sync does not want goes, one it wants is replaced, and
/// the pod's packets are judged by the result.
#[test]
fn a_sync_replaces_what_was_isolated_pending_since_the_last_one() {
    use sluice_agent::model::policy::PolicyTables;
    let mut h = harness(Setup::Encap);
    h.maps.sync_policy(&PolicyTables::default()).unwrap();
    // The ADD of the pod: it allows nothing until the policy round has seen it.
    h.maps.isolate_pending(&[IpKey::v4(POD_V4)]).unwrap();
    h.expect_drop(
        "from_pod",
        &from_pod_to_peer(TCP, 80),
        DropReason::EgressDenied,
    );
    // No policy selects it: the round removes the entry, and it is open.
    h.maps.sync_policy(&PolicyTables::default()).unwrap();
    assert_eq!(h.maps.endpoint_policy.keys().count(), 0);
    assert_eq!(
        h.run("from_pod", &from_pod_to_peer(TCP, 80)).0,
        TC_ACT_REDIRECT
    );

    // Pending again; this time the round isolates its egress and allows TCP 80 to the peer.
    h.maps.isolate_pending(&[IpKey::v4(POD_V4)]).unwrap();
    let mut desired = PolicyTables::default();
    let isolated = EndpointPolicy {
        ingress_policy: 0,
        egress_policy: EGRESS_POLICY,
    };
    desired.endpoint_policy.insert(IpKey::v4(POD_V4), isolated);
    let peer = std::net::Ipv4Addr::from(PEER_V4);
    desired.ipcache.insert(
        sluice_agent::model::CidrKey::new(ipnetwork::IpNetwork::V4(
            ipnetwork::Ipv4Network::new(peer, 32).unwrap(),
        )),
        sluice_common::Identity { id: PEER_ID },
    );
    let key = PolicyKey {
        policy: EGRESS_POLICY,
        peer: PEER_ID,
        proto: TCP,
        _pad: 0,
        port: 80u16.to_be_bytes(),
    };
    desired.policy.insert(
        PolicyLpmKey {
            key,
            prefix_len: POLICY_KEY_EXACT_BITS + 16,
        },
        PolicyRule { rule: 7 },
    );
    h.maps.sync_policy(&desired).unwrap();
    assert_eq!(
        h.maps.endpoint_policy.get(&IpKey::v4(POD_V4), 0).unwrap(),
        isolated
    );
    assert_eq!(
        h.run("from_pod", &from_pod_to_peer(TCP, 80)).0,
        TC_ACT_REDIRECT
    );
    h.expect_drop(
        "from_pod",
        &from_pod_to_peer(TCP, 81),
        DropReason::EgressDenied,
    );
    // What the sync recorded is what the kernel holds.
    let kernel = h.maps.policy_tables().unwrap();
    assert_eq!(
        (kernel.endpoint_policy, kernel.ipcache.len(), kernel.policy),
        (
            desired.endpoint_policy,
            desired.ipcache.len(),
            desired.policy
        )
    );
}
