//! `taskcast doctor`: the deployment guide's "verify deployment" steps as one command.
//!
//! Each check is one line: ok, warn, fail, or CRITICAL (a failing level kept for database
//! functions that let anyone run SQL). Configuration is judged by pure functions of the
//! environment; the database is read in one pass ([`inspect`]) and judged by pure functions
//! too. No check prints a secret's value, not even a prefix: only names, sources, lengths.

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;
use tokio_postgres::{NoTls, SimpleQueryMessage, config::Host};

use crate::auth::{KeySource, MIN_KEY_CHARS, PushKey};
use crate::config::{is_production, parse_origin};
use crate::store::schema::{REQUIRED_COLUMNS, missing_columns};

type Env<'a> = &'a (dyn Fn(&str) -> Option<String> + Sync);

/// The variables the guide and taskcast read; doctor says which are set, never a value.
const RELEVANT_VARS: &str = "TASK_PROCESS_SECRET_KEY TASK_PROCESS_SECRET_KEY_PREVIOUS \
    INTERNAL_API_KEY API_SECRET_KEY OPENAI_API_KEY NEXT_PUBLIC_APP_URL DATABASE_URL \
    TASKCAST_SUBSCRIBE_SECRET SUPABASE_JWT_SECRET TASKCAST_PUBLIC_SUBSCRIBE \
    TASKCAST_ALLOWED_ORIGINS NODE_ENV APP_ENV";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const MIGRATE: &str = "run `taskcast migrate` (or paste schema.sql into the Supabase SQL editor)";
const NEW_KEY: &str = "set TASK_PROCESS_SECRET_KEY to at least 32 random characters \
    (`openssl rand -hex 16`), the same value in the generator and in taskcast";
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

/// How bad a finding is. `Fail` and `Critical` fail the report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warn,
    Fail,
    Critical,
}

impl Level {
    fn label(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Warn => "warn",
            Level::Fail => "fail",
            Level::Critical => "CRITICAL",
        }
    }
}

/// One line of the report, and what to do about it.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub level: Level,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    fn new(name: &'static str, level: Level, message: impl Into<String>) -> Self {
        let message = message.into();
        Check {
            name,
            level,
            message,
            fix: None,
        }
    }

    fn fix(mut self, fix: impl Into<String>) -> Self {
        self.fix = Some(fix.into());
        self
    }
}

/// The outcome of all checks, in the order they ran.
pub struct Report {
    checks: Vec<Check>,
}

impl Report {
    pub fn checks(&self) -> &[Check] {
        &self.checks
    }

    /// True when any check is fail or CRITICAL: the command exits non-zero.
    pub fn failed(&self) -> bool {
        self.checks.iter().any(|c| c.level >= Level::Fail)
    }

    /// Aligned columns (level, name, message), a `fix:` block under a check that has one,
    /// then the counts.
    pub fn render_text(&self) -> String {
        let width = |f: fn(&Check) -> usize| self.checks.iter().map(f).max().unwrap_or(0) + 2;
        let (level_w, name_w) = (width(|c| c.level.label().len()), width(|c| c.name.len()));
        let mut out = String::new();
        for c in &self.checks {
            let (level, name) = (c.level.label(), c.name);
            let _ = writeln!(out, "{level:level_w$}{name:name_w$}{}", c.message);
            for (i, line) in c.fix.iter().flat_map(|f| f.lines()).enumerate() {
                let tag = if i == 0 { "fix: " } else { "     " };
                let _ = writeln!(out, "{:1$}{tag}{line}", "", level_w + name_w);
            }
        }
        let count = |keep: fn(Level) -> bool| self.checks.iter().filter(|c| keep(c.level)).count();
        let (ok, warn) = (count(|l| l == Level::Ok), count(|l| l == Level::Warn));
        let (fail, critical) = (count(|l| l >= Level::Fail), count(|l| l == Level::Critical));
        let _ = write!(out, "\n{ok} ok, {warn} warn, {fail} fail");
        if critical > 0 {
            let _ = write!(out, " ({critical} CRITICAL)");
        }
        out + "\n"
    }

    /// `{"ok": bool, "checks": [{"name", "level", "message", "fix"?}]}`.
    pub fn to_json(&self) -> String {
        serde_json::json!({ "ok": !self.failed(), "checks": self.checks }).to_string()
    }
}

/// Runs every check, reading configuration through `env`.
pub async fn run(env: &(dyn Fn(&str) -> Option<String> + Sync)) -> Report {
    let mut checks = config_checks(env);
    checks.extend(database_checks(env).await);
    Report { checks }
}

