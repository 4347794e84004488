//! Pods as the agent keeps them. It watches every pod of the cluster (NetworkPolicy peers live
//! on any node) and reads of each only what policy is compiled from; the rest of a pod — its
//! containers' images, env, resources and volumes, its status conditions and container
//! statuses — is most of its size, and k8s-openapi's `Pod` holds every field inline (2.4 KiB,
//! and 2.3 KiB per container, before any string): 30,000 of them would be hundreds of MiB. So
//! serde skips, at decoding, what is not named here.

use k8s_openapi::{
    api::core::v1::{ContainerPort, PodIP},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
    NamespaceResourceScope,
};
use serde::{Deserialize, Serialize};

/// `v1` Pod, read-only: the name, namespace, uid, resourceVersion and labels; the node, host
/// networking, and the containers' (and sidecars') names and ports; the phase and addresses.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
pub struct Pod {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spec: Option<PodSpec>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<PodStatus>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_network: Option<bool>,
    #[serde(default)]
    pub containers: Vec<Container>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init_containers: Option<Vec<Container>>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    #[serde(default)]
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<ContainerPort>>,
    /// `Always` on an init container: a sidecar, which serves like any container.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restart_policy: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(rename = "podIP", skip_serializing_if = "Option::is_none")]
    pub pod_ip: Option<String>,
    #[serde(rename = "podIPs", skip_serializing_if = "Option::is_none")]
    pub pod_ips: Option<Vec<PodIP>>,
}

impl k8s_openapi::Resource for Pod {
    const API_VERSION: &'static str = "v1";
    const GROUP: &'static str = "";
    const KIND: &'static str = "Pod";
    const VERSION: &'static str = "v1";
    const URL_PATH_SEGMENT: &'static str = "pods";
    type Scope = NamespaceResourceScope;
}

impl k8s_openapi::Metadata for Pod {
    type Ty = ObjectMeta;

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// Drops the metadata the compiler never reads (ObjectMeta is k8s-openapi's, so its decoding
/// keeps them until here).
pub fn trim(pod: &mut Pod) {
    let meta = &mut pod.metadata;
    meta.annotations = None;
    meta.owner_references = None;
    meta.finalizers = None;
    meta.generate_name = None;
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_trimmed_pod_keeps_what_policy_reads() {
        let mut pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "web-1", "namespace": "prod", "uid": "u1", "resourceVersion": "42",
                "labels": {"app": "web"}, "annotations": {"big": "x".repeat(4096)},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web", "uid": "r"}]},
            "spec": {"nodeName": "node-2", "hostNetwork": false,
                "containers": [{"name": "app", "image": "web:1",
                    "ports": [{"name": "http", "containerPort": 8080}],
                    "env": [{"name": "A", "value": "b"}],
                    "resources": {"requests": {"cpu": "1"}}}],
                "initContainers": [{"name": "proxy", "image": "proxy:1", "restartPolicy": "Always",
                    "ports": [{"name": "admin", "containerPort": 9901}]}],
                "volumes": [{"name": "v", "emptyDir": {}}]},
            "status": {"phase": "Running", "podIP": "10.244.1.5", "podIPs": [{"ip": "10.244.1.5"}],
                "hostIP": "192.168.77.2", "conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .unwrap();
        trim(&mut pod);
        assert_eq!(
            serde_json::to_value(&pod).unwrap(),
            json!({
                "metadata": {"name": "web-1", "namespace": "prod", "uid": "u1",
                    "resourceVersion": "42", "labels": {"app": "web"}},
                "spec": {"nodeName": "node-2", "hostNetwork": false,
                    "containers": [{"name": "app", "ports": [{"name": "http", "containerPort": 8080}]}],
                    "initContainers": [{"name": "proxy", "restartPolicy": "Always",
                        "ports": [{"name": "admin", "containerPort": 9901}]}]},
                "status": {"phase": "Running", "podIP": "10.244.1.5",
                    "podIPs": [{"ip": "10.244.1.5"}]}
            })
        );
    }
}
