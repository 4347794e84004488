//! The plugin side of the CNI: environment and stdin in, the spec's JSON out. Input is checked
//! here, before the agent is asked, so a malformed call never reaches the node's state.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::PathBuf,
    time::Duration,
};

use super::{
    code, valid_container_id, valid_ifname, AgentReply, AgentRequest, CniError, Command, NetConf,
    PodRef, SUPPORTED_VERSIONS,
};
use crate::config::default_cni_socket;

/// How long the plugin waits for the agent; kubelet's own CNI timeout is longer.
const AGENT_TIMEOUT: Duration = Duration::from_secs(60);

/// A checked invocation: what to ask the agent, where, and the version to answer in.
#[derive(Debug)]
pub struct Call {
    pub version: String,
    pub socket: PathBuf,
    pub request: AgentRequest,
}

/// Runs one CNI invocation. `Ok` holds what goes to stdout (may be empty).
pub fn run(env: &HashMap<String, String>, stdin: &[u8]) -> Result<String, (String, CniError)> {
    if env.get("CNI_COMMAND").map(String::as_str) == Some("VERSION") {
        let reply =
            serde_json::json!({ "cniVersion": "1.1.0", "supportedVersions": SUPPORTED_VERSIONS });
        return Ok(reply.to_string());
    }
    let call = parse(env, stdin)?;
    let command = call.request.command;
    let reply = ask_agent(&call.socket, &call.request).map_err(|e| match command {
        // STATUS: an agent that does not answer cannot serve ADD.
        Command::Status => CniError {
            code: code::PLUGIN_NOT_AVAILABLE,
            ..e
        },
        _ => e,
    });
    match reply {
        Ok(AgentReply::Ok(Some(mut result))) => {
            result.cni_version = call.version;
            Ok(serde_json::to_string(&result).expect("results always serialize"))
        }
        Ok(AgentReply::Ok(None)) => Ok(String::new()),
        Ok(AgentReply::Error(err)) | Err(err) => Err((call.version, err)),
    }
}

/// Checks an invocation's environment and configuration, asking nothing yet. An error comes
/// with the version to report it in: the configuration's, when it could be read.
pub fn parse(env: &HashMap<String, String>, stdin: &[u8]) -> Result<Call, (String, CniError)> {
    let mut version = "1.1.0".to_string();
    let command = env.get("CNI_COMMAND").map(String::as_str).unwrap_or("");
    let result = (|| {
        let command = match command {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            "" => return Err(CniError::new(code::INVALID_ENV, "CNI_COMMAND is not set")),
            other => {
                return Err(CniError::new(
                    code::INVALID_ENV,
                    format!(
                        "CNI_COMMAND {other:?} is not supported (ADD, DEL, CHECK, STATUS, GC, \
                         VERSION)"
                    ),
                ))
            }
        };
        let conf = parse_conf(stdin)?;
        version = conf.cni_version.clone();
        if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!(
                    "cniVersion {:?} is not supported; supported: {}",
                    conf.cni_version,
                    SUPPORTED_VERSIONS.join(", ")
                ),
            ));
        }
        let request = match command {
            Command::Status | Command::Gc => runtime_request(command, &conf)?,
            _ => request(command, env)?,
        };
        Ok(Call {
            version: conf.cni_version.clone(),
            socket: conf.socket.clone().unwrap_or_else(default_cni_socket),
            request,
        })
    })();
    result.map_err(|err| (version, err))
}

/// The spec's error JSON.
pub fn error_json(version: &str, err: &CniError) -> String {
    let mut value = serde_json::to_value(err).expect("errors always serialize");
    value["cniVersion"] = version.into();
    value.to_string()
}

fn parse_conf(stdin: &[u8]) -> Result<NetConf, CniError> {
    let value: serde_json::Value = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(
            code::DECODE_FAILED,
            "the network configuration on stdin is not valid JSON",
        )
        .with_details(e)
    })?;
    serde_json::from_value(value).map_err(|e| {
        CniError::new(
            code::INVALID_CONFIG,
            format!("invalid network configuration: {e}"),
        )
    })
}

