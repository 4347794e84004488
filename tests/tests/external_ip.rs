//! ServiceExternalIP: the plan written through the lab API server and read back by the agent's
//! reflectors, and gratuitous ARP between two network namespaces.

use std::{
    net::{IpAddr, Ipv4Addr, TcpListener},
    os::fd::{AsRawFd, OwnedFd},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Service;
use kube::{
    api::{Patch, PatchParams},
    config::{KubeConfigOptions, Kubeconfig},
    Api, Client,
};
use nix::sys::socket::{
    recv, setsockopt, socket, sockopt::ReceiveTimeout, AddressFamily, MsgFlags, SockFlag,
    SockProtocol, SockType,
};
use serde_json::{json, Value};
use sluice_agent::{
    config::FeatureGates,
    external_ip::{self, Role, StatusWrite, POOL_ANNOTATION},
    k8s::ClusterStore,
};
use sluice_tests::{
    apiserver::{kubeconfig, ApiServer},
    require_root, Netns,
};

async fn client(server: &ApiServer) -> Client {
    let kc = Kubeconfig::from_yaml(&kubeconfig(&server.url())).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap();
    Client::try_from(config).unwrap()
}

fn ready_node(name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]},
    })
}

fn lb_service(name: &str, pool: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default", "annotations": {POOL_ANNOTATION: pool}},
        "spec": {"type": "LoadBalancer", "ports": [{"port": 80}]},
    })
}

/// One round: plan on the store as `role`, write what it says.
async fn round(
    cluster: &ClusterStore,
    client: &Client,
    role: Role<'_>,
) -> external_ip::ExternalIpState {
    let pools = cluster.external_ip_pools.as_ref().unwrap().state();
    let services = cluster.services.state();
    let nodes = cluster.nodes.state();
    let state = external_ip::plan(
        pools.iter().map(|p| p.as_ref()),
        services.iter().map(|s| s.as_ref()),
        nodes.iter().map(|n| n.as_ref()),
        role,
    );
    external_ip::apply_writes(client, &state.writes)
        .await
        .unwrap();
    state
}

/// Waits until the store has seen the server's last write (whichever kind's stream carries it).
async fn caught_up(cluster: &ClusterStore, server: &ApiServer) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let seen = || {
        cluster
            .observed
            .iter()
            .map(|(_, rv)| rv.load(std::sync::atomic::Ordering::Acquire))
            .max()
            .unwrap_or(0)
    };
    while seen() < server.resource_version() {
        assert!(Instant::now() < deadline, "the store did not catch up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn ingress(server: &ApiServer, name: &str) -> Value {
    server.get("services", Some("default"), name).unwrap()["status"]["loadBalancer"]["ingress"]
        .clone()
}

#[tokio::test]
async fn the_controller_allocates_through_the_status_subresource() {
    let server = ApiServer::start(TcpListener::bind("127.0.0.1:0").unwrap());
    for node in ["node-a", "node-b"] {
        server.create(ready_node(node)).unwrap();
    }
    server
        .create(json!({
            "apiVersion": "crd.antrea.io/v1beta1", "kind": "ExternalIPPool",
            "metadata": {"name": "public"},
            "spec": {"ipRanges": [{"start": "198.51.100.10", "end": "198.51.100.11"}]},
        }))
        .unwrap();
    server.create(lb_service("web", "public")).unwrap();
    server.create(lb_service("db", "public")).unwrap();
    let client = client(&server).await;

    let gated_off = ClusterStore::start(client.clone(), FeatureGates::default());
    assert!(
        gated_off.external_ip_pools.is_none(),
        "the gate is off: no pool watch"
    );

    let gates = FeatureGates {
        service_external_ip: true,
    };
    let cluster = ClusterStore::start(client.clone(), gates);
    cluster.wait_until_ready().await.unwrap();

    let state = round(&cluster, &client, Role::Node("node-b")).await;
    assert_eq!(state.writes, [], "a node writes nothing");
    let state = round(&cluster, &client, Role::Controller).await;
    assert_eq!(state.errors, []);
    assert_eq!(state.writes.len(), 3, "{:?}", state.writes);
    assert_eq!(ingress(&server, "db"), json!([{"ip": "198.51.100.10"}]));
    assert_eq!(ingress(&server, "web"), json!([{"ip": "198.51.100.11"}]));
    let pool = server.get("externalippools", None, "public").unwrap();
    assert_eq!(pool["status"]["usage"], json!({"total": 2, "used": 2}));
    assert_eq!(
        pool["spec"]["ipRanges"][0]["start"], "198.51.100.10",
        "spec untouched"
    );

    // The reflectors see the statuses: the next round has nothing to write, and the owner of each
    // IP is one of the two nodes, the same on both.
    caught_up(&cluster, &server).await;
    let state = round(&cluster, &client, Role::Controller).await;
    assert_eq!(state.writes, []);
    let owned_a = round(&cluster, &client, Role::Node("node-a")).await.owned;
    let owned_b = round(&cluster, &client, Role::Node("node-b")).await.owned;
    assert!(owned_a.is_disjoint(&owned_b));
    let all: Vec<IpAddr> = owned_a.union(&owned_b).copied().collect();
    assert_eq!(
        all,
        [
            "198.51.100.10".parse::<IpAddr>().unwrap(),
            "198.51.100.11".parse().unwrap()
        ]
    );

    // The annotation goes: the IP is released, and the usage follows.
    Api::<Service>::namespaced(client.clone(), "default")
        .patch(
            "db",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {POOL_ANNOTATION: null}}})),
        )
        .await
        .unwrap();
    caught_up(&cluster, &server).await;
    let state = round(&cluster, &client, Role::Controller).await;
    assert_eq!(state.writes.len(), 2, "{:?}", state.writes);
    assert_eq!(ingress(&server, "db"), Value::Null);
    assert_eq!(ingress(&server, "web"), json!([{"ip": "198.51.100.11"}]));
    let pool = server.get("externalippools", None, "public").unwrap();
    assert_eq!(pool["status"]["usage"], json!({"total": 2, "used": 1}));

    // A write for a Service that is gone is not an error: its deletion released the IP.
    let gone = StatusWrite::Service {
        namespace: "default".into(),
        name: "gone".into(),
        ingress: Vec::new(),
    };
    external_ip::apply_writes(&client, &[gone]).await.unwrap();
}

