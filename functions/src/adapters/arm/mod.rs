//! `ArmCompute`: the production [`Compute`] — rollouts to VM scale sets through Azure Resource
//! Manager (`Microsoft.Compute`, api-version 2024-07-01), with a thin hand-written REST client
//! instead of `azure_mgmt_compute` (decision 0007).
//!
//! - [`client`]: the ARM requests, short in-place retries, and long-running operations looked at
//!   one request at a time.
//! - [`credential`]: bearer tokens (managed identity, workload identity, Azure CLI, static).
//! - [`rollout`]: fencing, the model PATCH, batched / rolling upgrades, health gate, rollback —
//!   as short looks between scheduled messages.
//! - [`checks`]: the stage's acceptance checks.
//!
//! The scale set itself records what it runs, in tags (the `TAG_*` constants), so the fencing rule
//! holds across handler instances and a repeated start goes on instead of starting over. The
//! local stack serves the same REST operations, so this code runs unchanged against it.

pub mod checks;
pub mod client;
pub mod credential;
pub mod rollout;

use super::{Compute, DeployRequest, Progress};
use crate::error::Result;
use async_trait::async_trait;
pub use client::{ArmClient, ArmError, RetryPolicy};
pub use credential::{ARM_SCOPE, AzureIdentity, StaticToken, TokenSource};
use std::sync::Arc;
use std::time::Duration;
use url::Url;

/// The run whose artifact the scale set's model has.
pub const TAG_RUN: &str = "deploychain.run";
/// That run's per-app sequence: a lower one is never deployed over it.
pub const TAG_SEQUENCE: &str = "deploychain.sequence";
/// The artifact id (gallery image or application version) the model has.
pub const TAG_ARTIFACT: &str = "deploychain.artifact";
pub const TAG_APP: &str = "deploychain.app";
pub const TAG_STAGE: &str = "deploychain.stage";
/// The run whose failed rollout was rolled back (the other tags name what was restored).
pub const TAG_ROLLEDBACK: &str = "deploychain.rolledback";
/// What the model had before the running rollout, so a resumed rollout can still roll back.
pub const TAG_PREVIOUS_RUN: &str = "deploychain.previous.run";
pub const TAG_PREVIOUS_SEQUENCE: &str = "deploychain.previous.sequence";
pub const TAG_PREVIOUS_ARTIFACT: &str = "deploychain.previous.artifact";

/// The public ARM endpoint.
pub const DEFAULT_ENDPOINT: &str = "https://management.azure.com";

/// How `ArmCompute` talks to ARM and how long it waits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArmOptions {
    /// `https://management.azure.com`, or the local stack's ARM endpoint.
    pub endpoint: Url,
    /// Pause between polls of operations, upgrades and instance health (when ARM names none).
    pub poll_interval: Duration,
    /// How long a batch (or the whole scale set) may take to become healthy.
    pub health_timeout: Duration,
    /// How long one long-running operation (model update, upgrade) may take.
    pub operation_timeout: Duration,
    /// How long one HTTP request may take.
    pub request_timeout: Duration,
    pub retry: RetryPolicy,
    /// Re-reads after a 412 (the scale set changed between read and update) before giving up.
    pub max_conflicts: u32,
}

impl ArmOptions {
    pub fn new(endpoint: Url) -> ArmOptions {
        ArmOptions {
            endpoint,
            poll_interval: Duration::from_secs(5),
            health_timeout: Duration::from_secs(600),
            operation_timeout: Duration::from_secs(3600),
            request_timeout: Duration::from_secs(60),
            retry: RetryPolicy::default(),
            max_conflicts: 3,
        }
    }
}

pub struct ArmCompute {
    arm: ArmClient,
    /// For acceptance checks: never carries the ARM token.
    checks_http: reqwest::Client,
    health_timeout: Duration,
    operation_timeout: Duration,
    max_conflicts: u32,
}

impl ArmCompute {
    pub fn new(options: ArmOptions, tokens: Arc<dyn TokenSource>) -> std::result::Result<ArmCompute, String> {
        let arm = ArmClient::new(
            options.endpoint,
            tokens,
            options.retry,
            options.poll_interval,
            options.operation_timeout,
            options.request_timeout,
        )?;
        let checks_http = crate::outbound::builder()
            .user_agent(concat!("deploychain-checks/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("acceptance check HTTP client: {e}"))?;
        Ok(ArmCompute {
            arm,
            checks_http,
            health_timeout: options.health_timeout,
            operation_timeout: options.operation_timeout,
            max_conflicts: options.max_conflicts,
        })
    }
}

impl ArmCompute {
    /// The production wiring: options and credential from the app settings.
    pub fn from_config(c: &crate::config::ArmConfig) -> std::result::Result<ArmCompute, String> {
        let tokens = token_source(&c.credential)?;
        let options = ArmOptions {
            poll_interval: c.poll_interval,
            health_timeout: c.health_timeout,
            request_timeout: c.request_timeout,
            ..ArmOptions::new(c.endpoint.clone())
        };
        ArmCompute::new(options, tokens)
    }
}

/// An ARM client from the settings (its own token cache), for the bake adapters.
pub fn client_from_config(c: &crate::config::ArmConfig) -> std::result::Result<ArmClient, String> {
    let o = ArmOptions::new(c.endpoint.clone());
    ArmClient::new(c.endpoint.clone(), token_source(&c.credential)?, o.retry, c.poll_interval, o.operation_timeout, c.request_timeout)
}

/// The token source a credential setting names (one per use: each caches its own scope).
pub fn token_source(c: &crate::config::ArmCredential) -> std::result::Result<Arc<dyn TokenSource>, String> {
    use crate::config::ArmCredential;
    Ok(match c {
        ArmCredential::ManagedIdentity { client_id } => Arc::new(AzureIdentity::managed_identity(client_id.clone())?),
        ArmCredential::WorkloadIdentity => Arc::new(AzureIdentity::workload_identity()?),
        ArmCredential::AzureCli => Arc::new(AzureIdentity::azure_cli()?),
        ArmCredential::Static(token) => Arc::new(StaticToken::new(token.clone())),
    })
}

#[async_trait]
impl Compute for ArmCompute {
    async fn advance(&self, req: &DeployRequest, cursor: &serde_json::Value) -> Result<Progress> {
        self.advance_rollout(req, cursor).await
    }

    fn abort(&self, _req: &DeployRequest, cursor: &serde_json::Value, reason: &str) -> Option<serde_json::Value> {
        self.abort_rollout(cursor, reason)
    }
}
