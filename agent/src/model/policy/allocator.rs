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

    /// The identity of a pod address, kept until released (not asked for again per compile).
    pub(super) fn hold_identity(&mut self, prefix: CidrKey) -> Option<u32> {
        self.identities.hold(prefix)
    }

    pub(super) fn release_identity(&mut self, prefix: CidrKey) {
        self.identities.release(prefix);
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

/// Stable numbers for one kind of key; the Service compiler's backend sets use it too. A number
/// is either asked for on every compile (`get`, then `sweep` frees what was not asked for) or
/// held until released (`hold`/`release`), so that a sweep costs what was asked for, not every
/// number held.
#[derive(Clone, Debug)]
pub(in crate::model) struct Pool<K> {
    ids: BTreeMap<K, u32>,
    taken: BTreeSet<u32>,
    seen: BTreeSet<K>,
    /// The keys the next sweep frees unless asked for since the last one: those handed out by
    /// `get`, seeded, or released.
    swept: BTreeSet<K>,
    /// Keys held, with how many times.
    held: BTreeMap<K, usize>,
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
            swept: BTreeSet::new(),
            held: BTreeMap::new(),
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
        self.ids.insert(key.clone(), id);
        self.swept.insert(key);
        if id >= self.next {
            self.next = if id + 1 >= self.end {
                self.first
            } else {
                id + 1
            };
        }
    }

    pub(in crate::model) fn get(&mut self, key: K) -> Option<u32> {
        let id = self.number(&key)?;
        self.seen.insert(key.clone());
        self.swept.insert(key);
        Some(id)
    }

    /// A number for `key` that stays until as many `release`s.
    pub(in crate::model) fn hold(&mut self, key: K) -> Option<u32> {
        let id = self.number(&key)?;
        *self.held.entry(key).or_default() += 1;
        Some(id)
    }

    /// The last release leaves the number to the next sweep, which frees it unless asked for
    /// or held again by then.
    pub(in crate::model) fn release(&mut self, key: K) {
        if let Some(count) = self.held.get_mut(&key) {
            *count -= 1;
            if *count == 0 {
                self.held.remove(&key);
                self.swept.insert(key);
            }
        }
    }

    fn number(&mut self, key: &K) -> Option<u32> {
        if let Some(&id) = self.ids.get(key) {
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
                return Some(id);
            }
        }
    }

    pub(in crate::model) fn sweep(&mut self) {
        let seen = std::mem::take(&mut self.seen);
        let (ids, taken, held) = (&mut self.ids, &mut self.taken, &self.held);
        self.swept.retain(|key| {
            if seen.contains(key) {
                return true;
            }
            if !held.contains_key(key) {
                if let Some(id) = ids.remove(key) {
                    taken.remove(&id);
                }
            }
            false
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

    #[test]
    fn a_held_number_outlives_sweeps_until_released() {
        let mut pool: Pool<&str> = Pool::new(1, 10);
        assert_eq!(pool.hold("a"), Some(1));
        assert_eq!(pool.hold("a"), Some(1), "held twice");
        pool.sweep();
        pool.sweep();
        assert_eq!(pool.hold("b"), Some(2));
        pool.release("a");
        pool.sweep();
        assert_eq!(pool.hold("c"), Some(3), "\"a\" is still held once");
        pool.release("a");
        assert_eq!(pool.get("a"), Some(1), "released, not swept yet");
        pool.sweep();
        pool.sweep();
        assert_eq!(pool.get("a"), Some(4), "not asked for in a sweep: freed");
        // Released and held again before a sweep: the same number.
        pool.release("b");
        assert_eq!(pool.hold("b"), Some(2));
        pool.sweep();
        assert_eq!(pool.hold("b"), Some(2));
    }
}
