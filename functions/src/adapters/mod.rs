//! The capabilities steps depend on, as small traits, and their backends.
//!
//! Steps see only these traits; `AppState` holds one `Arc<dyn …>` of each, chosen once in `main`.
//! `memory` backs step and router tests; `servicebus` and `sqlite` are the real publisher and store.

pub mod aks;
pub mod arm;
pub mod bake;
pub mod ci;
pub mod memory;
pub mod notify;
pub mod servicebus;
pub mod sqlite;
pub mod table;

use crate::error::Result;
use crate::policy::{Check, DeployMode};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use deploychain_events::{BuildProvider, CLOUDEVENTS_JSON, DeployEvent, ImageRef};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One message to put on the bus.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outbound {
    /// Deterministic per (run, step): the broker's duplicate detection drops a re-send.
    pub message_id: String,
    /// `app/stage` for stage-scoped events (deploys to one stage are serialized), else the app.
    pub session_id: Option<String>,
    /// Service Bus `Label`/`Subject`: the CloudEvents type, so subscriptions filter on it.
    pub subject: String,
    pub content_type: String,
    pub body: String,
    /// CloudEvents attributes as application properties (AMQP binding, `cloudEvents_` prefix).
    pub properties: BTreeMap<String, String>,
    /// A Service Bus scheduled message: enqueued (visible to receivers) only from this time on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_at: Option<DateTime<Utc>>,
}

impl Outbound {
    /// The same message, scheduled for `at`.
    pub fn scheduled(mut self, at: DateTime<Utc>) -> Outbound {
        self.scheduled_at = Some(at);
        self
    }

    pub fn from_event(ev: &DeployEvent, session_id: Option<String>) -> Outbound {
        let mut properties = BTreeMap::new();
        properties.insert("cloudEvents_specversion".into(), "1.0".into());
        properties.insert("cloudEvents_id".into(), ev.id.clone());
        properties.insert("cloudEvents_source".into(), ev.source.clone());
        properties.insert("cloudEvents_type".into(), ev.event_type().as_str().into());
        properties.insert("cloudEvents_subject".into(), ev.run_id.clone());
        properties.insert("cloudEvents_time".into(), ev.time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
        properties.insert(format!("cloudEvents_{}", deploychain_events::RUN_ID_EXTENSION), ev.run_id.clone());
        if let Some(tp) = &ev.trace.traceparent {
            properties.insert("cloudEvents_traceparent".into(), tp.clone());
            // What the Azure SDKs and the Functions host read as the message's parent span.
            properties.insert("Diagnostic-Id".into(), tp.clone());
        }
        if let Some(ts) = &ev.trace.tracestate {
            properties.insert("cloudEvents_tracestate".into(), ts.clone());
        }
        Outbound {
            message_id: ev.id.clone(),
            session_id,
            subject: ev.event_type().as_str().into(),
            content_type: CLOUDEVENTS_JSON.into(),
            body: String::from_utf8_lossy(&ev.to_json_bytes()).into_owned(),
            properties,
            scheduled_at: None,
        }
    }
}

/// A message that can never succeed, set aside with the reason so an operator can fix and replay it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Parked {
    /// The original MessageId (or a digest of the body when it had none).
    pub message_id: String,
    /// The function that refused it.
    pub function: String,
    /// `MalformedEvent`, `UnknownRun`, …: the `DeadLetterReason` code.
    pub reason: String,
    pub description: String,
    pub delivery_count: u32,
    /// The original body, as received (lossy UTF-8: Service Bus REST carries text bodies).
    pub body: String,
    pub original_subject: Option<String>,
}

