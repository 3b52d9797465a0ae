//! The local CI service: the parts of three CI systems' REST APIs the build adapters call, so a
//! local run starts its builds through the same adapters as in Azure.
//!
//! - GitHub (`GITHUB_API_URL` = `{base}/github`): `POST /repos/{owner}/{repo}/actions/workflows/{workflow}/dispatches`
//!   (bearer token), answered 200 with `workflow_run_id` when `return_run_details` is set, else 204.
//! - Azure DevOps (`AZURE_DEVOPS_ORG_URL` = `{base}/azdo/local`): `GET /{project}/_apis/pipelines`,
//!   `POST /{project}/_apis/pipelines/{id}/runs` (Basic `:PAT`), answered with the run.
//! - Jenkins (`JENKINS_URL` = `{base}/jenkins`): `GET /crumbIssuer/api/json`,
//!   `POST /job/{…}/buildWithParameters` (Basic user:token and the crumb), answered 201 with the
//!   queue item in `Location`.
//!
//! It refuses what the real services refuse (bad credentials 401, unknown workflow, pipeline or job
//! 404, missing inputs 422/400, no crumb 403), and a build it accepted reports back after
//! `build_delay` exactly as the service would: GitHub a signed `workflow_run` webhook, Azure DevOps
//! a `build.complete` service hook, Jenkins a Notification plugin message. Accepted builds are kept
//! in a file until reported, so a stopped stack reports them after its restart.

use crate::config::SimConfig;
use crate::secrets::Secrets;
use anyhow::{Context, Result};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use deploychain_events::BuildProvider;
use deploychain_functions::policy::{BuildTrigger, Policy};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The crumb field and value the local Jenkins issues.
pub const CRUMB_FIELD: &str = "Jenkins-Crumb";

/// One request the service received: method, path, the `Authorization` scheme and body.
#[derive(Debug, Clone, PartialEq)]
pub struct Received {
    pub method: String,
    pub path: String,
    pub authorization: Option<String>,
    pub body: String,
    pub status: u16,
}

/// A build that was accepted and has not reported yet.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Pending {
    provider: BuildProvider,
    build: u64,
    app: String,
    run: String,
    commit: String,
    branch: String,
    pipeline: String,
    fail: bool,
}

#[derive(Default)]
struct Inner {
    received: Vec<Received>,
    pending: Vec<Pending>,
    next: u64,
}

#[derive(Clone)]
pub struct LocalCi {
    inner: Arc<Mutex<Inner>>,
    file: PathBuf,
    policy: Arc<Policy>,
    secrets: Secrets,
    config: SimConfig,
    front_door: String,
    http: reqwest::Client,
    stop: tokio::sync::watch::Receiver<bool>,
    /// Where a build of an app whose images CI makes (`image.source = "ci"`) publishes its version.
    arm: Option<crate::arm::LocalArm>,
}

fn basic(user: &str, pass: &str) -> String {
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}")))
}

fn error(status: u16, message: &str) -> Response {
    (StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST), axum::Json(json!({ "message": message }))).into_response()
}

