//! The agent's config file: no panic, and every error of a file that parses names the field.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_agent::config::Config;

fuzz_target!(|text: &str| {
    let Ok(config) = Config::parse(text) else {
        return;
    };
    if let Err(e) = config.validate(Some("node-1".into())) {
        let said = e.to_string();
        assert!(
            said.contains("field `"),
            "an error without its field: {said}"
        );
    }
});
