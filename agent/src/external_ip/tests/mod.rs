//! `plan` on small clusters: pool checks, allocation, ownership. The helpers build the objects
//! as the API server would hand them over.

mod allocation;
mod ownership;
mod pools;

use std::{collections::BTreeMap, net::IpAddr};

use k8s_openapi::api::core::v1::{Node, Service};
use kube::api::DynamicObject;
use serde_json::{json, Value};

use super::{plan, ExternalIpState, Role, StatusWrite, POOL_ANNOTATION};

fn pool(name: &str, spec: Value) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "crd.antrea.io/v1beta1",
        "kind": "ExternalIPPool",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .unwrap()
}

/// 10.0.0.1 - 10.0.0.2 (the /30 without its network and broadcast addresses).
fn small_pool() -> DynamicObject {
    pool("small", json!({"ipRanges": [{"cidr": "10.0.0.0/30"}]}))
}

/// `key` is "namespace/name"; `pool`: the annotation; `ips`: status.loadBalancer.ingress.
fn service(key: &str, type_: &str, pool: Option<&str>, ips: &[&str]) -> Service {
    let (namespace, name) = key.split_once('/').unwrap();
    let annotations: BTreeMap<&str, &str> =
        pool.map(|p| (POOL_ANNOTATION, p)).into_iter().collect();
    let ingress: Vec<Value> = ips.iter().map(|ip| json!({"ip": ip})).collect();
    serde_json::from_value(json!({
        "metadata": {"namespace": namespace, "name": name, "annotations": annotations},
        "spec": {"type": type_},
        "status": {"loadBalancer": {"ingress": ingress}},
    }))
    .unwrap()
}

fn lb(key: &str, pool: &str, ips: &[&str]) -> Service {
    service(key, "LoadBalancer", Some(pool), ips)
}

fn node(name: &str, ready: bool, labels: Value) -> Node {
    let status = if ready { "True" } else { "Unknown" };
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels},
        "status": {"conditions": [{"type": "Ready", "status": status}]},
    }))
    .unwrap()
}

fn nodes(names: &[&str]) -> Vec<Node> {
    names.iter().map(|n| node(n, true, json!({}))).collect()
}

/// The controller's writes with what node `me` answers for; both roles must agree on the
/// assignments.
fn run(pools: &[DynamicObject], services: &[Service], nodes: &[Node], me: &str) -> ExternalIpState {
    let controller = plan(pools, services, nodes, Role::Controller);
    let node = plan(pools, services, nodes, Role::Node(me));
    assert_eq!(node.assignments, controller.assignments);
    assert!(node.writes.is_empty() && controller.owned.is_empty());
    ExternalIpState {
        owned: node.owned,
        ..controller
    }
}

/// The Service writes, as (service, IPs written).
fn service_writes(state: &ExternalIpState) -> Vec<(String, Vec<String>)> {
    state
        .writes
        .iter()
        .filter_map(|w| match w {
            StatusWrite::Service {
                namespace,
                name,
                ingress,
            } => Some((
                format!("{namespace}/{name}"),
                ingress.iter().filter_map(|i| i.ip.clone()).collect(),
            )),
            StatusWrite::PoolUsage { .. } => None,
        })
        .collect()
}

/// What the API server does with the writes.
fn apply(services: &mut [Service], writes: &[StatusWrite]) {
    for write in writes {
        if let StatusWrite::Service {
            namespace,
            name,
            ingress,
        } = write
        {
            let svc = services
                .iter_mut()
                .find(|s| {
                    s.metadata.namespace.as_ref() == Some(namespace)
                        && s.metadata.name.as_ref() == Some(name)
                })
                .unwrap();
            let lb = svc
                .status
                .get_or_insert_default()
                .load_balancer
                .get_or_insert_default();
            lb.ingress = Some(ingress.clone());
        }
    }
}

fn ips(state: &ExternalIpState) -> BTreeMap<String, IpAddr> {
    state
        .assignments
        .iter()
        .map(|(ip, a)| (a.service.clone(), *ip))
        .collect()
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}
