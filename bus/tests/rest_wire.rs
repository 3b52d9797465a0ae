//! The REST router on the wire, request by request (`oneshot`), for what the Rust client cannot
//! send: the docs' own examples, batches, other SAS scopes, bad input, settlement by MessageId.
#![allow(clippy::unwrap_used)]

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use base64::Engine;
use common::*;
use deploychain_bus::{Broker, SasKeys, Topology};
use hmac::{Hmac, Mac};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use sha2::Sha256;
use std::time::Duration;
use tower::ServiceExt;

const KEY: &str = "s3cr3t+/=";
const KEY_NAME: &str = "RootManageSharedAccessKey";

fn fixture(name: &str) -> String {
    std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/servicebus").join(name)).unwrap()
}

fn sas_for(resource: &str, key: &str, expiry: i64) -> String {
    let sr: String = url::form_urlencoded::byte_serialize(resource.as_bytes()).collect();
    let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).unwrap();
    mac.update(format!("{sr}\n{expiry}").as_bytes());
    let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    let sig: String = url::form_urlencoded::byte_serialize(sig.as_bytes()).collect();
    format!("SharedAccessSignature sr={sr}&sig={sig}&se={expiry}&skn={KEY_NAME}")
}

/// A namespace-wide token, as in the docs' examples (`sr=your-namespace`).
fn sas() -> String {
    sas_for("your-namespace", KEY, chrono::Utc::now().timestamp() + 600)
}

struct Reply {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> &str {
        self.headers.get(name).unwrap_or_else(|| panic!("no `{name}` header in {:?}", self.headers)).to_str().unwrap()
    }

    fn broker_properties(&self) -> serde_json::Map<String, Value> {
        serde_json::from_str(self.header("brokerproperties")).unwrap()
    }
}

async fn call(b: &Broker, req: Request<Body>) -> Reply {
    let res = deploychain_bus::rest_router(b.clone(), SasKeys::single(KEY_NAME, KEY)).oneshot(req).await.unwrap();
    let status = res.status();
    let headers = res.headers().clone();
    let body = res.into_body().collect().await.unwrap().to_bytes().to_vec();
    Reply { status, headers, body }
}

fn req(method: &str, uri: &str) -> axum::http::request::Builder {
    Request::builder().method(method).uri(uri).header("authorization", sas()).header("host", "your-namespace.servicebus.windows.net")
}

fn docs_broker() -> Broker {
    let mut t = Topology::new("your-namespace");
    t.add_queue(deploychain_bus::Queue::new("HttpClientSampleQueue")).unwrap();
    Broker::open_in_memory(t).unwrap()
}

/// The keys of a JSON object and the JSON type of each value.
fn shape(m: &serde_json::Map<String, Value>) -> Vec<(String, &'static str)> {
    m.iter()
        .map(|(k, v)| {
            let t = match v {
                Value::String(_) => "string",
                Value::Number(_) => "number",
                Value::Bool(_) => "bool",
                _ => "other",
            };
            (k.clone(), t)
        })
        .collect()
}

