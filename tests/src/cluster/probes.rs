//! The lab's probes on the real cluster: the matrix and Service probes. Manifests go in with
//! `kubectl apply`; each Pod is
//! made to run the lab's pod server (`sluice-lab-pod`, one container serving TCP and UDP on the
//! probed ports and every containerPort, named ports kept) and, unless it names a node, is
//! spread round robin with a node selector. Probes start inside the source pod's network
//! namespace, reached through its container's process, exactly as the embedded lab probes.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::{
    agent::{behind, WATCHED},
    condition, Cluster,
};
use crate::lab::{
    report::{probe_pairs, Probe, Protocol},
    services::{ServiceProbes, Source},
};

/// The image `cargo xtask image` builds from `tests/pod`.
pub fn pod_image() -> String {
    format!(
        "docker.io/library/sluice-lab-pod:{}",
        env!("CARGO_PKG_VERSION")
    )
}

/// Namespaces the lab's probes leave out (Sluice's and Kubernetes' own pods).
const SYSTEM: [&str; 3] = ["kube-system", "kube-public", "kube-node-lease"];

/// `pod` (a Pod manifest) running the lab's pod server on `ports` and its containerPorts, on
/// `node` unless it names one.
pub fn run_pod_server(pod: &mut Value, ports: &[u16], node: &str) {
    let declared: Vec<Value> = pod["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|c| c["ports"].as_array().cloned().unwrap_or_default())
        .collect();
    let mut served: BTreeSet<u16> = ports.iter().copied().collect();
    served.extend(
        declared
            .iter()
            .filter_map(|p| p["containerPort"].as_u64().map(|p| p as u16)),
    );
    let field = |path: &str| json!({"valueFrom": {"fieldRef": {"fieldPath": path}}});
    let mut name = field("metadata.name");
    name["name"] = json!("POD_NAME");
    let mut namespace = field("metadata.namespace");
    namespace["name"] = json!("POD_NAMESPACE");
    pod["spec"]["containers"] = json!([{
        "name": "server",
        "image": pod_image(),
        "imagePullPolicy": "IfNotPresent",
        "args": served.iter().map(u16::to_string).collect::<Vec<_>>(),
        "ports": declared,
        "env": [name, namespace],
    }]);
    let spec = &mut pod["spec"];
    if !spec["nodeName"].is_string() && !spec["nodeSelector"].is_object() {
        spec["nodeSelector"] = json!({"kubernetes.io/hostname": node});
    }
    // The server answers at once; a pod is done when it is deleted.
    spec["terminationGracePeriodSeconds"] = json!(1);
}

impl Cluster {
    /// Applies manifests (Namespaces first), Pods made to run the lab's pod server.
    pub fn apply_lab_manifests(&self, objects: Vec<Value>, ports: &[u16]) -> Result<()> {
        let nodes: Vec<String> = self.nodes.iter().map(|n| n.name.clone()).collect();
        let mut scheduled = self.lab_pods()?.len();
        let (namespaces, others): (Vec<Value>, Vec<Value>) =
            objects.into_iter().partition(|o| o["kind"] == "Namespace");
        let mut items = namespaces;
        for mut obj in others {
            if obj["kind"] == "Pod" {
                run_pod_server(&mut obj, ports, &nodes[scheduled % nodes.len()]);
                scheduled += 1;
            }
            items.push(obj);
        }
        let list = json!({"apiVersion": "v1", "kind": "List", "items": items});
        self.kubectl_with_input(&["apply", "-f", "-"], &list.to_string())?;
        Ok(())
    }

    /// The pods outside the system namespaces.
    fn lab_pods(&self) -> Result<Vec<Value>> {
        let pods = self.get(&["pods", "-A"])?;
        Ok(pods["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| !SYSTEM.contains(&p["metadata"]["namespace"].as_str().unwrap_or("")))
            .cloned()
            .collect())
    }

    /// Waits until every lab pod is Ready with an address and every agent reports the API's
    /// current objects programmed (`programmed.json` in its state directory, `/var/lib/sluice` on the
    /// node).
    pub fn wait_programmed(&self, timeout: Duration) -> Result<()> {
        self.wait_settled(timeout, true)
    }

    /// Waits until every agent reports the API's current objects programmed, whatever the
    /// pods' state: after a node went away, its pods stay not Ready.
    pub fn wait_agents_programmed(&self, timeout: Duration) -> Result<()> {
        self.wait_settled(timeout, false)
    }

    fn wait_settled(&self, timeout: Duration, pods_ready: bool) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let pending = self.unprogrammed(pods_ready)?;
            if pending.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the cluster did not settle within {timeout:?}: {}\n{}",
                    pending.join("; "),
                    self.diagnose()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn unprogrammed(&self, pods_ready: bool) -> Result<Vec<String>> {
        let mut pending: Vec<String> = self
            .lab_pods()?
            .iter()
            .filter(|p| pods_ready && (!condition(p, "Ready") || !p["status"]["podIP"].is_string()))
            .map(|p| format!("pod {} not Ready", key(p)))
            .collect();
        let targets = self.revisions()?;
        for node in &self.nodes {
            let late = behind(&node.programmed_revisions(), &targets);
            if !late.is_empty() {
                pending.push(format!("{}: programmed {}", node.name, late.join(", ")));
            }
        }
        Ok(pending)
    }

    /// The API's newest resourceVersion of each kind the agents watch: what an agent has
    /// programmed once it reports these.
    pub fn revisions(&self) -> Result<BTreeMap<String, u64>> {
        let resources: Vec<&str> = WATCHED.iter().map(|(_, r)| *r).collect();
        let objects = self.get(&[&resources.join(","), "-A"])?;
        let mut targets: BTreeMap<String, u64> = BTreeMap::new();
        for obj in objects["items"].as_array().into_iter().flatten() {
            let (Some(kind), Some(version)) = (
                obj["kind"].as_str(),
                obj["metadata"]["resourceVersion"]
                    .as_str()
                    .and_then(|v| v.parse::<u64>().ok()),
            ) else {
                continue;
            };
            let newest = targets.entry(kind.to_string()).or_default();
            *newest = (*newest).max(version);
        }
        Ok(targets)
    }

    /// Every running container's process, by container ID, on every node.
    fn container_processes(&self) -> Result<BTreeMap<String, String>> {
        let mut processes = BTreeMap::new();
        for node in &self.nodes {
            let out = crate::sh(&mut node.ctr(&["tasks", "ls"]))?;
            // TASK  PID  STATUS
            for line in out.lines().skip(1) {
                let mut fields = line.split_whitespace();
                if let (Some(id), Some(pid)) = (fields.next(), fields.next()) {
                    processes.insert(id.to_string(), pid.to_string());
                }
            }
        }
        Ok(processes)
    }

    /// A pod's network namespace, through its first container's process.
    fn pod_netns(pod: &Value, processes: &BTreeMap<String, String>) -> Result<PathBuf> {
        let container = pod["status"]["containerStatuses"][0]["containerID"]
            .as_str()
            .and_then(|id| id.strip_prefix("containerd://"))
            .with_context(|| format!("pod {} runs no container", key(pod)))?;
        let pid = processes
            .get(container)
            .with_context(|| format!("no task for pod {}'s container", key(pod)))?;
        Ok(PathBuf::from(format!("/proc/{pid}/ns/net")))
    }

    /// Every lab pod as a probe source (`ns/name`, its network namespace) and target
    /// (`ns/name`, its address).
    #[allow(clippy::type_complexity)]
    pub fn probe_endpoints(&self) -> Result<(Vec<(String, PathBuf)>, Vec<(String, Ipv4Addr)>)> {
        let processes = self.container_processes()?;
        let (mut sources, mut targets) = (Vec::new(), Vec::new());
        for pod in self.lab_pods()? {
            let ip: Ipv4Addr = pod["status"]["podIP"]
                .as_str()
                .and_then(|ip| ip.parse().ok())
                .with_context(|| format!("pod {} has no IPv4 address", key(&pod)))?;
            sources.push((key(&pod), Cluster::pod_netns(&pod, &processes)?));
            targets.push((key(&pod), ip));
        }
        Ok((sources, targets))
    }

    /// Each lab pod's network namespace and address: the pods of namespace `ns` by name, or,
    /// without `ns`, every lab pod by `ns/name`.
    pub fn pod_addresses(&self, ns: Option<&str>) -> Result<BTreeMap<String, (PathBuf, Ipv4Addr)>> {
        let (sources, targets) = self.probe_endpoints()?;
        let targets: BTreeMap<String, Ipv4Addr> = targets.into_iter().collect();
        Ok(sources
            .into_iter()
            .filter_map(|(key, netns)| {
                let ip = targets[&key];
                let name = match ns {
                    Some(ns) => key.strip_prefix(&format!("{ns}/"))?.to_string(),
                    None => key,
                };
                Some((name, (netns, ip)))
            })
            .collect())
    }

    /// Every ordered pair of lab pods on each port and protocol.
    pub fn probe_all(
        &self,
        ports: &[u16],
        protocols: &[Protocol],
        timeout: Duration,
    ) -> Result<Vec<Probe>> {
        let (sources, targets) = self.probe_endpoints()?;
        Ok(probe_pairs(sources, targets, ports, protocols, timeout))
    }
}

impl ServiceProbes for Cluster {
    fn service(&self, ns: &str, name: &str) -> Result<Value> {
        self.get(&["service", name, "-n", ns])
    }

    fn pods_in(&self, ns: &str) -> Result<Vec<Value>> {
        Ok(self.get(&["pods", "-n", ns])?["items"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    fn running_pods(&self) -> Result<Vec<String>> {
        let mut running: Vec<String> = self
            .lab_pods()?
            .iter()
            .filter(|p| p["status"]["phase"] == "Running")
            .map(key)
            .collect();
        running.sort();
        Ok(running)
    }

    fn node_ip(&self, node: &str) -> Result<Ipv4Addr> {
        self.node(node)
            .map(|n| n.ip)
            .with_context(|| format!("no cluster node {node}"))
    }

    fn netns_of(&self, source: &Source) -> Result<PathBuf> {
        match source {
            Source::Pod(wanted) => {
                let pod = self
                    .lab_pods()?
                    .into_iter()
                    .find(|p| key(p) == *wanted)
                    .with_context(|| format!("no running pod {wanted}"))?;
                Cluster::pod_netns(&pod, &self.container_processes()?)
            }
            Source::Node(name) => self
                .node(name)
                .map(|n| n.ns.path())
                .with_context(|| format!("no cluster node {name}")),
            Source::External => Ok(self.external.path()),
        }
    }

    fn external_netns(&self) -> PathBuf {
        self.external.path()
    }

    fn settle(&self, timeout: Duration) -> Result<()> {
        self.wait_programmed(timeout)
    }
}

fn key(pod: &Value) -> String {
    format!(
        "{}/{}",
        pod["metadata"]["namespace"].as_str().unwrap_or_default(),
        pod["metadata"]["name"].as_str().unwrap_or_default()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_runs_the_server_on_probed_and_declared_ports() {
        let mut pod = json!({"kind": "Pod", "metadata": {"name": "web"}, "spec": {"containers": [
            {"name": "nginx", "image": "nginx", "ports": [{"name": "http", "containerPort": 8080}]},
            {"name": "side", "image": "busybox"},
        ]}});
        run_pod_server(&mut pod, &[80, 8080], "node-2");
        let containers = pod["spec"]["containers"].as_array().unwrap();
        assert_eq!(containers.len(), 1);
        assert_eq!(containers[0]["image"], pod_image());
        assert_eq!(containers[0]["args"], json!(["80", "8080"]));
        assert_eq!(
            containers[0]["ports"][0]["name"], "http",
            "named ports kept"
        );
        assert_eq!(
            pod["spec"]["nodeSelector"]["kubernetes.io/hostname"],
            "node-2"
        );
        let mut pinned = json!({"kind": "Pod", "spec": {"nodeName": "node-1", "containers": []}});
        run_pod_server(&mut pinned, &[80], "node-2");
        assert!(pinned["spec"]["nodeSelector"].is_null());
    }
}
