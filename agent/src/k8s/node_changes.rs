//! Which Node events matter to the Service tables and the policy. A kubelet rewrites its Node's
//! status on every heartbeat; of a Node the Service compiler and ServiceExternalIP read only the
//! name, labels, pod CIDRs, addresses and whether it is Ready, the policy compiler only the
//! node's own addresses. An event that changes none of them is still a change of the store (the
//! round runs, and reports it programmed) but recompiles neither.

use std::{
    collections::{hash_map::DefaultHasher, BTreeMap, HashMap},
    hash::{Hash, Hasher},
};

use k8s_openapi::api::core::v1::Node;
use kube::runtime::watcher;

/// What of a Node the Service tables depend on, hashed.
pub fn digest(node: &Node) -> u64 {
    let mut h = DefaultHasher::new();
    node.metadata.name.hash(&mut h);
    node.metadata.uid.hash(&mut h);
    node.metadata
        .labels
        .as_ref()
        .map(|l| l.iter().collect::<BTreeMap<_, _>>())
        .hash(&mut h);
    if let Some(spec) = &node.spec {
        spec.pod_cidr.hash(&mut h);
        spec.pod_cidrs.hash(&mut h);
    }
    if let Some(status) = &node.status {
        for address in status.addresses.iter().flatten() {
            (&address.type_, &address.address).hash(&mut h);
        }
        let ready = status
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == "Ready")
            .map(|c| &c.status);
        ready.hash(&mut h);
    }
    h.finish()
}

/// The digests of the Nodes seen, to tell a relevant event from a heartbeat.
#[derive(Default)]
pub struct NodeChanges {
    seen: HashMap<String, u64>,
}

impl NodeChanges {
    /// Whether `event` changes what the Service tables depend on.
    pub fn relevant(&mut self, event: &watcher::Event<Node>) -> bool {
        let key = |node: &Node| node.metadata.name.clone().unwrap_or_default();
        match event {
            watcher::Event::Apply(node) | watcher::Event::InitApply(node) => {
                let digest = digest(node);
                self.seen.insert(key(node), digest) != Some(digest)
            }
            watcher::Event::Delete(node) => {
                self.seen.remove(&key(node));
                true
            }
            // A relist may hide deletions: everything counts as changed.
            watcher::Event::Init | watcher::Event::InitDone => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(address: &str, ready: &str, heartbeat: &str) -> Node {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n1", "resourceVersion": heartbeat, "labels": {"zone": "a"}},
            "spec": {"podCIDR": "10.244.1.0/24"},
            "status": {
                "addresses": [{"type": "InternalIP", "address": address}],
                "conditions": [{"type": "Ready", "status": ready,
                    "lastHeartbeatTime": format!("2026-12-02T10:00:{heartbeat}Z")}],
                "allocatable": {"cpu": heartbeat},
            },
        }))
        .unwrap()
    }

    #[test]
    fn heartbeats_are_not_relevant_addresses_and_readiness_are() {
        let mut changes = NodeChanges::default();
        let apply = |n| watcher::Event::Apply(n);
        assert!(changes.relevant(&apply(node("192.168.77.2", "True", "10"))));
        assert!(
            !changes.relevant(&apply(node("192.168.77.2", "True", "20"))),
            "a heartbeat"
        );
        assert!(changes.relevant(&apply(node("192.168.77.9", "True", "30"))));
        assert!(changes.relevant(&apply(node("192.168.77.9", "False", "40"))));
        let mut labelled = node("192.168.77.9", "False", "50");
        labelled
            .metadata
            .labels
            .as_mut()
            .unwrap()
            .insert("zone".into(), "b".into());
        assert!(changes.relevant(&apply(labelled)));
        assert!(changes.relevant(&watcher::Event::Delete(node("192.168.77.9", "False", "60"))));
        assert!(changes.relevant(&watcher::Event::InitDone));
    }
}
