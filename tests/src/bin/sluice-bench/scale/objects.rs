//! The objects of the scale cluster, as a platform team's cluster holds them: namespaces of
//! teams, pods of a few apps each on API-only Nodes, ten NetworkPolicies per namespace with label
//! and namespace peers, port ranges and an ipBlock, and selector-less Services whose
//! EndpointSlices name real pod addresses.

use std::net::Ipv4Addr;

use serde_json::{json, Value};

/// How big the cluster is.
#[derive(Clone, Copy, Debug)]
pub struct Size {
    pub nodes: u32,
    pub pods_per_node: u32,
    pub namespaces: u32,
    pub policies_per_namespace: u32,
    pub services_per_namespace: u32,
}

impl Size {
    pub fn pods(&self) -> u32 {
        self.nodes * self.pods_per_node
    }
}

/// Apps per namespace: pods of one app share its label, as a Deployment's do.
const APPS: u32 = 30;
/// Addresses per Node: the chart's `nodeCIDRMaskSizeIPv4: 26`, so 1,000 Nodes fit in the lab's
/// 10.244.0.0/16.
pub const NODE_BLOCK: u32 = 64;
/// The API-only Nodes' blocks start past the real node's (Sluice's NodeIPAM gives it the first).
const FIRST_BLOCK: u32 = 16;
/// A pod added during the measurement takes a free address of its Node's block, past the
/// `pods_per_node` the cluster starts with.
pub const FREE_SLOTS_FROM: u32 = 40;

pub fn namespace_name(n: u32) -> String {
    format!("scale-{n}")
}

pub fn node_name(i: u32) -> String {
    format!("scale-node-{i}")
}

pub fn namespace(n: u32) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": namespace_name(n), "labels": {"team": format!("team-{}", n % 10)}}})
}

/// An API-only Node: no kubelet, no `kubernetes.io/os` label (so no DaemonSet pod of Sluice's
/// is made for it), a podCIDR of its own, an InternalIP, Ready (so that a heartbeat later
/// changes only its timestamps, as a kubelet's does).
pub fn node(i: u32) -> Value {
    let block = pod_address(i, 0);
    let cidr = format!("{block}/26");
    json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": node_name(i), "labels": {"topology.kubernetes.io/zone": format!("zone-{}", i % 3)}},
        "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
        "status": {"addresses": [
            {"type": "InternalIP", "address": Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 16, 0, 0)) + i).to_string()},
            {"type": "Hostname", "address": node_name(i)}],
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                "lastHeartbeatTime": "2026-01-01T00:00:00Z", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}})
}

/// Address `slot` (1-based; 0 is the block) of Node `node`'s pod block.
pub fn pod_address(node: u32, slot: u32) -> Ipv4Addr {
    Ipv4Addr::from(
        u32::from(Ipv4Addr::new(10, 244, 0, 0)) + (FIRST_BLOCK + node) * NODE_BLOCK + slot,
    )
}

/// Pod `j`: on Node `j % nodes`, in namespace `j % namespaces`, of app `(j / namespaces) % APPS`.
pub struct PodPlace {
    pub name: String,
    pub namespace: String,
    pub node: u32,
    pub ip: Ipv4Addr,
    pub app: u32,
}

pub fn pod_place(size: &Size, j: u32) -> PodPlace {
    let node = j % size.nodes;
    PodPlace {
        name: format!("pod-{j}"),
        namespace: namespace_name(j % size.namespaces),
        node,
        ip: pod_address(node, 1 + j / size.nodes),
        app: (j / size.namespaces) % APPS,
    }
}

/// The pod as a Deployment's pod looks to the API server: one container with ports, env and
/// resources.
pub fn pod(place: &PodPlace) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": place.name, "namespace": place.namespace,
            "labels": {"app": format!("app-{}", place.app),
                       "tier": if place.app.is_multiple_of(2) { "frontend" } else { "backend" },
                       "pod-template-hash": "5d8f7c9b6"}},
        "spec": {"nodeName": node_name(place.node),
            "containers": [{"name": "app", "image": "registry.example/team/app:1.4.2",
                "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                "env": [{"name": "MODE", "value": "production"}, {"name": "LOG_LEVEL", "value": "info"}],
                "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"memory": "128Mi"}}}]}})
}

/// What the kubelet would write: running, ready, its address.
pub fn pod_status(place: &PodPlace) -> Value {
    let ip = place.ip.to_string();
    json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
        "hostIP": Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 16, 0, 0)) + place.node).to_string(),
        "conditions": [{"type": "Ready", "status": "True"}, {"type": "ContainersReady", "status": "True"}]}})
}

/// Policy `k` of namespace `n`: selects one app; lets in the next app and a team's frontends
/// on a port and a port range; half of them also limit egress to DNS and an ipBlock.
pub fn network_policy(n: u32, k: u32) -> Value {
    let app = |a: u32| format!("app-{}", a % APPS);
    let mut policy = json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": format!("policy-{k}"), "namespace": namespace_name(n)},
        "spec": {"podSelector": {"matchLabels": {"app": app(k * 3)}},
            "policyTypes": ["Ingress"],
            "ingress": [{
                "from": [{"podSelector": {"matchLabels": {"app": app(k * 3 + 1)}}},
                         {"namespaceSelector": {"matchLabels": {"team": format!("team-{}", (n + k) % 10)}},
                          "podSelector": {"matchLabels": {"tier": "frontend"}}}],
                "ports": [{"protocol": "TCP", "port": 8080},
                          {"protocol": "TCP", "port": 9000, "endPort": 9100}]}]}});
    if k.is_multiple_of(2) {
        policy["spec"]["policyTypes"] = json!(["Ingress", "Egress"]);
        policy["spec"]["egress"] = json!([
            {"to": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": app(k * 3 + 2)}}}],
             "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 8080}]},
            {"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.244.0.0/16"]}}],
             "ports": [{"protocol": "TCP", "port": 443}]}]);
    }
    policy
}

/// Service `s` of namespace `n` (no selector: its slice is written as a controller would) and
/// that slice, with three endpoints at the addresses of pods of the namespace.
pub fn service(size: &Size, n: u32, s: u32) -> (Value, Value) {
    let name = format!("svc-{s}");
    let namespace = namespace_name(n);
    let service = json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}});
    let endpoints: Vec<Value> = (0..3)
        .map(|e| {
            // Pods of namespace n are n, n + namespaces, n + 2·namespaces, …
            let j = n + size.namespaces * ((s * 3 + e) % (size.pods() / size.namespaces));
            let place = pod_place(size, j);
            json!({"addresses": [place.ip.to_string()], "nodeName": node_name(place.node),
                   "conditions": {"ready": true, "serving": true, "terminating": false}})
        })
        .collect();
    let slice = json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{name}-1"), "namespace": namespace,
                     "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]});
    (service, slice)
}
