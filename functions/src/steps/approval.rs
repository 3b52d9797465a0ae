//! `approval` — HTTP `/api/approvals/{id}`: the page behind an approver's signed link.
//!
//! - GET shows what is being approved (app, stage, commit, the immutable image, votes so far) and a
//!   form; it never decides, because mail and chat link scanners open links.
//! - POST (from that form, or `{"decision":"approve"|"reject","comment":…}` as JSON) records the
//!   link's approver's vote. When the votes make a decision (quorum of approvals, or any
//!   rejection), `approval.decided` is committed and published exactly once.
//! - A link that is incomplete or forged → 401; expired → 410; unknown approval → 404; a run that
//!   already finished → 409. Nothing changes on any of them.

use super::*;
use crate::adapters::{ApprovalRecord, Vote};
use crate::invoke::{HttpRequest, HttpResponse};
use crate::links::LinkError;
use serde_json::json;

pub const NAME: &str = "approval";

pub async fn handle(state: AppState, req: HttpRequest) -> Result<HttpResponse> {
    let id = req.params.get("id").cloned().unwrap_or_default();
    if id.is_empty() || id.len() > 200 {
        return Err(Error::NotFound("no approval id in the path".into()));
    }
    let approver = state
        .links
        .verify(
            &id,
            req.query.get("approver").map(String::as_str),
            req.query.get("exp").map(String::as_str),
            req.query.get("sig").map(String::as_str),
            Utc::now(),
        )
        .map_err(|e| match e {
            LinkError::Expired(_) => Error::Gone(e.to_string()),
            _ => Error::Unauthorized(e.to_string()),
        })?;
    let record = state.store.approval(&id).await?.ok_or_else(|| Error::NotFound(format!("no approval `{id}`")))?;
    if !record.approvers.contains(&approver) {
        return Err(Error::Unauthorized(format!("{approver} is not an approver of `{id}`")));
    }
    let wants_json = req.header("accept").is_some_and(|a| a.contains("application/json"));
    match req.method.as_str() {
        "GET" | "HEAD" => Ok(page(&record, &approver, None, wants_json, &req)),
        "POST" => decide(&state, &req, record, &approver, wants_json).await,
        m => Err(Error::Malformed(format!("{m} is not supported; use GET to view and POST to decide"))),
    }
}

fn parse_decision(req: &HttpRequest) -> Result<(Decision, Option<String>)> {
    let ct = req.header("content-type").unwrap_or_default().to_ascii_lowercase();
    let (decision, comment) = if ct.starts_with("application/json") {
        let v: serde_json::Value = serde_json::from_slice(&req.body).map_err(|e| Error::Malformed(format!("the body is not JSON: {e}")))?;
        (v["decision"].as_str().unwrap_or_default().to_string(), v["comment"].as_str().map(str::to_string))
    } else {
        let mut d = String::new();
        let mut c = None;
        for (k, v) in url::form_urlencoded::parse(&req.body) {
            match &*k {
                "decision" => d = v.into_owned(),
                "comment" => c = Some(v.into_owned()).filter(|s: &String| !s.trim().is_empty()),
                _ => {}
            }
        }
        (d, c)
    };
    let decision = match decision.as_str() {
        "approve" | "approved" => Decision::Approved,
        "reject" | "rejected" => Decision::Rejected,
        other => return Err(Error::Malformed(format!("decision `{other}` is not `approve` or `reject`"))),
    };
    if comment.as_ref().is_some_and(|c| c.len() > 2000) {
        return Err(Error::TooLarge("the comment is over 2000 characters".into()));
    }
    Ok((decision, comment))
}

