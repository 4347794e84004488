//! A real Kubernetes cluster on one machine, built from source by `cargo xtask setup` (see
//! docs/lab.md): etcd, kube-apiserver, kube-controller-manager and kube-scheduler in the lab
//! namespace beside the switch; on every node a kubelet with containerd in a network, mount and
//! cgroup namespace of its own; Sluice installed with `helm install` of `deploy/chart/sluice`,
//! its DaemonSet and controller running from the image `cargo xtask image` built, imported into
//! each node's containerd with the pause and agnhost images. Everything is ended and removed when
//! the `Cluster` drops.

mod agent;
mod api_proxy;
pub mod cgroup;
mod client;
pub mod conformance;
mod control_plane;
pub mod cyclonus;
mod daemon;
mod node;
mod pki;
pub mod probes;
mod services;

pub use agent::behind;
pub use client::AdminClient;

/// The Service CIDR kube-apiserver allocates ClusterIPs from (the chart's `serviceCIDR` in
/// `lab-values.yaml`).
pub const SERVICE_CIDR: &str = "10.96.0.0/16";

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::Value;

pub use api_proxy::ApiProxy;
pub use control_plane::{ControlPlane, ControllerManager};
pub use daemon::Daemon;
pub use node::KubeNode;
pub use pki::Pki;

use crate::{register, require_root, unregister, Created, Netns};

pub const API_URL: &str = "https://192.168.77.254:6443";
/// The lab's own values for the chart: its network, as a platform team's values file gives it.
const LAB_VALUES: &str = include_str!("lab-values.yaml");
/// CoreDNS behind the kube-dns Service, as kubeadm installs it.
const COREDNS: &str = include_str!("coredns.yaml");
/// The kube-dns Service's cluster IP: the kubelets' `clusterDNS`.
pub const DNS_IP: &str = "10.96.0.10";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A binary of the lab's Kubernetes build (`target/kubernetes/bin`).
pub fn kube_bin(name: &str) -> PathBuf {
    let path = root().join("target/kubernetes/bin").join(name);
    assert!(
        path.exists(),
        "{} is missing: cargo xtask setup builds the lab's Kubernetes",
        path.display()
    );
    path
}

/// An image archive of the lab's Kubernetes build (`pause`, `agnhost`).
fn kube_image(name: &str) -> PathBuf {
    let path = root().join(format!("target/kubernetes/images/{name}.oci.tar"));
    assert!(
        path.exists(),
        "{} is missing: cargo xtask setup builds it",
        path.display()
    );
    path
}

/// The agnhost image the release's e2e tests run (built by `cargo xtask setup`).
pub fn agnhost_image() -> String {
    image_name(&kube_image("agnhost")).expect("the agnhost archive names its image")
}

/// The name an image archive's index gives its image.
fn image_name(archive: &Path) -> Result<String> {
    let out = crate::sh(
        Command::new("tar")
            .arg("-xOf")
            .arg(archive)
            .arg("./index.json"),
    )?;
    let index: Value = serde_json::from_str(&out)?;
    index["manifests"][0]["annotations"]["io.containerd.image.name"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("{} names no image", archive.display()))
}

#[derive(Clone, Debug)]
pub struct ClusterOptions {
    pub nodes: usize,
    /// A values file for the chart, after the lab's own (`lab-values.yaml`).
    pub values: Option<PathBuf>,
    /// Values given inline (a test's), after the file.
    pub inline_values: Option<String>,
    pub controller_manager: ControllerManager,
}

impl ClusterOptions {
    pub fn nodes(nodes: usize) -> ClusterOptions {
        ClusterOptions {
            nodes,
            values: None,
            inline_values: None,
            controller_manager: ControllerManager::default(),
        }
    }

    /// The chart's values for `encap`, after the inline values set so far.
    pub fn with_encap(mut self, encap: crate::lab::Encap) -> ClusterOptions {
        let mut values = self.inline_values.take().unwrap_or_default();
        values.push_str(encap.config());
        self.inline_values = Some(values);
        self
    }
}

