//! The cluster's pods as policy sees them, kept between compiles and brought up to date pod by
//! pod: a pod event costs that pod (its addresses, their identities), not a walk over the
//! cluster's 30,000. Each pod address holds its identity for as long as a pod has it.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
};

use sluice_common::Identity;

use super::{cluster::endpoint_ips, prefix::Prefix, Allocator};
use crate::{
    k8s::Pod,
    model::{CidrKey, LocalEndpoint},
};

/// A Pod by namespace and name.
pub type PodKey = (String, String);

pub(super) struct IndexedPod {
    pub pod: Arc<Pod>,
    /// Empty: not a peer and not selectable (host network, finished, no address yet).
    pub ips: Vec<IpAddr>,
    pub local: bool,
}

#[derive(Default)]
pub struct PodIndex {
    pub(super) pods: BTreeMap<PodKey, IndexedPod>,
    /// How many pods have each pod address (two may, briefly).
    holders: BTreeMap<Prefix, usize>,
    /// Their identities, as IPCACHE holds them (a compile copies this rather than sorting
    /// 30,000 entries again). An address is missing only when the pool has no number left.
    pub(super) ipcache: BTreeMap<CidrKey, Identity>,
    /// The addresses this node's CNI gave its pods, by Pod, at the last update.
    wired: BTreeMap<PodKey, Vec<IpAddr>>,
}

impl PodIndex {
    /// Brings the index to the pods in `changed` (`None`: deleted) and to the pod interfaces
    /// this node wired (`endpoints`: a local pod's addresses are known from its CNI ADD, before
    /// the kubelet reports them).
    pub fn update(
        &mut self,
        changed: impl IntoIterator<Item = (PodKey, Option<Arc<Pod>>)>,
        endpoints: &[LocalEndpoint],
        node: &str,
        alloc: &mut Allocator,
    ) {
        let mut wired: BTreeMap<PodKey, Vec<IpAddr>> = BTreeMap::new();
        for ep in endpoints {
            if let Some(pod) = &ep.pod {
                wired
                    .entry((pod.namespace.clone(), pod.name.clone()))
                    .or_default()
                    .extend(ep.ips.iter().map(|n| n.ip()));
            }
        }
        let rewired: BTreeSet<PodKey> = wired
            .iter()
            .filter(|(key, ips)| self.wired.get(*key) != Some(ips))
            .chain(
                self.wired
                    .iter()
                    .filter(|(key, _)| !wired.contains_key(*key)),
            )
            .map(|(key, _)| key.clone())
            .collect();
        self.wired = wired;
        let mut refreshed = BTreeSet::new();
        let mut touched = BTreeSet::new();
        for (key, pod) in changed {
            self.refresh(&key, pod, node, &mut touched);
            refreshed.insert(key);
        }
        for key in rewired.difference(&refreshed) {
            if let Some(pod) = self.pods.get(key).map(|p| p.pod.clone()) {
                self.refresh(key, Some(pod), node, &mut touched);
            }
        }
        self.number(touched, alloc);
    }

    /// Gives the addresses in `touched` that pods now have an identity, in address order (so
    /// the numbers of a batch do not depend on the order of its pods), and gives back those of
    /// the addresses no pod has any more.
    fn number(&mut self, touched: BTreeSet<Prefix>, alloc: &mut Allocator) {
        for prefix in touched {
            let held = self.holders.contains_key(&prefix);
            let numbered = self.ipcache.contains_key(&prefix.cidr_key());
            if held && !numbered {
                if let Some(id) = alloc.hold_identity(prefix.cidr_key()) {
                    self.ipcache.insert(prefix.cidr_key(), Identity { id });
                }
            } else if !held && numbered {
                self.ipcache.remove(&prefix.cidr_key());
                alloc.release_identity(prefix.cidr_key());
            }
        }
    }

    /// Every pod gone: the identities they held go back.
    pub fn clear(&mut self, alloc: &mut Allocator) {
        let keys: Vec<PodKey> = self.pods.keys().cloned().collect();
        let mut touched = BTreeSet::new();
        for key in keys {
            // Gone: which node it was on does not matter.
            self.refresh(&key, None, "", &mut touched);
        }
        self.number(touched, alloc);
    }

    pub fn keys(&self) -> impl Iterator<Item = &PodKey> {
        self.pods.keys()
    }

    pub(super) fn identity(&self, prefix: &Prefix) -> Option<u32> {
        self.ipcache.get(&prefix.cidr_key()).map(|i| i.id)
    }

    pub(super) fn identities_in(
        &self,
        range: std::ops::RangeInclusive<Prefix>,
    ) -> impl Iterator<Item = (&Prefix, u32)> {
        self.holders
            .range(range)
            .filter_map(|(prefix, _)| Some((prefix, self.identity(prefix)?)))
    }

    /// Brings one pod's record to `pod`; the addresses it gained or lost go to `touched`.
    fn refresh(
        &mut self,
        key: &PodKey,
        pod: Option<Arc<Pod>>,
        node: &str,
        touched: &mut BTreeSet<Prefix>,
    ) {
        let old = match pod {
            Some(pod) => {
                let local = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node);
                let wired = if local {
                    self.wired.get(key).map_or(&[][..], Vec::as_slice)
                } else {
                    &[]
                };
                let ips = endpoint_ips(&pod, wired);
                self.pods
                    .insert(key.clone(), IndexedPod { pod, ips, local })
            }
            None => self.pods.remove(key),
        };
        let old_ips = old.map(|p| p.ips).unwrap_or_default();
        let new_ips = self.pods.get(key).map_or(&[][..], |p| p.ips.as_slice());
        for ip in new_ips.iter().filter(|ip| !old_ips.contains(ip)) {
            let prefix = Prefix::host(*ip);
            *self.holders.entry(prefix).or_default() += 1;
            touched.insert(prefix);
        }
        for ip in old_ips.iter().filter(|ip| !new_ips.contains(ip)) {
            let prefix = Prefix::host(*ip);
            if let Some(count) = self.holders.get_mut(&prefix) {
                *count -= 1;
                if *count == 0 {
                    self.holders.remove(&prefix);
                }
            }
            touched.insert(prefix);
        }
    }
}
