//! Places in line: a pending task's snapshot and states carry `queue_position` and
//! `queue_length`; when a task ahead starts, finishes, is deleted or a new one is created
//! (through the API, on another node, or in plain SQL) the subscribers of the pending
//! tasks behind get their new place, as the same version marked `derived`.

use serde_json::{Value, json};
use taskcast::config::Config;
use taskcast::domain::TaskId;

use crate::both_stores;
use crate::helpers::{StoreKind, Subscriber, TestApp, TestDb, spawn_app_on_with, spawn_app_with};

/// A short recount window, so a test waits milliseconds, not the default.
fn fast(config: &mut Config) {
    config.queue.window = std::time::Duration::from_millis(10);
}

async fn app(kind: StoreKind) -> TestApp {
    spawn_app_with(kind, fast).await
}

fn place(state: &Value) -> (Option<u64>, Option<u64>) {
    (
        state["queue_position"].as_u64(),
        state["queue_length"].as_u64(),
    )
}

/// Reads states until one has place `(position, length)`; versions never go backwards,
/// and at most 20 states are read.
async fn wait_place(sub: &mut Subscriber, position: u64, length: u64) -> Value {
    let mut seen = Vec::new();
    let mut last = i64::MIN;
    for _ in 0..20 {
        let state = sub.next_message_with_places().await;
        assert_eq!(state["type"], "state", "{state}");
        let version = state["version"].as_i64().expect("version");
        assert!(version >= last, "version went from {last} to {version}");
        last = version;
        if place(&state) == (Some(position), Some(length)) {
            return state;
        }
        seen.push(state);
    }
    panic!("no state with place {position} of {length}; saw {seen:?}");
}

/// A subscriber past its snapshot, and that snapshot.
async fn watch(app: &TestApp, task: TaskId) -> (Subscriber, Value) {
    let mut sub = app.subscribe(task).await;
    let snapshot = sub.next_state().await;
    assert_eq!(snapshot["snapshot"], true);
    (sub, snapshot)
}

async fn tasks(app: &TestApp, n: usize) -> Vec<TaskId> {
    let mut tasks = Vec::new();
    for _ in 0..n {
        tasks.push(app.create_task().await);
    }
    tasks
}

async fn a_pending_task_snapshot_carries_its_place_in_line(kind: StoreKind) {
    let app = app(kind).await;
    let t = tasks(&app, 3).await;
    let (_last, snapshot) = watch(&app, t[2]).await;
    assert_eq!(place(&snapshot), (Some(3), Some(3)), "{snapshot}");
    assert!(snapshot.get("derived").is_none(), "{snapshot}");
    let (_first, snapshot) = watch(&app, t[0]).await;
    assert_eq!(place(&snapshot), (Some(1), Some(3)), "{snapshot}");
    // A second subscriber to a task the hub holds gets the same place.
    let (_again, snapshot) = watch(&app, t[2]).await;
    assert_eq!(place(&snapshot), (Some(3), Some(3)), "{snapshot}");
}

async fn a_task_ahead_starting_moves_the_ones_behind_up(kind: StoreKind) {
    let app = app(kind).await;
    let t = tasks(&app, 3).await;
    let (mut second, _) = watch(&app, t[1]).await;
    let (mut third, _) = watch(&app, t[2]).await;
    app.push_ok(t[0], json!({"status": "processing"})).await;
    let moved = wait_place(&mut second, 1, 2).await;
    assert_eq!(moved["version"], 0, "a place is no new version: {moved}");
    assert_eq!(moved["derived"], true, "{moved}");
    assert_eq!(moved["status"], "pending");
    let moved = wait_place(&mut third, 2, 2).await;
    assert_eq!(moved["version"], 0, "{moved}");
}

async fn a_task_ahead_finishing_moves_the_ones_behind_up(kind: StoreKind) {
    let app = app(kind).await;
    let t = tasks(&app, 2).await;
    let (mut second, snapshot) = watch(&app, t[1]).await;
    assert_eq!(place(&snapshot), (Some(2), Some(2)));
    app.push_ok(t[0], json!({"status": "failed", "error": "no GPU"}))
        .await;
    wait_place(&mut second, 1, 1).await;
}

async fn a_new_task_is_last_and_lengthens_the_line(kind: StoreKind) {
    let app = app(kind).await;
    let t = tasks(&app, 2).await;
    let (mut first, _) = watch(&app, t[0]).await;
    let newest = app.create_task().await;
    wait_place(&mut first, 1, 3).await;
    let (_, snapshot) = watch(&app, newest).await;
    assert_eq!(place(&snapshot), (Some(3), Some(3)), "{snapshot}");
}

