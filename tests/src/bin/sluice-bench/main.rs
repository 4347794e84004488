//! Sluice benchmarks; every figure is printed next to a baseline measured in the same run.
//!
//! - `forward`: pod-to-pod TCP throughput (iperf3) and request/response latency on one node,
//!   against a direct veth pair and a Linux bridge.
//! - `cross-node`: pod to pod across two lab nodes, encap and noEncap, against plain VXLAN and
//!   plain routing between the same node namespaces.
//! - `control-plane`: time from an API change (node added, pod created) to its map entry.
//! - `policy`: per-packet cost and connection rate with 0 to 10,000 rules, against iptables.
//! - `service [--quick]`: per-packet cost, connection rate, programming time and agent memory
//!   with 1 to 10,000 Services, against kube-proxy's iptables rules; `--quick` (fewer Services
//!   and samples) checks the benchmark itself.
//! - `scale [--quick]`: the agent in an API holding 1,000 Nodes, 30,000 Pods, 1,000
//!   NetworkPolicies and 10,000 Services: time per change to its report, CPU per change, memory.
//!
//! Rounds interleave the contenders so drift hits all of them alike.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use sluice_tests::{in_netns, require_root, Netns, Node};

mod agent_process;
mod cross_node;
mod heap;
mod policy;
mod scale;
mod service;

#[global_allocator]
static HEAP: heap::Counting = heap::Counting;

const ROUNDS: usize = 3;
const IPERF_SECONDS: &str = "5";
const RR_ROUNDS: usize = 20_000;
const RR_LIMIT: Duration = Duration::from_secs(5);
const IPERF_PORT: u16 = 5201;
const RR_PORT: u16 = 7000;

/// Two endpoints that can talk: client network namespace, server network namespace (paths, as
/// `nsenter --net` takes them), server address.
pub struct Pair {
    pub name: &'static str,
    pub client: PathBuf,
    pub server: PathBuf,
    pub server_ip: Ipv4Addr,
}

struct Sample {
    gbits: f64,
    rr_p50_us: f64,
    rr_p99_us: f64,
}

fn main() -> Result<()> {
    require_root();
    match std::env::args().nth(1).as_deref() {
        Some("forward") => forward(),
        Some("cross-node") => cross_node::throughput_and_latency(),
        Some("control-plane") => cross_node::control_plane(),
        Some("policy") => policy::run(),
        Some("service") => match std::env::args().nth(2).as_deref() {
            None => service::run(false),
            Some("--quick") => service::run(true),
            Some(other) => bail!("sluice-bench service: unknown argument {other:?}"),
        },
        Some("scale") => match std::env::args().nth(2).as_deref() {
            None => scale::run(false),
            Some("--quick") => scale::run(true),
            Some(other) => bail!("sluice-bench scale: unknown argument {other:?}"),
        },
        _ => bail!(
            "usage: sluice-bench forward | cross-node | control-plane | policy | service [--quick] | scale [--quick]"
        ),
    }
}

fn forward() -> Result<()> {
    // Direct veth pair: the physical limit here.
    let (va, vb) = (Netns::new("slba")?, Netns::new("slbb")?);
    link_pair(&va, &vb, "10.77.0.1/24", "10.77.0.2/24")?;
    // Linux bridge in a switch namespace.
    let (sw, ba, bb) = (
        Netns::new("slbs")?,
        Netns::new("slbc")?,
        Netns::new("slbd")?,
    );
    sw.exec(&["ip", "link", "add", "br0", "type", "bridge"])?;
    sw.exec(&["ip", "link", "set", "br0", "up"])?;
    for (port, ns, ip) in [("bp0", &ba, "10.78.0.1/24"), ("bp1", &bb, "10.78.0.2/24")] {
        sw.exec(&[
            "ip", "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
        ])?;
        sw.exec(&["ip", "link", "set", port, "master", "br0", "up"])?;
        ns.exec(&["ip", "addr", "add", ip, "dev", "eth0"])?;
        ns.exec(&["ip", "link", "set", "eth0", "up"])?;
    }
    // Sluice: a node with two pods added through the CNI.
    let node = Node::start("10.244.0.0/24", "auto")?;
    let (pa, pb) = (node.add_pod("client"), node.add_pod("server"));

    let pairs = [
        Pair {
            name: "veth pair",
            client: va.path(),
            server: vb.path(),
            server_ip: "10.77.0.2".parse()?,
        },
        Pair {
            name: "Linux bridge",
            client: ba.path(),
            server: bb.path(),
            server_ip: "10.78.0.2".parse()?,
        },
        Pair {
            name: "Sluice (eBPF)",
            client: pa.ns.path(),
            server: pb.ns.path(),
            server_ip: pb.ip,
        },
    ];
    measure(&pairs)
}

