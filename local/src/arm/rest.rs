//! The HTTP side of the local ARM endpoint: ARM's request rules (bearer token, `api-version`,
//! case-insensitive resource ids, `{"error":{"code","message"}}` bodies) and one function per
//! operation. Every request is logged with what it was answered.

use super::world::{Effect, name_of, rfc3339};
use super::{FaultAction, LocalArm, Request, State, log_request, now_ms};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State as Ax;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::Response;
use serde_json::{Value, json};

const SCALE_SETS: &str = "/providers/microsoft.compute/virtualmachinescalesets/";
const LOCATIONS: &str = "/providers/microsoft.compute/locations/";

/// One answer before it becomes an HTTP response.
pub(super) struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Option<Value>,
}

impl Answer {
    pub(super) fn json(status: u16, body: Value) -> Answer {
        Answer { status, headers: Vec::new(), body: Some(body) }
    }

    pub(super) fn empty(status: u16) -> Answer {
        Answer { status, headers: Vec::new(), body: None }
    }

    pub(super) fn error(status: u16, code: &str, message: impl Into<String>) -> Answer {
        Answer::json(status, json!({ "error": { "code": code, "message": message.into() } }))
    }

    pub(super) fn header(mut self, name: &str, value: impl Into<String>) -> Answer {
        self.headers.push((name.to_string(), value.into()));
        self
    }

    fn into_response(self) -> Response {
        let mut b = Response::builder().status(StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR));
        for (k, v) in &self.headers {
            b = b.header(k.as_str(), v.as_str());
        }
        let body = match &self.body {
            Some(v) => {
                b = b.header("content-type", "application/json; charset=utf-8");
                Body::from(v.to_string())
            }
            None => Body::empty(),
        };
        b.body(body).unwrap_or_else(|_| Response::new(Body::empty()))
    }
}

pub fn arm_router(arm: LocalArm) -> Router {
    Router::new().fallback(handle).with_state(arm)
}

pub fn apps_router(arm: LocalArm) -> Router {
    Router::new().fallback(app).with_state(arm)
}

pub(super) fn query_param<'a>(uri: &'a Uri, name: &str) -> Option<&'a str> {
    uri.query()?.split('&').find_map(|kv| kv.split_once('=').filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v))
}

async fn handle(Ax(arm): Ax<LocalArm>, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
    let base = format!("http://{}", header("host").unwrap_or_else(|| "127.0.0.1".into()));
    let body: Value =
        if body.is_empty() { Value::Null } else { serde_json::from_slice(&body).unwrap_or_else(|_| json!({ "$invalid": true })) };
    let path = uri.path().to_string();

    // A delay fault holds the answer without holding the endpoint: before the request is done
    // (`Delay`) or after (`LateAnswer`).
    let (delay, late) = {
        let mut s = arm.lock();
        match take_fault(&mut s, method.as_str(), &path, |a| matches!(a, FaultAction::Delay(_) | FaultAction::LateAnswer(_))) {
            Some(FaultAction::Delay(d)) => (Some(d), None),
            Some(FaultAction::LateAnswer(d)) => (None, Some(d)),
            _ => (None, None),
        }
    };
    if let Some(d) = delay {
        tokio::time::sleep(d).await;
    }

    let answer = {
        let mut s = arm.lock();
        let now = now_ms();
        let authorized = header("authorization").is_some_and(|a| a.strip_prefix("Bearer ").is_some_and(|t| t == s.token));
        let answer = if !authorized {
            Answer::error(
                401,
                if header("authorization").is_some() { "InvalidAuthenticationToken" } else { "AuthenticationFailed" },
                "Authentication failed. The 'Authorization' header is missing or its bearer token is not valid for this endpoint.",
            )
            .header("www-authenticate", "Bearer authorization_uri=\"https://login.microsoftonline.com/common\", error=\"invalid_token\"")
        } else {
            if s.world.advance(now) {
                let _ = s.save();
            }
            answer(&mut s, &method, &uri, header("if-match"), &body, &base, now)
        };
        if let Some(line) = activity(&method, &path, &body, &answer) {
            arm.tell(name_of(scale_set_key(&path).map(|k| k.0).unwrap_or_default().as_str()), line);
        }
        log_request(
            &s.conn,
            &Request {
                seq: 0,
                app: None,
                at: chrono::DateTime::from_timestamp_millis(now).unwrap_or_default(),
                method: method.to_string(),
                path: path.clone(),
                query: uri.query().unwrap_or_default().to_string(),
                if_match: header("if-match"),
                authorized,
                body,
                status: answer.status,
            },
        );
        answer
    };
    if let Some(d) = late {
        tokio::time::sleep(d).await;
    }
    answer.into_response()
}

