//! Checks a Service once, into the shape the compiler walks: the addresses and ports that can be
//! applied, each problem reported with its field path.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Service as K8sService, ServicePort};

use super::{ServiceError, DEFAULT_AFFINITY_TIMEOUT};
use crate::model::policy::{protocol_number, valid_port};

/// A Service checked once, with only the parts that can be applied.
pub(super) struct Parsed<'a> {
    /// "namespace/name".
    pub(super) key: String,
    pub(super) namespace: &'a str,
    pub(super) name: &'a str,
    pub(super) cluster_ips: Vec<Address>,
    /// externalIPs, then LoadBalancer ingress IPs: reached from inside and from outside.
    pub(super) external_ips: Vec<Address>,
    pub(super) ports: Vec<Port<'a>>,
    pub(super) internal_local: bool,
    pub(super) external_local: bool,
    /// sessionAffinity ClientIP: the timeout in seconds.
    pub(super) affinity: Option<u32>,
    pub(super) health_check_port: Option<u16>,
}

impl Parsed<'_> {
    pub(super) fn has_family(&self, ip: IpAddr) -> bool {
        has_family(&self.cluster_ips, ip)
    }
}

/// kube-proxy serves a family only for a Service with a ClusterIP of that family.
fn has_family(cluster_ips: &[Address], ip: IpAddr) -> bool {
    cluster_ips.iter().any(|a| a.ip.is_ipv6() == ip.is_ipv6())
}

pub(super) struct Address {
    /// Where the address was written, for errors.
    pub(super) field: String,
    pub(super) ip: IpAddr,
}

pub(super) struct Port<'a> {
    /// "spec.ports[i]".
    pub(super) field: String,
    pub(super) name: &'a str,
    pub(super) proto: u8,
    pub(super) port: u16,
    pub(super) node_port: Option<u16>,
}

/// Labels that take a Service away from the cluster's proxy, as kube-proxy and AntreaProxy
/// honour them: `service.kubernetes.io/headless` (any value: its endpoints are for DNS only)
/// and `service.kubernetes.io/service-proxy-name` (any value: another proxy implements it).
pub(super) const NOT_PROXIED_LABELS: [&str; 2] = [
    "service.kubernetes.io/headless",
    "service.kubernetes.io/service-proxy-name",
];

