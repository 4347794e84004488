//! A load-balanced connection lives as long as what it was balanced to: when its endpoint leaves
//! the frontend's set (not ready, removed) or the frontend goes (an externalIP removed), the
//! agent flushes its SERVICE_NAT entries and its next packet is balanced anew; an endpoint that
//! terminates while others are ready drains: its connections go on, new ones go elsewhere. The
//! Service has no selector and its EndpointSlice is written by the test (under a manager label
//! of its own, which kube-controller-manager's controllers leave alone), so every condition is
//! the test's to set. On a one-node real cluster.

use std::{
    net::{Ipv4Addr, UdpSocket},
    path::Path,
    time::Duration,
};

use serde_json::{json, Value};
use sluice_tests::{
    cluster::{Cluster, ClusterOptions},
    in_netns,
    lab::services::{ServiceProbes, Source},
    probe::{self, session_server, Session},
    require_root,
};

const PORT: u16 = 80;
const SESSION_PORT: u16 = 9000;
const EXTERNAL_IP: &str = "192.168.77.150";

fn pod(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"containers": [{"name": "c", "image": "x"}]}})
}

fn service(external_ips: &[&str]) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "manual", "namespace": "default"},
        "spec": {"clusterIP": "10.96.0.70", "externalIPs": external_ips,
            "ports": [{"name": "udp", "port": 8080, "targetPort": PORT, "protocol": "UDP"},
                      {"name": "session", "port": SESSION_PORT, "protocol": "TCP"}]}})
}

/// The Service's one slice: each endpoint with its conditions.
fn slice(cluster: &Cluster, endpoints: &[(&str, Value)]) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(pod, conditions)| {
            let ip = cluster.pod_ip(&format!("default/{pod}")).expect("pod IP");
            json!({"addresses": [ip.to_string()], "conditions": conditions,
                "nodeName": cluster.nodes[0].name,
                "targetRef": {"kind": "Pod", "namespace": "default", "name": pod}})
        })
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "manual-1", "namespace": "default",
            "labels": {"kubernetes.io/service-name": "manual",
                "endpointslice.kubernetes.io/managed-by": "sluice-tests"}},
        "addressType": "IPv4",
        "ports": [{"name": "udp", "port": PORT, "protocol": "UDP"},
                  {"name": "session", "port": SESSION_PORT, "protocol": "TCP"}],
        "endpoints": endpoints})
}

fn ready() -> Value {
    json!({"ready": true, "serving": true, "terminating": false})
}

fn not_ready() -> Value {
    json!({"ready": false, "serving": false, "terminating": false})
}

fn terminating() -> Value {
    json!({"ready": false, "serving": true, "terminating": true})
}

/// One UDP flow: the same socket, so the same 5-tuple, for every datagram.
struct UdpFlow(UdpSocket);

impl UdpFlow {
    fn open(ns: &Path, ip: Ipv4Addr, port: u16) -> UdpFlow {
        let socket = in_netns(ns, move || {
            let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
            socket.connect((ip, port)).unwrap();
            socket
        });
        socket
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        UdpFlow(socket)
    }

    /// The pod answering, if one does.
    fn ask(&self) -> Option<String> {
        self.0.send(b"who").ok()?;
        let mut buf = [0u8; 128];
        let n = self.0.recv(&mut buf).ok()?;
        let text = std::str::from_utf8(&buf[..n]).ok()?;
        text.split_whitespace().next().map(str::to_string)
    }
}

fn programmed(cluster: &Cluster, objects: Vec<Value>) {
    cluster
        .apply_lab_manifests(objects, &[PORT])
        .expect("apply");
    cluster
        .wait_programmed(Duration::from_secs(10))
        .expect("programmed");
}

/// The slice with these endpoints, programmed.
fn endpoints(cluster: &Cluster, endpoints: &[(&str, Value)]) {
    programmed(cluster, vec![slice(cluster, endpoints)]);
}

