//! The lab's embedded API server, exercised through kube-rs exactly as the agent uses it.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use futures::{Stream, StreamExt};
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod},
    discovery::v1::EndpointSlice,
};
use kube::{
    api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{reflector, watcher, WatchStreamExt},
    Client, Config, ResourceExt,
};
use serde_json::{json, Value};
use sluice_tests::apiserver::{kubeconfig, ApiServer, ApiState};

fn listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0")
}

fn client(server: &ApiServer) -> Client {
    Client::try_from(server.kube_config()).expect("kube client")
}

fn pod(name: &str, labels: Value, node: Option<&str>) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}]},
    }))
    .expect("pod")
}

fn status(err: kube::Error) -> (u16, String) {
    match err {
        kube::Error::Api(s) => (s.code, s.reason.clone()),
        other => panic!("expected an API error, got {other:?}"),
    }
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn next_event<K, S>(stream: &mut S) -> WatchEvent<K>
where
    S: Stream<Item = kube::Result<WatchEvent<K>>> + Unpin,
{
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("a watch event within 10 s")
        .expect("the watch stream continues")
        .expect("a well-formed watch event")
}

/// The next event that is not a bookmark, as (type, name).
async fn next_change<S>(stream: &mut S) -> (&'static str, String)
where
    S: Stream<Item = kube::Result<WatchEvent<Pod>>> + Unpin,
{
    loop {
        match next_event(stream).await {
            WatchEvent::Added(p) => return ("ADDED", p.name_any()),
            WatchEvent::Modified(p) => return ("MODIFIED", p.name_any()),
            WatchEvent::Deleted(p) => return ("DELETED", p.name_any()),
            WatchEvent::Bookmark(_) => continue,
            WatchEvent::Error(e) => panic!("watch error {e:?}"),
        }
    }
}

/// One HTTP/1.1 request on a fresh connection: (status code, body).
fn raw(addr: &str, method: &str, path: &str, content_type: &str, body: &str) -> (u16, String) {
    let addr = addr.trim_start_matches("http://");
    let mut conn = TcpStream::connect(addr).expect("connect");
    write!(
        conn,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("write request");
    let mut out = String::new();
    conn.read_to_string(&mut out).expect("read response");
    let code = out[9..12].parse().expect("status code");
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string());
    (code, body.unwrap_or_default())
}

#[tokio::test]
async fn pods_crud_and_errors() {
    let server = ApiServer::start(listener());
    let pods: Api<Pod> = Api::namespaced(client(&server), "default");

    let created = pods
        .create(
            &PostParams::default(),
            &pod("a", json!({"app": "web"}), None),
        )
        .await
        .unwrap();
    let meta = &created.metadata;
    assert_eq!(meta.namespace.as_deref(), Some("default"));
    assert!(meta.uid.as_deref().is_some_and(|u| !u.is_empty()));
    assert!(meta.creation_timestamp.is_some());
    assert_eq!(meta.generation, Some(1));
    let rv1: u64 = created.resource_version().unwrap().parse().unwrap();
    assert_eq!(rv1, server.resource_version());

    let err = pods
        .create(&PostParams::default(), &pod("a", json!({}), None))
        .await
        .unwrap_err();
    assert_eq!(status(err), (409, "AlreadyExists".into()));
    assert_eq!(
        status(pods.get("nope").await.unwrap_err()),
        (404, "NotFound".into())
    );

    let mut generated = pod("", json!({}), None);
    generated.metadata.name = None;
    generated.metadata.generate_name = Some("gen-".into());
    let generated = pods
        .create(&PostParams::default(), &generated)
        .await
        .unwrap();
    assert!(generated.name_any().starts_with("gen-") && generated.name_any().len() == 9);
    assert_ne!(generated.metadata.uid, created.metadata.uid);

    // Replace: a stale resourceVersion conflicts, the current one wins and bumps generation.
    let mut changed = created.clone();
    changed.spec.as_mut().unwrap().node_name = Some("n1".into());
    let replaced = pods
        .replace("a", &PostParams::default(), &changed)
        .await
        .unwrap();
    assert_eq!(replaced.metadata.generation, Some(2));
    assert_eq!(replaced.metadata.uid, created.metadata.uid);
    let err = pods
        .replace("a", &PostParams::default(), &changed)
        .await
        .unwrap_err();
    assert_eq!(status(err), (409, "Conflict".into()));

    // Merge patch; a status change through the main resource is ignored.
    let patched = pods
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"labels": {"tier": "front"}}, "status": {"podIP": "1.1.1.1"}}),
            ),
        )
        .await
        .unwrap();
    assert_eq!(patched.labels()["tier"], "front");
    assert_eq!(patched.labels()["app"], "web");
    assert!(patched.status.is_none());

    let patched = pods
        .patch_status(
            "a",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"podIP": "10.0.0.5"}, "metadata": {"labels": {"x": "y"}}}),
            ),
        )
        .await
        .unwrap();
    assert_eq!(
        patched.status.as_ref().unwrap().pod_ip.as_deref(),
        Some("10.0.0.5")
    );
    assert!(!patched.labels().contains_key("x"));
    assert_eq!(patched.metadata.generation, Some(2));
    let got = pods.get_status("a").await.unwrap();
    assert_eq!(got.status.unwrap().pod_ip.as_deref(), Some("10.0.0.5"));

    // A write that changes nothing is no new version.
    let before = server.resource_version();
    pods.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"tier": "front"}}})),
    )
    .await
    .unwrap();
    assert_eq!(server.resource_version(), before);

    // Server-side apply creates, then merges.
    let apply = PatchParams::apply("lab").force();
    let body =
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "b", "labels": {"k": "1"}}});
    let b = pods.patch("b", &apply, &Patch::Apply(&body)).await.unwrap();
    assert_eq!(b.metadata.generation, Some(1));
    let body =
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "b", "labels": {"k": "2"}}});
    let b2 = pods.patch("b", &apply, &Patch::Apply(&body)).await.unwrap();
    assert_eq!(b2.labels()["k"], "2");
    assert_eq!(b2.metadata.uid, b.metadata.uid);
    let err = pods
        .patch("zz", &PatchParams::default(), &Patch::Merge(json!({})))
        .await
        .unwrap_err();
    assert_eq!(status(err), (404, "NotFound".into()));

    let list = pods.list(&ListParams::default()).await.unwrap();
    let mut names: Vec<String> = list.items.iter().map(|p| p.name_any()).collect();
    names.sort();
    assert_eq!(names, ["a", "b", generated.name_any().as_str()]);
    assert_eq!(
        list.metadata.resource_version.unwrap(),
        server.resource_version().to_string()
    );

    let deleted = pods.delete("a", &DeleteParams::default()).await.unwrap();
    assert_eq!(deleted.left().expect("the deleted pod").name_any(), "a");
    assert_eq!(
        status(pods.get("a").await.unwrap_err()),
        (404, "NotFound".into())
    );
    let err = pods
        .delete("a", &DeleteParams::default())
        .await
        .unwrap_err();
    assert_eq!(status(err), (404, "NotFound".into()));

    // Preconditions on delete.
    let dp = DeleteParams {
        preconditions: Some(kube::api::Preconditions {
            resource_version: Some("1".into()),
            uid: None,
        }),
        ..Default::default()
    };
    let err = pods.delete("b", &dp).await.unwrap_err();
    assert_eq!(status(err), (409, "Conflict".into()));
}

