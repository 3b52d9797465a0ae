//! The cost telemetry adds to an invocation: a benchmark that prints figures, not a timed test.
//! `cargo bench -p deploychain-functions --bench telemetry` (optionally `-- N`, default 100000).
//!
//! Each phase runs in its own process (the exporters are process-global) and measures, in the same
//! run, the floor — building an invocation's attributes and awaiting a step that does nothing —
//! and then the same through `telemetry::invocation` (its span, the step-duration histogram):
//!
//! - `off`: no exporter configured (the SDK's no-op provider);
//! - `exporting`: spans and metrics exported over OTLP/HTTP to a collector that answers at once;
//! - `stuck`: the collector accepts connections and never answers: export is stuck for its whole
//!   timeout, and invocations must not wait for it.
//!
//! Figures are ns per invocation and ratios against the floor of the same process.

use deploychain_functions::telemetry;
use opentelemetry::KeyValue;
use opentelemetry::trace::SpanKind;
use std::hint::black_box;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

const PHASES: [&str; 3] = ["off", "exporting", "stuck"];

fn attributes(i: usize) -> Vec<KeyValue> {
    vec![
        KeyValue::new("faas.trigger", "pubsub"),
        KeyValue::new("faas.name", "on_image_ready"),
        KeyValue::new("faas.invocation_id", format!("5d0c3a0e-0000-4000-8000-{i:012}")),
        KeyValue::new("messaging.system", "servicebus"),
        KeyValue::new("messaging.operation.type", "process"),
        KeyValue::new("messaging.message.id", format!("web-738a951d2f3e.image-ready.{i}")),
        KeyValue::new("messaging.servicebus.message.delivery_count", 1_i64),
        KeyValue::new("cicd.pipeline.name", "web"),
        KeyValue::new("cicd.pipeline.run.id", "web-738a951d2f3e"),
        KeyValue::new("cicd.pipeline.task.name", "on_image_ready"),
        KeyValue::new("cloudevents.event_id", format!("web-738a951d2f3e.image-ready.{i}")),
        KeyValue::new("cloudevents.event_type", "dev.deploychain.image.ready.v1"),
    ]
}

const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// A collector on a free port: answering 200 to every request, or accepting and never answering.
fn collector(answer: bool) -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in l.incoming().flatten() {
            if answer {
                std::thread::spawn(move || serve(s));
            } else {
                held.push(s);
            }
        }
    });
    format!("http://{addr}")
}

/// Read each request (headers, then Content-Length bytes) and answer 200, on one connection.
fn serve(mut s: std::net::TcpStream) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    loop {
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let len: usize = head.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0);
        while buf.len() < end + 4 + len {
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..end + 4 + len);
        if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n").is_err() {
            return;
        }
    }
}

fn phase(name: &str, n: usize) {
    // The collector runs in the parent process, which passed its endpoint in the environment.
    assert_eq!(name == "off", std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").is_err(), "phase {name}");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let telemetry = rt.block_on(async { telemetry::init() }).expect("telemetry");
    let run = |through: bool, n: usize| {
        rt.block_on(async {
            let start = Instant::now();
            for i in 0..n {
                let attrs = attributes(i);
                if through {
                    let r = telemetry::invocation("on_image_ready", SpanKind::Consumer, Some(PARENT.into()), attrs, async { Ok(i) }).await;
                    black_box(r.expect("ok"));
                } else {
                    black_box(attrs);
                    black_box(async { deploychain_functions::error::Result::<usize>::Ok(i) }.await.expect("ok"));
                }
            }
            start.elapsed()
        })
    };
    let _ = run(true, n / 10);
    let floor = run(false, n);
    let through = run(true, n);
    let per = |d: Duration| d.as_nanos() as f64 / n as f64;
    println!(
        "{name:<10} floor {:>8.0} ns   invocation {:>8.0} ns   × {:>5.1}",
        per(floor),
        per(through),
        per(through) / per(floor).max(1.0)
    );
    let start = Instant::now();
    rt.block_on(telemetry.shutdown());
    if name != "off" {
        println!("{name:<10} shutdown flush {:>6.0} ms", start.elapsed().as_secs_f64() * 1000.0);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let n: usize = args.iter().find_map(|a| a.parse().ok()).unwrap_or(100_000);
    if let Some(p) = args.iter().position(|a| a == "--phase") {
        phase(&args[p + 1], n);
        return;
    }
    println!("telemetry per invocation, {n} invocations per figure (ns; × the floor of the same process)");
    let exe = std::env::current_exe().expect("exe");
    for p in PHASES {
        let mut cmd = std::process::Command::new(&exe);
        cmd.args(["--phase", p, &n.to_string()]).env_remove("OTEL_EXPORTER_OTLP_ENDPOINT").env("RUST_LOG", "error");
        if p != "off" {
            let endpoint = collector(p == "exporting");
            cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint).env("OTEL_METRIC_EXPORT_INTERVAL", "200").env("OTEL_BSP_SCHEDULE_DELAY", "50");
        }
        let status = cmd.status().expect("phase");
        assert!(status.success(), "phase {p} failed");
    }
}
