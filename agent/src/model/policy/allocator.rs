//! Stable numbers for identities, policy ids and rule ids across compiles.
//!
//! The agent recompiles on every change and writes only the difference, and RULE_STATS counts
//! per rule id: a number must keep naming the same thing for as long as that thing exists. A
//! freed number is handed out again only after the counter has gone round the whole range, so a
//! stale counter or a map entry still being replaced is unlikely to be read under a new meaning.

use std::collections::{BTreeMap, BTreeSet};

use sluice_common::{identity, IpKey, MAX_RULES};

use super::{Direction, PolicyTables};
use crate::model::CidrKey;

/// Owned by the caller and passed to every `compile`; a thing absent from the latest compile
/// loses its number.
#[derive(Clone, Debug)]
pub struct Allocator {
    identities: Pool<CidrKey>,
    policies: Pool<(IpKey, Direction)>,
    rules: Pool<(String, Direction, usize)>,
}

impl Default for Allocator {
    fn default() -> Allocator {
        Allocator::new()
    }
}

impl Allocator {
    pub fn new() -> Allocator {
        Allocator {
            identities: Pool::new(identity::FIRST_ALLOCATED, u32::MAX),
            policies: Pool::new(1, u32::MAX),
            rules: Pool::new(1, MAX_RULES),
        }
    }

    /// An allocator holding the numbers the kernel's maps hold (what a previous agent left):
    /// a restarted agent gives every prefix the identity and every pod the policy id it had, so
    /// no address is ever matched against rules written for another prefix's number. Numbers
    /// the next compile does not ask for go back as usual.
    pub fn seeded(kernel: &PolicyTables) -> Allocator {
        let mut alloc = Allocator::new();
        for (prefix, identity) in &kernel.ipcache {
            alloc.identities.seed(*prefix, identity.id);
        }
        for (&pod_ip, ep) in &kernel.endpoint_policy {
            for (direction, id) in [
                (Direction::Ingress, ep.ingress_policy),
                (Direction::Egress, ep.egress_policy),
            ] {
                alloc.policies.seed((pod_ip, direction), id);
            }
        }
        alloc
    }

    pub(super) fn identity(&mut self, prefix: CidrKey) -> Option<u32> {
        self.identities.get(prefix)
    }

    pub(super) fn policy(&mut self, pod_ip: IpKey, direction: Direction) -> Option<u32> {
        self.policies.get((pod_ip, direction))
    }

    pub(super) fn rule(&mut self, policy: &str, direction: Direction, index: usize) -> Option<u32> {
        self.rules.get((policy.to_string(), direction, index))
    }

    /// Ends a compile: whatever was not asked for since the previous sweep gives its number back.
    pub(super) fn sweep(&mut self) {
        self.identities.sweep();
        self.policies.sweep();
        self.rules.sweep();
    }
}

/// Stable numbers for one kind of key; the Service compiler's backend sets use it too.
#[derive(Clone, Debug)]
pub(in crate::model) struct Pool<K> {
    ids: BTreeMap<K, u32>,
    taken: BTreeSet<u32>,
    seen: BTreeSet<K>,
    /// Where the search for a free number starts: just past the last one handed out.
    next: u32,
    first: u32,
    /// Exclusive.
    end: u32,
}

impl<K: Ord + Clone> Pool<K> {
    pub(in crate::model) fn new(first: u32, end: u32) -> Pool<K> {
        Pool {
            ids: BTreeMap::new(),
            taken: BTreeSet::new(),
            seen: BTreeSet::new(),
            next: first,
            first,
            end,
        }
    }

    /// Holds `id` for `key` as found in the kernel. Numbers outside the pool (fixed identities,
    /// 0, `POLICY_PENDING`) or held already are left alone.
    fn seed(&mut self, key: K, id: u32) {
        if !(self.first..self.end).contains(&id)
            || self.taken.contains(&id)
            || self.ids.contains_key(&key)
        {
            return;
        }
        self.taken.insert(id);
        self.ids.insert(key, id);
        if id >= self.next {
            self.next = if id + 1 >= self.end {
                self.first
            } else {
                id + 1
            };
        }
    }

    pub(in crate::model) fn get(&mut self, key: K) -> Option<u32> {
        if let Some(&id) = self.ids.get(&key) {
            self.seen.insert(key);
            return Some(id);
        }
        if self.taken.len() as u64 >= u64::from(self.end - self.first) {
            return None;
        }
        loop {
            let id = self.next;
            self.next = if id + 1 >= self.end {
                self.first
            } else {
                id + 1
            };
            if self.taken.insert(id) {
                self.ids.insert(key.clone(), id);
                self.seen.insert(key);
                return Some(id);
            }
        }
    }

    pub(in crate::model) fn sweep(&mut self) {
        let seen = std::mem::take(&mut self.seen);
        let taken = &mut self.taken;
        self.ids.retain(|key, id| {
            let keep = seen.contains(key);
            if !keep {
                taken.remove(id);
            }
            keep
        });
    }
}

#[cfg(test)]
mod tests {
    use super::Pool;

    #[test]
    fn numbers_are_kept_while_used_and_reused_only_after_a_full_round() {
        let mut pool: Pool<&str> = Pool::new(1, 4);
        assert_eq!((pool.get("a"), pool.get("b")), (Some(1), Some(2)));
        pool.sweep();
        // "a" is gone: its number waits while the unused ones go first.
        assert_eq!((pool.get("b"), pool.get("c")), (Some(2), Some(3)));
        pool.sweep();
        assert_eq!(
            (pool.get("b"), pool.get("c"), pool.get("d")),
            (Some(2), Some(3), Some(1))
        );
        assert_eq!(pool.get("e"), None, "full");
        pool.sweep();
        assert_eq!(pool.get("d"), Some(1));
    }
}
