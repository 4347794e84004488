//! `sluice-bench policy`: what NetworkPolicy costs, against the same rule counts as iptables
//! rules (the legacy way) measured in the same run.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use aya::{
    maps::lpm_trie::Key,
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::Api;
use serde_json::{json, Value};
use sluice_agent::{
    datapath::ebpf::Maps,
    model::policy::{port_prefixes, PolicyLpmKey},
};
use sluice_common::{
    DropReason, EndpointPolicy, Identity, IpKey, PolicyKey, PolicyRule, IP_KEY_PREFIX_BITS,
    POLICY_KEY_EXACT_BITS,
};
use sluice_tests::{
    cluster::{AdminClient, Cluster, ClusterOptions},
    in_netns,
    test_run::{harness, ipv4_l4, Harness, Setup, GW_MAC, OUTSIDE_V4, PEER_V4, POD_V4},
    Netns,
};

const RULE_COUNTS: [u32; 4] = [0, 100, 1_000, 10_000];
/// Packets per figure, in runs of `RUN` with the events ring read empty between them: a denied
/// connection writes an event, and a full ring would drop events and measure less than a
/// node whose `sluicectl events` (or nobody) keeps up.
const REPEAT: u32 = 1_000_000;
const RUN: u32 = 10_000;
/// Each rule also allows this port range (POLICY's LPM trie then holds entries, as it does
/// under any policy with `endPort`).
const RANGE: (u16, u16) = (8000, 8099);
const CONNECT_SECONDS: Duration = Duration::from_secs(1);
/// Interleaved rounds per figure; the median is reported.
const ROUNDS: usize = 5;
/// The connection-rate server's port (the lab's pod servers keep 80).
pub const ACCEPT_PORT: u16 = 7070;

/// The n-th rule's peer: 10.100.0.0 + n, a distinct /32 each.
fn rule_peer(n: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 100, 0, 0)) + n)
}

pub fn run() -> Result<()> {
    per_packet()?;
    connection_rate()?;
    programming_time()
}

/// from_pod's per-packet cost with BPF_PROG_TEST_RUN, 1M repeats per figure: a denied new
/// connection (the most a packet pays: its peer is a /32 deep in an IPCACHE of `n` of them,
/// and every POLICY lookup is made, the port-range trie's included, none hits; its event is
/// written) and an allowed packet of an established connection, with `n` rules selecting
/// the pod.
fn per_packet() -> Result<()> {
    println!("from_pod per-packet cost, BPF_PROG_TEST_RUN x {REPEAT} (ns/packet)");
    println!("| rules selecting the pod | denied new connection | established connection |");
    println!("|---|---|---|");
    let mut baseline = None;
    for &n in &RULE_COUNTS {
        let mut h = harness(Setup::Encap);
        if n > 0 {
            let isolated = EndpointPolicy {
                ingress_policy: 0,
                egress_policy: 1,
            };
            h.maps
                .endpoint_policy
                .insert(IpKey::v4(POD_V4), isolated, 0)?;
            for i in 0..n {
                allow_tcp_80(&mut h, rule_peer(i), 1_000 + i, i + 1)?;
            }
            // The established flow's peer is allowed by the last rule.
            allow_tcp_80(&mut h, Ipv4Addr::from(PEER_V4), 999, n + 1)?;
        }
        h.pod_sends_from_gateway_mac();
        // A peer with an identity, on a port no rule allows.
        let denied_peer = if n > 0 {
            rule_peer(n / 2).octets()
        } else {
            OUTSIDE_V4
        };
        let denied = ipv4_l4(GW_MAC, POD_V4, denied_peer, 6, (40000, 81), 0x02);
        let allowed = ipv4_l4(GW_MAC, POD_V4, PEER_V4, 6, (40000, 80), 0x10);
        let prog: &mut SchedClassifier = h
            .bpf
            .program_mut("from_pod")
            .context("from_pod")?
            .try_into()?;
        let events = &mut h.maps.policy_events;
        let mut cost = |packet: &[u8]| -> Result<u64> {
            let mut total = Duration::ZERO;
            for _ in 0..REPEAT / RUN {
                while events.next().is_some() {}
                let mut opts = TestRunOptions::new();
                opts.data_in = Some(packet);
                opts.repeat = RUN;
                // The mean per repeat of this run.
                total += prog.test_run(opts)?.duration;
            }
            Ok((total / (REPEAT / RUN)).as_nanos() as u64)
        };
        // The least of three runs: the machine's other work only ever adds time.
        let mut cost = |packet: &[u8]| -> Result<u64> {
            Ok((0..3)
                .map(|_| cost(packet))
                .collect::<Result<Vec<_>>>()?
                .into_iter()
                .min()
                .unwrap_or(0))
        };
        // The first run of the allowed packet creates its conntrack entry.
        cost(&allowed)?;
        let (d, e) = (cost(&denied)?, cost(&allowed)?);
        let counters = h.maps.counters()?;
        let spoofed = counters.drops_for(DropReason::SpoofedSourceMac);
        ensure!(
            spoofed == 0,
            "{spoofed} repeats were SpoofGuard drops, not the measured packet"
        );
        let denied_by_policy = counters.drops_for(DropReason::EgressDenied);
        ensure!(
            n == 0 || denied_by_policy >= u64::from(3 * REPEAT),
            "only {denied_by_policy} of the denied packets were EgressRule drops"
        );
        let label = if n == 0 {
            "0 (pod not isolated)".to_string()
        } else {
            n.to_string()
        };
        println!("| {label} | {d} | {e} |");
        if n == 100 {
            baseline = Some((d, e));
        }
        if n == 10_000 {
            let (bd, be) = baseline.expect("100 measured before 10,000");
            println!(
                "10,000 rules vs 100: denied {:.2}x, established {:.2}x",
                d as f64 / bd.max(1) as f64,
                e as f64 / be.max(1) as f64
            );
        }
    }
    Ok(())
}

