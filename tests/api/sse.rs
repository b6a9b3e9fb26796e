//! Server-Sent Events: the WebSocket fallback, on the same hub, with the same auth.

use futures::StreamExt;
use serde_json::{Value, json};

use crate::both_stores;
use crate::helpers::{StoreKind, WAIT, spawn_app};

/// Reads `data:` lines from an event stream as JSON, one per call.
pub struct Events {
    body: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buffer: String,
}

impl Events {
    /// Reads the events of a `text/event-stream` response.
    pub fn new(response: reqwest::Response) -> Self {
        Events {
            body: response.bytes_stream().boxed(),
            buffer: String::new(),
        }
    }

    pub async fn next(&mut self) -> Value {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let event: String = self.buffer.drain(..end + 2).collect();
                if let Some(data) = event.lines().find_map(|l| l.strip_prefix("data:")) {
                    return serde_json::from_str(data.trim()).expect("JSON data");
                }
                continue;
            }
            let chunk = tokio::time::timeout(WAIT, self.body.next())
                .await
                .expect("an event within the wait")
                .expect("the stream is open")
                .expect("a chunk");
            self.buffer.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
}

async fn events_stream_the_snapshot_then_every_change(kind: StoreKind) {
    let app = spawn_app(kind).await;
    let task = app.create_task().await;
    let response = app
        .http
        .get(app.url(&format!(
            "/api/tasks/{task}/events?token={}",
            app.token(&[task])
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut events = Events {
        body: response.bytes_stream().boxed(),
        buffer: String::new(),
    };
    let snapshot = events.next().await;
    assert_eq!(snapshot["snapshot"], true);
    app.push_ok(task, json!({"progress": 40, "stage": "sse"}))
        .await;
    let change = events.next().await;
    assert_eq!(change["stage"], "sse");
    assert_eq!(change["version"], 1);
}

async fn events_refuse_without_a_token_and_for_missing_tasks(kind: StoreKind) {
    let app = spawn_app(kind).await;
    let task = app.create_task().await;
    let anonymous = app
        .http
        .get(app.url(&format!("/api/tasks/{task}/events")))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    let missing = uuid::Uuid::new_v4();
    let response = app
        .http
        .get(app.url(&format!(
            "/api/tasks/{missing}/events?token={}",
            app.token(&[missing.into()])
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    app.wait_for_empty_hub().await;
}

both_stores!(
    events_stream_the_snapshot_then_every_change,
    events_refuse_without_a_token_and_for_missing_tasks,
);
