//! NodeIPAM in the lab: `sluice-controller`, configured by the chart from a values file, gives
//! Nodes their podCIDRs; a podCIDR a Node already has takes precedence; conflicts become Node
//! events (a Node's address inside a cluster CIDR too) while the others are served; agents wait for a late podCIDR; two replicas share one
//! Lease, and the standby takes over when the leader dies.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use ipnetwork::IpNetwork;
use serde_json::{json, Value};
use sluice_tests::{
    lab::{Lab, LabOptions, Values},
    probe, require_root,
};

const PORT: u16 = 80;

fn values_file(name: &str, text: &str) -> PathBuf {
    let path =
        std::env::temp_dir().join(format!("sluice-values-{name}-{}.yaml", std::process::id()));
    std::fs::write(&path, text).unwrap();
    path
}

const NODE_IPAM: &str = "nodeIPAM:
  enable: true
  clusterCIDRs: [\"10.244.0.0/16\"]
  serviceCIDR: \"10.96.0.0/16\"
  nodeCIDRMaskSizeIPv4: 24
";

fn lab(nodes: usize, file: &PathBuf) -> Lab {
    require_root();
    Lab::up_with_values(
        LabOptions {
            nodes,
            ..LabOptions::single_node(&[PORT])
        },
        Values {
            file,
            // A short Lease so that the handover is quick to test.
            controller: "leaseDurationSeconds: 3",
        },
    )
    .expect("lab up")
}

fn pod_cidr(lab: &Lab, node: &str) -> Option<IpNetwork> {
    lab.api.get("nodes", None, node)?["spec"]["podCIDR"]
        .as_str()?
        .parse()
        .ok()
}

fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what} within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A Node as a platform registers it: with a podCIDR of its own, no agent.
fn platform_node(name: &str, pod_cidr: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name},
        "spec": {"podCIDR": pod_cidr, "podCIDRs": [pod_cidr]},
    })
}

