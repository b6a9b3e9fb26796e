//! `POST /api/progress`: many updates in one request, each with its own result; and the
//! naive write mode kept as a benchmark baseline.

use serde_json::{Value, json};
use taskcast::writer::WriteMode;

use crate::both_stores;
use crate::helpers::{KEY, StoreKind, spawn_app, spawn_app_with};

#[tokio::test]
async fn an_oversized_batch_is_413_naming_the_batch_body_limit() {
    let app = spawn_app_with(StoreKind::Memory, |c| c.limits.max_batch_body_bytes = 1024).await;
    let stage = "x".repeat(2048);
    let (status, body) = post_batch(
        &app,
        json!([{"task_id": uuid::Uuid::new_v4(), "stage": stage}]),
    )
    .await;
    assert_eq!(status, 413, "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("TASKCAST_MAX_BATCH_BODY_BYTES"),
        "the 413 names the setting that applies: {body}"
    );
    assert!(!message.contains("TASKCAST_MAX_BODY_BYTES"), "{body}");
}

async fn post_batch(app: &crate::helpers::TestApp, body: Value) -> (u16, Value) {
    let response = app
        .http
        .post(app.url("/api/progress"))
        .bearer_auth(KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

async fn a_batch_answers_each_update_in_order(kind: StoreKind) {
    let app = spawn_app(kind).await;
    let a = app.create_task().await;
    let b = app.create_task().await;
    let mut sub = app.subscribe(a).await;
    sub.next_state().await;
    let missing = uuid::Uuid::new_v4();
    let (status, body) = post_batch(
        &app,
        json!({"updates": [
            {"task_id": a.to_string(), "progress": 10},
            {"task_id": b.to_string(), "status": "completed"},
            {"task_id": missing.to_string(), "progress": 1},
            {"task_id": a.to_string(), "progress": 101},
            {"progress": 5},
            {"task_id": a.to_string(), "progress": 20, "stage": "second"},
            {"task_id": b.to_string(), "progress": 5},
        ]}),
    )
    .await;
    assert_eq!(status, 200);
    let results = body["results"].as_array().unwrap();
    let statuses: Vec<i64> = results
        .iter()
        .map(|r| r["status"].as_i64().unwrap())
        .collect();
    assert_eq!(statuses, vec![200, 200, 404, 400, 400, 200, 409]);
    assert_eq!(results[0]["state"]["progress"], 10.0);
    assert_eq!(results[0]["state"]["applied"], true);
    assert_eq!(
        results[5]["state"]["version"], 2,
        "two updates of one task apply in order"
    );
    assert_eq!(results[3]["error"], "invalid_input");
    assert!(results[3]["message"].as_str().unwrap().contains("progress"));
    assert_eq!(results[6]["error"], "task_finished");
    // The subscriber sees the task's changes in order, ending on the second one.
    let seen = sub.states_until_version(2).await;
    assert_eq!(seen.last().unwrap()["stage"], "second");
}

async fn a_bare_array_is_accepted_and_limits_are_enforced(kind: StoreKind) {
    let app = spawn_app_with(kind, |c| c.limits.max_batch_items = 3).await;
    let a = app.create_task().await;
    let (status, body) = post_batch(&app, json!([{"task_id": a.to_string(), "stage": "x"}])).await;
    assert_eq!(status, 200);
    assert_eq!(body["results"][0]["status"], 200);
    let too_many: Vec<Value> = (0..4)
        .map(|_| json!({"task_id": a.to_string(), "progress": 1}))
        .collect();
    let (status, body) = post_batch(&app, json!({"updates": too_many})).await;
    assert_eq!(status, 400);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("TASKCAST_MAX_BATCH_ITEMS")
    );
    let (status, _) = post_batch(&app, json!({"updates": []})).await;
    assert_eq!(status, 400);
    let (status, _) = post_batch(&app, json!({"nope": 1})).await;
    assert_eq!(status, 400);
    let unauthorized = app
        .http
        .post(app.url("/api/progress"))
        .json(&json!([]))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthorized.status(), 401);
}

async fn naive_write_mode_commits_and_broadcasts_like_group_mode(kind: StoreKind) {
    let app = spawn_app_with(kind, |c| c.write_mode = WriteMode::Naive).await;
    let task = app.create_task().await;
    let mut sub = app.subscribe(task).await;
    sub.next_state().await;
    let answer = app.push_ok(task, json!({"progress": 64, "seq": 1})).await;
    assert_eq!(answer["applied"], true);
    assert_eq!(sub.next_state().await["progress"], 64.0);
    let again = app.push_ok(task, json!({"progress": 64, "seq": 1})).await;
    assert_eq!(again["applied"], false);
}

both_stores!(
    a_batch_answers_each_update_in_order,
    a_bare_array_is_accepted_and_limits_are_enforced,
    naive_write_mode_commits_and_broadcasts_like_group_mode,
);