#[tokio::test]
async fn nodes_endpointslices_namespaces() {
    let server = ApiServer::start(listener());
    let client = client(&server);
    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": "n1", "namespace": "ignored"},
        "spec": {"podCIDR": "10.244.1.0/24"},
    }))
    .unwrap();
    let n1 = nodes.create(&PostParams::default(), &node).await.unwrap();
    assert_eq!(n1.metadata.namespace, None);
    let n1 = nodes
        .patch_status(
            "n1",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.1"}]}})),
        )
        .await
        .unwrap();
    assert_eq!(
        n1.status.unwrap().addresses.unwrap()[0].address,
        "192.168.0.1"
    );
    let mut n1 = nodes.get("n1").await.unwrap();
    n1.spec.as_mut().unwrap().pod_cidr = Some("10.244.9.0/24".into());
    let n1 = nodes
        .replace("n1", &PostParams::default(), &n1)
        .await
        .unwrap();
    assert_eq!(n1.spec.unwrap().pod_cidr.as_deref(), Some("10.244.9.0/24"));
    assert!(
        n1.status.is_some(),
        "a main-resource replace keeps the status"
    );

    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": "team"}})).unwrap();
    namespaces
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();

    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "team");
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": "svc-abc", "labels": {"kubernetes.io/service-name": "svc"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.244.1.5"]}],
        "ports": [{"port": 80, "protocol": "TCP"}],
    }))
    .unwrap();
    let created = slices.create(&PostParams::default(), &slice).await.unwrap();
    assert_eq!(created.metadata.namespace.as_deref(), Some("team"));
    let patched = slices
        .patch(
            "svc-abc",
            &PatchParams::default(),
            &Patch::Merge(json!({"endpoints": [{"addresses": ["10.244.1.6"]}]})),
        )
        .await
        .unwrap();
    assert_eq!(patched.endpoints.unwrap()[0].addresses, ["10.244.1.6"]);
    let all: Api<EndpointSlice> = Api::all(client.clone());
    let by_service = all
        .list(&ListParams::default().labels("kubernetes.io/service-name=svc"))
        .await
        .unwrap();
    assert_eq!(by_service.items.len(), 1);
    // EndpointSlices have no status subresource.
    let err = slices.get_status("svc-abc").await.unwrap_err();
    assert_eq!(status(err).0, 404);

    // Deleting the namespace deletes what is in it, with DELETED events.
    let pods: Api<Pod> = Api::namespaced(client.clone(), "team");
    pods.create(&PostParams::default(), &pod("p", json!({}), None))
        .await
        .unwrap();
    let all_pods: Api<Pod> = Api::all(client.clone());
    let rv = server.resource_version().to_string();
    let mut events = all_pods
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    namespaces
        .delete("team", &DeleteParams::default())
        .await
        .unwrap();
    assert_eq!(next_change(&mut events).await, ("DELETED", "p".into()));
    assert!(server.list("pods", None).is_empty());
    assert!(server.list("endpointslices", None).is_empty());
    assert_eq!(server.list("nodes", None).len(), 1);
}

