//! A stage's rollout as short steps (decision 0023): the step that starts it (`on_image_ready`
//! for the first stage, `on_approval` for the others) and each scheduled `deployment.due` after
//! it (`on_deployment_due`) call [`Compute::advance`](crate::adapters::Compute::advance) once,
//! within [`Config::step_budget`](crate::config::Config::step_budget), and commit what comes
//! next: the next look (scheduled when the target asked to be looked at again), or the end of the
//! rollout and what follows it (approval, promotion, the end of the run).
//!
//! The step owns its retries: a transient failure (ARM throttling with `Retry-After`, ARM
//! unavailable, a look that overran its budget) completes the message and schedules the same look
//! again after ARM's wait, else an exponential backoff with jitter. Past
//! [`Config::retry_deadline`](crate::config::Config::retry_deadline) of failures in a row the run
//! gives up: the rollout is rolled back (as its own looks) and the run fails with the reason.

use super::*;
use crate::adapters::arm::client::human;
use crate::adapters::arm::rollout::human_since;
use crate::adapters::{DeployRequest, Progress};
use std::time::Duration;

/// What the steps after a successful deployment of stage `idx` are: approval of the next stage,
/// automatic promotion, or the end of the run. Shared by `on_image_ready` and `on_approval`.
pub struct Deployed {
    pub entries: Vec<StepEntry>,
    pub outbox: Vec<Outbound>,
    pub status: RunStatus,
    pub waiting_for: Option<String>,
    pub stage_health: Option<StageHealth>,
}

/// Where a rollout is, as the `deployment.due` that asks for a look carries it.
#[derive(Debug, Clone)]
pub struct Look {
    /// 0 for the start, then 1, 2, … for each scheduled look.
    pub n: u32,
    pub started: DateTime<Utc>,
    /// The target adapter's cursor (`null` before the rollout's first effect).
    pub cursor: serde_json::Value,
    /// Transient failures in a row this look follows.
    pub retries: u32,
    pub failing_since: Option<DateTime<Utc>>,
}

impl Look {
    pub fn start() -> Look {
        Look { n: 0, started: Utc::now(), cursor: serde_json::Value::Null, retries: 0, failing_since: None }
    }
}

/// The rollout request of `image` to stage `idx` of `app` for `run`.
pub fn deploy_request(run: &Run, app: &App, idx: usize, image: &ImageRef) -> DeployRequest {
    let stage = &app.stages[idx];
    DeployRequest {
        run_id: run.id.clone(),
        sequence: run.sequence,
        app: app.name.clone(),
        stage: stage.name.clone(),
        target: stage.target.clone(),
        image: image.clone(),
        mode: stage.deploy,
        batch_size: stage.batch_size,
        checks: stage.checks.clone(),
        kubernetes: stage.kubernetes.clone(),
        registry: stage.registry.clone(),
        source_registry: app.image.registry.clone(),
    }
}

/// Start deploying `image` to stage `idx` of `app` for `run`: say so, and take the rollout's
/// first step.
pub async fn deploy_stage(
    state: &AppState,
    run: &Run,
    app: &App,
    idx: usize,
    image: &ImageRef,
    key: &str,
    function: &str,
) -> Result<Deployed> {
    let stage = &app.stages[idx];
    let started = emit(
        state,
        &RunRef::from(run),
        &format!("deployment-started.{}", stage.name),
        function,
        EventData::DeploymentStarted(deployment(run, app, idx, image, None, None)),
    )
    .1;
    // Said as it starts, before the step commits: a retried step sends it again with the same
    // MessageId, which the broker drops as a duplicate.
    state.publisher.publish(&started).await?;
    let mut d = rollout_step(state, run, app, idx, image, key, function, &Look::start()).await?;
    d.entries.insert(0, entry(key, format!("deploying to {}", stage.name), Some(format!("{} → {}", image.id, stage.target))));
    Ok(d)
}

fn deployment(run: &Run, app: &App, idx: usize, image: &ImageRef, reason: Option<String>, restored: Option<ImageRef>) -> Deployment {
    let stage = &app.stages[idx];
    Deployment {
        app: app.name.clone(),
        stage: stage.name.clone(),
        target: stage.target.clone(),
        image: image.clone(),
        commit: run.commit.clone(),
        reason,
        restored,
    }
}

