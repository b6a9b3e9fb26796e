//! The Postgres store: `public.image_tasks` through a deadpool pool.
//!
//! A batch is one transaction: lock the batch's rows in id order (`FOR UPDATE`, so two
//! nodes never deadlock), decide each push in Rust with the rules every store shares, then
//! write all applied pushes with one `UPDATE ... FROM unnest(...)` and commit.

use std::collections::HashMap;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use tokio_postgres::error::SqlState;
use tokio_postgres::{NoTls, Row};
use uuid::Uuid;

use super::BatchResult;
use super::schema::missing_columns;
use crate::auth::Secret;
use crate::config::Limits;
use crate::domain::{
    Decision, NewTask, Outcome, ProgressUpdate, TaskId, TaskRow, TaskState, TaskStatus,
};
use crate::error::Error;

/// Columns read into a [`TaskRow`], in the order [`row_to_task`] expects.
const COLUMNS: &str = "id, progress::float8, stage, status, taskcast_version, updated_at, \
                       image_url, error, taskcast_seq, user_id";

const LOCK_ROWS: &str = "SELECT id, progress::float8, stage, status, taskcast_version, updated_at, \
     image_url, error, taskcast_seq, user_id \
     FROM public.image_tasks WHERE id = ANY($1) ORDER BY id FOR UPDATE";

/// NULL in an input array means "leave that column as it is".
const APPLY: &str = "UPDATE public.image_tasks AS t SET \
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
     WHERE t.id = u.id AND t.id = ANY($1) \
     RETURNING t.id, t.progress::float8, t.stage, t.status, t.taskcast_version, t.updated_at, \
       t.image_url, t.error, t.taskcast_seq, t.user_id";

