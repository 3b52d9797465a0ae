//! Rollouts to AKS (decision 0015): a stage whose `target` is a managed cluster deploys the
//! container image, **by digest**, to a Deployment.
//!
//! 1. Promotion: with a stage `registry`, the image is imported into that Azure Container Registry
//!    by digest (ARM `importImage`, `mode: NoForce`; importing a manifest that is there already is
//!    a no-op), and the stage deploys `{its login server}/{repository}@sha256:…`.
//! 2. Credentials: the cluster's API server and CA from ARM `listClusterUserCredential`; the bearer
//!    is an Entra token for AKS (`6dae42f8-4368-4678-94ff-3960e28e3630/.default`) from the same
//!    identity as ARM — an AKS cluster with Entra ID integration and Azure RBAC, where the identity
//!    has *Azure Kubernetes Service RBAC Writer* on the namespace.
//! 3. Fencing: the Deployment's annotations record the run, its sequence and image; a newer run's
//!    Deployment is not touched (stale), the same run's is resumed, and the patch carries the
//!    `resourceVersion` read, so a concurrent writer makes it fail (409) and it is read again.
//! 4. Rollout: the container's image is patched (strategic merge, by container name); the rollout
//!    is followed until the controller has observed the new generation and every replica is updated
//!    and available, or its `Progressing` condition says `ProgressDeadlineExceeded`, or the
//!    stage's health timeout passes. Then the acceptance checks run.
//! 5. Rollback on failure: the image of the previous ReplicaSet (the highest
//!    `deployment.kubernetes.io/revision` below the current) is put back and followed likewise.

use super::arm::{ArmClient, ArmError, TokenSource};
use super::{DeployOutcome, DeployRequest};
use crate::error::{Error, Result};
use base64::Engine;
use deploychain_events::{ImageKind, ImageRef};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

/// Entra ID's resource for AKS clusters' API servers.
pub const AKS_SCOPE: &str = "6dae42f8-4368-4678-94ff-3960e28e3630/.default";
pub const AKS_API_VERSION: &str = "2024-09-01";
pub const ACR_API_VERSION: &str = "2023-07-01";

pub const ANN_RUN: &str = "deploychain.dev/run";
pub const ANN_SEQUENCE: &str = "deploychain.dev/sequence";
pub const ANN_ROLLEDBACK: &str = "deploychain.dev/rolledback";
/// The run the Deployment ran before this one (what a rollback gives it back to).
pub const ANN_PREVIOUS_RUN: &str = "deploychain.dev/previous-run";
const REVISION: &str = "deployment.kubernetes.io/revision";

pub struct AksCompute {
    arm: Arc<ArmClient>,
    tokens: Arc<dyn TokenSource>,
    checks_http: reqwest::Client,
    poll: Duration,
    timeout: Duration,
}

fn transient(e: impl std::fmt::Display) -> Error {
    Error::Transient(e.to_string())
}

fn arm(what: &str, e: ArmError) -> Error {
    match e {
        ArmError::Transient(m) | ArmError::PreconditionFailed(m) => Error::Transient(format!("{what}: {m}")),
        ArmError::NotFound(m) | ArmError::Failed(m) => Error::Refused(format!("{what}: {m}")),
    }
}

/// `repository@sha256:…` of a `host/repository@sha256:…` image id.
fn repository_and_digest(id: &str) -> Option<(&str, &str, &str)> {
    let (name, digest) = id.split_once('@')?;
    let (host, repo) = name.split_once('/')?;
    Some((host, repo, digest))
}

/// The containers of a Deployment's pod template, and the image of `container` (default first).
fn image_of(d: &Value, container: Option<&str>) -> Option<(String, String)> {
    let cs = d["spec"]["template"]["spec"]["containers"].as_array()?;
    let c = match container {
        Some(n) => cs.iter().find(|c| c["name"] == n)?,
        None => cs.first()?,
    };
    Some((c["name"].as_str()?.to_string(), c["image"].as_str().unwrap_or_default().to_string()))
}

enum Waited {
    Done,
    Failed(String),
}

