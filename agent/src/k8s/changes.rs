//! Which Pods changed since the policy compiler last looked: the keys of the watch's events, so
//! a round costs the pods that changed rather than a walk over the store.

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
};

use kube::runtime::watcher;

use super::Pod;
use crate::model::policy::{pod_key, PodKey};

#[derive(Clone, Default)]
pub struct PodChanges(Arc<Mutex<Changed>>);

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changed {
    pub keys: BTreeSet<PodKey>,
    /// The watch listed again (it restarted, or its resourceVersion expired): pods deleted
    /// meanwhile came as no event, so every pod must be looked at.
    pub all: bool,
}

impl PodChanges {
    pub(super) fn record(&self, event: &watcher::Event<Pod>) {
        let mut changed = self.0.lock().expect("pod changes lock");
        match event {
            watcher::Event::Apply(pod)
            | watcher::Event::Delete(pod)
            | watcher::Event::InitApply(pod) => {
                changed.keys.insert(pod_key(pod));
            }
            watcher::Event::Init => changed.all = true,
            watcher::Event::InitDone => {}
        }
    }

    /// What changed since the last take; read before the store, so a change after it is in
    /// the next take (and looked at twice at worst, never missed).
    pub fn take(&self) -> Changed {
        std::mem::take(&mut *self.0.lock().expect("pod changes lock"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str) -> Pod {
        serde_json::from_value(serde_json::json!({"metadata": {"namespace": "ns", "name": name}}))
            .unwrap()
    }

    #[test]
    fn events_name_their_pods_and_a_relist_names_all() {
        let changes = PodChanges::default();
        changes.record(&watcher::Event::Apply(pod("a")));
        changes.record(&watcher::Event::Delete(pod("b")));
        let taken = changes.take();
        let keys: Vec<_> = taken.keys.iter().map(|(_, n)| n.as_str()).collect();
        assert_eq!((keys, taken.all), (vec!["a", "b"], false));
        assert_eq!(changes.take(), Changed::default(), "taken");
        changes.record(&watcher::Event::Init);
        changes.record(&watcher::Event::InitApply(pod("c")));
        changes.record(&watcher::Event::InitDone);
        assert!(changes.take().all);
    }
}
