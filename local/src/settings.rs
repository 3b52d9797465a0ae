//! The handler's app settings, from the one source Azure's are made from: `infra/appsettings.json`,
//! which `infra/modules/functionapp.bicep` loads with `loadJsonContent` (decision 0021). The local
//! stack gives the handler the same setting names with local values; where it departs from Azure
//! — platform services it stands in for, such as managed identity — the file's `local` section
//! names the setting and says why, and [`SettingsSource::check_local`] refuses anything else. So a
//! setting the Bicep does not set is missing locally too.

use anyhow::{Context, Result, anyhow};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// `infra/appsettings.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct SettingsSource {
    /// Fixed values, the same in every deployment.
    pub settings: BTreeMap<String, String>,
    pub deployment: Deployment,
    /// Secret settings: each a Key Vault reference in Azure.
    pub secrets: BTreeMap<String, SecretSetting>,
    pub local: LocalDepartures,
}

/// Settings the Bicep computes per deployment (name → what it holds).
#[derive(Debug, Clone, Deserialize)]
pub struct Deployment {
    pub always: BTreeMap<String, String>,
    pub optional: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct SecretSetting {
    /// The Key Vault secret's name.
    pub secret: String,
    /// The Bicep parameter that holds its value.
    pub parameter: String,
    /// Set in every deployment (else only when its parameter is given).
    pub required: bool,
}

/// Where the local stack departs from Azure (setting → why).
#[derive(Debug, Clone, Deserialize)]
pub struct LocalDepartures {
    /// Azure settings the local stack leaves out: a local stand-in replaces them.
    pub replaced: BTreeMap<String, String>,
    /// Settings only the local stack sets.
    pub added: BTreeMap<String, String>,
    /// Fixed settings whose local value differs.
    pub changed: BTreeMap<String, String>,
}

/// Keys beginning with `$` are notes for readers (`$comment`), not settings.
fn strip_notes(v: &mut serde_json::Value) {
    if let serde_json::Value::Object(o) = v {
        o.retain(|k, _| !k.starts_with('$'));
        o.values_mut().for_each(strip_notes);
    }
}

impl SettingsSource {
    pub fn path(repo: &Path) -> std::path::PathBuf {
        repo.join("infra").join("appsettings.json")
    }

    pub fn load(repo: &Path) -> Result<SettingsSource> {
        let path = Self::path(repo);
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let mut v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
        strip_notes(&mut v);
        serde_json::from_value(v).with_context(|| format!("{} is not the app settings source", path.display()))
    }

    /// The settings every Azure deployment has: the fixed ones, the per-deployment ones the Bicep
    /// always computes, the required secrets.
    pub fn azure_always(&self) -> BTreeSet<String> {
        self.settings
            .keys()
            .chain(self.deployment.always.keys())
            .chain(self.secrets.iter().filter(|(_, s)| s.required).map(|(k, _)| k))
            .cloned()
            .collect()
    }

    /// Every setting an Azure deployment can have (the optional ones when their parameter is given).
    pub fn azure_all(&self) -> BTreeSet<String> {
        self.azure_always().into_iter().chain(self.deployment.optional.keys().cloned()).chain(self.secrets.keys().cloned()).collect()
    }

    /// Check the settings the local stack gives the handler: every setting Azure always has is
    /// there unless `local.replaced` says what stands in for it; nothing is there that Azure cannot
    /// have unless `local.added` says why; fixed values are Azure's unless `local.changed` says why.
    pub fn check_local(&self, local: &BTreeMap<String, String>) -> Result<(), Vec<String>> {
        let mut errs = Vec::new();
        for name in self.azure_always() {
            match (local.contains_key(&name), self.local.replaced.contains_key(&name)) {
                (false, false) => errs.push(format!(
                    "{name}: Azure sets it, the local stack does not (and infra/appsettings.json local.replaced does not say why)"
                )),
                (true, true) => errs.push(format!("{name}: listed in local.replaced, but the local stack sets it")),
                _ => {}
            }
        }
        let azure = self.azure_all();
        for name in local.keys() {
            if !azure.contains(name) && !self.local.added.contains_key(name) {
                errs.push(format!("{name}: the local stack sets it, Azure never does (add it to infra/appsettings.json, or to local.added with the reason)"));
            }
        }
        for (name, value) in &self.settings {
            if let Some(v) = local.get(name).filter(|v| *v != value && !self.local.changed.contains_key(name)) {
                errs.push(format!("{name}: `{v}` locally, `{value}` in Azure (infra/appsettings.json local.changed does not say why)"));
            }
        }
        for name in self.local.added.keys() {
            if azure.contains(name) {
                errs.push(format!("{name}: in local.added, but Azure sets it too"));
            }
        }
        if errs.is_empty() { Ok(()) } else { Err(errs) }
    }

    /// Start the local settings from the source: the fixed values (but those `local.replaced`
    /// leaves out), with the local value of each `local.changed` one taken from `changed`.
    pub fn local_base(&self, changed: &BTreeMap<&str, String>) -> Result<BTreeMap<String, String>> {
        let mut out = BTreeMap::new();
        for (name, value) in self.settings.iter().filter(|(n, _)| !self.local.replaced.contains_key(*n)) {
            let v = match (self.local.changed.contains_key(name), changed.get(name.as_str())) {
                (true, Some(v)) => v.clone(),
                (true, None) => return Err(anyhow!("{name}: local.changed lists it, the local stack gives no value")),
                (false, _) => value.clone(),
            };
            out.insert(name.clone(), v);
        }
        Ok(out)
    }
}
