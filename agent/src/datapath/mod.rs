//! The `Datapath` trait: what a backend must realize of the desired pipeline. The backend never
//! talks to Kubernetes or the CNI; it is handed plain data.

pub mod ebpf;

use std::{collections::BTreeMap, net::Ipv4Addr};

use anyhow::Result;
use sluice_common::{ExternalIp, IpKey};

use crate::{
    model::{policy::PolicyTables, service::ServiceTables, Pipeline},
    net::Gateway,
};

/// The node-level devices the datapath hangs off.
#[derive(Clone, Debug)]
pub struct NodeWiring {
    pub gateway: Gateway,
    /// The gateway's address: the source of Service traffic SNATed to come back through this
    /// node.
    pub gateway_ip: Ipv4Addr,
    /// The tunnel device (encap mode): name and ifindex.
    pub tunnel: Option<(String, u32)>,
}

pub trait Datapath: Send {
    /// Node-level wiring: where packets for the node go, the tunnel, and their own programs.
    fn install_node(&mut self, wiring: &NodeWiring) -> Result<()>;
    /// Starts processing the packets a pod sends on its port (the host end of its veth).
    /// Attaching again to a port that already has the program replaces it in place.
    fn attach_port(&mut self, host_ifname: &str) -> Result<()>;
    /// Stops processing the port. Safe on a port that is already gone.
    fn detach_port(&mut self, host_ifname: &str) -> Result<()>;
    /// Makes the datapath's entries equal to `desired`, touching only entries that differ.
    fn sync(&mut self, desired: &Pipeline) -> Result<SyncReport>;
    /// The entries the datapath holds now.
    fn current(&self) -> Result<Pipeline>;
    /// Makes the NetworkPolicy entries equal to `desired`, touching only what differs.
    fn sync_policy(&mut self, desired: &PolicyTables) -> Result<SyncReport>;
    /// The NetworkPolicy entries the datapath holds now (numbers a restarted agent keeps).
    fn current_policy(&self) -> Result<PolicyTables>;
    /// Isolates a new pod's addresses in both directions, allowing nothing, until the next
    /// `sync_policy` gives them their policies (`POLICY_PENDING`).
    fn isolate_pending(&mut self, addrs: &[IpKey]) -> Result<()>;
    /// Whether the isolation a previous agent programmed is gone (its maps could not be
    /// adopted): until the next `sync_policy`, every pod must be isolated pending.
    fn isolation_lost(&self) -> bool;
    /// Starts processing what arrives on the node's uplink: Services from outside the cluster.
    fn attach_uplink(&mut self, ifname: &str) -> Result<()>;
    /// Makes the Service frontends and backends equal to `desired`; connections whose frontend
    /// went away or whose endpoint it no longer balances to are forgotten.
    fn sync_services(&mut self, desired: &ServiceTables) -> Result<SyncReport>;
    /// The LoadBalancer IPs this node answers ARP for, with the MAC it answers with.
    fn sync_external_ips(&mut self, owned: &BTreeMap<IpKey, ExternalIp>) -> Result<()>;
}

/// What a sync changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub written: usize,
    pub deleted: usize,
}
