//! The generator's writes are answered straight from hyper in their plain form, and by the
//! filter tree otherwise (a query string sends them there). Both must give the same answer
//! to every request: status, body and CORS headers.

use reqwest::header::{self, HeaderMap, HeaderValue};
use serde_json::{Value, json};

use crate::helpers::{KEY, StoreKind, TestApp, spawn_app_with};

/// One request, sent once by each path.
struct Case {
    name: &'static str,
    /// `{id}` is replaced by a task of the case's own (made by `setup`).
    path: &'static str,
    headers: Vec<(&'static str, String)>,
    body: String,
    /// Pushes applied to the case's task first.
    setup: Vec<Value>,
}

fn case(name: &'static str, path: &'static str, body: Value) -> Case {
    Case {
        name,
        path,
        headers: vec![
            ("authorization", format!("Bearer {KEY}")),
            ("content-type", "application/json".to_string()),
        ],
        body: body.to_string(),
        setup: Vec::new(),
    }
}

impl Case {
    fn header(mut self, name: &'static str, value: &'static str) -> Self {
        self.headers.retain(|(n, _)| *n != name);
        self.headers.push((name, value.to_string()));
        self
    }

    fn without(mut self, name: &'static str) -> Self {
        self.headers.retain(|(n, _)| *n != name);
        self
    }

    fn raw_body(mut self, body: &str) -> Self {
        self.body = body.to_string();
        self
    }