#[async_trait]
pub trait Publish: Send + Sync {
    async fn publish(&self, msg: &Outbound) -> Result<()>;
    /// Put a poison message on the parking queue. Only after this succeeds may the trigger be
    /// answered with success (which completes the original).
    async fn park(&self, msg: &Parked) -> Result<()>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunStatus {
    Running,
    Waiting,
    Succeeded,
    Failed,
    Rejected,
    Superseded,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Waiting => "waiting",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::Rejected => "rejected",
            RunStatus::Superseded => "superseded",
        }
    }
    pub fn parse(s: &str) -> Option<RunStatus> {
        [RunStatus::Running, RunStatus::Waiting, RunStatus::Succeeded, RunStatus::Failed, RunStatus::Rejected, RunStatus::Superseded]
            .into_iter()
            .find(|x| x.as_str() == s)
    }
    pub fn is_final(self) -> bool {
        !matches!(self, RunStatus::Running | RunStatus::Waiting)
    }
}

/// One thing that happened in a run, as the runs API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepEntry {
    /// The idempotency key of the step that wrote it (`push`, `deploy.staging`, …).
    pub key: String,
    /// What happened (`build requested`, `deployed to staging`, …).
    pub name: String,
    pub at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    pub id: String,
    pub app: String,
    pub repository: String,
    pub branch: String,
    pub commit: String,
    /// Per-app order of runs (assigned by the store at creation): a deploy never goes from a higher to a lower sequence.
    pub sequence: i64,
    pub status: RunStatus,
    /// What the run waits for now, in words (`build of abc123 in GitHub Actions`, `approval of production by …`).
    pub waiting_for: Option<String>,
    pub image: Option<ImageRef>,
    /// The last stage deployed or being decided.
    pub stage: Option<String>,
    pub traceparent: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub steps: Vec<StepEntry>,
    /// Who changed what: the push's pusher and commits (approvers see them; none of these people
    /// may approve the release).
    #[serde(default)]
    pub change: Change,
}

/// The change a run releases, as its push reported it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub pusher: Option<String>,
    pub pusher_email: Option<String>,
    pub commits: Vec<deploychain_events::CommitInfo>,
}

impl Change {
    /// Every identity of the people who made the change (pusher, commit authors), lower case.
    pub fn people(&self) -> Vec<String> {
        let mut out: Vec<String> = [&self.pusher, &self.pusher_email]
            .into_iter()
            .flatten()
            .chain(self.commits.iter().flat_map(|c| [&c.author_email, &c.author_login].into_iter().flatten()))
            .map(|p| p.trim().to_ascii_lowercase())
            .filter(|p| !p.is_empty())
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

/// Everything one step changes, committed atomically: its entries, the run's new state, and the
/// events it must publish (the outbox). A second commit of the same (run, key) changes nothing.
#[derive(Debug, Clone, PartialEq)]
pub struct StepCommit {
    pub run_id: String,
    pub key: String,
    /// Set by the step that starts a run.
    pub new_run: Option<Run>,
    pub entries: Vec<StepEntry>,
    pub status: RunStatus,
    pub waiting_for: Option<String>,
    pub image: Option<ImageRef>,
    pub stage: Option<String>,
    pub outbox: Vec<Outbound>,
    /// A deployment that left its stage failed, or one that recovered it.
    pub stage_health: Option<StageHealth>,
}

/// A stage whose last deployment failed and was not rolled back: it is unrecovered since `since`
/// (the first such failure), until a deployment to it succeeds. Its recovery time is a DORA metric.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageFailure {
    pub app: String,
    pub stage: String,
    pub since: DateTime<Utc>,
    /// The run whose deployment failed first.
    pub run_id: String,
}

/// What a step's deployment did to its stage's health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StageHealth {
    /// The stage is failed; an earlier unrecovered failure keeps its time.
    Failed(StageFailure),
    /// A deployment to the stage succeeded: it is no longer failed.
    Recovered { app: String, stage: String },
}

impl StepCommit {
    /// A step of an existing run that neither changes its image nor its stage: the run stays
    /// `status`, waiting for `waiting_for`.
    pub fn of_run(
        run_id: &str,
        key: &str,
        entries: Vec<StepEntry>,
        status: RunStatus,
        waiting_for: Option<String>,
        outbox: Vec<Outbound>,
    ) -> StepCommit {
        StepCommit {
            run_id: run_id.to_string(),
            key: key.to_string(),
            new_run: None,
            entries,
            status,
            waiting_for,
            image: None,
            stage: None,
            outbox,
            stage_health: None,
        }
    }
}

