//! Reaching Services in the lab: where a probe starts (a pod, a node, the external client), which
//! address of a Service it goes to (cluster IP, a node's node port, load-balancer IP, external
//! IP), and the probe itself, which reports the pod that answered, the client address that pod
//! saw and the port it was reached on.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    str::FromStr,
    time::Duration,
};

use anyhow::{anyhow, bail, Result};
use serde_json::Value;
use sluice_agent::table::{Align, Table};

use super::report::Protocol;
use crate::probe::{self, Reply};

/// Where a probe starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A running pod, `namespace/name`.
    Pod(String),
    /// A node's own network namespace (host network), by node name.
    Node(String),
    /// The external client, [`crate::cluster::Cluster::external`].
    External,
}

impl FromStr for Source {
    type Err = anyhow::Error;

    /// `namespace/pod`, a node name, or `external`.
    fn from_str(text: &str) -> Result<Source> {
        Ok(match text {
            "" => bail!("a probe source is namespace/pod, a node name or external"),
            "external" => Source::External,
            pod if pod.contains('/') => Source::Pod(pod.into()),
            node => Source::Node(node.into()),
        })
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Pod(name) | Source::Node(name) => f.write_str(name),
            Source::External => f.write_str("external"),
        }
    }
}

/// Which address of a Service a probe goes to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frontend {
    ClusterIp,
    /// The node port on this node's address.
    NodePort(String),
    /// `status.loadBalancer.ingress[0].ip`, once something has assigned it.
    LoadBalancer,
    /// `spec.externalIPs[0]`.
    ExternalIp,
}

impl Frontend {
    /// `cluster-ip`, `node-port` (on `node`), `load-balancer` or `external-ip`.
    pub fn parse(kind: &str, node: &str) -> Result<Frontend> {
        Ok(match kind {
            "cluster-ip" => Frontend::ClusterIp,
            "node-port" => Frontend::NodePort(node.into()),
            "load-balancer" => Frontend::LoadBalancer,
            "external-ip" => Frontend::ExternalIp,
            other => bail!(
                "frontend {other:?}: expected cluster-ip, node-port, load-balancer or external-ip"
            ),
        })
    }
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Frontend::ClusterIp => f.write_str("cluster-ip"),
            Frontend::NodePort(node) => write!(f, "node-port on {node}"),
            Frontend::LoadBalancer => f.write_str("load-balancer"),
            Frontend::ExternalIp => f.write_str("external-ip"),
        }
    }
}

/// The entry of `spec.ports` for `port` and `protocol`.
fn service_port(svc: &Value, port: u16, protocol: Protocol) -> Result<&Value> {
    svc["spec"]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["port"] == port && p["protocol"] == protocol.to_string())
        .ok_or_else(|| {
            let meta = |field: &str| svc["metadata"][field].as_str().unwrap_or_default();
            let (ns, name) = (meta("namespace"), meta("name"));
            anyhow!("Service {ns}/{name} has no port {port}/{protocol}")
        })
}

fn address(v: &Value, what: &str) -> Result<Ipv4Addr> {
    v.as_str()
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| anyhow!("{what}"))
}

/// What probing a Service needs of a cluster: the embedded lab and the real cluster each say
/// where things are; how a probe is aimed and run is the same for both.
pub trait ServiceProbes {
    /// The Service `ns/name` as stored, with what the API server allocated.
    fn service(&self, ns: &str, name: &str) -> Result<Value>;
    /// The Pods of namespace `ns` as stored.
    fn pods_in(&self, ns: &str) -> Result<Vec<Value>>;
    /// The running pods a probe can start from (`namespace/name`), in name order.
    fn running_pods(&self) -> Result<Vec<String>>;
    /// A node's InternalIP.
    fn node_ip(&self, node: &str) -> Result<Ipv4Addr>;
    /// The network namespace a probe from `source` runs in.
    fn netns_of(&self, source: &Source) -> Result<PathBuf>;
    /// The external client's network namespace.
    fn external_netns(&self) -> PathBuf;
    /// Waits until the agents have programmed what the API holds.
    fn settle(&self, timeout: std::time::Duration) -> Result<()>;

