//! host.json as the Functions host reads it: the file, then every app setting named
//! `AzureFunctionsJobHost__path__to__setting` overriding the value at `path.to.setting`, and each
//! value converted the way .NET's configuration binder converts it (every value is text there).
//! A value the host would refuse at start-up is refused here, naming the app setting it came from
//! (or its place in host.json).
//!
//! How Azure does it:
//! - learn.microsoft.com/azure/azure-functions/functions-host-json#override-hostjson-values: "When
//!   the runtime finds an application setting in the format `AzureFunctionsJobHost__path__to__setting`,
//!   it overrides the equivalent host.json setting located at `path.to.setting` in the JSON", a
//!   double underscore standing for each `.` of the hierarchy (also functions-app-settings,
//!   `AzureFunctionsJobHost__*`). Colons work as the delimiter on Windows only; Flex Consumption is
//!   Linux, so only `__` counts here.
//! - Azure/azure-functions-host `src/WebJobs.Script/Config/HostJsonFileConfigurationSource.cs`:
//!   host.json is flattened into configuration keys `AzureFunctionsJobHost:path:to:setting` (array
//!   items by index, every scalar as text). `ScriptHostBuilderExtensions.AddScriptHost` adds that
//!   source before `ConfigureWebJobs`, whose `TryAddDefaultConfigurationSources`
//!   (Azure/azure-webjobs-sdk `src/Microsoft.Azure.WebJobs.Host/Hosting/WebJobsHostBuilderExtensions.cs`)
//!   adds the environment variables (the app settings, `__` read as `:`) after it: the later
//!   source wins.
//! - dotnet/runtime `src/libraries/Microsoft.Extensions.Configuration/src/ConfigurationProvider.cs`:
//!   keys are compared with `StringComparer.OrdinalIgnoreCase`, so a setting matches whatever the
//!   case of its name.

use anyhow::{Result, anyhow, bail};
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::Duration;

/// The app-setting prefix that overrides host.json values (compared ignoring case).
pub const OVERRIDE_PREFIX: &str = "AzureFunctionsJobHost__";

/// host.json with the app settings' overrides applied, remembering which values they set.
#[derive(Debug, Clone)]
pub struct HostJson {
    root: Value,
    /// Lower-cased `a:b:c` path → the app setting that set it.
    overridden: BTreeMap<String, String>,
}

/// The member of `v` named `key`, ignoring case.
pub fn get_ci<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.as_object()?.iter().find(|(k, _)| k.eq_ignore_ascii_case(key)).map(|(_, v)| v)
}

fn key_of(path: &[&str]) -> String {
    path.iter().map(|p| p.to_ascii_lowercase()).collect::<Vec<_>>().join(":")
}

impl HostJson {
    /// `host` (the parsed file) with every `AzureFunctionsJobHost__…` setting of `settings`
    /// applied. Two settings naming the same value in different case are refused: the host would
    /// take one of them, and which is not defined.
    pub fn with_overrides(host: Value, settings: &BTreeMap<String, String>) -> Result<HostJson> {
        let mut root = host;
        if !root.is_object() {
            bail!("host.json must hold a JSON object");
        }
        let mut overridden: BTreeMap<String, String> = BTreeMap::new();
        for (name, value) in settings {
            if name.len() >= OVERRIDE_PREFIX.len()
                && name.is_char_boundary(OVERRIDE_PREFIX.len())
                && name[..OVERRIDE_PREFIX.len()].eq_ignore_ascii_case(OVERRIDE_PREFIX)
            {
                let path: Vec<&str> = name[OVERRIDE_PREFIX.len()..].split("__").collect();
                if path.iter().any(|p| p.is_empty()) {
                    bail!("app setting {name}: names no host.json value (`{OVERRIDE_PREFIX}path__to__setting`)");
                }
                if let Some(other) = overridden.insert(key_of(&path), name.clone()) {
                    bail!("app settings {other} and {name} override the same host.json value: keep one");
                }
                set(&mut root, &path, Value::String(value.clone())).map_err(|why| anyhow!("app setting {name}: {why}"))?;
            } else if name.len() > 22 && name.is_char_boundary(22) && name[..22].eq_ignore_ascii_case("AzureFunctionsJobHost:") {
                tracing::warn!(target: "host", "app setting {name}: a colon is a delimiter on Windows only; on Linux (Flex Consumption) it overrides nothing: write __");
            }
        }
        Ok(HostJson { root, overridden })
    }

