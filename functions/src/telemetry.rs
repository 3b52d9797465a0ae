//! Telemetry: logs always (stdout, errors on stderr, as the Functions host reads them); spans and
//! metrics ([`crate::metrics`]) to an OTLP/HTTP collector when the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `_TRACES_ENDPOINT` / `_METRICS_ENDPOINT`) settings are
//! present, and to Application Insights when `APPLICATIONINSIGHTS_CONNECTION_STRING` is (requests
//! and dependencies, and `customMetrics`). The cloud role is `service.namespace` = `deploychain`
//! with `service.name` (`OTEL_SERVICE_NAME`, default `handler`): `deploychain.handler`.
//! Spans are exported in batches and metrics every `OTEL_METRIC_EXPORT_INTERVAL` (default 60 s),
//! off the request path (an invocation never waits for export), and both are flushed when the
//! handler stops.
//!
//! One span per invocation, named after the function, continues the release's trace from the
//! event's `traceparent`, and the events a step publishes carry that span as their parent
//! ([`current_traceparent`]), so push → build → bake → staging → approval → production is one trace
//! with its parent chain in order.

use opentelemetry::trace::{SpanKind, Status, TraceContextExt, Tracer, TracerProvider};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::SdkTracerProvider;
use std::collections::HashMap;

pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    meters: Option<SdkMeterProvider>,
}

fn set(k: &str) -> bool {
    std::env::var(k).is_ok_and(|v| !v.trim().is_empty())
}

/// Whether spans go to an OTLP endpoint.
pub fn otlp_traces() -> bool {
    set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
}

/// Whether metrics go to an OTLP endpoint.
pub fn otlp_metrics() -> bool {
    set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
}

static RECORDING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether spans are recorded and exported (an exporter is configured).
pub fn recording() -> bool {
    RECORDING.load(std::sync::atomic::Ordering::Relaxed)
}

/// The Application Insights connection string, when set.
fn app_insights_connection_string() -> Option<String> {
    std::env::var("APPLICATIONINSIGHTS_CONNECTION_STRING").ok().filter(|v| !v.trim().is_empty())
}

/// The exporter that sends Application Insights envelopes (`{IngestionEndpoint}/v2/track`). The
/// crate insists on https; a plain-http ingestion endpoint (a local receiver) is set directly.
fn app_insights_exporter(cs: &str) -> anyhow::Result<opentelemetry_application_insights::Exporter<reqwest_013::Client>> {
    app_insights_exporter_with(cs, crate::outbound::builder_013().build()?)
}

/// The metric exporter: the same envelopes, sent with a blocking client from the reader's thread.
fn app_insights_metric_exporter(cs: &str) -> anyhow::Result<opentelemetry_application_insights::Exporter<reqwest_013::blocking::Client>> {
    app_insights_exporter_with(cs, crate::outbound::blocking_builder_013().build()?)
}

fn app_insights_exporter_with<C: opentelemetry_http::HttpClient + 'static>(
    cs: &str,
    client: C,
) -> anyhow::Result<opentelemetry_application_insights::Exporter<C>> {
    let field = |name: &str| {
        cs.split(';')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_string())
    };
    match (field("InstrumentationKey"), field("IngestionEndpoint")) {
        (Some(ikey), Some(ep)) if ep.starts_with("http://") => {
            #[allow(deprecated)]
            let e = opentelemetry_application_insights::Exporter::new(ikey, client)
                .with_endpoint(&ep)
                .map_err(|e| anyhow::anyhow!("APPLICATIONINSIGHTS_CONNECTION_STRING: bad IngestionEndpoint: {e}"))?;
            Ok(e)
        }
        // The error names the problem, never the string (it holds the instrumentation key).
        _ => opentelemetry_application_insights::Exporter::new_from_connection_string(cs, client)
            .map_err(|e| anyhow::anyhow!("APPLICATIONINSIGHTS_CONNECTION_STRING is not a connection string: {e}")),
    }
}