/// The longest wait a look takes in place instead of scheduling the next look (a scheduled message
/// is delivered on a whole second at the soonest).
pub const INLINE_WAIT: Duration = Duration::from_millis(250);
/// The most of a look spent on such waits.
pub const INLINE_TOTAL: Duration = Duration::from_secs(1);

/// The wait before retry `retries` (1, 2, …) of a look: doubling from 2 s up to 5 minutes, with
/// "full jitter" drawn from `seed` (the look's event id), so looks of many runs that failed
/// together do not come back together.
pub fn backoff(retries: u32, seed: &str) -> Duration {
    let ceiling = Duration::from_secs(2).saturating_mul(1u32 << retries.saturating_sub(1).min(8)).min(Duration::from_secs(300));
    let digest = short_digest(&[seed, "jitter"]);
    let unit = u32::from_str_radix(&digest[..8], 16).unwrap_or(u32::MAX / 2) as f64 / f64::from(u32::MAX);
    // Half fixed, half jittered: never sooner than half the ceiling.
    ceiling.mul_f64(0.5 + 0.5 * unit)
}

/// One step of the rollout of `image` to stage `idx`, from `look`: advance the target once, within
/// the step budget, and decide what comes next.
#[allow(clippy::too_many_arguments)]
pub async fn rollout_step(
    state: &AppState,
    run: &Run,
    app: &App,
    idx: usize,
    image: &ImageRef,
    key: &str,
    function: &str,
    look: &Look,
) -> Result<Deployed> {
    let stage = &app.stages[idx];
    let req = deploy_request(run, app, idx, image);
    let budget = state.config.step_budget;
    let begun = tokio::time::Instant::now();
    let mut cursor = look.cursor.clone();
    let mut noted_so_far = Vec::new();
    let advanced = loop {
        let left = budget.saturating_sub(begun.elapsed());
        let r = match tokio::time::timeout(left, state.compute.advance(&req, &cursor)).await {
            Ok(r) => r,
            Err(_) => {
                Err(Error::Transient(format!("a step of the rollout to {} took longer than its budget ({})", stage.name, human(budget))))
            }
        };
        match r {
            // A wait shorter than a scheduled message's whole second, with budget to spare: taken
            // here (only the local stack's simulated targets ask for such waits; ARM's are seconds).
            Ok(Progress::Continue { cursor: next, after, milestones, .. })
                if after <= INLINE_WAIT && begun.elapsed() + after < (budget / 4).min(INLINE_TOTAL) =>
            {
                noted_so_far.extend(milestones);
                cursor = next;
                tokio::time::sleep(after).await;
            }
            Ok(Progress::Continue { cursor, after, status, mut milestones }) => {
                noted_so_far.append(&mut milestones);
                break Ok(Progress::Continue { cursor, after, status, milestones: noted_so_far });
            }
            Ok(Progress::Done { outcome, mut milestones }) => {
                noted_so_far.append(&mut milestones);
                break Ok(Progress::Done { outcome, milestones: noted_so_far });
            }
            // Failed, perhaps after going on in this look: a retry goes on from where it got to.
            Err(e) => break Err((e, cursor)),
        }
    };
    let rr = RunRef::from(run);
    let next_look = |cursor: serde_json::Value, after: Duration, retries: u32, failing_since: Option<DateTime<Utc>>| {
        let n = look.n + 1;
        let at = Utc::now() + chrono::Duration::from_std(after).unwrap_or(chrono::Duration::minutes(1));
        let data = EventData::DeploymentDue(DeploymentDue {
            app: app.name.clone(),
            stage: stage.name.clone(),
            commit: run.commit.clone(),
            image: image.clone(),
            target: stage.target.clone(),
            look: n,
            started: look.started.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            cursor,
            retries,
            failing_since: failing_since.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
        });
        emit(state, &rr, &format!("deployment-due.{}.{n}", stage.name), function, data).1.scheduled(at)
    };
    let running = |entries: Vec<StepEntry>, next: Outbound, waiting: String| Deployed {
        entries,
        outbox: vec![next],
        status: RunStatus::Running,
        waiting_for: Some(waiting),
        stage_health: None,
    };
    let noted = |milestones: Vec<String>| milestones.into_iter().map(|m| entry(key, m, None)).collect::<Vec<_>>();
    match advanced {
        Ok(Progress::Done { outcome, milestones }) => {
            let mut d = settle(state, run, app, idx, image, key, function, outcome, look.started).await?;
            d.entries.splice(0..0, noted(milestones));
            Ok(d)
        }
        Ok(Progress::Continue { cursor, after, status, milestones }) => {
            let waiting = format!("rollout to {}: {status}; started {} ago", stage.name, human_since(look.started));
            Ok(running(noted(milestones), next_look(cursor, after, 0, None), waiting))
        }
        Err((e, at)) if e.is_transient() => {
            let now = Utc::now();
            let since = look.failing_since.unwrap_or(now);
            if (now - since).to_std().unwrap_or_default() >= state.config.retry_deadline {
                let reason = format!(
                    "gave up after {} of failures of the rollout to {}: {}",
                    human(state.config.retry_deadline),
                    stage.name,
                    e.detail()
                );
                return match state.compute.abort(&req, &at, &reason) {
                    Some(back) => {
                        let what = entry(key, format!("rollout to {} given up: rolling back", stage.name), Some(reason.clone()));
                        Ok(running(vec![what], next_look(back, Duration::ZERO, 0, None), format!("rolling {} back: {reason}", stage.name)))
                    }
                    None => {
                        let reason = if at.is_null() { format!("{reason}; nothing changed") } else { reason };
                        settle(state, run, app, idx, image, key, function, DeployOutcome::Failed { reason }, look.started).await
                    }
                };
            }
            let retries = look.retries + 1;
            let wait = e
                .retry_after()
                .unwrap_or_else(|| backoff(retries, &event_id(&run.id, &format!("deployment-due.{}.{}", stage.name, look.n))));
            let when = (now + chrono::Duration::from_std(wait).unwrap_or_default()).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
            let asked = if e.retry_after().is_some() { "as asked" } else { "backing off" };
            let detail = e.detail().to_string();
            tracing::warn!(
                run = run.id,
                stage = stage.name,
                retries,
                wait_ms = wait.as_millis() as u64,
                error = detail,
                "rollout step retried later"
            );
            let what =
                entry(key, format!("rollout to {} will be retried after {} ({asked})", stage.name, human(wait)), Some(detail.clone()));
            let waiting = format!("rollout to {}: retry {retries} at {when} after: {detail}", stage.name);
            Ok(running(vec![what], next_look(at, wait, retries, Some(since)), waiting))
        }
        Err((e, _)) => Err(e),
    }
}

