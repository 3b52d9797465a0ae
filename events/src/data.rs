//! The `data` of each event type. Field names are camelCase on the wire. Unknown fields are ignored
//! on read so that a v1 consumer accepts additive changes; anything that changes meaning gets a new
//! versioned type instead.

use serde::{Deserialize, Serialize};

/// Where a change came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Provider {
    Github,
    AzureDevops,
    /// Emitted by deploychain itself (simulators, operators).
    Deploychain,
}

/// The immutable artifact a run deploys. Approvals and deployments are bound to `id` (a gallery
/// image or application version resource id, or `registry/repository@sha256:…`), never to a
/// mutable tag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageRef {
    pub kind: ImageKind,
    /// Immutable identity: gallery image or application version id, or `repository@digest`.
    pub id: String,
    /// Human version (gallery version `1.2.3`, or a tag), informational only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Content digest where the source gives one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ImageKind {
    /// An Azure Compute Gallery image version (VM scale sets).
    GalleryImageVersion,
    /// An Azure Compute Gallery application version (VM Applications on scale sets).
    GalleryApplicationVersion,
    /// A container image in an OCI registry.
    Container,
}

/// A branch push that matched a pipeline: the start of a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Push {
    pub app: String,
    pub provider: Provider,
    /// `owner/repo` for GitHub, the remote URL for Azure Repos.
    pub repository: String,
    pub branch: String,
    pub commit: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pusher: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The webhook delivery that reported the push (GitHub `X-GitHub-Delivery`, Azure DevOps event id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<String>,
    /// The pusher's e-mail, when the provider tells it (separation of duties compares it).
    #[serde(default, rename = "pusherEmail", skip_serializing_if = "Option::is_none")]
    pub pusher_email: Option<String>,
    /// The commits the push brought (as the provider lists them, at most [`MAX_PUSH_COMMITS`]):
    /// what approvers see, and whose authors may not approve the release.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub commits: Vec<CommitInfo>,
}

/// The most commits a push event carries (GitHub's webhook lists at most 20).
pub const MAX_PUSH_COMMITS: usize = 50;

/// One commit of a push, and who wrote it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitInfo {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author: Option<String>,
    #[serde(default, rename = "authorEmail", skip_serializing_if = "Option::is_none")]
    pub author_email: Option<String>,
    /// The author's account (GitHub login), when known.
    #[serde(default, rename = "authorLogin", skip_serializing_if = "Option::is_none")]
    pub author_login: Option<String>,
    /// When the commit was authored: the earliest commit of a release starts its lead time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<chrono::DateTime<chrono::Utc>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BuildProvider {
    /// GitHub Actions: the workflow runs on push (or is dispatched) and reports `workflow_run`.
    GithubActions,
    /// Azure Pipelines: reports `build.complete` through a service hook.
    AzurePipelines,
    /// Jenkins: a parameterized job, reporting through the Notification plugin.
    Jenkins,
}

impl BuildProvider {
    /// The provider as people name it.
    pub fn display_name(self) -> &'static str {
        match self {
            BuildProvider::GithubActions => "GitHub Actions",
            BuildProvider::AzurePipelines => "Azure Pipelines",
            BuildProvider::Jenkins => "Jenkins",
        }
    }
}

/// deploychain asked for (or is waiting on) a CI build of the pushed commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildRequested {
    pub app: String,
    pub provider: BuildProvider,
    pub branch: String,
    pub commit: String,
    /// Workflow file (GitHub) or pipeline definition (Azure Pipelines) from the policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BuildOutcome {
    Succeeded,
    Failed,
    Canceled,
}

/// A CI build of a run's commit finished.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildCompleted {
    pub app: String,
    pub provider: BuildProvider,
    pub branch: String,
    pub commit: String,
    /// The provider's id of the build (workflow run id, Azure Pipelines build id).
    pub build_id: String,
    pub outcome: BuildOutcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The provider's own words for the result (`failure`, `partiallySucceeded`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// deploychain asked for an image of a built commit (or is waiting for one to be pushed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageRequested {
    pub app: String,
    pub commit: String,
    pub build_id: String,
    /// `image-builder`, `ci` or `registry`, from the policy.
    pub source: String,
    /// Gallery image definition or registry repository the image must land in.
    pub destination: String,
}

/// An image bake that runs for long (VM Image Builder) is due to be looked at: the scheduled
/// message its step sent, and the next one each look sends until the bake ends or times out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageDue {
    pub app: String,
    pub commit: String,
    /// What the baker knows the bake by (the image template's resource id).
    pub bake: String,
    /// 1 for the first look, then one more each time.
    pub attempt: u32,
    /// When the bake times out (RFC 3339).
    pub deadline: String,
}

