//! What taskcast derives from the table rather than from a push: places in line, and the
//! stall sweep. Each is one statement, bounded like every other database call.
//!
//! The sweep is a conditional UPDATE, so when several nodes sweep at once the database
//! decides which one marks (or fails) a task: rows are taken `FOR UPDATE SKIP LOCKED`, and
//! the condition is checked again on the locked row, so a task another node just marked
//! no longer qualifies. The change then flows through the trigger and NOTIFY like any
//! other write.

use std::collections::HashMap;
use std::time::Duration;

use deadpool_postgres::Object;

use super::PgStore;
use crate::domain::{QueuePlace, STALL_ERROR, TaskId, TaskStatus};
use crate::error::Error;
use crate::store::shape::Shape;

/// Most tasks one sweep statement marks or fails; the rest wait for the next sweep.
const SWEEP_LIMIT: i64 = 1000;

/// What one sweep did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sweep {
    /// Tasks this node marked stalled now.
    pub marked: u64,
    /// Tasks this node failed now.
    pub failed: u64,
    /// Processing tasks marked stalled in the table after the sweep.
    pub stalled: u64,
    /// The table has no `stalled_since` column: nothing is marked.
    pub no_column: bool,
}

/// `lower(btrim(status::text))` is one of `$n`, or, for pending, NULL (read as pending).
fn status_is(prefix: &str, param: &str, pending: bool) -> String {
    let null = if pending {
        format!(" OR {prefix}status IS NULL")
    } else {
        String::new()
    };
    format!("(lower(btrim({prefix}status::text)) = ANY({param}::text[]){null})")
}

fn places_sql(shape: &Shape) -> String {
    let id_type = &shape.id_column.type_name;
    let partition = if shape.has_queue {
        "PARTITION BY queue "
    } else {
        ""
    };
    let order = if shape.has_created_at {
        "created_at, id"
    } else {
        "id"
    };
    format!(
        "SELECT id::text, pos, len FROM ( \
           SELECT id, row_number() OVER ({partition}ORDER BY {order}) AS pos, \
                  count(*) OVER ({partition}) AS len \
           FROM public.image_tasks WHERE {pending}) q \
         WHERE id = ANY($1::text[]::{id_type}[])",
        pending = status_is("", "$2", true),
    )
}

fn stall_sql() -> String {
    let processing = status_is("", "$1", false);
    let locked = status_is("t.", "$1", false);
    format!(
        "WITH due AS ( \
           SELECT id FROM public.image_tasks \
           WHERE {processing} AND stalled_since IS NULL \
             AND updated_at < now() - make_interval(secs => $2) \
             AND taskcast_version < 9223372036854775807 \
           ORDER BY updated_at LIMIT $3 FOR UPDATE SKIP LOCKED), \
         marked AS ( \
           UPDATE public.image_tasks AS t \
           SET stalled_since = now(), taskcast_version = t.taskcast_version + 1 \
           FROM due WHERE t.id = due.id AND {locked} AND t.stalled_since IS NULL \
           RETURNING t.id) \
         SELECT (SELECT count(*) FROM marked), \
                (SELECT count(*) FROM public.image_tasks \
                 WHERE {processing} AND stalled_since IS NOT NULL)",
    )
}

/// The failing UPDATE leaves the version to the trigger (status and error change).
fn fail_sql(shape: &Shape) -> String {
    let status_type = &shape.status_column.type_name;
    let processing = status_is("", "$1", false);
    let locked = status_is("t.", "$1", false);
    format!(
        "WITH due AS ( \
           SELECT id FROM public.image_tasks \
           WHERE {processing} AND updated_at < now() - make_interval(secs => $2) \
             AND taskcast_version < 9223372036854775807 \
           ORDER BY updated_at LIMIT $3 FOR UPDATE SKIP LOCKED), \
         failed AS ( \
           UPDATE public.image_tasks AS t \
           SET status = $4::text::{status_type}, error = $5 \
           FROM due WHERE t.id = due.id AND {locked} \
           RETURNING t.id) \
         SELECT count(*) FROM failed",
    )
}

impl PgStore {
    /// The places in line of those of `tasks` that are pending: one statement that
    /// numbers every pending task (per `queue` when the table has one) by `created_at`,
    /// then id, and returns only the rows asked for.
    pub async fn queue_places(
        &self,
        tasks: &[TaskId],
    ) -> Result<HashMap<TaskId, QueuePlace>, Error> {
        self.run(async |client: &mut Object| {
            let shape = self.shape(client).await?;
            let stmt = client.prepare_cached(&places_sql(&shape)).await?;
            let ids: Vec<&str> = tasks.iter().map(TaskId::as_str).collect();
            let pending = shape.words.meaning(TaskStatus::Pending);
            let rows = client.query(&stmt, &[&ids, &pending]).await?;
            Ok(rows
                .iter()
                .filter_map(|row| {
                    let id: String = row.try_get(0).ok()?;
                    let position: i64 = row.try_get(1).ok()?;
                    let length: i64 = row.try_get(2).ok()?;
                    Some((
                        TaskId::from_stored(&id)?,
                        QueuePlace {
                            position: u64::try_from(position).ok()?,
                            length: u64::try_from(length).ok()?,
                        },
                    ))
                })
                .collect())
        })
        .await
    }

    /// Marks processing tasks without a change for `after` as stalled and, with
    /// `fail_after`, fails those without a change for that long; at most
    /// [`SWEEP_LIMIT`] of each per call.
    pub async fn sweep_stalled(
        &self,
        after: Duration,
        fail_after: Option<Duration>,
    ) -> Result<Sweep, Error> {
        self.run(async |client: &mut Object| {
            let shape = self.shape(client).await?;
            let processing = shape.words.meaning(TaskStatus::Processing);
            let mut sweep = Sweep::default();
            if let Some(fail_after) = fail_after
                && let Some(word) = shape.words.word(TaskStatus::Failed)
            {
                let stmt = client.prepare_cached(&fail_sql(&shape)).await?;
                let row = client
                    .query_one(
                        &stmt,
                        &[
                            &processing,
                            &fail_after.as_secs_f64(),
                            &SWEEP_LIMIT,
                            &word,
                            &STALL_ERROR,
                        ],
                    )
                    .await?;
                sweep.failed = u64::try_from(row.try_get::<_, i64>(0)?).unwrap_or(0);
            }
            if shape.absent.contains(&"stalled_since") {
                sweep.no_column = true;
                return Ok(sweep);
            }
            let stmt = client.prepare_cached(&stall_sql()).await?;
            let row = client
                .query_one(&stmt, &[&processing, &after.as_secs_f64(), &SWEEP_LIMIT])
                .await?;
            sweep.marked = u64::try_from(row.try_get::<_, i64>(0)?).unwrap_or(0);
            let already = u64::try_from(row.try_get::<_, i64>(1)?).unwrap_or(0);
            sweep.stalled = already + sweep.marked;
            Ok(sweep)
        })
        .await
    }
}
