//! The broker's Service Bus semantics through the Rust API (the local Functions host's contract).
#![allow(clippy::unwrap_used)]

mod common;

use chrono::Utc;
use common::*;
use deploychain_bus::{Broker, BrokerOptions, BusError, NewMessage, SendOutcome};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

fn seqs(o: SendOutcome) -> Vec<i64> {
    match o {
        SendOutcome::Enqueued(s) => s,
        SendOutcome::Duplicate => panic!("unexpected duplicate"),
    }
}

async fn drain_bodies(b: &Broker, p: &deploychain_bus::EntityPath) -> Vec<String> {
    let mut out = Vec::new();
    while let Some(m) = b.receive_and_delete(p, NOW).await.unwrap() {
        out.push(text(&m));
    }
    out
}

#[tokio::test]
async fn a_topic_send_is_copied_to_every_subscription_whose_filter_matches() {
    let b = memory();
    let push = NewMessage { label: Some("push".into()), ..msg("p") };
    assert_eq!(seqs(b.send("events", push).await.unwrap()).len(), 3, "push, all, norules");

    let web = NewMessage { label: Some("other".into()), properties: BTreeMap::from([("app".into(), json!("web"))]), ..msg("w") };
    assert_eq!(seqs(b.send("events", web).await.unwrap()).len(), 3, "all, norules, prod-or-web (first rule)");

    let prod = NewMessage { label: Some("build".into()), properties: BTreeMap::from([("env".into(), json!("prod"))]), ..msg("b") };
    assert_eq!(seqs(b.send("events", prod).await.unwrap()).len(), 3, "all, norules, prod-or-web (second rule)");

    let staging = NewMessage { label: Some("build".into()), properties: BTreeMap::from([("env".into(), json!("staging"))]), ..msg("s") };
    assert_eq!(seqs(b.send("events", staging).await.unwrap()).len(), 2, "all, norules");

    assert_eq!(drain_bodies(&b, &sub("events", "push")).await, ["p"]);
    assert_eq!(drain_bodies(&b, &sub("events", "all")).await, ["p", "w", "b", "s"]);
    assert_eq!(drain_bodies(&b, &sub("events", "norules")).await, ["p", "w", "b", "s"]);
    assert!(drain_bodies(&b, &sub("events", "none")).await.is_empty(), "SQL 1=0 matches nothing");

    let p = sub("events", "prod-or-web");
    let w = b.receive_and_delete(&p, NOW).await.unwrap().unwrap();
    assert_eq!(text(&w), "w");
    assert!(!w.properties.contains_key("routed"), "the correlation rule has no action");
    let prod = b.receive_and_delete(&p, NOW).await.unwrap().unwrap();
    assert_eq!(prod.properties.get("routed"), Some(&json!("prod")), "the SQL rule's action applies to this copy only");
    assert!(b.receive_and_delete(&p, NOW).await.unwrap().is_none());
}

#[tokio::test]
async fn a_topic_send_that_matches_nothing_is_accepted_and_dropped() {
    let b = Broker::open_in_memory(
        deploychain_bus::Topology::from_json_str(
            r#"{"UserConfig":{"Namespaces":[{"Name":"n","Queues":[],"Topics":[{"Name":"t","Subscriptions":[
                {"Name":"s","Rules":[{"Name":"r","Properties":{"FilterType":"Correlation","CorrelationFilter":{"Label":"x"}}}]}]}]}]}}"#,
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(b.send("t", msg("nobody wants me")).await.unwrap(), SendOutcome::Enqueued(vec![]));
    assert_eq!(b.count(&sub("t", "s")).await.unwrap().active, 0);
}

