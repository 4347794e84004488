//! The overlap check (`crate::overlap`) on this node: its pod CIDR, the other nodes' and the
//! Service CIDR against each other and the node's own networks. Run when one of the cluster's
//! networks changes and at each resync (the host's networks change outside the API's sight);
//! each new overlap is said once in the log and as a Node event; the last result is in
//! `network.json` for `sluicectl check`.

use std::sync::Arc;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::Node;
use kube::runtime::events::{Event, EventType};
use tracing::{info, warn};

use super::Follower;
use crate::{
    cni::server::TUNNEL_DEVICE,
    k8s,
    net::{gateway_peer, Netlink},
    overlap::{self, Network, NetworkReport},
};

impl Follower {
    pub(super) async fn check_overlaps(&mut self, nodes: &[Arc<Node>]) -> Result<()> {
        let pod_cidr = self.pods.lock().await.pod_cidr();
        let mut cluster = vec![Network::pod_cidr(&self.own, pod_cidr)];
        cluster.extend(
            k8s::remote_routes(nodes, &self.own)
                .iter()
                .map(|r| Network::pod_cidr(&r.node_name, r.pod_cidr)),
        );
        cluster.extend(self.settings.service_cidr.map(Network::service_cidr));
        if self.overlaps_checked.as_ref() == Some(&cluster) {
            return Ok(());
        }
        let gateway = self.settings.gateway_name.clone();
        let own_devices = vec![gateway_peer(&gateway), gateway, TUNNEL_DEVICE.to_string()];
        let host: Vec<Network> = Netlink::new()?
            .host_networks(&own_devices)
            .await?
            .iter()
            .map(|h| Network::host(&self.own, h))
            .collect();
        let found = overlap::find(&cluster, &host);
        for overlap in found.iter().filter(|o| !self.overlaps.contains(o)) {
            let text = overlap.to_string();
            warn!("overlapping networks: {text}");
            self.record_overlap(nodes, text).await;
        }
        if found.is_empty() && !self.overlaps.is_empty() {
            info!("no overlapping networks any more");
        }
        let node_pod_cidr = nodes
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(&self.own))
            .and_then(|n| k8s::pod_cidrs(n).first().copied());
        let pod_cidr_source = match (self.settings.pod_cidr, node_pod_cidr) {
            (Some(_), Some(node)) if node != pod_cidr => format!(
                "the agent config's podCIDR, which takes precedence over the Node's spec.podCIDR {node}"
            ),
            (Some(_), _) => "the agent config's podCIDR".to_string(),
            (None, _) => "the Node's spec.podCIDR".to_string(),
        };
        let report = NetworkReport {
            node: self.own.clone(),
            pod_cidr,
            pod_cidr_source,
            cluster: cluster.clone(),
            own_devices,
            overlaps: found.iter().map(ToString::to_string).collect(),
        };
        let path = self.state_dir.join("network.json");
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&report)?)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .with_context(|| format!("writing {}", path.display()))?;
        self.overlaps = found;
        self.overlaps_checked = Some(cluster);
        Ok(())
    }

    async fn record_overlap(&self, nodes: &[Arc<Node>], note: String) {
        let event = Event {
            type_: EventType::Warning,
            reason: "NetworkOverlap".into(),
            note: Some(note),
            action: "CheckNetworks".into(),
            secondary: None,
        };
        self.publish_on_node(nodes, event).await;
    }
}