/// A variable's value without surrounding whitespace; blank counts as unset, as in serve.
fn value(env: Env, name: &str) -> Option<String> {
    env(name)
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// What serve refuses in production is a fail there, and a warning in development.
fn refused(production: bool) -> (Level, &'static str) {
    match production {
        true => (Level::Fail, "; taskcast serve refuses to start"),
        false => (Level::Warn, "; refused in production"),
    }
}

/// The checks that need only the environment.
fn config_checks(env: Env) -> Vec<Check> {
    let production = is_production(env);
    let vars = || RELEVANT_VARS.split_whitespace();
    let set: Vec<&str> = vars().filter(|v| value(env, v).is_some()).collect();
    let blank: Vec<&str> = vars()
        .filter(|v| env(v).is_some() && value(env, v).is_none())
        .collect();
    let mut message = match production {
        true => "production; set: ".to_string(),
        false => "development (NODE_ENV/APP_ENV is not production); set: ".to_string(),
    };
    message += &[set.join(", ")].concat();
    if !blank.is_empty() {
        let _ = write!(message, "; blank, so unset: {}", blank.join(", "));
    }
    let mut checks = vec![Check::new("environment", Level::Ok, message)];
    checks.extend(origins(env));
    checks.extend(push_key(env, production));
    checks.extend(subscribers(env, production));
    checks
}

const NO_APP_URL: &str = "NEXT_PUBLIC_APP_URL is not set (the guide: it must be); browsers get \
    403 unless TASKCAST_ALLOWED_ORIGINS lists their origin";

/// NEXT_PUBLIC_APP_URL and TASKCAST_ALLOWED_ORIGINS, validated as serve does. An invalid
/// value is not echoed: a URL may carry credentials.
fn origins(env: Env) -> Vec<Check> {
    let app = |level, message: String| Check::new("app url", level, message);
    let mut checks = vec![
        match value(env, "NEXT_PUBLIC_APP_URL").map(|u| parse_origin("", &u)) {
            Some(Ok(origin)) => app(Level::Ok, format!("browsers connect from {origin}")),
            Some(Err(_)) => app(
                Level::Fail,
                "NEXT_PUBLIC_APP_URL is not an http(s) URL".into(),
            )
            .fix("set it to the app's public URL, e.g. https://your-app-domain.com"),
            None => app(Level::Warn, NO_APP_URL.into())
                .fix("set NEXT_PUBLIC_APP_URL=https://your-app-domain.com"),
        },
    ];
    if let Some(list) = value(env, "TASKCAST_ALLOWED_ORIGINS") {
        let entries = list.split(',').filter(|o| !o.trim().is_empty());
        let parsed: Result<Vec<String>, _> = entries.map(|o| parse_origin("", o)).collect();
        let allowed = |level, message: String| Check::new("allowed origins", level, message);
        checks.push(match parsed {
            Ok(all) => allowed(Level::Ok, all.join(", ")),
            Err(_) => allowed(Level::Fail, "an entry is not an http(s) URL".into())
                .fix("list origins such as https://admin.example.com, comma-separated"),
        });
    }
    checks
}

const TRIMMED: &str = "has spaces or a newline around it; taskcast trims them, but a \
    generator that sends it as is gets 401";
const TRIMMED_FIX: &str = "remove them where it is set, use the same value in every \
    environment, and restart both services (the guide's 401 checklist)";

/// The push key: its source and strength, whitespace around it, and the rotation key.
fn push_key(env: Env, production: bool) -> Vec<Check> {
    let check = |level, message: String| Check::new("push key", level, message);
    // Resolved as in development, so that a weak key is described rather than refused.
    let key = match PushKey::resolve(env("TASK_PROCESS_SECRET_KEY"), None, env, false) {
        Ok(key) => key,
        Err(refusal) => return vec![check(Level::Fail, refusal).fix(NEW_KEY)],
    };
    let ((weak, refusal), source) = (refused(production), key.source());
    let chars = match source {
        KeySource::OpenAiKeyPrefix => 8,
        KeySource::DevelopmentDefault => "development-key".len(),
        // describe() names the variable for the other sources.
        var => value(env, var.describe()).map_or(0, |v| v.chars().count()),
    };
    // PushKey's own wording for the OpenAI prefix quotes it; doctor prints no part of a key.
    let weakness = match source {
        KeySource::OpenAiKeyPrefix => {
            Some("is a prefix all modern OpenAI keys share: public".into())
        }
        _ => key.weakness(),
    };
    let from = format!("from {}, {chars} characters", source.describe());
    let unset = "TASK_PROCESS_SECRET_KEY is not set";
    let mut checks = vec![match weakness {
        _ if production && source == KeySource::DevelopmentDefault => {
            check(Level::Fail, format!("{unset}, nor any fallback{refusal}")).fix(NEW_KEY)
        }
        Some(why) => check(weak, format!("{from}: it {why}{refusal}")).fix(NEW_KEY),
        None if source != KeySource::TaskProcessSecretKey => {
            let why = "the guide strongly recommends setting it";
            check(Level::Warn, format!("{from}; {unset}, and {why}")).fix(NEW_KEY)
        }
        None => check(Level::Ok, from),
    }];
    if key.was_trimmed() {
        let message = format!("{} {TRIMMED}", source.describe());
        checks.push(Check::new("key whitespace", Level::Warn, message).fix(TRIMMED_FIX));
    }
    if let Some(n) = value(env, "TASK_PROCESS_SECRET_KEY_PREVIOUS").map(|p| p.chars().count()) {
        let (level, message) = match n < MIN_KEY_CHARS {
            true => (
                weak,
                format!("{n} characters, shorter than {MIN_KEY_CHARS}{refusal}"),
            ),
            false => (
                Level::Ok,
                format!("{n} characters, also accepted while set"),
            ),
        };
        let message = format!("TASK_PROCESS_SECRET_KEY_PREVIOUS is {message}");
        let fix = "unset it once every generator sends the new key";
        checks.push(Check::new("previous key", level, message).fix(fix));
    }
    checks
}

/// As clap's falsey values: anything else turns the flag on.
fn truthy(raw: &str) -> bool {
    let raw = raw.trim().to_ascii_lowercase();
    !matches!(raw.as_str(), "" | "false" | "f" | "no" | "n" | "off" | "0")
}

const NO_SUBSCRIBER_AUTH: &str = "neither TASKCAST_SUBSCRIBE_SECRET nor SUPABASE_JWT_SECRET is \
    set: a random per-process secret signs tokens, which stop working on restart";
const SET_SUBSCRIBE_SECRET: &str =
    "set TASKCAST_SUBSCRIBE_SECRET (`openssl rand -hex 32`) and/or SUPABASE_JWT_SECRET";

/// Who may watch a task: subscribe tokens, Supabase sessions, or (development) anyone.
fn subscribers(env: Env, production: bool) -> Vec<Check> {
    let (weak, refusal) = refused(production);
    let check = |level, message: String| Check::new("subscriber auth", level, message);
    let tokens = value(env, "TASKCAST_SUBSCRIBE_SECRET").map(|s| s.chars().count());
    let sessions =
        value(env, "SUPABASE_JWT_SECRET").map(|_| "Supabase sessions (SUPABASE_JWT_SECRET)");
    let mut checks = vec![match (tokens, sessions) {
        (None, None) => {
            check(weak, format!("{NO_SUBSCRIBER_AUTH}{refusal}")).fix(SET_SUBSCRIBE_SECRET)
        }
        (None, Some(sessions)) => check(Level::Ok, sessions.to_string()),
        (Some(n), _) if n < MIN_KEY_CHARS => {
            let message = format!("TASKCAST_SUBSCRIBE_SECRET is {n} characters, shorter than 32");
            check(weak, message + refusal).fix(SET_SUBSCRIBE_SECRET)
        }
        (Some(n), sessions) => {
            let and = sessions.map(|s| format!(" and {s}")).unwrap_or_default();
            check(
                Level::Ok,
                format!("subscribe tokens (TASKCAST_SUBSCRIBE_SECRET, {n} characters){and}"),
            )
        }
    }];
    if env("TASKCAST_PUBLIC_SUBSCRIBE").is_some_and(|v| truthy(&v)) {
        let message = "TASKCAST_PUBLIC_SUBSCRIBE is on: anyone who knows a task id can watch it";
        let public = Check::new("public subscribe", weak, format!("{message}{refusal}"));
        checks.push(public.fix("unset TASKCAST_PUBLIC_SUBSCRIBE"));
    }
    checks
}

/// The database checks, or one warning when DATABASE_URL is not set.
async fn database_checks(env: Env<'_>) -> Vec<Check> {
    let check = |level, message: &str| vec![Check::new("database", level, message)];
    let Some(url) = value(env, "DATABASE_URL") else {
        let message = "DATABASE_URL is not set: in-memory store, nothing survives a restart";
        return check(Level::Warn, message);
    };
    // The parse error is not shown: it may quote part of the string.
    let Ok(mut config) = url.parse::<tokio_postgres::Config>() else {
        return check(
            Level::Fail,
            "DATABASE_URL is not a Postgres connection string",
        );
    };
    let password = config
        .get_password()
        .map(|p| String::from_utf8_lossy(p).into_owned());
    let hide = |e: tokio_postgres::Error| match password.as_deref() {
        Some(p) if !p.is_empty() => error_chain(&e).replace(p, "***"),
        _ => error_chain(&e),
    };
    let hosts: Vec<String> = (config.get_hosts().iter())
        .map(|host| match host {
            Host::Tcp(name) => name.clone(),
            #[cfg(unix)]
            Host::Unix(path) => path.display().to_string(),
        })
        .collect();
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let target = format!("{}:{port}", hosts.join(","));
    config.connect_timeout(CONNECT_TIMEOUT);
    let connecting = tokio::time::timeout(CONNECT_TIMEOUT, config.connect(NoTls));
    let (client, connection) = match connecting.await {
        Ok(Ok(connected)) => connected,
        Ok(Err(e)) => {
            return check(
                Level::Fail,
                &format!("cannot connect to {target}: {}", hide(e)),
            );
        }
        Err(_) => return check(Level::Fail, &format!("no answer from {target} within 5 s")),
    };
    let driver = tokio::spawn(connection);
    let checks = inspect(&client).await;
    driver.abort();
    checks.unwrap_or_else(|e| check(Level::Fail, &format!("reading the catalog: {}", hide(e))))
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let _ = write!(out, ": {cause}");
        source = cause.source();
    }
    out
}

