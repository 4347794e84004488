//! The single-node lab: network namespaces for the node and its pods, the real agent process,
//! the real `sluice-cni` binary called the way a container runtime calls it, servers in pods and
//! TCP/UDP probes. Everything it creates is deleted when its guard drops, also on panic.

pub mod cluster;
pub mod containerd;
pub mod lab;
pub mod probe;
pub mod test_run;

use std::{
    fs::File,
    io::Write,
    os::{fd::AsFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use nix::sched::CloneFlags;
use sluice_agent::datapath::ebpf::Maps;

/// Fails loudly (never skips) when the tests cannot do what they exist for.
pub fn require_root() {
    // SAFETY: getuid has no preconditions.
    assert!(
        unsafe { libc::getuid() } == 0,
        "these tests need root (network namespaces, BPF): run them as root, as CI does"
    );
}

/// Where cargo put the workspace binaries (`target/debug` next to the test executable).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace binaries first (cargo xtask test does)",
        path.display()
    );
    path
}

/// What the lab created and has not removed yet, so a signal handler can remove it all when the
/// normal drop path will not run (Ctrl-C).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Created {
    Netns(String),
    /// A process we started (an agent, a controller), by PID.
    Process(u32),
    /// A cgroup (the same name under every v1 controller) whose processes are all ours: a
    /// cluster node's containerd, shims and containers.
    Cgroup(String),
    /// A mount point (a mount namespace's file, a bind mount) to unmount.
    Mount(PathBuf),
    Dir(PathBuf),
}

static CREATED: std::sync::Mutex<Vec<Created>> = std::sync::Mutex::new(Vec::new());

pub(crate) fn register(item: Created) {
    CREATED.lock().unwrap_or_else(|e| e.into_inner()).push(item);
}

pub(crate) fn unregister(item: &Created) {
    CREATED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|i| i != item);
}

/// Removes everything still registered: agents first (by PID, ours only), then namespaces and
/// directories. For signal handlers; the normal path is dropping the guards.
pub fn emergency_cleanup() {
    let items = std::mem::take(&mut *CREATED.lock().unwrap_or_else(|e| e.into_inner()));
    for item in &items {
        if let Created::Process(pid) = item {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    for item in &items {
        if let Created::Cgroup(name) = item {
            cluster::cgroup::remove(name);
        }
    }
    for item in items.iter().rev() {
        match item {
            Created::Netns(name) => {
                let _ = Command::new("ip").args(["netns", "del", name]).status();
            }
            Created::Mount(path) => {
                let _ = nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH);
            }
            Created::Dir(path) => {
                let _ = std::fs::remove_dir_all(path);
            }
            Created::Process(_) | Created::Cgroup(_) => {}
        }
    }
}

/// A name unique to this process and call, short enough for interface and namespace names.
pub fn unique(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}{}-{}",
        std::process::id() % 100_000,
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A network namespace created by the test and deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Result<Netns> {
        let name = unique(prefix);
        sh(Command::new("ip").args(["netns", "add", &name]))?;
        register(Created::Netns(name.clone()));
        let ns = Netns { name };
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// Runs a command inside the namespace and returns its stdout.
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        sh(Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args))
    }

    /// Runs `f` on a thread inside the namespace.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        in_netns(&self.path(), f)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

