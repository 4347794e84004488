//! `sluice-bench service`: what Services cost with 1 to 10,000 of them (one TCP port and 10
//! endpoints each), one file per measurement; the connection rate is measured against
//! kube-proxy's iptables rules for the same Services in the same run (`kube_proxy.rs`).

mod connection_rate;
mod kube_proxy;
mod per_packet;
mod programming;

use std::{collections::BTreeMap, net::Ipv4Addr};

use anyhow::{Context, Result};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::Api;
use serde_json::{json, Value};
use sluice_tests::cluster::AdminClient;

use crate::policy::ACCEPT_PORT;

const ENDPOINTS_PER_SERVICE: u32 = 10;
const SERVICE_PORT: u16 = 80;
/// The first source port the benchmark's clients use; each packet or connection of a round takes
/// the next one, so none of them belongs to an earlier connection.
const FIRST_PORT: u16 = 1024;

/// How much to measure. `--quick` checks that the benchmark works; its figures mean little.
struct Scale {
    /// Services installed, smallest first: the figures compare the last with the first.
    counts: &'static [u32],
    /// Single test runs per packet kind and round.
    samples: u16,
    /// Rounds of the per-packet measurement; the least is reported (other work only adds time).
    packet_rounds: usize,
    /// Rounds of the connection rate, after a discarded warm-up round; the median is reported.
    rate_rounds: usize,
}

const FULL: Scale = Scale {
    counts: &[1, 100, 10_000],
    samples: 20_000,
    packet_rounds: 3,
    rate_rounds: 5,
};

const QUICK: Scale = Scale {
    counts: &[1, 100],
    samples: 2_000,
    packet_rounds: 1,
    rate_rounds: 1,
};

pub fn run(quick: bool) -> Result<()> {
    let scale = if quick { &QUICK } else { &FULL };
    per_packet::run(scale)?;
    connection_rate::run(scale)?;
    programming::run(scale)
}

/// Service `i`'s ClusterIP where no API server allocates one (the test-run harness, the
/// kube-proxy baseline): 10.96.0.16 onwards.
fn cluster_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 16)) + i)
}

/// Service 0 is the one measured, with `measured` endpoints; the others' endpoints do not exist
/// (10.128.0.0 onwards), and no packet goes to them.
fn endpoints_of(i: u32, measured: &[Ipv4Addr]) -> Vec<Ipv4Addr> {
    if i == 0 {
        return measured.to_vec();
    }
    let first = u32::from(Ipv4Addr::new(10, 128, 0, 0)) + i * ENDPOINTS_PER_SERVICE;
    (first..first + ENDPOINTS_PER_SERVICE)
        .map(Ipv4Addr::from)
        .collect()
}

/// Service `i` (no selector: the benchmark writes its EndpointSlice) and that slice. Without
/// `cluster_ip` the API server allocates one.
fn objects(i: u32, measured: &[Ipv4Addr], cluster_ip: Option<Ipv4Addr>) -> (Value, Value) {
    let name = format!("svc-{i}");
    let mut service = json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"ports": [{"name": "http", "port": SERVICE_PORT, "targetPort": ACCEPT_PORT, "protocol": "TCP"}]}});
    if let Some(ip) = cluster_ip {
        service["spec"]["clusterIP"] = json!(ip.to_string());
    }
    let endpoints: Vec<Value> = endpoints_of(i, measured)
        .iter()
        .map(|ip| json!({"addresses": [ip.to_string()], "conditions": {"ready": true, "serving": true, "terminating": false}}))
        .collect();
    let slice = json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{name}-1"), "namespace": "default",
                     "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "http", "port": ACCEPT_PORT, "protocol": "TCP"}]});
    (service, slice)
}

/// Requests in flight while the benchmark writes Services.
const IN_FLIGHT: usize = 16;

/// Creates Services `range` (kube-apiserver allocates their ClusterIPs), then their slices;
/// returns the newest resourceVersion of each kind, what the agent has programmed them once it
/// reports.
fn create(
    admin: &AdminClient,
    range: std::ops::Range<u32>,
    measured: &[Ipv4Addr],
) -> Result<BTreeMap<String, u64>> {
    let (services, slices): (Vec<Value>, Vec<Value>) =
        range.map(|i| objects(i, measured, None)).unzip();
    let services: Vec<Service> = services
        .into_iter()
        .map(serde_json::from_value)
        .collect::<Result<_, _>>()?;
    let slices: Vec<EndpointSlice> = slices
        .into_iter()
        .map(serde_json::from_value)
        .collect::<Result<_, _>>()?;
    let newest = |versions: Vec<Option<String>>| {
        versions
            .into_iter()
            .filter_map(|v| v?.parse::<u64>().ok())
            .max()
            .unwrap_or_default()
    };
    let services = admin.create_all(
        &Api::namespaced(admin.client.clone(), "default"),
        services,
        IN_FLIGHT,
    )?;
    let slices = admin.create_all(
        &Api::namespaced(admin.client.clone(), "default"),
        slices,
        IN_FLIGHT,
    )?;
    Ok(BTreeMap::from([
        (
            "Service".to_string(),
            newest(
                services
                    .into_iter()
                    .map(|s| s.metadata.resource_version)
                    .collect(),
            ),
        ),
        (
            "EndpointSlice".to_string(),
            newest(
                slices
                    .into_iter()
                    .map(|s| s.metadata.resource_version)
                    .collect(),
            ),
        ),
    ]))
}

/// The ClusterIP kube-apiserver gave Service `i`.
fn allocated_ip(admin: &AdminClient, i: u32) -> Result<Ipv4Addr> {
    let services: Api<Service> = Api::namespaced(admin.client.clone(), "default");
    let service = admin
        .block_on(services.get(&format!("svc-{i}")))
        .with_context(|| format!("Service svc-{i}"))?;
    service
        .spec
        .and_then(|s| s.cluster_ip)
        .and_then(|ip| ip.parse().ok())
        .with_context(|| format!("svc-{i} has no IPv4 ClusterIP"))
}
