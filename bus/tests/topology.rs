//! Topology files shaped like the Service Bus emulator's Config.json: the project's own
//! (infra/servicebus.json), the emulator's sample (with comments), defaults, and errors that name
//! the entity and the key.
#![allow(clippy::unwrap_used)]

use deploychain_bus::{
    Broker, BusError, CorrelationFilter, EntityPath, Filter, NewMessage, Queue, Rule, SendOutcome, Subscription, Topic, Topology,
};
use std::path::Path;
use std::time::Duration;

fn infra() -> Topology {
    Topology::load(Path::new(env!("CARGO_MANIFEST_DIR")).join("../infra/servicebus.json")).unwrap()
}

fn topology_err(json: &str) -> String {
    match Topology::from_json_str(json) {
        Err(BusError::Topology(m)) => m,
        other => panic!("expected a topology error, got {other:?}"),
    }
}

fn wrap(queues: &str, topics: &str) -> String {
    format!(r#"{{"UserConfig":{{"Namespaces":[{{"Name":"n","Queues":[{queues}],"Topics":[{topics}]}}],"Logging":{{"Type":"Console"}}}}}}"#)
}

#[test]
fn the_projects_topology_loads_with_its_values() {
    let t = infra();
    assert_eq!(t.namespace, "deploychain");
    let parked = t.queue("deploychain-parked").unwrap();
    assert!(parked.requires_duplicate_detection);
    assert_eq!(parked.duplicate_detection_history_time_window, Duration::from_secs(600));
    assert_eq!(parked.default_message_time_to_live, Some(Duration::from_secs(14 * 86_400)));
    assert_eq!((parked.lock_duration, parked.max_delivery_count), (Duration::from_secs(60), 10));

    let events = t.topic("deploychain-events").unwrap();
    let names: Vec<&str> = events.subscriptions.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        ["on-push", "on-build-completed", "on-image-due", "on-image-ready", "on-deployment-due", "on-approval", "on-approval-due", "audit"]
    );
    let image = events.subscription("on-image-ready").unwrap();
    assert!(image.requires_session && image.dead_lettering_on_message_expiration);
    assert_eq!(image.rules[0].filter, Filter::Correlation(CorrelationFilter::label("dev.deploychain.image.ready.v1")));
    assert!(matches!(&events.subscription("audit").unwrap().rules[0].filter, Filter::Sql(f) if f.text() == "1=1"));
}

#[tokio::test]
async fn the_projects_topology_routes_events_by_label() {
    let b = Broker::open_in_memory(infra()).unwrap();
    let push = NewMessage { label: Some("dev.deploychain.push.v1".into()), message_id: Some("run-1.push".into()), ..NewMessage::new("{}") };
    assert_eq!(b.send("deploychain-events", push.clone()).await.unwrap(), SendOutcome::Enqueued(vec![1, 1]), "on-push and audit");
    assert_eq!(b.send("deploychain-events", push).await.unwrap(), SendOutcome::Duplicate);
    let image = NewMessage { label: Some("dev.deploychain.image.ready.v1".into()), ..NewMessage::new("{}") };
    assert!(
        matches!(b.send("deploychain-events", image.clone()).await, Err(BusError::InvalidMessage(_))),
        "on-image-ready needs a SessionId"
    );
    let image = NewMessage { session_id: Some("web/staging".into()), ..image };
    assert_eq!(b.send("deploychain-events", image).await.unwrap(), SendOutcome::Enqueued(vec![1, 2]));
    let s = b.accept_session(&EntityPath::subscription("deploychain-events", "on-image-ready"), Duration::ZERO).await.unwrap().unwrap();
    assert_eq!(s.session_id, "web/staging");
}

