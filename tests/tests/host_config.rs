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

/// `hh:mm:ss`, as host.json writes a TimeSpan.
fn timespan(v: &Value) -> std::time::Duration {
    let parts: Vec<u64> = v.as_str().unwrap().split(':').map(|p| p.parse().unwrap()).collect();
    assert_eq!(parts.len(), 3, "{v}");
    std::time::Duration::from_secs(parts[0] * 3600 + parts[1] * 60 + parts[2])
}

/// No step can outlive the host's limits (decision 0023): a rollout step's budget (and one ARM
/// request, shorter still) is under every subscription's LockDuration, the host renews the lock
/// for longer than that, and `functionTimeout` kills an invocation before a lock it stopped
/// renewing could expire — so a message is never delivered twice at once because a step ran long.
#[test]
fn a_step_budget_is_under_the_lock_renewal_which_is_under_the_function_timeout() {
    let host = load("host.json");
    let timeout = timespan(&host["functionTimeout"]);
    let renewal = timespan(&host["extensions"]["serviceBus"]["maxAutoLockRenewalDuration"]);
    let budget = deploychain_functions::config::DEFAULT_STEP_BUDGET;
    let bus = load("infra/servicebus.json");
    let topic = &bus["UserConfig"]["Namespaces"][0]["Topics"][0];
    let mut locks = Vec::new();
    for sub in topic["Subscriptions"].as_array().unwrap() {
        let lock = sub["Properties"]["LockDuration"].as_str().unwrap();
        let secs: u64 = match lock.strip_prefix("PT").unwrap() {
            l if l.ends_with('M') => l.trim_end_matches('M').parse::<u64>().unwrap() * 60,
            l => l.trim_end_matches('S').parse().unwrap(),
        };
        locks.push((sub["Name"].as_str().unwrap().to_string(), std::time::Duration::from_secs(secs)));
    }
    assert!(!locks.is_empty());
    for (name, lock) in &locks {
        assert!(budget < *lock, "the step budget {budget:?} is not under {name}'s LockDuration {lock:?}");
        assert!(*lock <= renewal, "{name}'s LockDuration {lock:?} is longer than the renewal {renewal:?}");
        // Renewed every half LockDuration up to the renewal limit: held at least until then plus half.
        assert!(renewal + *lock / 2 > timeout, "a lock of {name} could expire before functionTimeout ({timeout:?}) ends the invocation");
    }
    assert!(budget < renewal && renewal < timeout, "budget {budget:?} < renewal {renewal:?} < functionTimeout {timeout:?}");
    // One ARM request is shorter than a step (Config refuses a longer one).
    let arm = deploychain_functions::config::Config::from_lookup(&|k: &str| match k {
        "APPROVAL_SIGNING_KEY" => Some("k".repeat(32)),
        "DEPLOYCHAIN_PUBLIC_URL" => Some("https://x.example".into()),
        "ServiceBusConnection__fullyQualifiedNamespace" => Some("deploychain.servicebus.windows.net".into()),
        _ => None,
    });
    let c = arm.unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(c.step_budget, budget);
    assert!(c.arm.request_timeout < c.step_budget);
}