#[tokio::test]
async fn sequence_numbers_increase_per_entity_and_missing_ids_are_generated() {
    let b = memory();
    assert_eq!(seqs(b.send("q", msg("a")).await.unwrap()), [1]);
    assert_eq!(seqs(b.send("q", msg("b")).await.unwrap()), [2]);
    assert_eq!(seqs(b.send("ttl-drop", msg("c")).await.unwrap()), [1], "each entity counts on its own");
    let m = lock(&b, &q("q")).await;
    assert_eq!(m.sequence_number, 1);
    assert_eq!(m.message_id.len(), 32, "GUID in N format: {}", m.message_id);
    assert!(m.message_id.chars().all(|c| c.is_ascii_hexdigit()));
    let m2 = lock(&b, &q("q")).await;
    assert_ne!(m.message_id, m2.message_id);
}

#[tokio::test]
async fn a_message_keeps_what_the_sender_set() {
    let b = memory();
    let scheduled = Utc::now() - chrono::Duration::seconds(1);
    let sent = NewMessage {
        body: b"{\"x\":1}".to_vec(),
        message_id: Some("m-1".into()),
        label: Some("push".into()),
        content_type: Some("application/json".into()),
        correlation_id: Some("c".into()),
        reply_to: Some("r".into()),
        to: Some("t".into()),
        reply_to_session_id: Some("rs".into()),
        time_to_live: Some(Duration::from_secs(600)),
        scheduled_enqueue_time: Some(scheduled),
        properties: BTreeMap::from([("s".into(), json!("é")), ("n".into(), json!(3)), ("f".into(), json!(true))]),
        ..Default::default()
    };
    b.send("q", sent.clone()).await.unwrap();
    let m = lock(&b, &q("q")).await;
    assert_eq!((m.message_id.as_str(), m.label.as_deref(), m.content_type.as_deref()), ("m-1", Some("push"), Some("application/json")));
    assert_eq!((m.correlation_id.as_deref(), m.reply_to.as_deref(), m.to.as_deref()), (Some("c"), Some("r"), Some("t")));
    assert_eq!(m.reply_to_session_id.as_deref(), Some("rs"));
    assert_eq!(m.properties, sent.properties);
    assert_eq!(m.body, sent.body);
    assert_eq!(m.time_to_live, Some(Duration::from_secs(600)));
    let expires = m.expires_at.unwrap() - m.enqueued_at;
    assert_eq!(expires.num_seconds(), 600);
    assert_eq!(m.dead_letter_source, None);
}

#[tokio::test]
async fn a_duplicate_message_id_within_the_window_is_dropped_and_accepted_after_it() {
    let b = memory();
    assert!(matches!(b.send("dedup", with_id("1", "same")).await.unwrap(), SendOutcome::Enqueued(_)));
    assert_eq!(b.send("dedup", with_id("2", "same")).await.unwrap(), SendOutcome::Duplicate);
    assert_eq!(b.send("dedup", with_id("2", "SAME")).await.unwrap(), SendOutcome::Enqueued(vec![2]), "MessageIds are case-sensitive");
    assert_eq!(b.count(&q("dedup")).await.unwrap().active, 2);
    // Queues without duplicate detection keep both.
    b.send("q", with_id("1", "same")).await.unwrap();
    b.send("q", with_id("2", "same")).await.unwrap();
    assert_eq!(b.count(&q("q")).await.unwrap().active, 2);

    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(matches!(b.send("dedup", with_id("3", "same")).await.unwrap(), SendOutcome::Enqueued(_)), "the 1 s window has passed");
    assert_eq!(drain_bodies(&b, &q("dedup")).await, ["1", "2", "3"]);
}

#[tokio::test]
async fn duplicate_detection_on_a_topic_covers_every_subscription_and_batches() {
    let b = memory();
    let push = |body: &str| NewMessage { label: Some("push".into()), message_id: Some("evt-1".into()), ..msg(body) };
    b.send("events", push("first")).await.unwrap();
    assert_eq!(b.send("events", push("again")).await.unwrap(), SendOutcome::Duplicate);
    let out = b.send_batch("events", vec![with_id("x", "evt-2"), with_id("y", "evt-2")]).await.unwrap();
    assert!(matches!(out[0], SendOutcome::Enqueued(_)));
    assert_eq!(out[1], SendOutcome::Duplicate, "a duplicate inside one batch is detected too");
    assert_eq!(drain_bodies(&b, &sub("events", "push")).await, ["first"]);
    assert_eq!(drain_bodies(&b, &sub("events", "all")).await, ["first", "x"]);
}

