//! One file per function. Service Bus steps (`on_…`) advance a run by one step; HTTP functions
//! (`github_webhook`, `azure_devops_webhook`, `jenkins_webhook`, `approval`, `runs`) are the chain's edges.
//!
//! Every step goes through [`run_step`], the exactly-once machinery: a step's effects are
//! idempotent desired-state calls keyed by run, its state change and outgoing events are committed
//! together (outbox), and the events are published with deterministic MessageIds. A redelivered or
//! replayed message finds the step committed and publishes nothing new — or, if the earlier attempt
//! died between commit and publish, re-publishes exactly the same messages.

pub mod approval;
pub mod azure_devops_webhook;
pub mod eventgrid_webhook;
pub mod github_webhook;
pub mod jenkins_webhook;
pub mod on_approval;
pub mod on_approval_due;
pub mod on_build_completed;
pub mod on_deployment_due;
pub mod on_image_due;
pub mod on_image_ready;
pub mod on_push;
pub mod ops_deadletters;
pub mod rollout;
pub mod runs;
pub mod watchdog;

use crate::AppState;
use crate::adapters::{
    ApprovalNotice, ApprovalRecord, ApprovalUpdate, AuditEntry, Closed, DeployOutcome, Evidence, Excluded, NoticeKind, Outbound, Run,
    RunStatus, StageEvidence, StageFailure, StageHealth, StepCommit, StepEntry,
};
use crate::error::{Error, Result};
use crate::policy::{App, Approval, Policy};
use chrono::{DateTime, Utc};
use deploychain_events::*;
pub use rollout::{Deployed, deploy_stage};
use std::future::Future;

/// What [`run_step`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepDone {
    /// Committed and published now.
    Done,
    /// Already committed and published: a duplicate delivery, nothing new.
    Duplicate,
    /// Committed earlier but not known published: published the same messages again.
    Republished,
    /// Nothing to do, with the reason.
    Ignored(String),
}

impl StepDone {
    pub fn describe(&self) -> String {
        match self {
            StepDone::Done => "done".into(),
            StepDone::Duplicate => "duplicate delivery: already done, nothing published".into(),
            StepDone::Republished => "already committed: re-published its messages".into(),
            StepDone::Ignored(r) => format!("ignored: {r}"),
        }
    }
}

/// Run one step exactly once. `work` performs the step's idempotent effects and returns what to
/// commit, or `None` to change nothing.
pub async fn run_step<F, Fut>(state: &AppState, run_id: &str, key: &str, work: F) -> Result<StepDone>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<Option<StepCommit>>>,
{
    if let Some(rec) = state.store.step(run_id, key).await? {
        if rec.published {
            return Ok(StepDone::Duplicate);
        }
        publish_all(state, &rec.outbox).await?;
        state.store.mark_published(run_id, key).await?;
        return Ok(StepDone::Republished);
    }
    // The measures the step notes count once: only if its commit is the one that lands.
    let (work, measures) = crate::metrics::gather(work()).await;
    let Some(commit) = work? else {
        return Ok(StepDone::Ignored("nothing to change".into()));
    };
    let outbox = if state.store.commit_step(&commit).await? {
        crate::metrics::record(measures);
        // With spans recorded, the run remembers its latest step's span for the edges to continue.
        if let Some(tp) = crate::telemetry::current_traceparent() {
            let run_trace =
                state.store.run(run_id).await?.and_then(|r| r.traceparent).and_then(|t| t.split('-').nth(1).map(str::to_string));
            if run_trace.is_none_or(|t| tp.split('-').nth(1) == Some(t.as_str())) {
                state.store.set_traceparent(run_id, &tp).await?;
            }
        }
        commit.outbox
    } else {
        // A concurrent delivery committed first: publish what it committed, not ours.
        state.store.step(run_id, key).await?.map(|r| r.outbox).unwrap_or_default()
    };
    publish_all(state, &outbox).await?;
    state.store.mark_published(run_id, key).await?;
    Ok(StepDone::Done)
}

async fn publish_all(state: &AppState, outbox: &[Outbound]) -> Result<()> {
    for m in outbox {
        state.publisher.publish(m).await?;
    }
    Ok(())
}

