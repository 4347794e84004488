//! Objects, the global resourceVersion, the bounded event history and the one write path that
//! every change (HTTP or in-process) goes through, so watchers see every change exactly once.

use std::{
    collections::{BTreeMap, VecDeque},
    fmt,
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use serde_json::{json, Map, Value};

use super::{
    allocator::ServiceRanges,
    resources::{check_type, ApiError, NAMESPACES, RESOURCES, SERVICES},
    selector::Filter,
    services,
};

/// How many events a watch can resume across before it must relist (kube-apiserver's watch cache
/// is of the same order).
pub const HISTORY_LIMIT: usize = 10_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum EventType {
    Added,
    Modified,
    Deleted,
}

#[derive(Clone)]
pub(crate) struct Event {
    pub rv: u64,
    pub res: usize,
    pub kind: EventType,
    pub object: Arc<Value>,
    /// The state before a modification: a watcher with a selector needs it to turn an update
    /// that leaves (enters) its selection into DELETED (ADDED).
    pub prev: Option<Arc<Value>>,
}

/// Which part of an object an update may change.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Part {
    Main,
    Status,
}

type Key = (String, String);

/// Everything the API server stores: objects, the resourceVersion counter and the event history
/// (kept across [`super::ApiServer::stop`], as etcd keeps it across an API server restart).
pub struct ApiState {
    rv: u64,
    objects: Vec<BTreeMap<Key, Arc<Value>>>,
    history: VecDeque<Event>,
    /// Every event after this resourceVersion is in `history`.
    complete_after: u64,
    /// A watch asking to resume from an older resourceVersion gets 410 Expired.
    oldest_resumable: u64,
    uid_seed: u64,
    next_uid: u64,
    /// Kept with the objects, so a restarted server allocates from the same ranges.
    service_ranges: ServiceRanges,
}

impl Default for ApiState {
    fn default() -> ApiState {
        ApiState::with_service_ranges(ServiceRanges::default())
    }
}

impl ApiState {
    /// An empty state whose Services get their cluster IPs and node ports from `ranges`
    /// (kube-apiserver's `--service-cluster-ip-range` and `--service-node-port-range`); start a
    /// server on it with [`super::ApiServer::start_with_state`].
    pub fn with_service_ranges(service_ranges: ServiceRanges) -> ApiState {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        ApiState {
            // Not 0: a resourceVersion of "0" means "any version" to clients.
            rv: 1,
            objects: RESOURCES.iter().map(|_| BTreeMap::new()).collect(),
            history: VecDeque::new(),
            complete_after: 1,
            oldest_resumable: 1,
            uid_seed: (now.as_nanos() as u64) ^ u64::from(std::process::id()),
            next_uid: 0,
            service_ranges,
        }
    }
}

impl fmt::Debug for ApiState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiState")
            .field("resource_version", &self.rv)
            .field(
                "objects",
                &self.objects.iter().map(BTreeMap::len).sum::<usize>(),
            )
            .field("history", &self.history.len())
            .finish()
    }
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> Option<&'a str> {
    v.pointer(pointer).and_then(Value::as_str)
}

/// Restores fields only the server may set, from `from`, or removes them when `from` lacks them.
fn copy_field(meta: &mut Map<String, Value>, from: &Value, field: &str) {
    match from.get("metadata").and_then(|m| m.get(field)) {
        Some(v) => meta.insert(field.into(), v.clone()),
        None => meta.remove(field),
    };
}

fn without_meta_and_status(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("metadata");
        m.remove("status");
    }
    v
}

impl ApiState {
    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    /// Every stored object of `res` but the one at `key`.
    fn others<'a>(&'a self, res: usize, key: &'a Key) -> impl Iterator<Item = &'a Value> {
        self.objects[res]
            .iter()
            .filter(move |(k, _)| *k != key)
            .map(|(_, o)| o.as_ref())
    }

    fn key(&self, res: usize, ns: Option<&str>, name: &str) -> Key {
        let ns = if RESOURCES[res].namespaced { ns } else { None };
        (ns.unwrap_or_default().to_string(), name.to_string())
    }

    pub(crate) fn get(&self, res: usize, ns: Option<&str>, name: &str) -> Option<Arc<Value>> {
        self.objects[res].get(&self.key(res, ns, name)).cloned()
    }

    pub(crate) fn list(&self, res: usize, filter: &Filter) -> Vec<Arc<Value>> {
        self.objects[res]
            .values()
            .filter(|o| filter.matches(o))
            .cloned()
            .collect()
    }

    /// Events after `pos`, or `None` when some of them were forgotten.
    pub(crate) fn events_after(&self, pos: u64) -> Option<Vec<Event>> {
        if pos < self.complete_after {
            return None;
        }
        let start = self.history.partition_point(|e| e.rv <= pos);
        Some(self.history.range(start..).cloned().collect())
    }

