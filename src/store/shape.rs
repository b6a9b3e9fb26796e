//! The table as it is: the types of `public.image_tasks`' columns, read from the catalog,
//! and the statements that read and write a table of that shape.
//!
//! Every column is read in a form that cannot fail on its value (`::text`, `left(...)`,
//! `date_part('epoch', ...)`), so one odd row never fails a query that reads others; the
//! domain renders the values ([`crate::domain::StoredRow`]). Ids and statuses are bound as
//! text and cast to the column's own type, so uuid, integer and text ids, and text and
//! enum statuses, take the same statements.

use tokio_postgres::GenericClient;

use crate::domain::{
    IdKind, MAX_ERROR_CHARS, MAX_IMAGE_URL_CHARS, MAX_STAGE_CHARS, ProgressUpdate, StatusMap,
    StatusWords, TaskStatus,
};
use crate::error::Error;

/// Every column of `public.image_tasks` that taskcast reads or writes.
pub const REQUIRED_COLUMNS: &[&str] = &[
    "id",
    "user_id",
    "prompt",
    "status",
    "progress",
    "stage",
    "image_url",
    "error",
    "updated_at",
    "taskcast_version",
    "taskcast_seq",
];

/// Columns taskcast reads when the table has them; a push that sets one needs it, and a
/// cancel request needs [`CANCEL_COLUMN`]. `stalled_since` is never set by a push: the
/// stall sweep sets it, a push clears it.
pub const OPTIONAL_COLUMNS: &[&str] = &[
    "step",
    "total_steps",
    "preview_url",
    "stalled_since",
    CANCEL_COLUMN,
];

/// When a subscriber asked to cancel the task; set only by a cancel request.
pub const CANCEL_COLUMN: &str = "cancel_requested_at";

/// Every column of the table with its type: name, `regtype` text (safe to paste into a
/// cast: Postgres quotes it as needed), `typtype`, `typcategory`, enum labels in order.
const COLUMNS_QUERY: &str = "SELECT a.attname::text, a.atttypid::regtype::text, t.typtype::text, \
       t.typcategory::text, \
       ARRAY(SELECT e.enumlabel::text FROM pg_catalog.pg_enum e \
             WHERE e.enumtypid = t.oid ORDER BY e.enumsortorder), \
       COALESCE((SELECT c.collisdeterministic FROM pg_catalog.pg_collation c \
                 WHERE c.oid = a.attcollation), true) \
     FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_type t ON t.oid = a.atttypid \
     WHERE a.attrelid = to_regclass('public.image_tasks') AND a.attnum > 0 \
       AND NOT a.attisdropped ORDER BY a.attnum";

/// One column as the catalog describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    /// The type as `regtype` prints it: `uuid`, `bigint`, `character varying`, `image_status`.
    pub type_name: String,
    pub is_enum: bool,
    /// `typcategory`: `S` string, `N` numeric, `U` user-defined, ...
    pub category: String,
    pub labels: Vec<String>,
    /// Its collation compares bytes (false for a case-insensitive collation).
    pub deterministic: bool,
}

/// What taskcast knows about the table, and the statements built for it.
#[derive(Debug)]
pub struct Shape {
    pub id: IdKind,
    pub id_column: Column,
    pub status_column: Column,
    pub user_column: Column,
    pub statuses: StatusMap,
    pub words: StatusWords,
    pub sql: Statements,
    /// The [`OPTIONAL_COLUMNS`] the table lacks: read as `NULL`, and a push that sets one
    /// is refused.
    pub absent: Vec<&'static str>,
    /// The table has a `queue` column: places in line are counted per queue.
    pub has_queue: bool,
    /// The table has `created_at`, the order of the line (else ids alone order it).
    pub has_created_at: bool,
}

