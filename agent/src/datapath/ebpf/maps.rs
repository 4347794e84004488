//! The pinned maps of the eBPF datapath, typed. The agent takes them from the loaded object;
//! `sluicectl` and tests open the same maps from their pins.

use std::{collections::BTreeMap, path::Path};

use anyhow::{Context, Result};
use aya::maps::{
    lpm_trie::{Key, LpmTrie},
    Array, HashMap, IterableMap, Map, MapData, MapError, PerCpuArray, RingBuf,
};
use sluice_common::{
    map_names, AffinityEntry, AffinityKey, BackendKey, CtEntry, CtKey, DropReason, Endpoint,
    EndpointPolicy, ExternalIp, FlowKey, Identity, IpKey, NatEntry, NatTarget, NodeConfig,
    PolicyKey, PolicyRule, RemoteNode, RuleStats, Service, ServiceKey, SpoofGuardEntry,
    SpoofGuardKey, Stage,
};

use super::service_flush::Losses;
use crate::{
    datapath::SyncReport,
    model::{diff, service::ServiceTables, CidrKey, Pipeline},
};

pub struct Maps {
    pub endpoints: HashMap<MapData, IpKey, Endpoint>,
    pub spoof_guard: HashMap<MapData, SpoofGuardKey, SpoofGuardEntry>,
    pub remote_nodes: LpmTrie<MapData, IpKey, RemoteNode>,
    pub ipcache: LpmTrie<MapData, IpKey, Identity>,
    pub endpoint_policy: HashMap<MapData, IpKey, EndpointPolicy>,
    pub policy: LpmTrie<MapData, PolicyKey, PolicyRule>,
    pub policy_exact: HashMap<MapData, PolicyKey, PolicyRule>,
    pub conntrack: HashMap<MapData, CtKey, CtEntry>,
    pub services: HashMap<MapData, ServiceKey, Service>,
    pub backends: HashMap<MapData, BackendKey, NatTarget>,
    pub service_nat: HashMap<MapData, FlowKey, NatEntry>,
    pub affinity: HashMap<MapData, AffinityKey, AffinityEntry>,
    pub external_ips: HashMap<MapData, IpKey, ExternalIp>,
    /// SERVICES and BACKENDS as the last sync left them: the next one diffs against this
    /// instead of reading 100,000 entries back (a failed sync forgets it). Kept as sorted
    /// vectors: a third of the memory of the maps they come from.
    services_written: Option<WrittenServices>,
    /// IPCACHE, ENDPOINT_POLICY and POLICY(_EXACT) as the last sync left them, with the pods
    /// isolated since: as `services_written`, so that a sync costs the change, not the cluster's
    /// 30,000 identities read back.
    pub(super) policy_written: Option<crate::model::policy::PolicyTables>,
    pub rule_stats: PerCpuArray<MapData, RuleStats>,
    pub policy_events: RingBuf<MapData>,
    pub node_config: Array<MapData, NodeConfig>,
    pub stage_packets: PerCpuArray<MapData, u64>,
    pub drops: PerCpuArray<MapData, u64>,
}

/// SERVICES and BACKENDS entries.
pub type ServiceEntries = (
    BTreeMap<ServiceKey, Service>,
    BTreeMap<BackendKey, NatTarget>,
);
type WrittenServices = (Vec<(ServiceKey, Service)>, Vec<(BackendKey, NatTarget)>);

/// Counter totals over all CPUs, by name.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Counters {
    pub stages: Vec<(Stage, u64)>,
    pub drops: Vec<(DropReason, u64)>,
}

impl Counters {
    pub fn drops_for(&self, reason: DropReason) -> u64 {
        self.drops
            .iter()
            .find(|(r, _)| *r == reason)
            .map_or(0, |(_, n)| *n)
    }
}

