//! schema.sql, `taskcast migrate`, and the check that the table has what taskcast needs.

use tokio_postgres::GenericClient;

use super::report::{self, Finding};
pub use super::shape::REQUIRED_COLUMNS;
use crate::domain::StatusMap;
use crate::error::Error;

/// The schema, idempotent; also shipped as `schema.sql` for the Supabase SQL editor.
pub const SCHEMA_SQL: &str = include_str!("../../schema.sql");

/// Key of the advisory lock that serializes concurrent migrations ("taskcast" in ASCII).
const MIGRATE_LOCK: i64 = 0x7461_736b_6361_7374;

/// What is missing for taskcast to work: `["table public.image_tasks"]`, or column names.
/// Reads pg_catalog, not information_schema, which hides columns the role cannot access.
pub async fn missing_columns<C: GenericClient>(
    client: &C,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let row = client
        .query_one("SELECT to_regclass('public.image_tasks') IS NOT NULL", &[])
        .await?;
    if !row.get::<_, bool>(0) {
        return Ok(vec!["table public.image_tasks".to_string()]);
    }
    let rows = client
        .query(
            "SELECT c FROM unnest($1::text[]) WITH ORDINALITY AS r(c, n) \
             WHERE NOT EXISTS (SELECT 1 FROM pg_attribute \
               WHERE attrelid = 'public.image_tasks'::regclass AND attname = r.c \
                 AND attnum > 0 AND NOT attisdropped) \
             ORDER BY n",
            &[&REQUIRED_COLUMNS],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Every column `public.image_tasks` has now (empty if the table does not exist).
async fn table_columns<C: GenericClient>(client: &C) -> Result<Vec<String>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT attname::text FROM pg_attribute \
             WHERE attrelid = to_regclass('public.image_tasks') AND attnum > 0 AND NOT attisdropped \
             ORDER BY attnum",
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// The triggers schema.sql installs on `public.image_tasks`, in the order migrate names them.
const TRIGGERS: [&str; 4] = [
    "taskcast_bump_version",
    "taskcast_notify",
    "taskcast_notify_insert",
    "taskcast_notify_delete",
];

/// The indexes schema.sql creates, in the order migrate names them.
const INDEXES: [&str; 2] = ["image_tasks_cancel_requested_at", "image_tasks_user_id_idx"];

/// Indexes an earlier schema.sql created and this one drops: the feed index on
/// `(user_id, updated_at)` kept every push from being a HOT update.
const RETIRED: [&str; 1] = ["image_tasks_user_id_updated_at_idx"];

/// Which of schema.sql's triggers, indexes and helper function exist now, by name. An index
/// counts when its name is taken in `public`, as `CREATE INDEX IF NOT EXISTS` judges it.
async fn schema_objects<C: GenericClient>(
    client: &C,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT tgname::text FROM pg_trigger \
               WHERE tgrelid = to_regclass('public.image_tasks') AND tgname::text = ANY($1::text[]) \
             UNION ALL \
             SELECT i FROM unnest($2::text[]) AS i WHERE to_regclass('public.' || i) IS NOT NULL \
             UNION ALL \
             SELECT 'check_column_exists' \
               WHERE to_regprocedure('public.check_column_exists(text,text)') IS NOT NULL",
            &[&TRIGGERS.as_slice(), &[&INDEXES[..], &RETIRED[..]].concat()],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// The functions schema.sql replaces on every run, in the order migrate names them.
const FUNCTIONS: [&str; 2] = ["taskcast_bump_version", "taskcast_notify"];

/// The definitions of schema.sql's triggers and functions as they are now, keyed
/// `trigger NAME` or `function public.NAME`: schema.sql recreates them on every run, so a
/// changed definition is what tells an upgrade from a rerun.
async fn definitions<C: GenericClient>(
    client: &C,
) -> Result<Vec<(String, String)>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT 'trigger ' || tgname::text, pg_get_triggerdef(oid) FROM pg_trigger \
               WHERE tgrelid = to_regclass('public.image_tasks') AND tgname::text = ANY($1::text[]) \
             UNION ALL \
             SELECT 'function public.' || proname::text, pg_get_functiondef(oid) FROM pg_proc \
               WHERE pronamespace = 'public'::regnamespace AND proname::text = ANY($2::text[]) \
                 AND pronargs = 0",
            &[&TRIGGERS.as_slice(), &FUNCTIONS.as_slice()],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// What migrate replaced with a different definition (an upgrade, or another channel):
/// `updated trigger taskcast_notify`, one line for triggers and one for functions.
fn updated(before: &[(String, String)], after: &[(String, String)]) -> Vec<String> {
    let changed = |key: &str| {
        let find = |defs: &[(String, String)]| {
            (defs.iter().find(|(k, _)| k == key)).map(|(_, definition)| definition.clone())
        };
        matches!((find(before), find(after)), (Some(b), Some(a)) if a != b)
    };
    let triggers: Vec<&str> = (TRIGGERS.iter().copied())
        .filter(|name| changed(&format!("trigger {name}")))
        .collect();
    let functions: Vec<String> = (FUNCTIONS.iter())
        .map(|name| format!("public.{name}"))
        .filter(|name| changed(&format!("function {name}")))
        .collect();
    let functions: Vec<&str> = functions.iter().map(String::as_str).collect();
    let mut out = Vec::new();
    for (one, many, names) in [
        ("trigger", "triggers", triggers),
        ("function", "functions", functions),
    ] {
        if !names.is_empty() {
            let kind = if names.len() == 1 { one } else { many };
            out.push(format!("updated {kind} {}", and_list(&names)));
        }
    }
    out
}

/// `a`, `a and b`, `a, b and c`.
fn and_list(names: &[&str]) -> String {
    match names.split_last() {
        None => String::new(),
        Some((last, [])) => (*last).to_string(),
        Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
    }
}

/// What migrate created (or dropped), one line per kind of object: exactly the names in
/// `after` and not in `before` (the retired ones the other way round).
fn created(before: &[String], after: &[String], channel: &str) -> Vec<String> {
    let new = |names: &[&'static str]| -> Vec<&'static str> {
        (names.iter())
            .filter(|n| after.iter().any(|a| a == *n) && !before.iter().any(|b| b == *n))
            .copied()
            .collect()
    };
    let plural = |n: usize, one: &str, many: &str| if n == 1 { one } else { many }.to_string();
    let mut out = Vec::new();
    let triggers = new(&TRIGGERS);
    if !triggers.is_empty() {
        // The bump trigger alone sends nothing.
        let sends = triggers.iter().any(|t| t.starts_with("taskcast_notify"));
        out.push(format!(
            "installed {} {}{}",
            plural(triggers.len(), "trigger", "triggers"),
            and_list(&triggers),
            if sends {
                format!(" (channel {channel})")
            } else {
                String::new()
            }
        ));
    }
    let indexes = new(&INDEXES);
    if !indexes.is_empty() {
        out.push(format!(
            "created {} {}",
            plural(indexes.len(), "index", "indexes"),
            and_list(&indexes)
        ));
    }
    let dropped: Vec<&str> = (RETIRED.iter())
        .filter(|n| before.iter().any(|b| b == *n) && !after.iter().any(|a| a == *n))
        .copied()
        .collect();
    if !dropped.is_empty() {
        out.push(format!(
            "dropped {} {} (it indexed a column every push writes, so no push could be a HOT \
             update)",
            plural(dropped.len(), "index", "indexes"),
            and_list(&dropped)
        ));
    }
    if !new(&["check_column_exists"]).is_empty() {
        out.push(
            "created function public.check_column_exists (EXECUTE revoked from PUBLIC)".to_string(),
        );
    }
    out
}

/// Checks a NOTIFY channel name: lowercase letters, digits and `_`, at most 63 bytes.
pub fn validate_channel(channel: &str) -> Result<(), Error> {
    let valid = !channel.is_empty()
        && channel.len() <= 63
        && channel
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if valid {
        Ok(())
    } else {
        Err(Error::invalid(
            "TASKCAST_NOTIFY_CHANNEL",
            format!(
                "TASKCAST_NOTIFY_CHANNEL must be 1-63 lowercase letters, digits or _, got {channel:?}"
            ),
        ))
    }
}

/// Applies schema.sql in one transaction under an advisory lock, so two nodes migrating at
/// once are safe. Returns what changed, one line each; empty when already up to date.
pub async fn migrate(database_url: &str) -> Result<Vec<String>, Error> {
    migrate_with_channel(database_url, DEFAULT_CHANNEL).await
}

/// One connection for a command (`migrate`), and the task that drives it.
async fn connect(
    database_url: &str,
) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), Error> {
    let target = super::connect::PgTarget::parse(database_url)?;
    let mut config = target.config;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(std::time::Duration::from_secs(10));
    }
    let (client, connection) = config
        .connect(target.tls)
        .await
        .map_err(|e| Error::unavailable("the database (connecting)", e))?;
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok((client, driver))
}

/// What taskcast will do with the table as it is now (see [`super::report`]).
pub async fn table_report(database_url: &str, map: &StatusMap) -> Result<Vec<Finding>, Error> {
    let (client, driver) = connect(database_url).await?;
    let read = async {
        let mut findings = report::read(&client, map).await?;
        // doctor has a fuller check of its own; migrate says it here.
        findings.extend(super::exposure::read(&client).await?.execute_sql_finding());
        Ok(findings)
    };
    let findings = read.await.map_err(|e: tokio_postgres::Error| {
        Error::unavailable("the database (reading the table)", e)
    });
    drop(client);
    let _ = driver.await;
    findings
}

/// The NOTIFY channel schema.sql installs.
pub const DEFAULT_CHANNEL: &str = "taskcast";

/// [`migrate`], with the notify trigger sending on `channel`.
pub async fn migrate_with_channel(database_url: &str, channel: &str) -> Result<Vec<String>, Error> {
    validate_channel(channel)?;
    let fail = |what: &'static str| move |e: tokio_postgres::Error| Error::unavailable(what, e);
    let (mut client, driver) = connect(database_url).await?;
    let result = async {
        let tx = client.transaction().await.map_err(fail("the database"))?;
        // IF NOT EXISTS reports every skipped step as a NOTICE; keep the output to the diff.
        tx.batch_execute("SET LOCAL client_min_messages = warning")
            .await
            .map_err(fail("the database"))?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATE_LOCK])
            .await
            .map_err(fail("the migration lock"))?;
        let columns_before = table_columns(&tx).await.map_err(fail("the catalog"))?;
        let objects_before = schema_objects(&tx).await.map_err(fail("the catalog"))?;
        let definitions_before = definitions(&tx).await.map_err(fail("the catalog"))?;
        tx.batch_execute(SCHEMA_SQL)
            .await
            .map_err(|e| Error::internal("applying schema.sql", e))?;
        if channel != DEFAULT_CHANNEL {
            // The channel was validated above, so it can be quoted as a literal safely.
            tx.batch_execute(&format!(
                "DROP TRIGGER taskcast_notify ON public.image_tasks; \
                 CREATE TRIGGER taskcast_notify AFTER UPDATE ON public.image_tasks \
                 REFERENCING NEW TABLE AS new_rows \
                 FOR EACH STATEMENT EXECUTE FUNCTION public.taskcast_notify('{channel}'); \
                 DROP TRIGGER taskcast_notify_insert ON public.image_tasks; \
                 CREATE TRIGGER taskcast_notify_insert AFTER INSERT ON public.image_tasks \
                 REFERENCING NEW TABLE AS new_rows \
                 FOR EACH STATEMENT EXECUTE FUNCTION public.taskcast_notify('{channel}'); \
                 DROP TRIGGER taskcast_notify_delete ON public.image_tasks; \
                 CREATE TRIGGER taskcast_notify_delete AFTER DELETE ON public.image_tasks \
                 REFERENCING OLD TABLE AS old_rows \
                 FOR EACH STATEMENT EXECUTE FUNCTION public.taskcast_notify('{channel}')"
            ))
            .await
            .map_err(|e| Error::internal("installing the notify trigger", e))?;
        }
        let columns_after = table_columns(&tx).await.map_err(fail("the catalog"))?;
        let objects_after = schema_objects(&tx).await.map_err(fail("the catalog"))?;
        let definitions_after = definitions(&tx).await.map_err(fail("the catalog"))?;
        tx.commit().await.map_err(fail("the database (commit)"))?;

        let mut changes = Vec::new();
        if columns_before.is_empty() {
            changes.push("created table public.image_tasks".to_string());
        } else {
            changes.extend(
                columns_after
                    .iter()
                    .filter(|c| !columns_before.contains(c))
                    .map(|c| format!("added column {c}")),
            );
        }
        if channel != DEFAULT_CHANNEL {
            changes.push(format!("notify trigger sends on channel {channel}"));
        }
        changes.extend(created(&objects_before, &objects_after, channel));
        changes.extend(updated(&definitions_before, &definitions_after));
        Ok(changes)
    }
    .await;
    drop(client);
    let _ = driver.await;
    result
}
