//! The local ARM endpoint: the `Microsoft.Compute` operations a rollout uses, served over HTTP so
//! the handler's unchanged ARM client (`DEPLOYCHAIN_COMPUTE=arm`) deploys to simulated scale sets
//! on this machine — GET/PATCH a scale set (ETag, `If-Match`), the instance list, `manualUpgrade`,
//! an instance's view with its Application Health state, `rollingUpgrades/latest`, and the status
//! of long-running operations (`Azure-AsyncOperation`, and `Location` with `monitor=true`).
//!
//! Bodies follow the ARM spec examples in `tests/fixtures/arm-compute/` (a new scale set is the
//! published "create from a generalized shared image" answer; the latest rolling upgrade is the
//! published one with its status filled in). Upgrades take simulated time per instance; an
//! instance running an artifact marked unhealthy reports `HealthState/unhealthy`. Faults are
//! injected per request ([`Fault`]): any answer (429 with `Retry-After`, 500, 403), a delay
//! longer than the client waits, a concurrent writer that moves the ETag, an operation that ends
//! `Failed`, a rolling upgrade that ends `Faulted`.
//!
//! It also plays the network the scale sets' applications live on ([`LocalArm::apps_router`]): an
//! HTTP proxy (the handler gets `HTTP_PROXY`) that answers `http://<scale-set-name>.<anything>/…`
//! for the stage's acceptance checks from the scale set's health, so the shipped policy's check URLs
//! work unchanged.
//!
//! Everything — scale sets, operations, the request log — is kept in one SQLite file, so the
//! simulated Azure side survives a restart of the stack like the bus does.

mod images;
mod rest;
pub mod world;

use anyhow::{Context, Result, anyhow};
use rusqlite::{Connection, params};
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use world::{InstanceView, ScaleSet, Timing, World};

/// The published "create a scale set from a generalized shared image" example: every new
/// simulated scale set starts as its answer.
const CREATE_EXAMPLE: &str =
    include_str!("../../../tests/fixtures/arm-compute/VirtualMachineScaleSet_Create_FromAGeneralizedSharedImage.json");
/// The published "latest rolling upgrade" example, the shape of `rollingUpgrades/latest`.
const ROLLING_EXAMPLE: &str =
    include_str!("../../../tests/fixtures/arm-compute/VirtualMachineScaleSetRollingUpgrade_GetLatest_MaximumSet_Gen.json");

/// How the simulated Azure side behaves (`[arm]` in `deploychain.local.toml`).
#[derive(Debug, Clone)]
pub struct ArmSimConfig {
    /// Instances of each scale set the stack creates.
    pub instances: usize,
    /// How long a model update takes.
    pub operation_time: Duration,
    /// How long one instance takes to take a new model.
    pub upgrade_time: Duration,
    /// How long a freshly upgraded instance reports `HealthState/initializing`.
    pub health_delay: Duration,
    /// Scale sets (name parts) created with a `Rolling` upgrade policy.
    pub rolling: Vec<String>,
    /// Scale sets (name parts) created with an `Automatic` upgrade policy (the rest: `Manual`).
    pub automatic: Vec<String>,
    /// Scale sets (name parts) whose instances are unhealthy on any new model.
    pub failing_targets: Vec<String>,
    /// Scale sets (names) whose application fails every acceptance check.
    pub failing_checks: Vec<String>,
    /// Instances per page of the instance list (`nextLink` beyond).
    pub page_size: usize,
    /// The handler's pause between polls of ARM (`DEPLOYCHAIN_ARM_POLL_INTERVAL`).
    pub poll_interval: Duration,
    /// How long the handler waits for a batch to become healthy (`DEPLOYCHAIN_HEALTH_TIMEOUT`).
    pub health_timeout: Duration,
    /// Faults to inject, in order.
    pub faults: Vec<Fault>,
}

impl Default for ArmSimConfig {
    fn default() -> Self {
        ArmSimConfig {
            instances: 2,
            operation_time: Duration::from_millis(300),
            upgrade_time: Duration::from_secs(1),
            health_delay: Duration::from_millis(500),
            rolling: Vec::new(),
            automatic: Vec::new(),
            failing_targets: Vec::new(),
            failing_checks: Vec::new(),
            page_size: 50,
            poll_interval: Duration::from_millis(200),
            health_timeout: Duration::from_secs(15),
            faults: Vec::new(),
        }
    }
}

