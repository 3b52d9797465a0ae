//! One rollout of an artifact to a VM scale set through ARM, and its rollback, as a sequence of
//! short looks (decision 0023): each look makes a few requests and never waits; the [`Cursor`] it
//! returns rides the next scheduled `deployment.due`.
//!
//! 1. Start: read the scale set. Its tags say which run and artifact it runs (`deploychain.run`,
//!    `deploychain.sequence`, `deploychain.artifact`); the shared fencing rule
//!    ([`memory::fence`](crate::adapters::memory::fence)) refuses an older run (`Stale`, nothing
//!    written) and recognises a repeated start (no model write: the rollout goes on from what the
//!    tags recorded). Then PATCH the model with `If-Match`: the new artifact, and the tags (run,
//!    sequence, artifact, app, stage, and `deploychain.previous.*`). A 412 re-reads and decides
//!    again (bounded). The model update's long-running operation is followed, one look at a time.
//! 2. Upgrade: `Manual` policy — the instances not on the latest model, `batch_size` at a time
//!    (`manualUpgrade`, its operation followed), each batch gated: every instance on the latest
//!    model and `HealthState/healthy` within the health timeout, then the acceptance checks, one
//!    attempt per look. `Rolling` / `Automatic` — the rolling upgrade the PATCH started (or every
//!    instance on the model), then the same gate for every instance.
//! 3. A failed gate, upgrade or model operation rolls back: PATCH the previous model (fresh ETag,
//!    `If-Match`), tags back to the previous run plus `deploychain.rolledback` = this run, then the
//!    instances not on the model upgraded (or the rolling upgrade followed). A failing rollback is
//!    `Failed`, naming both.
//!
//! Transient trouble (ARM throttling or down after the client's short in-place retries) ends the
//! look with `Err(Transient | Throttled)`: the step schedules the same look again after ARM's
//! `Retry-After` or its own backoff. Every look reads before it writes, so a repeated look repeats
//! no model write the tags already show.

use super::client::{ArmError, Operation, OperationState, human};
use super::{
    ArmCompute, TAG_APP, TAG_ARTIFACT, TAG_PREVIOUS_ARTIFACT, TAG_PREVIOUS_RUN, TAG_PREVIOUS_SEQUENCE, TAG_ROLLEDBACK, TAG_RUN,
    TAG_SEQUENCE, TAG_STAGE,
};
use crate::adapters::memory::{TargetState, fence};
use crate::adapters::{DeployOutcome, DeployRequest, MAX_TURNS, Progress, Turn, cursor_of, progress};
use crate::error::{Error, Result};
use crate::policy::DeployMode;
use chrono::{DateTime, Utc};
use deploychain_events::{ImageKind, ImageRef};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum UpgradeMode {
    Manual,
    Rolling,
    Automatic,
}

/// What a rollout needs of a scale set.
#[derive(Debug, Clone)]
pub struct ScaleSet {
    pub etag: Option<String>,
    pub tags: Map<String, Value>,
    pub upgrade: UpgradeMode,
    pub image_reference: Value,
    pub applications: Value,
}

impl ScaleSet {
    pub fn from_body(body: &Value, etag: Option<String>) -> ScaleSet {
        let props = &body["properties"];
        let upgrade = match props["upgradePolicy"]["mode"].as_str().map(str::to_ascii_lowercase).as_deref() {
            Some("rolling") => UpgradeMode::Rolling,
            Some("automatic") => UpgradeMode::Automatic,
            // ARM's default upgrade policy is Manual.
            _ => UpgradeMode::Manual,
        };
        let profile = &props["virtualMachineProfile"];
        ScaleSet {
            etag,
            tags: body["tags"].as_object().cloned().unwrap_or_default(),
            upgrade,
            image_reference: profile["storageProfile"]["imageReference"].clone(),
            applications: profile["applicationProfile"]["galleryApplications"].clone(),
        }
    }

    pub fn tag(&self, name: &str) -> Option<&str> {
        self.tags.get(name).and_then(Value::as_str).filter(|v| !v.is_empty())
    }

    /// What the tags say the scale set runs (all three tags, or nothing).
    pub fn current(&self, kind: ImageKind) -> Option<TargetState> {
        let sequence = self.tag(TAG_SEQUENCE)?.parse().ok()?;
        Some(TargetState {
            image: ImageRef { kind, id: self.tag(TAG_ARTIFACT)?.to_string(), version: None, digest: None },
            run_id: self.tag(TAG_RUN)?.to_string(),
            sequence,
        })
    }

    /// The artifact the model runs now: the image reference's id, or this application's version.
    pub fn model_artifact(&self, req: &DeployRequest) -> Option<String> {
        match req.mode {
            DeployMode::Image => self.image_reference["id"].as_str().map(str::to_string),
            DeployMode::VmApplication => {
                let app = application_of(&req.image.id);
                self.applications
                    .as_array()?
                    .iter()
                    .filter_map(|a| a["packageReferenceId"].as_str())
                    .find(|id| application_of(id).eq_ignore_ascii_case(app))
                    .map(str::to_string)
            }
        }
    }
}

/// `…/applications/NAME` of `…/applications/NAME/versions/V`.
fn application_of(version_id: &str) -> &str {
    let lower = version_id.to_ascii_lowercase();
    match lower.rfind("/versions/") {
        Some(i) => &version_id[..i],
        None => version_id,
    }
}

/// What to return to when the rollout fails.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Previous {
    pub artifact: Option<String>,
    pub run: Option<String>,
    pub sequence: Option<String>,
    /// The model's piece as read before the rollout changed it (image reference object or
    /// gallery applications array); restored as it was. `None` when resuming from the tags.
    pub model: Option<Value>,
}

impl Previous {
    /// Before the change: the model's artifact, the run the tags name.
    pub fn before(ss: &ScaleSet, req: &DeployRequest) -> Previous {
        Previous {
            artifact: ss.model_artifact(req).or_else(|| ss.tag(TAG_ARTIFACT).map(str::to_string)),
            run: ss.tag(TAG_RUN).map(str::to_string),
            sequence: ss.tag(TAG_SEQUENCE).map(str::to_string),
            model: Some(match req.mode {
                DeployMode::Image => ss.image_reference.clone(),
                DeployMode::VmApplication => ss.applications.clone(),
            }),
        }
    }

