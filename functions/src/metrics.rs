//! Delivery metrics: the four DORA keys, approval wait, step duration and dead letters, as
//! OpenTelemetry instruments (exported with the spans' settings, see [`crate::telemetry`]).
//!
//! | instrument | kind, unit | recorded when | attributes |
//! |---|---|---|---|
//! | `deploychain.deployments` | counter | a deployment to a stage ends | `cicd.pipeline.name`, `deployment.environment.name`, `deployment.status` (`succeeded`, `failed`, `rolled_back`), `deploychain.stage.final` |
//! | `deploychain.lead_time` | histogram, s | a deployment to the last stage succeeds: from the release's first commit (its push when commits carry no time) | `cicd.pipeline.name`, `deployment.environment.name`, `deploychain.lead_time.from` (`commit`, `push`) |
//! | `deploychain.recovery_time` | histogram, s | a failed stage is healthy again: a rollback ends (from its deployment's start), or a deployment succeeds after a failure that was not rolled back (from that failure) | `cicd.pipeline.name`, `deployment.environment.name`, `deploychain.recovery` (`rollback`, `redeploy`), `deploychain.stage.final` |
//! | `deploychain.approval.wait` | histogram, s | a decided approval promotes or ends its run: request → decision | `cicd.pipeline.name`, `deployment.environment.name`, `deploychain.approval.decision` |
//! | `deploychain.step.duration` | histogram, s | every invocation | `faas.name`, `faas.trigger`, `deploychain.outcome` (`ok`, `transient`, `permanent`) |
//! | `deploychain.dead_letters` | counter | the handler parks a message it can never process | `faas.name`, `deploychain.dead_letter.reason` |
//!
//! Deployment frequency is the rate of `deploychain.deployments` with `deployment.status` =
//! `succeeded` and `deploychain.stage.final` = true; change failure rate is the share of
//! `failed` + `rolled_back` among them; time to restore is `deploychain.recovery_time`.
//!
//! A run's measures are recorded exactly once: a step gathers them while it works and they are
//! recorded only when its commit is the one that landed, so a redelivery, a duplicate or an
//! operator's replay of the same step counts nothing again.

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram};
use std::future::Future;
use std::sync::{Arc, Mutex, OnceLock};

/// One run-scoped fact, recorded when the step that established it commits.
#[derive(Debug, Clone, PartialEq)]
pub enum Measure {
    Deployment { app: String, stage: String, last_stage: bool, status: DeploymentStatus },
    LeadTime { app: String, stage: String, seconds: f64, from: LeadTimeFrom },
    Recovery { app: String, stage: String, last_stage: bool, seconds: f64, how: Recovery },
    ApprovalWait { app: String, stage: String, decision: String, seconds: f64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeploymentStatus {
    Succeeded,
    Failed,
    RolledBack,
}

impl DeploymentStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeploymentStatus::Succeeded => "succeeded",
            DeploymentStatus::Failed => "failed",
            DeploymentStatus::RolledBack => "rolled_back",
        }
    }
}

/// Where a lead time starts: the first commit's author time, or (commits without times) the push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeadTimeFrom {
    Commit,
    Push,
}

/// How a failed stage recovered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// The failed deployment rolled itself back.
    Rollback,
    /// A later deployment succeeded after a failure that stayed.
    Redeploy,
}

struct Instruments {
    deployments: Counter<u64>,
    lead_time: Histogram<f64>,
    recovery_time: Histogram<f64>,
    approval_wait: Histogram<f64>,
    step_duration: Histogram<f64>,
    dead_letters: Counter<u64>,
}

/// Boundaries in seconds from one second to thirty days: lead times and waits span that range.
const LONG_BOUNDARIES: &[f64] =
    &[1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4.0 * 3600.0, 12.0 * 3600.0, 86400.0, 3.0 * 86400.0, 7.0 * 86400.0, 30.0 * 86400.0];
