//! The bad-input catalogue (docs/reliability.md), at the handler: each input gets a clear 4xx and
//! changes nothing — nothing published, no run stored, no build asked for.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use deploychain_functions::adapters::memory::MemoryStore;
use serde_json::{Value, json};
use std::sync::Arc;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// The probot push fixture for `repo` at `branch` (the `probot` app takes `bkeepers-patch-*`).
fn push(repo: &str, branch: &str) -> Vec<u8> {
    push_payload(repo, branch, COMMIT)
}

async fn nothing_changed(h: &Harness, what: &str) {
    assert!(h.publisher.sent().is_empty(), "{what}: published {:?}", h.publisher.types());
    assert!(h.state.store.runs(&Default::default()).await.unwrap().is_empty(), "{what}: a run was stored");
    assert!(h.builds.requests.lock().unwrap().is_empty(), "{what}: a build was asked for");
}

/// POST `body` to the GitHub webhook with exactly `headers`.
async fn github_with(h: &Harness, headers: &[(&str, String)], body: &[u8]) -> (u16, String) {
    let env = http_envelope("github_webhook", "POST", "hooks/github", &[], headers, &[], body);
    let (status, _, body) = h.http("github_webhook", &env).await;
    (status, body)
}

fn github_headers(event: &str, body: &[u8]) -> Vec<(&'static str, String)> {
    vec![
        ("Content-Type", "application/json".into()),
        ("X-GitHub-Event", event.into()),
        ("X-GitHub-Delivery", "72d3162e-cc78-11e3-81ab-4c9367dc0958".into()),
        ("X-Hub-Signature-256", sign(body)),
    ]
}

#[tokio::test]
async fn deeply_nested_json_is_refused_without_exhausting_the_stack() {
    let h = Harness::new(Arc::new(MemoryStore::default()));
    // Far past serde_json's recursion limit (128), signed, so it reaches the parser.
    let depth = 100_000;
    let mut body = b"{\"a\":".repeat(depth);
    body.extend(b"1");
    body.extend(b"}".repeat(depth));
    let (s, text) = h.github_signed("push", &body).await;
    assert_eq!(s, 400, "{text}");
    // Nested inside a field the handler reads.
    let mut p: Value = serde_json::from_slice(&push("bkeepers-inc/test", "bkeepers-patch-1")).unwrap();
    p["head_commit"]["message"] = json!("x");
    let text =
        serde_json::to_string(&p).unwrap().replace("\"message\":\"x\"", &format!("\"message\":{}1{}", "[".repeat(5000), "]".repeat(5000)));
    let (s, res) = h.github_signed("push", text.as_bytes()).await;
    assert_eq!(s, 400, "{res}");
    nothing_changed(&h, "nested JSON").await;
}

#[tokio::test]
async fn invalid_utf8_is_refused() {
    let h = Harness::new(Arc::new(MemoryStore::default()));
    let mut body = push("bkeepers-inc/test", "bkeepers-patch-1");
    let at = body.windows(7).position(|w| w == b"bkeeper").unwrap();
    body[at] = 0xff;
    // As text (the host decodes it, replacing the bad byte): the signature over the bytes GitHub
    // sent no longer matches what arrives.
    let (s, text) = github_with(&h, &github_headers("push", &body), &body).await;
    assert_eq!(s, 401, "{text}");
    // As bytes (a binary media type is handed over as base64, byte for byte), signed: not JSON's
    // media type, so refused before anything reads it.
    let mut headers = github_headers("push", &body);
    headers[0].1 = "application/octet-stream".into();
    let (s, text) = github_with(&h, &headers, &body).await;
    assert_eq!(s, 415, "{text}");
    // Percent-encoded in a form, signed over the form as sent: the payload is not UTF-8 JSON.
    let mut form = b"payload=".to_vec();
    form.extend(url::form_urlencoded::byte_serialize(&body).collect::<String>().into_bytes());
    let mut headers = github_headers("push", &form);
    headers[0].1 = "application/x-www-form-urlencoded".into();
    let (s, text) = github_with(&h, &headers, &form).await;
    assert_eq!(s, 400, "{text}");
    nothing_changed(&h, "invalid UTF-8").await;
}