/// The statements for one shape. `$1` is always ids as text, except in [`Statements::apply`]
/// and [`Statements::apply_open`] on a uuid id column, which take them as `uuid[]`.
#[derive(Debug)]
pub struct Statements {
    pub get: String,
    pub get_many: String,
    pub owner: String,
    /// A user's feed snapshot: `$1` the user id as text, `$2` [`StatusWords::open`],
    /// `$3` how many unfinished, `$4` how many finished tasks, each newest first. SQL only
    /// sorts rows into the two parts; Rust decides what is finished (see
    /// [`crate::store::Store::user_tasks`]).
    pub feed: String,
    pub create: String,
    pub lock: String,
    /// The push statement: `$1`–`$10` the pushes' columns, `$11` `'on'` to skip the
    /// NOTIFY (see `crate::store::Quiet`).
    pub apply: String,
    /// [`Statements::apply`] narrowed by the push rules; `$12` is [`StatusWords::open`].
    pub apply_open: String,
    /// The cancel request (`None` without [`CANCEL_COLUMN`]): one conditional UPDATE that
    /// sets it on an unfinished task not yet asked, then the row (read columns plus
    /// whether this statement set it). `$2` is [`StatusWords::finished`].
    pub cancel: Option<String>,
    /// The grace-period sweep (`None` without [`CANCEL_COLUMN`]): marks cancelled the
    /// unfinished tasks asked to cancel more than `$1` seconds ago (and less than a day
    /// before that); `$2` is [`StatusWords::finished`], `$3` the word for cancelled.
    pub cancel_overdue: Option<String>,
}

/// Reads the table's columns; empty when the table does not exist.
pub async fn columns<C: GenericClient>(client: &C) -> Result<Vec<Column>, tokio_postgres::Error> {
    let rows = client.query(COLUMNS_QUERY, &[]).await?;
    Ok(rows
        .iter()
        .map(|row| Column {
            name: row.get(0),
            type_name: row.get(1),
            is_enum: row.get::<_, String>(2) == "e",
            category: row.get(3),
            labels: row.get(4),
            deterministic: row.get(5),
        })
        .collect())
}

impl Shape {
    /// Judges the columns: which id kind, which status words, or why the table cannot be
    /// served (a missing column, an id or status of a type taskcast cannot bind).
    pub fn new(columns: &[Column], statuses: &StatusMap) -> Result<Shape, Error> {
        if columns.is_empty() {
            return Err(Error::SchemaMissing {
                missing: vec!["table public.image_tasks".to_string()],
            });
        }
        let find = |name: &str| columns.iter().find(|c| c.name == name);
        let missing: Vec<String> = REQUIRED_COLUMNS
            .iter()
            .filter(|name| find(name).is_none())
            .map(|name| name.to_string())
            .collect();
        if !missing.is_empty() {
            return Err(Error::SchemaMissing { missing });
        }
        let column = |name: &str| find(name).expect("checked above").clone();
        let (id_column, status_column, user_column) =
            (column("id"), column("status"), column("user_id"));
        let id = id_kind(&id_column)?;
        let words = if status_column.is_enum {
            StatusWords::for_enum(statuses, &status_column.labels)
        } else if status_column.category == "S" {
            StatusWords::for_text(statuses)
        } else {
            return Err(Error::TableUnsupported(format!(
                "image_tasks.status is {}; taskcast serves text, varchar and enum statuses \
                 (ALTER TABLE public.image_tasks ALTER COLUMN status TYPE text)",
                status_column.type_name
            )));
        };
        let absent: Vec<&'static str> = OPTIONAL_COLUMNS
            .iter()
            .copied()
            .filter(|name| find(name).is_none())
            .collect();
        let present: Vec<Column> = OPTIONAL_COLUMNS
            .iter()
            .filter_map(|name| find(name).cloned())
            .collect();
        let sql = Statements::new(
            &id_column,
            &status_column,
            &user_column,
            &words,
            (&absent, &present),
        );
        Ok(Shape {
            id,
            id_column,
            status_column,
            user_column,
            statuses: statuses.clone(),
            words,
            sql,
            absent,
            has_queue: find("queue").is_some(),
            has_created_at: find("created_at").is_some(),
        })
    }

    /// Refuses a cancel request when the table has no [`CANCEL_COLUMN`].
    pub fn check_cancel(&self) -> Result<(), Error> {
        if self.absent.contains(&CANCEL_COLUMN) {
            Err(Error::SchemaMissing {
                missing: vec![format!("column {CANCEL_COLUMN} (needed to cancel a task)")],
            })
        } else {
            Ok(())
        }
    }

    /// Refuses a push that sets a column the table lacks, naming it.
    pub fn check_columns(&self, update: &ProgressUpdate) -> Result<(), Error> {
        let missing: Vec<String> = update
            .optional_columns()
            .filter(|name| self.absent.contains(name))
            .map(|name| format!("column {name} (needed by a push that sets {name})"))
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(Error::SchemaMissing { missing })
        }
    }

    /// The word to store for `status`, or why the column cannot hold it.
    pub fn word(&self, status: TaskStatus) -> Result<&str, Error> {
        self.words
            .word(status)
            .ok_or_else(|| Error::StatusNotStorable {
                status: status.as_str(),
                column: format!("enum {}", self.status_column.type_name),
            })
    }
}

