//! Service Bus trigger loops, as the Functions host's Service Bus extension runs them (§5): peek-lock,
//! build the envelope, invoke, complete on success, abandon on any failure or timeout; the broker
//! dead-letters after MaxDeliveryCount. At most `maxConcurrentCalls` invocations per function; for
//! session-enabled triggers, at most `maxConcurrentSessions` sessions, one message of a session at a
//! time, in order.
//!
//! Locks are renewed as the Service Bus SDK's processor renews them, and no longer
//! (Azure/azure-sdk-for-net `sdk/servicebus/Azure.Messaging.ServiceBus/src/Processor/`
//! `ReceiverManager.cs` and `SessionReceiverManager.cs`): a message's lock from when its
//! invocation starts, a session's lock from when the session is accepted (its messages' locks are
//! the session lock, never renewed apart), each renewal timed by `CalculateRenewDelay`, and the
//! renewing cancelled `maxAutoLockRenewalDuration` after it began. After that the lock lapses at
//! its LockDuration while the invocation may still run: the message (or the session with it)
//! is delivered again, and settling the first delivery fails with MessageLockLost /
//! SessionLockLost, which the host logs; that message is then neither completed nor abandoned.

use super::app::{BusTrigger, HostSettings};
use super::envelope::{bus_envelope, check_answer};
use super::worker::Worker;
use chrono::{DateTime, Utc};
use deploychain_bus::{Broker, BusError, EntityPath, Message, SessionLock};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Semaphore, watch};
use uuid::Uuid;

#[derive(Clone)]
pub struct TriggerLoop {
    pub function: String,
    pub trigger: BusTrigger,
    /// The function's `serviceBus` output bindings, and whether it has a `$return` binding.
    pub outputs: Vec<super::app::BusOutput>,
    pub has_return: bool,
    pub host: HostSettings,
    pub broker: Broker,
    pub worker: Worker,
    pub namespace: String,
}

const POLL: Duration = Duration::from_secs(2);

/// How long to wait before renewing a lock that ends at `until`: with half the time left, or 10 s
/// before the end when that is later; at once under 400 ms (`ReceiverManager.CalculateRenewDelay`).
fn renew_delay(until: DateTime<Utc>, now: DateTime<Utc>) -> Duration {
    let remaining = (until - now).to_std().unwrap_or_default();
    if remaining < Duration::from_millis(400) {
        return Duration::ZERO;
    }
    remaining - (remaining / 2).min(Duration::from_secs(10))
}

/// A lock the host keeps renewing while it works under it.
enum Held {
    Message { path: EntityPath, token: Uuid },
    Session(SessionLock),
}

impl Held {
    async fn renew(&self, broker: &Broker) -> Result<DateTime<Utc>, BusError> {
        match self {
            Held::Message { path, token } => broker.renew_lock(path, *token).await,
            Held::Session(s) => broker.renew_session(s).await,
        }
    }

    /// The SDK's name for losing it.
    fn lost(&self) -> &'static str {
        match self {
            Held::Message { .. } => "MessageLockLost",
            Held::Session(_) => "SessionLockLost",
        }
    }
}

/// Renew `held` (first ending at `until`) until `max` has passed since this started, or it is
/// lost; then it lapses at its LockDuration. `max` zero: never renewed, as the SDK's
/// `AutoRenewLock` is off then.
fn keep_renewing(broker: Broker, held: Held, until: DateTime<Utc>, max: Duration, function: String) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if max.is_zero() {
            return;
        }
        let mut until = until;
        let renewing = async {
            loop {
                tokio::time::sleep(renew_delay(until, Utc::now())).await;
                match held.renew(&broker).await {
                    Ok(next) => until = next,
                    Err(e) if e.is_transient() => {
                        tracing::warn!(target: "host", function, "renewing the lock failed, retrying: {e}");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Err(e) => {
                        tracing::error!(target: "host", function, "renewing the lock failed: {}: {e}", held.lost());
                        return;
                    }
                }
            }
        };
        if tokio::time::timeout(max, renewing).await.is_err() {
            tracing::debug!(target: "host", function, "maxAutoLockRenewalDuration ({max:?}) reached: the lock is no longer renewed");
        }
    })
}

