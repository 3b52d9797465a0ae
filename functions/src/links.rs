//! Signed approval links.
//!
//! A link is `{public url}/api/approvals/{approval id}?t={token}`, where the token is
//! `v1.{kid}.{claims}.{mac}`:
//!
//! - `claims` — base64url JSON binding the link to one approval (`a`), run (`r`), stage (`s`), the
//!   immutable artifact (`i`: a digest of the image version id or image digest), one approver (`u`)
//!   and an expiry (`e`, Unix seconds);
//! - `mac` — base64url HMAC-SHA256 under the key `kid` names, over `v1.{kid}.{claims}`;
//! - `kid` — derived from the key itself, so rotating is: put the new key in `APPROVAL_SIGNING_KEY`,
//!   the old one in `APPROVAL_SIGNING_KEYS_PREVIOUS`; pending links keep working until they expire.
//!
//! Verification is constant-time (`verify_slice`) and happens before anything in the claims is
//! believed. A POST must also carry the page's CSRF value, an HMAC of the token under the same key,
//! so a decision can only come from the page the link opened (or a client that read it first).

use base64::Engine;
use chrono::{DateTime, TimeZone, Utc};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;
/// Longest token accepted (a real one is about 250 characters).
const MAX_TOKEN: usize = 2048;

/// What a link is bound to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The approval id (`{run}.{stage}`).
    #[serde(rename = "a")]
    pub approval: String,
    #[serde(rename = "r")]
    pub run: String,
    #[serde(rename = "s")]
    pub stage: String,
    /// [`artifact_digest`] of the artifact being approved.
    #[serde(rename = "i")]
    pub artifact: String,
    /// The one approver this link is for.
    #[serde(rename = "u")]
    pub approver: String,
    /// Expiry, Unix seconds.
    #[serde(rename = "e")]
    pub exp: i64,
}

impl Claims {
    pub fn expires_at(&self) -> DateTime<Utc> {
        Utc.timestamp_opt(self.exp, 0).single().unwrap_or_default()
    }
}

/// A short digest that stands for an artifact (gallery version id or image digest) in a token.
pub fn artifact_digest(artifact_id: &str) -> String {
    hex::encode(&Sha256::digest(format!("deploychain-artifact\n{artifact_id}").as_bytes())[..12])
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    #[error("the link is incomplete or damaged (it needs its `t` token, as sent)")]
    Malformed,
    #[error("the link was signed with key `{0}`, which this app no longer has (rotated out): ask for a new link")]
    UnknownKey(String),
    #[error("the link's signature does not match")]
    BadSignature,
    #[error("the link expired at {0}")]
    Expired(String),
}

/// The signing keys: one signs, all of them verify.
#[derive(Clone)]
pub struct ApprovalLinks {
    /// `(kid, key)`; the first signs.
    keys: Vec<(String, Vec<u8>)>,
    /// Public base URL of the function app, e.g. `https://myapp.azurewebsites.net`.
    base: url::Url,
}

impl std::fmt::Debug for ApprovalLinks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApprovalLinks").field("kids", &self.keys.iter().map(|k| &k.0).collect::<Vec<_>>()).finish_non_exhaustive()
    }
}

/// The key id of a key: a digest prefix that says which key, not what it is.
pub fn key_id(key: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(b"deploychain-approval-kid\n");
    h.update(key);
    format!("k{}", &hex::encode(h.finalize())[..8])
}

fn mac(key: &[u8], parts: &[&str]) -> Hmac<Sha256> {
    // HMAC takes keys of any length.
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            m.update(b"\n");
        }
        m.update(p.as_bytes());
    }
    m
}

impl ApprovalLinks {
    /// `active` signs new links; `previous` keys still verify the links they signed.
    pub fn new(active: &[u8], previous: &[&[u8]], base: url::Url) -> ApprovalLinks {
        let keys = std::iter::once(active).chain(previous.iter().copied()).map(|k| (key_id(k), k.to_vec())).collect();
        ApprovalLinks { keys, base }
    }

    pub fn active_kid(&self) -> &str {
        &self.keys[0].0
    }

    fn key(&self, kid: &str) -> Option<&[u8]> {
        self.keys.iter().find(|(k, _)| k == kid).map(|(_, v)| v.as_slice())
    }

    pub fn token(&self, claims: &Claims) -> String {
        let (kid, key) = (&self.keys[0].0, &self.keys[0].1);
        let body = B64.encode(serde_json::to_vec(claims).unwrap_or_default());
        let tag = mac(key, &["deploychain-approval-v1", kid, &body]).finalize().into_bytes();
        format!("v1.{kid}.{body}.{}", B64.encode(tag))
    }

    /// The URL an approver opens.
    pub fn link(&self, claims: &Claims) -> String {
        let mut u = self.base.clone();
        u.set_path(&format!("/api/approvals/{}", claims.approval));
        u.query_pairs_mut().append_pair("t", &self.token(claims));
        u.to_string()
    }

