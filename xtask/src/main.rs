//! `cargo xtask setup | build | test | demo | lab | conformance | bench | fuzz`: the only entry points a newcomer
//! needs.

mod bench;
mod build;
mod chart_tools;
mod fuzz;
mod image;
mod kubernetes;
mod oci;
mod setup;

use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Sluice developer tasks")]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what this machine lacks: Debian packages, the eBPF toolchain (the pinned nightly
    /// with rust-src; stable with RUSTC_BOOTSTRAP=1 when rustup cannot get it), bpf-linker,
    /// helm, and the lab's Kubernetes built from source. Idempotent.
    Setup {
        /// Use this eBPF toolchain instead of choosing (the pinned nightly, else stable).
        #[arg(long, value_enum)]
        ebpf_toolchain: Option<setup::EbpfToolchain>,
    },
    /// Build the eBPF object and the release binaries (sluice-agent, sluice-cni, sluicectl,
    /// sluice-controller).
    Build,
    /// fmt check, clippy -D warnings, unit tests, the image, then the root network-namespace,
    /// chart, image and real-cluster tests (with a few upstream conformance specs).
    Test,
    /// Build, then run the single-node demo: three pods through the real CNI, probed, counters shown.
    Demo,
    /// Build, then run the first-run demo on a real two-node Kubernetes cluster with Sluice
    /// installed by its chart: the pods of examples/demo probed pair by pair, a NetworkPolicy
    /// applied and deleted, a Service probed from a pod and from outside, the datapath counters.
    Lab,
    /// Benchmarks; each prints ratios against baselines measured in the same run.
    Bench {
        #[command(subcommand)]
        which: Option<bench::Which>,
    },
    /// The upstream conformance suites against Sluice on the lab's real cluster: the release's
    /// [sig-network] Netpol and Services specs, and Cyclonus's generated NetworkPolicy cases
    /// (long: see docs/conformance.md).
    Conformance {
        /// Any of netpol, services, cyclonus.
        #[arg(long, default_value = "netpol,services,cyclonus")]
        suites: String,
        /// Only the specs whose name contains this (for cyclonus: the case tags to run).
        #[arg(long)]
        only: Option<String>,
        /// Nodes of the cluster (a few Services specs need three).
        #[arg(long, default_value_t = 2)]
        nodes: usize,
    },
    /// Build the container image (an OCI archive for ctr, podman and docker) from the release
    /// binaries, under target/image.
    Image,
    /// Fuzz the CNI plugin's input, the agent config and the policy and Service compilers
    /// (cargo fuzz), each for a bounded time.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Only these targets (default: all).
        targets: Vec<String>,
    },
}

fn main() -> Result<()> {
    match Args::parse().command {
        Cmd::Setup { ebpf_toolchain } => setup::run_setup(ebpf_toolchain),
        Cmd::Build => build::release(),
        Cmd::Image => image::build().map(|_| ()),
        Cmd::Test => test(),
        Cmd::Demo => demo(),
        Cmd::Lab => lab(),
        Cmd::Conformance {
            suites,
            only,
            nodes,
        } => conformance(&suites, only.as_deref(), nodes),
        Cmd::Bench { which } => bench::run(which.unwrap_or(bench::Which::All)),
        Cmd::Fuzz { seconds, targets } => fuzz::run_targets(seconds, &targets),
    }
}

/// Runs a command and fails with its command line when it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(build::root());
    cmd.env("SLUICE_EBPF_OBJECT", build::ebpf_object());
    cmd
}

pub fn require_root(what: &str) -> Result<()> {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        bail!("{what} needs root (network namespaces, BPF); run as root, as CI does");
    }
    Ok(())
}

fn test() -> Result<()> {
    setup::check()?;
    build::ebpf()?;
    run(cargo().args(["fmt", "--all", "--check"]))?;
    let mut ebpf_fmt = Command::new("cargo");
    ebpf_fmt.current_dir(build::root().join("ebpf"));
    setup::EbpfToolchain::chosen()?.apply(&mut ebpf_fmt);
    run(ebpf_fmt.args(["fmt", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    run(cargo().args(["build", "--workspace", "--bins"]))?;
    run(cargo().args(["test", "--workspace", "--lib", "--bins"]))?;
    require_root("the integration tests")?;
    // The image tests run what ships: the release binaries in the image.
    image::build()?;
    run(cargo().args([
        "test",
        "-p",
        "sluice-tests",
        "--tests",
        "--",
        "--test-threads=1",
    ]))
}

fn demo() -> Result<()> {
    setup::check()?;
    build::ebpf()?;
    require_root("the demo")?;
    run(cargo().args(["build", "--workspace", "--bins"]))?;
    run(cargo().args(["run", "-q", "-p", "sluice-tests", "--bin", "sluice-demo"]))
}

fn lab() -> Result<()> {
    let mut lab = sluice_lab("the lab")?;
    lab.args(["demo", "--manifests", "examples/demo", "--json"])
        .arg(build::root().join("target/lab-demo.json"));
    run(&mut lab)
}

/// `sluice-lab` ready to take its arguments, with what it runs built: the lab is a real
/// cluster, so Sluice's pods run its image and the lab's pods the pod server's.
fn sluice_lab(what: &str) -> Result<Command> {
    setup::check()?;
    build::ebpf()?;
    require_root(what)?;
    image::build()?;
    run(cargo().args(["build", "--workspace", "--bins"]))?;
    let mut lab = cargo();
    lab.args([
        "run",
        "-q",
        "-p",
        "sluice-tests",
        "--bin",
        "sluice-lab",
        "--",
    ]);
    Ok(lab)
}

fn conformance(suites: &str, only: Option<&str>, nodes: usize) -> Result<()> {
    let mut lab = sluice_lab("the conformance suites")?;
    lab.args([
        "conformance",
        "--suites",
        suites,
        "--nodes",
        &nodes.to_string(),
        "--json",
    ])
    .arg(build::root().join("target/conformance/results.json"));
    if let Some(only) = only {
        lab.args(["--only", only]);
    }
    run(&mut lab)
}
