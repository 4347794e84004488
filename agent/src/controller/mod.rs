//! `sluice-controller`: what is decided once for the whole cluster rather than on each node:
//! NodeIPAM (podCIDRs for Nodes, `node_ipam`) and ServiceExternalIP's allocation
//! (`external_ips`), done by one replica at a time under a Lease (`lease`); the other replicas
//! stand by.

pub mod config;
pub mod external_ips;
pub mod lease;
pub mod node_ipam;
pub mod nodes;

use std::time::Duration;

use anyhow::Result;
use k8s_openapi::api::{coordination::v1::Lease, core::v1::Node};
use kube::{Api, Client};
use tracing::{info, warn};

use crate::k8s::EventSink;

use self::{
    config::NodeIpamSettings,
    lease::{Elector, Timing},
    nodes::NodeIpamController,
};

pub struct Setup {
    pub client: Client,
    pub lease_namespace: String,
    pub lease_name: String,
    pub identity: String,
    pub lease_duration: Duration,
    /// `None`: NodeIPAM is off.
    pub node_ipam: Option<NodeIpamSettings>,
    /// The ServiceExternalIP feature gate.
    pub external_ips: bool,
}

/// Leads when it can, works while it leads, and gives the Lease up when `shutdown` completes.
pub async fn run(setup: Setup, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
    let mut elector = Elector::new(
        Api::<Lease>::namespaced(setup.client.clone(), &setup.lease_namespace),
        &setup.lease_name,
        &setup.identity,
        Timing::from_duration(setup.lease_duration),
    );
    let events = EventSink::new(setup.client.clone(), "sluice-controller", &setup.identity);
    if setup.node_ipam.is_none() {
        info!("NodeIPAM is off (nodeIPAM.enableNodeIPAM, featureGates.NodeIPAM): Nodes keep the podCIDRs their platform gives them");
    }
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = elector.acquire() => {}
            _ = &mut shutdown => return Ok(()),
        }
        let node_ipam = async {
            match &setup.node_ipam {
                Some(settings) => {
                    let nodes = Api::<Node>::all(setup.client.clone());
                    NodeIpamController::new(nodes, settings.clone(), events.clone())
                        .run()
                        .await
                }
                None => std::future::pending().await,
            }
        };
        let external_ips = async {
            match setup.external_ips {
                true => external_ips::run(setup.client.clone()).await,
                false => std::future::pending().await,
            }
        };
        // Either ending (an error) ends the term: leading is taken up again from scratch.
        let work = async {
            tokio::select! {
                result = node_ipam => result,
                result = external_ips => result,
            }
        };
        tokio::select! {
            result = work => {
                if let Err(e) = result {
                    warn!("stopped: {e:#}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            _ = elector.hold() => warn!("no longer leading: standing by"),
            _ = &mut shutdown => {
                elector.release().await;
                return Ok(());
            }
        }
    }
}
