//! Approval notices on the wire, against local receivers: one POST per approver and channel
//! carrying only that approver's link; Teams messages whose card validates against the published
//! Adaptive Card schema; Slack messages that validate against a Block Kit schema; retries of 429/5xx;
//! a receiver that keeps failing is a transient error that does not echo the links.
#![allow(clippy::unwrap_used)]

use axum::Router;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::post;
use deploychain_events::{CommitInfo, Decision, ImageKind, ImageRef};
use deploychain_functions::adapters::notify::{Channel, WebhookNotify, slack_body, teams_body};
use deploychain_functions::adapters::{ApprovalNotice, Evidence, NoticeKind, Notify, StageEvidence, Vote};
use deploychain_functions::config::NotifyTarget;
use serde_json::Value;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

type Seen = Arc<Mutex<Vec<(String, HeaderMap, Value)>>>;

/// A receiver for every channel (`/webhook`, `/teams`, `/slack`) that answers `fail_first`
/// requests with `fail_status`, then 200.
async fn receiver(fail_first: usize, fail_status: u16) -> (String, Seen) {
    let seen: Seen = Arc::default();
    let count = Arc::new(AtomicUsize::new(0));
    let handler = |path: &'static str| {
        move |State((seen, count)): State<(Seen, Arc<AtomicUsize>)>, headers: HeaderMap, body: String| async move {
            seen.lock().unwrap().push((path.to_string(), headers, serde_json::from_str(&body).unwrap()));
            if count.fetch_add(1, Ordering::SeqCst) < fail_first {
                let mut r = axum::response::Response::new(axum::body::Body::empty());
                *r.status_mut() = axum::http::StatusCode::from_u16(fail_status).unwrap();
                if fail_status == 429 {
                    r.headers_mut().insert("retry-after", "1".parse().unwrap());
                }
                return r;
            }
            axum::response::Response::new(axum::body::Body::from("ok"))
        }
    };
    let app = Router::new()
        .route("/webhook", post(handler("webhook")))
        .route("/teams", post(handler("teams")))
        .route("/slack", post(handler("slack")))
        .with_state((seen.clone(), count));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    (format!("http://{addr}"), seen)
}

fn targets(base: &str, channels: &[(Channel, &str)]) -> Vec<NotifyTarget> {
    channels
        .iter()
        .map(|(channel, path)| NotifyTarget { channel: *channel, url: url::Url::parse(&format!("{base}/{path}")).unwrap() })
        .collect()
}

const ALICE: &str = "https://app.example/api/approvals/web-738a951d2f3e.production?t=v1.kaaaa.ALICE.SIG";
const BOB: &str = "https://app.example/api/approvals/web-738a951d2f3e.production?t=v1.kaaaa.BOB.SIG";

fn notice(kind: NoticeKind) -> ApprovalNotice {
    ApprovalNotice {
        approval_id: "web-738a951d2f3e.production".into(),
        run_id: "web-738a951d2f3e".into(),
        app: "web".into(),
        stage: "production".into(),
        commit: "738a951d2f3e7c2b16cc5a0d6a2b1e7d9a1b2c3d".into(),
        image: ImageRef {
            kind: ImageKind::GalleryImageVersion,
            id: "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/galleries/g/images/web/versions/1.0.42".into(),
            version: Some("1.0.42".into()),
            digest: None,
        },
        expires_at: chrono::Utc::now() + chrono::Duration::hours(24),
        links: vec![("alice@contoso.com".into(), ALICE.into()), ("bob@contoso.com".into(), BOB.into())],
        kind,
        key: "request".into(),
        evidence: Evidence {
            repository: "octo-org/web".into(),
            branch: "main".into(),
            pusher: Some("octocat".into()),
            commits: vec![CommitInfo {
                id: "738a951d2f3e7c2b16cc5a0d6a2b1e7d9a1b2c3d".into(),
                message: Some("Add /healthz <endpoint> & tests\n\nLonger text.".into()),
                author: Some("Mona Lisa".into()),
                author_email: Some("mona@octo-org.example".into()),
                author_login: Some("monalisa".into()),
                timestamp: None,
            }],
            previous: Some(StageEvidence {
                stage: "staging".into(),
                target: "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/web-staging".into(),
                deployed_at: chrono::Utc::now(),
                health: "every instance HealthState/healthy".into(),
                checks: vec!["GET http://web-staging.internal/healthz → 200".into()],
            }),
        },
        votes: vec![Vote { approver: "carol@contoso.com".into(), decision: Decision::Approved, at: chrono::Utc::now(), comment: None }],
        quorum: 2,
        traceparent: Some(TRACEPARENT.into()),
    }
}

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn notifier(targets: Vec<NotifyTarget>) -> WebhookNotify {
    WebhookNotify::new(targets, azure_core::new_http_client()).with_retries(3, Duration::from_millis(10))
}

