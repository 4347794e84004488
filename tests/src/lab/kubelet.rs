//! The kubelet simulator: for every Pod bound to a lab node it creates a network namespace, calls
//! the real `sluice-cni` ADD with that node's socket, starts the pod's servers and writes
//! `status.podIP(s)` back through the API server. Pods that disappear get CNI DEL.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use anyhow::Result;
use serde_json::{json, Value};

use super::LabNode;
use crate::{apiserver::ApiServer, probe::Servers, Netns};

pub struct RunningPod {
    pub node: String,
    pub container_id: String,
    pub ip: Ipv4Addr,
    /// Declared first: the servers stop before the namespace goes.
    _servers: Servers,
    pub netns: Netns,
}

#[derive(Default)]
pub struct Kubelet {
    pods: BTreeMap<String, RunningPod>,
    /// Hold status writes back (as a slow kubelet would) until `write_held_status`.
    pub hold_status: bool,
    held: Vec<(String, Value)>,
}

fn key(pod: &Value) -> String {
    format!(
        "{}/{}",
        pod["metadata"]["namespace"].as_str().unwrap_or("default"),
        pod["metadata"]["name"].as_str().unwrap_or("")
    )
}

/// The ports a pod serves: the lab's probe ports plus its declared containerPorts.
fn serving_ports(pod: &Value, ports: &[u16]) -> Vec<u16> {
    let mut all: BTreeSet<u16> = ports.iter().copied().collect();
    for container in pod["spec"]["containers"].as_array().into_iter().flatten() {
        for port in container["ports"].as_array().into_iter().flatten() {
            if let Some(p) = port["containerPort"]
                .as_u64()
                .and_then(|p| u16::try_from(p).ok())
            {
                all.insert(p);
            }
        }
    }
    all.into_iter().collect()
}

impl Kubelet {
    pub fn sync(&mut self, api: &ApiServer, nodes: &[LabNode], ports: &[u16]) -> Result<()> {
        let desired: BTreeMap<String, Value> = api
            .list("pods", None)
            .into_iter()
            .filter(|p| {
                nodes
                    .iter()
                    .any(|n| p["spec"]["nodeName"] == n.name.as_str())
            })
            .map(|p| (key(&p), p))
            .collect();
        let gone: Vec<String> = self
            .pods
            .iter()
            .filter(|(k, running)| {
                desired
                    .get(*k)
                    .is_none_or(|p| p["spec"]["nodeName"] != running.node.as_str())
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in gone {
            let pod = self.pods.remove(&k).expect("listed above");
            if let Some(node) = nodes.iter().find(|n| n.name == pod.node) {
                let out = node.node.cni(
                    "DEL",
                    &pod.container_id,
                    pod.netns.path().to_str().unwrap_or(""),
                    "eth0",
                );
                if out.code != 0 {
                    eprintln!("kubelet: CNI DEL of {k} failed: {}", out.stdout);
                }
            }
        }
        for (k, pod) in desired {
            if self.pods.contains_key(&k) {
                continue;
            }
            let node = nodes
                .iter()
                .find(|n| pod["spec"]["nodeName"] == n.name.as_str())
                .expect("filtered above");
            let netns = Netns::new("slp")?;
            let container_id = netns.name.clone();
            let (ns, name) = k.split_once('/').expect("namespace/name");
            let out = node.node.cni_with_args(
                "ADD",
                &container_id,
                netns.path().to_str().unwrap_or(""),
                "eth0",
                &format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name}"),
            );
            if out.code != 0 {
                let message = format!("CNI ADD failed: {}", out.stdout);
                api.merge_patch_status(
                    "pods",
                    Some(ns),
                    name,
                    &json!({"status": {"phase": "Pending", "message": message}}),
                )
                .map_err(|e| anyhow::anyhow!("{e:?}"))?;
                eprintln!("kubelet: {k}: {message}");
                continue;
            }
            let result: Value = serde_json::from_str(&out.stdout)?;
            let ip: Ipv4Addr = result["ips"][0]["address"]
                .as_str()
                .and_then(|a| a.split('/').next())
                .and_then(|a| a.parse().ok())
                .ok_or_else(|| {
                    anyhow::anyhow!("CNI ADD result without an address: {}", out.stdout)
                })?;
            let servers = Servers::start(&netns.path(), &k, &serving_ports(&pod, ports));
            let status = json!({"status": {
                "phase": "Running",
                "hostIP": node.ip.to_string(),
                "podIP": ip.to_string(),
                "podIPs": [{"ip": ip.to_string()}],
                "conditions": [{"type": "Ready", "status": "True"}],
            }});
            if self.hold_status {
                self.held.push((k.clone(), status));
            } else {
                api.merge_patch_status("pods", Some(ns), name, &status)
                    .map_err(|e| anyhow::anyhow!("{e:?}"))?;
            }
            self.pods.insert(
                k,
                RunningPod {
                    node: node.name.clone(),
                    container_id,
                    ip,
                    _servers: servers,
                    netns,
                },
            );
        }
        Ok(())
    }

    /// Writes the status of the pods wired while `hold_status` was set.
    pub fn write_held_status(&mut self, api: &ApiServer) -> Result<()> {
        for (k, status) in std::mem::take(&mut self.held) {
            let (ns, name) = k.split_once('/').expect("namespace/name");
            api.merge_patch_status("pods", Some(ns), name, &status)
                .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        }
        Ok(())
    }

    pub fn pods_on(&self, node: &str) -> Vec<Ipv4Addr> {
        self.pods
            .values()
            .filter(|p| p.node == node)
            .map(|p| p.ip)
            .collect()
    }

    pub fn pod_ips(&self) -> BTreeMap<String, Ipv4Addr> {
        self.pods.iter().map(|(k, p)| (k.clone(), p.ip)).collect()
    }

    pub fn pod(&self, key: &str) -> Option<&RunningPod> {
        self.pods.get(key)
    }

    pub fn pods(&self) -> impl Iterator<Item = (&String, &RunningPod)> {
        self.pods.iter()
    }
}
