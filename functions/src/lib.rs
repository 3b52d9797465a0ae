//! The deploychain handler: the one executable the Azure Functions host starts as a custom
//! handler. It serves `GET /` (readiness) and `POST /{FunctionName}` for every folder under
//! `functions/` that holds a `function.json`; [`invoke`] is the only module that knows the host's
//! envelope. Steps depend on the traits in [`adapters`], never on Azure SDKs or the environment.
//!
//! This crate must not depend on the local stack: production code has no local branches.

pub mod adapters;
pub mod config;
pub mod error;
pub mod invoke;
pub mod links;
pub mod metrics;
pub mod ops;
pub mod outbound;
pub mod policy;
pub mod steps;
pub mod telemetry;

use adapters::{BuildSystem, Compute, ImageBaker, Notify, Parked, Publish, Store};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use error::Error;
use invoke::{BusMessage, HttpRequest, HttpResponse, Invocation, InvokeRequest, InvokeResponse};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// Everything a function needs, built once in `main`.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<config::Config>,
    pub policy: Arc<policy::Policy>,
    pub links: Arc<links::ApprovalLinks>,
    pub store: Arc<dyn Store>,
    pub publisher: Arc<dyn Publish>,
    pub builds: Arc<dyn BuildSystem>,
    pub baker: Arc<dyn ImageBaker>,
    pub compute: Arc<dyn Compute>,
    pub notify: Arc<dyn Notify>,
    /// Dead-letter operations on the app's namespace (`None` where there is no bus, as in tests).
    pub dead_letters: Option<Arc<ops::DeadLetters>>,
}

/// The functions this handler serves: (name = folder = route = span, kind).
pub const FUNCTIONS: &[(&str, Trigger)] = &[
    ("github_webhook", Trigger::Http),
    ("azure_devops_webhook", Trigger::Http),
    ("jenkins_webhook", Trigger::Http),
    ("eventgrid_webhook", Trigger::Http),
    ("approval", Trigger::Http),
    ("runs", Trigger::Http),
    ("ops_deadletters", Trigger::Http),
    ("on_push", Trigger::ServiceBus),
    ("on_build_completed", Trigger::ServiceBus),
    ("on_image_due", Trigger::ServiceBus),
    ("on_deployment_due", Trigger::ServiceBus),
    ("on_image_ready", Trigger::ServiceBus),
    ("on_approval", Trigger::ServiceBus),
    ("on_approval_due", Trigger::ServiceBus),
    ("watchdog", Trigger::Timer),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Http,
    ServiceBus,
    Timer,
}

/// The binding names used in every `function.json`.
pub const HTTP_IN: &str = "req";
pub const HTTP_OUT: &str = "res";
pub const BUS_IN: &str = "msg";
pub const TIMER_IN: &str = "timer";

/// The `function.json` of every Service Bus-triggered function, compiled in: the host does not
/// tell a custom handler which entity a message came from, but the trigger binding does.
const BUS_FUNCTION_JSON: &[(&str, &str)] = &[
    ("on_push", include_str!("../on_push/function.json")),
    ("on_build_completed", include_str!("../on_build_completed/function.json")),
    ("on_image_due", include_str!("../on_image_due/function.json")),
    ("on_deployment_due", include_str!("../on_deployment_due/function.json")),
    ("on_image_ready", include_str!("../on_image_ready/function.json")),
    ("on_approval", include_str!("../on_approval/function.json")),
    ("on_approval_due", include_str!("../on_approval_due/function.json")),
];