    pub(crate) fn check_resumable(&self, rv: u64) -> Result<(), ApiError> {
        if rv < self.oldest_resumable {
            return Err(ApiError::expired(rv, self.oldest_resumable));
        }
        // kube-apiserver would stall such a watch; a lab that restarted with a fresh state is
        // better served by making its clients relist.
        if rv > self.rv {
            return Err(ApiError::new(
                410,
                "Expired",
                format!("too large resource version: {rv}, current: {}", self.rv),
            ));
        }
        Ok(())
    }

    pub(crate) fn oldest_resumable(&self) -> u64 {
        self.oldest_resumable
    }

    /// Forgets the history. The resourceVersion moves on by one without an event, so that every
    /// version handed out so far is too old to resume from while a relist yields a resumable one.
    pub(crate) fn compact(&mut self) {
        self.history.clear();
        self.complete_after = self.rv;
        self.rv += 1;
        self.oldest_resumable = self.rv;
    }

    fn commit(
        &mut self,
        res: usize,
        key: Key,
        mut obj: Value,
        kind: EventType,
        prev: Option<Arc<Value>>,
        dry_run: bool,
    ) -> Arc<Value> {
        if dry_run {
            return Arc::new(obj);
        }
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = Value::String(self.rv.to_string());
        let obj = Arc::new(obj);
        if kind == EventType::Deleted {
            self.objects[res].remove(&key);
        } else {
            self.objects[res].insert(key, obj.clone());
        }
        self.history.push_back(Event {
            rv: self.rv,
            res,
            kind,
            object: obj.clone(),
            prev,
        });
        while self.history.len() > HISTORY_LIMIT {
            if let Some(e) = self.history.pop_front() {
                self.complete_after = self.complete_after.max(e.rv);
                self.oldest_resumable = self.oldest_resumable.max(e.rv);
            }
        }
        obj
    }

    fn uid(&mut self) -> String {
        self.next_uid += 1;
        let n = self.next_uid;
        let seed = self.uid_seed;
        format!(
            "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
            (seed >> 32) as u32,
            (seed >> 16) as u16,
            seed & 0xfff,
            (n >> 48) & 0xfff,
            n & 0xffff_ffff_ffff
        )
    }

    fn generated_name(&mut self, res: usize, ns: Option<&str>, prefix: &str) -> String {
        const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
        loop {
            // A cheap mixing of the uid counter: names need to be unique, not unpredictable.
            self.next_uid += 1;
            let mut x = self.next_uid.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ self.uid_seed;
            let mut name = prefix.to_string();
            for _ in 0..5 {
                name.push(ALPHABET[(x % ALPHABET.len() as u64) as usize] as char);
                x /= ALPHABET.len() as u64;
            }
            if self.get(res, ns, &name).is_none() {
                return name;
            }
        }
    }