impl LocalCi {
    /// The service, with the builds a previous start accepted and did not report yet.
    pub fn open(
        file: PathBuf,
        policy: Arc<Policy>,
        secrets: Secrets,
        config: SimConfig,
        front_door: String,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> LocalCi {
        let pending: Vec<Pending> = std::fs::read(&file).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        let next = pending.iter().map(|p| p.build).max().unwrap_or(1000) + 1;
        let ci = LocalCi {
            inner: Arc::new(Mutex::new(Inner { received: Vec::new(), pending: pending.clone(), next })),
            file,
            policy,
            secrets,
            config,
            front_door,
            http: crate::client::http(),
            stop,
            arm: None,
        };
        for p in pending {
            ci.schedule(p);
        }
        ci
    }

    /// Builds of apps whose images CI makes publish them to this ARM endpoint's gallery.
    pub fn publishing_to(mut self, arm: crate::arm::LocalArm) -> LocalCi {
        self.arm = Some(arm);
        self
    }

    /// What a CI job that makes the image does before it reports: publish the gallery version
    /// (image or VM Application) tagged with the run and the commit.
    fn publish(&self, p: &Pending) -> Result<()> {
        let (Some(arm), Some(app)) = (&self.arm, self.policy.app(&p.app)) else { return Ok(()) };
        if p.fail || app.image.source != deploychain_functions::policy::ImageSource::Ci {
            return Ok(());
        }
        let id = format!("{}/versions/1.0.{}", app.image.destination.trim_end_matches('/'), p.build);
        let unhealthy = self.config.unhealthy_images.iter().any(|u| !u.is_empty() && p.commit.starts_with(u.as_str()));
        arm.publish_version(
            &id,
            json!({ "deploychain.run": p.run, "deploychain.commit": p.commit, "deploychain.build": p.build.to_string() }),
            unhealthy,
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every request received so far.
    pub fn received(&self) -> Vec<Received> {
        self.lock().received.clone()
    }

    fn save(&self, inner: &Inner) {
        if let Ok(b) = serde_json::to_vec(&inner.pending) {
            let tmp = self.file.with_extension("tmp");
            if std::fs::write(&tmp, b).is_ok() {
                let _ = std::fs::rename(tmp, &self.file);
            }
        }
    }

    fn note(&self, method: &str, path: &str, headers: &HeaderMap, body: &str, status: u16) {
        let authorization = headers.get("authorization").and_then(|v| v.to_str().ok()).map(str::to_string);
        self.lock().received.push(Received { method: method.into(), path: path.into(), authorization, body: body.into(), status });
    }

    /// Accept a build: keep it, and report it after the delay.
    fn accept(&self, mut p: Pending) -> u64 {
        let mut inner = self.lock();
        p.build = inner.next;
        inner.next += 1;
        p.fail = self.config.failing_builds.iter().any(|f| !f.is_empty() && p.commit.starts_with(f.as_str()));
        inner.pending.push(p.clone());
        self.save(&inner);
        drop(inner);
        let id = p.build;
        self.schedule(p);
        id
    }

    /// Report `p` after the delay, until the front door takes it; a stop leaves it in the file
    /// for the next start.
    fn schedule(&self, p: Pending) {
        let me = self.clone();
        let mut stop = self.stop.clone();
        tokio::spawn(async move {
            let report = async {
                tokio::time::sleep(me.config.build_delay).await;
                let mut attempt = 0u64;
                loop {
                    attempt += 1;
                    match me.report(&p).await {
                        Ok(()) => return,
                        Err(e) => {
                            tracing::warn!(target: "ci", build = p.build, attempt, "reporting the build failed: {e:#}");
                            tokio::time::sleep(Duration::from_millis(200 * attempt.min(10))).await;
                        }
                    }
                }
            };
            tokio::select! {
                () = report => {
                    let mut inner = me.lock();
                    inner.pending.retain(|q| q.build != p.build);
                    me.save(&inner);
                }
                _ = stop.wait_for(|s| *s) => {}
            }
        });
    }

    async fn report(&self, p: &Pending) -> Result<()> {
        let app = self.policy.app(&p.app).context("the app left the policy")?;
        self.publish(p)?;
        let rsp = match p.provider {
            BuildProvider::GithubActions => {
                let repo = app.source.github.clone().unwrap_or_default();
                let workflow = p.pipeline.rsplit('/').next().unwrap_or_default();
                let body = serde_json::to_vec(&json!({
                    "action": "completed",
                    "workflow_run": {
                        "id": p.build, "name": workflow, "display_title": format!("deploychain {}", p.run),
                        "path": format!(".github/workflows/{workflow}"), "head_branch": p.branch, "head_sha": p.commit,
                        "event": "workflow_dispatch", "status": "completed", "conclusion": if p.fail { "failure" } else { "success" },
                        "html_url": format!("https://github.com/{repo}/actions/runs/{}", p.build), "run_attempt": 1
                    },
                    "repository": { "full_name": repo, "name": repo.rsplit('/').next().unwrap_or_default() },
                    "sender": { "login": "deploychain-local-ci" }
                }))?;
                self.http
                    .post(format!("{}/api/hooks/github", self.front_door))
                    .header("content-type", "application/json")
                    .header("user-agent", "GitHub-Hookshot/deploychain-local-ci")
                    .header("x-github-event", "workflow_run")
                    .header("x-github-delivery", uuid::Uuid::new_v4().to_string())
                    .header("x-hub-signature-256", crate::client::github_signature(&self.secrets.github_webhook, &body))
                    .body(body)
                    .send()
                    .await?
            }
            BuildProvider::AzurePipelines => {
                self.http
                    .post(format!("{}/api/hooks/azure-devops", self.front_door))
                    .basic_auth(&self.secrets.azure_devops_user, Some(&self.secrets.azure_devops_webhook))
                    .json(&json!({
                        "id": uuid::Uuid::new_v4().to_string(), "eventType": "build.complete", "publisherId": "tfs",
                        "resource": {
                            "id": p.build, "buildNumber": format!("20261201.{}", p.build), "status": "completed",
                            "result": if p.fail { "failed" } else { "succeeded" },
                            "sourceBranch": format!("refs/heads/{}", p.branch), "sourceVersion": p.commit,
                            "definition": { "id": pipeline_id(&self.policy, &p.pipeline), "name": p.pipeline },
                            "_links": { "web": { "href": format!("https://dev.azure.com/local/_build/results?buildId={}", p.build) } }
                        }
                    }))
                    .send()
                    .await?
            }
            BuildProvider::Jenkins => {
                let path = deploychain_functions::adapters::ci::jenkins::Jenkins::job_path(&p.pipeline);
                self.http
                    .post(format!("{}/api/hooks/jenkins?code={}", self.front_door, self.secrets.function_key))
                    .json(&json!({
                        "name": p.pipeline.rsplit('/').next().unwrap_or_default(), "url": format!("{path}/"),
                        "build": {
                            "full_url": format!("http://jenkins.local/{path}/{}/", p.build), "number": p.build,
                            "phase": "FINALIZED", "status": if p.fail { "FAILURE" } else { "SUCCESS" },
                            "url": format!("{path}/{}/", p.build),
                            "scm": { "commit": p.commit, "branch": format!("origin/{}", p.branch) },
                            "parameters": { "DEPLOYCHAIN_RUN": p.run, "COMMIT": p.commit, "BRANCH": p.branch }
                        }
                    }))
                    .send()
                    .await?
            }
        };
        let status = rsp.status().as_u16();
        tracing::info!(target: "ci", provider = p.provider.display_name(), build = p.build, run = p.run, status, "build reported");
        if !(200..300).contains(&status) {
            anyhow::bail!("the report was answered {status}");
        }
        Ok(())
    }

    pub fn router(&self) -> axum::Router {
        axum::Router::new()
            .route("/github/repos/{owner}/{repo}/actions/workflows/{workflow}/dispatches", post(github_dispatch))
            .route("/azdo/{org}/{project}/_apis/pipelines", get(azdo_pipelines))
            .route("/azdo/{org}/{project}/_apis/pipelines/{id}/runs", post(azdo_run))
            .route("/jenkins/crumbIssuer/api/json", get(jenkins_crumb))
            .route("/jenkins/{*job}", post(jenkins_build))
            .with_state(self.clone())
    }

    fn crumb(&self) -> String {
        deploychain_events::short_digest(&[&self.secrets.ci_token, "crumb"])
    }
}

/// The id the local Azure DevOps gives a policy's pipeline: its number, or one derived from its name.
pub fn pipeline_id(policy: &Policy, pipeline: &str) -> u64 {
    pipeline.parse().unwrap_or_else(|_| {
        let pos = policy.apps.iter().filter_map(|a| a.build.pipeline.as_deref()).position(|p| p == pipeline).unwrap_or(0);
        100 + pos as u64
    })
}

fn dispatched_apps(policy: &Policy, provider: BuildProvider) -> impl Iterator<Item = &deploychain_functions::policy::App> {
    policy.apps.iter().filter(move |a| a.build.provider == provider && a.build.trigger == BuildTrigger::Dispatch)
}

#[allow(clippy::result_large_err)]
async fn github_dispatch(
    State(ci): State<LocalCi>,
    Path((owner, repo, workflow)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let path = format!("/repos/{owner}/{repo}/actions/workflows/{workflow}/dispatches");
    let answer = (|| {
        if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(&format!("Bearer {}", ci.secrets.ci_token)) {
            return Err(error(401, "Bad credentials"));
        }
        let full = format!("{owner}/{repo}");
        let app = dispatched_apps(&ci.policy, BuildProvider::GithubActions)
            .find(|a| {
                a.source.github.as_deref().is_some_and(|g| g.eq_ignore_ascii_case(&full))
                    && a.build.pipeline.as_deref().unwrap_or("build.yml").rsplit('/').next() == Some(workflow.as_str())
            })
            .ok_or_else(|| error(404, "Not Found"))?;
        let v: Value = serde_json::from_str(&body).map_err(|_| error(400, "Problems parsing JSON"))?;
        let branch = v["ref"].as_str().ok_or_else(|| error(422, "Invalid request.\n\n\"ref\" wasn't supplied."))?;
        let (run, commit) = match (v["inputs"]["deploychain_run"].as_str(), v["inputs"]["commit"].as_str()) {
            (Some(r), Some(c)) => (r, c),
            _ => return Err(error(422, "Required input 'deploychain_run' or 'commit' not provided")),
        };
        let build = ci.accept(Pending {
            provider: BuildProvider::GithubActions,
            build: 0,
            app: app.name.clone(),
            run: run.into(),
            commit: commit.into(),
            branch: branch.into(),
            pipeline: workflow.clone(),
            fail: false,
        });
        Ok(if v["return_run_details"].as_bool() == Some(true) {
            axum::Json(json!({
                "workflow_run_id": build,
                "run_url": format!("https://api.github.com/repos/{full}/actions/runs/{build}"),
                "html_url": format!("https://github.com/{full}/actions/runs/{build}"),
            }))
            .into_response()
        } else {
            StatusCode::NO_CONTENT.into_response()
        })
    })();
    let rsp = answer.unwrap_or_else(|e| e);
    ci.note("POST", &format!("/github{path}"), &headers, &body, rsp.status().as_u16());
    rsp
}

fn azdo_authorized(ci: &LocalCi, headers: &HeaderMap) -> bool {
    headers.get("authorization").and_then(|v| v.to_str().ok()) == Some(basic("", &ci.secrets.ci_token).as_str())
}

async fn azdo_pipelines(State(ci): State<LocalCi>, Path((org, project)): Path<(String, String)>, headers: HeaderMap) -> Response {
    let rsp = if !azdo_authorized(&ci, &headers) {
        // What Azure DevOps does with a bad PAT: its sign-in page, 203.
        (StatusCode::NON_AUTHORITATIVE_INFORMATION, "<html><head><title>Azure DevOps Services | Sign In</title></head></html>")
            .into_response()
    } else {
        let value: Vec<Value> = dispatched_apps(&ci.policy, BuildProvider::AzurePipelines)
            .filter_map(|a| a.build.pipeline.as_deref())
            .map(|p| json!({ "id": pipeline_id(&ci.policy, p), "name": p, "folder": "\\", "revision": 1 }))
            .collect();
        axum::Json(json!({ "count": value.len(), "value": value })).into_response()
    };
    ci.note("GET", &format!("/azdo/{org}/{project}/_apis/pipelines"), &headers, "", rsp.status().as_u16());
    rsp
}

#[allow(clippy::result_large_err)]
async fn azdo_run(
    State(ci): State<LocalCi>,
    Path((org, project, id)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let answer = (|| {
        if !azdo_authorized(&ci, &headers) {
            return Err((
                StatusCode::NON_AUTHORITATIVE_INFORMATION,
                "<html><head><title>Azure DevOps Services | Sign In</title></head></html>",
            )
                .into_response());
        }
        let app = dispatched_apps(&ci.policy, BuildProvider::AzurePipelines)
            .find(|a| a.build.pipeline.as_deref().is_some_and(|p| pipeline_id(&ci.policy, p).to_string() == id))
            .ok_or_else(|| error(404, &format!("Pipeline with id {id} not found.")))?;
        let v: Value = serde_json::from_str(&body).map_err(|_| error(400, "Value cannot be null.\r\nParameter name: runParameters"))?;
        let branch = v["resources"]["repositories"]["self"]["refName"].as_str().unwrap_or("refs/heads/main");
        let commit = v["resources"]["repositories"]["self"]["version"].as_str();
        let run = v["templateParameters"]["deploychainRun"].as_str();
        let (Some(commit), Some(run)) = (commit, run) else {
            return Err(error(400, "A template parameter 'deploychainRun' or the self repository's version is missing."));
        };
        let pipeline = app.build.pipeline.clone().unwrap_or_default();
        let build = ci.accept(Pending {
            provider: BuildProvider::AzurePipelines,
            build: 0,
            app: app.name.clone(),
            run: run.into(),
            commit: commit.into(),
            branch: branch.strip_prefix("refs/heads/").unwrap_or(branch).into(),
            pipeline: pipeline.clone(),
            fail: false,
        });
        Ok(axum::Json(json!({
            "id": build, "name": format!("20261201.{build}"), "state": "inProgress",
            "pipeline": { "id": id, "name": pipeline, "folder": "\\" },
            "_links": { "web": { "href": format!("https://dev.azure.com/{org}/{project}/_build/results?buildId={build}") } },
        }))
        .into_response())
    })();
    let rsp = answer.unwrap_or_else(|e| e);
    ci.note("POST", &format!("/azdo/{org}/{project}/_apis/pipelines/{id}/runs"), &headers, &body, rsp.status().as_u16());
    rsp
}

fn jenkins_authorized(ci: &LocalCi, headers: &HeaderMap) -> bool {
    headers.get("authorization").and_then(|v| v.to_str().ok()) == Some(basic(crate::secrets::CI_USER, &ci.secrets.ci_token).as_str())
}

async fn jenkins_crumb(State(ci): State<LocalCi>, headers: HeaderMap) -> Response {
    let rsp = if jenkins_authorized(&ci, &headers) {
        axum::Json(json!({ "_class": "hudson.security.csrf.DefaultCrumbIssuer", "crumb": ci.crumb(), "crumbRequestField": CRUMB_FIELD }))
            .into_response()
    } else {
        (StatusCode::UNAUTHORIZED, "<html><head><title>Error 401 Unauthorized</title></head></html>").into_response()
    };
    ci.note("GET", "/jenkins/crumbIssuer/api/json", &headers, "", rsp.status().as_u16());
    rsp
}

#[allow(clippy::result_large_err)]
async fn jenkins_build(State(ci): State<LocalCi>, Path(job): Path<String>, headers: HeaderMap, body: String) -> Response {
    let answer = (|| {
        if !jenkins_authorized(&ci, &headers) {
            return Err((StatusCode::UNAUTHORIZED, "<html><head><title>Error 401 Unauthorized</title></head></html>").into_response());
        }
        if headers.get(CRUMB_FIELD).and_then(|v| v.to_str().ok()) != Some(ci.crumb().as_str()) {
            return Err((
                StatusCode::FORBIDDEN,
                "<html><head><title>Error 403 No valid crumb was included in the request</title></head></html>",
            )
                .into_response());
        }
        let Some(path) = job.strip_suffix("/buildWithParameters") else {
            return Err(error(404, "Not Found"));
        };
        let full: Vec<&str> = path.split('/').collect();
        let name = full.chunks(2).filter(|c| c.len() == 2 && c[0] == "job").map(|c| c[1]).collect::<Vec<_>>().join("/");
        let app = dispatched_apps(&ci.policy, BuildProvider::Jenkins)
            .find(|a| a.build.pipeline.as_deref() == Some(name.as_str()))
            .ok_or_else(|| (StatusCode::NOT_FOUND, "<html><head><title>Error 404 Not Found</title></head></html>").into_response())?;
        let form: std::collections::HashMap<String, String> = url::form_urlencoded::parse(body.as_bytes()).into_owned().collect();
        let (Some(run), Some(commit)) = (form.get("DEPLOYCHAIN_RUN"), form.get("COMMIT")) else {
            return Err((StatusCode::BAD_REQUEST, "<html><head><title>Error 400 This build requires parameters</title></head></html>")
                .into_response());
        };
        let build = ci.accept(Pending {
            provider: BuildProvider::Jenkins,
            build: 0,
            app: app.name.clone(),
            run: run.clone(),
            commit: commit.clone(),
            branch: form.get("BRANCH").cloned().unwrap_or_else(|| "main".into()),
            pipeline: name.clone(),
            fail: false,
        });
        Ok((StatusCode::CREATED, [("location", format!("http://jenkins.local/queue/item/{build}/"))]).into_response())
    })();
    let rsp = answer.unwrap_or_else(|e| e);
    ci.note("POST", &format!("/jenkins/{job}"), &headers, &body, rsp.status().as_u16());
    rsp
}
