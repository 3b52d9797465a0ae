//! The simulated Azure side of the local ARM endpoint: scale sets (their resource bodies, ETags,
//! instances), long-running operations, rolling upgrades, and what each instance's health probe
//! says. Pure state and rules, no I/O: [`super::LocalArm`] keeps it on disk and serves it.
//!
//! Time is explicit (`now`, milliseconds since the epoch) and the world moves forward lazily:
//! every request first calls [`World::advance`], which finishes the operations and upgrade steps
//! that are due. An instance's `latestModelApplied` is derived — it is on the latest model when
//! what it runs equals the scale set's model — so a rollback to what the instances still run needs
//! no upgrade, as in Azure.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::BTreeMap;

/// The Microsoft.Compute API versions the endpoint answers (the client uses 2024-07-01; the spec
/// examples the bodies come from are 2025-04-01, the same shapes for these fields).
pub const API_VERSIONS: [&str; 3] = ["2024-07-01", "2024-11-01", "2025-04-01"];

/// How the simulated Azure side behaves.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timing {
    /// How long a model update (the PATCH's operation) takes, in ms.
    pub operation_ms: i64,
    /// How long one instance takes to take a new model, in ms.
    pub upgrade_ms: i64,
    /// How long a freshly upgraded instance reports `HealthState/initializing`, in ms.
    pub health_delay_ms: i64,
    /// How long an image template's run (bake and distribution) takes, in ms.
    pub bake_ms: i64,
}

