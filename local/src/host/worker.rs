//! The custom-handler process, managed as the Functions host manages it (§1): started from
//! `customHandler.description` with the app settings and `FUNCTIONS_CUSTOMHANDLER_PORT` in its
//! environment, ready once `GET /` answers anything, restarted when it exits, and killed and
//! restarted when an invocation outlives `functionTimeout` (which fails every in-flight
//! invocation on it, as in Azure).

use super::app::FunctionApp;
use anyhow::{Result, anyhow};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, watch};

/// The handler that is up now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Live {
    pub port: u16,
    pub generation: u64,
    pub pid: u32,
}

#[derive(Clone)]
pub struct Worker {
    live: watch::Receiver<Option<Live>>,
    /// Shared with the supervisor so a timed-out handler stops being "live" at once.
    live_tx: Arc<watch::Sender<Option<Live>>>,
    kill: mpsc::UnboundedSender<(u64, String)>,
    http: reqwest::Client,
    restarts: Arc<AtomicU32>,
    stop: Arc<tokio::sync::Notify>,
    log: HandlerLog,
    counts: Counts,
}

/// What happened to each function's invocations since the host started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InvocationCounts {
    /// Invocations the handler answered 2xx.
    pub answered: u64,
    /// Invocations that failed: unreachable, timed out, or a non-2xx answer.
    pub failed: u64,
    /// Service Bus trigger messages completed after their invocation.
    pub completed: u64,
    /// Service Bus trigger messages abandoned (they come back, or dead-letter).
    pub abandoned: u64,
    /// Service Bus trigger messages the host could not settle after their invocation because
    /// the message or session lock was lost (Azure: MessageLockLost / SessionLockLost): not
    /// completed, not abandoned; the message was, or will be, delivered again.
    pub lock_lost: u64,
    /// The invocations' summed durations, from the host's request to the handler's answer (or
    /// the timeout): what Flex Consumption bills an execution for.
    pub busy: Duration,
}

type Counts = Arc<std::sync::Mutex<std::collections::BTreeMap<String, InvocationCounts>>>;

/// The handler's recent output lines (stdout and stderr, across restarts), as the host keeps
/// them for its log stream.
pub type HandlerLog = Arc<std::sync::Mutex<std::collections::VecDeque<String>>>;

/// How many lines of handler output the host keeps.
pub const LOG_LINES: usize = 20_000;

fn keep_line(log: &HandlerLog, line: &str) {
    let mut l = log.lock().unwrap_or_else(|e| e.into_inner());
    if l.len() >= LOG_LINES {
        l.pop_front();
    }
    l.push_back(line.to_string());
}

/// Why an invocation did not produce an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InvokeError {
    /// The handler could not be reached (down, restarting, crashed mid-request).
    Unreachable(String),
    /// `functionTimeout` passed; the handler is being restarted.
    Timeout,
}

