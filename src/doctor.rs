//! `taskcast doctor`: the deployment guide's "verify deployment" steps as one command.
//!
//! Each check is one line: ok, warn, fail, or CRITICAL (a failing level kept for database
//! functions that let anyone run SQL). Configuration is judged by pure functions of the
//! environment; the database is read once ([`inspect`]) and judged by pure functions too,
//! so every verdict is unit-tested without a server. No check prints a secret's value, not
//! even a prefix: only variable names, sources and lengths.

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;
use tokio_postgres::config::Host;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

use crate::auth::{KeySource, MIN_KEY_CHARS, PushKey};
use crate::config::{is_production, parse_origin};
use crate::store::schema::{REQUIRED_COLUMNS, missing_columns};

type Env<'a> = &'a (dyn Fn(&str) -> Option<String> + Sync);

/// The variables the guide and taskcast read. Doctor reports which are set, never a value.
const RELEVANT_VARS: [&str; 13] = [
    "TASK_PROCESS_SECRET_KEY",
    "TASK_PROCESS_SECRET_KEY_PREVIOUS",
    "INTERNAL_API_KEY",
    "API_SECRET_KEY",
    "OPENAI_API_KEY",
    "NEXT_PUBLIC_APP_URL",
    "DATABASE_URL",
    "TASKCAST_SUBSCRIBE_SECRET",
    "SUPABASE_JWT_SECRET",
    "TASKCAST_PUBLIC_SUBSCRIBE",
    "TASKCAST_ALLOWED_ORIGINS",
    "NODE_ENV",
    "APP_ENV",
];
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const MIGRATE: &str = "run `taskcast migrate` (or paste schema.sql into the Supabase SQL editor)";
const NEW_KEY: &str = "set TASK_PROCESS_SECRET_KEY to at least 32 random characters \
                       (`openssl rand -hex 16`), the same value in the generator and in taskcast";
const RECREATE: &str = "then recreate it as SECURITY INVOKER: run `taskcast migrate` (schema.sql)";
/// The guide's own verification query, sent exactly as written (step 2 of 验证部署).
const GUIDE_QUERY: &str = "SELECT \n  table_name, \n  column_name, \n  data_type \nFROM \n  \
    information_schema.columns \nWHERE \n  table_schema = 'public' \n  AND table_name = \
    'image_tasks'\n  AND column_name IN ('progress', 'stage')\nORDER BY \n  column_name;";
/// Functions in schema public (extension members aside), with who may execute them.
const FUNCTIONS_QUERY: &str = "SELECT p.proname::text, pg_catalog.oidvectortypes(p.proargtypes), \
      p.prosecdef, pg_catalog.pg_get_userbyid(p.proowner)::text, \
      pg_catalog.has_function_privilege('public', p.oid, 'EXECUTE'), \
      ARRAY(SELECT r.rolname::text FROM pg_catalog.pg_roles r \
            WHERE r.rolname IN ('anon', 'authenticated') \
              AND pg_catalog.has_function_privilege(r.oid, p.oid, 'EXECUTE') ORDER BY 1) \
    FROM pg_catalog.pg_proc p \
    WHERE p.pronamespace = 'public'::regnamespace \
      AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d WHERE d.classid = \
          'pg_catalog.pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e') \
    ORDER BY 1, 2";

/// How bad a finding is. `Fail` and `Critical` make the report fail.
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

    /// What production refuses, development only warns about.
    fn refused_in(production: bool) -> Level {
        if production { Level::Fail } else { Level::Warn }
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

    /// True when any check failed (fail or CRITICAL): the command exits non-zero.
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
            let _ = writeln!(
                out,
                "{:level_w$}{:name_w$}{}",
                c.level.label(),
                c.name,
                c.message
            );
            for (i, line) in c.fix.iter().flat_map(|f| f.lines()).enumerate() {
                let tag = if i == 0 { "fix: " } else { "     " };
                let _ = writeln!(out, "{:indent$}{tag}{line}", "", indent = level_w + name_w);
            }
        }
        let count = |test: fn(Level) -> bool| self.checks.iter().filter(|c| test(c.level)).count();
        let critical = count(|l| l == Level::Critical);
        let _ = write!(
            out,
            "\n{} ok, {} warn, {} fail",
            count(|l| l == Level::Ok),
            count(|l| l == Level::Warn),
            count(|l| l >= Level::Fail)
        );
        if critical > 0 {
            let _ = write!(out, " ({critical} CRITICAL)");
        }
        out.push('\n');
        out
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

