//! What every subscriber does, whatever its transport (WebSocket, SSE, a plain read).

use std::time::Duration;

use crate::auth::subscribe::{Access, SubscribeAuth};
use crate::domain::TaskId;
use crate::error::Error;
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

/// Decides whether `token` lets its holder watch `task`, checking a Supabase user's
/// ownership against the store. A task that does not exist is refused exactly like a task
/// owned by someone else, so a refusal never tells whether the task exists.
pub async fn may_watch(
    auth: &SubscribeAuth,
    store: &Store,
    token: Option<&str>,
    task: TaskId,
) -> Result<Access, Error> {
    let access = auth.authorize(token, task)?;
    if let Access::Owner { user_id, .. } = access
        && !store
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
