//! `on_deployment_due` — the next step of a stage's rollout.
//!
//! - Trigger: Service Bus subscription `on-deployment-due` (Label =
//!   `dev.deploychain.deployment.due.v1`; sessions on, SessionId = `app/stage`, so a stage's looks
//!   are serialized with its other deploys).
//! - Input: `deployment.due`, a scheduled message: the first from the step that started the
//!   rollout (`on_image_ready`, `on_approval`), each later one from the look before it.
//! - Effect: one short step of the rollout (decision 0023): follow the model update, upgrade or
//!   gate the next batch, run an acceptance check, roll back — within the step budget.
//! - Output: the next `deployment.due`; or, when the rollout ended, `deployment.succeeded` |
//!   `deployment.failed` | `deployment.rolledback` and what follows (`approval.requested`,
//!   `approval.decided` by policy, `run.finished`).
//! - Retry: transient failures are scheduled again by the step itself (after ARM's `Retry-After`,
//!   else a backoff) and the message completes; idempotency key `deploy.STAGE.look.N`, so a
//!   redelivered look schedules no second next look.

use super::rollout::{Look, rollout_step};
use super::*;
use crate::invoke::BusMessage;

pub const NAME: &str = "on_deployment_due";

fn time(what: &str, v: &str) -> Result<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(v).map(|t| t.with_timezone(&Utc)).map_err(|e| Error::Malformed(format!("{what} `{v}`: {e}")))
}

pub async fn handle(state: AppState, msg: BusMessage) -> Result<String> {
    let ev = decode(&msg.body, EventType::DeploymentDue)?;
    let EventData::DeploymentDue(due) = &ev.data else { unreachable!("decode checked the type") };
    let run = match active_run(&state, &ev).await? {
        Ok(r) => r,
        Err(why) => return Ok(StepDone::Ignored(why).describe()),
    };
    if !run.commit.eq_ignore_ascii_case(&due.commit) {
        return Err(Error::Malformed(format!("deployment.due for commit {} names run {} ({})", due.commit, run.id, run.commit)));
    }
    let app = app_of(&state, &run.app)?;
    let Some(idx) = app.stages.iter().position(|s| s.name == due.stage) else {
        return Err(Error::Refused(format!("app `{}` has no stage `{}` in the pipeline policy", app.name, due.stage)));
    };
    if app.stages[idx].target != due.target {
        return Err(Error::Refused(format!(
            "stage {} now deploys to {}, not {}: the policy changed under a running rollout",
            due.stage, app.stages[idx].target, due.target
        )));
    }
    if run.stage.as_deref() != Some(due.stage.as_str()) {
        return Ok(StepDone::Ignored(format!("run `{}` is not rolling out to {} (it is at {:?})", run.id, due.stage, run.stage)).describe());
    }
    let look = Look {
        n: due.look,
        started: time("started", &due.started)?,
        cursor: due.cursor.clone(),
        retries: due.retries,
        failing_since: due.failing_since.as_deref().map(|t| time("failingSince", t)).transpose()?,
    };
    let key = format!("deploy.{}.look.{}", due.stage, due.look);
    let done = run_step(&state, &run.id, &key, || async {
        let d = rollout_step(&state, &run, app, idx, &due.image, &key, NAME, &look).await?;
        Ok(Some(commit(&run, &key, d, None, Some(due.stage.clone()))))
    })
    .await?;
    Ok(done.describe())
}
