//! The agent's compile, with a [`PodIndex`] brought up to date pod by pod, gives what a compile
//! of the whole cluster from scratch gives, after every step of a long run of pod changes
//! (labels, addresses, two pods on one address, finishing, deletion, this node's wiring). The
//! numbers may differ (they are handed out in another order); what they stand for may not.

use std::collections::{BTreeMap, BTreeSet};

use super::new_pods::wired;
use super::*;

/// What the entries say, with every allocated number replaced by what it stands for.
#[derive(Debug, PartialEq, Eq)]
struct Meaning {
    ipcache: BTreeMap<CidrKey, String>,
    endpoint_policy: BTreeMap<IpKey, (String, String)>,
    policy: BTreeSet<(String, String, u8, [u8; 2], u32, String)>,
    errors: Vec<PolicyError>,
}

fn meaning(t: &PolicyTables) -> Meaning {
    let mut prefixes: BTreeMap<u32, CidrKey> = BTreeMap::new();
    for (prefix, identity) in &t.ipcache {
        if identity.id >= identity::FIRST_ALLOCATED {
            let other = prefixes.insert(identity.id, *prefix);
            assert!(other.is_none(), "identity {} given twice", identity.id);
        }
    }
    let peer = |id: u32| match prefixes.get(&id) {
        Some(prefix) => format!("{prefix:?}"),
        None => format!("fixed {id}"),
    };
    let mut policy_ids: BTreeMap<u32, String> = BTreeMap::new();
    for (ip, ep) in &t.endpoint_policy {
        for (direction, id) in [("ingress", ep.ingress_policy), ("egress", ep.egress_policy)] {
            if id != 0 && id != POLICY_PENDING {
                let other = policy_ids.insert(id, format!("{ip:?} {direction}"));
                assert!(other.is_none(), "policy id {id} given twice");
            }
        }
    }
    let policy_of = |id: u32| {
        policy_ids
            .get(&id)
            .cloned()
            .unwrap_or_else(|| format!("fixed {id}"))
    };
    Meaning {
        ipcache: t
            .ipcache
            .iter()
            .map(|(prefix, identity)| (*prefix, peer(identity.id)))
            .collect(),
        endpoint_policy: t
            .endpoint_policy
            .iter()
            .map(|(ip, ep)| {
                (
                    *ip,
                    (policy_of(ep.ingress_policy), policy_of(ep.egress_policy)),
                )
            })
            .collect(),
        policy: t
            .policy
            .iter()
            .map(|(k, rule)| {
                (
                    policy_of(k.key.policy),
                    peer(k.key.peer),
                    k.key.proto,
                    k.key.port,
                    k.prefix_len,
                    t.rules[&rule.rule].to_string(),
                )
            })
            .collect(),
        errors: t.errors.clone(),
    }
}

/// A small deterministic generator: the run is the same every time.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((self.0 >> 33) % n as u64) as usize
    }
}

#[test]
fn pod_by_pod_updates_compile_as_the_whole_cluster_does() {
    let base = Cluster::new()
        .with(
            "prod",
            "web",
            json!({
                "podSelector": { "matchLabels": { "app": "web" } },
                "policyTypes": ["Ingress", "Egress"],
                "ingress": [
                    { "from": [{ "namespaceSelector": { "matchLabels": { "team": "b" } } }], "ports": [{ "port": "http" }] },
                    { "from": [{ "podSelector": { "matchLabels": { "app": "db" } } }, { "ipBlock": { "cidr": "10.244.0.0/16", "except": ["10.244.1.0/24"] } }] },
                ],
                "egress": [{ "to": [{ "podSelector": { "matchLabels": { "app": "web" } } }], "ports": [{ "port": "http" }, { "port": 9000, "endPort": 9100 }] }],
            }),
        )
        .with(
            "dev",
            "db",
            json!({ "podSelector": { "matchLabels": { "app": "db" } }, "ingress": [{ "from": [{ "podSelector": {} }] }] }),
        );
    let names = ["a", "b", "c", "d", "e", "f", "g"];
    let addresses = [
        "10.244.0.2",
        "10.244.0.3",
        "10.244.0.9",
        "10.244.1.2",
        "10.244.1.7",
    ];
    let apps = ["web", "db", "client"];
    let host: IpAddr = HOST_IP.parse().unwrap();
    let mut rng = Lcg(7);
    let mut pods: BTreeMap<PodKey, Pod> = BTreeMap::new();
    let mut wiring: Vec<LocalEndpoint> = Vec::new();
    let mut index = PodIndex::default();
    let mut alloc = Allocator::new();
    let mut parsed = ParsedPolicies::default();
    let mut last_ids: BTreeMap<CidrKey, u32> = BTreeMap::new();
    for step in 0..400 {
        let ns = ["prod", "dev"][rng.below(2)];
        let name = names[rng.below(names.len())];
        let key: PodKey = (ns.into(), name.into());
        let on_node = if rng.below(2) == 0 { NODE } else { "n2" };
        let mut changed = Vec::new();
        match rng.below(6) {
            0 => {
                pods.remove(&key);
                changed.push((key.clone(), None));
            }
            4 => {
                // This node's CNI wires (or unwires) the pod, with another address than its
                // status may say.
                let ip = addresses[rng.below(addresses.len())];
                if let Some(i) = wiring.iter().position(|ep| {
                    ep.pod
                        .as_ref()
                        .is_some_and(|p| (p.namespace.as_str(), p.name.as_str()) == (ns, name))
                }) {
                    wiring.remove(i);
                } else {
                    wiring.push(wired(ip, Some((ns, name))));
                }
            }
            kind => {
                let ips: Vec<&str> = if kind == 5 {
                    Vec::new()
                } else {
                    vec![addresses[rng.below(addresses.len())]]
                };
                let ports =
                    json!([{ "name": "http", "containerPort": 8000 + rng.below(3) as i32 }]);
                let mut p = pod(
                    ns,
                    name,
                    on_node,
                    &ips,
                    json!({ "app": apps[rng.below(3)] }),
                    ports,
                );
                if rng.below(8) == 0 {
                    p.status.as_mut().unwrap().phase = Some("Succeeded".into());
                }
                // A pod's node never changes: keep the first.
                if let Some(old) = pods.get(&key) {
                    p.spec = old.spec.clone();
                }
                pods.insert(key.clone(), p.clone());
                changed.push((key.clone(), Some(Arc::new(p))));
            }
        }
        index.update(changed, &wiring, NODE, &mut alloc);
        let node = LocalNode {
            name: NODE,
            host_ips: &[host],
            endpoints: &wiring,
        };
        let incremental = compile_indexed(
            &index,
            &base.namespaces,
            &base.policies,
            &mut parsed,
            &node,
            &mut alloc,
        );
        let whole = compile(
            pods.values(),
            &base.namespaces,
            &base.policies,
            &node,
            &mut Allocator::new(),
        );
        assert_eq!(meaning(&incremental), meaning(&whole), "step {step}");

        // A prefix that stays keeps its number.
        let ids: BTreeMap<CidrKey, u32> = incremental
            .ipcache
            .iter()
            .map(|(prefix, identity)| (*prefix, identity.id))
            .collect();
        for (prefix, id) in &ids {
            if let Some(before) = last_ids.get(prefix) {
                assert_eq!(before, id, "step {step}: {prefix:?} renumbered");
            }
        }
        last_ids = ids;
    }
}
