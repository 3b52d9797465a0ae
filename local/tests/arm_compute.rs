//! `ArmCompute` — the handler's ARM client and rollout — against the local stack's ARM endpoint
//! (`deploychain::arm::LocalArm`) on 127.0.0.1:0, with scale sets built from the published ARM
//! spec examples in `tests/fixtures/arm-compute/` (names, ids, tags, image fields and the upgrade
//! mode set). Faults are injected through the endpoint (429 with `Retry-After`, 500/503, 403, a
//! concurrent writer, an operation that ends `Failed`, a rolling upgrade that ends `Faulted`), and
//! the endpoint's request log — ARM's and the acceptance checks' — is what the assertions read.
#![allow(clippy::unwrap_used)]

use deploychain::arm::{ArmSimConfig, Fault, FaultAction, LocalArm, Request};
use deploychain_events::{ImageKind, ImageRef};
use deploychain_functions::adapters::arm::{ArmCompute, ArmOptions, RetryPolicy, StaticToken};
use deploychain_functions::adapters::{DeployOutcome, DeployRequest};
use deploychain_functions::config::Secret;
use deploychain_functions::policy::{Check, DeployMode};
use serde_json::{Value, json};
use std::time::Duration;

const TOKEN: &str = "stub-bearer-token-value-3f9c";
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

// ------------------------------------------------------------------ the endpoint

#[derive(Clone)]
struct Stub {
    arm: LocalArm,
    base: String,
    apps: String,
}

impl Stub {
    async fn start(vmss: Value, instances: usize) -> Stub {
        let dir = std::env::temp_dir().join(format!("deploychain-arm-test-{}-{}", std::process::id(), uuid::Uuid::new_v4().simple()));
        let config = ArmSimConfig {
            operation_time: Duration::from_millis(10),
            upgrade_time: Duration::from_millis(20),
            health_delay: Duration::ZERO,
            // Two instances a page, so `nextLink` is followed.
            page_size: 2,
            ..ArmSimConfig::default()
        };
        let arm = LocalArm::open(&dir.join("arm.sqlite"), config, TOKEN).unwrap();
        arm.put_scale_set(VMSS, vmss, instances).unwrap();
        let serve = |router: axum::Router| async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let base = format!("http://{}", listener.local_addr().unwrap());
            tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
            base
        };
        let base = serve(arm.router()).await;
        let apps = serve(arm.apps_router()).await;
        Stub { arm, base, apps }
    }

    /// ARM's requests and the acceptance checks', in order.
    fn log(&self) -> Vec<Request> {
        self.arm.all_requests()
    }

    fn tags(&self) -> Value {
        self.arm.scale_set(VMSS).unwrap().body["tags"].clone()
    }

    fn fault(&self, f: Fault) {
        self.arm.push_fault(f);
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
        ArmCompute::new(options, std::sync::Arc::new(StaticToken::new(Secret::new(TOKEN)))).unwrap()
    }

    fn check(&self) -> Check {
        Check {
            retries: 1,
            interval: "10ms".into(),
            timeout: "1s".into(),
            ..Check::http(format!("{}/web-staging/healthz?code=check-key", self.apps))
        }
    }

    fn latest(&self) -> usize {
        self.arm.scale_set(VMSS).unwrap().instances.iter().filter(|v| v.latest).count()
    }
}

/// ARM's error object (`{"code","message"}`), as an operation status carries it.
fn error_detail(code: &str, message: &str) -> Value {
    json!({ "code": code, "message": message })
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
    request_for(stub, RUN, version, sequence, batch_size)
}

fn request_for(stub: &Stub, run: &str, version: &str, sequence: i64, batch_size: u32) -> DeployRequest {
    DeployRequest {
        run_id: run.into(),
        sequence,
        app: "web".into(),
        stage: "staging".into(),
        target: VMSS.into(),
        image: ImageRef { kind: ImageKind::GalleryImageVersion, id: image(version), version: Some(version.into()), digest: None },
        mode: DeployMode::Image,
        batch_size,
        checks: vec![stub.check()],
        kubernetes: None,
        registry: None,
        source_registry: None,
    }
}

