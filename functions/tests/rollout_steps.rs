//! A rollout as short steps through the router (decision 0023): the step that starts it takes the
//! first look and schedules `deployment.due`; each look schedules the next once, however often it
//! is delivered; a throttled look completes and is scheduled again after ARM's `Retry-After`;
//! past the retry deadline the rollout is rolled back and the run fails with the reason.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use deploychain_events::{ImageKind, ImageRef};
use deploychain_functions::adapters::memory::MemoryStore;
use deploychain_functions::adapters::{BakeStarted, Outbound, RunStatus};
use deploychain_functions::error::Error;
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;

const POLICY: &str = r#"
[[app]]
name = "hello"
source = { github = "Codertocat/Hello-World" }
branches = ["master"]
build = { provider = "github-actions", pipeline = "build.yml" }
image = { source = "ci", destination = "/subscriptions/0/resourceGroups/rg/providers/Microsoft.Compute/galleries/g/images/hello" }
[[app.stage]]
name = "staging"
target = "/subscriptions/0/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/hello-staging"
[[app.stage]]
name = "production"
target = "/subscriptions/0/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/hello-prod"
"#;

const COMMIT: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f9012345678";
const DUE: &str = "dev.deploychain.deployment.due.v1";

/// Push and build `COMMIT` (its image is made by CI): the run starts rolling out to staging.
async fn to_rollout(h: &mut Harness) -> String {
    let image = ImageRef {
        kind: ImageKind::GalleryImageVersion,
        id: "/subscriptions/0/resourceGroups/rg/providers/Microsoft.Compute/galleries/g/images/hello/versions/1.0.7".into(),
        version: Some("1.0.7".into()),
        digest: None,
    };
    *h.baker.start.lock().unwrap() = Some(BakeStarted::Ready(image));
    push_master(h, "Codertocat/Hello-World", COMMIT).await;
    let wr = workflow_run_payload("Codertocat/Hello-World", "master", COMMIT, ".github/workflows/build.yml", "success");
    let (s, v) = h.github_signed("workflow_run", &wr).await;
    assert_eq!(s, 202, "{v}");
    h.pump().await;
    v["run"].as_str().unwrap().to_string()
}

fn dues(h: &Harness) -> Vec<Outbound> {
    h.publisher.sent().into_iter().filter(|m| m.subject == DUE).collect()
}

fn data(m: &Outbound) -> Value {
    serde_json::from_str::<Value>(&m.body).unwrap()["data"].clone()
}

#[tokio::test]
async fn a_rollout_goes_on_in_scheduled_looks_each_taken_once() {
    for (name, store) in stores() {
        let mut h = Harness::with_policy(store, POLICY);
        *h.compute.looks.lock().unwrap() = 2;
        *h.compute.look_every.lock().unwrap() = Duration::from_secs(5);
        let run = to_rollout(&mut h).await;
        let due = dues(&h);
        assert_eq!(due.len(), 1, "{name}: the first look is scheduled");
        assert_eq!(due[0].session_id.as_deref(), Some("hello/staging"), "{name}: in the stage's session");
        let at = due[0].scheduled_at.unwrap();
        assert!(at > chrono::Utc::now() + chrono::Duration::seconds(3), "{name}: after the wait the target asked for: {at}");
        assert_eq!((data(&due[0])["look"].as_u64(), data(&due[0])["cursor"]["look"].as_u64()), (Some(1), Some(1)));
        let r = h.state.store.run(&run).await.unwrap().unwrap();
        assert_eq!(r.status, RunStatus::Running);
        assert!(r.waiting_for.as_deref().unwrap().starts_with("rollout to staging: simulated rollout"), "{name}: {:?}", r.waiting_for);

        // Delivered twice (a redelivery): one next look, one advance.
        let advanced = *h.compute.advanced.lock().unwrap();
        for delivery in 1..=2 {
            let (s, v) = h.deliver("on_deployment_due", &due[0], delivery).await;
            assert_eq!(s, 200, "{name}: {v}");
        }
        assert_eq!(*h.compute.advanced.lock().unwrap(), advanced + 1, "{name}: the redelivered look advanced nothing");
        let due = dues(&h);
        assert_eq!(due.len(), 2, "{name}: one next look");
        // The last look ends the rollout: deployed, and production follows by policy.
        let (s, _) = h.deliver("on_deployment_due", &due[1], 1).await;
        assert_eq!(s, 200);
        h.pump().await;
        let r = h.state.store.run(&run).await.unwrap().unwrap();
        assert!(r.steps.iter().any(|s| s.name == "deployed to staging"), "{name}: {:?}", r.steps);
        assert_eq!(dues(&h).len(), 3, "{name}: production's rollout started with its own first look");
        let prod = dues(&h).pop().unwrap();
        assert_eq!(prod.session_id.as_deref(), Some("hello/production"));
        assert_bodies_match_schemas(&h.publisher.sent());
    }
}

