//! A node's cgroup: the same name under every cgroup v1 controller of this machine and in its
//! unified (v2) hierarchy, which has no controllers but is where cgroup BPF programs attach. The
//! kubelet puts the node's pods under it (`cgroupRoot`), and containerd runs in it, so its shims
//! do too: every process of a node can be found, and ended, through it, and the node's agent
//! attaches its socket program to it (the node's mount namespace shows it as the unified
//! hierarchy's root).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

const ROOT: &str = "/sys/fs/cgroup";

/// The hierarchies mounted here: each v1 controller's, and the unified one.
fn controllers() -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(ROOT) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.join("cgroup.procs").exists())
        .collect()
}

/// The node's cgroup in the unified hierarchy (`/sys/fs/cgroup/unified/NAME`), if this machine
/// mounts one.
pub fn unified(name: &str) -> Option<PathBuf> {
    let dir = Path::new(ROOT).join("unified");
    dir.join("cgroup.controllers")
        .exists()
        .then(|| dir.join(name))
}

pub fn create(name: &str) -> Result<()> {
    for controller in controllers() {
        let dir = controller.join(name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // A cpuset cgroup takes no process before it has CPUs and memory nodes.
        if controller.ends_with("cpuset") {
            for file in ["cpuset.cpus", "cpuset.mems"] {
                let parent = std::fs::read_to_string(controller.join(file))?;
                std::fs::write(dir.join(file), parent.trim())?;
            }
        }
    }
    Ok(())
}

/// Moves process `pid` into the cgroup under every controller.
pub fn join(name: &str, pid: u32) -> Result<()> {
    for controller in controllers() {
        let procs = controller.join(name).join("cgroup.procs");
        std::fs::write(&procs, pid.to_string())
            .with_context(|| format!("moving {pid} into {}", procs.display()))?;
    }
    Ok(())
}

/// Every process in the cgroup or below it (read from the pids controller).
pub fn processes(name: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    collect(&Path::new(ROOT).join("pids").join(name), &mut pids);
    pids
}

fn collect(dir: &Path, pids: &mut Vec<u32>) {
    if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        pids.extend(text.lines().filter_map(|l| l.parse::<u32>().ok()));
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.filter_map(|e| e.ok()) {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                collect(&entry.path(), pids);
            }
        }
    }
}

/// SIGKILLs every process in the cgroup until none is left (at most 5 s), then removes the
/// cgroup's directories, deepest first.
pub fn remove(name: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let pids = processes(name);
        if pids.is_empty() || std::time::Instant::now() > deadline {
            break;
        }
        for pid in pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    for controller in controllers() {
        remove_tree(&controller.join(name));
    }
}

fn remove_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.filter_map(|e| e.ok()) {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&entry.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}
