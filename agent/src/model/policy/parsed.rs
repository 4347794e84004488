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

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(version: Option<&str>, port: u16) -> NetworkPolicy {
        serde_json::from_value(serde_json::json!({
            "metadata": { "namespace": "ns", "name": "p", "resourceVersion": version },
            "spec": { "podSelector": {}, "ingress": [{ "ports": [{ "port": port }] }] },
        }))
        .unwrap()
    }

    fn ports(cache: &mut ParsedPolicies, np: &NetworkPolicy) -> Vec<String> {
        let (parsed, _) = cache.update([np]);
        parsed[0].rules[0][0]
            .ports
            .iter()
            .map(|p| format!("{p:?}"))
            .collect()
    }

    #[test]
    fn a_policy_is_parsed_again_only_under_a_new_resource_version() {
        let mut cache = ParsedPolicies::default();
        let first = ports(&mut cache, &policy(Some("5"), 80));
        // Content changed under the same resourceVersion (an API server never does this): kept.
        assert_eq!(ports(&mut cache, &policy(Some("5"), 81)), first);
        assert_ne!(ports(&mut cache, &policy(Some("6"), 81)), first);
        // Without a resourceVersion, parsed every time.
        let unversioned = ports(&mut cache, &policy(None, 82));
        assert_ne!(ports(&mut cache, &policy(None, 83)), unversioned);
        // A policy gone from the input is forgotten.
        assert!(cache.update([]).0.is_empty());
    }
}
