//! The `handler` executable: read the configuration and policy, build the adapters, serve.

use anyhow::Context;
use deploychain_functions::adapters::{
    Compute, Notify, arm::ArmCompute, memory, notify::WebhookNotify, servicebus::ServiceBusPublisher, sqlite::SqliteStore,
};
use deploychain_functions::config::{Config, StoreConfig};
use deploychain_functions::{AppState, app, links::ApprovalLinks, policy::Policy};
use std::future::IntoFuture;
use std::sync::Arc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Fail closed before anything reads a setting: an unresolved Key Vault reference or an empty
    // secret would otherwise be used as the secret itself (a guessable signing key, say).
    let env: Vec<(String, String)> =
        std::env::vars_os().filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().unwrap_or_default()))).collect();
    let unusable = deploychain_functions::config::unusable_settings(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    if !unusable.is_empty() {
        anyhow::bail!("configuration:\n  {}", unusable.join("\n  "));
    }
    drop(env);
    // The one read of the CA bundle every outbound client shares, while the rest starts.
    deploychain_functions::outbound::warm();
    let telemetry = deploychain_functions::telemetry::init()?;
    let config = Config::from_env().map_err(|errs| anyhow::anyhow!("configuration:\n  {}", errs.join("\n  ")))?;
    let text = std::fs::read_to_string(&config.policy_path)
        .with_context(|| format!("reading the pipeline policy {}", config.policy_path.display()))?;
    let policy = Policy::from_toml(&text).map_err(|e| anyhow::anyhow!("{} ({})", e, config.policy_path.display()))?;
    config.check_against(&policy).map_err(|errs| anyhow::anyhow!("configuration:\n  {}", errs.join("\n  ")))?;

    // The host calls http://127.0.0.1:{port}: listen on IPv4 loopback, at once. `GET /` (the
    // host's readiness probe) answers now; invocations that come before the adapters are built
    // wait for them (the TLS set-up is most of a start), and a failure to build them stops the
    // process, as a bad configuration does.
    let port = config.port;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.with_context(|| format!("binding 127.0.0.1:{port}"))?;
    tracing::info!(port, "deploychain handler listening");
    let (ready, routes) = tokio::sync::watch::channel(None);
    let server =
        tokio::spawn(axum::serve(listener, deploychain_functions::starting(routes)).with_graceful_shutdown(stopping()).into_future());
    let state = adapters(config, policy).await?;
    let _ = ready.send(Some(app(state)));
    server.await.context("the server task")??;
    telemetry.shutdown().await;
    Ok(())
}

