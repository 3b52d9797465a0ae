//! Exactly once where a step dies half-way (both found by the fault soak, decision 0019): the step
//! that ends a run commits the end and its `run.finished` together, and when it dies between the
//! commit and the publish the redelivered message finds the run already final — it must still say
//! the end, once; and a decision that arrives before the wait it decides is committed is early,
//! not wrong.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use deploychain_functions::adapters::RunStatus;

#[tokio::test]
async fn a_run_ended_by_a_step_that_died_before_publishing_is_said_to_end_on_redelivery_once() {
    for (name, store) in stores() {
        let mut h = Harness::new(store);
        let commit = "d1e2f3a4b5c6d7e8f9a0b1c2d3e4f5a6b7c8d9e0";
        let run = push_master(&mut h, "Codertocat/Hello-World", commit).await;
        // The build fails: its report is on the bus, not yet delivered.
        let wr = workflow_run_payload("Codertocat/Hello-World", "master", commit, ".github/workflows/build.yml", "failure");
        assert_eq!(h.github_signed("workflow_run", &wr).await.0, 202, "{name}");
        let completed = h.publisher.sent().into_iter().rfind(|m| m.subject == "dev.deploychain.build.completed.v1").unwrap();
        let finished = |h: &Harness| h.publisher.sent().iter().filter(|m| m.message_id == format!("{run}.run-finished")).count();

        // The step commits the run's end, then cannot publish (the invocation dies there).
        h.publisher.set_down(true);
        let (status, v) = h.deliver("on_build_completed", &completed, 1).await;
        assert_ne!(status, 200, "{name}: the invocation fails: {v}");
        assert_eq!(h.state.store.run(&run).await.unwrap().unwrap().status, RunStatus::Failed, "{name}: the end is committed");
        assert_eq!(finished(&h), 0, "{name}: and not said");

        // Redelivered: the run is final, and its end goes out now.
        h.publisher.set_down(false);
        let (status, v) = h.deliver("on_build_completed", &completed, 2).await;
        assert_eq!(status, 200, "{name}: {v}");
        assert_eq!(finished(&h), 1, "{name}: run.finished published on redelivery");
        // Delivered once more (or any late message of the run): nothing again.
        let (status, _) = h.deliver("on_build_completed", &completed, 3).await;
        assert_eq!(status, 200, "{name}");
        assert_eq!(finished(&h), 1, "{name}: once");
    }
}

/// The step that asks for approval notifies the approvers, then commits the run's wait; a handler
/// that dies in between commits it on the redelivery — and a quick approver may decide before
/// that (found by the fault soak: the decision was parked and the run waited for ever). The early
/// decision is looked at again later, a bounded number of times, then parked.
#[tokio::test]
async fn a_decision_that_comes_before_its_runs_wait_is_committed_is_looked_at_again_then_parked() {
    use deploychain_events::{ApprovalDecided, Decision, EventData, ImageKind, ImageRef};
    use deploychain_functions::steps::on_approval::{EARLY_PROPERTY, EARLY_RETRIES};
    use deploychain_functions::steps::{RunRef, emit};
    for (name, store) in stores() {
        let mut h = Harness::new(store);
        let commit = "a1e2f3a4b5c6d7e8f9a0b1c2d3e4f5a6b7c8d9e0";
        let run = push_master(&mut h, "Codertocat/Hello-World", commit).await;
        // The run has no image yet (its wait not committed): a decision for it arrives.
        let image =
            ImageRef { kind: ImageKind::Container, id: "ghcr.io/codertocat/hello-world@sha256:ab".into(), version: None, digest: None };
        let decided = EventData::ApprovalDecided(ApprovalDecided {
            app: "hello".into(),
            stage: "production".into(),
            approval_id: format!("{run}.production"),
            image,
            commit: commit.into(),
            decision: Decision::Approved,
            decided_by: vec!["alice@example.com".into()],
            comment: None,
        });
        let (ev, first) =
            emit(&h.state, &RunRef { id: run.clone(), traceparent: None }, "approval-decided.production", "approval", decided);
        let mut msg = first.clone();
        for look in 1..=EARLY_RETRIES {
            let before = h.publisher.sent().len();
            let (status, v) = h.deliver("on_approval", &msg, 1).await;
            assert_eq!(status, 200, "{name}: {v}");
            let sent = h.publisher.sent();
            assert_eq!(sent.len(), before + 1, "{name}: one look scheduled: {v}");
            let again = sent.last().unwrap().clone();
            assert_eq!(again.message_id, format!("{}.early-{look}", ev.id), "{name}");
            assert_eq!(again.properties.get(EARLY_PROPERTY).map(String::as_str), Some(look.to_string().as_str()), "{name}");
            assert_eq!(again.session_id, first.session_id, "{name}: in the stage's session");
            let wait = again.scheduled_at.unwrap() - chrono::Utc::now();
            let expected = (5i64 << (look - 1).min(16)).min(60);
            assert!((expected - 1..=expected).contains(&wait.num_seconds()), "{name}: look {look} after {wait}, not {expected} s");
            assert!(h.publisher.parked().is_empty(), "{name}: not parked while it is looked at again");
            msg = again;
        }
        // Its looks spent: parked, with the reason, for an operator to replay.
        let (status, _) = h.deliver("on_approval", &msg, 1).await;
        assert_eq!(status, 200, "{name}");
        let parked = h.publisher.parked();
        assert_eq!(parked.len(), 1, "{name}");
        assert_eq!(parked[0].reason, "Refused", "{name}");
        assert!(
            parked[0].description.contains("no image yet") && parked[0].description.contains("looked again 10 times"),
            "{name}: {}",
            parked[0].description
        );
        assert_eq!(h.state.store.run(&run).await.unwrap().unwrap().status, RunStatus::Running, "{name}: the run is untouched");
    }
}
