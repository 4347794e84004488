//! Services on the lab's real cluster, without kube-proxy: ClusterIP, NodePort, LoadBalancer
//! and externalIPs reached from pods on the same and on another node, from the nodes and from a
//! host outside the cluster. kube-apiserver allocates, kube-controller-manager's EndpointSlice
//! controller publishes the endpoints as pods come, go and fail; Sluice is installed by its
//! chart.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use sluice_tests::{
    cluster::{Cluster, ClusterOptions},
    lab::{
        services::{ServiceProbes, Source},
        Encap,
    },
    probe::{self, session_server, Reply, Session},
    require_root,
};

const PORT: u16 = 80;
/// The `web` Service's cluster IP, asked for in its manifest (kube-dns holds 10.96.0.10).
const WEB_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const SESSION_PORT: u16 = 9000;

fn pod(name: &str, node: usize, app: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": {"app": app}},
        "spec": {"nodeName": format!("node-{node}"), "containers": [{"name": "c", "image": "x"}]},
    })
}

fn cluster(encap: Encap) -> Cluster {
    up(encap, "")
}

/// sluice-controller with the ServiceExternalIP gate on, through the chart's values.
fn cluster_with_external_ips(encap: Encap) -> Cluster {
    up(encap, "featureGates:\n  ServiceExternalIP: true\n")
}

/// Clients and web pods on both nodes, and the Service `web` in front of the web pods.
fn up(encap: Encap, values: &str) -> Cluster {
    require_root();
    let options = ClusterOptions {
        inline_values: Some(values.to_string()),
        ..ClusterOptions::nodes(2)
    };
    let cluster = Cluster::up(options.with_encap(encap)).expect("cluster up");
    settle(
        &cluster,
        vec![
            pod("client-1", 1, "client"),
            pod("client-2", 2, "client"),
            pod("web-1", 1, "web"),
            pod("web-2", 2, "web"),
            json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "web", "namespace": "default"},
                "spec": {"clusterIP": WEB_IP.to_string(), "selector": {"app": "web"},
                         "ports": [{"name": "http", "port": 8080, "targetPort": PORT, "protocol": "TCP"},
                                   {"name": "dns", "port": 53, "targetPort": PORT, "protocol": "UDP"}]},
            }),
        ],
        &[("web", &["web-1", "web-2"])],
    );
    cluster
}

/// Applies `objects`, waits until the EndpointSlice controller has published each Service's
/// `endpoints` (pod names), then until every agent has programmed what the API holds.
fn settle(cluster: &Cluster, objects: Vec<Value>, endpoints: &[(&str, &[&str])]) {
    if !objects.is_empty() {
        cluster
            .apply_lab_manifests(objects, &[PORT])
            .expect("apply");
    }
    for (service, pods) in endpoints {
        cluster
            .wait_endpoints("default", service, pods)
            .expect("endpoints published");
    }
    cluster
        .wait_programmed(Duration::from_secs(60))
        .expect("programmed");
}

fn netns_of(cluster: &Cluster, pod: &str) -> PathBuf {
    cluster
        .netns_of(&Source::Pod(format!("default/{pod}")))
        .expect("pod")
}

fn ip_of(cluster: &Cluster, pod: &str) -> Ipv4Addr {
    cluster.pod_ip(&format!("default/{pod}")).expect("pod IP")
}

fn spread(replies: &[Reply]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for reply in replies {
        *counts.entry(reply.server.clone()).or_default() += 1;
    }
    counts
}

