//! Overlapping networks on a node, found and named, on the lab's real cluster: `sluicectl
//! check`, run in the agent's container, reads the node's interfaces and routes as they are and
//! compares them with the cluster's pod CIDRs and Service CIDR; the agent reports each new
//! overlap in its log and as a Node event when the cluster's networks change.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use sluice_tests::{
    cluster::{kube_bin, Cluster, ClusterOptions},
    require_root,
};

/// `sluicectl check` in the agent's container on `node`, as an operator runs it: (exit code,
/// output). kubectl exec exits with the command's code.
fn check(cluster: &Cluster, node: &str) -> (i32, String) {
    let pod = cluster.agent_pod(node).expect("agent pod");
    let pod = pod["metadata"]["name"].as_str().expect("agent pod name");
    let out = Command::new("ip")
        .args(["netns", "exec", &cluster.switch.name])
        .arg(kube_bin("kubectl"))
        .arg("--kubeconfig")
        .arg(cluster.kubeconfig())
        .args(["-n", "kube-system", "exec", pod, "-c", "sluice-agent", "--"])
        .args(["sluicectl", "check"])
        .output()
        .expect("kubectl exec");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn pod_cidr(cluster: &Cluster, node: &str) -> String {
    let node = cluster.get(&["node", node]).expect("node");
    node["spec"]["podCIDR"]
        .as_str()
        .expect("a podCIDR")
        .to_string()
}

#[test]
fn overlapping_networks_are_named_by_sluicectl_check_and_as_node_events() {
    require_root();
    let mut cluster = Cluster::up(ClusterOptions::nodes(2)).expect("cluster up");
    cluster
        .wait_programmed(Duration::from_secs(60))
        .expect("agents programmed");
    let (cidr_1, cidr_2) = (pod_cidr(&cluster, "node-1"), pod_cidr(&cluster, "node-2"));
    let (code, out) = check(&cluster, "node-1");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("no overlapping networks"), "{out}");
    assert!(
        out.contains(&format!("podCIDR {cidr_1} from the Node's spec.podCIDR")),
        "{out}"
    );
    assert!(out.contains("other nodes' pod CIDRs: 1"), "{out}");

    // Someone gives node-1 an interface in node-2's pod CIDR and a route into the Service CIDR.
    let inside_2 = {
        let net: ipnetwork::Ipv4Network = cidr_2.parse().unwrap();
        format!("{}/{}", net.nth(5).unwrap(), net.prefix())
    };
    let ns = &cluster.node("node-1").unwrap().ns;
    ns.exec(&[
        "ip", "link", "add", "ovl0", "type", "veth", "peer", "name", "ovl1",
    ])
    .unwrap();
    ns.exec(&["ip", "addr", "add", &inside_2, "dev", "ovl0"])
        .unwrap();
    ns.exec(&["ip", "link", "set", "ovl0", "up"]).unwrap();
    ns.exec(&["ip", "route", "add", "10.96.5.0/24", "dev", "ovl0"])
        .unwrap();
    let (code, out) = check(&cluster, "node-1");
    assert_eq!(code, 1, "{out}");
    let expected = [
        format!("OVERLAP: podCIDR {cidr_2} of node-2 overlaps {cidr_2} on node-1's interface ovl0"),
        "OVERLAP: the Service CIDR 10.96.0.0/16 overlaps the route to 10.96.5.0/24 via node-1's interface ovl0".to_string(),
    ];
    for line in &expected {
        assert!(out.contains(line.as_str()), "{line}\nin:\n{out}");
    }
    let (code, out) = check(&cluster, "node-2");
    assert_eq!(code, 0, "node-2 has no overlap: {out}");

    // The cluster's networks change (a node joins): the agent checks again and reports.
    cluster
        .add_node(Duration::from_secs(120))
        .expect("a third node joins");
    let deadline = Instant::now() + Duration::from_secs(15);
    let events = loop {
        let all = cluster
            .get(&["events.events.k8s.io", "-A"])
            .expect("events");
        let events: Vec<String> = all["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["regarding"]["name"] == "node-1" && e["reason"] == "NetworkOverlap")
            .map(|e| e["note"].as_str().unwrap_or_default().to_string())
            .collect();
        if events.len() == 2 || Instant::now() > deadline {
            break events;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let log = cluster.agent_log("node-1").expect("node-1's agent log");
    for line in &expected {
        let note = line.trim_start_matches("OVERLAP: ");
        assert!(events.iter().any(|e| e == note), "{note} in {events:?}");
        assert!(log.contains(note), "{note} in node-1's agent log:\n{log}");
    }
}
