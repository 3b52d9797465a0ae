//! Whole-chain scenarios: the real `handler` binary under the local Functions host, the embedded
//! durable bus, the local ARM endpoint, the simulators — everything `deploychain up` starts, on
//! free ports, in a temporary data directory. Each scenario is bounded in time.
#![allow(clippy::unwrap_used)]

use deploychain::arm::ArmSimConfig;
use deploychain::client;
use deploychain::config::SimConfig;
use deploychain::stack::{Stack, StackOptions};
use deploychain::watch::Progress;
use deploychain_bus::{EntityPath, NewMessage};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::broadcast;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize().unwrap()
}

/// The handler binary cargo built for this workspace (`cargo test --workspace` builds every binary).
fn handler() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let h = dir.join("handler");
    assert!(
        h.is_file(),
        "{} is missing: build it with `cargo build -p deploychain-functions --bin handler` (the workspace test command does)",
        h.display()
    );
    h
}

fn data_dir(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("deploychain-chain-{name}-{}", std::process::id()))
}

/// Options for a scenario's data directory, as left by an earlier start (nothing wiped).
fn options_keep(name: &str) -> StackOptions {
    StackOptions {
        repo: repo(),
        data_dir: data_dir(name),
        policy: repo().join("policy.toml"),
        app: deploychain::stack::AppSource::Handler(handler()),
        http_port: 0,
        bus_port: 0,
        arm_port: 0,
        status_port: 0,
        sim: SimConfig {
            build_delay: Duration::from_millis(50),
            image_delay: Duration::from_millis(50),
            failing_builds: vec![],
            unhealthy_images: vec![],
        },
        arm: ArmSimConfig {
            operation_time: Duration::from_millis(20),
            upgrade_time: Duration::from_millis(30),
            health_delay: Duration::from_millis(20),
            poll_interval: Duration::from_millis(20),
            health_timeout: Duration::from_secs(2),
            ..ArmSimConfig::default()
        },
        watchdog: deploychain::config::WatchdogConfig::default(),
        extra_settings: Vec::new(),
    }
}

/// Options for a scenario, starting from an empty data directory.
fn options(name: &str) -> StackOptions {
    let _ = std::fs::remove_dir_all(data_dir(name));
    options_keep(name)
}

/// Options for a scenario on its own pipeline policy.
fn options_with_policy(name: &str, policy: &str) -> StackOptions {
    let mut opts = options(name);
    std::fs::create_dir_all(&opts.data_dir).unwrap();
    opts.policy = opts.data_dir.join("policy.toml");
    std::fs::write(&opts.policy, policy).unwrap();
    opts
}

fn base(stack: &Stack) -> String {
    format!("http://{}", stack.http_addr)
}

/// Wait for a progress item that `pred` accepts (bounded).
async fn wait_for(rx: &mut broadcast::Receiver<Progress>, what: &str, mut pred: impl FnMut(&Progress) -> bool) -> Progress {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Ok(p)) if pred(&p) => return p,
            Ok(Ok(_)) | Ok(Err(broadcast::error::RecvError::Lagged(_))) => {}
            Ok(Err(e)) => panic!("progress closed while waiting for {what}: {e}"),
            Err(_) => panic!("timed out waiting for {what}"),
        }
    }
}

async fn run_json(stack: &Stack, id: &str) -> Value {
    serde_json::from_str(&client::runs(&base(stack), &stack.secrets, Some(id), None).await.unwrap()).unwrap()
}