#[tokio::test]
async fn wrong_content_types_are_refused_with_415() {
    let h = Harness::new(Arc::new(MemoryStore::default()));
    let body = push("bkeepers-inc/test", "bkeepers-patch-1");
    for ct in ["text/plain", "application/xml", "multipart/form-data; boundary=x"] {
        let mut headers = github_headers("push", &body);
        headers[0].1 = ct.into();
        let (s, text) = github_with(&h, &headers, &body).await;
        assert_eq!(s, 415, "{ct}: {text}");
        assert!(text.contains("application/json"), "{ct}: the answer says what to send: {text}");
    }
    // No Content-Type at all.
    let headers: Vec<_> = github_headers("push", &body).into_iter().filter(|(k, _)| *k != "Content-Type").collect();
    assert_eq!(github_with(&h, &headers, &body).await.0, 415);
    nothing_changed(&h, "content types").await;
}

#[tokio::test]
async fn githubs_form_encoded_deliveries_work_like_json_ones() {
    // `application/x-www-form-urlencoded` is GitHub's other content type (`payload=<JSON>`),
    // signed over the form as sent.
    let h = Harness::new(Arc::new(MemoryStore::default()));
    let body = push("bkeepers-inc/test", "bkeepers-patch-1");
    let form = format!("payload={}", url::form_urlencoded::byte_serialize(&body).collect::<String>());
    let mut headers = github_headers("push", form.as_bytes());
    headers[0].1 = "application/x-www-form-urlencoded".into();
    let (s, text) = github_with(&h, &headers, form.as_bytes()).await;
    assert_eq!(s, 202, "{text}");
    assert_eq!(h.publisher.types(), ["push"]);
    // A form without the field, or signed over something else, changes nothing.
    let h = Harness::new(Arc::new(MemoryStore::default()));
    let mut headers = github_headers("push", b"other=1");
    headers[0].1 = "application/x-www-form-urlencoded".into();
    let (s, text) = github_with(&h, &headers, b"other=1").await;
    assert_eq!(s, 400, "{text}");
    let mut headers = github_headers("push", &body);
    headers[0].1 = "application/x-www-form-urlencoded".into();
    assert_eq!(github_with(&h, &headers, form.as_bytes()).await.0, 401);
    nothing_changed(&h, "forms").await;
}

#[tokio::test]
async fn missing_and_duplicate_headers_are_refused() {
    let h = Harness::new(Arc::new(MemoryStore::default()));
    let body = push("bkeepers-inc/test", "bkeepers-patch-1");
    // No event name: nothing says what the body is.
    let headers: Vec<_> = github_headers("push", &body).into_iter().filter(|(k, _)| *k != "X-GitHub-Event").collect();
    let (s, text) = github_with(&h, &headers, &body).await;
    assert_eq!(s, 400, "{text}");
    assert!(text.contains("X-GitHub-Event"), "{text}");
    // No signature.
    let headers: Vec<_> = github_headers("push", &body).into_iter().filter(|(k, _)| *k != "X-Hub-Signature-256").collect();
    assert_eq!(github_with(&h, &headers, &body).await.0, 401);
    // Two signatures (the host joins repeated headers with a comma), even if one is right.
    let mut headers = github_headers("push", &body);
    headers.retain(|(k, _)| *k != "X-Hub-Signature-256");
    headers.push(("X-Hub-Signature-256", format!("{},sha256={}", sign(&body), "0".repeat(64))));
    assert_eq!(github_with(&h, &headers, &body).await.0, 401);
    // Two event names.
    let mut headers = github_headers("push", &body);
    headers[1].1 = "push,ping".into();
    let (s, text) = github_with(&h, &headers, &body).await;
    assert_eq!(s, 400, "{text}");
    nothing_changed(&h, "headers").await;
}

