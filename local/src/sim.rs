//! Simulators for what the Azure-side systems do, so the whole chain runs on one machine:
//!
//! - **CI started on the push** (`trigger = "push"`): on `build.requested`, after `build_delay`,
//!   GitHub Actions answers with a signed `workflow_run` (completed) webhook, Azure Pipelines with a
//!   `build.complete` service hook, both posted to the local front door exactly as the real
//!   services would (builds deploychain dispatches go to the local CI service, [`crate::ci`]);
//! - **registry images**: on `image.requested`, after `image_delay`, a `registry` source publishes a
//!   signed `registry_package` webhook carrying the commit in the OCI revision label. (VM Image
//!   Builder bakes run on the local ARM endpoint's image templates; CI-made images are published
//!   there by the local CI service.)
//!
//! Failures are configurable: builds of listed commit prefixes fail; images baked from listed
//! commit prefixes fail their health probe once on a scale set (the local ARM endpoint is told,
//! as the image's content would tell Azure's Application Health extension).

use crate::config::SimConfig;
use crate::secrets::Secrets;
use anyhow::{Context, Result};
use deploychain_bus::{Broker, EntityPath, NewMessage};
use deploychain_events::*;
use deploychain_functions::policy::{ImageSource, Policy};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

pub const SUBSCRIPTION: &str = "local-simulators";

pub struct Simulators {
    pub broker: Broker,
    pub topic: String,
    pub front_door: String,
    pub secrets: Secrets,
    pub policy: Arc<Policy>,
    pub config: SimConfig,
    pub http: reqwest::Client,
    pub arm: crate::arm::LocalArm,
    pub kube: crate::k8s::LocalKube,
}

pub fn digest_of(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    hex::encode(h.finalize())
}

/// Put a chain event on the topic as the handler's publisher does: the CloudEvent as the body, its
/// id as the MessageId, its type as the Label, its attributes as application properties.
pub async fn send_event(broker: &Broker, topic: &str, ev: &DeployEvent, session: Option<String>) -> Result<()> {
    let o = deploychain_functions::adapters::Outbound::from_event(ev, session);
    broker
        .send(
            topic,
            NewMessage {
                body: o.body.into_bytes(),
                message_id: Some(o.message_id),
                session_id: o.session_id,
                label: Some(o.subject),
                content_type: Some(o.content_type),
                properties: o.properties.into_iter().map(|(k, v)| (k.to_ascii_lowercase(), json!(v))).collect(),
                ..Default::default()
            },
        )
        .await?;
    Ok(())
}

