//! A cluster node: a network namespace on the lab switch, a mount namespace of its own and a
//! cgroup, running containerd (Debian's, with runc) and a kubelet that registers the Node.
//!
//! The mount namespace gives the node what a host gives its kubelet: its own `/run` (containerd's
//! socket and state, pod network namespaces, Sluice's CNI socket), `/var/lib` and `/var/log` (on
//! disk, in the node's directory), `/etc/cni/net.d` and `/opt/cni/bin` (where the chart's
//! install-cni puts Sluice's conflist and plugin, and this machine's `loopback` plugin that
//! containerd calls for every pod), and a bpffs of its own on `/sys/fs/bpf`. It also shows the
//! kubelet the kernel settings it insists on (`vm.overcommit_memory=1`, `kernel.panic=10`, ...)
//! as files bound over `/proc/sys`, so that it does not change this machine's.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result};
use nix::sched::CloneFlags;

use super::{cgroup, daemon::Daemon, kube_bin, pki::Pki, pki::Subject, API_URL};
use crate::{register, sh, unregister, Created, Netns};

/// The kernel settings the kubelet checks and would otherwise write (its `setupKernelTunables`),
/// with the values it wants.
const KUBELET_SYSCTLS: [(&str, &str); 4] = [
    ("vm/overcommit_memory", "1"),
    ("vm/panic_on_oom", "0"),
    ("kernel/panic", "10"),
    ("kernel/panic_on_oops", "1"),
];

/// containerd's CRI plugin as a kubelet of this release needs it. `restrict_oom_score_adj`:
/// this machine withholds CAP_SYS_RESOURCE even from root, so a container may not get a lower
/// OOM score than containerd's own (the kubelet asks -998 for pod sandboxes).
const CONTAINERD_CONFIG: &str = r#"version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
[grpc]
  address = "/run/containerd/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  restrict_oom_score_adj = true
  sandbox_image = "SANDBOX_IMAGE"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "native"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/opt/cni/bin"
    conf_dir = "/etc/cni/net.d"
"#;

pub struct KubeNode {
    pub name: String,
    pub ip: Ipv4Addr,
    pub kubelet: Daemon,
    pub containerd: Daemon,
    pub dir: PathBuf,
    /// The file the mount namespace is bound to.
    pub mount_ns: PathBuf,
    /// The file the UTS namespace is bound to: the node's hostname is its name, as a
    /// hostNetwork pod (and the upstream specs that ask one its hostname) expects.
    uts_ns: PathBuf,
    cgroup: String,
    pub ns: Netns,
}