fn events_for(lab: &Lab, node: &str) -> Vec<(String, String)> {
    lab.api
        .list("events", None)
        .iter()
        .filter(|e| e["regarding"]["name"] == node)
        .map(|e| {
            (
                e["reason"].as_str().unwrap_or_default().to_string(),
                e["note"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

#[test]
fn nodes_get_pod_cidrs_from_the_controller_an_existing_one_takes_precedence() {
    let file = values_file("ipam", NODE_IPAM);
    let mut lab = lab(0, &file);
    // kubeadm's --pod-network-cidr (kube-controller-manager) gave this Node its block already.
    lab.create(platform_node("kubeadm-node", "10.244.0.0/24"))
        .unwrap();
    lab.add_node(0).expect("node-1");
    lab.add_node(1).expect("node-2");
    let assigned: Vec<IpNetwork> = ["node-1", "node-2"]
        .iter()
        .map(|n| pod_cidr(&lab, n).unwrap())
        .collect();
    assert_eq!(
        assigned,
        ["10.244.1.0/24", "10.244.2.0/24"].map(|c| c.parse().unwrap()),
        "blocks in order, the existing one skipped"
    );
    assert_eq!(
        pod_cidr(&lab, "kubeadm-node"),
        Some("10.244.0.0/24".parse().unwrap()),
        "an existing podCIDR is never overwritten"
    );
    let node = lab.api.get("nodes", None, "node-1").unwrap();
    assert_eq!(node["spec"]["podCIDRs"], json!(["10.244.1.0/24"]));

    // Pods in the assigned blocks reach each other across the nodes.
    lab.apply(
        (0..2)
            .map(|i| {
                json!({
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": format!("p{i}"), "namespace": "default"},
                    "spec": {"nodeName": format!("node-{}", i + 1), "containers": [{"name": "c", "image": "x"}]},
                })
            })
            .collect(),
    )
    .unwrap();
    lab.wait_programmed(Duration::from_secs(20)).unwrap();
    let p0 = lab.kubelet.pod("default/p0").unwrap();
    let p1 = lab.kubelet.pod("default/p1").unwrap();
    assert!(assigned[0].contains(p0.ip.into()) && assigned[1].contains(p1.ip.into()));
    let reply = probe::tcp(&p0.netns.path(), None, p1.ip, PORT).expect("p0 -> p1 over TCP");
    assert_eq!(reply.client, p0.ip);
    assert!(
        probe::udp(&p1.netns.path(), p0.ip, PORT).is_some(),
        "p1 -> p0 over UDP"
    );

    // Conflicts are reported on the Node, and the controller goes on serving the others.
    lab.create(platform_node("outside", "10.99.0.0/24"))
        .unwrap();
    lab.create(platform_node("twin", "10.244.1.0/24")).unwrap();
    let outside = wait_for("the conflict event", Duration::from_secs(10), || {
        events_for(&lab, "outside").into_iter().next()
    });
    assert_eq!(outside.0, "PodCIDROutsideClusterCIDRs");
    assert!(outside.1.contains("10.99.0.0/24") && outside.1.contains("10.244.0.0/16"));
    let twin = wait_for("the duplicate event", Duration::from_secs(10), || {
        events_for(&lab, "twin").into_iter().next()
    });
    assert_eq!(twin.0, "PodCIDRConflict");
    assert!(twin.1.contains("node-1"), "{}", twin.1);
    // A Node whose own address lies in the cluster CIDR: pods would shadow it.
    lab.create(json!({
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": "shadowed"},
        "spec": {"podCIDR": "10.244.9.0/24"},
        "status": {"addresses": [{"type": "InternalIP", "address": "10.244.200.7"}]},
    }))
    .unwrap();
    let shadowed = wait_for("the address event", Duration::from_secs(10), || {
        events_for(&lab, "shadowed").into_iter().next()
    });
    assert_eq!(shadowed.0, "ClusterCIDROverlapsNodeAddress");
    assert_eq!(
        shadowed.1,
        "cluster CIDR 10.244.0.0/16 overlaps the Node's address 10.244.200.7 (InternalIP)"
    );
    lab.add_node(2)
        .expect("node-3 is served after the conflicts");
    assert_eq!(
        pod_cidr(&lab, "node-3"),
        Some("10.244.3.0/24".parse().unwrap())
    );
    assert!(lab.controllers[0].running(), "{}", lab.controllers[0].log());

    // A restarted controller rebuilds from the Nodes: nothing is handed out twice.
    lab.controllers[0].kill();
    lab.controllers.clear();
    lab.start_controller().unwrap();
    lab.create(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "late"}}))
        .unwrap();
    let late = wait_for(
        "a podCIDR for the late Node",
        Duration::from_secs(15),
        || pod_cidr(&lab, "late"),
    );
    assert_eq!(late, "10.244.4.0/24".parse().unwrap());
    let _ = std::fs::remove_file(file);
}

#[test]
fn an_agent_waits_for_a_late_pod_cidr_and_a_standby_replica_takes_over() {
    let file = values_file("lease", NODE_IPAM);
    let mut lab = lab(0, &file);
    lab.start_controller().unwrap();
    let leader = wait_for("a leader", Duration::from_secs(10), || {
        lab.api
            .get("leases", Some("default"), "sluice-controller")?["spec"]["holderIdentity"]
            .as_str()
            .map(str::to_string)
    });
    let index = lab
        .controllers
        .iter()
        .position(|c| c.identity == leader)
        .expect("the holder is one of ours");
    // Two replicas running: each Node still gets one block, none twice.
    for name in ["a", "b", "c", "d"] {
        lab.create(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}}))
            .unwrap();
    }
    let blocks: std::collections::BTreeSet<IpNetwork> = ["a", "b", "c", "d"]
        .iter()
        .map(|n| wait_for("a podCIDR", Duration::from_secs(10), || pod_cidr(&lab, n)))
        .collect();
    assert_eq!(blocks.len(), 4, "four distinct blocks: {blocks:?}");

    // The leader dies without giving the Lease up; the agent of a new Node waits meanwhile,
    // saying why, and serves once the standby has taken over and assigned its block.
    lab.controllers[index].kill();
    let started = Instant::now();
    lab.add_node(0)
        .expect("node-1 comes up once the standby leads");
    let took = started.elapsed();
    eprintln!("node-1 served {took:?} after the leader died");
    let standby = &lab.controllers[1 - index];
    let holder = lab
        .api
        .get("leases", Some("default"), "sluice-controller")
        .unwrap();
    assert_eq!(holder["spec"]["holderIdentity"], standby.identity.as_str());
    assert!(holder["spec"]["leaseTransitions"].as_i64() >= Some(1));
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(20),
        "the standby waited for the Lease to expire: {took:?}"
    );
    assert!(
        lab.nodes[0]
            .node
            .agent_log()
            .contains("waiting for the Node's spec.podCIDR"),
        "{}",
        lab.nodes[0].node.agent_log()
    );
    assert!(!blocks.contains(&lab.nodes[0].pod_cidr));

    // A replica stopped as in a rollout gives the Lease up at once.
    lab.start_controller().unwrap();
    let third = lab.controllers.last().unwrap().identity.clone();
    std::thread::sleep(Duration::from_secs(1));
    let standby = 1 - index;
    lab.controllers[standby].stop();
    let handed = Instant::now();
    wait_for("the third replica leads", Duration::from_secs(10), || {
        let lease = lab
            .api
            .get("leases", Some("default"), "sluice-controller")?;
        (lease["spec"]["holderIdentity"] == third.as_str()).then_some(())
    });
    assert!(
        handed.elapsed() < Duration::from_secs(3),
        "a released Lease is taken without waiting for it to expire: {:?}",
        handed.elapsed()
    );
    let _ = std::fs::remove_file(file);
}
