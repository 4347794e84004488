//! The Service compiler: Services and EndpointSlices in, the entries of SERVICES and BACKENDS out,
//! with this node's health-check ports and a name for every backend set. Plain data, so the agent
//! diffs it against what the maps hold and `sluicectl` prints it.
//!
//! The semantics are kube-proxy's (AntreaProxy shares them). A frontend is an address, port and
//! protocol in one scope: INTERNAL for the node's pods and the node itself, EXTERNAL for what
//! arrives on the uplink. It points at a backend set: the endpoints one Service port sends one
//! address family to, either all of them or only this node's. Frontends sending to the same
//! endpoints share the set, so a client's AFFINITY entry (keyed by set) holds whichever of those
//! addresses it uses.
//!
//! internalTrafficPolicy applies to the ClusterIP only and externalTrafficPolicy to the
//! externally facing addresses reached from outside. The pods and the node reaching a NodePort,
//! LoadBalancer IP or externalIP get every endpoint whatever either policy says: the API
//! promises them "Cluster" semantics, and kube-proxy short-circuits them to the cluster-wide
//! endpoints, as if they had gone out to the load balancer and come back in.

mod endpoints;
mod parse;
#[cfg(test)]
mod tests;

use std::{
    collections::{btree_map::Entry, BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use k8s_openapi::api::core::v1::Service as K8sService;

use crate::k8s::EndpointSlice;
use sluice_common::{scope, service_flags, BackendKey, IpKey, NatTarget, Service, ServiceKey};

use super::{
    ip_key,
    policy::{protocol_name, Pool},
};

const IPPROTO_SCTP: u8 = 132;
use endpoints::{port_backends, slices_by_service, usable, Backend};
use parse::{namespace_of, parse_service, Parsed, Port};

/// The label the EndpointSlice controller puts on a slice, naming its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The API's default for `sessionAffinityConfig.clientIP.timeoutSeconds` (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;

pub struct ServiceInputs<'a> {
    /// References, not copies: the agent compiles straight from its watch stores.
    pub services: &'a [&'a K8sService],
    pub slices: &'a [&'a EndpointSlice],
    /// This node's name, as endpoints carry it in `nodeName`.
    pub node_name: &'a str,
    /// This node's addresses that NodePorts listen on.
    pub node_port_addresses: &'a [IpAddr],
}

/// What this node answers on a `healthCheckNodePort` (LoadBalancer, externalTrafficPolicy
/// Local): the load balancer sends traffic only to nodes with local endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    /// "namespace/name".
    pub service: String,
    /// Ready endpoints on this node, counted by address in one family so that a dual-stack pod
    /// counts once. Terminating ones do not count: the load balancer should move away.
    pub local_endpoints: u32,
}

/// A part of a Service that cannot be applied as written: the address or port it names gets no
/// frontend, the rest of the Service does.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("service {service}: field {field}: value {value:?}: {reason}")]
pub struct ServiceError {
    /// "namespace/name".
    pub service: String,
    pub field: String,
    pub value: String,
    pub reason: String,
}

/// The Service maps of one node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceTables {
    pub frontends: BTreeMap<ServiceKey, Service>,
    /// Every backend set's endpoints: the ones to pick at indices `0..count`, then the draining
    /// ones (serving, terminating while others are ready), which keep their connections.
    pub backends: BTreeMap<BackendKey, NatTarget>,
    /// By `healthCheckNodePort`.
    pub health_checks: BTreeMap<u16, HealthCheck>,
    /// What each backend set stands for: "namespace/name:port", the port by name or else by
    /// number, with "(local)" and "(IPv6)" where they apply.
    pub names: BTreeMap<u32, String>,
    pub errors: Vec<ServiceError>,
}

/// Backend set ids, stable across compiles: AFFINITY entries name a set and an index, so a
/// number must not change meaning while entries may still refer to it. Owned by the caller and
/// passed to every `compile`; a set absent from the latest compile loses its number.
#[derive(Clone, Debug)]
pub struct SetAllocator {
    pool: Pool<SetKey>,
}