/// Egress policy 1 allows TCP port 80 and the ports of `RANGE` to `peer`, known as identity
/// `id`, by rule `rule`.
fn allow_tcp_80(h: &mut Harness, peer: Ipv4Addr, id: u32, rule: u32) -> Result<()> {
    let prefix = Key::new(IP_KEY_PREFIX_BITS + 32, IpKey::v4(peer.octets()));
    h.maps.ipcache.insert(&prefix, Identity { id }, 0)?;
    let key = PolicyKey {
        policy: 1,
        peer: id,
        proto: 6,
        _pad: 0,
        port: 80u16.to_be_bytes(),
    };
    let lpm = PolicyLpmKey {
        key,
        prefix_len: POLICY_KEY_EXACT_BITS + 16,
    };
    h.maps.insert_policy(&lpm, PolicyRule { rule })?;
    for (start, bits) in port_prefixes(RANGE.0, RANGE.1) {
        let range = PolicyLpmKey {
            key: PolicyKey {
                port: start.to_be_bytes(),
                ..key
            },
            prefix_len: POLICY_KEY_EXACT_BITS + u32::from(bits),
        };
        h.maps.insert_policy(&range, PolicyRule { rule })?;
    }
    Ok(())
}

/// Connections per second of a connect/close loop from `client` to a plain accept loop in
/// `server`, bounded in time.
fn connect_rate(client: &Path, server: &Path, dst: Ipv4Addr) -> f64 {
    with_acceptor(client, server, dst, || {
        connect_loop(client, dst, ACCEPT_PORT)
    })
}