pub fn in_netns<T: Send + 'static>(path: &Path, f: impl FnOnce() -> T + Send + 'static) -> T {
    let file = File::open(path).expect("open netns");
    std::thread::spawn(move || {
        nix::sched::setns(file.as_fd(), CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .expect("netns thread panicked")
}

pub fn sh(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Spawns `cmd` in the network namespace `netns` is open on (and the caller's mount namespace).
pub(crate) fn spawn_in(cmd: &mut Command, netns: File) -> std::io::Result<Child> {
    spawn_in_namespaces(cmd, vec![(netns, CloneFlags::CLONE_NEWNET)])
}

/// Spawns `cmd` after joining each namespace (in order) that the files are open on.
pub(crate) fn spawn_in_namespaces(
    cmd: &mut Command,
    namespaces: Vec<(File, CloneFlags)>,
) -> std::io::Result<Child> {
    // SAFETY: only async-signal-safe work (setns) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            for (file, kind) in &namespaces {
                nix::sched::setns(file.as_fd(), *kind).map_err(std::io::Error::from)?;
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// A node: its namespace, its agent process, its state and bpffs directories.
pub struct Node {
    pub ns: Netns,
    pub dir: PathBuf,
    pub bpffs: PathBuf,
    /// Config lines beyond the paths (YAML).
    config: String,
    env: Vec<(String, String)>,
    agent: Option<Child>,
    runner: Runner,
}

/// How a node's agent runs.
#[derive(Clone, Debug)]
pub enum Runner {
    /// The workspace's debug binary, as a process of ours.
    Process,
    /// The release image under containerd (`ctr run` in the foreground, so that our child
    /// process stands for the container and signals to it are forwarded).
    Image { containerd: PathBuf, image: String },
}

impl Node {
    /// A standalone node (no Kubernetes). `attach_mode`: `auto`, `tcx` or `netlink` (the forced
    /// pre-6.6 clsact path).
    pub fn start(pod_cidr: &str, attach_mode: &str) -> Result<Node> {
        let config = format!("podCIDR: {pod_cidr}\ntcAttachMode: {attach_mode}\n");
        Node::start_in(Netns::new("sln")?, config, Vec::new())
    }

    /// A node in an existing namespace, with extra config lines and agent environment.
    pub fn start_in(ns: Netns, config: String, env: Vec<(String, String)>) -> Result<Node> {
        Node::start_with(ns, config, env, Runner::Process)
    }

    /// A node whose agent runs as `runner` says.
    pub fn start_with(
        ns: Netns,
        config: String,
        env: Vec<(String, String)>,
        runner: Runner,
    ) -> Result<Node> {
        let dir = std::env::temp_dir().join(&ns.name);
        let bpffs = PathBuf::from("/sys/fs/bpf/sluice").join(&ns.name);
        std::fs::create_dir_all(&dir)?;
        register(Created::Dir(dir.clone()));
        register(Created::Dir(bpffs.clone()));
        let mut node = Node {
            ns,
            dir,
            bpffs,
            config,
            env,
            agent: None,
            runner,
        };
        std::fs::write(node.config_path(), node.config_file())?;
        node.start_agent()?;
        Ok(node)
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("agent.yaml")
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("run/cni.sock")
    }

    fn config_file(&self) -> String {
        format!(
            "datapath: ebpf\n{}bpffsDir: {}\nstateDir: {}\ncniSocket: {}\n",
            self.config,
            self.bpffs.display(),
            self.dir.join("state").display(),
            self.socket().display()
        )
    }

    /// Starts the agent in the node's network namespace (and the host's mount namespace, so its
    /// pins live on the real bpffs), and waits for its CNI socket.
    pub fn start_agent(&mut self) -> Result<()> {
        let netns = File::open(self.ns.path())?;
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.dir.join("agent.log"))?;
        let _ = std::fs::remove_file(self.socket());
        let mut cmd = self.agent_command();
        cmd.stdout(log.try_clone()?).stderr(log);
        let mut child = spawn_in(&mut cmd, netns).context("starting sluice-agent")?;
        // With Kubernetes the agent first lists every watched kind and waits for its podCIDR.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.socket().exists() {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "sluice-agent exited ({status}) before serving:\n{}",
                    self.agent_log()
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!(
                    "sluice-agent did not open its CNI socket within 30 s:\n{}",
                    self.agent_log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        register(Created::Process(child.id()));
        self.agent = Some(child);
        Ok(())
    }

    fn agent_command(&self) -> Command {
        let mut env: Vec<(String, String)> = self.env.clone();
        env.push(("RUST_LOG".into(), "info".into()));
        match &self.runner {
            Runner::Process => {
                let mut cmd = Command::new(bin("sluice-agent"));
                cmd.arg("--config").arg(self.config_path()).envs(env);
                cmd
            }
            Runner::Image { containerd, image } => {
                // The node's paths mean the same inside: its directory, the bpffs, the pods'
                // network namespaces (rslave: namespaces created later appear too).
                let bind = |path: &Path, propagation: &str| {
                    format!(
                        "type=bind,src={0},dst={0},options=rbind:rw:{propagation}",
                        path.display()
                    )
                };
                let mut cmd = Command::new("ctr");
                cmd.arg("--address")
                    .arg(containerd)
                    .args(["--namespace", "sluice-tests", "run", "--rm"])
                    .args(["--snapshotter", "native", "--privileged"])
                    .arg("--with-ns")
                    .arg(format!("network:{}", self.ns.path().display()))
                    .args(["--mount", &bind(&self.dir, "rprivate")])
                    .args(["--mount", &bind(Path::new("/sys/fs/bpf"), "rslave")])
                    .args(["--mount", &bind(Path::new("/run/netns"), "rslave")]);
                for (k, v) in env {
                    cmd.arg("--env").arg(format!("{k}={v}"));
                }
                cmd.arg(image)
                    .arg(&self.ns.name)
                    .arg("sluice-agent")
                    .arg("--config")
                    .arg(self.config_path());
                cmd
            }
        }
    }

    /// SIGKILL: the agent gets no chance to clean up, as in a crash or OOM kill.
    pub fn kill_agent(&mut self) {
        if let Runner::Image { containerd, .. } = &self.runner {
            // Killing `ctr` would leave the container running.
            let _ = Command::new("ctr")
                .arg("--address")
                .arg(containerd)
                .args([
                    "--namespace",
                    "sluice-tests",
                    "tasks",
                    "kill",
                    "-s",
                    "SIGKILL",
                ])
                .arg(&self.ns.name)
                .status();
        }
        if let Some(mut child) = self.agent.take() {
            let _ = child.kill();
            let _ = child.wait();
            unregister(&Created::Process(child.id()));
        }
    }

    /// The agent's process id, while it runs.
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(Child::id)
    }

    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    pub fn maps(&self) -> Maps {
        Maps::from_pins(&self.bpffs).expect("open the node's pinned maps")
    }

    /// Calls the real plugin binary as a runtime would: CNI_* environment, config on stdin.
    pub fn cni(&self, command: &str, container_id: &str, netns: &str, ifname: &str) -> CniOutput {
        self.cni_with_args(command, container_id, netns, ifname, "")
    }

    /// A CNI call with `CNI_ARGS` (the kubelet's runtime passes `K8S_POD_NAMESPACE=…;K8S_POD_NAME=…`).
    pub fn cni_with_args(
        &self,
        command: &str,
        container_id: &str,
        netns: &str,
        ifname: &str,
        args: &str,
    ) -> CniOutput {
        let conf = format!(
            r#"{{"cniVersion":"1.0.0","name":"sluice","type":"sluice-cni","socket":"{}"}}"#,
            self.socket().display()
        );
        cni_call(
            &[
                ("CNI_COMMAND", command),
                ("CNI_CONTAINERID", container_id),
                ("CNI_NETNS", netns),
                ("CNI_IFNAME", ifname),
                ("CNI_PATH", "/opt/cni/bin"),
                ("CNI_ARGS", args),
            ],
            conf.as_bytes(),
        )
    }

    /// A pod: its namespace plus a CNI ADD. Panics with the plugin's output on failure.
    pub fn add_pod(&self, name: &str) -> Pod {
        let ns = Netns::new("slp").expect("pod netns");
        let container_id = format!("{}-{name}", ns.name);
        let out = self.cni("ADD", &container_id, ns.path().to_str().unwrap(), "eth0");
        assert_eq!(out.code, 0, "CNI ADD for {name} failed: {}", out.stdout);
        let result: serde_json::Value =
            serde_json::from_str(&out.stdout).expect("ADD result is JSON");
        let address = result["ips"][0]["address"]
            .as_str()
            .expect("ADD result has an address");
        let ip = address.split('/').next().unwrap().parse().unwrap();
        Pod {
            name: name.into(),
            ns,
            container_id,
            ip,
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.agent.take() {
            // SIGTERM: the agent's orderly exit.
            let _ = Command::new("kill").arg(child.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
            unregister(&Created::Process(child.id()));
        }
        let _ = std::fs::remove_dir_all(&self.bpffs);
        let _ = std::fs::remove_dir_all(&self.dir);
        unregister(&Created::Dir(self.bpffs.clone()));
        unregister(&Created::Dir(self.dir.clone()));
    }
}

pub struct Pod {
    pub name: String,
    pub ns: Netns,
    pub container_id: String,
    pub ip: std::net::Ipv4Addr,
}

#[derive(Debug)]
pub struct CniOutput {
    pub code: i32,
    pub stdout: String,
}

impl CniOutput {
    /// The spec's error JSON: (code, msg).
    pub fn error(&self) -> (u64, String) {
        let v: serde_json::Value = serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.stdout));
        (
            v["code"].as_u64().expect("error code"),
            v["msg"].as_str().expect("error msg").to_string(),
        )
    }
}

pub fn cni_call(env: &[(&str, &str)], stdin: &[u8]) -> CniOutput {
    let mut child = Command::new(bin("sluice-cni"))
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run sluice-cni");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin)
        .expect("write stdin");
    let out = child.wait_with_output().expect("wait sluice-cni");
    CniOutput {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).trim().to_string(),
    }
}