    fn service_ip(&self, ns: &str, name: &str) -> Result<Ipv4Addr> {
        let svc = self.service(ns, name)?;
        let what = format!("Service {ns}/{name} has no cluster IP");
        address(&svc["spec"]["clusterIP"], &what)
    }

    /// The node port of the Service's `port` and `protocol` (TCP and UDP of one port number
    /// usually share one).
    fn node_port(&self, ns: &str, name: &str, port: u16, protocol: Protocol) -> Result<u16> {
        let svc = self.service(ns, name)?;
        service_port(&svc, port, protocol)?["nodePort"]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .ok_or_else(|| anyhow!("Service {ns}/{name} has no node port for port {port}"))
    }

    /// Where a probe of the Service's `port` and `protocol` through `frontend` goes.
    fn frontend(
        &self,
        ns: &str,
        name: &str,
        frontend: &Frontend,
        port: u16,
        protocol: Protocol,
    ) -> Result<SocketAddrV4> {
        let svc = self.service(ns, name)?;
        service_port(&svc, port, protocol)?;
        let at = |ip| Ok(SocketAddrV4::new(ip, port));
        match frontend {
            Frontend::ClusterIp => at(self.service_ip(ns, name)?),
            Frontend::NodePort(node) => {
                let node_port = self.node_port(ns, name, port, protocol)?;
                Ok(SocketAddrV4::new(self.node_ip(node)?, node_port))
            }
            Frontend::LoadBalancer => at(address(
                &svc["status"]["loadBalancer"]["ingress"][0]["ip"],
                &format!("Service {ns}/{name} has no load-balancer IP in its status"),
            )?),
            Frontend::ExternalIp => at(address(
                &svc["spec"]["externalIPs"][0],
                &format!("Service {ns}/{name} has no externalIPs"),
            )?),
        }
    }

    /// One TCP connection or UDP datagram from `from` to `to`: what the server that answered
    /// reported, or `None` when nothing answered within [`probe::PROBE_TIMEOUT`]. Each probe
    /// comes from a fresh source port, so a Service balances probes as separate connections.
    fn probe(&self, from: &Source, to: SocketAddrV4, protocol: Protocol) -> Result<Option<Reply>> {
        let netns = self.netns_of(from)?;
        Ok(match protocol {
            Protocol::Tcp => probe::tcp(&netns, None, *to.ip(), to.port()),
            Protocol::Udp => probe::udp(&netns, *to.ip(), to.port()),
        })
    }

    /// A client for the Service: the first running pod (in name order) it does not select, so
    /// that answers do not come from the client itself; the first running pod if it selects all.
    fn default_client(&self, ns: &str, name: &str) -> Result<Source> {
        let svc = self.service(ns, name)?;
        let selector = svc["spec"]["selector"].as_object();
        let selected: BTreeSet<String> = self
            .pods_in(ns)?
            .iter()
            .filter(|p| {
                selector.is_some_and(|s| s.iter().all(|(k, v)| p["metadata"]["labels"][k] == *v))
            })
            .map(|p| {
                format!(
                    "{ns}/{}",
                    p["metadata"]["name"].as_str().unwrap_or_default()
                )
            })
            .collect();
        let running = self.running_pods()?;
        running
            .iter()
            .find(|key| !selected.contains(*key))
            .or(running.first())
            .map(|key| Source::Pod(key.to_string()))
            .ok_or_else(|| anyhow!("no running pod to probe from"))
    }

    /// Routes `ip` from the external client through `node`, as the network in front of a
    /// cluster routes a Service's external IPs to a node (Kubernetes leaves that to it).
    fn route_from_external(&self, ip: Ipv4Addr, node: &str) -> Result<()> {
        let via = self.node_ip(node)?.to_string();
        crate::sh(
            std::process::Command::new("nsenter")
                .arg(format!("--net={}", self.external_netns().display()))
                .args(["ip", "route", "replace", &format!("{ip}/32"), "via", &via]),
        )?;
        Ok(())
    }
}

