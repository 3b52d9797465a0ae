//! The function app as the Functions host reads it from its app root: `host.json`, one folder per
//! function with its `function.json`, and `local.settings.json` (`Values` = app settings).
//! `%SETTING%` binding expressions are resolved from the app settings, as the host's name
//! resolver does, and app settings `AzureFunctionsJobHost__path__to__setting` override host.json
//! values before any is read, as in Azure (see `host_json.rs`).

pub use super::host_json::parse_timespan;
use super::host_json::{HostJson, get_ci};
use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct FunctionApp {
    pub root: PathBuf,
    pub host: HostSettings,
    pub functions: Vec<Function>,
    /// `local.settings.json` `Values`.
    pub settings: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
pub struct HostSettings {
    pub executable: String,
    pub arguments: Vec<String>,
    pub working_directory: Option<String>,
    pub function_timeout: Duration,
    pub route_prefix: String,
    pub max_concurrent_calls: usize,
    pub max_concurrent_sessions: usize,
    pub max_auto_lock_renewal: Duration,
    pub auto_complete: bool,
    /// Fail an invocation whose outputs the real host would silently mangle (the base64 trap,
    /// `System.Byte[]`) instead of mangling them: `local.settings.json` `Host.StrictOutputs`
    /// (default true).
    pub strict_outputs: bool,
}

#[derive(Debug, Clone)]
pub struct Function {
    pub name: String,
    pub trigger: Trigger,
    /// `serviceBus` output bindings.
    pub outputs: Vec<BusOutput>,
    /// Whether an output binding is named `$return`.
    pub has_return: bool,
}

/// A `serviceBus` output binding (direction `out`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusOutput {
    pub name: String,
    /// The queue or topic it sends to.
    pub entity: String,
    /// `dataType: binary` turns the host's base64 conversion off (§3.2).
    pub binary: bool,
}

#[derive(Debug, Clone)]
pub enum Trigger {
    Http(HttpTrigger),
    ServiceBus(BusTrigger),
    Timer(TimerTrigger),
}

#[derive(Debug, Clone)]
pub struct TimerTrigger {
    pub binding: String,
    pub schedule: super::timer::Schedule,
    pub run_on_startup: bool,
    pub use_monitor: bool,
}