    /// Resuming this run's rollout: what the earlier invocation recorded in the tags.
    pub fn recorded(ss: &ScaleSet) -> Previous {
        Previous {
            artifact: ss.tag(TAG_PREVIOUS_ARTIFACT).map(str::to_string),
            run: ss.tag(TAG_PREVIOUS_RUN).map(str::to_string),
            sequence: ss.tag(TAG_PREVIOUS_SEQUENCE).map(str::to_string),
            model: None,
        }
    }

    /// The previous artifact as an event's `restored` image, when it is a gallery version id.
    pub fn restored(&self, mode: DeployMode) -> Option<ImageRef> {
        let id = self.artifact.as_deref()?;
        let kind = mode.artifact_kind();
        gallery_version(id, kind).then(|| ImageRef {
            kind,
            id: id.to_string(),
            version: id.rsplit('/').next().map(str::to_string),
            digest: None,
        })
    }
}

/// Whether `id` is a gallery image (or application) version resource id.
fn gallery_version(id: &str, kind: ImageKind) -> bool {
    let collection = match kind {
        ImageKind::GalleryImageVersion => "images",
        ImageKind::GalleryApplicationVersion => "applications",
        ImageKind::Container => return false,
    };
    let parts: Vec<String> = id.split('/').map(str::to_ascii_lowercase).collect();
    parts.len() == 13
        && parts[0].is_empty()
        && parts[1] == "subscriptions"
        && parts[3] == "resourcegroups"
        && parts[5] == "providers"
        && parts[6] == "microsoft.compute"
        && parts[7] == "galleries"
        && parts[9] == collection
        && parts[11] == "versions"
        && parts.iter().skip(1).all(|p| !p.is_empty())
}

/// Why this artifact cannot go to this stage (nothing is sent to ARM then).
pub fn unsuitable(req: &DeployRequest) -> Option<String> {
    let want = req.mode.artifact_kind();
    if req.image.kind != want {
        return Some(format!(
            "stage {} deploys `{}`, which takes a {} artifact, but {} is a {}",
            req.stage,
            req.mode.as_str(),
            kind_name(want),
            req.image.id,
            kind_name(req.image.kind)
        ));
    }
    (!gallery_version(&req.image.id, want)).then(|| format!("`{}` is not a {} resource id", req.image.id, kind_name(want)))
}

fn kind_name(k: ImageKind) -> &'static str {
    match k {
        ImageKind::GalleryImageVersion => "gallery image version",
        ImageKind::GalleryApplicationVersion => "gallery application version",
        ImageKind::Container => "container image",
    }
}

/// The PATCH that deploys `req`: only the tags and the model piece this mode changes.
pub fn deploy_patch(ss: &ScaleSet, req: &DeployRequest, prev: &Previous) -> Value {
    let mut tags = ss.tags.clone();
    tags.insert(TAG_RUN.into(), req.run_id.clone().into());
    tags.insert(TAG_SEQUENCE.into(), req.sequence.to_string().into());
    tags.insert(TAG_ARTIFACT.into(), req.image.id.clone().into());
    tags.insert(TAG_APP.into(), req.app.clone().into());
    tags.insert(TAG_STAGE.into(), req.stage.clone().into());
    tags.remove(TAG_ROLLEDBACK);
    for (name, value) in [(TAG_PREVIOUS_RUN, &prev.run), (TAG_PREVIOUS_SEQUENCE, &prev.sequence), (TAG_PREVIOUS_ARTIFACT, &prev.artifact)] {
        match value {
            Some(v) => tags.insert(name.into(), v.clone().into()),
            None => tags.remove(name),
        };
    }
    let profile = match req.mode {
        DeployMode::Image => json!({ "storageProfile": { "imageReference": { "id": req.image.id } } }),
        DeployMode::VmApplication => {
            json!({ "applicationProfile": { "galleryApplications": with_application(&ss.applications, &req.image.id, Some(&req.image.id)) } })
        }
    };
    json!({ "tags": tags, "properties": { "virtualMachineProfile": profile } })
}

/// The gallery applications list with `app_version`'s application set to `new` (or removed when
/// `None`); the other applications stay as they are.
fn with_application(current: &Value, app_version: &str, new: Option<&str>) -> Value {
    let app = application_of(app_version);
    let mut list: Vec<Value> = current.as_array().cloned().unwrap_or_default();
    let pos = list.iter().position(|a| a["packageReferenceId"].as_str().is_some_and(|id| application_of(id).eq_ignore_ascii_case(app)));
    match (pos, new) {
        (Some(i), Some(id)) => {
            if let Some(entry) = list[i].as_object_mut() {
                entry.insert("packageReferenceId".into(), id.into());
                entry.insert("treatFailureAsDeploymentFailure".into(), true.into());
            }
        }
        (Some(i), None) => {
            list.remove(i);
        }
        (None, Some(id)) => {
            let order = list.iter().filter_map(|a| a["order"].as_i64()).max().unwrap_or(0) + 1;
            list.push(json!({ "packageReferenceId": id, "order": order, "treatFailureAsDeploymentFailure": true }));
        }
        (None, None) => {}
    }
    Value::Array(list)
}

/// The PATCH that returns `ss` to `prev` and marks this run as rolled back.
pub fn rollback_patch(ss: &ScaleSet, req: &DeployRequest, prev: &Previous) -> std::result::Result<Value, String> {
    let mut tags = ss.tags.clone();
    for (name, value) in [(TAG_RUN, &prev.run), (TAG_SEQUENCE, &prev.sequence), (TAG_ARTIFACT, &prev.artifact)] {
        match value {
            Some(v) => tags.insert(name.into(), v.clone().into()),
            None => tags.remove(name),
        };
    }
    for name in [TAG_PREVIOUS_RUN, TAG_PREVIOUS_SEQUENCE, TAG_PREVIOUS_ARTIFACT] {
        tags.remove(name);
    }
    tags.insert(TAG_ROLLEDBACK.into(), req.run_id.clone().into());
    let profile = match req.mode {
        DeployMode::Image => {
            let reference = match (&prev.artifact, &prev.model) {
                (Some(id), _) => json!({ "id": id }),
                (None, Some(Value::Object(m))) if !m.is_empty() => {
                    // A marketplace or other image without an id: put it back as it was read
                    // (without the read-only resolved version).
                    let mut m = m.clone();
                    m.remove("exactVersion");
                    Value::Object(m)
                }
                _ => return Err("the previous image is not known".into()),
            };
            json!({ "storageProfile": { "imageReference": reference } })
        }
        DeployMode::VmApplication => {
            let list = match &prev.model {
                Some(m) if m.is_array() => m.clone(),
                Some(_) => json!([]),
                None => with_application(&ss.applications, &req.image.id, prev.artifact.as_deref()),
            };
            json!({ "applicationProfile": { "galleryApplications": list } })
        }
    };
    Ok(json!({ "tags": tags, "properties": { "virtualMachineProfile": profile } }))
}

