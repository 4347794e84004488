//! Services and EndpointSlices in, entries out. Each test states the exact tables, one line per
//! entry; the first pins the raw map keys and values behind those lines.

use serde_json::{json, Value};

use super::*;
use crate::model::key_ip;

const NODE: &str = "n1";

fn service(ns: &str, name: &str, spec: Value) -> K8sService {
    service_with_status(ns, name, spec, Value::Null)
}

fn service_with_status(ns: &str, name: &str, spec: Value, status: Value) -> K8sService {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": { "namespace": ns, "name": name },
        "spec": spec,
        "status": status,
    }))
    .unwrap()
}

/// A ClusterIP Service with one TCP port named http (80).
fn web(ns: &str, name: &str, cluster_ip: &str) -> K8sService {
    service(
        ns,
        name,
        json!({ "clusterIP": cluster_ip, "ports": [{ "name": "http", "port": 80 }] }),
    )
}

fn slice(ns: &str, name: &str, svc: &str, ports: Value, endpoints: Value) -> EndpointSlice {
    let family = match endpoints[0]["addresses"][0].as_str() {
        Some(a) if a.contains(':') => "IPv6",
        _ => "IPv4",
    };
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": { "namespace": ns, "name": name, "labels": { SERVICE_NAME_LABEL: svc } },
        "addressType": family,
        "ports": ports,
        "endpoints": endpoints,
    }))
    .unwrap()
}

fn http(port: u16) -> Value {
    json!([{ "name": "http", "port": port, "protocol": "TCP" }])
}

fn ep(addr: &str, node: &str) -> Value {
    json!({ "addresses": [addr], "nodeName": node })
}

fn ep_in(addr: &str, node: &str, conditions: Value) -> Value {
    json!({ "addresses": [addr], "nodeName": node, "conditions": conditions })
}

fn compile_on(
    services: &[K8sService],
    slices: &[EndpointSlice],
    node_port_addresses: &[IpAddr],
    sets: &mut SetAllocator,
) -> ServiceTables {
    let services: Vec<&K8sService> = services.iter().collect();
    let slices: Vec<&EndpointSlice> = slices.iter().collect();
    let inputs = ServiceInputs {
        services: &services,
        slices: &slices,
        node_name: NODE,
        node_port_addresses,
    };
    compile(&inputs, sets)
}

fn tables(services: &[K8sService], slices: &[EndpointSlice]) -> ServiceTables {
    let node_ips = ["192.168.0.10".parse().unwrap()];
    compile_on(services, slices, &node_ips, &mut SetAllocator::new())
}

/// Every entry of every table, one line each, so a test states the exact contents.
fn lines(t: &ServiceTables) -> Vec<String> {
    let at = |addr: &IpKey, port: u16| SocketAddr::new(key_ip(addr).unwrap(), port);
    let mut out = Vec::new();
    for (key, svc) in &t.frontends {
        let scope = match key.scope {
            scope::INTERNAL => "internal",
            scope::EXTERNAL => "external",
            _ => unreachable!(),
        };
        let known =
            service_flags::SNAT | service_flags::AFFINITY | service_flags::NO_LOCAL_ENDPOINTS;
        assert_eq!(svc.flags & !known, 0);
        let snat = if svc.flags & service_flags::SNAT != 0 {
            " snat"
        } else {
            ""
        };
        let drop = if svc.flags & service_flags::NO_LOCAL_ENDPOINTS != 0 {
            " drop (no local endpoints)"
        } else {
            ""
        };
        let affinity = match (svc.flags & service_flags::AFFINITY, svc.affinity_timeout) {
            (0, 0) => String::new(),
            (0, t) => format!(" timeout={t} without affinity"),
            (_, t) => format!(" affinity={t}s"),
        };
        out.push(format!(
            "{}/{} {scope} -> set {} count {}{snat}{affinity}{drop}",
            at(&key.addr, key.port),
            protocol_name(key.proto),
            svc.backend_set,
            svc.count
        ));
    }
    for (key, target) in &t.backends {
        assert_eq!(target._pad, 0);
        let to = at(&target.addr, target.port);
        out.push(format!("set {}[{}] {to}", key.set, key.index));
    }
    for (id, name) in &t.names {
        out.push(format!("set {id} is {name}"));
    }
    for (port, hc) in &t.health_checks {
        let n = hc.local_endpoints;
        out.push(format!("health {port} {} local={n}", hc.service));
    }
    out.extend(t.errors.iter().map(|e| e.to_string()));
    out
}