/// One instance of a scale set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Vm {
    pub instance_id: String,
    /// The model it runs: `[imageReference, galleryApplications]` as JSON text.
    pub runs: String,
    /// When it last took a model.
    pub changed_ms: i64,
    /// An update scheduled by an `Automatic` upgrade policy: when, and to what.
    pub pending: Option<(i64, String)>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RollingUpgrade {
    pub start: String,
    /// Instances in the order they are upgraded, each with when.
    pub schedule: Vec<(String, i64)>,
    /// How many of the schedule are done.
    pub done: usize,
    pub model: String,
    /// `Completed`, `Faulted` or `Cancelled` once it ended, with when.
    pub end: Option<(String, i64)>,
    pub error: Option<Value>,
    /// An injected fault: the upgrade stops `Faulted` with this error after its first instance.
    pub fault: Option<Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScaleSet {
    /// The resource as GET shows it (`etag` is added on the way out).
    pub body: Value,
    pub etag: u64,
    /// The model it was created with (a "failing target" is unhealthy on any other).
    pub seed_model: String,
    pub instances: Vec<Vm>,
    pub rolling: Option<RollingUpgrade>,
    /// An injected fault for the next rolling upgrade.
    #[serde(default)]
    pub rolling_fault: Option<Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Effect {
    /// The PATCH's model update: provisioningState back to `Succeeded` (or `Failed`).
    ModelUpdate,
    /// `manualUpgrade` of these instances.
    Upgrade(Vec<String>),
    /// An image template's creation (its `provisioningState`).
    Provision,
    /// An image template's run: the bake, then its distribution to the gallery.
    ImageRun,
    /// A container registry's `importImage`.
    Import,
}

/// A VM Image Builder image template and its last run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageTemplate {
    /// The resource as GET shows it (`lastRunStatus` kept up to date).
    pub body: Value,
    /// `runOutputName` → the artifact id the last successful run distributed.
    #[serde(default)]
    pub outputs: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Operation {
    pub name: String,
    /// The scale set's id, lower case.
    pub scale_set: String,
    pub effect: Effect,
    pub start_ms: i64,
    pub ready_ms: i64,
    /// Set once applied: `Succeeded` or `Failed`.
    pub status: Option<String>,
    /// An injected failure: the operation ends `Failed` with this error.
    pub fail_with: Option<Value>,
}

/// An instance's state as the instance view reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceView {
    pub instance_id: String,
    pub name: String,
    pub latest: bool,
    /// `HealthState/healthy`, `…/initializing`, `…/unhealthy`.
    pub health: &'static str,
    /// The artifact ids it runs (image reference id, gallery application versions).
    pub artifacts: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct World {
    #[serde(skip)]
    pub timing: Timing,
    /// By lower-case resource id.
    pub scale_sets: BTreeMap<String, ScaleSet>,
    pub operations: BTreeMap<String, Operation>,
    /// Names of the operations not finished yet (a superset: checked against `operations`),
    /// so a request's look at what is due does not walk every finished one; built on first use.
    #[serde(skip)]
    pub pending: Option<std::collections::BTreeSet<String>>,
    /// When finished operations were last forgotten.
    #[serde(skip)]
    pub pruned_ms: i64,
    pub next_operation: u64,
    /// Artifact ids (lower case) whose application fails its health probe.
    pub unhealthy_artifacts: Vec<String>,
    /// Scale set names (parts, lower case) unhealthy on any model but the one they were created with.
    #[serde(skip)]
    pub failing_targets: Vec<String>,
    /// Scale set names whose app answers acceptance checks with 500 whatever its health.
    #[serde(skip)]
    pub failing_checks: Vec<String>,
    /// Image templates, by lower-case resource id.
    #[serde(default)]
    pub templates: BTreeMap<String, ImageTemplate>,
    /// Compute Gallery image and application versions, by lower-case resource id.
    #[serde(default)]
    pub gallery_versions: BTreeMap<String, Value>,
    /// Images in each container registry (lower-case resource id → `repository@digest`).
    #[serde(default)]
    pub registry_images: BTreeMap<String, Vec<String>>,
    /// Every `importImage` accepted: `{registry, source, sourceImage}`.
    #[serde(default)]
    pub imports: Vec<Value>,
    /// Commit prefixes (the `deploychain.commit` artifact tag) whose bake fails.
    #[serde(skip)]
    pub failing_bakes: Vec<String>,
    /// Commit prefixes whose baked image fails its health probe on the scale sets.
    #[serde(skip)]
    pub unhealthy_commits: Vec<String>,
}

/// `[imageReference, galleryApplications]` of a scale set body, as JSON text.
pub fn model_of(body: &Value) -> String {
    let p = &body["properties"]["virtualMachineProfile"];
    json!([p["storageProfile"]["imageReference"], p["applicationProfile"]["galleryApplications"]]).to_string()
}

/// The artifact ids in a model snapshot.
fn artifacts_of(model: &str) -> Vec<String> {
    let v: Value = serde_json::from_str(model).unwrap_or(Value::Null);
    let mut out: Vec<String> = v[0]["id"].as_str().map(str::to_string).into_iter().collect();
    out.extend(v[1].as_array().into_iter().flatten().filter_map(|a| a["packageReferenceId"].as_str().map(str::to_string)));
    out
}

/// ARM's PATCH: objects merge key by key; arrays, scalars and `tags` as a whole are replaced.
pub fn merge(into: &mut Value, patch: &Value) {
    match (into, patch) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                if k == "tags" || !v.is_object() {
                    a.insert(k.clone(), v.clone());
                } else {
                    merge(a.entry(k.clone()).or_insert(json!({})), v);
                }
            }
        }
        (slot, v) => *slot = v.clone(),
    }
}

pub fn name_of(id: &str) -> &str {
    id.rsplit('/').next().unwrap_or(id)
}

pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

impl ScaleSet {
    pub fn new(body: Value, instances: usize, now: i64) -> ScaleSet {
        let model = model_of(&body);
        ScaleSet {
            body,
            etag: 1,
            seed_model: model.clone(),
            instances: (0..instances)
                .map(|i| Vm { instance_id: i.to_string(), runs: model.clone(), changed_ms: now - 3_600_000, pending: None })
                .collect(),
            rolling: None,
            rolling_fault: None,
        }
    }

