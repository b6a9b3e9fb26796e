//! A pretend image generator that reports its progress with `taskcast_reporter`.
//!
//! ```text
//! cargo run --example fake_generator -- [--url http://127.0.0.1:8080] [--key KEY] [--task UUID]
//! ```
//!
//! Walks a task through queued -> generating 0..100 % -> uploading -> completed (with an
//! image_url). Without `--task` it first creates one (`POST /api/tasks`) and prints its id
//! and subscribe token, ready for
//! `cargo run --example subscribe -- <id> ws://127.0.0.1:8080 <token>`. The key defaults to
//! TASK_PROCESS_SECRET_KEY, else `development-key` (what taskcast uses in development).
//!
//! Like a real generator, it finishes its "generation" whether or not progress could be
//! delivered: it exits 0 and prints what the reporter counted.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use serde_json::Value;
use taskcast_reporter::{Options, Reporter, TaskId, TaskStatus, Update};

#[derive(Parser)]
struct Args {
    /// Where taskcast listens.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// The push key.
    #[arg(
        long,
        env = "TASK_PROCESS_SECRET_KEY",
        default_value = "development-key",
        hide_env_values = true,
        hide_default_value = true
    )]
    key: String,
    /// An existing task; created through the API when omitted.
    #[arg(long)]
    task: Option<String>,
    /// Time per 1 % of "generation", in milliseconds.
    #[arg(long, default_value_t = 100)]
    step_ms: u64,
    /// Seconds to wait before starting, to attach a subscriber.
    #[arg(long, default_value_t = 2)]
    start_after: u64,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let base = args.url.trim_end_matches('/');
    let task = match &args.task {
        Some(raw) => match TaskId::parse(raw) {
            Ok(task) => task,
            Err(e) => {
                eprintln!("--task: {e}");
                return ExitCode::from(2);
            }
        },
        None => match create_task(base, &args.key).await {
            Ok(task) => task,
            Err(e) => {
                eprintln!("could not create a task at {base}: {e}");
                return ExitCode::FAILURE;
            }
        },
    };
    tokio::time::sleep(Duration::from_secs(args.start_after)).await;

    let reporter = Reporter::new(base, args.key.as_str(), Options::default());
    let step = Duration::from_millis(args.step_ms);
    let stage = |text: &str| Update::new().stage(text);
    println!("generating task {task}");
    reporter.report(task, stage("queued").status(TaskStatus::Pending));
    tokio::time::sleep(step * 5).await;
    reporter.report(task, stage("generating").status(TaskStatus::Processing));
    for percent in 0..=100u8 {
        // ... one diffusion step ...
        reporter.report(task, Update::new().progress(f64::from(percent)));
        tokio::time::sleep(step).await;
    }
    reporter.report(task, stage("uploading"));
    tokio::time::sleep(step * 5).await;
    let url = format!("https://cdn.example.com/taskcast/{task}.png");
    reporter.report(task, Update::completed(url.as_str()).stage("done"));
    println!("generated {url}");

    let delivered = reporter.flush(Duration::from_secs(10)).await;
    let stats = reporter.stats();
    if delivered {
        println!("progress delivered: {stats:?}");
    } else {
        println!("some progress was not delivered (the generation is not affected): {stats:?}");
    }
    ExitCode::SUCCESS
}

/// `POST /api/tasks`; prints the id, the subscribe token and the command to watch it.
async fn create_task(base: &str, key: &str) -> Result<TaskId, String> {
    let response = reqwest::Client::new()
        .post(format!("{base}/api/tasks"))
        .bearer_auth(key)
        .json(&serde_json::json!({"prompt": "a lighthouse at dusk (fake_generator)"}))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    let body: Value = response.json().await.map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(format!("{status}: {}", body["message"]));
    }
    let id = body["task_id"].as_str().unwrap_or_default();
    let task = TaskId::parse(id).map_err(|e| e.to_string())?;
    let ws = base.replacen("http", "ws", 1);
    println!("created task {task}");
    match body["token"].as_str() {
        Some(token) => {
            println!("subscribe token {token}");
            println!("watch it with: cargo run --example subscribe -- {task} {ws} {token}");
        }
        None => println!("watch it with: cargo run --example subscribe -- {task} {ws}"),
    }
    Ok(task)
}
