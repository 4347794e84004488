//! Cross-node benchmarks on the lab.

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use ipnetwork::IpNetwork;
use serde_json::json;
use sluice_agent::{
    datapath::ebpf::Maps,
    model::{ip_key, CidrKey},
};
use sluice_tests::lab::{Encap, Lab, LabOptions};

use crate::{measure, Pair};

const CHANGES: usize = 100;

fn lab(encap: Encap) -> Result<Lab> {
    let mut lab = Lab::up(LabOptions {
        nodes: 2,
        encap,
        attach_mode: "auto".into(),
        ports: vec![],
    })?;
    let pods = ["client", "server"]
        .iter()
        .enumerate()
        .map(|(i, name)| {
            json!({"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": name, "namespace": "default"},
                   "spec": {"nodeName": format!("node-{}", i + 1), "containers": [{"name": "c", "image": "x"}]}})
        })
        .collect();
    lab.apply(pods)?;
    lab.wait_programmed(Duration::from_secs(20))?;
    Ok(lab)
}

fn pod_pair(lab: &Lab, name: &'static str) -> Pair {
    let client = lab.kubelet.pod("default/client").expect("client pod");
    let server = lab.kubelet.pod("default/server").expect("server pod");
    Pair {
        name,
        client: client.netns.path(),
        server: server.netns.path(),
        server_ns: server.netns.name.clone(),
        server_ip: server.ip,
    }
}

/// Pod to pod across nodes through Sluice (encap and noEncap) against the same two node
/// namespaces talking over plain VXLAN (kernel device, no eBPF) and plain routing (the uplink).
pub fn throughput_and_latency() -> Result<()> {
    let encap = lab(Encap::Vxlan)?;
    let no_encap = lab(Encap::NoEncap)?;
    let (n1, n2) = (&encap.nodes[0], &encap.nodes[1]);
    // A plain VXLAN between the node namespaces, on its own port (Sluice's tunnel has 4789).
    for (node, local, remote, ip) in [
        (n1, n1.ip, n2.ip, "10.99.0.1/24"),
        (n2, n2.ip, n1.ip, "10.99.0.2/24"),
    ] {
        let (local, remote) = (local.to_string(), remote.to_string());
        node.node.ns.exec(&[
            "ip", "link", "add", "vxbase", "type", "vxlan", "id", "42", "local", &local, "remote",
            &remote, "dstport", "4790",
        ])?;
        node.node
            .ns
            .exec(&["ip", "link", "set", "vxbase", "mtu", "1450", "up"])?;
        node.node
            .ns
            .exec(&["ip", "addr", "add", ip, "dev", "vxbase"])?;
    }
    let pairs = [
        Pair {
            name: "plain VXLAN",
            client: n1.node.ns.path(),
            server: n2.node.ns.path(),
            server_ns: n2.node.ns.name.clone(),
            server_ip: "10.99.0.2".parse()?,
        },
        Pair {
            name: "plain routing",
            client: n1.node.ns.path(),
            server: n2.node.ns.path(),
            server_ns: n2.node.ns.name.clone(),
            server_ip: n2.ip,
        },
        pod_pair(&encap, "Sluice encap"),
        pod_pair(&no_encap, "Sluice noEncap"),
    ];
    measure(&pairs)
}

fn percentiles(mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort();
    (
        samples[samples.len() / 2],
        samples[(samples.len() * 99).div_ceil(100) - 1],
    )
}

/// Time from an API change to the map entry that realizes it, over `CHANGES` changes each.
pub fn control_plane() -> Result<()> {
    let mut lab = lab(Encap::Vxlan)?;
    let maps: Vec<Maps> = lab
        .nodes
        .iter()
        .map(|n| Maps::from_pins(&n.node.bpffs))
        .collect::<Result<_>>()?;

    // Node added: its pod CIDR in REMOTE_NODES on every node.
    let mut node_added = Vec::with_capacity(CHANGES);
    for i in 0..CHANGES {
        let pod_cidr: IpNetwork = format!("10.245.{i}.0/24").parse()?;
        let start = Instant::now();
        lab.create(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": format!("bench-{i}")},
            "spec": {"podCIDR": pod_cidr.to_string()},
            "status": {"addresses": [{"type": "InternalIP", "address": format!("192.168.78.{}", i + 1)}]}}))?;
        let key = CidrKey::new(pod_cidr);
        wait(Duration::from_secs(10), || {
            maps.iter().all(|m| {
                m.pipeline()
                    .is_ok_and(|p| p.remote_nodes.contains_key(&key))
            })
        })
        .with_context(|| format!("node bench-{i} never programmed"))?;
        node_added.push(start.elapsed());
    }

    // Pod created: the kubelet wires it through the CNI; its address in L3Forwarding on its node.
    let mut pod_added = Vec::with_capacity(CHANGES);
    for i in 0..CHANGES {
        let node = i % 2;
        let start = Instant::now();
        lab.apply(vec![json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("bench-{i}"), "namespace": "default"},
            "spec": {"nodeName": format!("node-{}", node + 1), "containers": [{"name": "c", "image": "x"}]}})])?;
        let ip = lab
            .kubelet
            .pod(&format!("default/bench-{i}"))
            .context("bench pod not wired")?
            .ip;
        let key = ip_key(ip.into());
        wait(Duration::from_secs(10), || {
            maps[node]
                .pipeline()
                .is_ok_and(|p| p.l3_forwarding.contains_key(&key))
        })?;
        pod_added.push(start.elapsed());
    }
    let mut programmed: BTreeSet<IpNetwork> = BTreeSet::new();
    programmed.extend(
        maps[0]
            .pipeline()?
            .remote_nodes
            .keys()
            .filter_map(CidrKey::cidr),
    );
    println!(
        "REMOTE_NODES on node-1 after the run: {} CIDRs",
        programmed.len()
    );

    let (n50, n99) = percentiles(node_added);
    let (p50, p99) = percentiles(pod_added);
    println!("| change ({CHANGES} each) | p50 | p99 |");
    println!("|---|---|---|");
    println!("| Node added → REMOTE_NODES entry on every node | {n50:.1?} | {n99:.1?} |");
    println!("| Pod created → L3Forwarding entry on its node (kubelet + CNI ADD) | {p50:.1?} | {p99:.1?} |");
    Ok(())
}

fn wait(limit: Duration, mut done: impl FnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    while !done() {
        if start.elapsed() > limit {
            anyhow::bail!("not within {limit:?}");
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    Ok(())
}
