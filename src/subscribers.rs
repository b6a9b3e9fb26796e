//! What every subscriber does, whatever its transport (WebSocket, SSE, a plain read):
//! who may watch, the connection slots, and subscribe-then-snapshot.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::auth::subscribe::{Access, SubscribeAuth, now_unix};
use crate::domain::{Outcome, TaskId};
use crate::error::Error;
use crate::hub::{Hub, Subscription};
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

/// A task being watched: registered with the hub, its snapshot read.
pub struct Watch {
    /// Newer versions than the snapshot's.
    pub subscription: Subscription,
    /// The snapshot message (`"snapshot": true`), and its version.
    pub snapshot: String,
    pub version: i64,
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

    /// Subscribe, then snapshot: registers with the hub first, then reads the current
    /// state (the hub's, else the store's, which is then published), so nothing committed
    /// after this call can be missed and only newer versions follow the snapshot.
    pub async fn watch(&self, task: TaskId, access: &Access) -> Result<Watch, Error> {
        let (mut subscription, current) = self.hub.subscribe(task);
        let (version, snapshot) = match current {
            Some(frame) => (frame.version(), frame.snapshot_json()),
            None => {
                let state = self
                    .store
                    .get(task)
                    .await?
                    .ok_or_else(|| Error::NotFound(task.to_string()))?;
                // Published (with its time left), and the snapshot carries the same estimate.
                (state.version, self.hub.publish_snapshot(&state))
            }
        };
        subscription.mark_delivered(version);
        let expires_at = access
            .expires_at()
            .map(|exp| Instant::now() + Duration::from_secs(exp.saturating_sub(now_unix())));
        Ok(Watch {
            subscription,
            snapshot,
            version,
            expires_at,
        })
    }

    /// Decides whether `token` lets its holder watch `task`, checking a Supabase user's
    /// ownership against the store. A task that does not exist is refused exactly like a task
    /// owned by someone else, so a refusal never tells whether the task exists.
    pub async fn may_watch(&self, token: Option<&str>, task: TaskId) -> Result<Access, Error> {
        let access = self.auth.authorize(token, task).await?;
        if let Access::Owner { user_id, .. } = access
            && !self
                .store
                .owner(task)
                .await?
                .flatten()
                .is_some_and(|owner| owner.eq_ignore_ascii_case(&user_id.to_string()))
        {
            return Err(Error::Forbidden(format!(
                "this Supabase user may not watch task {task}"
            )));
        }
        Ok(access)
    }

    /// A cancel request, whatever its transport (HTTP, WebSocket): who may cancel (see
    /// [`SubscribeAuth::authorize_cancel`]; a session must own the task), then the store's
    /// one conditional write, then the new state to this node's subscribers (other nodes
    /// get it through NOTIFY). Anyone not allowed gets the same 403 whether or not the
    /// task exists.
    pub async fn cancel(&self, token: Option<&str>, task: TaskId) -> Result<Outcome, Error> {
        let access = self.auth.authorize_cancel(token, task).await?;
        if let Access::Owner { user_id, .. } = access
            && !self
                .store
                .owner(task)
                .await?
                .flatten()
                .is_some_and(|owner| owner.eq_ignore_ascii_case(&user_id.to_string()))
        {
            return Err(Error::Forbidden(format!(
                "this Supabase user may not cancel task {task}"
            )));
        }
        let outcome = self.store.request_cancel(task).await?;
        if outcome.applied() {
            self.hub.publish(outcome.state());
        }
        Ok(outcome)
    }
}