    /// The app settings that override host.json values, by name.
    pub fn overrides(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.overridden.values().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// The value at `path` (names compared ignoring case; list items by index).
    pub fn at(&self, path: &[&str]) -> Option<&Value> {
        path.iter().try_fold(&self.root, |v, k| match v {
            Value::Array(items) => items.get(k.parse::<usize>().ok()?),
            _ => get_ci(v, k),
        })
    }

    /// Where the value at `path` comes from, for messages: the app setting that set it, or its
    /// place in host.json.
    pub fn origin(&self, path: &[&str]) -> String {
        match self.overridden.get(&key_of(path)) {
            Some(name) => format!("app setting {name}"),
            None => format!("host.json {}", path.join(".")),
        }
    }

    /// The value at `path` as the configuration system holds it: text (`None`: absent or null).
    pub fn text(&self, path: &[&str]) -> Result<Option<String>> {
        match self.at(path) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(Value::Number(n)) => Ok(Some(n.to_string())),
            Some(Value::Bool(b)) => Ok(Some(b.to_string())),
            Some(_) => bail!("{}: must be a value, not an object or a list", self.origin(path)),
        }
    }

    /// A TimeSpan value (.NET `TimeSpan.Parse`, invariant culture); negative ones are refused.
    pub fn timespan(&self, path: &[&str]) -> Result<Option<Duration>> {
        let Some(t) = self.text(path)? else { return Ok(None) };
        if t.trim_start().starts_with('-') {
            bail!("{}: `{t}` is negative", self.origin(path));
        }
        parse_timespan(&t).map(Some).ok_or_else(|| anyhow!("{}: `{t}` is not a TimeSpan like 00:05:00", self.origin(path)))
    }

    /// A whole number (.NET `int.Parse`); at least `min`.
    pub fn number(&self, path: &[&str], min: i64) -> Result<Option<u64>> {
        let Some(t) = self.text(path)? else { return Ok(None) };
        let n: i64 = t.trim().parse().map_err(|_| anyhow!("{}: `{t}` is not a whole number", self.origin(path)))?;
        if n < min {
            bail!("{}: {n} is below {min}, the least the host accepts", self.origin(path));
        }
        Ok(u64::try_from(n).ok())
    }

    /// `true` or `false`, any case (.NET `bool.Parse`).
    pub fn flag(&self, path: &[&str]) -> Result<Option<bool>> {
        let Some(t) = self.text(path)? else { return Ok(None) };
        match t.trim() {
            v if v.eq_ignore_ascii_case("true") => Ok(Some(true)),
            v if v.eq_ignore_ascii_case("false") => Ok(Some(false)),
            _ => bail!("{}: `{t}` is neither true nor false", self.origin(path)),
        }
    }

    /// A list of texts (host.json array; an override sets one item by its index).
    pub fn texts(&self, path: &[&str]) -> Result<Vec<String>> {
        match self.at(path) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(items)) => {
                let mut out = Vec::with_capacity(items.len());
                for i in 0..items.len() {
                    let index = i.to_string();
                    let mut item_path = path.to_vec();
                    item_path.push(&index);
                    if let Some(t) = self.text(&item_path)? {
                        out.push(t);
                    }
                }
                Ok(out)
            }
            Some(_) => bail!("{}: must be a list", self.origin(path)),
        }
    }
}