const SERVER: &str = "SELECT 'PostgreSQL ' || current_setting('server_version') || ' as ' \
    || current_user || ', database ' || current_database()";

/// Reads the server, the guide's columns, taskcast's columns and public's functions.
async fn inspect(client: &tokio_postgres::Client) -> Result<Vec<Check>, tokio_postgres::Error> {
    let server: String = client.query_one(SERVER, &[]).await?.get(0);
    // The simple protocol returns text, whatever information_schema's domain types are.
    let guide: Vec<(String, String)> = (client.simple_query(GUIDE_QUERY).await?.iter())
        .filter_map(|message| match message {
            SimpleQueryMessage::Row(row) => Some((row.get(1)?.into(), row.get(2)?.into())),
            _ => None,
        })
        .collect();
    let missing = missing_columns(client).await?;
    let functions: Vec<Function> = (client.query(FUNCTIONS_QUERY, &[]).await?.iter())
        .map(|row| Function {
            name: row.get(0),
            args: row.get(1),
            security_definer: row.get(2),
            owner: row.get(3),
            executable_by: (row
                .get::<_, bool>(4)
                .then(|| "PUBLIC".to_string())
                .into_iter())
            .chain(row.get::<_, Vec<String>>(5))
            .collect(),
        })
        .collect();
    let mut checks = vec![Check::new(
        "database",
        Level::Ok,
        format!("reachable: {server}"),
    )];
    checks.extend(schema_checks(&guide, &missing));
    checks.extend(function_checks(&functions));
    Ok(checks)
}

