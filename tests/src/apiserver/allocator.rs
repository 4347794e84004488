//! Cluster IPs from the service CIDR, node ports and health-check node ports from the node-port
//! range. Nothing is kept beside the objects: what is allocated is read from the other stored
//! Services on every write, so allocations survive a restart and a delete frees them
//! (kube-apiserver needs repair loops for the same guarantee).
//!
//! Fresh addresses and ports are the lowest free ones above the band kube-apiserver keeps for
//! requested values (it picks at random there): runs are reproducible, and a requested
//! `10.96.0.10` does not collide with an earlier automatic allocation.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    ops::RangeInclusive,
};

use ipnetwork::Ipv4Network;
use serde_json::{json, Value};

use super::{
    resources::{go_strings, invalid_value, ApiError},
    services::{
        needs_cluster_ip, needs_health_check, needs_node_ports, node_ports, ports, ports_mut,
        set_port, strings, text, Spec,
    },
};

/// The lab's service CIDR (kube-apiserver's `--service-cluster-ip-range`).
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// kube-apiserver's default `--service-node-port-range`.
pub const NODE_PORT_RANGE: RangeInclusive<u16> = 30000..=32767;

/// Where Services get their cluster IPs and node ports from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceRanges {
    pub cluster_ips: Ipv4Network,
    pub node_ports: RangeInclusive<u16>,
}

impl Default for ServiceRanges {
    fn default() -> ServiceRanges {
        ServiceRanges {
            cluster_ips: SERVICE_CIDR.parse().expect("SERVICE_CIDR is a CIDR"),
            node_ports: NODE_PORT_RANGE,
        }
    }
}

/// The allocations every other Service holds.
#[derive(Default)]
struct Taken {
    ips: BTreeSet<Ipv4Addr>,
    ports: BTreeSet<u64>,
}

impl Taken {
    fn of<'a>(services: impl Iterator<Item = &'a Value>) -> Taken {
        let mut taken = Taken::default();
        for spec in services.filter_map(|s| s.get("spec").and_then(Value::as_object)) {
            taken.ips.extend(
                strings(spec, "clusterIPs")
                    .iter()
                    .filter_map(|ip| ip.parse::<Ipv4Addr>().ok()),
            );
            taken.ports.extend(node_ports(spec).into_iter().flatten());
            taken
                .ports
                .extend(set_port(spec.get("healthCheckNodePort")));
        }
        taken
    }
}

/// kube-apiserver first allocates above a low band it keeps for requested values:
/// min(max(16, size / step), max), no band for ranges of 16 or fewer.
fn static_band(size: u64, step: u64, max: u64) -> u64 {
    if size <= 16 {
        0
    } else {
        (size / step).clamp(16, max)
    }
}

/// The usable addresses: the network and broadcast addresses are never allocated.
fn ip_offsets(range: &Ipv4Network) -> (u32, u64) {
    let size = 1u64 << (32 - u32::from(range.prefix()));
    (u32::from(range.network()), size.saturating_sub(2))
}

fn ip_in_range(range: &Ipv4Network, ip: Ipv4Addr) -> bool {
    let (network, usable) = ip_offsets(range);
    let offset = u64::from(u32::from(ip).wrapping_sub(network));
    range.contains(ip) && (1..=usable).contains(&offset)
}

fn next_ip(range: &Ipv4Network, taken: &BTreeSet<Ipv4Addr>) -> Option<Ipv4Addr> {
    let (network, usable) = ip_offsets(range);
    let band = static_band(usable, 16, 256);
    (band..usable)
        .chain(0..band)
        .map(|i| Ipv4Addr::from(network + 1 + i as u32))
        .find(|ip| !taken.contains(ip))
}

fn next_port(range: &RangeInclusive<u16>, taken: &BTreeSet<u64>) -> Option<u64> {
    let start = u64::from(*range.start());
    let size = u64::from(*range.end()).saturating_sub(start) + 1;
    let band = static_band(size, 32, 128);
    (band..size)
        .chain(0..band)
        .map(|i| start + i)
        .find(|p| !taken.contains(p))
}

