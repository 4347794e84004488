//! Manifests: YAML files (multi-document) from directories, checked for what every object needs.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::Value;

/// Every object in the `.yaml`/`.yml` files of `dir`, files in name order.
pub fn load_dir(dir: &Path) -> Result<Vec<Value>> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading manifest directory {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    let mut objects = Vec::new();
    for file in files {
        objects.extend(load_file(&file)?);
    }
    Ok(objects)
}

pub fn load_file(file: &Path) -> Result<Vec<Value>> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let mut objects = Vec::new();
    for document in serde_yaml::Deserializer::from_str(&text) {
        let value =
            Value::deserialize(document).with_context(|| format!("parsing {}", file.display()))?;
        if value.is_null() {
            continue;
        }
        if !value["kind"].is_string()
            || !value["apiVersion"].is_string()
            || !value["metadata"]["name"].is_string()
        {
            bail!(
                "{}: every object needs apiVersion, kind and metadata.name",
                file.display()
            );
        }
        objects.push(value);
    }
    Ok(objects)
}
