//! `github_webhook` — HTTP POST `/api/hooks/github`: GitHub repository webhooks.
//!
//! - Auth: `X-Hub-Signature-256` = `sha256=` HMAC-SHA256(secret, raw body), compared in constant
//!   time against `GITHUB_WEBHOOK_SECRET`. Missing or forged → 401, nothing published.
//! - Content-Type `application/json`, or GitHub's `application/x-www-form-urlencoded` (`payload=`
//!   the JSON); anything else → 415. One `X-GitHub-Event` (a repeated header → 400). A push
//!   naming a branch git would refuse (`git check-ref-format`) → 400.
//! - `ping` → 200. `push` to a configured branch → `push` (a run starts); tag pushes and branch
//!   deletions → 202 ignored with the reason. `workflow_run` completed → `build.completed` (for the run its
//!   `display_title` names when deploychain dispatched it, else the run of its `head_sha`).
//!   `registry_package` / `package` published (container) → `image.ready`. Anything else → 202 ignored.
//! - Events are published before the 2xx answer: if the bus is down the caller gets 503 and GitHub
//!   can redeliver; nothing accepted is lost. Redeliveries map to the same MessageIds.

use super::*;
use crate::invoke::{HttpRequest, HttpResponse};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

pub const NAME: &str = "github_webhook";
const ZERO_SHA: &str = "0000000000000000000000000000000000000000";

pub async fn handle(state: AppState, req: HttpRequest) -> Result<HttpResponse> {
    if req.method != "POST" {
        return Err(Error::Malformed(format!("{} is not supported; GitHub delivers with POST", req.method)));
    }
    if req.body.len() > state.config.max_body_bytes {
        return Err(Error::TooLarge(format!("the body is {} bytes; the limit is {}", req.body.len(), state.config.max_body_bytes)));
    }
    let secret = state.config.github_secret.as_ref().ok_or_else(|| Error::Unauthorized("GitHub webhooks are not configured".into()))?;
    verify_signature(secret.expose().as_bytes(), &req.body, req.header("x-hub-signature-256"))?;
    let event = req.header("x-github-event").ok_or_else(|| Error::Malformed("missing X-GitHub-Event header".into()))?.to_string();
    if event.contains(',') {
        // The host joins a repeated header's values with commas: GitHub sends one.
        return Err(Error::Malformed("X-GitHub-Event names more than one event".into()));
    }
    let delivery = req.header("x-github-delivery").map(str::to_string);
    let form_payload;
    let body = match media_type(req.header("content-type")).as_str() {
        "application/json" => strip_bom(&req.body),
        // GitHub's other content type: the JSON is the form's `payload` field (signed as sent).
        "application/x-www-form-urlencoded" => {
            form_payload = form_field(&req.body, b"payload")
                .ok_or_else(|| Error::Malformed("a form-encoded delivery without its `payload` field".into()))?;
            if std::str::from_utf8(&form_payload).is_err() {
                return Err(Error::Malformed("the form's `payload` is not UTF-8".into()));
            }
            strip_bom(&form_payload)
        }
        other => {
            return Err(Error::UnsupportedMediaType(format!(
                "Content-Type `{other}`: GitHub webhooks are `application/json` (or `application/x-www-form-urlencoded`)"
            )));
        }
    };
    if event == "push" {
        // The hot path: only the fields a run needs are read (the rest is skipped unparsed).
        if let Ok(p) = serde_json::from_slice::<PushPayload>(body) {
            return push(&state, &p, delivery).await;
        }
    }
    let payload: Value = serde_json::from_slice(body).map_err(|e| Error::Malformed(format!("the body is not JSON: {e}")))?;
    if !payload.is_object() {
        return Err(Error::Malformed("the body is not a JSON object".into()));
    }
    match event.as_str() {
        "ping" => Ok(HttpResponse::json(200, &json!({ "pong": true, "zen": payload["zen"] }))),
        "push" => Err(Error::Malformed(match serde_json::from_value::<PushPayload>(payload) {
            Err(e) => format!("the push payload is not GitHub's: {e}"),
            Ok(_) => "the push payload is not GitHub's".into(),
        })),
        "workflow_run" => workflow_run(&state, &payload).await,
        "registry_package" | "package" => package(&state, &payload, &event).await,
        other => Ok(ignored(format!("`{other}` events do not drive deployments"))),
    }
}

