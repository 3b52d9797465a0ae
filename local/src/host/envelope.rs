//! The invocation envelope exactly as the Azure Functions host builds it for a custom handler
//! (`shared/reference/functions-protocol.md` §2–§3), and the reading of the handler's answer.
//!
//! Quirks reproduced on purpose, because the deployed handler meets them in Azure: every
//! `Metadata` value (and string `Data`) is `JsonConvert.SerializeObject`-ed (`"\"m-1\""`, `"1"`);
//! dates lose sub-second precision and have no `Z`; null values are omitted; a string trigger
//! with a JSON-object body has its top-level fields merged into `Metadata`; the settlement
//! objects are `{}`; HTTP bodies are passed only when `Content-Length > 0`, as text, or base64
//! for binary media types.

use super::app::BusTrigger;
use base64::Engine;
use chrono::{DateTime, SecondsFormat, Utc};
use deploychain_bus::Message;
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;

/// `JsonConvert.SerializeObject` of a string.
pub fn enc(s: &str) -> Value {
    Value::String(Value::String(s.to_string()).to_string())
}

fn dt(t: DateTime<Utc>) -> Value {
    json!(t.format("%Y-%m-%dT%H:%M:%S").to_string())
}

fn dto(t: DateTime<Utc>) -> Value {
    json!(t.format("%Y-%m-%dT%H:%M:%S+00:00").to_string())
}

pub fn sys(function: &str) -> Value {
    json!({ "MethodName": function, "UtcNow": Utc::now().to_rfc3339_opts(SecondsFormat::AutoSi, true), "RandGuid": uuid::Uuid::new_v4().to_string() })
}

/// Merge the top-level fields of a JSON-object body into metadata, as `Utility.ApplyBindingData`
/// does: objects as objects, scalars as encoded strings, arrays and nulls skipped. Keys are
/// case-insensitive there, so a body field overwrites a same-named binding-data entry.
fn merge_body_fields(meta: &mut Map<String, Value>, body: &[u8]) {
    let Ok(Value::Object(o)) = serde_json::from_slice::<Value>(body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body)) else {
        return;
    };
    for (k, v) in o {
        let v = match v {
            Value::Object(_) => v,
            Value::Array(_) | Value::Null => continue,
            Value::String(s) => enc(&s),
            other => enc(&other.to_string()),
        };
        if let Some(existing) = meta.keys().find(|e| e.eq_ignore_ascii_case(&k)).cloned() {
            meta.remove(&existing);
        }
        meta.insert(k, v);
    }
}

/// The request the front door received.
#[derive(Debug, Clone, Default)]
pub struct HttpInput {
    pub method: String,
    /// Absolute URL as the caller used it, including the query string.
    pub url: String,
    pub query: Vec<(String, String)>,
    pub headers: Vec<(String, String)>,
    pub params: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

fn is_binary_media(content_type: &str) -> bool {
    let ct = content_type.to_ascii_lowercase();
    ct.starts_with("application/octet-stream") || ct.starts_with("multipart/")
}

/// `{"Data":{"req":{Url,Method,Query,Headers,Params,Identities,Body}},"Metadata":{…}}` (§2.5).
pub fn http_envelope(function: &str, binding: &str, input: &HttpInput, identity_level: Option<&str>) -> Value {
    let mut query: Map<String, Value> = Map::new();
    for (k, v) in &input.query {
        match query.get_mut(k) {
            Some(Value::String(s)) => {
                s.push(',');
                s.push_str(v);
            }
            _ => {
                query.insert(k.clone(), json!(v));
            }
        }
    }
    let mut headers_arr: Map<String, Value> = Map::new();
    let mut headers_joined: Map<String, Value> = Map::new();
    for (k, v) in &input.headers {
        match headers_arr.get_mut(k) {
            Some(Value::Array(a)) => a.push(json!(v)),
            _ => {
                headers_arr.insert(k.clone(), json!([v]));
            }
        }
        match headers_joined.get_mut(k) {
            Some(Value::String(s)) => {
                s.push(',');
                s.push_str(v);
            }
            _ => {
                headers_joined.insert(k.clone(), json!(v));
            }
        }
    }
    let identities = match identity_level {
        Some(level) => json!([{
            "AuthenticationType": "WebJobsAuthLevel", "IsAuthenticated": true, "Actor": null, "BootstrapContext": null, "Label": null, "Name": null,
            "Claims": [
                { "Type": "http://schemas.microsoft.com/2017/07/functions/claims/authlevel", "Value": level },
                { "Type": "http://schemas.microsoft.com/2017/07/functions/claims/invoke", "Value": "true" },
                { "Type": "http://schemas.microsoft.com/2017/07/functions/claims/keyid", "Value": "default" }
            ],
            "NameClaimType": "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/name", "RoleClaimType": "http://schemas.microsoft.com/ws/2008/06/identity/claims/role"
        }]),
        None => json!([{
            "AuthenticationType": null, "IsAuthenticated": false, "Actor": null, "BootstrapContext": null, "Claims": [], "Label": null, "Name": null,
            "NameClaimType": "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/name", "RoleClaimType": "http://schemas.microsoft.com/ws/2008/06/identity/claims/role"
        }]),
    };
    let mut req = Map::new();
    req.insert("Url".into(), json!(input.url));
    req.insert("Method".into(), json!(input.method.to_ascii_uppercase()));
    req.insert("Query".into(), Value::Object(query.clone()));
    req.insert("Headers".into(), Value::Object(headers_arr));
    req.insert("Params".into(), Value::Object(input.params.iter().map(|(k, v)| (k.clone(), json!(v))).collect()));
    req.insert("Identities".into(), identities);
    let content_type = input.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case("content-type")).map(|(_, v)| v.as_str()).unwrap_or("");
    if !input.body.is_empty() {
        let b = if is_binary_media(content_type) {
            base64::engine::general_purpose::STANDARD.encode(&input.body)
        } else {
            String::from_utf8_lossy(&input.body).into_owned()
        };
        req.insert("Body".into(), json!(b));
    }
    let mut meta = Map::new();
    for (k, v) in &query {
        if k != "code" {
            meta.insert(k.clone(), enc(v.as_str().unwrap_or_default()));
        }
    }
    for (k, v) in &input.params {
        meta.insert(k.clone(), enc(v));
    }
    if !input.body.is_empty() && !is_binary_media(content_type) {
        merge_body_fields(&mut meta, &input.body);
    }
    meta.insert("Query".into(), Value::Object(query));
    meta.insert("Headers".into(), Value::Object(headers_joined));
    meta.insert("sys".into(), sys(function));
    json!({ "Data": { binding: Value::Object(req) }, "Metadata": Value::Object(meta) })
}

