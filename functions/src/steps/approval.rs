//! `approval` — HTTP `/api/approvals/{id}?t={token}`: the page behind an approver's signed link.
//!
//! - The token ([`crate::links`]) is checked first — key id, signature (constant time), expiry —
//!   then what it is bound to: this approval, its run and stage, the artifact being approved, and
//!   an approver who may decide it (not the pusher or a commit author of the release). With App
//!   Service Authentication on, the signed-in principal must be that approver.
//! - GET shows the evidence (app, stage, the commits and their authors, the artifact, what the
//!   previous stage passed, who decided, time left) and a form; it never decides, because mail and
//!   chat link scanners open links.
//! - POST (the form, or JSON `{"decision","comment","csrf"}`) needs the page's CSRF value, bound to
//!   the token, and records the vote with a conditional write. The first vote of an approver
//!   stands: the same decision again shows it, the other decision is refused (409), and a decided,
//!   superseded or timed-out approval takes no vote (409). When the votes decide, `approval.decided`
//!   is committed and published exactly once.
//! - Refusals change nothing: incomplete or forged link or unknown key → 401; expired → 410; link
//!   of another run, stage or artifact → 401; not an approver, self-approval, wrong principal,
//!   cross-site or CSRF-less POST → 403; unknown approval → 404; run already finished → 409.

use super::*;
use crate::adapters::{ApprovalRecord, Vote, VoteResult};
use crate::invoke::{HttpRequest, HttpResponse};
use crate::links::{Claims, LinkError, artifact_digest};
use base64::Engine;
use serde_json::json;

pub const NAME: &str = "approval";

pub async fn handle(state: AppState, req: HttpRequest) -> Result<HttpResponse> {
    let id = req.params.get("id").cloned().unwrap_or_default();
    if id.is_empty() || id.len() > 200 {
        return Err(Error::NotFound("no approval id in the path".into()));
    }
    let token = req.query.get("t").cloned().unwrap_or_default();
    let claims = state.links.verify(&token, Utc::now()).map_err(|e| match e {
        LinkError::Expired(_) => Error::Gone(e.to_string()),
        _ => Error::Unauthorized(e.to_string()),
    })?;
    if claims.approval != id {
        return Err(Error::Unauthorized(format!("the link is for approval `{}`, not `{id}`", claims.approval)));
    }
    let record = state.store.approval(&id).await?.ok_or_else(|| Error::NotFound(format!("no approval `{id}`")))?;
    bound_to(&claims, &record)?;
    let approver = may_decide(&claims, &record)?;
    signed_in_as(&state, &req, &approver)?;
    let wants_json = req.header("accept").is_some_and(|a| a.contains("application/json"));
    let view = View { approver: &approver, token: &token, wants_json, trace: release_trace(&state, &record.run_id).await? };
    match req.method.as_str() {
        "GET" | "HEAD" => Ok(page(&state, &record, &view, None)),
        "POST" => decide(&state, &req, record, &view).await,
        m => Err(Error::Malformed(format!("{m} is not supported; use GET to view and POST to decide"))),
    }
}

/// The token names this approval's run, stage and artifact (a link of another release, or of an
/// artifact that was replaced, decides nothing here).
fn bound_to(c: &Claims, r: &ApprovalRecord) -> Result<()> {
    if c.run != r.run_id || c.stage != r.stage {
        return Err(Error::Unauthorized(format!("the link is for run {} stage {}, not this approval", c.run, c.stage)));
    }
    if c.artifact != artifact_digest(&r.image.id) {
        return Err(Error::Unauthorized("the link is for another artifact than the one this approval is for".into()));
    }
    Ok(())
}

/// The link's approver, if they may decide this approval.
fn may_decide(c: &Claims, r: &ApprovalRecord) -> Result<String> {
    if let Some(x) = r.excluded.iter().find(|x| x.who.eq_ignore_ascii_case(&c.approver)) {
        return Err(Error::Forbidden(format!("{} cannot approve this release: {} (no self-approval)", c.approver, x.why)));
    }
    r.approvers
        .iter()
        .find(|a| a.eq_ignore_ascii_case(&c.approver))
        .cloned()
        .ok_or_else(|| Error::Forbidden(format!("{} is not an approver of `{}`", c.approver, r.id)))
}

