//! The background task: takes waiting updates in batches and sends each batch as one
//! request, `concurrency` requests at a time, retrying per update.
//!
//! A batch of one goes to `POST /api/tasks/{id}/progress`, a larger one to
//! `POST /api/progress`, whose answer has one result per update: each update is then
//! delivered, refused or retried on its own. The single endpoint for one update keeps
//! the lone update (one task per worker, the common case) exactly as it was: the same
//! request, a smaller answer, and the server's status for it as the HTTP status.
//!
//! A batch the server refuses whole for its size (413 over TASKCAST_MAX_BATCH_BODY_BYTES,
//! or 400 over TASKCAST_MAX_BATCH_ITEMS) is not a refusal of its updates: the caps are
//! lowered for good ([`Caps`]) and the batch is sent again in smaller requests.

use std::collections::hash_map::RandomState;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use taskcast_wire::TaskId;
use taskcast_wire::http::{CallError, request};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::Shared;
use crate::queue::Pending;

/// The most of a single push's answer read (a state, or the server's error message).
const MAX_REPLY_BYTES: usize = 64 * 1024;

/// The most of a batch answer read, per update: a state with the longest stage, error and
/// URLs the server stores is well under this.
const MAX_REPLY_BYTES_PER_ITEM: usize = 16 * 1024;

/// The longest `Retry-After` honoured.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// Largest batch body sent: half the server's default `TASKCAST_MAX_BATCH_BODY_BYTES`
/// (1 MiB), so a server tuned down a little still takes it.
pub(crate) const MAX_BATCH_BODY_BYTES: usize = 512 * 1024;

/// The server's default `TASKCAST_MAX_BATCH_ITEMS`; `Options::max_batch` is capped to it.
pub(crate) const SERVER_MAX_BATCH_ITEMS: usize = 1000;

/// The setting named in a 400 for a batch with too many updates.
const ITEMS_SETTING: &str = "TASKCAST_MAX_BATCH_ITEMS";

/// The setting named in a 413 for a batch body over the limit.
const BYTES_SETTING: &str = "TASKCAST_MAX_BATCH_BODY_BYTES";

/// Bytes of a batch body besides its items: `{"updates":[` and `]}`, with room to spare.
const BATCH_BODY_OVERHEAD: usize = 32;

/// The most updates and bytes (of [`Update::json_bound`](crate::Update)) per batch: from
/// `Options::max_batch` and [`MAX_BATCH_BODY_BYTES`], lowered for the rest of the
/// reporter's life when the server refuses a whole batch as too large.
pub(crate) struct Caps {
    items: AtomicUsize,
    bytes: AtomicUsize,
    /// Whether the limit on items, and the one on bytes, was met (and logged) already.
    met_items: AtomicBool,
    met_bytes: AtomicBool,
}

impl Caps {
    pub(crate) fn new(max_items: usize) -> Caps {
        Caps {
            items: AtomicUsize::new(max_items),
            bytes: AtomicUsize::new(MAX_BATCH_BODY_BYTES),
            met_items: AtomicBool::new(false),
            met_bytes: AtomicBool::new(false),
        }
    }

    fn items(&self) -> usize {
        self.items.load(Ordering::Relaxed)
    }

    fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Lowers the cap the refusal was about, below what the refused batch held (`items`
    /// updates, `bytes` of bounds): to the limit the server named, else to half. Logs at
    /// warn the first time each limit is met.
    fn lower(&self, limit: Limit, items: usize, bytes: usize, why: &str) {
        let (cap, met, sent, named, setting, unit) = match limit {
            Limit::Items(named) => (
                &self.items,
                &self.met_items,
                items,
                named,
                ITEMS_SETTING,
                "updates",
            ),
            Limit::Bytes(named) => {
                let named = named.map(|n| n.saturating_sub(BATCH_BODY_OVERHEAD));
                (
                    &self.bytes,
                    &self.met_bytes,
                    bytes,
                    named,
                    BYTES_SETTING,
                    "bytes",
                )
            }
        };
        let lower = named.filter(|&n| n < sent).unwrap_or(sent / 2).max(1);
        let now = lower.min(cap.fetch_min(lower, Ordering::Relaxed));
        if !met.swap(true, Ordering::Relaxed) {
            tracing::warn!(setting, refused_updates = items, error = %why,
                "the server refused a batch of {items} updates as too large ({setting}); \
                 from now on this reporter sends at most {now} {unit} per request");
        }
    }
}

/// The server limit a whole batch went over, and the limit when its answer named it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Limit {
    /// Too many updates (`TASKCAST_MAX_BATCH_ITEMS`).
    Items(Option<usize>),
    /// A body too large (`TASKCAST_MAX_BATCH_BODY_BYTES`, or a proxy's limit).
    Bytes(Option<usize>),
}