/// Where a scale-set rollout is between looks: the cursor `deployment.due` carries (decision 0023).
/// Every phase keeps `prev`, what a rollback restores, as read before the model was changed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "camelCase")]
pub enum Cursor {
    /// The model update was accepted: follow its operation.
    Updating { prev: Previous, upgrade: UpgradeMode, rolling_before: Option<Option<String>>, op: Operation, since: DateTime<Utc> },
    /// `Manual` policy: `done` batches upgraded and gated; upgrade the next of the instances
    /// not on the model (`batches`: the count as last seen, 0 before the first).
    NextBatch { prev: Previous, done: u32, batches: u32 },
    /// A batch's `manualUpgrade` was accepted: follow its operation.
    Upgrading { prev: Previous, batch: Vec<String>, n: u32, batches: u32, op: Operation, since: DateTime<Utc> },
    /// The health gate of a batch (every instance when `batch` is empty): on the latest model and
    /// healthy within the health timeout counted from `since`.
    Gating { prev: Previous, batch: Vec<String>, n: u32, batches: u32, since: DateTime<Utc> },
    /// The stage's acceptance checks after a batch's gate: check `check`, attempt `attempt`.
    Checking { prev: Previous, batch: Vec<String>, n: u32, batches: u32, check: usize, attempt: u32 },
    /// `Rolling` / `Automatic` policy: the upgrade the PATCH started (`before`: the latest
    /// rolling upgrade before it; `None` when resuming).
    Rolling { prev: Previous, before: Option<Option<String>>, since: DateTime<Utc> },
    /// Roll back after `failure`: put the previous model back.
    RollBack { prev: Previous, failure: String },
    /// The rollback's model update was accepted: follow it.
    RollbackUpdating { prev: Previous, failure: String, upgrade: UpgradeMode, before: Option<Option<String>>, op: Operation },
    /// Bring the instances to the restored model (`op`: the `manualUpgrade` under way).
    RollbackUpgrading {
        prev: Previous,
        failure: String,
        upgrade: UpgradeMode,
        before: Option<Option<String>>,
        op: Option<Operation>,
        since: DateTime<Utc>,
    },
}

impl Cursor {
    fn rolling_back(&self) -> bool {
        matches!(self, Cursor::RollBack { .. } | Cursor::RollbackUpdating { .. } | Cursor::RollbackUpgrading { .. })
    }

    fn prev(&self) -> &Previous {
        match self {
            Cursor::Updating { prev, .. }
            | Cursor::NextBatch { prev, .. }
            | Cursor::Upgrading { prev, .. }
            | Cursor::Gating { prev, .. }
            | Cursor::Checking { prev, .. }
            | Cursor::Rolling { prev, .. }
            | Cursor::RollBack { prev, .. }
            | Cursor::RollbackUpdating { prev, .. }
            | Cursor::RollbackUpgrading { prev, .. } => prev,
        }
    }
}

type Step = Turn<Cursor>;

/// A batch as people read it: `batch 2 of 5 (instances 3, 4)`; every instance when `batch` is empty.
fn batch_label(batch: &[String], n: u32, batches: u32) -> String {
    if batch.is_empty() {
        return "every instance".into();
    }
    format!("batch {n} of {batches} (instance{} {})", if batch.len() == 1 { "" } else { "s" }, batch.join(", "))
}

/// What an ARM error does to a rollout phase: transient ones end the look (the step retries it),
/// the rest fail the rollout with `what` happened.
fn or_roll_back(prev: &Previous, what: &str, e: ArmError) -> Result<Step> {
    match e {
        ArmError::Transient(m) => Err(Error::Transient(m)),
        ArmError::Throttled(m, after) => Err(Error::Throttled(m, after)),
        ArmError::PreconditionFailed(m) | ArmError::NotFound(m) | ArmError::Failed(m) => {
            Ok(Turn::Next(Cursor::RollBack { prev: prev.clone(), failure: format!("{what}: {m}") }))
        }
    }
}

/// Transient ARM errors end the look; the rest are `Err(message)` for the caller to decide.
fn transient_or(e: ArmError) -> Result<String> {
    match e {
        ArmError::Transient(m) => Err(Error::Transient(m)),
        ArmError::Throttled(m, after) => Err(Error::Throttled(m, after)),
        ArmError::PreconditionFailed(m) | ArmError::NotFound(m) | ArmError::Failed(m) => Ok(m),
    }
}

impl ArmCompute {
    async fn read(&self, target: &str) -> std::result::Result<ScaleSet, ArmError> {
        let (body, etag) = self.arm.get(target).await?;
        Ok(ScaleSet::from_body(&body, etag))
    }

    /// One look at the rollout of `req` from `cursor`: phases until one waits or the rollout ends
    /// ([`MAX_TURNS`] at most).
    pub(super) async fn advance_rollout(&self, req: &DeployRequest, cursor: &Value) -> Result<Progress> {
        let mut milestones = Vec::new();
        let mut turn = match cursor_of::<Cursor>(cursor)? {
            None => self.start(req, &mut milestones).await?,
            Some(c) if c.rolling_back() => Turn::Next(c),
            // Between looks another run may have deployed to the stage (its deploys share the
            // stage's session, but not the whole rollout): then this one is over.
            Some(c) => match self.taken_over(req).await? {
                Some(stale) => Turn::Done(stale),
                None => Turn::Next(c),
            },
        };
        for _ in 0..MAX_TURNS {
            let Turn::Next(c) = turn else { break };
            turn = self.phase(req, c, &mut milestones).await?;
        }
        if let Turn::Done(o) = &turn {
            let name = short(&req.target);
            match o {
                DeployOutcome::Succeeded => tracing::info!(scale_set = name, run = req.run_id, "rollout succeeded"),
                DeployOutcome::RolledBack { reason, .. } => tracing::info!(scale_set = name, run = req.run_id, reason, "rolled back"),
                DeployOutcome::Failed { reason } => tracing::error!(scale_set = name, run = req.run_id, reason, "rollout failed"),
                DeployOutcome::Stale { .. } => {}
            }
        }
        progress(turn, milestones)
    }