/// What a rollout's end does to the run: the deployment's fact, then the next stage's approval,
/// its promotion by policy, or the end of the run.
#[allow(clippy::too_many_arguments)]
async fn settle(
    state: &AppState,
    run: &Run,
    app: &App,
    idx: usize,
    image: &ImageRef,
    key: &str,
    function: &str,
    outcome: DeployOutcome,
    started_at: DateTime<Utc>,
) -> Result<Deployed> {
    let stage = &app.stages[idx];
    let rr = RunRef::from(run);
    let dep = |reason: Option<String>, restored: Option<ImageRef>| deployment(run, app, idx, image, reason, restored);
    let mut outbox = Vec::new();
    let mut entries = Vec::new();
    let finish = |outbox: &mut Vec<Outbound>, entries: &mut Vec<StepEntry>, outcome: RunOutcome, reason: String| {
        entries.push(entry(key, format!("run {}", run_outcome_word(outcome)), Some(reason.clone())));
        outbox.push(
            emit(
                state,
                &rr,
                "run-finished",
                function,
                EventData::RunFinished(RunFinished {
                    app: app.name.clone(),
                    commit: run.commit.clone(),
                    outcome,
                    reason,
                    stage: Some(stage.name.clone()),
                }),
            )
            .1,
        );
    };

    let stage_health = settle_stage_health(state, run, app, idx, &outcome, started_at).await?;
    match outcome {
        DeployOutcome::Stale { reason } => {
            let reason = format!("not deployed to {}: {reason}", stage.name);
            finish(&mut outbox, &mut entries, RunOutcome::Superseded, reason);
            Ok(Deployed { entries, outbox, status: RunStatus::Superseded, waiting_for: None, stage_health: None })
        }
        DeployOutcome::Failed { reason } => {
            outbox.push(
                emit(
                    state,
                    &rr,
                    &format!("deployment-failed.{}", stage.name),
                    function,
                    EventData::DeploymentFailed(dep(Some(reason.clone()), None)),
                )
                .1,
            );
            entries.push(entry(key, format!("deployment to {} failed", stage.name), Some(reason.clone())));
            finish(&mut outbox, &mut entries, RunOutcome::Failed, format!("deployment to {} failed: {reason}", stage.name));
            Ok(Deployed { entries, outbox, status: RunStatus::Failed, waiting_for: None, stage_health })
        }
        DeployOutcome::RolledBack { reason, restored } => {
            outbox.push(
                emit(
                    state,
                    &rr,
                    &format!("deployment-rolledback.{}", stage.name),
                    function,
                    EventData::DeploymentRolledBack(dep(Some(reason.clone()), restored.clone())),
                )
                .1,
            );
            let back_to = restored.map(|r| r.id).unwrap_or_else(|| "its previous state".into());
            entries.push(entry(key, format!("deployment to {} rolled back", stage.name), Some(format!("{reason}; restored {back_to}"))));
            finish(&mut outbox, &mut entries, RunOutcome::Failed, format!("deployment to {} rolled back: {reason}", stage.name));
            Ok(Deployed { entries, outbox, status: RunStatus::Failed, waiting_for: None, stage_health })
        }
        DeployOutcome::Succeeded => {
            outbox.push(
                emit(
                    state,
                    &rr,
                    &format!("deployment-succeeded.{}", stage.name),
                    function,
                    EventData::DeploymentSucceeded(dep(None, None)),
                )
                .1,
            );
            entries.push(entry(key, format!("deployed to {}", stage.name), Some(image.id.clone())));
            let Some(next) = app.stages.get(idx + 1) else {
                finish(&mut outbox, &mut entries, RunOutcome::Succeeded, format!("deployed to {}", stage.name));
                return Ok(Deployed { entries, outbox, status: RunStatus::Succeeded, waiting_for: None, stage_health });
            };
            let approval_id = approval_id(&run.id, &next.name);
            match &next.approval {
                None => {
                    outbox.push(
                        emit(
                            state,
                            &rr,
                            &format!("approval-decided.{}", next.name),
                            function,
                            EventData::ApprovalDecided(ApprovalDecided {
                                app: app.name.clone(),
                                stage: next.name.clone(),
                                approval_id,
                                image: image.clone(),
                                commit: run.commit.clone(),
                                decision: Decision::Approved,
                                decided_by: vec!["policy".into()],
                                comment: Some(format!("stage {} needs no approval", next.name)),
                            }),
                        )
                        .1,
                    );
                    entries.push(entry(key, format!("promotion to {} approved by policy", next.name), None));
                    Ok(Deployed {
                        entries,
                        outbox,
                        status: RunStatus::Running,
                        waiting_for: Some(format!("deployment to {}", next.name)),
                        stage_health,
                    })
                }
                Some(policy) => {
                    let expires_at = Utc::now() + chrono::Duration::from_std(policy.expiry()).unwrap_or(chrono::Duration::hours(24));
                    // Separation of duties: the people who made the change get no link and no vote.
                    let makers = run.change.people();
                    let (excluded, approvers): (Vec<String>, Vec<String>) =
                        state.policy.expand(&policy.approvers).into_iter().partition(|a| makers.contains(&a.to_ascii_lowercase()));
                    let now = Utc::now();
                    let record = ApprovalRecord {
                        id: approval_id.clone(),
                        run_id: run.id.clone(),
                        app: app.name.clone(),
                        stage: next.name.clone(),
                        commit: run.commit.clone(),
                        image: image.clone(),
                        approvers,
                        quorum: policy.quorum,
                        expires_at,
                        votes: Vec::new(),
                        excluded: excluded
                            .into_iter()
                            .map(|who| Excluded { who, why: "they pushed or wrote commits of this release".into() })
                            .collect(),
                        evidence: Evidence {
                            repository: run.repository.clone(),
                            branch: run.branch.clone(),
                            pusher: run.change.pusher.clone(),
                            commits: run.change.commits.clone(),
                            previous: Some(StageEvidence {
                                stage: stage.name.clone(),
                                target: stage.target.clone(),
                                deployed_at: now,
                                health: "every instance on the new model and HealthState/healthy (Application Health extension)".into(),
                                checks: stage.checks.iter().map(describe_check).collect(),
                            }),
                        },
                        closed: None,
                        escalated: false,
                        audit: vec![AuditEntry { at: now, what: "requested".into(), who: None, detail: None }],
                        traceparent: crate::telemetry::current_traceparent(),
                    };
                    // A newer build reached the stage: older runs waiting for it are superseded.
                    supersede_older(state, app, &next.name, run, function).await?;
                    // Idempotent: a retried step keeps the first record (and its expiry).
                    state.store.put_approval(&record).await?;
                    let record = state.store.approval(&approval_id).await?.unwrap_or(record);
                    state.notify.approval_requested(&notice(state, &record, &record.approvers, NoticeKind::Request, "request")).await?;
                    outbox.push(
                        emit(
                            state,
                            &rr,
                            &format!("approval-requested.{}", next.name),
                            function,
                            EventData::ApprovalRequested(ApprovalRequested {
                                app: app.name.clone(),
                                stage: next.name.clone(),
                                approval_id: record.id.clone(),
                                image: image.clone(),
                                commit: run.commit.clone(),
                                approvers: record.approvers.clone(),
                                quorum: record.quorum,
                                expires_at: record.expires_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                            }),
                        )
                        .1,
                    );
                    outbox.extend(approval_timers(state, &rr, &record, policy, function));
                    let waiting = waiting_for_approval(&record);
                    entries.push(entry(key, format!("approval of {} requested", next.name), Some(waiting.clone())));
                    Ok(Deployed { entries, outbox, status: RunStatus::Waiting, waiting_for: Some(waiting), stage_health })
                }
            }
        }
    }
}

