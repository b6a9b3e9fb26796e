//! Fire-and-forget progress reporting, for generators written in Rust.
//!
//! The deployment guide's rule: a failed progress update never breaks the generation. So
//! [`Reporter::report`] is a plain function that queues and returns, a background Tokio task
//! sends, retries and gives up, and [`Reporter::stats`] counts what happened.
//!
//! ```no_run
//! use std::time::Duration;
//! use taskcast_reporter::{Options, Reporter, TaskId, TaskStatus, Update};
//!
//! # async fn generate(task: TaskId) {
//! let key = std::env::var("TASK_PROCESS_SECRET_KEY").unwrap_or_default();
//! let reporter = Reporter::new("http://127.0.0.1:8080", key, Options::default());
//! reporter.report(task, Update::new().status(TaskStatus::Processing).stage("generating"));
//! for step in 0..=100 {
//!     // ... one diffusion step ...
//!     reporter.report(task, Update::new().progress(f64::from(step)));
//! }
//! reporter.report(task, Update::completed("https://cdn.example.com/a.png"));
//! if !reporter.flush(Duration::from_secs(5)).await {
//!     tracing::warn!(stats = ?reporter.stats(), "some progress was not delivered");
//! }
//! # }
//! ```
//!
//! - **Bounded, latest wins.** At most [`Options::capacity`] tasks wait. A report for a task
//!   that already waits is merged into it (newer fields win), so a burst costs one request.
//!   When full, the oldest waiting update that is not final is dropped and counted.
//! - **Ordered, idempotent.** Never two requests for one task at once; every update carries
//!   a `seq` taken at report time, so the server ignores a retry it already applied.
//! - **Retries** with capped exponential backoff and jitter on network errors, 5xx and 429,
//!   honouring `Retry-After`. Other 4xx (wrong key, finished task) are logged with the
//!   server's message and counted as failed, not retried. The key is never logged.
//! - **Dropping** the last clone lets queued updates go out for [`Options::drain_timeout`];
//!   a runtime that shuts down ends that early, so `flush` before returning from `main`.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;

use taskcast_wire::Secret;
use taskcast_wire::http::{CallError, HttpClient, request};
// The types a report names, so a generator depends on this crate alone.
pub use taskcast_wire::http::RootCa;
pub use taskcast_wire::{IdKind, InvalidId, MAX_ERROR_CHARS, MAX_STAGE_CHARS, TaskId, TaskStatus};

/// Tuning for a [`Reporter`]; the defaults suit a generator near its taskcast.
#[derive(Clone, Debug)]
pub struct Options {
    /// Most tasks with an update waiting (at least 1). Default 1024.
    pub capacity: usize,
    /// Requests in flight at once, never two for one task (at least 1). Default 4.
    pub concurrency: usize,
    /// Per request, connecting included. Default 5 s.
    pub request_timeout: Duration,
    /// Attempts per update, the first included (at least 1). Default 5.
    pub max_attempts: u32,
    /// First retry delay, doubled per attempt up to `backoff_max`. Defaults 200 ms and 5 s.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// How long queued updates still go out after the last clone is dropped. Default 5 s.
    pub drain_timeout: Duration,
    /// Certificate authorities trusted besides the public ones (Mozilla's list), for an
    /// `https://` taskcast behind a private CA: `RootCa::from_pem(&std::fs::read(path)?)?`.
    pub extra_root_cas: Vec<RootCa>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            capacity: 1024,
            concurrency: 4,
            request_timeout: Duration::from_secs(5),
            max_attempts: 5,
            backoff_base: Duration::from_millis(200),
            backoff_max: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(5),
            extra_root_cas: Vec::new(),
        }
    }
}

/// The most of an answer's body read (for the server's error message).
const MAX_REPLY_BYTES: usize = 64 * 1024;

/// The longest `Retry-After` honoured.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// One progress update. Setters make values valid rather than refuse them: progress is
/// clamped to 0..=100, stage and error are cut to the server's limits.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Update {
    #[serde(skip_serializing_if = "Option::is_none")]
    progress: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stage: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<TaskStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    image_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

impl Update {
    pub fn new() -> Self {
        Update::default()
    }

