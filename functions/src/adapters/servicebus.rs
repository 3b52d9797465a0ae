//! The Service Bus publisher: `azure_messaging_servicebus` (Service Bus REST) unmodified, with the
//! message properties the chain needs — deterministic MessageId, SessionId, Label = event type,
//! CloudEvents attributes as application properties — which a custom handler's output binding
//! cannot set (DESIGN.md, "Why the handler publishes with the Service Bus client").
//!
//! The crate hard-codes `https://{ns}.servicebus.windows.net`. A connection string whose endpoint is
//! anything else (the local bus, `UseDevelopmentEmulator=true`) gets an HTTP client that rewrites
//! scheme, host and port of every request before sending it; the SAS signature still covers the
//! URL the crate built, which is what Service Bus verifies too.

use super::{Outbound, Parked, Publish};
use crate::error::{Error, Result};
use async_trait::async_trait;
use azure_messaging_servicebus::prelude::{QueueClient, TopicClient};
use azure_messaging_servicebus::service_bus::{SendMessageOptions, SettableBrokerProperties};
use chrono::{DateTime, DurationRound, Utc};
use std::collections::HashMap;
use std::sync::Arc;

/// The parts of a Service Bus connection string the publisher uses. `Debug` hides the key.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnectionString {
    /// `sb://myns.servicebus.windows.net/` or, for a local bus, `sb://127.0.0.1:7072`.
    pub endpoint: url::Url,
    pub key_name: String,
    pub key: String,
    pub development_emulator: bool,
    /// Identity-based (`ServiceBusConnection__fullyQualifiedNamespace`): requests carry an Entra
    /// bearer token and no key; `key_name`/`key` are empty.
    pub entra: bool,
}

impl std::fmt::Debug for ConnectionString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionString")
            .field("endpoint", &self.endpoint.as_str())
            .field("key_name", &self.key_name)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl ConnectionString {
    /// Parse `Endpoint=…;SharedAccessKeyName=…;SharedAccessKey=…[;UseDevelopmentEmulator=true]`.
    /// Errors never echo the value (it holds a key).
    pub fn parse(s: &str) -> std::result::Result<ConnectionString, String> {
        let mut endpoint = None;
        let mut key_name = None;
        let mut key = None;
        let mut emulator = false;
        for part in s.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let Some((k, v)) = part.split_once('=') else {
                return Err("a part of the connection string is not `Name=value`".into());
            };
            match k.trim().to_ascii_lowercase().as_str() {
                "endpoint" => endpoint = Some(v.trim().to_string()),
                "sharedaccesskeyname" => key_name = Some(v.trim().to_string()),
                // Keys are base64 and may end in `=`: split_once kept everything after the first `=`.
                "sharedaccesskey" => key = Some(v.trim().to_string()),
                "usedevelopmentemulator" => emulator = v.trim().eq_ignore_ascii_case("true"),
                "entitypath" => {}
                _ => {}
            }
        }
        let endpoint = endpoint.ok_or("the connection string has no Endpoint")?;
        let endpoint = url::Url::parse(&endpoint).map_err(|_| "the connection string's Endpoint is not a URL".to_string())?;
        if endpoint.host_str().is_none() {
            return Err("the connection string's Endpoint has no host".into());
        }
        Ok(ConnectionString {
            endpoint,
            key_name: key_name.ok_or("the connection string has no SharedAccessKeyName")?,
            key: key.ok_or("the connection string has no SharedAccessKey")?,
            development_emulator: emulator,
            entra: false,
        })
    }

    /// An identity-based connection to `fully_qualified_namespace` (`myns.servicebus.windows.net`;
    /// anything else is a local endpoint reached over plain HTTP), as the Functions host reads
    /// `ServiceBusConnection__fullyQualifiedNamespace`.
    pub fn entra(fully_qualified_namespace: &str) -> std::result::Result<ConnectionString, String> {
        let ns = fully_qualified_namespace.trim().trim_start_matches("sb://").trim_end_matches('/');
        let endpoint = url::Url::parse(&format!("sb://{ns}/")).map_err(|_| "not a namespace host name".to_string())?;
        if endpoint.host_str().is_none() {
            return Err("not a namespace host name".into());
        }
        let azure = ns.ends_with(".servicebus.windows.net");
        Ok(ConnectionString { endpoint, key_name: String::new(), key: String::new(), development_emulator: !azure, entra: true })
    }

    fn is_azure(&self) -> bool {
        self.endpoint.host_str().is_some_and(|h| h.ends_with(".servicebus.windows.net")) && !self.development_emulator
    }

    /// The namespace name the crate puts in front of `.servicebus.windows.net`.
    pub fn namespace(&self) -> String {
        let host = self.endpoint.host_str().unwrap_or("local");
        if self.is_azure() { host.trim_end_matches(".servicebus.windows.net").to_string() } else { "local".to_string() }
    }

    /// Where requests really go when the endpoint is not Azure: plain HTTP on the endpoint's host and port.
    pub fn rewrite_base(&self) -> Option<url::Url> {
        if self.is_azure() {
            return None;
        }
        let host = self.endpoint.host_str()?;
        let port = self.endpoint.port().unwrap_or(80);
        url::Url::parse(&format!("http://{host}:{port}/")).ok()
    }
}

