//! Logging: tracing with `RUST_LOG`-style filters (default `info`), as text or JSON lines.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Libraries that print payloads at trace, capped at debug whatever RUST_LOG says:
/// tungstenite logs every WebSocket message and frame, and a subscribe message carries a
/// token. A later directive for the same target replaces the user's.
const PAYLOAD_LOGGERS: [&str; 2] = ["tungstenite=debug", "tokio_tungstenite=debug"];

/// How log lines are written (`--log-format`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global subscriber. Call once, before anything logs.
pub fn init(format: LogFormat) {
    let mut filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    for cap in PAYLOAD_LOGGERS {
        filter = filter.add_directive(cap.parse().expect("a valid directive"));
    }
    // Colours only on a terminal: escape codes in a log file or a log shipper are noise.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::stdout().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

// ---- Metrics -------------------------------------------------------------------------
//
// Prometheus text at GET /metrics. The recorder is process-wide (the `metrics` facade has
// one global recorder), installed the first time an App is built.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const PUSHES: &str = "taskcast_pushes_total";
pub const BATCH_SIZE: &str = "taskcast_batch_size";
pub const COMMIT_SECONDS: &str = "taskcast_commit_duration_seconds";
pub const FANOUT_SECONDS: &str = "taskcast_push_fanout_seconds";
pub const CONFLATED: &str = "taskcast_conflated_states_total";
pub const SUBSCRIPTIONS: &str = "taskcast_subscriptions_active";
pub const LISTENER_RECONNECTS: &str = "taskcast_listener_reconnects_total";
pub const LISTENER_ROWS_READ: &str = "taskcast_listener_rows_read_total";
pub const UNREADABLE_ROWS: &str = "taskcast_unreadable_rows_total";
pub const CONNECTIONS: &str = "taskcast_connections_open";
pub const HUB_TASKS: &str = "taskcast_hub_tasks";
pub const DB_TIMEOUTS: &str = "taskcast_db_timeouts_total";
pub const QUEUE_QUERIES: &str = "taskcast_queue_queries_total";
pub const QUEUE_FRAMES: &str = "taskcast_queue_frames_total";
pub const STALLED_TASKS: &str = "taskcast_stalled_tasks";
pub const NOTIFY_QUIET: &str = "taskcast_notify_quiet";

const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0];

/// The process's metrics handle, installing the recorder on first use.
pub fn metrics() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
            .and_then(|b| b.set_buckets_for_metric(Matcher::Full(BATCH_SIZE.into()), BATCH_BUCKETS))
            .expect("bucket lists are not empty")
            .build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was already installed; /metrics may be empty");
        }
        describe();
        handle
    })
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        PUSHES,
        "Pushes answered, by outcome (applied, stale, or the error code)."
    );
    describe_histogram!(BATCH_SIZE, "Pushes committed per transaction.");
    describe_histogram!(COMMIT_SECONDS, Unit::Seconds, "Time to commit one batch.");
    describe_histogram!(
        FANOUT_SECONDS,
        Unit::Seconds,
        "From a push entering the writer to its state reaching the hub."
    );
    describe_counter!(
        CONFLATED,
        "States a slow subscriber skipped (latest-state conflation)."
    );
    describe_gauge!(
        SUBSCRIPTIONS,
        "Task subscriptions open (WebSocket and SSE)."
    );
    describe_counter!(
        LISTENER_RECONNECTS,
        "Times the NOTIFY listener reconnected."
    );
    describe_counter!(
        LISTENER_ROWS_READ,
        "Rows the NOTIFY listener read back: changes made by other nodes or by plain SQL."
    );
    describe_counter!(
        UNREADABLE_ROWS,
        "Rows of image_tasks the listener could not read (no usable id or version)."
    );
    describe_gauge!(CONNECTIONS, "Open WebSocket and SSE connections.");
    describe_gauge!(HUB_TASKS, "Tasks with at least one local subscriber.");
    describe_gauge!(
        NOTIFY_QUIET,
        "1 while this node's pushes skip the NOTIFY (no other node listens on the database; TASKCAST_NOTIFY_OWN_PUSHES=auto), else 0."
    );
    describe_counter!(
        QUEUE_QUERIES,
        "Statements run to count places in line (at most one recount per window)."
    );
    describe_counter!(
        QUEUE_FRAMES,
        "Place-in-line updates sent (one per pending task whose place changed)."
    );
    describe_gauge!(
        STALLED_TASKS,
        "Processing tasks marked stalled, as this node's last stall sweep counted them."
    );
    describe_counter!(
        DB_TIMEOUTS,
        "Database calls that missed TASKCAST_DB_TIMEOUT_MS; each connection was discarded."
    );
}

