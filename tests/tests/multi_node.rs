//! Two nodes of the lab's real cluster: pods scheduled on both, real TCP/UDP across nodes, encap
//! and noEncap; what the agents program follows the API (pod and Node deletion, Nodes that come
//! and go through an API server restart and an etcd compaction), and a restarted agent keeps its
//! flows and identities.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, Instant},
};

use ipnetwork::IpNetwork;
use serde_json::{json, Value};
use sluice_agent::model::CidrKey;
use sluice_tests::{
    cluster::{condition, Cluster, ClusterOptions, KubeNode},
    lab::{report::Protocol, Encap},
    probe::{self, Flow, Servers},
    require_root,
};

const PORT: u16 = 80;
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

struct Lab {
    cluster: Cluster,
    /// Each pod's network namespace and address, by name.
    pods: BTreeMap<String, (PathBuf, Ipv4Addr)>,
}

fn lab(encap: Encap) -> Lab {
    require_root();
    let cluster = Cluster::up(ClusterOptions::nodes(2).with_encap(encap)).expect("cluster up");
    let pods: Vec<Value> = (0..6)
        .map(|i| {
            json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": format!("p{i}"), "namespace": "default", "labels": {"app": "probe"}},
                "spec": {"nodeName": format!("node-{}", i % 2 + 1), "containers": [{"name": "c", "image": "x"}]},
            })
        })
        .collect();
    cluster
        .apply_lab_manifests(pods, &[PORT])
        .expect("apply pods");
    cluster
        .wait_programmed(Duration::from_secs(60))
        .expect("programmed");
    let pods = cluster.pod_addresses(Some("default")).expect("pods");
    Lab { cluster, pods }
}

impl Lab {
    fn netns(&self, pod: &str) -> PathBuf {
        self.pods[pod].0.clone()
    }

    fn ip(&self, pod: &str) -> Ipv4Addr {
        self.pods[pod].1
    }

    fn node(&self, index: usize) -> &KubeNode {
        &self.cluster.nodes[index]
    }

    /// node-2's podCIDR, as NodeIPAM gave it.
    fn node_2_cidr(&self) -> IpNetwork {
        self.cluster.get(&["node", "node-2"]).unwrap()["spec"]["podCIDR"]
            .as_str()
            .and_then(|c| c.parse().ok())
            .expect("node-2 has a podCIDR")
    }
}

/// Pods reaching beyond the cluster (the lab namespace plays an outside host) leave with their
/// node's address.
fn outside_traffic_is_masqueraded(lab: &Lab) {
    let outside = Servers::start(&lab.cluster.switch.path(), "outside", &[8080]);
    let switch: Ipv4Addr = sluice_tests::lab::SWITCH_IP.parse().unwrap();
    for (pod, node) in [("p0", 0), ("p1", 1)] {
        let node_ip = lab.node(node).ip;
        let tcp = probe::tcp(&lab.netns(pod), None, switch, 8080).expect("pod -> outside TCP");
        assert_eq!(
            tcp.client, node_ip,
            "{pod} masqueraded to its node's address (TCP)"
        );
        let udp = probe::udp(&lab.netns(pod), switch, 8080).expect("pod -> outside UDP");
        assert_eq!(
            udp.client, node_ip,
            "{pod} masqueraded to its node's address (UDP)"
        );
    }
    drop(outside);
}

fn every_pair_connects(lab: &Lab) {
    let probes = lab
        .cluster
        .probe_all(&[PORT], &[Protocol::Tcp, Protocol::Udp], PROBE_TIMEOUT)
        .expect("probes");
    let pods = lab.pods.len();
    assert_eq!(probes.len(), pods * pods * 2);
    let failed: Vec<_> = probes
        .iter()
        .filter(|p| !p.connected || p.answered_by.as_deref() != Some(&p.to))
        .collect();
    assert!(failed.is_empty(), "probes failed: {failed:#?}");
    // Across nodes the server sees the client pod's own address: no NAT between pods.
    let reply = probe::tcp(&lab.netns("p0"), None, lab.ip("p1"), PORT).expect("p0 -> p1");
    assert_eq!(reply.client, lab.ip("p0"));
}

/// A node reaching another node's pod from its own address (a host-network client bound to it,
/// as kube-proxy's NodePort short-circuit leaves it): the pod sees that address, and its answers
/// find the way back (in encap through the tunnel, not masqueraded by the pod's node).
fn node_reaches_remote_pods_as_itself(lab: &Lab) {
    let node = lab.node(0);
    let reply = probe::tcp(&node.ns.path(), Some(node.ip), lab.ip("p1"), PORT)
        .expect("node-1 (from its address) -> p1 on node-2");
    assert_eq!(reply.client, node.ip, "p1 sees node-1's address");
}

fn tunnel_tx_packets(lab: &Lab, node: usize) -> Option<u64> {
    lab.node(node)
        .ns
        .exec(&["cat", "/sys/class/net/sluice-tun0/statistics/tx_packets"])
        .ok()
        .and_then(|t| t.trim().parse().ok())
}