/// The subscription a Service Bus-triggered function reads: its `serviceBusTrigger` binding's
/// `subscriptionName` (binding properties matched case-insensitively, as the host does), each
/// `%NAME%` in it resolved by `setting` the way the host resolves binding expressions from app
/// settings (https://learn.microsoft.com/azure/azure-functions/functions-bindings-expressions-patterns).
/// `None` for a function with no such trigger, or when the setting is missing.
pub fn subscription_name(function: &str, setting: &dyn Fn(&str) -> Option<String>) -> Option<String> {
    let json = BUS_FUNCTION_JSON.iter().find(|(name, _)| *name == function)?.1;
    let f: serde_json::Value = serde_json::from_str(json).ok()?;
    let field = |b: &serde_json::Map<String, serde_json::Value>, name: &str| {
        b.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).and_then(|(_, v)| v.as_str().map(str::to_string))
    };
    let trigger = f["bindings"]
        .as_array()?
        .iter()
        .filter_map(serde_json::Value::as_object)
        .find(|b| field(b, "type").is_some_and(|t| t.eq_ignore_ascii_case("serviceBusTrigger")))?;
    resolve_setting(&field(trigger, "subscriptionName")?, setting)
}

/// `text` with every `%NAME%` replaced by setting `NAME`.
fn resolve_setting(text: &str, setting: &dyn Fn(&str) -> Option<String>) -> Option<String> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find('%') {
        let end = start + 1 + rest[start + 1..].find('%')?;
        out.push_str(&rest[..start]);
        out.push_str(&setting(&rest[start + 1..end])?);
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    Some(out)
}

/// Each Service Bus function's subscription, resolved once. App settings reach the handler's
/// process as environment variables, as they reach the host
/// (https://learn.microsoft.com/azure/azure-functions/functions-how-to-use-azure-function-app-settings).
static SUBSCRIPTIONS: std::sync::LazyLock<Vec<(&'static str, Option<String>)>> = std::sync::LazyLock::new(|| {
    BUS_FUNCTION_JSON.iter().map(|(name, _)| (*name, subscription_name(name, &|k| std::env::var(k).ok()))).collect()
});

type HttpFn = fn(AppState, HttpRequest) -> Pin<Box<dyn Future<Output = error::Result<HttpResponse>> + Send>>;
type BusFn = fn(AppState, BusMessage) -> Pin<Box<dyn Future<Output = error::Result<String>> + Send>>;

pub fn app(state: AppState) -> Router {
    // The envelope holds the body (base64 for binary media types, JSON-escaped otherwise), so the
    // router admits a little over twice the webhook limit; the functions enforce the real limit.
    let envelope_limit = state.config.max_body_bytes.saturating_mul(2).saturating_add(1 << 20);
    Router::new()
        .route("/", get(|| async { "deploychain handler ready" }))
        .route("/github_webhook", post(|s, h, b| http_fn(s, h, b, "github_webhook", |s, r| Box::pin(steps::github_webhook::handle(s, r)))))
        .route(
            "/azure_devops_webhook",
            post(|s, h, b| http_fn(s, h, b, "azure_devops_webhook", |s, r| Box::pin(steps::azure_devops_webhook::handle(s, r)))),
        )
        .route(
            "/jenkins_webhook",
            post(|s, h, b| http_fn(s, h, b, "jenkins_webhook", |s, r| Box::pin(steps::jenkins_webhook::handle(s, r)))),
        )
        .route(
            "/eventgrid_webhook",
            post(|s, h, b| http_fn(s, h, b, "eventgrid_webhook", |s, r| Box::pin(steps::eventgrid_webhook::handle(s, r)))),
        )
        .route("/approval", post(|s, h, b| http_fn(s, h, b, "approval", |s, r| Box::pin(steps::approval::handle(s, r)))))
        .route("/runs", post(|s, h, b| http_fn(s, h, b, "runs", |s, r| Box::pin(steps::runs::handle(s, r)))))
        .route(
            "/ops_deadletters",
            post(|s, h, b| http_fn(s, h, b, "ops_deadletters", |s, r| Box::pin(steps::ops_deadletters::handle(s, r)))),
        )
        .route("/on_push", post(|s, h, b| bus_fn(s, h, b, "on_push", |s, m| Box::pin(steps::on_push::handle(s, m)))))
        .route(
            "/on_build_completed",
            post(|s, h, b| bus_fn(s, h, b, "on_build_completed", |s, m| Box::pin(steps::on_build_completed::handle(s, m)))),
        )
        .route("/on_image_due", post(|s, h, b| bus_fn(s, h, b, "on_image_due", |s, m| Box::pin(steps::on_image_due::handle(s, m)))))
        .route(
            "/on_deployment_due",
            post(|s, h, b| bus_fn(s, h, b, "on_deployment_due", |s, m| Box::pin(steps::on_deployment_due::handle(s, m)))),
        )
        .route("/on_image_ready", post(|s, h, b| bus_fn(s, h, b, "on_image_ready", |s, m| Box::pin(steps::on_image_ready::handle(s, m)))))
        .route("/on_approval", post(|s, h, b| bus_fn(s, h, b, "on_approval", |s, m| Box::pin(steps::on_approval::handle(s, m)))))
        .route(
            "/on_approval_due",
            post(|s, h, b| bus_fn(s, h, b, "on_approval_due", |s, m| Box::pin(steps::on_approval_due::handle(s, m)))),
        )
        .route("/watchdog", post(timer_fn))
        .layer(DefaultBodyLimit::max(envelope_limit))
        .with_state(state)
}

