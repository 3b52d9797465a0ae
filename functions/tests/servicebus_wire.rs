//! The Service Bus publisher on the wire: the unmodified `azure_messaging_servicebus` 0.21 client,
//! sending through `azure_core::new_http_client()` (reqwest) and the publisher's `RewriteClient`
//! to a real local HTTP endpoint that records every request and answers like Service Bus does.
//! Reference: functions-protocol.md §7 (REST wire format) and §8 (what the crate sends).
#![allow(clippy::unwrap_used)]

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use base64::Engine;
use chrono::{DateTime, Utc};
use deploychain_events::{DeployEvent, Deployment, EventData, ImageKind, ImageRef, TraceContext};
use deploychain_functions::adapters::servicebus::{ConnectionString, ServiceBusPublisher};
use deploychain_functions::adapters::{Outbound, Parked, Publish};
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

/// A key with every base64 character that needs URL-encoding, and a trailing `=` that the
/// connection-string parser must keep.
const KEY: &str = "dGVzdC1rZXk+PmZvcj8/c2VydmljZWJ1c/v/IQ==";
const KEY_NAME: &str = "RootManageSharedAccessKey";
const TOPIC: &str = "deploychain-events";
const PARKED: &str = "deploychain-parked";
const TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

/// One request as the endpoint received it.
#[derive(Debug, Clone)]
struct Recorded {
    method: Method,
    path: String,
    query: Option<String>,
    /// Header names as received (hyper lower-cases them), values as UTF-8 (lossy).
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Recorded {
    /// The only value of header `name`; fails the test if it is missing or repeated.
    fn header(&self, name: &str) -> &str {
        let vals: Vec<&str> = self.headers.iter().filter(|(k, _)| k == name).map(|(_, v)| v.as_str()).collect();
        assert_eq!(vals.len(), 1, "expected exactly one `{name}` header, got {vals:?}; all headers: {:?}", self.headers);
        vals[0]
    }

    fn broker_properties(&self) -> serde_json::Map<String, Value> {
        let raw = self.header("brokerproperties");
        match serde_json::from_str::<Value>(raw) {
            Ok(Value::Object(m)) => m,
            other => panic!("brokerproperties is not a JSON object: {raw:?} ({other:?})"),
        }
    }
}

#[derive(Clone)]
struct Bus {
    status: StatusCode,
    seen: Arc<Mutex<Vec<Recorded>>>,
}

async fn record(State(bus): State<Bus>, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> (StatusCode, &'static str) {
    let headers = headers.iter().map(|(k, v)| (k.as_str().to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned())).collect();
    bus.seen.lock().unwrap().push(Recorded {
        method,
        path: uri.path().to_string(),
        query: uri.query().map(str::to_string),
        headers,
        body: body.to_vec(),
    });
    // Service Bus answers a send with 201 and an empty body; errors get a short XML-ish body.
    let body = if bus.status.is_success() { "" } else { "<Error><Code>503</Code><Detail>busy</Detail></Error>" };
    (bus.status, body)
}

/// A local "Service Bus" on 127.0.0.1:<random port> answering every request with `status`.
async fn start_bus(status: StatusCode) -> (u16, Arc<Mutex<Vec<Recorded>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let app = Router::new().fallback(record).with_state(Bus { status, seen: seen.clone() });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (port, seen)
}

fn connection(port: u16) -> ConnectionString {
    ConnectionString::parse(&format!(
        "Endpoint=sb://127.0.0.1:{port};SharedAccessKeyName={KEY_NAME};SharedAccessKey={KEY};UseDevelopmentEmulator=true"
    ))
    .unwrap()
}

fn publisher(port: u16) -> ServiceBusPublisher {
    let conn = connection(port);
    assert_eq!(conn.key, KEY, "the parser keeps the key's trailing `=`");
    ServiceBusPublisher::new(&conn, TOPIC, PARKED, azure_core::new_http_client()).unwrap()
}

fn event() -> DeployEvent {
    let image = ImageRef {
        kind: ImageKind::Container,
        id: "ghcr.io/octo-org/web@sha256:4b5e2a0e1f8c3d7a9b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a".into(),
        version: Some("1.2.3".into()),
        digest: Some("sha256:4b5e2a0e1f8c3d7a9b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a".into()),
    };
    DeployEvent {
        id: "web-738a951d2f3e.deploy.staging.started".into(),
        source: "/deploychain/web/deploy".into(),
        time: DateTime::parse_from_rfc3339("2026-11-22T10:00:00.123Z").unwrap().with_timezone(&Utc),
        run_id: "web-738a951d2f3e".into(),
        trace: TraceContext { traceparent: Some(TRACEPARENT.into()), tracestate: None },
        data: EventData::DeploymentStarted(Deployment {
            app: "web".into(),
            stage: "staging".into(),
            target: "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg-web/providers/Microsoft.Compute/virtualMachineScaleSets/web-staging".into(),
            image,
            commit: "738a951d2f3e7c2b16cc5a0d6a2b1e7d9a1b2c3d".into(),
            reason: None,
            restored: None,
        }),
    }
}

fn outbound() -> (DeployEvent, Outbound) {
    let ev = event();
    let out = Outbound::from_event(&ev, Some("web/staging".into()));
    (ev, out)
}

/// Send one message to a bus answering 201 and return the single request it received.
async fn sent_once(f: impl AsyncFnOnce(&ServiceBusPublisher)) -> Recorded {
    let (port, seen) = start_bus(StatusCode::CREATED).await;
    let p = publisher(port);
    f(&p).await;
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "expected exactly one request, got {seen:#?}");
    seen.into_iter().next().unwrap()
}

/// `authorization: SharedAccessSignature sr=…&sig=…&se=…&skn=…` as raw (still URL-encoded) fields.
fn sas_fields(header: &str) -> BTreeMap<String, String> {
    let token = header.strip_prefix("SharedAccessSignature ").unwrap_or_else(|| panic!("not a SAS token: {header:?}"));
    let mut fields = BTreeMap::new();
    for part in token.split('&') {
        let (k, v) = part.split_once('=').unwrap_or_else(|| panic!("SAS field without `=`: {part:?}"));
        assert!(fields.insert(k.to_string(), v.to_string()).is_none(), "repeated SAS field {k}");
    }
    assert_eq!(fields.keys().map(String::as_str).collect::<Vec<_>>(), ["se", "sig", "skn", "sr"], "{header}");
    fields
}

/// `application/x-www-form-urlencoded` value decoding (what `form_urlencoded::byte_serialize` wrote).
fn form_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(&s.replace('+', " ")).decode_utf8().unwrap().into_owned()
}

