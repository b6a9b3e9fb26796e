//! What subscribers see: every change, starting with the current state.

use serde_json::json;

use crate::both_stores;
use crate::helpers::{StoreKind, spawn_app};

async fn push_reaches_a_subscriber(kind: StoreKind) {
    let app = spawn_app(kind).await;
    let task = app.create_task().await;
    let mut sub = app.subscribe(task).await;
    let snapshot = sub.next_state().await;
    assert_eq!(snapshot["snapshot"], true);

    let answer = app
        .push_ok(
            task,
            json!({"progress": 42.5, "stage": "generating", "status": "processing"}),
        )
        .await;
    assert_eq!(answer["applied"], true);

    let state = sub.next_state().await;
    assert_eq!(state["snapshot"], false);
    assert_eq!(state["task_id"], task.to_string());
    assert_eq!(state["progress"], 42.5);
    assert_eq!(state["stage"], "generating");
    assert_eq!(state["status"], "processing");
    assert_eq!(state["version"], answer["version"]);
    assert!(state["version"].as_i64().unwrap() > snapshot["version"].as_i64().unwrap());
}

async fn late_subscriber_gets_the_current_state_as_snapshot(kind: StoreKind) {
    let app = spawn_app(kind).await;
    let task = app.create_task().await;
    for p in [10, 20, 30] {
        app.push_ok(task, json!({"progress": p, "stage": format!("step {p}")}))
            .await;
    }
    let mut sub = app.subscribe(task).await;
    let snapshot = sub.next_state().await;
    assert_eq!(snapshot["snapshot"], true);
    assert_eq!(snapshot["progress"], 30.0);
    assert_eq!(snapshot["stage"], "step 30");
    assert_eq!(snapshot["version"], 3);
}

async fn a_task_nobody_pushed_yet_still_gets_a_snapshot(kind: StoreKind) {
    let app = spawn_app(kind).await;
    let task = app.create_task().await;
    let mut sub = app.subscribe(task).await;
    let snapshot = sub.next_state().await;
    assert_eq!(snapshot["snapshot"], true);
    assert_eq!(snapshot["status"], "pending");
    assert_eq!(snapshot["version"], 0);
    assert!(snapshot["progress"].is_null());
}

async fn tasks_are_isolated(kind: StoreKind) {
    let app = spawn_app(kind).await;
    let a = app.create_task().await;
    let b = app.create_task().await;
    let mut sub_a = app.subscribe(a).await;
    sub_a.next_state().await;

    app.push_ok(b, json!({"progress": 99})).await;
    app.push_ok(a, json!({"progress": 1})).await;

    // Had B's change leaked to A's subscriber, it would have arrived first.
    let state = sub_a.next_state().await;
    assert_eq!(state["task_id"], a.to_string());
    assert_eq!(state["progress"], 1.0);
}

async fn one_socket_multiplexes_tasks_and_unsubscribe_stops_them(kind: StoreKind) {
    let app = spawn_app(kind).await;
    let a = app.create_task().await;
    let b = app.create_task().await;
    let mut sub = app.connect("").await;
    sub.send_json(app.subscribe_message(a)).await;
    assert_eq!(sub.next_state().await["task_id"], a.to_string());
    sub.send_json(app.subscribe_message(b)).await;
    assert_eq!(sub.next_state().await["task_id"], b.to_string());

    app.push_ok(b, json!({"stage": "b1"})).await;
    assert_eq!(sub.next_state().await["stage"], "b1");
    app.push_ok(a, json!({"stage": "a1"})).await;
    assert_eq!(sub.next_state().await["stage"], "a1");

    sub.send_json(json!({"type": "unsubscribe", "task_id": a.to_string()}))
        .await;
    // The unsubscribe is processed before the next subscribe on the same socket.
    sub.send_json(app.subscribe_message(b)).await;
    assert_eq!(sub.next_state().await["snapshot"], true);
    app.push_ok(a, json!({"stage": "a2"})).await;
    app.push_ok(b, json!({"stage": "b2"})).await;
    let next = sub.next_state().await;
    assert_eq!(
        next["stage"], "b2",
        "a message for the unsubscribed task arrived: {next}"
    );
}

async fn subscriber_sees_the_final_state_and_its_result(kind: StoreKind) {
    let app = spawn_app(kind).await;
    let task = app.create_task().await;
    let mut sub = app.subscribe(task).await;
    sub.next_state().await;
    app.push_ok(
        task,
        json!({"progress": 100, "status": "completed", "stage": "done"}),
    )
    .await;
    let last = sub.next_state().await;
    assert_eq!(last["status"], "completed");
    assert_eq!(last["progress"], 100.0);
}

async fn get_returns_the_committed_state(kind: StoreKind) {
    let app = spawn_app(kind).await;
    let task = app.create_task().await;
    let pushed = app
        .push_ok(task, json!({"progress": 5, "stage": "queued"}))
        .await;
    let response = app.get_task(task).await;
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["version"], pushed["version"]);
    assert_eq!(body["stage"], "queued");
}

