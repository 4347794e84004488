//! The CNI: types shared by the plugin binary (`sluice-cni`, run by the container runtime) and
//! the agent, which does the work behind a root-only unix socket.

mod gc;
pub mod install;
pub mod plugin;
pub mod rounds;
pub mod server;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// CNI spec versions whose result format this plugin writes (they share one shape).
pub const SUPPORTED_VERSIONS: [&str; 3] = ["0.4.0", "1.0.0", "1.1.0"];

/// Error codes: 1-11 as the CNI spec defines them, 100+ Sluice's own.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE_FAILED: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// STATUS: the plugin cannot serve ADD (the agent is not running).
    pub const PLUGIN_NOT_AVAILABLE: u32 = 50;
    /// STATUS: the plugin cannot serve ADD, and existing pods may have limited connectivity (the
    /// agent's programming keeps failing).
    pub const LIMITED_CONNECTIVITY: u32 = 51;
    /// No free address left in the node's pod CIDR.
    pub const POOL_EXHAUSTED: u32 = 100;
    /// The datapath refused a change (map full, attach failed).
    pub const DATAPATH: u32 = 101;
    /// CHECK found the pod's networking not as ADD left it.
    pub const CHECK_FAILED: u32 = 102;
}

/// A CNI error as the spec's JSON.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("CNI error {code}: {msg}{}", if details.is_empty() { String::new() } else { format!(": {details}") })]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> CniError {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl ToString) -> CniError {
        self.details = details.to_string();
        self
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Command {
    Add,
    Del,
    Check,
    /// CNI 1.1: whether ADD can be served.
    Status,
    /// CNI 1.1: remove every attachment not in the runtime's valid list.
    Gc,
}

/// An attachment as CNI 1.1's GC names it (`cni.dev/valid-attachments`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// The network configuration the runtime passes on stdin. Fields other plugins or the runtime
/// add (`prevResult`, `runtimeConfig`, ...) are accepted and ignored.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    #[serde(rename = "type")]
    pub plugin_type: String,
    /// The agent's CNI socket; defaults to `config::default_cni_socket()`.
    #[serde(default)]
    pub socket: Option<PathBuf>,
    /// GC: the attachments the runtime still uses.
    #[serde(default, rename = "cni.dev/valid-attachments")]
    pub valid_attachments: Option<Vec<Attachment>>,
}

/// What the plugin asks of the agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRequest {
    pub command: Command,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    /// The Pod the runtime wires (CNI_ARGS `K8S_POD_NAMESPACE`, `K8S_POD_NAME`), so the agent
    /// can judge its policies before the kubelet has written its addresses to the API.
    #[serde(default)]
    pub pod: Option<PodRef>,
    /// GC: the attachments to keep.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub valid_attachments: Vec<Attachment>,
}

/// A Pod by namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for PodRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentReply {
    Ok(Option<CniResult>),
    Error(CniError),
}

/// The ADD result (spec 1.0.0 shape; `cniVersion` is set by the plugin from the config).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CniResult {
    #[serde(default)]
    pub cni_version: String,
    pub interfaces: Vec<Interface>,
    pub ips: Vec<IpConfig>,
    pub routes: Vec<Route>,
    pub dns: serde_json::Value,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    pub mac: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    pub address: String,
    pub gateway: String,
    pub interface: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub dst: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<String>,
}

/// CNI_CONTAINERID: "alphanumeric characters, hyphen, underscore and period" (the spec), which
/// also keeps it safe as part of a file name.
pub fn valid_container_id(id: &str) -> bool {
    !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// CNI_IFNAME: a Linux interface name.
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
}
