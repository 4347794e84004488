//! NetworkPolicy for traffic a node SNATs on its way in (NodePort, externalTrafficPolicy
//! Cluster): judged the same whichever node it enters, and never as the node itself, which is
//! always let in (kubelet probes). The endpoint sits on node-1; clients outside the cluster come
//! in through node-1 (the endpoint's node: SNAT to its own gateway) and node-2 (SNAT to node-2's
//! gateway, then the tunnel or the node network). On the lab's real cluster.

use std::{net::Ipv4Addr, path::PathBuf, time::Duration};

use serde_json::{json, Value};
use sluice_tests::{
    cluster::{Cluster, ClusterOptions},
    lab::{
        services::{ServiceProbes, Source},
        Encap,
    },
    probe, require_root,
};

const PORT: u16 = 80;
const NODE_PORT: u16 = 30090;
const PROBE_TIMEOUT: Duration = Duration::from_millis(300);

fn cluster(encap: Encap) -> Cluster {
    require_root();
    let cluster = Cluster::up(ClusterOptions::nodes(2).with_encap(encap)).expect("cluster up");
    apply(
        &cluster,
        vec![
            json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web", "namespace": "default", "labels": {"app": "web"}},
            "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "x"}]}}),
            json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"type": "NodePort", "externalTrafficPolicy": "Cluster",
                "selector": {"app": "web"},
                "ports": [{"port": 8080, "targetPort": PORT, "nodePort": NODE_PORT}]}}),
        ],
    );
    cluster
        .wait_programmed(Duration::from_secs(60))
        .expect("programmed");
    cluster
}

fn apply(cluster: &Cluster, objects: Vec<Value>) {
    cluster
        .apply_lab_manifests(objects, &[PORT])
        .expect("apply");
}

fn netns(cluster: &Cluster, pod: &str) -> PathBuf {
    cluster
        .netns_of(&Source::Pod(pod.into()))
        .expect("pod's namespace")
}

fn web_ingress(name: &str, from: Value) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [{"from": from}]}})
}

fn client_on_node_2() -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "client", "namespace": "default", "labels": {"app": "client"}},
        "spec": {"nodeName": "node-2", "containers": [{"name": "c", "image": "x"}]}})
}

/// A UDP ClusterIP Service in front of the web pod.
fn udp_service(name: &str, cluster_ip: &str, port: u16, target_port: u16) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"clusterIP": cluster_ip, "selector": {"app": "web"},
            "ports": [{"port": port, "targetPort": target_port, "protocol": "UDP"}]}})
}

/// Whether an outside client gets through the NodePort of each node.
fn from_outside(cluster: &Cluster) -> [bool; 2] {
    let outside = cluster.external_netns();
    [0, 1].map(|node| {
        probe::tcp_within(
            &outside,
            None,
            cluster.nodes[node].ip,
            NODE_PORT,
            PROBE_TIMEOUT,
        )
        .is_some()
    })
}

#[test]
fn snat_node_port_traffic_is_judged_alike_on_every_node() {
    for encap in [Encap::Vxlan, Encap::NoEncap] {
        let cluster = cluster(encap);
        assert_eq!(from_outside(&cluster), [true, true], "{encap:?}: no policy");

        // Only pods of the namespace: an outside client is none of them, whichever node it
        // enters (through node-1 it used to pass as node-1 itself).
        apply(
            &cluster,
            vec![web_ingress("from-pods", json!([{"podSelector": {}}]))],
        );
        cluster.wait_programmed(Duration::from_secs(5)).unwrap();
        assert_eq!(
            from_outside(&cluster),
            [false, false],
            "{encap:?}: pods only"
        );

        // A block holding both nodes' gateway addresses lets SNATed traffic in on both.
        apply(
            &cluster,
            vec![web_ingress(
                "from-pod-range",
                json!([{"ipBlock": {"cidr": "10.244.0.0/16"}}]),
            )],
        );
        cluster.wait_programmed(Duration::from_secs(5)).unwrap();
        assert_eq!(from_outside(&cluster), [true, true], "{encap:?}: pod range");

        // The kubelet's probes (the node itself) still get in.
        let node_ns = cluster.nodes[0].ns.path();
        let web: Ipv4Addr = cluster
            .kubectl(&["get", "pod", "web", "-o", "jsonpath={.status.podIP}"])
            .unwrap()
            .parse()
            .unwrap();
        cluster
            .kubectl(&["delete", "networkpolicy", "from-pod-range"])
            .unwrap();
        // A deletion is seen by its effect (its resourceVersion is on no object).
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while from_outside(&cluster) != [false, false] {
            assert!(
                std::time::Instant::now() < deadline,
                "{encap:?}: pods only again: {:?}",
                from_outside(&cluster)
            );
        }
        assert!(
            probe::tcp_within(&node_ns, None, web, PORT, PROBE_TIMEOUT).is_some(),
            "{encap:?}: the node reaches its pod"
        );
    }
}

/// A UDP datagram to a Service whose endpoints have nothing listening on the target port: the
/// endpoint's kernel answers port unreachable, quoting the datagram as it arrived (to the
/// endpoint). The client must get the error (ECONNREFUSED on its socket, which knows the
/// Service's address), though its own ingress is denied: the error is related traffic.
///
/// A datagram larger than the pod MTU leaves the client in IPv4 fragments: every fragment is
/// DNATed to the endpoint on the other node and let into the isolated endpoint by the rule its
/// first fragment matched, so the endpoint reassembles and answers. (One cluster for both.)
#[test]
fn icmp_errors_and_fragments_through_a_cluster_ip_reach_isolated_pods() {
    let cluster = cluster(Encap::Vxlan);
    apply(
        &cluster,
        vec![
            client_on_node_2(),
            udp_service("closed", "10.96.0.53", 53, 9999),
            udp_service("web-udp", "10.96.0.80", 8053, PORT),
            json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"name": "client-deny-in", "namespace": "default"},
                "spec": {"podSelector": {"matchLabels": {"app": "client"}}, "policyTypes": ["Ingress"]}}),
            json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"name": "web-udp-from-client", "namespace": "default"},
                "spec": {"podSelector": {"matchLabels": {"app": "web"}},
                    "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                        "ports": [{"protocol": "UDP", "port": PORT}, {"protocol": "UDP", "port": 9999}]}]}}),
        ],
    );
    cluster.wait_programmed(Duration::from_secs(60)).unwrap();
    let netns = netns(&cluster, "default/client");
    let answer = sluice_tests::in_netns(&netns, || {
        let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        socket.connect("10.96.0.53:53").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(1)))
            .unwrap();
        socket.send(b"anyone?").unwrap();
        socket.recv(&mut [0; 64]).map_err(|e| e.kind())
    });
    assert_eq!(
        answer,
        Err(std::io::ErrorKind::ConnectionRefused),
        "the endpoint's port unreachable, translated back to the ClusterIP"
    );

    let vip = "10.96.0.80".parse().unwrap();
    for len in [100, 4000, 20_000] {
        let reply = probe::udp_datagram(&netns, vip, 8053, len, Duration::from_secs(1));
        assert_eq!(
            reply.map(|r| r.server),
            Some("default/web".to_string()),
            "a {len}-byte datagram through the ClusterIP"
        );
    }
}
