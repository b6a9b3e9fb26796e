//! The in-memory store: the embedded default when `DATABASE_URL` is unset.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::Utc;

use super::BatchResult;
use crate::domain::{
    Decision, NewTask, Outcome, ProgressUpdate, TaskId, TaskRow, TaskState, TaskStatus,
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