fn tcp_many(ns: &Path, ip: Ipv4Addr, port: u16, count: usize) -> Vec<Reply> {
    (0..count)
        .map(|i| {
            probe::tcp(ns, None, ip, port)
                .unwrap_or_else(|| panic!("TCP probe {i} to {ip}:{port} answered"))
        })
        .collect()
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

#[test]
fn cluster_ip_from_pods_on_both_nodes() {
    for encap in [Encap::Vxlan, Encap::NoEncap] {
        cluster_ip_from_pods_on_both_nodes_with(encap);
    }
}

fn cluster_ip_from_pods_on_both_nodes_with(encap: Encap) {
    let cluster = cluster(encap);
    for client in ["client-1", "client-2"] {
        let ns = netns_of(&cluster, client);
        let replies = tcp_many(&ns, WEB_IP, 8080, 20);
        for reply in &replies {
            assert_eq!(
                reply.client,
                ip_of(&cluster, client),
                "{encap:?}: the endpoint sees the pod"
            );
        }
        let counts = spread(&replies);
        assert_eq!(
            counts.len(),
            2,
            "{encap:?} {client}: both endpoints answer: {counts:?}"
        );
        let udp = probe::udp(&ns, WEB_IP, 53).expect("UDP through the ClusterIP");
        assert!(udp.server.contains("/web-"), "{udp:?}");
    }
    // The operator's view, from the agent's container.
    let out = cluster
        .sluicectl("node-1", &["services"])
        .expect("sluicectl services");
    let line = out
        .lines()
        .find(|l| l.starts_with(&format!("{WEB_IP}:8080/TCP")))
        .unwrap_or_else(|| panic!("the ClusterIP frontend is listed:\n{out}"));
    assert!(line.contains("default/web:http"), "{line}");
    for pod in ["web-1", "web-2"] {
        assert!(
            line.contains(&format!("{}:80 (default/{pod})", ip_of(&cluster, pod))),
            "{line}"
        );
    }
    assert!(out.contains("load-balanced connections:"), "{out}");
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
        let cluster = cluster(encap);
        settle(
            &cluster,
            vec![node_port_service("web-np", 30080, false)],
            &[("web-np", &["web-1", "web-2"])],
        );
        let outside = cluster.external_netns();
        for node in ["node-1", "node-2"] {
            let node_ip = cluster.node_ip(node).unwrap();
            let gateway = cluster.gateway_ip(node).unwrap();
            let replies = tcp_many(&outside, node_ip, 30080, 20);
            let counts = spread(&replies);
            assert_eq!(
                counts.len(),
                2,
                "{encap:?} {node}: both endpoints: {counts:?}"
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
                let reply = probe::tcp(&netns_of(&cluster, client), None, node_ip, 30080)
                    .unwrap_or_else(|| panic!("{encap:?}: {client} -> {node} NodePort"));
                assert!(reply.server.contains("/web-"), "{reply:?}");
            }
        }
    }
}