    /// `Stale` when the scale set's tags name another run than this rollout's: a newer run took
    /// the stage over between looks.
    async fn taken_over(&self, req: &DeployRequest) -> Result<Option<DeployOutcome>> {
        let ss = match self.read(&req.target).await {
            Ok(ss) => ss,
            Err(e) => {
                transient_or(e)?;
                return Ok(None); // the phase's own reads will say what is wrong
            }
        };
        Ok(match ss.tag(TAG_RUN) {
            Some(run) if run != req.run_id => Some(DeployOutcome::Stale {
                reason: format!(
                    "{} was taken over by run {run} ({}) while this rollout ran",
                    short(&req.target),
                    ss.tag(TAG_ARTIFACT).map(short).unwrap_or("?")
                ),
            }),
            _ => None,
        })
    }

    /// A rollout that must stop for `reason`: roll back from where `cursor` is.
    pub(super) fn abort_rollout(&self, cursor: &Value, reason: &str) -> Option<Value> {
        let c: Cursor = cursor_of(cursor).ok()??;
        if c.rolling_back() {
            return None;
        }
        serde_json::to_value(Cursor::RollBack { prev: c.prev().clone(), failure: reason.to_string() }).ok()
    }

    /// The first look: read, fence, write the model.
    async fn start(&self, req: &DeployRequest, milestones: &mut Vec<String>) -> Result<Step> {
        if let Some(reason) = unsuitable(req) {
            return Ok(Turn::Done(DeployOutcome::Failed { reason: format!("{reason}; nothing changed") }));
        }
        let name = short(&req.target);
        let mut conflicts = 0;
        loop {
            let ss = match self.read(&req.target).await {
                Ok(ss) => ss,
                Err(e) => {
                    let m = transient_or(e)?;
                    return Ok(Turn::Done(DeployOutcome::Failed { reason: format!("cannot read scale set {name}: {m}") }));
                }
            };
            if ss.tag(TAG_ROLLEDBACK) == Some(req.run_id.as_str()) && ss.tag(TAG_RUN) != Some(req.run_id.as_str()) {
                // This run's rollout failed and was rolled back before (a replay): same answer, nothing new.
                let restored = Previous { artifact: ss.tag(TAG_ARTIFACT).map(str::to_string), ..Default::default() }.restored(req.mode);
                return Ok(Turn::Done(DeployOutcome::RolledBack {
                    reason: format!("this run's rollout to {name} failed and was rolled back earlier"),
                    restored,
                }));
            }
            match fence(ss.current(req.mode.artifact_kind()).as_ref(), req) {
                Some(DeployOutcome::Succeeded) => {
                    // The start was repeated after its model write (its invocation died before
                    // the step committed): go on from what the tags recorded.
                    tracing::info!(
                        scale_set = name,
                        run = req.run_id,
                        "the model already has this run's artifact: resuming, no model write"
                    );
                    return Ok(Turn::Next(self.after_update(Previous::recorded(&ss), ss.upgrade, None)));
                }
                Some(stale) => return Ok(Turn::Done(stale)),
                None => {}
            }
            let prev = Previous::before(&ss, req);
            let rolling_before = match ss.upgrade {
                UpgradeMode::Manual => None,
                _ => match self.arm.latest_rolling_upgrade(&req.target).await {
                    Ok(latest) => Some(latest.as_ref().map(upgrade_key)),
                    Err(e) => {
                        let m = transient_or(e)?;
                        return Ok(Turn::Done(DeployOutcome::Failed {
                            reason: format!("cannot read the rolling upgrade of {name}: {m}; nothing changed"),
                        }));
                    }
                },
            };
            if ss.etag.is_none() {
                tracing::warn!(scale_set = name, "the scale set has no ETag: updating it unconditionally");
            }
            let answer = match self.arm.patch(&req.target, ss.etag.as_deref(), &deploy_patch(&ss, req, &prev)).await {
                Ok(a) => a,
                Err(ArmError::PreconditionFailed(_)) if conflicts < self.max_conflicts => {
                    conflicts += 1;
                    tracing::info!(scale_set = name, conflicts, "the scale set changed since it was read (412): reading it again");
                    continue;
                }
                Err(ArmError::PreconditionFailed(m)) => {
                    return Err(Error::Transient(format!(
                        "scale set {name} kept changing while it was updated ({conflicts} re-reads): {m}"
                    )));
                }
                Err(e) => {
                    let m = transient_or(e)?;
                    return Ok(Turn::Done(DeployOutcome::Failed {
                        reason: format!("model update of {name} refused: {m}; nothing changed"),
                    }));
                }
            };
            tracing::info!(scale_set = name, run = req.run_id, artifact = req.image.id, "model update accepted");
            milestones.push(format!("model of {name} updated to {}", short(&req.image.id)));
            return Ok(match self.arm.operation("model update", &answer, Some(&req.target)) {
                Ok(Some((op, after))) => Turn::Wait {
                    cursor: Cursor::Updating { prev, upgrade: ss.upgrade, rolling_before, op, since: Utc::now() },
                    after,
                    status: format!("updating the model of {name}"),
                },
                Ok(None) => Turn::Next(self.after_update(prev, ss.upgrade, rolling_before)),
                Err(e) => Turn::Next(Cursor::RollBack { prev, failure: format!("model update of {name} failed: {e}") }),
            });
        }
    }

    /// The phase after the model update: batches (`Manual`) or the upgrade ARM runs.
    fn after_update(&self, prev: Previous, upgrade: UpgradeMode, rolling_before: Option<Option<String>>) -> Cursor {
        match upgrade {
            UpgradeMode::Manual => Cursor::NextBatch { prev, done: 0, batches: 0 },
            UpgradeMode::Rolling | UpgradeMode::Automatic => Cursor::Rolling { prev, before: rolling_before, since: Utc::now() },
        }
    }

