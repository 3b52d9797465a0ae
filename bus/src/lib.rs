//! deploychain's embedded Service Bus: a durable broker in one SQLite file with Azure Service
//! Bus's semantics (queues, topics with filtered subscriptions, peek-lock with lock expiry and
//! renewal, MaxDeliveryCount and the dead-letter queue, duplicate detection, scheduled messages,
//! TTL, sessions), and the Service Bus REST data-plane subset over HTTP so that the unmodified
//! `azure_messaging_servicebus` 0.21 client — the one the deployed handler publishes with — talks
//! to it as to Azure. It is the "embedded default" bus of the one-machine stack: the local
//! Functions host drives its triggers through the Rust API ([`Broker`]), the handler publishes
//! through REST ([`rest_router`]). Entities come from a file shaped like the Service Bus
//! emulator's `Config.json` ([`Topology`]).
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), deploychain_bus::BusError> {
//! use deploychain_bus::{Broker, EntityPath, NewMessage, Topology};
//! use std::time::Duration;
//!
//! let topology = Topology::from_json_str(
//!     r#"{"UserConfig": {"Namespaces": [{"Name": "local", "Queues": [{"Name": "work"}], "Topics": []}]}}"#,
//! )?;
//! let broker = Broker::open_in_memory(topology)?; // or Broker::open(path, topology) for the durable file
//! broker.send("work", NewMessage::new("hello")).await?;
//! let work: EntityPath = "work".parse()?;
//! if let Some(m) = broker.peek_lock(&work, Duration::from_secs(1)).await? {
//!     assert_eq!((m.body.as_slice(), m.delivery_count), (b"hello".as_slice(), 1));
//!     broker.complete(&work, m.lock_token.expect("peek-lock sets a lock token")).await?;
//! }
//! # Ok(())
//! # }
//! ```
//!
//! It must not depend on `deploychain-functions` (or any other deploychain crate): it is a
//! stand-in for Azure, and knows nothing of the chain running on it. It never goes into the
//! deployed binary.

mod broker;
mod error;
mod filter;
mod message;
mod path;
mod rest;
mod store;
mod topology;

pub use broker::{Broker, BrokerOptions, DEFAULT_MAX_MESSAGE_BYTES, SessionLock};
pub use error::BusError;
pub use filter::{CorrelationFilter, SqlAction, SqlFilter, SystemProperty};
pub use message::{EntityCounts, Message, NewMessage, SendOutcome};
pub use path::{Entity, EntityPath};
pub use rest::{SasKeys, rest_router, serve_rest, serve_rest_with_shutdown};
pub use topology::{
    DEFAULT_DUPLICATE_DETECTION_WINDOW, DEFAULT_LOCK_DURATION, DEFAULT_MAX_DELIVERY_COUNT, Filter, Queue, Rule, Subscription, Topic,
    Topology, parse_iso8601_duration,
};