/// The router of a handler that is still starting: `GET /` (the host's readiness probe) answers
/// at once; every other request waits until `routes` holds the handler's own router (see
/// `main.rs`), then goes to it.
pub fn starting(routes: tokio::sync::watch::Receiver<Option<Router>>) -> Router {
    Router::new().route("/", get(|| async { "deploychain handler ready" })).fallback(move |req: axum::extract::Request| {
        let mut routes = routes.clone();
        async move {
            let router = match routes.wait_for(Option::is_some).await {
                Ok(r) => r.clone(),
                Err(_) => None,
            };
            match router {
                Some(r) => tower::ServiceExt::oneshot(r, req).await.into_response(),
                None => (StatusCode::SERVICE_UNAVAILABLE, "the handler is stopping").into_response(),
            }
        }
    })
}

/// An HTTP-triggered function: every outcome, including errors, is a 200 to the host with the
/// caller's status in `Outputs.res` (a non-2xx to the host would reach the caller as an empty 500).
async fn http_fn(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    body: Result<Json<InvokeRequest>, axum::extract::rejection::JsonRejection>,
    name: &'static str,
    f: HttpFn,
) -> Response {
    let req = match body {
        Ok(Json(r)) => r,
        Err(e) => return envelope_rejected(name, e),
    };
    let http = match HttpRequest::from_invocation(&req, HTTP_IN) {
        Ok(h) => h,
        Err(e) => return Invocation::http(error_response(&Error::from(e))).into_response(HTTP_OUT).into_response(),
    };
    let method = http.method.clone();
    let mut attrs = vec![
        opentelemetry::KeyValue::new("faas.trigger", "http"),
        opentelemetry::KeyValue::new("faas.name", name),
        opentelemetry::KeyValue::new("faas.invocation_id", invocation_id(&headers)),
        opentelemetry::KeyValue::new("http.request.method", method.clone()),
    ];
    if let Some(route) = http.url.split('?').next().and_then(|u| url::Url::parse(u).ok()) {
        attrs.push(opentelemetry::KeyValue::new("url.path", route.path().to_string()));
    }
    let mut traceparent = http.header("traceparent").map(str::to_string);
    if name == steps::approval::NAME {
        traceparent = steps::approval::trace_parent(&state, &http).await.or(traceparent);
    }
    let handled = async move {
        let r = f(state, http).await;
        let code = match &r {
            Ok(res) => res.status,
            Err(e) => e.status(),
        };
        telemetry::annotate(opentelemetry::KeyValue::new("http.response.status_code", i64::from(code)));
        r
    };
    let res = match telemetry::invocation(name, opentelemetry::trace::SpanKind::Server, traceparent, attrs, handled).await {
        Ok(res) => {
            tracing::info!(function = name, method, status = res.status, "invocation");
            res
        }
        Err(e) => {
            if e.is_transient() {
                tracing::error!(function = name, method, status = e.status(), error = %e, "invocation failed");
            } else {
                tracing::warn!(function = name, method, status = e.status(), error = %e, "request refused");
            }
            error_response(&e)
        }
    };
    let status = res.status;
    Invocation::http(res).log(format!("{name}: {status}")).into_response(HTTP_OUT).into_response()
}

