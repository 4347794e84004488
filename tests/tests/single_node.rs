//! Single-node pod networking end to end: a node namespace running the real agent, pods added
//! with the real `sluice-cni`, real TCP and UDP through the TC programs. The whole suite runs
//! once per attach mode: tcx links, and the pre-6.6 clsact/netlink path forced by config.

use std::{net::Ipv4Addr, time::Duration};

use sluice_agent::model::ip_key;
use sluice_common::DropReason;
use sluice_tests::{
    probe::{self, Flow, Servers},
    require_root, Netns, Node, Pod,
};

const PORT: u16 = 8080;

#[test]
fn single_node_suite_tcx() {
    suite("tcx");
}

#[test]
fn single_node_suite_clsact() {
    suite("netlink");
}

fn suite(mode: &str) {
    require_root();
    let mut node = Node::start("10.244.0.0/24", mode).expect("node");
    let pods: Vec<Pod> = ["a", "b", "c"].iter().map(|n| node.add_pod(n)).collect();
    let servers: Vec<Servers> = pods
        .iter()
        .map(|p| Servers::start(&p.ns.path(), &p.name, &[PORT]))
        .collect();

    connectivity(&node, &pods);
    masquerade(&node, &pods[0]);
    spoof_guard(&node, &pods[0], &pods[1], &pods[2]);
    check_and_del(&node, &pods[2]);
    restart_without_loss(&mut node, &pods[0], &pods[1]);
    drop(servers);
}

/// Every ordered pair of pods, and the node to each pod, over TCP and UDP, answered by the
/// right pod, which sees the real client address.
fn connectivity(node: &Node, pods: &[Pod]) {
    for from in pods {
        for to in pods {
            let tcp = probe::tcp(&from.ns.path(), None, to.ip, PORT);
            let udp = probe::udp(&from.ns.path(), to.ip, PORT);
            for (proto, reply) in [("TCP", tcp), ("UDP", udp)] {
                let reply = reply.unwrap_or_else(|| {
                    panic!("{proto} {} -> {} did not connect", from.name, to.name)
                });
                assert_eq!(
                    reply.server, to.name,
                    "{proto} {} -> {}",
                    from.name, to.name
                );
                assert_eq!(
                    reply.client, from.ip,
                    "{proto} {} -> {}: client address",
                    from.name, to.name
                );
            }
        }
        // The node reaches pods through the gateway (kubelet probes, host-network clients).
        let tcp = probe::tcp(&node.ns.path(), None, from.ip, PORT).expect("node -> pod TCP");
        assert_eq!(tcp.server, from.name);
        assert_eq!(
            tcp.client.to_string(),
            "10.244.0.1",
            "node traffic comes from the gateway address"
        );
        assert_eq!(
            probe::udp(&node.ns.path(), from.ip, PORT)
                .expect("node -> pod UDP")
                .server,
            from.name
        );
    }
}

/// A pod reaching beyond the node's networks leaves with the node's address.
fn masquerade(node: &Node, pod: &Pod) {
    let outside = Netns::new("slx").unwrap();
    let (node_if, out_if) = (format!("{}u", node.ns.name), format!("{}x", outside.name));
    node.ns
        .exec(&[
            "ip", "link", "add", &node_if, "type", "veth", "peer", "name", &out_if,
        ])
        .unwrap();
    node.ns
        .exec(&["ip", "link", "set", &out_if, "netns", &outside.name])
        .unwrap();
    node.ns
        .exec(&["ip", "addr", "add", "192.168.50.1/24", "dev", &node_if])
        .unwrap();
    node.ns
        .exec(&["ip", "link", "set", &node_if, "up"])
        .unwrap();
    outside
        .exec(&["ip", "addr", "add", "192.168.50.2/24", "dev", &out_if])
        .unwrap();
    outside.exec(&["ip", "link", "set", &out_if, "up"]).unwrap();
    let _server = Servers::start(&outside.path(), "outside", &[PORT]);
    let dst: Ipv4Addr = "192.168.50.2".parse().unwrap();
    let tcp = probe::tcp(&pod.ns.path(), None, dst, PORT).expect("pod -> outside TCP");
    assert_eq!(
        tcp.client.to_string(),
        "192.168.50.1",
        "masqueraded to the node's address"
    );
    let udp = probe::udp(&pod.ns.path(), dst, PORT).expect("pod -> outside UDP");
    assert_eq!(udp.client.to_string(), "192.168.50.1");
}