fn refusal(production: bool) -> &'static str {
    if production {
        "; taskcast serve refuses to start"
    } else {
        "; refused in production"
    }
}

/// The checks that need only the environment.
fn config_checks(env: Env) -> Vec<Check> {
    let production = is_production(env);
    let set: Vec<&str> = RELEVANT_VARS
        .into_iter()
        .filter(|v| value(env, v).is_some())
        .collect();
    let blank: Vec<&str> = RELEVANT_VARS
        .into_iter()
        .filter(|v| env(v).is_some() && value(env, v).is_none())
        .collect();
    let mut message = if production {
        "production"
    } else {
        "development (not NODE_ENV/APP_ENV=production)"
    }
    .to_string();
    let _ = write!(
        message,
        "; set: {}",
        if set.is_empty() {
            "none".to_string()
        } else {
            set.join(", ")
        }
    );
    if !blank.is_empty() {
        let _ = write!(message, "; blank, so unset: {}", blank.join(", "));
    }
    let mut checks = vec![Check::new("environment", Level::Ok, message)];
    checks.extend(origins(env));
    checks.extend(push_key(env, production));
    checks.extend(subscribers(env, production));
    checks
}

/// NEXT_PUBLIC_APP_URL and TASKCAST_ALLOWED_ORIGINS, validated as serve does. Values are
/// not echoed when invalid: a URL may carry credentials.
fn origins(env: Env) -> Vec<Check> {
    let mut checks = vec![match value(env, "NEXT_PUBLIC_APP_URL") {
        None => Check::new(
            "app url",
            Level::Warn,
            "NEXT_PUBLIC_APP_URL is not set, and the guide says it must be: WebSocket upgrades \
             from the app's origin get 403 unless TASKCAST_ALLOWED_ORIGINS lists it",
        )
        .fix("set NEXT_PUBLIC_APP_URL=https://your-app-domain.com"),
        Some(url) => match parse_origin("NEXT_PUBLIC_APP_URL", &url) {
            Ok(origin) => Check::new(
                "app url",
                Level::Ok,
                format!("browsers may connect from {origin}"),
            ),
            Err(_) => Check::new(
                "app url",
                Level::Fail,
                "NEXT_PUBLIC_APP_URL is not an http(s) URL; taskcast serve refuses to start",
            )
            .fix("set it to the app's public URL, e.g. https://your-app-domain.com"),
        },
    }];
    if let Some(list) = value(env, "TASKCAST_ALLOWED_ORIGINS") {
        let parsed: Result<Vec<String>, String> = list
            .split(',')
            .map(str::trim)
            .filter(|o| !o.is_empty())
            .map(|o| parse_origin("TASKCAST_ALLOWED_ORIGINS", o))
            .collect();
        checks.push(match parsed {
            Ok(all) => Check::new("allowed origins", Level::Ok, format!("also allowed: {}", all.join(", "))),
            Err(_) => Check::new("allowed origins", Level::Fail,
                "TASKCAST_ALLOWED_ORIGINS has an entry that is not an http(s) URL; taskcast serve refuses to start")
                .fix("list origins such as https://admin.example.com, comma-separated"),
        });
    }
    checks
}

/// Why a key is unfit for production. PushKey's wording for the OpenAI prefix quotes the
/// prefix itself; doctor prints no part of any key.
fn weakness(key: &PushKey) -> Option<String> {
    match key.source() {
        KeySource::OpenAiKeyPrefix => {
            Some("is the prefix every modern OpenAI key starts with, so it is public".to_string())
        }
        _ => key.weakness(),
    }
}