impl KubeNode {
    /// Node `index` (`node-<index+1>` at 192.168.77.<index+1>): namespaces, containerd with
    /// `images` imported, and its kubelet started (registration is the caller's to wait for).
    pub fn start(
        index: usize,
        cluster_dir: &Path,
        mount_dir: &Path,
        pki: &Pki,
        switch: &Netns,
        images: &[PathBuf],
        sandbox_image: &str,
    ) -> Result<KubeNode> {
        let name = format!("node-{}", index + 1);
        let ip = Ipv4Addr::new(192, 168, 77, index as u8 + 1);
        let ns = Netns::new("skn")?;
        crate::lab::plug(switch, &format!("p{index}"), &ns, ip)?;
        let dir = cluster_dir.join(&name);
        for sub in ["var-lib", "var-log", "sysctl"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        pki.issue(&Subject {
            file: &name,
            group: Some("system:nodes"),
            name: &format!("system:node:{name}"),
            usage: "clientAuth,serverAuth",
            alt_names: &format!("IP:{ip},DNS:{name}"),
        })?;
        std::fs::write(
            dir.join("kubelet.kubeconfig"),
            pki.kubeconfig(API_URL, &name),
        )?;

        let mount_ns = mount_dir.join(&name);
        std::fs::write(&mount_ns, "")?;
        sh(Command::new("unshare")
            .arg(format!("--mount={}", mount_ns.display()))
            .args(["--propagation", "private", "true"]))
        .context("creating the node's mount namespace")?;
        register(Created::Mount(mount_ns.clone()));
        let uts_ns = mount_dir.join(format!("{name}.uts"));
        std::fs::write(&uts_ns, "")?;
        sh(Command::new("unshare")
            .arg(format!("--uts={}", uts_ns.display()))
            .args(["hostname", &name]))
        .context("creating the node's UTS namespace")?;
        register(Created::Mount(uts_ns.clone()));
        let cgroup = format!("sluice-lab-{}", ns.name);
        cgroup::create(&cgroup)?;
        register(Created::Cgroup(cgroup.clone()));
        let mut node = KubeNode {
            name,
            ip,
            // Placeholders until the daemons start (a `Daemon` without a process is inert).
            kubelet: Daemon::not_started("kubelet"),
            containerd: Daemon::not_started("containerd"),
            dir,
            mount_ns,
            uts_ns,
            cgroup,
            ns,
        };
        node.mount()?;
        node.start_containerd(sandbox_image)?;
        for image in images {
            node.ctr(&["images", "import", "--snapshotter", "native"])
                .arg(image)
                .output()
                .context("ctr images import")
                .and_then(|out| {
                    anyhow::ensure!(
                        out.status.success(),
                        "importing {}: {}",
                        image.display(),
                        String::from_utf8_lossy(&out.stderr)
                    );
                    Ok(())
                })?;
        }
        node.start_kubelet(pki)?;
        Ok(node)
    }

    /// Ends the node as a machine failure would: the kubelet first, so that it restarts
    /// nothing, then containerd, its shims and every container together, all with SIGKILL.
    pub fn crash(mut self) {
        self.kubelet.kill();
        cgroup::remove(&self.cgroup);
    }

    fn mount(&self) -> Result<()> {
        for (key, value) in KUBELET_SYSCTLS {
            std::fs::write(self.dir.join("sysctl").join(key.replace('/', ".")), value)?;
        }
        // Mount points the node's own directories cover (empty directories on this machine).
        for point in ["/etc/cni/net.d", "/opt"] {
            std::fs::create_dir_all(point)?;
        }
        let dir = self.dir.display();
        let mut script = format!(
            "mount -t tmpfs tmpfs /run\n\
             mkdir -p /run/netns\n\
             mount --bind {dir}/var-lib /var/lib\n\
             mount --bind {dir}/var-log /var/log\n\
             mount -t tmpfs tmpfs /etc/cni/net.d\n\
             mount -t tmpfs tmpfs /opt\n\
             mkdir -p /opt/cni/bin /var/lib/kubelet\n\
             cp /usr/lib/cni/loopback /opt/cni/bin/\n\
             mount -t bpf bpf /sys/fs/bpf\n"
        );
        // The node's own cgroup is the unified hierarchy its processes see (where the agent's
        // socket program attaches, as on a machine of its own).
        if let Some(unified) = cgroup::unified(&self.cgroup) {
            script += &format!(
                "mount --bind {} /sys/fs/cgroup/unified\n",
                unified.display()
            );
        }
        for (key, _) in KUBELET_SYSCTLS {
            script += &format!(
                "mount --bind {dir}/sysctl/{} /proc/sys/{key}\n",
                key.replace('/', ".")
            );
        }
        // Shared within the node (the kubelet's Bidirectional volumes, the agent's bpffs),
        // never with this machine: the namespace began private.
        script += "mount --make-rshared /\n";
        sh(Command::new("nsenter")
            .arg(format!("--mount={}", self.mount_ns.display()))
            .args(["sh", "-ec", &script]))
        .with_context(|| format!("mounting {}'s directories", self.name))?;
        Ok(())
    }

    fn namespaces(&self) -> Result<Vec<(PathBuf, CloneFlags)>> {
        Ok(vec![
            (self.ns.path(), CloneFlags::CLONE_NEWNET),
            (self.mount_ns.clone(), CloneFlags::CLONE_NEWNS),
            (self.uts_ns.clone(), CloneFlags::CLONE_NEWUTS),
        ])
    }

    /// A command run in the node's network, mount and UTS namespaces (as its own processes
    /// see the machine).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.ns.path().display()))
            .arg(format!("--mount={}", self.mount_ns.display()))
            .arg(format!("--uts={}", self.uts_ns.display()))
            .arg("--")
            .arg(program);
        cmd
    }

