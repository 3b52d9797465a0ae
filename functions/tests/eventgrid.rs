//! The `eventgrid_webhook` function with Event Grid's deliveries: both validation handshakes,
//! and a container registry's `ImagePushed` (the published samples, in both schemas) → `image.ready`
//! by digest for the run whose commit the tag names; other events, repositories and tags change
//! nothing.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use deploychain_functions::adapters::memory::MemoryStore;
use serde_json::{Value, json};
use std::sync::Arc;

const POLICY: &str = r#"
[[app]]
name = "hello"
source = { github = "Codertocat/Hello-World" }
branches = ["master"]
build = { provider = "github-actions", pipeline = "build.yml" }
image = { source = "registry", destination = "demo.azurecr.io/aci-helloworld" }
[[app.stage]]
name = "staging"
target = "/subscriptions/0/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/hello-staging"
"#;

const COMMIT: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f9012345678";
const DIGEST: &str = "sha256:213bbc182920ab41e18edc2001e06abcca6735d87782d9cef68abd83941cf0e5";

async fn post(h: &Harness, body: &[u8], content_type: &str) -> (u16, Value) {
    let headers = [("Content-Type", content_type.to_string()), ("aeg-event-type", "Notification".to_string())];
    let env = http_envelope("eventgrid_webhook", "POST", "hooks/eventgrid", &[("code", "k")], &headers, &[], body);
    let (status, _, body) = h.http("eventgrid_webhook", &env).await;
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

#[tokio::test]
async fn both_validation_handshakes_are_answered() {
    let h = Harness::with_policy(Arc::new(MemoryStore::default()), POLICY);
    // Event Grid schema: the SubscriptionValidationEvent (as documented for webhook endpoints).
    let validation = json!([{
        "id": "2d1781af-3a4c-4d7c-bd0c-e34b19da4e66", "topic": "/subscriptions/xx/resourceGroups/rg/providers/Microsoft.ContainerRegistry/registries/demo",
        "subject": "", "data": { "validationCode": "512d38b6-c7b8-40c8-89fe-f46f9e9622b6",
        "validationUrl": "https://rp-eastus2.eventgrid.azure.net:553/eventsubscriptions/sub/validate?id=512d38b6&t=2026-12-01T00:00:00Z&apiVersion=2025-02-15&token=abc" },
        "eventType": "Microsoft.EventGrid.SubscriptionValidationEvent", "eventTime": "2026-12-01T00:00:00Z", "metadataVersion": "1", "dataVersion": "1"
    }]);
    let (s, v) = post(&h, validation.to_string().as_bytes(), "application/json").await;
    assert_eq!(s, 200);
    assert_eq!(v, json!({ "validationResponse": "512d38b6-c7b8-40c8-89fe-f46f9e9622b6" }));
    // CloudEvents schema: the OPTIONS abuse-protection request.
    let headers = [("WebHook-Request-Origin", "eventgrid.azure.net".to_string())];
    let env = http_envelope("eventgrid_webhook", "OPTIONS", "hooks/eventgrid", &[("code", "k")], &headers, &[], b"");
    let (s, hdrs, _) = h.http("eventgrid_webhook", &env).await;
    assert_eq!(s, 200);
    assert_eq!(hdrs["WebHook-Allowed-Origin"], "eventgrid.azure.net");
    let env = http_envelope("eventgrid_webhook", "OPTIONS", "hooks/eventgrid", &[("code", "k")], &[], &[], b"");
    let (s, _, _) = h.http("eventgrid_webhook", &env).await;
    assert_eq!(s, 400, "an OPTIONS without the origin is not a handshake");
    assert!(h.publisher.sent().is_empty());
}

#[tokio::test]
async fn an_image_pushed_in_either_schema_is_the_runs_image_by_digest() {
    for (name, store) in stores() {
        for (file, ct) in [
            ("eventgrid/Microsoft.ContainerRegistry.ImagePushed.cloudevents.json", "application/cloudevents-batch+json; charset=utf-8"),
            ("eventgrid/Microsoft.ContainerRegistry.ImagePushed.eventgrid-schema.json", "application/json"),
        ] {
            let mut h = Harness::with_policy(store.clone(), POLICY);
            let run = push_master(&mut h, "Codertocat/Hello-World", COMMIT).await;
            let before = h.publisher.sent().len();
            let mut events = fixture_json(file);
            // As published the tag is `v1`: it names no commit, so nothing happens.
            let (s, v) = post(&h, events.to_string().as_bytes(), ct).await;
            assert_eq!(s, 202, "{name} {file}: {v}");
            assert!(v["ignored"].as_str().unwrap().contains("names no commit"), "{v}");
            assert_eq!(h.publisher.sent().len(), before);
            // CI tags it with the commit (`sha-<12 hex>`).
            events[0]["data"]["target"]["tag"] = json!(format!("sha-{}", &COMMIT[..12]));
            let (s, v) = post(&h, events.to_string().as_bytes(), ct).await;
            assert_eq!(s, 202, "{name} {file}: {v}");
            assert_eq!(v["runs"][0]["run"], run.as_str(), "{v}");
            let ready = h.publisher.sent().into_iter().rfind(|m| m.subject == "dev.deploychain.image.ready.v1").unwrap();
            let ev: Value = serde_json::from_str(&ready.body).unwrap();
            assert_eq!(ev["data"]["image"]["kind"], "container");
            assert_eq!(ev["data"]["image"]["id"], format!("demo.azurecr.io/aci-helloworld@{DIGEST}"), "by digest, never by tag");
            assert_eq!(ev["data"]["image"]["digest"], DIGEST);
            assert_eq!(ev["data"]["commit"], COMMIT);
            assert_bodies_match_schemas(&h.publisher.sent());
        }
    }
}

#[tokio::test]
async fn other_events_repositories_and_bad_bodies_change_nothing() {
    let mut h = Harness::with_policy(Arc::new(MemoryStore::default()), POLICY);
    push_master(&mut h, "Codertocat/Hello-World", COMMIT).await;
    let before = h.publisher.sent().len();
    let mut events = fixture_json("eventgrid/Microsoft.ContainerRegistry.ImagePushed.eventgrid-schema.json");
    events[0]["data"]["target"]["tag"] = json!(&COMMIT[..12]);
    events[0]["data"]["target"]["repository"] = json!("someone-else");
    let (s, v) = post(&h, events.to_string().as_bytes(), "application/json").await;
    assert!(s == 202 && v["ignored"].as_str().unwrap().contains("not any app's image source"), "{v}");
    events[0]["eventType"] = json!("ImageDeleted");
    let (s, v) = post(&h, events.to_string().as_bytes(), "application/json").await;
    assert!(s == 202 && v["ignored"].as_str().unwrap().contains("do not drive deployments"), "{v}");
    let mut no_digest = fixture_json("eventgrid/Microsoft.ContainerRegistry.ImagePushed.cloudevents.json");
    no_digest[0]["data"]["target"]["digest"] = json!("latest");
    let (s, _) = post(&h, no_digest.to_string().as_bytes(), "application/cloudevents-batch+json").await;
    assert_eq!(s, 400, "an image without a digest is refused");
    let (s, _) = post(&h, b"not json", "application/json").await;
    assert_eq!(s, 400);
    assert_eq!(h.publisher.sent().len(), before, "nothing published");
}
