//! Services on the lab, without kube-proxy: ClusterIP, NodePort, LoadBalancer and externalIPs
//! reached from pods on the same and on another node, and from a host outside the cluster.

use std::{collections::BTreeMap, net::Ipv4Addr, time::Duration};

use serde_json::{json, Value};
use sluice_tests::lab::services::ServiceProbes;
use sluice_tests::{
    lab::{services::Source, Encap, Lab, LabOptions, Values},
    probe::{self, session_server, Reply, Session},
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
    let lab = Lab::up(options(encap)).expect("lab up");
    with_web(lab)
}

fn options(encap: Encap) -> LabOptions {
    LabOptions {
        nodes: 2,
        encap,
        attach_mode: "auto".into(),
        ports: vec![PORT],
    }
}

/// A lab with sluice-controller, configured by the chart with the ServiceExternalIP gate on.
fn lab_with_controller(encap: Encap) -> Lab {
    require_root();
    let file = std::env::temp_dir().join(format!("sluice-eip-{}.yaml", std::process::id()));
    std::fs::write(&file, "featureGates:\n  ServiceExternalIP: true\n").unwrap();
    let lab = Lab::up_with_values(
        options(encap),
        Values {
            file: &file,
            controller: "",
        },
    )
    .expect("lab up");
    let _ = std::fs::remove_file(&file);
    with_web(lab)
}

/// Clients and web pods on both nodes, and the Service `web` in front of the web pods.
fn with_web(mut lab: Lab) -> Lab {
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
    lab.netns_of(&Source::Pod(format!("default/{pod}")))
        .expect("pod")
}

fn ip_of(lab: &Lab, pod: &str) -> Ipv4Addr {
    lab.pod_ips()[&format!("default/{pod}")]
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
    for encap in [Encap::Vxlan, Encap::NoEncap] {
        cluster_ip_from_pods_on_both_nodes_with(encap);
    }
}

fn cluster_ip_from_pods_on_both_nodes_with(encap: Encap) {
    let lab = lab(encap);
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
    let node = &lab.nodes[0].node;
    let out = std::process::Command::new(sluice_tests::bin("sluicectl"))
        .arg("--bpffs-dir")
        .arg(&node.bpffs)
        .arg("--state-dir")
        .arg(node.dir.join("state"))
        .arg("services")
        .output()
        .expect("sluicectl services");
    let out = String::from_utf8_lossy(&out.stdout);
    let line = out
        .lines()
        .find(|l| l.starts_with("10.96.0.10:8080/TCP"))
        .unwrap_or_else(|| panic!("the ClusterIP frontend is listed:\n{out}"));
    assert!(line.contains("default/web:http"), "{line}");
    for pod in ["web-1", "web-2"] {
        assert!(
            line.contains(&format!("{}:80 (default/{pod})", ip_of(&lab, pod))),
            "{line}"
        );
    }
    assert!(out.contains("load-balanced connections:"), "{out}");
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
    let policy = if local { "Local" } else { "Cluster" };
    let mut svc = cluster_ip_service(
        name,
        "web",
        json!({"type": "NodePort", "externalTrafficPolicy": policy}),
    );
    for port in svc["spec"]["ports"].as_array_mut().unwrap() {
        port["nodePort"] = json!(node_port);
    }
    svc
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

fn cluster_ip_service(name: &str, app: &str, extra: Value) -> Value {
    let mut svc = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"selector": {"app": app},
                 "ports": [{"name": "http", "port": 8080, "targetPort": PORT, "protocol": "TCP"},
                           {"name": "dns", "port": 8080, "targetPort": PORT, "protocol": "UDP"}]},
    });
    if let (Some(spec), Some(extra)) = (svc["spec"].as_object_mut(), extra.as_object()) {
        spec.extend(extra.clone());
    }
    svc
}

/// ClientIP affinity keeps a client on one endpoint; a pod reaching itself through its
/// Service gets the hairpin address as the source; the node reaches ClusterIPs (serviceCIDR).
#[test]
fn affinity_hairpin_and_the_node_itself() {
    for encap in [Encap::Vxlan, Encap::NoEncap] {
        affinity_hairpin_and_the_node_itself_with(encap);
    }
}

