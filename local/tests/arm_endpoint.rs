//! The local ARM endpoint keeps ARM's request rules, changes nothing on bad input, and keeps its
//! scale sets across a restart.
#![allow(clippy::unwrap_used)]

use deploychain::arm::{ArmSimConfig, LocalArm};
use serde_json::{Value, json};

const TOKEN: &str = "endpoint-test-token";
const VMSS: &str = "/subscriptions/s1/resourceGroups/rg-web/providers/Microsoft.Compute/virtualMachineScaleSets/web-staging";
const IMAGE: &str = "/subscriptions/s1/resourceGroups/rg-images/providers/Microsoft.Compute/galleries/g/images/web/versions/";

fn dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("deploychain-arm-endpoint-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

async fn serve(arm: &LocalArm) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let router = arm.router();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    base
}

fn open(d: &std::path::Path) -> LocalArm {
    LocalArm::open(&d.join("arm.sqlite"), ArmSimConfig::default(), TOKEN).unwrap()
}

fn create(arm: &LocalArm) {
    let body = arm.example_scale_set(VMSS, &format!("{IMAGE}1.0.0"), json!({ "owner": "team-web" })).unwrap();
    assert!(arm.ensure_scale_set(VMSS, body, 2).unwrap());
}

async fn call(method: reqwest::Method, url: String, token: Option<&str>, if_match: Option<&str>, body: Option<&str>) -> (u16, Value) {
    let mut r = reqwest::Client::new().request(method, url);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    if let Some(m) = if_match {
        r = r.header("if-match", m);
    }
    if let Some(b) = body {
        r = r.header("content-type", "application/json").body(b.to_string());
    }
    let rsp = r.send().await.unwrap();
    let status = rsp.status().as_u16();
    (status, rsp.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn bad_requests_get_arms_errors_and_change_nothing() {
    let d = dir("rules");
    let arm = open(&d);
    create(&arm);
    let base = serve(&arm).await;
    let url = |q: &str| format!("{base}{VMSS}{q}");
    let before = arm.scale_set(VMSS).unwrap();
    let patch =
        json!({ "properties": { "virtualMachineProfile": { "storageProfile": { "imageReference": { "id": format!("{IMAGE}2.0.0") } } } } })
            .to_string();

    let (s, b) = call(reqwest::Method::GET, url("?api-version=2024-07-01"), None, None, None).await;
    assert_eq!((s, b["error"]["code"].as_str()), (401, Some("AuthenticationFailed")));
    let (s, b) = call(reqwest::Method::PATCH, url("?api-version=2024-07-01"), Some("wrong-token"), None, Some(&patch)).await;
    assert_eq!((s, b["error"]["code"].as_str()), (401, Some("InvalidAuthenticationToken")));
    let (s, b) = call(reqwest::Method::GET, url(""), Some(TOKEN), None, None).await;
    assert_eq!((s, b["error"]["code"].as_str()), (400, Some("MissingApiVersionParameter")));
    let (s, b) = call(reqwest::Method::GET, url("?api-version=1999-01-01"), Some(TOKEN), None, None).await;
    assert_eq!((s, b["error"]["code"].as_str()), (400, Some("InvalidApiVersionParameter")));
    let (s, b) = call(reqwest::Method::PATCH, url("?api-version=2024-07-01"), Some(TOKEN), None, Some("{not json")).await;
    assert_eq!((s, b["error"]["code"].as_str()), (400, Some("InvalidRequestContent")));
    let (s, b) = call(reqwest::Method::PATCH, url("?api-version=2024-07-01"), Some(TOKEN), None, Some("[1, 2]")).await;
    assert_eq!((s, b["error"]["code"].as_str()), (400, Some("InvalidRequestContent")));
    let (s, b) = call(reqwest::Method::PATCH, url("?api-version=2024-07-01"), Some(TOKEN), Some("\"999\""), Some(&patch)).await;
    assert_eq!((s, b["error"]["code"].as_str()), (412, Some("PreconditionFailed")));
    let (s, b) =
        call(reqwest::Method::POST, url("/manualUpgrade?api-version=2024-07-01"), Some(TOKEN), None, Some(r#"{"instanceIds":["7"]}"#))
            .await;
    assert_eq!((s, b["error"]["code"].as_str()), (400, Some("InvalidParameter")));
    let (s, b) = call(reqwest::Method::DELETE, url("?api-version=2024-07-01"), Some(TOKEN), None, None).await;
    assert_eq!((s, b["error"]["code"].as_str()), (405, Some("OperationNotSupported")));
    let other = VMSS.replace("web-staging", "web-nope");
    let (s, b) = call(reqwest::Method::GET, format!("{base}{other}?api-version=2024-07-01"), Some(TOKEN), None, None).await;
    assert_eq!((s, b["error"]["code"].as_str()), (404, Some("ResourceNotFound")));
    assert!(b["error"]["message"].as_str().unwrap().contains("web-nope") && b["error"]["message"].as_str().unwrap().contains("rg-web"));
    let (s, _) = call(
        reqwest::Method::GET,
        format!("{base}/subscriptions/s1/providers/Microsoft.Compute/locations/westus/operations/nope?api-version=2024-07-01"),
        Some(TOKEN),
        None,
        None,
    )
    .await;
    assert_eq!(s, 404);

    let after = arm.scale_set(VMSS).unwrap();
    assert_eq!((after.etag, after.body), (before.etag, before.body), "nothing changed");
    assert!(arm.requests().iter().all(|r| r.status >= 400), "every request was refused and logged");
    assert!(!arm.requests().iter().any(|r| r.body.to_string().contains(TOKEN)), "the token is never logged");

    // Ids are case-insensitive, as in ARM; a good PATCH with the right ETag is accepted.
    let (s, b) =
        call(reqwest::Method::GET, format!("{base}{}?api-version=2024-07-01", VMSS.to_ascii_uppercase()), Some(TOKEN), None, None).await;
    assert_eq!(s, 200);
    let etag = b["etag"].as_str().unwrap().to_string();
    let (s, b) = call(reqwest::Method::PATCH, url("?api-version=2024-07-01"), Some(TOKEN), Some(&etag), Some(&patch)).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["properties"]["provisioningState"], "Updating");
    assert_ne!(b["etag"].as_str(), Some(etag.as_str()), "the ETag moved");
    let _ = std::fs::remove_dir_all(&d);
}

#[tokio::test]
async fn scale_sets_and_the_request_log_survive_a_restart() {
    let d = dir("restart");
    {
        let arm = open(&d);
        create(&arm);
        let base = serve(&arm).await;
        let patch = json!({ "tags": { "deploychain.run": "web-0123456789ab" },
            "properties": { "virtualMachineProfile": { "storageProfile": { "imageReference": { "id": format!("{IMAGE}3.0.0") } } } } });
        let (s, _) =
            call(reqwest::Method::PATCH, format!("{base}{VMSS}?api-version=2024-07-01"), Some(TOKEN), None, Some(&patch.to_string())).await;
        assert_eq!(s, 200);
        // What the stack does when it stops (the server task still holds the endpoint here).
        arm.flush();
    }
    let arm = open(&d);
    let ss = arm.scale_set(VMSS).unwrap();
    assert_eq!(ss.image(), Some(format!("{IMAGE}3.0.0").as_str()));
    assert_eq!(ss.tag("deploychain.run"), Some("web-0123456789ab"));
    assert_eq!(ss.tag("owner"), None, "tags are replaced as a whole, as ARM's PATCH does");
    assert!(ss.instances.iter().all(|v| !v.latest), "the instances are behind the new model until upgraded");
    assert_eq!(arm.model_updates(VMSS, "web-0123456789ab"), 1);
    let body = arm.example_scale_set(VMSS, &format!("{IMAGE}1.0.0"), json!({})).unwrap();
    assert!(!arm.ensure_scale_set(VMSS, body, 2).unwrap(), "an existing scale set is not recreated");
    let _ = std::fs::remove_dir_all(&d);
}
