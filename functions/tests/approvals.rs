//! An approval's life beyond the votes: quorum of distinct people, reminders and timeouts as
//! Service Bus scheduled messages, the timeout's default action (reject, approve, escalate), and
//! a newer build superseding a pending approval — each through the router, as the host delivers.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use deploychain_functions::adapters::memory::MemoryStore;
use deploychain_functions::adapters::{Closed, NoticeKind, RunStatus};
use serde_json::{Value, json};
use std::sync::Arc;

/// The hello app of the fixtures, with production's approval rule as given.
fn policy(approval: &str) -> String {
    format!(
        r#"
[groups]
release-managers = ["alice@example.com", "bob@example.com", "carol@example.com"]
oncall = ["dave@example.com", "erin@example.com"]

[[app]]
name = "hello"
source = {{ github = "Codertocat/Hello-World" }}
branches = ["master"]
build = {{ provider = "github-actions", pipeline = "build.yml" }}
image = {{ source = "registry", destination = "ghcr.io/codertocat/hello-world" }}
[[app.stage]]
name = "staging"
target = "/subscriptions/0/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/hello-staging"
[[app.stage]]
name = "production"
target = "/subscriptions/0/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/hello-prod"
approval = {approval}
"#
    )
}

/// Push `commit`, build it, publish its image (the registry fixture, relabelled): the run waits
/// for production's approval. Returns the run id.
async fn to_approval(h: &mut Harness, commit: &str) -> String {
    let mut push = fixture_json("github/push.branch-updated.probot.json");
    push["repository"]["full_name"] = json!("Codertocat/Hello-World");
    push["ref"] = json!("refs/heads/master");
    push["after"] = json!(commit);
    push["head_commit"]["id"] = json!(commit);
    push["commits"][0]["id"] = json!(commit);
    let (s, v) = h.github_signed("push", &serde_json::to_vec(&push).unwrap()).await;
    assert_eq!(s, 202, "{v}");
    h.pump().await;
    let wr = workflow_run_payload("Codertocat/Hello-World", "master", commit, ".github/workflows/build.yml", "success");
    assert_eq!(h.github_signed("workflow_run", &wr).await.0, 202);
    h.pump().await;
    let mut pkg = fixture_json("github/registry_package.published.container.json");
    let digest = format!("sha256:{}", "ab".repeat(16) + &commit[..32]);
    let pv = &mut pkg["registry_package"]["package_version"];
    pv["name"] = json!(digest);
    pv["version"] = json!(digest);
    pv["container_metadata"]["manifest"]["digest"] = json!(digest);
    pv["container_metadata"]["tag"]["digest"] = json!(digest);
    pv["container_metadata"]["labels"]["revision"] = json!(commit);
    if pv["container_metadata"]["labels"]["all_labels"].is_object() {
        pv["container_metadata"]["labels"]["all_labels"]["org.opencontainers.image.revision"] = json!(commit);
    }
    let (s, v) = h.github_signed("registry_package", &serde_json::to_vec(&pkg).unwrap()).await;
    assert_eq!(s, 202, "{v}");
    h.pump().await;
    let run = format!("hello-{}", &commit[..12]);
    assert_eq!(h.state.store.run(&run).await.unwrap().unwrap().status, RunStatus::Waiting, "{run} waits for approval");
    run
}

const A: &str = "6c62fb45fe66bfb1ea9a66abc38f6a0cc974292b";
const B: &str = "7d73fc56ff77c0c2fb0b77bcd49f7b1dd085303c";

fn link_of(h: &Harness, approver: &str) -> String {
    h.notify.notices().iter().rev().flat_map(|n| n.links.clone()).find(|(a, _)| a == approver).unwrap().1
}

