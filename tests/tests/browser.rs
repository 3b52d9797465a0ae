//! An approver in a real browser: headless Chromium (Debian's `chromium`, driven through its
//! ChromeDriver over the W3C WebDriver protocol) opens the signed link from the notice, sees the
//! evidence, clicks Approve, and the run reaches production. Screenshots of the page before and
//! after the click, and of the local status page, are kept in `target/test-artifacts/`.
//!
//! `scripts/test.sh` installs `chromium` and `chromium-driver` (scripts/install-browser.sh).
#![allow(clippy::unwrap_used)]

use deploychain::arm::ArmSimConfig;
use deploychain::client;
use deploychain::config::SimConfig;
use deploychain::stack::{Stack, StackOptions};
use deploychain::watch::Progress;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::Duration;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize().unwrap()
}

fn handler() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().and_then(Path::parent).unwrap().join("handler")
}

fn artifacts() -> PathBuf {
    let d = repo().join("target").join("test-artifacts");
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join(name)).find(|f| f.is_file()))
}

/// A ChromeDriver on a free port, stopped on drop.
struct Driver {
    child: std::process::Child,
    base: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_driver() -> Driver {
    let exe = which("chromedriver")
        .unwrap_or_else(|| panic!("chromedriver is not installed: run scripts/install-browser.sh (scripts/test.sh does)"));
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = std::process::Command::new(exe)
        .arg(format!("--port={port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = reqwest::get(format!("{base}/status")).await
            && r.status() == 200
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "chromedriver did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Driver { child, base }
}

struct Session<'a> {
    driver: &'a Driver,
    id: String,
    http: reqwest::Client,
}

impl Session<'_> {
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}/session/{}{path}", self.driver.base, self.id);
        let mut r = self.http.request(method, url);
        if let Some(b) = body {
            r = r.json(&b);
        }
        let v: Value = r.send().await.unwrap().json().await.unwrap();
        assert!(v["value"].get("error").is_none(), "WebDriver {path}: {v}");
        v["value"].clone()
    }

    async fn find(&self, css: &str) -> String {
        let v = self.call(reqwest::Method::POST, "/element", Some(json!({ "using": "css selector", "value": css }))).await;
        v.as_object().and_then(|o| o.values().next()).and_then(Value::as_str).unwrap().to_string()
    }

    async fn text(&self, css: &str) -> String {
        let e = self.find(css).await;
        self.call(reqwest::Method::GET, &format!("/element/{e}/text"), None).await.as_str().unwrap_or_default().to_string()
    }

    async fn screenshot(&self, name: &str) -> PathBuf {
        use base64::Engine;
        let v = self.call(reqwest::Method::GET, "/screenshot", None).await;
        let png = base64::engine::general_purpose::STANDARD.decode(v.as_str().unwrap()).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "a PNG");
        let path = artifacts().join(name);
        std::fs::write(&path, png).unwrap();
        path
    }
}

