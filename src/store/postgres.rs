//! The Postgres store: `public.image_tasks` through a deadpool pool: the pool, the reads,
//! task creation, and what a failure means for the caller; the write path is [`apply`].
//!
//! A batch is first one autocommit statement, `UPDATE ... FROM unnest(...)` whose WHERE
//! clause is the push rules (the task is open, the `seq` is new): one round trip commits
//! every push those rules allow. The pushes it left alone (a retried `seq`, a finished or
//! missing task, a row changed meanwhile) go through the locked path: lock their rows in
//! id order (`FOR UPDATE`, so two nodes never deadlock), decide each in Rust with the
//! rules every store shares, write the applied ones, commit.
//!
//! The statements come from the table's [`Shape`], read from the catalog on first use and
//! again on every readiness check, so a table changed by `migrate` or by the app is picked
//! up without a restart.

mod apply;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use deadpool_postgres::{
    Hook, HookError, Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime,
};
use tokio::time::Instant;
use tokio_postgres::Row;
use tokio_postgres::error::SqlState;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::bounded::{self, Late};
use super::connect::PgTarget;
use super::exposure;
use super::report::Finding;
use super::schema::missing_columns;
use super::shape::{self, Shape};
use crate::domain::{
    CancelDecision, IdKind, NewTask, Outcome, StatusMap, StoredRow, TaskId, TaskRow, TaskState,
    Unreadable,
};
use crate::error::Error;
use taskcast_wire::Secret;

mod derived;
mod quiet;
pub use derived::Sweep;
pub use quiet::{NotifyOwnPushes, Quiet, Rechecks};

/// What the pool takes from the configuration.
#[derive(Clone, Copy, Debug)]
pub struct PoolOptions {
    /// Connections in the pool (`TASKCAST_DB_POOL_SIZE`).
    pub size: usize,
    /// Bound on every database call, the wait for a connection included
    /// (`TASKCAST_DB_TIMEOUT_MS`).
    pub timeout: Duration,
    /// Pushes skip the NOTIFY while no other node listens
    /// (`TASKCAST_NOTIFY_OWN_PUSHES=auto`); false for `always`.
    pub quiet_when_alone: bool,
}

/// Cloning is shallow: the pool and the cached shape are reference-counted.
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
    /// The TLS connector the pool uses, for cancel requests too.
    tls: MakeRustlsConnect,
    /// Every call answers within this (`TASKCAST_DB_TIMEOUT_MS`); see [`bounded`].
    timeout: Duration,
    /// The app's status words (TASKCAST_STATUS_MAP).
    statuses: StatusMap,
    /// The table's shape, once read. std RwLock: nothing awaits while it is held.
    shape: Arc<RwLock<Option<Arc<Shape>>>>,
    /// Whether pushes may skip the NOTIFY now; the listener sets it.
    quiet: Quiet,
}

impl PgStore {
    /// Builds the pool; connects lazily, so a database that is down at startup only makes
    /// requests answer 503 until it is back.
    pub fn connect(url: &Secret, options: PoolOptions, statuses: StatusMap) -> Result<Self, Error> {
        let target = PgTarget::parse(url.expose())?;
        let mut pg = target.config;
        if pg.get_connect_timeout().is_none() {
            pg.connect_timeout(options.timeout);
        }
        if pg.get_application_name().is_none() {
            pg.application_name("taskcast");
        }
        bounded::tune_socket(&mut pg, options.timeout);
        let settings = bounded::session_settings(&pg, options.timeout);
        let manager = Manager::from_config(
            pg,
            target.tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(options.timeout))
            .create_timeout(Some(options.timeout))
            .recycle_timeout(Some(options.timeout))
            .post_create(Hook::async_fn(move |client, _| {
                let settings = settings.clone();
                Box::pin(async move {
                    client
                        .batch_execute(&settings)
                        .await
                        .map_err(HookError::Backend)
                })
            }))
            .build()
            .map_err(|e| Error::internal("building the database pool", e))?;
        Ok(PgStore {
            pool,
            tls: target.tls,
            timeout: options.timeout,
            statuses,
            shape: Arc::default(),
            quiet: Quiet::new(options.quiet_when_alone),
        })
    }

    /// Whether this node's pushes skip the NOTIFY (for the listener, which decides).
    pub fn quiet(&self) -> &Quiet {
        &self.quiet
    }

    /// The table's shape: cached, or read from the catalog now.
    async fn shape(&self, client: &Object) -> Result<Arc<Shape>, DbError> {
        match self.cached_shape() {
            Some(shape) => Ok(shape),
            None => self.reload_shape(client).await,
        }
    }

