//! What the fuzz targets share: the handler's router on in-memory adapters (a fresh one per input,
//! so inputs do not pile up state), the host's HTTP-trigger envelope, and a GitHub signature.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use axum::body::Body;
use axum::http::Request;
use deploychain_functions::AppState;
use deploychain_functions::adapters::memory::{MemoryBaker, MemoryBuilds, MemoryCompute, MemoryNotify, MemoryPublisher, MemoryStore};
use deploychain_functions::config::Config;
use deploychain_functions::links::{ApprovalLinks, Claims};
use deploychain_functions::policy::Policy;
use hmac::{Hmac, Mac};
use http_body_util::BodyExt;
use serde_json::Value;
use sha2::Sha256;
use std::sync::{Arc, OnceLock};
use tower::ServiceExt;

pub const GITHUB_SECRET: &str = "fuzz-github-secret";
pub const SIGNING_KEY: &str = "fuzz-approval-signing-key-0123456789";

/// The repositories of the real fixtures the seed corpus comes from.
pub const POLICY: &str = r#"
[[app]]
name = "hello"
source = { github = "Codertocat/Hello-World" }
branches = ["master", "main", "release-*"]
build = { provider = "github-actions", pipeline = "build.yml" }
image = { source = "registry", destination = "ghcr.io/codertocat/hello-world" }
[[app.stage]]
name = "staging"
target = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg-hello/providers/Microsoft.Compute/virtualMachineScaleSets/hello-staging"
[[app.stage]]
name = "production"
target = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg-hello/providers/Microsoft.Compute/virtualMachineScaleSets/hello-prod"
approval = { approvers = ["alice@example.com", "bob@example.com"] }

[[app]]
name = "probot"
source = { github = "bkeepers-inc/test" }
branches = ["*"]
build = { provider = "github-actions" }
image = { source = "image-builder", destination = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg-images/providers/Microsoft.Compute/galleries/deploychain/images/probot" }
[[app.stage]]
name = "staging"
target = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg-probot/providers/Microsoft.Compute/virtualMachineScaleSets/probot-staging"
"#;

pub fn config() -> Config {
    let vars = [
        ("APPROVAL_SIGNING_KEY", SIGNING_KEY),
        ("DEPLOYCHAIN_PUBLIC_URL", "https://deploychain-fuzz.azurewebsites.net"),
        ("ServiceBusConnection", "Endpoint=sb://127.0.0.1:1;SharedAccessKeyName=Root;SharedAccessKey=k;UseDevelopmentEmulator=true"),
        ("DEPLOYCHAIN_ARM_CREDENTIAL", "static"),
        ("DEPLOYCHAIN_ARM_TOKEN", "arm-token"),
        ("GITHUB_WEBHOOK_SECRET", GITHUB_SECRET),
        ("DEPLOYCHAIN_NOTIFY_URL", "http://127.0.0.1:1/notify"),
        ("DEPLOYCHAIN_MAX_BODY_BYTES", "65536"),
        ("GITHUB_TOKEN", "github-token"),
    ];
    Config::from_lookup(&|k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())).expect("the fuzz configuration")
}

fn policy() -> Arc<Policy> {
    static P: OnceLock<Arc<Policy>> = OnceLock::new();
    P.get_or_init(|| Arc::new(Policy::from_toml(POLICY).expect("the fuzz policy"))).clone()
}

/// A handler with nothing in it yet, and what it published.
pub struct Handler {
    pub state: AppState,
    pub published: Arc<MemoryPublisher>,
}

pub fn handler() -> Handler {
    let config = config();
    let links = ApprovalLinks::new(SIGNING_KEY.as_bytes(), &[], config.public_url.clone());
    let published = Arc::new(MemoryPublisher::default());
    let state = AppState {
        config: Arc::new(config),
        policy: policy(),
        links: Arc::new(links),
        store: Arc::new(MemoryStore::default()),
        publisher: published.clone(),
        builds: Arc::new(MemoryBuilds::default()),
        baker: Arc::new(MemoryBaker::default()),
        compute: Arc::new(MemoryCompute::default()),
        notify: Arc::new(MemoryNotify::default()),
        dead_letters: None,
    };
    Handler { state, published }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime"))
}

