//! Shared Access Signature checking, as Service Bus does it:
//! `SharedAccessSignature sr=<urlenc resource>&sig=<urlenc base64 HMAC-SHA256>&se=<unix expiry>&skn=<key name>`
//! (fields in any order). The HMAC key is the key string's UTF-8 bytes (not base64-decoded), and
//! the signed text is `sr` exactly as it appears in the token, a newline, and `se`.
//!
//! Scope: `sr` may be the namespace (any host) or a URL whose path is a prefix of the request
//! path. Hosts are not compared, because clients sign `https://{ns}.servicebus.windows.net/...`
//! while the request arrives at `127.0.0.1`.

use crate::error::BusError;
use base64::Engine;
use hmac::{Hmac, Mac};
use percent_encoding::percent_decode_str;
use sha2::Sha256;
use std::collections::BTreeMap;

/// The authorization rules the bus accepts: key name → key. Every key has all rights (Manage).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SasKeys {
    keys: BTreeMap<String, String>,
}

impl std::fmt::Debug for SasKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Names only: keys never reach logs.
        f.debug_struct("SasKeys").field("names", &self.keys.keys().collect::<Vec<_>>()).finish()
    }
}

impl SasKeys {
    /// No keys: every request is refused (401) until one is added.
    pub fn new() -> SasKeys {
        SasKeys::default()
    }

    /// One rule, e.g. `("RootManageSharedAccessKey", "…")`.
    pub fn single(name: impl Into<String>, key: impl Into<String>) -> SasKeys {
        SasKeys::new().with_key(name, key)
    }

    /// Add a rule (builder style).
    pub fn with_key(mut self, name: impl Into<String>, key: impl Into<String>) -> SasKeys {
        self.insert(name, key);
        self
    }

    /// Add or replace a rule.
    pub fn insert(&mut self, name: impl Into<String>, key: impl Into<String>) {
        self.keys.insert(name.into(), key.into());
    }

    /// The rule of a connection string (`…;SharedAccessKeyName=…;SharedAccessKey=…`). Errors
    /// never echo the string (it holds the key).
    pub fn from_connection_string(s: &str) -> Result<SasKeys, BusError> {
        let mut name = None;
        let mut key = None;
        for part in s.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let Some((k, v)) = part.split_once('=') else { continue };
            match k.trim().to_ascii_lowercase().as_str() {
                "sharedaccesskeyname" => name = Some(v.trim().to_string()),
                // Keys are base64 and may end in `=`: split_once kept everything after the first `=`.
                "sharedaccesskey" => key = Some(v.trim().to_string()),
                _ => {}
            }
        }
        match (name, key) {
            (Some(n), Some(k)) if !n.is_empty() && !k.is_empty() => Ok(SasKeys::single(n, k)),
            _ => Err(BusError::InvalidOperation("the connection string needs SharedAccessKeyName and SharedAccessKey".into())),
        }
    }

    /// Whether no rule is configured.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Check an `Authorization` header for a request to `request_path` (as received, still
    /// percent-encoded) at `now` (Unix seconds). The error says why, without secrets.
    pub(crate) fn verify(&self, authorization: Option<&str>, request_path: &str, now: i64) -> Result<(), String> {
        let header = authorization.ok_or("missing Authorization header")?.trim();
        let token = header
            .get(..22)
            .filter(|p| p.eq_ignore_ascii_case("SharedAccessSignature "))
            .map(|_| &header[22..])
            .ok_or("Authorization is not a SharedAccessSignature (bearer tokens are not supported)")?;
        let mut fields: BTreeMap<String, &str> = BTreeMap::new();
        for part in token.trim().split('&') {
            if let Some((k, v)) = part.split_once('=') {
                fields.insert(k.trim().to_ascii_lowercase(), v);
            }
        }
        let field = |name: &str| fields.get(name).copied().ok_or(format!("the token has no `{name}`"));
        let (sr, sig, se, skn) = (field("sr")?, field("sig")?, field("se")?, field("skn")?);

        let skn = percent_decode_str(skn).decode_utf8_lossy();
        let key = self.keys.get(skn.as_ref()).ok_or("unknown SharedAccessKeyName")?;
        let expiry: i64 = se.parse().map_err(|_| "`se` is not a Unix time")?;
        if expiry <= now {
            return Err("the token has expired".into());
        }
        // base64 has no spaces, so a `+` in the token is a `+`: plain percent-decoding, not form-decoding.
        let sig = percent_decode_str(sig).decode_utf8_lossy();
        let sig = base64::engine::general_purpose::STANDARD.decode(sig.trim()).map_err(|_| "`sig` is not base64")?;
        let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).map_err(|_| "unusable key")?;
        mac.update(format!("{sr}\n{se}").as_bytes());
        mac.verify_slice(&sig).map_err(|_| "invalid signature")?;

        let resource = form_decode(sr);
        if !in_scope(&resource, request_path) {
            return Err(format!("the token's resource `{resource}` does not cover this request"));
        }
        Ok(())
    }
}