#[tokio::test]
async fn peek_lock_locks_and_counts_the_delivery() {
    let b = memory();
    b.send("q", msg("a")).await.unwrap();
    let before = Utc::now();
    let m = lock(&b, &q("q")).await;
    assert_eq!(m.delivery_count, 1);
    assert!(m.lock_token.is_some());
    let until = m.locked_until.unwrap();
    assert!(until >= before + chrono::Duration::milliseconds(900) && until <= Utc::now() + chrono::Duration::milliseconds(1100), "{until}");
    assert!(b.peek_lock(&q("q"), NOW).await.unwrap().is_none(), "a locked message is not delivered twice");
    let c = b.count(&q("q")).await.unwrap();
    assert_eq!((c.active, c.locked), (0, 1));
    b.complete(&q("q"), m.lock_token.unwrap()).await.unwrap();
    assert_eq!(b.count(&q("q")).await.unwrap(), Default::default());
}

#[tokio::test]
async fn abandon_makes_the_message_available_again_with_the_next_delivery_count() {
    let b = memory();
    b.send("q", msg("a")).await.unwrap();
    let m = lock(&b, &q("q")).await;
    b.abandon(&q("q"), m.lock_token.unwrap()).await.unwrap();
    let again = lock(&b, &q("q")).await;
    assert_eq!(again.delivery_count, 2);
    assert_ne!(again.lock_token, m.lock_token);
    assert_eq!(b.complete(&q("q"), m.lock_token.unwrap()).await, Err(BusError::LockLost), "the old token is dead");
}

#[tokio::test]
async fn an_expired_lock_redelivers_with_the_next_delivery_count() {
    let b = memory();
    b.send("q", msg("a")).await.unwrap();
    let m = lock(&b, &q("q")).await;
    let start = Instant::now();
    let again = b.peek_lock(&q("q"), Duration::from_secs(3)).await.unwrap().unwrap();
    let waited = start.elapsed();
    assert!(waited >= Duration::from_millis(700) && waited < Duration::from_millis(2900), "redelivered after the 1 s lock: {waited:?}");
    assert_eq!(again.delivery_count, 2);
    assert_eq!(again.sequence_number, m.sequence_number);
    assert_eq!(b.complete(&q("q"), m.lock_token.unwrap()).await, Err(BusError::LockLost), "complete after lock expiry");
    b.complete(&q("q"), again.lock_token.unwrap()).await.unwrap();
}

#[tokio::test]
async fn renewing_extends_the_lock() {
    let b = memory();
    b.send("q", msg("a")).await.unwrap();
    let m = lock(&b, &q("q")).await;
    let token = m.lock_token.unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let until = b.renew_lock(&q("q"), token).await.unwrap();
    assert!(until > m.locked_until.unwrap());
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(b.peek_lock(&q("q"), NOW).await.unwrap().is_none(), "still locked 1.2 s after the lock, thanks to the renewal");
    b.complete(&q("q"), token).await.unwrap();
}

#[tokio::test]
async fn settling_with_an_unknown_or_used_token_is_lock_lost() {
    let b = memory();
    b.send("q", msg("a")).await.unwrap();
    let token = lock(&b, &q("q")).await.lock_token.unwrap();
    let other = uuid::Uuid::new_v4();
    assert_eq!(b.complete(&q("q"), other).await, Err(BusError::LockLost));
    assert_eq!(b.abandon(&q("q"), other).await, Err(BusError::LockLost));
    assert_eq!(b.renew_lock(&q("q"), other).await, Err(BusError::LockLost));
    assert_eq!(b.complete(&q("dedup"), token).await, Err(BusError::LockLost), "a token is only valid on its own entity");
    b.complete(&q("q"), token).await.unwrap();
    assert_eq!(b.complete(&q("q"), token).await, Err(BusError::LockLost), "twice");
}

