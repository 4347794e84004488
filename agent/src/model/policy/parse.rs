//! Checks a NetworkPolicy once, into the shape the compiler walks. Every problem is reported with
//! its field path; a policy with any problem is marked broken and then only isolates.

use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
};

use super::{
    ports::{parse_port, PortMatch},
    prefix::Prefix,
    selector::Selector,
    Direction, PolicyError,
};

/// A problem in one field of a policy (the policy's name is added by the caller). ExternalIPPool
/// checks (`crate::external_ip`) use it too: they share the label selector checks.
#[derive(Clone, Debug)]
pub(crate) struct FieldError {
    pub(crate) field: String,
    pub(crate) value: String,
    pub(crate) reason: String,
}

impl FieldError {
    pub(crate) fn new(
        field: impl Into<String>,
        value: impl Into<String>,
        reason: impl Into<String>,
    ) -> FieldError {
        FieldError {
            field: field.into(),
            value: value.into(),
            reason: reason.into(),
        }
    }

    pub(super) fn for_policy(self, policy: &str) -> PolicyError {
        PolicyError {
            policy: policy.to_string(),
            field: self.field,
            value: self.value,
            reason: self.reason,
        }
    }
}

pub(super) struct ParsedPolicy {
    /// "namespace/name", how errors and `sluicectl` name the policy.
    pub key: String,
    pub namespace: String,
    /// `None` when `spec.podSelector` is malformed: the policy then selects (isolates) every
    /// pod of its namespace rather than none.
    pub selector: Option<Selector>,
    /// Indexed by `Direction::index`.
    pub isolates: [bool; 2],
    pub rules: [Vec<Rule>; 2],
    /// Any error: no allow entries from this policy.
    pub broken: bool,
}

impl ParsedPolicy {
    pub(super) fn rules(&self, direction: Direction) -> &[Rule] {
        &self.rules[direction.index()]
    }
}

pub(super) struct Rule {
    /// `None`: every peer (the list was absent or empty).
    pub peers: Option<Vec<Peer>>,
    /// Empty: every protocol and port.
    pub ports: Vec<PortMatch>,
}

pub(super) enum Peer {
    Pods {
        namespaces: Namespaces,
        pods: Selector,
    },
    Block(Block),
}

pub(super) enum Namespaces {
    /// Only the policy's own namespace (a peer with a podSelector alone).
    Own,
    Matching(Selector),
}

/// An ipBlock: the addresses of `cidr` outside every `except`.
pub(super) struct Block {
    pub cidr: Prefix,
    pub except: Vec<Prefix>,
}

impl Block {
    pub(super) fn admits(&self, prefix: &Prefix) -> bool {
        self.cidr.contains(prefix) && !self.except.iter().any(|x| x.contains(prefix))
    }
}

pub(super) fn parse_policy(np: &NetworkPolicy) -> (ParsedPolicy, Vec<FieldError>) {
    let namespace = np
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let name = np.metadata.name.as_deref().unwrap_or_default();
    let empty = NetworkPolicySpec::default();
    let spec = np.spec.as_ref().unwrap_or(&empty);
    let mut errors = Vec::new();

    let selector = match &spec.pod_selector {
        None => Some(Selector::all()),
        Some(sel) => Selector::parse(sel, "spec.podSelector", &mut errors),
    };
    let isolates = policy_types(spec, &mut errors);
    let ingress = spec
        .ingress
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, rule)| {
            let at = format!("spec.ingress[{i}]");
            let peers = parse_peers(&at, "from", rule.from.as_deref(), &mut errors);
            let ports = parse_ports(&at, rule.ports.as_deref(), &mut errors);
            Rule { peers, ports }
        })
        .collect();
    let egress = spec
        .egress
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, rule)| {
            let at = format!("spec.egress[{i}]");
            let peers = parse_peers(&at, "to", rule.to.as_deref(), &mut errors);
            let ports = parse_ports(&at, rule.ports.as_deref(), &mut errors);
            Rule { peers, ports }
        })
        .collect();
    let policy = ParsedPolicy {
        key: format!("{namespace}/{name}"),
        namespace,
        selector,
        isolates,
        rules: [ingress, egress],
        broken: !errors.is_empty(),
    };
    (policy, errors)
}

