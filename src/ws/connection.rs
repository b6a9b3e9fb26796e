//! One task per WebSocket connection: forwards hub frames, answers client messages, and
//! enforces the per-connection rules (subscription count, subscribe rate, token expiry,
//! idle and pong timeouts, shutdown).

use std::collections::HashMap;
use std::future::Future;
use std::task::Poll;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use tokio::sync::{OwnedSemaphorePermit, watch};
use tokio::time::{Instant, MissedTickBehavior, interval_at, sleep_until, timeout};
use tokio_stream::StreamMap;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use warp::hyper::upgrade::Upgraded;

use super::WsContext;
use super::protocol::{self, ClientMessage};
use crate::auth::may_watch;
use crate::auth::subscribe::now_unix;
use crate::domain::TaskId;
use crate::error::Error;
use crate::hub::Subscription;

type Socket = WebSocketStream<TokioIo<Upgraded>>;

pub struct Connection {
    ctx: WsContext,
    socket: Socket,
    subscriptions: StreamMap<TaskId, Subscription>,
    /// The `?token=` of the URL, used when a subscribe message carries none.
    default_token: Option<String>,
    /// When each subscription's token expires, and the earliest of them.
    expiries: HashMap<TaskId, Instant>,
    next_expiry: Option<Instant>,
    /// When a connection with no subscription is closed.
    idle_deadline: Instant,
    /// Subscribe attempts in the current one-second window.
    rate_window: (Instant, u32),
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
    pub fn new(
        ctx: WsContext,
        socket: Socket,
        permit: OwnedSemaphorePermit,
        default_token: Option<String>,
    ) -> Self {
        let idle_deadline = Instant::now() + ctx.limits.idle_timeout;
        Connection {
            ctx,
            socket,
            subscriptions: StreamMap::new(),
            default_token,
            expiries: HashMap::new(),
            next_expiry: None,
            idle_deadline,
            rate_window: (Instant::now(), 0),
            _permit: permit,
        }
    }

    pub async fn run(mut self, initial: Option<TaskId>) {
        tracing::info!("websocket opened");
        let end = match self.serve(initial).await {
            Ok(end) | Err(end) => end,
        };
        if let End::Close(code, reason) = end {
            let frame = CloseFrame {
                code,
                reason: reason.into(),
            };
            let close = self.socket.send(Message::Close(Some(frame)));
            let _ = timeout(Duration::from_secs(1), close).await;
        }
        tracing::info!(tasks = self.subscriptions.len(), "websocket closed");
    }