#[test]
fn cluster_ip_load_balances_over_its_endpoints_in_address_order() {
    let t = tables(
        &[web("default", "web", "10.96.0.10")],
        &[slice(
            "default",
            "web-abc",
            "web",
            http(8080),
            json!([
                ep("10.244.1.5", "n2"),
                ep("10.244.0.7", NODE),
                ep("10.244.0.3", NODE)
            ]),
        )],
    );
    let frontend = ServiceKey {
        addr: IpKey::v4([10, 96, 0, 10]),
        port: 80,
        proto: 6,
        scope: scope::INTERNAL,
    };
    let entry = Service {
        backend_set: 1,
        count: 3,
        flags: 0,
        affinity_timeout: 0,
    };
    assert_eq!(t.frontends, BTreeMap::from([(frontend, entry)]));
    let backend = |index, octets| {
        let key = BackendKey { set: 1, index };
        let target = NatTarget {
            addr: IpKey::v4(octets),
            port: 8080,
            _pad: 0,
        };
        (key, target)
    };
    assert_eq!(
        t.backends,
        BTreeMap::from([
            backend(0, [10, 244, 0, 3]),
            backend(1, [10, 244, 0, 7]),
            backend(2, [10, 244, 1, 5]),
        ])
    );
    assert_eq!(
        t.names,
        BTreeMap::from([(1, "default/web:http".to_string())])
    );
    assert!(t.health_checks.is_empty());
    assert!(t.errors.is_empty());
}

#[test]
fn ports_match_by_name_and_protocol_across_slices_and_duplicates_collapse() {
    let svc = service(
        "default",
        "web",
        json!({ "clusterIP": "10.96.0.10", "ports": [
            { "name": "http", "port": 80 },
            { "name": "metrics", "port": 9000 },
        ] }),
    );
    let both = json!([{ "name": "http", "port": 8080 }, { "name": "metrics", "port": 9100 }]);
    let mut slices = vec![
        slice(
            "default",
            "web-b",
            "web",
            http(8080),
            json!([ep("10.244.0.2", "n2"), ep("10.244.0.3", "n2")]),
        ),
        slice(
            "default",
            "web-a",
            "web",
            both,
            json!([ep("10.244.0.1", "n2"), ep("10.244.0.2", "n2")]),
        ),
        // Same port name, other protocol; an FQDN slice; another Service; another namespace.
        slice(
            "default",
            "web-udp",
            "web",
            json!([{ "name": "http", "port": 8080, "protocol": "UDP" }]),
            json!([ep("10.244.0.9", "n2")]),
        ),
        slice(
            "default",
            "api-a",
            "api",
            http(8080),
            json!([ep("10.244.0.8", "n2")]),
        ),
        slice(
            "other",
            "web-a",
            "web",
            http(8080),
            json!([ep("10.244.0.7", "n2")]),
        ),
    ];
    let mut fqdn = slice(
        "default",
        "web-fqdn",
        "web",
        http(8080),
        json!([ep("10.244.0.6", "n2")]),
    );
    fqdn.address_type = "FQDN".into();
    slices.push(fqdn);
    assert_eq!(
        lines(&tables(&[svc], &slices)),
        [
            "10.96.0.10:80/TCP internal -> set 1 count 3",
            "10.96.0.10:9000/TCP internal -> set 2 count 2",
            "set 1[0] 10.244.0.1:8080",
            "set 1[1] 10.244.0.2:8080",
            "set 1[2] 10.244.0.3:8080",
            "set 2[0] 10.244.0.1:9100",
            "set 2[1] 10.244.0.2:9100",
            "set 1 is default/web:http",
            "set 2 is default/web:metrics",
        ]
    );
}

#[test]
fn endpoints_not_ready_are_left_out() {
    let endpoints = json!([
        ep_in("10.244.0.1", "n2", json!({ "ready": true })),
        ep_in(
            "10.244.0.2",
            "n2",
            json!({ "ready": false, "serving": false })
        ),
        ep_in("10.244.0.3", "n2", json!({})),
        ep_in(
            "10.244.0.4",
            "n2",
            json!({ "ready": false, "serving": true })
        ),
    ]);
    let t = tables(
        &[web("default", "web", "10.96.0.10")],
        &[slice("default", "web-a", "web", http(8080), endpoints)],
    );
    assert_eq!(
        lines(&t),
        [
            "10.96.0.10:80/TCP internal -> set 1 count 2",
            "set 1[0] 10.244.0.1:8080",
            "set 1[1] 10.244.0.3:8080",
            "set 1 is default/web:http",
        ]
    );
}

