//! Dead-letter operations: list, show, replay and purge what was set aside — the dead-letter
//! sub-queue of every subscription (MaxDeliveryCount, expiry) and the parking queue the handler
//! puts poison on — through the Service Bus REST data plane with the unmodified
//! `azure_messaging_servicebus` client, so the same code works on the local bus and on Azure.
//!
//! REST has no browse, so reading a queue locks its messages (peek-lock) and unlocks those it
//! leaves; a dead-letter queue has no other receiver. A message's deliveries are shown as they
//! were when it was set aside (`DeadLetterErrorDescription` / `OriginalDeliveryCount`), not the
//! count our own reads add.
//!
//! A replay sends the original body again, with its CloudEvent id and CloudEvents properties, its
//! Label and SessionId, to the topic — the subscription it came from takes it again by its filter
//! (and `audit` keeps a copy) — under a **new** MessageId, so duplicate detection does not drop
//! it; the dead-lettered copy is completed only after that send succeeded, so a failed send leaves
//! it where it was. The step's own idempotency key makes a replay of an event whose effect was
//! applied a no-op. Every replay and purge is audited as a `deadletter.handled` event.

use crate::adapters::servicebus::{ConnectionString, RewriteClient};
use crate::error::{Error, Result};
use azure_messaging_servicebus::prelude::{QueueClient, TopicClient};
use azure_messaging_servicebus::service_bus::{PeekLockResponse, SendMessageOptions, SettableBrokerProperties};
use chrono::{DateTime, Utc};
use deploychain_events::{DeadLetterAction, DeadLetterHandled, DeployEvent, EventData, TraceContext};
use futures_util::StreamExt;
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// The subscriptions of the chain's topic (`infra/servicebus.json`): where dead letters collect.
pub const SUBSCRIPTIONS: [&str; 8] =
    ["on-push", "on-build-completed", "on-image-due", "on-image-ready", "on-deployment-due", "on-approval", "on-approval-due", "audit"];

/// One message that was set aside.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Letter {
    /// Where it is: `topic/subscriptions/sub/$DeadLetterQueue`, or the parking queue.
    pub entity: String,
    pub message_id: String,
    /// Its event type (Service Bus Label).
    pub event_type: Option<String>,
    pub run: Option<String>,
    pub session_id: Option<String>,
    pub reason: Option<String>,
    pub description: Option<String>,
    /// Deliveries before it was set aside.
    pub delivery_count: u32,
    pub enqueued_at: Option<DateTime<Utc>>,
    pub content_type: Option<String>,
    pub body: String,
    /// Application properties, values unquoted, names lower-cased (as they come over HTTP).
    pub properties: BTreeMap<String, String>,
}

/// Which letters an operation takes.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub ids: Vec<String>,
    pub event_type: Option<String>,
    pub run: Option<String>,
    pub reason: Option<String>,
    pub older_than: Option<Duration>,
    /// Only this entity (a subscription name, or the parking queue's name).
    pub entity: Option<String>,
}

impl Filter {
    pub fn matches(&self, l: &Letter, now: DateTime<Utc>) -> bool {
        let t = |want: &Option<String>, have: &Option<String>| {
            want.as_ref().is_none_or(|w| have.as_ref().is_some_and(|h| h.eq_ignore_ascii_case(w) || h.ends_with(w.as_str())))
        };
        (self.ids.is_empty() || self.ids.contains(&l.message_id))
            && t(&self.event_type, &l.event_type)
            && t(&self.run, &l.run)
            && t(&self.reason, &l.reason)
            && self.older_than.is_none_or(|d| l.enqueued_at.is_some_and(|e| (now - e).to_std().unwrap_or_default() >= d))
            && self.entity.as_ref().is_none_or(|e| l.entity.contains(e.as_str()))
    }
}

/// Letters locked at a time by a replay or purge.
const PAGE: usize = 500;
/// Letters a filter leaves that a replay or purge holds locked while it looks further.
const MAX_HELD: usize = 5000;
/// Sessions a replay or purge works on at once (without a rate limit).
const IN_FLIGHT: usize = 16;
/// Letters of one session being completed (and audited) while its next replays go out.
const FINISHING: usize = 8;

/// What a replay or purge did (or, dry, would do) with one letter.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Handled {
    pub entity: String,
    pub message_id: String,
    pub new_message_id: Option<String>,
    pub event_type: Option<String>,
    pub dry_run: bool,
}

