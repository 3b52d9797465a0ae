//! The broker: the async API over the store. Each operation is all or nothing, and is answered
//! only once it is on disk. One writer thread owns the database and commits in groups: the
//! operations queued while a commit was running go into the next transaction together, each in
//! its own savepoint (a failed one rolls back alone), so concurrent senders and receivers share
//! one fsync instead of queueing for one each. Receivers long-poll, woken by a per-entity `Notify` when something is sent,
//! abandoned or released, and re-checking on their own when a scheduled message, a lock or a
//! session lock is due (or at least every second).

use crate::error::BusError;
use crate::message::{EntityCounts, Message, NewMessage, SendOutcome};
use crate::path::{Entity, EntityPath};
use crate::store::{self, Receiver, Resolved, Settle};
use crate::topology::Topology;
use chrono::{DateTime, Utc};
use rusqlite::{Connection, TransactionBehavior};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;
use uuid::Uuid;

/// Service Bus's standard-tier message size limit.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 256 * 1024;

/// Longest a long-polling receiver sleeps without looking again, whatever it was told.
const RECHECK: Duration = Duration::from_secs(1);

/// Tunables of a broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerOptions {
    /// Largest message body accepted; larger sends fail with `MessageTooLarge` (REST: 413).
    pub max_message_bytes: usize,
}

impl Default for BrokerOptions {
    fn default() -> Self {
        BrokerOptions { max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES }
    }
}

/// The embedded bus. Cheap to clone; all clones share one database connection.
///
/// One `Broker` per database file: wake-ups are in-process, so a second process (or a second
/// `Broker::open` of the same file) would see the data but not be woken by the first one's sends.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

struct Inner {
    topology: Topology,
    resolved: Resolved,
    /// The writer thread's queue (it owns the connection).
    jobs: Mutex<std::sync::mpsc::Sender<Job>>,
    /// One per receiving entity (shared with its dead-letter queue).
    wakers: HashMap<String, Arc<Notify>>,
    options: BrokerOptions,
    location: String,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker").field("database", &self.inner.location).field("options", &self.inner.options).finish_non_exhaustive()
    }
}

/// A held session: receive its messages in order with [`Broker::session_peek_lock`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionLock {
    pub path: EntityPath,
    pub session_id: String,
    /// As of acceptance; [`Broker::renew_session`] returns the new expiry.
    pub locked_until: DateTime<Utc>,
    token: Uuid,
}

impl SessionLock {
    /// The token that proves this holder owns the session.
    pub fn token(&self) -> Uuid {
        self.token
    }
}

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

/// Told whether the group its operation was in committed (`Err`: why not).
type Finish = Box<dyn FnOnce(Result<(), String>) + Send>;
/// One operation: run on the open transaction (or told it could not be opened); says whether it
/// succeeded (else its savepoint is rolled back) and how to answer once the group is committed.
type Job = Box<dyn FnOnce(Result<&Connection, &str>, i64) -> (bool, Finish) + Send>;

/// At most this many operations share one commit.
const MAX_GROUP: usize = 256;

/// The writer thread: wait for an operation, take every other one already queued, run them all in
/// one IMMEDIATE transaction (each in a savepoint), commit once, then answer them all.
fn writer(mut conn: Connection, queue: std::sync::mpsc::Receiver<Job>) {
    while let Ok(first) = queue.recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match queue.try_recv() {
                Ok(j) => group.push(j),
                Err(_) => break,
            }
        }
        let now = now_ms();
        let tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
            Ok(tx) => tx,
            Err(e) => {
                let why = format!("cannot start a transaction: {e}");
                for job in group {
                    let (_, finish) = job(Err(&why), now);
                    finish(Err(why.clone()));
                }
                continue;
            }
        };
        let mut finishers = Vec::with_capacity(group.len());
        for job in group {
            if let Err(e) = tx.execute_batch("SAVEPOINT op") {
                let (_, finish) = job(Err(&format!("cannot start a savepoint: {e}")), now);
                finishers.push(finish);
                continue;
            }
            // A panicking operation rolls back alone; its caller hears that the worker failed.
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(Ok(&tx), now))) {
                Ok((true, finish)) => {
                    let _ = tx.execute_batch("RELEASE op");
                    finishers.push(finish);
                }
                Ok((false, finish)) => {
                    let _ = tx.execute_batch("ROLLBACK TO op; RELEASE op");
                    finishers.push(finish);
                }
                Err(_) => {
                    let _ = tx.execute_batch("ROLLBACK TO op; RELEASE op");
                }
            }
        }
        let committed = tx.commit().map_err(|e| format!("commit failed: {e}"));
        for finish in finishers {
            finish(committed.clone());
        }
    }
}

