//! `ArmCompute` against a small ARM stub on 127.0.0.1:0 (axum), built from the published ARM spec
//! examples in `tests/fixtures/arm-compute/` (names, ids, tags, image fields, upgrade mode and
//! status codes patched; `location` pointed at the stub). The set has no published example for the
//! instance list, an instance view's `vmHealth` or an operation status, so those bodies are written
//! here in the REST reference's shapes.
//!
//! The stub keeps one scale set and its instances: a model PATCH (checked against `If-Match`) puts
//! every instance behind the model (Manual), starts a rolling upgrade (Rolling) or upgrades every
//! instance (Automatic); `manualUpgrade` brings instances to the model when its operation ends;
//! instances running a "bad" artifact report `HealthState/unhealthy`. Scripted faults answer chosen
//! requests once (429, 500, 403, …). Every request is logged with its time.
#![allow(clippy::unwrap_used)]

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use deploychain_events::{ImageKind, ImageRef};
use deploychain_functions::adapters::arm::{ArmCompute, ArmOptions, RetryPolicy, StaticToken};
use deploychain_functions::adapters::{Compute, DeployOutcome, DeployRequest};
use deploychain_functions::config::Secret;
use deploychain_functions::policy::{Check, DeployMode};
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TOKEN: &str = "stub-bearer-token-value-3f9c";
const SUB: &str = "00000000-0000-0000-0000-000000000000";
const VMSS: &str = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg-web/providers/Microsoft.Compute/virtualMachineScaleSets/web-staging";
const IMAGE: &str = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg-images/providers/Microsoft.Compute/galleries/deploychain/images/web/versions/";
const RUN_OLD: &str = "web-1111111111aa";
const RUN: &str = "web-2222222222bb";

