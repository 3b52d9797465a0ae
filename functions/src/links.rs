//! Signed approval links. A link names one approval, one approver and an expiry, and carries an
//! HMAC-SHA256 over exactly those under the app's signing key (a Key Vault reference in Azure).
//! Opening a link (GET) only shows; deciding takes a POST from the page the link opens.

use base64::Engine;
use chrono::{DateTime, TimeZone, Utc};
use hmac::{Hmac, Mac};
use sha2::Sha256;

pub struct ApprovalLinks {
    key: Vec<u8>,
    /// Public base URL of the function app, e.g. `https://myapp.azurewebsites.net`.
    base: url::Url,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    #[error("the link is incomplete (it needs approver, exp and sig)")]
    Incomplete,
    #[error("the link's signature does not match")]
    BadSignature,
    #[error("the link expired at {0}")]
    Expired(String),
}

impl ApprovalLinks {
    pub fn new(key: &[u8], base: url::Url) -> ApprovalLinks {
        ApprovalLinks { key: key.to_vec(), base }
    }

    fn mac(&self, approval_id: &str, approver: &str, exp: i64) -> Hmac<Sha256> {
        // new_from_slice accepts keys of any length.
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.key).unwrap_or_else(|_| unreachable_hmac());
        m.update(format!("deploychain-approval-v1\n{approval_id}\n{approver}\n{exp}").as_bytes());
        m
    }

    pub fn sign(&self, approval_id: &str, approver: &str, expires_at: DateTime<Utc>) -> String {
        let tag = self.mac(approval_id, approver, expires_at.timestamp()).finalize().into_bytes();
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(tag)
    }

    /// The URL an approver opens.
    pub fn link(&self, approval_id: &str, approver: &str, expires_at: DateTime<Utc>) -> String {
        let mut u = self.base.clone();
        u.set_path(&format!("/api/approvals/{approval_id}"));
        u.query_pairs_mut()
            .append_pair("approver", approver)
            .append_pair("exp", &expires_at.timestamp().to_string())
            .append_pair("sig", &self.sign(approval_id, approver, expires_at));
        u.to_string()
    }

    /// Check a link's query; returns the approver it was issued to. Constant-time comparison.
    pub fn verify(
        &self,
        approval_id: &str,
        approver: Option<&str>,
        exp: Option<&str>,
        sig: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<String, LinkError> {
        let (Some(approver), Some(exp), Some(sig)) = (approver, exp, sig) else {
            return Err(LinkError::Incomplete);
        };
        let exp: i64 = exp.parse().map_err(|_| LinkError::Incomplete)?;
        let given = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(sig).map_err(|_| LinkError::BadSignature)?;
        self.mac(approval_id, approver, exp).verify_slice(&given).map_err(|_| LinkError::BadSignature)?;
        // Only a genuine link gets to say when it expired.
        if now.timestamp() >= exp {
            let at = Utc.timestamp_opt(exp, 0).single().map(|t| t.to_rfc3339()).unwrap_or_default();
            return Err(LinkError::Expired(at));
        }
        Ok(approver.to_string())
    }
}

fn unreachable_hmac() -> Hmac<Sha256> {
    // HMAC takes keys of any length; this path cannot be reached with the hmac crate.
    <Hmac<Sha256> as Mac>::new_from_slice(b"k").unwrap_or_else(|_| unreachable_hmac())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn links() -> ApprovalLinks {
        ApprovalLinks::new(b"test-key", url::Url::parse("https://app.example.com").unwrap_or_else(|_| unreachable!()))
    }

    #[test]
    fn a_link_verifies_for_its_approver_only_until_it_expires() {
        let l = links();
        let exp = Utc::now() + chrono::Duration::hours(1);
        let sig = l.sign("web-1.production", "alice@example.com", exp);
        let e = exp.timestamp().to_string();
        assert_eq!(
            l.verify("web-1.production", Some("alice@example.com"), Some(&e), Some(&sig), Utc::now()),
            Ok("alice@example.com".into())
        );
        assert_eq!(l.verify("web-1.production", Some("bob@example.com"), Some(&e), Some(&sig), Utc::now()), Err(LinkError::BadSignature));
        assert_eq!(l.verify("web-2.production", Some("alice@example.com"), Some(&e), Some(&sig), Utc::now()), Err(LinkError::BadSignature));
        let later = (exp.timestamp() + 1).to_string();
        assert_eq!(
            l.verify("web-1.production", Some("alice@example.com"), Some(&later), Some(&sig), Utc::now()),
            Err(LinkError::BadSignature)
        );
        assert!(matches!(
            l.verify("web-1.production", Some("alice@example.com"), Some(&e), Some(&sig), exp + chrono::Duration::seconds(1)),
            Err(LinkError::Expired(_))
        ));
        assert_eq!(l.verify("web-1.production", None, Some(&e), Some(&sig), Utc::now()), Err(LinkError::Incomplete));
    }

    #[test]
    fn links_point_at_the_approval_function() {
        let exp = Utc::now() + chrono::Duration::hours(1);
        let link = links().link("web-1.production", "alice@example.com", exp);
        assert!(link.starts_with("https://app.example.com/api/approvals/web-1.production?approver=alice%40example.com&exp="), "{link}");
    }
}
