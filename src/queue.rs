//! Places in line: a `pending` task's subscribers see `queue_position` (1 is next) and
//! `queue_length`, and get the new place when a task ahead starts, finishes, is created
//! or deleted, on any node or in plain SQL.
//!
//! The cost stays bounded however many tasks wait. Every state the hub is offered, and
//! every notification the listener gets (inserts and deletes included), marks the queue
//! changed; the recount runs at most once per [`QueueOptions::window`] per node, and only
//! for the pending tasks with subscribers on this node: one statement numbers the pending
//! tasks and returns the places of those. A frame goes only to a task whose place
//! changed. A place rides on the state the subscriber already has: same version, marked
//! `"derived":true` (see [`crate::hub`]), so it never bumps the task's version.

use std::time::Duration;

use tokio::task::JoinHandle;

use crate::error::Error;
use crate::hub::Hub;
use crate::shutdown::Shutdown;
use crate::store::Store;
use crate::telemetry;

/// Pending tasks asked about per statement.
const CHUNK: usize = 1000;

/// How the recount is paced.
#[derive(Clone, Copy, Debug)]
pub struct QueueOptions {
    /// Changes within this window after the first are counted together.
    pub window: Duration,
}

impl Default for QueueOptions {
    fn default() -> Self {
        QueueOptions {
            window: Duration::from_millis(50),
        }
    }
}

/// What one recount did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Recount {
    /// Statements run.
    pub queries: u64,
    /// Place frames sent (one per task whose place changed, whatever its subscribers).
    pub frames: u64,
}

/// The node's queue recount. Cloning is shallow.
#[derive(Clone)]
pub struct Queue {
    pub hub: Hub,
    pub store: Store,
    pub options: QueueOptions,
}

impl Queue {
    /// Recounts after changes until `shutdown`.
    pub fn spawn(self, shutdown: Shutdown) -> JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.wait() => return,
                    _ = self.hub.queue_change() => {}
                }
                tokio::select! {
                    _ = shutdown.wait() => return,
                    _ = tokio::time::sleep(self.options.window) => {}
                }
                if let Err(e) = self.recount().await {
                    // The next change tries again; subscribers keep the place they have.
                    tracing::warn!(error = %e.chain(), "queue: counting places in line failed");
                    self.hub.queue_changed();
                }
            }
        })
    }

    /// Sends each locally subscribed pending task its place, when it changed.
    pub async fn recount(&self) -> Result<Recount, Error> {
        let tasks = self.hub.pending_tasks();
        let mut done = Recount::default();
        for chunk in tasks.chunks(CHUNK) {
            let places = self.store.queue_places(chunk).await?;
            done.queries += 1;
            for (task, place) in places {
                if self.hub.set_place(task, place) {
                    done.frames += 1;
                }
            }
        }
        metrics::counter!(telemetry::QUEUE_QUERIES).increment(done.queries);
        metrics::counter!(telemetry::QUEUE_FRAMES).increment(done.frames);
        Ok(done)
    }
}
