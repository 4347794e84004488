//! The `Datapath` trait: what a backend must realize of the desired pipeline. The backend never
//! talks to Kubernetes or the CNI; it is handed plain data.

pub mod ebpf;

use anyhow::Result;

use crate::{
    model::{policy::PolicyTables, Pipeline},
    net::Gateway,
};

/// The node-level devices the datapath hangs off.
#[derive(Clone, Debug)]
pub struct NodeWiring {
    pub gateway: Gateway,
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
}

/// What a sync changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub written: usize,
    pub deleted: usize,
}