    pub fn name(&self) -> String {
        self.body["name"].as_str().map(str::to_string).unwrap_or_else(|| name_of(self.body["id"].as_str().unwrap_or_default()).to_string())
    }

    pub fn etag(&self) -> String {
        format!("\"{}\"", self.etag)
    }

    /// The body as GET answers it.
    pub fn shown(&self) -> Value {
        let mut b = self.body.clone();
        b["etag"] = self.etag().into();
        b
    }

    pub fn upgrade_mode(&self) -> String {
        self.body["properties"]["upgradePolicy"]["mode"].as_str().unwrap_or("Manual").to_ascii_lowercase()
    }
}

/// How long a finished operation's status stays readable.
const OPERATION_RETENTION_MS: i64 = 10 * 60 * 1000;
/// How often finished operations past their retention are looked for.
const PRUNE_EVERY_MS: i64 = 5_000;

impl World {
    /// Finish what is due at `now`. Returns whether anything changed.
    pub fn advance(&mut self, now: i64) -> bool {
        // Finished operations stay readable for a while (a poller may come back late), then go,
        // as ARM forgets them: the world the endpoint saves on every change stays small.
        let mut changed = false;
        if now - self.pruned_ms >= PRUNE_EVERY_MS {
            self.pruned_ms = now;
            let before = self.operations.len();
            self.operations.retain(|_, o| o.status.is_none() || o.ready_ms > now - OPERATION_RETENTION_MS);
            changed = self.operations.len() != before;
        }
        let pending =
            self.pending.get_or_insert_with(|| self.operations.values().filter(|o| o.status.is_none()).map(|o| o.name.clone()).collect());
        let ops = &self.operations;
        pending.retain(|n| ops.get(n).is_some_and(|o| o.status.is_none()));
        let due: Vec<String> = pending.iter().filter(|n| ops.get(*n).is_some_and(|o| o.ready_ms <= now)).cloned().collect();
        for name in due {
            let Some(op) = self.operations.get(&name).cloned() else { continue };
            if matches!(op.effect, Effect::Provision | Effect::ImageRun) {
                self.finish_template_operation(&op, now);
                changed = true;
                continue;
            }
            if op.effect == Effect::Import {
                if let Some(o) = self.operations.get_mut(&name) {
                    o.status = Some(if op.fail_with.is_some() { "Failed" } else { "Succeeded" }.into());
                }
                changed = true;
                continue;
            }
            let failed = op.fail_with.is_some();
            if let Some(ss) = self.scale_sets.get_mut(&op.scale_set) {
                match &op.effect {
                    Effect::ModelUpdate => {
                        ss.body["properties"]["provisioningState"] = if failed { "Failed" } else { "Succeeded" }.into();
                    }
                    Effect::Upgrade(ids) if !failed => {
                        let model = model_of(&ss.body);
                        for vm in ss.instances.iter_mut().filter(|v| ids.contains(&v.instance_id)) {
                            if vm.runs != model {
                                vm.runs = model.clone();
                                vm.changed_ms = op.ready_ms;
                            }
                            vm.pending = None;
                        }
                    }
                    Effect::Upgrade(_) | Effect::Provision | Effect::ImageRun | Effect::Import => {}
                }
            }
            if let Some(o) = self.operations.get_mut(&name) {
                o.status = Some(if failed { "Failed" } else { "Succeeded" }.into());
            }
            changed = true;
        }
        let unhealthy = self.unhealthy_artifacts.clone();
        let failing = self.failing_targets.clone();
        for ss in self.scale_sets.values_mut() {
            for vm in ss.instances.iter_mut() {
                if let Some((at, model)) = vm.pending.clone().filter(|(at, _)| *at <= now) {
                    vm.runs = model;
                    vm.changed_ms = at;
                    vm.pending = None;
                    changed = true;
                }
            }
            let name = ss.name().to_ascii_lowercase();
            let seed = ss.seed_model.clone();
            let Some(r) = ss.rolling.as_mut().filter(|r| r.end.is_none()) else { continue };
            while r.done < r.schedule.len() && r.schedule[r.done].1 <= now {
                let (id, at) = r.schedule[r.done].clone();
                if let Some(vm) = ss.instances.iter_mut().find(|v| v.instance_id == id) {
                    vm.runs = r.model.clone();
                    vm.changed_ms = at;
                }
                r.done += 1;
                changed = true;
                let bad = bad_model(&r.model, &seed, &name, &unhealthy, &failing);
                if let Some(e) = r.fault.take().or_else(|| bad.then(|| json!({
                    "code": "MaxUnhealthyUpgradedInstancePercentExceededInRollingUpgrade",
                    "message": format!("Rolling upgrade stopped: upgraded instance {id} of {name} is unhealthy, above the policy's maxUnhealthyUpgradedInstancePercent.")
                }))) {
                    r.end = Some(("Faulted".into(), at));
                    r.error = Some(e);
                    break;
                }
            }
            if r.end.is_none() && r.done == r.schedule.len() {
                let at = r.schedule.last().map(|s| s.1).unwrap_or(now);
                r.end = Some(("Completed".into(), at));
                changed = true;
            }
        }
        changed
    }

