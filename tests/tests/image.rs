//! The container image `cargo xtask image` builds, run for real: containerd imports it and runs
//! each binary; podman loads it; Docker's manifest names the same config and layer; and the
//! agent, run from the image under containerd in a node namespace, wires pods through the CNI
//! plugin that reach each other over TCP and UDP, with its masquerade table installed by the
//! image's own `nft`.

use std::net::Ipv4Addr;

use sluice_tests::{
    containerd::{image_archive, image_name, Containerd},
    probe::{self, Servers},
    require_root, sh, unique, Netns, Node, Runner,
};

#[test]
fn containerd_and_podman_load_the_image_and_its_binaries_run() {
    require_root();
    let archive = image_archive();
    let containerd = Containerd::start().expect("containerd");
    assert_eq!(containerd.import(&archive).unwrap(), vec![image_name()]);
    let run = |env: &[&str], args: &[&str]| {
        containerd
            .run(&image_name(), env, args)
            .unwrap_or_else(|e| panic!("{args:?} in the image: {e:#}"))
    };
    let version = env!("CARGO_PKG_VERSION");
    for binary in ["sluice-agent", "sluicectl", "sluice-controller"] {
        assert!(
            run(&[], &[binary, "--version"]).contains(version),
            "{binary}"
        );
    }
    let cni: serde_json::Value =
        serde_json::from_str(&run(&["CNI_COMMAND=VERSION"], &["sluice-cni"])).unwrap();
    assert!(cni["supportedVersions"]
        .as_array()
        .unwrap()
        .contains(&"1.0.0".into()));
    // What the agent executes at run time is in the image.
    assert!(run(&[], &["nft", "--version"]).starts_with("nftables"));
    // A bad config is refused with the field named, from the image as from the binary.
    let refused = containerd.run(
        &image_name(),
        &[],
        &["sluice-controller", "--config", "/nope"],
    );
    assert!(format!("{:#}", refused.unwrap_err()).contains("/nope"));

    // podman reads the same archive (its own storage, under a temporary directory).
    let dir = std::env::temp_dir().join(unique("spod"));
    let podman = |args: &[&str]| {
        sh(std::process::Command::new("podman")
            .arg("--root")
            .arg(dir.join("root"))
            .arg("--runroot")
            .arg(dir.join("run"))
            .args(["--storage-driver", "vfs", "--events-backend", "file"])
            .args(args))
    };
    let loaded = podman(&["load", "-i", archive.to_str().unwrap()]);
    let listed = podman(&["images", "--format", "{{.Repository}}:{{.Tag}}"]);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(loaded.unwrap().contains(&image_name()));
    assert_eq!(listed.unwrap().trim(), image_name());

    // `docker load` reads manifest.json: it must name the index's config and layer.
    let files = sh(std::process::Command::new("tar")
        .arg("-xOf")
        .arg(&archive)
        .arg("./manifest.json"))
    .unwrap();
    let docker: serde_json::Value = serde_json::from_str(&files).unwrap();
    let index: serde_json::Value = serde_json::from_str(
        &sh(std::process::Command::new("tar")
            .arg("-xOf")
            .arg(&archive)
            .arg("./index.json"))
        .unwrap(),
    )
    .unwrap();
    let manifest_digest = index["manifests"][0]["digest"].as_str().unwrap();
    let manifest: serde_json::Value = serde_json::from_str(
        &sh(std::process::Command::new("tar")
            .arg("-xOf")
            .arg(&archive)
            .arg(format!("./blobs/sha256/{}", &manifest_digest[7..])))
        .unwrap(),
    )
    .unwrap();
    let blob = |d: &serde_json::Value| format!("blobs/sha256/{}", &d.as_str().unwrap()[7..]);
    assert_eq!(
        docker[0]["Config"].as_str().unwrap(),
        blob(&manifest["config"]["digest"])
    );
    assert_eq!(
        docker[0]["Layers"][0].as_str().unwrap(),
        blob(&manifest["layers"][0]["digest"])
    );
    assert_eq!(docker[0]["RepoTags"][0], format!("sluice:{version}"));
}

#[test]
fn the_agent_from_the_image_wires_pods_that_connect() {
    require_root();
    let containerd = Containerd::start().expect("containerd");
    containerd.import(&image_archive()).unwrap();
    let node = Node::start_with(
        Netns::new("sli").unwrap(),
        "podCIDR: 10.251.0.0/24\n".into(),
        Vec::new(),
        Runner::Image {
            containerd: containerd.address(),
            image: image_name(),
        },
    )
    .expect("the agent from the image serves its CNI socket");
    let a = node.add_pod("a");
    let b = node.add_pod("b");
    let _servers = Servers::start(&b.ns.path(), "b", &[8080]);
    let tcp = probe::tcp(&a.ns.path(), None, b.ip, 8080).expect("a -> b over TCP");
    assert_eq!(tcp.client, a.ip);
    let udp = probe::udp(&a.ns.path(), b.ip, 8080).expect("a -> b over UDP");
    assert_eq!(udp.client, a.ip);
    assert!(a.ip != Ipv4Addr::UNSPECIFIED && a.ip != b.ip);
    // The masquerade table, written by the nft inside the image, is in the node's namespace.
    let table = node
        .ns
        .exec(&["nft", "list", "table", "ip", "sluice"])
        .unwrap();
    assert!(table.contains("masquerade"), "{table}");
    assert!(
        node.agent_log().contains("10.251.0.0/24"),
        "{}",
        node.agent_log()
    );
}
