//! Test harness: the handler's router driven through envelopes shaped exactly as the Azure
//! Functions host sends them (reference §2.4–§2.5), with in-memory adapters, and a tiny "bus" that
//! delivers every published message to the function whose subscription filter takes its Label.
#![allow(dead_code, clippy::unwrap_used)]

use axum::Router;
use axum::body::Body;
use axum::http::Request;
use base64::Engine;
use deploychain_functions::adapters::memory::*;
use deploychain_functions::adapters::{Outbound, Store};
use deploychain_functions::config::Config;
use deploychain_functions::links::ApprovalLinks;
use deploychain_functions::policy::Policy;
use deploychain_functions::{AppState, app};
use hmac::{Hmac, Mac};
use http_body_util::BodyExt;
use serde_json::{Map, Value, json};
use sha2::Sha256;
use std::collections::HashMap;
use std::sync::Arc;
use tower::ServiceExt;

pub const GH_SECRET: &str = "gh-test-secret";
pub const ADO_USER: &str = "deploychain";
pub const ADO_SECRET: &str = "ado-test-secret";
pub const SIGNING_KEY: &str = "test-approval-signing-key-0123456789abcdef";

pub const POLICY: &str = r#"
# Apps matching the repositories of the real fixtures in tests/fixtures.
[[app]]
name = "probot"
source = { github = "bkeepers-inc/test" }
branches = ["bkeepers-patch-*"]
build = { provider = "github-actions" }
image = { source = "image-builder", destination = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg-images/providers/Microsoft.Compute/galleries/deploychain/images/probot" }
[[app.stage]]
name = "staging"
target = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg-probot/providers/Microsoft.Compute/virtualMachineScaleSets/probot-staging"

[[app]]
name = "octo"
source = { github = "octo-org/octo-repo" }
branches = ["master"]
build = { provider = "github-actions", pipeline = "test.yml" }
image = { source = "image-builder", destination = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg-images/providers/Microsoft.Compute/galleries/deploychain/images/octo" }
[[app.stage]]
name = "staging"
target = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg-octo/providers/Microsoft.Compute/virtualMachineScaleSets/octo-staging"

[[app]]
name = "hello"
source = { github = "Codertocat/Hello-World" }
branches = ["master"]
build = { provider = "github-actions", pipeline = "build.yml" }
image = { source = "registry", destination = "ghcr.io/codertocat/hello-world" }
[[app.stage]]
name = "staging"
target = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg-hello/providers/Microsoft.Compute/virtualMachineScaleSets/hello-staging"
checks = [{ kind = "http", url = "http://hello-staging.internal/healthz" }]
[[app.stage]]
name = "canary"
target = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg-hello/providers/Microsoft.Compute/virtualMachineScaleSets/hello-canary"
[[app.stage]]
name = "production"
target = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg-hello/providers/Microsoft.Compute/virtualMachineScaleSets/hello-prod"
approval = { approvers = ["alice@example.com", "bob@example.com"], quorum = 2, expires_after = "24h" }

[[app]]
name = "ado"
source = { azure_devops = "https://good-company.some.ssl.host/tfs/GoodCompany/_git/Project" }
branches = ["main"]
build = { provider = "azure-pipelines", pipeline = "ConsumerAddressModule" }
image = { source = "image-builder", destination = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg-images/providers/Microsoft.Compute/galleries/deploychain/images/ado" }
[[app.stage]]
name = "staging"
target = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg-ado/providers/Microsoft.Compute/virtualMachineScaleSets/ado-staging"
[[app.stage]]
name = "production"
target = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg-ado/providers/Microsoft.Compute/virtualMachineScaleSets/ado-prod"
approval = { approvers = ["carol@example.com"] }
"#;

pub fn fixture(path: &str) -> Vec<u8> {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(path);
    std::fs::read(&p).unwrap_or_else(|e| panic!("fixture {}: {e}", p.display()))
}

pub fn fixture_json(path: &str) -> Value {
    let b = fixture(path);
    serde_json::from_slice(b.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&b)).unwrap()
}

/// The probot push fixture, moved to `repo`, `branch` and `commit`.
pub fn push_payload(repo: &str, branch: &str, commit: &str) -> Vec<u8> {
    let mut p = fixture_json("github/push.branch-updated.probot.json");
    p["repository"]["full_name"] = json!(repo);
    p["ref"] = json!(format!("refs/heads/{branch}"));
    p["after"] = json!(commit);
    p["head_commit"]["id"] = json!(commit);
    serde_json::to_vec(&p).unwrap()
}

/// The `workflow_run` fixture rewritten to another repository, branch, commit, workflow file and
/// conclusion (its shape kept).
pub fn workflow_run_payload(repo: &str, branch: &str, commit: &str, path: &str, conclusion: &str) -> Vec<u8> {
    let mut p = fixture_json("github/workflow_run.completed.success.json");
    p["repository"]["full_name"] = json!(repo);
    p["workflow_run"]["head_branch"] = json!(branch);
    p["workflow_run"]["head_sha"] = json!(commit);
    p["workflow_run"]["path"] = json!(path);
    p["workflow_run"]["conclusion"] = json!(conclusion);
    serde_json::to_vec(&p).unwrap()
}

pub fn sign(body: &[u8]) -> String {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(GH_SECRET.as_bytes()).unwrap();
    m.update(body);
    format!("sha256={}", hex::encode(m.finalize().into_bytes()))
}

pub fn basic(user: &str, pass: &str) -> String {
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}")))
}

pub fn config(max_body: usize) -> Config {
    let vars: HashMap<&str, String> = HashMap::from([
        ("APPROVAL_SIGNING_KEY", SIGNING_KEY.to_string()),
        ("DEPLOYCHAIN_PUBLIC_URL", "https://deploychain-test.azurewebsites.net".to_string()),
        (
            "ServiceBusConnection",
            "Endpoint=sb://127.0.0.1:1;SharedAccessKeyName=Root;SharedAccessKey=k;UseDevelopmentEmulator=true".to_string(),
        ),
        ("DEPLOYCHAIN_ARM_CREDENTIAL", "static".to_string()),
        ("DEPLOYCHAIN_ARM_TOKEN", "arm-token-value".to_string()),
        ("GITHUB_WEBHOOK_SECRET", GH_SECRET.to_string()),
        ("AZURE_DEVOPS_WEBHOOK_SECRET", ADO_SECRET.to_string()),
        ("DEPLOYCHAIN_NOTIFY_URL", "http://127.0.0.1:1/notify".to_string()),
        ("DEPLOYCHAIN_MAX_BODY_BYTES", max_body.to_string()),
        // The CI systems builds are started on (the harness's MemoryBuilds stands in for them).
        ("GITHUB_TOKEN", "github-token-value".to_string()),
        ("AZURE_DEVOPS_ORG_URL", "https://dev.azure.com/contoso".to_string()),
        ("AZURE_DEVOPS_CREDENTIAL", "pat".to_string()),
        ("AZURE_DEVOPS_PAT", "azure-devops-pat-value".to_string()),
        ("JENKINS_URL", "https://jenkins.contoso.example".to_string()),
        ("JENKINS_USER", "deploychain".to_string()),
        ("JENKINS_API_TOKEN", "jenkins-token-value".to_string()),
        // Builds are "stuck" after a second (the watchdog tests); the rest as shipped.
        ("DEPLOYCHAIN_STUCK_AFTER", "2h,build=1s".to_string()),
    ]);
    Config::from_lookup(&|k| vars.get(k).cloned()).unwrap()
}

pub struct Harness {
    pub router: Router,
    pub state: AppState,
    pub publisher: Arc<MemoryPublisher>,
    pub builds: Arc<MemoryBuilds>,
    pub baker: Arc<MemoryBaker>,
    pub compute: Arc<MemoryCompute>,
    pub notify: Arc<MemoryNotify>,
    /// How many published messages the bus has delivered so far.
    pub delivered: usize,
    seq: i64,
}

impl Harness {
    pub fn new(store: Arc<dyn Store>) -> Harness {
        Self::with_max_body(store, 1 << 20)
    }

    pub fn with_max_body(store: Arc<dyn Store>, max_body: usize) -> Harness {
        Self::build(store, max_body, POLICY)
    }

    /// A harness on another pipeline policy.
    pub fn with_policy(store: Arc<dyn Store>, policy: &str) -> Harness {
        Self::build(store, 1 << 20, policy)
    }

    fn build(store: Arc<dyn Store>, max_body: usize, policy: &str) -> Harness {
        let config = config(max_body);
        let policy = Policy::from_toml(policy).unwrap();
        config.check_against(&policy).unwrap();
        let publisher = Arc::new(MemoryPublisher::default());
        let builds = Arc::new(MemoryBuilds::default());
        let baker = Arc::new(MemoryBaker::default());
        let compute = Arc::new(MemoryCompute::default());
        let notify = Arc::new(MemoryNotify::default());
        let links = ApprovalLinks::new(SIGNING_KEY.as_bytes(), &[], config.public_url.clone());
        let state = AppState {
            config: Arc::new(config),
            policy: Arc::new(policy),
            links: Arc::new(links),
            store,
            publisher: publisher.clone(),
            builds: builds.clone(),
            baker: baker.clone(),
            compute: compute.clone(),
            notify: notify.clone(),
            dead_letters: None,
        };
        Harness { router: app(state.clone()), state, publisher, builds, baker, compute, notify, delivered: 0, seq: 100 }
    }

    /// POST an envelope to `/{function}` as the host does; returns the host-facing status and JSON.
    pub async fn invoke(&self, function: &str, envelope: &Value) -> (u16, Value) {
        let req = Request::post(format!("/{function}"))
            .header("content-type", "application/json; charset=utf-8")
            .header("x-azure-functions-hostversion", "4.1036.1.23224")
            .header("x-azure-functions-invocationid", uuid::Uuid::new_v4().to_string())
            .header("user-agent", "Azure-Functions-Host/4.1036.1.23224")
            .body(Body::from(envelope.to_string()))
            .unwrap();
        let rsp = self.router.clone().oneshot(req).await.unwrap();
        let status = rsp.status().as_u16();
        let ct = rsp.headers().get("content-type").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
        let bytes = rsp.into_body().collect().await.unwrap().to_bytes();
        let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        // The host needs a JSON object (never empty) with a JSON content type.
        assert!(ct.starts_with("application/json"), "content-type {ct} from {function}");
        assert!(
            v.is_object() && v.get("Outputs").is_some() && v.get("Logs").is_some() && v.get("ReturnValue").is_some(),
            "{function}: {v}"
        );
        (status, v)
    }

    /// Invoke an HTTP function; returns the caller-facing (status, headers, body).
    pub async fn http(&self, function: &str, envelope: &Value) -> (u16, Map<String, Value>, String) {
        let (status, v) = self.invoke(function, envelope).await;
        assert_eq!(status, 200, "HTTP functions always answer the host 200: {v}");
        let res = &v["Outputs"]["res"];
        for (_, hv) in res["headers"].as_object().unwrap() {
            assert!(hv.is_string(), "header values must be strings: {res}");
        }
        (res["statusCode"].as_u64().unwrap() as u16, res["headers"].as_object().unwrap().clone(), res["body"].as_str().unwrap().to_string())
    }

    pub async fn github(&self, event: &str, body: &[u8], signature: Option<&str>) -> (u16, Value) {
        let mut headers = vec![
            ("Content-Type", "application/json".to_string()),
            ("User-Agent", "GitHub-Hookshot/044aadd".to_string()),
            ("X-GitHub-Event", event.to_string()),
            ("X-GitHub-Delivery", "72d3162e-cc78-11e3-81ab-4c9367dc0958".to_string()),
        ];
        if let Some(s) = signature {
            headers.push(("X-Hub-Signature-256", s.to_string()));
        }
        let env = http_envelope("github_webhook", "POST", "hooks/github", &[], &headers, &[], body);
        let (status, _, body) = self.http("github_webhook", &env).await;
        (status, serde_json::from_str(&body).unwrap_or(Value::Null))
    }

    pub async fn github_signed(&self, event: &str, body: &[u8]) -> (u16, Value) {
        self.github(event, body, Some(&sign(body))).await
    }

    pub async fn ado(&self, body: &[u8], auth: Option<&str>) -> (u16, Map<String, Value>, Value) {
        let mut headers = vec![("Content-Type", "application/json; charset=utf-8".to_string())];
        if let Some(a) = auth {
            headers.push(("Authorization", a.to_string()));
        }
        let env = http_envelope("azure_devops_webhook", "POST", "hooks/azure-devops", &[], &headers, &[], body);
        let (status, h, body) = self.http("azure_devops_webhook", &env).await;
        (status, h, serde_json::from_str(&body).unwrap_or(Value::Null))
    }

    /// Deliver one published message to a function as a `serviceBusTrigger` invocation.
    pub async fn deliver(&mut self, function: &str, m: &Outbound, delivery_count: u32) -> (u16, Value) {
        self.seq += 1;
        let env = bus_envelope(
            function,
            m.body.as_bytes(),
            Some(&m.message_id),
            delivery_count,
            Some(&m.subject),
            m.session_id.as_deref(),
            &m.properties,
            self.seq,
        );
        self.invoke(function, &env).await
    }

    /// Deliver every message published since the last pump to the function subscribed to its
    /// Label, until nothing new is published. Returns (function, host status) per delivery.
    pub async fn pump(&mut self) -> Vec<(String, u16)> {
        let mut log = Vec::new();
        loop {
            let sent = self.publisher.sent();
            if self.delivered >= sent.len() {
                return log;
            }
            let m = sent[self.delivered].clone();
            self.delivered += 1;
            // A scheduled message is not delivered before its time: `fire_timers` delivers it.
            if m.scheduled_at.is_some_and(|t| t > chrono::Utc::now()) {
                continue;
            }
            if let Some(f) = subscriber(&m.subject) {
                let (status, v) = self.deliver(f, &m, 1).await;
                assert_eq!(status, 200, "{f} failed on {}: {v}", m.message_id);
                log.push((f.to_string(), status));
            }
        }
    }

    /// Deliver the scheduled `approval.due` messages whose id contains `which` (`timeout.0`,
    /// `reminder.0.3600`) as if their time had come, then pump what they publish.
    pub async fn fire_timers(&mut self, which: &str) -> usize {
        let due: Vec<Outbound> = self
            .publisher
            .sent()
            .into_iter()
            .filter(|m| m.subject == "dev.deploychain.approval.due.v1" && m.scheduled_at.is_some() && m.message_id.contains(which))
            .collect();
        for m in &due {
            let (status, v) = self.deliver("on_approval_due", m, 1).await;
            assert_eq!(status, 200, "on_approval_due failed on {}: {v}", m.message_id);
        }
        self.pump().await;
        due.len()
    }

    /// A tick of the watchdog's timer, as the host sends it (§2.6).
    pub async fn tick_watchdog(&self) -> (u16, Value) {
        let env = json!({
            "Data": { "timer": { "Schedule": { "AdjustForDST": true }, "ScheduleStatus": null, "IsPastDue": false } },
            "Metadata": { "sys": sys("watchdog") }
        });
        self.invoke("watchdog", &env).await
    }

    pub fn types_since(&self, from: usize) -> Vec<String> {
        self.publisher.types()[from..].to_vec()
    }
}

/// The subscription filters of infra/servicebus.json: Label → function.
pub fn subscriber(label: &str) -> Option<&'static str> {
    match label {
        "dev.deploychain.push.v1" => Some("on_push"),
        "dev.deploychain.build.completed.v1" => Some("on_build_completed"),
        "dev.deploychain.image.due.v1" => Some("on_image_due"),
        "dev.deploychain.image.ready.v1" => Some("on_image_ready"),
        "dev.deploychain.deployment.due.v1" => Some("on_deployment_due"),
        "dev.deploychain.approval.decided.v1" => Some("on_approval"),
        "dev.deploychain.approval.due.v1" => Some("on_approval_due"),
        _ => None,
    }
}

