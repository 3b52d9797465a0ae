//! The database file is the bus: everything survives a restart, and a crash (a dropped broker
//! mid-flight, or a killed process) loses nothing that was acknowledged and tears nothing apart.
#![allow(clippy::unwrap_used)]

mod common;

use chrono::Utc;
use common::*;
use deploychain_bus::{Broker, NewMessage, SendOutcome};
use std::collections::BTreeSet;
use std::io::BufRead;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[tokio::test]
async fn a_restart_keeps_messages_locks_dead_letters_schedules_and_the_duplicate_window() {
    let dir = temp_dir("restart");
    let db = dir.join("nested/bus.sqlite");
    let scheduled_at = Utc::now() + chrono::Duration::milliseconds(1500);
    {
        let b = Broker::open(&db, topology()).unwrap();
        b.send("q", msg("dead")).await.unwrap();
        let d = lock(&b, &q("q")).await;
        b.dead_letter(&q("q"), d.lock_token.unwrap(), "Broken", "for the test").await.unwrap();
        b.send("q", msg("locked")).await.unwrap();
        assert_eq!(text(&lock(&b, &q("q")).await), "locked");
        b.send("q", msg("active")).await.unwrap();
        b.send("q", NewMessage { scheduled_enqueue_time: Some(scheduled_at), ..msg("later") }).await.unwrap();
        b.send("dedup-long", with_id("x", "once")).await.unwrap();
        let c = b.count(&q("q")).await.unwrap();
        assert_eq!((c.active, c.locked, c.scheduled, c.dead_lettered), (1, 1, 1, 1));
    }

    let b = Broker::open(&db, topology()).unwrap();
    let c = b.count(&q("q")).await.unwrap();
    assert_eq!((c.active, c.locked, c.scheduled, c.dead_lettered), (1, 1, 1, 1), "all still there after reopening");
    assert_eq!(b.send("dedup-long", with_id("y", "once")).await.unwrap(), SendOutcome::Duplicate, "the duplicate window survived");

    let active = lock(&b, &q("q")).await;
    assert_eq!((text(&active).as_str(), active.delivery_count), ("active", 1));
    b.complete(&q("q"), active.lock_token.unwrap()).await.unwrap();

    // The lock taken before the restart expires, and the message is delivered again.
    let relocked = b.peek_lock(&q("q"), Duration::from_secs(3)).await.unwrap().unwrap();
    assert_eq!((text(&relocked).as_str(), relocked.delivery_count), ("locked", 2));
    b.complete(&q("q"), relocked.lock_token.unwrap()).await.unwrap();

    let later = b.peek_lock(&q("q"), Duration::from_secs(3)).await.unwrap().unwrap();
    assert_eq!(text(&later), "later");
    assert!(Utc::now() >= scheduled_at);
    b.complete(&q("q"), later.lock_token.unwrap()).await.unwrap();

    let dead = b.receive_and_delete(&q("q").dead_letter_queue(), NOW).await.unwrap().unwrap();
    assert_eq!((text(&dead).as_str(), dead.dead_letter_reason()), ("dead", Some("Broken")));
    assert_eq!(b.send("q", msg("next")).await.unwrap(), SendOutcome::Enqueued(vec![5]), "sequence numbers continue");
}

#[tokio::test]
async fn the_file_uses_wal_and_full_synchronous_commits() {
    let dir = temp_dir("pragmas");
    let db = dir.join("bus.sqlite");
    let b = Broker::open(&db, topology()).unwrap();
    b.send("q", msg("x")).await.unwrap();
    let conn = rusqlite::Connection::open(&db).unwrap();
    let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
    assert_eq!(mode, "wal");
    drop(b);
}

