//! `POST /api/progress/stream`: a generator's pushes as newline-delimited JSON in one long
//! request, each line answered by one line, in the order sent, once it is committed.
//!
//! A line is a batch item (`{"task_id":...,"progress":...}`) and its answer is the batch
//! endpoint's item (`{"status":200,"state":{...}}` or `{"status":4xx,"error":...}`). The
//! request pays HTTP once, not per push: no request line, headers, routing or response head
//! per push, and the answers a commit finishes leave in one write.
//!
//! Bounds, from the existing settings: a line is at most TASKCAST_MAX_BODY_BYTES (a longer
//! one is answered 413 and skipped to its newline) and must arrive whole within
//! TASKCAST_BODY_TIMEOUT_SECS of its first byte (else 408, and the stream ends); at most
//! TASKCAST_MAX_BATCH_ITEMS lines wait for their answers (one in naive write mode, whose
//! commits would otherwise overtake each other), and the body is not read further until
//! the oldest is answered, so a client that does not read its answers stops being read.
//! The stream ends when no line arrived and no answer left for
//! TASKCAST_KEEP_ALIVE_TIMEOUT_SECS (a blank line keeps it open) and at shutdown: the lines
//! read are answered, the rest is not read, and the response ends. The connection's own
//! deadline (see [`StreamDeadline::start`]) closes it when neither side moved for twice
//! that. At most a quarter of TASKCAST_MAX_HTTP_CONNECTIONS are push streams at once
//! (more get 503), since a stream holds its connection and is never evicted.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::Stream;
use warp::Reply;
use warp::http::{HeaderValue, header};
use warp::hyper::body::{Body, Incoming};
use warp::reply::Response;

use super::{AppState, outcome_json, push};
use crate::domain::{IdKind, ProgressUpdate};
use crate::error::Error;
use crate::server::StreamDeadline;
use crate::writer::Submitted;

/// The media type of the request and of the answer.
pub(super) const NDJSON: &str = "application/x-ndjson";

/// Whether a request's Content-Type (if any) is one a push stream takes.
pub(super) fn takes_type(content_type: Option<&str>) -> bool {
    content_type.is_none_or(|ct| {
        let mime = ct.split(';').next().unwrap_or_default().trim();
        [
            "application/x-ndjson",
            "application/jsonl",
            "application/json",
        ]
        .iter()
        .any(|m| mime.eq_ignore_ascii_case(m))
    })
}

/// Starts answering a push stream whose request passed the origin and key checks.
pub(super) async fn open(
    state: Arc<AppState>,
    content_type: Option<&str>,
    body: Incoming,
    deadline: StreamDeadline,
) -> Response {
    if !takes_type(content_type) {
        return closing(Error::StreamMediaType.into_response());
    }
    if body.is_end_stream() {
        let empty = Error::invalid(
            "body",
            "a push stream needs a body: send its lines as they come, chunked \
             (Transfer-Encoding: chunked), one JSON object per line"
                .to_string(),
        );
        return closing(empty.into_response());
    }
    let Ok(slot) = state.streams.clone().try_acquire_owned() else {
        let full = Error::Unavailable {
            what: "a push stream slot (a quarter of TASKCAST_MAX_HTTP_CONNECTIONS are push \
                   streams already; push with POST meanwhile)",
            source: None,
        };
        return closing(full.into_response());
    };
    let kind = match state.subscribers.store.id_kind().await {
        Ok(kind) => kind,
        Err(e) => return closing(e.into_response()),
    };
    deadline.start();
    let bodies = state.bodies;
    let stopping = {
        let shutdown = state.subscribers.shutdown.clone();
        Box::pin(async move { shutdown.wait().await })
    };
    let lines = PushLines {
        kind,
        body: Some(body),
        rest: Bytes::new(),
        line: BytesMut::new(),
        skipping: false,
        pending: VecDeque::new(),
        // Naive mode commits concurrently: one line at a time keeps them in order.
        max_pending: match state.writer.keeps_order() {
            true => bodies.max_batch_items.max(1),
            false => 1,
        },
        max_line: bodies.max_body_bytes,
        line_within: bodies.body_timeout,
        idle_within: bodies.keep_alive_timeout,
        timer: Box::pin(tokio::time::sleep(bodies.keep_alive_timeout)),
        last_moved: tokio::time::Instant::now(),
        line_started: None,
        stopping: Some(stopping),
        deadline,
        lines: 0,
        _slot: slot,
        state,
    };
    let mut response = warp::reply::stream(lines).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(NDJSON));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // Tells nginx not to buffer the answers.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    closing(response)
}

