//! The Bicep declares the same Service Bus entities as `infra/servicebus.json` (what the local bus
//! and the tests run on): every step subscription with its Label filter and session setting, the
//! audit subscription and the parking queue; and the function app's settings name what the
//! handler reads.
#![allow(clippy::unwrap_used)]

use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

fn repo() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize().unwrap()
}

#[test]
fn the_bicep_declares_the_entities_the_local_bus_runs_on() {
    let json: Value = serde_json::from_str(&std::fs::read_to_string(repo().join("infra/servicebus.json")).unwrap()).unwrap();
    let bicep = std::fs::read_to_string(repo().join("infra/modules/servicebus.bicep")).unwrap();
    let ns = &json["UserConfig"]["Namespaces"][0];
    let topic = &ns["Topics"][0];
    assert!(bicep.contains(&format!("var topicName = '{}'", topic["Name"].as_str().unwrap())));
    let mut steps = 0;
    for s in topic["Subscriptions"].as_array().unwrap() {
        let name = s["Name"].as_str().unwrap();
        let sessions = s["Properties"]["RequiresSession"].as_bool().unwrap_or(false);
        match s["Rules"][0]["Properties"]["CorrelationFilter"]["Label"].as_str() {
            Some(label) => {
                steps += 1;
                let line = format!("{{ name: '{name}', label: '{label}', sessions: {sessions} }}");
                assert!(bicep.contains(&line), "servicebus.bicep lacks {line}");
            }
            None => assert!(bicep.contains(&format!("name: '{name}'")), "servicebus.bicep lacks subscription {name}"),
        }
        assert_eq!(s["Properties"]["MaxDeliveryCount"], 10, "{name}");
    }
    assert_eq!(bicep.matches("{ name: 'on-").count(), steps, "no subscription the local bus lacks");
    for q in ns["Queues"].as_array().unwrap() {
        assert!(bicep.contains(&format!("name: '{}'", q["Name"].as_str().unwrap())));
    }
    assert!(bicep.contains("requiresDuplicateDetection: true") && bicep.contains("disableLocalAuth: true"));
}

/// One app setting as the Bicep declares it (scripts/bicep-app-settings.py).
#[derive(Debug, Clone)]
struct BicepSetting {
    name: String,
    /// The literal value (`${…}` interpolations kept), or None when computed.
    value: Option<String>,
    /// The main.bicep parameter that must be non-empty for the setting to be written.
    when: Option<String>,
}

/// The function app's settings as infra/ declares them, read with pycep-parser (what CI's infra
/// check parses the Bicep with; `scripts/test.sh` installs it into target/infra-tools).
fn bicep_settings() -> Vec<BicepSetting> {
    let python = repo().join("target/infra-tools/bin/python");
    assert!(python.is_file(), "{} is missing: run `bash scripts/test.sh`, which installs pycep-parser there", python.display());
    let out = std::process::Command::new(&python).arg(repo().join("scripts/bicep-app-settings.py")).current_dir(repo()).output().unwrap();
    assert!(out.status.success(), "scripts/bicep-app-settings.py: {}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let settings: Vec<BicepSetting> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| BicepSetting {
            name: e["name"].as_str().unwrap().to_string(),
            value: e["value"].as_str().map(str::to_string),
            when: e["when"].as_str().map(str::to_string),
        })
        .collect();
    let mut names: Vec<&str> = settings.iter().map(|s| s.name.as_str()).collect();
    names.sort();
    let n = names.len();
    names.dedup();
    assert_eq!(names.len(), n, "a setting is written twice: {names:?}");
    settings
}

