//! A scheduled publish end to end: the handler's publisher (the unmodified
//! `azure_messaging_servicebus` client over REST) to the embedded bus with the project's topology.
//! A look scheduled half a second ahead must not come back at once — rounded down to the whole
//! second of the REST date form, it did, and a bake was looked at ~170 times a second.
#![allow(clippy::unwrap_used)]

use chrono::{DurationRound, Utc};
use deploychain_bus::{Broker, EntityPath, SasKeys, Topology};
use deploychain_events::DeployEvent;
use deploychain_functions::adapters::servicebus::{ConnectionString, ServiceBusPublisher};
use deploychain_functions::adapters::{Outbound, Publish};
use std::path::Path;
use std::time::Duration;

const KEY: &str = "scheduled-test-key-value";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_scheduled_half_a_second_ahead_arrives_no_sooner_than_its_rounded_up_second() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let broker = Broker::open_in_memory(Topology::load(repo.join("infra/servicebus.json")).unwrap()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(deploychain_bus::serve_rest(broker.clone(), SasKeys::single("RootManageSharedAccessKey", KEY), listener));
    let conn = ConnectionString::parse(&format!(
        "Endpoint=sb://{addr};SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey={KEY};UseDevelopmentEmulator=true"
    ))
    .unwrap();
    let publisher = ServiceBusPublisher::new(
        &conn,
        "deploychain-events",
        "deploychain-parked",
        deploychain_functions::outbound::service_bus_http().unwrap(),
    )
    .unwrap();

    let ev = DeployEvent::from_json_bytes(&std::fs::read(repo.join("events/samples/push.json")).unwrap()).unwrap();
    let asked = Utc::now() + chrono::Duration::milliseconds(500);
    let second = chrono::Duration::seconds(1);
    let floor = asked.duration_trunc(second).unwrap();
    let due = if floor < asked { floor + second } else { floor };
    publisher.publish(&Outbound::from_event(&ev, None).scheduled(asked)).await.unwrap();

    let sub = EntityPath::subscription("deploychain-events", "on-push");
    assert_eq!(broker.count(&sub).await.unwrap().scheduled, 1, "held as a scheduled message");
    assert!(broker.peek_lock(&sub, Duration::ZERO).await.unwrap().is_none(), "not at once");
    let m = broker.peek_lock(&sub, Duration::from_secs(5)).await.unwrap().expect("delivered once its time has come");
    let received = Utc::now();
    assert_eq!(m.scheduled_enqueue_time, Some(due), "asked for {asked}");
    assert!(received >= due, "received at {received}, due at {due} (asked for {asked})");
    assert_eq!(DeployEvent::from_json_bytes(&m.body).unwrap(), ev);
}