fn key_chars(env: Env, source: KeySource) -> usize {
    match source {
        KeySource::OpenAiKeyPrefix => 8,
        KeySource::DevelopmentDefault => "development-key".len(),
        var => value(env, var.describe()).map_or(0, |v| v.chars().count()),
    }
}

/// The push key's source and strength, whitespace around it, and the rotation key.
fn push_key(env: Env, production: bool) -> Vec<Check> {
    let explicit = env("TASK_PROCESS_SECRET_KEY");
    // Resolved as in development, so that a weak key is described rather than refused.
    let key = match PushKey::resolve(explicit, None, env, false) {
        Ok(key) => key,
        Err(refused) => return vec![Check::new("push key", Level::Fail, refused).fix(NEW_KEY)],
    };
    let (source, weak) = (key.source(), Level::refused_in(production));
    let chars = key_chars(env, source);
    let from = format!("from {}, {chars} characters", source.describe());
    let mut checks = vec![if production && source == KeySource::DevelopmentDefault {
        Check::new("push key", Level::Fail,
            "not set: TASK_PROCESS_SECRET_KEY and every fallback are unset; taskcast serve refuses to start")
            .fix(NEW_KEY)
    } else if let Some(why) = weakness(&key) {
        Check::new(
            "push key",
            weak,
            format!("{from}: it {why}{}", refusal(production)),
        )
        .fix(NEW_KEY)
    } else if source != KeySource::TaskProcessSecretKey {
        Check::new("push key", Level::Warn,
            format!("{from}; TASK_PROCESS_SECRET_KEY is not set, and the guide strongly recommends setting it"))
            .fix("set TASK_PROCESS_SECRET_KEY, the same value in the generator and in taskcast")
    } else {
        Check::new("push key", Level::Ok, from)
    }];
    if key.was_trimmed() {
        checks.push(Check::new("key whitespace", Level::Warn, format!(
            "{} has spaces or a newline around it; taskcast trims them, but a generator that \
             sends the value as is gets 401", source.describe()))
            .fix("remove them where it is set, use the same value in every environment, and \
                  restart both services (the guide's 401 checklist)"));
    }
    if let Some(previous) = value(env, "TASK_PROCESS_SECRET_KEY_PREVIOUS") {
        let n = previous.chars().count();
        checks.push(if n < MIN_KEY_CHARS {
            Check::new("previous key", weak, format!(
                "TASK_PROCESS_SECRET_KEY_PREVIOUS is {n} characters, shorter than {MIN_KEY_CHARS}{}",
                refusal(production)))
        } else {
            Check::new("previous key", Level::Ok,
                format!("TASK_PROCESS_SECRET_KEY_PREVIOUS ({n} characters) is also accepted"))
        }.fix("unset TASK_PROCESS_SECRET_KEY_PREVIOUS once every generator sends the new key"));
    }
    checks
}

/// As clap's falsey values: anything else turns the flag on.
fn truthy(raw: &str) -> bool {
    !matches!(
        raw.trim().to_ascii_lowercase().as_str(),
        "" | "false" | "f" | "no" | "n" | "off" | "0"
    )
}

