//! The bake adapters (`deploychain_functions::adapters::bake`) against the local ARM endpoint:
//! VM Image Builder — a template per run made from the app's base template, its run started and
//! looked at until the gallery version it distributed is known; a re-bake that reuses what exists;
//! a failed bake with Image Builder's message; a missing base template and a version name another
//! run took refused — and images CI made, found by their commit tag.
#![allow(clippy::unwrap_used)]

use deploychain::arm::{ArmSimConfig, Fault, FaultAction, LocalArm};
use deploychain_events::ImageKind;
use deploychain_functions::adapters::arm::{ArmClient, RetryPolicy, StaticToken};
use deploychain_functions::adapters::bake::{Bakers, CiBaked, VmImageBuilder};
use deploychain_functions::adapters::{BakeStarted, BakeStatus, ImageBaker, ImageRequest};
use deploychain_functions::config::Secret;
use deploychain_functions::error::Error;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

const TOKEN: &str = "stub-bearer-token-value-bake";
const RG: &str = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg-images";
const COMMIT: &str = "738a951d2f3e7c2b16cc5a0d6a2b1e7d9a1b2c3d";

fn base_template() -> String {
    format!("{RG}/providers/Microsoft.VirtualMachineImages/imageTemplates/web")
}

fn destination() -> String {
    format!("{RG}/providers/Microsoft.Compute/galleries/deploychain/images/web")
}

