//! Cancel (issue 16): a subscriber allowed to cancel asks over HTTP or the WebSocket; the
//! request is durable, versioned, broadcast on every node, idempotent, refused on a
//! finished task, and the generator reads it in the answer to its next push.

use std::time::Duration;

use serde_json::{Value, json};
use taskcast::auth::Secret;
use taskcast::auth::subscribe::{SubscribeAuth, mint_with};
use taskcast::domain::{TaskId, TaskStatus};
use taskcast_reporter::{Options, Reporter, Update};

use crate::both_stores;
use crate::helpers::{
    KEY, SUBSCRIBE_SECRET, StoreKind, Subscriber, TestApp, TestDb, WAIT, spawn_app, spawn_app_on,
    spawn_app_on_with, spawn_app_with, spawn_app_with_sessions, supabase_token,
};

both_stores!(
    cancel_over_http_with_a_cancel_token_is_broadcast_and_idempotent,
    cancel_over_websocket_is_answered_on_the_socket_and_broadcast,
    a_token_without_the_cancel_right_gets_403_on_http_and_websocket,
    the_owner_may_cancel_and_others_get_the_same_403_for_unknown_and_foreign_tasks,
    public_mode_lets_anyone_watch_but_not_cancel,
    a_finished_task_answers_409_and_a_cancelled_push_stays_final,
    a_websocket_cancel_refused_before_auth_names_the_request_and_the_subscription_goes_on,
    a_cancel_request_keeps_updated_at,
    the_push_answer_carries_cancel_requested_on_single_and_batch_routes,
    the_grace_period_cancels_a_task_the_generator_did_not_stop,
    the_rust_reporter_sees_cancel_requested_in_its_push_answers,
);

/// A subscribe token for `task` that carries the cancel right.
pub(crate) fn cancel_token(task: TaskId) -> String {
    mint_with(
        &Secret::new(SUBSCRIBE_SECRET),
        &[task],
        Duration::from_secs(600),
        true,
    )
}

pub(crate) async fn cancel(
    app: &TestApp,
    task: impl std::fmt::Display,
    token: Option<&str>,
) -> (u16, Value) {
    let mut request = app.http.post(app.url(&format!("/api/tasks/{task}/cancel")));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("POST cancel");
    let status = response.status().as_u16();
    (status, response.json().await.expect("a JSON body"))
}

async fn stored(app: &TestApp, task: TaskId) -> Value {
    let response = app.get_task(task).await;
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

/// Reads states until one satisfies `done` (bounded by the subscriber's own wait).
async fn state_where(sub: &mut Subscriber, done: impl Fn(&Value) -> bool) -> Value {
    loop {
        let state = sub.next_state().await;
        if done(&state) {
            return state;
        }
    }
}

/// The message's text with the task id replaced, to compare two refusals.
fn without_id(body: &Value, task: impl std::fmt::Display) -> String {
    body.to_string().replace(&task.to_string(), "<task>")
}

async fn cancel_over_http_with_a_cancel_token_is_broadcast_and_idempotent(kind: StoreKind) {
    let app = spawn_app(kind).await;
    // POST /api/tasks mints the cancel right when asked.
    let created = app
        .create_task_with(json!({"prompt": "a fox", "cancel": true}))
        .await;
    let task = TaskId::parse(created["task_id"].as_str().unwrap()).unwrap();
    let token = created["token"].as_str().unwrap().to_string();
    let mut sub = app.subscribe(task).await;
    let snapshot = sub.next_state().await;
    assert!(snapshot.get("cancel_requested").is_none(), "{snapshot}");

    let (status, first) = cancel(&app, task, Some(&token)).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["cancel_requested"], true);
    assert_eq!(first["applied"], true);
    assert!(first["cancel_requested_at"].is_string(), "{first}");
    assert_eq!(first["version"], snapshot["version"].as_i64().unwrap() + 1);
    let seen = sub.next_state().await;
    assert_eq!(seen["cancel_requested"], true);
    assert_eq!(seen["version"], first["version"]);
    assert_eq!(seen["cancel_requested_at"], first["cancel_requested_at"]);

    // Again: the same answer, no new version.
    let (status, second) = cancel(&app, task, Some(&token)).await;
    assert_eq!(status, 200, "{second}");
    assert_eq!(second["applied"], false);
    assert_eq!(second["version"], first["version"]);
    assert_eq!(second["cancel_requested_at"], first["cancel_requested_at"]);
    let now = stored(&app, task).await;
    assert_eq!(now["version"], first["version"]);
    assert_eq!(now["cancel_requested"], true);
    // A task created without asking gets a watch-only token.
    let plain = app.create_task_with(json!({})).await;
    let (status, body) = cancel(
        &app,
        &plain["task_id"].as_str().unwrap(),
        plain["token"].as_str(),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("forbidden")),
        "{body}"
    );
}

