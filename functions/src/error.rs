//! One error type whose variants say what the host must do with the invocation.
//!
//! - [`Error::Transient`]: something we depend on is down. A trigger invocation fails (non-2xx to
//!   the host), so the message is abandoned and redelivered; an HTTP caller gets 503 and retries.
//!   [`Error::Throttled`] is the same with the wait the service asked for (`Retry-After`): a step
//!   that owns its retries (a rollout's) schedules itself again after it instead.
//! - every other variant is permanent: the same input will never succeed. An HTTP caller gets the
//!   matching 4xx; a Service Bus message is parked with the variant's reason on first sight (see
//!   `docs/decisions/0002-permanent-failures-are-parked.md`) instead of being retried ten times.
//!
//! Messages are written for the caller and the operator; they never contain secrets.

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("temporarily unavailable: {0}")]
    Transient(String),
    /// Transient, and the service said how long to wait (`Retry-After`).
    #[error("temporarily unavailable: {0} (retry after {after})", after = crate::adapters::arm::client::human(*.1))]
    Throttled(String, std::time::Duration),
    #[error("malformed input: {0}")]
    Malformed(String),
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// Known, but not allowed (an approver who may not approve this release).
    #[error("forbidden: {0}")]
    Forbidden(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("gone: {0}")]
    Gone(String),
    #[error("too large: {0}")]
    TooLarge(String),
    #[error("unsupported media type: {0}")]
    UnsupportedMediaType(String),
    #[error("refused: {0}")]
    Refused(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Transient(_) | Error::Throttled(..))
    }

    /// The wait the service asked for, when it named one.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            Error::Throttled(_, after) => Some(*after),
            _ => None,
        }
    }

    pub fn status(&self) -> u16 {
        match self {
            Error::Transient(_) | Error::Throttled(..) => 503,
            Error::Malformed(_) => 400,
            Error::Unauthorized(_) => 401,
            Error::Forbidden(_) => 403,
            Error::NotFound(_) => 404,
            Error::Conflict(_) => 409,
            Error::Gone(_) => 410,
            Error::TooLarge(_) => 413,
            Error::UnsupportedMediaType(_) => 415,
            Error::Refused(_) => 422,
        }
    }

    /// The `DeadLetterReason`-style code written on a parked message.
    pub fn park_reason(&self) -> &'static str {
        match self {
            Error::Transient(_) | Error::Throttled(..) => "Transient",
            Error::Malformed(_) => "MalformedEvent",
            Error::Unauthorized(_) => "Unauthorized",
            Error::Forbidden(_) => "Forbidden",
            Error::NotFound(_) => "UnknownRun",
            Error::Conflict(_) => "Conflict",
            Error::Gone(_) => "Expired",
            Error::TooLarge(_) => "TooLarge",
            Error::UnsupportedMediaType(_) => "UnsupportedMediaType",
            Error::Refused(_) => "Refused",
        }
    }

    /// The description without the variant prefix.
    pub fn detail(&self) -> &str {
        match self {
            Error::Transient(s)
            | Error::Throttled(s, _)
            | Error::Malformed(s)
            | Error::Unauthorized(s)
            | Error::Forbidden(s)
            | Error::NotFound(s)
            | Error::Conflict(s)
            | Error::Gone(s)
            | Error::TooLarge(s)
            | Error::UnsupportedMediaType(s)
            | Error::Refused(s) => s,
        }
    }
}

impl From<deploychain_events::EventError> for Error {
    fn from(e: deploychain_events::EventError) -> Self {
        Error::Malformed(e.to_string())
    }
}

impl From<crate::invoke::EnvelopeError> for Error {
    fn from(e: crate::invoke::EnvelopeError) -> Self {
        Error::Malformed(e.to_string())
    }
}
