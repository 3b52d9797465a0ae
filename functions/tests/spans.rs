//! The invocation spans as an exporter receives them, through the router with envelopes shaped as
//! the host sends them. This binary installs a global tracer provider, so it lives apart from the
//! other router tests, which run without one.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use deploychain_functions::adapters::memory::MemoryStore;
use opentelemetry::Value;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use std::sync::{Arc, Mutex};

/// Every ended span, kept.
#[derive(Debug, Clone, Default)]
struct Spans(Arc<Mutex<Vec<SpanData>>>);

impl SpanExporter for Spans {
    fn export(&self, batch: Vec<SpanData>) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        self.0.lock().unwrap().extend(batch);
        std::future::ready(Ok(()))
    }
}

impl Spans {
    fn attribute(&self, span: &str, key: &str) -> Vec<Option<Value>> {
        let spans = self.0.lock().unwrap();
        spans
            .iter()
            .filter(|s| s.name == span)
            .map(|s| s.attributes.iter().find(|kv| kv.key.as_str() == key).map(|kv| kv.value.clone()))
            .collect()
    }
}

#[tokio::test]
async fn a_bus_invocation_span_names_its_subscription_not_the_message_subject() {
    let spans = Spans::default();
    opentelemetry::global::set_tracer_provider(SdkTracerProvider::builder().with_simple_exporter(spans.clone()).build());

    let mut h = Harness::new(Arc::new(MemoryStore::default()));
    push_master(&mut h, "octo-org/octo-repo", "1111111111111111111111111111111111111111").await;

    let subscription = spans.attribute("on_push", "messaging.destination.subscription.name");
    assert_eq!(subscription, [Some(Value::from("on-push"))], "the trigger's subscriptionName, from on_push/function.json");
    assert_eq!(spans.attribute("on_push", "messaging.destination.name"), [Some(Value::from("deploychain-events"))]);
    // The Subject (the event type) is the CloudEvents type attribute, and only that.
    assert_eq!(spans.attribute("on_push", "cloudevents.event_type"), [Some(Value::from("dev.deploychain.push.v1"))]);
}
