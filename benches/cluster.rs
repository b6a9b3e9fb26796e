//! Several nodes on one Postgres: how long a push to node A takes to reach a subscriber on
//! node B (through the NOTIFY listener), next to one on node A itself; and what batching
//! NOTIFY per statement buys over one NOTIFY per row.
//!
//! Run: `cargo bench --bench cluster` (needs Postgres; the admin URL comes from
//! `TASKCAST_BENCH_DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/postgres`;
//! a fresh database is created and dropped). `BENCH_PUSHES` (default 500) sets the sample.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};
use taskcast::App;
use taskcast::auth::subscribe::{SubscribeAuth, mint};
use taskcast::auth::{PushKey, Secret};
use taskcast::config::Config;
use taskcast::domain::TaskId;
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_tungstenite::tungstenite::Message;

const KEY: &str = "bench-push-key-0123456789abcdef0123";
const SECRET: &str = "bench-subscribe-secret-0123456789abcdef";

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .expect("connect to Postgres");
    tokio::spawn(connection);
    client
}

async fn node(url: &str) -> std::net::SocketAddr {
    let mut config = Config::new(
        "127.0.0.1:0".parse().unwrap(),
        Some(url.to_string()),
        PushKey::new(KEY),
    );
    config.subscribe = SubscribeAuth::new(Some(Secret::new(SECRET)), None, false);
    let app = App::build(config).await.expect("node starts");
    let addr = app.local_addr();
    tokio::spawn(app.run_until(std::future::pending()));
    addr
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Pushes `n` updates to `to` one after another and times each until `watcher` has it.
async fn latencies(
    http: &reqwest::Client,
    to: std::net::SocketAddr,
    watcher: std::net::SocketAddr,
    task: TaskId,
    n: usize,
) -> Vec<Duration> {
    let token = mint(&Secret::new(SECRET), &[task], Duration::from_secs(3600));
    let url = format!("ws://{watcher}/ws?task_id={task}&token={token}");
    let (mut socket, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("subscribe");
    let mut version = loop {
        if let Some(Ok(Message::Text(t))) = socket.next().await {
            break serde_json::from_str::<Value>(t.as_str()).unwrap()["version"]
                .as_i64()
                .unwrap();
        }
    };
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let started = Instant::now();
        let response = http
            .post(format!("http://{to}/api/tasks/{task}/progress"))
            .bearer_auth(KEY)
            .json(&json!({"progress": (i % 100) as f64, "stage": "bench"}))
            .send()
            .await
            .expect("push");
        assert_eq!(response.status(), 200);
        version += 1;
        loop {
            let Some(Ok(Message::Text(t))) = socket.next().await else {
                continue;
            };
            let v = serde_json::from_str::<Value>(t.as_str()).unwrap()["version"]
                .as_i64()
                .unwrap();
            if v >= version {
                break;
            }
        }
        samples.push(started.elapsed());
    }
    samples.sort();
    samples
}

/// Times `statements` UPDATEs of every row and counts the notifications they cause.
async fn notify_rate(
    db: &tokio_postgres::Client,
    url: &str,
    rows: i64,
    statements: usize,
) -> (f64, usize) {
    let (listener, mut connection) = tokio_postgres::connect(url, NoTls).await.unwrap();
    let (tx, mut rx) = futures::channel::mpsc::unbounded::<usize>();
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let AsyncMessage::Notification(n) = message {
                let _ = tx.unbounded_send(n.payload().split(',').count());
            }
        }
    });
    listener.batch_execute("LISTEN taskcast").await.unwrap();
    let started = Instant::now();
    for i in 0..statements {
        db.execute(
            "UPDATE image_tasks SET progress = $1::float8",
            &[&(i as f64 % 100.0)],
        )
        .await
        .unwrap();
    }
    let elapsed = started.elapsed();
    let expected = rows as usize * statements;
    let (mut entries, mut notifications) = (0, 0);
    while entries < expected {
        entries += rx.next().await.expect("notifications keep coming");
        notifications += 1;
    }
    (expected as f64 / elapsed.as_secs_f64(), notifications)
}