/// The first matching fault whose action `pick` accepts, counting down its skips and times.
fn take_fault(s: &mut State, method: &str, path: &str, pick: impl Fn(&FaultAction) -> bool) -> Option<FaultAction> {
    let lower = path.to_ascii_lowercase();
    let i = s.faults.iter().position(|f| f.method == method && lower.ends_with(&f.path_ends) && pick(&f.action))?;
    let f = &mut s.faults[i];
    if f.skip > 0 {
        f.skip -= 1;
        return None;
    }
    let action = f.action.clone();
    f.times = f.times.saturating_sub(1);
    if f.times == 0 {
        s.faults.remove(i);
    }
    Some(action)
}

fn answer(s: &mut State, method: &Method, uri: &Uri, if_match: Option<String>, body: &Value, base: &str, now: i64) -> Answer {
    let Some(version) = query_param(uri, "api-version") else {
        return Answer::error(
            400,
            "MissingApiVersionParameter",
            "The api-version query parameter (?api-version=) is required for all requests.",
        );
    };
    let images = super::images::serves(uri.path());
    if !images && !super::world::API_VERSIONS.contains(&version) {
        return Answer::error(
            400,
            "InvalidApiVersionParameter",
            format!("The api-version '{version}' is invalid. The supported versions are '{}'.", super::world::API_VERSIONS.join(",")),
        );
    }
    if body.get("$invalid").is_some() {
        return Answer::error(400, "InvalidRequestContent", "The request content was invalid and could not be deserialized.");
    }
    let path = uri.path();
    let mut fail_with = None;
    match take_fault(s, method.as_str(), path, |a| !matches!(a, FaultAction::Delay(_) | FaultAction::LateAnswer(_))) {
        Some(FaultAction::Answer { status, headers, body }) => return Answer { status, headers, body: (!body.is_null()).then_some(body) },
        Some(FaultAction::ConcurrentWrite) => {
            if let Some(ss) = scale_set_key(path).and_then(|(k, _)| s.world.scale_sets.get_mut(&k)) {
                ss.etag += 1;
                ss.body["tags"]["owner"] = "changed-concurrently".into();
            }
        }
        Some(FaultAction::FailOperation(e)) => fail_with = Some(e),
        Some(FaultAction::Delay(_) | FaultAction::LateAnswer(_)) | None => {}
    }
    if images {
        return super::images::answer(s, method, uri, body, base, now, fail_with);
    }
    let lower = path.to_ascii_lowercase();
    if lower.contains(LOCATIONS) && lower.contains("/operations/") {
        return match *method {
            Method::GET => operation(s, name_of(path), query_param(uri, "monitor") == Some("true")),
            _ => Answer::error(405, "MethodNotAllowed", format!("{method} is not allowed on an operation")),
        };
    }
    let Some((key, suffix)) = scale_set_key(path) else {
        return Answer::error(
            404,
            "InvalidResourceType",
            format!("The local ARM endpoint serves Microsoft.Compute/virtualMachineScaleSets, not {path}"),
        );
    };
    let Some(ss) = s.world.scale_sets.get(&key) else {
        let (rg, name) = (resource_group(path), name_of(&key));
        return Answer::error(
            404,
            "ResourceNotFound",
            format!("The Resource 'Microsoft.Compute/virtualMachineScaleSets/{name}' under resource group '{rg}' was not found."),
        );
    };
    let id = ss.body["id"].as_str().unwrap_or(path).to_string();
    let sub = id.split('/').nth(2).unwrap_or_default().to_string();
    let location = ss.body["location"].as_str().unwrap_or("westus").to_string();
    let op_url = |name: &str, monitor: bool| {
        format!(
            "{base}/subscriptions/{sub}/providers/Microsoft.Compute/locations/{location}/operations/{name}?{}api-version={version}",
            if monitor { "monitor=true&" } else { "" }
        )
    };
    match (method.as_str(), suffix.as_str()) {
        ("GET", "") => {
            let ss = &s.world.scale_sets[&key];
            Answer::json(200, ss.shown()).header("etag", ss.etag())
        }
        ("PATCH", "") => {
            if !body.is_object() {
                return Answer::error(400, "InvalidRequestContent", "The request content must be a JSON object.");
            }
            let current = s.world.scale_sets[&key].etag();
            if let Some(m) = if_match.as_deref().filter(|m| *m != "*" && *m != current) {
                return Answer::error(
                    412,
                    "PreconditionFailed",
                    format!("The condition specified using HTTP conditional header(s) is not met (If-Match {m}, current {current})."),
                );
            }
            let Some(op) = s.world.patch(&key, body, now, fail_with) else { return Answer::error(404, "ResourceNotFound", "gone") };
            let _ = s.save();
            let ss = &s.world.scale_sets[&key];
            Answer::json(200, ss.shown()).header("etag", ss.etag()).header("azure-asyncoperation", op_url(&op, false))
        }
        ("GET", "/virtualmachines") => {
            let ss = &s.world.scale_sets[&key];
            let skip: usize = query_param(uri, "$skiptoken").and_then(|t| t.parse().ok()).unwrap_or(0);
            let views = s.world.instance_views(&key, now);
            let page: Vec<Value> = views
                .iter()
                .skip(skip)
                .take(s.page_size)
                .map(|v| {
                    json!({
                        "instanceId": v.instance_id, "name": v.name, "id": format!("{id}/virtualMachines/{}", v.instance_id),
                        "type": "Microsoft.Compute/virtualMachineScaleSets/virtualMachines", "location": ss.body["location"],
                        "properties": { "latestModelApplied": v.latest, "provisioningState": "Succeeded",
                            "storageProfile": { "imageReference": { "id": v.artifacts.first() } } }
                    })
                })
                .collect();
            let mut b = json!({ "value": page });
            if views.len() > skip + s.page_size {
                b["nextLink"] = format!("{base}{id}/virtualMachines?api-version={version}&$skiptoken={}", skip + s.page_size).into();
            }
            Answer::json(200, b)
        }
        ("POST", "/manualupgrade") => {
            let Some(ids) =
                body["instanceIds"].as_array().map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect::<Vec<_>>())
            else {
                return Answer::error(400, "InvalidParameter", "Required parameter 'instanceIds' is missing (null).");
            };
            let known: Vec<String> = s.world.scale_sets[&key].instances.iter().map(|v| v.instance_id.clone()).collect();
            if let Some(bad) = ids.iter().find(|i| !known.contains(i)) {
                return Answer::error(400, "InvalidParameter", format!("The instance id '{bad}' is not an instance of {}.", name_of(&id)));
            }
            let upgrade_ms = s.world.timing.upgrade_ms;
            let op = s.world.new_operation(&key, Effect::Upgrade(ids), now, now + upgrade_ms, fail_with);
            let _ = s.save();
            // As published: 202 with a `location` to poll.
            Answer::empty(202).header("location", op_url(&op, true))
        }
        ("GET", sfx) if sfx.starts_with("/virtualmachines/") && sfx.ends_with("/instanceview") => {
            let instance = sfx.trim_start_matches("/virtualmachines/").trim_end_matches("/instanceview");
            let Some(v) = s.world.instance_views(&key, now).into_iter().find(|v| v.instance_id == instance) else {
                return Answer::error(404, "NotFound", format!("The instance {instance} of {} was not found.", name_of(&id)));
            };
            let at = rfc3339(now);
            Answer::json(
                200,
                json!({
                    "platformUpdateDomain": 0, "platformFaultDomain": 0, "computerName": v.name,
                    "vmHealth": { "status": { "code": v.health, "level": "Info", "displayStatus": display(v.health), "time": at } },
                    "extensions": [ { "name": "HealthExtension", "type": "Microsoft.ManagedServices.ApplicationHealthLinux",
                        "typeHandlerVersion": "2.0", "statuses": [ { "code": "ProvisioningState/succeeded", "level": "Info",
                        "displayStatus": "Provisioning succeeded" } ] } ],
                    "statuses": [
                        { "code": "ProvisioningState/succeeded", "level": "Info", "displayStatus": "Provisioning succeeded", "time": at },
                        { "code": "PowerState/running", "level": "Info", "displayStatus": "VM running" }
                    ]
                }),
            )
        }
        ("GET", "/rollingupgrades/latest") => rolling_latest(s, &key, &id),
        (m, sfx) => Answer::error(
            405,
            "OperationNotSupported",
            format!("The local ARM endpoint does not serve {m} on virtualMachineScaleSets/{{name}}{sfx}"),
        ),
    }
}

