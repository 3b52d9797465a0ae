//! A bake that takes long, step by step through the router: `on_build_completed` starts it and
//! schedules the first `image.due`; each look that finds it running schedules the next (once per
//! look, however often the look is delivered); the look that finds the image publishes
//! `image.ready`; a failed bake, and one past the policy's `image.timeout`, end the run with the
//! reason; an image that exists already is ready at once; a refused bake ends the run.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use deploychain_events::{ImageKind, ImageRef};
use deploychain_functions::adapters::memory::MemoryStore;
use deploychain_functions::adapters::sqlite::SqliteStore;
use deploychain_functions::adapters::{BakeStarted, BakeStatus, Outbound, RunStatus};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

const POLICY: &str = r#"
[[app]]
name = "hello"
source = { github = "Codertocat/Hello-World" }
branches = ["master"]
build = { provider = "github-actions", pipeline = "build.yml" }
image = { source = "image-builder", destination = "/subscriptions/0/resourceGroups/rg/providers/Microsoft.Compute/galleries/g/images/hello", timeout = "2h" }
[[app.stage]]
name = "staging"
target = "/subscriptions/0/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/hello-staging"
"#;

const COMMIT: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f9012345678";
const BAKE: &str =
    "/subscriptions/0/resourceGroups/rg/providers/Microsoft.VirtualMachineImages/imageTemplates/deploychain-hello-a1b2c3d4e5f6";

fn version(n: u32) -> ImageRef {
    ImageRef {
        kind: ImageKind::GalleryImageVersion,
        id: format!("/subscriptions/0/resourceGroups/rg/providers/Microsoft.Compute/galleries/g/images/hello/versions/1.0.{n}"),
        version: Some(format!("1.0.{n}")),
        digest: None,
    }
}

/// Push and build `COMMIT`: the run is at its image. Returns the run id.
async fn to_image(h: &mut Harness) -> String {
    push_master(h, "Codertocat/Hello-World", COMMIT).await;
    let wr = workflow_run_payload("Codertocat/Hello-World", "master", COMMIT, ".github/workflows/build.yml", "success");
    let (s, v) = h.github_signed("workflow_run", &wr).await;
    assert_eq!(s, 202, "{v}");
    h.pump().await;
    v["run"].as_str().unwrap().to_string()
}

fn dues(h: &Harness) -> Vec<Outbound> {
    h.publisher.sent().into_iter().filter(|m| m.subject == "dev.deploychain.image.due.v1").collect()
}

#[tokio::test]
async fn a_long_bake_is_looked_at_until_its_image_is_ready_once() {
    for (name, store) in stores() {
        let mut h = Harness::with_policy(store, POLICY);
        *h.baker.start.lock().unwrap() = Some(BakeStarted::Baking { bake: BAKE.into(), look_after: Duration::from_secs(60) });
        let run = to_image(&mut h).await;
        let req = h.baker.requests.lock().unwrap()[0].clone();
        assert_eq!(req.source, "image-builder");
        assert!(req.template.as_deref().unwrap().ends_with("/providers/Microsoft.VirtualMachineImages/imageTemplates/hello"), "{req:?}");
        let due = dues(&h);
        assert_eq!(due.len(), 1, "{name}");
        let at = due[0].scheduled_at.unwrap();
        assert!(at > chrono::Utc::now() + chrono::Duration::seconds(50), "{name}: looked at after a minute: {at}");
        let ev: Value = serde_json::from_str(&due[0].body).unwrap();
        assert_eq!((ev["data"]["bake"].as_str(), ev["data"]["attempt"].as_u64()), (Some(BAKE), Some(1)));
        let r = h.state.store.run(&run).await.unwrap().unwrap();
        assert!(r.waiting_for.as_deref().unwrap().contains("baking in VM Image Builder"), "{:?}", r.waiting_for);

        // Still building: the next look is scheduled, once, however often this one is delivered.
        h.baker.looks.lock().unwrap().extend([BakeStatus::Running("Customizing".into()), BakeStatus::Ready(version(3))]);
        let (s, _) = h.deliver("on_image_due", &due[0], 1).await;
        assert_eq!(s, 200);
        let (s, _) = h.deliver("on_image_due", &due[0], 2).await;
        assert_eq!(s, 200);
        let due = dues(&h);
        assert_eq!(due.len(), 2, "{name}: one next look");
        assert_eq!(h.baker.looked.lock().unwrap().len(), 1, "{name}: the redelivered look asked nothing");
        let r = h.state.store.run(&run).await.unwrap().unwrap();
        assert!(r.waiting_for.as_deref().unwrap().contains("Customizing"), "{:?}", r.waiting_for);
        let steps_before = r.steps.len();

        // Ready: image.ready for the first stage, then the rollout.
        let (s, _) = h.deliver("on_image_due", &due[1], 1).await;
        assert_eq!(s, 200);
        let ready: Vec<Outbound> = h.publisher.sent().into_iter().filter(|m| m.subject == "dev.deploychain.image.ready.v1").collect();
        assert_eq!(ready.len(), 1, "{name}: {:?}", ready.iter().map(|m| (&m.message_id, &m.body)).collect::<Vec<_>>());
        assert_eq!(ready[0].session_id.as_deref(), Some("hello/staging"));
        let ev: Value = serde_json::from_str(&ready[0].body).unwrap();
        assert_eq!(ev["data"]["image"]["id"], version(3).id);
        h.pump().await;
        let r = h.state.store.run(&run).await.unwrap().unwrap();
        assert!(r.steps.len() > steps_before);
        assert!(
            r.steps.iter().any(|s| s.name == "image ready") && r.steps.iter().any(|s| s.name == "deployed to staging"),
            "{name}: {:?}",
            r.steps
        );
        assert_eq!(r.steps.iter().filter(|s| s.name == "image baked").count(), 1, "{name}: {:?}", r.steps);
        assert_bodies_match_schemas(&h.publisher.sent());
        // A late look after the image: nothing.
        let before = h.publisher.sent().len();
        let (s, _) = h.deliver("on_image_due", &due[0], 3).await;
        assert_eq!(s, 200);
        assert_eq!(h.publisher.sent().len(), before);
    }
}