/// What a setting holds in a deployment, as the handler sees it once App Service resolved the Key
/// Vault references: the literal values, stand-ins for the computed ones (each named here, so a new
/// computed setting needs a thought about what it holds).
fn deployed_value(s: &BicepSetting) -> String {
    match (s.name.as_str(), s.value.as_deref()) {
        (_, Some(v)) if v.starts_with("@Microsoft.KeyVault(SecretUri=${vaultUri}secrets/") => match s.name.as_str() {
            "DEPLOYCHAIN_NOTIFY_URL" => "https://prod-12.westeurope.logic.azure.com/workflows/0a1b/triggers/manual/paths/invoke".into(),
            "DEPLOYCHAIN_NOTIFY_TEAMS_URL" => "https://prod-34.westeurope.logic.azure.com/workflows/2c3d/triggers/manual/paths/invoke".into(),
            "DEPLOYCHAIN_NOTIFY_SLACK_URL" => "https://hooks.slack.com/services/T000/B000/XXXX".into(),
            "APPLICATIONINSIGHTS_CONNECTION_STRING" => {
                "InstrumentationKey=00000000-0000-0000-0000-000000000001;IngestionEndpoint=https://westeurope-5.in.applicationinsights.azure.com/".into()
            }
            "GITHUB_APP_PRIVATE_KEY" => "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\n-----END PRIVATE KEY-----".into(),
            _ => format!("a-resolved-secret-for-{}-0123456789abcdef", s.name.to_ascii_lowercase()),
        },
        ("DEPLOYCHAIN_PUBLIC_URL", Some(v)) => v.replace("${name}", "func-deploychain-abc123"),
        ("DEPLOYCHAIN_STORE", Some(v)) => v.replace("${storage.properties.primaryEndpoints.table}", "https://stdcabc123.table.core.windows.net/"),
        ("AzureWebJobsStorage__accountName", _) => "stdcabc123".into(),
        ("AzureWebJobsStorage__clientId" | "ServiceBusConnection__clientId" | "AZURE_CLIENT_ID", _) => "11111111-2222-3333-4444-555555555555".into(),
        ("ServiceBusConnection__fullyQualifiedNamespace", _) => "sb-deploychain-abc123.servicebus.windows.net".into(),
        ("GITHUB_API_URL", _) => "https://github.contoso.com/api/v3".into(),
        ("GITHUB_APP_ID", _) => "123456".into(),
        ("GITHUB_APP_INSTALLATION_ID", _) => "7890123".into(),
        ("AZURE_DEVOPS_ORG_URL", _) => "https://dev.azure.com/contoso".into(),
        ("AZURE_DEVOPS_PROJECT", _) => "platform".into(),
        ("JENKINS_URL", _) => "https://jenkins.contoso.com".into(),
        ("JENKINS_USER", _) => "deploychain".into(),
        (_, Some(v)) if !v.contains("${") => v.to_string(),
        (name, v) => panic!("{name} = {v:?}: say in deployed_value what this computed setting holds in a deployment"),
    }
}

/// Every `%NAME%` in a JSON document's strings.
fn binding_expressions(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => {
            let mut rest = s.as_str();
            while let Some(start) = rest.find('%') {
                let after = &rest[start + 1..];
                let Some(end) = after.find('%') else { break };
                out.push(after[..end].to_string());
                rest = &after[end + 1..];
            }
        }
        Value::Array(a) => a.iter().for_each(|x| binding_expressions(x, out)),
        Value::Object(o) => o.values().for_each(|x| binding_expressions(x, out)),
        _ => {}
    }
}