#[tokio::test]
async fn each_approver_gets_one_message_per_channel_with_only_their_own_link() {
    let (base, seen) = receiver(0, 200).await;
    let n = notifier(targets(&base, &[(Channel::Webhook, "webhook"), (Channel::Teams, "teams"), (Channel::Slack, "slack")]));
    n.approval_requested(&notice(NoticeKind::Request)).await.unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 6, "two approvers × three channels");
    for (path, headers, body) in &seen {
        let text = body.to_string();
        let (mine, theirs) = if text.contains("alice@contoso.com") { (ALICE, BOB) } else { (BOB, ALICE) };
        assert!(text.contains(mine), "{path}: the approver's own link");
        assert!(!text.contains(theirs), "{path}: another approver's link leaked");
        assert!(headers["content-type"].to_str().unwrap().starts_with("application/json"));
        assert!(headers["x-deploychain-notice-id"].to_str().unwrap().starts_with("web-738a951d2f3e.production.request."));
        // The release's trace: propagated with the request, and shown for finding it.
        assert_eq!(headers["traceparent"].to_str().unwrap(), TRACEPARENT, "{path}");
        assert!(text.contains("4bf92f3577b34da6a3ce929d0e0e4736"), "{path}: the trace id is shown: {text}");
        // The evidence travels: the commit, its author, what staging passed, the votes so far.
        for fact in ["Mona Lisa", "staging: healthy", "1 of 2", "738a951d2f3e", "versions/1.0.42"] {
            assert!(text.contains(fact), "{path} lacks {fact}: {text}");
        }
    }
    let webhook = seen.iter().find(|(p, _, b)| p == "webhook" && b["to"] == "alice@contoso.com").unwrap();
    assert_eq!(webhook.2["link"], ALICE);
    assert_eq!(webhook.2["subject"], "Approve web 738a951d2f3e to production?");
    assert_eq!(webhook.2["traceId"], "4bf92f3577b34da6a3ce929d0e0e4736");
}

/// Every `$ref`-free check the published Adaptive Card schema makes on our card.
fn adaptive_card_schema() -> jsonschema::Validator {
    let path = format!("{}/../tests/fixtures/adaptive-cards/adaptive-card.schema.json", env!("CARGO_MANIFEST_DIR"));
    let schema: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    jsonschema::options().should_validate_formats(true).build(&schema).unwrap()
}

#[test]
fn teams_messages_carry_an_adaptive_card_that_validates_against_the_published_schema() {
    let validator = adaptive_card_schema();
    for kind in [NoticeKind::Request, NoticeKind::Reminder, NoticeKind::Escalation] {
        let msg = teams_body(&notice(kind), "alice@contoso.com", ALICE);
        assert_eq!(msg["type"], "message");
        let att = &msg["attachments"][0];
        assert_eq!(att["contentType"], "application/vnd.microsoft.card.adaptive");
        let card = &att["content"];
        let errors: Vec<String> = validator.iter_errors(card).map(|e| format!("{e} at {}", e.instance_path)).collect();
        assert!(errors.is_empty(), "{errors:#?}\n{card:#}");
        // The only action opens the page: a card never decides.
        assert_eq!(card["actions"].as_array().unwrap().len(), 1);
        assert_eq!(card["actions"][0]["type"], "Action.OpenUrl");
        assert_eq!(card["actions"][0]["url"], ALICE);
        assert!(!card.to_string().contains("Action.Submit") && !card.to_string().contains("Action.Execute"));
    }
    // The schema is not a rubber stamp: a card with a wrong element fails it.
    let mut bad = teams_body(&notice(NoticeKind::Request), "alice@contoso.com", ALICE)["attachments"][0]["content"].clone();
    bad["body"][0]["type"] = "TextBlok".into();
    assert!(!validator.is_valid(&bad));
    let mut bad = teams_body(&notice(NoticeKind::Request), "alice@contoso.com", ALICE)["attachments"][0]["content"].clone();
    bad["actions"][0].as_object_mut().unwrap().remove("url");
    assert!(!validator.is_valid(&bad));
}

