//! The approval notice webhook: one POST per approver carrying only that approver's link; a
//! failing receiver is a transient error that does not echo the links.
#![allow(clippy::unwrap_used)]

use axum::Router;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::post;
use deploychain_events::{ImageKind, ImageRef};
use deploychain_functions::adapters::notify::WebhookNotify;
use deploychain_functions::adapters::{ApprovalNotice, Notify};
use std::sync::{Arc, Mutex};

type Seen = Arc<Mutex<Vec<(HeaderMap, serde_json::Value)>>>;

async fn receiver(status: u16) -> (String, Seen) {
    let seen: Seen = Arc::default();
    let app = Router::new()
        .route(
            "/notify",
            post(|State((seen, status)): State<(Seen, u16)>, headers: HeaderMap, body: String| async move {
                seen.lock().unwrap().push((headers, serde_json::from_str(&body).unwrap()));
                axum::http::StatusCode::from_u16(status).unwrap()
            }),
        )
        .with_state((seen.clone(), status));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    (format!("http://{addr}/notify"), seen)
}

fn notice() -> ApprovalNotice {
    ApprovalNotice {
        approval_id: "web-738a951d2f3e.production".into(),
        run_id: "web-738a951d2f3e".into(),
        app: "web".into(),
        stage: "production".into(),
        commit: "738a951d2f3e7c2b16cc5a0d6a2b1e7d9a1b2c3d".into(),
        image: ImageRef {
            kind: ImageKind::GalleryImageVersion,
            id: "/galleries/g/images/web/versions/1.0.42".into(),
            version: Some("1.0.42".into()),
            digest: None,
        },
        expires_at: chrono::Utc::now() + chrono::Duration::hours(24),
        links: vec![
            ("alice@contoso.com".into(), "https://app/api/approvals/x?approver=alice%40contoso.com&exp=1&sig=AAA".into()),
            ("bob@contoso.com".into(), "https://app/api/approvals/x?approver=bob%40contoso.com&exp=1&sig=BBB".into()),
        ],
    }
}

#[tokio::test]
async fn each_approver_gets_a_post_with_only_their_own_link() {
    let (url, seen) = receiver(202).await;
    let n = WebhookNotify::new(url::Url::parse(&url).unwrap(), azure_core::new_http_client());
    n.approval_requested(&notice()).await.unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    for ((headers, body), (who, link)) in seen.iter().zip(notice().links) {
        assert_eq!(body["to"], who.as_str());
        assert_eq!(body["link"], link.as_str());
        assert_eq!(body["approvalId"], "web-738a951d2f3e.production");
        assert!(!body.to_string().contains(if who.starts_with("alice") { "BBB" } else { "AAA" }), "another approver's link leaked");
        assert!(headers["content-type"].to_str().unwrap().starts_with("application/json"));
        assert!(headers["x-deploychain-notice-id"].to_str().unwrap().starts_with("web-738a951d2f3e.production."));
    }
}

#[tokio::test]
async fn a_failing_receiver_is_transient_and_does_not_echo_links() {
    let (url, _) = receiver(500).await;
    let n = WebhookNotify::new(url::Url::parse(&url).unwrap(), azure_core::new_http_client());
    let e = n.approval_requested(&notice()).await.unwrap_err();
    assert!(e.is_transient());
    assert!(!e.to_string().contains("sig="), "{e}");
}