    /// `ctr` against the node's containerd, in the CRI's namespace.
    pub fn ctr(&self, args: &[&str]) -> Command {
        let mut cmd = self.command("ctr");
        cmd.args(["--namespace", "k8s.io"]).args(args);
        cmd
    }

    /// A path of the node's mount namespace, as this process can open it.
    pub fn path(&self, path: &str) -> Option<PathBuf> {
        let pid = self.containerd.pid()?;
        Some(PathBuf::from(format!("/proc/{pid}/root{path}")))
    }

    fn start_containerd(&mut self, sandbox_image: &str) -> Result<()> {
        let config = self.dir.join("containerd.toml");
        std::fs::write(
            &config,
            CONTAINERD_CONFIG.replace("SANDBOX_IMAGE", sandbox_image),
        )?;
        let mut cmd = Command::new("containerd");
        cmd.arg("--config").arg(&config);
        self.containerd = Daemon::spawn(
            &format!("containerd ({})", self.name),
            cmd,
            self.namespaces()?,
            self.dir.join("containerd.log"),
        )?;
        // Before its first request: the shims it starts, and their containers, stay in the
        // node's cgroup.
        cgroup::join(&self.cgroup, self.containerd.pid().expect("just started"))?;
        let socket = self
            .path("/run/containerd/containerd.sock")
            .expect("containerd runs");
        self.containerd
            .wait_until(Duration::from_secs(20), || socket.exists())
    }

    fn start_kubelet(&mut self, pki: &Pki) -> Result<()> {
        let p = |file: &str| pki.path(file).display().to_string();
        let config = format!(
            "apiVersion: kubelet.config.k8s.io/v1beta1\n\
             kind: KubeletConfiguration\n\
             authentication:\n  anonymous: {{enabled: false}}\n  webhook: {{enabled: true}}\n  \
             x509: {{clientCAFile: {ca}}}\n\
             authorization: {{mode: Webhook}}\n\
             address: {ip}\n\
             readOnlyPort: 0\n\
             healthzBindAddress: 127.0.0.1\n\
             tlsCertFile: {crt}\n\
             tlsPrivateKeyFile: {key}\n\
             cgroupDriver: cgroupfs\n\
             cgroupRoot: /{cgroup}\n\
             # This machine's cgroups are v1 (hybrid): allowed, though deprecated since 1.35.\n\
             failCgroupV1: false\n\
             failSwapOn: false\n\
             containerRuntimeEndpoint: unix:///run/containerd/containerd.sock\n\
             clusterDomain: cluster.local\n\
             clusterDNS: [{dns}]\n\
             serializeImagePulls: false\n\
             # Images are imported, never pulled: keep them and never evict for disk.\n\
             imageGCHighThresholdPercent: 100\n\
             evictionHard: {{memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%}}\n",
            ca = p("ca.crt"),
            ip = self.ip,
            crt = p(&format!("{}.crt", self.name)),
            key = p(&format!("{}.key", self.name)),
            cgroup = self.cgroup,
            dns = super::DNS_IP,
        );
        let path = self.dir.join("kubelet.yaml");
        std::fs::write(&path, config)?;
        let mut cmd = Command::new(kube_bin("kubelet"));
        cmd.arg("--config")
            .arg(&path)
            .arg("--kubeconfig")
            .arg(self.dir.join("kubelet.kubeconfig"))
            .args(["--hostname-override", &self.name])
            .args(["--node-ip", &self.ip.to_string()]);
        self.kubelet = Daemon::spawn(
            &format!("kubelet ({})", self.name),
            cmd,
            self.namespaces()?,
            self.dir.join("kubelet.log"),
        )?;
        Ok(())
    }
}

impl Drop for KubeNode {
    fn drop(&mut self) {
        self.kubelet.stop();
        self.containerd.stop();
        // Shims and containers outlive containerd: end them through the cgroup.
        cgroup::remove(&self.cgroup);
        unregister(&Created::Cgroup(self.cgroup.clone()));
        for ns in [&self.mount_ns, &self.uts_ns] {
            let _ = nix::mount::umount2(ns, nix::mount::MntFlags::MNT_DETACH);
            unregister(&Created::Mount(ns.clone()));
        }
    }
}