impl Default for SetAllocator {
    fn default() -> SetAllocator {
        SetAllocator::new()
    }
}

impl SetAllocator {
    pub fn new() -> SetAllocator {
        // 0 is never handed out, so a zeroed SERVICES value names no set.
        SetAllocator {
            pool: Pool::new(1, u32::MAX),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct SetKey {
    service: String,
    port_name: String,
    ipv6: bool,
    local: bool,
}

/// Compiles the cluster's Services for this node. Set ids come from `sets`, which must be the
/// same across calls for them to stay stable. Never fails: what cannot be applied is in
/// `errors` and gets no frontend.
pub fn compile(inputs: &ServiceInputs, sets: &mut SetAllocator) -> ServiceTables {
    let mut services: Vec<&K8sService> = inputs.services.to_vec();
    services.sort_by_key(|svc| (namespace_of(svc), svc.metadata.name.as_deref()));
    let slices = slices_by_service(inputs.slices);
    let mut compiler = Compiler {
        inputs,
        sets,
        tables: ServiceTables::default(),
        owners: BTreeMap::new(),
        built: BTreeMap::new(),
    };
    for svc in services {
        if let Some(parsed) = parse_service(svc, &mut compiler.tables.errors) {
            let slices = slices.get(&(parsed.namespace, parsed.name));
            compiler.add_service(&parsed, slices.map_or(&[][..], Vec::as_slice));
        }
    }
    compiler.sets.pool.sweep();
    compiler.tables
}

/// One port of one Service, with its endpoints.
struct Target<'t> {
    svc: &'t Parsed<'t>,
    port: &'t Port<'t>,
    backends: &'t [Backend],
}

struct Compiler<'c> {
    inputs: &'c ServiceInputs<'c>,
    sets: &'c mut SetAllocator,
    tables: ServiceTables,
    /// Which Service each (address, port, protocol) belongs to.
    owners: BTreeMap<(IpKey, u16, u8), String>,
    /// Sets already filled in this compile: (id, count).
    built: BTreeMap<SetKey, (u32, u32)>,
}

impl Compiler<'_> {
    fn add_service(&mut self, svc: &Parsed, slices: &[&EndpointSlice]) {
        let mut ready_local = BTreeSet::new();
        for port in &svc.ports {
            let backends = port_backends(slices, port, self.inputs.node_name);
            ready_local.extend(
                backends
                    .iter()
                    .filter(|b| b.local && b.ready)
                    .map(|b| b.addr),
            );
            let target = Target {
                svc,
                port,
                backends: &backends,
            };
            for address in &svc.cluster_ips {
                let internal = [(scope::INTERNAL, svc.internal_local)];
                self.add_frontend(&target, &address.field, address.ip, port.port, &internal);
            }
            // From inside, externally facing addresses get every endpoint (see the module
            // docs); only traffic from outside follows externalTrafficPolicy.
            let both = [
                (scope::INTERNAL, false),
                (scope::EXTERNAL, svc.external_local),
            ];
            if let Some(node_port) = port.node_port {
                let field = format!("{}.nodePort", port.field);
                for &ip in self.inputs.node_port_addresses {
                    if svc.has_family(ip) {
                        self.add_frontend(&target, &field, ip, node_port, &both);
                    }
                }
            }
            for address in &svc.external_ips {
                self.add_frontend(&target, &address.field, address.ip, port.port, &both);
            }
        }
        if let Some(port) = svc.health_check_port {
            let v6 = ready_local.iter().filter(|a| a.is_ipv6()).count();
            let count = v6.max(ready_local.len() - v6);
            match self.tables.health_checks.entry(port) {
                Entry::Occupied(taken) => {
                    let reason = format!("already used by Service {}", taken.get().service);
                    self.error(svc, "spec.healthCheckNodePort", &port.to_string(), reason);
                }
                Entry::Vacant(slot) => {
                    slot.insert(HealthCheck {
                        service: svc.key.clone(),
                        local_endpoints: count as u32,
                    });
                }
            }
        }
    }