fn affinity_hairpin_and_the_node_itself_with(encap: Encap) {
    let mut lab = lab(encap);
    lab.apply(vec![cluster_ip_service(
        "sticky",
        "web",
        json!({"sessionAffinity": "ClientIP"}),
    )])
    .expect("apply");
    lab.wait_programmed(Duration::from_secs(20))
        .expect("programmed");
    let sticky = lab.service_ip("default", "sticky").expect("allocated");
    for client in ["client-1", "client-2"] {
        let counts = spread(&tcp_many(&netns_of(&lab, client), sticky, 8080, 15));
        assert_eq!(
            counts.len(),
            1,
            "{client} sticks to one endpoint: {counts:?}"
        );
    }

    let web: Ipv4Addr = "10.96.0.10".parse().unwrap();
    let replies = tcp_many(&netns_of(&lab, "web-1"), web, 8080, 30);
    let own: Vec<&Reply> = replies
        .iter()
        .filter(|r| r.server == "default/web-1")
        .collect();
    assert!(!own.is_empty(), "web-1 reached itself at least once in 30");
    for reply in own {
        assert_eq!(reply.client.to_string(), "169.254.0.253", "hairpin source");
    }
    for reply in replies.iter().filter(|r| r.server == "default/web-2") {
        assert_eq!(reply.client, ip_of(&lab, "web-1"));
    }

    for (node, gateway) in [(0, "10.244.0.1"), (1, "10.244.1.1")] {
        let replies = tcp_many(&lab.nodes[node].node.ns.path(), web, 8080, 20);
        assert_eq!(
            spread(&replies).len(),
            2,
            "{encap:?} node {node}: both endpoints"
        );
        for reply in &replies {
            assert_eq!(
                reply.client.to_string(),
                gateway,
                "from the node's gateway address"
            );
        }
    }
}

/// How a connection attempt ended, seen by the client.
#[derive(Debug, PartialEq)]
enum Outcome {
    Answered(String),
    Refused,
    TimedOut,
}

fn connect(ns: &std::path::Path, ip: Ipv4Addr, port: u16) -> Outcome {
    let addr = std::net::SocketAddr::from((ip, port));
    sluice_tests::in_netns(ns, move || {
        use std::io::Read;
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            Ok(mut conn) => {
                let _ = conn.set_read_timeout(Some(Duration::from_secs(1)));
                let mut text = String::new();
                let _ = conn.read_to_string(&mut text);
                Outcome::Answered(text.split_whitespace().next().unwrap_or("").to_string())
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Outcome::Refused,
            Err(_) => Outcome::TimedOut,
        }
    })
}

fn udp_refused(ns: &std::path::Path, ip: Ipv4Addr, port: u16) -> bool {
    sluice_tests::in_netns(ns, move || {
        let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        socket.connect((ip, port)).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(1)))
            .unwrap();
        let _ = socket.send(b"probe");
        let mut buf = [0u8; 64];
        matches!(socket.recv(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
    })
}

const SESSION_PORT: u16 = 9000;

/// A ClusterIP Service with the pod servers' ports and a session port; returns its address.
fn session_service(lab: &mut Lab, name: &str, app: &str) -> Ipv4Addr {
    let mut svc = cluster_ip_service(name, app, json!({}));
    svc["spec"]["ports"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "session", "port": SESSION_PORT, "protocol": "TCP"}));
    lab.apply(vec![svc]).expect("apply");
    lab.wait_programmed(Duration::from_secs(20))
        .expect("programmed");
    lab.service_ip("default", name).expect("allocated")
}

