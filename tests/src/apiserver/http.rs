//! The HTTP surface: kube-apiserver's URL shapes, verbs, status codes and `Status` errors.

use std::{collections::HashMap, sync::Arc, time::Duration};

use axum::{
    body::{Body, Bytes},
    extract::{Query, State},
    http::{header, HeaderMap, Method, StatusCode, Uri},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use serde_json::{json, Value};

use super::{
    patch,
    resources::{self, ApiError, RESOURCES},
    selector::Filter,
    store::{ApiState, Part},
    watch::{self, WatchRequest},
    Shared,
};

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/version", get(version))
        .route("/healthz", get(|| async { "ok" }))
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(|| async { "ok" }))
        .fallback(handle)
        .with_state(shared)
}

async fn version() -> Response {
    let info = json!({
        "major": "1",
        "minor": "33",
        "gitVersion": "v1.33.0+sluice-lab",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-01-01T00:00:00Z",
        "goVersion": "go1.24.0",
        "compiler": "gc",
        "platform": "linux/amd64",
    });
    json_response(StatusCode::OK, info.to_string())
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    serve(&shared, &method, &uri, &headers, &body).unwrap_or_else(error_response)
}

fn json_response(code: StatusCode, body: String) -> Response {
    (code, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn error_response(e: ApiError) -> Response {
    let code = StatusCode::from_u16(e.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(code, e.to_status().to_string())
}

fn object_response(code: StatusCode, obj: &Value) -> Result<Response, ApiError> {
    Ok(json_response(code, obj.to_string()))
}

/// What a URL names.
struct Target {
    res: usize,
    ns: Option<String>,
    name: Option<String>,
    status: bool,
}

fn no_such_path() -> ApiError {
    ApiError::new(
        404,
        "NotFound",
        "the server could not find the requested resource",
    )
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = s
            .get(i + 1..i + 3)
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_path(path: &str) -> Result<Target, ApiError> {
    let segs: Vec<String> = path
        .trim_matches('/')
        .split('/')
        .map(percent_decode)
        .collect();
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api", "v1", rest @ ..] => ("", "v1", rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return Err(no_such_path()),
    };
    let find = |plural: &str| resources::by_path(group, version, plural);
    // `/api/v1/namespaces/x/status` is the Namespace x's status, not a resource named status.
    let (res, ns, rest) = match rest {
        ["namespaces", ns, plural, rest @ ..]
            if find(plural).is_some_and(|r| RESOURCES[r].namespaced) =>
        {
            (find(plural), Some(ns.to_string()), rest)
        }
        [plural, rest @ ..] => (find(plural), None, rest),
        [] => (None, None, rest),
    };
    let res = res.ok_or_else(no_such_path)?;
    let (name, status) = match rest {
        [] => (None, false),
        [name] => (Some(name.to_string()), false),
        [name, "status"] if RESOURCES[res].status => (Some(name.to_string()), true),
        _ => return Err(no_such_path()),
    };
    if RESOURCES[res].namespaced && ns.is_none() && name.is_some() {
        return Err(no_such_path());
    }
    if name.as_deref().is_some_and(str::is_empty) || ns.as_deref().is_some_and(str::is_empty) {
        return Err(no_such_path());
    }
    Ok(Target {
        res,
        ns,
        name,
        status,
    })
}

fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))
}

fn flag(q: &HashMap<String, String>, name: &str) -> bool {
    matches!(q.get(name).map(String::as_str), Some("true" | "1"))
}

fn number(q: &HashMap<String, String>, name: &str) -> Result<Option<u64>, ApiError> {
    match q.get(name).map(String::as_str) {
        None | Some("") => Ok(None),
        Some(v) => v.parse().map(Some).map_err(|_| {
            ApiError::bad_request(format!("{name}: invalid value {v:?}: not a whole number"))
        }),
    }
}

/// A body must not move an object to another name or namespace than its URL's.
fn check_identity(body: &Value, t: &Target, name: &str) -> Result<(), ApiError> {
    let meta = |f: &str| {
        body.pointer(&format!("/metadata/{f}"))
            .and_then(Value::as_str)
    };
    if let Some(n) = meta("name").filter(|n| !n.is_empty() && *n != name) {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({n}) does not match the name on the URL ({name})"
        )));
    }
    if let (Some(n), Some(ns)) = (meta("namespace"), t.ns.as_deref()) {
        if !n.is_empty() && n != ns {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
    }
    Ok(())
}

fn list_body(res: usize, rv: u64, items: &[Arc<Value>]) -> String {
    let r = &RESOURCES[res];
    let items: Vec<String> = items.iter().map(|o| o.to_string()).collect();
    format!(
        "{{\"kind\":\"{}List\",\"apiVersion\":\"{}\",\"metadata\":{{\"resourceVersion\":\"{rv}\"}},\"items\":[{}]}}",
        r.kind,
        r.api_version(),
        items.join(",")
    )
}

