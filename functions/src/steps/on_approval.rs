//! `on_approval` — a stage's approval was decided: promote the approved image, or end the run.
//!
//! - Trigger: Service Bus subscription `on-approval` (sessions on, SessionId = `app/stage`, so
//!   deploys to one stage are serialized).
//! - Input: `approval.decided` (from the `approval` function, or from a stage that needs none).
//! - Effect when approved: rolls the *same* immutable image the approval names out to the stage
//!   (refused if it is not the run's image); then as `on_image_ready` for what comes next.
//! - Output: `deployment.*` then `approval.requested` / `approval.decided` / `run.finished`;
//!   `run.finished` with outcome `rejected` when rejected.
//! - Retry: transient failures are redelivered; idempotency key `promote.STAGE`. A decision that
//!   arrives before its run committed the wait (the asking step died after notifying) is scheduled
//!   again, backing off, [`EARLY_RETRIES`] times, then parked.

use super::*;
use crate::invoke::BusMessage;

pub const NAME: &str = "on_approval";

pub async fn handle(state: AppState, msg: BusMessage) -> Result<String> {
    let ev = decode(&msg.body, EventType::ApprovalDecided)?;
    let EventData::ApprovalDecided(decided) = &ev.data else { unreachable!("decode checked the type") };
    let run = match active_run(&state, &ev).await? {
        Ok(r) => r,
        Err(why) => return Ok(StepDone::Ignored(why).describe()),
    };
    let app = app_of(&state, &run.app)?;
    let Some((idx, stage)) = app.stage(&decided.stage) else {
        return Err(Error::Refused(format!("app `{}` has no stage `{}`", app.name, decided.stage)));
    };
    if idx == 0 {
        return Err(Error::Refused(format!("stage `{}` is the first stage; it is deployed when the image is ready", stage.name)));
    }
    match &run.image {
        Some(img) if img.id == decided.image.id => {}
        Some(img) => {
            return Err(Error::Refused(format!("the approval is for image {} but run {} deploys {}", decided.image.id, run.id, img.id)));
        }
        // The step that asks for approval notifies the approvers and then commits the run's wait;
        // a handler that dies in between commits it on the redelivery, and a quick approver can
        // decide before that. The decision is not wrong, only early: look again shortly.
        None => return early(&state, &ev, &msg, format!("run {} has no image yet", run.id)).await,
    }
    // A human decision must match the approval record the votes made; a policy decision needs a
    // stage without an approval rule.
    let mut wait = None;
    if decided.decided_by == ["policy"] {
        if stage.approval.is_some() {
            return Err(Error::Refused(format!("stage `{}` needs approval by people; a policy decision cannot promote it", stage.name)));
        }
    } else {
        let record = state
            .store
            .approval(&decided.approval_id)
            .await?
            .ok_or_else(|| Error::Refused(format!("no approval `{}`", decided.approval_id)))?;
        if record.outcome() != Some(decided.decision) || record.run_id != run.id || record.stage != stage.name {
            return Err(Error::Refused(format!("approval `{}` does not record this decision", decided.approval_id)));
        }
        // From the request to the decision this event reports (the quorum's last vote, or a timeout).
        let requested = record.audit.iter().find(|a| a.what == "requested").map(|a| a.at).unwrap_or(record.expires_at);
        wait = Some(crate::metrics::Measure::ApprovalWait {
            app: app.name.clone(),
            stage: stage.name.clone(),
            decision: decision_word(decided.decision).into(),
            seconds: crate::metrics::seconds_between(requested, ev.time),
        });
    }
    let key = format!("promote.{}", stage.name);
    let done = run_step(&state, &run.id, &key, || async {
        if let Some(w) = wait {
            crate::metrics::note(w);
        }
        let by = decided.decided_by.join(", ");
        if decided.decision == Decision::Rejected {
            let comment = decided.comment.as_deref().map(|c| format!(": {c}")).unwrap_or_default();
            let reason = format!("promotion to {} rejected by {by}{comment}", stage.name);
            let what = entry(&key, format!("{} rejected", stage.name), Some(reason.clone()));
            return Ok(Some(finish_run(&state, &run, &key, NAME, what, RunOutcome::Rejected, reason, Some(stage.name.clone()))));
        }
        let mut d = deploy_stage(&state, &run, app, idx, &decided.image, &key, NAME).await?;
        d.entries.insert(0, entry(&key, format!("{} approved", stage.name), Some(format!("by {by}"))));
        Ok(Some(commit(&run, &key, d, None, Some(stage.name.clone()))))
    })
    .await?;
    Ok(done.describe())
}

/// How many times a decision that came before its run's wait is looked at again, the first
/// after [`EARLY_FIRST`], each wait doubling up to [`EARLY_MOST`] (about seven minutes in all:
/// past a dead host's message lock, after which the asking step is redelivered). Then it is
/// parked, for an operator to replay.
pub const EARLY_RETRIES: u32 = 10;
pub const EARLY_FIRST: std::time::Duration = std::time::Duration::from_secs(5);
pub const EARLY_MOST: std::time::Duration = std::time::Duration::from_secs(60);
/// The application property counting the looks.
pub const EARLY_PROPERTY: &str = "deploychain_early";

/// The same decision again, scheduled for later (a deterministic MessageId per look, so a retried
/// invocation does not schedule two), or — its looks spent — refused.
async fn early(state: &AppState, ev: &DeployEvent, msg: &BusMessage, why: String) -> Result<String> {
    let looks =
        msg.property(EARLY_PROPERTY).and_then(|v| v.as_u64().or_else(|| v.as_str().and_then(|s| s.parse().ok()))).unwrap_or(0) as u32;
    if looks >= EARLY_RETRIES {
        return Err(Error::Refused(format!("{why} (looked again {looks} times)")));
    }
    let wait = EARLY_FIRST.saturating_mul(1 << looks.min(16)).min(EARLY_MOST);
    let at = Utc::now() + chrono::Duration::from_std(wait).unwrap_or_default();
    let mut again = Outbound::from_event(ev, msg.session_id.clone()).scheduled(at);
    again.message_id = format!("{}.early-{}", ev.id, looks + 1);
    again.properties.insert(EARLY_PROPERTY.into(), (looks + 1).to_string());
    state.publisher.publish(&again).await?;
    Ok(StepDone::Ignored(format!(
        "{why}: the decision came before the run committed its wait; looking again in {}s ({} of {EARLY_RETRIES})",
        wait.as_secs(),
        looks + 1
    ))
    .describe())
}

fn decision_word(d: Decision) -> &'static str {
    match d {
        Decision::Approved => "approved",
        Decision::Rejected => "rejected",
    }
}