/// JsonConvert.SerializeObject of a string.
fn enc(s: &str) -> Value {
    Value::String(serde_json::to_string(s).unwrap())
}

fn sys(function: &str) -> Value {
    json!({ "MethodName": function, "UtcNow": "2026-11-22T10:00:00.1234567Z", "RandGuid": uuid::Uuid::new_v4().to_string() })
}

/// An `httpTrigger` invocation in default mode (reference §2.5).
pub fn http_envelope(
    function: &str,
    method: &str,
    route: &str,
    query: &[(&str, &str)],
    headers: &[(&str, String)],
    params: &[(&str, &str)],
    body: &[u8],
) -> Value {
    let qs = query
        .iter()
        .map(|(k, v)| format!("{k}={}", url::form_urlencoded::byte_serialize(v.as_bytes()).collect::<String>()))
        .collect::<Vec<_>>()
        .join("&");
    let url =
        format!("https://deploychain-test.azurewebsites.net/api/{route}{}", if qs.is_empty() { String::new() } else { format!("?{qs}") });
    let mut hdr_arrays = Map::new();
    let mut hdr_joined = Map::new();
    let mut all: Vec<(String, String)> = headers.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
    all.push(("Host".into(), "deploychain-test.azurewebsites.net".into()));
    if !body.is_empty() {
        all.push(("Content-Length".into(), body.len().to_string()));
    }
    for (k, v) in &all {
        hdr_arrays.insert(k.clone(), json!([v]));
        hdr_joined.insert(k.clone(), json!(v));
    }
    let mut req = Map::new();
    req.insert("Url".into(), json!(url));
    req.insert("Method".into(), json!(method));
    req.insert("Query".into(), Value::Object(query.iter().map(|(k, v)| (k.to_string(), json!(v))).collect()));
    req.insert("Headers".into(), Value::Object(hdr_arrays));
    req.insert("Params".into(), Value::Object(params.iter().map(|(k, v)| (k.to_string(), json!(v))).collect()));
    req.insert(
        "Identities".into(),
        json!([{ "AuthenticationType": null, "IsAuthenticated": false, "Actor": null, "BootstrapContext": null, "Claims": [], "Label": null, "Name": null,
                 "NameClaimType": "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/name", "RoleClaimType": "http://schemas.microsoft.com/ws/2008/06/identity/claims/role" }]),
    );
    let ct = headers.iter().find(|(k, _)| k.eq_ignore_ascii_case("content-type")).map(|(_, v)| v.to_ascii_lowercase()).unwrap_or_default();
    if !body.is_empty() {
        // As the host does: binary media types travel as base64.
        let b = if ct.starts_with("application/octet-stream") || ct.starts_with("multipart/") {
            base64::engine::general_purpose::STANDARD.encode(body)
        } else {
            String::from_utf8_lossy(body).into_owned()
        };
        req.insert("Body".into(), json!(b));
    }
    let mut meta = Map::new();
    for (k, v) in query {
        if *k != "code" {
            meta.insert(k.to_string(), enc(v));
        }
    }
    for (k, v) in params {
        meta.insert(k.to_string(), enc(v));
    }
    // The host merges the top-level fields of a JSON body into Metadata (scalars encoded, objects as objects).
    if let Ok(Value::Object(o)) = serde_json::from_slice::<Value>(body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body)) {
        for (k, v) in o {
            match v {
                Value::Object(_) => {
                    meta.insert(k, v);
                }
                Value::Array(_) | Value::Null => {}
                Value::String(s) => {
                    meta.insert(k, enc(&s));
                }
                other => {
                    meta.insert(k, enc(&other.to_string()));
                }
            }
        }
    }
    meta.insert("Query".into(), Value::Object(query.iter().map(|(k, v)| (k.to_string(), json!(v))).collect()));
    meta.insert("Headers".into(), Value::Object(hdr_joined));
    meta.insert("sys".into(), sys(function));
    json!({ "Data": { "req": Value::Object(req) }, "Metadata": Value::Object(meta) })
}

