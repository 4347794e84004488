//! Embeds the eBPF object built by `cargo xtask build-ebpf` (xtask passes its path).

use std::{env, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=SLUICE_EBPF_OBJECT");
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let object = env::var("SLUICE_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|_| manifest.join("../target/ebpf/bpfel-unknown-none/release/sluice-ebpf"));
    println!("cargo:rerun-if-changed={}", object.display());
    if !object.exists() {
        panic!(
            "the eBPF object {} does not exist: build it with `cargo xtask build` (or run any xtask command)",
            object.display()
        );
    }
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("sluice-ebpf");
    std::fs::copy(&object, out).expect("copying the eBPF object");
}
