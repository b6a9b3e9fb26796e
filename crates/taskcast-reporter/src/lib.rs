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
//!   that already waits is merged into it (newer fields win), so a burst costs one update.
//!   When full, the oldest waiting update that is not final is dropped and counted.
//! - **Batched.** When several tasks have an update waiting, one request carries up to
//!   [`Options::max_batch`] of them (`POST /api/progress`, at most 512 KiB); a lone update
//!   goes out at once, alone (`POST /api/tasks/{id}/progress`), with no wait for company.
//!   Up to [`Options::concurrency`] requests are in flight.
//! - **A batch refused whole for its size is split, not failed.** A server set below the
//!   reporter's caps answers a whole batch 413 (over `TASKCAST_MAX_BATCH_BODY_BYTES`) or 400
//!   (more updates than `TASKCAST_MAX_BATCH_ITEMS`). Its updates were not looked at, so the
//!   reporter lowers its own cap (items or bytes) for the rest of its life, to the limit
//!   the server named or else to half of what was refused, logs once at warn which limit
//!   it met, and sends the same updates again at once in smaller requests (alone, when it
//!   comes to that). This is not counted as a retry. Only a lone update answered 413 (on
//!   its own route, over `TASKCAST_MAX_BODY_BYTES`) is refused: it is too large itself.
//! - **Ordered, idempotent.** Never two requests for one task at once (a task's newer
//!   update waits for the request carrying its older one); every update carries a `seq`
//!   taken at report time, so the server ignores a retry it already applied.
//! - **Retries, per update,** with capped exponential backoff and jitter on network errors
//!   and timeouts (a 408 included), 5xx and 429, honouring `Retry-After`; in a batch, an
//!   update whose own result is a 5xx or 429 is retried while the others are done. Other
//!   4xx (wrong key, finished task) are logged with the server's message and counted as
//!   failed, not retried; in a batch only the update refused. A retried update whose task
//!   has a newer update waiting is folded into it and counted as conflated, not retried.
//!   [`Stats`] counts updates, except `requests`. The key is never logged.
//! - **Dropping** the last clone lets queued updates go out for [`Options::drain_timeout`];
//!   a runtime that shuts down ends that early, so `flush` before returning from `main`.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde::Serialize;
use taskcast_wire::Secret;
use taskcast_wire::http::HttpClient;
use tokio::sync::Notify;

use crate::queue::{Pending, Queue};

mod queue;
mod send;

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
    /// Most updates (one per task) in one request (1 to 1000, the server's default
    /// `TASKCAST_MAX_BATCH_ITEMS`); 1 sends one request per update. Default 100. Lowered
    /// for good if the server refuses a batch as too large (see the crate docs).
    pub max_batch: usize,
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
            max_batch: 100,
            request_timeout: Duration::from_secs(5),
            max_attempts: 5,
            backoff_base: Duration::from_millis(200),
            backoff_max: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(5),
            extra_root_cas: Vec::new(),
        }
    }
}

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

    /// At least the bytes of this update's JSON as a batch item (its task id and `seq`
    /// included): every escaped character takes at most 6 bytes, the rest fits in 160.
    fn json_bound(&self) -> usize {
        let texts = [&self.stage, &self.image_url, &self.error];
        160 + 6 * texts
            .iter()
            .map(|t| t.as_ref().map_or(0, String::len))
            .sum::<usize>()
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

/// What became of the reported updates: each is counted once in `sent`, `conflated`,
/// `dropped` or `failed`, or is still queued or in flight.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Updates the server accepted (including a retry it had already applied).
    pub sent: u64,
    /// Updates sent again after a network error, timeout, 5xx or 429 (of the request or, in
    /// a batch, of the update's own result); not one folded into a newer update of its task
    /// instead (`conflated`), nor one sent again in a smaller request after its batch was
    /// refused whole for its size.
    pub retried: u64,
    /// Dropped because the queue was full, or still queued when a drop's drain ran out.
    pub dropped: u64,
    /// Refused by the server (4xx), or still failing after `max_attempts`.
    pub failed: u64,
    /// Merged into a newer update for the same task (while waiting, or instead of a retry).
    pub conflated: u64,
    /// The most tasks that ever waited at once; never above `Options::capacity`.
    pub peak_pending: usize,
    /// HTTP requests made, retries included: a batch of updates counts once.
    pub requests: u64,
}

struct Shared {
    /// std Mutex, not tokio: nothing awaits while it is held.
    queue: Mutex<Queue>,
    /// Wakes the background task: something was queued, a request ended (its tasks may
    /// have more waiting), or the last clone went away.
    wake: Notify,
    /// Wakes `flush`: an update left the in-flight set.
    settled: Notify,
    client: HttpClient,
    base: String,
    key: Secret,
    options: Options,
    /// The most updates and bytes per batch, lowered when the server refuses one as too
    /// large.
    caps: send::Caps,
}

impl Shared {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
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
            max_batch: options.max_batch.clamp(1, send::SERVER_MAX_BATCH_ITEMS),
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
            caps: send::Caps::new(options.max_batch),
            options,
        });
        tokio::spawn(send::run(shared.clone()));
        Reporter(Arc::new(Handle(shared)))
    }

    /// Queues `update` for `task` and returns at once; never fails. Callable from any
    /// thread, in or out of the runtime. An empty update is ignored.
    pub fn report(&self, task: TaskId, update: Update) {
        if update == Update::default() {
            return;
        }
        let shared = &self.0.0;
        let pending = Pending::new(update);
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
