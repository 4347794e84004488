//! What kube-apiserver's Service registry does to a Service on create and update: defaults, the
//! fields a change of type leaves behind, what an update keeps of the allocations, and the checks
//! that concern them, in its words. The allocation itself is in [`super::allocator`].

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use serde_json::{json, Map, Value};

use super::{
    allocator::{self, ServiceRanges},
    resources::{go_quoted, go_strings, invalid_value, unsupported_value, ApiError},
};

const TYPES: [&str; 4] = ["ClusterIP", "ExternalName", "LoadBalancer", "NodePort"];
const FAMILY_POLICIES: [&str; 3] = ["PreferDualStack", "RequireDualStack", "SingleStack"];
/// kube-apiserver's default `sessionAffinityConfig.clientIP.timeoutSeconds` (3 hours).
const AFFINITY_TIMEOUT: u64 = 10_800;

pub(super) type Spec = Map<String, Value>;

pub(super) fn text<'a>(spec: &'a Spec, field: &str) -> &'a str {
    spec.get(field).and_then(Value::as_str).unwrap_or_default()
}

pub(super) fn strings(spec: &Spec, field: &str) -> Vec<String> {
    spec.get(field)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|v| v.as_str().unwrap_or_default().to_string())
        .collect()
}

/// A set port number (`nodePort`, `healthCheckNodePort`): 0 means unset, as in kube-apiserver.
pub(super) fn set_port(v: Option<&Value>) -> Option<u64> {
    v.and_then(Value::as_u64).filter(|&p| p != 0)
}

pub(super) fn ports(spec: &Spec) -> &[Value] {
    spec.get("ports")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

pub(super) fn ports_mut(spec: &mut Spec) -> impl Iterator<Item = &mut Map<String, Value>> {
    spec.get_mut("ports")
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten()
        .filter_map(Value::as_object_mut)
}

pub(super) fn node_ports(spec: &Spec) -> Vec<Option<u64>> {
    ports(spec)
        .iter()
        .map(|p| set_port(p.get("nodePort")))
        .collect()
}

pub(super) fn needs_cluster_ip(spec: &Spec) -> bool {
    text(spec, "type") != "ExternalName"
}

pub(super) fn needs_node_ports(spec: &Spec) -> bool {
    matches!(text(spec, "type"), "NodePort" | "LoadBalancer")
}

pub(super) fn needs_health_check(spec: &Spec) -> bool {
    text(spec, "type") == "LoadBalancer" && text(spec, "externalTrafficPolicy") == "Local"
}

/// Reached from outside the cluster, so `externalTrafficPolicy` applies.
fn externally_accessible(spec: &Spec) -> bool {
    needs_node_ports(spec)
        || (text(spec, "type") == "ClusterIP" && !strings(spec, "externalIPs").is_empty())
}

/// Completes and checks a Service about to be stored: `old` is the stored version when this is
/// an update, `others` are every other stored Service.
pub(crate) fn admit<'a>(
    ranges: &ServiceRanges,
    obj: &mut Value,
    old: Option<&Value>,
    others: impl Iterator<Item = &'a Value>,
) -> Result<(), ApiError> {
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let Some(map) = obj.as_object_mut() else {
        return Err(ApiError::bad_request("the object must be a JSON object"));
    };
    let Some(spec) = map
        .entry("spec")
        .or_insert_with(|| json!({}))
        .as_object_mut()
    else {
        return Err(ApiError::bad_request("spec must be an object"));
    };
    let old = old.and_then(|o| o.get("spec")).and_then(Value::as_object);
    set_defaults(spec);
    if let Some(old) = old {
        drop_unused(spec, old);
        keep_allocated(spec, old);
    }
    // Clients may set either field; kube-apiserver fills `clusterIPs` from `clusterIP`.
    if !text(spec, "clusterIP").is_empty() && strings(spec, "clusterIPs").is_empty() {
        spec.insert("clusterIPs".into(), json!([text(spec, "clusterIP")]));
    }
    let errors = validate(spec, old);
    if !errors.is_empty() {
        return Err(ApiError::invalid_fields("Service", &name, &errors));
    }
    if needs_cluster_ip(spec) {
        if text(spec, "ipFamilyPolicy").is_empty() {
            spec.insert("ipFamilyPolicy".into(), json!("SingleStack"));
        }
        if strings(spec, "ipFamilies").is_empty() {
            spec.insert("ipFamilies".into(), json!(["IPv4"]));
        }
    }
    allocator::allocate(ranges, spec, old, others, &name)
}

