//! Services on the lab, without kube-proxy: ClusterIP, NodePort, LoadBalancer and externalIPs
//! reached from pods on the same and on another node, and from a host outside the cluster.

use std::{collections::BTreeMap, net::Ipv4Addr, time::Duration};

use serde_json::{json, Value};
use sluice_tests::{
    lab::{Encap, Lab, LabOptions},
    probe::{self, Reply},
    require_root,
};

const PORT: u16 = 80;

fn pod(name: &str, node: usize, app: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": {"app": app}},
        "spec": {"nodeName": format!("node-{node}"), "containers": [{"name": "c", "image": "x"}]},
    })
}

fn lab(encap: Encap) -> Lab {
    require_root();
    let mut lab = Lab::up(LabOptions {
        nodes: 2,
        encap,
        attach_mode: "auto".into(),
        ports: vec![PORT],
    })
    .expect("lab up");
    lab.apply(vec![
        pod("client-1", 1, "client"),
        pod("client-2", 2, "client"),
        pod("web-1", 1, "web"),
        pod("web-2", 2, "web"),
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.10", "selector": {"app": "web"},
                     "ports": [{"name": "http", "port": 8080, "targetPort": PORT, "protocol": "TCP"},
                               {"name": "dns", "port": 53, "targetPort": PORT, "protocol": "UDP"}]},
        }),
    ])
    .expect("apply");
    lab.wait_programmed(Duration::from_secs(20))
        .expect("programmed");
    lab
}

fn netns_of(lab: &Lab, pod: &str) -> std::path::PathBuf {
    lab.kubelet
        .pod(&format!("default/{pod}"))
        .expect("pod")
        .netns
        .path()
}

fn ip_of(lab: &Lab, pod: &str) -> Ipv4Addr {
    lab.kubelet.pod(&format!("default/{pod}")).expect("pod").ip
}

fn spread(replies: &[Reply]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for reply in replies {
        *counts.entry(reply.server.clone()).or_default() += 1;
    }
    counts
}

#[test]
fn cluster_ip_from_pods_on_both_nodes() {
    let lab = lab(Encap::Vxlan);
    let vip: Ipv4Addr = "10.96.0.10".parse().unwrap();
    for client in ["client-1", "client-2"] {
        let ns = netns_of(&lab, client);
        let replies: Vec<Reply> = (0..20)
            .map(|_| probe::tcp(&ns, None, vip, 8080).expect("TCP through the ClusterIP"))
            .collect();
        for reply in &replies {
            assert_eq!(
                reply.client,
                ip_of(&lab, client),
                "the endpoint sees the pod"
            );
        }
        let counts = spread(&replies);
        assert_eq!(
            counts.len(),
            2,
            "{client}: both endpoints answer: {counts:?}"
        );
        let udp = probe::udp(&ns, vip, 53).expect("UDP through the ClusterIP");
        assert!(udp.server.contains("/web-"), "{udp:?}");
    }
}

fn tcp_many(ns: &std::path::Path, ip: Ipv4Addr, port: u16, count: usize) -> Vec<Reply> {
    (0..count)
        .map(|i| {
            probe::tcp(ns, None, ip, port)
                .unwrap_or_else(|| panic!("TCP probe {i} to {ip}:{port} answered"))
        })
        .collect()
}

fn node_port_service(name: &str, node_port: u16, local: bool) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"type": "NodePort", "clusterIP": if local { "10.96.0.12" } else { "10.96.0.11" },
                 "selector": {"app": "web"},
                 "externalTrafficPolicy": if local { "Local" } else { "Cluster" },
                 "ports": [{"name": "http", "port": 8080, "targetPort": PORT, "nodePort": node_port, "protocol": "TCP"},
                           {"name": "dns", "port": 8080, "targetPort": PORT, "nodePort": node_port, "protocol": "UDP"}]},
    })
}

/// NodePort with externalTrafficPolicy Cluster: from outside, every node balances over every
/// endpoint and the endpoint sees the entry node's gateway (SNAT, so replies come back through
/// it); pods reach their own and the other node's NodePort.
#[test]
fn node_port_from_outside_and_from_pods() {
    for encap in [Encap::Vxlan, Encap::NoEncap] {
        let mut lab = lab(encap);
        lab.apply(vec![node_port_service("web-np", 30080, false)])
            .expect("apply");
        lab.wait_programmed(Duration::from_secs(20))
            .expect("programmed");
        let outside = lab.external().path();
        for node in 0..2 {
            let node_ip = lab.nodes[node].ip;
            let gateway: Ipv4Addr = format!("10.244.{node}.1").parse().unwrap();
            let replies = tcp_many(&outside, node_ip, 30080, 20);
            let counts = spread(&replies);
            assert_eq!(
                counts.len(),
                2,
                "{encap:?} node {node}: both endpoints: {counts:?}"
            );
            for reply in &replies {
                assert_eq!(
                    reply.client, gateway,
                    "{encap:?}: SNAT to the entry node's gateway"
                );
            }
            let udp = probe::udp(&outside, node_ip, 30080).expect("UDP NodePort from outside");
            assert!(udp.server.contains("/web-"), "{udp:?}");
            for client in ["client-1", "client-2"] {
                let reply = probe::tcp(&netns_of(&lab, client), None, node_ip, 30080)
                    .unwrap_or_else(|| panic!("{encap:?}: {client} -> node {node} NodePort"));
                assert!(reply.server.contains("/web-"), "{reply:?}");
            }
        }
    }
}

/// externalTrafficPolicy Local: only the entry node's own endpoint answers, and it sees the
/// outside client's real address; the health-check node port tells a load balancer so.
#[test]
fn external_traffic_policy_local_keeps_the_client_address() {
    let mut lab = lab(Encap::Vxlan);
    let mut svc = node_port_service("web-local", 30081, true);
    svc["spec"]["type"] = json!("LoadBalancer");
    svc["spec"]["healthCheckNodePort"] = json!(30200);
    lab.apply(vec![svc]).expect("apply");
    lab.wait_programmed(Duration::from_secs(20))
        .expect("programmed");
    let outside = lab.external().path();
    let external_ip = sluice_tests::lab::EXTERNAL_IP;
    for (node, endpoint) in [(0, "default/web-1"), (1, "default/web-2")] {
        let replies = tcp_many(&outside, lab.nodes[node].ip, 30081, 10);
        for reply in &replies {
            assert_eq!(reply.server, endpoint, "only the local endpoint");
            assert_eq!(reply.client, external_ip, "the client address is preserved");
        }
    }
}