/// One injected fault: the first request with this method whose path ends with `path_ends`
/// (case-insensitive), after `skip` such requests went through, gets `action`, `times` times.
#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    pub method: String,
    pub path_ends: String,
    pub skip: u32,
    pub times: u32,
    pub action: FaultAction,
}

#[derive(Debug, Clone, PartialEq)]
pub enum FaultAction {
    /// Answer this instead of doing anything (429 + `Retry-After`, 500, 403 …).
    Answer { status: u16, headers: Vec<(String, String)>, body: Value },
    /// Hold the answer this long first (a client timeout), then answer normally.
    Delay(Duration),
    /// Do the request at once but hold its answer this long: a client that times out first never
    /// learns that the change landed (the ambiguous outcome a retry must not repeat).
    LateAnswer(Duration),
    /// Another writer changes the scale set (tag `owner`) just before this request: its ETag moves.
    ConcurrentWrite,
    /// Do the request, but its long-running operation ends `Failed` with this ARM error.
    FailOperation(Value),
}

impl Fault {
    pub fn new(method: &str, path_ends: &str, action: FaultAction) -> Fault {
        Fault { method: method.to_ascii_uppercase(), path_ends: path_ends.to_ascii_lowercase(), skip: 0, times: 1, action }
    }

    /// An answer with ARM's error body `{"error":{"code","message"}}`.
    pub fn error(method: &str, path_ends: &str, status: u16, code: &str, message: &str) -> Fault {
        Fault::new(
            method,
            path_ends,
            FaultAction::Answer { status, headers: Vec::new(), body: json!({ "error": { "code": code, "message": message } }) },
        )
    }

    pub fn with_header(mut self, name: &str, value: &str) -> Fault {
        if let FaultAction::Answer { headers, .. } = &mut self.action {
            headers.push((name.to_ascii_lowercase(), value.to_string()));
        }
        self
    }

    pub fn skipping(mut self, n: u32) -> Fault {
        self.skip = n;
        self
    }

    pub fn times(mut self, n: u32) -> Fault {
        self.times = n.max(1);
        self
    }
}

/// One request as the endpoint saw it. The bearer token is not kept, only whether it was right.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// One sequence for both endpoints: the order requests arrived in.
    pub seq: i64,
    /// `None` for an ARM request; the scale set's name for a request to its application (an
    /// acceptance check).
    pub app: Option<String>,
    pub at: chrono::DateTime<chrono::Utc>,
    pub method: String,
    pub path: String,
    pub query: String,
    pub if_match: Option<String>,
    pub authorized: bool,
    pub body: Value,
    pub status: u16,
}

/// A scale set as the endpoint holds it now.
#[derive(Debug, Clone)]
pub struct ScaleSetView {
    pub body: Value,
    pub etag: String,
    pub instances: Vec<InstanceView>,
}

impl ScaleSetView {
    pub fn tag(&self, name: &str) -> Option<&str> {
        self.body["tags"][name].as_str()
    }

    pub fn image(&self) -> Option<&str> {
        self.body["properties"]["virtualMachineProfile"]["storageProfile"]["imageReference"]["id"].as_str()
    }
}

struct State {
    world: World,
    conn: Connection,
    faults: VecDeque<Fault>,
    token: String,
    page_size: usize,
    /// The local Kubernetes API's base URL, for AKS clusters' kubeconfigs.
    kube_server: Option<String>,
    /// Changes made to the world, and how many of them are written.
    changes: u64,
    written: u64,
}

/// Something that happened to a scale set, for the progress view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Activity {
    pub scale_set: String,
    pub line: String,
}

/// The local ARM endpoint. Cheap to clone; every clone is the same endpoint.
#[derive(Clone)]
pub struct LocalArm {
    state: Arc<Mutex<State>>,
    config: Arc<ArmSimConfig>,
    activity: tokio::sync::broadcast::Sender<Activity>,
}