#[tokio::test]
async fn after_max_delivery_count_deliveries_the_message_is_dead_lettered() {
    let b = memory();
    b.send("q", with_id("poison", "p-1")).await.unwrap();
    for attempt in 1..=3 {
        let m = lock(&b, &q("q")).await;
        assert_eq!(m.delivery_count, attempt);
        b.abandon(&q("q"), m.lock_token.unwrap()).await.unwrap();
    }
    assert!(b.peek_lock(&q("q"), NOW).await.unwrap().is_none(), "MaxDeliveryCount is 3");
    let c = b.count(&q("q")).await.unwrap();
    assert_eq!((c.active, c.dead_lettered), (0, 1));

    let dlq = q("q").dead_letter_queue();
    let d = lock(&b, &dlq).await;
    assert_eq!(d.message_id, "p-1");
    assert_eq!(d.dead_letter_reason(), Some("MaxDeliveryCountExceeded"));
    assert_eq!(d.dead_letter_error_description(), Some("Message could not be consumed after 3 delivery attempts."));
    assert_eq!(d.dead_letter_source.as_deref(), Some("q"));
    assert_eq!(text(&d), "poison");
    b.complete(&dlq, d.lock_token.unwrap()).await.unwrap();
    assert_eq!(b.count(&q("q")).await.unwrap(), Default::default());
}

#[tokio::test]
async fn lock_expiries_count_towards_max_delivery_count() {
    let b = memory();
    b.send("events", NewMessage { label: Some("push".into()), ..msg("slow") }).await.unwrap();
    let p = sub("events", "push"); // MaxDeliveryCount 2, lock 1 s
    assert_eq!(lock(&b, &p).await.delivery_count, 1);
    let second = b.peek_lock(&p, Duration::from_secs(3)).await.unwrap().unwrap();
    assert_eq!(second.delivery_count, 2);
    // The second lock expires too: now it goes to the DLQ instead of a third delivery.
    let dead = b.peek_lock(&p.dead_letter_queue(), Duration::from_secs(3)).await.unwrap().unwrap();
    assert_eq!(dead.dead_letter_reason(), Some("MaxDeliveryCountExceeded"));
    assert_eq!(dead.dead_letter_error_description(), Some("Message could not be consumed after 2 delivery attempts."));
    assert_eq!(dead.dead_letter_source.as_deref(), Some("events/subscriptions/push"));
    assert!(b.peek_lock(&p, NOW).await.unwrap().is_none());
}

#[tokio::test]
async fn dead_lettering_moves_a_locked_message_but_never_out_of_a_dead_letter_queue() {
    let b = memory();
    b.send("q", msg("bad")).await.unwrap();
    let m = lock(&b, &q("q")).await;
    b.dead_letter(&q("q"), m.lock_token.unwrap(), "MalformedEvent", "missing field `app`").await.unwrap();
    let dlq = q("q").dead_letter_queue();
    let d = lock(&b, &dlq).await;
    assert_eq!(d.dead_letter_reason(), Some("MalformedEvent"));
    assert_eq!(d.dead_letter_error_description(), Some("missing field `app`"));
    assert!(matches!(b.dead_letter(&dlq, d.lock_token.unwrap(), "again", "").await, Err(BusError::InvalidOperation(_))));
    // Abandoning in the DLQ just makes it available there again: no MaxDeliveryCount in a DLQ.
    b.abandon(&dlq, d.lock_token.unwrap()).await.unwrap();
    for _ in 0..4 {
        let again = lock(&b, &dlq).await;
        b.abandon(&dlq, again.lock_token.unwrap()).await.unwrap();
    }
    assert_eq!(b.count(&q("q")).await.unwrap().dead_lettered, 1);
}

