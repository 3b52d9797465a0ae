//! The SQLite side: schema and one function per operation, each run inside the caller's
//! transaction (each broker operation is all or nothing). Everything here is synchronous; the
//! broker runs it on its writer thread.
//!
//! Times are milliseconds since the Unix epoch. Locks, sessions, the duplicate-detection window
//! and sequence counters are all rows, so every piece of state survives a restart; a lock whose
//! holder died simply expires.

use crate::error::BusError;
use crate::filter::FilterFields;
use crate::message::{Draft, EntityCounts, Message, NewMessage, SendOutcome};
use crate::topology::{Filter, Rule, Topology};
use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, Row, params};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;
use uuid::Uuid;

pub(crate) const REASON_MAX_DELIVERY: &str = "MaxDeliveryCountExceeded";
pub(crate) const REASON_TTL: &str = "TTLExpiredException";
const MAX_ID_LEN: usize = 128;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS sequences (
    entity TEXT PRIMARY KEY,
    last   INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id                  INTEGER PRIMARY KEY,
    entity              TEXT NOT NULL,
    seq                 INTEGER NOT NULL,
    dlq                 INTEGER NOT NULL DEFAULT 0,
    message_id          TEXT NOT NULL,
    session_id          TEXT,
    label               TEXT,
    content_type        TEXT,
    correlation_id      TEXT,
    reply_to            TEXT,
    reply_to_session_id TEXT,
    to_addr             TEXT,
    properties          TEXT NOT NULL,
    body                BLOB NOT NULL,
    enqueued_at         INTEGER NOT NULL,
    visible_at          INTEGER NOT NULL,
    -- 1 while a scheduled message waits for its time (visible_at is later than the last look):
    -- receives walk only the messages that are due, however many wait behind them.
    pending             INTEGER NOT NULL DEFAULT 0,
    scheduled_at        INTEGER,
    expires_at          INTEGER,
    ttl_ms              INTEGER,
    delivery_count      INTEGER NOT NULL DEFAULT 0,
    lock_token          TEXT,
    locked_until        INTEGER,
    session_lock        TEXT,
    dead_letter_source  TEXT,
    UNIQUE (entity, seq)
);
CREATE INDEX IF NOT EXISTS messages_queue ON messages (entity, dlq, seq);
CREATE INDEX IF NOT EXISTS messages_session ON messages (entity, session_id, seq) WHERE session_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS messages_active ON messages (entity, dlq, seq) WHERE pending = 0;
CREATE INDEX IF NOT EXISTS messages_pending ON messages (entity, visible_at) WHERE pending = 1;
CREATE INDEX IF NOT EXISTS messages_locked ON messages (entity, locked_until) WHERE lock_token IS NOT NULL;
CREATE INDEX IF NOT EXISTS messages_token ON messages (lock_token) WHERE lock_token IS NOT NULL;
CREATE INDEX IF NOT EXISTS messages_expiry ON messages (entity, expires_at) WHERE expires_at IS NOT NULL AND dlq = 0;
CREATE TABLE IF NOT EXISTS duplicates (
    entity     TEXT NOT NULL,
    message_id TEXT NOT NULL,
    seen_at    INTEGER NOT NULL,
    PRIMARY KEY (entity, message_id)
);
CREATE INDEX IF NOT EXISTS duplicates_age ON duplicates (entity, seen_at);
CREATE TABLE IF NOT EXISTS sessions (
    entity       TEXT NOT NULL,
    session_id   TEXT NOT NULL,
    token        TEXT NOT NULL,
    locked_until INTEGER NOT NULL,
    PRIMARY KEY (entity, session_id)
);
PRAGMA user_version = 2;
";

/// Version 1 kept scheduled messages in the queue's index, so every receive stepped over all of
/// them: mark the ones still waiting and drop the index version 2 replaces.
fn from_v1(conn: &Connection) -> Result<(), BusError> {
    let tx = conn.unchecked_transaction()?;
    tx.execute_batch("ALTER TABLE messages ADD COLUMN pending INTEGER NOT NULL DEFAULT 0; DROP INDEX IF EXISTS messages_visible;")?;
    tx.execute("UPDATE messages SET pending = 1 WHERE visible_at > ?1", params![Utc::now().timestamp_millis()])?;
    tx.execute_batch(SCHEMA)?;
    tx.commit()?;
    Ok(())
}