    fn poll(&self, asked: Option<Duration>) -> Duration {
        asked.unwrap_or_else(|| self.arm.poll_interval())
    }

    /// One phase from `cursor`.
    async fn phase(&self, req: &DeployRequest, cursor: Cursor, milestones: &mut Vec<String>) -> Result<Step> {
        let name = short(&req.target);
        let now = Utc::now();
        let past = |since: &DateTime<Utc>, limit: Duration| (now - *since).to_std().unwrap_or_default() >= limit;
        match cursor {
            Cursor::Updating { prev, upgrade, rolling_before, op, since } => match self.arm.look("model update", &op).await {
                Ok(OperationState::Succeeded) => Ok(Turn::Next(self.after_update(prev, upgrade, rolling_before))),
                Ok(OperationState::Failed(m)) => Ok(Turn::Next(Cursor::RollBack { prev, failure: format!("model update of {name}: {m}") })),
                Ok(OperationState::Running(_)) if past(&since, self.operation_timeout) => Ok(Turn::Next(Cursor::RollBack {
                    prev,
                    failure: format!("model update of {name} did not finish within {}", human(self.operation_timeout)),
                })),
                Ok(OperationState::Running(asked)) => Ok(Turn::Wait {
                    after: self.poll(asked),
                    status: format!("updating the model of {name} ({} so far)", human_since(since)),
                    cursor: Cursor::Updating { prev, upgrade, rolling_before, op, since },
                }),
                Err(e) => or_roll_back(&prev, &format!("model update of {name}"), e),
            },
            Cursor::NextBatch { prev, done, batches } => {
                let pending: Vec<String> = match self.arm.instances(&req.target).await {
                    Ok(list) => list.into_iter().filter(|i| !i.latest_model_applied).map(|i| i.instance_id).collect(),
                    Err(e) => return or_roll_back(&prev, &format!("listing the instances of {name}"), e),
                };
                if pending.is_empty() {
                    return Ok(if done == 0 {
                        // Nothing to upgrade (a resumed or repeated rollout): gate every instance.
                        Turn::Next(Cursor::Gating { prev, batch: Vec::new(), n: 0, batches: 0, since: now })
                    } else {
                        Turn::Done(DeployOutcome::Succeeded)
                    });
                }
                let size = req.batch_size.max(1) as usize;
                let batches = batches.max(done + pending.len().div_ceil(size) as u32);
                let batch: Vec<String> = pending.into_iter().take(size).collect();
                let n = done + 1;
                let label = batch_label(&batch, n, batches);
                tracing::info!(scale_set = name, run = req.run_id, batch = label, "upgrading");
                match self.arm.start_manual_upgrade(&req.target, &batch).await {
                    Ok(answer) => match self.arm.operation("manual upgrade", &answer, None) {
                        Ok(Some((op, after))) => Ok(Turn::Wait {
                            status: format!("upgrading {label} of {name}"),
                            cursor: Cursor::Upgrading { prev, batch, n, batches, op, since: now },
                            after,
                        }),
                        Ok(None) => Ok(Turn::Next(Cursor::Gating { prev, batch, n, batches, since: now })),
                        Err(e) => Ok(Turn::Next(Cursor::RollBack { prev, failure: format!("upgrade of {label} failed: {e}") })),
                    },
                    Err(e) => or_roll_back(&prev, &format!("upgrade of {label}"), e),
                }
            }
            Cursor::Upgrading { prev, batch, n, batches, op, since } => {
                let label = batch_label(&batch, n, batches);
                match self.arm.look("manual upgrade", &op).await {
                    Ok(OperationState::Succeeded) => Ok(Turn::Next(Cursor::Gating { prev, batch, n, batches, since: now })),
                    Ok(OperationState::Failed(m)) => Ok(Turn::Next(Cursor::RollBack { prev, failure: format!("upgrade of {label}: {m}") })),
                    Ok(OperationState::Running(_)) if past(&since, self.operation_timeout) => Ok(Turn::Next(Cursor::RollBack {
                        prev,
                        failure: format!("upgrade of {label} did not finish within {}", human(self.operation_timeout)),
                    })),
                    Ok(OperationState::Running(asked)) => Ok(Turn::Wait {
                        after: self.poll(asked),
                        status: format!("upgrading {label} of {name} ({} so far)", human_since(since)),
                        cursor: Cursor::Upgrading { prev, batch, n, batches, op, since },
                    }),
                    Err(e) => or_roll_back(&prev, &format!("upgrade of {label}"), e),
                }
            }
            Cursor::Gating { prev, batch, n, batches, since } => {
                let label = batch_label(&batch, n, batches);
                let instances = match self.arm.instances(&req.target).await {
                    Ok(l) => l,
                    Err(e) => return or_roll_back(&prev, &format!("{label}: listing the instances"), e),
                };
                let (mut healthy, mut bad) = (0, Vec::new());
                for i in instances.iter().filter(|i| batch.is_empty() || batch.contains(&i.instance_id)) {
                    if !i.latest_model_applied {
                        bad.push(format!("{} is not on the latest model", i.name));
                        continue;
                    }
                    match self.arm.health(&req.target, &i.instance_id).await {
                        Ok(Some(h)) if h.eq_ignore_ascii_case("HealthState/healthy") => healthy += 1,
                        Ok(Some(h)) => bad.push(format!("{} is {h}", i.name)),
                        Ok(None) => {
                            bad.push(format!("{} reports no health state (is the Application Health extension installed?)", i.name))
                        }
                        // Scaled in between the list and the instance view: nothing left to gate.
                        Err(ArmError::NotFound(_)) => {}
                        Err(e) => return or_roll_back(&prev, &format!("{label}: reading instance health"), e),
                    }
                }
                if bad.is_empty() {
                    return Ok(Turn::Next(Cursor::Checking { prev, batch, n, batches, check: 0, attempt: 1 }));
                }
                if past(&since, self.health_timeout) {
                    return Ok(Turn::Next(Cursor::RollBack {
                        prev,
                        failure: format!("{label}: health gate not passed within {}: {}", human(self.health_timeout), bad.join("; ")),
                    }));
                }
                Ok(Turn::Wait {
                    after: self.arm.poll_interval(),
                    status: format!(
                        "waiting for {label} of {name} to be healthy: {healthy} healthy, {} ({} so far)",
                        bad.join("; "),
                        human_since(since)
                    ),
                    cursor: Cursor::Gating { prev, batch, n, batches, since },
                })
            }
            Cursor::Checking { prev, batch, n, batches, check, attempt } => {
                let label = batch_label(&batch, n, batches);
                let Some(c) = req.checks.get(check) else {
                    milestones.push(format!("{label} of {name} healthy{}", if req.checks.is_empty() { "" } else { " and checked" }));
                    return Ok(if batch.is_empty() {
                        Turn::Done(DeployOutcome::Succeeded)
                    } else {
                        Turn::Next(Cursor::NextBatch { prev, done: n, batches })
                    });
                };
                match super::checks::attempt(&self.checks_http, c, attempt).await {
                    Ok(()) => Ok(Turn::Next(Cursor::Checking { prev, batch, n, batches, check: check + 1, attempt: 1 })),
                    Err(why) if attempt > c.retries => Ok(Turn::Next(Cursor::RollBack { prev, failure: format!("{label}: {why}") })),
                    Err(why) => Ok(Turn::Wait {
                        after: c.interval(),
                        status: format!("{label} of {name}: acceptance check {} of {} failing ({why})", check + 1, req.checks.len()),
                        cursor: Cursor::Checking { prev, batch, n, batches, check, attempt: attempt + 1 },
                    }),
                }
            }
            Cursor::Rolling { prev, before, since } => match self.upgrade_state(req, &before, "rolling upgrade").await {
                Ok(Upgrade::Completed) => {
                    milestones.push(format!("rolling upgrade of {name} completed"));
                    Ok(Turn::Next(Cursor::Gating { prev, batch: Vec::new(), n: 0, batches: 0, since: now }))
                }
                Ok(Upgrade::Ended(why)) => Ok(Turn::Next(Cursor::RollBack { prev, failure: why })),
                Ok(Upgrade::Running(_)) if past(&since, self.operation_timeout) => Ok(Turn::Next(Cursor::RollBack {
                    prev,
                    failure: format!("rolling upgrade of {name} did not finish within {}", human(self.operation_timeout)),
                })),
                Ok(Upgrade::Running(progress)) => Ok(Turn::Wait {
                    after: self.arm.poll_interval(),
                    status: format!("rolling upgrade of {name}: {progress} ({} so far)", human_since(since)),
                    cursor: Cursor::Rolling { prev, before, since },
                }),
                Err(e) => or_roll_back(&prev, &format!("rolling upgrade of {name}"), e),
            },
            Cursor::RollBack { prev, failure } => self.roll_back(req, prev, failure, milestones).await,
            Cursor::RollbackUpdating { prev, failure, upgrade, before, op } => {
                match self.arm.look("the rollback's model update", &op).await {
                    Ok(OperationState::Succeeded) => {
                        Ok(Turn::Next(Cursor::RollbackUpgrading { prev, failure, upgrade, before, op: None, since: now }))
                    }
                    Ok(OperationState::Failed(m)) => {
                        Ok(Turn::Done(DeployOutcome::Failed { reason: format!("{failure}; rollback failed: model update: {m}") }))
                    }
                    Ok(OperationState::Running(asked)) => Ok(Turn::Wait {
                        after: self.poll(asked),
                        status: format!("rolling {name} back: updating the model ({failure})"),
                        cursor: Cursor::RollbackUpdating { prev, failure, upgrade, before, op },
                    }),
                    Err(e) => {
                        let m = transient_or(e)?;
                        Ok(Turn::Done(DeployOutcome::Failed { reason: format!("{failure}; rollback failed: {m}") }))
                    }
                }
            }
            Cursor::RollbackUpgrading { prev, failure, upgrade, before, op, since } => {
                self.roll_back_instances(req, prev, failure, upgrade, before, op, since).await
            }
        }
    }

