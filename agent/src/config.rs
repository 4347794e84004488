//! The agent's configuration file (YAML) and its validation.
//!
//! Every rejected value is reported with its field name, the value and the reason.

use std::{net::IpAddr, path::PathBuf};

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

pub const DEFAULT_GATEWAY: &str = "sluice-gw0";

/// Which datapath drives this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DatapathKind {
    Ebpf,
    Ovs,
    /// eBPF where the kernel supports it, OVS otherwise.
    Auto,
}

/// How TC programs are attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TcAttachMode {
    /// tcx links on kernels ≥ 6.6, netlink (clsact + cls_bpf) below.
    #[default]
    Auto,
    Tcx,
    /// The pre-6.6 path, forced: clsact qdisc and a direct-action cls_bpf filter.
    Netlink,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    pub datapath: DatapathKind,
    /// This node's pod CIDR (until NodeIPAM hands it out from the Node object).
    #[serde(rename = "podCIDR")]
    pub pod_cidr: String,
    #[serde(default = "default_gateway")]
    pub gateway_name: String,
    #[serde(default = "default_mtu")]
    pub mtu: u32,
    #[serde(default)]
    pub tc_attach_mode: TcAttachMode,
    /// Masquerade pod traffic leaving the pod CIDR to the node's address.
    #[serde(default = "default_true")]
    pub masquerade: bool,
    /// Where maps and links are pinned (a bpffs directory).
    #[serde(default = "default_bpffs_dir")]
    pub bpffs_dir: PathBuf,
    /// Where IPAM reservations and endpoint records are kept across restarts.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// The unix socket `sluice-cni` talks to.
    #[serde(default = "default_cni_socket")]
    pub cni_socket: PathBuf,
}

fn default_gateway() -> String {
    DEFAULT_GATEWAY.to_string()
}
fn default_mtu() -> u32 {
    1500
}
fn default_true() -> bool {
    true
}
fn default_bpffs_dir() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/sluice")
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/sluice")
}
pub fn default_cni_socket() -> PathBuf {
    PathBuf::from("/var/run/sluice/cni.sock")
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("cannot parse the config file: {0}")]
    Parse(String),
    #[error("field `{field}`: value {value:?} is invalid: {reason}")]
    Invalid {
        field: &'static str,
        value: String,
        reason: String,
    },
    #[error(
        "field `datapath`: value {0:?} is not available yet: this build has only the eBPF \
         datapath (set `datapath: ebpf`)"
    )]
    DatapathNotAvailable(&'static str),
}

/// The configuration after validation: typed, and only what the agent can run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeNetwork {
    pub pod_cidr: IpNetwork,
    /// First host address of the pod CIDR, held by the gateway.
    pub gateway_ip: IpAddr,
    pub gateway_name: String,
    pub mtu: u32,
    pub tc_attach_mode: TcAttachMode,
    pub masquerade: bool,
}

