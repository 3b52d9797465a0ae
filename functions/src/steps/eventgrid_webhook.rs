//! `eventgrid_webhook` — HTTP `/api/hooks/eventgrid`: Azure Event Grid deliveries from a container
//! registry's system topic.
//!
//! - Auth: the function key (`authLevel: function`); the event subscription's endpoint is
//!   `https://<app>.azurewebsites.net/api/hooks/eventgrid?code=<function key>`.
//! - Validation handshakes, so the subscription can be created: the Event Grid schema's
//!   `Microsoft.EventGrid.SubscriptionValidationEvent` is answered `{"validationResponse": code}`;
//!   the CloudEvents schema's `OPTIONS` abuse-protection request is answered with
//!   `WebHook-Allowed-Origin` (and `WebHook-Allowed-Rate`).
//! - `Microsoft.ContainerRegistry.ImagePushed` in either schema (one event or a batch) →
//!   `image.ready` of the image **by digest** (`{login server}/{repository}@sha256:…`) for the run
//!   whose commit the tag names (CI tags images with the commit SHA: `3f2a9c1d0b7e`, `sha-3f2a…`,
//!   `main-3f2a…`); an app's image source is the registry repository (`demo.azurecr.io/web`).
//! - Other event types, repositories no app takes, and tags that name no run → 202 ignored with
//!   the reason; a body that is not Event Grid's JSON → 400. Nothing is published for those.

use super::github_webhook::{ignored, publish_event, require_json, run_trace, strip_bom};
use super::*;
use crate::invoke::{HttpRequest, HttpResponse};
use serde_json::{Value, json};

pub const NAME: &str = "eventgrid_webhook";

fn s<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(*k)).and_then(Value::as_str)
}

pub async fn handle(state: AppState, req: HttpRequest) -> Result<HttpResponse> {
    if req.method == "OPTIONS" {
        // CloudEvents 1.0 webhook abuse protection (what Event Grid sends for the CloudEvents schema).
        let origin = req
            .header("webhook-request-origin")
            .ok_or_else(|| Error::Malformed("OPTIONS without WebHook-Request-Origin: not a CloudEvents validation request".into()))?;
        return Ok(HttpResponse::json(200, &json!({}))
            .with_header("WebHook-Allowed-Origin", origin)
            .with_header("WebHook-Allowed-Rate", "120")
            .with_header("Allow", "POST, OPTIONS"));
    }
    if req.method != "POST" {
        return Err(Error::Malformed(format!("{} is not supported; Event Grid delivers with POST", req.method)));
    }
    if req.body.len() > state.config.max_body_bytes {
        return Err(Error::TooLarge(format!("the body is {} bytes; the limit is {}", req.body.len(), state.config.max_body_bytes)));
    }
    require_json(&req, "Event Grid")?;
    let body: Value = serde_json::from_slice(strip_bom(&req.body)).map_err(|e| Error::Malformed(format!("the body is not JSON: {e}")))?;
    let events: Vec<Value> = match body {
        Value::Array(a) => a,
        v @ Value::Object(_) => vec![v],
        _ => return Err(Error::Malformed("the body is neither an event nor a batch of events".into())),
    };
    let mut accepted = Vec::new();
    let mut reasons = Vec::new();
    for e in &events {
        // CloudEvents `type`, or Event Grid's `eventType` (which a registry's topic sends short:
        // `ImagePushed`, and Event Grid's own handshake long).
        let ty =
            s(e, &["type"]).or(s(e, &["eventType"])).ok_or_else(|| Error::Malformed("an event has no `type` or `eventType`".into()))?;
        match ty {
            "Microsoft.EventGrid.SubscriptionValidationEvent" => {
                let code = s(e, &["data", "validationCode"])
                    .ok_or_else(|| Error::Malformed("a validation event without `data.validationCode`".into()))?;
                return Ok(HttpResponse::json(200, &json!({ "validationResponse": code })));
            }
            "Microsoft.ContainerRegistry.ImagePushed" | "ImagePushed" => match image_pushed(&state, e).await? {
                Ok(ev) => accepted.push(json!({ "run": ev.run_id, "id": ev.id })),
                Err(why) => reasons.push(why),
            },
            other => reasons.push(format!("`{other}` events do not drive deployments")),
        }
    }
    if accepted.is_empty() {
        return Ok(ignored(reasons.join("; ")));
    }
    Ok(HttpResponse::json(202, &json!({ "accepted": EventType::ImageReady.as_str(), "runs": accepted, "ignored": reasons })))
}

/// `image.ready` for an ImagePushed event, or why not.
async fn image_pushed(state: &AppState, e: &Value) -> Result<std::result::Result<DeployEvent, String>> {
    let d = &e["data"];
    let host = s(d, &["request", "host"]).ok_or_else(|| Error::Malformed("ImagePushed without `data.request.host`".into()))?;
    let repo = s(d, &["target", "repository"]).ok_or_else(|| Error::Malformed("ImagePushed without `data.target.repository`".into()))?;
    let digest = s(d, &["target", "digest"])
        .filter(|d| d.strip_prefix("sha256:").is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit())))
        .ok_or_else(|| Error::Malformed("ImagePushed without a sha256 `data.target.digest`".into()))?
        .to_ascii_lowercase();
    let repository = format!("{}/{}", host.to_ascii_lowercase(), repo.to_ascii_lowercase());
    let Some(app) = state.policy.registry_app(&repository) else {
        return Ok(Err(format!("image repository {repository} is not any app's image source")));
    };
    let tag = s(d, &["target", "tag"]).unwrap_or_default();
    // The tag's hex tokens, longest first, as commit prefixes of the app's runs.
    let mut tokens: Vec<&str> =
        tag.split(['-', '_', '.']).filter(|t| (7..=64).contains(&t.len()) && t.bytes().all(|b| b.is_ascii_hexdigit())).collect();
    tokens.sort_by_key(|t| std::cmp::Reverse(t.len()));
    let mut found = None;
    for t in tokens {
        let runs =
            state.store.runs(&crate::adapters::RunQuery { app: Some(app.name.clone()), commit: Some(t.to_string()), limit: 2 }).await?;
        if runs.len() == 1 {
            found = runs.into_iter().next();
            break;
        }
    }
    let Some(run) = found else {
        return Ok(Err(format!(
            "tag `{tag}` of {repository} names no commit of a run of app `{}` (tag images with the commit SHA)",
            app.name
        )));
    };
    let id = event_id(&run.id, "image-ready");
    let trace = run_trace(state, &run.id, &id).await?.unwrap_or_default();
    let ev = DeployEvent {
        id,
        source: format!("/azure-container-registry/{}", host.to_ascii_lowercase()),
        time: Utc::now(),
        run_id: run.id.clone(),
        trace,
        data: EventData::ImageReady(ImageReady {
            app: app.name.clone(),
            commit: run.commit.clone(),
            image: ImageRef {
                kind: ImageKind::Container,
                id: format!("{repository}@{digest}"),
                version: (!tag.is_empty()).then(|| tag.to_string()),
                digest: Some(digest),
            },
            branch: Some(run.branch.clone()),
        }),
    };
    publish_event(state, &ev).await?;
    Ok(Ok(ev))
}
