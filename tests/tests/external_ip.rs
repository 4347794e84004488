//! ServiceExternalIP: the plan written through kube-apiserver's status subresources (on the
//! lab's real cluster) and read back by the agent's reflectors, and gratuitous ARP between two
//! network namespaces.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
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
    external_ip::{self, ExternalIpState, Role, StatusWrite, POOL_ANNOTATION},
    k8s::ClusterStore,
};
use sluice_tests::{
    cluster::{Cluster, ClusterOptions},
    require_root, Netns,
};

async fn client(kubeconfig: &str) -> Client {
    let kc = Kubeconfig::from_yaml(kubeconfig).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap();
    Client::try_from(config).unwrap()
}

/// A Node no kubelet runs: Ready for as long as the test needs (well inside the node lifecycle
/// controller's grace period).
fn ready_node(name: &str) -> String {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]},
    })
    .to_string()
}

fn lb_service(name: &str, pool: &str) -> String {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default", "annotations": {POOL_ANNOTATION: pool}},
        "spec": {"type": "LoadBalancer", "ports": [{"port": 80}]},
    })
    .to_string()
}

/// The plan on the store as `role`, once `settled` says the store has seen what the test
/// waits for (the reflectors lag the API a little).
async fn plan_when(
    store: &ClusterStore,
    role: Role<'_>,
    what: &str,
    settled: impl Fn(&ExternalIpState) -> bool,
) -> ExternalIpState {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let pools = store.external_ip_pools.as_ref().unwrap().state();
        let services = store.services.state();
        let nodes = store.nodes.state();
        let state = external_ip::plan(
            pools.iter().map(|p| p.as_ref()),
            services.iter().map(|s| s.as_ref()),
            nodes.iter().map(|n| n.as_ref()),
            role,
        );
        if settled(&state) {
            return state;
        }
        assert!(Instant::now() < deadline, "{what}: {state:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The ingress IPs of Service `name`'s status (kube-apiserver adds `ipMode: VIP` to each).
fn ingress(cluster: &Cluster, name: &str) -> Vec<String> {
    let service = cluster.get(&["service", name]).unwrap();
    service["status"]["loadBalancer"]["ingress"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|i| i["ip"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn the_controller_allocates_through_the_status_subresource() {
    require_root();
    // The gate stays off in the chart: sluice-controller leaves the pool alone, the test plays it.
    let cluster = Cluster::up(ClusterOptions::nodes(1)).expect("cluster up");
    for node in ["node-a", "node-b"] {
        cluster.apply(&ready_node(node)).unwrap();
    }
    cluster
        .apply(
            &json!({
                "apiVersion": "crd.antrea.io/v1beta1", "kind": "ExternalIPPool",
                "metadata": {"name": "public"},
                "spec": {"ipRanges": [{"start": "198.51.100.10", "end": "198.51.100.11"}]},
            })
            .to_string(),
        )
        .unwrap();
    cluster.apply(&lb_service("web", "public")).unwrap();
    cluster.apply(&lb_service("db", "public")).unwrap();
    let (_proxy, kubeconfig) = cluster.host_access().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(allocates(&cluster, &kubeconfig));
}

async fn allocates(cluster: &Cluster, kubeconfig: &str) {
    let client = client(kubeconfig).await;
    let gated_off = ClusterStore::start(client.clone(), FeatureGates::default());
    assert!(
        gated_off.external_ip_pools.is_none(),
        "the gate is off: no pool watch"
    );

    let gates = FeatureGates {
        service_external_ip: true,
    };
    let store = ClusterStore::start(client.clone(), gates);
    store.wait_until_ready().await.unwrap();

    let both_services = |s: &ExternalIpState| s.assignments.len() == 2;
    let state = plan_when(&store, Role::Node("node-b"), "node-b plans", both_services).await;
    assert_eq!(state.writes, [], "a node writes nothing");
    let state = plan_when(
        &store,
        Role::Controller,
        "the controller plans",
        both_services,
    )
    .await;
    assert_eq!(state.errors, []);
    assert_eq!(state.writes.len(), 3, "{:?}", state.writes);
    external_ip::apply_writes(&client, &state.writes)
        .await
        .unwrap();
    assert_eq!(ingress(cluster, "db"), ["198.51.100.10"]);
    assert_eq!(ingress(cluster, "web"), ["198.51.100.11"]);
    let pool = cluster.get(&["externalippools", "public"]).unwrap();
    assert_eq!(pool["status"]["usage"], json!({"total": 2, "used": 2}));
    assert_eq!(
        pool["spec"]["ipRanges"][0]["start"], "198.51.100.10",
        "spec untouched"
    );

    // The reflectors see the statuses: the controller has nothing more to write, and each IP
    // is owned by exactly one Ready node, the same whichever node plans.
    plan_when(&store, Role::Controller, "nothing left to write", |s| {
        s.writes.is_empty()
    })
    .await;
    let mut owners: Vec<BTreeSet<IpAddr>> = Vec::new();
    for node in ["node-1", "node-a", "node-b"] {
        owners.push(
            plan_when(&store, Role::Node(node), node, both_services)
                .await
                .owned,
        );
    }
    let all: Vec<IpAddr> = owners.iter().flatten().copied().collect();
    let mut unique = all.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(all.len(), unique.len(), "an IP with two owners: {owners:?}");
    assert_eq!(
        unique,
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
    let state = plan_when(&store, Role::Controller, "db's release planned", |s| {
        !s.writes.is_empty()
    })
    .await;
    assert_eq!(state.writes.len(), 2, "{:?}", state.writes);
    external_ip::apply_writes(&client, &state.writes)
        .await
        .unwrap();
    assert_eq!(ingress(cluster, "db"), Vec::<String>::new());
    assert_eq!(ingress(cluster, "web"), ["198.51.100.11"]);
    let pool = cluster.get(&["externalippools", "public"]).unwrap();
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
