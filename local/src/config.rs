//! The local stack's own settings: `deploychain.local.toml` in the repository root (optional).
//!
//! ```toml
//! [simulators]
//! build_delay = "2s"              # how long a simulated CI build takes
//! image_delay = "2s"              # how long a simulated image bake / registry push takes
//! failing_builds = ["dead"]       # commit prefixes whose builds fail
//! unhealthy_images = ["bad"]      # commit prefixes whose baked image fails its health probe
//! failing_targets = ["web-prod"]  # scale sets (name parts) unhealthy on any new image: rolled back
//!
//! [arm]                           # the local ARM endpoint's simulated scale sets
//! instances = 2                   # instances per scale set
//! upgrade_time = "1s"             # how long an instance takes to take a new model
//! operation_time = "300ms"        # how long a model update takes
//! health_delay = "500ms"          # how long an upgraded instance reports "initializing"
//! rolling = ["web-prod"]          # scale sets (name parts) with a Rolling upgrade policy
//! automatic = []                  # … with an Automatic one (the rest are Manual)
//! failing_checks = ["web-staging"] # scale sets whose app fails the acceptance checks
//! poll_interval = "200ms"         # the handler's pause between ARM polls
//! health_timeout = "15s"          # how long the handler waits for a batch to become healthy
//!
//! [watchdog]                      # flags runs that stopped making progress
//! schedule = "*/30 * * * * *"     # NCRONTAB, seconds first
//! stuck_after = "10m,approval=off" # DEPLOYCHAIN_STUCK_AFTER: a duration, then kind=duration|off
//!
//! [[arm.faults]]                  # injected faults, each for the first matching request(s)
//! method = "PATCH"                # and the path ends with:
//! path = "web-staging"
//! status = 429                    # answer this status with ARM's error body …
//! code = "TooManyRequests"
//! retry_after = "2s"              # … and Retry-After
//! times = 1                       # how many matching requests (default 1), after `skip` (default 0)
//! # instead of status: delay = "90s" (hold the answer), operation = "Failed" (its long-running
//! # operation ends Failed with code/message), concurrent_write = true (the ETag moves first)
//!
//! [settings]                      # app settings added to the function app's, as an operator adds them
//! # Azure's limits at a smaller scale: app settings named AzureFunctionsJobHost__path__to__setting
//! # override host.json values, locally as in Azure (learn.microsoft.com/azure/azure-functions/
//! # functions-host-json#override-hostjson-values)
//! AzureFunctionsJobHost__functionTimeout = "00:00:06"
//! AzureFunctionsJobHost__extensions__serviceBus__maxAutoLockRenewalDuration = "00:00:06"
//! ```
//!
//! `deploychain up --config PATH` reads another file instead (which must exist).

use crate::arm::{ArmSimConfig, Fault, FaultAction};
use anyhow::{Context, Result, anyhow, bail};
use serde::Deserialize;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct SimConfig {
    pub build_delay: Duration,
    pub image_delay: Duration,
    pub failing_builds: Vec<String>,
    /// Commit prefixes whose baked image fails its health probe on the scale sets.
    pub unhealthy_images: Vec<String>,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            build_delay: Duration::from_secs(2),
            image_delay: Duration::from_secs(2),
            failing_builds: Vec::new(),
            unhealthy_images: Vec::new(),
        }
    }
}

/// The watchdog's settings for the local stack (`[watchdog]`): its NCRONTAB schedule and
/// `DEPLOYCHAIN_STUCK_AFTER`.
#[derive(Debug, Clone)]
pub struct WatchdogConfig {
    pub schedule: String,
    pub stuck_after: String,
}

impl Default for WatchdogConfig {
    fn default() -> Self {
        WatchdogConfig { schedule: "*/30 * * * * *".into(), stuck_after: "10m,approval=off".into() }
    }
}

