//! Many writers, slow readers: versions only go up, and nobody waits for anybody.

use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};
use tokio::net::TcpSocket;

use crate::both_stores;
use crate::helpers::{StoreKind, WAIT, spawn_app};

/// The row (Postgres) or the store's state (memory), read without the hub.
async fn committed_state(app: &crate::helpers::TestApp, task: taskcast::domain::TaskId) -> Value {
    if let Some(db) = &app.db {
        let client = db.client().await;
        let row = client
            .query_one(
                "SELECT progress::float8, stage, status, taskcast_version FROM image_tasks WHERE id = $1",
                &[&task.as_uuid()],
            )
            .await
            .unwrap();
        json!({
            "progress": row.get::<_, Option<f64>>(0),
            "stage": row.get::<_, Option<String>>(1),
            "status": row.get::<_, String>(2),
            "version": row.get::<_, i64>(3),
        })
    } else {
        app.get_task(task).await.json().await.unwrap()
    }
}

async fn concurrent_pushes_arrive_in_version_order_and_end_on_the_row(kind: StoreKind) {
    const CLIENTS: usize = 8;
    const PER_CLIENT: usize = 125;
    let app = spawn_app(kind).await;
    let task = app.create_task().await;
    let mut sub = app.subscribe(task).await;
    sub.next_state().await;

    let mut writers = Vec::new();
    for client in 0..CLIENTS {
        let http = app.http.clone();
        let url = app.url(&format!("/api/tasks/{task}/progress"));
        writers.push(tokio::spawn(async move {
            for i in 0..PER_CLIENT {
                let body =
                    json!({"progress": (i % 100) as f64, "stage": format!("c{client} #{i}")});
                let response = http
                    .post(&url)
                    .bearer_auth(crate::helpers::KEY)
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 200);
            }
        }));
    }
    for writer in writers {
        writer.await.unwrap();
    }
    let total = (CLIENTS * PER_CLIENT) as i64;
    let seen = sub.states_until_version(total).await;
    let last = seen.last().unwrap();
    let row = committed_state(&app, task).await;
    assert_eq!(row["version"], total, "every push applied exactly once");
    assert_eq!(last["version"], row["version"]);
    assert_eq!(last["progress"], row["progress"]);
    assert_eq!(last["stage"], row["stage"]);
    assert_eq!(last["status"], row["status"]);
}

async fn a_subscriber_that_never_reads_does_not_delay_another(kind: StoreKind) {
    let app = spawn_app(kind).await;
    let task = app.create_task().await;

    // The stalled client: a tiny receive buffer, and it never reads after the handshake.
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(app.addr).await.unwrap();
    let (stalled, _) =
        tokio_tungstenite::client_async(app.ws_url(&format!("?task_id={task}")), stream)
            .await
            .unwrap();

    let mut healthy = app.subscribe(task).await;
    healthy.next_state().await;

    let stage = "s".repeat(250);
    let mut last_version = 0;
    let started = std::time::Instant::now();
    for i in 0..300 {
        let answer = app
            .push_ok(task, json!({"progress": (i % 100) as f64, "stage": stage}))
            .await;
        last_version = answer["version"].as_i64().unwrap();
        // Read as we go, so every delivery is measured against the push that caused it.
        let state = tokio::time::timeout(Duration::from_secs(2), healthy.next_state())
            .await
            .expect("the healthy subscriber was delayed by the stalled one");
        assert_eq!(state["version"], last_version);
    }
    assert!(
        started.elapsed() < WAIT,
        "300 pushes took {:?}",
        started.elapsed()
    );
    drop(stalled);
    assert_eq!(last_version, 300);
}

async fn hundreds_of_tasks_from_many_writers_all_end_on_their_rows(kind: StoreKind) {
    let app = spawn_app(kind).await;
    let mut tasks = Vec::new();
    let mut subs = Vec::new();
    for _ in 0..20 {
        let task = app.create_task().await;
        let mut sub = app.subscribe(task).await;
        sub.next_state().await;
        tasks.push(task);
        subs.push(sub);
    }
    let pushes = futures::stream::iter(0..400)
        .map(|i| {
            let task = tasks[i % tasks.len()];
            let app = &app;
            async move {
                app.push_ok(task, json!({"progress": (i / 20) as f64, "seq": i}))
                    .await;
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>();
    pushes.await;
    for (task, sub) in tasks.iter().zip(subs.iter_mut()) {
        let row = committed_state(&app, *task).await;
        let version = row["version"].as_i64().unwrap();
        let seen = sub.states_until_version(version).await;
        assert_eq!(seen.last().unwrap()["progress"], row["progress"]);
    }
}

both_stores!(
    concurrent_pushes_arrive_in_version_order_and_end_on_the_row,
    a_subscriber_that_never_reads_does_not_delay_another,
    hundreds_of_tasks_from_many_writers_all_end_on_their_rows,
);
