//! `on_build_completed` — a CI build of a run's commit finished.
//!
//! - Trigger: Service Bus subscription `on-build-completed` (Label = `dev.deploychain.build.completed.v1`).
//! - Input: `build.completed` (from `workflow_run` / `build.complete` webhooks, or the CI simulator).
//! - Effect on success: asks the image baker for an image of the commit (idempotent per run): VM
//!   Image Builder starts the run's bake; a CI-made image is found in the gallery; a `registry`
//!   image is reported by the registry's webhook.
//! - Output: `image.requested`, then `image.ready` (the image exists) or a scheduled `image.due`
//!   (a bake runs); or `run.finished` with outcome `failed` and the reason (build failed, or no
//!   image can be made).
//! - Retry: transient failures are redelivered; an event for an unknown run is parked (`UnknownRun`);
//!   an event for a finished run is acknowledged and ignored.

use super::*;
use crate::adapters::BakeStarted;
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
        let req = image_request(app, &run, &build.build_id);
        let started = match state.baker.request_image(&req).await {
            Ok(s) => s,
            // Refused (no such template, no image the build published): the run ends saying why.
            Err(e) if !e.is_transient() => {
                let reason = format!("no image of {}: {}", &run.commit[..run.commit.len().min(12)], e.detail());
                let what = entry(KEY, "image not made", Some(e.detail().to_string()));
                let mut c = finish_run(&state, &run, KEY, NAME, what, RunOutcome::Failed, reason, None);
                c.entries.insert(0, entry(KEY, "build succeeded", Some(format!("build {}{link}", build.build_id))));
                return Ok(Some(c));
            }
            Err(e) => return Err(e),
        };
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
        let mut entries = vec![
            entry(KEY, "build succeeded", Some(format!("build {}{link}", build.build_id))),
            entry(KEY, "image requested", Some(format!("{} → {}", app.image.source.as_str(), app.image.destination))),
        ];
        let mut outbox = vec![out];
        let short = &run.commit[..run.commit.len().min(12)];
        let mut waiting = format!("image of {short} from {} ({})", app.image.source.as_str(), app.image.destination);
        match started {
            BakeStarted::Reported => {}
            BakeStarted::Ready(image) => {
                entries.push(entry(KEY, "image found", Some(image.id.clone())));
                outbox.push(image_ready(&state, &rr, app, &run, image, NAME));
                waiting = format!("deployment to {}", app.stages.first().map(|s| s.name.as_str()).unwrap_or("the first stage"));
            }
            BakeStarted::Baking { bake, look_after } => {
                let deadline = Utc::now() + chrono::Duration::from_std(app.image.bake_timeout()).unwrap_or(chrono::Duration::hours(4));
                entries.push(entry(KEY, "image baking", Some(bake.clone())));
                outbox.push(image_due(&state, &rr, app, &run, &bake, 1, deadline, look_after, NAME));
                waiting = format!("image of {short} baking in VM Image Builder ({})", bake.rsplit('/').next().unwrap_or(&bake));
            }
        }
        Ok(Some(StepCommit {
            run_id: run.id.clone(),
            key: KEY.into(),
            new_run: None,
            entries,
            status: RunStatus::Running,
            waiting_for: Some(waiting),
            image: None,
            stage: None,
            outbox,
            stage_health: None,
        }))
    })
    .await?;
    Ok(done.describe())
}
