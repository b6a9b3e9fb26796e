//! Push → subscriber latency, with the durable commit in the path.
//!
//! Boots the real server in-process on 127.0.0.1:0, creates `BENCH_TASKS` tasks (default
//! 1), opens one WebSocket per task, then pushes `BENCH_PUSHES` updates in total (default
//! 2000, split evenly between the tasks). Each task's pushes are sequential: the next one
//! is sent once the previous one is acknowledged. For every push it records
//!
//! - push→receive: from just before the HTTP request is sent to the moment the subscriber
//!   receives the message carrying that push's `version`;
//! - ack: from the same instant to the 200 answer's headers (sent only after the commit).
//!
//! The server runs on its own multi-thread runtime, the generator and the subscribers on a
//! single-thread one, so the measuring side does not compete for the server's workers.
//!
//! ```text
//! cargo bench --bench latency                                  # in-memory store
//! TASKCAST_BENCH_DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres \
//!     cargo bench --bench latency                              # Postgres
//! ```
//!
//! With Postgres, the URL names any database on the server (in URL form): the bench
//! creates a fresh `bench_<uuid>` database next to it, applies the schema, and drops it
//! at the end (also on error or Ctrl-C; only a kill leaves it behind).

use std::collections::HashMap;
use std::error::Error;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};
use taskcast::App;
use taskcast::auth::PushKey;
use taskcast::config::Config;
use tokio::runtime::{Builder, Handle};
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_postgres::NoTls;
use tokio_tungstenite::connect_async;
use tokio_tungstenite::tungstenite::Message;

type BoxError = Box<dyn Error + Send + Sync>;

const KEY: &str = "bench-key";
/// How long a subscriber waits for the next message before giving up.
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// One push: its version, when it was sent, and how long the 200 took.
struct Push {
    version: i64,
    sent: Instant,
    ack: Duration,
}

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(default)
}

fn main() -> Result<(), BoxError> {
    let tasks = env_count("BENCH_TASKS", 1);
    let per_task = (env_count("BENCH_PUSHES", 2000) / tasks).max(1);
    // The generator and the subscribers act as another process would. With everything on
    // one runtime, the in-process push loop starved the server's WebSocket tasks: 3-4 ms
    // delivery stalls and heavy conflation that a deployment would not see.
    let server_runtime = Builder::new_multi_thread().enable_all().build()?;
    let server = server_runtime.handle();
    let client_runtime = Builder::new_current_thread().enable_all().build()?;
    client_runtime.block_on(async {
        let Ok(admin_url) = std::env::var("TASKCAST_BENCH_DATABASE_URL") else {
            return bench(server, "memory", None, tasks, per_task).await;
        };
        let (admin, connection) = tokio_postgres::connect(&admin_url, NoTls).await?;
        tokio::spawn(connection);
        let name = format!("bench_{}", uuid::Uuid::new_v4().simple());
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await?;
        let url = with_database(&admin_url, &name);
        let result = tokio::select! {
            r = async {
                taskcast::store::schema::migrate(&url).await?;
                bench(server, "postgres", Some(url.clone()), tasks, per_task).await
            } => r,
            _ = tokio::signal::ctrl_c() => Err("interrupted".into()),
        };
        let dropped = admin
            .batch_execute(&format!("DROP DATABASE {name} WITH (FORCE)"))
            .await;
        if let Err(e) = dropped {
            eprintln!("could not drop database {name}: {e}");
        }
        result
    })
}

/// `postgres://u@h:p/db?x` → `postgres://u@h:p/<name>?x`.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = url.split_once('?').map_or((url, ""), |(b, q)| (b, q));
    let (scheme, rest) = base.split_once("://").unwrap_or(("postgres", base));
    let authority = rest.split('/').next().unwrap_or_default();
    let query = if query.is_empty() {
        String::new()
    } else {
        format!("?{query}")
    };
    format!("{scheme}://{authority}/{name}{query}")
}

