//! The lab's Kubernetes, built from source at the one release `tests/kubernetes/go.mod` requires
//! (its staging modules pinned to the matching versions): kube-apiserver, kube-controller-manager,
//! kube-scheduler, kubelet, kubectl, agnhost and etcd (`go.etcd.io/etcd/server/v3`, at the
//! version that release requires) with `go build`, the conformance suites' `e2e.test` with `go
//! test -c`, the pause container from the release's own `build/pause` source with gcc; then the
//! images pods run (`oci`): pause and agnhost, under the names the release's kubelet and e2e tests
//! use — and CoreDNS, the cluster's DNS as kubeadm installs it, from its own module
//! (`tests/kubernetes/coredns`, apart because its dependencies are not Kubernetes'); and
//! Cyclonus, the NetworkPolicy conformance generator Antrea runs (`tests/kubernetes/cyclonus`,
//! with a stamp of its own, so that it changes without a Kubernetes rebuild). Everything lands
//! in `target/kubernetes/`; a stamp of the inputs makes a second run a check.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::{
    build::root,
    oci::{self, which},
    run,
};

/// Bump when the recipe below changes, so machines rebuild.
const RECIPE: u32 = 5;

/// Binaries under `target/kubernetes/bin` (etcd is renamed from the package's name, `server`).
const BINARIES: [&str; 10] = [
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kubectl",
    "agnhost",
    "e2e.test",
    "pause",
    "coredns",
];

fn module_dir() -> PathBuf {
    root().join("tests/kubernetes")
}

fn coredns_dir() -> PathBuf {
    module_dir().join("coredns")
}

fn cyclonus_dir() -> PathBuf {
    module_dir().join("cyclonus")
}

pub fn dir() -> PathBuf {
    root().join("target/kubernetes")
}

fn bin_dir() -> PathBuf {
    dir().join("bin")
}

/// The release `go.mod` requires, e.g. `v1.35.4`.
pub fn version() -> Result<String> {
    required(&module_dir(), "k8s.io/kubernetes")
}

/// The version of `module` that the go.mod in `dir` requires.
fn required(dir: &Path, module: &str) -> Result<String> {
    let go_mod = std::fs::read_to_string(dir.join("go.mod"))?;
    go_mod
        .lines()
        .find_map(|l| {
            let l = l.trim();
            let l = l.strip_prefix("require ").unwrap_or(l);
            // "module v1.2.3", maybe followed by "// indirect".
            l.strip_prefix(module)?
                .strip_prefix(' ')?
                .split_whitespace()
                .next()
        })
        .map(str::to_string)
        .with_context(|| format!("{}/go.mod requires no {module}", dir.display()))
}

/// What the outputs were built from: a change to any of it means a rebuild.
fn inputs() -> Result<String> {
    let go = Command::new("go").arg("version").output()?;
    let mut inputs = format!("recipe {RECIPE}\n{}", String::from_utf8_lossy(&go.stdout));
    for dir in [module_dir(), coredns_dir()] {
        for file in ["go.mod", "go.sum"] {
            inputs += &std::fs::read_to_string(dir.join(file))?;
        }
    }
    Ok(inputs)
}

fn stamp() -> PathBuf {
    dir().join("stamp")
}

pub fn ready() -> bool {
    let built = std::fs::read_to_string(stamp()).ok();
    built.is_some() && built == inputs().ok() && images_present() && cyclonus_ready()
}

fn cyclonus_inputs() -> Result<String> {
    let go = Command::new("go").arg("version").output()?;
    let mut inputs = String::from_utf8_lossy(&go.stdout).into_owned();
    for file in ["go.mod", "go.sum"] {
        inputs += &std::fs::read_to_string(cyclonus_dir().join(file))?;
    }
    Ok(inputs)
}

fn cyclonus_stamp() -> PathBuf {
    dir().join("cyclonus.stamp")
}

fn cyclonus_ready() -> bool {
    let built = std::fs::read_to_string(cyclonus_stamp()).ok();
    bin_dir().join("cyclonus").exists() && built.is_some() && built == cyclonus_inputs().ok()
}