/// A single-message `serviceBusTrigger` invocation (§2.2–§2.4).
pub fn bus_envelope(function: &str, trigger: &BusTrigger, m: &Message, namespace: &str) -> Value {
    let mut meta = Map::new();
    for k in ["MessageReceiver", "MessageSession", "MessageActions", "SessionActions", "ReceiveActions"] {
        meta.insert(k.into(), json!({}));
    }
    meta.insert(
        "Client".into(),
        json!({ "FullyQualifiedNamespace": format!("{namespace}.servicebus.windows.net"), "IsClosed": false, "TransportType": 0, "Identifier": format!("{namespace}-local-host") }),
    );
    meta.insert("DeliveryCount".into(), json!(m.delivery_count.to_string()));
    if let Some(t) = m.lock_token {
        meta.insert("LockToken".into(), enc(&t.to_string()));
    }
    let expires = m.expires_at.unwrap_or(DateTime::<Utc>::MAX_UTC);
    meta.insert("ExpiresAtUtc".into(), if m.expires_at.is_some() { dt(expires) } else { json!("9999-12-31T23:59:59") });
    meta.insert("ExpiresAt".into(), if m.expires_at.is_some() { dto(expires) } else { json!("9999-12-31T23:59:59+00:00") });
    meta.insert("EnqueuedTimeUtc".into(), dt(m.enqueued_at));
    meta.insert("EnqueuedTime".into(), dto(m.enqueued_at));
    meta.insert("MessageId".into(), enc(&m.message_id));
    let opt = |meta: &mut Map<String, Value>, k: &str, v: &Option<String>| {
        if let Some(v) = v {
            meta.insert(k.to_string(), enc(v));
        }
    };
    opt(&mut meta, "ContentType", &m.content_type);
    opt(&mut meta, "CorrelationId", &m.correlation_id);
    opt(&mut meta, "ReplyTo", &m.reply_to);
    opt(&mut meta, "To", &m.to);
    opt(&mut meta, "Subject", &m.label);
    opt(&mut meta, "Label", &m.label);
    opt(&mut meta, "SessionId", &m.session_id);
    opt(&mut meta, "DeadLetterSource", &m.dead_letter_source);
    meta.insert("SequenceNumber".into(), json!(m.sequence_number.to_string()));
    let props: Map<String, Value> = m.properties.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    meta.insert("ApplicationProperties".into(), Value::Object(props.clone()));
    meta.insert("UserProperties".into(), Value::Object(props));
    meta.insert("sys".into(), sys(function));
    let data = if trigger.binary {
        json!(base64::engine::general_purpose::STANDARD.encode(&m.body))
    } else {
        // string dataType: strict UTF-8 body, JSON-encoded once more, body fields merged.
        let text = String::from_utf8_lossy(&m.body).into_owned();
        if text.trim_start().starts_with('{') {
            merge_body_fields(&mut meta, &m.body);
        }
        enc(&text)
    };
    json!({ "Data": { trigger.binding.clone(): data }, "Metadata": Value::Object(meta) })
}

