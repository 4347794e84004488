//! `sluicectl install-cni`, the agent pod's init container: puts `sluice-cni` into the host's CNI
//! bin dir and then the network config into its conf dir. The binary goes first, since a runtime
//! that sees the config may call the plugin at once (cri-o watches the conf dir); each file is
//! written beside its target and renamed over it, so a runtime never reads half of one.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};

pub struct Install<'a> {
    pub plugin: &'a Path,
    pub conflist: &'a Path,
    pub bin_dir: &'a Path,
    pub conf_dir: &'a Path,
}

/// The config is checked before anything is written: a broken one must not replace a working
/// one on the host.
fn check_conflist(path: &Path, text: &str) -> Result<()> {
    let value: serde_json::Value = serde_json::from_str(text)
        .with_context(|| format!("{}: not a JSON network config list", path.display()))?;
    for field in ["cniVersion", "name"] {
        if !value[field].is_string() {
            bail!("{}: field `{field}` must be a string", path.display());
        }
    }
    let names_plugin = value["plugins"]
        .as_array()
        .is_some_and(|p| p.iter().any(|p| p["type"] == "sluice-cni"));
    if !names_plugin {
        bail!(
            "{}: field `plugins` must hold a plugin of type \"sluice-cni\"",
            path.display()
        );
    }
    Ok(())
}

fn replace(target: &Path, contents: &[u8], mode: u32) -> Result<()> {
    let staging = target.with_file_name(format!(
        ".{}.tmp",
        target.file_name().expect("a file name").to_string_lossy()
    ));
    fs::write(&staging, contents).with_context(|| format!("writing {}", staging.display()))?;
    fs::set_permissions(&staging, fs::Permissions::from_mode(mode))?;
    fs::rename(&staging, target).with_context(|| format!("installing {}", target.display()))
}

/// Installs both files; returns where they went. Older Sluice configs in the conf dir (other
/// names for the same network) are removed, since a runtime uses the first config it finds.
pub fn install(paths: &Install) -> Result<(PathBuf, PathBuf)> {
    let conflist = fs::read_to_string(paths.conflist)
        .with_context(|| format!("reading {}", paths.conflist.display()))?;
    check_conflist(paths.conflist, &conflist)?;
    let binary =
        fs::read(paths.plugin).with_context(|| format!("reading {}", paths.plugin.display()))?;
    let name = |p: &Path| {
        p.file_name()
            .map(|n| n.to_owned())
            .context("a path with a file name")
    };
    let plugin_target = paths.bin_dir.join(name(paths.plugin)?);
    replace(&plugin_target, &binary, 0o755)?;
    let conf_target = paths.conf_dir.join(name(paths.conflist)?);
    replace(&conf_target, conflist.as_bytes(), 0o644)?;
    for entry in fs::read_dir(paths.conf_dir)? {
        let path = entry?.path();
        let file = path.file_name().unwrap_or_default().to_string_lossy();
        let config = file.ends_with(".conf") || file.ends_with(".conflist");
        if config && file.contains("sluice") && path != conf_target {
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    Ok((plugin_target, conf_target))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dirs {
        root: PathBuf,
    }

    impl Dirs {
        fn new(name: &str) -> Dirs {
            let root =
                std::env::temp_dir().join(format!("sluice-install-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&root);
            for d in ["src", "bin", "conf"] {
                fs::create_dir_all(root.join(d)).unwrap();
            }
            fs::write(root.join("src/sluice-cni"), b"\x7fELF plugin").unwrap();
            Dirs { root }
        }

        fn install(&self, conflist: &str) -> Result<(PathBuf, PathBuf)> {
            let path = self.root.join("src/10-sluice.conflist");
            fs::write(&path, conflist).unwrap();
            install(&Install {
                plugin: &self.root.join("src/sluice-cni"),
                conflist: &path,
                bin_dir: &self.root.join("bin"),
                conf_dir: &self.root.join("conf"),
            })
        }
    }

    impl Drop for Dirs {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.root);
        }
    }

    const GOOD: &str = include_str!("../../../deploy/10-sluice.conflist");

    #[test]
    fn installs_the_plugin_executable_and_the_config_and_drops_stale_ones() {
        let dirs = Dirs::new("ok");
        fs::write(dirs.root.join("conf/05-sluice.conf"), "{}").unwrap();
        fs::write(dirs.root.join("conf/20-other.conflist"), "{}").unwrap();
        let (plugin, conf) = dirs.install(GOOD).unwrap();
        assert_eq!(fs::read(&plugin).unwrap(), b"\x7fELF plugin");
        assert_eq!(
            fs::metadata(&plugin).unwrap().permissions().mode() & 0o777,
            0o755
        );
        assert_eq!(fs::read_to_string(&conf).unwrap(), GOOD);
        let mut left: Vec<String> = fs::read_dir(dirs.root.join("conf"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["10-sluice.conflist", "20-other.conflist"]);
    }

    #[test]
    fn a_broken_config_replaces_nothing() {
        let dirs = Dirs::new("bad");
        dirs.install(GOOD).unwrap();
        for (conflist, says) in [
            ("{", "not a JSON network config list"),
            (r#"{"cniVersion": "1.0.0", "plugins": []}"#, "field `name`"),
            (
                r#"{"cniVersion": "1.0.0", "name": "x", "plugins": [{"type": "bridge"}]}"#,
                "field `plugins`",
            ),
        ] {
            let e = dirs.install(conflist).unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
        }
        let kept = fs::read_to_string(dirs.root.join("conf/10-sluice.conflist")).unwrap();
        assert_eq!(kept, GOOD);
    }
}
