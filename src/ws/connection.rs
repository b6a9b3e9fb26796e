//! One task per WebSocket connection: forwards hub frames, answers client messages, and
//! enforces the per-connection rules (subscription count, subscribe rate, token expiry,
//! idle and pong timeouts, shutdown).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use tokio::time::{Instant, sleep_until, timeout};
use tokio_stream::StreamMap;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message, Utf8Bytes};
use uuid::Uuid;
use warp::hyper::upgrade::Upgraded;

use super::deadlines::{Deadlines, Ping};
use super::protocol::{self, ClientMessage};
use crate::domain::TaskId;
use crate::error::Error;
use crate::subscribers::{Slot, Subscribers, Target, Watching};

type Socket = WebSocketStream<TokioIo<Upgraded>>;

pub struct Connection {
    ctx: Arc<Subscribers>,
    socket: Socket,
    /// Tasks and feeds watched; a feed counts as one subscription.
    subscriptions: StreamMap<Target, Watching>,
    /// The `?token=` of the URL, used when a subscribe message carries none.
    default_token: Option<Box<str>>,
    /// Pings, the idle close and token expiry.
    deadlines: Deadlines,
    /// Subscribe attempts in the current one-second window.
    rate_window: (Instant, u32),
    _permit: Slot,
}

/// What [`Connection::start`] did: `Err` holds how the connection must end.
pub struct Started(Result<(), End>);

/// What woke the connection's loop.
enum Turn {
    Stop,
    /// A frame's text to forward, and the feed it ends (its overflow notice), if any.
    Frame(Utf8Bytes, Option<Uuid>),
    Incoming(Option<Result<Message, tungstenite::Error>>),
    Timer,
}

/// Why a connection loop ended.
enum End {
    /// The client vanished; nothing more to send.
    Gone,
    /// The client sent a Close; tungstenite has queued the reply (its code echoed, or 1002
    /// for a code a client may not send, such as 1005 or 999), which is flushed before
    /// the TCP connection is dropped.
    ClosedByClient,
    /// We close with this code and reason.
    Close(CloseCode, &'static str),
}

impl Connection {
    pub fn new(
        ctx: Arc<Subscribers>,
        socket: Socket,
        permit: Slot,
        default_token: Option<String>,
    ) -> Self {
        let now = Instant::now();
        Connection {
            deadlines: Deadlines::new(now, &ctx.limits),
            ctx,
            socket,
            // Most connections watch one task; the default would reserve room for four.
            subscriptions: StreamMap::with_capacity(1),
            default_token: default_token.map(String::into_boxed_str),
            rate_window: (now, 0),
            _permit: permit,
        }
    }

    /// Subscribes the task named in the URL, if any: the first step of every connection,
    /// taken by [`super::open`] in its short-lived box, so the connection's own task
    /// does not keep the target (and a slot for it) for as long as the connection lives.
    pub async fn start(&mut self, initial: Option<Target>) -> Started {
        tracing::info!("websocket opened");
        match initial {
            Some(task) => Started(Box::pin(self.subscribe(task, None)).await),
            None => Started(Ok(())),
        }
    }

    /// Serves the connection until it ends, then closes it; `started` is what
    /// [`Connection::start`] returned.
    pub async fn run(&mut self, started: Started) {
        let end = match started.0 {
            Err(end) => end,
            Ok(()) => match self.serve().await {
                Ok(end) | Err(end) => end,
            },
        };
        match end {
            End::Gone => {}
            End::ClosedByClient => {
                // The Sink's close, not the inherent `close`, which would send a second Close.
                let flush = SinkExt::close(&mut self.socket);
                let _ = Box::pin(timeout(Duration::from_secs(1), flush)).await;
            }
            End::Close(code, reason) => {
                let frame = CloseFrame {
                    code,
                    reason: reason.into(),
                };
                let close = self.socket.send(Message::Close(Some(frame)));
                let _ = Box::pin(timeout(Duration::from_secs(1), close)).await;
            }
        }
        tracing::info!(tasks = self.subscriptions.len(), "websocket closed");
    }

