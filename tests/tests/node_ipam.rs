//! NodeIPAM on the lab's real cluster: `sluice-controller`, configured by the chart from its
//! values, gives Nodes their podCIDRs; a podCIDR a Node already has (kube-controller-manager's
//! `--allocate-node-cidrs`, as kubeadm's `--pod-network-cidr` turns on) takes precedence;
//! conflicts become Node events (a Node's address inside a cluster CIDR too) while the others
//! are served; agents wait for a late podCIDR; two replicas share one Lease, and the standby
//! takes over when the leader's machine dies.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use ipnetwork::IpNetwork;
use k8s_openapi::{apimachinery::pkg::apis::meta::v1::MicroTime, jiff::Timestamp};
use serde_json::{json, Value};
use sluice_tests::{
    cluster::{condition, Cluster, ClusterOptions, ControllerManager},
    probe, require_root,
};

const PORT: u16 = 80;
const JOIN_TIMEOUT: Duration = Duration::from_secs(120);

const NODE_IPAM: &str = "nodeIPAM:
  enable: true
  clusterCIDRs: [\"10.244.0.0/16\"]
  serviceCIDR: \"10.96.0.0/16\"
  nodeCIDRMaskSizeIPv4: 24
";

/// Two replicas, and nothing else: the chart alone must keep them on distinct nodes (their
/// health port is the node's), since the handover is tested by losing the leader's machine, which
/// must not take the standby with it.
const TWO_REPLICAS: &str = "controller:
  replicas: 2
";

fn pod_cidr(cluster: &Cluster, node: &str) -> Option<IpNetwork> {
    cluster.get(&["node", node]).ok()?["spec"]["podCIDR"]
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

fn create(cluster: &Cluster, object: Value) {
    cluster
        .kubectl_with_input(&["create", "-f", "-"], &object.to_string())
        .unwrap_or_else(|e| panic!("creating {}: {e:#}", object["metadata"]["name"]));
}

/// A Node as a platform registers it: with a podCIDR of its own, no kubelet.
fn platform_node(name: &str, pod_cidr: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name},
        "spec": {"podCIDR": pod_cidr, "podCIDRs": [pod_cidr]},
    })
}

