//! A policy sync that cannot write everything leaves every pod at least as isolated as its
//! policies say: agents run with tiny policy maps (the chart's `agent.bpfMapSizes`), policies
//! overflow them, and no probe connects that the policies deny. The agent says which map, its
//! capacity and what is missing, in its log, on `/metrics` and as a Node event; once there is
//! room, it recovers. On a one-node real cluster.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use sluice_tests::{
    cluster::{Cluster, ClusterOptions},
    in_netns, probe, require_root,
};

const PORTS: [u16; 2] = [80, 81];
const PODS: [&str; 4] = ["x/a", "x/b", "x/c", "y/d"];
const PROBE_TIMEOUT: Duration = Duration::from_millis(300);

struct Lab {
    cluster: Cluster,
    /// Each pod's network namespace and address.
    pods: BTreeMap<String, (PathBuf, Ipv4Addr)>,
}

fn lab(map_sizes: &str) -> Lab {
    require_root();
    let cluster = Cluster::up(ClusterOptions {
        inline_values: Some(format!("agent:\n  bpfMapSizes: {{{map_sizes}}}\n")),
        ..ClusterOptions::nodes(1)
    })
    .expect("cluster up");
    let mut objects = vec![
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}}),
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "y"}}),
    ];
    for key in PODS {
        let (ns, name) = key.split_once('/').unwrap();
        objects.push(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": {"pod": name}},
            "spec": {"containers": [{"name": "c", "image": "x"}]},
        }));
    }
    cluster.apply_lab_manifests(objects, &PORTS).expect("pods");
    cluster
        .wait_programmed(Duration::from_secs(60))
        .expect("programmed");
    let pods = cluster.pod_addresses(None).expect("pods");
    Lab { cluster, pods }
}

impl Lab {
    fn apply(&self, objects: Vec<Value>) {
        self.cluster
            .apply_lab_manifests(objects, &PORTS)
            .expect("apply");
    }

    fn delete_policy(&self, ns: &str, name: &str) {
        self.cluster
            .kubectl(&["delete", "networkpolicy", "-n", ns, name])
            .expect("delete");
    }

    fn agent_log(&self) -> String {
        self.cluster.agent_log("node-1").expect("agent log")
    }
}

fn policy(ns: &str, name: &str, spec: Value) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": ns}, "spec": spec})
}

/// Ingress to x/b only from x/a, on port 80.
fn b_from_a() -> Value {
    policy(
        "x",
        "b-from-a",
        json!({"podSelector": {"matchLabels": {"pod": "b"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "a"}}}],
                "ports": [{"port": 80}]}]}),
    )
}

fn connects(lab: &Lab, from: &str, to: &str, port: u16) -> bool {
    let netns = &lab.pods[from].0;
    probe::tcp_within(netns, None, lab.pods[to].1, port, PROBE_TIMEOUT).is_some()
}

/// Every ordered pair and port: no probe connects that `allowed` denies.
fn assert_no_looser(lab: &Lab, allowed: impl Fn(&str, &str, u16) -> bool) {
    for from in PODS {
        for to in PODS.iter().filter(|&&to| to != from) {
            for port in PORTS {
                if connects(lab, from, to, port) {
                    assert!(
                        allowed(from, to, port),
                        "{from} -> {to}:{port} connected, which the policies deny"
                    );
                }
            }
        }
    }
}

fn metric(lab: &Lab, name: &str) -> u64 {
    let text = in_netns(&lab.cluster.nodes[0].ns.path(), || {
        probe::http_get("127.0.0.1:9421", "/metrics")
    })
    .expect("/metrics answers")
    .1;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in {text}"))
}

fn wait_fail_closed(lab: &Lab, expected: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(lab, "sluice_policy_fail_closed") != expected {
        assert!(
            Instant::now() < deadline,
            "sluice_policy_fail_closed stayed != {expected}; agent log:\n{}",
            lab.agent_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The Node events' reasons and notes.
fn node_events(lab: &Lab) -> Vec<(String, String)> {
    let events = lab
        .cluster
        .get(&["events.events.k8s.io", "-n", "default"])
        .expect("events");
    events["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["regarding"]["kind"] == "Node")
        .map(|e| {
            (
                e["reason"].as_str().unwrap_or("").to_string(),
                e["note"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

#[test]
fn a_full_allow_map_leaves_pods_isolated() {
    require_root();
    let lab = lab("POLICY_EXACT: 2");
    // y/d: port 81 from any address in 10/8 (every pod): one entry per identity, more than fit.
    let d_from_pods = policy(
        "y",
        "d-from-pods",
        json!({"podSelector": {},
            "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}}], "ports": [{"port": 81}]}]}),
    );
    lab.apply(vec![b_from_a(), d_from_pods]);
    wait_fail_closed(&lab, 1);
    assert_no_looser(&lab, |from, to, port| match to {
        "x/b" => from == "x/a" && port == 80,
        "y/d" => port == 81,
        _ => true,
    });
    let log = lab.agent_log();
    assert!(
        log.contains("map POLICY_EXACT (capacity 2): allow entries of"),
        "{log}"
    );
    assert!(metric(&lab, "sluice_policy_sync_failures_total") >= 1);
    let events = node_events(&lab);
    assert!(
        events
            .iter()
            .any(|(reason, note)| reason == "PolicyProgrammingFailed"
                && note.contains("POLICY_EXACT (capacity 2)")
                && note.contains("y/d-from-pods")),
        "{events:?}"
    );

    // Room again: everything the policies allow connects.
    lab.delete_policy("y", "d-from-pods");
    wait_fail_closed(&lab, 0);
    lab.cluster.wait_programmed(Duration::from_secs(5)).unwrap();
    assert!(connects(&lab, "x/a", "x/b", 80));
    assert!(!connects(&lab, "x/c", "x/b", 80));
    assert!(connects(&lab, "x/a", "y/d", 80));
    assert!(node_events(&lab)
        .iter()
        .any(|(reason, _)| reason == "PolicyProgrammed"));
}

#[test]
fn a_full_ipcache_makes_isolated_pods_allow_nothing() {
    require_root();
    // The node's two addresses, the four pods and CoreDNS's fill all but one entry.
    let lab = lab("IPCACHE: 8");
    lab.apply(vec![b_from_a()]);
    lab.cluster.wait_programmed(Duration::from_secs(5)).unwrap();
    assert!(connects(&lab, "x/a", "x/b", 80));
    // Two more prefixes (the block and its except) than fit.
    let d_from_outside = policy(
        "y",
        "d-from-outside",
        json!({"podSelector": {},
            "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.244.0.0/16"]}}]}]}),
    );
    lab.apply(vec![d_from_outside]);
    wait_fail_closed(&lab, 1);
    // Tighter than desired: x/b lets nobody in, not even x/a; y/d nobody, as desired.
    assert_no_looser(&lab, |_, to, _| to != "x/b" && to != "y/d");
    let log = lab.agent_log();
    assert!(
        log.contains("map IPCACHE (capacity 8)")
            && log.contains("every isolated pod on this node allows nothing"),
        "{log}"
    );

    lab.delete_policy("y", "d-from-outside");
    wait_fail_closed(&lab, 0);
    assert!(connects(&lab, "x/a", "x/b", 80));
    assert!(connects(&lab, "x/c", "y/d", 80));
}