/// `application/x-www-form-urlencoded` decoding (what clients use to encode `sr`).
fn form_decode(s: &str) -> String {
    percent_decode_str(&s.replace('+', " ")).decode_utf8_lossy().into_owned()
}

/// Normalised path segments: percent-decoded, lower-cased, empty ones dropped.
fn segments(path: &str) -> Vec<String> {
    path.split('/').filter(|s| !s.is_empty()).map(|s| percent_decode_str(s).decode_utf8_lossy().to_lowercase()).collect()
}

fn in_scope(resource: &str, request_path: &str) -> bool {
    let resource = resource.trim();
    let scope_path = if resource.contains("://") {
        match url::Url::parse(resource) {
            Ok(u) => u.path().to_string(),
            Err(_) => return false,
        }
    } else {
        // `host/path` or a bare namespace (docs: `sr=your-namespace`).
        let without_query = resource.split(['?', '#']).next().unwrap_or_default();
        match without_query.split_once('/') {
            Some((_, path)) => path.to_string(),
            None => String::new(),
        }
    };
    let scope = segments(&scope_path);
    let request = segments(request_path);
    request.len() >= scope.len() && request[..scope.len()] == scope[..]
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn token(key: &str, resource: &str, se: i64, name: &str) -> String {
        let sr: String = url::form_urlencoded::byte_serialize(resource.as_bytes()).collect();
        let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).unwrap();
        mac.update(format!("{sr}\n{se}").as_bytes());
        let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        let sig: String = url::form_urlencoded::byte_serialize(sig.as_bytes()).collect();
        format!("SharedAccessSignature sr={sr}&sig={sig}&se={se}&skn={name}")
    }

    const KEY: &str = "dGVzdC1rZXk+PmZvcj8/c2VydmljZWJ1c/v/IQ==";

    #[test]
    fn tokens_verify_by_key_expiry_and_scope() {
        let keys = SasKeys::single("Root", KEY);
        let now = 1_700_000_000;
        let ok = |resource: &str, path: &str| keys.verify(Some(&token(KEY, resource, now + 60, "Root")), path, now);
        assert_eq!(ok("https://local.servicebus.windows.net/q/messages", "/q/messages"), Ok(()));
        assert_eq!(ok("https://local.servicebus.windows.net/q/messages/head?timeout=30", "/q/messages/head"), Ok(()));
        assert_eq!(
            ok("https://local.servicebus.windows.net/q/$DeadLetterQueue/messages/head", "/q/%24deadletterqueue/messages/head"),
            Ok(())
        );
        assert_eq!(ok("sb://local.servicebus.windows.net/", "/anything/messages"), Ok(()));
        assert_eq!(ok("your-namespace", "/q/messages"), Ok(()));
        assert_eq!(ok("http://127.0.0.1:1234/q", "/q/messages/3/abc"), Ok(()));
        assert!(ok("https://local.servicebus.windows.net/other/messages", "/q/messages").is_err());
        assert!(ok("https://local.servicebus.windows.net/q2", "/q/messages").is_err(), "segment prefixes only");

        let path = "/q/messages";
        let resource = "https://x/q/messages";
        assert!(keys.verify(Some(&token("other", resource, now + 60, "Root")), path, now).is_err());
        assert!(keys.verify(Some(&token(KEY, resource, now - 1, "Root")), path, now).is_err());
        assert!(keys.verify(Some(&token(KEY, resource, now + 60, "Nobody")), path, now).is_err());
        assert!(keys.verify(None, path, now).is_err());
        assert!(keys.verify(Some("Bearer abc"), path, now).is_err());
        // Fields in another order.
        let t = token(KEY, resource, now + 60, "Root");
        let fields: Vec<&str> = t["SharedAccessSignature ".len()..].split('&').rev().collect();
        assert_eq!(keys.verify(Some(&format!("SharedAccessSignature {}", fields.join("&"))), path, now), Ok(()));
    }

    #[test]
    fn connection_strings_give_keys_and_debug_hides_them() {
        let k = SasKeys::from_connection_string(
            "Endpoint=sb://127.0.0.1:1;SharedAccessKeyName=Root;SharedAccessKey=abc=;UseDevelopmentEmulator=true",
        )
        .unwrap();
        assert_eq!(k, SasKeys::single("Root", "abc="));
        assert!(!format!("{k:?}").contains("abc="));
        assert!(SasKeys::from_connection_string("Endpoint=sb://x").is_err());
    }
}
