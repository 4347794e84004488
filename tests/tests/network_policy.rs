//! NetworkPolicy truth tables on the lab's real cluster (kube-apiserver, kubelets, containerd,
//! Sluice installed by its chart): namespaces x, y, z × pods a, b, c spread over two nodes,
//! ports 80 and 81, TCP and UDP. Each case applies policies, waits until every agent has
//! programmed them, probes every ordered pair and compares with the expected matrix written out
//! below (start from "everything connects", then state what the policies change).

use std::{collections::BTreeMap, net::Ipv4Addr, path::PathBuf, time::Duration};

use serde_json::{json, Value};
use sluice_tests::{
    cluster::{Cluster, ClusterOptions},
    lab::report::{Probe, Protocol},
    require_root,
};

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const PODS: [&str; 3] = ["a", "b", "c"];
const PORTS: [u16; 2] = [80, 81];
const PROTOCOLS: [Protocol; 2] = [Protocol::Tcp, Protocol::Udp];
/// A denied probe waits this long; the lab's own round trips take well under a millisecond.
const PROBE_TIMEOUT: Duration = Duration::from_millis(300);
/// Changes take effect for new connections within this.
const PROGRAMMING_DEADLINE: Duration = Duration::from_secs(1);

type Key = (String, String, u16, &'static str);

/// The expected matrix: every (from, to, port, protocol) → connects?
struct Reachability(BTreeMap<Key, bool>);

fn all_pods() -> Vec<String> {
    NAMESPACES
        .iter()
        .flat_map(|ns| PODS.iter().map(move |p| format!("{ns}/{p}")))
        .collect()
}

fn proto_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
    }
}

impl Reachability {
    fn everything() -> Reachability {
        let mut m = BTreeMap::new();
        for from in all_pods() {
            for to in all_pods() {
                for port in PORTS {
                    for proto in PROTOCOLS {
                        m.insert((from.clone(), to.clone(), port, proto_name(proto)), true);
                    }
                }
            }
        }
        Reachability(m)
    }

    /// Sets every entry matching the filters; `None` matches anything. A pod always reaches
    /// itself (loopback never enters the datapath), so self pairs are never changed.
    fn set(
        mut self,
        from: Option<&str>,
        to: Option<&str>,
        port: Option<u16>,
        proto: Option<&str>,
        value: bool,
    ) -> Self {
        for ((f, t, p, pr), v) in self.0.iter_mut() {
            let matches = from.is_none_or(|x| matches_pod(f, x))
                && to.is_none_or(|x| matches_pod(t, x))
                && port.is_none_or(|x| x == *p)
                && proto.is_none_or(|x| x == *pr);
            if matches && f != t {
                *v = value;
            }
        }
        self
    }

    fn deny_ingress_to(self, to: &str) -> Self {
        self.set(None, Some(to), None, None, false)
    }
    fn deny_egress_from(self, from: &str) -> Self {
        self.set(Some(from), None, None, None, false)
    }
    fn allow(self, from: &str, to: &str) -> Self {
        self.set(Some(from), Some(to), None, None, true)
    }
    fn allow_port(self, from: &str, to: &str, port: u16, proto: &str) -> Self {
        self.set(Some(from), Some(to), Some(port), Some(proto), true)
    }
}

/// `x/a` is one pod, `x/*` a namespace, `*/b` a pod name in every namespace.
fn matches_pod(pod: &str, pattern: &str) -> bool {
    let (ns, name) = pod.split_once('/').unwrap();
    let (pns, pname) = pattern.split_once('/').unwrap();
    (pns == "*" || pns == ns) && (pname == "*" || pname == name)
}

struct Suite {
    cluster: Cluster,
}