pub struct DeadLetters {
    http: Arc<dyn azure_core::HttpClient>,
    namespace: String,
    key_name: String,
    key: String,
    topic: String,
    /// The subscriptions whose dead-letter queues are looked at.
    subscriptions: Vec<String>,
    parked: String,
    /// To give a replayed parked event its session again (`app/stage`), as the handler would.
    policy: Option<Arc<crate::policy::Policy>>,
}

/// Every response header, for the client's `custom_properties`.
struct AllHeaders(BTreeMap<String, String>);

impl From<azure_core::headers::Headers> for AllHeaders {
    fn from(h: azure_core::headers::Headers) -> Self {
        AllHeaders(h.iter().map(|(k, v)| (k.as_str().to_ascii_lowercase(), v.as_str().to_string())).collect())
    }
}

fn transient(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Transient(format!("{what}: {e}"))
}

/// A header value as Service Bus sends application properties: JSON-quoted strings unquoted.
fn unquote(v: &str) -> String {
    serde_json::from_str::<Value>(v).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_else(|| v.to_string())
}

impl DeadLetters {
    pub fn new(
        conn: &ConnectionString,
        topic: &str,
        subscriptions: Vec<String>,
        parked: &str,
        http: Arc<dyn azure_core::HttpClient>,
    ) -> DeadLetters {
        let http: Arc<dyn azure_core::HttpClient> = match conn.rewrite_base() {
            Some(base) => Arc::new(RewriteClient { base, inner: http }),
            None => http,
        };
        DeadLetters {
            http,
            namespace: conn.namespace(),
            key_name: conn.key_name.clone(),
            key: conn.key.clone(),
            topic: topic.to_string(),
            subscriptions,
            parked: parked.to_string(),
            policy: None,
        }
    }

    /// With the pipeline policy, a replayed event that lost its SessionId (parked messages do) gets
    /// the one the handler gives it.
    pub fn with_policy(mut self, policy: Arc<crate::policy::Policy>) -> DeadLetters {
        self.policy = Some(policy);
        self
    }

    /// Every entity looked at: each subscription's dead-letter queue, then the parking queue.
    pub fn entities(&self) -> Vec<String> {
        let mut e: Vec<String> = self.subscriptions.iter().map(|s| format!("{}/subscriptions/{s}/$DeadLetterQueue", self.topic)).collect();
        e.push(self.parked.clone());
        e
    }

    fn client(&self, entity: &str) -> Result<QueueClient> {
        // The client builds `https://{ns}.servicebus.windows.net/{entity}/messages/…`: any entity path works.
        QueueClient::new(self.http.clone(), self.namespace.clone(), entity, self.key_name.clone(), self.key.clone())
            .map_err(|e| transient("service bus client", e))
    }

    /// Lock every message of `entity` (up to `max`) and read it.
    async fn lock_all(&self, entity: &str, max: usize) -> Result<Vec<(Letter, PeekLockResponse)>> {
        let q = self.client(entity)?;
        let mut out = Vec::new();
        while out.len() < max {
            let m = q.peek_lock_message2(Some(Duration::from_secs(0))).await.map_err(|e| transient(entity, e))?;
            match u16::from(*m.status()) {
                201 => {}
                204 => break,
                404 | 410 => return Ok(out), // no such entity here: nothing set aside
                s => return Err(Error::Transient(format!("{entity}: peek-lock answered {s}"))),
            }
            let letter = read(entity, &m);
            out.push((letter, m));
        }
        Ok(out)
    }

    async fn unlock(&self, held: Vec<(Letter, PeekLockResponse)>) {
        for (l, m) in held {
            if let Err(e) = m.unlock_message().await {
                tracing::warn!(entity = l.entity, message_id = l.message_id, "unlock failed (the lock expires by itself): {e}");
            }
        }
    }

    /// Everything set aside that `filter` takes, oldest entity first; nothing changes.
    pub async fn list(&self, filter: &Filter) -> Result<Vec<Letter>> {
        let now = Utc::now();
        let mut out = Vec::new();
        for entity in self.entities() {
            let held = self.lock_all(&entity, 5000).await?;
            out.extend(held.iter().map(|(l, _)| l.clone()).filter(|l| filter.matches(l, now)));
            self.unlock(held).await;
        }
        Ok(out)
    }

