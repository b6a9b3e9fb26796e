//! The hub: one watch channel per task that has subscribers, holding its latest frame.
//!
//! A watch channel keeps exactly one value, so a slow subscriber skips intermediate states
//! and always gets the latest (latest-state conflation), never blocks the publisher and
//! never grows memory. A frame is encoded once and its bytes are shared by every
//! subscriber. An entry exists only while its task has subscribers.
//!
//! Every state published passes the node's one time-left [`Estimator`], whether or not
//! the task has subscribers here: the writer publishes every change this node commits and
//! the listener every change it reads (other nodes', plain SQL). A `processing` state is
//! delivered with the estimate (`eta_ms`, `eta_at`). The estimator is timed by the
//! change's own `updated_at`, so the same version arriving twice (writer and listener, or
//! a snapshot read) is the same observation and teaches it nothing twice.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use dashmap::DashMap;
use futures::Stream;
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::domain::{Eta, TaskId, TaskState, TaskStatus};
use crate::eta::{Estimator, EtaOptions, Observation, Phase};
use crate::telemetry;

/// A committed state's wire encoding, built once per change. Only the bytes and the
/// version are kept: a hub entry lives as long as its task has subscribers, so its size is
/// part of what every idle connection costs.
#[derive(Debug)]
pub struct Frame {
    version: i64,
    /// The `{"type":"state",...,"snapshot":false}` message every subscriber is sent, or,
    /// for a notice, the `{"type":"error",...}` message.
    pub text: Utf8Bytes,
    /// An error about the task (its row cannot be read), not a state: delivered to the
    /// subscribers present once, never as a snapshot, and replaced by the next state.
    notice: bool,
}

/// How every frame's text ends: `snapshot` is the last field written when neither
/// `applied` nor `token` is set.
const LIVE_END: &str = r#""snapshot":false}"#;

impl Frame {
    fn new(state: &TaskState, eta: Option<Eta>) -> Self {
        let text = state.to_json_with_eta(false, eta);
        debug_assert!(text.ends_with(LIVE_END));
        Frame {
            version: state.version,
            text: Utf8Bytes::from(text),
            notice: false,
        }
    }

    pub fn is_notice(&self) -> bool {
        self.notice
    }

    pub fn version(&self) -> i64 {
        self.version
    }

    /// The same state as a subscription's first message, `"snapshot":true`.
    pub fn snapshot_json(&self) -> String {
        let text = self.text.as_str();
        let body = text
            .strip_suffix(LIVE_END)
            .expect("Frame::new encodes the snapshot flag last");
        format!(r#"{body}"snapshot":true}}"#)
    }
}

type Slot = watch::Sender<Option<Arc<Frame>>>;

/// Cloning a `Hub` is shallow: it is an `Arc` and costs one atomic increment.
#[derive(Clone, Default)]
pub struct Hub {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    tasks: DashMap<TaskId, Slot>,
    estimates: Estimates,
}

/// The node's time-left estimator. std Mutex, not tokio: nothing awaits while it is held.
struct Estimates(Mutex<Estimator<TaskId>>);

impl Default for Estimates {
    fn default() -> Self {
        Estimates(Mutex::new(Estimator::new(EtaOptions::default())))
    }
}

impl Estimates {
    /// Feeds one state to the estimator; the time left when the task is running and there
    /// is anything to go on.
    fn observe(&self, state: &TaskState) -> Option<Eta> {
        let at = state.updated_at.unwrap_or_else(chrono::Utc::now);
        let phase = match state.status {
            TaskStatus::Pending => Phase::Pending,
            TaskStatus::Processing => Phase::Running,
            TaskStatus::Completed => Phase::Finished { succeeded: true },
            TaskStatus::Failed | TaskStatus::Cancelled => Phase::Finished { succeeded: false },
        };
        let fraction = state.progress.map(|p| p / 100.0).or_else(|| {
            let (step, total) = (state.step?, state.total_steps?);
            (total > 0).then(|| f64::from(step) / f64::from(total))
        });
        let observation = Observation {
            at_ms: u64::try_from(at.timestamp_millis()).unwrap_or(0),
            phase,
            fraction,
            total_steps: state.total_steps,
        };
        let ms = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .observe(state.task_id, observation)?;
        Some(Eta { ms, at })
    }
}

impl Hub {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers interest in `task`. Returns the subscription and the latest frame the hub
    /// holds, if any. Register first, then read the store: nothing committed after this
    /// call can be missed.
    pub fn subscribe(&self, task: TaskId) -> (Subscription, Option<Arc<Frame>>) {
        let rx = self
            .inner
            .tasks
            .entry(task)
            .or_insert_with(|| watch::channel(None).0)
            .subscribe();
        // A notice is no state: the caller reads the store instead.
        let current = rx.borrow().clone().filter(|f| !f.notice);
        let delivered = current.as_ref().map_or(i64::MIN, |f| f.version());
        let subscription = Subscription {
            task,
            stream: Some(WatchStream::from_changes(rx)),
            delivered,
            hub: self.clone(),
        };
        metrics::gauge!(telemetry::SUBSCRIPTIONS).increment(1.0);
        (subscription, current)
    }