/// The timer-triggered watchdog. A failure is a non-2xx to the host, which only logs it (timers
/// are not redelivered; the next tick looks again).
async fn timer_fn(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    body: Result<Json<InvokeRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let name = "watchdog";
    if let Err(e) = body {
        return envelope_rejected(name, e);
    }
    let attrs = vec![
        opentelemetry::KeyValue::new("faas.trigger", "timer"),
        opentelemetry::KeyValue::new("faas.name", name),
        opentelemetry::KeyValue::new("faas.invocation_id", invocation_id(&headers)),
    ];
    match telemetry::invocation(name, opentelemetry::trace::SpanKind::Internal, None, attrs, steps::watchdog::handle(state)).await {
        Ok(outcome) => {
            tracing::info!(function = name, outcome, "invocation");
            Invocation::default().log(format!("{name}: {outcome}")).into_response(HTTP_OUT).into_response()
        }
        Err(e) => {
            tracing::warn!(function = name, error = %e, "invocation failed");
            failed(name, &e)
        }
    }
}

/// The host's `X-Azure-Functions-InvocationId`.
fn invocation_id(h: &axum::http::HeaderMap) -> String {
    h.get("x-azure-functions-invocationid").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string()
}

pub fn error_response(e: &Error) -> HttpResponse {
    let mut res = HttpResponse::json(e.status(), &serde_json::json!({ "error": e.to_string() }));
    if e.is_transient() {
        let secs = e.retry_after().map(|d| d.as_secs_f64().ceil() as u64).unwrap_or(10).max(1);
        res = res.with_header("Retry-After", &secs.to_string());
    }
    res
}

/// A Service Bus-triggered function. Transient errors fail the invocation (the host abandons the
/// message; the broker redelivers it). Permanent errors park the message with a reason and then
/// succeed, so the host completes the original instead of retrying it MaxDeliveryCount times.
async fn bus_fn(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    body: Result<Json<InvokeRequest>, axum::extract::rejection::JsonRejection>,
    name: &'static str,
    f: BusFn,
) -> Response {
    let req = match body {
        Ok(Json(r)) => r,
        Err(e) => return envelope_rejected(name, e),
    };
    let msg = match BusMessage::from_invocation(&req, BUS_IN) {
        Ok(m) => m,
        Err(e) => {
            // Without the body there is nothing to park: fail so the broker keeps the message.
            tracing::error!(function = name, error = %e, "unreadable trigger envelope");
            return failed(name, &Error::from(e));
        }
    };
    let message_id = msg.message_id.clone().unwrap_or_else(|| deploychain_events::short_digest(&[&String::from_utf8_lossy(&msg.body)]));
    let delivery = msg.delivery_count;
    let parked = Parked {
        message_id: message_id.clone(),
        function: name.to_string(),
        reason: String::new(),
        description: String::new(),
        delivery_count: delivery,
        body: String::from_utf8(msg.body.clone()).unwrap_or_else(|e| {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD.encode(e.as_bytes())
        }),
        original_subject: msg.subject.clone(),
    };
    let event = deploychain_events::DeployEvent::from_json_bytes(&msg.body).ok();
    let mut attrs = vec![
        opentelemetry::KeyValue::new("faas.trigger", "pubsub"),
        opentelemetry::KeyValue::new("faas.name", name),
        opentelemetry::KeyValue::new("faas.invocation_id", invocation_id(&headers)),
        opentelemetry::KeyValue::new("messaging.system", "servicebus"),
        opentelemetry::KeyValue::new("messaging.operation.type", "process"),
        opentelemetry::KeyValue::new("messaging.message.id", message_id.clone()),
        opentelemetry::KeyValue::new("messaging.servicebus.message.delivery_count", i64::from(delivery)),
    ];
    // Where the message was read from: the topic (`%DEPLOYCHAIN_TOPIC%` in every trigger, which the
    // configuration resolved) and the trigger's subscription — not the Subject, the event type.
    attrs.push(opentelemetry::KeyValue::new("messaging.destination.name", state.config.topic.clone()));
    if let Some(subscription) = SUBSCRIPTIONS.iter().find(|(n, _)| *n == name).and_then(|(_, s)| s.clone()) {
        attrs.push(opentelemetry::KeyValue::new("messaging.destination.subscription.name", subscription));
    }
    if let Some(ev) = &event {
        attrs.extend(telemetry::event_attributes(ev, name));
    }
    let traceparent = event.as_ref().and_then(|e| e.trace.traceparent.clone());
    match telemetry::invocation(name, opentelemetry::trace::SpanKind::Consumer, traceparent, attrs, f(state.clone(), msg)).await {
        Ok(outcome) => {
            tracing::info!(function = name, message_id, delivery, outcome, "invocation");
            Invocation::default().log(format!("{name} {message_id}: {outcome}")).into_response(HTTP_OUT).into_response()
        }
        Err(e) if e.is_transient() => {
            tracing::warn!(function = name, message_id, delivery, error = %e, "invocation failed; the message will be redelivered");
            failed(name, &e)
        }
        Err(e) => {
            let parked = Parked { reason: e.park_reason().to_string(), description: e.detail().to_string(), ..parked };
            match state.publisher.park(&parked).await {
                Ok(()) => {
                    metrics::dead_letter(name, &parked.reason);
                    tracing::warn!(function = name, message_id, reason = parked.reason, error = %e, "message parked");
                    Invocation::default()
                        .log(format!("{name} {message_id}: parked ({}): {}", parked.reason, parked.description))
                        .into_response(HTTP_OUT)
                        .into_response()
                }
                Err(pe) => {
                    tracing::error!(function = name, message_id, error = %pe, "could not park the message; it will be redelivered");
                    failed(name, &pe)
                }
            }
        }
    }
}