/// Open or create the database with the settings durability needs.
pub(crate) fn init(conn: &Connection, file_backed: bool) -> Result<(), BusError> {
    if file_backed {
        // WAL + FULL: a commit is on disk when it returns, and a crash never tears a transaction.
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(BusError::Storage(format!("cannot switch the bus database to WAL (journal_mode is {mode})")));
        }
        conn.pragma_update(None, "synchronous", "FULL")?;
    }
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version > 2 {
        return Err(BusError::Storage(format!("the bus database has schema version {version}; this build knows up to version 2")));
    }
    if version == 1 {
        from_v1(conn)?;
    }
    conn.execute_batch(SCHEMA)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The topology, resolved for lookups

/// A queue or subscription: where messages are stored and received from.
#[derive(Debug, Clone)]
pub(crate) struct Receiver {
    pub key: String,
    pub display: String,
    pub lock_ms: i64,
    pub max_delivery_count: u32,
    pub requires_session: bool,
    /// Entity default TTL (for a subscription: the smaller of topic's and subscription's).
    pub ttl: Option<Duration>,
    pub dead_letter_on_expiration: bool,
}

/// A queue or topic: what messages are sent to.
#[derive(Debug, Clone)]
pub(crate) struct Sender {
    pub key: String,
    pub display: String,
    pub duplicate_window: Option<Duration>,
    pub ttl: Option<Duration>,
    /// (receiver key, rules); no rules = everything matches.
    pub targets: Vec<(String, Vec<Rule>)>,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Resolved {
    pub receivers: HashMap<String, Receiver>,
    pub senders: HashMap<String, Sender>,
}

fn min_ttl(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl Resolved {
    pub(crate) fn new(t: &Topology) -> Resolved {
        let mut r = Resolved::default();
        for q in &t.queues {
            let key = q.name.to_ascii_lowercase();
            r.receivers.insert(
                key.clone(),
                Receiver {
                    key: key.clone(),
                    display: q.name.clone(),
                    lock_ms: ms(q.lock_duration),
                    max_delivery_count: q.max_delivery_count,
                    requires_session: q.requires_session,
                    ttl: q.default_message_time_to_live,
                    dead_letter_on_expiration: q.dead_lettering_on_message_expiration,
                },
            );
            r.senders.insert(
                key.clone(),
                Sender {
                    key: key.clone(),
                    display: q.name.clone(),
                    duplicate_window: q.requires_duplicate_detection.then_some(q.duplicate_detection_history_time_window),
                    ttl: None,
                    targets: vec![(key, Vec::new())],
                },
            );
        }
        for topic in &t.topics {
            let tkey = topic.name.to_ascii_lowercase();
            let mut targets = Vec::new();
            for s in &topic.subscriptions {
                let key = format!("{tkey}/subscriptions/{}", s.name.to_ascii_lowercase());
                r.receivers.insert(
                    key.clone(),
                    Receiver {
                        key: key.clone(),
                        display: format!("{}/subscriptions/{}", topic.name, s.name),
                        lock_ms: ms(s.lock_duration),
                        max_delivery_count: s.max_delivery_count,
                        requires_session: s.requires_session,
                        ttl: min_ttl(topic.default_message_time_to_live, s.default_message_time_to_live),
                        dead_letter_on_expiration: s.dead_lettering_on_message_expiration,
                    },
                );
                targets.push((key, s.rules.clone()));
            }
            r.senders.insert(
                tkey.clone(),
                Sender {
                    key: tkey,
                    display: topic.name.clone(),
                    duplicate_window: topic.requires_duplicate_detection.then_some(topic.duplicate_detection_history_time_window),
                    ttl: topic.default_message_time_to_live,
                    targets,
                },
            );
        }
        r
    }
}

// ---------------------------------------------------------------------------------------------
// Rows

const COLUMNS: &str = "id, seq, message_id, session_id, label, content_type, correlation_id, reply_to, reply_to_session_id, to_addr, \
     properties, body, enqueued_at, expires_at, ttl_ms, delivery_count, lock_token, locked_until, dead_letter_source, scheduled_at, \
     dlq, session_lock";

/// A stored message with the bookkeeping the API does not show.
pub(crate) struct StoredRow {
    pub id: i64,
    pub dlq: bool,
    pub session_lock: Option<String>,
    pub message: Message,
}

pub(crate) fn time(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or(DateTime::<Utc>::MAX_UTC)
}

fn read_row(r: &Row<'_>) -> rusqlite::Result<StoredRow> {
    let props_text: String = r.get(10)?;
    let properties: BTreeMap<String, Value> = serde_json::from_str(&props_text)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(10, rusqlite::types::Type::Text, Box::new(e)))?;
    let lock_token: Option<String> = r.get(16)?;
    let delivery_count: i64 = r.get(15)?;
    let ttl_ms: Option<i64> = r.get(14)?;
    Ok(StoredRow {
        id: r.get(0)?,
        dlq: r.get::<_, i64>(20)? != 0,
        session_lock: r.get(21)?,
        message: Message {
            sequence_number: r.get(1)?,
            message_id: r.get(2)?,
            session_id: r.get(3)?,
            label: r.get(4)?,
            content_type: r.get(5)?,
            correlation_id: r.get(6)?,
            reply_to: r.get(7)?,
            reply_to_session_id: r.get(8)?,
            to: r.get(9)?,
            properties,
            body: r.get(11)?,
            enqueued_at: time(r.get(12)?),
            expires_at: r.get::<_, Option<i64>>(13)?.map(time),
            time_to_live: ttl_ms.map(|t| Duration::from_millis(u64::try_from(t).unwrap_or(0))),
            delivery_count: u32::try_from(delivery_count).unwrap_or(u32::MAX),
            lock_token: lock_token.and_then(|t| Uuid::parse_str(&t).ok()),
            locked_until: r.get::<_, Option<i64>>(17)?.map(time),
            dead_letter_source: r.get(18)?,
            scheduled_enqueue_time: r.get::<_, Option<i64>>(19)?.map(time),
        },
    })
}

fn query_rows(tx: &Connection, where_clause: &str, params: impl rusqlite::Params) -> Result<Vec<StoredRow>, BusError> {
    let sql = format!("SELECT {COLUMNS} FROM messages WHERE {where_clause}");
    let mut stmt = tx.prepare_cached(&sql)?;
    let rows = stmt.query_map(params, read_row)?.collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows)
}

