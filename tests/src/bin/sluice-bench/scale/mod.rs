//! `sluice-bench scale [--quick]`: the agent of one real node in an API holding 1,000 Nodes,
//! 30,000 Pods (all but the real node's on API-only Nodes), 1,000 NetworkPolicies and 10,000
//! Services. Per kind of change: the time from the write to the agent's report that it is
//! programmed (p50/p99), the agent's CPU time per change, and its memory. `--quick` is a tenth
//! of the size, to check the benchmark itself.
//!
//! The agent is held off the node (its DaemonSet's nodeSelector matches nothing) while the
//! objects are written, as in a cluster where it is installed last; its start with all of
//! them there is the first figure.

mod objects;

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use futures::{stream, Future, StreamExt, TryStreamExt};
use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{Namespace, Node, Pod, Service, ServiceAccount},
        discovery::v1::EndpointSlice,
        networking::v1::NetworkPolicy,
    },
    serde::de::DeserializeOwned,
};
use kube::{
    api::{ListParams, Patch, PatchParams, PostParams},
    Api, Resource,
};
use serde_json::{json, Value};
use sluice_tests::cluster::{AdminClient, Cluster, ClusterOptions, ControllerManager};

use crate::agent_process::{agent_pid, agent_processes, cpu_time, memory, wait_reported};
use objects::{pod_address, pod_place, PodPlace, Size, FREE_SLOTS_FROM};

const FULL: Size = Size {
    nodes: 1_000,
    pods_per_node: 30,
    namespaces: 100,
    policies_per_namespace: 10,
    services_per_namespace: 100,
};

const QUICK: Size = Size {
    nodes: 100,
    pods_per_node: 30,
    namespaces: 10,
    policies_per_namespace: 10,
    services_per_namespace: 100,
};

/// Changes of each kind measured, one after the other; fewer when a kind's take more than
/// `KIND_LIMIT` in all.
const CHANGES: u32 = 40;
const KIND_LIMIT: Duration = Duration::from_secs(90);
/// Requests in flight while the cluster is written.
const IN_FLIGHT: usize = 16;

/// The goals of issue 12: a pod or policy change programmed within 50 ms (p99), the agent
/// under 200 MiB.
const GOAL_P99: Duration = Duration::from_millis(50);
const GOAL_RSS_MIB: f64 = 200.0;

