//! Handler overhead and webhook verification: a benchmark that prints figures, not a timed test.
//! `cargo bench -p deploychain-functions --bench handler` (`-- N` for the requests per figure,
//! default 4000; `-- overhead` or `-- verify` for one part). Under `cargo test --benches` it runs a few requests of each, as a smoke test.
//!
//! One process serves the handler's own router over loopback TCP, with one more route: `/noop`,
//! which reads the envelope and answers the smallest valid host answer without looking at it
//! (the floor). The same client, on the same runtime, then sends host-shaped invocations:
//! - `github_webhook` with a real push payload (signature verified, payload read, the `push`
//!   event published to an in-process sink that counts and drops it);
//! - `on_push` with the `push` messages that produced (each a new commit: a new run, a build
//!   requested, the step committed), on the memory store and on the SQLite store (WAL,
//!   `synchronous=FULL`: one fsync per commit, as `deploychain up` runs it);
//!
//! each one request at a time (latency) and 8 at a time (requests/s). Then it measures signature
//! verification (`verify_signature`: header parsing, hex decoding, HMAC, constant-time compare)
//! against a raw HMAC-SHA256 over the same bytes, in MB/s, at three body sizes.
#![allow(clippy::unwrap_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use async_trait::async_trait;
use axum::routing::post;
use deploychain_functions::adapters::memory::{MemoryBaker, MemoryBuilds, MemoryCompute, MemoryNotify, MemoryStore};
use deploychain_functions::adapters::sqlite::SqliteStore;
use deploychain_functions::adapters::{Outbound, Parked, Publish, Store};
use deploychain_functions::links::ApprovalLinks;
use deploychain_functions::policy::Policy;
use deploychain_functions::steps::github_webhook::verify_signature;
use deploychain_functions::{AppState, app};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The in-process sink: counts what is published, keeps nothing.
#[derive(Default)]
struct Sink {
    published: AtomicU64,
}

