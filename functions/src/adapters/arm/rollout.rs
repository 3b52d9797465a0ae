//! One rollout of an artifact to a VM scale set through ARM, and its rollback.
//!
//! 1. Read the scale set. Its tags say which run and artifact it runs (`deploychain.run`,
//!    `deploychain.sequence`, `deploychain.artifact`); the shared fencing rule
//!    ([`memory::fence`](crate::adapters::memory::fence)) refuses an older run (`Stale`, nothing
//!    written) and recognises a redeploy of what it already runs (no model write: the rollout only
//!    resumes, and ends at once when every instance is on the model, healthy, and the checks pass).
//! 2. PATCH the model with `If-Match`: the new artifact, and the tags (run, sequence, artifact, app,
//!    stage, and `deploychain.previous.*` so a resumed rollout can still roll back). A 412 re-reads
//!    and decides again (bounded).
//! 3. Upgrade: `Manual` policy — the instances not on the latest model, `batch_size` at a time
//!    (`manualUpgrade`), each batch gated: every instance on the latest model and `HealthState/healthy`
//!    within the health timeout, then the acceptance checks. `Rolling` / `Automatic` — wait for the
//!    rolling upgrade the PATCH started (or for every instance to be on the model), then gate.
//! 4. A failed gate, upgrade or model operation rolls back: PATCH the previous artifact (fresh
//!    ETag, `If-Match`), tags back to the previous run plus `deploychain.rolledback` = this run,
//!    upgrade the instances not on the model, wait. A failing rollback is `Failed`, naming both.
//!
//! Transient trouble (ARM throttling or down after retries) is an `Err(Transient)`: the message is
//! redelivered and the rollout resumes from what the tags say, without repeating the PATCH.

use super::client::{ArmError, human};
use super::{
    ArmCompute, TAG_APP, TAG_ARTIFACT, TAG_PREVIOUS_ARTIFACT, TAG_PREVIOUS_RUN, TAG_PREVIOUS_SEQUENCE, TAG_ROLLEDBACK, TAG_RUN,
    TAG_SEQUENCE, TAG_STAGE,
};
use crate::adapters::memory::{TargetState, fence};
use crate::adapters::{DeployOutcome, DeployRequest};
use crate::error::{Error, Result};
use crate::policy::DeployMode;
use deploychain_events::{ImageKind, ImageRef};
use serde_json::{Map, Value, json};

/// Why a rollout stopped early.
#[derive(Debug)]
enum Stop {
    /// Try again later (redelivery resumes the rollout).
    Transient(String),
    /// The rollout failed: roll back.
    Failed(String),
}

