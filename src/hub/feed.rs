//! A user's feed in the hub: every task whose `user_id` is the user, on one subscription.
//!
//! A task subscription is one watch channel holding one frame; a feed cannot be, since
//! a slow subscriber would then skip one task's final state for another task's change.
//! Each feed subscriber has an inbox instead: at most one pending frame per task (latest
//! wins, in first-changed order), so conflation is per subscriber and task as for tasks.
//! A change is encoded once per node and the same bytes go to every inbox of its user.
//! An inbox holds at most [`MAX_PENDING_TASKS`] tasks; a subscriber that falls further
//! behind gets an error and its feed ends (the client subscribes again and gets a fresh
//! snapshot), so memory stays bounded.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use futures::Stream;
use futures::task::AtomicWaker;
use uuid::Uuid;

use super::{Frame, Hub};
use crate::domain::TaskId;
use crate::error::Error;
use crate::telemetry;

/// Most tasks with a change waiting for one feed subscriber.
pub const MAX_PENDING_TASKS: usize = 1024;

/// The name of a user's feed on the wire: `user:<uuid>`.
pub fn feed_name(user: Uuid) -> String {
    format!("user:{user}")
}

/// The feeds with subscribers on this node: their inboxes, and the latest version of each
/// task offered to them (so a change arriving twice, from the writer and the listener, is
/// encoded and queued once). The map lives as long as the feed has subscribers.
#[derive(Default)]
pub(super) struct Feed {
    inboxes: Vec<Arc<Inbox>>,
    offered: HashMap<TaskId, i64>,
}

impl Feed {
    /// Whether `version` of `task` is news to this feed; records it if so.
    pub(super) fn is_news(&mut self, task: TaskId, version: i64) -> bool {
        let held = self.offered.entry(task).or_insert(i64::MIN);
        if *held >= version {
            return false;
        }
        *held = version;
        true
    }

    pub(super) fn deliver(&self, task: TaskId, frame: &Arc<Frame>) {
        for inbox in &self.inboxes {
            inbox.offer(task, frame);
        }
    }

    pub(super) fn join(&mut self, inbox: Arc<Inbox>) {
        self.inboxes.push(inbox);
    }

    /// Removes `inbox`; whether the feed has no subscriber left.
    pub(super) fn leave(&mut self, inbox: &Arc<Inbox>) -> bool {
        self.inboxes.retain(|i| !Arc::ptr_eq(i, inbox));
        self.inboxes.is_empty()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.inboxes.is_empty()
    }
}

/// One feed subscriber's pending frames. std Mutex, not tokio: nothing awaits while it
/// is held.
#[derive(Default)]
pub(super) struct Inbox {
    pending: Mutex<Pending>,
    waker: AtomicWaker,
}

#[derive(Default)]
struct Pending {
    order: VecDeque<TaskId>,
    frames: HashMap<TaskId, Arc<Frame>>,
    overflowed: bool,
}

impl Inbox {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `frame` for `task`, replacing an older pending frame of the same task.
    fn offer(&self, task: TaskId, frame: &Arc<Frame>) {
        {
            let mut pending = self.lock();
            if pending.overflowed {
                return;
            }
            if let Some(held) = pending.frames.get_mut(&task) {
                if held.version() >= frame.version() {
                    return;
                }
                metrics::counter!(telemetry::CONFLATED).increment(1);
                *held = frame.clone();
            } else if pending.frames.len() >= MAX_PENDING_TASKS {
                pending.overflowed = true;
                pending.frames = HashMap::new();
                pending.order = VecDeque::new();
            } else {
                pending.order.push_back(task);
                pending.frames.insert(task, frame.clone());
            }
        }
        self.waker.wake();
    }

    fn next(&self) -> Next {
        let mut pending = self.lock();
        if pending.overflowed {
            return Next::Overflowed;
        }
        let Some(task) = pending.order.pop_front() else {
            return Next::Empty;
        };
        let frame = pending
            .frames
            .remove(&task)
            .expect("every queued task has its frame");
        Next::Frame(task, frame)
    }
}

enum Next {
    Frame(TaskId, Arc<Frame>),
    Empty,
    Overflowed,
}

/// A user's feed: frames of any of the user's tasks, each task's versions only growing.
/// Dropping it unsubscribes, and removes the hub's feed entry if it was the last.
pub struct FeedSubscription {
    user: Uuid,
    inbox: Arc<Inbox>,
    /// The newest version delivered per task (the snapshot's, then the stream's).
    delivered: HashMap<TaskId, i64>,
    ended: bool,
    hub: Hub,
}

impl FeedSubscription {
    pub(super) fn new(user: Uuid, inbox: Arc<Inbox>, hub: Hub) -> Self {
        FeedSubscription {
            user,
            inbox,
            delivered: HashMap::new(),
            ended: false,
            hub,
        }
    }

    pub fn user(&self) -> Uuid {
        self.user
    }

    /// Records that the client has `version` of `task` (from the snapshot), so only newer
    /// versions of that task follow.
    pub fn mark_delivered(&mut self, task: TaskId, version: i64) {
        let held = self.delivered.entry(task).or_insert(version);
        *held = (*held).max(version);
    }

    fn overflow_frame(&self) -> Arc<Frame> {
        let error = Error::RateLimited(format!(
            "this feed fell more than {MAX_PENDING_TASKS} tasks behind; subscribe again for \
             a fresh snapshot"
        ));
        Arc::new(Frame {
            version: i64::MAX,
            text: super::frame::shared_text(error.to_ws_json(Some(&feed_name(self.user)))),
            notice: true,
            pending: false,
            place: None,
            derived: false,
        })
    }
}

impl Stream for FeedSubscription {
    type Item = Arc<Frame>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        let mut registered = false;
        loop {
            match this.inbox.next() {
                Next::Frame(task, frame) => {
                    let delivered = this.delivered.entry(task).or_insert(i64::MIN);
                    if frame.version() > *delivered {
                        *delivered = frame.version();
                        return Poll::Ready(Some(frame));
                    }
                }
                Next::Overflowed => {
                    this.ended = true;
                    return Poll::Ready(Some(this.overflow_frame()));
                }
                // Register, then look once more: a frame offered in between is not missed.
                Next::Empty if !registered => {
                    this.inbox.waker.register(cx.waker());
                    registered = true;
                }
                Next::Empty => return Poll::Pending,
            }
        }
    }
}

impl Drop for FeedSubscription {
    fn drop(&mut self) {
        self.hub.leave_feed(self.user, &self.inbox);
        metrics::gauge!(telemetry::SUBSCRIPTIONS).decrement(1.0);
    }
}