#[tokio::test]
async fn selectors_on_list_and_watch() {
    let server = ApiServer::start(listener());
    let pods: Api<Pod> = Api::namespaced(client(&server), "default");
    for (name, labels, node) in [
        ("a", json!({"app": "web", "tier": "front"}), Some("n1")),
        ("b", json!({"app": "db"}), Some("n2")),
        ("c", json!({"app": "web"}), None),
    ] {
        pods.create(&PostParams::default(), &pod(name, labels, node))
            .await
            .unwrap();
    }
    let names = |lp: ListParams| {
        let pods = pods.clone();
        async move {
            let mut names: Vec<String> = pods
                .list(&lp)
                .await
                .unwrap()
                .items
                .iter()
                .map(|p| p.name_any())
                .collect();
            names.sort();
            names.join(",")
        }
    };
    let lp = ListParams::default;
    assert_eq!(names(lp().labels("app=web")).await, "a,c");
    assert_eq!(names(lp().labels("app!=web")).await, "b");
    assert_eq!(names(lp().labels("tier")).await, "a");
    assert_eq!(names(lp().labels("!tier")).await, "b,c");
    assert_eq!(names(lp().labels("app in (db,web),!tier")).await, "b,c");
    assert_eq!(names(lp().labels("app notin (web)")).await, "b");
    assert_eq!(names(lp().fields("spec.nodeName=n1")).await, "a");
    assert_eq!(names(lp().fields("spec.nodeName!=n1")).await, "b,c");
    assert_eq!(names(lp().fields("spec.nodeName=")).await, "c");
    assert_eq!(names(lp().fields("metadata.name==b")).await, "b");
    assert_eq!(
        names(lp().fields("metadata.namespace=default").labels("app=web")).await,
        "a,c"
    );
    let err = pods.list(&lp().labels("app in (web")).await.unwrap_err();
    assert_eq!(status(err), (400, "BadRequest".into()));

    // Watch on a node: initial ADDED, then scheduling a pod there is ADDED, moving it away is
    // DELETED, as kube-apiserver reports selection changes.
    let mut on_n1 = pods
        .watch(&WatchParams::default().fields("spec.nodeName=n1"), "0")
        .await
        .unwrap()
        .boxed();
    let mut web = pods
        .watch(&WatchParams::default().labels("app=web"), "0")
        .await
        .unwrap()
        .boxed();
    assert_eq!(next_change(&mut on_n1).await, ("ADDED", "a".into()));
    assert_eq!(next_change(&mut web).await, ("ADDED", "a".into()));
    assert_eq!(next_change(&mut web).await, ("ADDED", "c".into()));

    server
        .merge_patch(
            "pods",
            Some("default"),
            "c",
            &json!({"spec": {"nodeName": "n1"}}),
        )
        .unwrap();
    assert_eq!(next_change(&mut on_n1).await, ("ADDED", "c".into()));
    assert_eq!(next_change(&mut web).await, ("MODIFIED", "c".into()));
    pods.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"app": "db"}}})),
    )
    .await
    .unwrap();
    match next_event(&mut web).await {
        WatchEvent::Deleted(p) => {
            assert_eq!(p.name_any(), "a");
            assert_eq!(p.labels()["app"], "web", "the last state that matched");
            assert_eq!(
                p.resource_version().unwrap(),
                server.resource_version().to_string()
            );
        }
        other => panic!("expected DELETED, got {other:?}"),
    }
    assert_eq!(next_change(&mut on_n1).await, ("MODIFIED", "a".into()));
    pods.patch(
        "b",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"app": "web"}}})),
    )
    .await
    .unwrap();
    assert_eq!(next_change(&mut web).await, ("ADDED", "b".into()));
    pods.delete("c", &DeleteParams::default()).await.unwrap();
    assert_eq!(next_change(&mut on_n1).await, ("DELETED", "c".into()));
    assert_eq!(next_change(&mut web).await, ("DELETED", "c".into()));
}

