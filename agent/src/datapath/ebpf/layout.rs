//! Pinned maps outlive the agent that created them, and the next agent may declare a map
//! otherwise: a key or value that grew, another size (`bpfMapSizes`), entries whose meaning
//! changed (`map_names::FORMATS`). Before loading, every pin is compared with what this agent's
//! object declares and with the format the pinned LAYOUT map recorded; a pin that differs is
//! never adopted: it is unlinked and the loader creates the map anew.
//!
//! Replacing keeps forwarding: the programs still attached keep the old maps alive and run on
//! them until the new programs replace them, and the new maps are filled from the agent's state
//! first (see `PodNetwork::start`). What a replaced map held is rebuilt (pods, routes, policy,
//! Services) or lost (tracked connections: re-judged; load-balanced ones: balanced anew).

use std::{collections::BTreeMap, fmt, path::Path};

use anyhow::{Context, Result};
use aya::maps::{Array, Map, MapData};
use sluice_common::map_names;
use tracing::warn;

/// What a pin must match to be adopted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub format: u32,
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "type {}, key {} B, value {} B, {} entries, format {}",
            self.map_type, self.key_size, self.value_size, self.max_entries, self.format
        )
    }
}

fn format_of(name: &str) -> u32 {
    map_names::FORMATS
        .iter()
        .find(|(n, _)| *n == name)
        .map_or(1, |&(_, format)| format)
}

/// Every map's layout as `object` declares it, sized as configured.
pub fn declared(
    object: &[u8],
    map_sizes: &[(&'static str, u32)],
) -> Result<BTreeMap<&'static str, Layout>> {
    let obj = aya_obj::Object::parse(object).context("parsing the eBPF object")?;
    map_names::ALL
        .iter()
        .map(|&name| {
            let map = obj
                .maps
                .get(name)
                .with_context(|| format!("the eBPF object has no map {name}"))?;
            let max_entries = map_sizes
                .iter()
                .find(|(n, _)| *n == name)
                .map_or(map.max_entries(), |&(_, size)| size);
            let layout = Layout {
                map_type: map.map_type(),
                key_size: map.key_size(),
                value_size: map.value_size(),
                max_entries,
                format: format_of(name),
            };
            Ok((name, layout))
        })
        .collect()
}

/// The formats the pinned LAYOUT map recorded, by map; none before agents recorded them (their
/// maps were all at format 1).
fn pinned_formats(pin_dir: &Path) -> BTreeMap<&'static str, u32> {
    let Ok(data) = MapData::from_pin(pin_dir.join(map_names::LAYOUT)) else {
        return BTreeMap::new();
    };
    let Ok(array) = Array::<MapData, u32>::try_from(Map::Array(data)) else {
        return BTreeMap::new();
    };
    (0u32..)
        .zip(map_names::ALL)
        .filter_map(|(index, name)| match array.get(&index, 0) {
            Ok(format) if format != 0 => Some((name, format)),
            _ => None,
        })
        .collect()
}

/// Compares every pin with `declared` and unlinks those that differ, so the loader creates them
/// anew; returns the maps replaced. A pin that cannot be read is replaced too: the agent never
/// runs on maps it does not understand.
pub fn replace_mismatched(
    pin_dir: &Path,
    declared: &BTreeMap<&'static str, Layout>,
) -> Result<Vec<&'static str>> {
    let formats = pinned_formats(pin_dir);
    let mut replaced = Vec::new();
    for (&name, &want) in declared {
        let path = pin_dir.join(name);
        if !path.exists() {
            continue;
        }
        let pinned = MapData::from_pin(&path)
            .and_then(|m| m.info())
            .map(|info| Layout {
                map_type: info.map_type().map_or(u32::MAX, |t| t as u32),
                key_size: info.key_size(),
                value_size: info.value_size(),
                max_entries: info.max_entries(),
                format: formats.get(name).copied().unwrap_or(1),
            });
        let pinned = match pinned {
            Ok(layout) if layout == want => continue,
            Ok(layout) => layout.to_string(),
            Err(e) => format!("unreadable: {e}"),
        };
        warn!(
            map = name,
            "pinned map ({pinned}) differs from this agent's ({want}): replaced; what it held is \
             rebuilt or, for connections, started over"
        );
        std::fs::remove_file(&path).with_context(|| format!("unpinning {}", path.display()))?;
        replaced.push(name);
    }
    Ok(replaced)
}

/// Records every map's format in the loaded object's LAYOUT map, for the next agent.
pub fn record(bpf: &mut aya::Ebpf, declared: &BTreeMap<&'static str, Layout>) -> Result<()> {
    let map = bpf
        .map_mut(map_names::LAYOUT)
        .context("the eBPF object has no map LAYOUT")?;
    let mut array = Array::<&mut MapData, u32>::try_from(map)?;
    for (index, name) in (0u32..).zip(map_names::ALL) {
        array
            .set(index, declared[name].format, 0)
            .with_context(|| format!("recording the format of map {name} in LAYOUT"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_object_declares_every_map_and_sizes_follow_the_config() {
        let object = super::super::EBPF_OBJECT;
        let default = declared(object, &[]).unwrap();
        assert_eq!(default.len(), map_names::ALL.len());
        let nat = default[map_names::SERVICE_NAT];
        assert_eq!(
            (nat.key_size, nat.value_size, nat.max_entries, nat.format),
            (48, 48, sluice_common::MAX_SERVICE_NAT, 1)
        );
        let sized = declared(object, &[(map_names::SERVICE_NAT, 1024)]).unwrap();
        assert_eq!(sized[map_names::SERVICE_NAT].max_entries, 1024);
        assert_eq!(sized[map_names::CONNTRACK], default[map_names::CONNTRACK]);
    }
}