async fn cancel_over_websocket_is_answered_on_the_socket_and_broadcast(kind: StoreKind) {
    let app = spawn_app(kind).await;
    let task = app.create_task().await;
    let token = cancel_token(task);
    let mut sub = app.connect(&format!("?task_id={task}&token={token}")).await;
    let snapshot = sub.next_state().await;
    // No token in the message: the connection's ?token= is used.
    sub.send_json(json!({"type": "cancel", "task_id": task.to_string()}))
        .await;
    let mut answer = None;
    let mut state = None;
    while answer.is_none() || state.is_none() {
        let message = sub.next_message().await;
        match message["type"].as_str() {
            Some("cancel_requested") => answer = Some(message),
            Some("state") => state = Some(message),
            _ => panic!("unexpected message {message}"),
        }
    }
    let (answer, state) = (answer.unwrap(), state.unwrap());
    assert_eq!(answer["task_id"], task.to_string());
    assert_eq!(answer["applied"], true);
    assert_eq!(answer["version"], snapshot["version"].as_i64().unwrap() + 1);
    assert_eq!(state["cancel_requested"], true);
    assert_eq!(state["version"], answer["version"]);
    // Idempotent on the socket too.
    sub.send_json(json!({"type": "cancel", "task_id": task.to_string(), "token": token}))
        .await;
    let again = sub.next_message().await;
    assert_eq!(again["type"], "cancel_requested", "{again}");
    assert_eq!(again["applied"], false);
    assert_eq!(again["version"], answer["version"]);
    // A malformed cancel is a clear error, and the socket stays usable.
    sub.send_json(json!({"type": "cancel"})).await;
    let bad = sub.next_message().await;
    assert_eq!(
        (bad["type"].as_str(), bad["code"].as_str()),
        (Some("error"), Some("invalid_input"))
    );
}

async fn a_token_without_the_cancel_right_gets_403_on_http_and_websocket(kind: StoreKind) {
    let app = spawn_app(kind).await;
    let task = app.create_task().await;
    let watch_only = app.token(&[task]);
    let (status, body) = cancel(&app, task, Some(&watch_only)).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"], "forbidden");
    assert!(
        body["message"].as_str().unwrap().contains("cancel"),
        "{body}"
    );
    // The same refusal for a task that does not exist.
    let unknown = TaskId::random();
    let (status, missing) = cancel(&app, unknown, Some(&app.token(&[unknown]))).await;
    assert_eq!(status, 403);
    assert_eq!(without_id(&missing, unknown), without_id(&body, task));
    // A cancel token for another task is refused too, and without a token it is 401.
    let (status, _) = cancel(&app, task, Some(&cancel_token(unknown))).await;
    assert_eq!(status, 403);
    let (status, body) = cancel(&app, task, None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("token_required"))
    );

    let mut sub = app.subscribe(task).await;
    sub.next_state().await;
    sub.send_json(json!({"type": "cancel", "task_id": task.to_string()}))
        .await;
    let refused = sub.next_message().await;
    assert_eq!(refused["type"], "error");
    assert_eq!(refused["code"], "forbidden");
    assert_eq!(refused["task_id"], task.to_string());
    assert_eq!(refused["request"], "cancel", "{refused}");
    assert!(stored(&app, task).await.get("cancel_requested").is_none());
}