/// The identities App Service Authentication says the caller is (`X-MS-CLIENT-PRINCIPAL`, the
/// base64 JSON the platform sets and strips from client requests, and `-NAME`).
pub fn principal_identities(req: &HttpRequest) -> Option<Vec<String>> {
    let raw = req.header("x-ms-client-principal");
    let name = req.header("x-ms-client-principal-name");
    if raw.is_none() && name.is_none() {
        return None;
    }
    let mut ids: Vec<String> = name.map(str::to_string).into_iter().collect();
    let decoded = raw
        .and_then(|r| base64::engine::general_purpose::STANDARD.decode(r.trim()).ok())
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
    for c in decoded.iter().flat_map(|v| v["claims"].as_array().cloned().unwrap_or_default()) {
        let typ = c["typ"].as_str().unwrap_or_default().to_ascii_lowercase();
        let wanted = ["preferred_username", "email", "emails", "upn", "name"];
        if wanted.iter().any(|w| typ == *w || typ.ends_with(&format!("/{w}")) || typ.ends_with("/emailaddress")) {
            ids.extend(c["val"].as_str().map(str::to_string));
        }
    }
    Some(ids)
}

/// With App Service Authentication on, the signed-in principal must be the link's approver.
fn signed_in_as(state: &AppState, req: &HttpRequest, approver: &str) -> Result<()> {
    match principal_identities(req) {
        Some(ids) if ids.iter().any(|i| i.eq_ignore_ascii_case(approver)) => Ok(()),
        Some(ids) => Err(Error::Forbidden(format!(
            "signed in as {}, but this link is for {approver}",
            ids.first().map(String::as_str).unwrap_or("someone else")
        ))),
        None if state.config.require_signed_in => {
            Err(Error::Forbidden("App Service Authentication is on, but no signed-in principal came with the request".into()))
        }
        None => Ok(()),
    }
}

struct Form {
    decision: Decision,
    comment: Option<String>,
    csrf: String,
}

fn parse_form(req: &HttpRequest) -> Result<Form> {
    let ct = req.header("content-type").unwrap_or_default().to_ascii_lowercase();
    let (decision, comment, csrf) = if ct.starts_with("application/json") {
        let v: serde_json::Value = serde_json::from_slice(&req.body).map_err(|e| Error::Malformed(format!("the body is not JSON: {e}")))?;
        let s = |k: &str| v[k].as_str().map(str::to_string);
        (s("decision").unwrap_or_default(), s("comment"), s("csrf").unwrap_or_default())
    } else {
        let (mut d, mut c, mut x) = (String::new(), None, String::new());
        for (k, v) in url::form_urlencoded::parse(&req.body) {
            match &*k {
                "decision" => d = v.into_owned(),
                "comment" => c = Some(v.into_owned()),
                "csrf" => x = v.into_owned(),
                _ => {}
            }
        }
        (d, c, x)
    };
    let decision = match decision.as_str() {
        "approve" | "approved" => Decision::Approved,
        "reject" | "rejected" => Decision::Rejected,
        other => {
            return Err(Error::Malformed(format!(
                "decision `{}` is not `approve` or `reject`",
                other.chars().take(40).collect::<String>()
            )));
        }
    };
    let comment = comment.map(|c| c.trim().to_string()).filter(|c| !c.is_empty());
    if comment.as_ref().is_some_and(|c| c.chars().count() > 2000) {
        return Err(Error::TooLarge("the comment is over 2000 characters".into()));
    }
    Ok(Form { decision, comment, csrf })
}

/// Who sees the page, through which link, in which form, and the release's trace id.
struct View<'a> {
    approver: &'a str,
    token: &'a str,
    wants_json: bool,
    trace: Option<String>,
}

/// The trace id of the release the approval is part of (its Application Insights operation id).
async fn release_trace(state: &AppState, run_id: &str) -> Result<Option<String>> {
    // With spans recorded this request's span is in the release's trace already ([`trace_parent`]).
    if let Some(tp) = crate::telemetry::current_traceparent() {
        return Ok(tp.split('-').nth(1).map(str::to_string));
    }
    let run = state.store.run(run_id).await?;
    Ok(run.and_then(|r| r.traceparent).and_then(|tp| tp.split('-').nth(1).map(str::to_string)))
}

/// The parent of an approval request's span: with a valid link, the step that asked for the
/// approval (else, for an approval stored before it recorded one, the latest step of its run), so
/// viewing and deciding are spans of the release's trace — also when the link is clicked before
/// the asking step has committed. A link that does not verify joins nothing (and costs no store
/// read).
pub async fn trace_parent(state: &AppState, req: &HttpRequest) -> Option<String> {
    if !crate::telemetry::recording() {
        return None; // no span to parent: no store read
    }
    let claims = state.links.verify(req.query.get("t")?, Utc::now()).ok()?;
    if let Some(tp) = state.store.approval(&claims.approval).await.ok().flatten().and_then(|a| a.traceparent) {
        return Some(tp);
    }
    state.store.run(&claims.run).await.ok().flatten()?.traceparent
}

