//! What every subscriber does, whatever its transport (WebSocket, SSE, a plain read):
//! who may watch, the connection slots, and subscribe-then-snapshot, for a task and for
//! a user's feed (`user:<uuid>`: every task whose `user_id` is that user).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use uuid::Uuid;

use crate::auth::subscribe::{Access, SubscribeAuth, now_unix};
use crate::domain::{Outcome, TaskId, TaskStatus};
use crate::error::Error;
use crate::hub::{FeedSubscription, Frame, Hub, Subscription, feed_name};
use crate::shutdown::{DoneGuard, Shutdown};
use crate::store::Store;

/// The bounds on subscribers (WebSocket and SSE alike), from the configuration.
#[derive(Clone, Debug)]
pub struct SubscriberLimits {
    /// Open WebSockets and SSE streams (`TASKCAST_MAX_CONNECTIONS`).
    pub max_connections: usize,
    /// Tasks one WebSocket may watch at once.
    pub max_subscriptions: usize,
    /// Subscribe messages per connection per second.
    pub max_subscribes_per_sec: u32,
    /// Largest client WebSocket message.
    pub max_ws_message_bytes: usize,
    /// A WebSocket without any subscription is closed after this.
    pub idle_timeout: Duration,
    pub ping_interval: Duration,
    /// Silence after which a WebSocket is closed.
    pub pong_timeout: Duration,
    /// Finished tasks in a feed's snapshot (`TASKCAST_FEED_RECENT`), besides up to
    /// [`FEED_MAX_UNFINISHED`] unfinished ones.
    pub feed_recent: usize,
}

/// Most unfinished tasks in a feed's snapshot (the most recently updated ones); with
/// `TASKCAST_FEED_RECENT` (at most [`FEED_MAX_RECENT`]) it bounds a snapshot's size.
pub const FEED_MAX_UNFINISHED: usize = 200;
/// The largest `TASKCAST_FEED_RECENT`.
pub const FEED_MAX_RECENT: usize = 200;

/// The prefix that makes a subscription id name a user's feed rather than a task.
const FEED_PREFIX: &str = "user:";

/// What a subscriber watches: one task, or the feed of a user's tasks.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Target {
    Task(TaskId),
    User(Uuid),
}

impl Target {
    /// The id as the client sends it: the task id, or `user:<uuid>`.
    pub fn label(&self) -> String {
        match self {
            Target::Task(task) => task.to_string(),
            Target::User(user) => feed_name(*user),
        }
    }
}

/// A subscription's stream of newer frames: a task's, or a feed's (per task newer).
pub enum Watching {
    Task(Subscription),
    Feed(FeedSubscription),
}

impl Stream for Watching {
    type Item = Arc<Frame>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.get_mut() {
            Watching::Task(s) => Pin::new(s).poll_next(cx),
            Watching::Feed(s) => Pin::new(s).poll_next(cx),
        }
    }
}

/// What every subscriber needs, shared by all of them behind one `Arc`.
pub struct Subscribers {
    pub hub: Hub,
    pub store: Store,
    pub auth: SubscribeAuth,
    pub limits: SubscriberLimits,
    /// Permits for open connections (`max_connections`).
    pub connections: Arc<Semaphore>,
    /// Every connection's loop waits on it, and holds a guard of it until it has closed.
    pub shutdown: Shutdown,
}

/// An open WebSocket or SSE stream's slot: a connection permit, and the guard the
/// shutdown waits for. Dropping it frees both.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    _done: DoneGuard,
}

/// A task or feed being watched: registered with the hub, its snapshot read.
pub struct Watch {
    /// Newer versions than the snapshot's (per task, for a feed).
    pub subscription: Watching,
    /// The snapshot messages (`"snapshot": true`) with their versions: one for a task;
    /// for a feed one per task, then `{"type":"snapshot_complete",...}` (version 0).
    pub snapshot: Vec<(i64, String)>,
    /// When the token that granted it expires, if it does.
    pub expires_at: Option<Instant>,
}

impl Subscribers {
    /// A slot for one more WebSocket or SSE stream, held as long as it is open; `what`
    /// names the slot in the 503.
    pub fn admit(&self, what: &'static str) -> Result<Slot, Error> {
        let permit = self
            .connections
            .clone()
            .try_acquire_owned()
            .map_err(|_| Error::Unavailable { what, source: None })?;
        Ok(Slot {
            _permit: permit,
            _done: self.shutdown.guard(),
        })
    }

    /// Parses a subscription id: `user:<uuid>` names a user's feed (so a text-id table
    /// cannot serve a task whose id starts with `user:`), anything else a task of the
    /// store's table.
    pub async fn parse_target(&self, raw: &str) -> Result<Target, Error> {
        match raw.strip_prefix(FEED_PREFIX) {
            Some(user) => Uuid::parse_str(user).map(Target::User).map_err(|_| {
                Error::invalid(
                    "task_id",
                    format!(
                        "a user's feed is user:<uuid> (the user's id as a UUID), got {:?}",
                        raw.chars().take(80).collect::<String>()
                    ),
                )
            }),
            None => self.store.parse_id(raw).await.map(Target::Task),
        }
    }

