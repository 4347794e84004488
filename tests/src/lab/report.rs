//! The probe matrix: every ordered pair of pods (self included) on each port and protocol, probed
//! from inside the source pod; written as JSON and printed as a truth table.

use std::{fmt, net::Ipv4Addr, path::PathBuf, time::Duration};

use serde::Serialize;

use crate::probe;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Protocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
}

impl Protocol {
    pub fn parse(text: &str) -> anyhow::Result<Protocol> {
        match text {
            "TCP" | "tcp" => Ok(Protocol::Tcp),
            "UDP" | "udp" => Ok(Protocol::Udp),
            other => anyhow::bail!("protocol {other:?}: expected TCP or UDP"),
        }
    }
}

/// As Kubernetes spells it (`spec.ports[].protocol`).
impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        })
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Probe {
    pub from: String,
    pub to: String,
    pub port: u16,
    pub protocol: Protocol,
    pub connected: bool,
    pub answered_by: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Step {
    pub manifests: String,
    pub probes: Vec<Probe>,
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub steps: Vec<Step>,
}

/// Probes every target from inside every source's network namespace (`(name, netns path)`), on
/// each port and protocol, in parallel per source, port and protocol.
pub fn probe_pairs(
    sources: Vec<(String, PathBuf)>,
    targets: Vec<(String, Ipv4Addr)>,
    ports: &[u16],
    protocols: &[Protocol],
    timeout: Duration,
) -> Vec<Probe> {
    let mut handles = Vec::new();
    for (from, netns) in sources {
        for &port in ports {
            for &protocol in protocols {
                let (from, netns, targets) = (from.clone(), netns.clone(), targets.clone());
                handles.push(std::thread::spawn(move || {
                    targets
                        .iter()
                        .map(|(to, ip)| {
                            let reply = match protocol {
                                Protocol::Tcp => {
                                    probe::tcp_within(&netns, None, *ip, port, timeout)
                                }
                                Protocol::Udp => probe::udp_within(&netns, *ip, port, timeout),
                            };
                            Probe {
                                from: from.clone(),
                                to: to.clone(),
                                port,
                                protocol,
                                connected: reply.is_some(),
                                answered_by: reply.map(|r| r.server),
                            }
                        })
                        .collect::<Vec<_>>()
                }));
            }
        }
    }
    let mut probes: Vec<Probe> = handles
        .into_iter()
        .flat_map(|h| h.join().expect("probe thread"))
        .collect();
    probes.sort_by(|a, b| {
        (&a.from, &a.to, a.port, a.protocol as u8).cmp(&(&b.from, &b.to, b.port, b.protocol as u8))
    });
    probes
}

/// One table per port and protocol: rows are sources, columns destinations; `.` connected (and
/// answered by the destination), `X` not connected, `?` answered by another pod.
pub fn truth_table(probes: &[Probe]) -> String {
    let mut pods: Vec<&str> = probes.iter().map(|p| p.from.as_str()).collect();
    pods.sort();
    pods.dedup();
    let mut combos: Vec<(u16, Protocol)> = probes.iter().map(|p| (p.port, p.protocol)).collect();
    combos.sort_by_key(|(port, proto)| (*port, *proto as u8));
    combos.dedup();
    let mut out = String::new();
    for (port, proto) in combos {
        out.push_str(&format!("{proto:?} {port}\n{:<24}", ""));
        for (i, _) in pods.iter().enumerate() {
            out.push_str(&format!("{i:>3}"));
        }
        out.push('\n');
        for (i, from) in pods.iter().enumerate() {
            out.push_str(&format!("{:<20}{i:>4}", from));
            for to in &pods {
                let cell = probes
                    .iter()
                    .find(|p| {
                        p.from == *from && p.to == *to && p.port == port && p.protocol == proto
                    })
                    .map_or(" ", |p| match (&p.answered_by, p.connected) {
                        (Some(by), true) if by == to => ".",
                        (_, true) => "?",
                        _ => "X",
                    });
                out.push_str(&format!("{cell:>3}"));
            }
            out.push('\n');
        }
    }
    out
}
