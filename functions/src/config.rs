//! `Config::from_env()`: every app setting the handler reads, read once and validated together.
//! A bad or missing value fails start-up with every problem listed and the setting named; secret
//! values are never echoed. In Azure the secrets are Key Vault references that the platform
//! resolves into these same app settings.

use crate::adapters::notify::Channel;
use crate::adapters::servicebus::ConnectionString;
use crate::policy::parse_duration;
use std::path::PathBuf;
use std::time::Duration;

/// One channel approval notices go to. Its URL may carry a key (Slack, Teams workflows): `Debug`
/// shows only the channel and the host.
#[derive(Clone, PartialEq, Eq)]
pub struct NotifyTarget {
    pub channel: Channel,
    pub url: url::Url,
}

impl std::fmt::Debug for NotifyTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} webhook on {}", self.channel.as_str(), self.url.host_str().unwrap_or("?"))
    }
}

/// How long a run may sit at one kind of step without progress before the watchdog flags it
/// (`DEPLOYCHAIN_STUCK_AFTER`: `2h`, or `2h,deployment=30m,approval=off`). `None` = never flagged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StuckAfter {
    pub build: Option<Duration>,
    pub image: Option<Duration>,
    pub deployment: Option<Duration>,
    pub approval: Option<Duration>,
}

impl Default for StuckAfter {
    fn default() -> Self {
        let two_hours = Some(Duration::from_secs(7200));
        // An approval waits for people; its own timeout ends it. Flag one that outlives it by a day.
        StuckAfter {
            build: two_hours,
            image: two_hours,
            deployment: Some(Duration::from_secs(3600)),
            approval: Some(Duration::from_secs(86_400 * 8)),
        }
    }
}

impl StuckAfter {
    pub fn parse(s: &str) -> std::result::Result<StuckAfter, String> {
        let mut out = StuckAfter::default();
        for (i, part) in s.split(',').map(str::trim).filter(|p| !p.is_empty()).enumerate() {
            let (kind, value) = match part.split_once('=') {
                Some((k, v)) => (Some(k.trim()), v.trim()),
                None if i == 0 => (None, part),
                None => return Err(format!("`{part}`: after the first value, give kind=duration")),
            };
            let d = if value == "off" {
                None
            } else {
                Some(parse_duration(value).ok_or_else(|| format!("`{value}` is not a duration like 30m or 2h (or `off`)"))?)
            };
            match kind {
                None => out = StuckAfter { build: d, image: d, deployment: d, approval: d },
                Some("build") => out.build = d,
                Some("image") => out.image = d,
                Some("deployment") => out.deployment = d,
                Some("approval") => out.approval = d,
                Some(k) => return Err(format!("`{k}` is not one of build, image, deployment, approval")),
            }
        }
        Ok(out)
    }
}

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
    /// Azure Table Storage at `endpoint` (`https://{account}.table.core.windows.net`, or Azurite's
    /// `http://127.0.0.1:10002/devstoreaccount1`); with `key` (`DEPLOYCHAIN_STORE_KEY`) the account
    /// key signs requests, else the ARM credential's identity gets Entra tokens.
    Table {
        endpoint: url::Url,
        account: String,
        key: Option<Secret>,
    },
}

/// VM scale sets through Azure Resource Manager (or the local stack's ARM endpoint).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArmConfig {
    /// `DEPLOYCHAIN_ARM_ENDPOINT` (default `https://management.azure.com`).
    pub endpoint: url::Url,
    /// `DEPLOYCHAIN_ARM_CREDENTIAL`.
    pub credential: ArmCredential,
    /// `DEPLOYCHAIN_ARM_POLL_INTERVAL` (default 5s).
    pub poll_interval: Duration,
    /// `DEPLOYCHAIN_HEALTH_TIMEOUT` (default 10m): how long a batch may take to become healthy.
    pub health_timeout: Duration,
    /// `DEPLOYCHAIN_ARM_REQUEST_TIMEOUT` (default 60s): how long one ARM request may take before
    /// it is given up and retried (the change may have landed: the next read decides).
    pub request_timeout: Duration,
}

/// Where ARM tokens come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArmCredential {
    /// The function app's managed identity (`IDENTITY_ENDPOINT`), or a VM's; `client_id`
    /// (`AZURE_CLIENT_ID`) selects a user-assigned identity.
    ManagedIdentity { client_id: Option<String> },
    /// Workload identity federation (`AZURE_TENANT_ID`, `AZURE_CLIENT_ID`, `AZURE_FEDERATED_TOKEN_FILE`).
    WorkloadIdentity,
    /// The developer's `az login`.
    AzureCli,
    /// A fixed bearer token (`DEPLOYCHAIN_ARM_TOKEN`), for the local stack's ARM endpoint.
    Static(Secret),
}

impl ArmCredential {
    pub const NAMES: [&'static str; 4] = ["managed-identity", "workload-identity", "azure-cli", "static"];

    pub fn name(&self) -> &'static str {
        match self {
            ArmCredential::ManagedIdentity { .. } => "managed-identity",
            ArmCredential::WorkloadIdentity => "workload-identity",
            ArmCredential::AzureCli => "azure-cli",
            ArmCredential::Static(_) => "static",
        }
    }
}

