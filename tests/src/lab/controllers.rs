//! The EndpointSlice controller of the lab, as kube-controller-manager's: one slice per Service
//! with a selector, holding the ready pods it selects.

use anyhow::{anyhow, Result};
use serde_json::{json, Value};

use crate::apiserver::ApiServer;

const MANAGED_BY: &str = "endpointslice-controller.sluice-lab";

pub(super) fn selects(selector: &serde_json::Map<String, Value>, pod: &Value) -> bool {
    selector
        .iter()
        .all(|(k, v)| pod["metadata"]["labels"][k] == *v)
}

fn ready(pod: &Value) -> bool {
    pod["status"]["podIP"].is_string()
        && pod["status"]["conditions"].as_array().is_some_and(|c| {
            c.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
}

/// A Service port's target: a number, a name looked up in the pod's containerPorts, or the port.
fn target_port(port: &Value, pod: Option<&Value>) -> Value {
    match &port["targetPort"] {
        Value::Number(n) => Value::Number(n.clone()),
        Value::String(name) => pod
            .and_then(|p| {
                p["spec"]["containers"].as_array()?.iter().find_map(|c| {
                    c["ports"]
                        .as_array()?
                        .iter()
                        .find(|cp| cp["name"] == name.as_str())
                        .map(|cp| cp["containerPort"].clone())
                })
            })
            .unwrap_or(Value::Null),
        _ => port["port"].clone(),
    }
}

pub fn sync_endpoint_slices(api: &ApiServer) -> Result<()> {
    let pods = api.list("pods", None);
    let services = api.list("services", None);
    for svc in &services {
        let Some(selector) = svc["spec"]["selector"].as_object() else {
            continue;
        };
        let ns = svc["metadata"]["namespace"].as_str().unwrap_or("default");
        let name = svc["metadata"]["name"].as_str().unwrap_or_default();
        let selected: Vec<&Value> = pods
            .iter()
            .filter(|p| p["metadata"]["namespace"] == ns && selects(selector, p) && ready(p))
            .collect();
        let endpoints: Vec<Value> = selected
            .iter()
            .map(|p| {
                json!({
                    "addresses": [p["status"]["podIP"]],
                    "conditions": {"ready": true, "serving": true, "terminating": false},
                    "nodeName": p["spec"]["nodeName"],
                    "targetRef": {"kind": "Pod", "namespace": ns, "name": p["metadata"]["name"]},
                })
            })
            .collect();
        let ports: Vec<Value> = svc["spec"]["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                json!({
                    "name": p["name"].as_str().unwrap_or(""),
                    "port": target_port(p, selected.first().copied()),
                    "protocol": p["protocol"].as_str().unwrap_or("TCP"),
                })
            })
            .collect();
        let slice_name = format!("{name}-sluice");
        let slice = json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": slice_name, "namespace": ns, "labels": {
                "kubernetes.io/service-name": name,
                "endpointslice.kubernetes.io/managed-by": MANAGED_BY,
            }},
            "addressType": "IPv4",
            "endpoints": endpoints,
            "ports": ports,
        });
        match api.get("endpointslices", Some(ns), &slice_name) {
            None => {
                api.create(slice).map_err(|e| anyhow!("{e:?}"))?;
            }
            Some(current)
                if current["endpoints"] != slice["endpoints"]
                    || current["ports"] != slice["ports"] =>
            {
                let patch = json!({"endpoints": slice["endpoints"], "ports": slice["ports"]});
                api.merge_patch("endpointslices", Some(ns), &slice_name, &patch)
                    .map_err(|e| anyhow!("{e:?}"))?;
            }
            Some(_) => {}
        }
    }
    for slice in api.list("endpointslices", None) {
        if slice["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"] != MANAGED_BY {
            continue;
        }
        let ns = slice["metadata"]["namespace"].as_str().unwrap_or("default");
        let service = slice["metadata"]["labels"]["kubernetes.io/service-name"]
            .as_str()
            .unwrap_or_default();
        if !services
            .iter()
            .any(|s| s["metadata"]["namespace"] == ns && s["metadata"]["name"] == service)
        {
            let name = slice["metadata"]["name"].as_str().unwrap_or_default();
            api.delete("endpointslices", Some(ns), name)
                .map_err(|e| anyhow!("{e:?}"))?;
        }
    }
    Ok(())
}