    fn after(mut self, pushes: Vec<Value>) -> Self {
        self.setup = pushes;
        self
    }
}

fn cases() -> Vec<Case> {
    let unknown = "/api/tasks/0b6f1c5e-3f0e-4d7a-9a57-3c1f6c2d9e10/progress";
    vec![
        case(
            "a push",
            "/api/tasks/{id}/progress",
            json!({"progress": 10, "stage": "denoise"}),
        ),
        case(
            "a push from an allowed page",
            "/api/tasks/{id}/progress",
            json!({"progress": 1}),
        )
        .header("origin", "http://localhost:3000"),
        case(
            "a refused origin",
            "/api/tasks/{id}/progress",
            json!({"progress": 1}),
        )
        .header("origin", "https://evil.example"),
        case(
            "no push key",
            "/api/tasks/{id}/progress",
            json!({"progress": 1}),
        )
        .without("authorization"),
        case(
            "no push key, from an allowed page",
            "/api/tasks/{id}/progress",
            json!({"progress": 1}),
        )
        .without("authorization")
        .header("origin", "http://localhost:3000"),
        case(
            "a wrong push key",
            "/api/tasks/{id}/progress",
            json!({"progress": 1}),
        )
        .header(
            "authorization",
            "Bearer not-the-key-0123456789abcdef0123456",
        ),
        case(
            "text, not JSON",
            "/api/tasks/{id}/progress",
            json!({"progress": 1}),
        )
        .header("content-type", "text/plain"),
        case(
            "JSON with parameters",
            "/api/tasks/{id}/progress",
            json!({"progress": 2}),
        )
        .header("content-type", "Application/JSON; charset=utf-8"),
        case(
            "no content type",
            "/api/tasks/{id}/progress",
            json!({"progress": 3}),
        )
        .without("content-type"),
        case(
            "a body over the limit",
            "/api/tasks/{id}/progress",
            json!({"stage": "x".repeat(3000)}),
        ),
        case(
            "a body that is not JSON",
            "/api/tasks/{id}/progress",
            json!(null),
        )
        .raw_body("{progress"),
        case("an empty body", "/api/tasks/{id}/progress", json!(null)).raw_body(""),
        case(
            "an unknown field",
            "/api/tasks/{id}/progress",
            json!({"percent": 5}),
        ),
        case(
            "progress out of range",
            "/api/tasks/{id}/progress",
            json!({"progress": 101}),
        ),
        case(
            "a malformed id",
            "/api/tasks/not-a-uuid/progress",
            json!({"progress": 1}),
        ),
        case("an unknown task", unknown, json!({"progress": 1})),
        case(
            "an unknown task from an allowed page",
            unknown,
            json!({"progress": 1}),
        )
        .header("origin", "http://127.0.0.1:8080"),
        case(
            "a finished task",
            "/api/tasks/{id}/progress",
            json!({"progress": 1}),
        )
        .after(vec![json!({"status": "completed"})]),
        case(
            "a stale seq",
            "/api/tasks/{id}/progress",
            json!({"progress": 5, "seq": 1}),
        )
        .after(vec![json!({"progress": 4, "seq": 2})]),
        case(
            "a batch",
            "/api/progress",
            json!({"updates": [{"task_id": "{id}", "progress": 7}, {"task_id": "0b6f1c5e-3f0e-4d7a-9a57-3c1f6c2d9e10", "progress": 1}]}),
        ),
        case(
            "a batch from an allowed page",
            "/api/progress",
            json!([{"task_id": "{id}", "progress": 8}]),
        )
        .header("origin", "http://localhost:5173"),
        case("an empty batch", "/api/progress", json!({"updates": []})),
        case(
            "a batch that is not a list",
            "/api/progress",
            json!({"updates": 3}),
        ),
        case(
            "a batch without a key",
            "/api/progress",
            json!([{"task_id": "{id}"}]),
        )
        .without("authorization"),
    ]
}

/// Status, the headers a client reads, and the body without what differs between two tasks.
async fn send(app: &TestApp, case: &Case, query: &str) -> (u16, Vec<Option<String>>, Value) {
    let task = app.create_task().await;
    for push in &case.setup {
        app.push_ok(task, push.clone()).await;
    }
    let path = case.path.replace("{id}", &task.to_string());
    let mut headers = HeaderMap::new();
    for (name, value) in &case.headers {
        headers.insert(*name, HeaderValue::from_str(value).expect("a valid header"));
    }
    let response = app
        .http
        .post(app.url(&format!("{path}{query}")))
        .headers(headers)
        .body(case.body.replace("{id}", &task.to_string()))
        .send()
        .await
        .expect("POST");
    let status = response.status().as_u16();
    let shown = [
        header::CONTENT_TYPE,
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        header::VARY,
    ]
    .iter()
    .map(|name| {
        let values: Vec<_> = response.headers().get_all(name).iter().collect();
        (!values.is_empty()).then(|| format!("{values:?}"))
    })
    .collect();
    let text = response.text().await.expect("a body");
    let mut body: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    forget_task(&mut body, &task.to_string());
    (status, shown, body)
}

/// Drops the fields that differ between two tasks given the same pushes.
fn forget_task(value: &mut Value, task: &str) {
    match value {
        Value::Object(fields) => {
            fields.remove("updated_at");
            fields.remove("eta_at");
            fields.remove("eta_ms");
            for field in fields.values_mut() {
                forget_task(field, task);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|item| forget_task(item, task)),
        Value::String(text) => *text = text.replace(task, "{id}"),
        _ => {}
    }
}

#[tokio::test]
async fn a_generator_write_gets_the_same_answer_with_or_without_the_filter_tree() {
    let app = spawn_app_with(StoreKind::Memory, |c| c.limits.max_body_bytes = 2048).await;
    for case in cases() {
        let direct = send(&app, &case, "").await;
        let routed = send(&app, &case, "?via=routes").await;
        assert_eq!(direct, routed, "{}", case.name);
    }
    // The cases reach what they are named for (so the comparison is not of two 404s).
    let statuses: Vec<u16> = {
        let mut seen = Vec::new();
        for case in cases() {
            seen.push(send(&app, &case, "").await.0);
        }
        seen
    };
    assert_eq!(
        statuses,
        [
            200, 200, 403, 401, 401, 401, 415, 200, 200, 413, 400, 400, 400, 400, 400, 404, 404,
            409, 200, 200, 200, 400, 400, 401
        ]
    );
}