/// The Service Bus session an event travels in: deploys to one stage are serialized by
/// `app/stage`; `image.ready` opens the first stage's session; everything else is per app.
pub fn session_for(ev: &DeployEvent, policy: &Policy) -> Option<String> {
    let app = ev.data.app();
    match (&ev.data, ev.data.stage()) {
        (EventData::ImageReady(_), _) => {
            let first = policy.app(app).and_then(|a| a.stages.first()).map(|s| s.name.as_str()).unwrap_or("deploy");
            Some(format!("{app}/{first}"))
        }
        (_, Some(stage)) => Some(format!("{app}/{stage}")),
        _ => Some(app.to_string()),
    }
}

/// Build an outgoing event of a run: deterministic id, the run's trace, a child span id derived
/// from the event id so a retried step produces the same traceparent.
pub fn emit(state: &AppState, run: &RunRef, step: &str, function: &str, data: EventData) -> (DeployEvent, Outbound) {
    let id = event_id(&run.id, step);
    let ev = DeployEvent {
        id: id.clone(),
        source: format!("/deploychain/{}/{}", data.app(), function),
        time: Utc::now(),
        run_id: run.id.clone(),
        trace: TraceContext { traceparent: event_traceparent(run.traceparent.as_deref(), &id), tracestate: None },
        data,
    };
    let session = session_for(&ev, &state.policy);
    let out = Outbound::from_event(&ev, session);
    (ev, out)
}

/// The identity of a run that events need.
#[derive(Debug, Clone)]
pub struct RunRef {
    pub id: String,
    pub traceparent: Option<String>,
}

impl From<&Run> for RunRef {
    fn from(r: &Run) -> Self {
        RunRef { id: r.id.clone(), traceparent: r.traceparent.clone() }
    }
}

/// The parent an event of a run names. With spans recorded: the running invocation's span when it
/// is in the run's trace, else (an edge such as a CI webhook or an approval, whose own span starts a
/// trace of its own) the run's latest step's span — so the release is one trace with its parent
/// chain in order. Without spans: a child id derived from the event id, which keeps the trace.
pub fn event_traceparent(run_traceparent: Option<&str>, event_id: &str) -> Option<String> {
    let run_trace = run_traceparent.and_then(|t| t.split('-').nth(1));
    match crate::telemetry::current_traceparent() {
        Some(cur) if run_trace.is_none_or(|rt| cur.split('-').nth(1) == Some(rt)) => Some(cur),
        Some(_) => run_traceparent.map(str::to_string),
        None => run_traceparent.map(|tp| child_traceparent(tp, event_id)),
    }
}

/// Same trace, a span id derived from `seed`.
pub fn child_traceparent(parent: &str, seed: &str) -> String {
    let trace_id = parent.split('-').nth(1).unwrap_or("");
    let flags = parent.split('-').nth(3).unwrap_or("01");
    let span = short_digest(&[seed]);
    format!("00-{trace_id}-{span}-{flags}")
}

/// A new root traceparent for a run whose start carried none (ids derived from the run id).
pub fn root_traceparent(run_id: &str) -> String {
    let a = short_digest(&[run_id, "trace-a"]);
    let b = short_digest(&[run_id, "trace-b"]);
    let span = short_digest(&[run_id, "span"]);
    format!("00-{a}{b}-{span}-01")
}

pub fn entry(key: &str, name: impl Into<String>, detail: Option<String>) -> StepEntry {
    StepEntry { key: key.to_string(), name: name.into(), at: Utc::now(), detail }
}

/// Decode a delivered message into a chain event, checking that it is the type this function takes.
pub fn decode(body: &[u8], expected: EventType) -> Result<DeployEvent> {
    let ev = DeployEvent::from_json_bytes(body)?;
    if ev.event_type() != expected {
        return Err(Error::Malformed(format!("expected `{}`, got `{}` (check the subscription filter)", expected, ev.event_type())));
    }
    Ok(ev)
}

/// How long a build report waits for the run it names to be committed.
pub const DISPATCH_RACE: std::time::Duration = std::time::Duration::from_secs(3);

