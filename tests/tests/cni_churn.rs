//! The CNI plugin under churn, as a runtime drives it: a thousand ADD/DEL cycles, twenty ADDs at
//! once, the agent killed while ADDs are in flight, and CNI 1.1's STATUS and GC. After each, the
//! node holds exactly what its live pods need: no veth, address reservation, endpoint record or
//! map entry of a pod that is gone.

use std::{
    collections::BTreeSet,
    path::Path,
    time::{Duration, Instant},
};

use sluice_tests::{cni_call, require_root, CniOutput, Netns, Node};

/// What the node holds for pods: host-side veths (`sl…`), address reservations, endpoint
/// records, and ENDPOINTS / SPOOF_GUARD entries.
#[derive(Debug, PartialEq, Eq)]
struct Held {
    veths: usize,
    reservations: usize,
    records: usize,
    endpoints: usize,
    spoof_guard: usize,
}

/// Files in a state directory, but for IPAM's round-robin cursor.
fn files(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |entries| {
        entries
            .flatten()
            .filter(|e| e.file_name() != "last_reserved_ip")
            .count()
    })
}

fn held(node: &Node) -> Held {
    let links = node
        .ns
        .exec(&["ip", "-o", "link", "show"])
        .expect("ip link");
    let veths = links
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .filter(|name| {
            let name = name.split('@').next().unwrap_or("");
            (name.starts_with("sl") || name.starts_with("sp"))
                && name.len() == 14
                && name[2..].bytes().all(|b| b.is_ascii_hexdigit())
        })
        .count();
    let maps = node.maps();
    Held {
        veths,
        reservations: files(&node.dir.join("state/ipam")),
        records: files(&node.dir.join("state/endpoints")),
        endpoints: maps.endpoints.keys().count(),
        spoof_guard: maps.spoof_guard.keys().count(),
    }
}

/// What `pods` live pods need: one of everything each.
fn for_pods(pods: usize) -> Held {
    Held {
        veths: pods,
        reservations: pods,
        records: pods,
        endpoints: pods,
        spoof_guard: pods,
    }
}

fn conf(node: &Node, version: &str, extra: &str) -> String {
    format!(
        r#"{{"cniVersion":"{version}","name":"sluice","type":"sluice-cni","socket":"{}"{extra}}}"#,
        node.socket().display()
    )
}

/// A runtime-level call (STATUS, GC): no container in the environment.
fn runtime_call(_node: &Node, command: &str, conf: &str) -> CniOutput {
    cni_call(
        &[("CNI_COMMAND", command), ("CNI_PATH", "/opt/cni/bin")],
        conf.as_bytes(),
    )
}

fn add(node: &Node, id: &str, netns: &Netns) -> CniOutput {
    node.cni("ADD", id, netns.path().to_str().unwrap(), "eth0")
}

fn del(node: &Node, id: &str, netns: &Netns) -> CniOutput {
    node.cni("DEL", id, netns.path().to_str().unwrap(), "eth0")
}

#[test]
fn a_thousand_add_del_cycles_leave_nothing_behind() {
    require_root();
    let node = Node::start("10.244.0.0/24", "auto").expect("node");
    let netns = Netns::new("slp").expect("pod netns");
    let started = Instant::now();
    let cycles = 1000;
    for i in 0..cycles {
        let id = format!("churn-{i}");
        let out = add(&node, &id, &netns);
        assert_eq!(out.code, 0, "ADD {i}: {}", out.stdout);
        let out = del(&node, &id, &netns);
        assert_eq!(out.code, 0, "DEL {i}: {}", out.stdout);
    }
    let elapsed = started.elapsed();
    eprintln!(
        "{cycles} ADD/DEL cycles in {elapsed:.1?} ({:.1} ms per cycle)",
        elapsed.as_secs_f64() * 1000.0 / cycles as f64
    );
    assert_eq!(held(&node), for_pods(0));
}