/// Who may watch a task: subscribe tokens, Supabase sessions, or (development) anyone.
fn subscribers(env: Env, production: bool) -> Vec<Check> {
    let weak = Level::refused_in(production);
    let tokens = value(env, "TASKCAST_SUBSCRIBE_SECRET").map(|s| s.chars().count());
    let supabase = value(env, "SUPABASE_JWT_SECRET").is_some();
    let mut checks = vec![match (tokens, supabase) {
        (None, false) => Check::new("subscriber auth", weak, format!(
            "neither TASKCAST_SUBSCRIBE_SECRET nor SUPABASE_JWT_SECRET is set: tokens are signed \
             with a random per-process secret and stop working on restart{}", refusal(production)))
            .fix("set TASKCAST_SUBSCRIBE_SECRET (`openssl rand -hex 32`) and/or SUPABASE_JWT_SECRET"),
        (Some(n), _) if n < MIN_KEY_CHARS => Check::new("subscriber auth", weak, format!(
            "TASKCAST_SUBSCRIBE_SECRET is {n} characters, shorter than {MIN_KEY_CHARS}{}", refusal(production)))
            .fix("set TASKCAST_SUBSCRIBE_SECRET to at least 32 random characters (`openssl rand -hex 32`)"),
        (Some(n), supabase) => Check::new("subscriber auth", Level::Ok, format!(
            "subscribe tokens (TASKCAST_SUBSCRIBE_SECRET, {n} characters){}",
            if supabase { " and Supabase sessions (SUPABASE_JWT_SECRET)" } else { "" })),
        (None, true) => Check::new("subscriber auth", Level::Ok,
            "Supabase sessions (SUPABASE_JWT_SECRET); tokens from POST /api/tasks use a random \
             per-process secret"),
    }];
    if env("TASKCAST_PUBLIC_SUBSCRIBE").is_some_and(|v| truthy(&v)) {
        checks.push(
            Check::new(
                "public subscribe",
                weak,
                format!(
                    "TASKCAST_PUBLIC_SUBSCRIBE is on: anyone who knows a task id can watch it{}",
                    refusal(production)
                ),
            )
            .fix("unset TASKCAST_PUBLIC_SUBSCRIBE"),
        );
    }
    checks
}

/// A function in schema public, as [`FUNCTIONS_QUERY`] describes it.
#[derive(Clone, Debug)]
struct Function {
    name: String,
    /// Argument types, as `oidvectortypes` writes them: `text, text`.
    args: String,
    security_definer: bool,
    owner: String,
    /// `PUBLIC`, `anon`, `authenticated`: those of them that may execute it.
    executable_by: Vec<String>,
}

impl Function {
    fn signature(&self) -> String {
        format!("public.{}({})", self.name, self.args)
    }
}

/// A column the guide's query found: name and `data_type`.
struct GuideColumn {
    name: String,
    data_type: String,
}

/// Everything doctor reads from the database, in one pass.
struct Catalog {
    server: String,
    guide_columns: Vec<GuideColumn>,
    missing: Vec<String>,
    functions: Vec<Function>,
}

/// The database checks; with no DATABASE_URL, one warning instead.
async fn database_checks(env: Env<'_>) -> Vec<Check> {
    let Some(url) = value(env, "DATABASE_URL") else {
        return vec![
            Check::new(
                "database",
                Level::Warn,
                "DATABASE_URL is not set: in-memory store, nothing survives a restart",
            )
            .fix("set DATABASE_URL to the Postgres connection string"),
        ];
    };
    // The parse error is not shown: it may quote part of the string.
    let Ok(mut config) = url.parse::<tokio_postgres::Config>() else {
        return vec![
            Check::new(
                "database",
                Level::Fail,
                "DATABASE_URL is not a Postgres connection string",
            )
            .fix("use postgres://USER:PASSWORD@HOST:5432/DB or key=value pairs"),
        ];
    };
    let password = config
        .get_password()
        .map(|p| String::from_utf8_lossy(p).into_owned());
    let hidden = |e: &tokio_postgres::Error| match &password {
        Some(p) if !p.is_empty() => error_chain(e).replace(p.as_str(), "***"),
        _ => error_chain(e),
    };
    let target = target(&config);
    config.connect_timeout(CONNECT_TIMEOUT);
    let (client, connection) =
        match tokio::time::timeout(CONNECT_TIMEOUT, config.connect(NoTls)).await {
            Ok(Ok(connected)) => connected,
            Ok(Err(e)) => {
                return vec![Check::new(
                    "database",
                    Level::Fail,
                    format!("cannot connect to {target}: {}", hidden(&e)),
                )];
            }
            Err(_) => {
                return vec![Check::new(
                    "database",
                    Level::Fail,
                    format!("no answer from {target} within 5 s"),
                )];
            }
        };
    let driver = tokio::spawn(connection);
    let catalog = inspect(&client).await;
    drop(client);
    driver.abort();
    match catalog {
        Ok(catalog) => {
            let mut checks = vec![Check::new(
                "database",
                Level::Ok,
                format!("reachable: {}", catalog.server),
            )];
            checks.extend(schema_checks(&catalog.guide_columns, &catalog.missing));
            checks.extend(function_checks(&catalog.functions));
            checks
        }
        Err(e) => vec![Check::new(
            "database",
            Level::Fail,
            format!("connected, but reading the catalog failed: {}", hidden(&e)),
        )],
    }
}

