//! The one `sluice-agent` process on this machine (the benchmarks that read it run one cluster
//! node): its memory, its CPU time and how far it reports having programmed.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use sluice_tests::cluster::{behind, KubeNode};

/// The agent's resident set and its peak so far (VmRSS, VmHWM), in MiB.
pub fn memory(pid: u32) -> Result<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let mib = |field: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .map(|kib| kib / 1024.0)
            .with_context(|| format!("{field} in /proc/{pid}/status"))
    };
    Ok((mib("VmRSS:")?, mib("VmHWM:")?))
}

/// The agent's process: the one `sluice-agent` on this machine.
pub fn agent_pid() -> Result<u32> {
    match agent_processes()?[..] {
        [pid] => Ok(pid),
        ref pids => anyhow::bail!("expected one sluice-agent process, found {pids:?}"),
    }
}

/// The processes named `sluice-agent` on this machine (the benchmark runs one cluster node).
pub fn agent_processes() -> Result<Vec<u32>> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let Some(pid) = entry?.file_name().to_str().and_then(|p| p.parse().ok()) else {
            continue;
        };
        if std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .is_ok_and(|c| c.trim() == "sluice-agent")
        {
            pids.push(pid);
        }
    }
    Ok(pids)
}

/// The CPU time the process has used, user and system (`/proc/<pid>/stat`).
pub fn cpu_time(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may hold spaces and parentheses: the fields counted from the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // utime and stime are fields 14 and 15; the state (field 3) is the first after ')'.
    let ticks = |field: usize| -> Result<u64> {
        fields
            .get(field - 3)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("field {field} of /proc/{pid}/stat"))
    };
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(Duration::from_secs_f64(
        (ticks(14)? + ticks(15)?) as f64 / per_second,
    ))
}

/// Waits until `node`'s agent reports every kind programmed up to `target`; the time it took.
/// The report is read again when it was replaced, and every 20 ms besides: two rounds within
/// one tick of the file system's clock leave the same mtime, and a report seen by its mtime
/// alone would then wait for the agent's next round (minutes when nothing changes).
pub fn wait_reported(node: &KubeNode, target: &BTreeMap<String, u64>) -> Result<Duration> {
    let start = Instant::now();
    let mut seen = None;
    let mut read_at = start;
    loop {
        let written = std::fs::metadata(node.programmed_json()).and_then(|m| m.modified());
        if written.as_ref().ok() != seen.as_ref() || read_at.elapsed() > Duration::from_millis(20) {
            if behind(&node.programmed_revisions(), target).is_empty() {
                return Ok(start.elapsed());
            }
            seen = written.ok();
            read_at = Instant::now();
        }
        if start.elapsed() > Duration::from_secs(300) {
            bail!(
                "{} did not report {target:?} programmed within 300 s",
                node.name
            );
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}