    /// Offers a committed state to the task's subscribers. Ignored when nobody subscribes
    /// or when the hub already holds this version or a newer one, so duplicates from two
    /// paths collapse into one and nothing ever goes backwards.
    pub fn publish(&self, state: &TaskState) {
        self.offer(state);
    }

    /// [`Hub::publish`], returning the state as a subscription's first message (with the
    /// time left, like every frame): for a snapshot read from the store.
    pub fn publish_snapshot(&self, state: &TaskState) -> String {
        let eta = self.offer(state);
        state.to_json_with_eta(true, eta)
    }

    /// Feeds the estimator, publishes, and returns the state's time left.
    fn offer(&self, state: &TaskState) -> Option<Eta> {
        let eta = self.inner.estimates.observe(state);
        // Clone the sender out so no shard lock is held while encoding.
        let Some(slot) = self
            .inner
            .tasks
            .get(&state.task_id)
            .map(|e| e.value().clone())
        else {
            return eta;
        };
        if slot
            .borrow()
            .as_ref()
            .is_some_and(|f| f.version() >= state.version)
        {
            return eta;
        }
        let frame = Arc::new(Frame::new(state, eta));
        slot.send_if_modified(|current| {
            if current
                .as_ref()
                .is_some_and(|f| f.version() >= frame.version())
            {
                return false;
            }
            *current = Some(frame);
            true
        });
        eta
    }

    /// The version the hub holds for `task` (`i64::MIN` when none); read it before a store
    /// read whose outcome may become a [`Hub::publish_notice`].
    pub fn held_version(&self, task: TaskId) -> i64 {
        self.inner.tasks.get(&task).map_or(i64::MIN, |slot| {
            slot.borrow().as_ref().map_or(i64::MIN, |f| f.version())
        })
    }

    /// Tells the task's current subscribers about a problem with the task (`text` is an
    /// error message), without a state: it carries the version the hub holds, so any newer
    /// state replaces it and nothing older gets in. It is dropped if the hub no longer
    /// holds version `seen` (what it held when the read began): a state published since is
    /// newer news than the notice, and a subscriber must not miss it.
    pub fn publish_notice(&self, task: TaskId, text: String, seen: i64) {
        let Some(slot) = self.inner.tasks.get(&task).map(|e| e.value().clone()) else {
            return;
        };
        let notice = Arc::new(Frame {
            version: seen,
            text: Utf8Bytes::from(text),
            notice: true,
        });
        slot.send_if_modified(|current| {
            let held = current.as_ref().map_or(i64::MIN, |f| f.version());
            if held != seen {
                return false;
            }
            *current = Some(notice);
            true
        });
    }

    /// The tasks that have subscribers now (a snapshot; it may change right after).
    pub fn tasks(&self) -> Vec<TaskId> {
        self.inner.tasks.iter().map(|entry| *entry.key()).collect()
    }

    /// Whether `version` of `task` would be news to its subscribers: the task has
    /// subscribers and the hub holds no state that new or newer.
    pub fn wants(&self, task: TaskId, version: i64) -> bool {
        self.inner.tasks.get(&task).is_some_and(|slot| {
            slot.borrow()
                .as_ref()
                .is_none_or(|frame| frame.version() < version)
        })
    }

    /// Tasks that currently have at least one subscriber.
    pub fn len(&self) -> usize {
        self.inner.tasks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.inner.tasks.is_empty()
    }

    fn release(&self, task: &TaskId) {
        // Checked and removed under the same shard lock: a subscriber arriving meanwhile
        // either keeps the entry alive or creates a fresh one.
        self.inner
            .tasks
            .remove_if(task, |_, slot| slot.receiver_count() == 0);
    }
}

/// A stream of the task's frames with versions newer than the last one delivered.
/// Dropping it unsubscribes, and removes the hub entry if it was the last subscriber.
pub struct Subscription {
    task: TaskId,
    stream: Option<WatchStream<Option<Arc<Frame>>>>,
    delivered: i64,
    hub: Hub,
}

impl Subscription {
    pub fn task(&self) -> TaskId {
        self.task
    }