/// The metrics every push touches, registered once: `metrics::counter!` and friends look
/// the metric up by name and labels on every call, which cost more than the rest of the
/// recording.
pub struct Hot {
    applied: metrics::Counter,
    stale: metrics::Counter,
    pub batch_size: metrics::Histogram,
    pub commit_seconds: metrics::Histogram,
    pub fanout_seconds: metrics::Histogram,
}

/// The handles of [`Hot`], registered (and the recorder installed) on first use.
pub fn hot() -> &'static Hot {
    static HOT: OnceLock<Hot> = OnceLock::new();
    HOT.get_or_init(|| {
        metrics();
        Hot {
            applied: metrics::counter!(PUSHES, "outcome" => "applied"),
            stale: metrics::counter!(PUSHES, "outcome" => "stale"),
            batch_size: metrics::histogram!(BATCH_SIZE),
            commit_seconds: metrics::histogram!(COMMIT_SECONDS),
            fanout_seconds: metrics::histogram!(FANOUT_SECONDS),
        }
    })
}

/// Counts a push by its outcome: `applied`, `stale`, or the error code.
pub fn count_push(outcome: &'static str) {
    match outcome {
        "applied" => hot().applied.increment(1),
        "stale" => hot().stale.increment(1),
        code => metrics::counter!(PUSHES, "outcome" => code).increment(1),
    }
}

// ---- Refusals ------------------------------------------------------------------------
//
// A refused push key or browser origin is the caller's mistake, but the person who has to
// fix it reads the server log, at the default level. So these refusals log at warn, and a
// client retrying in a loop cannot flood the log: one line per kind per window, with the
// number of refusals the window held back.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The refusals logged at warn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// 401: a push without the right key.
    PushKey,
    /// 403: a browser page whose origin is not allowed.
    Origin,
}

/// At most one warn line per kind of refusal in this window.
pub const REFUSAL_WINDOW: Duration = Duration::from_secs(10);

/// One line per [`REFUSAL_WINDOW`]. std Mutex, not tokio: nothing awaits while it is held.
#[derive(Debug, Default)]
pub struct Throttle {
    /// When the last line was let through, and how many were held back since.
    state: Mutex<Option<(Instant, u64)>>,
}

impl Throttle {
    pub const fn new() -> Self {
        Throttle {
            state: Mutex::new(None),
        }
    }

    /// `Some(held_back)` when a line may be logged at `now` (with the number of refusals
    /// held back since the previous line), else `None`, counting this one as held back.
    pub fn admit(&self, now: Instant) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match &mut *state {
            Some((last, held_back)) if now.saturating_duration_since(*last) < REFUSAL_WINDOW => {
                *held_back += 1;
                None
            }
            _ => {
                let held_back = state.map_or(0, |(_, n)| n);
                *state = Some((now, 0));
                Some(held_back)
            }
        }
    }
}

static PUSH_KEY_REFUSALS: Throttle = Throttle::new();
static ORIGIN_REFUSALS: Throttle = Throttle::new();

/// Whether a warn line for this refusal may be written now; `Some(n)`: yes, and `n`
/// refusals of this kind went unlogged since the last line.
pub fn admit_refusal(kind: Refusal) -> Option<u64> {
    let throttle = match kind {
        Refusal::PushKey => &PUSH_KEY_REFUSALS,
        Refusal::Origin => &ORIGIN_REFUSALS,
    };
    throttle.admit(Instant::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throttle_lets_one_line_through_per_window_and_counts_the_rest() {
        let throttle = Throttle::new();
        let start = Instant::now();
        assert_eq!(throttle.admit(start), Some(0));
        assert_eq!(throttle.admit(start + Duration::from_secs(1)), None);
        assert_eq!(throttle.admit(start + Duration::from_secs(9)), None);
        assert_eq!(
            throttle.admit(start + REFUSAL_WINDOW),
            Some(2),
            "the next window's line says how many were held back"
        );
        assert_eq!(throttle.admit(start + REFUSAL_WINDOW), None);
        assert_eq!(throttle.admit(start + REFUSAL_WINDOW * 3), Some(1));
    }
}
