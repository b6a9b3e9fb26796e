//! Reading a request body: bounded in size and in time, and JSON when a type is given.

use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures::{Stream, StreamExt};
use warp::Filter;

use crate::error::Error;

/// The settings that bound request bodies, named in a 413.
pub(super) const MAX_BODY: &str = "TASKCAST_MAX_BODY_BYTES";
pub(super) const MAX_BATCH_BODY: &str = "TASKCAST_MAX_BATCH_BODY_BYTES";

/// The request body, at most `limit` bytes (set by `setting`) whether or not
/// Content-Length is sent (chunked uploads are counted as they arrive), whole within
/// `within` (else 408), and JSON when a Content-Type is given.
pub(super) fn json_body(
    limit: usize,
    setting: &'static str,
    within: Duration,
) -> impl Filter<Extract = (Bytes,), Error = warp::Rejection> + Clone {
    warp::header::optional::<String>("content-type")
        .and(warp::header::optional::<u64>("content-length"))
        .and(warp::body::stream())
        .and_then(
            move |content_type: Option<String>, length: Option<u64>, body| async move {
                check_type_and_length(content_type.as_deref(), length, limit, setting)
                    .map_err(warp::reject::custom)?;
                tokio::time::timeout(within, read_limited(body, limit, setting))
                    .await
                    .unwrap_or(Err(Error::RequestTimeout { within }))
                    .map_err(warp::reject::custom)
            },
        )
}

/// What can be refused before reading: a Content-Type other than JSON (415), a
/// Content-Length over `limit` (413).
pub(super) fn check_type_and_length(
    content_type: Option<&str>,
    length: Option<u64>,
    limit: usize,
    setting: &'static str,
) -> Result<(), Error> {
    let is_json = content_type.is_none_or(|ct| {
        let mime = ct.split(';').next().unwrap_or_default().trim();
        mime.eq_ignore_ascii_case("application/json")
    });
    if !is_json {
        return Err(Error::UnsupportedMediaType);
    }
    if length.is_some_and(|n| n > limit as u64) {
        return Err(Error::PayloadTooLarge { limit, setting });
    }
    Ok(())
}

/// The body's bytes, refused with 413 once they pass `limit`.
pub(super) async fn read_limited<S, B, E>(
    body: S,
    limit: usize,
    setting: &'static str,
) -> Result<Bytes, Error>
where
    S: Stream<Item = Result<B, E>>,
    B: Buf,
    E: std::fmt::Display,
{
    let mut body = std::pin::pin!(body);
    let mut collected = BytesMut::new();
    while let Some(chunk) = body.next().await {
        let mut chunk = chunk
            .map_err(|e| Error::invalid("body", format!("the body could not be read: {e}")))?;
        if collected.len() + chunk.remaining() > limit {
            return Err(Error::PayloadTooLarge { limit, setting });
        }
        while chunk.has_remaining() {
            let part = chunk.chunk();
            collected.extend_from_slice(part);
            let n = part.len();
            chunk.advance(n);
        }
    }
    Ok(collected.freeze())
}
