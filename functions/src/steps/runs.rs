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
        let mut v = detail(&run);
        v["waiting"] = waiting(&state, &run).await?.map(|w| w.to_json()).unwrap_or(serde_json::Value::Null);
        return Ok(HttpResponse::json(200, &v));
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
    let mut out = Vec::with_capacity(runs.len());
    for r in &runs {
        let mut v = summary(r);
        v["waiting"] = waiting(&state, r).await?.map(|w| w.to_json()).unwrap_or(serde_json::Value::Null);
        out.push(v);
    }
    Ok(HttpResponse::json(200, &json!({ "runs": out })))
}

/// What an active run waits for, on whom, and since when.
#[derive(Debug, Clone, PartialEq)]
pub struct Waiting {
    /// `build`, `image`, `deployment` or `approval`.
    pub kind: &'static str,
    /// In words, as the run records it.
    pub what: String,
    /// Who or what has to act: the approvers who have not decided, the CI system, the scale set.
    pub on: Vec<String>,
    /// When the wait began (the last thing that happened, the watchdog's own notes aside).
    pub since: DateTime<Utc>,
    /// When an approval times out.
    pub expires_at: Option<DateTime<Utc>>,
    /// The watchdog flagged this wait.
    pub stuck: bool,
}

/// `3d 4h`, `2h 5m`, `12m`, `40s`.
pub fn human(d: std::time::Duration) -> String {
    let s = d.as_secs();
    match s {
        s if s >= 86_400 => format!("{}d {}h", s / 86_400, (s % 86_400) / 3600),
        s if s >= 3600 => format!("{}h {}m", s / 3600, (s % 3600) / 60),
        s if s >= 60 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

impl Waiting {
    pub fn text(&self, now: DateTime<Utc>) -> String {
        let so_far = human((now - self.since).to_std().unwrap_or_default());
        let mut t = match self.kind {
            "approval" => format!("waiting for {} — from {}", self.what, self.on.join(", ")),
            _ => format!("waiting for {} — on {}", self.what, self.on.join(", ")),
        };
        if self.kind == "rollout" {
            // A rollout says how long it has been at it; the wait is since its latest look.
            t.push_str(&format!(", last looked at {so_far} ago"));
        } else {
            t.push_str(&format!(", {so_far} so far"));
        }
        if let Some(e) = self.expires_at {
            t.push_str(&format!(", expires in {}", human((e - now).to_std().unwrap_or_default())));
        }
        if self.stuck {
            t.push_str(" (STUCK: flagged by the watchdog)");
        }
        t
    }

    pub fn to_json(&self) -> serde_json::Value {
        let now = Utc::now();
        json!({
            "kind": self.kind, "for": self.what, "on": self.on, "since": self.since,
            "sinceFor": human((now - self.since).to_std().unwrap_or_default()),
            "expiresAt": self.expires_at,
            "expiresIn": self.expires_at.map(|e| human((e - now).to_std().unwrap_or_default())),
            "stuck": self.stuck, "text": self.text(now),
        })
    }
}

/// Explain an active run's wait (`None` for a finished run).
pub async fn waiting(state: &AppState, r: &Run) -> Result<Option<Waiting>> {
    if r.status.is_final() {
        return Ok(None);
    }
    let what = r.waiting_for.clone().unwrap_or_else(|| "its next step".into());
    let since = r.steps.iter().rev().find(|s| !s.key.starts_with("stuck.")).map(|s| s.at).unwrap_or(r.created_at);
    let stuck = r.steps.last().is_some_and(|s| s.key == format!("stuck.{}", short_digest(&[&since.to_rfc3339()])));
    let app = state.policy.app(&r.app);
    if what.starts_with("approval of ") {
        // The open approval of this run, if its stage still has one.
        for stage in app.map(|a| a.stages.as_slice()).unwrap_or_default() {
            if let Some(a) = state.store.approval(&format!("{}.{}", r.id, stage.name)).await?
                && a.why_closed().is_none()
            {
                let approved = a.votes.iter().filter(|v| v.decision == Decision::Approved).count();
                let missing = (a.quorum as usize).saturating_sub(approved);
                let on: Vec<String> =
                    a.approvers.iter().filter(|p| !a.votes.iter().any(|v| v.approver.eq_ignore_ascii_case(p))).cloned().collect();
                let what = format!("{missing} more approval{} of {}", if missing == 1 { "" } else { "s" }, a.stage);
                return Ok(Some(Waiting { kind: "approval", what, on, since, expires_at: Some(a.expires_at), stuck }));
            }
        }
    }
    if what.starts_with("rollout to ") || what.starts_with("rolling ") {
        // A rollout between looks: each look commits, so the run is stuck only when the looks
        // stop coming (its scheduled message lost) — counted from the latest one.
        let target = r
            .stage
            .as_deref()
            .and_then(|s| app.and_then(|a| a.stage(s)))
            .map(|(_, s)| s.target.rsplit('/').next().unwrap_or_default().to_string());
        // Flagged: the flag is the latest commit (the watchdog flags it again a threshold later).
        let flagged = r.steps.last().is_some_and(|s| s.key.starts_with("stuck."));
        return Ok(Some(Waiting {
            kind: "rollout",
            what,
            on: target.into_iter().collect(),
            since: r.updated_at.max(since),
            expires_at: None,
            stuck: flagged,
        }));
    }
    let (kind, on) = if what.starts_with("build of") {
        let provider = app.map(|a| a.build.provider.display_name());
        ("build", provider.map(str::to_string).into_iter().collect())
    } else if what.starts_with("image") {
        ("image", app.map(|a| a.image.source.as_str().to_string()).into_iter().collect())
    } else {
        // `deployment to production`, `promotion to production`: the scale set of that stage.
        let stage = what
            .rsplit(' ')
            .next()
            .and_then(|s| app.and_then(|a| a.stage(s)))
            .or_else(|| r.stage.as_deref().and_then(|s| app.and_then(|a| a.stage(s))));
        let target = stage.map(|(_, s)| s.target.rsplit('/').next().unwrap_or_default().to_string());
        ("deployment", target.into_iter().collect())
    };
    Ok(Some(Waiting { kind, what, on, since, expires_at: None, stuck }))
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
