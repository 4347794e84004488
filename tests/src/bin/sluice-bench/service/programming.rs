//! Time to program the largest count of Services, and the agent's memory with them.

use std::time::Instant;

use anyhow::{ensure, Context, Result};
use k8s_openapi::api::core::v1::Service as K8sService;
use serde::Deserialize;
use sluice_agent::k8s::EndpointSlice;
use sluice_agent::model::service::{self, ServiceInputs, SetAllocator};
use sluice_tests::lab::{Encap, Lab, LabNode, LabOptions};

use super::{create, endpoints_of, wait_reported, Scale, ENDPOINTS_PER_SERVICE};
use crate::heap;

/// The agent's resident set and its peak so far (VmRSS, VmHWM), in MiB.
fn memory(node: &LabNode) -> Result<(f64, f64)> {
    let pid = node.node.agent_pid().context("the agent is not running")?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let mib = |field: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .map(|kib| kib / 1024.0)
            .with_context(|| format!("{field} in /proc/{pid}/status"))
    };
    Ok((mib("VmRSS:")?, mib("VmHWM:")?))
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Heap bytes of the lab's Services and EndpointSlices, as the API server serves them,
/// deserialized into the agent's types (what its watch stores hold), and of the ServiceTables
/// compiled from them.
fn weigh(lab: &Lab) -> Result<(usize, usize)> {
    let (services, slices) = (
        lab.api.list("services", None),
        lab.api.list("endpointslices", None),
    );
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

/// Programming time and agent memory with the largest count of Services: a node whose agent
/// runs while they are written, then a node that joins once they exist.
pub fn run(scale: &Scale) -> Result<()> {
    let n = *scale.counts.last().context("no count")?;
    let mut lab = Lab::up(LabOptions {
        nodes: 0,
        encap: Encap::Vxlan,
        attach_mode: "auto".into(),
        ports: vec![],
    })?;
    let start = Instant::now();
    lab.add_node(0)?;
    wait_reported(&lab.nodes[0], &lab.revisions())?;
    let joined_empty = start.elapsed();
    let empty = memory(&lab.nodes[0])?;

    let start = Instant::now();
    create(&lab, 0..n, &endpoints_of(1, &[]))?;
    let written = start.elapsed();
    let lag = wait_reported(&lab.nodes[0], &lab.revisions())?;
    let full = memory(&lab.nodes[0])?;
    let (objects, tables) = weigh(&lab)?;
    ensure!(
        lab.nodes[0].node.maps().service_entries()?.0.len() == n as usize,
        "node-1: SERVICES does not hold {n} frontends"
    );

    // node-1's agent stops, so that node-2's start has both cores as node-1's had.
    lab.nodes[0].node.kill_agent();
    let start = Instant::now();
    lab.add_node(1)?;
    wait_reported(&lab.nodes[1], &lab.revisions())?;
    let joined_full = start.elapsed();
    let joined = memory(&lab.nodes[1])?;
    ensure!(
        lab.nodes[1].node.maps().service_entries()?.0.len() == n as usize,
        "node-2: SERVICES does not hold {n} frontends"
    );

    println!("\nprogramming {n} Services × {ENDPOINTS_PER_SERVICE} endpoints (one run each)");
    println!("| step | time |");
    println!("|---|---|");
    let rows = [
        (format!("API server: {n} Services + {n} EndpointSlices written (in-process, the agent watching)"), written),
        ("last write → the agent reports them programmed".to_string(), lag),
        ("node joins: agent start → programmed, 0 Services".to_string(), joined_empty),
        (format!("node joins: agent start → programmed, {n} Services"), joined_full),
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
        (format!("node-2, started with {n} Services"), joined),
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
