//! Dead-letter operations (`deploychain_functions::ops`) through the Service Bus REST data plane
//! with the unmodified client, against the embedded bus with the project's topology: a message
//! dead-lettered on a subscription and one parked by the handler are listed with their reason,
//! run and deliveries; a dry run changes nothing; a replay keeps body, CloudEvent id, Label,
//! SessionId and CloudEvents properties under a new MessageId and completes the copy only after
//! the send; a failed send leaves it in place; purges and replays are audited.
#![allow(clippy::unwrap_used)]

use async_trait::async_trait;
use deploychain_bus::{Broker, EntityPath, SasKeys, Topology};
use deploychain_events::{DeployEvent, EventData};
use deploychain_functions::adapters::servicebus::{ConnectionString, ServiceBusPublisher};
use deploychain_functions::adapters::{Outbound, Parked, Publish};
use deploychain_functions::ops::{DeadLetters, Filter};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

const KEY: &str = "ops-test-key-value";

fn repo() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize().unwrap()
}

/// The real transport, except that sends to the topic fail while `fail_sends` is set.
#[derive(Debug)]
struct Flaky {
    inner: Arc<dyn azure_core::HttpClient>,
    fail_sends: Arc<AtomicBool>,
}

#[async_trait]
impl azure_core::HttpClient for Flaky {
    async fn execute_request(&self, r: &azure_core::Request) -> azure_core::Result<azure_core::Response> {
        if self.fail_sends.load(Ordering::SeqCst)
            && *r.method() == azure_core::Method::Post
            && r.url().path().ends_with("deploychain-events/messages")
        {
            return Err(azure_core::Error::message(azure_core::error::ErrorKind::Io, "the namespace is unreachable"));
        }
        self.inner.execute_request(r).await
    }
}

struct Bus {
    broker: Broker,
    conn: ConnectionString,
    fail_sends: Arc<AtomicBool>,
}

impl Bus {
    async fn start() -> Bus {
        let topology = Topology::load(repo().join("infra/servicebus.json")).unwrap();
        let broker = Broker::open_in_memory(topology).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(deploychain_bus::serve_rest(broker.clone(), SasKeys::single("RootManageSharedAccessKey", KEY), listener));
        let conn = ConnectionString::parse(&format!(
            "Endpoint=sb://{addr};SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey={KEY};UseDevelopmentEmulator=true"
        ))
        .unwrap();
        Bus { broker, conn, fail_sends: Arc::default() }
    }

    fn ops(&self) -> DeadLetters {
        let http: Arc<dyn azure_core::HttpClient> =
            Arc::new(Flaky { inner: azure_core::new_http_client(), fail_sends: self.fail_sends.clone() });
        let subs =
            ["on-push", "on-build-completed", "on-image-due", "on-image-ready", "on-deployment-due", "on-approval", "on-approval-due"]
                .map(str::to_string)
                .to_vec();
        DeadLetters::new(&self.conn, "deploychain-events", subs, "deploychain-parked", http)
    }

    fn publisher(&self) -> ServiceBusPublisher {
        ServiceBusPublisher::new(&self.conn, "deploychain-events", "deploychain-parked", azure_core::new_http_client()).unwrap()
    }

    async fn dlq_count(&self, sub: &str) -> u64 {
        self.broker.count(&EntityPath::subscription("deploychain-events", sub)).await.unwrap().dead_lettered
    }
}

fn sample(name: &str) -> DeployEvent {
    DeployEvent::from_json_bytes(&std::fs::read(repo().join("events/samples").join(name)).unwrap()).unwrap()
}

