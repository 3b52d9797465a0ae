//! `deploychain`: run the whole chain on this machine, and talk to it.

use anyhow::{Context, Result, anyhow, bail};
use deploychain::config::LocalConfig;
use deploychain::secrets::Secrets;
use deploychain::stack::{AppSource, Stack, StackOptions, find_repo};
use deploychain::watch::Progress;
use deploychain::{USAGE, client};
use std::path::PathBuf;

struct Args {
    positional: Vec<String>,
    flags: std::collections::BTreeMap<String, String>,
    switches: std::collections::BTreeSet<String>,
}

fn parse_args() -> Result<Args> {
    let mut positional = Vec::new();
    let mut flags = std::collections::BTreeMap::new();
    let mut switches = std::collections::BTreeSet::new();
    let mut it = std::env::args().skip(1).peekable();
    while let Some(a) = it.next() {
        if let Some(name) = a.strip_prefix("--") {
            if let Some((k, v)) = name.split_once('=') {
                flags.insert(k.to_string(), v.to_string());
            } else if matches!(name, "reset" | "reject" | "help" | "json" | "dry-run" | "all" | "yes") {
                switches.insert(name.to_string());
            } else {
                let v = it.next().ok_or_else(|| anyhow!("--{name} needs a value"))?;
                flags.insert(name.to_string(), v);
            }
        } else {
            positional.push(a);
        }
    }
    Ok(Args { positional, flags, switches })
}

fn repo() -> Result<PathBuf> {
    let cwd = std::env::current_dir()?;
    find_repo(&cwd)
        .ok_or_else(|| anyhow!("run deploychain inside the deploychain repository (no host.json and functions/ above {})", cwd.display()))
}

fn data_dir(args: &Args, repo: &std::path::Path) -> PathBuf {
    args.flags.get("data-dir").map(PathBuf::from).unwrap_or_else(|| repo.join(".deploychain"))
}

fn port(args: &Args, name: &str, default: u16) -> Result<u16> {
    args.flags.get(name).map(|p| p.parse().map_err(|_| anyhow!("--{name} `{p}` is not a port"))).unwrap_or(Ok(default))
}

/// The function app `up` runs: the package `deploychain package` makes (built and staged now,
/// a no-op build when nothing changed), or `--package ZIP`, or `--handler PATH` packaged the same way.
fn app_source(args: &Args, repo: &std::path::Path, policy: &std::path::Path) -> Result<AppSource> {
    if let Some(zip) = args.flags.get("package") {
        return Ok(AppSource::Package(PathBuf::from(zip)));
    }
    if let Some(h) = args.flags.get("handler") {
        return Ok(AppSource::Handler(PathBuf::from(h)));
    }
    deploychain::package::check_layout(repo)?;
    let handler = deploychain::package::build_handler(repo)?;
    let p = deploychain::package::stage(repo, &handler, policy, &repo.join("target"))?;
    eprintln!("running the function app from {}", p.zip.display());
    Ok(AppSource::Package(p.zip))
}

