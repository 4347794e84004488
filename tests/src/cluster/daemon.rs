//! A long-running process of the cluster (etcd, a control-plane component, containerd, a
//! kubelet): spawned in its namespaces with its output in a log file, ended on drop — SIGTERM,
//! then SIGKILL if it has not exited within 10 s.

use std::{
    fs::File,
    path::PathBuf,
    process::{Child, Command},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use nix::{
    sched::CloneFlags,
    sys::signal::{kill, Signal},
    unistd::Pid,
};

use crate::{register, spawn_in_namespaces, unregister, Created};

pub struct Daemon {
    pub name: String,
    pub log: PathBuf,
    child: Option<Child>,
    /// How to start it again: program, arguments, namespaces.
    program: PathBuf,
    args: Vec<std::ffi::OsString>,
    namespaces: Vec<(PathBuf, CloneFlags)>,
}

impl Daemon {
    /// Starts `cmd` in the namespaces at those paths (joined in order), its output appended
    /// to `log`.
    pub fn spawn(
        name: &str,
        cmd: Command,
        namespaces: Vec<(PathBuf, CloneFlags)>,
        log: PathBuf,
    ) -> Result<Daemon> {
        let mut daemon = Daemon {
            name: name.to_string(),
            log,
            child: None,
            program: PathBuf::from(cmd.get_program()),
            args: cmd.get_args().map(ToOwned::to_owned).collect(),
            namespaces,
        };
        daemon.start()?;
        Ok(daemon)
    }

    fn start(&mut self) -> Result<()> {
        let out = File::options().create(true).append(true).open(&self.log)?;
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args).stdout(out.try_clone()?).stderr(out);
        let namespaces = self
            .namespaces
            .iter()
            .map(|(path, kind)| Ok((File::open(path)?, *kind)))
            .collect::<Result<Vec<_>>>()?;
        let child = spawn_in_namespaces(&mut cmd, namespaces)
            .with_context(|| format!("starting {} ({cmd:?})", self.name))?;
        register(Created::Process(child.id()));
        self.child = Some(child);
        Ok(())
    }

    /// Stops it (SIGTERM), waits `downtime`, starts it again as before.
    pub fn restart(&mut self, downtime: Duration) -> Result<()> {
        self.stop();
        std::thread::sleep(downtime);
        self.start()
    }

    /// A process not started yet: inert (no PID, nothing to stop).
    pub fn not_started(name: &str) -> Daemon {
        Daemon {
            name: name.to_string(),
            log: PathBuf::new(),
            child: None,
            program: PathBuf::new(),
            args: Vec::new(),
            namespaces: Vec::new(),
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Fails, with its log, if it has exited.
    pub fn check(&mut self) -> Result<()> {
        if let Some(status) = self
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
        {
            bail!("{} exited ({status}):\n{}", self.name, self.log_tail(30));
        }
        Ok(())
    }

    /// Waits until `ready` holds, failing early if the process exits.
    pub fn wait_until(&mut self, timeout: Duration, mut ready: impl FnMut() -> bool) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while !ready() {
            self.check()?;
            if Instant::now() > deadline {
                bail!(
                    "{} was not ready within {timeout:?}:\n{}",
                    self.name,
                    self.log_tail(30)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    pub fn stop(&mut self) {
        self.signal_and_wait(Signal::SIGTERM, Duration::from_secs(10));
    }

    /// SIGKILL: no chance to clean up, as in a crash.
    pub fn kill(&mut self) {
        self.signal_and_wait(Signal::SIGKILL, Duration::from_secs(10));
    }

    fn signal_and_wait(&mut self, signal: Signal, grace: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = Pid::from_raw(child.id() as i32);
        let _ = kill(pid, signal);
        let deadline = Instant::now() + grace;
        while child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = kill(pid, Signal::SIGKILL);
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        unregister(&Created::Process(child.id()));
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}
