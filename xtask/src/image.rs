//! `cargo xtask image`: Sluice's container image (`oci`). The root filesystem holds the four
//! release binaries, the `nft` binary the masquerade step runs, and the shared libraries each of
//! them loads (as `ldd` resolves them on this Debian machine, so they come from its packages).
//! Beside it, the lab's pod server image (`sluice-lab-pod`), which the lab's pods run on the
//! real cluster.

use std::path::PathBuf;

use anyhow::Result;
use serde_json::json;

use crate::{
    build::root,
    oci::{self, which},
};

pub const BINARIES: [&str; 4] = [
    "sluice-agent",
    "sluice-cni",
    "sluicectl",
    "sluice-controller",
];
/// Programs the binaries execute, found on this machine's PATH.
const RUNTIME_TOOLS: [&str; 1] = ["nft"];

/// The image name, as the chart's default values reference it.
pub fn reference() -> String {
    format!("docker.io/library/sluice:{}", env!("CARGO_PKG_VERSION"))
}

pub fn archive() -> PathBuf {
    root().join(format!(
        "target/image/sluice-{}.oci.tar",
        env!("CARGO_PKG_VERSION")
    ))
}

/// The lab's pod server (`tests/pod`), as an image of its own.
fn lab_pod() -> Result<()> {
    crate::run(crate::cargo().args(["build", "--release", "-p", "sluice-lab-pod"]))?;
    let fs = root().join("target/image/lab-pod-rootfs");
    let _ = std::fs::remove_dir_all(&fs);
    oci::programs(
        &fs,
        &[(
            root().join("target/release/sluice-lab-pod"),
            "/usr/local/bin/sluice-lab-pod".into(),
        )],
    )?;
    let version = env!("CARGO_PKG_VERSION");
    oci::write(
        &oci::Image {
            reference: &format!("docker.io/library/sluice-lab-pod:{version}"),
            rootfs: &fs,
            entrypoint: &["/usr/local/bin/sluice-lab-pod"],
            cmd: &["80"],
            labels: json!({"org.opencontainers.image.title": "sluice-lab-pod"}),
        },
        &root().join("target/image/lab-pod-work"),
        &root().join(format!("target/image/sluice-lab-pod-{version}.oci.tar")),
    )
}

pub fn build() -> Result<PathBuf> {
    crate::build::release()?;
    let work = root().join("target/image/work");
    let fs = root().join("target/image/rootfs");
    let _ = std::fs::remove_dir_all(&fs);
    let release = root().join("target/release");
    let mut programs: Vec<(PathBuf, PathBuf)> = BINARIES
        .iter()
        .map(|b| (release.join(b), PathBuf::from("/usr/local/bin").join(b)))
        .collect();
    for tool in RUNTIME_TOOLS {
        let path = which(tool)?;
        programs.push((path.clone(), path));
    }
    oci::programs(&fs, &programs)?;
    std::fs::create_dir_all(fs.join("var/lib/sluice"))?;
    let reference = reference();
    let archive = archive();
    oci::write(
        &oci::Image {
            reference: &reference,
            rootfs: &fs,
            entrypoint: &[],
            cmd: &["sluice-agent"],
            labels: json!({
                "org.opencontainers.image.title": "sluice",
                "org.opencontainers.image.version": env!("CARGO_PKG_VERSION"),
            }),
        },
        &work,
        &archive,
    )?;
    lab_pod()?;
    Ok(archive)
}
