//! Label selectors (`metav1.LabelSelector`): checked once, then matched against label maps.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use super::parse::FieldError;

#[derive(Clone, Debug, Default)]
pub(crate) struct Selector {
    equal: Vec<(String, String)>,
    exprs: Vec<(String, Op)>,
}

#[derive(Clone, Debug)]
enum Op {
    In(BTreeSet<String>),
    NotIn(BTreeSet<String>),
    Exists,
    DoesNotExist,
}

impl Selector {
    /// The empty selector: every object.
    pub(super) fn all() -> Selector {
        Selector::default()
    }

    /// `None` (and the problems in `errors`) when any requirement is malformed: a selector that
    /// is half understood must not select anything by accident.
    pub(crate) fn parse(
        sel: &LabelSelector,
        field: &str,
        errors: &mut Vec<FieldError>,
    ) -> Option<Selector> {
        let before = errors.len();
        let equal = sel
            .match_labels
            .iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut exprs = Vec::new();
        for (i, req) in sel.match_expressions.iter().flatten().enumerate() {
            let at = format!("{field}.matchExpressions[{i}]");
            let values = req.values.as_deref().unwrap_or_default();
            let op = match req.operator.as_str() {
                "In" | "NotIn" if values.is_empty() => {
                    errors.push(FieldError::new(
                        format!("{at}.values"),
                        "",
                        format!("operator {} needs at least one value", req.operator),
                    ));
                    continue;
                }
                "Exists" | "DoesNotExist" if !values.is_empty() => {
                    errors.push(FieldError::new(
                        format!("{at}.values"),
                        values.join(","),
                        format!("operator {} takes no values", req.operator),
                    ));
                    continue;
                }
                "In" => Op::In(values.iter().cloned().collect()),
                "NotIn" => Op::NotIn(values.iter().cloned().collect()),
                "Exists" => Op::Exists,
                "DoesNotExist" => Op::DoesNotExist,
                other => {
                    errors.push(FieldError::new(
                        format!("{at}.operator"),
                        other,
                        "unknown operator (expected In, NotIn, Exists or DoesNotExist)",
                    ));
                    continue;
                }
            };
            exprs.push((req.key.clone(), op));
        }
        (errors.len() == before).then_some(Selector { equal, exprs })
    }

    pub(crate) fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.equal.iter().all(|(k, v)| labels.get(k) == Some(v))
            && self.exprs.iter().all(|(key, op)| {
                let value = labels.get(key);
                match op {
                    Op::In(set) => value.is_some_and(|v| set.contains(v)),
                    Op::NotIn(set) => value.is_none_or(|v| !set.contains(v)),
                    Op::Exists => value.is_some(),
                    Op::DoesNotExist => value.is_none(),
                }
            })
    }
}
