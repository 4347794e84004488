//! The embedded API server's Service registry: defaults, cluster IPs, node ports and health-check
//! node ports allocated, checked and released as kube-apiserver does.

use std::net::TcpListener;

use k8s_openapi::api::core::v1::Service;
use kube::{
    api::{Api, PostParams},
    Client,
};
use serde_json::{json, Value};
use sluice_tests::apiserver::{ApiError, ApiServer, ApiState, ServiceRanges};

fn server() -> ApiServer {
    ApiServer::start(TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
}

/// A Service in `default` with `spec`; every port serves 80 unless `spec` says otherwise.
fn service(name: &str, spec: Value) -> Value {
    let mut spec = spec;
    if spec.get("ports").is_none() {
        spec["ports"] = json!([{"port": 80}]);
    }
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    })
}

fn create(api: &ApiServer, name: &str, spec: Value) -> Value {
    api.create(service(name, spec))
        .unwrap_or_else(|e| panic!("create {name}: {e}"))["spec"]
        .clone()
}

/// The message of a refused create, checking its code and reason.
fn refused(api: &ApiServer, name: &str, spec: Value, code: u16) -> String {
    let e: ApiError = api
        .create(service(name, spec))
        .expect_err("the create is refused");
    assert_eq!(e.code, code, "{e}");
    let reason = if code == 422 {
        "Invalid"
    } else {
        "InternalError"
    };
    assert_eq!(e.reason, reason, "{e}");
    e.message
}

fn cluster_ip(spec: &Value) -> &str {
    spec["clusterIP"].as_str().expect("a cluster IP")
}