/// No endpoints: TCP is reset and UDP refused at once. Scaled to three, new connections spread
/// over all; scaled down to one, connections on the survivor go on and those on removed
/// endpoints are reset rather than left hanging.
#[test]
fn endpoints_scale_zero_three_one_under_traffic() {
    let mut lab = lab(Encap::Vxlan);
    let vip = session_service(&mut lab, "scale", "scale");
    let client = netns_of(&lab, "client-1");
    let started = std::time::Instant::now();
    assert_eq!(
        connect(&client, vip, 8080),
        Outcome::Refused,
        "no endpoints: TCP reset"
    );
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "refused at once"
    );
    assert!(
        udp_refused(&client, vip, 8080),
        "no endpoints: ICMP port unreachable"
    );

    lab.apply(vec![
        pod("scale-1", 1, "scale"),
        pod("scale-2", 2, "scale"),
        pod("scale-3", 1, "scale"),
    ])
    .expect("scale to 3");
    lab.wait_programmed(Duration::from_secs(20))
        .expect("programmed");
    let counts = spread(&tcp_many(&client, vip, 8080, 40));
    assert_eq!(counts.len(), 3, "three endpoints: {counts:?}");
    for name in ["scale-1", "scale-2", "scale-3"] {
        session_server(&netns_of(&lab, name), name, SESSION_PORT);
    }
    let mut sessions = Session::open_many(&client, vip, SESSION_PORT, 24);
    assert!(
        sessions.iter().any(|(pod, _)| pod == "scale-1"),
        "a session on the survivor"
    );

    for name in ["scale-2", "scale-3"] {
        lab.api
            .delete("pods", Some("default"), name)
            .expect("delete pod");
    }
    lab.sync().expect("kubelet and EndpointSlice controller");
    lab.wait_programmed(Duration::from_secs(20))
        .expect("programmed");
    for (pod, session) in &mut sessions {
        match session.ask() {
            Ok(answer) => assert_eq!(
                (pod.as_str(), answer.as_str()),
                ("scale-1", "scale-1"),
                "only sessions on the survivor go on, on the same endpoint"
            ),
            Err(e) => {
                assert_ne!(pod, "scale-1", "the survivor's session broke: {e}");
                assert!(
                    probe::was_reset(&e),
                    "a session on a removed endpoint is reset, not left hanging: {e}"
                );
            }
        }
    }
    let counts = spread(&tcp_many(&client, vip, 8080, 20));
    assert_eq!(
        counts.keys().collect::<Vec<_>>(),
        ["default/scale-1"],
        "{counts:?}"
    );
}

/// Polls `check` every 100 ms until it holds or `timeout` passes.
fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    check()
}

fn owns(lab: &Lab, node: usize, ip: Ipv4Addr) -> bool {
    let key = sluice_common::IpKey::v4(ip.octets());
    lab.nodes[node]
        .node
        .maps()
        .external_ips
        .get(&key, 0)
        .is_ok()
}

fn lab_pool() -> Value {
    json!({
        "apiVersion": "crd.antrea.io/v1beta1", "kind": "ExternalIPPool",
        "metadata": {"name": "lab-pool"},
        "spec": {"ipRanges": [{"start": "192.168.77.100", "end": "192.168.77.109"}],
                 "nodeSelector": {}},
    })
}

/// ServiceExternalIP: a LoadBalancer Service gets an IP from an ExternalIPPool (sluice-controller
/// allocates), one node answers ARP for it, and when that node goes away the other takes the IP
/// over (gratuitous ARP) and outside clients reach the Service again.
#[test]
fn load_balancer_ip_from_a_pool_fails_over() {
    let mut lab = lab_with_controller(Encap::Vxlan);
    let mut svc = cluster_ip_service("shop", "web", json!({"type": "LoadBalancer"}));
    svc["metadata"]["annotations"] = json!({"service.antrea.io/external-ip-pool": "lab-pool"});
    lab.apply(vec![lab_pool(), svc]).expect("apply");
    let mut ip = None;
    assert!(
        eventually(Duration::from_secs(10), || {
            ip = lab.service("default", "shop").ok().and_then(|s| {
                s["status"]["loadBalancer"]["ingress"][0]["ip"]
                    .as_str()?
                    .parse()
                    .ok()
            });
            ip.is_some()
        }),
        "the Service gets an IP from the pool"
    );
    let ip: Ipv4Addr = ip.unwrap();
    assert_eq!(
        ip,
        "192.168.77.100".parse::<Ipv4Addr>().unwrap(),
        "the pool's first address"
    );
    lab.wait_programmed(Duration::from_secs(20))
        .expect("programmed");
    let outside = lab.external().path();
    let counts = spread(&tcp_many(&outside, ip, 8080, 20));
    assert_eq!(
        counts.len(),
        2,
        "both endpoints behind the LoadBalancer IP: {counts:?}"
    );
    assert!(
        probe::udp(&outside, ip, 8080).is_some(),
        "UDP through the LoadBalancer IP"
    );
    for client in ["client-1", "client-2"] {
        let counts = spread(&tcp_many(&netns_of(&lab, client), ip, 8080, 20));
        assert_eq!(
            counts.len(),
            2,
            "{client} through the LoadBalancer IP: {counts:?}"
        );
    }
    let owners: Vec<usize> = (0..2).filter(|&n| owns(&lab, n, ip)).collect();
    assert_eq!(owners.len(), 1, "exactly one node answers for {ip}");
    let (gone, survivor) = (owners[0], 1 - owners[0]);

    // The node goes away: its link drops, its agent dies, the node controller deletes it and
    // marks its pods not ready.
    lab.nodes[gone]
        .node
        .ns
        .exec(&["ip", "link", "set", "eth0", "down"])
        .expect("link down");
    lab.nodes[gone].node.kill_agent();
    let gone_name = lab.nodes[gone].name.clone();
    lab.api
        .delete("nodes", None, &gone_name)
        .expect("delete node");
    for pod in lab.api.list("pods", Some("default")) {
        if pod["spec"]["nodeName"] == gone_name.as_str() {
            let name = pod["metadata"]["name"].as_str().unwrap().to_string();
            let not_ready =
                json!({"status": {"conditions": [{"type": "Ready", "status": "False"}]}});
            lab.api
                .merge_patch_status("pods", Some("default"), &name, &not_ready)
                .expect("pod not ready");
        }
    }
    sluice_tests::lab::controllers::sync_endpoint_slices(&lab.api).expect("endpoint slices");
    assert!(
        eventually(Duration::from_secs(10), || owns(&lab, survivor, ip)),
        "the surviving node takes the IP over"
    );
    assert!(
        eventually(Duration::from_secs(10), || probe::tcp(
            &outside, None, ip, 8080
        )
        .is_some()),
        "outside clients reach the Service again"
    );
    let survivor_pod = format!("default/web-{}", survivor + 1);
    for reply in tcp_many(&outside, ip, 8080, 10) {
        assert_eq!(
            reply.server, survivor_pod,
            "served by the surviving endpoint"
        );
    }
}

