//! `azure_devops_webhook` — HTTP POST `/api/hooks/azure-devops`: Azure DevOps service hooks.
//!
//! - Auth: the service hook's basic authentication: user `AZURE_DEVOPS_WEBHOOK_USER` (default
//!   `deploychain`), password `AZURE_DEVOPS_WEBHOOK_SECRET`, compared in constant time. Missing or
//!   wrong → 401 with `WWW-Authenticate`, nothing published.
//! - `git.push` → one `push` per updated branch a pipeline deploys (deletions and tags ignored).
//! - `build.complete` → `build.completed` for the app whose Azure Pipelines definition it is.
//! - Anything else → 202 ignored with the reason.

use super::github_webhook::{accepted, build_run_trace, ignored, publish_event, require_json, strip_bom};
use super::*;
use crate::invoke::{HttpRequest, HttpResponse};
use base64::Engine;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

pub const NAME: &str = "azure_devops_webhook";

pub async fn handle(state: AppState, req: HttpRequest) -> Result<HttpResponse> {
    if req.method != "POST" {
        return Err(Error::Malformed(format!("{} is not supported; service hooks deliver with POST", req.method)));
    }
    if req.body.len() > state.config.max_body_bytes {
        return Err(Error::TooLarge(format!("the body is {} bytes; the limit is {}", req.body.len(), state.config.max_body_bytes)));
    }
    if let Err(e) = check_basic_auth(&state, req.header("authorization")) {
        return Ok(crate::error_response(&e).with_header("WWW-Authenticate", "Basic realm=\"deploychain\""));
    }
    require_json(&req, "an Azure DevOps service hook")?;
    let p: Value = serde_json::from_slice(strip_bom(&req.body)).map_err(|e| Error::Malformed(format!("the body is not JSON: {e}")))?;
    let event_type = p["eventType"].as_str().ok_or_else(|| Error::Malformed("missing `eventType`".into()))?;
    match event_type {
        "git.push" => git_push(&state, &p).await,
        "build.complete" => build_complete(&state, &p).await,
        other => Ok(ignored(format!("`{other}` events do not drive deployments"))),
    }
}

fn check_basic_auth(state: &AppState, header: Option<&str>) -> Result<()> {
    let secret = state
        .config
        .azure_devops_secret
        .as_ref()
        .ok_or_else(|| Error::Unauthorized("Azure DevOps service hooks are not configured".into()))?;
    let header = header.ok_or_else(|| Error::Unauthorized("missing basic authentication".into()))?;
    let b64 = header
        .strip_prefix("Basic ")
        .or_else(|| header.strip_prefix("basic "))
        .ok_or_else(|| Error::Unauthorized("authentication is not Basic".into()))?;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|_| Error::Unauthorized("malformed basic authentication".into()))?;
    let (user, pass) =
        raw.split_at(raw.iter().position(|b| *b == b':').ok_or_else(|| Error::Unauthorized("malformed basic authentication".into()))?);
    let pass = &pass[1..];
    let user_ok = user.ct_eq(state.config.azure_devops_user.as_bytes());
    let pass_ok = pass.ct_eq(secret.expose().as_bytes());
    if bool::from(user_ok & pass_ok) { Ok(()) } else { Err(Error::Unauthorized("wrong service hook credentials".into())) }
}

fn s<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(*k)).and_then(Value::as_str)
}

