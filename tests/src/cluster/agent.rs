//! The agent on a cluster node as an operator reaches it (its log, `sluicectl` in its
//! container) and as the datapath suites look under it: its pinned maps, read from the node's
//! mount namespace, and the pods' sandboxes found through containerd before the API knows them.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use ipnetwork::IpNetwork;
use sluice_agent::datapath::ebpf::Maps;
use sluice_common::HAIRPIN_IPV4;

use super::{Cluster, KubeNode};

/// What the suites wait on: `programmed.json`, which the agent rewrites every round.
#[derive(serde::Deserialize)]
struct Reported {
    #[serde(rename = "programmedResourceVersions")]
    programmed: BTreeMap<String, u64>,
}

/// The watched kinds, as the agent names them, with their API resource.
pub(crate) const WATCHED: [(&str, &str); 6] = [
    ("Node", "nodes"),
    ("Namespace", "namespaces"),
    ("Pod", "pods"),
    ("Service", "services"),
    ("EndpointSlice", "endpointslices"),
    ("NetworkPolicy", "networkpolicies"),
];

fn programmed_revisions(programmed_json: &std::path::Path) -> BTreeMap<String, u64> {
    let programmed = std::fs::read(programmed_json).unwrap_or_default();
    serde_json::from_slice::<Reported>(&programmed)
        .map_or_else(|_| BTreeMap::new(), |r| r.programmed)
}

/// The kinds whose `targets` revision is above what `reported` says programmed, as
/// "Pod at 12 of 15".
pub fn behind(reported: &BTreeMap<String, u64>, targets: &BTreeMap<String, u64>) -> Vec<String> {
    targets
        .iter()
        .filter(|(kind, target)| reported.get(*kind).copied().unwrap_or(0) < **target)
        .map(|(kind, target)| {
            let at = reported.get(kind).copied().unwrap_or(0);
            format!("{kind} at {at} of {target}")
        })
        .collect()
}

/// Where the chart's agent pins its maps, on the node (`bpffsDir`'s default).
const BPFFS_DIR: &str = "/sys/fs/bpf/sluice";

impl KubeNode {
    /// The datapath's pinned maps on this node.
    pub fn maps(&self) -> Result<Maps> {
        Maps::from_pins(&self.bpffs()?)
    }

    /// The node's bpffs directory of Sluice's pins, as this process opens it.
    pub fn bpffs(&self) -> Result<PathBuf> {
        self.path(BPFFS_DIR)
            .context("the node's containerd is not running")
    }

    /// What the agent reports programmed (`programmed.json` in its state directory, `/var/lib/sluice`
    /// on the node): the newest resourceVersion of each kind; empty before its first report.
    pub fn programmed_revisions(&self) -> BTreeMap<String, u64> {
        programmed_revisions(&self.programmed_json())
    }

    /// The agent's report of how far it has programmed, as this process opens it.
    pub fn programmed_json(&self) -> PathBuf {
        self.dir.join("var-lib/sluice/programmed.json")
    }

    /// The routes the agent owns on this node other than the two every node has for Services
    /// (the Service CIDR and the hairpin address, through the gateway): other nodes' pod
    /// CIDRs. An error when one of those two is missing.
    pub fn pod_cidr_routes(&self) -> Result<BTreeSet<IpNetwork>> {
        let routes = self
            .ns
            .exec(&["ip", "-o", "route", "show", "proto", "200"])?;
        let mut routed: BTreeSet<IpNetwork> = routes
            .lines()
            .filter_map(|l| l.split_whitespace().next()?.parse().ok())
            .collect();
        let hairpin = IpNetwork::new(IpAddr::V4(Ipv4Addr::from(HAIRPIN_IPV4)), 32)?;
        let services: IpNetwork = super::SERVICE_CIDR.parse()?;
        for (route, what) in [
            (services, "the Service CIDR"),
            (hairpin, "the hairpin address"),
        ] {
            if !routed.remove(&route) {
                bail!("{}: no route to {what} {route}", self.name);
            }
        }
        Ok(routed)
    }

