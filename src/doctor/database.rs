//! The database half of `taskcast doctor`: read the server, the guide's columns and the
//! functions in schema public in one pass, then judge them with pure functions.

use std::fmt::Write as _;
use std::time::Duration;

use tokio_postgres::{Client, SimpleQueryMessage, config::Host};

use super::{Checks, Env, Level, value};
use crate::domain::StatusMap;
use crate::error::{Error, cause_chain};
use crate::store::connect::{PgTarget, Verification};
use crate::store::report::{self, Finding, Severity};
use crate::store::schema::{REQUIRED_COLUMNS, missing_columns};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub(super) const MIGRATE: &str =
    "run `taskcast migrate` (or paste schema.sql into the Supabase SQL editor)";
const RECREATE: &str = "recreate it as SECURITY INVOKER: run `taskcast migrate` (schema.sql)";
/// Step 2 of the guide's 验证部署, sent exactly as the guide writes it.
const GUIDE_QUERY: &str = "SELECT \n  table_name, \n  column_name, \n  data_type \nFROM \n  \
    information_schema.columns \nWHERE \n  table_schema = 'public' \n  AND table_name = \
    'image_tasks'\n  AND column_name IN ('progress', 'stage')\nORDER BY \n  column_name;";
/// Functions in schema public (extension members aside), and who may execute them.
/// Roles are matched by oid, so a cluster without `anon` is not an error.
const FUNCTIONS_QUERY: &str = "SELECT p.proname::text, pg_catalog.oidvectortypes(p.proargtypes),
      p.prosecdef, pg_catalog.pg_get_userbyid(p.proowner)::text,
      pg_catalog.has_function_privilege('public', p.oid, 'EXECUTE'),
      ARRAY(SELECT r.rolname::text FROM pg_catalog.pg_roles r
            WHERE r.rolname IN ('anon', 'authenticated')
              AND pg_catalog.has_function_privilege(r.oid, p.oid, 'EXECUTE') ORDER BY 1)
    FROM pg_catalog.pg_proc p
    WHERE p.pronamespace = 'public'::regnamespace
      AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d WHERE d.deptype = 'e'
          AND d.classid = 'pg_catalog.pg_proc'::regclass AND d.objid = p.oid)
    ORDER BY 1, 2";

/// The database checks, or one warning when DATABASE_URL is not set.
pub(super) async fn database_checks(env: Env<'_>, out: &mut Checks) {
    let map = match StatusMap::parse(&value(env, "TASKCAST_STATUS_MAP").unwrap_or_default()) {
        Ok(map) => map,
        Err(message) => {
            out.fix(
                "status map",
                Level::Fail,
                message,
                "fix TASKCAST_STATUS_MAP",
            );
            StatusMap::default()
        }
    };
    let Some(url) = value(env, "DATABASE_URL") else {
        let message = "DATABASE_URL is not set: in-memory store, nothing survives a restart";
        return out.add("database", Level::Warn, message);
    };
    // The driver's parse error is not shown: it may quote part of the string.
    let pg = match PgTarget::parse(&url) {
        Ok(pg) => pg,
        Err(Error::Invalid { message, .. }) if message.contains("ssl") => {
            return out.add("database", Level::Fail, message);
        }
        Err(_) => {
            let message = "DATABASE_URL is not a Postgres connection string";
            return out.add("database", Level::Fail, message);
        }
    };
    let mut config = pg.config.clone();
    let password = config.get_password().map(String::from_utf8_lossy);
    let password = password.filter(|p| !p.is_empty()).map(|p| p.into_owned());
    let hide = |e: tokio_postgres::Error| match &password {
        Some(p) => cause_chain(&e).replace(p.as_str(), "***"),
        None => cause_chain(&e),
    };
    let hosts = config.get_hosts().iter().filter_map(|host| match host {
        Host::Tcp(name) => Some(name.as_str()),
        _ => None,
    });
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let target = format!("{}:{port}", hosts.collect::<Vec<_>>().join(","));
    config.connect_timeout(CONNECT_TIMEOUT);
    let connecting = tokio::time::timeout(CONNECT_TIMEOUT, config.connect(pg.tls.clone()));
    let message = match connecting.await {
        Ok(Ok((client, connection))) => {
            let driver = tokio::spawn(connection);
            let read = inspect(&client, &map, out).await;
            let read = match read {
                Ok(()) => tls_check(&client, &pg, out).await,
                Err(e) => Err(e),
            };
            driver.abort();
            match read {
                Ok(()) => return,
                Err(e) => format!("reading the catalog: {}", hide(e)),
            }
        }
        Ok(Err(e)) => format!("cannot reach {target}: {}", hide(e)),
        Err(_) => format!("no answer from {target} within 5 s"),
    };
    out.add("database", Level::Fail, message);
}

const REACHABLE: &str = "SELECT 'reachable: PostgreSQL ' || current_setting('server_version') \
    || ' as ' || current_user || ', database ' || current_database()";