/// The run `id`, waiting up to [`DISPATCH_RACE`] while it does not exist yet. `on_push` starts a
/// build and then commits the run, and a build that ends at once (a workflow that fails on its
/// first line, the local simulators) can report back in between: its report would otherwise be
/// ignored as "no such run", and the run would wait for a build that already ended.
pub async fn run_when_committed(state: &AppState, id: &str) -> Result<Option<Run>> {
    let deadline = tokio::time::Instant::now() + DISPATCH_RACE;
    loop {
        if let Some(r) = state.store.run(id).await? {
            return Ok(Some(r));
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(None);
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Load the run an event names, refusing events of unknown runs and runs already finished.
pub async fn active_run(state: &AppState, ev: &DeployEvent) -> Result<std::result::Result<Run, String>> {
    let Some(run) = state.store.run(&ev.run_id).await? else {
        return Err(Error::NotFound(format!("no run `{}` (was its push ignored?)", ev.run_id)));
    };
    if run.app != ev.data.app() {
        return Err(Error::Malformed(format!("event for app `{}` names run `{}` of app `{}`", ev.data.app(), run.id, run.app)));
    }
    if run.status.is_final() {
        let again = republish_pending(state, &run).await?;
        let note = if again > 0 { format!(" (re-published what {again} of its committed steps had not published)") } else { String::new() };
        return Ok(Err(format!("run `{}` already {}{note}", run.id, run.status.as_str())));
    }
    Ok(Ok(run))
}

/// Publish what the run's committed steps have not published yet (through [`run_step`], which
/// re-publishes a committed step's outbox and marks it published); how many steps. A step that
/// ends a run commits the end and its `run.finished` together; if its invocation died before
/// publishing, the redelivered message finds the run already final and never reaches that step —
/// so the end is said here instead (same MessageIds: the broker drops what did go out).
pub async fn republish_pending(state: &AppState, run: &Run) -> Result<usize> {
    let mut keys: Vec<&str> = Vec::new();
    for s in run.steps.iter().rev() {
        if !keys.contains(&s.key.as_str()) {
            keys.push(&s.key);
        }
    }
    let mut again = 0;
    for key in keys {
        if run_step(state, &run.id, key, || async { Ok(None) }).await? == StepDone::Republished {
            again += 1;
        }
    }
    Ok(again)
}

/// The id of `run`'s approval of `stage`.
pub fn approval_id(run_id: &str, stage: &str) -> String {
    format!("{run_id}.{stage}")
}

pub fn app_of<'a>(state: &'a AppState, name: &str) -> Result<&'a App> {
    state.policy.app(name).ok_or_else(|| Error::Refused(format!("app `{name}` is not in the pipeline policy")))
}

/// A check as approvers read it: `GET http://web-staging.internal/healthz → 200` (no query: it may
/// carry a key).
pub fn describe_check(c: &crate::policy::Check) -> String {
    let url = c.url.as_deref().and_then(|u| url::Url::parse(u).ok()).map(|mut u| {
        u.set_query(None);
        let _ = u.set_password(None);
        let _ = u.set_username("");
        u.to_string()
    });
    let body = c.expect_body.as_deref().map(|b| format!(", body contains “{b}”")).unwrap_or_default();
    format!("GET {} → {}{body}", url.unwrap_or_else(|| "(no url)".into()), c.expect_status)
}

/// The scheduled messages of an approval's timers in its current round: a reminder
/// `remind_before` each, then the timeout.
pub fn approval_timers(state: &AppState, rr: &RunRef, record: &ApprovalRecord, policy: &Approval, function: &str) -> Vec<Outbound> {
    let round = record.round();
    let now = Utc::now();
    let due = |kind: DueKind, at: DateTime<Utc>, step: String| {
        let data = EventData::ApprovalDue(ApprovalDue {
            app: record.app.clone(),
            stage: record.stage.clone(),
            approval_id: record.id.clone(),
            commit: record.commit.clone(),
            due: kind,
            at: at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            round,
        });
        emit(state, rr, &step, function, data).1.scheduled(at)
    };
    let mut out: Vec<Outbound> = policy
        .reminders()
        .into_iter()
        .filter_map(|before| {
            let at = record.expires_at - chrono::Duration::from_std(before).ok()?;
            (at > now).then(|| due(DueKind::Reminder, at, format!("approval-due.{}.reminder.{round}.{}", record.stage, before.as_secs())))
        })
        .collect();
    out.push(due(DueKind::Timeout, record.expires_at, format!("approval-due.{}.timeout.{round}", record.stage)));
    out
}

/// Close the open approvals of older runs waiting for `stage` of `app` — `newer` reached it —
/// and end those runs as superseded, each once.
async fn supersede_older(state: &AppState, app: &App, stage: &str, newer: &Run, function: &str) -> Result<()> {
    for a in state.store.open_approvals(&app.name, stage).await? {
        if a.run_id == newer.id {
            continue;
        }
        let Some(old) = state.store.run(&a.run_id).await? else { continue };
        if old.sequence >= newer.sequence || old.status.is_final() {
            continue;
        }
        let now = Utc::now();
        let (rec, _) =
            state.store.update_approval(&a.id, &ApprovalUpdate::Close(Closed::Superseded { by_run: newer.id.clone(), at: now })).await?;
        if !matches!(&rec.closed, Some(Closed::Superseded { by_run, .. }) if *by_run == newer.id) {
            continue; // decided in the meantime: it stands.
        }
        let key = format!("superseded.{stage}");
        let short = &newer.commit[..newer.commit.len().min(12)];
        let reason = format!("superseded at {stage} by newer run {} ({short})", newer.id);
        run_step(state, &old.id, &key, || async {
            let what = entry(&key, format!("approval of {stage} superseded"), Some(reason.clone()));
            let mut c = finish_run(state, &old, &key, function, what, RunOutcome::Superseded, reason.clone(), Some(stage.to_string()));
            let changed = EventData::ApprovalChanged(ApprovalChanged {
                app: rec.app.clone(),
                stage: stage.to_string(),
                approval_id: rec.id.clone(),
                image: rec.image.clone(),
                commit: rec.commit.clone(),
                change: ApprovalChange::Superseded,
                people: Vec::new(),
                detail: Some(format!("by run {}", newer.id)),
            });
            c.outbox.insert(0, emit(state, &RunRef::from(&old), &format!("approval-changed.{stage}.superseded"), function, changed).1);
            Ok(Some(c))
        })
        .await?;
    }
    Ok(())
}

/// The notice that gives each of `to` their own signed link to `record`.
pub fn notice(state: &AppState, record: &ApprovalRecord, to: &[String], kind: NoticeKind, key: &str) -> ApprovalNotice {
    let links = to
        .iter()
        .map(|a| {
            let claims = crate::links::Claims {
                approval: record.id.clone(),
                run: record.run_id.clone(),
                stage: record.stage.clone(),
                artifact: crate::links::artifact_digest(&record.image.id),
                approver: a.clone(),
                exp: record.expires_at.timestamp(),
            };
            (a.clone(), state.links.link(&claims))
        })
        .collect();
    ApprovalNotice {
        approval_id: record.id.clone(),
        run_id: record.run_id.clone(),
        app: record.app.clone(),
        stage: record.stage.clone(),
        commit: record.commit.clone(),
        image: record.image.clone(),
        expires_at: record.expires_at,
        links,
        kind,
        key: key.to_string(),
        evidence: record.evidence.clone(),
        votes: record.votes.clone(),
        quorum: record.quorum,
        traceparent: crate::telemetry::current_traceparent(),
    }
}

pub fn waiting_for_approval(a: &ApprovalRecord) -> String {
    let approved: Vec<&str> = a.votes.iter().filter(|v| v.decision == Decision::Approved).map(|v| v.approver.as_str()).collect();
    let short = if a.approvers.len() < a.quorum as usize {
        format!(
            "; only {} may approve (the release's pusher and authors may not): it cannot reach its quorum before the timeout",
            a.approvers.len()
        )
    } else {
        String::new()
    };
    format!(
        "approval of {} by {} of [{}] ({} given{}){short}; expires {}",
        a.stage,
        a.quorum,
        a.approvers.join(", "),
        approved.len(),
        if approved.is_empty() { String::new() } else { format!(": {}", approved.join(", ")) },
        a.expires_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    )
}

pub fn run_outcome_word(o: RunOutcome) -> &'static str {
    match o {
        RunOutcome::Succeeded => "succeeded",
        RunOutcome::Failed => "failed",
        RunOutcome::Rejected => "rejected",
        RunOutcome::Superseded => "superseded",
    }
}

