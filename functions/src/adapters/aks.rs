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
//!    is looked at, one GET per scheduled look (decision 0023), until the controller has observed
//!    the new generation and every replica is updated and available, or its `Progressing`
//!    condition says `ProgressDeadlineExceeded`, or the stage's health timeout passes, or another
//!    run's annotation shows it took the Deployment over (stale). Then the acceptance checks run,
//!    one attempt per look. The import of step 1 is followed the same way.
//! 5. Rollback on failure: the image of the previous ReplicaSet (the highest
//!    `deployment.kubernetes.io/revision` below the current) is put back and followed likewise.

use super::arm::client::{Operation, OperationState, human};
use super::arm::rollout::human_since;
use super::arm::{ArmClient, ArmError, TokenSource};
use super::{DeployOutcome, DeployRequest, MAX_TURNS, Progress, Turn, cursor_of, progress};
use crate::error::{Error, Result};
use base64::Engine;
use chrono::{DateTime, Utc};
use deploychain_events::{ImageKind, ImageRef};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde::{Deserialize, Serialize};
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
    e.into_error(what)
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

    /// Start importing the image into `target` (by digest): the reference the stage deploys, and
    /// the import's operation when it is still under way.
    async fn promote(&self, req: &DeployRequest, target: &str) -> Result<(String, Option<(Operation, Duration)>)> {
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
            return Ok((req.image.id.clone(), None));
        }
        let source =
            req.source_registry.as_deref().ok_or_else(|| Error::Refused("the app names no source registry (image.registry)".into()))?;
        let body = json!({
            "source": { "resourceId": source, "sourceImage": format!("{repo}@{digest}") },
            "targetTags": [], "untaggedTargetRepositories": [repo], "mode": "NoForce"
        });
        let what = format!("importing {repo}@{digest} into {login}");
        let a = self
            .arm
            .send(reqwest::Method::POST, &self.arm.url_api(target, "/importImage", ACR_API_VERSION), None, Some(&body))
            .await
            .map_err(|e| arm(&what, e))?;
        let op = self.arm.operation("the image import", &a, None).map_err(|e| arm(&what, e))?;
        Ok((format!("{login}/{repo}@{digest}"), op))
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

    /// One look at the rollout of Deployment `name`: done, failed (its progress deadline, or
    /// the health timeout since `since`), or how far it is.
    async fn look(&self, api: &Api<Deployment>, name: &str, since: DateTime<Utc>, run: Option<&str>) -> Result<Rollout> {
        let d = serde_json::to_value(api.get(name).await.map_err(|e| Self::kube_error("reading the Deployment", e))?).map_err(transient)?;
        if let Some(run) = run
            && let Some(owner) = d["metadata"]["annotations"][ANN_RUN].as_str().filter(|o| *o != run)
        {
            return Ok(Rollout::Taken(owner.to_string()));
        }
        let (spec, st) = (&d["spec"], &d["status"]);
        let want = spec["replicas"].as_i64().unwrap_or(1);
        let generation = d["metadata"]["generation"].as_i64().unwrap_or(0);
        if let Some(c) = st["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == "Progressing" && c["reason"] == "ProgressDeadlineExceeded")
        {
            return Ok(Rollout::Failed(format!(
                "the rollout of {name} exceeded its progress deadline: {}",
                c["message"].as_str().unwrap_or_default()
            )));
        }
        let observed = st["observedGeneration"].as_i64().unwrap_or(0) >= generation;
        let n = |k: &str| st[k].as_i64().unwrap_or(0);
        if observed && n("updatedReplicas") == want && n("availableReplicas") == want && n("replicas") == want {
            return Ok(Rollout::Done);
        }
        let progress = format!("{} of {want} updated, {} available", n("updatedReplicas"), n("availableReplicas"));
        if (Utc::now() - since).to_std().unwrap_or_default() >= self.timeout {
            return Ok(Rollout::Failed(format!("the rollout of {name} did not finish within {}: {progress}", human(self.timeout))));
        }
        Ok(Rollout::Running(progress))
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

    /// One look at the rollout of `req` from `cursor` (decision 0023).
    pub async fn advance_rollout(&self, req: &DeployRequest, cursor: &Value) -> Result<Progress> {
        let kt = req.kubernetes.as_ref().ok_or_else(|| Error::Refused(format!("stage {} names no Deployment", req.stage)))?;
        let mut milestones = Vec::new();
        let mut turn = match cursor_of::<KubeCursor>(cursor)? {
            None => match &req.registry {
                Some(reg) => match self.promote(req, reg).await? {
                    (image, Some((op, after))) => Turn::Wait {
                        status: format!("importing {} into {}", req.image.id, image.split('/').next().unwrap_or_default()),
                        cursor: KubeCursor::Importing { image, op, since: Utc::now() },
                        after,
                    },
                    (image, None) => Turn::Next(KubeCursor::SetImage { image }),
                },
                None => Turn::Next(KubeCursor::SetImage { image: req.image.id.clone() }),
            },
            Some(c) => Turn::Next(c),
        };
        let mut client = None;
        for _ in 0..MAX_TURNS {
            let Turn::Next(c) = turn else { break };
            turn = match c {
                // Only ARM: no cluster client needed.
                KubeCursor::Importing { image, op, since } => match self.arm.look("the image import", &op).await {
                    Ok(OperationState::Succeeded) => {
                        milestones.push(format!("imported as {image}"));
                        Turn::Next(KubeCursor::SetImage { image })
                    }
                    Ok(OperationState::Failed(m)) => Turn::Done(DeployOutcome::Failed { reason: format!("{m}; nothing changed") }),
                    Ok(OperationState::Running(_)) if (Utc::now() - since).to_std().unwrap_or_default() >= self.timeout => {
                        Turn::Done(DeployOutcome::Failed {
                            reason: format!("the import of {image} did not finish within {}; nothing changed", human(self.timeout)),
                        })
                    }
                    Ok(OperationState::Running(asked)) => Turn::Wait {
                        after: asked.unwrap_or(self.poll),
                        status: format!("importing {image}"),
                        cursor: KubeCursor::Importing { image, op, since },
                    },
                    Err(e) => return Err(arm("the image import", e)),
                },
                other => {
                    let c = match &client {
                        Some(c) => c,
                        None => client.insert(self.client(&req.target).await?),
                    };
                    let api: Api<Deployment> = Api::namespaced(c.clone(), &kt.namespace);
                    self.phase(req, kt, c, &api, other, &mut milestones).await?
                }
            };
        }
        progress(turn, milestones)
    }

    /// The rollback cursor of a rollout that must stop for `reason`.
    pub fn abort_rollout(&self, cursor: &Value, reason: &str) -> Option<Value> {
        match cursor_of::<KubeCursor>(cursor).ok()?? {
            KubeCursor::Following { container, previous, .. } | KubeCursor::Checking { container, previous, .. } => {
                serde_json::to_value(KubeCursor::RollBack { container, previous, failure: reason.to_string() }).ok()
            }
            _ => None,
        }
    }

    async fn phase(
        &self,
        req: &DeployRequest,
        kt: &crate::policy::KubeTarget,
        client: &kube::Client,
        api: &Api<Deployment>,
        cursor: KubeCursor,
        milestones: &mut Vec<String>,
    ) -> Result<Turn<KubeCursor>> {
        let name = &kt.deployment;
        let now = Utc::now();
        match cursor {
            KubeCursor::Importing { .. } => unreachable!("imports are looked at without the cluster"),
            KubeCursor::SetImage { image } => {
                let mut conflicts = 0;
                loop {
                    let d = match api.get(name).await {
                        Ok(d) => serde_json::to_value(d).map_err(transient)?,
                        Err(e) => return Err(Self::kube_error(&format!("reading Deployment {}/{name}", kt.namespace), e)),
                    };
                    let Some((container, current)) = image_of(&d, kt.container.as_deref()) else {
                        return Ok(Turn::Done(DeployOutcome::Failed {
                            reason: format!(
                                "Deployment {name} has no container {}; nothing changed",
                                kt.container.as_deref().unwrap_or("")
                            ),
                        }));
                    };
                    let ann = &d["metadata"]["annotations"];
                    let owner = ann[ANN_RUN].as_str().unwrap_or_default();
                    let seq: i64 = ann[ANN_SEQUENCE].as_str().and_then(|s| s.parse().ok()).unwrap_or(i64::MIN);
                    if owner != req.run_id && seq > req.sequence {
                        return Ok(Turn::Done(DeployOutcome::Stale { reason: format!("Deployment {name} runs the newer run {owner}") }));
                    }
                    if ann[ANN_ROLLEDBACK].as_str() == Some(req.run_id.as_str()) && owner != req.run_id {
                        return Ok(Turn::Done(DeployOutcome::RolledBack {
                            reason: format!("this run's rollout to {name} failed and was rolled back earlier"),
                            restored: None,
                        }));
                    }
                    if owner == req.run_id && current == image {
                        // A repeated start after its write: follow the rollout it began.
                        return Ok(Turn::Next(KubeCursor::Following { container, previous: None, since: now }));
                    }
                    let rv = d["metadata"]["resourceVersion"].as_str().unwrap_or_default().to_string();
                    let annotations = json!({ ANN_RUN: req.run_id, ANN_SEQUENCE: req.sequence.to_string(), ANN_ROLLEDBACK: null, ANN_PREVIOUS_RUN: owner });
                    match self.set_image(api, name, &container, &image, annotations, &rv).await {
                        Ok(()) => {
                            milestones.push(format!("Deployment {name} set to {image}"));
                            return Ok(Turn::Next(KubeCursor::Following { container, previous: Some(current), since: now }));
                        }
                        Err(kube::Error::Api(s)) if s.code == 409 && conflicts < 3 => conflicts += 1,
                        Err(e) => return Err(Self::kube_error(&format!("updating Deployment {name}"), e)),
                    }
                }
            }
            KubeCursor::Following { container, previous, since } => Ok(match self.look(api, name, since, Some(&req.run_id)).await? {
                Rollout::Taken(owner) => Turn::Done(DeployOutcome::Stale {
                    reason: format!("Deployment {name} was taken over by run {owner} while this rollout ran"),
                }),
                Rollout::Done => {
                    milestones.push(format!("Deployment {name} rolled out"));
                    Turn::Next(KubeCursor::Checking { container, previous, check: 0, attempt: 1 })
                }
                Rollout::Failed(failure) => Turn::Next(KubeCursor::RollBack { container, previous, failure }),
                Rollout::Running(p) => Turn::Wait {
                    after: self.poll,
                    status: format!("rolling out Deployment {name}: {p} ({} so far)", human_since(since)),
                    cursor: KubeCursor::Following { container, previous, since },
                },
            }),
            KubeCursor::Checking { container, previous, check, attempt } => {
                let Some(c) = req.checks.get(check) else {
                    return Ok(Turn::Done(DeployOutcome::Succeeded));
                };
                Ok(match super::arm::checks::attempt(&self.checks_http, c, attempt).await {
                    Ok(()) => Turn::Next(KubeCursor::Checking { container, previous, check: check + 1, attempt: 1 }),
                    Err(failure) if attempt > c.retries => Turn::Next(KubeCursor::RollBack { container, previous, failure }),
                    Err(why) => Turn::Wait {
                        after: c.interval(),
                        status: format!("Deployment {name}: acceptance check {} of {} failing ({why})", check + 1, req.checks.len()),
                        cursor: KubeCursor::Checking { container, previous, check, attempt: attempt + 1 },
                    },
                })
            }
            KubeCursor::RollBack { container, previous, failure } => {
                let d = serde_json::to_value(api.get(name).await.map_err(|e| Self::kube_error("reading the Deployment", e))?)
                    .map_err(transient)?;
                let ann = &d["metadata"]["annotations"];
                if ann[ANN_ROLLEDBACK].as_str() == Some(req.run_id.as_str()) && ann[ANN_RUN].as_str() != Some(req.run_id.as_str()) {
                    // A repeated look: the image is back already; follow it.
                    let back = image_of(&d, Some(&container)).map(|(_, i)| i).unwrap_or_default();
                    return Ok(Turn::Next(KubeCursor::RollingBack { back, failure, since: now }));
                }
                let back = match self.previous_image(client, &kt.namespace, &d, &container).await? {
                    Some(i) => i,
                    None => match previous {
                        Some(p) => p,
                        None => {
                            return Ok(Turn::Done(DeployOutcome::Failed {
                                reason: format!("{failure}; no previous ReplicaSet to roll back to"),
                            }));
                        }
                    },
                };
                let rv = d["metadata"]["resourceVersion"].as_str().unwrap_or_default().to_string();
                let annotations = json!({ ANN_ROLLEDBACK: req.run_id, ANN_RUN: ann[ANN_PREVIOUS_RUN].as_str().unwrap_or("") });
                if let Err(e) = self.set_image(api, name, &container, &back, annotations, &rv).await {
                    return Ok(Turn::Done(DeployOutcome::Failed { reason: format!("{failure}; rollback failed: {e}") }));
                }
                milestones.push(format!("rolling Deployment {name} back to {back}: {failure}"));
                Ok(Turn::Next(KubeCursor::RollingBack { back, failure, since: now }))
            }
            KubeCursor::RollingBack { back, failure, since } => Ok(match self.look(api, name, since, None).await? {
                Rollout::Taken(_) => unreachable!("a rollback's look names no run"),
                Rollout::Done => Turn::Done(DeployOutcome::RolledBack {
                    reason: failure,
                    restored: Some(ImageRef {
                        kind: ImageKind::Container,
                        digest: back.split_once('@').map(|(_, d)| d.to_string()),
                        version: None,
                        id: back,
                    }),
                }),
                Rollout::Failed(why) => Turn::Done(DeployOutcome::Failed { reason: format!("{failure}; rollback failed: {why}") }),
                Rollout::Running(p) => Turn::Wait {
                    after: self.poll,
                    status: format!("rolling Deployment {name} back: {p} ({failure})"),
                    cursor: KubeCursor::RollingBack { back, failure, since },
                },
            }),
        }
    }
}

/// Where an AKS rollout is between looks (decision 0023).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "camelCase")]
pub enum KubeCursor {
    /// The image's import into the stage's registry is under way.
    Importing { image: String, op: Operation, since: DateTime<Utc> },
    /// Set the Deployment's container to `image` (fenced).
    SetImage { image: String },
    /// The Deployment's rollout, followed until complete or past its deadline.
    Following { container: String, previous: Option<String>, since: DateTime<Utc> },
    /// The acceptance checks: check `check`, attempt `attempt`.
    Checking { container: String, previous: Option<String>, check: usize, attempt: u32 },
    /// Put the previous ReplicaSet's image back after `failure`.
    RollBack { container: String, previous: Option<String>, failure: String },
    /// The rollback's rollout, followed.
    RollingBack { back: String, failure: String, since: DateTime<Utc> },
}

/// What a look at a Deployment's rollout found.
enum Rollout {
    /// Another run's now (the run its annotation names).
    Taken(String),
    Done,
    Failed(String),
    Running(String),
}

/// Every deploy target: VM scale sets through ARM, AKS Deployments through the Kubernetes API.
pub struct Targets {
    pub scale_sets: Arc<dyn super::Compute>,
    pub clusters: Option<AksCompute>,
}

#[async_trait::async_trait]
impl super::Compute for Targets {
    async fn advance(&self, req: &DeployRequest, cursor: &Value) -> Result<Progress> {
        if is_cluster(&req.target) {
            return self
                .clusters
                .as_ref()
                .ok_or_else(|| Error::Refused("AKS rollouts are not configured".into()))?
                .advance_rollout(req, cursor)
                .await;
        }
        self.scale_sets.advance(req, cursor).await
    }

    fn abort(&self, req: &DeployRequest, cursor: &Value, reason: &str) -> Option<Value> {
        if is_cluster(&req.target) {
            return self.clusters.as_ref()?.abort_rollout(cursor, reason);
        }
        self.scale_sets.abort(req, cursor, reason)
    }
}

#[async_trait::async_trait]
impl super::Compute for AksCompute {
    async fn advance(&self, req: &DeployRequest, cursor: &Value) -> Result<Progress> {
        self.advance_rollout(req, cursor).await
    }

    fn abort(&self, _req: &DeployRequest, cursor: &Value, reason: &str) -> Option<Value> {
        self.abort_rollout(cursor, reason)
    }
}

fn is_cluster(target: &str) -> bool {
    target.to_ascii_lowercase().contains("/providers/microsoft.containerservice/managedclusters/")
}