    /// Put the previous model back (once: a repeated look finds it done in the tags).
    async fn roll_back(&self, req: &DeployRequest, prev: Previous, failure: String, milestones: &mut Vec<String>) -> Result<Step> {
        let name = short(&req.target);
        let failed = |why: String| Ok(Turn::Done(DeployOutcome::Failed { reason: format!("{failure}; rollback failed: {why}") }));
        let mut conflicts = 0;
        loop {
            let ss = match self.read(&req.target).await {
                Ok(ss) => ss,
                Err(e) => return failed(transient_or(e)?),
            };
            if let Some(cur) = ss.current(req.mode.artifact_kind()).filter(|c| c.run_id != req.run_id && c.sequence > req.sequence) {
                return failed(format!("{name} now runs {} from newer run {}: not touching it", cur.image.id, cur.run_id));
            }
            let before = match ss.upgrade {
                UpgradeMode::Manual => None,
                _ => match self.arm.latest_rolling_upgrade(&req.target).await {
                    Ok(l) => Some(l.as_ref().map(upgrade_key)),
                    Err(e) => return failed(transient_or(e)?),
                },
            };
            if ss.tag(TAG_ROLLEDBACK) == Some(req.run_id.as_str()) && ss.tag(TAG_RUN) != Some(req.run_id.as_str()) {
                // A repeated look: the model is back already; bring the instances to it.
                return Ok(Turn::Next(Cursor::RollbackUpgrading {
                    prev,
                    failure,
                    upgrade: ss.upgrade,
                    before: None,
                    op: None,
                    since: Utc::now(),
                }));
            }
            tracing::warn!(scale_set = name, run = req.run_id, failure, "rollout failed: rolling back");
            let patch = match rollback_patch(&ss, req, &prev) {
                Ok(p) => p,
                Err(why) => return failed(why),
            };
            match self.arm.patch(&req.target, ss.etag.as_deref(), &patch).await {
                Ok(answer) => {
                    milestones.push(format!("rolling {name} back: {failure}"));
                    return Ok(match self.arm.operation("the rollback's model update", &answer, Some(&req.target)) {
                        Ok(Some((op, after))) => Turn::Wait {
                            status: format!("rolling {name} back: updating the model ({failure})"),
                            cursor: Cursor::RollbackUpdating { prev, failure, upgrade: ss.upgrade, before, op },
                            after,
                        },
                        Ok(None) => Turn::Next(Cursor::RollbackUpgrading {
                            prev,
                            failure,
                            upgrade: ss.upgrade,
                            before,
                            op: None,
                            since: Utc::now(),
                        }),
                        Err(e) => Turn::Done(DeployOutcome::Failed { reason: format!("{failure}; rollback failed: model update: {e}") }),
                    });
                }
                Err(ArmError::PreconditionFailed(_)) if conflicts < self.max_conflicts => conflicts += 1,
                Err(e) => return failed(format!("model update refused: {}", transient_or(e)?)),
            }
        }
    }

