//! `Config::from_env()`: every app setting the handler reads, read once and validated together.
//! A bad or missing value fails start-up with every problem listed and the setting named; secret
//! values are never echoed. In Azure the secrets are Key Vault references that the platform
//! resolves into these same app settings.

use crate::adapters::servicebus::ConnectionString;
use std::path::PathBuf;

/// A secret app setting. `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

#[derive(Debug, Clone)]
pub enum StoreConfig {
    Sqlite(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ComputeConfig {
    /// Simulated scale sets kept in a SQLite file (the local stack and demos) until the ARM adapter
    /// is configured; targets whose name contains one of `fail` fail their health check.
    Simulated { path: PathBuf, fail: Vec<String> },
}

#[derive(Debug, Clone)]
pub struct Config {
    pub port: u16,
    pub policy_path: PathBuf,
    pub github_secret: Option<Secret>,
    pub azure_devops_user: String,
    pub azure_devops_secret: Option<Secret>,
    pub approval_key: Secret,
    pub public_url: url::Url,
    pub service_bus: Option<ConnectionString>,
    pub topic: String,
    pub parked_queue: String,
    pub store: StoreConfig,
    pub compute: ComputeConfig,
    pub notify_url: Option<url::Url>,
    pub max_body_bytes: usize,
}

pub const DEFAULT_MAX_BODY: usize = 25 * 1024 * 1024;

impl Config {
    pub fn from_env() -> Result<Config, Vec<String>> {
        Config::from_lookup(&|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    }

    /// Read every setting through `get`, collecting all problems.
    pub fn from_lookup(get: &dyn Fn(&str) -> Option<String>) -> Result<Config, Vec<String>> {
        let mut errs = Vec::new();
        let root = get("FUNCTIONS_APP_ROOT_PATH").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
        let port = match get("FUNCTIONS_CUSTOMHANDLER_PORT") {
            None => 8080,
            Some(p) => p.parse().unwrap_or_else(|_| {
                errs.push(format!("FUNCTIONS_CUSTOMHANDLER_PORT: `{p}` is not a port number"));
                0
            }),
        };
        let policy_path = get("DEPLOYCHAIN_POLICY").map(PathBuf::from).unwrap_or_else(|| root.join("policy.toml"));
        let approval_key = match get("APPROVAL_SIGNING_KEY") {
            Some(k) if k.len() >= 32 => Secret::new(k),
            Some(_) => {
                errs.push("APPROVAL_SIGNING_KEY: must be at least 32 characters (use a random 256-bit value from Key Vault)".into());
                Secret::new("")
            }
            None => {
                errs.push("APPROVAL_SIGNING_KEY: not set (the key that signs approval links)".into());
                Secret::new("")
            }
        };
        let public_url = match get("DEPLOYCHAIN_PUBLIC_URL").map(|u| url::Url::parse(&u)) {
            Some(Ok(u)) if matches!(u.scheme(), "http" | "https") => u,
            Some(_) => {
                errs.push("DEPLOYCHAIN_PUBLIC_URL: not an http(s) URL".into());
                placeholder_url()
            }
            None => {
                errs.push("DEPLOYCHAIN_PUBLIC_URL: not set (the function app's public base URL, for approval links)".into());
                placeholder_url()
            }
        };
        let service_bus = match get("ServiceBusConnection").map(|c| ConnectionString::parse(&c)) {
            Some(Ok(c)) => Some(c),
            Some(Err(e)) => {
                errs.push(format!("ServiceBusConnection: {e}"));
                None
            }
            None => {
                errs.push("ServiceBusConnection: not set (Service Bus connection string the handler publishes with)".into());
                None
            }
        };
        let store = match get("DEPLOYCHAIN_STORE") {
            None => StoreConfig::Sqlite(root.join(".deploychain").join("state.sqlite")),
            Some(s) => match s.strip_prefix("sqlite:") {
                Some(p) if !p.is_empty() => StoreConfig::Sqlite(PathBuf::from(p)),
                _ => {
                    errs.push(format!("DEPLOYCHAIN_STORE: `{s}` is not `sqlite:PATH`"));
                    StoreConfig::Sqlite(PathBuf::new())
                }
            },
        };
        let sim_path = match &store {
            StoreConfig::Sqlite(p) => p.with_file_name("scalesets.sqlite"),
        };
        let fail: Vec<String> = get("DEPLOYCHAIN_SIMULATED_FAILING_TARGETS")
            .map(|s| s.split(',').map(|x| x.trim().to_string()).filter(|x| !x.is_empty()).collect())
            .unwrap_or_default();
        let compute = match get("DEPLOYCHAIN_COMPUTE").as_deref() {
            Some("simulated") => ComputeConfig::Simulated { path: sim_path, fail },
            other => {
                errs.push(format!(
                    "DEPLOYCHAIN_COMPUTE: {} (the only backend in this build is `simulated`; the ARM scale-set adapter is configured separately)",
                    other.map(|o| format!("`{o}` is not known")).unwrap_or_else(|| "not set".into())
                ));
                ComputeConfig::Simulated { path: sim_path, fail }
            }
        };
        let notify_url = match get("DEPLOYCHAIN_NOTIFY_URL").map(|u| url::Url::parse(&u)) {
            Some(Ok(u)) => Some(u),
            Some(Err(_)) => {
                errs.push("DEPLOYCHAIN_NOTIFY_URL: not a URL".into());
                None
            }
            None => None,
        };
        let max_body_bytes = match get("DEPLOYCHAIN_MAX_BODY_BYTES") {
            None => DEFAULT_MAX_BODY,
            Some(v) => v.parse().ok().filter(|n| *n >= 1024).unwrap_or_else(|| {
                errs.push(format!("DEPLOYCHAIN_MAX_BODY_BYTES: `{v}` is not a byte count of at least 1024"));
                DEFAULT_MAX_BODY
            }),
        };
        let cfg = Config {
            port,
            policy_path,
            github_secret: get("GITHUB_WEBHOOK_SECRET").map(Secret::new),
            azure_devops_user: get("AZURE_DEVOPS_WEBHOOK_USER").unwrap_or_else(|| "deploychain".into()),
            azure_devops_secret: get("AZURE_DEVOPS_WEBHOOK_SECRET").map(Secret::new),
            approval_key,
            public_url,
            service_bus,
            topic: get("DEPLOYCHAIN_TOPIC").unwrap_or_else(|| "deploychain-events".into()),
            parked_queue: get("DEPLOYCHAIN_PARKED_QUEUE").unwrap_or_else(|| "deploychain-parked".into()),
            store,
            compute,
            notify_url,
            max_body_bytes,
        };
        if errs.is_empty() { Ok(cfg) } else { Err(errs) }
    }

    /// Checks that need the policy: a secret for every webhook provider in use, a notify URL when
    /// any stage needs approval.
    pub fn check_against(&self, policy: &crate::policy::Policy) -> Result<(), Vec<String>> {
        let mut errs = Vec::new();
        if policy.apps.iter().any(|a| a.source.github.is_some()) && self.github_secret.is_none() {
            errs.push("GITHUB_WEBHOOK_SECRET: not set, but the policy has GitHub repositories".into());
        }
        if policy
            .apps
            .iter()
            .any(|a| a.source.azure_devops.is_some() || a.build.provider == deploychain_events::BuildProvider::AzurePipelines)
            && self.azure_devops_secret.is_none()
        {
            errs.push("AZURE_DEVOPS_WEBHOOK_SECRET: not set, but the policy has Azure DevOps repositories or pipelines".into());
        }
        if policy.apps.iter().flat_map(|a| &a.stages).any(|s| s.approval.is_some()) && self.notify_url.is_none() {
            errs.push(
                "DEPLOYCHAIN_NOTIFY_URL: not set, but the policy has stages that need approval (approvers get their links through it)"
                    .into(),
            );
        }
        if errs.is_empty() { Ok(()) } else { Err(errs) }
    }
}

fn placeholder_url() -> url::Url {
    url::Url::parse("http://invalid.invalid/").unwrap_or_else(|_| unreachable!("static URL parses"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn lookup(m: HashMap<&'static str, &'static str>) -> impl Fn(&str) -> Option<String> {
        move |k| m.get(k).map(|v| v.to_string())
    }

    #[test]
    fn every_problem_is_reported_together_and_secrets_are_not_echoed() {
        let m = HashMap::from([("APPROVAL_SIGNING_KEY", "short-secret-value"), ("DEPLOYCHAIN_COMPUTE", "arm")]);
        let errs = Config::from_lookup(&lookup(m)).err().unwrap_or_default();
        let all = errs.join("\n");
        for setting in ["APPROVAL_SIGNING_KEY", "DEPLOYCHAIN_PUBLIC_URL", "ServiceBusConnection", "DEPLOYCHAIN_COMPUTE"] {
            assert!(all.contains(setting), "{setting} missing from:\n{all}");
        }
        assert!(!all.contains("short-secret-value"));
    }

    #[test]
    fn a_complete_configuration_loads() {
        let m = HashMap::from([
            ("APPROVAL_SIGNING_KEY", "0123456789abcdef0123456789abcdef"),
            ("DEPLOYCHAIN_PUBLIC_URL", "http://127.0.0.1:7071"),
            ("ServiceBusConnection", "Endpoint=sb://127.0.0.1:7072;SharedAccessKeyName=Root;SharedAccessKey=k;UseDevelopmentEmulator=true"),
            ("DEPLOYCHAIN_COMPUTE", "simulated"),
            ("FUNCTIONS_CUSTOMHANDLER_PORT", "40123"),
        ]);
        let c = Config::from_lookup(&lookup(m)).expect("valid");
        assert_eq!(c.port, 40123);
        assert_eq!(c.topic, "deploychain-events");
        assert!(!format!("{c:?}").contains("0123456789abcdef"));
    }
}
