//! A node alone on its database skips the NOTIFY for its own pushes (it publishes them
//! itself, and no other node listens); plain SQL still notifies, a node that starts
//! listening gets every push from then on, and a quiet push whose answer was lost still
//! reaches the subscribers.

use std::time::Duration;

use futures::StreamExt;
use serde_json::json;

use crate::helpers::{
    Subscriber, Tap, TestApp, TestDb, kill_listeners, listen, spawn_app_on, spawn_app_on_with,
    wait_until,
};
use taskcast::domain::TaskId;
use taskcast::store::NotifyOwnPushes;

async fn migrated() -> TestDb {
    let db = TestDb::create().await;
    taskcast::store::schema::migrate(&db.url)
        .await
        .expect("migrate");
    db
}

fn quiet(node: &TestApp) -> bool {
    node.quiet.as_ref().expect("a Postgres node").is_on()
}

type Payloads = futures::channel::mpsc::UnboundedReceiver<String>;

/// The next payload that `wanted` accepts (others are skipped), within 10 s.
async fn next_payload(rx: &mut Payloads, what: &str, wanted: impl Fn(&str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let payload = tokio::time::timeout_at(deadline, rx.next())
            .await
            .unwrap_or_else(|_| panic!("{what} within 10 s"))
            .expect("the listening connection is open");
        if wanted(&payload) {
            return payload;
        }
    }
}

fn is_hello(payload: &str) -> bool {
    payload.starts_with("taskcast:node:")
}

/// The payloads that arrive within `window`, in order.
async fn payloads_within(rx: &mut Payloads, window: Duration) -> Vec<String> {
    let mut seen = Vec::new();
    let until = tokio::time::Instant::now() + window;
    while let Ok(Some(payload)) = tokio::time::timeout_at(until, rx.next()).await {
        seen.push(payload);
    }
    seen
}

/// Waits for three hellos: the one sent on connecting and two checks' (each sent with its
/// check, before the node acts on the answer), so a node alone has acted on finding itself
/// alone at least once.
async fn checked_alone(notifications: &mut Payloads) {
    for _ in 0..3 {
        next_payload(notifications, "the node says hello", is_hello).await;
    }
}

