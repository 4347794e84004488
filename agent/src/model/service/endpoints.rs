//! The endpoints of a Service port, from its EndpointSlices, and which of them a backend set
//! gets.

use std::{
    collections::{btree_map::Entry, BTreeMap},
    net::IpAddr,
};

use crate::k8s::EndpointSlice;

use super::{parse::Port, SERVICE_NAME_LABEL};
use crate::model::policy::{protocol_number, valid_port};

/// Slices by (namespace, Service name), each list in slice-name order so that duplicates are
/// resolved the same way on every compile.
pub(super) fn slices_by_service<'a>(
    slices: &[&'a EndpointSlice],
) -> BTreeMap<(&'a str, &'a str), Vec<&'a EndpointSlice>> {
    let mut by_service: BTreeMap<(&str, &str), Vec<&EndpointSlice>> = BTreeMap::new();
    for &slice in slices {
        let labels = slice.metadata.labels.as_ref();
        let Some(service) = labels.and_then(|l| l.get(SERVICE_NAME_LABEL)) else {
            continue;
        };
        let namespace = slice.metadata.namespace.as_deref().unwrap_or("default");
        by_service
            .entry((namespace, service.as_str()))
            .or_default()
            .push(slice);
    }
    for list in by_service.values_mut() {
        list.sort_by_key(|slice| slice.metadata.name.as_deref());
    }
    by_service
}

/// An endpoint of one Service port.
#[derive(Clone, Copy, Debug)]
pub(super) struct Backend {
    pub(super) addr: IpAddr,
    pub(super) port: u16,
    pub(super) local: bool,
    pub(super) ready: bool,
    serving: bool,
    terminating: bool,
}

/// The endpoints of `port` in its Service's slices (matched by port name and protocol), each
/// address and port once, in address order so that indices are the same on every compile.
pub(super) fn port_backends(
    slices: &[&EndpointSlice],
    port: &Port,
    node_name: &str,
) -> Vec<Backend> {
    let mut found: BTreeMap<(IpAddr, u16), Backend> = BTreeMap::new();
    for slice in slices {
        // FQDN slices carry names, which no datapath can load-balance to.
        if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
            continue;
        }
        // The API server defaults an absent name to "" and protocol to TCP.
        let number = slice
            .ports
            .iter()
            .flatten()
            .find(|p| {
                p.name.as_deref().unwrap_or_default() == port.name
                    && protocol_number(p.protocol.as_deref().unwrap_or("TCP")) == Some(port.proto)
            })
            .and_then(|p| p.port)
            .and_then(valid_port);
        let Some(number) = number else {
            continue;
        };
        for endpoint in slice.endpoints.iter().flatten() {
            // Further addresses of an endpoint are interchangeable with the first (API docs).
            let Some(addr) = endpoint.addresses.first().and_then(|a| a.parse().ok()) else {
                continue;
            };
            let conditions = endpoint.conditions.as_ref();
            let backend = Backend {
                addr,
                port: number,
                local: endpoint.node_name.as_deref() == Some(node_name),
                ready: conditions.and_then(|c| c.ready).unwrap_or(true),
                serving: conditions.and_then(|c| c.serving).unwrap_or(true),
                terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
            };
            // As kube-proxy: if copies disagree on the node, the local one wins.
            match found.entry((addr, number)) {
                Entry::Vacant(slot) => {
                    slot.insert(backend);
                }
                Entry::Occupied(mut slot) if backend.local && !slot.get().local => {
                    slot.insert(backend);
                }
                Entry::Occupied(_) => {}
            }
        }
    }
    found.into_values().collect()
}

/// The endpoints a set of one family gets, (pickable, draining): the ready ones, or if none is
/// ready the serving terminating ones (KEP-1669), so that connections still land during a
/// rollout's last moments. While some are ready, the serving terminating ones drain: new
/// connections do not pick them, the ones they have keep them.
pub(super) fn usable(
    backends: &[Backend],
    ipv6: bool,
    local: bool,
) -> (Vec<Backend>, Vec<Backend>) {
    let candidates = || {
        backends
            .iter()
            .filter(move |b| b.addr.is_ipv6() == ipv6 && (b.local || !local))
    };
    let ready: Vec<Backend> = candidates().filter(|b| b.ready).copied().collect();
    let terminating: Vec<Backend> = candidates()
        .filter(|b| !b.ready && b.serving && b.terminating)
        .copied()
        .collect();
    if ready.is_empty() {
        (terminating, Vec::new())
    } else {
        (ready, terminating)
    }
}
