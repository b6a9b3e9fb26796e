//! Running it in production: metrics, graceful shutdown, a crash, and a database outage.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::helpers::{
    KEY, SUBSCRIBE_SECRET, StoreKind, Subscriber, TestDb, WAIT, spawn_app, spawn_app_on,
    spawn_app_with,
};
use crate::process::{Server, start_on};
use crate::proxy::Proxy;

#[tokio::test]
async fn metrics_report_pushes_batches_connections_and_subscriptions() {
    let app = spawn_app(StoreKind::Memory).await;
    let task = app.create_task().await;
    let mut sub = app.subscribe(task).await;
    sub.next_state().await;
    for i in 0..5 {
        app.push_ok(task, json!({"progress": i})).await;
    }
    app.push(task, json!({"progress": 500})).await;
    let text = app
        .http
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for needle in [
        "taskcast_pushes_total{outcome=\"applied\"}",
        "taskcast_pushes_total{outcome=\"invalid_input\"}",
        "taskcast_batch_size_bucket",
        "taskcast_commit_duration_seconds_bucket",
        "taskcast_push_fanout_seconds_bucket",
        "taskcast_subscriptions_active",
        "taskcast_connections_open",
        "taskcast_hub_tasks",
    ] {
        assert!(text.contains(needle), "/metrics lacks {needle}:\n{text}");
    }
}

#[tokio::test]
async fn metrics_can_require_a_bearer_token() {
    let app = spawn_app_with(StoreKind::Memory, |c| {
        c.metrics_token = Some(taskcast::auth::Secret::new("metrics-token-0123456789"));
    })
    .await;
    let open = app.http.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(open.status(), 403);
    let with_token = app
        .http
        .get(app.url("/metrics"))
        .bearer_auth("metrics-token-0123456789")
        .send()
        .await
        .unwrap();
    assert_eq!(with_token.status(), 200);
}

/// What a pusher saw acknowledged: task → highest version answered with 200.
type Acks = Arc<Mutex<HashMap<String, i64>>>;