#[tokio::test]
async fn the_docs_send_peek_lock_and_receive_examples_round_trip() {
    let b = docs_broker();
    for _ in 0..2 {
        let send = req("POST", "/HttpClientSampleQueue/messages?timeout=60")
            .header("BrokerProperties", fixture("BrokerProperties.send-message.request.json"))
            .header("Priority", "High")
            .header("Customer", "12345,ABC")
            .header("Content-Type", "application/atom+xml;type=entry;charset=utf-8")
            .header("Expect", "100-continue")
            .body(Body::from("This is a message."))
            .unwrap();
        let r = call(&b, send).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", String::from_utf8_lossy(&r.body));
        assert!(r.body.is_empty());
    }

    let r = call(&b, req("POST", "/HttpClientSampleQueue/messages/head?timeout=60").body(Body::empty()).unwrap()).await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(r.body, b"This is a message.");
    assert_eq!(r.header("content-type"), "application/atom+xml;type=entry;charset=utf-8");
    assert_eq!(r.header("priority"), "\"High\"");
    assert_eq!(r.header("customer"), "\"12345,ABC\"");
    let bp = r.broker_properties();
    let docs: serde_json::Map<String, Value> = serde_json::from_str(&fixture("BrokerProperties.peek-lock.response.json")).unwrap();
    let ours = shape(&bp);
    for key in shape(&docs) {
        assert!(ours.contains(&key), "the docs' response has {key:?}; ours: {bp:?}");
    }
    assert_eq!((bp["Label"].as_str(), bp["DeliveryCount"].as_i64(), bp["TimeToLive"].as_f64()), (Some("M1"), Some(1), Some(10.0)));
    assert!(bp["LockedUntilUtc"].as_str().unwrap().ends_with(" GMT"));
    let token = bp["LockToken"].as_str().unwrap();
    assert_eq!(
        r.header("location"),
        format!("http://your-namespace.servicebus.windows.net/HttpClientSampleQueue/messages/1/{token}"),
        "Location is built from the Host header"
    );

    let r = call(&b, req("DELETE", "/HttpClientSampleQueue/messages/head?timeout=60").body(Body::empty()).unwrap()).await;
    assert_eq!(r.status, StatusCode::OK);
    let bp = r.broker_properties();
    let docs: serde_json::Map<String, Value> = serde_json::from_str(&fixture("BrokerProperties.receive-and-delete.response.json")).unwrap();
    let ours = shape(&bp);
    for key in shape(&docs) {
        assert!(ours.contains(&key), "the docs' response has {key:?}; ours: {bp:?}");
    }
    assert!(!bp.contains_key("LockToken") && !bp.contains_key("LockedUntilUtc"));
    assert_eq!(bp["SequenceNumber"], json!(2));
}

#[tokio::test]
async fn a_batch_is_sent_atomically() {
    let b = memory();
    let batch = json!([
        {"Body": "This is the first message", "UserProperties": {"Message": 1, "Flag": true}},
        {"Body": "second", "BrokerProperties": {"Label": "M2", "MessageId": "b-2", "TimeToLiveTimeSpan": "0.00:00:40"}},
    ]);
    let send = req("POST", "/q/messages")
        .header("content-type", "application/vnd.microsoft.servicebus.json")
        .body(Body::from(batch.to_string()))
        .unwrap();
    assert_eq!(call(&b, send).await.status, StatusCode::CREATED);
    let all = b.peek(&q("q"), 0, 10).await.unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!((text(&all[0]).as_str(), all[0].properties.get("Message")), ("This is the first message", Some(&json!(1))));
    assert_eq!((all[1].label.as_deref(), all[1].message_id.as_str()), (Some("M2"), "b-2"));
    assert_eq!(all[1].time_to_live, Some(Duration::from_secs(40)));

    let bad = json!([{"Body": "ok"}, {"Body": "bad", "BrokerProperties": {"TimeToLive": "soon"}}]);
    let send = req("POST", "/q/messages")
        .header("content-type", "application/vnd.microsoft.servicebus.json")
        .body(Body::from(bad.to_string()))
        .unwrap();
    assert_eq!(call(&b, send).await.status, StatusCode::BAD_REQUEST);
    assert_eq!(b.count(&q("q")).await.unwrap().active, 2, "a refused batch stores nothing");
}

/// A message scheduled half a second ahead, its time written as a REST sender must (RFC 1123 has
/// whole seconds, so rounded up), is not received before that second: not by a receive at once,
/// and a long-polling receiver gets it only once the second has come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_scheduled_half_a_second_ahead_waits_for_its_whole_second() {
    use chrono::{Duration as Span, DurationRound, Utc};
    let b = memory();
    let ahead = Utc::now() + Span::milliseconds(500);
    let floor = ahead.duration_trunc(Span::seconds(1)).unwrap();
    let due = if floor == ahead { floor } else { floor + Span::seconds(1) };
    let bp = json!({ "ScheduledEnqueueTimeUtc": due.format("%a, %d %b %Y %H:%M:%S GMT").to_string() }).to_string();
    let r = call(&b, req("POST", "/q/messages").header("BrokerProperties", bp).body(Body::from("later")).unwrap()).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(b.peek(&q("q"), 0, 10).await.unwrap()[0].scheduled_enqueue_time, Some(due));

    let r = call(&b, req("POST", "/q/messages/head?timeout=0").body(Body::empty()).unwrap()).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "not before {due}");
    let r = call(&b, req("POST", "/q/messages/head?timeout=5").body(Body::empty()).unwrap()).await;
    let received = Utc::now();
    assert_eq!((r.status, r.body.as_slice()), (StatusCode::CREATED, b"later".as_slice()));
    assert!(received >= due, "received at {received}, scheduled for {due} (asked for {ahead})");
    assert_eq!(r.broker_properties()["ScheduledEnqueueTimeUtc"], json!(due.format("%a, %d %b %Y %H:%M:%S GMT").to_string()));
}