/// Constant-time check of `sha256=<hex>` over the raw body.
pub fn verify_signature(secret: &[u8], body: &[u8], header: Option<&str>) -> Result<()> {
    let header = header.ok_or_else(|| Error::Unauthorized("missing X-Hub-Signature-256".into()))?;
    let hex_sig = header.strip_prefix("sha256=").ok_or_else(|| Error::Unauthorized("X-Hub-Signature-256 is not `sha256=…`".into()))?;
    let given = hex::decode(hex_sig.trim()).map_err(|_| Error::Unauthorized("X-Hub-Signature-256 is not hex".into()))?;
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).map_err(|_| Error::Unauthorized("bad webhook secret".into()))?;
    mac.update(body);
    // verify_slice compares in constant time.
    mac.verify_slice(&given).map_err(|_| Error::Unauthorized("X-Hub-Signature-256 does not match the body".into()))
}

/// The bytes of field `name` of an `application/x-www-form-urlencoded` body, decoded strictly
/// (no replacement of bytes that are not UTF-8: the caller decides).
fn form_field(body: &[u8], name: &[u8]) -> Option<Vec<u8>> {
    body.split(|b| *b == b'&').find_map(|pair| {
        let value = pair.strip_prefix(name)?.strip_prefix(b"=")?;
        let plus_as_space: Vec<u8> = value.iter().map(|b| if *b == b'+' { b' ' } else { *b }).collect();
        Some(percent_encoding::percent_decode(&plus_as_space).collect())
    })
}

/// Refuse (415) a body whose Content-Type is not JSON: `application/json` or a `+json` type
/// (`application/cloudevents+json`, …). `who` names the sender for the message.
pub fn require_json(req: &HttpRequest, who: &str) -> Result<()> {
    let media = media_type(req.header("content-type"));
    let json = media == "application/json" || (media.starts_with("application/") && media.ends_with("+json"));
    if json { Ok(()) } else { Err(Error::UnsupportedMediaType(format!("Content-Type `{media}`: {who} delivers `application/json`"))) }
}

/// The media type of a Content-Type value, lower case, without parameters (`""` when absent).
pub fn media_type(content_type: Option<&str>) -> String {
    content_type.unwrap_or_default().split(';').next().unwrap_or_default().trim().to_ascii_lowercase()
}

/// Whether git would accept `name` as a branch (`git check-ref-format --branch`): no control
/// characters, space, `~ ^ : ? * [ \`, `..`, `@{`, `//`; no part starting with `.` or ending in
/// `.lock`; not ending in `/` or `.`; not `@`. A payload naming anything else was not written by
/// git, however it is signed.
pub fn is_branch_name(name: &str) -> bool {
    let bad_char = |c: char| c.is_ascii_control() || matches!(c, ' ' | '~' | '^' | ':' | '?' | '*' | '[' | '\\');
    !name.is_empty()
        && name != "@"
        && !name.chars().any(bad_char)
        && !name.contains("..")
        && !name.contains("@{")
        && !name.contains("//")
        && !name.ends_with('/')
        && !name.ends_with('.')
        && name.split('/').all(|part| !part.is_empty() && !part.starts_with('.') && !part.ends_with(".lock"))
}

pub fn strip_bom(b: &[u8]) -> &[u8] {
    b.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(b)
}

pub fn ignored(reason: impl Into<String>) -> HttpResponse {
    HttpResponse::json(202, &json!({ "ignored": reason.into() }))
}

pub fn accepted(ev: &DeployEvent) -> HttpResponse {
    HttpResponse::json(202, &json!({ "accepted": ev.event_type().as_str(), "run": ev.run_id, "id": ev.id }))
}

fn s<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(*k)).and_then(Value::as_str)
}

/// Publish an edge event (no step commit: the consuming step owns the run state).
pub async fn publish_event(state: &AppState, ev: &DeployEvent) -> Result<()> {
    let out = crate::adapters::Outbound::from_event(ev, session_for(ev, &state.policy));
    state.publisher.publish(&out).await
}

/// The trace an edge event of an existing run continues.
pub async fn run_trace(state: &AppState, run_id: &str, event_id: &str) -> Result<Option<TraceContext>> {
    Ok(state.store.run(run_id).await?.map(|r| trace_of(&r, event_id)))
}