async fn open_session<'a>(driver: &'a Driver, profile: &Path) -> Session<'a> {
    let chromium = which("chromium").unwrap_or_else(|| panic!("chromium is not installed: run scripts/install-browser.sh"));
    let caps = json!({ "capabilities": { "alwaysMatch": { "browserName": "chrome", "goog:chromeOptions": {
        "binary": chromium,
        "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1100,1400",
                 format!("--user-data-dir={}", profile.display())]
    } } } });
    let http = reqwest::Client::new();
    let v: Value = http.post(format!("{}/session", driver.base)).json(&caps).send().await.unwrap().json().await.unwrap();
    let id = v["value"]["sessionId"].as_str().unwrap_or_else(|| panic!("no WebDriver session: {v}")).to_string();
    Session { driver, id, http }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approver_reviews_the_evidence_in_a_browser_and_approves_to_production() {
    let data = std::env::temp_dir().join(format!("deploychain-browser-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let opts = StackOptions {
        repo: repo(),
        data_dir: data.clone(),
        policy: repo().join("policy.toml"),
        app: deploychain::stack::AppSource::Handler(handler()),
        http_port: 0,
        bus_port: 0,
        arm_port: 0,
        status_port: 0,
        sim: SimConfig { build_delay: Duration::from_millis(50), image_delay: Duration::from_millis(50), ..SimConfig::default() },
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
    };
    let stack = Stack::start(opts).await.unwrap();
    let mut rx = stack.progress.subscribe();
    let base = format!("http://{}", stack.http_addr);
    let body = client::sample_push(&repo().join("policy.toml"), None, None).unwrap();
    let (status, text) = client::send_github(&base, &stack.secrets, "push", &body).await.unwrap();
    assert_eq!(status, 202, "{text}");
    let run = serde_json::from_str::<Value>(&text).unwrap()["run"].as_str().unwrap().to_string();
    let link = loop {
        match tokio::time::timeout(Duration::from_secs(60), rx.recv()).await.expect("an approval link in time") {
            Ok(Progress::Approval { run: r, approver, link }) if r == run && approver == "alice@contoso.com" => break link,
            _ => {}
        }
    };

    let driver = start_driver().await;
    let session = open_session(&driver, &data.join("chromium-profile")).await;
    // The local status page first: the run waits, and the pending approval offers the links.
    let status = format!("http://{}/", stack.status_addr);
    session.call(reqwest::Method::POST, "/url", Some(json!({ "url": status }))).await;
    let approvals = session.text("#approvals").await;
    assert!(
        approvals.contains(&run) && approvals.contains("1 more approval of production") && approvals.contains("open as alice@contoso.com"),
        "{approvals}"
    );
    let runs = session.text(&format!("#run-{run}")).await;
    assert!(runs.contains("waiting") && runs.contains("deployed to staging") && runs.contains("push received"), "{runs}");
    assert!(session.text("#deadletters").await.contains("deploychain-parked"));
    assert!(session.text("#scalesets").await.contains("web-staging"));
    session.screenshot("status-page.png").await;
    session.call(reqwest::Method::POST, "/url", Some(json!({ "url": link }))).await;
    let heading = session.text("h1").await;
    assert_eq!(heading, "Promote web to production?");
    // The evidence: what is released, by whom, what staging passed, the artifact, who may decide.
    let commit = client::runs(&base, &stack.secrets, Some(&run), None).await.unwrap();
    let run_doc = serde_json::from_str::<Value>(&commit).unwrap();
    let commit = run_doc["commit"].as_str().unwrap().to_string();
    let trace = run_doc["traceparent"].as_str().unwrap().split('-').nth(1).unwrap().to_string();
    assert_eq!(session.text("#trace").await, trace, "the page names the release's trace");
    let commits = session.text("#commits").await;
    assert!(commits.contains(&commit[..12]) && commits.contains("A change, pushed with deploychain send"), "{commits}");
    let previous = session.text("#previous").await;
    assert!(
        previous.contains("staging") && previous.contains("HealthState/healthy") && previous.contains("web-staging.internal/healthz"),
        "{previous}"
    );
    assert!(session.text("#artifact").await.contains("/images/web/versions/"));
    assert!(session.text("#state").await.starts_with("pending"));
    let before = session.screenshot("approval-page.png").await;

    // Looking changed nothing.
    let r: Value = serde_json::from_str(&client::runs(&base, &stack.secrets, Some(&run), None).await.unwrap()).unwrap();
    assert_eq!(r["status"], "waiting");

    let approve = session.find("#approve").await;
    session.call(reqwest::Method::POST, &format!("/element/{approve}/click"), Some(json!({}))).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let done = loop {
        let r: Value = serde_json::from_str(&client::runs(&base, &stack.secrets, Some(&run), None).await.unwrap()).unwrap();
        if r["status"] == "succeeded" {
            break r;
        }
        assert!(tokio::time::Instant::now() < deadline, "the run never reached production: {r}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(done.to_string().contains("alice@contoso.com approved production"), "{done}");
    assert!(session.text(".note").await.contains("Your decision is recorded: approved"));
    let after = session.screenshot("approval-recorded.png").await;
    session.call(reqwest::Method::POST, "/url", Some(json!({ "url": status }))).await;
    let row = session.text(&format!("#run-{run}")).await;
    assert!(row.contains("succeeded") && row.contains("deployed to production") && row.contains("production approved"), "{row}");
    assert!(session.text("#approvals").await.contains("none"), "nothing pending any more");
    session.screenshot("status-page-after.png").await;
    let prod = stack
        .arm
        .scale_set(
            &deploychain_functions::policy::Policy::from_toml(&std::fs::read_to_string(repo().join("policy.toml")).unwrap()).unwrap().apps
                [0]
            .stages[1]
                .target,
        )
        .unwrap();
    assert_eq!(prod.tag("deploychain.run"), Some(run.as_str()), "production runs the approved release");
    session.call(reqwest::Method::DELETE, "", None).await;
    eprintln!("screenshots: {} {}", before.display(), after.display());
    stack.discard().await;
}