/// The CI systems builds are started on (each `None` when not configured).
#[derive(Debug, Clone, Default)]
pub struct CiConfig {
    pub github: Option<GitHubCi>,
    pub azure_pipelines: Option<AzurePipelinesCi>,
    pub jenkins: Option<JenkinsCi>,
}

#[derive(Debug, Clone)]
pub struct GitHubCi {
    /// `GITHUB_API_URL` (default `https://api.github.com`; GitHub Enterprise Server: `https://HOST/api/v3`).
    pub api: url::Url,
    pub auth: GitHubCredential,
}

#[derive(Debug, Clone)]
pub enum GitHubCredential {
    /// `GITHUB_TOKEN`: a fine-grained token with `actions:write`.
    Token(Secret),
    /// `GITHUB_APP_ID`, `GITHUB_APP_PRIVATE_KEY` (PEM), `GITHUB_APP_INSTALLATION_ID`.
    App { app_id: String, private_key: Secret, installation_id: String },
}

#[derive(Debug, Clone)]
pub struct AzurePipelinesCi {
    /// `AZURE_DEVOPS_ORG_URL`: `https://dev.azure.com/{organization}`.
    pub org: url::Url,
    /// `AZURE_DEVOPS_PROJECT`: for apps whose repository is not in Azure Repos.
    pub project: Option<String>,
    /// `AZURE_DEVOPS_CREDENTIAL`: `managed-identity` (default), `workload-identity`, `azure-cli`,
    /// or `pat` with `AZURE_DEVOPS_PAT`.
    pub credential: DevOpsCredential,
}

#[derive(Debug, Clone)]
pub enum DevOpsCredential {
    Entra(ArmCredential),
    Pat(Secret),
}

#[derive(Debug, Clone)]
pub struct JenkinsCi {
    /// `JENKINS_URL`.
    pub url: url::Url,
    /// `JENKINS_USER` and `JENKINS_API_TOKEN`.
    pub user: String,
    pub token: Secret,
}

/// A base URL setting: http(s), no user info (never echoed: a mistaken value could hold a credential).
fn base_url(get: &dyn Fn(&str) -> Option<String>, errs: &mut Vec<String>, setting: &str) -> Option<url::Url> {
    match get(setting).map(|u| url::Url::parse(&u)) {
        None => None,
        Some(Ok(u)) if matches!(u.scheme(), "http" | "https") && u.has_host() && u.username().is_empty() && u.password().is_none() => {
            Some(u)
        }
        Some(_) => {
            errs.push(format!("{setting}: not an http(s) URL without user info"));
            None
        }
    }
}

fn ci_config(get: &dyn Fn(&str) -> Option<String>, errs: &mut Vec<String>) -> CiConfig {
    let mut ci = CiConfig::default();
    let app = (get("GITHUB_APP_ID"), get("GITHUB_APP_PRIVATE_KEY"), get("GITHUB_APP_INSTALLATION_ID"));
    // A GitHub App when all three of its settings are set; else a token; a partial App is an error.
    let github_auth = match (app, get("GITHUB_TOKEN")) {
        ((Some(app_id), Some(key), Some(installation_id)), _) => {
            Some(GitHubCredential::App { app_id, private_key: Secret::new(key), installation_id })
        }
        ((None, None, None), token) => token.map(|t| GitHubCredential::Token(Secret::new(t))),
        (_, _) => {
            errs.push("GITHUB_APP_ID, GITHUB_APP_PRIVATE_KEY, GITHUB_APP_INSTALLATION_ID: a GitHub App needs all three".into());
            None
        }
    };
    let api = base_url(get, errs, "GITHUB_API_URL");
    if let Some(auth) = github_auth {
        let api = api.unwrap_or_else(|| url::Url::parse("https://api.github.com").unwrap_or_else(|_| placeholder_url()));
        ci.github = Some(GitHubCi { api, auth });
    }
    if let Some(org) = base_url(get, errs, "AZURE_DEVOPS_ORG_URL") {
        let credential = match get("AZURE_DEVOPS_CREDENTIAL").as_deref().unwrap_or("managed-identity") {
            "managed-identity" => DevOpsCredential::Entra(ArmCredential::ManagedIdentity { client_id: get("AZURE_CLIENT_ID") }),
            "workload-identity" => DevOpsCredential::Entra(ArmCredential::WorkloadIdentity),
            "azure-cli" => DevOpsCredential::Entra(ArmCredential::AzureCli),
            "pat" => match get("AZURE_DEVOPS_PAT") {
                Some(p) => DevOpsCredential::Pat(Secret::new(p)),
                None => {
                    errs.push("AZURE_DEVOPS_PAT: not set, but AZURE_DEVOPS_CREDENTIAL is `pat`".into());
                    DevOpsCredential::Pat(Secret::new(""))
                }
            },
            other => {
                errs.push(format!("AZURE_DEVOPS_CREDENTIAL: `{other}` is not one of managed-identity, workload-identity, azure-cli, pat"));
                DevOpsCredential::Pat(Secret::new(""))
            }
        };
        ci.azure_pipelines = Some(AzurePipelinesCi { org, project: get("AZURE_DEVOPS_PROJECT"), credential });
    }
    if let Some(url) = base_url(get, errs, "JENKINS_URL") {
        match (get("JENKINS_USER"), get("JENKINS_API_TOKEN")) {
            (Some(user), Some(token)) => ci.jenkins = Some(JenkinsCi { url, user, token: Secret::new(token) }),
            _ => errs.push("JENKINS_USER, JENKINS_API_TOKEN: both are needed with JENKINS_URL".into()),
        }
    }
    ci
}