/// A committed step: what it must have published, and whether it is known to have been.
#[derive(Debug, Clone, PartialEq)]
pub struct StepRecord {
    pub outbox: Vec<Outbound>,
    pub published: bool,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunQuery {
    pub app: Option<String>,
    pub commit: Option<String>,
    pub limit: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vote {
    pub approver: String,
    pub decision: deploychain_events::Decision,
    pub at: DateTime<Utc>,
    pub comment: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalRecord {
    pub id: String,
    pub run_id: String,
    pub app: String,
    pub stage: String,
    pub commit: String,
    /// The immutable artifact the approval is for; links are bound to it.
    pub image: ImageRef,
    /// Who may decide: the policy's approvers (groups expanded) without the `excluded` people;
    /// after an escalation, the people escalated to.
    pub approvers: Vec<String>,
    pub quorum: u32,
    pub expires_at: DateTime<Utc>,
    pub votes: Vec<Vote>,
    /// Approvers of the policy who may not approve this release, and why (separation of duties).
    #[serde(default)]
    pub excluded: Vec<Excluded>,
    /// What the approvers are shown.
    #[serde(default)]
    pub evidence: Evidence,
    /// Set when the approval ended without the approvers' votes deciding it.
    #[serde(default)]
    pub closed: Option<Closed>,
    /// Whether the timeout escalated it already (a second timeout rejects).
    #[serde(default)]
    pub escalated: bool,
    /// Everything that happened to it: requested, reminded, voted, escalated, expired, superseded.
    #[serde(default)]
    pub audit: Vec<AuditEntry>,
    /// The span of the step that asked for it: an approver's page views and decision are its
    /// children, even when the link is clicked before that step has committed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Excluded {
    pub who: String,
    pub why: String,
}

/// What an approver sees before deciding.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evidence {
    pub repository: String,
    pub branch: String,
    pub pusher: Option<String>,
    pub commits: Vec<deploychain_events::CommitInfo>,
    /// The stage before this one, which the artifact passed.
    pub previous: Option<StageEvidence>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageEvidence {
    pub stage: String,
    pub target: String,
    pub deployed_at: DateTime<Utc>,
    /// The health gate it passed, in words.
    pub health: String,
    /// The acceptance checks it passed, one line each.
    pub checks: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Closed {
    /// A newer run reached the stage first: this approval decides nothing.
    Superseded { by_run: String, at: DateTime<Utc> },
    /// The timeout ended it with its default action.
    TimedOut { action: String, at: DateTime<Utc> },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub at: DateTime<Utc>,
    /// `requested`, `reminded`, `approved`, `rejected`, `escalated`, `timed-out`, `superseded`.
    pub what: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub who: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// What recording a vote did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VoteResult {
    /// The vote is recorded now.
    Recorded,
    /// This approver decided so already: nothing changed.
    Repeated(Vote),
    /// This approver decided otherwise already: a decision is not changed.
    Contradicts(Vote),
    /// The approval is decided, superseded or timed out: nothing changed.
    Closed(String),
}

/// A change to an approval that is not a vote, applied with a conditional write
/// ([`ApprovalRecord::apply_update`]): only while the approval is open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApprovalUpdate {
    /// End it without the votes: superseded, or timed out with its default action.
    Close(Closed),
    /// Hand it to other approvers for another period (once).
    Escalate { approvers: Vec<String>, expires_at: DateTime<Utc>, at: DateTime<Utc> },
    /// Note that the undecided approvers were reminded.
    Reminded { to: Vec<String>, at: DateTime<Utc>, detail: String },
}

impl ApprovalRecord {
    /// Apply `u` if the approval is open (and, for an escalation, not escalated yet). Returns
    /// whether it changed; the shared rule of every store.
    pub fn apply_update(&mut self, u: &ApprovalUpdate) -> bool {
        if self.why_closed().is_some() {
            return false;
        }
        match u {
            ApprovalUpdate::Close(c) => {
                let (what, at, detail) = match c {
                    Closed::Superseded { by_run, at } => ("superseded", *at, format!("by run {by_run}")),
                    Closed::TimedOut { action, at } => ("timed-out", *at, format!("default action: {action}")),
                };
                self.audit.push(AuditEntry { at, what: what.into(), who: None, detail: Some(detail) });
                self.closed = Some(c.clone());
            }
            ApprovalUpdate::Escalate { approvers, expires_at, at } => {
                if self.escalated {
                    return false;
                }
                self.audit.push(AuditEntry {
                    at: *at,
                    what: "escalated".into(),
                    who: None,
                    detail: Some(format!("to {} until {}", approvers.join(", "), expires_at.to_rfc3339())),
                });
                self.approvers = approvers.clone();
                self.expires_at = *expires_at;
                self.escalated = true;
            }
            ApprovalUpdate::Reminded { to, at, detail } => {
                self.audit.push(AuditEntry { at: *at, what: "reminded".into(), who: Some(to.join(", ")), detail: Some(detail.clone()) });
            }
        }
        true
    }

    /// The round of its timers: 0, or 1 after an escalation.
    pub fn round(&self) -> u32 {
        u32::from(self.escalated)
    }

    /// The outcome: a timeout's default action, else the votes' — any rejection rejects,
    /// `quorum` distinct approvals approve. A superseded approval has none.
    pub fn outcome(&self) -> Option<deploychain_events::Decision> {
        use deploychain_events::Decision;
        match &self.closed {
            Some(Closed::Superseded { .. }) => return None,
            Some(Closed::TimedOut { action, .. }) if action == "approve" => return Some(Decision::Approved),
            Some(Closed::TimedOut { .. }) => return Some(Decision::Rejected),
            None => {}
        }
        if self.votes.iter().any(|v| v.decision == Decision::Rejected) {
            return Some(Decision::Rejected);
        }
        let approvals = self.votes.iter().filter(|v| v.decision == Decision::Approved).count();
        (approvals >= self.quorum as usize).then_some(Decision::Approved)
    }

    /// Why nobody can decide any more, if so.
    pub fn why_closed(&self) -> Option<String> {
        match (&self.closed, self.outcome()) {
            (Some(Closed::Superseded { by_run, .. }), _) => Some(format!("superseded by run {by_run}: this approval decides nothing")),
            (Some(Closed::TimedOut { action, at }), _) => Some(format!("timed out at {} ({action})", at.to_rfc3339())),
            (None, Some(deploychain_events::Decision::Approved)) => Some("already approved".into()),
            (None, Some(deploychain_events::Decision::Rejected)) => Some("already rejected".into()),
            (None, None) => None,
        }
    }

    /// Record one approver's vote, if it may be: the one rule every store applies inside its
    /// conditional write.
    pub fn apply_vote(&mut self, vote: &Vote) -> VoteResult {
        if let Some(v) = self.votes.iter().find(|v| v.approver.eq_ignore_ascii_case(&vote.approver)) {
            return if v.decision == vote.decision { VoteResult::Repeated(v.clone()) } else { VoteResult::Contradicts(v.clone()) };
        }
        if let Some(why) = self.why_closed() {
            return VoteResult::Closed(why);
        }
        let word = if vote.decision == deploychain_events::Decision::Approved { "approved" } else { "rejected" };
        self.audit.push(AuditEntry { at: vote.at, what: word.into(), who: Some(vote.approver.clone()), detail: vote.comment.clone() });
        self.votes.push(vote.clone());
        VoteResult::Recorded
    }
}

#[async_trait]
pub trait Store: Send + Sync {
    /// Commit a step; `Ok(false)` when (run, key) was committed before (nothing changes).
    async fn commit_step(&self, c: &StepCommit) -> Result<bool>;
    async fn step(&self, run_id: &str, key: &str) -> Result<Option<StepRecord>>;
    async fn mark_published(&self, run_id: &str, key: &str) -> Result<()>;
    /// Record the span of the run's latest step (`traceparent`), which its next edge event
    /// (a CI build or an approval coming back) continues.
    async fn set_traceparent(&self, run_id: &str, traceparent: &str) -> Result<()>;
    async fn run(&self, id: &str) -> Result<Option<Run>>;
    /// Newest first.
    async fn runs(&self, q: &RunQuery) -> Result<Vec<Run>>;
    /// Create an approval; `Ok(false)` if it exists already.
    async fn put_approval(&self, a: &ApprovalRecord) -> Result<bool>;
    async fn approval(&self, id: &str) -> Result<Option<ApprovalRecord>>;
    /// Record one approver's vote with a conditional write ([`ApprovalRecord::apply_vote`]): the
    /// first vote of an approver stands, and a decided or closed approval takes none. Returns the
    /// record after it and what happened.
    async fn vote(&self, id: &str, vote: &Vote) -> Result<(ApprovalRecord, VoteResult)>;
    /// Apply `u` with a conditional write ([`ApprovalRecord::apply_update`]); returns the record
    /// after it and whether it changed.
    async fn update_approval(&self, id: &str, u: &ApprovalUpdate) -> Result<(ApprovalRecord, bool)>;
    /// The approvals of `app`'s `stage` that are still open (neither decided nor closed).
    async fn open_approvals(&self, app: &str, stage: &str) -> Result<Vec<ApprovalRecord>>;
    /// The stage's unrecovered failure, if its last deployment failed (committed with a step).
    async fn stage_failure(&self, app: &str, stage: &str) -> Result<Option<StageFailure>>;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildRequest {
    pub run_id: String,
    pub app: String,
    pub provider: BuildProvider,
    pub pipeline: Option<String>,
    pub repository: String,
    pub branch: String,
    pub commit: String,
    /// Whether deploychain starts the build (policy `trigger = "dispatch"`, the default) or the
    /// repository's own CI trigger does (`trigger = "push"`).
    pub dispatch: bool,
}

/// What starting a build gave: the provider's id and page of it, when it tells.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BuildStarted {
    pub build_id: Option<String>,
    pub url: Option<String>,
}

/// Starts CI builds. A redelivered push asks again; a build started twice reports twice, and the
/// second report is dropped by the broker (the same `build.completed` MessageId).
#[async_trait]
pub trait BuildSystem: Send + Sync {
    async fn request_build(&self, req: &BuildRequest) -> Result<BuildStarted>;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRequest {
    pub run_id: String,
    pub app: String,
    pub commit: String,
    pub build_id: String,
    /// `image-builder`, `ci` or `registry` (the policy's `image.source`).
    pub source: String,
    pub destination: String,
    /// The run's per-app sequence (names its gallery version).
    pub sequence: i64,
    /// `image-builder`: the app's base image template.
    pub template: Option<String>,
    /// What kind of artifact the app deploys.
    pub kind: deploychain_events::ImageKind,
}

/// What asking for an image gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BakeStarted {
    /// Something else reports it (a registry's webhook).
    Reported,
    /// It exists already (made by CI, or an earlier bake of this run).
    Ready(ImageRef),
    /// A bake runs: look at it again after `look_after` (`bake` names it).
    Baking { bake: String, look_after: std::time::Duration },
}

/// A running bake, looked at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BakeStatus {
    /// Still baking, at this sub-state (`Building`, `Customizing`, `Distributing`).
    Running(String),
    Ready(ImageRef),
    /// Ended without an image, with the baker's message.
    Failed(String),
}

/// Starts image bakes. Idempotent per `run_id`: asking again reuses what the first ask made.
#[async_trait]
pub trait ImageBaker: Send + Sync {
    async fn request_image(&self, req: &ImageRequest) -> Result<BakeStarted>;
    /// Look at a bake [`ImageBaker::request_image`] started.
    async fn check_image(&self, req: &ImageRequest, bake: &str) -> Result<BakeStatus> {
        let _ = req;
        Ok(BakeStatus::Failed(format!("this baker starts no bakes to look at (`{bake}`)")))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeployRequest {
    pub run_id: String,
    pub sequence: i64,
    pub app: String,
    pub stage: String,
    pub target: String,
    pub image: ImageRef,
    /// What the artifact replaces on the target: its OS image or a VM Application.
    pub mode: DeployMode,
    /// Instances upgraded and health-gated at a time (scale sets with a `Manual` upgrade policy); ≥ 1.
    pub batch_size: u32,
    /// The stage's acceptance checks, run after each batch passed its health gate.
    pub checks: Vec<Check>,
    /// An AKS target's Deployment.
    pub kubernetes: Option<crate::policy::KubeTarget>,
    /// Import the image into this registry (by digest) first; `source_registry` is where from.
    pub registry: Option<String>,
    pub source_registry: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeployOutcome {
    /// The target runs the image and passed its checks.
    Succeeded,
    /// The rollout failed and the target was returned to `restored`.
    RolledBack { reason: String, restored: Option<ImageRef> },
    /// The rollout failed and could not be rolled back.
    Failed { reason: String },
    /// The target already runs a newer run's image: refused, nothing changed.
    Stale { reason: String },
}

/// Where a rollout is after one short step of it (decision 0023).
#[derive(Debug, Clone, PartialEq)]
pub enum Progress {
    /// Not over: look again after `after`, from `cursor` (the adapter's own state, carried by the
    /// scheduled `deployment.due`); `status` says where it is, for people.
    Continue { cursor: serde_json::Value, after: std::time::Duration, status: String, milestones: Vec<String> },
    /// Over.
    Done { outcome: DeployOutcome, milestones: Vec<String> },
}

/// Rolls an image out to a target, one short step at a time: each [`Compute::advance`] makes a
/// few requests and never waits for the target; the step that called it schedules the next look.
/// Desired-state and fenced: deploying the image a target already runs is a success that changes
/// nothing; an older run never replaces a newer one. A step repeated from the same cursor (its
/// invocation died, or it was retried) reads the target again and decides again, so it repeats
/// no effect the target already shows.
#[async_trait]
pub trait Compute: Send + Sync {
    /// One step of the rollout of `req` from `cursor` (`null`: the start).
    async fn advance(&self, req: &DeployRequest, cursor: &serde_json::Value) -> Result<Progress>;
    /// The cursor that rolls back what the rollout at `cursor` changed, because of `reason`; `None`
    /// when it changed nothing yet, or is rolling back already.
    fn abort(&self, req: &DeployRequest, cursor: &serde_json::Value, reason: &str) -> Option<serde_json::Value>;
}

/// A whole rollout in one process, look after look, each wait slept (tests and tools; the chain
/// schedules a message per look instead): the outcome, and how many looks it took. A look's error
/// ends it, as it ends that step.
pub async fn drive<C: Compute + ?Sized>(compute: &C, req: &DeployRequest, max_looks: u32) -> Result<(DeployOutcome, u32)> {
    let mut cursor = serde_json::Value::Null;
    for look in 1..=max_looks {
        match compute.advance(req, &cursor).await? {
            Progress::Done { outcome, .. } => return Ok((outcome, look)),
            Progress::Continue { cursor: next, after, .. } => {
                cursor = next;
                tokio::time::sleep(after).await;
            }
        }
    }
    Err(crate::error::Error::Transient(format!("the rollout to {} did not end within {max_looks} looks", req.target)))
}

/// One phase of a rollout state machine: go on to the next phase in the same look, wait, or end.
#[derive(Debug)]
pub enum Turn<C> {
    Next(C),
    Wait { cursor: C, after: std::time::Duration, status: String },
    Done(DeployOutcome),
}

/// Most phases one look goes through (each a request or two) before it hands over to the next.
pub const MAX_TURNS: usize = 6;

/// The [`Progress`] of a look that went through phases and stopped at `turn`.
pub fn progress<C: Serialize>(turn: Turn<C>, milestones: Vec<String>) -> Result<Progress> {
    let value = |c: &C| serde_json::to_value(c).map_err(|e| crate::error::Error::Transient(format!("rollout cursor: {e}")));
    Ok(match turn {
        Turn::Next(c) => Progress::Continue { cursor: value(&c)?, after: std::time::Duration::ZERO, status: "going on".into(), milestones },
        Turn::Wait { cursor, after, status } => Progress::Continue { cursor: value(&cursor)?, after, status, milestones },
        Turn::Done(outcome) => Progress::Done { outcome, milestones },
    })
}

/// A cursor read back from `deployment.due` (`None` for `null`: the start).
pub fn cursor_of<C: serde::de::DeserializeOwned>(v: &serde_json::Value) -> Result<Option<C>> {
    if v.is_null() {
        return Ok(None);
    }
    serde_json::from_value(v.clone()).map(Some).map_err(|e| crate::error::Error::Malformed(format!("rollout cursor: {e}")))
}

/// An approval request with one signed link per approver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalNotice {
    pub approval_id: String,
    pub run_id: String,
    pub app: String,
    pub stage: String,
    pub commit: String,
    pub image: ImageRef,
    pub expires_at: DateTime<Utc>,
    /// (approver, link). The links are capabilities: never logged, never put on the bus.
    pub links: Vec<(String, String)>,
    pub kind: NoticeKind,
    /// Tells this notice from the approval's others (`request`, `reminder.<digest>`, `escalation`):
    /// with the approver, the receivers' de-duplication key.
    pub key: String,
    /// What the approvers decide on: the change and what the previous stage passed.
    pub evidence: Evidence,
    /// Who decided so far.
    pub votes: Vec<Vote>,
    pub quorum: u32,
    /// The release's trace (W3C `traceparent` of the step that sends the notice): sent as the
    /// request's `traceparent`, and its trace id shown, so a notice is found in the release's trace.
    pub traceparent: Option<String>,
}

impl ApprovalNotice {
    /// The release's trace id (its Application Insights operation id).
    pub fn trace_id(&self) -> Option<&str> {
        self.traceparent.as_deref().and_then(|tp| tp.split('-').nth(1))
    }
}

/// Why approvers are told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoticeKind {
    /// A new approval.
    Request,
    /// The approvers who have not decided yet, before the timeout.
    Reminder,
    /// The approval passed to them after a timeout.
    Escalation,
}

/// A run that has made no progress for too long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StuckNotice {
    pub run_id: String,
    pub app: String,
    /// What it waits for (`build of 3f2a9c1d0b7e in GitHub Actions`).
    pub waiting_for: String,
    /// The kind of step (`build`, `image`, `deployment`, `approval`).
    pub kind: String,
    /// Since when nothing happened.
    pub since: DateTime<Utc>,
    pub threshold: std::time::Duration,
}

/// Delivers approval links to people (Teams/Slack/e-mail), and the watchdog's warnings.
#[async_trait]
pub trait Notify: Send + Sync {
    async fn approval_requested(&self, n: &ApprovalNotice) -> Result<()>;
    async fn run_stuck(&self, n: &StuckNotice) -> Result<()>;
}

/// Builds and images that the source system starts by itself — a workflow `on: push`, a registry
/// publish — and reports through its webhook. Requesting one is recording that we wait for it.
pub struct WebhookReported;

#[async_trait]
impl BuildSystem for WebhookReported {
    async fn request_build(&self, req: &BuildRequest) -> Result<BuildStarted> {
        tracing::info!(run = req.run_id, app = req.app, "waiting for the CI build reported by webhook");
        Ok(BuildStarted::default())
    }
}

#[async_trait]
impl ImageBaker for WebhookReported {
    async fn request_image(&self, req: &ImageRequest) -> Result<BakeStarted> {
        tracing::info!(run = req.run_id, app = req.app, destination = req.destination, "waiting for the image reported by webhook");
        Ok(BakeStarted::Reported)
    }
}
