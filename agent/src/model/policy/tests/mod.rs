//! Policies in, entries out. Most tests judge connections the way the kernel will (ENDPOINT_POLICY,
//! IPCACHE longest prefix, the four POLICY lookups) so they state NetworkPolicy semantics rather
//! than entry layouts; a few pin the entries and the printed tables.

use serde_json::{json, Value};
use sluice_common::{identity, PolicyKey, POLICY_KEY_EXACT_BITS, PROTO_ANY};

mod errors;
mod incremental;
mod new_pods;

use super::ports::{SCTP, TCP, UDP};
use super::*;
use crate::model::key_ip;

const NODE: &str = "n1";
const HOST_IP: &str = "192.168.0.10";

fn pod(ns: &str, name: &str, node: &str, ips: &[&str], labels: Value, ports: Value) -> Pod {
    let pod_ips: Vec<Value> = ips.iter().map(|ip| json!({ "ip": ip })).collect();
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "namespace": ns, "name": name, "labels": labels },
        "spec": { "nodeName": node, "containers": [{ "name": "c", "ports": ports }] },
        "status": { "phase": "Running", "podIP": ips.first(), "podIPs": pod_ips },
    }))
    .unwrap()
}

fn namespace(name: &str, labels: Value) -> Namespace {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": { "name": name, "labels": labels },
    }))
    .unwrap()
}

fn policy(ns: &str, name: &str, spec: Value) -> NetworkPolicy {
    serde_json::from_value(json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": { "namespace": ns, "name": name },
        "spec": spec,
    }))
    .unwrap()
}

struct Cluster {
    pods: Vec<Pod>,
    namespaces: Vec<Namespace>,
    policies: Vec<NetworkPolicy>,
    /// Pod interfaces this node's CNI wired.
    wired: Vec<LocalEndpoint>,
}

impl Cluster {
    /// prod (team=a): web-1 on this node (http=8080/TCP, dns=53/UDP), web-2 elsewhere
    /// (http=9090), db on this node. dev (team=b; its object lacks the name label): client
    /// elsewhere, web on this node. Plus a host-network pod and a pod without an address.
    fn new() -> Cluster {
        let http = |port: i32| json!([{ "name": "http", "containerPort": port }]);
        let mut host_net = pod("other", "agent", NODE, &[HOST_IP], json!({}), json!([]));
        host_net.spec.as_mut().unwrap().host_network = Some(true);
        let mut pending = pod(
            "prod",
            "pending",
            NODE,
            &[],
            json!({ "app": "db" }),
            json!([]),
        );
        pending.status = None;
        Cluster {
            pods: vec![
                pod(
                    "prod",
                    "web-1",
                    NODE,
                    &["10.244.0.2"],
                    json!({ "app": "web" }),
                    json!([
                        { "name": "http", "containerPort": 8080 },
                        { "name": "dns", "containerPort": 53, "protocol": "UDP" },
                    ]),
                ),
                pod(
                    "prod",
                    "web-2",
                    "n2",
                    &["10.244.1.2"],
                    json!({ "app": "web" }),
                    http(9090),
                ),
                pod(
                    "prod",
                    "db",
                    NODE,
                    &["10.244.0.3"],
                    json!({ "app": "db" }),
                    json!([]),
                ),
                pod(
                    "dev",
                    "client",
                    "n2",
                    &["10.244.1.3"],
                    json!({ "app": "client" }),
                    json!([]),
                ),
                pod(
                    "dev",
                    "web",
                    NODE,
                    &["10.244.0.4"],
                    json!({ "app": "web" }),
                    json!([]),
                ),
                host_net,
                pending,
            ],
            namespaces: vec![
                namespace("prod", json!({ "team": "a", NAMESPACE_NAME_LABEL: "prod" })),
                namespace("dev", json!({ "team": "b" })),
            ],
            policies: Vec::new(),
            wired: Vec::new(),
        }
    }

    fn with(mut self, ns: &str, name: &str, spec: Value) -> Cluster {
        self.policies.push(policy(ns, name, spec));
        self
    }

    fn compile(&self, alloc: &mut Allocator) -> PolicyTables {
        let host: IpAddr = HOST_IP.parse().unwrap();
        compile(
            &self.pods,
            &self.namespaces,
            &self.policies,
            &LocalNode {
                name: NODE,
                host_ips: &[host],
                endpoints: &self.wired,
            },
            alloc,
        )
    }