/// externalTrafficPolicy Local: only the entry node's own endpoint answers, and it sees the
/// outside client's real address.
#[test]
fn external_traffic_policy_local_keeps_the_client_address() {
    let cluster = cluster(Encap::Vxlan);
    let mut svc = node_port_service("web-local", 30081, true);
    svc["spec"]["type"] = json!("LoadBalancer");
    svc["spec"]["healthCheckNodePort"] = json!(30200);
    settle(&cluster, vec![svc], &[("web-local", &["web-1", "web-2"])]);
    let outside = cluster.external_netns();
    let external_ip = cluster.external_ip().unwrap();
    for (node, endpoint) in [(0, "default/web-1"), (1, "default/web-2")] {
        let replies = tcp_many(&outside, cluster.nodes[node].ip, 30081, 10);
        for reply in &replies {
            assert_eq!(reply.server, endpoint, "only the local endpoint");
            assert_eq!(reply.client, external_ip, "the client address is preserved");
        }
    }
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
    let cluster = cluster(encap);
    let sticky = cluster_ip_service("sticky", "web", json!({"sessionAffinity": "ClientIP"}));
    settle(&cluster, vec![sticky], &[("sticky", &["web-1", "web-2"])]);
    let sticky = cluster.service_ip("default", "sticky").expect("allocated");
    for client in ["client-1", "client-2"] {
        let counts = spread(&tcp_many(&netns_of(&cluster, client), sticky, 8080, 15));
        assert_eq!(
            counts.len(),
            1,
            "{encap:?} {client} sticks to one endpoint: {counts:?}"
        );
    }

    let replies = tcp_many(&netns_of(&cluster, "web-1"), WEB_IP, 8080, 30);
    let own: Vec<&Reply> = replies
        .iter()
        .filter(|r| r.server == "default/web-1")
        .collect();
    assert!(!own.is_empty(), "web-1 reached itself at least once in 30");
    for reply in own {
        assert_eq!(reply.client.to_string(), "169.254.0.253", "hairpin source");
    }
    for reply in replies.iter().filter(|r| r.server == "default/web-2") {
        assert_eq!(reply.client, ip_of(&cluster, "web-1"));
    }

    for node in &cluster.nodes {
        let gateway = cluster.gateway_ip(&node.name).unwrap();
        let replies = tcp_many(&node.ns.path(), WEB_IP, 8080, 20);
        assert_eq!(
            spread(&replies).len(),
            2,
            "{encap:?} {}: both endpoints",
            node.name
        );
        for reply in &replies {
            assert_eq!(reply.client, gateway, "from the node's gateway address");
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

fn connect(ns: &Path, ip: Ipv4Addr, port: u16) -> Outcome {
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

fn udp_refused(ns: &Path, ip: Ipv4Addr, port: u16) -> bool {
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

/// A ClusterIP Service with the pod servers' ports and a session port, published with
/// `endpoints`; returns its address.
fn session_service(cluster: &Cluster, name: &str, app: &str, endpoints: &[&str]) -> Ipv4Addr {
    let mut svc = cluster_ip_service(name, app, json!({}));
    svc["spec"]["ports"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "session", "port": SESSION_PORT, "protocol": "TCP"}));
    settle(cluster, vec![svc], &[(name, endpoints)]);
    cluster.service_ip("default", name).expect("allocated")
}

/// No endpoints: TCP is reset and UDP refused at once. Scaled to three, new connections spread
/// over all; two pods deleted (they terminate, then leave the slice), connections on the
/// survivor go on and those on removed endpoints are reset rather than left hanging.
#[test]
fn endpoints_scale_zero_three_one_under_traffic() {
    let cluster = cluster(Encap::Vxlan);
    let vip = session_service(&cluster, "scale", "scale", &[]);
    let client = netns_of(&cluster, "client-1");
    let started = Instant::now();
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

    let scaled = ["scale-1", "scale-2", "scale-3"];
    settle(
        &cluster,
        vec![
            pod("scale-1", 1, "scale"),
            pod("scale-2", 2, "scale"),
            pod("scale-3", 1, "scale"),
        ],
        &[("scale", &scaled)],
    );
    let counts = spread(&tcp_many(&client, vip, 8080, 40));
    assert_eq!(counts.len(), 3, "three endpoints: {counts:?}");
    for name in scaled {
        session_server(&netns_of(&cluster, name), name, SESSION_PORT);
    }
    let mut sessions = Session::open_many(&client, vip, SESSION_PORT, 24);
    assert!(
        sessions.iter().any(|(pod, _)| pod == "scale-1")
            && sessions.iter().any(|(pod, _)| pod != "scale-1"),
        "sessions on the survivor and on the endpoints to be removed"
    );

    cluster
        .kubectl(&[
            "delete",
            "pod",
            "scale-2",
            "scale-3",
            "--wait=true",
            "--timeout=60s",
        ])
        .expect("delete pods");
    settle(&cluster, vec![], &[("scale", &["scale-1"])]);
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
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    check()
}

/// Whether `node`'s datapath answers for `ip` (its EXTERNAL_IPS entry).
fn owns(cluster: &Cluster, node: &str, ip: Ipv4Addr) -> bool {
    let key = sluice_common::IpKey::v4(ip.octets());
    cluster
        .node(node)
        .and_then(|n| n.maps().ok())
        .is_some_and(|maps| maps.external_ips.get(&key, 0).is_ok())
}

fn lab_pool() -> Value {
    json!({
        "apiVersion": "crd.antrea.io/v1beta1", "kind": "ExternalIPPool",
        "metadata": {"name": "lab-pool"},
        "spec": {"ipRanges": [{"start": "192.168.77.100", "end": "192.168.77.109"}],
                 "nodeSelector": {}},
    })
}

fn load_balancer_ip(cluster: &Cluster, name: &str) -> Option<Ipv4Addr> {
    let svc = cluster.service("default", name).ok()?;
    svc["status"]["loadBalancer"]["ingress"][0]["ip"]
        .as_str()?
        .parse()
        .ok()
}

/// ServiceExternalIP: a LoadBalancer Service gets an IP from an ExternalIPPool (sluice-controller
/// allocates), one node answers ARP for it, and when that node goes away the other takes the IP
/// over (gratuitous ARP) and outside clients reach the Service again.
#[test]
fn load_balancer_ip_from_a_pool_fails_over() {
    let mut cluster = cluster_with_external_ips(Encap::Vxlan);
    let mut svc = cluster_ip_service("shop", "web", json!({"type": "LoadBalancer"}));
    svc["metadata"]["annotations"] = json!({"service.antrea.io/external-ip-pool": "lab-pool"});
    settle(
        &cluster,
        vec![lab_pool(), svc],
        &[("shop", &["web-1", "web-2"])],
    );
    cluster
        .wait_for(
            "the Service gets an IP from the pool",
            Duration::from_secs(30),
            || Ok(load_balancer_ip(&cluster, "shop").is_some()),
        )
        .unwrap();
    let ip = load_balancer_ip(&cluster, "shop").unwrap();
    assert_eq!(
        ip,
        Ipv4Addr::new(192, 168, 77, 100),
        "the pool's first address"
    );
    cluster
        .wait_programmed(Duration::from_secs(20))
        .expect("programmed");
    let outside = cluster.external_netns();
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
        let counts = spread(&tcp_many(&netns_of(&cluster, client), ip, 8080, 20));
        assert_eq!(
            counts.len(),
            2,
            "{client} through the LoadBalancer IP: {counts:?}"
        );
    }
    let owners: Vec<&str> = ["node-1", "node-2"]
        .into_iter()
        .filter(|n| owns(&cluster, n, ip))
        .collect();
    assert_eq!(
        owners.len(),
        1,
        "exactly one node answers for {ip}: {owners:?}"
    );
    let (gone, survivor, survivor_pod) = match owners[0] {
        "node-1" => ("node-1", "node-2", "web-2"),
        _ => ("node-2", "node-1", "web-1"),
    };

    // The node goes away as a machine does: its kubelet, containerd, pods and agent end, its
    // link with its namespace. Nothing else is done: kube-controller-manager's node lifecycle
    // controller sees its lease expire (a 50 s grace period), marks it and its pods not ready,
    // and the EndpointSlice controller drops its endpoint.
    let index = cluster.nodes.iter().position(|n| n.name == gone).unwrap();
    drop(cluster.nodes.remove(index));
    cluster
        .wait_for(
            "the surviving node takes the IP over",
            Duration::from_secs(120),
            || Ok(owns(&cluster, survivor, ip)),
        )
        .unwrap();
    cluster
        .wait_for(
            "only the surviving endpoint is ready",
            Duration::from_secs(60),
            || {
                let ready: Vec<String> = cluster
                    .endpoints("default", "shop")?
                    .into_iter()
                    .filter_map(|(pod, ready)| ready.then_some(pod))
                    .collect();
                Ok(ready == [survivor_pod])
            },
        )
        .unwrap();
    cluster
        .wait_agents_programmed(Duration::from_secs(20))
        .expect("the survivor programmed it");
    assert!(
        eventually(Duration::from_secs(10), || probe::tcp(
            &outside, None, ip, 8080
        )
        .is_some()),
        "outside clients reach the Service again"
    );
    for reply in tcp_many(&outside, ip, 8080, 10) {
        assert_eq!(
            reply.server,
            format!("default/{survivor_pod}"),
            "served by the surviving endpoint"
        );
    }
}

/// A LoadBalancer IP that another implementation wrote (MetalLB, played by this test) is served
/// all the same, and sluice-controller, busy with its own pool, leaves it alone.
#[test]
fn load_balancer_ip_written_by_another_implementation_is_served() {
    let cluster = cluster_with_external_ips(Encap::Vxlan);
    let mut pooled = cluster_ip_service("pooled", "web", json!({"type": "LoadBalancer"}));
    pooled["metadata"]["annotations"] = json!({"service.antrea.io/external-ip-pool": "lab-pool"});
    let metal = cluster_ip_service("metal", "web", json!({"type": "LoadBalancer"}));
    let both = ["web-1", "web-2"];
    settle(
        &cluster,
        vec![lab_pool(), pooled, metal],
        &[("pooled", &both), ("metal", &both)],
    );
    let ip = Ipv4Addr::new(192, 168, 77, 160);
    let status = json!({"status": {"loadBalancer": {"ingress": [{"ip": ip.to_string()}]}}});
    cluster
        .kubectl(&[
            "patch",
            "service",
            "metal",
            "--subresource=status",
            "--type=merge",
            "-p",
            &status.to_string(),
        ])
        .expect("MetalLB writes the status");
    cluster
        .wait_for(
            "the controller is at work on its own pool",
            Duration::from_secs(30),
            || Ok(load_balancer_ip(&cluster, "pooled").is_some()),
        )
        .unwrap();
    cluster
        .wait_programmed(Duration::from_secs(20))
        .expect("programmed");
    // MetalLB in BGP mode: the network routes the IP to a node.
    let outside = cluster.external_netns();
    for node in ["node-1", "node-2"] {
        cluster.route_from_external(ip, node).expect("route");
        let replies = tcp_many(&outside, ip, 8080, 20);
        assert_eq!(spread(&replies).len(), 2, "through {node}: both endpoints");
    }
    let counts = spread(&tcp_many(&netns_of(&cluster, "client-1"), ip, 8080, 20));
    assert_eq!(counts.len(), 2, "from a pod: {counts:?}");
    assert_eq!(
        load_balancer_ip(&cluster, "metal"),
        Some(ip),
        "left as MetalLB wrote it"
    );
}

/// externalIPs routed to a node by the network in front of the cluster; the health-check node
/// port of a LoadBalancer Service with externalTrafficPolicy Local reports local endpoints.
#[test]
fn external_ips_and_health_check_node_port() {
    let cluster = cluster(Encap::Vxlan);
    let external_ip = Ipv4Addr::new(192, 168, 77, 150);
    settle(
        &cluster,
        vec![
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
        ],
        &[("web-ext", &["web-1", "web-2"]), ("solo-lb", &["solo"])],
    );
    let outside = cluster.external_netns();
    for node in ["node-1", "node-2"] {
        cluster
            .route_from_external(external_ip, node)
            .expect("route");
        let replies = tcp_many(&outside, external_ip, 8080, 20);
        assert_eq!(spread(&replies).len(), 2, "through {node}: both endpoints");
    }
    for client in ["client-1", "client-2"] {
        let counts = spread(&tcp_many(
            &netns_of(&cluster, client),
            external_ip,
            8080,
            20,
        ));
        assert_eq!(
            counts.len(),
            2,
            "{client} through the external IP: {counts:?}"
        );
    }
    let port = cluster.service("default", "solo-lb").expect("service")["spec"]
        ["healthCheckNodePort"]
        .as_u64()
        .expect("allocated health check node port");
    for (node, status, local) in [(0, 200, 1), (1, 503, 0)] {
        let address = format!("{}:{port}", cluster.nodes[node].ip);
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
    let cluster = cluster(Encap::Vxlan);
    let policy = |port: u16| {
        json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "clients-reach-web", "namespace": "default"},
            "spec": {"podSelector": {"matchLabels": {"app": "client"}}, "policyTypes": ["Egress"],
                     "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                                 "ports": [{"protocol": "TCP", "port": port}]}]},
        })
    };
    settle(&cluster, vec![policy(PORT)], &[]);
    for (client, other) in [("client-1", "client-2"), ("client-2", "client-1")] {
        let ns = netns_of(&cluster, client);
        let counts = spread(&tcp_many(&ns, WEB_IP, 8080, 20));
        assert_eq!(
            counts.len(),
            2,
            "{client}: allowed to both endpoints: {counts:?}"
        );
        assert!(
            probe::tcp(&ns, None, ip_of(&cluster, other), PORT).is_none(),
            "{client}: the policy isolates it otherwise"
        );
    }
    // Allowing the Service port instead of the target port allows nothing through the Service.
    settle(&cluster, vec![policy(8080)], &[]);
    assert!(
        probe::tcp(&netns_of(&cluster, "client-1"), None, WEB_IP, 8080).is_none(),
        "the Service port is not what the policy sees"
    );
}

/// Whether anything listens on the agent's health port on `node` (its container is up).
fn agent_listening(cluster: &Cluster, node: usize) -> bool {
    let ns = cluster.nodes[node].ns.path();
    sluice_tests::in_netns(&ns, || {
        std::net::TcpStream::connect_timeout(
            &std::net::SocketAddr::from(([127, 0, 0, 1], 9421)),
            Duration::from_millis(300),
        )
        .is_ok()
    })
}

/// The agent dying and coming back changes nothing for Services: the pinned maps keep balancing
/// while it is gone, a session through a ClusterIP keeps its endpoint across the restart, and the
/// restarted agent finds its frontends as they are.
#[test]
fn services_survive_an_agent_restart() {
    let mut cluster = cluster(Encap::Vxlan);
    let vip = session_service(&cluster, "steady", "web", &["web-1", "web-2"]);
    for name in ["web-1", "web-2"] {
        session_server(&netns_of(&cluster, name), name, SESSION_PORT);
    }
    let client = netns_of(&cluster, "client-1");
    let mut session = Session::open(&client, vip, SESSION_PORT);
    let endpoint = session.ask().expect("session answers");
    let before = cluster.nodes[0]
        .maps()
        .and_then(|m| m.service_entries())
        .expect("entries");
    let restarts = cluster.agent_restarts("node-1").expect("restart count");
    assert!(
        agent_listening(&cluster, 0),
        "the agent's health port answers"
    );

    // The kubelet is stopped first, so that nothing restarts the agent while the test looks at
    // the datapath on its own; the kill is a SIGKILL to the agent's container, as a crash.
    cluster.nodes[0].kubelet.stop();
    cluster.kill_agent("node-1").expect("kill the agent");
    assert!(
        eventually(Duration::from_secs(10), || !agent_listening(&cluster, 0)),
        "the agent is down"
    );
    assert_eq!(
        session.ask().expect("session while the agent is down"),
        endpoint
    );
    assert_eq!(
        spread(&tcp_many(&client, vip, 8080, 20)).len(),
        2,
        "new connections too"
    );
    assert!(!agent_listening(&cluster, 0), "still down throughout");

    cluster.nodes[0]
        .kubelet
        .restart(Duration::ZERO)
        .expect("the kubelet starts again");
    cluster
        .wait_for(
            "the kubelet restarted the agent and it is Ready",
            Duration::from_secs(60),
            || {
                let pod = cluster.agent_pod("node-1")?;
                Ok(cluster.agent_restarts("node-1")? > restarts
                    && sluice_tests::cluster::condition(&pod, "Ready"))
            },
        )
        .unwrap();
    cluster
        .wait_programmed(Duration::from_secs(20))
        .expect("programmed after the restart");
    assert_eq!(session.ask().expect("session after the restart"), endpoint);
    let after = cluster.nodes[0]
        .maps()
        .and_then(|m| m.service_entries())
        .expect("entries");
    assert_eq!(before.0.len(), after.0.len(), "the same frontends");
    assert_eq!(before.1.len(), after.1.len(), "the same endpoints");
}