#[tokio::test]
async fn watch_replay_timeout_and_expiry() {
    let server = ApiServer::start(listener());
    let pods: Api<Pod> = Api::namespaced(client(&server), "default");
    let start = server.resource_version().to_string();
    pods.create(&PostParams::default(), &pod("a", json!({}), None))
        .await
        .unwrap();
    pods.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"x": "1"}}})),
    )
    .await
    .unwrap();
    pods.delete("a", &DeleteParams::default()).await.unwrap();

    let mut replay = pods
        .watch(&WatchParams::default().timeout(1), &start)
        .await
        .unwrap()
        .boxed();
    assert_eq!(next_change(&mut replay).await, ("ADDED", "a".into()));
    assert_eq!(next_change(&mut replay).await, ("MODIFIED", "a".into()));
    assert_eq!(next_change(&mut replay).await, ("DELETED", "a".into()));
    // timeoutSeconds=1 ends the stream cleanly.
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(e) = replay.next().await {
            assert!(matches!(e, Ok(WatchEvent::Bookmark(_))), "{e:?}");
        }
    })
    .await;
    assert!(end.is_ok(), "the watch outlived its timeoutSeconds");

    server.compact();
    let mut expired = pods
        .watch(&WatchParams::default(), &start)
        .await
        .unwrap()
        .boxed();
    match next_event(&mut expired).await {
        WatchEvent::Error(e) => {
            assert_eq!((e.code, e.reason.as_str()), (410, "Expired"));
            assert!(e
                .message
                .starts_with(&format!("too old resource version: {start} (")));
        }
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }
    assert!(expired.next().await.is_none(), "the stream ends after 410");
    // A version handed out before compaction is too old too; a fresh list's is not.
    let before = (server.resource_version() - 1).to_string();
    let mut expired = pods
        .watch(&WatchParams::default(), &before)
        .await
        .unwrap()
        .boxed();
    assert!(matches!(next_event(&mut expired).await, WatchEvent::Error(e) if e.code == 410));
    let rv = pods
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version;
    let mut fresh = pods
        .watch(&WatchParams::default(), &rv.unwrap())
        .await
        .unwrap()
        .boxed();
    server
        .create(serde_json::to_value(pod("b", json!({}), None)).unwrap())
        .unwrap();
    assert_eq!(next_change(&mut fresh).await, ("ADDED", "b".into()));
}