    /// The loop. Its state is what an idle connection costs, so everything that is not
    /// needed on every turn (subscribing, which may query the store; handling a client
    /// message; expiring tokens) is boxed and exists only while it runs. One timer covers
    /// pings, the idle close and token expiry, and is re-armed only when its deadline
    /// moves, so forwarding a frame touches no timer.
    ///
    /// The `select!` only picks what happened ([`Turn`]); the work, which may await, is
    /// done after it, so the select's output and futures take no room beside it, and a
    /// frame's send (the largest state) holds nothing else. The timer is re-armed at the
    /// top of every turn.
    async fn serve(&mut self) -> Result<End, End> {
        // Created once: a fresh wait per loop turn would register with the shared shutdown
        // signal on every frame, a lock every connection contends on.
        let ctx = self.ctx.clone();
        let stop = ctx.shutdown.wait();
        tokio::pin!(stop);
        let timer = sleep_until(self.next_deadline());
        tokio::pin!(timer);
        loop {
            {
                let next = self.next_deadline();
                if next != timer.deadline() {
                    timer.as_mut().reset(next);
                }
            }
            // The select's output is a temporary of this statement, so it is gone before
            // the frame's send awaits.
            let text = match tokio::select! {
                _ = &mut stop => Turn::Stop,
                Some((target, frame)) = self.subscriptions.next() => {
                    // A feed's only notice is its overflow, after which its stream ends.
                    let ended_feed = match target {
                        Target::User(user) if frame.is_notice() => Some(user),
                        _ => None,
                    };
                    Turn::Frame(frame.text.clone(), ended_feed)
                }
                incoming = self.socket.next() => Turn::Incoming(incoming),
                () = &mut timer => Turn::Timer,
            } {
                Turn::Stop => return Ok(End::Close(CloseCode::Away, "server restarting")),
                Turn::Frame(text, ended_feed) => {
                    // An ended feed is forgotten (its token expiry; the idle clock starts if
                    // it was the last subscription) before its notice is sent.
                    if let Some(user) = ended_feed {
                        self.remove(Target::User(user));
                    }
                    text
                }
                Turn::Incoming(incoming) => {
                    self.deadlines.heard(Instant::now());
                    match incoming {
                        None => return Ok(End::Gone),
                        Some(Ok(Message::Close(_))) => return Ok(End::ClosedByClient),
                        Some(Ok(message @ (Message::Text(_) | Message::Binary(_)))) => {
                            Box::pin(self.on_data(message)).await?;
                        }
                        Some(Ok(_)) => {} // ping (tungstenite answers it), pong
                        Some(Err(e)) => return Ok(failed(&e)),
                    }
                    continue;
                }
                Turn::Timer => {
                    if let Some(end) = Box::pin(self.on_timer()).await? {
                        return Ok(end);
                    }
                    continue;
                }
            };
            self.send(Message::Text(text)).await?;
        }
    }

    /// See [`Deadlines::next`].
    fn next_deadline(&self) -> Instant {
        self.deadlines.next(!self.subscriptions.is_empty())
    }

    /// Does whatever is due. Every branch moves its deadline past now, so the timer never
    /// fires twice for the same reason.
    async fn on_timer(&mut self) -> Result<Option<End>, End> {
        let now = Instant::now();
        if self.deadlines.is_idle(now, !self.subscriptions.is_empty()) {
            return Ok(Some(End::Close(
                CloseCode::Normal,
                "idle: no subscription (TASKCAST_IDLE_TIMEOUT_SECS)",
            )));
        }
        let expired = self.deadlines.expired(now);
        if !expired.is_empty() {
            Box::pin(self.expire_tokens(expired)).await?;
        }
        match self.deadlines.ping(now, &self.ctx.limits) {
            Ping::NotYet => {}
            Ping::NoPong => return Ok(Some(End::Close(CloseCode::Policy, "no pong received"))),
            Ping::Send => self.send(Message::Ping(Default::default())).await?,
        }
        Ok(None)
    }

    /// Sends one message; a client that does not take it within the pong timeout is gone.
    /// The timer is armed only when the write cannot complete at once, so the common case
    /// costs no timer-wheel insert and removal per frame.
    ///
    /// Not an `async fn`: its future would hold the message twice (as its argument, and
    /// inside the write), and the loop's task is sized for this future.
    fn send(&mut self, message: Message) -> impl Future<Output = Result<(), End>> + Send + '_ {
        let limit = self.ctx.limits.pong_timeout;
        send_within(self.socket.send(message), limit)
    }