    async fn serve(&mut self, initial: Option<TaskId>) -> Result<End, End> {
        if let Some(task) = initial {
            self.subscribe(task, None).await?;
        }
        let limits = self.ctx.limits.clone();
        let mut ping = interval_at(Instant::now() + limits.ping_interval, limits.ping_interval);
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut last_heard = Instant::now();
        let mut shutdown = self.ctx.shutdown.clone();
        // Created once: a fresh wait per loop turn would register with the shared shutdown
        // channel on every frame, a lock every connection contends on.
        let stop = stopped(&mut shutdown);
        tokio::pin!(stop);
        loop {
            let idle = self.subscriptions.is_empty();
            let expiry = self.next_expiry;
            tokio::select! {
                _ = &mut stop => {
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
                        Some(Ok(_)) => {} // ping (tungstenite answers it), pong
                        Some(Err(tungstenite::Error::Capacity(_))) => {
                            return Ok(End::Close(CloseCode::Size, "message too big (TASKCAST_MAX_WS_MESSAGE_BYTES)"));
                        }
                        Some(Err(_)) => return Ok(End::Gone),
                    }
                }
                _ = ping.tick() => {
                    if last_heard.elapsed() >= limits.pong_timeout {
                        return Ok(End::Close(CloseCode::Policy, "no pong received"));
                    }
                    self.send(Message::Ping(Default::default())).await?;
                }
                _ = sleep_until(self.idle_deadline), if idle => {
                    return Ok(End::Close(CloseCode::Normal, "idle: no subscription (TASKCAST_IDLE_TIMEOUT_SECS)"));
                }
                _ = sleep_until(expiry.unwrap_or(self.idle_deadline)), if expiry.is_some() => {
                    self.expire_tokens().await?;
                }
            }
        }
    }

    /// Sends one message; a client that does not take it within the pong timeout is gone.
    /// The timer is armed only when the write cannot complete at once, so the common case
    /// costs no timer-wheel insert and removal per frame.
    async fn send(&mut self, message: Message) -> Result<(), End> {
        let limit = self.ctx.limits.pong_timeout;
        let write = self.socket.send(message);
        tokio::pin!(write);
        let first = std::future::poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await;
        let done = match first {
            Poll::Ready(result) => result,
            Poll::Pending => match timeout(limit, write).await {
                Ok(result) => result,
                Err(_) => return Err(End::Gone),
            },
        };
        done.map_err(|_| End::Gone)
    }

    async fn send_error(&mut self, error: &Error, task: Option<TaskId>) -> Result<(), End> {
        self.send(Message::text(error.to_ws_json(task))).await
    }

    async fn on_client_message(&mut self, text: &str) -> Result<(), End> {
        match protocol::parse(text) {
            Ok(ClientMessage::Subscribe { task, token }) => {
                if self.over_rate() {
                    let e = Error::RateLimited(format!(
                        "more than {} subscribe messages in one second \
                         (TASKCAST_MAX_SUBSCRIBES_PER_SEC); slow down",
                        self.ctx.limits.max_subscribes_per_sec
                    ));
                    return self.send_error(&e, Some(task)).await;
                }
                self.subscribe(task, token).await
            }
            Ok(ClientMessage::Unsubscribe { task }) => {
                self.remove(task);
                Ok(())
            }
            Err(e) => self.send_error(&e, None).await,
        }
    }

    fn over_rate(&mut self) -> bool {
        let (start, count) = &mut self.rate_window;
        if start.elapsed() >= Duration::from_secs(1) {
            *start = Instant::now();
            *count = 0;
        }
        *count += 1;
        *count > self.ctx.limits.max_subscribes_per_sec
    }

    /// Authorize, then subscribe, then snapshot: register with the hub first, then read the
    /// current state (hub, else store), send it, and from then on forward only newer
    /// versions. A refusal is an error message; the connection stays usable.
    async fn subscribe(&mut self, task: TaskId, token: Option<String>) -> Result<(), End> {
        let token = token.or_else(|| self.default_token.clone());
        let access =
            match may_watch(&self.ctx.subscribe, &self.ctx.store, token.as_deref(), task).await {
                Ok(access) => access,
                Err(e) => return self.send_error(&e, Some(task)).await,
            };
        // A repeated subscribe (say, with a fresh token) starts over with a fresh snapshot.
        self.remove(task);
        if self.subscriptions.len() >= self.ctx.limits.max_subscriptions {
            let e = Error::RateLimited(format!(
                "this connection already has {} subscriptions (TASKCAST_MAX_SUBSCRIPTIONS); \
                 unsubscribe from one first",
                self.ctx.limits.max_subscriptions
            ));
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
        if let Some(expires_at) = access.expires_at() {
            let left = Duration::from_secs(expires_at.saturating_sub(now_unix()));
            self.expiries.insert(task, Instant::now() + left);
            self.next_expiry = self.expiries.values().min().copied();
        }
        self.send(Message::text(snapshot.to_json(true, None))).await
    }

    fn remove(&mut self, task: TaskId) {
        self.subscriptions.remove(&task);
        if self.expiries.remove(&task).is_some() {
            self.next_expiry = self.expiries.values().min().copied();
        }
        if self.subscriptions.is_empty() {
            self.idle_deadline = Instant::now() + self.ctx.limits.idle_timeout;
        }
    }

    /// Ends every subscription whose token has expired, telling the client how to go on.
    async fn expire_tokens(&mut self) -> Result<(), End> {
        let now = Instant::now();
        let expired: Vec<TaskId> = self
            .expiries
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(task, _)| *task)
            .collect();
        for task in expired {
            self.remove(task);
            self.send_error(&Error::TokenExpired, Some(task)).await?;
        }
        Ok(())
    }
}

/// Completes once the server shuts down (or the signal's sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}
