//! sluicectl: operator CLI. Reads the node's pinned maps directly, so it works while the agent
//! is down too; the names it puts on rule ids and addresses come from the agent's socket
//! (without an agent answering: ids and bare addresses).

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use sluice_agent::{
    cni::install,
    datapath::ebpf::Maps,
    model::{key_ip, policy::protocol_name},
    names::{self, Answer, Query},
    net::Netlink,
    overlap::{self, Network, NetworkReport, Origin},
    table::{
        Align::{Left, Right},
        Table,
    },
};
use sluice_common::{nat_flags, scope, BackendKey, PolicyEvent, DIRECTION_INGRESS, VERDICT_ALLOW};

#[derive(Parser)]
#[command(version, about = "Inspect the Sluice datapath of this node")]
struct Args {
    /// The agent's bpffs directory (`bpffsDir` in its config).
    #[arg(
        long,
        global = true,
        env = "SLUICE_BPFFS_DIR",
        default_value = "/sys/fs/bpf/sluice"
    )]
    bpffs_dir: PathBuf,
    /// The agent's state directory (`stateDir`), where its socket answers for the names of
    /// rules, Services and pods.
    #[arg(
        long,
        global = true,
        env = "SLUICE_STATE_DIR",
        default_value = "/var/lib/sluice"
    )]
    state_dir: PathBuf,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Packets per pipeline stage and drops per reason, summed over CPUs.
    Stats,
    /// The pipeline entries the kernel holds, stage by stage.
    Pipeline,
    /// Per-rule packet and byte counters (EgressMetric / IngressMetric), by policy and rule.
    Policy,
    /// Service frontends with their Service and endpoints, and the load-balanced connections.
    Services,
    /// Stream policy verdicts (new connections allowed, drops) with pod names; Ctrl-C ends it.
    Events {
        /// Stop after this many events.
        #[arg(long)]
        count: Option<usize>,
        /// Print the events waiting in the ring and stop, instead of following it.
        #[arg(long)]
        no_follow: bool,
    },
    /// Overlapping networks: this node's pod CIDR, the other nodes' and the Service CIDR against
    /// each other and the node's interfaces and routes, read now; and which setting gave the
    /// node its pod CIDR. Exits 1 when something overlaps.
    Check,
    /// Install the CNI plugin and its network config on the host (the agent pod's init
    /// container): the binary first, then the config, each replaced atomically.
    InstallCni {
        #[arg(long, default_value = "/usr/local/bin/sluice-cni")]
        plugin: PathBuf,
        #[arg(long, default_value = "/etc/sluice/10-sluice.conflist")]
        conflist: PathBuf,
        #[arg(long, default_value = "/host/opt/cni/bin")]
        bin_dir: PathBuf,
        #[arg(long, default_value = "/host/etc/cni/net.d")]
        conf_dir: PathBuf,
    },
}