/// A LoadBalancer IP that another implementation wrote (MetalLB, played by this test) is served
/// all the same, and sluice-controller, busy with its own pool, leaves it alone.
#[test]
fn load_balancer_ip_written_by_another_implementation_is_served() {
    let mut lab = lab_with_controller(Encap::Vxlan);
    let mut pooled = cluster_ip_service("pooled", "web", json!({"type": "LoadBalancer"}));
    pooled["metadata"]["annotations"] = json!({"service.antrea.io/external-ip-pool": "lab-pool"});
    let metal = cluster_ip_service("metal", "web", json!({"type": "LoadBalancer"}));
    lab.apply(vec![lab_pool(), pooled, metal]).expect("apply");
    let ip: Ipv4Addr = "192.168.77.160".parse().unwrap();
    let status = json!({"status": {"loadBalancer": {"ingress": [{"ip": ip.to_string()}]}}});
    lab.api
        .merge_patch_status("services", Some("default"), "metal", &status)
        .expect("MetalLB writes the status");
    let ingress = |lab: &Lab, name: &str| {
        lab.service("default", name).unwrap()["status"]["loadBalancer"]["ingress"][0]["ip"].clone()
    };
    assert!(
        eventually(Duration::from_secs(10), || ingress(&lab, "pooled")
            .is_string()),
        "the controller is at work on its own pool"
    );
    lab.wait_programmed(Duration::from_secs(20))
        .expect("programmed");
    // MetalLB in BGP mode: the network routes the IP to a node.
    let outside = lab.external().path();
    for node in ["node-1", "node-2"] {
        lab.route_from_external(ip, node).expect("route");
        let replies = tcp_many(&outside, ip, 8080, 20);
        assert_eq!(spread(&replies).len(), 2, "through {node}: both endpoints");
    }
    let counts = spread(&tcp_many(&netns_of(&lab, "client-1"), ip, 8080, 20));
    assert_eq!(counts.len(), 2, "from a pod: {counts:?}");
    assert_eq!(
        ingress(&lab, "metal"),
        ip.to_string(),
        "left as MetalLB wrote it"
    );
}