pub fn status_of(o: RunOutcome) -> RunStatus {
    match o {
        RunOutcome::Succeeded => RunStatus::Succeeded,
        RunOutcome::Failed => RunStatus::Failed,
        RunOutcome::Rejected => RunStatus::Rejected,
        RunOutcome::Superseded => RunStatus::Superseded,
    }
}

/// The commit of a step that ends a run: `what` happened (its history entry), then the run's end
/// with the reason, and the `run.finished` event.
#[allow(clippy::too_many_arguments)]
pub fn finish_run(
    state: &AppState,
    run: &Run,
    key: &str,
    function: &str,
    what: StepEntry,
    outcome: RunOutcome,
    reason: String,
    stage: Option<String>,
) -> StepCommit {
    let (_, out) = emit(
        state,
        &RunRef::from(run),
        "run-finished",
        function,
        EventData::RunFinished(RunFinished {
            app: run.app.clone(),
            commit: run.commit.clone(),
            outcome,
            reason: reason.clone(),
            stage: stage.clone(),
        }),
    );
    StepCommit {
        run_id: run.id.clone(),
        key: key.to_string(),
        new_run: None,
        entries: vec![what, entry(key, format!("run {}", run_outcome_word(outcome)), Some(reason))],
        status: status_of(outcome),
        waiting_for: None,
        image: None,
        stage,
        outbox: vec![out],
        stage_health: None,
    }
}