/// Allocates what `spec` still lacks and checks what it requests against `others`.
pub(super) fn allocate<'a>(
    ranges: &ServiceRanges,
    spec: &mut Spec,
    old: Option<&Spec>,
    others: impl Iterator<Item = &'a Value>,
    name: &str,
) -> Result<(), ApiError> {
    let mut taken = Taken::of(others);
    allocate_cluster_ip(ranges, spec, old, &taken.ips, name)?;
    allocate_node_ports(ranges, spec, &mut taken.ports, name)?;
    allocate_health_check(ranges, spec, &mut taken.ports)
}

fn allocate_cluster_ip(
    ranges: &ServiceRanges,
    spec: &mut Spec,
    old: Option<&Spec>,
    taken: &BTreeSet<Ipv4Addr>,
    name: &str,
) -> Result<(), ApiError> {
    let ip = text(spec, "clusterIP").to_string();
    let kept = old.is_some_and(|o| needs_cluster_ip(o) && text(o, "clusterIP") == ip);
    if !needs_cluster_ip(spec) || ip == "None" || kept {
        return Ok(());
    }
    if ip.is_empty() {
        let next = next_ip(&ranges.cluster_ips, taken)
            .ok_or_else(|| ApiError::internal("failed to allocate a serviceIP: range is full"))?;
        spec.insert("clusterIP".into(), json!(next.to_string()));
        spec.insert("clusterIPs".into(), json!([next.to_string()]));
        return Ok(());
    }
    // Validation let only an IPv4 address through.
    let requested: Ipv4Addr = ip.parse().expect("validated");
    let why = if !ip_in_range(&ranges.cluster_ips, requested) {
        format!(
            "the provided IP ({ip}) is not in the valid range. The range of valid IPs is {}",
            ranges.cluster_ips
        )
    } else if taken.contains(&requested) {
        "provided IP is already allocated".to_string()
    } else {
        return Ok(());
    };
    let error = invalid_value(
        "spec.clusterIPs",
        go_strings(&strings(spec, "clusterIPs")),
        &format!("failed to allocate IP {ip}: {why}"),
    );
    Err(ApiError::invalid_fields("Service", name, &[error]))
}

/// Why a requested node port cannot be had, if it cannot.
fn unavailable(ranges: &ServiceRanges, taken: &BTreeSet<u64>, port: u64) -> Option<String> {
    let range = &ranges.node_ports;
    if !(u64::from(*range.start())..=u64::from(*range.end())).contains(&port) {
        Some(format!(
            "provided port is not in the valid range. The range of valid ports is {}-{}",
            range.start(),
            range.end()
        ))
    } else if taken.contains(&port) {
        Some("provided port is already allocated".into())
    } else {
        None
    }
}

fn allocate_node_ports(
    ranges: &ServiceRanges,
    spec: &mut Spec,
    taken: &mut BTreeSet<u64>,
    name: &str,
) -> Result<(), ApiError> {
    if !needs_node_ports(spec) {
        return Ok(());
    }
    // Ports of one number (DNS's TCP and UDP 53) share a node port, requested or allocated; the
    // requested ones go first so that a later port can share one requested after it.
    let mut by_port: BTreeMap<Option<u64>, u64> = BTreeMap::new();
    for (i, port) in ports(spec).iter().enumerate() {
        let Some(np) = set_port(port.get("nodePort")) else {
            continue;
        };
        let number = port["port"].as_u64();
        if by_port.get(&number) == Some(&np) {
            continue;
        }
        if let Some(why) = unavailable(ranges, taken, np) {
            let error = invalid_value(&format!("spec.ports[{i}].nodePort"), np, &why);
            return Err(ApiError::invalid_fields("Service", name, &[error]));
        }
        taken.insert(np);
        by_port.entry(number).or_insert(np);
    }
    let allocate = text(spec, "type") == "NodePort"
        || spec.get("allocateLoadBalancerNodePorts") != Some(&json!(false));
    if !allocate {
        return Ok(());
    }
    for port in ports_mut(spec).filter(|p| set_port(p.get("nodePort")).is_none()) {
        let number = port.get("port").and_then(Value::as_u64);
        let np = match by_port.get(&number) {
            Some(&np) => np,
            None => next_port(&ranges.node_ports, taken).ok_or_else(|| {
                ApiError::internal("failed to allocate a nodePort: range is full")
            })?,
        };
        taken.insert(np);
        by_port.insert(number, np);
        port.insert("nodePort".into(), json!(np));
    }
    Ok(())
}

