//! `on_image_ready` — an immutable image of a run's commit exists: roll it out to the first stage.
//!
//! - Trigger: Service Bus subscription `on-image-ready` (sessions on, SessionId = `app/first-stage`,
//!   so deploys to that stage are serialized).
//! - Input: `image.ready` (registry webhook, image baker).
//! - Effect: rolls the image out to the first stage's scale set (desired state, fenced: an older run
//!   never replaces a newer one); creates the next stage's approval and notifies its approvers.
//! - Output: `deployment.started`, then `deployment.succeeded` | `deployment.failed` |
//!   `deployment.rolledback`, then `approval.requested` (next stage needs people),
//!   `approval.decided` (next stage needs none) or `run.finished`.
//! - Retry: transient failures are redelivered; the step's idempotency key (`deploy.STAGE`) makes a
//!   redelivered or replayed image a no-op.

use super::*;
use crate::invoke::BusMessage;

pub const NAME: &str = "on_image_ready";

pub async fn handle(state: AppState, msg: BusMessage) -> Result<String> {
    let ev = decode(&msg.body, EventType::ImageReady)?;
    let EventData::ImageReady(ready) = &ev.data else { unreachable!("decode checked the type") };
    let run = match active_run(&state, &ev).await? {
        Ok(r) => r,
        Err(why) => return Ok(StepDone::Ignored(why).describe()),
    };
    if !run.commit.starts_with(&ready.commit.to_ascii_lowercase()) && !ready.commit.to_ascii_lowercase().starts_with(&run.commit) {
        return Err(Error::Malformed(format!("image of commit {} does not belong to run {} ({})", ready.commit, run.id, run.commit)));
    }
    let app = app_of(&state, &run.app)?;
    let first = &app.stages[0];
    let key = format!("deploy.{}", first.name);
    let done = run_step(&state, &run.id, &key, || async {
        let d = deploy_stage(&state, &run, app, 0, &ready.image, &key, NAME).await?;
        let mut d = d;
        d.entries.insert(0, entry(&key, "image ready", Some(ready.image.id.clone())));
        Ok(Some(commit(&run, &key, d, Some(ready.image.clone()), Some(first.name.clone()))))
    })
    .await?;
    Ok(done.describe())
}