/// Set `path` (names matched ignoring case; missing objects created with the setting's spelling)
/// to `value`. Array items are addressed by index, as the host flattens arrays.
fn set(node: &mut Value, path: &[&str], value: Value) -> Result<(), String> {
    let Some((first, rest)) = path.split_first() else {
        return Err("names no host.json value".into());
    };
    match node {
        Value::Object(members) => {
            let key = members.keys().find(|k| k.eq_ignore_ascii_case(first)).cloned().unwrap_or_else(|| first.to_string());
            if rest.is_empty() {
                if members.get(&key).is_some_and(|v| v.is_object() || v.is_array()) {
                    return Err(format!("host.json has an object or a list at `{key}`, not a value to replace"));
                }
                members.insert(key, value);
                return Ok(());
            }
            // A missing list is made a list when the setting addresses an item by index.
            let child = members.entry(key).or_insert_with(|| empty_for(rest[0]));
            if !(child.is_object() || child.is_array()) {
                return Err(format!("host.json has a value at `{first}`, not an object holding `{}`", rest.join(".")));
            }
            set(child, rest, value)
        }
        Value::Array(items) => {
            let i: usize = first.parse().map_err(|_| format!("`{first}` is not an index into a list"))?;
            if i > items.len() {
                return Err(format!("index {i} is past the end of a list of {}", items.len()));
            }
            if i == items.len() {
                items.push(rest.first().map_or(Value::Null, |next| empty_for(next)));
            }
            if rest.is_empty() {
                if items[i].is_object() || items[i].is_array() {
                    return Err(format!("item {i} is an object or a list, not a value to replace"));
                }
                items[i] = value;
                return Ok(());
            }
            set(&mut items[i], rest, value)
        }
        _ => Err("host.json has a value where the path needs an object".into()),
    }
}

/// An empty container for what `next` addresses: a list for an index, else an object.
fn empty_for(next: &str) -> Value {
    if next.parse::<usize>().is_ok() { Value::Array(Vec::new()) } else { Value::Object(Default::default()) }
}

