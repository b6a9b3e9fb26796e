//! Every refusal: its status, its `{"error","message","hint"}` body, and no state change.

use serde_json::{Value, json};

use crate::both_stores;
use crate::helpers::{KEY, StoreKind, spawn_app};

async fn error_body(response: reqwest::Response) -> Value {
    let body: Value = response.json().await.expect("a JSON error body");
    for field in ["error", "message", "hint"] {
        assert!(body[field].is_string(), "error body lacks {field}: {body}");
    }
    body
}

async fn push_with_wrong_key_is_rejected_with_401(kind: StoreKind) {
    let app = spawn_app(kind).await;
    let task = app.create_task().await;
    let response = app
        .http
        .post(app.url(&format!("/api/tasks/{task}/progress")))
        .bearer_auth("wrong-key-that-must-not-be-echoed")
        .json(&json!({"progress": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let body = error_body(response).await;
    assert_eq!(body["error"], "unauthorized");
    assert!(
        body["hint"]
            .as_str()
            .unwrap()
            .contains("TASK_PROCESS_SECRET_KEY")
    );
    let text = body.to_string();
    assert!(!text.contains("wrong-key-that-must-not-be-echoed") && !text.contains(KEY));

    let missing = app
        .http
        .post(app.url(&format!("/api/tasks/{task}/progress")))
        .json(&json!({"progress": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 401);
    // Nothing was applied.
    let state: Value = app.get_task(task).await.json().await.unwrap();
    assert_eq!(state["version"], 0);
}

async fn push_with_key_surrounded_by_whitespace_in_header_is_accepted(kind: StoreKind) {
    let app = spawn_app(kind).await;
    let task = app.create_task().await;
    let response = app
        .http
        .post(app.url(&format!("/api/tasks/{task}/progress")))
        .header("authorization", format!("Bearer  {KEY} "))
        .json(&json!({"progress": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

async fn malformed_pushes_get_400_naming_the_field(kind: StoreKind) {
    let app = spawn_app(kind).await;
    let task = app.create_task().await;
    let cases = [
        (json!({"progress": 101}), "progress"),
        (json!({"progress": "half"}), "progress"),
        (json!({"status": "done"}), "status"),
        (json!({"stage": "x".repeat(257)}), "stage"),
        (json!({"progress": 1, "colour": "red"}), "colour"),
        (json!({"seq": 3}), "at least one"),
        (json!({"status": "processing", "seq": -1}), "seq"),
        (json!([1, 2]), "object"),
    ];
    for (body, needle) in cases {
        let response = app.push(task, body.clone()).await;
        assert_eq!(response.status(), 400, "for {body}");
        let error = error_body(response).await;
        assert_eq!(error["error"], "invalid_input");
        let message = error["message"].as_str().unwrap();
        assert!(
            message.contains(needle),
            "message for {body} should mention {needle}: {message}"
        );
    }
    let not_json = app
        .http
        .post(app.url(&format!("/api/tasks/{task}/progress")))
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .body("{\"progress\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(not_json.status(), 400);
    assert!(
        error_body(not_json).await["message"]
            .as_str()
            .unwrap()
            .contains("JSON")
    );

    let bad_id = app.push("not-a-uuid", json!({"progress": 1})).await;
    assert_eq!(bad_id.status(), 400);
    assert!(
        error_body(bad_id).await["message"]
            .as_str()
            .unwrap()
            .contains("UUID")
    );

    let state: Value = app.get_task(task).await.json().await.unwrap();
    assert_eq!(state["version"], 0, "a refused push changed the task");
}

async fn push_to_a_missing_task_is_404(kind: StoreKind) {
    let app = spawn_app(kind).await;
    let response = app.push(uuid::Uuid::new_v4(), json!({"progress": 1})).await;
    assert_eq!(response.status(), 404);
    assert_eq!(error_body(response).await["error"], "not_found");
    let get = app.get_task(uuid::Uuid::new_v4()).await;
    assert_eq!(get.status(), 404);
}

async fn push_after_a_terminal_status_is_409(kind: StoreKind) {
    let app = spawn_app(kind).await;
    for terminal in ["completed", "failed", "cancelled"] {
        let task = app.create_task().await;
        let done = app
            .push_ok(task, json!({"status": terminal, "seq": 7}))
            .await;
        let response = app.push(task, json!({"progress": 50, "seq": 8})).await;
        assert_eq!(response.status(), 409, "after {terminal}");
        let body = error_body(response).await;
        assert_eq!(body["error"], "task_finished");
        assert!(body["message"].as_str().unwrap().contains(terminal));
        // A retry of the final push itself is harmless, not a conflict.
        let retry = app
            .push_ok(task, json!({"status": terminal, "seq": 7}))
            .await;
        assert_eq!(retry["applied"], false);
        assert_eq!(retry["version"], done["version"]);
    }
}

async fn stale_or_repeated_seq_is_not_applied(kind: StoreKind) {
    let app = spawn_app(kind).await;
    let task = app.create_task().await;
    let first = app.push_ok(task, json!({"progress": 50, "seq": 5})).await;
    assert_eq!(first["applied"], true);
    let again = app.push_ok(task, json!({"progress": 50, "seq": 5})).await;
    assert_eq!(again["applied"], false);
    assert_eq!(again["version"], first["version"]);
    let older = app.push_ok(task, json!({"progress": 10, "seq": 4})).await;
    assert_eq!(older["applied"], false);
    assert_eq!(
        older["progress"], 50.0,
        "a late push moved progress backwards"
    );
    let newer = app.push_ok(task, json!({"progress": 60, "seq": 6})).await;
    assert_eq!(newer["applied"], true);
    assert_eq!(newer["version"], first["version"].as_i64().unwrap() + 1);
}

async fn oversized_body_is_413_and_non_json_is_415(kind: StoreKind) {
    let app = spawn_app(kind).await;
    let task = app.create_task().await;
    let url = app.url(&format!("/api/tasks/{task}/progress"));
    let big = format!(r#"{{"stage": "{}"}}"#, "x".repeat(17 * 1024));
    let response = app
        .http
        .post(&url)
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .body(big.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    let body = error_body(response).await;
    assert_eq!(body["error"], "payload_too_large");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("TASKCAST_MAX_BODY_BYTES"),
        "the 413 names the setting to raise: {body}"
    );

    // Without Content-Length (chunked), the limit still holds.
    let stream = futures::stream::iter(
        big.into_bytes()
            .chunks(1024)
            .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
            .collect::<Vec<_>>(),
    );
    let chunked = app
        .http
        .post(&url)
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(chunked.status(), 413);

    let text = app
        .http
        .post(&url)
        .bearer_auth(KEY)
        .header("content-type", "text/plain")
        .body(r#"{"progress": 1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(text.status(), 415);
    assert_eq!(error_body(text).await["error"], "unsupported_media_type");
}

async fn unknown_route_is_404_and_wrong_method_is_405_with_json_bodies(kind: StoreKind) {
    let app = spawn_app(kind).await;
    let response = app.http.get(app.url("/nope")).send().await.unwrap();
    assert_eq!(response.status(), 404);
    assert_eq!(error_body(response).await["error"], "route_not_found");
    let task = app.create_task().await;
    let response = app
        .http
        .delete(app.url(&format!("/api/tasks/{task}/progress")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 405);
    error_body(response).await;
    let response = app.http.get(app.url("/ws")).send().await.unwrap();
    assert_eq!(response.status(), 426);
    error_body(response).await;
}

both_stores!(
    push_with_wrong_key_is_rejected_with_401,
    push_with_key_surrounded_by_whitespace_in_header_is_accepted,
    malformed_pushes_get_400_naming_the_field,
    push_to_a_missing_task_is_404,
    push_after_a_terminal_status_is_409,
    stale_or_repeated_seq_is_not_applied,
    oversized_body_is_413_and_non_json_is_415,
    unknown_route_is_404_and_wrong_method_is_405_with_json_bodies,
);

#[tokio::test]
async fn unreachable_database_gives_503_with_retry_after() {
    // Nothing listens on port 1; the pool's connect fails fast.
    let app =
        crate::helpers::spawn_app_on("postgres://postgres@127.0.0.1:1/none".to_string(), None)
            .await;
    let started = std::time::Instant::now();
    let response = app.push(uuid::Uuid::new_v4(), json!({"progress": 1})).await;
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));
    let body = error_body(response).await;
    assert_eq!(body["error"], "unavailable");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "the request hung"
    );
    let ready = app.http.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let health = app.http.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
}

#[tokio::test]
async fn the_demo_is_off_with_postgres_unless_asked_for_but_client_js_is_always_served() {
    let app = crate::helpers::spawn_app(StoreKind::Postgres).await;
    assert_eq!(
        app.http.get(app.url("/")).send().await.unwrap().status(),
        404
    );
    let start = app
        .http
        .post(app.url("/api/demo/tasks"))
        .send()
        .await
        .unwrap();
    assert_eq!(start.status(), 404);
    let client = app.http.get(app.url("/client.js")).send().await.unwrap();
    assert_eq!(client.status(), 200);
    assert!(
        client
            .text()
            .await
            .unwrap()
            .contains("export function watchTask")
    );
    let demo = crate::helpers::spawn_app_with(StoreKind::Postgres, |c| c.demo = true).await;
    assert_eq!(
        demo.http.get(demo.url("/")).send().await.unwrap().status(),
        200
    );
}

/// An empty body was "EOF while parsing a value" with a hint about "the named field".
#[tokio::test]
async fn an_empty_push_or_batch_body_is_a_400_that_says_the_body_is_empty() {
    let app = spawn_app(StoreKind::Memory).await;
    let task = app.create_task().await;
    for path in [
        format!("/api/tasks/{task}/progress"),
        "/api/progress".to_string(),
    ] {
        let response = app
            .http
            .post(app.url(&path))
            .bearer_auth(KEY)
            .header("content-type", "application/json")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{path}");
        let body = error_body(response).await;
        let message = body["message"].as_str().unwrap();
        assert!(
            message.starts_with("the body is empty"),
            "{path}: {message}"
        );
        assert!(!message.contains("EOF"), "{path}: {message}");
        assert!(
            body["hint"].as_str().unwrap().contains("JSON object"),
            "{path}: {body}"
        );
    }
}