/// A line for the progress view about a write ARM accepted (or a fault it answered).
fn activity(method: &Method, path: &str, body: &Value, answer: &Answer) -> Option<String> {
    let (_, suffix) = scale_set_key(path)?;
    if answer.status >= 400 {
        return (*method != Method::GET || answer.status == 429 || answer.status >= 500).then(|| {
            let code = answer.body.as_ref().and_then(|b| b["error"]["code"].as_str()).unwrap_or_default();
            format!(
                "ARM answered {method} {} with {} {code}",
                if suffix.is_empty() { "(scale set)" } else { suffix.as_str() },
                answer.status
            )
        });
    }
    match (method.as_str(), suffix.as_str()) {
        ("PATCH", "") => {
            let profile = &body["properties"]["virtualMachineProfile"];
            let artifact = profile["storageProfile"]["imageReference"]["id"]
                .as_str()
                .map(super::short_artifact)
                .or_else(|| {
                    profile["applicationProfile"]["galleryApplications"].as_array().map(|a| {
                        a.iter().filter_map(|x| x["packageReferenceId"].as_str()).map(super::short_artifact).collect::<Vec<_>>().join(", ")
                    })
                })
                .unwrap_or_else(|| "tags".into());
            let tags = &body["tags"];
            Some(match tags["deploychain.rolledback"].as_str() {
                Some(failed) => format!("rolling back to {artifact} (run {failed} failed)"),
                None => format!("model updated to {artifact} for run {}", tags["deploychain.run"].as_str().unwrap_or("?")),
            })
        }
        ("POST", "/manualupgrade") => {
            let ids: Vec<&str> = body["instanceIds"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
            Some(format!("upgrading instance{} {}", if ids.len() == 1 { "" } else { "s" }, ids.join(", ")))
        }
        _ => None,
    }
}

fn display(health: &str) -> &'static str {
    match health {
        "HealthState/healthy" => "The VM is healthy",
        "HealthState/initializing" => "The VM health is initializing",
        _ => "The VM is unhealthy",
    }
}