#[test]
fn terminating_endpoints_serve_only_when_none_is_ready_and_drain_otherwise() {
    let terminating = |addr| {
        ep_in(
            addr,
            "n2",
            json!({ "ready": false, "serving": true, "terminating": true }),
        )
    };
    let gone = ep_in(
        "10.244.0.3",
        "n2",
        json!({ "ready": false, "serving": false, "terminating": true }),
    );
    let svc = [web("default", "web", "10.96.0.10")];
    let with_ready = json!([terminating("10.244.0.1"), ep("10.244.0.2", "n2"), gone]);
    let t = tables(
        &svc,
        &[slice("default", "web-a", "web", http(8080), with_ready)],
    );
    // The serving terminating endpoint sits past the count: never picked, still in the set, so
    // its connections are not flushed.
    assert_eq!(
        lines(&t),
        [
            "10.96.0.10:80/TCP internal -> set 1 count 1",
            "set 1[0] 10.244.0.2:8080",
            "set 1[1] 10.244.0.1:8080",
            "set 1 is default/web:http",
        ]
    );

    let none_ready = json!([terminating("10.244.0.1"), terminating("10.244.0.4"), gone]);
    let t = tables(
        &svc,
        &[slice("default", "web-a", "web", http(8080), none_ready)],
    );
    assert_eq!(
        lines(&t),
        [
            "10.96.0.10:80/TCP internal -> set 1 count 2",
            "set 1[0] 10.244.0.1:8080",
            "set 1[1] 10.244.0.4:8080",
            "set 1 is default/web:http",
        ]
    );
}

#[test]
fn internal_traffic_policy_local_keeps_the_cluster_ip_on_this_node() {
    let svc = service(
        "default",
        "web",
        json!({
            "type": "NodePort", "clusterIP": "10.96.0.10", "internalTrafficPolicy": "Local",
            "ports": [{ "name": "http", "port": 80, "nodePort": 30080 }],
        }),
    );
    // On this node only a terminating endpoint is left: the fallback is per chosen set.
    let endpoints = json!([
        ep("10.244.1.1", "n2"),
        ep_in(
            "10.244.0.1",
            NODE,
            json!({ "ready": false, "serving": true, "terminating": true })
        ),
    ]);
    let t = tables(
        &[svc],
        &[slice("default", "web-a", "web", http(8080), endpoints)],
    );
    // The pods reaching the NodePort get every endpoint; ITP is about the ClusterIP.
    assert_eq!(
        lines(&t),
        [
            "10.96.0.10:80/TCP internal -> set 1 count 1",
            "192.168.0.10:30080/TCP internal -> set 2 count 1",
            "192.168.0.10:30080/TCP external -> set 2 count 1 snat",
            "set 1[0] 10.244.0.1:8080",
            "set 2[0] 10.244.1.1:8080",
            "set 2[1] 10.244.0.1:8080",
            "set 1 is default/web:http (local)",
            "set 2 is default/web:http",
        ]
    );
}

#[test]
fn local_traffic_policies_without_local_endpoints_drop_and_without_any_reject() {
    let svc = service(
        "default",
        "web",
        json!({
            "type": "NodePort", "clusterIP": "10.96.0.10", "internalTrafficPolicy": "Local",
            "externalTrafficPolicy": "Local",
            "ports": [{ "name": "http", "port": 80, "nodePort": 30080 }],
        }),
    );
    let elsewhere = slice(
        "default",
        "web-a",
        "web",
        http(8080),
        json!([ep("10.244.1.1", "n2")]),
    );
    assert_eq!(
        lines(&tables(std::slice::from_ref(&svc), &[elsewhere])),
        [
            "10.96.0.10:80/TCP internal -> set 1 count 0 drop (no local endpoints)",
            "192.168.0.10:30080/TCP internal -> set 2 count 1",
            "192.168.0.10:30080/TCP external -> set 1 count 0 drop (no local endpoints)",
            "set 2[0] 10.244.1.1:8080",
            "set 1 is default/web:http (local)",
            "set 2 is default/web:http",
        ]
    );
    // No endpoint anywhere: every frontend rejects, as kube-proxy does.
    assert_eq!(
        lines(&tables(&[svc], &[])),
        [
            "10.96.0.10:80/TCP internal -> set 1 count 0",
            "192.168.0.10:30080/TCP internal -> set 2 count 0",
            "192.168.0.10:30080/TCP external -> set 1 count 0",
            "set 1 is default/web:http (local)",
            "set 2 is default/web:http",
        ]
    );
}