/// Poll the runs API until the run's status is `status` (bounded).
async fn wait_status(stack: &Stack, id: &str, status: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(text) = client::runs(&base(stack), &stack.secrets, Some(id), None).await {
            let v: Value = serde_json::from_str(&text).unwrap();
            if v["status"] == status {
                return v;
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "run {id} never reached {status}: {}", run_json(stack, id).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn push(stack: &Stack) -> String {
    push_commit(stack, None).await
}

async fn push_commit(stack: &Stack, prefix: Option<&str>) -> String {
    push_to(stack, &repo().join("policy.toml"), prefix).await
}

/// Push a sample commit (`prefix`) of `policy`'s GitHub app; the run id.
async fn push_to(stack: &Stack, policy: &Path, prefix: Option<&str>) -> String {
    let body = client::sample_push(policy, None, prefix).unwrap();
    let (status, text) = client::send_github(&base(stack), &stack.secrets, "push", &body).await.unwrap();
    assert_eq!(status, 202, "{text}");
    serde_json::from_str::<Value>(&text).unwrap()["run"].as_str().unwrap().to_string()
}

/// The stages whose scale set ARM accepted a model update for `run` (the deploy PATCHes), in order.
fn deployed_stages(stack: &Stack, run: &str) -> Vec<String> {
    stack
        .arm
        .requests()
        .into_iter()
        .filter(|r| r.method == "PATCH" && r.status == 200 && r.body["tags"]["deploychain.run"] == run)
        .map(|r| r.body["tags"]["deploychain.stage"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// Put a message that is not a chain event on the push subscription's label (poison).
async fn send_poison(stack: &Stack, id: &str, body: &[u8]) {
    let m = NewMessage {
        body: body.to_vec(),
        message_id: Some(id.into()),
        session_id: Some("web".into()),
        label: Some("dev.deploychain.push.v1".into()),
        ..Default::default()
    };
    stack.broker.send("deploychain-events", m).await.unwrap();
}

/// Wait (bounded) until the parking queue holds something.
async fn wait_parked(stack: &Stack) {
    let parked: EntityPath = "deploychain-parked".parse().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while stack.broker.count(&parked).await.unwrap().active == 0 {
        assert!(tokio::time::Instant::now() < deadline, "nothing parked");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_to_production_through_the_local_stack() {
    let stack = Stack::start(options("happy")).await.unwrap();
    let mut rx = stack.progress.subscribe();
    let run = push(&stack).await;
    let link = match wait_for(&mut rx, "an approval link", |p| matches!(p, Progress::Approval { run: r, .. } if *r == run)).await {
        Progress::Approval { link, approver, .. } => {
            assert_eq!(approver, "alice@contoso.com");
            link
        }
        _ => unreachable!(),
    };
    let waiting = wait_status(&stack, &run, "waiting").await;
    assert!(waiting["waitingFor"].as_str().unwrap().starts_with("approval of production"), "{waiting}");
    // A GET (link scanner) decides nothing.
    let page = reqwest::get(&link).await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("Promote web to production?"));
    assert_eq!(run_json(&stack, &run).await["status"], "waiting");
    let (status, _) = client::decide(&link, "approve", Some("ship it")).await.unwrap();
    assert_eq!(status, 200);
    let done = wait_status(&stack, &run, "succeeded").await;
    let steps: Vec<&str> = done["steps"].as_array().unwrap().iter().map(|s| s["what"].as_str().unwrap()).collect();
    for expected in [
        "push received",
        "build requested",
        "build succeeded",
        "image requested",
        "deployed to staging",
        "production approved",
        "deployed to production",
        "run succeeded",
    ] {
        assert!(steps.contains(&expected), "{expected} missing from {steps:?}");
    }
    assert!(done["steps"].as_array().unwrap().iter().all(|s| s["at"].is_string()));
    assert_eq!(deployed_stages(&stack, &run), ["staging", "production"]);
    // The build was dispatched through the GitHub Actions adapter: one workflow_dispatch with the
    // token, the branch and the run's inputs; the run links to the workflow run GitHub created.
    let dispatches: Vec<_> = stack.ci.received().into_iter().filter(|r| r.path.ends_with("/dispatches")).collect();
    assert_eq!(dispatches.len(), 1, "{dispatches:#?}");
    let d = &dispatches[0];
    assert_eq!(
        (d.method.as_str(), d.path.as_str(), d.status),
        ("POST", "/github/repos/octo-org/web/actions/workflows/build.yml/dispatches", 200)
    );
    assert_eq!(d.authorization.as_deref(), Some(format!("Bearer {}", stack.secrets.ci_token).as_str()));
    let body: Value = serde_json::from_str(&d.body).unwrap();
    assert_eq!(body["ref"], "main");
    assert_eq!(body["inputs"]["deploychain_run"], run.as_str());
    assert_eq!(body["inputs"]["commit"], done["commit"]);
    assert_eq!(body["return_run_details"], true);
    let requested = done["steps"].as_array().unwrap().iter().find(|s| s["what"] == "build requested").unwrap();
    assert!(requested["detail"].as_str().unwrap().contains("/actions/runs/"), "{requested}");
    stack.discard().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_webhooks_and_unknown_branches_enqueue_nothing() {
    let stack = Stack::start(options("forged")).await.unwrap();
    let body = client::sample_push(&repo().join("policy.toml"), None, None).unwrap();
    let rsp = reqwest::Client::new()
        .post(format!("{}/api/hooks/github", base(&stack)))
        .header("x-github-event", "push")
        .header("x-hub-signature-256", client::github_signature("not-the-secret", &body))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(rsp.status(), 401);
    let body = client::sample_push(&repo().join("policy.toml"), Some("feature/nope"), None).unwrap();
    let (status, text) = client::send_github(&base(&stack), &stack.secrets, "push", &body).await.unwrap();
    assert_eq!(status, 202);
    assert!(text.contains("no run"), "{text}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let audit: EntityPath = "deploychain-events/subscriptions/audit".parse().unwrap();
    assert_eq!(stack.broker.count(&audit).await.unwrap().active, 0, "nothing was enqueued");
    let runs: Value = serde_json::from_str(&client::runs(&base(&stack), &stack.secrets, None, None).await.unwrap()).unwrap();
    assert_eq!(runs["runs"].as_array().unwrap().len(), 0);
    // The runs API needs the function key.
    assert_eq!(reqwest::get(format!("{}/api/runs", base(&stack))).await.unwrap().status(), 401);
    stack.discard().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_handler_is_restarted_and_the_run_completes_without_repeating_an_effect() {
    let mut opts = options("kill");
    opts.sim.build_delay = Duration::from_millis(400);
    let stack = Stack::start(opts).await.unwrap();
    let mut rx = stack.progress.subscribe();
    let run = push(&stack).await;
    wait_for(
        &mut rx,
        "build requested",
        |p| matches!(p, Progress::Event { run: r, ty, .. } if *r == run && *ty == deploychain_events::EventType::BuildRequested),
    )
    .await;
    let before = stack.host.worker.live(Duration::from_secs(5)).await.unwrap();
    let killed = std::process::Command::new("kill").args(["-9", &before.pid.to_string()]).status().unwrap();
    assert!(killed.success());
    let link = match wait_for(&mut rx, "an approval link", |p| matches!(p, Progress::Approval { run: r, .. } if *r == run)).await {
        Progress::Approval { link, .. } => link,
        _ => unreachable!(),
    };
    let after = stack.host.worker.live(Duration::from_secs(5)).await.unwrap();
    assert_ne!(before.pid, after.pid, "a new handler process");
    assert!(stack.host.worker.restarts() >= 1);
    client::decide(&link, "approve", None).await.unwrap();
    wait_status(&stack, &run, "succeeded").await;
    assert_eq!(deployed_stages(&stack, &run), ["staging", "production"], "each stage rolled out exactly once");
    stack.discard().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_message_is_parked_at_once_and_other_runs_go_on() {
    let stack = Stack::start(options("poison")).await.unwrap();
    send_poison(&stack, "poison-1", b"{\"this\": \"is not a CloudEvent\"}").await;
    let parked: EntityPath = "deploychain-parked".parse().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let m = loop {
        if let Some(m) = stack.broker.peek(&parked, 0, 10).await.unwrap().into_iter().next() {
            break m;
        }
        assert!(tokio::time::Instant::now() < deadline, "nothing parked");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(m.properties.get("deadletterreason").and_then(Value::as_str), Some("MalformedEvent"));
    assert_eq!(m.properties.get("originaldeliverycount").and_then(Value::as_i64), Some(1), "parked on first sight");
    let on_push: EntityPath = "deploychain-events/subscriptions/on-push".parse().unwrap();
    let counts = stack.broker.count(&on_push).await.unwrap();
    assert_eq!(counts.dead_lettered, 0, "not retried into the dead-letter queue");
    // Another run is unaffected.
    let mut rx = stack.progress.subscribe();
    let run = push(&stack).await;
    wait_for(&mut rx, "approval", |p| matches!(p, Progress::Approval { run: r, .. } if *r == run)).await;
    stack.discard().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_and_restarting_the_stack_mid_run_loses_nothing() {
    let mut opts = options("restart");
    // Stop while the simulated CI build is still running.
    opts.sim.build_delay = Duration::from_secs(3);
    let stack = Stack::start(opts.clone()).await.unwrap();
    let mut rx = stack.progress.subscribe();
    let run = push(&stack).await;
    wait_for(
        &mut rx,
        "build requested",
        |p| matches!(p, Progress::Event { run: r, ty, .. } if *r == run && *ty == deploychain_events::EventType::BuildRequested),
    )
    .await;
    stack.stop().await;
    // Same data directory, new processes, new ports: the CI service still has the build and reports
    // it (after a delay long enough to look at the run first), and the run goes on.
    opts.sim.build_delay = Duration::from_millis(1500);
    let stack = Stack::start(opts).await.unwrap();
    let mut rx = stack.progress.subscribe();
    assert_eq!(run_json(&stack, &run).await["status"], "running");
    let link = match wait_for(&mut rx, "approval link", |p| matches!(p, Progress::Approval { run: r, .. } if *r == run)).await {
        Progress::Approval { link, .. } => link,
        _ => unreachable!(),
    };
    stack.stop().await;
    // And once more while it waits for approval: the signed link still works after the restart.
    let stack = Stack::start(options_keep("restart")).await.unwrap();
    // (The stop may have come between the approvers' notification and the step's settlement: then
    // the redelivered step finishes it.)
    wait_status(&stack, &run, "waiting").await;
    let link = link.replace(&url::Url::parse(&link).unwrap()[..url::Position::BeforePath], &base(&stack));
    let (status, _) = client::decide(&link, "approve", None).await.unwrap();
    assert_eq!(status, 200);
    wait_status(&stack, &run, "succeeded").await;
    assert_eq!(deployed_stages(&stack, &run), ["staging", "production"]);
    stack.discard().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_message_ids_are_delivered_once_and_sessions_keep_their_order() {
    let stack = Stack::start(options("dupes")).await.unwrap();
    // The same push delivered twice (GitHub redelivery): one message, one run.
    let body = client::sample_push(&repo().join("policy.toml"), None, None).unwrap();
    let (s1, t1) = client::send_github(&base(&stack), &stack.secrets, "push", &body).await.unwrap();
    let (s2, t2) = client::send_github(&base(&stack), &stack.secrets, "push", &body).await.unwrap();
    assert_eq!((s1, s2), (202, 202));
    assert_eq!(t1, t2);
    let run = serde_json::from_str::<Value>(&t1).unwrap()["run"].as_str().unwrap().to_string();
    let audit: EntityPath = "deploychain-events/subscriptions/audit".parse().unwrap();
    let pushes = stack.broker.peek(&audit, 0, 1000).await.unwrap().into_iter().filter(|m| m.message_id == format!("{run}.push")).count();
    assert_eq!(pushes, 1, "the duplicate MessageId was dropped by the bus");

    // Five messages in one app+stage session are handled one at a time, in order: they are not
    // chain events, so each is parked, and the parking order is the handling order.
    for i in 1..=5 {
        stack
            .broker
            .send(
                "deploychain-events",
                NewMessage {
                    body: format!("not an event {i}").into_bytes(),
                    message_id: Some(format!("ordered-{i}")),
                    session_id: Some("web/staging".into()),
                    label: Some("dev.deploychain.image.ready.v1".into()),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
    }
    let parked: EntityPath = "deploychain-parked".parse().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let order: Vec<String> = loop {
        let ids: Vec<String> = stack
            .broker
            .peek(&parked, 0, 100)
            .await
            .unwrap()
            .into_iter()
            .filter_map(|m| m.properties.get("originalmessageid").and_then(Value::as_str).map(str::to_string))
            .filter(|id| id.starts_with("ordered-"))
            .collect();
        if ids.len() == 5 {
            break ids;
        }
        assert!(tokio::time::Instant::now() < deadline, "only {ids:?} parked");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(order, (1..=5).map(|i| format!("ordered-{i}")).collect::<Vec<_>>());
    stack.discard().await;
}

// ------------------------------------------------------------------ scale sets through the local ARM endpoint

fn policy() -> deploychain_functions::policy::Policy {
    deploychain_functions::policy::Policy::from_toml(&std::fs::read_to_string(repo().join("policy.toml")).unwrap()).unwrap()
}

/// The scale set of `stage` of the first app, as the policy names it.
fn target(stage: &str) -> String {
    policy().apps[0].stages.iter().find(|s| s.name == stage).unwrap().target.clone()
}

/// The image the local stack created every scale set on.
fn seed_image() -> String {
    format!("{}/versions/0.0.1", policy().apps[0].image.destination)
}

/// The accepted deploy PATCH of `run` on `stage`'s scale set.
fn deploy_patch(stack: &Stack, run: &str, stage: &str) -> Option<deploychain::arm::Request> {
    stack
        .arm
        .requests()
        .into_iter()
        .find(|r| r.method == "PATCH" && r.status == 200 && r.path == target(stage) && r.body["tags"]["deploychain.run"] == run)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_scale_sets_end_on_the_new_image_with_the_runs_tags_through_conditional_patches() {
    let stack = Stack::start(options("arm-happy")).await.unwrap();
    let mut rx = stack.progress.subscribe();
    let run = push(&stack).await;
    let link = match wait_for(&mut rx, "an approval link", |p| matches!(p, Progress::Approval { run: r, .. } if *r == run)).await {
        Progress::Approval { link, .. } => link,
        _ => unreachable!(),
    };
    client::decide(&link, "approve", None).await.unwrap();
    let done = wait_status(&stack, &run, "succeeded").await;

    let staging = deploy_patch(&stack, &run, "staging").expect("a deploy PATCH on staging");
    let image = staging.body["properties"]["virtualMachineProfile"]["storageProfile"]["imageReference"]["id"].as_str().unwrap().to_string();
    assert!(image.starts_with(&policy().apps[0].image.destination) && image != seed_image(), "{image}");
    let requests = stack.arm.requests();
    for stage in ["staging", "production"] {
        let id = target(stage);
        let patch = deploy_patch(&stack, &run, stage).unwrap();
        // Conditional on the ETag of the read just before it, and only the image and the tags.
        let read = requests.iter().rev().find(|r| r.seq < patch.seq && r.method == "GET" && r.path == id).expect("a read before the PATCH");
        assert_eq!(read.status, 200);
        assert!(patch.if_match.as_deref().is_some_and(|m| m.starts_with('"')), "If-Match: {:?}", patch.if_match);
        assert_eq!(patch.query, "api-version=2024-07-01");
        assert_eq!(
            patch.body["properties"],
            serde_json::json!({ "virtualMachineProfile": { "storageProfile": { "imageReference": { "id": image } } } }),
            "the same immutable image in both stages"
        );
        let tags = &patch.body["tags"];
        assert_eq!(tags["deploychain.run"], run.as_str());
        assert_eq!(tags["deploychain.stage"], stage);
        assert_eq!(tags["deploychain.artifact"], image.as_str());
        assert_eq!(tags["deploychain.previous.artifact"], seed_image().as_str());
        assert_eq!(tags["environment"], stage, "the scale set's own tags are kept");
        assert_eq!(requests.iter().filter(|r| r.method == "PATCH" && r.path == id).count(), 1, "one model update per stage");

        let ss = stack.arm.scale_set(&id).unwrap();
        assert_eq!(ss.image(), Some(image.as_str()));
        assert_eq!(ss.tag("deploychain.run"), Some(run.as_str()));
        assert_eq!(ss.tag("deploychain.sequence"), tags["deploychain.sequence"].as_str());
        assert!(!ss.instances.is_empty());
        for vm in &ss.instances {
            assert!(vm.latest && vm.health == "HealthState/healthy" && vm.artifacts == [image.clone()], "{vm:?}");
        }
    }
    // Manual upgrade policy: instances upgraded one batch at a time, each gated.
    let upgrades: Vec<&deploychain::arm::Request> =
        requests.iter().filter(|r| r.method == "POST" && r.path == format!("{}/manualUpgrade", target("staging"))).collect();
    assert_eq!(
        upgrades.iter().map(|r| r.body["instanceIds"].clone()).collect::<Vec<_>>(),
        [serde_json::json!(["0"]), serde_json::json!(["1"])]
    );
    assert!(requests.iter().all(|r| r.authorized), "every ARM request carried the local bearer token");
    // The staging check of the shipped policy (http://web-staging.internal/healthz) reached the
    // scale set's application through the stack's network, without the ARM token.
    let checks: Vec<_> = stack.arm.all_requests().into_iter().filter(|r| r.app.as_deref() == Some("web-staging")).collect();
    assert!(!checks.is_empty(), "no acceptance check reached web-staging");
    assert!(checks.iter().all(|r| r.path == "/healthz" && r.status == 200 && !r.authorized), "{checks:?}");
    let steps = done["steps"].to_string();
    assert!(steps.contains(&image), "the run names the image: {steps}");
    stack.discard().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_image_rolls_staging_back_and_asks_nobody_for_approval() {
    let mut opts = options("arm-bad-image");
    opts.sim.unhealthy_images = vec!["bad".into()];
    let stack = Stack::start(opts).await.unwrap();
    let mut rx = stack.progress.subscribe();
    let run = push_commit(&stack, Some("bad")).await;
    let done = wait_status(&stack, &run, "failed").await;
    // The terminal view showed the scale set being rolled back as it happened.
    let mut lines = Vec::new();
    while let Ok(p) = rx.try_recv() {
        if let Progress::Target { scale_set, line } = p {
            lines.push(format!("{scale_set}: {line}"));
        }
    }
    assert!(lines.iter().any(|l| l.starts_with("web-staging: model updated to image web ")), "{lines:?}");
    assert!(lines.iter().any(|l| l == &format!("web-staging: rolling back to image web 0.0.1 (run {run} failed)")), "{lines:?}");
    let text = done.to_string();
    assert!(text.contains("deployment to staging rolled back"), "{text}");
    assert!(text.contains("HealthState/unhealthy"), "the reason says why: {text}");
    assert!(done["waitingFor"].is_null(), "{done}");

    let staging = stack.arm.scale_set(&target("staging")).unwrap();
    assert_eq!(staging.image(), Some(seed_image().as_str()), "back on the previous image");
    assert_eq!(staging.tag("deploychain.rolledback"), Some(run.as_str()));
    assert!(staging.instances.iter().all(|v| v.latest && v.artifacts == [seed_image()]), "{:?}", staging.instances);
    assert!(deploy_patch(&stack, &run, "production").is_none());
    assert!(stack.arm.requests().iter().all(|r| r.path != target("production") || r.method == "GET"), "production untouched");
    // No approval was requested: nothing of the kind on the bus.
    let audit: EntityPath = "deploychain-events/subscriptions/audit".parse().unwrap();
    let labels: Vec<String> = stack
        .broker
        .peek(&audit, 0, 1000)
        .await
        .unwrap()
        .into_iter()
        .filter(|m| m.message_id.starts_with(&run))
        .filter_map(|m| m.label)
        .collect();
    assert!(labels.iter().any(|l| l == "dev.deploychain.deployment.rolledback.v1"), "{labels:?}");
    assert!(!labels.iter().any(|l| l.starts_with("dev.deploychain.approval")), "{labels:?}");
    stack.discard().await;
}

/// Publish `image.ready` for `run` as an image baker would.
async fn send_image_ready(stack: &Stack, run: &str, version: &str) {
    use deploychain_events::*;
    let r = run_json(stack, run).await;
    let commit = r["commit"].as_str().unwrap().to_string();
    let image = ImageRef {
        kind: ImageKind::GalleryImageVersion,
        id: format!("{}/versions/{version}", policy().apps[0].image.destination),
        version: Some(version.into()),
        digest: None,
    };
    let ev = DeployEvent {
        id: event_id(run, "image-ready"),
        source: "/deploychain/web/image-builder".into(),
        time: chrono::Utc::now(),
        run_id: run.to_string(),
        trace: TraceContext::default(),
        data: EventData::ImageReady(ImageReady { app: "web".into(), commit, image, branch: None }),
    };
    deploychain::sim::send_event(&stack.broker, "deploychain-events", &ev, Some("web/staging".into())).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_image_for_an_older_build_is_refused_and_changes_nothing() {
    let mut opts = options("arm-stale");
    // The CI simulator stays busy: the images come from this test, newer first.
    opts.sim.build_delay = Duration::from_secs(60);
    let stack = Stack::start(opts).await.unwrap();
    let mut rx = stack.progress.subscribe();
    let older = push(&stack).await;
    wait_for(
        &mut rx,
        "the older build",
        |p| matches!(p, Progress::Event { run, ty, .. } if *run == older && *ty == deploychain_events::EventType::BuildRequested),
    )
    .await;
    let newer = push(&stack).await;
    wait_for(
        &mut rx,
        "the newer build",
        |p| matches!(p, Progress::Event { run, ty, .. } if *run == newer && *ty == deploychain_events::EventType::BuildRequested),
    )
    .await;
    assert!(run_json(&stack, &newer).await["sequence"].as_i64() > run_json(&stack, &older).await["sequence"].as_i64());

    send_image_ready(&stack, &newer, "2.0.2").await;
    wait_status(&stack, &newer, "waiting").await;
    let writes_before = stack.arm.requests().iter().filter(|r| r.method != "GET").count();

    send_image_ready(&stack, &older, "2.0.1").await;
    let done = wait_status(&stack, &older, "superseded").await;
    let text = done.to_string();
    assert!(text.contains("not deployed to staging") && text.contains(&newer), "the reason names the newer run: {text}");
    assert_eq!(stack.arm.requests().iter().filter(|r| r.method != "GET").count(), writes_before, "nothing written to ARM");
    let staging = stack.arm.scale_set(&target("staging")).unwrap();
    assert_eq!(staging.tag("deploychain.run"), Some(newer.as_str()));
    assert!(staging.image().unwrap().ends_with("/versions/2.0.2"));
    stack.discard().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arm_throttling_and_errors_are_retried_and_a_failed_operation_rolls_production_back() {
    use deploychain::arm::{Fault, FaultAction};
    let mut opts = options("arm-faults");
    opts.arm.faults = vec![
        Fault::error("PATCH", "/web-staging", 429, "TooManyRequests", "throttled").with_header("retry-after", "1"),
        Fault::error("GET", "/web-staging/virtualMachines", 500, "InternalServerError", "try again"),
        Fault::new(
            "PATCH",
            "/web-prod",
            FaultAction::FailOperation(serde_json::json!({
            "code": "GalleryImageNotFound", "message": "The image version is not replicated to westus." })),
        ),
    ];
    let stack = Stack::start(opts).await.unwrap();
    let mut rx = stack.progress.subscribe();
    let run = push(&stack).await;
    let link = match wait_for(&mut rx, "an approval link", |p| matches!(p, Progress::Approval { run: r, .. } if *r == run)).await {
        Progress::Approval { link, .. } => link,
        _ => unreachable!(),
    };
    client::decide(&link, "approve", None).await.unwrap();
    let done = wait_status(&stack, &run, "failed").await;
    let text = done.to_string();
    assert!(text.contains("deployment to production rolled back") && text.contains("GalleryImageNotFound"), "{text}");

    let log = stack.arm.requests();
    let staging_patches: Vec<_> = log.iter().filter(|r| r.method == "PATCH" && r.path == target("staging")).collect();
    assert_eq!(staging_patches.iter().map(|r| r.status).collect::<Vec<_>>(), [429, 200]);
    let waited = staging_patches[1].at - staging_patches[0].at;
    assert!(waited >= chrono::Duration::milliseconds(1000), "Retry-After: 1 honoured, waited {waited}");
    let lists: Vec<u16> = log.iter().filter(|r| r.path == format!("{}/virtualMachines", target("staging"))).map(|r| r.status).collect();
    assert_eq!(lists[..2], [500, 200], "the 500 was retried");
    assert!(stack.arm.scale_set(&target("staging")).unwrap().tag("deploychain.run") == Some(run.as_str()), "staging kept the image");
    let prod = stack.arm.scale_set(&target("production")).unwrap();
    assert_eq!(prod.image(), Some(seed_image().as_str()), "production back on its previous image");
    assert_eq!(prod.tag("deploychain.rolledback"), Some(run.as_str()));
    stack.discard().await;
}

/// A policy with one app that ships as a VM Application (seed 001): both stages replace the
/// application in the scale sets' `applicationProfile`, the OS image stays.
const VM_APPLICATION_POLICY: &str = r#"
[[app]]
name = "agent"
source = { github = "octo-org/agent" }
branches = ["main"]
build = { provider = "github-actions", pipeline = "build.yml" }
image = { source = "ci", destination = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg-images/providers/Microsoft.Compute/galleries/deploychain/applications/agent" }

[[app.stage]]
name = "staging"
target = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg-agent/providers/Microsoft.Compute/virtualMachineScaleSets/agent-staging"
deploy = "vm-application"
checks = [{ kind = "http", url = "http://agent-staging.internal/healthz", expect_body = "ok" }]

[[app.stage]]
name = "production"
target = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg-agent/providers/Microsoft.Compute/virtualMachineScaleSets/agent-prod"
deploy = "vm-application"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_application_release_replaces_the_application_and_keeps_the_os_image() {
    let opts = options_with_policy("arm-vm-application", VM_APPLICATION_POLICY);
    let stack = Stack::start(opts.clone()).await.unwrap();
    let run = push_to(&stack, &opts.policy, None).await;
    wait_status(&stack, &run, "succeeded").await;

    let app_dest = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg-images/providers/Microsoft.Compute/galleries/deploychain/applications/agent";
    for name in ["agent-staging", "agent-prod"] {
        let id = format!(
            "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg-agent/providers/Microsoft.Compute/virtualMachineScaleSets/{name}"
        );
        let patch = stack
            .arm
            .requests()
            .into_iter()
            .find(|r| r.method == "PATCH" && r.status == 200 && r.path == id && r.body["tags"]["deploychain.run"] == run.as_str())
            .expect("a deploy PATCH");
        let profile = &patch.body["properties"]["virtualMachineProfile"];
        assert!(profile.get("storageProfile").is_none(), "the OS image is left alone: {profile}");
        let apps = profile["applicationProfile"]["galleryApplications"].as_array().unwrap();
        assert_eq!(apps.len(), 1);
        let version = apps[0]["packageReferenceId"].as_str().unwrap();
        assert!(version.starts_with(&format!("{app_dest}/versions/1.0.")), "{version}");
        assert_eq!(patch.body["tags"]["deploychain.previous.artifact"], format!("{app_dest}/versions/0.0.1"));
        let ss = stack.arm.scale_set(&id).unwrap();
        assert!(ss.instances.iter().all(|v| v.latest && v.artifacts.iter().any(|a| a == version)), "{:?}", ss.instances);
    }
    stack.discard().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_approval_is_reminded_then_its_timeout_applies_through_scheduled_messages() {
    let mut opts = options("approval-timeout");
    std::fs::create_dir_all(&opts.data_dir).unwrap();
    let shipped = std::fs::read_to_string(repo().join("policy.toml")).unwrap();
    let line = shipped.lines().find(|l| l.starts_with("approval = ")).unwrap();
    let policy = shipped.replace(
        line,
        r#"approval = { approvers = ["alice@contoso.com", "bob@contoso.com"], expires_after = "4s", remind_before = ["2s"], on_timeout = "approve" }"#,
    );
    opts.policy = opts.data_dir.join("policy.toml");
    std::fs::write(&opts.policy, policy).unwrap();
    let stack = Stack::start(opts.clone()).await.unwrap();
    let mut rx = stack.progress.subscribe();
    let body = client::sample_push(&opts.policy, None, None).unwrap();
    let (_, text) = client::send_github(&base(&stack), &stack.secrets, "push", &body).await.unwrap();
    let run = serde_json::from_str::<Value>(&text).unwrap()["run"].as_str().unwrap().to_string();
    // The request's links, then the reminder's: each approver is notified twice, nobody decides.
    let mut links = 0;
    while links < 4 {
        wait_for(&mut rx, "approval links", |p| matches!(p, Progress::Approval { run: r, .. } if *r == run)).await;
        links += 1;
    }
    // The reminder's notices go out before its step commits: the step shows up a moment later.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let waiting = run_json(&stack, &run).await;
        if waiting.to_string().contains("approvers of production reminded") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no reminder step: {waiting}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let done = wait_status(&stack, &run, "succeeded").await;
    assert!(done.to_string().contains("approval of production timed out"), "{done}");
    assert_eq!(deployed_stages(&stack, &run), ["staging", "production"], "promoted by the timeout's default action");
    stack.discard().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_killed_in_the_middle_of_a_rollout_is_restarted_and_no_effect_happens_twice() {
    use deploychain::arm::{Fault, FaultAction};
    let mut opts = options("kill-mid-rollout");
    // ARM holds the staging model update: the handler is killed while it waits for it.
    opts.arm.faults = vec![Fault::new("PATCH", "/web-staging", FaultAction::Delay(Duration::from_millis(1500)))];
    let stack = Stack::start(opts).await.unwrap();
    let mut rx = stack.progress.subscribe();
    let run = push(&stack).await;
    wait_for(
        &mut rx,
        "the staging rollout to start",
        |p| matches!(p, Progress::Event { run: r, ty, .. } if *r == run && *ty == deploychain_events::EventType::DeploymentStarted),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        stack.arm.requests().iter().all(|r| !(r.method == "PATCH" && r.path == target("staging"))),
        "the model update is still held when the handler dies"
    );
    let before = stack.host.worker.live(Duration::from_secs(5)).await.unwrap();
    assert!(std::process::Command::new("kill").args(["-9", &before.pid.to_string()]).status().unwrap().success());

    // Restarted; the redelivered image.ready resumes the rollout; approvers are told once.
    let mut approvers = Vec::new();
    let link = loop {
        match wait_for(&mut rx, "approval links", |p| matches!(p, Progress::Approval { run: r, .. } if *r == run)).await {
            Progress::Approval { approver, link, .. } => {
                approvers.push(approver.clone());
                if approver == "alice@contoso.com" {
                    break link;
                }
            }
            _ => unreachable!(),
        }
    };
    let after = stack.host.worker.live(Duration::from_secs(5)).await.unwrap();
    assert_ne!(before.pid, after.pid, "a new handler process");
    client::decide(&link, "approve", None).await.unwrap();
    wait_status(&stack, &run, "succeeded").await;
    // Let late deliveries, if any, arrive.
    tokio::time::sleep(Duration::from_millis(500)).await;
    while let Ok(p) = rx.try_recv() {
        if let Progress::Approval { run: r, approver, .. } = p
            && r == run
        {
            approvers.push(approver);
        }
    }
    approvers.sort();
    assert_eq!(approvers, ["alice@contoso.com", "bob@contoso.com"], "each approver notified exactly once");
    assert_eq!(stack.arm.model_updates(&target("staging"), &run), 1, "one model update of staging");
    assert_eq!(stack.arm.model_updates(&target("production"), &run), 1, "one model update of production");
    let audit: EntityPath = "deploychain-events/subscriptions/audit".parse().unwrap();
    let msgs = stack.broker.peek(&audit, 0, 1000).await.unwrap();
    for id in ["build-requested", "image-ready", "approval-requested.production", "run-finished"] {
        assert_eq!(msgs.iter().filter(|m| m.message_id == format!("{run}.{id}")).count(), 1, "{id} once");
    }
    let parked: EntityPath = "deploychain-parked".parse().unwrap();
    assert!(stack.broker.peek(&parked, 0, 10).await.unwrap().is_empty(), "nothing parked");
    stack.discard().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_build_ends_the_run_before_any_image_or_rollout() {
    let mut opts = options("failing-build");
    opts.sim.failing_builds = vec!["dead".into()];
    let stack = Stack::start(opts).await.unwrap();
    let run = push_commit(&stack, Some("dead")).await;
    let done = wait_status(&stack, &run, "failed").await;
    assert!(done.to_string().contains("build") && done.to_string().contains("failure"), "{done}");
    let audit: EntityPath = "deploychain-events/subscriptions/audit".parse().unwrap();
    let labels: Vec<String> = stack
        .broker
        .peek(&audit, 0, 1000)
        .await
        .unwrap()
        .into_iter()
        .filter(|m| m.message_id.starts_with(&run))
        .filter_map(|m| m.label)
        .collect();
    assert!(!labels.iter().any(|l| l.contains("image.") || l.contains("deployment.")), "{labels:?}");
    assert!(stack.arm.requests().iter().all(|r| r.method == "GET"), "no scale set touched");
    stack.discard().await;
}

/// An Azure Repos app built by Azure Pipelines (the git.push fixture's repository and branch).
const AZURE_DEVOPS_POLICY: &str = r#"
[[app]]
name = "project"
source = { azure_devops = "https://good-company.some.ssl.host/tfs/GoodCompany/_git/Project" }
branches = ["main"]
build = { provider = "azure-pipelines", pipeline = "Project-CI" }
image = { source = "image-builder", destination = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg-images/providers/Microsoft.Compute/galleries/deploychain/images/project" }

[[app.stage]]
name = "staging"
target = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg-project/providers/Microsoft.Compute/virtualMachineScaleSets/project-staging"

[[app.stage]]
name = "production"
target = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg-project/providers/Microsoft.Compute/virtualMachineScaleSets/project-prod"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_azure_repos_push_built_by_azure_pipelines_reaches_production() {
    let opts = options_with_policy("azure-devops", AZURE_DEVOPS_POLICY);
    let stack = Stack::start(opts).await.unwrap();
    // The real service hook payload, posted with the hook's basic auth.
    let body = std::fs::read(repo().join("tests/fixtures/azure-devops/git.push.aspnet-webhooks.json")).unwrap();
    let (status, text) = client::send_azure_devops(&base(&stack), &stack.secrets, &body).await.unwrap();
    assert_eq!(status, 202, "{text}");
    let run = "project-c8e823a60a85";
    let done = wait_status(&stack, run, "succeeded").await;
    let steps = done["steps"].to_string();
    assert!(steps.contains("Azure Pipelines"), "the build went to Azure Pipelines: {steps}");
    // Queued through the Runs API with the PAT: the pipeline's id looked up by its name, then one
    // run of exactly the pushed commit, with the run as a template parameter.
    let received = stack.ci.received();
    let basic =
        format!("Basic {}", base64::Engine::encode(&base64::engine::general_purpose::STANDARD, format!(":{}", stack.secrets.ci_token)));
    assert!(received.iter().all(|r| r.authorization.as_deref() == Some(basic.as_str())), "{received:#?}");
    assert_eq!(received[0].path, "/azdo/local/GoodCompany/_apis/pipelines", "the project of the Azure Repos clone URL");
    let runs: Vec<_> = received.iter().filter(|r| r.path.ends_with("/runs")).collect();
    assert_eq!(runs.len(), 1, "{received:#?}");
    assert_eq!(runs[0].status, 200);
    let body: Value = serde_json::from_str(&runs[0].body).unwrap();
    assert_eq!(body["templateParameters"]["deploychainRun"], run);
    assert_eq!(body["resources"]["repositories"]["self"]["version"], done["commit"]);
    for stage in ["staging", "production"] {
        let id = policy_target(AZURE_DEVOPS_POLICY, stage);
        assert_eq!(stack.arm.model_updates(&id, run), 1, "{stage}");
    }
    stack.discard().await;
}

fn policy_target(policy: &str, stage: &str) -> String {
    let p = deploychain_functions::policy::Policy::from_toml(policy).unwrap();
    p.apps[0].stages.iter().find(|s| s.name == stage).unwrap().target.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watchdog_timer_flags_a_run_whose_build_never_comes_back() {
    let mut opts = options("watchdog");
    opts.sim.build_delay = Duration::from_secs(60);
    opts.watchdog = deploychain::config::WatchdogConfig { schedule: "*/1 * * * * *".into(), stuck_after: "2s,approval=off".into() };
    let stack = Stack::start(opts).await.unwrap();
    let mut rx = stack.progress.subscribe();
    let run = push(&stack).await;
    let text = match wait_for(&mut rx, "the watchdog's notice", |p| matches!(p, Progress::Stuck { run: r, .. } if *r == run)).await {
        Progress::Stuck { text, .. } => text,
        _ => unreachable!(),
    };
    assert!(text.contains("no progress for over 2s") && text.contains("build of"), "{text}");
    // The notice goes out inside the watchdog's step, a moment before the step commits the entry.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let r = loop {
        let r = run_json(&stack, &run).await;
        if r["waiting"]["stuck"] == true || tokio::time::Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(r["waiting"]["stuck"], true, "{r}");
    assert_eq!(r["status"], "running");
    stack.discard().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_list_and_purge_parked_poison_through_the_admin_api() {
    let stack = Stack::start(options("ops-api")).await.unwrap();
    // Poison: not a CloudEvent, on the push subscription's label. The handler parks it at once.
    send_poison(&stack, "poison-ops", b"{\"oops\": true}").await;
    wait_parked(&stack).await;
    let parked: EntityPath = "deploychain-parked".parse().unwrap();
    let url = format!("{}/api/ops/deadletters", base(&stack));
    let http = reqwest::Client::new();
    // The host's admin key is needed (the function key is not enough).
    assert_eq!(http.get(&url).send().await.unwrap().status(), 401);
    assert_eq!(http.get(&url).header("x-functions-key", &stack.secrets.function_key).send().await.unwrap().status(), 401);
    let admin = |r: reqwest::RequestBuilder| r.header("x-functions-key", &stack.secrets.master_key);
    let list: Value = admin(http.get(format!("{url}?reason=MalformedEvent"))).send().await.unwrap().json().await.unwrap();
    let letters = list["letters"].as_array().unwrap();
    assert_eq!(letters.len(), 1, "{list}");
    assert_eq!(letters[0]["entity"], "deploychain-parked");
    assert_eq!(letters[0]["eventType"], "dev.deploychain.push.v1");
    assert_eq!(letters[0]["deliveryCount"], 1);
    let id = letters[0]["messageId"].as_str().unwrap().to_string();
    let one: Value = admin(http.get(format!("{url}/{id}"))).send().await.unwrap().json().await.unwrap();
    assert_eq!(one["body"], "{\"oops\": true}");
    // A signed-in principal without the ops role is refused; bad requests change nothing.
    let principal = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(r#"{"claims":[{"typ":"preferred_username","val":"dev@contoso.com"}]}"#)
    };
    let r = admin(http.get(&url)).header("x-ms-client-principal", principal).send().await.unwrap();
    assert_eq!(r.status(), 403);
    let r = admin(http.post(&url)).json(&serde_json::json!({ "action": "purge", "all": true })).send().await.unwrap();
    assert_eq!(r.status(), 400, "a purge needs confirm");
    let r = admin(http.post(&url)).json(&serde_json::json!({ "action": "replay" })).send().await.unwrap();
    assert_eq!(r.status(), 400, "say which");
    assert_eq!(stack.broker.count(&parked).await.unwrap().active, 1, "nothing changed");
    // The purge, confirmed, is audited.
    let r: Value = admin(http.post(&url))
        .json(&serde_json::json!({ "action": "purge", "ids": [id], "confirm": true }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["handled"].as_array().unwrap().len(), 1, "{r}");
    assert_eq!(r["by"], "admin key");
    assert_eq!(stack.broker.count(&parked).await.unwrap().active, 0);
    let audit: EntityPath = "deploychain-events/subscriptions/audit".parse().unwrap();
    let msgs = stack.broker.peek(&audit, 0, 1000).await.unwrap();
    assert!(msgs.iter().any(|m| m.label.as_deref() == Some("dev.deploychain.deadletter.handled.v1")), "audited");
    stack.discard().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_from_a_broken_policy_is_replayed_after_the_fix_and_each_effect_happens_once() {
    use deploychain_functions::ops::{DeadLetters, Filter, SUBSCRIPTIONS};
    let name = "ops-replay";
    let stack = Stack::start(options(name)).await.unwrap();
    let mut rx = stack.progress.subscribe();
    let run = push(&stack).await;
    let link = match wait_for(
        &mut rx,
        "an approval link",
        |p| matches!(p, Progress::Approval { run: r, approver, .. } if *r == run && approver == "alice@contoso.com"),
    )
    .await
    {
        Progress::Approval { link, .. } => link,
        _ => unreachable!(),
    };
    stack.stop().await;

    // Bad config for one app: the function app is redeployed with production renamed. The
    // approval goes through, and the promotion it triggers is refused and parked.
    let mut broken = options_keep(name);
    broken.policy = broken.data_dir.join("broken-policy.toml");
    let shipped = std::fs::read_to_string(repo().join("policy.toml")).unwrap();
    std::fs::write(&broken.policy, shipped.replace("name = \"production\"", "name = \"prod\"")).unwrap();
    let stack = Stack::start(broken).await.unwrap();
    let link = link.replace(&url::Url::parse(&link).unwrap()[..url::Position::BeforePath], &base(&stack));
    assert_eq!(client::decide(&link, "approve", None).await.unwrap().0, 200);
    wait_parked(&stack).await;
    let parked: EntityPath = "deploychain-parked".parse().unwrap();
    assert_eq!(stack.arm.model_updates(&target("production"), &run), 0, "nothing deployed by the broken app");
    stack.stop().await;

    // The fix: the right policy again. Then the operator replays what was parked.
    let stack = Stack::start(options_keep(name)).await.unwrap();
    let conn = deploychain_functions::adapters::servicebus::ConnectionString::parse(&format!(
        "Endpoint=sb://{};SharedAccessKeyName={};SharedAccessKey={};UseDevelopmentEmulator=true",
        stack.bus_addr, stack.secrets.bus_key_name, stack.secrets.bus_key
    ))
    .unwrap();
    let ops = DeadLetters::new(
        &conn,
        "deploychain-events",
        SUBSCRIPTIONS.map(str::to_string).to_vec(),
        "deploychain-parked",
        azure_core::new_http_client(),
    )
    .with_policy(std::sync::Arc::new(policy()));
    let letters = ops.list(&Filter::default()).await.unwrap();
    assert_eq!(letters.len(), 1, "{letters:#?}");
    assert_eq!(letters[0].reason.as_deref(), Some("Refused"));
    assert_eq!(letters[0].event_type.as_deref(), Some("dev.deploychain.approval.decided.v1"));
    assert_eq!(letters[0].run.as_deref(), Some(run.as_str()));
    let done = ops.replay(&Filter { run: Some(run.clone()), ..Filter::default() }, false, 10.0, "ops@contoso.com").await.unwrap();
    assert_eq!(done.len(), 1);
    wait_status(&stack, &run, "succeeded").await;
    assert_eq!(stack.arm.model_updates(&target("production"), &run), 1);
    assert!(ops.list(&Filter::default()).await.unwrap().is_empty(), "nothing left set aside");

    // Replaying the same event once more (its effect is applied): no second deployment.
    let audit: EntityPath = "deploychain-events/subscriptions/audit".parse().unwrap();
    let decided = stack
        .broker
        .peek(&audit, 0, 1000)
        .await
        .unwrap()
        .into_iter()
        .find(|m| m.message_id == format!("{run}.approval-decided.production"))
        .unwrap();
    stack
        .broker
        .send(
            "deploychain-events",
            NewMessage {
                body: decided.body.clone(),
                message_id: Some(format!("{}.replay-again", decided.message_id)),
                session_id: Some("web/production".into()),
                label: decided.label.clone(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(stack.arm.model_updates(&target("production"), &run), 1, "the step's idempotency holds across replays");
    assert_eq!(run_json(&stack, &run).await["status"], "succeeded");
    assert_eq!(stack.broker.count(&parked).await.unwrap().active, 0);
    stack.discard().await;
}

/// One span as the OTLP receiver decoded it.
#[derive(Debug, Clone)]
struct Received {
    name: String,
    trace: String,
    span: String,
    parent: String,
    attributes: std::collections::BTreeMap<String, String>,
    resource: std::collections::BTreeMap<String, String>,
}

/// One metric data point as the OTLP receiver decoded it: a sum's value, or a histogram's count
/// and sum.
#[derive(Debug, Clone)]
struct Point {
    name: String,
    attributes: std::collections::BTreeMap<String, String>,
    value: f64,
    count: u64,
    time: u64,
}

type Keep<T> = std::sync::Arc<std::sync::Mutex<Vec<T>>>;

fn any_text(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    use opentelemetry_proto::tonic::common::v1::any_value::Value as V;
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(V::StringValue(s)) => s.clone(),
        Some(V::IntValue(i)) => i.to_string(),
        Some(V::BoolValue(b)) => b.to_string(),
        other => format!("{other:?}"),
    }
}

fn attrs_of(kvs: &[opentelemetry_proto::tonic::common::v1::KeyValue]) -> std::collections::BTreeMap<String, String> {
    kvs.iter().map(|kv| (kv.key.clone(), any_text(&kv.value))).collect()
}

/// An OTLP/HTTP receiver (`POST /v1/traces` and `/v1/metrics`, protobuf) that keeps every span and
/// metric data point it gets.
async fn otlp_receiver() -> (String, Keep<Received>, Keep<Point>) {
    use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::metrics::v1::{metric::Data, number_data_point::Value as N};
    use prost::Message;
    let got: Keep<Received> = Default::default();
    let points: Keep<Point> = Default::default();
    let (keep, keep_points) = (got.clone(), points.clone());
    let app = axum::Router::new()
        .route(
            "/v1/traces",
            axum::routing::post(move |body: axum::body::Bytes| {
                let keep = keep.clone();
                async move {
                    let req = ExportTraceServiceRequest::decode(body).unwrap();
                    for rs in req.resource_spans {
                        let resource = rs.resource.as_ref().map(|r| attrs_of(&r.attributes)).unwrap_or_default();
                        for ss in rs.scope_spans {
                            for sp in ss.spans {
                                keep.lock().unwrap().push(Received {
                                    name: sp.name.clone(),
                                    trace: hex_of(&sp.trace_id),
                                    span: hex_of(&sp.span_id),
                                    parent: hex_of(&sp.parent_span_id),
                                    attributes: attrs_of(&sp.attributes),
                                    resource: resource.clone(),
                                });
                            }
                        }
                    }
                    axum::http::StatusCode::OK
                }
            }),
        )
        .route(
            "/v1/metrics",
            axum::routing::post(move |body: axum::body::Bytes| {
                let keep = keep_points.clone();
                async move {
                    let req = ExportMetricsServiceRequest::decode(body).unwrap();
                    let mut got = keep.lock().unwrap();
                    for rm in req.resource_metrics {
                        for sm in rm.scope_metrics {
                            for m in sm.metrics {
                                let point = |attributes, value, count, time| Point { name: m.name.clone(), attributes, value, count, time };
                                match &m.data {
                                    Some(Data::Sum(sum)) => {
                                        for p in &sum.data_points {
                                            let v = match p.value {
                                                Some(N::AsInt(i)) => i as f64,
                                                Some(N::AsDouble(d)) => d,
                                                None => f64::NAN,
                                            };
                                            got.push(point(attrs_of(&p.attributes), v, 0, p.time_unix_nano));
                                        }
                                    }
                                    Some(Data::Histogram(h)) => {
                                        for p in &h.data_points {
                                            got.push(point(attrs_of(&p.attributes), p.sum.unwrap_or(f64::NAN), p.count, p.time_unix_nano));
                                        }
                                    }
                                    _ => {}
                                }
                            }
                        }
                    }
                    axum::http::StatusCode::OK
                }
            }),
        );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    (base, got, points)
}

fn hex_of(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_release_is_one_trace_from_push_to_production_with_its_parent_chain_in_order() {
    let (collector, spans, _) = otlp_receiver().await;
    let mut opts = options("telemetry");
    opts.extra_settings = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), collector),
        ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
        ("OTEL_SERVICE_NAME".into(), "handler".into()),
        // The most the handler (and the crates under it) ever logs.
        ("RUST_LOG".into(), "debug".into()),
    ];
    let stack = Stack::start(opts).await.unwrap();
    let mut rx = stack.progress.subscribe();
    let run = push(&stack).await;
    let link = match wait_for(&mut rx, "an approval link", |p| matches!(p, Progress::Approval { run: r, .. } if *r == run)).await {
        Progress::Approval { link, .. } => link,
        _ => unreachable!(),
    };
    // The approval page names the release's trace.
    let page: Value = reqwest::Client::new().get(&link).header("accept", "application/json").send().await.unwrap().json().await.unwrap();
    let page_trace = page["traceId"].as_str().unwrap_or_default().to_string();
    client::decide(&link, "approve", None).await.unwrap();
    wait_status(&stack, &run, "succeeded").await;

    // Every step's span of this run, once exported.
    let steps = ["on_push", "on_build_completed", "on_image_ready", "on_approval"];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mine = loop {
        let all = spans.lock().unwrap().clone();
        let mine: Vec<Received> = all.iter().filter(|s| s.attributes.get("cicd.pipeline.run.id") == Some(&run)).cloned().collect();
        if steps.iter().all(|n| mine.iter().any(|s| s.name == *n)) {
            break (mine, all);
        }
        assert!(tokio::time::Instant::now() < deadline, "spans so far: {:?}", all.iter().map(|s| &s.name).collect::<Vec<_>>());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (mine, all) = mine;
    let by = |n: &str| mine.iter().find(|s| s.name == n).unwrap().clone();
    let trace = by("on_push").trace.clone();
    assert!(mine.iter().all(|s| s.trace == trace), "one trace id across the run: {mine:#?}");
    // The parent chain: the push webhook → on_push → on_build_completed → on_image_ready → on_approval.
    let webhook =
        all.iter().find(|s| s.name == "github_webhook" && s.span == by("on_push").parent).expect("the push webhook's span is the root");
    assert_eq!(webhook.trace, trace);
    assert_eq!(by("on_build_completed").parent, by("on_push").span);
    // The bake: on_build_completed started it, each look at it is the child of the look before,
    // and the look that found the image is the staging step's parent.
    let looks: Vec<&Received> = mine.iter().filter(|s| s.name == "on_image_due").collect();
    assert!(!looks.is_empty(), "the bake was looked at: {mine:#?}");
    let mut at = by("on_build_completed").span;
    for _ in 0..looks.len() {
        let next = looks.iter().find(|l| l.parent == at).unwrap_or_else(|| panic!("a look under {at}: {looks:#?}"));
        at = next.span.clone();
    }
    assert_eq!(by("on_image_ready").parent, at, "the last look is the staging step's parent");
    // The approval's page views and its decision are spans of the release too: the decision's
    // span (under the staging step) is the promotion's parent.
    let decision = all
        .iter()
        .find(|s| s.name == "approval" && s.span == by("on_approval").parent)
        .unwrap_or_else(|| panic!("the promotion's parent is the approval decision: {all:#?}"));
    assert_eq!(decision.trace, trace);
    assert_eq!(decision.parent, by("on_image_ready").span);
    assert_eq!(decision.attributes.get("http.request.method").map(String::as_str), Some("POST"));
    assert!(
        all.iter().any(|s| s.name == "approval"
            && s.trace == trace
            && s.attributes.get("http.request.method").map(String::as_str) == Some("GET"))
    );
    assert_eq!(page_trace, trace, "the approval page shows the release's trace id");
    // The staging rollout's ARM calls are client spans under the step that made them.
    let arm: Vec<&Received> = all.iter().filter(|s| s.parent == by("on_image_ready").span).collect();
    let patch = arm.iter().find(|s| s.attributes.get("http.request.method").map(String::as_str) == Some("PATCH"));
    let patch = patch.unwrap_or_else(|| panic!("no ARM PATCH under on_image_ready: {arm:#?}"));
    assert!(patch.name.starts_with("PATCH /subscriptions/"), "{patch:#?}");
    assert_eq!(patch.trace, trace);
    assert!(patch.attributes.get("http.response.status_code").is_some_and(|c| c.starts_with('2')), "{patch:#?}");
    assert!(patch.attributes.contains_key("server.address"), "{patch:#?}");
    // Semantic-convention attributes.
    let s = by("on_image_ready");
    for (k, v) in [
        ("faas.trigger", "pubsub"),
        ("messaging.system", "servicebus"),
        ("cicd.pipeline.name", "web"),
        ("cloudevents.event_type", "dev.deploychain.image.ready.v1"),
    ] {
        assert_eq!(s.attributes.get(k).map(String::as_str), Some(v), "{k}: {s:#?}");
    }
    assert!(s.attributes.get("faas.invocation_id").is_some_and(|i| !i.is_empty()), "{s:#?}");
    assert_eq!(s.resource.get("service.name").map(String::as_str), Some("handler"));
    assert_eq!(s.resource.get("service.namespace").map(String::as_str), Some("deploychain"));
    assert_eq!(webhook.attributes.get("faas.trigger").map(String::as_str), Some("http"));
    // No secret in any attribute.
    let secrets = [
        &stack.secrets.github_webhook,
        &stack.secrets.approval_signing_key,
        &stack.secrets.bus_key,
        &stack.secrets.arm_token,
        &stack.secrets.function_key,
    ];
    for sp in &all {
        for v in sp.attributes.values().chain(sp.resource.values()) {
            assert!(!secrets.iter().any(|s| v.contains(s.as_str())), "a secret in {} {v}", sp.name);
        }
    }
    // Nor in any line the handler logged, at debug level; nor the approver's link (a capability).
    let token = url::Url::parse(&link).unwrap().query_pairs().find(|(k, _)| k == "t").unwrap().1.to_string();
    let mut secrets = secrets.to_vec();
    secrets.push(&token);
    for sp in &all {
        assert!(!sp.attributes.values().any(|v| v.contains(&token)), "the link's token in {}", sp.name);
    }
    let log = stack.host.handler_log();
    assert!(log.iter().any(|l| l.contains("invocation") && l.contains("on_approval")), "the handler's log was kept: {log:#?}");
    for line in &log {
        assert!(!secrets.iter().any(|s| line.contains(s.as_str())), "a secret in the handler's log: {line}");
    }
    // Nor in any message the bus carried (bodies and properties) …
    let audit: EntityPath = "deploychain-events/subscriptions/audit".parse().unwrap();
    let carried = stack.broker.peek(&audit, 0, 1000).await.unwrap();
    assert!(carried.iter().any(|m| m.message_id == format!("{run}.run-finished")), "the run's events were read");
    for m in &carried {
        let text = format!("{} {:?}", String::from_utf8_lossy(&m.body), m.properties);
        assert!(!secrets.iter().any(|s| text.contains(s.as_str())), "a secret in bus message {}", m.message_id);
    }
    // … nor in the answers to what is refused: a forged webhook, a tampered link, the ops API
    // with the wrong key, an unknown run; nor in the run as the runs API shows it.
    let body = client::sample_push(&repo().join("policy.toml"), None, None).unwrap();
    let forger = deploychain::secrets::Secrets { github_webhook: "not-the-secret".into(), ..stack.secrets.clone() };
    let (status, forged) = client::send_github(&base(&stack), &forger, "push", &body).await.unwrap();
    assert_eq!(status, 401, "{forged}");
    let tampered = format!("{}x", &link[..link.len() - 1]);
    let http = reqwest::Client::new();
    let mut answers = vec![forged];
    for (url, key) in [
        (tampered, None),
        (format!("{}/api/ops/deadletters", base(&stack)), Some(stack.secrets.function_key.clone())),
        (format!("{}/api/runs/web-0000000000", base(&stack)), Some(stack.secrets.function_key.clone())),
        (format!("{}/api/runs/{run}", base(&stack)), Some(stack.secrets.function_key.clone())),
    ] {
        let mut req = http.get(&url).header("accept", "application/json");
        if let Some(k) = key {
            req = req.header("x-functions-key", k);
        }
        let rsp = req.send().await.unwrap();
        let status = rsp.status().as_u16();
        let text = rsp.text().await.unwrap();
        assert!(status < 500, "{url}: {status} {text}");
        answers.push(text);
    }
    for text in &answers {
        assert!(!secrets.iter().any(|s| text.contains(s.as_str())), "a secret in an answer: {text}");
    }
    stack.discard().await;
}

/// An Application Insights ingestion endpoint (`POST /v2/track`, gzip JSON envelopes) that keeps
/// every envelope it gets.
async fn app_insights_receiver() -> (String, std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>) {
    use std::io::Read;
    let got: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>> = Default::default();
    let keep = got.clone();
    let app = axum::Router::new().route(
        "/v2/track",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
            let keep = keep.clone();
            async move {
                let mut json = Vec::new();
                if headers.get("content-encoding").is_some_and(|v| v == "gzip") {
                    flate2::read::GzDecoder::new(&body[..]).read_to_end(&mut json).unwrap();
                } else {
                    json = body.to_vec();
                }
                let envelopes: Vec<serde_json::Value> = serde_json::from_slice(&json).unwrap();
                let n = envelopes.len();
                keep.lock().unwrap().extend(envelopes);
                axum::Json(serde_json::json!({"itemsReceived": n, "itemsAccepted": n, "errors": []}))
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    (base, got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn application_insights_gets_one_operation_per_release_under_the_handlers_role_name() {
    let (ingestion, envelopes) = app_insights_receiver().await;
    let ikey = "00000000-0000-0000-0000-0000000000a1";
    let mut opts = options("appinsights");
    opts.extra_settings = vec![
        ("APPLICATIONINSIGHTS_CONNECTION_STRING".into(), format!("InstrumentationKey={ikey};IngestionEndpoint={ingestion}")),
        ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
        ("OTEL_METRIC_EXPORT_INTERVAL".into(), "200".into()),
    ];
    let stack = Stack::start(opts).await.unwrap();
    let mut rx = stack.progress.subscribe();
    let run = push(&stack).await;
    let link = match wait_for(&mut rx, "an approval link", |p| matches!(p, Progress::Approval { run: r, .. } if *r == run)).await {
        Progress::Approval { link, .. } => link,
        _ => unreachable!(),
    };
    client::decide(&link, "approve", None).await.unwrap();
    wait_status(&stack, &run, "succeeded").await;

    let steps = ["on_push", "on_build_completed", "on_image_ready", "on_approval"];
    // The function each request envelope is for (App Insights names HTTP requests by their method).
    let name = |e: &serde_json::Value| e["data"]["baseData"]["properties"]["faas.name"].as_str().unwrap_or_default().to_string();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let (mine, all) = loop {
        let all = envelopes.lock().unwrap().clone();
        let mine: Vec<serde_json::Value> =
            all.iter().filter(|e| e["data"]["baseData"]["properties"]["cicd.pipeline.run.id"] == run.as_str()).cloned().collect();
        let root = mine.iter().find(|e| name(e) == "on_push").map(|e| e["tags"]["ai.operation.parentId"].clone());
        let webhook_seen = root.is_some_and(|r| all.iter().any(|e| name(e) == "github_webhook" && e["data"]["baseData"]["id"] == r));
        if webhook_seen && steps.iter().all(|n| mine.iter().any(|e| name(e) == *n)) {
            break (mine, all);
        }
        assert!(tokio::time::Instant::now() < deadline, "envelopes so far: {all:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let by = |n: &str| mine.iter().find(|e| name(e) == n).unwrap().clone();
    let operation = by("on_push")["tags"]["ai.operation.id"].as_str().unwrap().to_string();
    assert_eq!(operation.len(), 32, "the operation id is the W3C trace id: {operation}");
    for e in &mine {
        assert_eq!(e["iKey"], ikey, "{e:#}");
        assert_eq!(e["tags"]["ai.cloud.role"], "deploychain.handler", "{e:#}");
        assert_eq!(e["tags"]["ai.operation.id"], operation.as_str(), "one operation across the release: {e:#}");
        assert_eq!(e["data"]["baseType"], "RequestData", "an invocation is a request: {e:#}");
    }
    // The parent chain, as App Insights links it: each step's parent is the step before.
    let id = |n: &str| by(n)["data"]["baseData"]["id"].as_str().unwrap().to_string();
    let parent = |n: &str| by(n)["tags"]["ai.operation.parentId"].as_str().unwrap().to_string();
    assert_eq!(parent("on_build_completed"), id("on_push"));
    // on_build_completed → the looks at the bake (on_image_due) → on_image_ready.
    let looks: Vec<&serde_json::Value> = mine.iter().filter(|e| name(e) == "on_image_due").collect();
    let first = looks.iter().find(|e| e["tags"]["ai.operation.parentId"] == id("on_build_completed").as_str());
    assert!(first.is_some(), "the first look's parent is on_build_completed: {looks:#?}");
    assert!(
        looks.iter().any(|e| e["data"]["baseData"]["id"] == parent("on_image_ready").as_str()),
        "the staging step's parent is a look at the bake: {looks:#?}"
    );
    // on_image_ready → the approval decision (a request in the same operation) → on_approval.
    let decision = all.iter().find(|e| name(e) == "approval" && e["data"]["baseData"]["id"] == parent("on_approval").as_str());
    let decision = decision.unwrap_or_else(|| panic!("the promotion's parent is the approval decision: {all:#?}"));
    assert_eq!(decision["tags"]["ai.operation.parentId"], id("on_image_ready").as_str());
    assert_eq!(decision["tags"]["ai.operation.id"], operation.as_str());
    let webhook = all.iter().find(|e| name(e) == "github_webhook" && e["data"]["baseData"]["id"] == parent("on_push").as_str());
    assert!(webhook.is_some(), "the push webhook's request is the operation's root");
    assert_eq!(webhook.unwrap()["data"]["baseData"]["responseCode"], "202", "{webhook:#?}");
    // The delivery metrics are customMetrics under the same role: one production deployment,
    // succeeded (Application Insights takes deltas, so the envelopes add up to it).
    let production = |all: &[serde_json::Value]| -> Vec<serde_json::Value> {
        all.iter()
            .filter(|e| e["name"] == "Microsoft.ApplicationInsights.Metric")
            .filter(|e| e["data"]["baseData"]["metrics"][0]["name"] == "deploychain.deployments")
            .filter(|e| e["data"]["baseData"]["properties"]["deployment.environment.name"] == "production")
            .cloned()
            .collect()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while production(&envelopes.lock().unwrap()).is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "no deployment metric: {:#?}", envelopes.lock().unwrap());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A few more export intervals: later deltas must not add to it.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let all = envelopes.lock().unwrap().clone();
    let deployments = production(&all);
    let total: f64 = deployments.iter().map(|e| e["data"]["baseData"]["metrics"][0]["value"].as_f64().unwrap()).sum();
    assert_eq!(total, 1.0, "{deployments:#?}");
    for e in &deployments {
        assert_eq!(e["tags"]["ai.cloud.role"], "deploychain.handler", "{e:#}");
        assert_eq!(e["iKey"], ikey);
        assert_eq!(e["data"]["baseData"]["properties"]["deployment.status"], "succeeded", "{e:#}");
        assert_eq!(e["data"]["baseData"]["properties"]["cicd.pipeline.name"], "web", "{e:#}");
    }
    let lead = all.iter().find(|e| e["data"]["baseData"]["metrics"][0]["name"] == "deploychain.lead_time");
    assert!(lead.is_some_and(|e| e["data"]["baseData"]["metrics"][0]["count"] == 1), "the lead time is an aggregated metric: {lead:#?}");
    // No secret in any envelope.
    let text = serde_json::to_string(&all).unwrap();
    for s in [
        &stack.secrets.github_webhook,
        &stack.secrets.approval_signing_key,
        &stack.secrets.bus_key,
        &stack.secrets.arm_token,
        &stack.secrets.function_key,
    ] {
        assert!(!text.contains(s.as_str()), "a secret reached Application Insights");
    }
    stack.discard().await;
}

/// The latest value of each (metric, attributes) series the receiver got (the OTLP exporter sends
/// cumulative totals), for the series whose attributes include every pair of `with`.
fn latest(points: &[Point], name: &str, with: &[(&str, &str)]) -> Vec<Point> {
    let mut last: std::collections::BTreeMap<String, Point> = Default::default();
    for p in points.iter().filter(|p| p.name == name && with.iter().all(|(k, v)| p.attributes.get(*k).map(String::as_str) == Some(*v))) {
        let key = format!("{:?}", p.attributes);
        if last.get(&key).is_none_or(|q| q.time <= p.time) {
            last.insert(key, p.clone());
        }
    }
    last.into_values().collect()
}

/// Push a commit that was authored `age` ago.
async fn push_authored(stack: &Stack, age: chrono::Duration) -> String {
    let mut body: Value = serde_json::from_slice(&client::sample_push(&repo().join("policy.toml"), None, None).unwrap()).unwrap();
    body["commits"][0]["timestamp"] = (chrono::Utc::now() - age).to_rfc3339().into();
    let body = serde_json::to_vec(&body).unwrap();
    let (status, text) = client::send_github(&base(stack), &stack.secrets, "push", &body).await.unwrap();
    assert_eq!(status, 202, "{text}");
    serde_json::from_str::<Value>(&text).unwrap()["run"].as_str().unwrap().to_string()
}

/// Push, approve production, and wait for the run to end `status`.
async fn release(stack: &Stack, age: chrono::Duration, status: &str) -> String {
    let mut rx = stack.progress.subscribe();
    let run = push_authored(stack, age).await;
    let link = match wait_for(&mut rx, "an approval link", |p| matches!(p, Progress::Approval { run: r, .. } if *r == run)).await {
        Progress::Approval { link, .. } => link,
        _ => unreachable!(),
    };
    client::decide(&link, "approve", None).await.unwrap();
    wait_status(stack, &run, status).await;
    run
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_metrics_are_right_for_a_failure_a_rollback_and_a_success_in_production() {
    use deploychain::arm::{Fault, FaultAction};
    let (collector, _, points) = otlp_receiver().await;
    let mut opts = options("dora");
    opts.extra_settings = vec![
        ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT".into(), format!("{collector}/v1/metrics")),
        ("OTEL_METRIC_EXPORT_INTERVAL".into(), "200".into()),
    ];
    // Production refuses the first release's model update (it fails and stays failed), and the
    // second's rolling upgrade fails (it is rolled back); the third goes through.
    opts.arm.faults = vec![
        Fault::error("PATCH", "/web-prod", 403, "AuthorizationFailed", "the client may not write web-prod"),
        Fault::new(
            "PATCH",
            "/web-prod",
            FaultAction::FailOperation(serde_json::json!({ "code": "OSProvisioningTimedOut", "message": "the instances did not start" })),
        ),
    ];
    let stack = Stack::start(opts).await.unwrap();
    let started = tokio::time::Instant::now();
    let hour = chrono::Duration::hours(1);

    let failed = release(&stack, hour, "failed").await;
    let failure_seen = tokio::time::Instant::now();
    assert!(run_json(&stack, &failed).await.to_string().contains("deployment to production failed"));
    let rolled_back = release(&stack, hour, "failed").await;
    assert!(run_json(&stack, &rolled_back).await.to_string().contains("deployment to production rolled back"));
    let mut rx = stack.progress.subscribe();
    let run = push_authored(&stack, chrono::Duration::hours(2)).await;
    let link = match wait_for(&mut rx, "an approval link", |p| matches!(p, Progress::Approval { run: r, .. } if *r == run)).await {
        Progress::Approval { link, .. } => link,
        _ => unreachable!(),
    };
    let approving = tokio::time::Instant::now();
    client::decide(&link, "approve", None).await.unwrap();
    wait_status(&stack, &run, "succeeded").await;
    let succeeded_seen = tokio::time::Instant::now();
    send_poison(&stack, "dora-poison", b"{\"not\": \"an event\"}").await;
    wait_parked(&stack).await;

    // Wait (bounded) until the exports have caught up with the last facts.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let got = loop {
        let got = points.lock().unwrap().clone();
        let prod_ok =
            latest(&got, "deploychain.deployments", &[("deployment.environment.name", "production"), ("deployment.status", "succeeded")]);
        let dead = latest(&got, "deploychain.dead_letters", &[]);
        if prod_ok.first().is_some_and(|p| p.value == 1.0) && dead.first().is_some_and(|p| p.value == 1.0) {
            break got;
        }
        assert!(tokio::time::Instant::now() < deadline, "metrics so far: {:#?}", latest(&got, "deploychain.deployments", &[]));
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // Deployment frequency and change failure rate: three production deployments, two failed.
    let deployments = |stage: &str, status: &str| {
        let p = latest(&got, "deploychain.deployments", &[("deployment.environment.name", stage), ("deployment.status", status)]);
        assert!(p.len() <= 1, "{p:#?}");
        p.first().map(|p| p.value).unwrap_or(0.0)
    };
    assert_eq!(deployments("production", "succeeded"), 1.0);
    assert_eq!(deployments("production", "failed"), 1.0);
    assert_eq!(deployments("production", "rolled_back"), 1.0);
    assert_eq!(deployments("staging", "succeeded"), 3.0);
    assert_eq!(deployments("staging", "failed") + deployments("staging", "rolled_back"), 0.0);
    let prod = latest(&got, "deploychain.deployments", &[("deployment.environment.name", "production")]);
    assert!(prod.iter().all(|p| p.attributes.get("deploychain.stage.final").map(String::as_str) == Some("true")), "{prod:#?}");
    assert!(prod.iter().all(|p| p.attributes.get("cicd.pipeline.name").map(String::as_str) == Some("web")), "{prod:#?}");
    let failures: f64 = prod.iter().filter(|p| p.attributes["deployment.status"] != "succeeded").map(|p| p.value).sum();
    let total: f64 = prod.iter().map(|p| p.value).sum();
    assert!((failures / total - 2.0 / 3.0).abs() < 1e-9, "change failure rate {failures}/{total}");

    // Lead time: only the release that reached production, from its commit two hours ago.
    let lead = latest(&got, "deploychain.lead_time", &[]);
    assert_eq!(lead.len(), 1, "{lead:#?}");
    assert_eq!(lead[0].count, 1);
    assert_eq!(lead[0].attributes.get("deploychain.lead_time.from").map(String::as_str), Some("commit"));
    let elapsed = started.elapsed().as_secs_f64();
    assert!(lead[0].value >= 7200.0 && lead[0].value <= 7200.0 + elapsed + 1.0, "lead time {}", lead[0].value);

    // Time to restore: production failed with the first release and stayed failed through the
    // rolled-back second (a rollback restores what ran before: the failed state); the third
    // release restored it.
    let recovery = latest(&got, "deploychain.recovery_time", &[]);
    assert_eq!(recovery.len(), 1, "one recovery, by redeploying: {recovery:#?}");
    assert_eq!(recovery[0].count, 1);
    assert_eq!(recovery[0].attributes.get("deploychain.recovery").map(String::as_str), Some("redeploy"));
    assert_eq!(recovery[0].attributes.get("deployment.environment.name").map(String::as_str), Some("production"));
    let (low, high) = ((approving - failure_seen).as_secs_f64(), (succeeded_seen - started).as_secs_f64());
    assert!(recovery[0].value >= low && recovery[0].value <= high, "recovery {} not within [{low}, {high}]", recovery[0].value);

    // Approval wait: three production approvals, each decided.
    let waits = latest(&got, "deploychain.approval.wait", &[("deployment.environment.name", "production")]);
    assert_eq!(waits.iter().map(|p| p.count).sum::<u64>(), 3, "{waits:#?}");
    assert!(waits.iter().all(|p| p.attributes["deploychain.approval.decision"] == "approved" && p.value >= 0.0 && p.value <= elapsed));

    // Step duration for every step function, and the one parked message.
    for f in ["on_push", "on_build_completed", "on_image_ready", "on_approval", "github_webhook", "approval"] {
        let d = latest(&got, "deploychain.step.duration", &[("faas.name", f)]);
        assert!(d.iter().map(|p| p.count).sum::<u64>() >= 3, "{f}: {d:#?}");
    }
    let ok = latest(&got, "deploychain.step.duration", &[("faas.name", "on_approval"), ("deploychain.outcome", "ok")]);
    assert_eq!(ok.iter().map(|p| p.count).sum::<u64>(), 3, "each promotion once: {ok:#?}");
    let dead = latest(&got, "deploychain.dead_letters", &[]);
    assert_eq!(dead.len(), 1, "{dead:#?}");
    assert_eq!(dead[0].attributes.get("faas.name").map(String::as_str), Some("on_push"));
    assert_eq!(dead[0].attributes.get("deploychain.dead_letter.reason").map(String::as_str), Some("MalformedEvent"));
    stack.discard().await;
}

const JENKINS_POLICY: &str = r#"
[[app]]
name = "svc"
source = { github = "octo-org/svc" }
branches = ["main"]
build = { provider = "jenkins", pipeline = "team/svc" }
image = { source = "image-builder", destination = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg-images/providers/Microsoft.Compute/galleries/deploychain/images/svc" }

[[app.stage]]
name = "staging"
target = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg-svc/providers/Microsoft.Compute/virtualMachineScaleSets/svc-staging"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jenkins_job_builds_the_release_and_its_notification_continues_the_run() {
    let opts = options_with_policy("jenkins", JENKINS_POLICY);
    let stack = Stack::start(opts.clone()).await.unwrap();
    let run = push_to(&stack, &opts.policy, None).await;
    let done = wait_status(&stack, &run, "succeeded").await;
    // A crumb, then one buildWithParameters of the job with the run's parameters, as the API
    // token's user; the Notification plugin's FINALIZED message (with the function key) continued it.
    let received = stack.ci.received();
    let paths: Vec<&str> = received.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(paths, ["/jenkins/crumbIssuer/api/json", "/jenkins/job/team/job/svc/buildWithParameters"], "{received:#?}");
    assert_eq!(received[1].status, 201);
    let form: std::collections::HashMap<String, String> = url::form_urlencoded::parse(received[1].body.as_bytes()).into_owned().collect();
    assert_eq!(form["DEPLOYCHAIN_RUN"], run);
    assert_eq!(form["COMMIT"], done["commit"].as_str().unwrap());
    let steps = done["steps"].to_string();
    assert!(steps.contains("Jenkins `team/svc`: http://jenkins.local/queue/item/"), "{steps}");
    assert!(steps.contains("build succeeded"), "{steps}");
    assert_eq!(stack.arm.model_updates(&policy_target(JENKINS_POLICY, "staging"), &run), 1);
    stack.discard().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_image_builder_bakes_each_release_from_its_own_template_and_a_failed_bake_ends_the_run() {
    use deploychain::arm::{Fault, FaultAction};
    let stack = Stack::start(options("vib")).await.unwrap();
    let mut rx = stack.progress.subscribe();
    let run = push(&stack).await;
    wait_for(&mut rx, "an approval link", |p| matches!(p, Progress::Approval { run: r, .. } if *r == run)).await;
    let r = run_json(&stack, &run).await;
    // The run's template: from the app's base template, distributing the run's version.
    let template = format!(
        "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg-images/providers/Microsoft.VirtualMachineImages/imageTemplates/deploychain-{run}"
    );
    let log = stack.arm.requests();
    let put = log.iter().find(|q| q.method == "PUT" && q.path == template).expect("the run's template was created");
    let version = put.body["properties"]["distribute"][0]["galleryImageId"].as_str().unwrap().to_string();
    assert!(version.ends_with(&format!("/images/web/versions/1.0.{}", r["sequence"])), "{version}");
    assert!(log.iter().any(|q| q.method == "POST" && q.path == format!("{template}/run")));
    assert!(log.iter().any(|q| q.method == "GET" && q.path == format!("{template}/runOutputs/deploychain")));
    let staging = stack.arm.scale_set(&target("staging")).unwrap();
    assert_eq!(staging.image(), Some(version.as_str()), "staging runs what the bake made");
    let steps = r["steps"].to_string();
    assert!(steps.contains("image baking") && steps.contains("image baked"), "{steps}");

    // The next release's bake fails (its distribution): the run ends with Image Builder's words.
    stack.arm.push_fault(Fault::new(
        "POST",
        "/run",
        FaultAction::FailOperation(serde_json::json!({ "code": "ImageTemplateRunFailed", "message": "Distribution to westus failed: the gallery image version quota is exceeded" })),
    ));
    let failed = push(&stack).await;
    let done = wait_status(&stack, &failed, "failed").await;
    let text = done.to_string();
    assert!(text.contains("image bake failed") && text.contains("gallery image version quota is exceeded"), "{text}");
    assert!(deployed_stages(&stack, &failed).is_empty(), "nothing rolled out");
    stack.discard().await;
}

const CONTAINER_POLICY: &str = r#"
[[app]]
name = "shop"
source = { github = "octo-org/shop" }
branches = ["main"]
build = { provider = "github-actions", pipeline = "build.yml" }
image = { source = "registry", destination = "contosodev.azurecr.io/shop", registry = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg-acr/providers/Microsoft.ContainerRegistry/registries/contosodev" }

[[app.stage]]
name = "staging"
target = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg-aks/providers/Microsoft.ContainerService/managedClusters/aks-staging"
kubernetes = { namespace = "shop", deployment = "shop" }

[[app.stage]]
name = "production"
target = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg-aks/providers/Microsoft.ContainerService/managedClusters/aks-prod"
kubernetes = { namespace = "shop", deployment = "shop" }
registry = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg-acr/providers/Microsoft.ContainerRegistry/registries/contosoprod"
approval = { approvers = ["alice@contoso.com"], quorum = 1 }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_pushed_to_acr_goes_to_staging_aks_is_promoted_by_digest_and_reaches_production_aks() {
    let opts = options_with_policy("aks", CONTAINER_POLICY);
    let stack = Stack::start(opts.clone()).await.unwrap();
    let mut rx = stack.progress.subscribe();
    let run = push_to(&stack, &opts.policy, None).await;
    let link = match wait_for(&mut rx, "an approval link", |p| matches!(p, Progress::Approval { run: r, .. } if *r == run)).await {
        Progress::Approval { link, .. } => link,
        _ => unreachable!(),
    };
    let staging = stack.kube.image("aks-staging", "shop", "shop").unwrap();
    assert!(staging.starts_with("contosodev.azurecr.io/shop@sha256:"), "staging runs the pushed digest: {staging}");
    let digest = staging.split_once('@').unwrap().1.to_string();
    assert!(stack.arm.imports().is_empty(), "nothing promoted before the approval");
    client::decide(&link, "approve", None).await.unwrap();
    let done = wait_status(&stack, &run, "succeeded").await;

    // Promotion: one import of exactly that digest into the production registry.
    let imports = stack.arm.imports();
    assert_eq!(imports.len(), 1, "{imports:#?}");
    assert_eq!(imports[0]["sourceImage"], format!("shop@{digest}"));
    assert!(imports[0]["registry"].as_str().unwrap().ends_with("/registries/contosoprod"));
    assert!(imports[0]["source"].as_str().unwrap().ends_with("/registries/contosodev"));
    assert_eq!(imports[0]["mode"], "NoForce");
    let prod = stack.kube.image("aks-prod", "shop", "shop").unwrap();
    assert_eq!(prod, format!("contosoprod.azurecr.io/shop@{digest}"), "production runs the promoted digest");
    assert_eq!(stack.kube.annotations("aks-prod", "shop", "shop")["deploychain.dev/run"], run.as_str());
    // The clusters' logs: one image patch each, conditional on the version read, by strategic merge.
    let patches: Vec<_> = stack.kube.seen().into_iter().filter(|s| s.method == "PATCH").collect();
    assert_eq!(patches.iter().map(|p| p.path.split('/').nth(1).unwrap().to_string()).collect::<Vec<_>>(), ["aks-staging", "aks-prod"]);
    assert!(patches.iter().all(|p| p.status == 200 && p.body["metadata"]["resourceVersion"].is_string()), "{patches:#?}");
    assert!(done["steps"].to_string().contains("deployed to production"));
    stack.discard().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_that_never_becomes_available_rolls_the_deployment_back_and_fails_the_run() {
    let mut opts = options_with_policy("aks-bad", CONTAINER_POLICY);
    opts.sim.unhealthy_images = vec!["bad".into()];
    let stack = Stack::start(opts.clone()).await.unwrap();
    let before = stack.kube.image("aks-staging", "shop", "shop").unwrap();
    let run = push_to(&stack, &opts.policy, Some("bad")).await;
    let done = wait_status(&stack, &run, "failed").await;
    let text = done.to_string();
    assert!(text.contains("deployment to staging rolled back") && text.contains("progress deadline"), "{text}");
    assert_eq!(stack.kube.image("aks-staging", "shop", "shop").unwrap(), before, "back on the previous ReplicaSet's image");
    assert_eq!(stack.kube.annotations("aks-staging", "shop", "shop")["deploychain.dev/rolledback"], run.as_str());
    assert!(stack.arm.imports().is_empty() && stack.kube.seen().iter().all(|s| !s.path.starts_with("/aks-prod")), "production untouched");
    stack.discard().await;
}

// ------------------------------------------------------------------ rollouts under Azure's limits

/// The shipped policy with production promoted by policy (no approval).
fn policy_without_approval() -> String {
    let shipped = std::fs::read_to_string(repo().join("policy.toml")).unwrap();
    shipped.lines().filter(|l| !l.starts_with("approval = ")).collect::<Vec<_>>().join("\n")
}

/// Issue "2 of 7", done: the local host held to Azure's limits at a smaller scale — functionTimeout
/// and lock renewal 6 s (as app settings override host.json in Azure), a rollout of 12 s per stage
/// (3 instances × 4 s, one at a time) and a 20 s `Retry-After` on the first staging PATCH. The
/// release reaches production with no function timeout, no handler restart, nothing dead-lettered
/// or parked, one accepted PATCH per scale set, and every invocation well under the timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_whose_rollouts_outlast_the_function_timeout_reaches_production_in_short_steps() {
    // The scenario `deploychain up --config examples/azure-limits.local.toml` runs.
    let local = deploychain::config::LocalConfig::load_required(&repo().join("examples/azure-limits.local.toml")).unwrap();
    let mut opts = options_with_policy("azure-limits", &policy_without_approval());
    opts.arm = local.arm;
    opts.extra_settings = local.settings;
    assert_eq!((opts.arm.instances, opts.arm.upgrade_time), (3, Duration::from_secs(4)), "12 s per stage");
    let limit = |k: &str| opts.extra_settings.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    assert_eq!(limit("AzureFunctionsJobHost__functionTimeout").as_deref(), Some("00:00:06"));
    assert_eq!(limit("AzureFunctionsJobHost__extensions__serviceBus__maxAutoLockRenewalDuration").as_deref(), Some("00:00:06"));
    let stack = Stack::start(opts.clone()).await.unwrap();
    let run = push_to(&stack, &opts.policy, None).await;

    // Between looks the run says where the rollout is.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(150);
    let mut seen = Vec::new();
    let done = loop {
        let Ok(text) = client::runs(&base(&stack), &stack.secrets, Some(&run), None).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let v: Value = serde_json::from_str(&text).unwrap();
        if let Some(t) = v["waiting"]["text"].as_str()
            && !seen.iter().any(|s: &String| s == t)
        {
            seen.push(t.to_string());
        }
        if v["status"] == "succeeded" || v["status"] == "failed" {
            break v;
        }
        assert!(tokio::time::Instant::now() < deadline, "run {run} did not end: {v}\nwaits seen: {seen:#?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(done["status"], "succeeded", "{done}");
    let waits = seen.join("\n");
    assert!(waits.contains("retry 1 at") && waits.contains("throttled"), "the throttled PATCH is said and retried:\n{waits}");
    assert!(waits.contains("batch 2 of 3"), "the batch a rollout is at is said:\n{waits}");
    assert!(waits.contains("so far"), "and since when:\n{waits}");

    // One accepted PATCH per scale set; the throttled one waited its 20 s.
    let log = stack.arm.requests();
    for stage in ["staging", "production"] {
        let patches: Vec<_> = log.iter().filter(|r| r.method == "PATCH" && r.path == target(stage)).collect();
        let accepted = patches.iter().filter(|r| r.status == 200).count();
        assert_eq!(accepted, 1, "{stage}: {:?}", patches.iter().map(|r| r.status).collect::<Vec<_>>());
        if stage == "staging" {
            assert_eq!(patches[0].status, 429);
            let waited = patches[1].at - patches[0].at;
            assert!(waited >= chrono::Duration::seconds(20), "Retry-After: 20 honoured, waited {waited}");
        }
    }
    // No timeout, no restart, nothing abandoned, dead-lettered or parked.
    assert_eq!(stack.host.worker.restarts(), 0, "the handler was restarted");
    for (function, c) in stack.host.invocations() {
        assert_eq!(c.failed, 0, "{function}: {c:?}");
        assert_eq!(c.abandoned, 0, "{function}: {c:?}");
    }
    let looks = stack.host.invocations().get("on_deployment_due").map(|c| c.answered).unwrap_or(0);
    assert!(looks >= 6, "the rollouts went on in scheduled looks ({looks})");
    for sub in deploychain_functions::ops::SUBSCRIPTIONS {
        let path: EntityPath = format!("deploychain-events/subscriptions/{sub}").parse().unwrap();
        assert_eq!(stack.broker.count(&path).await.unwrap().dead_lettered, 0, "{sub} dead-lettered");
    }
    let parked: EntityPath = "deploychain-parked".parse().unwrap();
    assert_eq!(stack.broker.count(&parked).await.unwrap().active, 0, "parked");
    stack.discard().await;
}