/// The rollout's story: writes, health polls and checks, consecutive repeats merged.
fn story(log: &[Request]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for l in log {
        if l.app.is_some() {
            if out.last().map(String::as_str) != Some("check") {
                out.push("check".into());
            }
            continue;
        }
        let line = match (l.method.as_str(), l.path.strip_prefix(VMSS)) {
            ("PATCH", Some("")) => "PATCH model".to_string(),
            ("POST", Some("/manualUpgrade")) => format!(
                "upgrade {}",
                l.body["instanceIds"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect::<Vec<_>>().join(",")
            ),
            ("GET", Some(p)) if p.ends_with("/instanceView") => format!("health {}", p.split('/').nth(2).unwrap()),
            ("GET", Some("/rollingUpgrades/latest")) => "rolling upgrade".to_string(),
            _ => continue,
        };
        if out.last() != Some(&line) {
            out.push(line);
        }
    }
    out
}

fn writes(log: &[Request]) -> Vec<&Request> {
    log.iter()
        .filter(|l| l.app.is_none() && (l.method == "PATCH" || l.method == "POST" || l.method == "PUT" || l.method == "DELETE"))
        .collect()
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
    let outcome = deploy(&stub.compute(), &request(&stub, "1.0.2", 2, 2)).await.unwrap();
    assert_eq!(outcome, DeployOutcome::Succeeded);

    let log = stub.log();
    // Read first, then one conditional PATCH with the ETag just read and exactly this body.
    assert_eq!((log[0].method.as_str(), log[0].path.as_str()), ("GET", VMSS));
    let patches: Vec<&Request> = log.iter().filter(|l| l.method == "PATCH").collect();
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
    assert!(log.iter().any(|l| l.path.ends_with("/virtualMachines") && l.query.contains("$skiptoken=2")));
    // Every ARM request carried the bearer token; the checks never carried any.
    for l in &log {
        if l.app.is_some() {
            assert!(!l.authorized, "a check carried an Authorization header");
            assert_eq!(l.query, "code=check-key");
        } else {
            assert!(l.authorized, "{} {}", l.method, l.path);
        }
    }
    let tags = stub.tags();
    assert_eq!((tags["deploychain.run"].as_str(), tags["deploychain.artifact"].as_str()), (Some(RUN), Some(image("1.0.2").as_str())));
    assert_eq!(stub.latest(), 3);
}

#[tokio::test]
async fn rolling_policy_waits_for_the_rolling_upgrade_then_gates() {
    let mut vmss = manual_scale_set("1.0.1", deployed_by(RUN_OLD, 1, "1.0.1"));
    vmss["properties"]["upgradePolicy"]["mode"] = "Rolling".into();
    let stub = Stub::start(vmss, 2).await;
    // An earlier rollout's upgrade is the latest one until the PATCH starts a new one.
    let earlier = deploy(&stub.compute(), &request_for(&stub, "web-0000000000ff", "1.0.1", 1, 1)).await.unwrap();
    assert_eq!(earlier, DeployOutcome::Succeeded);
    let before = stub.log().len();
    let outcome = deploy(&stub.compute(), &request(&stub, "1.0.2", 2, 1)).await.unwrap();
    assert_eq!(outcome, DeployOutcome::Succeeded);
    let log = stub.log()[before..].to_vec();
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
    stub.arm
        .fault_next_rolling_upgrade(
            VMSS,
            "MaxUnhealthyInstancePercentExceededInRollingUpgrade",
            "Rolling upgrade stopped: too many unhealthy instances",
        )
        .unwrap();
    let outcome = deploy(&stub.compute(), &request(&stub, "1.0.2", 2, 1)).await.unwrap();
    let DeployOutcome::RolledBack { reason, restored } = outcome else { panic!("{outcome:?}") };
    assert!(reason.contains("Faulted") && reason.contains("MaxUnhealthyInstancePercentExceededInRollingUpgrade"), "{reason}");
    assert_eq!(restored.map(|r| r.id), Some(image("1.0.1")));
    assert_eq!(stub.tags()["deploychain.rolledback"], RUN);
}

#[tokio::test]
async fn redeploying_the_same_run_and_artifact_writes_nothing() {
    let stub = Stub::start(manual_scale_set("1.0.2", deployed_by(RUN, 2, "1.0.2")), 3).await;
    let outcome = deploy(&stub.compute(), &request(&stub, "1.0.2", 2, 1)).await.unwrap();
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
    stub.fault(Fault::error("POST", "/manualUpgrade", 503, "ServiceUnavailable", "try later").skipping(1).times(4));
    let compute = stub.compute();
    let req = request(&stub, "1.0.2", 2, 1);
    let err = deploy(&compute, &req).await.unwrap_err();
    assert!(err.is_transient() && err.to_string().contains("ServiceUnavailable"), "{err}");
    assert_eq!(stub.latest(), 1, "one batch done");

    // The message is redelivered: the tags say this run's model is in place, so the rollout goes on.
    let before = stub.log().len();
    assert_eq!(deploy(&compute, &req).await.unwrap(), DeployOutcome::Succeeded);
    let log = stub.log();
    assert_eq!(story(&log[before..]), ["upgrade 1", "health 1", "check", "upgrade 2", "health 2", "check"]);
    assert!(!log[before..].iter().any(|l| l.method == "PATCH"), "the model update is not repeated");
    assert_eq!(stub.tags()["deploychain.previous.artifact"], image("1.0.1"), "a later rollback still knows where to go");
}

#[tokio::test]
async fn an_older_run_is_refused_as_stale_without_writing() {
    let stub = Stub::start(manual_scale_set("1.0.5", deployed_by("web-5555555555ee", 5, "1.0.5")), 2).await;
    let outcome = deploy(&stub.compute(), &request(&stub, "1.0.2", 2, 1)).await.unwrap();
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
    stub.fault(Fault::new("PATCH", "web-staging", FaultAction::ConcurrentWrite));
    let outcome = deploy(&stub.compute(), &request(&stub, "1.0.2", 2, 1)).await.unwrap();
    assert_eq!(outcome, DeployOutcome::Succeeded);
    let log = stub.log();
    let model: Vec<&Request> = log.iter().filter(|l| l.path == VMSS).collect();
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
    stub.fault(Fault::error("GET", "web-staging", 429, "TooManyRequests", "throttled").with_header("retry-after", "1"));
    stub.fault(Fault::error("GET", "web-staging", 500, "InternalServerError", "oops").with_header("x-ms-retry-after-ms", "150"));
    stub.fault(Fault::error("POST", "/manualUpgrade", 503, "ServiceUnavailable", "busy"));
    let outcome = deploy(&stub.compute(), &request(&stub, "1.0.2", 2, 1)).await.unwrap();
    assert_eq!(outcome, DeployOutcome::Succeeded);
    let log = stub.log();
    let gets: Vec<&Request> = log.iter().filter(|l| l.method == "GET" && l.path == VMSS).collect();
    assert_eq!(gets.iter().take(3).map(|l| l.status).collect::<Vec<_>>(), [429, 500, 200]);
    assert!(gets.len() >= 3);
    let first_wait = gets[1].at - gets[0].at;
    let second_wait = gets[2].at - gets[1].at;
    assert!(first_wait >= chrono::Duration::milliseconds(1000), "Retry-After: 1 honoured, waited {first_wait}");
    assert!(second_wait >= chrono::Duration::milliseconds(150), "x-ms-retry-after-ms: 150 honoured, waited {second_wait}");
    assert_eq!(log.iter().filter(|l| l.path.ends_with("/manualUpgrade")).count(), 2, "the 503 was retried");
}

#[tokio::test]
async fn a_model_update_that_ends_failed_reports_arm_error_and_rolls_back() {
    let stub = Stub::start(manual_scale_set("1.0.1", deployed_by(RUN_OLD, 1, "1.0.1")), 2).await;
    stub.fault(Fault::new(
        "PATCH",
        "web-staging",
        FaultAction::FailOperation(error_detail("GalleryImageNotFound", "The gallery image version 1.0.2 is not replicated to westus.")),
    ));
    let outcome = deploy(&stub.compute(), &request(&stub, "1.0.2", 2, 1)).await.unwrap();
    let DeployOutcome::RolledBack { reason, restored } = outcome else { panic!("{outcome:?}") };
    assert!(reason.contains("GalleryImageNotFound") && reason.contains("not replicated to westus"), "{reason}");
    assert!(reason.contains("Failed"), "{reason}");
    assert_eq!(restored.map(|r| r.id), Some(image("1.0.1")));
    let log = stub.log();
    let patches: Vec<&Request> = log.iter().filter(|l| l.method == "PATCH").collect();
    assert_eq!(patches.len(), 2);
    assert_eq!(patches[1].body["properties"]["virtualMachineProfile"]["storageProfile"]["imageReference"]["id"], image("1.0.1"));
    assert!(!log.iter().any(|l| l.app.is_some()), "no checks after a failed model update");
}

#[tokio::test]
async fn an_unhealthy_instance_rolls_back_to_the_previous_image() {
    let stub = Stub::start(manual_scale_set("1.0.1", deployed_by(RUN_OLD, 1, "1.0.1")), 3).await;
    stub.arm.mark_unhealthy(&image("1.0.3")).unwrap();
    let compute = stub.compute();
    let req = request(&stub, "1.0.3", 3, 2);
    let started = std::time::Instant::now();
    let outcome = deploy(&compute, &req).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(3));
    let DeployOutcome::RolledBack { reason, restored } = outcome else { panic!("{outcome:?}") };
    assert!(reason.contains("batch 1 of 2") && reason.contains("web-staging_0 is HealthState/unhealthy"), "{reason}");
    assert_eq!(
        restored,
        Some(ImageRef { kind: ImageKind::GalleryImageVersion, id: image("1.0.1"), version: Some("1.0.1".into()), digest: None })
    );

    let log = stub.log();
    let model: Vec<&Request> = log.iter().filter(|l| l.path == VMSS).collect();
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
    // The second batch was never started; the upgraded instances were brought back to the model
    // (instance 2 never left it, so it is on the restored model without an upgrade, as in Azure).
    assert_eq!(story(&log).iter().filter(|s| s.starts_with("upgrade")).cloned().collect::<Vec<_>>(), ["upgrade 0,1", "upgrade 0,1"]);
    assert!(stub.arm.scale_set(VMSS).unwrap().instances.iter().all(|v| v.latest && v.artifacts == [image("1.0.1")]));
    assert!(!log.iter().any(|l| l.app.is_some()), "no checks for an unhealthy batch");

    // Delivered again, the same rollout answers the same without touching the scale set.
    let before = stub.log().len();
    let again = deploy(&compute, &req).await.unwrap();
    assert!(matches!(again, DeployOutcome::RolledBack { restored: Some(ref r), .. } if r.id == image("1.0.1")), "{again:?}");
    assert!(writes(&stub.log()[before..]).is_empty());
}