/// The same for a build report, which may come before its run is committed ([`run_when_committed`]).
pub async fn build_run_trace(state: &AppState, run_id: &str, event_id: &str) -> Result<Option<TraceContext>> {
    Ok(run_when_committed(state, run_id).await?.map(|r| trace_of(&r, event_id)))
}

fn trace_of(r: &crate::adapters::Run, event_id: &str) -> TraceContext {
    TraceContext { traceparent: event_traceparent(r.traceparent.as_deref(), event_id), tracestate: None }
}

/// The parts of a GitHub `push` payload a run is made of.
#[derive(serde::Deserialize)]
struct PushPayload {
    #[serde(rename = "ref")]
    git_ref: Option<String>,
    repository: Option<PushRepository>,
    after: Option<String>,
    before: Option<String>,
    deleted: Option<bool>,
    compare: Option<String>,
    pusher: Option<PushUser>,
    sender: Option<PushSender>,
    head_commit: Option<PushCommit>,
    #[serde(default)]
    commits: Option<Vec<PushCommit>>,
}

#[derive(serde::Deserialize)]
struct PushRepository {
    full_name: Option<String>,
}

#[derive(serde::Deserialize)]
struct PushUser {
    name: Option<String>,
    email: Option<String>,
    username: Option<String>,
}

#[derive(serde::Deserialize)]
struct PushSender {
    login: Option<String>,
}

#[derive(serde::Deserialize)]
struct PushCommit {
    id: Option<String>,
    message: Option<String>,
    url: Option<String>,
    timestamp: Option<String>,
    author: Option<PushUser>,
}

async fn push(state: &AppState, p: &PushPayload, delivery: Option<String>) -> Result<HttpResponse> {
    let git_ref = p.git_ref.as_deref().ok_or_else(|| Error::Malformed("push without `ref`".into()))?;
    let repo = p
        .repository
        .as_ref()
        .and_then(|r| r.full_name.as_deref())
        .ok_or_else(|| Error::Malformed("push without `repository.full_name`".into()))?;
    let Some(branch) = git_ref.strip_prefix("refs/heads/") else {
        return Ok(ignored(format!("`{git_ref}` is not a branch (tag pushes do not start runs)")));
    };
    if !is_branch_name(branch) {
        return Err(Error::Malformed(format!("`{}` is not a branch name git allows", branch.escape_debug())));
    }
    let after = p.after.as_deref().unwrap_or_default();
    if p.deleted == Some(true) || after == ZERO_SHA {
        return Ok(ignored(format!("branch `{branch}` was deleted")));
    }
    let Some(app) = state.policy.github_app(repo, branch) else {
        let why = if state.policy.knows_github_repo(repo) {
            format!("branch `{branch}` of {repo} is not deployed by any pipeline")
        } else {
            format!("repository {repo} is not in the pipeline policy")
        };
        return Ok(ignored(format!("{why}: no run")));
    };
    if after.len() < 7 || !after.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::Malformed(format!("push `after` `{after}` is not a commit id")));
    }
    let commit = after.to_ascii_lowercase();
    let rid = run_id(&app.name, &commit);
    let id = event_id(&rid, "push");
    let head = p.head_commit.as_ref();
    let message = head.and_then(|h| h.message.as_deref()).map(|m| m.chars().take(500).collect::<String>());
    let pusher = p.pusher.as_ref();
    let ev = DeployEvent {
        source: format!("/github/{repo}"),
        time: Utc::now(),
        // The webhook's own span is the release's root (a derived root without recorded spans).
        trace: TraceContext {
            traceparent: Some(crate::telemetry::current_traceparent().unwrap_or_else(|| root_traceparent(&rid))),
            tracestate: None,
        },
        run_id: rid,
        id,
        data: EventData::Push(Push {
            app: app.name.clone(),
            provider: Provider::Github,
            repository: repo.to_string(),
            branch: branch.to_string(),
            commit,
            before: p.before.clone(),
            pusher: pusher.and_then(|u| u.name.clone()).or_else(|| p.sender.as_ref().and_then(|s| s.login.clone())),
            message,
            url: head.and_then(|h| h.url.clone()).or_else(|| p.compare.clone()),
            delivery,
            pusher_email: pusher.and_then(|u| u.email.clone()),
            commits: p
                .commits
                .iter()
                .flatten()
                .filter_map(|c| {
                    let author = c.author.as_ref();
                    Some(CommitInfo {
                        id: c.id.as_deref().filter(|id| id.len() >= 7 && id.bytes().all(|b| b.is_ascii_hexdigit()))?.to_ascii_lowercase(),
                        message: c.message.as_deref().map(|m| m.chars().take(500).collect()),
                        author: author.and_then(|a| a.name.clone()),
                        author_email: author.and_then(|a| a.email.clone()),
                        author_login: author.and_then(|a| a.username.clone()),
                        timestamp: c
                            .timestamp
                            .as_deref()
                            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                            .map(|t| t.with_timezone(&chrono::Utc)),
                    })
                })
                .take(MAX_PUSH_COMMITS)
                .collect(),
        }),
    };
    publish_event(state, &ev).await?;
    Ok(accepted(&ev))
}

