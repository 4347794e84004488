//! The controller's configuration file (YAML), shaped as Antrea's `antrea-controller.conf` for
//! what Sluice implements, and its validation. Every rejected value names its field, the value and
//! the reason.

use std::path::PathBuf;

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

use crate::config::{invalid, parse_network, ConfigError};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ControllerConfig {
    /// kubeconfig for the API server; absent: the in-cluster service account.
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
    /// Where the Lease lives; `POD_NAMESPACE` in the environment wins.
    #[serde(default = "default_lease_namespace")]
    pub lease_namespace: String,
    #[serde(default = "default_lease_name")]
    pub lease_name: String,
    /// How long a Lease not renewed keeps the standby replicas waiting (client-go's default).
    #[serde(default = "default_lease_duration")]
    pub lease_duration_seconds: u32,
    /// `/healthz` and `/readyz`; absent: not served.
    #[serde(default)]
    pub health_address: Option<String>,
    #[serde(default)]
    pub feature_gates: ControllerGates,
    #[serde(rename = "nodeIPAM", default)]
    pub node_ipam: NodeIpamConfig,
}

/// Antrea's gate names. `NodeIPAM` is on by default as in Antrea since 1.12; a values file
/// written for Antrea 1.9 sets it explicitly, with the same effect.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerGates {
    #[serde(rename = "NodeIPAM", default = "default_true")]
    pub node_ipam: bool,
    #[serde(rename = "ServiceExternalIP", default)]
    pub service_external_ip: bool,
}

impl Default for ControllerGates {
    fn default() -> Self {
        ControllerGates {
            node_ipam: true,
            service_external_ip: false,
        }
    }
}

/// Antrea's `nodeIPAM` section, same keys and defaults.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeIpamConfig {
    #[serde(rename = "enableNodeIPAM", default)]
    pub enable_node_ipam: bool,
    #[serde(rename = "clusterCIDRs", default)]
    pub cluster_cidrs: Vec<String>,
    #[serde(rename = "serviceCIDR", default)]
    pub service_cidr: String,
    #[serde(rename = "serviceCIDRv6", default)]
    pub service_cidr_v6: String,
    #[serde(rename = "nodeCIDRMaskSizeIPv4", default = "default_mask_v4")]
    pub node_cidr_mask_size_ipv4: u8,
    #[serde(rename = "nodeCIDRMaskSizeIPv6", default = "default_mask_v6")]
    pub node_cidr_mask_size_ipv6: u8,
}

impl Default for NodeIpamConfig {
    fn default() -> Self {
        NodeIpamConfig {
            enable_node_ipam: false,
            cluster_cidrs: Vec::new(),
            service_cidr: String::new(),
            service_cidr_v6: String::new(),
            node_cidr_mask_size_ipv4: default_mask_v4(),
            node_cidr_mask_size_ipv6: default_mask_v6(),
        }
    }
}

fn default_lease_namespace() -> String {
    "kube-system".into()
}
fn default_lease_name() -> String {
    "sluice-controller".into()
}
fn default_lease_duration() -> u32 {
    15
}
fn default_true() -> bool {
    true
}
fn default_mask_v4() -> u8 {
    24
}
fn default_mask_v6() -> u8 {
    64
}

/// NodeIPAM after validation: the cluster CIDRs in order (at most one per family), each with
/// the size of the blocks cut from it, and the Service CIDRs no block may overlap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeIpamSettings {
    pub cluster_cidrs: Vec<(IpNetwork, u8)>,
    pub service_cidrs: Vec<IpNetwork>,
}

