//! Who may watch: subscribe tokens, Supabase sessions, public mode, and browser origins.

use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use taskcast::auth::Secret;
use taskcast::auth::subscribe::{SubscribeAuth, now_unix};

use crate::both_stores;
use crate::helpers::{
    KEY, SUBSCRIBE_SECRET, StoreKind, spawn_app, spawn_app_with, spawn_app_with_sessions,
    supabase_token,
};

fn sign(secret: &str, alg: Algorithm, claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::new(alg),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// Subscribes with `token` over a fresh socket and returns the first message.
async fn first_message_with(
    app: &crate::helpers::TestApp,
    task: impl std::fmt::Display,
    token: &str,
) -> Value {
    let mut sub = app.connect(&format!("?task_id={task}&token={token}")).await;
    sub.next_message().await
}

async fn subscribing_without_a_token_is_refused_on_the_socket(kind: StoreKind) {
    let app = spawn_app(kind).await;
    let task = app.create_task().await;
    let mut sub = app.connect(&format!("?task_id={task}")).await;
    let error = sub.next_message().await;
    assert_eq!(error["type"], "error");
    assert_eq!(error["code"], "token_required");
    // The refusal left nothing subscribed, and the socket still works.
    app.wait_for_empty_hub().await;
    sub.send_json(app.subscribe_message(task)).await;
    assert_eq!(sub.next_state().await["snapshot"], true);
}

async fn expired_forged_unsigned_and_swapped_tokens_are_refused(kind: StoreKind) {
    let app = spawn_app(kind).await;
    let task = app.create_task().await;
    let claims = |exp: u64| json!({"task_id": task.to_string(), "exp": exp});
    let cases = [
        (
            sign(SUBSCRIBE_SECRET, Algorithm::HS256, &claims(now_unix() - 10)),
            "token_expired",
        ),
        (
            sign(
                "another-secret-0123456789abcdef0123",
                Algorithm::HS256,
                &claims(now_unix() + 600),
            ),
            "token_invalid",
        ),
        (
            sign(
                SUBSCRIBE_SECRET,
                Algorithm::HS512,
                &claims(now_unix() + 600),
            ),
            "token_invalid",
        ),
        ("not.a.token".to_string(), "token_invalid"),
    ];
    for (token, code) in cases {
        let error = first_message_with(&app, task, &token).await;
        assert_eq!(error["code"], code, "for {token}");
    }
    // alg "none": the real payload with an unsigned header and no signature.
    let real = app.token(&[task]);
    let payload = real.split('.').nth(1).unwrap();
    let none = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{payload}.");
    assert_eq!(
        first_message_with(&app, task, &none).await["code"],
        "token_invalid"
    );
}

async fn a_token_for_another_task_is_forbidden_and_the_socket_stays_usable(kind: StoreKind) {
    let app = spawn_app(kind).await;
    let mine = app.create_task().await;
    let theirs = app.create_task().await;
    let mut sub = app.connect("").await;
    sub.send_json(
        json!({"type": "subscribe", "task_id": theirs.to_string(), "token": app.token(&[mine])}),
    )
    .await;
    let error = sub.next_message().await;
    assert_eq!(error["code"], "forbidden");
    assert_eq!(error["task_id"], theirs.to_string());
    sub.send_json(app.subscribe_message(mine)).await;
    assert_eq!(sub.next_state().await["task_id"], mine.to_string());
}

async fn a_token_that_expires_while_subscribed_ends_the_subscription_until_renewed(
    kind: StoreKind,
) {
    let app = spawn_app(kind).await;
    let task = app.create_task().await;
    let short = taskcast::auth::subscribe::mint(
        &Secret::new(SUBSCRIBE_SECRET),
        &[task],
        Duration::from_secs(1),
    );
    let mut sub = app.connect(&format!("?task_id={task}&token={short}")).await;
    assert_eq!(sub.next_state().await["snapshot"], true);
    let expired = sub.next_message().await;
    assert_eq!(expired["type"], "error");
    assert_eq!(expired["code"], "token_expired");
    assert_eq!(expired["task_id"], task.to_string());
    app.wait_for_empty_hub().await;
    // A fresh token on the same socket resumes, starting with the current state.
    app.push_ok(task, json!({"progress": 70})).await;
    sub.send_json(app.subscribe_message(task)).await;
    let resumed = sub.next_state().await;
    assert_eq!(resumed["snapshot"], true);
    assert_eq!(resumed["progress"], 70.0);
}

async fn the_token_from_task_creation_lets_a_browser_watch_that_task(kind: StoreKind) {
    let app = spawn_app(kind).await;
    let created = app.create_task_with(json!({})).await;
    let task = created["task_id"].as_str().unwrap();
    let token = created["token"]
        .as_str()
        .expect("POST /api/tasks returns a token");
    let state = first_message_with(&app, task, token).await;
    assert_eq!(state["type"], "state");
    assert_eq!(state["task_id"], task);
}

async fn supabase_users_may_watch_their_own_tasks_only(kind: StoreKind) {
    let app = spawn_app_with_sessions(kind).await;
    let (alice, bob) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    let created = app
        .create_task_with(json!({"user_id": alice.to_string()}))
        .await;
    let task = created["task_id"].as_str().unwrap().to_string();

    let own = first_message_with(&app, &task, &supabase_token(alice, "authenticated")).await;
    assert_eq!(own["type"], "state", "{own}");
    let other = first_message_with(&app, &task, &supabase_token(bob, "authenticated")).await;
    assert_eq!(other["code"], "forbidden");
    let anon = first_message_with(&app, &task, &supabase_token(alice, "anon")).await;
    assert_eq!(anon["code"], "forbidden");
    // A task that does not exist is refused exactly like someone else's: no existence leak.
    let missing = first_message_with(
        &app,
        uuid::Uuid::new_v4(),
        &supabase_token(bob, "authenticated"),
    )
    .await;
    assert_eq!(missing["code"], "forbidden");
    assert_eq!(
        missing["message"]
            .as_str()
            .unwrap()
            .replace(&missing["task_id"].as_str().unwrap().to_string(), "X"),
        other["message"].as_str().unwrap().replace(&task, "X")
    );
}

async fn get_task_needs_the_push_key_or_a_token_for_that_task(kind: StoreKind) {
    let app = spawn_app(kind).await;
    let task = app.create_task().await;
    let other = app.create_task().await;
    let url = app.url(&format!("/api/tasks/{task}"));
    let anonymous = app.http.get(&url).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    let wrong = app
        .http
        .get(&url)
        .bearer_auth(app.token(&[other]))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 403);
    let missing = app
        .http
        .get(app.url(&format!("/api/tasks/{}", uuid::Uuid::new_v4())))
        .bearer_auth(app.token(&[other]))
        .send()
        .await
        .unwrap();
    assert_eq!(
        missing.status(),
        403,
        "a refusal must not reveal whether the task exists"
    );
    let by_query = app
        .http
        .get(format!("{url}?token={}", app.token(&[task])))
        .send()
        .await
        .unwrap();
    assert_eq!(by_query.status(), 200);
    let by_key = app.get_task(task).await;
    assert_eq!(by_key.status(), 200);
}

