//! The node's own networks, for the overlap check (`crate::overlap`): the subnet of every
//! address on its interfaces and its routes, leaving out what Sluice put there (the gateway,
//! its datapath peer, the tunnel, routes of protocol `ROUTE_PROTOCOL`) and what overlaps
//! everything by design (default routes, loopback, link-local).

use std::{collections::BTreeMap, net::IpAddr};

use anyhow::{Context, Result};
use futures::TryStreamExt;
use ipnetwork::IpNetwork;
use netlink_packet_route::{
    address::AddressAttribute,
    route::{RouteAddress, RouteAttribute, RouteProtocol},
};
use rtnetlink::RouteMessageBuilder;

use super::{Netlink, ROUTE_PROTOCOL};

/// A network the node has: an address's subnet on `device`, or a route through it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct HostNetwork {
    pub cidr: IpNetwork,
    pub device: String,
    pub route: bool,
}

fn ignored(cidr: IpNetwork) -> bool {
    let special: [IpNetwork; 4] = [
        "127.0.0.0/8".parse().expect("a CIDR"),
        "169.254.0.0/16".parse().expect("a CIDR"),
        "::1/128".parse().expect("a CIDR"),
        "fe80::/10".parse().expect("a CIDR"),
    ];
    cidr.prefix() == 0 || special.iter().any(|s| s.contains(cidr.network()))
}

fn subnet(ip: IpAddr, prefix: u8) -> Option<IpNetwork> {
    let net = IpNetwork::new(ip, prefix).ok()?;
    IpNetwork::new(net.network(), prefix).ok()
}

impl Netlink {
    /// The node's networks, except on `own_devices` (Sluice's links).
    pub async fn host_networks(&self, own_devices: &[String]) -> Result<Vec<HostNetwork>> {
        let names: BTreeMap<u32, String> = self
            .links()
            .await?
            .into_iter()
            .map(|(name, index)| (index, name))
            .collect();
        let device = |index: u32| names.get(&index).cloned().unwrap_or_default();
        let mut out = Vec::new();
        let mut addresses = self.handle.address().get().execute();
        while let Some(msg) = addresses.try_next().await.context("listing addresses")? {
            let ip = msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            });
            if let Some(cidr) = ip.and_then(|ip| subnet(ip, msg.header.prefix_len)) {
                out.push(HostNetwork {
                    cidr,
                    device: device(msg.header.index),
                    route: false,
                });
            }
        }
        let mut routes = self
            .handle
            .route()
            .get(RouteMessageBuilder::<std::net::Ipv4Addr>::new().build())
            .execute();
        while let Some(msg) = routes.try_next().await.context("listing routes")? {
            // Sluice's own, and the kernel's for an address (already counted above).
            if matches!(
                msg.header.protocol,
                RouteProtocol::Other(ROUTE_PROTOCOL) | RouteProtocol::Kernel
            ) {
                continue;
            }
            let dst = msg.attributes.iter().find_map(|a| match a {
                RouteAttribute::Destination(RouteAddress::Inet(ip)) => Some(IpAddr::V4(*ip)),
                _ => None,
            });
            let oif = msg.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(index) => Some(*index),
                _ => None,
            });
            if let Some(cidr) = dst.and_then(|ip| subnet(ip, msg.header.destination_prefix_length))
            {
                out.push(HostNetwork {
                    cidr,
                    device: oif.map(device).unwrap_or_default(),
                    route: true,
                });
            }
        }
        out.retain(|n| !ignored(n.cidr) && !own_devices.contains(&n.device));
        out.sort();
        out.dedup();
        Ok(out)
    }
}
