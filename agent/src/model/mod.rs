//! The desired pipeline of this node, computed from the local endpoints: plain data that either
//! backend realizes, that tests compare, and that `sluicectl` prints in stage names.

pub mod policy;
pub mod service;

use std::{collections::BTreeMap, fmt, net::IpAddr};

pub use crate::cni::PodRef;
use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};
use sluice_common::{
    Endpoint, IpKey, RemoteNode, SpoofGuardEntry, SpoofGuardKey, IP_KEY_PREFIX_BITS,
};

/// A pod interface on this node, as the CNI set it up. Persisted by `endpoints::Store`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalEndpoint {
    pub container_id: String,
    pub ifname: String,
    pub netns: String,
    pub host_ifname: String,
    pub host_ifindex: u32,
    pub mac: Mac,
    pub ips: Vec<IpNetwork>,
    /// The Pod it belongs to, when the runtime named it (records of older agents have none).
    #[serde(default)]
    pub pod: Option<PodRef>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// A locally administered unicast MAC derived from the pod's IPv4 address, so a pod keeps its
    /// MAC when its interface is recreated with the same address.
    pub fn for_ipv4(ip: std::net::Ipv4Addr) -> Mac {
        let [a, b, c, d] = ip.octets();
        Mac([0x0a, 0x58, a, b, c, d])
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl From<Mac> for String {
    fn from(mac: Mac) -> String {
        mac.to_string()
    }
}

impl TryFrom<String> for Mac {
    type Error = String;
    fn try_from(text: String) -> Result<Mac, String> {
        let bytes: Vec<u8> = text
            .split(':')
            .map(|part| u8::from_str_radix(part, 16))
            .collect::<Result<_, _>>()
            .map_err(|_| format!("invalid MAC address {text:?}"))?;
        let octets: [u8; 6] = bytes
            .try_into()
            .map_err(|_| format!("invalid MAC address {text:?}"))?;
        Ok(Mac(octets))
    }
}

pub fn ip_key(ip: IpAddr) -> IpKey {
    match ip {
        IpAddr::V4(v4) => IpKey::v4(v4.octets()),
        IpAddr::V6(v6) => IpKey::v6(v6.octets()),
    }
}

pub fn key_ip(key: &IpKey) -> Option<IpAddr> {
    match key.family {
        sluice_common::FAMILY_IPV4 => {
            let a = key.addr;
            Some(IpAddr::from([a[0], a[1], a[2], a[3]]))
        }
        sluice_common::FAMILY_IPV6 => Some(IpAddr::from(key.addr)),
        _ => None,
    }
}

/// Another node's pod CIDR and the node's address, from the Node objects.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RemoteRoute {
    pub node_name: String,
    pub pod_cidr: IpNetwork,
    pub node_ip: IpAddr,
}

/// A REMOTE_NODES (LPM) key: prefix length in bits of the whole `IpKey`, and the network.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct CidrKey {
    pub prefix_len: u32,
    pub addr: IpKey,
}

impl CidrKey {
    pub fn new(cidr: IpNetwork) -> CidrKey {
        CidrKey {
            prefix_len: IP_KEY_PREFIX_BITS + cidr.prefix() as u32,
            addr: ip_key(cidr.network()),
        }
    }

    pub fn cidr(&self) -> Option<IpNetwork> {
        let prefix = self.prefix_len.checked_sub(IP_KEY_PREFIX_BITS)? as u8;
        IpNetwork::new(key_ip(&self.addr)?, prefix).ok()
    }
}

/// The node's eBPF pipeline entries, stage by stage.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pipeline {
    pub spoof_guard: BTreeMap<SpoofGuardKey, SpoofGuardEntry>,
    pub l3_forwarding: BTreeMap<IpKey, Endpoint>,
    /// Other nodes' pod CIDRs, reached through the tunnel (encap mode only: in noEncap mode the
    /// node's routes carry that traffic).
    pub remote_nodes: BTreeMap<CidrKey, RemoteNode>,
}

impl Pipeline {
    pub fn compile<'a>(
        endpoints: impl IntoIterator<Item = &'a LocalEndpoint>,
        tunneled: impl IntoIterator<Item = &'a RemoteRoute>,
    ) -> Pipeline {
        let mut pipeline = Pipeline::default();
        for route in tunneled {
            pipeline.remote_nodes.insert(
                CidrKey::new(route.pod_cidr),
                RemoteNode {
                    node_ip: ip_key(route.node_ip),
                },
            );
        }
        for ep in endpoints {
            for net in &ep.ips {
                let addr = ip_key(net.ip());
                pipeline.spoof_guard.insert(
                    SpoofGuardKey {
                        ifindex: ep.host_ifindex,
                        addr,
                    },
                    SpoofGuardEntry {
                        mac: ep.mac.0,
                        _pad: [0; 2],
                    },
                );
                pipeline.l3_forwarding.insert(
                    addr,
                    Endpoint {
                        ifindex: ep.host_ifindex,
                        mac: ep.mac.0,
                        _pad: [0; 2],
                        flags: 0,
                    },
                );
            }
        }
        pipeline
    }
}

