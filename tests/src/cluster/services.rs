//! What the Service suites read off the real cluster besides their probes: pods' and the
//! external client's addresses, a node's gateway address (the source of what it SNATs), and the
//! endpoints the EndpointSlice controller has published, so a suite waits for kube-controller-
//! manager before it waits for the agents.

use std::{collections::BTreeMap, net::Ipv4Addr, time::Duration};

use anyhow::{Context, Result};

use super::Cluster;

impl Cluster {
    /// The address the kubelet reported for pod `ns/name`.
    pub fn pod_ip(&self, key: &str) -> Result<Ipv4Addr> {
        let (ns, name) = key
            .split_once('/')
            .with_context(|| format!("{key}: a pod is namespace/name"))?;
        let pod = self.get(&["pod", name, "-n", ns])?;
        pod["status"]["podIP"]
            .as_str()
            .and_then(|ip| ip.parse().ok())
            .with_context(|| format!("pod {key} has no IPv4 address"))
    }

    /// The external client's address on the switch.
    pub fn external_ip(&self) -> Result<Ipv4Addr> {
        let out = self.external.exec(&["ip", "-4", "-o", "addr", "show"])?;
        // 2: px0    inet 192.168.77.200/24 ...
        out.lines()
            .filter_map(|line| {
                let cidr = line
                    .split_whitespace()
                    .skip_while(|w| *w != "inet")
                    .nth(1)?;
                cidr.split('/').next()?.parse::<Ipv4Addr>().ok()
            })
            .find(|ip| !ip.is_loopback())
            .with_context(|| format!("the external client has no address: {out}"))
    }

    /// `node`'s gateway address: the first host of its podCIDR, where the agent puts it.
    pub fn gateway_ip(&self, node: &str) -> Result<Ipv4Addr> {
        let cidr = self.kubectl(&["get", "node", node, "-o", "jsonpath={.spec.podCIDR}"])?;
        let network: Ipv4Addr = cidr
            .split('/')
            .next()
            .and_then(|ip| ip.parse().ok())
            .with_context(|| format!("node {node} has podCIDR {cidr:?}"))?;
        Ok(Ipv4Addr::from(u32::from(network) + 1))
    }

    /// The pods behind Service `ns/name` in its EndpointSlices, each with whether it is ready
    /// (an absent `ready` is ready, as the API defines it).
    pub fn endpoints(&self, ns: &str, name: &str) -> Result<BTreeMap<String, bool>> {
        let selector = format!("kubernetes.io/service-name={name}");
        let slices = self.get(&["endpointslices", "-n", ns, "-l", &selector])?;
        let mut pods = BTreeMap::new();
        for endpoint in slices["items"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
        {
            let pod = endpoint["targetRef"]["name"]
                .as_str()
                .with_context(|| format!("an endpoint of {ns}/{name} names no pod"))?;
            let ready = endpoint["conditions"]["ready"].as_bool().unwrap_or(true);
            pods.insert(pod.to_string(), ready);
        }
        Ok(pods)
    }

    /// Waits until Service `ns/name`'s EndpointSlices hold exactly `pods` (names), all ready.
    pub fn wait_endpoints(&self, ns: &str, name: &str, pods: &[&str]) -> Result<()> {
        let want: BTreeMap<String, bool> = pods.iter().map(|p| (p.to_string(), true)).collect();
        self.wait_for(
            &format!("Service {ns}/{name}'s endpoints to be {pods:?}"),
            Duration::from_secs(60),
            || Ok(self.endpoints(ns, name)? == want),
        )
    }
}