async fn git_push(state: &AppState, p: &Value) -> Result<HttpResponse> {
    let r = &p["resource"];
    let remote =
        s(r, &["repository", "remoteUrl"]).ok_or_else(|| Error::Malformed("git.push without `resource.repository.remoteUrl`".into()))?;
    let updates = r["refUpdates"].as_array().ok_or_else(|| Error::Malformed("git.push without `resource.refUpdates`".into()))?;
    let mut accepted_runs = Vec::new();
    let mut reasons = Vec::new();
    for u in updates {
        let name = s(u, &["name"]).unwrap_or_default();
        let new = s(u, &["newObjectId"]).unwrap_or_default().to_ascii_lowercase();
        let Some(branch) = name.strip_prefix("refs/heads/") else {
            reasons.push(format!("`{name}` is not a branch"));
            continue;
        };
        if new.bytes().all(|b| b == b'0') {
            reasons.push(format!("branch `{branch}` was deleted"));
            continue;
        }
        let Some(app) = state.policy.azure_devops_app(remote, branch) else {
            reasons.push(format!("branch `{branch}` of {remote} is not deployed by any pipeline: no run"));
            continue;
        };
        if new.len() < 7 || !new.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::Malformed(format!("`newObjectId` `{new}` is not a commit id")));
        }
        let rid = run_id(&app.name, &new);
        let commit_msg =
            r["commits"].as_array().and_then(|c| c.iter().find(|c| s(c, &["commitId"]).map(str::to_ascii_lowercase) == Some(new.clone())));
        let ev = DeployEvent {
            id: event_id(&rid, "push"),
            source: format!("/azure-devops/{}", s(r, &["repository", "project", "name"]).unwrap_or("project")),
            time: Utc::now(),
            // The webhook's own span is the release's root (a derived root without recorded spans).
            trace: TraceContext {
                traceparent: Some(crate::telemetry::current_traceparent().unwrap_or_else(|| root_traceparent(&rid))),
                tracestate: None,
            },
            run_id: rid,
            data: EventData::Push(Push {
                app: app.name.clone(),
                provider: Provider::AzureDevops,
                repository: remote.to_string(),
                branch: branch.to_string(),
                commit: new.clone(),
                before: s(u, &["oldObjectId"]).map(str::to_string),
                pusher: s(r, &["pushedBy", "displayName"]).map(str::to_string),
                message: commit_msg.and_then(|c| s(c, &["comment"])).map(|m| m.chars().take(500).collect()),
                url: commit_msg.and_then(|c| s(c, &["url"])).map(str::to_string),
                delivery: s(p, &["id"]).map(str::to_string),
                pusher_email: s(r, &["pushedBy", "uniqueName"]).filter(|u| u.contains('@')).map(str::to_string),
                commits: r["commits"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|c| {
                        Some(CommitInfo {
                            id: s(c, &["commitId"])
                                .filter(|id| id.len() >= 7 && id.bytes().all(|b| b.is_ascii_hexdigit()))?
                                .to_ascii_lowercase(),
                            message: s(c, &["comment"]).map(|m| m.chars().take(500).collect()),
                            author: s(c, &["author", "name"]).map(str::to_string),
                            author_email: s(c, &["author", "email"]).map(str::to_string),
                            author_login: None,
                            timestamp: s(c, &["author", "date"])
                                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                                .map(|t| t.with_timezone(&chrono::Utc)),
                        })
                    })
                    .take(MAX_PUSH_COMMITS)
                    .collect(),
            }),
        };
        publish_event(state, &ev).await?;
        accepted_runs.push(json!({ "run": ev.run_id, "id": ev.id }));
    }
    if accepted_runs.is_empty() {
        return Ok(ignored(reasons.join("; ")));
    }
    Ok(HttpResponse::json(202, &json!({ "accepted": EventType::Push.as_str(), "runs": accepted_runs, "ignored": reasons })))
}

async fn build_complete(state: &AppState, p: &Value) -> Result<HttpResponse> {
    let r = &p["resource"];
    // Current payloads carry sourceBranch/sourceVersion; XAML-era ones `LG:refs/heads/main:<sha>`.
    let (branch_ref, sha) = match (s(r, &["sourceBranch"]), s(r, &["sourceVersion"])) {
        (Some(b), Some(v)) => (b.to_string(), v.to_string()),
        _ => {
            let gv =
                s(r, &["sourceGetVersion"]).ok_or_else(|| Error::Malformed("build.complete without sourceBranch/sourceVersion".into()))?;
            let mut parts = gv.splitn(3, ':');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("LG"), Some(b), Some(v)) => (b.to_string(), v.to_string()),
                _ => return Err(Error::Malformed(format!("cannot read branch and commit from sourceGetVersion `{gv}`"))),
            }
        }
    };
    let branch = branch_ref.strip_prefix("refs/heads/").unwrap_or(&branch_ref).to_string();
    let sha = sha.to_ascii_lowercase();
    let def_name = s(r, &["definition", "name"]).unwrap_or_default();
    let def_id = r["definition"]["id"].as_i64().map(|n| n.to_string()).unwrap_or_default();
    let Some(app) = state.policy.apps.iter().find(|a| {
        a.build.provider == BuildProvider::AzurePipelines
            && a.build.pipeline.as_deref().is_some_and(|want| want == def_name || want == def_id)
            && a.matches_branch(&branch)
    }) else {
        return Ok(ignored(format!("no pipeline is built by definition `{def_name}` on branch `{branch}`")));
    };
    let rid = run_id(&app.name, &sha);
    let id = event_id(&rid, "build-completed");
    let Some(trace) = build_run_trace(state, &rid, &id).await? else {
        return Ok(ignored(format!("no run for commit {sha} of app `{}`", app.name)));
    };
    let result = s(r, &["result"]).or(s(r, &["status"])).unwrap_or("unknown");
    let outcome = match result {
        "succeeded" => BuildOutcome::Succeeded,
        "canceled" | "cancelled" | "stopped" => BuildOutcome::Canceled,
        _ => BuildOutcome::Failed,
    };
    let ev = DeployEvent {
        id,
        source: format!("/azure-devops/{}", def_name),
        time: Utc::now(),
        run_id: rid,
        trace,
        data: EventData::BuildCompleted(BuildCompleted {
            app: app.name.clone(),
            provider: BuildProvider::AzurePipelines,
            branch,
            commit: sha,
            build_id: r["id"].as_i64().map(|n| n.to_string()).unwrap_or_else(|| s(r, &["buildNumber"]).unwrap_or_default().to_string()),
            outcome,
            pipeline: Some(def_name.to_string()),
            url: s(r, &["_links", "web", "href"]).or(s(r, &["url"])).map(str::to_string),
            detail: Some(result.to_string()),
        }),
    };
    publish_event(state, &ev).await?;
    Ok(accepted(&ev))
}