/// Logs always; spans when OTLP is configured. Call once, before serving.
pub fn init() -> anyhow::Result<Telemetry> {
    use tracing_subscriber::fmt::writer::MakeWriterExt;
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr.with_max_level(tracing::Level::ERROR).or_else(std::io::stdout))
        .with_ansi(false)
        .init();
    let app_insights = app_insights_connection_string();
    if !otlp_traces() && !otlp_metrics() && app_insights.is_none() {
        return Ok(Telemetry { provider: None, meters: None });
    }
    let name = std::env::var("OTEL_SERVICE_NAME").ok().filter(|n| !n.is_empty()).unwrap_or_else(|| "handler".into());
    let instance = std::env::var("WEBSITE_INSTANCE_ID").or_else(|_| std::env::var("HOSTNAME")).unwrap_or_else(|_| "local".into());
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(name)
        .with_attribute(KeyValue::new("service.namespace", "deploychain"))
        .with_attribute(KeyValue::new("service.instance.id", instance))
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    // Built first: a bad connection string stops the handler before anything is exported.
    let app_insights = app_insights.map(|cs| app_insights_exporter(&cs).map(|e| (cs, e))).transpose()?;

    let mut builder = SdkTracerProvider::builder().with_resource(resource.clone());
    if otlp_traces() {
        // The exporter reads the OTEL_EXPORTER_OTLP_* settings itself (endpoint, headers, timeout).
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .build()
            .map_err(|e| anyhow::anyhow!("OTLP exporter: {e}"))?;
        builder = builder.with_batch_exporter(exporter);
        tracing::info!("spans are exported over OTLP/HTTP");
    }
    let mut meters = SdkMeterProvider::builder().with_resource(resource);
    if otlp_metrics() {
        // Cumulative temporality (the OTLP default); the interval is OTEL_METRIC_EXPORT_INTERVAL.
        let exporter = opentelemetry_otlp::MetricExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .build()
            .map_err(|e| anyhow::anyhow!("OTLP metric exporter: {e}"))?;
        meters = meters.with_reader(PeriodicReader::builder(exporter).build());
        tracing::info!("metrics are exported over OTLP/HTTP");
    }
    if let Some((cs, exporter)) = app_insights {
        // Its retries sleep on the async runtime, so it runs on the tokio batch processor.
        use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
        builder = builder.with_span_processor(BatchSpanProcessor::builder(exporter, opentelemetry_sdk::runtime::Tokio).build());
        // Metrics (delta temporality, as Application Insights wants) on the periodic reader's own
        // thread, with a blocking client made off the runtime (it owns one inside).
        let metric_exporter = std::thread::spawn(move || app_insights_metric_exporter(&cs))
            .join()
            .map_err(|_| anyhow::anyhow!("APPLICATIONINSIGHTS_CONNECTION_STRING: the metric exporter could not be built"))??;
        meters = meters.with_reader(PeriodicReader::builder(metric_exporter).build());
        tracing::info!("spans and metrics are exported to Application Insights");
    }
    let provider = builder.build();
    opentelemetry::global::set_tracer_provider(provider.clone());
    RECORDING.store(true, std::sync::atomic::Ordering::Relaxed);
    let meters = meters.build();
    opentelemetry::global::set_meter_provider(meters.clone());
    Ok(Telemetry { provider: Some(provider), meters: Some(meters) })
}

/// The longest the handler waits at shutdown for buffered telemetry to go out: a collector that
/// hangs must not hold the process past its host's patience.
pub const SHUTDOWN_BUDGET: std::time::Duration = std::time::Duration::from_secs(5);

impl Telemetry {
    /// Flush what is buffered, for at most [`SHUTDOWN_BUDGET`]. The SDK blocks, so the flush runs
    /// on a thread of its own (not the runtime's blocking pool, which would hold the runtime's
    /// shutdown for as long as an export hangs); what is not out by then is dropped.
    pub async fn shutdown(self) {
        let (spans, meters) = (self.provider, self.meters);
        if spans.is_none() && meters.is_none() {
            return;
        }
        let (done, flushed) = tokio::sync::oneshot::channel();
        let spawned = std::thread::Builder::new().name("telemetry-flush".into()).spawn(move || {
            if let Some(p) = spans {
                let _ = p.force_flush();
                let _ = p.shutdown();
            }
            if let Some(m) = meters {
                let _ = m.force_flush();
                let _ = m.shutdown();
            }
            let _ = done.send(());
        });
        if spawned.is_ok() && tokio::time::timeout(SHUTDOWN_BUDGET, flushed).await.is_err() {
            tracing::warn!(budget_s = SHUTDOWN_BUDGET.as_secs(), "telemetry not flushed in time at shutdown: the rest is dropped");
        }
    }
}

