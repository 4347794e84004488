//! The Service parts of a round: the Service tables with their health-check node ports, and
//! ServiceExternalIP.

use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use anyhow::Result;
use k8s_openapi::api::core::v1::Node;
use sluice_common::{ExternalIp, IpKey};
use tracing::{info, warn};

use super::Follower;
use crate::{
    external_ip,
    model::service::{self, ServiceInputs},
};

impl Follower {
    /// Services: compiled, synced, health-check ports served.
    pub(super) async fn program_services(&mut self, node_addresses: &[IpAddr]) -> Result<()> {
        // Compiled from references into the watch stores: copying 10,000 Services and their
        // slices on every change would double the agent's memory.
        let service_store = self.cluster.services.state();
        let slice_store = self.cluster.endpoint_slices.state();
        let services: Vec<_> = service_store.iter().map(AsRef::as_ref).collect();
        let slices: Vec<_> = slice_store.iter().map(AsRef::as_ref).collect();
        let node_ports = self.settings.node_port_addresses(node_addresses);
        // Off the async workers, with the pod network unlocked: 10,000 Services take a while.
        let tables = tokio::task::block_in_place(|| {
            service::compile(
                &ServiceInputs {
                    services: &services,
                    slices: &slices,
                    node_name: &self.own,
                    node_port_addresses: &node_ports,
                },
                &mut self.sets,
            )
        });
        if tables.errors != self.service_errors {
            for error in &tables.errors {
                warn!("{error}: that part of the Service is not programmed until fixed");
            }
            self.service_errors = tables.errors.clone();
        }
        {
            let mut pods = self.pods.lock().await;
            tokio::task::block_in_place(|| pods.set_services(&tables))?;
        }
        for error in self.health_checks.update(&tables.health_checks).await {
            warn!("{error:#}");
        }
        self.names.set_services(tables.names);
        Ok(())
    }

    /// ServiceExternalIP: of the LoadBalancer IPs sluice-controller hands out from the pools,
    /// the ones this node owns, answered for on its uplink and announced when they arrive.
    pub(super) async fn external_ips(&mut self, nodes: &[Arc<Node>]) -> Result<()> {
        let Some(pools) = &self.cluster.external_ip_pools else {
            return Ok(());
        };
        let pools = pools.state();
        let services = self.cluster.services.state();
        let plan = external_ip::plan(
            pools.iter().map(|p| p.as_ref()),
            services.iter().map(|s| s.as_ref()),
            nodes.iter().map(|n| n.as_ref()),
            external_ip::Role::Node(&self.own),
        );
        if plan.errors != self.external_ip_errors {
            for error in &plan.errors {
                warn!("{error}");
            }
            self.external_ip_errors = plan.errors.clone();
        }
        let Some((uplink, mac)) = &self.uplink else {
            return Ok(());
        };
        let entries: BTreeMap<IpKey, ExternalIp> = plan
            .owned
            .iter()
            .filter_map(|ip| match ip {
                IpAddr::V4(v4) => Some((
                    IpKey::v4(v4.octets()),
                    ExternalIp {
                        mac: mac.0,
                        _pad: [0; 2],
                    },
                )),
                IpAddr::V6(_) => None,
            })
            .collect();
        self.pods.lock().await.set_external_ips(&entries)?;
        for ip in plan.owned.difference(&self.owned) {
            info!(%ip, "ServiceExternalIP: this node now answers for the address");
            if let IpAddr::V4(v4) = ip {
                if let Err(e) = external_ip::announce(uplink, *v4) {
                    warn!("announcing {ip}: {e:#}");
                }
            }
        }
        self.owned = plan.owned;
        Ok(())
    }
}