#[derive(Debug, Clone)]
pub struct Config {
    pub port: u16,
    pub policy_path: PathBuf,
    pub github_secret: Option<Secret>,
    pub azure_devops_user: String,
    pub azure_devops_secret: Option<Secret>,
    pub approval_key: Secret,
    /// `APPROVAL_SIGNING_KEYS_PREVIOUS`: verify only.
    pub approval_previous_keys: Vec<Secret>,
    /// App Service Authentication is on (`WEBSITE_AUTH_ENABLED=True`, set by the platform): an
    /// approval needs the signed-in principal (`X-MS-CLIENT-PRINCIPAL`) to be the link's approver.
    pub require_signed_in: bool,
    pub public_url: url::Url,
    pub service_bus: Option<ConnectionString>,
    pub topic: String,
    pub parked_queue: String,
    pub store: StoreConfig,
    /// Where and how rollouts reach VM scale sets.
    pub arm: ArmConfig,
    /// Where builds are started.
    pub ci: CiConfig,
    /// The identity an identity-based Service Bus connection uses
    /// (`ServiceBusConnection__credential` = `managedidentity`, `ServiceBusConnection__clientId`).
    pub service_bus_identity: Option<ArmCredential>,
    /// Where approval notices go: a generic webhook, Teams, Slack (any of them).
    pub notify: Vec<NotifyTarget>,
    /// When the watchdog flags a run as stuck.
    pub stuck_after: StuckAfter,
    /// `DEPLOYCHAIN_BAKE_LOOK_EVERY` (default 1m): how often a running image bake is looked at.
    pub bake_look_every: Duration,
    /// `DEPLOYCHAIN_STEP_BUDGET` (default 30s): the longest one look of a rollout may work, well
    /// under the message lock (1 minute), `maxAutoLockRenewalDuration` and `functionTimeout`
    /// (decision 0023). A look that overruns it is cut and retried.
    pub step_budget: Duration,
    /// `DEPLOYCHAIN_RETRY_DEADLINE` (default 30m): how long a rollout step retries transient
    /// failures (throttling, ARM unavailable) before the run gives up and rolls back.
    pub retry_deadline: Duration,
    pub max_body_bytes: usize,
}

pub const DEFAULT_MAX_BODY: usize = 25 * 1024 * 1024;

/// `DEPLOYCHAIN_STEP_BUDGET`'s default: under half the subscriptions' one-minute LockDuration, so
/// a look ends long before its lock could be lost, and well under host.json's
/// `maxAutoLockRenewalDuration` and `functionTimeout` (tests/tests/host_config.rs holds them so).
pub const DEFAULT_STEP_BUDGET: Duration = Duration::from_secs(30);
/// `DEPLOYCHAIN_RETRY_DEADLINE`'s default.
pub const DEFAULT_RETRY_DEADLINE: Duration = Duration::from_secs(30 * 60);

/// The settings that hold secrets (keys, tokens, URLs that carry a key, connection strings). In
/// Azure each is a Key Vault reference; set but empty, it is refused rather than read as unset.
pub const SECRET_SETTINGS: &[&str] = &[
    "APPROVAL_SIGNING_KEY",
    "APPROVAL_SIGNING_KEYS_PREVIOUS",
    "GITHUB_WEBHOOK_SECRET",
    "AZURE_DEVOPS_WEBHOOK_SECRET",
    "DEPLOYCHAIN_NOTIFY_URL",
    "DEPLOYCHAIN_NOTIFY_TEAMS_URL",
    "DEPLOYCHAIN_NOTIFY_SLACK_URL",
    "APPLICATIONINSIGHTS_CONNECTION_STRING",
    "GITHUB_TOKEN",
    "GITHUB_APP_PRIVATE_KEY",
    "AZURE_DEVOPS_PAT",
    "JENKINS_API_TOKEN",
    "DEPLOYCHAIN_ARM_TOKEN",
    "DEPLOYCHAIN_STORE_KEY",
    "ServiceBusConnection",
];

/// The prefixes of App Service's references, which the platform replaces with the secret's value.
/// When it cannot (the identity's role is still propagating, the secret is missing, the vault's
/// firewall) it passes the reference text through as the setting's value: "If a reference isn't
/// resolved properly, the reference string is used instead" —
/// https://learn.microsoft.com/azure/app-service/app-service-key-vault-references
pub const REFERENCE_PREFIXES: &[&str] = &["@Microsoft.KeyVault(", "@Microsoft.AppConfiguration("];

fn is_reference(value: &str) -> bool {
    let v = value.trim_start();
    REFERENCE_PREFIXES.iter().any(|p| v.len() >= p.len() && v[..p.len()].eq_ignore_ascii_case(p))
}

