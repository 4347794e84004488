//! The agent's configuration file (YAML) and its validation.
//!
//! Every rejected value is reported with its field name, the value and the reason.

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf};

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};
use sluice_common::{map_names, MAX_ENDPOINTS};

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

/// How pods on different nodes reach each other (Antrea's `trafficEncapMode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum EncapMode {
    /// Through a tunnel between the nodes.
    #[default]
    #[serde(rename = "encap")]
    Encap,
    /// Routed over the node network: each node routes other nodes' pod CIDRs via their address.
    #[serde(rename = "noEncap")]
    NoEncap,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TunnelType {
    #[default]
    Vxlan,
    Geneve,
}

impl TunnelType {
    /// Bytes the outer headers take from the node MTU (IPv4 underlay).
    pub fn overhead(self) -> u32 {
        match self {
            TunnelType::Vxlan => 50,
            TunnelType::Geneve => 50,
        }
    }

    pub fn default_port(self) -> u16 {
        match self {
            TunnelType::Vxlan => 4789,
            TunnelType::Geneve => 6081,
        }
    }
}

/// Optional features, by Antrea's feature gate names. Unknown names are rejected like any other
/// unknown field.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureGates {
    /// LoadBalancer Service IPs from Antrea ExternalIPPools (`crate::external_ip`). On: the agent
    /// watches `externalippools.crd.antrea.io` (the CRD must be installed: the agent waits for its
    /// first list) and answers for the IPs sluice-controller assigned that its node owns.
    #[serde(rename = "ServiceExternalIP", default)]
    pub service_external_ip: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    pub datapath: DatapathKind,
    /// This node's pod CIDR. Optional with Kubernetes: the Node's `spec.podCIDR` is used (NodeIPAM).
    #[serde(rename = "podCIDR", default)]
    pub pod_cidr: Option<String>,
    /// The node this agent runs on; `NODE_NAME` in the environment wins. Without a node name the
    /// agent runs standalone (single node, no Kubernetes).
    #[serde(default)]
    pub node_name: Option<String>,
    /// kubeconfig for the API server; absent: the in-cluster service account.
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
    #[serde(default)]
    pub traffic_encap_mode: EncapMode,
    #[serde(default)]
    pub tunnel_type: TunnelType,
    /// Where `/healthz` and `/readyz` are served; absent: not served.
    #[serde(default)]
    pub health_address: Option<String>,
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
    /// The host's cgroup v2 hierarchy (or the directory holding it as `unified/`): the node's
    /// own sockets connecting to its NodePorts are balanced there, at connect. Absent: they
    /// are not (that traffic goes over loopback, which the TC programs never see).
    #[serde(default)]
    pub cgroup_dir: Option<PathBuf>,
    /// Where IPAM reservations and endpoint records are kept across restarts.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// The unix socket `sluice-cni` talks to.
    #[serde(default = "default_cni_socket")]
    pub cni_socket: PathBuf,
    /// CIDRs selecting the node addresses NodePorts are served on (Antrea's option); empty:
    /// every address of the Node object.
    #[serde(default)]
    pub node_port_addresses: Vec<String>,
    /// The cluster's Service CIDR (Antrea's option): the node reaches ClusterIPs in it through
    /// the datapath. Absent: only pods reach ClusterIPs.
    #[serde(rename = "serviceCIDR", default)]
    pub service_cidr: Option<String>,
    #[serde(default)]
    pub feature_gates: FeatureGates,
    /// Sizes of the datapath's maps by name (`sluice_common::map_names::RESIZABLE`), like
    /// Cilium's `bpf-*-map-max`; absent: the sizes the eBPF object declares. A pinned map of
    /// another size is replaced at start (see `datapath::ebpf::layout`).
    #[serde(default)]
    pub bpf_map_sizes: BTreeMap<String, u32>,
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

