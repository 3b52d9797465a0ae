//! The whole chain on one machine: the embedded durable bus (served over the Service Bus REST
//! subset), the local Functions host running the real `handler`, the local ARM endpoint with the
//! policy's scale sets, the simulators, and the progress view. Everything lives under one data
//! directory; stopping and starting again loses nothing.

use crate::arm::{ArmSimConfig, LocalArm};
use crate::config::SimConfig;
use crate::host::{LocalHost, http::Keys};
use crate::secrets::Secrets;
use crate::settings::SettingsSource;
use crate::sim::Simulators;
use crate::watch::{self, Progress};
use anyhow::{Context, Result, anyhow, bail};
use deploychain_bus::{Broker, CorrelationFilter, Rule, SasKeys, Subscription, Topology};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::{broadcast, watch as tokio_watch};

pub const TOPIC: &str = "deploychain-events";
pub const NAMESPACE: &str = "local";

#[derive(Debug, Clone)]
pub struct StackOptions {
    /// The repository: host.json, functions/*/function.json, infra/servicebus.json.
    pub repo: PathBuf,
    pub data_dir: PathBuf,
    /// The pipeline policy the app is packaged with (for [`AppSource::Handler`]; a package
    /// carries its own).
    pub policy: PathBuf,
    /// The function app to run.
    pub app: AppSource,
    /// 7071 as Core Tools; 0 picks a free port (tests).
    pub http_port: u16,
    /// 7072 by default; 0 picks a free port.
    pub bus_port: u16,
    /// The local ARM endpoint: 7073 by default; 0 picks a free port.
    pub arm_port: u16,
    /// The status page: 7070 by default; 0 picks a free port.
    pub status_port: u16,
    pub sim: SimConfig,
    pub arm: ArmSimConfig,
    pub watchdog: crate::config::WatchdogConfig,
    /// More app settings for the handler (`OTEL_EXPORTER_OTLP_ENDPOINT`, …).
    pub extra_settings: Vec<(String, String)>,
}