/// Boundaries in seconds for one invocation, from 5 ms to 10 minutes (a rollout).
const STEP_BOUNDARIES: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0];

/// The instruments, on the global meter provider [`crate::telemetry::init`] installs (before any
/// invocation: instruments made earlier would stay no-ops).
fn instruments() -> &'static Instruments {
    static I: OnceLock<Instruments> = OnceLock::new();
    I.get_or_init(|| {
        let m = opentelemetry::global::meter("deploychain");
        let long = |name: &'static str, description: &'static str| {
            m.f64_histogram(name).with_unit("s").with_description(description).with_boundaries(LONG_BOUNDARIES.to_vec()).build()
        };
        Instruments {
            deployments: m.u64_counter("deploychain.deployments").with_description("Deployments to a stage that ended, by status").build(),
            lead_time: long("deploychain.lead_time", "From a release's first commit to its deployment to the last stage"),
            recovery_time: long("deploychain.recovery_time", "From a failed deployment to its stage being healthy again"),
            approval_wait: long("deploychain.approval.wait", "From an approval's request to its decision"),
            step_duration: m
                .f64_histogram("deploychain.step.duration")
                .with_unit("s")
                .with_description("Duration of one function invocation")
                .with_boundaries(STEP_BOUNDARIES.to_vec())
                .build(),
            dead_letters: m
                .u64_counter("deploychain.dead_letters")
                .with_description("Messages the handler parked because they can never succeed")
                .build(),
        }
    })
}

tokio::task_local! {
    static PENDING: Arc<Mutex<Vec<Measure>>>;
}

/// Note a run-scoped measure. Inside [`gather`] it waits for the step's commit; elsewhere it is
/// recorded at once.
pub fn note(m: Measure) {
    let mut m = Some(m);
    let _ = PENDING.try_with(|p| {
        if let Some(m) = m.take() {
            p.lock().unwrap_or_else(|e| e.into_inner()).push(m);
        }
    });
    if let Some(m) = m {
        record(vec![m]);
    }
}

/// Run `f`, collecting the measures it notes instead of recording them.
pub async fn gather<F: Future>(f: F) -> (F::Output, Vec<Measure>) {
    let pending = Arc::new(Mutex::new(Vec::new()));
    let out = PENDING.scope(pending.clone(), f).await;
    let measures = std::mem::take(&mut *pending.lock().unwrap_or_else(|e| e.into_inner()));
    (out, measures)
}

/// Record measures (a step's, once its commit landed).
pub fn record(measures: Vec<Measure>) {
    let i = instruments();
    for m in measures {
        match m {
            Measure::Deployment { app, stage, last_stage, status } => i.deployments.add(
                1,
                &[
                    KeyValue::new("cicd.pipeline.name", app),
                    KeyValue::new("deployment.environment.name", stage),
                    KeyValue::new("deployment.status", status.as_str()),
                    KeyValue::new("deploychain.stage.final", last_stage),
                ],
            ),
            Measure::LeadTime { app, stage, seconds, from } => i.lead_time.record(
                seconds.max(0.0),
                &[
                    KeyValue::new("cicd.pipeline.name", app),
                    KeyValue::new("deployment.environment.name", stage),
                    KeyValue::new("deploychain.lead_time.from", if from == LeadTimeFrom::Commit { "commit" } else { "push" }),
                ],
            ),
            Measure::Recovery { app, stage, last_stage, seconds, how } => i.recovery_time.record(
                seconds.max(0.0),
                &[
                    KeyValue::new("cicd.pipeline.name", app),
                    KeyValue::new("deployment.environment.name", stage),
                    KeyValue::new("deploychain.recovery", if how == Recovery::Rollback { "rollback" } else { "redeploy" }),
                    KeyValue::new("deploychain.stage.final", last_stage),
                ],
            ),
            Measure::ApprovalWait { app, stage, decision, seconds } => i.approval_wait.record(
                seconds.max(0.0),
                &[
                    KeyValue::new("cicd.pipeline.name", app),
                    KeyValue::new("deployment.environment.name", stage),
                    KeyValue::new("deploychain.approval.decision", decision),
                ],
            ),
        }
    }
}

