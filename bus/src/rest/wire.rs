//! Service Bus REST wire details: the `BrokerProperties` header both ways, application properties
//! as headers both ways, and dates in RFC 1123 form.

use crate::message::{Message, NewMessage};
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::time::Duration;

/// `TimeSpan.MaxValue` in seconds: what Service Bus reports as TimeToLive when there is none.
pub(crate) const INFINITE_TTL_SECONDS: f64 = 922_337_203_685.477_5;

/// Request headers that are HTTP's (or Service Bus's own), never application properties.
pub(crate) fn is_standard_header(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    name.starts_with("x-ms-")
        || matches!(
            name.as_str(),
            "authorization"
                | "brokerproperties"
                | "content-type"
                | "content-length"
                | "content-encoding"
                | "host"
                | "user-agent"
                | "accept"
                | "accept-encoding"
                | "accept-language"
                | "accept-charset"
                | "connection"
                | "keep-alive"
                | "expect"
                | "transfer-encoding"
                | "te"
                | "trailer"
                | "upgrade"
                | "proxy-authorization"
                | "proxy-connection"
                | "date"
                | "cache-control"
                | "pragma"
                | "location"
        )
}

/// An application property from a request header, typed as the REST docs describe: quoted →
/// string (JSON escapes undone), `true`/`false` → bool, integer → Int64, decimal → Double,
/// anything else → the raw text as a string (the docs' own example sends `Priority: High`).
pub(crate) fn property_from_header(raw: &str) -> Value {
    let v = raw.trim();
    if v.len() >= 2 && v.starts_with('"') && v.ends_with('"') {
        return match serde_json::from_str::<String>(v) {
            Ok(s) => Value::String(s),
            Err(_) => Value::String(v[1..v.len() - 1].to_string()),
        };
    }
    match v {
        "true" => return Value::Bool(true),
        "false" => return Value::Bool(false),
        _ => {}
    }
    if let Ok(i) = v.parse::<i64>() {
        return Value::from(i);
    }
    if v.contains(['.', 'e', 'E'])
        && let Ok(f) = v.parse::<f64>()
        && let Some(n) = serde_json::Number::from_f64(f)
    {
        return Value::Number(n);
    }
    Value::String(v.to_string())
}

/// A response header value for an application property: strings JSON-quoted, numbers and bools
/// bare, `None` for null. Always printable ASCII.
pub(crate) fn property_to_header(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        Value::String(s) => Some(ascii_json(&Value::String(s.clone()))),
        other => Some(ascii_json(&Value::String(other.to_string()))),
    }
}

/// Compact JSON with every non-ASCII character `\u`-escaped, so it is a valid header value.
pub(crate) fn ascii_json(v: &Value) -> String {
    let text = v.to_string();
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut buf = [0u16; 2];
            for unit in c.encode_utf16(&mut buf) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    out
}

/// RFC 1123 date, as Service Bus writes them: `Sun, 22 Nov 2026 09:00:00 GMT`.
pub(crate) fn http_date(t: DateTime<Utc>) -> String {
    t.format("%a, %d %b %Y %H:%M:%S GMT").to_string()
}

/// The one date form the Service Bus REST reference gives for `DateTime` broker properties:
/// RFC 1123 as HTTP uses it (RFC 2616 §3.3.1), always in `GMT` — "“Sun, 06 Nov 1994 08:49:37
/// GMT”" (https://learn.microsoft.com/rest/api/servicebus/message-headers-and-properties, Notes).
/// Numeric zones (`+0000`, what `azure_messaging_servicebus` 0.21's `SettableBrokerProperties`
/// writes) and RFC 3339 are not documented, so they are refused rather than guessed at; so is a
/// weekday that does not match the date.
fn parse_http_date(s: &str) -> Option<DateTime<Utc>> {
    chrono::NaiveDateTime::parse_from_str(s.trim(), "%a, %d %b %Y %H:%M:%S GMT").ok().map(|t| t.and_utc())
}

/// .NET TimeSpan text `[d.]hh:mm:ss[.fffffff]`.
fn parse_timespan(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (days, rest) = match s.split_once('.') {
        Some((d, rest)) if rest.contains(':') && !d.contains(':') => (d.parse::<f64>().ok()?, rest),
        _ => (0.0, s),
    };
    let parts: Vec<&str> = rest.split(':').collect();
    let [h, m, sec] = parts.as_slice() else { return None };
    let secs = days * 86_400.0 + h.parse::<f64>().ok()? * 3_600.0 + m.parse::<f64>().ok()? * 60.0 + sec.parse::<f64>().ok()?;
    Duration::try_from_secs_f64(secs).ok()
}