/// A rollout to a stage is due to be looked at again: the scheduled message each step of a
/// rollout sends for the next one (a model update to follow, a batch to upgrade or gate, a
/// request to retry after throttling).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeploymentDue {
    pub app: String,
    pub stage: String,
    pub commit: String,
    /// The artifact being rolled out.
    pub image: ImageRef,
    /// The deploy target's resource id (scale set or AKS cluster).
    pub target: String,
    /// 1 for the first look, then one more each time.
    pub look: u32,
    /// When the rollout started (RFC 3339).
    pub started: String,
    /// Where the rollout is: the deploy target adapter's own state, opaque to everything else (a
    /// JSON object; null before the rollout's first effect).
    #[serde(default)]
    pub cursor: serde_json::Value,
    /// Transient failures in a row this look retries after (0 when none).
    #[serde(default)]
    pub retries: u32,
    /// Since when those failures last (RFC 3339), when `retries` > 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failing_since: Option<String>,
}

/// An immutable image of a run's commit exists and can be deployed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageReady {
    pub app: String,
    pub commit: String,
    pub image: ImageRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
}

/// Shared shape of the four deployment facts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Deployment {
    pub app: String,
    pub stage: String,
    /// The target resource (VM scale set resource id).
    pub target: String,
    pub image: ImageRef,
    pub commit: String,
    /// Why it failed or was rolled back; absent on started/succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// On a rollback: the image the target was returned to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored: Option<ImageRef>,
}

/// A stage waits for people to approve promoting one image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalRequested {
    pub app: String,
    pub stage: String,
    pub approval_id: String,
    pub image: ImageRef,
    pub commit: String,
    /// Who may decide (identities from the policy). The signed links themselves are never put on the bus.
    pub approvers: Vec<String>,
    /// How many distinct approvals are needed.
    pub quorum: u32,
    /// RFC 3339 expiry.
    pub expires_at: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Decision {
    Approved,
    Rejected,
}

/// A stage's approval was decided (by people, or by a policy that needs none).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalDecided {
    pub app: String,
    pub stage: String,
    pub approval_id: String,
    pub image: ImageRef,
    pub commit: String,
    pub decision: Decision,
    /// The identities whose decisions made this outcome; `policy` when no approval is required.
    pub decided_by: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
}

/// A timer of a pending approval came due: a Service Bus scheduled message the approval request
/// (or an escalation) set, for a reminder or for the timeout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum DueKind {
    Reminder,
    Timeout,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalDue {
    pub app: String,
    pub stage: String,
    pub approval_id: String,
    pub commit: String,
    pub due: DueKind,
    /// When it was due (RFC 3339).
    pub at: String,
    /// 0 for the approval's first period, 1 after an escalation: a timer of an earlier round does nothing.
    pub round: u32,
}

/// What happened to an approval other than a vote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ApprovalChange {
    /// An approver decided (`people`: who; `detail`: approved or rejected, and the comment). The
    /// votes that make the outcome are followed by `approval.decided`.
    Voted,
    /// The approvers who had not decided were reminded.
    Reminded,
    /// The timeout passed it to other approvers for another period.
    Escalated,
    /// The timeout ended it with its default action (`approval.decided` follows).
    Expired,
    /// A newer build reached the stage: it decides nothing now.
    Superseded,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalChanged {
    pub app: String,
    pub stage: String,
    pub approval_id: String,
    pub image: ImageRef,
    pub commit: String,
    pub change: ApprovalChange,
    /// Who was reminded or escalated to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub people: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunOutcome {
    Succeeded,
    Failed,
    Rejected,
    Superseded,
}

/// The end of a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunFinished {
    pub app: String,
    pub commit: String,
    pub outcome: RunOutcome,
    /// Why, in words an operator can act on.
    pub reason: String,
    /// The last stage the run reached, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
}

/// What an operator did with a dead-lettered or parked message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeadLetterAction {
    /// Sent again (with a new MessageId), then removed from where it was set aside.
    Replayed,
    /// Removed for good.
    Purged,
}

/// Audit of an operator's replay or purge of one message (who, what, when).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterHandled {
    /// The app of the message's run, or `ops` when the message names none.
    pub app: String,
    pub action: DeadLetterAction,
    /// Where it was: a subscription's dead-letter queue or the parking queue.
    pub entity: String,
    pub message_id: String,
    /// The MessageId it was sent again with (replays).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_message_id: Option<String>,
    /// The message's event type (its Label), when it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Who did it (the operator's identity, or `deploychain dlq` and the local user).
    pub by: String,
}
