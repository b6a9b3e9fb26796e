//! What a cancel costs end to end: from the page's request (HTTP `POST
//! /api/tasks/{id}/cancel`, or the WebSocket `{"type":"cancel"}` message) to the generator
//! seeing `cancel_requested: true` in the answer to its next push, on the Postgres store.
//!
//! The server runs in this process (`App::build`, the same seam the tests use) on a fresh
//! database `bench_cancel_<uuid>`; generators push every `P` (100 ms and 1 s) over real HTTP,
//! pages cancel over real HTTP and WebSocket at a random moment. Two parts are reported
//! apart: the server's (request -> committed -> answered to the page) and the whole
//! (request -> the generator's next push answer carries the flag), whose remainder is the
//! wait for that next push (about P/2 on average).
//!
//! Run: `scripts/with-postgres cargo bench --bench cancel`. Knobs: `BENCH_CANCELS` per
//! transport and interval (50), `BENCH_CONCURRENCY` tasks at once (10),
//! `TASKCAST_BENCH_DATABASE_URL` (else `TASKCAST_TEST_DATABASE_URL`, as
//! `scripts/with-postgres` sets it, else the local Postgres).

use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use taskcast::App;
use taskcast::auth::subscribe::SubscribeAuth;
use taskcast::auth::{PushKey, Secret};
use taskcast::config::Config;
use taskcast::domain::TaskId;
use tokio_tungstenite::tungstenite::Message;

const KEY: &str = "bench-push-key-0123456789abcdef0123";
const SECRET: &str = "bench-subscribe-secret-0123456789abcdef";
const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable";

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A random fraction in [0, 1).
fn random() -> f64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[derive(Clone, Copy, PartialEq)]
enum Transport {
    Http,
    WebSocket,
}

/// One cancel: milliseconds from the request to the page's answer, and to the generator's
/// push answer carrying the flag.
struct Sample {
    answered_ms: f64,
    seen_ms: f64,
}