fn request(command: Command, env: &HashMap<String, String>) -> Result<AgentRequest, CniError> {
    let get = |name: &str| env.get(name).cloned().unwrap_or_default();
    let container_id = get("CNI_CONTAINERID");
    if !valid_container_id(&container_id) {
        return Err(CniError::new(
            code::INVALID_ENV,
            format!("CNI_CONTAINERID {container_id:?} is missing or has characters other than [A-Za-z0-9._-]"),
        ));
    }
    let ifname = get("CNI_IFNAME");
    if !valid_ifname(&ifname) {
        return Err(CniError::new(
            code::INVALID_ENV,
            format!("CNI_IFNAME {ifname:?} is missing or is not a valid interface name"),
        ));
    }
    let netns = get("CNI_NETNS");
    // DEL may come after the namespace is gone; ADD and CHECK need it.
    if netns.is_empty() && command != Command::Del {
        return Err(CniError::new(code::INVALID_ENV, "CNI_NETNS is not set"));
    }
    Ok(AgentRequest {
        command,
        container_id,
        netns,
        ifname,
        pod: pod_ref(&get("CNI_ARGS"))?,
        valid_attachments: Vec::new(),
    })
}

/// STATUS and GC concern the network, not one container: CNI 1.1 commands, GC with the
/// attachments the runtime keeps.
fn runtime_request(command: Command, conf: &NetConf) -> Result<AgentRequest, CniError> {
    if conf.cni_version != "1.1.0" {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "cniVersion {:?}: STATUS and GC are CNI 1.1.0 commands",
                conf.cni_version
            ),
        ));
    }
    let valid_attachments = match (command, &conf.valid_attachments) {
        (Command::Gc, None) => {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                "GC: the network configuration has no cni.dev/valid-attachments",
            ))
        }
        (_, list) => list.clone().unwrap_or_default(),
    };
    Ok(AgentRequest {
        command,
        container_id: String::new(),
        netns: String::new(),
        ifname: String::new(),
        pod: None,
        valid_attachments,
    })
}

/// The Pod named in CNI_ARGS (`K=V;K=V`, as the kubelet's runtime passes them); absent when the
/// runtime names none (a runtime outside Kubernetes). Only the two keys it reads are checked.
fn pod_ref(args: &str) -> Result<Option<PodRef>, CniError> {
    let (mut namespace, mut name) = (None, None);
    for pair in args.split(';').filter(|p| !p.is_empty()) {
        let Some((key, value)) = pair.split_once('=') else {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!("CNI_ARGS: {pair:?} is not KEY=VALUE"),
            ));
        };
        match key {
            "K8S_POD_NAMESPACE" => namespace = Some(value),
            "K8S_POD_NAME" => name = Some(value),
            _ => {}
        }
    }
    match (namespace, name) {
        (None, None) => Ok(None),
        (Some(namespace), Some(name)) if !namespace.is_empty() && !name.is_empty() => {
            Ok(Some(PodRef {
                namespace: namespace.into(),
                name: name.into(),
            }))
        }
        (namespace, name) => Err(CniError::new(
            code::INVALID_ENV,
            format!(
                "CNI_ARGS: K8S_POD_NAMESPACE {namespace:?} and K8S_POD_NAME {name:?} must both be \
                 set and non-empty"
            ),
        )),
    }
}