    /// Send every letter `filter` takes again and complete it; `per_second` bounds the rate.
    /// With `dry_run`, only says what it would do. Audited as `deadletter.handled` events by `by`.
    pub async fn replay(&self, filter: &Filter, dry_run: bool, per_second: f64, by: &str) -> Result<Vec<Handled>> {
        self.handle(filter, dry_run, per_second, by, DeadLetterAction::Replayed).await
    }

    /// Remove every letter `filter` takes (audited); with `dry_run`, only says which.
    pub async fn purge(&self, filter: &Filter, dry_run: bool, by: &str) -> Result<Vec<Handled>> {
        self.handle(filter, dry_run, 0.0, by, DeadLetterAction::Purged).await
    }

    async fn handle(&self, filter: &Filter, dry_run: bool, per_second: f64, by: &str, action: DeadLetterAction) -> Result<Vec<Handled>> {
        let now = Utc::now();
        let topic = TopicClient::new(self.http.clone(), self.namespace.clone(), &self.topic, self.key_name.clone(), self.key.clone())
            .map_err(|e| transient("service bus topic client", e))?;
        let sender = topic.topic_sender();
        let pause = if per_second > 0.0 { Duration::from_secs_f64(1.0 / per_second) } else { Duration::ZERO };
        let mut done = Vec::new();
        // Letters are taken a page at a time, each page handled before its locks (a minute on
        // the subscriptions) run out even at a slow `per_second`; letters the filter leaves stay
        // locked until the entity is done (at most MAX_HELD), so the next page reaches past them.
        let page = if per_second > 0.0 { ((per_second * 30.0) as usize).clamp(1, PAGE) } else { PAGE };
        for entity in self.entities() {
            let mut kept: Vec<(Letter, PeekLockResponse)> = Vec::new();
            loop {
                let held = self.lock_all(&entity, page).await?;
                if held.is_empty() {
                    break;
                }
                let (take, keep): (Vec<_>, Vec<_>) = held.into_iter().partition(|(l, _)| filter.matches(l, now));
                kept.extend(keep);
                if kept.len() >= MAX_HELD {
                    tracing::warn!(entity, held = kept.len(), "stopping at the letters the filter left: look again with a narrower filter");
                    self.unlock(kept).await;
                    return Ok(done);
                }
                if dry_run {
                    // Held like the letters the filter leaves, so the next page is new ones.
                    for (l, m) in take {
                        done.push(Handled::of(&entity, &l, action, true));
                        kept.push((l, m));
                    }
                    continue;
                }
                // Letters of different sessions are handled side by side; a session's own letters
                // in their order. A rate limit makes it one at a time.
                let mut lanes: Vec<Vec<(Letter, PeekLockResponse)>> = Vec::new();
                let mut lane_of: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
                for (l, m) in take {
                    let key = l.session_id.clone().unwrap_or_else(|| l.message_id.clone());
                    let i = *lane_of.entry(key).or_insert_with(|| {
                        lanes.push(Vec::new());
                        lanes.len() - 1
                    });
                    lanes[i].push((l, m));
                }
                let in_flight = if pause.is_zero() { IN_FLIGHT } else { 1 };
                let results: Vec<(Vec<Handled>, Option<Error>)> = futures_util::stream::iter(lanes)
                    .map(|lane| self.lane(&sender, &entity, lane, by, action, pause))
                    .buffer_unordered(in_flight)
                    .collect()
                    .await;
                let mut failed = None;
                for (handled, err) in results {
                    done.extend(handled);
                    if let Some(e) = err {
                        failed.get_or_insert(e);
                    }
                }
                if let Some(e) = failed {
                    // Nothing is lost: what was not handled stays where it was.
                    self.unlock(kept).await;
                    return Err(e);
                }
            }
            self.unlock(kept).await;
        }
        Ok(done)
    }
}

impl Handled {
    fn of(entity: &str, l: &Letter, action: DeadLetterAction, dry_run: bool) -> Handled {
        Handled {
            entity: entity.to_string(),
            message_id: l.message_id.clone(),
            new_message_id: (action == DeadLetterAction::Replayed)
                .then(|| format!("{}.replay-{}", l.message_id, &uuid::Uuid::new_v4().simple().to_string()[..8])),
            event_type: l.event_type.clone(),
            dry_run,
        }
    }
}

