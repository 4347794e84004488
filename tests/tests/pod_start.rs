//! A new pod is isolated as its policies say from its first packet: the kubelet writes a pod's
//! addresses to the API only after CNI ADD, and init containers run in between. Here the lab's
//! kubelet holds its status writes back; a pod under an egress default-deny gets nothing out
//! meanwhile, and a pod no policy selects connects as soon as ADD has returned.

use std::time::Duration;

use serde_json::{json, Value};
use sluice_common::DropReason;
use sluice_tests::{
    lab::{Lab, LabOptions},
    probe, require_root,
};

const PORT: u16 = 80;
const PROBE_TIMEOUT: Duration = Duration::from_millis(300);

fn pod(ns: &str, name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
        "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "x"}]},
    })
}

fn namespace(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
}

/// TCP connects, and a UDP datagram is answered.
fn reaches(lab: &Lab, from: &str, to: &str) -> (bool, bool) {
    let netns = lab.kubelet.pod(from).expect("running pod").netns.path();
    let dst = lab.pod_ips()[to];
    (
        probe::tcp_within(&netns, None, dst, PORT, PROBE_TIMEOUT).is_some(),
        probe::udp_within(&netns, dst, PORT, PROBE_TIMEOUT).is_some(),
    )
}

#[test]
fn a_pod_is_isolated_before_the_kubelet_reports_its_address() {
    require_root();
    let mut lab = Lab::up(LabOptions::single_node(&[PORT])).expect("lab up");
    lab.apply(vec![
        namespace("open"),
        namespace("locked"),
        pod("open", "server"),
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "deny-egress", "namespace": "locked"},
            "spec": {"podSelector": {}, "policyTypes": ["Egress"]}}),
    ])
    .expect("apply");
    lab.wait_programmed(Duration::from_secs(30))
        .expect("programmed");

    lab.kubelet.hold_status = true;
    lab.apply(vec![pod("locked", "new"), pod("open", "new")])
        .expect("apply the new pods");
    let status = lab.api.get("pods", Some("locked"), "new").expect("pod");
    assert!(
        status["status"]["podIPs"].is_null(),
        "the kubelet held the status back: {status}"
    );
    let denied_before = lab.nodes[0]
        .node
        .maps()
        .counters()
        .unwrap()
        .drops_for(DropReason::EgressDenied);

    // Right after ADD returned: nothing gets out of the isolated pod, the other connects.
    assert_eq!(
        reaches(&lab, "locked/new", "open/server"),
        (false, false),
        "a pod under an egress default-deny reached a server before its status was written"
    );
    assert_eq!(
        reaches(&lab, "open/new", "open/server"),
        (true, true),
        "a pod no policy selects must connect as soon as ADD has returned"
    );
    let denied = lab.nodes[0]
        .node
        .maps()
        .counters()
        .unwrap()
        .drops_for(DropReason::EgressDenied)
        - denied_before;
    assert!(
        denied >= 2,
        "the isolated pod's packets are dropped by EgressRule ({denied} counted)"
    );

    // Once the status is written, the same: the policy, not the timing, decides.
    lab.kubelet.hold_status = false;
    lab.kubelet.write_held_status(&lab.api).expect("status");
    lab.wait_programmed(Duration::from_secs(10))
        .expect("programmed");
    assert_eq!(reaches(&lab, "locked/new", "open/server"), (false, false));
    assert_eq!(reaches(&lab, "open/new", "open/server"), (true, true));
}
