//! The real binary as a separate process: startup refusals in production, and secrets
//! that never reach a log line.

use std::process::Stdio;
use std::sync::{Arc, Mutex};

use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::helpers::WAIT;

pub fn taskcast(env: &[(&str, &str)], args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_taskcast"));
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "debug")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (name, value) in env {
        command.env(name, value);
    }
    command
}

/// Runs a `serve` that must refuse to start; returns everything it printed.
async fn refused_output(env: &[(&str, &str)], args: &[&str]) -> String {
    let mut all_args = vec!["serve", "--listen", "127.0.0.1:0"];
    all_args.extend_from_slice(args);
    let output = tokio::time::timeout(WAIT, taskcast(env, &all_args).output())
        .await
        .expect("taskcast exited instead of serving")
        .unwrap();
    assert!(!output.status.success(), "taskcast started with {env:?}");
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

const STRONG: &str = "9f2c4e6a8b0d1f3e5a7c9b1d3f5e7a9c";
const SUBSCRIBE: &str = "5e7a9c1b3d5f7e9a1c3b5d7f9e1a3c5b7d9f1e3a";

#[tokio::test]
async fn production_refuses_to_start_with_a_weak_public_or_missing_key() {
    let cases: [(&[(&str, &str)], &str); 4] = [
        (&[("NODE_ENV", "production")], "TASK_PROCESS_SECRET_KEY"),
        (
            &[
                ("NODE_ENV", "production"),
                (
                    "OPENAI_API_KEY",
                    "sk-proj-abcdefghijklmnopqrstuvwxyz0123456789",
                ),
            ],
            // Never a push key: as if none were set.
            "no push key is set",
        ),
        (
            &[
                ("APP_ENV", "production"),
                ("TASK_PROCESS_SECRET_KEY", "too-short-key"),
            ],
            "32",
        ),
        (
            &[("APP_ENV", "production"), ("INTERNAL_API_KEY", "")],
            "TASK_PROCESS_SECRET_KEY",
        ),
    ];
    for (env, needle) in cases {
        let output = refused_output(env, &[]).await;
        assert!(output.contains(needle), "for {env:?}: {output}");
        assert!(
            output.contains("openssl rand"),
            "the refusal says how to make a key: {output}"
        );
        assert!(
            !output.contains("too-short-key") && !output.contains("abcdefghijklmnop"),
            "{output}"
        );
    }
}

#[tokio::test]
async fn production_refuses_public_subscribe_and_missing_subscriber_auth() {
    let base = [
        ("NODE_ENV", "production"),
        ("TASK_PROCESS_SECRET_KEY", STRONG),
    ];
    let output = refused_output(&base, &[]).await;
    assert!(output.contains("TASKCAST_SUBSCRIBE_SECRET"), "{output}");
    let with_secret = [base[0], base[1], ("TASKCAST_SUBSCRIBE_SECRET", SUBSCRIBE)];
    let output = refused_output(&with_secret, &["--public-subscribe"]).await;
    assert!(output.contains("public-subscribe"), "{output}");
    let output = refused_output(&with_secret, &["--demo"]).await;
    assert!(output.contains("--demo"), "{output}");
}

/// A started server: its address, and everything it has printed so far.
pub struct Server {
    pub child: Child,
    pub addr: String,
    stdout: Arc<Mutex<String>>,
}

async fn start(env: &[(&str, &str)]) -> Server {
    start_on(env, "127.0.0.1:0").await
}

/// Starts `taskcast serve` on `listen` and waits until it listens.
pub async fn start_on(env: &[(&str, &str)], listen: &str) -> Server {
    start_command(taskcast(env, &["--listen", listen])).await
}

/// Starts a prepared `taskcast serve` command and waits until it listens.
pub async fn start_command(mut command: Command) -> Server {
    let mut child = command.spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let stdout = Arc::new(Mutex::new(String::new()));
    let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
    let collected = stdout.clone();
    // Keeps draining stdout so the server never blocks on a full pipe.
    tokio::spawn(async move {
        let mut addr_tx = Some(addr_tx);
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(rest) = line.split("local_addr=").nth(1) {
                let addr = rest
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_string();
                if let Some(tx) = addr_tx.take() {
                    let _ = tx.send(addr);
                }
            }
            let mut log = collected.lock().unwrap();
            log.push_str(&line);
            log.push('\n');
        }
    });
    let addr = tokio::time::timeout(WAIT, addr_rx)
        .await
        .expect("taskcast listens in time")
        .expect("taskcast printed its address");
    Server {
        child,
        addr,
        stdout,
    }
}