/// A push stream's connection serves nothing after it: the body may be left unread.
fn closing(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

type Stopping = Pin<Box<dyn Future<Output = ()> + Send + Sync>>;

/// The request body read line by line, and the answers in order.
struct PushLines {
    state: Arc<AppState>,
    kind: IdKind,
    /// `None` once the body ended or the stream stopped reading it.
    body: Option<Incoming>,
    /// What is left of the last chunk read.
    rest: Bytes,
    /// The start of a line whose newline has not arrived.
    line: BytesMut,
    /// The line being read is over the limit and was answered: drop it up to its newline.
    skipping: bool,
    /// Answers not sent yet, oldest first.
    pending: VecDeque<Submitted>,
    max_pending: usize,
    max_line: usize,
    line_within: Duration,
    idle_within: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
    /// When the last line arrived or the last answer went out: the idle time counts from
    /// the later, so a slow commit does not eat the client's time for its next line.
    last_moved: tokio::time::Instant,
    /// When the first byte of the line being read arrived.
    line_started: Option<tokio::time::Instant>,
    /// Completes at shutdown; `None` once it did.
    stopping: Option<Stopping>,
    deadline: StreamDeadline,
    lines: u64,
    /// Held while the stream is open.
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl PushLines {
    /// Stops reading: what was read is answered, then the stream ends.
    fn stop_reading(&mut self) {
        self.body = None;
        self.rest = Bytes::new();
        self.line = BytesMut::new();
        self.line_started = None;
    }

    /// One whole line (its newline removed).
    fn take_line(&mut self, text: &[u8]) {
        let text = text.strip_suffix(b"\r").unwrap_or(text);
        self.last_moved = tokio::time::Instant::now();
        if text.iter().all(u8::is_ascii_whitespace) {
            // A keep-alive line: nothing to answer.
            return;
        }
        self.lines += 1;
        let submitted = match crate::domain::json_body(text)
            .and_then(|item| ProgressUpdate::from_batch_item(item, self.kind))
        {
            Ok((task, update)) => self.state.writer.submit(task, update),
            Err(e) => Submitted::done(Err(e)),
        };
        self.pending.push_back(submitted);
    }

    /// A line passed the limit: it is answered 413 now and the rest of it dropped (still
    /// within the line's time: a line is whole within TASKCAST_BODY_TIMEOUT_SECS).
    fn refuse_long_line(&mut self) {
        self.lines += 1;
        self.line = BytesMut::new();
        self.skipping = true;
        self.line_started
            .get_or_insert_with(tokio::time::Instant::now);
        let refused = Error::PayloadTooLarge {
            limit: self.max_line,
            setting: super::body::MAX_BODY,
        };
        self.pending.push_back(Submitted::done(Err(refused)));
    }

    /// Takes the lines of `rest` while answers may wait; false when it must wait first.
    fn take_lines(&mut self) -> bool {
        while !self.rest.is_empty() {
            if self.pending.len() >= self.max_pending {
                return false;
            }
            let newline = memchr(&self.rest);
            let end = newline.unwrap_or(self.rest.len());
            let part = self.rest.split_to(end);
            if newline.is_some() {
                let _ = self.rest.split_to(1);
            }
            if self.skipping {
                self.skipping = newline.is_none();
                if newline.is_some() {
                    self.line_started = None;
                    self.last_moved = tokio::time::Instant::now();
                }
                continue;
            }
            if self.line.len() + part.len() > self.max_line {
                self.refuse_long_line();
                if newline.is_some() {
                    self.skipping = false;
                    self.line_started = None;
                    self.last_moved = tokio::time::Instant::now();
                }
                continue;
            }
            match newline {
                Some(_) if self.line.is_empty() => {
                    self.line_started = None;
                    self.take_line(&part);
                }
                Some(_) => {
                    self.line.extend_from_slice(&part);
                    let line = std::mem::take(&mut self.line);
                    self.line_started = None;
                    self.take_line(&line);
                }
                None => {
                    if self.line.is_empty() && !part.is_empty() {
                        self.line_started = Some(tokio::time::Instant::now());
                    }
                    self.line.extend_from_slice(&part);
                }
            }
        }
        true
    }

    /// Reads while answers may wait and the body has data ready.
    fn read(&mut self, cx: &mut Context<'_>) {
        loop {
            if !self.take_lines() {
                return;
            }
            let Some(body) = self.body.as_mut() else {
                return;
            };
            match Pin::new(body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        self.rest = data;
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    tracing::debug!(error = %e, "a push stream's body broke off");
                    self.stop_reading();
                    return;
                }
                Poll::Ready(None) => {
                    // A last line without its newline is a line.
                    if !self.line.is_empty() && !self.skipping {
                        let line = std::mem::take(&mut self.line);
                        self.take_line(&line);
                    }
                    self.stop_reading();
                    return;
                }
                Poll::Pending => return,
            }
        }
    }

    /// When the stream gives up waiting: for the rest of a line, or for a next line.
    fn wait_until(&self) -> Option<tokio::time::Instant> {
        self.body.as_ref()?;
        match self.line_started {
            Some(started) => Some(started + self.line_within),
            None if self.pending.is_empty() => Some(self.last_moved + self.idle_within),
            None => None,
        }
    }
}

/// Where the first newline in `bytes` is.
fn memchr(bytes: &[u8]) -> Option<usize> {
    bytes.iter().position(|&b| b == b'\n')
}

impl Stream for PushLines {
    type Item = Result<Bytes, std::convert::Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if let Some(stopping) = this.stopping.as_mut()
            && stopping.as_mut().poll(cx).is_ready()
        {
            this.stopping = None;
            this.stop_reading();
        }
        this.read(cx);
        if let Some(at) = this.wait_until() {
            if this.timer.deadline() != at {
                this.timer.as_mut().reset(at);
            }
            if this.timer.as_mut().poll(cx).is_ready() {
                // A line being skipped was answered 413 already.
                if this.line_started.is_some() && !this.skipping {
                    this.lines += 1;
                    let late = Error::RequestTimeout {
                        within: this.line_within,
                    };
                    this.pending.push_back(Submitted::done(Err(late)));
                }
                this.stop_reading();
            }
        }
        let mut out = BytesMut::new();
        while let Some(front) = this.pending.front_mut() {
            let Poll::Ready(answer) = Pin::new(front).poll(cx) else {
                break;
            };
            this.pending.pop_front();
            match push::count(answer) {
                Ok(outcome) => {
                    out.extend_from_slice(br#"{"status":200,"state":"#);
                    out.extend_from_slice(outcome_json(&outcome).as_bytes());
                    out.extend_from_slice(b"}\n");
                }
                Err(e) => {
                    out.extend_from_slice(e.to_item_json().as_bytes());
                    out.extend_from_slice(b"\n");
                }
            }
        }
        if !out.is_empty() {
            this.deadline.moved();
            this.last_moved = tokio::time::Instant::now();
            return Poll::Ready(Some(Ok(out.freeze())));
        }
        if this.body.is_none() && this.pending.is_empty() {
            tracing::debug!(lines = this.lines, "a push stream ended");
            return Poll::Ready(None);
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_takes_ndjson_jsonl_json_or_no_type_and_refuses_others() {
        for ok in [
            None,
            Some("application/x-ndjson"),
            Some("application/x-ndjson; charset=utf-8"),
            Some("Application/JSONL"),
            Some("application/json"),
        ] {
            assert!(takes_type(ok), "{ok:?}");
        }
        for refused in [Some("text/plain"), Some("multipart/form-data"), Some("")] {
            assert!(!takes_type(refused), "{refused:?}");
        }
    }
}
