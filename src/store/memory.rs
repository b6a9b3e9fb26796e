//! The in-memory store: the embedded default when `DATABASE_URL` is unset.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;

use super::BatchResult;
use crate::domain::{
    CancelDecision, Decision, NewTask, Outcome, ProgressUpdate, QueuePlace, STALL_ERROR, TaskId,
    TaskRow, TaskState, TaskStatus,
};
use crate::error::Error;

/// Most tasks held at once. When full, finished tasks are dropped to make room; if every
/// task is still running, creating another is refused with 503.
pub const MEMORY_STORE_CAPACITY: usize = 100_000;

/// std Mutex, not tokio: nothing awaits while it is held.
#[derive(Clone, Default)]
pub struct MemoryStore {
    tasks: Arc<Mutex<HashMap<TaskId, TaskRow>>>,
    /// Creation order, the order of the line (see [`MemoryStore::queue_places`]).
    created: Arc<AtomicU64>,
    order: Arc<Mutex<HashMap<TaskId, u64>>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TaskId, TaskRow>> {
        // A panic while holding the lock cannot leave a row half-written: every mutation
        // is a single assignment, so the poisoned map is still consistent.
        self.tasks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn apply_batch(&self, batch: &[(TaskId, ProgressUpdate)]) -> BatchResult {
        let mut tasks = self.lock();
        let now = Utc::now();
        batch
            .iter()
            .map(|(id, update)| {
                let row = tasks
                    .get_mut(id)
                    .ok_or_else(|| Error::NotFound(id.to_string()))?;
                match row.decide(update)? {
                    Decision::Stale => Ok(Outcome::Stale(row.state.clone())),
                    Decision::Apply => {
                        row.apply(update, now);
                        Ok(Outcome::Applied(row.state.clone()))
                    }
                }
            })
            .collect()
    }

    /// Asks to cancel `id`: the same rules as Postgres's conditional UPDATE
    /// ([`TaskRow::decide_cancel`]).
    pub fn request_cancel(&self, id: TaskId) -> Result<Outcome, Error> {
        let mut tasks = self.lock();
        let row = tasks
            .get_mut(&id)
            .ok_or_else(|| Error::NotFound(id.to_string()))?;
        match row.decide_cancel()? {
            CancelDecision::AlreadyRequested => Ok(Outcome::Stale(row.state.clone())),
            CancelDecision::Request => {
                row.request_cancel(Utc::now());
                Ok(Outcome::Applied(row.state.clone()))
            }
        }
    }

    /// Marks cancelled the unfinished tasks asked to cancel more than `grace` ago.
    pub fn cancel_overdue(&self, grace: std::time::Duration) -> Vec<TaskState> {
        let now = Utc::now();
        let cutoff = now - chrono::Duration::from_std(grace).unwrap_or(chrono::Duration::MAX);
        let mut tasks = self.lock();
        tasks
            .values_mut()
            .filter(|row| {
                !row.state.status.is_terminal()
                    && row.state.version < i64::MAX
                    && row.state.cancel_requested_at.is_some_and(|at| at < cutoff)
            })
            .map(|row| {
                row.cancel_overdue(now);
                row.state.clone()
            })
            .collect()
    }

    pub fn get(&self, id: TaskId) -> Option<TaskState> {
        self.lock().get(&id).map(|row| row.state.clone())
    }

    /// `user`'s tasks (all of them: a scan, bounded by [`MEMORY_STORE_CAPACITY`]).
    pub fn user_tasks(&self, user: uuid::Uuid) -> Vec<TaskState> {
        self.lock()
            .values()
            .filter(|row| row.state.user_id == Some(user))
            .map(|row| row.state.clone())
            .collect()
    }

    /// `None` if the task does not exist, else its owner (`user_id`).
    pub fn owner(&self, id: TaskId) -> Option<Option<String>> {
        self.lock().get(&id).map(|row| row.owner.clone())
    }

    pub fn create(&self, task: NewTask) -> Result<TaskState, Error> {
        let mut tasks = self.lock();
        if tasks.len() >= MEMORY_STORE_CAPACITY {
            tasks.retain(|_, row| !row.state.status.is_terminal());
        }
        if tasks.len() >= MEMORY_STORE_CAPACITY {
            return Err(Error::Unavailable {
                what: "the in-memory store (100000 unfinished tasks)",
                source: None,
            });
        }
        let state = TaskState {
            task_id: TaskId::random(),
            progress: None,
            stage: None,
            status: TaskStatus::Pending,
            status_raw: None,
            version: 0,
            updated_at: Some(Utc::now()),
            image_url: None,
            error: None,
            truncated: Vec::new(),
            step: None,
            total_steps: None,
            preview_url: None,
            user_id: task.user_id,
            stalled_since: None,
            cancel_requested_at: None,
        };
        let nth = self.created.fetch_add(1, Ordering::Relaxed);
        {
            // Locked after `tasks`, as everywhere.
            let mut order = self.order.lock().unwrap_or_else(|p| p.into_inner());
            order.retain(|id, _| tasks.contains_key(id));
            order.insert(state.task_id, nth);
        }
        tasks.insert(
            state.task_id,
            TaskRow {
                state: state.clone(),
                last_seq: None,
                owner: task.user_id.map(|u| u.to_string()),
            },
        );
        Ok(state)
    }
}

impl MemoryStore {
    /// The places in line of those of `tasks` that are pending, by creation order.
    pub fn queue_places(&self, tasks: &[TaskId]) -> HashMap<TaskId, QueuePlace> {
        let rows = self.lock();
        let order = self.order.lock().unwrap_or_else(|p| p.into_inner());
        let mut line: Vec<(u64, TaskId)> = (rows.values())
            .filter(|row| row.state.status == TaskStatus::Pending)
            .map(|row| {
                (
                    order.get(&row.state.task_id).copied().unwrap_or(u64::MAX),
                    row.state.task_id,
                )
            })
            .collect();
        line.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.as_str().cmp(b.1.as_str())));
        let length = line.len() as u64;
        let wanted: std::collections::HashSet<&TaskId> = tasks.iter().collect();
        (line.iter().enumerate())
            .filter(|(_, (_, id))| wanted.contains(id))
            .map(|(i, (_, id))| {
                let place = QueuePlace {
                    position: i as u64 + 1,
                    length,
                };
                (*id, place)
            })
            .collect()
    }

    /// The in-memory stall sweep (see [`crate::stall`]): marks processing tasks without a
    /// change for `after`, fails those without one for `fail_after`; returns the states
    /// changed, to publish, and how many are stalled now.
    pub fn sweep_stalled(
        &self,
        after: Duration,
        fail_after: Option<Duration>,
    ) -> (Vec<TaskState>, u64) {
        let now = Utc::now();
        let quiet_for = |state: &TaskState, d: Duration| {
            let since = state.updated_at.unwrap_or(now);
            now.signed_duration_since(since)
                .to_std()
                .is_ok_and(|quiet| quiet >= d)
        };
        let mut tasks = self.lock();
        let mut changed = Vec::new();
        let mut stalled = 0;
        for row in tasks.values_mut() {
            let state = &mut row.state;
            if state.status != TaskStatus::Processing || state.version == i64::MAX {
                continue;
            }
            if fail_after.is_some_and(|d| quiet_for(state, d)) {
                state.status = TaskStatus::Failed;
                state.status_raw = None;
                state.error = Some(STALL_ERROR.to_string());
                state.preview_url = None;
                state.stalled_since = None;
                state.version += 1;
                state.updated_at = Some(now);
                changed.push(state.clone());
            } else if state.stalled_since.is_none() && quiet_for(state, after) {
                state.stalled_since = Some(now);
                state.version += 1;
                changed.push(state.clone());
                stalled += 1;
            } else if state.stalled_since.is_some() {
                stalled += 1;
            }
        }
        (changed, stalled)
    }
}
