//! Where tasks live: Postgres when `DATABASE_URL` is set, else an in-memory map.
//!
//! Both stores decide what a push does with the same rules ([`TaskRow::decide`]), so the
//! same integration tests run against both. Only durability across restarts differs.
//!
//! [`TaskRow::decide`]: crate::domain::TaskRow::decide

mod bounded;
pub mod connect;
pub mod exposure;
mod finding;
mod memory;
mod postgres;
pub mod report;
pub mod schema;
pub mod shape;

pub use memory::MemoryStore;
pub use postgres::{NotifyOwnPushes, PgStore, PoolOptions, Quiet, Rechecks, Sweep};

use std::collections::HashMap;
use std::time::Duration;

use crate::domain::{
    IdKind, NewTask, Outcome, ProgressUpdate, QueuePlace, TaskId, TaskState, TaskStatus,
};
use crate::error::Error;

/// The result of each push in a batch, in the batch's order.
pub type BatchResult = Vec<Result<Outcome, Error>>;

/// A store handle. Cloning is shallow: both variants are reference-counted.
#[derive(Clone)]
pub enum Store {
    Postgres(PgStore),
    Memory(MemoryStore),
}

impl Store {
    /// Applies a batch of pushes. Each task appears at most once (the writer guarantees
    /// it). `since` is when its oldest push arrived: Postgres answers within
    /// `TASKCAST_DB_TIMEOUT_MS` of it. An `Err` means nothing was committed, except
    /// [`Error::CommitUnknown`]; when part of a batch committed and the rest could not be,
    /// each push has its own result.
    pub async fn apply_batch(
        &self,
        batch: &[(TaskId, ProgressUpdate)],
        since: tokio::time::Instant,
    ) -> Result<BatchResult, Error> {
        match self {
            Store::Postgres(pg) => pg.apply_batch(batch, since).await,
            Store::Memory(mem) => Ok(mem.apply_batch(batch)),
        }
    }

    /// The committed state of a task, `None` if it does not exist.
    pub async fn get(&self, task: TaskId) -> Result<Option<TaskState>, Error> {
        match self {
            Store::Postgres(pg) => pg.get(task).await,
            Store::Memory(mem) => Ok(mem.get(task)),
        }
    }

    /// Asks to cancel a task: `Applied` when this request set `cancel_requested_at`,
    /// `Stale` when it was set before; 409 when the task is finished, 404 when missing.
    pub async fn request_cancel(&self, task: TaskId) -> Result<Outcome, Error> {
        match self {
            Store::Postgres(pg) => pg.request_cancel(task).await,
            Store::Memory(mem) => mem.request_cancel(task),
        }
    }

    /// Marks cancelled the tasks whose cancel request went unanswered for `grace`.
    pub async fn cancel_overdue(
        &self,
        grace: std::time::Duration,
    ) -> Result<Vec<TaskState>, Error> {
        match self {
            Store::Postgres(pg) => pg.cancel_overdue(grace).await,
            Store::Memory(mem) => Ok(mem.cancel_overdue(grace)),
        }
    }

    /// What a valid task id looks like: the in-memory store's ids are UUIDs; Postgres
    /// follows the type of `image_tasks.id`.
    pub async fn id_kind(&self) -> Result<IdKind, Error> {
        match self {
            Store::Postgres(pg) => pg.id_kind().await,
            Store::Memory(_) => Ok(IdKind::Uuid),
        }
    }

    /// Parses a client's task id for this store's table (a 400 that says what an id looks
    /// like when it does not fit).
    pub async fn parse_id(&self, raw: &str) -> Result<TaskId, Error> {
        Ok(self.id_kind().await?.parse(raw)?)
    }