impl Broker {
    /// Create or open the database at `path` (parent directories are created). Messages, locks,
    /// sessions and the duplicate-detection history of a previous run are all still there.
    pub fn open(path: &Path, topology: Topology) -> Result<Broker, BusError> {
        Broker::open_with(path, topology, BrokerOptions::default())
    }

    /// [`Broker::open`] with options.
    pub fn open_with(path: &Path, topology: Topology, options: BrokerOptions) -> Result<Broker, BusError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| BusError::Storage(format!("cannot create {}: {e}", dir.display())))?;
        }
        let conn = Connection::open(path).map_err(|e| BusError::Storage(format!("cannot open {}: {e}", path.display())))?;
        store::init(&conn, true)?;
        Ok(Broker::from_connection(conn, topology, options, path.display().to_string()))
    }

    /// A broker whose state lives only as long as it does (tests, throwaway runs).
    pub fn open_in_memory(topology: Topology) -> Result<Broker, BusError> {
        Broker::open_in_memory_with(topology, BrokerOptions::default())
    }

    /// [`Broker::open_in_memory`] with options.
    pub fn open_in_memory_with(topology: Topology, options: BrokerOptions) -> Result<Broker, BusError> {
        let conn = Connection::open_in_memory()?;
        store::init(&conn, false)?;
        Ok(Broker::from_connection(conn, topology, options, ":memory:".into()))
    }

    fn from_connection(conn: Connection, topology: Topology, options: BrokerOptions, location: String) -> Broker {
        let resolved = Resolved::new(&topology);
        let wakers = resolved.receivers.keys().map(|k| (k.clone(), Arc::new(Notify::new()))).collect();
        let (jobs, queue) = std::sync::mpsc::channel();
        // The thread ends when the last clone of the broker (the queue's sender) is gone.
        std::thread::Builder::new()
            .name("deploychain-bus-writer".into())
            .spawn(move || writer(conn, queue))
            .unwrap_or_else(|e| panic!("cannot start the bus writer thread: {e}"));
        Broker { inner: Arc::new(Inner { topology, resolved, jobs: Mutex::new(jobs), wakers, options, location }) }
    }

    /// The entities this broker serves.
    pub fn topology(&self) -> &Topology {
        &self.inner.topology
    }

    /// The options this broker was opened with.
    pub fn options(&self) -> &BrokerOptions {
        &self.inner.options
    }

    /// Send one message to a queue or topic.
    pub async fn send(&self, queue_or_topic: &str, msg: NewMessage) -> Result<SendOutcome, BusError> {
        let mut outcomes = self.send_batch(queue_or_topic, vec![msg]).await?;
        outcomes.pop().ok_or_else(|| BusError::Storage("send produced no outcome".into()))
    }

    /// Send several messages atomically: all are stored (or recognised as duplicates), or none.
    pub async fn send_batch(&self, queue_or_topic: &str, msgs: Vec<NewMessage>) -> Result<Vec<SendOutcome>, BusError> {
        let sender_key = self.sender_key(queue_or_topic)?;
        let max = self.inner.options.max_message_bytes;
        if let Some(big) = msgs.iter().find(|m| m.body.len() > max) {
            return Err(BusError::MessageTooLarge { size: big.body.len(), max });
        }
        let (outcomes, touched) = self
            .run(move |tx, inner, now| {
                let sender = inner.resolved.senders.get(&sender_key).ok_or_else(|| BusError::EntityNotFound(sender_key.clone()))?;
                store::send(tx, &inner.resolved, sender, msgs, now, max)
            })
            .await?;
        for key in touched {
            self.wake(&key);
        }
        Ok(outcomes)
    }

    /// Lock the next message (long-polling up to `wait`). Sets `lock_token`, `locked_until` =
    /// now + LockDuration, and increments `delivery_count`.
    pub async fn peek_lock(&self, path: &EntityPath, wait: Duration) -> Result<Option<Message>, BusError> {
        let r = self.receiver(path)?;
        if r.requires_session && !path.dead_letter {
            return Err(BusError::SessionRequired(r.display.clone()));
        }
        let dlq = path.dead_letter;
        self.poll(&r.key, wait, move |tx, r, now| store::lock_next(tx, r, dlq, now)).await
    }

    /// Remove and return the next message (long-polling up to `wait`).
    pub async fn receive_and_delete(&self, path: &EntityPath, wait: Duration) -> Result<Option<Message>, BusError> {
        let r = self.receiver(path)?;
        if r.requires_session && !path.dead_letter {
            return Err(BusError::SessionRequired(r.display.clone()));
        }
        let dlq = path.dead_letter;
        self.poll(&r.key, wait, move |tx, r, _| store::take_next(tx, r, dlq)).await
    }

    /// Delete a locked message. `LockLost` if the lock expired, was settled, or is unknown.
    pub async fn complete(&self, path: &EntityPath, lock_token: Uuid) -> Result<(), BusError> {
        self.settle(path, lock_token, None, Settle::Complete).await.map(|_| ())
    }

    /// Release the lock: the message is available again (delivery count already counted), or goes
    /// to the DLQ if it has had MaxDeliveryCount deliveries.
    pub async fn abandon(&self, path: &EntityPath, lock_token: Uuid) -> Result<(), BusError> {
        self.settle(path, lock_token, None, Settle::Abandon).await.map(|_| ())
    }

    /// Extend the lock by LockDuration from now; returns the new expiry.
    pub async fn renew_lock(&self, path: &EntityPath, lock_token: Uuid) -> Result<DateTime<Utc>, BusError> {
        let until = self.settle(path, lock_token, None, Settle::Renew).await?;
        until.map(store::time).ok_or_else(|| BusError::Storage("renew returned no expiry".into()))
    }

    /// Move a locked message to the dead-letter queue with `DeadLetterReason` and
    /// `DeadLetterErrorDescription`. Not allowed from a dead-letter queue.
    pub async fn dead_letter(&self, path: &EntityPath, lock_token: Uuid, reason: &str, description: &str) -> Result<(), BusError> {
        if path.dead_letter {
            return Err(BusError::InvalidOperation(format!("`{path}` is a dead-letter queue: its messages cannot be dead-lettered again")));
        }
        let op = Settle::DeadLetter { reason: reason.to_string(), description: description.to_string() };
        self.settle(path, lock_token, None, op).await.map(|_| ())
    }

    /// REST settlement: like the methods above, but the message must also match `id` (its
    /// sequence number or MessageId, as in the `Location` URL).
    pub(crate) async fn settle_rest(&self, path: &EntityPath, lock_token: Uuid, id: &str, op: Settle) -> Result<Option<i64>, BusError> {
        self.settle(path, lock_token, Some(id.to_string()), op).await
    }

    async fn settle(&self, path: &EntityPath, lock_token: Uuid, id: Option<String>, op: Settle) -> Result<Option<i64>, BusError> {
        let r = self.receiver(path)?;
        let key = r.key.clone();
        let dlq = path.dead_letter;
        // Completing can unblock a session's next message; abandoning and dead-lettering make one available.
        let wake = !matches!(op, Settle::Renew);
        let out = self
            .run(move |tx, inner, now| {
                let r = inner.receiver(&key)?;
                store::settle(tx, r, dlq, lock_token, id.as_deref(), &op, now)
            })
            .await?;
        if wake {
            self.wake(&r.key);
        }
        Ok(out)
    }

    /// Lock the next session that has an available message and no holder (FIFO by each session's
    /// oldest message), long-polling up to `wait`.
    pub async fn accept_session(&self, path: &EntityPath, wait: Duration) -> Result<Option<SessionLock>, BusError> {
        let r = self.receiver(path)?;
        if path.dead_letter || !r.requires_session {
            return Err(BusError::InvalidOperation(format!("`{path}` does not require sessions: use peek_lock")));
        }
        let found = self.poll(&r.key, wait, store::accept_session).await?;
        Ok(found.map(|(session_id, token, until)| SessionLock {
            path: path.main_queue(),
            session_id,
            locked_until: store::time(until),
            token,
        }))
    }

    /// The next message of the held session, strictly in sequence order: nothing while an earlier
    /// message of the session is still locked. `LockLost` once the session lock is gone.
    pub async fn session_peek_lock(&self, session: &SessionLock, wait: Duration) -> Result<Option<Message>, BusError> {
        let r = self.receiver(&session.path)?;
        let (id, token) = (session.session_id.clone(), session.token);
        self.poll(&r.key, wait, move |tx, r, now| store::session_lock_next(tx, r, &id, token, now)).await
    }

    /// Extend the session lock (and the locks of messages received under it) by LockDuration.
    pub async fn renew_session(&self, session: &SessionLock) -> Result<DateTime<Utc>, BusError> {
        let r = self.receiver(&session.path)?;
        let (key, id, token) = (r.key.clone(), session.session_id.clone(), session.token);
        let until = self.run(move |tx, inner, now| store::renew_session(tx, inner.receiver(&key)?, &id, token, now)).await?;
        Ok(store::time(until))
    }

    /// Give the session up; messages still locked under it become available to the next holder.
    pub async fn release_session(&self, session: &SessionLock) -> Result<(), BusError> {
        let r = self.receiver(&session.path)?;
        let (key, id, token) = (r.key.clone(), session.session_id.clone(), session.token);
        self.run(move |tx, inner, _| store::release_session(tx, inner.receiver(&key)?, &id, token)).await?;
        self.wake(&r.key);
        Ok(())
    }

    /// Browse up to `max` messages from sequence number `from_sequence` on, without locking
    /// (scheduled and locked messages included; lock tokens are not shown).
    pub async fn peek(&self, path: &EntityPath, from_sequence: i64, max: usize) -> Result<Vec<Message>, BusError> {
        let r = self.receiver(path)?;
        let (key, dlq) = (r.key.clone(), path.dead_letter);
        let (messages, changed) = self
            .run(move |tx, inner, now| {
                let r = inner.receiver(&key)?;
                let changed = store::housekeep(tx, r, now)?;
                Ok((store::peek(tx, r, dlq, from_sequence, max)?, changed))
            })
            .await?;
        if changed {
            self.wake(&r.key);
        }
        Ok(messages)
    }

    /// Fault injection: every lock held on `path` now — message locks and session locks — is
    /// lost at once, as when Service Bus moves an entity between its nodes or a receiver's link
    /// drops (`MessageLockLost`, `SessionLockLost`). The messages are available again (their
    /// deliveries count; the last one dead-letters), while whoever held them still works on
    /// them and fails to settle. How many message locks were lost.
    pub async fn lose_locks(&self, path: &EntityPath) -> Result<usize, BusError> {
        let r = self.receiver(path)?;
        let key = r.key.clone();
        let lost = self
            .run(move |tx, inner, now| {
                let r = inner.receiver(&key)?;
                let n = tx
                    .prepare_cached("UPDATE messages SET locked_until = ?2 WHERE entity = ?1 AND lock_token IS NOT NULL")?
                    .execute(rusqlite::params![r.key, now])?;
                tx.prepare_cached("UPDATE sessions SET locked_until = ?2 WHERE entity = ?1")?.execute(rusqlite::params![r.key, now])?;
                store::housekeep(tx, r, now)?;
                Ok(n)
            })
            .await?;
        self.wake(&r.key);
        Ok(lost)
    }

    /// Counts of the queue or subscription (the same for its dead-letter path).
    pub async fn count(&self, path: &EntityPath) -> Result<EntityCounts, BusError> {
        let r = self.receiver(path)?;
        let key = r.key.clone();
        let (counts, changed) = self
            .run(move |tx, inner, now| {
                let r = inner.receiver(&key)?;
                let changed = store::housekeep(tx, r, now)?;
                Ok((store::counts(tx, r)?, changed))
            })
            .await?;
        if changed {
            self.wake(&r.key);
        }
        Ok(counts)
    }

    // -----------------------------------------------------------------------------------------

    fn receiver(&self, path: &EntityPath) -> Result<&Receiver, BusError> {
        if let Some(r) = self.inner.resolved.receivers.get(&path.key()) {
            return Ok(r);
        }
        match &path.entity {
            Entity::Queue(name) if self.inner.topology.topic(name).is_some() => {
                Err(BusError::InvalidOperation(format!("`{name}` is a topic: receive from one of its subscriptions")))
            }
            _ => Err(BusError::EntityNotFound(path.to_string())),
        }
    }

    fn sender_key(&self, name: &str) -> Result<String, BusError> {
        let key = name.trim_matches('/').to_ascii_lowercase();
        if self.inner.resolved.senders.contains_key(&key) {
            return Ok(key);
        }
        match name.parse::<EntityPath>() {
            Ok(p) if p.dead_letter || matches!(p.entity, Entity::Subscription { .. }) => {
                Err(BusError::InvalidOperation(format!("cannot send to `{name}`: send to a queue or a topic")))
            }
            _ => Err(BusError::EntityNotFound(name.to_string())),
        }
    }

    fn wake(&self, key: &str) {
        if let Some(n) = self.inner.wakers.get(key) {
            n.notify_waiters();
        }
    }

    /// Run `f` all or nothing on the writer thread; answer once its transaction is committed.
    async fn run<T, F>(&self, f: F) -> Result<T, BusError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, &Inner, i64) -> Result<T, BusError> + Send + 'static,
    {
        let inner = self.inner.clone();
        let (answer, answered) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |conn, now| {
            let out = conn.map_err(|e| BusError::Storage(e.to_string())).and_then(|c| f(c, &inner, now));
            let ok = out.is_ok();
            let finish: Finish = Box::new(move |committed| {
                let _ = answer.send(match (out, committed) {
                    (Ok(v), Ok(())) => Ok(v),
                    (Err(e), _) => Err(e),
                    (Ok(_), Err(e)) => Err(BusError::Storage(e)),
                });
            });
            (ok, finish)
        });
        self.inner
            .jobs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .send(job)
            .map_err(|_| BusError::Storage("the bus writer has stopped".into()))?;
        answered.await.map_err(|_| BusError::Storage("bus worker failed: the operation panicked".into()))?
    }

    /// Try `attempt` (after housekeeping) until it finds something or `wait` has passed.
    async fn poll<T, F>(&self, key: &str, wait: Duration, attempt: F) -> Result<Option<T>, BusError>
    where
        T: Send + 'static,
        F: Fn(&Connection, &Receiver, i64) -> Result<Option<T>, BusError> + Send + Sync + 'static,
    {
        let waker = self.inner.wakers.get(key).cloned().ok_or_else(|| BusError::EntityNotFound(key.to_string()))?;
        // `wait` may be "forever" (Duration::MAX): saturate instead of overflowing the instant.
        let deadline = Instant::now().checked_add(wait).unwrap_or_else(|| Instant::now() + Duration::from_secs(10 * 365 * 86_400));
        let attempt = Arc::new(attempt);
        loop {
            // Register for wake-ups before looking, so a send between the look and the wait is not missed.
            let notified = waker.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();

            let (attempt, key_owned) = (attempt.clone(), key.to_string());
            let (found, due, changed) = self
                .run(move |tx, inner, now| {
                    let r = inner.receiver(&key_owned)?;
                    let changed = store::housekeep(tx, r, now)?;
                    let found = attempt(tx, r, now)?;
                    let due = if found.is_none() { store::next_due(tx, r, now)?.map(|d| d - now) } else { None };
                    Ok((found, due, changed))
                })
                .await?;
            if changed {
                // Housekeeping moved messages (e.g. into the DLQ): other waiters may now find one.
                waker.notify_waiters();
            }
            if found.is_some() {
                return Ok(found);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            let mut nap = left.min(RECHECK);
            if let Some(due_ms) = due {
                nap = nap.min(Duration::from_millis(u64::try_from(due_ms.max(1)).unwrap_or(1)));
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep(nap) => {}
            }
        }
    }
}

impl Inner {
    fn receiver(&self, key: &str) -> Result<&Receiver, BusError> {
        self.resolved.receivers.get(key).ok_or_else(|| BusError::EntityNotFound(key.to_string()))
    }
}
