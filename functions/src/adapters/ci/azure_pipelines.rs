//! Azure Pipelines: `POST {org}/{project}/_apis/pipelines/{id}/runs?api-version=7.1` with the
//! commit as the `self` repository's version and the run as template parameters:
//!
//! ```json
//! {"resources": {"repositories": {"self": {"refName": "refs/heads/main", "version": "<sha>"}}},
//!  "templateParameters": {"deploychainRun": "<run id>", "commit": "<sha>"}}
//! ```
//!
//! The pipeline declares both parameters. It builds exactly that commit, so its `build.complete`
//! service hook (`resource.sourceVersion`) names the run. A policy `pipeline` that is not a number
//! is a pipeline name, resolved once through `GET …/_apis/pipelines`. The project is the app's
//! Azure Repos project, or `AZURE_DEVOPS_PROJECT`.
//!
//! Credentials: an Entra token for Azure DevOps (scope `499b84ac-1321-427f-aa17-267ca6975798/.default`)
//! from the function app's managed identity — the identity is added to the organization as a user
//! with permission to queue the pipeline — or a PAT (`AZURE_DEVOPS_PAT`, Build: read & execute).

use super::{Retry, send};
use crate::adapters::arm::credential::TokenSource;
use crate::adapters::{BuildRequest, BuildStarted};
use crate::config::Secret;
use crate::error::{Error, Result};
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// The Entra resource of Azure DevOps.
pub const AZURE_DEVOPS_SCOPE: &str = "499b84ac-1321-427f-aa17-267ca6975798/.default";
pub const API_VERSION: &str = "7.1";

pub enum DevOpsAuth {
    /// An Entra bearer token (managed identity, workload identity, Azure CLI).
    Entra(Arc<dyn TokenSource>),
    /// A personal access token, sent as Basic `:PAT`.
    Pat(Secret),
}

pub struct AzurePipelines {
    http: reqwest::Client,
    /// `https://dev.azure.com/{organization}`.
    org: url::Url,
    /// `AZURE_DEVOPS_PROJECT`, for apps whose repository is not in Azure Repos.
    default_project: Option<String>,
    auth: DevOpsAuth,
    retry: Retry,
    ids: tokio::sync::Mutex<HashMap<(String, String), u64>>,
}

impl AzurePipelines {
    pub fn new(
        org: url::Url,
        default_project: Option<String>,
        auth: DevOpsAuth,
        retry: Retry,
        timeout: Duration,
    ) -> std::result::Result<AzurePipelines, String> {
        Ok(AzurePipelines {
            http: super::http_client(timeout)?,
            org,
            default_project,
            auth,
            retry,
            ids: tokio::sync::Mutex::new(HashMap::new()),
        })
    }

    fn url(&self, project: &str, path: &str) -> url::Url {
        let mut u = self.org.clone();
        let enc = super::segment(project);
        u.set_path(&format!("{}/{enc}/_apis/{}", self.org.path().trim_end_matches('/'), path.trim_start_matches('/')));
        u.query_pairs_mut().append_pair("api-version", API_VERSION);
        u
    }

    async fn credential(&self) -> Result<(String, bool)> {
        match &self.auth {
            DevOpsAuth::Entra(t) => Ok((t.token(AZURE_DEVOPS_SCOPE).await?, true)),
            DevOpsAuth::Pat(p) => Ok((p.expose().to_string(), false)),
        }
    }

    fn request(&self, method: reqwest::Method, url: url::Url, cred: &(String, bool)) -> reqwest::RequestBuilder {
        let r = self.http.request(method, url).header("accept", "application/json");
        if cred.1 { r.bearer_auth(&cred.0) } else { r.basic_auth("", Some(&cred.0)) }
    }

    /// The project of a run: the Azure Repos clone URL's (`https://dev.azure.com/org/{project}/_git/repo`),
    /// else `AZURE_DEVOPS_PROJECT`.
    fn project(&self, req: &BuildRequest) -> Result<String> {
        let from_repo = url::Url::parse(&req.repository).ok().and_then(|u| {
            let segs: Vec<String> =
                u.path_segments()?.map(|s| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned()).collect();
            let git = segs.iter().position(|s| s == "_git")?;
            git.checked_sub(1).map(|i| segs[i].clone())
        });
        from_repo
            .or_else(|| self.default_project.clone())
            .ok_or_else(|| Error::Refused(format!("no Azure DevOps project for {} (set AZURE_DEVOPS_PROJECT)", req.repository)))
    }

    /// The pipeline id: the policy's number, or the pipeline of that name.
    async fn pipeline_id(&self, project: &str, pipeline: &str, cred: &(String, bool)) -> Result<u64> {
        if let Ok(id) = pipeline.parse::<u64>() {
            return Ok(id);
        }
        let key = (project.to_string(), pipeline.to_string());
        if let Some(id) = self.ids.lock().await.get(&key) {
            return Ok(*id);
        }
        let url = self.url(project, "pipelines");
        let a =
            send(&self.retry, "Azure Pipelines", "listing pipelines", &[&cred.0], || self.request(reqwest::Method::GET, url.clone(), cred))
                .await?;
        let v = a.json();
        let found = v["value"].as_array().into_iter().flatten().find(|p| {
            let name = p["name"].as_str().unwrap_or_default();
            let folder = p["folder"].as_str().unwrap_or("\\").trim_matches('\\').replace('\\', "/");
            name.eq_ignore_ascii_case(pipeline) || (!folder.is_empty() && format!("{folder}/{name}").eq_ignore_ascii_case(pipeline))
        });
        let id = found
            .and_then(|p| p["id"].as_u64())
            .ok_or_else(|| Error::Refused(format!("Azure Pipelines: no pipeline named `{pipeline}` in project {project}")))?;
        self.ids.lock().await.insert(key, id);
        Ok(id)
    }

    /// Queue a run of the app's pipeline for the commit.
    pub async fn run(&self, req: &BuildRequest) -> Result<BuildStarted> {
        let project = self.project(req)?;
        let pipeline =
            req.pipeline.as_deref().ok_or_else(|| Error::Refused(format!("app `{}` names no Azure Pipelines pipeline", req.app)))?;
        let cred = self.credential().await?;
        let id = self.pipeline_id(&project, pipeline, &cred).await?;
        let url = self.url(&project, &format!("pipelines/{id}/runs"));
        let body = json!({
            "resources": { "repositories": { "self": { "refName": format!("refs/heads/{}", req.branch), "version": req.commit } } },
            "templateParameters": { "deploychainRun": req.run_id, "commit": req.commit },
        });
        let what = format!("queueing pipeline {id} ({pipeline}) of {project}");
        let a =
            send(&self.retry, "Azure Pipelines", &what, &[&cred.0], || self.request(reqwest::Method::POST, url.clone(), &cred).json(&body))
                .await?;
        let v = a.json();
        Ok(BuildStarted { build_id: v["id"].as_u64().map(|n| n.to_string()), url: v["_links"]["web"]["href"].as_str().map(str::to_string) })
    }
}