fn query_row(tx: &Connection, where_clause: &str, params: impl rusqlite::Params) -> Result<Option<StoredRow>, BusError> {
    Ok(query_rows(tx, where_clause, params)?.into_iter().next())
}

// ---------------------------------------------------------------------------------------------
// Send

/// Store `msgs` (one transaction: all or nothing). Returns one outcome per message and the
/// receivers that got something.
pub(crate) fn send(
    tx: &Connection,
    resolved: &Resolved,
    sender: &Sender,
    msgs: Vec<NewMessage>,
    now: i64,
    max_body: usize,
) -> Result<(Vec<SendOutcome>, Vec<String>), BusError> {
    let mut outcomes = Vec::with_capacity(msgs.len());
    let mut touched = Vec::new();
    if let Some(window) = sender.duplicate_window {
        tx.prepare_cached("DELETE FROM duplicates WHERE entity = ?1 AND seen_at <= ?2")?.execute(params![sender.key, now - ms(window)])?;
    }
    for msg in msgs {
        if msg.body.len() > max_body {
            return Err(BusError::MessageTooLarge { size: msg.body.len(), max: max_body });
        }
        let message_id = match msg.message_id {
            Some(id) => id,
            None => Uuid::new_v4().simple().to_string(),
        };
        check_id("MessageId", Some(&message_id))?;
        check_id("SessionId", msg.session_id.as_deref())?;
        if msg.time_to_live.is_some_and(|t| t.is_zero()) {
            return Err(BusError::InvalidMessage("TimeToLive must be positive".into()));
        }

        if sender.duplicate_window.is_some() {
            let seen: Option<i64> = tx
                .prepare_cached("SELECT seen_at FROM duplicates WHERE entity = ?1 AND message_id = ?2")?
                .query_row(params![sender.key, message_id], |r| r.get(0))
                .optional()?;
            if seen.is_some() {
                outcomes.push(SendOutcome::Duplicate);
                continue;
            }
        }

        let draft = Draft {
            message_id,
            session_id: msg.session_id,
            label: msg.label,
            content_type: msg.content_type,
            correlation_id: msg.correlation_id,
            reply_to: msg.reply_to,
            reply_to_session_id: msg.reply_to_session_id,
            to: msg.to,
            properties: msg.properties,
        };
        let mut copies = Vec::new();
        for (key, rules) in &sender.targets {
            let Some(receiver) = resolved.receivers.get(key) else { continue };
            let copy = if rules.is_empty() {
                Some(draft.clone())
            } else {
                rules.iter().find(|r| rule_matches(r, &draft)).map(|r| {
                    let mut copy = draft.clone();
                    if let Some(action) = &r.action {
                        action.apply(&mut copy);
                    }
                    copy
                })
            };
            if let Some(copy) = copy {
                if receiver.requires_session && copy.session_id.is_none() {
                    return Err(BusError::InvalidMessage(format!(
                        "`{}` requires sessions: the message needs a SessionId (sent to `{}`)",
                        receiver.display, sender.display
                    )));
                }
                copies.push((receiver, copy));
            }
        }

        let visible_at = msg.scheduled_enqueue_time.map_or(now, |t| t.timestamp_millis().max(now));
        let mut seqs = Vec::with_capacity(copies.len());
        for (receiver, copy) in copies {
            let ttl = min_ttl(min_ttl(msg.time_to_live, sender.ttl), receiver.ttl);
            let expires_at = ttl.map(|t| visible_at.saturating_add(ms(t)));
            let seq: i64 = tx
                .prepare_cached(
                    "INSERT INTO sequences (entity, last) VALUES (?1, 1)
                     ON CONFLICT (entity) DO UPDATE SET last = last + 1 RETURNING last",
                )?
                .query_row(params![receiver.key], |r| r.get(0))?;
            let props = serde_json::to_string(&copy.properties).map_err(|e| BusError::InvalidMessage(format!("properties: {e}")))?;
            tx.prepare_cached(
                "INSERT INTO messages (entity, seq, message_id, session_id, label, content_type, correlation_id, reply_to,
                    reply_to_session_id, to_addr, properties, body, enqueued_at, visible_at, pending, scheduled_at, expires_at, ttl_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?13, ?14, ?15, ?16, ?17)",
            )?
            .execute(params![
                receiver.key,
                seq,
                copy.message_id,
                copy.session_id,
                copy.label,
                copy.content_type,
                copy.correlation_id,
                copy.reply_to,
                copy.reply_to_session_id,
                copy.to,
                props,
                msg.body,
                visible_at,
                visible_at > now,
                msg.scheduled_enqueue_time.map(|t| t.timestamp_millis()),
                expires_at,
                ttl.map(ms),
            ])?;
            seqs.push(seq);
            touched.push(receiver.key.clone());
        }
        if sender.duplicate_window.is_some() {
            tx.prepare_cached("INSERT INTO duplicates (entity, message_id, seen_at) VALUES (?1, ?2, ?3)")?.execute(params![
                sender.key,
                draft.message_id,
                now
            ])?;
        }
        outcomes.push(SendOutcome::Enqueued(seqs));
    }
    Ok((outcomes, touched))
}

