//! The write path of the Postgres store: a batch of pushes committed as one autocommit
//! `UPDATE ... FROM unnest(...)` for the pushes the push rules allow, then the locked path
//! (`FOR UPDATE` in id order, each push decided in Rust) for the ones it left alone.

use std::collections::HashMap;

use deadpool_postgres::Object;
use tokio::time::Instant;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use super::{DbError, PgStore, decode};
use crate::domain::{Decision, IdKind, Outcome, ProgressUpdate, TaskId};
use crate::error::Error;
use crate::store::BatchResult;
use crate::store::bounded::{self, Late};
use crate::store::shape::Shape;

impl PgStore {
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
        // Read once per batch, after the writer counted the commit in flight (see
        // `Quiet::is_on`).
        let quiet = self.quiet.is_on();
        let result = bounded::run(
            &self.pool,
            &self.tls,
            deadline,
            async |client: &mut Object| self.try_apply_batch(client, batch, quiet).await,
        )
        .await;
        let result = match result {
            Ok(results) => Ok(results),
            Err(e) => Err(self.classify_write(e).await),
        };
        if quiet {
            // No notification tells the listener about these: it reads them again, as it
            // would have on one (a commit whose answer was lost, a row it cannot read).
            let unclean = batch.iter().enumerate().filter(|(index, _)| match &result {
                Ok(results) => results[*index].as_ref().is_err_and(may_hide_a_commit),
                Err(e) => may_hide_a_commit(e),
            });
            let unclean: Vec<TaskId> = unclean.map(|(_, (task, _))| *task).collect();
            if !unclean.is_empty() {
                // Once now, and once more when a commit the server had not finished when
                // the answer was given up on must have ended (cancelled or committed).
                self.quiet.recheck(unclean.iter().copied());
                let (quiet, late) = (self.quiet.clone(), self.timeout * 2);
                tokio::spawn(async move {
                    tokio::time::sleep(late).await;
                    quiet.recheck(unclean);
                });
            }
        }
        result
    }

    async fn try_apply_batch(
        &self,
        client: &mut Object,
        batch: &[(TaskId, ProgressUpdate)],
        quiet: bool,
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
        for (index, (id, update)) in batch.iter().enumerate() {
            if let Some(status) = update.status()
                && let Err(e) = shape.word(status)
            {
                results[index] = Some(Err(e));
            } else if let Err(e) = shape.check_columns(update) {
                results[index] = Some(Err(e));
            } else if shape.id == IdKind::Uuid && id.as_uuid().is_none() {
                // Ids are parsed by the table's kind, but the table may have changed since:
                // no row of a uuid column has this id.
                results[index] = Some(Err(Error::NotFound(id.to_string())));
            }
        }
        // In id order, so concurrent statements from two nodes lock rows in one order.
        let mut order: Vec<usize> = (0..batch.len()).filter(|&i| results[i].is_none()).collect();
        order.sort_by_key(|&i| batch[i].0);

        let quiet = if quiet { "on" } else { "off" };
        if !order.is_empty() {
            let apply_open = client.prepare_cached(&shape.sql.apply_open).await?;
            let columns = Columns::new(batch, &order, &shape);
            let open = shape.words.open();
            let mut params = columns.params();
            params.push(&quiet);
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
            match apply_locked(client, &shape, batch, &rest, quiet).await {
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
}

/// The locked path for the pushes at `indices` (in id order): lock their rows, decide each
/// with [`TaskRow::decide`], write the applied ones with one statement, commit.
async fn apply_locked(
    client: &mut Object,
    shape: &Shape,
    batch: &[(TaskId, ProgressUpdate)],
    indices: &[usize],
    quiet: &str,
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
        let mut params = columns.params();
        params.push(&quiet);
        let mut applied = HashMap::with_capacity(to_apply.len());
        for row in tx.query(&apply, &params).await? {
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

/// The UPDATE's input arrays for the pushes at some indices of a batch, as text except
/// uuid ids (statuses, and other ids, are cast to the column's type in SQL). Text columns
/// borrow from the batch; only `progress` is formatted.
struct Columns<'a> {
    ids: Ids<'a>,
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

/// `$1` of the apply statements: binary uuids for a uuid column (Postgres would parse
/// each text id once per use), else the ids' text.
enum Ids<'a> {
    Uuid(Vec<Uuid>),
    Text(Vec<&'a str>),
}

impl<'a> Columns<'a> {
    /// `indices` hold only pushes whose status the shape can store and, on a uuid table,
    /// whose id is a uuid.
    fn new(batch: &'a [(TaskId, ProgressUpdate)], indices: &[usize], shape: &'a Shape) -> Self {
        let updates = || indices.iter().map(|&i| &batch[i].1);
        let ids = || indices.iter().map(|&i| &batch[i].0);
        Columns {
            ids: match shape.id {
                IdKind::Uuid => Ids::Uuid(ids().filter_map(TaskId::as_uuid).collect()),
                _ => Ids::Text(ids().map(TaskId::as_str).collect()),
            },
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
            match &self.ids {
                Ids::Uuid(ids) => ids,
                Ids::Text(ids) => ids,
            },
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

/// An outcome after which the row may hold a commit nobody was told of: unknown, or a
/// database fault (the locked path's later statements), or a row not readable back.
/// Refusals (not found, finished, invalid) changed nothing.
fn may_hide_a_commit(e: &Error) -> bool {
    matches!(
        e,
        Error::CommitUnknown { .. }
            | Error::Unavailable { .. }
            | Error::Internal { .. }
            | Error::UnreadableRow { .. }
    )
}

/// A statement that lost a lock race (deadlock or serialization failure) and changed
/// nothing; the locked path takes its pushes.
fn is_contention(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| {
        *c == SqlState::T_R_DEADLOCK_DETECTED || *c == SqlState::T_R_SERIALIZATION_FAILURE
    })
}