    /// `completed` at 100 %, with the result's http(s) URL.
    pub fn completed(image_url: impl Into<String>) -> Self {
        let done = Update::new().status(TaskStatus::Completed).progress(100.0);
        done.image_url(image_url)
    }

    /// `failed`, with why (shown to the user).
    pub fn failed(error: impl Into<String>) -> Self {
        Update::new().status(TaskStatus::Failed).error(error)
    }

    /// Clamped to 0..=100; NaN is ignored.
    pub fn progress(mut self, percent: f64) -> Self {
        self.progress = (!percent.is_nan()).then(|| percent.clamp(0.0, 100.0));
        self
    }

    /// Control characters become spaces; cut to [`MAX_STAGE_CHARS`] characters.
    pub fn stage(mut self, stage: impl Into<String>) -> Self {
        let text: String = stage.into().chars().take(MAX_STAGE_CHARS).collect();
        self.stage = Some(text.replace(char::is_control, " "));
        self
    }

    pub fn status(mut self, status: TaskStatus) -> Self {
        self.status = Some(status);
        self
    }

    /// Sent as given: anything but an http(s) URL is refused by the server (and counted).
    pub fn image_url(mut self, url: impl Into<String>) -> Self {
        self.image_url = Some(url.into());
        self
    }

    /// NUL removed; cut to [`MAX_ERROR_CHARS`] characters.
    pub fn error(mut self, error: impl Into<String>) -> Self {
        let text = error.into().replace('\0', "");
        self.error = Some(text.chars().take(MAX_ERROR_CHARS).collect());
        self
    }

    fn is_final(&self) -> bool {
        self.status.is_some_and(TaskStatus::is_terminal)
    }

    /// Fills the fields this update leaves unset from an older one.
    fn fill_from(&mut self, older: Update) {
        self.progress = self.progress.or(older.progress);
        self.stage = self.stage.take().or(older.stage);
        self.status = self.status.or(older.status);
        self.image_url = self.image_url.take().or(older.image_url);
        self.error = self.error.take().or(older.error);
    }
}

/// The JSON body of one push: an update and its `seq`.
#[derive(Debug, Serialize)]
struct Pending {
    #[serde(flatten)]
    update: Update,
    seq: i64,
}

/// Process-wide, so two reporters in one process never share a `seq`; it follows the clock
/// in microseconds, so a restarted generator still sends numbers above its earlier ones.
static LAST_SEQ: AtomicI64 = AtomicI64::new(0);

fn next_seq() -> i64 {
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH);
    let now = since_epoch.map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX / 2));
    let bump = |last: i64| last.saturating_add(1).max(now);
    let last = LAST_SEQ.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| Some(bump(l)));
    bump(last.unwrap_or_else(|l| l))
}

/// What became of the reported updates: each is counted once in `sent`, `conflated`,
/// `dropped` or `failed`, or is still queued.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Requests answered 2xx (including a retry the server had already applied).
    pub sent: u64,
    /// Requests sent again after a network error, 5xx or 429.
    pub retried: u64,
    /// Dropped because the queue was full, or still queued when a drop's drain ran out.
    pub dropped: u64,
    /// Refused by the server (4xx), or still failing after `max_attempts`.
    pub failed: u64,
    /// Merged into a newer update for the same task.
    pub conflated: u64,
    /// The most tasks that ever waited at once; never above `Options::capacity`.
    pub peak_pending: usize,
}

/// All that changes, under one lock: task → latest waiting update, the order in which
/// tasks wait, the tasks with a request in flight, and the counts.
#[derive(Default)]
struct Queue {
    waiting: HashMap<TaskId, Pending>,
    order: VecDeque<TaskId>,
    in_flight: HashSet<TaskId>,
    stats: Stats,
    /// `dropped + failed` when the previous `flush` returned.
    lost_at_flush: u64,
    closed: bool,
    /// Tasks whose push answer said `cancel_requested: true`; a task leaves when a final
    /// update is reported for it, so the set stays as small as the cancels in flight.
    cancel_requested: HashSet<TaskId>,
}