/// One update of a request. Its task stays in flight until the item is dropped; an item
/// dropped unsettled (its request aborted at the end of a drain) is counted as dropped.
struct Item {
    shared: Arc<Shared>,
    task: TaskId,
    pending: Pending,
    /// Counted already: sent, failed, or folded into a newer update.
    settled: bool,
}

impl Drop for Item {
    fn drop(&mut self) {
        {
            let mut queue = self.shared.queue();
            queue.in_flight.remove(&self.task);
            if !self.settled {
                queue.stats.dropped += 1;
            }
        }
        self.shared.settled.notify_waiters();
        // The task may have a newer update waiting for this request to end.
        self.shared.wake.notify_one();
    }
}

/// Sends waiting updates, `concurrency` requests at a time, until the last clone is
/// dropped and the queue is drained (or the drain time is up).
pub(crate) async fn run(shared: Arc<Shared>) {
    let mut jobs = JoinSet::new();
    let mut drain_until = None;
    loop {
        while jobs.len() < shared.options.concurrency {
            let items = take_batch(&shared);
            if items.is_empty() {
                break;
            }
            let sender = shared.clone();
            jobs.spawn(async move { sender.deliver(items).await });
        }
        let (closed, idle) = {
            let queue = shared.queue();
            (queue.closed, queue.is_idle())
        };
        match (closed, idle) {
            (true, true) => return,
            (true, false) if drain_until.is_none() => {
                drain_until = Some(Instant::now() + shared.options.drain_timeout);
            }
            _ => {}
        }
        let deadline = drain_until.unwrap_or_else(Instant::now);
        tokio::select! {
            () = shared.wake.notified() => {}
            Some(_) = jobs.join_next(), if !jobs.is_empty() => {}
            () = tokio::time::sleep_until(deadline), if drain_until.is_some() => break,
        }
    }
    // Aborted requests count their unsettled items as dropped when they are dropped.
    let dropped_before = shared.queue().stats.dropped;
    jobs.shutdown().await;
    let mut queue = shared.queue();
    let waiting = queue.waiting.len() as u64;
    queue.waiting.clear();
    queue.order.clear();
    queue.stats.dropped += waiting;
    let left = queue.stats.dropped - dropped_before;
    drop(queue);
    tracing::warn!(
        left,
        "reporter dropped; updates not sent in the drain time are lost"
    );
}

fn take_batch(shared: &Arc<Shared>) -> Vec<Item> {
    let (max_items, max_bytes) = (shared.caps.items(), shared.caps.bytes());
    let taken = shared.queue().take_batch(max_items, max_bytes);
    let item = |(task, pending)| Item {
        shared: shared.clone(),
        task,
        pending,
        settled: false,
    };
    taken.into_iter().map(item).collect()
}

/// What became of one update's attempt.
enum Verdict {
    Delivered { cancel_requested: bool },
    Refused(String),
    Retry(String),
}

/// The answer to one request.
enum Answer {
    /// One verdict per update, in order, and the `Retry-After` of the answer.
    Verdicts(Vec<Verdict>, Option<Duration>),
    /// A batch refused whole for its size: none of its updates was looked at.
    TooLarge(Limit, String),
}

/// One batch item on the wire: the task and its push fields.
#[derive(Serialize)]
struct BatchItem<'a> {
    task_id: TaskId,
    #[serde(flatten)]
    pending: &'a Pending,
}

#[derive(Serialize)]
struct BatchBody<'a> {
    updates: Vec<BatchItem<'a>>,
}

