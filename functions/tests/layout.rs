//! The app's layout agrees with itself: every `function.json` folder has a route in the handler and
//! every route a folder; bindings use the names the handler reads; every Service Bus trigger's
//! subscription exists in the bus topology (infra/servicebus.json) with the filter for the event
//! type its function takes and the same session setting.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use deploychain_functions::adapters::memory::MemoryStore;
use deploychain_functions::{BUS_IN, FUNCTIONS, HTTP_IN, HTTP_OUT, Trigger};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

fn crate_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn function_folders() -> BTreeSet<String> {
    std::fs::read_dir(crate_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("function.json").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

fn function_json(name: &str) -> Value {
    serde_json::from_slice(&std::fs::read(crate_dir().join(name).join("function.json")).unwrap()).unwrap()
}

#[tokio::test]
async fn every_function_json_has_a_route_and_every_route_a_folder() {
    let folders = function_folders();
    let declared: BTreeSet<String> = FUNCTIONS.iter().map(|(n, _)| n.to_string()).collect();
    assert_eq!(folders, declared);
    let h = Harness::new(Arc::new(MemoryStore::default()));
    for name in &folders {
        // Any answer but 404/405 means the router serves POST /{FunctionName}.
        let (status, _) = h.invoke(name, &json!({"Data": {}, "Metadata": {}})).await;
        assert!(status != 404 && status != 405, "{name}: {status}");
    }
}

#[test]
fn bindings_use_the_names_and_types_the_handler_reads() {
    for (name, trigger) in FUNCTIONS {
        let f = function_json(name);
        let b = f["bindings"].as_array().unwrap();
        match trigger {
            Trigger::Http => {
                assert_eq!(b.len(), 2, "{name}");
                assert_eq!(b[0]["type"], "httpTrigger");
                assert_eq!(b[0]["name"], HTTP_IN);
                assert!(b[0]["route"].as_str().is_some_and(|r| !r.is_empty()), "{name} needs a route");
                assert!(matches!(b[0]["authLevel"].as_str(), Some("anonymous" | "function" | "admin")), "{name}");
                assert_eq!(b[1]["type"], "http");
                assert_eq!(b[1]["name"], HTTP_OUT);
            }
            Trigger::Timer => {
                assert_eq!(b.len(), 1, "{name}");
                assert_eq!(b[0]["type"], "timerTrigger");
                assert_eq!(b[0]["name"], deploychain_functions::TIMER_IN);
                assert!(
                    b[0]["schedule"].as_str().is_some_and(|s| s.starts_with('%') && s.ends_with('%')),
                    "{name}: the schedule is an app setting"
                );
            }
            Trigger::ServiceBus => {
                assert_eq!(b.len(), 1, "{name}: events are published with the client, not output bindings");
                assert_eq!(b[0]["type"], "serviceBusTrigger");
                assert_eq!(b[0]["name"], BUS_IN);
                assert_eq!(b[0]["dataType"], "binary", "{name}: exact body bytes, no body-field merge");
                assert_eq!(b[0]["connection"], "ServiceBusConnection");
                assert_eq!(b[0]["topicName"], "%DEPLOYCHAIN_TOPIC%");
                assert_ne!(b[0]["autoCompleteMessages"], false, "{name}: a custom handler cannot settle messages");
            }
        }
    }
}

#[test]
fn routes_are_unique_and_under_the_api_prefix() {
    let mut routes = BTreeSet::new();
    for (name, trigger) in FUNCTIONS {
        if *trigger == Trigger::Http {
            let r = function_json(name)["bindings"][0]["route"].as_str().unwrap().to_string();
            assert!(routes.insert(r.clone()), "route {r} is used twice");
        }
    }
    assert!(
        routes.contains("hooks/github")
            && routes.contains("hooks/azure-devops")
            && routes.contains("approvals/{id}")
            && routes.contains("runs/{id?}")
    );
}

#[test]
fn every_service_bus_trigger_has_its_subscription_and_filter_in_the_topology() {
    let topo: Value = serde_json::from_slice(&std::fs::read(crate_dir().join("../infra/servicebus.json")).unwrap()).unwrap();
    let ns = &topo["UserConfig"]["Namespaces"][0];
    let topic = ns["Topics"].as_array().unwrap().iter().find(|t| t["Name"] == "deploychain-events").unwrap();
    assert_eq!(topic["Properties"]["RequiresDuplicateDetection"], true, "deterministic MessageIds rely on duplicate detection");
    assert!(ns["Queues"].as_array().unwrap().iter().any(|q| q["Name"] == "deploychain-parked"));
    let expected = [
        ("on_push", "dev.deploychain.push.v1"),
        ("on_build_completed", "dev.deploychain.build.completed.v1"),
        ("on_image_ready", "dev.deploychain.image.ready.v1"),
        ("on_deployment_due", "dev.deploychain.deployment.due.v1"),
        ("on_approval", "dev.deploychain.approval.decided.v1"),
    ];
    for (name, ty) in expected {
        let b = &function_json(name)["bindings"][0];
        let sub_name = b["subscriptionName"].as_str().unwrap();
        let sub = topic["Subscriptions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["Name"] == sub_name)
            .unwrap_or_else(|| panic!("{sub_name} missing"));
        assert_eq!(sub["Properties"]["RequiresSession"], b["isSessionsEnabled"], "{name}");
        let label = &sub["Rules"][0]["Properties"]["CorrelationFilter"]["Label"];
        assert_eq!(label, ty, "{name}");
        assert_eq!(subscriber(ty), Some(name), "the test bus routes like the topology");
    }
    // Deploys to one stage are serialized: the deploying subscriptions use sessions.
    for name in ["on_image_ready", "on_deployment_due", "on_approval"] {
        assert_eq!(function_json(name)["bindings"][0]["isSessionsEnabled"], true);
    }
}

#[test]
fn dead_letter_operations_look_at_every_subscription_of_the_topology() {
    let path = crate_dir().join("../infra/servicebus.json");
    let v: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let names: BTreeSet<String> = v["UserConfig"]["Namespaces"][0]["Topics"][0]["Subscriptions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["Name"].as_str().unwrap().to_string())
        .collect();
    let ops: BTreeSet<String> = deploychain_functions::ops::SUBSCRIPTIONS.iter().map(|s| s.to_string()).collect();
    assert_eq!(ops, names);
}
