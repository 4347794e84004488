//! Protocols and ports: NetworkPolicy port entries, container ports (for named ports) and the
//! decomposition of a port range into the LPM prefixes of POLICY.

use k8s_openapi::{
    api::networking::v1::NetworkPolicyPort, apimachinery::pkg::util::intstr::IntOrString,
};

use super::parse::FieldError;
use crate::k8s::Pod;

pub(super) const TCP: u8 = 6;
pub(super) const UDP: u8 = 17;
pub(super) const SCTP: u8 = 132;

/// Kubernetes spells protocols in capitals only; anything else is rejected by the API server.
pub(in crate::model) fn protocol_number(name: &str) -> Option<u8> {
    match name {
        "TCP" => Some(TCP),
        "UDP" => Some(UDP),
        "SCTP" => Some(SCTP),
        _ => None,
    }
}

/// The name Kubernetes gives a protocol number (`proto<n>` for one it has no name for).
pub fn protocol_name(proto: u8) -> String {
    match proto {
        TCP => "TCP".into(),
        UDP => "UDP".into(),
        SCTP => "SCTP".into(),
        other => format!("proto{other}"),
    }
}

/// What one entry of a rule's `ports` admits (an absent or empty list admits everything and
/// is represented by an empty `Vec`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum PortMatch {
    /// Every port of the protocol.
    Proto(u8),
    /// `first..=last` of the protocol (a single port when equal).
    Range { proto: u8, first: u16, last: u16 },
    /// A container port name, resolved against the destination pod.
    Named { proto: u8, name: String },
}

pub(super) fn parse_port(
    at: &str,
    port: &NetworkPolicyPort,
    errors: &mut Vec<FieldError>,
) -> Option<PortMatch> {
    let proto_name = port.protocol.as_deref().unwrap_or("TCP");
    let Some(proto) = protocol_number(proto_name) else {
        errors.push(FieldError::new(
            format!("{at}.protocol"),
            proto_name,
            "unknown protocol (expected TCP, UDP or SCTP)",
        ));
        return None;
    };
    let numeric_only = |end: i32| {
        FieldError::new(
            format!("{at}.endPort"),
            end.to_string(),
            "endPort needs a numeric port",
        )
    };
    match (&port.port, port.end_port) {
        (None, None) => Some(PortMatch::Proto(proto)),
        (None, Some(end)) | (Some(IntOrString::String(_)), Some(end)) => {
            errors.push(numeric_only(end));
            None
        }
        (Some(IntOrString::Int(number)), end) => {
            let Some(first) = valid_port(*number) else {
                errors.push(FieldError::new(
                    format!("{at}.port"),
                    number.to_string(),
                    "port must be in 1..=65535",
                ));
                return None;
            };
            let last = match end {
                None => first,
                Some(end) if end < *number => {
                    errors.push(FieldError::new(
                        format!("{at}.endPort"),
                        end.to_string(),
                        format!("endPort is below port {number}"),
                    ));
                    return None;
                }
                Some(end) => match valid_port(end) {
                    Some(last) => last,
                    None => {
                        errors.push(FieldError::new(
                            format!("{at}.endPort"),
                            end.to_string(),
                            "endPort must be in 1..=65535",
                        ));
                        return None;
                    }
                },
            };
            Some(PortMatch::Range { proto, first, last })
        }
        // A name no pod declares (yet) matches nothing, as in Kubernetes: not an error, which
        // would void the policy's other rules too.
        (Some(IntOrString::String(name)), None) => Some(PortMatch::Named {
            proto,
            name: name.clone(),
        }),
    }
}

pub(in crate::model) fn valid_port(number: i32) -> Option<u16> {
    u16::try_from(number).ok().filter(|&p| p != 0)
}

/// The port a pod declares under `name` for `proto` (the lowest, should it declare several):
/// its containers' and its sidecars' (init containers that keep running, `restartPolicy:
/// Always`), which serve traffic like any container. Looked up when a rule names a port, not
/// kept for every pod of the cluster.
pub(super) fn named_port(pod: &Pod, name: &str, proto: u8) -> Option<u16> {
    let spec = pod.spec.as_ref()?;
    let sidecars = spec
        .init_containers
        .iter()
        .flatten()
        .filter(|c| c.restart_policy.as_deref() == Some("Always"));
    spec.containers
        .iter()
        .chain(sidecars)
        .flat_map(|c| c.ports.iter().flatten())
        .filter(|p| {
            !name.is_empty()
                && p.name.as_deref() == Some(name)
                && protocol_number(p.protocol.as_deref().unwrap_or("TCP")) == Some(proto)
        })
        .filter_map(|p| valid_port(p.container_port))
        .min()
}

/// The fewest `(first port, significant bits)` prefixes that cover exactly `first..=last`
/// (empty when `first > last`). Each is an aligned block of `2^(16 - bits)` ports.
pub fn port_prefixes(first: u16, last: u16) -> Vec<(u16, u8)> {
    let mut out = Vec::new();
    let (mut start, end) = (u32::from(first), u32::from(last));
    while start <= end {
        // The largest block aligned at `start` that does not run past `end`.
        let mut size: u32 = if start == 0 {
            1 << 16
        } else {
            1 << start.trailing_zeros().min(16)
        };
        while start + size - 1 > end {
            size >>= 1;
        }
        out.push((start as u16, (16 - size.trailing_zeros()) as u8));
        start += size;
    }
    out
}
