//! Bearer tokens for Azure Resource Manager, behind one small trait.
//!
//! - [`StaticToken`]: any non-empty bearer, for the local ARM endpoint (`DEPLOYCHAIN_ARM_CREDENTIAL=static`).
//! - [`AzureIdentity`]: an `azure_identity` 1.x credential — managed identity (App Service /
//!   Functions `IDENTITY_ENDPOINT`, or IMDS; optionally a user-assigned client id), workload identity
//!   (`AZURE_FEDERATED_TOKEN_FILE`), or the Azure CLI for developers. Tokens are cached until five
//!   minutes before they expire (the CLI credential does not cache by itself).
//!
//! Tokens are secrets: they are never logged, never put in an error, and `Debug` never shows them.

use crate::config::Secret;
use crate::error::{Error, Result};
use async_trait::async_trait;
use azure_core_v1::credentials::TokenCredential;
use std::sync::Arc;

/// The scope of every ARM token.
pub const ARM_SCOPE: &str = "https://management.azure.com/.default";

/// Refresh a cached token this long before it expires.
const REFRESH_MARGIN_SECS: i64 = 300;

/// Gives bearer tokens. Errors never contain a token.
#[async_trait]
pub trait TokenSource: Send + Sync {
    async fn token(&self, scope: &str) -> Result<String>;
}

/// A fixed bearer token (the local stack's ARM endpoint accepts any non-empty one).
pub struct StaticToken(Secret);

impl StaticToken {
    pub fn new(token: Secret) -> StaticToken {
        StaticToken(token)
    }
}

impl std::fmt::Debug for StaticToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StaticToken(<redacted>)")
    }
}

#[async_trait]
impl TokenSource for StaticToken {
    async fn token(&self, _scope: &str) -> Result<String> {
        if self.0.expose().is_empty() {
            return Err(Error::Unauthorized("the static ARM token is empty".into()));
        }
        Ok(self.0.expose().to_string())
    }
}

struct Cached {
    scope: String,
    token: Secret,
    expires_unix: i64,
}

/// An `azure_identity` 1.x credential with a token cache.
pub struct AzureIdentity {
    name: &'static str,
    credential: Arc<dyn TokenCredential>,
    cache: tokio::sync::Mutex<Option<Cached>>,
}

impl std::fmt::Debug for AzureIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AzureIdentity").field("name", &self.name).finish_non_exhaustive()
    }
}

impl AzureIdentity {
    pub fn new(name: &'static str, credential: Arc<dyn TokenCredential>) -> AzureIdentity {
        AzureIdentity { name, credential, cache: tokio::sync::Mutex::new(None) }
    }

    /// Managed identity: App Service / Functions (`IDENTITY_ENDPOINT` + `IDENTITY_HEADER`) or the
    /// VM instance metadata service; `client_id` selects a user-assigned identity.
    pub fn managed_identity(client_id: Option<String>) -> std::result::Result<AzureIdentity, String> {
        // The identity endpoint's client shares the handler's one TLS connector.
        let http = crate::outbound::builder_013().build().map_err(|e| format!("managed identity HTTP client: {e}"))?;
        let options = azure_identity::ManagedIdentityCredentialOptions {
            user_assigned_id: client_id.map(azure_identity::UserAssignedId::ClientId),
            client_options: azure_core_v1::http::ClientOptions {
                transport: Some(azure_core_v1::http::Transport::new(Arc::new(http))),
                ..Default::default()
            },
        };
        let credential = azure_identity::ManagedIdentityCredential::new(Some(options)).map_err(|e| format!("managed identity: {e}"))?;
        Ok(AzureIdentity::new("managed identity", credential))
    }

    /// Workload identity: `AZURE_TENANT_ID`, `AZURE_CLIENT_ID` and `AZURE_FEDERATED_TOKEN_FILE`.
    pub fn workload_identity() -> std::result::Result<AzureIdentity, String> {
        let credential = azure_identity::WorkloadIdentityCredential::new(None).map_err(|e| format!("workload identity: {e}"))?;
        Ok(AzureIdentity::new("workload identity", credential))
    }

    /// The signed-in Azure CLI (`az account get-access-token`), for developers.
    pub fn azure_cli() -> std::result::Result<AzureIdentity, String> {
        let credential = azure_identity::AzureCliCredential::new(None).map_err(|e| format!("Azure CLI: {e}"))?;
        Ok(AzureIdentity::new("Azure CLI", credential))
    }
}

#[async_trait]
impl TokenSource for AzureIdentity {
    async fn token(&self, scope: &str) -> Result<String> {
        let mut cache = self.cache.lock().await;
        let now = chrono::Utc::now().timestamp();
        if let Some(c) = cache.as_ref().filter(|c| c.scope == scope && c.expires_unix - REFRESH_MARGIN_SECS > now) {
            return Ok(c.token.expose().to_string());
        }
        // azure_identity's errors describe the credential's endpoint or the CLI's stderr, never a token.
        let t = self
            .credential
            .get_token(&[scope], None)
            .await
            .map_err(|e| Error::Transient(format!("{} could not get a token for {scope}: {e}", self.name)))?;
        let token = t.token.secret().to_string();
        *cache = Some(Cached { scope: scope.to_string(), token: Secret::new(token.clone()), expires_unix: t.expires_on.unix_timestamp() });
        Ok(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use azure_core_v1::credentials::{AccessToken, TokenRequestOptions};
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Debug, Default)]
    struct Counting(AtomicUsize);

    #[async_trait]
    impl TokenCredential for Counting {
        async fn get_token(&self, scopes: &[&str], _: Option<TokenRequestOptions<'_>>) -> azure_core_v1::Result<AccessToken> {
            assert_eq!(scopes, [ARM_SCOPE]);
            let n = self.0.fetch_add(1, Ordering::SeqCst);
            let expires = azure_core_v1::time::OffsetDateTime::now_utc() + azure_core_v1::time::Duration::hours(1);
            Ok(AccessToken::new(format!("token-{n}"), expires))
        }
    }

    #[tokio::test]
    async fn tokens_are_cached_until_close_to_expiry() {
        let counting = Arc::new(Counting::default());
        let source = AzureIdentity::new("test", counting.clone());
        assert_eq!(source.token(ARM_SCOPE).await.ok().as_deref(), Some("token-0"));
        assert_eq!(source.token(ARM_SCOPE).await.ok().as_deref(), Some("token-0"));
        assert_eq!(counting.0.load(Ordering::SeqCst), 1);
        assert!(!format!("{source:?}").contains("token-0"));
    }

    #[tokio::test]
    async fn a_static_token_is_not_shown_by_debug() {
        let source = StaticToken::new(Secret::new("local-arm-token"));
        assert_eq!(source.token(ARM_SCOPE).await.ok().as_deref(), Some("local-arm-token"));
        assert!(!format!("{source:?}").contains("local-arm-token"));
        assert!(StaticToken::new(Secret::new("")).token(ARM_SCOPE).await.is_err());
    }
}