pub struct Answer {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `%VAR%` in the executable path and arguments, expanded from the environment the handler gets
/// (app settings over the host's own); unset ones are removed, as the host does.
fn expand(s: &str, spec: &Spec) -> String {
    let lookup = |name: &str| {
        spec.env
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .or_else(|| spec.app.settings.get(name).cloned())
            .or_else(|| std::env::var(name).ok())
    };
    let mut out = String::new();
    let mut rest = s;
    while let Some(start) = rest.find('%') {
        let Some(len) = rest[start + 1..].find('%') else { break };
        let name = &rest[start + 1..start + 1 + len];
        out.push_str(&rest[..start]);
        if name.is_empty() || name.contains(char::is_whitespace) {
            out.push('%');
            rest = &rest[start + 1..];
            continue;
        }
        out.push_str(&lookup(name).unwrap_or_default());
        rest = &rest[start + len + 2..];
    }
    out.push_str(rest);
    out
}

fn executable(app: &FunctionApp, spec: &Spec) -> PathBuf {
    let exe = PathBuf::from(expand(&app.host.executable, spec));
    let in_root = app.root.join(&exe);
    // Relative paths resolve against the app root only if that file exists; else it is a command on PATH.
    if exe.is_relative() && in_root.is_file() { in_root } else { exe }
}

impl Worker {
    /// Start the handler and wait until it is ready. `env` adds to the app settings (the local
    /// stack passes its endpoints there).
    pub async fn start(app: &FunctionApp, env: Vec<(String, String)>) -> Result<Worker> {
        let (live_tx, live_rx) = watch::channel(None);
        let live_tx = Arc::new(live_tx);
        let (kill_tx, kill_rx) = mpsc::unbounded_channel();
        let restarts = Arc::new(AtomicU32::new(0));
        let stop = Arc::new(tokio::sync::Notify::new());
        let log = HandlerLog::default();
        let spec = Spec { app: app.clone(), env, log: log.clone() };
        let first = spawn_ready(&spec, 1).await?;
        live_tx.send_replace(Some(first.0));
        tokio::spawn(supervise(spec, first, live_tx.clone(), kill_rx, restarts.clone(), stop.clone()));
        let http = deploychain_functions::outbound::builder().pool_idle_timeout(Duration::from_secs(30)).build()?;
        Ok(Worker { live: live_rx, live_tx, kill: kill_tx, http, restarts, stop, log, counts: Counts::default() })
    }

    /// The live handler, waiting up to `wait` for one (e.g. during a restart).
    pub async fn live(&self, wait: Duration) -> Option<Live> {
        let mut rx = self.live.clone();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(l) = *rx.borrow_and_update() {
                return Some(l);
            }
            if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
                return None;
            }
        }
    }

    pub fn restarts(&self) -> u32 {
        self.restarts.load(Ordering::SeqCst)
    }

    /// The port the handler that is up now listens on.
    pub fn live_port(&self) -> Option<u16> {
        self.live.borrow().map(|l| l.port)
    }

    /// Each function's invocation counts so far.
    pub fn counts(&self) -> std::collections::BTreeMap<String, InvocationCounts> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn count(&self, function: &str, f: impl FnOnce(&mut InvocationCounts)) {
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        match c.get_mut(function) {
            Some(n) => f(n),
            None => f(c.entry(function.to_string()).or_default()),
        }
    }

    /// A trigger message was completed (`true`) or abandoned after its invocation.
    pub fn settled(&self, function: &str, completed: bool) {
        self.count(function, |n| if completed { n.completed += 1 } else { n.abandoned += 1 });
    }

    /// A trigger message could not be settled after its invocation: its lock was lost.
    pub fn lock_lost(&self, function: &str) {
        self.count(function, |n| n.lock_lost += 1);
    }

    /// POST the envelope to `/{function}` with the host's headers; kill and restart the handler
    /// when `timeout` passes.
    pub async fn invoke(&self, function: &str, envelope: &serde_json::Value, timeout: Duration) -> Result<Answer, InvokeError> {
        let started = std::time::Instant::now();
        let r = self.invoke_once(function, envelope, timeout).await;
        let ok = matches!(&r, Ok(a) if (200..300).contains(&a.status));
        let took = started.elapsed();
        self.count(function, |n| {
            if ok {
                n.answered += 1
            } else {
                n.failed += 1
            }
            n.busy += took;
        });
        r
    }

    async fn invoke_once(&self, function: &str, envelope: &serde_json::Value, timeout: Duration) -> Result<Answer, InvokeError> {
        let live = self.live(Duration::from_secs(30)).await.ok_or_else(|| InvokeError::Unreachable("the handler is not running".into()))?;
        let req = self
            .http
            .post(format!("http://127.0.0.1:{}/{function}", live.port))
            .header("content-type", "application/json; charset=utf-8")
            .header("x-azure-functions-hostversion", "4.1036.1.23224")
            .header("x-azure-functions-invocationid", uuid::Uuid::new_v4().to_string())
            .header("user-agent", "Azure-Functions-Host/4.1036.1.23224 (deploychain local host)")
            .body(envelope.to_string());
        match tokio::time::timeout(timeout, async {
            let rsp = req.send().await.map_err(|e| InvokeError::Unreachable(e.to_string()))?;
            let status = rsp.status().as_u16();
            let content_type = rsp.headers().get("content-type").and_then(|v| v.to_str().ok()).map(str::to_string);
            let body = rsp.bytes().await.map_err(|e| InvokeError::Unreachable(e.to_string()))?.to_vec();
            Ok(Answer { status, content_type, body })
        })
        .await
        {
            Ok(r) => r,
            Err(_) => {
                // Nothing more goes to this handler: later invocations wait for the restarted one.
                self.live_tx.send_if_modified(|cur| {
                    let doomed = cur.is_some_and(|l| l.generation == live.generation);
                    if doomed {
                        *cur = None;
                    }
                    doomed
                });
                let _ = self.kill.send((live.generation, format!("a function timeout has occurred in {function}")));
                Err(InvokeError::Timeout)
            }
        }
    }

    /// The handler's recent output, oldest first.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect()
    }

    /// Stop the handler for good.
    pub fn shutdown(&self) {
        self.stop.notify_one();
    }
}

