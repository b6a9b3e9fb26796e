//! Places in line at scale: 1,000 pending tasks, each with a WebSocket subscriber, behind
//! one more pending task; that task leaves the line (it finishes) and the bench times
//! until every subscriber has its new place, and counts the frames they got and the
//! statements the queue's recount ran. Several rounds: each round the task at the head
//! leaves, so every subscriber moves up one place each time.
//!
//! The server runs in this process (like `benches/cluster.rs`), on a fresh database next
//! to the admin URL's (`TASKCAST_BENCH_DATABASE_URL`, default
//! `postgres://postgres@127.0.0.1:5432/postgres`), dropped at the end.
//!
//! Run: `cargo bench --bench queue`. Knobs: `BENCH_PENDING` (1000), `BENCH_ROUNDS` (5).

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};
use taskcast::App;
use taskcast::auth::subscribe::{SubscribeAuth, mint};
use taskcast::auth::{PushKey, Secret};
use taskcast::config::Config;
use tokio::sync::mpsc;
use tokio_postgres::NoTls;
use tokio_tungstenite::tungstenite::Message;

const KEY: &str = "bench-push-key-0123456789abcdef0123";
const SECRET: &str = "bench-subscribe-secret-0123456789abcdef";
/// Bound on every wait of the bench.
const WAIT: Duration = Duration::from_secs(60);

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .expect("connect to Postgres");
    tokio::spawn(connection);
    client
}

/// The admin URL pointed at database `name` (URL or key=value form).
fn with_dbname(admin_url: &str, name: &str) -> String {
    if let Some(rest) = admin_url
        .strip_prefix("postgres://")
        .or_else(|| admin_url.strip_prefix("postgresql://"))
    {
        let (base, query) = rest.split_once('?').unwrap_or((rest, ""));
        let host = base.split('/').next().unwrap_or(base);
        let query = if query.is_empty() {
            String::new()
        } else {
            format!("?{query}")
        };
        format!("postgres://{host}/{name}{query}")
    } else {
        format!("{admin_url} dbname={name}")
    }
}

/// The value of a counter in the Prometheus text this process's recorder renders.
fn counter(name: &str) -> u64 {
    let text = taskcast::telemetry::metrics().render();
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.trim().parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".to_string())
}

#[tokio::main]
async fn main() {
    let pending = env_or("BENCH_PENDING", 1000);
    let rounds = env_or("BENCH_ROUNDS", 5);
    let admin_url = std::env::var("TASKCAST_BENCH_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string());
    let name = format!("bench_{}", uuid::Uuid::new_v4().simple());
    let admin = connect(&admin_url).await;
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("CREATE DATABASE");
    let url = with_dbname(&admin_url, &name);
    taskcast::store::schema::migrate(&url)
        .await
        .expect("migrate");

    // The line: `rounds` tasks at the head, then the watched ones, in creation order.
    let sql = connect(&url).await;
    let rows = sql
        .query(
            "INSERT INTO public.image_tasks (prompt, created_at) \
             SELECT 'bench', now() + n * interval '1 millisecond' \
             FROM generate_series(1, $1::int) AS n RETURNING id::text",
            &[&((rounds + pending) as i32)],
        )
        .await
        .expect("seed the line");
    let ids: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    let (head, watched) = ids.split_at(rounds);

    let mut config = Config::new(
        "127.0.0.1:0".parse().unwrap(),
        Some(url.clone()),
        PushKey::new(KEY),
    );
    config.subscribe = SubscribeAuth::new(Some(Secret::new(SECRET)), None, false);
    let app = App::build(config).await.expect("the server starts");
    let addr = app.local_addr();
    tokio::spawn(app.run_until(std::future::pending()));

    // One WebSocket per watched task; each reader reports (task index, place, at) for
    // every place it is sent.
    let (tx, mut places) = mpsc::channel::<(usize, u64, Instant)>(pending * 4);
    let (snap_tx, mut snapshots) = mpsc::channel::<(usize, u64)>(pending);
    for (i, id) in watched.iter().enumerate() {
        let task = taskcast::domain::TaskId::parse(id).expect("uuid");
        let token = mint(&Secret::new(SECRET), &[task], Duration::from_secs(3600));
        let (mut socket, _) =
            tokio_tungstenite::connect_async(format!("ws://{addr}/ws?task_id={id}&token={token}"))
                .await
                .expect("subscribe");
        let (tx, snap_tx) = (tx.clone(), snap_tx.clone());
        tokio::spawn(async move {
            while let Some(Ok(message)) = socket.next().await {
                let Message::Text(text) = message else {
                    continue;
                };
                let state: Value = serde_json::from_str(text.as_str()).expect("JSON");
                let place = state["queue_position"].as_u64().unwrap_or(0);
                if state["snapshot"] == true {
                    let _ = snap_tx.send((i, place)).await;
                } else {
                    let _ = tx.send((i, place, Instant::now())).await;
                }
            }
        });
    }
    drop(snap_tx);
    for _ in 0..pending {
        let (i, place) = tokio::time::timeout(WAIT, snapshots.recv())
            .await
            .expect("every snapshot in time")
            .expect("a snapshot");
        assert_eq!(place as usize, rounds + i + 1, "snapshot place of task {i}");
    }

    println!(
        "queue bench: {pending} pending tasks, each with a WebSocket subscriber; {rounds} rounds; \
         load average before: {}",
        load_average()
    );
    println!("round  all placed (ms)  frames  recount statements  listener rows read");
    let http = reqwest::Client::new();
    let mut times = Vec::new();
    for (round, ahead) in head.iter().enumerate() {
        let (queries, rows_read) = (
            counter(taskcast::telemetry::QUEUE_QUERIES),
            counter(taskcast::telemetry::LISTENER_ROWS_READ),
        );
        let started = Instant::now();
        let response = http
            .post(format!("http://{addr}/api/tasks/{ahead}/progress"))
            .bearer_auth(KEY)
            .json(&json!({"status": "completed", "image_url": "https://cdn.example.com/x.png"}))
            .send()
            .await
            .expect("push");
        assert_eq!(response.status(), 200);
        let mut placed = vec![false; pending];
        let (mut left, mut frames) = (pending, 0);
        let mut last = started;
        while left > 0 {
            let (i, place, at) = tokio::time::timeout(WAIT, places.recv())
                .await
                .expect("every new place in time")
                .expect("a place");
            frames += 1;
            if place as usize == rounds - round + i && !placed[i] {
                placed[i] = true;
                left -= 1;
                last = last.max(at);
            }
        }
        let elapsed = last - started;
        times.push(elapsed);
        // Let a late extra frame (there should be none) show up in this round's count.
        tokio::time::sleep(Duration::from_millis(200)).await;
        while places.try_recv().is_ok() {
            frames += 1;
        }
        println!(
            "{:>5}  {:>15.1}  {:>6}  {:>18}  {:>18}",
            round + 1,
            elapsed.as_secs_f64() * 1e3,
            frames,
            counter(taskcast::telemetry::QUEUE_QUERIES) - queries,
            counter(taskcast::telemetry::LISTENER_ROWS_READ) - rows_read,
        );
    }
    times.sort();
    println!(
        "all {pending} placed: min {:.1} ms, median {:.1} ms, max {:.1} ms; load average after: {}",
        times[0].as_secs_f64() * 1e3,
        times[times.len() / 2].as_secs_f64() * 1e3,
        times[times.len() - 1].as_secs_f64() * 1e3,
        load_average()
    );
    drop(sql);
    let _ = admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await;
}
