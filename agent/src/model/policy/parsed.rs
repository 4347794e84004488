//! NetworkPolicies parsed, kept between compiles by resourceVersion: a compile parses the
//! policies that changed, not the cluster's thousand.

use std::collections::BTreeMap;

use k8s_openapi::api::networking::v1::NetworkPolicy;

use super::{
    parse::{parse_policy, ParsedPolicy},
    PolicyError,
};

#[derive(Default)]
pub struct ParsedPolicies {
    /// By namespace and name, the order compiles walk them in.
    by_key: BTreeMap<(String, String), Parsed>,
}

struct Parsed {
    /// Empty: unknown (an object not from the API server), parsed again every time.
    version: String,
    policy: ParsedPolicy,
    errors: Vec<PolicyError>,
}

impl ParsedPolicies {
    /// Brings the cache to `policies`: those parsed, in namespace and name order, and their
    /// errors.
    pub(super) fn update<'p>(
        &mut self,
        policies: impl IntoIterator<Item = &'p NetworkPolicy>,
    ) -> (Vec<&ParsedPolicy>, Vec<PolicyError>) {
        let mut fresh = BTreeMap::new();
        for np in policies {
            let key = (
                np.metadata.namespace.clone().unwrap_or_default(),
                np.metadata.name.clone().unwrap_or_default(),
            );
            let version = np.metadata.resource_version.clone().unwrap_or_default();
            let parsed = match self.by_key.remove(&key) {
                Some(parsed) if !version.is_empty() && parsed.version == version => parsed,
                _ => {
                    let (policy, errors) = parse_policy(np);
                    let errors = errors
                        .into_iter()
                        .map(|e| e.for_policy(&policy.key))
                        .collect();
                    Parsed {
                        version,
                        policy,
                        errors,
                    }
                }
            };
            fresh.insert(key, parsed);
        }
        self.by_key = fresh;
        let errors = self
            .by_key
            .values()
            .flat_map(|p| p.errors.iter().cloned())
            .collect();
        (self.by_key.values().map(|p| &p.policy).collect(), errors)
    }
}