async fn post(h: &Harness, link: &str, decision: &str) -> u16 {
    let u = url::Url::parse(link).unwrap();
    let id = u.path().trim_start_matches("/api/approvals/").to_string();
    let t = u.query_pairs().find(|(k, _)| k == "t").unwrap().1.into_owned();
    let q = [("t", t.as_str())];
    let get =
        http_envelope("approval", "GET", &format!("approvals/{id}"), &q, &[("Accept", "application/json".into())], &[("id", &id)], b"");
    let (_, _, page) = h.http("approval", &get).await;
    let csrf = serde_json::from_str::<Value>(&page).ok().and_then(|v| v["csrf"].as_str().map(str::to_string)).unwrap_or_default();
    let body = json!({ "decision": decision, "csrf": csrf }).to_string();
    let env = http_envelope(
        "approval",
        "POST",
        &format!("approvals/{id}"),
        &q,
        &[("Content-Type", "application/json".into())],
        &[("id", &id)],
        body.as_bytes(),
    );
    h.http("approval", &env).await.0
}

#[tokio::test]
async fn a_quorum_of_two_needs_two_distinct_approvers_of_a_group() {
    for (name, store) in stores() {
        let mut h = Harness::with_policy(store, &policy(r#"{ approvers = ["group:release-managers"], quorum = 2 }"#));
        let run = to_approval(&mut h, A).await;
        let notice = h.notify.notices().pop().unwrap();
        assert_eq!(notice.links.len(), 3, "{name}: the group's three members each get a link");
        assert_eq!(post(&h, &link_of(&h, "alice@example.com"), "approve").await, 200);
        assert_eq!(post(&h, &link_of(&h, "alice@example.com"), "approve").await, 200, "{name}: a second click shows the decision");
        h.pump().await;
        assert_eq!(h.state.store.run(&run).await.unwrap().unwrap().status, RunStatus::Waiting, "{name}: one person is not two");
        assert_eq!(h.compute.rollouts().len(), 1, "{name}: production not touched yet");
        assert_eq!(post(&h, &link_of(&h, "carol@example.com"), "approve").await, 200);
        h.pump().await;
        assert_eq!(h.state.store.run(&run).await.unwrap().unwrap().status, RunStatus::Succeeded, "{name}");
        assert_eq!(h.compute.rollouts().len(), 2, "{name}: promoted once");
        // Bob comes late: the approval is decided, his vote is refused and changes nothing.
        assert_eq!(post(&h, &link_of(&h, "bob@example.com"), "reject").await, 409, "{name}");
        let decided: Vec<_> = h.publisher.sent().into_iter().filter(|m| m.subject == "dev.deploychain.approval.decided.v1").collect();
        assert_eq!(decided.len(), 1, "{name}: decided exactly once");
        assert_bodies_match_schemas(&h.publisher.sent());
    }
}

#[tokio::test]
async fn reminders_go_to_who_has_not_decided_and_the_timeout_rejects_by_default() {
    for (name, store) in stores() {
        let mut h = Harness::with_policy(
            store,
            &policy(
                r#"{ approvers = ["alice@example.com", "bob@example.com"], quorum = 2, expires_after = "24h", remind_before = ["4h", "1h"] }"#,
            ),
        );
        let run = to_approval(&mut h, A).await;
        let timers: Vec<_> = h.publisher.sent().into_iter().filter(|m| m.subject == "dev.deploychain.approval.due.v1").collect();
        assert_eq!(timers.len(), 3, "{name}: two reminders and the timeout");
        let record = h.state.store.approval(&format!("{run}.production")).await.unwrap().unwrap();
        let at: Vec<i64> = timers.iter().map(|m| m.scheduled_at.unwrap().timestamp()).collect();
        let exp = record.expires_at.timestamp();
        assert_eq!(at, [exp - 4 * 3600, exp - 3600, exp], "{name}: scheduled before the timeout, then at it");
        assert_eq!(post(&h, &link_of(&h, "alice@example.com"), "approve").await, 200);

        let notices = h.notify.notices().len();
        assert_eq!(h.fire_timers("reminder.0.14400").await, 1);
        let reminder = h.notify.notices().pop().unwrap();
        assert_eq!(h.notify.notices().len(), notices + 1);
        assert_eq!(reminder.kind, NoticeKind::Reminder);
        assert_eq!(
            reminder.links.iter().map(|l| l.0.as_str()).collect::<Vec<_>>(),
            ["bob@example.com"],
            "{name}: only who has not decided"
        );
        // The same timer delivered again (a redelivery) reminds nobody twice.
        h.fire_timers("reminder.0.14400").await;
        assert_eq!(h.notify.notices().len(), notices + 1, "{name}");

        h.fire_timers("timeout.0").await;
        let r = h.state.store.run(&run).await.unwrap().unwrap();
        assert_eq!(r.status, RunStatus::Rejected, "{name}: {r:?}");
        assert_eq!(h.compute.rollouts().len(), 1, "{name}: production untouched");
        let record = h.state.store.approval(&format!("{run}.production")).await.unwrap().unwrap();
        assert!(matches!(&record.closed, Some(Closed::TimedOut { action, .. }) if action == "reject"), "{name}");
        let audit: Vec<&str> = record.audit.iter().map(|a| a.what.as_str()).collect();
        assert_eq!(audit, ["requested", "approved", "reminded", "timed-out"], "{name}");
        // A late vote changes nothing.
        assert_eq!(post(&h, &link_of(&h, "bob@example.com"), "approve").await, 409, "{name}");
        let changes: Vec<String> = h
            .publisher
            .sent()
            .iter()
            .filter(|m| m.subject == "dev.deploychain.approval.changed.v1")
            .map(|m| serde_json::from_str::<Value>(&m.body).unwrap()["data"]["change"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(changes, ["voted", "reminded", "expired"], "{name}: every vote, reminder and expiry is an event");
        assert_bodies_match_schemas(&h.publisher.sent());
    }
}

#[tokio::test]
async fn a_timeout_can_approve_or_escalate_once() {
    // approve
    let mut h = Harness::with_policy(
        Arc::new(MemoryStore::default()),
        &policy(r#"{ approvers = ["alice@example.com"], expires_after = "1h", on_timeout = "approve" }"#),
    );
    let run = to_approval(&mut h, A).await;
    h.fire_timers("timeout.0").await;
    assert_eq!(h.state.store.run(&run).await.unwrap().unwrap().status, RunStatus::Succeeded);
    assert_eq!(h.compute.rollouts().len(), 2, "promoted by the timeout's default action");

    // escalate, then a second timeout rejects
    let mut h = Harness::with_policy(
        Arc::new(MemoryStore::default()),
        &policy(r#"{ approvers = ["alice@example.com"], expires_after = "1h", on_timeout = "escalate", escalate_to = ["group:oncall"] }"#),
    );
    let run = to_approval(&mut h, A).await;
    let first = h.state.store.approval(&format!("{run}.production")).await.unwrap().unwrap();
    h.fire_timers("timeout.0").await;
    let esc = h.notify.notices().pop().unwrap();
    assert_eq!(esc.kind, NoticeKind::Escalation);
    assert_eq!(esc.links.iter().map(|l| l.0.as_str()).collect::<Vec<_>>(), ["dave@example.com", "erin@example.com"]);
    let record = h.state.store.approval(&format!("{run}.production")).await.unwrap().unwrap();
    assert!(record.escalated && record.expires_at > first.expires_at);
    assert_eq!(h.state.store.run(&run).await.unwrap().unwrap().status, RunStatus::Waiting);
    // Alice's old link no longer decides; the old round's timer does nothing.
    assert_eq!(post(&h, &link_of(&h, "alice@example.com"), "approve").await, 403);
    h.fire_timers("timeout.0").await;
    assert_eq!(h.state.store.run(&run).await.unwrap().unwrap().status, RunStatus::Waiting);
    h.fire_timers("timeout.1").await;
    assert_eq!(h.state.store.run(&run).await.unwrap().unwrap().status, RunStatus::Rejected, "the second timeout rejects");
    assert_bodies_match_schemas(&h.publisher.sent());
}

#[tokio::test]
async fn a_newer_build_supersedes_a_pending_approval_and_its_links_decide_nothing() {
    for (name, store) in stores() {
        let mut h = Harness::with_policy(store, &policy(r#"{ approvers = ["alice@example.com", "bob@example.com"] }"#));
        let older = to_approval(&mut h, A).await;
        let old_link = link_of(&h, "alice@example.com");
        let newer = to_approval(&mut h, B).await;
        let o = h.state.store.run(&older).await.unwrap().unwrap();
        assert_eq!(o.status, RunStatus::Superseded, "{name}");
        assert!(o.steps.iter().any(|s| s.detail.as_deref().is_some_and(|d| d.contains(&newer))), "{name}: {:?}", o.steps);
        let rec = h.state.store.approval(&format!("{older}.production")).await.unwrap().unwrap();
        assert!(matches!(&rec.closed, Some(Closed::Superseded { by_run, .. }) if *by_run == newer), "{name}");
        // The old link shows "superseded" and decides nothing.
        let before = h.publisher.sent().len();
        assert_eq!(post(&h, &old_link, "approve").await, 409, "{name}");
        let u = url::Url::parse(&old_link).unwrap();
        let id = u.path().trim_start_matches("/api/approvals/").to_string();
        let t = u.query_pairs().find(|(k, _)| k == "t").unwrap().1.into_owned();
        let env = http_envelope(
            "approval",
            "GET",
            &format!("approvals/{id}"),
            &[("t", &t)],
            &[("Accept", "text/html".into())],
            &[("id", &id)],
            b"",
        );
        let (s, _, page) = h.http("approval", &env).await;
        assert_eq!(s, 200);
        assert!(page.contains("superseded by run") && !page.contains("name=\"csrf\""), "{name}: {page}");
        assert_eq!(h.publisher.sent().len(), before, "{name}: nothing published");
        // The older run's timers do nothing now; the newer run is approved as usual.
        h.fire_timers(&format!("{older}.approval-due")).await;
        assert_eq!(post(&h, &link_of(&h, "alice@example.com"), "approve").await, 200);
        h.pump().await;
        assert_eq!(h.state.store.run(&newer).await.unwrap().unwrap().status, RunStatus::Succeeded, "{name}");
        let superseded: Vec<_> = h
            .publisher
            .sent()
            .into_iter()
            .filter(|m| m.subject == "dev.deploychain.approval.changed.v1" && m.body.contains("\"superseded\""))
            .collect();
        assert_eq!(superseded.len(), 1, "{name}: the supersede is an event");
        assert_bodies_match_schemas(&h.publisher.sent());
    }
}

#[tokio::test]
async fn a_state_file_from_before_the_open_approval_index_still_supersedes() {
    use deploychain_functions::adapters::sqlite::SqliteStore;
    let dir = std::env::temp_dir().join(format!("deploychain-approvals-upgrade-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let file = dir.join("state.sqlite");
    let policy = policy(r#"{ approvers = ["alice@example.com", "bob@example.com"] }"#);
    let older = {
        let mut h = Harness::with_policy(Arc::new(SqliteStore::open(&file).unwrap()), &policy);
        to_approval(&mut h, A).await
    };
    // What the file looked like before: approvals were (id, doc) only.
    {
        let c = rusqlite::Connection::open(&file).unwrap();
        c.execute_batch(
            "DROP INDEX approvals_open; ALTER TABLE approvals DROP COLUMN open;
             ALTER TABLE approvals DROP COLUMN stage; ALTER TABLE approvals DROP COLUMN app;",
        )
        .unwrap();
    }
    let mut h = Harness::with_policy(Arc::new(SqliteStore::open(&file).unwrap()), &policy);
    let newer = to_approval(&mut h, B).await;
    assert_eq!(h.state.store.run(&older).await.unwrap().unwrap().status, RunStatus::Superseded);
    let open = h.state.store.open_approvals("hello", "production").await.unwrap();
    assert_eq!(open.iter().map(|a| a.run_id.as_str()).collect::<Vec<_>>(), [newer.as_str()], "only the newer run's is open");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_waiting_run_says_on_whom_and_since_when() {
    let mut h = Harness::with_policy(
        Arc::new(MemoryStore::default()),
        &policy(r#"{ approvers = ["group:release-managers"], quorum = 2, expires_after = "24h" }"#),
    );
    let run = to_approval(&mut h, A).await;
    assert_eq!(post(&h, &link_of(&h, "alice@example.com"), "approve").await, 200);
    let env = http_envelope("runs", "GET", &format!("runs/{run}"), &[], &[], &[("id", &run)], b"");
    let (s, _, body) = h.http("runs", &env).await;
    assert_eq!(s, 200);
    let w = &serde_json::from_str::<Value>(&body).unwrap()["waiting"];
    assert_eq!(w["kind"], "approval");
    assert_eq!(w["for"], "1 more approval of production");
    assert_eq!(w["on"], json!(["bob@example.com", "carol@example.com"]), "who has not decided");
    assert!(w["expiresIn"].as_str().unwrap().starts_with("23h"), "{w}");
    let text = w["text"].as_str().unwrap();
    assert!(
        text.starts_with("waiting for 1 more approval of production — from bob@example.com, carol@example.com, ")
            && text.contains("so far, expires in 23h"),
        "{text}"
    );
}

/// The approval function stores the vote, then commits its step (entry, events, `approval.decided`);
/// a request that dies in between leaves a vote the page shows but nothing said (found by the
/// fault soak: the run waited for ever). A second click commits it; the watchdog does too.
#[tokio::test]
async fn a_vote_stored_by_a_request_that_died_is_committed_by_a_second_click_or_the_watchdog() {
    use deploychain_events::Decision;
    use deploychain_functions::adapters::Vote;
    for (name, store) in stores() {
        // Quorum 2: alice's stored vote, her second click.
        let mut h = Harness::with_policy(store.clone(), &policy(r#"{ approvers = ["group:release-managers"], quorum = 2 }"#));
        let run = to_approval(&mut h, A).await;
        let id = format!("{run}.production");
        let alice = Vote { approver: "alice@example.com".into(), decision: Decision::Approved, at: chrono::Utc::now(), comment: None };
        h.state.store.vote(&id, &alice).await.unwrap();
        let voted = |h: &Harness, who: &str| {
            h.publisher.sent().iter().filter(|m| m.subject == "dev.deploychain.approval.changed.v1" && m.body.contains(who)).count()
        };
        assert_eq!(voted(&h, "alice@example.com"), 0, "{name}: the request died: nothing said");
        assert_eq!(post(&h, &link_of(&h, "alice@example.com"), "approve").await, 200, "{name}");
        assert_eq!(voted(&h, "alice@example.com"), 1, "{name}: the second click committed the vote");

        // Quorum 1: the deciding vote stored, nobody clicks again; the watchdog's next tick.
        let mut h = Harness::with_policy(store, &policy(r#"{ approvers = ["alice@example.com", "bob@example.com"] }"#));
        let run = to_approval(&mut h, B).await;
        let id = format!("{run}.production");
        let bob =
            Vote { approver: "bob@example.com".into(), decision: Decision::Approved, at: chrono::Utc::now(), comment: Some("ship".into()) };
        h.state.store.vote(&id, &bob).await.unwrap();
        h.pump().await;
        assert_eq!(h.state.store.run(&run).await.unwrap().unwrap().status, RunStatus::Waiting, "{name}: nothing said, the run waits");
        let (status, v) = h.tick_watchdog().await;
        assert_eq!(status, 200, "{name}: {v}");
        assert!(
            v["ReturnValue"].to_string().contains("committed stored votes") || v.to_string().contains("committed stored votes"),
            "{name}: {v}"
        );
        h.pump().await;
        let r = h.state.store.run(&run).await.unwrap().unwrap();
        assert_eq!(r.status, RunStatus::Succeeded, "{name}: promoted on bob's decision: {:?}", r.steps);
        let decided: Vec<_> =
            h.publisher.sent().into_iter().filter(|m| m.message_id == format!("{run}.approval-decided.production")).collect();
        assert_eq!(decided.len(), 1, "{name}");
        assert!(decided[0].body.contains("bob@example.com") && decided[0].body.contains("ship"), "{name}: {}", decided[0].body);
        // The next tick finds nothing to do.
        let before = h.publisher.sent().len();
        let (status, v) = h.tick_watchdog().await;
        assert_eq!(status, 200, "{name}");
        assert!(!v.to_string().contains("committed stored votes"), "{name}: {v}");
        assert_eq!(h.publisher.sent().len(), before, "{name}");
    }
}
