//! The `handler` executable as the Functions host starts it: it reads its app settings and policy,
//! fails fast naming every bad setting (never printing a secret), and otherwise answers readiness on
//! `GET /` and invocations on `FUNCTIONS_CUSTOMHANDLER_PORT`.
#![allow(clippy::unwrap_used)]

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn base_env(dir: &std::path::Path, port: u16) -> Vec<(&'static str, String)> {
    vec![
        ("FUNCTIONS_CUSTOMHANDLER_PORT", port.to_string()),
        ("FUNCTIONS_APP_ROOT_PATH", dir.display().to_string()),
        ("DEPLOYCHAIN_POLICY", std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policy.toml").display().to_string()),
        ("DEPLOYCHAIN_STORE", format!("sqlite:{}", dir.join("state.sqlite").display())),
        (
            "ServiceBusConnection",
            "Endpoint=sb://127.0.0.1:9;SharedAccessKeyName=Root;SharedAccessKey=bus-key-value;UseDevelopmentEmulator=true".into(),
        ),
        ("APPROVAL_SIGNING_KEY", "an-approval-signing-key-of-32-chars-or-more".into()),
        ("DEPLOYCHAIN_PUBLIC_URL", "http://127.0.0.1:7071".into()),
        ("DEPLOYCHAIN_ARM_CREDENTIAL", "static".into()),
        ("DEPLOYCHAIN_ARM_TOKEN", "arm-token-value".into()),
        ("DEPLOYCHAIN_NOTIFY_URL", "http://127.0.0.1:9/notify".into()),
        ("GITHUB_WEBHOOK_SECRET", "github-secret-value".into()),
        ("GITHUB_TOKEN", "github-token-value".into()),
    ]
}

fn tempdir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("deploychain-binary-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The handler with exactly `env` (stderr kept for the assertions).
fn spawn_handler(env: &[(&str, String)]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_handler"))
        .env_clear()
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn run_to_exit(env: &[(&str, String)]) -> (Option<i32>, String) {
    let mut child = spawn_handler(env);
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
            return (status.code(), err);
        }
        if start.elapsed() > Duration::from_secs(20) {
            child.kill().unwrap();
            panic!("the handler did not exit on bad configuration");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn bad_settings_stop_start_up_with_every_setting_named_and_no_secret_printed() {
    let dir = tempdir("bad");
    let mut env: Vec<_> = base_env(&dir, free_port()).into_iter().filter(|(k, _)| *k != "DEPLOYCHAIN_PUBLIC_URL").collect();
    env.retain(|(k, _)| *k != "APPROVAL_SIGNING_KEY");
    env.push(("APPROVAL_SIGNING_KEY", "too-short-secret".into()));
    env.push(("ServiceBusConnection", "SharedAccessKey=bus-key-value".into()));
    let (code, err) = run_to_exit(&env);
    assert_ne!(code, Some(0));
    for setting in ["DEPLOYCHAIN_PUBLIC_URL", "APPROVAL_SIGNING_KEY", "ServiceBusConnection"] {
        assert!(err.contains(setting), "{setting} not named in:\n{err}");
    }
    for secret in ["too-short-secret", "bus-key-value", "github-secret-value"] {
        assert!(!err.contains(secret), "secret printed:\n{err}");
    }
}

/// App Service passes the literal reference text when it cannot resolve a Key Vault reference (the
/// role assignment still propagating, a missing secret): the handler refuses to start rather than
/// sign approval links with `@Microsoft.KeyVault(…)` as the key.
#[test]
fn an_unresolved_key_vault_reference_or_an_empty_secret_stops_start_up_naming_the_setting() {
    let dir = tempdir("kvref");
    let reference = "@Microsoft.KeyVault(SecretUri=https://kv-dc-abc.vault.azure.net/secrets/approval-signing-key)";
    for (setting, value) in [
        ("APPROVAL_SIGNING_KEY", reference.to_string()),
        ("GITHUB_WEBHOOK_SECRET", reference.replace("approval-signing-key", "github-webhook-secret")),
        ("APPLICATIONINSIGHTS_CONNECTION_STRING", reference.replace("approval-signing-key", "appinsights-connection-string")),
        ("DEPLOYCHAIN_NOTIFY_URL", "@Microsoft.KeyVault(VaultName=kv-dc-abc;SecretName=notify-url)".to_string()),
        ("GITHUB_WEBHOOK_SECRET", String::new()),
        ("APPROVAL_SIGNING_KEY", " ".to_string()),
    ] {
        let port = free_port();
        let mut env = base_env(&dir, port);
        env.retain(|(k, _)| *k != setting);
        env.push((setting, value.clone()));
        let (code, err) = run_to_exit(&env);
        assert_ne!(code, Some(0), "{setting}={value:?} started");
        assert!(err.contains(&format!("{setting}: ")), "{setting} not named in:\n{err}");
        assert!(!err.contains("kv-dc-abc") && !err.contains("vault.azure.net"), "the reference is printed:\n{err}");
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err(), "nothing listens");
    }
}

#[test]
fn a_policy_whose_builds_cannot_be_started_stops_start_up_naming_the_settings() {
    let dir = tempdir("ci");
    let mut env = base_env(&dir, free_port());
    env.retain(|(k, _)| *k != "GITHUB_TOKEN");
    let (code, err) = run_to_exit(&env);
    assert_ne!(code, Some(0));
    assert!(err.contains("GITHUB_TOKEN") && err.contains("app `web`") && err.contains("GitHub Actions"), "{err}");
    env.push(("GITHUB_APP_ID", "12345".into()));
    let (code, err) = run_to_exit(&env);
    assert_ne!(code, Some(0));
    assert!(err.contains("a GitHub App needs all three"), "{err}");
    env.push(("GITHUB_APP_PRIVATE_KEY", "not-a-pem-private-key-value".into()));
    env.push(("GITHUB_APP_INSTALLATION_ID", "678".into()));
    let (code, err) = run_to_exit(&env);
    assert_ne!(code, Some(0));
    assert!(err.contains("GITHUB_APP_PRIVATE_KEY: not a PEM private key"), "{err}");
    assert!(!err.contains("not-a-pem-private-key-value"), "the key is not printed: {err}");
}

#[test]
fn an_invalid_policy_stops_start_up_naming_the_key() {
    let dir = tempdir("policy");
    let text = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policy.toml")).unwrap();
    let bad = dir.join("policy.toml");
    std::fs::write(&bad, text.replace("quorum = 1", "quorum = 5")).unwrap();
    let mut env = base_env(&dir, free_port());
    env.retain(|(k, _)| *k != "DEPLOYCHAIN_POLICY");
    env.push(("DEPLOYCHAIN_POLICY", bad.display().to_string()));
    let (code, err) = run_to_exit(&env);
    assert_ne!(code, Some(0));
    assert!(err.contains("app[0].stage[1].approval.quorum"), "{err}");
}

#[test]
fn the_handler_answers_readiness_and_invocations_on_its_port() {
    let dir = tempdir("ok");
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_handler"))
        .env_clear()
        .envs(base_env(&dir, port).iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let result = rt.block_on(async {
        let start = Instant::now();
        // The host polls GET / until any answer.
        loop {
            if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                s.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").await.unwrap();
                let mut buf = String::new();
                s.read_to_string(&mut buf).await.unwrap();
                assert!(buf.starts_with("HTTP/1.1 200"), "{buf}");
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(20), "no readiness");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let env = serde_json::json!({"Data": {"req": {"Url": "http://127.0.0.1:7071/api/runs", "Method": "GET", "Query": {}, "Headers": {}, "Params": {}}}, "Metadata": {}});
        let body = env.to_string();
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let req = format!("POST /runs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = String::new();
        s.read_to_string(&mut buf).await.unwrap();
        buf
    });
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // The host logs stdout at Information and stderr as errors: ordinary logs go to stdout.
    assert!(stdout.contains("deploychain handler listening"), "stdout: {stdout}");
    assert!(!stderr.contains(" INFO "), "info lines on stderr would be errors in Azure: {stderr}");
    assert!(result.starts_with("HTTP/1.1 200"), "{result}");
    assert!(result.contains("content-type: application/json"), "{result}");
    assert!(result.contains("\"statusCode\":200") && result.contains("{\\\"runs\\\":[]}"), "{result}");
}

#[test]
fn a_malformed_application_insights_connection_string_stops_start_up_without_printing_it() {
    let dir = tempdir("appinsights");
    for bad in
        ["InstrumentationKey-no-equals-sign-ikey-secret-value", "IngestionEndpoint=https://ingest.example/;Authorization=ikey-secret-value"]
    {
        let mut env = base_env(&dir, free_port());
        env.push(("APPLICATIONINSIGHTS_CONNECTION_STRING", bad.into()));
        let (code, err) = run_to_exit(&env);
        assert_ne!(code, Some(0), "{bad}");
        assert!(err.contains("APPLICATIONINSIGHTS_CONNECTION_STRING"), "the setting is named:\n{err}");
        assert!(!err.contains("ikey-secret-value"), "the connection string is printed:\n{err}");
    }
}

#[cfg(unix)]
#[test]
fn sigterm_stops_the_handler_cleanly() {
    let dir = tempdir("sigterm");
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_handler"))
        .env_clear()
        .envs(base_env(&dir, port).iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(start.elapsed() < Duration::from_secs(20), "no readiness");
        std::thread::sleep(Duration::from_millis(25));
    }
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "SIGTERM did not stop the handler");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0), "a clean stop");
    let mut out = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    assert!(out.contains("stopping: finishing running invocations"), "{out}");
}

/// A managed identity endpoint (App Service's `IDENTITY_ENDPOINT`) and a Service Bus namespace on
/// one local port: the token requests it got, and the `Authorization` of each message sent.
async fn identity_and_bus() -> (u16, std::sync::Arc<std::sync::Mutex<Vec<String>>>, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use axum::http::{HeaderMap, StatusCode};
    let tokens: std::sync::Arc<std::sync::Mutex<Vec<String>>> = Default::default();
    let auths: std::sync::Arc<std::sync::Mutex<Vec<String>>> = Default::default();
    let (t, a) = (tokens.clone(), auths.clone());
    let app = axum::Router::new()
        .route(
            "/msi/token",
            axum::routing::get(move |headers: HeaderMap, uri: axum::http::Uri| {
                let t = t.clone();
                async move {
                    if headers.get("x-identity-header").and_then(|v| v.to_str().ok()) != Some("identity-header-value") {
                        return (StatusCode::UNAUTHORIZED, "no identity header".to_string());
                    }
                    t.lock().unwrap().push(uri.query().unwrap_or_default().to_string());
                    let exp = chrono::Utc::now().timestamp() + 3600;
                    let body = serde_json::json!({ "access_token": "mi-token-for-service-bus", "expires_on": exp.to_string(),
                        "resource": "https://servicebus.azure.net", "token_type": "Bearer", "client_id": "00000000-0000-0000-0000-0000000000c1" });
                    (StatusCode::OK, body.to_string())
                }
            }),
        )
        .fallback(move |headers: HeaderMap| {
            let a = a.clone();
            async move {
                a.lock().unwrap().push(headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string());
                StatusCode::CREATED
            }
        });
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    (port, tokens, auths)
}

#[test]
fn with_managed_identity_the_publisher_sends_an_entra_bearer_and_never_a_key() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (stub, tokens, auths) = rt.block_on(identity_and_bus());
    let dir = tempdir("entra");
    let port = free_port();
    let mut env: Vec<(&str, String)> = base_env(&dir, port).into_iter().filter(|(k, _)| *k != "ServiceBusConnection").collect();
    env.push(("ServiceBusConnection__fullyQualifiedNamespace", format!("127.0.0.1:{stub}")));
    env.push(("ServiceBusConnection__credential", "managedidentity".into()));
    env.push(("IDENTITY_ENDPOINT", format!("http://127.0.0.1:{stub}/msi/token")));
    env.push(("IDENTITY_HEADER", "identity-header-value".into()));
    let mut child = spawn_handler(&env);
    let result = rt.block_on(async {
        let start = Instant::now();
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            assert!(start.elapsed() < Duration::from_secs(20), "no readiness");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        // A signed GitHub push: the webhook publishes the run's `push` event to the topic.
        let commit = "738a951d2f3e7c2b16cc5a0d6a2b1e7d9a1b2c3d";
        let push = serde_json::json!({ "ref": "refs/heads/main", "before": "0000000000000000000000000000000000000000", "after": commit,
            "repository": { "full_name": "octo-org/web" }, "pusher": { "name": "octocat" }, "commits": [],
            "head_commit": { "id": commit, "message": "change" } })
        .to_string();
        let sig = {
            use hmac::{Hmac, Mac};
            let mut m = <Hmac<sha2::Sha256> as Mac>::new_from_slice(b"github-secret-value").unwrap();
            m.update(push.as_bytes());
            format!("sha256={}", hex::encode(m.finalize().into_bytes()))
        };
        let headers = serde_json::json!({ "Content-Type": ["application/json"], "X-GitHub-Event": ["push"],
            "X-GitHub-Delivery": ["72d3162e-cc78-11e3-81ab-4c9367dc0958"], "X-Hub-Signature-256": [sig] });
        let envelope = serde_json::json!({ "Data": { "req": { "Url": "http://127.0.0.1:7071/api/hooks/github", "Method": "POST", "Query": {},
            "Headers": headers, "Params": {}, "Body": push } }, "Metadata": {} });
        reqwest::Client::new().post(format!("http://127.0.0.1:{port}/github_webhook")).json(&envelope).send().await.unwrap().text().await.unwrap()
    });
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(result.contains("\"statusCode\":202"), "{result}\n{}", String::from_utf8_lossy(&out.stderr));
    let auths = auths.lock().unwrap().clone();
    assert_eq!(auths, ["Bearer mi-token-for-service-bus"], "one message, with the managed identity's token");
    assert!(auths.iter().all(|a| !a.contains("SharedAccessSignature")), "never a key: {auths:?}");
    let tokens = tokens.lock().unwrap().clone();
    assert!(tokens.iter().any(|q| q.contains("resource=https") && q.contains("servicebus.azure.net")), "asked for Service Bus: {tokens:?}");
}
