//! Approval notices to people: one message per approver, so each receives only their own signed
//! link, on every configured channel —
//!
//! - **Teams**: a Workflows webhook ("When a Teams webhook request is received"), a `message` with
//!   one Adaptive Card 1.4 attachment (`DEPLOYCHAIN_NOTIFY_TEAMS_URL`);
//! - **Slack**: an incoming webhook with Block Kit blocks (`DEPLOYCHAIN_NOTIFY_SLACK_URL`);
//! - **generic JSON webhook**: `to`, `subject`, `text`, `link` and the evidence, for a Logic App or
//!   Power Automate flow that mails or messages the person (`DEPLOYCHAIN_NOTIFY_URL`); locally,
//!   `deploychain up` listens here and prints the links.
//!
//! The cards only *open* the link (`Action.OpenUrl`, a URL button): the decision is made on the
//! approval page, never by a card or a link preview. Each POST is retried (429 and 5xx honouring
//! `Retry-After`, connection errors) before the notice counts as failed (transient: the step is
//! redelivered). Errors never contain a link.

use super::{ApprovalNotice, NoticeKind, Notify, StuckNotice};
use crate::error::{Error, Result};
use async_trait::async_trait;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

/// Where notices go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Channel {
    Webhook,
    Teams,
    Slack,
}

impl Channel {
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Webhook => "webhook",
            Channel::Teams => "Teams",
            Channel::Slack => "Slack",
        }
    }
}

pub struct WebhookNotify {
    targets: Vec<crate::config::NotifyTarget>,
    http: Arc<dyn azure_core::HttpClient>,
    attempts: u32,
    backoff: Duration,
}

impl WebhookNotify {
    pub fn new(targets: Vec<crate::config::NotifyTarget>, http: Arc<dyn azure_core::HttpClient>) -> WebhookNotify {
        WebhookNotify { targets, http, attempts: 4, backoff: Duration::from_millis(250) }
    }

    /// Retry policy (tests shorten it).
    pub fn with_retries(mut self, attempts: u32, backoff: Duration) -> WebhookNotify {
        self.attempts = attempts.max(1);
        self.backoff = backoff;
        self
    }

    async fn post(&self, channel: Channel, url: &url::Url, body: &Value, notice_id: &str, traceparent: Option<&str>) -> Result<()> {
        let mut last = String::new();
        for attempt in 1..=self.attempts {
            let mut req = azure_core::Request::new(url.clone(), azure_core::Method::Post);
            req.insert_header(azure_core::headers::CONTENT_TYPE, "application/json");
            // A receiver can drop repeats of the same notice (retries, redelivery) by this key.
            req.insert_header("x-deploychain-notice-id", notice_id.to_string());
            if let Some(tp) = traceparent {
                req.insert_header("traceparent", tp.to_string());
            }
            req.set_body(body.to_string());
            let wait = match self.http.execute_request(&req).await {
                // Never echo the request: it carries a signed link.
                Err(_) => {
                    last = "could not be delivered".into();
                    None
                }
                Ok(rsp) => {
                    let status = u16::from(rsp.status());
                    if (200..300).contains(&status) {
                        return Ok(());
                    }
                    last = format!("was answered {status}");
                    if status != 429 && status < 500 {
                        break; // the receiver refuses it: retrying will not help
                    }
                    rsp.headers()
                        .get_optional_str(&azure_core::headers::RETRY_AFTER)
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(Duration::from_secs)
                }
            };
            if attempt < self.attempts {
                let backoff = self.backoff.saturating_mul(1 << (attempt - 1).min(8));
                tokio::time::sleep(wait.unwrap_or(backoff).min(Duration::from_secs(30))).await;
            }
        }
        Err(Error::Transient(format!("the {} approval notice {last} after {} attempt(s)", channel.as_str(), self.attempts)))
    }
}

fn short(commit: &str) -> &str {
    &commit[..commit.len().min(12)]
}

/// The notice's title.
pub fn subject(n: &ApprovalNotice) -> String {
    let what = format!("{} {} to {}?", n.app, short(&n.commit), n.stage);
    match n.kind {
        NoticeKind::Request => format!("Approve {what}"),
        NoticeKind::Reminder => format!("Reminder: approve {what}"),
        NoticeKind::Escalation => format!("Escalated to you: approve {what}"),
    }
}