/// The Events sluice-controller recorded on Node `node`: (reason, note). kube-controller-manager
/// records its own on the same Nodes (`CIDRNotAvailable`, its range being full).
fn events_for(cluster: &Cluster, node: &str) -> Vec<(String, String)> {
    let events = cluster
        .get(&["events.events.k8s.io", "-A"])
        .expect("events");
    events["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| {
            e["regarding"]["name"] == node && e["reportingController"] == "sluice-controller"
        })
        .map(|e| {
            (
                e["reason"].as_str().unwrap_or_default().to_string(),
                e["note"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn controller_pods(cluster: &Cluster) -> Vec<Value> {
    cluster
        .get(&[
            "pods",
            "-n",
            "kube-system",
            "-l",
            "app.kubernetes.io/component=controller",
        ])
        .expect("controller pods")["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn controller_pod(cluster: &Cluster, name: &str) -> Value {
    controller_pods(cluster)
        .into_iter()
        .find(|p| p["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no controller pod {name}"))
}

fn restarts(pod: &Value) -> u64 {
    pod["status"]["containerStatuses"][0]["restartCount"]
        .as_u64()
        .unwrap_or_default()
}

fn log_of(cluster: &Cluster, pod: &str) -> String {
    cluster
        .kubectl(&["-n", "kube-system", "logs", pod])
        .unwrap_or_else(|e| format!("(no log: {e:#})"))
}

fn lease(cluster: &Cluster) -> Value {
    cluster
        .get(&["lease", "-n", "kube-system", "sluice-controller"])
        .expect("the controller's Lease")
}

fn holder(cluster: &Cluster) -> Option<String> {
    let lease = cluster
        .get(&["lease", "-n", "kube-system", "sluice-controller"])
        .ok()?;
    lease["spec"]["holderIdentity"].as_str().map(str::to_string)
}

#[test]
fn nodes_get_pod_cidrs_from_the_controller_an_existing_one_takes_precedence() {
    require_root();
    // kube-controller-manager's range is one block, so it gives node-1 (there before Sluice,
    // as after `kubeadm init`) 10.244.1.0/24 and has none left for the nodes that join later.
    let kcm_block: IpNetwork = "10.244.1.0/24".parse().unwrap();
    let mut cluster = Cluster::up(ClusterOptions {
        inline_values: Some(NODE_IPAM.into()),
        controller_manager: ControllerManager {
            cluster_cidr: Some(kcm_block.to_string()),
            ..ControllerManager::default()
        },
        ..ClusterOptions::nodes(1)
    })
    .expect("cluster up");
    let node_2 = cluster.add_node(JOIN_TIMEOUT).expect("node-2 joins");
    let block_2 = pod_cidr(&cluster, &node_2).unwrap();
    assert_new_block(&cluster, block_2, &[kcm_block]);
    assert_eq!(
        pod_cidr(&cluster, "node-1"),
        Some(kcm_block),
        "kube-controller-manager's podCIDR is never overwritten"
    );
    let node = cluster.get(&["node", &node_2]).unwrap();
    assert_eq!(node["spec"]["podCIDRs"], json!([block_2.to_string()]));

    // Pods in either allocator's block reach each other across the nodes.
    let pods: Vec<Value> = ["node-1", node_2.as_str()]
        .iter()
        .enumerate()
        .map(|(i, node)| {
            json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": format!("p{i}"), "namespace": "default"},
                "spec": {"nodeName": node, "containers": [{"name": "c", "image": "x"}]},
            })
        })
        .collect();
    cluster
        .apply_lab_manifests(pods, &[PORT])
        .expect("apply pods");
    cluster
        .wait_programmed(Duration::from_secs(60))
        .expect("pods running and programmed");
    let (sources, targets) = cluster.probe_endpoints().expect("pods' namespaces");
    let netns = |key: &str| sources.iter().find(|(k, _)| k == key).unwrap().1.clone();
    let ip = |key: &str| -> Ipv4Addr { targets.iter().find(|(k, _)| k == key).unwrap().1 };
    let (p0, p1) = (ip("default/p0"), ip("default/p1"));
    assert!(
        pod_cidr(&cluster, "node-1").unwrap().contains(p0.into())
            && pod_cidr(&cluster, &node_2).unwrap().contains(p1.into()),
        "p0 {p0} on node-1, p1 {p1} on {node_2}"
    );
    let reply = probe::tcp(&netns("default/p0"), None, p1, PORT).expect("p0 -> p1 over TCP");
    assert_eq!(reply.client, IpAddr::V4(p0));
    assert!(
        probe::udp(&netns("default/p1"), p0, PORT).is_some(),
        "p1 -> p0 over UDP"
    );

    // Conflicts are reported on the Node, and the controller goes on serving the others.
    create(&cluster, platform_node("outside", "10.99.0.0/24"));
    create(&cluster, platform_node("twin", "10.244.1.0/24"));
    let outside = wait_for("the conflict event", Duration::from_secs(10), || {
        events_for(&cluster, "outside").into_iter().next()
    });
    assert_eq!(outside.0, "PodCIDROutsideClusterCIDRs");
    assert!(
        outside.1.contains("10.99.0.0/24") && outside.1.contains("10.244.0.0/16"),
        "{}",
        outside.1
    );
    let twin = wait_for("the duplicate event", Duration::from_secs(10), || {
        events_for(&cluster, "twin").into_iter().next()
    });
    assert_eq!(twin.0, "PodCIDRConflict");
    assert!(twin.1.contains("node-1"), "{}", twin.1);
    // A Node whose own address lies in the cluster CIDR: pods would shadow it.
    create(
        &cluster,
        json!({
            "apiVersion": "v1", "kind": "Node", "metadata": {"name": "shadowed"},
            "spec": {"podCIDR": "10.244.9.0/24"},
            "status": {"addresses": [{"type": "InternalIP", "address": "10.244.200.7"}]},
        }),
    );
    let shadowed = wait_for("the address event", Duration::from_secs(10), || {
        events_for(&cluster, "shadowed").into_iter().next()
    });
    assert_eq!(shadowed.0, "ClusterCIDROverlapsNodeAddress");
    assert_eq!(
        shadowed.1,
        "cluster CIDR 10.244.0.0/16 overlaps the Node's address 10.244.200.7 (InternalIP)"
    );
    let node_3 = cluster
        .add_node(JOIN_TIMEOUT)
        .expect("node-3 is served after the conflicts");
    let block_3 = pod_cidr(&cluster, &node_3).unwrap();
    assert_new_block(&cluster, block_3, &[kcm_block, block_2]);
    assert!(
        block_3.network() > block_2.network(),
        "blocks in order: {block_2}, then {block_3}"
    );
    let controller = controller_pods(&cluster).remove(0);
    let name = controller["metadata"]["name"].as_str().unwrap().to_string();
    assert!(
        restarts(&controller) == 0 && condition(&controller, "Ready"),
        "the controller ran through the conflicts: {controller}\n{}",
        log_of(&cluster, &name)
    );

    // A restarted controller rebuilds from the Nodes: nothing is handed out twice.
    cluster
        .kill_container(&controller, "sluice-controller")
        .expect("kill the controller");
    wait_for(
        "the kubelet restarts the controller",
        Duration::from_secs(30),
        || {
            let pod = controller_pod(&cluster, &name);
            let running = pod["status"]["containerStatuses"][0]["state"]["running"].is_object();
            (restarts(&pod) >= 1 && running).then_some(())
        },
    );
    create(
        &cluster,
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "late"}}),
    );
    let late = wait_for(
        "a podCIDR for the late Node",
        Duration::from_secs(30),
        || pod_cidr(&cluster, "late"),
    );
    let shadowed_block = "10.244.9.0/24".parse().unwrap();
    assert_new_block(
        &cluster,
        late,
        &[kcm_block, block_2, block_3, shadowed_block],
    );
    // node-1..3, outside, twin and shadowed.
    let log = log_of(&cluster, &name);
    assert!(
        log.contains("NodeIPAM: 6 Nodes with podCIDRs"),
        "rebuilt from the Nodes: {log}"
    );

    // A Node that changes while the controller is behind: its first write is refused as stale
    // (409), retried on a fresh read, and the events queued before it do not write again.
    let controller = controller_pod(&cluster, &name);
    cluster
        .container_task(&controller, "sluice-controller", &["pause"])
        .expect("pause the controller");
    create(
        &cluster,
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "busy"}}),
    );
    for i in 0..8 {
        cluster
            .kubectl(&[
                "label",
                "node",
                "busy",
                "--overwrite",
                &format!("round={i}"),
            ])
            .expect("label the busy Node");
    }
    cluster
        .container_task(&controller, "sluice-controller", &["resume"])
        .expect("resume the controller");
    let busy = wait_for(
        "a podCIDR for the busy Node",
        Duration::from_secs(30),
        || pod_cidr(&cluster, "busy"),
    );
    assert_new_block(
        &cluster,
        busy,
        &[kcm_block, block_2, block_3, shadowed_block, late],
    );
    std::thread::sleep(Duration::from_secs(1));
    let log = log_of(&cluster, &name);
    let busy_lines: Vec<&str> = log.lines().filter(|l| l.contains("busy")).collect();
    assert!(
        busy_lines
            .iter()
            .any(|l| l.contains("changed since it was read")),
        "the first write was refused as stale: {busy_lines:#?}"
    );
    assert!(
        busy_lines.iter().all(|l| !l.contains("WARN")),
        "no refused write is a failure: {busy_lines:#?}"
    );
    assert_eq!(
        busy_lines.iter().filter(|l| l.contains("assigned")).count(),
        1,
        "one write that lands: {busy_lines:#?}"
    );
}

