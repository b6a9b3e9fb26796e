//! Several nodes on one Postgres: pushes and plain SQL writes reach subscribers on every
//! node through NOTIFY, and a node whose listener dies catches up.

use std::time::Duration;

use futures::StreamExt;
use serde_json::json;

use crate::helpers::{KEY, TestApp, TestDb, kill_listeners, listen, spawn_app_on};

/// `n` nodes sharing one migrated database; the first node owns (and drops) it.
pub(crate) async fn spawn_nodes(n: usize) -> (Vec<TestApp>, String) {
    let db = TestDb::create().await;
    taskcast::store::schema::migrate(&db.url)
        .await
        .expect("migrate");
    let url = db.url.clone();
    let mut nodes = vec![spawn_app_on(url.clone(), Some(db)).await];
    for _ in 1..n {
        nodes.push(spawn_app_on(url.clone(), None).await);
    }
    (nodes, url)
}

async fn client(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
}

/// One subscriber per node, past its snapshot.
async fn subscribe_on_every_node(
    nodes: &[TestApp],
    task: taskcast::domain::TaskId,
) -> Vec<crate::helpers::Subscriber> {
    let mut subs = Vec::new();
    for node in nodes {
        let mut sub = node.subscribe(task).await;
        sub.next_state().await;
        subs.push(sub);
    }
    subs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_to_one_node_reaches_subscribers_on_every_node() {
    let (nodes, _) = spawn_nodes(3).await;
    let task = nodes[0].create_task().await;
    let mut subs = subscribe_on_every_node(&nodes, task).await;
    let answer = nodes[1]
        .push_ok(task, json!({"progress": 33, "stage": "from node 1"}))
        .await;
    for sub in &mut subs {
        let state = sub.next_state().await;
        assert_eq!(state["version"], answer["version"]);
        assert_eq!(state["stage"], "from node 1");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_on_random_nodes_are_seen_in_order_everywhere_and_end_on_the_row() {
    const WRITERS: usize = 8;
    const EACH: usize = 40;
    let (nodes, url) = spawn_nodes(3).await;
    let task = nodes[0].create_task().await;
    let mut subs = subscribe_on_every_node(&nodes, task).await;
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let http = nodes[0].http.clone();
        let urls: Vec<String> = nodes
            .iter()
            .map(|n| n.url(&format!("/api/tasks/{task}/progress")))
            .collect();
        writers.push(tokio::spawn(async move {
            for i in 0..EACH {
                let url = &urls[(w * 7 + i * 13) % urls.len()];
                let body = json!({"progress": (i % 100) as f64, "stage": format!("w{w} #{i}")});
                let response = http
                    .post(url)
                    .bearer_auth(KEY)
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 200);
            }
        }));
    }
    for writer in writers {
        writer.await.unwrap();
    }
    let row = client(&url)
        .await
        .query_one(
            "SELECT taskcast_version, stage FROM image_tasks WHERE id = $1",
            &[&task.as_uuid()],
        )
        .await
        .unwrap();
    let (version, stage): (i64, String) = (row.get(0), row.get(1));
    assert_eq!(version, (WRITERS * EACH) as i64);
    for sub in &mut subs {
        // states_until_version fails on any version that does not strictly increase.
        let seen = sub.states_until_version(version).await;
        assert_eq!(seen.last().unwrap()["stage"], stage.as_str());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_sql_update_reaches_subscribers_on_all_nodes_with_its_result() {
    let (nodes, url) = spawn_nodes(3).await;
    let task = nodes[0].create_task().await;
    let mut subs = subscribe_on_every_node(&nodes, task).await;
    client(&url)
        .await
        .execute(
            "UPDATE image_tasks SET status = 'completed', progress = 100, \
             image_url = 'https://cdn.example.com/cat.png' WHERE id = $1",
            &[&task.as_uuid()],
        )
        .await
        .unwrap();
    for sub in &mut subs {
        let state = sub.next_state().await;
        assert_eq!(state["status"], "completed");
        assert_eq!(state["image_url"], "https://cdn.example.com/cat.png");
        assert_eq!(
            state["version"], 1,
            "the trigger gave the plain UPDATE a version"
        );
    }
    // A write that changes nothing browsers see gets no version and no message.
    let conn = client(&url).await;
    conn.execute(
        "UPDATE image_tasks SET prompt = 'edited' WHERE id = $1",
        &[&task.as_uuid()],
    )
    .await
    .unwrap();
    let v: i64 = conn
        .query_one(
            "SELECT taskcast_version FROM image_tasks WHERE id = $1",
            &[&task.as_uuid()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_listener_is_killed_reconnects_and_its_subscribers_converge() {
    const TASKS: usize = 5;
    let (nodes, url) = spawn_nodes(2).await;
    let admin = client(&url).await;
    let mut tasks = Vec::new();
    let mut subs = Vec::new();
    for _ in 0..TASKS {
        let task = nodes[0].create_task().await;
        let mut sub = nodes[1].subscribe(task).await;
        sub.next_state().await;
        tasks.push(task);
        subs.push(sub);
    }
    let pusher = {
        let http = nodes[0].http.clone();
        let base = nodes[0].url("");
        let tasks = tasks.clone();
        tokio::spawn(async move {
            for i in 0..300usize {
                let task = tasks[i % tasks.len()];
                let response = http
                    .post(format!("{base}/api/tasks/{task}/progress"))
                    .bearer_auth(KEY)
                    .json(&json!({"progress": (i / TASKS) as f64}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 200);
            }
        })
    };
    // Kill every listener of this database a few times while the pushes go on.
    let mut killed = 0;
    for _ in 0..3 {
        killed += kill_listeners(&admin).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert!(killed >= 2, "no listener was found to kill");
    pusher.await.unwrap();

    let mut diverged = 0;
    for (task, sub) in tasks.iter().zip(subs.iter_mut()) {
        let version: i64 = admin
            .query_one(
                "SELECT taskcast_version FROM image_tasks WHERE id = $1",
                &[&task.as_uuid()],
            )
            .await
            .unwrap()
            .get(0);
        let seen = sub.states_until_version(version).await;
        if seen.last().unwrap()["version"] != version {
            diverged += 1;
        }
    }
    assert_eq!(diverged, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_500_row_statement_sends_at_most_ceil_payload_over_8000_notifications() {
    let db = TestDb::create().await;
    taskcast::store::schema::migrate(&db.url).await.unwrap();
    let writer = db.client().await;
    writer
        .batch_execute("INSERT INTO image_tasks (prompt) SELECT 'p' FROM generate_series(1, 500)")
        .await
        .unwrap();
    let (_listener, mut rx) = listen(&db).await;
    writer
        .batch_execute("UPDATE image_tasks SET progress = 50")
        .await
        .unwrap();

    let mut payloads = Vec::new();
    let mut entries = 0;
    while entries < 500 {
        let payload = tokio::time::timeout(crate::helpers::WAIT, rx.next())
            .await
            .unwrap()
            .unwrap();
        entries += payload.split(',').count();
        payloads.push(payload);
    }
    let total: usize = payloads.iter().map(String::len).sum::<usize>() + payloads.len() - 1;
    assert!(payloads.iter().all(|p| p.len() < 8000));
    assert!(
        payloads.len() <= total.div_ceil(8000),
        "{} notifications for {total} bytes",
        payloads.len()
    );
    assert_eq!(entries, 500);
}

/// The trigger cuts a large statement's payload where the next entry would not fit, in the
/// order of the rows: every notification but the last is full to within one entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_statement_fills_each_notification_before_starting_the_next() {
    let db = TestDb::create().await;
    taskcast::store::schema::migrate(&db.url).await.unwrap();
    let writer = db.client().await;
    writer
        .batch_execute("INSERT INTO image_tasks (prompt) SELECT 'p' FROM generate_series(1, 700)")
        .await
        .unwrap();
    // Versions of 1 to 4 digits, so the entries differ in length.
    writer
        .batch_execute(
            "UPDATE image_tasks SET taskcast_version = (random() * 9999)::int8 \
             WHERE id IN (SELECT id FROM image_tasks ORDER BY random() LIMIT 400)",
        )
        .await
        .unwrap();
    let (_listener, mut rx) = listen(&db).await;
    let expected: Vec<String> = writer
        .query(
            "UPDATE image_tasks SET progress = 50 \
             RETURNING id::text || ' ' || taskcast_version::text",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();

    let mut payloads: Vec<String> = Vec::new();
    while payloads.iter().map(|p| p.split(',').count()).sum::<usize>() < expected.len() {
        let payload = tokio::time::timeout(crate::helpers::WAIT, rx.next())
            .await
            .unwrap()
            .unwrap();
        payloads.push(payload);
    }
    assert!(payloads.len() >= 3, "{} notifications", payloads.len());
    let entries: Vec<&str> = payloads.iter().flat_map(|p| p.split(',')).collect();
    let mut sent = entries.clone();
    let mut returned: Vec<&str> = expected.iter().map(String::as_str).collect();
    sent.sort_unstable();
    returned.sort_unstable();
    assert_eq!(sent, returned, "every row once, with its new version");
    let mut next = payloads.iter().skip(1);
    for payload in &payloads {
        assert!(payload.len() <= 7999, "{} bytes", payload.len());
        if let Some(following) = next.next() {
            let first = following.split(',').next().unwrap();
            assert!(
                payload.len() + 1 + first.len() > 7999,
                "a {}-byte notification left out a {}-byte entry that fit",
                payload.len(),
                first.len()
            );
        }
    }
}

/// Notifications sent while a node has no listener are lost; only the catch-up read after
/// the reconnect can deliver them. New connections are refused meanwhile, so the listener
/// cannot be back before the pushes are done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_made_while_a_listener_is_down_are_delivered_after_it_reconnects() {
    let (nodes, url) = spawn_nodes(2).await;
    let db_name = nodes[0].db.as_ref().unwrap().name.clone();
    let admin = client(&url).await;
    let task = nodes[0].create_task().await;
    let mut sub = nodes[1].subscribe(task).await;
    sub.next_state().await;
    nodes[0].push_ok(task, json!({"progress": 1})).await;
    assert_eq!(sub.next_state().await["progress"], 1.0);

    // ALTER DATABASE cannot target the database it runs in.
    let server = client(&crate::helpers::admin_url()).await;
    server
        .batch_execute(&format!("ALTER DATABASE {db_name} ALLOW_CONNECTIONS false"))
        .await
        .unwrap();
    let listeners = "SELECT count(*) FROM pg_stat_activity \
                     WHERE application_name = 'taskcast-listener' AND datname = current_database()";
    kill_listeners(&admin).await;
    let deadline = tokio::time::Instant::now() + crate::helpers::WAIT;
    while admin
        .query_one(listeners, &[])
        .await
        .unwrap()
        .get::<_, i64>(0)
        > 0
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the listeners did not go away"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Committed through node 0's open pooled connections; nobody is listening.
    let last = nodes[0]
        .push_ok(task, json!({"progress": 99, "stage": "while down"}))
        .await;

    server
        .batch_execute(&format!("ALTER DATABASE {db_name} ALLOW_CONNECTIONS true"))
        .await
        .unwrap();
    let caught_up = sub.next_state().await;
    assert_eq!(caught_up["version"], last["version"]);
    assert_eq!(caught_up["stage"], "while down");
}
