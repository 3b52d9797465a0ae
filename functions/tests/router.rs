//! Router tests: every function driven through envelopes shaped as the Azure Functions host sends
//! them, with the real GitHub and Azure DevOps payloads from tests/fixtures, against both stores.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use deploychain_functions::adapters::RunStatus;
use deploychain_functions::adapters::memory::MemoryStore;
use deploychain_functions::adapters::sqlite::SqliteStore;
use deploychain_functions::links::{ApprovalLinks, Claims, artifact_digest};
use serde_json::{Value, json};
use std::sync::Arc;

const HELLO_COMMIT: &str = "6c62fb45fe66bfb1ea9a66abc38f6a0cc974292b"; // the registry fixture's revision label

#[tokio::test]
async fn a_new_branch_push_fixture_starts_a_run_that_knows_its_commits_and_their_authors() {
    for (name, store) in stores() {
        let mut h = Harness::new(store);
        // octokit's "push, with new branch": `created: true`, `before` all zeros, on hello's branch.
        let (status, res) = h.github_signed("push", &fixture("github/push.branch-created.with-new-branch.json")).await;
        assert_eq!(status, 202, "{name}: {res}");
        assert_eq!(res["run"], "hello-6113728f27ae");
        let ev = deploychain_events::DeployEvent::from_json_bytes(h.publisher.sent()[0].body.as_bytes()).unwrap();
        let deploychain_events::EventData::Push(p) = &ev.data else { panic!("{ev:?}") };
        assert_eq!(p.before.as_deref(), Some("0000000000000000000000000000000000000000"));
        assert_eq!(p.pusher_email.as_deref(), Some("21031067+Codertocat@users.noreply.github.com"));
        assert_eq!(p.commits.len(), 1);
        assert_eq!(p.commits[0].id, "6113728f27ae82c7b1a177c8d03f9e96e0adf246");
        assert_eq!(p.commits[0].message.as_deref(), Some("Initial commit"));
        assert_eq!(p.commits[0].author_login.as_deref(), Some("Codertocat"));
        assert_bodies_match_schemas(&h.publisher.sent());
        h.pump().await;
        let run = h.state.store.run("hello-6113728f27ae").await.unwrap().unwrap();
        assert_eq!(run.change.commits.len(), 1, "{name}: the run keeps who changed what");
        assert!(run.change.people().contains(&"codertocat".to_string()));
    }
}

#[tokio::test]
async fn every_function_of_the_handler_has_a_route() {
    use tower::ServiceExt;
    let h = Harness::new(Arc::new(MemoryStore::default()));
    for (function, _) in deploychain_functions::FUNCTIONS {
        // An envelope without data: the function answers (500 or a structured 200), never 404/405.
        let req = axum::http::Request::post(format!("/{function}"))
            .header("content-type", "application/json")
            .body(axum::body::Body::from(r#"{"Data":{},"Metadata":{}}"#))
            .unwrap();
        let status = h.router.clone().oneshot(req).await.unwrap().status().as_u16();
        assert!(status != 404 && status != 405, "/{function} answered {status}");
    }
    let req = axum::http::Request::post("/no_such_function").body(axum::body::Body::empty()).unwrap();
    assert_eq!(h.router.clone().oneshot(req).await.unwrap().status().as_u16(), 404, "the check can fail");
}

#[tokio::test]
async fn readiness_answers_on_root() {
    let h = Harness::new(Arc::new(MemoryStore::default()));
    use tower::ServiceExt;
    let rsp = h.router.clone().oneshot(axum::http::Request::get("/").body(axum::body::Body::empty()).unwrap()).await.unwrap();
    assert_eq!(rsp.status(), 200);
}

#[tokio::test]
async fn probot_push_fixture_starts_a_run_with_a_build_request() {
    for (name, store) in stores() {
        let mut h = Harness::new(store);
        let body = fixture("github/push.branch-updated.probot.json");
        let (status, res) = h.github_signed("push", &body).await;
        assert_eq!(status, 202, "{name}: {res}");
        let run = res["run"].as_str().unwrap().to_string();
        assert_eq!(run, "probot-738a951d2f3e".to_string().get(..).map(|_| run.clone()).unwrap());
        assert!(run.starts_with("probot-"));
        let sent = h.publisher.sent();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].subject, "dev.deploychain.push.v1");
        assert_eq!(sent[0].message_id, format!("{run}.push"));
        assert_eq!(sent[0].session_id.as_deref(), Some("probot"));
        assert_eq!(sent[0].properties["cloudEvents_type"], "dev.deploychain.push.v1");
        assert_eq!(sent[0].properties["cloudEvents_runid"], run);
        h.pump().await;
        assert_eq!(h.publisher.types(), vec!["push", "build.requested"], "{name}");
        assert_eq!(h.builds.requests.lock().unwrap().len(), 1);
        let r = h.state.store.run(&run).await.unwrap().unwrap();
        assert_eq!(r.status, RunStatus::Running);
        assert!(r.waiting_for.as_deref().unwrap().contains("build of"), "{:?}", r.waiting_for);
    }
}