/// The invocation's span context, for the events it publishes.
#[derive(Clone)]
pub struct Invocation(Context);

tokio::task_local! {
    static CURRENT: Invocation;
}

/// `00-<trace>-<span>-<flags>` of the running invocation's span, when spans are recorded.
pub fn current_traceparent() -> Option<String> {
    CURRENT
        .try_with(|c| {
            let sc = c.0.span().span_context().clone();
            sc.is_valid().then(|| format!("00-{}-{}-{:02x}", sc.trace_id(), sc.span_id(), sc.trace_flags().to_u8()))
        })
        .ok()
        .flatten()
}

/// A client span (an ARM request, say) under the running invocation's span; ended by the caller.
pub fn client_span(name: String, attributes: Vec<KeyValue>) -> opentelemetry::global::BoxedSpan {
    let tracer = opentelemetry::global::tracer_provider().tracer("deploychain");
    let parent = CURRENT.try_with(|c| c.0.clone()).unwrap_or_else(|_| Context::new());
    tracer.span_builder(name).with_kind(SpanKind::Client).with_attributes(attributes).start_with_context(&tracer, &parent)
}

/// Add an attribute to the running invocation's span (a no-op outside one).
pub fn annotate(kv: KeyValue) {
    let _ = CURRENT.try_with(|c| c.0.span().set_attribute(kv));
}

/// The parent of an invocation: the W3C trace context in `traceparent` (and `tracestate`).
fn parent(traceparent: Option<&str>, tracestate: Option<&str>) -> Context {
    use opentelemetry::propagation::TextMapPropagator;
    let mut carrier = HashMap::new();
    if let Some(tp) = traceparent {
        carrier.insert("traceparent".to_string(), tp.to_string());
    }
    if let Some(ts) = tracestate {
        carrier.insert("tracestate".to_string(), ts.to_string());
    }
    opentelemetry_sdk::propagation::TraceContextPropagator::new().extract(&carrier)
}

/// Run `f` as one invocation span named `name`, child of `traceparent`, with `attributes`; the
/// outcome sets the span's status (`error.type` = transient or permanent on failure).
pub async fn invocation<T, F>(
    name: &'static str,
    kind: SpanKind,
    traceparent: Option<String>,
    attributes: Vec<KeyValue>,
    f: F,
) -> crate::error::Result<T>
where
    F: std::future::Future<Output = crate::error::Result<T>>,
{
    let trigger =
        attributes.iter().find(|kv| kv.key.as_str() == "faas.trigger").map(|kv| kv.value.as_str().into_owned()).unwrap_or_default();
    let started = std::time::Instant::now();
    let tracer = opentelemetry::global::tracer_provider().tracer("deploychain");
    let parent = parent(traceparent.as_deref(), None);
    let span = tracer.span_builder(name).with_kind(kind).with_attributes(attributes).start_with_context(&tracer, &parent);
    let cx = parent.with_span(span);
    let result = CURRENT.scope(Invocation(cx.clone()), f).await;
    let span = cx.span();
    match &result {
        Ok(_) => span.set_status(Status::Ok),
        Err(e) => {
            span.set_attribute(KeyValue::new("error.type", if e.is_transient() { "transient" } else { "permanent" }));
            span.set_status(Status::error(e.to_string()));
        }
    }
    span.end();
    let outcome = match &result {
        Ok(_) => "ok",
        Err(e) if e.is_transient() => "transient",
        Err(_) => "permanent",
    };
    crate::metrics::step_duration(name, &trigger, outcome, started.elapsed().as_secs_f64());
    result
}

/// Attributes of a run-scoped event (`cicd.*`, `cloudevents.*`).
pub fn event_attributes(ev: &deploychain_events::DeployEvent, function: &str) -> Vec<KeyValue> {
    vec![
        KeyValue::new("cicd.pipeline.name", ev.data.app().to_string()),
        KeyValue::new("cicd.pipeline.run.id", ev.run_id.clone()),
        KeyValue::new("cicd.pipeline.task.name", function.to_string()),
        KeyValue::new("cloudevents.event_id", ev.id.clone()),
        KeyValue::new("cloudevents.event_type", ev.event_type().as_str().to_string()),
        KeyValue::new("cloudevents.event_source", ev.source.clone()),
        KeyValue::new("cloudevents.event_subject", ev.run_id.clone()),
    ]
}