    fn tables(&self) -> PolicyTables {
        self.compile(&mut Allocator::new())
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// Not isolated in that direction.
    Open,
    /// Ingress from this node: always allowed.
    Host,
    Allow(u32),
    Drop,
}
use Direction::{Egress, Ingress};
use Verdict::*;

fn bits_match(a: &[u8], b: &[u8], bits: u32) -> bool {
    let (full, rest) = ((bits / 8) as usize, bits % 8);
    a[..full] == b[..full] && (rest == 0 || (a[full] ^ b[full]) >> (8 - rest) == 0)
}

fn ip_bytes(key: &IpKey) -> Vec<u8> {
    [&[key.family][..], &key._pad, &key.addr].concat()
}

fn policy_bytes(key: &PolicyKey) -> Vec<u8> {
    let head = [key.policy.to_ne_bytes(), key.peer.to_ne_bytes()].concat();
    [&head[..], &[key.proto, key._pad], &key.port].concat()
}

fn peer_identity(t: &PolicyTables, ip: &str) -> u32 {
    let key = ip_bytes(&ip_key(ip.parse().unwrap()));
    t.ipcache
        .iter()
        .filter(|(k, _)| bits_match(&ip_bytes(&k.addr), &key, k.prefix_len))
        .max_by_key(|(k, _)| k.prefix_len)
        .map_or(identity::WORLD, |(_, v)| v.id)
}

fn lpm(t: &PolicyTables, key: PolicyKey, len: u32) -> Option<u32> {
    let bytes = policy_bytes(&key);
    t.policy
        .iter()
        .filter(|(k, _)| {
            k.prefix_len <= len && bits_match(&policy_bytes(&k.key), &bytes, k.prefix_len)
        })
        .max_by_key(|(k, _)| k.prefix_len)
        .map(|(_, r)| r.rule)
}

/// What the kernel does with a new connection of `local` (a pod of this node) with `peer`;
/// `port` is the destination port.
fn judge(t: &PolicyTables, d: Direction, local: &str, peer: &str, proto: u8, port: u16) -> Verdict {
    let Some(ep) = t.endpoint_policy.get(&ip_key(local.parse().unwrap())) else {
        return Open;
    };
    let policy = match d {
        Ingress => ep.ingress_policy,
        Egress => ep.egress_policy,
    };
    if policy == 0 {
        return Open;
    }
    let peer = peer_identity(t, peer);
    if d == Ingress && peer == identity::HOST {
        return Host;
    }
    let key = |peer, proto, port: u16| PolicyKey {
        policy,
        peer,
        proto,
        _pad: 0,
        port: port.to_be_bytes(),
    };
    let (full, exact) = (POLICY_KEY_EXACT_BITS + 16, POLICY_KEY_EXACT_BITS);
    lpm(t, key(peer, proto, port), full)
        .or_else(|| lpm(t, key(peer, PROTO_ANY, 0), exact))
        .or_else(|| lpm(t, key(identity::ANY, proto, port), full))
        .or_else(|| lpm(t, key(identity::ANY, PROTO_ANY, 0), exact))
        .map_or(Drop, Allow)
}

fn allows(t: &PolicyTables, d: Direction, local: &str, peer: &str, proto: u8, port: u16) -> bool {
    matches!(judge(t, d, local, peer, proto, port), Allow(_))
}

fn rule_id(t: &PolicyTables, policy: &str, direction: Direction, index: usize) -> u32 {
    let wanted = RuleRef {
        policy: policy.into(),
        direction,
        index,
    };
    *t.rules.iter().find(|(_, r)| **r == wanted).unwrap().0
}

fn ids(t: &PolicyTables) -> Vec<(String, u32)> {
    let mut out: Vec<_> = t
        .ipcache
        .iter()
        .map(|(k, v)| (k.cidr().unwrap().to_string(), v.id))
        .collect();
    out.sort();
    out
}

const WEB1: &str = "10.244.0.2";
const WEB2: &str = "10.244.1.2";
const DB: &str = "10.244.0.3";
const CLIENT: &str = "10.244.1.3";
const DEV_WEB: &str = "10.244.0.4";

#[test]
fn without_policies_only_the_ipcache_is_filled() {
    let t = Cluster::new().tables();
    let expected = [
        ("10.244.0.2/32", 256),
        ("10.244.0.3/32", 257),
        ("10.244.0.4/32", 258),
        ("10.244.1.2/32", 259),
        ("10.244.1.3/32", 260),
        ("192.168.0.10/32", identity::HOST),
    ];
    let expected: Vec<_> = expected.iter().map(|(c, i)| (c.to_string(), *i)).collect();
    assert_eq!(ids(&t), expected);
    assert!(t.endpoint_policy.is_empty() && t.policy.is_empty() && t.rules.is_empty());
    assert!(t.errors.is_empty());
    assert_eq!(judge(&t, Ingress, DB, CLIENT, TCP, 80), Open);
}

#[test]
fn deny_all_ingress_isolates_this_nodes_pods_of_the_namespace() {
    let t = Cluster::new()
        .with("prod", "deny", json!({ "podSelector": {} }))
        .tables();
    let isolated: Vec<_> = t
        .endpoint_policy
        .keys()
        .map(|k| key_ip(k).unwrap())
        .collect();
    assert_eq!(
        isolated,
        [WEB1.parse::<IpAddr>().unwrap(), DB.parse().unwrap()]
    );
    let web1 = t.endpoint_policy[&ip_key(WEB1.parse().unwrap())];
    let db = t.endpoint_policy[&ip_key(DB.parse().unwrap())];
    assert!(web1.ingress_policy != 0 && db.ingress_policy != 0);
    assert_ne!(web1.ingress_policy, db.ingress_policy);
    assert_eq!((web1.egress_policy, db.egress_policy), (0, 0));
    assert!(t.policy.is_empty());
    assert_eq!(judge(&t, Ingress, WEB1, CLIENT, TCP, 80), Drop);
    assert_eq!(judge(&t, Ingress, WEB1, DB, UDP, 53), Drop);
    assert_eq!(judge(&t, Ingress, WEB1, HOST_IP, TCP, 8080), Host);
    assert_eq!(judge(&t, Egress, WEB1, CLIENT, TCP, 80), Open);
    assert_eq!(judge(&t, Ingress, DEV_WEB, CLIENT, TCP, 80), Open);
    // web-2 is another node's: judged there, but still known here as a peer.
    assert!(!t
        .endpoint_policy
        .contains_key(&ip_key(WEB2.parse().unwrap())));
    assert_ne!(peer_identity(&t, WEB2), identity::WORLD);
}

#[test]
fn pod_selector_peer_means_pods_of_the_policys_namespace() {
    let t = Cluster::new()
        .with(
            "prod",
            "db",
            json!({
                "podSelector": { "matchLabels": { "app": "db" } },
                "ingress": [{ "from": [{ "podSelector": { "matchLabels": { "app": "web" } } }] }],
            }),
        )
        .tables();
    let rule = rule_id(&t, "prod/db", Ingress, 0);
    assert_eq!(judge(&t, Ingress, DB, WEB1, TCP, 5432), Allow(rule));
    assert_eq!(judge(&t, Ingress, DB, WEB2, UDP, 1), Allow(rule));
    assert_eq!(judge(&t, Ingress, DB, DEV_WEB, TCP, 5432), Drop);
    assert_eq!(judge(&t, Ingress, DB, CLIENT, TCP, 5432), Drop);
    assert_eq!(judge(&t, Ingress, DB, "8.8.8.8", TCP, 5432), Drop);
    assert_eq!(judge(&t, Ingress, WEB1, CLIENT, TCP, 80), Open);
}

#[test]
fn selector_operators() {
    let only = |exprs: Value| {
        let t = Cluster::new()
            .with(
                "prod",
                "p",
                json!({
                    "podSelector": { "matchLabels": { "app": "db" } },
                    "ingress": [{ "from": [{
                        "namespaceSelector": {},
                        "podSelector": { "matchExpressions": exprs },
                    }] }],
                }),
            )
            .tables();
        assert!(t.errors.is_empty(), "{:?}", t.errors);
        [WEB1, WEB2, CLIENT, DEV_WEB]
            .into_iter()
            .filter(|peer| allows(&t, Ingress, DB, peer, TCP, 1))
            .collect::<Vec<_>>()
    };
    let expr =
        |op: &str, values: Value| json!([{ "key": "app", "operator": op, "values": values }]);
    assert_eq!(only(expr("In", json!(["client", "x"]))), [CLIENT]);
    assert_eq!(only(expr("NotIn", json!(["web"]))), [CLIENT]);
    assert_eq!(
        only(expr("Exists", Value::Null)),
        [WEB1, WEB2, CLIENT, DEV_WEB]
    );
    assert_eq!(only(expr("DoesNotExist", Value::Null)), Vec::<&str>::new());
    let absent = json!([{ "key": "tier", "operator": "NotIn", "values": ["x"] }]);
    assert_eq!(only(absent), [WEB1, WEB2, CLIENT, DEV_WEB]);
}

#[test]
fn namespace_selector_and_the_name_label() {
    for selector in [
        json!({ "matchLabels": { "team": "b" } }),
        json!({ "matchLabels": { NAMESPACE_NAME_LABEL: "dev" } }),
    ] {
        let t = Cluster::new()
            .with(
                "prod",
                "p",
                json!({
                    "podSelector": { "matchLabels": { "app": "db" } },
                    "ingress": [{ "from": [{ "namespaceSelector": selector }] }],
                }),
            )
            .tables();
        assert!(allows(&t, Ingress, DB, CLIENT, TCP, 1));
        assert!(allows(&t, Ingress, DB, DEV_WEB, TCP, 1));
        assert!(!allows(&t, Ingress, DB, WEB1, TCP, 1));
    }
}

#[test]
fn both_selectors_in_one_peer_and_two_peers_or() {
    let spec = |from: Value| {
        json!({
            "podSelector": { "matchLabels": { "app": "db" } },
            "ingress": [{ "from": from }],
        })
    };
    let ns = json!({ "matchLabels": { "team": "b" } });
    let web = json!({ "matchLabels": { "app": "web" } });
    let and = Cluster::new()
        .with(
            "prod",
            "p",
            spec(json!([{ "namespaceSelector": ns, "podSelector": web }])),
        )
        .tables();
    let or = Cluster::new()
        .with(
            "prod",
            "p",
            spec(json!([{ "namespaceSelector": ns }, { "podSelector": web }])),
        )
        .tables();
    let peers = |t: &PolicyTables| {
        [WEB1, WEB2, CLIENT, DEV_WEB]
            .into_iter()
            .filter(|peer| allows(t, Ingress, DB, peer, TCP, 1))
            .collect::<Vec<_>>()
    };
    assert_eq!(peers(&and), [DEV_WEB]);
    assert_eq!(peers(&or), [WEB1, WEB2, CLIENT, DEV_WEB]);
}

#[test]
fn ip_blocks_with_excepts_nest_across_rules_and_cover_pods() {
    let t = Cluster::new()
        .with(
            "prod",
            "p",
            json!({
                "podSelector": { "matchLabels": { "app": "db" } },
                "ingress": [
                    { "from": [{ "ipBlock": { "cidr": "10.0.0.0/8", "except": ["10.244.0.0/16"] } }] },
                    {
                        "from": [{ "ipBlock": { "cidr": "10.244.1.0/24" } }],
                        "ports": [{ "port": 443 }],
                    },
                ],
            }),
        )
        .tables();
    let (wide, narrow) = (
        rule_id(&t, "prod/p", Ingress, 0),
        rule_id(&t, "prod/p", Ingress, 1),
    );
    assert_eq!(judge(&t, Ingress, DB, "10.1.2.3", TCP, 80), Allow(wide));
    assert_eq!(judge(&t, Ingress, DB, "10.244.9.9", TCP, 443), Drop);
    assert_eq!(judge(&t, Ingress, DB, WEB1, TCP, 443), Drop);
    // Inside the /24 (a pod and a plain address), which lies in the except of rule 0.
    assert_eq!(judge(&t, Ingress, DB, CLIENT, TCP, 443), Allow(narrow));
    assert_eq!(
        judge(&t, Ingress, DB, "10.244.1.99", TCP, 443),
        Allow(narrow)
    );
    assert_eq!(judge(&t, Ingress, DB, "10.244.1.99", TCP, 80), Drop);
    assert_eq!(judge(&t, Ingress, DB, CLIENT, TCP, 80), Drop);
    assert_eq!(judge(&t, Ingress, DB, "172.16.0.1", TCP, 80), Drop);
    // Every CIDR named is in the ipcache.
    let named: Vec<_> = ids(&t).into_iter().map(|(c, _)| c).collect();
    for cidr in ["10.0.0.0/8", "10.244.0.0/16", "10.244.1.0/24"] {
        assert!(named.contains(&cidr.to_string()));
    }
}

#[test]
fn a_wider_prefix_never_matches_a_narrower_block() {
    // 10.0.0.0/8 (from another policy) is the identity of 10.9.9.9: not inside 10.244.1.0/24.
    let t = Cluster::new()
        .with(
            "prod",
            "narrow",
            json!({
                "podSelector": { "matchLabels": { "app": "db" } },
                "ingress": [{ "from": [{ "ipBlock": { "cidr": "10.244.1.0/24" } }] }],
            }),
        )
        .with(
            "dev",
            "wide",
            json!({ "ingress": [{ "from": [{ "ipBlock": { "cidr": "10.0.0.0/8" } }] }] }),
        )
        .tables();
    assert!(!allows(&t, Ingress, DB, "10.9.9.9", TCP, 80));
    assert!(allows(&t, Ingress, DB, "10.244.1.7", TCP, 80));
    assert!(allows(&t, Ingress, DEV_WEB, "10.9.9.9", TCP, 80));
    assert!(allows(&t, Ingress, DEV_WEB, "10.244.1.7", TCP, 80));
}

#[test]
fn egress_to_the_node_follows_ip_blocks() {
    let to = |to: Value| {
        Cluster::new()
            .with(
                "prod",
                "p",
                json!({ "policyTypes": ["Egress"], "egress": [{ "to": to }] }),
            )
            .tables()
    };
    let t = to(json!([{ "ipBlock": { "cidr": "192.168.0.0/24" } }]));
    assert!(allows(&t, Egress, DB, HOST_IP, TCP, 10250));
    assert!(!allows(&t, Egress, DB, CLIENT, TCP, 80));
    let t = to(json!([{ "podSelector": {} }]));
    assert!(!allows(&t, Egress, DB, HOST_IP, TCP, 10250));
    assert!(allows(&t, Egress, DB, WEB1, TCP, 80));
}

#[test]
fn absent_or_empty_peers_mean_any_peer() {
    for rule in [json!({}), json!({ "from": [] })] {
        let t = Cluster::new()
            .with("prod", "p", json!({ "ingress": [rule] }))
            .tables();
        let policy = t.endpoint_policy[&ip_key(DB.parse().unwrap())].ingress_policy;
        let entry = PolicyLpmKey {
            key: PolicyKey {
                policy,
                peer: identity::ANY,
                proto: PROTO_ANY,
                _pad: 0,
                port: [0, 0],
            },
            prefix_len: POLICY_KEY_EXACT_BITS,
        };
        assert!(t.policy.contains_key(&entry));
        assert!(allows(&t, Ingress, DB, "203.0.113.5", 1, 0));
        assert!(allows(&t, Ingress, DB, CLIENT, SCTP, 9));
    }
}

#[test]
fn ports_numeric_protocol_only_and_ranges() {
    let t = Cluster::new()
        .with(
            "prod",
            "p",
            json!({
                "podSelector": { "matchLabels": { "app": "db" } },
                "ingress": [{ "ports": [
                    { "port": 80 },
                    { "protocol": "UDP" },
                    { "protocol": "SCTP", "port": 1000, "endPort": 1999 },
                ] }],
            }),
        )
        .tables();
    let yes = |proto, port| allows(&t, Ingress, DB, CLIENT, proto, port);
    assert!(yes(TCP, 80) && !yes(TCP, 81) && !yes(TCP, 79));
    assert!(yes(UDP, 1) && yes(UDP, 65535) && !yes(1, 0));
    assert!(yes(SCTP, 1000) && yes(SCTP, 1500) && yes(SCTP, 1999));
    assert!(!yes(SCTP, 999) && !yes(SCTP, 2000) && !yes(TCP, 1000));
    // One entry per prefix of the range (1000-1007, 1008-1023, ..., 1984-1999).
    let sctp = t.policy.keys().filter(|k| k.key.proto == SCTP).count();
    assert_eq!(sctp, port_prefixes(1000, 1999).len());
}

#[test]
fn port_ranges_become_minimal_prefixes() {
    assert_eq!(port_prefixes(80, 80), [(80, 16)]);
    assert_eq!(port_prefixes(0x8000, 0xffff), [(0x8000, 1)]);
    assert_eq!(port_prefixes(0, 65535), [(0, 0)]);
    let all: Vec<(u16, u8)> = (0..16).map(|i| (1u16 << i, 16 - i as u8)).collect();
    assert_eq!(port_prefixes(1, 65535), all);
    assert_eq!(
        port_prefixes(1000, 1999),
        [
            (1000, 13),
            (1008, 12),
            (1024, 7),
            (1536, 8),
            (1792, 9),
            (1920, 10),
            (1984, 12),
        ]
    );
    assert!(port_prefixes(2, 1).is_empty());
    // Exhaustive on a slice of ranges: the prefixes cover exactly the range, without overlap.
    for (first, last) in [
        (1u16, 1u16),
        (3, 17),
        (1023, 1025),
        (65534, 65535),
        (12345, 54321),
    ] {
        let mut covered = Vec::new();
        for (start, bits) in port_prefixes(first, last) {
            let size = 1u32 << (16 - bits);
            assert_eq!(u32::from(start) % size, 0, "{start}/{bits} is aligned");
            covered.extend(u32::from(start)..u32::from(start) + size);
        }
        assert_eq!(
            covered,
            (u32::from(first)..=u32::from(last)).collect::<Vec<_>>()
        );
    }
}

#[test]
fn ingress_named_ports_resolve_on_the_selected_pod() {
    let mut cluster = Cluster::new().with(
        "prod",
        "p",
        json!({
            "podSelector": {},
            "ingress": [{ "ports": [{ "port": "http" }, { "port": "dns", "protocol": "UDP" }] }],
        }),
    );
    let t = cluster.tables();
    assert!(t.errors.is_empty(), "{:?}", t.errors);
    assert!(allows(&t, Ingress, WEB1, CLIENT, TCP, 8080));
    assert!(allows(&t, Ingress, WEB1, CLIENT, UDP, 53));
    assert!(!allows(&t, Ingress, WEB1, CLIENT, TCP, 9090));
    assert!(!allows(&t, Ingress, WEB1, CLIENT, TCP, 53));
    // db declares no such port: isolated, nothing allowed.
    assert_eq!(judge(&t, Ingress, DB, CLIENT, TCP, 8080), Drop);

    cluster
        .pods
        .retain(|p| p.metadata.name.as_deref() != Some("web-1"));
    let t = cluster.tables();
    // Nobody declares dns now: no error, and the node's pods stay isolated.
    assert!(t.errors.is_empty(), "{:?}", t.errors);
    assert_eq!(judge(&t, Ingress, DB, CLIENT, UDP, 53), Drop);
}

/// A name no pod declares matches nothing and is no error: the policy's other rules hold, as
/// in Kubernetes (a policy is often applied before the pods that declare its ports).
#[test]
fn undeclared_named_port_matches_nothing() {
    let t = Cluster::new()
        .with(
            "prod",
            "p",
            json!({
                "podSelector": { "matchLabels": { "app": "db" } },
                "ingress": [
                    { "ports": [{ "port": "metrics" }] },
                    { "from": [{
                        "namespaceSelector": { "matchLabels": { "team": "b" } },
                        "podSelector": { "matchLabels": { "app": "client" } },
                    }] },
                ],
            }),
        )
        .tables();
    assert!(t.errors.is_empty(), "{:?}", t.errors);
    assert!(allows(&t, Ingress, DB, CLIENT, TCP, 5432));
    assert_eq!(judge(&t, Ingress, DB, WEB1, TCP, 9090), Drop);
}

#[test]
fn egress_named_ports_resolve_on_each_destination_pod() {
    let to_web = |to: Value| {
        Cluster::new()
            .with(
                "prod",
                "p",
                json!({
                    "podSelector": { "matchLabels": { "app": "db" } },
                    "policyTypes": ["Egress"],
                    "egress": [{ "to": to, "ports": [{ "port": "http" }] }],
                }),
            )
            .tables()
    };
    for t in [
        to_web(json!([{ "podSelector": { "matchLabels": { "app": "web" } } }])),
        to_web(Value::Null),
        to_web(json!([{ "ipBlock": { "cidr": "10.244.0.0/16" } }])),
    ] {
        assert!(allows(&t, Egress, DB, WEB1, TCP, 8080));
        assert!(allows(&t, Egress, DB, WEB2, TCP, 9090));
        assert!(!allows(&t, Egress, DB, WEB1, TCP, 9090));
        assert!(!allows(&t, Egress, DB, WEB2, TCP, 8080));
        assert!(!allows(&t, Egress, DB, DEV_WEB, TCP, 8080));
        assert!(!allows(&t, Egress, DB, "10.244.7.7", TCP, 8080));
        assert_eq!(judge(&t, Ingress, DB, CLIENT, TCP, 1), Open);
    }
    // The block leaves web-2 out.
    let t = to_web(json!([{ "ipBlock": { "cidr": "10.244.0.0/24" } }]));
    assert!(allows(&t, Egress, DB, WEB1, TCP, 8080));
    assert!(!allows(&t, Egress, DB, WEB2, TCP, 9090));
}

#[test]
fn implied_and_explicit_policy_types() {
    let directions = |spec: Value| {
        let t = Cluster::new().with("prod", "p", spec).tables();
        let ep = t.endpoint_policy.get(&ip_key(DB.parse().unwrap())).copied();
        ep.map_or((false, false), |e| {
            (e.ingress_policy != 0, e.egress_policy != 0)
        })
    };
    assert_eq!(directions(json!({})), (true, false));
    assert_eq!(directions(json!({ "egress": [{}] })), (true, true));
    // Kubernetes defaults Egress only when there are egress rules.
    assert_eq!(directions(json!({ "egress": [] })), (true, false));
    assert_eq!(
        directions(json!({ "policyTypes": [], "egress": [{}] })),
        (true, true)
    );
    assert_eq!(
        directions(json!({ "policyTypes": ["Egress"] })),
        (false, true)
    );
    assert_eq!(
        directions(json!({ "policyTypes": ["Ingress", "Egress"] })),
        (true, true)
    );

    // Rules of a direction the policy does not declare are ignored.
    let t = Cluster::new()
        .with(
            "prod",
            "p",
            json!({ "policyTypes": ["Egress"], "ingress": [{}], "egress": [{}] }),
        )
        .tables();
    assert_eq!(
        t.rules.values().map(|r| r.direction).collect::<Vec<_>>(),
        [Egress]
    );
    assert!(allows(&t, Egress, DB, "1.1.1.1", UDP, 53));
}

#[test]
fn policies_selecting_one_pod_are_a_union_under_one_policy_id() {
    let t = Cluster::new()
        .with(
            "prod",
            "a",
            json!({
                "podSelector": { "matchLabels": { "app": "db" } },
                "ingress": [{ "from": [{ "podSelector": { "matchLabels": { "app": "web" } } }], "ports": [{ "port": 5432 }] }],
            }),
        )
        .with(
            "prod",
            "b",
            json!({
                "podSelector": {},
                "ingress": [{ "from": [{ "namespaceSelector": { "matchLabels": { "team": "b" } } }], "ports": [{ "protocol": "UDP", "port": 53 }] }],
            }),
        )
        .tables();
    let db = t.endpoint_policy[&ip_key(DB.parse().unwrap())].ingress_policy;
    assert!(t.policy.keys().all(|k| k.key.policy != 0));
    let db_rules: BTreeSet<u32> = t
        .policy
        .iter()
        .filter(|(k, _)| k.key.policy == db)
        .map(|(_, r)| r.rule)
        .collect();
    assert_eq!(db_rules.len(), 2);
    assert_eq!(
        judge(&t, Ingress, DB, WEB1, TCP, 5432),
        Allow(rule_id(&t, "prod/a", Ingress, 0))
    );
    assert_eq!(
        judge(&t, Ingress, DB, CLIENT, UDP, 53),
        Allow(rule_id(&t, "prod/b", Ingress, 0))
    );
    assert!(!allows(&t, Ingress, DB, CLIENT, TCP, 5432));
    assert!(!allows(&t, Ingress, WEB1, WEB2, TCP, 5432));
    assert!(allows(&t, Ingress, WEB1, CLIENT, UDP, 53));
}

#[test]
fn host_network_finished_and_addressless_pods_are_not_endpoints() {
    let mut cluster = Cluster::new().with("other", "deny", json!({}));
    let mut done = pod("other", "job", NODE, &["10.244.0.50"], json!({}), json!([]));
    done.status.as_mut().unwrap().phase = Some("Succeeded".into());
    cluster.pods.push(done);
    let t = cluster.tables();
    assert_eq!(peer_identity(&t, HOST_IP), identity::HOST);
    assert_eq!(peer_identity(&t, "10.244.0.50"), identity::WORLD);
    assert_eq!(t.ipcache.len(), 6);
    assert!(t.endpoint_policy.is_empty());
}

#[test]
fn dual_stack_pods_and_ipv6_blocks() {
    let mut cluster = Cluster::new().with(
        "prod",
        "p",
        json!({
            "podSelector": { "matchLabels": { "app": "dual" } },
            "ingress": [{ "from": [{ "ipBlock": { "cidr": "fd00:1::/64", "except": ["fd00:1::/120"] } }] }],
            "egress": [{ "to": [{ "podSelector": { "matchLabels": { "app": "web" } } }] }],
        }),
    );
    let labels = json!({ "app": "dual" });
    cluster.pods.push(pod(
        "prod",
        "dual",
        NODE,
        &["10.244.0.9", "fd00::9"],
        labels,
        json!([]),
    ));
    let t = cluster.tables();
    assert_eq!(t.endpoint_policy.len(), 2);
    assert!(allows(&t, Ingress, "fd00::9", "fd00:1::1:5", TCP, 80));
    assert!(!allows(&t, Ingress, "fd00::9", "fd00:1::5", TCP, 80));
    assert!(!allows(&t, Ingress, "10.244.0.9", CLIENT, TCP, 80));
    assert!(allows(&t, Egress, "10.244.0.9", WEB2, TCP, 80));
    assert!(!allows(&t, Egress, "fd00::9", "fd00:1::1:5", TCP, 80));
}

#[test]
fn numbers_stay_stable_across_recompiles() {
    let mut alloc = Allocator::new();
    let mut cluster = Cluster::new()
        .with(
            "prod",
            "a",
            json!({ "ingress": [{}, { "ports": [{ "port": 1 }] }] }),
        )
        .with(
            "prod",
            "b",
            json!({ "policyTypes": ["Egress"], "egress": [{}] }),
        )
        .with(
            "dev",
            "c",
            json!({ "ingress": [{ "from": [{ "ipBlock": { "cidr": "10.9.0.0/16" } }] }] }),
        );
    let before = cluster.compile(&mut alloc);
    assert_eq!(
        cluster.compile(&mut alloc),
        before,
        "same input, same tables"
    );

    cluster.pods.push(pod(
        "prod",
        "new",
        NODE,
        &["10.244.0.7"],
        json!({}),
        json!([]),
    ));
    cluster
        .policies
        .retain(|p| p.metadata.name.as_deref() != Some("c"));
    let after = cluster.compile(&mut alloc);

    for (cidr, id) in ids(&before) {
        let now = ids(&after)
            .into_iter()
            .find(|(c, _)| *c == cidr)
            .map(|(_, i)| i);
        match cidr.as_str() {
            "10.9.0.0/16" => assert_eq!(now, None),
            _ => assert_eq!(now, Some(id), "{cidr}"),
        }
    }
    let new_identity = peer_identity(&after, "10.244.0.7");
    assert!(
        ids(&before).iter().all(|(_, id)| *id != new_identity),
        "no reuse yet"
    );
    let dev_web = ip_key(DEV_WEB.parse().unwrap());
    for (ip, ep) in before
        .endpoint_policy
        .iter()
        .filter(|(ip, _)| **ip != dev_web)
    {
        assert_eq!(after.endpoint_policy.get(ip), Some(ep));
    }
    assert!(!after.endpoint_policy.contains_key(&dev_web));
    for (id, rule) in &after.rules {
        assert_eq!(before.rules.get(id), Some(rule));
    }
    assert_eq!(before.rules.len(), after.rules.len() + 1);
    for (key, rule) in &before.policy {
        if key.key.policy != before.endpoint_policy[&dev_web].ingress_policy {
            assert_eq!(after.policy.get(key), Some(rule));
        }
    }
}

#[test]
fn the_tables_print_stage_by_stage() {
    let mut cluster = Cluster::new()
        .with(
            "prod",
            "web",
            json!({
                "podSelector": { "matchLabels": { "app": "web" } },
                "policyTypes": ["Ingress", "Egress"],
                "ingress": [
                    { "from": [{ "namespaceSelector": { "matchLabels": { "team": "b" } }, "podSelector": { "matchLabels": { "app": "client" } } }], "ports": [{ "port": "http" }, { "port": 1000, "endPort": 1023 }] },
                    { "from": [{ "ipBlock": { "cidr": "10.0.0.0/8", "except": ["10.244.0.0/16"] } }], "ports": [{ "protocol": "UDP" }] },
                ],
                "egress": [{ "ports": [{ "protocol": "UDP", "port": 53 }] }, { "to": [] }],
            }),
        )
        .with("prod", "broken", json!({ "podSelector": { "matchLabels": { "app": "db" } }, "ingress": [{ "ports": [{ "port": 0 }] }] }));
    cluster.pods.retain(|p| {
        ["web-1", "client", "db"].contains(&p.metadata.name.as_deref().unwrap_or_default())
    });
    let text = cluster.tables().to_string();
    let expected = "\
IPCache
  10.0.0.0/8 -> identity 259
  10.244.0.0/16 -> identity 260
  10.244.0.2/32 -> identity 256
  10.244.0.3/32 -> identity 257
  10.244.1.3/32 -> identity 258
  192.168.0.10/32 -> host
  * -> world
EndpointPolicy
  pod_ip=10.244.0.2 -> ingress_policy=1 egress_policy=2
  pod_ip=10.244.0.3 -> ingress_policy=3 egress_policy=open
IngressRule
  from=host -> allow
  policy=1 from=258(10.244.1.3/32) TCP/1000-1007 -> allow rule=1 (prod/web ingress[0])
  policy=1 from=258(10.244.1.3/32) TCP/1008-1023 -> allow rule=1 (prod/web ingress[0])
  policy=1 from=258(10.244.1.3/32) TCP/8080 -> allow rule=1 (prod/web ingress[0])
  policy=1 from=259(10.0.0.0/8) UDP/any -> allow rule=2 (prod/web ingress[1])
  * -> drop (IngressDefaultRule)
EgressRule
  policy=2 to=any any -> allow rule=4 (prod/web egress[1])
  policy=2 to=any UDP/53 -> allow rule=3 (prod/web egress[0])
  * -> drop (EgressDefaultRule)
Errors
  policy prod/broken: field spec.ingress[0].ports[0].port: value \"0\": port must be in 1..=65535
";
    assert_eq!(text, expected);
}