/// Reads the server, the guide's columns, taskcast's columns and public's functions, then
/// judges them. Nothing is added unless every read succeeds.
async fn inspect(
    client: &Client,
    map: &StatusMap,
    out: &mut Checks,
) -> Result<(), tokio_postgres::Error> {
    let server: String = client.query_one(REACHABLE, &[]).await?.get(0);
    // The simple protocol returns text, whatever information_schema's domain types are.
    let rows = client.simple_query(GUIDE_QUERY).await?;
    let guide: Vec<(&str, &str)> = (rows.iter())
        .filter_map(|message| match message {
            SimpleQueryMessage::Row(row) => Some((row.get(1)?, row.get(2)?)),
            _ => None,
        })
        .collect();
    let missing = missing_columns(client).await?;
    let functions: Vec<Function> = (client.query(FUNCTIONS_QUERY, &[]).await?.iter())
        .map(|row| {
            let public = row.get::<_, bool>(4).then(|| "PUBLIC".to_string());
            let roles: Vec<String> = row.get(5);
            let executable_by = public.into_iter().chain(roles).collect();
            let (name, args, security_definer, owner) =
                (row.get(0), row.get(1), row.get(2), row.get(3));
            Function {
                name,
                args,
                security_definer,
                owner,
                executable_by,
            }
        })
        .collect();
    let table = report::read(client, map).await?;
    out.add("database", Level::Ok, server);
    schema_checks(&guide, &missing, out);
    table_checks(&table, out);
    function_checks(&functions, out);
    Ok(())
}

/// `progress` and `stage` as the guide's query found them (name, data_type), then the other
/// columns taskcast uses.
pub(super) fn schema_checks(guide: &[(&str, &str)], missing: &[String], out: &mut Checks) {
    let columns = [("progress", "numeric"), ("stage", "text")];
    for (name, (column, wanted)) in ["column progress", "column stage"].into_iter().zip(columns) {
        let found = guide.iter().find(|(c, _)| *c == column).map(|(_, t)| *t);
        let message = format!("image_tasks.{column} is {}", found.unwrap_or("missing"));
        match found {
            None => out.fix(name, Level::Fail, message, MIGRATE),
            Some(t) if t == wanted => out.add(name, Level::Ok, message),
            Some(_) => out.add(name, Level::Warn, message + ", not " + wanted),
        }
    }
    let others: Vec<&str> = (missing.iter().map(String::as_str))
        .filter(|c| !matches!(*c, "progress" | "stage"))
        .collect();
    let message = match others.first() {
        None => format!(
            "image_tasks has the {} columns taskcast uses",
            REQUIRED_COLUMNS.len()
        ),
        Some(table) if table.starts_with("table ") => format!("{table} does not exist"),
        Some(_) => format!("image_tasks lacks {}", others.join(", ")),
    };
    match others.is_empty() {
        true => out.add("schema", Level::Ok, message),
        false => out.fix("schema", Level::Fail, message, MIGRATE),
    }
}

const VERIFY_FULL: &str = "add sslmode=verify-full&sslrootcert=/path/to/ca.crt to DATABASE_URL \
    (on Supabase: download the CA certificate from the project's database settings)";

/// Asks the server whether this connection is encrypted (`pg_stat_ssl`), and judges it
/// with what `sslmode` checked and whether the database is on this machine.
async fn tls_check(
    client: &Client,
    pg: &PgTarget,
    out: &mut Checks,
) -> Result<(), tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await?;
    let (encrypted, version): (bool, Option<String>) =
        row.map_or((false, None), |r| (r.get(0), r.get(1)));
    tls_finding(encrypted, version.as_deref(), pg, out);
    Ok(())
}

pub(super) fn tls_finding(encrypted: bool, version: Option<&str>, pg: &PgTarget, out: &mut Checks) {
    let mode = pg.mode.as_str();
    let local = pg.is_local();
    let (level, message) = match (encrypted, pg.verification) {
        (true, Verification::Full) => (
            Level::Ok,
            format!(
                "encrypted ({}), certificate and host name verified (sslmode={mode})",
                version.unwrap_or("TLS")
            ),
        ),
        (true, Verification::Chain) => (
            if local { Level::Ok } else { Level::Warn },
            format!(
                "encrypted ({}), certificate chain verified but not the host name \
                (sslmode={mode})",
                version.unwrap_or("TLS")
            ),
        ),
        (true, Verification::None) => (
            if local { Level::Ok } else { Level::Warn },
            format!(
                "encrypted ({}), but the certificate is not verified (sslmode={mode}): a \
                machine in the middle could pose as the database",
                version.unwrap_or("TLS")
            ),
        ),
        (false, _) if local => (
            Level::Ok,
            format!("not encrypted (sslmode={mode}); the database is on this machine"),
        ),
        (false, _) => (
            Level::Warn,
            format!(
                "NOT encrypted (sslmode={mode}) and the database is not on this machine: the \
                push key's effects, tasks and the database password cross the network in \
                the clear"
            ),
        ),
    };
    match level {
        Level::Ok => out.add("tls", level, message),
        _ => out.fix("tls", level, message, VERIFY_FULL),
    }
}

