//! A new pod is isolated as its policies say from its first packet: the kubelet writes a pod's
//! addresses to the API only after CNI ADD, and init containers run in between. On the lab's
//! real cluster the kubelet's status writes are held back for real: a ValidatingAdmissionPolicy
//! makes kube-apiserver refuse every pods/status update of a pod labelled `hold-status`, so the
//! kubelet runs the pod and keeps retrying its status. A pod under an egress default-deny gets
//! nothing out meanwhile, and a pod no policy selects connects as soon as ADD has returned.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use sluice_common::DropReason;
use sluice_tests::{
    cluster::{Cluster, ClusterOptions},
    probe, require_root,
};

const PORT: u16 = 80;
const PROBE_TIMEOUT: Duration = Duration::from_millis(300);
const HOLD: &str = "hold-status";

/// kube-apiserver refuses the status writes of pods labelled `hold-status`.
const HOLD_STATUS: &str = r#"
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicy
metadata: {name: hold-pod-status}
spec:
  failurePolicy: Fail
  matchConstraints:
    resourceRules:
      - apiGroups: [""]
        apiVersions: ["v1"]
        operations: ["UPDATE"]
        resources: ["pods/status"]
  validations:
    - expression: "!has(object.metadata.labels) || !('hold-status' in object.metadata.labels)"
      message: "the test holds this pod's status back"
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicyBinding
metadata: {name: hold-pod-status}
spec:
  policyName: hold-pod-status
  validationActions: [Deny]
"#;

fn pod(ns: &str, name: &str, held: bool) -> Value {
    let mut labels = json!({"app": name});
    if held {
        labels[HOLD] = json!("true");
    }
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "x"}]},
    })
}

fn namespace(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
}

/// TCP connects, and a UDP datagram is answered.
fn reaches(from: &Path, to: Ipv4Addr) -> (bool, bool) {
    (
        probe::tcp_within(from, None, to, PORT, PROBE_TIMEOUT).is_some(),
        probe::udp_within(from, to, PORT, PROBE_TIMEOUT).is_some(),
    )
}

fn egress_denied(cluster: &Cluster) -> u64 {
    cluster.nodes[0]
        .maps()
        .and_then(|m| m.counters())
        .expect("the node's counters")
        .drops_for(DropReason::EgressDenied)
}

/// Waits until both held pods' sandboxes run (CNI ADD has returned for each).
fn sandboxes(cluster: &Cluster) -> [(PathBuf, Ipv4Addr); 2] {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let node = &cluster.nodes[0];
        if let (Ok(locked), Ok(open)) = (node.sandbox("locked", "new"), node.sandbox("open", "new"))
        {
            return [locked, open];
        }
        assert!(
            Instant::now() < deadline,
            "the new pods' sandboxes did not start\n{}",
            cluster.diagnose()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Installs the admission policy and waits until kube-apiserver enforces it (it loads policies
/// asynchronously), judged on a pod no kubelet runs.
fn hold_status_writes(cluster: &Cluster) {
    cluster.apply(HOLD_STATUS).expect("the admission policy");
    cluster
        .apply(&format!(
            "{{apiVersion: v1, kind: Pod, metadata: {{name: sentinel, namespace: default, \
             labels: {{{HOLD}: \"true\"}}}}, spec: {{nodeName: nowhere, \
             containers: [{{name: c, image: x}}]}}}}"
        ))
        .expect("the sentinel pod");
    let held = || {
        cluster
            .kubectl(&[
                "patch",
                "pod",
                "sentinel",
                "--subresource=status",
                "--dry-run=server",
                "--type=merge",
                "-p",
                r#"{"status":{"message":"probe"}}"#,
            ])
            .is_err_and(|e| e.to_string().contains("holds this pod's status"))
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !held() {
        assert!(Instant::now() < deadline, "the admission policy never held");
        std::thread::sleep(Duration::from_millis(200));
    }
    cluster
        .kubectl(&["delete", "pod", "sentinel", "--grace-period=0", "--force"])
        .expect("delete the sentinel");
}

#[test]
fn a_pod_is_isolated_before_the_kubelet_reports_its_address() {
    require_root();
    let cluster = Cluster::up(ClusterOptions::nodes(1)).expect("cluster up");
    cluster
        .apply_lab_manifests(
            vec![
                namespace("open"),
                namespace("locked"),
                pod("open", "server", false),
                json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                    "metadata": {"name": "deny-egress", "namespace": "locked"},
                    "spec": {"podSelector": {}, "policyTypes": ["Egress"]}}),
            ],
            &[PORT],
        )
        .expect("apply");
    cluster
        .wait_programmed(Duration::from_secs(60))
        .expect("programmed");
    let server: Ipv4Addr = cluster.get(&["pod", "-n", "open", "server"]).unwrap()["status"]
        ["podIP"]
        .as_str()
        .and_then(|ip| ip.parse().ok())
        .expect("the server's address");

    hold_status_writes(&cluster);
    let denied_before = egress_denied(&cluster);
    cluster
        .apply_lab_manifests(
            vec![pod("locked", "new", true), pod("open", "new", true)],
            &[PORT],
        )
        .expect("apply the new pods");
    let [(locked, _), (open, _)] = sandboxes(&cluster);
    let status = cluster.get(&["pod", "-n", "locked", "new"]).unwrap();
    assert!(
        status["status"]["podIPs"].is_null(),
        "the kubelet's status write was held back: {}",
        status["status"]
    );

    // Right after ADD returned: nothing gets out of the isolated pod, the other connects.
    assert_eq!(
        reaches(&locked, server),
        (false, false),
        "a pod under an egress default-deny reached a server before its status was written"
    );
    assert_eq!(
        reaches(&open, server),
        (true, true),
        "a pod no policy selects must connect as soon as ADD has returned"
    );
    let denied = egress_denied(&cluster) - denied_before;
    assert!(
        denied >= 2,
        "the isolated pod's packets are dropped by EgressRule ({denied} counted)"
    );
    assert!(
        cluster.get(&["pod", "-n", "locked", "new"]).unwrap()["status"]["podIPs"].is_null(),
        "the status stayed held through the probes"
    );

    // Once the status is written, the same: the policy, not the timing, decides.
    for ns in ["locked", "open"] {
        cluster
            .kubectl(&["label", "pod", "-n", ns, "new", &format!("{HOLD}-")])
            .expect("release the status");
    }
    cluster
        .wait_programmed(Duration::from_secs(60))
        .expect("the kubelet's retried status write");
    assert_eq!(reaches(&locked, server), (false, false));
    assert_eq!(reaches(&open, server), (true, true));
}
