//! One TLS configuration for every outbound HTTP client of the handler (ARM, Service Bus, Table
//! Storage, the CI systems, acceptance checks, notifications, telemetry).
//!
//! OpenSSL reads and parses the system's CA bundle each time a TLS connector is built; that is
//! tens of milliseconds and a megabyte or two of memory per client, and the handler builds a
//! dozen clients at start. Building the connector once, and handing it to every client, makes a
//! start one read of the bundle; [`warm`] starts that read on its own thread at the top of `main`,
//! so it overlaps with reading the configuration and the policy.

use std::sync::OnceLock;
use std::time::Duration;

static TLS: OnceLock<Result<native_tls::TlsConnector, String>> = OnceLock::new();

/// The shared TLS connector (built on first use).
pub fn tls() -> Result<native_tls::TlsConnector, String> {
    TLS.get_or_init(|| native_tls::TlsConnector::builder().build().map_err(|e| format!("TLS: {e}"))).clone()
}

/// Build the TLS connector now, on another thread.
pub fn warm() {
    let _ = std::thread::Builder::new().name("tls-warm".into()).spawn(|| {
        let _ = tls();
    });
}

/// A reqwest client builder on the shared TLS connector (if it could not be built, on reqwest's
/// own, whose build then reports the same error).
pub fn builder() -> reqwest::ClientBuilder {
    let b = reqwest::Client::builder().user_agent(concat!("deploychain/", env!("CARGO_PKG_VERSION")));
    match tls() {
        Ok(t) => b.use_preconfigured_tls(t),
        Err(_) => b,
    }
}

/// The same for reqwest 0.13 (azure_core 1.x and the Application Insights exporter use it).
pub fn builder_013() -> reqwest_013::ClientBuilder {
    let b = reqwest_013::Client::builder();
    match tls() {
        Ok(t) => b.use_preconfigured_tls(t),
        Err(_) => b,
    }
}

/// The blocking reqwest 0.13 client (the metrics exporter's).
pub fn blocking_builder_013() -> reqwest_013::blocking::ClientBuilder {
    let b = reqwest_013::blocking::Client::builder();
    match tls() {
        Ok(t) => b.use_preconfigured_tls(t),
        Err(_) => b,
    }
}

/// The Service Bus client's transport: pooled connections (azure_core's own client turns pooling
/// off, so every publish would open a new connection and, in Azure, a new TLS session), closed
/// after 30 s idle, well before the service drops them. Header names go out in Title-Case over
/// HTTP/1.1: application properties travel as headers, and this is the only way this stack can
/// send `Diagnostic-Id` as the Azure SDKs and the Functions host look it up (exactly) to correlate
/// a trigger with its sender; lower case (`diagnostic-id`) is all it could send otherwise
/// (decision 0004). Our own readers match property names in any case.
pub fn service_bus_http() -> Result<std::sync::Arc<dyn azure_core::HttpClient>, String> {
    let c = builder()
        .http1_title_case_headers()
        .pool_idle_timeout(Duration::from_secs(30))
        .timeout(Duration::from_secs(60))
        .build()
        .map_err(|e| format!("Service Bus HTTP client: {e}"))?;
    Ok(std::sync::Arc::new(c))
}