/// A Slack message checked against the Block Kit schema in tests/fixtures/slack (compiled from
/// Slack's Block Kit reference): its blocks through the schema's own `block` definition, plus the
/// message-level rules the schema leaves out (`text` up to 40,000 characters, at most 50 blocks).
fn block_kit_schema() -> jsonschema::Validator {
    let path = format!("{}/../tests/fixtures/slack/block-kit.schema.json", env!("CARGO_MANIFEST_DIR"));
    let kit: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let message = serde_json::json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "required": ["text", "blocks"],
        "properties": {
            "text": { "type": "string", "minLength": 1, "maxLength": 40000 },
            "blocks": { "type": "array", "minItems": 1, "maxItems": 50, "items": { "$ref": "#/$defs/block" } },
            "unfurl_links": { "type": "boolean" },
            "unfurl_media": { "type": "boolean" }
        },
        "additionalProperties": false,
        "$defs": kit["$defs"]
    });
    jsonschema::options().should_validate_formats(true).build(&message).unwrap()
}

#[test]
fn slack_messages_validate_as_block_kit() {
    let validator = block_kit_schema();
    for kind in [NoticeKind::Request, NoticeKind::Reminder, NoticeKind::Escalation] {
        let msg = slack_body(&notice(kind), "alice@contoso.com", ALICE);
        let errors: Vec<String> = validator.iter_errors(&msg).map(|e| format!("{e} at {}", e.instance_path)).collect();
        assert!(errors.is_empty(), "{errors:#?}\n{msg:#}");
        let button = &msg["blocks"].as_array().unwrap().iter().find(|b| b["type"] == "actions").unwrap()["elements"][0];
        assert_eq!(button["type"], "button");
        assert_eq!(button["url"], ALICE, "the button opens the approver's own link");
        // mrkdwn escapes `<`, `>` and `&` (Slack would read `<endpoint>` as a link).
        assert!(msg.to_string().contains("&lt;endpoint&gt; &amp; tests"), "{msg}");
    }
    // The schema is not a rubber stamp.
    let mut bad = slack_body(&notice(NoticeKind::Request), "alice@contoso.com", ALICE);
    bad["blocks"][0]["text"]["type"] = "mrkdwn".into();
    assert!(!validator.is_valid(&bad), "a header must be plain_text");
    let mut bad = slack_body(&notice(NoticeKind::Request), "alice@contoso.com", ALICE);
    bad["blocks"][0]["text"]["text"] = "x".repeat(151).into();
    assert!(!validator.is_valid(&bad), "a header is at most 150 characters");
}

#[tokio::test]
async fn throttled_and_failing_receivers_are_retried() {
    // Two failures (429 with Retry-After, then 5xx-like) and the third attempt lands.
    let (base, seen) = receiver(2, 429).await;
    let n = notifier(targets(&base, &[(Channel::Slack, "slack")]));
    let mut one = notice(NoticeKind::Reminder);
    one.links.truncate(1);
    let started = std::time::Instant::now();
    n.approval_requested(&one).await.unwrap();
    assert_eq!(seen.lock().unwrap().len(), 3);
    assert!(started.elapsed() >= Duration::from_secs(2), "Retry-After: 1 honoured twice");
}

#[tokio::test]
async fn a_receiver_that_keeps_failing_is_transient_and_does_not_echo_links() {
    let (base, seen) = receiver(usize::MAX, 500).await;
    let n = notifier(targets(&base, &[(Channel::Teams, "teams")]));
    let e = n.approval_requested(&notice(NoticeKind::Request)).await.unwrap_err();
    assert!(e.is_transient());
    assert!(!e.to_string().contains("SIG") && !e.to_string().contains("t=v1"), "{e}");
    assert_eq!(seen.lock().unwrap().len(), 3, "bounded attempts");
    // A refusal (4xx) is not retried.
    let (base, seen) = receiver(usize::MAX, 404).await;
    let e = notifier(targets(&base, &[(Channel::Webhook, "webhook")])).approval_requested(&notice(NoticeKind::Request)).await.unwrap_err();
    assert!(e.to_string().contains("404"), "{e}");
    assert_eq!(seen.lock().unwrap().len(), 1);
}
