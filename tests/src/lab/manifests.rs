//! Manifests: YAML files (multi-document) from directories, completed the way kubectl and the
//! scheduler would, and written through the API server.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::apiserver::ApiServer;

const CLUSTER_SCOPED: [&str; 3] = ["Namespace", "Node", "ExternalIPPool"];

/// Every object in the `.yaml`/`.yml` files of `dir`, files in name order.
pub fn load_dir(dir: &Path) -> Result<Vec<Value>> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading manifest directory {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    let mut objects = Vec::new();
    for file in files {
        objects.extend(load_file(&file)?);
    }
    Ok(objects)
}

pub fn load_file(file: &Path) -> Result<Vec<Value>> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let mut objects = Vec::new();
    for document in serde_yaml::Deserializer::from_str(&text) {
        let value =
            Value::deserialize(document).with_context(|| format!("parsing {}", file.display()))?;
        if value.is_null() {
            continue;
        }
        if !value["kind"].is_string()
            || !value["apiVersion"].is_string()
            || !value["metadata"]["name"].is_string()
        {
            bail!(
                "{}: every object needs apiVersion, kind and metadata.name",
                file.display()
            );
        }
        objects.push(value);
    }
    Ok(objects)
}

/// Defaults the API server and scheduler add: namespace `default`, the namespace-name label,
/// and a node for pods that name none (round robin from `scheduled`).
pub fn complete(obj: &mut Value, nodes: &[String], scheduled: usize) -> Result<()> {
    let kind = obj["kind"].as_str().unwrap_or_default().to_string();
    if kind == "Namespace" {
        let name = obj["metadata"]["name"].clone();
        obj["metadata"]["labels"]["kubernetes.io/metadata.name"] = name;
    } else if !CLUSTER_SCOPED.contains(&kind.as_str()) && !obj["metadata"]["namespace"].is_string()
    {
        obj["metadata"]["namespace"] = json!("default");
    }
    if kind == "Pod" && !obj["spec"]["nodeName"].is_string() {
        if nodes.is_empty() {
            bail!("no node to schedule pod {} on", obj["metadata"]["name"]);
        }
        obj["spec"]["nodeName"] = json!(nodes[scheduled % nodes.len()]);
    }
    Ok(())
}

pub fn create_or_replace(api: &ApiServer, obj: Value) -> Result<()> {
    match api.create(obj.clone()) {
        Ok(_) => Ok(()),
        Err(e) if e.code == 409 => {
            let resource = plural_of(obj["kind"].as_str().unwrap_or_default())?;
            let ns = obj["metadata"]["namespace"].as_str();
            let name = obj["metadata"]["name"].as_str().unwrap_or_default();
            let mut obj = obj.clone();
            if let Some(current) = api.get(resource, ns, name) {
                obj["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"].clone();
                if obj["status"].is_null() {
                    obj["status"] = current["status"].clone();
                }
            }
            api.replace(obj).map(|_| ()).map_err(|e| anyhow!("{e:?}"))
        }
        Err(e) => Err(anyhow!("{e:?}")),
    }
}

/// The resource (plural) of a kind the lab serves.
pub fn plural_of(kind: &str) -> Result<&'static str> {
    Ok(match kind {
        "Pod" => "pods",
        "Service" => "services",
        "Namespace" => "namespaces",
        "Node" => "nodes",
        "EndpointSlice" => "endpointslices",
        "NetworkPolicy" => "networkpolicies",
        "ExternalIPPool" => "externalippools",
        other => bail!("the lab does not serve kind {other:?}"),
    })
}
