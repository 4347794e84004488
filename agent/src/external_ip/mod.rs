//! ServiceExternalIP, as Antrea's feature of that name. A Service of type LoadBalancer with the
//! annotation `service.antrea.io/external-ip-pool: <pool>` gets an IP from that Antrea
//! ExternalIPPool (`crd.antrea.io/v1beta1`, cluster-scoped) in `status.loadBalancer.ingress[0].ip`,
//! and one Ready node that the pool's `nodeSelector` matches answers ARP for it; when that node
//! goes (deleted, or its Ready condition not True) another eligible node takes over.
//!
//! As in Antrea, allocation is central: `sluice-controller`, while it holds its Lease, is the
//! one writer of Service and pool statuses ([`Role::Controller`]). Ownership is not: every agent
//! runs [`plan`] on the same cluster state ([`Role::Node`]) and gets the same answer, with no
//! cluster membership protocol:
//! - Allocation is stateless: the Services' statuses are the allocation record. An IP is in use
//!   while a Service that asks for its pool holds it, so a deleted Service frees its IP with no
//!   write and a controller restart or handover loses nothing.
//! - Ownership is rendezvous hashing over the eligible nodes (see `owner`), so a node leaving moves
//!   only its own IPs. The price: a node reported Ready whose agent is down keeps its IPs until it
//!   is NotReady or deleted.
//! - A LoadBalancer IP that something else wrote (MetalLB, a cloud) is left alone here and served
//!   by the datapath all the same, as every `status.loadBalancer.ingress` IP is.
//!
//! Left out: `spec.loadBalancerIP` (asking for a given IP), IPv6 announcement (see [`announce`]).
//! The callers wire it up: the controller applies the writes ([`apply_writes`]); an agent gives
//! its `owned` IPs to the datapath and [`announce`]s each IP that became owned.

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

/// Who plans: the controller writes statuses; a node learns which IPs it answers for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role<'a> {
    Controller,
    Node(&'a str),
}

/// What [`plan`] decided.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ExternalIpState {
    /// Status writes, for the controller only (empty for a node): releases first, then
    /// assignments, then pool usage, so an IP is never on two Services at once.
    pub writes: Vec<StatusWrite>,
    /// Every IP handed out once the writes are done.
    pub assignments: BTreeMap<IpAddr, Assignment>,
    /// The IPs this node answers for (empty for the controller).
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

/// Decides which IPs every Service has and which node answers for each; for the controller,
/// the status writes that make it so, for a node, the IPs it answers for. Pure and
/// deterministic: every agent gets the same answer from the same cluster state. Never fails:
/// what cannot be done is in `errors`.
pub fn plan<'a>(
    pools: impl IntoIterator<Item = &'a DynamicObject>,
    services: impl IntoIterator<Item = &'a Service>,
    nodes: impl IntoIterator<Item = &'a Node>,
    role: Role,
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
    let owned = match role {
        Role::Node(me) => assignments
            .iter()
            .filter(|(_, a)| a.owner.as_deref() == Some(me))
            .map(|(ip, _)| *ip)
            .collect(),
        Role::Controller => BTreeSet::new(),
    };

    let writes = if role == Role::Controller {
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
