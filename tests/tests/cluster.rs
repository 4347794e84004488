//! Sluice on a real Kubernetes cluster (`sluice_tests::cluster`): kube-apiserver with RBAC, a
//! kubelet with containerd on every node, Sluice installed by `helm install` of its chart and
//! running from its image. Pods are agnhost `netexec` servers, as in the upstream e2e tests; a
//! probe is `kubectl exec` into one pod asking its netexec to dial another (`/dial`), which
//! answers with the hostname of the pod that replied.

use std::{collections::BTreeSet, time::Duration};

use anyhow::{bail, Context, Result};
use serde_json::Value;
use sluice_tests::cluster::{agnhost_image, Cluster, ClusterOptions};
use sluice_tests::lab::services::{ServiceProbes, Source};

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

/// A netexec pod on `node`'s host network, serving on `HOST_PORT` and `HOST_UDP_PORT`.
fn host_netexec_pod(name: &str, node: &str, labels: &str) -> String {
    format!(
        "apiVersion: v1
kind: Pod
metadata: {{name: {name}, labels: {{{labels}}}}}
spec:
  hostNetwork: true
  nodeSelector: {{kubernetes.io/hostname: {node}}}
  containers:
  - name: netexec
    image: {image}
    args: [netexec, --http-port={HOST_PORT}, --udp-port={HOST_UDP_PORT}]
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
    dial_from_port(cluster, (from, 8080), host, port, protocol)
}

/// `dial` from a netexec serving on another port than 8080 (a host-network pod's).
fn dial_from_port(
    cluster: &Cluster,
    (from, netexec_port): (&str, u16),
    host: &str,
    port: u16,
    protocol: &str,
) -> Result<Vec<String>> {
    let url = format!(
        "http://127.0.0.1:{netexec_port}/dial?request=hostname&protocol={protocol}&host={host}&port={port}&tries=1"
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

/// The host-network netexec pods' ports, clear of the node's own (kubelet, the agent's 9421).
const HOST_PORT: u16 = 9080;
const HOST_UDP_PORT: u16 = 9081;

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
    // By name, through CoreDNS (itself behind a Service, on the pod network).
    let by_name = cluster.kubectl(&[
        "exec",
        "a",
        "--",
        "curl",
        "-s",
        "-m",
        "10",
        "http://web.default.svc.cluster.local/hostname",
    ])?;
    assert!(
        by_name == "b" || by_name == "c",
        "web by name answered {by_name:?}"
    );
    let udp = dial(&cluster, "a", &service_ip, 81, "udp")?;
    assert!(
        udp == ["b"] || udp == ["c"],
        "UDP through the Service: {udp:?}"
    );

    // Host-network endpoints: the node reaching a ClusterIP whose endpoint is itself (the
    // datapath hairpins it), another node reaching it, and a pod.
    cluster.apply(&format!(
        "{}{}apiVersion: v1
kind: Service
metadata: {{name: host-web}}
spec:
  selector: {{app: host-web}}
  ports: [{{port: 80, targetPort: {HOST_PORT}}}]
",
        host_netexec_pod("host-1", "node-1", "app: host-web"),
        host_netexec_pod("host-2", "node-2", ""),
    ))?;
    let host_web = cluster.get(&["service", "host-web"])?["spec"]["clusterIP"]
        .as_str()
        .unwrap()
        .to_string();
    for from in ["host-1", "host-2", "a"] {
        let netexec_port = if from == "a" { 8080 } else { HOST_PORT };
        cluster.wait_for(
            &format!("{from} reaching host-web, served by node-1's host network"),
            Duration::from_secs(60),
            || {
                Ok(
                    dial_from_port(&cluster, (from, netexec_port), &host_web, 80, "http")
                        .unwrap_or_default()
                        == ["node-1"],
                )
            },
        )?;
    }

    // NetworkPolicy: web takes ingress only from role=allowed; a (role=client) is cut off, until
    // it is relabelled.
    cluster.apply(WEB_FROM_ALLOWED)?;
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

/// kubectl on this machine, through the loopback relay, as a user of the cluster runs it.
fn host_kubectl(kubeconfig: &std::path::Path, args: &[&str]) -> Result<String> {
    sluice_tests::sh(
        std::process::Command::new(sluice_tests::cluster::kube_bin("kubectl"))
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(args),
    )
}

#[test]
fn kubectl_on_this_machine_applies_patches_execs_and_port_forwards() -> Result<()> {
    let cluster = Cluster::up(ClusterOptions::nodes(1))?;
    let (_proxy, kubeconfig) = cluster.host_access()?;
    let path = cluster.dir.join("host.kubeconfig");
    std::fs::write(&path, kubeconfig)?;
    let kubectl = |args: &[&str]| host_kubectl(&path, args);

    assert!(kubectl(&["get", "nodes"])?.contains("node-1"));
    // Server-side apply, then a strategic merge patch of a list.
    let manifest = cluster.dir.join("pod.yaml");
    std::fs::write(&manifest, netexec_pod("web", "node-1", "app: web"))?;
    let manifest = manifest.display().to_string();
    kubectl(&["apply", "--server-side", "-f", &manifest])?;
    cluster.wait_for("web Ready", Duration::from_secs(60), || {
        Ok(sluice_tests::cluster::condition(
            &cluster.get(&["pod", "web"])?,
            "Ready",
        ))
    })?;
    kubectl(&[
        "patch",
        "pod",
        "web",
        "--type=strategic",
        "-p",
        r#"{"metadata":{"labels":{"tier":"front"}}}"#,
    ])?;
    let pod = cluster.get(&["pod", "web", "--show-managed-fields"])?;
    assert_eq!(pod["metadata"]["labels"]["tier"], "front");
    assert_eq!(
        pod["metadata"]["labels"]["app"], "web",
        "merged, not replaced"
    );
    let field_managers: Vec<&str> = pod["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["manager"].as_str())
        .collect();
    // Server-side apply records its field manager; the patch its own.
    assert!(
        field_managers.contains(&"kubectl") && field_managers.contains(&"kubectl-patch"),
        "{field_managers:?}"
    );

    // On a single node too, the node reaches ClusterIPs (the route to the Service CIDR), and
    // pod traffic leaving the cluster is masqueraded to the node's address.
    kubectl(&[
        "expose",
        "pod",
        "web",
        "--port",
        "80",
        "--target-port",
        "8080",
    ])?;
    let web_ip = cluster.get(&["service", "web"])?["spec"]["clusterIP"]
        .as_str()
        .unwrap()
        .to_string();
    let node = &cluster.nodes[0];
    cluster.wait_for(
        "the node reaching the web Service",
        Duration::from_secs(20),
        || {
            let out = node.ns.exec(&[
                "curl",
                "-s",
                "-m",
                "2",
                &format!("http://{web_ip}/hostname"),
            ]);
            Ok(out.is_ok_and(|body| body == "web"))
        },
    )?;
    let outside = sluice_tests::probe::Servers::start(&cluster.external.path(), "outside", &[9000]);
    let web = cluster.netns_of(&Source::Pod("default/web".into()))?;
    let seen = sluice_tests::probe::tcp(&web, None, sluice_tests::lab::EXTERNAL_IP, 9000)
        .context("web reached nothing outside the cluster")?;
    assert_eq!(
        seen.client,
        std::net::IpAddr::V4(node.ip),
        "masqueraded to the node"
    );
    drop(outside);

    // The API server's proxy dials the pod itself, as the e2e framework's checks do.
    let proxied = kubectl(&[
        "get",
        "--raw",
        "/api/v1/namespaces/default/pods/web:8080/proxy/hostname",
    ])?;
    assert_eq!(proxied, "web");

    // exec and logs through the kubelet; port-forward through the kubelet and containerd.
    assert_eq!(
        kubectl(&["exec", "web", "--", "sh", "-c", "echo $((6 * 7))"])?,
        "42\n"
    );
    // Its output goes to a file: kubectl writes a line per connection, and a closed pipe would
    // end it.
    let output = cluster.dir.join("port-forward.log");
    let mut forward = std::process::Command::new(sluice_tests::cluster::kube_bin("kubectl"))
        .arg("--kubeconfig")
        .arg(&path)
        .args(["port-forward", "pod/web", ":8080"])
        .stdout(std::fs::File::create(&output)?)
        .stderr(std::fs::File::create(cluster.dir.join("port-forward.err"))?)
        .spawn()?;
    // "Forwarding from 127.0.0.1:41234 -> 8080"
    let local = (0..100).find_map(|_| {
        std::thread::sleep(Duration::from_millis(100));
        let text = std::fs::read_to_string(&output).ok()?;
        let address = text.split_whitespace().nth(2)?;
        address
            .starts_with("127.0.0.1:")
            .then(|| address.to_string())
    });
    // The first connection sets up the streams to the kubelet: allow it a few tries.
    let answer = local
        .as_ref()
        .and_then(|local| (0..10).find_map(|_| sluice_tests::probe::http_get(local, "/hostname")));
    let _ = forward.kill();
    let _ = forward.wait();
    assert_eq!(
        answer.map(|(_, body)| body).as_deref(),
        Some("web"),
        "port-forward on {local:?}: {}",
        std::fs::read_to_string(cluster.dir.join("port-forward.err"))?
    );
    assert!(kubectl(&["logs", "web"])?.contains("GET /hostname"));

    // Graceful deletion: the kubelet stops the container and the API object goes.
    kubectl(&["delete", "pod", "web", "--wait=true", "--timeout=60s"])?;
    assert!(kubectl(&["get", "pods", "-o", "name"])?.trim().is_empty());
    Ok(())
}

fn wait_pods_ready(cluster: &Cluster, count: usize) -> Result<()> {
    cluster.wait_for(
        &format!("{count} pods Ready"),
        Duration::from_secs(60),
        || {
            Ok(cluster.get(&["pods"])?["items"]
                .as_array()
                .is_some_and(|pods| {
                    pods.len() == count
                        && pods
                            .iter()
                            .all(|p| sluice_tests::cluster::condition(p, "Ready"))
                }))
        },
    )
}

const WEB_FROM_ALLOWED: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-from-allowed}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Ingress]
  ingress: [{from: [{podSelector: {matchLabels: {role: allowed}}}]}]
";

/// The fault injections of the embedded lab, for real: the agent's container SIGKILLed (the
/// kubelet restarts it), kube-apiserver restarted, etcd compacted under the agents' watches.
/// Through each, an isolated pod stays isolated, and what changes afterwards is programmed.
#[test]
fn pods_stay_connected_and_isolated_through_real_faults() -> Result<()> {
    let mut cluster = Cluster::up(ClusterOptions::nodes(2))?;
    cluster.apply(
        &[
            netexec_pod("a", "node-1", "role: client"),
            netexec_pod("d", "node-1", "role: allowed"),
            netexec_pod("b", "node-2", "app: web"),
        ]
        .concat(),
    )?;
    cluster.apply(WEB_FROM_ALLOWED)?;
    wait_pods_ready(&cluster, 3)?;
    let b = pod_ip(&cluster, "b")?;
    cluster.wait_for("b isolated", Duration::from_secs(20), || {
        Ok(dial(&cluster, "a", &b, 8080, "http")?.is_empty())
    })?;
    assert_eq!(dial(&cluster, "d", &b, 8080, "http")?, ["b"]);

    // 1. The agent on b's node is killed: the datapath keeps its programs and maps meanwhile.
    cluster.kill_agent("node-2")?;
    assert!(
        dial(&cluster, "a", &b, 8080, "http")?.is_empty(),
        "b let a in while its agent was down"
    );
    assert_eq!(dial(&cluster, "d", &b, 8080, "http")?, ["b"]);
    cluster.wait_for(
        "the agent on node-2 restarted and Ready",
        Duration::from_secs(60),
        || {
            let pod = &cluster.agent_pod("node-2")?;
            let restarts = pod["status"]["containerStatuses"][0]["restartCount"]
                .as_u64()
                .unwrap_or(0);
            Ok(restarts >= 1 && sluice_tests::cluster::condition(pod, "Ready"))
        },
    )?;
    assert!(dial(&cluster, "a", &b, 8080, "http")?.is_empty());
    assert_eq!(dial(&cluster, "d", &b, 8080, "http")?, ["b"]);

    // 2. kube-apiserver restarts; a pod created afterwards is wired and isolated.
    cluster.restart_apiserver(Duration::from_secs(2))?;
    cluster.apply(&netexec_pod("e", "node-2", "app: web"))?;
    wait_pods_ready(&cluster, 4)?;
    let e = pod_ip(&cluster, "e")?;
    cluster.wait_for("d reaches e", Duration::from_secs(20), || {
        Ok(dial(&cluster, "d", &e, 8080, "http")? == ["e"])
    })?;
    assert!(dial(&cluster, "a", &e, 8080, "http")?.is_empty());

    // 3. etcd compacted and the API server restarted: watches resumed from before the
    // compaction get 410 Gone and relist; a change made afterwards is programmed.
    cluster.compact_etcd()?;
    cluster.restart_apiserver(Duration::from_secs(1))?;
    cluster.kubectl(&["label", "pod", "a", "role=allowed", "--overwrite"])?;
    cluster.wait_for(
        "a let in to b and e once relabelled",
        Duration::from_secs(30),
        || {
            Ok(dial(&cluster, "a", &b, 8080, "http")? == ["b"]
                && dial(&cluster, "a", &e, 8080, "http")? == ["e"])
        },
    )?;
    Ok(())
}

/// The first run (`cargo xtask lab`) on the real cluster: the demo's pods connect pair by pair,
/// its NetworkPolicy cuts db-1 off from everything but api-1's TCP 8080 and counts on its rule,
/// its Service answers from a pod and through a node port from outside, and it all takes about
/// a minute once the cluster is up. `demo::run` fails on any probe that goes against that.
#[test]
fn the_first_run_shows_connectivity_policy_and_a_service() -> Result<()> {
    use sluice_tests::lab::demo;
    let cluster = Cluster::up(ClusterOptions::nodes(2))?;
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/demo");
    let started = std::time::Instant::now();
    let report = demo::run(&cluster, &examples)?;
    let steps: Vec<(&str, usize)> = report
        .steps
        .iter()
        .map(|s| (s.manifests.as_str(), s.probes.len()))
        .collect();
    let pairs = 4 * 4 * demo::PORTS.len() * 2;
    assert_eq!(
        steps,
        [
            ("connectivity", pairs),
            ("policy", pairs),
            ("policy deleted", pairs)
        ]
    );
    let cut = report.steps[1]
        .probes
        .iter()
        .filter(|p| !p.connected)
        .count();
    // Into db-1 from the three other pods on both ports and protocols, less api-1's TCP 8080.
    assert_eq!(cut, 3 * 2 * 2 - 1);
    eprintln!(
        "the demo took {:.1?} after the cluster came up",
        started.elapsed()
    );
    Ok(())
}