    async fn send_error(&mut self, error: &Error, task: Option<TaskId>) -> Result<(), End> {
        self.send(Message::text(
            error.to_ws_json(task.as_ref().map(TaskId::as_str)),
        ))
        .await
    }

    /// An error about one subscription (`task_id` is its id: a task's, or `user:<uuid>`).
    async fn send_target_error(&mut self, error: &Error, target: Target) -> Result<(), End> {
        self.send(Message::text(error.to_ws_json(Some(&target.label()))))
            .await
    }

    /// A text or binary message from the client. One boxed future for both, so the
    /// message is held in the loop's state at one await only.
    async fn on_data(&mut self, message: Message) -> Result<(), End> {
        match message {
            Message::Text(text) => self.on_client_message(text.as_str()).await,
            _ => {
                let e =
                    Error::invalid("message", "send JSON text messages, not binary".to_string());
                self.send_error(&e, None).await
            }
        }
    }

    async fn on_client_message(&mut self, text: &str) -> Result<(), End> {
        match protocol::parse(text) {
            Ok(ClientMessage::Subscribe { task, token }) => {
                // Counted before anything else: a stream of bad ids is rate-limited too.
                let over_rate = self.over_rate();
                let target = match self.ctx.parse_target(&task).await {
                    Ok(target) => target,
                    Err(e) if !over_rate => return self.send_error(&e, None).await,
                    Err(_) => return self.send_error(&self.rate_error(), None).await,
                };
                if over_rate {
                    return self.send_target_error(&self.rate_error(), target).await;
                }
                self.subscribe(target, token).await
            }
            Ok(ClientMessage::Cancel { task, token }) => {
                // Rate-limited with subscribes: each may write to the database.
                // Every refusal names the request, so a client does not take it for the end
                // of its subscriptions.
                if self.over_rate() {
                    let e = self.rate_error();
                    return self
                        .send(Message::text(e.to_ws_reply_json(&task, "cancel")))
                        .await;
                }
                let id = match self.ctx.store.parse_id(&task).await {
                    Ok(id) => id,
                    Err(e) => {
                        return self
                            .send(Message::text(e.to_ws_reply_json(&task, "cancel")))
                            .await;
                    }
                };
                Box::pin(self.cancel(id, token)).await
            }
            Ok(ClientMessage::Unsubscribe { task }) => {
                match self.ctx.parse_target(&task).await {
                    Ok(target) => self.remove(target),
                    Err(e) => return self.send_error(&e, None).await,
                }
                Ok(())
            }
            Err(e) => self.send_error(&e, None).await,
        }
    }