/// `host:port` for messages; never the user or password.
fn target(config: &tokio_postgres::Config) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .map(|host| match host {
            Host::Tcp(name) => name.clone(),
            #[cfg(unix)]
            Host::Unix(path) => path.display().to_string(),
        })
        .collect();
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!("{}:{port}", hosts.join(","))
}

fn error_chain(e: &tokio_postgres::Error) -> String {
    let mut out = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        let _ = write!(out, ": {cause}");
        source = cause.source();
    }
    out
}

async fn inspect(client: &Client) -> Result<Catalog, tokio_postgres::Error> {
    let row = client
        .query_one("SELECT current_setting('server_version'), current_user::text, current_database()::text", &[])
        .await?;
    let server = format!(
        "PostgreSQL {} as {}, database {}",
        row.get::<_, String>(0),
        row.get::<_, String>(1),
        row.get::<_, String>(2)
    );
    // The simple protocol returns text, whatever information_schema's domain types are.
    let guide_columns = client
        .simple_query(GUIDE_QUERY)
        .await?
        .into_iter()
        .filter_map(|message| match message {
            SimpleQueryMessage::Row(row) => Some(GuideColumn {
                name: row.get(1).unwrap_or_default().to_string(),
                data_type: row.get(2).unwrap_or_default().to_string(),
            }),
            _ => None,
        })
        .collect();
    let missing = missing_columns(client).await?;
    let functions = client
        .query(FUNCTIONS_QUERY, &[])
        .await?
        .iter()
        .map(|row| {
            let mut executable_by: Vec<String> = row.get(5);
            if row.get::<_, bool>(4) {
                executable_by.insert(0, "PUBLIC".to_string());
            }
            Function {
                name: row.get(0),
                args: row.get(1),
                security_definer: row.get(2),
                owner: row.get(3),
                executable_by,
            }
        })
        .collect();
    Ok(Catalog {
        server,
        guide_columns,
        missing,
        functions,
    })
}

/// `progress` and `stage` as the guide's query reports them, then taskcast's other columns.
fn schema_checks(guide: &[GuideColumn], missing: &[String]) -> Vec<Check> {
    let mut checks: Vec<Check> = [("column progress", "progress", "numeric"), ("column stage", "stage", "text")]
        .into_iter()
        .map(|(name, column, wanted)| match guide.iter().find(|c| c.name == column) {
            None => Check::new(name, Level::Fail, format!(
                "image_tasks.{column} is missing (the guide's information_schema query does not find it)"))
                .fix(MIGRATE),
            Some(c) if c.data_type == wanted => Check::new(name, Level::Ok, format!("image_tasks.{column} is {wanted}")),
            Some(c) => Check::new(name, Level::Warn, format!(
                "image_tasks.{column} is {}; the guide's type is {}", c.data_type, wanted.to_uppercase())),
        })
        .collect();
    let others: Vec<&str> = missing
        .iter()
        .map(String::as_str)
        .filter(|c| !matches!(*c, "progress" | "stage"))
        .collect();
    checks.push(match others.first() {
        None => Check::new(
            "schema",
            Level::Ok,
            format!(
                "image_tasks has all {} columns taskcast uses",
                REQUIRED_COLUMNS.len()
            ),
        ),
        Some(table) if table.starts_with("table ") => {
            Check::new("schema", Level::Fail, format!("{table} does not exist")).fix(MIGRATE)
        }
        Some(_) => Check::new(
            "schema",
            Level::Fail,
            format!(
                "image_tasks lacks columns taskcast uses: {}",
                others.join(", ")
            ),
        )
        .fix(MIGRATE),
    });
    checks
}