    /// `ns` is the namespace of the request path (`None` for the in-process API and cluster-scoped
    /// kinds); the object's own `metadata.namespace` must agree with it.
    pub(crate) fn create(
        &mut self,
        res: usize,
        ns: Option<&str>,
        mut obj: Value,
        dry_run: bool,
    ) -> Result<Arc<Value>, ApiError> {
        let r = &RESOURCES[res];
        check_type(r, &obj)?;
        let Some(map) = obj.as_object_mut() else {
            return Err(ApiError::bad_request("the object must be a JSON object"));
        };
        map.insert("apiVersion".into(), Value::String(r.api_version()));
        map.insert("kind".into(), Value::String(r.kind.into()));
        let meta = map.entry("metadata").or_insert_with(|| json!({}));
        let Some(meta) = meta.as_object_mut() else {
            return Err(ApiError::bad_request("metadata must be an object"));
        };
        let namespace = if r.namespaced {
            let own = meta.get("namespace").and_then(Value::as_str);
            if let (Some(own), Some(path)) = (own, ns) {
                if !own.is_empty() && own != path {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ));
                }
            }
            let namespace = ns
                .or(own.filter(|s| !s.is_empty()))
                .unwrap_or("default")
                .to_string();
            meta.insert("namespace".into(), Value::String(namespace.clone()));
            Some(namespace)
        } else {
            meta.remove("namespace");
            None
        };
        let name = match meta.get("name").and_then(Value::as_str) {
            Some(name) if !name.is_empty() => name.to_string(),
            _ => match meta.get("generateName").and_then(Value::as_str) {
                Some(prefix) if !prefix.is_empty() => {
                    let prefix = prefix.to_string();
                    let name = self.generated_name(res, namespace.as_deref(), &prefix);
                    obj["metadata"]["name"] = Value::String(name.clone());
                    name
                }
                _ => {
                    return Err(ApiError::invalid(format!(
                        "{} is invalid: metadata.name: Required value: name or generateName is required",
                        r.kind
                    )))
                }
            },
        };
        let key = self.key(res, namespace.as_deref(), &name);
        if self.objects[res].contains_key(&key) {
            return Err(ApiError::new(
                409,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", r.qualified()),
            ));
        }
        // After the existence check (kube-apiserver allocates first): re-creating a Service that
        // requests its own cluster IP must get 409 AlreadyExists, which callers turn into a replace.
        if res == SERVICES {
            services::admit(&self.service_ranges, &mut obj, None, self.others(res, &key))?;
        }
        let uid = self.uid();
        let meta = &mut obj["metadata"];
        meta["uid"] = Value::String(uid);
        meta["creationTimestamp"] = Value::String(rfc3339_now());
        meta["generation"] = json!(1);
        if let Some(m) = meta.as_object_mut() {
            m.remove("resourceVersion");
            m.remove("deletionTimestamp");
        }
        Ok(self.commit(res, key, obj, EventType::Added, None, dry_run))
    }

    /// Replaces the stored object by what `make` returns from it. Fields only the server sets are
    /// kept; a `metadata.resourceVersion` in the result must be the stored one (optimistic
    /// concurrency, which is also how patches carrying a resourceVersion behave).
    pub(crate) fn update(
        &mut self,
        res: usize,
        ns: Option<&str>,
        name: &str,
        part: Part,
        dry_run: bool,
        make: impl FnOnce(&Value) -> Result<Value, ApiError>,
    ) -> Result<Arc<Value>, ApiError> {
        let r = &RESOURCES[res];
        let key = self.key(res, ns, name);
        let Some(old) = self.objects[res].get(&key).cloned() else {
            return Err(ApiError::not_found(r, name));
        };
        let mut new = make(&old)?;
        check_type(r, &new)?;
        if !new.is_object() {
            return Err(ApiError::bad_request("the object must be a JSON object"));
        }
        let stored_rv = str_at(&old, "/metadata/resourceVersion").unwrap_or_default();
        match str_at(&new, "/metadata/resourceVersion") {
            Some(rv) if !rv.is_empty() && rv != stored_rv => {
                return Err(ApiError::conflict(
                    r,
                    name,
                    "the object has been modified; please apply your changes to the latest version and try again",
                ))
            }
            _ => {}
        }
        if part == Part::Status {
            let status = new.get("status").cloned();
            new = (*old).clone();
            match status {
                Some(s) => new["status"] = s,
                None => {
                    if let Some(m) = new.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
        } else if r.status {
            match old.get("status") {
                Some(s) => new["status"] = s.clone(),
                None => {
                    if let Some(m) = new.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
        }
        new["apiVersion"] = Value::String(r.api_version());
        new["kind"] = Value::String(r.kind.into());
        let meta = new
            .as_object_mut()
            .map(|m| m.entry("metadata").or_insert_with(|| json!({})));
        let Some(meta) = meta.and_then(Value::as_object_mut) else {
            return Err(ApiError::bad_request("metadata must be an object"));
        };
        for field in [
            "name",
            "namespace",
            "uid",
            "creationTimestamp",
            "generation",
            "resourceVersion",
        ] {
            copy_field(meta, &old, field);
        }
        if res == SERVICES && part == Part::Main {
            let others = self.others(res, &key);
            services::admit(&self.service_ranges, &mut new, Some(&old), others)?;
        }
        if part == Part::Main && without_meta_and_status(&old) != without_meta_and_status(&new) {
            let generation = old.pointer("/metadata/generation").and_then(Value::as_i64);
            new["metadata"]["generation"] = json!(generation.unwrap_or(0) + 1);
        }
        // As kube-apiserver does: a write that changes nothing is no event and no new version.
        if new == *old {
            return Ok(old);
        }
        Ok(self.commit(res, key, new, EventType::Modified, Some(old), dry_run))
    }

    /// Deleting a Namespace deletes the namespaced objects in it first.
    pub(crate) fn delete(
        &mut self,
        res: usize,
        ns: Option<&str>,
        name: &str,
        options: &Value,
        dry_run: bool,
    ) -> Result<Arc<Value>, ApiError> {
        let r = &RESOURCES[res];
        let key = self.key(res, ns, name);
        let Some(old) = self.objects[res].get(&key).cloned() else {
            return Err(ApiError::not_found(r, name));
        };
        for (field, what) in [("uid", "UID"), ("resourceVersion", "ResourceVersion")] {
            let pointer = format!("/preconditions/{field}");
            let Some(want) = str_at(options, &pointer) else {
                continue;
            };
            let have = str_at(&old, &format!("/metadata/{field}")).unwrap_or_default();
            if want != have {
                return Err(ApiError::conflict(
                    r,
                    name,
                    &format!(
                        "Precondition failed: {what} in precondition: {want}, {what} in object meta: {have}"
                    ),
                ));
            }
        }
        if res == NAMESPACES && !dry_run {
            for inner in (0..RESOURCES.len()).filter(|&i| RESOURCES[i].namespaced) {
                let keys: Vec<Key> = self.objects[inner]
                    .keys()
                    .filter(|(n, _)| n == name)
                    .cloned()
                    .collect();
                for k in keys {
                    if let Some(o) = self.objects[inner].get(&k).cloned() {
                        self.commit(inner, k, (*o).clone(), EventType::Deleted, Some(o), false);
                    }
                }
            }
        }
        let obj = (*old).clone();
        Ok(self.commit(res, key, obj, EventType::Deleted, Some(old), dry_run))
    }
}

/// `metav1.Time` format, whole seconds, UTC.
fn rfc3339_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Days since 1970-01-01 to a civil date (proleptic Gregorian), by 400-year eras.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}