/// `(lower-case scale set id, lower-case suffix)` of a path under a scale set.
fn scale_set_key(path: &str) -> Option<(String, String)> {
    let lower = path.to_ascii_lowercase();
    let i = lower.find(SCALE_SETS)? + SCALE_SETS.len();
    let rest = &lower[i..];
    let end = rest.find('/').unwrap_or(rest.len());
    if end == 0 || !lower.starts_with("/subscriptions/") {
        return None;
    }
    Some((lower[..i + end].to_string(), rest[end..].trim_end_matches('/').to_string()))
}

fn resource_group(path: &str) -> &str {
    let mut parts = path.split('/');
    while let Some(p) = parts.next() {
        if p.eq_ignore_ascii_case("resourcegroups") {
            return parts.next().unwrap_or_default();
        }
    }
    ""
}

pub(super) fn operation(s: &State, name: &str, monitor: bool) -> Answer {
    let Some(op) = s.world.operations.get(name) else {
        return Answer::error(404, "NotFound", format!("The operation {name} was not found."));
    };
    if monitor {
        return match op.status.as_deref() {
            None => Answer::empty(202),
            Some("Succeeded") => Answer::empty(200),
            Some(_) => Answer::json(400, json!({ "error": op.fail_with })),
        };
    }
    let mut b = json!({ "name": op.name, "status": op.status.as_deref().unwrap_or("InProgress"), "startTime": rfc3339(op.start_ms) });
    if op.status.is_some() {
        b["endTime"] = rfc3339(op.ready_ms).into();
    }
    if let (Some("Failed"), Some(e)) = (op.status.as_deref(), &op.fail_with) {
        b["error"] = e.clone();
    }
    Answer::json(200, b)
}

