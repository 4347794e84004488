//! The Service compiler on an arbitrary Service (any JSON that deserializes as one) with an
//! EndpointSlice for it: no panic, every error names its field, every frontend's backend set
//! holds at least `count` endpoints.
#![no_main]

use k8s_openapi::api::core::v1::Service;
use libfuzzer_sys::fuzz_target;
use sluice_agent::{
    k8s::EndpointSlice,
    model::service::{self, ServiceInputs, SetAllocator},
};
use sluice_common::BackendKey;

fuzz_target!(|data: &[u8]| {
    let Ok(mut svc) = serde_json::from_slice::<Service>(data) else {
        return;
    };
    svc.metadata
        .namespace
        .get_or_insert_with(|| "default".into());
    svc.metadata.name.get_or_insert_with(|| "web".into());
    let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web-1", "namespace": "default",
            "labels": {"kubernetes.io/service-name": svc.metadata.name.clone()}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"},
                  {"name": "", "port": 8080, "protocol": "UDP"}],
        "endpoints": [
            {"addresses": ["10.244.0.2"], "nodeName": "node-1"},
            {"addresses": ["10.244.1.2"], "nodeName": "node-2",
             "conditions": {"ready": false, "serving": true, "terminating": true}},
        ],
    }))
    .unwrap();
    let node_ports: [std::net::IpAddr; 1] = ["192.168.77.1".parse().unwrap()];
    let tables = service::compile(
        &ServiceInputs {
            services: &[&svc],
            slices: &[&slice],
            node_name: "node-1",
            node_port_addresses: &node_ports,
        },
        &mut SetAllocator::new(),
    );
    for error in &tables.errors {
        assert!(
            !error.field.is_empty(),
            "an error without its field: {error}"
        );
    }
    for frontend in tables.frontends.values() {
        for index in 0..frontend.count {
            let key = BackendKey {
                set: frontend.backend_set,
                index,
            };
            assert!(
                tables.backends.contains_key(&key),
                "set {key:?} misses an endpoint"
            );
        }
    }
});
