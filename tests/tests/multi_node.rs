//! Two nodes on the lab: agents driven through the embedded API server by kube-rs, pods wired by
//! the kubelet simulator through `sluice-cni`, real TCP/UDP across nodes, encap and noEncap.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use ipnetwork::IpNetwork;
use serde_json::json;
use sluice_agent::{datapath::ebpf::Maps, model::CidrKey};
use sluice_tests::{
    lab::{
        report::{probe_all, Protocol},
        Encap, Lab, LabOptions,
    },
    probe::{self, Flow, Servers},
    require_root,
};

const PORT: u16 = 80;

fn lab(encap: Encap) -> Lab {
    require_root();
    let mut lab = Lab::up(LabOptions {
        nodes: 2,
        encap,
        attach_mode: "auto".into(),
        ports: vec![PORT],
    })
    .expect("lab up");
    let pods: Vec<_> = (0..6)
        .map(|i| {
            json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": format!("p{i}"), "namespace": "default", "labels": {"app": "probe"}},
                "spec": {"nodeName": format!("node-{}", i % 2 + 1), "containers": [{"name": "c", "image": "x"}]},
            })
        })
        .collect();
    lab.apply(pods).expect("apply pods");
    lab.wait_programmed(Duration::from_secs(20))
        .expect("programmed");
    assert!(
        lab.agents_ready(),
        "every agent reports ready after its first sync"
    );
    lab
}

fn netns_of(lab: &Lab, pod: &str) -> std::path::PathBuf {
    lab.kubelet
        .pod(&format!("default/{pod}"))
        .expect("pod")
        .netns
        .path()
}

fn ip_of(lab: &Lab, pod: &str) -> Ipv4Addr {
    lab.kubelet.pod(&format!("default/{pod}")).expect("pod").ip
}

/// Pods reaching beyond the cluster (the lab switch plays an outside host) leave with their
/// node's address.
fn outside_traffic_is_masqueraded(lab: &Lab) {
    let outside = Servers::start(&lab.switch.path(), "outside", &[8080]);
    let switch: Ipv4Addr = sluice_tests::lab::SWITCH_IP.parse().unwrap();
    for (pod, node_ip) in [("p0", lab.nodes[0].ip), ("p1", lab.nodes[1].ip)] {
        let tcp = probe::tcp(&netns_of(lab, pod), None, switch, 8080).expect("pod -> outside TCP");
        assert_eq!(
            tcp.client, node_ip,
            "{pod} masqueraded to its node's address (TCP)"
        );
        let udp = probe::udp(&netns_of(lab, pod), switch, 8080).expect("pod -> outside UDP");
        assert_eq!(
            udp.client, node_ip,
            "{pod} masqueraded to its node's address (UDP)"
        );
    }
    drop(outside);
}

fn every_pair_connects(lab: &Lab) {
    let probes = probe_all(lab, &[PORT], &[Protocol::Tcp, Protocol::Udp]);
    assert_eq!(probes.len(), 6 * 6 * 2);
    let failed: Vec<_> = probes
        .iter()
        .filter(|p| !p.connected || p.answered_by.as_deref() != Some(&p.to))
        .collect();
    assert!(failed.is_empty(), "probes failed: {failed:#?}");
    // Across nodes the server sees the client pod's own address: no NAT between pods.
    let reply = probe::tcp(&netns_of(lab, "p0"), None, ip_of(lab, "p1"), PORT).expect("p0 -> p1");
    assert_eq!(reply.client, ip_of(lab, "p0"));
}

fn tunnel_tx_packets(lab: &Lab, node: usize) -> Option<u64> {
    lab.nodes[node]
        .node
        .ns
        .exec(&["cat", "/sys/class/net/sluice-tun0/statistics/tx_packets"])
        .ok()
        .and_then(|t| t.trim().parse().ok())
}

fn remote_cidrs(lab: &Lab, node: usize) -> BTreeSet<IpNetwork> {
    let maps = Maps::from_pins(&lab.nodes[node].node.bpffs).expect("pinned maps");
    maps.pipeline()
        .expect("pipeline")
        .remote_nodes
        .keys()
        .filter_map(CidrKey::cidr)
        .collect()
}