/// `block` is a node block of the cluster CIDR that none of `held` overlaps.
fn assert_new_block(cluster: &Cluster, block: IpNetwork, held: &[IpNetwork]) {
    let cluster_cidr: IpNetwork = "10.244.0.0/16".parse().unwrap();
    let fresh = block.prefix() == 24
        && cluster_cidr.contains(block.network())
        && held
            .iter()
            .all(|h| !h.contains(block.network()) && !block.contains(h.network()));
    assert!(
        fresh,
        "{block}: a /24 of {cluster_cidr} apart from {held:?}\n{}\n{}",
        cluster
            .kubectl(&[
                "get",
                "nodes",
                "-o",
                "custom-columns=NAME:.metadata.name,CIDRS:.spec.podCIDRs"
            ])
            .unwrap_or_default(),
        controller_pods(cluster)
            .iter()
            .map(|p| log_of(cluster, p["metadata"]["name"].as_str().unwrap_or_default()))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn an_agent_waits_for_a_late_pod_cidr_and_a_standby_replica_takes_over() {
    require_root();
    let mut cluster = Cluster::up(ClusterOptions {
        inline_values: Some(format!("{NODE_IPAM}{TWO_REPLICAS}")),
        ..ClusterOptions::nodes(2)
    })
    .expect("cluster up");
    let replicas = controller_pods(&cluster);
    assert_eq!(replicas.len(), 2, "{replicas:?}");
    let leader = wait_for("a leader", Duration::from_secs(30), || holder(&cluster));
    let on_node = |name: &str| -> String {
        let pod = replicas
            .iter()
            .find(|p| p["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("the holder {name} is not a replica: {replicas:?}"));
        pod["spec"]["nodeName"].as_str().unwrap().to_string()
    };
    let leader_node = on_node(&leader);
    let standby = replicas
        .iter()
        .map(|p| p["metadata"]["name"].as_str().unwrap().to_string())
        .find(|n| *n != leader)
        .unwrap();
    assert_ne!(on_node(&standby), leader_node, "replicas on distinct nodes");

    // Two replicas running: each Node still gets one block, none twice.
    let names = ["a", "b", "c", "d"];
    for name in names {
        create(
            &cluster,
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}}),
        );
    }
    let blocks: BTreeSet<IpNetwork> = names
        .iter()
        .chain(&["node-1", "node-2"])
        .map(|n| {
            wait_for("a podCIDR", Duration::from_secs(10), || {
                pod_cidr(&cluster, n)
            })
        })
        .collect();
    assert_eq!(blocks.len(), 6, "six distinct blocks: {blocks:?}");

    // The leader's machine dies: no chance to give the Lease up. The agent of a node joining
    // meanwhile waits, saying why, and serves once the standby has waited the Lease out and
    // assigned its block.
    cluster.crash_node(&leader_node).expect("crash");
    // Once every process of the machine is gone: the wait measured from here is the shorter.
    let died = Timestamp::now();
    let started = Instant::now();
    let joined = cluster
        .add_node(JOIN_TIMEOUT)
        .expect("the new node comes up once the standby leads");
    let took = started.elapsed();
    eprintln!("{joined} served {took:?} after {leader_node} (the leader's) died");
    let lease = lease(&cluster);
    assert_eq!(lease["spec"]["holderIdentity"], standby.as_str());
    assert!(
        lease["spec"]["leaseTransitions"].as_i64() >= Some(1),
        "{lease}"
    );
    let duration = lease["spec"]["leaseDurationSeconds"].as_i64().unwrap() as f64;
    let acquired: MicroTime = serde_json::from_value(lease["spec"]["acquireTime"].clone()).unwrap();
    let waited = (acquired.0.as_millisecond() - died.as_millisecond()) as f64 / 1000.0;
    eprintln!("the standby took the Lease {waited:.1} s after the leader died (leaseDurationSeconds {duration})");
    // The holder renews every 2/15 of the duration, and the standby tries as often: it takes
    // the Lease a duration after the last renewal it saw, less those two periods at most; later
    // by the API's latency on each try, which this loaded 2-core machine stretches (30.2 s once,
    // with a third of the cores' time stolen by the host).
    let period = duration * 2.0 / 15.0;
    assert!(
        waited >= duration - 2.0 * period && waited < 3.0 * duration,
        "the standby waited for the Lease to expire, and no longer: {waited:.1} s"
    );
    assert!(
        took.as_secs_f64() >= waited,
        "{joined} was Ready after {took:?}, before anyone could give it a podCIDR"
    );
    let agent_log = cluster.agent_log(&joined).expect("agent log");
    assert!(
        agent_log.contains("waiting for the Node's spec.podCIDR"),
        "{agent_log}"
    );
    let late = pod_cidr(&cluster, &joined).unwrap();
    assert!(!blocks.contains(&late), "{late} is new");

    // A replica stopped as in a rollout (scaled down) gives the Lease up at once. The dead
    // machine's Node and pod are deleted first, as an operator does, so that the ReplicaSet
    // places the replacement on the new node.
    cluster
        .kubectl(&["delete", "node", &leader_node])
        .expect("delete the dead Node");
    cluster
        .kubectl(&[
            "delete",
            "pod",
            "-n",
            "kube-system",
            &leader,
            "--force",
            "--grace-period=0",
        ])
        .expect("delete the dead leader's pod");
    let third = wait_for("a third replica", Duration::from_secs(60), || {
        controller_pods(&cluster).into_iter().find(|p| {
            let name = p["metadata"]["name"].as_str().unwrap_or_default();
            name != leader && name != standby && condition(p, "Ready")
        })
    });
    let third_name = third["metadata"]["name"].as_str().unwrap().to_string();
    assert_eq!(third["spec"]["nodeName"], joined.as_str());
    wait_for(
        "the third replica stands by",
        Duration::from_secs(30),
        || {
            log_of(&cluster, &third_name)
                .contains("another replica leads; standing by")
                .then_some(())
        },
    );
    // The ReplicaSet scales down the replica with the lowest deletion cost first.
    cluster
        .kubectl(&[
            "annotate",
            "pod",
            "-n",
            "kube-system",
            &standby,
            "controller.kubernetes.io/pod-deletion-cost=-1000",
        ])
        .expect("annotate");
    let handed = Instant::now();
    cluster
        .kubectl(&[
            "scale",
            "deployment",
            "-n",
            "kube-system",
            "sluice-controller",
            "--replicas=1",
        ])
        .expect("scale down");
    wait_for("the third replica leads", Duration::from_secs(30), || {
        (holder(&cluster)? == third_name).then_some(())
    });
    let handover = handed.elapsed();
    eprintln!("the Lease changed hands {handover:?} after the scale-down");
    assert!(
        handover.as_secs_f64() < duration / 2.0,
        "a released Lease is taken without waiting for it to expire ({duration} s): {handover:?}"
    );
    let remaining: Vec<String> = controller_pods(&cluster)
        .iter()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .map(|p| p["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        remaining,
        [third_name],
        "the standby was the one scaled down"
    );
}
