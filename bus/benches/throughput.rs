//! Throughput of the embedded bus: a benchmark that prints figures, not a timed test.
//! `cargo bench -p deploychain-bus` (optionally `-- N` for the message count, default 2000).
//!
//! For each store (in memory; a file with WAL and synchronous=FULL, i.e. one fsync per commit)
//! it measures, one operation at a time: sends to a queue, peek-lock + complete of those
//! messages, and sends to a topic that fans out to three subscriptions.

use deploychain_bus::{Broker, EntityPath, NewMessage, Queue, Subscription, Topic, Topology};
use std::time::{Duration, Instant};

fn topology() -> anyhow::Result<Topology> {
    let mut t = Topology::new("bench");
    t.add_queue(Queue::new("work"))?;
    t.add_queue(Queue::new("later"))?;
    let mut sessions = Queue::new("runs");
    sessions.requires_session = true;
    t.add_queue(sessions)?;
    let mut topic = Topic::new("events");
    topic.requires_duplicate_detection = true;
    for s in ["a", "b", "c"] {
        topic.subscriptions.push(Subscription::new(s));
    }
    t.add_topic(topic)?;
    Ok(t)
}

fn rate(n: usize, d: Duration) -> String {
    format!("{:>9.0}/s  ({:>7.1} µs each)", n as f64 / d.as_secs_f64(), d.as_secs_f64() * 1e6 / n as f64)
}

async fn run(name: &str, b: &Broker, n: usize) -> anyhow::Result<[Duration; 3]> {
    let body = vec![b'x'; 1024];
    let queue = EntityPath::queue("work");

    let start = Instant::now();
    for i in 0..n {
        b.send("work", NewMessage { message_id: Some(format!("m-{i}")), ..NewMessage::new(body.clone()) }).await?;
    }
    let send = start.elapsed();

    let start = Instant::now();
    let mut received = 0;
    while let Some(m) = b.peek_lock(&queue, Duration::ZERO).await? {
        b.complete(&queue, m.lock_token.ok_or_else(|| anyhow::anyhow!("no lock token"))?).await?;
        received += 1;
    }
    let receive = start.elapsed();
    anyhow::ensure!(received == n, "received {received} of {n}");

    let start = Instant::now();
    for i in 0..n {
        b.send("events", NewMessage { message_id: Some(format!("e-{i}")), ..NewMessage::new(body.clone()) }).await?;
    }
    let fan_out = start.elapsed();

    println!("{name}");
    println!("  send to a queue (1 KiB)          {}", rate(n, send));
    println!("  peek-lock + complete             {}", rate(n, receive));
    println!("  send to a topic, 3 subscriptions {}  (duplicate detection on)", rate(n, fan_out));
    Ok([send, receive, fan_out])
}

/// Sends from `tasks` senders at once: with group commit they share fsyncs.
async fn concurrent(b: &Broker, n: usize, tasks: usize) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut handles = Vec::new();
    for t in 0..tasks {
        let b = b.clone();
        handles.push(tokio::spawn(async move {
            for i in (t..n).step_by(tasks) {
                b.send("work", NewMessage { message_id: Some(format!("c-{i}")), ..NewMessage::new(vec![b'x'; 1024]) }).await?;
            }
            anyhow::Ok(())
        }));
    }
    for h in handles {
        h.await??;
    }
    Ok(start.elapsed())
}