/// Runs `client_loop` while a plain accept loop serves ACCEPT_PORT in `server`; `server_ip` is
/// the acceptor's own address, reachable from `client`.
pub fn with_acceptor<T>(
    client: &Path,
    server: &Path,
    server_ip: Ipv4Addr,
    client_loop: impl FnOnce() -> T,
) -> T {
    let listener = in_netns(server, || TcpListener::bind(("0.0.0.0", ACCEPT_PORT)))
        .expect("bind the accept loop");
    // std listens with a backlog of 128; a burst the acceptor has not drained yet would drop
    // SYNs, and each dropped SYN costs the loop its whole connect timeout.
    nix::sys::socket::listen(
        &listener,
        nix::sys::socket::Backlog::new(4096).expect("backlog"),
    )
    .expect("listen backlog");
    let stop = Arc::new(AtomicBool::new(false));
    let stop_server = stop.clone();
    let acceptor = std::thread::spawn(move || {
        while !stop_server.load(Ordering::Relaxed) {
            drop(listener.accept());
        }
    });
    let out = client_loop();
    stop.store(true, Ordering::Relaxed);
    // Wake the blocked accept; the loop then sees the flag.
    let _ = in_netns(client, move || {
        TcpStream::connect_timeout(
            &SocketAddr::from((server_ip, ACCEPT_PORT)),
            Duration::from_secs(1),
        )
    });
    let _ = acceptor.join();
    out
}

fn connect_loop(netns: &Path, dst: Ipv4Addr, port: u16) -> f64 {
    let addr = SocketAddr::from((dst, port));
    in_netns(netns, move || {
        let start = Instant::now();
        let (mut n, mut failed) = (0u64, 0u64);
        while start.elapsed() < CONNECT_SECONDS {
            let Ok(stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
                failed += 1;
                continue;
            };
            {
                // Reset instead of TIME_WAIT: the loop would run out of ports otherwise.
                let reset = libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                };
                let _ = nix::sys::socket::setsockopt(
                    &stream,
                    nix::sys::socket::sockopt::Linger,
                    &reset,
                );
                n += 1;
            }
        }
        if failed > 0 {
            eprintln!("  ({failed} connects timed out)");
        }
        n as f64 / start.elapsed().as_secs_f64()
    })
}

/// New-connection rate into a pod with `n` rules selecting it, through Sluice (one lab node),
/// and through `n` iptables rules in the receiver's INPUT chain (legacy iptables, conntrack
/// lets established packets skip them, as kube-proxy-era policy controllers did).
fn connection_rate() -> Result<()> {
    println!(
        "\nnew connections per second (connect/close loop, median of {ROUNDS} interleaved rounds of {} s)",
        CONNECT_SECONDS.as_secs()
    );
    println!("| rules | Sluice conn/s | iptables conn/s | Sluice vs iptables |");
    println!("|---|---|---|---|");
    // iptables: two namespaces on a veth pair.
    let (client, server) = (Netns::new("slbi")?, Netns::new("slbj")?);
    client.exec(&[
        "ip",
        "link",
        "add",
        "eth0",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &server.name,
    ])?;
    for (ns, ip) in [(&client, "10.88.0.1/24"), (&server, "10.88.0.2/24")] {
        ns.exec(&["ip", "addr", "add", ip, "dev", "eth0"])?;
        ns.exec(&["ip", "link", "set", "eth0", "up"])?;
    }
    // Sluice: one node of the real cluster, a client and a server pod.
    let (cluster, admin) = one_node(&["client", "server"])?;
    let pods = cluster.pod_addresses(Some("default"))?;
    let (client_pod, client_ip) = pods.get("client").context("client pod")?.clone();
    let (server_pod, server_ip) = pods.get("server").context("server pod")?.clone();
    let policies: Api<NetworkPolicy> = Api::namespaced(admin.client.clone(), "default");
    let maps = cluster.nodes[0].maps()?;

    for &n in &RULE_COUNTS {
        // Sluice: n ipBlock rules that do not match plus one that lets the client in.
        let name = format!("bench-{n}");
        if n > 0 {
            let mut rules: Vec<Value> = (0..n).map(|i| json!({"from": [{"ipBlock": {"cidr": format!("{}/32", rule_peer(i))}}], "ports": [{"port": ACCEPT_PORT}]})).collect();
            rules.push(json!({"from": [{"ipBlock": {"cidr": format!("{client_ip}/32")}}], "ports": [{"port": ACCEPT_PORT}]}));
            admin.create(&policies, &policy(&name, rules)?)?;
            wait_policy_entries(&maps, n as usize)?;
        }
        // iptables: the same count of non-matching rules, then the client's.
        let rules: String = (0..n)
            .map(|i| {
                format!(
                    "-A INPUT -s {}/32 -p tcp --dport {ACCEPT_PORT} -j ACCEPT\n",
                    rule_peer(i)
                )
            })
            .collect();
        let table = format!("*filter\n:INPUT DROP [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n-A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\n{rules}-A INPUT -s 10.88.0.1/32 -p tcp --dport {ACCEPT_PORT} -j ACCEPT\nCOMMIT\n");
        restore(&server, &table)?;
        let (mut sluice, mut iptables) = (Vec::new(), Vec::new());
        // One discarded round each: the first connections of a path pay its warm-up
        // (neighbour entries, conntrack tables, socket caches).
        connect_rate(&client_pod, &server_pod, server_ip);
        connect_rate(&client.path(), &server.path(), "10.88.0.2".parse()?);
        for _ in 0..ROUNDS {
            sluice.push(connect_rate(&client_pod, &server_pod, server_ip));
            iptables.push(connect_rate(
                &client.path(),
                &server.path(),
                "10.88.0.2".parse()?,
            ));
        }
        let (sluice, iptables) = (median(sluice), median(iptables));
        if n > 0 {
            admin.delete(&policies, &name)?;
        }
        println!(
            "| {n} | {sluice:.0} | {iptables:.0} | {:.2} |",
            sluice / iptables
        );
    }
    Ok(())
}

