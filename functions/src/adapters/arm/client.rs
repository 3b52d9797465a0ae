//! A thin Azure Resource Manager REST client for the few VM scale set operations a rollout uses
//! (decision 0007): `reqwest` with `serde_json::Value` bodies, a bearer token per request, bounded
//! retries of throttling and server errors, and long-running operations followed to their end.
//!
//! - Retried in place with exponential backoff, honouring `Retry-After` / `x-ms-retry-after-ms`
//!   (`retry-after-ms`): 429, 409 (another operation in progress), 5xx and connection errors —
//!   but only while the wait is short ([`RetryPolicy::max_wait`]): an invocation is short and
//!   bounded (decision 0023). A longer `Retry-After` ends the request at once as
//!   [`ArmError::Throttled`], carrying the wait, so the step schedules itself after it; after the
//!   last attempt the others are [`ArmError::Transient`].
//! - 412 is [`ArmError::PreconditionFailed`] (the caller re-reads and decides again); 404 is
//!   [`ArmError::NotFound`]; every other 4xx is [`ArmError::Failed`], with ARM's error code and message.
//! - Long-running operations: `Azure-AsyncOperation` is polled until `Succeeded` / `Failed` /
//!   `Canceled` (honouring its `Retry-After`); a `Location`-only 202 is polled until it stops
//!   answering 202; a PATCH answered without either is followed through the resource's
//!   `provisioningState`.
//! - Operation and next-page links are only followed on the endpoint's own origin, so a token is
//!   never sent anywhere else. Error texts never contain the token.

use super::credential::{ARM_SCOPE, TokenSource};
use opentelemetry::KeyValue;
use opentelemetry::trace::Span as _;
use reqwest::Method;
use reqwest::header::HeaderMap;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use url::Url;

/// The Microsoft.Compute API version every request uses.
pub const API_VERSION: &str = "2024-07-01";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArmError {
    /// Worth trying again later: throttled, ARM or the network unavailable (retries exhausted), no token.
    #[error("{0}")]
    Transient(String),
    /// Transient, and ARM asked for a wait longer than a request waits in place: try after it.
    #[error("{0} (retry after {after})", after = human(*.1))]
    Throttled(String, Duration),
    /// 412: the resource changed since it was read (`If-Match` no longer matches).
    #[error("{0}")]
    PreconditionFailed(String),
    /// 404.
    #[error("{0}")]
    NotFound(String),
    /// Permanent: refused by ARM, or a long-running operation that ended `Failed` / `Canceled`.
    #[error("{0}")]
    Failed(String),
}

impl ArmError {
    pub fn is_transient(&self) -> bool {
        matches!(self, ArmError::Transient(_) | ArmError::Throttled(..))
    }

    /// The crate error: transient ones keep ARM's wait; the rest are `Transient` too when
    /// `what` failing is worth another try, else refused.
    pub fn into_error(self, what: &str) -> crate::error::Error {
        use crate::error::Error;
        match self {
            ArmError::Transient(m) | ArmError::PreconditionFailed(m) => Error::Transient(format!("{what}: {m}")),
            ArmError::Throttled(m, after) => Error::Throttled(format!("{what}: {m}"), after),
            ArmError::NotFound(m) | ArmError::Failed(m) => Error::Refused(format!("{what}: {m}")),
        }
    }
}

/// How often and how long one request is retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts per request, the first included (≥ 1).
    pub max_attempts: u32,
    /// Backoff before the second attempt; doubles after each further one.
    pub base: Duration,
    /// Longest wait taken in place. A server's `Retry-After` beyond it ends the request as
    /// [`ArmError::Throttled`] (the step is scheduled again after it), never a long sleep.
    pub max_wait: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { max_attempts: 4, base: Duration::from_millis(500), max_wait: Duration::from_secs(4) }
    }
}

/// One answered request.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    /// The JSON body; `Null` when empty or not JSON.
    pub body: Value,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim).filter(|v| !v.is_empty())
    }
}