/// An AF_PACKET socket that receives every frame of the calling thread's namespace.
fn capture() -> OwnedFd {
    let sock = socket(
        AddressFamily::Packet,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::EthAll,
    )
    .expect("AF_PACKET socket");
    let timeout = nix::sys::time::TimeVal::new(0, 200_000);
    setsockopt(&sock, ReceiveTimeout, &timeout).expect("SO_RCVTIMEO");
    sock
}

/// The interface's MAC as `ip` prints it.
fn mac(ns: &Netns, ifname: &str) -> String {
    let out: Value =
        serde_json::from_str(&ns.exec(&["ip", "-j", "link", "show", ifname]).unwrap()).unwrap();
    out[0]["address"].as_str().unwrap().to_string()
}

fn mac_bytes(text: &str) -> Vec<u8> {
    text.split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect()
}

#[test]
fn gratuitous_arp_updates_the_neighbours_of_the_segment() {
    require_root();
    let node = Netns::new("sleip").unwrap();
    let client = Netns::new("sleic").unwrap();
    node.exec(&[
        "ip",
        "link",
        "add",
        "uplink",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &client.name,
    ])
    .unwrap();
    node.exec(&["ip", "addr", "add", "192.0.2.1/24", "dev", "uplink"])
        .unwrap();
    node.exec(&["ip", "link", "set", "uplink", "up"]).unwrap();
    client
        .exec(&["ip", "addr", "add", "192.0.2.2/24", "dev", "eth0"])
        .unwrap();
    client.exec(&["ip", "link", "set", "eth0", "up"]).unwrap();
    // The client still maps the IP to its previous owner.
    client
        .exec(&[
            "ip",
            "neigh",
            "replace",
            "192.0.2.10",
            "lladdr",
            "02:00:00:00:00:01",
            "dev",
            "eth0",
            "nud",
            "stale",
        ])
        .unwrap();
    let node_mac = mac(&node, "uplink");
    let sock = client.run(capture);

    let ip = Ipv4Addr::new(192, 0, 2, 10);
    node.run(move || external_ip::announce("uplink", ip))
        .unwrap();

    let deadline = Instant::now() + Duration::from_secs(5);
    let frame = loop {
        assert!(Instant::now() < deadline, "no gratuitous ARP arrived");
        let mut buf = [0u8; 1514];
        let Ok(n) = recv(sock.as_raw_fd(), &mut buf, MsgFlags::empty()) else {
            continue;
        };
        if n >= 42 && buf[12..14] == [0x08, 0x06] && buf[28..32] == ip.octets() {
            break buf[..n].to_vec();
        }
    };
    let own = mac_bytes(&node_mac);
    assert_eq!(frame[0..6], [0xff; 6], "broadcast");
    assert_eq!(frame[6..12], own[..], "from the interface's MAC");
    assert_eq!(frame[20..22], [0, 1], "an ARP request");
    assert_eq!(frame[22..28], own[..], "sender hardware address");
    assert_eq!(
        frame[38..42],
        ip.octets(),
        "target protocol address is the IP too"
    );

    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out: Value = serde_json::from_str(
            &client
                .exec(&["ip", "-j", "neigh", "show", "192.0.2.10", "dev", "eth0"])
                .unwrap(),
        )
        .unwrap();
        if out[0]["lladdr"] == node_mac.as_str() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the client's neighbour entry was not updated: {out}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