#[test]
fn external_traffic_policy_local_keeps_outside_clients_on_this_node_without_snat() {
    let spec = |policy: &str| {
        json!({
            "type": "LoadBalancer", "clusterIP": "10.96.0.10", "externalTrafficPolicy": policy,
            "healthCheckNodePort": 32000,
            "ports": [{ "name": "http", "port": 80, "nodePort": 30080 }],
        })
    };
    let endpoints = json!([
        ep("10.244.1.1", "n2"),
        ep("10.244.0.1", NODE),
        ep_in(
            "10.244.0.2",
            NODE,
            json!({ "ready": false, "serving": true, "terminating": true })
        ),
    ]);
    let slices = [
        slice("default", "web-a", "web", http(8080), endpoints),
        // Copies that disagree on the node: the local one wins, whichever slice comes first.
        slice(
            "default",
            "web-0",
            "web",
            http(8080),
            json!([ep("10.244.0.1", "n2")]),
        ),
    ];
    let t = tables(&[service("default", "web", spec("Local"))], &slices);
    assert_eq!(
        lines(&t),
        [
            "10.96.0.10:80/TCP internal -> set 1 count 2",
            "192.168.0.10:30080/TCP internal -> set 1 count 2",
            "192.168.0.10:30080/TCP external -> set 2 count 1",
            "set 1[0] 10.244.0.1:8080",
            "set 1[1] 10.244.1.1:8080",
            "set 1[2] 10.244.0.2:8080",
            "set 2[0] 10.244.0.1:8080",
            "set 2[1] 10.244.0.2:8080",
            "set 1 is default/web:http",
            "set 2 is default/web:http (local)",
            "health 32000 default/web local=1",
        ]
    );

    // Cluster: SNAT from outside, and no health check (there is nothing to steer).
    let t = tables(&[service("default", "web", spec("Cluster"))], &slices);
    assert_eq!(
        lines(&t),
        [
            "10.96.0.10:80/TCP internal -> set 1 count 2",
            "192.168.0.10:30080/TCP internal -> set 1 count 2",
            "192.168.0.10:30080/TCP external -> set 1 count 2 snat",
            "set 1[0] 10.244.0.1:8080",
            "set 1[1] 10.244.1.1:8080",
            "set 1[2] 10.244.0.2:8080",
            "set 1 is default/web:http",
        ]
    );
}

#[test]
fn node_port_listens_on_every_node_address_in_both_scopes() {
    let svc = service(
        "default",
        "web",
        json!({
            "type": "NodePort", "clusterIP": "10.96.0.10",
            "ports": [{ "name": "http", "port": 80, "nodePort": 30080 }],
        }),
    );
    let slices = [slice(
        "default",
        "web-a",
        "web",
        http(8080),
        json!([ep("10.244.1.1", "n2")]),
    )];
    // An IPv6 node address is no use to an IPv4-only Service.
    let node_ips = ["192.168.0.10", "10.0.0.10", "fd00::10"].map(|a| a.parse().unwrap());
    let t = compile_on(&[svc], &slices, &node_ips, &mut SetAllocator::new());
    assert_eq!(
        lines(&t),
        [
            "10.0.0.10:30080/TCP internal -> set 1 count 1",
            "10.0.0.10:30080/TCP external -> set 1 count 1 snat",
            "10.96.0.10:80/TCP internal -> set 1 count 1",
            "192.168.0.10:30080/TCP internal -> set 1 count 1",
            "192.168.0.10:30080/TCP external -> set 1 count 1 snat",
            "set 1[0] 10.244.1.1:8080",
            "set 1 is default/web:http",
        ]
    );
}

