//! Follows one task over WebSocket and prints every message, one line each.
//!
//! ```text
//! cargo run --example subscribe -- <task-uuid> [ws-base-url] [token]
//! ```
//!
//! `ws-base-url` defaults to ws://127.0.0.1:8080. The subscribe token is the `token` field
//! of the `POST /api/tasks` answer (or `taskcast token --task <uuid>`); it can also be
//! given as TASKCAST_TOKEN, which keeps it out of `ps`.
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
        eprintln!(
            "usage: subscribe <task-uuid> [ws-base-url, default ws://127.0.0.1:8080] [token]"
        );
        return ExitCode::from(2);
    };
    let base = args
        .next()
        .unwrap_or_else(|| "ws://127.0.0.1:8080".to_string());
    let token = args.next().or_else(|| std::env::var("TASKCAST_TOKEN").ok());
    let mut url = format!("{}/ws?task_id={task_id}", base.trim_end_matches('/'));
    let shown = url.clone(); // errors never print the token
    if let Some(token) = token {
        url.push_str(&format!("&token={token}"));
    }
    let mut socket = match connect_async(url.as_str()).await {
        Ok((socket, _)) => socket,
        Err(e) => {
            // A refused upgrade (400 bad task id, 503 server full) explains itself in the body.
            let body = match &e {
                Error::Http(response) => response.body().as_deref().unwrap_or_default(),
                _ => &[],
            };
            eprintln!("{shown}: {e} {}", String::from_utf8_lossy(body));
            return ExitCode::FAILURE;
        }
    };
    while let Some(message) = socket.next().await {
        let text = match message {
            Ok(Message::Text(text)) => text,
            Ok(Message::Close(frame)) => {
                let (code, reason) = frame.map_or((1005, String::new()), |f| {
                    (u16::from(f.code), f.reason.to_string())
                });
                println!("closed by the server: {code} {reason}");
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
            return ExitCode::from(u8::from(failed));
        }
    }
    println!("the socket closed");
    ExitCode::SUCCESS
}
