//! `taskcast doctor`: the deployment guide's "verify deployment" steps as one command.
//!
//! Each check is one line: ok, warn, fail, or CRITICAL (a failing level kept for database
//! functions that let anyone run SQL). Configuration is judged by pure functions of the
//! environment; the database is read in one pass ([`inspect`]) and judged by pure functions
//! too. No check prints a secret's value, not even a prefix: only names, sources, lengths.

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage, config::Host};

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

/// The checks found so far; one call per finding.
#[derive(Default)]
struct Checks(Vec<Check>);

impl Checks {
    fn add(&mut self, name: &'static str, level: Level, message: impl Into<String>) {
        let message = message.into();
        let fix = None;
        self.0.push(Check {
            name,
            level,
            message,
            fix,
        });
    }

    /// A finding and what to do about it.
    fn fix(&mut self, name: &'static str, level: Level, message: impl Into<String>, fix: &str) {
        self.add(name, level, message);
        self.0.last_mut().expect("just added").fix = Some(fix.to_string());
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
    let mut out = Checks::default();
    config_checks(env, &mut out);
    database_checks(env, &mut out).await;
    Report { checks: out.0 }
}

/// A variable's value without surrounding whitespace; blank counts as unset, as in serve.
fn value(env: Env, name: &str) -> Option<String> {
    let value = env(name)?.trim().to_string();
    (!value.is_empty()).then_some(value)
}

/// What serve refuses in production is a fail there, and a warning in development.
fn refused(production: bool) -> (Level, &'static str) {
    match production {
        true => (Level::Fail, "; taskcast serve refuses to start"),
        false => (Level::Warn, "; refused in production"),
    }
}

/// The checks that need only the environment.
fn config_checks(env: Env, out: &mut Checks) {
    let production = is_production(env);
    let vars = || RELEVANT_VARS.split_whitespace();
    let set: Vec<&str> = vars().filter(|v| value(env, v).is_some()).collect();
    let blank = vars().filter(|v| env(v).is_some() && value(env, v).is_none());
    let blank: Vec<&str> = blank.collect();
    let mut message = match production {
        true => "production; set: ".to_string(),
        false => "development (NODE_ENV/APP_ENV is not production); set: ".to_string(),
    };
    message += &set.join(", ");
    if !blank.is_empty() {
        let _ = write!(message, "; blank, so unset: {}", blank.join(", "));
    }
    out.add("environment", Level::Ok, message);
    app_url(env, out);
    push_key(env, production, out);
    subscribers(env, production, out);
}

const NO_APP_URL: &str = "NEXT_PUBLIC_APP_URL is not set (the guide: it must be); browsers get \
    403 unless TASKCAST_ALLOWED_ORIGINS lists their origin";
const SET_APP_URL: &str = "set NEXT_PUBLIC_APP_URL=https://your-app-domain.com";

/// NEXT_PUBLIC_APP_URL, validated as serve does; an invalid value is not echoed, since a
/// URL may carry credentials.
fn app_url(env: Env, out: &mut Checks) {
    match value(env, "NEXT_PUBLIC_APP_URL").map(|url| parse_origin("", &url)) {
        Some(Ok(origin)) => out.add("app url", Level::Ok, format!("browsers come from {origin}")),
        Some(Err(_)) => out.fix("app url", Level::Fail, "not an http(s) URL", SET_APP_URL),
        None => out.fix("app url", Level::Warn, NO_APP_URL, SET_APP_URL),
    }
}

const OPENAI_PREFIX: &str = "a prefix every modern OpenAI key shares, so it is public";
const TRIMMED: &str = "has spaces or a newline around it; taskcast trims them, but a \
    generator that sends it as is gets 401";
const TRIMMED_FIX: &str = "remove them where it is set, use the same value in every \
    environment, and restart both services (the guide's 401 checklist)";

/// The push key: its source and strength, whitespace around it, and the rotation key.
fn push_key(env: Env, production: bool, out: &mut Checks) {
    // Resolved as in development, so that a weak key is described rather than refused.
    let key = match PushKey::resolve(env("TASK_PROCESS_SECRET_KEY"), None, env, false) {
        Ok(key) => key,
        Err(refusal) => return out.fix("push key", Level::Fail, refusal, NEW_KEY),
    };
    let ((weak, refusal), source) = (refused(production), key.source());
    let from = format!("from {}", source.describe());
    // A strong key comes from a variable, which describe() names.
    let chars = value(env, source.describe()).map_or(0, |v| v.chars().count());
    let unset = "TASK_PROCESS_SECRET_KEY is not set";
    let (level, message) = match key.weakness() {
        _ if production && source == KeySource::DevelopmentDefault => {
            (Level::Fail, format!("{unset}, nor any fallback{refusal}"))
        }
        // PushKey's wording quotes the OpenAI prefix; doctor prints no part of any key.
        Some(_) if source == KeySource::OpenAiKeyPrefix => {
            (weak, format!("{from}: {OPENAI_PREFIX}{refusal}"))
        }
        Some(why) => (weak, format!("{from}: it {why}{refusal}")),
        None if source != KeySource::TaskProcessSecretKey => {
            let why = "the guide strongly recommends setting it";
            let message = format!("{from}, {chars} characters; {unset}: {why}");
            (Level::Warn, message)
        }
        None => (Level::Ok, format!("{from}, {chars} characters")),
    };
    match level {
        Level::Ok => out.add("push key", level, message),
        _ => out.fix("push key", level, message, NEW_KEY),
    }
    if key.was_trimmed() {
        let message = format!("{} {TRIMMED}", source.describe());
        out.fix("key whitespace", Level::Warn, message, TRIMMED_FIX);
    }
    if let Some(n) = value(env, "TASK_PROCESS_SECRET_KEY_PREVIOUS").map(|p| p.chars().count()) {
        let message = format!("TASK_PROCESS_SECRET_KEY_PREVIOUS is {n} characters");
        let short = format!("{message}, fewer than {MIN_KEY_CHARS}{refusal}");
        let fix = "unset it once every generator sends the new key";
        match n < MIN_KEY_CHARS {
            true => out.fix("previous key", weak, short, fix),
            false => out.add("previous key", Level::Ok, message + ", accepted while set"),
        }
    }
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
const PUBLIC_SUBSCRIBE: &str = "TASKCAST_PUBLIC_SUBSCRIBE is on: anyone who knows a task id \
    can watch it";
const ONLY_SESSIONS: &str = "; tokens from POST /api/tasks are signed with a random \
    per-process secret";
const UNSET_PUBLIC: &str = "unset TASKCAST_PUBLIC_SUBSCRIBE";

/// Who may watch a task: subscribe tokens, Supabase sessions, or (development) anyone.
fn subscribers(env: Env, production: bool, out: &mut Checks) {
    let (weak, refusal) = refused(production);
    let tokens = value(env, "TASKCAST_SUBSCRIBE_SECRET").map(|s| s.chars().count());
    let sessions =
        value(env, "SUPABASE_JWT_SECRET").map(|_| "Supabase sessions (SUPABASE_JWT_SECRET)");
    let (name, fix) = ("subscriber auth", SET_SUBSCRIBE_SECRET);
    match (tokens, sessions) {
        (None, None) => out.fix(name, weak, format!("{NO_SUBSCRIBER_AUTH}{refusal}"), fix),
        (None, Some(sessions)) => out.add(name, Level::Ok, format!("{sessions}{ONLY_SESSIONS}")),
        (Some(n), _) if n < MIN_KEY_CHARS => {
            let message = format!("TASKCAST_SUBSCRIBE_SECRET is {n} characters, fewer than 32");
            let message = message + refusal;
            out.fix(name, weak, message, fix)
        }
        (Some(n), sessions) => {
            let and = sessions.map(|s| format!(" and {s}")).unwrap_or_default();
            let message = format!("subscribe tokens (secret of {n} characters){and}");
            out.add(name, Level::Ok, message)
        }
    }
    if env("TASKCAST_PUBLIC_SUBSCRIBE").is_some_and(|v| truthy(&v)) {
        let message = format!("{PUBLIC_SUBSCRIBE}{refusal}");
        out.fix("public subscribe", weak, message, UNSET_PUBLIC);
    }
}

/// The database checks, or one warning when DATABASE_URL is not set.
async fn database_checks(env: Env<'_>, out: &mut Checks) {
    let Some(url) = value(env, "DATABASE_URL") else {
        let message = "DATABASE_URL is not set: in-memory store, nothing survives a restart";
        return out.add("database", Level::Warn, message);
    };
    // The parse error is not shown: it may quote part of the string.
    let Ok(mut config) = url.parse::<tokio_postgres::Config>() else {
        let message = "DATABASE_URL is not a Postgres connection string";
        return out.add("database", Level::Fail, message);
    };
    let password = config.get_password().map(String::from_utf8_lossy);
    let password = password.filter(|p| !p.is_empty()).map(|p| p.into_owned());
    let hide = |e: tokio_postgres::Error| match &password {
        Some(p) => error_chain(&e).replace(p.as_str(), "***"),
        None => error_chain(&e),
    };
    let hosts = config.get_hosts().iter().filter_map(|host| match host {
        Host::Tcp(name) => Some(name.as_str()),
        _ => None,
    });
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let target = format!("{}:{port}", hosts.collect::<Vec<_>>().join(","));
    config.connect_timeout(CONNECT_TIMEOUT);
    let connecting = tokio::time::timeout(CONNECT_TIMEOUT, config.connect(NoTls));
    let message = match connecting.await {
        Ok(Ok((client, connection))) => {
            let driver = tokio::spawn(connection);
            let read = inspect(&client, out).await;
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

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let _ = write!(out, ": {cause}");
        source = cause.source();
    }
    out
}

const REACHABLE: &str = "SELECT 'reachable: PostgreSQL ' || current_setting('server_version') \
    || ' as ' || current_user || ', database ' || current_database()";

/// Reads the server, the guide's columns, taskcast's columns and public's functions, then
/// judges them. Nothing is added unless every read succeeds.
async fn inspect(client: &Client, out: &mut Checks) -> Result<(), tokio_postgres::Error> {
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
    out.add("database", Level::Ok, server);
    schema_checks(&guide, &missing, out);
    function_checks(&functions, out);
    Ok(())
}

/// `progress` and `stage` as the guide's query found them (name, data_type), then the other
/// columns taskcast uses.
fn schema_checks(guide: &[(&str, &str)], missing: &[String], out: &mut Checks) {
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
const NO_OTHER_DEFINERS: &str = "no other SECURITY DEFINER function in public is executable \
    by PUBLIC, anon or authenticated";
const REVOKE_OTHERS: &str =
    "REVOKE EXECUTE from PUBLIC, anon and authenticated, or make them SECURITY INVOKER";

/// The guide's `execute_sql` and `check_column_exists`, then any other SECURITY DEFINER
/// function that anyone may call through Supabase's REST API (`/rest/v1/rpc/<name>`).
fn function_checks(functions: &[Function], out: &mut Checks) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn config(pairs: &[(&str, &str)]) -> Vec<Check> {
        let env = |name: &str| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        };
        let mut out = Checks::default();
        config_checks(&env, &mut out);
        out.0
    }

    fn find<'a>(checks: &'a [Check], name: &str) -> &'a Check {
        checks
            .iter()
            .find(|c| c.name == name)
            .expect("the check ran")
    }

