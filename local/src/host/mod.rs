//! A local Azure Functions host for custom handlers: it reads the same `host.json`,
//! `*/function.json` and `local.settings.json` the real host reads, starts the same `handler`
//! executable, and speaks the real custom-handler protocol to it — HTTP front door and Service Bus
//! triggers — so production code has no local branches.

pub mod app;
pub mod envelope;
pub mod host_json;
pub mod http;
pub mod servicebus;
pub mod timer;
pub mod worker;

use anyhow::{Context, Result};
use app::{FunctionApp, Trigger};
use deploychain_bus::Broker;
use std::net::SocketAddr;
use tokio::sync::watch;
use worker::Worker;

/// How long a stopping host lets in-flight invocations finish.
pub const DRAIN: std::time::Duration = std::time::Duration::from_secs(10);

pub struct LocalHost {
    pub app: FunctionApp,
    pub worker: Worker,
    pub http_addr: SocketAddr,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Send what a function's `serviceBus` output bindings say for this answer (§3.2–§3.3), one
/// message at a time with `ContentType: text/plain` and no MessageId, as the host does. Returns
/// how many were sent; an error (a strict-mode conversion, a failed send) fails the invocation.
pub async fn send_outputs(
    broker: &Broker,
    outputs: &[app::BusOutput],
    has_return: bool,
    answer: &serde_json::Value,
    strict: bool,
) -> std::result::Result<usize, String> {
    let mut batches = Vec::new();
    for o in outputs {
        batches.push((o, envelope::bus_output_messages(answer, o, has_return, strict)?));
    }
    let mut sent = 0;
    for (o, bodies) in batches {
        for body in bodies {
            let m = deploychain_bus::NewMessage { body, content_type: Some("text/plain".into()), ..Default::default() };
            broker.send(&o.entity, m).await.map_err(|e| format!("output `{}` could not be sent to `{}`: {e}", o.name, o.entity))?;
            sent += 1;
        }
    }
    Ok(sent)
}

impl LocalHost {
    /// Start the handler, the front door on `http` and one trigger loop per Service Bus function.
    pub async fn start(
        app: FunctionApp,
        env: Vec<(String, String)>,
        broker: Broker,
        namespace: &str,
        http: tokio::net::TcpListener,
        keys: http::Keys,
    ) -> Result<LocalHost> {
        let worker = Worker::start(&app, env).await.context("starting the custom handler")?;
        let http_addr = http.local_addr()?;
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        let router = http::FrontDoor::new(&app, worker.clone(), keys, broker.clone()).router();
        tasks.push(tokio::spawn(http::serve(http, router, stop_rx.clone(), http::Limits::default().headers_timeout)));
        for f in &app.functions {
            if let Trigger::Timer(t) = &f.trigger {
                tasks.push(tokio::spawn(timer::run(f.name.clone(), t.clone(), worker.clone(), app.host.function_timeout, stop_rx.clone())));
            }
            if let Trigger::ServiceBus(t) = &f.trigger {
                let l = servicebus::TriggerLoop {
                    function: f.name.clone(),
                    trigger: t.clone(),
                    outputs: f.outputs.clone(),
                    has_return: f.has_return,
                    host: app.host.clone(),
                    broker: broker.clone(),
                    worker: worker.clone(),
                    namespace: namespace.to_string(),
                };
                tasks.push(tokio::spawn(l.run(stop_rx.clone())));
            }
        }
        Ok(LocalHost { app, worker, http_addr, stop, tasks })
    }

    /// Each function's invocation counts since the host started.
    pub fn invocations(&self) -> std::collections::BTreeMap<String, worker::InvocationCounts> {
        self.worker.counts()
    }

    /// The handler's recent output lines (its logs), oldest first.
    pub fn handler_log(&self) -> Vec<String> {
        self.worker.log()
    }

    /// Stop receiving, let in-flight invocations settle (up to [`DRAIN`] in all), then stop the
    /// handler: what is still in flight then fails and its messages come back.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let deadline = tokio::time::Instant::now() + DRAIN;
        for t in self.tasks {
            let _ = tokio::time::timeout_at(deadline, t).await;
        }
        self.worker.shutdown();
    }
}