/// Once `node` is quiet: a push to a new task reaches the node's own subscriber, with the
/// push's version, and is not notified. Returns the task and its subscriber.
async fn quiet_push_reaches_its_subscriber(
    node: &TestApp,
    notifications: &mut Payloads,
) -> (TaskId, Subscriber) {
    wait_until(|| quiet(node)).await;
    let task = node.create_task().await;
    let mut sub = node.subscribe(task).await;
    sub.next_state().await;

    // Drain what came so far (the task's INSERT, the node's hellos).
    payloads_within(notifications, Duration::from_millis(100)).await;
    let answer = node
        .push_ok(task, json!({"progress": 40, "stage": "quiet"}))
        .await;
    let state = sub.next_state().await;
    assert_eq!(
        (&state["stage"], &state["version"]),
        (&json!("quiet"), &answer["version"]),
        "the node publishes it itself"
    );
    assert!(quiet(node));
    let after_push = payloads_within(notifications, Duration::from_millis(500)).await;
    assert!(
        !after_push.iter().any(|p| p.contains(&task.to_string())),
        "the push was notified: {after_push:?} (version {})",
        answer["version"]
    );
    (task, sub)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_alone_skips_the_notify_for_its_pushes_and_plain_sql_still_notifies() {
    let db = migrated().await;
    let (_client, mut notifications) = listen(&db).await;
    let node = spawn_app_on(db.url.clone(), None).await;
    let (task, mut sub) = quiet_push_reaches_its_subscriber(&node, &mut notifications).await;

    // The app's own UPDATE is not taskcast's: it notifies, and the node delivers it.
    let client = db.client().await;
    client
        .execute(
            "UPDATE public.image_tasks SET stage = 'plain sql' WHERE id = $1",
            &[&task.as_uuid()],
        )
        .await
        .unwrap();
    assert_eq!(sub.next_state().await["stage"], "plain sql");
    let after_sql = payloads_within(&mut notifications, Duration::from_millis(500)).await;
    assert!(
        after_sql.iter().any(|p| p.contains(&task.to_string())),
        "plain SQL was not notified: {after_sql:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_that_went_out_quiet_after_another_node_listened_reaches_that_node() {
    let db = migrated().await;
    let (_client, mut notifications) = listen(&db).await;
    let tap = Tap::to_db(&db).await;
    let a = spawn_app_on(tap.url(&db), None).await;
    wait_until(|| quiet(&a)).await;
    let task = a.create_task().await;

    // Hold the first node's next check for other nodes: it keeps the quiet it has, and
    // hears nothing (its listener waits on the check).
    let mut held = tap.catch(b"pg_stat_activity").caught().await;
    // What the first node said so far (its hellos, the task's INSERT): not the second's.
    let earlier = payloads_within(&mut notifications, Duration::from_millis(100)).await;
    let b = spawn_app_on(db.url.clone(), None).await;
    // The second node's hello: its listener is connected (and then reads its subscribed
    // tasks, none yet; the pause lets that finish, so it cannot pick up the push below).
    next_payload(&mut notifications, "the second node says hello", |p| {
        is_hello(p) && !earlier.iter().any(|e| e == p)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut sub = b.subscribe(task).await;
    sub.next_state().await;
    let answer = a
        .push_ok(task, json!({"progress": 70, "stage": "quiet, unseen"}))
        .await;
    assert!(quiet(&a), "the push went out quiet");

    // The check answers: another node listens. The first node notifies from now on, and
    // tells the second to read its tasks again, which brings it the quiet push.
    held.run().await;
    held.release();
    let state = sub.next_state().await;
    assert_eq!(
        (&state["stage"], &state["version"]),
        (&json!("quiet, unseen"), &answer["version"])
    );
    assert!(!quiet(&a));
    assert!(!quiet(&b), "neither node is alone");
    // The quiet push was never notified (what came meanwhile: hellos, the first node's
    // loud).
    let pushed = format!("{task} {}", answer["version"]);
    let since = payloads_within(&mut notifications, Duration::from_millis(100)).await;
    assert!(
        !since.iter().any(|p| p.contains(&pushed)),
        "the push was notified: {since:?}"
    );
    let answer = a.push_ok(task, json!({"stage": "after"})).await;
    let state = sub.next_state().await;
    assert_eq!(
        (&state["stage"], &state["version"]),
        (&json!("after"), &answer["version"])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_own_pushes_always_keeps_notifying_a_node_alone() {
    let db = migrated().await;
    let (_client, mut notifications) = listen(&db).await;
    let node = spawn_app_on_with(db.url.clone(), None, |config| {
        config.notify_own_pushes = NotifyOwnPushes::Always;
    })
    .await;
    checked_alone(&mut notifications).await;
    assert!(!quiet(&node));
    let task = node.create_task().await;
    // Drain the task's INSERT notification.
    payloads_within(&mut notifications, Duration::from_millis(100)).await;
    node.push_ok(task, json!({"progress": 5})).await;
    let after_push = payloads_within(&mut notifications, Duration::from_millis(1000)).await;
    assert!(
        after_push.iter().any(|p| p.contains(&task.to_string())),
        "the push was not notified: {after_push:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_push_whose_commit_answer_is_lost_still_reaches_its_subscribers() {
    let db = migrated().await;
    let tap = Tap::to_db(&db).await;
    let node = spawn_app_on_with(tap.url(&db), None, |config| {
        config.limits.db_timeout = Duration::from_millis(1000);
    })
    .await;
    wait_until(|| quiet(&node)).await;
    let task = node.create_task().await;
    let mut sub = node.subscribe(task).await;
    sub.next_state().await;

    // The push statement binds the id as a binary uuid: catch it, let it commit, hold
    // its answer past the database timeout.
    let armed = tap.catch(task.as_uuid().expect("a uuid id").as_bytes());
    let push = {
        let (http, url) = (
            node.http.clone(),
            node.url(&format!("/api/tasks/{task}/progress")),
        );
        tokio::spawn(async move {
            http.post(url)
                .bearer_auth(crate::helpers::KEY)
                .json(&json!({"stage": "answer lost"}))
                .send()
                .await
                .unwrap()
        })
    };
    let mut caught = armed.caught().await;
    caught.run().await;
    let answer = push.await.unwrap();
    assert_eq!(
        answer.status(),
        503,
        "the commit's outcome is unknown to the pusher"
    );
    assert!(quiet(&node), "the push went out quiet");
    // No notification, but the node reads the row again.
    let state = sub.next_state().await;
    assert_eq!(state["stage"], "answer lost", "{state}");
    caught.release();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_naive_write_mode_goes_quiet_alone_and_its_pushes_still_reach_subscribers() {
    let db = migrated().await;
    let (_client, mut notifications) = listen(&db).await;
    let node = spawn_app_on_with(db.url.clone(), None, |config| {
        config.write_mode = taskcast::writer::WriteMode::Naive;
    })
    .await;
    quiet_push_reaches_its_subscriber(&node, &mut notifications).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_node_whose_listener_was_cut_says_loud_once_reconnected() {
    let db = migrated().await;
    let (client, mut notifications) = listen(&db).await;
    let node = spawn_app_on(db.url.clone(), None).await;
    wait_until(|| quiet(&node)).await;
    // A node that started while this one was deaf would not know of its quiet pushes.
    let killed = kill_listeners(&client).await;
    assert_eq!(killed, 1);
    next_payload(&mut notifications, "the node says loud once back", |p| {
        p.starts_with("taskcast:loud:")
    })
    .await;
}