fn remote_cidrs(lab: &Lab, node: usize) -> BTreeSet<IpNetwork> {
    lab.node(node)
        .maps()
        .and_then(|m| m.pipeline())
        .expect("pipeline")
        .remote_nodes
        .keys()
        .filter_map(CidrKey::cidr)
        .collect()
}

/// The other nodes' pod CIDRs the node routes (the Service CIDR's route left aside).
fn routed_cidrs(lab: &Lab, node: usize) -> BTreeSet<IpNetwork> {
    lab.node(node).pod_cidr_routes().unwrap()
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
    let lab = lab(Encap::Vxlan);
    let before = tunnel_tx_packets(&lab, 0).expect("node-1 has the tunnel device");
    every_pair_connects(&lab);
    outside_traffic_is_masqueraded(&lab);
    node_reaches_remote_pods_as_itself(&lab);
    let after = tunnel_tx_packets(&lab, 0).unwrap();
    assert!(
        after > before + 10,
        "cross-node traffic did not cross the tunnel ({before} -> {after})"
    );
    assert_eq!(
        routed_cidrs(&lab, 0),
        BTreeSet::from([lab.node_2_cidr()]),
        "host route into the datapath"
    );

    pod_deletion(&lab);
    agent_restart_keeps_flows(&lab);
    node_deletion(&lab, |lab| remote_cidrs(lab, 0));
}

#[test]
fn no_encap_two_nodes() {
    let lab = lab(Encap::NoEncap);
    assert_eq!(
        tunnel_tx_packets(&lab, 0),
        None,
        "no tunnel device in noEncap mode"
    );
    every_pair_connects(&lab);
    outside_traffic_is_masqueraded(&lab);
    node_reaches_remote_pods_as_itself(&lab);
    assert!(
        remote_cidrs(&lab, 0).is_empty(),
        "no tunnel entries in noEncap mode"
    );
    let IpNetwork::V4(node_2) = lab.node_2_cidr() else {
        panic!("node-2's podCIDR is IPv4");
    };
    let inside_node_2 = node_2.nth(5).expect("an address").to_string();
    let route = lab
        .node(0)
        .ns
        .exec(&["ip", "route", "get", &inside_node_2])
        .unwrap();
    assert!(
        route.contains(&format!("via {}", lab.node(1).ip)),
        "routed via node-2: {route}"
    );

    pod_deletion(&lab);
    agent_restart_keeps_flows(&lab);
    node_deletion(&lab, |lab| routed_cidrs(lab, 0));
}

/// Deleting a pod object: the kubelet runs CNI DEL; its entries go from its node, and no node
/// keeps anything for it.
fn pod_deletion(lab: &Lab) {
    let ip = lab.ip("p5");
    lab.cluster
        .kubectl(&["delete", "pod", "p5"])
        .expect("delete pod");
    lab.cluster
        .wait_programmed(Duration::from_secs(30))
        .expect("entries of the deleted pod removed");
    for node in &lab.cluster.nodes {
        let pipeline = node.maps().and_then(|m| m.pipeline()).unwrap();
        assert!(
            !pipeline
                .l3_forwarding
                .contains_key(&sluice_agent::model::ip_key(ip.into())),
            "{} still forwards to the deleted pod",
            node.name
        );
    }
    assert!(
        probe::tcp_within(&lab.netns("p0"), None, ip, PORT, PROBE_TIMEOUT).is_none(),
        "the deleted pod still answers"
    );
}

/// SIGKILLing node-2's agent (the kubelet restarts it) does not interrupt a cross-node flow, and
/// the new agent keeps every identity the old one gave, though a prefix that sorts before all
/// of them came as it went down.
fn agent_restart_keeps_flows(lab: &Lab) {
    let flow = Flow::start(lab.netns("p0"), &lab.netns("p1"), lab.ip("p1"), 9000);
    std::thread::sleep(Duration::from_millis(300));
    let before = identities(lab.node(1));
    assert!(!before.is_empty());
    let restarts = lab.cluster.agent_restarts("node-2").unwrap();
    lab.cluster
        .kill_agent("node-2")
        .expect("kill node-2's agent");
    lab.cluster
        .apply(
            r#"{"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"name": "early-prefix", "namespace": "default"},
                "spec": {"podSelector": {"matchLabels": {"none": "none"}},
                    "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/16"}}]}]}}"#,
        )
        .expect("policy");
    within(
        Duration::from_secs(60),
        "the kubelet restarts node-2's agent, ready again",
        || {
            lab.cluster.agent_restarts("node-2").unwrap() > restarts
                && condition(&lab.cluster.agent_pod("node-2").unwrap(), "Ready")
        },
    );
    lab.cluster
        .wait_programmed(Duration::from_secs(30))
        .expect("state intact after restart");
    let after = identities(lab.node(1));
    for (prefix, id) in &before {
        assert_eq!(after.get(prefix), Some(id), "identity of {prefix}");
    }
    assert!(after.contains_key(&cidr("10.0.0.0/16")));
    std::thread::sleep(Duration::from_millis(300));
    let report = flow.stop();
    report.assert_unbroken();
    lab.cluster
        .kubectl(&["delete", "networkpolicy", "early-prefix"])
        .expect("delete");
}

