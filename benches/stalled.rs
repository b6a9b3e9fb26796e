//! Subscribers that never read must not hurt the others: the release server runs as its own
//! process (in-memory store); healthy subscribers measure push→receive latency while pushes
//! flow, first alone, then with 1,000 stalled subscribers on the same tasks (4 KiB receive
//! buffers, never read). Reports p50/p99 for both phases, their ratio, and the server's RSS.
//!
//! Run: `cargo bench --bench stalled` (builds the release binary first). Knobs:
//! `BENCH_TASKS` (50), `BENCH_STALLED` (1000), `BENCH_RATE` pushes/s (500), `BENCH_SECS` (8),
//! `BENCH_FILL_SECS` (20: pushes before phase 2 is measured, until the stalled buffers fill).

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use serde_json::{Value, json};
use taskcast::auth::Secret;
use taskcast::auth::subscribe::mint;
use taskcast::domain::TaskId;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::Message;

const KEY: &str = "bench-push-key-0123456789abcdef0123";
const SECRET: &str = "bench-subscribe-secret-0123456789abcdef";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize] as f64 / 1000.0
}

/// Starts the release binary and returns it with its address.
async fn start_server() -> (tokio::process::Child, String) {
    let status = std::process::Command::new(env!("CARGO"))
        .args(["build", "--release", "--quiet", "--bin", "taskcast"])
        .status()
        .expect("cargo build");
    assert!(status.success(), "building the release binary failed");
    let target = std::env::var("CARGO_TARGET_DIR")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/target").to_string());
    let mut child = tokio::process::Command::new(format!("{target}/release/taskcast"))
        .args(["--listen", "127.0.0.1:0"])
        .env("TASK_PROCESS_SECRET_KEY", KEY)
        .env("TASKCAST_SUBSCRIBE_SECRET", SECRET)
        .env("TASKCAST_MAX_SUBSCRIBES_PER_SEC", "100000")
        .env("RUST_LOG", "warn,taskcast=info")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start taskcast");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = loop {
        let line = lines
            .next_line()
            .await
            .unwrap()
            .expect("taskcast printed its address");
        if let Some(rest) = line.split("local_addr=").nth(1) {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, addr)
}

/// Pushes round-robin over `tasks` at `rate` for `secs`; the stage carries the send time.
async fn push_for(
    http: &reqwest::Client,
    addr: &str,
    tasks: &[TaskId],
    rate: usize,
    secs: u64,
) -> usize {
    let every = Duration::from_secs_f64(1.0 / rate as f64);
    let started = Instant::now();
    let mut sent = 0;
    let mut next = Instant::now();
    while started.elapsed() < Duration::from_secs(secs) {
        let task = tasks[sent % tasks.len()];
        let body = json!({"progress": (sent % 100) as f64, "stage": format!("t{} {}", now_micros(), "x".repeat(120))});
        let response = http
            .post(format!("http://{addr}/api/tasks/{task}/progress"))
            .bearer_auth(KEY)
            .json(&body)
            .send()
            .await
            .expect("push");
        assert_eq!(response.status(), 200);
        sent += 1;
        next += every;
        tokio::time::sleep_until(next.into()).await;
    }
    sent
}

