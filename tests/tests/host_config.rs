//! The deployable app's configuration files: host.json validates against the SchemaStore schema
//! the Functions tooling uses, and a broken host.json is caught; every app setting the handler
//! reads is in the README's configuration reference.
#![allow(clippy::unwrap_used)]

use serde_json::Value;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn load(p: &str) -> Value {
    serde_json::from_slice(&std::fs::read(root().join(p)).unwrap()).unwrap()
}

fn host_validator() -> jsonschema::Validator {
    let schema = load("tests/fixtures/schemastore/host.schema.json");
    jsonschema::draft7::options().build(&schema).unwrap()
}

#[test]
fn host_json_validates_against_the_schemastore_schema() {
    let host = load("host.json");
    let v = host_validator();
    let errors: Vec<String> = v.iter_errors(&host).map(|e| format!("{} at {}", e, e.instance_path)).collect();
    assert!(errors.is_empty(), "host.json: {errors:#?}");
    assert_eq!(host["version"], "2.0");
    assert_eq!(host["customHandler"]["description"]["defaultExecutablePath"], "handler");
    assert_eq!(host["extensions"]["http"]["routePrefix"], "api");
    // Custom handlers cannot settle messages themselves: the host must complete on success.
    assert_eq!(host["extensions"]["serviceBus"]["autoCompleteMessages"], true);
    assert!(host["functionTimeout"].is_string());
}

#[test]
fn a_broken_host_json_is_rejected_by_the_schema() {
    let v = host_validator();
    let mut host = load("host.json");
    host["version"] = "3.0".into();
    assert!(!v.is_valid(&host));
    let mut host = load("host.json");
    host["functionTimeout"] = "ten minutes".into();
    assert!(!v.is_valid(&host));
}

/// Every app setting the handler reads is in the README's configuration reference.
#[test]
fn every_setting_the_handler_reads_is_documented() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let config = std::fs::read_to_string(root.join("functions/src/config.rs")).unwrap();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let reference = &readme[readme.find("## Configuration (app settings)").unwrap()..];
    let reference = &reference[..reference[3..].find("\n## ").map(|i| i + 3).unwrap_or(reference.len())];
    let mut settings: Vec<&str> = config.split("get(\"").skip(1).filter_map(|s| s.split('"').next()).collect();
    settings.sort();
    settings.dedup();
    assert!(settings.len() > 30, "{settings:?}");
    let missing: Vec<&&str> = settings.iter().filter(|s| !reference.contains(&format!("`{s}`"))).collect();
    assert!(missing.is_empty(), "settings the README's configuration table does not name: {missing:?}");
}