/// POST `body` to `/{function}` as the host does; the host-facing status and body.
pub fn invoke(h: &Handler, function: &str, body: Vec<u8>) -> (u16, Vec<u8>) {
    let router = deploychain_functions::app(h.state.clone());
    runtime().block_on(async move {
        let req = Request::post(format!("/{function}"))
            .header("content-type", "application/json; charset=utf-8")
            .header("x-azure-functions-invocationid", "00000000-0000-0000-0000-000000000001")
            .body(Body::from(body))
            .unwrap();
        let rsp = router.oneshot(req).await.unwrap();
        let status = rsp.status().as_u16();
        (status, rsp.into_body().collect().await.unwrap().to_bytes().to_vec())
    })
}

/// A GitHub delivery of `body` as event `event` with `signature`, in the envelope the local
/// Functions host builds for the `github_webhook` trigger.
pub fn github_envelope(event: &str, signature: String, body: Vec<u8>) -> Vec<u8> {
    let input = deploychain::host::envelope::HttpInput {
        method: "POST".into(),
        url: "https://deploychain-fuzz.azurewebsites.net/api/hooks/github".into(),
        query: Vec::new(),
        headers: vec![
            ("Content-Type".into(), "application/json".into()),
            ("X-GitHub-Event".into(), event.into()),
            ("X-GitHub-Delivery".into(), "72d3162e-cc78-11e3-81ab-4c9367dc0958".into()),
            ("X-Hub-Signature-256".into(), signature),
        ],
        params: std::collections::BTreeMap::new(),
        body,
    };
    serde_json::to_vec(&deploychain::host::envelope::http_envelope("github_webhook", "req", &input, None)).unwrap()
}

pub fn github_signature(body: &[u8]) -> String {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(GITHUB_SECRET.as_bytes()).unwrap();
    m.update(body);
    format!("sha256={}", hex::encode(m.finalize().into_bytes()))
}

/// The caller-facing answer of an HTTP function (its `res` output): status and body. Panics
/// unless the host got what the protocol says it gets (200 and a JSON object with `res`).
pub fn http_result(host_status: u16, body: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(body);
    assert_eq!(host_status, 200, "an HTTP function answers the host 200: {text}");
    let v: Value = serde_json::from_slice(body).expect("the host gets JSON");
    let res = &v["Outputs"]["res"];
    let status = res["statusCode"].as_u64().and_then(|s| u16::try_from(s).ok()).expect("res.statusCode");
    (status, res["body"].as_str().unwrap_or_default().to_string())
}

/// The `X-GitHub-Event` values the webhook target picks from (its first byte).
pub const WEBHOOK_EVENTS: [&str; 8] = ["push", "workflow_run", "ping", "registry_package", "package", "check_suite", "create", "Push"];

/// The functions the envelope target posts to (its first byte picks).
pub const ENVELOPE_FUNCTIONS: [&str; 15] = [
    "github_webhook",
    "azure_devops_webhook",
    "jenkins_webhook",
    "eventgrid_webhook",
    "approval",
    "runs",
    "ops_deadletters",
    "on_push",
    "on_build_completed",
    "on_image_due",
    "on_image_ready",
    "on_deployment_due",
    "on_approval",
    "on_approval_due",
    "watchdog",
];

/// The approval links of the fuzz handler, with a previous key still accepted.
pub fn links() -> &'static ApprovalLinks {
    static L: OnceLock<ApprovalLinks> = OnceLock::new();
    L.get_or_init(|| {
        ApprovalLinks::new(
            SIGNING_KEY.as_bytes(),
            &[b"an-older-key-still-accepted-012345".as_slice()],
            url::Url::parse("https://deploychain-fuzz.azurewebsites.net").unwrap(),
        )
    })
}

/// A real token of [`links`], valid for decades.
pub fn real_token() -> String {
    links().token(&Claims {
        approval: "hello-0123456789abcdef.production".into(),
        run: "hello-0123456789abcdef".into(),
        stage: "production".into(),
        artifact: deploychain_functions::links::artifact_digest("ghcr.io/codertocat/hello-world@sha256:00"),
        approver: "alice@example.com".into(),
        exp: 4_102_444_800,
    })
}
