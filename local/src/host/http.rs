//! The HTTP front door: `/{routePrefix}/{route}` with ASP.NET-style route templates, the method
//! filter (no match → 404), `authLevel` key checks (`x-functions-key` header first, then the `code`
//! query; failure → 401), then the default-mode invocation and the mapping of `Outputs.res`.
//! A handler failure (non-2xx, not JSON, timeout) reaches the caller as an empty 500, as in Azure.
//!
//! Before any of that, the limits the Functions host's web server (Kestrel) applies in Azure, so
//! that what the handler is tested behind locally refuses what Azure refuses ([`Limits`]): a URL
//! over 4 KiB → 414; over 100 headers or 32 KiB of them → 431; a body over 100 MB → 413; a body
//! that arrives slower than 240 bytes a second after a 5 s grace → 408; request headers not
//! complete within 30 s (Kestrel's `RequestHeadersTimeout`) → the connection is closed ([`serve`]).

use super::app::{AuthLevel, FunctionApp, HttpTrigger, Trigger};
use super::envelope::{HttpInput, check_answer, http_envelope, http_output};
use super::worker::Worker;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::Response;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Function keys, as the host keeps them: the master key (admin) and the default function key.
#[derive(Debug, Clone)]
pub struct Keys {
    pub master: String,
    pub function: String,
}

struct Route {
    function: String,
    trigger: HttpTrigger,
    segments: Vec<Segment>,
    outputs: Vec<super::app::BusOutput>,
    has_return: bool,
}

#[derive(Debug, Clone, PartialEq)]
enum Segment {
    Literal(String),
    Param { name: String, optional: bool, int: bool },
    CatchAll(String),
}

fn parse_template(t: &str) -> Vec<Segment> {
    t.split('/')
        .filter(|s| !s.is_empty())
        .map(|s| {
            if let Some(inner) = s.strip_prefix('{').and_then(|x| x.strip_suffix('}')) {
                if let Some(name) = inner.strip_prefix('*') {
                    return Segment::CatchAll(name.trim_end_matches('?').to_string());
                }
                let optional = inner.ends_with('?');
                let inner = inner.trim_end_matches('?');
                let (name, constraint) = inner.split_once(':').unwrap_or((inner, ""));
                Segment::Param { name: name.to_string(), optional, int: constraint == "int" }
            } else {
                Segment::Literal(s.to_ascii_lowercase())
            }
        })
        .collect()
}

fn match_route(segments: &[Segment], path: &[&str]) -> Option<BTreeMap<String, String>> {
    let mut params = BTreeMap::new();
    let mut i = 0;
    for seg in segments {
        match seg {
            Segment::Literal(l) => {
                if path.get(i).map(|p| p.to_ascii_lowercase()) != Some(l.clone()) {
                    return None;
                }
                i += 1;
            }
            Segment::Param { name, optional, int } => match path.get(i) {
                Some(p) => {
                    if *int && p.parse::<i64>().is_err() {
                        return None;
                    }
                    params.insert(name.clone(), percent_decode(p));
                    i += 1;
                }
                None if *optional => {}
                None => return None,
            },
            Segment::CatchAll(name) => {
                params.insert(name.clone(), path[i.min(path.len())..].iter().map(|p| percent_decode(p)).collect::<Vec<_>>().join("/"));
                i = path.len();
            }
        }
    }
    (i == path.len()).then_some(params)
}

fn percent_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={}", s.replace('+', "%2B")).as_bytes()).next().map(|(_, v)| v.into_owned()).unwrap_or_default()
}

/// The request limits of the Functions host in Azure (its web server's defaults, and the
/// documented 100 MB request and 4 KiB URL limits of HTTP triggers).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_url: usize,
    pub max_headers: usize,
    pub max_header_bytes: usize,
    pub max_body: usize,
    /// A body slower than `min_body_rate` bytes a second, once `body_grace` has passed, is cut off.
    pub min_body_rate: u64,
    pub body_grace: std::time::Duration,
    /// How long a client may take to send a request's line and headers (Kestrel's
    /// `RequestHeadersTimeout`): a slowloris sending a header line now and then is cut off.
    pub headers_timeout: std::time::Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_url: 4096,
            max_headers: 100,
            max_header_bytes: 32 * 1024,
            max_body: 100 * 1024 * 1024,
            min_body_rate: 240,
            body_grace: std::time::Duration::from_secs(5),
            headers_timeout: std::time::Duration::from_secs(30),
        }
    }
}

/// Serve the front door on `listener` until `stop` turns true, then let open requests finish
/// (up to the host's drain). Its own accept loop rather than `axum::serve`, which sets no timer
/// and so no header-read timeout: a connection whose headers are not complete within
/// `headers_timeout` is closed, having invoked nothing.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    mut stop: tokio::sync::watch::Receiver<bool>,
    headers_timeout: std::time::Duration,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(headers_timeout);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|s| *s) => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, or a connection reset before it was accepted: go on.
                tracing::warn!(target: "host", "front door accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                continue;
            }
        };
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(target: "host", "front door connection ended: {e}");
            }
        });
    }
    let _ = tokio::time::timeout(super::DRAIN, graceful.shutdown()).await;
}

