//! The custom-handler envelope, exactly as the Azure Functions host speaks it (see
//! https://learn.microsoft.com/azure/azure-functions/functions-custom-handlers, the host's
//! `src/WebJobs.Script/Workers/Http` in Azure/azure-functions-host, and decision 0004). This is the only module that knows its shape:
//! steps get decoded messages and HTTP requests, and return [`Invocation`] results.
//!
//! Host quirks handled here:
//! - every `Metadata` value (and string `Data`) is `JsonConvert.SerializeObject`-ed: `"\"m-1\""`, `"1"`;
//! - Service Bus triggers use `dataType: binary`, so `Data.msg` is base64 of the exact body bytes;
//! - HTTP trigger `Data.req` carries `Headers` as arrays, `Query` as an object, `Body` as raw text
//!   (base64 for `application/octet-stream`), `Params` from the route template;
//! - the answer must be a non-empty JSON object with `Outputs`, `Logs`, `ReturnValue` and
//!   `Content-Type: application/json`, else the invocation fails or hangs until functionTimeout.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// The request body the host POSTs to `/{FunctionName}`.
#[derive(Debug, Deserialize, Serialize, Default, Clone)]
#[serde(rename_all = "PascalCase")]
pub struct InvokeRequest {
    #[serde(default)]
    pub data: Map<String, Value>,
    /// Only the keys a trigger is read by ([`METADATA_KEYS`]); the rest — for an HTTP trigger,
    /// a second copy of every top-level field of the body — is skipped unparsed.
    #[serde(default, deserialize_with = "known_metadata")]
    pub metadata: Map<String, Value>,
}

/// The `Metadata` keys the handler reads (matched case-insensitively, as the host writes them).
pub const METADATA_KEYS: &[&str] =
    &["MessageId", "DeliveryCount", "SessionId", "Subject", "Label", "ContentType", "SequenceNumber", "ApplicationProperties"];

fn known_metadata<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Map<String, Value>, D::Error> {
    struct Known;
    impl<'de> serde::de::Visitor<'de> for Known {
        type Value = Map<String, Value>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("the invocation's Metadata object")
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(Map::new())
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
            let mut out = Map::new();
            while let Some(k) = m.next_key::<std::borrow::Cow<'de, str>>()? {
                if METADATA_KEYS.iter().any(|w| w.eq_ignore_ascii_case(&k)) {
                    out.insert(k.into_owned(), m.next_value()?);
                } else {
                    m.next_value::<serde::de::IgnoredAny>()?;
                }
            }
            Ok(out)
        }
    }
    d.deserialize_any(Known)
}

/// The answer to the host. Serialized field names are the host's (matched case-insensitively).
#[derive(Debug, Serialize, Default, Clone, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct InvokeResponse {
    pub outputs: Map<String, Value>,
    pub logs: Vec<String>,
    pub return_value: Value,
}

impl IntoResponse for InvokeResponse {
    fn into_response(self) -> Response {
        // axum's Json sets `content-type: application/json`, which the host's formatter requires.
        (StatusCode::OK, axum::Json(self)).into_response()
    }
}

/// Undo the host's `JsonConvert.SerializeObject` of a metadata value: `"\"abc\""` → `"abc"`,
/// `"1"` → `1`. Objects pass through. A string whose content is not JSON is kept as it is.
pub fn unwrap_metadata(v: &Value) -> Value {
    match v {
        Value::String(s) => serde_json::from_str(s).unwrap_or_else(|_| v.clone()),
        _ => v.clone(),
    }
}

/// A metadata value as a plain string (`MessageId`, `SessionId`, …), whether the host encoded it or not.
pub fn metadata_str(meta: &Map<String, Value>, key: &str) -> Option<String> {
    let v = meta.iter().find(|(k, _)| k.eq_ignore_ascii_case(key)).map(|(_, v)| v)?;
    match unwrap_metadata(v) {
        Value::String(s) => Some(s),
        Value::Null => None,
        other => Some(other.to_string()),
    }
}