    /// Subscribe, then snapshot: registers with the hub first, then reads the current
    /// state, so nothing committed after this call can be missed and only newer versions
    /// follow the snapshot. A task's state is the hub's, else the store's (which is then
    /// published); a feed's is the store's read of the user's tasks (unfinished ones and
    /// the latest finished), and from then on each task's versions only grow.
    pub async fn watch(&self, target: Target, access: &Access) -> Result<Watch, Error> {
        let (subscription, snapshot) = match target {
            Target::Task(task) => {
                let (subscription, snapshot) = self.snapshot_task(task).await?;
                (Watching::Task(subscription), vec![snapshot])
            }
            Target::User(user) => {
                let (subscription, snapshot) = self.snapshot_feed(user).await?;
                (Watching::Feed(subscription), snapshot)
            }
        };
        let expires_at = access
            .expires_at()
            .map(|exp| Instant::now() + Duration::from_secs(exp.saturating_sub(now_unix())));
        Ok(Watch {
            subscription,
            snapshot,
            expires_at,
        })
    }

    async fn snapshot_task(&self, task: TaskId) -> Result<(Subscription, (i64, String)), Error> {
        let (mut subscription, current) = self.hub.subscribe(task);
        let (version, snapshot) = match current {
            Some(frame) => (frame.version(), frame.snapshot_json()),
            None => {
                let state = self
                    .store
                    .get(task)
                    .await?
                    .ok_or_else(|| Error::NotFound(task.to_string()))?;
                let place = match state.status {
                    TaskStatus::Pending => self.place(task).await,
                    _ => None,
                };
                // Published (with its time left and place in line), and the snapshot
                // carries the same.
                let snapshot = self.hub.publish_snapshot_placed(&state, place);
                (state.version, snapshot)
            }
        };
        subscription.mark_delivered(version);
        Ok((subscription, (version, snapshot)))
    }

    async fn snapshot_feed(
        &self,
        user: Uuid,
    ) -> Result<(FeedSubscription, Vec<(i64, String)>), Error> {
        let mut subscription = self.hub.subscribe_feed(user);
        let name = feed_name(user);
        let states = self
            .store
            .user_tasks(user, FEED_MAX_UNFINISHED, self.limits.feed_recent)
            .await?;
        let mut snapshot = Vec::with_capacity(states.len() + 1);
        for state in &states {
            subscription.mark_delivered(state.task_id, state.version);
            snapshot.push((state.version, self.hub.feed_snapshot(state, &name)));
        }
        let complete = serde_json::json!({
            "type": "snapshot_complete",
            "feed": name,
            "tasks": states.len(),
        });
        snapshot.push((0, complete.to_string()));
        Ok((subscription, snapshot))
    }

    /// Decides whether `token` lets its holder watch `target` (see [`Self::may_watch`] and
    /// [`SubscribeAuth::authorize_user`]).
    pub async fn may_watch_target(
        &self,
        token: Option<&str>,
        target: Target,
    ) -> Result<Access, Error> {
        match target {
            Target::Task(task) => self.may_watch(token, task).await,
            Target::User(user) => self.auth.authorize_user(token, user).await,
        }
    }

    /// A pending task's place in line for its snapshot. Not knowing it does not refuse
    /// the subscription: the snapshot goes without it, and the queue's recount sends it.
    async fn place(&self, task: TaskId) -> Option<crate::domain::QueuePlace> {
        match self.store.queue_places(&[task]).await {
            Ok(places) => places.get(&task).copied(),
            Err(e) => {
                tracing::debug!(error = %e.chain(), task = %task, "reading a place in line");
                self.hub.queue_changed();
                None
            }
        }
    }

    /// Decides whether `token` lets its holder watch `task`, checking a Supabase user's
    /// ownership against the store. A task that does not exist is refused exactly like a task
    /// owned by someone else, so a refusal never tells whether the task exists.
    pub async fn may_watch(&self, token: Option<&str>, task: TaskId) -> Result<Access, Error> {
        let access = self.auth.authorize(token, task).await?;
        self.check_owner(access, task, "watch").await?;
        Ok(access)
    }

    /// A Supabase session's grant holds only for the tasks whose `user_id` is its `sub`;
    /// other grants pass. A missing task is refused like someone else's.
    async fn check_owner(&self, access: Access, task: TaskId, verb: &str) -> Result<(), Error> {
        if let Access::Owner { user_id, .. } = access
            && !self
                .store
                .owner(task)
                .await?
                .flatten()
                .is_some_and(|owner| owner.eq_ignore_ascii_case(&user_id.to_string()))
        {
            return Err(Error::Forbidden(format!(
                "this Supabase user may not {verb} task {task}"
            )));
        }
        Ok(())
    }

    /// A cancel request, whatever its transport (HTTP, WebSocket): who may cancel (see
    /// [`SubscribeAuth::authorize_cancel`]; a session must own the task), then the store's
    /// one conditional write, then the new state to this node's subscribers (other nodes
    /// get it through NOTIFY). Anyone not allowed gets the same 403 whether or not the
    /// task exists.
    pub async fn cancel(&self, token: Option<&str>, task: TaskId) -> Result<Outcome, Error> {
        let access = self.auth.authorize_cancel(token, task).await?;
        self.check_owner(access, task, "cancel").await?;
        let outcome = self.store.request_cancel(task).await?;
        if outcome.applied() {
            self.hub.publish(outcome.state());
        }
        Ok(outcome)
    }
}