impl AksCompute {
    pub fn new(
        arm: Arc<ArmClient>,
        tokens: Arc<dyn TokenSource>,
        poll: Duration,
        timeout: Duration,
    ) -> std::result::Result<AksCompute, String> {
        let checks_http = crate::outbound::builder()
            .user_agent(concat!("deploychain-checks/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("acceptance check HTTP client: {e}"))?;
        Ok(AksCompute { arm, tokens, checks_http, poll, timeout })
    }

    /// Import the image into `target` (by digest) and give the reference the stage deploys.
    async fn promote(&self, req: &DeployRequest, target: &str) -> Result<String> {
        let (host, repo, digest) = repository_and_digest(&req.image.id)
            .ok_or_else(|| Error::Refused(format!("`{}` is not a registry image by digest", req.image.id)))?;
        let reg = self
            .arm
            .send(reqwest::Method::GET, &self.arm.url_api(target, "", ACR_API_VERSION), None, None)
            .await
            .map_err(|e| arm("reading the registry", e))?;
        let login = reg.body["properties"]["loginServer"].as_str().unwrap_or_default().to_ascii_lowercase();
        if login.is_empty() {
            return Err(Error::Refused(format!("the registry {target} has no login server")));
        }
        if login == host.to_ascii_lowercase() {
            return Ok(req.image.id.clone());
        }
        let source =
            req.source_registry.as_deref().ok_or_else(|| Error::Refused("the app names no source registry (image.registry)".into()))?;
        let body = json!({
            "source": { "resourceId": source, "sourceImage": format!("{repo}@{digest}") },
            "targetTags": [], "untaggedTargetRepositories": [repo], "mode": "NoForce"
        });
        let a = self
            .arm
            .send(reqwest::Method::POST, &self.arm.url_api(target, "/importImage", ACR_API_VERSION), None, Some(&body))
            .await
            .map_err(|e| arm(&format!("importing {repo}@{digest} into {login}"), e))?;
        self.arm.wait_operation("the image import", &a).await.map_err(|e| arm(&format!("importing {repo}@{digest} into {login}"), e))?;
        Ok(format!("{login}/{repo}@{digest}"))
    }

    /// A client for the cluster: its server and CA from ARM, an Entra bearer.
    async fn client(&self, cluster: &str) -> Result<kube::Client> {
        let a = self
            .arm
            .send(reqwest::Method::POST, &self.arm.url_api(cluster, "/listClusterUserCredential", AKS_API_VERSION), None, None)
            .await
            .map_err(|e| arm("getting the cluster's credentials", e))?;
        let b64 = a.body["kubeconfigs"][0]["value"].as_str().ok_or_else(|| Error::Refused("the cluster gave no kubeconfig".into()))?;
        let yaml =
            base64::engine::general_purpose::STANDARD.decode(b64).map_err(|e| Error::Refused(format!("the cluster's kubeconfig: {e}")))?;
        let kc = kube::config::Kubeconfig::from_yaml(&String::from_utf8_lossy(&yaml))
            .map_err(|e| Error::Refused(format!("the cluster's kubeconfig: {e}")))?;
        let cluster_entry =
            kc.clusters.first().and_then(|c| c.cluster.clone()).ok_or_else(|| Error::Refused("the kubeconfig names no cluster".into()))?;
        let server = cluster_entry.server.ok_or_else(|| Error::Refused("the kubeconfig names no server".into()))?;
        let mut config = kube::Config::new(server.parse().map_err(|e| Error::Refused(format!("server `{server}`: {e}")))?);
        if let Some(ca) = cluster_entry.certificate_authority_data {
            let pem =
                base64::engine::general_purpose::STANDARD.decode(ca.trim()).map_err(|e| Error::Refused(format!("the cluster CA: {e}")))?;
            let certs = openssl::x509::X509::stack_from_pem(&pem).map_err(|e| Error::Refused(format!("the cluster CA: {e}")))?;
            config.root_cert = Some(certs.iter().filter_map(|c| c.to_der().ok()).collect());
        }
        let token = self.tokens.token(AKS_SCOPE).await?;
        config.auth_info.token = Some(secrecy::SecretString::new(token.into()));
        config.read_timeout = Some(Duration::from_secs(60));
        kube::Client::try_from(config).map_err(transient)
    }

    fn kube_error(what: &str, e: kube::Error) -> Error {
        match &e {
            kube::Error::Api(s) if s.code == 404 || s.code == 403 || s.code == 422 || s.code == 400 => {
                Error::Refused(format!("{what}: {} {}", s.code, s.message))
            }
            _ => Error::Transient(format!("{what}: {e}")),
        }
    }

    /// Patch the container's image and the run's annotations, conditionally on `resource_version`.
    async fn set_image(
        &self,
        api: &Api<Deployment>,
        name: &str,
        container: &str,
        image: &str,
        annotations: Value,
        resource_version: &str,
    ) -> std::result::Result<(), kube::Error> {
        let patch = json!({
            "metadata": { "resourceVersion": resource_version, "annotations": annotations },
            "spec": { "template": { "spec": { "containers": [ { "name": container, "image": image } ] } } }
        });
        api.patch(name, &PatchParams::default(), &Patch::Strategic(&patch)).await.map(|_| ())
    }

    /// Follow the rollout until it completes, fails its progress deadline, or the timeout passes.
    async fn wait(&self, api: &Api<Deployment>, name: &str) -> Result<Waited> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let d =
                serde_json::to_value(api.get(name).await.map_err(|e| Self::kube_error("reading the Deployment", e))?).map_err(transient)?;
            let (spec, st) = (&d["spec"], &d["status"]);
            let want = spec["replicas"].as_i64().unwrap_or(1);
            let generation = d["metadata"]["generation"].as_i64().unwrap_or(0);
            if let Some(c) = st["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| c["type"] == "Progressing" && c["reason"] == "ProgressDeadlineExceeded")
            {
                return Ok(Waited::Failed(format!(
                    "the rollout of {name} exceeded its progress deadline: {}",
                    c["message"].as_str().unwrap_or_default()
                )));
            }
            let observed = st["observedGeneration"].as_i64().unwrap_or(0) >= generation;
            let n = |k: &str| st[k].as_i64().unwrap_or(0);
            if observed && n("updatedReplicas") == want && n("availableReplicas") == want && n("replicas") == want {
                return Ok(Waited::Done);
            }
            if tokio::time::Instant::now() + self.poll > deadline {
                return Ok(Waited::Failed(format!(
                    "the rollout of {name} did not finish in time: {} of {want} updated, {} available",
                    n("updatedReplicas"),
                    n("availableReplicas")
                )));
            }
            tokio::time::sleep(self.poll).await;
        }
    }

    /// The image of the ReplicaSet before the current one.
    async fn previous_image(&self, client: &kube::Client, ns: &str, d: &Value, container: &str) -> Result<Option<String>> {
        let current: i64 = d["metadata"]["annotations"][REVISION].as_str().and_then(|r| r.parse().ok()).unwrap_or(i64::MAX);
        let labels = d["spec"]["selector"]["matchLabels"].as_object().cloned().unwrap_or_default();
        let selector = labels.iter().map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default())).collect::<Vec<_>>().join(",");
        let rs: Api<ReplicaSet> = Api::namespaced(client.clone(), ns);
        let list = rs.list(&ListParams::default().labels(&selector)).await.map_err(|e| Self::kube_error("listing ReplicaSets", e))?;
        let name = d["metadata"]["name"].as_str().unwrap_or_default();
        let mut best: Option<(i64, String)> = None;
        for r in list.items {
            let r = serde_json::to_value(r).map_err(transient)?;
            let owned =
                r["metadata"]["ownerReferences"].as_array().into_iter().flatten().any(|o| o["kind"] == "Deployment" && o["name"] == name);
            let rev: i64 = r["metadata"]["annotations"][REVISION].as_str().and_then(|x| x.parse().ok()).unwrap_or(0);
            if owned
                && rev < current
                && best.as_ref().is_none_or(|(b, _)| rev > *b)
                && let Some((_, img)) = image_of(&json!({ "spec": r["spec"] }), Some(container))
            {
                best = Some((rev, img));
            }
        }
        Ok(best.map(|(_, i)| i))
    }

    pub async fn deploy(&self, req: &DeployRequest) -> Result<DeployOutcome> {
        let kt = req.kubernetes.as_ref().ok_or_else(|| Error::Refused(format!("stage {} names no Deployment", req.stage)))?;
        let image = match &req.registry {
            Some(reg) => self.promote(req, reg).await?,
            None => req.image.id.clone(),
        };
        let client = self.client(&req.target).await?;
        let api: Api<Deployment> = Api::namespaced(client.clone(), &kt.namespace);
        let mut conflicts = 0;
        let (container, previous) = loop {
            let d = match api.get(&kt.deployment).await {
                Ok(d) => serde_json::to_value(d).map_err(transient)?,
                Err(e) => return Err(Self::kube_error(&format!("reading Deployment {}/{}", kt.namespace, kt.deployment), e)),
            };
            let Some((container, current)) = image_of(&d, kt.container.as_deref()) else {
                return Ok(DeployOutcome::Failed {
                    reason: format!(
                        "Deployment {} has no container {}; nothing changed",
                        kt.deployment,
                        kt.container.as_deref().unwrap_or("")
                    ),
                });
            };
            let ann = &d["metadata"]["annotations"];
            let owner = ann[ANN_RUN].as_str().unwrap_or_default();
            let seq: i64 = ann[ANN_SEQUENCE].as_str().and_then(|s| s.parse().ok()).unwrap_or(i64::MIN);
            if owner != req.run_id && seq > req.sequence {
                return Ok(DeployOutcome::Stale { reason: format!("Deployment {} runs the newer run {owner}", kt.deployment) });
            }
            if ann[ANN_ROLLEDBACK].as_str() == Some(req.run_id.as_str()) && owner != req.run_id {
                return Ok(DeployOutcome::RolledBack {
                    reason: format!("this run's rollout to {} failed and was rolled back earlier", kt.deployment),
                    restored: None,
                });
            }
            if owner == req.run_id && current == image {
                break (container, None); // a redelivery: resume following it
            }
            let rv = d["metadata"]["resourceVersion"].as_str().unwrap_or_default().to_string();
            let annotations =
                json!({ ANN_RUN: req.run_id, ANN_SEQUENCE: req.sequence.to_string(), ANN_ROLLEDBACK: null, ANN_PREVIOUS_RUN: owner });
            match self.set_image(&api, &kt.deployment, &container, &image, annotations, &rv).await {
                Ok(()) => break (container, Some(current)),
                Err(kube::Error::Api(s)) if s.code == 409 && conflicts < 3 => conflicts += 1,
                Err(e) => return Err(Self::kube_error(&format!("updating Deployment {}", kt.deployment), e)),
            }
        };
        let failure = match self.wait(&api, &kt.deployment).await? {
            Waited::Done => match super::arm::checks::run(&self.checks_http, &req.checks).await {
                Ok(()) => return Ok(DeployOutcome::Succeeded),
                Err(why) => why,
            },
            Waited::Failed(why) => why,
        };
        // Roll back to the previous ReplicaSet's image.
        let d = serde_json::to_value(api.get(&kt.deployment).await.map_err(|e| Self::kube_error("reading the Deployment", e))?)
            .map_err(transient)?;
        let back = match self.previous_image(&client, &kt.namespace, &d, &container).await? {
            Some(i) => i,
            None => match previous {
                Some(p) => p,
                None => return Ok(DeployOutcome::Failed { reason: format!("{failure}; no previous ReplicaSet to roll back to") }),
            },
        };
        let rv = d["metadata"]["resourceVersion"].as_str().unwrap_or_default().to_string();
        let annotations =
            json!({ ANN_ROLLEDBACK: req.run_id, ANN_RUN: d["metadata"]["annotations"][ANN_PREVIOUS_RUN].as_str().unwrap_or("") });
        if let Err(e) = self.set_image(&api, &kt.deployment, &container, &back, annotations, &rv).await {
            return Ok(DeployOutcome::Failed { reason: format!("{failure}; rollback failed: {e}") });
        }
        match self.wait(&api, &kt.deployment).await? {
            Waited::Done => Ok(DeployOutcome::RolledBack {
                reason: failure,
                restored: Some(ImageRef {
                    kind: ImageKind::Container,
                    digest: back.split_once('@').map(|(_, d)| d.to_string()),
                    version: None,
                    id: back,
                }),
            }),
            Waited::Failed(why) => Ok(DeployOutcome::Failed { reason: format!("{failure}; rollback failed: {why}") }),
        }
    }
}

/// Every deploy target: VM scale sets through ARM, AKS Deployments through the Kubernetes API.
pub struct Targets {
    pub scale_sets: Arc<dyn super::Compute>,
    pub clusters: Option<AksCompute>,
}

#[async_trait::async_trait]
impl super::Compute for Targets {
    async fn deploy(&self, req: &DeployRequest) -> Result<DeployOutcome> {
        if req.target.to_ascii_lowercase().contains("/providers/microsoft.containerservice/managedclusters/") {
            return self.clusters.as_ref().ok_or_else(|| Error::Refused("AKS rollouts are not configured".into()))?.deploy(req).await;
        }
        self.scale_sets.deploy(req).await
    }
}
