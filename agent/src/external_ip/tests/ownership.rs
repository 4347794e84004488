//! Which node answers for each IP.

use std::collections::BTreeSet;

use super::*;
use crate::external_ip::{owner::weight, Assignment};

/// 40 Services in a pool of 40 IPs, `cluster` as the nodes: IP → owner.
fn owners(cluster: &[Node]) -> BTreeMap<IpAddr, Option<String>> {
    let big = pool(
        "big",
        json!({"ipRanges": [{"start": "10.0.0.1", "end": "10.0.0.40"}]}),
    );
    let services: Vec<Service> = (0..40)
        .map(|i| lb(&format!("ns/s{i:02}"), "big", &[]))
        .collect();
    let state = run(&[big], &services, cluster, "any");
    assert_eq!(state.assignments.len(), 40);
    state
        .assignments
        .into_iter()
        .map(|(ip, a)| (ip, a.owner))
        .collect()
}

#[test]
fn ownership_is_deterministic_and_a_leaving_node_moves_only_its_ips() {
    let all = owners(&nodes(&["n1", "n2", "n3"]));
    assert_eq!(
        all,
        owners(&nodes(&["n3", "n1", "n2"])),
        "node order does not matter"
    );
    let counts = |owners: &BTreeMap<IpAddr, Option<String>>, node: &str| {
        owners
            .values()
            .filter(|o| o.as_deref() == Some(node))
            .count()
    };
    for n in ["n1", "n2", "n3"] {
        assert!(counts(&all, n) >= 5, "{n} owns a share: {all:?}");
    }
    for (gone, left) in [
        (nodes(&["n1", "n3"]), "n2"),
        (
            vec![
                node("n1", true, json!({})),
                node("n2", false, json!({})),
                node("n3", true, json!({})),
            ],
            "n2",
        ),
    ] {
        let after = owners(&gone);
        for (ip, owner) in &all {
            if owner.as_deref() == Some(left) {
                assert_ne!(after[ip].as_deref(), Some(left));
            } else {
                assert_eq!(&after[ip], owner, "{ip} stays where it was");
            }
        }
    }
}

#[test]
fn owners_match_the_node_selector_and_without_one_nobody_answers() {
    let edge = pool(
        "edge",
        json!({"ipRanges": [{"cidr": "10.0.0.0/28"}], "nodeSelector": {"matchLabels": {"role": "edge"}}}),
    );
    let services: Vec<Service> = (0..8)
        .map(|i| lb(&format!("ns/s{i}"), "edge", &[]))
        .collect();
    let cluster = [
        node("plain", true, json!({})),
        node("edge-1", true, json!({"role": "edge"})),
        node("edge-2", false, json!({"role": "edge"})),
    ];
    let state = run(std::slice::from_ref(&edge), &services, &cluster, "edge-1");
    assert!(state
        .assignments
        .values()
        .all(|a| a.owner.as_deref() == Some("edge-1")));
    assert_eq!(
        state.owned,
        state.assignments.keys().copied().collect::<BTreeSet<_>>()
    );
    assert_eq!(
        run(std::slice::from_ref(&edge), &services, &cluster, "plain").owned,
        BTreeSet::new()
    );

    let state = run(&[edge], &services, &cluster[..1], "plain");
    assert_eq!(state.assignments.len(), 8, "IPs are still handed out");
    assert!(state.assignments.values().all(|a| a.owner.is_none()));
    assert_eq!(state.owned, BTreeSet::new());
}

#[test]
fn owned_is_this_nodes_share_of_the_assignments() {
    let services: Vec<Service> = (0..2)
        .map(|i| lb(&format!("ns/s{i}"), "small", &[]))
        .collect();
    let cluster = nodes(&["n1", "n2"]);
    let mut union = BTreeSet::new();
    for me in ["n1", "n2"] {
        let state = run(&[small_pool()], &services, &cluster, me);
        let mine: BTreeSet<IpAddr> = state
            .assignments
            .iter()
            .filter(|(_, Assignment { owner, .. })| owner.as_deref() == Some(me))
            .map(|(ip, _)| *ip)
            .collect();
        assert_eq!(state.owned, mine);
        union.extend(mine);
    }
    assert_eq!(union, BTreeSet::from([ip("10.0.0.1"), ip("10.0.0.2")]));
}

#[test]
fn the_weight_hash_never_changes() {
    // Agents of different builds must pick the same owners: these values are fixed forever
    // (checked against an independent FNV-1a + fmix64 implementation).
    assert_eq!(weight(ip("10.0.0.1"), "node-a"), 7_965_007_438_334_358_879);
    assert_eq!(weight(ip("fd00::1"), "node-a"), 17_451_833_200_180_776_274);
}