fn restore(ns: &Netns, rules: &str) -> Result<()> {
    use std::io::Write;
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", &ns.name, "iptables-legacy-restore"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .context("iptables-legacy-restore (run cargo xtask setup)")?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(rules.as_bytes())?;
    anyhow::ensure!(child.wait()?.success(), "iptables-legacy-restore failed");
    Ok(())
}

/// A pod of the lab's pod server on node-1, labelled `app: <name>`.
pub fn pod(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default", "labels": {"app": name}},
           "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "x"}]}})
}

/// A one-node cluster running `pods` (see [`pod`]), programmed, and a client to write to it.
pub fn one_node(pods: &[&str]) -> Result<(Cluster, AdminClient)> {
    let cluster = Cluster::up(ClusterOptions::nodes(1))?;
    cluster.apply_lab_manifests(pods.iter().map(|n| pod(n)).collect(), &[80])?;
    cluster.wait_programmed(Duration::from_secs(60))?;
    let admin = cluster.admin_client()?;
    Ok((cluster, admin))
}

/// A NetworkPolicy `name` letting `ingress` rules into the `app: server` pod.
fn policy(name: &str, ingress: Vec<Value>) -> Result<NetworkPolicy> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"podSelector": {"matchLabels": {"app": "server"}}, "ingress": ingress}}))?)
}

/// Waits until the POLICY map holds at least `rules` entries.
fn wait_policy_entries(maps: &Maps, rules: usize) -> Result<Duration> {
    let start = Instant::now();
    while maps.policy_tables()?.policy.len() < rules {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(60),
            "policy with {rules} rules not programmed in 60 s"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(start.elapsed())
}

/// Time from creating (then deleting) a 1,000-rule policy to its entries in the kernel.
fn programming_time() -> Result<()> {
    let (cluster, admin) = one_node(&["server"])?;
    let policies: Api<NetworkPolicy> = Api::namespaced(admin.client.clone(), "default");
    let maps = cluster.nodes[0].maps()?;
    let rules: Vec<Value> = (0..1_000).map(|i| json!({"from": [{"ipBlock": {"cidr": format!("{}/32", rule_peer(i))}}], "ports": [{"port": 80}]})).collect();
    let thousand = policy("thousand", rules)?;
    let start = Instant::now();
    admin.create(&policies, &thousand)?;
    wait_policy_entries(&maps, 1_000)?;
    let added = start.elapsed();
    let start = Instant::now();
    admin.delete(&policies, "thousand")?;
    while !maps.policy_tables()?.policy.is_empty() {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(60),
            "policy not removed in 60 s"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    println!(
        "\n1,000-rule policy: created → programmed {added:.1?}; deleted → removed {:.1?}",
        start.elapsed()
    );
    Ok(())
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}
