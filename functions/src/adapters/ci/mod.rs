//! Starting CI builds: the [`BuildSystem`] the pipeline policy selects per app — GitHub Actions
//! (`workflow_dispatch`), Azure Pipelines (the Runs API) or Jenkins (`buildWithParameters`). Each
//! passes the deploychain run id and the commit as inputs, so the build's report (GitHub
//! `workflow_run`, Azure DevOps `build.complete`, the Jenkins Notification plugin) comes back to
//! the run it belongs to.
//!
//! - Transient failures (connection errors, 429, 5xx) are retried here with exponential backoff,
//!   honouring `Retry-After`; when the attempts are spent the step fails and its message is
//!   redelivered.
//! - Permanent refusals (401, 403, 404 on the pipeline, 400/422 on the inputs) are
//!   [`Error::Refused`] with the provider's own message: the push step ends the run with it.
//! - Credentials (tokens, keys, PATs) are secrets: never logged, never put in an error.
//! - An app whose policy says `trigger = "push"` is built by its repository on its own; nothing is
//!   dispatched for it.

pub mod azure_pipelines;
pub mod github;
pub mod jenkins;

use super::{BuildRequest, BuildStarted, BuildSystem};
use crate::error::{Error, Result};
use async_trait::async_trait;
use deploychain_events::BuildProvider;
use opentelemetry::KeyValue;
use opentelemetry::trace::Span as _;
use reqwest::header::HeaderMap;
use serde_json::Value;
use std::time::Duration;

/// How often and how long one CI request is retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retry {
    /// Attempts, the first included (≥ 1).
    pub attempts: u32,
    /// Wait before the second attempt; doubles after each further one.
    pub base: Duration,
    /// The longest single wait (caps `Retry-After` too).
    pub max_wait: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Retry { attempts: 4, base: Duration::from_millis(500), max_wait: Duration::from_secs(30) }
    }
}

/// One answered CI request.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub text: String,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or(Value::Null)
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim).filter(|v| !v.is_empty())
    }
}

/// The provider's message in an error answer: GitHub and Azure DevOps `message`, Jenkins' HTML
/// title or first line; at most 300 characters.
pub fn provider_message(text: &str) -> String {
    let v: Value = serde_json::from_str(text).unwrap_or(Value::Null);
    let msg = v["message"]
        .as_str()
        .or_else(|| v["error"]["message"].as_str())
        .map(str::to_string)
        .or_else(|| {
            let lower = text.to_ascii_lowercase();
            let start = lower.find("<title>")? + 7;
            let end = lower[start..].find("</title>")? + start;
            Some(text[start..end].trim().to_string())
        })
        .unwrap_or_else(|| text.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("").to_string());
    msg.chars().take(300).collect()
}

/// Send a request built by `build` (called once per attempt), retrying what is worth retrying.
/// A 2xx is an [`Answer`]; a permanent refusal is [`Error::Refused`] naming `what` and the
/// provider's message; anything else, after the attempts, [`Error::Transient`]. `secrets` are
/// removed from any message.
pub async fn send(
    retry: &Retry,
    provider: &str,
    what: &str,
    secrets: &[&str],
    build: impl Fn() -> reqwest::RequestBuilder,
) -> Result<Answer> {
    let attempts = retry.attempts.max(1);
    let clean = |s: String| secrets.iter().filter(|x| x.len() >= 4).fold(s, |s, x| s.replace(x, "<redacted>"));
    let mut attempt = 0;
    loop {
        attempt += 1;
        let req = build();
        let (method, url) = match req.try_clone().and_then(|r| r.build().ok()) {
            Some(r) => (r.method().to_string(), r.url().clone()),
            None => (String::new(), url::Url::parse("http://invalid/").unwrap_or_else(|_| unreachable!("a valid URL"))),
        };
        let mut span = crate::telemetry::client_span(
            format!("{method} {}", url.path()),
            vec![
                KeyValue::new("http.request.method", method.clone()),
                KeyValue::new("server.address", url.host_str().unwrap_or_default().to_string()),
                KeyValue::new("url.path", url.path().to_string()),
                KeyValue::new("http.request.resend_count", i64::from(attempt - 1)),
                KeyValue::new("cicd.system", provider.to_string()),
            ],
        );
        let sent = req.send().await;
        let (retryable, wait, message) = match sent {
            Err(e) => {
                span.set_attribute(KeyValue::new("error.type", "transport"));
                span.end();
                (true, None, clean(format!("{provider}: {what}: {}", e.without_url())))
            }
            Ok(resp) => {
                let status = resp.status().as_u16();
                span.set_attribute(KeyValue::new("http.response.status_code", i64::from(status)));
                let headers = resp.headers().clone();
                let text = resp.text().await.unwrap_or_default();
                // Azure DevOps answers a bad PAT with 203 and its sign-in page.
                let sign_in = status == 203 && !text.trim_start().starts_with(['{', '[']);
                if (200..300).contains(&status) && !sign_in {
                    span.end();
                    return Ok(Answer { status, headers, text });
                }
                span.set_attribute(KeyValue::new("error.type", status.to_string()));
                span.end();
                let msg = clean(format!(
                    "{provider}: {what}: {} {}",
                    if sign_in { 401 } else { status },
                    if sign_in { "the credential was not accepted (sign-in page)".to_string() } else { provider_message(&text) }
                ));
                let retry_after = headers
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                // GitHub's secondary rate limit is a 403 with Retry-After or a zero remaining quota.
                let rate_limited = status == 403
                    && (retry_after.is_some() || headers.get("x-ratelimit-remaining").and_then(|v| v.to_str().ok()) == Some("0"));
                match status {
                    429 | 500..=599 => (true, retry_after, msg),
                    _ if rate_limited => (true, retry_after, msg),
                    _ => return Err(Error::Refused(msg)),
                }
            }
        };
        if !retryable || attempt >= attempts {
            return Err(Error::Transient(format!("{message} (after {attempt} attempt(s))")));
        }
        let backoff = retry.base.saturating_mul(1 << (attempt - 1).min(10));
        tokio::time::sleep(wait.unwrap_or(backoff).min(retry.max_wait)).await;
    }
}

