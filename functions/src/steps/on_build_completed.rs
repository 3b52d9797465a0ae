//! `on_build_completed` — a CI build of a run's commit finished.
//!
//! - Trigger: Service Bus subscription `on-build-completed` (Label = `dev.deploychain.build.completed.v1`).
//! - Input: `build.completed` (from `workflow_run` / `build.complete` webhooks, or the CI simulator).
//! - Effect on success: asks the image baker for an image of the commit (idempotent per run); for a
//!   `registry` image source nothing is called: the registry's webhook reports the image.
//! - Output: `image.requested` (success), or `run.finished` with outcome `failed` and the reason.
//! - Retry: transient failures are redelivered; an event for an unknown run is parked (`UnknownRun`);
//!   an event for a finished run is acknowledged and ignored.

use super::*;
use crate::adapters::ImageRequest;
use crate::invoke::BusMessage;

pub const NAME: &str = "on_build_completed";
const KEY: &str = "build-completed";

pub async fn handle(state: AppState, msg: BusMessage) -> Result<String> {
    let ev = decode(&msg.body, EventType::BuildCompleted)?;
    let EventData::BuildCompleted(build) = &ev.data else { unreachable!("decode checked the type") };
    let run = match active_run(&state, &ev).await? {
        Ok(r) => r,
        Err(why) => return Ok(StepDone::Ignored(why).describe()),
    };
    if !run.commit.starts_with(&build.commit.to_ascii_lowercase()) && !build.commit.to_ascii_lowercase().starts_with(&run.commit) {
        return Err(Error::Malformed(format!("build of commit {} does not belong to run {} ({})", build.commit, run.id, run.commit)));
    }
    let app = app_of(&state, &run.app)?;
    let rr = RunRef::from(&run);
    let done = run_step(&state, &run.id, KEY, || async {
        let link = build.url.as_deref().map(|u| format!(" ({u})")).unwrap_or_default();
        if build.outcome != BuildOutcome::Succeeded {
            let word = if build.outcome == BuildOutcome::Canceled { "was canceled" } else { "failed" };
            let detail = build.detail.as_deref().map(|d| format!(": {d}")).unwrap_or_default();
            let reason = format!("build {} {word}{detail}{link}", build.build_id);
            let what = entry(KEY, format!("build {word}"), Some(reason.clone()));
            return Ok(Some(finish_run(&state, &run, KEY, NAME, what, RunOutcome::Failed, reason, None)));
        }
        state
            .baker
            .request_image(&ImageRequest {
                run_id: run.id.clone(),
                app: app.name.clone(),
                commit: run.commit.clone(),
                build_id: build.build_id.clone(),
                source: app.image.source.as_str().into(),
                destination: app.image.destination.clone(),
            })
            .await?;
        let (_, out) = emit(
            &state,
            &rr,
            "image-requested",
            NAME,
            EventData::ImageRequested(deploychain_events::ImageRequested {
                app: app.name.clone(),
                commit: run.commit.clone(),
                build_id: build.build_id.clone(),
                source: app.image.source.as_str().into(),
                destination: app.image.destination.clone(),
            }),
        );
        Ok(Some(StepCommit {
            run_id: run.id.clone(),
            key: KEY.into(),
            new_run: None,
            entries: vec![
                entry(KEY, "build succeeded", Some(format!("build {}{link}", build.build_id))),
                entry(KEY, "image requested", Some(format!("{} → {}", app.image.source.as_str(), app.image.destination))),
            ],
            status: RunStatus::Running,
            waiting_for: Some(format!(
                "image of {} from {} ({})",
                &run.commit[..run.commit.len().min(12)],
                app.image.source.as_str(),
                app.image.destination
            )),
            image: None,
            stage: None,
            outbox: vec![out],
            stage_health: None,
        }))
    })
    .await?;
    Ok(done.describe())
}