/// An `azure_core::HttpClient` that sends every request to `base` (scheme, host, port), keeping
/// path, query, headers and body: the test seam of the legacy Service Bus crate.
#[derive(Debug)]
pub struct RewriteClient {
    pub base: url::Url,
    pub inner: Arc<dyn azure_core::HttpClient>,
}

#[async_trait]
impl azure_core::HttpClient for RewriteClient {
    async fn execute_request(&self, request: &azure_core::Request) -> azure_core::Result<azure_core::Response> {
        let mut req = request.clone();
        let url = req.url_mut();
        let fail =
            |what: &str| azure_core::Error::message(azure_core::error::ErrorKind::Other, format!("cannot rewrite the request {what}"));
        url.set_scheme(self.base.scheme()).map_err(|_| fail("scheme"))?;
        url.set_host(self.base.host_str()).map_err(|_| fail("host"))?;
        url.set_port(self.base.port()).map_err(|_| fail("port"))?;
        self.inner.execute_request(&req).await
    }
}

/// The Entra resource of Service Bus.
pub const SERVICE_BUS_SCOPE: &str = "https://servicebus.azure.net/.default";

/// An `azure_core::HttpClient` that authenticates every request with an Entra bearer token instead
/// of the SAS the legacy crate computes (with no key, the SAS it made is worthless and is dropped).
pub struct BearerClient {
    pub tokens: Arc<dyn crate::adapters::arm::TokenSource>,
    pub inner: Arc<dyn azure_core::HttpClient>,
}

impl std::fmt::Debug for BearerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerClient")
    }
}

#[async_trait]
impl azure_core::HttpClient for BearerClient {
    async fn execute_request(&self, request: &azure_core::Request) -> azure_core::Result<azure_core::Response> {
        let token = self
            .tokens
            .token(SERVICE_BUS_SCOPE)
            .await
            .map_err(|e| azure_core::Error::message(azure_core::error::ErrorKind::Credential, e.detail().to_string()))?;
        let mut req = request.clone();
        req.insert_header(azure_core::headers::AUTHORIZATION, format!("Bearer {token}"));
        self.inner.execute_request(&req).await
    }
}

pub struct ServiceBusPublisher {
    topic: TopicClient,
    parked: QueueClient,
    topic_name: String,
    parked_name: String,
}

impl ServiceBusPublisher {
    /// `http` is the transport: `azure_core::new_http_client()` in production, anything in tests.
    pub fn new(
        conn: &ConnectionString,
        topic: &str,
        parked_queue: &str,
        http: Arc<dyn azure_core::HttpClient>,
    ) -> std::result::Result<ServiceBusPublisher, String> {
        let http: Arc<dyn azure_core::HttpClient> = match conn.rewrite_base() {
            Some(base) => Arc::new(RewriteClient { base, inner: http }),
            None => http,
        };
        let ns = conn.namespace();
        let topic_client = TopicClient::new(http.clone(), ns.clone(), topic, conn.key_name.clone(), conn.key.clone())
            .map_err(|e| format!("service bus topic client: {e}"))?;
        let parked = QueueClient::new(http, ns, parked_queue, conn.key_name.clone(), conn.key.clone())
            .map_err(|e| format!("service bus queue client: {e}"))?;
        Ok(ServiceBusPublisher { topic: topic_client, parked, topic_name: topic.into(), parked_name: parked_queue.into() })
    }
}

/// Application property values travel as HTTP headers and are typed by quoting: a string must be
/// sent JSON-quoted. Non-ASCII and control characters are `\u`-escaped so the header stays valid.
pub fn property_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (' '..='~').contains(&c) => out.push(c),
            c => {
                let mut buf = [0u16; 2];
                for u in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{u:04x}"));
                }
            }
        }
    }
    out.push('"');
    out
}

