//! The CI adapters on the wire, against a local endpoint that records every request and answers
//! as the provider would: the path, the auth header and the body each sends; the build id it
//! reads back; which answers it retries (429, 5xx, GitHub's secondary rate limit) and which end the
//! run with the provider's message (401, 404, 422, Azure DevOps' sign-in page); and that no
//! credential ever appears in an error.
#![allow(clippy::unwrap_used)]

use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::IntoResponse;
use base64::Engine;
use deploychain_events::BuildProvider;
use deploychain_functions::adapters::arm::credential::StaticToken;
use deploychain_functions::adapters::ci::azure_pipelines::{AzurePipelines, DevOpsAuth};
use deploychain_functions::adapters::ci::github::{GitHubActions, GitHubAuth};
use deploychain_functions::adapters::ci::jenkins::Jenkins;
use deploychain_functions::adapters::ci::{CiBuilds, Retry};
use deploychain_functions::adapters::{BuildRequest, BuildSystem};
use deploychain_functions::config::Secret;
use deploychain_functions::error::Error;
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, Clone)]
struct Seen {
    method: String,
    uri: String,
    headers: HeaderMap,
    body: String,
}

/// One scripted answer: status, headers, body.
type Reply = (u16, Vec<(&'static str, String)>, String);
type Script = Arc<Mutex<VecDeque<Reply>>>;

/// A provider that records requests and answers each with the next scripted answer (200 `{}`
/// when the script is spent).
async fn provider(script: Vec<Reply>) -> (url::Url, Arc<Mutex<Vec<Seen>>>, Script) {
    let seen: Arc<Mutex<Vec<Seen>>> = Default::default();
    let script: Script = Arc::new(Mutex::new(script.into()));
    let (keep, next) = (seen.clone(), script.clone());
    let app = axum::Router::new().fallback(move |method: Method, uri: Uri, headers: HeaderMap, body: String| {
        let (keep, next) = (keep.clone(), next.clone());
        async move {
            keep.lock().unwrap().push(Seen { method: method.to_string(), uri: uri.to_string(), headers, body });
            let (status, headers, body) = next.lock().unwrap().pop_front().unwrap_or((200, vec![], "{}".into()));
            let mut r = (StatusCode::from_u16(status).unwrap(), body).into_response();
            for (k, v) in headers {
                r.headers_mut().insert(k, v.parse().unwrap());
            }
            r
        }
    });
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = url::Url::parse(&format!("http://{}/", l.local_addr().unwrap())).unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    (base, seen, script)
}

fn fast() -> Retry {
    Retry { attempts: 3, base: Duration::from_millis(10), max_wait: Duration::from_millis(50) }
}

fn request(provider: BuildProvider, pipeline: &str, repository: &str) -> BuildRequest {
    BuildRequest {
        run_id: "web-738a951d2f3e".into(),
        app: "web".into(),
        provider,
        pipeline: Some(pipeline.into()),
        repository: repository.into(),
        branch: "main".into(),
        commit: "738a951d2f3e7c2b16cc5a0d6a2b1e7d9a1b2c3d".into(),
        dispatch: true,
    }
}

fn json(s: &Seen) -> Value {
    serde_json::from_str(&s.body).unwrap()
}

fn header<'a>(s: &'a Seen, name: &str) -> &'a str {
    s.headers.get(name).map(|v| v.to_str().unwrap()).unwrap_or_default()
}

const TOKEN: &str = "github_pat_11AAAAAAA0secret0token";

#[tokio::test]
async fn github_dispatches_the_workflow_with_the_token_the_branch_and_the_runs_inputs() {
    let answer = json!({ "workflow_run_id": 4242, "run_url": "https://api.github.com/repos/octo-org/web/actions/runs/4242",
                         "html_url": "https://github.com/octo-org/web/actions/runs/4242" });
    let (base, seen, _) = provider(vec![(200, vec![("content-type", "application/json".into())], answer.to_string())]).await;
    let gh = GitHubActions::new(base, GitHubAuth::Token(Secret::new(TOKEN)), fast(), Duration::from_secs(5)).unwrap();
    let started = gh.dispatch(&request(BuildProvider::GithubActions, ".github/workflows/build.yml", "octo-org/web")).await.unwrap();
    assert_eq!(started.build_id.as_deref(), Some("4242"));
    assert_eq!(started.url.as_deref(), Some("https://github.com/octo-org/web/actions/runs/4242"));
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    let s = &seen[0];
    assert_eq!((s.method.as_str(), s.uri.as_str()), ("POST", "/repos/octo-org/web/actions/workflows/build.yml/dispatches"));
    assert_eq!(header(s, "authorization"), format!("Bearer {TOKEN}"));
    assert_eq!(header(s, "accept"), "application/vnd.github+json");
    assert_eq!(header(s, "x-github-api-version"), "2022-11-28");
    assert!(header(s, "user-agent").starts_with("deploychain/"));
    assert_eq!(
        json(s),
        json!({ "ref": "main", "inputs": { "deploychain_run": "web-738a951d2f3e", "commit": "738a951d2f3e7c2b16cc5a0d6a2b1e7d9a1b2c3d" },
                "return_run_details": true })
    );
}