impl Queue {
    /// Queues `new`, merged into what waits for its task. Returns the task whose update
    /// was dropped to stay within `capacity`.
    fn push(&mut self, task: TaskId, new: Pending, capacity: usize) -> Option<TaskId> {
        if let Some(waiting) = self.waiting.get_mut(&task) {
            let older = std::mem::replace(waiting, new);
            waiting.update.fill_from(older.update);
            self.stats.conflated += 1;
            return None;
        }
        let mut dropped = None;
        if self.waiting.len() >= capacity {
            self.stats.dropped += 1;
            // A final update (completed, failed) goes only if every waiting one is final.
            let not_final = |t: &TaskId| !self.waiting[t].update.is_final();
            let victim = match self.order.iter().position(not_final) {
                Some(i) => i,
                None if new.update.is_final() => 0,
                None => return Some(task),
            };
            let victim = self.order.remove(victim).expect("position is in range");
            self.waiting.remove(&victim);
            dropped = Some(victim);
        }
        self.waiting.insert(task, new);
        self.order.push_back(task);
        self.stats.peak_pending = self.stats.peak_pending.max(self.waiting.len());
        dropped
    }

    /// The oldest waiting update whose task has no request in flight.
    fn take_next(&mut self) -> Option<(TaskId, Pending)> {
        let index = self
            .order
            .iter()
            .position(|t| !self.in_flight.contains(t))?;
        let task = self.order.remove(index).expect("position is in range");
        self.in_flight.insert(task);
        Some((
            task,
            self.waiting.remove(&task).expect("order mirrors waiting"),
        ))
    }

    fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.in_flight.is_empty()
    }
}

struct Shared {
    /// std Mutex, not tokio: nothing awaits while it is held.
    queue: Mutex<Queue>,
    /// Wakes the background task: something was queued, or the last clone went away.
    wake: Notify,
    /// Wakes `flush`: a request finished.
    settled: Notify,
    client: HttpClient,
    base: String,
    key: Secret,
    options: Options,
}

/// The handle generators hold. Cloning is shallow: it is an `Arc`.
#[derive(Clone)]
pub struct Reporter(Arc<Handle>);

/// Dropped with the last clone: tells the background task to drain and stop.
struct Handle(Arc<Shared>);

impl Drop for Handle {
    fn drop(&mut self) {
        self.0.queue().closed = true;
        self.0.wake.notify_one();
    }
}

impl Reporter {
    /// Starts the background task that pushes to `base_url` (`http://` or `https://`,
    /// verified against the public roots and [`Options::extra_root_cas`]) with `push_key`
    /// (trimmed, as the server trims its own).
    ///
    /// # Panics
    /// Outside a Tokio runtime, like `tokio::spawn`.
    pub fn new(base_url: impl Into<String>, push_key: impl Into<String>, options: Options) -> Self {
        let options = Options {
            capacity: options.capacity.max(1),
            concurrency: options.concurrency.max(1),
            max_attempts: options.max_attempts.max(1),
            ..options
        };
        // Redirects are not followed: a push is answered by taskcast itself or not at all.
        let client = HttpClient::new(&options.extra_root_cas);
        let shared = Arc::new(Shared {
            queue: Mutex::default(),
            wake: Notify::new(),
            settled: Notify::new(),
            client,
            base: base_url.into().trim_end_matches('/').to_string(),
            key: Secret::new(push_key.into().trim()),
            options,
        });
        tokio::spawn(run(shared.clone()));
        Reporter(Arc::new(Handle(shared)))
    }

    /// Queues `update` for `task` and returns at once; never fails. Callable from any
    /// thread, in or out of the runtime. An empty update is ignored.
    pub fn report(&self, task: TaskId, update: Update) {
        if update == Update::default() {
            return;
        }
        let shared = &self.0.0;
        let pending = Pending {
            update,
            seq: next_seq(),
        };
        let (dropped, total) = {
            let mut queue = shared.queue();
            if pending.update.is_final() {
                queue.cancel_requested.remove(&task);
            }
            let dropped = queue.push(task, pending, shared.options.capacity);
            (dropped, queue.stats.dropped)
        };
        // Logged at the 1st, 2nd, 4th, 8th... drop, so an overload does not flood the log.
        if let Some(task) = dropped.filter(|_| total.is_power_of_two()) {
            tracing::warn!(%task, dropped_total = total, "progress queue full, update dropped");
        }
        shared.wake.notify_one();
    }