async fn workflow_run(state: &AppState, p: &Value) -> Result<HttpResponse> {
    let action = s(p, &["action"]).unwrap_or_default();
    if action != "completed" {
        return Ok(ignored(format!("workflow_run `{action}`: only completed runs report builds")));
    }
    let wr = &p["workflow_run"];
    let repo = s(p, &["repository", "full_name"]).ok_or_else(|| Error::Malformed("workflow_run without `repository.full_name`".into()))?;
    let branch = s(wr, &["head_branch"]).unwrap_or_default();
    let sha = s(wr, &["head_sha"]).ok_or_else(|| Error::Malformed("workflow_run without `head_sha`".into()))?.to_ascii_lowercase();
    let Some(app) = state.policy.github_app(repo, branch).filter(|a| a.build.provider == BuildProvider::GithubActions) else {
        return Ok(ignored(format!("no pipeline builds {repo} branch `{branch}` with GitHub Actions")));
    };
    let path = s(wr, &["path"]).unwrap_or_default();
    let name = s(wr, &["name"]).unwrap_or_default();
    if let Some(want) = &app.build.pipeline {
        let file = path.rsplit('/').next().unwrap_or_default();
        if want != file && want != path && want != name {
            return Ok(ignored(format!("workflow `{name}` ({path}) is not the build pipeline `{want}` of app `{}`", app.name)));
        }
    }
    // A dispatched run is named after its deploychain run (`run-name: deploychain ${{ inputs.deploychain_run }}`):
    // that names the run even when the branch moved on between the dispatch and the checkout.
    let title = s(wr, &["display_title"]).unwrap_or_default();
    let mut named = None;
    for t in title.split(|c: char| c.is_whitespace() || c == ',' || c == ':').filter(|t| t.starts_with(&format!("{}-", app.name))) {
        if let Some(r) = state.store.run(t).await?.filter(|r| r.app == app.name) {
            named = Some(r);
            break;
        }
    }
    let (rid, sha) = match named {
        Some(r) => (r.id, r.commit),
        None => (run_id(&app.name, &sha), sha),
    };
    let id = event_id(&rid, "build-completed");
    let Some(trace) = build_run_trace(state, &rid, &id).await? else {
        return Ok(ignored(format!("no run for commit {sha} of app `{}`", app.name)));
    };
    let conclusion = s(wr, &["conclusion"]).unwrap_or("unknown");
    let outcome = match conclusion {
        "success" => BuildOutcome::Succeeded,
        "cancelled" => BuildOutcome::Canceled,
        _ => BuildOutcome::Failed,
    };
    let ev = DeployEvent {
        id,
        source: format!("/github/{repo}"),
        time: Utc::now(),
        run_id: rid,
        trace,
        data: EventData::BuildCompleted(BuildCompleted {
            app: app.name.clone(),
            provider: BuildProvider::GithubActions,
            branch: branch.to_string(),
            commit: sha,
            build_id: wr["id"].as_u64().map(|n| n.to_string()).or_else(|| s(wr, &["id"]).map(str::to_string)).unwrap_or_default(),
            outcome,
            pipeline: Some(if path.is_empty() { name.to_string() } else { path.to_string() }),
            url: s(wr, &["html_url"]).map(str::to_string),
            detail: Some(conclusion.to_string()),
        }),
    };
    publish_event(state, &ev).await?;
    Ok(accepted(&ev))
}