impl DeadLetters {
    /// Replay or purge one session's letters in order; stops at the first failure, releasing
    /// the letters it did not get to. Returns what it did, and the failure.
    async fn lane(
        &self,
        sender: &azure_messaging_servicebus::service_bus::TopicSender,
        entity: &str,
        lane: Vec<(Letter, PeekLockResponse)>,
        by: &str,
        action: DeadLetterAction,
        pause: Duration,
    ) -> (Vec<Handled>, Option<Error>) {
        let mut done = Vec::new();
        let mut failed: Option<Error> = None;
        // The replays go out one after another, in order; completing each letter and sending
        // its audit event run alongside the next sends (a letter is completed only after its
        // replay was accepted).
        let mut finishing = futures_util::stream::FuturesUnordered::new();
        for (l, m) in lane {
            if failed.is_some() {
                let _ = m.unlock_message().await;
                continue;
            }
            let h = Handled::of(entity, &l, action, false);
            if let Some(id) = &h.new_message_id
                && let Err(e) = sender.send_message(&l.body, Some(replay_options(&l, id, self.policy.as_deref()))).await
            {
                let _ = m.unlock_message().await;
                failed = Some(transient(&format!("replaying {} from {entity}", l.message_id), e));
                continue;
            }
            finishing.push(self.finish(sender, entity, l, m, h, by, action));
            while finishing.len() >= FINISHING {
                match finishing.next().await {
                    Some(Ok(h)) => done.push(h),
                    Some(Err(e)) => {
                        failed.get_or_insert(e);
                    }
                    None => break,
                }
            }
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
        }
        while let Some(r) = finishing.next().await {
            match r {
                Ok(h) => done.push(h),
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        (done, failed)
    }

    /// Complete a handled letter and send its audit event.
    #[allow(clippy::too_many_arguments)]
    async fn finish(
        &self,
        sender: &azure_messaging_servicebus::service_bus::TopicSender,
        entity: &str,
        l: Letter,
        m: PeekLockResponse,
        h: Handled,
        by: &str,
        action: DeadLetterAction,
    ) -> Result<Handled> {
        m.delete_message().await.map_err(|e| transient(&format!("completing {} in {entity}", l.message_id), e))?;
        let audit = audit_event(&l, &h, by, action);
        let o = crate::adapters::Outbound::from_event(&audit, None);
        let opts = SendMessageOptions {
            content_type: Some(o.content_type.clone()),
            broker_properties: Some(SettableBrokerProperties {
                message_id: Some(o.message_id.clone()),
                label: Some(o.subject.clone()),
                ..Default::default()
            }),
            custom_properties: Some(o.properties.iter().map(|(k, v)| (k.clone(), format!("\"{v}\""))).collect()),
        };
        sender.send_message(&o.body, Some(opts)).await.map_err(|e| transient("sending the audit event", e))?;
        tracing::info!(entity, message_id = h.message_id, new_message_id = h.new_message_id, by, "dead letter {:?}", action);
        Ok(h)
    }
}

/// The CloudEvents AMQP binding's prefix of application property names (`cloudEvents_type`, …).
const CLOUDEVENTS_PREFIX: &str = "cloudEvents_";

/// The original message again, under a new MessageId: its Label, SessionId and content type, and
/// its CloudEvents properties (rebuilt from the body when it is a CloudEvent, else as they came).
fn replay_options(l: &Letter, new_id: &str, policy: Option<&crate::policy::Policy>) -> SendMessageOptions {
    let ev = DeployEvent::from_json_bytes(l.body.as_bytes()).ok();
    let props: std::collections::HashMap<String, String> = match &ev {
        Some(ev) => crate::adapters::Outbound::from_event(ev, None).properties.into_iter().map(|(k, v)| (k, format!("\"{v}\""))).collect(),
        // Names in any case (the AMQP binding's `cloudEvents_`, lower-cased by REST senders).
        None => l
            .properties
            .iter()
            .filter(|(k, _)| k.get(..CLOUDEVENTS_PREFIX.len()).is_some_and(|p| p.eq_ignore_ascii_case(CLOUDEVENTS_PREFIX)))
            .map(|(k, v)| (k.clone(), format!("\"{v}\"")))
            .collect(),
    };
    // A parked message lost its SessionId: the handler's rule gives it back.
    let session_id = l.session_id.clone().or_else(|| crate::steps::session_for(ev.as_ref()?, policy?));
    SendMessageOptions {
        content_type: l.content_type.clone(),
        broker_properties: Some(SettableBrokerProperties {
            message_id: Some(new_id.to_string()),
            label: l.event_type.clone(),
            session_id,
            ..Default::default()
        }),
        custom_properties: Some(props),
    }
}

fn audit_event(l: &Letter, h: &Handled, by: &str, action: DeadLetterAction) -> DeployEvent {
    let run = l.run.clone().filter(|r| !r.is_empty()).unwrap_or_else(|| "ops".into());
    let app = run.rsplit_once('-').map(|(a, _)| a.to_string()).filter(|_| run != "ops").unwrap_or_else(|| "ops".into());
    let word = match action {
        DeadLetterAction::Replayed => "replayed",
        DeadLetterAction::Purged => "purged",
    };
    DeployEvent {
        id: format!("{run}.deadletter-{word}.{}", deploychain_events::short_digest(&[&h.entity, &h.message_id, &Utc::now().to_rfc3339()])),
        source: "/deploychain/ops".into(),
        time: Utc::now(),
        run_id: run,
        trace: TraceContext::default(),
        data: EventData::DeadLetterHandled(DeadLetterHandled {
            app,
            action,
            entity: h.entity.clone(),
            message_id: h.message_id.clone(),
            new_message_id: h.new_message_id.clone(),
            event_type: h.event_type.clone(),
            reason: l.reason.clone(),
            by: by.to_string(),
        }),
    }
}

/// A locked message as a [`Letter`].
fn read(entity: &str, m: &PeekLockResponse) -> Letter {
    let headers = m.custom_properties::<AllHeaders>().map(|h| h.0).unwrap_or_default();
    let bp: Value = headers.get("brokerproperties").and_then(|b| serde_json::from_str(b).ok()).unwrap_or(Value::Null);
    let known = [
        "brokerproperties",
        "content-type",
        "content-length",
        "date",
        "location",
        "server",
        "transfer-encoding",
        "strict-transport-security",
    ];
    let properties: BTreeMap<String, String> =
        headers.iter().filter(|(k, _)| !known.contains(&k.as_str())).map(|(k, v)| (k.clone(), unquote(v))).collect();
    let get = |k: &str| properties.get(k).cloned();
    let body = m.body();
    let ev = DeployEvent::from_json_bytes(body.as_bytes()).ok();
    let description = get("deadlettererrordescription");
    // Deliveries before it was set aside: as the parking or the broker's description says.
    let before = get("originaldeliverycount")
        .and_then(|n| n.parse().ok())
        .or_else(|| description.as_deref().and_then(|d| d.split_whitespace().find_map(|w| w.parse::<u32>().ok())));
    Letter {
        entity: entity.to_string(),
        message_id: bp["MessageId"].as_str().unwrap_or_default().to_string(),
        event_type: bp["Label"].as_str().map(str::to_string).or_else(|| get("originalsubject")),
        run: ev.as_ref().map(|e| e.run_id.clone()).or_else(|| get("cloudevents_runid")),
        session_id: bp["SessionId"].as_str().map(str::to_string),
        reason: get("deadletterreason"),
        description,
        delivery_count: before.unwrap_or_else(|| bp["DeliveryCount"].as_u64().unwrap_or(0) as u32),
        enqueued_at: bp["EnqueuedTimeUtc"]
            .as_str()
            .and_then(|t| DateTime::parse_from_rfc2822(&t.replace("GMT", "+0000")).ok())
            .map(|t| t.with_timezone(&Utc)),
        content_type: headers.get("content-type").cloned(),
        body,
        properties,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replay_keeps_cloudevents_properties_whatever_their_case() {
        let l = Letter {
            entity: "deploychain-parked".into(),
            message_id: "m-1".into(),
            event_type: Some("dev.deploychain.push.v1".into()),
            run: None,
            session_id: None,
            reason: Some("MalformedEvent".into()),
            description: None,
            delivery_count: 1,
            enqueued_at: None,
            content_type: None,
            body: "not a CloudEvent".into(),
            properties: BTreeMap::from([
                ("cloudevents_id".to_string(), "a".to_string()),
                ("cloudEvents_type".to_string(), "b".to_string()),
                ("deadletterreason".to_string(), "MalformedEvent".to_string()),
            ]),
        };
        let props = replay_options(&l, "m-1.replay", None).custom_properties.unwrap_or_default();
        let mut names: Vec<&str> = props.keys().map(String::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["cloudEvents_type", "cloudevents_id"]);
        assert_eq!(props.get("cloudEvents_type").map(String::as_str), Some("\"b\""));
    }
}
