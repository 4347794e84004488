//! ServiceExternalIP's allocation: the controller plans on the pools, Services and Nodes
//! (`external_ip::plan` as [`Role::Controller`]) and writes Service and pool statuses. It runs
//! only while this replica holds the Lease, so there is one writer; the agents read the
//! statuses and answer for the IPs their node owns.

use std::{sync::Arc, time::Duration};

use anyhow::Result;
use k8s_openapi::api::core::v1::{Node, Service};
use kube::{api::DynamicObject, Api, Client};
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::{
    external_ip::{self, pool_resource, Role},
    k8s,
};

/// How soon failed writes are tried again when nothing else changes.
const RETRY: Duration = Duration::from_secs(5);

pub async fn run(client: Client) -> Result<()> {
    let changed = Arc::new(Notify::new());
    let pools = k8s::follow(
        Api::<DynamicObject>::all_with(client.clone(), &pool_resource()),
        pool_resource(),
        changed.clone(),
    );
    let services = k8s::follow(Api::<Service>::all(client.clone()), (), changed.clone());
    let nodes = k8s::follow(Api::<Node>::all(client.clone()), (), changed.clone());
    // A plan on a partial list would release the IPs of Services not listed yet.
    pools.wait_until_ready().await?;
    services.wait_until_ready().await?;
    nodes.wait_until_ready().await?;
    info!("ServiceExternalIP: allocating LoadBalancer IPs from ExternalIPPools");
    let mut errors = Vec::new();
    loop {
        let (pools, services, nodes) = (pools.state(), services.state(), nodes.state());
        let plan = external_ip::plan(
            pools.iter().map(|p| p.as_ref()),
            services.iter().map(|s| s.as_ref()),
            nodes.iter().map(|n| n.as_ref()),
            Role::Controller,
        );
        if plan.errors != errors {
            for error in &plan.errors {
                warn!("{error}");
            }
            errors = plan.errors;
        }
        let retry = match external_ip::apply_writes(&client, &plan.writes).await {
            Ok(()) => None,
            Err(e) => {
                warn!("ServiceExternalIP: {e}");
                Some(RETRY)
            }
        };
        for write in &plan.writes {
            info!("ServiceExternalIP: {write}");
        }
        // The writes come back through the watches and wake the next plan, which finds
        // nothing more to write once the stores hold them.
        match retry {
            Some(after) => {
                let _ = tokio::time::timeout(after, changed.notified()).await;
            }
            None => changed.notified().await,
        }
    }
}