#[tokio::test]
async fn forged_or_missing_signatures_get_401_and_publish_nothing() {
    let h = Harness::new(Arc::new(MemoryStore::default()));
    let body = fixture("github/push.branch-updated.probot.json");
    let (s, res) = h.github("push", &body, None).await;
    assert_eq!(s, 401, "{res}");
    let (s, _) = h.github("push", &body, Some("sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17")).await;
    assert_eq!(s, 401);
    let mut tampered = body.clone();
    let sig = sign(&body);
    tampered[10] ^= 1;
    let (s, _) = h.github("push", &tampered, Some(&sig)).await;
    assert_eq!(s, 401);
    let (s, _) = h.github("push", &body, Some("sha256=zz")).await;
    assert_eq!(s, 401);
    assert!(h.publisher.sent().is_empty());
}

#[tokio::test]
async fn tags_deletions_pings_and_unknown_pipelines_are_acknowledged_and_ignored() {
    let h = Harness::new(Arc::new(MemoryStore::default()));
    let (s, res) = h.github_signed("push", &fixture("github/push.tag-created.ghes-35.json")).await;
    assert_eq!(s, 202);
    assert!(res["ignored"].as_str().unwrap().contains("not a branch"), "{res}");
    let (s, res) = h.github_signed("push", &fixture("github/push.tag-deleted.json")).await;
    assert_eq!(s, 202);
    assert!(res["ignored"].is_string(), "{res}");
    let (s, res) = h.github_signed("ping", &fixture("github/ping.json")).await;
    assert_eq!(s, 200, "{res}");
    let (s, res) = h.github_signed("check_suite", &fixture("github/check_suite.completed.json")).await;
    assert_eq!(s, 202);
    assert!(res["ignored"].as_str().unwrap().contains("check_suite"), "{res}");
    // A branch no pipeline deploys, and a repository not in the policy: no run.
    let (s, res) = h.github_signed("push", &push_payload("bkeepers-inc/test", "main", "738a951d2f3e7c2b16cc5a0d6a2b1e7d9a1b2c3d")).await;
    assert_eq!(s, 202);
    assert!(res["ignored"].as_str().unwrap().contains("no run"), "{res}");
    let (s, res) = h.github_signed("push", &push_payload("someone/else", "main", "738a951d2f3e7c2b16cc5a0d6a2b1e7d9a1b2c3d")).await;
    assert_eq!(s, 202);
    assert!(res["ignored"].as_str().unwrap().contains("not in the pipeline policy"), "{res}");
    // workflow_run that is not completed.
    let (s, res) = h.github_signed("workflow_run", &fixture("github/workflow_run.requested.json")).await;
    assert_eq!(s, 202, "{res}");
    assert!(h.publisher.sent().is_empty());
    assert!(h.state.store.runs(&Default::default()).await.unwrap().is_empty());
}

#[tokio::test]
async fn malformed_and_oversized_webhooks_are_refused_and_change_nothing() {
    let h = Harness::with_max_body(Arc::new(MemoryStore::default()), 4096);
    let (s, res) = h.github_signed("push", b"{not json").await;
    assert_eq!(s, 400, "{res}");
    let big = vec![b' '; 5000];
    let (s, res) = h.github_signed("push", &big).await;
    assert_eq!(s, 413, "{res}");
    let (s, _, _) = h.ado(&big, Some(&basic(ADO_USER, ADO_SECRET))).await;
    assert_eq!(s, 413);
    let env = http_envelope("github_webhook", "GET", "hooks/github", &[], &[], &[], b"");
    let (s, _, _) = h.http("github_webhook", &env).await;
    assert_eq!(s, 400);
    assert!(h.publisher.sent().is_empty());
}

#[tokio::test]
async fn build_failure_finishes_the_run_as_failed_with_the_reason() {
    let mut h = Harness::new(Arc::new(MemoryStore::default()));
    let commit = "3484a3fb816e0859fd6e1cea078d76385ff50625"; // the workflow_run fixture's head_sha
    assert_eq!(h.github_signed("push", &push_payload("octo-org/octo-repo", "master", commit)).await.0, 202);
    h.pump().await;
    let mut p = fixture_json("github/workflow_run.completed.success.json");
    p["workflow_run"]["conclusion"] = json!("failure");
    let (s, res) = h.github_signed("workflow_run", &serde_json::to_vec(&p).unwrap()).await;
    assert_eq!(s, 202, "{res}");
    h.pump().await;
    assert_eq!(h.publisher.types(), vec!["push", "build.requested", "build.completed", "run.finished"]);
    let run = h.state.store.run("octo-3484a3fb816e").await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Failed);
    let last = run.steps.last().unwrap();
    assert!(last.detail.as_deref().unwrap().contains("failure"), "{last:?}");
    assert!(h.baker.requests.lock().unwrap().is_empty());
    let finished: Value = serde_json::from_str(&h.publisher.sent()[3].body).unwrap();
    assert_eq!(finished["data"]["outcome"], "failed");
    assert_bodies_match_schemas(&h.publisher.sent());
}

#[tokio::test]
async fn workflow_run_fixture_completes_the_build_and_requests_an_image() {
    let mut h = Harness::new(Arc::new(SqliteStore::in_memory().unwrap()));
    let commit = "3484a3fb816e0859fd6e1cea078d76385ff50625";
    h.github_signed("push", &push_payload("octo-org/octo-repo", "master", commit)).await;
    h.pump().await;
    let (s, res) = h.github_signed("workflow_run", &fixture("github/workflow_run.completed.success.json")).await;
    assert_eq!(s, 202, "{res}");
    h.pump().await;
    assert_eq!(h.publisher.types(), vec!["push", "build.requested", "build.completed", "image.requested"]);
    let req = h.baker.requests.lock().unwrap().clone();
    assert_eq!(req.len(), 1);
    assert_eq!(req[0].build_id, "289782451");
    let run = h.state.store.run("octo-3484a3fb816e").await.unwrap().unwrap();
    assert!(run.waiting_for.unwrap().starts_with("image of 3484a3fb816e"));
}

