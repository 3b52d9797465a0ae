//! Shared test topology and helpers. Durations are short (lock 1 s, TTL 300 ms) so that every
//! test finishes in a few seconds.
#![allow(clippy::unwrap_used, dead_code)]

use deploychain_bus::{Broker, EntityPath, Message, NewMessage, Topology};
use std::path::PathBuf;
use std::time::Duration;

/// Config.json-shaped, with a comment like the emulator's sample.
pub const TOPOLOGY: &str = r#"{
  "UserConfig": {
    "Namespaces": [{
      "Name": "test",
      "Queues": [
        { "Name": "q", "Properties": { "LockDuration": "PT1S", "MaxDeliveryCount": 3 } },
        { "Name": "dedup", "Properties": { "RequiresDuplicateDetection": true, "DuplicateDetectionHistoryTimeWindow": "PT1S" } },
        { "Name": "dedup-long", "Properties": { "RequiresDuplicateDetection": true } },
        { "Name": "ttl-dlq", "Properties": { "DefaultMessageTimeToLive": "PT0.3S", "DeadLetteringOnMessageExpiration": true, "LockDuration": "PT1S" } },
        { "Name": "ttl-drop", "Properties": { "DefaultMessageTimeToLive": "PT0.3S" } },
        { "Name": "sessions", "Properties": { "RequiresSession": true, "LockDuration": "PT1S", "MaxDeliveryCount": 5 } }
      ],
      "Topics": [{
        "Name": "events",
        "Properties": { "RequiresDuplicateDetection": true, "DuplicateDetectionHistoryTimeWindow": "PT10M" },
        "Subscriptions": [
          { "Name": "push",
            "Properties": { "LockDuration": "PT1S", "MaxDeliveryCount": 2 },
            "Rules": [{ "Name": "type", "Properties": { "FilterType": "Correlation", "CorrelationFilter": { "Label": "push" } } }] },
          { "Name": "all",
            "Rules": [{ "Name": "all", "Properties": { "FilterType": "Sql", "SqlFilter": { "SqlExpression": "1=1" } } }] },
          { "Name": "none",
            "Rules": [{ "Name": "none", "Properties": { "FilterType": "Sql", "SqlFilter": { "SqlExpression": "1=0" } } }] },
          { "Name": "norules" },
          { "Name": "prod-or-web",
            "Rules": [
              { "Name": "web", "Properties": { "FilterType": "Correlation", "CorrelationFilter": { "Properties": { "app": "web" } } } },
              { "Name": "prod", "Properties": { "FilterType": "Sql", "SqlFilter": { "SqlExpression": "sys.Label = 'build' AND env = 'prod'" },
                                                "Action": { "SqlExpression": "SET routed = 'prod'" } } }
            ] }
        ]
      }]
    }]
  }
}"#;

pub fn topology() -> Topology {
    Topology::from_json_str(TOPOLOGY).unwrap()
}

pub fn memory() -> Broker {
    Broker::open_in_memory(topology()).unwrap()
}

/// A fresh directory under the target dir (kept for inspection after a failure).
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn q(name: &str) -> EntityPath {
    EntityPath::queue(name)
}

pub fn sub(topic: &str, name: &str) -> EntityPath {
    EntityPath::subscription(topic, name)
}

pub fn msg(body: &str) -> NewMessage {
    NewMessage::new(body)
}

pub fn with_id(body: &str, id: &str) -> NewMessage {
    NewMessage { message_id: Some(id.into()), ..NewMessage::new(body) }
}

pub fn in_session(body: &str, session: &str) -> NewMessage {
    NewMessage { session_id: Some(session.into()), ..NewMessage::new(body) }
}

pub const NOW: Duration = Duration::ZERO;

/// Peek-lock with no wait; panics if nothing is there.
pub async fn lock(b: &Broker, p: &EntityPath) -> Message {
    b.peek_lock(p, NOW).await.unwrap().unwrap_or_else(|| panic!("expected a message on {p}"))
}

pub fn text(m: &Message) -> String {
    String::from_utf8(m.body.clone()).unwrap()
}
