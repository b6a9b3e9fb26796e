//! The hub: one watch channel per task that has subscribers, holding its latest frame.
//!
//! A watch channel keeps exactly one value, so a slow subscriber skips intermediate states
//! and always gets the latest (latest-state conflation), never blocks the publisher and
//! never grows memory. A frame is encoded once and its bytes are shared by every
//! subscriber. An entry exists only while its task has subscribers.
//!
//! Every state published passes the node's one time-left estimator ([`crate::eta`]),
//! whether or not the task has subscribers here: the writer publishes every change this
//! node commits and the listener every change it reads (other nodes', plain SQL). A
//! `processing` state is delivered with the estimate (`eta_ms`, `eta_at`). The estimator is
//! timed by the change's own `updated_at`, so the same version arriving twice (writer and
//! listener, or a snapshot read) is the same observation and teaches it nothing twice.
//!
//! A `pending` task's frame may carry its place in line (see [`crate::queue`]). A new
//! place is the same state at the same version, re-sent with `"derived":true`: the one
//! frame that may follow a frame of equal version. Every state offered also marks the
//! queue changed, for the queue's conflated recount.

mod estimates;
mod feed;
mod frame;

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use dashmap::DashMap;
use futures::Stream;
use tokio::sync::Notify;
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;

use crate::domain::{Eta, QueuePlace, TaskId, TaskState, TaskStatus};
use crate::telemetry;

use estimates::Estimates;
pub use feed::{FeedSubscription, MAX_PENDING_TASKS, feed_name};
pub use frame::Frame;
use frame::{SNAPSHOT_END, shared_text, with_place};

type Slot = watch::Sender<Option<Arc<Frame>>>;