/// The happy path, push → production, for one app with three stages (one automatic promotion,
/// one quorum-of-two approval), then every message redelivered: nothing new happens.
#[tokio::test]
async fn push_to_production_and_duplicate_deliveries_publish_nothing_new() {
    for (name, store) in stores() {
        let mut h = Harness::new(store);
        assert_eq!(h.github_signed("push", &push_payload("Codertocat/Hello-World", "master", HELLO_COMMIT)).await.0, 202);
        h.pump().await;
        let wr = workflow_run_payload("Codertocat/Hello-World", "master", HELLO_COMMIT, ".github/workflows/build.yml", "success");
        assert_eq!(h.github_signed("workflow_run", &wr).await.0, 202);
        h.pump().await;
        // The real registry_package fixture: its revision label names the commit.
        let (s, res) = h.github_signed("registry_package", &fixture("github/registry_package.published.container.json")).await;
        assert_eq!(s, 202, "{name}: {res}");
        h.pump().await;
        let run_id = "hello-6c62fb45fe66";
        assert_eq!(
            h.publisher.types(),
            vec![
                "push",
                "build.requested",
                "build.completed",
                "image.requested",
                "image.ready",
                "deployment.started",
                "deployment.succeeded",
                "approval.decided",
                "deployment.started",
                "deployment.succeeded",
                "approval.requested",
                // its timeout, a scheduled message
                "approval.due"
            ],
            "{name}"
        );
        let timeout = h.publisher.sent().into_iter().find(|m| m.subject == "dev.deploychain.approval.due.v1").unwrap();
        assert_eq!(timeout.message_id, format!("{run_id}.approval-due.production.timeout.0"));
        let expires = h.state.store.approval(&format!("{run_id}.production")).await.unwrap().unwrap().expires_at;
        assert_eq!(timeout.scheduled_at.map(|t| t.timestamp()), Some(expires.timestamp()));
        let run = h.state.store.run(run_id).await.unwrap().unwrap();
        assert_eq!(run.status, RunStatus::Waiting);
        assert!(
            run.waiting_for.as_deref().unwrap().starts_with("approval of production by 2 of [alice@example.com, bob@example.com]"),
            "{:?}",
            run.waiting_for
        );
        let image = run.image.clone().unwrap();
        assert_eq!(image.id, "ghcr.io/codertocat/hello-world@sha256:3da1996a8115d7616457760d9920b815241d0a03b34cf5f04e9a0e9d8de37498");
        // Sessions serialize deploys per app and stage.
        let sessions: Vec<_> = h.publisher.sent().iter().map(|m| m.session_id.clone().unwrap()).collect();
        assert_eq!(sessions[4], "hello/staging");
        assert_eq!(sessions[7], "hello/canary");

        // Approvers get one link each; a GET never decides.
        let notice = h.notify.notices()[0].clone();
        assert_eq!(notice.links.len(), 2);
        let before = h.publisher.sent().len();
        let (s, _, page) = approval_call(&h, &notice.links[0].1, "GET", None).await;
        assert_eq!(s, 200);
        assert!(page.contains("Promote hello to production?") && page.contains(&image.id), "{page}");
        assert_eq!(h.publisher.sent().len(), before);
        assert!(h.state.store.approval(&notice.approval_id).await.unwrap().unwrap().votes.is_empty());

        // Alice approves: 1 of 2, still waiting. Bob approves: decided.
        let (s, _, _) = approval_call(&h, &notice.links[0].1, "POST", Some("decision=approve&comment=looks+good")).await;
        assert_eq!(s, 200);
        assert_eq!(h.types_since(before), ["approval.changed"], "one approval of a quorum of two: only the vote's audit event");
        let run = h.state.store.run(run_id).await.unwrap().unwrap();
        assert!(run.waiting_for.as_deref().unwrap().contains("1 given: alice@example.com"), "{:?}", run.waiting_for);
        let (s, _, _) = approval_call(&h, &notice.links[1].1, "POST", Some("decision=approve")).await;
        assert_eq!(s, 200);
        h.pump().await;
        let types = h.publisher.types();
        assert_eq!(
            &types[before..],
            ["approval.changed", "approval.changed", "approval.decided", "deployment.started", "deployment.succeeded", "run.finished"],
            "{name}"
        );
        let run = h.state.store.run(run_id).await.unwrap().unwrap();
        assert_eq!(run.status, RunStatus::Succeeded);
        assert_eq!(h.compute.current("/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg-hello/providers/Microsoft.Compute/virtualMachineScaleSets/hello-prod").unwrap().image, image);
        assert_eq!(h.compute.rollouts().len(), 3);
        let finished: Value = serde_json::from_str(&h.publisher.sent().last().unwrap().body).unwrap();
        assert_eq!(finished["data"]["outcome"], "succeeded");
        // Every event of the run is in one trace.
        let traces: std::collections::HashSet<String> =
            h.publisher.sent().iter().map(|m| m.properties["cloudEvents_traceparent"].split('-').nth(1).unwrap().to_string()).collect();
        assert_eq!(traces.len(), 1, "{traces:?}");

        assert_bodies_match_schemas(&h.publisher.sent());

        // Redeliver everything (as after a lost lock, or an operator replay): nothing new.
        let all = h.publisher.sent();
        let (rollouts, builds, notices) = (h.compute.rollouts().len(), h.builds.requests.lock().unwrap().len(), h.notify.notices().len());
        let steps = run.steps.len();
        for m in &all {
            if let Some(f) = subscriber(&m.subject) {
                let (s, v) = h.deliver(f, m, 2).await;
                assert_eq!(s, 200, "{v}");
            }
        }
        // A repeated webhook delivery maps to the same MessageId.
        h.github_signed("registry_package", &fixture("github/registry_package.published.container.json")).await;
        let again = h.publisher.sent();
        assert_eq!(again.len(), all.len() + 1);
        assert_eq!(again.last().unwrap().message_id, format!("{run_id}.image-ready"));
        assert_eq!(h.compute.rollouts().len(), rollouts);
        assert_eq!(h.builds.requests.lock().unwrap().len(), builds);
        assert_eq!(h.notify.notices().len(), notices);
        assert_eq!(h.state.store.run(run_id).await.unwrap().unwrap().steps.len(), steps);
        // And a second POST by an approver changes nothing.
        let (s, _, _) = approval_call(&h, &notice.links[1].1, "POST", Some("decision=reject")).await;
        assert_eq!(s, 409, "the run finished");
    }
}

