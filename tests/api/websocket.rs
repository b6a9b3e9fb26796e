//! The WebSocket protocol: errors keep the connection usable, limits close it clearly.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::both_stores;
use crate::helpers::{StoreKind, WAIT, spawn_app, spawn_app_with};

async fn subscribing_to_a_missing_task_yields_not_found_and_the_socket_stays_usable(
    kind: StoreKind,
) {
    let app = spawn_app(kind).await;
    let missing = uuid::Uuid::new_v4();
    // The token grants the task, so the holder may learn that it does not exist.
    let token = app.token(&[missing.into()]);
    let mut sub = app
        .connect(&format!("?task_id={missing}&token={token}"))
        .await;
    let error = sub.next_message().await;
    assert_eq!(error["type"], "error");
    assert_eq!(error["code"], "not_found");
    assert_eq!(error["task_id"], missing.to_string());

    let task = app.create_task().await;
    sub.send_json(app.subscribe_message(task)).await;
    assert_eq!(sub.next_state().await["task_id"], task.to_string());
    // The failed subscription left nothing in the hub.
    let hub = app.hub.clone();
    crate::helpers::wait_until(move || hub.len() == 1).await;
}

async fn bad_client_messages_get_error_messages_not_a_closed_socket(kind: StoreKind) {
    let app = spawn_app(kind).await;
    let mut sub = app.connect("").await;
    for bad in [
        "not json".to_string(),
        json!({"type": "dance"}).to_string(),
        json!({"type": "subscribe"}).to_string(),
        json!({"type": "subscribe", "task_id": "nope"}).to_string(),
    ] {
        sub.socket.send(Message::text(bad.clone())).await.unwrap();
        let error = sub.next_message().await;
        assert_eq!(error["type"], "error", "for {bad}");
        assert_eq!(error["code"], "invalid_input", "for {bad}");
        assert!(
            error["message"].as_str().unwrap().contains("task_id")
                || error["message"].as_str().unwrap().contains("type")
        );
    }
    let task = app.create_task().await;
    sub.send_json(app.subscribe_message(task)).await;
    assert_eq!(sub.next_state().await["snapshot"], true);
}

async fn invalid_task_id_in_the_url_is_400_before_upgrading(kind: StoreKind) {
    let app = spawn_app(kind).await;
    let err = tokio_tungstenite::connect_async(app.ws_url("?task_id=nope"))
        .await
        .unwrap_err();
    match err {
        tokio_tungstenite::tungstenite::Error::Http(response) => assert_eq!(response.status(), 400),
        other => panic!("expected an HTTP 400, got {other:?}"),
    }
}

async fn a_message_over_the_limit_closes_with_1009(kind: StoreKind) {
    let app = spawn_app(kind).await;
    let mut sub = app.connect("").await;
    let huge = json!({"type": "subscribe", "task_id": "x".repeat(5000)}).to_string();
    let _ = sub.socket.send(Message::text(huge)).await;
    let close = loop {
        match tokio::time::timeout(WAIT, sub.socket.next())
            .await
            .expect("closed in time")
        {
            Some(Ok(Message::Close(frame))) => break frame,
            Some(Ok(_)) => continue,
            other => panic!("expected a Close frame, got {other:?}"),
        }
    };
    assert_eq!(close.expect("a close frame").code, CloseCode::Size);
}

async fn subscriptions_per_connection_are_bounded(kind: StoreKind) {
    let app = spawn_app_with(kind, |c| c.limits.max_subscriptions = 2).await;
    let mut sub = app.connect("").await;
    for _ in 0..2 {
        let task = app.create_task().await;
        sub.send_json(app.subscribe_message(task)).await;
        assert_eq!(sub.next_state().await["snapshot"], true);
    }
    let third = app.create_task().await;
    sub.send_json(app.subscribe_message(third)).await;
    let error = sub.next_message().await;
    assert_eq!(error["type"], "error");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("TASKCAST_MAX_SUBSCRIPTIONS")
    );
}

async fn connections_beyond_the_limit_get_503(kind: StoreKind) {
    let app = spawn_app_with(kind, |c| c.limits.max_connections = 1).await;
    let _first = app.connect("").await;
    let err = tokio_tungstenite::connect_async(app.ws_url(""))
        .await
        .unwrap_err();
    match err {
        tokio_tungstenite::tungstenite::Error::Http(response) => assert_eq!(response.status(), 503),
        other => panic!("expected an HTTP 503, got {other:?}"),
    }
}