impl Server {
    /// Sends `signal` (e.g. "TERM", "KILL") to the process.
    pub async fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("the server is running").to_string();
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .await
            .unwrap();
        assert!(status.success(), "kill -{signal} {pid} failed");
    }

    /// Waits for the process to exit and returns all it printed, stdout then stderr.
    pub async fn exited(mut self) -> (std::process::ExitStatus, String) {
        let status = tokio::time::timeout(WAIT * 2, self.child.wait())
            .await
            .expect("the server exited in time")
            .unwrap();
        let mut stderr = String::new();
        if let Some(mut pipe) = self.child.stderr.take() {
            let _ = pipe.read_to_string(&mut stderr).await;
        }
        let stdout = self.stdout.lock().unwrap().clone();
        (status, format!("{stdout}{stderr}"))
    }

    /// What the server has printed to stdout so far (its log).
    pub fn log(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    /// Stops the server and returns all it printed, stdout then stderr.
    pub async fn stop(mut self) -> String {
        self.child.start_kill().unwrap();
        let _ = self.child.wait().await;
        let mut stderr = String::new();
        if let Some(mut pipe) = self.child.stderr.take() {
            let _ = pipe.read_to_string(&mut stderr).await;
        }
        let stdout = self.stdout.lock().unwrap().clone();
        format!("{stdout}{stderr}")
    }
}

/// Every 10-character window of `secret`: a log line must not hold any part of a key.
fn fragments(secret: &str) -> Vec<&str> {
    (0..=secret.len().saturating_sub(10))
        .map(|i| &secret[i..i + 10])
        .collect()
}

