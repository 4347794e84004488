//! The repository's examples on the lab's real cluster, applied as `sluice-lab apply` applies
//! them: kube-apiserver admits every object as the comments in them say (also applied a second
//! time), and the Services they define answer.

use std::{net::SocketAddrV4, path::Path, time::Duration};

use sluice_tests::{
    cluster::{Cluster, ClusterOptions},
    lab::{
        manifests,
        report::Protocol,
        services::{ServiceProbes, Source},
    },
    require_root,
};

const PORT: u16 = 80;

fn example(path: &str) -> Vec<serde_json::Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(path);
    if path.is_dir() {
        manifests::load_dir(&path)
    } else {
        manifests::load_file(&path)
    }
    .unwrap_or_else(|e| panic!("{} parses: {e:#}", path.display()))
}

#[test]
fn the_examples_are_admitted_and_their_services_answer() {
    require_root();
    let cluster = Cluster::up(ClusterOptions::nodes(2)).expect("cluster up");
    // Twice: applied again, each object is updated and keeps what it was allocated.
    for _ in 0..2 {
        for objects in [example("demo"), example("services/shop.yaml")] {
            cluster
                .apply_lab_manifests(objects, &[PORT])
                .expect("admitted");
        }
    }
    cluster
        .wait_programmed(Duration::from_secs(90))
        .expect("programmed");

    let spec = |name: &str| cluster.service("shop", name).expect(name)["spec"].clone();
    assert_eq!(spec("dns")["clusterIP"], "10.96.0.53");
    assert_eq!(spec("web-nodeport")["ports"][0]["nodePort"], 30080);
    assert!(spec("web-lb")["healthCheckNodePort"].is_u64());
    assert_eq!(
        spec("web-sticky")["sessionAffinityConfig"]["clientIP"]["timeoutSeconds"],
        60
    );
    assert_eq!(spec("web-headless")["clusterIP"], "None");

    // The requested cluster IP answers on both protocols, from the dns pods' named ports.
    let client = cluster.default_client("shop", "dns").expect("a client");
    let dns: SocketAddrV4 = "10.96.0.53:53".parse().unwrap();
    for protocol in [Protocol::Udp, Protocol::Tcp] {
        let reply = cluster
            .probe(&client, dns, protocol)
            .expect("probe")
            .unwrap_or_else(|| panic!("shop/dns answers over {protocol}"));
        assert!(reply.server.starts_with("shop/dns-"), "{reply:?}");
        assert_eq!(reply.port, 5353, "{reply:?}");
    }
    let node_port: SocketAddrV4 = format!("{}:30080", cluster.nodes[1].ip).parse().unwrap();
    let reply = cluster
        .probe(&Source::External, node_port, Protocol::Tcp)
        .expect("probe")
        .expect("web-nodeport answers from outside");
    assert!(reply.server.starts_with("shop/web-"), "{reply:?}");
}
