//! ExternalIPPools, checked once into address ranges and a node selector. Antrea's admission
//! webhook refuses a bad pool; Sluice has no webhook, so the agent does the same checks and a pool
//! that fails any of them hands out nothing.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnetwork::IpNetwork;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::DynamicObject;
use serde::{de::IgnoredAny, Deserialize};
use serde_json::Value;

use super::{ExternalIpError, Usage};
use crate::model::policy::{FieldError, Selector};

/// `spec` of `crd.antrea.io/v1beta1` ExternalIPPool. Unknown fields are refused: kube-apiserver
/// prunes them for a CRD with a schema, so one reaching the agent is a typo (`ipRange`) that would
/// otherwise pass for an empty pool.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Spec {
    /// Kept as JSON so that each entry is checked (and reported) on its own.
    #[serde(default)]
    ip_ranges: Vec<Value>,
    #[serde(default)]
    node_selector: LabelSelector,
    /// The pool's subnet and VLAN, which only Antrea's Egress uses; a Service IP is announced on
    /// the node's own network, so it is accepted and left alone.
    #[serde(rename = "subnetInfo", default)]
    _subnet_info: Option<IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RangeSpec {
    cidr: Option<String>,
    start: Option<String>,
    end: Option<String>,
}

/// Addresses `start..=end` of one family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Range {
    start: IpAddr,
    end: IpAddr,
    /// Position in `spec.ipRanges`, for messages.
    index: usize,
}

impl Range {
    fn overlaps(&self, other: &Range) -> bool {
        // `IpAddr` orders every IPv4 address before every IPv6 one, so ranges of different
        // families never overlap.
        self.start <= other.end && other.start <= self.end
    }

    fn size(&self) -> u128 {
        (num(self.end) - num(self.start)).saturating_add(1)
    }
}

impl std::fmt::Display for Range {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.start, self.end)
    }
}

/// A valid pool.
#[derive(Debug)]
pub(super) struct Pool {
    /// Sorted by start, no two overlapping.
    ranges: Vec<Range>,
    pub selector: Selector,
    /// `status.usage` as stored, to write it only when it changes.
    pub stored_usage: Option<Usage>,
}

impl Pool {
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.ranges.iter().any(|r| r.start <= ip && ip <= r.end)
    }

    /// How many addresses the pool hands out, as Antrea's `status.usage.total` (an int64).
    pub fn total(&self) -> i64 {
        let size = self
            .ranges
            .iter()
            .fold(0u128, |sum, r| sum.saturating_add(r.size()));
        i64::try_from(size).unwrap_or(i64::MAX)
    }

    /// The lowest address of the pool that is not `taken`. Costs one step per taken address of
    /// the pool, never one per address: an IPv6 range may hold 2^64 of them.
    pub fn lowest_free(&self, taken: &BTreeSet<IpAddr>) -> Option<IpAddr> {
        self.ranges.iter().find_map(|r| {
            let mut candidate = Some(num(r.start));
            for used in taken.range(r.start..=r.end).map(|ip| num(*ip)) {
                match candidate {
                    Some(c) if c == used => candidate = c.checked_add(1),
                    _ => break,
                }
            }
            candidate
                .filter(|&c| c <= num(r.end))
                .map(|c| with_family(r.start, c))
        })
    }
}

/// Pools by name: the valid ones, and the names of the others (their Services get an error, not
/// an IP).
#[derive(Debug, Default)]
pub(super) struct Pools {
    pub valid: BTreeMap<String, Pool>,
    pub invalid: BTreeSet<String>,
}

fn num(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u32::from(a).into(),
        IpAddr::V6(a) => a.into(),
    }
}

/// The address numbered `n` in the family of `like`; `n` comes from an address of that family.
fn with_family(like: IpAddr, n: u128) -> IpAddr {
    match like {
        IpAddr::V4(_) => Ipv4Addr::from(n as u32).into(),
        IpAddr::V6(_) => Ipv6Addr::from(n).into(),
    }
}

fn parse_ip(field: String, text: &str) -> Result<IpAddr, FieldError> {
    text.parse()
        .map_err(|_| FieldError::new(field, text, "not an IP address"))
}

