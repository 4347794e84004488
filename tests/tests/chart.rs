//! The Helm chart `deploy/chart/sluice`, through the real helm (v4) and the Kubernetes schemas
//! (kubernetes-validate): every values file in its `ci/` lints, renders and validates; the
//! configs it renders are accepted by the agent's and the controller's own validation; invalid
//! values fail naming their key; Antrea keys Sluice does not implement are named in the notes;
//! the RBAC it grants is exactly what `k8s::access` says the code uses.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use serde_yaml::Value;
use sluice_agent::{
    config::Config,
    controller::config::ControllerConfig,
    k8s::access::{self, Access},
};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn chart() -> PathBuf {
    root().join("deploy/chart/sluice")
}

/// Runs helm; stdout on success, stderr on failure.
fn helm(args: &[&str]) -> Result<String, String> {
    let helm = root().join("target/tools/bin/helm");
    assert!(
        helm.exists(),
        "{} is missing: run `cargo xtask setup`",
        helm.display()
    );
    let out = Command::new(helm)
        .args(args)
        .output()
        .expect("running helm");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn values_files() -> Vec<Option<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(chart().join("ci"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    std::iter::once(None)
        .chain(files.into_iter().map(Some))
        .collect()
}

fn with_values<'a>(args: &[&'a str], values: &'a Option<PathBuf>) -> Vec<&'a str> {
    let mut all = args.to_vec();
    if let Some(file) = values {
        all.extend(["-f", file.to_str().unwrap()]);
    }
    all
}

fn render(values: &Option<PathBuf>, extra: &[&str]) -> Result<Vec<Value>, String> {
    let chart = chart();
    let mut args = vec![
        "template",
        "sluice",
        chart.to_str().unwrap(),
        "--namespace",
        "kube-system",
        "--include-crds",
    ];
    args.extend(extra);
    let text = helm(&with_values(&args, values))?;
    Ok(serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde::Deserialize::deserialize(doc).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect())
}

fn object<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} rendered"))
}

fn config_file<'a>(objects: &'a [Value], file: &str) -> &'a str {
    object(objects, "ConfigMap", "sluice-config")["data"][file]
        .as_str()
        .unwrap_or_else(|| panic!("no {file} in the ConfigMap"))
}