/// A long-running operation a later step looks at: what ARM said to poll. Links are on the
/// endpoint's own origin (checked when made, and again when followed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum Operation {
    /// `Azure-AsyncOperation`: its `status` until `Succeeded`, `Failed` or `Canceled`.
    AsyncOperation { url: String },
    /// The `Location` of a 202: until it stops answering 202.
    Location { url: String },
    /// A PATCH answered with neither: the resource's `provisioningState`.
    Provisioning { id: String },
}

/// What one look at an [`Operation`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OperationState {
    /// Still running; ARM's `Retry-After`, when it gave one.
    Running(Option<Duration>),
    Succeeded,
    Failed(String),
}

/// One instance of a scale set, as `virtualMachines` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub instance_id: String,
    pub name: String,
    pub latest_model_applied: bool,
}

pub struct ArmClient {
    http: reqwest::Client,
    endpoint: Url,
    tokens: Arc<dyn TokenSource>,
    retry: RetryPolicy,
    poll_interval: Duration,
    operation_timeout: Duration,
}

impl ArmClient {
    pub fn new(
        endpoint: Url,
        tokens: Arc<dyn TokenSource>,
        retry: RetryPolicy,
        poll_interval: Duration,
        operation_timeout: Duration,
        request_timeout: Duration,
    ) -> Result<ArmClient, String> {
        let http = crate::outbound::builder().timeout(request_timeout).build().map_err(|e| format!("ARM HTTP client: {e}"))?;
        Ok(ArmClient { http, endpoint, tokens, retry, poll_interval, operation_timeout })
    }

    pub fn poll_interval(&self) -> Duration {
        self.poll_interval
    }

    /// `{endpoint}{id}{suffix}?api-version=…`
    pub fn url(&self, id: &str, suffix: &str) -> Url {
        let mut u = self.endpoint.clone();
        let path = format!("{}/{}{}", self.endpoint.path().trim_end_matches('/'), id.trim_start_matches('/'), suffix);
        u.set_path(&path);
        u.set_query(None);
        u.query_pairs_mut().append_pair("api-version", API_VERSION);
        u
    }

    /// `{endpoint}{id}{suffix}?api-version={api_version}`, for resource providers other than Compute.
    pub fn url_api(&self, id: &str, suffix: &str, api_version: &str) -> Url {
        let mut u = self.url(id, suffix);
        u.set_query(None);
        u.query_pairs_mut().append_pair("api-version", api_version);
        u
    }

    /// Follow an accepted request's long-running operation (`Azure-AsyncOperation` or a 202's
    /// `Location`) to its end.
    pub async fn wait_operation(&self, what: &str, answer: &Answer) -> Result<(), ArmError> {
        self.wait(what, answer, None).await
    }

    /// A link ARM returned (operation status, `Location`, `nextLink`), only on the endpoint's origin.
    fn link(&self, what: &str, link: &str) -> Result<Url, ArmError> {
        let u = self.endpoint.join(link).map_err(|e| ArmError::Failed(format!("{what}: `{link}` is not a URL: {e}")))?;
        if u.origin() != self.endpoint.origin() {
            return Err(ArmError::Failed(format!(
                "{what}: `{}` is not on the ARM endpoint {}; not following it with a token",
                u.origin().ascii_serialization(),
                self.endpoint.origin().ascii_serialization()
            )));
        }
        Ok(u)
    }