impl TriggerLoop {
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let path: EntityPath = match self.trigger.entity.parse() {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(target: "host", function = self.function, "bad entity `{}`: {e}", self.trigger.entity);
                return;
            }
        };
        let me = Arc::new(self);
        if me.trigger.sessions {
            let mut tasks = Vec::new();
            for _ in 0..me.host.max_concurrent_sessions {
                let (me, path, stop) = (me.clone(), path.clone(), stop.clone());
                tasks.push(tokio::spawn(async move { me.session_worker(path, stop).await }));
            }
            let _ = stop.wait_for(|s| *s).await;
            for t in tasks {
                let _ = t.await;
            }
            return;
        }
        let sem = Arc::new(Semaphore::new(me.host.max_concurrent_calls));
        loop {
            let permit = tokio::select! {
                p = sem.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
                _ = stop.wait_for(|s| *s) => break,
            };
            let got = tokio::select! {
                r = me.broker.peek_lock(&path, POLL) => r,
                _ = stop.wait_for(|s| *s) => break,
            };
            match got {
                Ok(Some(m)) => {
                    let (me, path) = (me.clone(), path.clone());
                    tokio::spawn(async move {
                        me.process(&path, m, None).await;
                        drop(permit);
                    });
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(target: "host", function = me.function, "receive failed: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        // Let in-flight invocations finish settling.
        let _ = sem.acquire_many(me.host.max_concurrent_calls as u32).await;
    }

    async fn session_worker(self: Arc<Self>, path: EntityPath, mut stop: watch::Receiver<bool>) {
        loop {
            if *stop.borrow() {
                return;
            }
            let accepted = tokio::select! {
                r = self.broker.accept_session(&path, POLL) => r,
                _ = stop.wait_for(|s| *s) => return,
            };
            let session = match accepted {
                Ok(Some(s)) => s,
                Ok(None) => continue,
                Err(e) => {
                    tracing::error!(target: "host", function = self.function, "accept session failed: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            // The session lock is renewed from its acceptance, up to maxAutoLockRenewalDuration
            // in all, however many of its messages this worker goes through.
            let renew = keep_renewing(
                self.broker.clone(),
                Held::Session(session.clone()),
                session.locked_until,
                self.host.max_auto_lock_renewal,
                self.function.clone(),
            );
            loop {
                if *stop.borrow() {
                    break;
                }
                match self.broker.session_peek_lock(&session, Duration::from_millis(500)).await {
                    Ok(Some(m)) => self.process(&path, m, Some(&session)).await,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(target: "host", function = self.function, session = session.session_id, "session receive ended: {e}");
                        break;
                    }
                }
            }
            renew.abort();
            let _ = self.broker.release_session(&session).await;
        }
    }

    async fn process(&self, path: &EntityPath, m: Message, session: Option<&SessionLock>) {
        let Some(token) = m.lock_token else { return };
        let envelope = bus_envelope(&self.function, &self.trigger, &m, &self.namespace);
        // A message's own lock is renewed while its invocation runs; a session message's lock is
        // its session's, which the session worker renews.
        let renew = match (session, m.locked_until) {
            (None, Some(until)) => Some(keep_renewing(
                self.broker.clone(),
                Held::Message { path: path.clone(), token },
                until,
                self.host.max_auto_lock_renewal,
                self.function.clone(),
            )),
            _ => None,
        };
        let result = self.worker.invoke(&self.function, &envelope, self.host.function_timeout).await;
        let ok = match result {
            Ok(a) if (200..300).contains(&a.status) => match check_answer(a.content_type.as_deref(), &a.body) {
                Ok(v) => {
                    if let Some(logs) = v.get("Logs").and_then(|l| l.as_array()) {
                        for l in logs.iter().filter_map(|l| l.as_str()) {
                            tracing::info!(target: "function", function = self.function, "{l}");
                        }
                    }
                    // Outputs are bound after the handler returns; failing to write one fails the invocation.
                    match super::send_outputs(&self.broker, &self.outputs, self.has_return, &v, self.host.strict_outputs).await {
                        Ok(_) => true,
                        Err(why) => {
                            tracing::error!(target: "host", function = self.function, message_id = m.message_id, "{why}");
                            false
                        }
                    }
                }
                Err(why) => {
                    tracing::error!(target: "host", function = self.function, message_id = m.message_id, "{why}");
                    false
                }
            },
            Ok(a) => {
                let logs =
                    serde_json::from_slice::<serde_json::Value>(&a.body).ok().and_then(|v| v.get("Logs").cloned()).unwrap_or_default();
                tracing::warn!(target: "host", function = self.function, message_id = m.message_id, delivery = m.delivery_count, status = a.status, %logs, "invocation failed; abandoning");
                false
            }
            Err(e) => {
                tracing::warn!(target: "host", function = self.function, message_id = m.message_id, delivery = m.delivery_count, "invocation failed: {e:?}; abandoning");
                false
            }
        };
        let settled = if ok {
            if self.trigger.auto_complete { self.broker.complete(path, token).await } else { Ok(()) }
        } else {
            self.broker.abandon(path, token).await
        };
        // The SDK renews until the message is settled (outputs are bound before that).
        if let Some(r) = renew {
            r.abort();
        }
        let verb = if ok { "complete" } else { "abandon" };
        match settled {
            Ok(()) => self.worker.settled(&self.function, ok),
            Err(BusError::LockLost) => {
                let lost = if session.is_some() { "SessionLockLost" } else { "MessageLockLost" };
                tracing::error!(
                    target: "host",
                    function = self.function,
                    message_id = m.message_id,
                    delivery = m.delivery_count,
                    "could not {verb} the message: {lost}: its lock expired (renewed for at most maxAutoLockRenewalDuration, {:?}) \
                     and it is, or will be, delivered again",
                    self.host.max_auto_lock_renewal
                );
                self.worker.lock_lost(&self.function);
            }
            Err(e) => {
                tracing::error!(target: "host", function = self.function, message_id = m.message_id, "could not {verb} the message: {e}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::renew_delay;
    use chrono::{TimeDelta, Utc};
    use std::time::Duration;

    #[test]
    fn locks_are_renewed_when_the_sdk_renews_them() {
        let now = Utc::now();
        let at = |ms: i64| renew_delay(now + TimeDelta::milliseconds(ms), now);
        assert_eq!(at(1_000), Duration::from_millis(500), "half the time left");
        assert_eq!(at(60_000), Duration::from_secs(50), "10 s before the end of a long lock");
        assert_eq!(at(300), Duration::ZERO, "at once under 400 ms");
        assert_eq!(at(-5), Duration::ZERO, "at once when already due");
    }
}