async fn decide(state: &AppState, req: &HttpRequest, record: ApprovalRecord, view: &View<'_>) -> Result<HttpResponse> {
    let (approver, token) = (view.approver, view.token);
    // A browser says where a form post comes from; only the approval page itself may post.
    if let Some(site) = req.header("sec-fetch-site").filter(|s| !matches!(*s, "same-origin" | "none")) {
        return Err(Error::Forbidden(format!("a decision cannot be posted from another site (Sec-Fetch-Site: {site})")));
    }
    let form = parse_form(req)?;
    if !state.links.check_csrf(token, &form.csrf) {
        return Err(Error::Forbidden("the decision lacks the page's CSRF value: open the link and decide on its page".into()));
    }
    let now = Utc::now();
    if record.expires_at <= now && record.closed.is_none() {
        return Err(Error::Gone(format!("approval `{}` expired at {}", record.id, record.expires_at.to_rfc3339())));
    }
    let run = state.store.run(&record.run_id).await?.ok_or_else(|| Error::NotFound(format!("no run `{}`", record.run_id)))?;
    if run.status.is_final() && record.why_closed().is_none() {
        return Err(Error::Conflict(format!("run `{}` already {}", run.id, run.status.as_str())));
    }
    let vote = Vote { approver: approver.to_string(), decision: form.decision, at: now, comment: form.comment.clone() };
    let (record, result) = state.store.vote(&record.id, &vote).await?;
    let recorded = match result {
        VoteResult::Recorded => vote,
        // A second click of the same button: show what is recorded — and make sure the vote's
        // step is committed and its events went out, should a crash have cut the first request
        // short after the vote was stored.
        VoteResult::Repeated(v) => v,
        VoteResult::Contradicts(v) => {
            return Err(Error::Conflict(format!(
                "you {} this at {}; a decision is not changed",
                word(v.decision),
                v.at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            )));
        }
        VoteResult::Closed(why) => return Err(Error::Conflict(format!("approval `{}` is {why}", record.id))),
    };
    let commit = vote_commit(state, &run, &record, &recorded);
    run_step(state, &run.id, &commit.key.clone(), || async { Ok(Some(commit)) }).await?;
    Ok(page(state, &record, view, Some(form.decision)))
}

/// What a stored vote commits on its run: its entry and its `approval.changed` event, and — when
/// it is the vote that decided (counting the votes up to it) — `approval.decided`. The approval
/// function commits it right after storing the vote; the watchdog commits it for a vote stored
/// by a request that died before its commit.
pub fn vote_commit(state: &AppState, run: &Run, record: &ApprovalRecord, vote: &Vote) -> StepCommit {
    let rr = RunRef::from(run);
    let stage = record.stage.clone();
    let approver = vote.approver.as_str();
    let key = vote_key(&stage, approver);
    // The outcome as this vote left it.
    let mut upto = record.clone();
    let i = record.votes.iter().position(|v| v.approver.eq_ignore_ascii_case(approver)).unwrap_or(record.votes.len());
    upto.votes.truncate(i + 1);
    upto.closed = None;
    let outcome = upto.outcome();
    // Every vote is an event (audit); the one that decides is followed by `approval.decided`.
    let detail = match &vote.comment {
        Some(c) => format!("{}: {c}", word(vote.decision)),
        None => word(vote.decision).to_string(),
    };
    let voted = EventData::ApprovalChanged(ApprovalChanged {
        app: record.app.clone(),
        stage: stage.clone(),
        approval_id: record.id.clone(),
        image: record.image.clone(),
        commit: record.commit.clone(),
        change: ApprovalChange::Voted,
        people: vec![approver.to_string()],
        detail: Some(detail),
    });
    let mut outbox = vec![
        emit(state, &rr, &format!("approval-changed.{stage}.voted.{}", short_digest(&[&approver.to_ascii_lowercase()])), NAME, voted).1,
    ];
    let mut entries = vec![entry(&key, format!("{approver} {} {stage}", word(vote.decision)), vote.comment.clone())];
    if let Some(o) = outcome {
        let by: Vec<String> = upto.votes.iter().filter(|v| v.decision == o).map(|v| v.approver.clone()).collect();
        let comment = upto.votes.iter().rev().find_map(|v| v.comment.clone());
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
        entries.push(entry(&key, format!("approval of {stage} decided: {}", word(o)), Some(format!("by {}", by.join(", ")))));
    }
    let waiting = if outcome.is_none() { waiting_for_approval(&upto) } else { format!("promotion to {stage}") };
    StepCommit::of_run(&run.id, &key, entries, RunStatus::Waiting, Some(waiting), outbox)
}