#[tokio::test]
async fn a_failed_or_overdue_bake_ends_the_run_with_the_reason() {
    for (name, store) in stores() {
        let mut h = Harness::with_policy(store.clone(), POLICY);
        *h.baker.start.lock().unwrap() = Some(BakeStarted::Baking { bake: BAKE.into(), look_after: Duration::from_secs(60) });
        let run = to_image(&mut h).await;
        h.baker.looks.lock().unwrap().push_back(BakeStatus::Failed("VM Image Builder: the bake failed: customizer exited 1".into()));
        let due = dues(&h);
        h.deliver("on_image_due", &due[0], 1).await;
        let r = h.state.store.run(&run).await.unwrap().unwrap();
        assert_eq!(r.status, RunStatus::Failed, "{name}");
        assert!(serde_json::to_string(&r.steps).unwrap().contains("customizer exited 1"), "{name}");

        // Past the deadline while still running: timed out.
        let mut h = Harness::with_policy(Arc::new(MemoryStore::default()), POLICY);
        *h.baker.start.lock().unwrap() = Some(BakeStarted::Baking { bake: BAKE.into(), look_after: Duration::from_secs(60) });
        let run = to_image(&mut h).await;
        let mut due = dues(&h)[0].clone();
        let mut ev: Value = serde_json::from_str(&due.body).unwrap();
        ev["data"]["deadline"] =
            json!((chrono::Utc::now() - chrono::Duration::minutes(1)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
        due.body = ev.to_string();
        h.deliver("on_image_due", &due, 1).await;
        let r = h.state.store.run(&run).await.unwrap().unwrap();
        assert_eq!(r.status, RunStatus::Failed, "{name}");
        assert!(serde_json::to_string(&r.steps).unwrap().contains("image bake timed out"), "{name}");
        assert_eq!(dues(&h).len(), 1, "{name}: no look after the timeout");
    }
}

#[tokio::test]
async fn an_image_that_exists_is_ready_at_once_and_a_refused_bake_ends_the_run() {
    for (name, store) in stores() {
        let mut h = Harness::with_policy(store, POLICY);
        *h.baker.start.lock().unwrap() = Some(BakeStarted::Ready(version(9)));
        let run = to_image(&mut h).await;
        assert!(dues(&h).is_empty(), "{name}");
        let r = h.state.store.run(&run).await.unwrap().unwrap();
        assert!(r.steps.iter().any(|s| s.name == "deployed to staging"), "{name}: {:?}", r.steps);
    }
    // The baker refuses (no base template): the run fails with its words, nothing parked.
    let mut h = Harness::with_policy(Arc::new(SqliteStore::in_memory().unwrap()), POLICY);
    *h.baker.refuse.lock().unwrap() = Some("VM Image Builder: the image template …/imageTemplates/hello does not exist".into());
    let run = to_image(&mut h).await;
    let r = h.state.store.run(&run).await.unwrap().unwrap();
    assert_eq!(r.status, RunStatus::Failed);
    let text = serde_json::to_string(&r.steps).unwrap();
    assert!(text.contains("image not made") && text.contains("does not exist"), "{text}");
    assert!(h.publisher.parked().is_empty());
    // A registry's image waits for its webhook.
    let mut h = Harness::with_policy(Arc::new(MemoryStore::default()), POLICY);
    let run = to_image(&mut h).await;
    let r = h.state.store.run(&run).await.unwrap().unwrap();
    assert_eq!(r.status, RunStatus::Running, "a reported image waits");
}
