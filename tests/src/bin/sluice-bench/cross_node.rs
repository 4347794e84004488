//! Cross-node benchmarks on the real cluster (kube-apiserver, kubelets with containerd, Sluice
//! installed by its chart).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Api;
use serde_json::{json, Value};
use sluice_agent::model::CidrKey;
use sluice_tests::{
    cluster::{probes::run_pod_server, Cluster, ClusterOptions},
    lab::Encap,
};

use crate::{measure, Pair};

const CHANGES: usize = 100;

/// Two nodes, a client pod on node-1 and a server pod on node-2.
fn cluster(encap: Encap) -> Result<Cluster> {
    let cluster = Cluster::up(ClusterOptions::nodes(2).with_encap(encap))?;
    let pods = ["client", "server"]
        .iter()
        .enumerate()
        .map(|(i, name)| {
            json!({"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": name, "namespace": "default"},
                   "spec": {"nodeName": format!("node-{}", i + 1), "containers": [{"name": "c", "image": "x"}]}})
        })
        .collect();
    cluster.apply_lab_manifests(pods, &[80])?;
    cluster.wait_programmed(Duration::from_secs(60))?;
    Ok(cluster)
}

fn pod_pair(cluster: &Cluster, name: &'static str) -> Result<Pair> {
    let pods = cluster.pod_addresses(Some("default"))?;
    let (client, _) = pods.get("client").context("client pod")?;
    let (server, server_ip) = pods.get("server").context("server pod")?;
    Ok(Pair {
        name,
        client: client.clone(),
        server: server.clone(),
        server_ip: *server_ip,
    })
}

/// Pod to pod across nodes through Sluice (encap and noEncap, a cluster each, both up for the
/// whole run so rounds interleave) against the encap cluster's two node namespaces talking over
/// plain VXLAN (kernel device, no eBPF) and plain routing (the uplink).
pub fn throughput_and_latency() -> Result<()> {
    let encap = cluster(Encap::Vxlan)?;
    let no_encap = cluster(Encap::NoEncap)?;
    let (n1, n2) = (&encap.nodes[0], &encap.nodes[1]);
    // A plain VXLAN between the node namespaces, on its own port (Sluice's tunnel has 4789).
    for (node, local, remote, ip) in [
        (n1, n1.ip, n2.ip, "10.99.0.1/24"),
        (n2, n2.ip, n1.ip, "10.99.0.2/24"),
    ] {
        let (local, remote) = (local.to_string(), remote.to_string());
        node.ns.exec(&[
            "ip", "link", "add", "vxbase", "type", "vxlan", "id", "42", "local", &local, "remote",
            &remote, "dstport", "4790",
        ])?;
        node.ns
            .exec(&["ip", "link", "set", "vxbase", "mtu", "1450", "up"])?;
        node.ns.exec(&["ip", "addr", "add", ip, "dev", "vxbase"])?;
    }
    let pairs = [
        Pair {
            name: "plain VXLAN",
            client: n1.ns.path(),
            server: n2.ns.path(),
            server_ip: "10.99.0.2".parse()?,
        },
        Pair {
            name: "plain routing",
            client: n1.ns.path(),
            server: n2.ns.path(),
            server_ip: n2.ip,
        },
        pod_pair(&encap, "Sluice encap")?,
        pod_pair(&no_encap, "Sluice noEncap")?,
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

/// Time from an API change to the map entry that realizes it, over `CHANGES` changes each,
/// written by kube-rs from this process (a `kubectl` process per change would add its start).
pub fn control_plane() -> Result<()> {
    let cluster = cluster(Encap::Vxlan)?;
    let admin = cluster.admin_client()?;
    let maps = cluster
        .nodes
        .iter()
        .map(|n| n.maps())
        .collect::<Result<Vec<_>>>()?;

    // Node added: its pod CIDR in REMOTE_NODES on every node. API-only Nodes, in the cluster
    // CIDR past the real nodes' blocks, so NodeIPAM holds them as they are.
    let nodes: Api<Node> = Api::all(admin.client.clone());
    let mut node_added = Vec::with_capacity(CHANGES);
    for i in 0..CHANGES {
        let pod_cidr = format!("10.244.{}.0/24", 100 + i);
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": format!("bench-{i}")},
            "spec": {"podCIDR": pod_cidr, "podCIDRs": [pod_cidr]},
            "status": {"addresses": [{"type": "InternalIP", "address": format!("192.168.78.{}", i + 1)}]}}))?;
        let key = CidrKey::new(pod_cidr.parse()?);
        let start = Instant::now();
        admin.create(&nodes, &node)?;
        wait(Duration::from_secs(10), || {
            maps.iter().all(|m| {
                m.pipeline()
                    .is_ok_and(|p| p.remote_nodes.contains_key(&key))
            })
        })
        .with_context(|| format!("node bench-{i} never programmed"))?;
        node_added.push(start.elapsed());
    }

    // Pod created with its nodeName: the kubelet starts its sandbox, CNI ADD wires it, and its
    // address appears in L3Forwarding on its node.
    let pods: Api<Pod> = Api::namespaced(admin.client.clone(), "default");
    let mut pod_added = Vec::with_capacity(CHANGES);
    for i in 0..CHANGES {
        let node = i % 2;
        let mut pod = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("bench-{i}"), "namespace": "default"},
            "spec": {"nodeName": format!("node-{}", node + 1), "containers": [{"name": "c", "image": "x"}]}});
        run_pod_server(&mut pod, &[80], "");
        let pod: Pod = serde_json::from_value::<Value>(pod).and_then(serde_json::from_value)?;
        let before = maps[node].pipeline()?.l3_forwarding.len();
        let start = Instant::now();
        admin.create(&pods, &pod)?;
        wait(Duration::from_secs(30), || {
            maps[node]
                .pipeline()
                .is_ok_and(|p| p.l3_forwarding.len() > before)
        })
        .with_context(|| format!("pod bench-{i} never programmed"))?;
        pod_added.push(start.elapsed());
    }

    let (n50, n99) = percentiles(node_added);
    let (p50, p99) = percentiles(pod_added);
    println!("| change ({CHANGES} each, real cluster) | p50 | p99 |");
    println!("|---|---|---|");
    println!("| Node created → REMOTE_NODES entry on every node | {n50:.1?} | {n99:.1?} |");
    println!("| Pod created → L3Forwarding entry on its node (kubelet, containerd, CNI ADD) | {p50:.1?} | {p99:.1?} |");
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