    fn cached_shape(&self) -> Option<Arc<Shape>> {
        self.shape
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    async fn reload_shape(&self, client: &Object) -> Result<Arc<Shape>, DbError> {
        let columns = shape::columns(&***client).await?;
        let fresh = Arc::new(Shape::new(&columns, &self.statuses)?);
        *self
            .shape
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(fresh.clone());
        Ok(fresh)
    }

    fn forget_shape(&self) {
        *self
            .shape
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = None;
    }

    /// What a valid task id looks like for this table. Read from the cache without a
    /// connection: every push and subscribe asks.
    pub async fn id_kind(&self) -> Result<IdKind, Error> {
        if let Some(shape) = self.cached_shape() {
            return Ok(shape.id);
        }
        self.run(async |client: &mut Object| Ok(self.shape(client).await?.id))
            .await
    }

    /// Runs `op` on a pooled connection within the timeout from now (see
    /// [`bounded::run`]), turning its failure into what the caller should do (see
    /// [`PgStore::classify`]).
    async fn run<T>(
        &self,
        op: impl AsyncFnOnce(&mut Object) -> Result<T, DbError>,
    ) -> Result<T, Error> {
        match bounded::run(&self.pool, &self.tls, Instant::now() + self.timeout, op).await {
            Ok(value) => Ok(value),
            Err(e) => Err(self.classify(e).await),
        }
    }

    /// The committed state of a task, `None` if it does not exist; a row without a usable
    /// version is [`Error::UnreadableRow`] (422), for this task only.
    pub async fn get(&self, task: TaskId) -> Result<Option<TaskState>, Error> {
        self.run(async |client: &mut Object| {
            let shape = self.shape(client).await?;
            let stmt = client.prepare_cached(&shape.sql.get).await?;
            let row = client.query_opt(&stmt, &[&task.as_str()]).await?;
            let Some(row) = row else {
                return Ok(None);
            };
            Ok(Some(decode(&row, &shape.statuses)?.state))
        })
        .await
    }

    /// The committed states of `tasks` that exist, in no particular order; a row that
    /// cannot be read is reported on its own and never fails the others.
    pub async fn get_many(
        &self,
        tasks: &[TaskId],
    ) -> Result<Vec<Result<TaskState, Unreadable>>, Error> {
        self.run(async |client: &mut Object| {
            let shape = self.shape(client).await?;
            let stmt = client.prepare_cached(&shape.sql.get_many).await?;
            let ids: Vec<&str> = tasks.iter().map(TaskId::as_str).collect();
            let rows = client.query(&stmt, &[&ids]).await?;
            Ok(rows
                .iter()
                .map(|row| stored_row(row).decode(&shape.statuses).map(|t| t.state))
                .collect())
        })
        .await
    }

    /// Up to `unfinished` of `user`'s open tasks and `finished` of the others, each newest
    /// first (see [`super::Shape`]'s `feed` statement); unreadable rows are left out.
    pub async fn user_tasks(
        &self,
        user: uuid::Uuid,
        unfinished: usize,
        finished: usize,
    ) -> Result<Vec<Result<TaskState, Unreadable>>, Error> {
        self.run(async |client: &mut Object| {
            let shape = self.shape(client).await?;
            let stmt = client.prepare_cached(&shape.sql.feed).await?;
            let user = user.to_string();
            let (a, b) = (unfinished as i64, finished as i64);
            let rows = client
                .query(&stmt, &[&user, &shape.words.open(), &a, &b])
                .await?;
            Ok(rows
                .iter()
                .map(|row| stored_row(row).decode(&shape.statuses).map(|t| t.state))
                .collect())
        })
        .await
    }

    /// Asks to cancel `task` with one conditional UPDATE: the database sets
    /// `cancel_requested_at` only on an unfinished task not asked before, so two nodes
    /// asking at once bump the version once. Applied: set now; stale: asked before.
    pub async fn request_cancel(&self, task: TaskId) -> Result<Outcome, Error> {
        let outcome = self
            .run(async |client: &mut Object| {
                let mut shape = self.shape(client).await?;
                if shape.check_cancel().is_err() {
                    // Maybe added since (`taskcast migrate`): read the table again first.
                    shape = self.reload_shape(client).await?;
                    shape.check_cancel()?;
                }
                let sql = shape.sql.cancel.as_deref().expect("checked above");
                let stmt = client.prepare_cached(sql).await?;
                let finished = shape.words.finished();
                let Some(row) = client
                    .query_opt(&stmt, &[&task.as_str(), &finished])
                    .await?
                else {
                    return Ok(None);
                };
                // The statement's last column, after the read columns.
                let applied: bool = row.try_get(row.len() - 1)?;
                Ok(Some((decode(&row, &shape.statuses)?, applied)))
            })
            .await?;
        let Some((row, applied)) = outcome else {
            return Err(Error::NotFound(task.to_string()));
        };
        if applied {
            return Ok(Outcome::Applied(row.state));
        }
        match row.decide_cancel()? {
            CancelDecision::AlreadyRequested => Ok(Outcome::Stale(row.state)),
            // Another node's request committed after this statement's snapshot: read it.
            CancelDecision::Request => match self.get(task).await? {
                Some(state) if state.cancel_requested_at.is_some() => Ok(Outcome::Stale(state)),
                // The database calls the status finished where Rust does not (a word
                // lowercased differently by its locale): refuse as finished.
                _ => Err(Error::CancelFinished {
                    task: task.to_string(),
                    status: row.state.status.as_str(),
                }),
            },
        }
    }

    /// Marks cancelled the unfinished tasks whose cancel request is older than `grace`
    /// (at most 500 per call; rows another node is sweeping are skipped), returning their
    /// new states. Nothing when the table lacks the column or the status column has no
    /// word for cancelled.
    pub async fn cancel_overdue(&self, grace: Duration) -> Result<Vec<TaskState>, Error> {
        self.run(async |client: &mut Object| {
            let shape = self.shape(client).await?;
            let (Some(sql), Some(word)) = (
                shape.sql.cancel_overdue.as_deref(),
                shape.words.word(crate::domain::TaskStatus::Cancelled),
            ) else {
                return Ok(Vec::new());
            };
            let stmt = client.prepare_cached(sql).await?;
            let finished = shape.words.finished();
            let rows = client
                .query(&stmt, &[&grace.as_secs_f64(), &finished, &word])
                .await?;
            Ok(rows
                .iter()
                .filter_map(|row| decode(row, &shape.statuses).ok().map(|t| t.state))
                .collect())
        })
        .await
    }

    /// `None` if the task does not exist, else its owner (`user_id` as text).
    pub async fn owner(&self, task: TaskId) -> Result<Option<Option<String>>, Error> {
        self.run(async |client: &mut Object| {
            let shape = self.shape(client).await?;
            let stmt = client.prepare_cached(&shape.sql.owner).await?;
            let row = client.query_opt(&stmt, &[&task.as_str()]).await?;
            Ok(row.map(|r| r.try_get::<_, Option<String>>(0)).transpose()?)
        })
        .await
    }

    pub async fn create(&self, task: NewTask) -> Result<TaskState, Error> {
        self.run(async |client: &mut Object| {
            let shape = self.shape(client).await?;
            let stmt = client.prepare_cached(&shape.sql.create).await?;
            let user_id = task.user_id.map(|u| u.to_string());
            let pending = shape.words.word(crate::domain::TaskStatus::Pending);
            let row = match pending {
                Some(word) => {
                    client
                        .query_one(&stmt, &[&task.prompt, &user_id, &word])
                        .await?
                }
                None => client.query_one(&stmt, &[&task.prompt, &user_id]).await?,
            };
            Ok(decode(&row, &shape.statuses)?.state)
        })
        .await
    }

    /// Ok when the database answers and the table is one taskcast can serve. Reads the
    /// table's shape anew, so a changed table is picked up.
    pub async fn check_ready(&self) -> Result<(), Error> {
        self.run(async |client: &mut Object| {
            self.reload_shape(client).await?;
            Ok(())
        })
        .await
    }

    /// What makes the table or database open to anyone (see [`super::exposure`]), for a
    /// warning at startup; nothing when the database cannot be read now.
    pub async fn hazards(&self) -> Vec<Finding> {
        let read =
            self.run(async |client: &mut Object| Ok(exposure::read(&***client).await?.warnings()));
        read.await.unwrap_or_default()
    }

    /// Turns a failure into what the caller should do: migrate (422), retry (503), or
    /// report (500). A missing table or column is confirmed against the catalog so the
    /// message can name exactly what to add.
    async fn classify(&self, error: DbError) -> Error {
        let pg = match error {
            DbError::Domain(e) => {
                if matches!(e, Error::SchemaMissing { .. } | Error::TableUnsupported(_)) {
                    self.forget_shape();
                }
                return e;
            }
            DbError::Late(late) => {
                return Error::unavailable("the database", late.describe(self.timeout));
            }
            DbError::Pg(pg) => pg,
        };
        let code = pg.code();
        if code == Some(&SqlState::UNDEFINED_TABLE)
            || code == Some(&SqlState::UNDEFINED_COLUMN)
            || code == Some(&SqlState::UNDEFINED_OBJECT)
            || code == Some(&SqlState::DATATYPE_MISMATCH)
            || code == Some(&SqlState::UNDEFINED_FUNCTION)
        {
            // The table changed under a cached shape: read it again next time.
            self.forget_shape();
            let deadline = Instant::now() + self.timeout;
            if let Ok(missing) = bounded::run(
                &self.pool,
                &self.tls,
                deadline,
                async |client: &mut Object| missing_columns(&***client).await.map_err(DbError::Pg),
            )
            .await
                && !missing.is_empty()
            {
                return Error::SchemaMissing { missing };
            }
            return Error::internal("querying image_tasks", pg);
        }
        let transient = pg.is_closed()
            || pg.as_db_error().is_none()
            || code.is_some_and(|c| {
                [
                    SqlState::ADMIN_SHUTDOWN,
                    SqlState::CRASH_SHUTDOWN,
                    SqlState::CANNOT_CONNECT_NOW,
                    SqlState::TOO_MANY_CONNECTIONS,
                    SqlState::T_R_SERIALIZATION_FAILURE,
                    SqlState::T_R_DEADLOCK_DETECTED,
                    SqlState::READ_ONLY_SQL_TRANSACTION,
                    // statement_timeout or idle_in_transaction_session_timeout (bounded.rs)
                    SqlState::QUERY_CANCELED,
                    SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT,
                ]
                .contains(c)
            });
        if transient {
            Error::unavailable("the database", pg)
        } else {
            Error::internal("querying image_tasks", pg)
        }
    }

    /// [`classify`](Self::classify) for a write: a batch that was sent but then lost its
    /// connection or missed its deadline may have committed, and its pushers are told so.
    /// A database error means the statement failed, so nothing of it committed.
    async fn classify_write(&self, error: DbError) -> Error {
        let unknown = match &error {
            DbError::Late(late) => *late == Late::Running,
            DbError::Pg(pg) => pg.as_db_error().is_none(),
            DbError::Domain(_) => false,
        };
        let error = self.classify(error).await;
        if unknown && matches!(error, Error::Unavailable { .. }) {
            Error::CommitUnknown {
                source: Some(error.into()),
            }
        } else {
            error
        }
    }
}

/// The ways a store operation fails before classification.
enum DbError {
    Domain(Error),
    Pg(tokio_postgres::Error),
    /// It missed its deadline (see [`bounded::run`]).
    Late(Late),
}

impl From<Late> for DbError {
    fn from(e: Late) -> Self {
        DbError::Late(e)
    }
}

impl From<Error> for DbError {
    fn from(e: Error) -> Self {
        DbError::Domain(e)
    }
}

impl From<tokio_postgres::Error> for DbError {
    fn from(e: tokio_postgres::Error) -> Self {
        DbError::Pg(e)
    }
}

/// A row in the order of the shape's read columns. Each column is read as the type its
/// cast gives, so only a driver fault (not a value) can make a `try_get` fail.
fn stored_row(row: &Row) -> StoredRow {
    StoredRow {
        id: row.try_get(0).ok().flatten(),
        progress: row.try_get(1).ok().flatten(),
        stage: row.try_get(2).ok().flatten(),
        status: row.try_get(3).ok().flatten(),
        version: row.try_get(4).ok().flatten(),
        updated_epoch: row.try_get(5).ok().flatten(),
        image_url: row.try_get(6).ok().flatten(),
        error: row.try_get(7).ok().flatten(),
        seq: row.try_get(8).ok().flatten(),
        owner: row.try_get(9).ok().flatten(),
        step: row.try_get(10).ok().flatten(),
        total_steps: row.try_get(11).ok().flatten(),
        preview_url: row.try_get(12).ok().flatten(),
        stalled_epoch: row.try_get(13).ok().flatten(),
        cancel_requested_epoch: row.try_get(14).ok().flatten(),
    }
}

/// A row rendered as a task, or [`Error::UnreadableRow`] for its task alone.
fn decode(row: &Row, statuses: &StatusMap) -> Result<TaskRow, Error> {
    stored_row(row).decode(statuses).map_err(unreadable)
}

fn unreadable(e: Unreadable) -> Error {
    match e.task {
        Some(task) => Error::UnreadableRow {
            task: task.to_string(),
            column: e.column,
            held: e.held,
        },
        None => Error::internal(
            "reading image_tasks",
            format!("a row's {} is {}", e.column, e.held),
        ),
    }
}