fn check_id(what: &str, id: Option<&str>) -> Result<(), BusError> {
    match id {
        Some("") => Err(BusError::InvalidMessage(format!("{what} must not be empty"))),
        Some(id) if id.chars().count() > MAX_ID_LEN => {
            Err(BusError::InvalidMessage(format!("{what} is longer than {MAX_ID_LEN} characters")))
        }
        _ => Ok(()),
    }
}

fn rule_matches(rule: &Rule, m: &dyn FilterFields) -> bool {
    match &rule.filter {
        Filter::Correlation(f) => f.matches(m),
        Filter::Sql(f) => f.matches(m),
    }
}

// ---------------------------------------------------------------------------------------------
// Housekeeping: lock expiry, max delivery count, TTL

/// Apply everything time has done to `r` since the last look. Returns whether anything changed.
pub(crate) fn housekeep(tx: &Connection, r: &Receiver, now: i64) -> Result<bool, BusError> {
    // Scheduled messages whose time has come join the queue.
    let mut changed = tx
        .prepare_cached("UPDATE messages SET pending = 0 WHERE entity = ?1 AND pending = 1 AND visible_at <= ?2")?
        .execute(params![r.key, now])?
        > 0;
    // Expired locks: the message is available again, or dead-lettered if it used up its deliveries.
    let expired = query_rows(tx, "entity = ?1 AND lock_token IS NOT NULL AND locked_until <= ?2", params![r.key, now])?;
    for row in expired {
        unlock(tx, r, &row)?;
        changed = true;
    }
    // Expired messages (never the DLQ, never while locked).
    let dead = query_rows(
        tx,
        "entity = ?1 AND dlq = 0 AND lock_token IS NULL AND expires_at IS NOT NULL AND expires_at <= ?2",
        params![r.key, now],
    )?;
    for row in dead {
        if r.dead_letter_on_expiration {
            dead_letter_row(tx, r, &row, REASON_TTL, "The message expired and was dead lettered.")?;
        } else {
            tx.prepare_cached("DELETE FROM messages WHERE id = ?1")?.execute(params![row.id])?;
        }
        changed = true;
    }
    // Session locks nobody renewed: forget them (their messages count as unheld; see accept_session).
    tx.prepare_cached("DELETE FROM sessions WHERE entity = ?1 AND locked_until <= ?2")?.execute(params![r.key, now])?;
    Ok(changed)
}

