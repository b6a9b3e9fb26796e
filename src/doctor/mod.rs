//! `taskcast doctor`: the deployment guide's "verify deployment" steps as one command.
//!
//! Each check is one line: ok, warn, fail, or CRITICAL (a failing level kept for database
//! functions that let anyone run SQL). Configuration is judged by pure functions of the
//! environment; the database is read in one pass ([`inspect`]) and judged by pure functions
//! too. No check prints a secret's value, not even a prefix: only names, sources, lengths.

mod database;

use std::fmt::Write as _;

use serde::Serialize;

use crate::auth::{KeySource, MIN_KEY_CHARS, PushKey};
use crate::config::{is_production, parse_origin};
use database::database_checks;

type Env<'a> = &'a (dyn Fn(&str) -> Option<String> + Sync);

/// The variables the guide and taskcast read; doctor says which are set, never a value.
const RELEVANT_VARS: &str = "TASK_PROCESS_SECRET_KEY TASK_PROCESS_SECRET_KEY_PREVIOUS \
    INTERNAL_API_KEY API_SECRET_KEY OPENAI_API_KEY NEXT_PUBLIC_APP_URL DATABASE_URL \
    TASKCAST_SUBSCRIBE_SECRET SUPABASE_JWT_SECRET SUPABASE_URL TASKCAST_PUBLIC_SUBSCRIBE \
    TASKCAST_ALLOWED_ORIGINS TASKCAST_PUBLIC_URL TASKCAST_STATUS_MAP NODE_ENV APP_ENV";
const NEW_KEY: &str = "set TASK_PROCESS_SECRET_KEY to at least 32 random characters \
    (`openssl rand -hex 16`), the same value in the generator and in taskcast";
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
    match set.is_empty() {
        true => message += "none of the variables taskcast reads",
        false => message += &set.join(", "),
    }
    if !blank.is_empty() {
        let _ = write!(message, "; blank, so unset: {}", blank.join(", "));
    }
    out.add("environment", Level::Ok, message);
    app_url(env, out);
    push_key(env, production, out);
    subscribers(env, production, out);
}

const NO_APP_URL: &str = "NEXT_PUBLIC_APP_URL is not set (docs/deployment.md: it must be); \
    browsers get 403 unless TASKCAST_ALLOWED_ORIGINS lists their origin";
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

const OPENAI_IGNORED: &str = "OPENAI_API_KEY is set, and the guide falls back to its first \
    8 characters as the push key; taskcast never does: every modern OpenAI key starts with \
    the same 8 characters, so that key would be public";
const TRIMMED: &str = "has spaces or a newline around it; taskcast trims them (and the key \
    a generator presents), but a generator reading the same value may fail to send it: HTTP \
    clients refuse a header value with a newline";
const TRIMMED_FIX: &str = "remove them where it is set, use the same value in every \
    environment, and restart both services (docs/deployment.md, troubleshooting 401)";

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
        Some(why) => (weak, format!("{from}: it {why}{refusal}")),
        None if source != KeySource::TaskProcessSecretKey => {
            let why = "docs/deployment.md strongly recommends setting it";
            let message = format!("{from}, {chars} characters; {unset}: {why}");
            (Level::Warn, message)
        }
        None => (Level::Ok, format!("{from}, {chars} characters")),
    };
    match level {
        Level::Ok => out.add("push key", level, message),
        _ => out.fix("push key", level, message, NEW_KEY),
    }
    if source == KeySource::DevelopmentDefault && value(env, "OPENAI_API_KEY").is_some() {
        out.fix("openai key", Level::Warn, OPENAI_IGNORED, NEW_KEY);
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

const NO_SUBSCRIBER_AUTH: &str = "none of TASKCAST_SUBSCRIBE_SECRET, SUPABASE_URL and \
    SUPABASE_JWT_SECRET is set: a random per-process secret signs tokens, which stop working \
    on restart";
const SET_SUBSCRIBE_SECRET: &str = "set TASKCAST_SUBSCRIBE_SECRET (`openssl rand -hex 32`) \
    and/or SUPABASE_URL (or the legacy SUPABASE_JWT_SECRET)";
const PUBLIC_SUBSCRIBE: &str = "TASKCAST_PUBLIC_SUBSCRIBE is on: anyone who knows a task id \
    can watch it";
const ONLY_SESSIONS: &str = "; tokens from POST /api/tasks are signed with a random \
    per-process secret";
const UNSET_PUBLIC: &str = "unset TASKCAST_PUBLIC_SUBSCRIBE";

/// Who may watch a task: subscribe tokens, Supabase sessions, or (development) anyone.
fn subscribers(env: Env, production: bool, out: &mut Checks) {
    let (weak, refusal) = refused(production);
    let tokens = value(env, "TASKCAST_SUBSCRIBE_SECRET").map(|s| s.chars().count());
    let sessions = match (
        value(env, "SUPABASE_URL"),
        value(env, "SUPABASE_JWT_SECRET"),
    ) {
        (Some(_), Some(_)) => Some("Supabase sessions (SUPABASE_URL and SUPABASE_JWT_SECRET)"),
        (Some(_), None) => Some("Supabase sessions (SUPABASE_URL)"),
        (None, Some(_)) => Some("Supabase sessions (SUPABASE_JWT_SECRET)"),
        (None, None) => None,
    };
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

#[cfg(test)]
mod tests {
    use super::database::{Function, MIGRATE, function_checks, schema_checks};
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
    fn with_no_variable_set_the_environment_line_says_so_instead_of_an_empty_list() {
        let checks = config(&[]);
        let message = &find(&checks, "environment").message;
        assert!(
            message.ends_with("set: none of the variables taskcast reads"),
            "{message}"
        );
        let checks = config(&[("DATABASE_URL", "postgres://x")]);
        assert!(
            find(&checks, "environment")
                .message
                .ends_with("set: DATABASE_URL")
        );
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
    fn openai_api_key_is_never_the_push_key_and_doctor_says_so_without_quoting_it() {
        for (mode, level) in [("production", Level::Fail), ("development", Level::Warn)] {
            let checks = config(&[("NODE_ENV", mode), ("OPENAI_API_KEY", "sk-proj-abcdefgh")]);
            let check = find(&checks, "push key");
            assert_eq!(check.level, level);
            // No key at all: refused in production, the guessable default in development.
            let no_key = ["not set", "development-key"];
            assert!(
                no_key.iter().any(|w| check.message.contains(w)),
                "{}",
                check.message
            );
            let check = find(&checks, "openai key");
            assert!(check.message.contains("never"), "{}", check.message);
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
        let message = &find(&checks, "key whitespace").message;
        assert!(
            message.contains("refuse a header value with a newline"),
            "{message}"
        );
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
        let jwks_only = [("SUPABASE_URL", "https://abcd.supabase.co"), production[1]];
        let checks = config(&jwks_only);
        let auth = find(&checks, "subscriber auth");
        assert_eq!(
            auth.level,
            Level::Ok,
            "SUPABASE_URL alone is subscriber auth"
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