async fn up(args: &Args) -> Result<()> {
    let repo = repo()?;
    let data = data_dir(args, &repo);
    // Every argument and the local configuration are checked before the (long) package build.
    let ports = (port(args, "port", 7071)?, port(args, "bus-port", 7072)?, port(args, "arm-port", 7073)?, port(args, "status-port", 7070)?);
    // deploychain.local.toml in the repository root (optional), or the file --config names (required).
    let local = match args.flags.get("config") {
        Some(path) => LocalConfig::load_required(std::path::Path::new(path))?,
        None => LocalConfig::load(&repo.join("deploychain.local.toml"))?,
    };
    let policy = args.flags.get("policy").map(PathBuf::from).unwrap_or_else(|| repo.join("policy.toml"));
    if args.switches.contains("reset") && data.exists() {
        std::fs::remove_dir_all(&data).with_context(|| format!("removing {}", data.display()))?;
    }
    let app = app_source(args, &repo, &policy)?;
    let opts = StackOptions {
        policy,
        repo: repo.clone(),
        data_dir: data.clone(),
        app,
        http_port: ports.0,
        bus_port: ports.1,
        arm_port: ports.2,
        status_port: ports.3,
        sim: local.sim,
        arm: local.arm,
        watchdog: local.watchdog,
        // The handler exports spans when the developer's shell names a collector; then the
        // configuration's [settings] (e.g. Azure's limits as host.json overrides).
        extra_settings: std::env::vars()
            .filter(|(k, _)| k.starts_with("OTEL_") || k == "APPLICATIONINSIGHTS_CONNECTION_STRING")
            .chain(local.settings)
            .collect(),
    };
    let stack = Stack::start(opts).await?;
    let mut rx = stack.progress.subscribe();
    println!("deploychain is up — the whole chain on this machine, no cloud account");
    println!("  Status page      http://{}/   (runs, approvals, dead letters, scale sets)", stack.status_addr);
    println!("  Functions host   http://{}/api   (function key for /api/runs: {})", stack.http_addr, stack.secrets.function_key);
    println!("  GitHub webhook   http://{}/api/hooks/github   (secret in {}/secrets.json)", stack.http_addr, data.display());
    println!("  Service Bus      sb://{} (REST data plane; entities from infra/servicebus.json)", stack.bus_addr);
    println!("  ARM endpoint     http://{}   (Microsoft.Compute scale sets: {})", stack.arm_addr, scale_sets(&stack));
    println!("  data             {}   (start over: deploychain up --reset)", data.display());
    println!();
    println!("Push a change from another terminal:   cargo run -p deploychain -- send github push");
    println!("See runs:                               cargo run -p deploychain -- runs");
    println!("Stop: Ctrl-C (nothing is lost; `deploychain up` again continues where it stopped)");
    println!();
    // Approval links come straight from the handler's notify call, a moment before the
    // approval.requested event passes through the bus: hold them until that event is shown.
    let mut held: Vec<(tokio::time::Instant, String, String, String)> = Vec::new();
    let show_link = |run: &str, approver: &str, link: &str| {
        println!("{} {run:<24} approval link for {approver}:", chrono::Local::now().format("%H:%M:%S"));
        println!("           open {link}");
        println!("           or   cargo run -p deploychain -- approve '{link}'");
    };
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = tick.tick() => {
                let now = tokio::time::Instant::now();
                held.retain(|(at, run, approver, link)| {
                    let due = now.duration_since(*at) > std::time::Duration::from_secs(2);
                    if due {
                        show_link(run, approver, link);
                    }
                    !due
                });
            }
            p = rx.recv() => match p {
                Ok(Progress::Event { run, line, ty }) => {
                    println!("{} {run:<24} {line}", chrono::Local::now().format("%H:%M:%S"));
                    if ty == deploychain_events::EventType::ApprovalRequested {
                        held.retain(|(_, r, approver, link)| {
                            let mine = *r == run;
                            if mine {
                                show_link(r, approver, link);
                            }
                            !mine
                        });
                    }
                }
                Ok(Progress::Approval { run, approver, link }) => held.push((tokio::time::Instant::now(), run, approver, link)),
                Ok(Progress::Stuck { run, text }) => println!("{} {run:<24} STUCK: {text}", chrono::Local::now().format("%H:%M:%S")),
                Ok(Progress::Target { scale_set, line }) => println!("{} {:<24} {line}", chrono::Local::now().format("%H:%M:%S"), format!("  {scale_set}")),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(_) => break,
            }
        }
    }
    println!("stopping …");
    stack.stop().await;
    Ok(())
}

/// The simulated scale sets, by name.
fn scale_sets(stack: &Stack) -> String {
    stack.arm.names().join(", ")
}

