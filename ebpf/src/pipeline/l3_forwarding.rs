//! L3Forwarding: where the destination lives. A local pod by exact address; in encap mode,
//! another node by the longest pod-CIDR prefix; otherwise the node itself (its routes decide).

use aya_ebpf::maps::lpm_trie::Key;
use sluice_common::{Endpoint, NodeConfig, RemoteNode, Stage, IP_KEY_PREFIX_BITS};

use super::classifier::IpMeta;
use crate::{ENDPOINTS, REMOTE_NODES};

pub enum Next {
    LocalPod(Endpoint),
    RemoteNode(RemoteNode),
    Node,
}

#[inline(always)]
pub fn lookup(meta: &IpMeta, node: &NodeConfig) -> Next {
    super::passed(Stage::L3Forwarding);
    if let Some(endpoint) = ENDPOINTS.get_ptr(meta.dst) {
        // SAFETY: the value is copied out right away.
        return Next::LocalPod(unsafe { *endpoint });
    }
    if node.tunnel_ifindex != 0 {
        let key = Key::new(IP_KEY_PREFIX_BITS + 128, meta.dst);
        if let Some(remote) = REMOTE_NODES.get(&key) {
            return Next::RemoteNode(*remote);
        }
    }
    Next::Node
}
