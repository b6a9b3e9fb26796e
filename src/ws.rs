//! WebSocket subscribers: the upgrade, and one task per connection.
//!
//! The upgrade is done here rather than with warp's `ws()`, which allocates a 128 KiB read
//! buffer per connection that cannot be tuned; with a small [`WebSocketConfig`] an idle
//! connection costs a few kilobytes.
//!
//! Protocol: `GET /ws?task_id=<uuid>` subscribes one task; on any connection the client may
//! send `{"type":"subscribe","task_id":..}` and `{"type":"unsubscribe","task_id":..}`. The
//! server sends `{"type":"state",...}` (the first per subscription has `"snapshot": true`)
//! and `{"type":"error","code","message","hint"}`.

use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::{Instant, MissedTickBehavior, interval_at, timeout};
use tokio_stream::StreamMap;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};
use warp::http::{HeaderMap, StatusCode, header};
use warp::hyper::upgrade::{OnUpgrade, Upgraded};
use warp::reply::Response;

use crate::config::Limits;
use crate::domain::TaskId;
use crate::error::Error;
use crate::hub::{Hub, Subscription};
use crate::store::Store;

type Socket = WebSocketStream<TokioIo<Upgraded>>;

/// What every connection needs. Cloning is shallow.
#[derive(Clone)]
pub struct WsContext {
    pub hub: Hub,
    pub store: Store,
    pub limits: Limits,
    /// Permits for open connections; the server waits for all of them at shutdown.
    pub connections: Arc<Semaphore>,
    /// Becomes `true` when the server shuts down.
    pub shutdown: watch::Receiver<bool>,
}

/// Answers the upgrade request with 101 and starts the connection task, or refuses with
/// an HTTP error before upgrading.
pub fn upgrade(
    ctx: WsContext,
    task_id: Option<String>,
    headers: &HeaderMap,
    on_upgrade: Option<OnUpgrade>,
) -> Result<Response, Error> {
    let has_token = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    if !has_token(header::UPGRADE, "websocket") || !has_token(header::CONNECTION, "upgrade") {
        return Err(Error::UpgradeRequired);
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(|v| v.as_bytes())
        != Some(b"13")
    {
        return Err(Error::invalid(
            "sec-websocket-version",
            "only WebSocket version 13 is supported".to_string(),
        ));
    }
    let key = headers.get(header::SEC_WEBSOCKET_KEY).ok_or_else(|| {
        Error::invalid(
            "sec-websocket-key",
            "the Sec-WebSocket-Key header is missing".to_string(),
        )
    })?;
    let on_upgrade = on_upgrade.ok_or(Error::UpgradeRequired)?;
    let initial = task_id.as_deref().map(TaskId::parse).transpose()?;
    let permit = ctx
        .connections
        .clone()
        .try_acquire_owned()
        .map_err(|_| Error::Unavailable {
            what: "a WebSocket slot (TASKCAST_MAX_CONNECTIONS reached)",
            source: None,
        })?;

    let accept = derive_accept_key(key.as_bytes());
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let config = socket_config(&ctx.limits);
                let socket = WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    Some(config),
                )
                .await;
                Connection::new(ctx, socket, permit).run(initial).await;
            }
            Err(e) => tracing::debug!(error = %e, "websocket upgrade failed"),
        }
    });

    let mut response = Response::default();
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(
        header::UPGRADE,
        header::HeaderValue::from_static("websocket"),
    );
    headers.insert(
        header::CONNECTION,
        header::HeaderValue::from_static("Upgrade"),
    );
    headers.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        header::HeaderValue::from_str(&accept).expect("base64 is a valid header value"),
    );
    Ok(response)
}

/// A small read buffer and bounded messages: a client cannot make a connection hold more
/// than a few KiB, and the write buffer is flushed per message.
fn socket_config(limits: &Limits) -> WebSocketConfig {
    let max = limits.max_ws_message_bytes;
    WebSocketConfig::default()
        .read_buffer_size(max.min(4096))
        .write_buffer_size(0)
        .max_write_buffer_size(64 * 1024)
        .max_message_size(Some(max))
        .max_frame_size(Some(max))
}

struct Connection {
    ctx: WsContext,
    socket: Socket,
    subscriptions: StreamMap<TaskId, Subscription>,
    _permit: OwnedSemaphorePermit,
}

/// Why a connection loop ended.
enum End {
    /// The client closed or vanished; nothing more to send.
    Gone,
    /// We close with this code and reason.
    Close(CloseCode, &'static str),
}

impl Connection {
    fn new(ctx: WsContext, socket: Socket, permit: OwnedSemaphorePermit) -> Self {
        Connection {
            ctx,
            socket,
            subscriptions: StreamMap::new(),
            _permit: permit,
        }
    }

    async fn run(mut self, initial: Option<TaskId>) {
        let end = match self.serve(initial).await {
            Ok(end) | Err(end) => end,
        };
        if let End::Close(code, reason) = end {
            let frame = CloseFrame {
                code,
                reason: reason.into(),
            };
            let _ = timeout(
                Duration::from_secs(1),
                self.socket.send(Message::Close(Some(frame))),
            )
            .await;
        }
        tracing::debug!(tasks = self.subscriptions.len(), "websocket closed");
    }