    /// A user's feed snapshot: up to `unfinished` of `user`'s unfinished tasks, then up to
    /// `finished` of its finished ones, each part newest first (by `updated_at`, then id).
    /// Rows taskcast cannot read are left out (the listener reports them per task).
    pub async fn user_tasks(
        &self,
        user: uuid::Uuid,
        unfinished: usize,
        finished: usize,
    ) -> Result<Vec<TaskState>, Error> {
        let states: Vec<TaskState> = match self {
            Store::Postgres(pg) => pg
                .user_tasks(user, unfinished, finished)
                .await?
                .into_iter()
                .filter_map(Result::ok)
                .collect(),
            Store::Memory(mem) => mem.user_tasks(user),
        };
        Ok(newest_by_part(states, unfinished, finished))
    }

    /// `None` if the task does not exist, else its owner (`image_tasks.user_id` as text).
    pub async fn owner(&self, task: TaskId) -> Result<Option<Option<String>>, Error> {
        match self {
            Store::Postgres(pg) => pg.owner(task).await,
            Store::Memory(mem) => Ok(mem.owner(task)),
        }
    }

    pub async fn create(&self, task: NewTask) -> Result<TaskState, Error> {
        match self {
            Store::Postgres(pg) => pg.create(task).await,
            Store::Memory(mem) => mem.create(task),
        }
    }

    /// Ok when the store can take pushes: the database answers and the schema is complete.
    pub async fn check_ready(&self) -> Result<(), Error> {
        match self {
            Store::Postgres(pg) => pg.check_ready().await,
            Store::Memory(_) => Ok(()),
        }
    }

    /// What makes the table open to anyone (Postgres only): said at startup, since many
    /// never run `taskcast doctor`.
    pub async fn hazards(&self) -> Vec<report::Finding> {
        match self {
            Store::Postgres(pg) => pg.hazards().await,
            Store::Memory(_) => Vec::new(),
        }
    }

    /// The places in line of those of `tasks` that are pending (see [`crate::queue`]).
    pub async fn queue_places(
        &self,
        tasks: &[TaskId],
    ) -> Result<HashMap<TaskId, QueuePlace>, Error> {
        match self {
            Store::Postgres(pg) => pg.queue_places(tasks).await,
            Store::Memory(mem) => Ok(mem.queue_places(tasks)),
        }
    }

    /// One stall sweep (see [`crate::stall`]). The states it changed come back only from
    /// the in-memory store, to publish; Postgres delivers them through NOTIFY.
    pub async fn sweep_stalled(
        &self,
        after: Duration,
        fail_after: Option<Duration>,
    ) -> Result<(Sweep, Vec<TaskState>), Error> {
        match self {
            Store::Postgres(pg) => Ok((pg.sweep_stalled(after, fail_after).await?, Vec::new())),
            Store::Memory(mem) => {
                let (changed, stalled) = mem.sweep_stalled(after, fail_after);
                let failed = changed
                    .iter()
                    .filter(|s| s.status == TaskStatus::Failed)
                    .count() as u64;
                let sweep = Sweep {
                    marked: changed.len() as u64 - failed,
                    failed,
                    stalled,
                    no_column: false,
                };
                Ok((sweep, changed))
            }
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Store::Postgres(_) => "postgres",
            Store::Memory(_) => "memory",
        }
    }
}

/// Unfinished tasks first, then finished ones, each newest first and cut to its bound.
/// SQL sorts rows into the two parts by the words it knows; this decides by the status
/// Rust reads, so a word SQL cannot place still lands where a subscriber expects it.
fn newest_by_part(
    mut states: Vec<TaskState>,
    unfinished: usize,
    finished: usize,
) -> Vec<TaskState> {
    states.sort_by(|a, b| {
        (
            a.status.is_terminal(),
            std::cmp::Reverse(a.updated_at),
            std::cmp::Reverse(a.task_id),
        )
            .cmp(&(
                b.status.is_terminal(),
                std::cmp::Reverse(b.updated_at),
                std::cmp::Reverse(b.task_id),
            ))
    });
    let open = states.iter().filter(|s| !s.status.is_terminal()).count();
    let mut done = states.split_off(open);
    states.truncate(unfinished);
    done.truncate(finished);
    states.append(&mut done);
    states
}
