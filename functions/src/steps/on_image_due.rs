//! `on_image_due` — look at a running image bake.
//!
//! - Trigger: Service Bus subscription `on-image-due` (Label = `dev.deploychain.image.due.v1`).
//! - Input: `image.due`, a scheduled message: the first from `on_build_completed` when it started a
//!   VM Image Builder bake, each later one from the look before it.
//! - Effect: asks the baker how the bake goes (the image template's `lastRunStatus`).
//! - Output: `image.ready` with the gallery version the bake distributed; or the next `image.due`
//!   while it runs; or `run.finished` (failed) with VM Image Builder's message when the bake failed,
//!   or when the policy's `image.timeout` passed.
//! - Retry: transient failures (ARM) are redelivered; idempotency key `image-due.{attempt}`, so a
//!   redelivered look schedules no second next look.

use super::*;
use crate::adapters::BakeStatus;
use crate::invoke::BusMessage;

pub const NAME: &str = "on_image_due";

pub async fn handle(state: AppState, msg: BusMessage) -> Result<String> {
    let ev = decode(&msg.body, EventType::ImageDue)?;
    let EventData::ImageDue(due) = &ev.data else { unreachable!("decode checked the type") };
    let run = match active_run(&state, &ev).await? {
        Ok(r) => r,
        Err(why) => return Ok(StepDone::Ignored(why).describe()),
    };
    if run.image.is_some() {
        return Ok(StepDone::Ignored(format!("run `{}` has its image already", run.id)).describe());
    }
    if !run.commit.eq_ignore_ascii_case(&due.commit) {
        return Err(Error::Malformed(format!("image.due for commit {} names run {} ({})", due.commit, run.id, run.commit)));
    }
    let deadline = DateTime::parse_from_rfc3339(&due.deadline)
        .map_err(|e| Error::Malformed(format!("deadline `{}`: {e}", due.deadline)))?
        .with_timezone(&Utc);
    let app = app_of(&state, &run.app)?;
    let rr = RunRef::from(&run);
    let key = format!("image-due.{}", due.attempt);
    let done = run_step(&state, &run.id, &key, || async {
        let req = image_request(app, &run, "");
        let name = due.bake.rsplit('/').next().unwrap_or(&due.bake).to_string();
        match state.baker.check_image(&req, &due.bake).await? {
            BakeStatus::Ready(image) => {
                let first = app.stages.first().map(|s| s.name.clone()).unwrap_or_default();
                let out = image_ready(&state, &rr, app, &run, image.clone(), NAME);
                Ok(Some(StepCommit::of_run(
                    &run.id,
                    &key,
                    vec![entry(&key, "image baked", Some(format!("{} (by {name})", image.id)))],
                    RunStatus::Running,
                    Some(format!("deployment to {first}")),
                    vec![out],
                )))
            }
            BakeStatus::Failed(why) => {
                let what = entry(&key, "image bake failed", Some(why.clone()));
                Ok(Some(finish_run(
                    &state,
                    &run,
                    &key,
                    NAME,
                    what,
                    RunOutcome::Failed,
                    format!("the image bake {name} failed: {why}"),
                    None,
                )))
            }
            BakeStatus::Running(_) if Utc::now() >= deadline => {
                let why = format!("the image bake {name} did not finish by {} (the app's image.timeout)", due.deadline);
                let what = entry(&key, "image bake timed out", Some(why.clone()));
                Ok(Some(finish_run(&state, &run, &key, NAME, what, RunOutcome::Failed, why, None)))
            }
            BakeStatus::Running(sub) => {
                let every = state.config.bake_look_every;
                let next = image_due(&state, &rr, app, &run, &due.bake, due.attempt + 1, deadline, every, NAME);
                let short = &run.commit[..run.commit.len().min(12)];
                // No history entry per look: the run says what the bake is doing.
                Ok(Some(StepCommit::of_run(
                    &run.id,
                    &key,
                    Vec::new(),
                    RunStatus::Running,
                    Some(format!("image of {short} baking in VM Image Builder ({name}: {sub}; look {})", due.attempt)),
                    vec![next],
                )))
            }
        }
    })
    .await?;
    Ok(done.describe())
}
