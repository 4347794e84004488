use super::*;

fn net(text: &str) -> IpNetwork {
    text.parse().unwrap()
}

fn ipam(cluster: &[(&str, u8)], services: &[&str]) -> NodeIpam {
    NodeIpam::new(&NodeIpamSettings {
        cluster_cidrs: cluster.iter().map(|&(c, m)| (net(c), m)).collect(),
        service_cidrs: services.iter().map(|s| net(s)).collect(),
    })
}

#[test]
fn blocks_are_handed_out_round_robin_one_per_family() {
    let mut ipam = ipam(&[("10.244.0.0/16", 24), ("fd00:10:244::/56", 64)], &[]);
    assert_eq!(
        ipam.allocate("a").unwrap(),
        vec![net("10.244.0.0/24"), net("fd00:10:244::/64")]
    );
    assert_eq!(
        ipam.allocate("b").unwrap(),
        vec![net("10.244.1.0/24"), net("fd00:10:244:1::/64")]
    );
    // Asking again gives the same blocks.
    assert_eq!(ipam.allocate("a").unwrap()[0], net("10.244.0.0/24"));
    // Released blocks are not reused before the others (round robin).
    ipam.release("a");
    assert_eq!(ipam.allocate("c").unwrap()[0], net("10.244.2.0/24"));
}

#[test]
fn an_existing_pod_cidr_takes_precedence_and_its_block_is_never_handed_out() {
    let mut ipam = ipam(&[("10.244.0.0/16", 24)], &[]);
    assert!(ipam.observe("kubeadm", &[net("10.244.0.0/24")]).is_empty());
    assert_eq!(ipam.allocate("new").unwrap(), vec![net("10.244.1.0/24")]);
    // A podCIDR wider than the node mask takes every block it covers.
    assert!(ipam.observe("wide", &[net("10.244.4.0/22")]).is_empty());
    let handed: Vec<IpNetwork> = (0..4)
        .map(|i| ipam.allocate(&format!("n{i}")).unwrap()[0])
        .collect();
    assert_eq!(
        handed,
        [
            "10.244.2.0/24",
            "10.244.3.0/24",
            "10.244.8.0/24",
            "10.244.9.0/24"
        ]
        .map(net)
    );
}

#[test]
fn restart_rebuilds_from_the_nodes() {
    let mut first = ipam(&[("10.244.0.0/16", 24)], &[]);
    let a = first.allocate("a").unwrap();
    let b = first.allocate("b").unwrap();
    let mut second = ipam(&[("10.244.0.0/16", 24)], &[]);
    assert!(second.observe("a", &a).is_empty());
    assert!(second.observe("b", &b).is_empty());
    let c = second.allocate("c").unwrap()[0];
    assert!(c != a[0] && c != b[0], "{c} was already handed out");
}

#[test]
fn service_cidrs_are_never_handed_out() {
    let mut ipam = ipam(&[("10.96.0.0/22", 24)], &["10.96.1.0/24"]);
    let handed: Vec<IpNetwork> = (0..3)
        .map(|i| ipam.allocate(&format!("n{i}")).unwrap()[0])
        .collect();
    assert_eq!(
        handed,
        ["10.96.0.0/24", "10.96.2.0/24", "10.96.3.0/24"].map(net)
    );
    assert!(ipam.allocate("n3").is_err());
}

#[test]
fn exhaustion_names_the_cluster_cidr_and_takes_nothing() {
    let mut ipam = ipam(&[("10.244.0.0/23", 24), ("fd00::/63", 64)], &[]);
    ipam.observe("v6-only", &[net("fd00::/64")]);
    ipam.allocate("a").unwrap();
    let err = ipam.allocate("b").unwrap_err();
    assert_eq!(
        err.to_string(),
        "no free /64 block left in cluster CIDR fd00::/63 for node b"
    );
    // The IPv4 block it took first went back: node c gets it once the v6 block is freed.
    ipam.release("v6-only");
    assert_eq!(ipam.allocate("c").unwrap()[0], net("10.244.1.0/24"));
    assert!(ipam.allocate("d").is_err());
}