/// A `serviceBusTrigger` invocation with `dataType: binary` (reference §2.2–§2.4).
#[allow(clippy::too_many_arguments)]
pub fn bus_envelope(
    function: &str,
    body: &[u8],
    message_id: Option<&str>,
    delivery_count: u32,
    label: Option<&str>,
    session: Option<&str>,
    props: &std::collections::BTreeMap<String, String>,
    seq: i64,
) -> Value {
    let mut meta = Map::new();
    for k in ["MessageReceiver", "MessageSession", "MessageActions", "SessionActions", "ReceiveActions"] {
        meta.insert(k.into(), json!({}));
    }
    meta.insert("Client".into(), json!({ "FullyQualifiedNamespace": "deploychain.servicebus.windows.net", "IsClosed": false, "TransportType": 0, "Identifier": "deploychain-client" }));
    meta.insert("DeliveryCount".into(), json!(delivery_count.to_string()));
    meta.insert("LockToken".into(), enc(&uuid::Uuid::new_v4().to_string()));
    meta.insert("ExpiresAtUtc".into(), json!("9999-12-31T23:59:59"));
    meta.insert("ExpiresAt".into(), json!("9999-12-31T23:59:59+00:00"));
    meta.insert("EnqueuedTimeUtc".into(), json!("2026-11-22T10:00:00"));
    meta.insert("EnqueuedTime".into(), json!("2026-11-22T10:00:00+00:00"));
    if let Some(id) = message_id {
        meta.insert("MessageId".into(), enc(id));
    }
    meta.insert("ContentType".into(), enc("application/cloudevents+json; charset=utf-8"));
    meta.insert("SequenceNumber".into(), json!(seq.to_string()));
    if let Some(l) = label {
        meta.insert("Subject".into(), enc(l));
        meta.insert("Label".into(), enc(l));
    }
    if let Some(s) = session {
        meta.insert("SessionId".into(), enc(s));
    }
    // Property names arrive lower-cased through the REST client; the values typed.
    let ap: Map<String, Value> = props.iter().map(|(k, v)| (k.to_ascii_lowercase(), json!(v))).collect();
    meta.insert("ApplicationProperties".into(), Value::Object(ap.clone()));
    meta.insert("UserProperties".into(), Value::Object(ap));
    meta.insert("sys".into(), sys(function));
    json!({ "Data": { "msg": base64::engine::general_purpose::STANDARD.encode(body) }, "Metadata": Value::Object(meta) })
}

