//! Overlapping networks on a node, found and named: `sluicectl check` reads the node's
//! interfaces and routes as they are and compares them with the cluster's pod CIDRs and Service
//! CIDR; the agent reports each new overlap in its log and as a Node event when the cluster's
//! networks change.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use sluice_tests::{
    bin,
    lab::{Lab, LabOptions},
    require_root,
};

/// `sluicectl check` in the node's namespace: (exit code, output).
fn check(lab: &Lab, node: usize) -> (i32, String) {
    let n = &lab.nodes[node].node;
    let out = Command::new("ip")
        .args(["netns", "exec", &n.ns.name])
        .arg(bin("sluicectl"))
        .arg("--state-dir")
        .arg(n.dir.join("state"))
        .arg("check")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn overlapping_networks_are_named_by_sluicectl_check_and_as_node_events() {
    require_root();
    let mut lab = Lab::up(LabOptions {
        nodes: 2,
        ..LabOptions::single_node(&[80])
    })
    .expect("lab up");
    lab.wait_programmed(Duration::from_secs(20)).unwrap();
    let (code, out) = check(&lab, 0);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("no overlapping networks"), "{out}");
    assert!(
        out.contains("podCIDR 10.244.0.0/24 from the Node's spec.podCIDR"),
        "{out}"
    );
    assert!(out.contains("other nodes' pod CIDRs: 1"), "{out}");

    // Someone gives node-1 an interface in node-2's pod CIDR and a route into the Service CIDR.
    let ns = &lab.nodes[0].node.ns;
    ns.exec(&[
        "ip", "link", "add", "ovl0", "type", "veth", "peer", "name", "ovl1",
    ])
    .unwrap();
    ns.exec(&["ip", "addr", "add", "10.244.1.5/24", "dev", "ovl0"])
        .unwrap();
    ns.exec(&["ip", "link", "set", "ovl0", "up"]).unwrap();
    ns.exec(&["ip", "route", "add", "10.96.5.0/24", "dev", "ovl0"])
        .unwrap();
    let (code, out) = check(&lab, 0);
    assert_eq!(code, 1, "{out}");
    let expected = [
        "OVERLAP: podCIDR 10.244.1.0/24 of node-2 overlaps 10.244.1.0/24 on node-1's interface ovl0",
        "OVERLAP: the Service CIDR 10.96.0.0/16 overlaps the route to 10.96.5.0/24 via node-1's interface ovl0",
    ];
    for line in expected {
        assert!(out.contains(line), "{line}\nin:\n{out}");
    }
    let (code, out) = check(&lab, 1);
    assert_eq!(code, 0, "node-2 has no overlap: {out}");

    // The cluster's networks change (a node joins): the agent checks again and reports.
    lab.add_node(2).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let events = loop {
        let events: Vec<String> = lab
            .api
            .list("events", None)
            .iter()
            .filter(|e| e["regarding"]["name"] == "node-1" && e["reason"] == "NetworkOverlap")
            .map(|e| e["note"].as_str().unwrap_or_default().to_string())
            .collect();
        if events.len() == 2 || Instant::now() > deadline {
            break events;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    for line in expected {
        let note = line.trim_start_matches("OVERLAP: ");
        assert!(events.iter().any(|e| e == note), "{note} in {events:?}");
        assert!(lab.nodes[0].node.agent_log().contains(note));
    }
}
