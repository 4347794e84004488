//! The served resources and the errors requests get, as kube-apiserver words them.

use std::fmt;

use serde_json::{json, Value};

pub(crate) struct Resource {
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    /// Has a `/status` subresource: then `.status` is written only through it.
    pub status: bool,
}

impl Resource {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// The name kube-apiserver uses in messages: `pods`, `endpointslices.discovery.k8s.io`.
    pub(crate) fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }
}

const fn res(
    group: &'static str,
    version: &'static str,
    plural: &'static str,
    kind: &'static str,
    namespaced: bool,
    status: bool,
) -> Resource {
    Resource {
        group,
        version,
        plural,
        kind,
        namespaced,
        status,
    }
}

pub(crate) const RESOURCES: &[Resource] = &[
    res("", "v1", "nodes", "Node", false, true),
    res("", "v1", "namespaces", "Namespace", false, true),
    res("", "v1", "pods", "Pod", true, true),
    res("", "v1", "services", "Service", true, true),
    res(
        "discovery.k8s.io",
        "v1",
        "endpointslices",
        "EndpointSlice",
        true,
        false,
    ),
    res(
        "networking.k8s.io",
        "v1",
        "networkpolicies",
        "NetworkPolicy",
        true,
        false,
    ),
    res(
        "crd.antrea.io",
        "v1beta1",
        "externalippools",
        "ExternalIPPool",
        false,
        true,
    ),
    // What agents record on their Node (kube-rs's Recorder writes events.k8s.io/v1).
    res("events.k8s.io", "v1", "events", "Event", true, false),
    // sluice-controller's leader election.
    res("coordination.k8s.io", "v1", "leases", "Lease", true, false),
];

pub(crate) const NAMESPACES: usize = 1;
pub(crate) const SERVICES: usize = 3;

pub(crate) fn by_path(group: &str, version: &str, plural: &str) -> Option<usize> {
    RESOURCES
        .iter()
        .position(|r| r.group == group && r.version == version && r.plural == plural)
}

pub(crate) fn by_plural(plural: &str) -> Option<usize> {
    RESOURCES.iter().position(|r| r.plural == plural)
}

pub(crate) fn by_kind(api_version: &str, kind: &str) -> Option<usize> {
    RESOURCES
        .iter()
        .position(|r| r.kind == kind && r.api_version() == api_version)
}

/// A failed request, as kube-apiserver reports it (a `Status` object with the same HTTP code).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub code: u16,
    /// `NotFound`, `AlreadyExists`, `Conflict`, `Invalid`, `BadRequest`, `Expired`, ...
    pub reason: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            reason,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "BadRequest", message)
    }

    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(422, "Invalid", message)
    }

    pub(crate) fn not_found(r: &Resource, name: &str) -> ApiError {
        ApiError::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", r.qualified()),
        )
    }

    pub(crate) fn conflict(r: &Resource, name: &str, why: &str) -> ApiError {
        ApiError::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": {why}",
                r.qualified()
            ),
        )
    }

    /// 422 Invalid listing field errors, as kube-apiserver's `NewInvalid` words it.
    pub(crate) fn invalid_fields(kind: &str, name: &str, errors: &[String]) -> ApiError {
        let body = match errors {
            [one] => one.clone(),
            many => format!("[{}]", many.join(", ")),
        };
        ApiError::invalid(format!("{kind} {} is invalid: {body}", go_quoted(name)))
    }

    pub(crate) fn internal(message: impl std::fmt::Display) -> ApiError {
        ApiError::new(
            500,
            "InternalError",
            format!("Internal error occurred: {message}"),
        )
    }

    pub(crate) fn expired(requested: u64, oldest: u64) -> ApiError {
        ApiError::new(
            410,
            "Expired",
            format!("too old resource version: {requested} ({oldest})"),
        )
    }

    /// The `Status` object a client receives.
    pub fn to_status(&self) -> Value {
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        })
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.code, self.reason, self.message)
    }
}

impl std::error::Error for ApiError {}

/// A body naming another kind would be stored under the wrong resource.
pub(crate) fn check_type(r: &Resource, obj: &Value) -> Result<(), ApiError> {
    let kind = obj.get("kind").and_then(Value::as_str).unwrap_or_default();
    let api_version = obj
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if !kind.is_empty() && kind != r.kind {
        return Err(ApiError::bad_request(format!(
            "the kind in the data ({kind}) does not match the expected kind ({})",
            r.kind
        )));
    }
    if !api_version.is_empty() && api_version != r.api_version() {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({api_version}) does not match the expected API version ({})",
            r.api_version()
        )));
    }
    Ok(())
}

/// A string as Go's `%q` prints it (the lab's values need no escapes beyond Rust's).
pub(crate) fn go_quoted(s: &str) -> String {
    format!("{s:?}")
}

/// A `[]string` as Go's `%#v` prints it.
pub(crate) fn go_strings(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| go_quoted(s)).collect();
    format!("[]string{{{}}}", quoted.join(", "))
}

/// A `field.Invalid` error; `value` as kube-apiserver prints it (numbers bare, strings quoted).
pub(crate) fn invalid_value(path: &str, value: impl fmt::Display, detail: &str) -> String {
    format!("{path}: Invalid value: {value}: {detail}")
}

/// A `field.NotSupported` error.
pub(crate) fn unsupported_value(path: &str, value: &str, supported: &[&str]) -> String {
    let supported: Vec<String> = supported.iter().map(|s| go_quoted(s)).collect();
    format!(
        "{path}: Unsupported value: {}: supported values: {}",
        go_quoted(value),
        supported.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_errors_are_worded_as_kube_apiserver_words_them() {
        let one = ApiError::invalid_fields(
            "Service",
            "web",
            &[invalid_value("spec.ports[0].nodePort", 80, "x")],
        );
        assert_eq!(
            one.message,
            "Service \"web\" is invalid: spec.ports[0].nodePort: Invalid value: 80: x"
        );
        let ips = ["10.96.0.10".to_string()];
        let two = ApiError::invalid_fields(
            "Service",
            "web",
            &[
                invalid_value("spec.clusterIPs", go_strings(&ips), "y"),
                unsupported_value("spec.type", "Foo", &["ClusterIP", "NodePort"]),
            ],
        );
        assert_eq!(
            two.message,
            "Service \"web\" is invalid: [spec.clusterIPs: Invalid value: []string{\"10.96.0.10\"}: y, \
             spec.type: Unsupported value: \"Foo\": supported values: \"ClusterIP\", \"NodePort\"]"
        );
    }
}