    /// Check a token: its key, its signature (constant time), then its expiry. Only a genuine
    /// token's claims are returned, or its expiry told.
    pub fn verify(&self, token: &str, now: DateTime<Utc>) -> Result<Claims, LinkError> {
        if token.len() > MAX_TOKEN {
            return Err(LinkError::Malformed);
        }
        let parts: Vec<&str> = token.split('.').collect();
        let [version, kid, body, sig] = parts.as_slice() else { return Err(LinkError::Malformed) };
        if *version != "v1" {
            return Err(LinkError::Malformed);
        }
        let key = self.key(kid).ok_or_else(|| LinkError::UnknownKey(kid.chars().take(16).collect()))?;
        let given = B64.decode(sig).map_err(|_| LinkError::BadSignature)?;
        mac(key, &["deploychain-approval-v1", kid, body]).verify_slice(&given).map_err(|_| LinkError::BadSignature)?;
        let claims: Claims = B64.decode(body).ok().and_then(|b| serde_json::from_slice(&b).ok()).ok_or(LinkError::Malformed)?;
        if now.timestamp() >= claims.exp {
            return Err(LinkError::Expired(claims.expires_at().to_rfc3339()));
        }
        Ok(claims)
    }

    /// The CSRF value of the page a token opens: bound to that token, under its key.
    pub fn csrf(&self, token: &str) -> Option<String> {
        let kid = token.split('.').nth(1)?;
        let key = self.key(kid)?;
        Some(B64.encode(mac(key, &["deploychain-csrf-v1", token]).finalize().into_bytes()))
    }

    /// Whether `given` is the CSRF value of `token` (constant time).
    pub fn check_csrf(&self, token: &str, given: &str) -> bool {
        let (Some(kid), Ok(given)) = (token.split('.').nth(1), B64.decode(given)) else { return false };
        self.key(kid).is_some_and(|key| mac(key, &["deploychain-csrf-v1", token]).verify_slice(&given).is_ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> url::Url {
        url::Url::parse("https://app.example.com").unwrap_or_else(|_| unreachable!())
    }

    fn claims(exp: DateTime<Utc>) -> Claims {
        Claims {
            approval: "web-1.production".into(),
            run: "web-1".into(),
            stage: "production".into(),
            artifact: artifact_digest("/subscriptions/s/…/images/web/versions/1.0.2"),
            approver: "alice@example.com".into(),
            exp: exp.timestamp(),
        }
    }

    #[test]
    fn a_token_verifies_until_it_expires_and_not_after_any_change() {
        let l = ApprovalLinks::new(b"key-one-key-one-key-one-key-one!", &[], base());
        let exp = Utc::now() + chrono::Duration::hours(1);
        let t = l.token(&claims(exp));
        assert_eq!(l.verify(&t, Utc::now()), Ok(claims(exp)));
        assert!(matches!(l.verify(&t, exp + chrono::Duration::seconds(1)), Err(LinkError::Expired(_))));
        // Any changed claim (another approver here) breaks the signature.
        let parts: Vec<&str> = t.split('.').collect();
        let mut other = claims(exp);
        other.approver = "mallory@example.com".into();
        let forged = format!("v1.{}.{}.{}", parts[1], B64.encode(serde_json::to_vec(&other).unwrap_or_default()), parts[3]);
        assert_eq!(l.verify(&forged, Utc::now()), Err(LinkError::BadSignature));
        assert_eq!(l.verify("v1.only-three.parts", Utc::now()), Err(LinkError::Malformed));
        assert_eq!(l.verify(&"x".repeat(5000), Utc::now()), Err(LinkError::Malformed));
    }

    #[test]
    fn rotated_keys_still_verify_their_links_and_unknown_keys_are_named() {
        let old = ApprovalLinks::new(b"the-old-key-the-old-key-the-old!", &[], base());
        let exp = Utc::now() + chrono::Duration::hours(1);
        let t = old.token(&claims(exp));
        let rotated = ApprovalLinks::new(b"the-new-key-the-new-key-the-new!", &[b"the-old-key-the-old-key-the-old!"], base());
        assert_eq!(rotated.verify(&t, Utc::now()), Ok(claims(exp)));
        assert_ne!(rotated.active_kid(), old.active_kid());
        assert!(rotated.token(&claims(exp)).starts_with(&format!("v1.{}.", rotated.active_kid())));
        let dropped = ApprovalLinks::new(b"the-new-key-the-new-key-the-new!", &[], base());
        assert_eq!(dropped.verify(&t, Utc::now()), Err(LinkError::UnknownKey(old.active_kid().to_string())));
    }

    #[test]
    fn csrf_values_are_bound_to_their_token() {
        let l = ApprovalLinks::new(b"key-one-key-one-key-one-key-one!", &[], base());
        let exp = Utc::now() + chrono::Duration::hours(1);
        let t1 = l.token(&claims(exp));
        let mut c2 = claims(exp);
        c2.approver = "bob@example.com".into();
        let t2 = l.token(&c2);
        let csrf = l.csrf(&t1).unwrap_or_default();
        assert!(l.check_csrf(&t1, &csrf));
        assert!(!l.check_csrf(&t2, &csrf));
        assert!(!l.check_csrf(&t1, "not-base64!"));
    }

    #[test]
    fn links_point_at_the_approval_function() {
        let l = ApprovalLinks::new(b"key-one-key-one-key-one-key-one!", &[], base());
        let link = l.link(&claims(Utc::now() + chrono::Duration::hours(1)));
        assert!(link.starts_with("https://app.example.com/api/approvals/web-1.production?t=v1.k"), "{link}");
        assert!(!format!("{l:?}").contains("key-one"));
    }
}
