//! The probe matrix: every ordered pair of pods (self included) on each port and protocol, probed
//! from inside the source pod; written as JSON and printed as a truth table.

use std::{fmt, net::Ipv4Addr, path::PathBuf, time::Duration};

use anyhow::{bail, Result};
use serde::Serialize;

use sluice_agent::table::{Align, Table};

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

/// One table per protocol, or per port where the ports of a protocol do not agree: rows are
/// sources, columns destinations by row number; `.` connected (and answered by the destination),
/// `X` not connected, `?` answered by another pod.
pub fn truth_table(probes: &[Probe]) -> String {
    let mut pods: Vec<&str> = probes.iter().map(|p| p.from.as_str()).collect();
    pods.sort();
    pods.dedup();
    let cell = |from: &str, to: &str, port: u16, proto: Protocol| {
        probes
            .iter()
            .find(|p| p.from == from && p.to == to && p.port == port && p.protocol == proto)
            .map_or(" ", |p| match (&p.answered_by, p.connected) {
                (Some(by), true) if by == to => ".",
                (_, true) => "?",
                _ => "X",
            })
    };
    let grid = |port: u16, proto: Protocol| -> Vec<Vec<&str>> {
        pods.iter()
            .map(|from| pods.iter().map(|to| cell(from, to, port, proto)).collect())
            .collect()
    };
    let mut out = String::new();
    for proto in [Protocol::Tcp, Protocol::Udp] {
        let mut ports: Vec<u16> = probes
            .iter()
            .filter(|p| p.protocol == proto)
            .map(|p| p.port)
            .collect();
        ports.sort();
        ports.dedup();
        let Some(&first) = ports.first() else {
            continue;
        };
        let groups: Vec<Vec<u16>> = if ports.iter().all(|&p| grid(p, proto) == grid(first, proto)) {
            vec![ports]
        } else {
            ports.into_iter().map(|p| vec![p]).collect()
        };
        for group in groups {
            let title = format!(
                "{proto} {}",
                group
                    .iter()
                    .map(u16::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            let indices: Vec<String> = (0..pods.len()).map(|i| i.to_string()).collect();
            let mut columns = vec![(title.as_str(), Align::Left), ("", Align::Right)];
            columns.extend(indices.iter().map(|i| (i.as_str(), Align::Right)));
            let mut table = Table::new(&columns);
            for (i, (from, cells)) in pods.iter().zip(grid(group[0], proto)).enumerate() {
                let mut row = vec![from.to_string(), i.to_string()];
                row.extend(cells.iter().map(|c| c.to_string()));
                table.row(row);
            }
            out.push_str(&table.render());
        }
    }
    out
}

/// Fails naming each probe whose outcome is not what `connects` says.
pub fn expect(probes: &[Probe], connects: impl Fn(&Probe) -> bool) -> Result<()> {
    let wrong: Vec<String> = probes
        .iter()
        .filter_map(|p| {
            let reached = p.connected && p.answered_by.as_deref() == Some(p.to.as_str());
            let what = match connects(p) {
                true if !reached => "should connect and did not",
                false if p.connected => "should be cut off and connected",
                _ => return None,
            };
            Some(format!(
                "{} -> {} {}/{} {what}",
                p.from, p.to, p.protocol, p.port
            ))
        })
        .collect();
    if !wrong.is_empty() {
        bail!(
            "{} of {} probes went against expectations: {}",
            wrong.len(),
            probes.len(),
            wrong
                .iter()
                .take(10)
                .cloned()
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(from: &str, to: &str, port: u16, protocol: Protocol, connected: bool) -> Probe {
        Probe {
            from: from.into(),
            to: to.into(),
            port,
            protocol,
            connected,
            answered_by: connected.then(|| to.into()),
        }
    }

    #[test]
    fn ports_that_agree_share_a_table_and_long_names_stay_aligned() {
        let pods = ["x/a", "backend/a-long-pod-name"];
        let mut probes = Vec::new();
        for from in pods {
            for to in pods {
                for port in [80, 81] {
                    // UDP 81 into x/a is cut off; everything else connects.
                    let cut = port == 81 && to == "x/a" && from != to;
                    probes.push(probe(from, to, port, Protocol::Tcp, true));
                    probes.push(probe(from, to, port, Protocol::Udp, !cut));
                }
            }
        }
        assert_eq!(
            truth_table(&probes),
            "TCP 80, 81                  0  1\n\
             backend/a-long-pod-name  0  .  .\n\
             x/a                      1  .  .\n\
             UDP 80                      0  1\n\
             backend/a-long-pod-name  0  .  .\n\
             x/a                      1  .  .\n\
             UDP 81                      0  1\n\
             backend/a-long-pod-name  0  .  X\n\
             x/a                      1  .  .\n"
        );
    }
}