/// Reads raw frames without ever answering a ping, so the server must give up on us.
#[tokio::test]
async fn a_connection_that_never_answers_pings_is_closed() {
    let app = spawn_app_with(StoreKind::Memory, |c| {
        c.limits.ping_interval = Duration::from_millis(200);
        c.limits.pong_timeout = Duration::from_millis(600);
        // The connection has no subscription: only the pong timeout may close it here.
        c.limits.idle_timeout = Duration::from_secs(3600);
    })
    .await;
    let mut tcp = TcpStream::connect(app.addr).await.unwrap();
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        app.addr
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut received = Vec::new();
    let mut buf = [0u8; 1024];
    let started = std::time::Instant::now();
    // Read until the server closes the TCP connection; collect what it sent. One bound
    // for the whole wait: the pings alone would keep a per-read timeout from firing.
    tokio::time::timeout(WAIT, async {
        loop {
            let n = tcp.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            received.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("server closed in time");
    let text = String::from_utf8_lossy(&received);
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
    assert!(
        received.windows(1).any(|b| b[0] == 0x89),
        "no ping was sent"
    );
    assert!(
        received.windows(1).any(|b| b[0] == 0x88),
        "no close frame was sent"
    );
    assert!(
        text.contains("no pong received"),
        "closed for another reason"
    );
    assert!(started.elapsed() >= Duration::from_millis(600));
}

async fn a_connection_without_subscriptions_is_closed_when_idle(kind: StoreKind) {
    let app = spawn_app_with(kind, |c| c.limits.idle_timeout = Duration::from_millis(300)).await;
    let mut sub = app.connect("").await;
    // One bound for the whole wait, so pings cannot keep it going.
    let close = tokio::time::timeout(WAIT, async {
        loop {
            match sub.socket.next().await {
                Some(Ok(Message::Close(frame))) => break frame.expect("a close frame"),
                Some(Ok(_)) => continue,
                other => panic!("expected a Close frame, got {other:?}"),
            }
        }
    })
    .await
    .expect("closed in time");
    assert_eq!(close.code, CloseCode::Normal);
    assert!(close.reason.contains("idle"));
}

async fn a_subscribed_connection_is_not_closed_as_idle(kind: StoreKind) {
    let app = spawn_app_with(kind, |c| c.limits.idle_timeout = Duration::from_millis(200)).await;
    let task = app.create_task().await;
    let mut sub = app.subscribe(task).await;
    sub.next_state().await;
    // Pushes spread over several idle periods still arrive on the same socket.
    for i in 0..5 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        app.push_ok(task, json!({"progress": i})).await;
        assert_eq!(sub.next_state().await["progress"], f64::from(i));
    }
}

async fn subscribe_messages_beyond_the_rate_limit_get_an_error(kind: StoreKind) {
    let app = spawn_app_with(kind, |c| c.limits.max_subscribes_per_sec = 3).await;
    let task = app.create_task().await;
    let mut sub = app.connect("").await;
    let mut codes = Vec::new();
    for _ in 0..6 {
        sub.send_json(app.subscribe_message(task)).await;
        let reply = sub.next_message().await;
        codes.push(reply["code"].as_str().unwrap_or("state").to_string());
    }
    // Six in well under a second: at most three pass.
    assert!(
        codes.iter().filter(|c| *c == "limit_exceeded").count() >= 3,
        "{codes:?}"
    );
    assert_eq!(codes[0], "state");
}

both_stores!(
    subscribing_to_a_missing_task_yields_not_found_and_the_socket_stays_usable,
    bad_client_messages_get_error_messages_not_a_closed_socket,
    invalid_task_id_in_the_url_is_400_before_upgrading,
    a_message_over_the_limit_closes_with_1009,
    subscriptions_per_connection_are_bounded,
    connections_beyond_the_limit_get_503,
    a_connection_without_subscriptions_is_closed_when_idle,
    a_subscribed_connection_is_not_closed_as_idle,
    subscribe_messages_beyond_the_rate_limit_get_an_error,
);
