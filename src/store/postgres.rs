//! The Postgres store: `public.image_tasks` through a deadpool pool.
//!
//! A batch is first one autocommit statement, `UPDATE ... FROM unnest(...)` whose WHERE
//! clause is the push rules (the task is open, the `seq` is new): one round trip commits
//! every push those rules allow. The pushes it left alone (a retried `seq`, a finished or
//! missing task, a row changed meanwhile) go through the locked path: lock their rows in
//! id order (`FOR UPDATE`, so two nodes never deadlock), decide each in Rust with the
//! rules every store shares, write the applied ones, commit.

use std::collections::HashMap;
use std::time::Duration;

use deadpool_postgres::{
    Hook, HookError, Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime,
};
use tokio::time::Instant;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};
use uuid::Uuid;

use super::BatchResult;
use super::bounded::{self, Late};
use super::schema::missing_columns;
use crate::auth::Secret;
use crate::config::Limits;
use crate::domain::{
    Decision, NewTask, Outcome, ProgressUpdate, Stage, TaskId, TaskRow, TaskState, TaskStatus,
};
use crate::error::Error;

/// Columns read into a [`TaskRow`], in the order [`row_to_task`] expects.
const COLUMNS: &str = "id, progress::float8, stage, status, taskcast_version, updated_at, \
                       image_url, error, taskcast_seq, user_id";

const LOCK_ROWS: &str = "SELECT id, progress::float8, stage, status, taskcast_version, updated_at, \
     image_url, error, taskcast_seq, user_id \
     FROM public.image_tasks WHERE id = ANY($1) ORDER BY id FOR UPDATE";

/// `UPDATE ... FROM unnest(...)`: NULL in an input array means "leave that column as it
/// is"; `$extra` narrows the rows.
macro_rules! apply_sql {
    ($extra:literal) => {
        concat!(
            "UPDATE public.image_tasks AS t SET \
               progress = COALESCE(u.progress::numeric, t.progress), \
               stage = COALESCE(u.stage, t.stage), \
               status = COALESCE(u.status, t.status), \
               image_url = COALESCE(u.image_url, t.image_url), \
               error = COALESCE(u.error, t.error), \
               taskcast_seq = COALESCE(u.seq, t.taskcast_seq), \
               taskcast_version = t.taskcast_version + 1, \
               updated_at = now() \
             FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::int8[], \
                         $6::text[], $7::text[]) \
               AS u(id, progress, stage, status, seq, image_url, error) \
             WHERE t.id = u.id AND t.id = ANY($1)",
            $extra,
            " RETURNING t.id, t.progress::float8, t.stage, t.status, t.taskcast_version, \
               t.updated_at, t.image_url, t.error, t.taskcast_seq, t.user_id"
        )
    };
}

/// Pushes already decided under the row locks.
const APPLY: &str = apply_sql!("");

/// The push rules of [`TaskRow::decide`] as a WHERE clause: the task's status is one a push
/// may change (`$8`, the open statuses), and the push has no `seq` or a newer one.
const APPLY_OPEN: &str = apply_sql!(
    " AND t.status = ANY($8::text[]) \
      AND (u.seq IS NULL OR t.taskcast_seq IS NULL OR u.seq > t.taskcast_seq)"
);

/// Cloning is shallow: the pool is reference-counted.
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
    /// Every call answers within this (`TASKCAST_DB_TIMEOUT_MS`); see [`bounded`].
    timeout: Duration,
}

