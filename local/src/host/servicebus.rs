//! Service Bus trigger loops, as the Functions host's Service Bus extension runs them (§5): peek-lock,
//! build the envelope, invoke, renew the lock while the invocation runs (up to
//! `maxAutoLockRenewalDuration`), complete on success, abandon on any failure or timeout; the broker
//! dead-letters after MaxDeliveryCount. At most `maxConcurrentCalls` invocations per function; for
//! session-enabled triggers, at most `maxConcurrentSessions` sessions, one message of a session at a
//! time, in order.

use super::app::{BusTrigger, HostSettings};
use super::envelope::{bus_envelope, check_answer};
use super::worker::Worker;
use deploychain_bus::{Broker, EntityPath, Message, SessionLock};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Semaphore, watch};

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
            // Hold the session for as long as this worker works through it: renew the session lock
            // (which covers its messages) at half its duration, up to maxAutoLockRenewalDuration.
            let renew = {
                let (broker, session) = (self.broker.clone(), session.clone());
                let lock_for = (session.locked_until - chrono::Utc::now()).to_std().unwrap_or(Duration::from_secs(1));
                let max = self.host.max_auto_lock_renewal;
                tokio::spawn(async move {
                    let every = (lock_for / 2).max(Duration::from_millis(100));
                    let started = tokio::time::Instant::now();
                    while started.elapsed() < max {
                        tokio::time::sleep(every).await;
                        if broker.renew_session(&session).await.is_err() {
                            return;
                        }
                    }
                })
            };
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
        // Renew the message (and session) lock at half its duration while the invocation runs.
        let renew = {
            let (broker, path, session) = (self.broker.clone(), path.clone(), session.cloned());
            let lock_for = m
                .locked_until
                .map(|u| (u - chrono::Utc::now()).to_std().unwrap_or(Duration::from_secs(1)))
                .unwrap_or(Duration::from_secs(30));
            let max = self.host.max_auto_lock_renewal;
            tokio::spawn(async move {
                let every = (lock_for / 2).max(Duration::from_millis(200));
                let started = tokio::time::Instant::now();
                loop {
                    tokio::time::sleep(every).await;
                    if started.elapsed() > max {
                        return;
                    }
                    if broker.renew_lock(&path, token).await.is_err() {
                        return;
                    }
                    if let Some(s) = &session {
                        let _ = broker.renew_session(s).await;
                    }
                }
            })
        };
        let result = self.worker.invoke(&self.function, &envelope, self.host.function_timeout).await;
        renew.abort();
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
        match settled {
            Ok(()) => self.worker.settled(&self.function, ok),
            Err(e) => tracing::warn!(target: "host", function = self.function, message_id = m.message_id, "settling failed: {e}"),
        }
    }
}
