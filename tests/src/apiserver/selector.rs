//! Which objects a list or watch sees: namespace, label selector and field selector, with the
//! syntax kube-apiserver accepts.

use serde_json::Value;

enum LabelReq {
    Eq(String, String),
    NotEq(String, String),
    Exists(String),
    NotExists(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

struct FieldReq {
    path: String,
    value: String,
    equal: bool,
}

/// A namespace (if any) plus label and field selectors, all of which must match.
#[derive(Default)]
pub(crate) struct Filter {
    namespace: Option<String>,
    name: Option<String>,
    labels: Vec<LabelReq>,
    fields: Vec<FieldReq>,
}

impl Filter {
    pub fn new(
        namespace: Option<&str>,
        labels: Option<&str>,
        fields: Option<&str>,
    ) -> Result<Filter, String> {
        Ok(Filter {
            namespace: namespace.map(str::to_string),
            name: None,
            labels: labels.map(parse_labels).transpose()?.unwrap_or_default(),
            fields: fields.map(parse_fields).transpose()?.unwrap_or_default(),
        })
    }

    /// A watch on a single object's URL.
    pub fn with_name(mut self, name: &str) -> Filter {
        self.name = Some(name.to_string());
        self
    }

    pub fn matches(&self, obj: &Value) -> bool {
        let meta = |field: &str| {
            obj.get("metadata")
                .and_then(|m| m.get(field))
                .and_then(Value::as_str)
                .unwrap_or_default()
        };
        if self
            .namespace
            .as_deref()
            .is_some_and(|ns| ns != meta("namespace"))
            || self.name.as_deref().is_some_and(|n| n != meta("name"))
        {
            return false;
        }
        let labels = obj.pointer("/metadata/labels").and_then(Value::as_object);
        let label = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        let labels_match = self.labels.iter().all(|req| match req {
            LabelReq::Eq(k, v) => label(k) == Some(v.as_str()),
            LabelReq::NotEq(k, v) => label(k) != Some(v.as_str()),
            LabelReq::Exists(k) => label(k).is_some(),
            LabelReq::NotExists(k) => label(k).is_none(),
            LabelReq::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelReq::NotIn(k, vs) => !label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
        });
        labels_match
            && self
                .fields
                .iter()
                .all(|f| (field_value(obj, &f.path) == f.value) == f.equal)
    }
}

/// A missing field reads as "", so `spec.nodeName=` selects unscheduled pods, as in Kubernetes.
fn field_value(obj: &Value, path: &str) -> String {
    let mut v = obj;
    for part in path.split('.') {
        match v.get(part) {
            Some(next) => v = next,
            None => return String::new(),
        }
    }
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// Splits at commas outside parentheses (`a in (x,y),b` is two requirements).
fn split_top(s: &str) -> Result<Vec<&str>, String> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        if !(0..=1).contains(&depth) {
            return Err(format!("unbalanced parentheses in selector {s:?}"));
        }
    }
    if depth != 0 {
        return Err(format!("unbalanced parentheses in selector {s:?}"));
    }
    parts.push(&s[start..]);
    Ok(parts)
}

fn valid_key(k: &str) -> bool {
    !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
}

fn valid_value(v: &str) -> bool {
    v.chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

fn key(k: &str, whole: &str) -> Result<String, String> {
    let k = k.trim();
    if valid_key(k) {
        Ok(k.to_string())
    } else {
        Err(format!("invalid label key {k:?} in selector {whole:?}"))
    }
}

fn value(v: &str, whole: &str) -> Result<String, String> {
    let v = v.trim();
    if valid_value(v) {
        Ok(v.to_string())
    } else {
        Err(format!("invalid label value {v:?} in selector {whole:?}"))
    }
}

fn parse_labels(s: &str) -> Result<Vec<LabelReq>, String> {
    if s.trim().is_empty() {
        return Ok(Vec::new());
    }
    split_top(s)?
        .into_iter()
        .map(|part| {
            let part = part.trim();
            if let Some(open) = part.find('(') {
                let Some(inner) = part[open + 1..].strip_suffix(')') else {
                    return Err(format!("expected ')' at the end of {part:?}"));
                };
                let values = inner
                    .split(',')
                    .map(|v| value(v, s))
                    .collect::<Result<Vec<_>, _>>()?;
                let head: Vec<&str> = part[..open].split_whitespace().collect();
                return match head.as_slice() {
                    [k, "in"] => Ok(LabelReq::In(key(k, s)?, values)),
                    [k, "notin"] => Ok(LabelReq::NotIn(key(k, s)?, values)),
                    _ => Err(format!(
                        "expected 'key in (...)' or 'key notin (...)', got {part:?}"
                    )),
                };
            }
            if let Some(k) = part.strip_prefix('!') {
                return Ok(LabelReq::NotExists(key(k, s)?));
            }
            if let Some((k, v)) = part.split_once("!=") {
                return Ok(LabelReq::NotEq(key(k, s)?, value(v, s)?));
            }
            if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                return Ok(LabelReq::Eq(key(k, s)?, value(v, s)?));
            }
            Ok(LabelReq::Exists(key(part, s)?))
        })
        .collect()
}

fn parse_fields(s: &str) -> Result<Vec<FieldReq>, String> {
    if s.trim().is_empty() {
        return Ok(Vec::new());
    }
    s.split(',')
        .map(|part| {
            let (path, value, equal) = if let Some((p, v)) = part.split_once("!=") {
                (p, v, false)
            } else if let Some((p, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                (p, v, true)
            } else {
                return Err(format!(
                    "invalid field selector {part:?}: expected field=value or field!=value"
                ));
            };
            let path = path.trim();
            if path.is_empty() || path.split('.').any(str::is_empty) {
                return Err(format!(
                    "invalid field path {path:?} in field selector {s:?}"
                ));
            }
            Ok(FieldReq {
                path: path.to_string(),
                value: value.trim().to_string(),
                equal,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(labels: Value, node: &str) -> Value {
        json!({"metadata": {"name": "p", "namespace": "ns", "labels": labels}, "spec": {"nodeName": node}})
    }

    fn sel(labels: &str) -> Filter {
        Filter::new(None, Some(labels), None).unwrap()
    }

    #[test]
    fn labels() {
        let p = pod(json!({"app": "web", "tier": "front"}), "n1");
        for (s, want) in [
            ("app=web", true),
            ("app==web", true),
            ("app!=web", false),
            ("app!=db", true),
            ("missing!=x", true),
            ("app", true),
            ("!app", false),
            ("!missing", true),
            ("app in (db, web)", true),
            ("app notin (db,web)", false),
            ("missing notin (x)", true),
            ("missing in (x)", false),
            ("app=web,tier=front", true),
            ("app=web,tier=back", false),
            ("app in (web),!missing,tier", true),
            ("", true),
        ] {
            assert_eq!(sel(s).matches(&p), want, "{s}");
        }
        for bad in ["app in (web", "app=we b", "a b in (x)", "=x", "app in x)"] {
            assert!(Filter::new(None, Some(bad), None).is_err(), "{bad}");
        }
    }

    #[test]
    fn fields() {
        let p = pod(json!({}), "n1");
        let f = |s: &str| Filter::new(None, None, Some(s)).unwrap().matches(&p);
        assert!(f("spec.nodeName=n1"));
        assert!(f("spec.nodeName==n1,metadata.namespace=ns"));
        assert!(!f("spec.nodeName!=n1"));
        assert!(f("metadata.name=p"));
        assert!(!f("status.podIP=1.2.3.4"));
        assert!(f("status.podIP="));
        assert!(Filter::new(None, None, Some("spec.nodeName")).is_err());
        assert!(Filter::new(None, None, Some("spec..x=1")).is_err());
    }
}
