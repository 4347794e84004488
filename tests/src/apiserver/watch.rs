//! Watch streams: one JSON event per line. A watcher keeps its own position in the global
//! history and reads everything after it whenever a write happens, so replaying from a
//! resourceVersion and following live changes are the same code, and nothing is lost or sent
//! twice however writes and wake-ups interleave.

use std::{collections::VecDeque, io, sync::Arc, time::Duration};

use axum::body::Body;
use serde_json::{json, Value};
use tokio::{
    sync::watch,
    time::{Instant, Interval},
};

use super::{
    resources::{ApiError, RESOURCES},
    selector::Filter,
    store::{Event, EventType},
    Shared,
};

/// kube-apiserver ends watches after 30-60 minutes when the client does not ask for less.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(45 * 60);

pub(crate) struct WatchRequest {
    pub res: usize,
    pub filter: Filter,
    pub resource_version: Option<u64>,
    pub timeout: Option<Duration>,
    pub bookmarks: bool,
    pub send_initial_events: bool,
}

struct Watch {
    shared: Arc<Shared>,
    res: usize,
    filter: Filter,
    /// Every event up to this resourceVersion has been considered.
    pos: u64,
    pending: VecDeque<String>,
    done: bool,
    written: watch::Receiver<u64>,
    drops: watch::Receiver<u64>,
    deadline: Instant,
    bookmarks: Option<Interval>,
}

pub(crate) fn stream(shared: Arc<Shared>, req: WatchRequest) -> Body {
    // Subscribe before reading the state, so that a write in between still wakes the watcher.
    let written = shared.written.subscribe();
    let drops = shared.drops.subscribe();
    let period = shared.bookmark_interval;
    let timeout = req.timeout.unwrap_or(DEFAULT_TIMEOUT);
    let mut w = Watch {
        shared,
        res: req.res,
        filter: req.filter,
        pos: 0,
        pending: VecDeque::new(),
        done: false,
        written,
        drops,
        deadline: Instant::now()
            .checked_add(timeout)
            .unwrap_or_else(|| Instant::now() + DEFAULT_TIMEOUT),
        bookmarks: req
            .bookmarks
            .then(|| tokio::time::interval_at(Instant::now() + period, period)),
    };
    match req.resource_version {
        Some(rv) if rv > 0 && !req.send_initial_events => {
            match w.shared.read(|s| s.check_resumable(rv)) {
                Ok(()) => {
                    w.pos = rv;
                    w.catch_up();
                }
                Err(e) => w.fail(e),
            }
        }
        _ => {
            let (objects, rv) = w
                .shared
                .read(|s| (s.list(w.res, &w.filter), s.resource_version()));
            for obj in objects {
                w.push("ADDED", &obj);
            }
            w.pos = rv;
            if req.send_initial_events && req.bookmarks {
                w.push_bookmark(true);
            }
        }
    }
    tracing::debug!(
        "watch {} from {}",
        RESOURCES[w.res].plural,
        req.resource_version.unwrap_or(0)
    );
    Body::from_stream(futures::stream::unfold(w, next))
}

async fn next(mut w: Watch) -> Option<(Result<String, io::Error>, Watch)> {
    loop {
        if let Some(line) = w.pending.pop_front() {
            return Some((Ok(line), w));
        }
        if w.done {
            return None;
        }
        tokio::select! {
            _ = w.drops.changed() => {
                w.done = true;
                // An error makes hyper abort the connection without the final chunk.
                return Some((Err(io::Error::other("watch dropped by the lab")), w));
            }
            _ = tokio::time::sleep_until(w.deadline) => return None,
            changed = w.written.changed() => {
                if changed.is_err() {
                    return None;
                }
                w.catch_up();
            }
            _ = tick(&mut w.bookmarks) => w.push_bookmark(false),
        }
    }
}

async fn tick(interval: &mut Option<Interval>) {
    match interval {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

impl Watch {
    fn push(&mut self, kind: &str, obj: &Value) {
        self.pending
            .push_back(format!("{{\"type\":\"{kind}\",\"object\":{obj}}}\n"));
    }

    /// Sends a 410 (or other) ERROR event and ends the stream.
    fn fail(&mut self, e: ApiError) {
        let status = e.to_status();
        self.push("ERROR", &status);
        self.done = true;
    }

    fn push_bookmark(&mut self, initial_events_end: bool) {
        let r = &RESOURCES[self.res];
        let mut meta = json!({ "resourceVersion": self.pos.to_string() });
        if initial_events_end {
            meta["annotations"] = json!({ "k8s.io/initial-events-end": "true" });
        }
        let obj = json!({ "kind": r.kind, "apiVersion": r.api_version(), "metadata": meta });
        self.push("BOOKMARK", &obj);
    }

    fn catch_up(&mut self) {
        let pos = self.pos;
        let events = self.shared.read(|s| {
            s.events_after(pos)
                .ok_or_else(|| ApiError::expired(pos, s.oldest_resumable()))
        });
        match events {
            Ok(events) => events.iter().for_each(|e| self.convert(e)),
            Err(e) => self.fail(e),
        }
    }

    /// As kube-apiserver does for a selective watch, an update that moves an object into the
    /// selection is ADDED and one that moves it out is DELETED (its previous state, at the new
    /// resourceVersion).
    fn convert(&mut self, e: &Event) {
        self.pos = e.rv;
        if e.res != self.res {
            return;
        }
        let now = self.filter.matches(&e.object);
        match e.kind {
            EventType::Added if now => self.push("ADDED", &e.object),
            EventType::Deleted if now => self.push("DELETED", &e.object),
            EventType::Modified => {
                let prev = e.prev.as_ref().filter(|p| self.filter.matches(p));
                match (prev, now) {
                    (Some(_), true) => self.push("MODIFIED", &e.object),
                    (None, true) => self.push("ADDED", &e.object),
                    (Some(prev), false) => {
                        let mut gone = (**prev).clone();
                        gone["metadata"]["resourceVersion"] = Value::String(e.rv.to_string());
                        self.push("DELETED", &gone);
                    }
                    (None, false) => {}
                }
            }
            _ => {}
        }
    }
}