#[tokio::test]
async fn github_without_run_details_answers_204_and_the_build_has_no_id_yet() {
    let (base, _, _) = provider(vec![(204, vec![], String::new())]).await;
    let gh = GitHubActions::new(base, GitHubAuth::Token(Secret::new(TOKEN)), fast(), Duration::from_secs(5)).unwrap();
    let started = gh.dispatch(&request(BuildProvider::GithubActions, "build.yml", "octo-org/web")).await.unwrap();
    assert_eq!((started.build_id, started.url), (None, None));
}

#[tokio::test]
async fn a_github_app_signs_a_jwt_for_an_installation_token_and_caches_it() {
    let rsa = openssl::rsa::Rsa::generate(2048).unwrap();
    let pem = String::from_utf8(rsa.private_key_to_pem().unwrap()).unwrap();
    let public = openssl::pkey::PKey::public_key_from_pem(&rsa.public_key_to_pem().unwrap()).unwrap();
    let expires = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let (base, seen, _) = provider(vec![
        (201, vec![], json!({ "token": "ghs_installation0token0value", "expires_at": expires }).to_string()),
        (204, vec![], String::new()),
        (204, vec![], String::new()),
    ])
    .await;
    // As an app setting holds it: newlines escaped.
    let auth = GitHubAuth::app("12345", &pem.replace('\n', "\\n"), "678").unwrap();
    let gh = GitHubActions::new(base, auth, fast(), Duration::from_secs(5)).unwrap();
    let req = request(BuildProvider::GithubActions, "build.yml", "octo-org/web");
    gh.dispatch(&req).await.unwrap();
    gh.dispatch(&req).await.unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3, "one installation token for both dispatches");
    assert_eq!((seen[0].method.as_str(), seen[0].uri.as_str()), ("POST", "/app/installations/678/access_tokens"));
    let jwt = header(&seen[0], "authorization").strip_prefix("Bearer ").unwrap().to_string();
    let parts: Vec<&str> = jwt.split('.').collect();
    assert_eq!(parts.len(), 3);
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let head: Value = serde_json::from_slice(&b64.decode(parts[0]).unwrap()).unwrap();
    let claims: Value = serde_json::from_slice(&b64.decode(parts[1]).unwrap()).unwrap();
    assert_eq!(head["alg"], "RS256");
    assert_eq!(claims["iss"], "12345");
    let now = chrono::Utc::now().timestamp();
    let (iat, exp) = (claims["iat"].as_i64().unwrap(), claims["exp"].as_i64().unwrap());
    assert!(iat <= now && exp > now && exp - iat <= 600, "{claims}");
    let mut verifier = openssl::sign::Verifier::new(openssl::hash::MessageDigest::sha256(), &public).unwrap();
    verifier.update(format!("{}.{}", parts[0], parts[1]).as_bytes()).unwrap();
    assert!(verifier.verify(&b64.decode(parts[2]).unwrap()).unwrap(), "the JWT verifies with the App's public key");
    for s in &seen[1..] {
        assert_eq!(header(s, "authorization"), "Bearer ghs_installation0token0value");
    }
}

