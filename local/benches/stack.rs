//! The local stack under load: a benchmark that prints figures, not a timed test.
//! `cargo bench -p deploychain --bench stack` runs every part; `-- cold-start`, `-- chain`,
//! `-- throughput`, `-- replay`, `-- soak` or `-- waiting` runs one (several may be named).
//! Numbers set the sizes: `-- chain 1000` (runs), `-- throughput 100 5` (apps, rounds),
//! `-- replay 10000` (letters), `-- waiting 3 60` (releases, Azure's timings divided by).
//! Under `cargo test --benches` every part runs at a tiny size, as a smoke test.
//!
//! Each part prints its figures against a floor measured in the same run:
//! - cold start: process exec → first 200 on `GET /` (median of 20), idle RSS and binary size of
//!   the release `handler`, against this benchmark's own binary re-executed as a bare axum server;
//! - chain: push accepted → production deployed through everything `deploychain up` starts, with
//!   zero-delay simulators and the production approval given the moment its link is issued, one
//!   run at a time; per step, against one durable bus hop plus one loopback HTTP call;
//! - throughput: 100 apps pushing at once, round after round; events and invocations per second,
//!   nothing lost (every event published is settled, every run succeeds), against the bus's and
//!   SQLite's own commit rates on the same disk;
//! - replay: dead-lettered events replayed with the operators' replay (`DeadLetters::replay`, what
//!   `deploychain dlq replay` and `ops_deadletters` run) through the bus's REST API, against the
//!   bus moving the same number of messages in process.
#![allow(clippy::unwrap_used)]

use deploychain::arm::ArmSimConfig;
use deploychain::client;
use deploychain::config::SimConfig;
use deploychain::stack::{Stack, StackOptions};
use deploychain::watch::Progress;
use deploychain_bus::{Broker, EntityPath, NewMessage, Queue, Topology};
use deploychain_events::EventType;
use deploychain_functions::adapters::sqlite::SqliteStore;
use deploychain_functions::adapters::{RunQuery, RunStatus, Store};
use serde_json::Value;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::broadcast;

const NOOP_ENV: &str = "DEPLOYCHAIN_BENCH_NOOP_PORT";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize().unwrap()
}

/// The handler the benchmark runs: `DEPLOYCHAIN_BENCH_HANDLER` when set (to compare builds, e.g.
/// the glibc `target/release/handler` against the shipped one); under `cargo test --benches` the
/// debug one beside the tests; else the one `deploychain package` ships (release, static musl),
/// built first.
fn handler() -> PathBuf {
    static HANDLER: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    HANDLER.get_or_init(find_handler).clone()
}