fn node_ports(spec: &Value) -> Vec<u64> {
    spec["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["nodePort"].as_u64().expect("a node port"))
        .collect()
}

#[test]
fn cluster_ips_and_defaults() {
    let api = server();
    let web = create(&api, "web", json!({"selector": {"app": "web"}}));
    // The lowest free address above kube-apiserver's static band (10.96.0.1-10.96.1.0).
    assert_eq!(cluster_ip(&web), "10.96.1.1");
    assert_eq!(
        web,
        json!({
            "type": "ClusterIP",
            "selector": {"app": "web"},
            "ports": [{"port": 80, "protocol": "TCP", "targetPort": 80}],
            "clusterIP": "10.96.1.1",
            "clusterIPs": ["10.96.1.1"],
            "ipFamilies": ["IPv4"],
            "ipFamilyPolicy": "SingleStack",
            "sessionAffinity": "None",
            "internalTrafficPolicy": "Cluster",
        })
    );
    assert_eq!(cluster_ip(&create(&api, "api", json!({}))), "10.96.1.2");

    // A requested address in the static band, then the same address again.
    let dns = create(&api, "dns", json!({"clusterIP": "10.96.0.10"}));
    assert_eq!(dns["clusterIPs"], json!(["10.96.0.10"]));
    assert_eq!(
        refused(&api, "dns2", json!({"clusterIP": "10.96.0.10"}), 422),
        "Service \"dns2\" is invalid: spec.clusterIPs: Invalid value: []string{\"10.96.0.10\"}: \
         failed to allocate IP 10.96.0.10: provided IP is already allocated"
    );
    for outside in ["10.97.0.1", "10.96.0.0", "10.96.255.255"] {
        assert_eq!(
            refused(&api, "far", json!({"clusterIPs": [outside], "clusterIP": outside}), 422),
            format!(
                "Service \"far\" is invalid: spec.clusterIPs: Invalid value: []string{{\"{outside}\"}}: \
                 failed to allocate IP {outside}: the provided IP ({outside}) is not in the valid range. \
                 The range of valid IPs is 10.96.0.0/16"
            )
        );
    }
    assert!(refused(&api, "bad", json!({"clusterIP": "ten"}), 422)
        .contains("spec.clusterIPs[0]: Invalid value: \"ten\": must be a valid IP address"));
    assert!(refused(&api, "v6", json!({"clusterIP": "fd00::1"}), 422)
        .contains("IPv6 is not configured on this cluster"));
    assert!(refused(
        &api,
        "dual",
        json!({"ipFamilyPolicy": "RequireDualStack"}),
        422
    )
    .contains("this cluster is not configured for dual-stack services"));
    assert!(refused(
        &api,
        "mixed",
        json!({"clusterIP": "10.96.0.11", "clusterIPs": ["10.96.0.12"]}),
        422
    )
    .contains("first value must match `clusterIP`"));

    // Headless and ExternalName Services get no address.
    let headless = create(&api, "headless", json!({"clusterIP": "None"}));
    assert_eq!(headless["clusterIPs"], json!(["None"]));
    let external = create(
        &api,
        "docs",
        json!({"type": "ExternalName", "externalName": "docs.example.com"}),
    );
    assert!(external.get("clusterIP").is_none() && external.get("ipFamilies").is_none());
    assert!(external.get("internalTrafficPolicy").is_none());

    // ClientIP affinity gets kube-apiserver's 3-hour timeout; a named targetPort is kept.
    let sticky = create(
        &api,
        "sticky",
        json!({"sessionAffinity": "ClientIP", "externalIPs": ["198.51.100.10"],
               "ports": [{"port": 53, "protocol": "UDP", "targetPort": "dns"}]}),
    );
    assert_eq!(
        sticky["sessionAffinityConfig"],
        json!({"clientIP": {"timeoutSeconds": 10800}})
    );
    assert_eq!(sticky["ports"][0]["targetPort"], "dns");
    // externalIPs make a ClusterIP Service reachable from outside: it gets a traffic policy.
    assert_eq!(sticky["externalTrafficPolicy"], "Cluster");
    assert_eq!(cluster_ip(&sticky), "10.96.1.3");
}

#[test]
fn node_ports_and_health_check_ports() {
    let api = server();
    let web = create(
        &api,
        "web",
        json!({"type": "NodePort", "ports": [{"name": "http", "port": 80}, {"name": "https", "port": 443}]}),
    );
    // The lowest free ports above kube-apiserver's static band (30000-30085).
    assert_eq!(node_ports(&web), [30086, 30087]);
    assert_eq!(web["externalTrafficPolicy"], "Cluster");
    assert!(web.get("healthCheckNodePort").is_none());

    let fixed = create(
        &api,
        "fixed",
        json!({"type": "NodePort", "ports": [{"port": 80, "nodePort": 30080}]}),
    );
    assert_eq!(node_ports(&fixed), [30080]);
    assert_eq!(
        refused(&api, "clash", json!({"type": "NodePort", "ports": [{"port": 81, "nodePort": 30080}]}), 422),
        "Service \"clash\" is invalid: spec.ports[0].nodePort: Invalid value: 30080: provided port is already allocated"
    );
    assert_eq!(
        refused(
            &api,
            "low",
            json!({"type": "NodePort", "ports": [{"port": 80, "nodePort": 80}]}),
            422
        ),
        "Service \"low\" is invalid: spec.ports[0].nodePort: Invalid value: 80: \
         provided port is not in the valid range. The range of valid ports is 30000-32767"
    );
    assert_eq!(
        refused(&api, "plain", json!({"ports": [{"port": 80, "nodePort": 30090}]}), 422),
        "Service \"plain\" is invalid: spec.ports[0].nodePort: Forbidden: may not be used when `type` is 'ClusterIP'"
    );

    // TCP and UDP on one port number share a node port, requested or allocated.
    let dns = create(
        &api,
        "dns",
        json!({"type": "NodePort", "ports": [
            {"name": "dns", "port": 53, "protocol": "UDP"},
            {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
        ]}),
    );
    assert_eq!(node_ports(&dns), [30088, 30088]);

    // LoadBalancer: node ports, and a health-check port for externalTrafficPolicy Local.
    let lb = create(
        &api,
        "lb",
        json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local"}),
    );
    assert_eq!(node_ports(&lb), [30089]);
    assert_eq!(lb["healthCheckNodePort"], 30090);
    assert_eq!(lb["allocateLoadBalancerNodePorts"], true);
    let cluster_lb = create(&api, "lb-cluster", json!({"type": "LoadBalancer"}));
    assert_eq!(cluster_lb["externalTrafficPolicy"], "Cluster");
    assert!(cluster_lb.get("healthCheckNodePort").is_none());
    let bare = create(
        &api,
        "lb-bare",
        json!({"type": "LoadBalancer", "allocateLoadBalancerNodePorts": false}),
    );
    assert!(bare["ports"][0].get("nodePort").is_none());
    assert!(
        refused(&api, "hc", json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local", "healthCheckNodePort": 30080}), 500)
            .contains("failed to allocate requested HealthCheck NodePort 30080: provided port is already allocated")
    );
    assert!(
        refused(&api, "hc-np", json!({"type": "NodePort", "healthCheckNodePort": 30500}), 422)
            .contains("spec.healthCheckNodePort: Invalid value: 30500: may only be set when `type` is 'LoadBalancer'")
    );
}

#[test]
fn deletion_releases_addresses_and_ports() {
    let api = server();
    let first = create(&api, "first", json!({"type": "NodePort"}));
    let lb = create(
        &api,
        "lb",
        json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local"}),
    );
    api.delete("services", Some("default"), "first").unwrap();
    api.delete("services", Some("default"), "lb").unwrap();
    // Asked for explicitly, and handed out again.
    let again = create(
        &api,
        "again",
        json!({"type": "NodePort", "clusterIP": cluster_ip(&first), "ports": [{"port": 80, "nodePort": node_ports(&first)[0]}]}),
    );
    assert_eq!(cluster_ip(&again), "10.96.1.1");
    let next = create(
        &api,
        "next",
        json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local"}),
    );
    assert_eq!(cluster_ip(&next), cluster_ip(&lb));
    assert_eq!(node_ports(&next), node_ports(&lb));
    assert_eq!(next["healthCheckNodePort"], lb["healthCheckNodePort"]);

    // A namespace takes its Services' allocations with it.
    api.create(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}))
        .unwrap();
    let mut shop = service("shop", json!({"clusterIP": "10.96.0.20"}));
    shop["metadata"]["namespace"] = json!("shop");
    api.create(shop.clone()).unwrap();
    api.delete("namespaces", None, "shop").unwrap();
    create(&api, "after-ns", json!({"clusterIP": "10.96.0.20"}));
}

#[test]
fn updates_keep_allocations() {
    let api = server();
    let manifest = service(
        "web",
        json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local",
               "ports": [{"name": "http", "port": 80}, {"name": "https", "port": 443}]}),
    );
    let created = api.create(manifest.clone()).unwrap();
    let rv = created["metadata"]["resourceVersion"].clone();

    // The manifest applied again (no clusterIP, nodePorts, healthCheckNodePort): nothing changes.
    let replaced = api.replace(manifest.clone()).unwrap();
    assert_eq!(replaced["spec"], created["spec"]);
    assert_eq!(replaced["metadata"]["resourceVersion"], rv);

    // Ports reordered: each keeps its node port by name.
    let mut reordered = manifest.clone();
    reordered["spec"]["ports"] =
        json!([{"name": "https", "port": 443}, {"name": "http", "port": 80}]);
    let replaced = api.replace(reordered).unwrap();
    assert_eq!(
        node_ports(&replaced["spec"]),
        [
            node_ports(&created["spec"])[1],
            node_ports(&created["spec"])[0]
        ]
    );

    // A patch elsewhere keeps everything; a new address is refused.
    let patched = api
        .merge_patch(
            "services",
            Some("default"),
            "web",
            &json!({"metadata": {"labels": {"a": "b"}}}),
        )
        .unwrap();
    assert_eq!(patched["spec"]["clusterIP"], created["spec"]["clusterIP"]);
    let e = api
        .merge_patch(
            "services",
            Some("default"),
            "web",
            &json!({"spec": {"clusterIP": "10.96.0.50", "clusterIPs": ["10.96.0.50"]}}),
        )
        .unwrap_err();
    assert_eq!(
        e.message,
        "Service \"web\" is invalid: spec.clusterIPs[0]: Invalid value: []string{\"10.96.0.50\"}: may not change once set"
    );

    // Down to ClusterIP: node ports and the health-check port are dropped and free again.
    let held = node_ports(&created["spec"]);
    let down = api
        .merge_patch(
            "services",
            Some("default"),
            "web",
            &json!({"spec": {"type": "ClusterIP"}}),
        )
        .unwrap();
    assert!(down["spec"]["ports"][0].get("nodePort").is_none());
    assert!(down["spec"].get("healthCheckNodePort").is_none());
    assert!(down["spec"].get("externalTrafficPolicy").is_none());
    assert_eq!(down["spec"]["clusterIP"], created["spec"]["clusterIP"]);
    let taker = create(
        &api,
        "taker",
        json!({"type": "NodePort", "ports": [{"port": 80, "nodePort": held[0]}]}),
    );
    assert_eq!(node_ports(&taker), [held[0]]);

    // To ExternalName and back: the address is released, then a fresh one allocated.
    let ip = created["spec"]["clusterIP"].as_str().unwrap().to_string();
    let named = api
        .merge_patch(
            "services",
            Some("default"),
            "web",
            &json!({"spec": {"type": "ExternalName", "externalName": "example.com"}}),
        )
        .unwrap();
    assert!(named["spec"].get("clusterIP").is_none());
    create(&api, "reuse", json!({"clusterIP": ip}));
    let back = api
        .merge_patch(
            "services",
            Some("default"),
            "web",
            &json!({"spec": {"type": "NodePort", "externalName": null}}),
        )
        .unwrap();
    assert_ne!(back["spec"]["clusterIP"].as_str(), Some(ip.as_str()));
    assert_eq!(back["spec"]["externalTrafficPolicy"], "Cluster");
    assert!(
        !node_ports(&back["spec"]).contains(&held[0]),
        "taker holds it"
    );
}