const PER_ROW_TRIGGER: &str = "
CREATE OR REPLACE FUNCTION public.bench_notify_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.taskcast_version IS DISTINCT FROM OLD.taskcast_version THEN
    PERFORM pg_notify('taskcast', NEW.id::text || ' ' || NEW.taskcast_version::text);
  END IF;
  RETURN NULL;
END $$;
DROP TRIGGER taskcast_notify ON public.image_tasks;
CREATE TRIGGER bench_notify_row AFTER UPDATE ON public.image_tasks
  FOR EACH ROW EXECUTE FUNCTION public.bench_notify_row();";

/// The admin URL pointed at database `name` (URL or key=value form).
fn with_dbname(admin_url: &str, name: &str) -> String {
    if admin_url.starts_with("postgres://") || admin_url.starts_with("postgresql://") {
        let (base, query) = admin_url.split_once('?').unwrap_or((admin_url, ""));
        let authority_end = base.find("://").map_or(0, |i| i + 3);
        let prefix = match base[authority_end..].find('/') {
            Some(slash) => &base[..authority_end + slash],
            None => base,
        };
        let query = if query.is_empty() {
            String::new()
        } else {
            format!("?{query}")
        };
        format!("{prefix}/{name}{query}")
    } else {
        format!("{admin_url} dbname={name}")
    }
}

#[tokio::main]
async fn main() {
    let admin_url = env_or(
        "TASKCAST_BENCH_DATABASE_URL",
        "postgres://postgres@127.0.0.1:5432/postgres",
    );
    let pushes: usize = env_or("BENCH_PUSHES", "500")
        .parse()
        .expect("BENCH_PUSHES is a number");
    let name = format!("bench_{}", uuid::Uuid::new_v4().simple());
    let admin = connect(&admin_url).await;
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    let url = with_dbname(&admin_url, &name);
    taskcast::store::schema::migrate(&url)
        .await
        .expect("migrate");

    let (a, b) = (node(&url).await, node(&url).await);
    let http = reqwest::Client::new();
    let created: Value = http
        .post(format!("http://{a}/api/tasks"))
        .bearer_auth(KEY)
        .json(&json!({}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let task = TaskId::parse(created["task_id"].as_str().unwrap()).unwrap();

    eprint!("same node ({pushes} pushes)...\r");
    let local = latencies(&http, a, a, task, pushes).await;
    eprint!("cross node ({pushes} pushes)...\r");
    let remote = latencies(&http, a, b, task, pushes).await;

    let db = connect(&url).await;
    let rows = 500;
    db.batch_execute(&format!(
        "INSERT INTO image_tasks (prompt) SELECT 'p' FROM generate_series(1, {rows})"
    ))
    .await
    .unwrap();
    eprint!("NOTIFY per statement...          \r");
    let (batched_rate, batched_notifications) = notify_rate(&db, &url, rows, 40).await;
    db.batch_execute(PER_ROW_TRIGGER).await.unwrap();
    eprint!("NOTIFY per row...                \r");
    let (row_rate, row_notifications) = notify_rate(&db, &url, rows, 40).await;

    println!("\ncluster bench: 2 nodes in one process, one Postgres, {pushes} sequential pushes");
    println!("| path | p50 | p90 | p99 | max |");
    println!("|---|---|---|---|---|");
    for (label, s) in [
        ("push → subscriber, same node", &local),
        ("push → subscriber, other node (NOTIFY)", &remote),
    ] {
        println!(
            "| {label} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms |",
            percentile(s, 0.5).as_secs_f64() * 1e3,
            percentile(s, 0.9).as_secs_f64() * 1e3,
            percentile(s, 0.99).as_secs_f64() * 1e3,
            s.last().unwrap().as_secs_f64() * 1e3
        );
    }
    println!(
        "\n| NOTIFY | changed rows/s | notifications for {} rows |",
        rows * 40
    );
    println!("|---|---|---|");
    println!(
        "| one per statement, chunked < 8000 B (taskcast) | {batched_rate:.0} | {batched_notifications} |"
    );
    println!("| one per row | {row_rate:.0} | {row_notifications} |");
    println!("batching: {:.1}x the row rate", batched_rate / row_rate);

    drop(db);
    let _ = admin
        .batch_execute(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .await;
}
