//! JSON merge patch (RFC 7386) and JSON patch (RFC 6902). Strategic merge patch and server-side
//! apply are served as merge patches: the lab's objects have no list-merge keys worth honouring.

use serde_json::{Map, Value};

pub(crate) fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(target) = target {
        for (k, v) in patch {
            if v.is_null() {
                target.remove(k);
            } else {
                merge(target.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

/// Applies a JSON patch document; the error names the failing operation.
pub(crate) fn json_patch(target: &mut Value, ops: &Value) -> Result<(), String> {
    let Some(ops) = ops.as_array() else {
        return Err("a JSON patch must be an array of operations".into());
    };
    for (i, op) in ops.iter().enumerate() {
        apply_op(target, op).map_err(|e| format!("JSON patch operation {i}: {e}"))?;
    }
    Ok(())
}

fn apply_op(target: &mut Value, op: &Value) -> Result<(), String> {
    let field = |name: &str| {
        op.get(name)
            .and_then(Value::as_str)
            .ok_or_else(|| format!("missing string field {name:?}"))
    };
    let value = || op.get("value").cloned().ok_or("missing field \"value\"");
    let path = field("path")?;
    match field("op")? {
        "add" => add(target, path, value()?),
        "remove" => remove(target, path).map(drop),
        "replace" => {
            let slot = target
                .pointer_mut(path)
                .ok_or_else(|| format!("path {path:?} does not exist"))?;
            *slot = value()?;
            Ok(())
        }
        "move" => {
            let from = field("from")?;
            let moved = remove(target, from)?;
            add(target, path, moved)
        }
        "copy" => {
            let from = field("from")?;
            let copied = target
                .pointer(from)
                .cloned()
                .ok_or_else(|| format!("path {from:?} does not exist"))?;
            add(target, path, copied)
        }
        "test" => {
            if target.pointer(path) == Some(&value()?) {
                Ok(())
            } else {
                Err(format!("test failed at {path:?}"))
            }
        }
        other => Err(format!("unknown op {other:?}")),
    }
}

/// The parent's pointer and the unescaped last token.
fn split(path: &str) -> Result<(&str, String), String> {
    let Some(at) = path.rfind('/') else {
        return Err(format!("path {path:?} does not start with '/'"));
    };
    let token = path[at + 1..].replace("~1", "/").replace("~0", "~");
    Ok((&path[..at], token))
}

fn index(token: &str, len: usize, path: &str) -> Result<usize, String> {
    token
        .parse::<usize>()
        .ok()
        .filter(|&i| i < len)
        .ok_or_else(|| format!("bad array index in {path:?}"))
}

fn add(target: &mut Value, path: &str, value: Value) -> Result<(), String> {
    if path.is_empty() {
        *target = value;
        return Ok(());
    }
    let (parent, token) = split(path)?;
    match target.pointer_mut(parent) {
        Some(Value::Object(map)) => {
            map.insert(token, value);
            Ok(())
        }
        Some(Value::Array(items)) => {
            let at = if token == "-" {
                items.len()
            } else {
                index(&token, items.len() + 1, path)?
            };
            items.insert(at, value);
            Ok(())
        }
        _ => Err(format!("parent of {path:?} does not exist")),
    }
}

fn remove(target: &mut Value, path: &str) -> Result<Value, String> {
    let (parent, token) = split(path)?;
    match target.pointer_mut(parent) {
        Some(Value::Object(map)) => map
            .remove(&token)
            .ok_or_else(|| format!("path {path:?} does not exist")),
        Some(Value::Array(items)) => Ok(items.remove(index(&token, items.len(), path)?)),
        _ => Err(format!("path {path:?} does not exist")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch() {
        let mut v = json!({"a": {"b": 1, "c": 2}, "l": [1, 2], "s": "x"});
        merge(
            &mut v,
            &json!({"a": {"b": null, "d": 3}, "l": [3], "n": {"m": 1}}),
        );
        assert_eq!(
            v,
            json!({"a": {"c": 2, "d": 3}, "l": [3], "s": "x", "n": {"m": 1}})
        );
    }

    #[test]
    fn json_patches() {
        let mut v = json!({"a": [1, 2], "o": {"k/x": 1}});
        json_patch(
            &mut v,
            &json!([
                {"op": "add", "path": "/a/-", "value": 3},
                {"op": "add", "path": "/a/0", "value": 0},
                {"op": "remove", "path": "/o/k~1x"},
                {"op": "replace", "path": "/a/1", "value": 9},
                {"op": "copy", "from": "/a", "path": "/b"},
                {"op": "move", "from": "/b", "path": "/o/b"},
                {"op": "test", "path": "/o/b/1", "value": 9},
            ]),
        )
        .unwrap();
        assert_eq!(v, json!({"a": [0, 9, 2, 3], "o": {"b": [0, 9, 2, 3]}}));
        for bad in [
            json!([{"op": "test", "path": "/a/0", "value": 1}]),
            json!([{"op": "remove", "path": "/nope"}]),
            json!([{"op": "add", "path": "/x/y", "value": 1}]),
            json!([{"op": "replace", "path": "/a/9", "value": 1}]),
            json!([{"op": "frob", "path": "/a"}]),
            json!({"op": "add"}),
        ] {
            assert!(json_patch(&mut v, &bad).is_err(), "{bad}");
        }
    }
}
