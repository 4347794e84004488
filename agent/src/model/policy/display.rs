//! `sluicectl`'s view of the policy tables: stage by stage, identities with their prefixes, ports
//! and ranges in numbers, each entry with the rule that made it.

use std::{collections::BTreeMap, fmt, net::IpAddr};

use sluice_common::{identity, POLICY_KEY_EXACT_BITS, PROTO_ANY};

use super::{ports::protocol_name, Direction, PolicyLpmKey, PolicyTables};
use crate::model::key_ip;

impl fmt::Display for PolicyTables {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut cache: Vec<(String, (Option<IpAddr>, u32), u32)> = self
            .ipcache
            .iter()
            .map(|(key, id)| {
                let text = key.cidr().map_or("?".into(), |c| c.to_string());
                (text, (key_ip(&key.addr), key.prefix_len), id.id)
            })
            .collect();
        cache.sort_by_key(|(_, order, _)| *order);
        let mut names: BTreeMap<u32, String> = BTreeMap::new();
        for (text, _, id) in &cache {
            names.entry(*id).or_insert_with(|| text.clone());
        }
        let peer = |id: u32| match id {
            identity::ANY => "any".to_string(),
            identity::HOST => "host".to_string(),
            identity::WORLD => "world".to_string(),
            id => match names.get(&id) {
                Some(cidr) => format!("{id}({cidr})"),
                None => id.to_string(),
            },
        };

        writeln!(f, "IPCache")?;
        for (text, _, id) in &cache {
            match *id {
                identity::HOST => writeln!(f, "  {text} -> host")?,
                id => writeln!(f, "  {text} -> identity {id}")?,
            }
        }
        writeln!(f, "  * -> world")?;
        writeln!(f, "EndpointPolicy")?;
        for (key, ep) in &self.endpoint_policy {
            let ip = key_ip(key).map_or("?".into(), |ip| ip.to_string());
            let id = |id: u32| match id {
                0 => "open".to_string(),
                id => id.to_string(),
            };
            writeln!(
                f,
                "  pod_ip={ip} -> ingress_policy={} egress_policy={}",
                id(ep.ingress_policy),
                id(ep.egress_policy)
            )?;
        }
        for direction in Direction::BOTH {
            writeln!(f, "{}", direction.stage())?;
            let (peer_word, default_stage) = match direction {
                Direction::Ingress => ("from", "IngressDefaultRule"),
                Direction::Egress => ("to", "EgressDefaultRule"),
            };
            if direction == Direction::Ingress {
                writeln!(f, "  from=host -> allow")?;
            }
            for (key, rule) in &self.policy {
                let rule_ref = self.rules.get(&rule.rule);
                if rule_ref.map(|r| r.direction) != Some(direction) {
                    continue;
                }
                let name = rule_ref.map_or(String::new(), |r| format!(" ({r})"));
                writeln!(
                    f,
                    "  policy={} {peer_word}={} {} -> allow rule={}{name}",
                    key.key.policy,
                    peer(key.key.peer),
                    port_text(key),
                    rule.rule
                )?;
            }
            writeln!(f, "  * -> drop ({default_stage})")?;
        }
        if !self.errors.is_empty() {
            writeln!(f, "Errors")?;
            for error in &self.errors {
                writeln!(f, "  {error}")?;
            }
        }
        Ok(())
    }
}

fn port_text(key: &PolicyLpmKey) -> String {
    if key.key.proto == PROTO_ANY {
        return "any".into();
    }
    let proto = protocol_name(key.key.proto);
    let bits = key.prefix_len.saturating_sub(POLICY_KEY_EXACT_BITS).min(16);
    let first = u32::from(u16::from_be_bytes(key.key.port));
    match bits {
        0 => format!("{proto}/any"),
        16 => format!("{proto}/{first}"),
        bits => format!("{proto}/{first}-{}", first + (1 << (16 - bits)) - 1),
    }
}