#[test]
fn allocations_survive_a_restart() {
    let api = server();
    let before = create(&api, "before", json!({"type": "NodePort"}));
    let state = api.stop();
    let api = ApiServer::start_with_state(TcpListener::bind("127.0.0.1:0").unwrap(), state);
    let after = create(&api, "after", json!({"type": "NodePort"}));
    assert_ne!(cluster_ip(&after), cluster_ip(&before));
    assert_ne!(node_ports(&after), node_ports(&before));
    assert!(refused(
        &api,
        "again",
        json!({"clusterIP": cluster_ip(&before)}),
        422
    )
    .ends_with("provided IP is already allocated"));
}

#[test]
fn configured_ranges_fill_up() {
    let ranges = ServiceRanges {
        cluster_ips: "10.0.0.0/29".parse().unwrap(),
        node_ports: 31000..=31001,
    };
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let api = ApiServer::start_with_state(listener, ApiState::with_service_ranges(ranges));
    // Six usable addresses, no static band in so small a range.
    let ips: Vec<String> = (0..6)
        .map(|i| cluster_ip(&create(&api, &format!("s{i}"), json!({}))).to_string())
        .collect();
    assert_eq!(ips.first().map(String::as_str), Some("10.0.0.1"));
    assert_eq!(ips.last().map(String::as_str), Some("10.0.0.6"));
    assert_eq!(
        refused(&api, "s6", json!({}), 500),
        "Internal error occurred: failed to allocate a serviceIP: range is full"
    );
    api.delete("services", Some("default"), "s0").unwrap();
    let np = create(
        &api,
        "np",
        json!({"type": "NodePort", "ports": [{"port": 1}, {"port": 2}]}),
    );
    assert_eq!(node_ports(&np), [31000, 31001]);
    api.delete("services", Some("default"), "s1").unwrap();
    assert_eq!(
        refused(&api, "np2", json!({"type": "NodePort"}), 500),
        "Internal error occurred: failed to allocate a nodePort: range is full"
    );
}