    /// Waits until nothing is queued or in flight, or `timeout` passes. True when the queue
    /// drained and nothing was dropped or failed since the previous `flush` (or `new`).
    pub async fn flush(&self, timeout: Duration) -> bool {
        let shared = &self.0.0;
        let drained = tokio::time::timeout(timeout, async {
            loop {
                let mut settled = std::pin::pin!(shared.settled.notified());
                settled.as_mut().enable();
                if shared.queue().is_idle() {
                    return;
                }
                settled.await;
            }
        });
        let drained = drained.await.is_ok();
        let mut queue = shared.queue();
        let lost = queue.stats.dropped + queue.stats.failed;
        drained && std::mem::replace(&mut queue.lost_at_flush, lost) == lost
    }

    /// How many tasks have an update waiting (not yet in flight): at most the capacity.
    pub fn pending(&self) -> usize {
        self.0.0.queue().waiting.len()
    }

    pub fn stats(&self) -> Stats {
        self.0.0.queue().stats
    }

    /// True once the answer to a push for `task` said `cancel_requested: true`: a subscriber
    /// asked to stop it. Check it between steps, stop, and report
    /// `Update::new().status(TaskStatus::Cancelled)`. It is learned from push answers only,
    /// so a task reported every second learns it within about a second.
    pub fn is_cancel_requested(&self, task: TaskId) -> bool {
        self.0.0.queue().cancel_requested.contains(&task)
    }
}

/// Marks a task's request as finished however its future ends (done, panicked, aborted).
struct InFlight(Arc<Shared>, TaskId);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.queue().in_flight.remove(&self.1);
        self.0.settled.notify_waiters();
    }
}