/// Broker properties travel as raw header JSON: keep a foreign id or label ASCII-printable (and
/// within MessageId's 128 characters) by replacing it with a digest when it is not.
fn header_safe(s: &str) -> String {
    if s.len() <= 100 && s.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        s.to_string()
    } else {
        format!("sha-{}", deploychain_events::short_digest(&[s]))
    }
}

/// `ScheduledEnqueueTimeUtc` as the Service Bus REST reference writes `DateTime` broker
/// properties: RFC 1123 in `GMT`, "Sun, 06 Nov 1994 08:49:37 GMT"
/// (https://learn.microsoft.com/rest/api/servicebus/message-headers-and-properties, Notes). The
/// form has whole seconds, so the time is rounded **up**: a scheduled message never becomes
/// visible before the time its step asked for. (Rounded down, a look scheduled 500 ms ahead was
/// due at once, and a bake was looked at ~170 times a second.)
pub fn scheduled_enqueue_time_utc(at: DateTime<Utc>) -> String {
    let second = chrono::Duration::seconds(1);
    let floor = at.duration_trunc(second).unwrap_or(at);
    let up = if floor < at { floor + second } else { floor };
    up.format("%a, %d %b %Y %H:%M:%S GMT").to_string()
}

/// The `BrokerProperties` of a publish. Written here, not by the crate: its
/// `SettableBrokerProperties` serializes `ScheduledEnqueueTimeUtc` with `time`'s RFC 2822
/// (`Mon, 23 Nov 2026 10:00:00 +0000`, azure_messaging_servicebus 0.21 `src/service_bus/mod.rs`),
/// a form the REST reference does not document.
#[derive(serde::Serialize)]
#[serde(rename_all = "PascalCase")]
struct BrokerProperties<'a> {
    message_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    session_id: Option<&'a str>,
    label: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    scheduled_enqueue_time_utc: Option<String>,
}

/// The header name the crate's own `BrokerProperties` header has. A custom header of that name is
/// how the publisher's JSON reaches the wire with the crate unmodified: the crate sends the
/// custom headers and, given no `broker_properties`, no header of its own.
const BROKER_PROPERTIES: &str = "BrokerProperties";

/// JSON with every non-ASCII character `\u`-escaped, so it is a valid header value.
fn ascii_json(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut buf = [0u16; 2];
            for u in c.encode_utf16(&mut buf) {
                out.push_str(&format!("\\u{u:04x}"));
            }
        }
    }
    out
}

fn transient(entity: &str, e: azure_core::Error) -> Error {
    // The error text names the status and entity; it holds no key (the SAS goes in a header).
    Error::Transient(format!("service bus send to `{entity}` failed: {e}"))
}

#[async_trait]
impl Publish for ServiceBusPublisher {
    async fn publish(&self, msg: &Outbound) -> Result<()> {
        // The names reach the wire lower-cased (`cloudevents_type`, `diagnostic-id`), whatever
        // their case here, and no client this crate uses can do otherwise: azure_core 0.21
        // lower-cases every header name made from a String (`HeaderName::from`, azure_core
        // `src/headers/mod.rs`); the `http` crate's names that reqwest and hyper send are lower-case
        // by construction; hyper 1 writes another case only for a request carrying its
        // crate-private `HeaderCaseMap` (hyper `src/ext/mod.rs`), so reqwest 0.12's nearest is
        // Title-Case (`http1_title_case_headers`: `Cloudevents_type`); and HTTP/2 forbids upper
        // case in field names (RFC 9113 §8.2.1). So every reader of ours matches property names
        // case-insensitively (docs/decisions/0004-wire-choices.md).
        let mut props: HashMap<String, String> = msg.properties.iter().map(|(k, v)| (k.clone(), property_value(v))).collect();
        let bp = BrokerProperties {
            message_id: &msg.message_id,
            session_id: msg.session_id.as_deref(),
            label: &msg.subject,
            scheduled_enqueue_time_utc: msg.scheduled_at.map(scheduled_enqueue_time_utc),
        };
        let bp = serde_json::to_string(&bp).map_err(|e| Error::Transient(format!("BrokerProperties: {e}")))?;
        props.insert(BROKER_PROPERTIES.to_string(), ascii_json(&bp));
        let opts =
            SendMessageOptions { content_type: Some(msg.content_type.clone()), broker_properties: None, custom_properties: Some(props) };
        self.topic.topic_sender().send_message(&msg.body, Some(opts)).await.map_err(|e| transient(&self.topic_name, e))
    }

