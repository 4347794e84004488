//! Bad input: every problem named with its field, value and reason; the broken policy allows
//! nothing but still isolates what it selects, and everything else keeps compiling.

use serde_json::{json, Value};

use super::*;

fn errors_of(spec: Value) -> (PolicyTables, Vec<String>) {
    let t = Cluster::new()
        .with(
            "prod",
            "ok",
            json!({ "podSelector": { "matchLabels": { "app": "db" } }, "ingress": [{ "ports": [{ "port": 7 }] }] }),
        )
        .with("prod", "bad", spec)
        .tables();
    let texts = t.errors.iter().map(|e| e.to_string()).collect();
    (t, texts)
}

/// A broken policy allows nothing but still isolates; the healthy one keeps its entries.
fn assert_fail_closed(t: &PolicyTables) {
    assert!(t.rules.values().all(|r| r.policy == "prod/ok"));
    assert!(allows(t, Ingress, DB, CLIENT, TCP, 7));
    assert!(!allows(t, Ingress, DB, "10.1.1.1", TCP, 8));
    assert_eq!(judge(t, Ingress, WEB1, CLIENT, TCP, 7), Drop);
}

#[test]
fn invalid_cidrs_and_excepts_fail_closed() {
    let block = |block: Value| json!({ "ingress": [{ "from": [{ "podSelector": {} }, { "ipBlock": block }] }] });
    let field = "spec.ingress[0].from[1].ipBlock";
    let cases = [
        (json!({ "cidr": "10.0.0.0/33" }), format!("{field}.cidr: value \"10.0.0.0/33\": prefix length longer than the address")),
        (json!({ "cidr": "10.0.0.0" }), format!("{field}.cidr: value \"10.0.0.0\": not a CIDR: want address/prefix-length")),
        (json!({ "cidr": "10.0.0.0/255.0.0.0" }), format!("{field}.cidr: value \"10.0.0.0/255.0.0.0\": not a valid prefix length")),
        (json!({ "cidr": "10.0.x.0/8" }), format!("{field}.cidr: value \"10.0.x.0/8\": not a valid IP address")),
        (
            json!({ "cidr": "10.0.0.0/8", "except": ["10.1.0.0/16", "192.168.0.0/24"] }),
            format!("{field}.except[1]: value \"192.168.0.0/24\": not strictly inside the cidr 10.0.0.0/8"),
        ),
        (
            json!({ "cidr": "10.0.0.0/8", "except": ["10.0.0.0/8"] }),
            format!("{field}.except[0]: value \"10.0.0.0/8\": not strictly inside the cidr 10.0.0.0/8"),
        ),
        (
            json!({ "cidr": "10.0.0.0/8", "except": ["fd00::/64"] }),
            format!("{field}.except[0]: value \"fd00::/64\": not strictly inside the cidr 10.0.0.0/8"),
        ),
        (json!({ "cidr": "10.0.0.0/8", "except": ["10.1/16"] }), format!("{field}.except[0]: value \"10.1/16\": not a valid IP address")),
    ];
    for (b, text) in cases {
        let (t, errors) = errors_of(block(b));
        assert_eq!(errors, [format!("policy prod/bad: field {text}")]);
        assert_fail_closed(&t);
        // The broken policy's prefixes are not in the ipcache.
        assert!(ids(&t).iter().all(|(c, _)| c.ends_with("/32")));
    }
}

#[test]
fn malformed_selectors_fail_closed() {
    let peer = |sel: Value| json!({ "ingress": [{ "from": [{ "namespaceSelector": sel }] }] });
    let at = "spec.ingress[0].from[0].namespaceSelector.matchExpressions[0]";
    let expr = |op: &str, values: Value| json!({ "matchExpressions": [{ "key": "k", "operator": op, "values": values }] });
    let cases = [
        (expr("Like", json!(["a"])), format!("{at}.operator: value \"Like\": unknown operator (expected In, NotIn, Exists or DoesNotExist)")),
        (expr("In", Value::Null), format!("{at}.values: value \"\": operator In needs at least one value")),
        (expr("NotIn", json!([])), format!("{at}.values: value \"\": operator NotIn needs at least one value")),
        (expr("Exists", json!(["a", "b"])), format!("{at}.values: value \"a,b\": operator Exists takes no values")),
        (expr("DoesNotExist", json!(["a"])), format!("{at}.values: value \"a\": operator DoesNotExist takes no values")),
    ];
    for (sel, text) in cases {
        let (t, errors) = errors_of(peer(sel));
        assert_eq!(errors, [format!("policy prod/bad: field {text}")]);
        assert_fail_closed(&t);
    }
}