/// IPCACHE of a node, prefix → identity.
fn identities(node: &KubeNode) -> BTreeMap<IpNetwork, u32> {
    node.maps()
        .and_then(|m| m.policy_tables())
        .expect("policy maps")
        .ipcache
        .iter()
        .filter_map(|(key, identity)| Some((key.cidr()?, identity.id)))
        .collect()
}

/// Deleting a Node object removes its pod CIDR from every other node within a second.
fn node_deletion(lab: &Lab, programmed: impl Fn(&Lab) -> BTreeSet<IpNetwork>) {
    assert!(programmed(lab).contains(&lab.node_2_cidr()));
    lab.cluster
        .kubectl(&["delete", "node", "node-2"])
        .expect("delete node-2");
    let took = within(
        Duration::from_secs(1),
        "node-2's pod CIDR removed on node-1",
        || programmed(lab).is_empty(),
    );
    println!("node removal programmed on node-1 in {took:?}");
}

/// Nodes that exist only as API objects (no kubelet): what matters is that every agent programs
/// exactly the set the API holds, through kube-apiserver restarts (every watch dropped) and an
/// etcd compaction (resumed watches get 410 Gone and relist).
#[test]
fn watches_survive_api_restarts_and_compaction() {
    let mut lab = lab(Encap::Vxlan);
    let node_2 = lab.node_2_cidr();
    let fake = |i: u8| {
        format!(
            r#"{{"apiVersion": "v1", "kind": "Node", "metadata": {{"name": "fake-{i}"}},
                "spec": {{"podCIDR": "10.244.{}.0/24", "podCIDRs": ["10.244.{}.0/24"]}},
                "status": {{"addresses": [{{"type": "InternalIP", "address": "192.168.77.{}"}}]}}}}"#,
            100 + i,
            100 + i,
            100 + i
        )
    };
    let expect = |lab: &Lab, extra: &[u8]| {
        let mut set: BTreeSet<IpNetwork> = BTreeSet::from([node_2]);
        set.extend(
            extra
                .iter()
                .map(|i| cidr(&format!("10.244.{}.0/24", 100 + i))),
        );
        within(
            Duration::from_secs(30),
            &format!("node-1 programs {set:?}"),
            || remote_cidrs(lab, 0) == set,
        );
    };

    lab.cluster.apply(&fake(1)).unwrap();
    expect(&lab, &[1]);

    // Every watch dropped at once.
    lab.cluster
        .restart_apiserver(Duration::from_millis(500))
        .unwrap();
    lab.cluster.kubectl(&["delete", "node", "fake-1"]).unwrap();
    lab.cluster.apply(&fake(2)).unwrap();
    expect(&lab, &[2]);

    // History compacted past what the agents have seen, then their watches broken: they
    // resume from a resourceVersion that is gone.
    lab.cluster.compact_etcd().unwrap();
    lab.cluster
        .restart_apiserver(Duration::from_millis(500))
        .unwrap();
    lab.cluster.apply(&fake(3)).unwrap();
    lab.cluster.kubectl(&["delete", "node", "fake-2"]).unwrap();
    expect(&lab, &[3]);
    every_pair_connects(&lab);
}

/// `tunnelType: geneve` is supported in config and code; on a kernel without Geneve (this one)
/// an upgrade to it is refused by the agent, which says why in its log and status, and the
/// rollout goes no further than the first node.
#[test]
fn geneve_is_refused_on_a_kernel_without_it() {
    let lab = lab(Encap::Vxlan);
    lab.cluster
        .helm_upgrade("tunnelType: geneve\n")
        .expect("helm upgrade");
    let wanted = "field `tunnelType`: geneve is not supported by this kernel";
    let refused = |node: &str| {
        let Ok(pod) = lab.cluster.agent_pod(node) else {
            return false;
        };
        let name = pod["metadata"]["name"].as_str().unwrap_or_default();
        let terminated = pod["status"]["containerStatuses"][0]["lastState"]["terminated"]
            ["message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let log = |previous: &str| {
            lab.cluster
                .kubectl(&[
                    "-n",
                    "kube-system",
                    "logs",
                    name,
                    "-c",
                    "sluice-agent",
                    previous,
                ])
                .unwrap_or_default()
        };
        terminated.contains(wanted)
            || log("--previous=false").contains(wanted)
            || log("--previous").contains(wanted)
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    while !(refused("node-1") || refused("node-2")) {
        assert!(
            Instant::now() < deadline,
            "no agent refused geneve with its reason within 90 s: {}\n{}",
            lab.cluster
                .kubectl(&["-n", "kube-system", "get", "pods", "-o", "wide"])
                .unwrap_or_default(),
            lab.cluster.diagnose()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // The node the rollout has not reached keeps its working agent.
    let ready: Vec<bool> = ["node-1", "node-2"]
        .iter()
        .map(|n| condition(&lab.cluster.agent_pod(n).unwrap(), "Ready"))
        .collect();
    assert!(ready.contains(&true), "one agent still runs: {ready:?}");
}