/// Interleaved rounds over `pairs`, then the median table with ratios against the first two
/// pairs (the baselines).
fn measure(pairs: &[Pair]) -> Result<()> {
    let mut samples: Vec<Vec<Sample>> = pairs.iter().map(|_| Vec::new()).collect();
    for round in 1..=ROUNDS {
        for (pair, out) in pairs.iter().zip(samples.iter_mut()) {
            let gbits = iperf(pair)?;
            let (p50, p99) = request_response(pair)?;
            println!(
                "round {round}: {:<14} {gbits:6.2} Gbit/s  RR p50 {p50:6.1} µs  p99 {p99:6.1} µs",
                pair.name
            );
            out.push(Sample {
                gbits,
                rr_p50_us: p50,
                rr_p99_us: p99,
            });
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let summary: Vec<(f64, f64, f64)> = samples
        .iter()
        .map(|s| {
            (
                median(&mut s.iter().map(|x| x.gbits).collect()),
                median(&mut s.iter().map(|x| x.rr_p50_us).collect()),
                median(&mut s.iter().map(|x| x.rr_p99_us).collect()),
            )
        })
        .collect();
    let (veth, bridge) = (summary[0], summary[1]);
    let (a, b) = (pairs[0].name, pairs[1].name);
    println!();
    println!("median of {ROUNDS} rounds; iperf3 1 TCP stream {IPERF_SECONDS} s; RR = 1-byte TCP ping-pong, {RR_ROUNDS} round trips");
    println!("| path | throughput Gbit/s | vs {a} | vs {b} | RR p50 µs | p50 vs {a} | p50 vs {b} | RR p99 µs |");
    println!("|---|---|---|---|---|---|---|---|");
    for (pair, (gbits, p50, p99)) in pairs.iter().zip(&summary) {
        println!(
            "| {} | {gbits:.2} | {:.2} | {:.2} | {p50:.1} | {:.2} | {:.2} | {p99:.1} |",
            pair.name,
            gbits / veth.0,
            gbits / bridge.0,
            p50 / veth.1,
            p50 / bridge.1
        );
    }
    Ok(())
}

fn link_pair(a: &Netns, b: &Netns, ip_a: &str, ip_b: &str) -> Result<()> {
    a.exec(&[
        "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", &b.name,
    ])?;
    for (ns, ip) in [(a, ip_a), (b, ip_b)] {
        ns.exec(&["ip", "addr", "add", ip, "dev", "eth0"])?;
        ns.exec(&["ip", "link", "set", "eth0", "up"])?;
    }
    Ok(())
}

/// One iperf3 run; the server serves exactly one test (-1) and exits.
fn iperf(pair: &Pair) -> Result<f64> {
    let in_ns = |netns: &Path| {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net={}", netns.display()))
            .arg("iperf3");
        command
    };
    let mut server = in_ns(&pair.server)
        .args(["-s", "-1", "-p", &IPERF_PORT.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting iperf3 -s (run cargo xtask setup)")?;
    std::thread::sleep(Duration::from_millis(300));
    let out = in_ns(&pair.client)
        .args([
            "-c",
            &pair.server_ip.to_string(),
            "-p",
            &IPERF_PORT.to_string(),
            "-t",
            IPERF_SECONDS,
            "-J",
        ])
        .output()?;
    let _ = server.wait();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 JSON")?;
    json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|bps| bps / 1e9)
        .with_context(|| {
            format!(
                "iperf3 reported no throughput over {}: {}",
                pair.name, json["error"]
            )
        })
}

/// 1-byte request/response over one TCP connection, Nagle off; returns (p50, p99) in µs.
fn request_response(pair: &Pair) -> Result<(f64, f64)> {
    let listener = in_netns(&pair.server, || TcpListener::bind(("0.0.0.0", RR_PORT)))?;
    let server = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut conn, _) = listener.accept()?;
        conn.set_nodelay(true)?;
        let mut byte = [0u8; 1];
        while conn.read(&mut byte)? == 1 {
            conn.write_all(&byte)?;
        }
        Ok(())
    });
    let addr = SocketAddr::from((pair.server_ip, RR_PORT));
    let client_path: &Path = &pair.client;
    let mut conn = in_netns(client_path, move || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(1))
    })?;
    conn.set_nodelay(true)?;
    let mut times = Vec::with_capacity(RR_ROUNDS);
    let start = Instant::now();
    let mut byte = [1u8; 1];
    while times.len() < RR_ROUNDS && start.elapsed() < RR_LIMIT {
        let t = Instant::now();
        conn.write_all(&byte)?;
        conn.read_exact(&mut byte)?;
        times.push(t.elapsed().as_secs_f64() * 1e6);
    }
    drop(conn);
    let _ = server.join();
    times.sort_by(|a, b| a.total_cmp(b));
    Ok((times[times.len() / 2], times[times.len() * 99 / 100]))
}