async fn the_owner_may_cancel_and_others_get_the_same_403_for_unknown_and_foreign_tasks(
    kind: StoreKind,
) {
    let app = spawn_app_with_sessions(kind).await;
    let (alice, bob) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    let created = app
        .create_task_with(json!({"user_id": alice.to_string()}))
        .await;
    let task = TaskId::parse(created["task_id"].as_str().unwrap()).unwrap();
    let (status, foreign) = cancel(&app, task, Some(&supabase_token(bob, "authenticated"))).await;
    assert_eq!(status, 403, "{foreign}");
    let unknown = TaskId::random();
    let (status, missing) =
        cancel(&app, unknown, Some(&supabase_token(bob, "authenticated"))).await;
    assert_eq!(status, 403);
    assert_eq!(without_id(&missing, unknown), without_id(&foreign, task));
    assert!(stored(&app, task).await.get("cancel_requested").is_none());

    // The owner, over HTTP and (idempotently) over the socket.
    let (status, body) = cancel(&app, task, Some(&supabase_token(alice, "authenticated"))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["cancel_requested"], true);
    let mut sub = app
        .connect(&format!(
            "?token={}",
            supabase_token(alice, "authenticated")
        ))
        .await;
    sub.send_json(json!({"type": "cancel", "task_id": task.to_string()}))
        .await;
    let answer = sub.next_message().await;
    assert_eq!(answer["type"], "cancel_requested", "{answer}");
    assert_eq!(answer["applied"], false);
    // Bob on the socket: the same code as on HTTP.
    sub.send_json(json!({"type": "cancel", "task_id": task.to_string(),
                         "token": supabase_token(bob, "authenticated")}))
        .await;
    assert_eq!(sub.next_message().await["code"], "forbidden");
}

async fn public_mode_lets_anyone_watch_but_not_cancel(kind: StoreKind) {
    let app = spawn_app_with(kind, |c| {
        c.subscribe = SubscribeAuth::new(Some(Secret::new(SUBSCRIBE_SECRET)), None, true);
    })
    .await;
    let task = app.create_task().await;
    let mut sub = app.connect(&format!("?task_id={task}")).await;
    sub.next_state().await;
    let (status, body) = cancel(&app, task, None).await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("public-subscribe"),
        "{body}"
    );
    sub.send_json(json!({"type": "cancel", "task_id": task.to_string()}))
        .await;
    assert_eq!(sub.next_message().await["code"], "forbidden");
    // A token that carries the right still works.
    let (status, body) = cancel(&app, task, Some(&cancel_token(task))).await;
    assert_eq!(status, 200, "{body}");
}

async fn a_finished_task_answers_409_and_a_cancelled_push_stays_final(kind: StoreKind) {
    let app = spawn_app(kind).await;
    for status in ["completed", "failed", "cancelled"] {
        let task = app.create_task().await;
        app.push_ok(task, json!({"status": status})).await;
        let (code, body) = cancel(&app, task, Some(&cancel_token(task))).await;
        assert_eq!(code, 409, "{body}");
        assert_eq!(body["error"], "task_finished");
        let message = body["message"].as_str().unwrap();
        assert!(
            message.contains(status) && message.contains("cannot be cancelled"),
            "{message}"
        );
        assert!(stored(&app, task).await.get("cancel_requested").is_none());
    }
    // Requested, then the generator stops: its cancelled push is final.
    let task = app.create_task().await;
    let (code, _) = cancel(&app, task, Some(&cancel_token(task))).await;
    assert_eq!(code, 200);
    let done = app.push_ok(task, json!({"status": "cancelled"})).await;
    assert_eq!(done["status"], "cancelled");
    assert_eq!(done["cancel_requested"], true);
    assert_eq!(app.push(task, json!({"progress": 5})).await.status(), 409);
    let (code, _) = cancel(&app, task, Some(&cancel_token(task))).await;
    assert_eq!(code, 409);
}

