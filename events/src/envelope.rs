//! The CloudEvents envelope around the data types: attribute rules, and conversion to and from
//! `cloudevents::Event` and structured JSON bytes.

use crate::data::*;
use chrono::{DateTime, SecondsFormat, Utc};
use cloudevents::{AttributesReader, Data, Event, EventBuilder, EventBuilderV10};
use serde::de::DeserializeOwned;
use std::fmt;

/// The CloudEvents extension attribute that carries the run id (extension names are lower-case
/// alphanumerics by the spec).
pub const RUN_ID_EXTENSION: &str = "runid";

/// Every event type of the chain. The wire string is reverse-DNS and versioned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    Push,
    BuildRequested,
    BuildCompleted,
    ImageRequested,
    ImageDue,
    ImageReady,
    DeploymentDue,
    DeploymentStarted,
    DeploymentSucceeded,
    DeploymentFailed,
    DeploymentRolledBack,
    ApprovalRequested,
    ApprovalDecided,
    ApprovalDue,
    ApprovalChanged,
    RunFinished,
    DeadLetterHandled,
}

impl EventType {
    pub const ALL: [EventType; 17] = [
        EventType::Push,
        EventType::BuildRequested,
        EventType::BuildCompleted,
        EventType::ImageRequested,
        EventType::ImageDue,
        EventType::ImageReady,
        EventType::DeploymentDue,
        EventType::DeploymentStarted,
        EventType::DeploymentSucceeded,
        EventType::DeploymentFailed,
        EventType::DeploymentRolledBack,
        EventType::ApprovalRequested,
        EventType::ApprovalDecided,
        EventType::ApprovalDue,
        EventType::ApprovalChanged,
        EventType::RunFinished,
        EventType::DeadLetterHandled,
    ];

