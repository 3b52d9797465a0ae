//! The local Kubernetes API: the `apps/v1` operations the AKS rollout uses, for the clusters the
//! policy's AKS stages name — `GET` and strategic-merge `PATCH` of a Deployment (with
//! `resourceVersion` preconditions answered 409 as the API server does), and `GET` ReplicaSets by
//! label selector. Each cluster is served under `/{cluster name}` (the server its kubeconfig
//! names); requests need the bearer token the local ARM endpoint takes.
//!
//! A Deployment moves as the controller would move it, lazily: a template change makes a new
//! generation and ReplicaSet revision; the status observes it, then every replica is updated and
//! available after `rollout_time` — unless its image is one marked unhealthy, whose pods never
//! become available, and whose `Progressing` condition turns `ProgressDeadlineExceeded` after
//! `progress_deadline`. Requests are logged with their answers.

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Dep {
    namespace: String,
    name: String,
    replicas: i64,
    labels: Value,
    containers: Vec<Value>,
    annotations: serde_json::Map<String, Value>,
    generation: i64,
    resource_version: u64,
    revision: i64,
    changed_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Rs {
    namespace: String,
    deployment: String,
    revision: i64,
    labels: Value,
    containers: Vec<Value>,
}

#[derive(Default, Serialize, Deserialize)]
struct World {
    /// By cluster name (lower case), then `namespace/name`.
    deployments: BTreeMap<String, BTreeMap<String, Dep>>,
    replicasets: BTreeMap<String, Vec<Rs>>,
    unhealthy: Vec<String>,
}

/// One request the endpoint answered.
#[derive(Debug, Clone, PartialEq)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub body: Value,
    pub status: u16,
}

