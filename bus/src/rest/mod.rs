//! The Service Bus REST data-plane subset over HTTP, enough for the unmodified
//! `azure_messaging_servicebus` 0.21 client (functions-protocol.md §7–§8): send (single and
//! batch), peek-lock, receive-and-delete, unlock, complete, renew — on queues, subscriptions and
//! their `$DeadLetterQueue` — with SAS authorization, plus `GET /$health`.
//!
//! Paths are relative to the namespace root; the host is ignored. Status codes are Service Bus's:
//! 201 sent/locked, 200 settled/received, 204 nothing to receive, 400 bad request, 401 bad or
//! missing SAS (checked before anything else happens), 404 lock lost, 410 no such entity,
//! 413 message too large.
//!
//! Application properties travel as headers: a property sent through HTTP arrives with its name
//! lower-cased (HTTP/1 header names are case-insensitive and hyper lower-cases them), which is why
//! filters and rule actions match property names case-insensitively when there is no exact match.
//! Dates (`ScheduledEnqueueTimeUtc`) are taken in the one form the REST reference documents,
//! RFC 1123 in `GMT`.

mod sas;
mod wire;

pub use sas::SasKeys;

use crate::broker::Broker;
use crate::error::BusError;
use crate::message::{Message, NewMessage};
use crate::path::EntityPath;
use crate::store::Settle;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use percent_encoding::{AsciiSet, CONTROLS, percent_decode_str, utf8_percent_encode};
use serde_json::{Map, Value};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

/// Longest and default receive long-poll (`?timeout=`), in seconds.
const MAX_TIMEOUT_SECS: u64 = 60;
const BATCH_CONTENT_TYPE: &str = "application/vnd.microsoft.servicebus.json";
/// The old docs' typo, accepted too.
const BATCH_CONTENT_TYPE_TYPO: &str = "application/vnd.microsoft.servicebus.yml";

/// What may stay unescaped in a path segment of a `Location` URL.
const SEGMENT: &AsciiSet =
    &CONTROLS.add(b' ').add(b'"').add(b'#').add(b'%').add(b'/').add(b'<').add(b'>').add(b'?').add(b'`').add(b'{').add(b'}');

#[derive(Clone)]
struct RestState {
    broker: Broker,
    auth: Arc<SasKeys>,
}

/// The REST data plane as an axum router (mount it at the namespace root).
pub fn rest_router(broker: Broker, auth: SasKeys) -> Router {
    Router::new().fallback(handle).with_state(RestState { broker, auth: Arc::new(auth) }).layer(DefaultBodyLimit::disable())
}

/// Serve [`rest_router`] on `listener` until the process ends or serving fails.
pub async fn serve_rest(broker: Broker, auth: SasKeys, listener: tokio::net::TcpListener) -> std::io::Result<()> {
    axum::serve(listener, rest_router(broker, auth)).await
}

/// [`serve_rest`] that stops (letting in-flight requests finish) when `shutdown` completes.
pub async fn serve_rest_with_shutdown(
    broker: Broker,
    auth: SasKeys,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, rest_router(broker, auth)).with_graceful_shutdown(shutdown).await
}

/// An error response: status plus Service Bus's small XML body.
struct Failure(StatusCode, String);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let detail = self.1.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
        let body = format!("<Error><Code>{}</Code><Detail>{detail}</Detail></Error>", self.0.as_u16());
        (self.0, [(header::CONTENT_TYPE, "application/xml; charset=utf-8")], body).into_response()
    }
}

