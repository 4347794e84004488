//! `cargo xtask fuzz`: every cargo-fuzz target of `fuzz/` for a bounded time, seeded from
//! `fuzz/seeds/<target>`, with the eBPF toolchain setup chose (nightly features: sanitizers,
//! coverage). cargo-fuzz is installed under `target/tools` when missing. What the fuzzer adds
//! to the corpus stays under `target/fuzz/corpus`; a crash is saved in `fuzz/artifacts` and fails
//! the command. `packets` is not a cargo-fuzz target: it runs `packet_fuzz_test_run.rs`, random
//! and mutated frames through the real programs with BPF_PROG_TEST_RUN (root), for as long.

use std::{path::Path, process::Command};

use anyhow::Result;

use crate::{build, run, setup};

pub const TARGETS: [&str; 4] = [
    "cni_plugin",
    "agent_config",
    "policy_compiler",
    "service_compiler",
];

/// BPF_PROG_TEST_RUN with mutated frames: coverage of the eBPF programs is not something
/// libFuzzer sees, so a plain mutation loop does as well.
const PACKETS: &str = "packets";

const CARGO_FUZZ: &str = "0.13.2";

pub fn run_targets(seconds: u64, only: &[String]) -> Result<()> {
    setup::check()?;
    build::ebpf()?;
    let wanted = |target: &str| only.is_empty() || only.iter().any(|o| o == target);
    if let Some(unknown) = only
        .iter()
        .find(|o| *o != PACKETS && !TARGETS.contains(&o.as_str()))
    {
        anyhow::bail!("fuzz target {unknown:?}: expected {PACKETS} or one of {TARGETS:?}");
    }
    if wanted(PACKETS) {
        crate::require_root("fuzzing the packet programs")?;
        println!("== fuzz {PACKETS} for {seconds} s (each of its invariants)");
        run(crate::cargo()
            .env("SLUICE_FUZZ_SECONDS", seconds.to_string())
            .args([
                "test",
                "-p",
                "sluice-tests",
                "--test",
                "packet_fuzz_test_run",
            ])
            .args(["--", "--nocapture"]))?;
    }
    if !TARGETS.iter().any(|t| wanted(t)) {
        return Ok(());
    }
    let tools = setup::tools_dir();
    if !tools.join("bin/cargo-fuzz").exists() {
        run(Command::new("cargo")
            .args([
                "install",
                "cargo-fuzz",
                "--locked",
                "--version",
                CARGO_FUZZ,
                "--root",
            ])
            .arg(&tools))?;
    }
    let root = build::root();
    let path = format!(
        "{}:{}",
        tools.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    for target in TARGETS.iter().filter(|t| wanted(t)) {
        let corpus = root.join("target/fuzz/corpus").join(target);
        std::fs::create_dir_all(&corpus)?;
        let mut cmd = build::toolchain_cargo();
        setup::EbpfToolchain::chosen()?.apply(&mut cmd);
        cmd.current_dir(&root)
            .env("PATH", &path)
            .env("CARGO_TARGET_DIR", root.join("target/fuzz/build"))
            .env("SLUICE_EBPF_OBJECT", build::ebpf_object())
            .args(["fuzz", "run", target])
            .arg(&corpus)
            .arg(Path::new("fuzz/seeds").join(target))
            .args(["--", &format!("-max_total_time={seconds}"), "-timeout=10"]);
        println!("== fuzz {target} for {seconds} s");
        run(&mut cmd)?;
    }
    Ok(())
}