/// What a deployment's outcome does to its stage's health, noting the DORA measures it settles
/// (they count when the step commits): the deployment and its status; the lead time when the last
/// stage got the release; the recovery time when the stage is healthy again after a failure.
async fn settle_stage_health(
    state: &AppState,
    run: &Run,
    app: &App,
    idx: usize,
    outcome: &DeployOutcome,
    started_at: DateTime<Utc>,
) -> Result<Option<StageHealth>> {
    use crate::metrics::{DeploymentStatus, Measure, Recovery, note, seconds_between};
    let stage = &app.stages[idx];
    let last_stage = idx + 1 == app.stages.len();
    let status = match outcome {
        DeployOutcome::Stale { .. } => return Ok(None),
        DeployOutcome::Succeeded => DeploymentStatus::Succeeded,
        DeployOutcome::Failed { .. } => DeploymentStatus::Failed,
        DeployOutcome::RolledBack { .. } => DeploymentStatus::RolledBack,
    };
    let (app_name, stage_name) = (app.name.clone(), stage.name.clone());
    note(Measure::Deployment { app: app_name.clone(), stage: stage_name.clone(), last_stage, status });
    // Deploys to one stage are serialized (sessions), so what is read here is still true at commit.
    let failed_before = state.store.stage_failure(&app.name, &stage.name).await?;
    let now = Utc::now();
    let recovery = |seconds, how| Measure::Recovery { app: app_name.clone(), stage: stage_name.clone(), last_stage, seconds, how };
    Ok(match (status, failed_before) {
        (DeploymentStatus::Succeeded, failed) => {
            if last_stage {
                let (from, kind) = crate::metrics::lead_time_start(run);
                note(Measure::LeadTime {
                    app: app_name.clone(),
                    stage: stage_name.clone(),
                    seconds: seconds_between(from, now),
                    from: kind,
                });
            }
            failed.map(|f| {
                note(recovery(seconds_between(f.since, now), Recovery::Redeploy));
                StageHealth::Recovered { app: app_name.clone(), stage: stage_name.clone() }
            })
        }
        // Rolled back to what ran before: healthy again, unless it was failed already.
        (DeploymentStatus::RolledBack, None) => {
            note(recovery(seconds_between(started_at, now), Recovery::Rollback));
            None
        }
        (DeploymentStatus::RolledBack, Some(_)) => None,
        (DeploymentStatus::Failed, _) => {
            Some(StageHealth::Failed(StageFailure { app: app_name.clone(), stage: stage_name.clone(), since: now, run_id: run.id.clone() }))
        }
    })
}