/// Call an approval link as a browser would: a GET shows; a POST first reads the page's CSRF
/// value (as the page's form carries it) and sends it with the form.
async fn approval_call(h: &Harness, link: &str, method: &str, form: Option<&str>) -> (u16, serde_json::Map<String, Value>, String) {
    let form = match (method, form) {
        ("POST", Some(f)) => {
            let (_, _, page) = approval_request(h, link, "GET", None, &[("Accept", "application/json")]).await;
            let csrf = serde_json::from_str::<Value>(&page).ok().and_then(|v| v["csrf"].as_str().map(str::to_string)).unwrap_or_default();
            Some(format!("{f}&csrf={}", url::form_urlencoded::byte_serialize(csrf.as_bytes()).collect::<String>()))
        }
        (_, f) => f.map(str::to_string),
    };
    approval_request(h, link, method, form.as_deref(), &[]).await
}

/// One request to an approval link, exactly as given.
async fn approval_request(
    h: &Harness,
    link: &str,
    method: &str,
    form: Option<&str>,
    extra: &[(&str, &str)],
) -> (u16, serde_json::Map<String, Value>, String) {
    let u = url::Url::parse(link).unwrap();
    let id = u.path().trim_start_matches("/api/approvals/").to_string();
    let q: Vec<(String, String)> = u.query_pairs().map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
    let q: Vec<(&str, &str)> = q.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut headers = vec![("Accept", "text/html".to_string())];
    if form.is_some() {
        headers.push(("Content-Type", "application/x-www-form-urlencoded".to_string()));
    }
    for (k, v) in extra {
        headers.retain(|(h, _)| !h.eq_ignore_ascii_case(k));
        headers.push((k, v.to_string()));
    }
    let env =
        http_envelope("approval", method, &format!("approvals/{id}"), &q, &headers, &[("id", id.as_str())], form.unwrap_or("").as_bytes());
    h.http("approval", &env).await
}

/// The claims of a link, read back without trusting them (tests only).
fn claims_of(link: &str) -> Claims {
    use base64::Engine;
    let u = url::Url::parse(link).unwrap();
    let t = u.query_pairs().find(|(k, _)| k == "t").unwrap().1.into_owned();
    let body = t.split('.').nth(2).unwrap();
    serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(body).unwrap()).unwrap()
}

async fn to_waiting_for_approval(h: &mut Harness) -> deploychain_functions::adapters::ApprovalNotice {
    h.github_signed("push", &push_payload("Codertocat/Hello-World", "master", HELLO_COMMIT)).await;
    h.pump().await;
    h.github_signed(
        "workflow_run",
        &workflow_run_payload("Codertocat/Hello-World", "master", HELLO_COMMIT, ".github/workflows/build.yml", "success"),
    )
    .await;
    h.pump().await;
    h.github_signed("package", &fixture("github/package.published.container.json")).await;
    h.pump().await;
    h.notify.notices().pop().unwrap()
}