    async fn park(&self, msg: &Parked) -> Result<()> {
        let mut props = HashMap::new();
        props.insert("DeadLetterReason".to_string(), property_value(&msg.reason));
        props.insert("DeadLetterErrorDescription".to_string(), property_value(&msg.description));
        props.insert("ParkedBy".to_string(), property_value(&msg.function));
        props.insert("OriginalMessageId".to_string(), property_value(&msg.message_id));
        props.insert("OriginalDeliveryCount".to_string(), msg.delivery_count.to_string());
        if let Some(s) = &msg.original_subject {
            props.insert("OriginalSubject".to_string(), property_value(s));
        }
        let opts = SendMessageOptions {
            content_type: Some("application/octet-stream".into()),
            broker_properties: Some(SettableBrokerProperties {
                // One parked copy per (function, message): a retried park is dropped by duplicate detection.
                message_id: Some(format!("parked.{}.{}", msg.function, header_safe(&msg.message_id))),
                label: msg.original_subject.as_deref().map(header_safe),
                ..Default::default()
            }),
            custom_properties: Some(props),
        };
        self.parked.send_message(&msg.body, Some(opts)).await.map_err(|e| transient(&self.parked_name, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_strings_parse_and_hide_the_key() {
        let c = ConnectionString::parse("Endpoint=sb://myns.servicebus.windows.net/;SharedAccessKeyName=Root;SharedAccessKey=abc=")
            .expect("parses");
        assert_eq!(c.key, "abc=");
        assert_eq!(c.namespace(), "myns");
        assert!(c.rewrite_base().is_none());
        assert!(!format!("{c:?}").contains("abc="));

        let l =
            ConnectionString::parse("Endpoint=sb://127.0.0.1:7072;SharedAccessKeyName=Root;SharedAccessKey=k;UseDevelopmentEmulator=true")
                .expect("parses");
        assert_eq!(l.rewrite_base().map(|u| u.to_string()), Some("http://127.0.0.1:7072/".into()));

        let err = ConnectionString::parse("Endpoint=sb://x/;SharedAccessKeyName=Root").err().unwrap_or_default();
        assert!(err.contains("SharedAccessKey"), "{err}");
        let err = ConnectionString::parse("SharedAccessKey=supersecret").err().unwrap_or_default();
        assert!(!err.contains("supersecret"));
    }

    #[test]
    fn foreign_ids_are_made_header_safe() {
        assert_eq!(header_safe("web-1.push"), "web-1.push");
        assert!(header_safe("café-1").starts_with("sha-"));
        assert!(header_safe(&"x".repeat(300)).starts_with("sha-"));
    }

    #[test]
    fn scheduled_times_are_rfc1123_gmt_rounded_up_to_the_second() {
        let t = |s: &str| DateTime::parse_from_rfc3339(s).map(|t| t.with_timezone(&Utc)).unwrap_or_default();
        assert_eq!(scheduled_enqueue_time_utc(t("2026-11-23T10:00:00Z")), "Mon, 23 Nov 2026 10:00:00 GMT");
        assert_eq!(scheduled_enqueue_time_utc(t("2026-11-23T10:00:00.000000001Z")), "Mon, 23 Nov 2026 10:00:01 GMT");
        assert_eq!(scheduled_enqueue_time_utc(t("2026-11-23T10:00:00.5Z")), "Mon, 23 Nov 2026 10:00:01 GMT");
        assert_eq!(scheduled_enqueue_time_utc(t("2026-12-31T23:59:59.999Z")), "Fri, 01 Jan 2027 00:00:00 GMT");
        assert_eq!(scheduled_enqueue_time_utc(t("1994-11-06T08:49:37Z")), "Sun, 06 Nov 1994 08:49:37 GMT", "the reference's example");
    }

    #[test]
    fn broker_properties_json_stays_ascii() {
        assert_eq!(ascii_json(r#"{"Label":"café"}"#), r#"{"Label":"caf\u00e9"}"#);
    }

    #[test]
    fn property_values_are_quoted_header_safe_strings() {
        assert_eq!(property_value("dev.deploychain.push.v1"), "\"dev.deploychain.push.v1\"");
        assert_eq!(property_value("a\"b\nc é"), "\"a\\\"b\\u000ac \\u00e9\"");
    }
}
