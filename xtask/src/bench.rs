//! `cargo xtask bench [forward|cross-node|control-plane|policy|service|scale]`: release builds, then
//! `sluice-bench`.

use anyhow::Result;
use clap::Subcommand;

#[derive(Subcommand, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    /// All of the below.
    All,
    /// Pod-to-pod TCP throughput and request/response latency on one node.
    Forward,
    /// Pod to pod across two cluster nodes, encap and noEncap, against plain VXLAN and routing.
    CrossNode,
    /// Time from an API change to its map entry (p50/p99 over 100 changes).
    ControlPlane,
    /// NetworkPolicy cost with 0 to 10,000 rules, against the same rules in iptables.
    Policy,
    /// Services: per-packet cost, connection rate against kube-proxy's iptables rules,
    /// programming time and agent memory with 1 to 10,000 Services.
    Service,
    /// The agent in an API of 1,000 Nodes, 30,000 Pods, 1,000 NetworkPolicies and 10,000
    /// Services: time per change to the kernel, CPU per change, memory.
    Scale {
        /// A tenth of the size: checks the benchmark itself; its figures mean little.
        #[arg(long)]
        quick: bool,
    },
}

pub fn run(which: Which) -> Result<()> {
    crate::setup::check()?;
    crate::build::ebpf()?;
    crate::require_root("the benchmarks")?;
    // The cross-node, control-plane, policy and Service parts run the real cluster, whose
    // Sluice pods run the image.
    crate::image::build()?;
    crate::run(crate::cargo().args(["build", "--release", "--workspace", "--bins"]))?;
    let names: &[&str] = match which {
        Which::All => &[
            "forward",
            "cross-node",
            "control-plane",
            "policy",
            "service",
            "scale",
        ],
        Which::Forward => &["forward"],
        Which::CrossNode => &["cross-node"],
        Which::ControlPlane => &["control-plane"],
        Which::Policy => &["policy"],
        Which::Service => &["service"],
        Which::Scale { quick: false } => &["scale"],
        Which::Scale { quick: true } => &["scale --quick"],
    };
    for name in names {
        println!("== sluice-bench {name}");
        crate::run(
            crate::cargo()
                .args(["run", "--release", "-q", "-p", "sluice-tests"])
                .args(["--bin", "sluice-bench", "--"])
                .args(name.split(' ')),
        )?;
    }
    Ok(())
}