#[tokio::test]
async fn tampered_foreign_expired_and_unauthorized_links_decide_nothing() {
    let mut h = Harness::new(Arc::new(MemoryStore::default()));
    let notice = to_waiting_for_approval(&mut h).await;
    let before = h.publisher.sent().len();
    let good = notice.links[0].1.clone();
    let alice = claims_of(&good);
    assert_eq!(alice.approver, "alice@example.com");
    let links = &h.state.links;
    let in_an_hour = (chrono::Utc::now() + chrono::Duration::hours(1)).timestamp();
    let post = Some("decision=approve");

    // Tampered: one character of the claims changed.
    let t = url::Url::parse(&good).unwrap().query_pairs().find(|(k, _)| k == "t").unwrap().1.into_owned();
    let mut parts: Vec<String> = t.split('.').map(str::to_string).collect();
    let flipped = if parts[2].ends_with('A') { 'B' } else { 'A' };
    parts[2].pop();
    parts[2].push(flipped);
    let tampered = good.replace(&t, &parts.join("."));
    assert_eq!(approval_call(&h, &tampered, "POST", post).await.0, 401, "tampered token");
    // Signed with a key this app does not have (a wrong key id).
    let foreign = ApprovalLinks::new(b"some-other-signing-key-0123456789abcdef", &[], url::Url::parse("https://x.example").unwrap());
    let (s, _, body) = approval_call(&h, &foreign.link(&alice), "POST", post).await;
    assert_eq!(s, 401, "wrong key id");
    assert!(body.contains("no longer has"), "{body}");
    // Expired.
    let expired = links.link(&Claims { exp: chrono::Utc::now().timestamp() - 60, ..alice.clone() });
    assert_eq!(approval_call(&h, &expired, "POST", post).await.0, 410, "expired link");
    // Genuine links, but for another run, another stage, another artifact, another approval.
    for (what, c) in [
        ("another run", Claims { run: "hello-000000000000".into(), exp: in_an_hour, ..alice.clone() }),
        ("another stage", Claims { stage: "canary".into(), exp: in_an_hour, ..alice.clone() }),
        ("another artifact", Claims { artifact: artifact_digest("ghcr.io/codertocat/hello-world@sha256:0000"), ..alice.clone() }),
    ] {
        assert_eq!(approval_call(&h, &links.link(&c), "POST", post).await.0, 401, "{what}");
    }
    let other = links.link(&Claims { approval: "hello-000000000000.production".into(), run: "hello-000000000000".into(), ..alice.clone() });
    assert_eq!(approval_call(&h, &other, "POST", post).await.0, 404, "unknown approval");
    // A genuine link of someone the policy does not list.
    let mallory = links.link(&Claims { approver: "mallory@example.com".into(), ..alice.clone() });
    assert_eq!(approval_call(&h, &mallory, "POST", post).await.0, 403, "approver not in policy");
    // Alice's own link: a POST without the page's CSRF value, or from another site.
    assert_eq!(approval_request(&h, &good, "POST", Some("decision=approve"), &[]).await.0, 403, "no CSRF value");
    assert_eq!(approval_request(&h, &good, "POST", Some("decision=approve&csrf=AAAA"), &[]).await.0, 403, "wrong CSRF value");
    let (_, _, page) = approval_request(&h, &good, "GET", None, &[("Accept", "application/json")]).await;
    let csrf = serde_json::from_str::<Value>(&page).unwrap()["csrf"].as_str().unwrap().to_string();
    let form = format!("decision=approve&csrf={}", url::form_urlencoded::byte_serialize(csrf.as_bytes()).collect::<String>());
    assert_eq!(approval_request(&h, &good, "POST", Some(&form), &[("Sec-Fetch-Site", "cross-site")]).await.0, 403, "cross-site");
    // Signed in (App Service Authentication) as someone else.
    let principal = base64_json(&json!({ "auth_typ": "aad", "claims": [{ "typ": "preferred_username", "val": "bob@example.com" }] }));
    assert_eq!(approval_request(&h, &good, "POST", Some(&form), &[("X-MS-CLIENT-PRINCIPAL", &principal)]).await.0, 403, "wrong principal");
    assert_eq!(approval_call(&h, &good, "POST", Some("decision=maybe")).await.0, 400);
    // GET-only visits, as link scanners make, many times.
    for _ in 0..3 {
        let (s, _, page) = approval_call(&h, &good, "GET", None).await;
        assert_eq!(s, 200);
        assert!(page.contains("Approve") && page.contains("name=\"csrf\""), "{page}");
    }
    assert_eq!(h.publisher.sent().len(), before, "nothing was published");
    let record = h.state.store.approval(&notice.approval_id).await.unwrap().unwrap();
    assert!(record.votes.is_empty(), "nothing was recorded");

    // The same form, signed in as Alice, is taken.
    let principal = base64_json(&json!({ "auth_typ": "aad", "claims": [{ "typ": "preferred_username", "val": "Alice@Example.com" }] }));
    assert_eq!(approval_request(&h, &good, "POST", Some(&form), &[("X-MS-CLIENT-PRINCIPAL", &principal)]).await.0, 200);
    // Replays after the decision: the same decision shows it, the other one is refused.
    let (s, _, page) = approval_request(&h, &good, "POST", Some(&form), &[]).await;
    assert_eq!(s, 200);
    assert!(page.contains("You approved this already") || page.contains("Your decision is recorded: approved"), "{page}");
    assert_eq!(approval_call(&h, &good, "POST", Some("decision=reject")).await.0, 409, "reject after approve");
    let record = h.state.store.approval(&notice.approval_id).await.unwrap().unwrap();
    assert_eq!(record.votes.len(), 1);
    assert_eq!(h.types_since(before), ["approval.changed"], "one vote: its audit event, once, and no decision");
}

fn base64_json(v: &Value) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(v.to_string())
}

