//! ServiceExternalIP, as Antrea's feature of that name. A Service of type LoadBalancer with the
//! annotation `service.antrea.io/external-ip-pool: <pool>` gets an IP from that Antrea
//! ExternalIPPool (`crd.antrea.io/v1beta1`, cluster-scoped) in `status.loadBalancer.ingress[0].ip`,
//! and one Ready node that the pool's `nodeSelector` matches answers ARP for it; when that node
//! goes (deleted, or its Ready condition not True) another eligible node takes over.
//!
//! Antrea does this with a central controller (allocation) and a memberlist cluster (ownership).
//! Sluice has no central controller: every agent runs [`plan`] on the same cluster store and gets
//! the same answer, which is safe without a lock because:
//! - Only one agent writes: the agent of the Ready node with the lowest name. Every agent agrees
//!   on it from the Node objects alone and the next one takes over when it goes, so there are no
//!   write races and no Lease to keep. The price, shared with ownership: a node reported Ready
//!   whose agent is down still counts, so writes stall (and its IPs stay with it) until it is
//!   NotReady or deleted.
//! - Allocation is stateless: the Services' statuses are the allocation record. An IP is in use
//!   while a Service that asks for its pool holds it, so a deleted Service frees its IP with no
//!   write and an agent restart loses nothing.
//! - Ownership is rendezvous hashing over the eligible nodes (see `owner`), so a node leaving moves
//!   only its own IPs.
//!
//! Left out: `spec.loadBalancerIP` (asking for a given IP), IPv6 announcement (see [`announce`]).
//! The caller wires it up: `plan` after each store change, [`apply_writes`] with the writes (only
//! the writer agent gets any), the `owned` IPs to the datapath and [`announce`] for each IP that
//! became owned.

mod allocate;
mod garp;
mod owner;
mod pool;
mod status;
#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
};

use k8s_openapi::api::core::v1::{LoadBalancerIngress, Node, Service};
use kube::{
    api::{ApiResource, DynamicObject, GroupVersionKind},
    ResourceExt,
};
use serde::{Deserialize, Serialize};

pub use garp::announce;
pub use status::{apply_writes, WriteError, WriteErrors};

/// The Service annotation that names the pool to take an IP from (Antrea's).
pub const POOL_ANNOTATION: &str = "service.antrea.io/external-ip-pool";

/// `crd.antrea.io/v1beta1` `externalippools`, for a dynamic `Api`.
pub fn pool_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("crd.antrea.io", "v1beta1", "ExternalIPPool"),
        "externalippools",
    )
}

/// What [`plan`] decided.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ExternalIpState {
    /// Status writes, for the writer agent only (empty on every other node): releases first, then
    /// assignments, then pool usage, so an IP is never on two Services at once.
    pub writes: Vec<StatusWrite>,
    /// Every IP handed out once the writes are done.
    pub assignments: BTreeMap<IpAddr, Assignment>,
    /// The IPs this node answers for.
    pub owned: BTreeSet<IpAddr>,
    pub errors: Vec<ExternalIpError>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    /// "namespace/name".
    pub service: String,
    pub pool: String,
    /// The node that answers for the IP; `None` when no Ready node matches the pool's selector.
    pub owner: Option<String>,
}

/// Antrea's `status.usage` of an ExternalIPPool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub total: i64,
    pub used: i64,
}

/// One merge patch on an object's `/status`.
#[derive(Clone, Debug, PartialEq)]
pub enum StatusWrite {
    /// Sets `status.loadBalancer.ingress` of a Service; empty removes it.
    Service {
        namespace: String,
        name: String,
        ingress: Vec<LoadBalancerIngress>,
    },
    /// Sets `status.usage` of an ExternalIPPool.
    PoolUsage { pool: String, usage: Usage },
}