/// Why an envelope could not be read. These are permanent: the same bytes will never parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    #[error("the invocation has no `Data.{0}` value")]
    MissingData(String),
    #[error("`Data.{0}` is not a base64 string (is the trigger's dataType `binary`?)")]
    NotBase64(String),
    #[error("`Data.{0}` is not an HTTP request object")]
    NotHttpRequest(String),
    #[error("the request body is not valid base64")]
    BadBody,
}

/// A Service Bus message as delivered to a `serviceBusTrigger` with `dataType: binary`.
#[derive(Debug, Clone, PartialEq)]
pub struct BusMessage {
    pub body: Vec<u8>,
    pub message_id: Option<String>,
    pub delivery_count: u32,
    pub session_id: Option<String>,
    pub subject: Option<String>,
    pub content_type: Option<String>,
    pub sequence_number: Option<i64>,
    /// Application properties, values as the host typed them, names as the broker holds them:
    /// the host passes `ApplicationProperties` through as it is, and names sent over HTTP arrive
    /// lower-cased. Read them with [`BusMessage::property`].
    pub properties: Map<String, Value>,
}

impl BusMessage {
    /// Application property `name`: the exact name, else one that differs only in case
    /// (`cloudEvents_type` is `cloudevents_type` once it has crossed the REST API).
    pub fn property(&self, name: &str) -> Option<&Value> {
        self.properties.get(name).or_else(|| self.properties.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v))
    }

    pub fn from_invocation(req: &InvokeRequest, binding: &str) -> Result<BusMessage, EnvelopeError> {
        let raw = req.data.get(binding).ok_or_else(|| EnvelopeError::MissingData(binding.into()))?;
        let b64 = raw.as_str().ok_or_else(|| EnvelopeError::NotBase64(binding.into()))?;
        let body = base64::engine::general_purpose::STANDARD.decode(b64).map_err(|_| EnvelopeError::NotBase64(binding.into()))?;
        let m = &req.metadata;
        let properties = m
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("ApplicationProperties"))
            .map(|(_, v)| unwrap_metadata(v))
            .and_then(|v| v.as_object().cloned())
            .unwrap_or_default();
        Ok(BusMessage {
            body,
            message_id: metadata_str(m, "MessageId"),
            delivery_count: metadata_str(m, "DeliveryCount").and_then(|s| s.parse().ok()).unwrap_or(1),
            session_id: metadata_str(m, "SessionId"),
            subject: metadata_str(m, "Subject").or_else(|| metadata_str(m, "Label")),
            content_type: metadata_str(m, "ContentType"),
            sequence_number: metadata_str(m, "SequenceNumber").and_then(|s| s.parse().ok()),
            properties,
        })
    }
}

/// An HTTP request as delivered to an `httpTrigger` in default (non-forwarded) mode.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HttpRequest {
    pub method: String,
    pub url: String,
    /// Header names lower-cased; multiple values joined with `,` as the host does for Metadata.
    pub headers: BTreeMap<String, String>,
    pub query: BTreeMap<String, String>,
    pub params: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