impl From<ArmError> for Stop {
    fn from(e: ArmError) -> Stop {
        match e {
            ArmError::Transient(m) => Stop::Transient(m),
            ArmError::PreconditionFailed(m) | ArmError::NotFound(m) | ArmError::Failed(m) => Stop::Failed(m),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Previous {
    pub artifact: Option<String>,
    pub run: Option<String>,
    pub sequence: Option<String>,
    /// The model's piece as read before this invocation changed it (image reference object or
    /// gallery applications array); restored as it was. `None` when resuming.
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

fn transient(m: String) -> Error {
    Error::Transient(m)
}

impl ArmCompute {
    async fn read(&self, target: &str) -> std::result::Result<ScaleSet, ArmError> {
        let (body, etag) = self.arm.get(target).await?;
        Ok(ScaleSet::from_body(&body, etag))
    }

    pub(super) async fn rollout(&self, req: &DeployRequest) -> Result<DeployOutcome> {
        if let Some(reason) = unsuitable(req) {
            return Ok(DeployOutcome::Failed { reason: format!("{reason}; nothing changed") });
        }
        let name = short(&req.target);
        let mut conflicts = 0;
        let (ss, prev, rolling_before) = loop {
            let ss = match self.read(&req.target).await {
                Ok(ss) => ss,
                Err(ArmError::Transient(m)) => return Err(transient(m)),
                Err(e) => return Ok(DeployOutcome::Failed { reason: format!("cannot read scale set {name}: {e}") }),
            };
            if ss.tag(TAG_ROLLEDBACK) == Some(req.run_id.as_str()) && ss.tag(TAG_RUN) != Some(req.run_id.as_str()) {
                // This run's rollout failed and was rolled back before (a redelivery): same answer, nothing new.
                let restored = Previous { artifact: ss.tag(TAG_ARTIFACT).map(str::to_string), ..Default::default() }.restored(req.mode);
                return Ok(DeployOutcome::RolledBack {
                    reason: format!("this run's rollout to {name} failed and was rolled back earlier"),
                    restored,
                });
            }
            match fence(ss.current(req.mode.artifact_kind()).as_ref(), req) {
                Some(DeployOutcome::Succeeded) => {
                    tracing::info!(
                        scale_set = name,
                        run = req.run_id,
                        "the model already has this run's artifact: resuming, no model write"
                    );
                    let prev = Previous::recorded(&ss);
                    break (ss, prev, None);
                }
                Some(stale) => return Ok(stale),
                None => {}
            }
            let prev = Previous::before(&ss, req);
            let rolling_before = match ss.upgrade {
                UpgradeMode::Manual => None,
                _ => match self.arm.latest_rolling_upgrade(&req.target).await {
                    Ok(latest) => Some(latest.as_ref().map(upgrade_key)),
                    Err(ArmError::Transient(m)) => return Err(transient(m)),
                    Err(e) => return Ok(DeployOutcome::Failed { reason: format!("cannot read the rolling upgrade of {name}: {e}") }),
                },
            };
            let patch = deploy_patch(&ss, req, &prev);
            if ss.etag.is_none() {
                tracing::warn!(scale_set = name, "the scale set has no ETag: updating it unconditionally");
            }
            let answer = match self.arm.patch(&req.target, ss.etag.as_deref(), &patch).await {
                Ok(a) => a,
                Err(ArmError::PreconditionFailed(_)) if conflicts < self.max_conflicts => {
                    conflicts += 1;
                    tracing::info!(scale_set = name, conflicts, "the scale set changed since it was read (412): reading it again");
                    continue;
                }
                Err(ArmError::PreconditionFailed(m)) => {
                    return Err(transient(format!("scale set {name} kept changing while it was updated ({conflicts} re-reads): {m}")));
                }
                Err(ArmError::Transient(m)) => return Err(transient(m)),
                Err(e) => return Ok(DeployOutcome::Failed { reason: format!("model update of {name} refused: {e}; nothing changed") }),
            };
            tracing::info!(scale_set = name, run = req.run_id, artifact = req.image.id, "model update accepted");
            match self.arm.wait_update(&req.target, &answer).await {
                Ok(()) => break (ss, prev, rolling_before),
                Err(ArmError::Transient(m)) => return Err(transient(m)),
                Err(e) => return Ok(self.roll_back(req, &prev, format!("model update of {name} failed: {e}")).await),
            }
        };
        let done = match ss.upgrade {
            UpgradeMode::Manual => self.manual(req).await,
            UpgradeMode::Rolling | UpgradeMode::Automatic => self.rolling(req, rolling_before).await,
        };
        match done {
            Ok(()) => {
                tracing::info!(scale_set = name, run = req.run_id, "rollout succeeded");
                Ok(DeployOutcome::Succeeded)
            }
            Err(Stop::Transient(m)) => Err(transient(m)),
            Err(Stop::Failed(reason)) => Ok(self.roll_back(req, &prev, reason).await),
        }
    }

    /// Manual upgrade policy: the instances not on the model, in gated batches.
    async fn manual(&self, req: &DeployRequest) -> std::result::Result<(), Stop> {
        let pending: Vec<String> =
            self.arm.instances(&req.target).await?.into_iter().filter(|i| !i.latest_model_applied).map(|i| i.instance_id).collect();
        if pending.is_empty() {
            return self.gate(req, None).await;
        }
        let size = req.batch_size.max(1) as usize;
        let batches = pending.len().div_ceil(size);
        for (n, batch) in pending.chunks(size).enumerate() {
            let label = format!("batch {} of {batches} (instance{} {})", n + 1, if batch.len() == 1 { "" } else { "s" }, batch.join(", "));
            tracing::info!(scale_set = short(&req.target), run = req.run_id, batch = label, "upgrading");
            self.arm.manual_upgrade(&req.target, batch).await.map_err(|e| match Stop::from(e) {
                Stop::Failed(m) => Stop::Failed(format!("upgrade of {label} failed: {m}")),
                t => t,
            })?;
            self.gate(req, Some(batch)).await.map_err(|e| match e {
                Stop::Failed(m) => Stop::Failed(format!("{label}: {m}")),
                t => t,
            })?;
        }
        Ok(())
    }

    /// Rolling / Automatic upgrade policy: the PATCH started the upgrade; wait for it, then gate.
    async fn rolling(&self, req: &DeployRequest, before: Option<Option<String>>) -> std::result::Result<(), Stop> {
        self.await_upgrade(req, before, "rolling upgrade").await?;
        self.gate(req, None).await
    }

    /// Wait until the rolling upgrade that started after `before` completes, or (no upgrade to see,
    /// e.g. `Automatic`) every instance is on the latest model. `before` is `None` when resuming:
    /// then the latest upgrade is taken as this run's (deploys to a stage are serialized, and a
    /// rollback's upgrade would have come after any earlier one).
    async fn await_upgrade(&self, req: &DeployRequest, before: Option<Option<String>>, what: &str) -> std::result::Result<(), Stop> {
        let deadline = tokio::time::Instant::now() + self.operation_timeout;
        loop {
            let latest = self.arm.latest_rolling_upgrade(&req.target).await?;
            let fresh = latest.as_ref().filter(|l| before.as_ref().is_none_or(|b| b.as_deref() != Some(upgrade_key(l).as_str())));
            if let Some(l) = fresh {
                let status = &l["properties"]["runningStatus"]["code"];
                match status.as_str().unwrap_or_default().to_ascii_lowercase().as_str() {
                    "completed" => return Ok(()),
                    "faulted" | "cancelled" | "canceled" => {
                        let e = &l["properties"]["error"];
                        let detail = match (e["code"].as_str(), e["message"].as_str()) {
                            (Some(c), Some(m)) => format!(": {c}: {m}"),
                            (Some(c), None) => format!(": {c}"),
                            _ => String::new(),
                        };
                        return Err(Stop::Failed(format!(
                            "{what} of {} ended {}{detail}",
                            short(&req.target),
                            status.as_str().unwrap_or("?")
                        )));
                    }
                    _ => {}
                }
            } else if self.arm.instances(&req.target).await?.iter().all(|i| i.latest_model_applied) {
                return Ok(());
            }
            if tokio::time::Instant::now() + self.arm.poll_interval() > deadline {
                return Err(Stop::Failed(format!(
                    "{what} of {} did not finish within {}",
                    short(&req.target),
                    human(self.operation_timeout)
                )));
            }
            tokio::time::sleep(self.arm.poll_interval()).await;
        }
    }

    /// The health gate of `only` (or every instance): on the latest model and healthy within the
    /// health timeout; then the stage's acceptance checks.
    async fn gate(&self, req: &DeployRequest, only: Option<&[String]>) -> std::result::Result<(), Stop> {
        let deadline = tokio::time::Instant::now() + self.health_timeout;
        loop {
            let mut bad = Vec::new();
            for i in self.arm.instances(&req.target).await? {
                if only.is_some_and(|ids| !ids.contains(&i.instance_id)) {
                    continue;
                }
                if !i.latest_model_applied {
                    bad.push(format!("{} is not on the latest model", i.name));
                    continue;
                }
                match self.arm.health(&req.target, &i.instance_id).await {
                    Ok(Some(h)) if h.eq_ignore_ascii_case("HealthState/healthy") => {}
                    Ok(Some(h)) => bad.push(format!("{} is {h}", i.name)),
                    Ok(None) => bad.push(format!("{} reports no health state (is the Application Health extension installed?)", i.name)),
                    // Scaled in between the list and the instance view: nothing left to gate.
                    Err(ArmError::NotFound(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            if bad.is_empty() {
                break;
            }
            if tokio::time::Instant::now() + self.arm.poll_interval() > deadline {
                return Err(Stop::Failed(format!("health gate not passed within {}: {}", human(self.health_timeout), bad.join("; "))));
            }
            tokio::time::sleep(self.arm.poll_interval()).await;
        }
        super::checks::run(&self.checks_http, &req.checks).await.map_err(Stop::Failed)
    }

    /// Roll back after `failure`; the outcome names what happened.
    async fn roll_back(&self, req: &DeployRequest, prev: &Previous, failure: String) -> DeployOutcome {
        let name = short(&req.target);
        tracing::warn!(scale_set = name, run = req.run_id, failure, "rollout failed: rolling back");
        match self.try_roll_back(req, prev).await {
            Ok(()) => {
                tracing::info!(scale_set = name, run = req.run_id, "rolled back");
                DeployOutcome::RolledBack { reason: failure, restored: prev.restored(req.mode) }
            }
            Err(why) => {
                tracing::error!(scale_set = name, run = req.run_id, failure, rollback = why, "rollback failed");
                DeployOutcome::Failed { reason: format!("{failure}; rollback failed: {why}") }
            }
        }
    }

    async fn try_roll_back(&self, req: &DeployRequest, prev: &Previous) -> std::result::Result<(), String> {
        let name = short(&req.target);
        let mut conflicts = 0;
        let (upgrade, before) = loop {
            let ss = self.read(&req.target).await.map_err(|e| e.to_string())?;
            if let Some(cur) = ss.current(req.mode.artifact_kind()).filter(|c| c.run_id != req.run_id && c.sequence > req.sequence) {
                return Err(format!("{name} now runs {} from newer run {}: not touching it", cur.image.id, cur.run_id));
            }
            let before = match ss.upgrade {
                UpgradeMode::Manual => None,
                _ => Some(self.arm.latest_rolling_upgrade(&req.target).await.map_err(|e| e.to_string())?.as_ref().map(upgrade_key)),
            };
            let patch = rollback_patch(&ss, req, prev)?;
            match self.arm.patch(&req.target, ss.etag.as_deref(), &patch).await {
                Ok(answer) => {
                    self.arm.wait_update(&req.target, &answer).await.map_err(|e| format!("model update failed: {e}"))?;
                    break (ss.upgrade, before);
                }
                Err(ArmError::PreconditionFailed(_)) if conflicts < self.max_conflicts => conflicts += 1,
                Err(e) => return Err(format!("model update refused: {e}")),
            }
        };
        match upgrade {
            UpgradeMode::Manual => {
                let stale: Vec<String> = self
                    .arm
                    .instances(&req.target)
                    .await
                    .map_err(|e| e.to_string())?
                    .into_iter()
                    .filter(|i| !i.latest_model_applied)
                    .map(|i| i.instance_id)
                    .collect();
                if !stale.is_empty() {
                    self.arm
                        .manual_upgrade(&req.target, &stale)
                        .await
                        .map_err(|e| format!("upgrade of instances {} failed: {e}", stale.join(", ")))?;
                }
                Ok(())
            }
            _ => self.await_upgrade(req, before, "rollback's rolling upgrade").await.map_err(|e| match e {
                Stop::Transient(m) | Stop::Failed(m) => m,
            }),
        }
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
