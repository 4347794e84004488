//! The CNI plugin's input as a runtime hands it over: `KEY=VALUE` lines (the environment), an
//! empty line, then stdin. Checked without asking the agent: no panic; an accepted call names a
//! valid container and interface (or is a network command); an error is the spec's JSON.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use sluice_agent::cni::{plugin, valid_container_id, valid_ifname, Command};

fuzz_target!(|data: &[u8]| {
    let (head, stdin) = match data.windows(2).position(|w| w == b"\n\n") {
        Some(i) => (&data[..i], &data[i + 2..]),
        None => (data, &[][..]),
    };
    let env: HashMap<String, String> = String::from_utf8_lossy(head)
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    match plugin::parse(&env, stdin) {
        Ok(call) => match call.request.command {
            Command::Status | Command::Gc => {}
            _ => {
                assert!(valid_container_id(&call.request.container_id));
                assert!(valid_ifname(&call.request.ifname));
            }
        },
        Err((version, err)) => {
            assert!(!err.msg.is_empty());
            let json: serde_json::Value =
                serde_json::from_str(&plugin::error_json(&version, &err)).expect("error JSON");
            assert_eq!(json["code"], err.code);
        }
    }
});
