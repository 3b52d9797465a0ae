//! `on_approval_due` — a timer of a pending approval came due: remind, or apply the timeout.
//!
//! - Trigger: Service Bus subscription `on-approval-due` (sessions on, SessionId = `app/stage`).
//! - Input: `approval.due`, a scheduled message the approval request (or an escalation) sent.
//! - Effect: a reminder gives the approvers who have not decided their links again; a timeout
//!   applies the stage's `on_timeout`: `reject` or `approve` close the approval (a conditional
//!   write, so a vote and the timeout cannot both win), `escalate` hands it to `escalate_to` for
//!   another `expires_after` with new links and timers (a second timeout rejects).
//! - Output: `approval.changed` (reminded, escalated, expired), then for an expiry
//!   `approval.decided` (by `timeout`), which `on_approval` acts on; escalations schedule
//!   `approval.due` again.
//! - A timer of an approval that is decided, superseded, or of an earlier round does nothing.
//! - Retry: transient failures are redelivered; idempotency keys `approval-due.STAGE.KIND.ROUND…`.

use super::*;
use crate::adapters::{ApprovalUpdate, Closed, NoticeKind};
use crate::invoke::BusMessage;
use crate::policy::TimeoutAction;

pub const NAME: &str = "on_approval_due";

pub async fn handle(state: AppState, msg: BusMessage) -> Result<String> {
    let ev = decode(&msg.body, EventType::ApprovalDue)?;
    let EventData::ApprovalDue(due) = &ev.data else { unreachable!("decode checked the type") };
    let run = match active_run(&state, &ev).await? {
        Ok(r) => r,
        Err(why) => return Ok(StepDone::Ignored(why).describe()),
    };
    let app = app_of(&state, &run.app)?;
    let Some((_, stage)) = app.stage(&due.stage) else {
        return Err(Error::Refused(format!("app `{}` has no stage `{}`", app.name, due.stage)));
    };
    let Some(policy) = &stage.approval else {
        return Err(Error::Refused(format!("stage `{}` has no approval rule", stage.name)));
    };
    let record =
        state.store.approval(&due.approval_id).await?.ok_or_else(|| Error::Refused(format!("no approval `{}`", due.approval_id)))?;
    if record.run_id != run.id || record.stage != stage.name {
        return Err(Error::Refused(format!("approval `{}` is not run {}'s approval of {}", record.id, run.id, stage.name)));
    }
    if let Some(why) = record.why_closed() {
        return Ok(StepDone::Ignored(format!("approval `{}` is {why}", record.id)).describe());
    }
    if due.round != record.round() {
        return Ok(StepDone::Ignored(format!("a timer of round {} (the approval is in round {})", due.round, record.round())).describe());
    }
    let rr = RunRef::from(&run);
    let now = Utc::now();
    let changed = |change: ApprovalChange, people: Vec<String>, detail: String| {
        EventData::ApprovalChanged(ApprovalChanged {
            app: record.app.clone(),
            stage: record.stage.clone(),
            approval_id: record.id.clone(),
            image: record.image.clone(),
            commit: record.commit.clone(),
            change,
            people,
            detail: Some(detail),
        })
    };
    let done = match due.due {
        DueKind::Reminder => {
            let before = human_duration(record.expires_at - now);
            let key = format!("approval-due.{}.reminder.{}.{}", stage.name, due.round, short_digest(&[&due.at]));
            run_step(&state, &run.id, &key, || async {
                let waiting: Vec<String> =
                    record.approvers.iter().filter(|a| !record.votes.iter().any(|v| v.approver.eq_ignore_ascii_case(a))).cloned().collect();
                if waiting.is_empty() {
                    return Ok(None);
                }
                let detail = format!("{before} before the timeout");
                state
                    .store
                    .update_approval(&record.id, &ApprovalUpdate::Reminded { to: waiting.clone(), at: now, detail: detail.clone() })
                    .await?;
                state
                    .notify
                    .approval_requested(&notice(
                        &state,
                        &record,
                        &waiting,
                        NoticeKind::Reminder,
                        &format!("reminder.{}", short_digest(&[&due.at])),
                    ))
                    .await?;
                let ev = changed(ApprovalChange::Reminded, waiting.clone(), detail.clone());
                let reminded = format!("approval-changed.{}.reminded.{}.{}", stage.name, due.round, short_digest(&[&due.at]));
                Ok(Some(StepCommit::of_run(
                    &run.id,
                    &key,
                    vec![entry(&key, format!("approvers of {} reminded", stage.name), Some(format!("{}; {detail}", waiting.join(", "))))],
                    RunStatus::Waiting,
                    Some(waiting_for_approval(&record)),
                    vec![emit(&state, &rr, &reminded, NAME, ev).1],
                )))
            })
            .await?
        }
        DueKind::Timeout => {
            let key = format!("approval-due.{}.timeout.{}", stage.name, due.round);
            let action = match (policy.on_timeout, record.escalated) {
                (TimeoutAction::Escalate, true) => TimeoutAction::Reject,
                (a, _) => a,
            };
            run_step(&state, &run.id, &key, || async {
                if action == TimeoutAction::Escalate {
                    let to = state.policy.expand(&policy.escalate_to);
                    let makers = run.change.people();
                    let to: Vec<String> = to.into_iter().filter(|p| !makers.contains(&p.to_ascii_lowercase())).collect();
                    let expires_at = now + chrono::Duration::from_std(policy.expiry()).unwrap_or(chrono::Duration::hours(24));
                    let (rec, changed_now) = state
                        .store
                        .update_approval(&record.id, &ApprovalUpdate::Escalate { approvers: to.clone(), expires_at, at: now })
                        .await?;
                    if !changed_now && !rec.escalated {
                        return Ok(None); // decided in the meantime: it stands.
                    }
                    state.notify.approval_requested(&notice(&state, &rec, &rec.approvers, NoticeKind::Escalation, "escalation")).await?;
                    let detail = format!(
                        "no decision in {}; escalated until {}",
                        policy.expires_after,
                        expires_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                    );
                    let mut outbox = vec![
                        emit(
                            &state,
                            &rr,
                            &format!("approval-changed.{}.escalated", stage.name),
                            NAME,
                            changed(ApprovalChange::Escalated, to.clone(), detail.clone()),
                        )
                        .1,
                    ];
                    outbox.extend(approval_timers(&state, &rr, &rec, policy, NAME));
                    return Ok(Some(StepCommit::of_run(
                        &run.id,
                        &key,
                        vec![entry(&key, format!("approval of {} escalated", stage.name), Some(format!("to {}; {detail}", to.join(", "))))],
                        RunStatus::Waiting,
                        Some(waiting_for_approval(&rec)),
                        outbox,
                    )));
                }
                let word = action.as_str();
                let (rec, _) = state
                    .store
                    .update_approval(&record.id, &ApprovalUpdate::Close(Closed::TimedOut { action: word.into(), at: now }))
                    .await?;
                if !matches!(rec.closed, Some(Closed::TimedOut { .. })) {
                    return Ok(None); // the votes decided first: that decision stands.
                }
                let decision = if action == TimeoutAction::Approve { Decision::Approved } else { Decision::Rejected };
                let detail = format!("no decision in {}; default action: {word}", policy.expires_after);
                let outbox = vec![
                    emit(
                        &state,
                        &rr,
                        &format!("approval-changed.{}.expired", stage.name),
                        NAME,
                        changed(ApprovalChange::Expired, Vec::new(), detail.clone()),
                    )
                    .1,
                    emit(
                        &state,
                        &rr,
                        &format!("approval-decided.{}", stage.name),
                        NAME,
                        EventData::ApprovalDecided(ApprovalDecided {
                            app: rec.app.clone(),
                            stage: rec.stage.clone(),
                            approval_id: rec.id.clone(),
                            image: rec.image.clone(),
                            commit: rec.commit.clone(),
                            decision,
                            decided_by: vec!["timeout".into()],
                            comment: Some(detail.clone()),
                        }),
                    )
                    .1,
                ];
                Ok(Some(StepCommit::of_run(
                    &run.id,
                    &key,
                    vec![entry(&key, format!("approval of {} timed out", stage.name), Some(detail))],
                    RunStatus::Waiting,
                    Some(format!("promotion to {}", stage.name)),
                    outbox,
                )))
            })
            .await?
        }
    };
    Ok(done.describe())
}

/// `2h 5m`, `59m`, `30s`.
fn human_duration(d: chrono::Duration) -> String {
    let s = d.num_seconds().max(0);
    match s {
        s if s >= 3600 => format!("{}h {}m", s / 3600, (s % 3600) / 60),
        s if s >= 60 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}