#[tokio::test]
async fn unicode_lookalikes_in_branch_and_repository_names_match_nothing() {
    let h = Harness::new(Arc::new(MemoryStore::default()));
    // The policy takes `bkeepers-inc/test` on `bkeepers-patch-*`. None of these is that: git
    // allows the first ones as names (they just do not match), and refuses the rest, so no
    // GitHub payload names them (400).
    let lookalikes = [
        "bkeepers-p\u{0430}tch-1",  // Cyrillic а
        "bkeepers\u{2010}patch-1",  // a hyphen that is not `-`
        "\u{202e}1-hctap-srepeekb", // right-to-left override
        "bkeepers-\u{200b}patch-1", // zero-width space
        "ｂkeepers-patch-1",        // fullwidth b
        "BKEEPERS-PATCH-1",         // branch names are case-sensitive
    ];
    for b in lookalikes {
        let (s, v) = h.github_signed("push", &push("bkeepers-inc/test", b)).await;
        assert_eq!(s, 202, "{b:?}: {v}");
        assert!(v["run"].is_null() && v["ignored"].as_str().is_some_and(|r| r.contains("no run")), "{b:?}: {v}");
    }
    let not_git =
        ["bkeepers-patch-1\u{0000}", "bkeepers-patch-1/../../main", "bkeepers-patch-1\n", "bkeepers-patch-1.lock", "bkeepers-patch-*"];
    for b in not_git {
        let (s, v) = h.github_signed("push", &push("bkeepers-inc/test", b)).await;
        assert_eq!(s, 400, "{b:?}: {v}");
    }
    for repo in ["bkeepers-inc/t\u{0435}st", "bkeepers-inc/test\u{200b}", "bkeepers-inc/../bkeepers-inc/test"] {
        let (s, v) = h.github_signed("push", &push(repo, "bkeepers-patch-1")).await;
        assert_eq!(s, 202, "{repo:?}: {v}");
        assert!(v["run"].is_null(), "{repo:?} started a run: {v}");
    }
    nothing_changed(&h, "lookalikes").await;
}

#[tokio::test]
async fn path_traversal_in_route_parameters_finds_nothing() {
    let h = Harness::new(Arc::new(MemoryStore::default()));
    for id in ["../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "probot-0123/../octo-0123", "\u{0000}", "%00", "x".repeat(5000).as_str()] {
        let env = http_envelope("runs", "GET", &format!("runs/{id}"), &[], &[], &[("id", id)], b"");
        let (s, _, body) = h.http("runs", &env).await;
        assert!(s == 404 || s == 400, "runs/{id:.40}: {s} {body}");
        let env = http_envelope("approval", "GET", &format!("approvals/{id}"), &[("t", "x")], &[], &[("id", id)], b"");
        let (s, _, body) = h.http("approval", &env).await;
        assert!((400..500).contains(&s), "approvals/{id:.40}: {s} {body:.200}");
        assert!(!body.contains("root:"), "{body}");
    }
    nothing_changed(&h, "traversal").await;
}

#[tokio::test]
async fn the_other_webhooks_refuse_bodies_that_are_not_json_with_415() {
    let h = Harness::new(Arc::new(MemoryStore::default()));
    let body = br#"{"eventType":"git.push","build":{"phase":"FINALIZED"}}"#;
    let ado = vec![("Authorization", basic(ADO_USER, ADO_SECRET))];
    let cases = [
        ("azure_devops_webhook", "hooks/azure-devops", ado),
        ("jenkins_webhook", "hooks/jenkins", vec![]),
        ("eventgrid_webhook", "hooks/eventgrid", vec![("aeg-event-type", "Notification".into())]),
    ];
    for (function, route, extra) in cases {
        for ct in ["text/plain", "application/x-www-form-urlencoded", "application/xml"] {
            let mut headers = extra.clone();
            headers.push(("Content-Type", ct.into()));
            let env = http_envelope(function, "POST", route, &[], &headers, &[], body);
            let (s, _, text) = h.http(function, &env).await;
            assert_eq!(s, 415, "{function} {ct}: {text}");
            assert!(text.contains("application/json"), "{function}: the answer says what to send: {text}");
        }
    }
    nothing_changed(&h, "other webhooks").await;
}
