//! A rule's POLICY entries, before the policy id of the pod they apply to is known.

use sluice_common::{PolicyKey, POLICY_KEY_EXACT_BITS, PROTO_ANY};

use super::{
    cluster::{Cluster, Peers, PodEndpoint},
    parse::Rule,
    ports::{port_prefixes, PortMatch},
    Direction, PolicyLpmKey,
};

#[derive(Clone, Copy, Debug)]
pub(super) struct Allow {
    peer: u32,
    proto: u8,
    port: u16,
    /// Significant bits of `port`: 0 any port, 16 exactly this one.
    port_bits: u8,
}

impl Allow {
    pub(super) fn key(&self, policy: u32) -> PolicyLpmKey {
        PolicyLpmKey {
            key: PolicyKey {
                policy,
                peer: self.peer,
                proto: self.proto,
                _pad: 0,
                port: self.port.to_be_bytes(),
            },
            prefix_len: POLICY_KEY_EXACT_BITS + u32::from(self.port_bits),
        }
    }
}

/// Whether the rule needs the peer pods listed: egress named ports resolve against each
/// destination pod.
pub(super) fn needs_peer_pods(rule: &Rule, direction: Direction) -> bool {
    direction == Direction::Egress
        && rule
            .ports
            .iter()
            .any(|p| matches!(p, PortMatch::Named { .. }))
}

/// The entries that are the same for every pod the rule applies to: all but ingress named
/// ports, which depend on the selected pod.
pub(super) fn shared_allows(
    cluster: &Cluster,
    rule: &Rule,
    direction: Direction,
    peers: &Peers,
) -> Vec<Allow> {
    let peer_ids = peers.identities();
    let for_peers = |proto: u8, port: u16, port_bits: u8| {
        peer_ids.iter().map(move |&peer| Allow {
            peer,
            proto,
            port,
            port_bits,
        })
    };
    if rule.ports.is_empty() {
        return for_peers(PROTO_ANY, 0, 0).collect();
    }
    let mut out = Vec::new();
    for port in &rule.ports {
        match port {
            PortMatch::Proto(proto) => out.extend(for_peers(*proto, 0, 0)),
            PortMatch::Range { proto, first, last } => {
                for (start, bits) in port_prefixes(*first, *last) {
                    out.extend(for_peers(*proto, start, bits));
                }
            }
            PortMatch::Named { proto, name } if direction == Direction::Egress => {
                for &(e, ip) in &peers.pods {
                    let number = cluster.endpoints[e].port(name, *proto);
                    if let (Some(port), Some(peer)) = (number, cluster.identity_of(ip)) {
                        out.push(Allow {
                            peer,
                            proto: *proto,
                            port,
                            port_bits: 16,
                        });
                    }
                }
            }
            PortMatch::Named { .. } => {}
        }
    }
    out
}

/// Ingress named ports name a port of the selected (destination) pod itself; a pod without
/// that port gets nothing from them.
pub(super) fn ingress_named_ports(rule: &Rule, ep: &PodEndpoint, peers: &Peers) -> Vec<Allow> {
    let mut out = Vec::new();
    for port in &rule.ports {
        if let PortMatch::Named { proto, name } = port {
            if let Some(number) = ep.port(name, *proto) {
                out.extend(peers.identities().into_iter().map(|peer| Allow {
                    peer,
                    proto: *proto,
                    port: number,
                    port_bits: 16,
                }));
            }
        }
    }
    out
}
