//! NodeIPAM's bookkeeping, with Antrea's semantics (kube-controller-manager's range allocator):
//! each cluster CIDR is cut into node blocks handed out round robin, one per cluster CIDR to a
//! Node without a podCIDR. Nothing is persisted: the state is rebuilt from the Nodes on start.
//!
//! Where Antrea stops (a podCIDR outside the cluster CIDRs is fatal), this reports a
//! [`Conflict`] and goes on serving the other Nodes. A block is taken while anything overlaps it:
//! a Node's podCIDR (whatever its size), or a Service CIDR.

use std::collections::BTreeMap;

use ipnetwork::IpNetwork;

use super::config::NodeIpamSettings;
use crate::overlap::overlaps;

/// What holds a block.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Holder {
    Node(String),
    Service(IpNetwork),
}

/// One cluster CIDR and its node blocks.
#[derive(Debug)]
struct CidrSet {
    cluster: IpNetwork,
    mask: u8,
    /// Taken blocks by index, with what overlaps each.
    taken: BTreeMap<u64, Vec<Holder>>,
    /// Where the round-robin search for a free block starts.
    next: u64,
}

impl CidrSet {
    fn blocks(&self) -> u64 {
        1u64 << (self.mask - self.cluster.prefix())
    }

    fn bits(&self) -> u8 {
        if self.cluster.is_ipv4() {
            32
        } else {
            128
        }
    }

    fn offset(&self, ip: std::net::IpAddr) -> u128 {
        match (ip, self.cluster.network()) {
            (std::net::IpAddr::V4(a), std::net::IpAddr::V4(b)) => {
                (u32::from(a) - u32::from(b)) as u128
            }
            (std::net::IpAddr::V6(a), std::net::IpAddr::V6(b)) => u128::from(a) - u128::from(b),
            _ => unreachable!("checked: same family"),
        }
    }

    fn block(&self, index: u64) -> IpNetwork {
        let offset = (index as u128) << (self.bits() - self.mask);
        let ip = match self.cluster.network() {
            std::net::IpAddr::V4(base) => {
                std::net::IpAddr::V4((u32::from(base) + offset as u32).into())
            }
            std::net::IpAddr::V6(base) => std::net::IpAddr::V6((u128::from(base) + offset).into()),
        };
        IpNetwork::new(ip, self.mask).expect("mask validated against the family")
    }

    /// The indexes of the blocks `cidr` overlaps; empty when it lies outside.
    fn overlapped(&self, cidr: IpNetwork) -> std::ops::Range<u64> {
        if cidr.is_ipv4() != self.cluster.is_ipv4() || !overlaps(cidr, self.cluster) {
            return 0..0;
        }
        if cidr.prefix() <= self.cluster.prefix() {
            return 0..self.blocks();
        }
        let first = (self.offset(cidr.network()) >> (self.bits() - self.mask)) as u64;
        let count = if cidr.prefix() >= self.mask {
            1
        } else {
            1u64 << (self.mask - cidr.prefix())
        };
        first..first + count
    }

    fn hold(&mut self, cidr: IpNetwork, holder: &Holder) -> Vec<Holder> {
        let mut others = Vec::new();
        for index in self.overlapped(cidr) {
            let holders = self.taken.entry(index).or_default();
            others.extend(holders.iter().filter(|h| *h != holder).cloned());
            if !holders.contains(holder) {
                holders.push(holder.clone());
            }
        }
        others.sort();
        others.dedup();
        others
    }

    fn release(&mut self, cidr: IpNetwork, holder: &Holder) {
        for index in self.overlapped(cidr) {
            if let Some(holders) = self.taken.get_mut(&index) {
                holders.retain(|h| h != holder);
                if holders.is_empty() {
                    self.taken.remove(&index);
                }
            }
        }
    }

    /// The next free block, round robin from where the last search stopped.
    fn take_free(&mut self, node: &str) -> Option<IpNetwork> {
        let blocks = self.blocks();
        let start = self.next % blocks;
        // Taken blocks are skipped in order, so the search costs the run of taken ones.
        let mut index = start;
        loop {
            if let std::collections::btree_map::Entry::Vacant(free) = self.taken.entry(index) {
                free.insert(vec![Holder::Node(node.to_string())]);
                self.next = (index + 1) % blocks;
                return Some(self.block(index));
            }
            index = (index + 1) % blocks;
            if index == start {
                return None;
            }
        }
    }
}

/// Something about a Node's podCIDR that an operator must hear of. The podCIDR stays the Node's:
/// it always takes precedence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Conflict {
    OutsideClusterCidrs {
        pod_cidr: IpNetwork,
        cluster_cidrs: Vec<IpNetwork>,
    },
    HeldByNode {
        pod_cidr: IpNetwork,
        other: String,
    },
    OverlapsServiceCidr {
        pod_cidr: IpNetwork,
        service_cidr: IpNetwork,
    },
    /// A cluster CIDR holds one of the Node's own addresses: pods would shadow the node.
    HoldsNodeAddress {
        cluster_cidr: IpNetwork,
        address: std::net::IpAddr,
        kind: String,
    },
}

