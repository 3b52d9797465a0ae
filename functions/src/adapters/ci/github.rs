//! GitHub Actions: `POST {api}/repos/{owner}/{repo}/actions/workflows/{workflow}/dispatches` with
//! `{"ref": branch, "inputs": {"deploychain_run", "commit"}, "return_run_details": true}`.
//!
//! The workflow declares the two inputs, checks out `inputs.commit`, and names its run after the
//! deploychain run (`run-name: deploychain ${{ inputs.deploychain_run }}`): its `workflow_run`
//! webhook then names the run in `display_title`, which is how the report finds its run even when
//! the branch moved on between dispatch and checkout. GitHub answers 200 with the new run's id
//! (`workflow_run_id`, `html_url`); older servers (GHES) answer 204 without them.
//!
//! Credentials: a fine-grained token with `actions:write` on the repository (`GITHUB_TOKEN`), or a
//! GitHub App (`GITHUB_APP_ID`, `GITHUB_APP_PRIVATE_KEY` in PEM, `GITHUB_APP_INSTALLATION_ID`):
//! an RS256 JWT buys an installation token, cached until five minutes before it expires.

use super::{Retry, send};
use crate::adapters::{BuildRequest, BuildStarted};
use crate::config::Secret;
use crate::error::{Error, Result};
use base64::Engine;
use serde_json::json;
use std::time::Duration;

/// How the adapter authenticates to GitHub.
pub enum GitHubAuth {
    Token(Secret),
    App { app_id: String, private_key: openssl::pkey::PKey<openssl::pkey::Private>, installation_id: String },
}

impl std::fmt::Debug for GitHubAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GitHubAuth::Token(_) => f.write_str("GitHubAuth::Token(<redacted>)"),
            GitHubAuth::App { app_id, installation_id, .. } => write!(f, "GitHubAuth::App({app_id}, installation {installation_id})"),
        }
    }
}

impl GitHubAuth {
    /// A GitHub App from its id, PEM private key and installation id.
    pub fn app(app_id: &str, pem: &str, installation_id: &str) -> std::result::Result<GitHubAuth, String> {
        // A PEM stored in an app setting often has its newlines escaped.
        let pem = pem.replace("\\n", "\n");
        let private_key = openssl::pkey::PKey::private_key_from_pem(pem.as_bytes())
            .map_err(|_| "GITHUB_APP_PRIVATE_KEY: not a PEM private key".to_string())?;
        Ok(GitHubAuth::App { app_id: app_id.to_string(), private_key, installation_id: installation_id.to_string() })
    }
}

pub struct GitHubActions {
    http: reqwest::Client,
    api: url::Url,
    auth: GitHubAuth,
    retry: Retry,
    cached: tokio::sync::Mutex<Option<(Secret, i64)>>,
}

/// The JWT a GitHub App signs to ask for an installation token (RS256, ten minutes at most).
pub fn app_jwt(app_id: &str, key: &openssl::pkey::PKey<openssl::pkey::Private>, now: i64) -> Result<String> {
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let header = b64(br#"{"alg":"RS256","typ":"JWT"}"#);
    // Issued a minute early against clock drift, as GitHub recommends.
    let claims = b64(json!({ "iat": now - 60, "exp": now + 540, "iss": app_id }).to_string().as_bytes());
    let signing_input = format!("{header}.{claims}");
    let mut signer = openssl::sign::Signer::new(openssl::hash::MessageDigest::sha256(), key)
        .map_err(|e| Error::Transient(format!("GitHub App JWT: {e}")))?;
    signer.update(signing_input.as_bytes()).map_err(|e| Error::Transient(format!("GitHub App JWT: {e}")))?;
    let sig = signer.sign_to_vec().map_err(|e| Error::Transient(format!("GitHub App JWT: {e}")))?;
    Ok(format!("{signing_input}.{}", b64(&sig)))
}

impl GitHubActions {
    pub fn new(api: url::Url, auth: GitHubAuth, retry: Retry, timeout: Duration) -> std::result::Result<GitHubActions, String> {
        Ok(GitHubActions { http: super::http_client(timeout)?, api, auth, retry, cached: tokio::sync::Mutex::new(None) })
    }

    fn url(&self, path: &str) -> url::Url {
        let mut u = self.api.clone();
        u.set_path(&format!("{}/{}", self.api.path().trim_end_matches('/'), path.trim_start_matches('/')));
        u
    }

    fn request(&self, method: reqwest::Method, url: url::Url, bearer: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, url)
            .bearer_auth(bearer)
            .header("accept", "application/vnd.github+json")
            .header("x-github-api-version", "2022-11-28")
    }

    /// The bearer for repository calls: the token, or the App's installation token.
    async fn bearer(&self) -> Result<String> {
        let (app_id, key, installation) = match &self.auth {
            GitHubAuth::Token(t) => return Ok(t.expose().to_string()),
            GitHubAuth::App { app_id, private_key, installation_id } => (app_id, private_key, installation_id),
        };
        let mut cached = self.cached.lock().await;
        let now = chrono::Utc::now().timestamp();
        if let Some((t, _)) = cached.as_ref().filter(|(_, exp)| exp - 300 > now) {
            return Ok(t.expose().to_string());
        }
        let jwt = app_jwt(app_id, key, now)?;
        let url = self.url(&format!("app/installations/{installation}/access_tokens"));
        let a =
            send(&self.retry, "GitHub", "installation token", &[&jwt], || self.request(reqwest::Method::POST, url.clone(), &jwt)).await?;
        let v = a.json();
        let token = v["token"].as_str().ok_or_else(|| Error::Transient("GitHub: the installation token answer has no token".into()))?;
        let exp = v["expires_at"]
            .as_str()
            .and_then(|e| chrono::DateTime::parse_from_rfc3339(e).ok())
            .map(|e| e.timestamp())
            .unwrap_or(now + 3000);
        *cached = Some((Secret::new(token), exp));
        Ok(token.to_string())
    }

    /// Dispatch the app's workflow for the run.
    pub async fn dispatch(&self, req: &BuildRequest) -> Result<BuildStarted> {
        let workflow = req.pipeline.as_deref().unwrap_or("build.yml");
        let workflow = workflow.rsplit('/').next().unwrap_or(workflow);
        let (owner, repo) = req
            .repository
            .split_once('/')
            .ok_or_else(|| Error::Refused(format!("`{}` is not an owner/repo GitHub repository", req.repository)))?;
        let enc = super::segment;
        let url = self.url(&format!("repos/{}/{}/actions/workflows/{}/dispatches", enc(owner), enc(repo), enc(workflow)));
        let body = json!({
            "ref": req.branch,
            "inputs": { "deploychain_run": req.run_id, "commit": req.commit },
            "return_run_details": true,
        });
        let bearer = self.bearer().await?;
        let what = format!("dispatching workflow `{workflow}` of {}", req.repository);
        let a = send(&self.retry, "GitHub", &what, &[&bearer], || self.request(reqwest::Method::POST, url.clone(), &bearer).json(&body))
            .await?;
        let v = a.json();
        Ok(BuildStarted { build_id: v["workflow_run_id"].as_u64().map(|n| n.to_string()), url: v["html_url"].as_str().map(str::to_string) })
    }
}