impl From<BusError> for Failure {
    fn from(e: BusError) -> Failure {
        let status = match &e {
            BusError::EntityNotFound(_) => StatusCode::GONE,
            BusError::LockLost => StatusCode::NOT_FOUND,
            BusError::MessageTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            BusError::SessionRequired(_) | BusError::InvalidMessage(_) | BusError::InvalidOperation(_) => StatusCode::BAD_REQUEST,
            BusError::Topology(_) | BusError::Storage(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status.is_server_error() {
            tracing::warn!(error = %e, "service bus REST request failed");
        }
        Failure(status, e.to_string())
    }
}

fn bad_request(msg: impl Into<String>) -> Failure {
    Failure(StatusCode::BAD_REQUEST, msg.into())
}

/// The operations, by method and path shape.
enum Route {
    Send(String),
    PeekLock(String),
    ReceiveAndDelete(String),
    Settle { entity: String, id: String, token: Uuid, op: Settle },
}

fn route(method: &Method, segs: &[String]) -> Result<Route, Failure> {
    let n = segs.len();
    let is = |i: usize, word: &str| segs.get(i).is_some_and(|s| s.eq_ignore_ascii_case(word));
    let entity = |upto: usize| segs[..upto].join("/");
    let not_allowed = || Failure(StatusCode::METHOD_NOT_ALLOWED, format!("{method} is not supported here"));
    if n >= 3 && is(n - 1, "head") && is(n - 2, "messages") {
        return match *method {
            Method::POST => Ok(Route::PeekLock(entity(n - 2))),
            Method::DELETE => Ok(Route::ReceiveAndDelete(entity(n - 2))),
            _ => Err(not_allowed()),
        };
    }
    if n >= 4
        && is(n - 3, "messages")
        && let Ok(token) = Uuid::parse_str(&segs[n - 1])
    {
        let op = match *method {
            Method::PUT => Settle::Abandon,
            Method::DELETE => Settle::Complete,
            Method::POST => Settle::Renew,
            _ => return Err(not_allowed()),
        };
        return Ok(Route::Settle { entity: entity(n - 3), id: segs[n - 2].clone(), token, op });
    }
    if n >= 2 && is(n - 1, "messages") {
        return match *method {
            Method::POST => Ok(Route::Send(entity(n - 1))),
            _ => Err(not_allowed()),
        };
    }
    Err(Failure(StatusCode::NOT_FOUND, "no such Service Bus REST operation".into()))
}

async fn handle(State(s): State<RestState>, req: Request) -> Response {
    match dispatch(s, req).await {
        Ok(r) => r,
        Err(f) => f.into_response(),
    }
}

async fn dispatch(s: RestState, req: Request) -> Result<Response, Failure> {
    let (parts, body) = req.into_parts();
    let raw_path = parts.uri.path().to_string();
    let segs: Vec<String> =
        raw_path.split('/').filter(|x| !x.is_empty()).map(|x| percent_decode_str(x).decode_utf8_lossy().into_owned()).collect();

    if parts.method == Method::GET && segs.len() == 1 && (segs[0] == "$health" || segs[0] == "health") {
        return Ok((StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], r#"{"status":"healthy"}"#).into_response());
    }

    // Authorization first: a refused request has no effect at all.
    let auth = parts.headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    if let Err(why) = s.auth.verify(auth, &raw_path, chrono::Utc::now().timestamp()) {
        tracing::debug!(path = %raw_path, why, "refused a request without a valid SAS token");
        return Err(Failure(StatusCode::UNAUTHORIZED, format!("unauthorized: {why}")));
    }

    let timeout = timeout(parts.uri.query())?;
    match route(&parts.method, &segs)? {
        Route::Send(entity) => send(&s.broker, &entity, &parts.headers, body).await,
        Route::PeekLock(entity) => {
            let path = receive_path(&entity)?;
            let host = parts.headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("localhost").to_string();
            match s.broker.peek_lock(&path, timeout).await.map_err(rest_receive_error)? {
                Some(m) => Ok(message_response(StatusCode::CREATED, &m, Some((&host, &entity)))),
                None => Ok(StatusCode::NO_CONTENT.into_response()),
            }
        }
        Route::ReceiveAndDelete(entity) => {
            let path = receive_path(&entity)?;
            match s.broker.receive_and_delete(&path, timeout).await.map_err(rest_receive_error)? {
                Some(m) => Ok(message_response(StatusCode::OK, &m, None)),
                None => Ok(StatusCode::NO_CONTENT.into_response()),
            }
        }
        Route::Settle { entity, id, token, op } => {
            let path = receive_path(&entity)?;
            s.broker.settle_rest(&path, token, &id, op).await?;
            Ok(StatusCode::OK.into_response())
        }
    }
}

fn rest_receive_error(e: BusError) -> Failure {
    match e {
        BusError::SessionRequired(name) => bad_request(format!(
            "`{name}` requires sessions, and the Service Bus REST data plane has no session receive: use an AMQP client (or the embedded bus's Rust API)"
        )),
        other => other.into(),
    }
}

fn receive_path(entity: &str) -> Result<EntityPath, Failure> {
    entity.parse::<EntityPath>().map_err(Failure::from)
}

fn timeout(query: Option<&str>) -> Result<Duration, Failure> {
    let Some(q) = query else { return Ok(Duration::from_secs(MAX_TIMEOUT_SECS)) };
    for (k, v) in url::form_urlencoded::parse(q.as_bytes()) {
        if k.eq_ignore_ascii_case("timeout") {
            let secs: u64 = v.trim().parse().map_err(|_| bad_request(format!("timeout={v} is not a number of seconds")))?;
            return Ok(Duration::from_secs(secs.min(MAX_TIMEOUT_SECS)));
        }
    }
    Ok(Duration::from_secs(MAX_TIMEOUT_SECS))
}

async fn read_body(body: Body, limit: usize) -> Result<Bytes, Failure> {
    axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| Failure(StatusCode::PAYLOAD_TOO_LARGE, format!("the request body is larger than {limit} bytes")))
}

async fn send(broker: &Broker, entity: &str, headers: &HeaderMap, body: Body) -> Result<Response, Failure> {
    let max = broker.options().max_message_bytes;
    let content_type = headers.get(header::CONTENT_TYPE).map(|v| String::from_utf8_lossy(v.as_bytes()).trim().to_string());
    let is_batch = content_type.as_deref().is_some_and(|ct| {
        let base = ct.split(';').next().unwrap_or_default().trim();
        base.eq_ignore_ascii_case(BATCH_CONTENT_TYPE) || base.eq_ignore_ascii_case(BATCH_CONTENT_TYPE_TYPO)
    });
    if is_batch {
        let bytes = read_body(body, max.saturating_mul(2).saturating_add(64 * 1024)).await?;
        let items: Vec<wire::BatchItem> =
            serde_json::from_slice(&bytes).map_err(|e| bad_request(format!("the batch is not a JSON array of messages: {e}")))?;
        let msgs = items.into_iter().map(wire::BatchItem::into_message).collect::<Result<Vec<_>, _>>().map_err(bad_request)?;
        broker.send_batch(entity, msgs).await?;
        return Ok(sent());
    }

    let bytes = read_body(body, max.saturating_add(1)).await?;
    let mut msg = NewMessage { body: bytes.to_vec(), content_type, ..Default::default() };
    if let Some(bp) = headers.get("brokerproperties") {
        let text = String::from_utf8_lossy(bp.as_bytes());
        let map: Map<String, Value> =
            serde_json::from_str(&text).map_err(|e| bad_request(format!("the BrokerProperties header is not a JSON object: {e}")))?;
        wire::apply_broker_properties(&map, &mut msg).map_err(bad_request)?;
    }
    for (name, value) in headers {
        if wire::is_standard_header(name.as_str()) {
            continue;
        }
        let value = String::from_utf8_lossy(value.as_bytes());
        msg.properties.insert(name.as_str().to_string(), wire::property_from_header(&value));
    }
    broker.send(entity, msg).await?;
    Ok(sent())
}

/// 201 with an empty body, as Service Bus answers a send (duplicates included).
fn sent() -> Response {
    (StatusCode::CREATED, [(header::CONTENT_TYPE, "application/xml; charset=utf-8")]).into_response()
}

/// A received message: body, Content-Type, BrokerProperties, one header per application property,
/// and for a peek-lock the `Location` of the lock.
fn message_response(status: StatusCode, m: &Message, lock: Option<(&str, &str)>) -> Response {
    let mut headers = HeaderMap::new();
    if let Some(ct) = m.content_type.as_deref().and_then(|ct| HeaderValue::from_str(ct).ok()) {
        headers.insert(header::CONTENT_TYPE, ct);
    }
    if let Ok(bp) = HeaderValue::from_str(&wire::broker_properties(m)) {
        headers.insert(HeaderName::from_static("brokerproperties"), bp);
    }
    if let (Some((host, entity)), Some(token)) = (lock, m.lock_token) {
        let entity: Vec<String> = entity.split('/').map(|seg| utf8_percent_encode(seg, SEGMENT).to_string()).collect();
        let location = format!("http://{host}/{}/messages/{}/{token}", entity.join("/"), m.sequence_number);
        if let Ok(v) = HeaderValue::from_str(&location) {
            headers.insert(header::LOCATION, v);
        }
    }
    for (name, value) in &m.properties {
        if wire::is_standard_header(name) {
            continue;
        }
        let (Ok(name), Some(value)) = (HeaderName::from_bytes(name.as_bytes()), wire::property_to_header(value)) else {
            tracing::debug!(property = %name, "application property cannot travel as an HTTP header; left out");
            continue;
        };
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(name, value);
        }
    }
    // `Body`, not `Vec<u8>`: no default Content-Type when the message has none.
    (status, headers, Body::from(m.body.clone())).into_response()
}