#[tokio::test]
async fn a_failing_acceptance_check_rolls_back() {
    let stub = Stub::start(manual_scale_set("1.0.1", deployed_by(RUN_OLD, 1, "1.0.1")), 2).await;
    stub.arm.set_failing_checks("web-staging", true);
    let outcome = deploy(&stub.compute(), &request(&stub, "1.0.2", 2, 2)).await.unwrap();
    let DeployOutcome::RolledBack { reason, restored } = outcome else { panic!("{outcome:?}") };
    assert!(
        reason.contains("acceptance check") && reason.contains("answered 500, expected 200") && reason.contains("2 attempts"),
        "{reason}"
    );
    assert!(!reason.contains("check-key"), "the check URL's query is not shown: {reason}");
    assert_eq!(restored.map(|r| r.id), Some(image("1.0.1")));
    let log = stub.log();
    assert_eq!(log.iter().filter(|l| l.app.is_some()).count(), 2, "first try and one retry");
    assert_eq!(stub.tags()["deploychain.artifact"], image("1.0.1"));
    assert_eq!(stub.tags()["deploychain.rolledback"], RUN);
}

#[tokio::test]
async fn a_failed_rollback_is_failed_naming_both_failures() {
    let stub = Stub::start(manual_scale_set("1.0.1", deployed_by(RUN_OLD, 1, "1.0.1")), 1).await;
    stub.arm.mark_unhealthy(&image("1.0.3")).unwrap();
    let compute = stub.compute();
    // Let the deploy PATCH through, then refuse the rollback's.
    stub.fault(Fault::error("PATCH", "web-staging", 400, "InvalidParameter", "Image 1.0.1 was deleted.").skipping(1));
    let outcome = deploy(&compute, &request(&stub, "1.0.3", 3, 1)).await.unwrap();
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
    let outcome = deploy(&stub.compute(), &req).await.unwrap();
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
    let outcome = deploy(&stub.compute(), &req).await.unwrap();
    assert!(
        matches!(&outcome, DeployOutcome::Failed { reason } if reason.contains("vm-application") && reason.contains("nothing changed")),
        "{outcome:?}"
    );
    assert!(stub.log().is_empty());
}

