//! `on_push` — the start of a run.
//!
//! - Trigger: Service Bus subscription `on-push` (Label = `dev.deploychain.push.v1`).
//! - Input: `push` (from `github_webhook` / `azure_devops_webhook`).
//! - Effect: asks the app's build system for a build of the commit (idempotent per run).
//! - Output: `build.requested`; the run is created (status running, waiting for the build).
//! - Retry: transient failures (store, bus, CI API) fail the invocation and the message is
//!   redelivered; a malformed event is parked; a push for a repository/branch the policy no longer
//!   has is acknowledged and ignored with the reason (no run).

use super::*;
use crate::adapters::BuildRequest;
use crate::invoke::BusMessage;

pub const NAME: &str = "on_push";
const KEY: &str = "push";

pub async fn handle(state: AppState, msg: BusMessage) -> Result<String> {
    let ev = decode(&msg.body, EventType::Push)?;
    let EventData::Push(push) = &ev.data else { unreachable!("decode checked the type") };
    let Some(app) = state.policy.app(&push.app).filter(|a| a.matches_branch(&push.branch)) else {
        return Ok(StepDone::Ignored(format!("no pipeline for app `{}` branch `{}`: no run", push.app, push.branch)).describe());
    };
    if !push.commit.bytes().all(|b| b.is_ascii_hexdigit()) || push.commit.len() < 7 {
        return Err(Error::Malformed(format!("commit `{}` is not a hex object id", push.commit)));
    }
    let expected = run_id(&app.name, &push.commit);
    if ev.run_id != expected {
        return Err(Error::Malformed(format!("run id `{}` should be `{expected}` for this push", ev.run_id)));
    }
    let traceparent = ev.trace.traceparent.clone().unwrap_or_else(|| root_traceparent(&ev.run_id));
    let run = Run {
        id: ev.run_id.clone(),
        app: app.name.clone(),
        repository: push.repository.clone(),
        branch: push.branch.clone(),
        commit: push.commit.to_ascii_lowercase(),
        sequence: 0,
        status: RunStatus::Running,
        waiting_for: None,
        image: None,
        stage: None,
        traceparent: Some(traceparent),
        created_at: ev.time,
        updated_at: ev.time,
        steps: Vec::new(),
        change: crate::adapters::Change {
            pusher: push.pusher.clone(),
            pusher_email: push.pusher_email.clone(),
            commits: push.commits.clone(),
        },
    };
    let done = run_step(&state, &run.id.clone(), KEY, || async {
        let received = StepEntry {
            key: KEY.into(),
            name: "push received".into(),
            at: ev.time,
            detail: Some(format!(
                "{} {}{}",
                push.branch,
                run.commit,
                push.pusher.as_deref().map(|p| format!(" by {p}")).unwrap_or_default()
            )),
        };
        let provider = app.build.provider.display_name();
        let pipeline = app.build.pipeline.as_deref().map(|p| format!(" `{p}`")).unwrap_or_default();
        let started = state
            .builds
            .request_build(&BuildRequest {
                run_id: run.id.clone(),
                app: app.name.clone(),
                provider: app.build.provider,
                pipeline: app.build.pipeline.clone(),
                repository: push.repository.clone(),
                branch: push.branch.clone(),
                commit: run.commit.clone(),
                dispatch: app.build.trigger == crate::policy::BuildTrigger::Dispatch,
            })
            .await;
        let started = match started {
            Ok(s) => s,
            // Refused by the CI system (credentials, no such pipeline, inputs it does not take):
            // the run ends with its message instead of waiting for a build that never comes.
            Err(e) if !e.is_transient() => {
                let reason = format!("the build could not be started in {provider}{pipeline}: {}", e.detail());
                let what = entry(KEY, "build not started", Some(e.detail().to_string()));
                let mut c = finish_run(&state, &run, KEY, NAME, what, RunOutcome::Failed, reason, None);
                c.entries.insert(0, received);
                c.new_run = Some(run.clone());
                return Ok(Some(c));
            }
            Err(e) => return Err(e),
        };
        let (_, out) = emit(
            &state,
            &RunRef::from(&run),
            "build-requested",
            NAME,
            EventData::BuildRequested(deploychain_events::BuildRequested {
                app: app.name.clone(),
                provider: app.build.provider,
                branch: push.branch.clone(),
                commit: run.commit.clone(),
                pipeline: app.build.pipeline.clone(),
            }),
        );
        let how = match (&started.build_id, &started.url) {
            (_, Some(url)) => format!(": {url}"),
            (Some(id), None) => format!(": build {id}"),
            (None, None) if app.build.trigger == crate::policy::BuildTrigger::Push => " (started by the repository on the push)".into(),
            (None, None) => String::new(),
        };
        Ok(Some(StepCommit {
            run_id: run.id.clone(),
            key: KEY.into(),
            new_run: Some(run.clone()),
            entries: vec![received, entry(KEY, "build requested", Some(format!("{provider}{pipeline}{how}")))],
            status: RunStatus::Running,
            waiting_for: Some(format!("build of {} in {provider}{pipeline}", &run.commit[..run.commit.len().min(12)])),
            image: None,
            stage: None,
            outbox: vec![out],
            stage_health: None,
        }))
    })
    .await?;
    Ok(done.describe())
}
