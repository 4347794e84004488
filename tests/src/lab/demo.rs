//! The first run (`cargo xtask lab`, which runs `sluice-lab demo`): what Sluice does, on a
//! two-node cluster, in about a minute — pods connecting across nodes, a NetworkPolicy changing
//! the truth table and counting on its rule, a Service balanced from a pod and from outside the
//! cluster, the datapath's stage counters. Each step checks what it shows: a probe that should
//! connect and did not, one the policy should stop and did not, or a Service that did not answer
//! every probe, fails the run, so the first run is also a smoke test.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::{
    manifests,
    report::{expect, truth_table, Probe, Protocol, Report, Step},
    services::{Frontend, ServiceProbe, ServiceProbes, Source},
};
use crate::{cluster::Cluster, probe::PROBE_TIMEOUT};

/// The ports every demo pod serves (the web pods declare 8080 as `http`).
pub const PORTS: [u16; 2] = [80, 8080];
const PROTOCOLS: [Protocol; 2] = [Protocol::Tcp, Protocol::Udp];
/// The pod `policy/db-from-api.yaml` isolates, and the one it lets in on TCP 8080.
const ISOLATED: &str = "backend/db-1";
const ALLOWED: &str = "backend/api-1";
/// `03-web-service.yaml`'s Service and the pods it selects.
const SERVICE: (&str, &str) = ("frontend", "web");
const PROBES_PER_FRONTEND: usize = 6;

/// Runs the demo on `cluster` with the manifests of `dir` (`examples/demo`: its YAML files, then
/// `policy/`), printing as it goes.
pub fn run(cluster: &Cluster, dir: &Path) -> Result<Report> {
    let started = Instant::now();
    let mut report = Report::default();

    section("1. Pods across two nodes, probed over TCP and UDP from inside each pod");
    cluster.apply_lab_manifests(manifests::load_dir(dir)?, &PORTS)?;
    let probes = settle_and_probe(cluster)?;
    print!("{}", placement(cluster)?);
    print!("{}", truth_table(&probes));
    expect(&probes, |_| true)?;
    report.steps.push(step("connectivity", probes));

    let policy = dir.join("policy");
    section(&format!(
        "2. NetworkPolicy {}: {ISOLATED} takes only {ALLOWED}'s TCP 8080",
        policy.join("db-from-api.yaml").display()
    ));
    cluster.apply_lab_manifests(manifests::load_dir(&policy)?, &PORTS)?;
    let probes = settle_and_probe(cluster)?;
    print!("{}", truth_table(&probes));
    expect(&probes, |p| {
        p.to != ISOLATED
            || p.from == p.to
            || (p.from == ALLOWED && p.port == 8080 && p.protocol == Protocol::Tcp)
    })?;
    report.steps.push(step("policy", probes));
    let node = node_of(cluster, ISOLATED)?;
    println!("\n$ sluicectl policy   (on {node}, where {ISOLATED} runs)");
    let rules = cluster.sluicectl(&node, &["policy"])?;
    print!("{rules}");
    // RULE  PACKETS  BYTES: api-1's probes to TCP 8080 were let in by the policy's rule.
    let counted = rules.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        line.contains("db-from-api")
            && fields.len() >= 3
            && fields[fields.len() - 2].parse::<u64>().is_ok_and(|n| n > 0)
    });
    if !counted {
        bail!("sluicectl policy on {node} counts no packet on backend/db-from-api's rule");
    }

    println!("\nthe policy deleted:");
    cluster.kubectl(&["delete", "-f", &policy.display().to_string()])?;
    let probes = settle_and_probe(cluster)?;
    expect(&probes, |_| true)?;
    println!("{}/{} probes connected again", probes.len(), probes.len());
    report.steps.push(step("policy deleted", probes));

    let (ns, name) = SERVICE;
    section(&format!(
        "3. Service {ns}/{name}, balanced over its pods from a pod and from outside"
    ));
    let node_2 = &cluster.nodes.last().context("a cluster has nodes")?.name;
    for (from, frontend) in [
        (Source::Pod(ALLOWED.into()), Frontend::ClusterIp),
        (Source::External, Frontend::NodePort(node_2.clone())),
    ] {
        let answers = ServiceProbe {
            port: None,
            protocol: Protocol::Tcp,
            from: Some(from),
            frontend,
            via: node_2.clone(),
            count: PROBES_PER_FRONTEND,
        }
        .run(cluster, ns, name)?;
        print!("{}", answers.text);
        let answered: usize = answers.answers.values().sum();
        let strangers: Vec<&String> = answers
            .answers
            .keys()
            .filter(|pod| !pod.starts_with(&format!("{ns}/web-")))
            .collect();
        if answered < PROBES_PER_FRONTEND || !strangers.is_empty() {
            bail!(
                "Service {ns}/{name}: {answered}/{PROBES_PER_FRONTEND} probes answered, \
                 by {:?} (expected only its pods)",
                answers.answers
            );
        }
        println!();
    }

    section(&format!(
        "4. What the datapath did: sluicectl stats on {node} (rows still at 0 left out)"
    ));
    print!("{}", nonzero(&cluster.sluicectl(&node, &["stats"])?));

    section("Next");
    println!(
        "demo done in {:.1} s after the cluster came up ({:.1} s)\n\
         \x20 sluice-lab up                        a cluster that stays, until Ctrl-C or `sluice-lab down`\n\
         \x20 kubectl --kubeconfig $(sluice-lab kubeconfig) get pods -A\n\
         \x20 sluice-lab apply -f examples/services/shop.yaml; sluice-lab probe-service shop/web\n\
         \x20 cargo xtask conformance              the upstream NetworkPolicy and Services e2e suites, Cyclonus\n\
         \x20 docs/lab.md, docs/network-policy.md, docs/services.md, docs/datapath.md",
        started.elapsed().as_secs_f64(),
        cluster.startup.as_secs_f64()
    );
    Ok(report)
}

fn section(title: &str) {
    println!("\n== {title}");
}

fn step(name: &str, probes: Vec<Probe>) -> Step {
    Step {
        manifests: name.into(),
        probes,
    }
}

/// Waits until every agent holds what the API does, then probes every pair.
fn settle_and_probe(cluster: &Cluster) -> Result<Vec<Probe>> {
    cluster.wait_programmed(Duration::from_secs(60))?;
    cluster.probe_all(&PORTS, &PROTOCOLS, PROBE_TIMEOUT)
}

/// The demo pods, one line each: where they run and their address.
fn placement(cluster: &Cluster) -> Result<String> {
    let mut lines = Vec::new();
    for ns in ["frontend", "backend"] {
        for pod in cluster.pods_in(ns)? {
            let field = |path: &str| pod.pointer(path).and_then(Value::as_str).unwrap_or("?");
            lines.push(format!(
                "  {ns}/{} on {}, {}",
                field("/metadata/name"),
                field("/spec/nodeName"),
                field("/status/podIP")
            ));
        }
    }
    lines.sort();
    Ok(lines.join("\n") + "\n")
}

/// A table's header lines and the rows whose last field is not 0.
fn nonzero(tables: &str) -> String {
    tables
        .lines()
        .filter(|line| {
            let last = line.split_whitespace().last();
            last.is_some_and(|n| n != "0") || line.is_empty()
        })
        .map(|line| format!("{line}\n"))
        .collect()
}

fn node_of(cluster: &Cluster, pod: &str) -> Result<String> {
    let (ns, name) = pod.split_once('/').context("namespace/name")?;
    cluster
        .get(&["pod", name, "-n", ns])?
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .map(str::to_string)
        .with_context(|| format!("pod {pod} is not scheduled"))
}