/// The `DEPLOYCHAIN_TOPIC` lesson: the local stack set a setting itself that the Bicep never set,
/// and every Service Bus function was in error in Azure. Here the settings come from the Bicep.
#[test]
fn every_binding_expression_and_every_setting_the_handler_needs_is_one_the_bicep_sets() {
    let settings = bicep_settings();
    let always: BTreeMap<String, String> =
        settings.iter().filter(|s| s.when.is_none()).map(|s| (s.name.clone(), deployed_value(s))).collect();
    let all: BTreeMap<String, String> = settings.iter().map(|s| (s.name.clone(), deployed_value(s))).collect();

    // host.json and every function.json: each %NAME% resolves, with the local host's resolver,
    // against what every deployment has.
    let mut files = vec![repo().join("host.json")];
    for e in std::fs::read_dir(repo().join("functions")).unwrap() {
        let f = e.unwrap().path().join("function.json");
        if f.is_file() {
            files.push(f);
        }
    }
    let mut seen = Vec::new();
    for f in &files {
        let doc: Value = serde_json::from_str(&std::fs::read_to_string(f).unwrap()).unwrap();
        let mut names = Vec::new();
        binding_expressions(&doc, &mut names);
        for name in names {
            let resolved = deploychain::host::app::resolve(&format!("%{name}%"), &always);
            assert!(resolved.is_ok(), "{}: %{name}% names no setting the Bicep always sets: {resolved:?}", f.display());
            seen.push(name);
        }
    }
    assert!(seen.iter().any(|n| n == "DEPLOYCHAIN_TOPIC") && seen.iter().any(|n| n == "DEPLOYCHAIN_WATCHDOG_SCHEDULE"), "{seen:?}");

    // The handler starts on what every deployment has…
    let lookup = |m: &BTreeMap<String, String>| {
        let m = m.clone();
        move |k: &str| m.get(k).cloned()
    };
    let config = deploychain_functions::config::Config::from_lookup(&lookup(&always));
    let config = config.unwrap_or_else(|e| panic!("the handler refuses the Bicep's settings:\n  {}", e.join("\n  ")));
    assert_eq!(config.topic, always["DEPLOYCHAIN_TOPIC"]);
    assert!(config.service_bus.is_some() && config.service_bus_identity.is_some(), "Service Bus through the app's identity");
    // …and, with the shipped policy, needs nothing the Bicep cannot set: what it misses are
    // settings a deployment parameter turns on.
    let policy = deploychain_functions::policy::Policy::from_toml(&std::fs::read_to_string(repo().join("policy.toml")).unwrap()).unwrap();
    if let Err(errs) = config.check_against(&policy) {
        for e in &errs {
            // An error names its setting first: `GITHUB_TOKEN: …` or `GITHUB_TOKEN (or …): …`.
            let first = e.split([':', ' ']).next().unwrap_or_default();
            let named = settings.iter().any(|s| s.when.is_some() && s.name == first);
            assert!(named, "the shipped policy needs a setting no deployment parameter sets: {e}");
        }
    }
    let config = deploychain_functions::config::Config::from_lookup(&lookup(&all)).unwrap();
    config.check_against(&policy).unwrap_or_else(|e| panic!("with every parameter given:\n  {}", e.join("\n  ")));

    // The handler reads its policy from the package's root, where `deploychain package` puts it.
    assert_eq!(always["DEPLOYCHAIN_POLICY"], "policy.toml");
    // Every secret setting is a Key Vault reference, never a value.
    for s in &settings {
        if deploychain_functions::config::SECRET_SETTINGS.contains(&s.name.as_str()) {
            let v = s.value.as_deref().unwrap_or_default();
            assert!(v.starts_with("@Microsoft.KeyVault(SecretUri="), "{} = {v}", s.name);
        }
    }
}

/// `infra/appsettings.json` and the Bicep agree: every per-deployment setting the file lists is the
/// one the Bicep computes, and every secret it lists is a parameter main.bicep can pass.
#[test]
fn the_settings_source_and_the_bicep_agree() {
    let source = deploychain::settings::SettingsSource::load(&repo()).unwrap();
    let settings = bicep_settings();
    let by_name: BTreeMap<&str, &BicepSetting> = settings.iter().map(|s| (s.name.as_str(), s)).collect();
    let bicep_always: std::collections::BTreeSet<String> = settings.iter().filter(|s| s.when.is_none()).map(|s| s.name.clone()).collect();
    assert_eq!(bicep_always, source.azure_always(), "the settings every deployment has");
    let bicep_all: std::collections::BTreeSet<String> = settings.iter().map(|s| s.name.clone()).collect();
    assert_eq!(bicep_all, source.azure_all(), "the settings a deployment can have");
    for (name, value) in &source.settings {
        assert_eq!(by_name[name.as_str()].value.as_deref(), Some(value.as_str()), "{name}");
    }
    for (name, secret) in &source.secrets {
        let s = by_name[name.as_str()];
        assert_eq!(s.when.is_none(), secret.required, "{name}: required in appsettings.json is always set in the Bicep");
        if let Some(param) = &s.when {
            assert_eq!(param, &secret.parameter, "{name}: the parameter that holds it");
        }
    }
    let bicep = std::fs::read_to_string(repo().join("infra/modules/functionapp.bicep")).unwrap();
    assert!(bicep.contains("runtime: { name: 'custom'"), "a custom handler app");
    assert!(bicep.contains("loadJsonContent('../appsettings.json')"), "the Bicep loads the source");
    // The handler's list of secret settings and the file's agree (those the Bicep can set).
    for name in source.secrets.keys() {
        assert!(deploychain_functions::config::SECRET_SETTINGS.contains(&name.as_str()), "{name} is not a secret to the handler");
    }
}

