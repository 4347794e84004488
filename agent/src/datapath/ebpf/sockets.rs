//! `sock_connect4` on the node's cgroup: the node's own sockets connecting to a NodePort on one
//! of its addresses go over loopback, where no TC program sees them, so they are balanced when
//! they connect. The program acts only on sockets of the agent's network namespace (the node's),
//! known by its cookie in NODE_CONFIG.

use std::{
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    programs::{
        links::{FdLink, PinnedLink},
        CgroupAttachMode, CgroupSockAddr,
    },
    Ebpf,
};
use sluice_common::program_names;
use tracing::warn;

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// The cgroup v2 hierarchy at `dir`, or at `dir/unified` where the machine mounts v1
/// controllers there and v2 beside them (systemd's hybrid layout).
pub fn resolve_cgroup(dir: &Path) -> Result<PathBuf> {
    let is_v2 = |p: &Path| {
        nix::sys::statfs::statfs(p).is_ok_and(|s| s.filesystem_type().0 == CGROUP2_SUPER_MAGIC)
    };
    let unified = dir.join("unified");
    if is_v2(dir) {
        Ok(dir.to_path_buf())
    } else if is_v2(&unified) {
        Ok(unified)
    } else {
        bail!(
            "field `cgroupDir`: value {:?} is invalid: neither it nor {} is a cgroup v2 \
             mount (the node's own NodePorts need cgroup v2)",
            dir.display().to_string(),
            unified.display()
        )
    }
}

/// The cookie of the calling thread's network namespace (`SO_NETNS_COOKIE`, Linux 5.14). None
/// where the kernel has no such option: the node's own NodePorts are then not balanced.
pub fn netns_cookie() -> Option<u64> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").ok()?;
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid socket and an out-buffer of the length passed.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        warn!(
            error = %std::io::Error::last_os_error(),
            "the kernel gives no network namespace cookie (SO_NETNS_COOKIE, Linux 5.14): the \
             node reaching its own NodePorts over loopback is not load-balanced"
        );
        return None;
    }
    Some(cookie)
}

/// Attaches `sock_connect4` to `cgroup` and pins the link at `pin`. A previous agent's link is
/// released only once the new one is attached, so no connect goes unbalanced meanwhile (for that
/// instant both run; the second sees an endpoint address, which is no frontend).
pub fn attach_connect4(bpf: &mut Ebpf, cgroup: &Path, pin: &Path) -> Result<()> {
    let program: &mut CgroupSockAddr = bpf
        .program_mut(program_names::SOCK_CONNECT4)
        .ok_or_else(|| {
            anyhow!(
                "the eBPF object has no program {}",
                program_names::SOCK_CONNECT4
            )
        })?
        .try_into()?;
    program.load().with_context(|| {
        format!(
            "loading program {} (verifier)",
            program_names::SOCK_CONNECT4
        )
    })?;
    let dir = std::fs::File::open(cgroup)
        .with_context(|| format!("opening the cgroup {}", cgroup.display()))?;
    // As a bpf_link (Linux 5.7) the attachment is always one of many, and the kernel refuses
    // any flag.
    let id = program
        .attach(&dir, CgroupAttachMode::Single)
        .with_context(|| {
            format!(
                "attaching {} to {}",
                program_names::SOCK_CONNECT4,
                cgroup.display()
            )
        })?;
    let link: FdLink = program.take_link(id)?.try_into()?;
    if let Ok(old) = PinnedLink::from_pin(pin) {
        old.unpin()
            .with_context(|| format!("unpinning {}", pin.display()))?;
    }
    link.pin(pin)
        .with_context(|| format!("pinning the cgroup link at {}", pin.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_without_cgroup_v2_is_refused_naming_the_field() {
        let dir = std::env::temp_dir();
        let error = resolve_cgroup(&dir).unwrap_err().to_string();
        assert!(error.starts_with("field `cgroupDir`"), "{error}");
        assert!(
            error.contains(&format!("{:?}", dir.display().to_string())),
            "{error}"
        );
        assert!(error.contains("cgroup v2"), "{error}");
    }
}