/// Names from this node's agent; without an agent answering, ids and addresses alone.
fn names(state_dir: &std::path::Path, query: &Query) -> Answer {
    names::ask(state_dir, query).unwrap_or_else(|e| {
        eprintln!("sluicectl: {e:#}; showing ids and addresses without names");
        Answer::default()
    })
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Cmd::InstallCni {
        plugin,
        conflist,
        bin_dir,
        conf_dir,
    } = &args.command
    {
        // Runs before any agent: no maps to read.
        let (plugin, conf) = install::install(&install::Install {
            plugin,
            conflist,
            bin_dir,
            conf_dir,
        })?;
        println!("installed {} and {}", plugin.display(), conf.display());
        return Ok(());
    }
    if let Cmd::Check = &args.command {
        return check(&args.state_dir);
    }
    let mut maps = Maps::from_pins(&args.bpffs_dir)?;
    match args.command {
        Cmd::Stats => {
            let counters = maps.counters()?;
            let mut stages = Table::new(&[("STAGE", Left), ("PACKETS", Right)]);
            for (stage, n) in &counters.stages {
                stages.row(vec![stage.name().into(), n.to_string()]);
            }
            println!("{}", stages.render());
            let mut drops =
                Table::new(&[("DROP REASON", Left), ("STAGE", Left), ("PACKETS", Right)]);
            for (reason, n) in &counters.drops {
                drops.row(vec![
                    reason.name().into(),
                    reason.stage().name().into(),
                    n.to_string(),
                ]);
            }
            print!("{}", drops.render());
        }
        Cmd::Pipeline => print!("{}", maps.pipeline()?),
        Cmd::Policy => {
            let names = names(
                &args.state_dir,
                &Query {
                    rules: true,
                    ..Query::default()
                },
            );
            let mut rules = Table::new(&[("RULE", Left), ("PACKETS", Right), ("BYTES", Right)]);
            for (id, stats) in maps.rule_stats()? {
                rules.row(vec![
                    names.rule(id),
                    stats.packets.to_string(),
                    stats.bytes.to_string(),
                ]);
            }
            print!("{}", rules.render());
        }
        Cmd::Services => {
            let (frontends, backends) = maps.service_entries()?;
            let addresses = frontends
                .keys()
                .map(|k| key_ip(&k.addr))
                .chain(backends.values().map(|e| key_ip(&e.addr)))
                .flatten()
                .collect();
            let names = names(
                &args.state_dir,
                &Query {
                    services: true,
                    addresses,
                    ..Query::default()
                },
            );
            let mut table = Table::new(&[
                ("FRONTEND", Left),
                ("SCOPE", Left),
                ("SERVICE", Left),
                ("ENDPOINTS", Left),
            ]);
            for (key, service) in &frontends {
                let frontend = names.endpoint(key_ip(&key.addr), key.port);
                let scope = if key.scope == scope::EXTERNAL {
                    "external"
                } else {
                    "internal"
                };
                let endpoints: Vec<String> = (0..service.count)
                    .filter_map(|index| {
                        backends.get(&BackendKey {
                            set: service.backend_set,
                            index,
                        })
                    })
                    .map(|e| names.endpoint(key_ip(&e.addr), e.port))
                    .collect();
                let endpoints = if endpoints.is_empty() {
                    "none (rejected)".to_string()
                } else {
                    endpoints.join(", ")
                };
                let service_name = names
                    .services
                    .get(&service.backend_set)
                    .cloned()
                    .unwrap_or_else(|| format!("set {}", service.backend_set));
                table.row(vec![
                    format!("{frontend}/{}", protocol_name(key.proto)),
                    scope.into(),
                    service_name,
                    endpoints,
                ]);
            }
            print!("{}", table.render());
            let connections = maps
                .service_nat
                .iter()
                .filter_map(|e| e.ok())
                .filter(|(_, entry)| entry.flags & nat_flags::REVERSE == 0)
                .count();
            println!();
            println!("load-balanced connections: {connections}");
        }
        Cmd::Events { count, no_follow } => {
            let mut seen = 0;
            loop {
                let mut batch = Vec::new();
                while count.is_none_or(|c| seen + batch.len() < c) {
                    let Some(item) = maps.policy_events.next() else {
                        break;
                    };
                    // SAFETY: the programs write whole PolicyEvents into this ring.
                    let e: PolicyEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                    batch.push(e);
                }
                if !batch.is_empty() {
                    let names = names(
                        &args.state_dir,
                        &Query {
                            rules: true,
                            addresses: batch
                                .iter()
                                .flat_map(|e| [key_ip(&e.src), key_ip(&e.dst)])
                                .flatten()
                                .collect(),
                            ..Query::default()
                        },
                    );
                    for e in &batch {
                        println!("{}", event_line(e, &names));
                    }
                    seen += batch.len();
                }
                if no_follow || count.is_some_and(|c| seen >= c) {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Cmd::InstallCni { .. } | Cmd::Check => unreachable!("handled before the maps are opened"),
    }
    Ok(())
}

fn event_line(e: &PolicyEvent, names: &Answer) -> String {
    let verdict = if e.verdict == VERDICT_ALLOW {
        "ALLOW"
    } else {
        "DROP "
    };
    let direction = if e.direction == DIRECTION_INGRESS {
        "ingress"
    } else {
        "egress"
    };
    let rule = if e.verdict == VERDICT_ALLOW {
        names.rule(e.rule)
    } else {
        "default deny".into()
    };
    format!(
        "{verdict} {direction:<7} proto {:<3} {} -> {}  [{rule}]",
        e.proto,
        names.endpoint(key_ip(&e.src), e.src_port),
        names.endpoint(key_ip(&e.dst), e.dst_port),
    )
}

/// `sluicectl check`: the cluster's networks as the agent last knew them (`network.json`),
/// against the host's networks as they are now.
fn check(state_dir: &std::path::Path) -> Result<()> {
    let path = state_dir.join("network.json");
    let text = std::fs::read(&path).with_context(|| {
        format!(
            "reading {}: the agent writes it once it follows the cluster (with Kubernetes)",
            path.display()
        )
    })?;
    let report: NetworkReport = serde_json::from_slice(&text)?;
    let host = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async { Netlink::new()?.host_networks(&report.own_devices).await })?;
    let host: Vec<Network> = host
        .iter()
        .map(|h| Network::host(&report.node, h))
        .collect();
    println!("node {}", report.node);
    println!(
        "podCIDR {} from {}",
        report.pod_cidr, report.pod_cidr_source
    );
    let service = report
        .cluster
        .iter()
        .find(|n| n.origin == Origin::ServiceCidr)
        .map_or("not set (serviceCIDR)".to_string(), |n| {
            format!("{} from the agent config's serviceCIDR", n.cidr)
        });
    println!("Service CIDR {service}");
    let pod_cidrs = report
        .cluster
        .iter()
        .filter(|n| matches!(n.origin, Origin::PodCidr { .. }))
        .count();
    let others = pod_cidrs.saturating_sub(1);
    println!(
        "other nodes' pod CIDRs: {others}; host networks checked: {}",
        host.len()
    );
    let found = overlap::find(&report.cluster, &host);
    if found.is_empty() {
        println!("no overlapping networks");
        return Ok(());
    }
    for o in &found {
        println!("OVERLAP: {o}");
    }
    std::process::exit(1);
}
