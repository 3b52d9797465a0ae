//! Focused tests of the local Functions host (`deploychain::host`) against a fake custom handler
//! written in Python (`tests/fake_handler/handler.py`, standard library only). Each test builds its
//! own app root in a temporary directory (host.json with `customHandler` = `python3 handler.py`,
//! one folder per function, local.settings.json), an in-memory broker with a topology built in
//! code, and a front door on a free port. The fake appends every readiness probe and invocation
//! (pid, function, envelope, start/end times) to a JSON-lines record the tests read back; what it
//! answers is chosen per invocation (`behave` in the body, query or application properties).
//! Every wait is bounded; no test takes more than about 10 s.
#![allow(clippy::unwrap_used)]

use base64::Engine;
use deploychain::host::{LocalHost, app::FunctionApp, http::Keys};
use deploychain_bus::{
    Broker, CorrelationFilter, EntityCounts, EntityPath, NewMessage, Queue, Rule, SendOutcome, Subscription, Topic, Topology,
};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const HANDLER_PY: &str = include_str!("fake_handler/handler.py");
const MASTER_KEY: &str = "master-key-for-host-tests";
const FUNCTION_KEY: &str = "function-key-for-host-tests";

fn keys() -> Keys {
    Keys { master: MASTER_KEY.into(), function: FUNCTION_KEY.into() }
}

fn now_secs() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

/// `a` with the members of `b` merged in, recursively for objects.
fn merge(a: &mut Value, b: Value) {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                match a.get_mut(&k) {
                    Some(existing) if existing.is_object() && v.is_object() => merge(existing, v),
                    _ => {
                        a.insert(k, v);
                    }
                }
            }
        }
        (a, b) => *a = b,
    }
}

fn write_json(path: &Path, v: &Value) {
    std::fs::write(path, serde_json::to_vec_pretty(v).unwrap()).unwrap();
}

/// A temporary function app root for the fake handler; removed when dropped.
struct AppRoot {
    root: PathBuf,
    record: PathBuf,
}