async fn bench(
    server: &Handle,
    store: &str,
    database_url: Option<String>,
    tasks: usize,
    per_task: usize,
) -> Result<(), BoxError> {
    let listen: SocketAddr = "127.0.0.1:0".parse()?;
    let config = Config::new(listen, database_url, PushKey::new(KEY));
    let app = server.spawn(App::build(config)).await??;
    let addr = app.local_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = server.spawn(app.run_until(async {
        let _ = stopped.await;
    }));
    let client = reqwest::Client::new();

    // Create and subscribe every task before the clock starts.
    let mut subscribed = Vec::new();
    for _ in 0..tasks {
        subscribed.push(subscribe(&client, addr, per_task).await?);
    }

    let started = Instant::now();
    let pushers: Vec<_> = subscribed
        .iter()
        .map(|(id, base, _)| {
            let url = format!("http://{addr}/api/tasks/{id}/progress");
            tokio::spawn(push_sequentially(client.clone(), url, *base, per_task))
        })
        .collect();
    let mut pushes = Vec::new();
    for pusher in pushers {
        pushes.push(pusher.await??);
    }
    let elapsed = started.elapsed();

    // Match each push to the message carrying its version.
    let (mut receive, mut ack, mut skipped) = (Vec::new(), Vec::new(), 0);
    for ((_, _, receiver), pushes) in subscribed.into_iter().zip(pushes) {
        let received = receiver.await?;
        for push in pushes {
            ack.push(push.ack);
            match received.get(&push.version) {
                Some(at) => receive.push(at.duration_since(push.sent)),
                None => skipped += 1,
            }
        }
    }
    let _ = stop.send(());
    running.await?;

    let total = ack.len();
    println!();
    println!(
        "{:<9} {:>6} {:>6}  {:<13} {:>9} {:>9} {:>9} {:>9}",
        "store", "tasks", "pushes", "latency", "p50", "p90", "p99", "max"
    );
    for (name, samples) in [("push→receive", &mut receive), ("ack", &mut ack)] {
        samples.sort();
        let [p50, p90, p99, max] = [0.50, 0.90, 0.99, 1.0].map(|q| percentile(samples, q));
        println!(
            "{store:<9} {tasks:>6} {total:>6}  {name:<13} {p50:>9} {p90:>9} {p99:>9} {max:>9}"
        );
    }
    println!(
        "{:.0} pushes/s ({total} in {:.2} s); {} of {total} versions delivered, \
         {skipped} conflated (overtaken by a newer version)",
        total as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64(),
        receive.len(),
    );
    Ok(())
}

/// When each version reached one task's subscriber.
type Receiver = JoinHandle<HashMap<i64, Instant>>;

/// Creates a task and subscribes to it; the returned reader records when each version
/// arrives, until it has seen the version of the task's last push.
async fn subscribe(
    client: &reqwest::Client,
    addr: SocketAddr,
    per_task: usize,
) -> Result<(String, i64, Receiver), BoxError> {
    let created: Value = client
        .post(format!("http://{addr}/api/tasks"))
        .bearer_auth(KEY)
        .json(&json!({}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let id = created["task_id"].as_str().ok_or("no task_id")?.to_string();
    let base = created["version"].as_i64().ok_or("no version")?;
    // Subscribing takes the token POST /api/tasks returns (absent if the server needs none).
    let token = created["token"]
        .as_str()
        .map(|t| format!("&token={t}"))
        .unwrap_or_default();
    let (mut ws, _) = connect_async(format!("ws://{addr}/ws?task_id={id}{token}")).await?;
    let snapshot = ws.next().await.ok_or("closed before the snapshot")??;
    if !snapshot.to_text()?.contains(r#""snapshot":true"#) {
        return Err(format!("unexpected first message: {snapshot}").into());
    }
    let last = base + per_task as i64;
    let receiver = tokio::spawn(async move {
        let mut received = HashMap::new();
        while !received.contains_key(&last) {
            let Ok(Some(Ok(message))) = timeout(RECEIVE_TIMEOUT, ws.next()).await else {
                break;
            };
            let at = Instant::now();
            if let Message::Text(text) = message {
                let state: Value = serde_json::from_str(text.as_str()).unwrap_or_default();
                if let Some(version) = state["version"].as_i64() {
                    received.insert(version, at);
                }
            }
        }
        let _ = ws.close(None).await;
        received
    });
    Ok((id, base, receiver))
}

/// Pushes `count` updates to one task, each once the previous one is acknowledged, and
/// checks that each bumped the version by one.
async fn push_sequentially(
    client: reqwest::Client,
    url: String,
    base: i64,
    count: usize,
) -> Result<Vec<Push>, BoxError> {
    let mut pushes = Vec::with_capacity(count);
    for k in 1..=count {
        let body = json!({
            "progress": (k * 100 / count) as f64,
            "stage": "denoising",
            "status": "processing",
            "seq": k,
        });
        let request = client.post(&url).bearer_auth(KEY).json(&body);
        let sent = Instant::now();
        let response = request.send().await?.error_for_status()?;
        let ack = sent.elapsed();
        let state: Value = response.json().await?;
        let version = state["version"].as_i64().ok_or("no version in the ack")?;
        if state["applied"] != true || version != base + k as i64 {
            return Err(format!("push {k}: unexpected answer {state}").into());
        }
        pushes.push(Push { version, sent, ack });
    }
    Ok(pushes)
}

/// Nearest-rank percentile of sorted samples, formatted in µs or ms.
fn percentile(sorted: &[Duration], q: f64) -> String {
    let Some(last) = sorted.len().checked_sub(1) else {
        return "-".to_string();
    };
    let d = sorted[((sorted.len() as f64 * q).ceil() as usize)
        .saturating_sub(1)
        .min(last)];
    if d < Duration::from_millis(1) {
        format!("{} µs", d.as_micros())
    } else {
        format!("{:.2} ms", d.as_secs_f64() * 1e3)
    }
}