/// The id kinds taskcast serves, by the column's type.
fn id_kind(column: &Column) -> Result<IdKind, Error> {
    let integer = |min: i64, max: i64| Ok(IdKind::Integer { min, max });
    match column.type_name.as_str() {
        "uuid" => Ok(IdKind::Uuid),
        "smallint" => integer(i16::MIN.into(), i16::MAX.into()),
        "integer" => integer(i32::MIN.into(), i32::MAX.into()),
        "bigint" => Ok(IdKind::BIGINT),
        // Ids are matched and keyed by their exact text: a type or collation that calls
        // `Job-1` and `job-1` the same id (citext, a case-insensitive collation) would make
        // answers and subscriptions miss their rows.
        "text" | "character varying" | "character" if column.deterministic => Ok(IdKind::Text),
        other => Err(Error::TableUnsupported(format!(
            "image_tasks.id is {other}{}; taskcast serves uuid, smallint, integer, bigint, \
             and text or varchar ids with a deterministic collation",
            if column.deterministic {
                ""
            } else {
                " with a case-insensitive collation"
            }
        ))),
    }
}

/// The columns read into a `StoredRow`, each in a form that cannot fail; `t` prefixes them.
/// An optional column the table lacks (in `absent`) reads as `NULL`.
fn read_columns(t: &str, absent: &[&str]) -> String {
    let optional = |name: &str| {
        // The two timestamps are read as epoch seconds, like updated_at.
        let epoch = name == "stalled_since" || name == CANCEL_COLUMN;
        if absent.contains(&name) && epoch {
            "NULL::float8".to_string()
        } else if absent.contains(&name) {
            "NULL::text".to_string()
        } else if epoch {
            format!("date_part('epoch', {t}{name})")
        } else if name == "preview_url" {
            capped(&format!("{t}{name}"), MAX_IMAGE_URL_CHARS + 1)
        } else {
            format!("{t}{name}::text")
        }
    };
    format!(
        "{t}id::text, {t}progress::text, {stage}, {t}status::text, \
         {t}taskcast_version::int8, date_part('epoch', {t}updated_at), {url}, {error}, \
         {t}taskcast_seq::int8, {t}user_id::text, {step}, {total_steps}, {preview_url}, \
         {stalled_since}, {cancel}",
        stage = capped(&format!("{t}stage"), MAX_STAGE_CHARS + 1),
        url = capped(&format!("{t}image_url"), MAX_IMAGE_URL_CHARS + 1),
        error = capped(&format!("{t}error"), MAX_ERROR_CHARS + 1),
        step = optional("step"),
        total_steps = optional("total_steps"),
        preview_url = optional("preview_url"),
        stalled_since = optional("stalled_since"),
        cancel = optional(CANCEL_COLUMN),
    )
}

/// `column` as text, cut to `chars` characters. `left()` counts characters one by one
/// (a fifth of the push statement's RETURNING cost for an 80-byte stage), so it runs only
/// on a value of more than `chars` bytes: one of at most `chars` bytes has at most `chars`
/// characters, and `octet_length` reads the length without reading the value.
fn capped(column: &str, chars: usize) -> String {
    format!(
        "CASE WHEN octet_length({column}::text) <= {chars} THEN {column}::text \
         ELSE left({column}::text, {chars}) END"
    )
}

/// The SET clauses for the optional columns the table has (`present`), from the update's
/// `u.step`, `u.total_steps` and `u.preview_url` (`''` clears the preview), each cast to
/// the column's own type.
fn set_optional(present: &[Column]) -> String {
    present
        .iter()
        .filter(|column| column.name != CANCEL_COLUMN)
        .map(|column| {
            let (name, type_name) = (&column.name, &column.type_name);
            if name == "stalled_since" {
                // A change clears the stall mark (see crate::stall).
                format!("{name} = NULL, ")
            } else if name == "preview_url" {
                format!(
                    "{name} = CASE WHEN u.{name} = '' THEN NULL \
                     ELSE COALESCE(u.{name}::{type_name}, t.{name}) END, "
                )
            } else {
                format!("{name} = COALESCE(u.{name}::{type_name}, t.{name}), ")
            }
        })
        .collect()
}

