//! Sessions: FIFO per session, one holder at a time, sessions independent of each other, session
//! locks that expire unless renewed.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use deploychain_bus::{BusError, NewMessage, Subscription};
use std::time::Duration;

#[tokio::test]
async fn a_session_entity_needs_session_ids_and_session_receivers() {
    let b = memory();
    assert!(matches!(b.send("sessions", msg("no session")).await, Err(BusError::InvalidMessage(_))));
    assert_eq!(b.count(&q("sessions")).await.unwrap(), Default::default(), "nothing stored");
    b.send("sessions", in_session("x", "a")).await.unwrap();
    assert_eq!(b.peek_lock(&q("sessions"), NOW).await, Err(BusError::SessionRequired("sessions".into())));
    assert_eq!(b.receive_and_delete(&q("sessions"), NOW).await, Err(BusError::SessionRequired("sessions".into())));
    assert!(matches!(b.accept_session(&q("q"), NOW).await, Err(BusError::InvalidOperation(_))), "q has no sessions");
}

#[tokio::test]
async fn a_topic_message_without_session_id_is_refused_when_a_matching_subscription_needs_one() {
    let mut t = topology();
    t.add_subscription("events", Subscription { requires_session: true, ..Subscription::new("stage") }).unwrap();
    let b = deploychain_bus::Broker::open_in_memory(t).unwrap();
    assert!(matches!(b.send("events", msg("x")).await, Err(BusError::InvalidMessage(_))));
    assert_eq!(b.count(&sub("events", "all")).await.unwrap().active, 0, "the whole send had no effect");
    b.send("events", in_session("y", "web/staging")).await.unwrap();
    let s = b.accept_session(&sub("events", "stage"), NOW).await.unwrap().unwrap();
    assert_eq!(s.session_id, "web/staging");
}

#[tokio::test]
async fn messages_of_a_session_come_in_order_to_one_holder() {
    let b = memory();
    for i in 1..=3 {
        b.send("sessions", in_session(&format!("a{i}"), "A")).await.unwrap();
    }
    let s = b.accept_session(&q("sessions"), NOW).await.unwrap().unwrap();
    assert_eq!(s.session_id, "A");
    assert!(b.accept_session(&q("sessions"), NOW).await.unwrap().is_none(), "one holder at a time");

    let m1 = b.session_peek_lock(&s, NOW).await.unwrap().unwrap();
    assert_eq!(text(&m1), "a1");
    assert!(b.session_peek_lock(&s, NOW).await.unwrap().is_none(), "a2 waits while a1 is locked");
    b.complete(&q("sessions"), m1.lock_token.unwrap()).await.unwrap();
    let m2 = b.session_peek_lock(&s, NOW).await.unwrap().unwrap();
    assert_eq!(text(&m2), "a2");
    b.abandon(&q("sessions"), m2.lock_token.unwrap()).await.unwrap();
    let m2again = b.session_peek_lock(&s, NOW).await.unwrap().unwrap();
    assert_eq!((text(&m2again).as_str(), m2again.delivery_count), ("a2", 2), "an abandoned message comes back first");
    b.complete(&q("sessions"), m2again.lock_token.unwrap()).await.unwrap();
    let m3 = b.session_peek_lock(&s, NOW).await.unwrap().unwrap();
    assert_eq!(text(&m3), "a3");
    b.complete(&q("sessions"), m3.lock_token.unwrap()).await.unwrap();
    assert!(b.session_peek_lock(&s, NOW).await.unwrap().is_none());
    b.release_session(&s).await.unwrap();
    assert!(b.accept_session(&q("sessions"), NOW).await.unwrap().is_none(), "no session has messages");
}

#[tokio::test]
async fn two_sessions_are_processed_independently() {
    let b = memory();
    b.send("sessions", in_session("a1", "A")).await.unwrap();
    b.send("sessions", in_session("b1", "B")).await.unwrap();
    b.send("sessions", in_session("a2", "A")).await.unwrap();
    b.send("sessions", in_session("b2", "B")).await.unwrap();

    let sa = b.accept_session(&q("sessions"), NOW).await.unwrap().unwrap();
    assert_eq!(sa.session_id, "A", "FIFO by each session's oldest message");
    let a1 = b.session_peek_lock(&sa, NOW).await.unwrap().unwrap();

    // A's message is locked; B is still free and gets processed meanwhile.
    let sb = b.accept_session(&q("sessions"), NOW).await.unwrap().unwrap();
    assert_eq!(sb.session_id, "B");
    let b1 = b.session_peek_lock(&sb, NOW).await.unwrap().unwrap();
    assert_eq!(text(&b1), "b1");
    b.complete(&q("sessions"), b1.lock_token.unwrap()).await.unwrap();
    let b2 = b.session_peek_lock(&sb, NOW).await.unwrap().unwrap();
    assert_eq!(text(&b2), "b2");
    b.complete(&q("sessions"), b2.lock_token.unwrap()).await.unwrap();

    b.complete(&q("sessions"), a1.lock_token.unwrap()).await.unwrap();
    let a2 = b.session_peek_lock(&sa, NOW).await.unwrap().unwrap();
    assert_eq!(text(&a2), "a2");
    b.complete(&q("sessions"), a2.lock_token.unwrap()).await.unwrap();
    assert_eq!(b.count(&q("sessions")).await.unwrap(), Default::default());
}

