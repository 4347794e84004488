//! The NetworkPolicy maps (IPCACHE, ENDPOINT_POLICY, POLICY, POLICY_EXACT): read back, and
//! synced in an order that never leaves a pod less isolated than desired.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, Result};
use aya::maps::{lpm_trie::Key, MapError};
use sluice_common::{
    map_names, EndpointPolicy, IpKey, PolicyKey, PolicyRule, POLICY_ANY_PORT,
    POLICY_KEY_EXACT_BITS, POLICY_PENDING, PROTO_ANY,
};

use super::maps::{capacity, full, remove, Maps};
use crate::{
    datapath::SyncReport,
    model::{
        diff,
        policy::{PolicyLpmKey, PolicyTables},
        CidrKey,
    },
};

impl Maps {
    pub fn policy_tables(&self) -> Result<PolicyTables> {
        let mut policy: BTreeMap<PolicyLpmKey, PolicyRule> = self
            .policy
            .iter()
            .map(|e| {
                e.map(|(k, v)| {
                    (
                        PolicyLpmKey {
                            key: k.data(),
                            prefix_len: k.prefix_len(),
                        },
                        v,
                    )
                })
            })
            .collect::<Result<_, _>>()?;
        for entry in self.policy_exact.iter() {
            let (key, rule) = entry?;
            policy.insert(from_exact(key), rule);
        }
        Ok(PolicyTables {
            ipcache: self
                .ipcache
                .iter()
                .map(|e| {
                    e.map(|(k, v)| {
                        (
                            CidrKey {
                                prefix_len: k.prefix_len(),
                                addr: k.data(),
                            },
                            v,
                        )
                    })
                })
                .collect::<Result<_, _>>()?,
            endpoint_policy: self.endpoint_policy.iter().collect::<Result<_, _>>()?,
            policy,
            ..PolicyTables::default()
        })
    }

    /// Makes the policy maps equal to `desired`, in an order under which no moment (the agent
    /// may die at any) leaves a pod less isolated than the current or the desired state:
    /// isolation first, then identities, then allows; what goes, goes tightest first (allows,
    /// then isolation, then identities).
    ///
    /// A write that fails leaves the maps tighter than desired, never looser, and the error
    /// names the map, its capacity and what is missing:
    /// - an allow entry that cannot be written is left out: its pods allow less;
    /// - an identity that cannot be written would let its addresses be judged as a wider
    ///   prefix's, so every isolated pod of the node then allows nothing (`POLICY_PENDING`).
    ///
    /// Diffs against what the previous sync wrote; the maps are read back only when there is
    /// no such record (the first sync, or one after a failure, whose partial writes are unknown).
    pub fn sync_policy(&mut self, desired: &PolicyTables) -> Result<SyncReport> {
        let current = match self.policy_written.take() {
            Some(written) => written,
            None => self.policy_tables()?,
        };
        let report = self.write_policy(&current, desired)?;
        self.policy_written = Some(PolicyTables {
            ipcache: desired.ipcache.clone(),
            endpoint_policy: desired.endpoint_policy.clone(),
            policy: desired.policy.clone(),
            ..PolicyTables::default()
        });
        Ok(report)
    }

