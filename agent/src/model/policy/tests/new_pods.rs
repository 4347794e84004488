//! A pod this node's CNI has just wired: isolated as its policies say from its first packet,
//! whether or not the kubelet has written its addresses yet, and allowing nothing while its Pod
//! is unknown.

use super::*;
use crate::model::{LocalEndpoint, Mac, PodRef};

const PENDING_IP: &str = "10.244.0.9";

pub(super) fn wired(ip: &str, pod: Option<(&str, &str)>) -> LocalEndpoint {
    LocalEndpoint {
        container_id: format!("c-{ip}"),
        ifname: "eth0".into(),
        netns: "/run/netns/x".into(),
        host_ifname: "slx".into(),
        host_ifindex: 9,
        mac: Mac([0x0a, 0x58, 0, 0, 0, 9]),
        ips: vec![format!("{ip}/24").parse().unwrap()],
        pod: pod.map(|(namespace, name)| PodRef {
            namespace: namespace.into(),
            name: name.into(),
        }),
    }
}

fn deny_db_ingress(cluster: Cluster) -> Cluster {
    cluster.with(
        "prod",
        "db-deny",
        json!({ "podSelector": { "matchLabels": { "app": "db" } }, "policyTypes": ["Ingress"] }),
    )
}

#[test]
fn a_pod_without_status_addresses_gets_its_policies_from_the_cni() {
    // prod/pending (app=db) has no status yet; the CNI wired it with PENDING_IP.
    let mut cluster = deny_db_ingress(Cluster::new());
    cluster.wired = vec![wired(PENDING_IP, Some(("prod", "pending")))];
    let t = cluster.tables();
    let ep = t.endpoint_policy[&ip_key(PENDING_IP.parse().unwrap())];
    assert_eq!(ep.egress_policy, 0, "not isolated for egress: open");
    assert!(ep.ingress_policy != 0 && ep.ingress_policy != POLICY_PENDING);
    assert_eq!(judge(&t, Ingress, PENDING_IP, "10.244.1.3", TCP, 80), Drop);
    // Peers see it by its wired address too.
    assert_ne!(peer_identity(&t, PENDING_IP), identity::WORLD);
}

#[test]
fn a_pod_no_policy_selects_is_open_once_known() {
    let mut cluster = Cluster::new();
    cluster.wired = vec![wired(PENDING_IP, Some(("prod", "pending")))];
    let t = cluster.tables();
    assert!(!t
        .endpoint_policy
        .contains_key(&ip_key(PENDING_IP.parse().unwrap())));
}

#[test]
fn an_interface_whose_pod_is_unknown_allows_nothing() {
    let mut cluster = Cluster::new();
    cluster.wired = vec![
        wired(PENDING_IP, Some(("prod", "not-in-the-store-yet"))),
        wired("10.244.0.10", None),
    ];
    let t = cluster.tables();
    for ip in [PENDING_IP, "10.244.0.10"] {
        let ep = t.endpoint_policy[&ip_key(ip.parse().unwrap())];
        assert_eq!(
            (ep.ingress_policy, ep.egress_policy),
            (POLICY_PENDING, POLICY_PENDING),
            "{ip}"
        );
        assert_eq!(judge(&t, Egress, ip, "10.244.1.3", TCP, 80), Drop);
        assert_eq!(judge(&t, Ingress, ip, "10.244.1.3", TCP, 80), Drop);
    }
}

#[test]
fn an_interface_without_a_pod_name_is_known_by_its_status_address() {
    // Records of older agents carry no Pod name; web-1 reports 10.244.0.2.
    let mut cluster = Cluster::new();
    cluster.wired = vec![wired("10.244.0.2", None)];
    let t = cluster.tables();
    assert!(!t
        .endpoint_policy
        .contains_key(&ip_key("10.244.0.2".parse().unwrap())));
}

#[test]
fn a_finished_pod_still_wired_allows_nothing() {
    let mut cluster = Cluster::new();
    let web1 = cluster
        .pods
        .iter_mut()
        .find(|p| p.metadata.name.as_deref() == Some("web-1"))
        .unwrap();
    web1.status.as_mut().unwrap().phase = Some("Succeeded".into());
    cluster.wired = vec![wired("10.244.0.2", Some(("prod", "web-1")))];
    let t = cluster.tables();
    let ep = t.endpoint_policy[&ip_key("10.244.0.2".parse().unwrap())];
    assert_eq!(ep.egress_policy, POLICY_PENDING);
}

#[test]
fn a_restarted_agent_keeps_the_numbers_the_kernel_holds() {
    let cluster = deny_db_ingress(Cluster::new()).with(
        "prod",
        "web-in",
        json!({ "podSelector": { "matchLabels": { "app": "web" } },
            "ingress": [{ "from": [{ "ipBlock": { "cidr": "10.9.0.0/16" } }] }] }),
    );
    let kernel = cluster.tables();
    // While the agent was down a pod with a lower address came: numbered from scratch, every
    // identity after it would shift by one.
    let mut changed = cluster;
    changed.pods.push(pod(
        "dev",
        "early",
        "n2",
        &["10.0.0.1"],
        json!({}),
        json!([]),
    ));
    let fresh = changed.tables();
    let restarted = changed.compile(&mut Allocator::seeded(&kernel));
    let mut shifted = 0;
    for (prefix, identity) in &kernel.ipcache {
        assert_eq!(
            restarted.ipcache.get(prefix),
            Some(identity),
            "{:?}",
            prefix.cidr()
        );
        shifted += usize::from(fresh.ipcache.get(prefix) != Some(identity));
    }
    assert!(shifted > 0, "the case must renumber without seeding");
    for (ip, ep) in &kernel.endpoint_policy {
        assert_eq!(restarted.endpoint_policy.get(ip), Some(ep));
    }
    assert_ne!(
        peer_identity(&restarted, "10.0.0.1"),
        identity::WORLD,
        "the new pod got a number of its own"
    );
}

#[test]
fn a_pod_wired_while_the_compile_ran_stays_isolated_pending() {
    // Compiled for one interface; another was wired before the tables reached the maps.
    let mut cluster = Cluster::new();
    let before = vec![wired(PENDING_IP, Some(("prod", "pending")))];
    cluster.wired = before.clone();
    let mut t = cluster.tables();
    assert!(t.endpoint_policy.is_empty(), "no policy: nothing isolated");
    let new_ip = "10.244.0.10";
    let now = vec![before[0].clone(), wired(new_ip, Some(("prod", "new")))];
    isolate_new(&mut t, &before, &now);
    assert_eq!(
        t.endpoint_policy[&ip_key(new_ip.parse().unwrap())],
        EndpointPolicy {
            ingress_policy: POLICY_PENDING,
            egress_policy: POLICY_PENDING,
        }
    );
    assert_eq!(
        t.endpoint_policy.len(),
        1,
        "the compiled pod keeps its entry (none)"
    );
}
