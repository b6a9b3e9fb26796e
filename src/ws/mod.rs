//! WebSocket subscribers: the upgrade, and one task per connection.
//!
//! The upgrade is done here rather than with warp's `ws()`, which allocates a 128 KiB read
//! buffer per connection that cannot be tuned; with a small [`WebSocketConfig`] an idle
//! connection costs a few kilobytes.
//!
//! Protocol: `GET /ws?task_id=<uuid>&token=<token>` subscribes one task; on any connection
//! the client may send `{"type":"subscribe","task_id":..,"token"?:..}` and
//! `{"type":"unsubscribe","task_id":..}`. A `task_id` of `user:<uuid>` is that user's
//! feed: a snapshot frame per task, `{"type":"snapshot_complete","feed":..,"tasks":n}`,
//! then every newer version of any of the user's tasks; its frames carry `"feed"`. The server sends `{"type":"state",...}` (the first
//! per subscription has `"snapshot": true`) and `{"type":"error","code","message","hint"}`.

mod connection;
mod deadlines;
pub mod protocol;

use std::sync::Arc;

use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use warp::http::{HeaderMap, StatusCode, header};
use warp::hyper::upgrade::OnUpgrade;
use warp::reply::Response;

use crate::error::Error;
use crate::subscribers::{Slot, SubscriberLimits, Subscribers, Target};
use connection::{Connection, Started};

/// Answers the upgrade request with 101 and starts the connection task, or refuses with
/// an HTTP error before upgrading.
pub async fn upgrade(
    ctx: Arc<Subscribers>,
    task_id: Option<String>,
    token: Option<String>,
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
    let initial = match task_id {
        Some(raw) => Some(ctx.parse_target(&raw).await?),
        None => None,
    };
    let permit = ctx.admit("a WebSocket slot (TASKCAST_MAX_CONNECTIONS reached)")?;

    let accept = derive_accept_key(key.as_bytes());
    // The task's future is allocated at its largest for as long as the connection lives,
    // and async blocks keep a slot for every value moved across an await: so the upgrade
    // is awaited in a box that is freed once the socket exists, and the connection lives
    // in a box of its own that only its pointer moves.
    // The URL's subscription is made in the same box, so the connection's task does not
    // keep the target (a slot in each future that passed it on) for its whole life.
    let opening = Box::pin(open(ctx, on_upgrade, permit, token, initial));
    tokio::spawn(async move {
        let Some((mut connection, started)) = opening.await else {
            return;
        };
        connection.run(started).await;
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

/// Waits for hyper to hand over the upgraded connection, wraps it in a WebSocket and
/// subscribes the URL's target, if any.
async fn open(
    ctx: Arc<Subscribers>,
    on_upgrade: OnUpgrade,
    permit: Slot,
    token: Option<String>,
    initial: Option<Target>,
) -> Option<(Box<Connection>, Started)> {
    let upgraded = match on_upgrade.await {
        Ok(upgraded) => upgraded,
        Err(e) => {
            tracing::debug!(error = %e, "websocket upgrade failed");
            return None;
        }
    };
    let config = socket_config(&ctx.limits);
    let socket =
        WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config)).await;
    let mut connection = Box::new(Connection::new(ctx, socket, permit, token));
    let started = connection.start(initial).await;
    Some((connection, started))
}

/// A small read buffer and bounded messages: a client cannot make a connection hold more
/// than a few KiB, and the write buffer is flushed per message. 128 bytes hold a pong, or
/// a subscribe, unsubscribe or cancel message without a token (at most 104 bytes with its
/// frame header, for a 63-byte id), in one read; a longer message grows the buffer to fit
/// (tungstenite reserves a frame's whole length): a larger buffer would cost every idle
/// connection its size, and a message with a token outgrows it anyway.
fn socket_config(limits: &SubscriberLimits) -> WebSocketConfig {
    let max = limits.max_ws_message_bytes;
    WebSocketConfig::default()
        .read_buffer_size(max.min(128))
        .write_buffer_size(0)
        .max_write_buffer_size(64 * 1024)
        .max_message_size(Some(max))
        .max_frame_size(Some(max))
}
