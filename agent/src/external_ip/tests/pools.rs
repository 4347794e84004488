//! Pool checks: what a pool hands out, and every way it can be invalid.

use super::*;
use crate::external_ip::ExternalIpError;

fn pool_errors(spec: Value) -> Vec<(String, String, String)> {
    run(&[pool("p", spec)], &[], &nodes(&["a"]), "a")
        .errors
        .into_iter()
        .map(|e| match e {
            ExternalIpError::InvalidPool {
                pool,
                field,
                value,
                reason,
            } => {
                assert_eq!(pool, "p");
                (field, value, reason)
            }
            other => panic!("expected a pool error, got {other}"),
        })
        .collect()
}

#[test]
fn pools_count_usable_addresses() {
    let pools = [
        pool(
            "v4",
            json!({"ipRanges": [
                {"cidr": "10.0.0.1/30"},
                {"start": "10.0.1.10", "end": "10.0.1.12"},
            ], "subnetInfo": {"gateway": "10.0.0.254", "prefixLength": 16}}),
        ),
        pool("v6", json!({"ipRanges": [{"cidr": "fd00::/126"}]})),
        pool("empty", json!({})),
    ];
    let state = run(&pools, &[], &nodes(&["a"]), "a");
    assert_eq!(state.errors, []);
    let usage: BTreeMap<&str, i64> = state
        .writes
        .iter()
        .filter_map(|w| match w {
            StatusWrite::PoolUsage { pool, usage } => Some((pool.as_str(), usage.total)),
            StatusWrite::Service { .. } => None,
        })
        .collect();
    // A CIDR's network address is never handed out, nor an IPv4 broadcast address; host bits
    // are ignored (as Antrea).
    assert_eq!(usage, BTreeMap::from([("empty", 0), ("v4", 5), ("v6", 3)]));
}

#[test]
fn invalid_ranges_name_field_value_and_reason() {
    let cases = [
        (
            json!({"start": "10.0.0.300", "end": "10.0.1.1"}),
            ("spec.ipRanges[0].start", "10.0.0.300", "not an IP address"),
        ),
        (
            json!({"start": "10.0.0.9", "end": "10.0.0.1"}),
            (
                "spec.ipRanges[0]",
                "10.0.0.9-10.0.0.1",
                "start is after end",
            ),
        ),
        (
            json!({"start": "10.0.0.1", "end": "fd00::1"}),
            (
                "spec.ipRanges[0]",
                "10.0.0.1-fd00::1",
                "start and end are of different IP families",
            ),
        ),
        (
            json!({"start": "10.0.0.1"}),
            ("spec.ipRanges[0].end", "", "is required with start"),
        ),
        (
            json!({"cidr": "10.0.0.0/33"}),
            ("spec.ipRanges[0].cidr", "10.0.0.0/33", ""),
        ),
        (
            json!({"cidr": "10.0.0.7/32"}),
            ("spec.ipRanges[0].cidr", "10.0.0.7/32", "has no address"),
        ),
        (
            json!({"cidr": "10.0.0.0/24", "start": "10.0.0.1", "end": "10.0.0.2"}),
            ("spec.ipRanges[0]", "", "give either cidr, or start and end"),
        ),
        (
            json!({"cidrs": "10.0.0.0/24"}),
            ("spec.ipRanges[0]", "", "unknown field `cidrs`"),
        ),
    ];
    for (range, (field, value, reason)) in cases {
        let errors = pool_errors(json!({"ipRanges": [range]}));
        assert_eq!(errors.len(), 1, "{range}: {errors:?}");
        let (f, v, r) = &errors[0];
        assert_eq!(f, field, "{range}");
        assert!(v.contains(value), "{range}: value {v:?}");
        assert!(r.contains(reason), "{range}: reason {r:?}");
    }
}

#[test]
fn invalid_specs_and_selectors_are_reported() {
    let errors = pool_errors(json!({"ipRange": []}));
    assert_eq!(errors[0].0, "spec");
    assert!(
        errors[0].2.contains("unknown field `ipRange`"),
        "{errors:?}"
    );
    let errors = pool_errors(
        json!({"ipRanges": [{"cidr": "10.0.0.0/24"}], "nodeSelector": {
        "matchExpressions": [{"key": "role", "operator": "Equals", "values": ["edge"]}]}}),
    );
    assert_eq!(
        errors,
        [(
            "spec.nodeSelector.matchExpressions[0].operator".to_string(),
            "Equals".to_string(),
            "unknown operator (expected In, NotIn, Exists or DoesNotExist)".to_string()
        )]
    );
    let errors = pool_errors(json!({"ipRanges": [
        {"cidr": "10.0.0.0/24"}, {"start": "10.0.1.1", "end": "10.0.1.9"}, {"start": "10.0.0.200", "end": "10.0.1.0"},
    ]}));
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].0, "spec.ipRanges[2]");
    assert!(
        errors[0].2.contains("overlaps spec.ipRanges[0]"),
        "{errors:?}"
    );
}

#[test]
fn of_two_overlapping_pools_the_newer_is_invalid() {
    let mut old = pool("zz-old", json!({"ipRanges": [{"cidr": "10.0.0.0/24"}]}));
    let mut new = pool(
        "aa-new",
        json!({"ipRanges": [{"start": "10.0.0.9", "end": "10.0.0.9"}]}),
    );
    old.metadata.creation_timestamp =
        Some(serde_json::from_value(json!("2025-01-01T00:00:00Z")).unwrap());
    new.metadata.creation_timestamp =
        Some(serde_json::from_value(json!("2025-02-01T00:00:00Z")).unwrap());
    let services = [lb("ns/a", "aa-new", &[]), lb("ns/b", "zz-old", &[])];
    let state = run(&[new, old], &services, &nodes(&["n"]), "n");
    let errors: Vec<String> = state.errors.iter().map(ToString::to_string).collect();
    assert_eq!(
        errors,
        [
            "ExternalIPPool aa-new: field spec.ipRanges[0]: value \"10.0.0.9-10.0.0.9\": overlaps \
             spec.ipRanges[0] (10.0.0.1-10.0.0.254) of the older ExternalIPPool zz-old",
            "Service ns/a: ExternalIPPool aa-new is invalid, it hands out nothing",
        ]
    );
    assert_eq!(
        service_writes(&state),
        [("ns/b".into(), vec!["10.0.0.1".into()])]
    );
}

#[test]
fn a_bad_pool_hands_out_nothing_and_touches_nothing() {
    let bad = pool(
        "bad",
        json!({"ipRanges": [{"cidr": "10.0.0.0/30"}, {"cidr": "bogus"}]}),
    );
    let services = [
        lb("ns/held", "bad", &["10.0.0.1"]),
        lb("ns/new", "bad", &[]),
    ];
    let state = run(&[bad], &services, &nodes(&["n"]), "n");
    assert_eq!(state.writes, []);
    assert_eq!(state.assignments, BTreeMap::new());
    assert_eq!(state.errors.len(), 3, "{:?}", state.errors);
}