pub struct FrontDoor {
    prefix: String,
    limits: Limits,
    routes: Vec<Route>,
    worker: Worker,
    keys: Keys,
    timeout: std::time::Duration,
    /// Where `serviceBus` output bindings send.
    broker: deploychain_bus::Broker,
    strict_outputs: bool,
}

impl FrontDoor {
    pub fn new(app: &FunctionApp, worker: Worker, keys: Keys, broker: deploychain_bus::Broker) -> Arc<FrontDoor> {
        let routes = app
            .functions
            .iter()
            .filter_map(|f| match &f.trigger {
                Trigger::Http(h) => Some(Route {
                    function: f.name.clone(),
                    trigger: h.clone(),
                    segments: parse_template(&h.route),
                    outputs: f.outputs.clone(),
                    has_return: f.has_return,
                }),
                Trigger::ServiceBus(_) | Trigger::Timer(_) => None,
            })
            .collect();
        Arc::new(FrontDoor {
            prefix: app.host.route_prefix.clone(),
            limits: Limits::default(),
            routes,
            worker,
            keys,
            timeout: app.host.function_timeout,
            broker,
            strict_outputs: app.host.strict_outputs,
        })
    }

    pub fn router(self: Arc<Self>) -> axum::Router {
        let max = self.limits.max_body;
        axum::Router::new().fallback(handle).layer(axum::extract::DefaultBodyLimit::max(max)).with_state(self)
    }

    fn authorize(&self, level: AuthLevel, header_key: Option<&str>, code: Option<&str>) -> Option<&'static str> {
        let key = header_key.or(code);
        let is_master = key.is_some_and(|k| constant_eq(k, &self.keys.master));
        let is_function = key.is_some_and(|k| constant_eq(k, &self.keys.function));
        match level {
            AuthLevel::Anonymous => Some(if is_master {
                "Admin"
            } else if is_function {
                "Function"
            } else {
                ""
            }),
            AuthLevel::Function if is_master => Some("Admin"),
            AuthLevel::Function if is_function => Some("Function"),
            AuthLevel::Admin if is_master => Some("Admin"),
            _ => None,
        }
    }
}

