//! What a new machine lacks, installed idempotently: Debian packages the tests and benchmarks
//! use, the toolchain that builds the eBPF crate (the pinned nightly with rust-src, installed when
//! missing), and bpf-linker built against that toolchain's own libLLVM (so the linker's LLVM is
//! exactly rustc's), the chart tests' helm and kubernetes-validate (`chart_tools`), and the
//! lab's Kubernetes built from source (`kubernetes`). A second run only checks, in seconds.
//!
//! When rustup cannot install the pinned nightly, setup falls back to the stable toolchain with
//! `RUSTC_BOOTSTRAP=1` (which lets its cargo accept `-Z build-std=core`) and stable's rust-src,
//! taken from rustup or, failing that, from `../shared/toolchain/`. The choice is written to
//! `target/tools/toolchain`, which every later build reads.

use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context, Result};

use crate::{build::root, run};

/// The eBPF crate's toolchain; `ebpf/rust-toolchain.toml` names the same (a unit test checks).
/// Dated, so every machine gets the same rustc and LLVM 22 (aya-ebpf 0.2.1 builds with it).
pub const PINNED_NIGHTLY: &str = "nightly-2026-05-19";

/// bpf-linker release known to build against LLVM 22 from the toolchain's libLLVM.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// (command that must exist, Debian package that provides it).
const PACKAGES: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("nft", "nftables"),
    ("iperf3", "iperf3"),
    ("ping", "iputils-ping"),
    ("iptables-legacy", "iptables"),
    ("unzip", "unzip"),
    // The image tests: a private containerd with runc, and podman loading the archive.
    ("containerd", "containerd"),
    ("runc", "runc"),
    ("podman", "podman"),
    // The lab's Kubernetes cluster: certificates, the CNI loopback plugin containerd's CRI
    // calls for every pod, what the e2e tests exec in agnhost (netcat, nslookup, busybox).
    ("openssl", "openssl"),
    ("/usr/lib/cni/loopback", "containernetworking-plugins"),
    ("nc", "netcat-openbsd"),
    ("nslookup", "bind9-dnsutils"),
    ("busybox", "busybox-static"),
    ("wget", "wget"),
    ("curl", "curl"),
];

/// The toolchain that builds the eBPF crate.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum EbpfToolchain {
    /// The pinned dated nightly (preferred).
    Pinned,
    /// Stable with `RUSTC_BOOTSTRAP=1`: for machines whose rustup cannot install the nightly.
    Stable,
}

