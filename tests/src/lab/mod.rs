//! The lab's network and what its suites share: the lab namespace with the switch that links
//! the cluster's nodes and the external client (a host outside the cluster), the encapsulation
//! modes, manifests from files, the probe report and the Service probes. The cluster itself is
//! in [`crate::cluster`].

pub mod demo;
pub mod manifests;
pub mod report;
pub mod services;

use std::net::Ipv4Addr;

use anyhow::{bail, Result};

use crate::Netns;

pub const SWITCH_IP: &str = "192.168.77.254";

/// The external client's address, on the switch's subnet with the nodes (192.168.77.i).
pub const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 200);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encap {
    Vxlan,
    /// Kernels without Geneve (like the lab machine's) make the agent refuse to start.
    Geneve,
    NoEncap,
}

impl Encap {
    pub fn parse(text: &str) -> Result<Encap> {
        match text {
            "vxlan" => Ok(Encap::Vxlan),
            "geneve" => Ok(Encap::Geneve),
            "noencap" => Ok(Encap::NoEncap),
            other => bail!("--encap {other:?}: expected vxlan, geneve or noencap"),
        }
    }

    /// The agent config keys, which are also the chart's values of the same names.
    pub fn config(self) -> &'static str {
        match self {
            Encap::Vxlan => "trafficEncapMode: encap\ntunnelType: vxlan\n",
            Encap::Geneve => "trafficEncapMode: encap\ntunnelType: geneve\n",
            Encap::NoEncap => "trafficEncapMode: noEncap\n",
        }
    }
}

/// The lab namespace with the switch (the bridge `br0` at [`SWITCH_IP`]), and the external
/// client plugged into it.
pub(crate) fn switch() -> Result<(Netns, Netns)> {
    let switch = Netns::new("slab")?;
    switch.exec(&["ip", "link", "add", "br0", "type", "bridge"])?;
    switch.exec(&[
        "ip",
        "addr",
        "add",
        &format!("{SWITCH_IP}/24"),
        "dev",
        "br0",
    ])?;
    switch.exec(&["ip", "link", "set", "br0", "up"])?;
    let external = Netns::new("slx")?;
    plug(&switch, "px", &external, EXTERNAL_IP)?;
    Ok((switch, external))
}

/// Links `ns` to the switch through port `port` of the bridge, as `eth0` with `ip`/24 and a
/// default route via the switch.
pub(crate) fn plug(switch: &Netns, port: &str, ns: &Netns, ip: Ipv4Addr) -> Result<()> {
    switch.exec(&[
        "ip", "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
    ])?;
    switch.exec(&["ip", "link", "set", port, "master", "br0", "up"])?;
    ns.exec(&["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
    ns.exec(&["ip", "link", "set", "eth0", "up"])?;
    ns.exec(&["ip", "route", "add", "default", "via", SWITCH_IP])?;
    Ok(())
}