    pub fn new_operation(&mut self, scale_set: &str, effect: Effect, now: i64, ready_ms: i64, fail_with: Option<Value>) -> String {
        self.next_operation += 1;
        let name = format!("{:08x}-0000-4000-8000-{:012x}", self.next_operation, now.max(0));
        self.operations.insert(
            name.clone(),
            Operation { name: name.clone(), scale_set: scale_set.to_string(), effect, start_ms: now, ready_ms, status: None, fail_with },
        );
        if let Some(p) = &mut self.pending {
            p.insert(name.clone());
        }
        name
    }

    /// Apply a model PATCH (already checked against `If-Match`): merge it, start the upgrade the
    /// scale set's policy calls for, and return the model update's operation name.
    pub fn patch(&mut self, key: &str, patch: &Value, now: i64, fail_with: Option<Value>) -> Option<String> {
        let timing = self.timing.clone();
        let ss = self.scale_sets.get_mut(key)?;
        let before = model_of(&ss.body);
        merge(&mut ss.body, patch);
        ss.etag += 1;
        ss.body["properties"]["provisioningState"] = "Updating".into();
        let after = model_of(&ss.body);
        if before != after {
            match ss.upgrade_mode().as_str() {
                "rolling" => {
                    let start = now + timing.operation_ms;
                    let schedule = ss
                        .instances
                        .iter()
                        .enumerate()
                        .map(|(i, v)| (v.instance_id.clone(), start + timing.upgrade_ms * (i as i64 + 1)))
                        .collect();
                    let fault = ss.rolling_fault.take();
                    ss.rolling = Some(RollingUpgrade {
                        start: rfc3339(start),
                        schedule,
                        done: 0,
                        model: after.clone(),
                        end: None,
                        error: None,
                        fault,
                    });
                }
                "automatic" => {
                    for vm in ss.instances.iter_mut() {
                        vm.pending = Some((now + timing.operation_ms + timing.upgrade_ms, after.clone()));
                    }
                }
                _ => {
                    for vm in ss.instances.iter_mut() {
                        vm.pending = None;
                    }
                }
            }
        }
        Some(self.new_operation(key, Effect::ModelUpdate, now, now + timing.operation_ms, fail_with))
    }

    /// Arm the next rolling upgrade of `key` to fault with `error`.
    pub fn fault_next_rolling_upgrade(&mut self, key: &str, error: Value) {
        if let Some(ss) = self.scale_sets.get_mut(key) {
            ss.rolling_fault = Some(error);
        }
    }

