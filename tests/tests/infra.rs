//! The Bicep declares the same Service Bus entities as `infra/servicebus.json` (what the local bus
//! and the tests run on): every step subscription with its Label filter and session setting, the
//! audit subscription and the parking queue; and the function app's settings name what the
//! handler reads.
#![allow(clippy::unwrap_used)]

use serde_json::Value;
use std::path::Path;

fn repo() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize().unwrap()
}

#[test]
fn the_bicep_declares_the_entities_the_local_bus_runs_on() {
    let json: Value = serde_json::from_str(&std::fs::read_to_string(repo().join("infra/servicebus.json")).unwrap()).unwrap();
    let bicep = std::fs::read_to_string(repo().join("infra/modules/servicebus.bicep")).unwrap();
    let ns = &json["UserConfig"]["Namespaces"][0];
    let topic = &ns["Topics"][0];
    assert!(bicep.contains(&format!("var topicName = '{}'", topic["Name"].as_str().unwrap())));
    let mut steps = 0;
    for s in topic["Subscriptions"].as_array().unwrap() {
        let name = s["Name"].as_str().unwrap();
        let sessions = s["Properties"]["RequiresSession"].as_bool().unwrap_or(false);
        match s["Rules"][0]["Properties"]["CorrelationFilter"]["Label"].as_str() {
            Some(label) => {
                steps += 1;
                let line = format!("{{ name: '{name}', label: '{label}', sessions: {sessions} }}");
                assert!(bicep.contains(&line), "servicebus.bicep lacks {line}");
            }
            None => assert!(bicep.contains(&format!("name: '{name}'")), "servicebus.bicep lacks subscription {name}"),
        }
        assert_eq!(s["Properties"]["MaxDeliveryCount"], 10, "{name}");
    }
    assert_eq!(bicep.matches("{ name: 'on-").count(), steps, "no subscription the local bus lacks");
    for q in ns["Queues"].as_array().unwrap() {
        assert!(bicep.contains(&format!("name: '{}'", q["Name"].as_str().unwrap())));
    }
    assert!(bicep.contains("requiresDuplicateDetection: true") && bicep.contains("disableLocalAuth: true"));
}

#[test]
fn the_function_apps_settings_are_the_ones_the_handler_reads() {
    let bicep = std::fs::read_to_string(repo().join("infra/modules/functionapp.bicep")).unwrap();
    for setting in [
        "ServiceBusConnection__fullyQualifiedNamespace",
        "ServiceBusConnection__credential",
        "DEPLOYCHAIN_PUBLIC_URL",
        "DEPLOYCHAIN_ARM_CREDENTIAL",
        "APPROVAL_SIGNING_KEY",
        "GITHUB_WEBHOOK_SECRET",
        "APPLICATIONINSIGHTS_CONNECTION_STRING",
        "DEPLOYCHAIN_NOTIFY_URL",
    ] {
        assert!(bicep.contains(&format!("name: '{setting}'")), "functionapp.bicep does not set {setting}");
    }
    // Secrets are Key Vault references, never values.
    for secret in ["APPROVAL_SIGNING_KEY", "GITHUB_WEBHOOK_SECRET", "DEPLOYCHAIN_NOTIFY_URL"] {
        let line = bicep.lines().find(|l| l.contains(&format!("name: '{secret}'"))).unwrap();
        assert!(line.contains("@Microsoft.KeyVault(SecretUri="), "{line}");
    }
    let host: Value = serde_json::from_str(&std::fs::read_to_string(repo().join("host.json")).unwrap()).unwrap();
    assert_eq!(host["customHandler"]["description"]["defaultExecutablePath"], "handler");
    assert!(bicep.contains("runtime: { name: 'custom'"), "a custom handler app");
}