fn sign(key: &str, sr_as_sent: &str, se: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).unwrap();
    mac.update(format!("{sr_as_sent}\n{se}").as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_sends_message_id_label_session_and_cloudevents_properties_on_the_wire() {
    let (ev, out) = outbound();
    let req = sent_once(async |p| p.publish(&out).await.unwrap()).await;

    assert_eq!(req.method, Method::POST);
    assert_eq!(req.path, format!("/{TOPIC}/messages"));
    assert_eq!(req.query, None, "a send carries no query string");

    let bp = req.broker_properties();
    assert_eq!(bp.get("MessageId"), Some(&Value::String(out.message_id.clone())));
    assert_eq!(out.message_id, ev.id, "the MessageId is the CloudEvents id");
    assert_eq!(bp.get("Label"), Some(&Value::String("dev.deploychain.deployment.started.v1".into())));
    assert_eq!(bp.get("SessionId"), Some(&Value::String("web/staging".into())));
    assert_eq!(bp.keys().map(String::as_str).collect::<BTreeSet<_>>(), BTreeSet::from(["Label", "MessageId", "SessionId"]));

    assert_eq!(req.header("content-type"), "application/cloudevents+json; charset=utf-8");

    assert_eq!(req.body, out.body.as_bytes(), "the body arrives byte for byte");
    assert_eq!(DeployEvent::from_json_bytes(&req.body), Ok(ev.clone()));

    // Every CloudEvents attribute is an application property: a lower-cased header whose value is
    // the JSON-quoted string (quoted ⇒ string on the Service Bus side).
    let expected: BTreeMap<&str, String> = BTreeMap::from([
        ("cloudevents_type", "dev.deploychain.deployment.started.v1".to_string()),
        ("cloudevents_id", ev.id.clone()),
        ("cloudevents_source", ev.source.clone()),
        ("cloudevents_subject", ev.run_id.clone()),
        ("cloudevents_time", "2026-11-22T10:00:00.123Z".to_string()),
        ("cloudevents_specversion", "1.0".to_string()),
        ("cloudevents_runid", ev.run_id.clone()),
        ("cloudevents_traceparent", TRACEPARENT.to_string()),
    ]);
    for (name, value) in &expected {
        assert_eq!(req.header(name), format!("\"{value}\""), "header {name}");
    }
    assert_eq!(req.header("cloudevents_type"), "\"dev.deploychain.deployment.started.v1\"");
    let sent: BTreeSet<&str> = req.headers.iter().map(|(k, _)| k.as_str()).filter(|k| k.starts_with("cloudevents_")).collect();
    assert_eq!(sent, expected.keys().copied().collect::<BTreeSet<_>>(), "no other cloudevents_ properties");
    // The Azure SDKs' and the Functions host's parent-span property carries the same traceparent.
    assert_eq!(req.header("diagnostic-id"), format!("\"{TRACEPARENT}\""));
    assert_eq!(out.properties.len(), expected.len() + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_message_carries_its_enqueue_time_on_the_wire() {
    let (_, out) = outbound();
    let at = chrono::DateTime::parse_from_rfc3339("2026-11-23T10:00:00Z").unwrap().with_timezone(&chrono::Utc);
    let out = out.scheduled(at);
    let req = sent_once(async |p| p.publish(&out).await.unwrap()).await;
    let bp = req.broker_properties();
    // RFC 1123 in GMT, as the REST reference writes dates (the local bus takes only this form).
    assert_eq!(bp.get("ScheduledEnqueueTimeUtc"), Some(&Value::String("Mon, 23 Nov 2026 10:00:00 GMT".into())));
    assert_eq!(
        bp.keys().map(String::as_str).collect::<BTreeSet<_>>(),
        BTreeSet::from(["Label", "MessageId", "ScheduledEnqueueTimeUtc", "SessionId"])
    );
}

/// One HTTP/1.1 request exactly as it arrived on a plain TCP socket: the head (request line and
/// header lines, names in the case they were sent) and the body.
struct RawRequest {
    head: String,
    body: Vec<u8>,
}

impl RawRequest {
    /// The header lines, as sent.
    fn lines(&self) -> Vec<&str> {
        self.head.split("\r\n").skip(1).filter(|l| !l.is_empty()).collect()
    }
}

/// Publish through `http` to a socket that records the bytes of the request and answers 201 as
/// Service Bus does (an empty chunked body, `Content-Type: application/xml; charset=utf-8`).
async fn raw_send(http: Arc<dyn azure_core::HttpClient>, send: impl AsyncFnOnce(&ServiceBusPublisher)) -> RawRequest {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            let n = sock.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the connection closed before the request's head ended: {:?}", String::from_utf8_lossy(&buf));
            buf.extend_from_slice(&chunk[..n]);
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
        };
        let head = String::from_utf8(buf[..head_end].to_vec()).unwrap();
        let length: usize = head
            .split("\r\n")
            .find_map(|l| {
                l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("content-length")).map(|(_, v)| v.trim().parse().unwrap())
            })
            .unwrap_or(0);
        while buf.len() < head_end + length {
            let n = sock.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the connection closed inside the body");
            buf.extend_from_slice(&chunk[..n]);
        }
        sock.write_all(
            b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\nContent-Type: application/xml; charset=utf-8\r\n\r\n0\r\n\r\n",
        )
        .await
        .unwrap();
        RawRequest { head, body: buf[head_end..head_end + length].to_vec() }
    });
    let p = ServiceBusPublisher::new(&connection(port), TOPIC, PARKED, http).unwrap();
    send(&p).await;
    server.await.unwrap()
}

