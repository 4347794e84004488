//! What each component asks of the API server, as RBAC rules: the chart's ClusterRoles and Role
//! grant exactly these (a chart test compares them), so a new API call starts here.

/// One RBAC rule: API group, resource (with `/subresource`), verbs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    pub group: &'static str,
    pub resource: &'static str,
    pub verbs: &'static [&'static str],
    /// Needed only with the ServiceExternalIP feature gate.
    pub external_ip: bool,
}

const fn rule(
    group: &'static str,
    resource: &'static str,
    verbs: &'static [&'static str],
) -> Access {
    Access {
        group,
        resource,
        verbs,
        external_ip: false,
    }
}

const fn with_external_ip(access: Access) -> Access {
    Access {
        external_ip: true,
        ..access
    }
}

const WATCH: &[&str] = &["list", "watch"];

/// `sluice-agent`: the watches of `k8s::ClusterStore`, the Node events of `follower::report`.
pub const AGENT: &[Access] = &[
    rule("", "nodes", WATCH),
    rule("", "namespaces", WATCH),
    rule("", "pods", WATCH),
    rule("", "services", WATCH),
    rule("discovery.k8s.io", "endpointslices", WATCH),
    rule("networking.k8s.io", "networkpolicies", WATCH),
    rule("events.k8s.io", "events", &["create", "patch"]),
    with_external_ip(rule("crd.antrea.io", "externalippools", WATCH)),
];

/// `sluice-controller`, cluster-wide: NodeIPAM's watch, re-read and patch of Nodes
/// (`controller::nodes`), its Node events, and ServiceExternalIP's watches and status writes
/// (`controller::external_ips`, `external_ip::status`).
pub const CONTROLLER: &[Access] = &[
    rule("", "nodes", &["get", "list", "watch", "patch"]),
    rule("events.k8s.io", "events", &["create", "patch"]),
    with_external_ip(rule("", "services", WATCH)),
    with_external_ip(rule("", "services/status", &["patch"])),
    with_external_ip(rule("crd.antrea.io", "externalippools", WATCH)),
    with_external_ip(rule("crd.antrea.io", "externalippools/status", &["patch"])),
];

/// `sluice-controller`, in its own namespace: the Lease (`controller::lease`).
pub const CONTROLLER_LEASE: &[Access] = &[rule(
    "coordination.k8s.io",
    "leases",
    &["get", "create", "update"],
)];
