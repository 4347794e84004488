//! Connections that outlived what they were balanced to: after a Service sync, the SERVICE_NAT
//! entries (both directions) and AFFINITY entries of a frontend that went away, or of an
//! endpoint its backend set no longer holds (not ready, replaced, its target port changed, an
//! externalIP or LoadBalancer IP removed), are deleted. The connection's next packet is balanced
//! anew. A set holds its serving terminating endpoints past `count` while others are ready, so
//! their connections drain instead. Only a sync that took something away walks the maps.

use std::collections::BTreeSet;

use anyhow::{Context, Result};
use sluice_common::{
    map_names, nat_flags, scope, AffinityKey, BackendKey, FlowKey, IpKey, NatTarget, Service,
    ServiceKey,
};

use super::maps::{remove, Maps, ServiceEntries};
use crate::model::{service::ServiceTables, Diff};

/// A frontend without its scope: what a SERVICE_NAT entry knows of it.
type Frontend = (IpKey, u16, u8);

/// What a sync took away: the frontends that went or lost endpoints, and the sets that did.
pub(super) struct Losses {
    frontends: BTreeSet<Frontend>,
    sets: BTreeSet<u32>,
}

impl Losses {
    pub(super) fn of(
        (frontends, backends): &ServiceEntries,
        desired: &ServiceTables,
        frontend_diff: &Diff<ServiceKey, Service>,
        backend_diff: &Diff<BackendKey, NatTarget>,
    ) -> Losses {
        // A set loses an endpoint when an index goes or comes to hold another endpoint.
        let mut sets: BTreeSet<u32> = backend_diff.deletes.iter().map(|k| k.set).collect();
        sets.extend(
            backend_diff
                .upserts
                .iter()
                .filter(|(key, _)| backends.contains_key(key))
                .map(|(key, _)| key.set),
        );
        let mut lost: BTreeSet<Frontend> = frontend_diff.deletes.iter().map(unscoped).collect();
        lost.extend(
            frontend_diff
                .upserts
                .iter()
                .filter(|(key, new)| {
                    frontends
                        .get(key)
                        .is_some_and(|old| old.backend_set != new.backend_set)
                })
                .map(|(key, _)| unscoped(key)),
        );
        if !sets.is_empty() {
            lost.extend(
                desired
                    .frontends
                    .iter()
                    .filter(|(_, svc)| sets.contains(&svc.backend_set))
                    .map(|(key, _)| unscoped(key)),
            );
        }
        Losses {
            frontends: lost,
            sets,
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.frontends.is_empty() && self.sets.is_empty()
    }
}

fn unscoped(key: &ServiceKey) -> Frontend {
    (key.addr, key.port, key.proto)
}

/// Whether `set` holds the endpoint at any index (pickable or draining).
fn holds(desired: &ServiceTables, set: u32, endpoint: (IpKey, u16)) -> bool {
    desired
        .backends
        .range(
            BackendKey { set, index: 0 }..=BackendKey {
                set,
                index: u32::MAX,
            },
        )
        .any(|(_, target)| (target.addr, target.port) == endpoint)
}

/// Whether the frontend, in either scope, still balances to the endpoint.
fn still_balanced(desired: &ServiceTables, frontend: Frontend, endpoint: (IpKey, u16)) -> bool {
    let (addr, port, proto) = frontend;
    [scope::INTERNAL, scope::EXTERNAL].into_iter().any(|scope| {
        let key = ServiceKey {
            addr,
            port,
            proto,
            scope,
        };
        desired
            .frontends
            .get(&key)
            .is_some_and(|svc| holds(desired, svc.backend_set, endpoint))
    })
}

impl Maps {
    /// Deletes the entries `losses` left without their endpoint; returns how many.
    pub(super) fn flush_connections(
        &mut self,
        desired: &ServiceTables,
        losses: &Losses,
    ) -> Result<usize> {
        let mut dead_nat: Vec<FlowKey> = Vec::new();
        for item in self.service_nat.iter() {
            let (key, entry) = item.context("reading map SERVICE_NAT")?;
            // The DNAT entry knows the frontend by its key, the reverse one by its value.
            let (frontend, endpoint) = if entry.flags & nat_flags::REVERSE != 0 {
                (
                    (entry.src, entry.src_port, key.proto),
                    (key.src, key.src_port),
                )
            } else {
                (
                    (key.dst, key.dst_port, key.proto),
                    (entry.dst, entry.dst_port),
                )
            };
            if losses.frontends.contains(&frontend) && !still_balanced(desired, frontend, endpoint)
            {
                dead_nat.push(key);
            }
        }
        let mut dead_affinity: Vec<AffinityKey> = Vec::new();
        for item in self.affinity.iter() {
            let (key, entry) = item.context("reading map AFFINITY")?;
            let endpoint = (entry.endpoint.addr, entry.endpoint.port);
            if losses.sets.contains(&key.backend_set) && !holds(desired, key.backend_set, endpoint)
            {
                dead_affinity.push(key);
            }
        }
        for key in &dead_nat {
            remove(&mut self.service_nat, key, map_names::SERVICE_NAT)?;
        }
        for key in &dead_affinity {
            remove(&mut self.affinity, key, map_names::AFFINITY)?;
        }
        Ok(dead_nat.len() + dead_affinity.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::diff;
    use sluice_common::service_flags;

    const TCP: u8 = 6;

    fn ip(last: u8) -> IpKey {
        IpKey::v4([10, 244, 0, last])
    }

    fn vip(last: u8) -> IpKey {
        IpKey::v4([10, 96, 0, last])
    }

    /// Frontend `vip(n):80` (internal scope) → set `n` of `endpoints` (port 8080), the first
    /// `count` pickable.
    fn tables(services: &[(u8, &[u8], u32)]) -> ServiceTables {
        let mut tables = ServiceTables::default();
        for &(n, endpoints, count) in services {
            let key = ServiceKey {
                addr: vip(n),
                port: 80,
                proto: TCP,
                scope: scope::INTERNAL,
            };
            let svc = Service {
                backend_set: n as u32,
                count,
                flags: service_flags::AFFINITY,
                affinity_timeout: 0,
            };
            tables.frontends.insert(key, svc);
            for (index, &e) in (0u32..).zip(endpoints) {
                let target = NatTarget {
                    addr: ip(e),
                    port: 8080,
                    _pad: 0,
                };
                tables.backends.insert(
                    BackendKey {
                        set: n as u32,
                        index,
                    },
                    target,
                );
            }
        }
        tables
    }

    fn losses(from: &ServiceTables, to: &ServiceTables) -> Losses {
        let current = (from.frontends.clone(), from.backends.clone());
        Losses::of(
            &current,
            to,
            &diff(&current.0, &to.frontends),
            &diff(&current.1, &to.backends),
        )
    }

    #[test]
    fn only_a_sync_that_takes_something_away_walks_the_maps() {
        let before = tables(&[(1, &[2, 3], 2), (2, &[4], 1)]);
        assert!(losses(&before, &before).is_empty());
        // A new endpoint and a new Service take nothing away.
        let grown = tables(&[(1, &[2, 3, 5], 3), (2, &[4], 1), (3, &[6], 1)]);
        assert!(losses(&before, &grown).is_empty());
    }

    #[test]
    fn a_lost_endpoint_or_frontend_names_what_lost_it() {
        let before = tables(&[(1, &[2, 3], 2), (2, &[4], 1), (3, &[6], 1)]);
        // Set 1 loses endpoint 3; Service 3 goes; Service 2 is untouched.
        let after = tables(&[(1, &[2], 1), (2, &[4], 1)]);
        let lost = losses(&before, &after);
        assert_eq!(lost.sets, BTreeSet::from([1, 3]));
        assert_eq!(
            lost.frontends,
            BTreeSet::from([(vip(1), 80, TCP), (vip(3), 80, TCP)])
        );
        assert!(still_balanced(&after, (vip(1), 80, TCP), (ip(2), 8080)));
        assert!(!still_balanced(&after, (vip(1), 80, TCP), (ip(3), 8080)));
        assert!(!still_balanced(&after, (vip(3), 80, TCP), (ip(6), 8080)));
    }

    #[test]
    fn a_draining_endpoint_is_still_balanced_to_until_it_goes() {
        // Endpoint 3 terminates while 2 is ready: past `count`, still in the set.
        let before = tables(&[(1, &[2, 3], 2)]);
        let draining = tables(&[(1, &[2, 3], 1)]);
        assert!(losses(&before, &draining).is_empty());
        assert!(still_balanced(&draining, (vip(1), 80, TCP), (ip(3), 8080)));
        let gone = tables(&[(1, &[2], 1)]);
        let lost = losses(&draining, &gone);
        assert_eq!(lost.frontends, BTreeSet::from([(vip(1), 80, TCP)]));
        assert!(!still_balanced(&gone, (vip(1), 80, TCP), (ip(3), 8080)));
    }

    #[test]
    fn a_changed_target_port_is_a_lost_endpoint() {
        let before = tables(&[(1, &[2], 1)]);
        let mut after = before.clone();
        after
            .backends
            .get_mut(&BackendKey { set: 1, index: 0 })
            .unwrap()
            .port = 9090;
        let lost = losses(&before, &after);
        assert_eq!(lost.frontends, BTreeSet::from([(vip(1), 80, TCP)]));
        assert!(!still_balanced(&after, (vip(1), 80, TCP), (ip(2), 8080)));
        assert!(still_balanced(&after, (vip(1), 80, TCP), (ip(2), 9090)));
    }
}