    pub fn instance_views(&self, key: &str, now: i64) -> Vec<InstanceView> {
        let Some(ss) = self.scale_sets.get(key) else { return Vec::new() };
        let model = model_of(&ss.body);
        let name = ss.name();
        ss.instances
            .iter()
            .map(|vm| {
                let health = if now < vm.changed_ms + self.timing.health_delay_ms {
                    "HealthState/initializing"
                } else if bad_model(&vm.runs, &ss.seed_model, &name.to_ascii_lowercase(), &self.unhealthy_artifacts, &self.failing_targets)
                {
                    "HealthState/unhealthy"
                } else {
                    "HealthState/healthy"
                };
                InstanceView {
                    instance_id: vm.instance_id.clone(),
                    name: format!("{name}_{}", vm.instance_id),
                    latest: vm.runs == model,
                    health,
                    artifacts: artifacts_of(&vm.runs),
                }
            })
            .collect()
    }

    /// What the app behind scale set `name` answers an acceptance check with.
    pub fn app_answer(&self, name: &str, now: i64) -> Option<(u16, String)> {
        let (key, ss) = self.scale_sets.iter().find(|(_, s)| s.name().eq_ignore_ascii_case(name))?;
        if self.failing_checks.iter().any(|f| f.eq_ignore_ascii_case(name)) {
            return Some((500, format!("{name}: the application answers 500 (a failing check of the local stack)\n")));
        }
        let views = self.instance_views(key, now);
        let sick: Vec<String> =
            views.iter().filter(|v| v.health != "HealthState/healthy").map(|v| format!("{} is {}", v.name, v.health)).collect();
        if sick.is_empty() {
            let runs = views.first().map(|v| v.artifacts.join(", ")).unwrap_or_default();
            Some((200, format!("ok: {} serves {runs}\n", ss.name())))
        } else {
            Some((503, format!("unhealthy: {}\n", sick.join("; "))))
        }
    }
}

/// Whether instances running `model` fail their health probe.
fn bad_model(model: &str, seed: &str, name: &str, unhealthy: &[String], failing: &[String]) -> bool {
    let lower = model.to_ascii_lowercase();
    unhealthy.iter().any(|a| !a.is_empty() && lower.contains(a.as_str()))
        || (model != seed && failing.iter().any(|f| !f.is_empty() && name.contains(f.as_str())))
}

impl World {
    /// An image template's operation is due: its provisioning ends, or its run ends — failed (a
    /// failing commit, an injected fault) or with the image version in the gallery.
    fn finish_template_operation(&mut self, op: &Operation, now: i64) {
        let mut status = if op.fail_with.is_some() { "Failed" } else { "Succeeded" };
        let Some(t) = self.templates.get_mut(&op.scale_set) else { return };
        match op.effect {
            Effect::Provision => t.body["properties"]["provisioningState"] = status.into(),
            _ => {
                let distribute: Vec<Value> = t.body["properties"]["distribute"].as_array().cloned().unwrap_or_default();
                let commit = distribute
                    .iter()
                    .find_map(|d| d["artifactTags"]["deploychain.commit"].as_str())
                    .or_else(|| t.body["tags"]["deploychain.commit"].as_str())
                    .unwrap_or_default()
                    .to_ascii_lowercase();
                let bad_bake = self.failing_bakes.iter().any(|p| !p.is_empty() && commit.starts_with(&p.to_ascii_lowercase()));
                let mut message = op.fail_with.as_ref().map(|e| e["message"].as_str().unwrap_or("the run failed").to_string());
                if bad_bake && message.is_none() {
                    message = Some("Failed while waiting for packerizer: Microsoft.VirtualMachineImages/imageTemplates 'customize' step 'build' exited with code 1".into());
                    status = "Failed";
                }
                if status == "Succeeded" {
                    for d in distribute.iter().filter(|d| d["type"] == "SharedImage") {
                        let Some(id) = d["galleryImageId"].as_str() else { continue };
                        let version = json!({
                            "id": id, "name": name_of(id), "type": "Microsoft.Compute/galleries/images/versions",
                            "location": t.body["location"], "tags": d["artifactTags"],
                            "properties": { "provisioningState": "Succeeded",
                                "publishingProfile": { "publishedDate": rfc3339(now), "targetRegions": d["targetRegions"] },
                                "storageProfile": { "source": { "id": t.body["id"] } } }
                        });
                        self.gallery_versions.insert(id.to_ascii_lowercase(), version);
                        if let Some(out) = d["runOutputName"].as_str() {
                            t.outputs.insert(out.to_string(), id.to_string());
                        }
                        if self.unhealthy_commits.iter().any(|p| !p.is_empty() && commit.starts_with(&p.to_ascii_lowercase())) {
                            self.unhealthy_artifacts.push(id.to_ascii_lowercase());
                        }
                    }
                }
                t.body["properties"]["lastRunStatus"] = json!({
                    "startTime": rfc3339(op.start_ms), "endTime": rfc3339(now),
                    "runState": status, "runSubState": if status == "Succeeded" { "Distributing" } else { "Customizing" },
                    "message": message.unwrap_or_default(),
                });
            }
        }
        if let Some(o) = self.operations.get_mut(&op.name) {
            o.status = Some(status.into());
            if status == "Failed" && o.fail_with.is_none() {
                o.fail_with = Some(json!({ "code": "ImageTemplateRunFailed", "message": t_message(&self.templates, &op.scale_set) }));
            }
        }
    }
}

