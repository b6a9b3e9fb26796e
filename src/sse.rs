//! Server-Sent Events: the fallback for browsers that cannot open a WebSocket.
//!
//! `GET /api/tasks/{id}/events?token=...` streams the same state messages as the socket:
//! the snapshot first, then every newer version, from the same hub subscription. Refusals
//! are plain HTTP errors before the stream starts. Each event's `id` is the version.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, stream};
use warp::Reply;
use warp::reply::Response;

use crate::error::Error;
use crate::subscribers::may_watch;
use crate::ws::WsContext;

/// How often an idle stream sends a comment, so proxies keep it open.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Authorizes, subscribes, then reads the snapshot, and answers with the event stream.
pub async fn events(
    ctx: Arc<WsContext>,
    raw_id: String,
    token: Option<String>,
) -> Result<Response, Error> {
    let task = ctx.store.parse_id(&raw_id).await?;
    let access = may_watch(&ctx.subscribe, &ctx.store, token.as_deref(), task).await?;
    let permit = ctx
        .connections
        .clone()
        .try_acquire_owned()
        .map_err(|_| Error::Unavailable {
            what: "a streaming slot (TASKCAST_MAX_CONNECTIONS reached)",
            source: None,
        })?;
    let (mut subscription, current) = ctx.hub.subscribe(task);
    let (version, snapshot) = match current {
        Some(frame) => (frame.version(), frame.snapshot_json()),
        None => {
            let state = ctx
                .store
                .get(task)
                .await?
                .ok_or(Error::NotFound(task.to_string()))?;
            ctx.hub.publish(&state);
            (state.version, state.to_json(true, None))
        }
    };
    subscription.mark_delivered(version);
    let first = event(version, snapshot);
    let updates = subscription.map(|frame| event(frame.version(), frame.text.as_str().to_owned()));
    // The stream ends at shutdown, or when the token expires: the client reconnects and
    // is asked for a fresh one (EventSource cannot receive an error status mid-stream).
    let mut shutdown = ctx.shutdown.clone();
    let expires_in = access
        .expires_at()
        .map(|exp| Duration::from_secs(exp.saturating_sub(crate::auth::subscribe::now_unix())));
    let stopped = async move {
        let expiry = async {
            match expires_in {
                Some(left) => tokio::time::sleep(left).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => {}
            _ = expiry => {}
        }
    };
    // The permit lives as long as the stream.
    let events = stream::once(async move { first })
        .chain(updates)
        .take_until(stopped)
        .map(move |e| {
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