fn ask_agent(socket: &PathBuf, request: &AgentRequest) -> Result<AgentReply, CniError> {
    let unreachable = |e: std::io::Error| {
        CniError::new(
            code::TRY_AGAIN_LATER,
            format!(
                "the Sluice agent is not reachable at {}; is sluice-agent running on this node?",
                socket.display()
            ),
        )
        .with_details(e)
    };
    let mut stream = UnixStream::connect(socket).map_err(unreachable)?;
    stream
        .set_read_timeout(Some(AGENT_TIMEOUT))
        .map_err(unreachable)?;
    let mut line = serde_json::to_vec(request).expect("requests always serialize");
    line.push(b'\n');
    stream.write_all(&line).map_err(unreachable)?;
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply).map_err(|e| {
        CniError::new(code::IO_FAILURE, "no answer from the Sluice agent").with_details(e)
    })?;
    serde_json::from_str(&reply).map_err(|e| {
        CniError::new(
            code::IO_FAILURE,
            "the Sluice agent's answer could not be read (agent restarted mid-call?)",
        )
        .with_details(e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cni::Attachment;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const CONF: &[u8] = br#"{"cniVersion":"1.0.0","name":"sluice","type":"sluice-cni","socket":"/nonexistent/cni.sock"}"#;

    fn error(env_pairs: &[(&str, &str)], stdin: &[u8]) -> CniError {
        run(&env(env_pairs), stdin).unwrap_err().1
    }

    #[test]
    fn version_needs_no_config() {
        let out = run(&env(&[("CNI_COMMAND", "VERSION")]), b"").unwrap();
        assert!(
            out.contains("\"supportedVersions\":[\"0.4.0\",\"1.0.0\",\"1.1.0\"]"),
            "{out}"
        );
    }

    #[test]
    fn status_and_gc_are_cni_1_1_network_commands() {
        let v11 = br#"{"cniVersion":"1.1.0","name":"sluice","type":"sluice-cni","socket":"/nonexistent/cni.sock"}"#;
        // No container in the environment, and an agent that is not there.
        let down = error(&[("CNI_COMMAND", "STATUS")], v11);
        assert_eq!(down.code, code::PLUGIN_NOT_AVAILABLE, "{}", down.msg);
        let old = error(&[("CNI_COMMAND", "GC")], CONF);
        assert_eq!(old.code, code::INCOMPATIBLE_VERSION);
        assert!(old.msg.contains("1.1.0"), "{}", old.msg);
        let no_list = error(&[("CNI_COMMAND", "GC")], v11);
        assert_eq!(no_list.code, code::INVALID_CONFIG);
        let conf: NetConf = serde_json::from_slice(
            br#"{"cniVersion":"1.1.0","name":"n","type":"t",
                "cni.dev/valid-attachments":[{"containerID":"c1","ifname":"eth0"}]}"#,
        )
        .unwrap();
        let request = runtime_request(Command::Gc, &conf).unwrap();
        assert_eq!(
            request.valid_attachments,
            [Attachment {
                container_id: "c1".into(),
                ifname: "eth0".into()
            }]
        );
    }

    #[test]
    fn errors_carry_the_spec_codes() {
        let add = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "/x"),
        ];
        assert_eq!(
            error(&[("CNI_COMMAND", "FROB")], CONF).code,
            code::INVALID_ENV
        );
        assert_eq!(error(&add, b"{not json").code, code::DECODE_FAILED);
        let missing = error(&add, br#"{"cniVersion":"1.0.0","type":"sluice-cni"}"#);
        assert_eq!(missing.code, code::INVALID_CONFIG);
        assert!(
            missing.msg.contains("missing field `name`"),
            "{}",
            missing.msg
        );
        let old = error(
            &add,
            br#"{"cniVersion":"0.2.0","name":"n","type":"sluice-cni"}"#,
        );
        assert_eq!(old.code, code::INCOMPATIBLE_VERSION);
        let bad_id = error(
            &[
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "../etc"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_NETNS", "/x"),
            ],
            CONF,
        );
        assert_eq!(bad_id.code, code::INVALID_ENV);
        let down = error(&add, CONF);
        assert_eq!(down.code, code::TRY_AGAIN_LATER);
        assert!(down.msg.contains("/nonexistent/cni.sock"), "{}", down.msg);
    }

    #[test]
    fn cni_args_name_the_pod() {
        let pod = pod_ref("IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=abc")
            .unwrap()
            .unwrap();
        assert_eq!(pod.to_string(), "shop/web-0");
        assert_eq!(pod_ref("").unwrap(), None);
        assert_eq!(pod_ref("IgnoreUnknown=1").unwrap(), None);
        for bad in [
            "K8S_POD_NAMESPACE=shop",
            "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=",
            "K8S_POD_NAME",
        ] {
            let err = pod_ref(bad).unwrap_err();
            assert_eq!(err.code, code::INVALID_ENV, "{bad}");
            assert!(err.msg.starts_with("CNI_ARGS"), "{}", err.msg);
        }
    }

    #[test]
    fn error_json_has_the_spec_shape() {
        let json = error_json("1.0.0", &CniError::new(7, "bad").with_details("why"));
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(
            value,
            serde_json::json!({"cniVersion":"1.0.0","code":7,"msg":"bad","details":"why"})
        );
    }
}
