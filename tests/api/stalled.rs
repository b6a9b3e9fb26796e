//! Stalled tasks: a processing task without a change for the stall period is marked
//! `stalled` (with `stalled_since`), the next change clears it, and with a fail period it
//! becomes `failed` with "the generator stopped reporting", decided once by the database
//! however many nodes sweep.

use std::time::Duration;

use serde_json::{Value, json};
use taskcast::config::Config;
use taskcast::stall::StallOptions;

use crate::both_stores;
use crate::helpers::{StoreKind, Subscriber, TestDb, WAIT, spawn_app_on_with, spawn_app_with};

fn stall_after(ms: u64, fail_ms: Option<u64>) -> impl FnOnce(&mut Config) {
    move |config| {
        config.stall = StallOptions {
            after: Duration::from_millis(ms),
            fail_after: fail_ms.map(Duration::from_millis),
        };
    }
}

/// Reads states until `done` holds for one (at most 20 states); versions only grow.
async fn wait_state(sub: &mut Subscriber, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let mut seen = Vec::new();
    for _ in 0..20 {
        let state = sub.next_state().await;
        if let Some(previous) = seen.last() {
            let (p, v): (&Value, &Value) = (previous, &state);
            assert!(
                v["version"].as_i64() > p["version"].as_i64(),
                "{p} then {v}"
            );
        }
        if done(&state) {
            return state;
        }
        seen.push(state);
    }
    panic!("no state that is {what}; saw {seen:?}");
}

fn is_stalled(state: &Value) -> bool {
    state["stalled"] == true
}

async fn a_quiet_processing_task_is_marked_stalled_and_the_next_push_clears_it(kind: StoreKind) {
    let app = spawn_app_with(kind, stall_after(300, None)).await;
    let task = app.create_task().await;
    let mut sub = app.subscribe(task).await;
    sub.next_state().await;
    let running = app
        .push_ok(task, json!({"status": "processing", "progress": 10}))
        .await;
    assert!(!is_stalled(&running), "{running}");
    let stalled = wait_state(&mut sub, "stalled", is_stalled).await;
    assert!(
        stalled["version"].as_i64() > running["version"].as_i64(),
        "a stall is a change subscribers get: {stalled}"
    );
    let since = stalled["stalled_since"].as_str().expect("stalled_since");
    chrono::DateTime::parse_from_rfc3339(since).expect("RFC 3339");
    assert_eq!(stalled["status"], "processing");
    assert_eq!(stalled["progress"], 10.0);
    let resumed = app.push_ok(task, json!({"progress": 20})).await;
    let state = wait_state(&mut sub, "the resumed push", |s| {
        s["version"] == resumed["version"]
    })
    .await;
    assert!(state.get("stalled").is_none(), "{state}");
    assert!(state.get("stalled_since").is_none(), "{state}");
    assert!(resumed.get("stalled").is_none(), "{resumed}");
}

async fn a_pending_task_is_never_marked_stalled(kind: StoreKind) {
    let app = spawn_app_with(kind, stall_after(100, None)).await;
    let waiting = app.create_task().await;
    let running = app.create_task().await;
    let mut sub = app.subscribe(waiting).await;
    sub.next_state().await;
    app.push_ok(running, json!({"status": "processing"})).await;
    // Once the running task is marked, the sweep has looked at the waiting one too.
    let mut watcher = app.subscribe(running).await;
    wait_state(&mut watcher, "stalled", is_stalled).await;
    let now = app.get_task(waiting).await.json::<Value>().await.unwrap();
    assert_eq!(now["version"], 0, "{now}");
    assert!(now.get("stalled").is_none(), "{now}");
}

async fn with_a_fail_period_a_quiet_task_fails_with_the_stall_error(kind: StoreKind) {
    let app = spawn_app_with(kind, stall_after(200, Some(600))).await;
    let task = app.create_task().await;
    let mut sub = app.subscribe(task).await;
    sub.next_state().await;
    app.push_ok(task, json!({"status": "processing"})).await;
    let failed = wait_state(&mut sub, "failed", |s| s["status"] == "failed").await;
    assert_eq!(failed["error"], "the generator stopped reporting");
    assert!(failed.get("stalled").is_none(), "{failed}");
    // Final: a late push from the generator is refused.
    assert_eq!(app.push(task, json!({"progress": 90})).await.status(), 409);
}