#[tokio::test]
async fn scheduled_messages_are_invisible_until_their_time() {
    let b = memory();
    let at = Utc::now() + chrono::Duration::milliseconds(600);
    let seq = seqs(b.send("q", NewMessage { scheduled_enqueue_time: Some(at), ..msg("later") }).await.unwrap());
    b.send("q", msg("now")).await.unwrap();
    assert_eq!(seq, [1], "the sequence number is assigned at send");
    let now = lock(&b, &q("q")).await;
    assert_eq!(text(&now), "now");
    assert!(b.peek_lock(&q("q"), NOW).await.unwrap().is_none());
    let c = b.count(&q("q")).await.unwrap();
    assert_eq!((c.active, c.scheduled), (0, 1));
    let peeked = b.peek(&q("q"), 0, 10).await.unwrap();
    assert_eq!(peeked.len(), 2, "browsing shows scheduled messages");

    let later = b.peek_lock(&q("q"), Duration::from_secs(3)).await.unwrap().unwrap();
    assert_eq!(text(&later), "later");
    assert!(Utc::now() >= at);
    assert_eq!(later.scheduled_enqueue_time.map(|t| t.timestamp_millis()), Some(at.timestamp_millis()));
    assert_eq!(later.enqueued_at.timestamp_millis(), at.timestamp_millis(), "enqueued when it became active");
}

#[tokio::test]
async fn expired_messages_are_dropped_or_dead_lettered() {
    let b = memory();
    b.send("ttl-drop", msg("gone")).await.unwrap();
    b.send("ttl-dlq", msg("kept")).await.unwrap();
    // A message's own TTL is capped by the entity's 300 ms; a shorter one wins.
    b.send("q", NewMessage { time_to_live: Some(Duration::from_millis(200)), ..msg("short") }).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;

    assert!(b.peek_lock(&q("ttl-drop"), NOW).await.unwrap().is_none());
    assert_eq!(b.count(&q("ttl-drop")).await.unwrap(), Default::default());
    assert!(b.peek_lock(&q("q"), NOW).await.unwrap().is_none());

    assert!(b.peek_lock(&q("ttl-dlq"), NOW).await.unwrap().is_none());
    let d = lock(&b, &q("ttl-dlq").dead_letter_queue()).await;
    assert_eq!(text(&d), "kept");
    assert_eq!(d.dead_letter_reason(), Some("TTLExpiredException"));
    // The DLQ ignores TTL: abandon and wait past the expiry again, it is still there.
    b.abandon(&q("ttl-dlq").dead_letter_queue(), d.lock_token.unwrap()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(b.count(&q("ttl-dlq")).await.unwrap().dead_lettered, 1);

    b.send("ttl-drop", NewMessage { time_to_live: Some(Duration::from_secs(3600)), ..msg("capped") }).await.unwrap();
    let m = lock(&b, &q("ttl-drop")).await;
    assert_eq!(m.time_to_live, Some(Duration::from_millis(300)), "TTL = min(message, entity default)");
}

#[tokio::test]
async fn a_locked_message_does_not_expire_under_its_holder() {
    let b = memory();
    b.send("ttl-dlq", msg("busy")).await.unwrap();
    let m = lock(&b, &q("ttl-dlq")).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    b.complete(&q("ttl-dlq"), m.lock_token.unwrap()).await.unwrap();
    assert_eq!(b.count(&q("ttl-dlq")).await.unwrap(), Default::default());
}

#[tokio::test]
async fn receive_and_delete_removes_the_message() {
    let b = memory();
    b.send("q", with_id("a", "m")).await.unwrap();
    let m = b.receive_and_delete(&q("q"), NOW).await.unwrap().unwrap();
    assert_eq!((m.delivery_count, m.lock_token, m.locked_until), (1, None, None));
    assert!(b.receive_and_delete(&q("q"), NOW).await.unwrap().is_none());
    assert!(b.peek(&q("q"), 0, 10).await.unwrap().is_empty());
}

#[tokio::test]
async fn peek_browses_without_locking() {
    let b = memory();
    for i in 1..=5 {
        b.send("q", msg(&i.to_string())).await.unwrap();
    }
    let locked = lock(&b, &q("q")).await;
    let page = b.peek(&q("q"), 2, 2).await.unwrap();
    assert_eq!(page.iter().map(|m| m.sequence_number).collect::<Vec<_>>(), [2, 3]);
    let all = b.peek(&q("q"), 0, 100).await.unwrap();
    assert_eq!(all.len(), 5);
    assert!(all.iter().all(|m| m.lock_token.is_none()), "browsing never reveals a lock token");
    assert_eq!(all[0].locked_until, locked.locked_until);
    assert_eq!(b.count(&q("q")).await.unwrap().active, 4, "peek locked nothing");
}

#[tokio::test]
async fn a_long_poll_is_woken_by_a_send() {
    let b = memory();
    let sender = b.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(150)).await;
        sender.send("q", msg("wake")).await.unwrap();
    });
    let start = Instant::now();
    let m = b.peek_lock(&q("q"), Duration::from_secs(10)).await.unwrap().unwrap();
    assert_eq!(text(&m), "wake");
    assert!(start.elapsed() < Duration::from_millis(900), "woken by the send, not by the re-check: {:?}", start.elapsed());

    let start = Instant::now();
    assert!(b.peek_lock(&q("q"), Duration::from_millis(300)).await.unwrap().is_none());
    let waited = start.elapsed();
    assert!(waited >= Duration::from_millis(300) && waited < Duration::from_millis(1500), "{waited:?}");
}