/// Release a message's lock: it becomes available, or goes to the DLQ when it would be delivered
/// again after MaxDeliveryCount deliveries.
fn unlock(tx: &Connection, r: &Receiver, row: &StoredRow) -> Result<(), BusError> {
    if !row.dlq && row.message.delivery_count >= r.max_delivery_count {
        let description = format!("Message could not be consumed after {} delivery attempts.", row.message.delivery_count);
        return dead_letter_row(tx, r, row, REASON_MAX_DELIVERY, &description);
    }
    tx.prepare_cached("UPDATE messages SET lock_token = NULL, locked_until = NULL, session_lock = NULL WHERE id = ?1")?
        .execute(params![row.id])?;
    Ok(())
}

fn dead_letter_row(tx: &Connection, r: &Receiver, row: &StoredRow, reason: &str, description: &str) -> Result<(), BusError> {
    let mut props = row.message.properties.clone();
    props.insert("DeadLetterReason".into(), Value::String(reason.into()));
    props.insert("DeadLetterErrorDescription".into(), Value::String(description.into()));
    let props = serde_json::to_string(&props).map_err(|e| BusError::Storage(format!("properties: {e}")))?;
    tx.prepare_cached(
        "UPDATE messages SET dlq = 1, lock_token = NULL, locked_until = NULL, session_lock = NULL, properties = ?2,
            dead_letter_source = ?3 WHERE id = ?1",
    )?
    .execute(params![row.id, props, r.display])?;
    Ok(())
}

/// The earliest moment something may become receivable (scheduled message, lock or session expiry).
pub(crate) fn next_due(tx: &Connection, r: &Receiver, now: i64) -> Result<Option<i64>, BusError> {
    let due: Option<i64> = tx
        .prepare_cached(
            "SELECT MIN(t) FROM (
                SELECT MIN(visible_at) AS t FROM messages WHERE entity = ?1 AND pending = 1
                UNION ALL SELECT MIN(locked_until) FROM messages WHERE entity = ?1 AND lock_token IS NOT NULL
                UNION ALL SELECT MIN(locked_until) FROM sessions WHERE entity = ?1 AND locked_until > ?2)",
        )?
        .query_row(params![r.key, now], |row| row.get(0))?;
    Ok(due)
}

