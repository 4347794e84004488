//! sluicectl: operator CLI. Reads the node's pinned maps directly, so it works while the agent
//! is down too.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use sluice_agent::datapath::ebpf::Maps;

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
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Packets per pipeline stage and drops per reason, summed over CPUs.
    Stats,
    /// The pipeline entries the kernel holds, stage by stage.
    Pipeline,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let maps = Maps::from_pins(&args.bpffs_dir)?;
    match args.command {
        Cmd::Stats => {
            let counters = maps.counters()?;
            println!("{:<16} {:>14}", "STAGE", "PACKETS");
            for (stage, n) in &counters.stages {
                println!("{:<16} {:>14}", stage.name(), n);
            }
            println!();
            println!("{:<22} {:<14} {:>14}", "DROP REASON", "STAGE", "PACKETS");
            for (reason, n) in &counters.drops {
                println!(
                    "{:<22} {:<14} {:>14}",
                    reason.name(),
                    reason.stage().name(),
                    n
                );
            }
        }
        Cmd::Pipeline => print!("{}", maps.pipeline()?),
    }
    Ok(())
}