/// What a path segment must escape (RFC 3986 pchar): everything but unreserved characters and
/// the sub-delimiters a name may hold.
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'\\')
    .add(b'^')
    .add(b'`')
    .add(b'{')
    .add(b'|')
    .add(b'}');

/// One path segment, escaped.
pub fn segment(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, SEGMENT).to_string()
}

/// The HTTP client the CI adapters share.
pub fn http_client(timeout: Duration) -> std::result::Result<reqwest::Client, String> {
    crate::outbound::builder().timeout(timeout).build().map_err(|e| format!("CI HTTP client: {e}"))
}

/// The build systems the handler can start builds on; `None` where the provider is not configured
/// (start-up refuses a policy that needs one, see `Config::check_against`).
#[derive(Default)]
pub struct CiBuilds {
    pub github: Option<github::GitHubActions>,
    pub azure_pipelines: Option<azure_pipelines::AzurePipelines>,
    pub jenkins: Option<jenkins::Jenkins>,
}

impl CiBuilds {
    /// The adapters the settings configure.
    pub fn from_config(c: &crate::config::CiConfig) -> std::result::Result<CiBuilds, String> {
        use crate::config::{DevOpsCredential, GitHubCredential};
        let timeout = Duration::from_secs(30);
        let github = match &c.github {
            None => None,
            Some(g) => {
                let auth = match &g.auth {
                    GitHubCredential::Token(t) => github::GitHubAuth::Token(t.clone()),
                    GitHubCredential::App { app_id, private_key, installation_id } => {
                        github::GitHubAuth::app(app_id, private_key.expose(), installation_id)?
                    }
                };
                Some(github::GitHubActions::new(g.api.clone(), auth, Retry::default(), timeout)?)
            }
        };
        let azure_pipelines = match &c.azure_pipelines {
            None => None,
            Some(a) => {
                let auth = match &a.credential {
                    DevOpsCredential::Pat(p) => azure_pipelines::DevOpsAuth::Pat(p.clone()),
                    DevOpsCredential::Entra(cred) => azure_pipelines::DevOpsAuth::Entra(crate::adapters::arm::token_source(cred)?),
                };
                Some(azure_pipelines::AzurePipelines::new(a.org.clone(), a.project.clone(), auth, Retry::default(), timeout)?)
            }
        };
        let jenkins = match &c.jenkins {
            None => None,
            Some(j) => Some(jenkins::Jenkins::new(j.url.clone(), j.user.clone(), j.token.clone(), Retry::default(), timeout)?),
        };
        Ok(CiBuilds { github, azure_pipelines, jenkins })
    }
}

#[async_trait]
impl BuildSystem for CiBuilds {
    async fn request_build(&self, req: &BuildRequest) -> Result<BuildStarted> {
        if !req.dispatch {
            return Ok(BuildStarted::default());
        }
        let not_configured = |settings: &str| {
            Error::Refused(format!("app `{}` is built by {}, but {settings} is not set", req.app, req.provider.display_name()))
        };
        match req.provider {
            BuildProvider::GithubActions => {
                self.github.as_ref().ok_or_else(|| not_configured("GITHUB_TOKEN or GITHUB_APP_ID"))?.dispatch(req).await
            }
            BuildProvider::AzurePipelines => {
                self.azure_pipelines.as_ref().ok_or_else(|| not_configured("AZURE_DEVOPS_ORG_URL"))?.run(req).await
            }
            BuildProvider::Jenkins => self.jenkins.as_ref().ok_or_else(|| not_configured("JENKINS_URL"))?.build(req).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_providers_message_is_taken_from_json_or_html() {
        assert_eq!(provider_message(r#"{"message":"Not Found","documentation_url":"https://docs.github.com"}"#), "Not Found");
        assert_eq!(
            provider_message(r#"{"$id":"1","message":"The pipeline 42 was not found.","typeKey":"PipelineNotFoundException"}"#),
            "The pipeline 42 was not found."
        );
        assert_eq!(provider_message("<html><head><title>Error 404 Not Found</title></head></html>"), "Error 404 Not Found");
        assert_eq!(provider_message("\n  plain text\nmore"), "plain text");
        assert_eq!(provider_message(&"x".repeat(1000)).len(), 300);
    }
}