fn netns(cluster: &Cluster, pod: &str) -> std::path::PathBuf {
    cluster
        .netns_of(&Source::Pod(format!("default/{pod}")))
        .expect("pod's namespace")
}

#[test]
fn connections_end_with_their_endpoint_or_frontend_and_drain_from_a_terminating_one() {
    require_root();
    let cluster = Cluster::up(ClusterOptions::nodes(1)).expect("cluster up");
    cluster
        .apply_lab_manifests(vec![pod("client"), pod("web-1"), pod("web-2")], &[PORT])
        .expect("pods");
    cluster
        .wait_programmed(Duration::from_secs(60))
        .expect("pods running");
    let both_ready = slice(&cluster, &[("web-1", ready()), ("web-2", ready())]);
    programmed(&cluster, vec![service(&[]), both_ready.clone()]);
    let client = netns(&cluster, "client");
    for name in ["web-1", "web-2"] {
        session_server(
            &netns(&cluster, name),
            &format!("default/{name}"),
            SESSION_PORT,
        );
    }
    let vip: Ipv4Addr = "10.96.0.70".parse().unwrap();

    // UDP: a flow keeps its endpoint, until that endpoint is no longer ready.
    let udp = UdpFlow::open(&client, vip, 8080);
    let first = udp.ask().expect("the flow is answered");
    assert_eq!(
        udp.ask().as_ref(),
        Some(&first),
        "the flow keeps its endpoint"
    );
    let (first_pod, other_pod) = if first == "default/web-1" {
        ("web-1", "web-2")
    } else {
        ("web-2", "web-1")
    };
    endpoints(&cluster, &[(first_pod, not_ready()), (other_pod, ready())]);
    assert_eq!(
        udp.ask(),
        Some(format!("default/{other_pod}")),
        "the flow moved off the endpoint that is not ready"
    );

    // TCP: sessions on both endpoints; web-1 terminates while web-2 is ready.
    programmed(&cluster, vec![both_ready]);
    let mut sessions = Session::open_many(&client, vip, SESSION_PORT, 16);
    assert!(
        sessions.iter().any(|(pod, _)| pod == "default/web-1")
            && sessions.iter().any(|(pod, _)| pod == "default/web-2"),
        "sessions on both endpoints"
    );
    endpoints(&cluster, &[("web-1", terminating()), ("web-2", ready())]);
    for (pod, session) in &mut sessions {
        assert_eq!(
            session.ask().expect("a session goes on"),
            *pod,
            "a session keeps its endpoint, the terminating one too"
        );
    }
    for _ in 0..10 {
        let mut session = Session::open(&client, vip, SESSION_PORT);
        assert_eq!(
            session.ask().expect("a new session answers"),
            "default/web-2",
            "new sessions avoid the terminating endpoint"
        );
    }
    // web-1 leaves the slice: its sessions are reset, the others go on.
    endpoints(&cluster, &[("web-2", ready())]);
    for (pod, session) in &mut sessions {
        match session.ask() {
            Ok(answer) => assert_eq!(
                (pod.as_str(), answer.as_str()),
                ("default/web-2", "default/web-2")
            ),
            Err(e) => {
                assert_eq!(pod, "default/web-1", "web-2's session broke: {e}");
                assert!(
                    probe::was_reset(&e),
                    "web-1's session is reset, not left hanging: {e}"
                );
            }
        }
    }

    // An externalIP: a flow through it ends with it.
    programmed(&cluster, vec![service(&[EXTERNAL_IP])]);
    let through_external = UdpFlow::open(&client, EXTERNAL_IP.parse().unwrap(), 8080);
    assert_eq!(
        through_external.ask(),
        Some("default/web-2".to_string()),
        "the externalIP balances"
    );
    programmed(&cluster, vec![service(&[])]);
    assert_eq!(
        through_external.ask(),
        None,
        "the flow ended with its frontend"
    );
    assert_eq!(
        udp.ask(),
        Some("default/web-2".to_string()),
        "the ClusterIP is unaffected"
    );
}
