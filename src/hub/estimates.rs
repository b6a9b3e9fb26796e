//! The node's time-left estimator as the hub feeds it: one [`Estimator`] keyed by task,
//! fed every state the hub is offered.

use std::sync::Mutex;

use crate::domain::{Eta, TaskId, TaskState, TaskStatus};
use crate::eta::{Estimator, EtaOptions, Observation, Phase};

/// The node's time-left estimator. std Mutex, not tokio: nothing awaits while it is held.
pub(super) struct Estimates(Mutex<Estimator<TaskId>>);

impl Default for Estimates {
    fn default() -> Self {
        Estimates(Mutex::new(Estimator::new(EtaOptions::default())))
    }
}

impl Estimates {
    /// Feeds one state to the estimator; the time left when the task is running and there
    /// is anything to go on.
    pub(super) fn observe(&self, state: &TaskState) -> Option<Eta> {
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
