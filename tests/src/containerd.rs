//! A private containerd (Debian's, with runc) for running Sluice's image: its own root, state
//! and socket under a temporary directory, the `native` snapshotter (no overlay mounts needed),
//! stopped and removed on drop. The image is the archive `cargo xtask image` builds.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{register, sh, unique, unregister, Created};

/// The image archive `cargo xtask image` writes.
pub fn image_archive() -> PathBuf {
    built_image("sluice")
}

/// The lab's pod server image, which `cargo xtask image` builds beside Sluice's.
pub fn lab_pod_archive() -> PathBuf {
    built_image("sluice-lab-pod")
}

fn built_image(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!(
        "../target/image/{name}-{}.oci.tar",
        env!("CARGO_PKG_VERSION")
    ));
    assert!(
        path.exists(),
        "{} is missing: run `cargo xtask image` (cargo xtask test does)",
        path.display()
    );
    path
}

/// The name the archive's index gives the image (the chart's default).
pub fn image_name() -> String {
    format!("docker.io/library/sluice:{}", env!("CARGO_PKG_VERSION"))
}

pub struct Containerd {
    pub dir: PathBuf,
    daemon: Child,
}

const NAMESPACE: &str = "sluice-tests";

impl Containerd {
    pub fn start() -> Result<Containerd> {
        let dir = std::env::temp_dir().join(unique("sctd"));
        std::fs::create_dir_all(&dir)?;
        register(Created::Dir(dir.clone()));
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{0}/root\"\nstate = \"{0}/state\"\n\
                 # No kubelet here: the CRI plugin is not used.\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{0}/containerd.sock\"\n",
                dir.display()
            ),
        )?;
        let log = std::fs::File::create(dir.join("containerd.log"))?;
        let daemon = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting containerd (cargo xtask setup installs it)")?;
        register(Created::Process(daemon.id()));
        let containerd = Containerd { dir, daemon };
        let deadline = Instant::now() + Duration::from_secs(20);
        while containerd.ctr(&["version"]).is_err() {
            if Instant::now() > deadline {
                bail!(
                    "containerd did not answer within 20 s:\n{}",
                    std::fs::read_to_string(containerd.dir.join("containerd.log"))?
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(containerd)
    }

    pub fn address(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    /// `ctr` against this daemon, in the tests' containerd namespace.
    pub fn ctr_command(&self) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address")
            .arg(self.address())
            .args(["--namespace", NAMESPACE]);
        cmd
    }

    pub fn ctr(&self, args: &[&str]) -> Result<String> {
        sh(self.ctr_command().args(args))
    }

    /// `ctr images import` of the archive; returns the image names containerd lists.
    pub fn import(&self, archive: &Path) -> Result<Vec<String>> {
        self.ctr(&[
            "images",
            "import",
            "--snapshotter",
            "native",
            archive.to_str().unwrap(),
        ])?;
        Ok(self
            .ctr(&["images", "ls", "-q"])?
            .lines()
            .map(str::to_string)
            .collect())
    }

    /// Runs `args` in a new container of `image` and returns its output.
    pub fn run(&self, image: &str, env: &[&str], args: &[&str]) -> Result<String> {
        let mut cmd = self.ctr_command();
        cmd.args(["run", "--rm", "--snapshotter", "native"]);
        for e in env {
            cmd.args(["--env", e]);
        }
        cmd.arg(image).arg(unique("run")).args(args);
        sh(&mut cmd)
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Containers first (their shims are containerd's children of ours), then the daemon.
        if let Ok(tasks) = self.ctr(&["tasks", "ls", "-q"]) {
            for task in tasks.lines() {
                let _ = self.ctr(&["tasks", "kill", "-s", "SIGKILL", task]);
                std::thread::sleep(Duration::from_millis(200));
                let _ = self.ctr(&["tasks", "delete", "-f", task]);
                let _ = self.ctr(&["containers", "delete", task]);
            }
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.daemon.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.daemon.wait();
        unregister(&Created::Process(self.daemon.id()));
        let _ = std::fs::remove_dir_all(&self.dir);
        unregister(&Created::Dir(self.dir.clone()));
    }
}