/// One `spec.ipRanges` entry: `{cidr}` or `{start, end}`.
fn parse_range(index: usize, entry: &Value) -> Result<Range, FieldError> {
    let at = &format!("spec.ipRanges[{index}]");
    let spec = RangeSpec::deserialize(entry)
        .map_err(|e| FieldError::new(at, entry.to_string(), e.to_string()))?;
    match (spec.cidr, spec.start, spec.end) {
        (Some(cidr), None, None) => {
            let field = format!("{at}.cidr");
            let net: IpNetwork = cidr.parse().map_err(|e: ipnetwork::IpNetworkError| {
                FieldError::new(&field, &cidr, e.to_string())
            })?;
            // As Antrea: host bits are ignored, the network address is never handed out, nor is
            // an IPv4 network's broadcast address.
            let first = num(net.network()).checked_add(1);
            let last = match net {
                IpNetwork::V4(_) => num(net.broadcast()).checked_sub(1),
                IpNetwork::V6(_) => Some(num(net.broadcast())),
            };
            match (first, last) {
                (Some(first), Some(last)) if first <= last => Ok(Range {
                    start: with_family(net.ip(), first),
                    end: with_family(net.ip(), last),
                    index,
                }),
                _ => Err(FieldError::new(
                    field,
                    cidr,
                    "has no address to hand out (the network address and the IPv4 broadcast \
                     address are not used)",
                )),
            }
        }
        (None, Some(start), Some(end)) => {
            let first = parse_ip(format!("{at}.start"), &start)?;
            let last = parse_ip(format!("{at}.end"), &end)?;
            if first.is_ipv4() != last.is_ipv4() {
                return Err(FieldError::new(
                    at,
                    format!("{start}-{end}"),
                    "start and end are of different IP families",
                ));
            }
            if first > last {
                return Err(FieldError::new(
                    at,
                    format!("{start}-{end}"),
                    "start is after end",
                ));
            }
            Ok(Range {
                start: first,
                end: last,
                index,
            })
        }
        (None, Some(_), None) => Err(FieldError::new(
            format!("{at}.end"),
            "",
            "is required with start",
        )),
        (None, None, Some(_)) => Err(FieldError::new(
            format!("{at}.start"),
            "",
            "is required with end",
        )),
        _ => Err(FieldError::new(
            at,
            entry.to_string(),
            "give either cidr, or start and end",
        )),
    }
}

/// One pool on its own.
fn parse_pool(pool: &DynamicObject) -> Result<Pool, Vec<FieldError>> {
    let spec = pool
        .data
        .get("spec")
        .ok_or_else(|| vec![FieldError::new("spec", "", "is required")])?;
    let spec =
        Spec::deserialize(spec).map_err(|e| vec![FieldError::new("spec", "", e.to_string())])?;
    let mut errors = Vec::new();
    let mut ranges = Vec::new();
    for (i, entry) in spec.ip_ranges.iter().enumerate() {
        match parse_range(i, entry) {
            Ok(range) => ranges.push(range),
            Err(e) => errors.push(e),
        }
    }
    ranges.sort();
    // Sorted by start: a range overlaps an earlier one exactly when it starts before the
    // furthest end so far.
    let mut furthest: Option<Range> = None;
    for &range in &ranges {
        if let Some(prev) = furthest.filter(|prev| prev.overlaps(&range)) {
            errors.push(FieldError::new(
                format!("spec.ipRanges[{}]", range.index),
                range.to_string(),
                format!("overlaps spec.ipRanges[{}] ({prev})", prev.index),
            ));
        }
        if furthest.is_none_or(|prev| range.end > prev.end) {
            furthest = Some(range);
        }
    }
    let selector = Selector::parse(&spec.node_selector, "spec.nodeSelector", &mut errors);
    let stored_usage = pool
        .data
        .pointer("/status/usage")
        .and_then(|u| Usage::deserialize(u).ok());
    match selector {
        Some(selector) if errors.is_empty() => Ok(Pool {
            ranges,
            selector,
            stored_usage,
        }),
        _ => Err(errors),
    }
}

/// Checks every pool. Ranges of two pools must not overlap either: as Antrea's webhook would
/// have refused the newer pool, the pool created later (by creationTimestamp, then name) is the
/// invalid one.
pub(super) fn parse_pools<'a>(
    pools: impl IntoIterator<Item = &'a DynamicObject>,
    errors: &mut Vec<ExternalIpError>,
) -> Pools {
    let mut pools: Vec<&DynamicObject> = pools.into_iter().collect();
    pools.sort_by_key(|p| {
        (
            p.metadata.creation_timestamp.clone(),
            p.metadata.name.clone(),
        )
    });
    let mut out = Pools::default();
    let mut claimed: Vec<(String, Range)> = Vec::new();
    for pool in pools {
        let name = pool.metadata.name.clone().unwrap_or_default();
        let parsed = parse_pool(pool).and_then(|parsed| {
            let clashes: Vec<FieldError> = parsed
                .ranges
                .iter()
                .filter_map(|range| {
                    let (other, theirs) = claimed.iter().find(|(_, r)| r.overlaps(range))?;
                    Some(FieldError::new(
                        format!("spec.ipRanges[{}]", range.index),
                        range.to_string(),
                        format!(
                            "overlaps spec.ipRanges[{}] ({theirs}) of the older ExternalIPPool \
                             {other}",
                            theirs.index
                        ),
                    ))
                })
                .collect();
            if clashes.is_empty() {
                claimed.extend(parsed.ranges.iter().map(|r| (name.clone(), *r)));
                Ok(parsed)
            } else {
                Err(clashes)
            }
        });
        match parsed {
            Ok(parsed) => {
                out.valid.insert(name, parsed);
            }
            Err(problems) => {
                errors.extend(problems.into_iter().map(|e| ExternalIpError::InvalidPool {
                    pool: name.clone(),
                    field: e.field,
                    value: e.value,
                    reason: e.reason,
                }));
                out.invalid.insert(name);
            }
        }
    }
    out
}