    /// The instances back on the restored model: `manualUpgrade` of those not on it (`Manual`), or
    /// the rolling upgrade ARM runs.
    #[allow(clippy::too_many_arguments)]
    async fn roll_back_instances(
        &self,
        req: &DeployRequest,
        prev: Previous,
        failure: String,
        upgrade: UpgradeMode,
        before: Option<Option<String>>,
        op: Option<Operation>,
        since: DateTime<Utc>,
    ) -> Result<Step> {
        let name = short(&req.target);
        let rolled_back =
            |prev: &Previous, failure: String| Turn::Done(DeployOutcome::RolledBack { reason: failure, restored: prev.restored(req.mode) });
        let failed =
            |failure: &str, why: String| Ok(Turn::Done(DeployOutcome::Failed { reason: format!("{failure}; rollback failed: {why}") }));
        let timed_out = (Utc::now() - since).to_std().unwrap_or_default() >= self.operation_timeout;
        let status = format!("rolling {name} back: upgrading the instances ({failure})");
        if upgrade != UpgradeMode::Manual {
            return match self.upgrade_state(req, &before, "the rollback's rolling upgrade").await {
                Ok(Upgrade::Completed) => Ok(rolled_back(&prev, failure)),
                Ok(Upgrade::Ended(why)) => failed(&failure, why),
                Ok(Upgrade::Running(_)) if timed_out => {
                    failed(&failure, format!("the rolling upgrade did not finish within {}", human(self.operation_timeout)))
                }
                Ok(Upgrade::Running(_)) => Ok(Turn::Wait {
                    after: self.arm.poll_interval(),
                    status,
                    cursor: Cursor::RollbackUpgrading { prev, failure, upgrade, before, op, since },
                }),
                Err(e) => failed(&failure, transient_or(e)?),
            };
        }
        if let Some(o) = op {
            return match self.arm.look("the rollback's upgrade", &o).await {
                Ok(OperationState::Succeeded) => Ok(rolled_back(&prev, failure)),
                Ok(OperationState::Failed(m)) => failed(&failure, m),
                Ok(OperationState::Running(_)) if timed_out => {
                    failed(&failure, format!("the upgrade did not finish within {}", human(self.operation_timeout)))
                }
                Ok(OperationState::Running(asked)) => Ok(Turn::Wait {
                    after: self.poll(asked),
                    status,
                    cursor: Cursor::RollbackUpgrading { prev, failure, upgrade, before, op: Some(o), since },
                }),
                Err(e) => failed(&failure, transient_or(e)?),
            };
        }
        let stale: Vec<String> = match self.arm.instances(&req.target).await {
            Ok(l) => l.into_iter().filter(|i| !i.latest_model_applied).map(|i| i.instance_id).collect(),
            Err(e) => return failed(&failure, transient_or(e)?),
        };
        if stale.is_empty() {
            return Ok(rolled_back(&prev, failure));
        }
        match self.arm.start_manual_upgrade(&req.target, &stale).await {
            Ok(answer) => match self.arm.operation("the rollback's upgrade", &answer, None) {
                Ok(Some((o, after))) => Ok(Turn::Wait {
                    after,
                    status,
                    cursor: Cursor::RollbackUpgrading { prev, failure, upgrade, before, op: Some(o), since },
                }),
                Ok(None) => Ok(rolled_back(&prev, failure)),
                Err(e) => failed(&failure, format!("upgrade of instances {}: {e}", stale.join(", "))),
            },
            Err(e) => failed(&failure, format!("upgrade of instances {}: {}", stale.join(", "), transient_or(e)?)),
        }
    }

    /// How the rolling upgrade that started after `before` goes, or (no upgrade to see, e.g.
    /// `Automatic`) whether every instance is on the latest model. `before` is `None` when resuming:
    /// then the latest upgrade is taken as this run's (deploys to a stage are serialized, and a
    /// rollback's upgrade would have come after any earlier one).
    async fn upgrade_state(
        &self,
        req: &DeployRequest,
        before: &Option<Option<String>>,
        what: &str,
    ) -> std::result::Result<Upgrade, ArmError> {
        let latest = self.arm.latest_rolling_upgrade(&req.target).await?;
        let fresh = latest.as_ref().filter(|l| before.as_ref().is_none_or(|b| b.as_deref() != Some(upgrade_key(l).as_str())));
        if let Some(l) = fresh {
            let status = &l["properties"]["runningStatus"]["code"];
            return Ok(match status.as_str().unwrap_or_default().to_ascii_lowercase().as_str() {
                "completed" => Upgrade::Completed,
                "faulted" | "cancelled" | "canceled" => {
                    let e = &l["properties"]["error"];
                    let detail = match (e["code"].as_str(), e["message"].as_str()) {
                        (Some(c), Some(m)) => format!(": {c}: {m}"),
                        (Some(c), None) => format!(": {c}"),
                        _ => String::new(),
                    };
                    Upgrade::Ended(format!("{what} of {} ended {}{detail}", short(&req.target), status.as_str().unwrap_or("?")))
                }
                _ => {
                    let p = &l["properties"]["progress"];
                    let n = |k: &str| p[k].as_i64().unwrap_or(0);
                    Upgrade::Running(format!(
                        "{} upgraded, {} in progress, {} pending, {} failed",
                        n("successfulInstanceCount"),
                        n("inProgressInstanceCount"),
                        n("pendingInstanceCount"),
                        n("failedInstanceCount")
                    ))
                }
            });
        }
        let instances = self.arm.instances(&req.target).await?;
        let on = instances.iter().filter(|i| i.latest_model_applied).count();
        Ok(if on == instances.len() {
            Upgrade::Completed
        } else {
            Upgrade::Running(format!("{on} of {} instances on the latest model", instances.len()))
        })
    }
}

