//! Netlink: links, addresses and routes, in the agent's own namespace (the node) and in pod
//! namespaces. `setns` is per thread, so pod-namespace work runs on a thread of its own with its
//! own netlink socket.

use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr},
    os::fd::{AsFd, AsRawFd},
    path::Path,
};

use anyhow::{anyhow, bail, Context, Result};
use futures::TryStreamExt;
use ipnetwork::IpNetwork;
use netlink_packet_route::{
    address::AddressAttribute,
    link::{InfoGeneve, InfoKind, LinkAttribute, LinkInfo as NlLinkInfo, LinkMessage},
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol},
};
use nix::sched::CloneFlags;
use rtnetlink::{Handle, LinkGeneve, LinkUnspec, LinkVeth, LinkVxlan, RouteMessageBuilder};

mod host;

pub use host::HostNetwork;

use crate::{config::TunnelType, model::Mac};

/// Routes the agent owns carry this protocol number, so it finds and replaces exactly its own.
const ROUTE_PROTOCOL: u8 = 200;

const EEXIST: i32 = 17;

#[derive(Clone, Debug)]
pub struct LinkInfo {
    pub index: u32,
    pub mac: Option<Mac>,
    /// The device's type (`vxlan`, `veth`, ...), where the kernel says.
    pub kind: Option<InfoKind>,
}

/// A netlink handle bound to the namespace it was created in.
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
}

fn is_errno(err: &rtnetlink::Error, errno: i32) -> bool {
    matches!(err, rtnetlink::Error::NetlinkError(msg) if msg.code.map(|c| -c.get()) == Some(errno))
}

fn link_info(msg: &LinkMessage) -> LinkInfo {
    let mac = msg.attributes.iter().find_map(|attr| match attr {
        LinkAttribute::Address(bytes) if bytes.len() == 6 => {
            Some(Mac(bytes[..].try_into().ok()?))
        }
        _ => None,
    });
    let kind = msg.attributes.iter().find_map(|attr| match attr {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|info| match info {
            NlLinkInfo::Kind(kind) => Some(kind.clone()),
            _ => None,
        }),
        _ => None,
    });
    LinkInfo {
        index: msg.header.index,
        mac,
        kind,
    }
}

impl Netlink {
    /// Opens a netlink socket in the calling thread's namespace; needs a tokio runtime.
    pub fn new() -> Result<Netlink> {
        let (connection, handle, _) =
            rtnetlink::new_connection().context("opening a netlink socket")?;
        tokio::spawn(connection);
        Ok(Netlink { handle })
    }