impl fmt::Display for Pipeline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "SpoofGuard")?;
        for (key, entry) in &self.spoof_guard {
            let ip = key_ip(&key.addr).map_or("?".into(), |ip| ip.to_string());
            writeln!(
                f,
                "  port={} src_ip={} src_mac={} -> continue",
                key.ifindex,
                ip,
                Mac(entry.mac)
            )?;
        }
        writeln!(f, "  * -> drop")?;
        writeln!(f, "L3Forwarding")?;
        for (key, ep) in &self.l3_forwarding {
            let ip = key_ip(key).map_or("?".into(), |ip| ip.to_string());
            writeln!(
                f,
                "  dst_ip={} -> port={} dst_mac={}",
                ip,
                ep.ifindex,
                Mac(ep.mac)
            )?;
        }
        for (key, remote) in &self.remote_nodes {
            let cidr = key.cidr().map_or("?".into(), |c| c.to_string());
            let node = key_ip(&remote.node_ip).map_or("?".into(), |ip| ip.to_string());
            writeln!(f, "  dst_cidr={cidr} -> tunnel to node {node}")?;
        }
        writeln!(f, "  * -> gateway")
    }
}

/// What turns `current` into `desired`: entries to write and keys to delete.
pub struct Diff<K, V> {
    pub upserts: Vec<(K, V)>,
    pub deletes: Vec<K>,
}

pub fn diff<K: Ord + Copy, V: PartialEq + Copy>(
    current: &BTreeMap<K, V>,
    desired: &BTreeMap<K, V>,
) -> Diff<K, V> {
    // One walk of both in key order: a lookup per key would cost a tree search each, and
    // IPCACHE holds every pod address of the cluster.
    let (mut upserts, mut deletes) = (Vec::new(), Vec::new());
    let (mut cur, mut want) = (current.iter().peekable(), desired.iter().peekable());
    loop {
        match (cur.peek(), want.peek()) {
            (None, None) => break,
            (Some(&(k, _)), None) => {
                deletes.push(*k);
                cur.next();
            }
            (None, Some(&(k, v))) => {
                upserts.push((*k, *v));
                want.next();
            }
            (Some(&(ck, cv)), Some(&(wk, wv))) => match ck.cmp(wk) {
                std::cmp::Ordering::Less => {
                    deletes.push(*ck);
                    cur.next();
                }
                std::cmp::Ordering::Greater => {
                    upserts.push((*wk, *wv));
                    want.next();
                }
                std::cmp::Ordering::Equal => {
                    if cv != wv {
                        upserts.push((*wk, *wv));
                    }
                    cur.next();
                    want.next();
                }
            },
        }
    }
    Diff { upserts, deletes }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(id: &str, ifindex: u32, ip: &str) -> LocalEndpoint {
        let net: IpNetwork = ip.parse().unwrap();
        let IpAddr::V4(v4) = net.ip() else {
            unreachable!()
        };
        LocalEndpoint {
            container_id: id.into(),
            ifname: "eth0".into(),
            netns: format!("/run/netns/{id}"),
            host_ifname: format!("sl{id}"),
            host_ifindex: ifindex,
            mac: Mac::for_ipv4(v4),
            ips: vec![net],
            pod: None,
        }
    }

    #[test]
    fn pipeline_of_two_pods_prints_stage_by_stage() {
        let eps = [
            endpoint("a", 7, "10.244.0.2/24"),
            endpoint("b", 9, "10.244.0.3/24"),
        ];
        let remote = RemoteRoute {
            node_name: "n2".into(),
            pod_cidr: "10.244.1.0/24".parse().unwrap(),
            node_ip: "192.168.77.2".parse().unwrap(),
        };
        let text = Pipeline::compile(&eps, [&remote]).to_string();
        assert_eq!(
            text,
            "SpoofGuard\n\
             \x20 port=7 src_ip=10.244.0.2 src_mac=0a:58:0a:f4:00:02 -> continue\n\
             \x20 port=9 src_ip=10.244.0.3 src_mac=0a:58:0a:f4:00:03 -> continue\n\
             \x20 * -> drop\n\
             L3Forwarding\n\
             \x20 dst_ip=10.244.0.2 -> port=7 dst_mac=0a:58:0a:f4:00:02\n\
             \x20 dst_ip=10.244.0.3 -> port=9 dst_mac=0a:58:0a:f4:00:03\n\
             \x20 dst_cidr=10.244.1.0/24 -> tunnel to node 192.168.77.2\n\
             \x20 * -> gateway\n"
        );
    }

    #[test]
    fn diff_touches_only_changed_entries() {
        let before = Pipeline::compile(
            &[
                endpoint("a", 7, "10.244.0.2/24"),
                endpoint("b", 9, "10.244.0.3/24"),
            ],
            [],
        );
        let after = Pipeline::compile(
            &[
                endpoint("a", 7, "10.244.0.2/24"),
                endpoint("c", 11, "10.244.0.4/24"),
            ],
            [],
        );
        let d = diff(&before.l3_forwarding, &after.l3_forwarding);
        assert_eq!(d.upserts.len(), 1);
        assert_eq!(key_ip(&d.upserts[0].0), Some("10.244.0.4".parse().unwrap()));
        assert_eq!(d.deletes.len(), 1);
        assert_eq!(key_ip(&d.deletes[0]), Some("10.244.0.3".parse().unwrap()));
    }

    #[test]
    fn mac_round_trips_and_rejects_garbage() {
        let mac = Mac::try_from("0a:58:0a:f4:00:02".to_string()).unwrap();
        assert_eq!(mac.to_string(), "0a:58:0a:f4:00:02");
        assert!(Mac::try_from("0a:58:zz:f4:00:02".to_string()).is_err());
        assert!(Mac::try_from("0a:58".to_string()).is_err());
    }
}
