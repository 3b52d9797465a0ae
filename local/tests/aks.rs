//! `AksCompute` against the local ARM endpoint (cluster credentials, registries) and the local
//! Kubernetes API: a rollout by digest, a redelivered one that patches nothing, an older run's
//! image refused over a newer one, promotion by `importImage` (and none when the image is in the
//! stage's registry already), and a Deployment that does not exist refused by name.
#![allow(clippy::unwrap_used)]

use deploychain::arm::{ArmSimConfig, LocalArm};
use deploychain::k8s::LocalKube;
use deploychain_events::{ImageKind, ImageRef};
use deploychain_functions::adapters::aks::AksCompute;
use deploychain_functions::adapters::arm::{ArmClient, RetryPolicy, StaticToken};
use deploychain_functions::adapters::{DeployOutcome, DeployRequest};
use deploychain_functions::config::Secret;
use deploychain_functions::error::Error;
use deploychain_functions::policy::{DeployMode, KubeTarget};
use std::sync::Arc;
use std::time::Duration;

const TOKEN: &str = "stub-bearer-token-value-aks";
const SUB: &str = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups";
const DEV: &str = "contosodev.azurecr.io/shop";

fn cluster() -> String {
    format!("{SUB}/rg-aks/providers/Microsoft.ContainerService/managedClusters/aks-staging")
}

fn registry(name: &str) -> String {
    format!("{SUB}/rg-acr/providers/Microsoft.ContainerRegistry/registries/{name}")
}

fn digest(n: u8) -> String {
    format!("sha256:{}", format!("{n:02x}").repeat(32))
}

async fn serve(router: axum::Router) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, router).await.unwrap() });
    base
}

async fn setup() -> (LocalArm, LocalKube, AksCompute) {
    let dir = std::env::temp_dir().join(format!("deploychain-aks-test-{}-{}", std::process::id(), uuid::Uuid::new_v4().simple()));
    let arm = LocalArm::open(
        &dir.join("arm.sqlite"),
        ArmSimConfig { operation_time: Duration::from_millis(10), ..ArmSimConfig::default() },
        TOKEN,
    )
    .unwrap();
    let kube = LocalKube::open(None, TOKEN, Duration::from_millis(40), Duration::from_millis(400));
    kube.ensure_deployment("aks-staging", "shop", "shop", "shop", &format!("{DEV}@{}", digest(0)), 2);
    arm.set_kube_server(&serve(kube.router()).await);
    let base = url::Url::parse(&serve(arm.router()).await).unwrap();
    let tokens = Arc::new(StaticToken::new(Secret::new(TOKEN)));
    let retry = RetryPolicy { max_attempts: 3, base: Duration::from_millis(10), max_wait: Duration::from_millis(50) };
    let client = Arc::new(
        ArmClient::new(base, tokens.clone(), retry, Duration::from_millis(10), Duration::from_secs(10), Duration::from_secs(10)).unwrap(),
    );
    let aks = AksCompute::new(client, tokens, Duration::from_millis(10), Duration::from_secs(3)).unwrap();
    (arm, kube, aks)
}

fn request(run: &str, sequence: i64, n: u8) -> DeployRequest {
    DeployRequest {
        run_id: run.into(),
        sequence,
        app: "shop".into(),
        stage: "staging".into(),
        target: cluster(),
        image: ImageRef { kind: ImageKind::Container, id: format!("{DEV}@{}", digest(n)), version: None, digest: Some(digest(n)) },
        mode: DeployMode::Image,
        batch_size: 1,
        checks: Vec::new(),
        kubernetes: Some(KubeTarget { namespace: "shop".into(), deployment: "shop".into(), container: None }),
        registry: None,
        source_registry: Some(registry("contosodev")),
    }
}

fn patches(kube: &LocalKube) -> usize {
    kube.seen().iter().filter(|s| s.method == "PATCH").count()
}