#[tokio::test]
async fn bookmarks() {
    let server = ApiServer::start_with(listener(), ApiState::default(), Duration::from_millis(100));
    let pods: Api<Pod> = Api::namespaced(client(&server), "default");
    server
        .create(serde_json::to_value(pod("a", json!({}), None)).unwrap())
        .unwrap();
    let rv = server.resource_version().to_string();
    let mut stream = pods
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    match next_event(&mut stream).await {
        WatchEvent::Bookmark(b) => {
            assert_eq!(b.metadata.resource_version, rv);
            assert_eq!(
                (b.types.kind.as_str(), b.types.api_version.as_str()),
                ("Pod", "v1")
            );
        }
        other => panic!("expected a bookmark, got {other:?}"),
    }

    // Without allowWatchBookmarks none arrive.
    let mut quiet = pods
        .watch(&WatchParams::default().disable_bookmarks().timeout(1), &rv)
        .await
        .unwrap()
        .boxed();
    let got = tokio::time::timeout(Duration::from_secs(5), quiet.next()).await;
    assert!(matches!(got, Ok(None)), "expected a clean end, got {got:?}");

    // Streaming lists: the initial state ends with the initial-events-end bookmark.
    let mut initial = pods
        .watch(&WatchParams::default().initial_events(), "0")
        .await
        .unwrap()
        .boxed();
    assert!(matches!(next_event(&mut initial).await, WatchEvent::Added(p) if p.name_any() == "a"));
    match next_event(&mut initial).await {
        WatchEvent::Bookmark(b) => {
            assert_eq!(b.metadata.annotations["k8s.io/initial-events-end"], "true")
        }
        other => panic!("expected the initial-events-end bookmark, got {other:?}"),
    }
}