/// What the handler answered, as the host interprets it.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpOutput {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// Map `Outputs.<res>` to the caller's response (§3.4). `None` means the host would fail the
/// invocation (the caller then gets an empty 500).
pub fn http_output(answer: &Value, output: Option<&str>) -> Option<HttpOutput> {
    let res = match output {
        Some("$return") => answer.get("ReturnValue").cloned().unwrap_or(Value::Null),
        Some(name) => answer
            .get("Outputs")
            .and_then(Value::as_object)
            .and_then(|o| o.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.clone()))
            .unwrap_or(Value::Null),
        None => Value::Null,
    };
    let res = match res {
        // A string holding the JSON object is accepted too.
        Value::String(s) => serde_json::from_str::<Value>(&s).ok().filter(Value::is_object)?,
        Value::Null => return Some(HttpOutput { status: 200, headers: Vec::new(), body: Vec::new() }),
        Value::Object(_) => res,
        _ => return None,
    };
    let field = |k: &str| res.as_object().and_then(|o| o.iter().find(|(key, _)| key.eq_ignore_ascii_case(k)).map(|(_, v)| v.clone()));
    let status = match field("statusCode") {
        None | Some(Value::Null) => 200,
        Some(Value::Number(n)) => n.as_u64()? as u16,
        Some(Value::String(s)) => s.parse().ok()?,
        Some(_) => return None,
    };
    let mut headers: Vec<(String, String)> = field("headers")
        .and_then(|h| h.as_object().cloned())
        .map(|o| o.into_iter().map(|(k, v)| (k, v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string()))).collect())
        .unwrap_or_default();
    let has_ct = headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("content-type"));
    let body = match field("body") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => s.into_bytes(),
        // Objects and arrays are written as indented JSON text.
        Some(other) => serde_json::to_string_pretty(&other).unwrap_or_default().into_bytes(),
    };
    if !has_ct && !body.is_empty() {
        headers.push(("Content-Type".into(), "text/plain; charset=utf-8".into()));
    }
    Some(HttpOutput { status, headers, body })
}

/// The answer must be a JSON object (an empty or `null` body makes the real host wait until
/// functionTimeout; the local host fails it at once and says why).
pub fn check_answer(content_type: Option<&str>, body: &[u8]) -> Result<Value, String> {
    let ct = content_type.unwrap_or("").to_ascii_lowercase();
    if !(ct.starts_with("application/json") || ct.starts_with("text/json")) {
        return Err(format!("the handler answered with content type `{ct}`; the host needs application/json"));
    }
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("the handler's answer is not JSON: {e}"))?;
    if !v.is_object() {
        return Err("the handler answered null or a non-object; the real host would wait until functionTimeout".into());
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_envelope_has_the_hosts_shape() {
        let input = HttpInput {
            method: "post".into(),
            url: "http://127.0.0.1:7071/api/orders/42?verbose=true&code=abc".into(),
            query: vec![("verbose".into(), "true".into()), ("code".into(), "abc".into())],
            headers: vec![("content-type".into(), "application/json".into()), ("accept".into(), "*/*".into())],
            params: BTreeMap::from([("id".to_string(), "42".to_string())]),
            body: br#"{"qty":2,"nested":{"a":1},"list":[1]}"#.to_vec(),
        };
        let v = http_envelope("UpsertOrder", "req", &input, Some("Function"));
        assert_eq!(v["Data"]["req"]["Method"], "POST");
        assert_eq!(v["Data"]["req"]["Headers"]["accept"], json!(["*/*"]));
        assert_eq!(v["Data"]["req"]["Body"], r#"{"qty":2,"nested":{"a":1},"list":[1]}"#);
        assert_eq!(v["Metadata"]["verbose"], "\"true\"");
        assert!(v["Metadata"].get("code").is_none());
        assert_eq!(v["Metadata"]["id"], "\"42\"");
        assert_eq!(v["Metadata"]["qty"], "\"2\"");
        assert_eq!(v["Metadata"]["nested"], json!({"a": 1}));
        assert!(v["Metadata"].get("list").is_none());
        assert_eq!(v["Metadata"]["Headers"]["accept"], "*/*");
        assert_eq!(v["Metadata"]["Query"]["code"], "abc");
    }

    #[test]
    fn outputs_map_to_the_callers_response() {
        let a = json!({"Outputs": {"res": {"statusCode": 401, "headers": {"Content-Type": "application/json"}, "body": "{\"error\":\"x\"}"}}, "Logs": [], "ReturnValue": null});
        let o = http_output(&a, Some("res")).unwrap_or_else(|| panic!("valid"));
        assert_eq!(o.status, 401);
        assert_eq!(o.body, b"{\"error\":\"x\"}".to_vec());
        let a = json!({"Outputs": {"res": {"body": {"a": 1}}}});
        let o = http_output(&a, Some("res")).unwrap_or_else(|| panic!("valid"));
        assert_eq!(o.status, 200);
        assert!(o.headers.iter().any(|(k, v)| k == "Content-Type" && v.starts_with("text/plain")));
        assert_eq!(http_output(&json!({"Outputs": {"res": "plain text"}}), Some("res")), None);
        assert!(check_answer(Some("text/plain"), b"{}").is_err());
        assert!(check_answer(Some("application/json"), b"null").is_err());
        assert!(check_answer(Some("application/json; charset=utf-8"), b"{}").is_ok());
    }
}
