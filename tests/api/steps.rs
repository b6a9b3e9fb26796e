//! Steps, previews and time left (issue 15): pushed on both routes, stored, delivered over
//! WebSocket, refused with a 4xx naming the field, and served from a table without the
//! columns as long as no push needs them.

use std::time::Duration;

use serde_json::{Value, json};

use crate::both_stores;
use crate::helpers::{KEY, StoreKind, TestApp, TestDb, spawn_app, spawn_app_on};

both_stores!(
    step_fields_are_stored_and_delivered_over_websocket,
    progress_follows_from_steps_unless_the_push_sets_it,
    bad_steps_are_refused_with_400_naming_the_field,
    preview_url_latest_wins_and_is_cleared_at_the_terminal_state,
    processing_states_carry_eta_and_pending_and_finished_ones_do_not,
    a_new_subscribers_snapshot_carries_eta_ms,
    a_finished_task_teaches_the_node_so_the_next_has_eta_ms_from_its_first_push,
);

async fn post_batch(app: &TestApp, body: Value) -> Value {
    let response = app
        .http
        .post(app.url("/api/progress"))
        .bearer_auth(KEY)
        .json(&body)
        .send()
        .await
        .expect("POST /api/progress");
    assert_eq!(response.status(), 200);
    response.json().await.expect("a JSON body")
}

async fn get_state(app: &TestApp, task: impl std::fmt::Display) -> Value {
    let response = app.get_task(task).await;
    assert_eq!(response.status(), 200);
    response.json().await.expect("a JSON body")
}

/// Lets the clock move on between two pushes, so the second comes measurably later (the
/// estimator is timed by each change's `updated_at`).
async fn later() {
    tokio::time::sleep(Duration::from_millis(30)).await;
}

async fn step_fields_are_stored_and_delivered_over_websocket(kind: StoreKind) {
    let app = spawn_app(kind).await;
    let task = app.create_task().await;
    let mut sub = app.subscribe(task).await;
    let snapshot = sub.next_state().await;
    assert!(snapshot.get("step").is_none(), "{snapshot}");
    app.push_ok(
        task,
        json!({"status": "processing", "step": 3, "total_steps": 12}),
    )
    .await;
    let state = sub.next_state().await;
    assert_eq!(
        (state["step"].clone(), state["total_steps"].clone()),
        (json!(3), json!(12))
    );
    // The batch route takes them too, and a later push that sets neither keeps them.
    let body = post_batch(
        &app,
        json!({"updates": [{"task_id": task.to_string(), "step": 4}]}),
    )
    .await;
    assert_eq!(body["results"][0]["status"], 200, "{body}");
    let state = sub.next_state().await;
    assert_eq!(
        (state["step"].clone(), state["total_steps"].clone()),
        (json!(4), json!(12))
    );
    app.push_ok(task, json!({"stage": "sampling"})).await;
    assert_eq!(sub.next_state().await["step"], 4);
    let stored = get_state(&app, task).await;
    assert_eq!(
        (stored["step"].clone(), stored["total_steps"].clone()),
        (json!(4), json!(12))
    );
}

async fn progress_follows_from_steps_unless_the_push_sets_it(kind: StoreKind) {
    let app = spawn_app(kind).await;
    let task = app.create_task().await;
    let mut sub = app.subscribe(task).await;
    sub.next_state().await;
    app.push_ok(task, json!({"step": 3, "total_steps": 12}))
        .await;
    assert_eq!(sub.next_state().await["progress"], 25.0);
    app.push_ok(task, json!({"step": 6, "total_steps": 12, "progress": 40}))
        .await;
    assert_eq!(sub.next_state().await["progress"], 40.0);
}

async fn bad_steps_are_refused_with_400_naming_the_field(kind: StoreKind) {
    let app = spawn_app(kind).await;
    let task = app.create_task().await;
    for (body, field) in [
        (json!({"step": 13, "total_steps": 12}), "step"),
        (json!({"step": -1}), "step"),
        (json!({"step": 2.5}), "step"),
        (json!({"total_steps": "30"}), "total_steps"),
        (json!({"total_steps": 1_000_001}), "total_steps"),
        (json!({"preview_url": "javascript:alert(1)"}), "preview_url"),
    ] {
        let response = app.push(task, body.clone()).await;
        assert_eq!(response.status(), 400, "{body}");
        let answer: Value = response.json().await.unwrap();
        let message = answer["message"].as_str().unwrap();
        assert!(message.starts_with(field), "{body}: {message}");
    }
    let body = post_batch(
        &app,
        json!({"updates": [{"task_id": task.to_string(), "step": 13, "total_steps": 12}]}),
    )
    .await;
    assert_eq!(body["results"][0]["status"], 400, "{body}");
    assert!(
        body["results"][0]["message"]
            .as_str()
            .unwrap()
            .contains("total_steps")
    );
    // Nothing was stored by the refused pushes.
    let state = get_state(&app, task).await;
    assert_eq!(
        (state["version"].clone(), state.get("step")),
        (json!(0), None)
    );
}