#[test]
fn the_emulator_sample_config_loads_comments_and_all() {
    let t = Topology::load(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/servicebus/emulator.Config.json")).unwrap();
    assert_eq!(t.namespace, "sbemulatorns");
    let q = t.queue("queue.1").unwrap();
    assert_eq!((q.max_delivery_count, q.duplicate_detection_history_time_window), (3, Duration::from_secs(20)));
    assert_eq!(q.default_message_time_to_live, Some(Duration::from_secs(3600)));
    let topic = t.topic("topic.1").unwrap();
    assert_eq!(topic.subscriptions.len(), 4);
    let s1 = topic.subscription("subscription.1").unwrap();
    let expected = CorrelationFilter { content_type: Some("application/json".into()), ..Default::default() };
    assert_eq!(s1.rules[0].filter, Filter::Correlation(expected));
    let s2 = topic.subscription("subscription.2").unwrap();
    assert!(matches!(&s2.rules[0].filter, Filter::Correlation(f) if f.properties.get("prop1") == Some(&"value1".into())));
    assert!(topic.subscription("subscription.3").unwrap().rules.is_empty());
    let s4 = &topic.subscription("subscription.4").unwrap().rules[0];
    assert!(matches!(&s4.filter, Filter::Sql(f) if f.text() == "sys.MessageId = '123456' AND userProp1 = 'value1'"));
    assert_eq!(s4.action.as_ref().map(|a| a.text()), Some("SET sys.To = 'Entity'"));
}

#[tokio::test]
async fn the_emulator_sample_filters_and_action_apply() {
    let t = Topology::load(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/servicebus/emulator.Config.json")).unwrap();
    let b = Broker::open_in_memory(t).unwrap();
    let m = NewMessage {
        message_id: Some("123456".into()),
        content_type: Some("application/json".into()),
        properties: [("userProp1".to_string(), serde_json::json!("value1"))].into(),
        ..NewMessage::new("{}")
    };
    assert_eq!(b.send("topic.1", m).await.unwrap(), SendOutcome::Enqueued(vec![1, 1, 1]), "subscriptions 1, 3 and 4");
    let got = b.receive_and_delete(&EntityPath::subscription("topic.1", "subscription.4"), Duration::ZERO).await.unwrap().unwrap();
    assert_eq!(got.to.as_deref(), Some("Entity"), "the rule's action set sys.To");
    let other = b.receive_and_delete(&EntityPath::subscription("topic.1", "subscription.1"), Duration::ZERO).await.unwrap().unwrap();
    assert_eq!(other.to, None, "actions change only their own subscription's copy");
}

#[test]
fn missing_properties_get_service_bus_defaults() {
    let t = Topology::from_json_str(&wrap(r#"{"Name":"q"}"#, r#"{"Name":"t","Subscriptions":[{"Name":"s"}]}"#)).unwrap();
    assert_eq!(t.queues[0], Queue::new("q"));
    let q = &t.queues[0];
    assert_eq!(q.lock_duration, Duration::from_secs(60));
    assert_eq!(q.max_delivery_count, 10);
    assert_eq!(q.duplicate_detection_history_time_window, Duration::from_secs(600));
    assert_eq!(q.default_message_time_to_live, None, "TTL is infinite");
    assert!(!q.requires_session && !q.requires_duplicate_detection && !q.dead_lettering_on_message_expiration);
    let s = &t.topics[0].subscriptions[0];
    assert_eq!(*s, Subscription::new("s"));
    // The wrapper is optional, and so is everything but a namespace.
    let bare = Topology::from_json_str(r#"{"Namespaces":[{"Name":"x"}]}"#).unwrap();
    assert!(bare.queues.is_empty() && bare.topics.is_empty());
}

#[test]
fn errors_name_the_entity_and_the_key() {
    let cases = [
        (wrap(r#"{"Name":"q1","Properties":{"LockDuration":"1 minute"}}"#, ""), "queue \"q1\": Properties.LockDuration"),
        (wrap(r#"{"Name":"q1","Properties":{"MaxDeliveryCount":0}}"#, ""), "queue \"q1\": Properties.MaxDeliveryCount"),
        (wrap(r#"{"Name":"q1","Properties":{"RequiresSession":"yes"}}"#, ""), "queue \"q1\": Properties.RequiresSession"),
        (wrap(r#"{"Name":"q1","Properties":{"ForwardTo":"q2"}}"#, ""), "queue \"q1\": Properties.ForwardTo"),
        (wrap(r#"{"Properties":{}}"#, ""), "queue #0: Name: missing"),
        (wrap(r#"{"Name":"a b"}"#, ""), "queue \"a b\": Name"),
        (wrap(r#"{"Name":"dup"}"#, r#"{"Name":"DUP","Subscriptions":[]}"#), "topic \"DUP\": Name: already used"),
        (wrap("", r#"{"Name":"t","Properties":{"DefaultMessageTimeToLive":5}}"#), "topic \"t\": Properties.DefaultMessageTimeToLive"),
        (
            wrap("", r#"{"Name":"t","Subscriptions":[{"Name":"s","Properties":{"LockDuration":"PT0S"}}]}"#),
            "subscription \"t/s\": Properties.LockDuration",
        ),
        (wrap("", r#"{"Name":"t","Subscriptions":[{"Name":"s"},{"Name":"S"}]}"#), "subscription \"t/S\": Name: declared twice"),
        (
            wrap("", r#"{"Name":"t","Subscriptions":[{"Name":"s","Rules":[{"Name":"r","Properties":{"FilterType":"Regex"}}]}]}"#),
            "subscription \"t/s\": rule \"r\": Properties.FilterType",
        ),
        (
            wrap(
                "",
                r#"{"Name":"t","Subscriptions":[{"Name":"s","Rules":[{"Name":"r","Properties":{"FilterType":"Correlation","CorrelationFilter":{"Lable":"x"}}}]}]}"#,
            ),
            "subscription \"t/s\": rule \"r\": Properties.CorrelationFilter.Lable",
        ),
        (
            wrap(
                "",
                r#"{"Name":"t","Subscriptions":[{"Name":"s","Rules":[{"Name":"r","Properties":{"FilterType":"Correlation","CorrelationFilter":{}}}]}]}"#,
            ),
            "subscription \"t/s\": rule \"r\": CorrelationFilter",
        ),
        (
            wrap(
                "",
                r#"{"Name":"t","Subscriptions":[{"Name":"s","Rules":[{"Name":"r","Properties":{"FilterType":"Sql","SqlFilter":{}}}]}]}"#,
            ),
            "subscription \"t/s\": rule \"r\": Properties.SqlFilter.SqlExpression: missing",
        ),
        ("{\"UserConfig\":{}}".to_string(), "Namespaces: missing"),
        ("{ not json".to_string(), "not valid JSON"),
    ];
    for (json, expected) in cases {
        let e = topology_err(&json);
        assert!(e.contains(expected), "expected `{expected}` in `{e}`");
    }
}

#[test]
fn unsupported_sql_is_refused_at_load_naming_the_subscription() {
    let json = wrap(
        "",
        r#"{"Name":"t","Subscriptions":[{"Name":"odd","Rules":[{"Name":"r","Properties":{"FilterType":"Sql","SqlFilter":{"SqlExpression":"sys.Label LIKE 'dev.%'"}}}]}]}"#,
    );
    let e = topology_err(&json);
    assert!(e.contains("subscription \"t/odd\"") && e.contains("SqlExpression") && e.contains("LIKE"), "{e}");
    assert!(Rule::sql("r", "a IN (1)").is_err());
    assert!(Rule::sql("r", "sys.Label = 'x' OR prop = 'y'").is_ok());
}

#[test]
fn subscriptions_can_be_added_in_code() {
    let mut t = Topology::new("local");
    let mut q = Queue::new("work");
    q.lock_duration = Duration::from_secs(5);
    t.add_queue(q).unwrap();
    t.add_topic(Topic::new("events")).unwrap();
    t.add_subscription("events", Subscription::new("watch")).unwrap();
    t.add_subscription("EVENTS", Subscription::new("typed").with_rule(Rule::correlation("t", CorrelationFilter::label("x")))).unwrap();
    t.add_local_subscription("events", "sim", &["a", "b"]).unwrap();
    assert_eq!(t.topic("events").unwrap().subscription("sim").unwrap().rules.len(), 2);

    assert!(matches!(t.add_subscription("nope", Subscription::new("s")), Err(BusError::Topology(m)) if m.contains("nope")));
    assert!(matches!(t.add_subscription("events", Subscription::new("Watch")), Err(BusError::Topology(m)) if m.contains("declared twice")));
    assert!(t.add_queue(Queue::new("events")).is_err(), "queues and topics share one name space");
    let empty = Subscription::new("e").with_rule(Rule::correlation("r", CorrelationFilter::default()));
    assert!(t.add_subscription("events", empty).is_err());
    assert_eq!(t.topic("events").unwrap().subscriptions.len(), 3, "failed additions changed nothing");
}

#[test]
fn loading_a_missing_file_names_it() {
    let e = Topology::load("/nonexistent/servicebus.json").unwrap_err();
    assert!(e.to_string().contains("/nonexistent/servicebus.json"), "{e}");
}
