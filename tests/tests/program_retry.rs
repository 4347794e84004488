//! A programming round that fails is retried with backoff until it succeeds, with no change in
//! the API to wake it; while it keeps failing the agent says so (`/readyz`, the health-check
//! node ports, a metric, CNI STATUS), and the parts that do not fail (NetworkPolicy here) are
//! programmed all the same. The failure is real: the SERVICES map, filled to capacity behind the
//! agent's back, refuses the entries of a new Service. On the lab's real cluster, the map sized
//! by the chart's `agent.bpfMapSizes`.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use sluice_common::ServiceKey;
use sluice_tests::{
    cluster::{Cluster, ClusterOptions},
    cni_call, in_netns, probe, require_root, CniOutput,
};

const PORT: u16 = 80;
const HEALTH: &str = "127.0.0.1:9421";
const SERVICES_CAPACITY: u32 = 32;
const NODE: &str = "node-1";

fn pod(name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": {"pod": name}},
        "spec": {"containers": [{"name": "c", "image": "x"}]},
    })
}

fn service(name: &str, extra: Value) -> Value {
    let mut svc = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"selector": {"pod": "a"},
                 "ports": [{"port": 8080, "targetPort": PORT, "protocol": "TCP"}]},
    });
    if let (Some(spec), Some(extra)) = (svc["spec"].as_object_mut(), extra.as_object()) {
        spec.extend(extra.clone());
    }
    svc
}

struct Lab {
    cluster: Cluster,
    /// Each pod's network namespace and address, by name.
    pods: BTreeMap<String, (PathBuf, Ipv4Addr)>,
}

impl Lab {
    fn apply(&self, objects: Vec<Value>) {
        self.cluster
            .apply_lab_manifests(objects, &[PORT])
            .expect("apply");
    }

    /// GET on the node's network namespace (the agent runs on the host network): (status, body).
    fn get(&self, address: String, path: &'static str) -> (u16, String) {
        in_netns(&self.cluster.nodes[0].ns.path(), move || {
            probe::http_get(&address, path)
        })
        .unwrap_or_else(|| panic!("{path} answers"))
    }

    /// CNI 1.1 STATUS, as a runtime asks it of the node's plugin (through the agent's socket in
    /// the node's mount namespace: `/run`, as `/var/run` is an absolute link that would resolve
    /// to this machine's).
    fn status(&self) -> CniOutput {
        let socket = self.cluster.nodes[0]
            .path("/run/sluice/cni.sock")
            .expect("the node runs");
        let conf = format!(
            r#"{{"cniVersion":"1.1.0","name":"sluice","type":"sluice-cni","socket":"{}"}}"#,
            socket.display()
        );
        cni_call(&[("CNI_COMMAND", "STATUS")], conf.as_bytes())
    }

    fn agent_log(&self) -> String {
        self.cluster.agent_log(NODE).expect("agent log")
    }

