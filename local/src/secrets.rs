//! Secrets of the local stack, generated once per data directory and kept there (so approval links
//! and keys stay valid across restarts). They protect a laptop demo, not production: in Azure the
//! same settings are Key Vault references.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Clone, Serialize, Deserialize)]
pub struct Secrets {
    pub github_webhook: String,
    pub azure_devops_user: String,
    pub azure_devops_webhook: String,
    pub approval_signing_key: String,
    pub bus_key_name: String,
    pub bus_key: String,
    /// The host's master key (admin functions) and default function key.
    pub master_key: String,
    pub function_key: String,
    /// The bearer token the local ARM endpoint accepts (the handler's `DEPLOYCHAIN_ARM_TOKEN`).
    #[serde(default = "random")]
    pub arm_token: String,
    /// What the local CI service takes: the GitHub token, the Azure DevOps PAT, the Jenkins API
    /// token of [`CI_USER`].
    #[serde(default = "random")]
    pub ci_token: String,
}

/// The Jenkins user the local CI service knows.
pub const CI_USER: &str = "deploychain";

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secrets(<redacted>)")
    }
}

fn random() -> String {
    format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple())
}

impl Secrets {
    pub fn load_or_create(path: &Path) -> Result<Secrets> {
        if let Ok(b) = std::fs::read(path) {
            return serde_json::from_slice(&b).with_context(|| format!("{} is damaged; delete it to make new secrets", path.display()));
        }
        let s = Secrets {
            github_webhook: random(),
            azure_devops_user: "deploychain".into(),
            azure_devops_webhook: random(),
            approval_signing_key: random(),
            bus_key_name: "RootManageSharedAccessKey".into(),
            bus_key: random(),
            master_key: random(),
            function_key: random(),
            arm_token: random(),
            ci_token: random(),
        };
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d)?;
        }
        std::fs::write(path, serde_json::to_vec_pretty(&s)?)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
        }
        Ok(s)
    }
}