// ---------------------------------------------------------------------------------------------
// Receive

// Receives run after `housekeep`, so `pending = 0` is exactly "due": the walk in sequence order
// uses the index of due messages and never steps over the scheduled ones.
const NEXT_DUE: &str = "entity = ?1 AND dlq = ?2 AND pending = 0 AND lock_token IS NULL ORDER BY seq LIMIT 1";
const NEXT_SESSION: &str = "SELECT m.session_id FROM messages m
     WHERE m.entity = ?1 AND m.dlq = 0 AND m.pending = 0 AND m.session_id IS NOT NULL
       AND (m.lock_token IS NULL OR m.session_lock IS NOT NULL)
       AND NOT EXISTS (SELECT 1 FROM sessions s WHERE s.entity = m.entity AND s.session_id = m.session_id AND s.locked_until > ?2)
     ORDER BY m.seq LIMIT 1";

/// Peek-lock the first available message (not for session entities' main queue).
pub(crate) fn lock_next(tx: &Connection, r: &Receiver, dlq: bool, now: i64) -> Result<Option<Message>, BusError> {
    let Some(row) = query_row(tx, NEXT_DUE, params![r.key, dlq])? else {
        return Ok(None);
    };
    lock_row(tx, row, now.saturating_add(r.lock_ms), None).map(Some)
}

fn lock_row(tx: &Connection, row: StoredRow, until: i64, session_lock: Option<&str>) -> Result<Message, BusError> {
    let token = Uuid::new_v4();
    tx.prepare_cached(
        "UPDATE messages SET lock_token = ?2, locked_until = ?3, delivery_count = delivery_count + 1, session_lock = ?4 WHERE id = ?1",
    )?
    .execute(params![row.id, token.to_string(), until, session_lock])?;
    let mut m = row.message;
    m.delivery_count = m.delivery_count.saturating_add(1);
    m.lock_token = Some(token);
    m.locked_until = Some(time(until));
    Ok(m)
}

/// Receive-and-delete the first available message.
pub(crate) fn take_next(tx: &Connection, r: &Receiver, dlq: bool) -> Result<Option<Message>, BusError> {
    let Some(row) = query_row(tx, NEXT_DUE, params![r.key, dlq])? else {
        return Ok(None);
    };
    tx.prepare_cached("DELETE FROM messages WHERE id = ?1")?.execute(params![row.id])?;
    let mut m = row.message;
    m.delivery_count = m.delivery_count.saturating_add(1);
    m.lock_token = None;
    m.locked_until = None;
    Ok(Some(m))
}

// ---------------------------------------------------------------------------------------------
// Settlement

#[derive(Debug, Clone)]
pub(crate) enum Settle {
    Complete,
    Abandon,
    Renew,
    DeadLetter { reason: String, description: String },
}