#[tokio::test]
async fn tokens_never_appear_in_errors() {
    let stub = Stub::start(manual_scale_set("1.0.1", deployed_by(RUN_OLD, 1, "1.0.1")), 1).await;
    stub.fault(Fault::error(
        "PATCH",
        "web-staging",
        403,
        "AuthorizationFailed",
        &format!("The client with token 'Bearer {TOKEN}' does not have authorization to perform action 'Microsoft.Compute/virtualMachineScaleSets/write'."),
    ));
    stub.fault(Fault::error("GET", "web-staging", 500, "InternalServerError", TOKEN));
    let outcome = deploy(&stub.compute(), &request(&stub, "1.0.2", 2, 1)).await.unwrap();
    let DeployOutcome::Failed { reason } = outcome else { panic!("{outcome:?}") };
    assert!(reason.contains("AuthorizationFailed") && reason.contains("nothing changed"), "{reason}");
    assert!(!reason.contains(TOKEN), "{reason}");

    // Throttled on every attempt: a transient error (the message is redelivered), without the token.
    let stub = Stub::start(manual_scale_set("1.0.1", json!({})), 1).await;
    stub.fault(Fault::error("GET", "web-staging", 503, "ServerBusy", &format!("echo {TOKEN}")).times(4));
    let err = deploy(&stub.compute(), &request(&stub, "1.0.2", 2, 1)).await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(err.to_string().contains("ServerBusy") && !err.to_string().contains(TOKEN), "{err}");
    assert_eq!(stub.log().len(), 4, "bounded attempts");
}

/// The whole rollout, look after look (what the chain does with a scheduled message per look).
async fn deploy<C: deploychain_functions::adapters::Compute + ?Sized>(
    compute: &C,
    req: &deploychain_functions::adapters::DeployRequest,
) -> deploychain_functions::error::Result<DeployOutcome> {
    deploychain_functions::adapters::drive(compute, req, 10_000).await.map(|(o, _)| o)
}