impl Shared {
    /// Boxed: a batch refused whole for its size delivers its parts with this.
    fn deliver(&self, items: Vec<Item>) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(self.deliver_attempts(items))
    }

    async fn deliver_attempts(&self, mut items: Vec<Item>) {
        for attempt in 1.. {
            if attempt > 1 {
                let mut folded = Vec::new();
                {
                    let mut queue = self.queue();
                    let mut kept = Vec::with_capacity(items.len());
                    for mut item in items {
                        // A newer update for this task waits already: fold this one into it.
                        if let Some(newer) = queue.waiting.get_mut(&item.task) {
                            newer
                                .update
                                .fill_from(std::mem::take(&mut item.pending.update));
                            queue.stats.conflated += 1;
                            item.settled = true;
                            folded.push(item);
                        } else {
                            queue.stats.retried += 1;
                            kept.push(item);
                        }
                    }
                    items = kept;
                }
                // Dropped outside the lock: an item takes it to leave the in-flight set.
                drop(folded);
                if items.is_empty() {
                    return;
                }
            }
            let (verdicts, retry_after) = match self.attempt(&items).await {
                Answer::Verdicts(verdicts, retry_after) => (verdicts, retry_after),
                Answer::TooLarge(limit, why) => {
                    // Not an attempt of its updates: they go again at once, in parts
                    // within the lowered caps (their tasks stay in flight meanwhile).
                    let bytes = items.iter().map(|i| i.pending.update.json_bound()).sum();
                    self.caps.lower(limit, items.len(), bytes, &why);
                    for part in self.split(items) {
                        self.deliver(part).await;
                    }
                    return;
                }
            };
            let mut retry = Vec::new();
            let mut settled = Vec::new();
            for (mut item, verdict) in items.into_iter().zip(verdicts) {
                let why = match verdict {
                    Verdict::Delivered { cancel_requested } => {
                        let mut queue = self.queue();
                        queue.stats.sent += 1;
                        // A final update's answer still says so; the task is over, so it is
                        // not kept.
                        if cancel_requested && !item.pending.update.is_final() {
                            queue.cancel_requested.insert(item.task);
                        }
                        item.settled = true;
                        settled.push(item);
                        continue;
                    }
                    Verdict::Retry(why) if attempt < self.options.max_attempts => {
                        tracing::debug!(task = %item.task, attempt, error = %why,
                            "progress update to be retried");
                        retry.push(item);
                        continue;
                    }
                    Verdict::Retry(why) => format!("{why} (after {attempt} attempts)"),
                    Verdict::Refused(why) => why,
                };
                self.fail(&item, &why);
                item.settled = true;
                settled.push(item);
            }
            drop(settled);
            if retry.is_empty() {
                return;
            }
            items = retry;
            let pause = self.backoff(attempt).max(retry_after.unwrap_or_default());
            tokio::time::sleep(pause).await;
        }
    }

    /// `items` in consecutive parts within the caps, at least two of them.
    fn split(&self, items: Vec<Item>) -> Vec<Vec<Item>> {
        let (max_items, max_bytes) = (self.caps.items(), self.caps.bytes());
        let mut parts: Vec<Vec<Item>> = Vec::new();
        let mut bytes = 0;
        for item in items {
            let size = item.pending.update.json_bound();
            match parts.last_mut() {
                Some(part) if part.len() < max_items && bytes + size <= max_bytes => {
                    bytes += size;
                    part.push(item);
                }
                _ => {
                    bytes = size;
                    parts.push(vec![item]);
                }
            }
        }
        if parts.len() == 1 {
            let mut whole = parts.pop().expect("one part");
            let second = whole.split_off(whole.len() / 2);
            parts = vec![whole, second];
        }
        parts
    }

    fn fail(&self, item: &Item, why: &str) {
        let failed = {
            let mut queue = self.queue();
            queue.stats.failed += 1;
            queue.stats.failed
        };
        let (task, seq) = (item.task, item.pending.seq);
        // Warned at the 1st, 2nd, 4th... failure, so a wrong key does not flood the log.
        if failed.is_power_of_two() {
            tracing::warn!(%task, seq, failed_total = failed, error = %why,
                "progress update not delivered");
        } else {
            tracing::debug!(%task, seq, error = %why, "progress update not delivered");
        }
    }

    /// Sends `items` in one request: one verdict per item, in order, and the answer's
    /// `Retry-After` when it had one; or, for a batch, that it was refused for its size.
    async fn attempt(&self, items: &[Item]) -> Answer {
        let (url, body, max_reply) = match items {
            [one] => (
                format!("{}/api/tasks/{}/progress", self.base, one.task),
                serde_json::to_vec(&one.pending),
                MAX_REPLY_BYTES,
            ),
            _ => {
                let updates = items.iter().map(|item| BatchItem {
                    task_id: item.task,
                    pending: &item.pending,
                });
                let body = BatchBody {
                    updates: updates.collect(),
                };
                let max_reply = MAX_REPLY_BYTES + items.len() * MAX_REPLY_BYTES_PER_ITEM;
                let url = format!("{}/api/progress", self.base);
                (url, serde_json::to_vec(&body), max_reply)
            }
        };
        let body = body.expect("an update serializes to JSON");
        let all = |verdict: fn(String) -> Verdict, why: String| -> Vec<Verdict> {
            items.iter().map(|_| verdict(why.clone())).collect()
        };
        self.queue().stats.requests += 1;
        let bearer = format!("Bearer {}", self.key.expose());
        let headers = [
            (hyper::header::AUTHORIZATION, bearer.as_str()),
            (hyper::header::CONTENT_TYPE, "application/json"),
        ];
        let sent = match request(hyper::Method::POST, &url, &headers, body.into()) {
            Ok(request) => {
                let timeout = self.options.request_timeout;
                self.client.call(request, timeout, max_reply).await
            }
            Err(e) => Err(e),
        };
        let reply = match sent {
            Ok(reply) => reply,
            // A bad URL (or key), or a certificate we do not trust, would fail the same way
            // again.
            Err(e @ (CallError::Invalid(_) | CallError::Untrusted(_))) => {
                return Answer::Verdicts(all(Verdict::Refused, e.to_string()), None);
            }
            Err(e) => return Answer::Verdicts(all(Verdict::Retry, e.to_string()), None),
        };
        let status = reply.status;
        if status.is_success() {
            let verdicts = match items {
                [_] => vec![delivered(&reply.body)],
                _ => batch_verdicts(&reply.body, items.len()),
            };
            return Answer::Verdicts(verdicts, None);
        }
        let retry_after = (reply.headers.get(hyper::header::RETRY_AFTER))
            .and_then(|v| v.to_str().ok()?.trim().parse().ok())
            .map(|secs| Duration::from_secs(secs).min(MAX_RETRY_AFTER));
        let message = server_message(&String::from_utf8_lossy(&reply.body));
        let why = format!("{status}: {message}");
        if let (Some(limit), [_, _, ..]) = (too_large(status, &reply.body), items) {
            return Answer::TooLarge(limit, why);
        }
        // 408: the body did not arrive in time, as with a network error.
        let retried = status.is_server_error()
            || status == hyper::StatusCode::TOO_MANY_REQUESTS
            || status == hyper::StatusCode::REQUEST_TIMEOUT;
        if retried {
            Answer::Verdicts(all(Verdict::Retry, why), retry_after)
        } else {
            Answer::Verdicts(all(Verdict::Refused, why), None)
        }
    }

    /// Exponential and capped, with jitter: a random point in the upper half of the step.
    fn backoff(&self, attempt: u32) -> Duration {
        let step = (self.options.backoff_base)
            .saturating_mul(1 << (attempt - 1).min(20))
            .min(self.options.backoff_max);
        let mut hasher = RandomState::new().build_hasher();
        hasher.write_u32(attempt);
        let fraction = (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64;
        step / 2 + (step / 2).mul_f64(fraction)
    }
}