/// `deploychain dlq list|show|replay|purge`: the dead-letter operations against the local bus (its
/// connection from secrets.json) or any namespace (`--connection-string`, or `ServiceBusConnection`).
async fn dlq(args: &Args, action: &str, rest: &[&str]) -> Result<()> {
    use deploychain_functions::ops::{DeadLetters, Filter};
    let conn = match args.flags.get("connection-string").cloned().or_else(|| std::env::var("ServiceBusConnection").ok()) {
        Some(c) => c,
        None => {
            let s = secrets(args)?;
            let port = args.flags.get("bus-port").map(String::as_str).unwrap_or("7072");
            format!(
                "Endpoint=sb://127.0.0.1:{port};SharedAccessKeyName={};SharedAccessKey={};UseDevelopmentEmulator=true",
                s.bus_key_name, s.bus_key
            )
        }
    };
    let conn =
        deploychain_functions::adapters::servicebus::ConnectionString::parse(&conn).map_err(|e| anyhow!("the connection string: {e}"))?;
    let repo = repo()?;
    let topology = deploychain_bus::Topology::load(repo.join("infra/servicebus.json")).context("infra/servicebus.json")?;
    let topic = topology.topics.first().ok_or_else(|| anyhow!("infra/servicebus.json has no topic"))?;
    let subs = topic.subscriptions.iter().map(|s| s.name.clone()).collect();
    let mut ops = DeadLetters::new(&conn, &topic.name, subs, "deploychain-parked", azure_core::new_http_client());
    let policy_path = args.flags.get("policy").map(PathBuf::from).unwrap_or_else(|| repo.join("policy.toml"));
    if let Ok(text) = std::fs::read_to_string(&policy_path)
        && let Ok(p) = deploychain_functions::policy::Policy::from_toml(&text)
    {
        ops = ops.with_policy(std::sync::Arc::new(p));
    }
    let mut filter = Filter {
        ids: rest.iter().map(|s| s.to_string()).collect(),
        event_type: args.flags.get("type").cloned(),
        run: args.flags.get("run").cloned(),
        reason: args.flags.get("reason").cloned(),
        entity: args.flags.get("entity").cloned(),
        older_than: None,
    };
    if let Some(d) = args.flags.get("older-than") {
        filter.older_than = Some(
            deploychain_functions::policy::parse_duration(d)
                .ok_or_else(|| anyhow!("--older-than `{d}` is not a duration like 10m or 2h"))?,
        );
    }
    let who = format!("{} (deploychain dlq)", std::env::var("USER").unwrap_or_else(|_| "someone".into()));
    let dry = args.switches.contains("dry-run");
    match action {
        "list" => {
            let now = chrono::Utc::now();
            let letters = ops.list(&filter).await.map_err(|e| anyhow!("{e}"))?;
            if letters.is_empty() {
                println!("nothing dead-lettered or parked");
            }
            for l in letters {
                let age = l
                    .enqueued_at
                    .map(|e| deploychain_functions::steps::runs::human((now - e).to_std().unwrap_or_default()))
                    .unwrap_or_else(|| "?".into());
                println!(
                    "{}  {}  {}  run {}  {}: {}  ({} deliveries, {age} old)",
                    l.entity,
                    l.message_id,
                    l.event_type.as_deref().unwrap_or("-"),
                    l.run.as_deref().unwrap_or("-"),
                    l.reason.as_deref().unwrap_or("-"),
                    l.description.as_deref().unwrap_or(""),
                    l.delivery_count
                );
            }
            Ok(())
        }
        "show" => {
            if filter.ids.is_empty() {
                bail!("usage: deploychain dlq show MESSAGE-ID");
            }
            let letters = ops.list(&filter).await.map_err(|e| anyhow!("{e}"))?;
            let l = letters.first().ok_or_else(|| anyhow!("no dead-lettered or parked message {}", filter.ids.join(", ")))?;
            println!("{}", serde_json::to_string_pretty(l)?);
            Ok(())
        }
        "replay" | "purge" => {
            let everything = args.switches.contains("all");
            if filter.ids.is_empty()
                && !everything
                && filter.event_type.is_none()
                && filter.run.is_none()
                && filter.reason.is_none()
                && filter.older_than.is_none()
            {
                bail!("say which: message ids, a filter (--type, --run, --reason, --older-than, --entity) or --all");
            }
            if action == "purge" && !dry && !args.switches.contains("yes") {
                let n = ops.list(&filter).await.map_err(|e| anyhow!("{e}"))?.len();
                bail!("purge removes {n} message(s) for good: run it again with --yes (or see them with --dry-run)");
            }
            let rate: f64 = args
                .flags
                .get("rate")
                .map(|r| r.parse().map_err(|_| anyhow!("--rate `{r}` is not messages per second")))
                .transpose()?
                .unwrap_or(10.0);
            let done = if action == "replay" { ops.replay(&filter, dry, rate, &who).await } else { ops.purge(&filter, dry, &who).await }
                .map_err(|e| anyhow!("{e}"))?;
            for h in &done {
                let verb = match (action, dry) {
                    ("replay", true) => "would replay",
                    ("replay", false) => "replayed",
                    (_, true) => "would purge",
                    _ => "purged",
                };
                println!(
                    "{verb} {} from {}{}",
                    h.message_id,
                    h.entity,
                    h.new_message_id.as_deref().filter(|_| action == "replay").map(|n| format!(" as {n}")).unwrap_or_default()
                );
            }
            println!("{} message(s){}", done.len(), if dry { " (dry run: nothing changed)" } else { "" });
            Ok(())
        }
        other => bail!("`dlq {other}`: use list, show, replay or purge"),
    }
}

fn base_url(args: &Args) -> String {
    args.flags
        .get("url")
        .cloned()
        .unwrap_or_else(|| format!("http://127.0.0.1:{}", args.flags.get("port").map(String::as_str).unwrap_or("7071")))
}

fn secrets(args: &Args) -> Result<Secrets> {
    let repo = repo()?;
    let path = data_dir(args, &repo).join("secrets.json");
    if !path.is_file() {
        bail!("no {} yet: start the stack first with `deploychain up`", path.display());
    }
    Secrets::load_or_create(&path)
}

