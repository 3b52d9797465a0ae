//! The invocation envelope exactly as the Azure Functions host builds it for a custom handler
//! (https://learn.microsoft.com/azure/azure-functions/functions-custom-handlers; Azure/azure-functions-host
//! `src/WebJobs.Script/Workers/Http`; decision 0004), and the reading of the handler's answer.
//!
//! Quirks reproduced on purpose, because the deployed handler meets them in Azure: every
//! `Metadata` value (and string `Data`) is `JsonConvert.SerializeObject`-ed (`"\"m-1\""`, `"1"`);
//! dates lose sub-second precision and have no `Z`; null values are omitted; a string trigger
//! with a JSON-object body has its top-level fields merged into `Metadata`; the settlement
//! objects are `{}`; HTTP bodies are passed only when `Content-Length > 0`, as text, or base64
//! for binary media types.

use super::app::BusOutput;
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

/// `Outputs.<name>` (case-insensitive), after the host's `ReturnValue` merge: with no `$return`
/// binding, a `ReturnValue` object's top-level keys overwrite same-named outputs (§3.1).
fn output_value(answer: &Value, name: &str, has_return: bool) -> Value {
    let find = |v: Option<&Value>| {
        v.and_then(Value::as_object).and_then(|o| o.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.clone()))
    };
    let from_return = if has_return { None } else { find(answer.get("ReturnValue")) };
    from_return.or_else(|| find(answer.get("Outputs"))).unwrap_or(Value::Null)
}

/// What .NET's `Convert.FromBase64String` accepts (whitespace ignored, padded, length a multiple
/// of four; the empty string too).
fn dotnet_base64(s: &str) -> Option<Vec<u8>> {
    let compact: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    if !compact.len().is_multiple_of(4) {
        return None;
    }
    base64::engine::general_purpose::STANDARD.decode(compact).ok()
}

/// `(string)value` in Newtonsoft: JSON strings, numbers and booleans (`True`/`False`).
fn as_dotnet_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(if *b { "True".into() } else { "False".into() }),
        _ => None,
    }
}

/// The message bodies a `serviceBus` output binding sends for this answer, exactly as the host
/// converts them (§3.2 then §3.3): an array is one message per element (strings byte-exact, numbers
/// as text, objects as indented JSON); a string holding JSON is parsed and re-serialized indented;
/// a JSON object is indented; `null`, absent and `[]` send nothing. The base64 trap: a string,
/// number or boolean that is valid base64 becomes bytes, which the host sends as the text
/// `System.Byte[]` — in `strict` mode that is an error naming the output instead.
pub fn bus_output_messages(answer: &Value, output: &BusOutput, has_return: bool, strict: bool) -> Result<Vec<Vec<u8>>, String> {
    let value = output_value(answer, &output.name, has_return);
    if !output.binary
        && let Some(text) = as_dotnet_string(&value)
        && dotnet_base64(&text).is_some()
    {
        if strict {
            return Err(format!(
                "output `{}`: the value {value} is valid base64, so the Functions host would decode it and send the text `System.Byte[]`; \
                 send an array of strings (`[\"…\"]`) or set `dataType: binary` on the binding",
                output.name
            ));
        }
        return Ok(vec![b"System.Byte[]".to_vec()]);
    }
    let indented = |v: &Value| serde_json::to_string_pretty(v).unwrap_or_default().into_bytes();
    let element = |v: &Value| -> Option<Vec<u8>> {
        match v {
            Value::Null => None,
            Value::String(s) => Some(s.clone().into_bytes()),
            Value::Number(_) | Value::Bool(_) => as_dotnet_string(v).map(String::into_bytes),
            other => Some(indented(other)),
        }
    };
    Ok(match &value {
        Value::Null => Vec::new(),
        Value::Array(items) => items.iter().filter_map(element).collect(),
        Value::Object(_) => vec![indented(&value)],
        Value::String(s) => {
            let t = s.trim_start();
            match serde_json::from_str::<Value>(s).ok().filter(|_| t.starts_with('{') || t.starts_with('[')) {
                Some(Value::Array(items)) => items.iter().filter_map(element).collect(),
                Some(obj @ Value::Object(_)) => vec![indented(&obj)],
                _ => vec![s.clone().into_bytes()],
            }
        }
        other => element(other).into_iter().collect(),
    })
}