/// The evidence as `(label, value)` pairs, shared by every channel.
fn facts(n: &ApprovalNotice, approver: &str) -> Vec<(&'static str, String)> {
    let ev = &n.evidence;
    let approved = n.votes.iter().filter(|v| v.decision == deploychain_events::Decision::Approved).count();
    let mut f = vec![
        ("App", n.app.clone()),
        ("Stage", n.stage.clone()),
        ("Artifact", n.image.id.clone()),
        ("Commit", format!("{} on {} of {}", short(&n.commit), ev.branch, ev.repository)),
        ("Pushed by", ev.pusher.clone().unwrap_or_else(|| "unknown".into())),
    ];
    if let Some(p) = &ev.previous {
        let checks = if p.checks.is_empty() { "no acceptance checks".to_string() } else { format!("passed {}", p.checks.join("; ")) };
        f.push(("Passed", format!("{}: healthy; {checks}", p.stage)));
    }
    f.push(("Approvals", format!("{approved} of {}", n.quorum)));
    f.push(("Expires", n.expires_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)));
    f.push(("For", approver.to_string()));
    if let Some(t) = n.trace_id() {
        f.push(("Trace", t.to_string()));
    }
    f
}

/// The commits as lines (at most `max`), each `abc1234 message — author`.
fn commit_lines(n: &ApprovalNotice, max: usize) -> Vec<String> {
    n.evidence
        .commits
        .iter()
        .take(max)
        .map(|c| {
            format!(
                "{} {} — {}",
                short(&c.id),
                c.message.as_deref().unwrap_or("").lines().next().unwrap_or(""),
                c.author.as_deref().or(c.author_email.as_deref()).unwrap_or("unknown author")
            )
        })
        .collect()
}

/// The generic webhook's JSON.
pub fn webhook_body(n: &ApprovalNotice, approver: &str, link: &str) -> Value {
    json!({
        "to": approver,
        "kind": match n.kind { NoticeKind::Request => "request", NoticeKind::Reminder => "reminder", NoticeKind::Escalation => "escalation" },
        "subject": subject(n),
        "text": format!(
            "{} asks to promote {} (commit {}) to {}. Open the link to review the evidence and decide; it expires at {}.",
            n.app, n.image.id, n.commit, n.stage, n.expires_at.to_rfc3339()
        ),
        "link": link,
        "approvalId": n.approval_id,
        "runId": n.run_id,
        "app": n.app,
        "stage": n.stage,
        "image": n.image.id,
        "expiresAt": n.expires_at.to_rfc3339(),
        "facts": facts(n, approver).into_iter().map(|(k, v)| json!({ "name": k, "value": v })).collect::<Vec<_>>(),
        "commits": n.evidence.commits,
        "traceId": n.trace_id(),
    })
}

/// A Teams Workflows webhook message carrying one Adaptive Card (schema 1.4, which Teams renders).
pub fn teams_body(n: &ApprovalNotice, approver: &str, link: &str) -> Value {
    let mut body = vec![
        json!({ "type": "TextBlock", "text": subject(n), "size": "Large", "weight": "Bolder", "wrap": true }),
        json!({ "type": "FactSet", "facts": facts(n, approver).into_iter().map(|(k, v)| json!({ "title": k, "value": v })).collect::<Vec<_>>() }),
    ];
    let commits = commit_lines(n, 10);
    if !commits.is_empty() {
        body.push(json!({ "type": "TextBlock", "text": "Commits", "weight": "Bolder", "spacing": "Medium" }));
        for c in commits {
            body.push(json!({ "type": "TextBlock", "text": c, "wrap": true, "spacing": "None", "fontType": "Monospace" }));
        }
    }
    body.push(json!({ "type": "TextBlock", "text": "The link opens the approval page; deciding there takes a click on Approve or Reject.", "wrap": true, "isSubtle": true, "size": "Small" }));
    json!({
        "type": "message",
        "attachments": [{
            "contentType": "application/vnd.microsoft.card.adaptive",
            "contentUrl": null,
            "content": {
                "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
                "type": "AdaptiveCard",
                "version": "1.4",
                "body": body,
                "actions": [{ "type": "Action.OpenUrl", "title": "Review and decide", "url": link }]
            }
        }]
    })
}

/// Slack's limits on the pieces used (Block Kit reference).
const SLACK_HEADER_MAX: usize = 150;
const SLACK_TEXT_MAX: usize = 3000;
const SLACK_FIELD_MAX: usize = 2000;
const SLACK_FIELDS_MAX: usize = 10;

fn cut(s: &str, max: usize) -> String {
    if s.chars().count() <= max { s.to_string() } else { format!("{}…", s.chars().take(max - 1).collect::<String>()) }
}

