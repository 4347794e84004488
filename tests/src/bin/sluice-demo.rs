//! The single-node demo (`cargo xtask demo`): a node namespace running the agent, three pods
//! added through the real CNI plugin, every pod probing every pod over TCP and UDP, a spoofing
//! attempt, then the datapath's counters. Everything is torn down at the end.

use std::net::Ipv4Addr;

use anyhow::Result;
use sluice_agent::table::{Align, Table};
use sluice_tests::{
    probe::{self, Servers},
    require_root, Node,
};

const PORT: u16 = 8080;

fn main() -> Result<()> {
    require_root();
    let node = Node::start("10.244.0.0/24", "auto")?;
    println!(
        "node {} up: agent running, gateway sluice-gw0 = 10.244.0.1",
        node.ns.name
    );
    let pods: Vec<_> = ["web", "api", "db"]
        .iter()
        .map(|n| node.add_pod(n))
        .collect();
    for pod in &pods {
        println!(
            "  pod {:<4} {} (added with sluice-cni ADD)",
            pod.name, pod.ip
        );
    }
    let _servers: Vec<_> = pods
        .iter()
        .map(|p| Servers::start(&p.ns.path(), &p.name, &[PORT]))
        .collect();

    println!("\nprobes on port {PORT} (answered by / failed):");
    let mut columns = vec![("from \\ to", Align::Left)];
    columns.extend(pods.iter().map(|p| (p.name.as_str(), Align::Left)));
    let mut table = Table::new(&columns);
    let cell = |r: Option<probe::Reply>| r.map_or("--".to_string(), |r| r.server);
    for from in &pods {
        let mut row = vec![from.name.clone()];
        row.extend(pods.iter().map(|to| {
            let tcp = cell(probe::tcp(&from.ns.path(), None, to.ip, PORT));
            let udp = cell(probe::udp(&from.ns.path(), to.ip, PORT));
            format!("tcp:{tcp} udp:{udp}")
        }));
        table.row(row);
    }
    let mut row = vec!["node".to_string()];
    row.extend(pods.iter().map(|to| {
        format!(
            "tcp:{}",
            cell(probe::tcp(&node.ns.path(), None, to.ip, PORT))
        )
    }));
    table.row(row);
    print!("{}", table.render());

    let spoofer = &pods[2];
    spoofer
        .ns
        .exec(&["ip", "addr", "add", "10.244.0.250/32", "dev", "eth0"])?;
    let spoofed: Ipv4Addr = "10.244.0.250".parse()?;
    let got = probe::tcp(&spoofer.ns.path(), Some(spoofed), pods[0].ip, PORT);
    println!(
        "\n{} sending from spoofed 10.244.0.250 -> {}: {}",
        spoofer.name,
        pods[0].name,
        if got.is_some() {
            "GOT THROUGH"
        } else {
            "dropped by SpoofGuard"
        }
    );

    for command in ["stats", "pipeline"] {
        println!("\nsluicectl {command}:");
        let out = std::process::Command::new(sluice_tests::bin("sluicectl"))
            .arg("--bpffs-dir")
            .arg(&node.bpffs)
            .arg(command)
            .output()?;
        print!("{}", String::from_utf8_lossy(&out.stdout));
    }
    println!("\ntearing down (namespaces, agent, pins)");
    Ok(())
}