fn fixture(name: &str) -> Value {
    let path = format!("{}/../tests/fixtures/arm-compute/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn image(version: &str) -> String {
    format!("{IMAGE}{version}")
}

// ------------------------------------------------------------------ the stub

#[derive(Debug, Clone)]
struct Logged {
    at: Instant,
    method: String,
    path: String,
    query: String,
    if_match: Option<String>,
    auth: Option<String>,
    body: Value,
}

#[derive(Debug, Clone)]
struct Vm {
    id: String,
    latest: bool,
    /// The model the instance runs (its image reference and applications, as JSON text).
    runs: String,
}

#[derive(Debug, Clone)]
enum Effect {
    ModelUpdate,
    Upgrade(Vec<String>),
}

#[derive(Debug, Clone)]
struct Op {
    polls_left: u32,
    status: &'static str,
    error: Option<Value>,
    effect: Effect,
}

#[derive(Debug, Clone)]
struct Rolling {
    start: String,
    polls_left: u32,
    end: &'static str,
    done: bool,
}

/// An answer given once to the first request that matches.
#[derive(Debug, Clone)]
struct Fault {
    method: &'static str,
    path_ends: &'static str,
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Value,
    /// Before answering normally: another writer changes the scale set (its ETag moves).
    concurrent_write: bool,
    /// Matching requests to let through first.
    skip: u32,
}

impl Fault {
    fn answer(method: &'static str, path_ends: &'static str, status: u16, body: Value) -> Fault {
        Fault { method, path_ends, status, headers: Vec::new(), body, concurrent_write: false, skip: 0 }
    }
}

struct World {
    vmss: Value,
    etag: u32,
    vms: Vec<Vm>,
    bad: HashSet<String>,
    ops: HashMap<String, Op>,
    next_op: u32,
    rolling: Option<Rolling>,
    faults: VecDeque<Fault>,
    /// The next model update's operation ends `Failed` with this error.
    fail_model_update: Option<Value>,
    /// The next rolling upgrade ends with this code (the ones after it complete).
    rolling_end: &'static str,
    check_status: u16,
    log: Vec<Logged>,
}

#[derive(Clone)]
struct Stub {
    world: Arc<Mutex<World>>,
    base: String,
}

impl Stub {
    async fn start(vmss: Value, instances: usize) -> Stub {
        let runs = model_of(&vmss);
        let world = World {
            vmss,
            etag: 1,
            vms: (0..instances).map(|i| Vm { id: i.to_string(), latest: true, runs: runs.clone() }).collect(),
            bad: HashSet::new(),
            ops: HashMap::new(),
            next_op: 0,
            rolling: None,
            faults: VecDeque::new(),
            fail_model_update: None,
            rolling_end: "Completed",
            check_status: 200,
            log: Vec::new(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let stub = Stub { world: Arc::new(Mutex::new(world)), base };
        let app = Router::new().fallback(handle).with_state(stub.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        stub
    }

    fn with<T>(&self, f: impl FnOnce(&mut World) -> T) -> T {
        f(&mut self.world.lock().unwrap())
    }

    fn log(&self) -> Vec<Logged> {
        self.with(|w| w.log.clone())
    }

    fn tags(&self) -> Value {
        self.with(|w| w.vmss["tags"].clone())
    }

    fn compute(&self) -> ArmCompute {
        let options = ArmOptions {
            poll_interval: Duration::from_millis(10),
            health_timeout: Duration::from_millis(300),
            operation_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            retry: RetryPolicy { max_attempts: 4, base: Duration::from_millis(10), max_wait: Duration::from_secs(5) },
            max_conflicts: 3,
            ..ArmOptions::new(self.base.parse().unwrap())
        };
        ArmCompute::new(options, Arc::new(StaticToken::new(Secret::new(TOKEN)))).unwrap()
    }

    fn check(&self) -> Check {
        Check {
            retries: 1,
            interval: "10ms".into(),
            timeout: "1s".into(),
            ..Check::http(format!("{}/app/healthz?code=check-key", self.base))
        }
    }
}

fn model_of(vmss: &Value) -> String {
    let p = &vmss["properties"]["virtualMachineProfile"];
    json!([p["storageProfile"]["imageReference"], p["applicationProfile"]]).to_string()
}

/// ARM's PATCH: objects merge, everything else (arrays, `tags` as a whole) is replaced.
fn merge(into: &mut Value, patch: &Value) {
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

fn arm_error(status: u16, code: &str, message: &str) -> Response {
    (StatusCode::from_u16(status).unwrap(), axum::Json(json!({ "error": { "code": code, "message": message } }))).into_response()
}

fn json_answer(status: u16, headers: Vec<(&str, String)>, body: Value) -> Response {
    let mut r = (StatusCode::from_u16(status).unwrap(), axum::Json(body)).into_response();
    for (k, v) in headers {
        r.headers_mut().insert(axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
    }
    r
}

fn etag_of(n: u32) -> String {
    format!("\"{n}\"")
}

async fn handle(State(stub): State<Stub>, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
    let path = uri.path().to_string();
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let mut w = stub.world.lock().unwrap();
    w.log.push(Logged {
        at: Instant::now(),
        method: method.to_string(),
        path: path.clone(),
        query: uri.query().unwrap_or_default().to_string(),
        if_match: h("if-match"),
        auth: h("authorization"),
        body: body.clone(),
    });

    if path == "/app/healthz" {
        return (StatusCode::from_u16(w.check_status).unwrap(), if w.check_status == 200 { "ok" } else { "starting" }).into_response();
    }
    if h("authorization").as_deref() != Some(&format!("Bearer {TOKEN}")) {
        return arm_error(401, "AuthenticationFailed", "no or wrong bearer token");
    }
    if let Some(i) = w.faults.iter().position(|f| f.method == method.as_str() && path.ends_with(f.path_ends))
        && std::mem::replace(&mut w.faults[i].skip, 0) == 0
    {
        let f = w.faults.remove(i).unwrap();
        if f.concurrent_write {
            w.etag += 1;
            let etag = etag_of(w.etag);
            w.vmss["etag"] = etag.into();
            w.vmss["tags"]["owner"] = "changed-concurrently".into();
        } else {
            return json_answer(f.status, f.headers, f.body);
        }
    }

    let base = stub.base.clone();
    let sub_path = path.strip_prefix(VMSS).map(str::to_string);
    match (method.as_str(), sub_path.as_deref()) {
        ("GET", Some("")) => {
            assert_eq!(uri.query(), Some("api-version=2024-07-01"));
            let etag = etag_of(w.etag);
            let mut b = w.vmss.clone();
            b["etag"] = etag.clone().into();
            json_answer(200, vec![("etag", etag)], b)
        }
        ("PATCH", Some("")) => {
            if h("if-match") != Some(etag_of(w.etag)) {
                return arm_error(412, "PreconditionFailed", "The condition specified using HTTP conditional header(s) is not met.");
            }
            let before = model_of(&w.vmss);
            merge(&mut w.vmss, &body);
            let after = model_of(&w.vmss);
            w.etag += 1;
            w.vmss["properties"]["provisioningState"] = "Updating".into();
            if before != after {
                match w.vmss["properties"]["upgradePolicy"]["mode"].as_str().unwrap_or("Manual") {
                    "Rolling" => {
                        let n = w.next_op;
                        let end = std::mem::replace(&mut w.rolling_end, "Completed");
                        w.rolling = Some(Rolling { start: format!("2026-11-22T12:00:{n:02}.000Z"), polls_left: 2, end, done: false });
                        w.vms.iter_mut().for_each(|v| v.latest = false);
                    }
                    "Automatic" => w.vms.iter_mut().for_each(|v| {
                        v.latest = true;
                        v.runs = after.clone();
                    }),
                    _ => w.vms.iter_mut().for_each(|v| v.latest = false),
                }
            }
            w.next_op += 1;
            let id = format!("op-{}", w.next_op);
            let (status, error) = match w.fail_model_update.take() {
                Some(e) => ("Failed", Some(e)),
                None => ("Succeeded", None),
            };
            w.ops.insert(id.clone(), Op { polls_left: 1, status, error, effect: Effect::ModelUpdate });
            let op =
                format!("{base}/subscriptions/{SUB}/providers/Microsoft.Compute/locations/westus/operations/{id}?api-version=2024-07-01");
            let mut b = w.vmss.clone();
            b["etag"] = etag_of(w.etag).into();
            json_answer(200, vec![("azure-asyncoperation", op), ("etag", etag_of(w.etag))], b)
        }
        ("GET", Some("/virtualMachines")) => {
            // Two instances a page, so `nextLink` is followed.
            let page: usize =
                uri.query().and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("page="))).and_then(|p| p.parse().ok()).unwrap_or(0);
            let vms: Vec<Value> = w
                .vms
                .iter()
                .skip(page * 2)
                .take(2)
                .map(|v| {
                    json!({ "instanceId": v.id, "name": format!("web-staging_{}", v.id), "id": format!("{VMSS}/virtualMachines/{}", v.id),
                            "properties": { "latestModelApplied": v.latest, "provisioningState": "Succeeded" } })
                })
                .collect();
            let mut b = json!({ "value": vms });
            if w.vms.len() > (page + 1) * 2 {
                b["nextLink"] = format!("{base}{VMSS}/virtualMachines?api-version=2024-07-01&page={}", page + 1).into();
            }
            json_answer(200, vec![], b)
        }
        ("POST", Some("/manualUpgrade")) => {
            let ids: Vec<String> = body["instanceIds"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
            w.next_op += 1;
            let id = format!("op-{}", w.next_op);
            w.ops.insert(id.clone(), Op { polls_left: 1, status: "Succeeded", error: None, effect: Effect::Upgrade(ids) });
            // The published 202 answer, its `location` pointed at the stub.
            let fx = fixture("VirtualMachineScaleSet_UpdateInstances_MinimumSet_Gen.json");
            let location = fx["responses"]["202"]["headers"]["location"].as_str().unwrap().replace("https://foo.com", &base);
            (StatusCode::ACCEPTED, [("location", format!("{location}/{id}"))]).into_response()
        }
        ("GET", Some(p)) if p.starts_with("/virtualMachines/") && p.ends_with("/instanceView") => {
            let id = p.trim_start_matches("/virtualMachines/").trim_end_matches("/instanceView");
            let Some(vm) = w.vms.iter().find(|v| v.id == id) else { return arm_error(404, "NotFound", "no such instance") };
            let health = if w.bad.iter().any(|b| vm.runs.contains(b.as_str())) { "HealthState/unhealthy" } else { "HealthState/healthy" };
            json_answer(
                200,
                vec![],
                json!({ "vmHealth": { "status": { "code": health, "level": "Info", "displayStatus": health } },
                        "statuses": [ { "code": "ProvisioningState/succeeded", "level": "Info", "displayStatus": "Provisioning succeeded" },
                                      { "code": "PowerState/running", "level": "Info", "displayStatus": "VM running" } ] }),
            )
        }
        ("GET", Some("/rollingUpgrades/latest")) => {
            let model = model_of(&w.vmss);
            let Some(r) = w.rolling.as_mut() else {
                return arm_error(404, "NotFound", "The entity was not found.");
            };
            let code = if r.polls_left > 0 {
                r.polls_left -= 1;
                "RollingForward"
            } else {
                r.end
            };
            let (start, finished) = (r.start.clone(), code != "RollingForward" && !r.done);
            if finished {
                r.done = true;
                if code == "Completed" {
                    w.vms.iter_mut().for_each(|v| {
                        v.latest = true;
                        v.runs = model.clone();
                    });
                }
            }
            let mut b = fixture("VirtualMachineScaleSetRollingUpgrade_GetLatest_MaximumSet_Gen.json")["responses"]["200"]["body"].clone();
            b["id"] = format!("{VMSS}/rollingUpgrades/latest").into();
            b["name"] = "latest".into();
            b["properties"]["runningStatus"]["code"] = code.into();
            b["properties"]["runningStatus"]["startTime"] = start.into();
            if code == "Faulted" {
                b["properties"]["error"]["code"] = "MaxUnhealthyInstancePercentExceededInRollingUpgrade".into();
                b["properties"]["error"]["message"] = "Rolling upgrade stopped: too many unhealthy instances".into();
            } else {
                b["properties"].as_object_mut().unwrap().remove("error");
            }
            json_answer(200, vec![], b)
        }
        ("GET", _) if path.contains("/operations/") || path.starts_with("/operationstatus/") => {
            let id = path.rsplit('/').next().unwrap().to_string();
            let Some(op) = w.ops.get_mut(&id) else { return arm_error(404, "NotFound", "no such operation") };
            if op.polls_left > 0 {
                op.polls_left -= 1;
                return if path.starts_with("/operationstatus/") {
                    StatusCode::ACCEPTED.into_response()
                } else {
                    json_answer(200, vec![], json!({ "name": id, "status": "InProgress", "startTime": "2026-11-22T12:00:00Z" }))
                };
            }
            let op = w.ops.remove(&id).unwrap();
            match &op.effect {
                Effect::ModelUpdate => {
                    w.vmss["properties"]["provisioningState"] = if op.status == "Succeeded" { "Succeeded" } else { "Failed" }.into();
                }
                Effect::Upgrade(ids) => {
                    let model = model_of(&w.vmss);
                    w.vms.iter_mut().filter(|v| ids.contains(&v.id)).for_each(|v| {
                        v.latest = true;
                        v.runs = model.clone();
                    });
                }
            }
            if path.starts_with("/operationstatus/") {
                return StatusCode::OK.into_response();
            }
            let mut b = json!({ "name": id, "status": op.status, "startTime": "2026-11-22T12:00:00Z", "endTime": "2026-11-22T12:00:05Z" });
            if let Some(e) = op.error {
                b["error"] = e;
            }
            json_answer(200, vec![], b)
        }
        _ => arm_error(404, "NotFound", &format!("the stub has no {method} {path}")),
    }
}

// ------------------------------------------------------------------ scale sets from the published examples

/// A Manual-policy scale set on a gallery image, from the published "create from a generalized
/// shared image" answer: name, id and tags set, the image reference pointed at a version.
fn manual_scale_set(version: &str, tags: Value) -> Value {
    let mut b = fixture("VirtualMachineScaleSet_Create_FromAGeneralizedSharedImage.json")["responses"]["200"]["body"].clone();
    assert_eq!(b["properties"]["upgradePolicy"]["mode"], "Manual");
    b["name"] = "web-staging".into();
    b["id"] = VMSS.into();
    b["tags"] = tags;
    b["properties"]["virtualMachineProfile"]["storageProfile"]["imageReference"]["id"] = image(version).into();
    b["properties"]["provisioningState"] = "Succeeded".into();
    b
}

fn deployed_by(run: &str, sequence: i64, version: &str) -> Value {
    json!({ "owner": "team-web", "deploychain.run": run, "deploychain.sequence": sequence.to_string(), "deploychain.artifact": image(version) })
}

fn request(stub: &Stub, version: &str, sequence: i64, batch_size: u32) -> DeployRequest {
    DeployRequest {
        run_id: RUN.into(),
        sequence,
        app: "web".into(),
        stage: "staging".into(),
        target: VMSS.into(),
        image: ImageRef { kind: ImageKind::GalleryImageVersion, id: image(version), version: Some(version.into()), digest: None },
        mode: DeployMode::Image,
        batch_size,
        checks: vec![stub.check()],
    }
}

/// The rollout's story: writes, health polls and checks, consecutive repeats merged.
fn story(log: &[Logged]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for l in log {
        let line = match (l.method.as_str(), l.path.strip_prefix(VMSS)) {
            ("PATCH", Some("")) => "PATCH model".to_string(),
            ("POST", Some("/manualUpgrade")) => format!(
                "upgrade {}",
                l.body["instanceIds"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect::<Vec<_>>().join(",")
            ),
            ("GET", Some(p)) if p.ends_with("/instanceView") => format!("health {}", p.split('/').nth(2).unwrap()),
            ("GET", Some("/rollingUpgrades/latest")) => "rolling upgrade".to_string(),
            ("GET", None) if l.path == "/app/healthz" => "check".to_string(),
            _ => continue,
        };
        if out.last() != Some(&line) {
            out.push(line);
        }
    }
    out
}

fn writes(log: &[Logged]) -> Vec<&Logged> {
    log.iter().filter(|l| l.method == "PATCH" || l.method == "POST" || l.method == "PUT" || l.method == "DELETE").collect()
}

/// Every JSON path (objects only) of `v`, as `a.b.c`.
fn paths(v: &Value, prefix: &str, out: &mut Vec<String>) {
    if let Value::Object(m) = v {
        for (k, x) in m {
            let p = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
            if x.is_object() && !x.as_object().unwrap().is_empty() && !(prefix.is_empty() && k == "tags") {
                paths(x, &p, out);
            } else {
                out.push(p);
            }
        }
    }
}

// ------------------------------------------------------------------ behaviours

#[tokio::test]
async fn manual_rollout_upgrades_in_batches_behind_the_health_gate() {
    let stub = Stub::start(manual_scale_set("1.0.1", deployed_by(RUN_OLD, 1, "1.0.1")), 3).await;
    let outcome = stub.compute().deploy(&request(&stub, "1.0.2", 2, 2)).await.unwrap();
    assert_eq!(outcome, DeployOutcome::Succeeded);

    let log = stub.log();
    // Read first, then one conditional PATCH with the ETag just read and exactly this body.
    assert_eq!((log[0].method.as_str(), log[0].path.as_str()), ("GET", VMSS));
    let patches: Vec<&Logged> = log.iter().filter(|l| l.method == "PATCH").collect();
    assert_eq!(patches.len(), 1);
    assert_eq!(patches[0].if_match.as_deref(), Some("\"1\""));
    assert_eq!(patches[0].query, "api-version=2024-07-01");
    assert_eq!(
        patches[0].body,
        json!({
            "tags": { "owner": "team-web", "deploychain.run": RUN, "deploychain.sequence": "2", "deploychain.artifact": image("1.0.2"),
                      "deploychain.app": "web", "deploychain.stage": "staging", "deploychain.previous.run": RUN_OLD,
                      "deploychain.previous.sequence": "1", "deploychain.previous.artifact": image("1.0.1") },
            "properties": { "virtualMachineProfile": { "storageProfile": { "imageReference": { "id": image("1.0.2") } } } }
        })
    );
    // Every field the PATCH sends is one the published PATCH example sends.
    let published = fixture("VirtualMachineScaleSet_Update_MaximumSet_Gen.json")["parameters"]["parameters"].clone();
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    paths(&patches[0].body, "", &mut ours);
    paths(&published, "", &mut theirs);
    for p in &ours {
        assert!(theirs.contains(p), "{p} is not in the published PATCH body ({theirs:?})");
    }
    // manualUpgrade has the published request shape.
    let upgrade_body = &writes(&log).iter().find(|l| l.method == "POST").unwrap().body;
    let published = &fixture("VirtualMachineScaleSet_UpdateInstances_MinimumSet_Gen.json")["parameters"]["vmInstanceIDs"];
    assert_eq!(upgrade_body.as_object().unwrap().keys().collect::<Vec<_>>(), published.as_object().unwrap().keys().collect::<Vec<_>>());

    // Two instances, gated and checked, then the third.
    assert_eq!(story(&log), ["PATCH model", "upgrade 0,1", "health 0", "health 1", "check", "upgrade 2", "health 2", "check"]);
    // The instance list has two pages: the `nextLink` was followed.
    assert!(log.iter().any(|l| l.path.ends_with("/virtualMachines") && l.query.contains("page=1")));
    // Every ARM request carried the bearer token; the checks never did.
    for l in &log {
        if l.path == "/app/healthz" {
            assert_eq!(l.auth, None);
            assert_eq!(l.query, "code=check-key");
        } else {
            assert_eq!(l.auth.as_deref(), Some(format!("Bearer {TOKEN}").as_str()), "{} {}", l.method, l.path);
        }
    }
    let tags = stub.tags();
    assert_eq!((tags["deploychain.run"].as_str(), tags["deploychain.artifact"].as_str()), (Some(RUN), Some(image("1.0.2").as_str())));
    assert!(stub.with(|w| w.vms.iter().all(|v| v.latest)));
}

#[tokio::test]
async fn rolling_policy_waits_for_the_rolling_upgrade_then_gates() {
    let mut vmss = manual_scale_set("1.0.1", deployed_by(RUN_OLD, 1, "1.0.1"));
    vmss["properties"]["upgradePolicy"]["mode"] = "Rolling".into();
    let stub = Stub::start(vmss, 2).await;
    // The previous rollout's upgrade is the latest one until the PATCH starts a new one.
    stub.with(|w| {
        w.rolling = Some(Rolling { start: "2026-11-21T09:00:00.000Z".into(), polls_left: 0, end: "Completed", done: true });
    });
    let outcome = stub.compute().deploy(&request(&stub, "1.0.2", 2, 1)).await.unwrap();
    assert_eq!(outcome, DeployOutcome::Succeeded);
    let log = stub.log();
    assert_eq!(story(&log), ["rolling upgrade", "PATCH model", "rolling upgrade", "health 0", "health 1", "check"]);
    assert!(!log.iter().any(|l| l.path.ends_with("/manualUpgrade")), "a rolling scale set is not upgraded by hand");
    // The old Completed upgrade did not count: the new one was polled until it completed.
    assert!(log.iter().filter(|l| l.path.ends_with("/rollingUpgrades/latest")).count() >= 4);
}

#[tokio::test]
async fn a_faulted_rolling_upgrade_rolls_back() {
    let mut vmss = manual_scale_set("1.0.1", deployed_by(RUN_OLD, 1, "1.0.1"));
    vmss["properties"]["upgradePolicy"]["mode"] = "Rolling".into();
    let stub = Stub::start(vmss, 2).await;
    stub.with(|w| w.rolling_end = "Faulted");
    let outcome = stub.compute().deploy(&request(&stub, "1.0.2", 2, 1)).await.unwrap();
    let DeployOutcome::RolledBack { reason, restored } = outcome else { panic!("{outcome:?}") };
    assert!(reason.contains("Faulted") && reason.contains("MaxUnhealthyInstancePercentExceededInRollingUpgrade"), "{reason}");
    assert_eq!(restored.map(|r| r.id), Some(image("1.0.1")));
    assert_eq!(stub.tags()["deploychain.rolledback"], RUN);
}

#[tokio::test]
async fn redeploying_the_same_run_and_artifact_writes_nothing() {
    let stub = Stub::start(manual_scale_set("1.0.2", deployed_by(RUN, 2, "1.0.2")), 3).await;
    let outcome = stub.compute().deploy(&request(&stub, "1.0.2", 2, 1)).await.unwrap();
    assert_eq!(outcome, DeployOutcome::Succeeded);
    let log = stub.log();
    assert!(writes(&log).is_empty(), "wrote: {:?}", writes(&log).iter().map(|l| format!("{} {}", l.method, l.path)).collect::<Vec<_>>());
    // It still made sure the instances are on the model and healthy, and the checks pass.
    assert_eq!(story(&log), ["health 0", "health 1", "health 2", "check"]);
}

#[tokio::test]
async fn a_redelivered_rollout_resumes_without_repeating_the_model_update() {
    let stub = Stub::start(manual_scale_set("1.0.1", deployed_by(RUN_OLD, 1, "1.0.1")), 3).await;
    // ARM is unavailable when the second batch is upgraded, for longer than the retries last.
    stub.with(|w| {
        for n in 0..4 {
            let body = json!({ "error": { "code": "ServiceUnavailable", "message": "try later" } });
            w.faults.push_back(Fault { skip: if n == 0 { 1 } else { 0 }, ..Fault::answer("POST", "/manualUpgrade", 503, body) });
        }
    });
    let compute = stub.compute();
    let req = request(&stub, "1.0.2", 2, 1);
    let err = compute.deploy(&req).await.unwrap_err();
    assert!(err.is_transient() && err.to_string().contains("ServiceUnavailable"), "{err}");
    assert_eq!(stub.with(|w| w.vms.iter().filter(|v| v.latest).count()), 1, "one batch done");

    // The message is redelivered: the tags say this run's model is in place, so the rollout goes on.
    let before = stub.log().len();
    assert_eq!(compute.deploy(&req).await.unwrap(), DeployOutcome::Succeeded);
    let log = stub.log();
    assert_eq!(story(&log[before..]), ["upgrade 1", "health 1", "check", "upgrade 2", "health 2", "check"]);
    assert!(!log[before..].iter().any(|l| l.method == "PATCH"), "the model update is not repeated");
    assert_eq!(stub.tags()["deploychain.previous.artifact"], image("1.0.1"), "a later rollback still knows where to go");
}

#[tokio::test]
async fn an_older_run_is_refused_as_stale_without_writing() {
    let stub = Stub::start(manual_scale_set("1.0.5", deployed_by("web-5555555555ee", 5, "1.0.5")), 2).await;
    let outcome = stub.compute().deploy(&request(&stub, "1.0.2", 2, 1)).await.unwrap();
    let DeployOutcome::Stale { reason } = outcome else { panic!("{outcome:?}") };
    assert!(reason.contains("web-5555555555ee") && reason.contains("5 > 2"), "{reason}");
    let log = stub.log();
    assert!(writes(&log).is_empty());
    assert_eq!(log.len(), 1, "only the scale set was read");
}

#[tokio::test]
async fn a_412_rereads_the_scale_set_and_retries_with_the_fresh_etag() {
    let stub = Stub::start(manual_scale_set("1.0.1", deployed_by(RUN_OLD, 1, "1.0.1")), 1).await;
    // Between our GET and our PATCH another writer changes the scale set.
    stub.with(|w| w.faults.push_back(Fault { concurrent_write: true, ..Fault::answer("PATCH", "web-staging", 0, Value::Null) }));
    let outcome = stub.compute().deploy(&request(&stub, "1.0.2", 2, 1)).await.unwrap();
    assert_eq!(outcome, DeployOutcome::Succeeded);
    let log = stub.log();
    let model: Vec<&Logged> = log.iter().filter(|l| l.path == VMSS).collect();
    let kinds: Vec<&str> = model.iter().map(|l| l.method.as_str()).collect();
    assert_eq!(&kinds[..4], ["GET", "PATCH", "GET", "PATCH"]);
    assert_eq!(model[1].if_match.as_deref(), Some("\"1\""));
    assert_eq!(model[3].if_match.as_deref(), Some("\"2\""), "the second PATCH uses the ETag of the second read");
    // The other writer's change is kept: the PATCH was rebuilt from the fresh read.
    assert_eq!(model[3].body["tags"]["owner"], "changed-concurrently");
}

#[tokio::test]
async fn throttling_and_server_errors_are_retried_honouring_retry_after() {
    let stub = Stub::start(manual_scale_set("1.0.1", deployed_by(RUN_OLD, 1, "1.0.1")), 1).await;
    stub.with(|w| {
        w.faults.push_back(Fault {
            headers: vec![("retry-after", "1".into())],
            ..Fault::answer("GET", "web-staging", 429, json!({ "error": { "code": "TooManyRequests", "message": "throttled" } }))
        });
        w.faults.push_back(Fault {
            headers: vec![("x-ms-retry-after-ms", "150".into())],
            ..Fault::answer("GET", "web-staging", 500, json!({ "error": { "code": "InternalServerError", "message": "oops" } }))
        });
        w.faults.push_back(Fault::answer(
            "POST",
            "/manualUpgrade",
            503,
            json!({ "error": { "code": "ServiceUnavailable", "message": "busy" } }),
        ));
    });
    let outcome = stub.compute().deploy(&request(&stub, "1.0.2", 2, 1)).await.unwrap();
    assert_eq!(outcome, DeployOutcome::Succeeded);
    let log = stub.log();
    let gets: Vec<&Logged> = log.iter().filter(|l| l.method == "GET" && l.path == VMSS).collect();
    assert!(gets.len() >= 3);
    let first_wait = gets[1].at - gets[0].at;
    let second_wait = gets[2].at - gets[1].at;
    assert!(first_wait >= Duration::from_secs(1), "Retry-After: 1 honoured, waited {first_wait:?}");
    assert!(second_wait >= Duration::from_millis(150), "x-ms-retry-after-ms: 150 honoured, waited {second_wait:?}");
    assert_eq!(log.iter().filter(|l| l.path.ends_with("/manualUpgrade")).count(), 2, "the 503 was retried");
}

#[tokio::test]
async fn a_model_update_that_ends_failed_reports_arm_error_and_rolls_back() {
    let stub = Stub::start(manual_scale_set("1.0.1", deployed_by(RUN_OLD, 1, "1.0.1")), 2).await;
    stub.with(|w| {
        w.fail_model_update =
            Some(json!({ "code": "GalleryImageNotFound", "message": "The gallery image version 1.0.2 is not replicated to westus." }))
    });
    let outcome = stub.compute().deploy(&request(&stub, "1.0.2", 2, 1)).await.unwrap();
    let DeployOutcome::RolledBack { reason, restored } = outcome else { panic!("{outcome:?}") };
    assert!(reason.contains("GalleryImageNotFound") && reason.contains("not replicated to westus"), "{reason}");
    assert!(reason.contains("Failed"), "{reason}");
    assert_eq!(restored.map(|r| r.id), Some(image("1.0.1")));
    let log = stub.log();
    let patches: Vec<&Logged> = log.iter().filter(|l| l.method == "PATCH").collect();
    assert_eq!(patches.len(), 2);
    assert_eq!(patches[1].body["properties"]["virtualMachineProfile"]["storageProfile"]["imageReference"]["id"], image("1.0.1"));
    assert!(!log.iter().any(|l| l.path == "/app/healthz"), "no checks after a failed model update");
}

#[tokio::test]
async fn an_unhealthy_instance_rolls_back_to_the_previous_image() {
    let stub = Stub::start(manual_scale_set("1.0.1", deployed_by(RUN_OLD, 1, "1.0.1")), 3).await;
    stub.with(|w| {
        w.bad.insert(image("1.0.3"));
    });
    let compute = stub.compute();
    let req = request(&stub, "1.0.3", 3, 2);
    let started = Instant::now();
    let outcome = compute.deploy(&req).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(3));
    let DeployOutcome::RolledBack { reason, restored } = outcome else { panic!("{outcome:?}") };
    assert!(reason.contains("batch 1 of 2") && reason.contains("web-staging_0 is HealthState/unhealthy"), "{reason}");
    assert_eq!(
        restored,
        Some(ImageRef { kind: ImageKind::GalleryImageVersion, id: image("1.0.1"), version: Some("1.0.1".into()), digest: None })
    );

    let log = stub.log();
    let model: Vec<&Logged> = log.iter().filter(|l| l.path == VMSS).collect();
    let rollback = model.iter().filter(|l| l.method == "PATCH").nth(1).unwrap();
    // The rollback read the scale set again and PATCHed with that fresh ETag.
    let read_before = model.iter().take_while(|l| !std::ptr::eq(**l, *rollback)).filter(|l| l.method == "GET").last().unwrap();
    assert_eq!(rollback.if_match.as_deref(), Some("\"2\""));
    assert!(read_before.at <= rollback.at);
    assert_eq!(rollback.body["properties"]["virtualMachineProfile"]["storageProfile"]["imageReference"]["id"], image("1.0.1"));
    assert_eq!(rollback.body["tags"]["deploychain.run"], RUN_OLD);
    assert_eq!(rollback.body["tags"]["deploychain.sequence"], "1");
    assert_eq!(rollback.body["tags"]["deploychain.artifact"], image("1.0.1"));
    assert_eq!(rollback.body["tags"]["deploychain.rolledback"], RUN);
    assert_eq!(rollback.body["tags"]["owner"], "team-web");
    // The second batch was never started; the rolled-back instances were brought back to the model.
    assert_eq!(story(&log).iter().filter(|s| s.starts_with("upgrade")).cloned().collect::<Vec<_>>(), ["upgrade 0,1", "upgrade 0,1,2"]);
    assert!(stub.with(|w| w.vms.iter().all(|v| v.latest && v.runs.contains(&image("1.0.1")))));
    assert!(!log.iter().any(|l| l.path == "/app/healthz"), "no checks for an unhealthy batch");

    // Delivered again, the same rollout answers the same without touching the scale set.
    let before = stub.log().len();
    let again = compute.deploy(&req).await.unwrap();
    assert!(matches!(again, DeployOutcome::RolledBack { restored: Some(ref r), .. } if r.id == image("1.0.1")), "{again:?}");
    assert!(writes(&stub.log()[before..]).is_empty());
}

#[tokio::test]
async fn a_failing_acceptance_check_rolls_back() {
    let stub = Stub::start(manual_scale_set("1.0.1", deployed_by(RUN_OLD, 1, "1.0.1")), 2).await;
    stub.with(|w| w.check_status = 503);
    let outcome = stub.compute().deploy(&request(&stub, "1.0.2", 2, 2)).await.unwrap();
    let DeployOutcome::RolledBack { reason, restored } = outcome else { panic!("{outcome:?}") };
    assert!(
        reason.contains("acceptance check") && reason.contains("answered 503, expected 200") && reason.contains("2 attempts"),
        "{reason}"
    );
    assert!(!reason.contains("check-key"), "the check URL's query is not shown: {reason}");
    assert_eq!(restored.map(|r| r.id), Some(image("1.0.1")));
    let log = stub.log();
    assert_eq!(log.iter().filter(|l| l.path == "/app/healthz").count(), 2, "first try and one retry");
    assert_eq!(stub.tags()["deploychain.artifact"], image("1.0.1"));
    assert_eq!(stub.tags()["deploychain.rolledback"], RUN);
}

#[tokio::test]
async fn a_failed_rollback_is_failed_naming_both_failures() {
    let stub = Stub::start(manual_scale_set("1.0.1", deployed_by(RUN_OLD, 1, "1.0.1")), 1).await;
    stub.with(|w| {
        w.bad.insert(image("1.0.3"));
    });
    let compute = stub.compute();
    // Let the deploy PATCH through, then refuse the rollback's.
    let task = tokio::spawn({
        let stub = stub.clone();
        async move {
            loop {
                if stub.with(|w| w.log.iter().any(|l| l.method == "POST")) {
                    stub.with(|w| {
                        w.faults.push_back(Fault::answer(
                            "PATCH",
                            "web-staging",
                            400,
                            json!({ "error": { "code": "InvalidParameter", "message": "Image 1.0.1 was deleted." } }),
                        ))
                    });
                    return;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    });
    let outcome = compute.deploy(&request(&stub, "1.0.3", 3, 1)).await.unwrap();
    task.await.unwrap();
    let DeployOutcome::Failed { reason } = outcome else { panic!("{outcome:?}") };
    assert!(
        reason.contains("HealthState/unhealthy") && reason.contains("rollback failed") && reason.contains("InvalidParameter"),
        "{reason}"
    );
}

#[tokio::test]
async fn a_vm_application_stage_patches_the_application_profile() {
    // The published scale set with two VM Applications (and an Automatic upgrade policy).
    let mut vmss = fixture("VirtualMachineScaleSet_Get_WithUserData.json")["responses"]["200"]["body"].clone();
    vmss["id"] = VMSS.into();
    vmss["name"] = "web-staging".into();
    let apps = vmss["properties"]["virtualMachineProfile"]["applicationProfile"]["galleryApplications"].clone();
    let current = apps[0]["packageReferenceId"].as_str().unwrap().to_string();
    assert!(current.ends_with("/applications/MyApplication1/versions/1.0"));
    let next = current.replace("/versions/1.0", "/versions/1.1");
    let stub = Stub::start(vmss, 2).await;

    let mut req = request(&stub, "unused", 2, 1);
    req.mode = DeployMode::VmApplication;
    req.image = ImageRef { kind: ImageKind::GalleryApplicationVersion, id: next.clone(), version: Some("1.1".into()), digest: None };
    let outcome = stub.compute().deploy(&req).await.unwrap();
    assert_eq!(outcome, DeployOutcome::Succeeded);

    let log = stub.log();
    let patch = log.iter().find(|l| l.method == "PATCH").unwrap();
    let profile = &patch.body["properties"]["virtualMachineProfile"];
    assert!(profile.get("storageProfile").is_none(), "the OS image is left alone: {profile}");
    let sent = profile["applicationProfile"]["galleryApplications"].as_array().unwrap();
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[0]["packageReferenceId"], next.as_str());
    assert_eq!(sent[0]["order"], 1);
    assert_eq!(sent[0]["treatFailureAsDeploymentFailure"], true);
    assert_eq!(sent[0]["configurationReference"], apps[0]["configurationReference"]);
    assert_eq!(sent[1], apps[1], "the other application is unchanged");
    assert_eq!(patch.body["tags"]["myTag1"], "tagValue1");
    assert_eq!(patch.body["tags"]["deploychain.artifact"], next.as_str());
    assert_eq!(patch.body["tags"]["deploychain.previous.artifact"], current.as_str());
    // Automatic policy: no rolling upgrade to wait for, so the instances being on the model is the signal.
    assert_eq!(story(&log), ["rolling upgrade", "PATCH model", "rolling upgrade", "health 0", "health 1", "check"]);
    assert!(!log.iter().any(|l| l.path.ends_with("/manualUpgrade")));
}

#[tokio::test]
async fn a_mismatched_artifact_is_refused_before_any_request() {
    let stub = Stub::start(manual_scale_set("1.0.1", json!({})), 1).await;
    let mut req = request(&stub, "1.0.2", 2, 1);
    req.mode = DeployMode::VmApplication;
    let outcome = stub.compute().deploy(&req).await.unwrap();
    assert!(
        matches!(&outcome, DeployOutcome::Failed { reason } if reason.contains("vm-application") && reason.contains("nothing changed")),
        "{outcome:?}"
    );
    assert!(stub.log().is_empty());
}

#[tokio::test]
async fn tokens_never_appear_in_errors() {
    let stub = Stub::start(manual_scale_set("1.0.1", deployed_by(RUN_OLD, 1, "1.0.1")), 1).await;
    stub.with(|w| {
        w.faults.push_back(Fault::answer(
            "PATCH",
            "web-staging",
            403,
            json!({ "error": { "code": "AuthorizationFailed",
                "message": format!("The client with token 'Bearer {TOKEN}' does not have authorization to perform action 'Microsoft.Compute/virtualMachineScaleSets/write'.") } }),
        ));
        w.faults.push_back(Fault::answer("GET", "web-staging", 500, json!({ "error": { "code": "InternalServerError", "message": TOKEN } })));
    });
    let outcome = stub.compute().deploy(&request(&stub, "1.0.2", 2, 1)).await.unwrap();
    let DeployOutcome::Failed { reason } = outcome else { panic!("{outcome:?}") };
    assert!(reason.contains("AuthorizationFailed") && reason.contains("nothing changed"), "{reason}");
    assert!(!reason.contains(TOKEN), "{reason}");

    // Throttled on every attempt: a transient error (the message is redelivered), without the token.
    let stub = Stub::start(manual_scale_set("1.0.1", json!({})), 1).await;
    stub.with(|w| {
        for _ in 0..4 {
            w.faults.push_back(Fault::answer(
                "GET",
                "web-staging",
                503,
                json!({ "error": { "code": "ServerBusy", "message": format!("echo {TOKEN}") } }),
            ));
        }
    });
    let err = stub.compute().deploy(&request(&stub, "1.0.2", 2, 1)).await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(err.to_string().contains("ServerBusy") && !err.to_string().contains(TOKEN), "{err}");
    assert_eq!(stub.log().len(), 4, "bounded attempts");
}
