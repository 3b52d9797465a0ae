//! The one error type of the bus. Variants say what the caller should do: `Storage` is transient
//! (retry), everything else is permanent for that request.

/// What went wrong in a bus operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    /// No queue, topic or subscription of that name in the topology (REST: 410 Gone).
    #[error("messaging entity `{0}` does not exist")]
    EntityNotFound(String),
    /// The message or session lock expired, was settled already, or was never issued (REST: 404).
    #[error("the lock is lost: it expired, was already settled, or is unknown")]
    LockLost,
    /// The body is larger than the broker accepts (REST: 413).
    #[error("the message body is {size} bytes, more than the {max} bytes allowed")]
    MessageTooLarge { size: usize, max: usize },
    /// A plain receive on an entity that requires sessions: accept a session first.
    #[error("`{0}` requires sessions: accept a session to receive from it (the REST data plane has no session receive)")]
    SessionRequired(String),
    /// The message breaks a rule of Service Bus (missing SessionId, id too long, bad broker property…).
    #[error("invalid message: {0}")]
    InvalidMessage(String),
    /// The operation does not apply to that entity (send to a subscription, dead-letter from a DLQ…).
    #[error("invalid operation: {0}")]
    InvalidOperation(String),
    /// The topology file or a programmatic change to it is invalid; the text names entity and key.
    #[error("topology: {0}")]
    Topology(String),
    /// SQLite failed. Transient: the operation had no effect and may be retried.
    #[error("storage: {0}")]
    Storage(String),
}

impl BusError {
    /// Whether retrying the same operation later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, BusError::Storage(_))
    }
}

impl From<rusqlite::Error> for BusError {
    fn from(e: rusqlite::Error) -> Self {
        BusError::Storage(e.to_string())
    }
}
