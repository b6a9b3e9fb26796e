//! The grace period of a cancel request (`TASKCAST_CANCEL_GRACE_SECS`, off by default).
//!
//! A subscriber's cancel only sets `cancel_requested_at`; the generator is expected to see
//! it in the answer to its next push and push `status: cancelled` itself. When a grace is
//! set, every node runs this sweep: one conditional UPDATE that marks cancelled the
//! unfinished tasks asked more than the grace ago. The database decides which rows (rows
//! another node is sweeping are skipped), so nodes never cancel a task twice, and the
//! change reaches every node's subscribers through the trigger and NOTIFY like any write.

use std::time::Duration;

use tokio::task::JoinHandle;

use crate::hub::Hub;
use crate::shutdown::Shutdown;
use crate::store::Store;

/// What the sweep takes from the configuration.
#[derive(Clone, Copy, Debug)]
pub struct GraceOptions {
    /// How long a generator has to stop after a cancel request.
    pub grace: Duration,
}

impl GraceOptions {
    /// How often to sweep: a quarter of the grace, from 50 ms to 5 s, so a task is
    /// cancelled at most that long after its grace ends.
    pub fn interval(&self) -> Duration {
        (self.grace / 4).clamp(Duration::from_millis(50), Duration::from_secs(5))
    }
}

/// Sweeps until the shutdown; each task the sweep cancels is published to this node's hub
/// at once (other nodes hear of it through NOTIFY).
pub fn spawn(options: GraceOptions, store: Store, hub: Hub, shutdown: Shutdown) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(options.interval());
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.wait() => return,
                _ = ticks.tick() => {}
            }
            match store.cancel_overdue(options.grace).await {
                Ok(states) => {
                    for state in &states {
                        tracing::info!(
                            task = %state.task_id,
                            grace_ms = options.grace.as_millis() as u64,
                            "cancelled: the generator did not stop within the grace period"
                        );
                        hub.publish(state);
                    }
                }
                // The next tick tries again; a database that is down is reported elsewhere.
                Err(e) => tracing::debug!(error = %e.chain(), "cancel grace sweep failed"),
            }
        }
    })
}