/// A 2xx single push: delivered, and whether its state says `cancel_requested: true` (a
/// cheap byte search first: most answers do not).
fn delivered(state: &[u8]) -> Verdict {
    let cancel_requested = state.windows(18).any(|w| w == b"\"cancel_requested\"")
        && serde_json::from_slice::<Value>(state)
            .is_ok_and(|v| v["cancel_requested"] == Value::Bool(true));
    Verdict::Delivered { cancel_requested }
}

/// The verdicts in a batch answer, `{"results":[{"status":200,"state":{...}}, {"status":409,
/// "error":...,"message":...,"hint":...}, ...]}`: a 5xx or 429 item is retried, another
/// non-200 item refused. An answer that cannot be read leaves every outcome unknown, so
/// every item is retried (its `seq` makes a repeat harmless).
fn batch_verdicts(body: &[u8], items: usize) -> Vec<Verdict> {
    let answer = serde_json::from_slice::<Value>(body).ok();
    let results = answer.as_ref().and_then(|v| v["results"].as_array());
    let Some(results) = results.filter(|r| r.len() == items) else {
        let why = format!("the batch answer has no {items} results");
        return (0..items).map(|_| Verdict::Retry(why.clone())).collect();
    };
    let verdict = |result: &Value| {
        let status = result["status"].as_u64().unwrap_or(0);
        if status == 200 {
            let cancel_requested = result["state"]["cancel_requested"] == Value::Bool(true);
            return Verdict::Delivered { cancel_requested };
        }
        let why = format!("{status}: {}", server_message(&result.to_string()));
        match status {
            429 | 500.. => Verdict::Retry(why),
            _ => Verdict::Refused(why),
        }
    };
    results.iter().map(verdict).collect()
}