/// The other nodes' pod CIDRs the node routes (the Service CIDR's route left aside).
fn routed_cidrs(lab: &Lab, node: usize) -> BTreeSet<IpNetwork> {
    lab.nodes[node].pod_cidr_routes().unwrap()
}

/// Waits until `f` holds; returns how long it took.
fn within(limit: Duration, what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    start.elapsed()
}

fn cidr(text: &str) -> IpNetwork {
    text.parse().unwrap()
}

#[test]
fn encap_two_nodes() {
    let mut lab = lab(Encap::Vxlan);
    let before = tunnel_tx_packets(&lab, 0).expect("node-1 has the tunnel device");
    every_pair_connects(&lab);
    outside_traffic_is_masqueraded(&lab);
    let after = tunnel_tx_packets(&lab, 0).unwrap();
    assert!(
        after > before + 10,
        "cross-node traffic did not cross the tunnel ({before} -> {after})"
    );
    assert_eq!(
        routed_cidrs(&lab, 0),
        BTreeSet::from([cidr("10.244.1.0/24")]),
        "host route into the datapath"
    );

    pod_deletion(&mut lab);
    agent_restart_keeps_flows(&mut lab);
    node_deletion(&lab, |lab| remote_cidrs(lab, 0));
}

#[test]
fn no_encap_two_nodes() {
    let mut lab = lab(Encap::NoEncap);
    assert_eq!(
        tunnel_tx_packets(&lab, 0),
        None,
        "no tunnel device in noEncap mode"
    );
    every_pair_connects(&lab);
    outside_traffic_is_masqueraded(&lab);
    assert!(
        remote_cidrs(&lab, 0).is_empty(),
        "no tunnel entries in noEncap mode"
    );
    let route = lab.nodes[0]
        .node
        .ns
        .exec(&["ip", "route", "get", "10.244.1.5"])
        .unwrap();
    assert!(
        route.contains("via 192.168.77.2"),
        "routed via node-2: {route}"
    );

    pod_deletion(&mut lab);
    agent_restart_keeps_flows(&mut lab);
    node_deletion(&lab, |lab| routed_cidrs(lab, 0));
}

/// Deleting a pod object: the kubelet runs CNI DEL; its entries go from its node, and no node
/// keeps anything for it.
fn pod_deletion(lab: &mut Lab) {
    let ip = ip_of(lab, "p5");
    lab.api
        .delete("pods", Some("default"), "p5")
        .expect("delete pod");
    lab.sync().unwrap();
    lab.wait_programmed(Duration::from_secs(5))
        .expect("entries of the deleted pod removed");
    for node in &lab.nodes {
        let pipeline = Maps::from_pins(&node.node.bpffs)
            .unwrap()
            .pipeline()
            .unwrap();
        assert!(
            !pipeline
                .l3_forwarding
                .contains_key(&sluice_agent::model::ip_key(ip.into())),
            "{} still forwards to the deleted pod",
            node.name
        );
    }
    assert!(
        probe::tcp(&netns_of(lab, "p0"), None, ip, PORT).is_none(),
        "the deleted pod still answers"
    );
}

/// Killing and restarting node-2's agent does not interrupt a cross-node flow, and the new
/// agent keeps every identity the old one gave, though a prefix that sorts before all of them
/// came while it was down.
fn agent_restart_keeps_flows(lab: &mut Lab) {
    let flow = Flow::start(
        netns_of(lab, "p0"),
        &netns_of(lab, "p1"),
        ip_of(lab, "p1"),
        9000,
    );
    std::thread::sleep(Duration::from_millis(300));
    let identities = || lab_identities(&lab.nodes[1]);
    let before = identities();
    assert!(!before.is_empty());
    lab.nodes[1].node.kill_agent();
    let early_prefix = json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "early-prefix", "namespace": "default"},
        "spec": {"podSelector": {"matchLabels": {"none": "none"}},
            "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/16"}}]}]}});
    lab.create(early_prefix).expect("policy");
    std::thread::sleep(Duration::from_millis(500));
    lab.nodes[1]
        .node
        .start_agent()
        .expect("restart node-2's agent");
    lab.wait_programmed(Duration::from_secs(10))
        .expect("state intact after restart");
    let after = lab_identities(&lab.nodes[1]);
    for (prefix, id) in &before {
        assert_eq!(after.get(prefix), Some(id), "identity of {prefix}");
    }
    assert!(after.contains_key(&cidr("10.0.0.0/16")));
    std::thread::sleep(Duration::from_millis(300));
    let report = flow.stop();
    report.assert_unbroken();
    lab.api
        .delete("networkpolicies", Some("default"), "early-prefix")
        .expect("delete");
}

