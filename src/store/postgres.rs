//! The Postgres store: `public.image_tasks` through a deadpool pool.
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

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use deadpool_postgres::{
    Hook, HookError, Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime,
};
use tokio::time::Instant;
use tokio_postgres::Row;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::BatchResult;
use super::bounded::{self, Late};
use super::connect::PgTarget;
use super::exposure;
use super::report::Finding;
use super::schema::missing_columns;
use super::shape::{self, Shape};
use crate::domain::{
    CancelDecision, Decision, IdKind, NewTask, Outcome, ProgressUpdate, StatusMap, StoredRow,
    TaskId, TaskRow, TaskState, Unreadable,
};
use crate::error::Error;
use crate::secret::Secret;

/// What the pool takes from the configuration.
#[derive(Clone, Copy, Debug)]
pub struct PoolOptions {
    /// Connections in the pool (`TASKCAST_DB_POOL_SIZE`).
    pub size: usize,
    /// Bound on every database call, the wait for a connection included
    /// (`TASKCAST_DB_TIMEOUT_MS`).
    pub timeout: Duration,
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
        })
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

    /// Commits a batch whose oldest push arrived at `since`; the answer is due one timeout
    /// after that. A batch that already waited that long is refused without being sent. A
    /// batch sent but not confirmed in time is answered [`Error::CommitUnknown`].
    pub async fn apply_batch(
        &self,
        batch: &[(TaskId, ProgressUpdate)],
        since: Instant,
    ) -> Result<BatchResult, Error> {
        let deadline = since + self.timeout;
        if deadline <= Instant::now() {
            return Err(Error::unavailable(
                "the database",
                Late::Running.describe(self.timeout) + " (the push waited behind a slow commit)",
            ));
        }
        let result = bounded::run(
            &self.pool,
            &self.tls,
            deadline,
            async |client: &mut Object| self.try_apply_batch(client, batch).await,
        )
        .await;
        match result {
            Ok(results) => Ok(results),
            Err(e) => Err(self.classify_write(e).await),
        }
    }

    async fn try_apply_batch(
        &self,
        client: &mut Object,
        batch: &[(TaskId, ProgressUpdate)],
    ) -> Result<BatchResult, DbError> {
        let shape = self.shape(client).await?;
        let mut results: Vec<Option<Result<Outcome, Error>>> =
            std::iter::repeat_with(|| None).take(batch.len()).collect();
        // A column the push needs that the cached shape lacks may have been added since
        // (`taskcast migrate`): read the table again before refusing.
        let shape = if batch.iter().any(|(_, u)| shape.check_columns(u).is_err()) {
            self.reload_shape(client).await?
        } else {
            shape
        };
        // A status the column cannot hold, or a column the table lacks, is refused before
        // any SQL.
        for (index, (_, update)) in batch.iter().enumerate() {
            if let Some(status) = update.status()
                && let Err(e) = shape.word(status)
            {
                results[index] = Some(Err(e));
            } else if let Err(e) = shape.check_columns(update) {
                results[index] = Some(Err(e));
            }
        }
        // In id order, so concurrent statements from two nodes lock rows in one order.
        let mut order: Vec<usize> = (0..batch.len()).filter(|&i| results[i].is_none()).collect();
        order.sort_by_key(|&i| batch[i].0);

        if !order.is_empty() {
            let apply_open = client.prepare_cached(&shape.sql.apply_open).await?;
            let columns = Columns::new(batch, &order, &shape);
            let open = shape.words.open();
            let mut params = columns.params();
            params.push(&open);
            match client.query(&apply_open, &params).await {
                Ok(rows) => {
                    let position: HashMap<TaskId, usize> =
                        order.iter().map(|&i| (batch[i].0, i)).collect();
                    for row in rows {
                        let task = decode(&row, &shape.statuses);
                        if let Some(&index) = task
                            .as_ref()
                            .ok()
                            .and_then(|t| position.get(&t.state.task_id))
                        {
                            results[index] = Some(task.map(|t| Outcome::Applied(t.state)));
                        }
                    }
                }
                // Another node's statement holds rows this one needs: the locked path orders it.
                Err(e) if is_contention(&e) => {}
                Err(e) => return Err(e.into()),
            }
        }

        let rest: Vec<usize> = order
            .into_iter()
            .filter(|&i| results[i].is_none())
            .collect();
        if !rest.is_empty() {
            match apply_locked(client, &shape, batch, &rest).await {
                Ok(locked) => {
                    for (index, result) in locked {
                        results[index] = Some(result);
                    }
                }
                // Nothing committed yet: the whole batch failed.
                Err(e) if rest.len() == batch.len() => return Err(e),
                // The first statement's pushes are committed and must be answered as such;
                // only the rest failed.
                Err(e) => {
                    let error = self.classify_write(e).await;
                    tracing::warn!(error = %error.chain(), pushes = rest.len(), "pushes not committed");
                    for index in rest {
                        results[index] = Some(Err(error.for_each_push()));
                    }
                }
            }
        }
        Ok(results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    Err(Error::internal("applying a push", "no result was recorded"))
                })
            })
            .collect())
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
                let applied: bool = row.try_get(14)?;
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