/// The configuration after validation: typed, and only what the agent can run. The pod CIDR may
/// still be unknown (it then comes from the Node object).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub pod_cidr: Option<IpNetwork>,
    pub kubernetes: Option<KubeSettings>,
    pub gateway_name: String,
    pub mtu: u32,
    pub encap: EncapMode,
    pub tunnel_type: TunnelType,
    pub tc_attach_mode: TcAttachMode,
    pub masquerade: bool,
    pub health_address: Option<std::net::SocketAddr>,
    pub node_port_addresses: Vec<IpNetwork>,
    pub service_cidr: Option<IpNetwork>,
    pub feature_gates: FeatureGates,
    /// Every resizable map with the size it is to have.
    pub map_sizes: Vec<(&'static str, u32)>,
}

impl Settings {
    /// The node addresses NodePorts are served on.
    pub fn node_port_addresses(&self, node_addresses: &[IpAddr]) -> Vec<IpAddr> {
        node_addresses
            .iter()
            .filter(|ip| {
                self.node_port_addresses.is_empty()
                    || self
                        .node_port_addresses
                        .iter()
                        .any(|net| net.contains(**ip))
            })
            .copied()
            .collect()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubeSettings {
    pub node_name: String,
    pub kubeconfig: Option<PathBuf>,
}

/// The node's pod network, once its pod CIDR is known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeNetwork {
    pub pod_cidr: IpNetwork,
    /// First host address of the pod CIDR, held by the gateway.
    pub gateway_ip: IpAddr,
    pub gateway_name: String,
    /// The pod interfaces' MTU: the node MTU less the tunnel overhead in encap mode.
    pub mtu: u32,
    pub encap: EncapMode,
    pub tunnel_type: TunnelType,
    pub tc_attach_mode: TcAttachMode,
    pub masquerade: bool,
    pub service_cidr: Option<IpNetwork>,
    /// NetworkPolicy comes from Kubernetes: a new pod allows nothing until its policies are
    /// known (standalone, nothing ever isolates a pod).
    pub isolate_new_pods: bool,
}

pub(crate) fn invalid(field: &'static str, value: &dyn ToString, reason: &str) -> ConfigError {
    ConfigError::Invalid {
        field,
        value: value.to_string(),
        reason: reason.to_string(),
    }
}

/// A CIDR given as its network address.
pub(crate) fn parse_network(field: &'static str, text: &str) -> Result<IpNetwork, ConfigError> {
    let cidr: IpNetwork = text
        .parse()
        .map_err(|e: ipnetwork::IpNetworkError| invalid(field, &text, &e.to_string()))?;
    if cidr.network() != cidr.ip() {
        return Err(invalid(
            field,
            &text,
            "host bits are set; give the network address",
        ));
    }
    Ok(cidr)
}

/// A pod CIDR as the config or a Node object gives it: IPv4, network address, room for pods.
pub fn parse_pod_cidr(field: &'static str, text: &str) -> Result<(IpNetwork, IpAddr), ConfigError> {
    let pod_cidr = parse_network(field, text)?;
    let gateway_ip = match pod_cidr {
        // Every pod address gets an entry in the per-pod maps, which cannot grow.
        IpNetwork::V4(net) if net.prefix() < 32 - MAX_ENDPOINTS.ilog2() as u8 => {
            return Err(invalid(
                field,
                &text,
                &format!("holds more addresses than the datapath has room for pods ({MAX_ENDPOINTS}); use /16 or longer"),
            ))
        }
        IpNetwork::V4(net) if net.prefix() <= 29 => {
            IpAddr::V4((u32::from(net.network()) + 1).into())
        }
        IpNetwork::V4(_) => {
            return Err(invalid(
                field,
                &text,
                "prefix longer than /29 leaves no room for pods",
            ))
        }
        IpNetwork::V6(_) => {
            return Err(invalid(
                field,
                &text,
                "IPv6 pod CIDRs are not supported yet",
            ))
        }
    };
    Ok((pod_cidr, gateway_ip))
}

impl Settings {
    pub fn node_network(&self, pod_cidr: IpNetwork) -> Result<NodeNetwork, ConfigError> {
        let (pod_cidr, gateway_ip) = parse_pod_cidr("podCIDR", &pod_cidr.to_string())?;
        // Without Kubernetes the node is alone: nothing to tunnel to.
        let encap = if self.kubernetes.is_some() {
            self.encap
        } else {
            EncapMode::NoEncap
        };
        let mtu = match encap {
            EncapMode::Encap => self.mtu - self.tunnel_type.overhead(),
            EncapMode::NoEncap => self.mtu,
        };
        Ok(NodeNetwork {
            pod_cidr,
            gateway_ip,
            gateway_name: self.gateway_name.clone(),
            mtu,
            encap,
            tunnel_type: self.tunnel_type,
            tc_attach_mode: self.tc_attach_mode,
            masquerade: self.masquerade,
            service_cidr: self.service_cidr,
            isolate_new_pods: self.kubernetes.is_some(),
        })
    }
}

impl Config {
    fn map_sizes(&self) -> Result<Vec<(&'static str, u32)>, ConfigError> {
        for (name, &size) in &self.bpf_map_sizes {
            let value = format!("{name}: {size}");
            if !map_names::RESIZABLE.iter().any(|(n, _)| n == name) {
                let known: Vec<&str> = map_names::RESIZABLE.iter().map(|(n, _)| *n).collect();
                return Err(invalid(
                    "bpfMapSizes",
                    &value,
                    &format!("no such resizable map; these are: {}", known.join(", ")),
                ));
            }
            if size == 0 {
                return Err(invalid(
                    "bpfMapSizes",
                    &value,
                    "a map needs room for an entry",
                ));
            }
        }
        Ok(map_names::RESIZABLE
            .iter()
            .map(|&(name, default)| {
                (
                    name,
                    self.bpf_map_sizes.get(name).copied().unwrap_or(default),
                )
            })
            .collect())
    }

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        serde_yaml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))
    }

    /// `node_name_env`: `NODE_NAME` from the environment, which overrides `nodeName`.
    pub fn validate(&self, node_name_env: Option<String>) -> Result<Settings, ConfigError> {
        match self.datapath {
            DatapathKind::Ebpf => {}
            DatapathKind::Ovs => return Err(ConfigError::DatapathNotAvailable("ovs")),
            DatapathKind::Auto => return Err(ConfigError::DatapathNotAvailable("auto")),
        }
        let pod_cidr = match &self.pod_cidr {
            Some(text) => Some(parse_pod_cidr("podCIDR", text)?.0),
            None => None,
        };
        let node_name = node_name_env
            .filter(|n| !n.is_empty())
            .or_else(|| self.node_name.clone());
        let kubernetes = match node_name {
            Some(name) if name.is_empty() => {
                return Err(invalid("nodeName", &name, "must not be empty"))
            }
            Some(node_name) => Some(KubeSettings {
                node_name,
                kubeconfig: self.kubeconfig.clone(),
            }),
            None if pod_cidr.is_none() => return Err(ConfigError::Invalid {
                field: "podCIDR",
                value: String::new(),
                reason:
                    "is required when the agent runs without Kubernetes (no nodeName, no NODE_NAME)"
                        .into(),
            }),
            None => None,
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
        let health_address = match &self.health_address {
            Some(text) => Some(
                text.parse()
                    .map_err(|_| invalid("healthAddress", text, "must be ip:port"))?,
            ),
            None => None,
        };
        let node_port_addresses = self
            .node_port_addresses
            .iter()
            .map(|text| {
                text.parse::<IpNetwork>()
                    .map_err(|e| invalid("nodePortAddresses", text, &e.to_string()))
            })
            .collect::<Result<_, _>>()?;
        let service_cidr = match &self.service_cidr {
            Some(text) => {
                let cidr: IpNetwork = text.parse().map_err(|e: ipnetwork::IpNetworkError| {
                    invalid("serviceCIDR", text, &e.to_string())
                })?;
                if cidr.network() != cidr.ip() || !cidr.is_ipv4() {
                    return Err(invalid(
                        "serviceCIDR",
                        text,
                        "must be an IPv4 network address (serviceCIDRv6 is not supported yet)",
                    ));
                }
                Some(cidr)
            }
            None => None,
        };
        let map_sizes = self.map_sizes()?;
        Ok(Settings {
            map_sizes,
            service_cidr,
            node_port_addresses,
            pod_cidr,
            kubernetes,
            gateway_name: self.gateway_name.clone(),
            mtu: self.mtu,
            encap: self.traffic_encap_mode,
            tunnel_type: self.tunnel_type,
            tc_attach_mode: self.tc_attach_mode,
            masquerade: self.masquerade,
            health_address,
            feature_gates: self.feature_gates,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Result<NodeNetwork, ConfigError> {
        let settings = Config::parse(&format!("datapath: ebpf\npodCIDR: 10.244.1.0/24\n{extra}"))?
            .validate(Some("node-1".into()))?;
        settings.node_network(settings.pod_cidr.unwrap())
    }

    #[test]
    fn map_sizes_are_checked_by_name_and_value() {
        let sizes = |text: &str| {
            Config::parse(&format!("datapath: ebpf\npodCIDR: 10.0.0.0/24\n{text}"))
                .unwrap()
                .validate(None)
                .map(|s| s.map_sizes)
        };
        let sizes_ok = sizes("bpfMapSizes: {POLICY_EXACT: 64}").unwrap();
        assert!(sizes_ok.contains(&("POLICY_EXACT", 64)));
        assert!(sizes_ok.contains(&("IPCACHE", sluice_common::MAX_IPCACHE)));
        let unknown = sizes("bpfMapSizes: {ENDPOINTS: 64}")
            .unwrap_err()
            .to_string();
        assert!(
            unknown.contains("`bpfMapSizes`") && unknown.contains("ENDPOINTS: 64"),
            "{unknown}"
        );
        assert!(unknown.contains("no such resizable map; these are: REMOTE_NODES, IPCACHE"));
        let zero = sizes("bpfMapSizes: {IPCACHE: 0}").unwrap_err().to_string();
        assert!(zero.contains("a map needs room for an entry"), "{zero}");
    }

    #[test]
    fn a_pod_cidr_wider_than_the_per_pod_maps_is_refused() {
        let err = parse_pod_cidr("podCIDR", "10.0.0.0/15")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("more addresses than the datapath has room for pods (65536)"),
            "{err}"
        );
        assert!(parse_pod_cidr("podCIDR", "10.0.0.0/16").is_ok());
    }

    #[test]
    fn minimal_config_takes_defaults() {
        let node = config("").unwrap();
        assert_eq!(node.encap, EncapMode::Encap);
        let standalone = Config::parse("datapath: ebpf\npodCIDR: 10.0.0.0/24")
            .unwrap()
            .validate(None)
            .unwrap();
        let alone = standalone
            .node_network(standalone.pod_cidr.unwrap())
            .unwrap();
        assert_eq!(
            (alone.encap, alone.mtu),
            (EncapMode::NoEncap, 1500),
            "standalone: no tunnel"
        );
        assert_eq!(node.mtu, 1450, "VXLAN overhead comes off the pod MTU");
        assert_eq!(node.gateway_ip, "10.244.1.1".parse::<IpAddr>().unwrap());
        assert_eq!(node.gateway_name, "sluice-gw0");
        assert_eq!(node.tc_attach_mode, TcAttachMode::Auto);
    }

    #[test]
    fn ovs_and_auto_are_known_but_not_available() {
        for kind in ["ovs", "auto"] {
            let err = Config::parse(&format!("datapath: {kind}\npodCIDR: 10.0.0.0/24"))
                .unwrap()
                .validate(None)
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
            .validate(None)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "field `podCIDR`: value \"10.0.0.5/24\" is invalid: host bits are set; give the network address"
        );
        let err = Config::parse("datapath: ebpf\npodCIDR: 10.0.0.0/33")
            .unwrap()
            .validate(None)
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
        let err = config("nodePortAddresses: [192.168.77.0/24, 10.0.0.0/40]").unwrap_err();
        assert_eq!(
            err.to_string(),
            "field `nodePortAddresses`: value \"10.0.0.0/40\" is invalid: invalid address: 10.0.0.0/40"
        );
        let err = config("serviceCIDR: 10.96.0.1/16").unwrap_err();
        assert!(err.to_string().starts_with("field `serviceCIDR`"), "{err}");
        let err = config("tcAttachMode: clsact").unwrap_err();
        assert!(
            err.to_string().contains("unknown variant `clsact`"),
            "{err}"
        );
    }

    #[test]
    fn node_port_addresses_select_node_addresses() {
        let addresses: Vec<IpAddr> =
            vec!["192.168.77.1".parse().unwrap(), "10.0.0.1".parse().unwrap()];
        let settings = |extra: &str| {
            Config::parse(&format!("datapath: ebpf\npodCIDR: 10.244.1.0/24\n{extra}"))
                .unwrap()
                .validate(None)
                .unwrap()
        };
        assert_eq!(settings("").node_port_addresses(&addresses), addresses);
        assert_eq!(
            settings("nodePortAddresses: [192.168.0.0/16]").node_port_addresses(&addresses),
            vec![addresses[0]]
        );
    }

    #[test]
    fn kubernetes_mode_needs_a_node_name_standalone_needs_a_pod_cidr() {
        let err = Config::parse("datapath: ebpf")
            .unwrap()
            .validate(None)
            .unwrap_err();
        assert!(
            err.to_string().contains("field `podCIDR`")
                && err.to_string().contains("without Kubernetes"),
            "{err}"
        );
        let settings = Config::parse("datapath: ebpf")
            .unwrap()
            .validate(Some("node-1".into()))
            .unwrap();
        assert_eq!(settings.kubernetes.unwrap().node_name, "node-1");
        let settings = Config::parse("datapath: ebpf\nnodeName: a")
            .unwrap()
            .validate(Some("b".into()))
            .unwrap();
        assert_eq!(
            settings.kubernetes.unwrap().node_name,
            "b",
            "NODE_NAME wins"
        );
    }

    #[test]
    fn encap_modes_and_tunnel_types() {
        let node = config("trafficEncapMode: noEncap").unwrap();
        assert_eq!((node.encap, node.mtu), (EncapMode::NoEncap, 1500));
        assert_eq!(
            config("tunnelType: geneve").unwrap().tunnel_type,
            TunnelType::Geneve
        );
        let err = config("trafficEncapMode: hybrid").unwrap_err();
        assert!(
            err.to_string().contains("unknown variant `hybrid`"),
            "{err}"
        );
        let err = config("healthAddress: nope").unwrap_err();
        assert!(err.to_string().contains("field `healthAddress`"), "{err}");
    }

    #[test]
    fn the_documented_example_config_is_valid() {
        let example = include_str!("../../deploy/agent.example.yaml");
        let settings = Config::parse(example).unwrap().validate(None).unwrap();
        assert_eq!(settings.kubernetes.unwrap().node_name, "node-1");
        assert_eq!(
            settings.health_address,
            Some("0.0.0.0:9421".parse().unwrap())
        );
        assert_eq!(settings.feature_gates, FeatureGates::default());
    }

    #[test]
    fn feature_gates_default_off_and_unknown_gates_are_rejected() {
        let base = "datapath: ebpf\npodCIDR: 10.0.0.0/24\n";
        let gates = |extra: &str| {
            Config::parse(&format!("{base}{extra}"))
                .and_then(|c| c.validate(None))
                .map(|s| s.feature_gates)
        };
        assert!(!gates("").unwrap().service_external_ip);
        assert!(!gates("featureGates: {}").unwrap().service_external_ip);
        assert!(
            gates("featureGates:\n  ServiceExternalIP: true")
                .unwrap()
                .service_external_ip
        );
        let err = gates("featureGates:\n  Egress: true").unwrap_err();
        assert!(err.to_string().contains("unknown field `Egress`"), "{err}");
    }

    #[test]
    fn forced_netlink_attach() {
        assert_eq!(
            config("tcAttachMode: netlink").unwrap().tc_attach_mode,
            TcAttachMode::Netlink
        );
    }
}
