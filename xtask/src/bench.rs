//! Benchmarks. Filled in below.
use anyhow::Result;
use clap::Subcommand;

#[derive(Subcommand, Clone, Copy)]
pub enum Which {
    /// Pod-to-pod TCP throughput and request/response latency on one node.
    Forward,
}

pub fn run(which: Which) -> Result<()> {
    match which {
        Which::Forward => {
            crate::setup::check()?;
            crate::build::ebpf()?;
            crate::require_root("the benchmark")?;
            crate::run(crate::cargo().args(["build", "--release", "--workspace", "--bins"]))?;
            crate::run(crate::cargo().args([
                "run",
                "--release",
                "-q",
                "-p",
                "sluice-tests",
                "--bin",
                "sluice-bench",
                "--",
                "forward",
            ]))
        }
    }
}