#[test]
fn twenty_adds_at_once_then_the_agent_killed_mid_add() {
    require_root();
    let mut node = Node::start("10.244.0.0/24", "auto").expect("node");
    let pods: Vec<(String, Netns)> = (0..20)
        .map(|i| (format!("burst-{i}"), Netns::new("slp").expect("pod netns")))
        .collect();
    let outputs: Vec<CniOutput> = std::thread::scope(|s| {
        let calls: Vec<_> = pods
            .iter()
            .map(|(id, netns)| s.spawn(|| add(&node, id, netns)))
            .collect();
        calls.into_iter().map(|c| c.join().unwrap()).collect()
    });
    let mut addresses = BTreeSet::new();
    for (out, (id, _)) in outputs.iter().zip(&pods) {
        assert_eq!(out.code, 0, "ADD {id}: {}", out.stdout);
        let result: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        addresses.insert(result["ips"][0]["address"].as_str().unwrap().to_string());
    }
    assert_eq!(addresses.len(), 20, "twenty distinct addresses");
    assert_eq!(held(&node), for_pods(20));
    for (id, netns) in &pods {
        assert_eq!(del(&node, id, netns).code, 0);
    }
    assert_eq!(held(&node), for_pods(0));

    // Twenty ADDs again, and the agent SIGKILLed while they are served.
    let pid = node.agent_pid().expect("the agent runs");
    std::thread::scope(|s| {
        for (id, netns) in &pods {
            s.spawn(|| add(&node, id, netns));
        }
        std::thread::sleep(Duration::from_millis(150));
        // SAFETY: a plain syscall, on the agent this test started.
        unsafe {
            libc::kill(pid as i32, libc::SIGKILL);
        }
    });
    node.kill_agent();
    node.start_agent().expect("restart the agent");
    // What the restarted agent kept is whole: every record has its veth, address and entries.
    let after_restart = held(&node);
    assert_eq!(
        after_restart,
        for_pods(after_restart.records),
        "no half-wired pod survives a restart"
    );
    // The runtime DELs every container whose ADD failed or that it no longer wants.
    for (id, netns) in &pods {
        let out = del(&node, id, netns);
        assert_eq!(out.code, 0, "DEL {id}: {}", out.stdout);
    }
    assert_eq!(held(&node), for_pods(0));
}

#[test]
fn status_and_gc_as_a_cni_1_1_runtime_calls_them() {
    require_root();
    let mut node = Node::start("10.244.0.0/24", "auto").expect("node");
    let status = runtime_call(&node, "STATUS", &conf(&node, "1.1.0", ""));
    assert_eq!((status.code, status.stdout.as_str()), (0, ""), "ready");
    let old = runtime_call(&node, "STATUS", &conf(&node, "1.0.0", ""));
    assert_eq!(
        old.error().0,
        1,
        "STATUS is a 1.1.0 command: {}",
        old.stdout
    );

    let pods: Vec<_> = ["a", "b", "c"].map(|n| node.add_pod(n)).into();
    assert_eq!(held(&node), for_pods(3));
    let missing = runtime_call(&node, "GC", &conf(&node, "1.1.0", ""));
    let (code, msg) = missing.error();
    assert_eq!(code, 7, "{msg}");
    assert!(msg.contains("cni.dev/valid-attachments"), "{msg}");

    // The runtime still uses a; b and c are gone without a DEL.
    let valid = format!(
        r#","cni.dev/valid-attachments":[{{"containerID":"{}","ifname":"eth0"}}]"#,
        pods[0].container_id
    );
    let gc = runtime_call(&node, "GC", &conf(&node, "1.1.0", &valid));
    assert_eq!((gc.code, gc.stdout.as_str()), (0, ""), "{}", gc.stdout);
    assert_eq!(held(&node), for_pods(1));
    let check = node.cni(
        "CHECK",
        &pods[0].container_id,
        pods[0].ns.path().to_str().unwrap(),
        "eth0",
    );
    assert_eq!(check.code, 0, "the kept pod is intact: {}", check.stdout);

    node.kill_agent();
    let down = runtime_call(&node, "STATUS", &conf(&node, "1.1.0", ""));
    let (code, msg) = down.error();
    assert_eq!(code, 50, "{msg}");
    assert!(msg.contains("not reachable"), "{msg}");
}
