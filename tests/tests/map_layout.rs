//! An agent that finds pinned maps of another layout than its own (an upgrade that grew a key, a
//! changed `bpfMapSizes`) replaces them instead of adopting them, with a flow running: the flow
//! goes on, isolated pods stay isolated, and a plain restart replaces nothing. On the lab's real
//! cluster: the agent's container is SIGKILLed and the kubelet restarts it; the new sizes come
//! with `helm upgrade`, which rolls the DaemonSet.

use std::{collections::BTreeMap, net::Ipv4Addr, path::PathBuf, time::Duration};

use aya::maps::{HashMap, MapData};
use serde_json::json;
use sluice_tests::{
    cluster::{Cluster, ClusterOptions},
    probe::{self, Flow},
    require_root,
};

const PORT: u16 = 80;
const FLOW_PORT: u16 = 9100;
const NODE: &str = "node-1";

fn pod(name: &str) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": {"pod": name}},
        "spec": {"containers": [{"name": "c", "image": "x"}]}})
}

fn connects(pods: &BTreeMap<String, (PathBuf, Ipv4Addr)>, from: &str, to: &str) -> bool {
    probe::tcp_within(
        &pods[from].0,
        None,
        pods[to].1,
        PORT,
        Duration::from_millis(300),
    )
    .is_some()
}

fn replacements(cluster: &Cluster) -> Vec<String> {
    cluster
        .agent_log(NODE)
        .expect("agent log")
        .lines()
        .filter(|l| l.contains("differs from this agent's"))
        .map(str::to_string)
        .collect()
}

#[test]
fn pins_of_another_layout_are_replaced_with_a_flow_running() {
    require_root();
    let cluster = Cluster::up(ClusterOptions::nodes(1)).expect("cluster up");
    cluster
        .apply_lab_manifests(
            vec![
                pod("a"),
                pod("b"),
                pod("c"),
                json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                    "metadata": {"name": "b-from-a", "namespace": "default"},
                    "spec": {"podSelector": {"matchLabels": {"pod": "b"}},
                        "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "a"}}}]}]}}),
            ],
            &[PORT],
        )
        .expect("apply");
    cluster
        .wait_programmed(Duration::from_secs(60))
        .expect("programmed");
    let pods = cluster.pod_addresses(Some("default")).expect("pods");
    assert!(connects(&pods, "a", "b") && !connects(&pods, "c", "b"));

    // A plain restart adopts every pin.
    cluster
        .restart_agent(NODE, Duration::from_secs(60))
        .expect("restart");
    assert_eq!(replacements(&cluster), Vec::<String>::new());

    let flow = Flow::start(pods["a"].0.clone(), &pods["b"].0, pods["b"].1, FLOW_PORT);
    std::thread::sleep(Duration::from_millis(300));

    // What an older agent would have left: ENDPOINT_POLICY keyed otherwise (24-byte keys). The
    // running agent keeps its own map through its descriptors; its successor finds this pin.
    let pin = cluster.nodes[0]
        .bpffs()
        .unwrap()
        .join(sluice_common::map_names::ENDPOINT_POLICY);
    std::fs::remove_file(&pin).expect("unpin");
    let older = HashMap::<MapData, [u8; 24], u64>::create(1024, 0).expect("create a map");
    older.pin(&pin).expect("pin the older layout");
    cluster
        .restart_agent(NODE, Duration::from_secs(60))
        .expect("the agent starts on pins of another layout");

    let replaced = replacements(&cluster);
    assert_eq!(replaced.len(), 1, "{replaced:?}");
    assert!(
        replaced[0].contains("ENDPOINT_POLICY") && replaced[0].contains("key 24 B"),
        "{}",
        replaced[0]
    );
    assert!(!connects(&pods, "c", "b"), "b is still isolated");
    assert!(connects(&pods, "a", "b"), "and still lets a in");

    // An operator sizes a map anew: the rolled agent replaces that map, the flow goes on.
    cluster
        .helm_upgrade("agent:\n  bpfMapSizes: {POLICY: 4096}\n")
        .expect("helm upgrade");
    cluster
        .wait_agent_rolled(NODE, Duration::from_secs(90))
        .expect("the DaemonSet rolled the agent");
    let replaced = replacements(&cluster);
    assert_eq!(replaced.len(), 1, "{replaced:?}");
    assert!(
        replaced[0].contains("POLICY")
            && !replaced[0].contains("ENDPOINT_POLICY")
            && replaced[0].contains("4096 entries"),
        "{}",
        replaced[0]
    );
    assert!(!connects(&pods, "c", "b"), "b is still isolated");
    assert!(connects(&pods, "a", "b"), "and still lets a in");

    let report = flow.stop();
    report.assert_unbroken();
    assert!(report.bytes > 0);
}