impl Suite {
    fn new() -> Suite {
        require_root();
        let cluster = Cluster::up(ClusterOptions::nodes(2)).expect("cluster up");
        let mut objects: Vec<Value> = NAMESPACES
            .iter()
            .map(|ns| json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": {"ns": ns}}}))
            .collect();
        for ns in NAMESPACES {
            for pod in PODS {
                objects.push(json!({
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": pod, "namespace": ns, "labels": {"pod": pod}},
                    "spec": {"containers": [{"name": "c", "image": "x", "ports": [
                        {"name": "serve-80", "containerPort": 80, "protocol": "TCP"},
                        {"name": "serve-81", "containerPort": 81, "protocol": "TCP"},
                        {"name": "serve-81-udp", "containerPort": 81, "protocol": "UDP"},
                    ]}]},
                }));
            }
        }
        cluster
            .apply_lab_manifests(objects, &PORTS)
            .expect("apply pods");
        cluster
            .wait_programmed(Duration::from_secs(120))
            .expect("pods programmed");
        Suite { cluster }
    }

    fn kubectl(&self, args: &[&str]) -> String {
        self.cluster
            .kubectl(args)
            .unwrap_or_else(|e| panic!("kubectl {args:?}: {e:#}"))
    }

    fn apply(&self, objects: Vec<Value>) {
        self.cluster
            .apply_lab_manifests(objects, &PORTS)
            .unwrap_or_else(|e| panic!("apply: {e:#}"));
    }

    /// Waits for every agent to have programmed what the API holds now.
    fn programmed(&self) {
        self.cluster
            .wait_programmed(PROGRAMMING_DEADLINE)
            .expect("programmed within the deadline");
    }

    /// Applies `policies`, waits the programming deadline, probes, compares, deletes them.
    fn case(&mut self, name: &str, policies: Vec<Value>, expected: Reachability) {
        let names: Vec<(String, String)> = policies
            .iter()
            .map(|p| {
                (
                    p["metadata"]["namespace"].as_str().unwrap().to_string(),
                    p["metadata"]["name"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        self.apply(policies);
        self.programmed();
        self.check(name, &expected);
        for (ns, policy) in names {
            self.kubectl(&["delete", "networkpolicy", "-n", &ns, &policy]);
        }
        self.programmed();
    }

    fn check(&self, name: &str, expected: &Reachability) {
        let probes = self
            .cluster
            .probe_all(&PORTS, &PROTOCOLS, PROBE_TIMEOUT)
            .expect("probe");
        let wrong: Vec<String> = probes
            .iter()
            .filter(|p: &&Probe| {
                let key = (p.from.clone(), p.to.clone(), p.port, proto_name(p.protocol));
                let want = expected.0.get(&key).copied().unwrap_or(false);
                want != p.connected || (p.connected && p.answered_by.as_deref() != Some(&p.to))
            })
            .map(|p| {
                format!(
                    "{} -> {} {}/{:?}: connected={}",
                    p.from, p.to, p.port, p.protocol, p.connected
                )
            })
            .collect();
        assert!(
            wrong.is_empty(),
            "case {name:?}: {} probes differ from the expected matrix:\n{}",
            wrong.len(),
            wrong.join("\n")
        );
    }

    /// Each lab pod (`ns/name`) → (address, node).
    fn pods(&self) -> BTreeMap<String, (Ipv4Addr, String)> {
        let pods = self.cluster.get(&["pods", "-A"]).expect("get pods");
        pods["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| NAMESPACES.contains(&p["metadata"]["namespace"].as_str().unwrap_or("")))
            .map(|p| {
                let key = format!(
                    "{}/{}",
                    p["metadata"]["namespace"].as_str().unwrap(),
                    p["metadata"]["name"].as_str().unwrap()
                );
                let ip = p["status"]["podIP"]
                    .as_str()
                    .and_then(|ip| ip.parse().ok())
                    .unwrap_or_else(|| panic!("{key} has no address"));
                (
                    key,
                    (
                        ip,
                        p["spec"]["nodeName"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string(),
                    ),
                )
            })
            .collect()
    }

    /// `sluicectl` in the agent's container on `node`, as an operator runs it.
    fn sluicectl(&self, node: &str, args: &[&str]) -> String {
        self.cluster.sluicectl(node, args).expect("sluicectl")
    }
}

fn policy(ns: &str, name: &str, spec: Value) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": name, "namespace": ns}, "spec": spec})
}

#[test]
fn network_policy_truth_tables() {
    let mut s = Suite::new();
    s.check("no policies", &Reachability::everything());

    s.case(
        "deny all ingress in x",
        vec![policy(
            "x",
            "deny",
            json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
        )],
        Reachability::everything().deny_ingress_to("x/*"),
    );
    s.case(
        "implied Ingress type: empty ingress list denies",
        vec![policy(
            "x",
            "deny",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}}),
        )],
        Reachability::everything().deny_ingress_to("x/a"),
    );
    s.case(
        "podSelector peer: x/b may reach x/a",
        vec![policy(
            "x",
            "from-b",
            json!({"podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
        )],
        Reachability::everything()
            .deny_ingress_to("x/a")
            .allow("x/b", "x/a"),
    );
    s.case(
        "namespaceSelector peer: all of y may reach x/a",
        vec![policy(
            "x",
            "from-y",
            json!({"podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]}),
        )],
        Reachability::everything()
            .deny_ingress_to("x/a")
            .allow("y/*", "x/a"),
    );
    s.case(
        "namespace name label: kubernetes.io/metadata.name",
        vec![policy("x", "from-z", json!({"podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "z"}}}]}]}))],
        Reachability::everything().deny_ingress_to("x/a").allow("z/*", "x/a"),
    );
    s.case(
        "both selectors in one peer: AND",
        vec![policy("x", "and", json!({"podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}, "podSelector": {"matchLabels": {"pod": "c"}}}]}]}))],
        Reachability::everything().deny_ingress_to("x/a").allow("y/c", "x/a"),
    );
    s.case(
        "two peers: OR",
        vec![policy("x", "or", json!({"podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "z"}}}, {"podSelector": {"matchLabels": {"pod": "b"}}}]}]}))],
        Reachability::everything().deny_ingress_to("x/a").allow("z/*", "x/a").allow("x/b", "x/a"),
    );
    s.case(
        "empty from: everyone, but only TCP 80",
        vec![policy(
            "x",
            "tcp80",
            json!({"podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"ports": [{"protocol": "TCP", "port": 80}]}]}),
        )],
        Reachability::everything()
            .deny_ingress_to("x/a")
            .allow_port("*/*", "x/a", 80, "TCP"),
    );
    s.case(
        "protocol without port: all UDP",
        vec![policy(
            "x",
            "udp",
            json!({"podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"ports": [{"protocol": "UDP"}]}]}),
        )],
        Reachability::everything()
            .deny_ingress_to("x/a")
            .allow_port("*/*", "x/a", 80, "UDP")
            .allow_port("*/*", "x/a", 81, "UDP"),
    );
    s.case(
        "endPort range 80-81 TCP",
        vec![policy(
            "x",
            "range",
            json!({"podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"ports": [{"protocol": "TCP", "port": 80, "endPort": 81}]}]}),
        )],
        Reachability::everything()
            .deny_ingress_to("x/a")
            .allow_port("*/*", "x/a", 80, "TCP")
            .allow_port("*/*", "x/a", 81, "TCP"),
    );
    s.case(
        "named port resolved on the destination pod",
        vec![policy(
            "x",
            "named",
            json!({"podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"ports": [{"protocol": "UDP", "port": "serve-81-udp"}]}]}),
        )],
        Reachability::everything()
            .deny_ingress_to("x/a")
            .allow_port("*/*", "x/a", 81, "UDP"),
    );
    s.case(
        "egress deny all from y/b; replies to allowed traffic still flow",
        vec![policy(
            "y",
            "deny-egress",
            json!({"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Egress"]}),
        )],
        Reachability::everything().deny_egress_from("y/b"),
    );
    s.case(
        "egress to a namespace on one port",
        vec![policy("y", "egress-z", json!({"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Egress"],
            "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"ns": "z"}}}], "ports": [{"protocol": "TCP", "port": 81}]}]}))],
        Reachability::everything().deny_egress_from("y/b").allow_port("y/b", "z/*", 81, "TCP"),
    );
    s.case(
        "matchExpressions In / NotIn / Exists / DoesNotExist",
        vec![
            policy("x", "in", json!({"podSelector": {"matchExpressions": [{"key": "pod", "operator": "In", "values": ["a", "b"]}]}, "policyTypes": ["Ingress"]})),
            policy("y", "notin", json!({"podSelector": {"matchExpressions": [{"key": "pod", "operator": "NotIn", "values": ["a", "b"]}]}, "policyTypes": ["Ingress"]})),
            policy("z", "exists", json!({"podSelector": {"matchExpressions": [{"key": "nothere", "operator": "DoesNotExist"}, {"key": "pod", "operator": "Exists"}]},
                "policyTypes": ["Ingress"], "ingress": [{"from": [{"podSelector": {"matchExpressions": [{"key": "pod", "operator": "In", "values": ["c"]}]}}]}]})),
        ],
        Reachability::everything().deny_ingress_to("x/a").deny_ingress_to("x/b").deny_ingress_to("y/c").deny_ingress_to("z/*").allow("z/c", "z/*"),
    );
    s.case(
        "union of two policies",
        vec![
            policy("x", "one", json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]})),
            policy("x", "two", json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}, "podSelector": {"matchLabels": {"pod": "c"}}}]}]})),
        ],
        Reachability::everything().deny_ingress_to("x/a").allow("x/b", "x/a").allow("y/c", "x/a"),
    );
    // Round robin put x/a, x/c, y/b, z/a and z/c on node-1.
    let pods = s.pods();
    let in_node1: Vec<&String> = pods
        .iter()
        .filter(|(_, (_, node))| node == "node-1")
        .map(|(k, _)| k)
        .collect();
    assert_eq!(in_node1, ["x/a", "x/c", "y/b", "z/a", "z/c"]);
    let node1_cidr = s.kubectl(&["get", "node", "node-1", "-o", "jsonpath={.spec.podCIDR}"]);
    let excluded = pods["y/b"].0;
    s.case(
        "ipBlock with except: node-1's pod CIDR but not y/b",
        vec![policy("x", "cidr", json!({"podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"from": [{"ipBlock": {"cidr": node1_cidr, "except": [format!("{excluded}/32")]}}]}]}))],
        Reachability::everything().deny_ingress_to("x/a").allow("x/c", "x/a").allow("z/a", "x/a").allow("z/c", "x/a"),
    );
    new_pods_are_covered_and_counted(&mut s);
    labels_and_updates_take_effect(&mut s);
}

/// A pod created after the policy is selected by it within the deadline; the rule's counters
/// and the verdict stream (`sluicectl` in the agent's container) name the policy and the pods.
fn new_pods_are_covered_and_counted(s: &mut Suite) {
    let web = policy(
        "x",
        "web",
        json!({"podSelector": {"matchLabels": {"app": "web"}},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}], "ports": [{"protocol": "TCP", "port": 80}]}]}),
    );
    s.apply(vec![web]);
    s.apply(vec![json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web", "namespace": "x", "labels": {"app": "web"}},
        "spec": {"nodeName": "node-2", "containers": [{"name": "c", "image": "x"}]}})]);
    s.cluster
        .wait_programmed(Duration::from_secs(60))
        .expect("x/web running and programmed");
    let web_ip = s.pods()["x/web"].0;
    let (sources, _) = s.cluster.probe_endpoints().expect("pods' namespaces");
    let sources: BTreeMap<String, PathBuf> = sources.into_iter().collect();
    let tcp = |from: &str, port: u16| {
        sluice_tests::probe::tcp_within(&sources[from], None, web_ip, port, PROBE_TIMEOUT).is_some()
    };
    assert!(tcp("x/b", 80), "x/b -> x/web TCP 80");
    assert!(!tcp("x/c", 80), "x/c -> x/web is denied");
    assert!(!tcp("x/b", 81), "x/b -> x/web TCP 81 is denied");
    let policy_out = s.sluicectl("node-2", &["policy"]);
    assert!(
        policy_out.contains("x/web ingress[0]"),
        "sluicectl policy:\n{policy_out}"
    );
    let events = s.sluicectl("node-2", &["events", "--no-follow"]);
    assert!(
        events.contains("(x/b)")
            && events.contains("(x/web)")
            && events.contains("x/web ingress[0]"),
        "sluicectl events:\n{events}"
    );
    assert!(
        events.contains("DROP") && events.contains("(x/c)"),
        "sluicectl events:\n{events}"
    );
    s.kubectl(&["delete", "networkpolicy", "-n", "x", "web"]);
    s.kubectl(&["delete", "pod", "-n", "x", "web"]);
    s.programmed();
}

/// Pod and namespace label changes and policy updates apply to new connections within the
/// deadline.
fn labels_and_updates_take_effect(s: &mut Suite) {
    let allow_from_team_blue = policy(
        "x",
        "blue",
        json!({"podSelector": {"matchLabels": {"pod": "a"}},
        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "blue"}}}]}]}),
    );
    s.apply(vec![allow_from_team_blue]);
    s.programmed();
    s.check(
        "policy with a namespace label nobody has",
        &Reachability::everything().deny_ingress_to("x/a"),
    );
    s.kubectl(&["label", "namespace", "z", "team=blue"]);
    s.programmed();
    s.check(
        "namespace z labelled team=blue",
        &Reachability::everything()
            .deny_ingress_to("x/a")
            .allow("z/*", "x/a"),
    );
    let updated = json!({"spec": {"ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "client"}}}]}]}});
    s.kubectl(&[
        "patch",
        "networkpolicy",
        "-n",
        "x",
        "blue",
        "--type",
        "merge",
        "-p",
        &updated.to_string(),
    ]);
    s.kubectl(&["label", "pod", "-n", "x", "c", "role=client"]);
    s.programmed();
    s.check(
        "policy updated, pod x/c labelled role=client",
        &Reachability::everything()
            .deny_ingress_to("x/a")
            .allow("x/c", "x/a"),
    );
    s.kubectl(&["delete", "networkpolicy", "-n", "x", "blue"]);
    s.programmed();
    s.check("policy deleted", &Reachability::everything());
}
