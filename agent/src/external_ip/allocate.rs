//! Which IP each Service gets. The Services' statuses are the allocation record: nothing is
//! remembered between runs, so every agent computes the same allocation from the same store.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use k8s_openapi::api::core::v1::{LoadBalancerIngress, Service};

use super::{
    pool::{Pool, Pools},
    ExternalIpError, StatusWrite, POOL_ANNOTATION,
};

pub(super) struct Allocation {
    /// IP → (Service "namespace/name", pool).
    pub ips: BTreeMap<IpAddr, (String, String)>,
    /// Releases first, then assignments.
    pub writes: Vec<StatusWrite>,
}

struct Svc<'a> {
    key: String,
    namespace: &'a str,
    name: &'a str,
    /// The pool this Service asks for: only a LoadBalancer's annotation counts (as Antrea).
    pool: Option<&'a str>,
    ingress: &'a [LoadBalancerIngress],
}

impl<'a> Svc<'a> {
    fn new(svc: &'a Service) -> Svc<'a> {
        let namespace = svc.metadata.namespace.as_deref().unwrap_or_default();
        let name = svc.metadata.name.as_deref().unwrap_or_default();
        let load_balancer =
            svc.spec.as_ref().and_then(|s| s.type_.as_deref()) == Some("LoadBalancer");
        let pool = svc
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(POOL_ANNOTATION))
            .map(String::as_str)
            .filter(|p| load_balancer && !p.is_empty());
        let ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_deref())
            .unwrap_or_default();
        Svc {
            key: format!("{namespace}/{name}"),
            namespace,
            name,
            pool,
            ingress,
        }
    }

    fn ips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.ingress.iter().filter_map(ingress_ip)
    }

    fn write(&self, ingress: Vec<LoadBalancerIngress>) -> StatusWrite {
        StatusWrite::Service {
            namespace: self.namespace.to_string(),
            name: self.name.to_string(),
            ingress,
        }
    }
}

fn ingress_ip(entry: &LoadBalancerIngress) -> Option<IpAddr> {
    entry.ip.as_deref()?.parse().ok()
}

/// For each Service that asks for a valid pool, in namespace/name order: keep an IP it holds
/// that is in its pool and not held by an earlier Service; otherwise take the lowest free IP of
/// the pool. An IP that any Service still shows is not free yet, even one released in this run:
/// handing it out again waits for the next run, after the release is written, so no two Services
/// ever show the same IP.
pub(super) fn allocate<'a>(
    pools: &Pools,
    services: impl IntoIterator<Item = &'a Service>,
    errors: &mut Vec<ExternalIpError>,
) -> Allocation {
    let mut services: Vec<Svc> = services.into_iter().map(Svc::new).collect();
    services.sort_by(|a, b| a.key.cmp(&b.key));
    let mut busy: BTreeSet<IpAddr> = services.iter().flat_map(Svc::ips).collect();
    let in_any_pool = |ip: IpAddr| pools.valid.values().any(|p| p.contains(ip));

    let mut releases = Vec::new();
    let mut asking: Vec<(&Svc, &str, &Pool)> = Vec::new();
    for svc in &services {
        let Some(name) = svc.pool else {
            // No longer asks (annotation removed, type changed): give back the pool IPs, keep
            // what other load balancers wrote.
            let others: Vec<LoadBalancerIngress> = svc
                .ingress
                .iter()
                .filter(|e| !ingress_ip(e).is_some_and(in_any_pool))
                .cloned()
                .collect();
            if others.len() != svc.ingress.len() {
                releases.push(svc.write(others));
            }
            continue;
        };
        let problem = match pools.valid.get(name) {
            Some(pool) => {
                asking.push((svc, name, pool));
                continue;
            }
            None if pools.invalid.contains(name) => ExternalIpError::UnusablePool {
                service: svc.key.clone(),
                pool: name.to_string(),
            },
            None => {
                if !svc.ingress.is_empty() {
                    releases.push(svc.write(Vec::new()));
                }
                ExternalIpError::NoSuchPool {
                    service: svc.key.clone(),
                    pool: name.to_string(),
                }
            }
        };
        errors.push(problem);
    }

    let mut kept = BTreeSet::new();
    let held: Vec<Option<IpAddr>> = asking
        .iter()
        .map(|(svc, _, pool)| {
            let ip = svc
                .ips()
                .find(|ip| pool.contains(*ip) && !kept.contains(ip))?;
            kept.insert(ip);
            Some(ip)
        })
        .collect();

    let mut ips = BTreeMap::new();
    let mut assignments = Vec::new();
    for ((svc, name, pool), held) in asking.into_iter().zip(held) {
        let Some(ip) = held.or_else(|| pool.lowest_free(&busy)) else {
            errors.push(ExternalIpError::PoolExhausted {
                service: svc.key.clone(),
                pool: name.to_string(),
                total: pool.total(),
            });
            continue;
        };
        busy.insert(ip);
        ips.insert(ip, (svc.key.clone(), name.to_string()));
        // Only the address is compared: the API server may add fields (ipMode) to an entry.
        if svc.ingress.len() != 1 || svc.ips().next() != Some(ip) {
            assignments.push(svc.write(vec![LoadBalancerIngress {
                ip: Some(ip.to_string()),
                ..Default::default()
            }]));
        }
    }
    releases.extend(assignments);
    Allocation {
        ips,
        writes: releases,
    }
}