/// Whether a whole batch was refused for its size, from the answer's status and body: a
/// 413 (the server's names TASKCAST_MAX_BATCH_BODY_BYTES and its limit, "the body is larger
/// than the limit of N bytes (...)"; a proxy's may name nothing), or a 400 `invalid_input`
/// naming TASKCAST_MAX_BATCH_ITEMS ("send from 1 to N updates per request (...), got M").
/// Any other 400 is about the request's shape, which smaller requests would not change.
fn too_large(status: hyper::StatusCode, body: &[u8]) -> Option<Limit> {
    let json = serde_json::from_slice::<Value>(body).ok();
    let field = |name: &str| json.as_ref().and_then(|v| v[name].as_str()).unwrap_or("");
    let message = field("message");
    if status == hyper::StatusCode::PAYLOAD_TOO_LARGE {
        return Some(Limit::Bytes(number_after(message, "limit of ")));
    }
    let items = status == hyper::StatusCode::BAD_REQUEST
        && field("error") == "invalid_input"
        && message.contains(ITEMS_SETTING);
    items.then(|| Limit::Items(number_after(message, " to ")))
}

/// The number right after the first `marker` in `text`.
fn number_after(text: &str, marker: &str) -> Option<usize> {
    let rest = &text[text.find(marker)? + marker.len()..];
    let digits = rest.split(|c: char| !c.is_ascii_digit()).next()?;
    digits.parse().ok()
}

/// `message (hint)` from an error body of ours, or the start of any other body.
fn server_message(body: &str) -> String {
    let json = serde_json::from_str::<Value>(body).ok();
    let parts = json
        .as_ref()
        .map(|v| (v["message"].as_str(), v["hint"].as_str()));
    match parts {
        Some((Some(message), Some(hint))) => format!("{message} ({hint})"),
        _ => body.chars().take(200).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_answer_is_read_per_item() {
        let body = br#"{"results":[
            {"status":200,"state":{"cancel_requested":true}},
            {"status":200,"state":{"progress":5}},
            {"status":409,"error":"task_finished","message":"finished","hint":"stop"},
            {"status":503,"error":"unavailable","message":"down","hint":"retry"},
            {"status":429,"error":"busy","message":"busy","hint":"later"}
        ]}"#;
        let verdicts = batch_verdicts(body, 5);
        assert!(matches!(
            verdicts[0],
            Verdict::Delivered {
                cancel_requested: true
            }
        ));
        assert!(matches!(
            verdicts[1],
            Verdict::Delivered {
                cancel_requested: false
            }
        ));
        assert!(matches!(&verdicts[2], Verdict::Refused(why) if why == "409: finished (stop)"));
        assert!(matches!(&verdicts[3], Verdict::Retry(why) if why.starts_with("503")));
        assert!(matches!(&verdicts[4], Verdict::Retry(_)));
    }

    #[test]
    fn a_batch_refused_for_its_size_is_told_from_other_refusals() {
        use hyper::StatusCode;
        // The bodies the server sends (src/routes/push.rs, src/routes/body.rs).
        let items = br#"{"error":"invalid_input","message":"send from 1 to 2 updates per request (TASKCAST_MAX_BATCH_ITEMS), got 10","hint":"fix the named field and send the request again"}"#;
        let bytes = br#"{"error":"payload_too_large","message":"the body is larger than the limit of 1500 bytes (TASKCAST_MAX_BATCH_BODY_BYTES)","hint":"send a smaller body, or raise the setting the message names"}"#;
        let shape = br#"{"error":"invalid_input","message":"the body must be {\"updates\":[...]} or an array of updates","hint":"send a JSON object"}"#;
        assert_eq!(
            too_large(StatusCode::BAD_REQUEST, items),
            Some(Limit::Items(Some(2)))
        );
        assert_eq!(
            too_large(StatusCode::PAYLOAD_TOO_LARGE, bytes),
            Some(Limit::Bytes(Some(1500)))
        );
        assert_eq!(
            too_large(StatusCode::PAYLOAD_TOO_LARGE, b"<html>413</html>"),
            Some(Limit::Bytes(None)),
            "a proxy's 413 names no limit"
        );
        assert_eq!(too_large(StatusCode::BAD_REQUEST, shape), None);
        assert_eq!(too_large(StatusCode::UNAUTHORIZED, items), None);
    }

    #[test]
    fn a_batch_answer_without_one_result_per_item_retries_them_all() {
        for body in [&br#"{"results":[{"status":200}]}"#[..], b"<html>", b"{}"] {
            let verdicts = batch_verdicts(body, 2);
            assert_eq!(verdicts.len(), 2);
            assert!(verdicts.iter().all(|v| matches!(v, Verdict::Retry(_))));
        }
    }
}