#[tokio::test]
async fn the_pusher_and_commit_authors_cannot_approve_their_release() {
    let mut h = Harness::new(Arc::new(MemoryStore::default()));
    // Bob wrote the commit this time.
    let mut p: Value = serde_json::from_slice(&push_payload("Codertocat/Hello-World", "master", HELLO_COMMIT)).unwrap();
    p["commits"][0]["author"]["email"] = json!("Bob@Example.com");
    h.github_signed("push", &serde_json::to_vec(&p).unwrap()).await;
    h.pump().await;
    h.github_signed(
        "workflow_run",
        &workflow_run_payload("Codertocat/Hello-World", "master", HELLO_COMMIT, ".github/workflows/build.yml", "success"),
    )
    .await;
    h.pump().await;
    h.github_signed("package", &fixture("github/package.published.container.json")).await;
    h.pump().await;
    let notice = h.notify.notices().pop().unwrap();
    assert_eq!(notice.links.iter().map(|l| l.0.as_str()).collect::<Vec<_>>(), ["alice@example.com"], "no link for Bob");
    let record = h.state.store.approval(&notice.approval_id).await.unwrap().unwrap();
    assert_eq!(record.excluded.len(), 1);
    assert_eq!(record.excluded[0].who, "bob@example.com");
    let run = h.state.store.run(&notice.run_id).await.unwrap().unwrap();
    assert!(run.waiting_for.as_deref().unwrap().contains("cannot reach its quorum"), "{:?}", run.waiting_for);
    // A genuine link for Bob (say, from before he wrote the commit) is refused.
    let bob = h.state.links.link(&Claims { approver: "bob@example.com".into(), ..claims_of(&notice.links[0].1) });
    let before = h.publisher.sent().len();
    let (s, _, body) = approval_call(&h, &bob, "POST", Some("decision=approve")).await;
    assert_eq!(s, 403);
    assert!(body.contains("no self-approval"), "{body}");
    assert_eq!(approval_call(&h, &bob, "GET", None).await.0, 403, "not even the page");
    assert_eq!(h.publisher.sent().len(), before);
    assert!(h.state.store.approval(&notice.approval_id).await.unwrap().unwrap().votes.is_empty());
    // The page shows Alice the commits, their author and why Bob cannot approve.
    let (_, _, page) = approval_call(&h, &notice.links[0].1, "GET", None).await;
    assert!(page.contains("Bob@Example.com") && page.contains("bob@example.com cannot approve"), "{page}");
}

#[tokio::test]
async fn a_rejection_ends_the_run_as_rejected() {
    let mut h = Harness::new(Arc::new(MemoryStore::default()));
    let notice = to_waiting_for_approval(&mut h).await;
    let (s, _, page) = approval_call(&h, &notice.links[1].1, "POST", Some("decision=reject&comment=not+on+a+Friday")).await;
    assert_eq!(s, 200, "{page}");
    h.pump().await;
    let run = h.state.store.run(&notice.run_id).await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Rejected);
    assert!(run.steps.last().unwrap().detail.as_deref().unwrap().contains("not on a Friday"));
    assert_eq!(h.compute.rollouts().len(), 2, "production untouched");
    assert_bodies_match_schemas(&h.publisher.sent());
}

#[tokio::test]
async fn azure_devops_fixtures_start_a_run_and_complete_its_build() {
    let mut h = Harness::new(Arc::new(SqliteStore::in_memory().unwrap()));
    let (s, hdr, res) = h.ado(&fixture("azure-devops/git.push.aspnet-webhooks.json"), None).await;
    assert_eq!(s, 401, "{res}");
    assert_eq!(hdr["WWW-Authenticate"], "Basic realm=\"deploychain\"");
    let (s, _, _) = h.ado(&fixture("azure-devops/git.push.aspnet-webhooks.json"), Some(&basic(ADO_USER, "wrong"))).await;
    assert_eq!(s, 401);
    assert!(h.publisher.sent().is_empty());

    let (s, _, res) = h.ado(&fixture("azure-devops/git.push.aspnet-webhooks.json"), Some(&basic(ADO_USER, ADO_SECRET))).await;
    assert_eq!(s, 202, "{res}");
    assert_eq!(res["runs"][0]["run"], "ado-c8e823a60a85");
    // build.complete (XAML era, UTF-8 BOM) reports commit 600c52d2…: start that run first.
    let mut push = fixture_json("azure-devops/git.push.aspnet-webhooks.json");
    push["resource"]["refUpdates"][0]["newObjectId"] = json!("600c52d2d5b655caa111abfd863e5a9bd304bb0e");
    h.ado(&serde_json::to_vec(&push).unwrap(), Some(&basic(ADO_USER, ADO_SECRET))).await;
    h.pump().await;
    let (s, _, res) = h.ado(&fixture("azure-devops/build.complete.aspnet-webhooks.json"), Some(&basic(ADO_USER, ADO_SECRET))).await;
    assert_eq!(s, 202, "{res}");
    h.pump().await;
    let run = h.state.store.run("ado-600c52d2d5b6").await.unwrap().unwrap();
    assert!(run.steps.iter().any(|s| s.name == "build succeeded"), "{:?}", run.steps);
    assert_eq!(h.baker.requests.lock().unwrap().len(), 1);
    let (s, _, res) =
        h.ado(&fixture("azure-devops/ms.vss-release.deployment-completed-event.json"), Some(&basic(ADO_USER, ADO_SECRET))).await;
    assert_eq!(s, 202);
    assert!(res["ignored"].is_string());
}