/// Slack mrkdwn with `&`, `<` and `>` escaped, as Slack requires.
fn mrkdwn(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// A Slack incoming-webhook message with Block Kit blocks.
pub fn slack_body(n: &ApprovalNotice, approver: &str, link: &str) -> Value {
    let facts = facts(n, approver);
    let fields: Vec<Value> = facts
        .iter()
        .take(SLACK_FIELDS_MAX)
        .map(|(k, v)| json!({ "type": "mrkdwn", "text": cut(&format!("*{k}*\n{}", mrkdwn(v)), SLACK_FIELD_MAX) }))
        .collect();
    let mut blocks = vec![
        json!({ "type": "header", "text": { "type": "plain_text", "text": cut(&subject(n), SLACK_HEADER_MAX), "emoji": false } }),
        json!({ "type": "section", "fields": fields }),
    ];
    let rest: Vec<String> = facts.iter().skip(SLACK_FIELDS_MAX).map(|(k, v)| format!("*{k}:* {}", mrkdwn(v))).collect();
    if !rest.is_empty() {
        blocks.push(json!({ "type": "section", "text": { "type": "mrkdwn", "text": cut(&rest.join("\n"), SLACK_TEXT_MAX) } }));
    }
    let commits = commit_lines(n, 10);
    if !commits.is_empty() {
        let text = commits.iter().map(|c| format!("• `{}`", mrkdwn(c))).collect::<Vec<_>>().join("\n");
        blocks.push(json!({ "type": "section", "text": { "type": "mrkdwn", "text": cut(&format!("*Commits*\n{text}"), SLACK_TEXT_MAX) } }));
    }
    blocks.push(json!({ "type": "actions", "elements": [{
        "type": "button", "text": { "type": "plain_text", "text": "Review and decide" }, "url": link, "style": "primary",
        "action_id": "deploychain-review"
    }] }));
    blocks.push(json!({ "type": "context", "elements": [{ "type": "mrkdwn", "text": "The button opens the approval page; deciding there takes a click on Approve or Reject." }] }));
    json!({ "text": cut(&subject(n), SLACK_TEXT_MAX), "blocks": blocks, "unfurl_links": false, "unfurl_media": false })
}

/// The watchdog's warning, for every channel: a line of text, and its facts.
pub fn stuck_body(channel: Channel, n: &StuckNotice) -> Value {
    let text = format!(
        "Run {} of {} has made no progress for over {}: it waits for {} (since {}).",
        n.run_id,
        n.app,
        client_human(n.threshold),
        n.waiting_for,
        n.since.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    );
    match channel {
        Channel::Webhook => json!({
            "kind": "stuck", "subject": format!("Run {} is stuck at {}", n.run_id, n.kind), "text": text,
            "runId": n.run_id, "app": n.app, "waitingFor": n.waiting_for, "step": n.kind, "since": n.since.to_rfc3339(),
        }),
        Channel::Teams => json!({ "type": "message", "attachments": [{
            "contentType": "application/vnd.microsoft.card.adaptive", "contentUrl": null,
            "content": { "$schema": "http://adaptivecards.io/schemas/adaptive-card.json", "type": "AdaptiveCard", "version": "1.4",
                "body": [
                    { "type": "TextBlock", "text": format!("Run {} is stuck", n.run_id), "size": "Large", "weight": "Bolder", "wrap": true },
                    { "type": "TextBlock", "text": text, "wrap": true }
                ] }
        }] }),
        Channel::Slack => json!({ "text": text, "blocks": [
            { "type": "header", "text": { "type": "plain_text", "text": cut(&format!("Run {} is stuck", n.run_id), SLACK_HEADER_MAX) } },
            { "type": "section", "text": { "type": "mrkdwn", "text": cut(&mrkdwn(&text), SLACK_TEXT_MAX) } }
        ] }),
    }
}

fn client_human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        s if s >= 3600 && s % 3600 == 0 => format!("{}h", s / 3600),
        s if s >= 60 && s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

#[async_trait]
impl Notify for WebhookNotify {
    async fn run_stuck(&self, n: &StuckNotice) -> Result<()> {
        let id = format!("{}.stuck.{}", n.run_id, n.since.timestamp());
        for t in &self.targets {
            self.post(t.channel, &t.url, &stuck_body(t.channel, n), &id, None).await?;
        }
        Ok(())
    }

    async fn approval_requested(&self, n: &ApprovalNotice) -> Result<()> {
        for (approver, link) in &n.links {
            let id = format!("{}.{}.{}", n.approval_id, n.key, deploychain_events::short_digest(&[approver]));
            for t in &self.targets {
                let body = match t.channel {
                    Channel::Webhook => webhook_body(n, approver, link),
                    Channel::Teams => teams_body(n, approver, link),
                    Channel::Slack => slack_body(n, approver, link),
                };
                self.post(t.channel, &t.url, &body, &id, n.traceparent.as_deref()).await?;
            }
        }
        Ok(())
    }
}