/// Apply a request's `BrokerProperties` object to `msg`. Unknown keys are ignored (as Service Bus
/// does); known keys with the wrong type are an error naming the key.
pub(crate) fn apply_broker_properties(bp: &Map<String, Value>, msg: &mut NewMessage) -> Result<(), String> {
    fn text(bp: &Map<String, Value>, key: &str) -> Result<Option<String>, String> {
        match bp.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(format!("BrokerProperties.{key}: expected a string, got {other}")),
        }
    }
    if let Some(v) = text(bp, "MessageId")? {
        msg.message_id = Some(v);
    }
    if let Some(v) = text(bp, "CorrelationId")? {
        msg.correlation_id = Some(v);
    }
    if let Some(v) = text(bp, "SessionId")? {
        msg.session_id = Some(v);
    }
    if let Some(v) = text(bp, "Label")? {
        msg.label = Some(v);
    }
    if let Some(v) = text(bp, "ReplyTo")? {
        msg.reply_to = Some(v);
    }
    if let Some(v) = text(bp, "ReplyToSessionId")? {
        msg.reply_to_session_id = Some(v);
    }
    if let Some(v) = text(bp, "To")? {
        msg.to = Some(v);
    }
    if msg.content_type.is_none()
        && let Some(v) = text(bp, "ContentType")?
    {
        msg.content_type = Some(v);
    }
    if let Some(pk) = text(bp, "PartitionKey")?
        && let Some(sid) = &msg.session_id
        && &pk != sid
    {
        return Err("BrokerProperties.PartitionKey: must equal SessionId when both are set".into());
    }
    match bp.get("TimeToLive") {
        None | Some(Value::Null) => {}
        Some(Value::Number(n)) => {
            let secs = n.as_f64().filter(|s| *s > 0.0).ok_or("BrokerProperties.TimeToLive: must be a positive number of seconds")?;
            msg.time_to_live = Some(Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX));
        }
        Some(other) => return Err(format!("BrokerProperties.TimeToLive: expected a number of seconds, got {other}")),
    }
    if msg.time_to_live.is_none()
        && let Some(ts) = text(bp, "TimeToLiveTimeSpan")?
    {
        msg.time_to_live = Some(parse_timespan(&ts).ok_or(format!("BrokerProperties.TimeToLiveTimeSpan: {ts:?} is not a TimeSpan"))?);
    }
    if let Some(when) = text(bp, "ScheduledEnqueueTimeUtc")? {
        msg.scheduled_enqueue_time = Some(parse_http_date(&when).ok_or(format!(
            "BrokerProperties.ScheduledEnqueueTimeUtc: {when:?} is not an RFC 1123 date in GMT (`Sun, 06 Nov 1994 08:49:37 GMT`)"
        ))?);
    }
    Ok(())
}

/// The response `BrokerProperties` of a received message. Contains every key
/// `azure_messaging_servicebus` 0.21 requires (DeliveryCount, LockToken, LockedUntilUtc,
/// MessageId, SequenceNumber, State, TimeToLive) when the message is locked.
pub(crate) fn broker_properties(m: &Message) -> String {
    let mut bp = Map::new();
    bp.insert("DeliveryCount".into(), Value::from(m.delivery_count));
    if let Ok(seq) = i32::try_from(m.sequence_number) {
        bp.insert("EnqueuedSequenceNumber".into(), Value::from(seq));
    }
    bp.insert("EnqueuedTimeUtc".into(), Value::from(http_date(m.enqueued_at)));
    if let (Some(token), Some(until)) = (m.lock_token, m.locked_until) {
        bp.insert("LockToken".into(), Value::from(token.to_string()));
        bp.insert("LockedUntilUtc".into(), Value::from(http_date(until)));
    }
    bp.insert("MessageId".into(), Value::from(m.message_id.clone()));
    bp.insert("SequenceNumber".into(), Value::from(m.sequence_number));
    bp.insert("State".into(), Value::from("Active"));
    let ttl = m.time_to_live.map_or(INFINITE_TTL_SECONDS, |t| t.as_secs_f64());
    bp.insert("TimeToLive".into(), serde_json::Number::from_f64(ttl).map_or(Value::Null, Value::Number));
    let optional = [
        ("Label", &m.label),
        ("SessionId", &m.session_id),
        ("CorrelationId", &m.correlation_id),
        ("ReplyTo", &m.reply_to),
        ("ReplyToSessionId", &m.reply_to_session_id),
        ("To", &m.to),
        ("DeadLetterSource", &m.dead_letter_source),
    ];
    for (key, value) in optional {
        if let Some(v) = value {
            bp.insert(key.into(), Value::from(v.clone()));
        }
    }
    if let Some(t) = m.scheduled_enqueue_time {
        bp.insert("ScheduledEnqueueTimeUtc".into(), Value::from(http_date(t)));
    }
    ascii_json(&Value::Object(bp))
}

/// One item of a batch send (`application/vnd.microsoft.servicebus.json`).
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct BatchItem {
    pub body: Value,
    #[serde(default)]
    pub broker_properties: Option<Map<String, Value>>,
    #[serde(default)]
    pub user_properties: Option<BTreeMap<String, Value>>,
}

