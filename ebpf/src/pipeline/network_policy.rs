//! EgressRule / EgressDefaultRule and IngressRule / IngressDefaultRule: a new connection of an
//! isolated pod is allowed by the first hit (the peer's identity, then any peer; for each: its
//! port, any port of its protocol, any protocol — hashed — then a port range — LPM) or dropped.
//! At most eight lookups, whatever the number of policies and rules.

use aya_ebpf::maps::lpm_trie::Key;
use sluice_common::{
    identity, DropReason, IpKey, PolicyEvent, PolicyKey, Stage, DIRECTION_EGRESS,
    DIRECTION_INGRESS, IP_KEY_PREFIX_BITS, POLICY_ANY_PORT, POLICY_KEY_EXACT_BITS, PROTO_ANY,
    VERDICT_ALLOW, VERDICT_DROP,
};

use super::classifier::IpMeta;
use crate::{IPCACHE, POLICY, POLICY_EVENTS, POLICY_EXACT};

/// The identity of the longest prefix of at most `bits` address bits holding `addr`.
#[inline(always)]
fn identity_within(addr: &IpKey, bits: u32) -> u32 {
    let key = Key::new(IP_KEY_PREFIX_BITS + bits, *addr);
    IPCACHE.get(&key).map_or(identity::WORLD, |id| id.id)
}

#[inline(always)]
fn peer_identity(addr: &IpKey) -> u32 {
    identity_within(addr, 128)
}

/// Whether `addr` is one of this node's own addresses.
#[inline(always)]
pub fn is_host(addr: &IpKey) -> bool {
    peer_identity(addr) == identity::HOST
}

#[inline(always)]
fn lookup(policy: u32, peer: u32, meta: &IpMeta) -> Option<u32> {
    let port = meta.dst_port.to_be_bytes();
    for peer in [peer, identity::ANY] {
        let one_port = PolicyKey {
            policy,
            peer,
            proto: meta.proto,
            _pad: 0,
            port,
        };
        let any_port = PolicyKey {
            policy,
            peer,
            proto: meta.proto,
            _pad: POLICY_ANY_PORT,
            port: [0; 2],
        };
        let any_proto = PolicyKey {
            policy,
            peer,
            proto: PROTO_ANY,
            _pad: 0,
            port: [0; 2],
        };
        for key in [one_port, any_port, any_proto] {
            // SAFETY: the value is copied out right away.
            if let Some(rule) = POLICY_EXACT.get_ptr(key) {
                return Some(unsafe { (*rule).rule });
            }
        }
        if let Some(rule) = POLICY.get(&Key::new(POLICY_KEY_EXACT_BITS + 16, one_port)) {
            return Some(rule.rule);
        }
    }
    None
}

/// Written straight into the ring (no copy on the small BPF stack).
#[inline(always)]
fn event(meta: &IpMeta, direction: u8, rule: Option<u32>) {
    // A full ring drops the event, never the packet.
    let Some(mut entry) = POLICY_EVENTS.reserve::<PolicyEvent>(0) else {
        return;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points at reserved ring memory of the event's size; every field is set.
    unsafe {
        (*event).src = meta.src;
        (*event).dst = meta.dst;
        (*event).src_port = meta.src_port;
        (*event).dst_port = meta.dst_port;
        (*event).proto = meta.proto;
        (*event).direction = direction;
        (*event).verdict = if rule.is_some() {
            VERDICT_ALLOW
        } else {
            VERDICT_DROP
        };
        (*event)._pad = 0;
        (*event).rule = rule.unwrap_or(0);
        (*event)._pad2 = [0; 12];
    }
    entry.submit(0);
}

/// The egress rule allowing a new connection out of a pod under `policy`.
#[inline(always)]
pub fn egress(policy: u32, meta: &IpMeta) -> Result<u32, DropReason> {
    let rule = lookup(policy, peer_identity(&meta.dst), meta);
    event(meta, DIRECTION_EGRESS, rule);
    match rule {
        Some(rule) => {
            super::passed(Stage::EgressRule);
            Ok(rule)
        }
        None => Err(DropReason::EgressDenied),
    }
}

/// The ingress rule allowing a new connection from `src` into a pod under `policy`. The node
/// itself is always let in (kubelet probes), as in Antrea. `snat`: `src` is this node's gateway
/// address standing in for an outside client; it is judged by the prefixes around it, as every
/// other node (where no /32 names it) judges it, so an outside client never passes for the node.
#[inline(always)]
pub fn ingress(policy: u32, meta: &IpMeta, src: &IpKey, snat: bool) -> Result<u32, DropReason> {
    // IPv4 keys are 4 address bytes: a /31 at most skips the address's own /32 entry.
    let peer = if snat {
        identity_within(src, 31)
    } else {
        peer_identity(src)
    };
    if peer == identity::HOST {
        super::passed(Stage::IngressRule);
        return Ok(0);
    }
    let rule = lookup(policy, peer, meta);
    event(meta, DIRECTION_INGRESS, rule);
    match rule {
        Some(rule) => {
            super::passed(Stage::IngressRule);
            Ok(rule)
        }
        None => Err(DropReason::IngressDenied),
    }
}