/// A step commit on an existing run.
pub fn commit(run: &Run, key: &str, d: Deployed, image: Option<ImageRef>, stage: Option<String>) -> StepCommit {
    StepCommit {
        run_id: run.id.clone(),
        key: key.to_string(),
        new_run: None,
        entries: d.entries,
        status: d.status,
        waiting_for: d.waiting_for,
        image,
        stage,
        outbox: d.outbox,
        stage_health: d.stage_health,
    }
}

/// The image request of a run's commit, from its app's policy.
pub fn image_request(app: &App, run: &Run, build_id: &str) -> crate::adapters::ImageRequest {
    crate::adapters::ImageRequest {
        run_id: run.id.clone(),
        app: app.name.clone(),
        commit: run.commit.clone(),
        build_id: build_id.to_string(),
        source: app.image.source.as_str().into(),
        destination: app.image.destination.clone(),
        sequence: run.sequence,
        template: (app.image.source == crate::policy::ImageSource::ImageBuilder).then(|| app.image.template_id(&app.name)),
        kind: app.artifact_kind(),
    }
}

/// `image.ready` of a run (the same MessageId whoever finds the image first).
pub fn image_ready(state: &AppState, rr: &RunRef, app: &App, run: &Run, image: ImageRef, function: &str) -> Outbound {
    let data =
        EventData::ImageReady(ImageReady { app: app.name.clone(), commit: run.commit.clone(), image, branch: Some(run.branch.clone()) });
    emit(state, rr, "image-ready", function, data).1
}

/// The scheduled `image.due` that looks at a bake for the `attempt`th time, `after` from now.
#[allow(clippy::too_many_arguments)]
pub fn image_due(
    state: &AppState,
    rr: &RunRef,
    app: &App,
    run: &Run,
    bake: &str,
    attempt: u32,
    deadline: DateTime<Utc>,
    after: std::time::Duration,
    function: &str,
) -> Outbound {
    let data = EventData::ImageDue(ImageDue {
        app: app.name.clone(),
        commit: run.commit.clone(),
        bake: bake.to_string(),
        attempt,
        deadline: deadline.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    });
    let at = Utc::now() + chrono::Duration::from_std(after).unwrap_or(chrono::Duration::minutes(1));
    emit(state, rr, &format!("image-due.{attempt}"), function, data).1.scheduled(at)
}

pub fn now() -> DateTime<Utc> {
    Utc::now()
}
