//! Stalled tasks: a `processing` task without a change for `TASKCAST_STALL_SECS` is
//! marked `stalled` (with `stalled_since`), and with `TASKCAST_STALL_FAIL_SECS` one
//! without a change for that long becomes `failed` ("the generator stopped reporting").
//!
//! Every node sweeps, and the database decides: each sweep is one conditional UPDATE
//! (see `store::postgres::derived`), so one node acts on a task and the change reaches
//! every node's subscribers through the trigger and NOTIFY like any other write. The next
//! change clears the mark. A table without the `stalled_since` column gets no marks (a
//! warning at startup, a doctor line); failing still works.

use std::time::Duration;

use tokio::task::JoinHandle;

use crate::hub::Hub;
use crate::shutdown::Shutdown;
use crate::store::Store;
use crate::telemetry;

/// When a task is stalled, and when it fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StallOptions {
    /// No change for this long: stalled (`TASKCAST_STALL_SECS`, default 60 s).
    pub after: Duration,
    /// No change for this long: failed (`TASKCAST_STALL_FAIL_SECS`, off by default).
    pub fail_after: Option<Duration>,
}

impl Default for StallOptions {
    fn default() -> Self {
        StallOptions {
            after: Duration::from_secs(60),
            fail_after: None,
        }
    }
}

impl StallOptions {
    /// How often a node sweeps: a quarter of the shortest period, from 50 ms to 5 s, so a
    /// task is marked at most a quarter period late.
    pub fn period(&self) -> Duration {
        let shortest = self.fail_after.map_or(self.after, |f| f.min(self.after));
        (shortest / 4).clamp(Duration::from_millis(50), Duration::from_secs(5))
    }
}

/// The node's stall sweep.
pub struct Stall {
    pub hub: Hub,
    pub store: Store,
    pub options: StallOptions,
}

impl Stall {
    /// Sweeps every [`StallOptions::period`] until `shutdown`. The gauge
    /// `taskcast_stalled_tasks` is the count of stalled processing tasks the last sweep
    /// saw (the whole table, not only this node's subscribers).
    pub fn spawn(self, shutdown: Shutdown) -> JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(self.options.period());
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut warned = false;
            loop {
                tokio::select! {
                    _ = shutdown.wait() => return,
                    _ = tick.tick() => {}
                }
                match self
                    .store
                    .sweep_stalled(self.options.after, self.options.fail_after)
                    .await
                {
                    Ok((sweep, changed)) => {
                        for state in &changed {
                            self.hub.publish(state);
                        }
                        metrics::gauge!(telemetry::STALLED_TASKS).set(sweep.stalled as f64);
                        if sweep.no_column && !warned {
                            warned = true;
                            tracing::warn!(
                                "stall detection is off: image_tasks has no stalled_since \
                                 column (run `taskcast migrate`); pushes are unaffected"
                            );
                        }
                    }
                    Err(e) => tracing::debug!(error = %e.chain(), "stall sweep failed"),
                }
            }
        })
    }
}