/// A .NET TimeSpan as `TimeSpan.Parse` reads it (invariant culture), not negative: `d`,
/// `[d.]hh:mm`, `[d.]hh:mm:ss[.fffffff]` or `d:hh:mm:ss[.fffffff]`, hours below 24, minutes and
/// seconds below 60 (`00:00:60` is refused, as .NET refuses it).
pub fn parse_timespan(s: &str) -> Option<Duration> {
    fn digits(t: &str) -> Option<u64> {
        if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        t.parse().ok()
    }
    fn below(t: &str, limit: u64) -> Option<u64> {
        digits(t).filter(|v| *v < limit)
    }
    let s = s.trim();
    let parts: Vec<&str> = s.split(':').collect();
    let (days, hours, minutes, seconds) = match parts.as_slice() {
        [d] => return Duration::from_secs(digits(d)?).checked_mul(86_400),
        [dh, m] | [dh, m, _] => {
            let (d, h) = match dh.split_once('.') {
                Some((d, h)) => (digits(d)?, h),
                None => (0, *dh),
            };
            (d, below(h, 24)?, below(m, 60)?, parts.get(2).copied())
        }
        [d, h, m, sec] => (digits(d)?, below(h, 24)?, below(m, 60)?, Some(*sec)),
        _ => return None,
    };
    let mut total = Duration::from_secs(days.checked_mul(86_400)?.checked_add(hours * 3600 + minutes * 60)?);
    if let Some(sec) = seconds {
        let (whole, fraction) = match sec.split_once('.') {
            Some((w, f)) => (w, Some(f)),
            None => (sec, None),
        };
        total += Duration::from_secs(below(whole, 60)?);
        if let Some(f) = fraction {
            if f.len() > 7 {
                return None;
            }
            let ticks = digits(f)? * 10u64.pow(7 - f.len() as u32);
            total += Duration::from_nanos(ticks * 100);
        }
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn settings(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn timespans_parse_as_dotnet_parses_them() {
        assert_eq!(parse_timespan("00:10:00"), Some(Duration::from_secs(600)));
        assert_eq!(parse_timespan("1.00:00:01"), Some(Duration::from_secs(86_401)));
        assert_eq!(parse_timespan("00:00:00.5"), Some(Duration::from_millis(500)));
        assert_eq!(parse_timespan("00:05"), Some(Duration::from_secs(300)), "hh:mm");
        assert_eq!(parse_timespan("6"), Some(Duration::from_secs(6 * 86_400)), "a lone number is days");
        assert_eq!(parse_timespan("1:02:03:04"), Some(Duration::from_secs(86_400 + 2 * 3600 + 3 * 60 + 4)));
        assert_eq!(parse_timespan(" 00:00:06 "), Some(Duration::from_secs(6)));
        for bad in ["ten", "00:00:60", "24:00:00", "00:60:00", "", "1.5", "00:00:00.12345678", "-00:00:01", "0:0:0:0:0"] {
            assert_eq!(parse_timespan(bad), None, "{bad}");
        }
    }

    #[test]
    fn overrides_replace_and_add_values_whatever_the_case_of_their_names() {
        let host = json!({ "functionTimeout": "00:10:00", "extensions": { "serviceBus": { "maxConcurrentCalls": 32 } } });
        let h = HostJson::with_overrides(
            host,
            &settings(&[
                ("azurefunctionsjobhost__FUNCTIONTIMEOUT", "00:00:06"),
                ("AzureFunctionsJobHost__extensions__servicebus__maxAutoLockRenewalDuration", "00:00:07"),
                ("AzureFunctionsJobHost__extensions__serviceBus__maxConcurrentCalls", "4"),
                ("OTHER", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(h.timespan(&["functionTimeout"]).unwrap(), Some(Duration::from_secs(6)));
        assert_eq!(h.timespan(&["extensions", "serviceBus", "maxAutoLockRenewalDuration"]).unwrap(), Some(Duration::from_secs(7)));
        assert_eq!(h.number(&["extensions", "serviceBus", "maxConcurrentCalls"], 1).unwrap(), Some(4));
        assert_eq!(h.origin(&["functionTimeout"]), "app setting azurefunctionsjobhost__FUNCTIONTIMEOUT");
        assert_eq!(h.origin(&["version"]), "host.json version");
    }

    #[test]
    fn bad_values_name_the_setting_they_came_from() {
        let h = HostJson::with_overrides(json!({}), &settings(&[("AzureFunctionsJobHost__functionTimeout", "soon")])).unwrap();
        let e = h.timespan(&["functionTimeout"]).unwrap_err().to_string();
        assert!(e.contains("AzureFunctionsJobHost__functionTimeout") && e.contains("soon"), "{e}");
        let h = HostJson::with_overrides(json!({ "extensions": { "serviceBus": { "maxConcurrentCalls": 0 } } }), &BTreeMap::new()).unwrap();
        let e = h.number(&["extensions", "serviceBus", "maxConcurrentCalls"], 1).unwrap_err().to_string();
        assert!(e.contains("host.json extensions.serviceBus.maxConcurrentCalls"), "{e}");
        let twice =
            settings(&[("AzureFunctionsJobHost__functionTimeout", "00:00:05"), ("AzureFunctionsJobHost__FunctionTimeout", "00:00:06")]);
        assert!(HostJson::with_overrides(json!({}), &twice).is_err());
        let nothing = settings(&[("AzureFunctionsJobHost__", "x")]);
        assert!(HostJson::with_overrides(json!({}), &nothing).is_err());
        let into_object = settings(&[("AzureFunctionsJobHost__extensions", "x")]);
        assert!(HostJson::with_overrides(json!({ "extensions": {} }), &into_object).is_err());
    }

    #[test]
    fn list_items_are_overridden_by_index() {
        let host = json!({ "customHandler": { "description": { "arguments": ["a", "b"] } } });
        let h =
            HostJson::with_overrides(host, &settings(&[("AzureFunctionsJobHost__customHandler__description__arguments__1", "c")])).unwrap();
        assert_eq!(h.texts(&["customHandler", "description", "arguments"]).unwrap(), ["a", "c"]);
        let h = HostJson::with_overrides(json!({}), &settings(&[("AzureFunctionsJobHost__customHandler__description__arguments__0", "x")]))
            .unwrap();
        assert_eq!(h.texts(&["customHandler", "description", "arguments"]).unwrap(), ["x"], "a missing list is made");
    }
}