#[tokio::test]
async fn throttling_and_server_errors_are_retried_and_refusals_end_with_the_providers_message() {
    // 502, then GitHub's secondary rate limit (403 + Retry-After), then accepted.
    let (base, seen, _) = provider(vec![
        (502, vec![], "<html>Bad gateway</html>".into()),
        (403, vec![("retry-after", "0".into())], json!({ "message": "You have exceeded a secondary rate limit" }).to_string()),
        (204, vec![], String::new()),
    ])
    .await;
    let gh = GitHubActions::new(base, GitHubAuth::Token(Secret::new(TOKEN)), fast(), Duration::from_secs(5)).unwrap();
    let req = request(BuildProvider::GithubActions, "build.yml", "octo-org/web");
    gh.dispatch(&req).await.unwrap();
    assert_eq!(seen.lock().unwrap().len(), 3);

    // A workflow without `workflow_dispatch` (422) is refused at once, with GitHub's words.
    let (base, seen, _) =
        provider(vec![(422, vec![], json!({ "message": "Workflow does not have 'workflow_dispatch' trigger" }).to_string())]).await;
    let gh = GitHubActions::new(base, GitHubAuth::Token(Secret::new(TOKEN)), fast(), Duration::from_secs(5)).unwrap();
    match gh.dispatch(&req).await {
        Err(Error::Refused(m)) => {
            assert!(m.contains("422") && m.contains("Workflow does not have 'workflow_dispatch' trigger"), "{m}");
            assert!(m.contains("build.yml") && m.contains("octo-org/web"), "{m}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(seen.lock().unwrap().len(), 1, "not retried");

    // A provider that stays down is transient after the attempts (the message is redelivered).
    let (base, seen, _) = provider(vec![(503, vec![], String::new()); 5]).await;
    let gh = GitHubActions::new(base, GitHubAuth::Token(Secret::new(TOKEN)), fast(), Duration::from_secs(5)).unwrap();
    match gh.dispatch(&req).await {
        Err(Error::Transient(m)) => assert!(m.contains("503") && m.contains("3 attempt"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(seen.lock().unwrap().len(), 3);

    // A 401 that echoes the credential: the error never carries it.
    let (base, _, _) = provider(vec![(401, vec![], json!({ "message": format!("Bad credentials: {TOKEN}") }).to_string())]).await;
    let gh = GitHubActions::new(base, GitHubAuth::Token(Secret::new(TOKEN)), fast(), Duration::from_secs(5)).unwrap();
    let e = gh.dispatch(&req).await.unwrap_err().to_string();
    assert!(e.contains("401") && e.contains("Bad credentials") && !e.contains(TOKEN), "{e}");
}

#[tokio::test]
async fn azure_pipelines_resolves_the_pipeline_by_name_and_queues_the_commit_with_the_pat() {
    let list = json!({ "count": 2, "value": [
        { "id": 7, "name": "Other", "folder": "\\" },
        { "id": 42, "name": "web-ci", "folder": "\\team" } ] });
    let run = json!({ "id": 1234, "name": "20261201.3", "state": "inProgress",
                      "_links": { "web": { "href": "https://dev.azure.com/contoso/Shop/_build/results?buildId=1234" } } });
    let (base, seen, _) =
        provider(vec![(200, vec![], list.to_string()), (200, vec![], run.to_string()), (200, vec![], run.to_string())]).await;
    let org = base.join("contoso").unwrap();
    let ap = AzurePipelines::new(org, None, DevOpsAuth::Pat(Secret::new("ado-pat-secret-value")), fast(), Duration::from_secs(5)).unwrap();
    let req = request(BuildProvider::AzurePipelines, "team/web-ci", "https://dev.azure.com/contoso/Shop/_git/web");
    let started = ap.run(&req).await.unwrap();
    assert_eq!(started.build_id.as_deref(), Some("1234"));
    assert_eq!(started.url.as_deref(), Some("https://dev.azure.com/contoso/Shop/_build/results?buildId=1234"));
    ap.run(&req).await.unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3, "the name is resolved once");
    assert_eq!((seen[0].method.as_str(), seen[0].uri.as_str()), ("GET", "/contoso/Shop/_apis/pipelines?api-version=7.1"));
    assert_eq!((seen[1].method.as_str(), seen[1].uri.as_str()), ("POST", "/contoso/Shop/_apis/pipelines/42/runs?api-version=7.1"));
    let basic = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(":ado-pat-secret-value"));
    assert!(seen.iter().all(|s| header(s, "authorization") == basic));
    assert_eq!(
        json(&seen[1]),
        json!({ "resources": { "repositories": { "self": { "refName": "refs/heads/main", "version": "738a951d2f3e7c2b16cc5a0d6a2b1e7d9a1b2c3d" } } },
                "templateParameters": { "deploychainRun": "web-738a951d2f3e", "commit": "738a951d2f3e7c2b16cc5a0d6a2b1e7d9a1b2c3d" } })
    );
}

#[tokio::test]
async fn azure_pipelines_with_an_entra_token_an_unknown_pipeline_and_a_rejected_pat() {
    let (base, seen, _) = provider(vec![(
        404,
        vec![],
        json!({ "message": "Pipeline with id 9 not found.", "typeKey": "PipelineNotFoundException" }).to_string(),
    )])
    .await;
    let org = base.join("contoso").unwrap();
    let tokens = Arc::new(StaticToken::new(Secret::new("entra-token-value")));
    let ap = AzurePipelines::new(org.clone(), Some("Shop".into()), DevOpsAuth::Entra(tokens), fast(), Duration::from_secs(5)).unwrap();
    let req = request(BuildProvider::AzurePipelines, "9", "octo-org/web");
    match ap.run(&req).await {
        Err(Error::Refused(m)) => assert!(m.contains("404") && m.contains("Pipeline with id 9 not found."), "{m}"),
        other => panic!("{other:?}"),
    }
    let s = seen.lock().unwrap()[0].clone();
    assert_eq!(s.uri, "/contoso/Shop/_apis/pipelines/9/runs?api-version=7.1", "a GitHub repository's project is AZURE_DEVOPS_PROJECT");
    assert_eq!(header(&s, "authorization"), "Bearer entra-token-value");

    // Azure DevOps answers a PAT it does not take with 203 and its sign-in page.
    let (base, _, _) =
        provider(vec![(203, vec![("content-type", "text/html".into())], "<html><title>Sign In</title></html>".into())]).await;
    let ap = AzurePipelines::new(
        base.join("contoso").unwrap(),
        Some("Shop".into()),
        DevOpsAuth::Pat(Secret::new("expired-pat-value")),
        fast(),
        Duration::from_secs(5),
    )
    .unwrap();
    match ap.run(&req).await {
        Err(Error::Refused(m)) => assert!(m.contains("401") && m.contains("not accepted") && !m.contains("expired-pat-value"), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn jenkins_gets_a_crumb_and_queues_the_job_with_its_parameters() {
    let crumb = json!({ "_class": "hudson.security.csrf.DefaultCrumbIssuer", "crumb": "c0ffee", "crumbRequestField": "Jenkins-Crumb" });
    let (base, seen, _) = provider(vec![
        (200, vec![], crumb.to_string()),
        (201, vec![("location", "https://jenkins.contoso.example/queue/item/77/".into())], String::new()),
    ])
    .await;
    let j = Jenkins::new(base.join("ci/").unwrap(), "deploychain".into(), Secret::new("jenkins-api-token"), fast(), Duration::from_secs(5))
        .unwrap();
    let started = j.build(&request(BuildProvider::Jenkins, "team/web", "octo-org/web")).await.unwrap();
    assert_eq!(started.build_id.as_deref(), Some("queue/77"));
    let seen = seen.lock().unwrap().clone();
    assert_eq!((seen[0].method.as_str(), seen[0].uri.as_str()), ("GET", "/ci/crumbIssuer/api/json"));
    assert_eq!((seen[1].method.as_str(), seen[1].uri.as_str()), ("POST", "/ci/job/team/job/web/buildWithParameters"));
    let basic = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode("deploychain:jenkins-api-token"));
    assert!(seen.iter().all(|s| header(s, "authorization") == basic));
    assert_eq!(header(&seen[1], "jenkins-crumb"), "c0ffee");
    assert_eq!(header(&seen[1], "content-type"), "application/x-www-form-urlencoded");
    let form: std::collections::HashMap<String, String> = url::form_urlencoded::parse(seen[1].body.as_bytes()).into_owned().collect();
    assert_eq!(form["DEPLOYCHAIN_RUN"], "web-738a951d2f3e");
    assert_eq!(form["COMMIT"], "738a951d2f3e7c2b16cc5a0d6a2b1e7d9a1b2c3d");
    assert_eq!(form["BRANCH"], "main");

    // Without CSRF protection there is no crumb issuer (404): the build is queued without one.
    let (base, seen, _) =
        provider(vec![(404, vec![], "<html><title>Error 404 Not Found</title></html>".into()), (201, vec![], String::new())]).await;
    let j = Jenkins::new(base, "deploychain".into(), Secret::new("jenkins-api-token"), fast(), Duration::from_secs(5)).unwrap();
    j.build(&request(BuildProvider::Jenkins, "web", "octo-org/web")).await.unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen[1].uri, "/job/web/buildWithParameters");
    assert!(seen[1].headers.get("jenkins-crumb").is_none());
}

#[tokio::test]
async fn builds_are_routed_by_provider_and_a_missing_one_is_refused_by_name() {
    let (base, seen, _) = provider(vec![(204, vec![], String::new())]).await;
    let ci = CiBuilds {
        github: Some(GitHubActions::new(base, GitHubAuth::Token(Secret::new(TOKEN)), fast(), Duration::from_secs(5)).unwrap()),
        ..Default::default()
    };
    ci.request_build(&request(BuildProvider::GithubActions, "build.yml", "octo-org/web")).await.unwrap();
    assert_eq!(seen.lock().unwrap().len(), 1);
    match ci.request_build(&request(BuildProvider::Jenkins, "web", "octo-org/web")).await {
        Err(Error::Refused(m)) => assert!(m.contains("Jenkins") && m.contains("JENKINS_URL"), "{m}"),
        other => panic!("{other:?}"),
    }
    // `trigger = "push"`: the repository starts it; nothing is sent.
    let mut push = request(BuildProvider::GithubActions, "build.yml", "octo-org/web");
    push.dispatch = false;
    ci.request_build(&push).await.unwrap();
    assert_eq!(seen.lock().unwrap().len(), 1);
}