/// The locked path for the pushes at `indices` (in id order): lock their rows, decide each
/// with [`TaskRow::decide`], write the applied ones with one statement, commit.
async fn apply_locked(
    client: &mut Object,
    shape: &Shape,
    batch: &[(TaskId, ProgressUpdate)],
    indices: &[usize],
) -> Result<Vec<(usize, Result<Outcome, Error>)>, DbError> {
    let lock = client.prepare_cached(&shape.sql.lock).await?;
    let apply = client.prepare_cached(&shape.sql.apply).await?;
    let tx = client.transaction().await?;
    let ids: Vec<&str> = indices.iter().map(|&i| batch[i].0.as_str()).collect();
    // A row taskcast cannot read fails its own pushes only, not the whole batch.
    let mut current = HashMap::with_capacity(indices.len());
    for row in tx.query(&lock, &[&ids]).await? {
        if let Some(id) = row
            .try_get::<_, Option<String>>(0)?
            .and_then(|id| TaskId::from_stored(&id))
        {
            current.insert(id, decode(&row, &shape.statuses));
        }
    }

    let mut results = Vec::with_capacity(indices.len());
    let mut to_apply = Vec::new();
    for &index in indices {
        let (id, update) = &batch[index];
        // Each task appears once per batch, so its row can be taken.
        let row = match current.remove(id) {
            None => {
                results.push((index, Err(Error::NotFound(id.to_string()))));
                continue;
            }
            Some(Err(e)) => {
                results.push((index, Err(e)));
                continue;
            }
            Some(Ok(row)) => row,
        };
        match row.decide(update) {
            Ok(Decision::Stale) => results.push((index, Ok(Outcome::Stale(row.state)))),
            Ok(Decision::Apply) => to_apply.push(index),
            Err(e) => results.push((index, Err(e))),
        }
    }

    if !to_apply.is_empty() {
        let columns = Columns::new(batch, &to_apply, shape);
        let mut applied = HashMap::with_capacity(to_apply.len());
        for row in tx.query(&apply, &columns.params()).await? {
            let task = decode(&row, &shape.statuses)?;
            applied.insert(task.state.task_id, task.state);
        }
        for index in to_apply {
            let id = batch[index].0;
            let result = match applied.remove(&id) {
                Some(state) => Ok(Outcome::Applied(state)),
                // The row was locked, so it cannot have vanished; say so if it did.
                None => Err(Error::internal(
                    "applying a push",
                    format!("row {id} was not updated"),
                )),
            };
            results.push((index, result));
        }
    }
    tx.commit().await?;
    Ok(results)
}

/// The UPDATE's input arrays for the pushes at some indices of a batch, all as text (ids
/// and statuses are cast to the column's type in SQL). Text columns borrow from the batch;
/// only `progress` is formatted.
struct Columns<'a> {
    ids: Vec<&'a str>,
    progress: Vec<Option<String>>,
    stages: Vec<Option<&'a str>>,
    statuses: Vec<Option<&'a str>>,
    seqs: Vec<Option<i64>>,
    image_urls: Vec<Option<&'a str>>,
    errors: Vec<Option<&'a str>>,
    steps: Vec<Option<i64>>,
    total_steps: Vec<Option<i64>>,
    preview_urls: Vec<Option<&'a str>>,
}

impl<'a> Columns<'a> {
    /// `indices` hold only pushes whose status the shape can store.
    fn new(batch: &'a [(TaskId, ProgressUpdate)], indices: &[usize], shape: &'a Shape) -> Self {
        let updates = || indices.iter().map(|&i| &batch[i].1);
        Columns {
            ids: indices.iter().map(|&i| batch[i].0.as_str()).collect(),
            // As text: Rust prints the shortest string that reads back as the same f64, so
            // NUMERIC keeps every digit (a float8 parameter would round to 15 digits).
            progress: updates()
                .map(|u| u.progress().map(|p| p.value().to_string()))
                .collect(),
            stages: updates().map(|u| u.stage().map(|s| s.as_str())).collect(),
            statuses: updates()
                .map(|u| u.status().and_then(|s| shape.words.word(s)))
                .collect(),
            seqs: updates().map(ProgressUpdate::seq).collect(),
            image_urls: updates().map(ProgressUpdate::image_url).collect(),
            errors: updates().map(ProgressUpdate::error).collect(),
            steps: updates().map(|u| u.step().map(i64::from)).collect(),
            total_steps: updates().map(|u| u.total_steps().map(i64::from)).collect(),
            preview_urls: updates().map(ProgressUpdate::preview_url).collect(),
        }
    }

    /// `$1` to `$10` of the apply statements.
    fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        vec![
            &self.ids,
            &self.progress,
            &self.stages,
            &self.statuses,
            &self.seqs,
            &self.image_urls,
            &self.errors,
            &self.steps,
            &self.total_steps,
            &self.preview_urls,
        ]
    }
}

/// A statement that lost a lock race (deadlock or serialization failure) and changed
/// nothing; the locked path takes its pushes.
fn is_contention(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| {
        *c == SqlState::T_R_DEADLOCK_DETECTED || *c == SqlState::T_R_SERIALIZATION_FAILURE
    })
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
        cancel_requested_epoch: row.try_get(13).ok().flatten(),
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