/// Everything the steps reach the world through, built from the configuration.
async fn adapters(config: Config, policy: Policy) -> anyhow::Result<AppState> {
    // A SQLite store first: its schema is written while the TLS set-up `main` started on another
    // thread is still reading the CA bundle (a Table store needs TLS, and waits for it here).
    let store: Arc<dyn deploychain_functions::adapters::Store> = match &config.store {
        StoreConfig::Sqlite(path) => Arc::new(SqliteStore::open(path).map_err(anyhow::Error::msg)?),
        StoreConfig::Table { endpoint, account, key } => {
            use deploychain_functions::adapters::table::{TableAuth, TableStore};
            let auth = match key {
                Some(k) => TableAuth::Key { account: account.clone(), key: k.clone() },
                None => TableAuth::Entra(
                    deploychain_functions::adapters::arm::token_source(&config.arm.credential).map_err(anyhow::Error::msg)?,
                ),
            };
            let t = TableStore::new(endpoint.clone(), auth).map_err(anyhow::Error::msg)?;
            t.ensure_table().await.map_err(|e| anyhow::anyhow!("DEPLOYCHAIN_STORE: {e}"))?;
            tracing::info!(account, "runs are stored in Table Storage");
            Arc::new(t)
        }
    };
    let http = deploychain_functions::outbound::service_bus_http().map_err(anyhow::Error::msg)?;
    let sb = config.service_bus.as_ref().context("ServiceBusConnection")?;
    // Managed identity: an Entra bearer on every Service Bus request (and only those), never a key.
    let sb_http: Arc<dyn azure_core::HttpClient> = match &config.service_bus_identity {
        Some(identity) => {
            let tokens =
                deploychain_functions::adapters::arm::token_source(identity).map_err(|e| anyhow::anyhow!("ServiceBusConnection: {e}"))?;
            tracing::info!(credential = identity.name(), "Service Bus requests carry Entra tokens");
            Arc::new(deploychain_functions::adapters::servicebus::BearerClient { tokens, inner: http.clone() })
        }
        None => http.clone(),
    };
    let publisher = ServiceBusPublisher::new(sb, &config.topic, &config.parked_queue, sb_http.clone()).map_err(anyhow::Error::msg)?;
    let arm = &config.arm;
    tracing::info!(endpoint = %arm.endpoint, credential = arm.credential.name(), "rollouts go to VM scale sets through ARM");
    let scale_sets: Arc<dyn Compute> = Arc::new(ArmCompute::from_config(arm).map_err(|e| anyhow::anyhow!("ARM: {e}"))?);
    // One ARM client (and token cache) for the bakes, the clusters' credentials and the registries.
    let shared_arm = Arc::new(deploychain_functions::adapters::arm::client_from_config(arm).map_err(|e| anyhow::anyhow!("ARM: {e}"))?);
    let aks_tokens = deploychain_functions::adapters::arm::token_source(&arm.credential).map_err(|e| anyhow::anyhow!("ARM: {e}"))?;
    let clusters =
        deploychain_functions::adapters::aks::AksCompute::new(shared_arm.clone(), aks_tokens, arm.poll_interval, arm.health_timeout)
            .map_err(anyhow::Error::msg)?;
    let compute: Arc<dyn Compute> = Arc::new(deploychain_functions::adapters::aks::Targets { scale_sets, clusters: Some(clusters) });
    let notify: Arc<dyn Notify> = if config.notify.is_empty() {
        Arc::new(memory::MemoryNotify::default())
    } else {
        Arc::new(WebhookNotify::new(config.notify.clone(), http.clone()))
    };
    let previous: Vec<&[u8]> = config.approval_previous_keys.iter().map(|k| k.expose().as_bytes()).collect();
    let links = ApprovalLinks::new(config.approval_key.expose().as_bytes(), &previous, config.public_url.clone());
    let builds = Arc::new(deploychain_functions::adapters::ci::CiBuilds::from_config(&config.ci).map_err(anyhow::Error::msg)?);
    let bake_arm = shared_arm;
    let baker = Arc::new(deploychain_functions::adapters::bake::Bakers {
        image_builder: Some(deploychain_functions::adapters::bake::VmImageBuilder::new(bake_arm.clone(), config.bake_look_every)),
        ci: Some(deploychain_functions::adapters::bake::CiBaked::new(bake_arm)),
    });
    let policy = Arc::new(policy);
    let dead_letters = deploychain_functions::ops::DeadLetters::new(
        sb,
        &config.topic,
        deploychain_functions::ops::SUBSCRIPTIONS.iter().map(|s| s.to_string()).collect(),
        &config.parked_queue,
        sb_http,
    )
    .with_policy(policy.clone());
    Ok(AppState {
        config: Arc::new(config),
        policy,
        links: Arc::new(links),
        store,
        publisher: Arc::new(publisher),
        builds,
        baker,
        compute,
        notify,
        dead_letters: Some(Arc::new(dead_letters)),
    })
}

/// Ctrl-C, or SIGTERM (what the Functions host and a container runtime send): stop taking
/// invocations, finish the running ones, then flush telemetry.
async fn stopping() {
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(t) => t,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("stopping: finishing running invocations, then flushing telemetry");
}
