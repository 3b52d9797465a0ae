//! Approval notices over an HTTP webhook: one POST per approver, so each person receives only their
//! own signed link. Point it at a Logic App / Power Automate flow that mails or messages the
//! person (`DEPLOYCHAIN_NOTIFY_URL`); locally, `deploychain up` listens and prints the links.

use super::{ApprovalNotice, Notify};
use crate::error::{Error, Result};
use async_trait::async_trait;
use std::sync::Arc;

pub struct WebhookNotify {
    url: url::Url,
    http: Arc<dyn azure_core::HttpClient>,
}

impl WebhookNotify {
    pub fn new(url: url::Url, http: Arc<dyn azure_core::HttpClient>) -> WebhookNotify {
        WebhookNotify { url, http }
    }
}

/// The JSON one approver's notice is sent as.
pub fn notice_body(n: &ApprovalNotice, approver: &str, link: &str) -> serde_json::Value {
    serde_json::json!({
        "to": approver,
        "subject": format!("Approve {} {} to {}?", n.app, &n.commit[..n.commit.len().min(12)], n.stage),
        "text": format!(
            "{} asks to promote image {} (commit {}) to {}. Open the link to review and decide; it expires at {}.",
            n.app, n.image.id, n.commit, n.stage, n.expires_at.to_rfc3339()
        ),
        "link": link,
        "approvalId": n.approval_id,
        "runId": n.run_id,
        "app": n.app,
        "stage": n.stage,
        "image": n.image.id,
        "expiresAt": n.expires_at.to_rfc3339(),
    })
}

#[async_trait]
impl Notify for WebhookNotify {
    async fn approval_requested(&self, n: &ApprovalNotice) -> Result<()> {
        for (approver, link) in &n.links {
            let mut req = azure_core::Request::new(self.url.clone(), azure_core::Method::Post);
            req.insert_header(azure_core::headers::CONTENT_TYPE, "application/json");
            // The receiver can drop repeats of the same notice (redelivery) by this key.
            req.insert_header("x-deploychain-notice-id", format!("{}.{}", n.approval_id, deploychain_events::short_digest(&[approver])));
            req.set_body(notice_body(n, approver, link).to_string());
            let rsp = self
                .http
                .execute_request(&req)
                .await
                // Never echo the request: it carries a signed link.
                .map_err(|_| Error::Transient(format!("approval notice for `{}` could not be delivered", n.approval_id)))?;
            let status = u16::from(rsp.status());
            if !(200..300).contains(&status) {
                return Err(Error::Transient(format!("approval notice webhook answered {status}")));
            }
        }
        Ok(())
    }
}