fn allocate_health_check(
    ranges: &ServiceRanges,
    spec: &mut Spec,
    taken: &mut BTreeSet<u64>,
) -> Result<(), ApiError> {
    if !needs_health_check(spec) {
        return Ok(());
    }
    match set_port(spec.get("healthCheckNodePort")) {
        Some(hc) => match unavailable(ranges, taken, hc) {
            Some(why) => Err(ApiError::internal(format!(
                "failed to allocate requested HealthCheck NodePort {hc}: {why}"
            ))),
            None => Ok(()),
        },
        None => {
            let hc = next_port(&ranges.node_ports, taken).ok_or_else(|| {
                ApiError::internal("failed to allocate a HealthCheck NodePort 0: range is full")
            })?;
            spec.insert("healthCheckNodePort".into(), json!(hc));
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_values_come_from_above_the_static_band() {
        let range: Ipv4Network = SERVICE_CIDR.parse().unwrap();
        let mut taken = BTreeSet::new();
        // 65534 usable addresses: kube-apiserver's band is 256 addresses, 10.96.0.1-10.96.1.0.
        assert_eq!(next_ip(&range, &taken), Some(Ipv4Addr::new(10, 96, 1, 1)));
        taken.insert(Ipv4Addr::new(10, 96, 1, 1));
        assert_eq!(next_ip(&range, &taken), Some(Ipv4Addr::new(10, 96, 1, 2)));
        // 2768 ports: the band is 86 ports, 30000-30085.
        assert_eq!(next_port(&NODE_PORT_RANGE, &BTreeSet::new()), Some(30086));
    }

    #[test]
    fn a_full_upper_band_falls_back_to_the_static_band() {
        let range: Ipv4Network = "10.0.0.0/27".parse().unwrap();
        // 30 usable, band 16: 10.0.0.17-30 first, then 10.0.0.1-16.
        let upper: BTreeSet<Ipv4Addr> = (17..=30).map(|i| Ipv4Addr::new(10, 0, 0, i)).collect();
        assert_eq!(next_ip(&range, &upper), Some(Ipv4Addr::new(10, 0, 0, 1)));
        let all: BTreeSet<Ipv4Addr> = (1..=30).map(|i| Ipv4Addr::new(10, 0, 0, i)).collect();
        assert_eq!(next_ip(&range, &all), None);
        // A range of 16 or fewer has no band.
        let small: Ipv4Network = "10.0.0.0/28".parse().unwrap();
        assert_eq!(
            next_ip(&small, &BTreeSet::new()),
            Some(Ipv4Addr::new(10, 0, 0, 1))
        );
    }

    #[test]
    fn network_and_broadcast_are_out_of_range() {
        let range: Ipv4Network = SERVICE_CIDR.parse().unwrap();
        assert!(!ip_in_range(&range, Ipv4Addr::new(10, 96, 0, 0)));
        assert!(ip_in_range(&range, Ipv4Addr::new(10, 96, 0, 1)));
        assert!(ip_in_range(&range, Ipv4Addr::new(10, 96, 255, 254)));
        assert!(!ip_in_range(&range, Ipv4Addr::new(10, 96, 255, 255)));
        assert!(!ip_in_range(&range, Ipv4Addr::new(10, 97, 0, 1)));
    }
}
