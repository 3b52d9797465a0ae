//! `jenkins_webhook` — HTTP POST `/api/hooks/jenkins`: the Jenkins Notification plugin's build
//! phases.
//!
//! - Auth: the function key (`authLevel: function`: the Functions host refuses a request without
//!   it before the handler sees it). The plugin's endpoint URL is
//!   `https://<app>.azurewebsites.net/api/hooks/jenkins?code=<function key>` (JSON, HTTP).
//! - A finished build (`build.phase` `COMPLETED` or `FINALIZED`) of a job a pipeline is built by →
//!   `build.completed` for the run its `DEPLOYCHAIN_RUN` parameter names (`SUCCESS` → succeeded,
//!   `ABORTED` → canceled, anything else → failed). Both phases map to the same event id, so the
//!   broker keeps one.
//! - Other phases, jobs no pipeline names, or builds without the parameter → 202 ignored with the
//!   reason. A body that is not the plugin's JSON → 400.

use super::github_webhook::{accepted, ignored, publish_event, require_json, run_trace, strip_bom};
use super::*;
use crate::invoke::{HttpRequest, HttpResponse};
use serde_json::Value;

pub const NAME: &str = "jenkins_webhook";

fn s<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(*k)).and_then(Value::as_str)
}

pub async fn handle(state: AppState, req: HttpRequest) -> Result<HttpResponse> {
    if req.method != "POST" {
        return Err(Error::Malformed(format!("{} is not supported; the Notification plugin posts", req.method)));
    }
    if req.body.len() > state.config.max_body_bytes {
        return Err(Error::TooLarge(format!("the body is {} bytes; the limit is {}", req.body.len(), state.config.max_body_bytes)));
    }
    require_json(&req, "the Notification plugin")?;
    let p: Value = serde_json::from_slice(strip_bom(&req.body)).map_err(|e| Error::Malformed(format!("the body is not JSON: {e}")))?;
    let b = &p["build"];
    let phase = s(b, &["phase"]).ok_or_else(|| Error::Malformed("no `build.phase`: not a Notification plugin message".into()))?;
    if !matches!(phase, "COMPLETED" | "FINALIZED") {
        return Ok(ignored(format!("phase `{phase}`: only finished builds report")));
    }
    let job_name = s(&p, &["name"]).unwrap_or_default();
    let job_url = s(&p, &["url"]).unwrap_or_default().trim_matches('/');
    let Some(run_id) = s(b, &["parameters", "DEPLOYCHAIN_RUN"]) else {
        return Ok(ignored(format!("build of `{job_name}` has no DEPLOYCHAIN_RUN parameter: deploychain did not start it")));
    };
    let Some(run) = run_when_committed(&state, run_id).await? else {
        return Ok(ignored(format!("no run `{run_id}`")));
    };
    let Some(app) = state.policy.app(&run.app).filter(|a| a.build.provider == BuildProvider::Jenkins) else {
        return Ok(ignored(format!("run `{run_id}` is not built by Jenkins")));
    };
    let job = app.build.pipeline.as_deref().unwrap_or_default();
    let path = crate::adapters::ci::jenkins::Jenkins::job_path(job);
    if job != job_name && path != job_url && !job_url.ends_with(&format!("/{path}")) {
        return Ok(ignored(format!("job `{job_name}` ({job_url}) is not the build job `{job}` of app `{}`", app.name)));
    }
    if let Some(c) = s(b, &["parameters", "COMMIT"]).or(s(b, &["scm", "commit"]))
        && !c.eq_ignore_ascii_case(&run.commit)
    {
        return Err(Error::Refused(format!("the build is of commit {c}, but run `{run_id}` releases {}", run.commit)));
    }
    let status = s(b, &["status"]).unwrap_or("UNKNOWN");
    let outcome = match status {
        "SUCCESS" => BuildOutcome::Succeeded,
        "ABORTED" => BuildOutcome::Canceled,
        _ => BuildOutcome::Failed,
    };
    let id = event_id(&run.id, "build-completed");
    let trace = run_trace(&state, &run.id, &id).await?.unwrap_or_default();
    let number = b["number"].as_u64().map(|n| n.to_string()).unwrap_or_default();
    let ev = DeployEvent {
        id,
        source: format!("/jenkins/{job}"),
        time: Utc::now(),
        run_id: run.id.clone(),
        trace,
        data: EventData::BuildCompleted(BuildCompleted {
            app: app.name.clone(),
            provider: BuildProvider::Jenkins,
            branch: run.branch.clone(),
            commit: run.commit.clone(),
            build_id: number,
            outcome,
            pipeline: Some(job.to_string()),
            url: s(b, &["full_url"]).map(str::to_string),
            detail: Some(status.to_string()),
        }),
    };
    publish_event(&state, &ev).await?;
    Ok(accepted(&ev))
}