/// Through HTTP as a kube-rs client sees it: the Status of a refusal, and a dry run that
/// allocates without holding anything.
#[tokio::test]
async fn kube_clients_see_allocations_and_refusals() {
    let api = server();
    let services: Api<Service> =
        Api::namespaced(Client::try_from(api.kube_config()).unwrap(), "default");
    let web: Service = serde_json::from_value(service("web", json!({"type": "NodePort"}))).unwrap();
    let dry = services
        .create(
            &PostParams {
                dry_run: true,
                ..Default::default()
            },
            &web,
        )
        .await
        .unwrap();
    let spec = dry.spec.unwrap();
    assert_eq!(spec.cluster_ip.as_deref(), Some("10.96.1.1"));
    assert_eq!(spec.ports.unwrap()[0].node_port, Some(30086));
    let created = services.create(&PostParams::default(), &web).await.unwrap();
    let spec = created.spec.unwrap();
    assert_eq!(
        spec.cluster_ip.as_deref(),
        Some("10.96.1.1"),
        "the dry run held nothing"
    );

    let clash: Service = serde_json::from_value(service(
        "clash",
        json!({"clusterIP": spec.cluster_ip.unwrap()}),
    ))
    .unwrap();
    match services.create(&PostParams::default(), &clash).await {
        Err(kube::Error::Api(status)) => {
            assert_eq!((status.code, status.reason.as_str()), (422, "Invalid"));
            assert!(status.message.ends_with("provided IP is already allocated"));
        }
        other => panic!("expected 422 Invalid, got {other:?}"),
    }
}