/// `image web 1.0.7` for `…/images/web/versions/1.0.7` (and `application …`), else the id.
pub fn short_artifact(id: &str) -> String {
    let parts: Vec<&str> = id.split('/').collect();
    match parts.len() {
        n if n >= 4 && parts[n - 2].eq_ignore_ascii_case("versions") => {
            let kind = if parts[n - 4].eq_ignore_ascii_case("applications") { "application" } else { "image" };
            format!("{kind} {} {}", parts[n - 3], parts[n - 1])
        }
        _ => id.to_string(),
    }
}

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The world is written at most this often (a busy endpoint changes it on every request, and it
/// is one document), by the flusher thread; the last change also by `flush` and on drop.
const SAVE_EVERY: Duration = Duration::from_millis(250);

impl State {
    /// Note a change to the world (the flusher writes it).
    fn save(&mut self) -> Result<()> {
        self.changes += 1;
        Ok(())
    }

    /// Write the world now if a change is not written yet.
    fn write_now(&mut self) -> Result<()> {
        if self.changes > self.written {
            let doc = serde_json::to_string(&self.world)?;
            self.store(self.changes, &doc)?;
        }
        Ok(())
    }

    fn store(&mut self, changes: u64, doc: &str) -> Result<()> {
        self.conn.execute("INSERT INTO world(id, doc) VALUES (1, ?1) ON CONFLICT(id) DO UPDATE SET doc = excluded.doc", [doc])?;
        self.written = changes;
        Ok(())
    }
}

impl Drop for State {
    fn drop(&mut self) {
        let _ = self.write_now();
    }
}

/// Write the world when a change is waiting, until the endpoint is gone. The document is made
/// from a copy outside the lock, so requests do not wait while a large world is serialized; a
/// copy older than what `flush` wrote meanwhile is not written.
fn flusher(state: std::sync::Weak<Mutex<State>>) {
    loop {
        std::thread::sleep(SAVE_EVERY);
        let Some(state) = state.upgrade() else { return };
        let (changes, world) = {
            let s = state.lock().unwrap_or_else(|e| e.into_inner());
            if s.changes == s.written {
                continue;
            }
            (s.changes, s.world.clone())
        };
        let Ok(doc) = serde_json::to_string(&world) else { continue };
        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
        if changes > s.written {
            let _ = s.store(changes, &doc);
        }
    }
}

impl LocalArm {
    /// Open (or create) the endpoint's state in `path`; `token` is the bearer it accepts.
    pub fn open(path: &Path, config: ArmSimConfig, token: &str) -> Result<LocalArm> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let conn = Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS world (id INTEGER PRIMARY KEY CHECK (id = 1), doc TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS requests (seq INTEGER PRIMARY KEY AUTOINCREMENT, at_ms INTEGER NOT NULL, app TEXT,
               method TEXT NOT NULL, path TEXT NOT NULL, query TEXT NOT NULL, if_match TEXT, authorized INTEGER NOT NULL,
               body TEXT NOT NULL, status INTEGER NOT NULL);",
        )?;
        let doc: Option<String> = conn.query_row("SELECT doc FROM world WHERE id = 1", [], |r| r.get(0)).ok();
        let mut world: World = match doc {
            Some(d) => {
                serde_json::from_str(&d).with_context(|| format!("{} is damaged; `deploychain reset` starts over", path.display()))?
            }
            None => World::default(),
        };
        world.timing = Timing {
            operation_ms: ms(config.operation_time),
            upgrade_ms: ms(config.upgrade_time),
            health_delay_ms: ms(config.health_delay),
            bake_ms: 2000,
        };
        world.failing_targets = config.failing_targets.iter().map(|f| f.to_ascii_lowercase()).collect();
        world.failing_checks = config.failing_checks.clone();
        let state = State {
            world,
            conn,
            faults: config.faults.iter().cloned().collect(),
            token: token.to_string(),
            page_size: config.page_size.max(1),
            kube_server: None,
            changes: 0,
            written: 0,
        };
        let (activity, _) = tokio::sync::broadcast::channel(256);
        let state = Arc::new(Mutex::new(state));
        let weak = Arc::downgrade(&state);
        std::thread::Builder::new().name("local-arm-flush".into()).spawn(move || flusher(weak))?;
        Ok(LocalArm { state, config: Arc::new(config), activity })
    }

    /// Write any change not yet written (the stack does before it stops).
    pub fn flush(&self) {
        let _ = self.lock().write_now();
    }

    /// What happens to the scale sets, as it happens.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Activity> {
        self.activity.subscribe()
    }

    fn tell(&self, scale_set: &str, line: String) {
        let _ = self.activity.send(Activity { scale_set: scale_set.to_string(), line });
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The ARM REST operations (serve on the endpoint's port).
    pub fn router(&self) -> axum::Router {
        rest::arm_router(self.clone())
    }

    /// The applications' network: an HTTP proxy for `http://<scale-set>.…/` URLs, and direct
    /// `http://127.0.0.1:PORT/<scale-set>/…` requests.
    pub fn apps_router(&self) -> axum::Router {
        rest::apps_router(self.clone())
    }

    /// Create the scale set `id` from `body` with `instances` instances, unless it exists.
    /// Returns whether it was created.
    pub fn ensure_scale_set(&self, id: &str, body: Value, instances: usize) -> Result<bool> {
        let mut s = self.lock();
        let key = id.to_ascii_lowercase();
        if s.world.scale_sets.contains_key(&key) {
            return Ok(false);
        }
        s.world.scale_sets.insert(key, ScaleSet::new(body, instances, now_ms()));
        s.save()?;
        Ok(true)
    }

    /// Replace (or create) the scale set `id`.
    pub fn put_scale_set(&self, id: &str, body: Value, instances: usize) -> Result<()> {
        let mut s = self.lock();
        s.world.scale_sets.insert(id.to_ascii_lowercase(), ScaleSet::new(body, instances, now_ms()));
        s.save()
    }

    /// A new scale set `id` as the published example answers, on `image` (a gallery image or
    /// image version id), with this stack's upgrade policy for its name.
    pub fn example_scale_set(&self, id: &str, image: &str, tags: Value) -> Result<Value> {
        let example: Value = serde_json::from_str(CREATE_EXAMPLE)?;
        let mut b = example["responses"]["200"]["body"].clone();
        let name = world::name_of(id);
        let lower = name.to_ascii_lowercase();
        let matches = |list: &[String]| list.iter().any(|p| !p.is_empty() && lower.contains(&p.to_ascii_lowercase()));
        let mode = if matches(&self.config.rolling) {
            "Rolling"
        } else if matches(&self.config.automatic) {
            "Automatic"
        } else {
            "Manual"
        };
        b["name"] = name.into();
        b["id"] = id.into();
        b["type"] = "Microsoft.Compute/virtualMachineScaleSets".into();
        b["tags"] = tags;
        b["sku"]["capacity"] = self.config.instances.into();
        b["properties"]["upgradePolicy"]["mode"] = mode.into();
        if mode == "Rolling" {
            b["properties"]["upgradePolicy"]["rollingUpgradePolicy"] = json!({
                "maxBatchInstancePercent": 20, "maxUnhealthyInstancePercent": 20,
                "maxUnhealthyUpgradedInstancePercent": 20, "pauseTimeBetweenBatches": "PT0S"
            });
        }
        b["properties"]["virtualMachineProfile"]["storageProfile"]["imageReference"] = json!({ "id": image });
        b["properties"]["virtualMachineProfile"]["osProfile"]["computerNamePrefix"] = name.into();
        b["properties"]["provisioningState"] = "Succeeded".into();
        b.as_object().ok_or_else(|| anyhow!("the published example has no body"))?;
        Ok(b)
    }

    /// Create every VM scale set target of `policy` that does not exist yet: the published
    /// example, on version `0.0.1` of the app's gallery image — or, for a stage that deploys VM
    /// Applications, on the example's OS image with version `0.0.1` of the app's gallery application.
    /// The app's base image template (what a platform team's IaC creates): an Ubuntu platform
    /// image, one shell customizer, distribution into the app's gallery image definition.
    pub fn ensure_base_template(&self, id: &str, app: &str, destination: &str) -> Result<()> {
        let mut s = self.lock();
        let key = id.to_ascii_lowercase();
        if s.world.templates.contains_key(&key) {
            return Ok(());
        }
        let rg: Vec<&str> = id.split('/').take(5).collect();
        let body = json!({
            "id": id, "name": world::name_of(id), "type": "Microsoft.VirtualMachineImages/imageTemplates", "location": "westus",
            "tags": { "app": app },
            "identity": { "type": "UserAssigned", "userAssignedIdentities": {
                format!("{}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/image-builder", rg.join("/")): {} } },
            "properties": {
                "source": { "type": "PlatformImage", "publisher": "Canonical", "offer": "ubuntu-24_04-lts", "sku": "server", "version": "latest" },
                "customize": [ { "type": "Shell", "name": "install-app", "inline": [ format!("sudo /opt/{app}/install.sh") ] } ],
                "distribute": [ { "type": "SharedImage", "galleryImageId": destination, "runOutputName": app,
                                  "targetRegions": [ { "name": "westus", "replicaCount": 1 } ] } ],
                "vmProfile": { "vmSize": "Standard_D2ds_v5", "osDiskSizeGB": 30 },
                "buildTimeoutInMinutes": 120,
                "provisioningState": "Succeeded"
            }
        });
        s.world.templates.insert(key, world::ImageTemplate { body, outputs: Default::default() });
        s.save()
    }

    pub fn seed_from_policy(&self, policy: &deploychain_functions::policy::Policy) -> Result<Vec<String>> {
        use deploychain_functions::policy::DeployMode;
        let mut created = Vec::new();
        for app in &policy.apps {
            if !app.image.destination.to_ascii_lowercase().contains("/providers/microsoft.compute/galleries/") {
                continue;
            }
            if app.image.source == deploychain_functions::policy::ImageSource::ImageBuilder {
                self.ensure_base_template(&app.image.template_id(&app.name), &app.name, &app.image.destination)?;
            }
            let first = format!("{}/versions/0.0.1", app.image.destination.trim_end_matches('/'));
            for stage in &app.stages {
                let tags = json!({ "app": app.name, "environment": stage.name });
                let body = match stage.deploy {
                    DeployMode::Image => self.example_scale_set(&stage.target, &first, tags)?,
                    DeployMode::VmApplication => {
                        let example: Value = serde_json::from_str(CREATE_EXAMPLE)?;
                        let os =
                            example["responses"]["200"]["body"]["properties"]["virtualMachineProfile"]["storageProfile"]["imageReference"]
                                ["id"]
                                .as_str()
                                .unwrap_or_default()
                                .to_string();
                        let mut b = self.example_scale_set(&stage.target, &os, tags)?;
                        b["properties"]["virtualMachineProfile"]["applicationProfile"] =
                            json!({ "galleryApplications": [{ "packageReferenceId": first, "order": 1 }] });
                        b
                    }
                };
                if self.ensure_scale_set(&stage.target, body, self.config.instances)? {
                    created.push(stage.target.clone());
                }
            }
        }
        Ok(created)
    }

    /// How image template runs behave: how long one takes, the commit prefixes whose bake fails,
    /// and those whose image fails its health probe once deployed.
    pub fn configure_bakes(&self, bake_time: Duration, failing: &[String], unhealthy: &[String]) {
        let mut s = self.lock();
        s.world.timing.bake_ms = ms(bake_time);
        s.world.failing_bakes = failing.iter().map(|f| f.to_ascii_lowercase()).collect();
        s.world.unhealthy_commits = unhealthy.iter().map(|f| f.to_ascii_lowercase()).collect();
    }

    /// Publish a gallery image or application version, as a CI job does (Packer's
    /// `shared_image_gallery_destination`, `az sig gallery-application version create`).
    pub fn publish_version(&self, id: &str, tags: Value, unhealthy: bool) -> Result<()> {
        let mut s = self.lock();
        let kind = if id.to_ascii_lowercase().contains("/applications/") { "applications" } else { "images" };
        let body = json!({
            "id": id, "name": world::name_of(id), "type": format!("Microsoft.Compute/galleries/{kind}/versions"),
            "location": "westus", "tags": tags,
            "properties": { "provisioningState": "Succeeded", "publishingProfile": { "publishedDate": world::rfc3339(now_ms()) } }
        });
        s.world.gallery_versions.insert(id.to_ascii_lowercase(), body);
        if unhealthy {
            s.world.unhealthy_artifacts.push(id.to_ascii_lowercase());
        }
        s.save()
    }

    /// Where AKS clusters' API servers are (the local Kubernetes API).
    pub fn set_kube_server(&self, url: &str) {
        self.lock().kube_server = Some(url.trim_end_matches('/').to_string());
    }

    /// A container image (`repository@digest`) is in registry `id` (as a push would put it).
    pub fn push_image(&self, id: &str, image: &str) -> Result<()> {
        let mut s = self.lock();
        let images = s.world.registry_images.entry(id.to_ascii_lowercase()).or_default();
        if !images.iter().any(|i| i == image) {
            images.push(image.to_string());
        }
        s.save()
    }

    /// Every `importImage` accepted: `{registry, source, sourceImage, mode}`.
    pub fn imports(&self) -> Vec<Value> {
        self.lock().world.imports.clone()
    }

    /// The image templates (resource bodies) the endpoint holds.
    pub fn image_templates(&self) -> Vec<Value> {
        self.lock().world.templates.values().map(|t| t.body.clone()).collect()
    }

    pub fn push_fault(&self, fault: Fault) {
        self.lock().faults.push_back(fault);
    }

    /// Faults pushed (or configured) that have not fired yet.
    pub fn pending_faults(&self) -> usize {
        self.lock().faults.len()
    }

    /// The next rolling upgrade of scale set `id` ends `Faulted` with this ARM error.
    pub fn fault_next_rolling_upgrade(&self, id: &str, code: &str, message: &str) -> Result<()> {
        let mut s = self.lock();
        s.world.fault_next_rolling_upgrade(&id.to_ascii_lowercase(), json!({ "code": code, "message": message }));
        s.save()
    }

    /// Instances running `artifact` (an image or application version id) fail their health probe.
    pub fn mark_unhealthy(&self, artifact: &str) -> Result<()> {
        let mut s = self.lock();
        let a = artifact.to_ascii_lowercase();
        if !s.world.unhealthy_artifacts.contains(&a) {
            s.world.unhealthy_artifacts.push(a);
        }
        s.save()
    }

    /// The application behind scale set `name` fails (or passes again) its acceptance checks.
    pub fn set_failing_checks(&self, name: &str, failing: bool) {
        let mut s = self.lock();
        s.world.failing_checks.retain(|n| !n.eq_ignore_ascii_case(name));
        if failing {
            s.world.failing_checks.push(name.to_string());
        }
    }

    /// The scale sets' names.
    pub fn names(&self) -> Vec<String> {
        self.lock().world.scale_sets.values().map(ScaleSet::name).collect()
    }

    pub fn scale_set(&self, id: &str) -> Option<ScaleSetView> {
        let mut s = self.lock();
        let now = now_ms();
        if s.world.advance(now) {
            let _ = s.save();
        }
        let key = id.to_ascii_lowercase();
        let ss = s.world.scale_sets.get(&key)?;
        Some(ScaleSetView { body: ss.body.clone(), etag: ss.etag(), instances: s.world.instance_views(&key, now) })
    }

    /// Every ARM request so far, oldest first.
    pub fn requests(&self) -> Vec<Request> {
        self.all_requests().into_iter().filter(|r| r.app.is_none()).collect()
    }

    /// Every request so far, ARM's and the applications' (acceptance checks), oldest first. For an
    /// application request `authorized` says whether it carried any `Authorization` header.
    pub fn all_requests(&self) -> Vec<Request> {
        let s = self.lock();
        let Ok(mut st) =
            s.conn.prepare("SELECT seq, app, at_ms, method, path, query, if_match, authorized, body, status FROM requests ORDER BY seq")
        else {
            return Vec::new();
        };
        st.query_map([], |r| {
            Ok(Request {
                seq: r.get(0)?,
                app: r.get(1)?,
                at: chrono::DateTime::from_timestamp_millis(r.get(2)?).unwrap_or_default(),
                method: r.get(3)?,
                path: r.get(4)?,
                query: r.get(5)?,
                if_match: r.get(6)?,
                authorized: r.get::<_, i64>(7)? != 0,
                body: serde_json::from_str(&r.get::<_, String>(8)?).unwrap_or(Value::Null),
                status: r.get::<_, i64>(9)? as u16,
            })
        })
        .map(|rows| rows.filter_map(|r| r.ok()).collect())
        .unwrap_or_default()
    }

    /// Model updates (PATCHes ARM accepted) of scale set `id` that set `deploychain.run` = `run`:
    /// a step's effect, counted.
    pub fn model_updates(&self, id: &str, run: &str) -> usize {
        self.requests()
            .iter()
            .filter(|r| {
                r.method == "PATCH" && r.status < 300 && r.path.eq_ignore_ascii_case(id) && r.body["tags"]["deploychain.run"] == run
            })
            .count()
    }

    fn rolling_example() -> Value {
        serde_json::from_str::<Value>(ROLLING_EXAMPLE).map(|v| v["responses"]["200"]["body"].clone()).unwrap_or(Value::Null)
    }
}

fn log_request(conn: &Connection, r: &Request) {
    let _ = conn.execute(
        "INSERT INTO requests(app, at_ms, method, path, query, if_match, authorized, body, status) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![r.app, r.at.timestamp_millis(), r.method, r.path, r.query, r.if_match, r.authorized as i64, r.body.to_string(), r.status as i64],
    );
}