    /// The CloudEvents `type` attribute.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Push => "dev.deploychain.push.v1",
            EventType::BuildRequested => "dev.deploychain.build.requested.v1",
            EventType::BuildCompleted => "dev.deploychain.build.completed.v1",
            EventType::ImageRequested => "dev.deploychain.image.requested.v1",
            EventType::ImageDue => "dev.deploychain.image.due.v1",
            EventType::ImageReady => "dev.deploychain.image.ready.v1",
            EventType::DeploymentDue => "dev.deploychain.deployment.due.v1",
            EventType::DeploymentStarted => "dev.deploychain.deployment.started.v1",
            EventType::DeploymentSucceeded => "dev.deploychain.deployment.succeeded.v1",
            EventType::DeploymentFailed => "dev.deploychain.deployment.failed.v1",
            EventType::DeploymentRolledBack => "dev.deploychain.deployment.rolledback.v1",
            EventType::ApprovalRequested => "dev.deploychain.approval.requested.v1",
            EventType::ApprovalDecided => "dev.deploychain.approval.decided.v1",
            EventType::ApprovalDue => "dev.deploychain.approval.due.v1",
            EventType::ApprovalChanged => "dev.deploychain.approval.changed.v1",
            EventType::RunFinished => "dev.deploychain.run.finished.v1",
            EventType::DeadLetterHandled => "dev.deploychain.deadletter.handled.v1",
        }
    }

    /// The short name used for schema and sample files (`push`, `deployment.rolledback`, …).
    pub fn short_name(self) -> &'static str {
        let s = self.as_str();
        &s["dev.deploychain.".len()..s.len() - ".v1".len()]
    }

    pub fn parse(s: &str) -> Option<EventType> {
        EventType::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The typed `data` of an event; the variant decides the `type` attribute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventData {
    Push(Push),
    BuildRequested(BuildRequested),
    BuildCompleted(BuildCompleted),
    ImageRequested(ImageRequested),
    ImageDue(ImageDue),
    DeploymentDue(DeploymentDue),
    ImageReady(ImageReady),
    DeploymentStarted(Deployment),
    DeploymentSucceeded(Deployment),
    DeploymentFailed(Deployment),
    DeploymentRolledBack(Deployment),
    ApprovalRequested(ApprovalRequested),
    ApprovalDecided(ApprovalDecided),
    ApprovalDue(ApprovalDue),
    ApprovalChanged(ApprovalChanged),
    RunFinished(RunFinished),
    DeadLetterHandled(DeadLetterHandled),
}

impl EventData {
    pub fn event_type(&self) -> EventType {
        match self {
            EventData::Push(_) => EventType::Push,
            EventData::BuildRequested(_) => EventType::BuildRequested,
            EventData::BuildCompleted(_) => EventType::BuildCompleted,
            EventData::ImageRequested(_) => EventType::ImageRequested,
            EventData::ImageDue(_) => EventType::ImageDue,
            EventData::DeploymentDue(_) => EventType::DeploymentDue,
            EventData::ImageReady(_) => EventType::ImageReady,
            EventData::DeploymentStarted(_) => EventType::DeploymentStarted,
            EventData::DeploymentSucceeded(_) => EventType::DeploymentSucceeded,
            EventData::DeploymentFailed(_) => EventType::DeploymentFailed,
            EventData::DeploymentRolledBack(_) => EventType::DeploymentRolledBack,
            EventData::ApprovalRequested(_) => EventType::ApprovalRequested,
            EventData::ApprovalDecided(_) => EventType::ApprovalDecided,
            EventData::ApprovalDue(_) => EventType::ApprovalDue,
            EventData::ApprovalChanged(_) => EventType::ApprovalChanged,
            EventData::RunFinished(_) => EventType::RunFinished,
            EventData::DeadLetterHandled(_) => EventType::DeadLetterHandled,
        }
    }

    /// The app every event belongs to.
    pub fn app(&self) -> &str {
        match self {
            EventData::Push(d) => &d.app,
            EventData::BuildRequested(d) => &d.app,
            EventData::BuildCompleted(d) => &d.app,
            EventData::ImageRequested(d) => &d.app,
            EventData::ImageDue(d) => &d.app,
            EventData::DeploymentDue(d) => &d.app,
            EventData::ImageReady(d) => &d.app,
            EventData::DeploymentStarted(d)
            | EventData::DeploymentSucceeded(d)
            | EventData::DeploymentFailed(d)
            | EventData::DeploymentRolledBack(d) => &d.app,
            EventData::ApprovalRequested(d) => &d.app,
            EventData::ApprovalDecided(d) => &d.app,
            EventData::ApprovalDue(d) => &d.app,
            EventData::ApprovalChanged(d) => &d.app,
            EventData::RunFinished(d) => &d.app,
            EventData::DeadLetterHandled(d) => &d.app,
        }
    }

    /// The stage an event is about, where it is about one.
    pub fn stage(&self) -> Option<&str> {
        match self {
            EventData::DeploymentStarted(d)
            | EventData::DeploymentSucceeded(d)
            | EventData::DeploymentFailed(d)
            | EventData::DeploymentRolledBack(d) => Some(&d.stage),
            EventData::ApprovalRequested(d) => Some(&d.stage),
            EventData::ApprovalDecided(d) => Some(&d.stage),
            EventData::ApprovalDue(d) => Some(&d.stage),
            EventData::DeploymentDue(d) => Some(&d.stage),
            EventData::ApprovalChanged(d) => Some(&d.stage),
            _ => None,
        }
    }

    fn to_json(&self) -> serde_json::Value {
        let v = match self {
            EventData::Push(d) => serde_json::to_value(d),
            EventData::BuildRequested(d) => serde_json::to_value(d),
            EventData::BuildCompleted(d) => serde_json::to_value(d),
            EventData::ImageRequested(d) => serde_json::to_value(d),
            EventData::ImageDue(d) => serde_json::to_value(d),
            EventData::DeploymentDue(d) => serde_json::to_value(d),
            EventData::ImageReady(d) => serde_json::to_value(d),
            EventData::DeploymentStarted(d)
            | EventData::DeploymentSucceeded(d)
            | EventData::DeploymentFailed(d)
            | EventData::DeploymentRolledBack(d) => serde_json::to_value(d),
            EventData::ApprovalRequested(d) => serde_json::to_value(d),
            EventData::ApprovalDecided(d) => serde_json::to_value(d),
            EventData::ApprovalDue(d) => serde_json::to_value(d),
            EventData::ApprovalChanged(d) => serde_json::to_value(d),
            EventData::RunFinished(d) => serde_json::to_value(d),
            EventData::DeadLetterHandled(d) => serde_json::to_value(d),
        };
        // Plain structs of strings and enums always serialize.
        v.unwrap_or(serde_json::Value::Null)
    }

    fn from_json(ty: EventType, v: serde_json::Value) -> Result<EventData, EventError> {
        fn de<T: DeserializeOwned>(ty: EventType, v: serde_json::Value) -> Result<T, EventError> {
            serde_json::from_value(v).map_err(|e| EventError::BadData { ty: ty.as_str(), message: e.to_string() })
        }
        Ok(match ty {
            EventType::Push => EventData::Push(de(ty, v)?),
            EventType::BuildRequested => EventData::BuildRequested(de(ty, v)?),
            EventType::BuildCompleted => EventData::BuildCompleted(de(ty, v)?),
            EventType::ImageRequested => EventData::ImageRequested(de(ty, v)?),
            EventType::ImageDue => EventData::ImageDue(de(ty, v)?),
            EventType::DeploymentDue => EventData::DeploymentDue(de(ty, v)?),
            EventType::ImageReady => EventData::ImageReady(de(ty, v)?),
            EventType::DeploymentStarted => EventData::DeploymentStarted(de(ty, v)?),
            EventType::DeploymentSucceeded => EventData::DeploymentSucceeded(de(ty, v)?),
            EventType::DeploymentFailed => EventData::DeploymentFailed(de(ty, v)?),
            EventType::DeploymentRolledBack => EventData::DeploymentRolledBack(de(ty, v)?),
            EventType::ApprovalRequested => EventData::ApprovalRequested(de(ty, v)?),
            EventType::ApprovalDecided => EventData::ApprovalDecided(de(ty, v)?),
            EventType::ApprovalDue => EventData::ApprovalDue(de(ty, v)?),
            EventType::ApprovalChanged => EventData::ApprovalChanged(de(ty, v)?),
            EventType::RunFinished => EventData::RunFinished(de(ty, v)?),
            EventType::DeadLetterHandled => EventData::DeadLetterHandled(de(ty, v)?),
        })
    }
}

/// W3C trace context carried by the distributed-tracing extension, so one release is one trace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceContext {
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
}