/// Pushes to `tasks` in a loop until `stop`, recording every 200 and its version.
fn spawn_pushers(
    base: String,
    tasks: Vec<String>,
    acks: Acks,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<u64>> {
    (0..4)
        .map(|p| {
            let (base, tasks, acks, stop) =
                (base.clone(), tasks.clone(), acks.clone(), stop.clone());
            tokio::spawn(async move {
                let http = reqwest::Client::builder()
                    .timeout(Duration::from_secs(5))
                    .build()
                    .unwrap();
                let mut sent = 0u64;
                let mut i = p;
                while !stop.load(Ordering::Relaxed) {
                    let task = &tasks[i % tasks.len()];
                    i += 1;
                    let response = http
                        .post(format!("{base}/api/tasks/{task}/progress"))
                        .bearer_auth(KEY)
                        .json(&json!({"progress": (i % 100) as f64, "stage": format!("p{p} #{i}")}))
                        .send()
                        .await;
                    sent += 1;
                    let Ok(response) = response else {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    };
                    if response.status() == 200 {
                        let body: Value = response.json().await.unwrap();
                        let version = body["version"].as_i64().unwrap();
                        let mut acks = acks.lock().unwrap();
                        let seen = acks.entry(task.clone()).or_insert(0);
                        *seen = (*seen).max(version);
                    }
                }
                sent
            })
        })
        .collect()
}

async fn row_versions(db: &TestDb, tasks: &[String]) -> HashMap<String, i64> {
    let client = db.client().await;
    let mut versions = HashMap::new();
    for task in tasks {
        let id = uuid::Uuid::parse_str(task).unwrap();
        let v: i64 = client
            .query_one(
                "SELECT taskcast_version FROM image_tasks WHERE id = $1",
                &[&id],
            )
            .await
            .unwrap()
            .get(0);
        versions.insert(task.clone(), v);
    }
    versions
}

fn server_env(db: &TestDb) -> Vec<(&'static str, String)> {
    vec![
        ("DATABASE_URL", db.url.clone()),
        ("TASK_PROCESS_SECRET_KEY", KEY.to_string()),
        ("TASKCAST_SUBSCRIBE_SECRET", SUBSCRIBE_SECRET.to_string()),
        ("RUST_LOG", "info".to_string()),
    ]
}

/// A taskcast process serving `db` on `listen`.
async fn node_on(db: &TestDb, listen: &str) -> Server {
    let env = server_env(db);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    start_on(&env, listen).await
}

/// A fresh migrated database and a taskcast process serving it on a free port.
async fn migrated_node() -> (TestDb, Server) {
    let db = TestDb::create().await;
    taskcast::store::schema::migrate(&db.url).await.unwrap();
    let server = node_on(&db, "127.0.0.1:0").await;
    (db, server)
}

async fn create_tasks(base: &str, n: usize) -> Vec<String> {
    let http = reqwest::Client::new();
    let mut tasks = Vec::new();
    for _ in 0..n {
        let body: Value = http
            .post(format!("{base}/api/tasks"))
            .bearer_auth(KEY)
            .json(&json!({}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        tasks.push(body["task_id"].as_str().unwrap().to_string());
    }
    tasks
}

fn token(tasks: &[String]) -> String {
    let ids: Vec<taskcast::domain::TaskId> = tasks
        .iter()
        .map(|t| taskcast::domain::TaskId::parse(t).unwrap())
        .collect();
    taskcast::auth::subscribe::mint(
        &taskcast::auth::Secret::new(SUBSCRIBE_SECRET),
        &ids,
        Duration::from_secs(600),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_commits_every_acknowledged_push_and_closes_sockets_with_1001() {
    let (db, server) = migrated_node().await;
    let base = format!("http://{}", server.addr);
    let tasks = create_tasks(&base, 8).await;
    let mut sockets = Vec::new();
    for task in &tasks {
        let url = format!(
            "ws://{}/ws?task_id={task}&token={}",
            server.addr,
            token(std::slice::from_ref(task))
        );
        let (socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        sockets.push(socket);
    }
    let acks: Acks = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let pushers = spawn_pushers(base, tasks.clone(), acks.clone(), stop.clone());
    // Let load build up, then ask the server to stop while pushes are in flight.
    let deadline = Instant::now() + WAIT;
    while acks.lock().unwrap().values().sum::<i64>() < 100 {
        assert!(Instant::now() < deadline, "no load built up");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.signal("TERM").await;
    let (status, log) = server.exited().await;
    stop.store(true, Ordering::Relaxed);
    for pusher in pushers {
        pusher.await.unwrap();
    }
    assert!(status.success(), "exit status {status:?}\n{log}");

    let rows = row_versions(&db, &tasks).await;
    for (task, acked) in acks.lock().unwrap().iter() {
        assert!(
            rows[task] >= *acked,
            "task {task}: acknowledged version {acked}, row has {}",
            rows[task]
        );
    }
    for mut socket in sockets {
        let close = loop {
            match tokio::time::timeout(WAIT, socket.next())
                .await
                .expect("a close in time")
            {
                Some(Ok(Message::Close(frame))) => break frame,
                Some(Ok(_)) => continue,
                other => panic!("expected a Close frame, got {other:?}"),
            }
        };
        assert_eq!(close.expect("a close frame").code, CloseCode::Away);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_acknowledged_push_and_clients_resume_from_the_rows() {
    let (db, server) = migrated_node().await;
    let addr = server.addr.clone();
    let base = format!("http://{addr}");
    let tasks = create_tasks(&base, 8).await;
    let acks: Acks = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let pushers = spawn_pushers(base.clone(), tasks.clone(), acks.clone(), stop.clone());
    let deadline = Instant::now() + WAIT;
    while acks.lock().unwrap().values().sum::<i64>() < 100 {
        assert!(Instant::now() < deadline, "no load built up");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.signal("KILL").await;
    let _ = server.exited().await;
    stop.store(true, Ordering::Relaxed);
    for pusher in pushers {
        pusher.await.unwrap();
    }
    let rows = row_versions(&db, &tasks).await;
    for (task, acked) in acks.lock().unwrap().iter() {
        assert!(
            rows[task] >= *acked,
            "task {task}: acknowledged version {acked}, row has {}",
            rows[task]
        );
    }
    // The restarted process serves the committed rows to reconnecting clients.
    let restarted = node_on(&db, &addr).await;
    for task in &tasks {
        let url = format!(
            "ws://{addr}/ws?task_id={task}&token={}",
            token(std::slice::from_ref(task))
        );
        let (mut socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        let snapshot = loop {
            match tokio::time::timeout(WAIT, socket.next()).await.unwrap() {
                Some(Ok(Message::Text(text))) => {
                    break serde_json::from_str::<Value>(text.as_str()).unwrap();
                }
                Some(Ok(_)) => continue,
                other => panic!("no snapshot: {other:?}"),
            }
        };
        assert_eq!(snapshot["version"], rows[task]);
    }
    drop(restarted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_10_second_database_outage_gives_fast_503s_and_recovers_without_restart() {
    let db = TestDb::create().await;
    taskcast::store::schema::migrate(&db.url).await.unwrap();
    let proxy = Proxy::to(&db).await;
    let via_proxy = db.url_via_port(proxy.port);
    assert!(
        via_proxy.contains(&format!("port={}", proxy.port)),
        "{via_proxy}"
    );
    let app = spawn_app_on(via_proxy, None).await;

    let tasks: Vec<_> = {
        let mut t = Vec::new();
        for _ in 0..4 {
            t.push(app.create_task().await);
        }
        t
    };
    let mut subs = Vec::new();
    for task in &tasks {
        let mut sub = app.subscribe(*task).await;
        sub.next_state().await;
        subs.push(sub);
    }
    for task in &tasks {
        app.push_ok(*task, json!({"progress": 1})).await;
    }

    proxy.go_down();
    let outage = Instant::now();
    let mut refused = 0;
    let mut slowest = Duration::ZERO;
    while outage.elapsed() < Duration::from_secs(10) {
        let started = Instant::now();
        let response = app
            .push(tasks[refused % tasks.len()], json!({"progress": 50}))
            .await;
        slowest = slowest.max(started.elapsed());
        assert_eq!(response.status(), 503, "a push during the outage");
        assert!(response.headers().contains_key("retry-after"));
        refused += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        slowest < Duration::from_secs(1),
        "a request took {slowest:?} during the outage"
    );

    proxy.come_back();
    let back = Instant::now();
    loop {
        let response = app
            .push(tasks[0], json!({"progress": 60, "stage": "recovered"}))
            .await;
        if response.status() == 200 {
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(2),
            "not recovered after {:?}",
            back.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let recovered_in = back.elapsed();
    for task in &tasks {
        app.push_ok(*task, json!({"progress": 99, "stage": "after"}))
            .await;
    }
    let direct = db.client().await;
    for (task, sub) in tasks.iter().zip(subs.iter_mut()) {
        let version: i64 = direct
            .query_one(
                "SELECT taskcast_version FROM image_tasks WHERE id = $1",
                &[&task.as_uuid()],
            )
            .await
            .unwrap()
            .get(0);
        let seen = sub.states_until_version(version).await;
        assert_eq!(seen.last().unwrap()["stage"], "after");
    }
    eprintln!(
        "outage: {refused} pushes refused, slowest {slowest:?}; recovered in {recovered_in:?}"
    );
    drop(app);
    drop(db);
}

/// The value of a counter on `/metrics`, 0 while it has never been incremented.
async fn counter(base: &str, name: &str) -> f64 {
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Reads states until one has `progress == want`.
async fn progress_reaches(sub: &mut Subscriber, want: f64) {
    while sub.next_state().await["progress"].as_f64() != Some(want) {}
}

// A separate process, so its /metrics counts only what this test does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_reads_back_plain_sql_changes_but_not_the_nodes_own_pushes() {
    let db = TestDb::create().await;
    taskcast::store::schema::migrate(&db.url).await.unwrap();
    // Created before the node listens: the INSERT's own notification could otherwise reach
    // the listener while the subscriber's snapshot is still being read, and that task would
    // rightly be read back once; this test counts pushes only.
    let row = (db.client().await)
        .query_one(
            "INSERT INTO public.image_tasks (status) VALUES ('processing') RETURNING id::text",
            &[],
        )
        .await
        .unwrap();
    let tasks = vec![row.get::<_, String>(0)];
    let server = node_on(&db, "127.0.0.1:0").await;
    let base = format!("http://{}", server.addr);
    let url = format!(
        "ws://{}/ws?task_id={}&token={}",
        server.addr,
        tasks[0],
        token(&tasks)
    );
    let (socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let mut sub = Subscriber { socket };
    sub.next_state().await; // the snapshot

    let http = reqwest::Client::new();
    for i in 1..=20 {
        let answer = http
            .post(format!("{base}/api/tasks/{}/progress", tasks[0]))
            .bearer_auth(KEY)
            .json(&json!({"progress": i}))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
    }
    progress_reaches(&mut sub, 20.0).await;
    let rows_read = "taskcast_listener_rows_read_total";
    assert_eq!(
        counter(&base, rows_read).await,
        0.0,
        "own pushes were read back"
    );

    let id = uuid::Uuid::parse_str(&tasks[0]).unwrap();
    db.client()
        .await
        .execute("UPDATE image_tasks SET progress = 99 WHERE id = $1", &[&id])
        .await
        .unwrap();
    progress_reaches(&mut sub, 99.0).await;
    assert_eq!(counter(&base, rows_read).await, 1.0);
}