/// Settings the handler must not start with: any whose value is still an unresolved Key Vault or
/// App Configuration reference, and any secret setting that is set but empty. Each problem names
/// the setting, never its value. `main` runs this over the whole environment before anything else
/// (telemetry included) reads it; [`Config::from_lookup`] applies it to every setting it reads.
pub fn unusable_settings<'a>(settings: impl IntoIterator<Item = (&'a str, &'a str)>) -> Vec<String> {
    let mut out: Vec<String> = settings.into_iter().filter_map(|(k, v)| unusable(k, v)).collect();
    out.sort();
    out.dedup();
    out
}

fn unusable(name: &str, value: &str) -> Option<String> {
    if is_reference(value) {
        Some(format!(
            "{name}: an unresolved Key Vault reference (the platform passes the reference text when it cannot read the secret: check that the app's identity has Key Vault Secrets User on the vault, that keyVaultReferenceIdentity names that identity, and that the secret exists); refusing to start with it"
        ))
    } else if value.trim().is_empty() && SECRET_SETTINGS.contains(&name) {
        Some(format!("{name}: set but empty; a secret setting is either a value or not set at all"))
    } else {
        None
    }
}

impl Config {
    pub fn from_env() -> Result<Config, Vec<String>> {
        Config::from_lookup(&|k| std::env::var(k).ok())
    }

    /// Read every setting through `get`, collecting all problems. A setting whose value is empty
    /// counts as not set, except a secret setting ([`SECRET_SETTINGS`]), which is refused; a value
    /// that is still a Key Vault reference is refused whatever the setting.
    pub fn from_lookup(raw: &dyn Fn(&str) -> Option<String>) -> Result<Config, Vec<String>> {
        let refused = std::cell::RefCell::new(Vec::<(String, String)>::new());
        let checked = |k: &str| -> Option<String> {
            let v = raw(k)?;
            if let Some(problem) = unusable(k, &v) {
                refused.borrow_mut().push((k.to_string(), problem));
                return None;
            }
            Some(v).filter(|v| !v.is_empty())
        };
        let result = Config::read(&checked);
        let refused = refused.into_inner();
        if refused.is_empty() {
            return result;
        }
        // The refused settings' own problems replace whatever reading them as unset said.
        let names: Vec<&str> = refused.iter().map(|(n, _)| n.as_str()).collect();
        let mut errs: Vec<String> = refused.iter().map(|(_, p)| p.clone()).collect();
        errs.sort();
        errs.dedup();
        if let Err(others) = result {
            errs.extend(others.into_iter().filter(|e| !names.iter().any(|n| e.starts_with(&format!("{n}:")))));
        }
        Err(errs)
    }