#[tokio::test]
async fn concurrent_session_workers_never_share_a_session() {
    let b = memory();
    for i in 0..20 {
        b.send("sessions", in_session(&i.to_string(), &format!("s{}", i % 4))).await.unwrap();
    }
    let mut workers = Vec::new();
    for _ in 0..3 {
        let b = b.clone();
        workers.push(tokio::spawn(async move {
            let mut seen: Vec<(String, i64)> = Vec::new();
            while let Some(s) = b.accept_session(&q("sessions"), Duration::from_millis(100)).await.unwrap() {
                while let Some(m) = b.session_peek_lock(&s, NOW).await.unwrap() {
                    seen.push((s.session_id.clone(), m.sequence_number));
                    b.complete(&q("sessions"), m.lock_token.unwrap()).await.unwrap();
                }
                b.release_session(&s).await.unwrap();
            }
            seen
        }));
    }
    let mut by_session: std::collections::BTreeMap<String, Vec<i64>> = Default::default();
    for w in workers {
        for (s, seq) in w.await.unwrap() {
            by_session.entry(s).or_default().push(seq);
        }
    }
    assert_eq!(by_session.len(), 4);
    for (s, seqs) in by_session {
        assert_eq!(seqs.len(), 5, "{s}");
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{s} in order: {seqs:?}");
    }
}

#[tokio::test]
async fn a_session_lock_expires_unless_renewed() {
    let b = memory();
    b.send("sessions", in_session("a1", "A")).await.unwrap();
    b.send("sessions", in_session("a2", "A")).await.unwrap();
    let s = b.accept_session(&q("sessions"), NOW).await.unwrap().unwrap();
    let m = b.session_peek_lock(&s, NOW).await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let renewed = b.renew_session(&s).await.unwrap();
    assert!(renewed > s.locked_until);
    tokio::time::sleep(Duration::from_millis(600)).await;
    // 1.2 s after acceptance: both the session and (renewed with it) the message lock still hold.
    assert!(b.accept_session(&q("sessions"), NOW).await.unwrap().is_none());
    b.complete(&q("sessions"), m.lock_token.unwrap()).await.unwrap();

    let m2 = b.session_peek_lock(&s, NOW).await.unwrap().unwrap();
    // Stop renewing: another receiver gets the session, with a2 redelivered.
    let other = b.accept_session(&q("sessions"), Duration::from_secs(3)).await.unwrap().unwrap();
    assert_eq!(other.session_id, "A");
    assert_ne!(other.token(), s.token());
    assert_eq!(b.session_peek_lock(&s, NOW).await, Err(BusError::LockLost), "the old holder lost the session");
    assert_eq!(b.renew_session(&s).await, Err(BusError::LockLost));
    assert_eq!(b.complete(&q("sessions"), m2.lock_token.unwrap()).await, Err(BusError::LockLost));
    let again = b.session_peek_lock(&other, NOW).await.unwrap().unwrap();
    assert_eq!((text(&again).as_str(), again.delivery_count), ("a2", 2));
    b.complete(&q("sessions"), again.lock_token.unwrap()).await.unwrap();
}

/// A session's messages are locked by the session lock (Service Bus's session receivers have no
/// message lock of their own to renew): a message received late in the hold ends with the session,
/// not a LockDuration after its receipt.
#[tokio::test]
async fn a_session_message_lock_is_the_session_lock() {
    let b = memory();
    b.send("sessions", in_session("a1", "A")).await.unwrap();
    let s = b.accept_session(&q("sessions"), NOW).await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let m = b.session_peek_lock(&s, NOW).await.unwrap().unwrap();
    assert_eq!(m.locked_until, Some(s.locked_until), "the message's lock ends with the session's");
    assert!(
        matches!(b.renew_lock(&q("sessions"), m.lock_token.unwrap()).await, Err(BusError::InvalidOperation(_))),
        "a session message's lock is renewed through its session"
    );
    // Nobody renews the session: 1 s after acceptance both lapse, and the next holder gets a1 again.
    let next = b.accept_session(&q("sessions"), Duration::from_secs(3)).await.unwrap().unwrap();
    assert_ne!(next.token(), s.token());
    assert_eq!(b.complete(&q("sessions"), m.lock_token.unwrap()).await, Err(BusError::LockLost), "SessionLockLost for the old holder");
    let again = b.session_peek_lock(&next, NOW).await.unwrap().unwrap();
    assert_eq!((text(&again).as_str(), again.delivery_count), ("a1", 2));
}