#[tokio::test]
async fn a_throttled_look_completes_and_comes_back_after_retry_after() {
    let mut h = Harness::with_policy(Arc::new(MemoryStore::default()), POLICY);
    h.compute.faults.lock().unwrap().push_back(Error::Throttled("PATCH web-staging: 429 TooManyRequests".into(), Duration::from_secs(20)));
    let run = to_rollout(&mut h).await;
    // The step that met the 429 answered 200: the host completes the message, nothing is redelivered.
    let due = dues(&h);
    assert_eq!(due.len(), 1);
    let d = data(&due[0]);
    assert_eq!((d["look"].as_u64(), d["retries"].as_u64()), (Some(1), Some(1)));
    assert!(d["cursor"].is_null(), "nothing changed yet: the retry starts over: {d}");
    let at = due[0].scheduled_at.unwrap();
    let wait = at - chrono::Utc::now();
    assert!(wait > chrono::Duration::seconds(18) && wait <= chrono::Duration::seconds(21), "Retry-After: 20 honoured: {wait}");
    let r = h.state.store.run(&run).await.unwrap().unwrap();
    let waiting = r.waiting_for.clone().unwrap();
    assert!(waiting.contains("retry 1 at") && waiting.contains("429"), "{waiting}");
    assert!(r.steps.iter().any(|s| s.name.contains("will be retried after 20s (as asked)")), "{:?}", r.steps);
    assert!(h.compute.rollouts().is_empty());

    let (s, _) = h.deliver("on_deployment_due", &due[0], 1).await;
    assert_eq!(s, 200);
    h.pump().await;
    assert_eq!(h.compute.rollouts().len(), 2, "staging, then production: each once");
    assert_eq!(h.state.store.run(&run).await.unwrap().unwrap().status, RunStatus::Succeeded);
}

#[tokio::test]
async fn past_the_retry_deadline_the_rollout_is_rolled_back_and_the_run_fails_with_the_reason() {
    let mut h = Harness::with_policy(Arc::new(MemoryStore::default()), POLICY);
    *h.compute.looks.lock().unwrap() = 3;
    *h.compute.look_every.lock().unwrap() = Duration::from_secs(5);
    let run = to_rollout(&mut h).await;
    // ARM keeps failing, and has since long before the deadline (30 minutes).
    h.compute.faults.lock().unwrap().push_back(Error::Transient("GET web-staging/virtualMachines: 503 ServiceUnavailable".into()));
    let mut due = dues(&h).pop().unwrap();
    let mut ev: Value = serde_json::from_str(&due.body).unwrap();
    ev["data"]["retries"] = 9.into();
    ev["data"]["failingSince"] = (chrono::Utc::now() - chrono::Duration::hours(1)).to_rfc3339().into();
    due.body = ev.to_string();
    let (s, v) = h.deliver("on_deployment_due", &due, 1).await;
    assert_eq!(s, 200, "{v}");
    // The next look rolls back (the adapter's abort turned the cursor into a rollback).
    let back = dues(&h).pop().unwrap();
    assert!(data(&back)["cursor"]["rollback"].as_str().unwrap().contains("gave up after 30m"), "{}", back.body);
    let (s, _) = h.deliver("on_deployment_due", &back, 1).await;
    assert_eq!(s, 200);
    let r = h.state.store.run(&run).await.unwrap().unwrap();
    assert_eq!(r.status, RunStatus::Failed);
    let text = serde_json::to_string(&r.steps).unwrap();
    assert!(text.contains("deployment to staging rolled back") && text.contains("503 ServiceUnavailable"), "{text}");
    assert!(h.publisher.types().iter().any(|t| t == "deployment.rolledback"));
}

#[tokio::test]
async fn a_look_for_a_stage_the_run_is_not_rolling_out_to_is_ignored() {
    let mut h = Harness::with_policy(Arc::new(MemoryStore::default()), POLICY);
    *h.compute.looks.lock().unwrap() = 1;
    *h.compute.look_every.lock().unwrap() = Duration::from_secs(5);
    to_rollout(&mut h).await;
    let mut due = dues(&h).pop().unwrap();
    let mut ev: Value = serde_json::from_str(&due.body).unwrap();
    ev["data"]["stage"] = "production".into();
    ev["data"]["target"] = "/subscriptions/0/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/hello-prod".into();
    due.body = ev.to_string();
    let advanced = *h.compute.advanced.lock().unwrap();
    let (s, v) = h.deliver("on_deployment_due", &due, 1).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(*h.compute.advanced.lock().unwrap(), advanced, "nothing advanced: {v}");
    // A target the policy no longer names is refused (parked), not rolled out.
    ev["data"]["stage"] = "staging".into();
    ev["data"]["target"] = "/subscriptions/0/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/elsewhere".into();
    due.body = ev.to_string();
    h.deliver("on_deployment_due", &due, 1).await;
    assert_eq!(*h.compute.advanced.lock().unwrap(), advanced);
    assert!(
        h.publisher.parked().iter().any(|p| p.reason.contains("Refused") || p.description.contains("policy changed")),
        "{:?}",
        h.publisher.parked()
    );
}