    /// The frontends of one address in the given scopes, each `(scope, local endpoints only)`.
    /// An address, port and protocol already claimed by an earlier Service stays with it.
    fn add_frontend(
        &mut self,
        target: &Target,
        field: &str,
        ip: IpAddr,
        port: u16,
        scopes: &[(u8, bool)],
    ) {
        let svc = target.svc;
        let proto = target.port.proto;
        if proto == IPPROTO_SCTP {
            if let Some(endpoint) = target.backends.iter().find(|b| b.port != port) {
                let value = format!("{port} -> {}", endpoint.port);
                let reason = "SCTP is load-balanced without changing ports (its CRC32c covers \
                              the whole packet and is not recomputed): the endpoints must listen \
                              on the frontend's port, so SCTP NodePorts are not supported"
                    .to_string();
                self.error(svc, field, &value, reason);
                return;
            }
        }
        let addr = ip_key(ip);
        let owner = self
            .owners
            .entry((addr, port, proto))
            .or_insert_with(|| svc.key.clone());
        if *owner != svc.key {
            let value = format!("{}/{}", SocketAddr::new(ip, port), protocol_name(proto));
            let reason = format!("frontend already used by Service {owner}");
            self.error(svc, field, &value, reason);
            return;
        }
        for &(scope, local) in scopes {
            let key = ServiceKey {
                addr,
                port,
                proto,
                scope,
            };
            // The same Service naming an address twice (an externalIP that is also its
            // LoadBalancer IP) keeps the first.
            if self.tables.frontends.contains_key(&key) {
                continue;
            }
            let Some((backend_set, count)) = self.backend_set(target, ip.is_ipv6(), local) else {
                let reason = "no backend set id left".to_string();
                self.error(svc, &target.port.field, "", reason);
                return;
            };
            let mut flags = 0;
            // The endpoint may be on another node: its replies must come back through this
            // node to be translated back. With externalTrafficPolicy Local it is on this node.
            if scope == scope::EXTERNAL && !svc.external_local {
                flags |= service_flags::SNAT;
            }
            if svc.affinity.is_some() {
                flags |= service_flags::AFFINITY;
            }
            if local && count == 0 && !usable(target.backends, ip.is_ipv6(), false).0.is_empty() {
                flags |= service_flags::NO_LOCAL_ENDPOINTS;
            }
            let value = Service {
                backend_set,
                count,
                flags,
                affinity_timeout: svc.affinity.unwrap_or(0),
            };
            self.tables.frontends.insert(key, value);
        }
    }

    /// The set of `target`'s endpoints of one family, all or local only: (id, count).
    fn backend_set(&mut self, target: &Target, ipv6: bool, local: bool) -> Option<(u32, u32)> {
        let key = SetKey {
            service: target.svc.key.clone(),
            port_name: target.port.name.to_string(),
            ipv6,
            local,
        };
        if let Some(&built) = self.built.get(&key) {
            return Some(built);
        }
        let id = self.sets.pool.get(key.clone())?;
        let (pickable, draining) = usable(target.backends, ipv6, local);
        for (index, backend) in (0u32..).zip(pickable.iter().chain(&draining)) {
            self.tables.backends.insert(
                BackendKey { set: id, index },
                NatTarget {
                    addr: ip_key(backend.addr),
                    port: backend.port,
                    _pad: 0,
                },
            );
        }
        let port = match target.port.name {
            "" => target.port.port.to_string(),
            name => name.to_string(),
        };
        let qualifiers = match (local, ipv6) {
            (false, false) => "",
            (true, false) => " (local)",
            (false, true) => " (IPv6)",
            (true, true) => " (local, IPv6)",
        };
        let name = format!("{}:{port}{qualifiers}", target.svc.key);
        self.tables.names.insert(id, name);
        let built = (id, pickable.len() as u32);
        self.built.insert(key, built);
        Some(built)
    }

    fn error(&mut self, svc: &Parsed, field: &str, value: &str, reason: String) {
        self.tables.errors.push(ServiceError {
            service: svc.key.clone(),
            field: field.to_string(),
            value: value.to_string(),
            reason,
        });
    }
}
