//! The local status page (`deploychain up` serves it on 127.0.0.1:7070): runs with their steps on a
//! timeline and what each waits for, pending approvals with the approvers' links, dead-letter and
//! parked counts, and what each scale set runs — the page a person looks at instead of reading
//! JSON. Plain server-rendered HTML that refreshes itself; it reads the runs through the same runs
//! API operators use, and the bus and scale sets from the stack itself.

use crate::arm::LocalArm;
use crate::secrets::Secrets;
use crate::watch::Progress;
use axum::extract::State;
use axum::response::Html;
use deploychain_bus::{Broker, EntityPath};
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tokio::sync::broadcast;

#[derive(Clone)]
pub struct StatusPage {
    pub front_door: String,
    pub secrets: Secrets,
    pub broker: Broker,
    pub arm: LocalArm,
    pub policy: Arc<deploychain_functions::policy::Policy>,
    /// The approval links the approvers were sent, by (run, approver).
    pub links: Arc<Mutex<BTreeMap<(String, String), String>>>,
    pub http: reqwest::Client,
}

impl StatusPage {
    pub fn router(self) -> axum::Router {
        axum::Router::new().route("/", axum::routing::get(page)).with_state(self)
    }

    /// Keep the links the notify webhook receives (the local stack is the approvers' inbox).
    /// Keep the approval links the progress view passes on, until the stack stops.
    pub async fn collect_links(self, mut rx: broadcast::Receiver<Progress>, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            let got = tokio::select! {
                got = rx.recv() => got,
                _ = stop.wait_for(|s| *s) => return,
            };
            match got {
                Ok(Progress::Approval { run, approver, link }) => {
                    if let Ok(mut m) = self.links.lock() {
                        m.insert((run, approver), link);
                    }
                }
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    async fn api(&self, path: &str) -> Option<Value> {
        let rsp = self
            .http
            .get(format!("{}/api/{path}", self.front_door))
            .header("x-functions-key", &self.secrets.function_key)
            .send()
            .await
            .ok()?;
        rsp.json().await.ok()
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn s(v: &Value) -> String {
    v.as_str().map(str::to_string).unwrap_or_else(|| "-".into())
}

fn clock(t: &Value) -> String {
    t.as_str()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&chrono::Local).format("%H:%M:%S").to_string())
        .unwrap_or_else(|| "--:--:--".into())
}

const STYLE: &str = "body{font:14px/1.45 system-ui,sans-serif;margin:1.5rem auto;max-width:70rem;padding:0 1rem;color:#1b1f24}\
h1{font-size:1.4rem}h2{font-size:1.1rem;margin-top:1.8rem}table{border-collapse:collapse;width:100%}\
td,th{text-align:left;padding:.3rem .5rem;border-bottom:1px solid #d0d7de;vertical-align:top}th{color:#57606a;font-weight:600}\
.succeeded{color:#1a7f37}.failed,.rejected{color:#cf222e}.waiting{color:#9a6700}.running{color:#0969da}.superseded{color:#57606a}\
ol.timeline{margin:.2rem 0 .6rem;padding-left:1.2rem;color:#424a53}code{font-size:.9em}.stuck{color:#cf222e;font-weight:600}";

async fn page(State(p): State<StatusPage>) -> Html<String> {
    let runs = p.api("runs?limit=20").await.and_then(|v| v["runs"].as_array().cloned()).unwrap_or_default();
    let mut approvals = String::new();
    let mut rows = String::new();
    for r in &runs {
        let id = s(&r["id"]);
        let status = s(&r["status"]);
        let waiting = &r["waiting"];
        if waiting["kind"] == "approval" {
            let links: Vec<String> = p
                .links
                .lock()
                .map(|m| {
                    m.iter().filter(|((run, _), _)| *run == id).map(|((_, who), link)| (who.clone(), link.clone())).collect::<Vec<_>>()
                })
                .unwrap_or_default()
                .into_iter()
                .filter(|(who, _)| waiting["on"].as_array().is_some_and(|on| on.iter().any(|o| o == who.as_str())))
                .map(|(who, link)| format!("<a class=\"approve-link\" href=\"{}\">open as {}</a>", esc(&link), esc(&who)))
                .collect();
            approvals.push_str(&format!(
                "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&id),
                esc(&s(&waiting["for"])),
                esc(&waiting["on"].as_array().map(|a| a.iter().map(s).collect::<Vec<_>>().join(", ")).unwrap_or_default()),
                esc(&s(&waiting["expiresIn"])),
                links.join(" ")
            ));
        }
        let detail = p.api(&format!("runs/{id}")).await.unwrap_or(Value::Null);
        let steps: String = detail["steps"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|st| {
                let d = st["detail"].as_str().map(|d| format!(" — <span>{}</span>", esc(d))).unwrap_or_default();
                format!("<li><code>{}</code> {}{d}</li>", clock(&st["at"]), esc(&s(&st["what"])))
            })
            .collect();
        let what = match waiting["text"].as_str() {
            Some(t) if waiting["stuck"] == true => format!("<span class=\"stuck\">{}</span>", esc(t)),
            Some(t) => esc(t),
            None => String::new(),
        };
        rows.push_str(&format!(
            "<tr class=\"run\" id=\"run-{id}\"><td><code>{id}</code><br>{app} <code>{branch}</code></td><td class=\"{status}\">{status}</td><td>{what}<ol class=\"timeline\">{steps}</ol></td></tr>",
            id = esc(&id),
            app = esc(&s(&r["app"])),
            branch = esc(&s(&r["branch"])),
            status = esc(&status),
        ));
    }
    let mut letters = String::new();
    let topology = p.broker.topology().clone();
    // (name, entity, dead-letter sub-queue?) — a count is per entity, its DLQ counted apart.
    let mut entities: Vec<(String, EntityPath, bool)> = Vec::new();
    for t in &topology.topics {
        for sub in &t.subscriptions {
            if let Ok(path) = format!("{}/subscriptions/{}", t.name, sub.name).parse::<EntityPath>() {
                entities.push((format!("{}/{} dead-letter queue", t.name, sub.name), path, true));
            }
        }
    }
    for q in &topology.queues {
        if let Ok(path) = q.name.parse::<EntityPath>() {
            entities.push((q.name.clone(), path.clone(), false));
            entities.push((format!("{} dead-letter queue", q.name), path, true));
        }
    }
    for (name, path, dlq) in entities {
        if let Ok(c) = p.broker.count(&path).await {
            let n = if dlq { c.dead_lettered } else { c.active + c.locked };
            // Every dead-letter queue that holds something, and the parking queue always.
            if n > 0 || !dlq {
                letters.push_str(&format!("<tr><td>{}</td><td class=\"count\">{n}</td></tr>", esc(&name)));
            }
        }
    }
    let mut scale_sets = String::new();
    for app in &p.policy.apps {
        for st in &app.stages {
            if let Some(ss) = p.arm.scale_set(&st.target) {
                let healthy = ss.instances.iter().filter(|v| v.health == "HealthState/healthy" && v.latest).count();
                let artifact = ss.image().map(crate::arm::short_artifact).unwrap_or_else(|| "-".into());
                scale_sets.push_str(&format!(
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td><td>{healthy} of {} healthy on the model</td></tr>",
                    esc(st.target.rsplit('/').next().unwrap_or_default()),
                    esc(&format!("{}/{}", app.name, st.name)),
                    esc(&artifact),
                    esc(ss.tag("deploychain.run").unwrap_or("-")),
                    ss.instances.len()
                ));
            }
        }
    }
    let none = |rows: &str, cols: usize, what: &str| {
        if rows.is_empty() { format!("<tr><td colspan=\"{cols}\">{what}</td></tr>") } else { rows.to_string() }
    };
    Html(format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"5\"><title>deploychain — local</title>\
         <style>{STYLE}</style></head><body><h1>deploychain on this machine</h1>\
         <h2>Pending approvals</h2><table id=\"approvals\"><tr><th>run</th><th>waits for</th><th>from</th><th>expires in</th><th>links</th></tr>{approvals}</table>\
         <h2>Runs</h2><table id=\"runs\"><tr><th>run</th><th>status</th><th>what it waits for, and its steps</th></tr>{runs}</table>\
         <h2>Dead letters and parked messages</h2><table id=\"deadletters\"><tr><th>entity</th><th>messages</th></tr>{letters}</table>\
         <h2>Scale sets</h2><table id=\"scalesets\"><tr><th>scale set</th><th>stage</th><th>runs</th><th>run</th><th>instances</th></tr>{scale_sets}</table>\
         </body></html>",
        approvals = none(&approvals, 5, "none"),
        runs = none(&rows, 3, "no runs yet: <code>cargo run -p deploychain -- send github push</code>"),
        letters = none(&letters, 2, "none"),
        scale_sets = none(&scale_sets, 5, "none"),
    ))
}
