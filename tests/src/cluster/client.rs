//! kube-rs as the cluster admin, from this process: for what a `kubectl` process per request
//! would blur or slow down (timings from a write to its effect, thousands of writes).

use std::fmt::Debug;

use anyhow::{Context, Result};
use futures::{stream, StreamExt, TryStreamExt};
use kube::{
    api::{DeleteParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
    Api, Client,
};
use serde::{de::DeserializeOwned, Serialize};

use super::{api_proxy::ApiProxy, Cluster};

/// A client with a runtime of its own, so that synchronous tests and benchmarks can call it.
/// Its requests go through a relay to the API server (`ApiProxy`), which lives as long as it.
pub struct AdminClient {
    pub client: Client,
    runtime: tokio::runtime::Runtime,
    _proxy: ApiProxy,
}

impl Cluster {
    pub fn admin_client(&self) -> Result<AdminClient> {
        let (proxy, kubeconfig) = self.host_access()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let client = runtime.block_on(async {
            let config = kube::Config::from_custom_kubeconfig(
                Kubeconfig::from_yaml(&kubeconfig)?,
                &KubeConfigOptions::default(),
            )
            .await?;
            anyhow::Ok(Client::try_from(config)?)
        })?;
        Ok(AdminClient {
            client,
            runtime,
            _proxy: proxy,
        })
    }
}

impl AdminClient {
    pub fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }

    /// Creates `object` through `api`; the object as stored.
    pub fn create<K>(&self, api: &Api<K>, object: &K) -> Result<K>
    where
        K: Clone + DeserializeOwned + Serialize + Debug,
    {
        self.block_on(api.create(&PostParams::default(), object))
            .context("create")
    }

    /// Creates `objects` through `api`, `in_flight` requests at a time; the objects as stored,
    /// in no particular order.
    pub fn create_all<K>(&self, api: &Api<K>, objects: Vec<K>, in_flight: usize) -> Result<Vec<K>>
    where
        K: Clone + DeserializeOwned + Serialize + Debug,
    {
        self.block_on(
            stream::iter(objects)
                .map(|object| async move { api.create(&PostParams::default(), &object).await })
                .buffer_unordered(in_flight)
                .try_collect(),
        )
        .context("create")
    }

    pub fn delete<K>(&self, api: &Api<K>, name: &str) -> Result<()>
    where
        K: Clone + DeserializeOwned + Debug,
    {
        self.block_on(api.delete(name, &DeleteParams::default()))
            .with_context(|| format!("delete {name}"))?;
        Ok(())
    }
}
