//! Container images without a Docker daemon or a base image (neither exists here): a root
//! filesystem assembled from files of this machine, written as one reproducible layer into an OCI
//! image layout (`index.json`, what `ctr images import` and `podman load` read) that also carries
//! Docker's `manifest.json`, as `docker save` writes since Docker 25, for `docker load`.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::run;

/// An image to write: its name, root filesystem and what it runs.
pub struct Image<'a> {
    /// The full reference (`registry/repository:tag`) the index names it by.
    pub reference: &'a str,
    pub rootfs: &'a Path,
    pub entrypoint: &'a [&'a str],
    pub cmd: &'a [&'a str],
    pub labels: serde_json::Value,
}

pub fn which(tool: &str) -> Result<PathBuf> {
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()?;
    if !out.status.success() {
        bail!("{tool} is not installed (cargo xtask setup installs it)");
    }
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}

/// What `cmd` prints, failing when it fails.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// The libraries `binary` loads, the dynamic loader included (none for a static binary).
fn libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(binary).output()?;
    let text = String::from_utf8(out.stdout)?;
    if !out.status.success() {
        if text.contains("not a dynamic executable")
            || String::from_utf8_lossy(&out.stderr).contains("not a dynamic executable")
        {
            return Ok(Vec::new());
        }
        bail!(
            "ldd {}: {}",
            binary.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(text
        .lines()
        .filter_map(|line| {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux... (0x...)"
            let path = line.split("=>").last()?.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

/// Copies `from` to `rootfs` + `at` (the file itself where `from` is a symlink).
fn place(rootfs: &Path, from: &Path, at: &Path) -> Result<()> {
    let target = rootfs.join(at.strip_prefix("/").unwrap_or(at));
    std::fs::create_dir_all(target.parent().expect("a file in a directory"))?;
    std::fs::copy(from, &target)
        .with_context(|| format!("copying {} into the image", from.display()))?;
    Ok(())
}

/// Places each program (from, at) and every library they load, at the library's own path, and
/// the few files every image has (root in /etc/passwd, /tmp, /run with /var/run linking to it).
pub fn programs(rootfs: &Path, programs: &[(PathBuf, PathBuf)]) -> Result<()> {
    let mut libs = BTreeSet::new();
    for (from, at) in programs {
        place(rootfs, from, at)?;
        libs.extend(libraries(from)?);
    }
    for lib in &libs {
        place(rootfs, lib, lib)?;
    }
    std::fs::create_dir_all(rootfs.join("etc"))?;
    std::fs::write(
        rootfs.join("etc/passwd"),
        "root:x:0:0:root:/root:/sbin/nologin\n",
    )?;
    std::fs::write(rootfs.join("etc/group"), "root:x:0:\n")?;
    for empty in ["tmp", "root", "run"] {
        std::fs::create_dir_all(rootfs.join(empty))?;
    }
    // As on the hosts: runtimes name pod namespaces /var/run/netns/..., which is /run/netns.
    std::fs::create_dir_all(rootfs.join("var"))?;
    std::os::unix::fs::symlink("../run", rootfs.join("var/run"))?;
    Ok(())
}

fn sha256(path: &Path) -> Result<String> {
    let out = Command::new("sha256sum").arg(path).output()?;
    let text = String::from_utf8(out.stdout)?;
    Ok(text
        .split_whitespace()
        .next()
        .context("sha256sum printed nothing")?
        .to_string())
}

/// Writes `bytes` as a content-addressed blob; returns its digest and size.
fn blob(layout: &Path, bytes: &[u8]) -> Result<(String, usize)> {
    let staging = layout.join("blob.tmp");
    std::fs::write(&staging, bytes)?;
    let digest = sha256(&staging)?;
    std::fs::rename(&staging, layout.join("blobs/sha256").join(&digest))?;
    Ok((format!("sha256:{digest}"), bytes.len()))
}

/// A reproducible tar of `dir`: sorted, owned by root, dated 1970.
fn tar(dir: &Path, out: &Path) -> Result<()> {
    run(Command::new("tar")
        .args([
            "--sort=name",
            "--mtime=@0",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
        ])
        .arg("-C")
        .arg(dir)
        .arg("-cf")
        .arg(out)
        .arg("."))
}

/// Writes `image` as an OCI archive at `archive`, working in `work` (emptied first).
pub fn write(image: &Image, work: &Path, archive: &Path) -> Result<()> {
    let _ = std::fs::remove_dir_all(work);
    let layout = work.join("layout");
    std::fs::create_dir_all(layout.join("blobs/sha256"))?;
    let layer_tar = work.join("layer.tar");
    tar(image.rootfs, &layer_tar)?;
    let diff_id = format!("sha256:{}", sha256(&layer_tar)?);
    run(Command::new("gzip")
        .args(["-n", "-6", "-f"])
        .arg(&layer_tar))?;
    let layer = std::fs::read(work.join("layer.tar.gz"))?;
    let (layer_digest, layer_size) = blob(&layout, &layer)?;

    let (name, tag) = image
        .reference
        .rsplit_once(':')
        .context("an image reference with a tag")?;
    let mut run_config = json!({
        "Env": ["PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin"],
        "Cmd": image.cmd,
        "Labels": image.labels,
    });
    if !image.entrypoint.is_empty() {
        run_config["Entrypoint"] = json!(image.entrypoint);
    }
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": run_config,
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": "cargo xtask", "created": "1970-01-01T00:00:00Z"}],
        "created": "1970-01-01T00:00:00Z",
    });
    let (config_digest, config_size) = blob(&layout, &serde_json::to_vec(&config)?)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config_size,
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": layer_digest,
            "size": layer_size,
        }],
    });
    let (manifest_digest, manifest_size) = blob(&layout, &serde_json::to_vec(&manifest)?)?;
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest_size,
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {
                "io.containerd.image.name": image.reference,
                "org.opencontainers.image.ref.name": tag,
            },
        }],
    });
    std::fs::write(layout.join("index.json"), serde_json::to_vec(&index)?)?;
    std::fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    let path = |digest: &str| format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"));
    let docker = json!([{
        "Config": path(&config_digest),
        "RepoTags": [format!("{}:{tag}", name.trim_start_matches("docker.io/library/"))],
        "Layers": [path(&layer_digest)],
    }]);
    std::fs::write(layout.join("manifest.json"), serde_json::to_vec(&docker)?)?;
    std::fs::create_dir_all(archive.parent().expect("an archive in a directory"))?;
    tar(&layout, archive)?;
    let size = std::fs::metadata(archive)?.len();
    println!(
        "built {} ({}, {:.1} MiB, {} files in its root filesystem)",
        archive.display(),
        image.reference,
        size as f64 / (1 << 20) as f64,
        count_files(image.rootfs)?
    );
    Ok(())
}

fn count_files(dir: &Path) -> Result<usize> {
    let mut n = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        n += if entry.file_type()?.is_dir() {
            count_files(&entry.path())?
        } else {
            1
        };
    }
    Ok(n)
}