#[tokio::test]
async fn a_malformed_message_is_parked_at_once_with_a_reason() {
    let mut h = Harness::new(Arc::new(MemoryStore::default()));
    let props = Default::default();
    for (body, reason) in [(&b"{\"not\":\"a cloudevent\"}"[..], "MalformedEvent"), (&b"\xff\xfe binary junk"[..], "MalformedEvent")] {
        let env = bus_envelope("on_push", body, Some("poison-1"), 1, Some("dev.deploychain.push.v1"), None, &props, 1);
        let (s, v) = h.invoke("on_push", &env).await;
        assert_eq!(s, 200, "parked messages are completed, not retried: {v}");
        let parked = h.publisher.parked().pop().unwrap();
        assert_eq!(parked.reason, reason);
        assert_eq!(parked.function, "on_push");
        assert_eq!(parked.delivery_count, 1);
    }
    // A well-formed event of the wrong type on this subscription.
    h.github_signed("push", &fixture("github/push.branch-updated.probot.json")).await;
    let push = h.publisher.sent()[0].clone();
    let (s, _) = h.deliver("on_build_completed", &push, 1).await;
    assert_eq!(s, 200);
    assert!(h.publisher.parked().last().unwrap().description.contains("expected `dev.deploychain.build.completed.v1`"));
    // An event for a run nobody started.
    let mut ev: Value = serde_json::from_str(&push.body).unwrap();
    ev["type"] = json!("dev.deploychain.build.completed.v1");
    ev["data"] = json!({"app":"probot","provider":"github-actions","branch":"bkeepers-patch-3","commit":"738a951d2f3e","buildId":"1","outcome":"succeeded"});
    let env = bus_envelope("on_build_completed", ev.to_string().as_bytes(), Some("x.build-completed"), 1, None, None, &props, 2);
    h.invoke("on_build_completed", &env).await;
    assert_eq!(h.publisher.parked().last().unwrap().reason, "UnknownRun");
    // Other runs are unaffected.
    h.pump().await;
    assert_eq!(h.publisher.types(), vec!["push", "build.requested"]);
    // A body the host could not have sent with dataType binary: fail, keep the message.
    let bad = json!({"Data": {"msg": "\"{}\""}, "Metadata": {}});
    assert_eq!(h.invoke("on_push", &bad).await.0, 500);
}

#[tokio::test]
async fn a_bus_outage_fails_the_invocation_and_the_redelivery_finishes_the_step_once() {
    let mut h = Harness::new(Arc::new(SqliteStore::in_memory().unwrap()));
    h.github_signed("push", &fixture("github/push.branch-updated.probot.json")).await;
    let push = h.publisher.sent()[0].clone();
    h.delivered = 1;
    h.publisher.set_down(true);
    // The webhook answers 503 while the bus is down: GitHub will redeliver; nothing was accepted.
    let (s, _) = h.github_signed("push", &fixture("github/push.branch-updated.probot.json")).await;
    assert_eq!(s, 503);
    let (s, v) = h.deliver("on_push", &push, 1).await;
    assert_eq!(s, 500, "transient: the host abandons and the broker redelivers: {v}");
    h.publisher.set_down(false);
    let (s, v) = h.deliver("on_push", &push, 2).await;
    assert_eq!(s, 200, "{v}");
    assert!(v["Logs"][0].as_str().unwrap().contains("re-published"), "{v}");
    assert_eq!(h.publisher.types(), vec!["push", "build.requested"]);
    assert_eq!(h.builds.requests.lock().unwrap().len(), 1);
    let (s, v) = h.deliver("on_push", &push, 3).await;
    assert_eq!(s, 200);
    assert!(v["Logs"][0].as_str().unwrap().contains("duplicate"), "{v}");
    assert_eq!(h.publisher.sent().len(), 2);
}

#[tokio::test]
async fn runs_api_shows_steps_times_and_what_a_run_waits_for() {
    let mut h = Harness::new(Arc::new(SqliteStore::in_memory().unwrap()));
    let notice = to_waiting_for_approval(&mut h).await;
    let env = http_envelope("runs", "GET", &format!("runs/{}", notice.run_id), &[], &[], &[("id", notice.run_id.as_str())], b"");
    let (s, hdr, body) = h.http("runs", &env).await;
    assert_eq!(s, 200);
    assert!(hdr["Content-Type"].as_str().unwrap().starts_with("application/json"));
    let run: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(run["status"], "waiting");
    assert!(run["waitingFor"].as_str().unwrap().starts_with("approval of production"));
    let steps = run["steps"].as_array().unwrap();
    let whats: Vec<&str> = steps.iter().map(|s| s["what"].as_str().unwrap()).collect();
    assert_eq!(whats.first(), Some(&"push received"));
    assert!(whats.contains(&"deployed to staging") && whats.contains(&"deployed to canary"), "{whats:?}");
    assert!(steps.iter().all(|s| s["at"].as_str().is_some_and(|t| chrono::DateTime::parse_from_rfc3339(t).is_ok())));

    let env = http_envelope("runs", "GET", "runs", &[("commit", "6c62fb45")], &[], &[], b"");
    let (s, _, body) = h.http("runs", &env).await;
    assert_eq!(s, 200);
    let list: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(list["runs"].as_array().unwrap().len(), 1);
    let env = http_envelope("runs", "GET", "runs", &[("commit", "ffffffff")], &[], &[], b"");
    assert_eq!(serde_json::from_str::<Value>(&h.http("runs", &env).await.2).unwrap()["runs"].as_array().unwrap().len(), 0);
    let env = http_envelope("runs", "GET", "runs", &[("commit", "zz; drop")], &[], &[], b"");
    assert_eq!(h.http("runs", &env).await.0, 400);
    let env = http_envelope("runs", "GET", "runs/nope", &[], &[], &[("id", "nope")], b"");
    assert_eq!(h.http("runs", &env).await.0, 404);
}