/// `None` for what kube-proxy does not proxy at all: ExternalName and headless Services,
/// Services labelled for another proxy or for DNS only, and Services whose ClusterIP is not
/// allocated yet.
pub(super) fn parse_service<'a>(
    svc: &'a K8sService,
    errors: &mut Vec<ServiceError>,
) -> Option<Parsed<'a>> {
    let spec = svc.spec.as_ref()?;
    if let Some(labels) = &svc.metadata.labels {
        if NOT_PROXIED_LABELS.iter().any(|l| labels.contains_key(*l)) {
            return None;
        }
    }
    let type_ = spec.type_.as_deref().unwrap_or("ClusterIP");
    if type_ == "ExternalName" {
        return None;
    }
    let namespace = namespace_of(svc);
    let name = svc.metadata.name.as_deref().unwrap_or_default();
    let key = format!("{namespace}/{name}");
    let mut error = |field: String, value: &str, reason: &str| {
        errors.push(ServiceError {
            service: key.clone(),
            field,
            value: value.to_string(),
            reason: reason.to_string(),
        })
    };

    // clusterIPs is authoritative; clusterIP alone comes from clients older than dual-stack.
    let cluster_texts: Vec<(String, &String)> = match spec.cluster_ips.as_deref() {
        Some(ips) if !ips.is_empty() => ips
            .iter()
            .enumerate()
            .map(|(i, ip)| (format!("spec.clusterIPs[{i}]"), ip))
            .collect(),
        _ => spec
            .cluster_ip
            .iter()
            .map(|ip| ("spec.clusterIP".to_string(), ip))
            .collect(),
    };
    match cluster_texts.first() {
        None => return None,
        Some((_, ip)) if ip.is_empty() || *ip == "None" => return None,
        Some(_) => {}
    }
    let cluster_ips: Vec<Address> = cluster_texts
        .into_iter()
        .filter_map(|(field, text)| parse_address(field, text, &mut error))
        .collect();

    let external_texts = spec
        .external_ips
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, ip)| (format!("spec.externalIPs[{i}]"), ip));
    let ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_deref())
        .filter(|_| type_ == "LoadBalancer")
        .unwrap_or_default();
    // ipMode Proxy: the load balancer delivers to the node's address and NodePort, never to
    // its own IP, so kube-proxy leaves that IP alone. Hostname-only ingress has no IP at all.
    let ingress_texts = ingress.iter().enumerate().filter_map(|(i, ing)| {
        let ip = ing.ip.as_ref()?;
        (ing.ip_mode.as_deref() != Some("Proxy"))
            .then(|| (format!("status.loadBalancer.ingress[{i}].ip"), ip))
    });
    let mut external_ips = Vec::new();
    for (field, text) in external_texts.chain(ingress_texts) {
        let Some(address) = parse_address(field, text, &mut error) else {
            continue;
        };
        if has_family(&cluster_ips, address.ip) {
            external_ips.push(address);
        } else {
            let family = if address.ip.is_ipv6() { "IPv6" } else { "IPv4" };
            let reason = format!("the Service has no {family} ClusterIP");
            error(address.field, text, &reason);
        }
    }

    let node_ports = matches!(type_, "NodePort" | "LoadBalancer");
    let ports = spec
        .ports
        .iter()
        .flatten()
        .enumerate()
        .filter_map(|(i, port)| parse_port(i, port, node_ports, &mut error))
        .collect();

    let external_local = spec.external_traffic_policy.as_deref() == Some("Local");
    let affinity = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .and_then(|t| u32::try_from(t).ok())
            .filter(|&t| t > 0)
            .unwrap_or(DEFAULT_AFFINITY_TIMEOUT)
    });
    let health_check_port = match spec.health_check_node_port {
        Some(number) if type_ == "LoadBalancer" && external_local && number != 0 => {
            let port = valid_port(number);
            if port.is_none() {
                let text = number.to_string();
                error(
                    "spec.healthCheckNodePort".into(),
                    &text,
                    "port must be in 1..=65535",
                );
            }
            port
        }
        _ => None,
    };

    Some(Parsed {
        key,
        namespace,
        name,
        cluster_ips,
        external_ips,
        ports,
        internal_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
        external_local,
        affinity,
        health_check_port,
    })
}

fn parse_address(
    field: String,
    text: &str,
    error: &mut impl FnMut(String, &str, &str),
) -> Option<Address> {
    match text.parse() {
        Ok(ip) => Some(Address { field, ip }),
        Err(_) => {
            error(field, text, "not a valid IP address");
            None
        }
    }
}

/// Any problem skips the whole port: a port without its NodePort would look applied.
fn parse_port<'a>(
    index: usize,
    port: &'a ServicePort,
    node_ports: bool,
    error: &mut impl FnMut(String, &str, &str),
) -> Option<Port<'a>> {
    let field = format!("spec.ports[{index}]");
    let proto_name = port.protocol.as_deref().unwrap_or("TCP");
    let Some(proto) = protocol_number(proto_name) else {
        error(
            format!("{field}.protocol"),
            proto_name,
            "unknown protocol (expected TCP, UDP or SCTP)",
        );
        return None;
    };
    let Some(number) = valid_port(port.port) else {
        let text = port.port.to_string();
        error(format!("{field}.port"), &text, "port must be in 1..=65535");
        return None;
    };
    let node_port = match port.node_port.filter(|_| node_ports) {
        None | Some(0) => None,
        Some(n) => match valid_port(n) {
            Some(n) => Some(n),
            None => {
                let text = n.to_string();
                error(
                    format!("{field}.nodePort"),
                    &text,
                    "port must be in 1..=65535",
                );
                return None;
            }
        },
    };
    Some(Port {
        field,
        name: port.name.as_deref().unwrap_or_default(),
        proto,
        port: number,
        node_port,
    })
}

pub(super) fn namespace_of(svc: &K8sService) -> &str {
    svc.metadata.namespace.as_deref().unwrap_or("default")
}