async fn database() -> Result<(tokio_postgres::Client, String, String), BoxError> {
    let admin = ["TASKCAST_BENCH_DATABASE_URL", "TASKCAST_TEST_DATABASE_URL"]
        .iter()
        .find_map(|name| std::env::var(name).ok().filter(|u| !u.trim().is_empty()))
        .unwrap_or_else(|| DEFAULT_ADMIN_URL.to_string());
    let (client, connection) = tokio_postgres::connect(&admin, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let name = format!("bench_cancel_{}", uuid::Uuid::new_v4().simple());
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await?;
    let mut config: tokio_postgres::Config = admin.parse()?;
    config.dbname(&name);
    let url = format!(
        "postgres://{}@{}:{}/{name}?sslmode=disable",
        config.get_user().unwrap_or("postgres"),
        match &config.get_hosts()[0] {
            tokio_postgres::config::Host::Tcp(host) => host.clone(),
            #[allow(unreachable_patterns)]
            _ => "127.0.0.1".to_string(),
        },
        config.get_ports().first().copied().unwrap_or(5432),
    );
    taskcast::store::schema::migrate(&url).await?;
    Ok((client, name, url))
}

/// Creates a task and returns it with a token that may cancel it.
async fn create(http: &reqwest::Client, base: &str) -> Result<(TaskId, String), BoxError> {
    let body: Value = http
        .post(format!("{base}/api/tasks"))
        .bearer_auth(KEY)
        .json(&json!({"cancel": true}))
        .send()
        .await?
        .json()
        .await?;
    let task = TaskId::parse(body["task_id"].as_str().ok_or("no task_id")?)?;
    Ok((task, body["token"].as_str().ok_or("no token")?.to_string()))
}

/// The generator: pushes every `period` until an answer carries the flag; returns when.
async fn generator(
    http: reqwest::Client,
    base: String,
    task: TaskId,
    period: Duration,
) -> Result<Instant, BoxError> {
    // Each generator starts at a random phase, as real ones do.
    tokio::time::sleep(period.mul_f64(random())).await;
    let mut ticks = tokio::time::interval(period);
    for step in 0u32.. {
        ticks.tick().await;
        let answer: Value = http
            .post(format!("{base}/api/tasks/{task}/progress"))
            .bearer_auth(KEY)
            .json(&json!({"status": "processing", "progress": f64::from(step % 100)}))
            .send()
            .await?
            .json()
            .await?;
        if answer["cancel_requested"] == true {
            let seen = Instant::now();
            http.post(format!("{base}/api/tasks/{task}/progress"))
                .bearer_auth(KEY)
                .json(&json!({"status": "cancelled"}))
                .send()
                .await?;
            return Ok(seen);
        }
    }
    unreachable!("the loop only ends by returning")
}

/// One page and one generator for a fresh task: the page cancels after a random wait.
async fn one_cancel(
    http: reqwest::Client,
    base: String,
    ws_base: String,
    period: Duration,
    transport: Transport,
) -> Result<Sample, BoxError> {
    let (task, token) = create(&http, &base).await?;
    let generating = tokio::spawn(generator(http.clone(), base.clone(), task, period));
    // The page watches the task, as a real one does.
    let (mut socket, _) =
        tokio_tungstenite::connect_async(format!("{ws_base}/ws?task_id={task}&token={token}"))
            .await?;
    tokio::time::sleep(period + period.mul_f64(random())).await;
    let start = Instant::now();
    match transport {
        Transport::Http => {
            let response = http
                .post(format!("{base}/api/tasks/{task}/cancel"))
                .bearer_auth(&token)
                .send()
                .await?;
            if response.status() != 200 {
                return Err(format!("cancel answered {}", response.status()).into());
            }
            response.bytes().await?;
        }
        Transport::WebSocket => {
            let message = json!({"type": "cancel", "task_id": task.to_string()});
            socket.send(Message::text(message.to_string())).await?;
            loop {
                let frame = socket.next().await.ok_or("socket closed")??;
                if let Message::Text(text) = frame {
                    let value: Value = serde_json::from_str(text.as_str())?;
                    match value["type"].as_str() {
                        Some("cancel_requested") => break,
                        Some("error") => return Err(format!("cancel refused: {value}").into()),
                        _ => {}
                    }
                }
            }
        }
    }
    let answered = Instant::now();
    let seen = tokio::time::timeout(period * 4 + Duration::from_secs(10), generating)
        .await
        .map_err(|_| "the generator never saw the flag")???;
    Ok(Sample {
        answered_ms: (answered - start).as_secs_f64() * 1e3,
        seen_ms: (seen.saturating_duration_since(start)).as_secs_f64() * 1e3,
    })
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn summary(values: &mut [f64]) -> String {
    values.sort_by(f64::total_cmp);
    format!(
        "median {:7.1} ms  p90 {:7.1} ms",
        percentile(values, 0.5),
        percentile(values, 0.9)
    )
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let cancels = env_usize("BENCH_CANCELS", 50);
    let concurrency = env_usize("BENCH_CONCURRENCY", 10).max(1);
    let (admin, name, url) = database().await?;
    let mut config = Config::new("127.0.0.1:0".parse()?, Some(url), PushKey::new(KEY));
    config.subscribe = SubscribeAuth::new(Some(Secret::new(SECRET)), None, false);
    let app = App::build(config).await?;
    let addr = app.local_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until(async {
        let _ = stopped.await;
    }));
    let (base, ws_base) = (format!("http://{addr}"), format!("ws://{addr}"));
    let http = reqwest::Client::new();
    println!(
        "cancel latency, Postgres store, {cancels} cancels per row, {concurrency} tasks at once"
    );
    for period in [Duration::from_millis(100), Duration::from_secs(1)] {
        for transport in [Transport::Http, Transport::WebSocket] {
            let mut samples = Vec::with_capacity(cancels);
            while samples.len() < cancels {
                let round = concurrency.min(cancels - samples.len());
                let runs: Vec<_> = (0..round)
                    .map(|_| {
                        tokio::spawn(one_cancel(
                            http.clone(),
                            base.clone(),
                            ws_base.clone(),
                            period,
                            transport,
                        ))
                    })
                    .collect();
                for run in runs {
                    samples.push(run.await??);
                }
            }
            let mut answered: Vec<f64> = samples.iter().map(|s| s.answered_ms).collect();
            let mut seen: Vec<f64> = samples.iter().map(|s| s.seen_ms).collect();
            let mut waited: Vec<f64> = samples
                .iter()
                .map(|s| (s.seen_ms - s.answered_ms).max(0.0))
                .collect();
            let name = match transport {
                Transport::Http => "HTTP POST",
                Transport::WebSocket => "WS message",
            };
            println!(
                "push every {:>5} ms, {name:<10}  request->committed->answered: {}",
                period.as_millis(),
                summary(&mut answered)
            );
            println!(
                "                            {:<10}  then wait for next push:      {}",
                "",
                summary(&mut waited)
            );
            println!(
                "                            {:<10}  request->generator sees flag: {}",
                "",
                summary(&mut seen)
            );
        }
    }
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(15), server).await;
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await?;
    Ok(())
}