    async fn serve(&mut self, initial: Option<TaskId>) -> Result<End, End> {
        if let Some(task) = initial {
            self.subscribe(task).await?;
        }
        let ping_every = self.ctx.limits.ping_interval;
        let mut ping = interval_at(Instant::now() + ping_every, ping_every);
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut last_heard = Instant::now();
        let mut shutdown = self.ctx.shutdown.clone();
        loop {
            tokio::select! {
                _ = stopped(&mut shutdown) => {
                    return Ok(End::Close(CloseCode::Away, "server restarting"));
                }
                Some((_, frame)) = self.subscriptions.next() => {
                    self.send(Message::Text(frame.text.clone())).await?;
                }
                incoming = self.socket.next() => {
                    last_heard = Instant::now();
                    match incoming {
                        None | Some(Ok(Message::Close(_))) => return Ok(End::Gone),
                        Some(Ok(Message::Text(text))) => self.on_client_message(text.as_str()).await?,
                        Some(Ok(Message::Binary(_))) => {
                            let e = Error::invalid("message", "send JSON text messages, not binary".to_string());
                            self.send_error(&e, None).await?;
                        }
                        Some(Ok(_)) => {} // ping (answered by tungstenite), pong
                        Some(Err(tungstenite::Error::Capacity(_))) => {
                            return Ok(End::Close(CloseCode::Size, "message too big (TASKCAST_MAX_WS_MESSAGE_BYTES)"));
                        }
                        Some(Err(_)) => return Ok(End::Gone),
                    }
                }
                _ = ping.tick() => {
                    if last_heard.elapsed() >= self.ctx.limits.pong_timeout {
                        return Ok(End::Close(CloseCode::Policy, "no pong received"));
                    }
                    self.send(Message::Ping(Default::default())).await?;
                }
            }
        }
    }

    /// Sends one message; a client that does not take it within the pong timeout is gone.
    async fn send(&mut self, message: Message) -> Result<(), End> {
        match timeout(self.ctx.limits.pong_timeout, self.socket.send(message)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) | Err(_) => Err(End::Gone),
        }
    }

    async fn send_error(&mut self, error: &Error, task: Option<TaskId>) -> Result<(), End> {
        self.send(Message::text(error.to_ws_json(task))).await
    }

    async fn on_client_message(&mut self, text: &str) -> Result<(), End> {
        match parse_client_message(text) {
            Ok(ClientMessage::Subscribe(task)) => self.subscribe(task).await,
            Ok(ClientMessage::Unsubscribe(task)) => {
                self.subscriptions.remove(&task);
                Ok(())
            }
            Err(e) => self.send_error(&e, None).await,
        }
    }

    /// Subscribe, then snapshot: register with the hub first, then read the current state
    /// (hub, else store), send it, and from then on forward only newer versions.
    async fn subscribe(&mut self, task: TaskId) -> Result<(), End> {
        // A repeated subscribe starts over with a fresh snapshot.
        self.subscriptions.remove(&task);
        if self.subscriptions.len() >= self.ctx.limits.max_subscriptions {
            let e = Error::invalid(
                "subscribe",
                format!(
                    "this connection already has {} subscriptions (TASKCAST_MAX_SUBSCRIPTIONS); \
                     unsubscribe from one first",
                    self.ctx.limits.max_subscriptions
                ),
            );
            return self.send_error(&e, Some(task)).await;
        }
        let (mut subscription, current) = self.ctx.hub.subscribe(task);
        let snapshot = match current {
            Some(frame) => frame.state.clone(),
            None => match self.ctx.store.get(task).await {
                Ok(Some(state)) => {
                    self.ctx.hub.publish(&state);
                    state
                }
                Ok(None) => return self.send_error(&Error::NotFound(task), Some(task)).await,
                Err(e) => return self.send_error(&e, Some(task)).await,
            },
        };
        subscription.mark_delivered(snapshot.version);
        self.subscriptions.insert(task, subscription);
        self.send(Message::text(snapshot.to_json(true, None))).await
    }
}

/// Completes once the server shuts down (or the signal's sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

enum ClientMessage {
    Subscribe(TaskId),
    Unsubscribe(TaskId),
}

fn parse_client_message(text: &str) -> Result<ClientMessage, Error> {
    let expected = r#"expected {"type":"subscribe"|"unsubscribe","task_id":"<uuid>"}"#;
    let value: Value = serde_json::from_str(text).map_err(|e| {
        Error::invalid(
            "message",
            format!("the message is not valid JSON ({e}); {expected}"),
        )
    })?;
    let kind = value.get("type").and_then(Value::as_str);
    let task = || -> Result<TaskId, Error> {
        let raw = value
            .get("task_id")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                Error::invalid(
                    "task_id",
                    format!("the message has no task_id string; {expected}"),
                )
            })?;
        TaskId::parse(raw)
    };
    match kind {
        Some("subscribe") => Ok(ClientMessage::Subscribe(task()?)),
        Some("unsubscribe") => Ok(ClientMessage::Unsubscribe(task()?)),
        _ => Err(Error::invalid(
            "type",
            format!("unknown message type; {expected}"),
        )),
    }
}
