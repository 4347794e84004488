//! `sluice-controller` replicas in the lab, configured as the chart configures them: the
//! `controller.yaml` that `helm template` renders from a values file, plus the lab's kubeconfig.
//! They run in the switch namespace, beside the API server, with the pod name and namespace the
//! chart gives them through the environment.

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Command},
};

use anyhow::{bail, Context, Result};

use crate::{bin, register, spawn_in, unregister, Created, Netns};

pub struct Controller {
    /// The pod name it runs as, which is its Lease identity.
    pub identity: String,
    log: PathBuf,
    child: Option<Child>,
}

/// The chart's `controller.yaml` for `values` (a values file), from `helm template`.
pub fn render_config(values: &Path) -> Result<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let helm = root.join("target/tools/bin/helm");
    let out = Command::new(&helm)
        .args(["template", "sluice"])
        .arg(root.join("deploy/chart/sluice"))
        .args(["--show-only", "templates/configmap.yaml", "-f"])
        .arg(values)
        .output()
        .with_context(|| format!("running {} (cargo xtask setup installs it)", helm.display()))?;
    if !out.status.success() {
        bail!(
            "helm template with {}: {}",
            values.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let map: serde_yaml::Value = serde_yaml::from_slice(&out.stdout)?;
    map["data"]["controller.yaml"]
        .as_str()
        .map(str::to_string)
        .context("the chart's ConfigMap has no controller.yaml")
}

impl Controller {
    /// Starts replica `index` with the chart's `config`, the lab's kubeconfig and `extra`
    /// settings (YAML lines replacing the chart's keys of the same name).
    pub fn start(
        dir: &Path,
        switch: &Netns,
        config: &str,
        kubeconfig: &Path,
        extra: &str,
        index: usize,
    ) -> Result<Controller> {
        let identity = format!("sluice-controller-{index}");
        let own: Vec<String> = std::iter::once(format!("kubeconfig: {}", kubeconfig.display()))
            .chain(std::iter::once(format!(
                "healthAddress: 127.0.0.1:{}",
                9422 + index
            )))
            .chain(extra.lines().map(str::to_string))
            .collect();
        let key = |line: &str| line.split(':').next().unwrap_or_default().to_string();
        let replaced: Vec<String> = own.iter().map(|l| key(l)).collect();
        let mut lines: Vec<String> = config
            .lines()
            .filter(|l| !replaced.contains(&key(l)))
            .map(str::to_string)
            .collect();
        lines.extend(own);
        let path = dir.join(format!("{identity}.yaml"));
        std::fs::write(&path, lines.join("\n") + "\n")?;
        let log = dir.join(format!("{identity}.log"));
        let out = File::options().create(true).append(true).open(&log)?;
        let mut cmd = Command::new(bin("sluice-controller"));
        cmd.arg("--config")
            .arg(&path)
            .env("POD_NAME", &identity)
            .env("POD_NAMESPACE", "default")
            .env("RUST_LOG", "info")
            .stdout(out.try_clone()?)
            .stderr(out);
        let child =
            spawn_in(&mut cmd, File::open(switch.path())?).context("starting sluice-controller")?;
        register(Created::Process(child.id()));
        Ok(Controller {
            identity,
            log,
            child: Some(child),
        })
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// SIGKILL: no chance to give the Lease up, as in a node failure.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            unregister(&Created::Process(child.id()));
        }
    }

    /// SIGTERM, as on a rollout: the replica gives the Lease up before it exits.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = child.wait();
            unregister(&Created::Process(child.id()));
        }
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.kill();
    }
}
