//! Overlapping networks, the first thing to check when pod routing fails (the Antrea pack's
//! troubleshooting advice, made a check): a pod CIDR or the Service CIDR overlapping another of
//! them, or one of the node's own networks (an interface's subnet, a route). Pure: the agent
//! and `sluicectl check` feed it what they read and report what it finds, in words.

use std::fmt;

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

use crate::net::HostNetwork;

/// Where a network comes from.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Origin {
    PodCidr { node: String },
    ServiceCidr,
    Interface { node: String, device: String },
    Route { node: String, device: String },
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Network {
    pub cidr: IpNetwork,
    pub origin: Origin,
}

impl Network {
    pub fn pod_cidr(node: &str, cidr: IpNetwork) -> Network {
        Network {
            cidr,
            origin: Origin::PodCidr { node: node.into() },
        }
    }

    pub fn service_cidr(cidr: IpNetwork) -> Network {
        Network {
            cidr,
            origin: Origin::ServiceCidr,
        }
    }

    pub fn host(node: &str, host: &HostNetwork) -> Network {
        let (node, device) = (node.to_string(), host.device.clone());
        Network {
            cidr: host.cidr,
            origin: if host.route {
                Origin::Route { node, device }
            } else {
                Origin::Interface { node, device }
            },
        }
    }

    /// The node the network belongs to, if it is one node's.
    fn node(&self) -> Option<&str> {
        match &self.origin {
            Origin::PodCidr { node }
            | Origin::Interface { node, .. }
            | Origin::Route { node, .. } => Some(node),
            Origin::ServiceCidr => None,
        }
    }

    /// In words; `of` is the node the sentence is already about ("its interface").
    fn describe(&self, of: Option<&str>) -> String {
        let whose = |node: &str| {
            if of == Some(node) {
                "its".to_string()
            } else {
                format!("{node}'s")
            }
        };
        match &self.origin {
            Origin::PodCidr { node } => format!("podCIDR {} of {node}", self.cidr),
            Origin::ServiceCidr => format!("the Service CIDR {}", self.cidr),
            Origin::Interface { node, device } => {
                format!("{} on {} interface {device}", self.cidr, whose(node))
            }
            Origin::Route { node, device } => {
                format!(
                    "the route to {} via {} interface {device}",
                    self.cidr,
                    whose(node)
                )
            }
        }
    }
}

/// Two CIDRs share addresses (CIDRs nest, so one contains the other's first address).
pub fn overlaps(a: IpNetwork, b: IpNetwork) -> bool {
    a.is_ipv4() == b.is_ipv4() && (a.contains(b.network()) || b.contains(a.network()))
}

/// Two networks that overlap: `first` is one of the cluster's (a pod or Service CIDR).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Overlap {
    pub first: Network,
    pub second: Network,
}

impl fmt::Display for Overlap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} overlaps {}",
            self.first.describe(None),
            self.second.describe(self.first.node())
        )
    }
}

/// What the agent last checked, in `<stateDir>/network.json`, for `sluicectl check`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkReport {
    pub node: String,
    /// The node's pod CIDR, and the setting it came from (which took precedence).
    pub pod_cidr: IpNetwork,
    pub pod_cidr_source: String,
    /// The pod CIDRs and Service CIDR of the cluster as the agent knows them.
    pub cluster: Vec<Network>,
    /// Sluice's own devices, which the host's networks leave out.
    pub own_devices: Vec<String>,
    pub overlaps: Vec<String>,
}

/// Every overlap among the cluster's networks, and between them and the host's.
pub fn find(cluster: &[Network], host: &[Network]) -> Vec<Overlap> {
    let mut found = Vec::new();
    for (i, first) in cluster.iter().enumerate() {
        for second in cluster[i + 1..].iter().chain(host) {
            if overlaps(first.cidr, second.cidr) {
                found.push(Overlap {
                    first: first.clone(),
                    second: second.clone(),
                });
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(text: &str) -> IpNetwork {
        text.parse().unwrap()
    }

    fn interface(node: &str, device: &str, cidr: &str) -> Network {
        Network::host(
            node,
            &HostNetwork {
                cidr: net(cidr),
                device: device.into(),
                route: false,
            },
        )
    }

    #[test]
    fn overlaps_are_named_in_words() {
        let cluster = [
            Network::pod_cidr("node-2", net("10.0.0.0/16")),
            Network::pod_cidr("node-1", net("10.244.1.0/24")),
            Network::service_cidr(net("10.96.0.0/12")),
        ];
        let host = [
            interface("node-2", "eth0", "10.0.1.0/24"),
            interface("node-1", "eth1", "192.168.0.0/24"),
            Network::host(
                "node-1",
                &HostNetwork {
                    cidr: net("10.100.0.0/16"),
                    device: "eth1".into(),
                    route: true,
                },
            ),
        ];
        let found: Vec<String> = find(&cluster, &host)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            found,
            [
                "podCIDR 10.0.0.0/16 of node-2 overlaps 10.0.1.0/24 on its interface eth0",
                "the Service CIDR 10.96.0.0/12 overlaps the route to 10.100.0.0/16 via node-1's interface eth1",
            ]
        );
    }

    #[test]
    fn pod_cidrs_overlapping_each_other_or_the_service_cidr() {
        let cluster = [
            Network::pod_cidr("a", net("10.244.0.0/24")),
            Network::pod_cidr("b", net("10.244.0.0/23")),
            Network::service_cidr(net("10.244.1.0/24")),
        ];
        let found: Vec<String> = find(&cluster, &[])
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            found,
            [
                "podCIDR 10.244.0.0/24 of a overlaps podCIDR 10.244.0.0/23 of b",
                "podCIDR 10.244.0.0/23 of b overlaps the Service CIDR 10.244.1.0/24",
            ]
        );
        let other_node = Overlap {
            first: Network::pod_cidr("b", net("10.1.0.0/16")),
            second: interface("a", "eth0", "10.1.2.0/24"),
        };
        assert_eq!(
            other_node.to_string(),
            "podCIDR 10.1.0.0/16 of b overlaps 10.1.2.0/24 on a's interface eth0"
        );
    }

    #[test]
    fn disjoint_networks_and_other_families_do_not_overlap() {
        let cluster = [
            Network::pod_cidr("a", net("10.244.0.0/24")),
            Network::service_cidr(net("10.96.0.0/12")),
        ];
        let host = [
            interface("a", "eth0", "192.168.1.0/24"),
            interface("a", "eth0", "fd00::/64"),
        ];
        assert_eq!(find(&cluster, &host), []);
    }
}