/// Everything `deploychain.local.toml` says.
#[derive(Debug, Clone, Default)]
pub struct LocalConfig {
    pub sim: SimConfig,
    pub arm: ArmSimConfig,
    pub watchdog: WatchdogConfig,
    /// `[settings]`: app settings added to the function app's (after the stack's own, so they
    /// win), in name order. `AzureFunctionsJobHost__…` ones override host.json as in Azure.
    pub settings: Vec<(String, String)>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    simulators: Option<SimFile>,
    #[serde(default)]
    arm: Option<ArmFile>,
    #[serde(default)]
    watchdog: Option<WatchdogFile>,
    #[serde(default)]
    settings: BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct WatchdogFile {
    schedule: Option<String>,
    stuck_after: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct SimFile {
    build_delay: Option<String>,
    image_delay: Option<String>,
    #[serde(default)]
    failing_builds: Vec<String>,
    #[serde(default)]
    unhealthy_images: Vec<String>,
    #[serde(default)]
    failing_targets: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ArmFile {
    instances: Option<usize>,
    upgrade_time: Option<String>,
    operation_time: Option<String>,
    health_delay: Option<String>,
    poll_interval: Option<String>,
    health_timeout: Option<String>,
    #[serde(default)]
    rolling: Vec<String>,
    #[serde(default)]
    automatic: Vec<String>,
    #[serde(default)]
    failing_checks: Vec<String>,
    #[serde(default)]
    faults: Vec<FaultFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultFile {
    method: String,
    path: String,
    status: Option<u16>,
    code: Option<String>,
    message: Option<String>,
    retry_after: Option<String>,
    delay: Option<String>,
    operation: Option<String>,
    #[serde(default)]
    concurrent_write: bool,
    times: Option<u32>,
    skip: Option<u32>,
}

/// `250ms`, `2s`, `1.5s`, `1m`, `0s`.
pub fn parse_delay(s: &str) -> Option<Duration> {
    let s = s.trim();
    if let Some(ms) = s.strip_suffix("ms") {
        return ms.parse().ok().map(Duration::from_millis);
    }
    if let Some(v) = s.strip_suffix('s') {
        return v.parse::<f64>().ok().filter(|v| *v >= 0.0 && v.is_finite()).map(Duration::from_secs_f64);
    }
    if let Some(v) = s.strip_suffix('m') {
        return v.parse::<u64>().ok().map(|m| Duration::from_secs(m * 60));
    }
    None
}

impl LocalConfig {
    /// Read `path`; a missing file is the defaults. Every error names the key.
    pub fn load(path: &Path) -> Result<LocalConfig> {
        match std::fs::read_to_string(path) {
            Ok(text) => LocalConfig::parse(path, &text),
            Err(_) => Ok(LocalConfig::default()),
        }
    }

    /// Read `path`, which must exist (`deploychain up --config PATH`).
    pub fn load_required(path: &Path) -> Result<LocalConfig> {
        let text = std::fs::read_to_string(path).with_context(|| format!("the local configuration {}", path.display()))?;
        LocalConfig::parse(path, &text)
    }

    fn parse(path: &Path, text: &str) -> Result<LocalConfig> {
        let f: File = toml::from_str(text).with_context(|| format!("{}", path.display()))?;
        let at = |key: &str| format!("{}: {key}", path.display());
        let delay = |v: &Option<String>, key: &str, default: Duration| -> Result<Duration> {
            match v {
                None => Ok(default),
                Some(v) => parse_delay(v).ok_or_else(|| anyhow!("{}: `{v}` is not a delay like 500ms, 2s or 1m", at(key))),
            }
        };
        let s = f.simulators.unwrap_or_default();
        let d = SimConfig::default();
        let sim = SimConfig {
            build_delay: delay(&s.build_delay, "simulators.build_delay", d.build_delay)?,
            image_delay: delay(&s.image_delay, "simulators.image_delay", d.image_delay)?,
            failing_builds: s.failing_builds,
            unhealthy_images: s.unhealthy_images,
        };
        let a = f.arm.unwrap_or_default();
        let d = ArmSimConfig::default();
        let mut faults = Vec::new();
        for (i, x) in a.faults.iter().enumerate() {
            faults.push(fault(x).map_err(|e| anyhow!("{}: {e}", at(&format!("arm.faults[{i}]"))))?);
        }
        let instances = a.instances.unwrap_or(d.instances);
        if !(1..=100).contains(&instances) {
            bail!("{}: must be between 1 and 100", at("arm.instances"));
        }
        let arm = ArmSimConfig {
            instances,
            upgrade_time: delay(&a.upgrade_time, "arm.upgrade_time", d.upgrade_time)?,
            operation_time: delay(&a.operation_time, "arm.operation_time", d.operation_time)?,
            health_delay: delay(&a.health_delay, "arm.health_delay", d.health_delay)?,
            poll_interval: delay(&a.poll_interval, "arm.poll_interval", d.poll_interval)?,
            health_timeout: delay(&a.health_timeout, "arm.health_timeout", d.health_timeout)?,
            rolling: a.rolling,
            automatic: a.automatic,
            failing_targets: s.failing_targets,
            failing_checks: a.failing_checks,
            faults,
            ..d
        };
        if arm.poll_interval.is_zero() || arm.health_timeout.is_zero() {
            bail!("{}: poll_interval and health_timeout must be above 0", at("arm"));
        }
        let w = f.watchdog.unwrap_or_default();
        let d = WatchdogConfig::default();
        let watchdog = WatchdogConfig { schedule: w.schedule.unwrap_or(d.schedule), stuck_after: w.stuck_after.unwrap_or(d.stuck_after) };
        let settings: Vec<(String, String)> = f.settings.into_iter().collect();
        if let Some((name, _)) = settings.iter().find(|(k, _)| k.trim().is_empty() || k.contains('=')) {
            bail!("{}: `{name}` is not an app setting name", at("settings"));
        }
        // host.json overrides are checked now, as the host checks them at start, before the
        // (long) package build.
        crate::host::app::check_host_overrides(&settings).map_err(|e| anyhow!("{}: {e:#}", at("settings")))?;
        Ok(LocalConfig { sim, arm, watchdog, settings })
    }
}

fn fault(f: &FaultFile) -> Result<Fault> {
    let method = f.method.to_ascii_uppercase();
    if !["GET", "PATCH", "POST", "PUT", "DELETE"].contains(&method.as_str()) {
        bail!("method `{}` is not an HTTP method ARM serves", f.method);
    }
    let chosen = [f.status.is_some(), f.delay.is_some(), f.operation.is_some(), f.concurrent_write].iter().filter(|b| **b).count();
    if chosen != 1 {
        bail!("give exactly one of status, delay, operation, concurrent_write");
    }
    let code = f.code.clone();
    let action = if let Some(status) = f.status {
        if !(400..=599).contains(&status) {
            bail!("status {status} is not an error status (400-599)");
        }
        let code = code.unwrap_or_else(|| if status == 429 { "TooManyRequests".into() } else { "InternalServerError".into() });
        let message = f.message.clone().unwrap_or_else(|| "injected by deploychain.local.toml".into());
        let mut headers = Vec::new();
        if let Some(r) = &f.retry_after {
            let d = parse_delay(r).ok_or_else(|| anyhow!("retry_after `{r}` is not a delay like 2s"))?;
            headers.push(("retry-after".to_string(), d.as_secs().max(1).to_string()));
        }
        FaultAction::Answer { status, headers, body: json!({ "error": { "code": code, "message": message } }) }
    } else if let Some(d) = &f.delay {
        FaultAction::Delay(parse_delay(d).ok_or_else(|| anyhow!("delay `{d}` is not a delay like 90s"))?)
    } else if let Some(op) = &f.operation {
        if !op.eq_ignore_ascii_case("failed") {
            bail!("operation = `{op}`: only \"Failed\" is injected");
        }
        FaultAction::FailOperation(json!({
            "code": code.unwrap_or_else(|| "InternalOperationError".into()),
            "message": f.message.clone().unwrap_or_else(|| "injected by deploychain.local.toml".into())
        }))
    } else {
        FaultAction::ConcurrentWrite
    };
    let mut fault = Fault::new(&method, &f.path, action).times(f.times.unwrap_or(1));
    fault.skip = f.skip.unwrap_or(0);
    Ok(fault)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<LocalConfig> {
        let dir = std::env::temp_dir().join(format!("deploychain-config-{}-{}", std::process::id(), uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir)?;
        let p = dir.join("deploychain.local.toml");
        std::fs::write(&p, text)?;
        let r = LocalConfig::load(&p);
        let _ = std::fs::remove_dir_all(&dir);
        r
    }

    #[test]
    fn faults_and_scale_sets_are_configured() {
        let c = load(
            r#"
[simulators]
unhealthy_images = ["bad"]
failing_targets = ["web-prod"]
[arm]
instances = 3
rolling = ["web-prod"]
upgrade_time = "50ms"
[[arm.faults]]
method = "patch"
path = "web-staging"
status = 429
retry_after = "2s"
times = 2
[[arm.faults]]
method = "PATCH"
path = "web-prod"
operation = "Failed"
code = "GalleryImageNotFound"
"#,
        )
        .expect("valid");
        assert_eq!(c.sim.unhealthy_images, ["bad"]);
        assert_eq!(c.arm.failing_targets, ["web-prod"]);
        assert_eq!(c.arm.instances, 3);
        assert_eq!(c.arm.upgrade_time, Duration::from_millis(50));
        assert_eq!(c.arm.faults.len(), 2);
        assert_eq!(c.arm.faults[0].times, 2);
        assert!(matches!(&c.arm.faults[0].action, FaultAction::Answer { status: 429, headers, .. } if headers[0].1 == "2"));
        assert!(matches!(&c.arm.faults[1].action, FaultAction::FailOperation(e) if e["code"] == "GalleryImageNotFound"));
    }

    #[test]
    fn settings_become_app_settings_and_host_json_overrides_are_checked() {
        let c = load(
            r#"
[settings]
AzureFunctionsJobHost__functionTimeout = "00:00:06"
AzureFunctionsJobHost__extensions__serviceBus__maxAutoLockRenewalDuration = "00:00:06"
RUST_LOG = "debug"
"#,
        )
        .expect("valid");
        assert_eq!(
            c.settings,
            [
                ("AzureFunctionsJobHost__extensions__serviceBus__maxAutoLockRenewalDuration".to_string(), "00:00:06".to_string()),
                ("AzureFunctionsJobHost__functionTimeout".to_string(), "00:00:06".to_string()),
                ("RUST_LOG".to_string(), "debug".to_string()),
            ]
        );
        assert!(load("").expect("empty").settings.is_empty());
        let e = load("[settings]\nAzureFunctionsJobHost__functionTimeout = \"six seconds\"\n")
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        assert!(
            e.contains("settings") && e.contains("app setting AzureFunctionsJobHost__functionTimeout") && e.contains("six seconds"),
            "{e}"
        );
        let e = load("[settings]\nAzureFunctionsJobHost__extensions__serviceBus__maxConcurrentCalls = \"0\"\n")
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        assert!(e.contains("maxConcurrentCalls"), "{e}");
        let e = load("[settings]\nMAX = 4\n").err().map(|e| format!("{e:#}")).unwrap_or_default();
        assert!(e.contains("MAX = 4") && e.contains("expected a string"), "app settings are text: {e}");
    }

    #[test]
    fn a_config_file_named_on_the_command_line_must_exist() {
        let missing = std::env::temp_dir().join(format!("deploychain-no-such-{}.toml", uuid::Uuid::new_v4().simple()));
        let e = LocalConfig::load_required(&missing).err().map(|e| format!("{e:#}")).unwrap_or_default();
        assert!(e.contains(&missing.display().to_string()), "{e}");
        assert!(LocalConfig::load(&missing).is_ok(), "the default file is optional");
    }

    #[test]
    fn bad_settings_name_their_key() {
        let e = load("[arm]\nupgrade_time = \"soon\"\n").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("arm.upgrade_time"), "{e}");
        let e = load("[[arm.faults]]\nmethod = \"GET\"\npath = \"x\"\nstatus = 429\ndelay = \"1s\"\n")
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        assert!(e.contains("arm.faults[0]") && e.contains("exactly one"), "{e}");
        let e = load("[arm]\ninstances = 0\n").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("arm.instances"), "{e}");
    }
}