/// `progress` and `stage` as the guide's query found them (name, data_type), then the other
/// columns taskcast uses.
fn schema_checks(guide: &[(String, String)], missing: &[String]) -> Vec<Check> {
    let columns = [
        ("column progress", "progress", "numeric"),
        ("column stage", "stage", "text"),
    ];
    let mut checks: Vec<Check> = (columns.into_iter())
        .map(
            |(name, column, wanted)| match guide.iter().find(|(c, _)| c == column) {
                None => Check::new(
                    name,
                    Level::Fail,
                    format!("image_tasks.{column} is missing"),
                )
                .fix(MIGRATE),
                Some((_, found)) if found == wanted => {
                    Check::new(name, Level::Ok, format!("image_tasks.{column} is {wanted}"))
                }
                Some((_, found)) => {
                    let message =
                        format!("image_tasks.{column} is {found}, the guide's is {wanted}");
                    Check::new(name, Level::Warn, message)
                }
            },
        )
        .collect();
    let others: Vec<&str> = (missing.iter().map(String::as_str))
        .filter(|c| !matches!(*c, "progress" | "stage"))
        .collect();
    let message = match others.first() {
        None => format!(
            "image_tasks has all {} columns taskcast uses",
            REQUIRED_COLUMNS.len()
        ),
        Some(table) if table.starts_with("table ") => format!("{table} does not exist"),
        Some(_) => format!(
            "image_tasks lacks columns taskcast uses: {}",
            others.join(", ")
        ),
    };
    checks.push(match others.is_empty() {
        true => Check::new("schema", Level::Ok, message),
        false => Check::new("schema", Level::Fail, message).fix(MIGRATE),
    });
    checks
}

