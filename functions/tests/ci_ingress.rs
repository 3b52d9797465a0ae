//! Builds deploychain started, coming back: a dispatched GitHub workflow names its run in
//! `display_title` (even when the branch moved on before the checkout), a Jenkins Notification
//! plugin message names it in the `DEPLOYCHAIN_RUN` parameter, and a build the CI system refuses
//! to start ends the run with the provider's message — each through the router, as the host
//! delivers.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use deploychain_functions::adapters::RunStatus;
use serde_json::{Value, json};

const POLICY: &str = r#"
[[app]]
name = "hello"
source = { github = "Codertocat/Hello-World" }
branches = ["master"]
build = { provider = "github-actions", pipeline = "build.yml" }
image = { source = "image-builder", destination = "/subscriptions/0/resourceGroups/rg/providers/Microsoft.Compute/galleries/g/images/hello" }
[[app.stage]]
name = "staging"
target = "/subscriptions/0/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/hello-staging"

[[app]]
name = "svc"
source = { github = "Codertocat/Svc" }
branches = ["master"]
build = { provider = "jenkins", pipeline = "team/svc" }
image = { source = "image-builder", destination = "/subscriptions/0/resourceGroups/rg/providers/Microsoft.Compute/galleries/g/images/svc" }
[[app.stage]]
name = "staging"
target = "/subscriptions/0/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/svc-staging"
"#;

const A: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f9012345678";
const B: &str = "ffeeddccbbaa00998877665544332211ffeeddcc";

#[tokio::test]
async fn a_dispatched_workflow_run_names_its_run_even_when_the_branch_moved_on() {
    for (name, store) in stores() {
        let mut h = Harness::with_policy(store, POLICY);
        let run = push_master(&mut h, "Codertocat/Hello-World", A).await;
        let req = h.builds.requests.lock().unwrap()[0].clone();
        assert!(req.dispatch && req.run_id == run && req.commit == A, "{name}: {req:?}");
        // The workflow ran on master after B landed: its head_sha is B, its title names run A.
        let mut wr = fixture_json("github/workflow_run.completed.success.json");
        wr["repository"]["full_name"] = json!("Codertocat/Hello-World");
        wr["workflow_run"]["head_branch"] = json!("master");
        wr["workflow_run"]["head_sha"] = json!(B);
        wr["workflow_run"]["path"] = json!(".github/workflows/build.yml");
        wr["workflow_run"]["event"] = json!("workflow_dispatch");
        wr["workflow_run"]["display_title"] = json!(format!("deploychain {run}"));
        let (s, v) = h.github_signed("workflow_run", &serde_json::to_vec(&wr).unwrap()).await;
        assert_eq!(s, 202, "{name}: {v}");
        assert_eq!(v["run"], run.as_str(), "{name}: {v}");
        let completed = h.publisher.sent().into_iter().rfind(|m| m.subject == "dev.deploychain.build.completed.v1").unwrap();
        let ev: Value = serde_json::from_str(&completed.body).unwrap();
        assert_eq!(ev["data"]["commit"], A, "{name}: the run's commit, not the branch's head");
        h.pump().await;
        let r = h.state.store.run(&run).await.unwrap().unwrap();
        assert!(r.steps.iter().any(|s| s.name == "image requested"), "{name}: {:?}", r.steps);
    }
}

fn notification(job: &str, url: &str, phase: &str, status: &str, params: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "name": job, "url": url,
        "build": {
            "full_url": format!("https://jenkins.contoso.example/{url}7/"), "number": 7, "phase": phase, "status": status,
            "url": format!("{url}7/"), "scm": { "url": "https://github.com/Codertocat/Svc.git", "branch": "origin/master", "commit": A },
            "parameters": params
        }
    }))
    .unwrap()
}