/// A processing task carries no place, and a recount that changes no place sends
/// nothing: the only place frame the pending subscriber gets is the one that moved it.
async fn only_pending_tasks_whose_place_changed_get_place_frames(kind: StoreKind) {
    let app = app(kind).await;
    let t = tasks(&app, 3).await;
    let running = t[0];
    app.push_ok(running, json!({"status": "processing", "progress": 5}))
        .await;
    let (mut busy, snapshot) = watch(&app, running).await;
    assert_eq!(place(&snapshot), (None, None), "{snapshot}");
    let (mut waiting, snapshot) = watch(&app, t[2]).await;
    assert_eq!(place(&snapshot), (Some(2), Some(2)), "{snapshot}");
    // Progress of a running task moves no one: the waiting task gets nothing for it.
    let answer = app.push_ok(running, json!({"progress": 50})).await;
    let state = busy.next_state().await;
    assert_eq!(state["version"], answer["version"]);
    assert_eq!(place(&state), (None, None), "{state}");
    assert!(state.get("derived").is_none(), "{state}");
    // Then one that does: the next frame the waiting task gets is that one.
    app.push_ok(t[1], json!({"status": "processing"})).await;
    let next = waiting.next_message_with_places().await;
    assert_eq!(place(&next), (Some(1), Some(1)), "{next}");
    assert_eq!(next["derived"], true);
}

both_stores!(
    a_pending_task_snapshot_carries_its_place_in_line,
    a_task_ahead_starting_moves_the_ones_behind_up,
    a_task_ahead_finishing_moves_the_ones_behind_up,
    a_new_task_is_last_and_lengthens_the_line,
    only_pending_tasks_whose_place_changed_get_place_frames,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_created_started_and_deleted_in_plain_sql_move_the_line() {
    let app = app(StoreKind::Postgres).await;
    let t = tasks(&app, 2).await;
    let (mut second, _) = watch(&app, t[1]).await;
    let sql = app.db.as_ref().expect("a database").client().await;
    sql.execute(
        "INSERT INTO public.image_tasks (prompt) VALUES ('from sql'), ('from sql too')",
        &[],
    )
    .await
    .unwrap();
    wait_place(&mut second, 2, 4).await;
    sql.execute(
        "UPDATE public.image_tasks SET status = 'running' WHERE id = $1::text::uuid",
        &[&t[0].to_string()],
    )
    .await
    .unwrap();
    wait_place(&mut second, 1, 3).await;
    sql.execute(
        "DELETE FROM public.image_tasks WHERE prompt = 'from sql'",
        &[],
    )
    .await
    .unwrap();
    wait_place(&mut second, 1, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_status_words_decide_who_is_waiting() {
    let app = spawn_app_with(StoreKind::Postgres, |config| {
        fast(config);
        config.status_map = taskcast::domain::StatusMap::parse("waiting_for_gpu:pending").unwrap();
    })
    .await;
    let t = tasks(&app, 2).await;
    let sql = app.db.as_ref().expect("a database").client().await;
    sql.execute(
        "UPDATE public.image_tasks SET status = 'waiting_for_gpu' WHERE id = $1::text::uuid",
        &[&t[0].to_string()],
    )
    .await
    .unwrap();
    let (_, snapshot) = watch(&app, t[1]).await;
    assert_eq!(place(&snapshot), (Some(2), Some(2)), "{snapshot}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn places_follow_changes_made_on_another_node() {
    let db = TestDb::create().await;
    taskcast::store::schema::migrate(&db.url).await.unwrap();
    let url = db.url.clone();
    let one = spawn_app_on_with(url.clone(), Some(db), fast).await;
    let two = spawn_app_on_with(url, None, fast).await;
    let t = tasks(&one, 2).await;
    let (mut second, snapshot) = watch(&two, t[1]).await;
    assert_eq!(place(&snapshot), (Some(2), Some(2)), "{snapshot}");
    let created = one.create_task().await;
    wait_place(&mut second, 2, 3).await;
    one.push_ok(t[0], json!({"status": "processing"})).await;
    wait_place(&mut second, 1, 2).await;
    one.push_ok(created, json!({"status": "cancelled"})).await;
    wait_place(&mut second, 1, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_column_gives_each_queue_its_own_line() {
    let db = TestDb::create().await;
    taskcast::store::schema::migrate(&db.url).await.unwrap();
    db.client()
        .await
        .batch_execute("ALTER TABLE public.image_tasks ADD COLUMN queue text")
        .await
        .unwrap();
    let url = db.url.clone();
    let app = spawn_app_on_with(url, Some(db), fast).await;
    let t = tasks(&app, 3).await;
    let sql = app.db.as_ref().expect("a database").client().await;
    sql.execute(
        "UPDATE public.image_tasks SET queue = 'gpu-b' WHERE id = $1::text::uuid",
        &[&t[1].to_string()],
    )
    .await
    .unwrap();
    let (_, snapshot) = watch(&app, t[2]).await;
    assert_eq!(place(&snapshot), (Some(2), Some(2)), "{snapshot}");
    let (_, snapshot) = watch(&app, t[1]).await;
    assert_eq!(place(&snapshot), (Some(1), Some(1)), "{snapshot}");
}