#[test]
fn load_balancer_ingress_ips_and_external_ips_are_frontends_in_both_scopes() {
    let lb = service_with_status(
        "default",
        "lb",
        json!({
            "type": "LoadBalancer", "clusterIP": "10.96.0.20",
            "allocateLoadBalancerNodePorts": false,
            "externalIPs": ["198.51.100.7"],
            "ports": [{ "name": "http", "port": 80 }],
        }),
        json!({ "loadBalancer": { "ingress": [
            { "ip": "203.0.113.5" },
            { "ip": "203.0.113.6", "ipMode": "Proxy" },
            { "hostname": "lb.example.com" },
            { "ip": "203.0.113.7", "ipMode": "VIP" },
        ] } }),
    );
    // Only a LoadBalancer's ingress counts; externalIPs work on any type.
    let plain = service_with_status(
        "default",
        "plain",
        json!({
            "clusterIP": "10.96.0.30", "externalIPs": ["198.51.100.8"],
            "ports": [{ "name": "http", "port": 80 }],
        }),
        json!({ "loadBalancer": { "ingress": [{ "ip": "203.0.113.9" }] } }),
    );
    let slices = [
        slice(
            "default",
            "lb-a",
            "lb",
            http(8080),
            json!([ep("10.244.1.1", "n2")]),
        ),
        slice(
            "default",
            "plain-a",
            "plain",
            http(8080),
            json!([ep("10.244.1.2", "n2")]),
        ),
    ];
    assert_eq!(
        lines(&tables(&[lb, plain], &slices)),
        [
            "10.96.0.20:80/TCP internal -> set 1 count 1",
            "10.96.0.30:80/TCP internal -> set 2 count 1",
            "198.51.100.7:80/TCP internal -> set 1 count 1",
            "198.51.100.7:80/TCP external -> set 1 count 1 snat",
            "198.51.100.8:80/TCP internal -> set 2 count 1",
            "198.51.100.8:80/TCP external -> set 2 count 1 snat",
            "203.0.113.5:80/TCP internal -> set 1 count 1",
            "203.0.113.5:80/TCP external -> set 1 count 1 snat",
            "203.0.113.7:80/TCP internal -> set 1 count 1",
            "203.0.113.7:80/TCP external -> set 1 count 1 snat",
            "set 1[0] 10.244.1.1:8080",
            "set 2[0] 10.244.1.2:8080",
            "set 1 is default/lb:http",
            "set 2 is default/plain:http",
        ]
    );
}

#[test]
fn client_ip_affinity_has_a_default_and_an_explicit_timeout() {
    let sticky = |name: &str, ip: &str, node_port: u16, config: Value| {
        service(
            "default",
            name,
            json!({
                "type": "NodePort", "clusterIP": ip, "sessionAffinity": "ClientIP",
                "sessionAffinityConfig": config,
                "ports": [{ "name": "http", "port": 80, "nodePort": node_port }],
            }),
        )
    };
    let services = [
        sticky("a", "10.96.0.1", 30009, Value::Null),
        sticky(
            "b",
            "10.96.0.22",
            30010,
            json!({ "clientIP": { "timeoutSeconds": 60 } }),
        ),
        service(
            "default",
            "c",
            json!({ "clusterIP": "10.96.0.3", "sessionAffinity": "None", "ports": [{ "name": "http", "port": 80 }] }),
        ),
    ];
    let t = tables(&services, &[]);
    assert_eq!(
        lines(&t),
        [
            "10.96.0.1:80/TCP internal -> set 1 count 0 affinity=10800s",
            "10.96.0.3:80/TCP internal -> set 3 count 0",
            "10.96.0.22:80/TCP internal -> set 2 count 0 affinity=60s",
            "192.168.0.10:30009/TCP internal -> set 1 count 0 affinity=10800s",
            "192.168.0.10:30009/TCP external -> set 1 count 0 snat affinity=10800s",
            "192.168.0.10:30010/TCP internal -> set 2 count 0 affinity=60s",
            "192.168.0.10:30010/TCP external -> set 2 count 0 snat affinity=60s",
            "set 1 is default/a:http",
            "set 2 is default/b:http",
            "set 3 is default/c:http",
        ]
    );
}

#[test]
fn headless_and_external_name_services_are_not_proxied() {
    let services = [
        service(
            "default",
            "headless",
            json!({ "clusterIP": "None", "clusterIPs": ["None"], "externalIPs": ["198.51.100.7"], "ports": [{ "port": 80 }] }),
        ),
        service(
            "default",
            "external",
            json!({ "type": "ExternalName", "externalName": "db.example.com", "ports": [{ "port": 80 }] }),
        ),
        service(
            "default",
            "unallocated",
            json!({ "ports": [{ "port": 80 }] }),
        ),
    ];
    let slices = [slice(
        "default",
        "headless-a",
        "headless",
        json!([{ "name": "", "port": 80 }]),
        json!([ep("10.244.1.1", "n2")]),
    )];
    assert_eq!(lines(&tables(&services, &slices)), Vec::<String>::new());
}

/// kube-proxy's (and AntreaProxy's) labels: a Service labelled headless, or for another proxy,
/// keeps its ClusterIP in the API but is not proxied.
#[test]
fn services_labelled_for_dns_only_or_another_proxy_are_not_proxied() {
    let labelled = |name: &str, label: &str| {
        let mut svc = web("default", name, "10.96.0.20");
        svc.metadata.labels = Some([(label.to_string(), String::new())].into());
        svc
    };
    let services = [
        labelled("dns-only", "service.kubernetes.io/headless"),
        labelled("elsewhere", "service.kubernetes.io/service-proxy-name"),
    ];
    let slices = [slice(
        "default",
        "dns-only-a",
        "dns-only",
        json!([{ "name": "http", "port": 80 }]),
        json!([ep("10.244.1.1", "n2")]),
    )];
    assert_eq!(lines(&tables(&services, &slices)), Vec::<String>::new());
    // Without the label, the same Service is proxied.
    let plain = [web("default", "dns-only", "10.96.0.20")];
    assert!(!lines(&tables(&plain, &slices)).is_empty());
}