async fn endpoint(bake: Duration) -> (LocalArm, Bakers) {
    let dir = std::env::temp_dir().join(format!("deploychain-bake-test-{}-{}", std::process::id(), uuid::Uuid::new_v4().simple()));
    let config = ArmSimConfig { operation_time: Duration::from_millis(10), ..ArmSimConfig::default() };
    let arm = LocalArm::open(&dir.join("arm.sqlite"), config, TOKEN).unwrap();
    arm.configure_bakes(bake, &["bad".to_string()], &[]);
    arm.ensure_base_template(&base_template(), "web", &destination()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = url::Url::parse(&format!("http://{}", listener.local_addr().unwrap())).unwrap();
    let router = arm.router();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    let retry = RetryPolicy { max_attempts: 3, base: Duration::from_millis(10), max_wait: Duration::from_millis(50) };
    let client = Arc::new(
        ArmClient::new(
            base,
            Arc::new(StaticToken::new(Secret::new(TOKEN))),
            retry,
            Duration::from_millis(10),
            Duration::from_secs(10),
            Duration::from_secs(10),
        )
        .unwrap(),
    );
    let bakers =
        Bakers { image_builder: Some(VmImageBuilder::new(client.clone(), Duration::from_millis(20))), ci: Some(CiBaked::new(client)) };
    (arm, bakers)
}

fn request(run: &str, commit: &str, sequence: i64, source: &str) -> ImageRequest {
    ImageRequest {
        run_id: run.into(),
        app: "web".into(),
        commit: commit.into(),
        build_id: "4242".into(),
        source: source.into(),
        destination: destination(),
        sequence,
        template: Some(base_template()),
        kind: ImageKind::GalleryImageVersion,
    }
}

/// Look at a bake until it ends (bounded).
async fn until_done(b: &Bakers, req: &ImageRequest, bake: &str) -> (BakeStatus, Vec<String>) {
    let mut states = Vec::new();
    for _ in 0..200 {
        match b.check_image(req, bake).await.unwrap() {
            BakeStatus::Running(sub) => states.push(sub),
            done => return (done, states),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the bake never ended: {states:?}");
}

#[tokio::test]
async fn a_bake_gets_its_own_template_from_the_base_and_ends_with_its_gallery_version() {
    let (arm, b) = endpoint(Duration::from_millis(150)).await;
    let req = request("web-738a951d2f3e", COMMIT, 7, "image-builder");
    let BakeStarted::Baking { bake, look_after } = b.request_image(&req).await.unwrap() else { panic!("not baking") };
    assert_eq!(bake, format!("{RG}/providers/Microsoft.VirtualMachineImages/imageTemplates/deploychain-web-738a951d2f3e"));
    assert_eq!(look_after, Duration::from_millis(20));
    // The template: the base's source, customizers, identity and VM profile; one distribution to
    // the run's own version, tagged with the run.
    let log = arm.requests();
    let put = log.iter().find(|r| r.method == "PUT").unwrap();
    assert_eq!(put.path, bake);
    assert!(put.query.contains("api-version=2024-02-01"), "{}", put.query);
    let base = arm.image_templates().into_iter().find(|t| t["name"] == "web").unwrap();
    for k in ["source", "customize", "vmProfile"] {
        assert_eq!(put.body["properties"][k], base["properties"][k], "{k}");
    }
    assert_eq!(put.body["identity"], base["identity"]);
    let d = &put.body["properties"]["distribute"];
    assert_eq!(d.as_array().unwrap().len(), 1);
    assert_eq!(d[0]["galleryImageId"], format!("{}/versions/1.0.7", destination()));
    assert_eq!(
        d[0]["artifactTags"],
        json!({ "deploychain.run": "web-738a951d2f3e", "deploychain.commit": COMMIT, "deploychain.build": "4242" })
    );
    assert!(log.iter().any(|r| r.method == "POST" && r.path == format!("{bake}/run")), "the run was started");

    let (done, states) = until_done(&b, &req, &bake).await;
    assert!(!states.is_empty(), "it was running for a while");
    let BakeStatus::Ready(image) = done else { panic!("{done:?}") };
    assert_eq!(image.id, format!("{}/versions/1.0.7", destination()));
    assert_eq!(image.version.as_deref(), Some("1.0.7"));
    assert_eq!(image.kind, ImageKind::GalleryImageVersion);
    assert!(arm.requests().iter().any(|r| r.path == format!("{bake}/runOutputs/deploychain")));

    // A re-bake of the same run reuses the version: no new template, no new run.
    let writes = arm.requests().iter().filter(|r| r.method != "GET").count();
    assert_eq!(b.request_image(&req).await.unwrap(), BakeStarted::Ready(image));
    assert_eq!(arm.requests().iter().filter(|r| r.method != "GET").count(), writes, "nothing written again");
}

#[tokio::test]
async fn a_rebake_while_the_first_runs_looks_at_the_same_bake() {
    let (arm, b) = endpoint(Duration::from_millis(300)).await;
    let req = request("web-738a951d2f3e", COMMIT, 8, "image-builder");
    let first = b.request_image(&req).await.unwrap();
    let again = b.request_image(&req).await.unwrap();
    assert_eq!(first, again);
    let runs = arm.requests().iter().filter(|r| r.method == "POST" && r.path.ends_with("/run")).count();
    let puts = arm.requests().iter().filter(|r| r.method == "PUT").count();
    assert_eq!((puts, runs), (1, 1), "one template, one run");
}

#[tokio::test]
async fn a_failed_bake_says_why_and_refusals_name_what_is_wrong() {
    let (arm, b) = endpoint(Duration::from_millis(50)).await;
    // A commit whose customizer fails.
    let req = request("web-bad000000000", "bad0000000000000000000000000000000000000", 9, "image-builder");
    let BakeStarted::Baking { bake, .. } = b.request_image(&req).await.unwrap() else { panic!() };
    let (done, _) = until_done(&b, &req, &bake).await;
    let BakeStatus::Failed(why) = done else { panic!("{done:?}") };
    assert!(why.contains("the bake failed") && why.contains("exited with code 1"), "{why}");

    // An injected failure of the run's operation, as Image Builder reports one.
    arm.push_fault(Fault::new(
        "POST",
        "/run",
        FaultAction::FailOperation(json!({ "code": "ImageTemplateRunFailed", "message": "Distribution to westus failed: quota exceeded" })),
    ));
    let req = request("web-feed00000000", "feed000000000000000000000000000000000000", 10, "image-builder");
    let BakeStarted::Baking { bake, .. } = b.request_image(&req).await.unwrap() else { panic!() };
    let (done, _) = until_done(&b, &req, &bake).await;
    assert_eq!(done, BakeStatus::Failed("VM Image Builder: the bake failed: Distribution to westus failed: quota exceeded".into()));

    // No base template: refused, naming it.
    let mut req = request("web-aaaa00000000", "aaaa000000000000000000000000000000000000", 11, "image-builder");
    req.template = Some(format!("{RG}/providers/Microsoft.VirtualMachineImages/imageTemplates/missing"));
    match b.request_image(&req).await {
        Err(Error::Refused(m)) => assert!(m.contains("imageTemplates/missing") && m.contains("does not exist"), "{m}"),
        other => panic!("{other:?}"),
    }
    // The version name belongs to another run (the store was reset, sequences restarted).
    arm.publish_version(&format!("{}/versions/1.0.12", destination()), json!({ "deploychain.run": "web-other0000000" }), false).unwrap();
    match b.request_image(&request("web-bbbb00000000", "bbbb000000000000000000000000000000000000", 12, "image-builder")).await {
        Err(Error::Refused(m)) => assert!(m.contains("1.0.12") && m.contains("web-other0000000"), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn an_image_ci_made_is_found_by_its_commit_tag() {
    let (arm, b) = endpoint(Duration::from_millis(50)).await;
    for (v, commit) in [("1.0.1", "1111111111111111111111111111111111111111"), ("1.0.2", COMMIT)] {
        let tags: Value = json!({ "deploychain.commit": commit, "deploychain.run": "web-x" });
        arm.publish_version(&format!("{}/versions/{v}", destination()), tags, false).unwrap();
    }
    let found = b.request_image(&request("web-738a951d2f3e", COMMIT, 1, "ci")).await.unwrap();
    let BakeStarted::Ready(image) = found else { panic!("{found:?}") };
    assert_eq!(image.id, format!("{}/versions/1.0.2", destination()));
    let list = arm.requests().into_iter().find(|r| r.path.ends_with("/versions")).unwrap();
    assert!(list.query.contains("api-version=2023-07-03"), "{}", list.query);
    match b.request_image(&request("web-cccc00000000", "cccc000000000000000000000000000000000000", 2, "ci")).await {
        Err(Error::Refused(m)) => assert!(m.contains("deploychain.commit=cccc") && m.contains("did not publish"), "{m}"),
        other => panic!("{other:?}"),
    }
    // A registry reports its images itself: nothing asked of ARM.
    let before = arm.requests().len();
    assert_eq!(
        b.request_image(&request("web-dddd00000000", "dddd000000000000000000000000000000000000", 3, "registry")).await.unwrap(),
        BakeStarted::Reported
    );
    assert_eq!(arm.requests().len(), before);
}
