//! Server-Sent Events: the fallback for browsers that cannot open a WebSocket.
//!
//! `GET /api/tasks/{id}/events?token=...` streams the same state messages as the socket:
//! the snapshot first, then every newer version, from the same hub subscription. Refusals
//! are plain HTTP errors before the stream starts. Each event's `id` is the version (of
//! its task). `{id}` may be `user:<uuid>`, a user's feed, as on the socket.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, stream};
use warp::Reply;
use warp::reply::Response;

use crate::error::Error;
use crate::subscribers::Subscribers;

/// How often an idle stream sends a comment, so proxies keep it open.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Authorizes, takes a slot, subscribes then snapshots ([`Subscribers::watch`]), and
/// answers with the event stream.
pub async fn events(
    ctx: Arc<Subscribers>,
    raw_id: String,
    token: Option<String>,
) -> Result<Response, Error> {
    let target = ctx.parse_target(&raw_id).await?;
    let access = ctx.may_watch_target(token.as_deref(), target).await?;
    let permit = ctx.admit("a streaming slot (TASKCAST_MAX_CONNECTIONS reached)")?;
    let watch = ctx.watch(target, &access).await?;
    let first = stream::iter(
        watch
            .snapshot
            .into_iter()
            .map(|(version, text)| event(version, text)),
    );
    let updates = watch
        .subscription
        .map(|frame| event(frame.version(), frame.text.as_str().to_owned()));
    // The stream ends at shutdown, or when the token expires: the client reconnects and
    // is asked for a fresh one (EventSource cannot receive an error status mid-stream).
    let shutdown = ctx.shutdown.clone();
    let expires_at = watch.expires_at;
    let stopped = async move {
        let expiry = async {
            match expires_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.wait() => {}
            _ = expiry => {}
        }
    };
    // The permit lives as long as the stream.
    let events = first.chain(updates).take_until(stopped).map(move |e| {
        let _ = &permit;
        e
    });
    let keep_alive = warp::sse::keep_alive().interval(KEEP_ALIVE).stream(events);
    Ok(warp::sse::reply(keep_alive).into_response())
}

fn event(version: i64, data: String) -> Result<warp::sse::Event, Infallible> {
    Ok(warp::sse::Event::default()
        .id(version.to_string())
        .data(data))
}