impl EbpfToolchain {
    /// The rustup toolchain name (`cargo +NAME`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Pinned => PINNED_NIGHTLY,
            Self::Stable => "stable",
        }
    }

    /// Applies the toolchain to a cargo or rustc command.
    pub fn apply(self, cmd: &mut Command) {
        cmd.arg(format!("+{}", self.name()));
        if self == Self::Stable {
            cmd.env("RUSTC_BOOTSTRAP", "1");
        }
    }

    fn parse(name: &str) -> Option<Self> {
        [Self::Pinned, Self::Stable]
            .into_iter()
            .find(|t| t.name() == name)
    }

    /// The toolchain `cargo xtask setup` chose on this machine.
    pub fn chosen() -> Result<Self> {
        let file = tools_dir().join("toolchain");
        let name = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}: run `cargo xtask setup`", file.display()))?;
        Self::parse(name.trim()).with_context(|| {
            format!(
                "{} names {:?}, not {PINNED_NIGHTLY} or stable: run `cargo xtask setup`",
                file.display(),
                name.trim()
            )
        })
    }

    pub fn sysroot(self) -> Result<PathBuf> {
        let out = Command::new("rustc")
            .arg(format!("+{}", self.name()))
            .args(["--print", "sysroot"])
            .output()
            .context("running rustc")?;
        if !out.status.success() {
            bail!(
                "the {} toolchain is not installed: {}",
                self.name(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
    }

    /// The toolchain's libLLVM shared library and its major version.
    fn llvm(self) -> Result<(PathBuf, u32)> {
        let lib = self.sysroot()?.join("lib");
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
            "no libLLVM.so.* in {}: the {} toolchain is incomplete",
            lib.display(),
            self.name()
        )
    }

    fn installed_components(self) -> Vec<String> {
        Command::new("rustup")
            .args([
                "component",
                "list",
                "--installed",
                "--toolchain",
                self.name(),
            ])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// rust-src as rustup lists it, or unpacked by hand into the sysroot (the offline fallback).
    fn has_rust_src(self) -> bool {
        self.installed_components()
            .iter()
            .any(|c| c.starts_with("rust-src"))
            || self
                .sysroot()
                .is_ok_and(|s| s.join("lib/rustlib/src/rust/library/core").is_dir())
    }

    fn has_rustfmt(self) -> bool {
        self.installed_components()
            .iter()
            .any(|c| c.starts_with("rustfmt"))
    }

    fn ready(self) -> bool {
        self.sysroot().is_ok() && self.has_rust_src() && self.has_rustfmt()
    }
}

pub fn tools_dir() -> PathBuf {
    root().join("target/tools")
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

/// bpf-linker is usable when it exists and its libLLVM link points at the toolchain's.
fn linker_ready(toolchain: EbpfToolchain) -> Result<bool> {
    let (llvm, _) = toolchain.llvm()?;
    let tools = tools_dir();
    Ok(tools.join("bin/bpf-linker").exists()
        && std::fs::read_link(tools.join("lib/libLLVM.so")).ok() == Some(llvm))
}

pub fn check() -> Result<()> {
    let toolchain = EbpfToolchain::chosen()?;
    let packages = missing_packages();
    if !packages.is_empty()
        || !toolchain.ready()
        || !linker_ready(toolchain)?
        || !crate::chart_tools::ready()
        || !crate::kubernetes::ready()
    {
        bail!(
            "this machine is not set up (missing: packages {packages:?}, the {} toolchain with \
             rust-src and rustfmt, bpf-linker, helm and kubernetes-validate, or the lab's \
             Kubernetes build): run `cargo xtask setup`",
            toolchain.name()
        );
    }
    Ok(())
}

/// Installs the pinned nightly when missing; `Ok(false)` when rustup cannot.
fn install_pinned() -> bool {
    let pinned = EbpfToolchain::Pinned;
    if pinned.ready() {
        return true;
    }
    println!("installing {PINNED_NIGHTLY} with rust-src and rustfmt");
    let installed = Command::new("rustup")
        .args([
            "toolchain",
            "install",
            PINNED_NIGHTLY,
            "--profile",
            "minimal",
        ])
        .args(["--component", "rust-src", "--component", "rustfmt"])
        .status()
        .is_ok_and(|s| s.success());
    installed && pinned.ready()
}

/// Stable's rust-src from rustup, else from the tarball in `../shared/toolchain/`.
fn install_stable_rust_src() -> Result<()> {
    let stable = EbpfToolchain::Stable;
    if stable.has_rust_src() {
        return Ok(());
    }
    let added = Command::new("rustup")
        .args(["component", "add", "rust-src", "--toolchain", "stable"])
        .status()
        .is_ok_and(|s| s.success());
    if added && stable.has_rust_src() {
        return Ok(());
    }
    let tarball = root().join("../shared/toolchain/rust-src-1.95.0.tar.xz");
    if !tarball.exists() {
        bail!(
            "rustup could not add rust-src to stable, and {} is absent",
            tarball.display()
        );
    }
    let rustlib = stable.sysroot()?.join("lib/rustlib");
    println!("unpacking {} into {}", tarball.display(), rustlib.display());
    run(Command::new("tar")
        .arg("xJf")
        .arg(&tarball)
        .arg("-C")
        .arg(&rustlib))?;
    if !stable.has_rust_src() {
        bail!("{} did not hold rust-src", tarball.display());
    }
    Ok(())
}

fn choose_toolchain(requested: Option<EbpfToolchain>) -> Result<EbpfToolchain> {
    let toolchain = match requested {
        Some(EbpfToolchain::Pinned) | None if install_pinned() => EbpfToolchain::Pinned,
        Some(EbpfToolchain::Pinned) => bail!("rustup could not install {PINNED_NIGHTLY}"),
        _ => {
            if requested.is_none() {
                println!(
                    "rustup could not install {PINNED_NIGHTLY}: falling back to stable with \
                     RUSTC_BOOTSTRAP=1"
                );
            }
            install_stable_rust_src()?;
            EbpfToolchain::Stable
        }
    };
    std::fs::create_dir_all(tools_dir())?;
    std::fs::write(tools_dir().join("toolchain"), toolchain.name())?;
    Ok(toolchain)
}

pub fn run_setup(requested: Option<EbpfToolchain>) -> Result<()> {
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
    let toolchain = choose_toolchain(requested)?;
    if !linker_ready(toolchain)? {
        let (llvm, major) = toolchain.llvm()?;
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
    crate::chart_tools::install()?;
    crate::kubernetes::build()?;
    check()?;
    println!(
        "setup complete: packages, the {} toolchain, bpf-linker, helm and kubernetes-validate \
         ({}), Kubernetes (target/kubernetes) are in place",
        toolchain.name(),
        tools_dir().join("bin").display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toolchain_file_names_the_pinned_nightly() {
        let file = std::fs::read_to_string(root().join("ebpf/rust-toolchain.toml")).unwrap();
        let channel = file
            .lines()
            .find_map(|l| l.strip_prefix("channel = "))
            .expect("a channel line");
        assert_eq!(channel.trim_matches('"'), PINNED_NIGHTLY);
    }

    #[test]
    fn toolchain_names_round_trip() {
        for t in [EbpfToolchain::Pinned, EbpfToolchain::Stable] {
            assert_eq!(EbpfToolchain::parse(t.name()), Some(t));
        }
        assert_eq!(EbpfToolchain::parse("nightly"), None);
    }
}
