//! The local stack's own settings: `deploychain.local.toml` in the repository root (optional).
//!
//! ```toml
//! [simulators]
//! build_delay = "2s"            # how long a simulated CI build takes
//! image_delay = "2s"            # how long a simulated image bake / registry push takes
//! failing_builds = ["dead"]     # commit prefixes whose builds fail
//! failing_targets = ["web-prod"] # scale sets (name parts) whose health check fails and roll back
//! ```

use anyhow::{Context, Result, anyhow};
use serde::Deserialize;
use std::path::Path;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct SimConfig {
    pub build_delay: Duration,
    pub image_delay: Duration,
    pub failing_builds: Vec<String>,
    pub failing_targets: Vec<String>,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            build_delay: Duration::from_secs(2),
            image_delay: Duration::from_secs(2),
            failing_builds: Vec::new(),
            failing_targets: Vec::new(),
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    simulators: Option<SimFile>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct SimFile {
    build_delay: Option<String>,
    image_delay: Option<String>,
    #[serde(default)]
    failing_builds: Vec<String>,
    #[serde(default)]
    failing_targets: Vec<String>,
}

/// `250ms`, `2s`, `1m`.
pub fn parse_delay(s: &str) -> Option<Duration> {
    let s = s.trim();
    if let Some(ms) = s.strip_suffix("ms") {
        return ms.parse().ok().map(Duration::from_millis);
    }
    if let Some(v) = s.strip_suffix('s') {
        return v.parse::<f64>().ok().filter(|v| *v >= 0.0).map(Duration::from_secs_f64);
    }
    if let Some(v) = s.strip_suffix('m') {
        return v.parse::<u64>().ok().map(|m| Duration::from_secs(m * 60));
    }
    None
}

impl SimConfig {
    pub fn load(path: &Path) -> Result<SimConfig> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(_) => return Ok(SimConfig::default()),
        };
        let f: File = toml::from_str(&text).with_context(|| format!("{}", path.display()))?;
        let s = f.simulators.unwrap_or_default();
        let d = SimConfig::default();
        let delay = |v: Option<String>, key: &str, default: Duration| -> Result<Duration> {
            match v {
                None => Ok(default),
                Some(v) => parse_delay(&v)
                    .ok_or_else(|| anyhow!("{}: simulators.{key}: `{v}` is not a delay like 500ms, 2s or 1m", path.display())),
            }
        };
        Ok(SimConfig {
            build_delay: delay(s.build_delay, "build_delay", d.build_delay)?,
            image_delay: delay(s.image_delay, "image_delay", d.image_delay)?,
            failing_builds: s.failing_builds,
            failing_targets: s.failing_targets,
        })
    }
}
