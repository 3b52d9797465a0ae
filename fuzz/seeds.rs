//! Writes the fuzz targets' seed corpora from the project's real fixtures, through real code:
//! GitHub's webhook payloads as the local Functions host wraps them, the CloudEvents the handler
//! publishes for them, the Service Bus trigger envelopes the host would deliver those in (several
//! steps down the chain), a real approval token, and the shipped policy.
//! `seeds <repo root> <corpus dir>`; run by `scripts/fuzz.sh`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use deploychain::host::app::BusTrigger;
use deploychain::host::envelope::bus_envelope;
use deploychain_fuzz::*;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Which function takes an event type from the bus (the subscriptions' rules, infra/servicebus.json).
const TAKEN_BY: [(&str, &str); 7] = [
    ("dev.deploychain.push.v1", "on_push"),
    ("dev.deploychain.build.completed.v1", "on_build_completed"),
    ("dev.deploychain.image.due.v1", "on_image_due"),
    ("dev.deploychain.image.ready.v1", "on_image_ready"),
    ("dev.deploychain.deployment.due.v1", "on_deployment_due"),
    ("dev.deploychain.approval.decided.v1", "on_approval"),
    ("dev.deploychain.approval.due.v1", "on_approval_due"),
];

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

/// The function's trigger binding as its function.json declares it.
fn trigger(repo: &Path, function: &str) -> BusTrigger {
    let f: Value = serde_json::from_slice(&std::fs::read(repo.join("functions").join(function).join("function.json")).unwrap()).unwrap();
    let b = f["bindings"].as_array().unwrap().iter().find(|b| b["direction"] == "in").unwrap();
    BusTrigger {
        binding: b["name"].as_str().unwrap().to_string(),
        entity: format!("deploychain-events/subscriptions/{}", b["subscriptionName"].as_str().unwrap_or_default()),
        binary: b["dataType"] == "binary",
        sessions: b["isSessionsEnabled"].as_bool().unwrap_or(false),
        auto_complete: true,
        connection: "ServiceBusConnection".into(),
    }
}

fn main() {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [repo, out] = &args[..] else { panic!("usage: seeds <repo root> <corpus dir>") };
    let fixtures = repo.join("tests/fixtures/github");
    let envelope_selector = |f: &str| -> u8 { ENVELOPE_FUNCTIONS.iter().position(|x| *x == f).unwrap() as u8 };
    let h = handler();
    let mut n = 0;
    let mut paths: Vec<_> = std::fs::read_dir(&fixtures).unwrap().map(|e| e.unwrap().path()).collect();
    paths.sort();
    // Pushes first and the chain they start, then the CI and registry reports that follow them.
    let (pushes, others): (Vec<_>, Vec<_>) =
        paths.into_iter().partition(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("push")));
    let mut delivered = 0;
    for pass in [pushes, others] {
        for path in pass {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let event = name.split('.').next().unwrap().to_string();
            let body = std::fs::read(&path).unwrap();
            let selector = WEBHOOK_EVENTS.iter().position(|e| *e == event).unwrap_or(2) as u8;
            write(&out.join("webhook"), &name, &[&[selector][..], &body].concat());
            let signature = github_signature(&body);
            let env = github_envelope(&event, signature, body);
            write(&out.join("envelope"), &name, &[&[envelope_selector("github_webhook")][..], &env].concat());
            invoke(&h, "github_webhook", env);
        }
        // Deliver what was published, as the host would, a few steps down the chain.
        for _round in 0..6 {
            let sent = h.published.sent();
            for m in &sent[delivered..] {
                n += 1;
                write(&out.join("cloudevent"), &format!("{n:03}-{}", m.subject), m.body.as_bytes());
                let Some((_, function)) = TAKEN_BY.iter().find(|(t, _)| *t == m.subject) else { continue };
                let msg = deploychain_bus::Message {
                    sequence_number: n,
                    message_id: m.message_id.clone(),
                    session_id: m.session_id.clone(),
                    label: Some(m.subject.clone()),
                    content_type: Some(m.content_type.clone()),
                    correlation_id: None,
                    reply_to: None,
                    to: None,
                    properties: m.properties.iter().map(|(k, v)| (k.clone(), Value::from(v.clone()))).collect(),
                    body: m.body.clone().into_bytes(),
                    enqueued_at: chrono::Utc::now(),
                    expires_at: None,
                    delivery_count: 1,
                    lock_token: Some(uuid::Uuid::new_v4()),
                    locked_until: None,
                    dead_letter_source: None,
                    reply_to_session_id: None,
                    time_to_live: None,
                    scheduled_enqueue_time: None,
                };
                let env = serde_json::to_vec(&bus_envelope(function, &trigger(repo, function), &msg, "deploychain")).unwrap();
                write(&out.join("envelope"), &format!("{n:03}-{function}"), &[&[envelope_selector(function)][..], &env].concat());
                invoke(&h, function, env);
            }
            delivered = sent.len();
        }
    }
    write(&out.join("approval_token"), "real", &[&[0u8][..], real_token().as_bytes()].concat());
    write(&out.join("approval_token"), "edit", &[1u8, 0, b'x']);
    for (name, text) in [("shipped.toml", std::fs::read(repo.join("policy.toml")).unwrap()), ("fuzz.toml", POLICY.as_bytes().to_vec())] {
        write(&out.join("policy"), name, &text);
    }
    println!("seeds: {n} published events written as CloudEvent and envelope seeds");
}