struct Spec {
    app: FunctionApp,
    env: Vec<(String, String)>,
    log: HandlerLog,
}

fn mode_of(path: &std::path::Path) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(m) = std::fs::metadata(path) {
            return format!("mode {:o}", m.permissions().mode() & 0o777);
        }
    }
    "mode unknown".into()
}

/// What the handler's process inherits besides its app settings (Azure's workers have their own
/// PATH, HOME and temp directory; a backtrace setting helps a developer and changes no behaviour).
const PLATFORM_ENV: &[&str] = &["PATH", "HOME", "TMPDIR", "LANG", "TZ", "RUST_BACKTRACE"];

async fn spawn_ready(spec: &Spec, generation: u64) -> Result<(Live, Child)> {
    let port = free_port()?;
    let exe = executable(&spec.app, spec);
    let mut cmd = Command::new(&exe);
    let args: Vec<String> = spec.app.host.arguments.iter().map(|a| expand(a, spec)).filter(|a| !a.is_empty()).collect();
    cmd.args(&args)
        .current_dir(spec.app.host.working_directory.as_ref().map(|w| spec.app.root.join(w)).unwrap_or_else(|| spec.app.root.clone()))
        // The app settings and the platform's few, as a worker in Azure has them: nothing of the
        // environment `deploychain up` was started in leaks into the handler.
        .env_clear()
        .envs(std::env::vars_os().filter(|(k, _)| PLATFORM_ENV.iter().any(|p| k == p)))
        .envs(spec.app.settings.iter())
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .env("FUNCTIONS_CUSTOMHANDLER_PORT", port.to_string())
        .env("FUNCTIONS_HTTPWORKER_PORT", port.to_string())
        .env("FUNCTIONS_CUSTOMHANDLER_WORKER_ID", uuid::Uuid::new_v4().to_string())
        .env("FUNCTIONS_HTTPWORKER_ID", uuid::Uuid::new_v4().to_string())
        .env("FUNCTIONS_APP_ROOT_PATH", &spec.app.root)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| match e.kind() {
        // What a package without the executable bit gets on Flex Consumption, whose package
        // mount is read-only (the host's own chmod fails there).
        std::io::ErrorKind::PermissionDenied if exe.is_file() => anyhow::anyhow!(
            "the handler {} is not executable ({}): the package lost the executable bit, and Flex Consumption could not start it either; package it with `deploychain package`",
            exe.display(),
            mode_of(&exe)
        ),
        _ => anyhow::Error::new(e).context(format!("starting the handler {}", exe.display())),
    })?;
    let pid = child.id().unwrap_or_default();
    // The host logs the handler's output; stderr lines as errors.
    if let Some(out) = child.stdout.take() {
        let log = spec.log.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(out).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                keep_line(&log, &l);
                tracing::info!(target: "handler", "{l}");
            }
        });
    }
    if let Some(err) = child.stderr.take() {
        let log = spec.log.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(err).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                keep_line(&log, &l);
                tracing::error!(target: "handler", "{l}");
            }
        });
    }
    // Readiness: any HTTP answer to GET / within 30 s, polled every 25 ms.
    let client = crate::client::http();
    let start = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(anyhow!("the handler exited during start-up ({status})"));
        }
        if client.get(format!("http://127.0.0.1:{port}/")).timeout(Duration::from_secs(2)).send().await.is_ok() {
            return Ok((Live { port, generation, pid }, child));
        }
        if start.elapsed() > Duration::from_secs(30) {
            let _ = child.start_kill();
            return Err(anyhow!("the handler did not answer GET / on port {port} within 30 s"));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// How long a stopping handler may take to finish its invocations and flush its telemetry.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// SIGTERM, then SIGKILL after [`STOP_GRACE`].
async fn stop_gracefully(child: &mut Child, pid: u32) {
    #[cfg(unix)]
    if pid != 0
        && std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
        && tokio::time::timeout(STOP_GRACE, child.wait()).await.is_ok()
    {
        return;
    }
    let _ = child.start_kill();
    let _ = child.wait().await;
}

/// Handler failures (exits, kills after a timeout) the host tolerates within [`ERROR_WINDOW`]
/// (`HttpFunctionInvocationDispatcher.ErrorEventsThreshold`).
pub const ERROR_THRESHOLD: usize = 3;
pub const ERROR_WINDOW: Duration = Duration::from_secs(120);
/// How long the local host pauses when the real one would shut down and be restarted.
pub const APP_RESTART_PAUSE: Duration = Duration::from_secs(5);

async fn supervise(
    spec: Spec,
    first: (Live, Child),
    live_tx: Arc<watch::Sender<Option<Live>>>,
    mut kill_rx: mpsc::UnboundedReceiver<(u64, String)>,
    restarts: Arc<AtomicU32>,
    stop: Arc<tokio::sync::Notify>,
) {
    let (mut live, mut child) = first;
    // The host tolerates ERROR_THRESHOLD handler failures within ERROR_WINDOW; at the next one it
    // shuts down and the platform restarts the app. Locally that is a visible pause, then a start.
    let mut failures: Vec<Instant> = Vec::new();
    loop {
        let reason = tokio::select! {
            status = child.wait() => format!("the handler exited ({})", status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string())),
            Some((generation, why)) = kill_rx.recv() => {
                if generation != live.generation { continue; }
                let _ = child.start_kill();
                let _ = child.wait().await;
                format!("{why}; restarting the handler")
            }
            _ = stop.notified() => {
                live_tx.send_replace(None);
                stop_gracefully(&mut child, live.pid).await;
                return;
            }
        };
        live_tx.send_replace(None);
        tracing::warn!(target: "host", pid = live.pid, "{reason}");
        let now = Instant::now();
        failures.retain(|t| now.duration_since(*t) < ERROR_WINDOW);
        failures.push(now);
        if failures.len() >= ERROR_THRESHOLD {
            tracing::error!(
                target: "host",
                "the handler failed {} times within {}s: the Functions host shuts down here and Azure restarts the app; \
                 the local host starts the handler again in {}s",
                failures.len(),
                ERROR_WINDOW.as_secs(),
                APP_RESTART_PAUSE.as_secs()
            );
            failures.clear();
            tokio::select! {
                _ = tokio::time::sleep(APP_RESTART_PAUSE) => {}
                _ = stop.notified() => return,
            }
        }
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            match spawn_ready(&spec, live.generation + 1).await {
                Ok((l, c)) => {
                    restarts.fetch_add(1, Ordering::SeqCst);
                    tracing::info!(target: "host", pid = l.pid, port = l.port, "handler restarted");
                    live = l;
                    child = c;
                    live_tx.send_replace(Some(live));
                    break;
                }
                Err(e) => {
                    tracing::error!(target: "host", attempt, "handler restart failed: {e:#}");
                    tokio::time::sleep(Duration::from_millis(500 * u64::from(attempt.min(10)))).await;
                }
            }
        }
    }
}