#[async_trait]
impl Publish for Sink {
    async fn publish(&self, msg: &Outbound) -> deploychain_functions::error::Result<()> {
        black_box(msg.body.len());
        self.published.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    async fn park(&self, _msg: &Parked) -> deploychain_functions::error::Result<()> {
        Ok(())
    }
}

fn state(store: Arc<dyn Store>, sink: Arc<Sink>) -> AppState {
    let config = common::config(1 << 20);
    let policy = Policy::from_toml(common::POLICY).unwrap();
    let links = ApprovalLinks::new(common::SIGNING_KEY.as_bytes(), &[], config.public_url.clone());
    AppState {
        config: Arc::new(config),
        policy: Arc::new(policy),
        links: Arc::new(links),
        store,
        publisher: sink,
        builds: Arc::new(MemoryBuilds::default()),
        baker: Arc::new(MemoryBaker::default()),
        compute: Arc::new(MemoryCompute::default()),
        notify: Arc::new(MemoryNotify::default()),
        dead_letters: None,
    }
}

/// The smallest answer the host takes from an HTTP function.
const NOOP_ANSWER: &str = r#"{"Outputs":{"res":{"statusCode":200,"body":"","headers":{}}},"Logs":[],"ReturnValue":null}"#;

async fn serve(state: AppState) -> String {
    let router = app(state).route(
        "/noop",
        post(|body: axum::body::Bytes| async move {
            black_box(body.len());
            ([(axum::http::header::CONTENT_TYPE, "application/json")], NOOP_ANSWER)
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    format!("http://{addr}")
}

/// A push of a new commit `i` of the `probot` app, from the real GitHub fixture.
fn push_body(i: usize) -> Vec<u8> {
    let mut p = common::fixture_json("github/push.branch-updated.probot.json");
    let commit = format!("{:040x}", 0xbe_0000_0000u64 + i as u64);
    p["after"] = json!(commit);
    p["head_commit"]["id"] = json!(commit);
    p["commits"][0]["id"] = json!(commit);
    serde_json::to_vec(&p).unwrap()
}

fn github_envelope(body: &[u8]) -> Vec<u8> {
    let headers = [
        ("Content-Type", "application/json".to_string()),
        ("User-Agent", "GitHub-Hookshot/044aadd".to_string()),
        ("X-GitHub-Event", "push".to_string()),
        ("X-GitHub-Delivery", uuid::Uuid::new_v4().to_string()),
        ("X-Hub-Signature-256", common::sign(body)),
    ];
    common::http_envelope("github_webhook", "POST", "hooks/github", &[], &headers, &[], body).to_string().into_bytes()
}

fn bus_envelope(m: &Outbound, seq: i64) -> Vec<u8> {
    common::bus_envelope(
        "on_push",
        m.body.as_bytes(),
        Some(&m.message_id),
        1,
        Some(&m.subject),
        m.session_id.as_deref(),
        &m.properties,
        seq,
    )
    .to_string()
    .into_bytes()
}

/// The `push` messages `github_webhook` publishes for `n` new commits (set-up, not measured).
async fn push_messages(n: usize) -> Vec<Outbound> {
    let h = common::Harness::new(Arc::new(MemoryStore::default()));
    for i in 0..n {
        let (status, v) = h.github_signed("push", &push_body(1_000_000 + i)).await;
        assert_eq!(status, 202, "{v}");
    }
    let sent: Vec<Outbound> = h.publisher.sent();
    assert_eq!(sent.len(), n);
    sent
}

struct Figures {
    rps: f64,
    p50: Duration,
    p99: Duration,
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// POST each body to `url` with `concurrency` requests in flight; every answer must be a 200
/// whose JSON passes `ok`.
async fn drive(client: &reqwest::Client, url: &str, bodies: Vec<Vec<u8>>, concurrency: usize, ok: fn(&Value) -> bool) -> Figures {
    let bodies = Arc::new(std::sync::Mutex::new(bodies.into_iter()));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, url, bodies) = (client.clone(), url.to_string(), bodies.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let Some(body) = bodies.lock().unwrap().next() else { return lat };
                let t = Instant::now();
                let rsp = client.post(&url).header("content-type", "application/json").body(body).send().await.unwrap();
                let status = rsp.status();
                let v: Value = rsp.json().await.unwrap();
                lat.push(t.elapsed());
                assert!(status == 200 && ok(&v), "{url}: {status} {v}");
            }
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let elapsed = start.elapsed();
    lat.sort();
    Figures { rps: lat.len() as f64 / elapsed.as_secs_f64(), p50: pct(&lat, 0.5), p99: pct(&lat, 0.99) }
}

fn accepted(v: &Value) -> bool {
    v["Outputs"]["res"]["statusCode"] == 202 && v["Outputs"]["res"]["body"].as_str().is_some_and(|b| b.contains("\"accepted\""))
}

fn answered(v: &Value) -> bool {
    v["Outputs"].is_object() && v["Logs"].is_array()
}

fn line(name: &str, f: &Figures, floor: &Figures) {
    println!(
        "  {name:<34} {:>8.0} req/s ({:>4.2}× the floor)   p50 {:>7.1} µs   p99 {:>7.1} µs",
        f.rps,
        f.rps / floor.rps,
        f.p50.as_secs_f64() * 1e6,
        f.p99.as_secs_f64() * 1e6
    );
}

async fn overhead(n: usize) {
    let sink = Arc::new(Sink::default());
    let memory = serve(state(Arc::new(MemoryStore::default()), sink.clone())).await;
    let dir = std::env::temp_dir().join(format!("deploychain-bench-handler-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sqlite = serve(state(Arc::new(SqliteStore::open(&dir.join("state.sqlite")).unwrap()), sink.clone())).await;
    let client = reqwest::Client::new();

    let push = github_envelope(&push_body(0));
    println!("envelope sizes: github_webhook {} bytes (a {}-byte push), on_push {} bytes", push.len(), push_body(0).len(), {
        let m = push_messages(1).await;
        bus_envelope(&m[0], 1).len()
    });
    // Four sets of distinct push messages: each on_push figure starts runs nobody started before.
    let messages = push_messages(4 * n + 4 * (n / 10).max(1)).await;
    let mut chunks = messages.chunks(n).map(|c| c.iter().enumerate().map(|(i, m)| bus_envelope(m, i as i64)).collect::<Vec<_>>());

    // Warm up connections and both stores.
    let warm = (n / 10).max(1);
    drive(&client, &format!("{memory}/noop"), vec![push.clone(); warm], 8, answered).await;
    drive(&client, &format!("{memory}/github_webhook"), vec![push.clone(); warm], 8, accepted).await;

    for (concurrency, what) in [(1, "one request at a time"), (8, "8 requests in flight")] {
        println!("{what} ({n} requests each):");
        let floor = drive(&client, &format!("{memory}/noop"), vec![push.clone(); n], concurrency, answered).await;
        line("no-op route (floor)", &floor, &floor);
        let before = sink.published.load(Ordering::Relaxed);
        let gh = drive(&client, &format!("{memory}/github_webhook"), vec![push.clone(); n], concurrency, accepted).await;
        assert_eq!(sink.published.load(Ordering::Relaxed) - before, n as u64, "every accepted push is published");
        line("github_webhook (verify + publish)", &gh, &floor);
        let on_mem = drive(&client, &format!("{memory}/on_push"), chunks.next().unwrap(), concurrency, answered).await;
        line("on_push, memory store", &on_mem, &floor);
        let on_sql = drive(&client, &format!("{sqlite}/on_push"), chunks.next().unwrap(), concurrency, answered).await;
        line("on_push, SQLite store (fsync)", &on_sql, &floor);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn verification(n_bytes: usize) {
    let secret = common::GH_SECRET.as_bytes();
    println!("webhook signature verification ({} MB per figure):", n_bytes >> 20);
    for size in [push_body(0).len(), 64 << 10, 1 << 20] {
        let body: Vec<u8> = push_body(0).into_iter().cycle().take(size).collect();
        let header = common::sign(&body);
        let reps = (n_bytes / size).max(1);
        let mb = (reps * size) as f64 / 1e6;
        let floor_time = {
            let start = Instant::now();
            for _ in 0..reps {
                let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret).unwrap();
                m.update(black_box(&body));
                black_box(m.finalize().into_bytes());
            }
            start.elapsed()
        };
        let verify_time = {
            let start = Instant::now();
            for _ in 0..reps {
                verify_signature(secret, black_box(&body), Some(black_box(&header))).unwrap();
            }
            start.elapsed()
        };
        let (floor, verify) = (mb / floor_time.as_secs_f64(), mb / verify_time.as_secs_f64());
        println!(
            "  {:>8} bytes: raw HMAC-SHA256 {floor:>7.1} MB/s   verify_signature {verify:>7.1} MB/s   ({:.2}× the floor)",
            size,
            verify / floor
        );
    }
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let n: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(if full { 4000 } else { 20 });
    // `-- overhead` or `-- verify` runs only that part.
    let only: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-') && a.parse::<usize>().is_err()).collect();
    let wanted = |part: &str| only.is_empty() || only.iter().any(|o| o == part);
    if wanted("overhead") {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(overhead(n));
    }
    if wanted("verify") {
        verification(if full { 256 << 20 } else { 1 << 20 });
    }
}