/// kube-apiserver's `SetDefaults_Service`. The IP family fields are defaulted after validation:
/// kube-apiserver infers them from the requested cluster IPs, whose family errors come first.
fn set_defaults(spec: &mut Spec) {
    if text(spec, "type").is_empty() {
        spec.insert("type".into(), json!("ClusterIP"));
    }
    if text(spec, "sessionAffinity").is_empty() {
        spec.insert("sessionAffinity".into(), json!("None"));
    }
    match text(spec, "sessionAffinity") {
        "None" => {
            spec.remove("sessionAffinityConfig");
        }
        "ClientIP" => {
            let timeout = spec
                .get("sessionAffinityConfig")
                .and_then(|c| c.pointer("/clientIP/timeoutSeconds"));
            if timeout.is_none() {
                spec.insert(
                    "sessionAffinityConfig".into(),
                    json!({"clientIP": {"timeoutSeconds": AFFINITY_TIMEOUT}}),
                );
            }
        }
        _ => {}
    }
    for port in ports_mut(spec) {
        if text(port, "protocol").is_empty() {
            port.insert("protocol".into(), json!("TCP"));
        }
        let target = port.get("targetPort");
        let unset = matches!(target, None | Some(Value::Null))
            || target == Some(&json!(0))
            || target == Some(&json!(""));
        if let (true, Some(number)) = (unset, port.get("port").cloned()) {
            port.insert("targetPort".into(), number);
        }
    }
    if externally_accessible(spec) && text(spec, "externalTrafficPolicy").is_empty() {
        spec.insert("externalTrafficPolicy".into(), json!("Cluster"));
    }
    if needs_cluster_ip(spec) && text(spec, "internalTrafficPolicy").is_empty() {
        spec.insert("internalTrafficPolicy".into(), json!("Cluster"));
    }
    if text(spec, "type") == "LoadBalancer" && spec.get("allocateLoadBalancerNodePorts").is_none() {
        spec.insert("allocateLoadBalancerNodePorts".into(), json!(true));
    }
}

/// A change of type leaves fields the new type does not use. kube-apiserver drops them when the
/// client left them as they were (a patch of `type` alone), and rejects them when it set them.
fn drop_unused(spec: &mut Spec, old: &Spec) {
    let mut unused: Vec<&str> = Vec::new();
    if !needs_cluster_ip(spec) {
        unused.extend(["clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy"]);
    }
    if !externally_accessible(spec) {
        unused.push("externalTrafficPolicy");
    }
    if !needs_health_check(spec) {
        unused.push("healthCheckNodePort");
    }
    if text(spec, "type") != "LoadBalancer" {
        unused.push("allocateLoadBalancerNodePorts");
    }
    for field in unused {
        if spec.get(field) == old.get(field) {
            spec.remove(field);
        }
    }
    if !needs_node_ports(spec) && node_ports(spec) == node_ports(old) {
        for port in ports_mut(spec) {
            port.remove("nodePort");
        }
    }
}

/// kube-apiserver's `patchAllocatedValues`: an update that leaves out what was allocated (a
/// manifest applied again) keeps it.
fn keep_allocated(spec: &mut Spec, old: &Spec) {
    if needs_cluster_ip(old) && needs_cluster_ip(spec) {
        for field in ["clusterIP", "clusterIPs"] {
            let unset = match spec.get(field) {
                None | Some(Value::Null) => true,
                Some(Value::String(s)) => s.is_empty(),
                Some(Value::Array(a)) => a.is_empty(),
                Some(_) => false,
            };
            if let (true, Some(v)) = (unset, old.get(field)) {
                spec.insert(field.into(), v.clone());
            }
        }
    }
    if needs_node_ports(old) && needs_node_ports(spec) {
        // Node ports follow the port's name; one the update already uses elsewhere stays there.
        let used: BTreeSet<u64> = node_ports(spec).into_iter().flatten().collect();
        // An unnamed port (a Service's only port) is found under "".
        let by_name: BTreeMap<String, u64> = ports(old)
            .iter()
            .filter_map(|p| {
                let name = p.get("name").and_then(Value::as_str).unwrap_or_default();
                Some((name.to_string(), set_port(p.get("nodePort"))?))
            })
            .collect();
        for port in ports_mut(spec) {
            let name = text(port, "name");
            match by_name.get(name) {
                Some(&np) if set_port(port.get("nodePort")).is_none() && !used.contains(&np) => {
                    port.insert("nodePort".into(), json!(np));
                }
                _ => {}
            }
        }
    }
    if needs_health_check(old) && needs_health_check(spec) {
        if let (None, Some(hc)) = (
            set_port(spec.get("healthCheckNodePort")),
            old.get("healthCheckNodePort"),
        ) {
            spec.insert("healthCheckNodePort".into(), hc.clone());
        }
    }
}