    pub async fn link(&self, name: &str) -> Result<Option<LinkInfo>> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match links.try_next().await {
            Ok(Some(msg)) => Ok(Some(link_info(&msg))),
            Ok(None) => Ok(None),
            // The kernel answers ENODEV for an unknown name.
            Err(e) if is_errno(&e, libc::ENODEV) => Ok(None),
            Err(e) => Err(anyhow!(e)).with_context(|| format!("looking up link {name}")),
        }
    }

    /// Every link of the namespace: (name, index).
    pub async fn links(&self) -> Result<Vec<(String, u32)>> {
        let mut links = self.handle.link().get().execute();
        let mut out = Vec::new();
        while let Some(msg) = links.try_next().await.context("listing links")? {
            let name = msg.attributes.iter().find_map(|attr| match attr {
                LinkAttribute::IfName(name) => Some(name.clone()),
                _ => None,
            });
            if let Some(name) = name {
                out.push((name, msg.header.index));
            }
        }
        Ok(out)
    }

    /// The interface (name, index, MAC) holding one of `addresses`: the node's uplink.
    pub async fn interface_with_address(
        &self,
        addresses: &[IpAddr],
    ) -> Result<Option<(String, LinkInfo)>> {
        let mut all = self.handle.address().get().execute();
        let mut index = None;
        while let Some(msg) = all.try_next().await.context("listing addresses")? {
            let held = msg.attributes.iter().any(
                |attr| matches!(attr, AddressAttribute::Address(ip) if addresses.contains(ip)),
            );
            if held {
                index = Some(msg.header.index);
                break;
            }
        }
        let Some(index) = index else {
            return Ok(None);
        };
        let mut links = self.handle.link().get().match_index(index).execute();
        let Some(msg) = links.try_next().await.context("looking up the uplink")? else {
            return Ok(None);
        };
        let name = msg.attributes.iter().find_map(|attr| match attr {
            LinkAttribute::IfName(name) => Some(name.clone()),
            _ => None,
        });
        Ok(name.map(|name| (name, link_info(&msg))))
    }

    pub async fn create_veth(&self, name: &str, peer: &str) -> Result<()> {
        self.handle
            .link()
            .add(LinkVeth::new(name, peer).build())
            .execute()
            .await
            .with_context(|| format!("creating veth pair {name} <-> {peer}"))
    }

    pub async fn delete_link(&self, index: u32) -> Result<()> {
        match self.handle.link().del(index).execute().await {
            Err(e) if is_errno(&e, libc::ENODEV) => Ok(()),
            other => other.with_context(|| format!("deleting link {index}")),
        }
    }

    async fn set(&self, msg: LinkMessage, what: &str) -> Result<()> {
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .with_context(|| what.to_string())
    }

    pub async fn move_to_netns(&self, index: u32, netns: &File) -> Result<()> {
        let msg = LinkUnspec::new_with_index(index)
            .setns_by_fd(netns.as_raw_fd())
            .build();
        self.set(
            msg,
            "moving the pod end of the veth into the pod's network namespace",
        )
        .await
    }

    pub async fn set_up(&self, index: u32, mtu: u32) -> Result<()> {
        self.set(
            LinkUnspec::new_with_index(index).mtu(mtu).up().build(),
            "bringing a link up",
        )
        .await
    }

    pub async fn add_address(&self, index: u32, ip: IpAddr, prefix: u8) -> Result<()> {
        match self.handle.address().add(index, ip, prefix).execute().await {
            Err(e) if is_errno(&e, EEXIST) => Ok(()),
            other => other.with_context(|| format!("adding address {ip}/{prefix}")),
        }
    }

    pub async fn add_default_route(&self, index: u32, gateway: Ipv4Addr) -> Result<()> {
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .gateway(gateway)
            .output_interface(index)
            .build();
        match self.handle.route().add(route).execute().await {
            Err(e) if is_errno(&e, EEXIST) => Ok(()),
            other => other.with_context(|| format!("adding the default route via {gateway}")),
        }
    }

    /// The gateway: a veth pair whose node end (`name`) holds the gateway address and whose
    /// datapath end (`name-dp`) runs `from_gateway`. The node end does no ARP: the datapath
    /// rewrites MACs, so the node never needs to resolve a pod.
    pub async fn ensure_gateway(
        &self,
        name: &str,
        ip: IpAddr,
        prefix: u8,
        mtu: u32,
    ) -> Result<Gateway> {
        let dp_name = gateway_peer(name);
        if self.link(name).await?.is_none() {
            self.create_veth(name, &dp_name).await?;
        }
        let (Some(gw), Some(dp)) = (self.link(name).await?, self.link(&dp_name).await?) else {
            bail!("gateway {name} exists without its datapath peer {dp_name}: delete {name} and restart");
        };
        self.set(
            LinkUnspec::new_with_index(gw.index).arp(false).build(),
            "disabling ARP on the gateway",
        )
        .await?;
        if ip.is_ipv4() {
            for end in [name, dp_name.as_str()] {
                disable_ipv6(end);
            }
        }
        self.set_up(dp.index, mtu).await?;
        self.set_up(gw.index, mtu).await?;
        self.add_address(gw.index, ip, prefix).await?;
        let mac = gw
            .mac
            .ok_or_else(|| anyhow!("gateway {name} has no MAC address"))?;
        Ok(Gateway {
            ifindex: gw.index,
            mac,
            peer_name: dp_name,
        })
    }
}

impl Netlink {
    /// The tunnel device in external (collect_md) mode: the datapath sets each packet's
    /// destination with `bpf_skb_set_tunnel_key`. A device of the other tunnel type (left by an
    /// agent configured otherwise) is replaced: peers of a node that changed `tunnelType` speak
    /// the new one.
    pub async fn ensure_tunnel(&self, name: &str, kind: TunnelType, mtu: u32) -> Result<LinkInfo> {
        let want = match kind {
            TunnelType::Vxlan => InfoKind::Vxlan,
            TunnelType::Geneve => InfoKind::Geneve,
        };
        let existing = self.link(name).await?;
        if let Some(link) = existing.as_ref().filter(|l| l.kind.as_ref() != Some(&want)) {
            let found = link
                .kind
                .as_ref()
                .map_or("unknown".to_string(), |k| k.to_string());
            tracing::warn!(device = name, found, want = %want, "tunnel device of another type: replaced");
            self.delete_link(link.index).await?;
        }
        if existing.is_none_or(|l| l.kind.as_ref() != Some(&want)) {
            let msg = match kind {
                TunnelType::Vxlan => LinkVxlan::new(name, 0)
                    .port(kind.default_port())
                    .collect_metadata(true)
                    .learning(false)
                    .build(),
                TunnelType::Geneve => LinkGeneve::new(name, 0)
                    .append_info_data(InfoGeneve::CollectMetadata)
                    .build(),
            };
            if let Err(e) = self.handle.link().add(msg).execute().await {
                if kind == TunnelType::Geneve && is_errno(&e, libc::EOPNOTSUPP) {
                    bail!(
                        "field `tunnelType`: geneve is not supported by this kernel (no Geneve \
                         device support); use `tunnelType: vxlan` or `trafficEncapMode: noEncap`"
                    );
                }
                return Err(anyhow!(e)).with_context(|| format!("creating tunnel device {name}"));
            }
        }
        let link = self
            .link(name)
            .await?
            .ok_or_else(|| anyhow!("tunnel device {name} vanished"))?;
        self.set_up(link.index, mtu + kind.overhead()).await?;
        Ok(link)
    }