    #[test]
    fn text_aligns_columns_puts_the_fix_under_the_message_and_counts() {
        let mut out = Checks::default();
        out.add("push key", Level::Ok, "from TASK_PROCESS_SECRET_KEY");
        out.fix("execute_sql", Level::Critical, "exists", "DROP\nsecond");
        let report = Report { checks: out.0 };
        let text = report.render_text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "ok        push key     from TASK_PROCESS_SECRET_KEY"
        );
        assert_eq!(lines[1], "CRITICAL  execute_sql  exists");
        assert_eq!(lines[2], "                       fix: DROP");
        assert_eq!(lines[3], "                            second");
        assert_eq!(lines[5], "1 ok, 0 warn, 1 fail (1 CRITICAL)");
        assert!(report.failed());
        let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
        assert_eq!(
            (&json["ok"], &json["checks"][1]["level"]),
            (&false.into(), &"critical".into())
        );
        assert!(json["checks"][0].get("fix").is_none());
    }

    #[test]
    fn the_openai_prefix_is_public_so_production_fails_without_quoting_it() {
        for (mode, level) in [("production", Level::Fail), ("development", Level::Warn)] {
            let checks = config(&[("NODE_ENV", mode), ("OPENAI_API_KEY", "sk-proj-abcdefgh")]);
            let check = find(&checks, "push key");
            assert_eq!(check.level, level);
            assert!(check.message.contains("public"), "{}", check.message);
            assert!(
                !format!("{checks:?}").contains("sk-proj-"),
                "a part of the key"
            );
        }
    }

    #[test]
    fn a_fallback_or_padded_key_warns_with_the_guides_advice() {
        let strong = "0123456789abcdef0123456789abcdef";
        let checks = config(&[("INTERNAL_API_KEY", strong)]);
        let check = find(&checks, "push key");
        assert_eq!(check.level, Level::Warn);
        assert!(
            check.message.contains("strongly recommends"),
            "{}",
            check.message
        );
        let checks = config(&[("TASK_PROCESS_SECRET_KEY", &format!(" {strong}\n"))]);
        assert_eq!(find(&checks, "push key").level, Level::Ok);
        assert!(find(&checks, "key whitespace").message.contains("401"));
    }

    #[test]
    fn public_subscribe_and_missing_subscriber_auth_fail_only_in_production() {
        let public = [
            ("TASKCAST_PUBLIC_SUBSCRIBE", "true"),
            ("SUPABASE_JWT_SECRET", "x"),
        ];
        assert_eq!(
            find(&config(&public), "public subscribe").level,
            Level::Warn
        );
        let production = [public[0], ("APP_ENV", "production")];
        assert_eq!(
            find(&config(&production), "public subscribe").level,
            Level::Fail
        );
        assert_eq!(
            find(&config(&production), "subscriber auth").level,
            Level::Fail
        );
        assert!(!truthy("false") && !truthy(" ") && truthy("1"));
    }

    fn function(name: &str, security_definer: bool, executable_by: &[&str]) -> Function {
        let (name, args, owner) = (name.into(), "text".into(), "postgres".into());
        let executable_by = executable_by.iter().map(|s| s.to_string()).collect();
        Function {
            name,
            args,
            security_definer,
            owner,
            executable_by,
        }
    }

    #[test]
    fn supabase_grants_get_one_revoke_each_and_other_definers_a_warning() {
        let grantees = ["PUBLIC", "anon", "authenticated"];
        let mut out = Checks::default();
        function_checks(
            &[
                function("check_column_exists", true, &grantees),
                function("execute_sql", true, &grantees),
                function("whoami", true, &["anon"]),
            ],
            &mut out,
        );
        let execute = find(&out.0, "execute_sql");
        assert_eq!(execute.level, Level::Critical);
        assert!(execute.message.contains("/rest/v1/rpc/execute_sql"));
        let fix = find(&out.0, "check_column_exists").fix.clone().unwrap();
        for who in grantees {
            let revoke = format!("ON FUNCTION public.check_column_exists(text) FROM {who};");
            assert!(fix.contains(&revoke), "{fix}");
        }
        assert!(fix.contains("SECURITY INVOKER"), "{fix}");
        assert_eq!(find(&out.0, "definer functions").level, Level::Warn);
        let mut safe = Checks::default();
        function_checks(&[function("check_column_exists", false, &[])], &mut safe);
        assert!(safe.0.iter().all(|c| c.level == Level::Ok), "{:?}", safe.0);
    }

    #[test]
    fn missing_columns_fail_with_migrate_and_a_wrong_type_warns() {
        let mut out = Checks::default();
        schema_checks(
            &[("progress", "integer")],
            &["stage".into(), "taskcast_seq".into()],
            &mut out,
        );
        assert_eq!(find(&out.0, "column progress").level, Level::Warn);
        assert_eq!(find(&out.0, "column stage").level, Level::Fail);
        let schema = find(&out.0, "schema");
        assert!(
            schema.message.ends_with("taskcast_seq"),
            "{}",
            schema.message
        );
        assert_eq!(schema.fix.as_deref(), Some(MIGRATE));
    }
}