/// The local stack gives the handler the names Azure gives it; every departure is one
/// `infra/appsettings.json` lists with its reason, and anything else stops the stack.
#[test]
fn the_local_stack_departs_from_azures_settings_only_where_the_source_says_why() {
    let source = deploychain::settings::SettingsSource::load(&repo()).unwrap();
    let dir = std::env::temp_dir().join(format!("deploychain-infra-settings-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let secrets = deploychain::secrets::Secrets::load_or_create(&dir.join("secrets.json")).unwrap();
    let a: std::net::SocketAddr = "127.0.0.1:1".parse().unwrap();
    let addrs = deploychain::stack::Addrs { http: a, bus: a, notify: a, arm: a, apps: a, ci: a };
    let opts = deploychain::stack::StackOptions {
        repo: repo(),
        data_dir: dir.clone(),
        policy: repo().join("policy.toml"),
        app: deploychain::stack::AppSource::Handler(dir.join("handler")),
        http_port: 0,
        bus_port: 0,
        arm_port: 0,
        status_port: 0,
        sim: Default::default(),
        arm: Default::default(),
        watchdog: Default::default(),
        extra_settings: Vec::new(),
    };
    let local = deploychain::stack::local_settings(&opts, &secrets, addrs, &source).unwrap();
    source.check_local(&local).unwrap_or_else(|e| panic!("{}", e.join("\n")));
    for name in ["DEPLOYCHAIN_TOPIC", "DEPLOYCHAIN_PARKED_QUEUE", "DEPLOYCHAIN_POLICY", "APPROVAL_SIGNING_KEY", "DEPLOYCHAIN_PUBLIC_URL"] {
        assert!(local.contains_key(name), "{name}");
    }
    // A setting Azure never gets, one Azure always gets left out, a fixed value changed: refused.
    let mut extra = local.clone();
    extra.insert("DEPLOYCHAIN_SOMETHING_ONLY_LOCAL".into(), "1".into());
    extra.remove("DEPLOYCHAIN_TOPIC");
    extra.insert("DEPLOYCHAIN_PARKED_QUEUE".into(), "another-queue".into());
    let errs = source.check_local(&extra).unwrap_err().join("\n");
    for name in ["DEPLOYCHAIN_SOMETHING_ONLY_LOCAL", "DEPLOYCHAIN_TOPIC", "DEPLOYCHAIN_PARKED_QUEUE"] {
        assert!(errs.contains(name), "{name} in:\n{errs}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// azd deploys the zip `deploychain package` makes, as it is: a custom-language service whose
/// `dist` is that .zip (azd re-zips a folder, and before azd 1.26 wrote no file modes), packaged by
/// a service hook that runs whenever azd packages the service.
#[test]
fn azd_deploys_the_zip_deploychain_package_makes() {
    let text = std::fs::read_to_string(repo().join("azure.yaml")).unwrap();
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.starts_with('#')).collect();
    let value = |key: &str| lines.iter().find_map(|l| l.strip_prefix(&format!("{key}:")).map(str::trim)).unwrap_or_default();
    assert_eq!(value("host"), "function");
    assert_eq!(value("language"), "custom", "azd only takes a prebuilt zip for custom services");
    let dist = value("dist");
    assert!(dist.ends_with(".zip"), "dist `{dist}` is not a zip: azd would re-zip it");
    // The hook stages into --out DIR, and `deploychain package` writes DIR/functionapp.zip.
    let run = value("run");
    let out = run.split("--out").nth(1).map(str::trim).unwrap_or_default();
    assert!(run.contains("-p deploychain -- package"), "{run}");
    assert_eq!(std::path::Path::new(out).join("functionapp.zip"), std::path::Path::new(dist));
    let hooks = text.find("    hooks:").unwrap();
    assert!(text[hooks..].contains("prepackage:"), "a service hook, so `azd deploy` packages too");
}

/// `azd up` reads infra/main.parameters.json: every parameter of main.bicep is there (from the azd
/// environment), so a deployment parameter that turns a setting on can be given, and nothing is
/// there that main.bicep does not take.
#[test]
fn azd_has_every_parameter_of_main_bicep() {
    let bicep = std::fs::read_to_string(repo().join("infra/main.bicep")).unwrap();
    let mut declared: Vec<String> =
        bicep.lines().filter_map(|l| l.strip_prefix("param ").and_then(|r| r.split_whitespace().next()).map(str::to_string)).collect();
    declared.sort();
    let params: Value = serde_json::from_str(&std::fs::read_to_string(repo().join("infra/main.parameters.json")).unwrap()).unwrap();
    let mut given: Vec<String> = params["parameters"].as_object().unwrap().keys().cloned().collect();
    given.sort();
    assert_eq!(declared, given);
    for s in bicep_settings().iter().filter_map(|s| s.when.clone()) {
        let v = params["parameters"][&s]["value"].as_str().unwrap_or_default();
        assert!(v.starts_with("${") && v.ends_with('}'), "{s} comes from the azd environment: {v}");
    }
}
