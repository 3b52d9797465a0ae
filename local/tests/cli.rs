//! The README's commands, as a user runs them: `deploychain up` (the real binary, on free ports, a
//! temporary data directory), then `send github push`, `runs`, `approve`, `scalesets` against it,
//! and Ctrl-C. Bad input to the commands fails with a clear message.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize().unwrap()
}

/// The handler cargo built for this workspace.
fn handler() -> PathBuf {
    let h = Path::new(env!("CARGO_BIN_EXE_deploychain")).with_file_name("handler");
    assert!(
        h.is_file(),
        "{} is missing: `cargo build -p deploychain-functions --bin handler` (the workspace test command builds it)",
        h.display()
    );
    h
}

fn deploychain(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_deploychain")).args(args).current_dir(repo()).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

struct Up {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Up {
    /// The next stdout line matching `pred` (bounded).
    fn wait_line(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if pred(&l) {
                        return l;
                    }
                }
                Err(_) => panic!("no line for {what}; the output so far:\n{}", self.seen.join("\n")),
            }
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn after<'a>(line: &'a str, marker: &str) -> &'a str {
    line.split(marker).nth(1).unwrap().split_whitespace().next().unwrap()
}

#[test]
fn the_readme_commands_run_a_release_to_production() {
    let data = std::env::temp_dir().join(format!("deploychain-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let d = data.to_str().unwrap().to_string();
    let mut child = Command::new(env!("CARGO_BIN_EXE_deploychain"))
        .args(["up", "--port", "0", "--bus-port", "0", "--arm-port", "0", "--status-port", "0", "--data-dir", &d, "--handler"])
        .arg(handler())
        .current_dir(repo())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let mut up = Up { child, lines, seen: Vec::new() };
    let host = up.wait_line("the Functions host", |l| l.contains("Functions host"));
    let url = after(&host, "Functions host").trim_end_matches("/api").to_string();
    let bus = up.wait_line("the bus", |l| l.contains("Service Bus"));
    let bus_port = after(&bus, "Service Bus").trim_start_matches("sb://").rsplit(':').next().unwrap().to_string();
    let arm = up.wait_line("the ARM endpoint", |l| l.contains("ARM endpoint"));
    let arm_url = after(&arm, "ARM endpoint").to_string();
    assert!(arm.contains("web-staging") && arm.contains("web-prod"), "{arm}");
    up.wait_line("ready", |l| l.starts_with("Stop: Ctrl-C"));

    // A push of a new commit starts a run.
    let (ok, out, err) = deploychain(&["send", "github", "push", "--data-dir", &d, "--url", &url]);
    assert!(ok, "{out}{err}");
    let run = serde_json::from_str::<serde_json::Value>(out.trim_start_matches("202 ")).unwrap()["run"].as_str().unwrap().to_string();
    // A real payload of a repository the policy does not know: acknowledged, no run.
    let (ok, out, _) =
        deploychain(&["send", "github", "push", "tests/fixtures/github/push.branch-updated.probot.json", "--data-dir", &d, "--url", &url]);
    assert!(ok && out.starts_with("202") && out.contains("not in the pipeline policy"), "{out}");

    // The terminal shows the run's steps and the approval link.
    up.wait_line("deployed to staging", |l| l.contains(&run) && l.contains("deployed to staging"));
    up.wait_line("the approval link", |l| l.contains(&run) && l.contains("approval link for alice@contoso.com"));
    let link = up.wait_line("the link", |l| l.trim_start().starts_with("open ")).trim().trim_start_matches("open ").to_string();
    let (ok, out, _) = deploychain(&["runs", &run, "--json", "--data-dir", &d, "--url", &url]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["status"], "waiting", "{v}");
    assert!(v["waitingFor"].as_str().unwrap().starts_with("approval of production"));
    // The same, as a person reads it: what it waits for, on whom, since when; then the timeline.
    let (ok, out, _) = deploychain(&["runs", "show", &run, "--data-dir", &d, "--url", &url]);
    assert!(ok, "{out}");
    assert!(
        out.contains("WAITING") && out.contains("waiting for 1 more approval of production — from alice@contoso.com, bob@contoso.com"),
        "{out}"
    );
    assert!(out.contains("deployed to staging") && out.contains("push received"), "{out}");
    let (ok, out, _) = deploychain(&["runs", "--data-dir", &d, "--url", &url]);
    assert!(ok && out.lines().any(|l| l.starts_with(&run) && l.contains("waiting")), "{out}");

    let (ok, out, err) = deploychain(&["approve", &link, "--comment", "ship it"]);
    assert!(ok && out.contains("approve recorded"), "{out}{err}");
    up.wait_line("the run to succeed", |l| l.contains(&run) && l.contains("run succeeded"));
    let (ok, _, err) = deploychain(&["approve", &link, "--reject"]);
    assert!(!ok && err.contains("409"), "a decision is not changed: {err}");

    let (ok, out, err) = deploychain(&["scalesets", "--data-dir", &d, "--arm-url", &arm_url]);
    assert!(ok, "{err}");
    assert_eq!(out.matches(&format!("run {run}")).count(), 2, "both scale sets run the release:\n{out}");
    assert_eq!(out.matches("HealthState/healthy").count(), 4, "{out}");

    // Dead letters: none after a clean release; replay and purge need to be told what.
    let (ok, out, err) = deploychain(&["dlq", "list", "--data-dir", &d, "--bus-port", &bus_port]);
    assert!(ok && out.contains("nothing dead-lettered or parked"), "{out}{err}");
    let (ok, _, err) = deploychain(&["dlq", "replay", "--data-dir", &d, "--bus-port", &bus_port]);
    assert!(!ok && err.contains("say which"), "{err}");
    let (ok, _, err) = deploychain(&["dlq", "purge", "--all", "--data-dir", &d, "--bus-port", &bus_port]);
    assert!(!ok && err.contains("--yes"), "a purge asks first: {err}");
    let (ok, out, _) = deploychain(&["dlq", "purge", "--all", "--dry-run", "--data-dir", &d, "--bus-port", &bus_port]);
    assert!(ok && out.contains("0 message(s) (dry run: nothing changed)"), "{out}");

    // Ctrl-C stops everything; nothing is left running.
    Command::new("kill").args(["-INT", &up.child.id().to_string()]).status().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = up.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "deploychain up did not stop on Ctrl-C");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{status}");
    let _ = std::fs::remove_dir_all(&data);
}

#[test]
fn commands_fail_clearly_on_bad_input() {
    let (ok, out, err) = deploychain(&["frobnicate"]);
    assert!(!ok && out.contains("deploychain up") && err.contains("unknown command"), "{out}{err}");
    let (ok, _, err) = deploychain(&["send", "github", "push", "--data-dir", "/nonexistent/deploychain"]);
    assert!(!ok && err.contains("start the stack first"), "{err}");
    let (ok, _, err) = deploychain(&["up", "--port", "not-a-port"]);
    assert!(!ok && err.contains("not a port"), "{err}");
    let data = std::env::temp_dir().join(format!("deploychain-cli-bad-{}", std::process::id()));
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("secrets.json"), "{}").unwrap();
    let (ok, _, err) = deploychain(&["runs", "--data-dir", data.to_str().unwrap()]);
    assert!(!ok && err.contains("damaged"), "{err}");
    let _ = std::fs::remove_dir_all(&data);
}