    fn rate_error(&self) -> Error {
        Error::RateLimited(format!(
            "more than {} subscribe messages in one second \
             (TASKCAST_MAX_SUBSCRIBES_PER_SEC); slow down",
            self.ctx.limits.max_subscribes_per_sec
        ))
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

    /// Authorize, then [`Subscribers::watch`] (subscribe, then snapshot), send the
    /// snapshot, and from then on forward only newer versions. A refusal is an error
    /// message; the connection stays usable.
    async fn subscribe(&mut self, task: Target, token: Option<String>) -> Result<(), End> {
        let token = token.or_else(|| self.default_token.as_deref().map(str::to_owned));
        let access = match self.ctx.may_watch_target(token.as_deref(), task).await {
            Ok(access) => access,
            Err(e) => return self.send_target_error(&e, task).await,
        };
        // A repeated subscribe (say, with a fresh token) starts over with a fresh snapshot.
        self.remove(task);
        if self.subscriptions.len() >= self.ctx.limits.max_subscriptions {
            let e = Error::RateLimited(format!(
                "this connection already has {} subscriptions (TASKCAST_MAX_SUBSCRIPTIONS); \
                 unsubscribe from one first",
                self.ctx.limits.max_subscriptions
            ));
            return self.send_target_error(&e, task).await;
        }
        let watch = match self.ctx.watch(task, &access).await {
            Ok(watch) => watch,
            Err(e) => return self.send_target_error(&e, task).await,
        };
        self.subscriptions.insert(task, watch.subscription);
        self.deadlines.watch(task, watch.expires_at);
        for (_, message) in watch.snapshot {
            self.send(Message::text(message)).await?;
        }
        Ok(())
    }

    /// [`Subscribers::cancel`], answered on the socket: `{"type":"cancel_requested",
    /// "task_id", "version", "cancel_requested_at", "applied"}`, or an error message with
    /// the code HTTP would give and `"request": "cancel"` (so a client does not take it
    /// for the end of its subscription). Subscribers of the task get the new state as usual.
    async fn cancel(&mut self, task: TaskId, token: Option<String>) -> Result<(), End> {
        let token = token.or_else(|| self.default_token.as_deref().map(str::to_owned));
        match self.ctx.cancel(token.as_deref(), task).await {
            Ok(outcome) => {
                let state = outcome.state();
                let answer = serde_json::json!({
                    "type": "cancel_requested",
                    "task_id": task.as_str(),
                    "version": state.version,
                    "cancel_requested_at": state.cancel_requested_at,
                    "applied": outcome.applied(),
                });
                self.send(Message::text(answer.to_string())).await
            }
            Err(e) => {
                let error = e.to_ws_reply_json(task.as_str(), "cancel");
                self.send(Message::text(error)).await
            }
        }
    }

    fn remove(&mut self, task: Target) {
        self.subscriptions.remove(&task);
        let subscribed = !self.subscriptions.is_empty();
        self.deadlines
            .forget(task, Instant::now(), subscribed, &self.ctx.limits);
    }

    /// Ends every subscription whose token has expired, telling the client how to go on.
    async fn expire_tokens(&mut self, expired: Vec<Target>) -> Result<(), End> {
        for task in expired {
            self.remove(task);
            self.send_target_error(&Error::TokenExpired, task).await?;
        }
        Ok(())
    }
}

/// Polls `write` once; only if it cannot complete at once is it given `limit` to, in a box:
/// the timer's state is only allocated while a write waits. A block rather than an
/// `async fn`, which would copy its arguments into its state a second time.
#[allow(clippy::manual_async_fn)] // on purpose: see above
fn send_within<W>(mut write: W, limit: Duration) -> impl Future<Output = Result<(), End>> + Send
where
    W: Future<Output = Result<(), tungstenite::Error>> + Unpin + Send,
{
    async move {
        if let Poll::Ready(result) =
            std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut write).poll(cx))).await
        {
            return result.map_err(|_| End::Gone);
        }
        match Box::pin(timeout(limit, write)).await {
            Ok(result) => result.map_err(|_| End::Gone),
            Err(_) => Err(End::Gone),
        }
    }
}

/// How a connection whose client broke the protocol ends: with the RFC 6455 close code
/// that says why (1009 too big, 1007 invalid UTF-8, 1002 any other protocol error), or
/// silently when the TCP connection itself is gone.
fn failed(error: &tungstenite::Error) -> End {
    use tungstenite::error::ProtocolError;
    match error {
        tungstenite::Error::Capacity(_) => End::Close(
            CloseCode::Size,
            "message too big (TASKCAST_MAX_WS_MESSAGE_BYTES)",
        ),
        tungstenite::Error::Utf8(_) => End::Close(CloseCode::Invalid, "invalid UTF-8"),
        tungstenite::Error::Protocol(ProtocolError::ResetWithoutClosingHandshake) => End::Gone,
        tungstenite::Error::Protocol(e) => {
            tracing::debug!(error = %e, "websocket protocol error");
            let reason = match e {
                ProtocolError::UnmaskedFrameFromClient => "client frames must be masked",
                ProtocolError::UnknownDataFrameType(_)
                | ProtocolError::UnknownControlFrameType(_) => "reserved opcode",
                ProtocolError::InvalidCloseSequence => "malformed close frame",
                ProtocolError::NonZeroReservedBits => "reserved bits set",
                _ => "protocol error",
            };
            End::Close(CloseCode::Protocol, reason)
        }
        _ => End::Gone,
    }
}