impl Simulators {
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let path: EntityPath = match format!("{}/subscriptions/{SUBSCRIPTION}", self.topic).parse() {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(target: "simulators", "bad entity: {e}");
                return;
            }
        };
        loop {
            let got = tokio::select! {
                r = self.broker.peek_lock(&path, Duration::from_secs(2)) => r,
                _ = stop.wait_for(|s| *s) => return,
            };
            let m = match got {
                Ok(Some(m)) => m,
                Ok(None) => continue,
                Err(e) => {
                    tracing::error!(target: "simulators", "receive failed: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let Some(token) = m.lock_token else { continue };
            // Answer on its own task, holding the lock through the delay: the request is settled only
            // once answered, so a stop mid-delay means redelivery after the restart, not a lost build.
            let me = self.clone();
            let path = path.clone();
            tokio::spawn(async move {
                let renew = {
                    let (broker, path) = (me.broker.clone(), path.clone());
                    tokio::spawn(async move {
                        loop {
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            if broker.renew_lock(&path, token).await.is_err() {
                                return;
                            }
                        }
                    })
                };
                let result = match DeployEvent::from_json_bytes(&m.body) {
                    Ok(ev) => me.answer(ev).await,
                    Err(e) => {
                        tracing::warn!(target: "simulators", "ignoring a message that is not a chain event: {e}");
                        Ok(())
                    }
                };
                renew.abort();
                let settled = match result {
                    Ok(()) => me.broker.complete(&path, token).await,
                    Err(e) => {
                        tracing::error!(target: "simulators", "{e:#}");
                        me.broker.abandon(&path, token).await
                    }
                };
                if let Err(e) = settled {
                    tracing::warn!(target: "simulators", "settling failed: {e}");
                }
            });
        }
    }

    async fn answer(&self, ev: DeployEvent) -> Result<()> {
        match &ev.data {
            // Builds deploychain dispatches go through the CI adapters to the local CI service;
            // here only those the repository's own CI starts on the push (`trigger = "push"`).
            EventData::BuildRequested(b)
                if self.policy.app(&b.app).is_some_and(|a| a.build.trigger == deploychain_functions::policy::BuildTrigger::Push) =>
            {
                tokio::time::sleep(self.config.build_delay).await;
                let fail = self.config.failing_builds.iter().any(|p| !p.is_empty() && b.commit.starts_with(p.as_str()));
                self.build_completed(b, fail).await
            }
            // Images from VM Image Builder and from CI are found by the handler's bake adapters
            // on the local ARM endpoint; a registry reports by webhook.
            EventData::ImageRequested(i)
                if self.policy.app(&i.app).is_some_and(|a| a.image.source == deploychain_functions::policy::ImageSource::Registry) =>
            {
                tokio::time::sleep(self.config.image_delay).await;
                self.image_ready(i).await
            }
            _ => Ok(()),
        }
    }

    async fn post_github(&self, event: &str, body: serde_json::Value) -> Result<()> {
        let body = serde_json::to_vec(&body)?;
        let rsp = self
            .http
            .post(format!("{}/api/hooks/github", self.front_door))
            .header("content-type", "application/json")
            .header("user-agent", "GitHub-Hookshot/deploychain-simulator")
            .header("x-github-event", event)
            .header("x-github-delivery", uuid::Uuid::new_v4().to_string())
            .header("x-hub-signature-256", crate::client::github_signature(&self.secrets.github_webhook, &body))
            .body(body)
            .send()
            .await
            .context("posting the simulated GitHub webhook")?;
        let status = rsp.status().as_u16();
        tracing::info!(target: "simulators", event, status, "GitHub webhook delivered");
        if !(200..300).contains(&status) {
            anyhow::bail!("the {event} webhook was answered {status}");
        }
        Ok(())
    }

    async fn build_completed(&self, b: &BuildRequested, fail: bool) -> Result<()> {
        let app = self.policy.app(&b.app).context("the app left the policy")?;
        let build_id = u64::from_str_radix(&digest_of(&[&b.app, &b.commit])[..8], 16).unwrap_or(1);
        match b.provider {
            BuildProvider::GithubActions => {
                let repo = app.source.github.clone().unwrap_or_default();
                let path = format!(".github/workflows/{}", b.pipeline.as_deref().unwrap_or("build.yml"));
                let payload = json!({
                    "action": "completed",
                    "workflow_run": {
                        "id": build_id, "name": b.pipeline.as_deref().unwrap_or("build"), "path": path,
                        "head_branch": b.branch, "head_sha": b.commit, "event": "push", "status": "completed",
                        "conclusion": if fail { "failure" } else { "success" },
                        "html_url": format!("https://github.com/{repo}/actions/runs/{build_id}"),
                        "run_attempt": 1
                    },
                    "repository": { "full_name": repo, "name": repo.rsplit('/').next().unwrap_or_default() },
                    "sender": { "login": "deploychain-simulator" }
                });
                self.post_github("workflow_run", payload).await
            }
            BuildProvider::Jenkins => anyhow::bail!("Jenkins builds are always dispatched (the local CI service reports them)"),
            BuildProvider::AzurePipelines => {
                let pipeline = b.pipeline.clone().unwrap_or_default();
                let payload = json!({
                    "id": uuid::Uuid::new_v4().to_string(), "eventType": "build.complete", "publisherId": "tfs",
                    "resource": {
                        "id": build_id, "buildNumber": format!("{}.{build_id}", pipeline), "status": "completed",
                        "result": if fail { "failed" } else { "succeeded" },
                        "sourceBranch": format!("refs/heads/{}", b.branch), "sourceVersion": b.commit,
                        "definition": { "id": 1, "name": pipeline },
                        "_links": { "web": { "href": format!("https://dev.azure.com/local/_build/results?buildId={build_id}") } }
                    }
                });
                let rsp = self
                    .http
                    .post(format!("{}/api/hooks/azure-devops", self.front_door))
                    .basic_auth(&self.secrets.azure_devops_user, Some(&self.secrets.azure_devops_webhook))
                    .json(&payload)
                    .send()
                    .await
                    .context("posting the simulated Azure DevOps service hook")?;
                let status = rsp.status().as_u16();
                tracing::info!(target: "simulators", status, "Azure DevOps service hook delivered");
                if !(200..300).contains(&status) {
                    anyhow::bail!("the build.complete service hook was answered {status}");
                }
                Ok(())
            }
        }
    }

    async fn image_ready(&self, i: &ImageRequested) -> Result<()> {
        let app = self.policy.app(&i.app).context("the app left the policy")?;
        let digest = format!("sha256:{}", digest_of(&[&i.app, &i.commit, "image"]));
        match app.image.source {
            ImageSource::Registry
                if app.image.destination.to_ascii_lowercase().split('/').next().is_some_and(|h| h.ends_with(".azurecr.io")) =>
            {
                // Azure Container Registry: the push lands in the registry and Event Grid tells.
                let dest = app.image.destination.to_ascii_lowercase();
                let (host, repo) = dest.split_once('/').unwrap_or((dest.as_str(), ""));
                let hex = digest.trim_start_matches("sha256:");
                if let Some(reg) = &app.image.registry {
                    self.arm.push_image(reg, &format!("{repo}@{digest}"))?;
                }
                if self.config.unhealthy_images.iter().any(|p| !p.is_empty() && i.commit.starts_with(p.as_str())) {
                    self.kube.mark_unhealthy(hex);
                }
                let event = json!([{
                    "specversion": "1.0", "id": uuid::Uuid::new_v4().to_string(),
                    "source": app.image.registry.clone().unwrap_or_else(|| format!("/registries/{host}")),
                    "subject": format!("{repo}:{}", &i.commit[..i.commit.len().min(12)]),
                    "type": "Microsoft.ContainerRegistry.ImagePushed", "time": chrono::Utc::now().to_rfc3339(),
                    "data": { "id": uuid::Uuid::new_v4().to_string(), "timestamp": chrono::Utc::now().to_rfc3339(), "action": "push",
                        "target": { "mediaType": "application/vnd.oci.image.manifest.v1+json", "size": 1234, "digest": digest, "length": 1234,
                                    "repository": repo, "tag": format!("sha-{}", &i.commit[..i.commit.len().min(12)]) },
                        "request": { "id": uuid::Uuid::new_v4().to_string(), "host": host, "method": "PUT", "useragent": "docker/27.0 deploychain-local-ci" } }
                }]);
                let rsp = self
                    .http
                    .post(format!("{}/api/hooks/eventgrid?code={}", self.front_door, self.secrets.function_key))
                    .header("content-type", "application/cloudevents-batch+json; charset=utf-8")
                    .header("aeg-event-type", "Notification")
                    .body(event.to_string())
                    .send()
                    .await
                    .context("posting the simulated Event Grid delivery")?;
                let status = rsp.status().as_u16();
                tracing::info!(target: "simulators", status, "Event Grid ImagePushed delivered");
                if !(200..300).contains(&status) {
                    anyhow::bail!("the ImagePushed delivery was answered {status}");
                }
                Ok(())
            }
            ImageSource::Registry => {
                let repo = app.image.destination.to_ascii_lowercase();
                let payload = json!({
                    "action": "published",
                    "registry_package": {
                        "name": repo.rsplit('/').next().unwrap_or_default(), "ecosystem": "CONTAINER", "package_type": "CONTAINER",
                        "registry": { "type": "CONTAINER", "url": format!("https://{}", repo.split('/').next().unwrap_or_default()) },
                        "package_version": {
                            "name": digest, "version": digest, "package_url": format!("{repo}:{}", &i.commit[..i.commit.len().min(12)]),
                            "target_commitish": app.branches.first().cloned().unwrap_or_default(),
                            "container_metadata": {
                                "tag": { "name": &i.commit[..i.commit.len().min(12)], "digest": digest },
                                "labels": { "revision": i.commit, "all_labels": { "org.opencontainers.image.revision": i.commit } },
                                "manifest": { "digest": digest }
                            }
                        }
                    },
                    "repository": { "full_name": app.source.github.clone().unwrap_or_default() }
                });
                self.post_github("registry_package", payload).await
            }
            ImageSource::ImageBuilder | ImageSource::Ci => {
                anyhow::bail!("{} images are found by the bake adapters", app.image.source.as_str())
            }
        }
    }
}