#[tokio::test]
async fn releasing_a_session_hands_its_locked_message_to_the_next_holder() {
    let b = memory();
    b.send("sessions", in_session("a1", "A")).await.unwrap();
    let s = b.accept_session(&q("sessions"), NOW).await.unwrap().unwrap();
    let m = b.session_peek_lock(&s, NOW).await.unwrap().unwrap();
    b.release_session(&s).await.unwrap();
    assert_eq!(b.complete(&q("sessions"), m.lock_token.unwrap()).await, Err(BusError::LockLost));
    let next = b.accept_session(&q("sessions"), NOW).await.unwrap().unwrap();
    let again = b.session_peek_lock(&next, NOW).await.unwrap().unwrap();
    assert_eq!((text(&again).as_str(), again.delivery_count), ("a1", 2));
}

#[tokio::test]
async fn session_messages_dead_letter_after_max_delivery_count() {
    let b = memory();
    b.send("sessions", in_session("poison", "A")).await.unwrap();
    b.send("sessions", in_session("fine", "A")).await.unwrap();
    for attempt in 1..=5 {
        let s = b.accept_session(&q("sessions"), NOW).await.unwrap().unwrap();
        let m = b.session_peek_lock(&s, NOW).await.unwrap().unwrap();
        assert_eq!((text(&m).as_str(), m.delivery_count), ("poison", attempt));
        b.abandon(&q("sessions"), m.lock_token.unwrap()).await.unwrap();
        b.release_session(&s).await.unwrap();
    }
    let s = b.accept_session(&q("sessions"), NOW).await.unwrap().unwrap();
    let m = b.session_peek_lock(&s, NOW).await.unwrap().unwrap();
    assert_eq!(text(&m), "fine", "the poison message no longer blocks its session");
    let d = b.receive_and_delete(&q("sessions").dead_letter_queue(), NOW).await.unwrap().unwrap();
    assert_eq!((text(&d).as_str(), d.dead_letter_reason()), ("poison", Some("MaxDeliveryCountExceeded")));
}

#[tokio::test]
async fn a_waiting_session_acceptor_is_woken_by_a_send() {
    let b = memory();
    let sender = b.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        sender.send("sessions", NewMessage { session_id: Some("late".into()), ..msg("x") }).await.unwrap();
    });
    let start = std::time::Instant::now();
    let s = b.accept_session(&q("sessions"), Duration::from_secs(5)).await.unwrap().unwrap();
    assert_eq!(s.session_id, "late");
    assert!(start.elapsed() < Duration::from_millis(900));
}

/// Fault injection for the soak: locks lost all at once (an entity moved between nodes). The
/// messages come back (their delivery counted) to whoever asks next, and the first holders can
/// settle nothing.
#[tokio::test]
async fn lost_locks_make_messages_available_again_and_their_holders_settle_nothing() {
    let b = memory();
    b.send("q", msg("plain")).await.unwrap();
    b.send("sessions", in_session("s1", "A")).await.unwrap();
    let first = b.peek_lock(&q("q"), NOW).await.unwrap().unwrap();
    let s = b.accept_session(&q("sessions"), NOW).await.unwrap().unwrap();
    let in_session_first = b.session_peek_lock(&s, NOW).await.unwrap().unwrap();
    assert_eq!(b.lose_locks(&q("q")).await.unwrap(), 1);
    assert_eq!(b.lose_locks(&q("sessions")).await.unwrap(), 1);

    let again = b.peek_lock(&q("q"), NOW).await.unwrap().unwrap();
    assert_eq!((text(&again).as_str(), again.delivery_count), ("plain", 2));
    assert_eq!(b.complete(&q("q"), first.lock_token.unwrap()).await, Err(BusError::LockLost), "the first holder's lock is gone");
    b.complete(&q("q"), again.lock_token.unwrap()).await.unwrap();

    let taken = b.accept_session(&q("sessions"), NOW).await.unwrap().expect("the session is free again");
    let m = b.session_peek_lock(&taken, NOW).await.unwrap().unwrap();
    assert_eq!((text(&m).as_str(), m.delivery_count), ("s1", 2));
    assert!(b.complete(&q("sessions"), in_session_first.lock_token.unwrap()).await.is_err(), "the first session holder settles nothing");
    b.complete(&q("sessions"), m.lock_token.unwrap()).await.unwrap();
}