/// Every level at once: `trace` lets through every line `debug`, `info`... would.
#[tokio::test]
async fn secrets_never_appear_in_logs_or_error_bodies() {
    let previous = "1a3c5e7b9d1f3a5c7e9b1d3f5a7c9e1b";
    let server = start(&[
        ("RUST_LOG", "trace"),
        ("TASK_PROCESS_SECRET_KEY", &format!("  {STRONG}\n")),
        ("TASK_PROCESS_SECRET_KEY_PREVIOUS", previous),
        ("TASKCAST_SUBSCRIBE_SECRET", SUBSCRIBE),
        (
            "OPENAI_API_KEY",
            "sk-proj-zyxwvutsrqponmlkjihgfedcba9876543210",
        ),
    ])
    .await;
    let http = reqwest::Client::new();
    let base = format!("http://{}", server.addr);
    let mut bodies = String::new();

    let created: serde_json::Value = http
        .post(format!("{base}/api/tasks"))
        .bearer_auth(STRONG)
        .json(&json!({}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let task = created["task_id"].as_str().unwrap().to_string();
    let token = created["token"].as_str().unwrap().to_string();
    let signature = token.rsplit('.').next().unwrap().to_string();
    bodies.push_str(&watch_with_token(&base, &server.addr, &task, &token).await);
    let progress = format!("{base}/api/tasks/{task}/progress");
    for key in [
        STRONG,
        previous,
        &STRONG[..20],
        "wrong",
        &format!("{STRONG}x"),
    ] {
        let response = http
            .post(&progress)
            .bearer_auth(key)
            .json(&json!({"progress": 5}))
            .send()
            .await
            .unwrap();
        bodies.push_str(&response.text().await.unwrap());
    }
    for token in ["forged.token.value", SUBSCRIBE] {
        let response = http
            .get(format!("{base}/api/tasks/{task}?token={token}"))
            .send()
            .await
            .unwrap();
        bodies.push_str(&response.text().await.unwrap());
    }
    let output = server.stop().await;
    assert!(
        output.contains("push key loaded"),
        "the log says where the key came from: {output}"
    );
    assert!(
        output.contains("trimmed"),
        "the log warns about the whitespace: {output}"
    );
    assert!(
        output.contains("TRACE"),
        "the server logged at trace, so every level was covered: {output}"
    );
    for secret in [
        STRONG,
        previous,
        SUBSCRIBE,
        "zyxwvutsrqponmlkjihgfedcba",
        &signature,
    ] {
        for fragment in fragments(secret) {
            assert!(
                !output.contains(fragment),
                "the log holds part of a secret ({fragment}): {output}"
            );
            assert!(
                !bodies.contains(fragment),
                "a response holds part of a secret: {bodies}"
            );
        }
    }
}

/// Uses `token` everywhere a browser may carry one: the /ws URL, a subscribe message, the
/// SSE URL, `GET /api/tasks/{id}?token=`, and query strings that do not decode (a
/// repeated parameter, a bad escape). Returns the HTTP error bodies.
async fn watch_with_token(base: &str, addr: &str, task: &str, token: &str) -> String {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let http = reqwest::Client::new();
    let ws = format!("ws://{addr}/ws?task_id={task}&token={token}");
    let (mut socket, _) = tokio_tungstenite::connect_async(ws).await.unwrap();
    let subscribe = json!({"type": "subscribe", "task_id": task, "token": token});
    socket
        .send(Message::text(subscribe.to_string()))
        .await
        .unwrap();
    let mut states = 0;
    while states < 2 {
        let message = tokio::time::timeout(WAIT, socket.next())
            .await
            .expect("a message in time")
            .expect("the socket is open")
            .unwrap();
        if let Message::Text(text) = message {
            assert!(text.as_str().contains(r#""type":"state""#), "{text}");
            states += 1;
        }
    }
    let mut events = http
        .get(format!("{base}/api/tasks/{task}/events?token={token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(events.status(), 200);
    let first = tokio::time::timeout(WAIT, events.chunk()).await.unwrap();
    assert!(first.unwrap().is_some(), "the snapshot event");
    let mut bodies = String::new();
    for path in [
        format!("/ws?task_id={task}&task_id={task}&token={token}"),
        format!("/ws?task_id={task}&token={token}&token={token}"),
        format!("/api/tasks/{task}/events?token={token}&token={token}"),
        format!("/api/tasks/{task}?token={token}&token=%FF{token}"),
    ] {
        let response = http.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(response.status(), 400, "{path}");
        bodies.push_str(&response.text().await.unwrap());
    }
    bodies
}

/// Refusals an operator must act on show at the default level, at most once per window,
/// saying what to change and never holding the credential.
#[tokio::test]
async fn a_wrong_push_key_and_a_refused_origin_are_warned_about_once_per_window() {
    let server = start(&[
        ("RUST_LOG", "info"),
        ("NODE_ENV", "production"),
        ("TASK_PROCESS_SECRET_KEY", STRONG),
        ("TASKCAST_SUBSCRIBE_SECRET", SUBSCRIBE),
    ])
    .await;
    let http = reqwest::Client::new();
    let base = format!("http://{}", server.addr);
    let wrong = "a-wrong-key-9f8e7d6c5b4a39281706";
    for _ in 0..3 {
        let response = http
            .post(format!("{base}/api/tasks"))
            .bearer_auth(wrong)
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401);
        let response = http
            .get(format!("{base}/healthz"))
            .header("origin", "http://localhost:3000")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 403);
    }
    let output = server.stop().await;
    let lines =
        |needle: &str| -> Vec<&str> { output.lines().filter(|l| l.contains(needle)).collect() };
    let origin =
        lines(r#"origin "http://localhost:3000" refused: add it to TASKCAST_ALLOWED_ORIGINS"#);
    assert_eq!(origin.len(), 1, "one line per window: {output}");
    assert!(origin[0].contains("WARN"), "{}", origin[0]);
    let key = lines("push refused");
    assert_eq!(key.len(), 1, "one line per window: {output}");
    assert!(key[0].contains("WARN"), "{}", key[0]);
    assert!(key[0].contains("TASK_PROCESS_SECRET_KEY"), "{}", key[0]);
    for secret in [wrong, STRONG, SUBSCRIBE] {
        for fragment in fragments(secret) {
            assert!(!output.contains(fragment), "the log holds a key: {output}");
        }
    }
}

#[tokio::test]
async fn development_starts_with_a_loud_warning_about_the_development_key() {
    let server = start(&[]).await;
    let answer = reqwest::Client::new()
        .get(format!("http://{}/healthz", server.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let output = server.stop().await;
    assert!(output.contains("INSECURE PUSH KEY"), "{output}");
    assert!(output.contains("in-memory store"), "{output}");
}