/// `target/kubernetes/bin/cyclonus`, from the module `tests/kubernetes/cyclonus` pins.
fn cyclonus() -> Result<()> {
    if cyclonus_ready() {
        return Ok(());
    }
    std::fs::create_dir_all(bin_dir())?;
    let started = std::time::Instant::now();
    run(go()
        .current_dir(cyclonus_dir())
        .args(["build", "-trimpath", "-ldflags", "-s -w", "-o"])
        .arg(format!("{}/", bin_dir().display()))
        .arg("tool"))?;
    std::fs::write(cyclonus_stamp(), cyclonus_inputs()?)?;
    println!(
        "cyclonus {} built in {:.0} s",
        required(&cyclonus_dir(), "github.com/mattfenwick/cyclonus")?,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn images_present() -> bool {
    BINARIES.iter().all(|b| bin_dir().join(b).exists())
        && ["pause", "agnhost", "coredns"]
            .iter()
            .all(|i| dir().join(format!("images/{i}.oci.tar")).exists())
}

/// `-X` flags that give every binary the release's version, as the release build does (the
/// kubelet reports it in its Node, kubectl compares it with the server's).
fn version_flags(version: &str) -> Result<String> {
    let (major, minor) = version
        .trim_start_matches('v')
        .split_once('.')
        .and_then(|(major, rest)| Some((major, rest.split('.').next()?)))
        .with_context(|| format!("release {version:?} is not vMAJOR.MINOR.PATCH"))?;
    let mut flags = String::from("-s -w");
    for package in [
        "k8s.io/component-base/version",
        "k8s.io/client-go/pkg/version",
    ] {
        flags += &format!(
            " -X {package}.gitVersion={version} -X {package}.gitMajor={major} \
             -X {package}.gitMinor={minor} -X {package}.gitTreeState=clean \
             -X {package}.buildDate=1970-01-01T00:00:00Z"
        );
    }
    Ok(flags)
}

fn go() -> Command {
    let mut cmd = Command::new("go");
    // The module names the Go it needs; never fetch another one behind the caller's back.
    cmd.current_dir(module_dir()).env("GOTOOLCHAIN", "local");
    cmd
}

/// The source directory of the required k8s.io/kubernetes module (in the module cache).
fn source_dir() -> Result<PathBuf> {
    let out = go()
        .args(["list", "-m", "-f", "{{.Dir}}", "k8s.io/kubernetes"])
        .output()?;
    if !out.status.success() {
        bail!(
            "go list -m k8s.io/kubernetes: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}

/// The version the release's e2e image manifest gives `image`, e.g. `("registry.k8s.io", "3.10.1")`
/// for `Pause`.
fn e2e_image(source: &Path, image: &str) -> Result<(String, String)> {
    let manifest = std::fs::read_to_string(source.join("test/utils/image/manifest.go"))?;
    let line = manifest
        .lines()
        .find(|l| {
            l.trim_start()
                .starts_with(&format!("configs[{image}] = Config{{"))
        })
        .with_context(|| format!("test/utils/image/manifest.go has no {image}"))?;
    let quoted: Vec<&str> = line.split('"').skip(1).step_by(2).collect();
    let registry = if line.contains("list.GcRegistry") {
        "registry.k8s.io"
    } else if line.contains("list.PromoterE2eRegistry") {
        "registry.k8s.io/e2e-test-images"
    } else {
        bail!("{image}: registry not known in {line:?}")
    };
    match quoted.as_slice() {
        [_name, version] => Ok((registry.to_string(), version.to_string())),
        _ => bail!("{image}: cannot read {line:?}"),
    }
}

pub fn build() -> Result<()> {
    cyclonus()?;
    let version = version()?;
    if ready() {
        println!("kubernetes {version}: built ({})", dir().display());
        return Ok(());
    }
    let started = std::time::Instant::now();
    let bin = bin_dir();
    std::fs::create_dir_all(&bin)?;
    let flags = version_flags(&version)?;
    println!("building kubernetes {version} from source (5 to 15 minutes the first time)");
    run(go()
        .args(["build", "-trimpath", "-ldflags", &flags, "-o"])
        .arg(format!("{}/", bin.display()))
        .arg("tool"))?;
    std::fs::rename(bin.join("server"), bin.join("etcd"))?;
    run(go()
        .current_dir(coredns_dir())
        .args(["build", "-trimpath", "-ldflags", "-s -w", "-o"])
        .arg(format!("{}/", bin.display()))
        .arg("tool"))?;
    run(go()
        .args(["test", "-c", "-trimpath", "-ldflags", &flags, "-o"])
        .arg(bin.join("e2e.test"))
        .arg("k8s.io/kubernetes/test/e2e"))?;
    let source = source_dir()?;
    let (pause_registry, pause_tag) = e2e_image(&source, "Pause")?;
    run(Command::new("gcc")
        .args(["-Os", "-Wall", "-static"])
        .arg(format!("-DVERSION=v{pause_tag}-sluice"))
        .arg("-o")
        .arg(bin.join("pause"))
        .arg(source.join("build/pause/linux/pause.c")))?;
    images(&source, &format!("{pause_registry}/pause:{pause_tag}"))?;
    std::fs::write(stamp(), inputs()?)?;
    println!(
        "kubernetes {version} built in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn images(source: &Path, pause: &str) -> Result<()> {
    let work = dir().join("images/work");
    let rootfs = work.join("rootfs");
    let bin = bin_dir();
    let _ = std::fs::remove_dir_all(&rootfs);
    oci::programs(&rootfs, &[(bin.join("pause"), "/pause".into())])?;
    oci::write(
        &oci::Image {
            reference: pause,
            rootfs: &rootfs,
            entrypoint: &["/pause"],
            cmd: &[],
            labels: json!({}),
        },
        &work.join("oci"),
        &dir().join("images/pause.oci.tar"),
    )?;

    // agnhost with the tools the e2e tests exec in it (upstream adds them from Alpine's
    // packages; here they come from this machine's Debian ones).
    let (registry, tag) = e2e_image(source, "Agnhost")?;
    let _ = std::fs::remove_dir_all(&rootfs);
    let mut programs = vec![(bin.join("agnhost"), PathBuf::from("/agnhost"))];
    let sh = which("sh")?;
    programs.push((sh.clone(), "/bin/sh".into()));
    // GNU wget: Debian's static busybox wget segfaults.
    for tool in ["bash", "curl", "nc", "ip", "nslookup", "dig", "wget"] {
        let path = which(tool)?;
        programs.push((path.clone(), path));
    }
    programs.push((sh.clone(), sh));
    let busybox = which("busybox")?;
    programs.push((busybox.clone(), "/bin/busybox".into()));
    oci::programs(&rootfs, &programs)?;
    // The rest of a shell's everyday commands (seq, sleep, grep, wget, ...), as Alpine's
    // busybox gives upstream's image; the tools placed above keep their own binaries.
    let applets = crate::oci::output(Command::new(&busybox).arg("--list"))?;
    for applet in applets.lines() {
        let link = rootfs.join("bin").join(applet);
        let elsewhere = rootfs.join("usr/bin").join(applet);
        if !link.exists() && !elsewhere.exists() {
            std::os::unix::fs::symlink("busybox", link)?;
        }
    }
    std::fs::create_dir_all(rootfs.join("uploads"))?;
    oci::write(
        &oci::Image {
            reference: &format!("{registry}/agnhost:{tag}"),
            rootfs: &rootfs,
            entrypoint: &["/agnhost"],
            cmd: &["pause"],
            labels: json!({}),
        },
        &work.join("oci"),
        &dir().join("images/agnhost.oci.tar"),
    )?;

    let version = required(&coredns_dir(), "github.com/coredns/coredns")?;
    let _ = std::fs::remove_dir_all(&rootfs);
    oci::programs(&rootfs, &[(bin.join("coredns"), "/coredns".into())])?;
    oci::write(
        &oci::Image {
            reference: &format!("registry.k8s.io/coredns/coredns:{version}"),
            rootfs: &rootfs,
            entrypoint: &["/coredns"],
            cmd: &[],
            labels: json!({}),
        },
        &work.join("oci"),
        &dir().join("images/coredns.oci.tar"),
    )?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_flags_name_major_and_minor() {
        let flags = version_flags("v1.35.4").unwrap();
        assert!(flags.contains("k8s.io/component-base/version.gitVersion=v1.35.4"));
        assert!(flags.contains("k8s.io/client-go/pkg/version.gitMinor=35"));
        assert!(version_flags("1").is_err());
    }

    #[test]
    fn coredns_is_pinned() {
        assert!(required(&coredns_dir(), "github.com/coredns/coredns")
            .unwrap()
            .starts_with("v1."));
    }

    /// Every staging module is pinned to the release's own version (`v1.35.4` → `v0.35.4`).
    #[test]
    fn go_mod_pins_the_staging_modules_to_the_release() {
        let version = version().unwrap();
        let staging = version.replacen("v1.", "v0.", 1);
        let go_mod = std::fs::read_to_string(module_dir().join("go.mod")).unwrap();
        let pins: Vec<&str> = go_mod
            .lines()
            .filter(|l| l.starts_with("replace k8s.io/"))
            .collect();
        assert!(pins.len() > 20, "{pins:?}");
        for pin in pins {
            assert!(
                pin.ends_with(&format!(" {staging}")),
                "{pin} is not at {staging}"
            );
        }
    }
}