#[derive(Clone)]
pub struct LocalKube {
    world: Arc<Mutex<World>>,
    seen: Arc<Mutex<Vec<Seen>>>,
    token: String,
    file: Option<std::path::PathBuf>,
    rollout_ms: i64,
    deadline_ms: i64,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn status(code: u16, reason: &str, message: impl Into<String>) -> Response {
    let body = json!({ "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                       "message": message.into(), "reason": reason, "code": code });
    (StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST), axum::Json(body)).into_response()
}

impl LocalKube {
    /// The endpoint, with the state a previous start left in `file` (when given).
    pub fn open(file: Option<std::path::PathBuf>, token: &str, rollout_time: Duration, progress_deadline: Duration) -> LocalKube {
        let world = file.as_ref().and_then(|f| std::fs::read(f).ok()).and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        LocalKube {
            world: Arc::new(Mutex::new(world)),
            seen: Default::default(),
            token: token.to_string(),
            file,
            rollout_ms: rollout_time.as_millis() as i64,
            deadline_ms: progress_deadline.as_millis() as i64,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, World> {
        self.world.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn save(&self, w: &World) {
        if let (Some(f), Ok(b)) = (&self.file, serde_json::to_vec(w)) {
            let tmp = f.with_extension("tmp");
            if std::fs::write(&tmp, b).is_ok() {
                let _ = std::fs::rename(tmp, f);
            }
        }
    }

    /// Create a Deployment (if absent) running `image` in container `container`, at revision 1.
    pub fn ensure_deployment(&self, cluster: &str, namespace: &str, name: &str, container: &str, image: &str, replicas: i64) {
        let mut w = self.lock();
        let key = format!("{namespace}/{name}");
        let c = cluster.to_ascii_lowercase();
        if w.deployments.get(&c).is_some_and(|d| d.contains_key(&key)) {
            return;
        }
        let labels = json!({ "app": name });
        let containers = vec![json!({ "name": container, "image": image, "ports": [{ "containerPort": 8080 }] })];
        let dep = Dep {
            namespace: namespace.into(),
            name: name.into(),
            replicas,
            labels: labels.clone(),
            containers: containers.clone(),
            annotations: Default::default(),
            generation: 1,
            resource_version: 1000,
            revision: 1,
            changed_ms: 0,
        };
        w.deployments.entry(c.clone()).or_default().insert(key, dep);
        w.replicasets.entry(c).or_default().push(Rs {
            namespace: namespace.into(),
            deployment: name.into(),
            revision: 1,
            labels,
            containers,
        });
        self.save(&w);
    }

    /// Pods of images containing `part` never become available.
    pub fn mark_unhealthy(&self, part: &str) {
        let mut w = self.lock();
        w.unhealthy.push(part.to_ascii_lowercase());
        self.save(&w);
    }

    /// The image of a Deployment's first container.
    pub fn image(&self, cluster: &str, namespace: &str, name: &str) -> Option<String> {
        let w = self.lock();
        let d = w.deployments.get(&cluster.to_ascii_lowercase())?.get(&format!("{namespace}/{name}"))?;
        d.containers.first().and_then(|c| c["image"].as_str()).map(str::to_string)
    }

    /// A Deployment's annotations.
    pub fn annotations(&self, cluster: &str, namespace: &str, name: &str) -> Value {
        let w = self.lock();
        w.deployments
            .get(&cluster.to_ascii_lowercase())
            .and_then(|d| d.get(&format!("{namespace}/{name}")))
            .map(|d| Value::Object(d.annotations.clone()))
            .unwrap_or(Value::Null)
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn shown(&self, d: &Dep, unhealthy: &[String], now: i64) -> Value {
        let image_bad = d.containers.iter().any(|c| {
            let i = c["image"].as_str().unwrap_or_default().to_ascii_lowercase();
            unhealthy.iter().any(|u| i.contains(u))
        });
        let since = now - d.changed_ms;
        let observed = if since >= self.rollout_ms / 4 { d.generation } else { d.generation - 1 };
        let done = since >= self.rollout_ms;
        let want = d.replicas;
        let (replicas, updated, available) = match (done, image_bad) {
            (true, false) => (want, want, want),
            (true, true) => (want * 2, want, want),
            (false, _) => (want + 1, 1, want),
        };
        let mut conditions = vec![json!({ "type": "Available", "status": "True", "reason": "MinimumReplicasAvailable" })];
        if image_bad && since >= self.deadline_ms {
            conditions.push(json!({ "type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                "message": format!("ReplicaSet \"{}-{}\" has timed out progressing.", d.name, d.revision) }));
        } else {
            conditions.push(json!({ "type": "Progressing", "status": "True", "reason": if done && !image_bad { "NewReplicaSetAvailable" } else { "ReplicaSetUpdated" } }));
        }
        let mut annotations = d.annotations.clone();
        annotations.insert("deployment.kubernetes.io/revision".into(), d.revision.to_string().into());
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": { "name": d.name, "namespace": d.namespace, "generation": d.generation,
                          "resourceVersion": d.resource_version.to_string(), "labels": d.labels, "annotations": annotations,
                          "uid": format!("{:08x}-0000-4000-8000-000000000000", d.name.len()) },
            "spec": { "replicas": want, "selector": { "matchLabels": d.labels }, "progressDeadlineSeconds": self.deadline_ms / 1000,
                      "template": { "metadata": { "labels": d.labels }, "spec": { "containers": d.containers } } },
            "status": { "observedGeneration": observed, "replicas": replicas, "updatedReplicas": updated,
                        "readyReplicas": if image_bad { want.min(available) } else { available }, "availableReplicas": if image_bad && done { 0 } else { available },
                        "unavailableReplicas": if image_bad && done { want } else { 0 }, "conditions": conditions }
        })
    }

    pub fn router(&self) -> Router {
        Router::new()
            .route("/{cluster}/apis/apps/v1/namespaces/{ns}/deployments/{name}", axum::routing::any(deployment))
            .route("/{cluster}/apis/apps/v1/namespaces/{ns}/replicasets", axum::routing::get(replicasets))
            .with_state(self.clone())
    }

    fn note(&self, method: &str, path: String, body: Value, status: u16) {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).push(Seen { method: method.into(), path, body, status });
    }

    fn authorized(&self, h: &HeaderMap) -> bool {
        h.get("authorization").and_then(|v| v.to_str().ok()) == Some(format!("Bearer {}", self.token).as_str())
    }
}

async fn deployment(
    State(k): State<LocalKube>,
    Path((cluster, ns, name)): Path<(String, String, String)>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = format!("/{cluster}/apis/apps/v1/namespaces/{ns}/deployments/{name}");
    let patch: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let rsp = answer(&k, &cluster, &ns, &name, &method, &headers, &patch);
    k.note(method.as_str(), path, patch, rsp.status().as_u16());
    rsp
}

fn answer(k: &LocalKube, cluster: &str, ns: &str, name: &str, method: &Method, headers: &HeaderMap, patch: &Value) -> Response {
    if !k.authorized(headers) {
        return status(401, "Unauthorized", "Unauthorized");
    }
    let now = now_ms();
    let mut w = k.lock();
    let unhealthy = w.unhealthy.clone();
    let c = cluster.to_ascii_lowercase();
    let Some(d) = w.deployments.get_mut(&c).and_then(|m| m.get_mut(&format!("{ns}/{name}"))) else {
        return status(404, "NotFound", format!("deployments.apps \"{name}\" not found"));
    };
    match *method {
        Method::GET => axum::Json(k.shown(d, &unhealthy, now)).into_response(),
        Method::PATCH => {
            let ct = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default();
            if !ct.starts_with("application/strategic-merge-patch+json") && !ct.starts_with("application/merge-patch+json") {
                return status(
                    415,
                    "UnsupportedMediaType",
                    format!(
                        "the body of the request was in an unknown format - accepted media types include: application/strategic-merge-patch+json, application/merge-patch+json (got {ct})"
                    ),
                );
            }
            if let Some(rv) = patch["metadata"]["resourceVersion"].as_str()
                && rv != d.resource_version.to_string()
            {
                return status(
                    409,
                    "Conflict",
                    format!(
                        "Operation cannot be fulfilled on deployments.apps \"{name}\": the object has been modified; please apply your changes to the latest version and try again"
                    ),
                );
            }
            if let Some(a) = patch["metadata"]["annotations"].as_object() {
                for (key, v) in a {
                    if v.is_null() {
                        d.annotations.remove(key);
                    } else {
                        d.annotations.insert(key.clone(), v.clone());
                    }
                }
            }
            let mut changed = false;
            for pc in patch["spec"]["template"]["spec"]["containers"].as_array().into_iter().flatten() {
                let Some(c) = d.containers.iter_mut().find(|c| c["name"] == pc["name"]) else {
                    return status(422, "Invalid", format!("Deployment.apps \"{name}\" is invalid: no container {}", pc["name"]));
                };
                if let Some(img) = pc["image"].as_str()
                    && c["image"] != img
                {
                    c["image"] = img.into();
                    changed = true;
                }
            }
            d.resource_version += 1;
            if changed {
                d.generation += 1;
                d.revision += 1;
                d.changed_ms = now;
                let rs = Rs {
                    namespace: d.namespace.clone(),
                    deployment: d.name.clone(),
                    revision: d.revision,
                    labels: d.labels.clone(),
                    containers: d.containers.clone(),
                };
                let shown = k.shown(d, &unhealthy, now);
                w.replicasets.entry(c).or_default().push(rs);
                k.save(&w);
                return axum::Json(shown).into_response();
            }
            let shown = k.shown(d, &unhealthy, now);
            k.save(&w);
            axum::Json(shown).into_response()
        }
        _ => status(405, "MethodNotAllowed", format!("{method} is not supported here")),
    }
}

async fn replicasets(
    State(k): State<LocalKube>,
    Path((cluster, ns)): Path<(String, String)>,
    Query(q): Query<BTreeMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let path = format!("/{cluster}/apis/apps/v1/namespaces/{ns}/replicasets");
    let rsp = if !k.authorized(&headers) {
        status(401, "Unauthorized", "Unauthorized")
    } else {
        let w = k.lock();
        let selector: Vec<(String, String)> = q
            .get("labelSelector")
            .map(|s| s.split(',').filter_map(|kv| kv.split_once('=')).map(|(a, b)| (a.to_string(), b.to_string())).collect())
            .unwrap_or_default();
        let items: Vec<Value> = w
            .replicasets
            .get(&cluster.to_ascii_lowercase())
            .into_iter()
            .flatten()
            .filter(|r| r.namespace == ns && selector.iter().all(|(a, b)| r.labels[a.as_str()] == b.as_str()))
            .map(|r| {
                json!({
                    "apiVersion": "apps/v1", "kind": "ReplicaSet",
                    "metadata": { "name": format!("{}-{}", r.deployment, r.revision), "namespace": r.namespace, "labels": r.labels,
                                  "annotations": { "deployment.kubernetes.io/revision": r.revision.to_string() },
                                  "ownerReferences": [{ "apiVersion": "apps/v1", "kind": "Deployment", "name": r.deployment,
                                                        "uid": format!("{:08x}-0000-4000-8000-000000000000", r.deployment.len()), "controller": true }] },
                    "spec": { "replicas": 0, "selector": { "matchLabels": r.labels },
                              "template": { "metadata": { "labels": r.labels }, "spec": { "containers": r.containers } } }
                })
            })
            .collect();
        axum::Json(json!({ "apiVersion": "apps/v1", "kind": "ReplicaSetList", "metadata": { "resourceVersion": "1" }, "items": items }))
            .into_response()
    };
    k.note("GET", path, Value::Null, rsp.status().as_u16());
    rsp
}