/// Every published body is a CloudEvent that validates against its type's schema in events/schemas.
pub fn assert_bodies_match_schemas(sent: &[Outbound]) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../events/schemas");
    for m in sent {
        let short = m.subject.trim_start_matches("dev.deploychain.").trim_end_matches(".v1");
        let schema: Value = serde_json::from_slice(&std::fs::read(dir.join(format!("{short}.schema.json"))).unwrap()).unwrap();
        let v = jsonschema::options().should_validate_formats(true).build(&schema).unwrap();
        let body: Value = serde_json::from_str(&m.body).unwrap();
        let errors: Vec<String> = v.iter_errors(&body).map(|e| format!("{e} at {}", e.instance_path)).collect();
        assert!(errors.is_empty(), "{} does not match its schema: {errors:#?}\n{body:#}", m.message_id);
    }
}

/// A Table store on a fresh table of an Azurite started for this test process (installed by
/// `scripts/install-azurite.sh`, which the test command runs).
pub fn table_store() -> Arc<dyn deploychain_functions::adapters::Store> {
    use deploychain_functions::adapters::table::{TableAuth, TableStore};
    static AZURITE: std::sync::OnceLock<(u16, std::sync::Mutex<std::process::Child>)> = std::sync::OnceLock::new();
    let (port, _) = AZURITE.get_or_init(|| {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let bin = root.join("target/azurite/node_modules/.bin/azurite-table");
        assert!(bin.is_file(), "Azurite is missing: run `bash scripts/install-azurite.sh` (the test command does)");
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        // Statics are never dropped: a watcher shell ends Azurite once this test process is gone
        // (nextest runs every test in a process of its own).
        let watcher = r#"parent=$1; shift; "$@" & child=$!
            while kill -0 "$parent" 2>/dev/null && kill -0 "$child" 2>/dev/null; do sleep 0.5; done
            kill "$child" 2>/dev/null"#;
        let child = std::process::Command::new("sh")
            .args(["-c", watcher, "sh", &std::process::id().to_string()])
            .arg(bin)
            .args([
                "--tableHost",
                "127.0.0.1",
                "--tablePort",
                &port.to_string(),
                "--inMemoryPersistence",
                "--skipApiVersionCheck",
                "--disableProductStyleUrl",
                "--silent",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let start = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(start.elapsed() < std::time::Duration::from_secs(30), "Azurite did not start");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        (port, std::sync::Mutex::new(child))
    });
    let endpoint = url::Url::parse(&format!("http://127.0.0.1:{port}/devstoreaccount1")).unwrap();
    // Azurite's well-known development account.
    let key = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
    let auth = TableAuth::Key { account: "devstoreaccount1".into(), key: deploychain_functions::config::Secret::new(key) };
    let table = format!("t{}", uuid::Uuid::new_v4().simple());
    // The table is made on a runtime of its own (the caller may be inside a single-threaded one).
    let (e2, t2) = (endpoint.clone(), table.clone());
    let auth2 = TableAuth::Key { account: "devstoreaccount1".into(), key: deploychain_functions::config::Secret::new(key) };
    std::thread::spawn(move || {
        let s = TableStore::new(e2, auth2).unwrap().with_table(&t2);
        tokio::runtime::Runtime::new().unwrap().block_on(s.ensure_table()).unwrap();
    })
    .join()
    .unwrap();
    Arc::new(TableStore::new(endpoint, auth).unwrap().with_table(&table))
}

/// Every store the step suites run on: in memory, SQLite, Table Storage (Azurite).
pub fn stores() -> Vec<(&'static str, Arc<dyn Store>)> {
    vec![
        ("memory", Arc::new(MemoryStore::default())),
        ("sqlite", Arc::new(deploychain_functions::adapters::sqlite::SqliteStore::in_memory().unwrap())),
        ("table", table_store()),
    ]
}

/// A signed GitHub push of `commit` to `repo`'s master (the probot fixture, relabelled), with the
/// push step run. Returns the run id.
pub async fn push_master(h: &mut Harness, repo: &str, commit: &str) -> String {
    let mut p = fixture_json("github/push.branch-updated.probot.json");
    p["repository"]["full_name"] = json!(repo);
    p["ref"] = json!("refs/heads/master");
    p["after"] = json!(commit);
    p["head_commit"]["id"] = json!(commit);
    p["commits"][0]["id"] = json!(commit);
    let (s, v) = h.github_signed("push", &serde_json::to_vec(&p).unwrap()).await;
    assert_eq!(s, 202, "{v}");
    h.pump().await;
    v["run"].as_str().unwrap().to_string()
}