impl HttpRequest {
    pub fn from_invocation(req: &InvokeRequest, binding: &str) -> Result<HttpRequest, EnvelopeError> {
        let raw = req.data.get(binding).ok_or_else(|| EnvelopeError::MissingData(binding.into()))?;
        let obj = raw.as_object().ok_or_else(|| EnvelopeError::NotHttpRequest(binding.into()))?;
        let get = |k: &str| obj.iter().find(|(key, _)| key.eq_ignore_ascii_case(k)).map(|(_, v)| v);
        let str_of = |v: &Value| match v {
            Value::String(s) => s.clone(),
            Value::Array(a) => {
                a.iter().map(|x| x.as_str().map(str::to_string).unwrap_or_else(|| x.to_string())).collect::<Vec<_>>().join(",")
            }
            Value::Null => String::new(),
            other => other.to_string(),
        };
        let map_of = |v: Option<&Value>, lower: bool| -> BTreeMap<String, String> {
            v.and_then(Value::as_object)
                .map(|o| o.iter().map(|(k, v)| (if lower { k.to_ascii_lowercase() } else { k.clone() }, str_of(v))).collect())
                .unwrap_or_default()
        };
        let headers = map_of(get("Headers"), true);
        let content_type = headers.get("content-type").cloned().unwrap_or_default().to_ascii_lowercase();
        let body = match get("Body") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(s)) => {
                // The host hands binary media types over as base64 (byte[] → Convert.ToBase64String).
                if content_type.starts_with("application/octet-stream") || content_type.starts_with("multipart/") {
                    base64::engine::general_purpose::STANDARD.decode(s).map_err(|_| EnvelopeError::BadBody)?
                } else {
                    s.as_bytes().to_vec()
                }
            }
            // Some hosts (and hand-written tests) send a JSON body as an object: keep its text.
            Some(other) => other.to_string().into_bytes(),
        };
        Ok(HttpRequest {
            method: get("Method").map(str_of).unwrap_or_default().to_ascii_uppercase(),
            url: get("Url").map(str_of).unwrap_or_default(),
            headers,
            query: map_of(get("Query"), false),
            params: map_of(get("Params"), false),
            body,
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(&name.to_ascii_lowercase()).map(String::as_str)
    }
}

/// An HTTP answer, written into `Outputs.res` (the `http` output binding named `res`).
#[derive(Debug, Clone, PartialEq)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: BTreeMap<String, String>,
    pub body: String,
}

impl HttpResponse {
    pub fn json(status: u16, body: &Value) -> HttpResponse {
        let mut headers = BTreeMap::new();
        headers.insert("Content-Type".to_string(), "application/json; charset=utf-8".to_string());
        headers.insert("Cache-Control".to_string(), "no-store".to_string());
        HttpResponse { status, headers, body: body.to_string() }
    }

    pub fn html(status: u16, body: String) -> HttpResponse {
        let mut headers = BTreeMap::new();
        headers.insert("Content-Type".to_string(), "text/html; charset=utf-8".to_string());
        headers.insert("Cache-Control".to_string(), "no-store".to_string());
        // Approval pages must not be framed or leak their signed URL to other sites.
        headers.insert("X-Frame-Options".to_string(), "DENY".to_string());
        headers.insert("Referrer-Policy".to_string(), "no-referrer".to_string());
        headers
            .insert("Content-Security-Policy".to_string(), "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'".to_string());
        HttpResponse { status, headers, body }
    }

    pub fn with_header(mut self, name: &str, value: &str) -> HttpResponse {
        self.headers.insert(name.to_string(), value.to_string());
        self
    }

    /// `{"statusCode": …, "headers": {…strings…}, "body": "…"}`: the shape the host maps to the caller.
    pub fn to_output(&self) -> Value {
        serde_json::json!({ "statusCode": self.status, "headers": self.headers, "body": self.body })
    }
}

/// What one invocation produced, before it is written in the host's shape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Invocation {
    pub http: Option<HttpResponse>,
    pub logs: Vec<String>,
}

impl Invocation {
    pub fn http(res: HttpResponse) -> Invocation {
        Invocation { http: Some(res), logs: Vec::new() }
    }

    pub fn log(mut self, line: impl Into<String>) -> Invocation {
        self.logs.push(line.into());
        self
    }