/// Cloning is shallow: the pool is reference-counted.
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
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
        pg.keepalives_idle(Duration::from_secs(30));
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
            .build()
            .map_err(|e| Error::internal("building the database pool", e))?;
        Ok(PgStore { pool })
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, Error> {
        self.pool.get().await.map_err(pool_error)
    }

    pub async fn apply_batch(
        &self,
        batch: &[(TaskId, ProgressUpdate)],
    ) -> Result<BatchResult, Error> {
        match self.try_apply_batch(batch).await {
            Ok(results) => Ok(results),
            Err(e) => Err(self.classify(e).await),
        }
    }

    async fn try_apply_batch(
        &self,
        batch: &[(TaskId, ProgressUpdate)],
    ) -> Result<BatchResult, DbError> {
        let mut client = self.client().await?;
        let lock = client.prepare_cached(LOCK_ROWS).await?;
        let apply = client.prepare_cached(APPLY).await?;
        let tx = client.transaction().await?;
        let ids: Vec<Uuid> = batch.iter().map(|(id, _)| id.as_uuid()).collect();
        // A row taskcast cannot read (say, a status it does not know) fails its own pushes
        // only, not the whole batch.
        let mut current = HashMap::with_capacity(batch.len());
        for row in tx.query(&lock, &[&ids]).await? {
            let id: Uuid = row.try_get(0)?;
            current.insert(TaskId::from(id), row_to_task(&row));
        }

        let mut results: BatchResult = Vec::with_capacity(batch.len());
        let mut to_apply = Vec::new();
        for (index, (id, update)) in batch.iter().enumerate() {
            // Each task appears once per batch, so its row can be taken.
            let row = match current.remove(id) {
                None => {
                    results.push(Err(Error::NotFound(*id)));
                    continue;
                }
                Some(Err(e)) => {
                    results.push(Err(e));
                    continue;
                }
                Some(Ok(row)) => row,
            };
            match row.decide(update) {
                Ok(Decision::Stale) => results.push(Ok(Outcome::Stale(row.state))),
                Ok(Decision::Apply) => {
                    // Placeholder until the UPDATE returns the committed row.
                    results.push(Ok(Outcome::Stale(row.state)));
                    to_apply.push(index);
                }
                Err(e) => results.push(Err(e)),
            }
        }

        if !to_apply.is_empty() {
            let pick = |f: &dyn Fn(&ProgressUpdate) -> Option<String>| -> Vec<Option<String>> {
                to_apply.iter().map(|&i| f(&batch[i].1)).collect()
            };
            let ids: Vec<Uuid> = to_apply.iter().map(|&i| batch[i].0.as_uuid()).collect();
            // As text: Rust prints the shortest string that reads back as the same f64, so
            // NUMERIC keeps every digit (a float8 parameter would round to 15 digits).
            let progress = pick(&|u| u.progress().map(|p| p.value().to_string()));
            let stages = pick(&|u| u.stage().map(|s| s.as_str().to_owned()));
            let statuses = pick(&|u| u.status().map(|s| s.as_str().to_owned()));
            let seqs: Vec<Option<i64>> = to_apply.iter().map(|&i| batch[i].1.seq()).collect();
            let image_urls = pick(&|u| u.image_url().map(str::to_owned));
            let errors = pick(&|u| u.error().map(str::to_owned));
            let rows = tx
                .query(
                    &apply,
                    &[
                        &ids,
                        &progress,
                        &stages,
                        &statuses,
                        &seqs,
                        &image_urls,
                        &errors,
                    ],
                )
                .await?;
            let mut applied = HashMap::with_capacity(rows.len());
            for row in rows {
                let task = row_to_task(&row)?;
                applied.insert(task.state.task_id, task.state);
            }
            for &index in &to_apply {
                let id = batch[index].0;
                results[index] = match applied.remove(&id) {
                    Some(state) => Ok(Outcome::Applied(state)),
                    // The row was locked, so it cannot have vanished; say so if it did.
                    None => Err(Error::internal(
                        "applying a push",
                        format!("row {id} was not updated"),
                    )),
                };
            }
        }
        tx.commit().await?;
        Ok(results)
    }

    pub async fn get(&self, task: TaskId) -> Result<Option<TaskState>, Error> {
        let result: Result<_, DbError> = async {
            let client = self.client().await?;
            let sql = format!("SELECT {COLUMNS} FROM public.image_tasks WHERE id = $1");
            let stmt = client.prepare_cached(&sql).await?;
            let row = client.query_opt(&stmt, &[&task.as_uuid()]).await?;
            Ok(row.map(|r| row_to_task(&r)).transpose()?.map(|t| t.state))
        }
        .await;
        match result {
            Ok(state) => Ok(state),
            Err(e) => Err(self.classify(e).await),
        }
    }

    /// The committed states of `tasks` that exist, in no particular order.
    pub async fn get_many(&self, tasks: &[TaskId]) -> Result<Vec<TaskState>, Error> {
        let result: Result<_, DbError> = async {
            let client = self.client().await?;
            let sql = format!("SELECT {COLUMNS} FROM public.image_tasks WHERE id = ANY($1)");
            let stmt = client.prepare_cached(&sql).await?;
            let ids: Vec<Uuid> = tasks.iter().map(TaskId::as_uuid).collect();
            let rows = client.query(&stmt, &[&ids]).await?;
            rows.iter()
                .map(|r| row_to_task(r).map(|t| t.state).map_err(DbError::from))
                .collect::<Result<Vec<_>, DbError>>()
        }
        .await;
        match result {
            Ok(states) => Ok(states),
            Err(e) => Err(self.classify(e).await),
        }
    }

    /// `None` if the task does not exist, else its owner (`user_id`).
    pub async fn owner(&self, task: TaskId) -> Result<Option<Option<Uuid>>, Error> {
        let result: Result<_, DbError> = async {
            let client = self.client().await?;
            let stmt = client
                .prepare_cached("SELECT user_id FROM public.image_tasks WHERE id = $1")
                .await?;
            let row = client.query_opt(&stmt, &[&task.as_uuid()]).await?;
            Ok(row.map(|r| r.try_get::<_, Option<Uuid>>(0)).transpose()?)
        }
        .await;
        match result {
            Ok(owner) => Ok(owner),
            Err(e) => Err(self.classify(e).await),
        }
    }

    pub async fn create(&self, task: NewTask) -> Result<TaskState, Error> {
        let result: Result<_, DbError> = async {
            let client = self.client().await?;
            let sql = format!(
                "INSERT INTO public.image_tasks (prompt, user_id, status) VALUES ($1, $2, 'pending') \
                 RETURNING {COLUMNS}"
            );
            let stmt = client.prepare_cached(&sql).await?;
            let row = client.query_one(&stmt, &[&task.prompt, &task.user_id]).await?;
            Ok(row_to_task(&row)?.state)
        }
        .await;
        match result {
            Ok(state) => Ok(state),
            Err(e) => Err(self.classify(e).await),
        }
    }

    pub async fn check_ready(&self) -> Result<(), Error> {
        let client = self.client().await?;
        let missing = missing_columns(&**client)
            .await
            .map_err(|e| Error::unavailable("the database", e))?;
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
            DbError::Pg(pg) => pg,
        };
        let code = pg.code();
        if code == Some(&SqlState::UNDEFINED_TABLE) || code == Some(&SqlState::UNDEFINED_COLUMN) {
            if let Ok(client) = self.client().await
                && let Ok(missing) = missing_columns(&**client).await
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
                ]
                .contains(c)
            });
        if transient {
            Error::unavailable("the database", pg)
        } else {
            Error::internal("querying image_tasks", pg)
        }
    }
}

/// The two ways a store operation fails before classification.
enum DbError {
    Domain(Error),
    Pg(tokio_postgres::Error),
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

fn pool_error(e: PoolError) -> Error {
    match e {
        PoolError::Backend(pg) => Error::unavailable("the database", pg),
        other => Error::unavailable("the database", other.to_string()),
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
