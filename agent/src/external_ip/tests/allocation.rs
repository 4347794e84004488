//! Which Service gets which IP, and which writes say so.

use k8s_openapi::api::core::v1::LoadBalancerIngress;

use super::*;
use crate::external_ip::{ExternalIpError, Usage};

#[test]
fn new_services_get_the_lowest_free_ip_in_name_order() {
    let services = [lb("ns/b", "small", &[]), lb("ns/a", "small", &[])];
    let state = run(&[small_pool()], &services, &nodes(&["n"]), "n");
    assert_eq!(state.errors, []);
    assert_eq!(
        state.writes,
        [
            StatusWrite::Service {
                namespace: "ns".into(),
                name: "a".into(),
                ingress: vec![LoadBalancerIngress {
                    ip: Some("10.0.0.1".into()),
                    ..Default::default()
                }],
            },
            StatusWrite::Service {
                namespace: "ns".into(),
                name: "b".into(),
                ingress: vec![LoadBalancerIngress {
                    ip: Some("10.0.0.2".into()),
                    ..Default::default()
                }],
            },
            StatusWrite::PoolUsage {
                pool: "small".into(),
                usage: Usage { total: 2, used: 2 },
            },
        ]
    );
}

#[test]
fn valid_ips_are_kept_and_a_settled_plan_writes_nothing() {
    let mut services = vec![lb("ns/a", "small", &[]), lb("ns/b", "small", &["10.0.0.1"])];
    let state = run(&[small_pool()], &services, &nodes(&["n"]), "n");
    assert_eq!(
        service_writes(&state),
        [("ns/a".into(), vec!["10.0.0.2".into()])]
    );
    apply(&mut services, &state.writes);
    let mut pool = small_pool();
    pool.data["status"] = json!({"usage": {"total": 2, "used": 2}});
    let again = run(&[pool], &services, &nodes(&["n"]), "n");
    assert_eq!(again.writes, [], "nothing left to write");
    assert_eq!(again.assignments, state.assignments);
}

#[test]
fn a_duplicate_or_foreign_ip_is_replaced() {
    let big = pool(
        "big",
        json!({"ipRanges": [{"start": "10.0.0.1", "end": "10.0.0.9"}]}),
    );
    let services = [
        lb("ns/a", "big", &["10.0.0.5"]),
        lb("ns/b", "big", &["10.0.0.5"]),
        lb("ns/c", "big", &["192.0.2.1"]),
    ];
    let state = run(&[big], &services, &nodes(&["n"]), "n");
    // The first Service by name keeps a duplicated IP.
    assert_eq!(
        ips(&state),
        BTreeMap::from([
            ("ns/a".into(), ip("10.0.0.5")),
            ("ns/b".into(), ip("10.0.0.1")),
            ("ns/c".into(), ip("10.0.0.2")),
        ])
    );
    assert_eq!(
        service_writes(&state),
        [
            ("ns/b".into(), vec!["10.0.0.1".into()]),
            ("ns/c".into(), vec!["10.0.0.2".into()]),
        ]
    );
}

#[test]
fn ips_are_released_and_reused_only_after_the_release_is_written() {
    let mut services = vec![
        // The annotation was removed; another load balancer's entry stays.
        service("ns/a", "LoadBalancer", None, &["10.0.0.1", "203.0.113.7"]),
        // The type changed.
        service("ns/b", "ClusterIP", Some("small"), &["10.0.0.2"]),
        lb("ns/c", "small", &[]),
    ];
    let state = run(&[small_pool()], &services, &nodes(&["n"]), "n");
    assert_eq!(
        service_writes(&state),
        [
            ("ns/a".into(), vec!["203.0.113.7".into()]),
            ("ns/b".into(), vec![]),
        ]
    );
    assert_eq!(
        state.errors,
        [ExternalIpError::PoolExhausted {
            service: "ns/c".into(),
            pool: "small".into(),
            total: 2,
        }]
    );
    apply(&mut services, &state.writes);
    let state = run(&[small_pool()], &services, &nodes(&["n"]), "n");
    assert_eq!(state.errors, []);
    assert_eq!(
        service_writes(&state),
        [("ns/c".into(), vec!["10.0.0.1".into()])]
    );
}

#[test]
fn a_deleted_service_frees_its_ip_without_a_write() {
    let services = [lb("ns/b", "small", &["10.0.0.2"]), lb("ns/c", "small", &[])];
    let state = run(&[small_pool()], &services, &nodes(&["n"]), "n");
    assert_eq!(
        service_writes(&state),
        [("ns/c".into(), vec!["10.0.0.1".into()])]
    );
    let state = run(&[small_pool()], &services[1..], &nodes(&["n"]), "n");
    assert_eq!(
        ips(&state),
        BTreeMap::from([("ns/c".into(), ip("10.0.0.1"))])
    );
}

#[test]
fn exhaustion_names_service_and_pool_and_writes_nothing_for_it() {
    let services = [
        lb("ns/a", "small", &[]),
        lb("ns/b", "small", &[]),
        lb("ns/c", "small", &["198.51.100.1"]),
    ];
    let state = run(&[small_pool()], &services, &nodes(&["n"]), "n");
    assert_eq!(
        state
            .errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["Service ns/c: ExternalIPPool small has no free IP (all 2 in use)"]
    );
    assert!(service_writes(&state).iter().all(|(s, _)| s != "ns/c"));
}

#[test]
fn a_missing_pool_releases_the_ip() {
    let services = [lb("ns/a", "gone", &["10.0.0.1"]), lb("ns/b", "gone", &[])];
    let state = run(&[small_pool()], &services, &nodes(&["n"]), "n");
    assert_eq!(service_writes(&state), [("ns/a".into(), vec![])]);
    assert_eq!(state.errors.len(), 2);
    assert_eq!(
        state.errors[0].to_string(),
        "Service ns/a: ExternalIPPool gone does not exist"
    );
}

#[test]
fn only_the_controller_writes() {
    let services = [lb("ns/a", "small", &[])];
    let cluster = [node("a", true, json!({})), node("b", true, json!({}))];
    let controller = plan(&[small_pool()], &services, &cluster, Role::Controller);
    assert_eq!(controller.writes.len(), 2, "the Service and the pool usage");
    for me in ["a", "b"] {
        let node = plan(&[small_pool()], &services, &cluster, Role::Node(me));
        assert_eq!(node.writes, [], "{me} writes nothing");
        assert_eq!(node.assignments, controller.assignments, "{me} agrees");
    }
}