/// Settle the message locked with `token`. `id` (REST) must name the same message by sequence
/// number or MessageId. Returns the new lock expiry for `Renew`.
pub(crate) fn settle(
    tx: &Connection,
    r: &Receiver,
    dlq: bool,
    token: Uuid,
    id: Option<&str>,
    op: &Settle,
    now: i64,
) -> Result<Option<i64>, BusError> {
    let row =
        query_row(tx, "lock_token = ?1 AND entity = ?2 AND dlq = ?3", params![token.to_string(), r.key, dlq])?.ok_or(BusError::LockLost)?;
    if row.message.locked_until.is_none_or(|u| u.timestamp_millis() <= now) {
        return Err(BusError::LockLost);
    }
    if let Some(id) = id
        && id != row.message.sequence_number.to_string()
        && id != row.message.message_id
    {
        return Err(BusError::LockLost);
    }
    if let (Some(session_token), Some(session_id)) = (&row.session_lock, &row.message.session_id) {
        let held: Option<i64> = tx
            .prepare_cached("SELECT locked_until FROM sessions WHERE entity = ?1 AND session_id = ?2 AND token = ?3")?
            .query_row(params![r.key, session_id, session_token], |x| x.get(0))
            .optional()?;
        if held.is_none_or(|until| until <= now) {
            return Err(BusError::LockLost);
        }
    }
    match op {
        Settle::Complete => {
            tx.prepare_cached("DELETE FROM messages WHERE id = ?1")?.execute(params![row.id])?;
            Ok(None)
        }
        Settle::Abandon => {
            unlock(tx, r, &row)?;
            Ok(None)
        }
        // A session message's lock is the session lock: renew that. (The SDK's session receiver
        // refuses RenewMessageLock: Azure/azure-sdk-for-net Azure.Messaging.ServiceBus
        // `ServiceBusReceiver.ThrowIfSessionReceiver`.)
        Settle::Renew if row.session_lock.is_some() => {
            Err(BusError::InvalidOperation("a session message's lock is its session's: renew the session lock".into()))
        }
        Settle::Renew => {
            let until = now.saturating_add(r.lock_ms);
            tx.prepare_cached("UPDATE messages SET locked_until = ?2 WHERE id = ?1")?.execute(params![row.id, until])?;
            Ok(Some(until))
        }
        Settle::DeadLetter { reason, description } => {
            dead_letter_row(tx, r, &row, reason, description)?;
            Ok(None)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Sessions

/// Lock the session (of `r`) whose oldest message is first among sessions that have an available
/// message and no live holder. Returns (session id, token, locked until).
pub(crate) fn accept_session(tx: &Connection, r: &Receiver, now: i64) -> Result<Option<(String, Uuid, i64)>, BusError> {
    // A message locked under a dead session lock counts as available: the next holder gets it.
    let session: Option<String> = tx.prepare_cached(NEXT_SESSION)?.query_row(params![r.key, now], |x| x.get(0)).optional()?;
    let Some(session_id) = session else { return Ok(None) };
    let orphans = query_rows(tx, "entity = ?1 AND session_id = ?2 AND session_lock IS NOT NULL", params![r.key, session_id])?;
    for row in orphans {
        unlock(tx, r, &row)?;
    }
    let token = Uuid::new_v4();
    let until = now.saturating_add(r.lock_ms);
    tx.prepare_cached("INSERT OR REPLACE INTO sessions (entity, session_id, token, locked_until) VALUES (?1, ?2, ?3, ?4)")?
        .execute(params![r.key, session_id, token.to_string(), until])?;
    Ok(Some((session_id, token, until)))
}

/// Until when the holder with `token` has the session (`None`: it does not, or no longer).
fn session_held(tx: &Connection, r: &Receiver, session_id: &str, token: Uuid, now: i64) -> Result<Option<i64>, BusError> {
    let until: Option<i64> = tx
        .prepare_cached("SELECT locked_until FROM sessions WHERE entity = ?1 AND session_id = ?2 AND token = ?3")?
        .query_row(params![r.key, session_id, token.to_string()], |x| x.get(0))
        .optional()?;
    Ok(until.filter(|u| *u > now))
}

/// The next message of the session, strictly in order: none while an earlier one is locked.
pub(crate) fn session_lock_next(
    tx: &Connection,
    r: &Receiver,
    session_id: &str,
    token: Uuid,
    now: i64,
) -> Result<Option<Message>, BusError> {
    let Some(session_until) = session_held(tx, r, session_id, token, now)? else {
        return Err(BusError::LockLost);
    };
    let Some(row) =
        query_row(tx, "entity = ?1 AND dlq = 0 AND session_id = ?2 AND pending = 0 ORDER BY seq LIMIT 1", params![r.key, session_id])?
    else {
        return Ok(None);
    };
    if row.message.lock_token.is_some() {
        return Ok(None);
    }
    // A session's messages are locked by the session lock: theirs ends when it ends (and is
    // renewed with it), however late in the session's hold they were received.
    lock_row(tx, row, session_until, Some(&token.to_string())).map(Some)
}

/// Extend the session lock and the locks of the messages received under it.
pub(crate) fn renew_session(tx: &Connection, r: &Receiver, session_id: &str, token: Uuid, now: i64) -> Result<i64, BusError> {
    if session_held(tx, r, session_id, token, now)?.is_none() {
        return Err(BusError::LockLost);
    }
    let until = now.saturating_add(r.lock_ms);
    tx.prepare_cached("UPDATE sessions SET locked_until = ?4 WHERE entity = ?1 AND session_id = ?2 AND token = ?3")?.execute(params![
        r.key,
        session_id,
        token.to_string(),
        until
    ])?;
    tx.prepare_cached(
        "UPDATE messages SET locked_until = ?3 WHERE entity = ?1 AND session_lock = ?2 AND lock_token IS NOT NULL AND locked_until > ?4",
    )?
    .execute(params![r.key, token.to_string(), until, now])?;
    Ok(until)
}

/// Give the session up: its locked messages become available to the next holder.
pub(crate) fn release_session(tx: &Connection, r: &Receiver, session_id: &str, token: Uuid) -> Result<(), BusError> {
    tx.prepare_cached("DELETE FROM sessions WHERE entity = ?1 AND session_id = ?2 AND token = ?3")?.execute(params![
        r.key,
        session_id,
        token.to_string()
    ])?;
    // (A session lock comes with a message lock: `lock_token` lets the query use the index of locks.)
    let rows = query_rows(tx, "entity = ?1 AND lock_token IS NOT NULL AND session_lock = ?2", params![r.key, token.to_string()])?;
    for row in rows {
        unlock(tx, r, &row)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Browse and counts

pub(crate) fn peek(tx: &Connection, r: &Receiver, dlq: bool, from: i64, max: usize) -> Result<Vec<Message>, BusError> {
    let max = i64::try_from(max).unwrap_or(i64::MAX);
    let rows = query_rows(tx, "entity = ?1 AND dlq = ?2 AND seq >= ?3 ORDER BY seq LIMIT ?4", params![r.key, dlq, from, max])?;
    Ok(rows
        .into_iter()
        .map(|row| {
            let mut m = row.message;
            // Browsing never hands out a lock: the token stays with its holder.
            m.lock_token = None;
            m
        })
        .collect())
}

pub(crate) fn counts(tx: &Connection, r: &Receiver) -> Result<EntityCounts, BusError> {
    let (active, scheduled, dead, locked): (Option<i64>, Option<i64>, Option<i64>, Option<i64>) = tx
        .prepare_cached(
            "SELECT SUM(dlq = 0 AND pending = 0 AND lock_token IS NULL), SUM(dlq = 0 AND pending = 1),
                    SUM(dlq = 1), SUM(lock_token IS NOT NULL)
             FROM messages WHERE entity = ?1",
        )?
        .query_row(params![r.key], |x| Ok((x.get(0)?, x.get(1)?, x.get(2)?, x.get(3)?)))?;
    let n = |v: Option<i64>| u64::try_from(v.unwrap_or(0)).unwrap_or(0);
    Ok(EntityCounts { active: n(active), scheduled: n(scheduled), dead_lettered: n(dead), locked: n(locked) })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn plan(conn: &Connection, sql: &str) -> String {
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let rows = stmt.query_map(params!["q", 0], |r| r.get::<_, String>(3)).unwrap();
        rows.map(Result::unwrap).collect::<Vec<_>>().join("; ")
    }

    #[test]
    fn receives_walk_the_index_of_due_messages_in_order() {
        let conn = Connection::open_in_memory().unwrap();
        init(&conn, false).unwrap();
        // Scheduled messages stay out of `messages_active`, so however many wait for their
        // time, a receive reads only due ones; and no sort step: the index gives `seq` order.
        for sql in [format!("SELECT {COLUMNS} FROM messages WHERE {NEXT_DUE}"), NEXT_SESSION.to_string()] {
            let plan = plan(&conn, &sql);
            assert!(plan.contains("USING INDEX messages_active"), "{plan}");
            assert!(!plan.contains("TEMP B-TREE"), "{plan}");
        }
    }
}
