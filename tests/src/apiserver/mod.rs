//! An in-process Kubernetes API server for the lab: the list/watch protocol of kube-apiserver
//! over plain HTTP with JSON, for the resources Sluice watches, so that kube-rs clients (typed
//! `Api<K>`, watchers, reflectors) run against it unchanged. No auth, no TLS, no discovery.
//!
//! Served: core `v1` nodes, namespaces, pods, services; `discovery.k8s.io/v1` endpointslices;
//! `networking.k8s.io/v1` networkpolicies; `crd.antrea.io/v1beta1` externalippools. Objects are
//! kept as JSON with any fields; Services get kube-apiserver's defaults, cluster IPs and node
//! ports (see [`ServiceRanges`]). For robustness tests it can drop every watch, forget its event
//! history, and stop and restart with its state (see [`ApiServer::drop_watches`],
//! [`ApiServer::compact`], [`ApiServer::stop`]).

mod allocator;
mod http;
mod patch;
mod resources;
mod selector;
mod services;
mod store;
mod watch;

use std::{
    future::IntoFuture,
    net::{SocketAddr, TcpListener},
    sync::{Arc, Mutex, MutexGuard},
    thread::JoinHandle,
    time::Duration,
};

use serde_json::Value;

pub use allocator::{ServiceRanges, NODE_PORT_RANGE, SERVICE_CIDR};
pub use resources::ApiError;
use resources::RESOURCES;
use store::Part;
pub use store::{ApiState, HISTORY_LIMIT};

/// How often a watch that allows bookmarks gets one.
pub const BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);

/// What the server's tasks share with the in-process API.
pub(crate) struct Shared {
    state: Mutex<ApiState>,
    /// The resourceVersion after the latest write: watchers wake on it and read the history.
    written: tokio::sync::watch::Sender<u64>,
    /// Bumped by [`ApiServer::drop_watches`].
    drops: tokio::sync::watch::Sender<u64>,
    bookmark_interval: Duration,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, ApiState> {
        // A panic elsewhere cannot leave the state half-written (writes are single inserts), so
        // a poisoned lock is still good to use.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn read<T>(&self, f: impl FnOnce(&ApiState) -> T) -> T {
        f(&self.lock())
    }

    /// Every change goes through here, so that watchers are woken for it.
    pub(crate) fn write<T>(&self, f: impl FnOnce(&mut ApiState) -> T) -> T {
        let mut state = self.lock();
        let before = state.resource_version();
        let out = f(&mut state);
        let after = state.resource_version();
        drop(state);
        if after != before {
            self.written.send_replace(after);
        }
        out
    }
}

