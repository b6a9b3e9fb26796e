//! The in-memory store: the embedded default when `DATABASE_URL` is unset.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::Utc;

use super::BatchResult;
use crate::domain::{
    CancelDecision, Decision, NewTask, Outcome, ProgressUpdate, TaskId, TaskRow, TaskState,
    TaskStatus,
};
use crate::error::Error;

/// Most tasks held at once. When full, finished tasks are dropped to make room; if every
/// task is still running, creating another is refused with 503.
pub const MEMORY_STORE_CAPACITY: usize = 100_000;

/// std Mutex, not tokio: nothing awaits while it is held.
#[derive(Clone, Default)]
pub struct MemoryStore {
    tasks: Arc<Mutex<HashMap<TaskId, TaskRow>>>,
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
                let row = tasks.get_mut(id).ok_or(Error::NotFound(id.to_string()))?;
                match row.decide(update)? {
                    Decision::Stale => Ok(Outcome::Stale(row.state.clone())),
                    Decision::Apply => {
                        let mut next = row.clone();
                        next.apply(update, now);
                        *row = next;
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
        let row = tasks.get_mut(&id).ok_or(Error::NotFound(id.to_string()))?;
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
            cancel_requested_at: None,
        };
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