    pub fn into_response(self, http_binding: &str) -> InvokeResponse {
        let mut outputs = Map::new();
        if let Some(res) = &self.http {
            outputs.insert(http_binding.to_string(), res.to_output());
        }
        InvokeResponse { outputs, logs: self.logs, return_value: Value::Null }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn metadata_is_unwrapped_as_the_host_encodes_it() {
        let meta = json!({"MessageId": "\"m-1\"", "DeliveryCount": "3", "ApplicationProperties": {"a": 1}, "SessionId": "\"web/prod\""});
        let meta = meta.as_object().cloned().unwrap_or_default();
        assert_eq!(metadata_str(&meta, "MessageId").as_deref(), Some("m-1"));
        assert_eq!(metadata_str(&meta, "deliverycount").as_deref(), Some("3"));
        assert_eq!(metadata_str(&meta, "SessionId").as_deref(), Some("web/prod"));
        assert_eq!(metadata_str(&meta, "Nope"), None);
    }

    #[test]
    fn binary_bus_body_is_base64_decoded() {
        let req: InvokeRequest = serde_json::from_value(json!({
            "Data": {"msg": "eyJvcmRlcklkIjo0MiwidGFncyI6WyJhIl19"},
            "Metadata": {"MessageId": "\"m-1\"", "DeliveryCount": "2", "ApplicationProperties": {"tenant": "acme"}, "Label": "\"x\""}
        }))
        .unwrap_or_default();
        let m = BusMessage::from_invocation(&req, "msg").expect("decodes");
        assert_eq!(m.body, br#"{"orderId":42,"tags":["a"]}"#.to_vec());
        assert_eq!(m.delivery_count, 2);
        assert_eq!(m.subject.as_deref(), Some("x"));
    }

    #[test]
    fn application_properties_are_read_in_any_case() {
        let req: InvokeRequest = serde_json::from_value(json!({
            "Data": {"msg": ""},
            "Metadata": {"applicationproperties": {"cloudevents_type": "t", "Diagnostic-Id": "d", "deploychain_early": "1", "deploychain_Early": "2"}}
        }))
        .unwrap_or_default();
        let m = BusMessage::from_invocation(&req, "msg").expect("decodes");
        assert_eq!(m.property("cloudEvents_type"), Some(&json!("t")));
        assert_eq!(m.property("diagnostic-id"), Some(&json!("d")));
        assert_eq!(m.property("deploychain_early"), Some(&json!("1")), "an exact name wins");
        assert_eq!(m.property("cloudEvents_id"), None);
    }

    #[test]
    fn non_base64_bus_body_is_a_permanent_envelope_error() {
        let req: InvokeRequest = serde_json::from_value(json!({"Data": {"msg": "\"{\\\"a\\\":1}\""}, "Metadata": {}})).unwrap_or_default();
        assert_eq!(BusMessage::from_invocation(&req, "msg"), Err(EnvelopeError::NotBase64("msg".into())));
        assert_eq!(BusMessage::from_invocation(&req, "other"), Err(EnvelopeError::MissingData("other".into())));
    }

    #[test]
    fn http_request_headers_are_joined_and_lower_cased() {
        let req: InvokeRequest = serde_json::from_value(json!({"Data": {"req": {
            "Url": "https://x/api/runs?commit=abc", "Method": "get",
            "Query": {"commit": "abc"}, "Headers": {"X-Multi": ["a", "b"], "Content-Type": ["application/json"]},
            "Params": {"id": "r-1"}, "Body": "{\"a\":1}"}}, "Metadata": {}}))
        .unwrap_or_default();
        let r = HttpRequest::from_invocation(&req, "req").unwrap_or_default();
        assert_eq!(r.method, "GET");
        assert_eq!(r.header("x-multi"), Some("a,b"));
        assert_eq!(r.query.get("commit").map(String::as_str), Some("abc"));
        assert_eq!(r.params.get("id").map(String::as_str), Some("r-1"));
        assert_eq!(r.body, br#"{"a":1}"#.to_vec());
    }

    #[test]
    fn response_is_a_non_empty_object_with_string_headers() {
        let out = Invocation::http(HttpResponse::json(202, &json!({"ok": true}))).log("hi").into_response("res");
        let v = serde_json::to_value(&out).unwrap_or_default();
        assert_eq!(v["Outputs"]["res"]["statusCode"], 202);
        assert_eq!(v["Outputs"]["res"]["headers"]["Content-Type"], "application/json; charset=utf-8");
        assert_eq!(v["Outputs"]["res"]["body"], "{\"ok\":true}");
        assert_eq!(v["Logs"][0], "hi");
        assert!(v.get("ReturnValue").is_some());
    }
}
