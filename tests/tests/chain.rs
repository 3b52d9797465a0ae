//! Whole-chain scenarios: the real `handler` binary under the local Functions host, the embedded
//! durable bus, the simulators — everything `deploychain up` starts, on free ports, in a temporary
//! data directory. Each scenario is bounded in time.
#![allow(clippy::unwrap_used)]

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
        handler: handler(),
        http_port: 0,
        bus_port: 0,
        sim: SimConfig {
            build_delay: Duration::from_millis(50),
            image_delay: Duration::from_millis(50),
            failing_builds: vec![],
            failing_targets: vec![],
        },
    }
}

/// Options for a scenario, starting from an empty data directory.
fn options(name: &str) -> StackOptions {
    let _ = std::fs::remove_dir_all(data_dir(name));
    options_keep(name)
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
    let body = client::sample_push(&repo().join("policy.toml"), None).unwrap();
    let (status, text) = client::send_github(&base(stack), &stack.secrets, "push", &body).await.unwrap();
    assert_eq!(status, 202, "{text}");
    serde_json::from_str::<Value>(&text).unwrap()["run"].as_str().unwrap().to_string()
}

fn rollouts(stack: &Stack) -> Vec<deploychain_functions::adapters::simulated::Rollout> {
    deploychain_functions::adapters::simulated::SimulatedScaleSets::rollouts(&stack.data_dir.join("state").join("scalesets.sqlite"))
        .unwrap_or_default()
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
    let r: Vec<_> = rollouts(&stack).into_iter().filter(|r| r.run_id == run).map(|r| r.stage).collect();
    assert_eq!(r, vec!["staging", "production"]);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_webhooks_and_unknown_branches_enqueue_nothing() {
    let stack = Stack::start(options("forged")).await.unwrap();
    let body = client::sample_push(&repo().join("policy.toml"), None).unwrap();
    let rsp = reqwest::Client::new()
        .post(format!("{}/api/hooks/github", base(&stack)))
        .header("x-github-event", "push")
        .header("x-hub-signature-256", client::github_signature("not-the-secret", &body))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(rsp.status(), 401);
    let body = client::sample_push(&repo().join("policy.toml"), Some("feature/nope")).unwrap();
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
    stack.stop().await;
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
    let r: Vec<_> = rollouts(&stack).into_iter().filter(|r| r.run_id == run).map(|r| r.stage).collect();
    assert_eq!(r, vec!["staging", "production"], "each stage rolled out exactly once");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_message_is_parked_at_once_and_other_runs_go_on() {
    let stack = Stack::start(options("poison")).await.unwrap();
    stack
        .broker
        .send(
            "deploychain-events",
            NewMessage {
                body: b"{\"this\": \"is not a CloudEvent\"}".to_vec(),
                message_id: Some("poison-1".into()),
                session_id: Some("web".into()),
                label: Some("dev.deploychain.push.v1".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
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
    let counts = stack.broker.count(&on_push.dead_letter_queue()).await.unwrap();
    assert_eq!(counts.active, 0, "not retried into the dead-letter queue");
    // Another run is unaffected.
    let mut rx = stack.progress.subscribe();
    let run = push(&stack).await;
    wait_for(&mut rx, "approval", |p| matches!(p, Progress::Approval { run: r, .. } if *r == run)).await;
    stack.stop().await;
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
    // Same data directory, new processes, new ports: the build request is redelivered and the run goes on.
    opts.sim.build_delay = Duration::from_millis(50);
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
    assert_eq!(run_json(&stack, &run).await["status"], "waiting");
    let link = link.replace(&url::Url::parse(&link).unwrap()[..url::Position::BeforePath], &base(&stack));
    let (status, _) = client::decide(&link, "approve", None).await.unwrap();
    assert_eq!(status, 200);
    wait_status(&stack, &run, "succeeded").await;
    let r: Vec<_> = rollouts(&stack).into_iter().filter(|r| r.run_id == run).map(|r| r.stage).collect();
    assert_eq!(r, vec!["staging", "production"]);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_message_ids_are_delivered_once_and_sessions_keep_their_order() {
    let stack = Stack::start(options("dupes")).await.unwrap();
    // The same push delivered twice (GitHub redelivery): one message, one run.
    let body = client::sample_push(&repo().join("policy.toml"), None).unwrap();
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
    stack.stop().await;
}