/// The checks of kube-apiserver's Service validation that concern allocation, in its words.
fn validate(spec: &Spec, old: Option<&Spec>) -> Vec<String> {
    let kind = text(spec, "type");
    if !TYPES.contains(&kind) {
        return vec![unsupported_value("spec.type", kind, &TYPES)];
    }
    let mut errors = Vec::new();
    let ips = strings(spec, "clusterIPs");
    if kind == "ExternalName" {
        for field in ["clusterIPs", "ipFamilies", "ipFamilyPolicy"] {
            if spec.get(field).is_some() {
                errors.push(format!(
                    "spec.{field}: Forbidden: may not be set for ExternalName services"
                ));
            }
        }
    } else {
        let ip = text(spec, "clusterIP");
        if ip.is_empty() && !ips.is_empty() {
            errors.push(invalid_value(
                "spec.clusterIPs",
                go_strings(&ips),
                "must be empty when `clusterIP` is not specified",
            ));
        } else if ips.first().is_some_and(|first| first != ip) {
            errors.push(invalid_value(
                "spec.clusterIPs",
                go_strings(&ips),
                "first value must match `clusterIP`",
            ));
        }
        errors.extend(validate_cluster_ips(&ips));
        for (i, family) in strings(spec, "ipFamilies").iter().enumerate() {
            let path = format!("spec.ipFamilies[{i}]");
            match family.as_str() {
                "IPv4" => {}
                "IPv6" => errors.push(invalid_value(
                    &path,
                    go_quoted(family),
                    "not configured on this cluster",
                )),
                other => errors.push(unsupported_value(&path, other, &["IPv4", "IPv6"])),
            }
        }
        match text(spec, "ipFamilyPolicy") {
            "" | "SingleStack" | "PreferDualStack" => {}
            "RequireDualStack" => errors.push(invalid_value(
                "spec.ipFamilyPolicy",
                go_quoted("RequireDualStack"),
                "this cluster is not configured for dual-stack services",
            )),
            other => errors.push(unsupported_value(
                "spec.ipFamilyPolicy",
                other,
                &FAMILY_POLICIES,
            )),
        }
        if let Some(old) = old.filter(|o| needs_cluster_ip(o)) {
            let before = strings(old, "clusterIPs");
            if let Some(i) = (0..before.len().min(ips.len())).find(|&i| before[i] != ips[i]) {
                errors.push(invalid_value(
                    &format!("spec.clusterIPs[{i}]"),
                    go_strings(&ips),
                    "may not change once set",
                ));
            }
        }
    }
    if kind == "ClusterIP" {
        for (i, np) in node_ports(spec).into_iter().enumerate() {
            if np.is_some() {
                errors.push(format!(
                    "spec.ports[{i}].nodePort: Forbidden: may not be used when `type` is 'ClusterIP'"
                ));
            }
        }
    }
    if let Some(hc) = set_port(spec.get("healthCheckNodePort")) {
        if !needs_health_check(spec) {
            errors.push(invalid_value(
                "spec.healthCheckNodePort",
                hc,
                "may only be set when `type` is 'LoadBalancer' and `externalTrafficPolicy` is 'Local'",
            ));
        }
    }
    errors
}

fn validate_cluster_ips(ips: &[String]) -> Vec<String> {
    let mut errors = Vec::new();
    for (i, ip) in ips.iter().enumerate() {
        let path = format!("spec.clusterIPs[{i}]");
        if ip == "None" {
            if i > 0 || ips.len() > 1 {
                errors.push(invalid_value(
                    "spec.clusterIPs",
                    go_strings(ips),
                    "'None' must be the first and only value",
                ));
            }
            continue;
        }
        match ip.parse::<IpAddr>() {
            Err(_) => errors.push(invalid_value(
                &path,
                go_quoted(ip),
                "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)",
            )),
            Ok(IpAddr::V6(_)) => errors.push(invalid_value(
                &path,
                go_strings(ips),
                "IPv6 is not configured on this cluster",
            )),
            Ok(IpAddr::V4(_)) if i > 0 => errors.push(invalid_value(
                "spec.clusterIPs",
                go_strings(ips),
                "may specify no more than one IP for each IP family",
            )),
            Ok(IpAddr::V4(_)) => {}
        }
    }
    errors
}
