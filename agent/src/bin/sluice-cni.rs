//! sluice-cni: the CNI plugin the container runtime executes. CNI_* environment and the network
//! configuration on stdin; the result or the spec's error JSON on stdout.

use std::{collections::HashMap, io::Read, process::ExitCode};

use sluice_agent::cni::plugin;

fn main() -> ExitCode {
    let env: HashMap<String, String> = std::env::vars()
        .filter(|(k, _)| k.starts_with("CNI_"))
        .collect();
    let mut stdin = Vec::new();
    // VERSION may come without stdin; a read error then is the same as empty input.
    if env.get("CNI_COMMAND").map(String::as_str) != Some("VERSION") {
        let _ = std::io::stdin().read_to_end(&mut stdin);
    }
    match plugin::run(&env, &stdin) {
        Ok(out) => {
            if !out.is_empty() {
                println!("{out}");
            }
            ExitCode::SUCCESS
        }
        Err((version, err)) => {
            println!("{}", plugin::error_json(&version, &err));
            ExitCode::FAILURE
        }
    }
}