/// What a look at a rolling upgrade found.
enum Upgrade {
    Completed,
    /// Faulted or cancelled, with ARM's error.
    Ended(String),
    /// Under way: its progress.
    Running(String),
}

/// `12m`, `40s`: how long since `since`, for status lines.
pub fn human_since(since: DateTime<Utc>) -> String {
    let s = (Utc::now() - since).num_seconds().max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// What tells one rolling upgrade from another: its start time (or its whole status).
fn upgrade_key(latest: &Value) -> String {
    let rs = &latest["properties"]["runningStatus"];
    rs["startTime"].as_str().map(str::to_string).unwrap_or_else(|| rs.to_string())
}

/// The scale set's name, for messages.
fn short(target: &str) -> &str {
    target.rsplit('/').next().unwrap_or(target)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Check;

    const VMSS: &str = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/web";
    const IMG: &str = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/galleries/g/images/web/versions/";
    const APP: &str = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/galleries/g/applications/agent/versions/";

    fn req(mode: DeployMode, id: &str) -> DeployRequest {
        DeployRequest {
            run_id: "web-222222222222".into(),
            sequence: 2,
            app: "web".into(),
            stage: "staging".into(),
            target: VMSS.into(),
            image: ImageRef { kind: mode.artifact_kind(), id: id.into(), version: None, digest: None },
            mode,
            batch_size: 1,
            checks: vec![Check::http("http://127.0.0.1/healthz")],
            kubernetes: None,
            registry: None,
            source_registry: None,
        }
    }

    fn scale_set() -> ScaleSet {
        ScaleSet::from_body(
            &json!({
                "tags": { "owner": "team-web", "deploychain.run": "web-111111111111", "deploychain.sequence": "1",
                          "deploychain.artifact": format!("{IMG}1.0.1") },
                "properties": { "upgradePolicy": { "mode": "Manual" }, "virtualMachineProfile": {
                    "storageProfile": { "imageReference": { "id": format!("{IMG}1.0.1") } },
                    "applicationProfile": { "galleryApplications": [
                        { "packageReferenceId": format!("{APP}2.0.0"), "order": 2, "configurationReference": "https://x/cfg" },
                        { "packageReferenceId": "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/galleries/g/applications/other/versions/1.0", "order": 1 }
                    ] } } }
            }),
            Some("W/\"1\"".into()),
        )
    }

    #[test]
    fn the_image_patch_changes_only_the_image_and_the_tags() {
        let ss = scale_set();
        let r = req(DeployMode::Image, &format!("{IMG}1.0.2"));
        let prev = Previous::before(&ss, &r);
        assert_eq!(prev.artifact.as_deref(), Some(format!("{IMG}1.0.1").as_str()));
        let p = deploy_patch(&ss, &r, &prev);
        assert_eq!(
            p["properties"],
            json!({ "virtualMachineProfile": { "storageProfile": { "imageReference": { "id": format!("{IMG}1.0.2") } } } })
        );
        assert_eq!(p["tags"]["owner"], "team-web");
        assert_eq!(p["tags"]["deploychain.run"], "web-222222222222");
        assert_eq!(p["tags"]["deploychain.sequence"], "2");
        assert_eq!(p["tags"]["deploychain.previous.run"], "web-111111111111");
        assert_eq!(p["tags"]["deploychain.previous.artifact"], format!("{IMG}1.0.1"));

        // Rolling back from what a resumed rollout recorded.
        let after = ScaleSet::from_body(&json!({ "tags": p["tags"], "properties": p["properties"] }), None);
        let recorded = Previous::recorded(&after);
        let back = rollback_patch(&after, &r, &recorded).expect("rollback patch");
        assert_eq!(back["properties"]["virtualMachineProfile"]["storageProfile"]["imageReference"]["id"], format!("{IMG}1.0.1"));
        assert_eq!(back["tags"]["deploychain.run"], "web-111111111111");
        assert_eq!(back["tags"]["deploychain.rolledback"], "web-222222222222");
        assert!(back["tags"].get("deploychain.previous.run").is_none());
        assert_eq!(recorded.restored(DeployMode::Image).map(|i| i.version), Some(Some("1.0.1".to_string())));
    }

    #[test]
    fn the_application_patch_replaces_only_this_application() {
        let ss = scale_set();
        let r = req(DeployMode::VmApplication, &format!("{APP}2.1.0"));
        let prev = Previous::before(&ss, &r);
        assert_eq!(prev.artifact.as_deref(), Some(format!("{APP}2.0.0").as_str()));
        let p = deploy_patch(&ss, &r, &prev);
        let apps = &p["properties"]["virtualMachineProfile"]["applicationProfile"]["galleryApplications"];
        assert_eq!(apps[0]["packageReferenceId"], format!("{APP}2.1.0"));
        assert_eq!(apps[0]["order"], 2);
        assert_eq!(apps[0]["treatFailureAsDeploymentFailure"], true);
        assert_eq!(apps[0]["configurationReference"], "https://x/cfg");
        assert_eq!(apps[1]["order"], 1);
        assert!(p["properties"]["virtualMachineProfile"].get("storageProfile").is_none());

        let empty = ScaleSet::from_body(&json!({}), None);
        let p = deploy_patch(&empty, &r, &Previous::before(&empty, &r));
        assert_eq!(
            p["properties"]["virtualMachineProfile"]["applicationProfile"]["galleryApplications"],
            json!([{ "packageReferenceId": format!("{APP}2.1.0"), "order": 1, "treatFailureAsDeploymentFailure": true }])
        );
    }

    #[test]
    fn artifacts_must_fit_the_stage() {
        assert!(unsuitable(&req(DeployMode::Image, &format!("{IMG}1.0.2"))).is_none());
        assert!(unsuitable(&req(DeployMode::VmApplication, &format!("{APP}2.1.0"))).is_none());
        let mut r = req(DeployMode::VmApplication, &format!("{IMG}1.0.2"));
        assert!(unsuitable(&r).is_some_and(|m| m.contains("not a gallery application version")), "{:?}", unsuitable(&r));
        r.image.kind = ImageKind::Container;
        assert!(unsuitable(&r).is_some_and(|m| m.contains("vm-application")));
    }
}