#[test]
fn a_broken_pod_selector_isolates_the_whole_namespace() {
    let (t, errors) = errors_of(json!({
        "podSelector": { "matchLabels": { "app": "nothing" }, "matchExpressions": [{ "key": "a", "operator": "in", "values": ["x"] }] },
        "policyTypes": ["Ingress", "Egress"],
        "ingress": [{}],
        "egress": [{}],
    }));
    assert_eq!(
        errors,
        ["policy prod/bad: field spec.podSelector.matchExpressions[0].operator: value \"in\": unknown operator (expected In, NotIn, Exists or DoesNotExist)"]
    );
    assert_fail_closed(&t);
    assert_eq!(judge(&t, Egress, WEB1, CLIENT, TCP, 7), Drop);
    assert_eq!(judge(&t, Egress, DB, CLIENT, TCP, 7), Drop);
    assert_eq!(judge(&t, Ingress, DEV_WEB, CLIENT, TCP, 7), Open);
}

#[test]
fn bad_ports_fail_closed() {
    let ports = |ports: Value| json!({ "ingress": [{ "ports": ports }] });
    let at = "spec.ingress[0].ports[1]";
    let cases = [
        (
            json!({ "port": 0 }),
            format!("{at}.port: value \"0\": port must be in 1..=65535"),
        ),
        (
            json!({ "port": 65536 }),
            format!("{at}.port: value \"65536\": port must be in 1..=65535"),
        ),
        (
            json!({ "port": 2000, "endPort": 1999 }),
            format!("{at}.endPort: value \"1999\": endPort is below port 2000"),
        ),
        (
            json!({ "port": 2000, "endPort": 70000 }),
            format!("{at}.endPort: value \"70000\": endPort must be in 1..=65535"),
        ),
        (
            json!({ "port": "http", "endPort": 9000 }),
            format!("{at}.endPort: value \"9000\": endPort needs a numeric port"),
        ),
        (
            json!({ "endPort": 9000 }),
            format!("{at}.endPort: value \"9000\": endPort needs a numeric port"),
        ),
        (
            json!({ "protocol": "tcp", "port": 80 }),
            format!("{at}.protocol: value \"tcp\": unknown protocol (expected TCP, UDP or SCTP)"),
        ),
    ];
    for (port, text) in cases {
        let (t, errors) = errors_of(ports(json!([{ "port": 7 }, port])));
        assert_eq!(errors, [format!("policy prod/bad: field {text}")]);
        assert_fail_closed(&t);
    }
}

#[test]
fn malformed_peers_and_types_fail_closed() {
    let (t, errors) = errors_of(json!({
        "policyTypes": ["Ingress", "Sideways"],
        "ingress": [{ "from": [{}, { "ipBlock": { "cidr": "10.0.0.0/8" }, "podSelector": {} }] }],
    }));
    assert_eq!(
        errors,
        [
            "policy prod/bad: field spec.policyTypes[1]: value \"Sideways\": unknown policy type (expected Ingress or Egress)",
            "policy prod/bad: field spec.ingress[0].from[0]: value \"{}\": a peer needs podSelector, namespaceSelector or ipBlock",
            "policy prod/bad: field spec.ingress[0].from[1]: value \"{\\\"ipBlock\\\":{\\\"cidr\\\":\\\"10.0.0.0/8\\\"},\\\"podSelector\\\":{}}\": ipBlock cannot be combined with podSelector or namespaceSelector",
        ]
    );
    assert_fail_closed(&t);
    // An unknown type isolates both directions.
    assert_eq!(judge(&t, Egress, WEB1, CLIENT, TCP, 7), Drop);
}

#[test]
fn odd_objects_compile_without_panicking() {
    let mut cluster = Cluster::new();
    let mut garbage = pod(
        "prod",
        "odd",
        NODE,
        &["not-an-ip", "10.244.0.99"],
        json!({}),
        json!([
            { "name": "zero", "containerPort": 0 },
            { "name": "x", "containerPort": 80, "protocol": "ICMP" },
        ]),
    );
    garbage.metadata.namespace = None;
    cluster.pods.push(garbage);
    cluster
        .pods
        .push(serde_json::from_value(json!({ "apiVersion": "v1", "kind": "Pod" })).unwrap());
    let mut bare = policy("prod", "bare", json!({}));
    bare.spec = None;
    bare.metadata.namespace = None;
    cluster.policies.push(bare);
    cluster.policies.push(policy("dev", "zero", json!({ "ingress": [{ "from": [{ "ipBlock": { "cidr": "0.0.0.0/0", "except": ["::/0"] } }] }] })));
    let t = cluster.tables();
    // The spec-less policy isolates ingress of the "default" namespace, where the odd pod is.
    assert_eq!(judge(&t, Ingress, "10.244.0.99", CLIENT, TCP, 1), Drop);
    assert_eq!(t.errors.len(), 1, "{:?}", t.errors);
    assert!(!t.to_string().is_empty());
}