/// A pod that sends from an address or a MAC that is not its own gets nothing through.
fn spoof_guard(node: &Node, honest: &Pod, ip_spoofer: &Pod, mac_spoofer: &Pod) {
    let before = node.maps().counters().unwrap();
    // An extra address inside the pod: the kernel would happily use it as a source.
    ip_spoofer
        .ns
        .exec(&["ip", "addr", "add", "10.244.0.250/32", "dev", "eth0"])
        .unwrap();
    let spoofed: Ipv4Addr = "10.244.0.250".parse().unwrap();
    assert!(
        probe::tcp(&ip_spoofer.ns.path(), Some(spoofed), honest.ip, PORT).is_none(),
        "spoofed source IP got through"
    );
    assert!(probe::tcp(&ip_spoofer.ns.path(), Some(spoofed), node_gateway(), PORT).is_none());
    // Its own address still works.
    assert!(
        probe::tcp(&ip_spoofer.ns.path(), None, honest.ip, PORT).is_some(),
        "the pod's own address must still work"
    );
    ip_spoofer
        .ns
        .exec(&["ip", "addr", "del", "10.244.0.250/32", "dev", "eth0"])
        .unwrap();

    let original_mac = mac_spoofer
        .ns
        .exec(&["cat", "/sys/class/net/eth0/address"])
        .unwrap();
    mac_spoofer
        .ns
        .exec(&["ip", "link", "set", "eth0", "address", "0a:58:de:ad:be:ef"])
        .unwrap();
    assert!(
        probe::tcp(&mac_spoofer.ns.path(), None, honest.ip, PORT).is_none(),
        "spoofed source MAC got through"
    );
    assert!(
        probe::udp(&mac_spoofer.ns.path(), honest.ip, PORT).is_none(),
        "spoofed source MAC got through (UDP)"
    );
    mac_spoofer
        .ns
        .exec(&["ip", "link", "set", "eth0", "address", original_mac.trim()])
        .unwrap();
    assert!(
        probe::tcp(&mac_spoofer.ns.path(), None, honest.ip, PORT).is_some(),
        "restored MAC works again"
    );

    let after = node.maps().counters().unwrap();
    assert!(
        after.drops_for(DropReason::SpoofedSourceIp)
            > before.drops_for(DropReason::SpoofedSourceIp),
        "{after:?}"
    );
    assert!(
        after.drops_for(DropReason::SpoofedSourceMac)
            > before.drops_for(DropReason::SpoofedSourceMac),
        "{after:?}"
    );
}

fn node_gateway() -> Ipv4Addr {
    "10.244.0.1".parse().unwrap()
}

/// CHECK passes on a wired pod; DEL removes the veth, the reservation and the entries, and is
/// idempotent; CHECK then reports the container unknown.
fn check_and_del(node: &Node, pod: &Pod) {
    let netns = pod.ns.path().to_string_lossy().into_owned();
    let check = node.cni("CHECK", &pod.container_id, &netns, "eth0");
    assert_eq!(check.code, 0, "CHECK: {}", check.stdout);

    let record = node
        .dir
        .join("state/endpoints")
        .join(format!("{}_eth0.json", pod.container_id));
    let ep: sluice_agent::model::LocalEndpoint =
        serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    let del = node.cni("DEL", &pod.container_id, &netns, "eth0");
    assert_eq!(del.code, 0, "DEL: {}", del.stdout);
    assert!(
        node.ns
            .exec(&["ip", "link", "show", &ep.host_ifname])
            .is_err(),
        "host veth still exists"
    );
    assert!(
        pod.ns.exec(&["ip", "link", "show", "eth0"]).is_err(),
        "pod eth0 still exists"
    );
    assert!(
        !node
            .dir
            .join("state/ipam")
            .join(pod.ip.to_string())
            .exists(),
        "IP reservation kept"
    );
    assert!(!record.exists(), "endpoint record kept");
    let current = node.maps().pipeline().unwrap();
    assert!(
        !current.l3_forwarding.contains_key(&ip_key(pod.ip.into())),
        "L3Forwarding entry kept"
    );
    assert!(
        current
            .spoof_guard
            .keys()
            .all(|k| k.ifindex != ep.host_ifindex),
        "SpoofGuard entry kept"
    );

    assert_eq!(
        node.cni("DEL", &pod.container_id, &netns, "eth0").code,
        0,
        "second DEL must succeed"
    );
    assert_eq!(
        node.cni("DEL", "never-added", "", "eth0").code,
        0,
        "DEL of an unknown container must succeed"
    );
    let check = node.cni("CHECK", &pod.container_id, &netns, "eth0");
    assert_eq!(check.error().0, 3, "CHECK after DEL: {}", check.stdout);
}

/// The agent is killed; a TCP flow between two pods keeps going (pinned maps, programs stay
/// attached); a pod deleted meanwhile is cleaned up by the new agent, live pods are kept.
fn restart_without_loss(node: &mut Node, a: &Pod, b: &Pod) {
    let doomed = node.add_pod("doomed");
    let doomed_ip = doomed.ip;
    let flow = Flow::start(a.ns.path(), &b.ns.path(), b.ip, 9000);
    std::thread::sleep(Duration::from_millis(300));

    node.kill_agent();
    let during = flow.received();
    std::thread::sleep(Duration::from_millis(700));
    assert!(
        flow.received() > during,
        "the flow stalled while the agent was down"
    );
    // The pod goes away while no agent watches: its namespace and veth vanish.
    let record = node
        .dir
        .join("state/endpoints")
        .join(format!("{}_eth0.json", doomed.container_id));
    let ep: sluice_agent::model::LocalEndpoint =
        serde_json::from_slice(&std::fs::read(record).unwrap()).unwrap();
    drop(doomed);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while node
        .ns
        .exec(&["ip", "link", "show", &ep.host_ifname])
        .is_ok()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the kernel did not remove the deleted pod's veth"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    node.start_agent().expect("agent restart");
    std::thread::sleep(Duration::from_millis(500));

    let report = flow.stop();
    report.assert_unbroken();
    assert!(
        report.bytes > 100_000,
        "flow carried too little: {report:?}"
    );

    let current = node.maps().pipeline().unwrap();
    assert!(
        !current
            .l3_forwarding
            .contains_key(&ip_key(doomed_ip.into())),
        "stale entry of the deleted pod kept"
    );
    for live in [a, b] {
        assert!(
            current.l3_forwarding.contains_key(&ip_key(live.ip.into())),
            "live pod {} lost its entry",
            live.name
        );
    }
    assert!(
        !node
            .dir
            .join("state/ipam")
            .join(doomed_ip.to_string())
            .exists(),
        "stale reservation kept"
    );
    assert!(
        probe::tcp(&a.ns.path(), None, b.ip, PORT).is_some(),
        "new connections after restart"
    );
    assert!(node.agent_log().contains("stale"), "{}", node.agent_log());
}