async fn decide(state: &AppState, req: &HttpRequest, record: ApprovalRecord, approver: &str, wants_json: bool) -> Result<HttpResponse> {
    let (decision, comment) = parse_decision(req)?;
    let now = Utc::now();
    if record.expires_at <= now {
        return Err(Error::Gone(format!("approval `{}` expired at {}", record.id, record.expires_at.to_rfc3339())));
    }
    let run = state.store.run(&record.run_id).await?.ok_or_else(|| Error::NotFound(format!("no run `{}`", record.run_id)))?;
    if run.status.is_final() {
        return Err(Error::Conflict(format!("run `{}` already {}", run.id, run.status.as_str())));
    }
    let decided_before = record.outcome();
    let record =
        state.store.vote(&record.id, &Vote { approver: approver.to_string(), decision, at: now, comment: comment.clone() }).await?;
    let rr = RunRef::from(&run);
    let stage = record.stage.clone();
    // One run entry per vote (idempotent per approver).
    let vote_key = format!("vote.{stage}.{}", short_digest(&[approver]));
    let word = if decision == Decision::Approved { "approved" } else { "rejected" };
    if decided_before.is_none() {
        let outcome = record.outcome();
        let waiting = if outcome.is_none() { Some(waiting_for_approval(&record)) } else { Some(format!("promotion to {stage}")) };
        let mut outbox = Vec::new();
        let mut entries = vec![entry(&vote_key, format!("{approver} {word} {stage}"), comment.clone())];
        if let Some(o) = outcome {
            let by: Vec<String> = record.votes.iter().filter(|v| v.decision == o).map(|v| v.approver.clone()).collect();
            let comment = record.votes.iter().rev().find_map(|v| v.comment.clone());
            outbox.push(
                emit(
                    state,
                    &rr,
                    &format!("approval-decided.{stage}"),
                    NAME,
                    EventData::ApprovalDecided(ApprovalDecided {
                        app: record.app.clone(),
                        stage: stage.clone(),
                        approval_id: record.id.clone(),
                        image: record.image.clone(),
                        commit: record.commit.clone(),
                        decision: o,
                        decided_by: by.clone(),
                        comment,
                    }),
                )
                .1,
            );
            entries.push(entry(
                &vote_key,
                format!("approval of {stage} decided: {}", if o == Decision::Approved { "approved" } else { "rejected" }),
                Some(format!("by {}", by.join(", "))),
            ));
        }
        let commit = StepCommit {
            run_id: run.id.clone(),
            key: vote_key.clone(),
            new_run: None,
            entries,
            status: RunStatus::Waiting,
            waiting_for: waiting,
            image: None,
            stage: None,
            outbox,
        };
        run_step(state, &run.id, &vote_key, || async { Ok(Some(commit)) }).await?;
    } else {
        // Decided already: make sure the decision's messages went out (a crash may have cut it short).
        run_step(state, &run.id, &vote_key, || async { Ok(None) }).await?;
    }
    Ok(page(&record, approver, Some(decision), wants_json, req))
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;").replace('\'', "&#39;")
}

fn page(a: &ApprovalRecord, approver: &str, just: Option<Decision>, wants_json: bool, req: &HttpRequest) -> HttpResponse {
    let outcome = a.outcome();
    let state_word = match outcome {
        Some(Decision::Approved) => "approved",
        Some(Decision::Rejected) => "rejected",
        None => "pending",
    };
    let mine = a.votes.iter().find(|v| v.approver == approver);
    if wants_json {
        return HttpResponse::json(
            200,
            &json!({
                "approval": a.id, "run": a.run_id, "app": a.app, "stage": a.stage, "commit": a.commit,
                "image": a.image, "approvers": a.approvers, "quorum": a.quorum, "expiresAt": a.expires_at,
                "votes": a.votes, "state": state_word, "you": approver, "yourVote": mine.map(|v| v.decision),
            }),
        );
    }
    let votes: String = a
        .votes
        .iter()
        .map(|v| {
            format!(
                "<li>{} {} at {}</li>",
                esc(&v.approver),
                if v.decision == Decision::Approved { "approved" } else { "rejected" },
                v.at.to_rfc3339()
            )
        })
        .collect();
    let action = format!(
        "/api/approvals/{}?{}",
        esc(&a.id),
        esc(&req
            .query
            .iter()
            .filter(|(k, _)| matches!(k.as_str(), "approver" | "exp" | "sig"))
            .map(|(k, v)| format!("{k}={}", url::form_urlencoded::byte_serialize(v.as_bytes()).collect::<String>()))
            .collect::<Vec<_>>()
            .join("&"))
    );
    let form = if mine.is_none() && outcome.is_none() {
        format!(
            "<form method=\"post\" action=\"{action}\"><label>Comment <input name=\"comment\" maxlength=\"2000\"></label> \
             <button name=\"decision\" value=\"approve\">Approve</button> <button name=\"decision\" value=\"reject\">Reject</button></form>"
        )
    } else {
        String::new()
    };
    let note = match (just, mine) {
        (Some(_), Some(v)) => format!(
            "<p><strong>Your decision is recorded: {}.</strong></p>",
            if v.decision == Decision::Approved { "approved" } else { "rejected" }
        ),
        (None, Some(v)) => format!("<p>You {} this already.</p>", if v.decision == Decision::Approved { "approved" } else { "rejected" }),
        _ => String::new(),
    };
    HttpResponse::html(
        200,
        format!(
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>Approve {app} to {stage}</title></head><body>\
             <h1>Promote {app} to {stage}?</h1>{note}\
             <dl><dt>Commit</dt><dd><code>{commit}</code></dd><dt>Image</dt><dd><code>{image}</code></dd>\
             <dt>Run</dt><dd><code>{run}</code></dd><dt>State</dt><dd>{state_word} ({n} of {quorum} approvals needed from {approvers})</dd>\
             <dt>Expires</dt><dd>{exp}</dd><dt>You</dt><dd>{me}</dd></dl><ul>{votes}</ul>{form}</body></html>",
            app = esc(&a.app),
            stage = esc(&a.stage),
            commit = esc(&a.commit),
            image = esc(&a.image.id),
            run = esc(&a.run_id),
            n = a.votes.iter().filter(|v| v.decision == Decision::Approved).count(),
            quorum = a.quorum,
            approvers = esc(&a.approvers.join(", ")),
            exp = a.expires_at.to_rfc3339(),
            me = esc(approver),
        ),
    )
}