    /// Makes the agent's routes (protocol `ROUTE_PROTOCOL`, main table) exactly `desired`.
    pub async fn sync_routes(&self, desired: &[ManagedRoute]) -> Result<()> {
        let mut current = Vec::new();
        let mut dump = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute();
        while let Some(msg) = dump.try_next().await.context("listing routes")? {
            if msg.header.protocol == RouteProtocol::Other(ROUTE_PROTOCOL) {
                current.push(msg);
            }
        }
        for msg in &current {
            if !desired.iter().any(|d| d.matches(msg)) {
                let what = format!("{:?}", ManagedRoute::from_message(msg));
                match self.handle.route().del(msg.clone()).execute().await {
                    Err(e) if is_errno(&e, libc::ESRCH) => {}
                    other => other.with_context(|| format!("deleting route {what}"))?,
                }
            }
        }
        for route in desired {
            if current.iter().any(|msg| route.matches(msg)) {
                continue;
            }
            let IpNetwork::V4(dst) = route.dst else {
                continue;
            };
            let mut builder = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(dst.network(), dst.prefix())
                .protocol(RouteProtocol::Other(ROUTE_PROTOCOL));
            if let Some(via) = route.via {
                builder = builder.gateway(via);
            }
            if let Some(oif) = route.oif {
                builder = builder.output_interface(oif);
            }
            if let Some(src) = route.src {
                builder = builder.pref_source(src);
            }
            match self.handle.route().add(builder.build()).execute().await {
                Err(e) if is_errno(&e, EEXIST) => {
                    bail!(
                        "route to {} exists and is not Sluice's: remove it",
                        route.dst
                    )
                }
                other => other.with_context(|| format!("adding route {route:?}"))?,
            }
        }
        Ok(())
    }
}

/// A route the agent owns: other nodes' pod CIDRs, via their address (noEncap) or through the
/// gateway into the datapath (encap); the Service CIDR through the gateway, from the gateway's
/// address (replies to it come back through the datapath on any node).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManagedRoute {
    pub dst: IpNetwork,
    pub via: Option<Ipv4Addr>,
    pub oif: Option<u32>,
    /// The source the node picks for it.
    pub src: Option<Ipv4Addr>,
}

impl ManagedRoute {
    fn from_message(msg: &RouteMessage) -> ManagedRoute {
        let mut route = ManagedRoute {
            dst: IpNetwork::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0).expect("0.0.0.0/0"),
            via: None,
            oif: None,
            src: None,
        };
        for attr in &msg.attributes {
            match attr {
                RouteAttribute::Destination(RouteAddress::Inet(ip)) => {
                    route.dst =
                        IpNetwork::new(IpAddr::V4(*ip), msg.header.destination_prefix_length)
                            .unwrap_or(route.dst)
                }
                RouteAttribute::Gateway(RouteAddress::Inet(ip)) => route.via = Some(*ip),
                RouteAttribute::Oif(index) => route.oif = Some(*index),
                RouteAttribute::PrefSource(RouteAddress::Inet(ip)) => route.src = Some(*ip),
                _ => {}
            }
        }
        route
    }

    fn matches(&self, msg: &RouteMessage) -> bool {
        let other = ManagedRoute::from_message(msg);
        // The kernel fills in the output interface of a route given only a gateway.
        other.dst == self.dst
            && other.via == self.via
            && (self.oif.is_none() || other.oif == self.oif)
            && other.src == self.src
    }
}

pub fn gateway_peer(name: &str) -> String {
    format!("{name}-dp")
}

#[derive(Clone, Debug)]
pub struct Gateway {
    pub ifindex: u32,
    pub mac: Mac,
    pub peer_name: String,
}

/// What the pod end of the veth gets inside the pod's namespace.
#[derive(Clone, Debug)]
pub struct PodInterface {
    pub temp_name: String,
    pub ifname: String,
    pub mac: Mac,
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
    pub mtu: u32,
}