impl AppRoot {
    /// host.json = the fake's customHandler section with `host` merged in; no functions yet.
    fn new(test: &str, host: Value) -> AppRoot {
        let root = std::env::temp_dir().join(format!("deploychain-host-{test}-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&root).unwrap();
        // Absolute and symlink-free, so the paths the handler reports compare equal.
        let root = root.canonicalize().unwrap();
        std::fs::write(root.join("handler.py"), HANDLER_PY).unwrap();
        let mut host_json = json!({
            "version": "2.0",
            "customHandler": { "description": { "defaultExecutablePath": "python3", "arguments": ["handler.py"] } }
        });
        merge(&mut host_json, host);
        write_json(&root.join("host.json"), &host_json);
        let app = AppRoot { record: root.join("record.jsonl"), root };
        app.settings(json!({}));
        app
    }

    /// local.settings.json: `FAKE_RECORD` and `FUNCTIONS_WORKER_RUNTIME` plus `values`.
    fn settings(&self, values: Value) {
        let mut all = json!({ "FUNCTIONS_WORKER_RUNTIME": "custom", "FAKE_RECORD": self.record.display().to_string() });
        merge(&mut all, values);
        write_json(&self.root.join("local.settings.json"), &json!({ "IsEncrypted": false, "Values": all }));
    }

    fn function(&self, name: &str, function_json: Value) {
        let dir = self.root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        write_json(&dir.join("function.json"), &function_json);
    }

    /// An HTTP function with a `res` output; `methods` empty = all methods.
    fn http_function(&self, name: &str, route: Option<&str>, methods: &[&str], auth_level: &str) {
        let mut trigger = json!({ "type": "httpTrigger", "direction": "in", "name": "req", "authLevel": auth_level });
        if let Some(r) = route {
            trigger["route"] = json!(r);
        }
        if !methods.is_empty() {
            trigger["methods"] = json!(methods);
        }
        self.function(name, json!({ "bindings": [trigger, { "type": "http", "direction": "out", "name": "res" }] }));
    }

    /// A Service Bus function whose trigger binding (`name: msg`) has `trigger` merged in.
    fn bus_function(&self, name: &str, trigger: Value) {
        let mut t = json!({ "type": "serviceBusTrigger", "direction": "in", "name": "msg", "connection": "ServiceBusConnection" });
        merge(&mut t, trigger);
        self.function(name, json!({ "bindings": [t] }));
    }

    /// Everything the fake recorded so far (a line still being written is skipped).
    fn events(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(&self.record).unwrap_or_default();
        text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }

    fn of(&self, event: &str, function: &str) -> Vec<Value> {
        self.events().into_iter().filter(|e| e["event"] == event && e["function"] == function).collect()
    }

    /// The invocations of `function` that reached the fake, in the order they started.
    fn starts(&self, function: &str) -> Vec<Value> {
        self.of("start", function)
    }

    fn ends(&self, function: &str) -> Vec<Value> {
        self.of("end", function)
    }

    /// (start, end) times of the invocations of `function` that finished.
    fn intervals(&self, function: &str) -> Vec<(f64, f64, Value)> {
        let ends: HashMap<String, f64> =
            self.ends(function).iter().map(|e| (e["id"].as_str().unwrap().to_string(), e["t"].as_f64().unwrap())).collect();
        self.starts(function)
            .into_iter()
            .filter_map(|s| ends.get(s["id"].as_str().unwrap()).map(|end| (s["t"].as_f64().unwrap(), *end, s)))
            .collect()
    }
}

impl Drop for AppRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// A started host with its broker and an HTTP client for the front door.
struct Running {
    host: LocalHost,
    broker: Broker,
    base: String,
    http: reqwest::Client,
}

impl Running {
    async fn start(app: &AppRoot, topology: Topology) -> Running {
        Running::start_with_env(app, topology, Vec::new()).await
    }

    async fn start_with_env(app: &AppRoot, topology: Topology, env: Vec<(String, String)>) -> Running {
        // The host's log, shown for failing tests (RUST_LOG to change what is shown).
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
            .with_test_writer()
            .try_init();
        let function_app = FunctionApp::load(&app.root).unwrap();
        let broker = Broker::open_in_memory(topology).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let host =
            tokio::time::timeout(Duration::from_secs(15), LocalHost::start(function_app, env, broker.clone(), "local", listener, keys()))
                .await
                .expect("the host started within 15 s")
                .unwrap();
        let base = format!("http://{}", host.http_addr);
        // No idle connections: nothing keeps the front door's graceful shutdown waiting.
        let http = reqwest::Client::builder().pool_max_idle_per_host(0).timeout(Duration::from_secs(15)).build().unwrap();
        Running { host, broker, base, http }
    }

    fn url(&self, path_and_query: &str) -> String {
        format!("{}{path_and_query}", self.base)
    }

    async fn get(&self, path_and_query: &str) -> reqwest::Response {
        self.http.get(self.url(path_and_query)).send().await.unwrap()
    }

    async fn pid(&self) -> u32 {
        self.host.worker.live(Duration::from_secs(5)).await.expect("a live handler").pid
    }

    async fn counts(&self, path: &EntityPath) -> EntityCounts {
        self.broker.count(path).await.unwrap()
    }

    /// Send; the sequence numbers it got (one per receiving entity, none if no rule matched).
    async fn send(&self, entity: &str, m: NewMessage) -> Vec<i64> {
        match self.broker.send(entity, m).await.unwrap() {
            SendOutcome::Enqueued(seqs) => seqs,
            SendOutcome::Duplicate => panic!("unexpected duplicate"),
        }
    }

    async fn stop(self) {
        drop(self.http);
        tokio::time::timeout(Duration::from_secs(15), self.host.stop()).await.expect("the host stopped within 15 s");
    }
}

/// Poll `probe` every 50 ms until it yields something; panic after `within`.
async fn eventually<T, F, Fut>(what: &str, within: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {within:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Wait until the entity is empty: everything completed (nothing active, locked, scheduled or dead-lettered).
async fn wait_settled(r: &Running, path: &EntityPath, within: Duration) {
    eventually(&format!("{path} to be empty"), within, || async move { (r.counts(path).await == EntityCounts::default()).then_some(()) })
        .await;
}

fn message(body: impl Into<Vec<u8>>, id: &str) -> NewMessage {
    NewMessage { message_id: Some(id.into()), ..NewMessage::new(body) }
}

/// A Metadata value the host JSON-encodes (`"\"x\""`), decoded once.
fn decoded(v: &Value) -> Value {
    serde_json::from_str(v.as_str().unwrap_or_else(|| panic!("{v} is not a string"))).unwrap()
}

/// The invocations whose Metadata.MessageId is `id`, in start order.
fn of_message(starts: &[Value], id: &str) -> Vec<Value> {
    starts.iter().filter(|s| s["envelope"]["Metadata"]["MessageId"] == Value::String(format!("\"{id}\""))).cloned().collect()
}

fn delivery_counts(starts: &[Value]) -> Vec<String> {
    starts.iter().map(|s| s["envelope"]["Metadata"]["DeliveryCount"].as_str().unwrap().to_string()).collect()
}

/// The most invocations running at once, from (start, end) intervals; an end at the same time as a
/// start does not overlap it.
fn max_overlap(intervals: &[(f64, f64, Value)]) -> usize {
    let mut points: Vec<(f64, i32)> = intervals.iter().flat_map(|(s, e, _)| [(*s, 1), (*e, -1)]).collect();
    points.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let (mut now, mut max) = (0i32, 0i32);
    for (_, d) in points {
        now += d;
        max = max.max(now);
    }
    usize::try_from(max).unwrap()
}

fn queue(name: &str, lock: Duration, max_delivery_count: u32) -> Queue {
    Queue { lock_duration: lock, max_delivery_count, ..Queue::new(name) }
}

fn topology_with_queues(queues: Vec<Queue>) -> Topology {
    let mut t = Topology::new("local");
    for q in queues {
        t.add_queue(q).unwrap();
    }
    t
}

// ---------------------------------------------------------------------------------------------
// Process model

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_gets_the_hosts_environment_and_app_settings() {
    let app = AppRoot::new("env", json!({}));
    app.settings(json!({ "FAKE_SETTING": "from-local-settings", "FAKE_STARTUP_DELAY": "0.7" }));
    app.http_function("hello", None, &[], "anonymous");

    let began = now_secs();
    let r = Running::start_with_env(&app, Topology::new("local"), vec![("FAKE_FROM_ENV".into(), "from-env".into())]).await;
    let started = now_secs();
    let live = r.host.worker.live(Duration::from_secs(1)).await.unwrap();

    // The fake only binds its port after 0.7 s; start() returned after it answered GET /.
    let events = app.events();
    let listening = events.iter().find(|e| e["event"] == "listening" && e["pid"] == live.pid).expect("the fake listened");
    let ready = events.iter().find(|e| e["event"] == "ready" && e["pid"] == live.pid).expect("the host probed GET /");
    assert!(
        listening["t"].as_f64().unwrap() - began >= 0.6,
        "the fake listened {} s after start()",
        listening["t"].as_f64().unwrap() - began
    );
    assert!(ready["t"].as_f64().unwrap() <= started, "start() returned before the handler answered GET /");
    assert_eq!(listening["port"], live.port);
    assert_eq!(r.host.worker.restarts(), 0);

    let rsp = r.get("/api/hello").await;
    assert_eq!(rsp.status(), 201);
    let starts = app.starts("hello");
    assert_eq!(starts.len(), 1);
    let s = &starts[0];
    assert_eq!(s["pid"], live.pid);
    assert!(s["t"].as_f64().unwrap() > ready["t"].as_f64().unwrap(), "invoked before the readiness answer");

    let env = &s["env"];
    let port = live.port.to_string();
    assert_eq!(env["FUNCTIONS_CUSTOMHANDLER_PORT"], port.as_str());
    assert_eq!(env["FUNCTIONS_HTTPWORKER_PORT"], port.as_str());
    let worker_id = env["FUNCTIONS_CUSTOMHANDLER_WORKER_ID"].as_str().expect("FUNCTIONS_CUSTOMHANDLER_WORKER_ID is set");
    uuid::Uuid::parse_str(worker_id).expect("the worker id is a GUID");
    assert_eq!(env["FUNCTIONS_APP_ROOT_PATH"], app.root.display().to_string().as_str());
    assert_eq!(env["FAKE_SETTING"], "from-local-settings", "local.settings.json Values reach the handler");
    assert_eq!(env["FAKE_RECORD"], app.record.display().to_string().as_str());
    assert_eq!(env["FAKE_FROM_ENV"], "from-env", "the env passed to start() reaches the handler");
    assert_eq!(s["cwd"], app.root.display().to_string().as_str(), "the working directory defaults to the app root");

    // The host's headers on the invocation request (§2.1).
    let h = &s["headers"];
    assert!(h["content-type"].as_str().unwrap().starts_with("application/json"), "{h}");
    assert!(h["x-azure-functions-hostversion"].is_string(), "{h}");
    uuid::Uuid::parse_str(h["x-azure-functions-invocationid"].as_str().unwrap()).unwrap();
    assert!(h["user-agent"].as_str().unwrap().starts_with("Azure-Functions-Host/"), "{h}");
    r.stop().await;
}

// ---------------------------------------------------------------------------------------------
// HTTP front door

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn front_door_routes_methods_and_keys() {
    let app = AppRoot::new("front-door", json!({}));
    app.http_function("items", Some("items/{id}"), &["get"], "function");
    app.http_function("admin_op", Some("admin/op"), &[], "admin");
    app.http_function("open", Some("open"), &[], "anonymous");
    let r = Running::start(&app, Topology::new("local")).await;

    // A matching GET with the function key in the header reaches the handler; its `res` is the answer.
    let rsp = r.http.get(r.url("/api/items/42?x=1")).header("x-functions-key", FUNCTION_KEY).send().await.unwrap();
    assert_eq!(rsp.status(), 201);
    assert_eq!(rsp.headers()["x-echo"], "GET items");
    let body: Value = serde_json::from_str(&rsp.text().await.unwrap()).unwrap();
    assert_eq!(body, json!({ "function": "items", "params": { "id": "42" }, "query": { "x": "1" } }));

    let starts = app.starts("items");
    assert_eq!(starts.len(), 1);
    let env = &starts[0]["envelope"];
    let req = &env["Data"]["req"];
    assert_eq!(req["Method"], "GET");
    assert_eq!(req["Url"], r.url("/api/items/42?x=1"));
    assert_eq!(req["Params"], json!({ "id": "42" }));
    assert_eq!(req["Query"], json!({ "x": "1" }));
    assert_eq!(req["Headers"]["x-functions-key"], json!([FUNCTION_KEY]), "request headers are arrays");
    assert!(req["Headers"].as_object().unwrap().values().all(Value::is_array), "{}", req["Headers"]);
    assert!(req.get("Body").is_none(), "no body was sent: {req}");
    assert_eq!(req["Identities"][0]["IsAuthenticated"], true);
    assert_eq!(req["Identities"][0]["Claims"][0]["Value"], "Function");
    let meta = &env["Metadata"];
    assert_eq!(meta["id"], "\"42\"");
    assert_eq!(meta["x"], "\"1\"");
    assert_eq!(meta["sys"]["MethodName"], "items");
    assert_eq!(meta["Query"], json!({ "x": "1" }));
    assert_eq!(meta["Headers"]["x-functions-key"], FUNCTION_KEY, "metadata headers are joined strings");

    // Method filter and unknown routes: 404, nothing invoked.
    let rsp = r.http.post(r.url("/api/items/42")).header("x-functions-key", FUNCTION_KEY).send().await.unwrap();
    assert_eq!(rsp.status(), 404);
    assert_eq!(r.http.get(r.url("/api/nothing/here")).header("x-functions-key", FUNCTION_KEY).send().await.unwrap().status(), 404);
    assert_eq!(r.http.get(r.url("/items/42")).header("x-functions-key", FUNCTION_KEY).send().await.unwrap().status(), 404);
    assert_eq!(r.http.get(r.url("/api/items")).header("x-functions-key", FUNCTION_KEY).send().await.unwrap().status(), 404);

    // Keys: missing or wrong → 401 before the handler is invoked.
    assert_eq!(r.get("/api/items/42").await.status(), 401);
    assert_eq!(r.get("/api/items/42?code=wrong").await.status(), 401);
    let rsp = r.http.get(r.url(&format!("/api/items/42?code={FUNCTION_KEY}"))).header("x-functions-key", "wrong").send().await.unwrap();
    assert_eq!(rsp.status(), 401, "x-functions-key takes precedence over code");
    assert_eq!(app.starts("items").len(), 1, "a rejected request must not reach the handler");

    // `code` works; it is in Query but not in Metadata as a binding value.
    let rsp = r.get(&format!("/api/items/43?code={FUNCTION_KEY}")).await;
    assert_eq!(rsp.status(), 201);
    let starts = app.starts("items");
    assert_eq!(starts.len(), 2);
    let meta = &starts[1]["envelope"]["Metadata"];
    assert!(meta.get("code").is_none(), "{meta}");
    assert_eq!(meta["Query"]["code"], FUNCTION_KEY);
    assert_eq!(meta["id"], "\"43\"");

    // The master key passes function level, as Admin.
    let rsp = r.http.get(r.url("/api/items/44")).header("x-functions-key", MASTER_KEY).send().await.unwrap();
    assert_eq!(rsp.status(), 201);
    assert_eq!(app.starts("items")[2]["envelope"]["Data"]["req"]["Identities"][0]["Claims"][0]["Value"], "Admin");

    // Admin level: the function key is not enough; the master key (header or code) is.
    let rsp = r.http.get(r.url("/api/admin/op")).header("x-functions-key", FUNCTION_KEY).send().await.unwrap();
    assert_eq!(rsp.status(), 401);
    assert_eq!(r.get(&format!("/api/admin/op?code={FUNCTION_KEY}")).await.status(), 401);
    assert_eq!(app.starts("admin_op").len(), 0);
    let rsp = r.http.get(r.url("/api/admin/op")).header("x-functions-key", MASTER_KEY).send().await.unwrap();
    assert_eq!(rsp.status(), 201);
    assert_eq!(rsp.headers()["x-echo"], "GET admin_op");
    assert_eq!(r.get(&format!("/api/admin/op?code={MASTER_KEY}")).await.status(), 201);
    assert_eq!(app.starts("admin_op").len(), 2);

    // Anonymous: no key needed; the identity is unauthenticated.
    let rsp = r.get("/api/open").await;
    assert_eq!(rsp.status(), 201);
    let open = app.starts("open");
    assert_eq!(open.len(), 1);
    assert_eq!(open[0]["envelope"]["Data"]["req"]["Identities"][0]["IsAuthenticated"], false);
    assert_eq!(app.starts("items").len(), 3);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn front_door_passes_request_bodies() {
    let app = AppRoot::new("bodies", json!({}));
    app.http_function("upload", Some("upload"), &["post"], "anonymous");
    let r = Running::start(&app, Topology::new("local")).await;

    // JSON: the text as Body; top-level fields merged into Metadata (scalars encoded, objects as
    // objects, arrays and nulls skipped).
    let text = r#"{"name":"n1","qty":2,"flag":true,"nested":{"a":1},"list":[1,2],"nothing":null}"#;
    let rsp = r.http.post(r.url("/api/upload?tag=t")).header("content-type", "application/json").body(text).send().await.unwrap();
    assert_eq!(rsp.status(), 201);
    let starts = app.starts("upload");
    assert_eq!(starts.len(), 1);
    let env = &starts[0]["envelope"];
    assert_eq!(env["Data"]["req"]["Method"], "POST");
    assert_eq!(env["Data"]["req"]["Body"], text);
    let meta = &env["Metadata"];
    assert_eq!(meta["name"], "\"n1\"");
    assert_eq!(meta["qty"], "\"2\"");
    assert_eq!(meta["flag"], "\"true\"");
    assert_eq!(meta["nested"], json!({ "a": 1 }));
    assert!(meta.get("list").is_none() && meta.get("nothing").is_none(), "{meta}");
    assert_eq!(meta["tag"], "\"t\"");

    // Binary media type: Body is base64 of the exact bytes, nothing merged.
    let bytes: Vec<u8> = vec![0, 1, 2, 0xfe, 0xff, b'{', b'}'];
    let rsp =
        r.http.post(r.url("/api/upload")).header("content-type", "application/octet-stream").body(bytes.clone()).send().await.unwrap();
    assert_eq!(rsp.status(), 201);
    let starts = app.starts("upload");
    assert_eq!(starts.len(), 2);
    let env = &starts[1]["envelope"];
    assert_eq!(env["Data"]["req"]["Body"], base64::engine::general_purpose::STANDARD.encode(&bytes));
    let meta = env["Metadata"].as_object().unwrap();
    let mut keys: Vec<&str> = meta.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["Headers", "Query", "sys"], "nothing merged from a binary body");

    // No body: no Body member.
    let rsp = r.http.post(r.url("/api/upload")).send().await.unwrap();
    assert_eq!(rsp.status(), 201);
    let starts = app.starts("upload");
    assert_eq!(starts.len(), 3);
    assert!(starts[2]["envelope"]["Data"]["req"].get("Body").is_none(), "{}", starts[2]["envelope"]);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_failures_become_empty_500s() {
    let app = AppRoot::new("failures", json!({}));
    app.http_function("echo", Some("echo"), &[], "anonymous");
    let r = Running::start(&app, Topology::new("local")).await;
    let pid = r.pid().await;

    // 500 from the handler, a text/plain answer, a `null` answer, and a `res` that is no response
    // object: each reaches the handler, and the caller gets an empty 500.
    for (i, behave) in ["fail", "text", "null", "badres"].into_iter().enumerate() {
        let rsp = r.get(&format!("/api/echo?behave={behave}")).await;
        assert_eq!(rsp.status(), 500, "behave={behave}");
        assert!(rsp.headers().get("x-echo").is_none());
        assert_eq!(rsp.bytes().await.unwrap().len(), 0, "behave={behave}: the 500 has an empty body");
        let starts = app.starts("echo");
        assert_eq!(starts.len(), i + 1);
        assert_eq!(starts[i]["behave"], behave);
        assert_eq!(app.ends("echo").len(), i + 1, "the fake answered behave={behave}");
    }

    // A failed answer is not a crash: the same handler keeps serving.
    let rsp = r.get("/api/echo").await;
    assert_eq!(rsp.status(), 201);
    assert_eq!(r.host.worker.restarts(), 0);
    assert_eq!(r.pid().await, pid);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_params_are_percent_decoded_and_may_be_optional() {
    let app = AppRoot::new("routes", json!({}));
    app.http_function("runs", Some("runs/{id?}"), &["get"], "anonymous");
    let r = Running::start(&app, Topology::new("local")).await;

    let rsp = r.get("/api/runs").await;
    assert_eq!(rsp.status(), 201);
    let s = app.starts("runs");
    assert_eq!(s[0]["envelope"]["Data"]["req"]["Params"], json!({}));
    assert!(s[0]["envelope"]["Metadata"].get("id").is_none());

    let rsp = r.get("/api/runs/x%40y").await;
    assert_eq!(rsp.status(), 201);
    let body: Value = serde_json::from_str(&rsp.text().await.unwrap()).unwrap();
    assert_eq!(body["params"], json!({ "id": "x@y" }));
    let s = app.starts("runs");
    assert_eq!(s[1]["envelope"]["Data"]["req"]["Params"], json!({ "id": "x@y" }));
    assert_eq!(s[1]["envelope"]["Metadata"]["id"], "\"x@y\"");
    assert_eq!(s[1]["envelope"]["Data"]["req"]["Url"], r.url("/api/runs/x%40y"), "the Url is the one the caller used");

    // Literals match case-insensitively; `+` in a path stays a plus.
    assert_eq!(r.get("/api/RUNS/a+b").await.status(), 201);
    assert_eq!(app.starts("runs")[2]["envelope"]["Data"]["req"]["Params"], json!({ "id": "a+b" }));

    // One optional segment, not two.
    assert_eq!(r.get("/api/runs/a/b").await.status(), 404);
    assert_eq!(app.starts("runs").len(), 3);
    r.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Service Bus triggers

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_bus_trigger_envelope_and_settlement() {
    let app = AppRoot::new("bus-envelope", json!({}));
    // The queue name comes from a `%SETTING%` binding expression.
    app.settings(json!({ "BIN_QUEUE": "bin" }));
    app.bus_function("on_bin", json!({ "queueName": "%BIN_QUEUE%", "dataType": "binary" }));
    app.bus_function("on_str", json!({ "queueName": "str" }));
    let topology = topology_with_queues(vec![queue("bin", Duration::from_secs(5), 10), queue("str", Duration::from_secs(5), 10)]);
    let r = Running::start(&app, topology).await;
    let (bin, str_q) = (EntityPath::queue("bin"), EntityPath::queue("str"));

    // dataType binary: the exact bytes as base64.
    let bytes: Vec<u8> = vec![0xff, 0x00, b'h', b'i', 0xc3, 0x28, b'{', b'"'];
    // Names as the broker holds them, here as an AMQP sender gives them (REST senders' arrive
    // lower-cased): the host passes them through, case and all, as the Functions host does.
    let props = BTreeMap::from([
        ("tenant".to_string(), json!("acme")),
        ("attempt".to_string(), json!(3)),
        ("cloudEvents_type".to_string(), json!("dev.deploychain.push.v1")),
        ("Diagnostic-Id".to_string(), json!("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")),
    ]);
    let seqs = r
        .send(
            "bin",
            NewMessage {
                content_type: Some("application/octet-stream".into()),
                correlation_id: Some("c-9".into()),
                label: Some("lbl".into()),
                properties: props.clone(),
                ..message(bytes.clone(), "m-bin-1")
            },
        )
        .await;
    // A JSON body under dataType binary: still base64, and no body-field merge.
    let json_body = br#"{"orderId":42}"#.to_vec();
    r.send("bin", message(json_body.clone(), "m-bin-2")).await;
    wait_settled(&r, &bin, Duration::from_secs(8)).await;

    let starts = app.starts("on_bin");
    assert_eq!(starts.len(), 2, "each message invoked once");
    let first = of_message(&starts, "m-bin-1");
    assert_eq!(first.len(), 1);
    let env = &first[0]["envelope"];
    assert_eq!(env["Data"]["msg"], base64::engine::general_purpose::STANDARD.encode(&bytes));
    let meta = &env["Metadata"];
    assert_eq!(meta["DeliveryCount"], "1");
    assert_eq!(meta["MessageId"], "\"m-bin-1\"");
    assert_eq!(meta["SequenceNumber"], seqs[0].to_string());
    assert_eq!(
        meta["ApplicationProperties"],
        json!({
            "tenant": "acme",
            "attempt": 3,
            "cloudEvents_type": "dev.deploychain.push.v1",
            "Diagnostic-Id": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        })
    );
    assert_eq!(meta["UserProperties"], meta["ApplicationProperties"]);
    uuid::Uuid::parse_str(decoded(&meta["LockToken"]).as_str().unwrap()).expect("LockToken is an encoded GUID");
    assert_eq!(meta["ContentType"], "\"application/octet-stream\"");
    assert_eq!(meta["CorrelationId"], "\"c-9\"");
    assert_eq!(meta["Subject"], "\"lbl\"");
    assert_eq!(meta["Label"], "\"lbl\"");
    assert_eq!(meta["ExpiresAtUtc"], "9999-12-31T23:59:59");
    let enqueued = meta["EnqueuedTimeUtc"].as_str().unwrap();
    assert!(chrono::NaiveDateTime::parse_from_str(enqueued, "%Y-%m-%dT%H:%M:%S").is_ok(), "seconds precision, no zone: {enqueued}");
    assert_eq!(meta["sys"]["MethodName"], "on_bin");
    assert!(meta.get("SessionId").is_none(), "null values are omitted");
    for k in ["MessageReceiver", "MessageActions"] {
        assert_eq!(meta[k], json!({}));
    }
    let second = of_message(&starts, "m-bin-2");
    let env2 = &second[0]["envelope"];
    assert_eq!(env2["Data"]["msg"], base64::engine::general_purpose::STANDARD.encode(&json_body));
    assert!(env2["Metadata"].get("orderId").is_none(), "binary triggers get no body-field merge");
    assert!(r.broker.peek(&bin.dead_letter_queue(), 0, 10).await.unwrap().is_empty());

    // Default (string) dataType: the body JSON-encoded as a string, top-level fields in Metadata.
    let text = r#"{"orderId":42,"customer":{"id":"c1"},"tags":["a"]}"#;
    r.send("str", message(text, "m-str-1")).await;
    r.send("str", message("hello world", "m-str-2")).await;
    wait_settled(&r, &str_q, Duration::from_secs(8)).await;
    let starts = app.starts("on_str");
    assert_eq!(starts.len(), 2);
    let env = &of_message(&starts, "m-str-1")[0]["envelope"];
    assert_eq!(env["Data"]["msg"], Value::String(text.into()).to_string());
    let meta = &env["Metadata"];
    assert_eq!(meta["orderId"], "\"42\"");
    assert_eq!(meta["customer"], json!({ "id": "c1" }));
    assert!(meta.get("tags").is_none(), "arrays are not merged");
    assert_eq!(meta["MessageId"], "\"m-str-1\"");
    assert_eq!(meta["ApplicationProperties"], json!({}));
    assert_eq!(meta["sys"]["MethodName"], "on_str");
    let plain = &of_message(&starts, "m-str-2")[0]["envelope"];
    assert_eq!(plain["Data"]["msg"], "\"hello world\"");
    assert!(plain["Metadata"].get("hello").is_none());
    assert!(r.broker.peek(&str_q.dead_letter_queue(), 0, 10).await.unwrap().is_empty());
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_abandoned_and_dead_lettered_after_max_delivery_count() {
    let app = AppRoot::new("bus-dlq", json!({}));
    app.bus_function("on_work", json!({ "queueName": "work" }));
    let r = Running::start(&app, topology_with_queues(vec![queue("work", Duration::from_secs(1), 3)])).await;
    let work = EntityPath::queue("work");

    r.send("work", message(r#"{"behave":"fail"}"#, "m-fail")).await;
    eventually("the message to be dead-lettered", Duration::from_secs(8), || async {
        (r.counts(&work).await.dead_lettered == 1).then_some(())
    })
    .await;

    let dead = r.broker.peek(&work.dead_letter_queue(), 0, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].message_id, "m-fail");
    assert_eq!(dead[0].dead_letter_reason(), Some("MaxDeliveryCountExceeded"));
    assert_eq!(dead[0].delivery_count, 3);
    // Nothing more is delivered.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let starts = app.starts("on_work");
    assert_eq!(delivery_counts(&starts), ["1", "2", "3"], "invoked exactly MaxDeliveryCount times");
    assert!(starts.iter().all(|s| s["envelope"]["Metadata"]["MessageId"] == "\"m-fail\""));
    assert_eq!(app.ends("on_work").iter().filter(|e| e["status"] == 500).count(), 3);
    let c = r.counts(&work).await;
    assert_eq!((c.active, c.locked, c.dead_lettered), (0, 0, 1));
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_are_renewed_while_an_invocation_runs() {
    let app = AppRoot::new("bus-renew", json!({}));
    app.bus_function("on_work", json!({ "queueName": "work" }));
    // LockDuration 1 s; the invocation takes 3 s.
    let r = Running::start(&app, topology_with_queues(vec![queue("work", Duration::from_secs(1), 10)])).await;
    let work = EntityPath::queue("work");

    r.send("work", message(r#"{"behave":"slow:3"}"#, "m-slow")).await;
    wait_settled(&r, &work, Duration::from_secs(9)).await;

    let intervals = app.intervals("on_work");
    assert_eq!(app.starts("on_work").len(), 1, "never redelivered while running: {:?}", app.starts("on_work"));
    assert_eq!(intervals.len(), 1);
    let (start, end, s) = &intervals[0];
    assert!(end - start >= 2.9, "the invocation ran {} s", end - start);
    assert_eq!(s["envelope"]["Metadata"]["DeliveryCount"], "1");
    assert!(r.broker.peek(&work.dead_letter_queue(), 0, 10).await.unwrap().is_empty());
    r.stop().await;
}

/// An app whose `on_work` (queue `work`, LockDuration 1 min, MaxDeliveryCount 5) and `ping` run
/// under functionTimeout 2 s.
async fn timeout_app(test: &str) -> (AppRoot, Running) {
    let app = AppRoot::new(test, json!({ "functionTimeout": "00:00:02" }));
    app.bus_function("on_work", json!({ "queueName": "work" }));
    app.http_function("ping", Some("ping"), &[], "anonymous");
    // A long LockDuration: a redelivery within the test can only come from an abandon.
    let r = Running::start(&app, topology_with_queues(vec![queue("work", Duration::from_secs(60), 5)])).await;
    (app, r)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn function_timeout_kills_and_restarts_the_handler() {
    let (app, r) = timeout_app("timeout").await;
    let work = EntityPath::queue("work");
    let first_pid = r.pid().await;

    // The first delivery outlives functionTimeout; later ones succeed.
    r.send("work", message(r#"{"behave":["slow:10","ok"]}"#, "m-timeout")).await;
    wait_settled(&r, &work, Duration::from_secs(9)).await;

    let starts = app.starts("on_work");
    assert!(starts.len() >= 2, "{starts:?}");
    let (first, last) = (&starts[0], &starts[starts.len() - 1]);
    assert_eq!(first["envelope"]["Metadata"]["DeliveryCount"], "1");
    assert_eq!(first["pid"], first_pid);
    let ended = app.ends("on_work");
    assert!(ended.iter().all(|e| e["id"] != first["id"]), "the timed-out invocation never finished: its handler was killed");
    // Failed at functionTimeout (not after the 10 s the handler wanted), abandoned, redelivered.
    let gap = last["t"].as_f64().unwrap() - first["t"].as_f64().unwrap();
    assert!((1.8..8.0).contains(&gap), "redelivered {gap} s after the first delivery started");
    let last_count: u32 = last["envelope"]["Metadata"]["DeliveryCount"].as_str().unwrap().parse().unwrap();
    assert!(last_count >= 2);
    assert!(ended.iter().any(|e| e["id"] == last["id"] && e["status"] == 200), "the redelivery succeeded");

    // A new handler process runs it, and keeps serving.
    assert!(r.host.worker.restarts() >= 1);
    let new_pid = r.pid().await;
    assert_ne!(new_pid, first_pid);
    assert_eq!(last["pid"], new_pid);
    let rsp = r.get("/api/ping").await;
    assert_eq!(rsp.status(), 201);
    assert_eq!(app.starts("ping")[0]["pid"], new_pid);
    assert!(r.broker.peek(&work.dead_letter_queue(), 0, 10).await.unwrap().is_empty());
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn a_timed_out_message_is_redelivered_to_the_restarted_handler() {
    let (app, r) = timeout_app("timeout-redelivery").await;
    let work = EntityPath::queue("work");
    let first_pid = r.pid().await;

    r.send("work", message(r#"{"behave":["slow:10","ok"]}"#, "m-timeout")).await;
    wait_settled(&r, &work, Duration::from_secs(9)).await;

    // Exactly one failed delivery (the timeout); the redelivery, DeliveryCount 2, reaches the new handler.
    let starts = app.starts("on_work");
    assert_eq!(delivery_counts(&starts), ["1", "2"], "a delivery failed without reaching a handler");
    assert_eq!(starts[0]["pid"], first_pid);
    assert_eq!(starts[1]["pid"], r.pid().await);
    assert_ne!(starts[1]["pid"], first_pid);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_exits_is_restarted() {
    let app = AppRoot::new("exit", json!({}));
    app.http_function("echo", Some("echo"), &[], "anonymous");
    let r = Running::start(&app, Topology::new("local")).await;
    let first_pid = r.pid().await;

    let rsp = r.get("/api/echo?behave=exit").await;
    assert_eq!(rsp.status(), 500, "the handler died mid-request");
    assert_eq!(rsp.bytes().await.unwrap().len(), 0);
    let exits: Vec<Value> = app.events().into_iter().filter(|e| e["event"] == "exit").collect();
    assert_eq!(exits.len(), 1);
    assert_eq!(exits[0]["pid"], first_pid);

    let new_pid = eventually("a new handler process", Duration::from_secs(8), || async {
        r.host.worker.live(Duration::from_millis(100)).await.map(|l| l.pid).filter(|p| *p != first_pid)
    })
    .await;
    assert!(r.host.worker.restarts() >= 1);
    assert!(app.events().iter().any(|e| e["event"] == "ready" && e["pid"] == new_pid), "the new handler's readiness was awaited");

    let rsp = r.get("/api/echo").await;
    assert_eq!(rsp.status(), 201);
    let starts = app.starts("echo");
    assert_eq!(starts.len(), 2);
    assert_eq!(starts[1]["pid"], new_pid);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_concurrent_calls_is_honoured() {
    let app = AppRoot::new("concurrency", json!({ "extensions": { "serviceBus": { "maxConcurrentCalls": 2 } } }));
    app.bus_function("on_work", json!({ "queueName": "work" }));
    let r = Running::start(&app, topology_with_queues(vec![queue("work", Duration::from_secs(30), 10)])).await;
    let work = EntityPath::queue("work");

    let batch: Vec<NewMessage> = (0..6).map(|i| message(format!(r#"{{"behave":"slow:1","n":{i}}}"#), &format!("m-{i}"))).collect();
    r.broker.send_batch("work", batch).await.unwrap();
    wait_settled(&r, &work, Duration::from_secs(9)).await;

    let intervals = app.intervals("on_work");
    assert_eq!(app.starts("on_work").len(), 6);
    assert_eq!(intervals.len(), 6, "all six completed");
    assert_eq!(delivery_counts(&app.starts("on_work")), ["1"; 6]);
    assert_eq!(max_overlap(&intervals), 2, "at most maxConcurrentCalls at once (and that many were used)");
    r.stop().await;
}

/// A topic with one session-enabled subscription `ordered` that takes the messages labelled `work`.
fn session_topology(lock: Duration) -> Topology {
    let sub = Subscription { requires_session: true, lock_duration: lock, ..Subscription::new("ordered") }
        .with_rule(Rule::correlation("work-only", CorrelationFilter::label("work")));
    let mut t = Topology::new("local");
    t.add_topic(Topic { subscriptions: vec![sub], ..Topic::new("events") }).unwrap();
    t
}

fn session_message(session: &str, id: &str, behave: &str) -> NewMessage {
    NewMessage {
        session_id: Some(session.into()),
        label: Some("work".into()),
        ..message(json!({ "behave": behave, "id": id }).to_string(), id)
    }
}

/// The message id (`id` body field) of an invocation on the session trigger.
fn body_id(start: &Value) -> String {
    let text = decoded(&start["envelope"]["Data"]["msg"]);
    let body: Value = serde_json::from_str(text.as_str().unwrap()).unwrap();
    body["id"].as_str().unwrap().to_string()
}

/// Per session: the invocations in start order, each with (message id, start, end).
fn by_session(intervals: &[(f64, f64, Value)]) -> BTreeMap<String, Vec<(String, f64, f64)>> {
    let mut sessions: BTreeMap<String, Vec<(String, f64, f64)>> = BTreeMap::new();
    for (start, end, s) in intervals {
        let session = decoded(&s["envelope"]["Metadata"]["SessionId"]).as_str().unwrap().to_string();
        sessions.entry(session).or_default().push((body_id(s), *start, *end));
    }
    for v in sessions.values_mut() {
        v.sort_by(|a, b| a.1.total_cmp(&b.1));
    }
    sessions
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_processed_one_message_at_a_time_in_order() {
    let app = AppRoot::new("sessions", json!({}));
    app.bus_function("on_ordered", json!({ "topicName": "events", "subscriptionName": "ordered", "isSessionsEnabled": true }));
    let r = Running::start(&app, session_topology(Duration::from_secs(5))).await;
    let ordered = EntityPath::subscription("events", "ordered");

    for (session, id) in [("A", "A1"), ("B", "B1"), ("A", "A2"), ("B", "B2"), ("A", "A3")] {
        r.send("events", session_message(session, id, "slow:0.3")).await;
    }
    // Filtered out by the subscription's rule: never delivered.
    let skipped = NewMessage { session_id: Some("A".into()), label: Some("other".into()), ..message("{}", "skipped") };
    assert_eq!(r.send("events", skipped).await, Vec::<i64>::new());
    wait_settled(&r, &ordered, Duration::from_secs(9)).await;

    let intervals = app.intervals("on_ordered");
    assert_eq!(app.starts("on_ordered").len(), 5, "each message invoked once: {:?}", app.starts("on_ordered"));
    assert_eq!(intervals.len(), 5);
    assert_eq!(delivery_counts(&app.starts("on_ordered")), ["1"; 5]);
    let sessions = by_session(&intervals);
    let ids = |s: &str| sessions[s].iter().map(|(id, _, _)| id.clone()).collect::<Vec<_>>();
    assert_eq!(ids("A"), ["A1", "A2", "A3"]);
    assert_eq!(ids("B"), ["B1", "B2"]);
    for (session, runs) in &sessions {
        for pair in runs.windows(2) {
            assert!(pair[0].2 <= pair[1].1, "session {session}: {} started before {} ended", pair[1].0, pair[0].0);
        }
    }
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn a_session_stays_locked_while_its_messages_are_processed() {
    let app = AppRoot::new("session-lock", json!({}));
    app.bus_function("on_ordered", json!({ "topicName": "events", "subscriptionName": "ordered", "isSessionsEnabled": true }));
    // LockDuration 1 s; the session's four messages take 0.4 s each, 1.6 s in all.
    let r = Running::start(&app, session_topology(Duration::from_secs(1))).await;
    let ordered = EntityPath::subscription("events", "ordered");

    let batch: Vec<NewMessage> = (1..=4).map(|i| session_message("A", &format!("A{i}"), "slow:0.4")).collect();
    r.broker.send_batch("events", batch).await.unwrap();
    wait_settled(&r, &ordered, Duration::from_secs(9)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let starts = app.starts("on_ordered");
    let ids: Vec<String> = starts.iter().map(body_id).collect();
    assert_eq!(ids, ["A1", "A2", "A3", "A4"], "each message once, in order (delivery counts {:?})", delivery_counts(&starts));
    assert_eq!(delivery_counts(&starts), ["1"; 4]);
    let sessions = by_session(&app.intervals("on_ordered"));
    for pair in sessions["A"].windows(2) {
        assert!(pair[0].2 <= pair[1].1, "{} started before {} ended", pair[1].0, pair[0].0);
    }
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_bus_output_bindings_send_what_the_host_would_and_strict_mode_refuses_the_base64_trap() {
    let app = AppRoot::new("outputs", json!({}));
    app.function(
        "emit",
        json!({ "bindings": [
            { "type": "httpTrigger", "direction": "in", "name": "req", "authLevel": "anonymous", "route": "emit", "methods": ["post"] },
            { "type": "http", "direction": "out", "name": "res" },
            { "type": "serviceBus", "direction": "out", "name": "out", "queueName": "%OUT_QUEUE%", "connection": "ServiceBusConnection" }
        ] }),
    );
    app.settings(json!({ "OUT_QUEUE": "outq" }));
    let r = Running::start(&app, topology_with_queues(vec![queue("outq", Duration::from_secs(30), 10)])).await;
    let outq: EntityPath = "outq".parse().unwrap();
    let post = |outputs: Value| {
        let body = json!({ "behave": "answer", "outputs": outputs }).to_string();
        r.http.post(r.url("/api/emit")).header("content-type", "application/json").body(body).send()
    };

    // The recommended encoding: an array of strings, one message each, byte-exact, text/plain.
    let rsp = post(json!({ "res": { "statusCode": 202, "body": "queued" }, "out": ["{\"orderId\":42}", "second"] })).await.unwrap();
    assert_eq!(rsp.status(), 202);
    let sent = r.broker.peek(&outq, 0, 10).await.unwrap();
    let bodies: Vec<String> = sent.iter().map(|m| String::from_utf8(m.body.clone()).unwrap()).collect();
    assert_eq!(bodies, ["{\"orderId\":42}", "second"]);
    assert!(sent.iter().all(|m| m.content_type.as_deref() == Some("text/plain")));

    // A JSON object is re-serialized indented, as the host does.
    let rsp = post(json!({ "res": { "statusCode": 200, "body": "ok" }, "out": { "a": 1 } })).await.unwrap();
    assert_eq!(rsp.status(), 200);
    let sent = r.broker.peek(&outq, 0, 10).await.unwrap();
    assert_eq!(String::from_utf8(sent[2].body.clone()).unwrap(), "{\n  \"a\": 1\n}");

    // The base64 trap ("test" decodes as base64; the host would send `System.Byte[]`): in strict
    // mode the invocation fails, the caller gets the host's empty 500, and nothing is sent.
    let rsp = post(json!({ "res": { "statusCode": 200, "body": "ok" }, "out": "test" })).await.unwrap();
    assert_eq!(rsp.status(), 500);
    assert_eq!(r.counts(&outq).await.active, 3, "nothing more was sent");
    r.stop().await;

    // Without strict mode the host's real behaviour: the literal text `System.Byte[]`.
    let app = AppRoot::new("outputs-lax", json!({}));
    app.function(
        "emit",
        json!({ "bindings": [
            { "type": "httpTrigger", "direction": "in", "name": "req", "authLevel": "anonymous", "route": "emit", "methods": ["post"] },
            { "type": "http", "direction": "out", "name": "res" },
            { "type": "serviceBus", "direction": "out", "name": "out", "queueName": "outq", "connection": "ServiceBusConnection" }
        ] }),
    );
    let settings = json!({ "IsEncrypted": false, "Host": { "StrictOutputs": false },
        "Values": { "FUNCTIONS_WORKER_RUNTIME": "custom", "FAKE_RECORD": app.record.display().to_string() } });
    write_json(&app.root.join("local.settings.json"), &settings);
    let r = Running::start(&app, topology_with_queues(vec![queue("outq", Duration::from_secs(30), 10)])).await;
    let body = json!({ "behave": "answer", "outputs": { "res": { "statusCode": 200, "body": "ok" }, "out": "test" } }).to_string();
    let rsp = r.http.post(r.url("/api/emit")).header("content-type", "application/json").body(body).send().await.unwrap();
    assert_eq!(rsp.status(), 200);
    let sent = r.broker.peek(&outq, 0, 10).await.unwrap();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].body, b"System.Byte[]");
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_keeps_crashing_pauses_the_host_as_azure_restarts_the_app() {
    use deploychain::host::worker::{APP_RESTART_PAUSE, ERROR_THRESHOLD};
    let app = AppRoot::new("crash-loop", json!({}));
    app.http_function("echo", Some("echo"), &[], "anonymous");
    let r = Running::start(&app, Topology::new("local")).await;
    for i in 1..=ERROR_THRESHOLD {
        let pid = r.pid().await;
        let rsp = r.get("/api/echo?behave=exit").await;
        assert_eq!(rsp.status(), 500, "crash {i}");
        eventually("a restarted handler", Duration::from_secs(15), || async {
            r.host.worker.live(Duration::from_millis(10)).await.filter(|l| l.pid != pid).map(|_| ())
        })
        .await;
    }
    let exits: Vec<f64> = app.events().iter().filter(|e| e["event"] == "exit").map(|e| e["t"].as_f64().unwrap()).collect();
    let listening: Vec<f64> = app.events().iter().filter(|e| e["event"] == "listening").map(|e| e["t"].as_f64().unwrap()).collect();
    assert_eq!(exits.len(), ERROR_THRESHOLD);
    assert_eq!(listening.len(), ERROR_THRESHOLD + 1);
    // The first restarts are immediate; the one after the threshold waits as an app restart does.
    assert!(listening[1] - exits[0] < 2.0, "{listening:?} {exits:?}");
    let paused = listening[ERROR_THRESHOLD] - exits[ERROR_THRESHOLD - 1];
    assert!(paused >= APP_RESTART_PAUSE.as_secs_f64() - 0.2, "paused only {paused:.2}s");
    assert_eq!(r.get("/api/echo").await.status(), 201, "serving again");
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setting_references_in_the_handler_arguments_are_expanded_and_unset_ones_dropped() {
    let app =
        AppRoot::new("args", json!({ "customHandler": { "description": { "arguments": ["%FAKE_SCRIPT%", "%FAKE_NOT_SET_ANYWHERE%"] } } }));
    app.settings(json!({ "FAKE_SCRIPT": "handler.py" }));
    app.http_function("hello", None, &[], "anonymous");
    let r = Running::start(&app, Topology::new("local")).await;
    assert_eq!(r.get("/api/hello").await.status(), 201, "python3 %FAKE_SCRIPT% ran handler.py");
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timer_triggers_fire_on_their_ncrontab_schedule_with_the_hosts_payload() {
    let app = AppRoot::new("timer", json!({}));
    app.function(
        "tick",
        json!({ "bindings": [{ "type": "timerTrigger", "direction": "in", "name": "myTimer", "schedule": "%TICK_SCHEDULE%", "runOnStartup": true }] }),
    );
    app.settings(json!({ "TICK_SCHEDULE": "*/1 * * * * *" }));
    let r = Running::start(&app, Topology::new("local")).await;
    let starts = eventually("three ticks", Duration::from_secs(10), || async {
        let s = app.starts("tick");
        (s.len() >= 3).then_some(s)
    })
    .await;
    let first = &starts[0]["envelope"];
    let tick = &first["Data"]["myTimer"];
    assert_eq!(tick["Schedule"]["AdjustForDST"], true, "{first}");
    assert!(tick["IsPastDue"].is_boolean());
    assert!(tick["ScheduleStatus"]["Next"].is_string(), "useMonitor defaults to true: {tick}");
    assert_eq!(first["Metadata"]["sys"]["MethodName"], "tick");
    // After the start-up run, one tick a second.
    let times: Vec<f64> = starts.iter().map(|s| s["t"].as_f64().unwrap()).collect();
    assert!(times[2] - times[1] > 0.5 && times[2] - times[1] < 1.8, "{times:?}");
    assert!(starts[2]["envelope"]["Data"]["myTimer"]["ScheduleStatus"]["Last"].is_string());
    r.stop().await;

    // A schedule that is not NCRONTAB stops the host at load, naming it.
    let bad = AppRoot::new("timer-bad", json!({}));
    bad.function("tick", json!({ "bindings": [{ "type": "timerTrigger", "direction": "in", "name": "t", "schedule": "every minute" }] }));
    let e = FunctionApp::load(&bad.root).err().map(|e| format!("{e:#}")).unwrap_or_default();
    assert!(e.contains("every minute") && e.contains("NCRONTAB"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_without_content_length_is_dropped_as_the_host_does() {
    let app = AppRoot::new("chunked", json!({}));
    app.http_function("upload", Some("upload"), &["post"], "anonymous");
    let r = Running::start(&app, Topology::new("local")).await;
    // A raw HTTP/1.1 request with `Transfer-Encoding: chunked` and no Content-Length.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = r.base.trim_start_matches("http://").to_string();
    let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let req = format!(
        "POST /api/upload HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\n{{\"a\":\r\n2\r\n1}}\r\n0\r\n\r\n"
    );
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
    let starts = app.starts("upload");
    assert!(starts[0]["envelope"]["Data"]["req"].get("Body").is_none(), "{}", starts[0]["envelope"]);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_front_door_refuses_what_the_hosts_web_server_refuses_and_invokes_nothing() {
    let app = AppRoot::new("limits", json!({}));
    app.http_function("upload", Some("upload"), &["post"], "anonymous");
    let r = Running::start(&app, Topology::new("local")).await;
    let post = || r.http.post(r.url("/api/upload")).header("content-type", "application/json");
    // A URL over 4 KiB.
    let long = format!("/api/upload?x={}", "a".repeat(5000));
    assert_eq!(r.http.post(r.url(&long)).body("{}").send().await.unwrap().status(), 414);
    // Over 100 headers, or over 32 KiB of them.
    let mut many = post();
    for i in 0..101 {
        many = many.header(format!("x-h{i}"), "v");
    }
    assert_eq!(many.body("{}").send().await.unwrap().status(), 431);
    assert_eq!(post().header("x-big", "v".repeat(40 * 1024)).body("{}").send().await.unwrap().status(), 431);
    // A slow body: a byte a second against the 240 bytes a second the host requires after 5 s.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = r.base.trim_start_matches("http://").to_string();
    let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /api/upload HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\nConnection: close\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let started = std::time::Instant::now();
    let mut answer = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        tokio::select! {
            n = tcp.read(&mut buf) => {
                let n = n.unwrap_or(0);
                answer.extend_from_slice(&buf[..n]);
                if n == 0 || answer.windows(4).any(|w| w == b"\r\n\r\n") { break; }
            }
            _ = tokio::time::sleep(Duration::from_secs(1)) => {
                assert!(started.elapsed() < Duration::from_secs(20), "the slow body was never cut off");
                let _ = tcp.write_all(b" ").await;
            }
        }
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(started.elapsed() >= Duration::from_secs(5), "the grace is 5 s");
    // None of it reached the handler; a normal request still does.
    assert!(app.starts("upload").is_empty(), "{:?}", app.starts("upload"));
    assert_eq!(post().body("{}").send().await.unwrap().status(), 201);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_whose_headers_never_end_is_cut_off_after_the_headers_timeout_and_invokes_nothing() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = AppRoot::new("slowloris", json!({}));
    app.http_function("upload", Some("upload"), &["post"], "anonymous");
    let r = Running::start(&app, Topology::new("local")).await;
    let addr = r.base.trim_start_matches("http://").to_string();
    let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    tcp.write_all(format!("POST /api/upload HTTP/1.1\r\nHost: {addr}\r\n").as_bytes()).await.unwrap();
    // A header line every two seconds, never the blank line that ends them.
    let started = std::time::Instant::now();
    let mut buf = [0u8; 256];
    let mut i = 0;
    let closed = loop {
        tokio::select! {
            n = tcp.read(&mut buf) => break n.unwrap_or(0),
            _ = tokio::time::sleep(Duration::from_secs(2)) => {
                assert!(started.elapsed() < Duration::from_secs(60), "the slow headers were never cut off");
                i += 1;
                if tcp.write_all(format!("X-Slow-{i}: a\r\n").as_bytes()).await.is_err() {
                    break 0;
                }
            }
        }
    };
    assert_eq!(closed, 0, "the connection is closed, not answered: {:?}", String::from_utf8_lossy(&buf));
    let took = started.elapsed();
    assert!(took >= Duration::from_secs(29) && took < Duration::from_secs(40), "cut off after {took:?}, not the 30 s headers timeout");
    assert!(app.starts("upload").is_empty(), "{:?}", app.starts("upload"));
    // The front door still serves everyone else.
    let ok = r.http.post(r.url("/api/upload")).header("content-type", "application/json").body("{}").send().await.unwrap();
    assert_eq!(ok.status(), 201);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_concurrent_sessions_bounds_how_many_sessions_run_at_once() {
    // One session at a time: sessions A and B never overlap, though nothing orders them.
    let app = AppRoot::new("max-sessions", json!({ "extensions": { "serviceBus": { "maxConcurrentSessions": 1 } } }));
    app.bus_function("on_ordered", json!({ "topicName": "events", "subscriptionName": "ordered", "isSessionsEnabled": true }));
    let r = Running::start(&app, session_topology(Duration::from_secs(5))).await;
    let ordered = EntityPath::subscription("events", "ordered");
    for (session, id) in [("A", "A1"), ("B", "B1"), ("A", "A2"), ("B", "B2")] {
        r.send("events", session_message(session, id, "slow:0.3")).await;
    }
    wait_settled(&r, &ordered, Duration::from_secs(9)).await;
    let intervals = app.intervals("on_ordered");
    assert_eq!(intervals.len(), 4);
    assert_eq!(max_overlap(&intervals), 1, "one session at a time: {intervals:?}");
    r.stop().await;

    // Two at a time: the two sessions do run side by side (the bound above is what held them).
    let app = AppRoot::new("max-sessions-2", json!({ "extensions": { "serviceBus": { "maxConcurrentSessions": 2 } } }));
    app.bus_function("on_ordered", json!({ "topicName": "events", "subscriptionName": "ordered", "isSessionsEnabled": true }));
    let r = Running::start(&app, session_topology(Duration::from_secs(5))).await;
    for (session, id) in [("A", "A1"), ("B", "B1"), ("A", "A2"), ("B", "B2")] {
        r.send("events", session_message(session, id, "slow:0.4")).await;
    }
    wait_settled(&r, &ordered, Duration::from_secs(9)).await;
    assert_eq!(max_overlap(&app.intervals("on_ordered")), 2);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_auto_complete_a_successful_invocation_leaves_the_message_to_its_lock() {
    let app = AppRoot::new("no-autocomplete", json!({}));
    app.bus_function("on_work", json!({ "queueName": "work", "autoCompleteMessages": false }));
    let r = Running::start(&app, topology_with_queues(vec![queue("work", Duration::from_secs(1), 10)])).await;
    let work: EntityPath = "work".parse().unwrap();
    r.send("work", message("{}", "m-1")).await;
    // Succeeds, is not completed (a custom handler cannot settle it), comes back after the lock.
    let starts = eventually("a redelivery", Duration::from_secs(8), || async {
        let s = app.starts("on_work");
        (s.len() >= 2).then_some(s)
    })
    .await;
    assert_eq!(delivery_counts(&starts[..2]), ["1", "2"]);
    assert_eq!(app.ends("on_work")[0]["status"], 200, "the first invocation succeeded");
    let c = r.counts(&work).await;
    assert_eq!(c.active + c.locked, 1, "still in the queue: {c:?}");
    r.stop().await;
}

// ---------------------------------------------------------------------------------------------
// host.json overrides from app settings, and Service Bus locks under Azure's limits

/// The counts of `function` since the host started.
fn counts_of(r: &Running, function: &str) -> deploychain::host::worker::InvocationCounts {
    r.host.invocations().get(function).copied().unwrap_or_default()
}

/// A message whose `behave` (the fake's behaviour per delivery) is `behave`.
fn behaving(id: &str, behave: Value) -> NewMessage {
    message(json!({ "behave": behave }).to_string(), id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_settings_override_host_json_values_whatever_the_case_of_their_names() {
    let app = AppRoot::new(
        "overrides",
        json!({ "functionTimeout": "00:10:00", "extensions": { "serviceBus": { "maxConcurrentCalls": 32, "autoCompleteMessages": true } } }),
    );
    app.bus_function("on_work", json!({ "queueName": "work" }));
    app.settings(json!({
        "AzureFunctionsJobHost__functionTimeout": "00:00:03",
        "azurefunctionsjobhost__EXTENSIONS__serviceBus__maxAutoLockRenewalDuration": "00:00:07",
        "AzureFunctionsJobHost__extensions__servicebus__maxConcurrentCalls": "4",
        "AzureFunctionsJobHost__extensions__serviceBus__autoCompleteMessages": "False",
        "AzureFunctionsJobHost__extensions__http__routePrefix": "fn"
    }));
    let loaded = FunctionApp::load(&app.root).unwrap();
    let h = &loaded.host;
    assert_eq!(h.function_timeout, Duration::from_secs(3));
    assert_eq!(h.max_auto_lock_renewal, Duration::from_secs(7), "a value host.json does not have is added");
    assert_eq!(h.max_concurrent_calls, 4);
    assert!(!h.auto_complete);
    assert_eq!(h.route_prefix, "fn");
    // The settings still reach the handler as app settings (they are environment variables in Azure).
    assert_eq!(loaded.settings["AzureFunctionsJobHost__functionTimeout"], "00:00:03");
}

#[test]
fn a_bad_override_is_refused_at_load_naming_the_setting() {
    let app = AppRoot::new("bad-overrides", json!({ "functionTimeout": "00:10:00" }));
    app.bus_function("on_work", json!({ "queueName": "work" }));
    let refused = |values: Value| {
        app.settings(values);
        format!("{:#}", FunctionApp::load(&app.root).expect_err("refused"))
    };
    for (name, value, why) in [
        ("AzureFunctionsJobHost__functionTimeout", "ten minutes", "not a TimeSpan"),
        ("AzureFunctionsJobHost__functionTimeout", "00:00:60", "not a TimeSpan"),
        ("AzureFunctionsJobHost__functionTimeout", "00:00:00.5", "at least 00:00:01"),
        ("AzureFunctionsJobHost__extensions__serviceBus__maxAutoLockRenewalDuration", "-00:00:01", "negative"),
        ("AzureFunctionsJobHost__extensions__serviceBus__maxConcurrentCalls", "0", "below 1"),
        ("AzureFunctionsJobHost__extensions__serviceBus__maxConcurrentSessions", "many", "not a whole number"),
        ("AzureFunctionsJobHost__extensions__serviceBus__autoCompleteMessages", "yes", "neither true nor false"),
    ] {
        let e = refused(json!({ name: value }));
        assert!(e.contains(&format!("app setting {name}")) && e.contains(why), "{name} = {value}: {e}");
    }
    // host.json's own bad values are refused too, named by their place (they used to fall back
    // to the default silently).
    std::fs::write(
        app.root.join("host.json"),
        json!({ "version": "2.0", "customHandler": { "description": { "defaultExecutablePath": "python3" } },
                "extensions": { "serviceBus": { "maxAutoLockRenewalDuration": "soon" } } })
        .to_string(),
    )
    .unwrap();
    let e = refused(json!({}));
    assert!(e.contains("host.json extensions.serviceBus.maxAutoLockRenewalDuration") && e.contains("soon"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_timeout_from_an_app_setting_fails_every_in_flight_invocation_and_restarts_the_handler() {
    // host.json allows 10 minutes; the app setting (as in Azure) allows 2 s.
    let app = AppRoot::new("timeout-override", json!({ "functionTimeout": "00:10:00" }));
    app.bus_function("on_work", json!({ "queueName": "work" }));
    app.settings(json!({ "AzureFunctionsJobHost__functionTimeout": "00:00:02" }));
    // A long LockDuration: a redelivery within the test can only come from an abandon.
    let r = Running::start(&app, topology_with_queues(vec![queue("work", Duration::from_secs(60), 5)])).await;
    assert_eq!(r.host.app.host.function_timeout, Duration::from_secs(2));
    let work = EntityPath::queue("work");
    let first_pid = r.pid().await;

    // m-long outlives the timeout; m-short (4 s) would not, but runs on the same handler.
    r.send("work", behaving("m-long", json!(["slow:10", "ok"]))).await;
    eventually("m-long to start", Duration::from_secs(5), || async { (!app.starts("on_work").is_empty()).then_some(()) }).await;
    r.send("work", behaving("m-short", json!(["slow:4", "ok"]))).await;
    wait_settled(&r, &work, Duration::from_secs(9)).await;

    let starts = app.starts("on_work");
    let ends = app.ends("on_work");
    for id in ["m-long", "m-short"] {
        let runs = of_message(&starts, id);
        assert_eq!(delivery_counts(&runs), ["1", "2"], "{id}: failed once, then succeeded");
        assert_eq!(runs[0]["pid"], first_pid);
        assert!(ends.iter().all(|e| e["id"] != runs[0]["id"]), "{id}'s first invocation never finished: its handler was killed");
        assert_ne!(runs[1]["pid"], first_pid, "{id} was delivered again to the restarted handler");
    }
    // Both failed when the timeout struck (about 2 s after m-long started), not when they ended.
    let long_start = of_message(&starts, "m-long")[0]["t"].as_f64().unwrap();
    let short_again = of_message(&starts, "m-short")[1]["t"].as_f64().unwrap();
    assert!(short_again - long_start < 4.0, "m-short came back {} s after m-long started", short_again - long_start);
    assert_eq!(r.host.worker.restarts(), 1, "one restart for the one timeout");
    let c = counts_of(&r, "on_work");
    assert_eq!((c.failed, c.answered, c.abandoned, c.completed, c.lock_lost), (2, 2, 2, 2, 0), "{c:?}");
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_message_is_delivered_again_at_once_and_dead_lettered_at_max_delivery_count() {
    let app = AppRoot::new("abandon", json!({}));
    app.bus_function("on_work", json!({ "queueName": "work" }));
    // LockDuration 60 s: only the abandon can bring the message back within the test.
    let r = Running::start(&app, topology_with_queues(vec![queue("work", Duration::from_secs(60), 3)])).await;
    let work = EntityPath::queue("work");

    r.send("work", behaving("m-poison", json!("fail"))).await;
    eventually("the message to be dead-lettered", Duration::from_secs(6), || async {
        (r.counts(&work).await.dead_lettered == 1).then_some(())
    })
    .await;
    let starts = app.starts("on_work");
    assert_eq!(delivery_counts(&starts), ["1", "2", "3"], "delivered again after each abandon, MaxDeliveryCount times in all");
    let times: Vec<f64> = starts.iter().map(|s| s["t"].as_f64().unwrap()).collect();
    assert!(times.windows(2).all(|w| w[1] - w[0] < 2.0), "each redelivery came at once, not after the lock: {times:?}");
    let dead = r.broker.peek(&work.dead_letter_queue(), 0, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].dead_letter_reason(), Some("MaxDeliveryCountExceeded"));
    assert_eq!(dead[0].delivery_count, 3);
    let c = counts_of(&r, "on_work");
    assert_eq!((c.failed, c.abandoned, c.completed, c.lock_lost), (3, 3, 0, 0), "{c:?}");
    let left = r.counts(&work).await;
    assert_eq!((left.active, left.locked), (0, 0));
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_lock_is_renewed_only_up_to_max_auto_lock_renewal_duration_then_lost_while_the_invocation_runs() {
    let app = AppRoot::new("lock-lost", json!({}));
    app.bus_function("on_work", json!({ "queueName": "work" }));
    app.settings(json!({ "AzureFunctionsJobHost__extensions__serviceBus__maxAutoLockRenewalDuration": "00:00:01" }));
    // LockDuration 1 s, renewed for 1 s: the lock lapses within about 2 s; the first run takes 4 s.
    let r = Running::start(&app, topology_with_queues(vec![queue("work", Duration::from_secs(1), 10)])).await;
    let work = EntityPath::queue("work");

    r.send("work", behaving("m-slow", json!(["slow:4", "ok"]))).await;
    eventually("the first delivery to end and fail to complete", Duration::from_secs(9), || async {
        (counts_of(&r, "on_work").lock_lost == 1).then_some(())
    })
    .await;

    let runs = app.intervals("on_work");
    let starts = app.starts("on_work");
    assert_eq!(delivery_counts(&starts), ["1", "2"], "delivered again once the lock was lost");
    let first_end = runs.iter().find(|(_, _, s)| s["id"] == starts[0]["id"]).map(|(_, end, _)| *end).unwrap();
    let second_start = starts[1]["t"].as_f64().unwrap();
    assert!(second_start < first_end, "the second delivery began while the first still ran");
    assert!(second_start - starts[0]["t"].as_f64().unwrap() < 3.0, "the lock lapsed soon after maxAutoLockRenewalDuration");
    assert!(app.ends("on_work").iter().all(|e| e["status"] == 200), "both invocations succeeded");
    // The second completed it; the first could not (MessageLockLost, logged) and changed nothing.
    let c = counts_of(&r, "on_work");
    assert_eq!((c.answered, c.completed, c.abandoned, c.lock_lost), (2, 1, 0, 1), "{c:?}");
    wait_settled(&r, &work, Duration::from_secs(2)).await;
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoning_after_the_lock_is_lost_fails_and_changes_nothing() {
    let app = AppRoot::new("abandon-lost", json!({ "functionTimeout": "00:00:03" }));
    app.bus_function("on_work", json!({ "queueName": "work" }));
    app.settings(json!({ "AzureFunctionsJobHost__extensions__serviceBus__maxAutoLockRenewalDuration": "00:00:01" }));
    let r = Running::start(&app, topology_with_queues(vec![queue("work", Duration::from_secs(1), 10)])).await;
    let work = EntityPath::queue("work");

    // The first delivery loses its lock (~2 s), the second completes it, then the first times
    // out (3 s): its abandon finds no lock.
    r.send("work", behaving("m-1", json!(["slow:10", "ok"]))).await;
    eventually("the timed-out first delivery to be settled", Duration::from_secs(8), || async {
        (counts_of(&r, "on_work").lock_lost == 1).then_some(())
    })
    .await;
    assert_eq!(delivery_counts(&app.starts("on_work")), ["1", "2"]);
    let c = counts_of(&r, "on_work");
    assert_eq!((c.failed, c.answered, c.completed, c.abandoned, c.lock_lost), (1, 1, 1, 0, 1), "{c:?}");
    wait_settled(&r, &work, Duration::from_secs(2)).await;
    assert!(r.broker.peek(&work.dead_letter_queue(), 0, 10).await.unwrap().is_empty());
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_lock_lost_after_max_auto_lock_renewal_duration_lets_another_receiver_take_the_session() {
    let app = AppRoot::new("session-lock-lost", json!({}));
    app.bus_function("on_ordered", json!({ "topicName": "events", "subscriptionName": "ordered", "isSessionsEnabled": true }));
    app.settings(json!({ "AzureFunctionsJobHost__extensions__serviceBus__maxAutoLockRenewalDuration": "00:00:01" }));
    let r = Running::start(&app, session_topology(Duration::from_secs(1))).await;
    let ordered = EntityPath::subscription("events", "ordered");

    let a1 = NewMessage {
        session_id: Some("A".into()),
        label: Some("work".into()),
        ..message(json!({ "behave": ["slow:4", "ok"], "id": "A1" }).to_string(), "A1")
    };
    r.broker.send_batch("events", vec![a1, session_message("A", "A2", "ok")]).await.unwrap();
    eventually("the first delivery of A1 to end and fail to complete", Duration::from_secs(9), || async {
        (counts_of(&r, "on_ordered").lock_lost == 1).then_some(())
    })
    .await;
    wait_settled(&r, &ordered, Duration::from_secs(3)).await;

    let starts = app.starts("on_ordered");
    let ids: Vec<String> = starts.iter().map(body_id).collect();
    assert_eq!(ids, ["A1", "A1", "A2"], "A1 again (to the new holder of session A), then A2, in order");
    assert_eq!(delivery_counts(&starts[..2]), ["1", "2"]);
    // One worker takes a session's messages one at a time: A1's second delivery while its first
    // still ran means the session (with A1) went to another receiver once its lock lapsed.
    let first_end = app.ends("on_ordered").iter().find(|e| e["id"] == starts[0]["id"]).map(|e| e["t"].as_f64().unwrap()).unwrap();
    assert!(starts[1]["t"].as_f64().unwrap() < first_end, "A1 was delivered again while its first delivery ran");
    // The first holder could not complete A1 (SessionLockLost, logged); the new one completed A1 and A2.
    let c = counts_of(&r, "on_ordered");
    assert_eq!((c.answered, c.completed, c.abandoned, c.lock_lost), (3, 2, 0, 1), "{c:?}");
    r.stop().await;
}
