//! An agent that finds pinned maps of another layout than its own (an upgrade that grew a key, a
//! changed `bpfMapSizes`) replaces them instead of adopting them, with a flow running: the flow
//! goes on, isolated pods stay isolated, and a plain restart replaces nothing.

use std::time::Duration;

use aya::maps::{HashMap, MapData};
use serde_json::json;
use sluice_tests::{
    lab::{Lab, LabOptions},
    probe::{self, Flow},
    require_root,
};

const PORT: u16 = 80;
const FLOW_PORT: u16 = 9100;

fn pod(name: &str) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": {"pod": name}},
        "spec": {"containers": [{"name": "c", "image": "x"}]}})
}

fn connects(lab: &Lab, from: &str, to: &str) -> bool {
    let netns = lab
        .kubelet
        .pod(&format!("default/{from}"))
        .unwrap()
        .netns
        .path();
    let ip = lab.pod_ips()[&format!("default/{to}")];
    probe::tcp_within(&netns, None, ip, PORT, Duration::from_millis(300)).is_some()
}

fn replacements(lab: &Lab) -> Vec<String> {
    lab.nodes[0]
        .node
        .agent_log()
        .lines()
        .filter(|l| l.contains("differs from this agent's"))
        .map(str::to_string)
        .collect()
}

#[test]
fn pins_of_another_layout_are_replaced_with_a_flow_running() {
    require_root();
    let mut lab = Lab::up(LabOptions::single_node(&[PORT])).expect("lab up");
    lab.apply(vec![
        pod("a"),
        pod("b"),
        pod("c"),
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "b-from-a", "namespace": "default"},
            "spec": {"podSelector": {"matchLabels": {"pod": "b"}},
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "a"}}}]}]}}),
    ])
    .expect("apply");
    lab.wait_programmed(Duration::from_secs(20))
        .expect("programmed");
    assert!(connects(&lab, "a", "b") && !connects(&lab, "c", "b"));

    // A plain restart adopts every pin.
    lab.nodes[0].node.kill_agent();
    lab.nodes[0].node.start_agent().expect("restart");
    assert_eq!(replacements(&lab), Vec::<String>::new());

    let a = lab.kubelet.pod("default/a").unwrap().netns.path();
    let b = lab.kubelet.pod("default/b").unwrap().netns.path();
    let flow = Flow::start(a, &b, lab.pod_ips()["default/b"], FLOW_PORT);
    std::thread::sleep(Duration::from_millis(300));

    // What an older agent would have left: ENDPOINT_POLICY keyed otherwise (24-byte keys).
    let node = &mut lab.nodes[0].node;
    node.kill_agent();
    let pin = node.bpffs.join(sluice_common::map_names::ENDPOINT_POLICY);
    std::fs::remove_file(&pin).expect("unpin");
    let older = HashMap::<MapData, [u8; 24], u64>::create(1024, 0).expect("create a map");
    older.pin(&pin).expect("pin the older layout");
    node.start_agent()
        .expect("the agent starts on pins of another layout");

    let replaced = replacements(&lab);
    assert_eq!(replaced.len(), 1, "{replaced:?}");
    assert!(
        replaced[0].contains("ENDPOINT_POLICY") && replaced[0].contains("key 24 B"),
        "{}",
        replaced[0]
    );
    assert!(!connects(&lab, "c", "b"), "b is still isolated");
    assert!(connects(&lab, "a", "b"), "and still lets a in");
    let report = flow.stop();
    report.assert_unbroken();
    assert!(report.bytes > 0);
}