    /// The network namespace and address of pod `ns/name`'s sandbox, read off containerd and
    /// the namespace itself: what the pod has once CNI ADD returned, whether or not the kubelet
    /// has written it to the API yet.
    pub fn sandbox(&self, ns: &str, name: &str) -> Result<(PathBuf, Ipv4Addr)> {
        let filter = format!(
            "labels.\"io.kubernetes.pod.namespace\"=={ns},labels.\"io.kubernetes.pod.name\"=={name}"
        );
        let ids = crate::sh(&mut self.ctr(&["containers", "ls", "-q", &filter]))?;
        let tasks = crate::sh(&mut self.ctr(&["tasks", "ls"]))?;
        // TASK  PID  STATUS
        let pid = tasks
            .lines()
            .skip(1)
            .filter_map(|line| {
                let mut fields = line.split_whitespace();
                Some((fields.next()?, fields.next()?, fields.next()?))
            })
            .find(|(id, _, status)| *status == "RUNNING" && ids.lines().any(|i| i == *id))
            .map(|(_, pid, _)| pid.to_string())
            .with_context(|| format!("no running sandbox of pod {ns}/{name} on {}", self.name))?;
        let netns = PathBuf::from(format!("/proc/{pid}/ns/net"));
        let out = crate::sh(
            std::process::Command::new("nsenter")
                .arg(format!("--net={}", netns.display()))
                .args(["ip", "-4", "-o", "addr", "show", "dev", "eth0"]),
        )?;
        // 2: eth0    inet 10.244.0.5/24 brd ...
        let ip = out
            .split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)
            .and_then(|cidr| cidr.split('/').next()?.parse().ok())
            .with_context(|| format!("pod {ns}/{name} has no IPv4 address on eth0: {out}"))?;
        Ok((netns, ip))
    }
}

impl Cluster {
    fn agent_pod_name(&self, node: &str) -> Result<String> {
        let pod = self.agent_pod(node)?;
        pod["metadata"]["name"]
            .as_str()
            .map(str::to_string)
            .with_context(|| format!("no agent pod on {node}"))
    }

    /// The log of the agent's running container on `node`.
    pub fn agent_log(&self, node: &str) -> Result<String> {
        let pod = self.agent_pod_name(node)?;
        self.kubectl(&["-n", "kube-system", "logs", &pod, "-c", "sluice-agent"])
    }

    /// `sluicectl` in the agent's container on `node`, as an operator runs it.
    pub fn sluicectl(&self, node: &str, args: &[&str]) -> Result<String> {
        let pod = self.agent_pod_name(node)?;
        let mut command = vec![
            "-n",
            "kube-system",
            "exec",
            &pod,
            "-c",
            "sluice-agent",
            "--",
            "sluicectl",
        ];
        command.extend_from_slice(args);
        self.kubectl(&command)
    }

    /// How often the kubelet has restarted the agent's container on `node`.
    pub fn agent_restarts(&self, node: &str) -> Result<u64> {
        let pod = self.agent_pod(node)?;
        pod["status"]["containerStatuses"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["name"] == "sluice-agent")
            .and_then(|c| c["restartCount"].as_u64())
            .with_context(|| format!("no agent container status on {node}"))
    }

    /// SIGKILLs the agent on `node` and waits until the kubelet has restarted it and it is
    /// ready again (the first restart comes at once; a second within the kubelet's 10 s
    /// back-off).
    pub fn restart_agent(&self, node: &str, timeout: Duration) -> Result<()> {
        let before = self.agent_restarts(node)?;
        self.kill_agent(node)?;
        let deadline = Instant::now() + timeout;
        loop {
            let pod = self.agent_pod(node)?;
            if self.agent_restarts(node)? > before && super::condition(&pod, "Ready") {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the agent on {node} was not back within {timeout:?}\n{}",
                    self.diagnose()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `helm upgrade` keeping the values installed, with `values` (YAML) on top.
    pub fn helm_upgrade(&self, values: &str) -> Result<()> {
        let file = self.dir.join("upgrade-values.yaml");
        std::fs::write(&file, values)?;
        let mut helm = self.helm("upgrade");
        helm.arg("--reuse-values").arg("-f").arg(&file);
        crate::sh(&mut helm).context("helm upgrade of deploy/chart/sluice")?;
        Ok(())
    }

    /// Waits until the agent DaemonSet's rollout has replaced the agent pod on `node` with one
    /// of its current revision, and that pod is ready.
    pub fn wait_agent_rolled(&self, node: &str, timeout: Duration) -> Result<()> {
        let before = self.agent_pod_name(node)?;
        let deadline = Instant::now() + timeout;
        loop {
            let pod = self.agent_pod(node)?;
            let name = pod["metadata"]["name"].as_str().unwrap_or_default();
            if !name.is_empty() && name != before && super::condition(&pod, "Ready") {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the agent on {node} was not rolled within {timeout:?}\n{}",
                    self.diagnose()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}