async fn preview_url_latest_wins_and_is_cleared_at_the_terminal_state(kind: StoreKind) {
    let app = spawn_app(kind).await;
    let task = app.create_task().await;
    let mut sub = app.subscribe(task).await;
    sub.next_state().await;
    for n in 1..=2 {
        let url = format!("https://cdn.example.com/preview-{n}.jpg");
        app.push_ok(task, json!({"progress": n * 30, "preview_url": url}))
            .await;
        assert_eq!(sub.next_state().await["preview_url"], url.as_str());
    }
    app.push_ok(task, json!({"progress": 80})).await;
    assert_eq!(
        sub.next_state().await["preview_url"],
        "https://cdn.example.com/preview-2.jpg",
        "a push without a preview keeps the latest"
    );
    app.push_ok(
        task,
        json!({"status": "completed", "image_url": "https://cdn.example.com/final.png"}),
    )
    .await;
    let done = sub.next_state().await;
    assert_eq!(done["status"], "completed");
    assert!(done.get("preview_url").is_none(), "{done}");
    assert!(get_state(&app, task).await.get("preview_url").is_none());
}

async fn processing_states_carry_eta_and_pending_and_finished_ones_do_not(kind: StoreKind) {
    let app = spawn_app(kind).await;
    let task = app.create_task().await;
    let mut sub = app.subscribe(task).await;
    let pending = sub.next_state().await;
    assert_eq!(pending["status"], "pending");
    assert!(pending.get("eta_ms").is_none(), "{pending}");
    app.push_ok(task, json!({"status": "processing", "progress": 10}))
        .await;
    sub.next_state().await;
    later().await;
    app.push_ok(task, json!({"progress": 30})).await;
    let running = sub.next_state().await;
    let eta = running["eta_ms"]
        .as_u64()
        .expect("eta_ms on a running task");
    assert!(eta > 0, "{running}");
    let at = running["eta_at"].as_str().expect("eta_at");
    chrono::DateTime::parse_from_rfc3339(at).expect("eta_at is RFC 3339");
    app.push_ok(task, json!({"status": "completed"})).await;
    let done = sub.next_state().await;
    assert!(
        done.get("eta_ms").is_none() && done.get("eta_at").is_none(),
        "{done}"
    );
}

async fn a_new_subscribers_snapshot_carries_eta_ms(kind: StoreKind) {
    let app = spawn_app(kind).await;
    let task = app.create_task().await;
    // Nobody watches yet: the estimator learns from the pushes all the same.
    app.push_ok(task, json!({"status": "processing", "progress": 10}))
        .await;
    later().await;
    app.push_ok(task, json!({"progress": 40})).await;
    let mut first = app.subscribe(task).await;
    let snapshot = first.next_state().await;
    assert_eq!(snapshot["snapshot"], true);
    assert!(snapshot["eta_ms"].as_u64().is_some(), "{snapshot}");
    // A second subscriber's snapshot comes from the hub's frame, with the same estimate.
    let mut second = app.subscribe(task).await;
    let again = second.next_state().await;
    assert_eq!(again["eta_ms"], snapshot["eta_ms"], "{again}");
}

async fn a_finished_task_teaches_the_node_so_the_next_has_eta_ms_from_its_first_push(
    kind: StoreKind,
) {
    let app = spawn_app(kind).await;
    // With nothing learned, a first running push has nothing to go on.
    let first = app.create_task().await;
    let answer = app
        .push_ok(first, json!({"status": "processing", "progress": 0}))
        .await;
    let mut sub = app.subscribe(first).await;
    let snapshot = sub.next_state().await;
    assert_eq!(snapshot["version"], answer["version"]);
    assert!(snapshot.get("eta_ms").is_none(), "{snapshot}");
    later().await;
    app.push_ok(first, json!({"progress": 50})).await;
    later().await;
    app.push_ok(first, json!({"status": "completed", "progress": 100}))
        .await;
    // The next task's first running push is estimated from the finished one.
    let next = app.create_task().await;
    let mut sub = app.subscribe(next).await;
    sub.next_state().await;
    app.push_ok(next, json!({"status": "processing", "progress": 10}))
        .await;
    let state = sub.next_state().await;
    assert!(state["eta_ms"].as_u64().is_some_and(|ms| ms > 0), "{state}");
}