/// A running API server. Dropping it stops it (as [`ApiServer::stop`] without keeping the state).
pub struct ApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// Serves on an already-bound listener (the lab binds it inside a network namespace). Runs on
    /// its own thread with its own tokio runtime, so it is usable from sync code and from inside
    /// other runtimes. Panics if the listener is unusable (a lab setup error). Services get cluster
    /// IPs from [`SERVICE_CIDR`]; [`ApiState::with_service_ranges`] serves other ranges.
    pub fn start(listener: TcpListener) -> ApiServer {
        ApiServer::start_with_state(listener, ApiState::default())
    }

    /// Serves `state` (from [`ApiServer::stop`]): resourceVersions and history continue.
    pub fn start_with_state(listener: TcpListener, state: ApiState) -> ApiServer {
        ApiServer::start_with(listener, state, BOOKMARK_INTERVAL)
    }

    /// As [`ApiServer::start_with_state`], with another interval between watch bookmarks.
    pub fn start_with(
        listener: TcpListener,
        state: ApiState,
        bookmark_interval: Duration,
    ) -> ApiServer {
        let addr = listener.local_addr().expect("API server listener address");
        listener
            .set_nonblocking(true)
            .expect("API server listener non-blocking");
        let rv = state.resource_version();
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            written: tokio::sync::watch::Sender::new(rv),
            drops: tokio::sync::watch::Sender::new(0),
            // A zero period would make tokio's interval panic.
            bookmark_interval: bookmark_interval.max(Duration::from_millis(1)),
        });
        let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
        let app = http::router(shared.clone());
        let thread = std::thread::Builder::new()
            .name("sluice-apiserver".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("API server runtime");
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener)
                        .expect("API server listener into tokio");
                    tokio::select! {
                        res = axum::serve(listener, app).into_future() => {
                            if let Err(e) = res {
                                tracing::warn!("API server on {addr} failed: {e}");
                            }
                        }
                        _ = stopped => {}
                    }
                });
                // Dropping the runtime drops every connection task: clients see the connections
                // close, as when kube-apiserver goes away.
                drop(rt);
            })
            .expect("API server thread");
        ApiServer {
            addr,
            shared,
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }

    /// `http://ip:port`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kube-rs configuration for this server (namespace `default`).
    pub fn kube_config(&self) -> kube::Config {
        kube::Config::new(self.url().parse().expect("the server URL is a valid URI"))
    }

    /// The current (latest) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.read(ApiState::resource_version)
    }

    /// Ends every open watch stream abruptly: the connection closes with no ERROR event.
    pub fn drop_watches(&self) {
        self.shared.drops.send_modify(|n| *n += 1);
    }

    /// Forgets the event history: a watch resuming from any resourceVersion handed out so far
    /// gets 410 Expired and its client must relist. Open watches are not affected.
    pub fn compact(&self) {
        self.shared.write(ApiState::compact);
    }

    /// Stops serving (the listener and every connection close) and returns the stored state for
    /// [`ApiServer::start_with_state`].
    pub fn stop(mut self) -> ApiState {
        self.shutdown();
        std::mem::take(&mut *self.shared.lock())
    }

    fn shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }

    /// Creates an object, taking the resource from its `apiVersion` and `kind` and, for namespaced
    /// kinds, the namespace from `metadata.namespace` (default `default`). Lab controllers use
    /// this and the methods below: they share the write path, so watchers see their changes.
    pub fn create(&self, obj: Value) -> Result<Value, ApiError> {
        let res = resource_of(&obj)?;
        let ns = namespace_of(&obj);
        self.shared
            .write(|s| s.create(res, ns.as_deref(), obj, false))
            .map(|o| (*o).clone())
    }

    /// `resource` is the plural name: `pods`, `nodes`, `endpointslices`, ... Panics for a resource
    /// the server does not serve (a bug in the caller). `namespace` is ignored for cluster-scoped
    /// kinds.
    pub fn get(&self, resource: &str, namespace: Option<&str>, name: &str) -> Option<Value> {
        let res = plural(resource);
        self.shared
            .read(|s| s.get(res, namespace, name))
            .map(|o| (*o).clone())
    }

    /// Every object of `resource`, in one namespace or (`None`) in all.
    pub fn list(&self, resource: &str, namespace: Option<&str>) -> Vec<Value> {
        let res = plural(resource);
        let filter = selector::Filter::new(namespace, None, None).unwrap_or_default();
        self.shared
            .read(|s| s.list(res, &filter))
            .into_iter()
            .map(|o| (*o).clone())
            .collect()
    }

    /// Replaces an object (a PUT). A set `metadata.resourceVersion` must be the stored one.
    /// For kinds with a status subresource, `.status` is kept as stored.
    pub fn replace(&self, obj: Value) -> Result<Value, ApiError> {
        self.replace_part(obj, Part::Main)
    }

    /// Replaces only `.status` (a PUT on `/status`).
    pub fn replace_status(&self, obj: Value) -> Result<Value, ApiError> {
        self.replace_part(obj, Part::Status)
    }

    fn replace_part(&self, obj: Value, part: Part) -> Result<Value, ApiError> {
        let res = resource_of(&obj)?;
        let ns = namespace_of(&obj);
        let name = obj
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::invalid("metadata.name is required"))?
            .to_string();
        let ns = ns.unwrap_or_else(|| "default".into());
        self.shared
            .write(|s| s.update(res, Some(&ns), &name, part, false, |_| Ok(obj)))
            .map(|o| (*o).clone())
    }

    /// Applies a JSON merge patch (RFC 7386) to an object.
    pub fn merge_patch(
        &self,
        resource: &str,
        namespace: Option<&str>,
        name: &str,
        patch: &Value,
    ) -> Result<Value, ApiError> {
        self.patch_part(resource, namespace, name, patch, Part::Main)
    }

    /// Applies a JSON merge patch to an object's `.status` only.
    pub fn merge_patch_status(
        &self,
        resource: &str,
        namespace: Option<&str>,
        name: &str,
        patch: &Value,
    ) -> Result<Value, ApiError> {
        self.patch_part(resource, namespace, name, patch, Part::Status)
    }

    fn patch_part(
        &self,
        resource: &str,
        namespace: Option<&str>,
        name: &str,
        patch: &Value,
        part: Part,
    ) -> Result<Value, ApiError> {
        let res = plural(resource);
        self.shared
            .write(|s| {
                s.update(res, namespace, name, part, false, |old| {
                    let mut new = old.clone();
                    patch::merge(&mut new, patch);
                    Ok(new)
                })
            })
            .map(|o| (*o).clone())
    }

    /// Deletes an object and returns its last state; a Namespace takes its objects with it.
    pub fn delete(
        &self,
        resource: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Value, ApiError> {
        let res = plural(resource);
        self.shared
            .write(|s| s.delete(res, namespace, name, &Value::Null, false))
            .map(|o| (*o).clone())
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn plural(resource: &str) -> usize {
    resources::by_plural(resource).unwrap_or_else(|| {
        let known: Vec<&str> = RESOURCES.iter().map(|r| r.plural).collect();
        panic!("the lab API server does not serve {resource:?}; it serves {known:?}")
    })
}

fn resource_of(obj: &Value) -> Result<usize, ApiError> {
    let field = |f: &str| obj.get(f).and_then(Value::as_str).unwrap_or_default();
    resources::by_kind(field("apiVersion"), field("kind")).ok_or_else(|| {
        ApiError::bad_request(format!(
            "no served resource for apiVersion {:?} kind {:?}",
            field("apiVersion"),
            field("kind")
        ))
    })
}

fn namespace_of(obj: &Value) -> Option<String> {
    obj.pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// A kubeconfig (YAML) for `url` without credentials, for `kube::config::Kubeconfig` or a file
/// handed to a process (`KUBECONFIG`).
pub fn kubeconfig(url: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: sluice-lab
  cluster:
    server: {url}
users:
- name: sluice-lab
  user: {{}}
contexts:
- name: sluice-lab
  context:
    cluster: sluice-lab
    user: sluice-lab
    namespace: default
current-context: sluice-lab
preferences: {{}}
"
    )
}
