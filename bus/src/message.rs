//! Messages going in (`NewMessage`) and coming out (`Message`), with Service Bus's names.

use crate::filter::{ActionFields, FilterFields, SystemProperty};
use chrono::{DateTime, Utc};
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::Duration;
use uuid::Uuid;

/// A message to send. Everything but the body is optional; a missing `message_id` gets a
/// generated one (a GUID in "N" format, as Service Bus does).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NewMessage {
    pub body: Vec<u8>,
    pub message_id: Option<String>,
    pub session_id: Option<String>,
    /// Service Bus's `Label` (the AMQP/SDK `Subject`).
    pub label: Option<String>,
    pub content_type: Option<String>,
    pub correlation_id: Option<String>,
    pub reply_to: Option<String>,
    pub to: Option<String>,
    /// Capped by the entity's DefaultMessageTimeToLive.
    pub time_to_live: Option<Duration>,
    /// In the future: the message stays invisible until then (it gets its sequence number now).
    pub scheduled_enqueue_time: Option<DateTime<Utc>>,
    /// Application properties.
    pub properties: BTreeMap<String, Value>,
    /// Addition to the host contract: `ReplyToSessionId` (REST sends it; correlation filters can match it).
    pub reply_to_session_id: Option<String>,
}

impl NewMessage {
    /// A message with this body and nothing else.
    pub fn new(body: impl Into<Vec<u8>>) -> NewMessage {
        NewMessage { body: body.into(), ..Default::default() }
    }
}

/// A message as received, peeked or dead-lettered.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// Increases per receiving entity (queue or subscription); kept when dead-lettered.
    pub sequence_number: i64,
    pub message_id: String,
    pub session_id: Option<String>,
    pub label: Option<String>,
    pub content_type: Option<String>,
    pub correlation_id: Option<String>,
    pub reply_to: Option<String>,
    pub to: Option<String>,
    /// Application properties; dead-lettered messages also carry `DeadLetterReason` and
    /// `DeadLetterErrorDescription`.
    pub properties: BTreeMap<String, Value>,
    pub body: Vec<u8>,
    /// When the message became (or, if scheduled, becomes) active.
    pub enqueued_at: DateTime<Utc>,
    /// `None`: never expires.
    pub expires_at: Option<DateTime<Utc>>,
    /// 1 on the first delivery, +1 on every redelivery.
    pub delivery_count: u32,
    /// Set on peek-lock; `None` for receive-and-delete and browse.
    pub lock_token: Option<Uuid>,
    pub locked_until: Option<DateTime<Utc>>,
    /// For dead-lettered messages: the entity that dead-lettered it (`queue` or `topic/subscriptions/sub`).
    pub dead_letter_source: Option<String>,
    // ---- additions to the host contract
    pub reply_to_session_id: Option<String>,
    /// The effective TTL (message TTL capped by the entity default); `None`: infinite.
    pub time_to_live: Option<Duration>,
    /// The requested scheduled enqueue time, if the sender set one.
    pub scheduled_enqueue_time: Option<DateTime<Utc>>,
}

impl Message {
    /// The `DeadLetterReason` property, if any.
    pub fn dead_letter_reason(&self) -> Option<&str> {
        self.properties.get("DeadLetterReason").and_then(Value::as_str)
    }

    /// The `DeadLetterErrorDescription` property, if any.
    pub fn dead_letter_error_description(&self) -> Option<&str> {
        self.properties.get("DeadLetterErrorDescription").and_then(Value::as_str)
    }

    /// The body as UTF-8 text, lossy.
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// What a send did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendOutcome {
    /// Stored: one sequence number per receiving entity (the queue, or each subscription whose
    /// filter matched; empty if no subscription matched and the message was dropped).
    Enqueued(Vec<i64>),
    /// The MessageId was seen within the duplicate detection window: accepted, nothing stored.
    Duplicate,
}

/// Message counts of one queue or subscription (the same figures for its dead-letter path).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EntityCounts {
    /// Receivable now: visible, not locked, not expired.
    pub active: u64,
    /// Waiting for their scheduled enqueue time.
    pub scheduled: u64,
    /// In the `$DeadLetterQueue` sub-queue.
    pub dead_lettered: u64,
    /// Locked by a receiver (main queue and dead-letter queue).
    pub locked: u64,
}

/// A message being routed at send time: what filters see and actions change.
#[derive(Debug, Clone)]
pub(crate) struct Draft {
    pub message_id: String,
    pub session_id: Option<String>,
    pub label: Option<String>,
    pub content_type: Option<String>,
    pub correlation_id: Option<String>,
    pub reply_to: Option<String>,
    pub reply_to_session_id: Option<String>,
    pub to: Option<String>,
    pub properties: BTreeMap<String, Value>,
}

impl FilterFields for Draft {
    fn system(&self, p: SystemProperty) -> Option<&str> {
        match p {
            SystemProperty::MessageId => Some(&self.message_id),
            SystemProperty::CorrelationId => self.correlation_id.as_deref(),
            SystemProperty::Label => self.label.as_deref(),
            SystemProperty::To => self.to.as_deref(),
            SystemProperty::ReplyTo => self.reply_to.as_deref(),
            SystemProperty::ReplyToSessionId => self.reply_to_session_id.as_deref(),
            SystemProperty::SessionId => self.session_id.as_deref(),
            SystemProperty::ContentType => self.content_type.as_deref(),
        }
    }

    fn properties(&self) -> &BTreeMap<String, Value> {
        &self.properties
    }
}

impl ActionFields for Draft {
    fn set_system(&mut self, p: SystemProperty, value: Option<String>) {
        match p {
            // An action may not change identity or session routing.
            SystemProperty::MessageId | SystemProperty::SessionId => {}
            SystemProperty::CorrelationId => self.correlation_id = value,
            SystemProperty::Label => self.label = value,
            SystemProperty::To => self.to = value,
            SystemProperty::ReplyTo => self.reply_to = value,
            SystemProperty::ReplyToSessionId => self.reply_to_session_id = value,
            SystemProperty::ContentType => self.content_type = value,
        }
    }

    fn properties_mut(&mut self) -> &mut BTreeMap<String, Value> {
        &mut self.properties
    }
}
