//! The lab's plumbing for Services: what the API server allocated, read through the lab's
//! helpers; the external client; probes from pods, nodes and the external client that report
//! who answered, the client address it saw and the port it was reached on. Probes go to pod,
//! node and routed addresses directly: whether Services forward is the datapath's suites' job.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use serde_json::json;
use sluice_tests::lab::services::ServiceProbes;
use sluice_tests::{
    lab::{
        report::Protocol,
        services::{Frontend, Source},
        Encap, Lab, LabOptions, EXTERNAL_IP,
    },
    probe::Servers,
    require_root,
};

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
    let mut lab = Lab::up(LabOptions {
        nodes: 2,
        encap: Encap::Vxlan,
        attach_mode: "auto".into(),
        ports: vec![80],
    })
    .expect("lab up");
    lab.apply(vec![
        pod("client", "node-1", None),
        pod("web-1", "node-1", Some("web")),
        pod("web-2", "node-2", Some("web")),
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "default"},
               "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": "http"}]}}),
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web-np", "namespace": "default"},
               "spec": {"type": "NodePort", "selector": {"app": "web"}, "externalIPs": ["198.51.100.10"],
                        "ports": [{"port": 80, "protocol": "UDP"}, {"port": 80, "protocol": "TCP"}]}}),
    ])
    .expect("apply");
    lab.wait_programmed(Duration::from_secs(20))
        .expect("programmed");

    // What the API server allocated, through the helpers.
    assert_eq!(
        lab.service_ip("default", "web").unwrap(),
        Ipv4Addr::new(10, 96, 1, 1)
    );
    assert_eq!(
        lab.node_port("default", "web-np", 80, Protocol::Udp)
            .unwrap(),
        30086
    );
    assert_eq!(
        lab.node_port("default", "web-np", 80, Protocol::Tcp)
            .unwrap(),
        30086,
        "TCP and UDP of one port share a node port"
    );
    assert!(lab.node_port("default", "web", 80, Protocol::Tcp).is_err());
    let frontend = |f: Frontend, protocol| lab.frontend("default", "web-np", &f, 80, protocol);
    assert_eq!(
        frontend(Frontend::ClusterIp, Protocol::Tcp).unwrap(),
        SocketAddrV4::new(Ipv4Addr::new(10, 96, 1, 2), 80)
    );
    assert_eq!(
        frontend(Frontend::NodePort("node-2".into()), Protocol::Udp).unwrap(),
        SocketAddrV4::new(lab.nodes[1].ip, 30086)
    );
    assert_eq!(
        frontend(Frontend::ExternalIp, Protocol::Tcp).unwrap(),
        SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 10), 80)
    );
    let no_lb = frontend(Frontend::LoadBalancer, Protocol::Tcp).unwrap_err();
    assert!(no_lb.to_string().contains("no load-balancer IP"), "{no_lb}");
    assert!(lab
        .frontend("default", "web", &Frontend::ClusterIp, 81, Protocol::Tcp)
        .is_err());
    assert_eq!(
        lab.default_client("default", "web").unwrap(),
        Source::Pod("default/client".into())
    );

    // Pod to pod: the server reports itself, the client's address and its port.
    let client = Source::Pod("default/client".into());
    let client_ip = IpAddr::V4(lab.pod_ips()["default/client"]);
    for (pod, protocol) in [("web-1", Protocol::Tcp), ("web-2", Protocol::Udp)] {
        let to = SocketAddrV4::new(lab.pod_ips()[&format!("default/{pod}")], 8080);
        let reply = lab
            .probe(&client, to, protocol)
            .unwrap()
            .unwrap_or_else(|| panic!("{pod} answers over {protocol}"));
        assert_eq!(reply.server, format!("default/{pod}"));
        assert_eq!((reply.client, reply.port), (client_ip, 8080));
    }

    // The external client and a node reach each other across the switch.
    let node_1 = Source::Node("node-1".into());
    let node_ip = lab.nodes[0].ip;
    let _on_node = Servers::start(&lab.netns_of(&node_1).unwrap(), "node-1", &[9000]);
    let _outside = Servers::start(&lab.external().path(), "outside", &[9000]);
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        let to_node = lab
            .probe(
                &Source::External,
                SocketAddrV4::new(node_ip, 9000),
                protocol,
            )
            .unwrap()
            .expect("external -> node");
        assert_eq!(
            (to_node.server.as_str(), to_node.client),
            ("node-1", IpAddr::V4(EXTERNAL_IP))
        );
        let to_outside = lab
            .probe(&node_1, SocketAddrV4::new(EXTERNAL_IP, 9000), protocol)
            .unwrap()
            .expect("node -> external");
        assert_eq!(
            (to_outside.server.as_str(), to_outside.client),
            ("outside", IpAddr::V4(node_ip))
        );
    }

    // An external IP routed to node-1, which holds it: the probe lands there.
    let routed = Ipv4Addr::new(198, 51, 100, 20);
    lab.nodes[0]
        .node
        .ns
        .exec(&["ip", "addr", "add", &format!("{routed}/32"), "dev", "lo"])
        .unwrap();
    let to = SocketAddrV4::new(routed, 9000);
    assert!(lab
        .probe(&Source::External, to, Protocol::Tcp)
        .unwrap()
        .is_none());
    lab.route_from_external(routed, "node-1").unwrap();
    let reply = lab
        .probe(&Source::External, to, Protocol::Tcp)
        .unwrap()
        .expect("routed to node-1");
    assert_eq!(reply.server, "node-1");

    assert!(lab.netns_of(&Source::Pod("default/none".into())).is_err());
    assert!(lab.netns_of(&Source::Node("node-9".into())).is_err());

    let external = lab.external().name.clone();
    drop(lab);
    let left = sluice_tests::sh(std::process::Command::new("ip").args(["netns", "list"])).unwrap();
    assert!(
        !left.contains(&external),
        "the external client goes with the lab"
    );
}