#[tokio::test]
async fn a_rollout_by_digest_is_fenced_against_older_runs_and_resumed_on_redelivery() {
    let (_arm, kube, aks) = setup().await;
    assert_eq!(deploy(&aks, &request("shop-555555555555", 5, 5)).await.unwrap(), DeployOutcome::Succeeded);
    assert_eq!(kube.image("aks-staging", "shop", "shop").unwrap(), format!("{DEV}@{}", digest(5)));
    assert_eq!(kube.annotations("aks-staging", "shop", "shop")["deploychain.dev/sequence"], "5");
    assert_eq!(patches(&kube), 1);
    // A redelivery of the same run: followed again, not patched again.
    assert_eq!(deploy(&aks, &request("shop-555555555555", 5, 5)).await.unwrap(), DeployOutcome::Succeeded);
    assert_eq!(patches(&kube), 1);
    // An older run's image never replaces a newer run's.
    match deploy(&aks, &request("shop-444444444444", 4, 4)).await.unwrap() {
        DeployOutcome::Stale { reason } => assert!(reason.contains("shop-555555555555"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(patches(&kube), 1);
    assert_eq!(kube.image("aks-staging", "shop", "shop").unwrap(), format!("{DEV}@{}", digest(5)));
    // A newer one does, and its rollback would go back to the image before it.
    assert_eq!(deploy(&aks, &request("shop-666666666666", 6, 6)).await.unwrap(), DeployOutcome::Succeeded);
    assert_eq!(kube.annotations("aks-staging", "shop", "shop")["deploychain.dev/previous-run"], "shop-555555555555");
    // The patches were strategic merges carrying the version they read.
    let p = kube.seen().into_iter().filter(|s| s.method == "PATCH").collect::<Vec<_>>();
    assert!(p.iter().all(|s| s.body["metadata"]["resourceVersion"].is_string()), "{p:#?}");
    assert_eq!(p[1].body["spec"]["template"]["spec"]["containers"][0]["image"], format!("{DEV}@{}", digest(6)));
}

#[tokio::test]
async fn promotion_imports_by_digest_only_when_the_stage_has_another_registry() {
    let (arm, kube, aks) = setup().await;
    arm.push_image(&registry("contosodev"), &format!("shop@{}", digest(7))).unwrap();
    let mut req = request("shop-777777777777", 7, 7);
    req.registry = Some(registry("contosoprod"));
    assert_eq!(deploy(&aks, &req).await.unwrap(), DeployOutcome::Succeeded);
    let imports = arm.imports();
    assert_eq!(imports.len(), 1);
    assert_eq!(imports[0]["sourceImage"], format!("shop@{}", digest(7)));
    assert_eq!(kube.image("aks-staging", "shop", "shop").unwrap(), format!("contosoprod.azurecr.io/shop@{}", digest(7)));
    // An image not in the source registry cannot be imported: refused with ACR's words.
    let mut req = request("shop-888888888888", 8, 8);
    req.registry = Some(registry("contosoprod"));
    match deploy(&aks, &req).await {
        Err(Error::Refused(m)) => assert!(m.contains("importing shop@") && m.contains("not found in the source registry"), "{m}"),
        other => panic!("{other:?}"),
    }
    // The stage's registry is the image's own: nothing to import.
    let mut req = request("shop-999999999999", 9, 9);
    req.registry = Some(registry("contosodev"));
    assert_eq!(deploy(&aks, &req).await.unwrap(), DeployOutcome::Succeeded);
    assert_eq!(arm.imports().len(), 1);
}

#[tokio::test]
async fn a_deployment_that_does_not_exist_is_refused_by_name() {
    let (_arm, _kube, aks) = setup().await;
    let mut req = request("shop-aaaaaaaaaaaa", 1, 1);
    req.kubernetes = Some(KubeTarget { namespace: "shop".into(), deployment: "cart".into(), container: None });
    match deploy(&aks, &req).await {
        Err(Error::Refused(m)) => assert!(m.contains("shop/cart") && m.contains("404"), "{m}"),
        other => panic!("{other:?}"),
    }
}

/// The whole rollout, look after look (what the chain does with a scheduled message per look).
async fn deploy<C: deploychain_functions::adapters::Compute + ?Sized>(
    compute: &C,
    req: &deploychain_functions::adapters::DeployRequest,
) -> deploychain_functions::error::Result<DeployOutcome> {
    deploychain_functions::adapters::drive(compute, req, 10_000).await.map(|(o, _)| o)
}