    /// Send one request, retrying what is worth retrying. A 2xx is an [`Answer`]; anything else an error.
    pub async fn send(&self, method: Method, url: &Url, if_match: Option<&str>, body: Option<&Value>) -> Result<Answer, ArmError> {
        let what = format!("{method} {}", url.path());
        let attempts = self.retry.max_attempts.max(1);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let token = self.tokens.token(ARM_SCOPE).await.map_err(|e| ArmError::Transient(format!("{what}: {}", e.detail())))?;
            let mut req = self.http.request(method.clone(), url.clone()).bearer_auth(&token).header("Accept", "application/json");
            if let Some(etag) = if_match {
                req = req.header("If-Match", etag);
            }
            if let Some(b) = body {
                req = req.json(b);
            }
            // One client span per attempt, as the HTTP conventions have it.
            let mut span = crate::telemetry::client_span(
                format!("{method} {}", url.path()),
                vec![
                    KeyValue::new("http.request.method", method.to_string()),
                    KeyValue::new("server.address", url.host_str().unwrap_or_default().to_string()),
                    KeyValue::new("url.full", url.to_string()),
                    KeyValue::new("http.request.resend_count", i64::from(attempt - 1)),
                    KeyValue::new("az.namespace", "Microsoft.Compute"),
                ],
            );
            let sent = req.send().await;
            match &sent {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    span.set_attribute(KeyValue::new("http.response.status_code", i64::from(status)));
                    if status >= 400 {
                        span.set_attribute(KeyValue::new("error.type", status.to_string()));
                        span.set_status(opentelemetry::trace::Status::error(status.to_string()));
                    }
                }
                Err(_) => {
                    span.set_attribute(KeyValue::new("error.type", "transport"));
                    span.set_status(opentelemetry::trace::Status::error("transport error"));
                }
            }
            span.end();
            let (retryable, wait, err) = match sent {
                Err(e) => (true, None, ArmError::Transient(format!("{what}: {}", e.without_url()))),
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let headers = resp.headers().clone();
                    let text = resp.text().await.unwrap_or_default();
                    let body = if text.trim().is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::Null) };
                    if (200..300).contains(&status) {
                        return Ok(Answer { status, headers, body });
                    }
                    let msg = redact(format!("{what}: {status} {}", error_text(&body, &text)), &token);
                    match status {
                        412 => return Err(ArmError::PreconditionFailed(msg)),
                        404 => return Err(ArmError::NotFound(msg)),
                        409 | 429 | 500..=599 => (true, retry_after(&headers), ArmError::Transient(msg)),
                        _ => (false, None, ArmError::Failed(msg)),
                    }
                }
            };
            if let (true, Some(asked), ArmError::Transient(m)) = (retryable, wait, &err)
                && asked > self.retry.max_wait
            {
                return Err(ArmError::Throttled(m.clone(), asked));
            }
            if !retryable || attempt >= attempts {
                return Err(match (wait, err) {
                    (Some(asked), ArmError::Transient(m)) => ArmError::Throttled(m, asked),
                    (_, e) => e,
                });
            }
            let wait = wait.unwrap_or_else(|| backoff(&self.retry, attempt)).min(self.retry.max_wait);
            tracing::warn!(request = what, attempt, wait_ms = wait.as_millis() as u64, error = %err, "ARM request will be retried");
            tokio::time::sleep(wait).await;
        }
    }

    /// GET a scale set: its body and ETag (header, else the body's `etag`).
    pub async fn get(&self, id: &str) -> Result<(Value, Option<String>), ArmError> {
        let a = self.send(Method::GET, &self.url(id, ""), None, None).await?;
        let etag = a.header("etag").map(str::to_string).or_else(|| a.body["etag"].as_str().map(str::to_string));
        Ok((a.body, etag))
    }

    /// PATCH a scale set's model, conditionally on `etag` (`If-Match`). An `Ok` means ARM accepted
    /// the change; [`ArmClient::operation`] says what to follow of it.
    pub async fn patch(&self, id: &str, etag: Option<&str>, patch: &Value) -> Result<Answer, ArmError> {
        self.send(Method::PATCH, &self.url(id, ""), etag, Some(patch)).await
    }

    /// Every instance of a scale set (following `nextLink`).
    pub async fn instances(&self, id: &str) -> Result<Vec<Instance>, ArmError> {
        let mut out = Vec::new();
        let mut url = self.url(id, "/virtualMachines");
        for _page in 0..1000 {
            let a = self.send(Method::GET, &url, None, None).await?;
            for vm in a.body["value"].as_array().into_iter().flatten() {
                let Some(instance_id) = vm["instanceId"]
                    .as_str()
                    .map(str::to_string)
                    .or_else(|| vm["id"].as_str().and_then(|i| i.rsplit('/').next()).filter(|s| !s.is_empty()).map(str::to_string))
                else {
                    continue;
                };
                out.push(Instance {
                    name: vm["name"].as_str().map(str::to_string).unwrap_or_else(|| instance_id.clone()),
                    instance_id,
                    latest_model_applied: vm["properties"]["latestModelApplied"].as_bool().unwrap_or(false),
                });
            }
            match a.body["nextLink"].as_str().filter(|l| !l.is_empty()) {
                Some(next) => url = self.link("nextLink", next)?,
                None => return Ok(out),
            }
        }
        Err(ArmError::Failed(format!("GET {}/virtualMachines: more than 1000 pages", url.path())))
    }

    /// POST `manualUpgrade` for these instances; the answer names the operation to follow
    /// ([`ArmClient::operation`]).
    pub async fn start_manual_upgrade(&self, id: &str, instance_ids: &[String]) -> Result<Answer, ArmError> {
        let body = json!({ "instanceIds": instance_ids });
        self.send(Method::POST, &self.url(id, "/manualUpgrade"), None, Some(&body)).await
    }

    /// What is left to follow of an accepted request, and when to look first: `None` when the
    /// answer says it is over (or it failed at once: then the error). `resource` is the scale set
    /// whose `provisioningState` tells the end when the answer names no operation (PATCH).
    pub fn operation(&self, what: &str, answer: &Answer, resource: Option<&str>) -> Result<Option<(Operation, Duration)>, ArmError> {
        let first = retry_after(&answer.headers).unwrap_or(self.poll_interval);
        if let Some(op) = answer.header("azure-asyncoperation") {
            return Ok(Some((Operation::AsyncOperation { url: self.link(what, op)?.to_string() }, first)));
        }
        if answer.status == 202
            && let Some(loc) = answer.header("location")
        {
            return Ok(Some((Operation::Location { url: self.link(what, loc)?.to_string() }, first)));
        }
        let state = provisioning_state(&answer.body);
        match resource {
            Some(id) if answer.status == 201 || answer.status == 202 || state.as_deref().is_some_and(|s| !is_terminal(s)) => {
                Ok(Some((Operation::Provisioning { id: id.to_string() }, first)))
            }
            _ if state.as_deref().is_some_and(|s| s.eq_ignore_ascii_case("failed")) => {
                Err(ArmError::Failed(format!("{what} ended Failed{}", error_suffix(&answer.body["properties"]))))
            }
            _ => Ok(None),
        }
    }

    /// One look at a long-running operation: one request, no waiting.
    pub async fn look(&self, what: &str, op: &Operation) -> Result<OperationState, ArmError> {
        let later = |a: &Answer| OperationState::Running(retry_after(&a.headers));
        match op {
            Operation::AsyncOperation { url } => {
                let a = self.send(Method::GET, &self.link(what, url)?, None, None).await?;
                let status = a.body["status"].as_str().unwrap_or("InProgress");
                Ok(match status.to_ascii_lowercase().as_str() {
                    "succeeded" => OperationState::Succeeded,
                    "failed" | "canceled" | "cancelled" => {
                        OperationState::Failed(format!("{what} ended {status}{}", error_suffix(&a.body)))
                    }
                    _ => later(&a),
                })
            }
            Operation::Location { url } => match self.send(Method::GET, &self.link(what, url)?, None, None).await {
                Ok(a) if a.status == 202 => Ok(later(&a)),
                Ok(_) => Ok(OperationState::Succeeded),
                Err(ArmError::Failed(m) | ArmError::NotFound(m)) => Ok(OperationState::Failed(format!("{what} failed: {m}"))),
                Err(e) => Err(e),
            },
            Operation::Provisioning { id } => {
                let a = self.send(Method::GET, &self.url(id, ""), None, None).await?;
                Ok(match provisioning_state(&a.body) {
                    Some(s) if s.eq_ignore_ascii_case("succeeded") => OperationState::Succeeded,
                    Some(s) if is_terminal(&s) => {
                        OperationState::Failed(format!("{what} ended {s}{}", error_suffix(&a.body["properties"])))
                    }
                    None => OperationState::Succeeded,
                    Some(_) => later(&a),
                })
            }
        }
    }

    /// An instance's Application Health state (`HealthState/healthy`, …), `None` when it reports none.
    pub async fn health(&self, id: &str, instance_id: &str) -> Result<Option<String>, ArmError> {
        let a = self.send(Method::GET, &self.url(id, &format!("/virtualMachines/{instance_id}/instanceView")), None, None).await?;
        Ok(a.body["vmHealth"]["status"]["code"].as_str().map(str::to_string))
    }

    /// The latest rolling upgrade of a scale set (`None` when it never had one).
    pub async fn latest_rolling_upgrade(&self, id: &str) -> Result<Option<Value>, ArmError> {
        match self.send(Method::GET, &self.url(id, "/rollingUpgrades/latest"), None, None).await {
            Ok(a) => Ok(Some(a.body)),
            Err(ArmError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Follow a long-running operation started by `answer` to its end. `resource` is the scale set
    /// whose `provisioningState` tells the end when the answer names no operation (PATCH).
    async fn wait(&self, what: &str, answer: &Answer, resource: Option<&str>) -> Result<(), ArmError> {
        let first_wait = retry_after(&answer.headers).unwrap_or(self.poll_interval);
        if let Some(op) = answer.header("azure-asyncoperation") {
            let url = self.link(what, op)?;
            return self.poll_operation(what, url, first_wait).await;
        }
        if answer.status == 202
            && let Some(loc) = answer.header("location")
        {
            let url = self.link(what, loc)?;
            return self.poll_location(what, url, first_wait).await;
        }
        let state = provisioning_state(&answer.body);
        match resource {
            Some(id) if answer.status == 201 || answer.status == 202 || state.as_deref().is_some_and(|s| !is_terminal(s)) => {
                self.poll_provisioning(what, id, first_wait).await
            }
            _ if state.as_deref().is_some_and(|s| s.eq_ignore_ascii_case("failed")) => {
                Err(ArmError::Failed(format!("{what} ended Failed{}", error_suffix(&answer.body["properties"]))))
            }
            _ => Ok(()),
        }
    }

    async fn poll_operation(&self, what: &str, url: Url, mut wait: Duration) -> Result<(), ArmError> {
        let deadline = tokio::time::Instant::now() + self.operation_timeout;
        loop {
            self.sleep_until_deadline(what, wait, deadline).await?;
            let a = self.send(Method::GET, &url, None, None).await?;
            let status = a.body["status"].as_str().unwrap_or("InProgress");
            match status.to_ascii_lowercase().as_str() {
                "succeeded" => return Ok(()),
                "failed" | "canceled" | "cancelled" => {
                    return Err(ArmError::Failed(format!("{what} ended {status}{}", error_suffix(&a.body))));
                }
                _ => wait = retry_after(&a.headers).unwrap_or(self.poll_interval),
            }
        }
    }

    async fn poll_location(&self, what: &str, url: Url, mut wait: Duration) -> Result<(), ArmError> {
        let deadline = tokio::time::Instant::now() + self.operation_timeout;
        loop {
            self.sleep_until_deadline(what, wait, deadline).await?;
            let a = self.send(Method::GET, &url, None, None).await.map_err(|e| match e {
                // An operation that failed answers its Location with the failure.
                ArmError::Failed(m) | ArmError::NotFound(m) => ArmError::Failed(format!("{what} failed: {m}")),
                other => other,
            })?;
            if a.status != 202 {
                return Ok(());
            }
            wait = retry_after(&a.headers).unwrap_or(self.poll_interval);
        }
    }

    async fn poll_provisioning(&self, what: &str, id: &str, mut wait: Duration) -> Result<(), ArmError> {
        let deadline = tokio::time::Instant::now() + self.operation_timeout;
        loop {
            self.sleep_until_deadline(what, wait, deadline).await?;
            let a = self.send(Method::GET, &self.url(id, ""), None, None).await?;
            match provisioning_state(&a.body) {
                Some(s) if s.eq_ignore_ascii_case("succeeded") => return Ok(()),
                Some(s) if is_terminal(&s) => {
                    return Err(ArmError::Failed(format!("{what} ended {s}{}", error_suffix(&a.body["properties"]))));
                }
                None => return Ok(()),
                Some(_) => wait = retry_after(&a.headers).unwrap_or(self.poll_interval),
            }
        }
    }

    async fn sleep_until_deadline(&self, what: &str, wait: Duration, deadline: tokio::time::Instant) -> Result<(), ArmError> {
        if tokio::time::Instant::now() + wait > deadline {
            return Err(ArmError::Failed(format!("{what} did not finish within {}", human(self.operation_timeout))));
        }
        tokio::time::sleep(wait).await;
        Ok(())
    }
}

/// `properties.provisioningState`.
pub fn provisioning_state(body: &Value) -> Option<String> {
    body["properties"]["provisioningState"].as_str().map(str::to_string)
}

fn is_terminal(state: &str) -> bool {
    ["succeeded", "failed", "canceled", "cancelled"].iter().any(|s| state.eq_ignore_ascii_case(s))
}

/// `: CODE: message` from an `error` object (ARM error body or operation status), or nothing.
fn error_suffix(body: &Value) -> String {
    let e = &body["error"];
    match (e["code"].as_str(), e["message"].as_str()) {
        (Some(c), Some(m)) => format!(": {c}: {m}"),
        (Some(c), None) => format!(": {c}"),
        (None, Some(m)) => format!(": {m}"),
        (None, None) => String::new(),
    }
}

/// ARM's `{"error":{"code","message"}}` as `CODE: message`, else the start of the body.
fn error_text(body: &Value, text: &str) -> String {
    let suffix = error_suffix(body);
    if let Some(s) = suffix.strip_prefix(": ") {
        return s.to_string();
    }
    let t: String = text.trim().chars().take(300).collect();
    if t.is_empty() { "(no error body)".into() } else { t }
}

/// `Retry-After` (seconds), or `x-ms-retry-after-ms` / `retry-after-ms` (milliseconds).
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let get = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).map(str::trim).and_then(|v| v.parse::<u64>().ok());
    get("x-ms-retry-after-ms")
        .or_else(|| get("retry-after-ms"))
        .map(Duration::from_millis)
        .or_else(|| get("retry-after").map(Duration::from_secs))
}