    fn wait_for(&self, what: &str, timeout: Duration, done: impl Fn() -> bool) {
        let deadline = Instant::now() + timeout;
        while !done() {
            assert!(
                Instant::now() < deadline,
                "{what} within {timeout:?}; agent log:\n{}",
                self.agent_log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn connects(&self, from: &str, to: &str) -> bool {
        probe::tcp_within(
            &self.pods[from].0,
            None,
            self.pods[to].1,
            PORT,
            Duration::from_millis(300),
        )
        .is_some()
    }

    fn service_ip(&self, name: &str) -> Ipv4Addr {
        self.cluster.get(&["service", name]).expect("service")["spec"]["clusterIP"]
            .as_str()
            .and_then(|ip| ip.parse().ok())
            .expect("a ClusterIP")
    }
}

fn lab() -> Lab {
    require_root();
    let cluster = Cluster::up(ClusterOptions {
        inline_values: Some(format!(
            "agent:\n  bpfMapSizes: {{SERVICES: {SERVICES_CAPACITY}}}\n"
        )),
        ..ClusterOptions::nodes(1)
    })
    .expect("cluster up");
    cluster
        .apply_lab_manifests(
            vec![
                pod("a"),
                pod("b"),
                pod("c"),
                service(
                    "lb",
                    json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local"}),
                ),
            ],
            &[PORT],
        )
        .expect("apply");
    cluster
        .wait_programmed(Duration::from_secs(60))
        .expect("programmed");
    let pods = cluster.pod_addresses(Some("default")).expect("pods");
    Lab { cluster, pods }
}

#[test]
fn a_failing_part_is_retried_and_reported_while_the_others_are_programmed() {
    let lab = lab();
    assert_eq!(lab.get(HEALTH.into(), "/readyz").0, 200);
    let health_check_port = lab.cluster.get(&["service", "lb"]).expect("service")["spec"]
        ["healthCheckNodePort"]
        .as_u64()
        .expect("a health-check node port");
    let health_check = format!("127.0.0.1:{health_check_port}");
    let (code, body) = lab.get(health_check.clone(), "/");
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["serviceProxyHealthy"],
        true
    );

    // Fill SERVICES with frontends nobody asked for, then ask for a Service that needs room.
    let mut maps = lab.cluster.nodes[0].maps().expect("the node's maps");
    let (template, value) = maps
        .services
        .iter()
        .next()
        .expect("a programmed frontend")
        .expect("readable");
    let mut junk = Vec::new();
    for n in 0..SERVICES_CAPACITY {
        let key = ServiceKey {
            addr: sluice_common::IpKey::v4([10, 96, 250, n as u8]),
            ..template
        };
        if maps.services.insert(key, value, 0).is_err() {
            break;
        }
        junk.push(key);
    }
    assert!(!junk.is_empty(), "room for junk frontends");
    lab.apply(vec![service("extra", json!({}))]);
    lab.wait_for("/readyz turns 503", Duration::from_secs(10), || {
        lab.get(HEALTH.into(), "/readyz").0 == 503
    });
    let (_, why) = lab.get(HEALTH.into(), "/readyz");
    assert!(
        why.contains("rounds in a row")
            && why.contains(&format!(
                "services: map SERVICES (capacity {SERVICES_CAPACITY}) is full"
            )),
        "{why}"
    );
    let (code, body) = lab.get(health_check.clone(), "/");
    assert_eq!(code, 503, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["serviceProxyHealthy"], false, "{body}");
    assert_eq!(body["localEndpoints"], 1, "{body}");
    let (code, msg) = lab.status().error();
    assert_eq!(code, 51, "STATUS while programming keeps failing: {msg}");
    assert!(msg.contains("rounds in a row"), "{msg}");
    let metrics = lab.get(HEALTH.into(), "/metrics").1;
    let failures: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("sluice_program_round_failures_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(failures >= 3, "{metrics}");

    // Policy is its own part: programmed while Services keep failing.
    assert!(lab.connects("c", "b"));
    lab.apply(vec![json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "b-from-a", "namespace": "default"},
        "spec": {"podSelector": {"matchLabels": {"pod": "b"}},
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "a"}}}]}]},
    })]);
    lab.wait_for("the policy isolates b", Duration::from_secs(10), || {
        !lab.connects("c", "b")
    });
    assert!(lab.connects("a", "b"));
    assert_eq!(lab.get(HEALTH.into(), "/readyz").0, 503, "still failing");

    // Room again, and nothing in the API changes: the retry alone recovers.
    for key in &junk {
        maps.services.remove(key).expect("remove junk");
    }
    lab.wait_for("/readyz turns 200", Duration::from_secs(40), || {
        lab.get(HEALTH.into(), "/readyz").0 == 200
    });
    assert_eq!(lab.get(health_check, "/").0, 200);
    let ready = lab.status();
    assert_eq!(
        (ready.code, ready.stdout.as_str()),
        (0, ""),
        "STATUS once recovered"
    );
    let extra = lab.service_ip("extra");
    let reply = probe::tcp(&lab.pods["c"].0, None, extra, 8080).expect("the new Service answers");
    assert_eq!(reply.server, "default/a");
    assert!(lab.agent_log().contains("succeeded again"));
}