#[test]
fn every_values_file_lints_renders_validates_and_configures_the_binaries() {
    let validate = root().join("target/tools/python");
    for values in values_files() {
        let name = values
            .as_ref()
            .map_or("defaults".into(), |p| p.display().to_string());
        let chart = chart();
        helm(&with_values(
            &["lint", "--strict", chart.to_str().unwrap()],
            &values,
        ))
        .unwrap_or_else(|e| panic!("{name}: helm lint: {e}"));
        let objects = render(&values, &[]).unwrap_or_else(|e| panic!("{name}: {e}"));

        // The Kubernetes schemas, strictly: unknown fields are errors.
        let file = std::env::temp_dir().join(format!("sluice-chart-{}.yaml", std::process::id()));
        let yaml: Vec<String> = objects
            .iter()
            .map(|o| serde_yaml::to_string(o).unwrap())
            .collect();
        std::fs::write(&file, yaml.join("---\n")).unwrap();
        let out = Command::new("python3")
            .args([
                "-m",
                "kubernetes_validate",
                "--strict",
                "--quiet",
                "-k",
                "1.34.0",
            ])
            .arg(&file)
            .env("PYTHONPATH", &validate)
            .output()
            .expect("running kubernetes-validate");
        let _ = std::fs::remove_file(&file);
        assert!(
            out.status.success(),
            "{name}: kubernetes-validate: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );

        // What the chart writes, the binaries accept.
        let agent = Config::parse(config_file(&objects, "agent.yaml"))
            .and_then(|c| c.validate(Some("node-1".into())))
            .unwrap_or_else(|e| panic!("{name}: agent.yaml: {e}"));
        let controller = ControllerConfig::parse(config_file(&objects, "controller.yaml"))
            .unwrap_or_else(|e| panic!("{name}: controller.yaml: {e}"));
        controller
            .node_ipam()
            .unwrap_or_else(|e| panic!("{name}: controller.yaml: {e}"));
        controller.lease_duration().unwrap();
        let conflist: serde_json::Value =
            serde_json::from_str(config_file(&objects, "10-sluice.conflist")).unwrap();
        assert_eq!(conflist["plugins"][0]["type"], "sluice-cni", "{name}");
        assert!(agent.kubernetes.is_some());
    }
}

#[test]
fn the_antrea_pack_values_configure_sluice_as_they_configure_antrea() {
    let values = Some(chart().join("ci/antrea-pack-values.yaml"));
    let objects = render(&values, &[]).unwrap();
    let controller = ControllerConfig::parse(config_file(&objects, "controller.yaml")).unwrap();
    let ipam = controller.node_ipam().unwrap().expect("NodeIPAM on");
    assert_eq!(
        ipam.cluster_cidrs,
        vec![("10.244.0.0/16".parse().unwrap(), 24)]
    );
    assert_eq!(ipam.service_cidrs, vec!["10.96.0.0/12".parse().unwrap()]);
    let agent = Config::parse(config_file(&objects, "agent.yaml"))
        .unwrap()
        .validate(Some("node-1".into()))
        .unwrap();
    assert_eq!(agent.gateway_name, "antrea-gw0");
    assert_eq!(agent.service_cidr, Some("10.96.0.0/12".parse().unwrap()));
    assert_eq!(
        agent.node_port_addresses,
        vec!["192.168.0.0/16".parse().unwrap()]
    );
    assert!(agent.feature_gates.service_external_ip);

    let ds = object(&objects, "DaemonSet", "sluice-agent");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    for effect in ["NoSchedule", "NoExecute"] {
        assert!(
            pod["tolerations"]
                .as_sequence()
                .unwrap()
                .iter()
                .any(|t| t["effect"] == effect && t["operator"] == "Exists" && t["key"].is_null()),
            "every {effect} taint is tolerated"
        );
    }
    let agent_container = &pod["containers"][0];
    assert_eq!(agent_container["securityContext"]["privileged"], true);
    assert_eq!(
        agent_container["image"],
        "registry.example.com/sluice:0.1.0"
    );
    let env = agent_container["env"].as_sequence().unwrap();
    let var = |name: &str| env.iter().find(|e| e["name"] == name).cloned();
    assert_eq!(
        var("NODE_NAME").unwrap()["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
    assert_eq!(
        var("KUBERNETES_SERVICE_HOST").unwrap()["value"],
        "10.0.0.10"
    );
    assert_eq!(var("KUBERNETES_SERVICE_PORT").unwrap()["value"], "6443");
    assert_eq!(
        agent_container["readinessProbe"]["httpGet"]["path"],
        "/readyz"
    );
    assert_eq!(
        agent_container["livenessProbe"]["httpGet"]["path"],
        "/healthz"
    );
    assert_eq!(pod["initContainers"][0]["name"], "install-cni");
    let mounts: BTreeSet<&str> = agent_container["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|m| m["mountPath"].as_str().unwrap())
        .collect();
    for path in [
        "/sys/fs/bpf",
        "/var/lib/sluice",
        "/var/run/sluice",
        "/var/run/netns",
    ] {
        assert!(mounts.contains(path), "the agent mounts {path}");
    }
}

#[test]
fn the_api_server_override_becomes_the_in_cluster_address() {
    for (url, host, port) in [
        ("https://10.0.0.10:6443", "10.0.0.10", "6443"),
        ("https://api.example.com", "api.example.com", "443"),
        ("https://[fd00::10]:6443", "fd00::10", "6443"),
    ] {
        let set = format!("kubeAPIServerOverride={url}");
        let objects = render(&None, &["--set", &set]).unwrap();
        for (kind, name) in [
            ("DaemonSet", "sluice-agent"),
            ("Deployment", "sluice-controller"),
        ] {
            let env = object(&objects, kind, name)["spec"]["template"]["spec"]["containers"][0]
                ["env"]
                .as_sequence()
                .unwrap()
                .clone();
            let var = |n: &str| env.iter().find(|e| e["name"] == n).unwrap()["value"].clone();
            assert_eq!(var("KUBERNETES_SERVICE_HOST"), host, "{url} {kind}");
            assert_eq!(var("KUBERNETES_SERVICE_PORT"), port, "{url} {kind}");
        }
    }
}

#[test]
fn component_image_keys_win_over_image() {
    let values = Some(chart().join("ci/antrea-1.15-images-values.yaml"));
    let objects = render(&values, &[]).unwrap();
    let agent = &object(&objects, "DaemonSet", "sluice-agent")["spec"]["template"]["spec"];
    assert_eq!(
        agent["containers"][0]["image"],
        "registry.example.com/sluice-agent:1.2.3"
    );
    assert_eq!(agent["containers"][0]["imagePullPolicy"], "Always");
    let controller =
        &object(&objects, "Deployment", "sluice-controller")["spec"]["template"]["spec"];
    assert_eq!(
        controller["containers"][0]["image"],
        "registry.example.com/sluice-controller:0.1.0"
    );
}

/// The controller runs on the host network, so its health port is the node's: the scheduler must
/// know (a hostPort), or a second replica lands beside the first and crash-loops on a taken port;
/// and a rollout must free the port before the new replica starts.
#[test]
fn controller_replicas_never_share_a_node() {
    let objects = render(
        &None,
        &[
            "--set",
            "controller.replicas=2",
            "--set",
            "controller.healthPort=9500",
        ],
    )
    .unwrap();
    let deployment = object(&objects, "Deployment", "sluice-controller");
    let spec = &deployment["spec"]["template"]["spec"];
    assert_eq!(spec["hostNetwork"], true);
    let ports = spec["containers"][0]["ports"].as_sequence().expect("ports");
    assert!(
        ports
            .iter()
            .any(|p| p["hostPort"] == 9500 && p["containerPort"] == 9500),
        "{ports:?}"
    );
    let rolling = &deployment["spec"]["strategy"]["rollingUpdate"];
    assert_eq!(rolling["maxSurge"], 0, "{rolling:?}");
}

#[test]
fn the_agent_gets_the_host_cgroup_its_config_names() {
    let cgroup = |extra: &[&str]| {
        let objects = render(&None, extra).unwrap();
        let config = Config::parse(config_file(&objects, "agent.yaml")).unwrap();
        let spec = &object(&objects, "DaemonSet", "sluice-agent")["spec"]["template"]["spec"];
        let volume = spec["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "host-cgroup")
            .map(|v| v["hostPath"]["path"].clone());
        let mount = spec["containers"][0]["volumeMounts"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "host-cgroup")
            .map(|m| m["mountPath"].as_str().unwrap().to_string());
        (config.cgroup_dir, volume, mount)
    };
    let (dir, volume, mount) = cgroup(&[]);
    assert_eq!(volume.unwrap(), "/sys/fs/cgroup");
    assert_eq!(dir.unwrap().display().to_string(), mount.unwrap());
    assert_eq!(
        cgroup(&["--set", "agent.hostCgroupRoot="]),
        (None, None, None)
    );
}

#[test]
fn a_config_change_rolls_the_agents() {
    let checksum = |extra: &[&str]| {
        let objects = render(&None, extra).unwrap();
        object(&objects, "DaemonSet", "sluice-agent")["spec"]["template"]["metadata"]["annotations"]
            ["checksum/config"]
            .clone()
    };
    assert_eq!(checksum(&[]), checksum(&[]));
    assert_ne!(checksum(&[]), checksum(&["--set", "noSNAT=true"]));
}

#[test]
fn invalid_values_fail_at_install_naming_the_key() {
    let enabled = "nodeIPAM.enable=true";
    let cases: &[(&[&str], &str)] = &[
        (
            &[enabled, "nodeIPAM.clusterCIDRs={10.0.0.0/16,10.1.0.0/16}"],
            "nodeIPAM.clusterCIDRs",
        ),
        (
            &["nodeIPAM.nodeCIDRMaskSizeIPv4=31"],
            "/nodeIPAM/nodeCIDRMaskSizeIPv4",
        ),
        (
            &["nodeIPAM.nodeCIDRMaskSizeIPv6=127"],
            "/nodeIPAM/nodeCIDRMaskSizeIPv6",
        ),
        (
            &[enabled, "nodeIPAM.clusterCIDRs={10.0.0.0/26}"],
            "nodeIPAM.nodeCIDRMaskSizeIPv4",
        ),
        (
            &[enabled, "nodeIPAM.clusterCIDRs={fd00::/40}"],
            "nodeIPAM.nodeCIDRMaskSizeIPv6",
        ),
        (
            &[enabled, "nodeIPAM.clusterCIDRs={not-a-cidr}"],
            "/nodeIPAM/clusterCIDRs/0",
        ),
        (&[enabled], "nodeIPAM.clusterCIDRs"),
        (&["serviceCIDR=10.96.0.0"], "/serviceCIDR"),
        (&["nodeIPAM.enable=yes"], "/nodeIPAM/enable"),
        (&["nodeIPAM.clusterCIDR=10.0.0.0/8"], "clusterCIDR"),
        (&["datapath=ovs"], "datapath"),
        (&["trafficEncapMode=hybrid"], "trafficEncapMode"),
        (&["tunnelType=stt"], "tunnelType"),
        (&["defaultMTU=100"], "/defaultMTU"),
        (&["featureGates.NodeIPAM=on"], "/featureGates/NodeIPAM"),
        (
            &["agent.bpfMapSizes.IPCACHE=0"],
            "/agent/bpfMapSizes/IPCACHE",
        ),
    ];
    for (sets, key) in cases {
        let mut extra = Vec::new();
        for set in *sets {
            extra.extend(["--set", set]);
        }
        match render(&None, &extra) {
            Ok(_) => panic!("{sets:?} rendered"),
            Err(e) => assert!(e.contains(key), "{sets:?}: the error names {key}: {e}"),
        }
    }
}

fn notes(values: &Option<PathBuf>) -> String {
    let chart = chart();
    let out = helm(&with_values(
        &[
            "install",
            "sluice",
            chart.to_str().unwrap(),
            "--dry-run=client",
            "--namespace",
            "kube-system",
        ],
        values,
    ))
    .unwrap();
    out[out.find("NOTES:").expect("install notes")..].to_string()
}

#[test]
fn antrea_keys_sluice_does_not_implement_are_named_in_the_notes() {
    let notes_of_pack = notes(&Some(chart().join("ci/antrea-pack-values.yaml")));
    let line = notes_of_pack
        .lines()
        .find(|l| l.starts_with("ignored"))
        .unwrap_or_else(|| panic!("no ignored line: {notes_of_pack}"));
    for key in [
        "tunnelPort",
        "egress",
        "nodePortLocal",
        "ovs",
        "featureGates.AntreaProxy",
        "featureGates.Egress",
        "antreaProxy.proxyAll",
        "agent.apiPort",
        "controller.selfSignedCert",
        "cni.plugins",
        "logVerbosity",
    ] {
        assert!(line.contains(key), "{key} is not named: {line}");
    }
    for implemented in [
        "nodeIPAM",
        "featureGates.NodeIPAM",
        "serviceCIDR,",
        "hostGateway",
    ] {
        assert!(
            !line.contains(implemented),
            "{implemented} is named ignored: {line}"
        );
    }
    assert!(notes_of_pack.contains("NodeIPAM is on"));
    let defaults = notes(&None);
    assert!(!defaults.contains("ignored"), "{defaults}");
    assert!(defaults.contains("NodeIPAM is off"));
}

/// (API group, resource, verb) triples a set of rules grants.
fn granted(role: &Value) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for rule in role["rules"].as_sequence().unwrap() {
        for group in rule["apiGroups"].as_sequence().unwrap() {
            for resource in rule["resources"].as_sequence().unwrap() {
                for verb in rule["verbs"].as_sequence().unwrap() {
                    out.insert((
                        group.as_str().unwrap().to_string(),
                        resource.as_str().unwrap().to_string(),
                        verb.as_str().unwrap().to_string(),
                    ));
                }
            }
        }
    }
    out
}

fn used(rules: &[Access], external_ip: bool) -> BTreeSet<(String, String, String)> {
    rules
        .iter()
        .filter(|a| external_ip || !a.external_ip)
        .flat_map(|a| {
            a.verbs
                .iter()
                .map(|v| (a.group.to_string(), a.resource.to_string(), v.to_string()))
        })
        .collect()
}

#[test]
fn cluster_roles_grant_exactly_what_the_code_uses() {
    for external_ip in [false, true] {
        let set = format!("featureGates.ServiceExternalIP={external_ip}");
        let objects = render(&None, &["--set", &set]).unwrap();
        assert_eq!(
            granted(object(&objects, "ClusterRole", "sluice-agent")),
            used(access::AGENT, external_ip),
            "agent, {set}"
        );
        assert_eq!(
            granted(object(&objects, "ClusterRole", "sluice-controller")),
            used(access::CONTROLLER, external_ip),
        );
        assert_eq!(
            granted(object(&objects, "Role", "sluice-controller-lease")),
            used(access::CONTROLLER_LEASE, external_ip),
        );
    }
}
