//! The lab's plumbing for Services on its real cluster: what kube-apiserver allocated, read
//! through the `ServiceProbes` helpers; the external client; probes from pods, nodes and the
//! external client that report who answered, the client address it saw and the port it was
//! reached on. Probes go to pod, node and routed addresses directly: whether Services forward is
//! the datapath's suites' job.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use serde_json::json;
use sluice_tests::{
    cluster::{Cluster, ClusterOptions},
    lab::{
        report::Protocol,
        services::{Frontend, ServiceProbes, Source},
    },
    probe::Servers,
    require_root,
};

/// kube-apiserver's `--service-cluster-ip-range` and default `--service-node-port-range`.
fn in_service_cidr(ip: Ipv4Addr) -> bool {
    ip.octets()[..2] == [10, 96]
}
const NODE_PORTS: std::ops::RangeInclusive<u16> = 30000..=32767;

fn pod(name: &str, node: &str, app: Option<&str>) -> serde_json::Value {
    let labels = app.map_or(json!({}), |app| json!({"app": app}));
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "x",
                 "ports": [{"name": "http", "containerPort": 8080}]}]},
    })
}

#[test]
fn service_helpers_external_client_and_probes() {
    require_root();
    let cluster = Cluster::up(ClusterOptions::nodes(2)).expect("cluster up");
    cluster.apply_lab_manifests(vec![
        pod("client", "node-1", None),
        pod("web-1", "node-1", Some("web")),
        pod("web-2", "node-2", Some("web")),
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "default"},
               "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": "http"}]}}),
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web-np", "namespace": "default"},
               "spec": {"type": "NodePort", "selector": {"app": "web"}, "externalIPs": ["198.51.100.10"],
                        "ports": [{"name": "udp", "port": 80, "protocol": "UDP"},
                                  {"name": "tcp", "port": 80, "protocol": "TCP"}]}}),
    ], &[80])
    .expect("apply");
    cluster
        .wait_programmed(Duration::from_secs(60))
        .expect("programmed");

    // What the API server allocated, through the helpers: kube-apiserver picks at random, so
    // the helpers are held to what kubectl reads off the same objects.
    let jsonpath = |svc: &str, path: &str| {
        cluster
            .kubectl(&["get", "service", svc, "-o", &format!("jsonpath={{{path}}}")])
            .unwrap()
    };
    let web_ip = cluster.service_ip("default", "web").unwrap();
    let np_ip = cluster.service_ip("default", "web-np").unwrap();
    assert_eq!(web_ip.to_string(), jsonpath("web", ".spec.clusterIP"));
    assert_eq!(np_ip.to_string(), jsonpath("web-np", ".spec.clusterIP"));
    assert!(in_service_cidr(web_ip) && in_service_cidr(np_ip) && web_ip != np_ip);
    let node_port = cluster
        .node_port("default", "web-np", 80, Protocol::Udp)
        .unwrap();
    assert!(NODE_PORTS.contains(&node_port), "{node_port}");
    assert_eq!(
        node_port.to_string(),
        jsonpath("web-np", ".spec.ports[?(@.protocol==\"UDP\")].nodePort")
    );
    assert_eq!(
        cluster
            .node_port("default", "web-np", 80, Protocol::Tcp)
            .unwrap(),
        node_port,
        "TCP and UDP of one port share a node port"
    );
    assert!(cluster
        .node_port("default", "web", 80, Protocol::Tcp)
        .is_err());
    let frontend = |f: Frontend, protocol| cluster.frontend("default", "web-np", &f, 80, protocol);
    assert_eq!(
        frontend(Frontend::ClusterIp, Protocol::Tcp).unwrap(),
        SocketAddrV4::new(np_ip, 80)
    );
    assert_eq!(
        frontend(Frontend::NodePort("node-2".into()), Protocol::Udp).unwrap(),
        SocketAddrV4::new(cluster.nodes[1].ip, node_port)
    );
    assert_eq!(
        frontend(Frontend::ExternalIp, Protocol::Tcp).unwrap(),
        SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 10), 80)
    );
    let no_lb = frontend(Frontend::LoadBalancer, Protocol::Tcp).unwrap_err();
    assert!(no_lb.to_string().contains("no load-balancer IP"), "{no_lb}");
    assert!(cluster
        .frontend("default", "web", &Frontend::ClusterIp, 81, Protocol::Tcp)
        .is_err());
    assert_eq!(
        cluster.default_client("default", "web").unwrap(),
        Source::Pod("default/client".into())
    );

    // Pod to pod: the server reports itself, the client's address and its port.
    let client = Source::Pod("default/client".into());
    let client_ip = IpAddr::V4(cluster.pod_ip("default/client").unwrap());
    for (pod, protocol) in [("web-1", Protocol::Tcp), ("web-2", Protocol::Udp)] {
        let to = SocketAddrV4::new(cluster.pod_ip(&format!("default/{pod}")).unwrap(), 8080);
        let reply = cluster
            .probe(&client, to, protocol)
            .unwrap()
            .unwrap_or_else(|| panic!("{pod} answers over {protocol}"));
        assert_eq!(reply.server, format!("default/{pod}"));
        assert_eq!((reply.client, reply.port), (client_ip, 8080));
    }

    // The external client and a node reach each other across the switch.
    let node_1 = Source::Node("node-1".into());
    let node_ip = cluster.nodes[0].ip;
    let external_ip = cluster.external_ip().unwrap();
    let _on_node = Servers::start(&cluster.netns_of(&node_1).unwrap(), "node-1", &[9000]);
    let _outside = Servers::start(&cluster.external_netns(), "outside", &[9000]);
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        let to_node = cluster
            .probe(
                &Source::External,
                SocketAddrV4::new(node_ip, 9000),
                protocol,
            )
            .unwrap()
            .expect("external -> node");
        assert_eq!(
            (to_node.server.as_str(), to_node.client),
            ("node-1", IpAddr::V4(external_ip))
        );
        let to_outside = cluster
            .probe(&node_1, SocketAddrV4::new(external_ip, 9000), protocol)
            .unwrap()
            .expect("node -> external");
        assert_eq!(
            (to_outside.server.as_str(), to_outside.client),
            ("outside", IpAddr::V4(node_ip))
        );
    }

    // An external IP routed to node-1, which holds it: the probe lands there.
    let routed = Ipv4Addr::new(198, 51, 100, 20);
    cluster.nodes[0]
        .ns
        .exec(&["ip", "addr", "add", &format!("{routed}/32"), "dev", "lo"])
        .unwrap();
    let to = SocketAddrV4::new(routed, 9000);
    assert!(cluster
        .probe(&Source::External, to, Protocol::Tcp)
        .unwrap()
        .is_none());
    cluster.route_from_external(routed, "node-1").unwrap();
    let reply = cluster
        .probe(&Source::External, to, Protocol::Tcp)
        .unwrap()
        .expect("routed to node-1");
    assert_eq!(reply.server, "node-1");

    assert!(cluster
        .netns_of(&Source::Pod("default/none".into()))
        .is_err());
    assert!(cluster.netns_of(&Source::Node("node-9".into())).is_err());

    let external = cluster.external.name.clone();
    drop(cluster);
    let left = sluice_tests::sh(std::process::Command::new("ip").args(["netns", "list"])).unwrap();
    assert!(
        !left.contains(&external),
        "the external client goes with the cluster"
    );
}