async fn hub_entries_are_gone_after_subscribers_leave(kind: StoreKind) {
    let app = spawn_app(kind).await;
    let mut subs = Vec::new();
    for _ in 0..3 {
        let task = app.create_task().await;
        let mut a = app.subscribe(task).await;
        let mut b = app.subscribe(task).await;
        a.next_state().await;
        b.next_state().await;
        subs.push(a);
        subs.push(b);
    }
    assert_eq!(app.hub.len(), 3);
    let mut last = subs.pop().unwrap();
    drop(subs);
    // One subscriber is left on one task, so exactly that entry must stay.
    let hub = app.hub.clone();
    crate::helpers::wait_until(move || hub.len() == 1).await;
    last.socket.close(None).await.unwrap();
    app.wait_for_empty_hub().await;
}

async fn subscribers_joining_during_pushes_miss_nothing(kind: StoreKind) {
    const PUSHES: i64 = 200;
    let app = spawn_app(kind).await;
    let task = app.create_task().await;
    let pusher = {
        let http = app.http.clone();
        let url = app.url(&format!("/api/tasks/{task}/progress"));
        tokio::spawn(async move {
            for i in 1..=PUSHES {
                let response = http
                    .post(&url)
                    .bearer_auth(crate::helpers::KEY)
                    .json(&json!({"progress": (i % 100) as f64, "seq": i}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 200);
            }
        })
    };
    // Subscribers arrive at arbitrary points while pushes commit.
    let mut joined = Vec::new();
    for _ in 0..20 {
        let mut sub = app.subscribe(task).await;
        let snapshot = sub.next_state().await;
        assert_eq!(snapshot["snapshot"], true);
        joined.push((sub, snapshot["version"].as_i64().unwrap()));
    }
    pusher.await.unwrap();
    for (mut sub, from) in joined {
        if from == PUSHES {
            continue;
        }
        let seen = sub.states_until_version(PUSHES).await;
        assert!(
            seen[0]["version"].as_i64().unwrap() > from,
            "a version at or below the snapshot was sent again"
        );
        assert_eq!(seen.last().unwrap()["version"], PUSHES);
    }
}

async fn acknowledged_push_is_already_committed(kind: StoreKind) {
    let app = spawn_app(kind).await;
    let task = app.create_task().await;
    for i in 1..=20 {
        let answer = app
            .push_ok(task, json!({"progress": i, "stage": format!("s{i}")}))
            .await;
        // Read through a path that bypasses the writer and the hub entirely.
        let committed = match &app.db {
            Some(db) => db
                .client()
                .await
                .query_one(
                    "SELECT taskcast_version, stage FROM image_tasks WHERE id = $1",
                    &[&task.as_uuid()],
                )
                .await
                .map(|row| (row.get::<_, i64>(0), row.get::<_, Option<String>>(1)))
                .unwrap(),
            None => {
                let body: serde_json::Value = app.get_task(task).await.json().await.unwrap();
                (
                    body["version"].as_i64().unwrap(),
                    body["stage"].as_str().map(String::from),
                )
            }
        };
        assert_eq!(committed.0, answer["version"].as_i64().unwrap());
        assert_eq!(committed.1.as_deref(), Some(format!("s{i}").as_str()));
    }
}

async fn the_final_push_carries_the_image_url_to_subscribers(kind: StoreKind) {
    let app = spawn_app(kind).await;
    let task = app.create_task().await;
    let mut sub = app.subscribe(task).await;
    sub.next_state().await;
    app.push_ok(
        task,
        json!({"status": "completed", "progress": 100, "image_url": "https://cdn.example.com/cat.png"}),
    )
    .await;
    let last = sub.next_state().await;
    assert_eq!(last["image_url"], "https://cdn.example.com/cat.png");
    let failed = app.create_task().await;
    let answer = app
        .push_ok(
            failed,
            json!({"status": "failed", "error": "GPU out of memory"}),
        )
        .await;
    assert_eq!(answer["error"], "GPU out of memory");
    let body: serde_json::Value = app.get_task(failed).await.json().await.unwrap();
    assert_eq!(body["error"], "GPU out of memory");
}

both_stores!(
    push_reaches_a_subscriber,
    late_subscriber_gets_the_current_state_as_snapshot,
    a_task_nobody_pushed_yet_still_gets_a_snapshot,
    tasks_are_isolated,
    one_socket_multiplexes_tasks_and_unsubscribe_stops_them,
    subscriber_sees_the_final_state_and_its_result,
    get_returns_the_committed_state,
    hub_entries_are_gone_after_subscribers_leave,
    subscribers_joining_during_pushes_miss_nothing,
    acknowledged_push_is_already_committed,
    the_final_push_carries_the_image_url_to_subscribers,
);