fn callers(f: &Function) -> String {
    f.executable_by.join(", ")
}

/// The guide's `execute_sql` and `check_column_exists`, then any other SECURITY DEFINER
/// function that anyone may call through Supabase's REST API (`/rest/v1/rpc/<name>`).
fn function_checks(functions: &[Function]) -> Vec<Check> {
    let named = |name: &'static str| functions.iter().filter(move |f| f.name == name);
    let mut checks: Vec<Check> = named("execute_sql").map(execute_sql).collect();
    if checks.is_empty() {
        checks.push(Check::new(
            "execute_sql",
            Level::Ok,
            "public.execute_sql does not exist",
        ));
    }
    let helpers: Vec<Check> = named("check_column_exists").map(column_helper).collect();
    if helpers.is_empty() {
        checks.push(Check::new(
            "check_column_exists",
            Level::Ok,
            "public.check_column_exists does not exist",
        ));
    }
    checks.extend(helpers);
    let others: Vec<String> = functions
        .iter()
        .filter(|f| f.security_definer && !f.executable_by.is_empty())
        .filter(|f| f.name != "execute_sql" && f.name != "check_column_exists")
        .map(|f| format!("{} (by {})", f.signature(), callers(f)))
        .collect();
    checks.push(if others.is_empty() {
        Check::new("definer functions", Level::Ok,
            "no other SECURITY DEFINER function in public is executable by PUBLIC, anon or authenticated")
    } else {
        Check::new("definer functions", Level::Warn, format!(
            "SECURITY DEFINER functions anyone may call with their owner's rights: {}", others.join(", ")))
            .fix("review each: REVOKE EXECUTE ... FROM PUBLIC, anon, authenticated; or make it SECURITY INVOKER")
    });
    checks
}

fn execute_sql(f: &Function) -> Check {
    let signature = f.signature();
    let (level, runs) = if f.security_definer {
        (
            Level::Critical,
            format!(
                "is SECURITY DEFINER: it runs any SQL as its owner, {}",
                f.owner
            ),
        )
    } else {
        (Level::Fail, "runs any SQL it is given".to_string())
    };
    let by = if f.executable_by.is_empty() {
        String::new()
    } else {
        format!(", and {} may execute it", callers(f))
    };
    Check::new(
        "execute_sql",
        level,
        format!(
            "{signature} {runs}{by}: anyone can call it through Supabase's REST API \
         (POST /rest/v1/rpc/execute_sql) and run any SQL. taskcast does not need it"
        ),
    )
    .fix(format!("DROP FUNCTION IF EXISTS {signature};"))
}

fn column_helper(f: &Function) -> Check {
    let signature = f.signature();
    let definer = if f.security_definer {
        format!(" and is SECURITY DEFINER (runs as {})", f.owner)
    } else {
        String::new()
    };
    if f.executable_by.is_empty() {
        return if f.security_definer {
            Check::new("check_column_exists", Level::Warn, format!(
                "{signature} is not executable by PUBLIC, anon or authenticated, but is SECURITY DEFINER"))
                .fix(RECREATE.trim_start_matches("then "))
        } else {
            Check::new(
                "check_column_exists",
                Level::Ok,
                format!(
                    "{signature} is SECURITY INVOKER and not executable by PUBLIC, anon or authenticated"
                ),
            )
        };
    }
    let mut fix: Vec<String> = f
        .executable_by
        .iter()
        .map(|who| format!("REVOKE EXECUTE ON FUNCTION {signature} FROM {who};"))
        .collect();
    if f.security_definer {
        fix.push(RECREATE.to_string());
    }
    Check::new("check_column_exists", Level::Critical, format!(
        "{signature} is executable by {}{definer}: anyone can call it through Supabase's REST API \
         (POST /rest/v1/rpc/check_column_exists)", callers(f)))
        .fix(fix.join("\n"))
}