async fn run() -> Result<()> {
    let args = parse_args()?;
    let cmd: Vec<&str> = args.positional.iter().map(String::as_str).collect();
    match cmd.as_slice() {
        ["up"] => up(&args).await,
        ["send", "github", event, rest @ ..] => {
            let s = secrets(&args)?;
            let body = match rest.first() {
                Some(file) => std::fs::read(file).with_context(|| format!("reading {file}"))?,
                None if *event == "push" => {
                    let repo = repo()?;
                    let policy = args.flags.get("policy").map(PathBuf::from).unwrap_or_else(|| repo.join("policy.toml"));
                    client::sample_push(
                        &policy,
                        args.flags.get("branch").map(String::as_str),
                        args.flags.get("commit").map(String::as_str),
                    )?
                }
                None => bail!("give the payload file: deploychain send github {event} FILE"),
            };
            let (status, text) = client::send_github(&base_url(&args), &s, event, &body).await?;
            println!("{status} {text}");
            if !(200..300).contains(&status) {
                bail!("the webhook was refused");
            }
            Ok(())
        }
        ["send", "azure-devops", file] => {
            let s = secrets(&args)?;
            let body = std::fs::read(file).with_context(|| format!("reading {file}"))?;
            let (status, text) = client::send_azure_devops(&base_url(&args), &s, &body).await?;
            println!("{status} {text}");
            Ok(())
        }
        ["runs", rest @ ..] => {
            let s = secrets(&args)?;
            let id = match rest {
                [] => None,
                ["show", id] | [id] => Some(*id),
                _ => bail!("usage: deploychain runs [show ID] [--commit SHA] [--json]"),
            };
            let text = client::runs(&base_url(&args), &s, id, args.flags.get("commit").map(String::as_str)).await?;
            if args.switches.contains("json") {
                println!("{text}");
            } else {
                let v: serde_json::Value = serde_json::from_str(&text).context("the runs API answered no JSON")?;
                print!("{}", if id.is_some() { client::describe_run(&v) } else { client::describe_runs(&v) });
            }
            Ok(())
        }
        ["dlq", action, rest @ ..] => dlq(&args, action, rest).await,
        ["scalesets"] => {
            let s = secrets(&args)?;
            let repo = repo()?;
            let policy = args.flags.get("policy").map(PathBuf::from).unwrap_or_else(|| repo.join("policy.toml"));
            let arm = args.flags.get("arm-url").cloned().unwrap_or_else(|| "http://127.0.0.1:7073".into());
            print!("{}", client::scale_sets(&arm, &s, &policy).await?);
            Ok(())
        }
        ["approve", link] => {
            let decision = if args.switches.contains("reject") { "reject" } else { "approve" };
            let (status, text) = client::decide(link, decision, args.flags.get("comment").map(String::as_str)).await?;
            if !(200..300).contains(&status) {
                let why = serde_json::from_str::<serde_json::Value>(&text)
                    .ok()
                    .and_then(|v| v["error"].as_str().or(v["message"].as_str()).map(str::to_string))
                    .unwrap_or(text);
                bail!("the decision was refused ({status}): {why}");
            }
            println!("{status}: {decision} recorded");
            Ok(())
        }
        ["package"] => {
            let repo = repo()?;
            let out = args.flags.get("out").map(PathBuf::from).unwrap_or_else(|| repo.join("target"));
            let policy = args.flags.get("policy").map(PathBuf::from).unwrap_or_else(|| repo.join("policy.toml"));
            deploychain::package::check_layout(&repo)?;
            let handler = deploychain::package::build_handler(&repo)?;
            let p = deploychain::package::stage(&repo, &handler, &policy, &out)?;
            let mib = |path: &std::path::Path| std::fs::metadata(path).map(|m| m.len() as f64 / 1_048_576.0).unwrap_or(0.0);
            println!(
                "staged {} ({} files; handler {:.1} MiB, static) and {} ({:.1} MiB)",
                p.dir.display(),
                p.files.len(),
                mib(&p.dir.join("handler")),
                p.zip.display(),
                mib(&p.zip)
            );
            println!("deploy it: azd deploy, or az functionapp deployment source config-zip --src {}", p.zip.display());
            Ok(())
        }
        ["reset"] => {
            let repo = repo()?;
            let data = data_dir(&args, &repo);
            if data.exists() {
                std::fs::remove_dir_all(&data)?;
            }
            println!("removed {}", data.display());
            Ok(())
        }
        _ => {
            print!("{USAGE}");
            if args.switches.contains("help") || cmd.is_empty() { Ok(()) } else { bail!("unknown command") }
        }
    }
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn,host=info,simulators=info".into()))
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run().await {
        eprintln!("deploychain: {e:#}");
        std::process::exit(1);
    }
}