#[derive(Debug, Clone)]
pub struct HttpTrigger {
    pub binding: String,
    /// Output binding name (`res`), or `$return`.
    pub output: Option<String>,
    /// Lower-case methods; empty = all.
    pub methods: Vec<String>,
    pub route: String,
    pub auth_level: AuthLevel,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthLevel {
    Anonymous,
    Function,
    Admin,
}

#[derive(Debug, Clone)]
pub struct BusTrigger {
    pub binding: String,
    /// `queue`, or `topic/subscriptions/sub`.
    pub entity: String,
    pub binary: bool,
    pub sessions: bool,
    pub auto_complete: bool,
    pub connection: String,
}

/// The shortest `functionTimeout` the host accepts
/// (Azure/azure-functions-host `ScriptJobHostOptionsSetup.MinFunctionTimeout`).
pub const MIN_FUNCTION_TIMEOUT: Duration = Duration::from_secs(1);

impl HostSettings {
    /// The settings the local host runs by, from host.json with its overrides applied; a value
    /// the Functions host would refuse at start-up is refused, named by where it came from.
    pub fn read(host: &HostJson, strict_outputs: bool) -> Result<HostSettings> {
        let section = if host.at(&["customHandler"]).is_some() {
            "customHandler"
        } else if host.at(&["httpWorker"]).is_some() {
            "httpWorker"
        } else {
            bail!("host.json has no customHandler section");
        };
        let executable = host
            .text(&[section, "description", "defaultExecutablePath"])?
            .ok_or_else(|| anyhow!("host.json {section}.description.defaultExecutablePath is required"))?;
        let arguments = host.texts(&[section, "description", "arguments"])?;
        let working_directory = host.text(&[section, "description", "workingDirectory"])?.filter(|s| !s.is_empty());
        // Default 30 min outside Windows Consumption; at least 1 s (ScriptJobHostOptionsSetup).
        let function_timeout = host.timespan(&["functionTimeout"])?.unwrap_or(Duration::from_secs(30 * 60));
        if function_timeout < MIN_FUNCTION_TIMEOUT {
            bail!("{}: functionTimeout must be at least 00:00:01", host.origin(&["functionTimeout"]));
        }
        let route_prefix =
            host.text(&["extensions", "http", "routePrefix"])?.map(|s| s.trim_matches('/').to_string()).unwrap_or_else(|| "api".into());
        // The Service Bus extension's options and their checks (Azure/azure-sdk-for-net
        // Microsoft.Azure.WebJobs.Extensions.ServiceBus `Config/ServiceBusOptions.cs`): calls and
        // sessions at least 1, the lock renewal not negative (default 5 min).
        let sb = |k: &'static str| ["extensions", "serviceBus", k];
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        Ok(HostSettings {
            executable,
            arguments,
            working_directory,
            function_timeout,
            route_prefix,
            max_concurrent_calls: host.number(&sb("maxConcurrentCalls"), 1)?.map(|n| n as usize).unwrap_or(16 * cores),
            max_concurrent_sessions: host.number(&sb("maxConcurrentSessions"), 1)?.map(|n| n as usize).unwrap_or(8),
            max_auto_lock_renewal: host.timespan(&sb("maxAutoLockRenewalDuration"))?.unwrap_or(Duration::from_secs(300)),
            auto_complete: host.flag(&sb("autoCompleteMessages"))?.unwrap_or(true),
            strict_outputs,
        })
    }
}

/// Check the `AzureFunctionsJobHost__…` app settings among `settings` as the host will at load
/// (a bad value names its setting), before anything is built or started.
pub fn check_host_overrides(settings: &[(String, String)]) -> Result<()> {
    let stub = serde_json::json!({ "version": "2.0", "customHandler": { "description": { "defaultExecutablePath": "handler" } } });
    let settings: BTreeMap<String, String> = settings.iter().cloned().collect();
    HostSettings::read(&HostJson::with_overrides(stub, &settings)?, true).map(|_| ())
}

impl FunctionApp {
    pub fn load(root: &Path) -> Result<FunctionApp> {
        let host_path = root.join("host.json");
        let host: Value = serde_json::from_slice(&std::fs::read(&host_path).with_context(|| format!("reading {}", host_path.display()))?)
            .with_context(|| format!("{} is not JSON", host_path.display()))?;
        let (settings, strict_outputs) = match std::fs::read(root.join("local.settings.json")) {
            Ok(b) => {
                let v: Value = serde_json::from_slice(&b).context("local.settings.json is not JSON")?;
                let values = get_ci(&v, "Values")
                    .and_then(Value::as_object)
                    .map(|o| o.iter().map(|(k, v)| (k.clone(), v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string()))).collect())
                    .unwrap_or_default();
                let strict = get_ci(&v, "Host").and_then(|h| get_ci(h, "StrictOutputs")).and_then(Value::as_bool).unwrap_or(true);
                (values, strict)
            }
            Err(_) => (BTreeMap::new(), true),
        };
        // App settings `AzureFunctionsJobHost__path__to__setting` override host.json (host_json.rs).
        let host = HostJson::with_overrides(host, &settings)?;
        let host_settings = HostSettings::read(&host, strict_outputs)?;
        if !host.overrides().is_empty() {
            tracing::info!(target: "host", "host.json values overridden by app settings: {}", host.overrides().join(", "));
        }
        let mut functions = Vec::new();
        let mut dirs: Vec<PathBuf> =
            std::fs::read_dir(root)?.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.join("function.json").is_file()).collect();
        dirs.sort();
        for dir in dirs {
            let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let fj: Value = serde_json::from_slice(&std::fs::read(dir.join("function.json"))?)
                .with_context(|| format!("{name}/function.json is not JSON"))?;
            functions.push(parse_function(&name, &fj, &settings, &host_settings).with_context(|| format!("{name}/function.json"))?);
        }
        if functions.is_empty() {
            bail!("no */function.json under {}", root.display());
        }
        Ok(FunctionApp { root: root.to_path_buf(), host: host_settings, functions, settings })
    }
}

