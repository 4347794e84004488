//! A programming round that fails is retried with backoff until it succeeds, with no change in
//! the API to wake it; while it keeps failing the agent says so (`/readyz`, the health-check
//! node ports, a metric), and the parts that do not fail (NetworkPolicy here) are programmed
//! all the same. The failure is real: the SERVICES map, filled to capacity behind the agent's
//! back, refuses the entries of a new Service.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sluice_common::ServiceKey;
use sluice_tests::lab::services::ServiceProbes;
use sluice_tests::{
    cni_call, in_netns,
    lab::{Lab, LabOptions},
    probe, require_root, CniOutput,
};

const PORT: u16 = 80;
const HEALTH: &str = "127.0.0.1:9421";
const SERVICES_CAPACITY: u32 = 32;

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

/// GET on the node's network namespace: (status, body).
fn get(lab: &Lab, address: String, path: &'static str) -> (u16, String) {
    in_netns(&lab.nodes[0].node.ns.path(), move || {
        probe::http_get(&address, path)
    })
    .unwrap_or_else(|| panic!("{path} answers"))
}

/// CNI 1.1 STATUS, as the runtime asks it of the node's plugin.
fn status(lab: &Lab) -> CniOutput {
    let conf = format!(
        r#"{{"cniVersion":"1.1.0","name":"sluice","type":"sluice-cni","socket":"{}"}}"#,
        lab.nodes[0].node.socket().display()
    );
    cni_call(&[("CNI_COMMAND", "STATUS")], conf.as_bytes())
}

fn wait_for(lab: &Lab, what: &str, timeout: Duration, done: impl Fn() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "{what} within {timeout:?}; agent log:\n{}",
            lab.nodes[0].node.agent_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn connects(lab: &Lab, from: &str, to: &str) -> bool {
    let netns = lab
        .kubelet
        .pod(&format!("default/{from}"))
        .expect("pod")
        .netns
        .path();
    probe::tcp_within(
        &netns,
        None,
        lab.pod_ips()[&format!("default/{to}")],
        PORT,
        Duration::from_millis(300),
    )
    .is_some()
}

#[test]
fn a_failing_part_is_retried_and_reported_while_the_others_are_programmed() {
    require_root();
    let mut lab = Lab::up_with_agent_config(
        LabOptions::single_node(&[PORT]),
        &format!("bpfMapSizes: {{SERVICES: {SERVICES_CAPACITY}}}\n"),
    )
    .expect("lab up");
    lab.apply(vec![
        pod("a"),
        pod("b"),
        pod("c"),
        service(
            "lb",
            json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local"}),
        ),
    ])
    .expect("apply");
    lab.wait_programmed(Duration::from_secs(30))
        .expect("programmed");
    assert_eq!(get(&lab, HEALTH.into(), "/readyz").0, 200);
    let health_check_port = lab.service("default", "lb").expect("service")["spec"]
        ["healthCheckNodePort"]
        .as_u64()
        .expect("a health-check node port");
    let health_check = format!("127.0.0.1:{health_check_port}");
    let (code, body) = get(&lab, health_check.clone(), "/");
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["serviceProxyHealthy"],
        true
    );

    // Fill SERVICES with frontends nobody asked for, then ask for a Service that needs room.
    let mut maps = lab.nodes[0].node.maps();
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
    lab.apply(vec![service("extra", json!({}))]).expect("apply");
    wait_for(&lab, "/readyz turns 503", Duration::from_secs(10), || {
        get(&lab, HEALTH.into(), "/readyz").0 == 503
    });
    let (_, why) = get(&lab, HEALTH.into(), "/readyz");
    assert!(
        why.contains("rounds in a row")
            && why.contains(&format!(
                "services: map SERVICES (capacity {SERVICES_CAPACITY}) is full"
            )),
        "{why}"
    );
    let (code, body) = get(&lab, health_check.clone(), "/");
    assert_eq!(code, 503, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["serviceProxyHealthy"], false, "{body}");
    assert_eq!(body["localEndpoints"], 1, "{body}");
    let (code, msg) = status(&lab).error();
    assert_eq!(code, 51, "STATUS while programming keeps failing: {msg}");
    assert!(msg.contains("rounds in a row"), "{msg}");
    let metrics = get(&lab, HEALTH.into(), "/metrics").1;
    let failures: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("sluice_program_round_failures_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(failures >= 3, "{metrics}");

    // Policy is its own part: programmed while Services keep failing.
    assert!(connects(&lab, "c", "b"));
    lab.apply(vec![json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "b-from-a", "namespace": "default"},
        "spec": {"podSelector": {"matchLabels": {"pod": "b"}},
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "a"}}}]}]},
    })])
    .expect("policy");
    wait_for(
        &lab,
        "the policy isolates b",
        Duration::from_secs(10),
        || !connects(&lab, "c", "b"),
    );
    assert!(connects(&lab, "a", "b"));
    assert_eq!(get(&lab, HEALTH.into(), "/readyz").0, 503, "still failing");

    // Room again, and nothing in the API changes: the retry alone recovers.
    for key in &junk {
        maps.services.remove(key).expect("remove junk");
    }
    wait_for(&lab, "/readyz turns 200", Duration::from_secs(40), || {
        get(&lab, HEALTH.into(), "/readyz").0 == 200
    });
    assert_eq!(get(&lab, health_check, "/").0, 200);
    let ready = status(&lab);
    assert_eq!(
        (ready.code, ready.stdout.as_str()),
        (0, ""),
        "STATUS once recovered"
    );
    let extra = lab.service_ip("default", "extra").expect("a ClusterIP");
    let netns = lab.kubelet.pod("default/c").expect("pod").netns.path();
    let reply = probe::tcp(&netns, None, extra, 8080).expect("the new Service answers");
    assert_eq!(reply.server, "default/a");
    assert!(lab.nodes[0].node.agent_log().contains("succeeded again"));
}