/// A run of probes to one Service: `probe-service`'s, and the first run's.
pub struct ServiceProbe {
    /// The Service port; `None` for its first port of `protocol`.
    pub port: Option<u16>,
    pub protocol: Protocol,
    /// `None` for [`ServiceProbes::default_client`].
    pub from: Option<Source>,
    pub frontend: Frontend,
    /// The node that external-ip probes from the external client are routed through.
    pub via: String,
    /// Probes, one after the other, each a new connection.
    pub count: usize,
}

/// What a [`ServiceProbe`] saw: a line per probe and a summary, and who answered how often.
pub struct ServiceAnswers {
    pub text: String,
    pub answers: BTreeMap<String, usize>,
}

impl ServiceProbe {
    /// Waits (at most 10 s) until the agents have programmed what the API holds, then probes.
    pub fn run(&self, lab: &impl ServiceProbes, ns: &str, name: &str) -> Result<ServiceAnswers> {
        let protocol = self.protocol;
        let port = match self.port {
            Some(port) => port,
            None => lab.service(ns, name)?["spec"]["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|p| p["protocol"] == protocol.to_string())
                .and_then(|p| p["port"].as_u64()?.try_into().ok())
                .ok_or_else(|| anyhow!("Service {ns}/{name} has no {protocol} port"))?,
        };
        let from = match &self.from {
            Some(from) => from.clone(),
            None => lab.default_client(ns, name)?,
        };
        let to = lab.frontend(ns, name, &self.frontend, port, protocol)?;
        if self.frontend == Frontend::ExternalIp && from == Source::External {
            lab.route_from_external(*to.ip(), &self.via)?;
        }
        let mut text = String::new();
        // Manifests applied just before: give the agents time to program them.
        if let Err(e) = lab.settle(Duration::from_secs(10)) {
            text.push_str(&format!("warning: {e:#}\n"));
        }
        text.push_str(&format!(
            "{ns}/{name} {to}/{protocol} ({}) from {from}\n",
            self.frontend
        ));
        let mut table = Table::new(&[
            ("PROBE", Align::Right),
            ("ANSWERED-BY", Align::Left),
            ("PORT", Align::Right),
            ("CLIENT-SEEN", Align::Left),
        ]);
        let mut answers: BTreeMap<String, usize> = BTreeMap::new();
        for i in 1..=self.count {
            let row = match lab.probe(&from, to, protocol)? {
                Some(reply) => {
                    *answers.entry(reply.server.clone()).or_default() += 1;
                    [
                        reply.server,
                        reply.port.to_string(),
                        reply.client.to_string(),
                    ]
                }
                None => ["- (no answer within 1 s)".into(), "-".into(), "-".into()],
            };
            let mut cells = vec![i.to_string()];
            cells.extend(row);
            table.row(cells);
        }
        text.push_str(&table.render());
        let spread: Vec<String> = answers
            .iter()
            .map(|(pod, n)| format!("{pod} {n}"))
            .collect();
        text.push_str(&format!(
            "{}/{} answered{}{}\n",
            answers.values().sum::<usize>(),
            self.count,
            if spread.is_empty() { "" } else { ": " },
            spread.join(", ")
        ));
        Ok(ServiceAnswers { text, answers })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_and_frontends_parse() {
        assert_eq!(
            "shop/client".parse::<Source>().unwrap(),
            Source::Pod("shop/client".into())
        );
        assert_eq!(
            "node-2".parse::<Source>().unwrap(),
            Source::Node("node-2".into())
        );
        assert_eq!("external".parse::<Source>().unwrap(), Source::External);
        assert!("".parse::<Source>().is_err());
        assert_eq!(
            Frontend::parse("node-port", "node-2").unwrap(),
            Frontend::NodePort("node-2".into())
        );
        assert!(Frontend::parse("ingress", "node-1").is_err());
    }
}
