//! `runs` — HTTP GET `/api/runs`, `/api/runs/{id}`, `/api/runs?commit={sha}`: what each run did,
//! when, and what it waits for now. Read-only; `authLevel: function` (operators' key).

use super::*;
use crate::adapters::RunQuery;
use crate::invoke::{HttpRequest, HttpResponse};
use serde_json::json;

pub const NAME: &str = "runs";

pub async fn handle(state: AppState, req: HttpRequest) -> Result<HttpResponse> {
    if req.method != "GET" {
        return Err(Error::Malformed(format!("{} is not supported; use GET", req.method)));
    }
    if let Some(id) = req.params.get("id").filter(|s| !s.is_empty()) {
        let run = state.store.run(id).await?.ok_or_else(|| Error::NotFound(format!("no run `{id}`")))?;
        return Ok(HttpResponse::json(200, &detail(&run)));
    }
    let limit = match req.query.get("limit") {
        None => 50,
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=500).contains(n))
            .ok_or_else(|| Error::Malformed(format!("limit `{l}` is not 1 to 500")))?,
    };
    let commit = req.query.get("commit").cloned();
    if let Some(c) = &commit
        && (c.len() < 4 || c.len() > 64 || !c.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return Err(Error::Malformed(format!("commit `{c}` is not 4 to 64 hex digits")));
    }
    let runs = state.store.runs(&RunQuery { app: req.query.get("app").cloned(), commit, limit }).await?;
    Ok(HttpResponse::json(200, &json!({ "runs": runs.iter().map(summary).collect::<Vec<_>>() })))
}

fn summary(r: &Run) -> serde_json::Value {
    json!({
        "id": r.id, "app": r.app, "branch": r.branch, "commit": r.commit, "status": r.status.as_str(),
        "waitingFor": r.waiting_for, "stage": r.stage, "image": r.image.as_ref().map(|i| &i.id),
        "createdAt": r.created_at, "updatedAt": r.updated_at,
    })
}

pub fn detail(r: &Run) -> serde_json::Value {
    let mut v = summary(r);
    v["repository"] = json!(r.repository);
    v["sequence"] = json!(r.sequence);
    v["traceparent"] = json!(r.traceparent);
    v["steps"] =
        json!(r.steps.iter().map(|s| json!({ "step": s.key, "what": s.name, "at": s.at, "detail": s.detail })).collect::<Vec<_>>());
    v
}