/// Every message in the three subscriptions a `push` fans out to, as (subscription, MessageId).
async fn fanned_out_ids(b: &Broker) -> [BTreeSet<String>; 3] {
    let mut out: [BTreeSet<String>; 3] = Default::default();
    for (i, s) in ["push", "all", "norules"].into_iter().enumerate() {
        for m in b.peek(&sub("events", s), 0, 100_000).await.unwrap() {
            assert!(out[i].insert(m.message_id.clone()), "{s}: {} stored twice", m.message_id);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dropping_the_broker_mid_flight_loses_no_acknowledged_send_and_tears_no_fan_out() {
    let dir = temp_dir("drop");
    let db = dir.join("bus.sqlite");
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    {
        let b = Broker::open(&db, topology()).unwrap();
        let mut tasks = Vec::new();
        for w in 0..6 {
            let (b, acked) = (b.clone(), acked.clone());
            tasks.push(tokio::spawn(async move {
                for i in 0.. {
                    let id = format!("w{w}-{i}");
                    let m = NewMessage { label: Some("push".into()), message_id: Some(id.clone()), ..msg("x") };
                    if b.send("events", m).await.is_ok() {
                        acked.lock().unwrap().insert(id);
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
    }
    // Blocking work already handed to SQLite may still commit; give it a moment, then reopen.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 10, "the test sent something: {}", acked.len());

    let b = Broker::open(&db, topology()).unwrap();
    let [push, all, norules] = fanned_out_ids(&b).await;
    assert_eq!(push, all, "a send reached every matching subscription or none");
    assert_eq!(push, norules);
    assert!(acked.is_subset(&push), "{} acknowledged sends missing", acked.difference(&push).count());
    let seqs: Vec<i64> = b.peek(&sub("events", "all"), 0, 100_000).await.unwrap().iter().map(|m| m.sequence_number).collect();
    assert!(seqs.iter().copied().eq(1..=seqs.len() as i64), "no holes or repeats in sequence numbers");
    for id in acked.iter().take(5) {
        let again = NewMessage { label: Some("push".into()), message_id: Some(id.clone()), ..msg("x") };
        assert_eq!(b.send("events", again).await.unwrap(), SendOutcome::Duplicate);
    }
}

const CHILD_ENV: &str = "DEPLOYCHAIN_BUS_CRASH_DB";

/// Not a test on its own: the body of the child process that `a_killed_process_*` kills.
#[tokio::test]
async fn crash_child_process() {
    let Ok(path) = std::env::var(CHILD_ENV) else { return };
    let b = Broker::open(std::path::Path::new(&path), topology()).unwrap();
    let mut i = 0u64;
    loop {
        let id = format!("m-{i}");
        let m = NewMessage { label: Some("push".into()), message_id: Some(id.clone()), ..msg("payload") };
        b.send("events", m).await.unwrap();
        println!("acked {id}");
        i += 1;
    }
}

#[tokio::test]
async fn a_killed_process_loses_no_acknowledged_send_and_tears_no_fan_out() {
    let dir = temp_dir("kill");
    let db = dir.join("bus.sqlite");
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash_child_process", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, &db)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            // libtest may print `test crash_child_process ... ` in front of the first line.
            if let Some((_, id)) = line.split_once("acked ")
                && tx.send(id.to_string()).is_err()
            {
                break;
            }
        }
    });
    let mut acked = BTreeSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while acked.len() < 40 && std::time::Instant::now() < deadline {
        if let Ok(id) = rx.recv_timeout(Duration::from_millis(100)) {
            acked.insert(id);
        }
    }
    child.kill().unwrap(); // SIGKILL: no destructor, no flush, no goodbye.
    child.wait().unwrap();
    reader.join().unwrap(); // the pipe is closed: every line the child wrote has been read
    while let Ok(id) = rx.try_recv() {
        acked.insert(id);
    }
    assert!(acked.len() >= 40, "the child acknowledged only {} sends", acked.len());

    let b = Broker::open(&db, topology()).unwrap();
    let [push, all, norules] = fanned_out_ids(&b).await;
    assert_eq!(push, all);
    assert_eq!(push, norules);
    assert!(acked.is_subset(&push), "acknowledged but lost: {:?}", acked.difference(&push).collect::<Vec<_>>());
    let unacked: Vec<&String> = push.difference(&acked).collect();
    assert!(
        unacked.len() <= 1,
        "at most the one in-flight send committed without its acknowledgement: {unacked:?} ({} acked)",
        acked.len()
    );
    let first = NewMessage { label: Some("push".into()), message_id: Some("m-0".into()), ..msg("x") };
    assert_eq!(b.send("events", first).await.unwrap(), SendOutcome::Duplicate, "the duplicate window survived the crash");
}

/// Operations arriving together share a commit, but each is still all or nothing on its own:
/// a failing one (a complete with a lock token nobody holds) fails alone, and every send that
/// was acknowledged is there after reopening.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_operations_commit_together_and_fail_alone() {
    let dir = temp_dir("group-commit");
    let db = dir.join("bus.sqlite");
    let n: usize = 300;
    {
        let b = Broker::open(&db, topology()).unwrap();
        let mut tasks = Vec::new();
        for i in 0..n {
            let b = b.clone();
            tasks.push(tokio::spawn(async move {
                if i % 3 == 0 {
                    // Interleaved with the sends: refused, and nothing else rolls back with it.
                    let e = b.complete(&q("q"), uuid::Uuid::new_v4()).await.unwrap_err();
                    assert!(e.to_string().to_lowercase().contains("lock"), "{e}");
                    None
                } else {
                    Some(b.send("q", with_id(&format!("m{i}"), &format!("id-{i}"))).await.unwrap())
                }
            }));
        }
        let mut sent = 0;
        for t in tasks {
            if let Some(outcome) = t.await.unwrap() {
                assert!(matches!(outcome, SendOutcome::Enqueued(_)), "{outcome:?}");
                sent += 1;
            }
        }
        assert_eq!(sent, n - n.div_ceil(3));
    }
    let b = Broker::open(&db, topology()).unwrap();
    let mut bodies = BTreeSet::new();
    while let Some(m) = b.peek_lock(&q("q"), Duration::ZERO).await.unwrap() {
        bodies.insert(text(&m));
        b.complete(&q("q"), m.lock_token.unwrap()).await.unwrap();
    }
    let expected: BTreeSet<String> = (0..n).filter(|i| i % 3 != 0).map(|i| format!("m{i}")).collect();
    assert_eq!(bodies, expected, "every acknowledged send survived the reopening, once");
}

#[tokio::test]
async fn a_version_1_file_is_upgraded_in_place_and_keeps_its_schedule() {
    let dir = temp_dir("upgrade");
    let db = dir.join("bus.sqlite");
    let later = Utc::now() + chrono::Duration::hours(1);
    {
        let b = Broker::open(&db, topology()).unwrap();
        b.send("q", NewMessage { scheduled_enqueue_time: Some(later), ..msg("later") }).await.unwrap();
        b.send("q", msg("now")).await.unwrap();
    }
    // Turn the file back into what version 1 wrote: no `pending` column, the old index.
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute_batch(
            "DROP INDEX messages_active; DROP INDEX messages_pending; ALTER TABLE messages DROP COLUMN pending;
             CREATE INDEX messages_visible ON messages (entity, visible_at); PRAGMA user_version = 1;",
        )
        .unwrap();
    }

    let b = Broker::open(&db, topology()).unwrap();
    let c = b.count(&q("q")).await.unwrap();
    assert_eq!((c.active, c.scheduled), (1, 1), "the scheduled message still waits");
    let m = lock(&b, &q("q")).await;
    assert_eq!(text(&m), "now");
    b.complete(&q("q"), m.lock_token.unwrap()).await.unwrap();
    assert!(b.peek_lock(&q("q"), NOW).await.unwrap().is_none(), "nothing else is due");
    let version: i64 = rusqlite::Connection::open(&db).unwrap().query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
    assert_eq!(version, 2);
}
