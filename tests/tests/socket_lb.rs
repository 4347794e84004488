//! `sock_connect4`, the node reaching a NodePort on its own address: real sockets in a network
//! namespace the test creates, in a cgroup v2 the test creates, with the real program attached.
//! The frontend's address is the node's (local, so the connection goes over loopback, where no
//! TC program sees it); only the endpoint's address has a listener, so a
//! connection that arrives was balanced at connect.

use std::{
    fs::File,
    io::Write,
    net::{TcpListener, UdpSocket},
    os::fd::AsFd,
    path::PathBuf,
    process::Command,
    time::Duration,
};

use aya::programs::{CgroupAttachMode, CgroupSockAddr};
use nix::sched::CloneFlags;
use sluice_agent::datapath::ebpf::netns_cookie;
use sluice_common::{
    identity, scope, BackendKey, IpKey, NatTarget, NodeConfig, Service, ServiceKey,
};
use sluice_tests::{
    test_run::{harness, Harness, Setup},
    unique, Netns,
};

const NODE: [u8; 4] = [192, 0, 2, 1];
const ENDPOINT: [u8; 4] = [192, 0, 2, 2];
const OTHER: [u8; 4] = [192, 0, 2, 3];
const NODE_PORT: u16 = 30080;
const ENDPOINT_PORT: u16 = 8080;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

/// A cgroup v2 of the test's own, with the program attached; removed on drop.
struct Cgroup {
    dir: PathBuf,
}