#[test]
fn sctp_with_a_port_change_is_refused_not_blackholed() {
    let svc = service(
        "default",
        "sig",
        json!({ "type": "NodePort", "clusterIP": "10.96.0.10", "ports": [
            { "name": "sig", "port": 3868, "protocol": "SCTP", "nodePort": 30868 },
        ] }),
    );
    let moved = slice(
        "default",
        "sig-a",
        "sig",
        json!([{ "name": "sig", "port": 3869, "protocol": "SCTP" }]),
        json!([ep("10.244.0.5", NODE)]),
    );
    let t = tables(&[svc], &[moved]);
    assert!(t.frontends.is_empty());
    assert_eq!(
        t.errors.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
        [
            "service default/sig: field spec.clusterIP: value \"3868 -> 3869\": SCTP is load-balanced without changing ports (its CRC32c covers the whole packet and is not recomputed): the endpoints must listen on the frontend's port, so SCTP NodePorts are not supported",
            "service default/sig: field spec.ports[0].nodePort: value \"30868 -> 3869\": SCTP is load-balanced without changing ports (its CRC32c covers the whole packet and is not recomputed): the endpoints must listen on the frontend's port, so SCTP NodePorts are not supported",
        ]
    );
}

#[test]
fn udp_and_sctp_ports_are_frontends_of_their_protocol() {
    let svc = service(
        "kube-system",
        "dns",
        json!({ "clusterIP": "10.96.0.10", "ports": [
            { "name": "dns", "port": 53, "protocol": "UDP" },
            { "name": "dns-tcp", "port": 53, "protocol": "TCP" },
            { "name": "sig", "port": 3868, "protocol": "SCTP" },
        ] }),
    );
    let ports = json!([
        { "name": "dns", "port": 5353, "protocol": "UDP" },
        { "name": "dns-tcp", "port": 5353 },
        { "name": "sig", "port": 3868, "protocol": "SCTP" },
    ]);
    let slices = [slice(
        "kube-system",
        "dns-a",
        "dns",
        ports,
        json!([ep("10.244.0.5", NODE)]),
    )];
    assert_eq!(
        lines(&tables(&[svc], &slices)),
        [
            "10.96.0.10:53/TCP internal -> set 2 count 1",
            "10.96.0.10:53/UDP internal -> set 1 count 1",
            "10.96.0.10:3868/SCTP internal -> set 3 count 1",
            "set 1[0] 10.244.0.5:5353",
            "set 2[0] 10.244.0.5:5353",
            "set 3[0] 10.244.0.5:3868",
            "set 1 is kube-system/dns:dns",
            "set 2 is kube-system/dns:dns-tcp",
            "set 3 is kube-system/dns:sig",
        ]
    );
}

#[test]
fn each_family_load_balances_over_endpoints_of_its_own_family() {
    let svc = service(
        "default",
        "web",
        json!({
            "type": "NodePort",
            "clusterIP": "fd00:96::10", "clusterIPs": ["fd00:96::10", "10.96.0.10"],
            "ipFamilies": ["IPv6", "IPv4"],
            "ports": [{ "name": "http", "port": 80, "nodePort": 30080 }],
        }),
    );
    let slices = [
        slice(
            "default",
            "web-v4",
            "web",
            http(8080),
            json!([ep("10.244.0.1", NODE), ep("10.244.1.1", "n2")]),
        ),
        slice(
            "default",
            "web-v6",
            "web",
            http(8080),
            json!([ep("fd00:244::1", NODE)]),
        ),
    ];
    let node_ips = ["192.168.0.10", "fd00::10"].map(|a| a.parse().unwrap());
    let t = compile_on(&[svc], &slices, &node_ips, &mut SetAllocator::new());
    assert_eq!(
        lines(&t),
        [
            "10.96.0.10:80/TCP internal -> set 2 count 2",
            "192.168.0.10:30080/TCP internal -> set 2 count 2",
            "192.168.0.10:30080/TCP external -> set 2 count 2 snat",
            "[fd00::10]:30080/TCP internal -> set 1 count 1",
            "[fd00::10]:30080/TCP external -> set 1 count 1 snat",
            "[fd00:96::10]:80/TCP internal -> set 1 count 1",
            "set 1[0] [fd00:244::1]:8080",
            "set 2[0] 10.244.0.1:8080",
            "set 2[1] 10.244.1.1:8080",
            "set 1 is default/web:http (IPv6)",
            "set 2 is default/web:http",
        ]
    );
}

