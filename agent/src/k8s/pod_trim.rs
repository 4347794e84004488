//! What of a Pod the agent keeps. It watches every pod of the cluster (NetworkPolicy peers live
//! on any node) and reads of each only what policy is compiled from; the rest of a pod — its
//! containers' images, env, resources and volumes, its status conditions and container
//! statuses, its annotations — is most of its size, and 30,000 pods of it would be hundreds of
//! MiB.

use k8s_openapi::api::core::v1::{Container, Pod, PodSpec, PodStatus};

/// Keeps the name, namespace, uid, resourceVersion and labels; the node, host networking, and
/// the containers' (and sidecars') names and ports; the phase and addresses.
pub fn trim(pod: &mut Pod) {
    let meta = &mut pod.metadata;
    meta.annotations = None;
    meta.owner_references = None;
    meta.finalizers = None;
    meta.generate_name = None;
    pod.spec = pod.spec.take().map(|spec| PodSpec {
        node_name: spec.node_name,
        host_network: spec.host_network,
        containers: spec.containers.into_iter().map(ports_of).collect(),
        init_containers: spec.init_containers.map(|init| {
            init.into_iter()
                .map(|c| Container {
                    restart_policy: c.restart_policy.clone(),
                    ..ports_of(c)
                })
                .collect()
        }),
        ..PodSpec::default()
    });
    pod.status = pod.status.take().map(|status| PodStatus {
        phase: status.phase,
        pod_ip: status.pod_ip,
        pod_ips: status.pod_ips,
        ..PodStatus::default()
    });
}

fn ports_of(container: Container) -> Container {
    Container {
        name: container.name,
        ports: container.ports,
        ..Container::default()
    }
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
                "apiVersion": "v1", "kind": "Pod",
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