#[tokio::test]
async fn errors_name_what_is_wrong() {
    let b = Broker::open_in_memory_with(topology(), BrokerOptions { max_message_bytes: 1024 }).unwrap();
    assert_eq!(b.send("nope", msg("x")).await, Err(BusError::EntityNotFound("nope".into())));
    assert!(matches!(b.peek_lock(&q("nope"), NOW).await, Err(BusError::EntityNotFound(_))));
    assert!(matches!(b.peek_lock(&q("events"), NOW).await, Err(BusError::InvalidOperation(_))), "receive from a topic");
    assert!(matches!(b.send("events/subscriptions/all", msg("x")).await, Err(BusError::InvalidOperation(_))));
    assert!(matches!(b.send("q/$DeadLetterQueue", msg("x")).await, Err(BusError::InvalidOperation(_))));
    assert_eq!(b.send("q", NewMessage::new(vec![0u8; 1025])).await, Err(BusError::MessageTooLarge { size: 1025, max: 1024 }));
    assert!(b.send("q", NewMessage::new(vec![0u8; 1024])).await.is_ok());
    assert!(matches!(b.send("q", with_id("x", &"x".repeat(129))).await, Err(BusError::InvalidMessage(_))));
    assert!(matches!(b.send("Q", msg("names are case-insensitive")).await, Ok(SendOutcome::Enqueued(_))));
    let e = b.peek_lock(&q("sessions"), NOW).await.unwrap_err();
    assert_eq!(e, BusError::SessionRequired("sessions".into()));
    assert!(!BusError::LockLost.is_transient() && BusError::Storage("x".into()).is_transient());
}

#[tokio::test]
async fn the_default_size_limit_is_256_kib() {
    let b = memory();
    assert!(b.send("q", NewMessage::new(vec![b'a'; 256 * 1024])).await.is_ok());
    assert!(matches!(b.send("q", NewMessage::new(vec![b'a'; 256 * 1024 + 1])).await, Err(BusError::MessageTooLarge { .. })));
}

#[tokio::test]
async fn application_property_values_keep_their_json_types() {
    let b = memory();
    let props: BTreeMap<String, Value> =
        BTreeMap::from([("i".into(), json!(-7)), ("f".into(), json!(1.5)), ("b".into(), json!(false)), ("s".into(), json!("x"))]);
    b.send("q", NewMessage { properties: props.clone(), ..msg("p") }).await.unwrap();
    assert_eq!(lock(&b, &q("q")).await.properties, props);
}