#[test]
fn a_service_without_endpoints_gets_count_zero() {
    let svc = service(
        "default",
        "web",
        json!({ "clusterIP": "10.96.0.10", "ports": [{ "port": 80 }] }),
    );
    let not_ready = slice(
        "default",
        "web-a",
        "web",
        json!([{ "name": "", "port": 8080 }]),
        json!([ep_in("10.244.1.1", "n2", json!({ "ready": false }))]),
    );
    assert_eq!(
        lines(&tables(&[svc], &[not_ready])),
        [
            "10.96.0.10:80/TCP internal -> set 1 count 0",
            "set 1 is default/web:80",
        ]
    );
}

#[test]
fn set_ids_stay_with_their_service_while_others_come_and_go() {
    let mut sets = SetAllocator::new();
    let mut compile_names = |services: &[K8sService]| {
        let node_ips = ["192.168.0.10".parse().unwrap()];
        compile_on(services, &[], &node_ips, &mut sets).names
    };
    let names = |pairs: &[(u32, &str)]| -> BTreeMap<u32, String> {
        pairs
            .iter()
            .map(|&(id, n)| (id, format!("{n}:http")))
            .collect()
    };
    let (a, b, c, d) = (
        web("default", "a", "10.96.0.1"),
        web("default", "b", "10.96.0.2"),
        web("default", "c", "10.96.0.3"),
        web("default", "d", "10.96.0.4"),
    );
    assert_eq!(
        compile_names(&[b.clone(), c.clone()]),
        names(&[(1, "default/b"), (2, "default/c")])
    );
    // A Service sorting first takes a new number; the others keep theirs.
    assert_eq!(
        compile_names(&[a.clone(), b.clone(), c.clone()]),
        names(&[(1, "default/b"), (2, "default/c"), (3, "default/a")])
    );
    assert_eq!(
        compile_names(&[a.clone(), c.clone()]),
        names(&[(2, "default/c"), (3, "default/a")])
    );
    // b's freed number is not handed out again straight away.
    assert_eq!(
        compile_names(&[a, c, d]),
        names(&[(2, "default/c"), (3, "default/a"), (4, "default/d")])
    );
}

#[test]
fn bad_addresses_are_reported_and_skipped() {
    let svc = service_with_status(
        "default",
        "bad",
        json!({
            "type": "LoadBalancer",
            "clusterIPs": ["10.96.0.10", "fd00:96::zz"],
            "externalIPs": ["198.51.100.300", "2001:db8::7", "198.51.100.7"],
            "ports": [{ "name": "http", "port": 80 }],
        }),
        json!({ "loadBalancer": { "ingress": [{ "ip": "lb.example.com" }] } }),
    );
    let old_client = service(
        "default",
        "old",
        json!({ "clusterIP": "10.96.0.999", "ports": [{ "port": 80 }] }),
    );
    assert_eq!(
        lines(&tables(&[svc, old_client], &[])),
        [
            "10.96.0.10:80/TCP internal -> set 1 count 0",
            "198.51.100.7:80/TCP internal -> set 1 count 0",
            "198.51.100.7:80/TCP external -> set 1 count 0 snat",
            "set 1 is default/bad:http",
            "service default/bad: field spec.clusterIPs[1]: value \"fd00:96::zz\": not a valid IP address",
            "service default/bad: field spec.externalIPs[0]: value \"198.51.100.300\": not a valid IP address",
            "service default/bad: field spec.externalIPs[1]: value \"2001:db8::7\": the Service has no IPv6 ClusterIP",
            "service default/bad: field status.loadBalancer.ingress[0].ip: value \"lb.example.com\": not a valid IP address",
            "service default/old: field spec.clusterIP: value \"10.96.0.999\": not a valid IP address",
        ]
    );
}