/// A reflector over all pods plus a count of the relists its watcher did.
struct Mirror {
    reader: reflector::Store<Pod>,
    inits: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Mirror {
    fn start(client: Client, config: watcher::Config) -> Mirror {
        let (reader, writer) = reflector::store::<Pod>();
        let inits = Arc::new(AtomicUsize::new(0));
        let counter = inits.clone();
        let stream = watcher(Api::<Pod>::all(client), config)
            .default_backoff()
            .inspect(move |e| {
                if let Ok(watcher::Event::Init) = e {
                    counter.fetch_add(1, Ordering::SeqCst);
                }
            });
        let task = tokio::spawn(reflector(writer, stream).for_each(|_| async {}));
        Mirror {
            reader,
            inits,
            task,
        }
    }

    fn state(&self) -> BTreeMap<String, String> {
        self.reader
            .state()
            .iter()
            .map(|p| (p.name_any(), p.resource_version().unwrap_or_default()))
            .collect()
    }

    fn inits(&self) -> usize {
        self.inits.load(Ordering::SeqCst)
    }

    /// Waits until the mirror holds exactly the server's pods at the server's versions.
    async fn converge(&self, server: &ApiServer) {
        let truth = || -> BTreeMap<String, String> {
            server
                .list("pods", None)
                .iter()
                .map(|p| {
                    (
                        p["metadata"]["name"].as_str().unwrap().to_string(),
                        p["metadata"]["resourceVersion"]
                            .as_str()
                            .unwrap()
                            .to_string(),
                    )
                })
                .collect()
        };
        wait_for("the reflector to converge", || self.state() == truth()).await;
    }
}

impl Drop for Mirror {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Creates, updates and deletes a few pods through the in-process API.
fn churn(server: &ApiServer, round: usize) {
    for i in 0..5 {
        let name = format!("r{round}-{i}");
        server
            .create(
                serde_json::to_value(pod(&name, json!({"round": round.to_string()}), None))
                    .unwrap(),
            )
            .unwrap();
    }
    server
        .merge_patch(
            "pods",
            Some("default"),
            &format!("r{round}-0"),
            &json!({"metadata": {"labels": {"x": "y"}}}),
        )
        .unwrap();
    server
        .delete("pods", Some("default"), &format!("r{round}-1"))
        .unwrap();
    if round > 0 {
        server
            .delete("pods", Some("default"), &format!("r{}-2", round - 1))
            .unwrap();
        server
            .merge_patch_status(
                "pods",
                Some("default"),
                &format!("r{}-3", round - 1),
                &json!({"status": {"phase": "Running"}}),
            )
            .unwrap();
    }
}

#[tokio::test]
async fn reflector_survives_drops_compaction_and_restart() {
    let listener = listener();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let server = ApiServer::start(listener);
    let mirror = Mirror::start(client(&server), watcher::Config::default());

    churn(&server, 0);
    mirror.converge(&server).await;
    churn(&server, 1);
    mirror.converge(&server).await;
    assert_eq!(mirror.inits(), 1);

    // Dropped watches resume from their resourceVersion: no relist, nothing lost.
    server.drop_watches();
    churn(&server, 2);
    mirror.converge(&server).await;
    server.drop_watches();
    mirror.converge(&server).await;
    churn(&server, 3);
    mirror.converge(&server).await;
    assert_eq!(
        mirror.inits(),
        1,
        "a dropped watch resumes without a relist"
    );

    // After compaction a resumed watch gets 410 and the watcher relists.
    server.compact();
    server.drop_watches();
    churn(&server, 4);
    wait_for("a relist after 410", || mirror.inits() == 2).await;
    mirror.converge(&server).await;

    // A restart on the same address: state and resourceVersions carry over.
    let state = server.stop();
    let rv = state.resource_version();
    let listener = TcpListener::bind(addr).expect("rebind the API server's address");
    let server = ApiServer::start_with_state(listener, state);
    assert_eq!(server.resource_version(), rv);
    churn(&server, 5);
    mirror.converge(&server).await;
    assert!(mirror.state().len() > 10);
    assert_eq!(mirror.inits(), 2, "the history survives a restart");
}

#[tokio::test]
async fn streaming_list_reflector() {
    let server = ApiServer::start(listener());
    churn(&server, 0);
    let mirror = Mirror::start(
        client(&server),
        watcher::Config::default().streaming_lists(),
    );
    mirror.converge(&server).await;
    churn(&server, 1);
    mirror.converge(&server).await;
}

#[tokio::test]
async fn kubeconfig_version_and_bad_input() {
    let server = ApiServer::start(listener());
    let url = server.url();
    let kc = Kubeconfig::from_yaml(&kubeconfig(&url)).unwrap();
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap();
    assert_eq!(config.default_namespace, "default");
    let client = Client::try_from(config).unwrap();
    let version = client.apiserver_version().await.unwrap();
    assert_eq!(version.major, "1");

    let req =
        |method: &'static str, path: &'static str, ctype: &'static str, body: &'static str| {
            let url = url.clone();
            async move {
                tokio::task::spawn_blocking(move || raw(&url, method, path, ctype, body))
                    .await
                    .unwrap()
            }
        };
    assert_eq!(
        req("GET", "/healthz", "text/plain", "").await,
        (200, "ok".into())
    );
    let json = "application/json";
    let cases = [
        (
            "POST",
            "/api/v1/namespaces/default/pods",
            json,
            "{not json",
            400,
            "BadRequest",
            "not valid JSON",
        ),
        (
            "POST",
            "/api/v1/namespaces/default/pods",
            json,
            "[1]",
            400,
            "BadRequest",
            "JSON object",
        ),
        (
            "POST",
            "/api/v1/namespaces/default/pods",
            json,
            "{\"metadata\": 3}",
            400,
            "BadRequest",
            "metadata",
        ),
        (
            "POST",
            "/api/v1/namespaces/default/pods",
            json,
            "{\"metadata\": {}}",
            422,
            "Invalid",
            "name",
        ),
        (
            "POST",
            "/api/v1/namespaces/default/pods",
            json,
            "{\"kind\": \"Node\", \"metadata\": {\"name\": \"x\"}}",
            400,
            "BadRequest",
            "kind",
        ),
        (
            "POST",
            "/api/v1/pods",
            json,
            "{}",
            405,
            "MethodNotAllowed",
            "method",
        ),
        (
            "GET",
            "/api/v1/namespaces/default/widgets",
            json,
            "",
            404,
            "NotFound",
            "could not find",
        ),
        (
            "GET",
            "/api/v1/pods/x",
            json,
            "",
            404,
            "NotFound",
            "could not find",
        ),
        (
            "GET",
            "/nothing",
            json,
            "",
            404,
            "NotFound",
            "could not find",
        ),
        (
            "GET",
            "/api/v1/pods?labelSelector=a%20in%20(b",
            json,
            "",
            400,
            "BadRequest",
            "parenthes",
        ),
        (
            "GET",
            "/api/v1/pods?watch=1&resourceVersion=abc",
            json,
            "",
            400,
            "BadRequest",
            "resourceVersion",
        ),
        (
            "GET",
            "/api/v1/pods?fieldSelector=spec.nodeName",
            json,
            "",
            400,
            "BadRequest",
            "field selector",
        ),
        (
            "DELETE",
            "/api/v1/nodes/none",
            json,
            "",
            404,
            "NotFound",
            "nodes \"none\" not found",
        ),
    ];
    for (method, path, ctype, body, code, reason, message) in cases {
        let (got, text) = req(method, path, ctype, body).await;
        let status: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}: {text}"));
        assert_eq!(got, code, "{method} {path} {body}: {text}");
        assert_eq!(status["kind"], "Status");
        assert_eq!(status["status"], "Failure");
        assert_eq!(status["code"], code);
        assert_eq!(status["reason"], reason, "{method} {path} {body}");
        assert!(
            status["message"].as_str().unwrap().contains(message),
            "{text}"
        );
    }

