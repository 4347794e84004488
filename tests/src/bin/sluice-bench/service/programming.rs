//! Time to program the largest count of Services, and the agent's memory with them.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use k8s_openapi::api::core::v1::Service as K8sService;
use serde::Deserialize;
use serde_json::Value;
use sluice_agent::k8s::EndpointSlice;
use sluice_agent::model::service::{self, ServiceInputs, SetAllocator};
use sluice_tests::cluster::{Cluster, ClusterOptions};

use super::{create, endpoints_of, Scale, ENDPOINTS_PER_SERVICE};
use crate::{
    agent_process::{agent_pid, agent_processes, memory, wait_reported},
    heap,
};

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Heap bytes of the cluster's Services and EndpointSlices, as kube-apiserver serves them,
/// deserialized into the agent's types (what its watch stores hold), and of the ServiceTables
/// compiled from them.
fn weigh(cluster: &Cluster) -> Result<(usize, usize)> {
    let items = |resource: &str| -> Result<Vec<Value>> {
        Ok(cluster.get(&[resource, "-A"])?["items"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    };
    let (services, slices) = (items("services")?, items("endpointslices")?);
    let before = heap::live();
    let services: Vec<K8sService> = services
        .iter()
        .map(K8sService::deserialize)
        .collect::<Result<_, _>>()?;
    let slices: Vec<EndpointSlice> = slices
        .iter()
        .map(EndpointSlice::deserialize)
        .collect::<Result<_, _>>()?;
    let objects = heap::live().saturating_sub(before);
    let before = heap::live();
    // The agent keeps its set allocator as it keeps the tables.
    let mut sets = SetAllocator::new();
    let tables = service::compile(
        &ServiceInputs {
            services: &services.iter().collect::<Vec<_>>(),
            slices: &slices.iter().collect::<Vec<_>>(),
            node_name: "node-1",
            node_port_addresses: &[],
        },
        &mut sets,
    );
    let compiled = heap::live().saturating_sub(before);
    drop((tables, sets));
    Ok((objects, compiled))
}

/// SIGKILLs node-1's agent and clears its report; once the kubelet has started it again (after
/// its back-off), times from the new process's start until it reports `target` programmed: a
/// restarted agent syncs everything from the API again.
fn restart(cluster: &Cluster, target: &BTreeMap<String, u64>) -> Result<(Duration, u32)> {
    let node = &cluster.nodes[0];
    let old = agent_pid()?;
    cluster.kill_agent("node-1")?;
    match std::fs::remove_file(node.programmed_json()) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
        _ => {}
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let pid = loop {
        if let Some(&pid) = agent_processes()?.iter().find(|&&pid| pid != old) {
            break pid;
        }
        ensure!(
            Instant::now() < deadline,
            "the agent was not restarted within 60 s"
        );
        std::thread::sleep(Duration::from_millis(1));
    };
    Ok((wait_reported(node, target)?, pid))
}

/// Programming time and agent memory with the largest count of Services, on a one-node
/// cluster: Services written while the agent runs, then an agent restart with them there,
/// against one with none.
pub fn run(scale: &Scale) -> Result<()> {
    let n = *scale.counts.last().context("no count")?;
    let cluster = Cluster::up(ClusterOptions::nodes(1))?;
    let admin = cluster.admin_client()?;
    let maps = cluster.nodes[0].maps()?;
    // The cluster's own Services (kubernetes, kube-dns) are there before the benchmark's.
    let system = maps.service_entries()?.0.len();
    let none = cluster.revisions()?;
    let (restarted_empty, pid) = restart(&cluster, &none)?;
    let empty = memory(pid)?;

    let start = Instant::now();
    let written = create(&admin, 0..n, &endpoints_of(1, &[]))?;
    let write_time = start.elapsed();
    let lag = wait_reported(&cluster.nodes[0], &written)?;
    let full = memory(pid)?;
    let (objects, tables) = weigh(&cluster)?;
    ensure!(
        maps.service_entries()?.0.len() == system + n as usize,
        "SERVICES does not hold {n} frontends besides the cluster's {system}"
    );

    let (restarted_full, pid) = restart(&cluster, &written)?;
    let restarted = memory(pid)?;
    ensure!(
        maps.service_entries()?.0.len() == system + n as usize,
        "SERVICES lost frontends over the restart"
    );

    println!("\nprogramming {n} Services × {ENDPOINTS_PER_SERVICE} endpoints on kube-apiserver (one run each)");
    println!("| step | time |");
    println!("|---|---|");
    let rows = [
        (format!("{n} Services + {n} EndpointSlices written (kube-rs, {} requests in flight, the agent watching)", super::IN_FLIGHT), write_time),
        ("last write → the agent reports them programmed".to_string(), lag),
        ("agent (re)start → programmed, 0 Services".to_string(), restarted_empty),
        (format!("agent (re)start → programmed, {n} Services"), restarted_full),
    ];
    for (step, time) in rows {
        println!("| {step} | {:.0} ms |", time.as_secs_f64() * 1e3);
    }
    println!("\nagent memory (/proc/<pid>/status)");
    println!("| agent | VmRSS | VmHWM (peak) |");
    println!("|---|---|---|");
    for (what, (rss, hwm)) in [
        ("node-1, no Services".to_string(), empty),
        (format!("node-1, after {n} Services arrived"), full),
        (format!("node-1, restarted with {n} Services"), restarted),
    ] {
        println!("| {what} | {rss:.1} MiB | {hwm:.1} MiB |");
    }
    println!(
        "heap of the {n} Services and EndpointSlices as the agent's types: {:.1} MiB (its watch stores hold them; program() compiles from references into them); compiled ServiceTables: {:.1} MiB",
        mib(objects),
        mib(tables)
    );
    Ok(())
}
