//! What the Rust reporter costs a worker running several tasks at once: requests per flush
//! and updates per second, one request per update (`max_batch: 1`, what the reporter did
//! before it batched) against batches (the default, 100).
//!
//! ```text
//! cargo run --example reporter_load -- [--tasks 1,10,100] [--rounds 50] [--database-url URL]
//! ```
//!
//! Starts a real taskcast in this process (the in-memory store, or Postgres at
//! `--database-url`, whose `image_tasks` table must exist: `taskcast migrate`), creates the
//! tasks through its API, then per round reports one progress update for every task and
//! flushes, as a worker stepping all its tasks would. Prints figures; asserts nothing.

use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::Value;
use taskcast::App;
use taskcast::auth::PushKey;
use taskcast::config::Config;
use taskcast_reporter::{Options, Reporter, TaskId, Update};

const KEY: &str = "reporter-load-push-key-0123456789abcdef";

#[derive(Parser)]
struct Args {
    /// Tasks the worker runs at once, one measurement per count.
    #[arg(long, value_delimiter = ',', default_value = "1,10,100")]
    tasks: Vec<usize>,
    /// Rounds per measurement: each reports one update per task, then flushes.
    #[arg(long, default_value_t = 50)]
    rounds: usize,
    /// Postgres instead of the in-memory store.
    #[arg(long)]
    database_url: Option<String>,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let listen = "127.0.0.1:0".parse().expect("a valid address");
    let config = Config::new(listen, args.database_url.clone(), PushKey::new(KEY));
    let app = App::build(config).await.expect("the server starts");
    let base = format!("http://{}", app.local_addr());
    tokio::spawn(app.run_until(std::future::pending()));
    let store = if args.database_url.is_some() {
        "postgres"
    } else {
        "memory"
    };
    println!(
        "store {store}, {} rounds per row (report one update per task, then flush)",
        args.rounds
    );
    println!("| tasks | mode | requests per flush | updates/s | failed |");
    println!("|---|---|---|---|---|");
    for &count in &args.tasks {
        let tasks = create_tasks(&base, count).await;
        for (mode, max_batch) in [("one request per update", 1), ("batched (100)", 100)] {
            let options = Options {
                max_batch,
                ..Options::default()
            };
            let reporter = Reporter::new(&base, KEY, options);
            let started = Instant::now();
            for round in 0..args.rounds {
                let percent = round as f64 * 100.0 / args.rounds as f64;
                for task in &tasks {
                    reporter.report(*task, Update::new().progress(percent));
                }
                reporter.flush(Duration::from_secs(30)).await;
            }
            let took = started.elapsed();
            let stats = reporter.stats();
            let updates = (count * args.rounds) as f64;
            println!(
                "| {count} | {mode} | {:.1} | {:.0} | {} |",
                stats.requests as f64 / args.rounds as f64,
                updates / took.as_secs_f64(),
                stats.failed
            );
        }
    }
}

async fn create_tasks(base: &str, count: usize) -> Vec<TaskId> {
    let http = reqwest::Client::new();
    let mut tasks = Vec::with_capacity(count);
    for _ in 0..count {
        let created: Value = http
            .post(format!("{base}/api/tasks"))
            .bearer_auth(KEY)
            .json(&serde_json::json!({"prompt": "reporter load"}))
            .send()
            .await
            .expect("POST /api/tasks")
            .json()
            .await
            .expect("a JSON answer");
        let id = created["task_id"].as_str().expect("a task_id");
        tasks.push(TaskId::parse(id).expect("a UUID task id"));
    }
    tasks
}