impl std::fmt::Display for Conflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Conflict::OutsideClusterCidrs {
                pod_cidr,
                cluster_cidrs,
            } => {
                let list: Vec<String> = cluster_cidrs.iter().map(ToString::to_string).collect();
                write!(
                    f,
                    "podCIDR {pod_cidr} is outside the cluster CIDRs ({}); kept, as a Node's podCIDR takes precedence",
                    list.join(", ")
                )
            }
            Conflict::HeldByNode { pod_cidr, other } => {
                write!(f, "podCIDR {pod_cidr} overlaps the podCIDR of node {other}")
            }
            Conflict::OverlapsServiceCidr {
                pod_cidr,
                service_cidr,
            } => write!(
                f,
                "podCIDR {pod_cidr} overlaps the Service CIDR {service_cidr}"
            ),
            Conflict::HoldsNodeAddress {
                cluster_cidr,
                address,
                kind,
            } => write!(
                f,
                "cluster CIDR {cluster_cidr} overlaps the Node's address {address} ({kind})"
            ),
        }
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("no free /{mask} block left in cluster CIDR {cluster} for node {node}")]
pub struct Exhausted {
    pub node: String,
    pub cluster: IpNetwork,
    pub mask: u8,
}

/// The blocks of every cluster CIDR and which Node holds what.
#[derive(Debug)]
pub struct NodeIpam {
    sets: Vec<CidrSet>,
    service_cidrs: Vec<IpNetwork>,
    /// Each Node's podCIDRs as last observed or allocated.
    nodes: BTreeMap<String, Vec<IpNetwork>>,
}

impl NodeIpam {
    pub fn new(settings: &NodeIpamSettings) -> NodeIpam {
        let mut sets: Vec<CidrSet> = settings
            .cluster_cidrs
            .iter()
            .map(|&(cluster, mask)| CidrSet {
                cluster,
                mask,
                taken: BTreeMap::new(),
                next: 0,
            })
            .collect();
        for &service in &settings.service_cidrs {
            for set in &mut sets {
                set.hold(service, &Holder::Service(service));
            }
        }
        NodeIpam {
            sets,
            service_cidrs: settings.service_cidrs.clone(),
            nodes: BTreeMap::new(),
        }
    }

    pub fn pod_cidrs(&self, node: &str) -> Option<&[IpNetwork]> {
        self.nodes.get(node).map(Vec::as_slice)
    }

    /// Records the podCIDRs a Node has (from the platform, kube-controller-manager or an earlier
    /// allocation): they are the Node's whatever they conflict with, and what they conflict with
    /// is returned.
    pub fn observe(&mut self, node: &str, pod_cidrs: &[IpNetwork]) -> Vec<Conflict> {
        if self.nodes.get(node).map(Vec::as_slice) == Some(pod_cidrs) {
            return Vec::new();
        }
        self.release(node);
        let holder = Holder::Node(node.to_string());
        let mut conflicts = Vec::new();
        for &pod_cidr in pod_cidrs {
            let mut inside = false;
            for set in &mut self.sets {
                if set.overlapped(pod_cidr).is_empty() {
                    continue;
                }
                inside = true;
                for other in set.hold(pod_cidr, &holder) {
                    if let Holder::Node(other) = other {
                        conflicts.push(Conflict::HeldByNode { pod_cidr, other });
                    }
                }
            }
            if !inside {
                conflicts.push(Conflict::OutsideClusterCidrs {
                    pod_cidr,
                    cluster_cidrs: self.sets.iter().map(|s| s.cluster).collect(),
                });
                // Outside every set, duplicates can only be found against the other Nodes.
                for (other, theirs) in &self.nodes {
                    if theirs.iter().any(|&c| overlaps(c, pod_cidr)) {
                        conflicts.push(Conflict::HeldByNode {
                            pod_cidr,
                            other: other.clone(),
                        });
                    }
                }
            }
            for &service_cidr in &self.service_cidrs {
                if overlaps(pod_cidr, service_cidr) {
                    conflicts.push(Conflict::OverlapsServiceCidr {
                        pod_cidr,
                        service_cidr,
                    });
                }
            }
        }
        conflicts.dedup();
        self.nodes.insert(node.to_string(), pod_cidrs.to_vec());
        conflicts
    }

    /// The Node's own addresses (`(address, type)`) that a cluster CIDR holds.
    pub fn address_conflicts(&self, addresses: &[(std::net::IpAddr, String)]) -> Vec<Conflict> {
        let mut found = Vec::new();
        for set in &self.sets {
            for (address, kind) in addresses {
                if set.cluster.contains(*address) {
                    found.push(Conflict::HoldsNodeAddress {
                        cluster_cidr: set.cluster,
                        address: *address,
                        kind: kind.clone(),
                    });
                }
            }
        }
        found
    }

    /// One free block per cluster CIDR, in their order, for a Node without a podCIDR. All or
    /// nothing: when one cluster CIDR is exhausted, the blocks taken from the others go back.
    pub fn allocate(&mut self, node: &str) -> Result<Vec<IpNetwork>, Exhausted> {
        if let Some(held) = self.nodes.get(node) {
            return Ok(held.clone());
        }
        let mut taken = Vec::new();
        for i in 0..self.sets.len() {
            match self.sets[i].take_free(node) {
                Some(block) => taken.push(block),
                None => {
                    let holder = Holder::Node(node.to_string());
                    for (set, &block) in self.sets.iter_mut().zip(&taken) {
                        set.release(block, &holder);
                    }
                    let set = &self.sets[i];
                    return Err(Exhausted {
                        node: node.to_string(),
                        cluster: set.cluster,
                        mask: set.mask,
                    });
                }
            }
        }
        self.nodes.insert(node.to_string(), taken.clone());
        Ok(taken)
    }

    /// The Node is gone (or its allocation was not written): its blocks are free again unless
    /// something else overlaps them.
    pub fn release(&mut self, node: &str) {
        let Some(cidrs) = self.nodes.remove(node) else {
            return;
        };
        let holder = Holder::Node(node.to_string());
        for cidr in cidrs {
            for set in &mut self.sets {
                set.release(cidr, &holder);
            }
        }
    }
}

#[cfg(test)]
#[path = "node_ipam_tests.rs"]
mod tests;