#[test]
fn bad_ports_are_reported_and_skipped() {
    let svc = service(
        "default",
        "bad",
        json!({
            "type": "LoadBalancer", "clusterIP": "10.96.0.10",
            "externalTrafficPolicy": "Local", "healthCheckNodePort": 70000,
            "ports": [
                { "name": "a", "port": 1, "protocol": "ICMP" },
                { "name": "b", "port": 0 },
                { "name": "c", "port": 65536 },
                { "name": "d", "port": 81, "nodePort": -1 },
                { "name": "e", "port": 82, "protocol": "tcp" },
                { "name": "f", "port": 83 },
            ],
        }),
    );
    assert_eq!(
        lines(&tables(&[svc], &[])),
        [
            "10.96.0.10:83/TCP internal -> set 1 count 0",
            "set 1 is default/bad:f",
            "service default/bad: field spec.ports[0].protocol: value \"ICMP\": unknown protocol (expected TCP, UDP or SCTP)",
            "service default/bad: field spec.ports[1].port: value \"0\": port must be in 1..=65535",
            "service default/bad: field spec.ports[2].port: value \"65536\": port must be in 1..=65535",
            "service default/bad: field spec.ports[3].nodePort: value \"-1\": port must be in 1..=65535",
            "service default/bad: field spec.ports[4].protocol: value \"tcp\": unknown protocol (expected TCP, UDP or SCTP)",
            "service default/bad: field spec.healthCheckNodePort: value \"70000\": port must be in 1..=65535",
        ]
    );
}

#[test]
fn a_frontend_claimed_twice_stays_with_the_first_service_by_name() {
    // Both claim the ClusterIP, the externalIP, the NodePort and the health-check port;
    // only their LoadBalancer IPs differ.
    let claim = |ns: &str, lb_ip: &str| {
        service_with_status(
            ns,
            "web",
            json!({
                "type": "LoadBalancer", "clusterIP": "10.96.0.1",
                "externalIPs": ["198.51.100.7"],
                "externalTrafficPolicy": "Local", "healthCheckNodePort": 32000,
                "ports": [
                    { "name": "http", "port": 80, "nodePort": 30080 },
                    { "name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30053 },
                ],
            }),
            json!({ "loadBalancer": { "ingress": [{ "ip": lb_ip }] } }),
        )
    };
    let used = |field: &str, frontend: &str| {
        format!("service b/web: field {field}: value \"{frontend}\": frontend already used by Service a/web")
    };
    let expected = [
        "10.96.0.1:53/UDP internal -> set 3 count 0".to_string(),
        "10.96.0.1:80/TCP internal -> set 1 count 0".into(),
        "192.168.0.10:30053/UDP internal -> set 3 count 0".into(),
        "192.168.0.10:30053/UDP external -> set 4 count 0".into(),
        "192.168.0.10:30080/TCP internal -> set 1 count 0".into(),
        "192.168.0.10:30080/TCP external -> set 2 count 0".into(),
        "198.51.100.7:53/UDP internal -> set 3 count 0".into(),
        "198.51.100.7:53/UDP external -> set 4 count 0".into(),
        "198.51.100.7:80/TCP internal -> set 1 count 0".into(),
        "198.51.100.7:80/TCP external -> set 2 count 0".into(),
        "203.0.113.5:53/UDP internal -> set 3 count 0".into(),
        "203.0.113.5:53/UDP external -> set 4 count 0".into(),
        "203.0.113.5:80/TCP internal -> set 1 count 0".into(),
        "203.0.113.5:80/TCP external -> set 2 count 0".into(),
        "203.0.113.6:53/UDP internal -> set 7 count 0".into(),
        "203.0.113.6:53/UDP external -> set 8 count 0".into(),
        "203.0.113.6:80/TCP internal -> set 5 count 0".into(),
        "203.0.113.6:80/TCP external -> set 6 count 0".into(),
        "set 1 is a/web:http".into(),
        "set 2 is a/web:http (local)".into(),
        "set 3 is a/web:dns".into(),
        "set 4 is a/web:dns (local)".into(),
        "set 5 is b/web:http".into(),
        "set 6 is b/web:http (local)".into(),
        "set 7 is b/web:dns".into(),
        "set 8 is b/web:dns (local)".into(),
        "health 32000 a/web local=0".into(),
        used("spec.clusterIP", "10.96.0.1:80/TCP"),
        used("spec.ports[0].nodePort", "192.168.0.10:30080/TCP"),
        used("spec.externalIPs[0]", "198.51.100.7:80/TCP"),
        used("spec.clusterIP", "10.96.0.1:53/UDP"),
        used("spec.ports[1].nodePort", "192.168.0.10:30053/UDP"),
        used("spec.externalIPs[0]", "198.51.100.7:53/UDP"),
        "service b/web: field spec.healthCheckNodePort: value \"32000\": already used by Service a/web".into(),
    ];
    let (a, b) = (claim("a", "203.0.113.5"), claim("b", "203.0.113.6"));
    // Input order does not matter: "a/web" sorts first either way.
    assert_eq!(lines(&tables(&[a.clone(), b.clone()], &[])), expected);
    assert_eq!(lines(&tables(&[b, a], &[])), expected);
}
