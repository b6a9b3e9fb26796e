//! `taskcast doctor` as an operator runs it: the real binary with a clean environment,
//! against real databases in the states the deployment guide leaves them. Every run also
//! checks that no part of any secret passed in (8 characters or more) was printed.

use std::time::Duration;

use serde_json::Value;
use taskcast::store::schema::migrate;
use tokio::process::Command;

use crate::helpers::TestDb;

const PUSH_KEY: &str = "k7Qx2v9LmP4wR8tZ3nB6yH1cJ5dF0gS2aE";
const SUBSCRIBE_SECRET: &str = "s3Vb8Nq1Xw6Ze4Ry9Tu2Io7Pa5Sd0Fg3HjK";
const OPENAI_KEY: &str = "sk-proj-Lm4Nb7Vc2Xz9Qw1Er5Ty8Ui3Op6As0Df";
const DB_PASSWORD: &str = "p9Wq2Ex7Rt4Yu1IoZ";
const SECRETS: [&str; 4] = [PUSH_KEY, SUBSCRIBE_SECRET, OPENAI_KEY, DB_PASSWORD];
const APP_URL: &str = "https://app.example.com";

/// The deployment guide's migration (选项1), exactly as the guide prints it.
const GUIDE_SQL: &str = r#"-- 添加任务进度和阶段列
ALTER TABLE public.image_tasks 
ADD COLUMN IF NOT EXISTS progress NUMERIC DEFAULT NULL;

ALTER TABLE public.image_tasks 
ADD COLUMN IF NOT EXISTS stage TEXT DEFAULT NULL;

-- 创建辅助函数用于检查列是否存在
CREATE OR REPLACE FUNCTION public.check_column_exists(
  table_name_param TEXT,
  column_name_param TEXT
)
RETURNS TABLE (column_exists BOOLEAN) SECURITY DEFINER AS $$
BEGIN
  RETURN QUERY
  SELECT COUNT(*) > 0 AS column_exists
  FROM information_schema.columns
  WHERE table_name = table_name_param
  AND column_name = column_name_param
  AND table_schema = 'public';
END;
$$ LANGUAGE plpgsql;

-- 创建SQL执行函数
CREATE OR REPLACE FUNCTION public.execute_sql(sql_query TEXT)
RETURNS VOID SECURITY DEFINER AS $$
BEGIN
  EXECUTE sql_query;
END;
$$ LANGUAGE plpgsql;
"#;

const DROP_EXECUTE_SQL: &str = "DROP FUNCTION IF EXISTS public.execute_sql(text);";
const REVOKE_HELPER: &str =
    "REVOKE EXECUTE ON FUNCTION public.check_column_exists(text, text) FROM PUBLIC;";

struct Outcome {
    success: bool,
    stdout: String,
}

impl Outcome {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).expect("doctor --json prints one JSON document")
    }

    /// The text line of the check called `name`: level, then the name padded by 2+ spaces.
    fn line(&self, name: &str) -> &str {
        let padded = format!("{name}  ");
        (self.stdout.lines())
            .find(|line| {
                line.split_once(' ')
                    .is_some_and(|(_, rest)| rest.trim_start().starts_with(&padded))
            })
            .unwrap_or_else(|| panic!("no `{name}` line in:\n{}", self.stdout))
    }
}

/// The level of each check in a `--json` report, by name.
fn levels(report: &Value) -> Vec<(String, String)> {
    (report["checks"].as_array().expect("checks").iter())
        .map(|c| {
            (
                c["name"].as_str().unwrap().into(),
                c["level"].as_str().unwrap().into(),
            )
        })
        .collect()
}

fn level_of(report: &Value, name: &str) -> String {
    (levels(report).into_iter())
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no check {name} in {report}"))
        .1
}

/// Runs `taskcast doctor [--json]` with only PATH and `vars` in its environment.
async fn doctor(vars: &[(&str, &str)], json: bool) -> Outcome {
    let mut command = Command::new(env!("CARGO_BIN_EXE_taskcast"));
    command.arg("doctor").env_clear();
    command.env("PATH", std::env::var("PATH").unwrap_or_default());
    command.envs(vars.iter().copied());
    if json {
        command.arg("--json");
    }
    let output = tokio::time::timeout(Duration::from_secs(30), command.output())
        .await
        .expect("doctor finishes within 30 s")
        .expect("the taskcast binary runs");
    let stdout = String::from_utf8(output.stdout).expect("UTF-8 stdout");
    let stderr = String::from_utf8(output.stderr).expect("UTF-8 stderr");
    for secret in SECRETS {
        let chars: Vec<char> = secret.chars().collect();
        for piece in chars.windows(8).map(String::from_iter) {
            let printed = stdout.contains(&piece) || stderr.contains(&piece);
            assert!(
                !printed,
                "doctor printed {piece:?}, part of a secret:\n{stdout}{stderr}"
            );
        }
    }
    Outcome {
        success: output.status.success(),
        stdout,
    }
}