impl fmt::Display for StatusWrite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StatusWrite::Service {
                namespace,
                name,
                ingress,
            } => {
                let ips: Vec<&str> = ingress
                    .iter()
                    .map(|i| i.ip.as_deref().or(i.hostname.as_deref()).unwrap_or(""))
                    .collect();
                write!(
                    f,
                    "Service {namespace}/{name} status.loadBalancer.ingress = [{}]",
                    ips.join(", ")
                )
            }
            StatusWrite::PoolUsage { pool, usage } => write!(
                f,
                "ExternalIPPool {pool} status.usage = {{total: {}, used: {}}}",
                usage.total, usage.used
            ),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ExternalIpError {
    /// The pool hands out nothing until it is fixed.
    #[error("ExternalIPPool {pool}: field {field}: value {value:?}: {reason}")]
    InvalidPool {
        pool: String,
        field: String,
        value: String,
        reason: String,
    },
    /// As Antrea, the Service's IP (if any) is released.
    #[error("Service {service}: ExternalIPPool {pool} does not exist")]
    NoSuchPool { service: String, pool: String },
    /// The Service keeps its status as it is, and no node answers for its IP.
    #[error("Service {service}: ExternalIPPool {pool} is invalid, it hands out nothing")]
    UnusablePool { service: String, pool: String },
    /// The Service gets no IP (and no write) until one is free.
    #[error("Service {service}: ExternalIPPool {pool} has no free IP (all {total} in use)")]
    PoolExhausted {
        service: String,
        pool: String,
        total: i64,
    },
}

/// Decides, for the node `my_node`, which status writes to make (if it is the writer), which IPs
/// every Service has, and which of them this node answers for. Pure and deterministic: every agent
/// gets the same answer from the same cluster state. Never fails: what cannot be done is in
/// `errors`.
pub fn plan<'a>(
    pools: impl IntoIterator<Item = &'a DynamicObject>,
    services: impl IntoIterator<Item = &'a Service>,
    nodes: impl IntoIterator<Item = &'a Node>,
    my_node: &str,
) -> ExternalIpState {
    let mut errors = Vec::new();
    let pools = pool::parse_pools(pools, &mut errors);
    let allocation = allocate::allocate(&pools, services, &mut errors);
    let ready: Vec<(&str, &Node)> = nodes
        .into_iter()
        .filter(|n| owner::is_ready(n))
        .filter_map(|n| Some((n.metadata.name.as_deref()?, n)))
        .collect();

    let eligible: BTreeMap<&str, Vec<&str>> = pools
        .valid
        .iter()
        .map(|(name, pool)| {
            let nodes = ready
                .iter()
                .filter(|(_, n)| pool.selector.matches(n.labels()))
                .map(|(name, _)| *name)
                .collect();
            (name.as_str(), nodes)
        })
        .collect();
    let assignments: BTreeMap<IpAddr, Assignment> = allocation
        .ips
        .into_iter()
        .map(|(ip, (service, pool))| {
            let candidates = eligible.get(pool.as_str()).into_iter().flatten().copied();
            let owner = owner::owner(ip, candidates).map(str::to_string);
            (
                ip,
                Assignment {
                    service,
                    pool,
                    owner,
                },
            )
        })
        .collect();
    let owned = assignments
        .iter()
        .filter(|(_, a)| a.owner.as_deref() == Some(my_node))
        .map(|(ip, _)| *ip)
        .collect();

    let writer = ready.iter().map(|(name, _)| *name).min();
    let writes = if writer == Some(my_node) {
        let mut writes = allocation.writes;
        for (name, pool) in &pools.valid {
            let used = assignments.values().filter(|a| &a.pool == name).count();
            let usage = Usage {
                total: pool.total(),
                used: i64::try_from(used).unwrap_or(i64::MAX),
            };
            if pool.stored_usage != Some(usage) {
                writes.push(StatusWrite::PoolUsage {
                    pool: name.clone(),
                    usage,
                });
            }
        }
        writes
    } else {
        Vec::new()
    };
    ExternalIpState {
        writes,
        assignments,
        owned,
        errors,
    }
}