    fn write_policy(
        &mut self,
        current: &PolicyTables,
        desired: &PolicyTables,
    ) -> Result<SyncReport> {
        let ipcache = diff(&current.ipcache, &desired.ipcache);
        let endpoints = diff(&current.endpoint_policy, &desired.endpoint_policy);
        let policy = diff(&current.policy, &desired.policy);
        for (key, value) in &endpoints.upserts {
            self.endpoint_policy.insert(key, value, 0).map_err(|e| {
                full(
                    e,
                    map_names::ENDPOINT_POLICY,
                    capacity(&self.endpoint_policy),
                )
            })?;
        }
        for key in &policy.deletes {
            self.remove_policy(key)?;
        }
        for (i, (key, value)) in ipcache.upserts.iter().enumerate() {
            if let Err(e) = self
                .ipcache
                .insert(&Key::new(key.prefix_len, key.addr), value, 0)
            {
                self.allow_nothing(desired)?;
                return Err(full(e, map_names::IPCACHE, capacity(&self.ipcache))).with_context(
                    || {
                        format!(
                        "map IPCACHE (capacity {}): {} of {} new identities not written; every \
                         isolated pod on this node allows nothing until they are",
                        capacity(&self.ipcache),
                        ipcache.upserts.len() - i,
                        ipcache.upserts.len()
                    )
                    },
                );
            }
        }
        let mut unwritten: BTreeSet<&str> = BTreeSet::new();
        let mut first_failure = None;
        for (key, value) in &policy.upserts {
            if let Err(e) = self.write_policy_entry(key, *value) {
                let policy_name = desired
                    .rules
                    .get(&value.rule)
                    .map_or("?", |r| r.policy.as_str());
                unwritten.insert(policy_name);
                first_failure.get_or_insert((e, to_exact(key).is_some()));
            }
        }
        for key in &endpoints.deletes {
            remove(&mut self.endpoint_policy, key, map_names::ENDPOINT_POLICY)?;
        }
        for key in &ipcache.deletes {
            match self.ipcache.remove(&Key::new(key.prefix_len, key.addr)) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(e).context("deleting an entry of map IPCACHE"),
            }
        }
        if let Some((error, exact)) = first_failure {
            let (name, capacity) = if exact {
                (map_names::POLICY_EXACT, capacity(&self.policy_exact))
            } else {
                (map_names::POLICY, capacity(&self.policy))
            };
            return Err(error.context(format!(
                "map {name} (capacity {capacity}): allow entries of {} not written; the pods \
                 they select allow less than they say until they are",
                unwritten.into_iter().collect::<Vec<_>>().join(", ")
            )));
        }
        Ok(SyncReport {
            written: ipcache.upserts.len() + policy.upserts.len() + endpoints.upserts.len(),
            deleted: ipcache.deletes.len() + policy.deletes.len() + endpoints.deletes.len(),
        })
    }

    /// Every direction `desired` isolates allows nothing (the entries exist: overwriting them
    /// cannot fail for room).
    fn allow_nothing(&mut self, desired: &PolicyTables) -> Result<()> {
        let pending = |id: u32| if id == 0 { 0 } else { POLICY_PENDING };
        for (key, ep) in &desired.endpoint_policy {
            let closed = EndpointPolicy {
                ingress_policy: pending(ep.ingress_policy),
                egress_policy: pending(ep.egress_policy),
            };
            self.endpoint_policy.insert(key, closed, 0).map_err(|e| {
                full(
                    e,
                    map_names::ENDPOINT_POLICY,
                    capacity(&self.endpoint_policy),
                )
            })?;
        }
        Ok(())
    }

    /// Isolates new pod addresses in both directions, allowing nothing (`POLICY_PENDING`).
    pub fn isolate_pending(&mut self, addrs: &[IpKey]) -> Result<()> {
        let pending = EndpointPolicy {
            ingress_policy: POLICY_PENDING,
            egress_policy: POLICY_PENDING,
        };
        // Recorded as written, so the next sync replaces (or removes) them like its own.
        let mut written = self.policy_written.take();
        for addr in addrs {
            self.endpoint_policy.insert(addr, pending, 0).map_err(|e| {
                full(
                    e,
                    map_names::ENDPOINT_POLICY,
                    capacity(&self.endpoint_policy),
                )
            })?;
            if let Some(written) = &mut written {
                written.endpoint_policy.insert(*addr, pending);
            }
        }
        self.policy_written = written;
        Ok(())
    }

    /// Writes one allow entry where the datapath looks for it: POLICY_EXACT unless it is a port
    /// range. Outside a sync (tests, benchmarks): the next sync reads the maps back.
    pub fn insert_policy(&mut self, key: &PolicyLpmKey, rule: PolicyRule) -> Result<()> {
        self.policy_written = None;
        self.write_policy_entry(key, rule)
    }

    fn write_policy_entry(&mut self, key: &PolicyLpmKey, rule: PolicyRule) -> Result<()> {
        match to_exact(key) {
            Some(exact) => self
                .policy_exact
                .insert(exact, rule, 0)
                .map_err(|e| full(e, map_names::POLICY_EXACT, capacity(&self.policy_exact))),
            None => self
                .policy
                .insert(&Key::new(key.prefix_len, key.key), rule, 0)
                .map_err(|e| full(e, map_names::POLICY, capacity(&self.policy))),
        }
    }

    fn remove_policy(&mut self, key: &PolicyLpmKey) -> Result<()> {
        match to_exact(key) {
            Some(exact) => remove(&mut self.policy_exact, &exact, map_names::POLICY_EXACT),
            None => match self.policy.remove(&Key::new(key.prefix_len, key.key)) {
                Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
                Err(e) => Err(e).context("deleting an entry of map POLICY"),
            },
        }
    }
}

/// The POLICY_EXACT key standing for an LPM entry that needs no prefix match, if it is one.
fn to_exact(key: &PolicyLpmKey) -> Option<PolicyKey> {
    let full = POLICY_KEY_EXACT_BITS + 16;
    match key.prefix_len {
        len if len == full => Some(key.key),
        len if len == POLICY_KEY_EXACT_BITS && key.key.proto == PROTO_ANY => Some(PolicyKey {
            port: [0; 2],
            ..key.key
        }),
        len if len == POLICY_KEY_EXACT_BITS => Some(PolicyKey {
            _pad: POLICY_ANY_PORT,
            port: [0; 2],
            ..key.key
        }),
        _ => None,
    }
}

fn from_exact(key: PolicyKey) -> PolicyLpmKey {
    if key._pad == POLICY_ANY_PORT {
        PolicyLpmKey {
            key: PolicyKey { _pad: 0, ..key },
            prefix_len: POLICY_KEY_EXACT_BITS,
        }
    } else if key.proto == PROTO_ANY {
        PolicyLpmKey {
            key,
            prefix_len: POLICY_KEY_EXACT_BITS,
        }
    } else {
        PolicyLpmKey {
            key,
            prefix_len: POLICY_KEY_EXACT_BITS + 16,
        }
    }
}