async fn the_push_answer_carries_cancel_requested_on_single_and_batch_routes(kind: StoreKind) {
    let app = spawn_app(kind).await;
    let (single, batched) = (app.create_task().await, app.create_task().await);
    let before = app.push_ok(single, json!({"progress": 10})).await;
    assert!(before.get("cancel_requested").is_none(), "{before}");
    for task in [single, batched] {
        let (code, _) = cancel(&app, task, Some(&cancel_token(task))).await;
        assert_eq!(code, 200);
    }
    let answer = app.push_ok(single, json!({"progress": 20})).await;
    assert_eq!(answer["cancel_requested"], true, "{answer}");
    assert!(answer["cancel_requested_at"].is_string());
    let batch: Value = app
        .http
        .post(app.url("/api/progress"))
        .bearer_auth(KEY)
        .json(&json!({"updates": [
            {"task_id": batched.to_string(), "progress": 30},
            {"task_id": single.to_string(), "status": "cancelled"},
        ]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for item in batch["results"].as_array().unwrap() {
        assert_eq!(item["status"], 200, "{batch}");
        assert_eq!(item["state"]["cancel_requested"], true, "{batch}");
    }
}

async fn the_grace_period_cancels_a_task_the_generator_did_not_stop(kind: StoreKind) {
    let app = spawn_app_with(kind, |c| c.cancel_grace = Some(Duration::from_millis(300))).await;
    let (ignored, open) = (app.create_task().await, app.create_task().await);
    app.push_ok(ignored, json!({"status": "processing", "progress": 40}))
        .await;
    let mut sub = app.subscribe(ignored).await;
    sub.next_state().await;
    let (code, asked) = cancel(&app, ignored, Some(&cancel_token(ignored))).await;
    assert_eq!(code, 200);
    let requested = sub.next_state().await;
    assert_eq!(requested["status"], "processing");
    let ended = tokio::time::timeout(WAIT, state_where(&mut sub, |s| s["status"] == "cancelled"))
        .await
        .expect("cancelled by the server within the wait");
    assert_eq!(ended["cancel_requested"], true);
    assert!(ended["version"].as_i64() > asked["version"].as_i64());
    let asked_at: chrono::DateTime<chrono::Utc> = asked["cancel_requested_at"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let ended_at: chrono::DateTime<chrono::Utc> =
        ended["updated_at"].as_str().unwrap().parse().unwrap();
    assert!(
        ended_at - asked_at >= chrono::Duration::milliseconds(300),
        "{asked} {ended}"
    );
    // The generator's push is refused now, and a task nobody asked to cancel runs on.
    assert_eq!(
        app.push(ignored, json!({"progress": 50})).await.status(),
        409
    );
    let running = app.push_ok(open, json!({"progress": 1})).await;
    assert_eq!(running["status"], "pending");
}

async fn the_rust_reporter_sees_cancel_requested_in_its_push_answers(kind: StoreKind) {
    let app = spawn_app(kind).await;
    let task = app.create_task().await;
    let reporter = Reporter::new(app.url(""), KEY, Options::default());
    reporter.report(
        task,
        Update::new().status(TaskStatus::Processing).progress(10.0),
    );
    assert!(reporter.flush(WAIT).await);
    assert!(!reporter.is_cancel_requested(task));
    let (code, _) = cancel(&app, task, Some(&cancel_token(task))).await;
    assert_eq!(code, 200);
    reporter.report(task, Update::new().progress(20.0));
    assert!(reporter.flush(WAIT).await);
    assert!(reporter.is_cancel_requested(task));
    reporter.report(task, Update::new().status(TaskStatus::Cancelled));
    assert!(reporter.flush(WAIT).await);
    assert!(!reporter.is_cancel_requested(task), "forgotten once final");
    assert_eq!(stored(&app, task).await["status"], "cancelled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_on_a_second_node_sees_cancel_requested() {
    let (mut nodes, _) = crate::cluster::spawn_nodes(2).await;
    let (first, second) = (nodes.remove(0), nodes.remove(0));
    let task = first.create_task().await;
    let mut sub = second.subscribe(task).await;
    sub.next_state().await;
    let (code, answer) = cancel(&first, task, Some(&cancel_token(task))).await;
    assert_eq!(code, 200);
    let state = sub.next_state().await;
    assert_eq!(state["cancel_requested"], true);
    assert_eq!(state["version"], answer["version"]);
    // The second node's push answer carries it too.
    let pushed = second.push_ok(task, json!({"progress": 3})).await;
    assert_eq!(pushed["cancel_requested"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_sql_cancel_request_is_versioned_and_delivered() {
    let app = spawn_app(StoreKind::Postgres).await;
    let task = app.create_task().await;
    let mut sub = app.subscribe(task).await;
    let before = sub.next_state().await;
    let client = app.db.as_ref().unwrap().client().await;
    client
        .execute(
            "UPDATE public.image_tasks SET cancel_requested_at = now() WHERE id = $1::text::uuid",
            &[&task.to_string()],
        )
        .await
        .unwrap();
    let state = sub.next_state().await;
    assert_eq!(state["cancel_requested"], true);
    assert_eq!(state["version"], before["version"].as_i64().unwrap() + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_words_of_the_app_decide_what_is_finished() {
    let db = TestDb::create().await;
    taskcast::store::schema::migrate(&db.url).await.unwrap();
    let url = db.url.clone();
    let client = db.client().await;
    let app = spawn_app_on_with(url, Some(db), |c| {
        c.status_map = taskcast::domain::StatusMap::parse("shipped:completed").unwrap();
    })
    .await;
    let set = async |task: TaskId, word: &str| {
        client
            .execute(
                "UPDATE public.image_tasks SET status = $2 WHERE id = $1::text::uuid",
                &[&task.to_string(), &word],
            )
            .await
            .unwrap();
    };
    // The app's own word and an alias mean finished; a word that maps to nothing is open.
    for (word, code) in [
        (" Shipped", 409),
        ("DONE", 409),
        ("running", 200),
        ("reviewing", 200),
    ] {
        let task = app.create_task().await;
        set(task, word).await;
        let (status, body) = cancel(&app, task, Some(&cancel_token(task))).await;
        assert_eq!(status, code, "{word}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_without_the_column_answers_422_until_migrated() {
    let db = TestDb::create().await;
    taskcast::store::schema::migrate(&db.url).await.unwrap();
    db.client()
        .await
        .batch_execute("ALTER TABLE public.image_tasks DROP COLUMN cancel_requested_at")
        .await
        .unwrap();
    let url = db.url.clone();
    let app = spawn_app_on(url.clone(), Some(db)).await;
    let task = app.create_task().await;
    // Everything else works.
    app.push_ok(task, json!({"progress": 5})).await;
    let (status, body) = cancel(&app, task, Some(&cancel_token(task))).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"], "schema_missing");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("cancel_requested_at")
    );
    assert!(body["hint"].as_str().unwrap().contains("taskcast migrate"));
    let changes = taskcast::store::schema::migrate(&url).await.unwrap();
    assert!(
        changes
            .iter()
            .any(|c| c == "added column cancel_requested_at"),
        "{changes:?}"
    );
    let (status, body) = cancel(&app, task, Some(&cancel_token(task))).await;
    assert_eq!(status, 200, "{body}");
}

/// A cancel refused before any token is read (an id the table cannot hold) is answered as a
/// cancel refusal (`request: "cancel"`, its `task_id`), never as an error without a task,
/// which a client takes for the end of every subscription on the socket.
async fn a_websocket_cancel_refused_before_auth_names_the_request_and_the_subscription_goes_on(
    kind: StoreKind,
) {
    let app = spawn_app(kind).await;
    let task = app.create_task().await;
    let token = cancel_token(task);
    let mut sub = app.connect(&format!("?task_id={task}&token={token}")).await;
    sub.next_state().await;
    let bad = "user:not-a-task";
    sub.send_json(json!({"type": "cancel", "task_id": bad}))
        .await;
    let refused = sub.next_message().await;
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(refused["request"], "cancel", "{refused}");
    assert_eq!(refused["task_id"], bad, "{refused}");
    // The task's subscription goes on.
    app.push(task, json!({"progress": 5})).await;
    let state = sub.next_state().await;
    assert_eq!(state["progress"], 5.0, "{state}");
}

/// A cancel request is no word from the generator: it bumps the version but keeps
/// `updated_at`, so it does not restart the stall clock (see the stalled tasks' README).
async fn a_cancel_request_keeps_updated_at(kind: StoreKind) {
    let app = spawn_app(kind).await;
    let task = app.create_task().await;
    app.push(task, json!({"status": "processing", "progress": 10}))
        .await;
    let before = stored(&app, task).await;
    let (status, _) = cancel(&app, task, Some(&cancel_token(task))).await;
    assert_eq!(status, 200);
    let after = stored(&app, task).await;
    assert_eq!(after["cancel_requested"], true, "{after}");
    assert_eq!(
        after["version"].as_i64(),
        before["version"].as_i64().map(|v| v + 1)
    );
    assert_eq!(after["updated_at"], before["updated_at"], "{after}");
}