/// Runs `f` on a thread that has entered the network namespace at `netns`.
pub fn in_netns<T: Send + 'static>(
    netns: &Path,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let file = File::open(netns)
        .with_context(|| format!("opening network namespace {}", netns.display()))?;
    let label = netns.display().to_string();
    std::thread::spawn(move || {
        nix::sched::setns(file.as_fd(), CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("entering network namespace {label}"))?;
        f()
    })
    .join()
    .map_err(|_| anyhow!("the namespace worker thread panicked"))?
}

/// Inside the pod's namespace: rename the veth end, set MAC, MTU, address, default route, and
/// bring `lo` up. IPv6 is disabled on the interface while the pod has no IPv6 address, so the
/// kernel's link-local chatter does not hit SpoofGuard.
pub fn configure_pod(netns: &Path, pod: PodInterface) -> Result<()> {
    in_netns(netns, move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async move {
            let nl = Netlink::new()?;
            let link = nl.link(&pod.temp_name).await?.ok_or_else(|| {
                anyhow!(
                    "veth end {} did not arrive in the pod namespace",
                    pod.temp_name
                )
            })?;
            let rename = LinkUnspec::new_with_index(link.index)
                .name(pod.ifname.clone())
                .address(pod.mac.0.to_vec())
                .build();
            nl.set(
                rename,
                &format!("renaming the pod interface to {}", pod.ifname),
            )
            .await?;
            disable_ipv6(&pod.ifname);
            nl.set_up(link.index, pod.mtu).await?;
            nl.add_address(link.index, IpAddr::V4(pod.ip), pod.prefix)
                .await?;
            nl.add_default_route(link.index, pod.gateway).await?;
            if let Some(lo) = nl.link("lo").await? {
                nl.set_up(lo.index, 65536).await?;
            }
            Ok(())
        })
    })
}

/// Pods have IPv4 only: without this, the kernel sends IPv6 router solicitations and MLD
/// reports out of each new interface, which the datapath can only drop (as
/// `UnknownDestination` on the gateway). In the calling thread's network namespace; a kernel
/// without IPv6 has nothing to disable.
fn disable_ipv6(ifname: &str) {
    let _ = std::fs::write(
        format!("/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6"),
        "1",
    );
}

/// The pod-side state CHECK verifies: the interface exists with the MAC and address we gave it.
pub fn inspect_pod(netns: &Path, ifname: String) -> Result<Option<LinkInfo>> {
    in_netns(netns, move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async move { Netlink::new()?.link(&ifname).await })
    })
}

pub fn write_sysctl(path: &str, value: &str) -> Result<()> {
    std::fs::write(path, value).with_context(|| format!("setting sysctl {path} = {value}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs root: the namespace is this test thread's own, gone with it.
    #[test]
    fn an_ipv4_gateway_sends_no_ipv6_of_its_own() {
        std::thread::spawn(|| {
            nix::sched::unshare(CloneFlags::CLONE_NEWNET).expect("a network namespace (root)");
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let netlink = Netlink::new().unwrap();
                let ip = IpAddr::V4(Ipv4Addr::new(10, 244, 0, 1));
                netlink.ensure_gateway("gw0", ip, 24, 1450).await.unwrap();
                for end in ["gw0", "gw0-dp"] {
                    let path = format!("/proc/sys/net/ipv6/conf/{end}/disable_ipv6");
                    let disabled = std::fs::read_to_string(&path).unwrap();
                    assert_eq!(disabled.trim(), "1", "{path}");
                }
            });
        })
        .join()
        .unwrap();
    }

    /// Needs root (CI runs as root): the namespace is this test thread's own, gone with it.
    #[test]
    fn a_tunnel_device_of_another_type_is_replaced_and_one_of_its_type_kept() {
        std::thread::spawn(|| {
            nix::sched::unshare(CloneFlags::CLONE_NEWNET).expect("a network namespace (root)");
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let netlink = Netlink::new().unwrap();
                netlink
                    .handle
                    .link()
                    .add(rtnetlink::LinkBridge::new("tun0").build())
                    .execute()
                    .await
                    .unwrap();
                let bridge = netlink.link("tun0").await.unwrap().unwrap();
                assert_eq!(bridge.kind, Some(InfoKind::Bridge));

                let tunnel = netlink
                    .ensure_tunnel("tun0", TunnelType::Vxlan, 1450)
                    .await
                    .unwrap();
                assert_eq!(tunnel.kind, Some(InfoKind::Vxlan));
                assert_ne!(tunnel.index, bridge.index, "the bridge was replaced");
                let again = netlink
                    .ensure_tunnel("tun0", TunnelType::Vxlan, 1450)
                    .await
                    .unwrap();
                assert_eq!(again.index, tunnel.index, "a device of its type is kept");
            });
        })
        .join()
        .unwrap();
    }
}