fn typed<T: TryFrom<Map, Error = MapError>>((map, name): (Map, &str)) -> Result<T> {
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

impl Maps {
    /// The maps of a freshly loaded object (the agent, tests).
    pub fn take(bpf: &mut aya::Ebpf) -> Result<Maps> {
        Maps::from_source(|name| {
            bpf.take_map(name)
                .with_context(|| format!("the eBPF object has no map {name}"))
        })
    }

    /// The maps a running (or stopped) agent pinned (`sluicectl`, tests).
    pub fn from_pins(dir: &Path) -> Result<Maps> {
        Maps::from_source(|name| {
            let path = dir.join(name);
            let data = MapData::from_pin(&path).with_context(|| {
                format!(
                    "opening pinned map {} (is the agent running on this node?)",
                    path.display()
                )
            })?;
            Ok(Map::from_map_data(data)?)
        })
    }

    fn from_source(mut get: impl FnMut(&str) -> Result<Map>) -> Result<Maps> {
        let mut map = |name: &'static str| get(name).map(|m| (m, name));
        Ok(Maps {
            endpoints: typed(map(map_names::ENDPOINTS)?)?,
            spoof_guard: typed(map(map_names::SPOOF_GUARD)?)?,
            remote_nodes: typed(map(map_names::REMOTE_NODES)?)?,
            ipcache: typed(map(map_names::IPCACHE)?)?,
            endpoint_policy: typed(map(map_names::ENDPOINT_POLICY)?)?,
            policy: typed(map(map_names::POLICY)?)?,
            policy_exact: typed(map(map_names::POLICY_EXACT)?)?,
            conntrack: typed(map(map_names::CONNTRACK)?)?,
            services: typed(map(map_names::SERVICES)?)?,
            backends: typed(map(map_names::BACKENDS)?)?,
            service_nat: typed(map(map_names::SERVICE_NAT)?)?,
            affinity: typed(map(map_names::AFFINITY)?)?,
            external_ips: typed(map(map_names::EXTERNAL_IPS)?)?,
            services_written: None,
            policy_written: None,
            rule_stats: typed(map(map_names::RULE_STATS)?)?,
            policy_events: typed(map(map_names::POLICY_EVENTS)?)?,
            node_config: typed(map(map_names::NODE_CONFIG)?)?,
            stage_packets: typed(map(map_names::STAGE_PACKETS)?)?,
            drops: typed(map(map_names::DROPS)?)?,
        })
    }

    /// The entries the kernel holds now.
    pub fn pipeline(&self) -> Result<Pipeline> {
        Ok(Pipeline {
            spoof_guard: self
                .spoof_guard
                .iter()
                .collect::<Result<BTreeMap<_, _>, _>>()?,
            l3_forwarding: self
                .endpoints
                .iter()
                .collect::<Result<BTreeMap<_, _>, _>>()?,
            remote_nodes: self
                .remote_nodes
                .iter()
                .map(|entry| {
                    entry.map(|(key, node)| {
                        let cidr = CidrKey {
                            prefix_len: key.prefix_len(),
                            addr: key.data(),
                        };
                        (cidr, node)
                    })
                })
                .collect::<Result<BTreeMap<_, _>, _>>()?,
        })
    }

    pub fn sync(&mut self, desired: &Pipeline) -> Result<SyncReport> {
        let current = self.pipeline()?;
        let mut report = SyncReport::default();
        let spoof = diff(&current.spoof_guard, &desired.spoof_guard);
        let fwd = diff(&current.l3_forwarding, &desired.l3_forwarding);
        let remote = diff(&current.remote_nodes, &desired.remote_nodes);
        for key in &remote.deletes {
            match self
                .remote_nodes
                .remove(&Key::new(key.prefix_len, key.addr))
            {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(e).context("deleting an entry of map REMOTE_NODES"),
            }
        }
        for (key, value) in &remote.upserts {
            self.remote_nodes
                .insert(&Key::new(key.prefix_len, key.addr), value, 0)
                .map_err(|e| full(e, map_names::REMOTE_NODES, capacity(&self.remote_nodes)))?;
        }
        // Deletes first: they free room for the writes in a full map.
        for key in &fwd.deletes {
            remove(&mut self.endpoints, key, map_names::ENDPOINTS)?;
        }
        for key in &spoof.deletes {
            remove(&mut self.spoof_guard, key, map_names::SPOOF_GUARD)?;
        }
        // SpoofGuard before L3Forwarding: a pod becomes reachable only once it may send.
        for (key, value) in &spoof.upserts {
            self.spoof_guard
                .insert(key, value, 0)
                .map_err(|e| full(e, map_names::SPOOF_GUARD, capacity(&self.spoof_guard)))?;
        }
        for (key, value) in &fwd.upserts {
            self.endpoints
                .insert(key, value, 0)
                .map_err(|e| full(e, map_names::ENDPOINTS, capacity(&self.endpoints)))?;
        }
        report.written = spoof.upserts.len() + fwd.upserts.len() + remote.upserts.len();
        report.deleted = spoof.deletes.len() + fwd.deletes.len() + remote.deletes.len();
        Ok(report)
    }

    /// The Service entries the kernel holds now: frontends and backends.
    pub fn service_entries(
        &self,
    ) -> Result<(
        BTreeMap<ServiceKey, Service>,
        BTreeMap<BackendKey, NatTarget>,
    )> {
        Ok((
            self.services.iter().collect::<Result<_, _>>()?,
            self.backends.iter().collect::<Result<_, _>>()?,
        ))
    }

    /// Makes SERVICES and BACKENDS equal to `desired`. A set's new endpoints are written before
    /// the frontend's count grows, and dropped only after it shrank, so no packet picks an
    /// index that is not there. Connections to endpoints no longer `live` (in no EndpointSlice)
    /// lose their NAT and affinity entries: their next packet is balanced anew, and a TCP
    /// endpoint that never saw the connection resets it instead of it hanging.
    pub fn sync_services(&mut self, desired: &ServiceTables) -> Result<SyncReport> {
        let current = match self.services_written.take() {
            Some((frontends, backends)) => (
                frontends.into_iter().collect(),
                backends.into_iter().collect(),
            ),
            None => self.service_entries()?,
        };
        let report = self.write_services(&current, desired)?;
        self.services_written = Some((
            desired.frontends.iter().map(|(k, v)| (*k, *v)).collect(),
            desired.backends.iter().map(|(k, v)| (*k, *v)).collect(),
        ));
        Ok(report)
    }

    fn write_services(
        &mut self,
        current: &ServiceEntries,
        desired: &ServiceTables,
    ) -> Result<SyncReport> {
        let frontends = diff(&current.0, &desired.frontends);
        let backends = diff(&current.1, &desired.backends);
        let losses = Losses::of(current, desired, &frontends, &backends);
        for (key, value) in &backends.upserts {
            self.backends
                .insert(key, value, 0)
                .map_err(|e| full(e, map_names::BACKENDS, capacity(&self.backends)))?;
        }
        for (key, value) in &frontends.upserts {
            self.services
                .insert(key, value, 0)
                .map_err(|e| full(e, map_names::SERVICES, capacity(&self.services)))?;
        }
        for key in &frontends.deletes {
            remove(&mut self.services, key, map_names::SERVICES)?;
        }
        for key in &backends.deletes {
            remove(&mut self.backends, key, map_names::BACKENDS)?;
        }
        // Only a sync that took something away walks SERVICE_NAT (its size is the node's
        // connection count, not the Services').
        let flushed = if losses.is_empty() {
            0
        } else {
            self.flush_connections(desired, &losses)?
        };
        Ok(SyncReport {
            written: frontends.upserts.len() + backends.upserts.len(),
            deleted: frontends.deletes.len() + backends.deletes.len() + flushed,
        })
    }

    /// Makes EXTERNAL_IPS (the LoadBalancer IPs this node answers ARP for) equal to `desired`.
    pub fn sync_external_ips(&mut self, desired: &BTreeMap<IpKey, ExternalIp>) -> Result<()> {
        let current: BTreeMap<IpKey, ExternalIp> =
            self.external_ips.iter().collect::<Result<_, _>>()?;
        let changes = diff(&current, desired);
        for key in &changes.deletes {
            remove(&mut self.external_ips, key, map_names::EXTERNAL_IPS)?;
        }
        for (key, value) in &changes.upserts {
            self.external_ips
                .insert(key, value, 0)
                .map_err(|e| full(e, map_names::EXTERNAL_IPS, capacity(&self.external_ips)))?;
        }
        Ok(())
    }

    /// Packets and bytes per rule id, summed over CPUs; rules with no traffic are left out.
    pub fn rule_stats(&self) -> Result<BTreeMap<u32, RuleStats>> {
        let mut out = BTreeMap::new();
        for rule in 1..sluice_common::MAX_RULES {
            let per_cpu = self.rule_stats.get(&rule, 0)?;
            let total = per_cpu
                .iter()
                .fold(RuleStats::default(), |acc, s| RuleStats {
                    packets: acc.packets + s.packets,
                    bytes: acc.bytes + s.bytes,
                });
            if total.packets > 0 {
                out.insert(rule, total);
            }
        }
        Ok(out)
    }

    pub fn counters(&self) -> Result<Counters> {
        let sum = |map: &PerCpuArray<MapData, u64>, index: u32| -> Result<u64> {
            Ok(map.get(&index, 0)?.iter().sum())
        };
        Ok(Counters {
            stages: Stage::ALL
                .iter()
                .map(|s| Ok((*s, sum(&self.stage_packets, *s as u32)?)))
                .collect::<Result<_>>()?,
            drops: DropReason::ALL
                .iter()
                .map(|r| Ok((*r, sum(&self.drops, *r as u32)?)))
                .collect::<Result<_>>()?,
        })
    }
}

pub(super) fn remove<K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    key: &K,
    name: &str,
) -> Result<()> {
    match map.remove(key) {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(e) => Err(e).with_context(|| format!("deleting an entry of map {name}")),
    }
}

/// The kernel's size of a map (0 when it cannot say).
pub(super) fn capacity<K: aya::Pod, V>(map: &impl IterableMap<K, V>) -> u32 {
    map.map().info().map_or(0, |i| i.max_entries())
}

/// A full hash map answers E2BIG; say so in words, with the map's size (`bpfMapSizes`).
pub(super) fn full(err: MapError, name: &str, capacity: u32) -> anyhow::Error {
    if let MapError::SyscallError(sys) = &err {
        if sys.io_error.raw_os_error() == Some(libc::E2BIG) {
            return anyhow::anyhow!(
                "map {name} (capacity {capacity}) is full: no room for another entry"
            );
        }
    }
    anyhow::Error::new(err).context(format!("writing map {name}"))
}
