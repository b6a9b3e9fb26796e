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
pub use postgres::{PgStore, PoolOptions};

use crate::domain::{IdKind, NewTask, Outcome, ProgressUpdate, TaskId, TaskState};
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
        self.id_kind().await?.parse(raw)
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

    pub fn kind(&self) -> &'static str {
        match self {
            Store::Postgres(_) => "postgres",
            Store::Memory(_) => "memory",
        }
    }
}
