//! Sluice on a real Kubernetes cluster (`sluice_tests::cluster`): kube-apiserver with RBAC, a
//! kubelet with containerd on every node, Sluice installed by `helm install` of its chart and
//! running from its image. Pods are agnhost `netexec` servers, as in the upstream e2e tests; a
//! probe is `kubectl exec` into one pod asking its netexec to dial another (`/dial`), which
//! answers with the hostname of the pod that replied.

use std::{collections::BTreeSet, time::Duration};

use anyhow::{bail, Result};
use serde_json::Value;
use sluice_tests::cluster::{agnhost_image, Cluster, ClusterOptions};

fn netexec_pod(name: &str, node: &str, labels: &str) -> String {
    format!(
        "apiVersion: v1
kind: Pod
metadata:
  name: {name}
  labels: {{{labels}}}
spec:
  nodeSelector: {{kubernetes.io/hostname: {node}}}
  containers:
  - name: netexec
    image: {image}
    args: [netexec, --http-port=8080, --udp-port=8081]
    ports: [{{containerPort: 8080}}, {{containerPort: 8081, protocol: UDP}}]
    readinessProbe:
      tcpSocket: {{port: 8080}}
      periodSeconds: 1
---
",
        image = agnhost_image()
    )
}

/// What `from`'s netexec got back dialing `host:port` once over `protocol` (`http` over TCP, `udp`): the
/// hostnames that answered, empty when none did (netexec waits 5 s for an answer).
fn dial(
    cluster: &Cluster,
    from: &str,
    host: &str,
    port: u16,
    protocol: &str,
) -> Result<Vec<String>> {
    let url = format!(
        "http://127.0.0.1:8080/dial?request=hostname&protocol={protocol}&host={host}&port={port}&tries=1"
    );
    let out = cluster.kubectl(&["exec", from, "--", "curl", "-s", "-m", "10", &url])?;
    let answer: Value = serde_json::from_str(&out)
        .map_err(|e| anyhow::anyhow!("{from}'s netexec answered {out:?}: {e}"))?;
    Ok(answer["responses"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r.as_str().map(str::to_string))
        .collect())
}

fn pod_ip(cluster: &Cluster, name: &str) -> Result<String> {
    let pod = cluster.get(&["pod", name])?;
    match pod["status"]["podIP"].as_str() {
        Some(ip) => Ok(ip.to_string()),
        None => bail!("pod {name} has no IP"),
    }
}

#[test]
fn sluice_on_a_real_cluster_connects_pods_services_and_policy() -> Result<()> {
    let cluster = Cluster::up(ClusterOptions::nodes(2))?;

    // Sluice's own pods: one agent per node from the image, NodeIPAM from its controller.
    let agents = cluster.get(&[
        "pods",
        "-n",
        "kube-system",
        "-l",
        "app.kubernetes.io/component=agent",
    ])?;
    let on: BTreeSet<&str> = agents["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["spec"]["nodeName"].as_str())
        .collect();
    assert_eq!(on, BTreeSet::from(["node-1", "node-2"]));
    for pod in agents["items"].as_array().unwrap() {
        assert_eq!(pod["spec"]["containers"][0]["image"], "sluice:0.1.0");
    }
    let nodes = cluster.get(&["nodes"])?;
    for node in nodes["items"].as_array().unwrap() {
        let cidr = node["spec"]["podCIDR"].as_str().unwrap_or_default();
        assert!(
            cidr.starts_with("10.244."),
            "{} has podCIDR {cidr:?}",
            node["metadata"]["name"]
        );
    }

    let manifest = [
        netexec_pod("a", "node-1", "role: client"),
        netexec_pod("b", "node-2", "app: web"),
        netexec_pod("c", "node-1", "app: web"),
    ]
    .concat();
    cluster.apply(&manifest)?;
    cluster.wait_for("pods a, b, c Ready", Duration::from_secs(60), || {
        Ok(cluster.get(&["pods"])?["items"]
            .as_array()
            .is_some_and(|pods| {
                pods.len() == 3
                    && pods
                        .iter()
                        .all(|p| sluice_tests::cluster::condition(p, "Ready"))
            }))
    })?;

    // Pod to pod, same node and across nodes, TCP and UDP.
    for (from, to) in [("a", "b"), ("a", "c"), ("b", "a"), ("c", "b")] {
        let ip = pod_ip(&cluster, to)?;
        for (port, protocol) in [(8080, "http"), (8081, "udp")] {
            assert_eq!(
                dial(&cluster, from, &ip, port, protocol)?,
                vec![to.to_string()],
                "{from} -> {to} over {protocol}"
            );
        }
    }

    // A ClusterIP Service over b and c, through kube-controller-manager's EndpointSlices.
    cluster.apply(
        "apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}, {name: udp, port: 81, targetPort: 8081, protocol: UDP}]
",
    )?;
    let service_ip = cluster.get(&["service", "web"])?["spec"]["clusterIP"]
        .as_str()
        .unwrap()
        .to_string();
    let mut answered = BTreeSet::new();
    cluster.wait_for(
        "the web Service answered by b and c",
        Duration::from_secs(30),
        || {
            answered.extend(dial(&cluster, "a", &service_ip, 80, "http")?);
            Ok(answered.len() == 2)
        },
    )?;
    assert_eq!(answered, BTreeSet::from(["b".to_string(), "c".to_string()]));
    let udp = dial(&cluster, "a", &service_ip, 81, "udp")?;
    assert!(
        udp == ["b"] || udp == ["c"],
        "UDP through the Service: {udp:?}"
    );

    // NetworkPolicy: web takes ingress only from role=allowed; a (role=client) is cut off, until
    // it is relabelled.
    cluster.apply(
        "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-from-allowed}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Ingress]
  ingress: [{from: [{podSelector: {matchLabels: {role: allowed}}}]}]
",
    )?;
    let b = pod_ip(&cluster, "b")?;
    cluster.wait_for("a cut off from b", Duration::from_secs(20), || {
        Ok(dial(&cluster, "a", &b, 8080, "http")?.is_empty())
    })?;
    assert!(dial(&cluster, "a", &b, 8081, "udp")?.is_empty());
    assert_eq!(
        dial(&cluster, "c", &b, 8080, "http")?,
        Vec::<String>::new(),
        "c is not role=allowed either"
    );
    cluster.kubectl(&["label", "pod", "a", "role=allowed", "--overwrite"])?;
    cluster.wait_for(
        "a let in to b once relabelled",
        Duration::from_secs(20),
        || Ok(dial(&cluster, "a", &b, 8080, "http")? == ["b"]),
    )?;

    // What an operator runs: the agent's log and sluicectl in its container.
    let stats = cluster.kubectl(&[
        "-n",
        "kube-system",
        "exec",
        "ds/sluice-agent",
        "-c",
        "sluice-agent",
        "--",
        "sluicectl",
        "stats",
    ])?;
    assert!(stats.contains("L3Forwarding"), "{stats}");
    let log = cluster.kubectl(&[
        "-n",
        "kube-system",
        "logs",
        "ds/sluice-agent",
        "-c",
        "sluice-agent",
    ])?;
    assert!(!log.is_empty());
    eprintln!(
        "startup to all nodes Ready with Sluice running: {:.1} s",
        cluster.startup.as_secs_f64()
    );
    Ok(())
}