/// Replace `%NAME%` with the app setting (the host's binding-expression resolver).
pub fn resolve(s: &str, settings: &BTreeMap<String, String>) -> Result<String> {
    let mut out = String::new();
    let mut rest = s;
    while let Some(start) = rest.find('%') {
        let after = &rest[start + 1..];
        let end = after.find('%').ok_or_else(|| anyhow!("unclosed % in `{s}`"))?;
        let key = &after[..end];
        // From the app settings only, as in Azure (the host's configuration is the app's
        // environment), never from whoever started the local host. The message is the host's
        // (azure-webjobs-sdk, NameResolverExtensions.cs): there the function is in error.
        let val = settings.get(key).cloned().ok_or_else(|| anyhow!("'%{key}%' does not resolve to a value: no app setting {key}"))?;
        out.push_str(&rest[..start]);
        out.push_str(&val);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn parse_function(name: &str, fj: &Value, settings: &BTreeMap<String, String>, host: &HostSettings) -> Result<Function> {
    let bindings = get_ci(fj, "bindings").and_then(Value::as_array).ok_or_else(|| anyhow!("no bindings"))?;
    let trigger = bindings
        .iter()
        .find(|b| get_ci(b, "type").and_then(Value::as_str).is_some_and(|t| t.to_ascii_lowercase().ends_with("trigger")))
        .ok_or_else(|| anyhow!("no trigger binding"))?;
    let ty = get_ci(trigger, "type").and_then(Value::as_str).unwrap_or_default().to_ascii_lowercase();
    let binding = get_ci(trigger, "name").and_then(Value::as_str).ok_or_else(|| anyhow!("the trigger binding has no name"))?.to_string();
    let str_of = |k: &str| get_ci(trigger, k).and_then(Value::as_str).map(str::to_string);
    let trigger = match ty.as_str() {
        "httptrigger" => {
            let output = bindings
                .iter()
                .find(|b| get_ci(b, "type").and_then(Value::as_str).is_some_and(|t| t.eq_ignore_ascii_case("http")))
                .and_then(|b| get_ci(b, "name").and_then(Value::as_str).map(str::to_string));
            let methods = get_ci(trigger, "methods")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(|m| m.as_str().map(str::to_ascii_lowercase)).collect())
                .unwrap_or_default();
            let auth_level = match str_of("authLevel").as_deref().map(str::to_ascii_lowercase).as_deref() {
                Some("anonymous") => AuthLevel::Anonymous,
                Some("admin") | Some("system") => AuthLevel::Admin,
                Some("function") | None => AuthLevel::Function,
                Some(other) => bail!("unknown authLevel `{other}`"),
            };
            Trigger::Http(HttpTrigger {
                binding,
                output,
                methods,
                route: str_of("route").map(|r| r.trim_matches('/').to_string()).unwrap_or_else(|| name.to_string()),
                auth_level,
            })
        }
        "servicebustrigger" => {
            let entity = match (str_of("queueName"), str_of("topicName"), str_of("subscriptionName")) {
                (Some(q), None, _) => resolve(&q, settings)?,
                (None, Some(t), Some(s)) => format!("{}/subscriptions/{}", resolve(&t, settings)?, resolve(&s, settings)?),
                _ => bail!("a serviceBusTrigger needs queueName, or topicName and subscriptionName"),
            };
            Trigger::ServiceBus(BusTrigger {
                binding,
                entity,
                binary: str_of("dataType").is_some_and(|d| d.eq_ignore_ascii_case("binary")),
                sessions: get_ci(trigger, "isSessionsEnabled").and_then(Value::as_bool).unwrap_or(false),
                auto_complete: get_ci(trigger, "autoCompleteMessages").and_then(Value::as_bool).unwrap_or(host.auto_complete),
                connection: str_of("connection").unwrap_or_else(|| "AzureWebJobsServiceBus".into()),
            })
        }
        "timertrigger" => {
            let schedule = str_of("schedule").ok_or_else(|| anyhow!("a timerTrigger needs a schedule"))?;
            let schedule = resolve(&schedule, settings)?;
            if settings.contains_key("WEBSITE_TIME_ZONE") {
                tracing::warn!(target: "host", function = name, "WEBSITE_TIME_ZONE is set; the local host runs timers in UTC");
            }
            Trigger::Timer(TimerTrigger {
                binding,
                schedule: super::timer::Schedule::parse(&schedule).with_context(|| format!("schedule `{schedule}`"))?,
                run_on_startup: get_ci(trigger, "runOnStartup").and_then(Value::as_bool).unwrap_or(false),
                use_monitor: get_ci(trigger, "useMonitor").and_then(Value::as_bool).unwrap_or(true),
            })
        }
        other => bail!("trigger type `{other}` is not supported by the local host"),
    };
    let mut outputs = Vec::new();
    let mut has_return = false;
    for b in bindings {
        let s = |k: &str| get_ci(b, k).and_then(Value::as_str).map(str::to_string);
        if !s("direction").is_some_and(|d| d.eq_ignore_ascii_case("out")) {
            continue;
        }
        let out_name = s("name").ok_or_else(|| anyhow!("an output binding has no name"))?;
        has_return |= out_name == "$return";
        if !s("type").is_some_and(|t| t.eq_ignore_ascii_case("serviceBus")) {
            continue;
        }
        let entity = match (s("queueName"), s("topicName")) {
            (Some(q), None) => resolve(&q, settings)?,
            (None, Some(t)) => resolve(&t, settings)?,
            _ => bail!("the serviceBus output `{out_name}` needs queueName or topicName"),
        };
        outputs.push(BusOutput { name: out_name, entity, binary: s("dataType").is_some_and(|d| d.eq_ignore_ascii_case("binary")) });
    }
    Ok(Function { name: name.to_string(), trigger, outputs, has_return })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binding_expressions_resolve_from_settings() {
        let s = BTreeMap::from([("TOPIC".to_string(), "deploychain-events".to_string())]);
        assert_eq!(resolve("%TOPIC%", &s).ok().as_deref(), Some("deploychain-events"));
        assert!(resolve("%NOPE_NOT_SET_ANYWHERE%", &s).is_err());
    }
}