/// Map `Outputs.<res>` to the caller's response (§3.4). `None` means the host would fail the
/// invocation (the caller then gets an empty 500).
pub fn http_output(answer: &Value, output: Option<&str>) -> Option<HttpOutput> {
    if output == Some("$return") {
        return return_output(answer.get("ReturnValue").cloned().unwrap_or(Value::Null));
    }
    let res = match output {
        Some(name) => output_value(answer, name, false),
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

/// A `$return` HTTP binding (§3.4): a `ReturnValue` object is a response only when it has a `body`
/// key (then `statusCode`/`status`, `headers`, and an object body serialized compactly); any other
/// object is the 200 body; a string that is valid base64 is decoded to bytes.
fn return_output(v: Value) -> Option<HttpOutput> {
    let ok = |body: Vec<u8>, ct: &str| Some(HttpOutput { status: 200, headers: vec![("Content-Type".into(), ct.into())], body });
    match v {
        Value::Null => Some(HttpOutput { status: 200, headers: Vec::new(), body: Vec::new() }),
        Value::String(s) => match dotnet_base64(&s) {
            Some(bytes) => ok(bytes, "application/octet-stream"),
            None => ok(s.into_bytes(), "text/plain; charset=utf-8"),
        },
        Value::Object(o) => {
            let field = |k: &str| o.iter().find(|(key, _)| key.eq_ignore_ascii_case(k)).map(|(_, v)| v.clone());
            let Some(body) = field("body") else {
                return ok(Value::Object(o.clone()).to_string().into_bytes(), "application/json; charset=utf-8");
            };
            let status = match field("statusCode").or_else(|| field("status")) {
                None | Some(Value::Null) => 200,
                Some(Value::Number(n)) => u16::try_from(n.as_u64()?).ok()?,
                Some(Value::String(s)) => s.parse().ok()?,
                Some(_) => return None,
            };
            let mut headers: Vec<(String, String)> = field("headers")
                .and_then(|h| h.as_object().cloned())
                .map(|h| h.into_iter().map(|(k, v)| (k, v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string()))).collect())
                .unwrap_or_default();
            let body = match body {
                Value::Null => Vec::new(),
                Value::String(s) => s.into_bytes(),
                other => other.to_string().into_bytes(),
            };
            if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("content-type")) && !body.is_empty() {
                headers.push(("Content-Type".into(), "text/plain; charset=utf-8".into()));
            }
            Some(HttpOutput { status, headers, body })
        }
        other => ok(other.to_string().into_bytes(), "application/json; charset=utf-8"),
    }
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

    fn out(binary: bool) -> BusOutput {
        BusOutput { name: "out".into(), entity: "q".into(), binary }
    }

    fn texts(v: Vec<Vec<u8>>) -> Vec<String> {
        v.into_iter().map(|b| String::from_utf8(b).unwrap_or_default()).collect()
    }

    #[test]
    fn service_bus_outputs_convert_as_the_host_does() {
        let send = |outputs: Value, strict: bool| bus_output_messages(&json!({ "Outputs": outputs }), &out(false), false, strict);
        // An array of strings: one message each, byte-exact (the recommended encoding).
        let a = send(json!({ "out": ["{\"orderId\":42}", "hello world", 7] }), true).unwrap_or_default();
        assert_eq!(texts(a), ["{\"orderId\":42}", "hello world", "7"]);
        // A JSON object, or a string holding one: one message, re-serialized indented.
        assert_eq!(texts(send(json!({ "out": { "a": 1 } }), true).unwrap_or_default()), ["{\n  \"a\": 1\n}"]);
        assert_eq!(texts(send(json!({ "out": "{\"a\":1}" }), true).unwrap_or_default()), ["{\n  \"a\": 1\n}"]);
        // A string holding an array: one message per element.
        assert_eq!(texts(send(json!({ "out": "[\"x\", {\"b\":2}]" }), true).unwrap_or_default()), ["x", "{\n  \"b\": 2\n}"]);
        // Nothing to send.
        for v in [json!({}), json!({ "out": null }), json!({ "out": [] })] {
            assert!(send(v, true).unwrap_or_default().is_empty());
        }
        // The base64 trap: "test", "1234", 1234, true and "" are valid base64 → `System.Byte[]`.
        for v in [json!("test"), json!("1234"), json!(1234), json!(true), json!("")] {
            assert_eq!(texts(send(json!({ "out": v.clone() }), false).unwrap_or_default()), ["System.Byte[]"], "{v}");
            let e = send(json!({ "out": v.clone() }), true).err().unwrap_or_default();
            assert!(e.contains("valid base64") && e.contains("`out`"), "{v}: {e}");
        }
        // Not base64 (a space-separated sentence of odd length): sent as it is.
        assert_eq!(texts(send(json!({ "out": "order 42 done" }), true).unwrap_or_default()), ["order 42 done"]);
        // dataType binary turns the conversion off.
        let b = bus_output_messages(&json!({ "Outputs": { "out": "test" } }), &out(true), false, true).unwrap_or_default();
        assert_eq!(texts(b), ["test"]);
        // Without a $return binding a ReturnValue object overwrites same-named outputs.
        let a = json!({ "Outputs": { "out": ["from outputs"] }, "ReturnValue": { "out": ["from return"] } });
        assert_eq!(texts(bus_output_messages(&a, &out(false), false, true).unwrap_or_default()), ["from return"]);
        assert_eq!(texts(bus_output_messages(&a, &out(false), true, true).unwrap_or_default()), ["from outputs"]);
    }

    #[test]
    fn a_return_binding_is_a_response_only_with_a_body_key() {
        let r = |v: Value| http_output(&json!({ "Outputs": {}, "ReturnValue": v }), Some("$return")).unwrap_or_else(|| panic!("valid"));
        let o = r(json!({ "statusCode": 202, "headers": { "X-A": "1" }, "body": { "ok": true } }));
        assert_eq!((o.status, o.body), (202, b"{\"ok\":true}".to_vec()), "object bodies compact");
        let o = r(json!({ "statusCode": 202, "message": "no body key" }));
        assert_eq!(o.status, 200, "without `body` the whole object is the body");
        assert_eq!(o.body, br#"{"message":"no body key","statusCode":202}"#.to_vec());
        assert_eq!(r(json!("aGVsbG8=")).body, b"hello".to_vec(), "a base64 string is decoded");
        assert_eq!(r(json!("hello there!")).body, b"hello there!".to_vec());
    }
}
