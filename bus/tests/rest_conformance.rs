//! Conformance: the unmodified `azure_messaging_servicebus` 0.21 clients (the ones the deployed
//! handler publishes with) against the bus's REST router on 127.0.0.1:<random port>, through
//! reqwest and an `azure_core::HttpClient` that only rewrites scheme, host and port — the same
//! seam the deploychain publisher uses for `UseDevelopmentEmulator=true`. The SAS token therefore
//! still signs `https://local.servicebus.windows.net/...`, as it would in Azure.
#![allow(clippy::unwrap_used)]

mod common;

use async_trait::async_trait;
use azure_core::headers::Headers;
use azure_core::{HttpClient, Url};
use azure_messaging_servicebus::prelude::{QueueClient, TopicClient};
use azure_messaging_servicebus::service_bus::{PeekLockResponse, SendMessageOptions, SettableBrokerProperties};
use common::*;
use deploychain_bus::{Broker, SasKeys};
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A key with characters that need URL-encoding and a trailing `=`, as in the publisher's wire test.
const KEY: &str = "dGVzdC1rZXk+PmZvcj8/c2VydmljZWJ1c/v/IQ==";
const KEY_NAME: &str = "RootManageSharedAccessKey";
const NS: &str = "local";

#[derive(Debug)]
struct RewriteClient {
    base: Url,
    inner: Arc<dyn HttpClient>,
}

#[async_trait]
impl HttpClient for RewriteClient {
    async fn execute_request(&self, request: &azure_core::Request) -> azure_core::Result<azure_core::Response> {
        let mut req = request.clone();
        let url = req.url_mut();
        url.set_scheme(self.base.scheme()).unwrap();
        url.set_host(self.base.host_str()).unwrap();
        url.set_port(self.base.port()).unwrap();
        self.inner.execute_request(&req).await
    }
}

struct Bus {
    broker: Broker,
    http: Arc<dyn HttpClient>,
    port: u16,
}

impl Bus {
    async fn start() -> Bus {
        Bus::serve(memory()).await
    }

    /// Serve `broker` over REST on a new port.
    async fn serve(broker: Broker) -> Bus {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(deploychain_bus::serve_rest(broker.clone(), SasKeys::single(KEY_NAME, KEY), listener));
        let base = Url::parse(&format!("http://127.0.0.1:{port}/")).unwrap();
        Bus { broker, http: Arc::new(RewriteClient { base, inner: azure_core::new_http_client() }), port }
    }

    fn queue(&self, name: &str) -> QueueClient {
        QueueClient::new(self.http.clone(), NS, name, KEY_NAME, KEY).unwrap()
    }

    fn queue_with_key(&self, name: &str, key_name: &str, key: &str) -> QueueClient {
        QueueClient::new(self.http.clone(), NS, name, key_name, key.to_string()).unwrap()
    }

    fn topic(&self, name: &str) -> TopicClient {
        TopicClient::new(self.http.clone(), NS, name, KEY_NAME, KEY).unwrap()
    }
}

/// All response headers, for `PeekLockResponse::custom_properties`.
struct AllHeaders(BTreeMap<String, String>);

impl From<Headers> for AllHeaders {
    fn from(h: Headers) -> Self {
        AllHeaders(h.iter().map(|(k, v)| (k.as_str().to_string(), v.as_str().to_string())).collect())
    }
}

fn headers(r: &PeekLockResponse) -> BTreeMap<String, String> {
    r.custom_properties::<AllHeaders>().unwrap().0
}

fn status(r: &PeekLockResponse) -> u16 {
    u16::from(*r.status())
}

fn http_status(e: &azure_core::Error) -> Option<u16> {
    match e.kind() {
        azure_core::error::ErrorKind::HttpResponse { status, .. } => Some(u16::from(*status)),
        _ => None,
    }
}

fn props(label: Option<&str>, id: Option<&str>) -> SettableBrokerProperties {
    SettableBrokerProperties { label: label.map(Into::into), message_id: id.map(Into::into), ..Default::default() }
}

fn opts(bp: SettableBrokerProperties) -> Option<SendMessageOptions> {
    Some(SendMessageOptions { broker_properties: Some(bp), ..Default::default() })
}