/// Fields drop in order: nodes (their pods with them), the control plane, then the namespaces.
pub struct Cluster {
    pub nodes: Vec<KubeNode>,
    pub control_plane: ControlPlane,
    pub pki: Pki,
    pub dir: PathBuf,
    /// A private bind mount holding the nodes' mount-namespace files.
    mount_dir: PathBuf,
    pub external: Netns,
    pub switch: Netns,
    /// How long `up` took to "all nodes Ready, Sluice running".
    pub startup: Duration,
    /// Nodes started so far, crashed ones included: a node joining later never takes the name
    /// or address of one whose Node object may still be in the API.
    joined: usize,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.nodes.clear();
        self.control_plane.scheduler.stop();
        self.control_plane.controller_manager.stop();
        self.control_plane.apiserver.stop();
        self.control_plane.etcd.stop();
        let _ = nix::mount::umount2(&self.mount_dir, nix::mount::MntFlags::MNT_DETACH);
        unregister(&Created::Mount(self.mount_dir.clone()));
        let _ = std::fs::remove_dir_all(&self.dir);
        unregister(&Created::Dir(self.dir.clone()));
    }
}

impl Cluster {
    /// The control plane, `options.nodes` nodes, Sluice installed by its chart; returns once
    /// every node is Ready and every Sluice pod runs and is ready.
    pub fn up(options: ClusterOptions) -> Result<Cluster> {
        require_root();
        let started = Instant::now();
        let (switch, external) = crate::lab::switch()?;
        let dir = std::env::temp_dir().join(&switch.name);
        std::fs::create_dir_all(&dir)?;
        register(Created::Dir(dir.clone()));
        // Mount-namespace files must sit on a private mount (as `ip netns` does for /run/netns).
        let mount_dir = dir.join("mount-namespaces");
        std::fs::create_dir_all(&mount_dir)?;
        crate::sh(
            Command::new("mount")
                .arg("--bind")
                .arg(&mount_dir)
                .arg(&mount_dir),
        )?;
        register(Created::Mount(mount_dir.clone()));
        crate::sh(Command::new("mount").arg("--make-private").arg(&mount_dir))?;

        let pki = Pki::create(&dir.join("pki"))?;
        let control_plane = ControlPlane::start(
            &dir,
            &pki,
            &switch,
            SERVICE_CIDR,
            &options.controller_manager,
        )?;
        let mut cluster = Cluster {
            nodes: Vec::new(),
            control_plane,
            pki,
            dir,
            mount_dir,
            external,
            switch,
            startup: Duration::ZERO,
            joined: 0,
        };
        for _ in 0..options.nodes {
            cluster.start_node()?;
        }
        if options.controller_manager.cluster_cidr.is_some() {
            // kubeadm's order: the control plane allocates podCIDRs before a CNI is applied, so
            // Sluice's controller finds them taken.
            cluster.wait_for(
                "kube-controller-manager's podCIDRs on every node",
                Duration::from_secs(60),
                || {
                    let nodes = cluster.get(&["nodes"])?;
                    let items = nodes["items"].as_array().cloned().unwrap_or_default();
                    Ok(items.len() == cluster.nodes.len()
                        && items.iter().all(|n| n["spec"]["podCIDR"].is_string()))
                },
            )?;
        }
        let coredns = kube_image("coredns");
        cluster.apply(&COREDNS.replace("COREDNS_IMAGE", &image_name(&coredns)?))?;
        cluster.install_sluice(options.values.as_deref(), options.inline_values.as_deref())?;
        cluster.wait_ready(Duration::from_secs(120))?;
        cluster.startup = started.elapsed();
        eprintln!(
            "cluster up: {} nodes Ready, Sluice running, in {:.1} s",
            options.nodes,
            cluster.startup.as_secs_f64()
        );
        Ok(cluster)
    }

