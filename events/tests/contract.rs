//! The contract between the Rust types, the JSON Schemas in `events/schemas/` and the samples in
//! `events/samples/`: every type has a schema and a sample, samples validate and round-trip through
//! the Rust types and the CloudEvents SDK, events built in Rust validate, and the schemas are strict.

use chrono::{DateTime, Utc};
use deploychain_events::*;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

const SCHEMA_DIALECT: &str = "https://json-schema.org/draft/2020-12/schema";

fn dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(name)
}

fn file_names(folder: &str) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir(folder))
        .unwrap_or_else(|e| panic!("cannot list events/{folder}: {e}"))
        .map(|entry| entry.expect("directory entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn read_json(path: &Path) -> Value {
    let bytes = fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

fn schema_path(ty: EventType) -> PathBuf {
    dir("schemas").join(format!("{}.schema.json", ty.short_name()))
}

fn schema(ty: EventType) -> Value {
    read_json(&schema_path(ty))
}

/// Formats are asserted (not only annotations), as a strict consumer would.
fn validator(ty: EventType) -> jsonschema::Validator {
    jsonschema::draft202012::options()
        .should_validate_formats(true)
        .build(&schema(ty))
        .unwrap_or_else(|e| panic!("schema of {ty} does not compile: {e}"))
}

/// Every validation error of `instance`, one line each.
fn errors(validator: &jsonschema::Validator, instance: &Value) -> Vec<String> {
    validator.iter_errors(instance).map(|e| format!("{} at `{}` (schema `{}`)", e, e.instance_path, e.schema_path)).collect()
}

/// The event type a sample file is for, from its name: `<short_name>.json` or `<short_name>.<variant>.json`.
/// The longest matching short name wins, so the mapping is unambiguous.
fn type_of_sample_name(name: &str) -> Option<EventType> {
    EventType::ALL
        .into_iter()
        .filter(|t| {
            name == format!("{}.json", t.short_name()) || (name.starts_with(&format!("{}.", t.short_name())) && name.ends_with(".json"))
        })
        .max_by_key(|t| t.short_name().len())
}

/// Every sample: (file name, type by file name, parsed JSON, raw bytes). Files that are not named
/// after a type are reported by `every_type_has_a_schema_and_a_sample`.
fn samples() -> Vec<(String, EventType, Value, Vec<u8>)> {
    file_names("samples")
        .into_iter()
        .filter_map(|name| {
            let ty = type_of_sample_name(&name)?;
            let path = dir("samples").join(&name);
            let bytes = fs::read(&path).unwrap_or_else(|e| panic!("cannot read samples/{name}: {e}"));
            let value = serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("samples/{name} is not JSON: {e}"));
            Some((name, ty, value, bytes))
        })
        .collect()
}

#[test]
fn every_type_has_a_schema_and_a_sample() {
    let mut problems = Vec::new();

    // Schemas: exactly one per type, well-formed 2020-12, self-describing.
    let expected: Vec<String> = EventType::ALL.iter().map(|t| format!("{}.schema.json", t.short_name())).collect();
    for name in file_names("schemas") {
        if !expected.contains(&name) {
            problems.push(format!("schemas/{name}: stray file (not `<short_name>.schema.json` of any event type)"));
        }
    }
    for ty in EventType::ALL {
        let path = schema_path(ty);
        if !path.is_file() {
            problems.push(format!("{ty}: missing schemas/{}.schema.json", ty.short_name()));
            continue;
        }
        let s = read_json(&path);
        if let Err(e) = jsonschema::draft202012::meta::validate(&s) {
            problems.push(format!("schemas/{}.schema.json is not a valid 2020-12 schema: {e}", ty.short_name()));
        }
        // Compiling resolves every $ref, so a dangling one fails here.
        if let Err(e) = jsonschema::draft202012::options().should_validate_formats(true).build(&s) {
            problems.push(format!("schemas/{}.schema.json does not compile: {e}", ty.short_name()));
        }
        if s["$schema"] != SCHEMA_DIALECT {
            problems.push(format!("schemas/{}.schema.json: `$schema` must be {SCHEMA_DIALECT}", ty.short_name()));
        }
        let id = format!("https://deploychain.dev/schemas/{}.schema.json", ty.short_name());
        if s["$id"] != id.as_str() {
            problems.push(format!("schemas/{}.schema.json: `$id` must be {id}", ty.short_name()));
        }
        if !s["title"].is_string() || !s["description"].is_string() {
            problems.push(format!("schemas/{}.schema.json: needs a title and a description", ty.short_name()));
        }
        if s["properties"]["type"]["const"] != ty.as_str() {
            problems.push(format!("schemas/{}.schema.json: `type` must be const {ty}", ty.short_name()));
        }
        // Self-contained: the only references are to the schema's own $defs.
        let text = s.to_string();
        for (i, _) in text.match_indices("\"$ref\":") {
            if !text[i..].starts_with("\"$ref\":\"#/$defs/") {
                problems.push(format!("schemas/{}.schema.json: external or non-$defs $ref", ty.short_name()));
            }
        }
    }

    // Samples: at least one per type, named after it and carrying its type; nothing else in the folder.
    let mut per_type: BTreeMap<&str, usize> = BTreeMap::new();
    for name in file_names("samples") {
        let Some(ty) = type_of_sample_name(&name) else {
            problems.push(format!("samples/{name}: stray file (must be `<short_name>.json` or `<short_name>.<variant>.json`)"));
            continue;
        };
        let v = read_json(&dir("samples").join(&name));
        if v["type"] != ty.as_str() {
            problems.push(format!("samples/{name}: `type` is {} but the file name says {ty}", v["type"]));
            continue;
        }
        *per_type.entry(ty.as_str()).or_default() += 1;
    }
    for ty in EventType::ALL {
        if !per_type.contains_key(ty.as_str()) {
            problems.push(format!("{ty}: no sample in samples/ (expected samples/{}.json)", ty.short_name()));
        }
    }

    assert!(problems.is_empty(), "event catalogue problems:\n  {}", problems.join("\n  "));
}

#[test]
fn every_sample_validates_against_its_schema() {
    let mut failures = Vec::new();
    for (name, ty, value, _) in samples() {
        for e in errors(&validator(ty), &value) {
            failures.push(format!("samples/{name}: {e}"));
        }
    }
    assert!(failures.is_empty(), "samples that do not match their schema:\n  {}", failures.join("\n  "));
}

#[test]
fn every_sample_round_trips_through_rust_types_and_the_sdk() {
    let mut failures = Vec::new();
    for (name, ty, value, bytes) in samples() {
        let event = match DeployEvent::from_json_bytes(&bytes) {
            Ok(ev) => ev,
            Err(e) => {
                failures.push(format!("samples/{name}: DeployEvent::from_json_bytes: {e}"));
                continue;
            }
        };
        if event.event_type() != ty {
            failures.push(format!("samples/{name}: parsed as {} instead of {ty}", event.event_type()));
        }
        // What deploychain would write for this event is exactly the sample.
        let written: Value = serde_json::from_slice(&event.to_json_bytes()).expect("to_json_bytes writes JSON");
        if written != value {
            failures.push(format!("samples/{name}: to_json_bytes differs from the sample\n    sample:  {value}\n    written: {written}"));
        }
        // The CloudEvents SDK reads the sample to the same event.
        match serde_json::from_slice::<cloudevents::Event>(&bytes) {
            Ok(ce) => match DeployEvent::from_cloudevent(&ce) {
                Ok(via_sdk) if via_sdk == event => {}
                Ok(via_sdk) => failures.push(format!("samples/{name}: through the SDK: {via_sdk:?}\n    directly: {event:?}")),
                Err(e) => failures.push(format!("samples/{name}: DeployEvent::from_cloudevent: {e}")),
            },
            Err(e) => failures.push(format!("samples/{name}: the CloudEvents SDK cannot read it: {e}")),
        }
        // And the SDK event deploychain builds converts back losslessly.
        if DeployEvent::from_cloudevent(&event.to_cloudevent()).as_ref() != Ok(&event) {
            failures.push(format!("samples/{name}: to_cloudevent/from_cloudevent is lossy"));
        }
        // Samples follow the id and run-id conventions (an audit event of an operator's action
        // carries the run of the message it handled, which it cannot derive).
        if let Some(commit) = commit_of(&event.data) {
            let run_id = run_id(event.data.app(), commit);
            if event.run_id != run_id {
                failures.push(format!("samples/{name}: run id {} is not run_id(app, commit) = {run_id}", event.run_id));
            }
        }
        if !event.id.starts_with(&format!("{}.", event.run_id)) {
            failures.push(format!("samples/{name}: id {} is not `<runid>.<step>`", event.id));
        }
    }
    assert!(failures.is_empty(), "round-trip failures:\n  {}", failures.join("\n  "));
}

fn commit_of(data: &EventData) -> Option<&str> {
    Some(match data {
        EventData::Push(d) => &d.commit,
        EventData::BuildRequested(d) => &d.commit,
        EventData::BuildCompleted(d) => &d.commit,
        EventData::ImageRequested(d) => &d.commit,
        EventData::ImageDue(d) => &d.commit,
        EventData::ImageReady(d) => &d.commit,
        EventData::DeploymentDue(d) => &d.commit,
        EventData::DeploymentStarted(d)
        | EventData::DeploymentSucceeded(d)
        | EventData::DeploymentFailed(d)
        | EventData::DeploymentRolledBack(d) => &d.commit,
        EventData::ApprovalRequested(d) => &d.commit,
        EventData::ApprovalDecided(d) => &d.commit,
        EventData::ApprovalDue(d) => &d.commit,
        EventData::ApprovalChanged(d) => &d.commit,
        EventData::DeadLetterHandled(_) => return None,
        EventData::RunFinished(d) => &d.commit,
    })
}

// ------------------------------------------------------------------ events built in Rust

const APP: &str = "api";
const COMMIT: &str = "0F5E3B7C9A1D2E4F6A8B0C1D2E3F4A5B6C7D8E9F";

fn gallery_image(version: &str, full: bool) -> ImageRef {
    ImageRef {
        kind: ImageKind::GalleryImageVersion,
        id: format!(
            "/subscriptions/11111111-2222-3333-4444-555555555555/resourceGroups/rg-img/providers/Microsoft.Compute/galleries/gal/images/api/versions/{version}"
        ),
        version: full.then(|| version.to_string()),
        digest: None,
    }
}

fn container_image(full: bool) -> ImageRef {
    let digest = format!("sha256:{}", "ab12".repeat(16));
    ImageRef {
        kind: ImageKind::Container,
        id: format!("ghcr.io/octo-org/api@{digest}"),
        version: full.then(|| "v2.3.0".to_string()),
        digest: full.then_some(digest),
    }
}

fn deployment(full: bool, failed: bool) -> Deployment {
    Deployment {
        app: APP.into(),
        stage: "prod-eu".into(),
        target: "/subscriptions/11111111-2222-3333-4444-555555555555/resourceGroups/rg-api/providers/Microsoft.Compute/virtualMachineScaleSets/api-prod-eu".into(),
        image: if full { container_image(true) } else { gallery_image("2.3.0", false) },
        commit: COMMIT.into(),
        reason: (full || failed).then(|| "instance api-prod-eu_3 did not become healthy".to_string()),
        restored: full.then(|| container_image(false)),
    }
}

/// The data of `ty`, with every optional field set (`full`) or none. The match is exhaustive, so a new
/// event type does not compile until it is covered here.
fn data_for(ty: EventType, full: bool) -> EventData {
    let image = if full { gallery_image("2.3.0", true) } else { container_image(false) };
    match ty {
        EventType::Push => EventData::Push(Push {
            app: APP.into(),
            provider: if full { Provider::AzureDevops } else { Provider::Github },
            repository: if full { "https://dev.azure.com/contoso/shop/_git/api".into() } else { "octo-org/api".into() },
            branch: "release/2.3".into(),
            commit: COMMIT.into(),
            before: full.then(|| "0000000000000000000000000000000000000000".to_string()),
            pusher: full.then(|| "Jane Doe".to_string()),
            message: full.then(|| "Merge PR 42: faster checkout\n\nRelated work items: #7".to_string()),
            url: full.then(|| format!("https://dev.azure.com/contoso/shop/_git/api/commit/{COMMIT}")),
            delivery: full.then(|| "5e7c5c3a-3b52-4b1e-9b0e-3b8f4f7f1c2d".to_string()),
            pusher_email: full.then(|| "jane@contoso.com".to_string()),
            commits: if full {
                vec![CommitInfo {
                    id: COMMIT.into(),
                    message: Some("Merge PR 42: faster checkout".into()),
                    author: Some("Jane Doe".into()),
                    author_email: Some("jane@contoso.com".into()),
                    author_login: Some("jdoe".into()),
                    timestamp: chrono::DateTime::from_timestamp(1_780_000_000, 0),
                }]
            } else {
                Vec::new()
            },
        }),
        EventType::BuildRequested => EventData::BuildRequested(BuildRequested {
            app: APP.into(),
            provider: if full { BuildProvider::AzurePipelines } else { BuildProvider::GithubActions },
            branch: "release/2.3".into(),
            commit: COMMIT.into(),
            pipeline: full.then(|| "api-ci".to_string()),
        }),
        EventType::BuildCompleted => EventData::BuildCompleted(BuildCompleted {
            app: APP.into(),
            provider: if full { BuildProvider::AzurePipelines } else { BuildProvider::GithubActions },
            branch: "release/2.3".into(),
            commit: COMMIT.into(),
            build_id: "4711".into(),
            outcome: if full { BuildOutcome::Failed } else { BuildOutcome::Canceled },
            pipeline: full.then(|| "api-ci".to_string()),
            url: full.then(|| "https://dev.azure.com/contoso/shop/_build/results?buildId=4711".to_string()),
            detail: full.then(|| "partiallySucceeded".to_string()),
        }),
        EventType::ImageRequested => EventData::ImageRequested(ImageRequested {
            app: APP.into(),
            commit: COMMIT.into(),
            build_id: "4711".into(),
            source: if full { "image-builder".into() } else { "registry".into() },
            destination: if full {
                "/subscriptions/11111111-2222-3333-4444-555555555555/resourceGroups/rg-img/providers/Microsoft.Compute/galleries/gal/images/api".into()
            } else {
                "ghcr.io/octo-org/api".into()
            },
        }),
        EventType::ImageDue => EventData::ImageDue(ImageDue {
            app: APP.into(),
            commit: COMMIT.into(),
            bake: "/subscriptions/11111111-2222-3333-4444-555555555555/resourceGroups/rg-img/providers/Microsoft.VirtualMachineImages/imageTemplates/deploychain-api-1a2b3c4d5e6f".into(),
            attempt: if full { 7 } else { 1 },
            deadline: "2026-11-23T14:00:00Z".into(),
        }),
        EventType::ImageReady => EventData::ImageReady(ImageReady {
            app: APP.into(),
            commit: COMMIT.into(),
            image,
            branch: full.then(|| "release/2.3".to_string()),
        }),
        EventType::DeploymentDue => EventData::DeploymentDue(DeploymentDue {
            app: APP.into(),
            stage: "prod-eu".into(),
            commit: COMMIT.into(),
            image,
            target: "/subscriptions/11111111-2222-3333-4444-555555555555/resourceGroups/rg-api/providers/Microsoft.ContainerService/managedClusters/aks-prod-eu".into(),
            look: if full { 7 } else { 1 },
            started: "2026-12-01T07:10:00.000Z".into(),
            cursor: if full { json!({"phase": "following", "container": "api", "previous": null, "since": "2026-12-01T07:11:02Z"}) } else { Value::Null },
            retries: if full { 2 } else { 0 },
            failing_since: full.then(|| "2026-12-01T08:14:30+01:00".to_string()),
        }),
        EventType::DeploymentStarted => EventData::DeploymentStarted(deployment(full, false)),
        EventType::DeploymentSucceeded => EventData::DeploymentSucceeded(deployment(full, false)),
        EventType::DeploymentFailed => EventData::DeploymentFailed(deployment(full, true)),
        EventType::DeploymentRolledBack => EventData::DeploymentRolledBack(deployment(full, true)),
        EventType::ApprovalRequested => EventData::ApprovalRequested(ApprovalRequested {
            app: APP.into(),
            stage: "prod-eu".into(),
            approval_id: short_digest(&["api-0f5e3b7c9a1d", "prod-eu", &image.id]),
            image,
            commit: COMMIT.into(),
            approvers: if full {
                vec!["alice@example.com".into(), "bob@example.com".into(), "carol".into()]
            } else {
                vec!["alice@example.com".into()]
            },
            quorum: if full { 2 } else { 1 },
            expires_at: if full { "2026-12-01T09:30:00+01:00".into() } else { "2026-12-01T08:30:00Z".into() },
        }),
        EventType::ApprovalDecided => EventData::ApprovalDecided(ApprovalDecided {
            app: APP.into(),
            stage: "prod-eu".into(),
            approval_id: "7d0b0f3bd0c1b8f2".into(),
            image,
            commit: COMMIT.into(),
            decision: if full { Decision::Rejected } else { Decision::Approved },
            decided_by: if full { vec!["alice@example.com".into(), "carol".into()] } else { vec!["policy".into()] },
            comment: full.then(|| "Not during the sale.".to_string()),
        }),
        EventType::ApprovalDue => EventData::ApprovalDue(ApprovalDue {
            app: APP.into(),
            stage: "prod-eu".into(),
            approval_id: "api-1a2b3c4d5e6f.prod-eu".into(),
            commit: COMMIT.into(),
            due: if full { DueKind::Reminder } else { DueKind::Timeout },
            at: "2026-11-23T10:00:00Z".into(),
            round: u32::from(full),
        }),
        EventType::ApprovalChanged => EventData::ApprovalChanged(ApprovalChanged {
            app: APP.into(),
            stage: "prod-eu".into(),
            approval_id: "api-1a2b3c4d5e6f.prod-eu".into(),
            image,
            commit: COMMIT.into(),
            change: if full { ApprovalChange::Escalated } else { ApprovalChange::Superseded },
            people: if full { vec!["carol@example.com".into()] } else { Vec::new() },
            detail: full.then(|| "no decision within 24h".to_string()),
        }),
        EventType::DeadLetterHandled => EventData::DeadLetterHandled(DeadLetterHandled {
            app: if full { APP.into() } else { "ops".into() },
            action: if full { DeadLetterAction::Replayed } else { DeadLetterAction::Purged },
            entity: "deploychain-parked".into(),
            message_id: "api-1a2b3c4d5e6f.push".into(),
            new_message_id: full.then(|| "api-1a2b3c4d5e6f.push.replay-1".to_string()),
            event_type: full.then(|| "dev.deploychain.push.v1".to_string()),
            reason: full.then(|| "MalformedEvent".to_string()),
            by: "ops@example.com".into(),
        }),
        EventType::RunFinished => EventData::RunFinished(RunFinished {
            app: APP.into(),
            commit: COMMIT.into(),
            outcome: if full { RunOutcome::Superseded } else { RunOutcome::Succeeded },
            reason: if full { "api-1a2b3c4d5e6f took over".into() } else { "deployed to every stage".into() },
            stage: full.then(|| "prod-eu".to_string()),
        }),
    }
}

fn built_event(ty: EventType, full: bool) -> DeployEvent {
    let data = data_for(ty, full);
    assert_eq!(data.event_type(), ty, "data_for({ty}) built the wrong variant");
    let run_id = run_id(APP, COMMIT);
    let step = match data.stage() {
        Some(stage) => format!("{}.{stage}", ty.short_name().replace('.', "-")),
        None => ty.short_name().replace('.', "-"),
    };
    let time: DateTime<Utc> = DateTime::parse_from_rfc3339(if full { "2026-12-01T08:15:42.123+01:00" } else { "2026-12-01T07:15:42Z" })
        .expect("test time")
        .with_timezone(&Utc);
    DeployEvent {
        id: event_id(&run_id, &step),
        source: if full { format!("/deploychain/{APP}/on_approval") } else { "/azure-devops/contoso/shop".into() },
        time,
        run_id,
        trace: if full {
            TraceContext {
                traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
                tracestate: Some("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7".into()),
            }
        } else {
            TraceContext::default()
        },
        data,
    }
}

#[test]
fn rust_built_events_validate_against_schemas() {
    let mut failures = Vec::new();
    for ty in EventType::ALL {
        let v = validator(ty);
        for full in [true, false] {
            let event = built_event(ty, full);
            let bytes = event.to_json_bytes();
            let value: Value = serde_json::from_slice(&bytes).expect("to_json_bytes writes JSON");
            for e in errors(&v, &value) {
                failures.push(format!("{ty} (optional fields {}): {e}\n    event: {value}", if full { "set" } else { "unset" }));
            }
            if DeployEvent::from_json_bytes(&bytes).as_ref() != Ok(&event) {
                failures
                    .push(format!("{ty} (optional fields {}): does not read back from its own JSON", if full { "set" } else { "unset" }));
            }
        }
    }
    assert!(failures.is_empty(), "Rust-built events that the schemas refuse:\n  {}", failures.join("\n  "));
}

// ------------------------------------------------------------------ strictness

fn sample(name: &str) -> (EventType, Value) {
    let ty = type_of_sample_name(name).expect("a sample name");
    (ty, read_json(&dir("samples").join(name)))
}

/// A named change that makes a valid event invalid.
type Mutation = (&'static str, Box<dyn FnOnce(&mut Value)>);

/// Apply `mutate` to a copy of `value`; the result must be refused by `validator`.
fn assert_refused(validator: &jsonschema::Validator, what: &str, value: &Value, mutate: impl FnOnce(&mut Value)) -> Result<(), String> {
    let mut bad = value.clone();
    mutate(&mut bad);
    if validator.is_valid(&bad) { Err(format!("{what}: accepted {bad}")) } else { Ok(()) }
}

#[test]
fn schemas_reject_bad_events() {
    let mut failures = Vec::new();

    // Mutations that apply to every sample (all data types carry `app`, and all but the operators'
    // audit event `commit`; that one's required `messageId` stands in).
    for (name, ty, value, _) in samples() {
        let v = validator(ty);
        let other = EventType::ALL.into_iter().find(|t| *t != ty).expect("another type");
        let cases: Vec<Mutation> = vec![
            (
                "missing required data field `commit`",
                Box::new(|e| {
                    e["data"].as_object_mut().map(|m| if m.contains_key("commit") { m.remove("commit") } else { m.remove("messageId") });
                }),
            ),
            (
                "missing required data field `app`",
                Box::new(|e| {
                    e["data"].as_object_mut().map(|m| m.remove("app"));
                }),
            ),
            ("wrong `type`", Box::new(move |e| e["type"] = other.as_str().into())),
            ("unknown `type`", Box::new(|e| e["type"] = "dev.deploychain.nope.v1".into())),
            ("bad commit (not hex)", Box::new(|e| e["data"]["commit"] = "not-a-commit".into())),
            ("bad commit (too short)", Box::new(|e| e["data"]["commit"] = "abc123".into())),
            ("unknown data field", Box::new(|e| e["data"]["comit"] = COMMIT.into())),
            ("bad app name", Box::new(|e| e["data"]["app"] = "Web_App".into())),
            (
                "missing `runid`",
                Box::new(|e| {
                    e.as_object_mut().map(|m| m.remove("runid"));
                }),
            ),
            (
                "missing `subject`",
                Box::new(|e| {
                    e.as_object_mut().map(|m| m.remove("subject"));
                }),
            ),
            (
                "missing `data`",
                Box::new(|e| {
                    e.as_object_mut().map(|m| m.remove("data"));
                }),
            ),
            ("wrong specversion", Box::new(|e| e["specversion"] = "0.3".into())),
            ("wrong datacontenttype", Box::new(|e| e["datacontenttype"] = "text/plain".into())),
            ("time without zone", Box::new(|e| e["time"] = "2026-11-22T10:00:00".into())),
            ("bad traceparent", Box::new(|e| e["traceparent"] = "00-zz-01".into())),
            ("all-zero trace id", Box::new(|e| e["traceparent"] = format!("00-{}-b7ad6b7169203331-01", "0".repeat(32)).into())),
            ("empty id", Box::new(|e| e["id"] = "".into())),
            ("id over 128 characters", Box::new(|e| e["id"] = "x".repeat(129).into())),
        ];
        for (what, mutate) in cases {
            if let Err(e) = assert_refused(&v, &format!("samples/{name}: {what}"), &value, mutate) {
                failures.push(e);
            }
        }
    }

    // Type-specific rules.
    let (ty, requested) = sample("approval.requested.json");
    let v = validator(ty);
    let specific: Vec<Mutation> = vec![
        ("quorum 0", Box::new(|e| e["data"]["quorum"] = 0.into())),
        ("quorum not an integer", Box::new(|e| e["data"]["quorum"] = json!(1.5))),
        ("no approvers", Box::new(|e| e["data"]["approvers"] = json!([]))),
        ("blank approver", Box::new(|e| e["data"]["approvers"] = json!(["alice@example.com", " "]))),
        ("duplicate approver", Box::new(|e| e["data"]["approvers"] = json!(["alice@example.com", "alice@example.com"]))),
        ("expiresAt not a date-time", Box::new(|e| e["data"]["expiresAt"] = "tomorrow".into())),
        (
            "image bound to a tag",
            Box::new(|e| {
                e["data"]["image"] = json!({"kind": "container", "id": "ghcr.io/octo-org/web:latest"});
            }),
        ),
        ("unknown image kind", Box::new(|e| e["data"]["image"]["kind"] = "vhd".into())),
        ("unknown image field", Box::new(|e| e["data"]["image"]["tag"] = "latest".into())),
        (
            "missing image id",
            Box::new(|e| {
                e["data"]["image"].as_object_mut().map(|m| m.remove("id"));
            }),
        ),
    ];
    for (what, mutate) in specific {
        if let Err(e) = assert_refused(&v, &format!("approval.requested: {what}"), &requested, mutate) {
            failures.push(e);
        }
    }

    // A gallery application version is bound to an application version id, and an image version
    // to an image version id: the kinds do not take each other's ids.
    let (ty, app_ready) = sample("image.ready.vm-application.json");
    let v = validator(ty);
    let specific: Vec<Mutation> = vec![
        (
            "application kind with an image version id",
            Box::new(|e| {
                e["data"]["image"]["id"] =
                    "/subscriptions/0/resourceGroups/rg/providers/Microsoft.Compute/galleries/g/images/agent/versions/2.4.1".into();
            }),
        ),
        (
            "application kind with an application id (no version)",
            Box::new(|e| {
                e["data"]["image"]["id"] =
                    "/subscriptions/0/resourceGroups/rg/providers/Microsoft.Compute/galleries/g/applications/agent".into();
            }),
        ),
        ("image kind with an application version id", Box::new(|e| e["data"]["image"]["kind"] = "gallery-image-version".into())),
    ];
    for (what, mutate) in specific {
        if let Err(e) = assert_refused(&v, &format!("image.ready (vm application): {what}"), &app_ready, mutate) {
            failures.push(e);
        }
    }

    let (ty, decided) = sample("approval.decided.approved.json");
    let v = validator(ty);
    let specific: Vec<Mutation> = vec![
        ("nobody decided", Box::new(|e| e["data"]["decidedBy"] = json!([]))),
        ("unknown decision", Box::new(|e| e["data"]["decision"] = "maybe".into())),
        ("decision in another case", Box::new(|e| e["data"]["decision"] = "Approved".into())),
    ];
    for (what, mutate) in specific {
        if let Err(e) = assert_refused(&v, &format!("approval.decided: {what}"), &decided, mutate) {
            failures.push(e);
        }
    }

    let (ty, push) = sample("push.json");
    let v = validator(ty);
    let specific: Vec<Mutation> = vec![
        ("unknown provider", Box::new(|e| e["data"]["provider"] = "gitlab".into())),
        ("provider in snake case", Box::new(|e| e["data"]["provider"] = "azure_devops".into())),
        ("GitHub repository that is not owner/repo", Box::new(|e| e["data"]["repository"] = "web".into())),
        ("empty branch", Box::new(|e| e["data"]["branch"] = "".into())),
    ];
    for (what, mutate) in specific {
        if let Err(e) = assert_refused(&v, &format!("push: {what}"), &push, mutate) {
            failures.push(e);
        }
    }

    // The rollout's cursor is the adapter's own, but always an object (or null before the first effect).
    let (ty, due) = sample("deployment.due.throttled.json");
    let v = validator(ty);
    let specific: Vec<Mutation> = vec![
        ("look 0", Box::new(|e| e["data"]["look"] = 0.into())),
        ("cursor that is not an object", Box::new(|e| e["data"]["cursor"] = "gating".into())),
        ("negative retries", Box::new(|e| e["data"]["retries"] = (-1).into())),
        ("failingSince not a date-time", Box::new(|e| e["data"]["failingSince"] = "a minute ago".into())),
        ("started not a date-time", Box::new(|e| e["data"]["started"] = "2026-11-22".into())),
    ];
    for (what, mutate) in specific {
        if let Err(e) = assert_refused(&v, &format!("deployment.due: {what}"), &due, mutate) {
            failures.push(e);
        }
    }

    let (ty, finished) = sample("run.finished.failed.json");
    let v = validator(ty);
    let specific: Vec<Mutation> = vec![
        (
            "missing reason",
            Box::new(|e| {
                e["data"].as_object_mut().map(|m| m.remove("reason"));
            }),
        ),
        ("empty reason", Box::new(|e| e["data"]["reason"] = "".into())),
        ("unknown outcome", Box::new(|e| e["data"]["outcome"] = "aborted".into())),
    ];
    for (what, mutate) in specific {
        if let Err(e) = assert_refused(&v, &format!("run.finished: {what}"), &finished, mutate) {
            failures.push(e);
        }
    }

    // `time` is enforced by its pattern even where `format` is only an annotation.
    let (ty, push) = sample("push.json");
    let annotation_only = jsonschema::draft202012::options().should_validate_formats(false).build(&schema(ty)).expect("schema compiles");
    assert!(annotation_only.is_valid(&push), "push.json must be valid without format assertion");
    for bad_time in ["yesterday", "2026-11-22 10:00:00Z", "2026-13-22T10:00:00Z", "2026-11-22T10:00:00"] {
        if let Err(e) = assert_refused(&annotation_only, &format!("push (formats not asserted): time `{bad_time}`"), &push, |e| {
            e["time"] = bad_time.into()
        }) {
            failures.push(e);
        }
    }

    assert!(failures.is_empty(), "schemas accept bad events:\n  {}", failures.join("\n  "));
}