/// The `BrokerProperties` of a scheduled publish, byte for byte: the publisher writes the JSON
/// (the crate's own field would say `+0000`), the time in the reference's RFC 1123 `GMT` form and
/// rounded up to the next whole second, never down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_send_says_its_time_in_rfc1123_gmt_rounded_up() {
    let (_, out) = outbound();
    for (at, on_the_wire) in
        [("2026-11-23T10:00:00.250Z", "Mon, 23 Nov 2026 10:00:01 GMT"), ("2026-11-23T10:00:00Z", "Mon, 23 Nov 2026 10:00:00 GMT")]
    {
        let at = DateTime::parse_from_rfc3339(at).unwrap().with_timezone(&Utc);
        let out = out.clone().scheduled(at);
        let req = raw_send(deploychain_functions::outbound::service_bus_http().unwrap(), async |p| p.publish(&out).await.unwrap()).await;
        let expected = format!(
            "Brokerproperties: {{\"MessageId\":\"{}\",\"SessionId\":\"web/staging\",\"Label\":\"dev.deploychain.deployment.started.v1\",\"ScheduledEnqueueTimeUtc\":\"{on_the_wire}\"}}",
            out.message_id
        );
        let bp: Vec<&str> = req.lines().into_iter().filter(|l| l.to_ascii_lowercase().starts_with("brokerproperties:")).collect();
        assert_eq!(bp, [expected.as_str()], "{}", req.head);
        assert_eq!(req.body, out.body.as_bytes());
    }
}