/// The background task: sends waiting updates, `concurrency` at a time, until the last
/// clone is dropped and the queue is drained (or the drain time is up).
async fn run(shared: Arc<Shared>) {
    let mut jobs = JoinSet::new();
    let mut drain_until = None;
    loop {
        while jobs.len() < shared.options.concurrency {
            let Some((task, pending)) = shared.queue().take_next() else {
                break;
            };
            let job = InFlight(shared.clone(), task);
            jobs.spawn(async move { job.0.deliver(task, pending).await });
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
    jobs.abort_all();
    let mut queue = shared.queue();
    let left = queue.waiting.len() + jobs.len();
    queue.waiting.clear();
    queue.order.clear();
    queue.stats.dropped += left as u64;
    tracing::warn!(
        left,
        "reporter dropped; updates not sent in the drain time are lost"
    );
}

enum Verdict {
    Delivered,
    Refused(String),
    Retry(String, Option<Duration>),
}

impl Shared {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn deliver(&self, task: TaskId, pending: Pending) {
        let url = format!("{}/api/tasks/{task}/progress", self.base);
        let seq = pending.seq;
        for attempt in 1.. {
            if attempt > 1 {
                let mut queue = self.queue();
                // A newer update for this task waits already: fold this one into it.
                if let Some(newer) = queue.waiting.get_mut(&task) {
                    newer.update.fill_from(pending.update);
                    queue.stats.conflated += 1;
                    return;
                }
                queue.stats.retried += 1;
            }
            let fail = |why: String| {
                let failed = {
                    let mut queue = self.queue();
                    queue.stats.failed += 1;
                    queue.stats.failed
                };
                // Warned at the 1st, 2nd, 4th... failure, so a wrong key does not flood the log.
                if failed.is_power_of_two() {
                    tracing::warn!(%task, seq, failed_total = failed, error = %why,
                        "progress update not delivered");
                } else {
                    tracing::debug!(%task, seq, error = %why, "progress update not delivered");
                }
            };
            let retry_after = match self.attempt(task, &url, &pending).await {
                Verdict::Delivered => {
                    self.queue().stats.sent += 1;
                    return;
                }
                Verdict::Retry(why, after) if attempt < self.options.max_attempts => {
                    tracing::debug!(%task, attempt, error = %why, "progress update to be retried");
                    after.unwrap_or_default()
                }
                Verdict::Retry(why, _) => return fail(format!("{why} (after {attempt} attempts)")),
                Verdict::Refused(why) => return fail(why),
            };
            tokio::time::sleep(self.backoff(attempt).max(retry_after)).await;
        }
    }

    async fn attempt(&self, task: TaskId, url: &str, pending: &Pending) -> Verdict {
        let body = serde_json::to_vec(pending).expect("an update serializes to JSON");
        let bearer = format!("Bearer {}", self.key.expose());
        let headers = [
            (hyper::header::AUTHORIZATION, bearer.as_str()),
            (hyper::header::CONTENT_TYPE, "application/json"),
        ];
        let sent = match request(hyper::Method::POST, url, &headers, body.into()) {
            Ok(request) => {
                let timeout = self.options.request_timeout;
                self.client.call(request, timeout, MAX_REPLY_BYTES).await
            }
            Err(e) => Err(e),
        };
        let reply = match sent {
            Ok(reply) => reply,
            // A bad URL (or key), or a certificate we do not trust, would fail the same way
            // again.
            Err(e @ (CallError::Invalid(_) | CallError::Untrusted(_))) => {
                return Verdict::Refused(e.to_string());
            }
            Err(e) => return Verdict::Retry(e.to_string(), None),
        };
        let status = reply.status;
        if status.is_success() {
            // A final update's answer still says so; the task is over, so it is not kept.
            if !pending.update.is_final() && cancel_requested(&reply.body) {
                self.queue().cancel_requested.insert(task);
            }
            return Verdict::Delivered;
        }
        let retry_after = (reply.headers.get(hyper::header::RETRY_AFTER))
            .and_then(|v| v.to_str().ok()?.trim().parse().ok())
            .map(|secs| Duration::from_secs(secs).min(MAX_RETRY_AFTER));
        let message = server_message(&String::from_utf8_lossy(&reply.body));
        let why = format!("{status}: {message}");
        if status.is_server_error() || status == hyper::StatusCode::TOO_MANY_REQUESTS {
            Verdict::Retry(why, retry_after)
        } else {
            Verdict::Refused(why)
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

/// Whether a push answer carries `"cancel_requested": true` (a cheap byte search first: most
/// answers do not).
fn cancel_requested(body: &[u8]) -> bool {
    body.windows(18).any(|w| w == b"\"cancel_requested\"")
        && serde_json::from_slice::<serde_json::Value>(body)
            .is_ok_and(|v| v["cancel_requested"] == serde_json::Value::Bool(true))
}

/// `message (hint)` from an error body of ours, or the start of any other body.
fn server_message(body: &str) -> String {
    let json = serde_json::from_str::<serde_json::Value>(body).ok();
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

    fn pending(update: Update) -> Pending {
        let seq = next_seq();
        Pending { update, seq }
    }

    #[test]
    fn a_newer_update_wins_and_keeps_the_fields_it_leaves_unset() {
        let (mut queue, task) = (Queue::default(), TaskId::random());
        queue.push(task, pending(Update::new().stage("uploading")), 1);
        let first_seq = queue.waiting[&task].seq;
        queue.push(task, pending(Update::new().progress(250.0)), 1);
        let (_, merged) = queue.take_next().expect("one waiting");
        assert_eq!(
            merged.update,
            Update::new().stage("uploading").progress(100.0)
        );
        assert!(merged.seq > first_seq);
        assert_eq!(queue.stats.conflated, 1);
    }

    #[test]
    fn a_full_queue_drops_the_oldest_update_that_is_not_final() {
        let mut queue = Queue::default();
        let [a, b, c, d] = [(); 4].map(|()| TaskId::random());
        assert_eq!(
            queue.push(a, pending(Update::completed("https://x.io/a.png")), 2),
            None
        );
        assert_eq!(queue.push(b, pending(Update::new().progress(1.0)), 2), None);
        assert_eq!(
            queue.push(c, pending(Update::new().progress(2.0)), 2),
            Some(b)
        );
        assert_eq!(
            queue.push(d, pending(Update::new().progress(3.0)), 2),
            Some(c)
        );
        assert!(queue.waiting.contains_key(&a), "the final update survives");
        assert_eq!((queue.waiting.len(), queue.stats.peak_pending), (2, 2));
        assert_eq!(queue.stats.dropped, 2);
    }
}