const SHORT: Option<Duration> = Some(Duration::from_secs(0));

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sent_message_comes_back_with_its_id_label_properties_and_lock() {
    let bus = Bus::start().await;
    let events = bus.topic("events");
    let custom = HashMap::from([
        ("priority".to_string(), "\"High\"".to_string()),
        ("attempt".to_string(), "3".to_string()),
        ("ok".to_string(), "true".to_string()),
        ("ratio".to_string(), "1.5".to_string()),
        ("cloudevents_source".to_string(), "\"/caf\\u00e9\"".to_string()),
        ("traceparent".to_string(), "\"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\"".to_string()),
    ]);
    let options = SendMessageOptions {
        content_type: Some("application/cloudevents+json; charset=utf-8".into()),
        broker_properties: Some(SettableBrokerProperties {
            message_id: Some("run-1.push".into()),
            label: Some("push".into()),
            correlation_id: Some("corr".into()),
            to: Some("someone".into()),
            reply_to: Some("replies".into()),
            time_to_live: Some(Duration::from_secs(90)),
            ..Default::default()
        }),
        custom_properties: Some(custom),
    };
    events.topic_sender().send_message(r#"{"specversion":"1.0"}"#, Some(options)).await.unwrap();

    // Stored with typed application properties (names arrive lower-cased over HTTP).
    let stored = &bus.broker.peek(&sub("events", "push"), 0, 10).await.unwrap()[0];
    assert_eq!(stored.properties.get("priority"), Some(&json!("High")));
    assert_eq!(stored.properties.get("attempt"), Some(&json!(3)));
    assert_eq!(stored.properties.get("ok"), Some(&json!(true)));
    assert_eq!(stored.properties.get("ratio"), Some(&json!(1.5)));
    assert_eq!(stored.properties.get("cloudevents_source"), Some(&json!("/café")));
    assert!(stored.properties.contains_key("traceparent"), "traceparent is an application property");
    assert!(!stored.properties.contains_key("authorization") && !stored.properties.contains_key("content-type"));
    assert_eq!(stored.content_type.as_deref(), Some("application/cloudevents+json; charset=utf-8"));

    let receiver = events.subscription_receiver("push");
    let before = time::OffsetDateTime::now_utc();
    let r = receiver.peek_lock_message2(Some(Duration::from_secs(5))).await.unwrap();
    assert_eq!(status(&r), 201);
    assert_eq!(r.body(), r#"{"specversion":"1.0"}"#);
    let bp = r.broker_properties().expect("BrokerProperties parse with the crate's strict struct");
    assert_eq!((bp.message_id.as_str(), bp.delivery_count, bp.sequence_number, bp.state.as_str()), ("run-1.push", 1, 1, "Active"));
    assert_eq!(bp.time_to_live, 90.0);
    assert_eq!(bp.enqueued_sequence_number, Some(1));
    assert!(uuid::Uuid::parse_str(&bp.lock_token).is_ok());
    assert!(bp.locked_until_utc > before, "locked until {}", bp.locked_until_utc);

    let h = headers(&r);
    assert_eq!(h["content-type"], "application/cloudevents+json; charset=utf-8");
    assert_eq!(h["priority"], "\"High\"", "strings come back quoted");
    assert_eq!((h["attempt"].as_str(), h["ok"].as_str(), h["ratio"].as_str()), ("3", "true", "1.5"), "numbers and bools bare");
    assert_eq!(h["cloudevents_source"], "\"/caf\\u00e9\"");
    let raw: serde_json::Value = serde_json::from_str(&h["brokerproperties"]).unwrap();
    assert_eq!((raw["Label"].as_str(), raw["CorrelationId"].as_str()), (Some("push"), Some("corr")));
    assert_eq!((raw["To"].as_str(), raw["ReplyTo"].as_str()), (Some("someone"), Some("replies")));
    let location = &h["location"];
    assert_eq!(location, &format!("http://127.0.0.1:{}/events/subscriptions/push/messages/1/{}", bus.port, bp.lock_token));

    r.renew_message_lock().await.unwrap();
    r.delete_message().await.unwrap();
    assert_eq!(bus.broker.count(&sub("events", "push")).await.unwrap(), Default::default());
    let again = r.delete_message().await.unwrap_err();
    assert_eq!(http_status(&again), Some(404), "a settled lock is gone: {again}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_message_id_is_delivered_once() {
    let bus = Bus::start().await;
    let sender = bus.topic("events").topic_sender();
    sender.send_message("first", opts(props(Some("push"), Some("evt-1")))).await.unwrap();
    sender.send_message("second", opts(props(Some("push"), Some("evt-1")))).await.unwrap();
    let receiver = bus.topic("events").subscription_receiver("push");
    assert_eq!(receiver.receive_and_delete_message().await.unwrap(), "first");
    let r = receiver.peek_lock_message2(SHORT).await.unwrap();
    assert_eq!(status(&r), 204, "the duplicate was dropped");
    assert!(r.broker_properties().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unlocked_message_is_redelivered_with_delivery_count_2() {
    let bus = Bus::start().await;
    let q = bus.queue("q");
    q.send_message("hello", None).await.unwrap();
    let first = q.peek_lock_message2(SHORT).await.unwrap();
    assert_eq!(first.broker_properties().unwrap().delivery_count, 1);
    first.unlock_message().await.unwrap();
    let second = q.peek_lock_message2(SHORT).await.unwrap();
    let bp = second.broker_properties().unwrap();
    assert_eq!((bp.delivery_count, second.body().as_str()), (2, "hello"));
    assert_eq!(bp.message_id.len(), 32, "a generated MessageId in GUID N format");
    assert_eq!(http_status(&first.delete_message().await.unwrap_err()), Some(404), "the first lock is dead");
    second.delete_message().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_max_delivery_count_the_message_is_read_from_the_dead_letter_queue() {
    let bus = Bus::start().await;
    let q = bus.queue("q"); // MaxDeliveryCount 3
    q.send_message("poison", opts(props(None, Some("p-1")))).await.unwrap();
    for attempt in 1..=3 {
        let r = q.peek_lock_message2(SHORT).await.unwrap();
        assert_eq!(r.broker_properties().unwrap().delivery_count, attempt);
        r.unlock_message().await.unwrap();
    }
    assert_eq!(status(&q.peek_lock_message2(SHORT).await.unwrap()), 204);

    let dlq = bus.queue("q/$DeadLetterQueue");
    let d = dlq.peek_lock_message2(SHORT).await.unwrap();
    assert_eq!(status(&d), 201);
    assert_eq!((d.body().as_str(), d.broker_properties().unwrap().message_id.as_str()), ("poison", "p-1"));
    let h = headers(&d);
    assert_eq!(h["deadletterreason"], "\"MaxDeliveryCountExceeded\"");
    assert_eq!(h["deadlettererrordescription"], "\"Message could not be consumed after 3 delivery attempts.\"");
    d.delete_message().await.unwrap();

    // A subscription's DLQ through the subscription-name trick (push has MaxDeliveryCount 2).
    let events = bus.topic("events");
    events.topic_sender().send_message("p", opts(props(Some("push"), None))).await.unwrap();
    let push = events.subscription_receiver("push");
    for _ in 0..2 {
        push.peek_lock_message2(SHORT).await.unwrap().unlock_message().await.unwrap();
    }
    let dead = events.subscription_receiver("push/$DeadLetterQueue").peek_lock_message2(SHORT).await.unwrap();
    assert_eq!(status(&dead), 201);
    assert_eq!(headers(&dead)["deadletterreason"], "\"MaxDeliveryCountExceeded\"");
    assert!(headers(&dead)["location"].contains("/events/subscriptions/push/$DeadLetterQueue/messages/"));
    dead.delete_message().await.unwrap();
    assert_eq!(bus.broker.count(&sub("events", "push")).await.unwrap(), Default::default());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_key_is_refused_with_401_and_nothing_is_enqueued() {
    let bus = Bus::start().await;
    bus.queue("q").send_message("keep", None).await.unwrap();
    for client in [bus.queue_with_key("q", KEY_NAME, "c29tZS1vdGhlci1rZXk="), bus.queue_with_key("q", "SomeoneElse", KEY)] {
        let e = client.send_message("intruder", None).await.unwrap_err();
        assert_eq!(http_status(&e), Some(401), "{e}");
        let r = client.peek_lock_message2(SHORT).await.unwrap();
        assert_eq!(status(&r), 401);
    }
    let c = bus.broker.count(&q("q")).await.unwrap();
    assert_eq!((c.active, c.locked), (1, 0), "nothing enqueued, nothing locked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_entity_is_410_and_an_empty_one_204() {
    let bus = Bus::start().await;
    let e = bus.queue("nope").send_message("x", None).await.unwrap_err();
    assert_eq!(http_status(&e), Some(410), "{e}");
    assert_eq!(status(&bus.queue("nope").peek_lock_message2(SHORT).await.unwrap()), 410);
    assert_eq!(status(&bus.topic("events").subscription_receiver("nope").peek_lock_message2(SHORT).await.unwrap()), 410);

    let start = Instant::now();
    let r = bus.queue("q").peek_lock_message2(Some(Duration::from_secs(1))).await.unwrap();
    assert_eq!(status(&r), 204);
    assert!(r.broker_properties().is_none() && r.body().is_empty());
    assert!(start.elapsed() >= Duration::from_millis(900), "?timeout=1 long-polled for a second");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receive_and_delete_returns_the_body() {
    let bus = Bus::start().await;
    bus.queue("q").send_message("once", None).await.unwrap();
    assert_eq!(bus.queue("q").receive_and_delete_message().await.unwrap(), "once");
    bus.topic("events").topic_sender().send_message("sub", opts(props(Some("push"), None))).await.unwrap();
    assert_eq!(bus.topic("events").subscription_receiver("all").receive_and_delete_message().await.unwrap(), "sub");
    assert_eq!(bus.broker.count(&q("q")).await.unwrap(), Default::default());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_returns_as_soon_as_a_message_arrives() {
    let bus = Bus::start().await;
    let q = bus.queue("q");
    let sender = bus.queue("q");
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        sender.send_message("late", None).await.unwrap();
    });
    let start = Instant::now();
    let r = q.peek_lock_message2(Some(Duration::from_secs(10))).await.unwrap();
    assert_eq!((status(&r), r.body().as_str()), (201, "late"));
    assert!(start.elapsed() < Duration::from_secs(2), "{:?}", start.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_and_session_messages_sent_over_rest() {
    let bus = Bus::start().await;
    let q = bus.queue("q");
    let at = time::OffsetDateTime::now_utc() + Duration::from_secs(2);
    // The crate's own field writes `+0000` (time's RFC 2822), which the REST reference does not
    // document: refused, and nothing is stored.
    let bp = SettableBrokerProperties { scheduled_enqueue_time_utc: Some(at), ..Default::default() };
    assert_eq!(http_status(&q.send_message("later", opts(bp)).await.unwrap_err()), Some(400));
    assert_eq!(bus.broker.count(&q_path()).await.unwrap(), Default::default());
    // The documented RFC 1123 form, written into the BrokerProperties header as the publisher does.
    let gmt = chrono::DateTime::from_timestamp(at.unix_timestamp(), 0).unwrap().format("%a, %d %b %Y %H:%M:%S GMT").to_string();
    let header = HashMap::from([("BrokerProperties".to_string(), json!({ "ScheduledEnqueueTimeUtc": gmt }).to_string())]);
    q.send_message("later", Some(SendMessageOptions { custom_properties: Some(header), ..Default::default() })).await.unwrap();
    assert_eq!(status(&q.peek_lock_message2(SHORT).await.unwrap()), 204, "not yet");
    assert_eq!(bus.broker.count(&q_path()).await.unwrap().scheduled, 1);

    // A session message over REST; REST cannot receive it (no session receive), the Rust API can.
    let sessions = bus.queue("sessions");
    let bp = SettableBrokerProperties {
        session_id: Some("web/staging".into()),
        partition_key: Some("web/staging".into()),
        ..Default::default()
    };
    sessions.send_message("s", opts(bp)).await.unwrap();
    assert_eq!(http_status(&sessions.send_message("no session", None).await.unwrap_err()), Some(400));
    let r = sessions.peek_lock_message2(SHORT).await.unwrap();
    assert_eq!(status(&r), 400);
    assert!(r.body().contains("session"), "{}", r.body());
    let s = bus.broker.accept_session(&q_path_sessions(), NOW).await.unwrap().unwrap();
    assert_eq!(s.session_id, "web/staging");

    let r = q.peek_lock_message2(Some(Duration::from_secs(4))).await.unwrap();
    assert_eq!((status(&r), r.body().as_str()), (201, "later"));
    assert!(time::OffsetDateTime::now_utc() >= at - Duration::from_secs(1), "RFC 1123 has whole seconds");
}

fn q_path() -> deploychain_bus::EntityPath {
    q("q")
}

fn q_path_sessions() -> deploychain_bus::EntityPath {
    q("sessions")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_256_kib_is_refused_with_413() {
    let bus = Bus::start().await;
    let big = "x".repeat(256 * 1024 + 1);
    let e = bus.queue("q").send_message(&big, None).await.unwrap_err();
    assert_eq!(http_status(&e), Some(413), "{e}");
    bus.queue("q").send_message(&big[1..], None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_endpoint_answers_without_a_token() {
    let bus = Bus::start().await;
    let url = Url::parse(&format!("http://127.0.0.1:{}/$health", bus.port)).unwrap();
    let r =
        azure_core::new_http_client().execute_request_check_status(&azure_core::Request::new(url, azure_core::Method::Get)).await.unwrap();
    let body: serde_json::Value = serde_json::from_slice(r.body()).unwrap();
    assert_eq!(body, json!({"status": "healthy"}));
}

/// A queue with a one-second lock, in a bus kept in a file.
fn short_lock_topology() -> deploychain_bus::Topology {
    let mut t = deploychain_bus::Topology::new(NS);
    t.add_queue(deploychain_bus::Queue {
        lock_duration: Duration::from_secs(1),
        max_delivery_count: 5,
        requires_duplicate_detection: true,
        ..deploychain_bus::Queue::new("q")
    })
    .unwrap();
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_that_expires_over_rest_means_redelivery_and_the_old_lock_is_dead() {
    let bus = Bus::serve(Broker::open_in_memory(short_lock_topology()).unwrap()).await;
    let q = bus.queue("q");
    q.send_message("held too long", opts(props(None, Some("m-expire")))).await.unwrap();
    let first = q.peek_lock_message2(SHORT).await.unwrap();
    assert_eq!(first.broker_properties().unwrap().delivery_count, 1);
    // Nobody completes or renews it: after the lock duration it is another receiver's.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let second = q.peek_lock_message2(SHORT).await.unwrap();
    let bp = second.broker_properties().unwrap();
    assert_eq!((bp.message_id.as_str(), bp.delivery_count), ("m-expire", 2));
    assert_eq!(http_status(&first.delete_message().await.unwrap_err()), Some(404), "the expired lock cannot complete");
    // A renewed lock keeps it.
    second.renew_message_lock().await.unwrap();
    second.delete_message().await.unwrap();
    assert_eq!(status(&q.peek_lock_message2(SHORT).await.unwrap()), 204);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_sent_over_rest_survive_a_restart_of_the_bus() {
    let dir = temp_dir("rest-restart");
    let path = dir.join("bus.sqlite");
    {
        let bus = Bus::serve(Broker::open(&path, short_lock_topology()).unwrap()).await;
        let q = bus.queue("q");
        q.send_message("kept", opts(props(Some("dev.deploychain.push.v1"), Some("m-kept")))).await.unwrap();
        q.send_message("locked at the stop", opts(props(None, Some("m-locked")))).await.unwrap();
        let locked = q.peek_lock_message2(SHORT).await.unwrap();
        assert_eq!(locked.broker_properties().unwrap().message_id, "m-kept");
        // The stack stops with this lock held (the server task ends with the runtime below).
    }
    // A new bus on the same file, on a new port: the same client code finds everything.
    let bus = Bus::serve(Broker::open(&path, short_lock_topology()).unwrap()).await;
    let q = bus.queue("q");
    let next = q.peek_lock_message2(SHORT).await.unwrap();
    assert_eq!(next.broker_properties().unwrap().message_id, "m-locked");
    next.delete_message().await.unwrap();
    // The one locked before the restart comes back once its lock expires, counted.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let again = q.peek_lock_message2(SHORT).await.unwrap();
    let bp = again.broker_properties().unwrap();
    assert_eq!((bp.message_id.as_str(), bp.delivery_count), ("m-kept", 2));
    let raw = headers(&again).get("brokerproperties").cloned().unwrap_or_default();
    assert!(raw.contains("\"Label\":\"dev.deploychain.push.v1\""), "the label survived too: {raw}");
    again.delete_message().await.unwrap();
    // And a duplicate of a message accepted before the restart is still dropped.
    q.send_message("kept", opts(props(None, Some("m-kept")))).await.unwrap();
    let dup = q.peek_lock_message2(SHORT).await.unwrap();
    assert_eq!(
        status(&dup),
        204,
        "duplicate detection survived the restart: {:?} {}",
        dup.broker_properties().map(|b| (b.message_id, b.delivery_count)),
        dup.body()
    );
}
