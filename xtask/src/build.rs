//! Building the eBPF object (the toolchain setup chose, build-std, bpf-linker) and the release
//! binaries.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Result;

use crate::{cargo, run, setup};

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

pub fn ebpf_object() -> PathBuf {
    root().join("target/ebpf/bpfel-unknown-none/release/sluice-ebpf")
}

pub fn ebpf() -> Result<()> {
    run(&mut ebpf_cargo("build")?)
}

/// `cargo +TOOLCHAIN <subcommand>` for the eBPF crate, with bpf-linker and its LLVM on the paths.
pub fn ebpf_cargo(subcommand: &str) -> Result<Command> {
    let toolchain = setup::EbpfToolchain::chosen()?;
    let tools = setup::tools_dir();
    let path = format!(
        "{}:{}",
        tools.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = toolchain_cargo();
    cmd.current_dir(root().join("ebpf"))
        .env("PATH", path)
        .env("LD_LIBRARY_PATH", toolchain.sysroot()?.join("lib"));
    toolchain.apply(&mut cmd);
    cmd.args([subcommand, "--release", "--target-dir"])
        .arg(root().join("target/ebpf"));
    Ok(cmd)
}

/// `cargo` without the outer cargo's toolchain variables, which would override the toolchain
/// chosen for it (`+TOOLCHAIN`, rust-toolchain.toml).
pub fn toolchain_cargo() -> Command {
    let mut cmd = Command::new("cargo");
    for var in [
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTDOC",
        "RUSTC_WRAPPER",
        "RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

pub fn release() -> Result<()> {
    setup::check()?;
    ebpf()?;
    run(cargo().args(["build", "--release", "-p", "sluice-agent", "--bins"]))?;
    println!(
        "built: {}",
        root()
            .join("target/release/{sluice-agent,sluice-cni,sluicectl,sluice-controller}")
            .display()
    );
    Ok(())
}