impl ControllerConfig {
    pub fn parse(text: &str) -> Result<ControllerConfig, ConfigError> {
        serde_yaml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))
    }

    pub fn lease_duration(&self) -> Result<std::time::Duration, ConfigError> {
        if !(3..=300).contains(&self.lease_duration_seconds) {
            return Err(invalid(
                "leaseDurationSeconds",
                &self.lease_duration_seconds,
                "must be between 3 and 300",
            ));
        }
        Ok(std::time::Duration::from_secs(
            self.lease_duration_seconds.into(),
        ))
    }

    /// NodeIPAM's settings, or `None` when it is off (`nodeIPAM.enableNodeIPAM` false or the
    /// `NodeIPAM` gate off).
    pub fn node_ipam(&self) -> Result<Option<NodeIpamSettings>, ConfigError> {
        let c = &self.node_ipam;
        if !c.enable_node_ipam || !self.feature_gates.node_ipam {
            return Ok(None);
        }
        const CIDRS: &str = "nodeIPAM.clusterCIDRs";
        if c.cluster_cidrs.is_empty() || c.cluster_cidrs.len() > 2 {
            return Err(invalid(
                CIDRS,
                &format!("{:?}", c.cluster_cidrs),
                "give one cluster CIDR, or two of different families (dual-stack)",
            ));
        }
        let mut cluster_cidrs = Vec::new();
        for text in &c.cluster_cidrs {
            let cidr = parse_network(CIDRS, text)?;
            if cluster_cidrs
                .iter()
                .any(|(other, _): &(IpNetwork, u8)| other.is_ipv4() == cidr.is_ipv4())
            {
                return Err(invalid(
                    CIDRS,
                    &format!("{:?}", c.cluster_cidrs),
                    "at most one cluster CIDR per IP family",
                ));
            }
            let (field, mask, range) = if cidr.is_ipv4() {
                (
                    "nodeIPAM.nodeCIDRMaskSizeIPv4",
                    c.node_cidr_mask_size_ipv4,
                    16..=30,
                )
            } else {
                (
                    "nodeIPAM.nodeCIDRMaskSizeIPv6",
                    c.node_cidr_mask_size_ipv6,
                    64..=126,
                )
            };
            if !range.contains(&mask) {
                return Err(invalid(
                    field,
                    &mask,
                    &format!("must be between {} and {}", range.start(), range.end()),
                ));
            }
            if cidr.prefix() > mask {
                return Err(invalid(
                    field,
                    &mask,
                    &format!("is shorter than the mask of cluster CIDR {cidr}: a node block must fit in it"),
                ));
            }
            // IPv6: kube-controller-manager's limit, which Antrea keeps: the bitmap of blocks
            // stays small.
            if cidr.is_ipv6() && mask - cidr.prefix() > 16 {
                return Err(invalid(
                    field,
                    &mask,
                    &format!("cuts more than 2^16 node blocks from {cidr}; the difference to the cluster mask may be at most 16"),
                ));
            }
            cluster_cidrs.push((cidr, mask));
        }
        let mut service_cidrs = Vec::new();
        for (field, text, v4) in [
            ("nodeIPAM.serviceCIDR", &c.service_cidr, true),
            ("nodeIPAM.serviceCIDRv6", &c.service_cidr_v6, false),
        ] {
            if text.is_empty() {
                continue;
            }
            let cidr = parse_network(field, text)?;
            if cidr.is_ipv4() != v4 {
                return Err(invalid(
                    field,
                    text,
                    if v4 {
                        "must be an IPv4 CIDR (IPv6: serviceCIDRv6)"
                    } else {
                        "must be an IPv6 CIDR (IPv4: serviceCIDR)"
                    },
                ));
            }
            service_cidrs.push(cidr);
        }
        Ok(Some(NodeIpamSettings {
            cluster_cidrs,
            service_cidrs,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipam(yaml: &str) -> Result<Option<NodeIpamSettings>, ConfigError> {
        ControllerConfig::parse(yaml).unwrap().node_ipam()
    }

    fn field_of(e: ConfigError) -> &'static str {
        match e {
            ConfigError::Invalid { field, .. } => field,
            other => panic!("not a field error: {other}"),
        }
    }

    #[test]
    fn node_ipam_is_off_by_default_and_needs_both_switches() {
        assert_eq!(ipam("{}").unwrap(), None);
        let on = "nodeIPAM: {enableNodeIPAM: true, clusterCIDRs: [10.244.0.0/16]}";
        assert!(ipam(on).unwrap().is_some());
        let gate_off = format!("{on}\nfeatureGates: {{NodeIPAM: false}}");
        assert_eq!(ipam(&gate_off).unwrap(), None);
    }

    #[test]
    fn dual_stack_with_defaults() {
        let s = ipam(
            "nodeIPAM: {enableNodeIPAM: true, clusterCIDRs: [10.244.0.0/16, 'fd00:10:244::/56'], \
             serviceCIDR: 10.96.0.0/12, serviceCIDRv6: 'fd00:10:96::/112'}",
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            s.cluster_cidrs,
            vec![
                ("10.244.0.0/16".parse().unwrap(), 24),
                ("fd00:10:244::/56".parse().unwrap(), 64)
            ]
        );
        assert_eq!(s.service_cidrs.len(), 2);
    }

    #[test]
    fn invalid_values_name_their_field() {
        let cases = [
            ("clusterCIDRs: []", "nodeIPAM.clusterCIDRs"),
            (
                "clusterCIDRs: [10.0.0.0/8, 10.244.0.0/16]",
                "nodeIPAM.clusterCIDRs",
            ),
            ("clusterCIDRs: [not-a-cidr]", "nodeIPAM.clusterCIDRs"),
            ("clusterCIDRs: [10.244.0.1/16]", "nodeIPAM.clusterCIDRs"),
            (
                "clusterCIDRs: [10.244.0.0/16], nodeCIDRMaskSizeIPv4: 31",
                "nodeIPAM.nodeCIDRMaskSizeIPv4",
            ),
            (
                "clusterCIDRs: [10.244.0.0/26], nodeCIDRMaskSizeIPv4: 24",
                "nodeIPAM.nodeCIDRMaskSizeIPv4",
            ),
            (
                "clusterCIDRs: ['fd00::/40']",
                "nodeIPAM.nodeCIDRMaskSizeIPv6",
            ),
            (
                "clusterCIDRs: ['fd00::/56'], nodeCIDRMaskSizeIPv6: 127",
                "nodeIPAM.nodeCIDRMaskSizeIPv6",
            ),
            (
                "clusterCIDRs: [10.244.0.0/16], serviceCIDR: 'fd00::/112'",
                "nodeIPAM.serviceCIDR",
            ),
            (
                "clusterCIDRs: [10.244.0.0/16], serviceCIDRv6: 10.96.0.0/12",
                "nodeIPAM.serviceCIDRv6",
            ),
        ];
        for (yaml, field) in cases {
            let e = ipam(&format!("nodeIPAM: {{enableNodeIPAM: true, {yaml}}}")).unwrap_err();
            let text = e.to_string();
            assert_eq!(field_of(e), field, "{yaml}: {text}");
        }
    }

    #[test]
    fn unknown_keys_are_rejected() {
        assert!(ControllerConfig::parse("nodeIPAM: {enable: true}").is_err());
        assert!(ControllerConfig::parse("featureGates: {Egress: true}").is_err());
    }
}