fn t_message(templates: &BTreeMap<String, ImageTemplate>, key: &str) -> String {
    templates.get(key).and_then(|t| t.body["properties"]["lastRunStatus"]["message"].as_str()).unwrap_or_default().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Timing = Timing { operation_ms: 10, upgrade_ms: 100, health_delay_ms: 0, bake_ms: 50 };

    fn set(mode: &str, instances: usize) -> ScaleSet {
        ScaleSet::new(
            json!({ "name": "web", "id": "/s/web", "properties": { "upgradePolicy": { "mode": mode },
                "virtualMachineProfile": { "storageProfile": { "imageReference": { "id": "img/1" } } } } }),
            instances,
            0,
        )
    }

    fn patch_to(image: &str) -> Value {
        json!({ "properties": { "virtualMachineProfile": { "storageProfile": { "imageReference": { "id": image } } } } })
    }

    #[test]
    fn manual_upgrades_happen_when_their_operation_ends() {
        let mut w = World { timing: T, ..World::default() };
        w.scale_sets.insert("/s/web".into(), set("Manual", 2));
        w.patch("/s/web", &patch_to("img/2"), 1000, None);
        assert!(w.instance_views("/s/web", 1000).iter().all(|v| !v.latest));
        w.new_operation("/s/web", Effect::Upgrade(vec!["0".into()]), 1000, 1100, None);
        w.advance(1050);
        assert!(!w.instance_views("/s/web", 1050)[0].latest);
        w.advance(1100);
        let v = w.instance_views("/s/web", 1100);
        assert!(v[0].latest && !v[1].latest);
        assert_eq!(w.scale_sets["/s/web"].body["properties"]["provisioningState"], "Succeeded");
        // Back to what instance 1 still runs: it is on the latest model again without an upgrade.
        w.patch("/s/web", &patch_to("img/1"), 1200, None);
        assert!(w.instance_views("/s/web", 1200)[1].latest);
    }

    #[test]
    fn a_rolling_upgrade_faults_on_an_unhealthy_image() {
        let mut w = World { timing: T, unhealthy_artifacts: vec!["img/bad".into()], ..World::default() };
        w.scale_sets.insert("/s/web".into(), set("Rolling", 3));
        w.patch("/s/web", &patch_to("img/bad"), 0, None);
        w.advance(10_000);
        let r = w.scale_sets["/s/web"].rolling.clone().expect("rolling");
        assert_eq!(r.end.map(|e| e.0).as_deref(), Some("Faulted"));
        assert_eq!(r.done, 1, "stopped after the first unhealthy instance");
        assert_eq!(w.instance_views("/s/web", 10_000)[0].health, "HealthState/unhealthy");
    }
}