fn backoff(p: &RetryPolicy, attempt: u32) -> Duration {
    p.base.saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
}

/// Remove a token from a text that might echo it (an error body quoting the request).
pub fn redact(text: String, token: &str) -> String {
    if !token.is_empty() && text.contains(token) { text.replace(token, "<redacted>") } else { text }
}

/// `1500ms`, `30s`, `10m`.
pub fn human(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(60_000) && ms > 0 {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_headers_are_read() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert("retry-after", "3".parse().expect("header"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        h.insert("x-ms-retry-after-ms", "250".parse().expect("header"));
        assert_eq!(retry_after(&h), Some(Duration::from_millis(250)));
    }

    #[test]
    fn errors_carry_code_and_message() {
        let body = json!({"error": {"code": "OperationNotAllowed", "message": "nope"}});
        assert_eq!(error_text(&body, ""), "OperationNotAllowed: nope");
        assert_eq!(error_text(&Value::Null, "<html>bad gateway</html>"), "<html>bad gateway</html>");
        assert_eq!(redact("Bearer abcdef leaked".into(), "abcdef"), "Bearer <redacted> leaked");
    }

    #[test]
    fn backoff_doubles() {
        let p = RetryPolicy { max_attempts: 5, base: Duration::from_millis(100), max_wait: Duration::from_secs(1) };
        assert_eq!(backoff(&p, 1), Duration::from_millis(100));
        assert_eq!(backoff(&p, 3), Duration::from_millis(400));
        assert_eq!(human(Duration::from_secs(600)), "10m");
        assert_eq!(human(Duration::from_millis(50)), "50ms");
    }
}