/// One invocation took `seconds`; `outcome` is `ok`, `transient` or `permanent`.
pub fn step_duration(function: &str, trigger: &str, outcome: &'static str, seconds: f64) {
    instruments().step_duration.record(
        seconds,
        &[
            KeyValue::new("faas.name", function.to_string()),
            KeyValue::new("faas.trigger", trigger.to_string()),
            KeyValue::new("deploychain.outcome", outcome),
        ],
    );
}

/// The handler parked a message (`reason` is its `DeadLetterReason`).
pub fn dead_letter(function: &str, reason: &str) {
    instruments()
        .dead_letters
        .add(1, &[KeyValue::new("faas.name", function.to_string()), KeyValue::new("deploychain.dead_letter.reason", reason.to_string())]);
}

/// Seconds from `from` to `to` (negative clock skew counts as zero).
pub fn seconds_between(from: chrono::DateTime<chrono::Utc>, to: chrono::DateTime<chrono::Utc>) -> f64 {
    ((to - from).num_milliseconds().max(0) as f64) / 1000.0
}

/// Where a release's lead time starts: its earliest commit time, else its push.
pub fn lead_time_start(run: &crate::adapters::Run) -> (chrono::DateTime<chrono::Utc>, LeadTimeFrom) {
    match run.change.commits.iter().filter_map(|c| c.timestamp).min() {
        Some(t) => (t, LeadTimeFrom::Commit),
        None => (run.created_at, LeadTimeFrom::Push),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn measures_noted_in_a_step_wait_for_it_and_nested_steps_keep_their_own() {
        let (n, outer) = gather(async {
            note(Measure::ApprovalWait { app: "web".into(), stage: "production".into(), decision: "approved".into(), seconds: 3.0 });
            let ((), inner) = gather(async {
                note(Measure::Deployment {
                    app: "web".into(),
                    stage: "staging".into(),
                    last_stage: false,
                    status: DeploymentStatus::Succeeded,
                });
            })
            .await;
            assert_eq!(inner.len(), 1);
            7
        })
        .await;
        assert_eq!(n, 7);
        assert_eq!(
            outer,
            vec![Measure::ApprovalWait { app: "web".into(), stage: "production".into(), decision: "approved".into(), seconds: 3.0 }]
        );
    }

    #[test]
    fn lead_time_starts_at_the_earliest_commit_and_falls_back_to_the_push() {
        let t = |s: i64| chrono::DateTime::from_timestamp(s, 0).unwrap_or_default();
        let mut run = crate::adapters::Run {
            id: "r".into(),
            app: "web".into(),
            repository: "o/r".into(),
            branch: "main".into(),
            commit: "abc".into(),
            sequence: 1,
            status: crate::adapters::RunStatus::Running,
            waiting_for: None,
            image: None,
            stage: None,
            traceparent: None,
            created_at: t(5000),
            updated_at: t(5000),
            steps: Vec::new(),
            change: Default::default(),
        };
        assert_eq!(lead_time_start(&run), (t(5000), LeadTimeFrom::Push));
        let commit = |s: Option<i64>| deploychain_events::CommitInfo {
            id: "abcdef0".into(),
            message: None,
            author: None,
            author_email: None,
            author_login: None,
            timestamp: s.map(t),
        };
        run.change.commits = vec![commit(Some(4000)), commit(None), commit(Some(3000))];
        assert_eq!(lead_time_start(&run), (t(3000), LeadTimeFrom::Commit));
        assert_eq!(seconds_between(t(3000), t(4500)), 1500.0);
        assert_eq!(seconds_between(t(4500), t(3000)), 0.0, "skew is not negative time");
    }
}
