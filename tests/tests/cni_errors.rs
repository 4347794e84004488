//! Every CNI error case through the real plugin binary: the spec's code and a message that names
//! the cause. Nothing is left behind by a failed call.

use sluice_tests::{cni_call, require_root, Netns, Node};

fn env<'a>(command: &'a str, netns: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", "ctr1"),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
    ]
}

#[test]
fn malformed_input_and_agent_down() {
    require_root();
    let ns = Netns::new("sle").unwrap();
    let netns = ns.path().to_string_lossy().into_owned();
    let sock = "/run/sluice-test-nonexistent/cni.sock";
    let conf = format!(
        r#"{{"cniVersion":"1.0.0","name":"sluice","type":"sluice-cni","socket":"{sock}"}}"#
    );

    let out = cni_call(&env("ADD", &netns), b"{\"cniVersion\": ");
    assert_eq!(out.code, 1, "non-zero exit on error");
    let (code, msg) = out.error();
    assert_eq!(code, 6, "bad JSON: {msg}");
    assert!(msg.contains("not valid JSON"), "{msg}");

    let (code, msg) = cni_call(
        &env("ADD", &netns),
        br#"{"cniVersion":"1.0.0","type":"sluice-cni"}"#,
    )
    .error();
    assert_eq!(code, 7, "missing field: {msg}");
    assert!(msg.contains("missing field `name`"), "{msg}");

    let (code, msg) = cni_call(&env("FROB", &netns), conf.as_bytes()).error();
    assert_eq!(code, 4, "unknown command: {msg}");
    assert!(msg.contains("\"FROB\""), "{msg}");

    let mut no_ifname = env("ADD", &netns);
    no_ifname.retain(|(k, _)| *k != "CNI_IFNAME");
    let (code, msg) = cni_call(&no_ifname, conf.as_bytes()).error();
    assert_eq!(code, 4, "missing CNI_IFNAME: {msg}");
    assert!(msg.contains("CNI_IFNAME"), "{msg}");

    let (code, msg) = cni_call(&env("ADD", &netns), conf.as_bytes()).error();
    assert_eq!(code, 11, "agent down: {msg}");
    assert!(msg.contains(sock) && msg.contains("sluice-agent"), "{msg}");

    let version = cni_call(&[("CNI_COMMAND", "VERSION")], b"");
    assert_eq!(version.code, 0);
    assert!(version.stdout.contains("\"1.0.0\""), "{}", version.stdout);
}

/// A /29 has five pod addresses: the sixth ADD fails with code 100 naming the pool, and leaves
/// no veth, record or reservation behind.
#[test]
fn pool_exhausted_and_unknown_netns() {
    require_root();
    let node = Node::start("10.99.0.0/29", "auto").unwrap();
    let pods: Vec<_> = (0..5).map(|i| node.add_pod(&format!("p{i}"))).collect();
    let extra = Netns::new("slp").unwrap();
    let links_before = node.ns.exec(&["ip", "-o", "link"]).unwrap().lines().count();
    let out = node.cni("ADD", "sixth", extra.path().to_str().unwrap(), "eth0");
    let (code, msg) = out.error();
    assert_eq!(code, 100, "{msg}");
    assert!(msg.contains("10.99.0.0/29 is exhausted"), "{msg}");
    assert_eq!(
        node.ns.exec(&["ip", "-o", "link"]).unwrap().lines().count(),
        links_before,
        "a failed ADD left links behind"
    );
    assert!(!node.dir.join("state/endpoints/sixth_eth0.json").exists());

    let (code, msg) = node
        .cni("ADD", "ghost", "/run/netns/does-not-exist", "eth0")
        .error();
    assert_eq!(code, 3, "{msg}");
    assert!(msg.contains("/run/netns/does-not-exist"), "{msg}");

    // Freeing one address makes room again.
    let freed = &pods[0];
    assert_eq!(
        node.cni(
            "DEL",
            &freed.container_id,
            freed.ns.path().to_str().unwrap(),
            "eth0"
        )
        .code,
        0
    );
    let out = node.cni("ADD", "sixth", extra.path().to_str().unwrap(), "eth0");
    assert_eq!(out.code, 0, "{}", out.stdout);
    assert!(
        out.stdout.contains(&format!("\"{}/29\"", freed.ip)),
        "{}",
        out.stdout
    );
}