/// Receives (plain and by session) with and without `waiting` scheduled messages ahead of the
/// due ones in sequence order, like a chain whose runs each hold a reminder for tomorrow.
/// Returns (plain, with waiting; by session, with waiting).
async fn behind_schedule(b: &Broker, n: usize, waiting: usize) -> anyhow::Result<[Duration; 4]> {
    async fn drain(b: &Broker, queue: &str, n: usize) -> anyhow::Result<Duration> {
        let path = EntityPath::queue(queue);
        let start = Instant::now();
        for _ in 0..n {
            let m = b.peek_lock(&path, Duration::ZERO).await?.ok_or_else(|| anyhow::anyhow!("{queue}: a message is missing"))?;
            b.complete(&path, m.lock_token.ok_or_else(|| anyhow::anyhow!("no lock token"))?).await?;
        }
        Ok(start.elapsed())
    }
    async fn drain_sessions(b: &Broker, n: usize) -> anyhow::Result<Duration> {
        let path = EntityPath::queue("runs");
        let start = Instant::now();
        for _ in 0..n {
            let s = b.accept_session(&path, Duration::ZERO).await?.ok_or_else(|| anyhow::anyhow!("runs: a session is missing"))?;
            let m = b.session_peek_lock(&s, Duration::ZERO).await?.ok_or_else(|| anyhow::anyhow!("runs: a message is missing"))?;
            b.complete(&path, m.lock_token.ok_or_else(|| anyhow::anyhow!("no lock token"))?).await?;
            b.release_session(&s).await?;
        }
        Ok(start.elapsed())
    }
    let due = |i: usize, session: bool| NewMessage {
        message_id: Some(format!("d-{i}")),
        session_id: session.then(|| format!("due-{i}")),
        ..NewMessage::new(vec![b'x'; 1024])
    };
    let tomorrow = chrono::Utc::now() + chrono::Duration::days(1);
    let scheduled = |i: usize, session: bool| NewMessage {
        message_id: Some(format!("s-{i}")),
        session_id: session.then(|| format!("waiting-{i}")),
        scheduled_enqueue_time: Some(tomorrow),
        ..NewMessage::new(vec![b'x'; 1024])
    };
    let mut out = [Duration::ZERO; 4];
    for (k, session) in [false, true].into_iter().enumerate() {
        let (queue, with) = if session { ("runs", "runs") } else { ("work", "later") };
        b.send_batch(queue, (0..n).map(|i| due(i, session)).collect()).await?;
        out[2 * k] = if session { drain_sessions(b, n).await? } else { drain(b, queue, n).await? };
        for chunk in (0..waiting).collect::<Vec<_>>().chunks(500) {
            b.send_batch(with, chunk.iter().map(|&i| scheduled(i, session)).collect()).await?;
        }
        b.send_batch(with, (0..n).map(|i| due(n + i, session)).collect()).await?;
        out[2 * k + 1] = if session { drain_sessions(b, n).await? } else { drain(b, with, n).await? };
    }
    Ok(out)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; a bare number overrides the message count.
    let n = std::env::args().skip(1).find_map(|a| a.parse::<usize>().ok()).unwrap_or(2000);
    println!("deploychain-bus throughput, {n} messages, sequential operations\n");

    // The in-memory store is the baseline: the file store's figures are also given as its ratio.
    let baseline = run("in memory", &Broker::open_in_memory(topology()?)?, n).await?;

    let dir = std::env::temp_dir().join(format!("deploychain-bus-bench-{}", std::process::id()));
    let file = dir.join("bus.sqlite");
    let result = async {
        let b = Broker::open(&file, topology()?)?;
        let r = run(&format!("file {} (WAL, synchronous=FULL)", file.display()), &b, n).await?;
        // Group commit: concurrent senders share a commit (and its fsync), each still answered
        // only once its message is on disk.
        let together = concurrent(&b, n, 32).await?;
        println!(
            "  send to a queue, 32 senders at once {}  ({:.1}x the one-at-a-time rate)",
            rate(n, together),
            r[0].as_secs_f64() / together.as_secs_f64()
        );
        let waiting = 10 * n;
        let [plain, plain_waiting, session, session_waiting] = behind_schedule(&b, n, waiting).await?;
        println!("  with {waiting} scheduled messages waiting ahead (each receive vs the same with none, same run)");
        println!(
            "    peek-lock + complete         {}  ({:.2}x)",
            rate(n, plain_waiting),
            plain_waiting.as_secs_f64() / plain.as_secs_f64()
        );
        println!(
            "    accept session + lock + complete + release {}  ({:.2}x)",
            rate(n, session_waiting),
            session_waiting.as_secs_f64() / session.as_secs_f64()
        );
        anyhow::Ok(r)
    }
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    let durable = result?;
    println!("\ndurable file vs in-memory baseline (time per operation, same run)");
    for (what, (d, b)) in ["send to a queue", "peek-lock + complete", "topic fan-out"].iter().zip(durable.iter().zip(baseline.iter())) {
        println!("  {what:<22} {:>5.1}x", d.as_secs_f64() / b.as_secs_f64());
    }
    Ok(())
}