#[tokio::main]
async fn main() {
    let tasks_n = env_usize("BENCH_TASKS", 50);
    let stalled_n = env_usize("BENCH_STALLED", 1000);
    let rate = env_usize("BENCH_RATE", 500);
    let secs = env_usize("BENCH_SECS", 8) as u64;
    let fill = env_usize("BENCH_FILL_SECS", 20) as u64;
    let (server, addr) = start_server().await;
    let pid = server.id().expect("running");
    let http = reqwest::Client::new();
    let mut tasks = Vec::new();
    for _ in 0..tasks_n {
        let created: Value = http
            .post(format!("http://{addr}/api/tasks"))
            .bearer_auth(KEY)
            .json(&json!({}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        tasks.push(TaskId::parse(created["task_id"].as_str().unwrap()).unwrap());
    }

    // Healthy subscribers: one per task, recording latency from the stage's timestamp.
    let samples: Arc<Mutex<Vec<u64>>> = Arc::default();
    for task in &tasks {
        let token = mint(&Secret::new(SECRET), &[*task], Duration::from_secs(3600));
        let url = format!("ws://{addr}/ws?task_id={task}&token={token}");
        let (mut socket, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("subscribe");
        let samples = samples.clone();
        tokio::spawn(async move {
            while let Some(Ok(message)) = socket.next().await {
                if let Message::Text(text) = message {
                    let state: Value = serde_json::from_str(text.as_str()).unwrap();
                    let sent = state["stage"]
                        .as_str()
                        .and_then(|s| s.strip_prefix('t'))
                        .and_then(|s| s.split(' ').next())
                        .and_then(|s| s.parse::<u64>().ok());
                    if let (Some(sent), false) = (sent, state["snapshot"] == true) {
                        samples
                            .lock()
                            .unwrap()
                            .push(now_micros().saturating_sub(sent));
                    }
                }
            }
        });
    }

    eprint!("phase 1: {tasks_n} healthy subscribers, {rate} pushes/s for {secs} s...\r");
    let rss_before = rss_kib(pid);
    push_for(&http, &addr, &tasks, rate, secs).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut alone = std::mem::take(&mut *samples.lock().unwrap());
    alone.sort_unstable();

    eprint!("phase 2: adding {stalled_n} subscribers that never read...          \r");
    let mut stalled = Vec::with_capacity(stalled_n);
    for i in 0..stalled_n {
        let task = tasks[i % tasks.len()];
        let token = mint(&Secret::new(SECRET), &[task], Duration::from_secs(3600));
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let stream = socket.connect(addr.parse().unwrap()).await.unwrap();
        let url = format!("ws://{addr}/ws?task_id={task}&token={token}");
        let (ws, _) = tokio_tungstenite::client_async(url, stream)
            .await
            .expect("stalled subscriber");
        stalled.push(ws); // held, never polled again
    }
    let rss_stalled_idle = rss_kib(pid);
    // Until their socket buffers are full, never-reading subscribers still take every
    // frame (they are indistinguishable from slow readers); measure once they are full.
    eprint!("phase 2: filling the stalled subscribers' buffers for {fill} s...          \r");
    push_for(&http, &addr, &tasks, rate, fill).await;
    samples.lock().unwrap().clear();
    eprint!("phase 2: {stalled_n} stalled + {tasks_n} healthy, {rate} pushes/s for {secs} s...\r");
    push_for(&http, &addr, &tasks, rate, secs).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss_after = rss_kib(pid);
    let mut with_stalled = std::mem::take(&mut *samples.lock().unwrap());
    with_stalled.sort_unstable();

    let (p50a, p99a) = (percentile(&alone, 0.5), percentile(&alone, 0.99));
    let (p50b, p99b) = (
        percentile(&with_stalled, 0.5),
        percentile(&with_stalled, 0.99),
    );
    println!(
        "\nstalled-subscriber bench: release server process, in-memory store, {tasks_n} tasks, {rate} pushes/s, {secs} s per phase"
    );
    println!("| phase | deliveries | p50 | p99 | server RSS |");
    println!("|---|---|---|---|---|");
    println!(
        "| healthy only | {} | {p50a:.2} ms | {p99a:.2} ms | {} KiB |",
        alone.len(),
        rss_before
    );
    println!(
        "| + {stalled_n} never-reading subscribers | {} | {p50b:.2} ms | {p99b:.2} ms | {} KiB |",
        with_stalled.len(),
        rss_after
    );
    println!(
        "p99 ratio {:.2}x (target ≤ 2x: {}); RSS +{} KiB for {stalled_n} stalled connections after {} pushes to them ({:.1} KiB each), {} KiB before those pushes",
        p99b / p99a,
        if p99b <= 2.0 * p99a { "pass" } else { "FAIL" },
        rss_after.saturating_sub(rss_before),
        (rate as u64 * (secs + fill)),
        rss_after.saturating_sub(rss_before) as f64 / stalled_n as f64,
        rss_stalled_idle.saturating_sub(rss_before),
    );
    drop(stalled);
    drop(server);
}