impl Config {
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        serde_yaml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))
    }

    pub fn validate(&self) -> Result<NodeNetwork, ConfigError> {
        match self.datapath {
            DatapathKind::Ebpf => {}
            DatapathKind::Ovs => return Err(ConfigError::DatapathNotAvailable("ovs")),
            DatapathKind::Auto => return Err(ConfigError::DatapathNotAvailable("auto")),
        }
        let invalid = |field, value: &dyn ToString, reason: &str| ConfigError::Invalid {
            field,
            value: value.to_string(),
            reason: reason.to_string(),
        };
        let pod_cidr: IpNetwork =
            self.pod_cidr
                .parse()
                .map_err(|e: ipnetwork::IpNetworkError| {
                    invalid("podCIDR", &self.pod_cidr, &e.to_string())
                })?;
        if pod_cidr.network() != pod_cidr.ip() {
            return Err(invalid(
                "podCIDR",
                &self.pod_cidr,
                "host bits are set; give the network address",
            ));
        }
        let gateway_ip = match pod_cidr {
            IpNetwork::V4(net) if net.prefix() <= 29 => {
                IpAddr::V4((u32::from(net.network()) + 1).into())
            }
            IpNetwork::V4(_) => {
                return Err(invalid(
                    "podCIDR",
                    &self.pod_cidr,
                    "prefix longer than /29 leaves no room for pods",
                ))
            }
            IpNetwork::V6(_) => {
                return Err(invalid(
                    "podCIDR",
                    &self.pod_cidr,
                    "IPv6 pod CIDRs are not supported yet",
                ))
            }
        };
        if self.gateway_name.is_empty()
            || self.gateway_name.len() > 12
            || !self
                .gateway_name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(invalid(
                "gatewayName",
                &self.gateway_name,
                "must be 1-12 characters of [A-Za-z0-9_-] (the datapath peer adds \"-dp\")",
            ));
        }
        if !(1280..=9000).contains(&self.mtu) {
            return Err(invalid("mtu", &self.mtu, "must be between 1280 and 9000"));
        }
        Ok(NodeNetwork {
            pod_cidr,
            gateway_ip,
            gateway_name: self.gateway_name.clone(),
            mtu: self.mtu,
            tc_attach_mode: self.tc_attach_mode,
            masquerade: self.masquerade,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Result<NodeNetwork, ConfigError> {
        Config::parse(&format!("datapath: ebpf\npodCIDR: 10.244.1.0/24\n{extra}"))?.validate()
    }

    #[test]
    fn minimal_config_takes_defaults() {
        let node = config("").unwrap();
        assert_eq!(node.gateway_ip, "10.244.1.1".parse::<IpAddr>().unwrap());
        assert_eq!(node.gateway_name, "sluice-gw0");
        assert_eq!(node.mtu, 1500);
        assert_eq!(node.tc_attach_mode, TcAttachMode::Auto);
    }

    #[test]
    fn ovs_and_auto_are_known_but_not_available() {
        for kind in ["ovs", "auto"] {
            let err = Config::parse(&format!("datapath: {kind}\npodCIDR: 10.0.0.0/24"))
                .unwrap()
                .validate()
                .unwrap_err();
            assert!(err.to_string().contains("not available yet"), "{err}");
        }
    }

    #[test]
    fn unknown_datapath_and_fields_are_rejected() {
        let err = Config::parse("datapath: xdp\npodCIDR: 10.0.0.0/24").unwrap_err();
        assert!(err.to_string().contains("unknown variant `xdp`"), "{err}");
        let err = Config::parse("datapath: ebpf\npodCIDR: 10.0.0.0/24\npodCidr: x").unwrap_err();
        assert!(err.to_string().contains("unknown field `podCidr`"), "{err}");
    }

    #[test]
    fn invalid_values_name_field_value_and_reason() {
        let err = Config::parse("datapath: ebpf\npodCIDR: 10.0.0.5/24")
            .unwrap()
            .validate()
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "field `podCIDR`: value \"10.0.0.5/24\" is invalid: host bits are set; give the network address"
        );
        let err = Config::parse("datapath: ebpf\npodCIDR: 10.0.0.0/33")
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("field `podCIDR`: value \"10.0.0.0/33\""),
            "{err}"
        );
        let err = config("mtu: 100").unwrap_err();
        assert!(err.to_string().contains("field `mtu`"), "{err}");
        let err = config("gatewayName: a-name-far-too-long").unwrap_err();
        assert!(err.to_string().contains("field `gatewayName`"), "{err}");
        let err = config("tcAttachMode: clsact").unwrap_err();
        assert!(
            err.to_string().contains("unknown variant `clsact`"),
            "{err}"
        );
    }

    #[test]
    fn forced_netlink_attach() {
        assert_eq!(
            config("tcAttachMode: netlink").unwrap().tc_attach_mode,
            TcAttachMode::Netlink
        );
    }
}