pub struct Stack {
    pub http_addr: SocketAddr,
    pub bus_addr: SocketAddr,
    pub notify_addr: SocketAddr,
    pub arm_addr: SocketAddr,
    /// The status page.
    pub status_addr: SocketAddr,
    /// The applications' network (the handler's HTTP proxy for acceptance checks).
    pub apps_addr: SocketAddr,
    pub arm: LocalArm,
    /// The local Kubernetes API (the AKS stages' clusters).
    pub kube: crate::k8s::LocalKube,
    /// The local CI service builds are started on.
    pub ci: crate::ci::LocalCi,
    pub broker: Broker,
    pub secrets: Secrets,
    pub host: LocalHost,
    pub progress: broadcast::Sender<Progress>,
    pub data_dir: PathBuf,
    stop: tokio_watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// The repository root: the nearest directory at or above `start` with host.json and functions/.
pub fn find_repo(start: &Path) -> Option<PathBuf> {
    start.ancestors().find(|d| d.join("host.json").is_file() && d.join("functions").is_dir()).map(Path::to_path_buf)
}

/// The Deployments the policy's AKS stages update, each first running a seed image.
fn seed_clusters(kube: &crate::k8s::LocalKube, policy: &deploychain_functions::policy::Policy, replicas: usize) {
    for app in &policy.apps {
        for st in app.stages.iter().filter(|s| s.is_kubernetes()) {
            let Some(k) = &st.kubernetes else { continue };
            let cluster = st.target.rsplit('/').next().unwrap_or_default();
            let seed = format!("{}@sha256:{}", app.image.destination.to_ascii_lowercase(), crate::sim::digest_of(&[&app.name, "seed"]));
            let container = k.container.clone().unwrap_or_else(|| app.name.clone());
            kube.ensure_deployment(cluster, &k.namespace, &k.deployment, &container, &seed, replicas as i64);
        }
    }
}

/// Where the function app comes from.
#[derive(Debug, Clone)]
pub enum AppSource {
    /// A package zip `deploychain package` made: run as it is.
    Package(PathBuf),
    /// A handler binary (a test's debug build): packaged first the way `deploychain package`
    /// packages, with `StackOptions::policy`, into the data directory, then run from that zip.
    Handler(PathBuf),
}

/// Lay out the app root as Azure would: the package zip unpacked with the modes it records (the
/// platform mounts it; nothing fixes a lost executable bit), and `local.settings.json` with the app
/// settings derived from `infra/appsettings.json`, the source the Bicep deploys.
fn stage_app(opts: &StackOptions, secrets: &Secrets, addrs: Addrs) -> Result<PathBuf> {
    let zip = match &opts.app {
        AppSource::Package(zip) => zip.clone(),
        AppSource::Handler(handler) => {
            let out = opts.data_dir.join("package");
            crate::package::stage_with(&opts.repo, handler, &opts.policy, &out, crate::package::Compression::Store)
                .context("packaging the function app")?
                .zip
        }
    };
    let app = opts.data_dir.join("app");
    crate::package::unpack(&zip, &app).with_context(|| format!("unpacking {}", zip.display()))?;
    if matches!(opts.app, AppSource::Handler(_)) {
        // The package made here was only the way in: the app runs from its unpacked copy.
        let _ = std::fs::remove_dir_all(opts.data_dir.join("package"));
    }
    if !app.join("handler").is_file() || !app.join("host.json").is_file() {
        bail!("{} holds no handler or host.json at its root: not a function app package", zip.display());
    }
    let source = SettingsSource::load(&opts.repo)?;
    let values = local_settings(opts, secrets, addrs, &source)?;
    if let Err(errs) = source.check_local(&values) {
        bail!("the local stack's app settings depart from Azure's (infra/appsettings.json):\n  {}", errs.join("\n  "));
    }
    let mut values: serde_json::Map<String, serde_json::Value> = values.into_iter().map(|(k, v)| (k, v.into())).collect();
    // What the developer adds on top (their collector, log level), as an operator adds app settings.
    for (k, v) in &opts.extra_settings {
        values.insert(k.clone(), v.clone().into());
    }
    let path = app.join("local.settings.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&serde_json::json!({ "IsEncrypted": false, "Values": values }))?)?;
    // It holds every secret of the stack: only this user may read it (as secrets.json).
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(app)
}

/// The handler's app settings in the local stack: the names `infra/appsettings.json` gives Azure,
/// with local values, and the local stand-ins its `local` section lists.
pub fn local_settings(opts: &StackOptions, secrets: &Secrets, addrs: Addrs, source: &SettingsSource) -> Result<BTreeMap<String, String>> {
    let Addrs { http, bus, notify, arm, apps, ci } = addrs;
    let changed = BTreeMap::from([
        ("DEPLOYCHAIN_ARM_CREDENTIAL", "static".to_string()),
        ("DEPLOYCHAIN_WATCHDOG_SCHEDULE", opts.watchdog.schedule.clone()),
    ]);
    let mut values = source.local_base(&changed)?;
    let store = opts.data_dir.join("state").join("state.sqlite");
    let local: [(&str, String); 24] = [
        // deployment.always
        ("DEPLOYCHAIN_PUBLIC_URL", format!("http://{http}")),
        ("DEPLOYCHAIN_STORE", format!("sqlite:{}", store.display())),
        // deployment.optional: builds are started on the local CI service, through the same
        // adapters as in Azure.
        ("GITHUB_API_URL", format!("http://{ci}/github")),
        ("AZURE_DEVOPS_ORG_URL", format!("http://{ci}/azdo/local")),
        ("AZURE_DEVOPS_PROJECT", "local".into()),
        ("JENKINS_URL", format!("http://{ci}/jenkins")),
        ("JENKINS_USER", crate::secrets::CI_USER.into()),
        // secrets
        ("APPROVAL_SIGNING_KEY", secrets.approval_signing_key.clone()),
        ("GITHUB_WEBHOOK_SECRET", secrets.github_webhook.clone()),
        ("AZURE_DEVOPS_WEBHOOK_SECRET", secrets.azure_devops_webhook.clone()),
        ("DEPLOYCHAIN_NOTIFY_URL", format!("http://{notify}/notify")),
        ("GITHUB_TOKEN", secrets.ci_token.clone()),
        ("JENKINS_API_TOKEN", secrets.ci_token.clone()),
        // local.added: the platform services the stack stands in for
        ("AzureWebJobsStorage", "UseDevelopmentStorage=true".into()),
        (
            "ServiceBusConnection",
            format!(
                "Endpoint=sb://{bus};SharedAccessKeyName={};SharedAccessKey={};UseDevelopmentEmulator=true",
                secrets.bus_key_name, secrets.bus_key
            ),
        ),
        ("DEPLOYCHAIN_ARM_ENDPOINT", format!("http://{arm}")),
        ("DEPLOYCHAIN_ARM_TOKEN", secrets.arm_token.clone()),
        ("DEPLOYCHAIN_ARM_POLL_INTERVAL", format!("{}ms", opts.arm.poll_interval.as_millis().max(1))),
        ("DEPLOYCHAIN_HEALTH_TIMEOUT", format!("{}ms", opts.arm.health_timeout.as_millis().max(1))),
        ("DEPLOYCHAIN_BAKE_LOOK_EVERY", format!("{}ms", (opts.sim.image_delay.as_millis() / 2).max(20))),
        ("DEPLOYCHAIN_STUCK_AFTER", opts.watchdog.stuck_after.clone()),
        ("AZURE_DEVOPS_CREDENTIAL", "pat".into()),
        ("AZURE_DEVOPS_PAT", secrets.ci_token.clone()),
        // The scale sets' applications live on the stack's own network: acceptance checks of
        // `http://web-staging.internal/…` reach it as an HTTP proxy; everything on 127.0.0.1 (bus,
        // ARM, notify) goes direct.
        ("HTTP_PROXY", format!("http://{apps}")),
    ];
    for (k, v) in local {
        values.insert(k.to_string(), v);
    }
    values.insert("NO_PROXY".into(), "127.0.0.1,localhost".into());
    values.insert("RUST_LOG".into(), std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()));
    Ok(values)
}

/// The stack's own endpoints, which the handler's settings point at.
#[derive(Debug, Clone, Copy)]
pub struct Addrs {
    pub http: SocketAddr,
    pub bus: SocketAddr,
    pub notify: SocketAddr,
    pub arm: SocketAddr,
    pub apps: SocketAddr,
    pub ci: SocketAddr,
}

/// Serve `router` on `listener` until `stop` turns true.
fn serve(listener: tokio::net::TcpListener, router: axum::Router, mut stop: tokio_watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let _ = axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let _ = stop.wait_for(|v| *v).await;
            })
            .await;
    })
}