async fn public_mode_lets_anyone_subscribe(kind: StoreKind) {
    let app = spawn_app_with(kind, |c| c.subscribe = SubscribeAuth::new(None, None, true)).await;
    let task = app.create_task().await;
    let mut sub = app.connect(&format!("?task_id={task}")).await;
    assert_eq!(sub.next_state().await["snapshot"], true);
}

async fn the_previous_push_key_works_during_a_rotation(kind: StoreKind) {
    let app = spawn_app_with(kind, |c| {
        c.push_key =
            taskcast::auth::PushKey::new(KEY).with_previous("old-key-0123456789abcdef0123456789")
    })
    .await;
    let task = app.create_task().await;
    for key in [KEY, "old-key-0123456789abcdef0123456789"] {
        let response = app
            .http
            .post(app.url(&format!("/api/tasks/{task}/progress")))
            .bearer_auth(key)
            .json(&json!({"progress": 1}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
}

both_stores!(
    subscribing_without_a_token_is_refused_on_the_socket,
    expired_forged_unsigned_and_swapped_tokens_are_refused,
    a_token_for_another_task_is_forbidden_and_the_socket_stays_usable,
    a_token_that_expires_while_subscribed_ends_the_subscription_until_renewed,
    the_token_from_task_creation_lets_a_browser_watch_that_task,
    supabase_users_may_watch_their_own_tasks_only,
    get_task_needs_the_push_key_or_a_token_for_that_task,
    public_mode_lets_anyone_subscribe,
    the_previous_push_key_works_during_a_rotation,
);

/// Sends an upgrade request with `origin` and returns the HTTP status.
async fn upgrade_status(app: &crate::helpers::TestApp, origin: Option<&str>) -> u16 {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = app.ws_url("").into_client_request().unwrap();
    if let Some(origin) = origin {
        request
            .headers_mut()
            .insert("origin", origin.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((_, response)) => response.status().as_u16(),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(other) => panic!("unexpected error {other:?}"),
    }
}

#[tokio::test]
async fn only_allowed_origins_may_open_a_socket_or_read_cross_origin() {
    let app = spawn_app_with(StoreKind::Memory, |c| {
        c.allowed_origins = vec![
            "https://app.example.com".into(),
            "http://localhost:3000".into(),
        ];
    })
    .await;
    assert_eq!(
        upgrade_status(&app, None).await,
        101,
        "no Origin: a server, unaffected"
    );
    assert_eq!(
        upgrade_status(&app, Some("https://app.example.com")).await,
        101
    );
    assert_eq!(
        upgrade_status(&app, Some("http://localhost:3000")).await,
        101
    );
    assert_eq!(
        upgrade_status(&app, Some(&format!("http://{}", app.addr))).await,
        101,
        "the demo page: a loopback origin, outside production"
    );
    assert_eq!(
        upgrade_status(&app, Some("https://app.example.com:443")).await,
        101,
        "the default port is the same origin"
    );
    assert_eq!(
        upgrade_status(&app, Some("https://evil.example.com")).await,
        403
    );

    let task = app.create_task().await;
    let url = app.url(&format!("/api/tasks/{task}?token={}", app.token(&[task])));
    let allowed = app
        .http
        .get(&url)
        .header("origin", "https://app.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(allowed.status(), 200);
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    let refused = app
        .http
        .get(&url)
        .header("origin", "https://evil.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 403);
    // DNS rebinding: the page's origin equals the Host its own name made the browser send.
    let port = app.addr.port();
    let rebound = app
        .http
        .get(&url)
        .header("host", format!("rebind.evil.example:{port}"))
        .header("origin", format!("http://rebind.evil.example:{port}"))
        .send()
        .await
        .unwrap();
    assert_eq!(rebound.status(), 403, "an Origin equal to Host is no proof");
    let body: Value = refused.json().await.unwrap();
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("TASKCAST_ALLOWED_ORIGINS")
    );
    let preflight = app
        .http
        .request(reqwest::Method::OPTIONS, &url)
        .header("origin", "https://app.example.com")
        .header("access-control-request-method", "GET")
        .send()
        .await
        .unwrap();
    assert_eq!(preflight.status(), 204);
    assert!(
        preflight.headers()["access-control-allow-headers"]
            .to_str()
            .unwrap()
            .contains("authorization")
    );
    // The generator (no Origin) is unaffected.
    app.push_ok(task, json!({"progress": 1})).await;
}

#[tokio::test]
async fn in_production_only_configured_origins_pass_not_loopback_ones() {
    let app = spawn_app_with(StoreKind::Memory, |c| {
        c.allow_loopback_origins = false;
        c.allowed_origins = vec!["http://progress.example.com:80".into()];
    })
    .await;
    assert_eq!(
        upgrade_status(&app, Some(&format!("http://{}", app.addr))).await,
        403,
        "the server's own address is not configured"
    );
    assert_eq!(
        upgrade_status(&app, Some("http://localhost:3000")).await,
        403
    );
    assert_eq!(
        upgrade_status(&app, Some("http://progress.example.com")).await,
        101,
        "a configured origin, written with its default port"
    );
}