/// One run entry per approver's vote (idempotent per approver).
fn vote_key(stage: &str, approver: &str) -> String {
    format!("vote.{stage}.{}", short_digest(&[&approver.to_ascii_lowercase()]))
}

fn word(d: Decision) -> &'static str {
    if d == Decision::Approved { "approved" } else { "rejected" }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;").replace('\'', "&#39;")
}

/// `3h 12m`, `45m`, `20s`.
fn time_left(until: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let s = (until - now).num_seconds();
    match s {
        s if s <= 0 => "none".into(),
        s if s >= 86_400 => format!("{}d {}h", s / 86_400, (s % 86_400) / 3600),
        s if s >= 3600 => format!("{}h {}m", s / 3600, (s % 3600) / 60),
        s if s >= 60 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// Plain and readable; inline because the page loads nothing (CSP `default-src 'none'`).
const STYLE: &str = "body{font:15px/1.45 system-ui,sans-serif;max-width:52rem;margin:2rem auto;padding:0 1rem;color:#1b1f24}\
h1{font-size:1.5rem}h2{font-size:1.1rem;margin-top:1.6rem}dl{display:grid;grid-template-columns:9rem 1fr;gap:.3rem 1rem}\
dt{color:#57606a}dd{margin:0;overflow-wrap:anywhere}code{font-size:.9em}.note{padding:.6rem .8rem;background:#fff8c5;border-radius:6px}\
form{margin-top:1.5rem;display:flex;gap:.6rem;align-items:center;flex-wrap:wrap}input[name=comment]{flex:1;min-width:14rem;padding:.4rem}\
button{padding:.5rem 1.2rem;border-radius:6px;border:1px solid #8c959f;font-weight:600;cursor:pointer}\
#approve{background:#1f883d;color:#fff;border-color:#1a7f37}#reject{background:#fff;color:#cf222e}";

fn page(state: &AppState, a: &ApprovalRecord, view: &View<'_>, just: Option<Decision>) -> HttpResponse {
    let (approver, token, wants_json) = (view.approver, view.token, view.wants_json);
    let now = Utc::now();
    let outcome = a.outcome();
    let closed = a.why_closed();
    let state_word = match (&a.closed, outcome) {
        (Some(crate::adapters::Closed::Superseded { .. }), _) => "superseded",
        (_, Some(Decision::Approved)) => "approved",
        (_, Some(Decision::Rejected)) => "rejected",
        _ if a.expires_at <= now => "expired",
        _ => "pending",
    };
    let mine = a.votes.iter().find(|v| v.approver.eq_ignore_ascii_case(approver));
    let can_decide = mine.is_none() && closed.is_none() && a.expires_at > now;
    // JSON clients always get the CSRF value: posting with it to a decided approval is answered
    // with what stands (409); the HTML page offers the form only while a decision can be made.
    let csrf = state.links.csrf(token);
    if wants_json {
        return HttpResponse::json(
            200,
            &json!({
                "approval": a.id, "run": a.run_id, "app": a.app, "stage": a.stage, "commit": a.commit,
                "image": a.image, "approvers": a.approvers, "quorum": a.quorum, "expiresAt": a.expires_at,
                "timeLeft": time_left(a.expires_at, now), "votes": a.votes, "state": state_word, "closed": closed,
                "excluded": a.excluded, "evidence": a.evidence, "you": approver, "yourVote": mine.map(|v| v.decision),
                "csrf": csrf, "traceId": view.trace,
            }),
        );
    }
    let ev = &a.evidence;
    let commits: String = ev
        .commits
        .iter()
        .map(|c| {
            let who = match (&c.author, &c.author_email) {
                (Some(n), Some(e)) => format!("{} &lt;{}&gt;", esc(n), esc(e)),
                (Some(n), None) => esc(n),
                (None, Some(e)) => esc(e),
                (None, None) => "unknown author".into(),
            };
            format!(
                "<li><code>{}</code> {} — <span class=\"author\">{who}</span></li>",
                esc(&c.id[..c.id.len().min(12)]),
                esc(c.message.as_deref().unwrap_or("").lines().next().unwrap_or(""))
            )
        })
        .collect();
    let previous = match &ev.previous {
        Some(p) => format!(
            "<section id=\"previous\"><h2>Passed in {stage}</h2><p>Deployed to <code>{target}</code> at {at}.</p><p class=\"health\">{health}</p><ul>{checks}</ul></section>",
            stage = esc(&p.stage),
            target = esc(p.target.rsplit('/').next().unwrap_or(&p.target)),
            at = p.deployed_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            health = esc(&p.health),
            checks = if p.checks.is_empty() {
                "<li>no acceptance checks configured</li>".to_string()
            } else {
                p.checks.iter().map(|c| format!("<li>passed: {}</li>", esc(c))).collect()
            },
        ),
        None => String::new(),
    };
    let votes: String = a
        .votes
        .iter()
        .map(|v| {
            format!(
                "<li>{} {} at {}{}</li>",
                esc(&v.approver),
                word(v.decision),
                v.at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                v.comment.as_deref().map(|c| format!(": “{}”", esc(c))).unwrap_or_default()
            )
        })
        .collect();
    let excluded: String = a.excluded.iter().map(|x| format!("<li>{} cannot approve: {}</li>", esc(&x.who), esc(&x.why))).collect();
    let form = match csrf.as_ref().filter(|_| can_decide) {
        Some(csrf) => format!(
            "<form method=\"post\" action=\"/api/approvals/{id}?t={t}\"><input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
             <label>Comment <input name=\"comment\" maxlength=\"2000\"></label> \
             <button name=\"decision\" value=\"approve\" id=\"approve\">Approve</button> \
             <button name=\"decision\" value=\"reject\" id=\"reject\">Reject</button></form>",
            id = esc(&a.id),
            t = esc(&url::form_urlencoded::byte_serialize(token.as_bytes()).collect::<String>()),
            csrf = esc(csrf),
        ),
        None => String::new(),
    };
    let note = match (just, mine, &closed) {
        (Some(_), Some(v), _) => format!("<p class=\"note\"><strong>Your decision is recorded: {}.</strong></p>", word(v.decision)),
        (None, Some(v), _) => format!("<p class=\"note\">You {} this already.</p>", word(v.decision)),
        (_, None, Some(why)) => format!("<p class=\"note\"><strong>This approval is {}.</strong></p>", esc(why)),
        _ if a.expires_at <= now => "<p class=\"note\"><strong>This approval expired.</strong></p>".into(),
        _ => String::new(),
    };
    HttpResponse::html(
        200,
        format!(
            "<!doctype html><html><head><meta charset=\"utf-8\"><meta name=\"referrer\" content=\"no-referrer\">\
             <title>Approve {app} to {stage}</title><style>{STYLE}</style></head><body>\
             <h1>Promote {app} to {stage}?</h1>{note}\
             <dl><dt>State</dt><dd id=\"state\">{state_word} — {n} of {quorum} approvals from {approvers}</dd>\
             <dt>Time left</dt><dd>{left} (until {exp})</dd>\
             <dt>Artifact</dt><dd><code id=\"artifact\">{image}</code></dd>\
             <dt>Release</dt><dd>{repo} <code>{branch}</code> at <code>{commit}</code>, pushed by {pusher}; run <code>{run}</code></dd>\
             <dt>You</dt><dd>{me}</dd>{trace}</dl>\
             <h2>Commits</h2><ul id=\"commits\">{commits}</ul>{previous}\
             <h2>Decisions</h2><ul id=\"votes\">{votes}{excluded}</ul>{form}</body></html>",
            app = esc(&a.app),
            stage = esc(&a.stage),
            n = a.votes.iter().filter(|v| v.decision == Decision::Approved).count(),
            quorum = a.quorum,
            approvers = esc(&a.approvers.join(", ")),
            left = time_left(a.expires_at, now),
            exp = a.expires_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            image = esc(&a.image.id),
            repo = esc(&ev.repository),
            branch = esc(&ev.branch),
            commit = esc(&a.commit),
            pusher = esc(ev.pusher.as_deref().unwrap_or("someone")),
            run = esc(&a.run_id),
            me = esc(approver),
            trace = view
                .trace
                .as_deref()
                .map(|t| format!(
                    "<dt>Trace</dt><dd><code id=\"trace\">{}</code> (the release's operation id in Application Insights)</dd>",
                    esc(t)
                ))
                .unwrap_or_default(),
        ),
    )
}