async fn jenkins(h: &Harness, body: &[u8]) -> (u16, Value) {
    let headers = [("Content-Type", "application/json".to_string())];
    let env = http_envelope("jenkins_webhook", "POST", "hooks/jenkins", &[], &headers, &[], body);
    let (status, _, body) = h.http("jenkins_webhook", &env).await;
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_jenkins_notification_completes_the_build_of_the_run_its_parameter_names() {
    for (name, store) in stores() {
        let mut h = Harness::with_policy(store, POLICY);
        let run = push_master(&mut h, "Codertocat/Svc", A).await;
        let req = h.builds.requests.lock().unwrap()[0].clone();
        assert_eq!((req.provider, req.pipeline.as_deref()), (deploychain_events::BuildProvider::Jenkins, Some("team/svc")), "{name}");
        let params = json!({ "DEPLOYCHAIN_RUN": run, "COMMIT": A, "BRANCH": "master" });
        let before = h.publisher.sent().len();

        let (s, v) = jenkins(&h, &notification("svc", "job/team/job/svc/", "STARTED", "", params.clone())).await;
        assert_eq!(s, 202, "{name}: {v}");
        assert!(v["ignored"].as_str().unwrap().contains("STARTED"), "{name}: {v}");
        let (s, v) = jenkins(&h, &notification("svc", "job/team/job/svc/", "FINALIZED", "SUCCESS", json!({}))).await;
        assert!(s == 202 && v["ignored"].as_str().unwrap().contains("DEPLOYCHAIN_RUN"), "{name}: {v}");
        let (s, v) = jenkins(&h, &notification("other", "job/other/", "FINALIZED", "SUCCESS", params.clone())).await;
        assert!(s == 202 && v["ignored"].as_str().unwrap().contains("not the build job"), "{name}: {v}");
        let wrong = json!({ "DEPLOYCHAIN_RUN": run, "COMMIT": B });
        let (s, v) = jenkins(&h, &notification("svc", "job/team/job/svc/", "FINALIZED", "SUCCESS", wrong)).await;
        assert_eq!(s, 422, "{name}: a build of another commit is refused: {v}");
        let (s, _) = jenkins(&h, b"<html>not json</html>").await;
        assert_eq!(s, 400, "{name}");
        assert_eq!(h.publisher.sent().len(), before, "{name}: nothing published by those");

        let (s, v) = jenkins(&h, &notification("svc", "job/team/job/svc/", "FINALIZED", "SUCCESS", params)).await;
        assert_eq!(s, 202, "{name}: {v}");
        assert_eq!(v["accepted"], "dev.deploychain.build.completed.v1");
        let completed = h.publisher.sent().into_iter().rfind(|m| m.subject == "dev.deploychain.build.completed.v1").unwrap();
        let ev: Value = serde_json::from_str(&completed.body).unwrap();
        assert_eq!(ev["data"]["provider"], "jenkins");
        assert_eq!(ev["data"]["outcome"], "succeeded");
        assert_eq!(ev["data"]["url"], "https://jenkins.contoso.example/job/team/job/svc/7/");
        assert_bodies_match_schemas(&h.publisher.sent());
        h.pump().await;
        let r = h.state.store.run(&run).await.unwrap().unwrap();
        assert!(r.steps.iter().any(|s| s.name == "image requested"), "{name}: {:?}", r.steps);
    }
}

#[tokio::test]
async fn a_build_the_ci_system_refuses_to_start_ends_the_run_with_its_message() {
    for (name, store) in stores() {
        let mut h = Harness::with_policy(store, POLICY);
        *h.builds.refuse.lock().unwrap() = Some(
            "GitHub: dispatching workflow `build.yml` of Codertocat/Hello-World: 422 Workflow does not have 'workflow_dispatch' trigger"
                .into(),
        );
        let run = push_master(&mut h, "Codertocat/Hello-World", A).await;
        let r = h.state.store.run(&run).await.unwrap().unwrap();
        assert_eq!(r.status, RunStatus::Failed, "{name}");
        let text = serde_json::to_string(&r.steps).unwrap();
        assert!(text.contains("build not started") && text.contains("does not have 'workflow_dispatch' trigger"), "{name}: {text}");
        let types = h.publisher.types();
        assert!(types.contains(&"run.finished".to_string()) && !types.contains(&"build.requested".to_string()), "{name}: {types:?}");
        let finished = h.publisher.sent().into_iter().find(|m| m.subject == "dev.deploychain.run.finished.v1").unwrap();
        let ev: Value = serde_json::from_str(&finished.body).unwrap();
        assert_eq!(ev["data"]["outcome"], "failed");
        assert!(ev["data"]["reason"].as_str().unwrap().contains("could not be started in GitHub Actions"), "{ev}");
        assert!(h.publisher.parked().is_empty(), "{name}: the push is not poison: the run records why");
        assert_bodies_match_schemas(&h.publisher.sent());
    }
}