impl BatchItem {
    pub(crate) fn into_message(self) -> Result<NewMessage, String> {
        let body = match self.body {
            Value::String(s) => s.into_bytes(),
            Value::Null => Vec::new(),
            other => other.to_string().into_bytes(),
        };
        let mut msg = NewMessage { body, properties: self.user_properties.unwrap_or_default(), ..Default::default() };
        if let Some(bp) = &self.broker_properties {
            apply_broker_properties(bp, &mut msg)?;
        }
        Ok(msg)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn header_properties_are_typed_like_the_docs_say() {
        assert_eq!(property_from_header("\"High\""), Value::from("High"));
        assert_eq!(property_from_header("\"caf\\u00e9\""), Value::from("café"));
        assert_eq!(property_from_header("High"), Value::from("High"));
        assert_eq!(property_from_header("12345,ABC"), Value::from("12345,ABC"));
        assert_eq!(property_from_header("true"), Value::Bool(true));
        assert_eq!(property_from_header("3"), Value::from(3));
        assert_eq!(property_from_header("-2.5"), Value::from(-2.5));
        assert_eq!(property_from_header("\"3\""), Value::from("3"));
        assert_eq!(property_from_header("\"bad \\x\""), Value::from("bad \\x"));
    }

    #[test]
    fn properties_go_back_out_as_ascii_headers() {
        assert_eq!(property_to_header(&Value::from("café")).unwrap(), "\"caf\\u00e9\"");
        assert_eq!(property_to_header(&Value::from(3)).unwrap(), "3");
        assert_eq!(property_to_header(&Value::Bool(false)).unwrap(), "false");
        assert_eq!(property_to_header(&Value::Null), None);
    }

    #[test]
    fn broker_properties_are_applied_with_types_checked() {
        let mut m = NewMessage::default();
        let bp: Map<String, Value> = serde_json::from_str(
            r#"{"MessageId":"m-1","SessionId":"s","PartitionKey":"s","Label":"L","TimeToLive":90.5,
                "ScheduledEnqueueTimeUtc":"Tue, 14 Nov 2023 22:13:20 GMT","State":"Active","Unknown":1}"#,
        )
        .unwrap();
        apply_broker_properties(&bp, &mut m).unwrap();
        assert_eq!(m.message_id.as_deref(), Some("m-1"));
        assert_eq!(m.time_to_live, Some(Duration::from_millis(90_500)));
        assert_eq!(m.scheduled_enqueue_time.unwrap().to_rfc3339(), "2023-11-14T22:13:20+00:00");

        // The reference's own example, with the space its sample puts before it.
        let gmt: Map<String, Value> = serde_json::from_str(r#"{"ScheduledEnqueueTimeUtc":" Sun, 06 Nov 1994 08:49:37 GMT"}"#).unwrap();
        apply_broker_properties(&gmt, &mut m).unwrap();
        assert_eq!(m.scheduled_enqueue_time.unwrap().to_rfc3339(), "1994-11-06T08:49:37+00:00");

        for bad in [
            r#"{"MessageId":5}"#,
            r#"{"TimeToLive":"x"}"#,
            r#"{"SessionId":"a","PartitionKey":"b"}"#,
            r#"{"ScheduledEnqueueTimeUtc":"soon"}"#,
        ] {
            let bp: Map<String, Value> = serde_json::from_str(bad).unwrap();
            assert!(apply_broker_properties(&bp, &mut NewMessage::default()).is_err(), "{bad}");
        }
    }

    #[test]
    fn timespans_parse() {
        assert_eq!(parse_timespan("0.00:00:40"), Some(Duration::from_secs(40)));
        assert_eq!(parse_timespan("01:00:00"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_timespan("1.00:00:00.5"), Some(Duration::from_millis(86_400_500)));
        assert_eq!(parse_timespan("40"), None);
    }

    #[test]
    fn scheduled_times_are_read_in_the_documented_form_only() {
        let at = |text: &str| {
            let bp: Map<String, Value> = serde_json::from_value(serde_json::json!({ "ScheduledEnqueueTimeUtc": text })).unwrap();
            let mut m = NewMessage::default();
            apply_broker_properties(&bp, &mut m).map(|()| m.scheduled_enqueue_time.unwrap().to_rfc3339())
        };
        assert_eq!(at("Mon, 23 Nov 2026 10:00:01 GMT").unwrap(), "2026-11-23T10:00:01+00:00");
        for undocumented in [
            // What azure_messaging_servicebus 0.21 writes (time's RFC 2822).
            "Mon, 23 Nov 2026 10:00:01 +0000",
            "2026-11-23T10:00:01Z",
            // The wrong weekday for the date.
            "Sun, 23 Nov 2026 10:00:01 GMT",
            // RFC 850 and asctime, the obsolete HTTP forms.
            "Monday, 23-Nov-26 10:00:01 GMT",
            "Mon Nov 23 10:00:01 2026",
        ] {
            let e = at(undocumented).unwrap_err();
            assert!(e.contains("ScheduledEnqueueTimeUtc") && e.contains("GMT"), "{undocumented}: {e}");
        }
    }

    #[test]
    fn dates_are_rfc1123() {
        let t = DateTime::parse_from_rfc3339("2026-11-22T09:00:00Z").unwrap().with_timezone(&Utc);
        assert_eq!(http_date(t), "Sun, 22 Nov 2026 09:00:00 GMT");
    }
}
