//! schema.sql and `taskcast migrate` on real databases (Postgres only).

use serde_json::{Value, json};
use taskcast::store::schema::migrate;

use crate::helpers::{TestDb, spawn_app_on};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_twice_is_a_no_op() {
    let db = TestDb::create().await;
    let first = migrate(&db.url).await.expect("first migrate");
    assert!(
        first.iter().any(|c| c.contains("created table")),
        "{first:?}"
    );
    let second = migrate(&db.url).await.expect("second migrate");
    assert!(second.is_empty(), "second migrate changed {second:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_adds_the_guides_columns_to_an_existing_table_and_keeps_rows() {
    let db = TestDb::create().await;
    let client = db.client().await;
    client
        .batch_execute(crate::helpers::GUIDE_ERA_TABLE)
        .await
        .unwrap();
    client
        .batch_execute("INSERT INTO image_tasks (prompt, status) VALUES ('kept', 'processing')")
        .await
        .unwrap();
    let changes = migrate(&db.url).await.expect("migrate");
    for column in ["progress", "stage", "taskcast_version", "taskcast_seq"] {
        assert!(
            changes.contains(&format!("added column {column}")),
            "{changes:?}"
        );
    }
    let row = client
        .query_one(
            "SELECT data_type FROM information_schema.columns \
             WHERE table_schema = 'public' AND table_name = 'image_tasks' AND column_name = 'progress'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "numeric");
    let kept: i64 = client
        .query_one(
            "SELECT count(*) FROM image_tasks WHERE prompt = 'kept'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(kept, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_is_safe_no_execute_sql_and_helper_not_public() {
    let db = TestDb::create().await;
    migrate(&db.url).await.unwrap();
    let client = db.client().await;
    let exec_sql: bool = client
        .query_one(
            "SELECT to_regprocedure('public.execute_sql(text)') IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!exec_sql);
    let public_can_run: bool = client
        .query_one(
            "SELECT has_function_privilege('public', 'public.check_column_exists(text,text)', 'EXECUTE')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!public_can_run);
    let statements: String = crate::helpers::schema_sql()
        .lines()
        .filter(|line| !line.trim_start().starts_with("--"))
        .collect();
    assert!(!statements.contains("pg_reload_conf") && !statements.contains("execute_sql"));
    let exists: bool = client
        .query_one(
            "SELECT column_exists FROM public.check_column_exists('image_tasks', 'stage')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(exists);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_columns_give_422_until_migrate_then_pushes_work_without_restart() {
    let db = TestDb::create().await;
    let client = db.client().await;
    client
        .batch_execute(crate::helpers::GUIDE_ERA_TABLE)
        .await
        .unwrap();
    let id: uuid::Uuid = client
        .query_one(
            "INSERT INTO image_tasks (prompt) VALUES ('p') RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let url = db.url.clone();
    let app = spawn_app_on(url.clone(), Some(db)).await;

    let response = app
        .push(id, json!({"progress": 10, "stage": "generating"}))
        .await;
    assert_eq!(response.status(), 422);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "schema_missing");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("progress") && message.contains("stage"),
        "{message}"
    );
    assert!(message.contains("taskcast migrate"), "{message}");
    let ready = app.http.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 422);

    migrate(&url).await.expect("migrate");

    let answer = app
        .push_ok(id.into(), json!({"progress": 10, "stage": "generating"}))
        .await;
    assert_eq!(answer["applied"], true);
    let ready = app.http.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let row = client
        .query_one(
            "SELECT progress::float8, stage FROM image_tasks WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, Option<f64>>(0), Some(10.0));
    assert_eq!(
        row.get::<_, Option<String>>(1).as_deref(),
        Some("generating")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_table_is_named_in_the_422() {
    let db = TestDb::create().await;
    let url = db.url.clone();
    let app = spawn_app_on(url, Some(db)).await;
    let response = app.push(uuid::Uuid::new_v4(), json!({"progress": 1})).await;
    assert_eq!(response.status(), 422);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("table public.image_tasks")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_migrating_at_once_both_succeed() {
    let db = TestDb::create().await;
    let (a, b) = tokio::join!(migrate(&db.url), migrate(&db.url));
    let (a, b) = (a.expect("first"), b.expect("second"));
    // The advisory lock serializes them: one did the work, the other found it done.
    assert!(a.is_empty() != b.is_empty(), "a: {a:?}, b: {b:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_reports_every_column_it_adds() {
    let db = TestDb::create().await;
    let client = db.client().await;
    client
        .batch_execute("CREATE TABLE public.image_tasks (id uuid PRIMARY KEY, status text)")
        .await
        .unwrap();
    let changes = migrate(&db.url).await.expect("migrate");
    for column in [
        "user_id",
        "prompt",
        "progress",
        "stage",
        "image_url",
        "error",
        "created_at",
        "updated_at",
        "taskcast_version",
        "taskcast_seq",
    ] {
        assert!(
            changes.contains(&format!("added column {column}")),
            "{column}: {changes:?}"
        );
    }
}

/// Migrates `db`, runs `sql` (taking something of schema.sql away, or putting back what an
/// earlier schema.sql made), and returns what a second migrate reports.
async fn migrate_again_after(db: &TestDb, sql: &str) -> Vec<String> {
    migrate(&db.url).await.expect("first migrate");
    db.client().await.batch_execute(sql).await.unwrap();
    migrate(&db.url).await.expect("second migrate")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_on_an_empty_database_reports_every_object_it_creates() {
    let db = TestDb::create().await;
    let changes = migrate(&db.url).await.expect("migrate");
    assert_eq!(
        changes,
        [
            "created table public.image_tasks",
            "installed triggers taskcast_bump_version, taskcast_notify, taskcast_notify_insert \
             and taskcast_notify_delete (channel taskcast)",
            "created indexes image_tasks_cancel_requested_at and \
             image_tasks_user_id_idx",
            "created function public.check_column_exists (EXECUTE revoked from PUBLIC)",
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_drops_the_old_feed_index_that_kept_pushes_from_being_hot_updates() {
    let db = TestDb::create().await;
    let changes = migrate_again_after(
        &db,
        "CREATE INDEX image_tasks_user_id_updated_at_idx \
           ON public.image_tasks (user_id, updated_at DESC)",
    )
    .await;
    assert_eq!(
        changes,
        [
            "dropped index image_tasks_user_id_updated_at_idx (it indexed a column every push \
          writes, so no push could be a HOT update)"
        ]
    );
}

/// A push writes these columns; an index on any of them makes every push a non-HOT update
/// (a new entry in every index, a dead row for VACUUM).
const PUSHED_COLUMNS: [&str; 12] = [
    "progress",
    "stage",
    "status",
    "image_url",
    "error",
    "updated_at",
    "step",
    "total_steps",
    "preview_url",
    "stalled_since",
    "taskcast_version",
    "taskcast_seq",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_index_schema_sql_creates_holds_a_column_a_push_writes() {
    let db = TestDb::create().await;
    migrate(&db.url).await.expect("migrate");
    let client = db.client().await;
    let rows = client
        .query(
            "SELECT i.indexrelid::regclass::text, a.attname::text FROM pg_index i \
               JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
             WHERE i.indrelid = 'public.image_tasks'::regclass",
            &[],
        )
        .await
        .unwrap();
    let indexed: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert!(
        indexed.iter().any(|(_, column)| column == "user_id"),
        "{indexed:?}"
    );
    let pushed: Vec<_> = (indexed.iter())
        .filter(|(_, column)| PUSHED_COLUMNS.contains(&column.as_str()))
        .collect();
    assert!(pushed.is_empty(), "indexes on pushed columns: {pushed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_reports_only_the_feed_index_when_only_it_was_missing() {
    let db = TestDb::create().await;
    let changes = migrate_again_after(&db, "DROP INDEX public.image_tasks_user_id_idx").await;
    assert_eq!(changes, ["created index image_tasks_user_id_idx"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_reports_the_cancel_index_when_it_creates_it() {
    let db = TestDb::create().await;
    let changes =
        migrate_again_after(&db, "DROP INDEX public.image_tasks_cancel_requested_at").await;
    assert_eq!(changes, ["created index image_tasks_cancel_requested_at"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_reports_the_delete_trigger_when_it_installs_it() {
    let db = TestDb::create().await;
    let changes = migrate_again_after(
        &db,
        "DROP TRIGGER taskcast_notify_delete ON public.image_tasks",
    )
    .await;
    assert_eq!(
        changes,
        ["installed trigger taskcast_notify_delete (channel taskcast)"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_reports_the_insert_trigger_and_feed_index_of_a_database_from_before_feeds() {
    let db = TestDb::create().await;
    let changes = migrate_again_after(
        &db,
        "DROP TRIGGER taskcast_notify_insert ON public.image_tasks; \
         DROP INDEX public.image_tasks_user_id_idx",
    )
    .await;
    assert_eq!(
        changes,
        [
            "installed trigger taskcast_notify_insert (channel taskcast)",
            "created index image_tasks_user_id_idx",
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_reports_the_version_trigger_without_a_channel_it_does_not_send_on() {
    let db = TestDb::create().await;
    let changes = migrate_again_after(
        &db,
        "DROP TRIGGER taskcast_bump_version ON public.image_tasks",
    )
    .await;
    assert_eq!(changes, ["installed trigger taskcast_bump_version"]);
}

/// The UPDATE notify trigger and its function as schema.sql installed them before the
/// trigger stopped keeping old rows (the function built its payload entry by entry).
const OLD_NOTIFY: &str = "
CREATE OR REPLACE FUNCTION public.taskcast_notify()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog
AS $$
DECLARE
  channel text := coalesce(TG_ARGV[0], 'taskcast');
  payload text := '';
  entry text;
  entries text[];
BEGIN
  IF TG_OP = 'DELETE' THEN
    entries := ARRAY(SELECT o.id::text || ' ' || o.taskcast_version::text FROM old_rows o);
  ELSE
    entries := ARRAY(SELECT n.id::text || ' ' || n.taskcast_version::text FROM new_rows n);
  END IF;
  FOREACH entry IN ARRAY entries
  LOOP
    IF payload <> '' AND octet_length(payload) + 1 + octet_length(entry) > 7999 THEN
      PERFORM pg_notify(channel, payload);
      payload := '';
    END IF;
    payload := CASE WHEN payload = '' THEN entry ELSE payload || ',' || entry END;
  END LOOP;
  IF payload <> '' THEN
    PERFORM pg_notify(channel, payload);
  END IF;
  RETURN NULL;
END
$$;
DROP TRIGGER taskcast_notify ON public.image_tasks;
CREATE TRIGGER taskcast_notify
  AFTER UPDATE ON public.image_tasks
  REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION public.taskcast_notify('taskcast');";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_replaces_the_notify_trigger_that_kept_every_old_row_and_says_so() {
    let db = TestDb::create().await;
    let changes = migrate_again_after(&db, OLD_NOTIFY).await;
    assert_eq!(
        changes,
        [
            "updated trigger taskcast_notify",
            "updated function public.taskcast_notify",
        ]
    );
    let definition: String = db
        .client()
        .await
        .query_one(
            "SELECT pg_get_triggerdef(oid) FROM pg_trigger \
             WHERE tgrelid = 'public.image_tasks'::regclass AND tgname = 'taskcast_notify'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        definition.contains("REFERENCING NEW TABLE AS new_rows")
            && !definition.contains("OLD TABLE"),
        "{definition}"
    );
    let third = migrate(&db.url).await.expect("third migrate");
    assert!(third.is_empty(), "a rerun changed {third:?}");
}
