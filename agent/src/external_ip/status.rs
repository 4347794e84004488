//! Writes what [`super::plan`] decided: JSON merge patches on `/status` subresources.

use std::fmt;

use k8s_openapi::api::core::v1::Service;
use kube::{
    api::{Api, DynamicObject, Patch, PatchParams},
    Client,
};
use serde_json::{json, Value};

use super::{pool_resource, StatusWrite};

/// A write the API server refused.
#[derive(Debug)]
pub struct WriteError {
    pub write: StatusWrite,
    pub source: kube::Error,
}

impl std::error::Error for WriteError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

impl fmt::Display for WriteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "writing {}: {}", self.write, self.source)?;
        if matches!(&self.source, kube::Error::Api(s) if s.code == 403) {
            let what = match self.write {
                StatusWrite::Service { .. } => "services/status",
                StatusWrite::PoolUsage { .. } => "externalippools/status (crd.antrea.io)",
            };
            write!(
                f,
                " (sluice-controller's ClusterRole needs `patch` on {what})"
            )?;
        }
        Ok(())
    }
}

/// Every write that failed; the others were made.
#[derive(Debug)]
pub struct WriteErrors(pub Vec<WriteError>);

impl std::error::Error for WriteErrors {}

impl fmt::Display for WriteErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let all: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        write!(
            f,
            "{} status write(s) failed: {}",
            self.0.len(),
            all.join("; ")
        )
    }
}

/// Makes `writes` in order. Every write is tried; a failed one is reported and made again by the
/// next plan, which still finds it needed. A write to an object that is gone is not an error: its
/// deletion already released what the write would have.
pub async fn apply_writes(client: &Client, writes: &[StatusWrite]) -> Result<(), WriteErrors> {
    let params = PatchParams {
        field_manager: Some("sluice-controller".into()),
        ..PatchParams::default()
    };
    let mut failed = Vec::new();
    for write in writes {
        let result = match write {
            StatusWrite::Service {
                namespace,
                name,
                ingress,
            } => {
                // Merge patch: `null` removes the list, a list replaces it whole.
                let ingress = if ingress.is_empty() {
                    Value::Null
                } else {
                    json!(ingress)
                };
                let patch = json!({"status": {"loadBalancer": {"ingress": ingress}}});
                Api::<Service>::namespaced(client.clone(), namespace)
                    .patch_status(name, &params, &Patch::Merge(&patch))
                    .await
                    .map(drop)
            }
            StatusWrite::PoolUsage { pool, usage } => {
                let patch = json!({"status": {"usage": usage}});
                Api::<DynamicObject>::all_with(client.clone(), &pool_resource())
                    .patch_status(pool, &params, &Patch::Merge(&patch))
                    .await
                    .map(drop)
            }
        };
        match result {
            Ok(()) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(source) => failed.push(WriteError {
                write: write.clone(),
                source,
            }),
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(WriteErrors(failed))
    }
}