pub fn run(quick: bool) -> Result<()> {
    let size = if quick { QUICK } else { FULL };
    let cluster = Cluster::up(ClusterOptions {
        // 64 addresses per Node, so 1,000 Nodes fit in the lab's 10.244.0.0/16.
        inline_values: Some("nodeIPAM:\n  nodeCIDRMaskSizeIPv4: 26\n".into()),
        controller_manager: ControllerManager {
            args: vec![
                "--node-startup-grace-period=1h",
                "--node-monitor-grace-period=1h",
            ],
            ..ControllerManager::default()
        },
        ..ClusterOptions::nodes(1)
    })?;
    let admin = cluster.admin_client()?;
    hold_agent(&admin, true)?;
    wait_for("the agent to stop", || Ok(agent_processes()?.is_empty()))?;

    let start = Instant::now();
    let mut targets = populate(&admin, &size)?;
    let populated = start.elapsed();
    eprintln!("scale: cluster written in {:.0} s", populated.as_secs_f64());

    let start = Instant::now();
    hold_agent(&admin, false)?;
    // Every kind, so the agent has read the whole cluster (the system objects are older).
    targets.retain(|_, rv| *rv > 0);
    wait_reported(&cluster.nodes[0], &targets)?;
    let started = start.elapsed();
    let pid = agent_pid()?;
    let after_start = memory(pid)?;

    // Idle: what the agent spends with nothing changing (heartbeats of the real node only).
    let idle_cpu = {
        let before = cpu_time(pid)?;
        std::thread::sleep(Duration::from_secs(5));
        (cpu_time(pid)? - before) / 5
    };

    let mut rows = Vec::new();
    for change in changes(&size) {
        rows.push(measure(&cluster, &admin, pid, &change)?);
    }
    let after_changes = memory(pid)?;

    println!(
        "\nscale: {} Nodes, {} Pods, {} NetworkPolicies, {} Services (+ EndpointSlices) in {} namespaces; one real node",
        size.nodes + 1,
        size.pods(),
        size.namespaces * size.policies_per_namespace,
        size.namespaces * size.services_per_namespace,
        size.namespaces
    );
    println!(
        "cluster written in {:.0} s ({IN_FLIGHT} requests in flight); agent start → all of it programmed: {:.1} s",
        populated.as_secs_f64(),
        started.as_secs_f64()
    );
    println!("\n| change (one at a time) | n | write → agent reports it programmed, p50 | p99 | agent CPU per change |");
    println!("|---|---|---|---|---|");
    for row in &rows {
        let goal = if row.goal && row.p99 > GOAL_P99 {
            format!(" (goal < {GOAL_P99:?})")
        } else {
            String::new()
        };
        println!(
            "| {} | {} | {:.1?} | {:.1?}{goal} | {:.1?} |",
            row.what, row.n, row.p50, row.p99, row.cpu_per_change
        );
    }
    println!("agent CPU when idle: {:.1?} per second", idle_cpu);
    println!("\nagent memory (/proc/<pid>/status)");
    println!("| when | VmRSS | VmHWM (peak) |");
    println!("|---|---|---|");
    for (when, (rss, hwm)) in [
        ("started with the whole cluster there", after_start),
        ("after the changes", after_changes),
    ] {
        let goal = if rss > GOAL_RSS_MIB {
            format!(" (goal < {GOAL_RSS_MIB} MiB)")
        } else {
            String::new()
        };
        println!("| {when} | {rss:.1} MiB{goal} | {hwm:.1} MiB |");
    }
    Ok(())
}

/// Keeps the agent's DaemonSet off every node (`hold`), or lets it back on.
fn hold_agent(admin: &AdminClient, hold: bool) -> Result<()> {
    let daemonsets: Api<DaemonSet> = Api::namespaced(admin.client.clone(), "kube-system");
    let value = if hold { json!("true") } else { Value::Null };
    let patch =
        json!({"spec": {"template": {"spec": {"nodeSelector": {"sluice.bench/held": value}}}}});
    admin
        .block_on(daemonsets.patch(
            "sluice-agent",
            &PatchParams::default(),
            &Patch::Strategic(patch),
        ))
        .context("patching the sluice-agent DaemonSet's nodeSelector")?;
    Ok(())
}