/// Cloning a `Hub` is shallow: it is an `Arc` and costs one atomic increment.
#[derive(Clone, Default)]
pub struct Hub {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    tasks: DashMap<TaskId, Slot>,
    /// User feeds with subscribers on this node, by user id.
    feeds: DashMap<uuid::Uuid, feed::Feed>,
    estimates: Estimates,
    /// Set by every state offered and by [`Hub::queue_changed`]; a stored permit, so any
    /// number of changes wake the queue's recount once.
    queue_changes: Notify,
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
        self.offer(state, None);
    }

    /// [`Hub::publish`], returning the state as a subscription's first message (with the
    /// time left, like every frame): for a snapshot read from the store.
    pub fn publish_snapshot(&self, state: &TaskState) -> String {
        self.publish_snapshot_placed(state, None)
    }

    /// [`Hub::publish_snapshot`] for a pending task whose place in line was just read.
    pub fn publish_snapshot_placed(&self, state: &TaskState, place: Option<QueuePlace>) -> String {
        let eta = self.offer(state, place);
        let place = place.filter(|_| state.status == TaskStatus::Pending);
        with_place(state.to_json_with_eta(true, eta), SNAPSHOT_END, place)
    }

    /// Feeds the estimator, publishes to the task's subscribers and its user's feed, and
    /// returns the state's time left.
    fn offer(&self, state: &TaskState, place: Option<QueuePlace>) -> Option<Eta> {
        let eta = self.offer_task(state, place);
        if let Some(user) = state.user_id {
            self.offer_feed(user, state, eta);
        }
        eta
    }

    /// Offers a state to the feed of its user: one map lookup; when the user has feed
    /// subscribers here and the version is news to them, one encode shared by all. The
    /// shard guard is held while encoding (no await): only that user's subscribe and
    /// unsubscribe, and other users in the same shard, wait for it.
    fn offer_feed(&self, user: uuid::Uuid, state: &TaskState, eta: Option<Eta>) {
        let Some(mut feed) = self.inner.feeds.get_mut(&user) else {
            return;
        };
        if !feed.is_news(state.task_id, state.version) {
            return;
        }
        let frame = Arc::new(Frame::feed(state, eta, &feed_name(user)));
        feed.deliver(state.task_id, &frame);
    }

    /// Registers a feed subscriber for `user`'s tasks. Register first, then read the store:
    /// nothing committed after this call can be missed.
    pub fn subscribe_feed(&self, user: uuid::Uuid) -> FeedSubscription {
        let inbox = Arc::new(feed::Inbox::default());
        self.inner
            .feeds
            .entry(user)
            .or_default()
            .join(inbox.clone());
        metrics::gauge!(telemetry::SUBSCRIPTIONS).increment(1.0);
        FeedSubscription::new(user, inbox, self.clone())
    }

    /// The first message for a feed's task read from the store: feeds the estimator and
    /// the task's own subscribers (as a store read for a task subscription does), and
    /// returns the state as a feed snapshot frame.
    pub fn feed_snapshot(&self, state: &TaskState, feed: &str) -> String {
        // Offered to every feed of its user too: this read may be the first this node sees
        // of the version, and the listener skips a version the hub holds, so the user's
        // other feed subscribers would never get it otherwise.
        let eta = self.offer(state, None);
        state.to_feed_json(feed, true, eta)
    }

    /// Users with feed subscribers here now (a snapshot; it may change right after).
    pub fn feed_users(&self) -> Vec<uuid::Uuid> {
        self.inner.feeds.iter().map(|entry| *entry.key()).collect()
    }

    /// Whether any feed has a subscriber here.
    pub fn has_feeds(&self) -> bool {
        !self.inner.feeds.is_empty()
    }

    fn leave_feed(&self, user: uuid::Uuid, inbox: &Arc<feed::Inbox>) {
        let empty = self
            .inner
            .feeds
            .get_mut(&user)
            .is_some_and(|mut feed| feed.leave(inbox));
        if empty {
            // Checked again under the shard lock: a subscriber arriving meanwhile keeps it.
            self.inner.feeds.remove_if(&user, |_, feed| feed.is_empty());
        }
    }

    /// Feeds the estimator, publishes to the task's own subscribers, and returns the
    /// state's time left. A pending state keeps the place the hub held (until the queue's
    /// recount says otherwise) unless `place` is given.
    fn offer_task(&self, state: &TaskState, place: Option<QueuePlace>) -> Option<Eta> {
        self.queue_changed();
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
            // The same version may have got in first without a place (the listener read
            // it): keep the place read for a snapshot, without waking anyone, so the next
            // recount does not send it again.
            if let Some(place) = place {
                slot.send_if_modified(|current| {
                    if let Some(held) = current.as_ref()
                        && held.version() == state.version
                        && held.pending
                        && !held.notice
                        && held.place.is_none()
                    {
                        *current = Some(Arc::new(Frame::new(state, eta, Some(place))));
                    }
                    false
                });
            }
            return eta;
        }
        let place = place.or_else(|| {
            (slot.borrow().as_ref())
                .filter(|f| !f.notice)
                .and_then(|f| f.place)
        });
        let frame = Arc::new(Frame::new(state, eta, place));
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
            text: shared_text(text),
            notice: true,
            pending: false,
            place: None,
            derived: false,
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

    /// Says the queue may have moved (a task created, deleted or changed anywhere).
    pub fn queue_changed(&self) {
        self.inner.queue_changes.notify_one();
    }

    /// Resolves once the queue may have moved since the last call returned.
    pub async fn queue_change(&self) {
        self.inner.queue_changes.notified().await;
    }

    /// The tasks with subscribers whose latest state is `pending`.
    pub fn pending_tasks(&self) -> Vec<TaskId> {
        (self.inner.tasks.iter())
            .filter(|entry| {
                (entry.value().borrow().as_ref()).is_some_and(|f| f.pending && !f.notice)
            })
            .map(|entry| *entry.key())
            .collect()
    }

    /// Sends `task`'s subscribers its new place in line: the state they hold, same
    /// version, marked derived. Nothing is sent when the place is unchanged or the task
    /// is no longer pending here. Returns whether a frame was sent.
    pub fn set_place(&self, task: TaskId, place: QueuePlace) -> bool {
        let Some(slot) = self.inner.tasks.get(&task).map(|e| e.value().clone()) else {
            return false;
        };
        let Some(held) = slot.borrow().clone() else {
            return false;
        };
        if held.notice || !held.pending || held.place == Some(place) {
            return false;
        }
        let frame = Arc::new(held.placed(place));
        // Only over the frame it was built from: a newer state that got in meanwhile
        // marked the queue changed, and the next recount places it.
        slot.send_if_modified(|current| match current {
            Some(now) if Arc::ptr_eq(now, &held) => {
                *current = Some(frame);
                true
            }
            _ => false,
        })
    }

    /// The tasks that have subscribers now (a snapshot; it may change right after).
    pub fn tasks(&self) -> Vec<TaskId> {
        self.inner.tasks.iter().map(|entry| *entry.key()).collect()
    }

    /// Whether `version` of `task` would be news to its subscribers: the task has
    /// subscribers and the hub holds no state that new or newer. A task without its own
    /// subscribers is wanted while any feed has one here, since only its row says whose
    /// it is.
    pub fn wants(&self, task: TaskId, version: i64) -> bool {
        match self.inner.tasks.get(&task) {
            Some(slot) => slot
                .borrow()
                .as_ref()
                .is_none_or(|frame| frame.version() < version),
            None => self.has_feeds(),
        }
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
                // A new place in line for the state the subscriber has.
                Poll::Ready(Some(Some(frame)))
                    if frame.derived && frame.version() == this.delivered =>
                {
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
            user_id: None,
            stalled_since: None,
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
            let frame = Frame::new(&state, None, None);
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

    #[tokio::test]
    async fn a_new_place_follows_at_the_same_version_and_the_snapshot_keeps_it() {
        let hub = Hub::new();
        let task = TaskId::random();
        let mut waiting = state(task, 0);
        waiting.status = TaskStatus::Pending;
        let (mut sub, _) = hub.subscribe(task);
        let first = QueuePlace {
            position: 3,
            length: 4,
        };
        let snapshot = hub.publish_snapshot_placed(&waiting, Some(first));
        sub.mark_delivered(0);
        assert!(snapshot.contains(r#""queue_position":3,"queue_length":4,"snapshot":true}"#));
        assert!(
            !hub.set_place(task, first),
            "an unchanged place sends nothing"
        );
        let moved = QueuePlace {
            position: 2,
            length: 3,
        };
        assert!(hub.set_place(task, moved));
        let frame = sub.next().await.unwrap();
        assert_eq!(frame.version(), 0);
        assert!(frame.is_derived());
        assert!(
            frame.text.as_str().ends_with(
                r#""queue_position":2,"queue_length":3,"derived":true,"snapshot":false}"#
            )
        );
        assert!(
            frame
                .snapshot_json()
                .ends_with(r#""queue_position":2,"queue_length":3,"snapshot":true}"#)
        );
        // A newer state keeps the place until the next recount; a running one has none.
        waiting.version = 1;
        hub.publish(&waiting);
        let frame = sub.next().await.unwrap();
        assert!(!frame.is_derived());
        assert!(frame.text.as_str().contains(r#""queue_position":2"#));
        let mut running = state(task, 2);
        running.status = TaskStatus::Processing;
        hub.publish(&running);
        let frame = sub.next().await.unwrap();
        assert!(!frame.text.as_str().contains("queue_position"));
        assert!(!hub.set_place(task, moved), "a running task has no place");
        assert!(hub.pending_tasks().is_empty());
    }

    #[test]
    fn publishing_without_subscribers_keeps_nothing() {
        let hub = Hub::new();
        hub.publish(&state(TaskId::random(), 1));
        assert!(hub.is_empty());
    }
}