fn constant_eq(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn empty(status: StatusCode) -> Response {
    let mut r = Response::new(Body::empty());
    *r.status_mut() = status;
    r
}

/// Read the body within the limits: at most `max_body` bytes, and no slower than
/// `min_body_rate` bytes a second once `body_grace` has passed (a slow-body attack holds a
/// connection and a worker for as long as the server waits).
async fn read_body(body: Body, limits: &Limits) -> Result<Bytes, StatusCode> {
    use http_body_util::BodyExt;
    let start = tokio::time::Instant::now();
    let mut body = body;
    let mut out = Vec::new();
    loop {
        let allowed = limits.body_grace + std::time::Duration::from_secs_f64(out.len() as f64 / limits.min_body_rate.max(1) as f64);
        let frame = match tokio::time::timeout_at(start + allowed, body.frame()).await {
            Err(_) => return Err(StatusCode::REQUEST_TIMEOUT),
            Ok(None) => return Ok(Bytes::from(out)),
            Ok(Some(Err(_))) => return Err(StatusCode::BAD_REQUEST),
            Ok(Some(Ok(f))) => f,
        };
        if let Ok(data) = frame.into_data() {
            if out.len() + data.len() > limits.max_body {
                return Err(StatusCode::PAYLOAD_TOO_LARGE);
            }
            out.extend_from_slice(&data);
        }
    }
}

/// The URL and header limits; `None` when the request is within them.
fn over_limits(parts: &axum::http::request::Parts, limits: &Limits) -> Option<StatusCode> {
    let url = parts.uri.path_and_query().map(|p| p.as_str().len()).unwrap_or(0);
    if url > limits.max_url {
        return Some(StatusCode::URI_TOO_LONG);
    }
    let bytes: usize = parts.headers.iter().map(|(k, v)| k.as_str().len() + v.len() + 4).sum();
    if parts.headers.len() > limits.max_headers || bytes > limits.max_header_bytes {
        return Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    }
    None
}

async fn handle(State(fd): State<Arc<FrontDoor>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    if let Some(status) = over_limits(&parts, &fd.limits) {
        tracing::info!(target: "host", status = status.as_u16(), "refused before routing: over the host's request limits");
        return empty(status);
    }
    let path = parts.uri.path().to_string();
    let rest = match path.trim_start_matches('/').strip_prefix(&fd.prefix) {
        Some(r) if fd.prefix.is_empty() || r.is_empty() || r.starts_with('/') => r.trim_start_matches('/').to_string(),
        _ => return empty(StatusCode::NOT_FOUND),
    };
    let segs: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    let method = parts.method.as_str().to_ascii_lowercase();
    let Some((route, params)) = fd
        .routes
        .iter()
        .filter(|r| r.trigger.methods.is_empty() || r.trigger.methods.contains(&method))
        .find_map(|r| match_route(&r.segments, &segs).map(|p| (r, p)))
    else {
        return empty(StatusCode::NOT_FOUND);
    };
    let query: Vec<(String, String)> = parts
        .uri
        .query()
        .map(|q| url::form_urlencoded::parse(q.as_bytes()).map(|(k, v)| (k.into_owned(), v.into_owned())).collect())
        .unwrap_or_default();
    let code = query.iter().find(|(k, _)| k == "code").map(|(_, v)| v.as_str());
    let header_key = parts.headers.get("x-functions-key").and_then(|v| v.to_str().ok());
    let Some(level) = fd.authorize(route.trigger.auth_level, header_key, code) else {
        tracing::info!(target: "host", function = route.function, "401: missing or wrong function key");
        return empty(StatusCode::UNAUTHORIZED);
    };
    let body: Bytes = match read_body(body, &fd.limits).await {
        Ok(b) => b,
        Err(status) => {
            tracing::info!(target: "host", function = route.function, status = status.as_u16(), "the request body was refused");
            return empty(status);
        }
    };
    // The host copies a body only when the request says its length (reference §2.5): a chunked
    // body without Content-Length reaches the function as no body at all.
    let has_length =
        parts.headers.get("content-length").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok()).is_some_and(|n| n > 0);
    let body = if has_length {
        body
    } else {
        if !body.is_empty() {
            tracing::warn!(target: "host", function = route.function, bytes = body.len(), "a body sent without Content-Length is dropped, as the Functions host does");
        }
        Bytes::new()
    };
    let host = parts.headers.get("host").and_then(|v| v.to_str().ok()).unwrap_or("127.0.0.1").to_string();
    let headers: Vec<(String, String)> =
        parts.headers.iter().filter_map(|(k, v)| v.to_str().ok().map(|v| (k.as_str().to_string(), v.to_string()))).collect();
    let input = HttpInput {
        method: method.to_ascii_uppercase(),
        url: format!("http://{host}{}", parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/")),
        query,
        headers,
        params,
        body: body.to_vec(),
    };
    let envelope = http_envelope(&route.function, &route.trigger.binding, &input, (!level.is_empty()).then_some(level));
    let answer = match fd.worker.invoke(&route.function, &envelope, fd.timeout).await {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(target: "host", function = route.function, "invocation failed: {e:?}");
            return empty(StatusCode::INTERNAL_SERVER_ERROR);
        }
    };
    if !(200..300).contains(&answer.status) {
        tracing::error!(target: "host", function = route.function, status = answer.status, "the handler answered non-2xx");
        return empty(StatusCode::INTERNAL_SERVER_ERROR);
    }
    let v = match check_answer(answer.content_type.as_deref(), &answer.body) {
        Ok(v) => v,
        Err(why) => {
            tracing::error!(target: "host", function = route.function, "{why}");
            return empty(StatusCode::INTERNAL_SERVER_ERROR);
        }
    };
    if let Some(logs) = v.get("Logs").and_then(|l| l.as_array()) {
        for l in logs.iter().filter_map(|l| l.as_str()) {
            tracing::info!(target: "function", function = route.function, "{l}");
        }
    }
    if let Err(why) = super::send_outputs(&fd.broker, &route.outputs, route.has_return, &v, fd.strict_outputs).await {
        tracing::error!(target: "host", function = route.function, "{why}");
        return empty(StatusCode::INTERNAL_SERVER_ERROR);
    }
    let Some(out) = http_output(&v, route.trigger.output.as_deref()) else {
        tracing::error!(target: "host", function = route.function, "Outputs.res is not an HTTP response object");
        return empty(StatusCode::INTERNAL_SERVER_ERROR);
    };
    let mut rsp = Response::new(Body::from(out.body));
    *rsp.status_mut() = StatusCode::from_u16(out.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    for (k, v) in out.headers {
        if let (Ok(k), Ok(v)) = (HeaderName::try_from(k.as_str()), HeaderValue::try_from(v.as_str())) {
            rsp.headers_mut().append(k, v);
        }
    }
    rsp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_templates_match_like_aspnet() {
        let t = parse_template("runs/{id?}");
        assert_eq!(match_route(&t, &["runs"]), Some(BTreeMap::new()));
        assert_eq!(match_route(&t, &["runs", "web-1"]).and_then(|p| p.get("id").cloned()).as_deref(), Some("web-1"));
        assert_eq!(match_route(&t, &["runs", "a", "b"]), None);
        let t = parse_template("approvals/{id}");
        assert_eq!(match_route(&t, &["approvals"]), None);
        assert_eq!(match_route(&t, &["Approvals", "a%40b"]).and_then(|p| p.get("id").cloned()).as_deref(), Some("a@b"));
        let t = parse_template("orders/{id:int}");
        assert_eq!(match_route(&t, &["orders", "x"]), None);
        let t = parse_template("files/{*rest}");
        assert_eq!(match_route(&t, &["files", "a", "b"]).and_then(|p| p.get("rest").cloned()).as_deref(), Some("a/b"));
    }
}