fn rolling_latest(s: &State, key: &str, id: &str) -> Answer {
    let ss = &s.world.scale_sets[key];
    let Some(r) = ss.rolling.as_ref() else {
        return Answer::error(404, "NotFound", "The entity was not found in this Azure location.");
    };
    let mut b = LocalArm::rolling_example();
    b["id"] = format!("{id}/rollingUpgrades/latest").into();
    b["name"] = "latest".into();
    b["type"] = "Microsoft.Compute/virtualMachineScaleSets/rollingUpgrades".into();
    b["location"] = ss.body["location"].clone();
    if let Some(p) = ss.body["properties"]["upgradePolicy"].get("rollingUpgradePolicy") {
        b["properties"]["policy"] = p.clone();
    }
    let (code, last) = match &r.end {
        Some((code, at)) => (code.clone(), rfc3339(*at)),
        None => ("RollingForward".to_string(), r.start.clone()),
    };
    b["properties"]["runningStatus"] = json!({ "code": code, "startTime": r.start, "lastAction": "Start", "lastActionTime": last });
    let failed = usize::from(code == "Faulted");
    b["properties"]["progress"] = json!({
        "successfulInstanceCount": r.done - failed, "failedInstanceCount": failed,
        "inProgressInstanceCount": usize::from(r.end.is_none() && r.done < r.schedule.len()),
        "pendingInstanceCount": r.schedule.len().saturating_sub(r.done + usize::from(r.end.is_none() && r.done < r.schedule.len())),
    });
    match &r.error {
        Some(e) => b["properties"]["error"] = e.clone(),
        None => {
            if let Some(p) = b["properties"].as_object_mut() {
                p.remove("error");
            }
        }
    }
    Answer::json(200, b)
}

/// The applications' network. As a proxy it sees `GET http://web-staging.internal/healthz`; asked
/// directly, `GET /web-staging/healthz`. Either way the first name is the scale set's.
async fn app(Ax(arm): Ax<LocalArm>, method: Method, uri: Uri, headers: HeaderMap) -> Response {
    let host = uri.host().map(str::to_string).or_else(|| headers.get("host").and_then(|h| h.to_str().ok()).map(str::to_string));
    let name = match host.as_deref().map(|h| h.split(':').next().unwrap_or(h)) {
        Some(h) if h.parse::<std::net::IpAddr>().is_err() && h != "localhost" => h.split('.').next().unwrap_or(h).to_string(),
        _ => uri.path().trim_start_matches('/').split('/').next().unwrap_or_default().to_string(),
    };
    let mut s = arm.lock();
    let now = now_ms();
    if s.world.advance(now) {
        let _ = s.save();
    }
    let (status, text) = s
        .world
        .app_answer(&name, now)
        .unwrap_or((502, format!("no application of the local stack answers for `{name}` (no scale set by that name)\n")));
    log_request(
        &s.conn,
        &Request {
            seq: 0,
            app: Some(name.clone()),
            at: chrono::DateTime::from_timestamp_millis(now).unwrap_or_default(),
            method: method.to_string(),
            path: uri.path().to_string(),
            query: uri.query().unwrap_or_default().to_string(),
            if_match: None,
            authorized: headers.contains_key("authorization"),
            body: Value::Null,
            status,
        },
    );
    drop(s);
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY))
        .header("content-type", "text/plain; charset=utf-8")
        .body(Body::from(text))
        .unwrap_or_else(|_| Response::new(Body::empty()))
}