/// A database URL that carries a password (trust auth ignores it), so that every test
/// also checks the password is never printed.
fn url_with_password(db: &TestDb) -> String {
    format!("{} password={DB_PASSWORD}", db.url)
}

fn production_env(database_url: &str) -> Vec<(&str, &str)> {
    vec![
        ("NODE_ENV", "production"),
        ("TASK_PROCESS_SECRET_KEY", PUSH_KEY),
        ("TASKCAST_SUBSCRIBE_SECRET", SUBSCRIBE_SECRET),
        ("NEXT_PUBLIC_APP_URL", APP_URL),
        ("DATABASE_URL", database_url),
    ]
}

/// A database where the operator ran the guide's SQL on the guide-era table.
async fn guide_database() -> TestDb {
    let db = TestDb::create().await;
    let client = db.client().await;
    client
        .batch_execute(crate::helpers::GUIDE_ERA_TABLE)
        .await
        .expect("guide-era table");
    client
        .batch_execute(GUIDE_SQL)
        .await
        .expect("the guide's SQL runs as written");
    db
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migrated_database_with_strong_keys_in_production_passes_every_check() {
    let db = TestDb::create().await;
    migrate(&db.url).await.expect("migrate");
    let url = url_with_password(&db);
    let env = production_env(&url);

    let text = doctor(&env, false).await;
    assert!(text.success, "doctor failed:\n{}", text.stdout);
    let (checks, summary) = text
        .stdout
        .trim_end()
        .rsplit_once("\n\n")
        .expect("a summary");
    for line in checks.lines().filter(|l| !l.starts_with(' ')) {
        assert!(line.starts_with("ok "), "not ok: {line}\n{}", text.stdout);
    }
    assert!(summary.ends_with(" ok, 0 warn, 0 fail"), "{summary}");
    assert!(
        text.line("push key")
            .contains("from TASK_PROCESS_SECRET_KEY, 34 characters")
    );

    let report = doctor(&env, true).await.json();
    assert_eq!(report["ok"], true, "{report}");
    for name in [
        "push key",
        "subscriber auth",
        "database",
        "column progress",
        "column stage",
    ] {
        assert_eq!(level_of(&report, name), "ok", "{report}");
    }
    assert!(
        levels(&report).iter().all(|(_, level)| level == "ok"),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guide_era_table_without_progress_and_stage_fails_and_says_taskcast_migrate() {
    let db = TestDb::create().await;
    db.client()
        .await
        .batch_execute(crate::helpers::GUIDE_ERA_TABLE)
        .await
        .expect("guide-era table");
    let url = url_with_password(&db);
    let env = production_env(&url);

    let text = doctor(&env, false).await;
    assert!(!text.success, "doctor passed:\n{}", text.stdout);
    for column in ["progress", "stage"] {
        let line = text.line(&format!("column {column}"));
        assert!(line.starts_with("fail ") && line.contains(column), "{line}");
    }
    assert!(
        text.stdout.contains("fix: run `taskcast migrate`"),
        "{}",
        text.stdout
    );

    let report = doctor(&env, true).await.json();
    assert_eq!(report["ok"], false);
    assert_eq!(level_of(&report, "column progress"), "fail");
    assert_eq!(level_of(&report, "column stage"), "fail");
    assert_eq!(
        level_of(&report, "schema"),
        "fail",
        "taskcast_version is missing too"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guides_own_sql_is_critical_with_the_exact_drop_and_revoke_statements() {
    let db = guide_database().await;
    let url = url_with_password(&db);
    let env = production_env(&url);

    let text = doctor(&env, false).await;
    assert!(!text.success, "doctor passed:\n{}", text.stdout);
    let line = text.line("execute_sql");
    assert!(
        line.starts_with("CRITICAL ") && line.contains("SECURITY DEFINER"),
        "{line}"
    );
    assert!(line.contains("/rest/v1/rpc/execute_sql"), "{line}");
    assert!(
        text.stdout.contains(&format!("fix: {DROP_EXECUTE_SQL}")),
        "{}",
        text.stdout
    );
    assert!(text.line("check_column_exists").starts_with("CRITICAL "));
    assert!(text.stdout.contains(REVOKE_HELPER), "{}", text.stdout);
    assert!(text.stdout.contains("(2 CRITICAL)"), "{}", text.stdout);
    // The guide's migration did add the columns; only the functions are wrong.
    assert!(text.line("column progress").starts_with("ok "));

    let report = doctor(&env, true).await.json();
    assert_eq!(level_of(&report, "execute_sql"), "critical");
    assert_eq!(level_of(&report, "check_column_exists"), "critical");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_printed_fixes_and_a_migrate_make_a_guide_database_pass() {
    let db = guide_database().await;
    let url = url_with_password(&db);
    let env = production_env(&url);
    let report = doctor(&env, true).await.json();
    let statements: Vec<String> = (report["checks"].as_array().unwrap().iter())
        .filter(|c| c["level"] == "critical")
        .flat_map(|c| c["fix"].as_str().expect("a fix").lines().map(String::from))
        .filter(|line| line.ends_with(';'))
        .collect();
    assert!(
        statements.iter().any(|s| s == DROP_EXECUTE_SQL),
        "{statements:?}"
    );
    let client = db.client().await;
    for statement in &statements {
        client
            .batch_execute(statement)
            .await
            .expect("the printed SQL runs");
    }

    let report = doctor(&env, true).await.json();
    assert!(
        levels(&report).iter().all(|(_, l)| l != "critical"),
        "{report}"
    );
    assert_eq!(level_of(&report, "execute_sql"), "ok");
    assert_eq!(
        level_of(&report, "check_column_exists"),
        "warn",
        "still SECURITY DEFINER"
    );

    migrate(&db.url).await.expect("migrate");
    let text = doctor(&env, false).await;
    assert!(
        text.success,
        "doctor failed after the fixes:\n{}",
        text.stdout
    );
    assert!(
        text.stdout.ends_with(" ok, 0 warn, 0 fail\n"),
        "{}",
        text.stdout
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn production_with_only_openai_api_key_fails_as_no_key_and_warns_it_is_ignored() {
    let env = [
        ("NODE_ENV", "production"),
        ("OPENAI_API_KEY", OPENAI_KEY),
        ("TASKCAST_SUBSCRIBE_SECRET", SUBSCRIBE_SECRET),
        ("NEXT_PUBLIC_APP_URL", APP_URL),
    ];
    let text = doctor(&env, false).await;
    assert!(!text.success, "doctor passed:\n{}", text.stdout);
    // No part of OPENAI_API_KEY is a push key: there is none, and doctor says why.
    let line = text.line("push key");
    assert!(
        line.starts_with("fail ") && line.contains("is not set, nor any fallback"),
        "{line}"
    );
    let line = text.line("openai key");
    assert!(
        line.starts_with("warn ") && line.contains("never") && line.contains("public"),
        "{line}"
    );
    assert!(
        text.stdout.contains("fix: set TASK_PROCESS_SECRET_KEY"),
        "{}",
        text.stdout
    );
    let report = doctor(&env, true).await.json();
    assert_eq!(level_of(&report, "push key"), "fail");
    assert_eq!(level_of(&report, "openai key"), "warn");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_database_url_doctor_warns_about_the_in_memory_store() {
    let env = [
        ("TASK_PROCESS_SECRET_KEY", PUSH_KEY),
        ("TASKCAST_SUBSCRIBE_SECRET", SUBSCRIBE_SECRET),
        ("NEXT_PUBLIC_APP_URL", APP_URL),
    ];
    let text = doctor(&env, false).await;
    assert!(text.success, "a warning is not a failure:\n{}", text.stdout);
    let line = text.line("database");
    assert!(
        line.starts_with("warn ") && line.contains("in-memory store"),
        "{line}"
    );
    let report = doctor(&env, true).await.json();
    assert_eq!(report["ok"], true);
    assert_eq!(level_of(&report, "database"), "warn");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn development_defaults_are_warnings_and_the_same_settings_fail_in_production() {
    let text = doctor(&[], false).await;
    assert!(text.success, "{}", text.stdout);
    for name in ["app url", "push key", "subscriber auth", "database"] {
        assert!(text.line(name).starts_with("warn "), "{}", text.stdout);
    }
    assert!(
        text.line("push key").contains("development-key"),
        "{}",
        text.stdout
    );

    let text = doctor(&[("APP_ENV", "production")], false).await;
    assert!(!text.success, "{}", text.stdout);
    assert!(
        text.line("push key").starts_with("fail "),
        "{}",
        text.stdout
    );
    assert!(
        text.line("subscriber auth").starts_with("fail "),
        "{}",
        text.stdout
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_fails_without_printing_its_password() {
    let url = format!("postgres://postgres:{DB_PASSWORD}@127.0.0.1:1/taskcast");
    let env = [
        ("TASK_PROCESS_SECRET_KEY", PUSH_KEY),
        ("TASKCAST_SUBSCRIBE_SECRET", SUBSCRIBE_SECRET),
        ("DATABASE_URL", url.as_str()),
    ];
    let text = doctor(&env, false).await;
    assert!(!text.success, "{}", text.stdout);
    let line = text.line("database");
    assert!(
        line.starts_with("fail ") && line.contains("127.0.0.1:1"),
        "{line}"
    );
}

/// Supabase's roles, as every Supabase project has them (cluster-wide, so created once
/// whichever test gets there first).
async fn supabase_roles(db: &TestDb) {
    for role in ["anon", "authenticated", "service_role"] {
        db.client()
            .await
            .batch_execute(&format!(
                "DO $$ BEGIN CREATE ROLE {role} NOLOGIN; \
                 EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$"
            ))
            .await
            .expect("a Supabase role");
    }
}

/// Supabase's default: anon and authenticated hold every privilege on tables in public.
const SUPABASE_GRANTS: &str =
    "GRANT ALL ON public.image_tasks TO anon, authenticated, service_role";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_open_to_anon_without_rls_is_critical_everywhere_until_rls_is_on() {
    let db = TestDb::create().await;
    supabase_roles(&db).await;
    let client = db.client().await;
    client
        .batch_execute(crate::helpers::GUIDE_ERA_TABLE)
        .await
        .unwrap();
    client.batch_execute(SUPABASE_GRANTS).await.unwrap();
    let url = url_with_password(&db);
    let env = production_env(&url);

    // migrate (which leaves an existing table as it is) and serve say it without doctor.
    let migrated = crate::process::taskcast(&[("DATABASE_URL", &url)], &["migrate"])
        .output()
        .await
        .unwrap();
    let printed = String::from_utf8_lossy(&migrated.stdout);
    assert!(
        printed.contains("CRITICAL: row level security is off on public.image_tasks"),
        "{printed}"
    );
    let server = crate::process::start_on(&[("DATABASE_URL", &url)], "127.0.0.1:0").await;
    let log = server.stop().await;
    assert!(
        log.contains("DATABASE EXPOSED: row level security is off"),
        "{log}"
    );

    let text = doctor(&env, false).await;
    assert!(!text.success, "{}", text.stdout);
    let line = text.line("row level security");
    assert!(
        line.starts_with("CRITICAL ") && line.contains("anon:UPDATE"),
        "{line}"
    );
    assert!(
        text.stdout
            .contains("fix: ALTER TABLE public.image_tasks ENABLE ROW LEVEL SECURITY;"),
        "{}",
        text.stdout
    );

    client
        .batch_execute("ALTER TABLE public.image_tasks ENABLE ROW LEVEL SECURITY")
        .await
        .unwrap();
    let report = doctor(&env, true).await.json();
    assert_eq!(level_of(&report, "row level security"), "ok", "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_creates_the_table_with_rls_on_and_a_policy_letting_anon_update_is_critical() {
    let db = TestDb::create().await;
    supabase_roles(&db).await;
    migrate(&db.url).await.expect("migrate");
    let client = db.client().await;
    let rls: bool = client
        .query_one(
            "SELECT relrowsecurity FROM pg_class WHERE oid = 'public.image_tasks'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(rls, "a table migrate creates has row level security on");
    client.batch_execute(SUPABASE_GRANTS).await.unwrap();
    let url = url_with_password(&db);
    let env = production_env(&url);
    let report = doctor(&env, true).await.json();
    assert_eq!(level_of(&report, "row level security"), "ok", "{report}");
    assert_eq!(report["ok"], true, "{report}");

    client
        .batch_execute(
            "CREATE POLICY \"anyone edits\" ON public.image_tasks FOR UPDATE TO anon \
             USING (true)",
        )
        .await
        .unwrap();
    let text = doctor(&env, false).await;
    assert!(!text.success, "{}", text.stdout);
    assert!(
        text.line("anon policy").starts_with("CRITICAL "),
        "{}",
        text.stdout
    );
    assert!(
        text.stdout
            .contains("fix: DROP POLICY \"anyone edits\" ON public.image_tasks;"),
        "{}",
        text.stdout
    );
}
