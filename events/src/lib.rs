//! The deploychain event contract: every message on the bus is a CloudEvents 1.0 structured JSON
//! document whose `type` is one of [`EventType`] and whose `data` is the matching struct here.
//!
//! This crate is shared by the deployed handler, the local stack and the tests, so it must not depend
//! on a web framework, an async runtime or an Azure SDK. JSON Schemas for every type live in
//! `events/schemas/`, samples in `events/samples/`; tests check that the two and these types agree.

mod data;
mod envelope;

pub use data::*;
pub use envelope::{DeployEvent, EventData, EventError, EventType, RUN_ID_EXTENSION, TraceContext};

/// The content type of a structured-mode CloudEvent in JSON.
pub const CLOUDEVENTS_JSON: &str = "application/cloudevents+json; charset=utf-8";

/// Run ids are derived, not random: the same push (app + commit) always names the same run, so a
/// redelivered webhook cannot start a second run. `app` names are validated by the policy
/// (`[a-z0-9-]`), commits are hex, so the id is URL- and MessageId-safe.
pub fn run_id(app: &str, commit: &str) -> String {
    let short: String = commit.chars().take(12).collect();
    format!("{app}-{}", short.to_ascii_lowercase())
}

/// A deterministic message/event id for one step's output in one run: redelivery and replay of the
/// step produce the same id, which the broker's duplicate detection drops.
pub fn event_id(run_id: &str, step: &str) -> String {
    format!("{run_id}.{step}")
}

/// A short stable digest, used where an id must be derived from free text (approver names, image ids).
pub fn short_digest(parts: &[&str]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0u8]);
    }
    hex::encode(&h.finalize()[..8])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_id_is_stable_and_short() {
        assert_eq!(run_id("web", "738A951D2F3E7C2B16CC5A0D6A2B1E7D9A1B2C3D"), "web-738a951d2f3e");
        assert_eq!(run_id("web", "abc"), "web-abc");
    }

    #[test]
    fn event_ids_differ_per_step() {
        assert_ne!(event_id("web-1", "push"), event_id("web-1", "build-requested"));
    }
}