#[tokio::test]
async fn bad_broker_properties_are_400_and_change_nothing() {
    let b = memory();
    for bp in [
        "{not json",
        "[1]",
        r#"{"MessageId": 5}"#,
        r#"{"ScheduledEnqueueTimeUtc": "tomorrow"}"#,
        // Not the documented RFC 1123 `GMT` form: numeric zone (azure_messaging_servicebus 0.21), RFC 3339.
        r#"{"ScheduledEnqueueTimeUtc": "Mon, 23 Nov 2026 10:00:01 +0000"}"#,
        r#"{"ScheduledEnqueueTimeUtc": "2026-11-23T10:00:01Z"}"#,
    ] {
        let send = req("POST", "/q/messages").header("BrokerProperties", bp).body(Body::from("x")).unwrap();
        let r = call(&b, send).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bp}");
        assert!(String::from_utf8_lossy(&r.body).contains("<Error><Code>400</Code>"));
    }
    assert_eq!(b.count(&q("q")).await.unwrap(), Default::default());
}

#[tokio::test]
async fn sas_tokens_are_checked_before_anything_happens() {
    let b = memory();
    let now = chrono::Utc::now().timestamp();
    let cases = [
        (Some(sas_for("https://local.servicebus.windows.net/q/messages", KEY, now + 60)), StatusCode::CREATED),
        (Some(sas_for("https://local.servicebus.windows.net/q", KEY, now + 60)), StatusCode::CREATED),
        (Some(sas_for("sb://local.servicebus.windows.net/", KEY, now + 60)), StatusCode::CREATED),
        (Some(sas_for("https://local.servicebus.windows.net/other/messages", KEY, now + 60)), StatusCode::UNAUTHORIZED),
        (Some(sas_for("https://local.servicebus.windows.net/q/messages", KEY, now - 1)), StatusCode::UNAUTHORIZED),
        (Some(sas_for("https://local.servicebus.windows.net/q/messages", "wrong", now + 60)), StatusCode::UNAUTHORIZED),
        (Some("Bearer eyJ0eXAiOiJKV1QifQ.e30.sig".to_string()), StatusCode::UNAUTHORIZED),
        (None, StatusCode::UNAUTHORIZED),
    ];
    let mut stored = 0;
    for (auth, expected) in cases {
        let mut r = Request::builder().method("POST").uri("/q/messages");
        if let Some(a) = &auth {
            r = r.header("authorization", a);
        }
        let reply = call(&b, r.body(Body::from("x")).unwrap()).await;
        assert_eq!(reply.status, expected, "{auth:?}");
        if expected == StatusCode::CREATED {
            stored += 1;
        }
        assert_eq!(b.count(&q("q")).await.unwrap().active, stored);
    }
    // Receives too: a refused peek-lock locks nothing.
    let r = Request::builder().method("POST").uri("/q/messages/head?timeout=0").body(Body::empty()).unwrap();
    assert_eq!(call(&b, r).await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(b.count(&q("q")).await.unwrap().locked, 0);
}

#[tokio::test]
async fn settlement_by_sequence_number_or_message_id() {
    let b = memory();
    b.send("q", with_id("a", "msg-a")).await.unwrap();
    let r = call(&b, req("POST", "/q/messages/head?timeout=0").body(Body::empty()).unwrap()).await;
    let token = r.broker_properties()["LockToken"].as_str().unwrap().to_string();

    let wrong = call(&b, req("POST", &format!("/q/messages/msg-b/{token}")).body(Body::empty()).unwrap()).await;
    assert_eq!(wrong.status, StatusCode::NOT_FOUND, "the id must name the locked message");
    let renew = call(&b, req("POST", &format!("/q/messages/msg-a/{token}")).body(Body::empty()).unwrap()).await;
    assert_eq!(renew.status, StatusCode::OK);
    let unknown_entity = call(&b, req("DELETE", &format!("/nope/messages/1/{token}")).body(Body::empty()).unwrap()).await;
    assert_eq!(unknown_entity.status, StatusCode::GONE);
    let complete = call(&b, req("DELETE", &format!("/q/messages/1/{token}")).body(Body::empty()).unwrap()).await;
    assert_eq!(complete.status, StatusCode::OK);
    let again = call(&b, req("PUT", &format!("/q/messages/1/{token}")).body(Body::empty()).unwrap()).await;
    assert_eq!(again.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn an_expired_lock_cannot_be_settled() {
    let b = memory();
    b.send("q", msg("a")).await.unwrap();
    let r = call(&b, req("POST", "/q/messages/head?timeout=0").body(Body::empty()).unwrap()).await;
    let token = r.broker_properties()["LockToken"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let complete = call(&b, req("DELETE", &format!("/q/messages/1/{token}")).body(Body::empty()).unwrap()).await;
    assert_eq!(complete.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn wrong_shapes_get_clear_statuses() {
    let b = memory();
    let cases = [
        ("POST", "/q/messages/head?timeout=0", StatusCode::NO_CONTENT),
        ("DELETE", "/q/messages/head?timeout=0", StatusCode::NO_CONTENT),
        ("DELETE", "/Q/$deadletterqueue/messages/head?timeout=0", StatusCode::NO_CONTENT),
        ("POST", "/q/messages/head?timeout=soon", StatusCode::BAD_REQUEST),
        ("GET", "/q/messages", StatusCode::METHOD_NOT_ALLOWED),
        ("POST", "/events/messages/head?timeout=0", StatusCode::BAD_REQUEST),
        ("POST", "/events/subscriptions/all/messages", StatusCode::BAD_REQUEST),
        ("POST", "/q/$DeadLetterQueue/messages", StatusCode::BAD_REQUEST),
        ("POST", "/nope/messages", StatusCode::GONE),
        ("POST", "/q/somewhere", StatusCode::NOT_FOUND),
    ];
    for (method, uri, expected) in cases {
        let r = call(&b, req(method, uri).body(Body::from("x")).unwrap()).await;
        assert_eq!(r.status, expected, "{method} {uri}: {}", String::from_utf8_lossy(&r.body));
    }
    let big = req("POST", "/q/messages").body(Body::from(vec![b'x'; 300 * 1024])).unwrap();
    assert_eq!(call(&b, big).await.status, StatusCode::PAYLOAD_TOO_LARGE);
    let health = Request::builder().uri("/$health").body(Body::empty()).unwrap();
    let r = call(&b, health).await;
    assert_eq!((r.status, r.body.as_slice()), (StatusCode::OK, br#"{"status":"healthy"}"#.as_slice()));
}

#[tokio::test]
async fn non_ascii_values_travel_escaped_both_ways() {
    let b = memory();
    let bp = r#"{"Label":"caf\u00e9"}"#;
    let send = req("POST", "/q/messages")
        .header("BrokerProperties", bp)
        .header("note", r#""na\u00efve \"quoted\"""#)
        .body(Body::from("x"))
        .unwrap();
    assert_eq!(call(&b, send).await.status, StatusCode::CREATED);
    let stored = &b.peek(&q("q"), 0, 1).await.unwrap()[0];
    assert_eq!(stored.label.as_deref(), Some("café"));
    assert_eq!(stored.properties.get("note"), Some(&json!("naïve \"quoted\"")));
    let r = call(&b, req("DELETE", "/q/messages/head?timeout=0").body(Body::empty()).unwrap()).await;
    assert_eq!(r.header("note"), r#""na\u00efve \"quoted\"""#);
    assert_eq!(r.broker_properties()["Label"], json!("café"));
    assert!(r.header("brokerproperties").is_ascii());
}