    fn read(get: &dyn Fn(&str) -> Option<String>) -> Result<Config, Vec<String>> {
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
        // Keys rotated out of signing that still verify the links they signed (until those expire).
        let approval_previous_keys: Vec<Secret> = get("APPROVAL_SIGNING_KEYS_PREVIOUS")
            .map(|v| v.split(',').map(str::trim).filter(|k| !k.is_empty()).map(Secret::new).collect())
            .unwrap_or_default();
        if approval_previous_keys.iter().any(|k| k.expose().len() < 32) {
            errs.push("APPROVAL_SIGNING_KEYS_PREVIOUS: every key (comma-separated) must be at least 32 characters".into());
        }
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
        // A connection string (SAS), or identity-based as the Functions host reads it.
        let service_bus = match (get("ServiceBusConnection"), get("ServiceBusConnection__fullyQualifiedNamespace")) {
            (Some(c), _) => match ConnectionString::parse(&c) {
                Ok(c) => Some(c),
                Err(e) => {
                    errs.push(format!("ServiceBusConnection: {e}"));
                    None
                }
            },
            (None, Some(ns)) => match ConnectionString::entra(&ns) {
                Ok(c) => Some(c),
                Err(e) => {
                    errs.push(format!("ServiceBusConnection__fullyQualifiedNamespace: {e}"));
                    None
                }
            },
            (None, None) => {
                errs.push("ServiceBusConnection: not set (the Service Bus connection string the handler publishes with, or ServiceBusConnection__fullyQualifiedNamespace for managed identity)".into());
                None
            }
        };
        let store = match get("DEPLOYCHAIN_STORE") {
            None => StoreConfig::Sqlite(root.join(".deploychain").join("state.sqlite")),
            Some(s) => match (s.strip_prefix("sqlite:"), s.strip_prefix("table:").map(url::Url::parse)) {
                (Some(p), _) if !p.is_empty() => StoreConfig::Sqlite(PathBuf::from(p)),
                (_, Some(Ok(u))) if matches!(u.scheme(), "http" | "https") && u.has_host() && u.username().is_empty() => {
                    // The account: the host's first label, or (path-style, the emulator) the first path segment.
                    let host = u.host_str().unwrap_or_default();
                    let account = if host.contains(".table.") {
                        host.split('.').next().unwrap_or_default().to_string()
                    } else {
                        u.path_segments().and_then(|mut p| p.next()).unwrap_or_default().to_string()
                    };
                    StoreConfig::Table { endpoint: u, account, key: get("DEPLOYCHAIN_STORE_KEY").map(Secret::new) }
                }
                _ => {
                    errs.push("DEPLOYCHAIN_STORE: not `sqlite:PATH` or `table:https://ACCOUNT.table.core.windows.net`".to_string());
                    StoreConfig::Sqlite(PathBuf::new())
                }
            },
        };
        let arm = arm_config(get, &mut errs);
        let ci = ci_config(get, &mut errs);
        let service_bus_identity = match (&service_bus, get("ServiceBusConnection__credential").as_deref()) {
            (Some(c), cred) if c.entra => match cred.map(str::to_ascii_lowercase).as_deref() {
                None | Some("managedidentity") => Some(ArmCredential::ManagedIdentity {
                    client_id: get("ServiceBusConnection__clientId").or_else(|| get("AZURE_CLIENT_ID")),
                }),
                Some("workloadidentity") => Some(ArmCredential::WorkloadIdentity),
                Some("azurecli") => Some(ArmCredential::AzureCli),
                Some(other) => {
                    errs.push(format!("ServiceBusConnection__credential: `{other}` is not managedidentity, workloadidentity or azurecli"));
                    None
                }
            },
            _ => None,
        };
        // Webhook URLs are secrets of their own (Slack's and Teams' carry a key): never echoed.
        let mut notify = Vec::new();
        for (setting, channel) in [
            ("DEPLOYCHAIN_NOTIFY_URL", Channel::Webhook),
            ("DEPLOYCHAIN_NOTIFY_TEAMS_URL", Channel::Teams),
            ("DEPLOYCHAIN_NOTIFY_SLACK_URL", Channel::Slack),
        ] {
            match get(setting).map(|u| url::Url::parse(&u)) {
                Some(Ok(url)) if matches!(url.scheme(), "http" | "https") => notify.push(NotifyTarget { channel, url }),
                Some(_) => errs.push(format!("{setting}: not an http(s) URL")),
                None => {}
            }
        }
        let stuck_after = match get("DEPLOYCHAIN_STUCK_AFTER").map(|v| StuckAfter::parse(&v)) {
            None => StuckAfter::default(),
            Some(Ok(s)) => s,
            Some(Err(e)) => {
                errs.push(format!("DEPLOYCHAIN_STUCK_AFTER: {e}"));
                StuckAfter::default()
            }
        };
        let bake_look_every = match get("DEPLOYCHAIN_BAKE_LOOK_EVERY") {
            None => Duration::from_secs(60),
            Some(v) => parse_duration(&v).filter(|d| !d.is_zero()).unwrap_or_else(|| {
                errs.push(format!("DEPLOYCHAIN_BAKE_LOOK_EVERY: `{v}` is not a duration like 30s or 1m"));
                Duration::from_secs(60)
            }),
        };
        let mut positive = |setting: &str, default: Duration| match get(setting) {
            None => default,
            Some(v) => parse_duration(&v).filter(|d| !d.is_zero()).unwrap_or_else(|| {
                errs.push(format!("{setting}: `{v}` is not a duration like 30s or 1m"));
                default
            }),
        };
        let step_budget = positive("DEPLOYCHAIN_STEP_BUDGET", DEFAULT_STEP_BUDGET);
        let retry_deadline = positive("DEPLOYCHAIN_RETRY_DEADLINE", DEFAULT_RETRY_DEADLINE);
        if arm.request_timeout >= step_budget {
            errs.push(format!(
                "DEPLOYCHAIN_ARM_REQUEST_TIMEOUT: {} is not shorter than DEPLOYCHAIN_STEP_BUDGET ({}): one request would outlive the step",
                crate::adapters::arm::client::human(arm.request_timeout),
                crate::adapters::arm::client::human(step_budget)
            ));
        }
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
            approval_previous_keys,
            require_signed_in: get("WEBSITE_AUTH_ENABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")),
            public_url,
            service_bus,
            topic: get("DEPLOYCHAIN_TOPIC").unwrap_or_else(|| "deploychain-events".into()),
            parked_queue: get("DEPLOYCHAIN_PARKED_QUEUE").unwrap_or_else(|| "deploychain-parked".into()),
            store,
            arm,
            ci,
            service_bus_identity,
            notify,
            stuck_after,
            bake_look_every,
            step_budget,
            retry_deadline,
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
        for app in policy.apps.iter().filter(|a| a.build.trigger == crate::policy::BuildTrigger::Dispatch) {
            use deploychain_events::BuildProvider as P;
            let missing = match app.build.provider {
                P::GithubActions if self.ci.github.is_none() => {
                    Some("GITHUB_TOKEN (or GITHUB_APP_ID, GITHUB_APP_PRIVATE_KEY, GITHUB_APP_INSTALLATION_ID)")
                }
                P::AzurePipelines if self.ci.azure_pipelines.is_none() => Some("AZURE_DEVOPS_ORG_URL"),
                P::Jenkins if self.ci.jenkins.is_none() => Some("JENKINS_URL"),
                _ => None,
            };
            if let Some(settings) = missing {
                errs.push(format!(
                    "{settings}: not set, but app `{}` has its builds started in {} (or set its build `trigger = \"push\"` when the repository starts them)",
                    app.name,
                    app.build.provider.display_name()
                ));
            }
        }
        if policy.apps.iter().flat_map(|a| &a.stages).any(|s| s.approval.is_some()) && self.notify.is_empty() {
            errs.push(
                "DEPLOYCHAIN_NOTIFY_URL: none of it, DEPLOYCHAIN_NOTIFY_TEAMS_URL or DEPLOYCHAIN_NOTIFY_SLACK_URL is set, but the policy has stages that need approval (approvers get their links through them)"
                    .into(),
            );
        }
        if errs.is_empty() { Ok(()) } else { Err(errs) }
    }
}