both_stores!(
    a_quiet_processing_task_is_marked_stalled_and_the_next_push_clears_it,
    a_pending_task_is_never_marked_stalled,
    with_a_fail_period_a_quiet_task_fails_with_the_stall_error,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_sql_change_clears_the_stall() {
    let app = spawn_app_with(StoreKind::Postgres, stall_after(200, None)).await;
    let task = app.create_task().await;
    let mut sub = app.subscribe(task).await;
    sub.next_state().await;
    app.push_ok(task, json!({"status": "processing"})).await;
    wait_state(&mut sub, "stalled", is_stalled).await;
    let sql = app.db.as_ref().expect("a database").client().await;
    sql.execute(
        "UPDATE public.image_tasks SET progress = 55 WHERE id = $1::text::uuid",
        &[&task.to_string()],
    )
    .await
    .unwrap();
    let state = wait_state(&mut sub, "the SQL change", |s| s["progress"] == 55.0).await;
    assert!(state.get("stalled").is_none(), "{state}");
    let row = sql
        .query_one(
            "SELECT stalled_since IS NULL FROM public.image_tasks WHERE id = $1::text::uuid",
            &[&task.to_string()],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0), "the trigger clears the column");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_mark_and_fail_a_task_exactly_once() {
    let db = TestDb::create().await;
    taskcast::store::schema::migrate(&db.url).await.unwrap();
    let url = db.url.clone();
    // Short periods: both nodes sweep about every 50 ms.
    let one = spawn_app_on_with(url.clone(), Some(db), stall_after(200, Some(700))).await;
    let two = spawn_app_on_with(url, None, stall_after(200, Some(700))).await;
    let task = one.create_task().await;
    let mut subs = vec![one.subscribe(task).await, two.subscribe(task).await];
    for sub in &mut subs {
        sub.next_state().await;
    }
    let running = one.push_ok(task, json!({"status": "processing"})).await;
    let v = running["version"].as_i64().unwrap();
    for sub in &mut subs {
        let failed = wait_state(sub, "failed", |s| s["status"] == "failed").await;
        assert_eq!(failed["error"], "the generator stopped reporting");
        // Marked once (v + 1), failed once (v + 2): a second node acting would add a version.
        assert_eq!(failed["version"], v + 2, "{failed}");
    }
    let sql = one.db.as_ref().expect("a database").client().await;
    let row = sql
        .query_one(
            "SELECT taskcast_version, status FROM public.image_tasks WHERE id = $1::text::uuid",
            &[&task.to_string()],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), v + 2);
    assert_eq!(row.get::<_, String>(1), "failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stalled_tasks_gauge_counts_the_stalled_tasks() {
    let app = spawn_app_with(StoreKind::Postgres, stall_after(100, None)).await;
    for _ in 0..5 {
        let task = app.create_task().await;
        app.push_ok(task, json!({"status": "processing"})).await;
    }
    // Other tests' nodes in this process set the same gauge from their own tables, so
    // wait (bounded) for this node's count rather than read it once.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let metrics = app
            .http
            .get(app.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if metrics.lines().any(|l| l == "taskcast_stalled_tasks 5") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "taskcast_stalled_tasks never read 5: {}",
            metrics
                .lines()
                .filter(|l| l.contains("stalled"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_without_stalled_since_takes_pushes_and_still_fails_quiet_tasks() {
    let db = TestDb::create().await;
    taskcast::store::schema::migrate(&db.url).await.unwrap();
    db.client()
        .await
        .batch_execute("ALTER TABLE public.image_tasks DROP COLUMN stalled_since")
        .await
        .unwrap();
    let url = db.url.clone();
    let app = spawn_app_on_with(url, Some(db), stall_after(100, Some(400))).await;
    let task = app.create_task().await;
    let mut sub = app.subscribe(task).await;
    sub.next_state().await;
    let running = app.push_ok(task, json!({"status": "processing"})).await;
    assert!(running.get("stalled").is_none(), "{running}");
    let failed = wait_state(&mut sub, "failed", |s| s["status"] == "failed").await;
    assert!(
        failed.get("stalled").is_none(),
        "never marked without the column: {failed}"
    );
    assert_eq!(
        failed["version"],
        running["version"].as_i64().unwrap() + 1,
        "{failed}"
    );
}