async fn bind(port: u16) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .with_context(|| format!("port {port} on 127.0.0.1 is taken (is another `deploychain up` running?)"))
}

/// The stack's bus entities: `infra/servicebus.json`'s, and the stack's own subscriptions: the
/// simulators' requests (a short lock, so a request held by a stopped stack comes back soon after a
/// restart) and the progress view (everything).
pub fn topology(repo: &Path) -> Result<Topology> {
    let mut topology = Topology::load(repo.join("infra/servicebus.json")).context("infra/servicebus.json")?;
    let mut sims = Subscription::new(crate::sim::SUBSCRIPTION);
    sims.lock_duration = std::time::Duration::from_secs(5);
    for (i, label) in ["dev.deploychain.build.requested.v1", "dev.deploychain.image.requested.v1"].into_iter().enumerate() {
        sims = sims.with_rule(Rule::correlation(format!("label-{i}"), CorrelationFilter::label(label)));
    }
    topology.add_subscription(TOPIC, sims)?;
    topology.add_subscription(TOPIC, Subscription::new(watch::SUBSCRIPTION))?;
    Ok(topology)
}

/// The bus's durable file in a data directory.
pub fn bus_file(data_dir: &Path) -> PathBuf {
    data_dir.join("bus.sqlite")
}

impl Stack {
    pub async fn start(opts: StackOptions) -> Result<Stack> {
        std::fs::create_dir_all(&opts.data_dir).with_context(|| format!("creating {}", opts.data_dir.display()))?;
        let secrets = Secrets::load_or_create(&opts.data_dir.join("secrets.json"))?;
        let broker = Broker::open(&bus_file(&opts.data_dir), topology(&opts.repo)?).context("opening the local bus")?;

        let (stop, stop_rx) = tokio_watch::channel(false);
        let (progress, _) = broadcast::channel(1024);
        let mut tasks = Vec::new();

        let bus_listener = bind(opts.bus_port).await?;
        let bus_addr = bus_listener.local_addr()?;
        let keys = SasKeys::single(&secrets.bus_key_name, &secrets.bus_key);
        let rest = deploychain_bus::rest_router(broker.clone(), keys);
        tasks.push(serve(bus_listener, rest, stop_rx.clone()));

        let notify_listener = bind(0).await?;
        let notify_addr = notify_listener.local_addr()?;
        tasks.push(serve(notify_listener, watch::notify_router(progress.clone()), stop_rx.clone()));

        let text = std::fs::read_to_string(&opts.policy).with_context(|| format!("policy {}", opts.policy.display()))?;
        let policy = Arc::new(deploychain_functions::policy::Policy::from_toml(&text).map_err(|e| anyhow!("{e}"))?);
        let arm = LocalArm::open(&opts.data_dir.join("arm.sqlite"), opts.arm.clone(), &secrets.arm_token)
            .context("opening the local ARM endpoint")?;
        // Image templates bake in the time the simulators' images take.
        arm.configure_bakes(opts.sim.image_delay, &[], &opts.sim.unhealthy_images);
        for id in arm.seed_from_policy(&policy)? {
            tracing::info!(target: "arm", scale_set = id, "created a simulated scale set");
        }
        let arm_listener = bind(opts.arm_port).await?;
        let arm_addr = arm_listener.local_addr()?;
        tasks.push(serve(arm_listener, arm.router(), stop_rx.clone()));
        let apps_listener = bind(0).await?;
        let apps_addr = apps_listener.local_addr()?;
        tasks.push(serve(apps_listener, arm.apps_router(), stop_rx.clone()));
        // AKS clusters' API servers: the local Kubernetes API, found through the clusters' kubeconfigs.
        let rollout = (opts.arm.upgrade_time * 3).max(std::time::Duration::from_millis(30));
        let kube =
            crate::k8s::LocalKube::open(Some(opts.data_dir.join("k8s.json")), &secrets.arm_token, rollout, opts.arm.health_timeout / 3);
        seed_clusters(&kube, &policy, opts.arm.instances);
        let kube_listener = bind(0).await?;
        let kube_addr = kube_listener.local_addr()?;
        tasks.push(serve(kube_listener, kube.router(), stop_rx.clone()));
        arm.set_kube_server(&format!("http://{kube_addr}"));

        let http_listener = bind(opts.http_port).await?;
        let http_addr = http_listener.local_addr()?;
        let ci = crate::ci::LocalCi::open(
            opts.data_dir.join("ci-builds.json"),
            policy.clone(),
            secrets.clone(),
            opts.sim.clone(),
            format!("http://{http_addr}"),
            stop_rx.clone(),
        )
        .publishing_to(arm.clone());
        let ci_listener = bind(0).await?;
        let ci_addr = ci_listener.local_addr()?;
        tasks.push(serve(ci_listener, ci.router(), stop_rx.clone()));
        let addrs = Addrs { http: http_addr, bus: bus_addr, notify: notify_addr, arm: arm_addr, apps: apps_addr, ci: ci_addr };
        let app_root = stage_app(&opts, &secrets, addrs)?;
        let app = crate::host::app::FunctionApp::load(&app_root)?;
        let host_keys = Keys { master: secrets.master_key.clone(), function: secrets.function_key.clone() };
        let host = LocalHost::start(app, Vec::new(), broker.clone(), NAMESPACE, http_listener, host_keys).await?;

        let sims = Arc::new(Simulators {
            broker: broker.clone(),
            topic: TOPIC.into(),
            front_door: format!("http://{http_addr}"),
            secrets: secrets.clone(),
            policy: policy.clone(),
            config: opts.sim.clone(),
            http: crate::client::http(),
            arm: arm.clone(),
            kube: kube.clone(),
        });
        tasks.push(tokio::spawn(sims.run(stop_rx.clone())));
        let status = crate::status::StatusPage {
            front_door: format!("http://{http_addr}"),
            secrets: secrets.clone(),
            broker: broker.clone(),
            arm: arm.clone(),
            policy: policy.clone(),
            links: Default::default(),
            http: crate::client::http(),
        };
        tasks.push(tokio::spawn(status.clone().collect_links(progress.subscribe(), stop_rx.clone())));
        let status_listener = bind(opts.status_port).await?;
        let status_addr = status_listener.local_addr()?;
        tasks.push(serve(status_listener, status.router(), stop_rx.clone()));
        tasks.push(tokio::spawn(watch::watch_events(broker.clone(), TOPIC.into(), progress.clone(), stop_rx.clone())));
        tasks.push(tokio::spawn(watch::watch_targets(arm.subscribe(), progress.clone(), stop_rx.clone())));

        Ok(Stack {
            http_addr,
            bus_addr,
            notify_addr,
            arm_addr,
            status_addr,
            apps_addr,
            arm,
            kube,
            ci,
            broker,
            secrets,
            host,
            progress,
            data_dir: opts.data_dir,
            stop,
            tasks,
        })
    }

    pub async fn stop(self) {
        let _ = self.stop.send(true);
        self.host.stop().await;
        // One deadline for all of them, not one each.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        for t in self.tasks {
            let _ = tokio::time::timeout_at(deadline, t).await;
        }
        self.arm.flush();
    }

    /// Stop, then delete the data directory: for a scratch stack (a test's, a benchmark's) whose
    /// state nobody reads again. Each holds an unpacked copy of the app, handler included.
    pub async fn discard(self) {
        let dir = self.data_dir.clone();
        self.stop().await;
        let _ = std::fs::remove_dir_all(&dir);
    }
}