async fn package(state: &AppState, p: &Value, event: &str) -> Result<HttpResponse> {
    let action = s(p, &["action"]).unwrap_or_default();
    if action != "published" {
        return Ok(ignored(format!("{event} `{action}`: only published images are deployed")));
    }
    let pkg = if event == "registry_package" { &p["registry_package"] } else { &p["package"] };
    let pv = &pkg["package_version"];
    let eco = s(pkg, &["ecosystem"]).or(s(pkg, &["package_type"])).unwrap_or_default().to_ascii_lowercase();
    if !matches!(eco.as_str(), "docker" | "container") && s(pkg, &["registry", "type"]) != Some("CONTAINER") {
        return Ok(ignored(format!("package ecosystem `{eco}` is not a container image")));
    }
    let package_url = s(pv, &["package_url"]).ok_or_else(|| Error::Malformed("package without `package_version.package_url`".into()))?;
    // `ghcr.io/owner/name:tag` or `…@sha256:…`: the repository is what precedes the tag or digest.
    let repository = package_url.split(['@', ':']).next().unwrap_or_default().trim_end_matches('/').to_ascii_lowercase();
    let Some(app) = state.policy.registry_app(&repository) else {
        return Ok(ignored(format!("image repository {repository} is not any app's image source")));
    };
    let meta = &pv["container_metadata"];
    let digest = [s(pv, &["name"]), s(pv, &["version"]), s(meta, &["manifest", "digest"]), s(meta, &["tag", "digest"])]
        .into_iter()
        .flatten()
        .find(|d| d.strip_prefix("sha256:").is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit())))
        .ok_or_else(|| Error::Malformed("the package version has no sha256 manifest digest".into()))?
        .to_ascii_lowercase();
    let revision = s(meta, &["labels", "all_labels", "org.opencontainers.image.revision"])
        .or(s(meta, &["labels", "revision"]))
        .filter(|r| !r.is_empty());
    let Some(commit) = revision.map(str::to_ascii_lowercase) else {
        return Ok(ignored("the image has no org.opencontainers.image.revision label, so it cannot be tied to a commit"));
    };
    let rid = run_id(&app.name, &commit);
    let id = event_id(&rid, "image-ready");
    let Some(trace) = run_trace(state, &rid, &id).await? else {
        return Ok(ignored(format!("no run for commit {commit} of app `{}`", app.name)));
    };
    let version = s(meta, &["tag", "name"])
        .filter(|t| !t.is_empty())
        .or(s(meta, &["labels", "all_labels", "org.opencontainers.image.version"]))
        .map(str::to_string);
    let ev = DeployEvent {
        id,
        source: format!("/github/{}", s(p, &["repository", "full_name"]).unwrap_or("packages")),
        time: Utc::now(),
        run_id: rid,
        trace,
        data: EventData::ImageReady(ImageReady {
            app: app.name.clone(),
            commit,
            image: ImageRef { kind: ImageKind::Container, id: format!("{repository}@{digest}"), version, digest: Some(digest) },
            branch: s(pv, &["target_commitish"]).map(str::to_string),
        }),
    };
    publish_event(state, &ev).await?;
    Ok(accepted(&ev))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn githubs_documented_test_vector_verifies() {
        // GitHub Docs, "Validating webhook deliveries": https://docs.github.com/webhooks/using-webhooks/validating-webhook-deliveries
        let sig = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        assert_eq!(verify_signature(b"It's a Secret to Everybody", b"Hello, World!", Some(sig)), Ok(()));
        assert!(matches!(verify_signature(b"It's a Secret to Everybody", b"Hello, World?", Some(sig)), Err(Error::Unauthorized(_))));
        assert!(matches!(verify_signature(b"wrong", b"Hello, World!", Some(sig)), Err(Error::Unauthorized(_))));
        assert!(matches!(verify_signature(b"It's a Secret to Everybody", b"Hello, World!", None), Err(Error::Unauthorized(_))));
        assert!(matches!(
            verify_signature(b"It's a Secret to Everybody", b"Hello, World!", Some("sha1=757107")),
            Err(Error::Unauthorized(_))
        ));
    }
}