/// What taskcast will do with the table's id and status types and the statuses in use
/// (the same findings `taskcast migrate` prints).
pub(super) fn table_checks(findings: &[Finding], out: &mut Checks) {
    for f in findings {
        let level = match f.severity {
            Severity::Ok => Level::Ok,
            Severity::Warn => Level::Warn,
            Severity::Fail => Level::Fail,
            Severity::Critical => Level::Critical,
        };
        match &f.fix {
            Some(fix) => out.fix(f.name, level, f.message.clone(), fix),
            None => out.add(f.name, level, f.message.clone()),
        }
    }
}

/// A function in schema public, as [`FUNCTIONS_QUERY`] describes it.
#[derive(Clone, Debug)]
pub(super) struct Function {
    pub(super) name: String,
    /// Argument types as `oidvectortypes` writes them: `text, text`.
    pub(super) args: String,
    pub(super) security_definer: bool,
    pub(super) owner: String,
    /// Which of `PUBLIC`, `anon`, `authenticated` may execute it.
    pub(super) executable_by: Vec<String>,
}

impl Function {
    fn signature(&self) -> String {
        format!("public.{}({})", self.name, self.args)
    }
}

const GUIDE_FUNCTIONS: [&str; 2] = ["execute_sql", "check_column_exists"];
const OTHER_DEFINERS: &str = "SECURITY DEFINER, so callable with their owner's rights \
    through /rest/v1/rpc/";
const NO_OTHER_DEFINERS: &str = "no other SECURITY DEFINER function in public is executable \
    by PUBLIC, anon or authenticated";
const REVOKE_OTHERS: &str =
    "REVOKE EXECUTE from PUBLIC, anon and authenticated, or make them SECURITY INVOKER";

/// The guide's `execute_sql` and `check_column_exists`, then any other SECURITY DEFINER
/// function that anyone may call through Supabase's REST API (`/rest/v1/rpc/<name>`).
pub(super) fn function_checks(functions: &[Function], out: &mut Checks) {
    let named = |name: &'static str| functions.iter().filter(move |f| f.name == name);
    named("execute_sql").for_each(|f| execute_sql(f, out));
    named("check_column_exists").for_each(|f| column_helper(f, out));
    for name in GUIDE_FUNCTIONS {
        if named(name).next().is_none() {
            out.add(name, Level::Ok, format!("public.{name} does not exist"));
        }
    }
    let others: Vec<String> = (functions.iter())
        .filter(|f| f.security_definer && !f.executable_by.is_empty())
        .filter(|f| !GUIDE_FUNCTIONS.contains(&f.name.as_str()))
        .map(|f| format!("{} (by {})", f.signature(), f.executable_by.join(", ")))
        .collect();
    match others.is_empty() {
        true => out.add("definer functions", Level::Ok, NO_OTHER_DEFINERS),
        false => {
            let message = format!("{OTHER_DEFINERS}: {}", others.join("; "));
            out.fix("definer functions", Level::Warn, message, REVOKE_OTHERS)
        }
    }
}

const ANYONE: &str = "anyone can call it through Supabase's REST API (POST /rest/v1/rpc/";

fn execute_sql(f: &Function, out: &mut Checks) {
    let signature = f.signature();
    let (level, runs) = match f.security_definer {
        true => (
            Level::Critical,
            format!("is SECURITY DEFINER: runs any SQL as {}", f.owner),
        ),
        false => (Level::Fail, "runs any SQL it is given".to_string()),
    };
    let by = match f.executable_by.join(", ") {
        by if by.is_empty() => by,
        by => format!(", and {by} may execute it"),
    };
    let message = format!("{signature} {runs}{by}: {ANYONE}execute_sql); taskcast needs none");
    let drop = format!("DROP FUNCTION IF EXISTS {signature};");
    out.fix("execute_sql", level, message, &drop);
}

fn column_helper(f: &Function, out: &mut Checks) {
    let (name, signature) = ("check_column_exists", f.signature());
    match (f.executable_by.as_slice(), f.security_definer) {
        ([], false) => out.add(name, Level::Ok, format!("{signature}: owner-only, INVOKER")),
        ([], true) => {
            let message = format!("{signature} is SECURITY DEFINER (owner-only)");
            out.fix(name, Level::Warn, message, RECREATE)
        }
        (who, definer) => {
            let revoke = |w: &String| format!("REVOKE EXECUTE ON FUNCTION {signature} FROM {w};");
            let mut fix: Vec<String> = who.iter().map(revoke).collect();
            let mut message = format!("{signature} is executable by {}", who.join(", "));
            if definer {
                let _ = write!(message, " and is SECURITY DEFINER (runs as {})", f.owner);
                fix.push(format!("then {RECREATE}"));
            }
            let message = format!("{message}: {ANYONE}check_column_exists)");
            out.fix(name, Level::Critical, message, &fix.join("\n"))
        }
    }
}
