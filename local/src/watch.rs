//! What `deploychain up` shows in the terminal: every chain event as it happens (from the
//! `local-watch` subscription, which sees everything on the topic) and the approval links the
//! handler sends to approvers (the notify webhook points at the local stack).

use deploychain_bus::{Broker, EntityPath};
use deploychain_events::*;
use std::time::Duration;
use tokio::sync::{broadcast, watch};

pub const SUBSCRIPTION: &str = "local-watch";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// A chain event, described in one line.
    Event { run: String, ty: EventType, line: String },
    /// An approver's signed link arrived.
    Approval { run: String, approver: String, link: String },
    /// The watchdog says a run stopped making progress.
    Stuck { run: String, text: String },
    /// Something happened to a scale set (the local ARM endpoint saw it).
    Target { scale_set: String, line: String },
}

pub fn describe(ev: &DeployEvent) -> String {
    let short = |c: &str| c.chars().take(12).collect::<String>();
    match &ev.data {
        EventData::Push(p) => format!("push {}@{} by {}", p.branch, short(&p.commit), p.pusher.as_deref().unwrap_or("someone")),
        EventData::BuildRequested(b) => {
            format!("build requested ({}{})", provider(b.provider), b.pipeline.as_deref().map(|p| format!(" {p}")).unwrap_or_default())
        }
        EventData::BuildCompleted(b) => format!(
            "build {} {}",
            b.build_id,
            match b.outcome {
                BuildOutcome::Succeeded => "succeeded",
                BuildOutcome::Failed => "FAILED",
                BuildOutcome::Canceled => "canceled",
            }
        ),
        EventData::ImageRequested(i) => format!("image requested from {} ({})", i.source, i.destination),
        EventData::ImageDue(d) => format!("looking at the bake {} (look {})", d.bake.rsplit('/').next().unwrap_or(&d.bake), d.attempt),
        EventData::ImageReady(i) => format!("image ready {}", i.image.id),
        EventData::DeploymentDue(d) => format!("rolling out to {}: look {}", d.stage, d.look),
        EventData::DeploymentStarted(d) => format!("deploying to {} ({})", d.stage, d.target.rsplit('/').next().unwrap_or_default()),
        EventData::DeploymentSucceeded(d) => format!("deployed to {}", d.stage),
        EventData::DeploymentFailed(d) => format!("deployment to {} FAILED: {}", d.stage, d.reason.as_deref().unwrap_or("")),
        EventData::DeploymentRolledBack(d) => format!("deployment to {} ROLLED BACK: {}", d.stage, d.reason.as_deref().unwrap_or("")),
        EventData::ApprovalRequested(a) => format!("waiting for approval of {} by {} of [{}]", a.stage, a.quorum, a.approvers.join(", ")),
        EventData::ApprovalDecided(a) => {
            format!("{} {} by {}", a.stage, if a.decision == Decision::Approved { "approved" } else { "REJECTED" }, a.decided_by.join(", "))
        }
        EventData::ApprovalDue(d) => format!(
            "{} of the {} approval due",
            match d.due {
                DueKind::Reminder => "reminder",
                DueKind::Timeout => "timeout",
            },
            d.stage
        ),
        EventData::ApprovalChanged(c) => format!(
            "approval of {} {}{}{}",
            c.stage,
            match c.change {
                ApprovalChange::Voted => "voted by",
                ApprovalChange::Reminded => "reminded to",
                ApprovalChange::Escalated => "ESCALATED to",
                ApprovalChange::Expired => "EXPIRED",
                ApprovalChange::Superseded => "SUPERSEDED",
            },
            if c.people.is_empty() { String::new() } else { format!(" {}", c.people.join(", ")) },
            c.detail.as_deref().map(|d| format!(" ({d})")).unwrap_or_default()
        ),
        EventData::DeadLetterHandled(d) => format!(
            "{} {} {} by {}",
            match d.action {
                DeadLetterAction::Replayed => "REPLAYED",
                DeadLetterAction::Purged => "PURGED",
            },
            d.message_id,
            d.new_message_id.as_deref().map(|n| format!("as {n}")).unwrap_or_default(),
            d.by
        ),
        EventData::RunFinished(r) => format!(
            "run {}: {}",
            match r.outcome {
                RunOutcome::Succeeded => "succeeded",
                RunOutcome::Failed => "FAILED",
                RunOutcome::Rejected => "rejected",
                RunOutcome::Superseded => "superseded",
            },
            r.reason
        ),
    }
}

fn provider(p: BuildProvider) -> &'static str {
    p.display_name()
}

pub async fn watch_events(broker: Broker, topic: String, tx: broadcast::Sender<Progress>, mut stop: watch::Receiver<bool>) {
    let Ok(path) = format!("{topic}/subscriptions/{SUBSCRIPTION}").parse::<EntityPath>() else { return };
    loop {
        let got = tokio::select! {
            r = broker.receive_and_delete(&path, Duration::from_secs(2)) => r,
            _ = stop.wait_for(|s| *s) => return,
        };
        match got {
            Ok(Some(m)) => {
                if let Ok(ev) = DeployEvent::from_json_bytes(&m.body) {
                    let _ = tx.send(Progress::Event { run: ev.run_id.clone(), ty: ev.event_type(), line: describe(&ev) });
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(target: "watch", "{e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// The scale sets' activity, from the local ARM endpoint.
pub async fn watch_targets(
    mut arm: broadcast::Receiver<crate::arm::Activity>,
    tx: broadcast::Sender<Progress>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let got = tokio::select! {
            r = arm.recv() => r,
            _ = stop.wait_for(|s| *s) => return,
        };
        match got {
            Ok(a) => {
                let _ = tx.send(Progress::Target { scale_set: a.scale_set, line: a.line });
            }
            Err(broadcast::error::RecvError::Lagged(_)) => {}
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// The notify webhook receiver: one POST per approver (`to`, `link`, `runId`, …).
pub fn notify_router(tx: broadcast::Sender<Progress>) -> axum::Router {
    axum::Router::new().route(
        "/notify",
        axum::routing::post(move |body: axum::Json<serde_json::Value>| {
            let tx = tx.clone();
            async move {
                let s = |k: &str| body.get(k).and_then(|v| v.as_str()).unwrap_or_default().to_string();
                let _ = if s("kind") == "stuck" {
                    tx.send(Progress::Stuck { run: s("runId"), text: s("text") })
                } else {
                    tx.send(Progress::Approval { run: s("runId"), approver: s("to"), link: s("link") })
                };
                axum::http::StatusCode::ACCEPTED
            }
        }),
    )
}