/// `push` published as the handler does, then dead-lettered on `on-push` as after
/// MaxDeliveryCount failed deliveries.
async fn dead_lettered_push(bus: &Bus) -> (DeployEvent, Outbound) {
    let ev = sample("push.json");
    let out = Outbound::from_event(&ev, Some("web".into()));
    bus.publisher().publish(&out).await.unwrap();
    let sub = EntityPath::subscription("deploychain-events", "on-push");
    let m = bus.broker.peek_lock(&sub, Duration::from_secs(1)).await.unwrap().unwrap();
    bus.broker
        .dead_letter(&sub, m.lock_token.unwrap(), "MaxDeliveryCountExceeded", "Message could not be consumed after 10 delivery attempts.")
        .await
        .unwrap();
    (ev, out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_without_changing_them_and_a_dry_run_changes_nothing() {
    let bus = Bus::start().await;
    let (ev, out) = dead_lettered_push(&bus).await;
    let parked = Parked {
        message_id: "poison-1".into(),
        function: "on_push".into(),
        reason: "MalformedEvent".into(),
        description: "missing field `specversion`".into(),
        delivery_count: 1,
        body: "{\"not\":\"an event\"}".into(),
        original_subject: Some("dev.deploychain.push.v1".into()),
    };
    bus.publisher().park(&parked).await.unwrap();

    let ops = bus.ops();
    for _ in 0..2 {
        let all = ops.list(&Filter::default()).await.unwrap();
        assert_eq!(all.len(), 2, "{all:#?}");
        let d = &all[0];
        assert_eq!(d.entity, "deploychain-events/subscriptions/on-push/$DeadLetterQueue");
        assert_eq!(d.message_id, out.message_id);
        assert_eq!(d.event_type.as_deref(), Some("dev.deploychain.push.v1"));
        assert_eq!(d.run.as_deref(), Some(ev.run_id.as_str()));
        assert_eq!(d.reason.as_deref(), Some("MaxDeliveryCountExceeded"));
        assert_eq!(d.delivery_count, 10, "as when it was set aside, whatever our reads add");
        assert_eq!(d.session_id.as_deref(), Some("web"));
        assert_eq!(d.body, out.body);
        let p = &all[1];
        assert_eq!((p.entity.as_str(), p.reason.as_deref(), p.delivery_count), ("deploychain-parked", Some("MalformedEvent"), 1));
        assert_eq!(p.event_type.as_deref(), Some("dev.deploychain.push.v1"));
    }
    // Filters.
    let f = Filter { reason: Some("MalformedEvent".into()), ..Filter::default() };
    assert_eq!(ops.list(&f).await.unwrap().len(), 1);
    let f = Filter { run: Some(ev.run_id.clone()), ..Filter::default() };
    assert_eq!(ops.list(&f).await.unwrap().len(), 1);
    let f = Filter { older_than: Some(Duration::from_secs(3600)), ..Filter::default() };
    assert!(ops.list(&f).await.unwrap().is_empty(), "nothing is an hour old");

    // A dry run says what it would do and does nothing.
    let would = ops.replay(&Filter::default(), true, 0.0, "test").await.unwrap();
    assert_eq!(would.len(), 2);
    assert!(would.iter().all(|h| h.dry_run && h.new_message_id.is_some()));
    let purge = ops.purge(&Filter::default(), true, "test").await.unwrap();
    assert_eq!(purge.len(), 2);
    assert_eq!(bus.dlq_count("on-push").await, 1);
    assert_eq!(bus.broker.count(&"deploychain-parked".parse().unwrap()).await.unwrap().active, 1);
    let audit = bus.broker.count(&EntityPath::subscription("deploychain-events", "audit")).await.unwrap().active;
    assert_eq!(audit, 1, "only the original push: no audit event for a dry run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_resends_the_original_under_a_new_message_id_and_a_failed_send_loses_nothing() {
    let bus = Bus::start().await;
    let (ev, out) = dead_lettered_push(&bus).await;
    let ops = bus.ops();

    // The namespace is unreachable: the replay fails and the message stays in the DLQ.
    bus.fail_sends.store(true, Ordering::SeqCst);
    let e = ops.replay(&Filter::default(), false, 0.0, "ops@contoso.com").await.unwrap_err();
    assert!(e.is_transient(), "{e}");
    assert_eq!(bus.dlq_count("on-push").await, 1, "still dead-lettered");
    bus.fail_sends.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(50)).await;

    // Replayed: the same body and CloudEvent id, a new MessageId the broker does not drop.
    let done =
        ops.replay(&Filter { ids: vec![out.message_id.clone()], ..Filter::default() }, false, 10.0, "ops@contoso.com").await.unwrap();
    assert_eq!(done.len(), 1);
    let new_id = done[0].new_message_id.clone().unwrap();
    assert!(new_id.starts_with(&format!("{}.replay-", out.message_id)));
    assert_eq!(bus.dlq_count("on-push").await, 0, "completed after the send");
    let sub = EntityPath::subscription("deploychain-events", "on-push");
    let again = bus.broker.peek_lock(&sub, Duration::from_secs(1)).await.unwrap().expect("the step's subscription has it again");
    assert_eq!(again.message_id, new_id);
    assert_eq!(again.body, out.body.as_bytes(), "byte for byte");
    assert_eq!(again.label.as_deref(), Some("dev.deploychain.push.v1"));
    assert_eq!(again.session_id.as_deref(), Some("web"));
    assert_eq!(again.properties.get("cloudevents_id").and_then(|v| v.as_str()), Some(ev.id.as_str()), "the CloudEvent id is kept");
    assert_eq!(DeployEvent::from_json_bytes(&again.body).unwrap(), ev);

    // Audited: who, what, when.
    let audit = EntityPath::subscription("deploychain-events", "audit");
    let msgs = bus.broker.peek(&audit, 0, 100).await.unwrap();
    let handled: Vec<DeployEvent> = msgs
        .iter()
        .filter(|m| m.label.as_deref() == Some("dev.deploychain.deadletter.handled.v1"))
        .map(|m| DeployEvent::from_json_bytes(&m.body).unwrap())
        .collect();
    assert_eq!(handled.len(), 1);
    let EventData::DeadLetterHandled(h) = &handled[0].data else { panic!("{:?}", handled[0]) };
    assert_eq!(
        (h.by.as_str(), h.message_id.as_str(), h.new_message_id.as_deref()),
        ("ops@contoso.com", out.message_id.as_str(), Some(new_id.as_str()))
    );
    assert_eq!(handled[0].run_id, ev.run_id);

    // A purge removes what is left and is audited too.
    let (_, out2) = {
        let mut ev2 = sample("push.json");
        ev2.id = format!("{}.push-2", ev2.run_id);
        let o = Outbound::from_event(&ev2, Some("web".into()));
        bus.publisher().publish(&o).await.unwrap();
        let m = bus.broker.peek_lock(&sub, Duration::from_secs(1)).await.unwrap().unwrap();
        // (the replayed copy is still locked above; this is the second message)
        bus.broker.dead_letter(&sub, m.lock_token.unwrap(), "TTLExpiredException", "expired").await.unwrap();
        (ev2, o)
    };
    let purged =
        ops.purge(&Filter { reason: Some("TTLExpiredException".into()), ..Filter::default() }, false, "ops@contoso.com").await.unwrap();
    assert_eq!(purged.len(), 1);
    assert_eq!(purged[0].message_id, out2.message_id);
    assert_eq!(bus.dlq_count("on-push").await, 0);
    let msgs = bus.broker.peek(&audit, 0, 100).await.unwrap();
    assert_eq!(msgs.iter().filter(|m| m.label.as_deref() == Some("dev.deploychain.deadletter.handled.v1")).count(), 2);
}

/// More letters than a page: a replay goes page by page to the end, and a filtered one reaches
/// past the letters it leaves (which stay where they were). A dry run over them all changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_goes_past_a_page_and_past_the_letters_its_filter_leaves() {
    let bus = Bus::start().await;
    let sub = EntityPath::subscription("deploychain-events", "on-push");
    let ev = sample("push.json");
    // More letters nobody asked for than a page (500), then some of the run the filter names.
    let set_aside = |run: &str, n: usize| {
        let mut msgs = Vec::new();
        for i in 0..n {
            let mut e = ev.clone();
            e.run_id = run.to_string();
            e.id = format!("{run}.push.{i}");
            let out = Outbound::from_event(&e, Some("web".into()));
            msgs.push(deploychain_bus::NewMessage {
                body: out.body.into_bytes(),
                message_id: Some(out.message_id),
                session_id: out.session_id,
                label: Some(out.subject),
                content_type: Some(out.content_type),
                ..Default::default()
            });
        }
        msgs
    };
    let others = set_aside("web-000000000001", 520);
    let wanted = set_aside("web-000000000002", 120);
    bus.broker.send_batch("deploychain-events", others).await.unwrap();
    bus.broker.send_batch("deploychain-events", wanted).await.unwrap();
    while let Some(m) = bus.broker.peek_lock(&sub, Duration::ZERO).await.unwrap() {
        bus.broker.dead_letter(&sub, m.lock_token.unwrap(), "Test", "set aside").await.unwrap();
    }
    assert_eq!(bus.dlq_count("on-push").await, 640);

    let dry = bus.ops().replay(&Filter::default(), true, 0.0, "test").await.unwrap();
    assert_eq!(dry.len(), 640, "a dry run sees every letter once");
    assert_eq!(bus.dlq_count("on-push").await, 640, "and changes nothing");

    let only = Filter { run: Some("web-000000000002".into()), ..Filter::default() };
    let done = bus.ops().replay(&only, false, 0.0, "test").await.unwrap();
    assert_eq!(done.len(), 120, "every letter of the run, past the 520 before them");
    assert!(done.iter().all(|h| h.message_id.starts_with("web-000000000002")));
    // The locks the replay held on the others are released: they are all there to take again.
    let rest = bus.ops().replay(&Filter::default(), false, 0.0, "test").await.unwrap();
    assert_eq!(rest.len(), 520);
    assert_eq!(bus.dlq_count("on-push").await, 0);
}