/// IPCACHE of a node, prefix → identity.
fn lab_identities(node: &sluice_tests::lab::LabNode) -> BTreeMap<IpNetwork, u32> {
    Maps::from_pins(&node.node.bpffs)
        .and_then(|m| m.policy_tables())
        .expect("policy maps")
        .ipcache
        .iter()
        .filter_map(|(key, identity)| Some((key.cidr()?, identity.id)))
        .collect()
}

/// Deleting a Node object removes its pod CIDR from every other node within a second.
fn node_deletion(lab: &Lab, programmed: impl Fn(&Lab) -> BTreeSet<IpNetwork>) {
    assert!(programmed(lab).contains(&cidr("10.244.1.0/24")));
    lab.api
        .delete("nodes", None, "node-2")
        .expect("delete node-2");
    let took = within(
        Duration::from_secs(1),
        "node-2's pod CIDR removed on node-1",
        || programmed(lab).is_empty(),
    );
    println!("node removal programmed on node-1 in {took:?}");
}

/// Fake nodes (API objects only): what matters is that every agent programs exactly the set
/// the API holds, through dropped watches, expired resourceVersions and an API server restart.
#[test]
fn watches_survive_drops_expiry_and_api_restarts() {
    let mut lab = lab(Encap::Vxlan);
    let fake = |i: u8| {
        json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": format!("fake-{i}")},
            "spec": {"podCIDR": format!("10.244.{}.0/24", 100 + i)},
            "status": {"addresses": [{"type": "InternalIP", "address": format!("192.168.77.{}", 100 + i)}]},
        })
    };
    let expect = |lab: &Lab, extra: &[u8]| {
        let mut set: BTreeSet<IpNetwork> = BTreeSet::from([cidr("10.244.1.0/24")]);
        set.extend(
            extra
                .iter()
                .map(|i| cidr(&format!("10.244.{}.0/24", 100 + i))),
        );
        within(
            Duration::from_secs(15),
            &format!("node-1 programs {set:?}"),
            || remote_cidrs(lab, 0) == set,
        );
    };

    lab.api.drop_watches();
    lab.create(fake(1)).unwrap();
    expect(&lab, &[1]);

    // Expired resourceVersion: the watchers get 410 Gone and relist.
    lab.api.compact();
    lab.api.drop_watches();
    lab.api.delete("nodes", None, "fake-1").unwrap();
    lab.create(fake(2)).unwrap();
    expect(&lab, &[2]);

    // Restart: nothing served for a moment, then the same state at the same address.
    lab.restart_api(Duration::from_millis(500)).unwrap();
    lab.create(fake(3)).unwrap();
    lab.api.delete("nodes", None, "fake-2").unwrap();
    expect(&lab, &[3]);
    every_pair_connects(&lab);
}

/// `tunnelType: geneve` is supported in config and code; on a kernel without Geneve (this one)
/// the agent refuses to start and says why.
#[test]
fn geneve_is_refused_on_a_kernel_without_it() {
    require_root();
    let options = LabOptions {
        nodes: 1,
        encap: Encap::Geneve,
        attach_mode: "auto".into(),
        ports: vec![],
    };
    let err = Lab::up(options)
        .err()
        .expect("the agent must refuse geneve on this kernel");
    let text = format!("{err:#}");
    assert!(
        text.contains("field `tunnelType`: geneve is not supported by this kernel"),
        "{text}"
    );
}