impl Cgroup {
    fn new(h: &mut Harness) -> Cgroup {
        let root = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.join("cgroup.controllers").exists())
            .expect("a cgroup v2 hierarchy");
        let cgroup = Cgroup {
            dir: root.join(unique("sluice-socklb")),
        };
        std::fs::create_dir(&cgroup.dir).unwrap();
        let prog: &mut CgroupSockAddr = h
            .bpf
            .program_mut("sock_connect4")
            .unwrap()
            .try_into()
            .unwrap();
        prog.load().expect("the verifier accepts sock_connect4");
        prog.attach(File::open(&cgroup.dir).unwrap(), CgroupAttachMode::Single)
            .unwrap();
        cgroup
    }

    /// Runs `script` with bash in `netns` and in this cgroup; its stdout and stderr.
    fn bash(&self, netns: &Netns, script: &str) -> String {
        let procs = self.dir.join("cgroup.procs");
        let out = Command::new("nsenter")
            .arg(format!("--net={}", netns.path().display()))
            .args(["bash", "-c"])
            .arg(format!("echo $$ > {} && {script}", procs.display()))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Its processes were short-lived bash runs, all waited for.
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// A node namespace: the node's address and the endpoint's on its loopback device.
fn node_netns() -> Netns {
    let ns = Netns::new("socklb").unwrap();
    for addr in ["192.0.2.1/32", "192.0.2.2/32", "192.0.2.3/32"] {
        ns.exec(&["ip", "addr", "add", addr, "dev", "lo"]).unwrap();
    }
    ns
}

fn frontend(addr: [u8; 4], proto: u8) -> ServiceKey {
    ServiceKey {
        addr: IpKey::v4(addr),
        port: NODE_PORT,
        proto,
        scope: scope::INTERNAL,
    }
}

/// The harness's maps with `ns` as the node: its cookie in NODE_CONFIG, its address HOST in
/// IPCACHE, and a NodePort on it (TCP and UDP) with `endpoints` endpoints at ENDPOINT.
fn program(h: &mut Harness, ns: &Netns, endpoints: u32) {
    let cookie = ns.run(netns_cookie).expect("SO_NETNS_COOKIE (Linux 5.14)");
    let config = NodeConfig {
        host_netns_cookie: cookie,
        ..NodeConfig::default()
    };
    h.maps.node_config.set(0, config, 0).unwrap();
    h.identity_of(NODE, 32, identity::HOST);
    for (set, proto) in [(1, IPPROTO_TCP), (2, IPPROTO_UDP)] {
        let service = Service {
            backend_set: set,
            count: endpoints,
            flags: 0,
            affinity_timeout: 0,
        };
        h.maps
            .services
            .insert(frontend(NODE, proto), service, 0)
            .unwrap();
        // The same Service on an address that is not the node's: routed, never over loopback.
        h.maps
            .services
            .insert(frontend(OTHER, proto), service, 0)
            .unwrap();
        let endpoint = NatTarget {
            addr: IpKey::v4(ENDPOINT),
            port: ENDPOINT_PORT,
            _pad: 0,
        };
        let key = BackendKey { set, index: 0 };
        h.maps.backends.insert(key, endpoint, 0).unwrap();
    }
}

/// The endpoint: a TCP listener answering "endpoint" and a UDP socket echoing, on ENDPOINT only,
/// in `ns`, for `connections` TCP connections.
fn serve(ns: &Netns, connections: usize) -> std::thread::JoinHandle<()> {
    let netns = File::open(ns.path()).unwrap();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server = std::thread::spawn(move || {
        nix::sched::setns(netns.as_fd(), CloneFlags::CLONE_NEWNET).unwrap();
        let tcp = TcpListener::bind(("192.0.2.2", ENDPOINT_PORT)).unwrap();
        let udp = UdpSocket::bind(("192.0.2.2", ENDPOINT_PORT)).unwrap();
        udp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        ready_tx.send(()).unwrap();
        for _ in 0..connections {
            let (mut stream, _) = tcp.accept().unwrap();
            stream.write_all(b"endpoint\n").unwrap();
        }
        let mut buf = [0u8; 64];
        if let Ok((n, from)) = udp.recv_from(&mut buf) {
            udp.send_to(&buf[..n], from).unwrap();
        }
    });
    ready_rx.recv().unwrap();
    server
}

const TCP_TO_NODE: &str = "exec 3<>/dev/tcp/192.0.2.1/30080 && head -1 <&3";

#[test]
fn the_node_reaching_its_own_node_port_is_balanced_at_connect() {
    let mut h = harness(Setup::Unconfigured);
    let ns = node_netns();
    program(&mut h, &ns, 1);
    let cgroup = Cgroup::new(&mut h);
    let server = serve(&ns, 1);

    // TCP: the connect lands on the endpoint, which alone listens.
    assert_eq!(cgroup.bash(&ns, TCP_TO_NODE), "endpoint\n");
    // UDP, connected: the datagram reaches the endpoint and its echo comes back to the socket.
    // (head reads the datagram whole; bash's read would take one byte and lose the rest.)
    let udp = "exec 3<>/dev/udp/192.0.2.1/30080 && echo ping >&3 && timeout 5 head -c 5 <&3";
    assert_eq!(cgroup.bash(&ns, udp), "ping\n");
    server.join().unwrap();
}

#[test]
fn sockets_of_other_namespaces_and_other_addresses_are_left_alone() {
    let mut h = harness(Setup::Unconfigured);
    let ns = node_netns();
    program(&mut h, &ns, 1);
    let cgroup = Cgroup::new(&mut h);

    // A pod's namespace in the same cgroup, with the same address: its connects are the TC
    // programs' business, so nothing rewrites them here (nothing listens: refused).
    let pod = node_netns();
    assert!(
        cgroup
            .bash(&pod, TCP_TO_NODE)
            .contains("Connection refused"),
        "another namespace's connect was rewritten"
    );
    // A frontend address that is not the node's (IPCACHE does not hold it as HOST) is routed to the
    // gateway in a real node; here it is local, so an untouched connect is refused.
    let other = "exec 3<>/dev/tcp/192.0.2.3/30080 && head -1 <&3";
    assert!(cgroup.bash(&ns, other).contains("Connection refused"));
}

#[test]
fn a_node_port_without_endpoints_is_refused_not_denied() {
    let mut h = harness(Setup::Unconfigured);
    let ns = node_netns();
    program(&mut h, &ns, 0);
    let cgroup = Cgroup::new(&mut h);
    // Left to the loopback, where nothing listens: ECONNREFUSED as kube-proxy's reject gives,
    // never the EPERM a program's refusal would.
    let out = cgroup.bash(&ns, TCP_TO_NODE);
    assert!(out.contains("Connection refused"), "{out}");
}