/// A function in schema public, as [`FUNCTIONS_QUERY`] describes it.
#[derive(Clone, Debug)]
struct Function {
    name: String,
    /// Argument types as `oidvectortypes` writes them: `text, text`.
    args: String,
    security_definer: bool,
    owner: String,
    /// Which of `PUBLIC`, `anon`, `authenticated` may execute it.
    executable_by: Vec<String>,
}

impl Function {
    fn signature(&self) -> String {
        format!("public.{}({})", self.name, self.args)
    }
}

const GUIDE_FUNCTIONS: [&str; 2] = ["execute_sql", "check_column_exists"];
const OTHER_DEFINERS: &str = "SECURITY DEFINER, so callable with their owner's rights \
    through /rest/v1/rpc/";

/// The guide's `execute_sql` and `check_column_exists`, then any other SECURITY DEFINER
/// function that anyone may call through Supabase's REST API (`/rest/v1/rpc/<name>`).
fn function_checks(functions: &[Function]) -> Vec<Check> {
    let mut checks = Vec::new();
    for (name, judge) in GUIDE_FUNCTIONS
        .into_iter()
        .zip([execute_sql, column_helper])
    {
        let found: Vec<Check> = functions
            .iter()
            .filter(|f| f.name == name)
            .map(judge)
            .collect();
        if found.is_empty() {
            checks.push(Check::new(
                name,
                Level::Ok,
                format!("public.{name} does not exist"),
            ));
        }
        checks.extend(found);
    }
    let others: Vec<String> = (functions.iter())
        .filter(|f| f.security_definer && !f.executable_by.is_empty())
        .filter(|f| !GUIDE_FUNCTIONS.contains(&f.name.as_str()))
        .map(|f| format!("{} (by {})", f.signature(), f.executable_by.join(", ")))
        .collect();
    checks.push(match others.is_empty() {
        true => Check::new(
            "definer functions",
            Level::Ok,
            "none executable by PUBLIC, anon, authenticated",
        ),
        false => Check::new(
            "definer functions",
            Level::Warn,
            format!("{OTHER_DEFINERS}: {}", others.join("; ")),
        )
        .fix("REVOKE EXECUTE from PUBLIC, anon and authenticated, or make them SECURITY INVOKER"),
    });
    checks
}

const ANYONE: &str = "anyone can call it through Supabase's REST API (POST /rest/v1/rpc/";

fn execute_sql(f: &Function) -> Check {
    let signature = f.signature();
    let (level, runs) = match f.security_definer {
        true => (
            Level::Critical,
            format!("is SECURITY DEFINER: it runs any SQL as {}", f.owner),
        ),
        false => (Level::Fail, "runs any SQL it is given".to_string()),
    };
    let by = f.executable_by.join(", ");
    let by = if by.is_empty() {
        by
    } else {
        format!(", and {by} may execute it")
    };
    let message =
        format!("{signature} {runs}{by}: {ANYONE}execute_sql); taskcast does not need it");
    Check::new("execute_sql", level, message).fix(format!("DROP FUNCTION IF EXISTS {signature};"))
}

fn column_helper(f: &Function) -> Check {
    let (signature, owner) = (f.signature(), &f.owner);
    let check = |level, message: String| Check::new("check_column_exists", level, message);
    match (f.executable_by.as_slice(), f.security_definer) {
        ([], false) => check(
            Level::Ok,
            format!("{signature}: SECURITY INVOKER, owner-only"),
        ),
        ([], true) => check(
            Level::Warn,
            format!("{signature} is SECURITY DEFINER (owner-only)"),
        )
        .fix(RECREATE),
        (who, definer) => {
            let revoke = |w: &String| format!("REVOKE EXECUTE ON FUNCTION {signature} FROM {w};");
            let mut fix: Vec<String> = who.iter().map(revoke).collect();
            let mut message = format!("{signature} is executable by {}", who.join(", "));
            if definer {
                let _ = write!(message, " and is SECURITY DEFINER (runs as {owner})");
                fix.push(format!("then {RECREATE}"));
            }
            let message = format!("{message}: {ANYONE}check_column_exists)");
            check(Level::Critical, message).fix(fix.join("\n"))
        }
    }
}