    /// Records that the client has `version` (the snapshot), so only newer ones follow.
    pub fn mark_delivered(&mut self, version: i64) {
        self.delivered = self.delivered.max(version);
    }
}

impl Stream for Subscription {
    type Item = Arc<Frame>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let Some(stream) = this.stream.as_mut() else {
            return Poll::Ready(None);
        };
        loop {
            match Pin::new(&mut *stream).poll_next(cx) {
                Poll::Ready(Some(Some(frame))) if frame.notice => {
                    return Poll::Ready(Some(frame));
                }
                Poll::Ready(Some(Some(frame))) if frame.version() > this.delivered => {
                    // Versions between the last delivered one and this one were skipped.
                    if this.delivered != i64::MIN {
                        let skipped = frame.version() - this.delivered - 1;
                        if skipped > 0 {
                            metrics::counter!(telemetry::CONFLATED).increment(skipped as u64);
                        }
                    }
                    this.delivered = frame.version();
                    return Poll::Ready(Some(frame));
                }
                Poll::Ready(Some(_)) => continue,
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        // Drop the receiver first so the count the hub checks no longer includes it.
        drop(self.stream.take());
        self.hub.release(&self.task);
        metrics::gauge!(telemetry::SUBSCRIPTIONS).decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::TaskStatus;
    use futures::StreamExt;

    fn state(task: TaskId, version: i64) -> TaskState {
        TaskState {
            task_id: task,
            progress: Some(version as f64),
            stage: None,
            status: TaskStatus::Processing,
            status_raw: None,
            version,
            updated_at: Some(chrono::Utc::now()),
            image_url: None,
            error: None,
            truncated: Vec::new(),
            step: None,
            total_steps: None,
            preview_url: None,
            cancel_requested_at: None,
        }
    }

    #[tokio::test]
    async fn older_versions_are_never_delivered_after_newer_ones() {
        let hub = Hub::new();
        let task = TaskId::random();
        let (mut sub, _) = hub.subscribe(task);
        hub.publish(&state(task, 2));
        hub.publish(&state(task, 1));
        assert_eq!(sub.next().await.unwrap().version(), 2);
        hub.publish(&state(task, 2));
        hub.publish(&state(task, 3));
        assert_eq!(sub.next().await.unwrap().version(), 3);
    }

    #[tokio::test]
    async fn a_slow_subscriber_gets_only_the_latest_state() {
        let hub = Hub::new();
        let task = TaskId::random();
        let (mut sub, _) = hub.subscribe(task);
        for v in 1..=100 {
            hub.publish(&state(task, v));
        }
        assert_eq!(sub.next().await.unwrap().version(), 100);
    }

    #[test]
    fn entry_is_removed_when_the_last_subscriber_leaves() {
        let hub = Hub::new();
        let task = TaskId::random();
        let (a, _) = hub.subscribe(task);
        let (b, _) = hub.subscribe(task);
        drop(a);
        assert_eq!(hub.len(), 1);
        drop(b);
        assert!(hub.is_empty());
    }

    #[test]
    fn a_frame_snapshot_is_the_state_encoded_as_a_snapshot() {
        let mut full = state(TaskId::random(), 7);
        full.stage = Some("upscaling \"4x\" }".to_string());
        full.image_url = Some("https://example.com/a.png".to_string());
        full.error = Some("snapshot\":false}".to_string());
        for state in [state(TaskId::random(), 1), full] {
            let frame = Frame::new(&state, None);
            assert_eq!(frame.text.as_str(), state.to_json(false, None));
            assert_eq!(frame.snapshot_json(), state.to_json(true, None));
        }
    }

    #[tokio::test]
    async fn a_notice_reaches_present_subscribers_once_and_a_newer_state_follows() {
        let hub = Hub::new();
        let task = TaskId::random();
        let (mut sub, _) = hub.subscribe(task);
        hub.publish(&state(task, 4));
        assert_eq!(sub.next().await.unwrap().version(), 4);
        // A notice about a read that began before a newer state arrived is dropped.
        hub.publish_notice(task, r#"{"type":"error"}"#.to_string(), 3);
        hub.publish_notice(
            task,
            r#"{"type":"error"}"#.to_string(),
            hub.held_version(task),
        );
        let notice = sub.next().await.unwrap();
        assert!(notice.is_notice());
        // Not a snapshot for a later subscriber, and no older state gets in after it.
        let (_, current) = hub.subscribe(task);
        assert!(current.is_none());
        hub.publish(&state(task, 3));
        hub.publish(&state(task, 5));
        assert_eq!(sub.next().await.unwrap().version(), 5);
    }

    #[test]
    fn publishing_without_subscribers_keeps_nothing() {
        let hub = Hub::new();
        hub.publish(&state(TaskId::random(), 1));
        assert!(hub.is_empty());
    }
}