    // A resourceVersion from the future (a client of an earlier lab) makes the client relist.
    let (code, text) = req(
        "GET",
        "/api/v1/pods?watch=1&resourceVersion=999999&timeoutSeconds=18446744073709551615",
        json,
        "",
    )
    .await;
    assert_eq!(code, 200);
    assert!(text.contains("\"type\":\"ERROR\""), "{text}");
    assert!(
        text.contains("too large resource version: 999999"),
        "{text}"
    );

    let node = r#"{"apiVersion":"v1","kind":"Node","metadata":{"name":"n1","labels":{"a":"b"}}}"#;
    assert_eq!(req("POST", "/api/v1/nodes", json, node).await.0, 201);
    let (code, text) = req("PATCH", "/api/v1/nodes/n1", "text/plain", "{}").await;
    assert_eq!((code, text.contains("UnsupportedMediaType")), (415, true));
    let (code, _) = req(
        "PATCH",
        "/api/v1/nodes/n1",
        "application/merge-patch+json",
        "{bad",
    )
    .await;
    assert_eq!(code, 400);
    let (code, text) = req(
        "PUT",
        "/api/v1/nodes/n1",
        json,
        r#"{"metadata":{"name":"n2"}}"#,
    )
    .await;
    assert_eq!(
        (code, text.contains("does not match the name")),
        (400, true)
    );
    let ops = r#"[{"op":"add","path":"/metadata/labels/c","value":"d"},{"op":"remove","path":"/metadata/labels/a"}]"#;
    let (code, text) = req(
        "PATCH",
        "/api/v1/nodes/n1",
        "application/json-patch+json",
        ops,
    )
    .await;
    assert_eq!(code, 200, "{text}");
    let n1: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(n1["metadata"]["labels"], json!({"c": "d"}));
    let ops = r#"[{"op":"test","path":"/metadata/labels/c","value":"x"}]"#;
    let (code, _) = req(
        "PATCH",
        "/api/v1/nodes/n1",
        "application/json-patch+json",
        ops,
    )
    .await;
    assert_eq!(code, 422);
    let (code, text) = req("GET", "/api/v1/nodes", json, "").await;
    let list: Value = serde_json::from_str(&text).unwrap();
    assert_eq!((code, list["kind"].as_str()), (200, Some("NodeList")));
    assert_eq!(list["items"][0]["kind"], "Node");
    assert_eq!(list["items"][0]["apiVersion"], "v1");
    let (code, text) = req(
        "GET",
        "/apis/crd.antrea.io/v1beta1/externalippools",
        json,
        "",
    )
    .await;
    assert_eq!(code, 200);
    assert!(text.contains("\"ExternalIPPoolList\""));
}

#[tokio::test]
async fn drop_watches_aborts_connections() {
    let server = ApiServer::start(listener());
    let pods: Api<Pod> = Api::namespaced(client(&server), "default");
    let mut stream = pods
        .watch(&WatchParams::default(), "0")
        .await
        .unwrap()
        .boxed();

    // On the wire: the chunked body stops without its final empty chunk.
    let url = server.url();
    let raw_watch = tokio::task::spawn_blocking(move || {
        let addr = url.trim_start_matches("http://");
        let mut conn = TcpStream::connect(addr).unwrap();
        write!(
            conn,
            "GET /api/v1/pods?watch=true HTTP/1.1\r\nHost: {addr}\r\n\r\n"
        )
        .unwrap();
        let mut out = Vec::new();
        conn.read_to_end(&mut out).unwrap();
        String::from_utf8_lossy(&out).into_owned()
    });
    server
        .create(serde_json::to_value(pod("a", json!({}), None)).unwrap())
        .unwrap();
    assert_eq!(next_change(&mut stream).await, ("ADDED", "a".into()));
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.drop_watches();
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(e) = stream.next().await {
            assert!(!matches!(e, Ok(WatchEvent::Error(_))), "{e:?}");
        }
    })
    .await;
    assert!(end.is_ok(), "the watch survived drop_watches");
    let wire = tokio::time::timeout(Duration::from_secs(5), raw_watch)
        .await
        .expect("the raw connection closes")
        .unwrap();
    assert!(wire.starts_with("HTTP/1.1 200"), "{wire}");
    assert!(
        wire.contains("Transfer-Encoding: chunked") || wire.contains("transfer-encoding: chunked"),
        "{wire}"
    );
    assert!(wire.contains("\"ADDED\""), "{wire}");
    assert!(!wire.ends_with("0\r\n\r\n"), "ended cleanly: {wire}");

    // New watches are unaffected.
    let mut again = pods
        .watch(&WatchParams::default(), "0")
        .await
        .unwrap()
        .boxed();
    assert_eq!(next_change(&mut again).await, ("ADDED", "a".into()));
}

#[tokio::test]
async fn history_is_bounded() {
    let server = ApiServer::start(listener());
    let pods: Api<Pod> = Api::namespaced(client(&server), "default");
    let start = server.resource_version();
    for i in 0..=sluice_tests::apiserver::HISTORY_LIMIT {
        server
            .create(serde_json::to_value(pod(&format!("p{i}"), json!({}), None)).unwrap())
            .unwrap();
    }
    let mut old = pods
        .watch(&WatchParams::default(), &start.to_string())
        .await
        .unwrap()
        .boxed();
    match next_event(&mut old).await {
        WatchEvent::Error(e) => assert_eq!(
            e.message,
            format!("too old resource version: {start} ({})", start + 1)
        ),
        other => panic!("expected 410, got {other:?}"),
    }
    let mut recent = pods
        .watch(&WatchParams::default(), &(start + 1).to_string())
        .await
        .unwrap()
        .boxed();
    assert_eq!(next_change(&mut recent).await, ("ADDED", "p1".into()));
}
