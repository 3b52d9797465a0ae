//! A stage's health as steps commit it (both stores): a failed deployment marks the stage failed
//! once, keeping the first failure's time through later failures and rollbacks, and a successful
//! deployment clears it — atomically with the step, and not again on a duplicate commit.
#![allow(clippy::unwrap_used)]

mod common;

use chrono::{DateTime, Utc};
use deploychain_functions::adapters::{Run, RunStatus, StageFailure, StageHealth, StepCommit};

fn at(s: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap()
}

fn run(id: &str) -> Run {
    Run {
        id: id.into(),
        app: "web".into(),
        repository: "octo-org/web".into(),
        branch: "main".into(),
        commit: "0123456789abcdef0123456789abcdef01234567".into(),
        sequence: 0,
        status: RunStatus::Running,
        waiting_for: None,
        image: None,
        stage: None,
        traceparent: None,
        created_at: at(0),
        updated_at: at(0),
        steps: Vec::new(),
        change: Default::default(),
    }
}

fn step(run_id: &str, key: &str, health: Option<StageHealth>) -> StepCommit {
    let mut c = StepCommit::of_run(run_id, key, Vec::new(), RunStatus::Running, None, Vec::new());
    c.new_run = Some(run(run_id));
    c.stage_health = health;
    c
}

fn failed(run_id: &str, s: i64) -> Option<StageHealth> {
    Some(StageHealth::Failed(StageFailure { app: "web".into(), stage: "production".into(), since: at(s), run_id: run_id.into() }))
}

#[tokio::test]
async fn a_stage_stays_failed_since_its_first_failure_until_a_deployment_succeeds() {
    for (name, store) in common::stores() {
        assert_eq!(store.stage_failure("web", "production").await.unwrap(), None, "{name}");
        assert!(store.commit_step(&step("r1", "promote.production", failed("r1", 10))).await.unwrap());
        assert!(store.commit_step(&step("r2", "promote.production", failed("r2", 20))).await.unwrap());
        let f = store.stage_failure("web", "production").await.unwrap().unwrap();
        assert_eq!((f.since, f.run_id.as_str()), (at(10), "r1"), "{name}: the first failure's time stands");
        assert_eq!(store.stage_failure("web", "staging").await.unwrap(), None, "{name}: per stage");

        let recovered = Some(StageHealth::Recovered { app: "web".into(), stage: "production".into() });
        assert!(store.commit_step(&step("r3", "promote.production", recovered)).await.unwrap());
        assert_eq!(store.stage_failure("web", "production").await.unwrap(), None, "{name}");
        // A duplicate commit of an earlier failing step changes nothing.
        assert!(!store.commit_step(&step("r2", "promote.production", failed("r2", 20))).await.unwrap());
        assert_eq!(store.stage_failure("web", "production").await.unwrap(), None, "{name}: a duplicate is not a new failure");
    }
}