/// Kubernetes' defaulting: without policyTypes a policy is about ingress, and about egress too
/// when it has egress rules. An unknown type is an error that isolates both directions, since
/// what the author meant cannot be known.
fn policy_types(spec: &NetworkPolicySpec, errors: &mut Vec<FieldError>) -> [bool; 2] {
    let declared = spec.policy_types.as_deref().unwrap_or_default();
    if declared.is_empty() {
        let has_egress = spec.egress.as_ref().is_some_and(|rules| !rules.is_empty());
        return [true, has_egress];
    }
    let mut isolates = [false; 2];
    for (i, kind) in declared.iter().enumerate() {
        match kind.as_str() {
            "Ingress" => isolates[Direction::Ingress.index()] = true,
            "Egress" => isolates[Direction::Egress.index()] = true,
            other => {
                errors.push(FieldError::new(
                    format!("spec.policyTypes[{i}]"),
                    other,
                    "unknown policy type (expected Ingress or Egress)",
                ));
                return [true, true];
            }
        }
    }
    isolates
}

fn parse_peers(
    at: &str,
    list_name: &str,
    peers: Option<&[NetworkPolicyPeer]>,
    errors: &mut Vec<FieldError>,
) -> Option<Vec<Peer>> {
    let peers = peers.filter(|list| !list.is_empty())?;
    let parsed = peers
        .iter()
        .enumerate()
        .filter_map(|(j, peer)| parse_peer(&format!("{at}.{list_name}[{j}]"), peer, errors))
        .collect();
    Some(parsed)
}

fn parse_peer(at: &str, peer: &NetworkPolicyPeer, errors: &mut Vec<FieldError>) -> Option<Peer> {
    let shown = || serde_json::to_string(peer).unwrap_or_default();
    match (&peer.ip_block, &peer.namespace_selector, &peer.pod_selector) {
        (Some(block), None, None) => parse_block(&format!("{at}.ipBlock"), block, errors),
        (Some(_), _, _) => {
            errors.push(FieldError::new(
                at,
                shown(),
                "ipBlock cannot be combined with podSelector or namespaceSelector",
            ));
            None
        }
        (None, None, None) => {
            errors.push(FieldError::new(
                at,
                shown(),
                "a peer needs podSelector, namespaceSelector or ipBlock",
            ));
            None
        }
        (None, namespaces, pods) => {
            let namespaces = match namespaces {
                None => Some(Namespaces::Own),
                Some(sel) => Selector::parse(sel, &format!("{at}.namespaceSelector"), errors)
                    .map(Namespaces::Matching),
            };
            let pods = match pods {
                None => Some(Selector::all()),
                Some(sel) => Selector::parse(sel, &format!("{at}.podSelector"), errors),
            };
            Some(Peer::Pods {
                namespaces: namespaces?,
                pods: pods?,
            })
        }
    }
}

fn parse_block(at: &str, block: &IPBlock, errors: &mut Vec<FieldError>) -> Option<Peer> {
    let cidr = match Prefix::parse(&block.cidr) {
        Ok(cidr) => cidr,
        Err(reason) => {
            errors.push(FieldError::new(format!("{at}.cidr"), &block.cidr, reason));
            return None;
        }
    };
    let mut except = Vec::new();
    for (k, text) in block.except.iter().flatten().enumerate() {
        let field = format!("{at}.except[{k}]");
        match Prefix::parse(text) {
            Err(reason) => errors.push(FieldError::new(field, text, reason)),
            Ok(x) if x.len() > cidr.len() && cidr.contains(&x) => except.push(x),
            Ok(_) => errors.push(FieldError::new(
                field,
                text,
                format!("not strictly inside the cidr {cidr}"),
            )),
        }
    }
    Some(Peer::Block(Block { cidr, except }))
}

fn parse_ports(
    at: &str,
    ports: Option<&[NetworkPolicyPort]>,
    errors: &mut Vec<FieldError>,
) -> Vec<PortMatch> {
    ports
        .unwrap_or_default()
        .iter()
        .enumerate()
        .filter_map(|(j, port)| parse_port(&format!("{at}.ports[{j}]"), port, errors))
        .collect()
}