impl PgStore {
    /// Builds the pool; connects lazily, so a database that is down at startup only makes
    /// requests answer 503 until it is back.
    pub fn connect(url: &Secret, limits: &Limits) -> Result<Self, Error> {
        let mut pg: tokio_postgres::Config = url.expose().parse().map_err(|e| {
            Error::invalid(
                "DATABASE_URL",
                format!("DATABASE_URL is not a valid Postgres connection string: {e}"),
            )
        })?;
        if pg.get_connect_timeout().is_none() {
            pg.connect_timeout(limits.db_timeout);
        }
        if pg.get_application_name().is_none() {
            pg.application_name("taskcast");
        }
        bounded::tune_socket(&mut pg, limits.db_timeout);
        let settings = bounded::session_settings(&pg, limits.db_timeout);
        let manager = Manager::from_config(
            pg,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(limits.db_pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(limits.db_timeout))
            .create_timeout(Some(limits.db_timeout))
            .recycle_timeout(Some(limits.db_timeout))
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
            timeout: limits.db_timeout,
        })
    }

    /// Runs `op` on a pooled connection within the timeout from now (see [`bounded::run`]).
    async fn bounded<T>(
        &self,
        op: impl AsyncFnOnce(&mut Object) -> Result<T, DbError>,
    ) -> Result<T, DbError> {
        bounded::run(&self.pool, Instant::now() + self.timeout, op).await
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
        let result = bounded::run(&self.pool, deadline, async |client: &mut Object| {
            self.try_apply_batch(client, batch).await
        })
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
        let mut results: Vec<Option<Result<Outcome, Error>>> =
            std::iter::repeat_with(|| None).take(batch.len()).collect();
        // In id order, so concurrent statements from two nodes lock rows in one order.
        let mut order: Vec<usize> = (0..batch.len()).collect();
        order.sort_by_key(|&i| batch[i].0);

        let apply_open = client.prepare_cached(APPLY_OPEN).await?;
        let columns = Columns::new(batch, &order);
        let open: Vec<&str> = TaskStatus::OPEN.iter().map(|s| s.as_str()).collect();
        let mut params = columns.params();
        params.push(&open);
        match client.query(&apply_open, &params).await {
            Ok(rows) => {
                let position: HashMap<TaskId, usize> =
                    order.iter().map(|&i| (batch[i].0, i)).collect();
                for row in rows {
                    let id = TaskId::from(row.try_get::<_, Uuid>(0)?);
                    if let Some(&index) = position.get(&id) {
                        results[index] = Some(row_to_task(&row).map(|t| Outcome::Applied(t.state)));
                    }
                }
            }
            // Another node's statement holds rows this one needs: the locked path orders it.
            Err(e) if is_contention(&e) => {}
            Err(e) => return Err(e.into()),
        }

        let rest: Vec<usize> = order
            .into_iter()
            .filter(|&i| results[i].is_none())
            .collect();
        if !rest.is_empty() {
            match apply_locked(client, batch, &rest).await {
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

    pub async fn get(&self, task: TaskId) -> Result<Option<TaskState>, Error> {
        let result = self
            .bounded(async |client: &mut Object| {
                let sql = format!("SELECT {COLUMNS} FROM public.image_tasks WHERE id = $1");
                let stmt = client.prepare_cached(&sql).await?;
                let row = client.query_opt(&stmt, &[&task.as_uuid()]).await?;
                Ok(row.map(|r| row_to_task(&r)).transpose()?.map(|t| t.state))
            })
            .await;
        match result {
            Ok(state) => Ok(state),
            Err(e) => Err(self.classify(e).await),
        }
    }

    /// The committed states of `tasks` that exist, in no particular order.
    pub async fn get_many(&self, tasks: &[TaskId]) -> Result<Vec<TaskState>, Error> {
        let result = self
            .bounded(async |client: &mut Object| {
                let sql = format!("SELECT {COLUMNS} FROM public.image_tasks WHERE id = ANY($1)");
                let stmt = client.prepare_cached(&sql).await?;
                let ids: Vec<Uuid> = tasks.iter().map(TaskId::as_uuid).collect();
                let rows = client.query(&stmt, &[&ids]).await?;
                rows.iter()
                    .map(|r| row_to_task(r).map(|t| t.state).map_err(DbError::from))
                    .collect::<Result<Vec<_>, DbError>>()
            })
            .await;
        match result {
            Ok(states) => Ok(states),
            Err(e) => Err(self.classify(e).await),
        }
    }

    /// `None` if the task does not exist, else its owner (`user_id`).
    pub async fn owner(&self, task: TaskId) -> Result<Option<Option<Uuid>>, Error> {
        let result = self
            .bounded(async |client: &mut Object| {
                let stmt = client
                    .prepare_cached("SELECT user_id FROM public.image_tasks WHERE id = $1")
                    .await?;
                let row = client.query_opt(&stmt, &[&task.as_uuid()]).await?;
                Ok(row.map(|r| r.try_get::<_, Option<Uuid>>(0)).transpose()?)
            })
            .await;
        match result {
            Ok(owner) => Ok(owner),
            Err(e) => Err(self.classify(e).await),
        }
    }

    pub async fn create(&self, task: NewTask) -> Result<TaskState, Error> {
        let result = self.bounded(async |client: &mut Object| {
            let sql = format!(
                "INSERT INTO public.image_tasks (prompt, user_id, status) VALUES ($1, $2, 'pending') \
                 RETURNING {COLUMNS}"
            );
            let stmt = client.prepare_cached(&sql).await?;
            let row = client.query_one(&stmt, &[&task.prompt, &task.user_id]).await?;
            Ok(row_to_task(&row)?.state)
        })
        .await;
        match result {
            Ok(state) => Ok(state),
            Err(e) => Err(self.classify(e).await),
        }
    }

    pub async fn check_ready(&self) -> Result<(), Error> {
        let missing = self
            .bounded(async |client: &mut Object| Ok(missing_columns(&***client).await?))
            .await
            .map_err(|e| match e {
                DbError::Domain(e) => e,
                DbError::Pg(e) => Error::unavailable("the database", e),
                DbError::Late(late) => {
                    Error::unavailable("the database", late.describe(self.timeout))
                }
            })?;
        if missing.is_empty() {
            Ok(())
        } else {
            Err(Error::SchemaMissing { missing })
        }
    }

    /// Turns a failure into what the caller should do: migrate (422), retry (503), or
    /// report (500). A missing table or column is confirmed against the catalog so the
    /// message can name exactly what to add.
    async fn classify(&self, error: DbError) -> Error {
        let pg = match error {
            DbError::Domain(e) => return e,
            DbError::Late(late) => {
                return Error::unavailable("the database", late.describe(self.timeout));
            }
            DbError::Pg(pg) => pg,
        };
        let code = pg.code();
        if code == Some(&SqlState::UNDEFINED_TABLE) || code == Some(&SqlState::UNDEFINED_COLUMN) {
            if let Ok(missing) = self
                .bounded(async |client: &mut Object| Ok(missing_columns(&***client).await?))
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
    batch: &[(TaskId, ProgressUpdate)],
    indices: &[usize],
) -> Result<Vec<(usize, Result<Outcome, Error>)>, DbError> {
    let lock = client.prepare_cached(LOCK_ROWS).await?;
    let apply = client.prepare_cached(APPLY).await?;
    let tx = client.transaction().await?;
    let ids: Vec<Uuid> = indices.iter().map(|&i| batch[i].0.as_uuid()).collect();
    // A row taskcast cannot read (say, a status it does not know) fails its own pushes
    // only, not the whole batch.
    let mut current = HashMap::with_capacity(indices.len());
    for row in tx.query(&lock, &[&ids]).await? {
        let id: Uuid = row.try_get(0)?;
        current.insert(TaskId::from(id), row_to_task(&row));
    }

    let mut results = Vec::with_capacity(indices.len());
    let mut to_apply = Vec::new();
    for &index in indices {
        let (id, update) = &batch[index];
        // Each task appears once per batch, so its row can be taken.
        let row = match current.remove(id) {
            None => {
                results.push((index, Err(Error::NotFound(*id))));
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
        let columns = Columns::new(batch, &to_apply);
        let mut applied = HashMap::with_capacity(to_apply.len());
        for row in tx.query(&apply, &columns.params()).await? {
            let task = row_to_task(&row)?;
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

/// The UPDATE's input arrays for the pushes at some indices of a batch.
/// Text columns borrow from the batch; only `progress` is formatted.
struct Columns<'a> {
    ids: Vec<Uuid>,
    progress: Vec<Option<String>>,
    stages: Vec<Option<&'a str>>,
    statuses: Vec<Option<&'static str>>,
    seqs: Vec<Option<i64>>,
    image_urls: Vec<Option<&'a str>>,
    errors: Vec<Option<&'a str>>,
}

impl<'a> Columns<'a> {
    fn new(batch: &'a [(TaskId, ProgressUpdate)], indices: &[usize]) -> Self {
        let updates = || indices.iter().map(|&i| &batch[i].1);
        Columns {
            ids: indices.iter().map(|&i| batch[i].0.as_uuid()).collect(),
            // As text: Rust prints the shortest string that reads back as the same f64, so
            // NUMERIC keeps every digit (a float8 parameter would round to 15 digits).
            progress: updates()
                .map(|u| u.progress().map(|p| p.value().to_string()))
                .collect(),
            stages: updates().map(|u| u.stage().map(Stage::as_str)).collect(),
            statuses: updates()
                .map(|u| u.status().map(TaskStatus::as_str))
                .collect(),
            seqs: updates().map(ProgressUpdate::seq).collect(),
            image_urls: updates().map(ProgressUpdate::image_url).collect(),
            errors: updates().map(ProgressUpdate::error).collect(),
        }
    }

    /// `$1` to `$7` of [`APPLY`] and [`APPLY_OPEN`].
    fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        vec![
            &self.ids,
            &self.progress,
            &self.stages,
            &self.statuses,
            &self.seqs,
            &self.image_urls,
            &self.errors,
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

fn row_to_task(row: &Row) -> Result<TaskRow, Error> {
    let read = |e: tokio_postgres::Error| Error::internal("reading image_tasks", e);
    let status: String = row.try_get(3).map_err(read)?;
    let status = TaskStatus::parse(&status).ok_or_else(|| {
        Error::internal(
            "reading image_tasks",
            format!("image_tasks.status holds {status:?}, which taskcast does not know"),
        )
    })?;
    let id: Uuid = row.try_get(0).map_err(read)?;
    Ok(TaskRow {
        state: TaskState {
            task_id: TaskId::from(id),
            progress: row.try_get(1).map_err(read)?,
            stage: row.try_get(2).map_err(read)?,
            status,
            version: row.try_get(4).map_err(read)?,
            updated_at: row.try_get(5).map_err(read)?,
            image_url: row.try_get(6).map_err(read)?,
            error: row.try_get(7).map_err(read)?,
        },
        last_seq: row.try_get(8).map_err(read)?,
        owner: row.try_get(9).map_err(read)?,
    })
}