fn serve(
    shared: &Arc<Shared>,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, ApiError> {
    let t = parse_path(uri.path())?;
    let Query(q) = Query::<HashMap<String, String>>::try_from_uri(uri)
        .map_err(|e| ApiError::bad_request(format!("bad query string: {e}")))?;
    let res = t.res;
    let ns = t.ns.as_deref();
    let dry_run = q.get("dryRun").is_some_and(|v| v == "All");
    let part = if t.status { Part::Status } else { Part::Main };
    let filter = || {
        Filter::new(
            ns,
            q.get("labelSelector").map(String::as_str),
            q.get("fieldSelector").map(String::as_str),
        )
        .map_err(ApiError::bad_request)
    };
    match (method, t.name.as_deref()) {
        (&Method::GET, name) if flag(&q, "watch") => {
            let mut filter = filter()?;
            if let Some(name) = name {
                filter = filter.with_name(name);
            }
            let req = WatchRequest {
                res,
                filter,
                resource_version: number(&q, "resourceVersion")?,
                timeout: number(&q, "timeoutSeconds")?
                    .filter(|&s| s > 0)
                    .map(Duration::from_secs),
                bookmarks: flag(&q, "allowWatchBookmarks"),
                send_initial_events: flag(&q, "sendInitialEvents"),
            };
            let body = watch::stream(shared.clone(), req);
            Ok(Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, "application/json")
                .body(body)
                .unwrap_or_else(|_| Response::new(Body::empty())))
        }
        (&Method::GET, None) => {
            let filter = filter()?;
            let (items, rv) = shared.read(|s| (s.list(res, &filter), s.resource_version()));
            Ok(json_response(StatusCode::OK, list_body(res, rv, &items)))
        }
        (&Method::GET, Some(name)) => match shared.read(|s| s.get(res, ns, name)) {
            Some(obj) => object_response(StatusCode::OK, &obj),
            None => Err(ApiError::not_found(&RESOURCES[res], name)),
        },
        (&Method::POST, None) if ns.is_some() || !RESOURCES[res].namespaced => {
            let obj = parse_json(body)?;
            let created = shared.write(|s| s.create(res, ns, obj, dry_run))?;
            object_response(StatusCode::CREATED, &created)
        }
        (&Method::PUT, Some(name)) => {
            let obj = parse_json(body)?;
            check_identity(&obj, &t, name)?;
            let updated = shared.write(|s| s.update(res, ns, name, part, dry_run, |_| Ok(obj)))?;
            object_response(StatusCode::OK, &updated)
        }
        (&Method::PATCH, Some(name)) => patch(shared, &t, name, headers, body, dry_run),
        (&Method::DELETE, Some(name)) => {
            let options = if body.is_empty() {
                Value::Null
            } else {
                parse_json(body)?
            };
            let deleted = shared.write(|s| s.delete(res, ns, name, &options, dry_run))?;
            object_response(StatusCode::OK, &deleted)
        }
        (&Method::DELETE, None) => {
            let filter = filter()?;
            let (deleted, rv) = shared.write(|s| {
                let deleted = s
                    .list(res, &filter)
                    .iter()
                    .filter_map(|o| {
                        let meta = |f: &str| o.pointer(f).and_then(Value::as_str);
                        let name = meta("/metadata/name")?;
                        s.delete(
                            res,
                            meta("/metadata/namespace"),
                            name,
                            &Value::Null,
                            dry_run,
                        )
                        .ok()
                    })
                    .collect::<Vec<_>>();
                (deleted, s.resource_version())
            });
            Ok(json_response(StatusCode::OK, list_body(res, rv, &deleted)))
        }
        _ => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            format!("the server does not allow this method on the requested resource: {method}"),
        )),
    }
}

fn patch(
    shared: &Arc<Shared>,
    t: &Target,
    name: &str,
    headers: &HeaderMap,
    body: &[u8],
    dry_run: bool,
) -> Result<Response, ApiError> {
    let (res, ns) = (t.res, t.ns.as_deref());
    let part = if t.status { Part::Status } else { Part::Main };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let content_type = content_type.split(';').next().unwrap_or_default().trim();
    let merge = |s: &mut ApiState, p: &Value| {
        s.update(res, ns, name, part, dry_run, |old| {
            let mut new = old.clone();
            patch::merge(&mut new, p);
            Ok(new)
        })
    };
    let (code, obj) = match content_type {
        "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
            let p = parse_json(body)?;
            (StatusCode::OK, shared.write(|s| merge(s, &p))?)
        }
        "application/json-patch+json" => {
            let p = parse_json(body)?;
            let updated = shared.write(|s| {
                s.update(res, ns, name, part, dry_run, |old| {
                    let mut new = old.clone();
                    patch::json_patch(&mut new, &p).map_err(ApiError::invalid)?;
                    Ok(new)
                })
            })?;
            (StatusCode::OK, updated)
        }
        "application/apply-patch+yaml" => {
            let mut p: Value = serde_yaml::from_slice(body).map_err(|e| {
                ApiError::bad_request(format!("the request body is not valid YAML: {e}"))
            })?;
            if !p.is_object() || p.get("metadata").is_some_and(|m| !m.is_object()) {
                return Err(ApiError::bad_request(
                    "an apply patch must be an object with object metadata",
                ));
            }
            check_identity(&p, t, name)?;
            shared.write(|s| {
                if s.get(res, ns, name).is_some() {
                    return Ok((StatusCode::OK, merge(s, &p)?));
                }
                if t.status {
                    return Err(ApiError::not_found(&RESOURCES[res], name));
                }
                p["metadata"]["name"] = Value::String(name.to_string());
                Ok((StatusCode::CREATED, s.create(res, ns, p, dry_run)?))
            })?
        }
        other => {
            return Err(ApiError::new(
                415,
                "UnsupportedMediaType",
                format!("the body of the request was in an unknown format: {other:?}"),
            ))
        }
    };
    object_response(code, &obj)
}
