//! A short subset of the upstream conformance suites (`cargo xtask conformance` runs them all,
//! docs/conformance.md has the figures): a few specs of the release's e2e.test and one case of
//! Cyclonus against Sluice on the lab's real cluster, so that every change meets the upstream
//! tests, not only ours.

use std::time::Duration;

use anyhow::Result;
use sluice_tests::cluster::{
    conformance::{self, NETPOL, SERVICES},
    cyclonus, Cluster, ClusterOptions,
};

const NETPOL_FOCUS: &[&str] = &[
    "should support a 'default-deny-ingress' policy",
    "should allow ingress access from namespace on one named port",
];
const SERVICES_FOCUS: &[&str] = &[
    "should serve a basic endpoint from pods",
    "should have session affinity work for service with type clusterIP",
    // Needs a third node: the endpoint on one, the client on another, a node with neither.
    "should implement NodePort and HealthCheckNodePort correctly when ExternalTrafficPolicy changes",
];

#[test]
fn upstream_netpol_services_and_cyclonus_cases_pass() -> Result<()> {
    let cluster = Cluster::up(ClusterOptions::nodes(3))?;
    let out = conformance::output_dir("ci");
    let netpol = conformance::run(&cluster, &NETPOL, NETPOL_FOCUS, &out)?;
    let services = conformance::run(&cluster, &SERVICES, SERVICES_FOCUS, &out)?;
    // Cyclonus's one `example` case: ingress on a named port, probed between all nine pods of
    // its three namespaces, on TCP and UDP, ports 80 and 81.
    let cyclonus = cyclonus::run(&cluster, &["example"], &out, Duration::from_secs(600))?;
    eprint!("{}", cyclonus.summary());
    assert_eq!(
        (cyclonus.passed, cyclonus.failed),
        (1, 0),
        "{}",
        cyclonus.summary()
    );
    for (result, focus) in [(&netpol, NETPOL_FOCUS), (&services, SERVICES_FOCUS)] {
        eprint!("{}", result.summary());
        assert_eq!(result.failed, 0, "{}", result.summary());
        // A focus may match more than one spec (an SCTP variant, say); each must have run one.
        for part in focus {
            assert!(
                result
                    .specs
                    .iter()
                    .any(|s| s.state == "passed" && s.name.contains(part)),
                "no spec matching {part:?} passed\n{}",
                result.summary()
            );
        }
    }
    Ok(())
}