    /// The admin's kubeconfig (client certificate in `system:masters`); its server is the
    /// switch address, reachable from the lab namespace and the nodes.
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("admin.kubeconfig")
    }

    /// A relay from this machine's loopback to the API server, and the admin kubeconfig that
    /// uses it: `kubectl` and `helm` on the host reach the cluster with it.
    pub fn host_access(&self) -> Result<(ApiProxy, String)> {
        let proxy = ApiProxy::start(self.switch.path())?;
        let kubeconfig = self
            .pki
            .kubeconfig(&format!("https://127.0.0.1:{}", proxy.port), "admin");
        Ok((proxy, kubeconfig))
    }

    /// `kubectl` as the cluster admin, from the lab namespace.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        control_plane::kubectl_in(&self.switch, &self.kubeconfig(), args)
    }

    /// `kubectl apply -f -` of `manifest` (YAML).
    pub fn apply(&self, manifest: &str) -> Result<String> {
        self.kubectl_with_input(&["apply", "-f", "-"], manifest)
    }

    pub fn kubectl_with_input(&self, args: &[&str], input: &str) -> Result<String> {
        use std::io::Write;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.switch.name])
            .arg(kube_bin("kubectl"))
            .arg("--kubeconfig")
            .arg(self.kubeconfig())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(input.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "kubectl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `kubectl get ... -o json`, parsed.
    pub fn get(&self, args: &[&str]) -> Result<Value> {
        let mut all = vec!["get"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["-o", "json"]);
        Ok(serde_json::from_str(&self.kubectl(&all)?)?)
    }

    /// Stops kube-apiserver (watches break, requests are refused), waits `downtime`, starts it
    /// again on the same etcd, and waits until it is ready.
    pub fn restart_apiserver(&mut self, downtime: Duration) -> Result<()> {
        self.control_plane.apiserver.restart(downtime)?;
        let (switch, admin) = (&self.switch, self.kubeconfig());
        self.control_plane
            .apiserver
            .wait_until(Duration::from_secs(60), || {
                control_plane::kubectl_in(switch, &admin, &["get", "--raw", "/readyz"]).is_ok()
            })
    }

    /// Compacts etcd's history up to its current revision (through etcd's JSON gateway), so a
    /// watch resumed from before it gets 410 Gone once the API server's watch cache is rebuilt.
    /// Returns the revision.
    pub fn compact_etcd(&self) -> Result<u64> {
        let etcd = |path: &str, body: &str| -> Result<Value> {
            let out = self.switch.exec(&[
                "curl",
                "-s",
                "-m",
                "5",
                "-X",
                "POST",
                &format!("http://127.0.0.1:2379{path}"),
                "-d",
                body,
            ])?;
            Ok(serde_json::from_str(&out)?)
        };
        // Any range answers with the store's revision in its header ("Lw==" is "/").
        let header = etcd("/v3/kv/range", r#"{"key": "Lw=="}"#)?;
        let revision: u64 = header["header"]["revision"]
            .as_str()
            .and_then(|r| r.parse().ok())
            .with_context(|| format!("etcd answered {header}"))?;
        etcd(
            "/v3/kv/compaction",
            &format!(r#"{{"revision": "{revision}", "physical": true}}"#),
        )?;
        Ok(revision)
    }

    /// The agent's pod on `node`, as stored.
    pub fn agent_pod(&self, node: &str) -> Result<Value> {
        let pods = self.get(&[
            "pods",
            "-n",
            "kube-system",
            "-l",
            "app.kubernetes.io/component=agent",
            "--field-selector",
            &format!("spec.nodeName={node}"),
        ])?;
        Ok(pods["items"][0].clone())
    }

    /// SIGKILLs the agent's container on `node` (found through the kubelet's pod status), as
    /// an OOM kill or a crash would; the kubelet restarts it.
    pub fn kill_agent(&self, node: &str) -> Result<()> {
        self.kill_container(&self.agent_pod(node)?, "sluice-agent")
    }

    /// SIGKILLs `container` of `pod` (as stored) on its node, through containerd: a crash,
    /// with no chance to clean up; the kubelet restarts it.
    pub fn kill_container(&self, pod: &Value, container: &str) -> Result<()> {
        self.container_task(pod, container, &["kill", "--signal", "SIGKILL"])
    }

    /// Runs `ctr tasks <verb> <id>` on the task of `container` of `pod` (as stored), on its
    /// node: `kill`, or `pause`/`resume` (the cgroup freezer: the process keeps its sockets
    /// and reads nothing from them meanwhile).
    pub fn container_task(&self, pod: &Value, container: &str, verb: &[&str]) -> Result<()> {
        let (node, id) = self.container(pod, container)?;
        let mut args = vec!["tasks"];
        args.extend_from_slice(verb);
        args.push(&id);
        crate::sh(&mut node.ctr(&args))?;
        Ok(())
    }

    /// The node running `container` of `pod` (as stored), and the container's ID there.
    fn container(&self, pod: &Value, container: &str) -> Result<(&KubeNode, String)> {
        let name = &pod["metadata"]["name"];
        let id = pod["status"]["containerStatuses"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["name"] == container)
            .and_then(|c| c["containerID"].as_str()?.strip_prefix("containerd://"))
            .with_context(|| format!("no running {container} container in pod {name}"))?
            .to_string();
        let on = pod["spec"]["nodeName"].as_str().unwrap_or_default();
        let node = self
            .node(on)
            .with_context(|| format!("pod {name} is on {on:?}, not a running node"))?;
        Ok((node, id))
    }

    /// Starts the next node (`node-<n>`): its containerd with the lab's images and its kubelet,
    /// which registers the Node; returns its name without waiting for it.
    pub fn start_node(&mut self) -> Result<String> {
        let pause = kube_image("pause");
        let images = [
            pause.clone(),
            kube_image("agnhost"),
            kube_image("coredns"),
            crate::containerd::image_archive(),
            crate::containerd::lab_pod_archive(),
        ];
        let node = KubeNode::start(
            self.joined,
            &self.dir,
            &self.mount_dir,
            &self.pki,
            &self.switch,
            &images,
            &image_name(&pause)?,
        )?;
        self.joined += 1;
        let name = node.name.clone();
        self.nodes.push(node);
        Ok(name)
    }

    /// A machine joining the running cluster: starts the next node and waits until it is
    /// Ready with its kube-system pods (Sluice's agent) ready. Returns its name.
    pub fn add_node(&mut self, timeout: Duration) -> Result<String> {
        let name = self.start_node()?;
        self.wait_node_ready(&name, timeout)?;
        Ok(name)
    }

    /// Waits until Node `name` is Ready and every kube-system pod on it (one agent at least)
    /// runs with all containers ready. Other nodes are not looked at: Node objects without a
    /// kubelet, or crashed nodes, never become Ready.
    pub fn wait_node_ready(&mut self, name: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let nodes = self.get(&["nodes"])?;
            self.route_pod_cidrs(&nodes)?;
            let mut pending = Vec::new();
            let node = nodes["items"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|n| n["metadata"]["name"] == name);
            match node {
                None => pending.push(format!("{name} not registered")),
                Some(node) if !condition(node, "Ready") => {
                    pending.push(format!("{name} not Ready"))
                }
                Some(_) => {}
            }
            let pods = self.get(&[
                "pods",
                "-n",
                "kube-system",
                "--field-selector",
                &format!("spec.nodeName={name}"),
            ])?;
            let pods = pods["items"].as_array().cloned().unwrap_or_default();
            if !pods
                .iter()
                .any(|p| p["metadata"]["labels"]["app.kubernetes.io/component"] == "agent")
            {
                pending.push(format!("no agent pod on {name}"));
            }
            for pod in pods.iter().filter(|p| !condition(p, "Ready")) {
                pending.push(format!(
                    "pod {} {}",
                    pod["metadata"]["name"], pod["status"]["phase"]
                ));
            }
            if pending.is_empty() {
                return Ok(());
            }
            if let Some(node) = self.nodes.iter_mut().find(|n| n.name == name) {
                node.kubelet.check()?;
                node.containerd.check()?;
            }
            if Instant::now() > deadline {
                bail!(
                    "{name} was not ready within {timeout:?}: {}\n{}",
                    pending.join("; "),
                    self.diagnose()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The machine of node `name` fails: its kubelet, containerd and every container on it are
    /// SIGKILLed at once (no pod is stopped gracefully), and its namespaces go. Its Node object
    /// and pods stay in the API, as after a real machine failure, until someone deletes them.
    pub fn crash_node(&mut self, name: &str) -> Result<()> {
        let index = self
            .nodes
            .iter()
            .position(|n| n.name == name)
            .with_context(|| format!("no running node {name}"))?;
        self.nodes.remove(index).crash();
        Ok(())
    }

    /// The API server's version (`/version`'s gitVersion), e.g. `v1.35.4`.
    pub fn server_version(&self) -> Result<String> {
        let version: Value = serde_json::from_str(&self.kubectl(&["get", "--raw", "/version"])?)?;
        version["gitVersion"]
            .as_str()
            .map(str::to_string)
            .context("/version has no gitVersion")
    }

    /// `helm VERB sluice deploy/chart/sluice` as the cluster admin, from the lab namespace.
    pub fn helm(&self, verb: &str) -> Command {
        let mut helm = Command::new("ip");
        helm.args(["netns", "exec", &self.switch.name])
            .arg(root().join("target/tools/bin/helm"))
            .args([verb, "sluice"])
            .arg(root().join("deploy/chart/sluice"))
            .args(["--namespace", "kube-system", "--kubeconfig"])
            .arg(self.kubeconfig());
        helm
    }

    fn install_sluice(&self, values: Option<&Path>, inline: Option<&str>) -> Result<()> {
        let lab_values = self.dir.join("lab-values.yaml");
        std::fs::write(&lab_values, LAB_VALUES)?;
        let mut helm = self.helm("install");
        helm.arg("-f").arg(&lab_values);
        if let Some(values) = values {
            helm.arg("-f").arg(values);
        }
        if let Some(inline) = inline {
            let file = self.dir.join("inline-values.yaml");
            std::fs::write(&file, inline)?;
            helm.arg("-f").arg(file);
        }
        crate::sh(&mut helm).context("helm install of deploy/chart/sluice")?;
        Ok(())
    }

    /// Waits until every node is Ready and every pod in kube-system runs with all containers
    /// ready; on timeout the error says what was not, with the pods' and kubelets' state.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let pending = self.not_ready()?;
            if pending.is_empty() {
                return Ok(());
            }
            for node in &mut self.nodes {
                node.kubelet.check()?;
                node.containerd.check()?;
            }
            if Instant::now() > deadline {
                bail!(
                    "the cluster was not ready within {timeout:?}: {}\n{}",
                    pending.join("; "),
                    self.diagnose()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn not_ready(&self) -> Result<Vec<String>> {
        let mut pending = Vec::new();
        let nodes = self.get(&["nodes"])?;
        self.route_pod_cidrs(&nodes)?;
        let registered = nodes["items"].as_array().map_or(0, Vec::len);
        if registered < self.nodes.len() {
            pending.push(format!(
                "{registered} of {} nodes registered",
                self.nodes.len()
            ));
        }
        for node in nodes["items"].as_array().into_iter().flatten() {
            if !condition(node, "Ready") {
                pending.push(format!("{} not Ready", node["metadata"]["name"]));
            }
        }
        let pods = self.get(&["pods", "-n", "kube-system"])?;
        let agents = pods["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["metadata"]["labels"]["app.kubernetes.io/component"] == "agent")
            .count();
        if agents < self.nodes.len() {
            pending.push(format!("{agents} of {} agent pods", self.nodes.len()));
        }
        for pod in pods["items"].as_array().into_iter().flatten() {
            if !condition(pod, "Ready") {
                pending.push(format!(
                    "pod {} {}",
                    pod["metadata"]["name"], pod["status"]["phase"]
                ));
            }
        }
        Ok(pending)
    }

    /// Routes each node's podCIDRs from the lab namespace through that node, as a cluster's
    /// network does for its control plane (the API server dials pods: its proxy, webhooks):
    /// a kubeadm control-plane node runs the CNI itself; here the route table plays it.
    fn route_pod_cidrs(&self, nodes: &Value) -> Result<()> {
        for node in nodes["items"].as_array().into_iter().flatten() {
            let name = node["metadata"]["name"].as_str().unwrap_or_default();
            let Some(lab_node) = self.node(name) else {
                continue;
            };
            for cidr in node["spec"]["podCIDRs"].as_array().into_iter().flatten() {
                let Some(cidr) = cidr.as_str().filter(|c| !c.contains(':')) else {
                    continue;
                };
                self.switch.exec(&[
                    "ip",
                    "route",
                    "replace",
                    cidr,
                    "via",
                    &lab_node.ip.to_string(),
                ])?;
            }
        }
        Ok(())
    }

    /// Pods, recent events and each kubelet's last errors: what an operator would look at.
    pub fn diagnose(&self) -> String {
        let mut out = String::new();
        for args in [
            &["get", "pods", "-A", "-o", "wide"][..],
            &["get", "events", "-A", "--sort-by=.lastTimestamp"][..],
        ] {
            out += &format!("$ kubectl {}\n", args.join(" "));
            out += &self.kubectl(args).unwrap_or_else(|e| format!("{e:#}\n"));
        }
        for node in &self.nodes {
            let log = std::fs::read_to_string(&node.kubelet.log).unwrap_or_default();
            let errors: Vec<&str> = log.lines().filter(|l| l.starts_with('E')).collect();
            out += &format!(
                "{} kubelet errors (last 10):\n{}\n",
                node.name,
                errors[errors.len().saturating_sub(10)..].join("\n")
            );
        }
        out
    }

    pub fn node(&self, name: &str) -> Option<&KubeNode> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// Waits until `ready` returns true (checked every 200 ms), or fails naming `what`.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        mut ready: impl FnMut() -> Result<bool>,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        loop {
            match ready() {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => last = Some(e),
            }
            if Instant::now() > deadline {
                bail!(
                    "{what}: not within {timeout:?}{}\n{}",
                    last.map(|e| format!(" (last error: {e:#})"))
                        .unwrap_or_default(),
                    self.diagnose()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Whether `object` has condition `kind` with status True.
pub fn condition(object: &Value, kind: &str) -> bool {
    object["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == kind && c["status"] == "True")
}