fn wait_for(what: &str, mut done: impl FnMut() -> Result<bool>) -> Result<()> {
    let start = Instant::now();
    while !done()? {
        if start.elapsed() > Duration::from_secs(120) {
            bail!("waited 120 s for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn resource_version<K: Resource>(object: &K) -> u64 {
    object
        .meta()
        .resource_version
        .as_deref()
        .and_then(|rv| rv.parse().ok())
        .unwrap_or_default()
}

/// Runs `writes`, `IN_FLIGHT` at a time; the newest resourceVersion they made.
fn write_all<K, F>(admin: &AdminClient, writes: impl Iterator<Item = F>) -> Result<u64>
where
    K: Resource,
    F: Future<Output = kube::Result<K>>,
{
    admin.block_on(
        stream::iter(writes)
            .buffer_unordered(IN_FLIGHT)
            .map_err(anyhow::Error::from)
            .try_fold(0, |newest, object| async move {
                Ok(newest.max(resource_version(&object)))
            }),
    )
}

fn typed<K: DeserializeOwned>(value: Value) -> K {
    serde_json::from_value(value).expect("the benchmark's objects are well-formed")
}

/// Writes the cluster; the newest resourceVersion of each kind written.
fn populate(admin: &AdminClient, size: &Size) -> Result<BTreeMap<String, u64>> {
    let client = &admin.client;
    let post = &PostParams::default();
    let mut newest = BTreeMap::new();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let written = write_all(
        admin,
        (0..size.namespaces).map(|n| {
            let (api, post) = (&namespaces, post);
            async move { api.create(post, &typed(objects::namespace(n))).await }
        }),
    )?;
    newest.insert("Namespace".to_string(), written);
    // The ServiceAccount admission plugin refuses pods until their namespace's default
    // ServiceAccount exists.
    let accounts: Api<ServiceAccount> = Api::all(client.clone());
    wait_for("the namespaces' default ServiceAccounts", || {
        let list = admin
            .block_on(accounts.list(&ListParams::default().fields("metadata.name=default")))?;
        Ok(list
            .items
            .iter()
            .filter(|a| {
                a.metadata
                    .namespace
                    .as_deref()
                    .is_some_and(|n| n.starts_with("scale-"))
            })
            .count()
            == size.namespaces as usize)
    })?;

    let nodes: Api<Node> = Api::all(client.clone());
    let written = write_all(
        admin,
        (0..size.nodes).map(|i| {
            let (api, post) = (&nodes, post);
            async move { api.create(post, &typed(objects::node(i))).await }
        }),
    )?;
    newest.insert("Node".to_string(), written);

    let pods = |place: &PodPlace| Api::<Pod>::namespaced(client.clone(), &place.namespace);
    write_all(
        admin,
        (0..size.pods()).map(|j| {
            let (place, post) = (pod_place(size, j), post);
            let api = pods(&place);
            async move { api.create(post, &typed(objects::pod(&place))).await }
        }),
    )?;
    let written = write_all(
        admin,
        (0..size.pods()).map(|j| {
            let place = pod_place(size, j);
            let api = pods(&place);
            async move {
                api.patch_status(
                    &place.name,
                    &PatchParams::default(),
                    &Patch::Merge(objects::pod_status(&place)),
                )
                .await
            }
        }),
    )?;
    newest.insert("Pod".to_string(), written);

    let written = write_all(
        admin,
        (0..size.namespaces).flat_map(|n| {
            (0..size.policies_per_namespace).map(move |k| {
                let api: Api<NetworkPolicy> =
                    Api::namespaced(client.clone(), &objects::namespace_name(n));
                async move {
                    api.create(post, &typed(objects::network_policy(n, k)))
                        .await
                }
            })
        }),
    )?;
    newest.insert("NetworkPolicy".to_string(), written);

    let services =
        (0..size.namespaces).flat_map(|n| (0..size.services_per_namespace).map(move |s| (n, s)));
    let written = write_all(
        admin,
        services.clone().map(|(n, s)| {
            let api: Api<Service> = Api::namespaced(client.clone(), &objects::namespace_name(n));
            async move {
                api.create(post, &typed(objects::service(size, n, s).0))
                    .await
            }
        }),
    )?;
    newest.insert("Service".to_string(), written);
    let written = write_all(
        admin,
        services.map(|(n, s)| {
            let api: Api<EndpointSlice> =
                Api::namespaced(client.clone(), &objects::namespace_name(n));
            async move {
                api.create(post, &typed(objects::service(size, n, s).1))
                    .await
            }
        }),
    )?;
    newest.insert("EndpointSlice".to_string(), written);
    Ok(newest)
}

/// A kind of change: `write(i)` makes the i-th change and returns the kind and resourceVersion
/// the agent must report programmed. Set-up writes that do not count (`prepare`) are
/// programmed before the clock starts.
struct Change {
    what: &'static str,
    /// Counted against the p99 goal (pod and policy changes).
    goal: bool,
    prepare: Box<Prepare>,
    write: Box<Write>,
}

/// The kind and resourceVersion to wait for.
type Written = Result<Option<(&'static str, u64)>>;
type Prepare = dyn Fn(&AdminClient, u32) -> Written;
type Write = dyn Fn(&AdminClient, u32) -> Result<(&'static str, u64)>;

struct Row {
    what: &'static str,
    goal: bool,
    n: usize,
    p50: Duration,
    p99: Duration,
    cpu_per_change: Duration,
}

fn measure(cluster: &Cluster, admin: &AdminClient, pid: u32, change: &Change) -> Result<Row> {
    let mut times = Vec::new();
    let mut cpu = Duration::ZERO;
    let started = Instant::now();
    for i in 0..CHANGES {
        if started.elapsed() > KIND_LIMIT && times.len() >= 5 {
            break;
        }
        if let Some((kind, rv)) = (change.prepare)(admin, i)? {
            wait_reported(&cluster.nodes[0], &BTreeMap::from([(kind.to_string(), rv)]))
                .with_context(|| format!("setting up {} #{i}", change.what))?;
        }
        let before = cpu_time(pid)?;
        let start = Instant::now();
        let (kind, rv) = (change.write)(admin, i)?;
        wait_reported(&cluster.nodes[0], &BTreeMap::from([(kind.to_string(), rv)]))
            .with_context(|| format!("{} #{i}", change.what))?;
        times.push(start.elapsed());
        cpu += cpu_time(pid)? - before;
    }
    times.sort();
    let n = times.len();
    Ok(Row {
        what: change.what,
        goal: change.goal,
        n,
        p50: times[n / 2],
        p99: times[(n * 99).div_ceil(100) - 1],
        cpu_per_change: cpu / n as u32,
    })
}

fn merge<K>(admin: &AdminClient, api: &Api<K>, name: &str, patch: Value) -> Result<u64>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    let object = admin
        .block_on(api.patch(name, &PatchParams::default(), &Patch::Merge(patch)))
        .with_context(|| format!("patching {name}"))?;
    Ok(resource_version(&object))
}

fn nothing(_: &AdminClient, _: u32) -> Written {
    Ok(None)
}

/// A pod added during the measurement: on a remote Node, at a free address of its block.
fn added_pod(size: &Size, i: u32) -> PodPlace {
    let node = i * 7 % size.nodes;
    PodPlace {
        name: format!("added-{i}"),
        namespace: objects::namespace_name(i % size.namespaces),
        node,
        ip: pod_address(node, FREE_SLOTS_FROM + i / size.nodes),
        app: i % 30,
    }
}

fn changes(size: &Size) -> Vec<Change> {
    let size = *size;
    vec![
        Change {
            what: "Pod on a remote Node gets its IP (kubelet's status write)",
            goal: true,
            prepare: Box::new(move |admin, i| {
                let place = added_pod(&size, i);
                let api: Api<Pod> = Api::namespaced(admin.client.clone(), &place.namespace);
                let pod = admin.create(&api, &typed(objects::pod(&place)))?;
                Ok(Some(("Pod", resource_version(&pod))))
            }),
            write: Box::new(move |admin, i| {
                let place = added_pod(&size, i);
                let api: Api<Pod> = Api::namespaced(admin.client.clone(), &place.namespace);
                let pod = admin
                    .block_on(api.patch_status(
                        &place.name,
                        &PatchParams::default(),
                        &Patch::Merge(objects::pod_status(&place)),
                    ))
                    .context("pod status")?;
                Ok(("Pod", resource_version(&pod)))
            }),
        },
        Change {
            what: "Pod labels changed (policies select it)",
            goal: true,
            prepare: Box::new(nothing),
            write: Box::new(move |admin, i| {
                let place = pod_place(&size, i * 13);
                let api: Api<Pod> = Api::namespaced(admin.client.clone(), &place.namespace);
                // Never the app it has: a change every time.
                let app = format!("app-{}", (place.app + 1 + i % 29) % 30);
                let rv = merge(
                    admin,
                    &api,
                    &place.name,
                    json!({"metadata": {"labels": {"app": app}}}),
                )?;
                Ok(("Pod", rv))
            }),
        },
        Change {
            what: "NetworkPolicy added",
            goal: true,
            prepare: Box::new(nothing),
            write: Box::new(move |admin, i| {
                let n = i % size.namespaces;
                let mut policy = objects::network_policy(n, i);
                policy["metadata"]["name"] = json!(format!("added-{i}"));
                let api: Api<NetworkPolicy> =
                    Api::namespaced(admin.client.clone(), &objects::namespace_name(n));
                let policy = admin.create(&api, &typed(policy))?;
                Ok(("NetworkPolicy", resource_version(&policy)))
            }),
        },
        Change {
            what: "NetworkPolicy's port changed",
            goal: true,
            prepare: Box::new(nothing),
            write: Box::new(move |admin, i| {
                let (n, k) = (i % size.namespaces, i % size.policies_per_namespace);
                let mut policy = objects::network_policy(n, k);
                policy["spec"]["ingress"][0]["ports"][0]["port"] = json!(8081 + i);
                let api: Api<NetworkPolicy> =
                    Api::namespaced(admin.client.clone(), &objects::namespace_name(n));
                let rv = merge(
                    admin,
                    &api,
                    &format!("policy-{k}"),
                    json!({"spec": policy["spec"]}),
                )?;
                Ok(("NetworkPolicy", rv))
            }),
        },
        Change {
            what: "Namespace labels changed (namespace peers select it)",
            goal: true,
            prepare: Box::new(nothing),
            write: Box::new(move |admin, i| {
                let api: Api<Namespace> = Api::all(admin.client.clone());
                // Another team than the namespace had each time it comes round.
                let n = i % size.namespaces;
                let team = format!("team-{}", (n + 1 + i / size.namespaces) % 10);
                let rv = merge(
                    admin,
                    &api,
                    &objects::namespace_name(n),
                    json!({"metadata": {"labels": {"team": team}}}),
                )?;
                Ok(("Namespace", rv))
            }),
        },
        Change {
            what: "Service added with its EndpointSlice",
            goal: false,
            prepare: Box::new(move |admin, i| {
                let n = i % size.namespaces;
                let (mut service, _) = objects::service(&size, n, i);
                service["metadata"]["name"] = json!(format!("added-{i}"));
                let api: Api<Service> =
                    Api::namespaced(admin.client.clone(), &objects::namespace_name(n));
                let service = admin.create(&api, &typed(service))?;
                Ok(Some(("Service", resource_version(&service))))
            }),
            write: Box::new(move |admin, i| {
                let n = i % size.namespaces;
                let (_, mut slice) = objects::service(&size, n, i);
                slice["metadata"]["name"] = json!(format!("added-{i}-1"));
                slice["metadata"]["labels"]["kubernetes.io/service-name"] =
                    json!(format!("added-{i}"));
                let api: Api<EndpointSlice> =
                    Api::namespaced(admin.client.clone(), &objects::namespace_name(n));
                let slice = admin.create(&api, &typed(slice))?;
                Ok(("EndpointSlice", resource_version(&slice)))
            }),
        },
        Change {
            what: "EndpointSlice's endpoints changed",
            goal: false,
            prepare: Box::new(nothing),
            write: Box::new(move |admin, i| {
                let n = i % size.namespaces;
                let (_, slice) = objects::service(&size, n, i + 1);
                let api: Api<EndpointSlice> =
                    Api::namespaced(admin.client.clone(), &objects::namespace_name(n));
                let rv = merge(
                    admin,
                    &api,
                    &format!("svc-{i}-1"),
                    json!({"endpoints": slice["endpoints"]}),
                )?;
                Ok(("EndpointSlice", rv))
            }),
        },
        Change {
            what: "Node heartbeat (a remote Node's status)",
            goal: false,
            prepare: Box::new(nothing),
            write: Box::new(move |admin, i| {
                let api: Api<Node> = Api::all(admin.client.clone());
                let now = k8s_openapi::jiff::Timestamp::now().to_string();
                let node = admin
                    .block_on(api.patch_status(
                        &objects::node_name(i % size.nodes),
                        &PatchParams::default(),
                        &Patch::Strategic(json!({"status": {"conditions": [{"type": "Ready", "status": "True",
                            "reason": "KubeletReady", "lastHeartbeatTime": now, "lastTransitionTime": now}]}})),
                    ))
                    .context("node status")?;
                Ok(("Node", resource_version(&node)))
            }),
        },
    ]
}
