//! What a new machine lacks, installed idempotently: Debian packages the tests and benchmarks
//! use, rust-src for the pinned nightly, and bpf-linker built against that nightly's own LLVM
//! (so the linker's LLVM is exactly rustc's). A second run only checks, in seconds.

use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context, Result};

use crate::{build::root, run};

/// bpf-linker release known to build against LLVM 22 from the nightly's libLLVM.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// (command that must exist, Debian package that provides it).
const PACKAGES: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("nft", "nftables"),
    ("iperf3", "iperf3"),
    ("ping", "iputils-ping"),
    ("iptables-legacy", "iptables"),
];

pub fn tools_dir() -> PathBuf {
    root().join("target/tools")
}

pub fn nightly_sysroot() -> Result<PathBuf> {
    let out = Command::new("rustc")
        .args(["+nightly", "--print", "sysroot"])
        .output()
        .context("running rustc +nightly")?;
    if !out.status.success() {
        bail!(
            "the nightly toolchain is not installed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}

/// The nightly's libLLVM shared library and its major version.
fn nightly_llvm() -> Result<(PathBuf, u32)> {
    let lib = nightly_sysroot()?.join("lib");
    for entry in std::fs::read_dir(&lib)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if let Some(version) = name.strip_prefix("libLLVM.so.") {
            let major = version
                .split('.')
                .next()
                .and_then(|m| m.parse().ok())
                .context("parsing the LLVM version")?;
            return Ok((lib.join(name), major));
        }
    }
    bail!(
        "no libLLVM.so.* in {}: the nightly toolchain is incomplete",
        lib.display()
    )
}

fn missing_packages() -> Vec<&'static str> {
    PACKAGES
        .iter()
        .filter(|(bin, _)| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {bin}")])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(|(_, pkg)| *pkg)
        .collect()
}

fn has_rust_src() -> Result<bool> {
    let out = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", "nightly"])
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.starts_with("rust-src")))
}

/// bpf-linker is usable when it exists and its libLLVM link points at the current nightly's.
fn linker_ready() -> Result<bool> {
    let (llvm, _) = nightly_llvm()?;
    let tools = tools_dir();
    Ok(tools.join("bin/bpf-linker").exists()
        && std::fs::read_link(tools.join("lib/libLLVM.so")).ok() == Some(llvm))
}

pub fn check() -> Result<()> {
    let packages = missing_packages();
    if !packages.is_empty() || !has_rust_src()? || !linker_ready()? {
        bail!("this machine is not set up (missing: packages {packages:?}, rust-src or bpf-linker): run `cargo xtask setup`");
    }
    Ok(())
}

pub fn run_setup() -> Result<()> {
    let packages = missing_packages();
    if !packages.is_empty() {
        crate::require_root("installing Debian packages")?;
        println!("installing {packages:?}");
        run(Command::new("apt-get").arg("update").arg("-qq"))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&packages)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    if !has_rust_src()? {
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    if !linker_ready()? {
        let (llvm, major) = nightly_llvm()?;
        let tools = tools_dir();
        std::fs::create_dir_all(tools.join("lib"))?;
        let link = tools.join("lib/libLLVM.so");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&llvm, &link)?;
        println!(
            "building bpf-linker {BPF_LINKER_VERSION} against {} (LLVM {major})",
            llvm.display()
        );
        run(Command::new("cargo")
            .env_remove("RUSTUP_TOOLCHAIN")
            .env("LLVM_PREFIX", &tools)
            .args([
                "install",
                "bpf-linker",
                "--force",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
            ])
            .arg("--features")
            .arg(format!("llvm-{major}"))
            .arg("--root")
            .arg(&tools))?;
    }
    check()?;
    println!(
        "setup complete: packages, rust-src and bpf-linker ({}) are in place",
        tools_dir().join("bin").display()
    );
    Ok(())
}
