//! `watchdog` — timer trigger (`DEPLOYCHAIN_WATCHDOG_SCHEDULE`, NCRONTAB): flags runs that made
//! no progress for longer than their step allows (`DEPLOYCHAIN_STUCK_AFTER`) and tells people.
//!
//! - Input: the timer tick (its payload is not used); reads the active runs.
//! - Effect: for each run waiting too long at one step, a run entry "stuck" (once per wait, keyed
//!   by when the wait began) and a notice on the notification channels.
//! - Output: none on the bus; the runs API and `deploychain runs` show the flag.
//! - Retry: none (timers are not redelivered); the next tick looks again, and a wait already
//!   flagged is not flagged twice.
//! - Also: a vote the approval function stored but whose step it never committed (the request
//!   died in between: the approver saw an error, and the page now shows the vote) is committed
//!   here, with the `approval.decided` it made — the run does not wait for a decision already made.

use super::runs::waiting;
use super::*;
use crate::adapters::{RunQuery, StuckNotice};

pub const NAME: &str = "watchdog";

pub async fn handle(state: AppState) -> Result<String> {
    let now = Utc::now();
    let runs = state.store.runs(&RunQuery { app: None, commit: None, limit: 500 }).await?;
    let mut recovered = Vec::new();
    for run in runs.iter().filter(|r| r.status == RunStatus::Waiting) {
        let Some(app) = state.policy.app(&run.app) else { continue };
        for stage in app.stages.iter().filter(|s| s.approval.is_some()) {
            let Some(record) = state.store.approval(&approval_id(&run.id, &stage.name)).await? else { continue };
            // `run_step` finds a vote's step done (nothing to do), committed but not published
            // (publishes it), or missing (commits it).
            for v in &record.votes {
                let c = super::approval::vote_commit(&state, run, &record, v);
                let key = c.key.clone();
                if run_step(&state, &run.id, &key, || async { Ok(Some(c)) }).await? != StepDone::Duplicate {
                    tracing::warn!(run = run.id, key, "a stored vote's step was not done: done now");
                    recovered.push(format!("{} {key}", run.id));
                }
            }
        }
    }
    let mut flagged = Vec::new();
    for run in runs.iter().filter(|r| !r.status.is_final()) {
        let Some(w) = waiting(&state, run).await? else { continue };
        let threshold = match w.kind {
            "build" => state.config.stuck_after.build,
            "image" => state.config.stuck_after.image,
            "approval" => state.config.stuck_after.approval,
            _ => state.config.stuck_after.deployment,
        };
        let Some(threshold) = threshold else { continue };
        let waited = (now - w.since).to_std().unwrap_or_default();
        if waited <= threshold || w.stuck {
            continue;
        }
        let key = format!("stuck.{}", short_digest(&[&w.since.to_rfc3339()]));
        let notice = StuckNotice {
            run_id: run.id.clone(),
            app: run.app.clone(),
            waiting_for: w.what.clone(),
            kind: w.kind.to_string(),
            since: w.since,
            threshold,
        };
        let done = run_step(&state, &run.id, &key, || async {
            state.notify.run_stuck(&notice).await?;
            let detail = format!(
                "no progress for over {} (since {}): {}",
                super::runs::human(threshold),
                w.since.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                w.what
            );
            // A note on the run; its status and what it waits for stay as they are.
            let note = vec![entry(&key, format!("stuck at {}", w.kind), Some(detail))];
            Ok(Some(StepCommit::of_run(&run.id, &key, note, run.status, run.waiting_for.clone(), Vec::new())))
        })
        .await?;
        if done == StepDone::Done {
            tracing::warn!(run = run.id, kind = w.kind, since = %w.since, "run stuck");
            flagged.push(run.id.clone());
        }
    }
    let stuck = if flagged.is_empty() { "no run is stuck".to_string() } else { format!("flagged {}", flagged.join(", ")) };
    Ok(if recovered.is_empty() { stuck } else { format!("{stuck}; committed stored votes: {}", recovered.join(", ")) })
}