fn find_handler() -> PathBuf {
    if let Some(h) = std::env::var_os("DEPLOYCHAIN_BENCH_HANDLER") {
        return PathBuf::from(h);
    }
    let exe = std::env::current_exe().unwrap();
    let beside = exe.parent().and_then(Path::parent).unwrap().join("handler");
    if cfg!(debug_assertions) && beside.is_file() {
        return beside;
    }
    deploychain::package::build_handler(&repo()).unwrap()
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn data_dir(part: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("deploychain-bench-{part}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Everything `deploychain up` starts, with zero-delay simulators, on free ports.
fn options(part: &str, policy: &str) -> StackOptions {
    let dir = data_dir(part);
    let policy_path = dir.join("policy.toml");
    std::fs::write(&policy_path, policy).unwrap();
    StackOptions {
        repo: repo(),
        data_dir: dir,
        policy: policy_path,
        app: deploychain::stack::AppSource::Handler(handler()),
        http_port: 0,
        bus_port: 0,
        arm_port: 0,
        status_port: 0,
        sim: SimConfig { build_delay: Duration::ZERO, image_delay: Duration::ZERO, failing_builds: vec![], unhealthy_images: vec![] },
        arm: ArmSimConfig {
            operation_time: Duration::ZERO,
            upgrade_time: Duration::ZERO,
            health_delay: Duration::ZERO,
            poll_interval: Duration::from_millis(1),
            health_timeout: Duration::from_secs(30),
            ..ArmSimConfig::default()
        },
        watchdog: deploychain::config::WatchdogConfig::default(),
        extra_settings: vec![
            ("DEPLOYCHAIN_BAKE_LOOK_EVERY".into(), "1ms".into()),
            // The handler's own log lines would be the benchmark's biggest cost.
            ("RUST_LOG".into(), "warn".into()),
        ],
    }
}

const SUB: &str = "/subscriptions/00000000-0000-0000-0000-000000000000";

/// `apps` GitHub apps, each baked by VM Image Builder and deployed to staging then production.
fn policy(apps: usize, approval: bool) -> String {
    policy_with(apps, if approval { 1 } else { 0 }, "24h")
}

/// As [`policy`], production approved by alice in every `approval_every`-th app (none for 0),
/// each approval expiring after `expires`.
fn policy_with(apps: usize, approval_every: usize, expires: &str) -> String {
    let mut p = String::new();
    for i in 0..apps {
        let approval = approval_every > 0 && i % approval_every == 0;
        let name = format!("app{i:03}");
        p.push_str(&format!(
            r#"
[[app]]
name = "{name}"
source = {{ github = "bench/{name}" }}
branches = ["main"]
build = {{ provider = "github-actions", pipeline = "build.yml" }}
image = {{ source = "image-builder", destination = "{SUB}/resourceGroups/rg-images/providers/Microsoft.Compute/galleries/deploychain/images/{name}" }}
[[app.stage]]
name = "staging"
target = "{SUB}/resourceGroups/rg-{name}/providers/Microsoft.Compute/virtualMachineScaleSets/{name}-staging"
checks = [{{ kind = "http", url = "http://{name}-staging.internal/healthz" }}]
[[app.stage]]
name = "production"
target = "{SUB}/resourceGroups/rg-{name}/providers/Microsoft.Compute/virtualMachineScaleSets/{name}-prod"
{}
"#,
            if approval { format!(r#"approval = {{ approvers = ["alice@contoso.com"], expires_after = "{expires}" }}"#) } else { String::new() }
        ));
    }
    p
}

/// A push of a new commit of `app` (the sample payload `deploychain send github push` sends).
fn push_of(policy_path: &Path, app: usize) -> Vec<u8> {
    let mut v: Value = serde_json::from_slice(&client::sample_push(policy_path, None, None).unwrap()).unwrap();
    v["repository"]["full_name"] = Value::String(format!("bench/app{app:03}"));
    serde_json::to_vec(&v).unwrap()
}

async fn push(stack: &Stack, body: &[u8]) -> String {
    let (status, text) = client::send_github(&format!("http://{}", stack.http_addr), &stack.secrets, "push", body).await.unwrap();
    assert_eq!(status, 202, "{text}");
    serde_json::from_str::<Value>(&text).unwrap()["run"].as_str().unwrap().to_string()
}

/// Counts every chain event the stack's progress view sees (missed ones included, by the
/// broadcast channel's own count), and passes approval links and run ends on.
struct Seen {
    events: Arc<AtomicU64>,
}

fn follow(stack: &Stack) -> (Seen, tokio::sync::mpsc::UnboundedReceiver<Progress>) {
    let mut rx = stack.progress.subscribe();
    let events = Arc::new(AtomicU64::new(0));
    let (tx, out) = tokio::sync::mpsc::unbounded_channel();
    let counter = events.clone();
    tokio::spawn(async move {
        loop {
            match rx.recv().await {
                Ok(p) => {
                    if matches!(p, Progress::Event { .. }) {
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                    if matches!(&p, Progress::Approval { .. } | Progress::Event { ty: EventType::RunFinished, .. }) && tx.send(p).is_err() {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    eprintln!("(the progress view dropped {n} items: counted, but approval links among them are lost)");
                    counter.fetch_add(n, Ordering::Relaxed);
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    (Seen { events }, out)
}

async fn runs_json(stack: &Stack, id: Option<&str>) -> Value {
    serde_json::from_str(&client::runs(&format!("http://{}", stack.http_addr), &stack.secrets, id, None).await.unwrap()).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Cold start

/// This binary re-executed as the floor: a bare multi-threaded tokio runtime and an axum route.
fn noop_server(port: u16) {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let app = axum::Router::new().route("/", axum::routing::get(|| async { "ready" }));
        axum::serve(listener, app).await.unwrap();
    });
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `GET /` answered 200?
fn ready(port: u16) -> bool {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return false };
    if s.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 12];
    s.read_exact(&mut buf).is_ok() && &buf[9..12] == b"200"
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()).unwrap_or(0)
}

/// Exec → first 200, and the idle RSS a second later, for each of `n` starts.
fn starts(
    n: usize,
    mut first_invocation: Option<&mut Vec<Duration>>,
    mut command: impl FnMut(u16, usize) -> std::process::Command,
) -> (Vec<Duration>, Vec<u64>) {
    let (mut times, mut rss) = (Vec::new(), Vec::new());
    for i in 0..n {
        let port = free_port();
        let mut cmd = command(port, i);
        cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
        let t = Instant::now();
        let mut child = cmd.spawn().unwrap();
        while !ready(port) {
            assert!(t.elapsed() < Duration::from_secs(20), "no 200 on GET / within 20 s");
            assert!(child.try_wait().unwrap().is_none(), "the process exited before it was ready");
            std::thread::sleep(Duration::from_micros(100));
        }
        times.push(t.elapsed());
        if let Some(first) = first_invocation.as_mut() {
            // The first invocation (a `runs` query): answered once the adapters are built.
            let env =
                br#"{"Data":{"req":{"Url":"http://127.0.0.1/api/runs","Method":"GET","Query":{},"Headers":{},"Params":{}}},"Metadata":{}}"#;
            assert!(post_200(port, "/runs", env), "the first invocation was not answered 200");
            first.push(t.elapsed());
        }
        if i < 3 {
            std::thread::sleep(Duration::from_secs(1));
            rss.push(rss_kib(child.id()));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    times.sort();
    if let Some(first) = first_invocation {
        first.sort();
    }
    (times, rss)
}

/// POST `body` to `path`, as the host posts an invocation: answered 200?
fn post_200(port: u16, path: &str, body: &[u8]) -> bool {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return false };
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if s.write_all(head.as_bytes()).and_then(|_| s.write_all(body)).is_err() {
        return false;
    }
    let mut buf = [0u8; 12];
    s.read_exact(&mut buf).is_ok() && &buf[9..12] == b"200"
}

fn file_mb(p: &Path) -> f64 {
    std::fs::metadata(p).map(|m| m.len() as f64 / 1e6).unwrap_or(0.0)
}

fn cold_start(n: usize) {
    let handler = handler();
    let dir = data_dir("cold-start");
    // The app settings `deploychain up` gives the handler (nothing it reaches at start is running:
    // it connects to nothing before it listens).
    let opts = options("cold-start-settings", &policy(1, true));
    let settings = {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let stack = Stack::start(opts).await.unwrap();
            let text = std::fs::read_to_string(stack.data_dir.join("app/local.settings.json")).unwrap();
            let policy = stack.data_dir.join("policy.toml");
            let data = stack.data_dir.clone();
            stack.stop().await;
            let v: Value = serde_json::from_str(&text).unwrap();
            let mut s: Vec<(String, String)> =
                v["Values"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string())).collect();
            s.push(("DEPLOYCHAIN_POLICY".into(), policy.display().to_string()));
            (s, data)
        })
    };
    let (settings, settings_dir) = settings;
    let exe = std::env::current_exe().unwrap();
    let (floor, floor_rss) = starts(n, None, |port, _| {
        let mut c = std::process::Command::new(&exe);
        c.env(NOOP_ENV, port.to_string());
        c
    });
    let mut first = Vec::new();
    let (times, rss) = starts(n, Some(&mut first), |port, i| {
        let mut c = std::process::Command::new(&handler);
        c.env_clear().envs(settings.iter().cloned()).env("FUNCTIONS_CUSTOMHANDLER_PORT", port.to_string());
        // A new, empty SQLite store each start: the schema is created as on a first start.
        c.env("DEPLOYCHAIN_STORE", format!("sqlite:{}", dir.join(format!("state-{i}.sqlite")).display()));
        c
    });
    let stripped = dir.join("handler.stripped");
    let strip = std::process::Command::new("strip").arg("-o").arg(&stripped).arg(&handler).status().map(|s| s.success()).unwrap_or(false);
    let (f50, h50) = (pct(&floor, 0.5), pct(&times, 0.5));
    println!("cold start ({n} starts each; exec → first 200 on GET /):");
    println!("  bare axum server (floor)   median {:>9}   min {:>9}   max {:>9}", ms(f50), ms(floor[0]), ms(floor[n - 1]));
    println!(
        "  handler                    median {:>9}   min {:>9}   max {:>9}   ({:.2}× the floor; goal < 20 ms)",
        ms(h50),
        ms(times[0]),
        ms(times[n - 1]),
        h50.as_secs_f64() / f50.as_secs_f64()
    );
    println!(
        "  handler, first invocation answered  median {:>9}   max {:>9}   (the adapters are built while `GET /` already answers)",
        ms(pct(&first, 0.5)),
        ms(first[n - 1])
    );
    let mean = |v: &[u64]| v.iter().sum::<u64>() as f64 / v.len().max(1) as f64 / 1024.0;
    println!(
        "  idle RSS: handler {:.1} MiB, floor {:.1} MiB ({:.2}×; goal < 20 MB)",
        mean(&rss),
        mean(&floor_rss),
        mean(&rss) / mean(&floor_rss)
    );
    if strip {
        println!("  handler binary: {:.1} MB, {:.1} MB stripped (goal < 20 MB)", file_mb(&handler), file_mb(&stripped));
    } else {
        println!("  handler binary: {:.1} MB (no `strip` here to strip it)", file_mb(&handler));
    }
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&settings_dir);
}

// ---------------------------------------------------------------------------------------------
// Floors on the stack's own disk

/// One durable bus hop (send, peek-lock, complete: three commits), `n` times, p50 and rate.
async fn bus_hop(dir: &Path, n: usize) -> (Duration, f64) {
    let mut t = Topology::new("floor");
    t.add_queue(Queue::new("hop")).unwrap();
    let b = Broker::open(&dir.join("floor-bus.sqlite"), t).unwrap();
    let q = EntityPath::queue("hop");
    let body = vec![b'x'; 2048];
    let mut lat = Vec::new();
    let start = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        b.send("hop", NewMessage { message_id: Some(format!("m-{i}")), ..NewMessage::new(body.clone()) }).await.unwrap();
        let m = b.peek_lock(&q, Duration::ZERO).await.unwrap().unwrap();
        b.complete(&q, m.lock_token.unwrap()).await.unwrap();
        lat.push(t.elapsed());
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    lat.sort();
    (pct(&lat, 0.5), rate)
}

/// Raw SQLite commits per second (WAL, synchronous=FULL, one small insert per transaction).
fn sqlite_commits(dir: &Path, n: usize) -> f64 {
    let c = rusqlite::Connection::open(dir.join("floor-raw.sqlite")).unwrap();
    c.pragma_update(None, "journal_mode", "WAL").unwrap();
    c.pragma_update(None, "synchronous", "FULL").unwrap();
    c.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, body BLOB)", []).unwrap();
    let body = vec![b'x'; 2048];
    let start = Instant::now();
    for i in 0..n {
        c.execute("INSERT INTO t (id, body) VALUES (?1, ?2)", rusqlite::params![i as i64, body]).unwrap();
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// A loopback HTTP round trip to the running handler (`GET /`), p50.
async fn http_hop(url: &str, n: usize) -> Duration {
    let c = reqwest::Client::new();
    let mut lat = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        assert!(c.get(url).send().await.unwrap().status().is_success());
        lat.push(t.elapsed());
    }
    lat.sort();
    pct(&lat, 0.5)
}

// ---------------------------------------------------------------------------------------------
// Chain

/// Push a new commit of the policy's first app and follow its run to production, approving the
/// moment a link is issued; `limit` is the longest any one step may take. The run's id.
async fn release(stack: &Stack, rx: &mut tokio::sync::mpsc::UnboundedReceiver<Progress>, policy_path: &Path, limit: Duration) -> String {
    let run = push(stack, &push_of(policy_path, 0)).await;
    loop {
        let p = tokio::time::timeout(limit, rx.recv()).await.unwrap_or_else(|_| panic!("run {run}: nothing for {limit:?}")).unwrap();
        match p {
            Progress::Approval { run: r, link, .. } if r == run => {
                let (status, text) = client::decide(&link, "approve", Some("benchmark")).await.unwrap();
                assert_eq!(status, 200, "{text}");
            }
            Progress::Event { run: r, ty: EventType::RunFinished, line } if r == run => {
                assert!(line.contains("succeeded"), "run {run}: {line}");
                return run;
            }
            _ => {}
        }
    }
}

async fn chain(n: usize) {
    let stack = Stack::start(options("chain", &policy(1, true))).await.unwrap();
    let (_seen, mut rx) = follow(&stack);
    let policy_path = stack.data_dir.join("policy.toml");
    let mut latency = Vec::new();
    let mut invocations = Vec::new();
    // Step timelines of the first and the last 20 runs: where the time goes, and what grows.
    let mut gaps: [HashMap<String, Vec<Duration>>; 2] = Default::default();
    let mut order: Vec<String> = Vec::new();
    let total = |stack: &Stack| stack.host.invocations().values().map(|c| c.answered + c.failed).sum::<u64>();
    for i in 0..n + 1 {
        let before = total(&stack);
        let t = Instant::now();
        let run = release(&stack, &mut rx, &policy_path, Duration::from_secs(60)).await;
        let took = t.elapsed();
        // The first run warms everything up; it is not counted.
        if i == 0 {
            continue;
        }
        latency.push(took);
        // Wait until the last invocations of the run are counted (the watch saw the event first).
        tokio::time::sleep(Duration::from_millis(5)).await;
        invocations.push(total(&stack) - before);
        let sample = if i <= 20 {
            Some(0)
        } else if i + 20 > n {
            Some(1)
        } else {
            None
        };
        if let Some(k) = sample {
            let v = runs_json(&stack, Some(&run)).await;
            let steps = v["steps"].as_array().unwrap();
            let mut prev: Option<chrono::DateTime<chrono::Utc>> = None;
            for step in steps {
                let (Some(at), Some(what)) =
                    (step["at"].as_str().and_then(|a| a.parse::<chrono::DateTime<chrono::Utc>>().ok()), step["what"].as_str())
                else {
                    continue;
                };
                if let Some(p) = prev {
                    if !order.iter().any(|o| o == what) {
                        order.push(what.to_string());
                    }
                    gaps[k].entry(what.to_string()).or_default().push((at - p).to_std().unwrap_or_default());
                }
                prev = Some(at);
            }
        }
    }
    let hop_dir = stack.data_dir.clone();
    let (bus, _) = bus_hop(&hop_dir, 500.min(n * 50).max(20)).await;
    let http = http_hop(&format!("http://127.0.0.1:{}/", handler_port(&stack)), 500.min(n * 50).max(20)).await;
    stack.stop().await;
    // Does a run get slower as runs pile up? The first tenth against the last.
    let tenth = (n / 10).max(1);
    let median = |v: &[Duration]| {
        let mut v = v.to_vec();
        v.sort();
        pct(&v, 0.5)
    };
    let (early, late) = (median(&latency[..tenth]), median(&latency[n - tenth..]));
    latency.sort();
    let per_run = invocations.iter().sum::<u64>() as f64 / invocations.len() as f64;
    let (p50, p99) = (pct(&latency, 0.5), pct(&latency, 0.99));
    let floor = bus + http;
    println!("chain: push accepted → production deployed, {n} runs one at a time (zero-delay simulators, approval given at once):");
    println!("  per run     p50 {:>9}   p99 {:>9}   min {:>9}   max {:>9}", ms(p50), ms(p99), ms(latency[0]), ms(latency[n - 1]));
    println!("  p50 of the first tenth of the runs {:>9}, of the last tenth {:>9}", ms(early), ms(late));
    println!(
        "  per step    p50 {:>9} ({per_run:.1} handler invocations a run)   floor: a durable bus hop {} + a loopback HTTP call {} = {}   ({:.1}× the floor; goal < 50 ms)",
        ms(p50.div_f64(per_run)),
        ms(bus),
        ms(http),
        ms(floor),
        p50.div_f64(per_run).as_secs_f64() / floor.as_secs_f64()
    );
    println!("  time to each step of the run's timeline from the one before (p50 over the first and the last {} runs):", n.min(20));
    for what in order {
        let [first, last] = [0, 1].map(|k| {
            let mut g = gaps[k].remove(&what).unwrap_or_default();
            g.sort();
            if g.is_empty() { "-".to_string() } else { ms(pct(&g, 0.5)) }
        });
        println!("    {what:<40} {first:>9} {last:>9}");
    }
    let _ = std::fs::remove_dir_all(&hop_dir);
}

/// What waiting costs (issue "2 of 7"): releases through everything `deploychain up` starts, with
/// Azure's timings divided by `scale` — a CI build 5 min, a VM Image Builder bake 20 min, an
/// instance upgrade 4 min and a minute to turn healthy, 3 instances a scale set, the handler's
/// polls and bake looks scaled alike — one release at a time, production approved the moment its
/// link is issued. Per release: the wall time against the handler's time (the summed durations of
/// its invocations, what Flex Consumption bills). Goal: handler time under 2 s a release (in
/// Azure's time) and under 1% of the wall time, however long the rollout.
async fn waiting(releases: usize, scale: u32) {
    let azure = |secs: u64| Duration::from_secs(secs) / scale;
    let mut opts = options("waiting", &policy(1, true));
    opts.sim.build_delay = azure(5 * 60);
    opts.sim.image_delay = azure(20 * 60);
    opts.arm.instances = 3;
    opts.arm.operation_time = azure(30);
    opts.arm.upgrade_time = azure(4 * 60);
    opts.arm.health_delay = azure(60);
    // A look is a scheduled message: a second at the soonest, whatever the scale.
    opts.arm.poll_interval = azure(5).max(Duration::from_secs(1));
    opts.arm.health_timeout = azure(10 * 60);
    opts.extra_settings.retain(|(k, _)| k != "DEPLOYCHAIN_BAKE_LOOK_EVERY");
    opts.extra_settings.push(("DEPLOYCHAIN_BAKE_LOOK_EVERY".into(), format!("{}ms", azure(60).as_millis().max(1))));
    let stack = Stack::start(opts).await.unwrap();
    let (_seen, mut rx) = follow(&stack);
    let policy_path = stack.data_dir.join("policy.toml");
    let busy = |stack: &Stack| stack.host.invocations().values().map(|c| c.busy).sum::<Duration>();
    let calls = |stack: &Stack| stack.host.invocations().values().map(|c| c.answered + c.failed).sum::<u64>();
    let (mut walls, mut handler, mut invocations) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..releases {
        let (before, before_calls) = (busy(&stack), calls(&stack));
        let t = Instant::now();
        release(&stack, &mut rx, &policy_path, Duration::from_secs(600)).await;
        walls.push(t.elapsed());
        // The invocation that finished the run is counted once its answer is back.
        tokio::time::sleep(Duration::from_millis(200)).await;
        handler.push(busy(&stack) - before);
        invocations.push(calls(&stack) - before_calls);
    }
    stack.stop().await;
    let mean = |v: &[Duration]| v.iter().sum::<Duration>() / v.len().max(1) as u32;
    let (wall, busy) = (mean(&walls), mean(&handler));
    let per_release = invocations.iter().sum::<u64>() as f64 / invocations.len().max(1) as f64;
    println!(
        "waiting: {releases} releases, Azure's timings ÷ {scale} (build 5 min, bake 20 min, 3 instances × (4 min upgrade + 1 min to healthy) per stage):"
    );
    println!("  wall time per release     {:>10}   ({:.1} min in Azure's time)", ms(wall), (wall * scale).as_secs_f64() / 60.0);
    // The handler's time is its work, not waiting: it does not scale with Azure's timings
    // (only the wall time does), so it is compared with Azure's wall time as it is.
    println!(
        "  handler time per release  {:>10}   ({per_release:.0} invocations, {} each on average; goal < 2 s)",
        ms(busy),
        ms(busy / per_release.max(1.0) as u32)
    );
    println!(
        "  handler time / wall time  {:>9.2}%   against Azure's wall time (goal < 1%: waiting should cost nothing); {:.1}% against this run's, {scale}× shorter",
        100.0 * busy.as_secs_f64() / (wall * scale).as_secs_f64(),
        100.0 * busy.as_secs_f64() / wall.as_secs_f64()
    );
    for (i, (w, b)) in walls.iter().zip(&handler).enumerate() {
        println!("    release {}: wall {:>10}, handler {:>10}", i + 1, ms(*w), ms(*b));
    }
}

/// The port the stack's handler listens on (from its local.settings-derived environment).
fn handler_port(stack: &Stack) -> u16 {
    stack.host.worker.live_port().expect("the handler is live")
}

// ---------------------------------------------------------------------------------------------
// Throughput

async fn throughput(apps: usize, rounds: usize) {
    let stack = Stack::start(options("throughput", &policy(apps, false))).await.unwrap();
    let (seen, _rx) = follow(&stack);
    let store = SqliteStore::open(&stack.data_dir.join("state").join("state.sqlite")).unwrap();
    let policy_path = stack.data_dir.join("policy.toml");
    let bodies: Vec<Vec<Vec<u8>>> = (0..rounds).map(|_| (0..apps).map(|a| push_of(&policy_path, a)).collect()).collect();
    let start = Instant::now();
    for round in bodies {
        let mut waiting: std::collections::HashSet<String> = std::collections::HashSet::new();
        let pushes: Vec<_> = round
            .into_iter()
            .map(|b| {
                let base = format!("http://{}", stack.http_addr);
                let secrets = stack.secrets.clone();
                tokio::spawn(async move {
                    let (status, text) = client::send_github(&base, &secrets, "push", &b).await.unwrap();
                    assert_eq!(status, 202, "{text}");
                    serde_json::from_str::<Value>(&text).unwrap()["run"].as_str().unwrap().to_string()
                })
            })
            .collect();
        for p in pushes {
            let id = p.await.unwrap();
            waiting.insert(id);
        }
        // The handler's own store says when each run ends (the progress view may drop events).
        let deadline = Instant::now() + Duration::from_secs(300);
        while !waiting.is_empty() {
            let mut ended = Vec::new();
            for id in &waiting {
                if let Some(r) = store.run(id).await.unwrap()
                    && r.status.is_final()
                {
                    assert_eq!(r.status, RunStatus::Succeeded, "run {id}");
                    ended.push(id.clone());
                }
            }
            for id in ended {
                waiting.remove(&id);
            }
            assert!(
                Instant::now() < deadline,
                "{} runs did not end within five minutes: {:?}",
                waiting.len(),
                waiting.iter().take(5).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Everything settles: nothing left on any subscription, nothing dead-lettered or parked.
    let topology = deploychain::stack::topology(&repo()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let settle = loop {
        let mut left = Vec::new();
        for t in &topology.topics {
            // `audit` is for a sink outside the stack (nothing here reads it).
            for s in t.subscriptions.iter().filter(|s| s.name != "audit") {
                let p: EntityPath = format!("{}/subscriptions/{}", t.name, s.name).parse().unwrap();
                let c = stack.broker.count(&p).await.unwrap();
                if c.active + c.locked + c.scheduled + c.dead_lettered > 0 {
                    left.push(format!("{}: {c:?}", s.name));
                }
            }
        }
        let parked = stack.broker.count(&"deploychain-parked".parse().unwrap()).await.unwrap();
        if parked.active + parked.dead_lettered > 0 {
            left.push(format!("parked: {parked:?}"));
        }
        if left.is_empty() {
            break start.elapsed();
        }
        assert!(Instant::now() < deadline, "not settled: {left:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let counts = stack.host.invocations();
    let bus_fns =
        ["on_push", "on_build_completed", "on_image_due", "on_image_ready", "on_deployment_due", "on_approval", "on_approval_due"];
    let (mut invoked, mut failed, mut completed, mut abandoned) = (0, 0, 0, 0);
    for (f, c) in &counts {
        invoked += c.answered;
        failed += c.failed;
        if bus_fns.contains(&f.as_str()) {
            completed += c.completed;
            abandoned += c.abandoned;
        }
    }
    let all = store.runs(&RunQuery { app: None, commit: None, limit: usize::MAX }).await.unwrap();
    let succeeded = all.iter().filter(|r| r.status == RunStatus::Succeeded).count();
    let events = seen.events.load(Ordering::Relaxed);
    let dir = stack.data_dir.clone();
    stack.stop().await;
    let (_, bus_rate) = bus_hop(&dir, 2000.min(apps * rounds * 20).max(50)).await;
    let sql_rate = sqlite_commits(&dir, 4000.min(apps * rounds * 40).max(100));
    let secs = settle.as_secs_f64();
    println!(
        "throughput: {apps} apps pushing at once, {rounds} rounds ({} runs), until everything settled ({:.2} s):",
        apps * rounds,
        secs
    );
    println!(
        "  {:>8.0} events/s on the topic ({events} events)   {:>8.0} handler invocations/s ({invoked}; {completed} trigger messages completed)",
        events as f64 / secs,
        invoked as f64 / secs
    );
    println!(
        "  nothing lost: {succeeded} of {} runs succeeded, {failed} invocations failed, {abandoned} trigger messages abandoned, every subscription and the parking queue empty",
        apps * rounds
    );
    println!(
        "  floors on the same disk: the bus moves {bus_rate:.0} messages/s (send + peek-lock + complete, one at a time); SQLite commits {sql_rate:.0}/s"
    );
    println!("  events/s against the bus's message rate: {:.2}×   (goal ≥ 1,000 events/s)", events as f64 / secs / bus_rate);
    // Where a run's time goes under load: the gap before each step of its timeline.
    let mut gaps: HashMap<String, Vec<Duration>> = HashMap::new();
    let mut order: Vec<String> = Vec::new();
    for r in &all {
        for w in r.steps.windows(2) {
            if !order.contains(&w[1].name) && !w[1].name.contains('@') {
                order.push(w[1].name.clone());
            }
            gaps.entry(w[1].name.clone()).or_default().push((w[1].at - w[0].at).to_std().unwrap_or_default());
        }
    }
    println!("  time to each step of a run's timeline from the one before (p50, p99 over every run):");
    for what in order {
        let mut g = gaps.remove(&what).unwrap_or_default();
        g.sort();
        println!("    {what:<40} {:>9} {:>9}", ms(pct(&g, 0.5)), ms(pct(&g, 0.99)));
    }
    assert_eq!(succeeded, apps * rounds, "every run succeeds");
    assert_eq!((failed, abandoned), (0, 0), "nothing failed");
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------
// Replay

/// The `push` event of a new commit of `app001`-style app 0, as `github_webhook` publishes it.
fn push_event(policy: &deploychain_functions::policy::Policy) -> deploychain_functions::adapters::Outbound {
    use deploychain_events::{DeployEvent, EventData, Provider, Push, TraceContext};
    let commit = format!("{}{}", uuid::Uuid::new_v4().simple(), &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let run = deploychain_events::run_id("app000", &commit);
    let ev = DeployEvent {
        id: deploychain_events::event_id(&run, "push"),
        source: "/github/bench/app000".into(),
        time: chrono::Utc::now(),
        trace: TraceContext { traceparent: Some(deploychain_functions::steps::root_traceparent(&run)), tracestate: None },
        run_id: run,
        data: EventData::Push(Push {
            app: "app000".into(),
            provider: Provider::Github,
            repository: "bench/app000".into(),
            branch: "main".into(),
            commit,
            before: None,
            pusher: Some("bench".into()),
            message: Some("a change".into()),
            url: None,
            delivery: None,
            pusher_email: None,
            commits: Vec::new(),
        }),
    };
    let session = deploychain_functions::steps::session_for(&ev, policy);
    deploychain_functions::adapters::Outbound::from_event(&ev, session)
}

/// Dead-letter `letters` messages on the push subscription of a stopped stack's bus: ten pushes,
/// each delivered and set aside many times over (so most replays are no-ops downstream).
async fn dead_letter(opts: &StackOptions, letters: usize) {
    let b = Broker::open(&deploychain::stack::bus_file(&opts.data_dir), deploychain::stack::topology(&repo()).unwrap()).unwrap();
    let sub: EntityPath = "deploychain-events/subscriptions/on-push".parse().unwrap();
    let policy = deploychain_functions::policy::Policy::from_toml(&std::fs::read_to_string(&opts.policy).unwrap()).unwrap();
    let pushes: Vec<_> = (0..10).map(|_| push_event(&policy)).collect();
    let all: Vec<usize> = (0..letters).collect();
    for chunk in all.chunks(500) {
        let batch = chunk
            .iter()
            .map(|i| {
                let o = &pushes[i % pushes.len()];
                NewMessage {
                    body: o.body.clone().into_bytes(),
                    message_id: Some(format!("{}.copy-{i}", o.message_id)),
                    label: Some(o.subject.clone()),
                    session_id: o.session_id.clone(),
                    content_type: Some(o.content_type.clone()),
                    properties: o.properties.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect(),
                    ..Default::default()
                }
            })
            .collect();
        b.send_batch("deploychain-events", batch).await.unwrap();
    }
    let mut n = 0;
    while let Some(m) = b.peek_lock(&sub, Duration::ZERO).await.unwrap() {
        b.dead_letter(&sub, m.lock_token.unwrap(), "benchmark", "set aside for the replay benchmark").await.unwrap();
        n += 1;
    }
    assert_eq!(n, letters, "dead-lettered");
}

/// The floor: the bus moving `n` messages from one queue to another in process (peek-lock,
/// send, complete), one at a time, as a replay does over REST.
async fn move_floor(dir: &Path, n: usize) -> f64 {
    let mut t = Topology::new("floor");
    t.add_queue(Queue::new("from")).unwrap();
    t.add_queue(Queue::new("to")).unwrap();
    let b = Broker::open(&dir.join("floor-move.sqlite"), t).unwrap();
    let from = EntityPath::queue("from");
    let body = vec![b'x'; 1500];
    let all: Vec<usize> = (0..n).collect();
    for chunk in all.chunks(500) {
        b.send_batch(
            "from",
            chunk.iter().map(|i| NewMessage { message_id: Some(format!("m-{i}")), ..NewMessage::new(body.clone()) }).collect(),
        )
        .await
        .unwrap();
    }
    let start = Instant::now();
    let mut moved = 0;
    while let Some(m) = b.peek_lock(&from, Duration::ZERO).await.unwrap() {
        b.send("to", NewMessage { message_id: Some(m.message_id.clone()), ..NewMessage::new(m.body.clone()) }).await.unwrap();
        b.complete(&from, m.lock_token.unwrap()).await.unwrap();
        moved += 1;
    }
    assert_eq!(moved, n);
    n as f64 / start.elapsed().as_secs_f64()
}

async fn replay(letters: usize) {
    use deploychain_functions::ops::{DeadLetters, Filter};
    let opts = options("replay", &policy(1, true));
    let dir = opts.data_dir.clone();
    dead_letter(&opts, letters).await;
    let stack = Stack::start(opts).await.unwrap();
    assert_eq!(
        stack.broker.count(&"deploychain-events/subscriptions/on-push".parse().unwrap()).await.unwrap().dead_lettered,
        letters as u64
    );
    let conn = deploychain_functions::adapters::servicebus::ConnectionString::parse(&format!(
        "Endpoint=sb://{};SharedAccessKeyName={};SharedAccessKey={};UseDevelopmentEmulator=true",
        stack.bus_addr, stack.secrets.bus_key_name, stack.secrets.bus_key
    ))
    .unwrap();
    let topology = deploychain::stack::topology(&repo()).unwrap();
    let subs = topology.topics[0].subscriptions.iter().map(|s| s.name.clone()).collect();
    let ops = DeadLetters::new(&conn, "deploychain-events", subs, "deploychain-parked", azure_core::new_http_client());
    let start = Instant::now();
    let done = ops.replay(&Filter::default(), false, 0.0, "benchmark").await.unwrap();
    let took = start.elapsed();
    assert_eq!(done.len(), letters, "every letter replayed");
    let left = stack.broker.count(&"deploychain-events/subscriptions/on-push".parse().unwrap()).await.unwrap().dead_lettered;
    assert_eq!(left, 0, "the dead-letter queue is empty");
    // The replays reach on_push: wait until they are all handled (none set aside again).
    let deadline = Instant::now() + Duration::from_secs(600);
    let handled = loop {
        let c = stack.host.invocations().get("on_push").map(|c| c.completed).unwrap_or(0);
        if c >= letters as u64 {
            break start.elapsed();
        }
        assert!(Instant::now() < deadline, "only {c} of {letters} replayed pushes handled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let parked = stack.broker.count(&"deploychain-parked".parse().unwrap()).await.unwrap();
    let again = stack.broker.count(&"deploychain-events/subscriptions/on-push".parse().unwrap()).await.unwrap().dead_lettered;
    stack.stop().await;
    let floor = move_floor(&dir, letters).await;
    let rate = letters as f64 / took.as_secs_f64();
    println!("replay: {letters} dead-lettered push events replayed with DeadLetters::replay over the bus's REST API:");
    println!(
        "  {rate:>8.0} events/s ({:.2} s)   floor: the bus moving them in process {floor:.0}/s   ({:.2}× the floor)",
        took.as_secs_f64(),
        rate / floor
    );
    println!(
        "  every replay handled by on_push {:.2} s after the replay started ({:.0} events/s end to end); {} set aside again, {} parked",
        handled.as_secs_f64(),
        letters as f64 / handled.as_secs_f64(),
        again,
        parked.active
    );
    assert_eq!((again, parked.active), (0, 0), "nothing set aside again");
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------
// Fault soak

/// xorshift64*: the soak's one source of chance, seeded (and printed) so a failing soak replays.
#[derive(Clone)]
struct Chance(u64);

impl Chance {
    fn new(seed: u64) -> Chance {
        Chance(seed.max(1))
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn odds(&mut self, p: f64) -> bool {
        ((self.next() >> 11) as f64 / (1u64 << 53) as f64) < p
    }
    fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        lo + Duration::from_millis(self.below(hi.saturating_sub(lo).as_millis() as u64 + 1))
    }
}

/// The soak's size and how hard it shakes the stack.
struct SoakPlan {
    apps: usize,
    /// Chain events to publish (new runs start until the topic carried this many).
    events: u64,
    /// Bus restarts (the whole stack stopped and started again on its data directory), spread
    /// evenly over the events.
    restarts: usize,
    /// Pause between handler kills (SIGKILL), drawn between these.
    kill_every: (Duration, Duration),
    /// Pause between injected ARM faults.
    fault_every: (Duration, Duration),
    /// Pause between duplicated deliveries (copies of published events under new MessageIds).
    duplicate_every: (Duration, Duration),
    /// Messages that are not chain events, put on the topic.
    poison: usize,
    /// Pause between handler freezes (SIGSTOP past `functionTimeout`: the host times the
    /// invocations in flight out and restarts the handler).
    freeze_every: (Duration, Duration),
    /// Pause between lost locks (every lock on one of the chain's subscriptions lost at once).
    lose_locks_every: (Duration, Duration),
    /// The `Retry-After` of the rare throttled PATCH that asks for minutes.
    long_retry_after: Duration,
}

/// The soak's function app limits (app settings over host.json, as in Azure): short enough that
/// a frozen handler times out within the soak.
const SOAK_FUNCTION_TIMEOUT: Duration = Duration::from_secs(5);

/// What the soak did, counted as it went.
#[derive(Default)]
struct SoakCounts {
    kills: AtomicU64,
    restarts: AtomicU64,
    handler_restarts: AtomicU64,
    faults_pushed: Mutex<std::collections::BTreeMap<&'static str, u64>>,
    faults_fired: AtomicU64,
    duplicates: AtomicU64,
    redeliveries: AtomicU64,
    push_retries: AtomicU64,
    approvals: AtomicU64,
    freezes: AtomicU64,
    lock_losses: AtomicU64,
    locks_lost: AtomicU64,
    /// Per bus restart: how long the stack took to stop, and to be back.
    downtime: Mutex<Vec<(Duration, Duration)>>,
}

const TOPIC: &str = "deploychain-events";
const SOAK_MARK: &str = "soak-";

fn audit() -> EntityPath {
    "deploychain-events/subscriptions/audit".parse().unwrap()
}

/// POST the push until the front door accepts it (a restart or a kill may be under way: a
/// sender retries, as GitHub redelivers); anything but 202 or "unavailable" is a failure.
async fn push_until_accepted(base: &str, secrets: &deploychain::secrets::Secrets, body: &[u8], counts: &SoakCounts) -> String {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        match client::send_github(base, secrets, "push", body).await {
            Ok((202, text)) => return serde_json::from_str::<Value>(&text).unwrap()["run"].as_str().unwrap().to_string(),
            Ok((status, text)) if status < 500 => panic!("a push was refused: {status} {text}"),
            Ok(_) | Err(_) => {}
        }
        counts.push_retries.fetch_add(1, Ordering::Relaxed);
        assert!(Instant::now() < deadline, "the front door did not accept a push for three minutes");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// One app's developer: push a commit, wait for its run to end, push the next, until the topic
/// carried the plan's events. Sometimes the webhook is delivered twice.
#[allow(clippy::too_many_arguments)]
async fn developer(
    app: usize,
    base: String,
    secrets: deploychain::secrets::Secrets,
    policy_path: PathBuf,
    store: Arc<SqliteStore>,
    events: Arc<AtomicU64>,
    target: u64,
    counts: Arc<SoakCounts>,
    accepted: Arc<Mutex<Vec<String>>>,
    mut chance: Chance,
) {
    // Start at different moments, as developers do.
    tokio::time::sleep(chance.between(Duration::ZERO, Duration::from_millis(2000))).await;
    while events.load(Ordering::Relaxed) < target {
        let body = push_of(&policy_path, app);
        let run = push_until_accepted(&base, &secrets, &body, &counts).await;
        accepted.lock().unwrap().push(run.clone());
        if chance.odds(0.15) {
            // GitHub's redelivery: the same delivery again is the same run, not a second one.
            let again = push_until_accepted(&base, &secrets, &body, &counts).await;
            assert_eq!(again, run, "a redelivered push is the same run");
            counts.redeliveries.fetch_add(1, Ordering::Relaxed);
        }
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            if let Ok(Some(r)) = store.run(&run).await
                && r.status.is_final()
            {
                break;
            }
            assert!(Instant::now() < deadline, "run {run} did not end within ten minutes");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// Approve every approval link the stack's progress view passes on (retrying through kills and
/// restarts; a link that decides nothing any more — expired, decided — is left).
fn approver(stack: &Stack, counts: Arc<SoakCounts>) -> tokio::task::JoinHandle<()> {
    let (_seen, mut rx) = follow(stack);
    tokio::spawn(async move {
        while let Some(p) = rx.recv().await {
            let Progress::Approval { link, .. } = p else { continue };
            let counts = counts.clone();
            tokio::spawn(async move {
                let deadline = Instant::now() + Duration::from_secs(180);
                while Instant::now() < deadline {
                    match client::decide(&link, "approve", Some("soak")).await {
                        Ok((200, _)) => {
                            counts.approvals.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                        Ok((s, _)) if s < 500 && s != 429 => return,
                        _ => tokio::time::sleep(Duration::from_millis(300)).await,
                    }
                }
            });
        }
    })
}

/// One ARM fault on a random app's staging or production scale set.
fn arm_fault(chance: &mut Chance, apps: usize, request_timeout: Duration, long: Duration) -> (&'static str, deploychain::arm::Fault) {
    use deploychain::arm::{Fault, FaultAction};
    let app = chance.below(apps as u64);
    let stage = if chance.odds(0.5) { "staging" } else { "prod" };
    let ss = format!("/app{app:03}-{stage}");
    let late = request_timeout + Duration::from_millis(500);
    match chance.below(11) {
        10 => (
            "429 with a Retry-After of minutes",
            Fault::error("PATCH", &ss, 429, "TooManyRequests", "throttled for long")
                .with_header("retry-after", &long.as_secs().to_string()),
        ),
        0..=2 => ("429 Too Many Requests", Fault::error("PATCH", &ss, 429, "TooManyRequests", "throttled").with_header("retry-after", "1")),
        3..=4 => ("500 Internal Server Error", Fault::error("GET", &ss, 500, "InternalServerError", "try again").times(2)),
        5 => ("503 on the instance list", Fault::error("GET", &format!("{ss}/virtualMachines"), 503, "ServiceUnavailable", "busy")),
        6 => ("timeout before the request", Fault::new("GET", &ss, FaultAction::Delay(late))),
        7..=8 => ("timeout after the update landed", Fault::new("PATCH", &ss, FaultAction::LateAnswer(late))),
        _ => (
            "failed long-running operation",
            Fault::new(
                "PATCH",
                &ss,
                FaultAction::FailOperation(serde_json::json!({ "code": "AllocationFailed", "message": "Allocation failed (soak)." })),
            ),
        ),
    }
}

/// Copies of `n` events published earlier, sent again under new MessageIds (past the bus's
/// duplicate detection): at-least-once delivery at its worst.
async fn duplicate_deliveries(stack: &Stack, chance: &mut Chance, n: usize, made: &AtomicU64) {
    let published = stack.broker.count(&audit()).await.map(|c| c.active).unwrap_or(0);
    if published == 0 {
        return;
    }
    let from = chance.below(published) as i64;
    let Ok(msgs) = stack.broker.peek(&audit(), from, n * 3).await else { return };
    for m in msgs.into_iter().filter(|m| !m.message_id.starts_with(SOAK_MARK)).take(n) {
        let i = made.fetch_add(1, Ordering::Relaxed);
        let copy = NewMessage {
            body: m.body,
            message_id: Some(format!("{SOAK_MARK}dup-{i}.{}", m.message_id)),
            session_id: m.session_id,
            label: m.label,
            content_type: m.content_type,
            correlation_id: m.correlation_id,
            properties: m.properties,
            ..Default::default()
        };
        let _ = stack.broker.send(TOPIC, copy).await;
    }
}

/// True poison: messages on the push subscription's label that are not chain events.
async fn send_poison(stack: &Stack, i: usize) {
    let body: &[u8] = match i % 3 {
        0 => b"{\"specversion\":\"1.0\",\"truncated",
        1 => br#"{"specversion":"1.0","id":"x","source":"/soak","type":"dev.deploychain.push.v1","data":{"app":42}}"#,
        _ => b"\xff\xfe not even UTF-8",
    };
    let m = NewMessage {
        body: body.to_vec(),
        message_id: Some(format!("{SOAK_MARK}poison-{i}")),
        session_id: Some("app000".into()),
        label: Some("dev.deploychain.push.v1".into()),
        ..Default::default()
    };
    stack.broker.send(TOPIC, m).await.unwrap();
}

/// Chain events on the topic so far: everything the audit subscription holds but the soak's own
/// copies and poison (read on the soak's clock, so lagging a little).
async fn chain_events(stack: &Stack, injected: u64) -> u64 {
    stack.broker.count(&audit()).await.map(|c| c.active.saturating_sub(injected)).unwrap_or(0)
}

/// Every message in `path`, oldest first.
async fn peek_all(broker: &Broker, path: &EntityPath) -> Vec<deploychain_bus::Message> {
    let mut out: Vec<deploychain_bus::Message> = Vec::new();
    let mut from = 0;
    loop {
        let page = broker.peek(path, from, 1000).await.unwrap();
        let Some(last) = page.last() else { break };
        from = last.sequence_number + 1;
        out.extend(page);
    }
    out
}

/// The soak: the plan run once calm (no faults: the baseline) and once under faults, on the same
/// machine, each checked the same way.
async fn soak(plan: SoakPlan) {
    let seed = std::env::var("DEPLOYCHAIN_SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64);
    println!("soak: {} apps, runs started until the topic carried {} chain events (seed {seed}):", plan.apps, plan.events);
    let (calm_events, calm_secs) = soak_run(&plan, seed, false).await;
    let (events, secs) = soak_run(&plan, seed, true).await;
    println!(
        "  under faults: {:.0} events/s against {:.0} calm ({:.2}× the calm rate)",
        events as f64 / secs,
        calm_events as f64 / calm_secs,
        (events as f64 / secs) / (calm_events as f64 / calm_secs)
    );
}

/// One pass of the plan, with the faults (`chaos`) or without; its chain events and seconds.
async fn soak_run(plan: &SoakPlan, seed: u64, chaos: bool) -> (usize, f64) {
    let mut chance = Chance::new(seed);
    let request_timeout = Duration::from_millis(1000);
    let mut opts = options(if chaos { "soak" } else { "soak-calm" }, &policy_with(plan.apps, 3, "3m"));
    // Fixed ports: the stack comes back where senders and approval links expect it.
    (opts.http_port, opts.bus_port, opts.arm_port, opts.status_port) = (free_port(), free_port(), free_port(), free_port());
    opts.arm.health_timeout = Duration::from_secs(60);
    opts.extra_settings.push(("DEPLOYCHAIN_ARM_REQUEST_TIMEOUT".into(), format!("{}ms", request_timeout.as_millis())));
    // Azure's limits, scaled down: a step's budget under the lock renewal under functionTimeout.
    let t = SOAK_FUNCTION_TIMEOUT.as_secs();
    opts.extra_settings.push(("AzureFunctionsJobHost__functionTimeout".into(), format!("00:00:{t:02}")));
    opts.extra_settings
        .push(("AzureFunctionsJobHost__extensions__serviceBus__maxAutoLockRenewalDuration".into(), format!("00:00:{:02}", t - 1)));
    opts.extra_settings.push(("DEPLOYCHAIN_STEP_BUDGET".into(), format!("{}s", t - 2)));
    let policy_path = opts.data_dir.join("policy.toml");
    let mut stack = Stack::start(opts.clone()).await.unwrap();
    let base = format!("http://{}", stack.http_addr);
    let store = Arc::new(SqliteStore::open(&stack.data_dir.join("state").join("state.sqlite")).unwrap());
    let counts = Arc::new(SoakCounts::default());
    let events = Arc::new(AtomicU64::new(0));
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let start = Instant::now();
    let developers: Vec<_> = (0..plan.apps)
        .map(|a| {
            tokio::spawn(developer(
                a,
                base.clone(),
                stack.secrets.clone(),
                policy_path.clone(),
                store.clone(),
                events.clone(),
                plan.events,
                counts.clone(),
                accepted.clone(),
                Chance::new(seed ^ (a as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
            ))
        })
        .collect();
    let mut approvals = approver(&stack, counts.clone());
    let (mut next_kill, mut next_fault, mut next_dup) = (
        Instant::now() + chance.between(plan.kill_every.0, plan.kill_every.1),
        Instant::now() + chance.between(plan.fault_every.0, plan.fault_every.1),
        Instant::now() + chance.between(plan.duplicate_every.0, plan.duplicate_every.1),
    );
    let (mut next_freeze, mut next_lose) = (
        Instant::now() + chance.between(plan.freeze_every.0, plan.freeze_every.1),
        Instant::now() + chance.between(plan.lose_locks_every.0, plan.lose_locks_every.1),
    );
    let chain_subscriptions: Vec<EntityPath> = deploychain::stack::topology(&repo()).unwrap().topics[0]
        .subscriptions
        .iter()
        .filter(|s| s.name != "audit")
        .map(|s| format!("{TOPIC}/subscriptions/{}", s.name).parse().unwrap())
        .collect();
    let (mut pushed_here, mut poison_sent) = (0u64, 0usize);
    let injected = |c: &SoakCounts, poison: usize| c.duplicates.load(Ordering::Relaxed) + poison as u64;
    while developers.iter().any(|d| !d.is_finished()) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let seen = chain_events(&stack, injected(&counts, poison_sent)).await;
        events.store(seen, Ordering::Relaxed);
        let now = Instant::now();
        if chaos && now >= next_kill && seen < plan.events {
            if let Some(live) = stack.host.worker.live(Duration::from_millis(200)).await {
                let _ = std::process::Command::new("kill").args(["-9", &live.pid.to_string()]).status();
                counts.kills.fetch_add(1, Ordering::Relaxed);
            }
            next_kill = now + chance.between(plan.kill_every.0, plan.kill_every.1);
        }
        if chaos && now >= next_freeze && seen < plan.events {
            // Frozen past functionTimeout: the host fails what is in flight and restarts it.
            if let Some(live) = stack.host.worker.live(Duration::from_millis(200)).await {
                let pid = live.pid.to_string();
                let _ = std::process::Command::new("kill").args(["-STOP", &pid]).status();
                counts.freezes.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    tokio::time::sleep(SOAK_FUNCTION_TIMEOUT + Duration::from_secs(1)).await;
                    // Gone already when the host killed it: nothing to say.
                    let _ = std::process::Command::new("kill").args(["-CONT", &pid]).stderr(std::process::Stdio::null()).status();
                });
            }
            next_freeze = now + chance.between(plan.freeze_every.0, plan.freeze_every.1);
        }
        if chaos && now >= next_lose && seen < plan.events {
            let path = &chain_subscriptions[chance.below(chain_subscriptions.len() as u64) as usize];
            let n = stack.broker.lose_locks(path).await.unwrap_or(0);
            counts.lock_losses.fetch_add(1, Ordering::Relaxed);
            counts.locks_lost.fetch_add(n as u64, Ordering::Relaxed);
            next_lose = now + chance.between(plan.lose_locks_every.0, plan.lose_locks_every.1);
        }
        if chaos && now >= next_fault && seen < plan.events {
            let (kind, fault) = arm_fault(&mut chance, plan.apps, request_timeout, plan.long_retry_after);
            stack.arm.push_fault(fault);
            *counts.faults_pushed.lock().unwrap().entry(kind).or_default() += 1;
            pushed_here += 1;
            next_fault = now + chance.between(plan.fault_every.0, plan.fault_every.1);
        }
        if chaos && now >= next_dup && seen < plan.events {
            let n = 1 + chance.below(3) as usize;
            duplicate_deliveries(&stack, &mut chance, n, &counts.duplicates).await;
            next_dup = now + chance.between(plan.duplicate_every.0, plan.duplicate_every.1);
        }
        if chaos && poison_sent < plan.poison && seen >= plan.events * (poison_sent as u64 + 1) / (plan.poison as u64 + 1) {
            send_poison(&stack, poison_sent).await;
            poison_sent += 1;
        }
        let restarts = counts.restarts.load(Ordering::Relaxed) as usize;
        if chaos && restarts < plan.restarts && seen >= plan.events * (restarts as u64 + 1) / (plan.restarts as u64 + 1) {
            counts.faults_fired.fetch_add(pushed_here - stack.arm.pending_faults() as u64, Ordering::Relaxed);
            counts.handler_restarts.fetch_add(u64::from(stack.host.worker.restarts()), Ordering::Relaxed);
            pushed_here = 0;
            approvals.abort();
            let down = Instant::now();
            stack.stop().await;
            let stopped = down.elapsed();
            // The bus is down for a moment: senders and the approvers retry.
            tokio::time::sleep(chance.between(Duration::from_millis(200), Duration::from_millis(1500))).await;
            stack = loop {
                match Stack::start(opts.clone()).await {
                    Ok(s) => break s,
                    Err(e) => {
                        eprintln!("(the stack did not start again yet: {e:#})");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            };
            approvals = approver(&stack, counts.clone());
            counts.restarts.fetch_add(1, Ordering::Relaxed);
            counts.downtime.lock().unwrap().push((stopped, down.elapsed()));
        }
    }
    for d in developers {
        d.await.unwrap();
    }
    let ran = start.elapsed();
    counts.faults_fired.fetch_add(pushed_here - stack.arm.pending_faults() as u64, Ordering::Relaxed);
    counts.handler_restarts.fetch_add(u64::from(stack.host.worker.restarts()), Ordering::Relaxed);

    // Everything settles: nothing receivable or locked on any subscription the chain reads.
    let topology = deploychain::stack::topology(&repo()).unwrap();
    let subscriptions: Vec<EntityPath> = topology.topics[0]
        .subscriptions
        .iter()
        .filter(|s| s.name != "audit")
        .map(|s| format!("{TOPIC}/subscriptions/{}", s.name).parse().unwrap())
        .collect();
    let deadline = Instant::now() + Duration::from_secs(120) + plan.long_retry_after;
    let scheduled = loop {
        let mut left = Vec::new();
        let mut scheduled = 0;
        for p in &subscriptions {
            let c = stack.broker.count(p).await.unwrap();
            scheduled += c.scheduled;
            if c.active + c.locked > 0 {
                left.push(format!("{p}: {c:?}"));
            }
        }
        if left.is_empty() {
            break scheduled;
        }
        assert!(Instant::now() < deadline, "not settled: {left:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // Every accepted push is a run that ended, and its end is on the topic.
    let accepted = accepted.lock().unwrap().clone();
    let topic_log = peek_all(&stack.broker, &audit()).await;
    let ids: std::collections::HashSet<&str> = topic_log.iter().map(|m| m.message_id.as_str()).collect();
    let mut statuses: std::collections::BTreeMap<&'static str, usize> = Default::default();
    let mut lost = Vec::new();
    for run in &accepted {
        match store.run(run).await.unwrap() {
            Some(r) if r.status.is_final() && ids.contains(format!("{run}.run-finished").as_str()) => {
                *statuses.entry(r.status.as_str()).or_default() += 1
            }
            other => lost.push(format!("{run}: {:?}", other.map(|r| r.status))),
        }
    }
    let chain_events = topic_log.iter().filter(|m| !m.message_id.starts_with(SOAK_MARK)).count();

    // Step effects: each run's model update of each stage at most once (its rollback, at most once).
    let mut effects: HashMap<(String, String, bool), usize> = HashMap::new();
    for r in stack.arm.requests().iter().filter(|r| r.method == "PATCH" && r.status < 300) {
        let tags = &r.body["tags"];
        let (run, rollback) = match tags["deploychain.rolledback"].as_str() {
            Some(by) => (by.to_string(), true),
            None => (tags["deploychain.run"].as_str().unwrap_or_default().to_string(), false),
        };
        *effects.entry((r.path.to_ascii_lowercase(), run, rollback)).or_default() += 1;
    }
    let doubles: Vec<_> = effects.iter().filter(|(_, n)| **n > 1).map(|(k, n)| format!("{k:?} ×{n}")).collect();
    let mut missing = Vec::new();
    for run in &accepted {
        if let Some(r) = store.run(run).await.unwrap()
            && r.status == RunStatus::Succeeded
        {
            let app = &r.app;
            for stage in ["staging", "prod"] {
                let key = (
                    format!("{SUB}/resourceGroups/rg-{app}/providers/Microsoft.Compute/virtualMachineScaleSets/{app}-{stage}")
                        .to_ascii_lowercase(),
                    run.clone(),
                    false,
                );
                if effects.get(&key).copied().unwrap_or(0) != 1 {
                    missing.push(format!("{run} {stage}"));
                }
            }
        }
    }

    // The dead letters and the parking queue hold the poison, all of it, each with its reason, and nothing else.
    let mut set_aside = Vec::new();
    for p in subscriptions.iter().chain(std::iter::once(&audit())) {
        for m in peek_all(&stack.broker, &p.dead_letter_queue()).await {
            set_aside.push((format!("{p} dead letter"), m.message_id.clone(), m.dead_letter_reason().map(str::to_string)));
        }
    }
    for m in peek_all(&stack.broker, &"deploychain-parked".parse().unwrap()).await {
        let prop = |k: &str| m.properties.iter().find(|(n, _)| n.eq_ignore_ascii_case(k)).and_then(|(_, v)| v.as_str()).map(str::to_string);
        set_aside.push(("parked".into(), prop("OriginalMessageId").unwrap_or_default(), prop("DeadLetterReason")));
    }
    let not_poison: Vec<_> = set_aside.iter().filter(|(_, id, _)| !id.starts_with(&format!("{SOAK_MARK}poison-"))).collect();
    let no_reason: Vec<_> = set_aside.iter().filter(|(_, _, r)| r.as_deref().unwrap_or_default().is_empty()).collect();
    let mut reasons: std::collections::BTreeMap<String, usize> = Default::default();
    for (_, _, r) in &set_aside {
        *reasons.entry(r.clone().unwrap_or_default()).or_default() += 1;
    }
    let poison_found: std::collections::HashSet<&str> = set_aside.iter().map(|(_, id, _)| id.as_str()).collect();
    let poison_lost: Vec<String> =
        (0..poison_sent).map(|i| format!("{SOAK_MARK}poison-{i}")).filter(|id| !poison_found.contains(id.as_str())).collect();
    let counts_now = stack.host.invocations();
    let invoked: u64 = counts_now.values().map(|c| c.answered + c.failed).sum();
    let failed_invocations: u64 = counts_now.values().map(|c| c.failed).sum();
    let settle_lost: u64 = counts_now.values().map(|c| c.lock_lost).sum();
    let dir = stack.data_dir.clone();
    approvals.abort();
    stack.stop().await;

    let secs = ran.as_secs_f64();
    let c = &counts;
    let faults = c.faults_pushed.lock().unwrap().clone();
    let pushed: u64 = faults.values().sum();
    let summary = format!(
        "  {}: {chain_events} chain events, {} runs accepted in {secs:.1} s ({:.0} events/s; {invoked} handler invocations since the last start)",
        if chaos { "under faults" } else { "calm (the baseline)" },
        accepted.len(),
        chain_events as f64 / secs
    );
    println!("{summary}");
    println!("    runs by how they ended: {}", statuses.iter().map(|(s, n)| format!("{s} {n}")).collect::<Vec<_>>().join(", "));
    println!(
        "    lost {} (accepted pushes whose run did not end), double effects {} (model updates of a stage for one run beyond the first), \
         succeeded runs without their two model updates {}",
        lost.len(),
        doubles.len(),
        missing.len()
    );
    if chaos {
        println!(
            "    faults: {} handler SIGKILLs ({} handler restarts), {} bus restarts (down {}), {} ARM faults injected ({} fired: {}), \
         {} duplicated deliveries, {} redelivered webhooks, {} pushes retried, {} poison messages",
            c.kills.load(Ordering::Relaxed),
            c.handler_restarts.load(Ordering::Relaxed),
            c.restarts.load(Ordering::Relaxed),
            c.downtime
                .lock()
                .unwrap()
                .iter()
                .map(|(stop, back)| format!("{:.1} s, {:.1} s of it stopping", back.as_secs_f64(), stop.as_secs_f64()))
                .collect::<Vec<_>>()
                .join("; "),
            pushed,
            c.faults_fired.load(Ordering::Relaxed),
            faults.iter().map(|(k, n)| format!("{k} {n}")).collect::<Vec<_>>().join(", "),
            c.duplicates.load(Ordering::Relaxed),
            c.redeliveries.load(Ordering::Relaxed),
            c.push_retries.load(Ordering::Relaxed),
            poison_sent
        );
        println!(
            "    and: {} handler freezes past functionTimeout ({}), {} lock losses ({} message locks lost; {} settlements refused for a lost lock); \
         {failed_invocations} failed invocations since the last start",
            c.freezes.load(Ordering::Relaxed),
            human_secs(SOAK_FUNCTION_TIMEOUT),
            c.lock_losses.load(Ordering::Relaxed),
            c.locks_lost.load(Ordering::Relaxed),
            settle_lost
        );
        println!(
            "    set aside: {} ({}), of them not poison {}; poison not set aside {}; {} approvals given; {scheduled} scheduled messages left (approval reminders and expiries)",
            set_aside.len(),
            reasons.iter().map(|(r, n)| format!("{r} {n}")).collect::<Vec<_>>().join(", "),
            not_poison.len(),
            poison_lost.len(),
            c.approvals.load(Ordering::Relaxed)
        );
    }
    assert!(lost.is_empty(), "accepted pushes whose run did not end: {lost:?}");
    assert!(doubles.is_empty(), "step effects repeated: {doubles:?}");
    assert!(missing.is_empty(), "succeeded runs without exactly one model update per stage: {missing:?}");
    assert!(not_poison.is_empty(), "set aside but not poison: {not_poison:?}");
    assert!(no_reason.is_empty(), "set aside without a reason: {no_reason:?}");
    assert!(poison_lost.is_empty(), "poison not set aside: {poison_lost:?}");
    assert!(chain_events as u64 >= plan.events, "the topic carried {chain_events} chain events, fewer than {}", plan.events);
    let _ = std::fs::remove_dir_all(&dir);
    (chain_events, secs)
}

fn human_secs(d: Duration) -> String {
    format!("{} s", d.as_secs())
}

fn main() {
    if let Ok(port) = std::env::var(NOOP_ENV) {
        noop_server(port.parse().unwrap());
        return;
    }
    let full = std::env::args().any(|a| a == "--bench");
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let parts = ["cold-start", "chain", "throughput", "replay", "soak", "waiting"];
    let named: Vec<&str> = args.iter().map(String::as_str).filter(|a| parts.contains(a)).collect();
    let nums: Vec<usize> = args.iter().filter_map(|a| a.parse().ok()).collect();
    let num = |i: usize, full_default: usize, smoke: usize| nums.get(i).copied().unwrap_or(if full { full_default } else { smoke });
    let wanted = |p: &str| named.is_empty() || named.contains(&p);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    if wanted("cold-start") {
        cold_start(if full { 20 } else { 3 });
    }
    if wanted("chain") {
        rt.block_on(chain(num(0, 1000, 3)));
    }
    if wanted("throughput") {
        rt.block_on(throughput(num(0, 100, 5), num(1, 5, 2)));
    }
    if wanted("replay") {
        rt.block_on(replay(num(0, 10_000, 50)));
    }
    if wanted("waiting") {
        // `waiting 3 60`: releases, and what Azure's timings are divided by.
        rt.block_on(waiting(num(0, 3, 1), num(1, 60, 600) as u32));
    }
    if wanted("soak") {
        let ms = Duration::from_millis;
        let plan = if full {
            SoakPlan {
                apps: num(0, 200, 200),
                events: num(1, 10_000, 10_000) as u64,
                restarts: 2,
                kill_every: (ms(2000), ms(6000)),
                fault_every: (ms(100), ms(500)),
                duplicate_every: (ms(50), ms(300)),
                poison: 10,
                freeze_every: (ms(8000), ms(20000)),
                lose_locks_every: (ms(1000), ms(4000)),
                long_retry_after: Duration::from_secs(180),
            }
        } else {
            // The short profile CI runs: every kind of fault, a few times.
            SoakPlan {
                apps: num(0, 12, 12),
                events: num(1, 400, 400) as u64,
                restarts: 1,
                kill_every: (ms(1500), ms(4000)),
                fault_every: (ms(150), ms(500)),
                duplicate_every: (ms(100), ms(400)),
                poison: 3,
                freeze_every: (ms(3000), ms(6000)),
                lose_locks_every: (ms(500), ms(2000)),
                long_retry_after: Duration::from_secs(20),
            }
        };
        rt.block_on(soak(plan));
    }
}