impl TraceContext {
    /// `00-<32 hex trace id>-<16 hex span id>-<2 hex flags>`, ids not all zero.
    pub fn is_valid_traceparent(s: &str) -> bool {
        let parts: Vec<&str> = s.split('-').collect();
        let hex = |p: &str, n: usize| p.len() == n && p.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        parts.len() == 4
            && hex(parts[0], 2)
            && parts[0] != "ff"
            && hex(parts[1], 32)
            && parts[1].bytes().any(|b| b != b'0')
            && hex(parts[2], 16)
            && parts[2].bytes().any(|b| b != b'0')
            && hex(parts[3], 2)
    }
}

/// One event of the chain, with the attributes deploychain relies on made explicit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeployEvent {
    /// Deterministic per (run, step): see [`crate::event_id`].
    pub id: String,
    /// Origin: `/github/{owner}/{repo}`, `/azure-devops/{org}/{project}`, `/deploychain/{app}/{step}`.
    pub source: String,
    pub time: DateTime<Utc>,
    /// The run; also the CloudEvents `subject`.
    pub run_id: String,
    pub trace: TraceContext,
    pub data: EventData,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EventError {
    #[error("not a structured CloudEvents JSON document: {0}")]
    NotCloudEvent(String),
    #[error("unknown event type `{0}`")]
    UnknownType(String),
    #[error("missing CloudEvents attribute `{0}`")]
    MissingAttribute(&'static str),
    #[error("bad value for `{attribute}`: {message}")]
    BadAttribute { attribute: &'static str, message: String },
    #[error("data of `{ty}` does not match its schema: {message}")]
    BadData { ty: &'static str, message: String },
}

impl DeployEvent {
    pub fn event_type(&self) -> EventType {
        self.data.event_type()
    }

    /// The structured-mode CloudEvent.
    pub fn to_cloudevent(&self) -> Event {
        let mut b = EventBuilderV10::new()
            .id(self.id.clone())
            .source(self.source.clone())
            .ty(self.event_type().as_str())
            .subject(self.run_id.clone())
            .time(self.time)
            .extension(RUN_ID_EXTENSION, self.run_id.clone())
            .data("application/json", self.data.to_json());
        if let Some(tp) = &self.trace.traceparent {
            b = b.extension("traceparent", tp.clone());
        }
        if let Some(ts) = &self.trace.tracestate {
            b = b.extension("tracestate", ts.clone());
        }
        // Every attribute above is set and well-formed, so build cannot fail; keep the error path anyway.
        b.build().unwrap_or_else(|_| Event::default())
    }

    /// Structured-mode JSON bytes (`application/cloudevents+json`).
    pub fn to_json_bytes(&self) -> Vec<u8> {
        // The JSON form is written by hand in a fixed key order so bodies are byte-stable across
        // retries (the SDK keeps extensions in a HashMap); `from_cloudevent` reads either.
        let mut m = serde_json::Map::new();
        m.insert("specversion".into(), "1.0".into());
        m.insert("id".into(), self.id.clone().into());
        m.insert("source".into(), self.source.clone().into());
        m.insert("type".into(), self.event_type().as_str().into());
        m.insert("subject".into(), self.run_id.clone().into());
        m.insert("time".into(), self.time.to_rfc3339_opts(SecondsFormat::Millis, true).into());
        m.insert("datacontenttype".into(), "application/json".into());
        m.insert(RUN_ID_EXTENSION.into(), self.run_id.clone().into());
        if let Some(tp) = &self.trace.traceparent {
            m.insert("traceparent".into(), tp.clone().into());
        }
        if let Some(ts) = &self.trace.tracestate {
            m.insert("tracestate".into(), ts.clone().into());
        }
        m.insert("data".into(), self.data.to_json());
        serde_json::to_vec(&serde_json::Value::Object(m)).unwrap_or_default()
    }

    /// Parse structured-mode JSON bytes, checking every rule of the contract.
    pub fn from_json_bytes(bytes: &[u8]) -> Result<DeployEvent, EventError> {
        let mut ev: Event = serde_json::from_slice(bytes).map_err(|e| EventError::NotCloudEvent(e.to_string()))?;
        // The event is ours: its data moves into the result instead of being copied.
        let content_type = ev.datacontenttype().map(str::to_string);
        let (_, _, data) = ev.take_data();
        DeployEvent::from_parts(&ev, content_type.as_deref(), data)
    }

    pub fn from_cloudevent(ev: &Event) -> Result<DeployEvent, EventError> {
        DeployEvent::from_parts(ev, ev.datacontenttype(), ev.data().cloned())
    }

    /// `ev`'s attributes, with its `datacontenttype` and `data` given apart (so they can be moved).
    fn from_parts(ev: &Event, content_type: Option<&str>, data: Option<Data>) -> Result<DeployEvent, EventError> {
        let ty = EventType::parse(ev.ty()).ok_or_else(|| EventError::UnknownType(ev.ty().to_string()))?;
        let run_id = match ev.extension(RUN_ID_EXTENSION) {
            Some(v) => v.to_string(),
            None => return Err(EventError::MissingAttribute(RUN_ID_EXTENSION)),
        };
        if run_id.is_empty() || run_id.len() > 100 {
            return Err(EventError::BadAttribute { attribute: RUN_ID_EXTENSION, message: "must be 1 to 100 characters".into() });
        }
        match ev.subject() {
            None => return Err(EventError::MissingAttribute("subject")),
            Some(s) if s != run_id => {
                return Err(EventError::BadAttribute {
                    attribute: "subject",
                    message: format!("`{s}` differs from the run id `{run_id}`"),
                });
            }
            Some(_) => {}
        }
        if ev.id().is_empty() || ev.id().len() > 128 {
            return Err(EventError::BadAttribute { attribute: "id", message: "must be 1 to 128 characters".into() });
        }
        if let Some(ct) = content_type
            && !ct.starts_with("application/json")
        {
            return Err(EventError::BadAttribute { attribute: "datacontenttype", message: format!("`{ct}` is not application/json") });
        }
        let time = *ev.time().ok_or(EventError::MissingAttribute("time"))?;
        let traceparent = ev.extension("traceparent").map(|v| v.to_string());
        if let Some(tp) = &traceparent
            && !TraceContext::is_valid_traceparent(tp)
        {
            return Err(EventError::BadAttribute { attribute: "traceparent", message: format!("`{tp}` is not a W3C traceparent") });
        }
        let tracestate = ev.extension("tracestate").map(|v| v.to_string());
        let json = match data {
            Some(Data::Json(v)) => v,
            Some(Data::String(s)) => {
                serde_json::from_str(&s).map_err(|e| EventError::BadData { ty: ty.as_str(), message: format!("data is not JSON: {e}") })?
            }
            Some(Data::Binary(b)) => serde_json::from_slice(&b)
                .map_err(|e| EventError::BadData { ty: ty.as_str(), message: format!("data is not JSON: {e}") })?,
            None => return Err(EventError::MissingAttribute("data")),
        };
        let data = EventData::from_json(ty, json)?;
        Ok(DeployEvent {
            id: ev.id().to_string(),
            source: ev.source().to_string(),
            time,
            run_id,
            trace: TraceContext { traceparent, tracestate },
            data,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> DeployEvent {
        DeployEvent {
            id: "web-abc.push".into(),
            source: "/github/octo-org/web".into(),
            time: DateTime::parse_from_rfc3339("2026-11-22T10:00:00.123Z").map(|t| t.with_timezone(&Utc)).unwrap_or_default(),
            run_id: "web-abc".into(),
            trace: TraceContext { traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()), tracestate: None },
            data: EventData::Push(Push {
                app: "web".into(),
                provider: Provider::Github,
                repository: "octo-org/web".into(),
                branch: "main".into(),
                commit: "abc".into(),
                before: None,
                pusher: Some("octocat".into()),
                message: None,
                url: None,
                delivery: None,
                pusher_email: None,
                commits: Vec::new(),
            }),
        }
    }

    #[test]
    fn json_round_trip_is_lossless() {
        let ev = sample();
        let bytes = ev.to_json_bytes();
        assert_eq!(DeployEvent::from_json_bytes(&bytes), Ok(ev.clone()));
        // and through the SDK's own representation
        assert_eq!(DeployEvent::from_cloudevent(&ev.to_cloudevent()), Ok(ev));
    }

    #[test]
    fn short_names_match_types() {
        assert_eq!(EventType::DeploymentRolledBack.short_name(), "deployment.rolledback");
        assert_eq!(EventType::Push.short_name(), "push");
        for t in EventType::ALL {
            assert_eq!(EventType::parse(t.as_str()), Some(t));
        }
    }

    #[test]
    fn unknown_type_and_subject_mismatch_are_refused() {
        let mut v: serde_json::Value = serde_json::from_slice(&sample().to_json_bytes()).unwrap_or_default();
        v["type"] = "dev.deploychain.nope.v1".into();
        let err = DeployEvent::from_json_bytes(v.to_string().as_bytes());
        assert_eq!(err, Err(EventError::UnknownType("dev.deploychain.nope.v1".into())));
        let mut v: serde_json::Value = serde_json::from_slice(&sample().to_json_bytes()).unwrap_or_default();
        v["subject"] = "other".into();
        assert!(matches!(
            DeployEvent::from_json_bytes(v.to_string().as_bytes()),
            Err(EventError::BadAttribute { attribute: "subject", .. })
        ));
    }

    #[test]
    fn bad_traceparent_and_missing_data_fields_are_refused() {
        let mut v: serde_json::Value = serde_json::from_slice(&sample().to_json_bytes()).unwrap_or_default();
        v["traceparent"] = "00-zz-01".into();
        assert!(matches!(
            DeployEvent::from_json_bytes(v.to_string().as_bytes()),
            Err(EventError::BadAttribute { attribute: "traceparent", .. })
        ));
        let mut v: serde_json::Value = serde_json::from_slice(&sample().to_json_bytes()).unwrap_or_default();
        v["data"].as_object_mut().map(|m| m.remove("commit"));
        assert!(matches!(DeployEvent::from_json_bytes(v.to_string().as_bytes()), Err(EventError::BadData { .. })));
        assert!(matches!(DeployEvent::from_json_bytes(b"{not json"), Err(EventError::NotCloudEvent(_))));
    }
}