fn failed(name: &str, e: &Error) -> Response {
    let body = InvokeResponse { logs: vec![format!("{name}: {e}")], ..Default::default() };
    (StatusCode::INTERNAL_SERVER_ERROR, Json(body)).into_response()
}

fn envelope_rejected(name: &str, e: axum::extract::rejection::JsonRejection) -> Response {
    tracing::error!(function = name, error = %e, "the invocation envelope is not the host's JSON");
    let status = if matches!(e, axum::extract::rejection::JsonRejection::BytesRejection(_)) {
        StatusCode::PAYLOAD_TOO_LARGE
    } else {
        StatusCode::BAD_REQUEST
    };
    let body = InvokeResponse { logs: vec![format!("{name}: bad invocation envelope: {e}")], ..Default::default() };
    (status, Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::{BUS_FUNCTION_JSON, FUNCTIONS, Trigger, resolve_setting, subscription_name};

    fn settings(k: &str) -> Option<String> {
        match k {
            "DEPLOYCHAIN_TOPIC" => Some("deploychain-events".into()),
            "SUB" => Some("on-push-blue".into()),
            _ => None,
        }
    }

    #[test]
    fn every_bus_function_knows_its_subscription() {
        let bus: Vec<&str> = FUNCTIONS.iter().filter(|(_, t)| *t == Trigger::ServiceBus).map(|(n, _)| *n).collect();
        assert_eq!(bus, BUS_FUNCTION_JSON.iter().map(|(n, _)| *n).collect::<Vec<_>>(), "one function.json per bus function");
        for name in bus {
            assert_eq!(subscription_name(name, &settings), Some(name.replace('_', "-")), "{name}");
        }
        assert_eq!(subscription_name("github_webhook", &settings), None);
    }

    #[test]
    fn app_settings_in_the_binding_are_resolved() {
        let f = |v: &str| resolve_setting(v, &settings);
        assert_eq!(f("%SUB%").as_deref(), Some("on-push-blue"));
        assert_eq!(f("x-%SUB%-%DEPLOYCHAIN_TOPIC%").as_deref(), Some("x-on-push-blue-deploychain-events"));
        assert_eq!(f("on-push").as_deref(), Some("on-push"));
        assert_eq!(f("%MISSING%"), None, "an unresolved setting names no subscription");
        assert_eq!(f("%SUB"), None);
    }
}
