//! Follows one task over WebSocket and prints every message, one line each.
//!
//! ```text
//! cargo run --example subscribe -- <task-uuid> [ws-base-url]   # default ws://127.0.0.1:8080
//! ```
//!
//! Stops when the task is completed, failed or cancelled, when the server sends an error
//! (e.g. the task does not exist), or when the socket closes.

use std::process::ExitCode;

use futures::StreamExt;
use serde_json::Value;
use tokio_tungstenite::connect_async;
use tokio_tungstenite::tungstenite::{Error, Message};

#[tokio::main]
async fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(task_id) = args.next() else {
        eprintln!("usage: subscribe <task-uuid> [ws-base-url, default ws://127.0.0.1:8080]");
        return ExitCode::from(2);
    };
    let base = args
        .next()
        .unwrap_or_else(|| "ws://127.0.0.1:8080".to_string());
    let url = format!("{}/ws?task_id={task_id}", base.trim_end_matches('/'));
    let mut socket = match connect_async(url.as_str()).await {
        Ok((socket, _)) => socket,
        Err(Error::Http(response)) => {
            let body = response.body().as_deref().unwrap_or_default();
            eprintln!(
                "{url}: {} {}",
                response.status(),
                String::from_utf8_lossy(body)
            );
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("{url}: {e}");
            return ExitCode::FAILURE;
        }
    };
    while let Some(message) = socket.next().await {
        let text = match message {
            Ok(Message::Text(text)) => text,
            Ok(Message::Close(frame)) => {
                println!("closed by the server: {frame:?}");
                return ExitCode::SUCCESS;
            }
            Ok(_) => continue, // pings are answered by tungstenite
            Err(e) => {
                eprintln!("connection lost: {e}");
                return ExitCode::FAILURE;
            }
        };
        println!("{text}");
        let message: Value = serde_json::from_str(text.as_str()).unwrap_or_default();
        let status = message["status"].as_str().unwrap_or_default();
        let failed = message["type"] == "error";
        if failed || ["completed", "failed", "cancelled"].contains(&status) {
            let _ = socket.close(None).await;
            return if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            };
        }
    }
    println!("the socket closed");
    ExitCode::SUCCESS
}