#[test]
fn a_block_is_released_only_when_nothing_else_holds_it() {
    let mut ipam = ipam(&[("10.244.0.0/23", 24)], &[]);
    assert!(ipam.observe("a", &[net("10.244.0.0/24")]).is_empty());
    // b duplicates a's block (two allocators at work): reported, and the block stays taken
    // while either holds it.
    assert_eq!(
        ipam.observe("b", &[net("10.244.0.0/24")]),
        vec![Conflict::HeldByNode {
            pod_cidr: net("10.244.0.0/24"),
            other: "a".into()
        }]
    );
    ipam.release("a");
    assert_eq!(ipam.allocate("c").unwrap(), vec![net("10.244.1.0/24")]);
    assert!(ipam.allocate("d").is_err(), "b still holds 10.244.0.0/24");
    ipam.release("b");
    assert_eq!(ipam.allocate("d").unwrap(), vec![net("10.244.0.0/24")]);
}

#[test]
fn conflicts_are_reported_and_the_pod_cidr_kept() {
    let mut ipam = ipam(&[("10.244.0.0/16", 24)], &["10.96.0.0/12"]);
    let outside = ipam.observe("platform", &[net("10.96.5.0/24")]);
    assert_eq!(
        outside,
        vec![
            Conflict::OutsideClusterCidrs {
                pod_cidr: net("10.96.5.0/24"),
                cluster_cidrs: vec![net("10.244.0.0/16")]
            },
            Conflict::OverlapsServiceCidr {
                pod_cidr: net("10.96.5.0/24"),
                service_cidr: net("10.96.0.0/12")
            },
        ]
    );
    assert_eq!(
        outside[0].to_string(),
        "podCIDR 10.96.5.0/24 is outside the cluster CIDRs (10.244.0.0/16); kept, as a Node's podCIDR takes precedence"
    );
    assert_eq!(ipam.pod_cidrs("platform"), Some(&[net("10.96.5.0/24")][..]));
    // Outside the cluster CIDRs, duplicates are still found.
    assert_eq!(
        ipam.observe("twin", &[net("10.96.5.0/25")])[1],
        Conflict::HeldByNode {
            pod_cidr: net("10.96.5.0/25"),
            other: "platform".into()
        }
    );
    // The others are still served.
    assert_eq!(ipam.allocate("next").unwrap(), vec![net("10.244.0.0/24")]);
}

#[test]
fn observing_the_same_cidrs_again_reports_nothing_new() {
    let mut ipam = ipam(&[("10.244.0.0/16", 24)], &[]);
    let a = ipam.allocate("a").unwrap();
    assert!(ipam.observe("a", &a).is_empty());
    ipam.observe("b", &a);
    assert!(ipam.observe("b", &a).is_empty(), "reported once per change");
}

#[test]
fn a_large_cluster_cidr_is_served_without_scanning_it() {
    // 2^22 blocks of /30 in a /8: allocation costs the run of taken blocks, not the set.
    let mut ipam = ipam(&[("10.0.0.0/8", 30)], &[]);
    let start = std::time::Instant::now();
    for i in 0..10_000 {
        ipam.allocate(&format!("n{i}")).unwrap();
    }
    assert_eq!(ipam.allocate("last").unwrap(), vec![net("10.0.156.64/30")]);
    assert!(start.elapsed() < std::time::Duration::from_secs(2));
}

#[test]
fn a_cluster_cidr_holding_a_node_address_is_reported() {
    let ipam = ipam(&[("10.0.0.0/8", 24)], &[]);
    let addresses = [
        ("10.0.0.5".parse().unwrap(), "InternalIP".to_string()),
        ("192.168.1.5".parse().unwrap(), "ExternalIP".to_string()),
    ];
    let found = ipam.address_conflicts(&addresses);
    assert_eq!(found.len(), 1);
    assert_eq!(
        found[0].to_string(),
        "cluster CIDR 10.0.0.0/8 overlaps the Node's address 10.0.0.5 (InternalIP)"
    );
}