impl Statements {
    fn new(
        id: &Column,
        status: &Column,
        user: &Column,
        words: &StatusWords,
        (absent, present): (&[&str], &[Column]),
    ) -> Self {
        let (id_type, status_type, user_type) = (&id.type_name, &status.type_name, &user.type_name);
        let columns = read_columns("", absent);
        let optional = set_optional(present);
        let from = "FROM public.image_tasks";
        let one = format!("id = $1::text::{id_type}");
        let many = format!("id = ANY($1::text[]::{id_type}[])");
        // Without a word for pending (an enum without one), the column's default applies.
        let create = match words.word(TaskStatus::Pending) {
            Some(_) => format!(
                "INSERT INTO public.image_tasks (prompt, user_id, status) \
                 VALUES ($1, $2::text::{user_type}, $3::text::{status_type}) RETURNING {columns}"
            ),
            None => format!(
                "INSERT INTO public.image_tasks (prompt, user_id) \
                 VALUES ($1, $2::text::{user_type}) RETURNING {columns}"
            ),
        };
        // The ids as the column's own type, cast once: uuid ids are bound as uuid (binary,
        // see `crate::store::postgres`), the others as text. `t.id = ANY(...)` keeps the plan
        // on the primary key whatever the table's statistics say (without it, a table not
        // yet analyzed is read whole for every statement). `FROM unnest(a, b, ...)` copies
        // each array into a store of its own first, and one `unnest` per array in a
        // subquery's select list would not (7 % of the statement at 26 rows), but
        // without statistics Postgres then joins by a nested loop that runs the subquery
        // again for every row (in the bench: 51 µs of Postgres CPU per push, against 15 for
        // this form in the run before).
        let ids = match id_type.as_str() {
            "uuid" => "$1::uuid[]".to_string(),
            _ => format!("$1::text[]::{id_type}[]"),
        };
        // `$11` is 'on' while the node is alone on the database (see
        // `crate::store::Quiet`): the `taskcast_notify` trigger then skips the statement.
        // A materialized CTE the UPDATE joins is run once, before any row is written.
        let apply = |extra: &str| {
            format!(
                "WITH quiet AS MATERIALIZED (SELECT set_config('taskcast.quiet', $11, true)) \
                 UPDATE public.image_tasks AS t SET \
                   progress = COALESCE(u.progress::numeric, t.progress), \
                   stage = COALESCE(u.stage, t.stage), \
                   status = COALESCE(u.status::{status_type}, t.status), \
                   image_url = COALESCE(u.image_url, t.image_url), \
                   error = COALESCE(u.error, t.error), \
                   taskcast_seq = COALESCE(u.seq, t.taskcast_seq), {optional}\
                   taskcast_version = t.taskcast_version + 1, \
                   updated_at = now() \
                 FROM unnest({ids}, $2::text[], $3::text[], $4::text[], $5::int8[], \
                             $6::text[], $7::text[], $8::int8[], $9::int8[], $10::text[]) \
                   AS u(id, progress, stage, status, seq, image_url, error, step, \
                        total_steps, preview_url), quiet \
                 WHERE t.id = u.id AND t.id = ANY({ids}){extra} \
                 RETURNING {}",
                read_columns("t.", absent)
            )
        };
        // Finished is a deny-list of words (see StatusWords::finished), compared as Rust
        // reads them: trimmed, ASCII case ignored.
        let open = "(t.status IS NULL OR NOT lower(btrim(t.status::text, E' \\t\\n\\r\\f\\013')) \
                    = ANY($2::text[])) AND t.taskcast_version < 9223372036854775807";
        let has_cancel = !absent.contains(&CANCEL_COLUMN);
        let cancel = has_cancel.then(|| {
            format!(
                "WITH requested AS (\
                   UPDATE public.image_tasks AS t SET cancel_requested_at = now(), \
                     taskcast_version = t.taskcast_version + 1 \
                   WHERE t.{one} AND t.cancel_requested_at IS NULL AND {open} \
                   RETURNING {}, true) \
                 SELECT * FROM requested UNION ALL \
                 SELECT {columns}, false {from} WHERE {one} \
                   AND NOT EXISTS (SELECT 1 FROM requested)",
                read_columns("t.", absent)
            )
        });
        let cancel_overdue = has_cancel.then(|| {
            format!(
                "UPDATE public.image_tasks AS u SET status = $3::text::{status_type}, \
                   taskcast_version = u.taskcast_version + 1, updated_at = now() \
                 FROM (SELECT t.id FROM public.image_tasks AS t \
                       WHERE t.cancel_requested_at < now() - make_interval(secs => $1) \
                         AND t.cancel_requested_at > now() - make_interval(secs => $1) \
                                                       - interval '1 day' \
                         AND {open} \
                       ORDER BY t.id LIMIT 500 FOR UPDATE SKIP LOCKED) AS due \
                 WHERE u.id = due.id \
                 RETURNING {}",
                read_columns("u.", absent)
            )
        });
        Statements {
            cancel,
            cancel_overdue,
            get: format!("SELECT {columns} {from} WHERE {one}"),
            get_many: format!("SELECT {columns} {from} WHERE {many}"),
            owner: format!("SELECT user_id::text {from} WHERE {one}"),
            feed: {
                let user = format!("user_id = $1::text::{user_type}");
                let open = "(status IS NULL OR lower(status::text) = ANY($2::text[]))";
                let newest = "ORDER BY updated_at DESC, id DESC";
                format!(
                    "(SELECT {columns} {from} WHERE {user} AND {open} {newest} LIMIT $3) \
                     UNION ALL \
                     (SELECT {columns} {from} WHERE {user} AND NOT {open} {newest} LIMIT $4)"
                )
            },
            create,
            lock: format!("SELECT {columns} {from} WHERE {many} ORDER BY id FOR UPDATE"),
            apply: apply(""),
            // The rules of `TaskRow::decide` that SQL can check: the status is a word known
            // to be open (anything else, NULL included, takes the locked path), the version
            // can grow, and the push's seq is new.
            // The exact word first: `lower()` costs more than the rest of the WHERE clause,
            // and a status stored in lowercase (the usual case) needs no more.
            apply_open: apply(
                " AND (t.status::text = ANY($12::text[]) \
                       OR lower(t.status::text) = ANY($12::text[])) \
                  AND t.taskcast_version < 9223372036854775807 \
                  AND (u.seq IS NULL OR t.taskcast_seq IS NULL OR u.seq > t.taskcast_seq)",
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn column(name: &str, type_name: &str, category: &str) -> Column {
        Column {
            name: name.to_string(),
            type_name: type_name.to_string(),
            is_enum: false,
            category: category.to_string(),
            labels: Vec::new(),
            deterministic: true,
        }
    }

    fn table(id: Column, status: Column) -> Vec<Column> {
        let mut columns = vec![id, status];
        for name in REQUIRED_COLUMNS
            .iter()
            .filter(|n| !["id", "status"].contains(n))
        {
            columns.push(column(name, "text", "S"));
        }
        columns
    }

    #[test]
    fn id_types_decide_the_id_kind() {
        let status = column("status", "text", "S");
        let kind = |type_name: &str, category: &str| {
            Shape::new(
                &table(column("id", type_name, category), status.clone()),
                &StatusMap::default(),
            )
            .map(|shape| shape.id)
        };
        assert_eq!(kind("uuid", "U").unwrap(), IdKind::Uuid);
        assert_eq!(kind("bigint", "N").unwrap(), IdKind::BIGINT);
        assert!(matches!(
            kind("integer", "N").unwrap(),
            IdKind::Integer {
                max: 2147483647,
                ..
            }
        ));
        assert_eq!(kind("character varying", "S").unwrap(), IdKind::Text);
        assert!(
            kind("citext", "S").is_err(),
            "citext ids compare case-insensitively"
        );
        let message = kind("numeric", "N").unwrap_err().to_string();
        assert!(message.contains("image_tasks.id is numeric"), "{message}");
    }

    #[test]
    fn an_enum_without_a_label_for_a_status_says_which() {
        let mut status = column("status", "image_status", "E");
        status.is_enum = true;
        status.labels = ["queued", "running", "done", "failed"]
            .map(String::from)
            .to_vec();
        let shape = Shape::new(
            &table(column("id", "bigint", "N"), status),
            &StatusMap::default(),
        )
        .unwrap();
        assert_eq!(shape.word(TaskStatus::Completed).unwrap(), "done");
        let message = shape.word(TaskStatus::Cancelled).unwrap_err().to_string();
        assert!(
            message.contains("enum image_status") && message.contains("cancelled"),
            "{message}"
        );
        assert!(shape.sql.apply.contains("u.status::image_status"));
        assert!(shape.sql.get.contains("id = $1::text::bigint"));
    }

    #[test]
    fn a_missing_column_is_named() {
        let mut columns = table(column("id", "uuid", "U"), column("status", "text", "S"));
        columns.retain(|c| c.name != "taskcast_seq");
        match Shape::new(&columns, &StatusMap::default()) {
            Err(Error::SchemaMissing { missing }) => assert_eq!(missing, ["taskcast_seq"]),
            other => panic!("{other:?}"),
        }
    }
}