/// The `DEPLOYCHAIN_ARM_*` settings.
fn arm_config(get: &dyn Fn(&str) -> Option<String>, errs: &mut Vec<String>) -> ArmConfig {
    let endpoint = match get("DEPLOYCHAIN_ARM_ENDPOINT").map(|u| url::Url::parse(&u)) {
        None => url::Url::parse(crate::adapters::arm::DEFAULT_ENDPOINT).unwrap_or_else(|_| placeholder_url()),
        Some(Ok(u)) if matches!(u.scheme(), "http" | "https") && u.has_host() && u.username().is_empty() && u.password().is_none() => u,
        Some(_) => {
            // Not echoed: a mistaken value could hold a credential.
            errs.push("DEPLOYCHAIN_ARM_ENDPOINT: not an http(s) URL without user info (default https://management.azure.com)".into());
            placeholder_url()
        }
    };
    let client_id = get("AZURE_CLIENT_ID");
    let credential = match get("DEPLOYCHAIN_ARM_CREDENTIAL").as_deref() {
        Some("managed-identity") => ArmCredential::ManagedIdentity { client_id },
        Some("workload-identity") => ArmCredential::WorkloadIdentity,
        Some("azure-cli") => ArmCredential::AzureCli,
        Some("static") => {
            match get("DEPLOYCHAIN_ARM_TOKEN") {
                Some(t) => ArmCredential::Static(Secret::new(t)),
                None => {
                    errs.push("DEPLOYCHAIN_ARM_TOKEN: not set, but DEPLOYCHAIN_ARM_CREDENTIAL is `static` (the bearer token for the ARM endpoint)".into());
                    ArmCredential::Static(Secret::new(""))
                }
            }
        }
        Some(_) => {
            errs.push(format!("DEPLOYCHAIN_ARM_CREDENTIAL: not one of {}", ArmCredential::NAMES.join(", ")));
            ArmCredential::AzureCli
        }
        // Explicit selection, in the order a deployment usually has them (azure_identity 1.x has no
        // DefaultAzureCredential): the app's managed identity, a federated token, else the developer's CLI.
        None if get("IDENTITY_ENDPOINT").is_some() => ArmCredential::ManagedIdentity { client_id },
        None if get("AZURE_FEDERATED_TOKEN_FILE").is_some() => ArmCredential::WorkloadIdentity,
        None => ArmCredential::AzureCli,
    };
    if credential == ArmCredential::WorkloadIdentity {
        for setting in ["AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_FEDERATED_TOKEN_FILE"] {
            if get(setting).is_none() {
                errs.push(format!("{setting}: not set, but the ARM credential is workload-identity"));
            }
        }
    }
    let mut duration = |setting: &str, default: Duration| match get(setting) {
        None => default,
        Some(v) => parse_duration(&v).unwrap_or_else(|| {
            errs.push(format!("{setting}: `{v}` is not a duration like 50ms, 5s or 10m"));
            default
        }),
    };
    let poll_interval = duration("DEPLOYCHAIN_ARM_POLL_INTERVAL", Duration::from_secs(5));
    let health_timeout = duration("DEPLOYCHAIN_HEALTH_TIMEOUT", Duration::from_secs(600));
    let request_timeout = duration("DEPLOYCHAIN_ARM_REQUEST_TIMEOUT", Duration::from_secs(20));
    ArmConfig { endpoint, credential, poll_interval, health_timeout, request_timeout }
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
        let m = HashMap::from([("APPROVAL_SIGNING_KEY", "short-secret-value"), ("DEPLOYCHAIN_ARM_CREDENTIAL", "password")]);
        let errs = Config::from_lookup(&lookup(m)).err().unwrap_or_default();
        let all = errs.join("\n");
        for setting in ["APPROVAL_SIGNING_KEY", "DEPLOYCHAIN_PUBLIC_URL", "ServiceBusConnection", "DEPLOYCHAIN_ARM_CREDENTIAL"] {
            assert!(all.contains(setting), "{setting} missing from:\n{all}");
        }
        assert!(!all.contains("short-secret-value"));
    }

    #[test]
    fn an_unresolved_key_vault_reference_or_an_empty_secret_is_refused_by_name_never_by_value() {
        let reference = "@Microsoft.KeyVault(SecretUri=https://kv-dc-x.vault.azure.net/secrets/approval-signing-key)";
        let mut m: HashMap<&'static str, &'static str> = HashMap::from(VALID);
        m.insert("APPROVAL_SIGNING_KEY", reference);
        m.insert("GITHUB_WEBHOOK_SECRET", "@microsoft.keyvault(VaultName=kv-dc-x;SecretName=github-webhook-secret)");
        m.insert("AZURE_DEVOPS_WEBHOOK_SECRET", "");
        m.insert("DEPLOYCHAIN_NOTIFY_URL", "  ");
        m.insert("DEPLOYCHAIN_PUBLIC_URL", "@Microsoft.AppConfiguration(Endpoint=https://x.azconfig.io; Key=url)");
        let errs = Config::from_lookup(&lookup(m)).err().unwrap_or_default();
        let all = errs.join("\n");
        for setting in [
            "APPROVAL_SIGNING_KEY",
            "GITHUB_WEBHOOK_SECRET",
            "AZURE_DEVOPS_WEBHOOK_SECRET",
            "DEPLOYCHAIN_NOTIFY_URL",
            "DEPLOYCHAIN_PUBLIC_URL",
        ] {
            assert_eq!(errs.iter().filter(|e| e.starts_with(&format!("{setting}:"))).count(), 1, "{setting} once in:\n{all}");
        }
        assert!(!all.contains("vault.azure.net") && !all.contains("kv-dc-x") && !all.contains("azconfig"), "{all}");
        assert!(!all.contains(": not set"), "a refused setting is not also reported missing:\n{all}");
        // The same check over a whole environment (what main runs first, before telemetry reads it).
        let env =
            [("APPLICATIONINSIGHTS_CONNECTION_STRING", reference), ("GITHUB_TOKEN", ""), ("UNRELATED_EMPTY", ""), ("PATH", "/usr/bin")];
        let problems = unusable_settings(env);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].starts_with("APPLICATIONINSIGHTS_CONNECTION_STRING:") && problems[1].starts_with("GITHUB_TOKEN:"));
        // An optional setting that is empty is simply not set.
        let mut m: HashMap<&'static str, &'static str> = HashMap::from(VALID);
        m.insert("DEPLOYCHAIN_TOPIC", "");
        assert_eq!(Config::from_lookup(&lookup(m)).expect("valid").topic, "deploychain-events");
    }

    #[test]
    fn stuck_thresholds_parse_per_kind() {
        let s = StuckAfter::parse("30m,deployment=10m,approval=off").expect("valid");
        assert_eq!(s.build, Some(Duration::from_secs(1800)));
        assert_eq!(s.deployment, Some(Duration::from_secs(600)));
        assert_eq!(s.approval, None);
        assert!(StuckAfter::parse("soon").is_err());
        assert!(StuckAfter::parse("1h,bake=2h").is_err());
        assert!(StuckAfter::parse("1h,2h").is_err());
    }

    #[test]
    fn a_complete_configuration_loads() {
        let m = HashMap::from([
            ("APPROVAL_SIGNING_KEY", "0123456789abcdef0123456789abcdef"),
            ("DEPLOYCHAIN_PUBLIC_URL", "http://127.0.0.1:7071"),
            ("ServiceBusConnection", "Endpoint=sb://127.0.0.1:7072;SharedAccessKeyName=Root;SharedAccessKey=k;UseDevelopmentEmulator=true"),
            ("FUNCTIONS_CUSTOMHANDLER_PORT", "40123"),
        ]);
        let c = Config::from_lookup(&lookup(m)).expect("valid");
        assert_eq!(c.port, 40123);
        assert_eq!(c.topic, "deploychain-events");
        assert!(!format!("{c:?}").contains("0123456789abcdef"));
    }

    const VALID: [(&str, &str); 3] = [
        ("APPROVAL_SIGNING_KEY", "0123456789abcdef0123456789abcdef"),
        ("DEPLOYCHAIN_PUBLIC_URL", "http://127.0.0.1:7071"),
        ("ServiceBusConnection", "Endpoint=sb://127.0.0.1:7072;SharedAccessKeyName=Root;SharedAccessKey=k;UseDevelopmentEmulator=true"),
    ];

    fn arm_with(extra: &[(&'static str, &'static str)]) -> Result<Config, Vec<String>> {
        let mut m: HashMap<&'static str, &'static str> = HashMap::from(VALID);
        m.extend(extra.iter().copied());
        Config::from_lookup(&lookup(m))
    }

    #[test]
    fn arm_compute_defaults_to_azure_and_the_app_identity() {
        let c = arm_with(&[
            ("IDENTITY_ENDPOINT", "http://127.0.0.1:41741/msi/token"),
            ("AZURE_CLIENT_ID", "11111111-2222-3333-4444-555555555555"),
        ])
        .expect("valid");
        let arm = &c.arm;
        assert_eq!(arm.endpoint.as_str(), "https://management.azure.com/");
        assert_eq!(arm.credential, ArmCredential::ManagedIdentity { client_id: Some("11111111-2222-3333-4444-555555555555".into()) });
        assert_eq!(arm.poll_interval, Duration::from_secs(5));
        assert_eq!(arm.health_timeout, Duration::from_secs(600));

        let c = arm_with(&[]).expect("valid");
        assert_eq!(c.arm.credential, ArmCredential::AzureCli);
    }

    #[test]
    fn stores_are_sqlite_files_or_table_storage_accounts() {
        let c = arm_with(&[("DEPLOYCHAIN_STORE", "table:https://stdc1234.table.core.windows.net/")]).expect("valid");
        match &c.store {
            StoreConfig::Table { account, key, .. } => assert_eq!((account.as_str(), key.is_none()), ("stdc1234", true)),
            other => panic!("{other:?}"),
        }
        let c = arm_with(&[("DEPLOYCHAIN_STORE", "table:http://127.0.0.1:10002/devstoreaccount1"), ("DEPLOYCHAIN_STORE_KEY", "a2V5")])
            .expect("valid");
        match &c.store {
            StoreConfig::Table { account, key, .. } => assert_eq!((account.as_str(), key.is_some()), ("devstoreaccount1", true)),
            other => panic!("{other:?}"),
        }
        let errs = arm_with(&[("DEPLOYCHAIN_STORE", "redis://x")]).err().unwrap_or_default();
        assert!(errs.iter().any(|e| e.starts_with("DEPLOYCHAIN_STORE:")), "{errs:?}");
    }

    #[test]
    fn arm_compute_for_the_local_stack() {
        let c = arm_with(&[
            ("DEPLOYCHAIN_ARM_ENDPOINT", "http://127.0.0.1:7073"),
            ("DEPLOYCHAIN_ARM_CREDENTIAL", "static"),
            ("DEPLOYCHAIN_ARM_TOKEN", "local-bearer-value"),
            ("DEPLOYCHAIN_ARM_POLL_INTERVAL", "50ms"),
            ("DEPLOYCHAIN_HEALTH_TIMEOUT", "30s"),
        ])
        .expect("valid");
        let arm = &c.arm;
        assert_eq!(arm.endpoint.as_str(), "http://127.0.0.1:7073/");
        assert_eq!(arm.credential, ArmCredential::Static(Secret::new("local-bearer-value")));
        assert_eq!(arm.poll_interval, Duration::from_millis(50));
        assert_eq!(arm.health_timeout, Duration::from_secs(30));
        assert!(!format!("{c:?}").contains("local-bearer-value"));
    }

    #[test]
    fn a_step_budget_must_leave_room_for_one_arm_request() {
        let c = arm_with(&[]).expect("valid");
        assert_eq!((c.step_budget, c.retry_deadline), (DEFAULT_STEP_BUDGET, DEFAULT_RETRY_DEADLINE));
        assert!(c.arm.request_timeout < c.step_budget);
        let c = arm_with(&[("DEPLOYCHAIN_STEP_BUDGET", "3s"), ("DEPLOYCHAIN_ARM_REQUEST_TIMEOUT", "2s")]).expect("valid");
        assert_eq!(c.step_budget, Duration::from_secs(3));
        let errs = arm_with(&[("DEPLOYCHAIN_STEP_BUDGET", "10s")]).err().unwrap_or_default();
        assert!(
            errs.iter().any(|e| e.starts_with("DEPLOYCHAIN_ARM_REQUEST_TIMEOUT:") && e.contains("DEPLOYCHAIN_STEP_BUDGET")),
            "{errs:?}"
        );
        let errs = arm_with(&[("DEPLOYCHAIN_STEP_BUDGET", "0s"), ("DEPLOYCHAIN_RETRY_DEADLINE", "soon")]).err().unwrap_or_default();
        assert!(errs.iter().any(|e| e.starts_with("DEPLOYCHAIN_STEP_BUDGET:")), "{errs:?}");
        assert!(errs.iter().any(|e| e.starts_with("DEPLOYCHAIN_RETRY_DEADLINE:")), "{errs:?}");
    }

    #[test]
    fn bad_arm_settings_are_reported_together_without_secrets() {
        let errs = arm_with(&[
            ("DEPLOYCHAIN_ARM_ENDPOINT", "ftp://user:hunter2@example.com"),
            ("DEPLOYCHAIN_ARM_CREDENTIAL", "static"),
            ("DEPLOYCHAIN_ARM_POLL_INTERVAL", "fast"),
            ("DEPLOYCHAIN_HEALTH_TIMEOUT", "0s"),
        ])
        .err()
        .unwrap_or_default();
        let all = errs.join("\n");
        for setting in ["DEPLOYCHAIN_ARM_ENDPOINT", "DEPLOYCHAIN_ARM_TOKEN", "DEPLOYCHAIN_ARM_POLL_INTERVAL", "DEPLOYCHAIN_HEALTH_TIMEOUT"]
        {
            assert!(all.contains(setting), "{setting} missing from:\n{all}");
        }
        assert!(!all.contains("hunter2"), "{all}");

        let errs = arm_with(&[("DEPLOYCHAIN_ARM_CREDENTIAL", "workload-identity"), ("AZURE_CLIENT_ID", "c")]).err().unwrap_or_default();
        let all = errs.join("\n");
        assert!(all.contains("AZURE_TENANT_ID") && all.contains("AZURE_FEDERATED_TOKEN_FILE") && !all.contains("AZURE_CLIENT_ID"), "{all}");

        let errs = arm_with(&[("DEPLOYCHAIN_ARM_CREDENTIAL", "eyJhbGciOi.secret")]).err().unwrap_or_default();
        let all = errs.join("\n");
        assert!(all.contains("DEPLOYCHAIN_ARM_CREDENTIAL") && !all.contains("eyJhbGciOi"), "{all}");
    }
}