/// externalIPs routed to a node by the network in front of the cluster; the health-check node
/// port of a LoadBalancer Service with externalTrafficPolicy Local reports local endpoints.
#[test]
fn external_ips_and_health_check_node_port() {
    let mut lab = lab(Encap::Vxlan);
    let external_ip: Ipv4Addr = "192.168.77.150".parse().unwrap();
    lab.apply(vec![
        pod("solo", 1, "solo"),
        cluster_ip_service(
            "web-ext",
            "web",
            json!({"externalIPs": [external_ip.to_string()]}),
        ),
        cluster_ip_service(
            "solo-lb",
            "solo",
            json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local"}),
        ),
    ])
    .expect("apply");
    lab.wait_programmed(Duration::from_secs(20))
        .expect("programmed");
    let outside = lab.external().path();
    for node in ["node-1", "node-2"] {
        lab.route_from_external(external_ip, node).expect("route");
        let replies = tcp_many(&outside, external_ip, 8080, 20);
        assert_eq!(spread(&replies).len(), 2, "through {node}: both endpoints");
    }
    for client in ["client-1", "client-2"] {
        let counts = spread(&tcp_many(&netns_of(&lab, client), external_ip, 8080, 20));
        assert_eq!(
            counts.len(),
            2,
            "{client} through the external IP: {counts:?}"
        );
    }
    let port = lab.service("default", "solo-lb").expect("service")["spec"]["healthCheckNodePort"]
        .as_u64()
        .expect("allocated health check node port");
    for (node, status, local) in [(0, 200, 1), (1, 503, 0)] {
        let address = format!("{}:{port}", lab.nodes[node].ip);
        let (code, body) = sluice_tests::in_netns(&outside, move || probe::http_get(&address, "/"))
            .expect("health check answers");
        assert_eq!(code, status, "node {node}: {body}");
        let body: Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(body["localEndpoints"], local, "{body}");
        assert_eq!(body["service"]["name"], "solo-lb");
    }
}

/// SessionAffinity, ServiceLB and EndpointDNAT run before the egress rules, so NetworkPolicy
/// judges the endpoint (pod, target port), never the frontend.
#[test]
fn network_policy_sees_the_endpoint() {
    let mut lab = lab(Encap::Vxlan);
    let policy = |port: u16| {
        json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "clients-reach-web", "namespace": "default"},
            "spec": {"podSelector": {"matchLabels": {"app": "client"}}, "policyTypes": ["Egress"],
                     "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                                 "ports": [{"protocol": "TCP", "port": port}]}]},
        })
    };
    lab.apply(vec![policy(PORT)]).expect("apply");
    lab.wait_programmed(Duration::from_secs(20))
        .expect("programmed");
    let vip: Ipv4Addr = "10.96.0.10".parse().unwrap();
    for client in ["client-1", "client-2"] {
        let ns = netns_of(&lab, client);
        let counts = spread(&tcp_many(&ns, vip, 8080, 20));
        assert_eq!(
            counts.len(),
            2,
            "{client}: allowed to both endpoints: {counts:?}"
        );
        let other = if client == "client-1" {
            "client-2"
        } else {
            "client-1"
        };
        assert!(
            probe::tcp(&ns, None, ip_of(&lab, other), PORT).is_none(),
            "{client}: the policy isolates it otherwise"
        );
    }
    // Allowing the Service port instead of the target port allows nothing through the Service.
    lab.apply(vec![policy(8080)]).expect("apply");
    lab.wait_programmed(Duration::from_secs(20))
        .expect("programmed");
    assert!(
        probe::tcp(&netns_of(&lab, "client-1"), None, vip, 8080).is_none(),
        "the Service port is not what the policy sees"
    );
}

/// The agent dying and coming back changes nothing for Services: the pinned maps keep balancing
/// while it is gone, a session through a ClusterIP keeps its endpoint across the restart, and the
/// restarted agent finds its frontends as they are.
#[test]
fn services_survive_an_agent_restart() {
    let mut lab = lab(Encap::Vxlan);
    let vip = session_service(&mut lab, "steady", "web");
    for name in ["web-1", "web-2"] {
        session_server(&netns_of(&lab, name), name, SESSION_PORT);
    }
    let client = netns_of(&lab, "client-1");
    let mut session = Session::open(&client, vip, SESSION_PORT);
    let endpoint = session.ask().expect("session answers");
    let before = lab.nodes[0].node.maps().service_entries().expect("entries");

    lab.nodes[0].node.kill_agent();
    assert_eq!(
        session.ask().expect("session while the agent is down"),
        endpoint
    );
    assert_eq!(
        spread(&tcp_many(&client, vip, 8080, 20)).len(),
        2,
        "new connections too"
    );
    lab.nodes[0].node.start_agent().expect("restart the agent");
    lab.wait_programmed(Duration::from_secs(20))
        .expect("programmed after the restart");
    assert_eq!(session.ask().expect("session after the restart"), endpoint);
    let after = lab.nodes[0].node.maps().service_entries().expect("entries");
    assert_eq!(before.0.len(), after.0.len(), "the same frontends");
    assert_eq!(before.1.len(), after.1.len(), "the same endpoints");
}