#[tokio::test]
async fn an_older_run_never_replaces_a_newer_one() {
    let mut h = Harness::new(Arc::new(MemoryStore::default()));
    // Two pushes of the probot branch; the newer one deploys first, then the older one's image arrives.
    let old = "1111111111111111111111111111111111111111";
    let new = "2222222222222222222222222222222222222222";
    for c in [old, new] {
        h.github_signed("push", &push_payload("bkeepers-inc/test", "bkeepers-patch-3", c)).await;
        h.pump().await;
    }
    let image_for = |run: &str, v: &str| deploychain_events::DeployEvent {
        id: format!("{run}.image-ready"),
        source: "/deploychain/probot/image-builder".into(),
        time: chrono::Utc::now(),
        run_id: run.into(),
        trace: Default::default(),
        data: deploychain_events::EventData::ImageReady(deploychain_events::ImageReady {
            app: "probot".into(),
            commit: run.trim_start_matches("probot-").into(),
            image: deploychain_events::ImageRef {
                kind: deploychain_events::ImageKind::GalleryImageVersion,
                id: format!("/galleries/g/images/probot/versions/{v}"),
                version: Some(v.into()),
                digest: None,
            },
            branch: None,
        }),
    };
    for (run, v) in [("probot-222222222222", "1.0.2"), ("probot-111111111111", "1.0.1")] {
        let ev = image_for(run, v);
        let out = deploychain_functions::adapters::Outbound::from_event(&ev, Some("probot/staging".into()));
        let (s, _) = h.deliver("on_image_ready", &out, 1).await;
        assert_eq!(s, 200);
    }
    let older = h.state.store.run("probot-111111111111").await.unwrap().unwrap();
    assert_eq!(older.status, RunStatus::Superseded);
    assert!(older.steps.last().unwrap().detail.as_deref().unwrap().contains("newer run probot-222222222222"), "{:?}", older.steps);
    let target = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg-probot/providers/Microsoft.Compute/virtualMachineScaleSets/probot-staging";
    assert_eq!(h.compute.current(target).unwrap().run_id, "probot-222222222222");
}

#[tokio::test]
async fn the_watchdog_flags_a_run_stuck_at_its_build_once_and_says_so() {
    for (name, store) in stores() {
        let mut h = Harness::new(store);
        let (_, res) = h.github_signed("push", &fixture("github/push.branch-updated.probot.json")).await;
        let run = res["run"].as_str().unwrap().to_string();
        h.pump().await;
        // Not stuck yet: the build was requested just now.
        assert_eq!(h.tick_watchdog().await.0, 200);
        assert!(h.notify.stuck().is_empty(), "{name}");
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        let (status, answer) = h.tick_watchdog().await;
        assert_eq!(status, 200, "{answer}");
        assert!(answer["Logs"].to_string().contains(&run), "{answer}");
        let stuck = h.notify.stuck();
        assert_eq!(stuck.len(), 1, "{name}");
        assert_eq!((stuck[0].run_id.as_str(), stuck[0].kind.as_str()), (run.as_str(), "build"));
        // The next tick does not flag the same wait again.
        h.tick_watchdog().await;
        assert_eq!(h.notify.stuck().len(), 1, "{name}: flagged once");
        let r = h.state.store.run(&run).await.unwrap().unwrap();
        assert_eq!(r.status, RunStatus::Running, "{name}: the watchdog changes no state");
        assert_eq!(r.steps.last().unwrap().name, "stuck at build");
        let env = http_envelope("runs", "GET", &format!("runs/{run}"), &[], &[], &[("id", &run)], b"");
        let (_, _, body) = h.http("runs", &env).await;
        let w = &serde_json::from_str::<Value>(&body).unwrap()["waiting"];
        assert_eq!((w["kind"].as_str(), w["stuck"].as_bool()), (Some("build"), Some(true)), "{name}: {w}");
        assert_eq!(w["on"], json!(["GitHub Actions"]));
        assert!(w["text"].as_str().unwrap().contains("STUCK"), "{w}");
        // Progress clears it: the build completes, and a later wait is judged afresh.
        assert!(h.publisher.sent().iter().all(|m| !m.subject.contains("stuck")), "nothing on the bus");
    }
}

/// A starting handler answers the host's readiness probe at once, and holds invocations until
/// its adapters are built; then they reach the functions as usual.
#[tokio::test]
async fn a_starting_handler_is_ready_at_once_and_holds_invocations_until_built() {
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;
    let (ready, routes) = tokio::sync::watch::channel(None);
    let front = deploychain_functions::starting(routes);
    let probe = front.clone().oneshot(Request::get("/").body(Body::empty()).unwrap()).await.unwrap();
    assert_eq!(probe.status(), 200);

    let h = Harness::new(Arc::new(MemoryStore::default()));
    let body = fixture("github/ping.json");
    let env = http_envelope(
        "github_webhook",
        "POST",
        "hooks/github",
        &[],
        &[("Content-Type", "application/json".to_string()), ("X-GitHub-Event", "ping".to_string()), ("X-Hub-Signature-256", sign(&body))],
        &[],
        &body,
    );
    let req = Request::post("/github_webhook").header("content-type", "application/json").body(Body::from(env.to_string())).unwrap();
    let held = tokio::spawn(front.oneshot(req));
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert!(!held.is_finished(), "the invocation waits for the adapters");
    ready.send(Some(h.router.clone())).unwrap();
    let rsp = tokio::time::timeout(std::time::Duration::from_secs(5), held).await.unwrap().unwrap().unwrap();
    assert_eq!(rsp.status(), 200);
    let bytes = http_body_util::BodyExt::collect(rsp.into_body()).await.unwrap().to_bytes();
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(v["Outputs"]["res"]["statusCode"], 200, "{v}");
}