/// Application property names travel as HTTP header names, whose case nothing in this stack keeps
/// (decision 0004): azure_core's own client sends them lower-cased; the handler's Service Bus
/// transport sends Title-Case, which gives `Diagnostic-Id` exactly as the Azure SDKs and the
/// Functions host look it up, and `Cloudevents_type` where the AMQP binding says `cloudEvents_type`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn application_property_names_reach_the_wire_as_the_transport_cases_them() {
    let (ev, out) = outbound();
    assert!(out.properties.contains_key("cloudEvents_type") && out.properties.contains_key("Diagnostic-Id"));
    let transports: [(&str, Arc<dyn azure_core::HttpClient>, bool); 2] = [
        ("service_bus_http", deploychain_functions::outbound::service_bus_http().unwrap(), true),
        ("azure_core", azure_core::new_http_client(), false),
    ];
    for (name, http, title) in transports {
        let req = raw_send(http, async |p| p.publish(&out).await.unwrap()).await;
        let lines = req.lines();
        assert!(req.head.starts_with(&format!("POST /{TOPIC}/messages HTTP/1.1\r\n")), "{name}: {}", req.head);
        let case = |lower: &str, titled: &str| if title { titled.to_string() } else { lower.to_string() };
        for line in [
            format!("{}: \"{}\"", case("cloudevents_type", "Cloudevents_type"), ev.event_type().as_str()),
            format!("{}: \"1.0\"", case("cloudevents_specversion", "Cloudevents_specversion")),
            format!("{}: \"{}\"", case("cloudevents_runid", "Cloudevents_runid"), ev.run_id),
            format!("{}: \"{TRACEPARENT}\"", case("diagnostic-id", "Diagnostic-Id")),
            format!("{}: application/cloudevents+json; charset=utf-8", case("content-type", "Content-Type")),
        ] {
            assert!(lines.contains(&line.as_str()), "{name}: no `{line}` in {lines:#?}");
        }
        let broker = case("brokerproperties: {", "Brokerproperties: {");
        assert!(lines.iter().any(|l| l.starts_with(&broker)), "{name}: {lines:#?}");
        assert!(!lines.iter().any(|l| l.starts_with("cloudEvents_")), "{name}: {lines:#?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sas_signature_verifies_with_the_key_and_fails_with_another() {
    let (_, out) = outbound();
    let req = sent_once(async |p| p.publish(&out).await.unwrap()).await;

    let auth = req.header("authorization");
    assert!(!auth.contains(KEY), "the key itself never travels");
    let f = sas_fields(auth);
    let (sr, sig, se, skn) = (&f["sr"], &f["sig"], &f["se"], &f["skn"]);

    assert_eq!(skn, KEY_NAME);

    // `sr` is the URL-encoded URL the crate built (before the rewrite to the local endpoint).
    assert!(!sr.contains('/') && !sr.contains(':'), "sr is URL-encoded: {sr}");
    let resource = form_decode(sr);
    assert!(resource.ends_with(&format!("/{TOPIC}/messages")), "sr decodes to {resource}");
    assert!(url::Url::parse(&resource).is_ok(), "sr decodes to a URL: {resource}");

    // The signature: base64(HMAC-SHA256(key string bytes, "<sr as sent>\n<se>")).
    let sig = form_decode(sig);
    assert_eq!(sign(KEY, sr, se), sig, "the signature verifies with the connection string's key");
    assert_ne!(sign("c29tZS1vdGhlci1rZXk=", sr, se), sig, "another key does not verify");
    // The key is used as its string's bytes, not base64-decoded (protocol §7 "Auth").
    let decoded_key = base64::engine::general_purpose::STANDARD.decode(KEY).unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(&decoded_key).unwrap();
    mac.update(format!("{sr}\n{se}").as_bytes());
    assert_ne!(base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()), sig);
    // Signing the decoded sr instead of the sr as sent does not verify either.
    assert_ne!(sign(KEY, &resource, se), sig);

    let se: i64 = se.parse().unwrap();
    let now = Utc::now().timestamp();
    assert!(se > now, "se {se} is in the future (now {now})");
    assert!(se <= now + 3_600 + 60, "se {se} is at most about an hour ahead (now {now})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn park_sends_the_body_and_dead_letter_reason_to_the_parking_queue() {
    let description = "data of `dev.deploychain.push.v1` does not match its schema: missing field `app`\nnear \"café\" — line 1";
    let parked = Parked {
        message_id: "web-abc.push".into(),
        function: "OnPush".into(),
        reason: "MalformedEvent".into(),
        description: description.into(),
        delivery_count: 3,
        body: "{\"specversion\":\"1.0\",\"oops\":true}".into(),
        original_subject: Some("dev.deploychain.push.v1".into()),
    };
    let req = sent_once(async |p| p.park(&parked).await.unwrap()).await;

    assert_eq!(req.method, Method::POST);
    assert_eq!(req.path, format!("/{PARKED}/messages"));
    assert_eq!(req.body, parked.body.as_bytes());

    let bp = req.broker_properties();
    assert_eq!(bp.get("MessageId"), Some(&Value::String("parked.OnPush.web-abc.push".into())));
    assert_eq!(bp.get("Label"), Some(&Value::String("dev.deploychain.push.v1".into())));

    assert_eq!(req.header("deadletterreason"), "\"MalformedEvent\"");

    let d = req.header("deadlettererrordescription");
    assert!(d.is_ascii() && !d.chars().any(|c| c.is_ascii_control()), "the header stays printable ASCII: {d:?}");
    assert!(d.starts_with('"') && d.ends_with('"'), "JSON-quoted: {d}");
    assert!(d.contains("\\u000a"), "the newline is \\u-escaped: {d}");
    assert!(d.contains("caf\\u00e9"), "é is \\u-escaped: {d}");
    assert!(d.contains("\\u2014"), "— is \\u-escaped: {d}");
    assert!(d.contains("\\\"caf"), "quotes inside are escaped: {d}");
    assert_eq!(serde_json::from_str::<String>(d).unwrap(), description, "the header is a JSON string of the description");

    assert_eq!(req.header("parkedby"), "\"OnPush\"");
    assert_eq!(req.header("originalmessageid"), "\"web-abc.push\"");
    assert_eq!(req.header("originaldeliverycount"), "3", "an unquoted integer is an Int64 property");
    assert_eq!(req.header("originalsubject"), "\"dev.deploychain.push.v1\"");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_bus_is_a_transient_error() {
    let (_, out) = outbound();
    for status in [StatusCode::SERVICE_UNAVAILABLE, StatusCode::GONE] {
        let (port, seen) = start_bus(status).await;
        let p = publisher(port);

        let e = p.publish(&out).await.unwrap_err();
        assert!(e.is_transient(), "{status}: {e:?}");
        let text = format!("{e} {e:?}");
        assert!(!text.contains(KEY), "{status}: the error text leaks the key: {text}");
        assert!(!text.contains("SharedAccessSignature"), "{status}: the error text leaks the token: {text}");
        assert!(text.contains(TOPIC), "{status}: the error names the entity: {text}");
        assert!(text.contains(status.as_str()), "{status}: the error names the status: {text}");

        let parked = Parked {
            message_id: "m".into(),
            function: "OnPush".into(),
            reason: "MalformedEvent".into(),
            description: "d".into(),
            delivery_count: 1,
            body: "x".into(),
            original_subject: None,
        };
        let e = p.park(&parked).await.unwrap_err();
        assert!(e.is_transient(), "{status}: {e:?}");
        assert!(!format!("{e} {e:?}").contains(KEY));

        assert_eq!(seen.lock().unwrap().len(), 2, "{status}: one attempt each, no retries inside the publisher");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_bus_is_a_transient_error() {
    // A port that was just free: nothing listens on it any more.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let p = publisher(port);
    let (_, out) = outbound();
    let e = tokio::time::timeout(std::time::Duration::from_secs(30), p.publish(&out)).await.expect("fails fast").unwrap_err();
    assert!(e.is_transient(), "{e:?}");
    assert!(!format!("{e} {e:?}").contains(KEY));
}