/// A database migrated, then without the step and preview columns (a table from before
/// them, or the app dropped them).
async fn table_without_step_columns() -> TestDb {
    let db = TestDb::create().await;
    taskcast::store::schema::migrate(&db.url).await.unwrap();
    db.client()
        .await
        .batch_execute(
            "ALTER TABLE public.image_tasks DROP COLUMN step, DROP COLUMN total_steps, \
             DROP COLUMN preview_url",
        )
        .await
        .unwrap();
    db
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_without_the_columns_refuses_step_pushes_with_422_and_serves_the_rest() {
    let db = table_without_step_columns().await;
    let url = db.url.clone();
    let app = spawn_app_on(url.clone(), Some(db)).await;
    let task = app.create_task().await;
    let mut sub = app.subscribe(task).await;
    sub.next_state().await;
    for (body, column) in [
        (json!({"step": 1, "total_steps": 30}), "step"),
        (
            json!({"preview_url": "https://cdn.example.com/p.jpg"}),
            "preview_url",
        ),
    ] {
        let response = app.push(task, body.clone()).await;
        assert_eq!(response.status(), 422, "{body}");
        let answer: Value = response.json().await.unwrap();
        assert_eq!(answer["error"], "schema_missing", "{answer}");
        let message = answer["message"].as_str().unwrap();
        assert!(message.contains(&format!("column {column}")), "{message}");
        assert!(
            answer["hint"]
                .as_str()
                .unwrap()
                .contains("taskcast migrate")
        );
    }
    app.push_ok(task, json!({"status": "processing", "progress": 5}))
        .await;
    assert_eq!(sub.next_state().await["progress"], 5.0);
    // A finishing push (which clears a preview where there is one) works too.
    app.push_ok(task, json!({"status": "completed"})).await;
    assert_eq!(sub.next_state().await["status"], "completed");
    // Once migrated, the same push is taken without a restart.
    taskcast::store::schema::migrate(&url).await.unwrap();
    let other = app.create_task().await;
    app.push_ok(other, json!({"step": 1, "total_steps": 30}))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_sql_update_of_step_is_delivered() {
    let app = spawn_app(StoreKind::Postgres).await;
    let task = app.create_task().await;
    let mut sub = app.subscribe(task).await;
    let before = sub.next_state().await;
    let client = app.db.as_ref().unwrap().client().await;
    client
        .execute(
            "UPDATE public.image_tasks SET step = 7, total_steps = 20, \
             preview_url = 'https://cdn.example.com/sql.jpg' WHERE id = $1::text::uuid",
            &[&task.to_string()],
        )
        .await
        .unwrap();
    let state = sub.next_state().await;
    assert!(
        state["version"].as_i64() > before["version"].as_i64(),
        "{state}"
    );
    assert_eq!(
        (state["step"].clone(), state["total_steps"].clone()),
        (json!(7), json!(20))
    );
    assert_eq!(state["preview_url"], "https://cdn.example.com/sql.jpg");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_on_another_node_gets_steps_and_eta_ms() {
    let (mut nodes, _) = crate::cluster::spawn_nodes(2).await;
    let (pusher, watcher) = (nodes.remove(0), nodes.remove(0));
    let task = pusher.create_task().await;
    let mut sub = watcher.subscribe(task).await;
    sub.next_state().await;
    pusher
        .push_ok(
            task,
            json!({"status": "processing", "step": 1, "total_steps": 10}),
        )
        .await;
    assert_eq!(sub.next_state().await["step"], 1);
    later().await;
    let answer = pusher
        .push_ok(task, json!({"step": 4, "total_steps": 10}))
        .await;
    // The watcher's estimator learns from what its listener reads.
    let state = sub.next_state().await;
    assert_eq!(state["version"], answer["version"]);
    assert_eq!(state["progress"], 40.0);
    assert!(state["eta_ms"].as_u64().is_some(), "{state}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_sql_progress_of_a_processing_task_gets_eta_ms() {
    let app = spawn_app(StoreKind::Postgres).await;
    let task = app.create_task().await;
    let mut sub = app.subscribe(task).await;
    sub.next_state().await;
    let client = app.db.as_ref().unwrap().client().await;
    let set = async |progress: &str| {
        client
            .execute(
                &format!(
                    "UPDATE public.image_tasks SET status = 'processing', progress = {progress} \
                     WHERE id = $1::text::uuid"
                ),
                &[&task.to_string()],
            )
            .await
            .unwrap();
    };
    set("10").await;
    sub.next_state().await;
    later().await;
    set("30").await;
    let state = sub.next_state().await;
    assert_eq!(state["progress"], 30.0);
    assert!(state["eta_ms"].as_u64().is_some(), "{state}");
}
