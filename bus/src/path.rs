//! Entity paths as Service Bus spells them: `queue`, `queue/$DeadLetterQueue`,
//! `topic/subscriptions/sub`, `topic/subscriptions/sub/$DeadLetterQueue`.

use crate::error::BusError;
use std::fmt;
use std::str::FromStr;

/// Where messages are received from: a queue or a subscription, or the dead-letter sub-queue of one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EntityPath {
    pub entity: Entity,
    /// The `$DeadLetterQueue` sub-queue.
    pub dead_letter: bool,
}

/// A receiving entity.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Entity {
    Queue(String),
    Subscription { topic: String, subscription: String },
}

const DLQ: &str = "$DeadLetterQueue";

impl EntityPath {
    /// The queue `name`.
    pub fn queue(name: impl Into<String>) -> EntityPath {
        EntityPath { entity: Entity::Queue(name.into()), dead_letter: false }
    }

    /// The subscription `topic/subscriptions/subscription`.
    pub fn subscription(topic: impl Into<String>, subscription: impl Into<String>) -> EntityPath {
        EntityPath { entity: Entity::Subscription { topic: topic.into(), subscription: subscription.into() }, dead_letter: false }
    }

    /// The dead-letter sub-queue of this entity.
    pub fn dead_letter_queue(&self) -> EntityPath {
        EntityPath { entity: self.entity.clone(), dead_letter: true }
    }

    /// The entity itself (without `$DeadLetterQueue`).
    pub fn main_queue(&self) -> EntityPath {
        EntityPath { entity: self.entity.clone(), dead_letter: false }
    }

    /// The canonical, lower-cased key of the entity (without the sub-queue), as stored.
    pub(crate) fn key(&self) -> String {
        self.entity.key()
    }
}

impl Entity {
    pub(crate) fn key(&self) -> String {
        match self {
            Entity::Queue(q) => q.to_ascii_lowercase(),
            Entity::Subscription { topic, subscription } => {
                format!("{}/subscriptions/{}", topic.to_ascii_lowercase(), subscription.to_ascii_lowercase())
            }
        }
    }
}

impl fmt::Display for Entity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Entity::Queue(q) => f.write_str(q),
            Entity::Subscription { topic, subscription } => write!(f, "{topic}/subscriptions/{subscription}"),
        }
    }
}

impl fmt::Display for EntityPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.entity)?;
        if self.dead_letter {
            write!(f, "/{DLQ}")?;
        }
        Ok(())
    }
}

impl FromStr for EntityPath {
    type Err = BusError;

    /// Purely syntactic: whether the entity exists is the broker's business. `$DeadLetterQueue`
    /// and `subscriptions` are case-insensitive; surrounding slashes are ignored.
    fn from_str(s: &str) -> Result<EntityPath, BusError> {
        let bad = |why: &str| BusError::InvalidOperation(format!("`{s}` is not an entity path: {why}"));
        let trimmed = s.trim().trim_matches('/');
        let mut segments: Vec<&str> = trimmed.split('/').collect();
        if segments.iter().any(|seg| seg.is_empty()) {
            return Err(bad("empty segment"));
        }
        let dead_letter = segments.last().is_some_and(|l| l.eq_ignore_ascii_case(DLQ));
        if dead_letter {
            segments.pop();
        }
        if segments.is_empty() {
            return Err(bad("no entity name"));
        }
        if segments.iter().any(|seg| seg.eq_ignore_ascii_case(DLQ)) {
            return Err(bad("`$DeadLetterQueue` must come last"));
        }
        let subs_at = segments.iter().position(|seg| seg.eq_ignore_ascii_case("subscriptions"));
        let entity = match subs_at {
            None => Entity::Queue(segments.join("/")),
            Some(i) if i > 0 && i + 2 == segments.len() => {
                Entity::Subscription { topic: segments[..i].join("/"), subscription: segments[i + 1].to_string() }
            }
            Some(_) => return Err(bad("expected `topic/subscriptions/name`")),
        };
        Ok(EntityPath { entity, dead_letter })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn paths_parse_and_display() {
        for (text, path, shown) in [
            ("q", EntityPath::queue("q"), "q"),
            ("q/$deadletterqueue", EntityPath::queue("q").dead_letter_queue(), "q/$DeadLetterQueue"),
            ("t/Subscriptions/s", EntityPath::subscription("t", "s"), "t/subscriptions/s"),
            (
                "/t/subscriptions/s/$DeadLetterQueue/",
                EntityPath::subscription("t", "s").dead_letter_queue(),
                "t/subscriptions/s/$DeadLetterQueue",
            ),
            ("a/b", EntityPath::queue("a/b"), "a/b"),
        ] {
            let p: EntityPath = text.parse().unwrap();
            assert_eq!(p, path, "{text}");
            assert_eq!(p.to_string(), shown);
            assert_eq!(shown.parse::<EntityPath>().unwrap(), path);
        }
        for bad in ["", "/", "t/subscriptions", "subscriptions/s", "t/subscriptions/s/x", "q/$DeadLetterQueue/x", "a//b"] {
            assert!(bad.parse::<EntityPath>().is_err(), "{bad}");
        }
    }
}
