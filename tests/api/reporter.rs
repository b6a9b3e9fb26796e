//! The generator side against a real server: `taskcast_reporter`, and the Python and Node
//! snippets run as subprocesses. A failed progress update must never break a generation.

use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use taskcast::domain::{TaskId, TaskStatus};
use taskcast_reporter::{Options, Reporter, Stats, Update};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Command;

use crate::both_stores;
use crate::helpers::{
    KEY, StoreKind, TestApp, TestDb, WAIT, spawn_app, spawn_app_on_with, spawn_app_with, wait_until,
};
use crate::proxy::Proxy;

/// Retries that give up in about a tenth of a second.
fn fast_retries() -> Options {
    Options {
        max_attempts: 3,
        backoff_base: Duration::from_millis(10),
        backoff_max: Duration::from_millis(50),
        request_timeout: Duration::from_secs(2),
        ..Options::default()
    }
}

/// Every report ends up counted exactly once once the queue has drained.
fn accounted(stats: Stats) -> u64 {
    stats.sent + stats.conflated + stats.dropped + stats.failed
}

async fn stored(app: &TestApp, task: TaskId) -> Value {
    let response = app.get_task(task).await;
    assert_eq!(response.status(), 200);
    response.json().await.expect("JSON body")
}

/// Polls the stored task until `done` holds, failing the test after [`WAIT`].
async fn stored_until(app: &TestApp, task: TaskId, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let state = stored(app, task).await;
        if done(&state) {
            return state;
        }
        assert!(
            Instant::now() < deadline,
            "stored state never got there: {state}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A port on which nothing listens.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address").port()
}

async fn the_rust_reporter_delivers_a_walk_through_that_a_subscriber_sees_end_completed(
    kind: StoreKind,
) {
    let app = spawn_app(kind).await;
    let task = app.create_task().await;
    let mut subscriber = app.subscribe(task).await;
    assert_eq!(subscriber.next_state().await["status"], "pending");
    let reporter = Reporter::new(app.url(""), KEY, Options::default());
    let image_url = format!("https://cdn.example.com/{task}.png");

    let stage = |text: &str| Update::new().stage(text);
    reporter.report(task, stage("queued").status(TaskStatus::Pending));
    reporter.report(task, stage("generating").status(TaskStatus::Processing));
    for percent in 0..=100u32 {
        reporter.report(task, Update::new().progress(f64::from(percent)));
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    reporter.report(task, stage("uploading"));
    reporter.report(task, Update::completed(&image_url).stage("done"));
    let reports = 2 + 101 + 2;

    let mut seen = Vec::new();
    let last = loop {
        let state = subscriber.next_state().await;
        let progress = state["progress"].as_f64().unwrap_or(0.0);
        if let Some(previous) = seen.last() {
            assert!(
                progress >= *previous,
                "progress went back: {previous} -> {progress}"
            );
        }
        seen.push(progress);
        if state["status"] != "processing" && state["status"] != "pending" {
            break state;
        }
    };
    assert_eq!(last["status"], "completed", "{last}");
    assert_eq!(last["image_url"], image_url.as_str());
    assert_eq!(last["stage"], "done");
    assert_eq!(last["progress"], 100.0);
    assert!(
        seen.len() > 2,
        "the subscriber saw the walk, not only its end: {seen:?}"
    );

    assert!(reporter.flush(WAIT).await, "{:?}", reporter.stats());
    let stats = reporter.stats();
    assert_eq!((stats.failed, stats.dropped, stats.retried), (0, 0, 0));
    assert_eq!(accounted(stats), reports, "{stats:?}");
}

async fn the_python_snippet_walks_a_task_to_completed_with_the_pushed_stage(kind: StoreKind) {
    snippet_walks_a_task_to_completed(kind, "python3", "clients/python/taskcast_reporter.py").await;
}

async fn the_node_snippet_walks_a_task_to_completed_with_the_pushed_stage(kind: StoreKind) {
    snippet_walks_a_task_to_completed(kind, "node", "clients/node/taskcast_reporter.mjs").await;
}

both_stores!(
    the_rust_reporter_delivers_a_walk_through_that_a_subscriber_sees_end_completed,
    the_python_snippet_walks_a_task_to_completed_with_the_pushed_stage,
    the_node_snippet_walks_a_task_to_completed_with_the_pushed_stage,
);

#[tokio::test]
async fn a_reporter_pointed_at_a_closed_port_never_blocks_and_its_flush_gives_up_in_time() {
    let url = format!("http://127.0.0.1:{}", closed_port());
    let capacity = 4;
    // Slow enough that the queue is still busy when the first flush gives up.
    let options = Options {
        capacity,
        max_attempts: 3,
        backoff_base: Duration::from_millis(200),
        backoff_max: Duration::from_millis(400),
        ..Options::default()
    };
    let reporter = Reporter::new(url, KEY, options);
    let tasks: Vec<TaskId> = (0..10).map(|_| TaskId::random()).collect();

    let started = Instant::now();
    for i in 0..1000u32 {
        let task = tasks[i as usize % tasks.len()];
        reporter.report(task, Update::new().progress(f64::from(i) / 10.0));
        assert!(reporter.pending() <= capacity);
    }
    let reporting = started.elapsed();
    // Generous for a busy machine, yet far below what waiting for queue room would cost:
    // a queued update only leaves after 3 failed attempts with 200-400 ms backoffs, so
    // the 996 reports beyond the capacity would wait minutes.
    assert!(reporting < WAIT / 2, "1000 reports took {reporting:?}");

    let started = Instant::now();
    let limit = Duration::from_millis(300);
    assert!(!reporter.flush(limit).await, "nothing can be delivered");
    let flushing = started.elapsed();
    assert!(
        flushing >= limit && flushing < limit + Duration::from_secs(1),
        "{flushing:?}"
    );

    assert!(!reporter.flush(WAIT).await);
    let stats = reporter.stats();
    assert_eq!(stats.sent, 0);
    assert!(
        stats.failed > 0 && stats.dropped > 0 && stats.retried > 0,
        "{stats:?}"
    );
    assert!(stats.peak_pending <= capacity, "{stats:?}");
    assert_eq!(accounted(stats), 1000, "{stats:?}");
    eprintln!("closed port: 1000 reports in {reporting:?}, flush gave up after {flushing:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_ten_thousand_reports_for_one_task_conflates_and_the_final_state_arrives() {
    let app = spawn_app(StoreKind::Memory).await;
    let task = app.create_task().await;
    let capacity = 8;
    let reporter = Reporter::new(
        app.url(""),
        KEY,
        Options {
            capacity,
            ..Options::default()
        },
    );
    let image_url = format!("https://cdn.example.com/{task}.png");

    let started = Instant::now();
    reporter.report(task, Update::new().status(TaskStatus::Processing));
    for i in 0..10_000u32 {
        let update = Update::new().progress(f64::from(i) / 100.0);
        reporter.report(task, update.stage(format!("step {i}")));
        assert!(reporter.pending() <= capacity);
    }
    reporter.report(task, Update::completed(&image_url));
    let reporting = started.elapsed();
    assert!(reporter.flush(WAIT).await, "{:?}", reporter.stats());

    let state = stored(&app, task).await;
    assert_eq!(state["status"], "completed", "{state}");
    assert_eq!(
        state["stage"], "step 9999",
        "merged updates keep the last stage"
    );
    assert_eq!(state["image_url"], image_url.as_str());
    let stats = reporter.stats();
    assert_eq!(accounted(stats), 10_002, "{stats:?}");
    assert_eq!((stats.failed, stats.dropped), (0, 0), "{stats:?}");
    assert!(
        stats.sent < 2_000,
        "a burst conflates into few requests: {stats:?}"
    );
    assert!(stats.peak_pending <= capacity);
    eprintln!(
        "10,002 reports in {reporting:?} became {} requests",
        stats.sent
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_across_more_tasks_than_the_capacity_stays_bounded_and_counts_its_drops() {
    let app = spawn_app(StoreKind::Memory).await;
    let mut tasks = Vec::new();
    for _ in 0..50 {
        tasks.push(app.create_task().await);
    }
    let capacity = 8;
    let reporter = Reporter::new(
        app.url(""),
        KEY,
        Options {
            capacity,
            ..Options::default()
        },
    );
    for i in 0..10_000u32 {
        let task = tasks[i as usize % tasks.len()];
        reporter.report(task, Update::new().progress(f64::from(i) / 100.0));
        assert!(reporter.pending() <= capacity);
    }
    assert!(
        !reporter.flush(WAIT).await,
        "drops make flush report a loss"
    );
    let stats = reporter.stats();
    assert!(stats.dropped > 0 && stats.sent > 0, "{stats:?}");
    assert_eq!(stats.failed, 0, "{stats:?}");
    assert!(stats.peak_pending <= capacity, "{stats:?}");
    assert_eq!(accounted(stats), 10_000, "{stats:?}");
}

#[tokio::test]
async fn a_wrong_key_is_counted_as_failed_with_401_and_never_retried() {
    let app = spawn_app(StoreKind::Memory).await;
    let tasks = [app.create_task().await, app.create_task().await];
    let reporter = Reporter::new(app.url(""), "not-the-push-key", fast_retries());
    for task in tasks {
        reporter.report(task, Update::new().progress(50.0));
    }
    let started = Instant::now();
    assert!(!reporter.flush(WAIT).await);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let stats = reporter.stats();
    assert_eq!(
        (stats.failed, stats.retried, stats.sent),
        (2, 0, 0),
        "{stats:?}"
    );
    for task in tasks {
        assert_eq!(
            stored(&app, task).await["version"],
            0,
            "nothing was applied"
        );
    }
}

#[tokio::test]
async fn dropping_the_last_reporter_clone_still_delivers_what_was_queued() {
    let app = spawn_app(StoreKind::Memory).await;
    let task = app.create_task().await;
    let reporter = Reporter::new(app.url(""), KEY, Options::default());
    let clone = reporter.clone();
    drop(reporter);
    clone.report(
        task,
        Update::completed("https://cdn.example.com/dropped.png"),
    );
    drop(clone);
    let state = stored_until(&app, task, |s| s["status"] == "completed").await;
    assert_eq!(state["image_url"], "https://cdn.example.com/dropped.png");
}

#[tokio::test]
async fn a_503_is_retried_after_its_retry_after_delay_and_then_delivered() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    let arrivals = Arc::new(Mutex::new(Vec::new()));
    let server = tokio::spawn(answer(listener, arrivals.clone()));
    let options = Options {
        backoff_base: Duration::from_millis(10),
        ..Options::default()
    };
    let reporter = Reporter::new(url, KEY, options);
    reporter.report(TaskId::random(), Update::new().progress(1.0));
    assert!(reporter.flush(WAIT).await, "{:?}", reporter.stats());
    let stats = reporter.stats();
    assert_eq!(
        (stats.sent, stats.retried, stats.failed),
        (1, 1, 0),
        "{stats:?}"
    );
    let arrivals = arrivals.lock().expect("not poisoned").clone();
    assert_eq!(arrivals.len(), 2);
    let waited = arrivals[1] - arrivals[0];
    assert!(
        waited >= Duration::from_secs(1),
        "Retry-After: 1 was not honoured: {waited:?}"
    );
    server.abort();
}

/// A stand-in for taskcast that answers 503 with `Retry-After: 1` once, then 200.
async fn answer(listener: TcpListener, arrivals: Arc<Mutex<Vec<Instant>>>) {
    loop {
        let Ok((mut socket, _)) = listener.accept().await else {
            return;
        };
        let mut request = Vec::new();
        let mut buffer = [0u8; 4096];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            match socket.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => request.extend_from_slice(&buffer[..n]),
            }
        }
        let first = {
            let mut arrivals = arrivals.lock().expect("not poisoned");
            arrivals.push(Instant::now());
            arrivals.len() == 1
        };
        let response: &[u8] = if first {
            b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 1\r\ncontent-length: 2\r\n\
              connection: close\r\n\r\n{}"
        } else {
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}"
        };
        let _ = socket.write_all(response).await;
        let _ = socket.shutdown().await;
    }
}

/// A TCP proxy in front of the real server that counts what goes through: requests
/// (request lines starting `POST /api/`) and answers that are 503. No answer is made up.
struct CountingProxy {
    url: String,
    requests: Arc<AtomicUsize>,
    unavailable: Arc<AtomicUsize>,
    accept: tokio::task::JoinHandle<()>,
}

impl CountingProxy {
    async fn to(app: &TestApp) -> CountingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let requests = Arc::new(AtomicUsize::new(0));
        let unavailable = Arc::new(AtomicUsize::new(0));
        let (to_server, to_client) = (Arc::clone(&requests), Arc::clone(&unavailable));
        let server = app.addr;
        let accept = tokio::spawn(async move {
            let mut flows = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let Ok(upstream) = TcpStream::connect(server).await else {
                    continue;
                };
                let (client_in, client_out) = client.into_split();
                let (server_in, server_out) = upstream.into_split();
                flows.spawn(copy_counting(
                    client_in,
                    server_out,
                    b"POST /api/",
                    to_server.clone(),
                ));
                flows.spawn(copy_counting(
                    server_in,
                    client_out,
                    b"HTTP/1.1 503",
                    to_client.clone(),
                ));
            }
        });
        CountingProxy {
            url,
            requests,
            unavailable,
            accept,
        }
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Copies one direction of a connection, counting `needle` (also across reads).
async fn copy_counting(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    needle: &'static [u8],
    seen: Arc<AtomicUsize>,
) {
    let mut buffer = vec![0u8; 64 * 1024];
    let mut tail: Vec<u8> = Vec::new();
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        tail.extend_from_slice(&buffer[..n]);
        let found = tail.windows(needle.len()).filter(|w| *w == needle).count();
        seen.fetch_add(found, Ordering::SeqCst);
        let keep = tail.len().min(needle.len() - 1);
        tail.drain(..tail.len() - keep);
        if to.write_all(&buffer[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// Tasks created in the app and moved to `processing` (through the app, not the reporter).
async fn processing_tasks(app: &TestApp, count: usize) -> Vec<TaskId> {
    let mut tasks = Vec::new();
    for _ in 0..count {
        let task = app.create_task().await;
        app.push_ok(task, json!({"status": "processing", "progress": 1}))
            .await;
        tasks.push(task);
    }
    tasks
}

#[tokio::test]
async fn fifty_tasks_reported_at_once_are_all_delivered_in_far_fewer_than_fifty_requests() {
    let app = spawn_app(StoreKind::Postgres).await;
    let tasks = processing_tasks(&app, 50).await;
    let proxy = CountingProxy::to(&app).await;
    let reporter = Reporter::new(&proxy.url, KEY, Options::default());
    for (i, task) in tasks.iter().enumerate() {
        reporter.report(
            *task,
            Update::new().progress(50.0).stage(format!("step {i}")),
        );
    }
    assert!(reporter.flush(WAIT).await, "{:?}", reporter.stats());

    for (i, task) in tasks.iter().enumerate() {
        let state = stored(&app, *task).await;
        assert_eq!(
            (state["progress"].as_f64(), state["stage"].as_str()),
            (Some(50.0), Some(format!("step {i}").as_str())),
            "{state}"
        );
    }
    let stats = reporter.stats();
    assert_eq!(
        (stats.sent, stats.failed, stats.retried),
        (50, 0, 0),
        "{stats:?}"
    );
    let requests = proxy.requests();
    assert_eq!(
        requests as u64, stats.requests,
        "the reporter counts what the proxy saw"
    );
    assert!(requests <= 5, "50 updates took {requests} requests");
    eprintln!("50 tasks reported at once: {requests} request(s)");
}

#[tokio::test]
async fn an_update_refused_in_a_batch_is_counted_failed_and_the_others_of_its_request_are_delivered()
 {
    let app = spawn_app(StoreKind::Postgres).await;
    let tasks = processing_tasks(&app, 5).await;
    let finished = tasks[2];
    let done = json!({"status": "completed", "progress": 100, "image_url": "https://cdn.example.com/f.png"});
    app.push_ok(finished, done).await;
    let proxy = CountingProxy::to(&app).await;
    let reporter = Reporter::new(&proxy.url, KEY, fast_retries());
    for task in &tasks {
        reporter.report(*task, Update::new().progress(30.0));
    }
    assert!(
        !reporter.flush(WAIT).await,
        "a refused update makes flush say so"
    );

    assert_eq!(proxy.requests(), 1, "the five went in one request");
    let stats = reporter.stats();
    assert_eq!(
        (stats.sent, stats.failed, stats.retried),
        (4, 1, 0),
        "{stats:?}"
    );
    for task in &tasks {
        let state = stored(&app, *task).await;
        if *task == finished {
            assert_eq!(
                (state["status"].as_str(), state["progress"].as_f64()),
                (Some("completed"), Some(100.0)),
                "{state}"
            );
        } else {
            assert_eq!(state["progress"].as_f64(), Some(30.0), "{state}");
        }
    }
}

#[tokio::test]
async fn a_batch_answered_503_as_a_whole_is_retried_and_then_delivered() {
    let app = spawn_app_with(StoreKind::Postgres, |c| {
        c.limits.max_http_connections = 1;
        c.limits.body_timeout = Duration::from_secs(60);
    })
    .await;
    let tasks = processing_tasks(&app, 3).await;
    // The only HTTP slot, held by a request in flight: the server answers any other
    // connection 503 with Retry-After until it is let go.
    let mut hog = TcpStream::connect(app.addr).await.expect("connect");
    let head = format!(
        "POST /api/tasks/{}/progress HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {KEY}\r\n\
         Content-Length: 20\r\nExpect: 100-continue\r\n\r\n",
        tasks[0]
    );
    hog.write_all(head.as_bytes()).await.expect("write");
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("100 Continue") {
        let mut buffer = [0u8; 256];
        let n = tokio::time::timeout(WAIT, hog.read(&mut buffer))
            .await
            .expect("100 Continue in time")
            .expect("read");
        assert!(n > 0, "the server closed the held request");
        seen.extend_from_slice(&buffer[..n]);
    }

    let proxy = CountingProxy::to(&app).await;
    let reporter = Reporter::new(&proxy.url, KEY, Options::default());
    for task in &tasks {
        reporter.report(*task, Update::new().progress(70.0));
    }
    wait_until(|| proxy.unavailable.load(Ordering::SeqCst) > 0).await;
    assert_eq!(reporter.stats().sent, 0, "{:?}", reporter.stats());
    drop(hog);
    assert!(reporter.flush(WAIT).await, "{:?}", reporter.stats());

    let stats = reporter.stats();
    assert_eq!((stats.sent, stats.failed), (3, 0), "{stats:?}");
    assert!(stats.retried >= 3, "each update was sent again: {stats:?}");
    assert!(proxy.requests() >= 2, "the batch went again");
    for task in &tasks {
        assert_eq!(stored(&app, *task).await["progress"].as_f64(), Some(70.0));
    }
}

// One thread: the three reports are queued before the reporter's sender runs, so they go out
// as one batch. On two workers the sender could take the first alone, which goes to the
// single-push route and is refused whole (a flake seen once in CI).
#[tokio::test]
async fn updates_answered_503_one_by_one_inside_a_batch_answer_are_retried_and_then_delivered() {
    let db = TestDb::create().await;
    taskcast::store::schema::migrate(&db.url)
        .await
        .expect("migrate");
    let database = Proxy::to(&db).await;
    let app = spawn_app_on_with(db.url_via_port(database.port), None, |c| {
        c.limits.db_timeout = Duration::from_secs(1);
    })
    .await;
    let tasks = processing_tasks(&app, 3).await;
    let proxy = CountingProxy::to(&app).await;
    // The table's shape is cached by now, so the batch is read and answered 200; each of
    // its updates gets its own 503 from the writer.
    database.go_down();
    let options = Options {
        max_attempts: 20,
        backoff_base: Duration::from_millis(50),
        backoff_max: Duration::from_millis(200),
        ..Options::default()
    };
    let reporter = Reporter::new(&proxy.url, KEY, options);
    for task in &tasks {
        reporter.report(*task, Update::new().progress(60.0));
    }
    wait_until(|| reporter.stats().retried >= 3).await;
    database.come_back();
    assert!(reporter.flush(WAIT).await, "{:?}", reporter.stats());

    let stats = reporter.stats();
    assert_eq!((stats.sent, stats.failed), (3, 0), "{stats:?}");
    assert_eq!(
        proxy.unavailable.load(Ordering::SeqCst),
        0,
        "the 503s came per update, inside 200 answers"
    );
    for task in &tasks {
        assert_eq!(stored(&app, *task).await["progress"].as_f64(), Some(60.0));
    }
}

#[tokio::test]
async fn cancel_requested_is_read_per_update_of_a_batch_answer() {
    let app = spawn_app(StoreKind::Postgres).await;
    let tasks = processing_tasks(&app, 3).await;
    let (code, _) =
        crate::cancel::cancel(&app, tasks[1], Some(&crate::cancel::cancel_token(tasks[1]))).await;
    assert_eq!(code, 200);
    let proxy = CountingProxy::to(&app).await;
    let reporter = Reporter::new(&proxy.url, KEY, Options::default());
    for task in &tasks {
        reporter.report(*task, Update::new().progress(40.0));
    }
    assert!(reporter.flush(WAIT).await, "{:?}", reporter.stats());

    assert_eq!(proxy.requests(), 1, "the three went in one request");
    let asked: Vec<bool> = tasks
        .iter()
        .map(|t| reporter.is_cancel_requested(*t))
        .collect();
    assert_eq!(asked, [false, true, false]);
}

#[tokio::test]
async fn ten_tasks_reported_at_once_to_a_server_taking_two_updates_per_batch_are_all_delivered() {
    let app = spawn_app_with(StoreKind::Postgres, |c| c.limits.max_batch_items = 2).await;
    let tasks = processing_tasks(&app, 10).await;
    // Default options: up to 100 updates per batch. Nothing yields while reporting, so
    // the ten go in one batch, which the server refuses whole (400, over
    // TASKCAST_MAX_BATCH_ITEMS).
    let reporter = Reporter::new(app.url(""), KEY, fast_retries());
    for task in &tasks {
        reporter.report(*task, Update::new().progress(50.0));
    }
    assert!(reporter.flush(WAIT).await, "{:?}", reporter.stats());
    let stats = reporter.stats();
    assert_eq!(
        (stats.sent, stats.failed, stats.retried),
        (10, 0, 0),
        "{stats:?}"
    );
    assert_eq!(
        stats.requests, 6,
        "the refused batch of ten, then five of two: {stats:?}"
    );
    for task in &tasks {
        assert_eq!(stored(&app, *task).await["progress"].as_f64(), Some(50.0));
    }

    // The final updates: the lowered cap holds, so no request is refused again.
    for (i, task) in tasks.iter().enumerate() {
        reporter.report(
            *task,
            Update::completed(format!("https://cdn.example.com/{i}.png")),
        );
    }
    assert!(reporter.flush(WAIT).await, "{:?}", reporter.stats());
    let stats = reporter.stats();
    assert_eq!((stats.sent, stats.failed), (20, 0), "{stats:?}");
    assert_eq!(stats.requests, 11, "five of two: {stats:?}");
    for (i, task) in tasks.iter().enumerate() {
        let state = stored(&app, *task).await;
        assert_eq!(
            (state["status"].as_str(), state["image_url"].as_str()),
            (
                Some("completed"),
                Some(format!("https://cdn.example.com/{i}.png").as_str())
            ),
            "{state}"
        );
    }
}

#[tokio::test]
async fn ten_final_updates_to_a_server_with_a_batch_body_limit_below_the_reporters_are_all_delivered()
 {
    // 1,500 bytes, far below the reporter's 512 KiB; ten of these updates take about 2,000.
    let app = spawn_app_with(StoreKind::Postgres, |c| {
        c.limits.max_batch_body_bytes = 1500;
    })
    .await;
    let tasks = processing_tasks(&app, 10).await;
    let reporter = Reporter::new(app.url(""), KEY, fast_retries());
    let url = |i: usize| format!("https://cdn.example.com/images/{i:02}/final-result.png");
    for (i, task) in tasks.iter().enumerate() {
        reporter.report(*task, Update::completed(url(i)).stage("uploaded"));
    }
    assert!(reporter.flush(WAIT).await, "{:?}", reporter.stats());
    let stats = reporter.stats();
    assert_eq!(
        (stats.sent, stats.failed, stats.retried),
        (10, 0, 0),
        "{stats:?}"
    );
    assert_eq!(
        stats.requests, 6,
        "the batch of ten was refused (413), then five of two: {stats:?}"
    );
    for (i, task) in tasks.iter().enumerate() {
        let state = stored(&app, *task).await;
        assert_eq!(
            (state["status"].as_str(), state["image_url"].as_str()),
            (Some("completed"), Some(url(i).as_str())),
            "{state}"
        );
    }
}

#[tokio::test]
async fn a_lone_update_too_large_for_the_server_is_refused_once_and_counted_failed() {
    let app = spawn_app_with(StoreKind::Postgres, |c| c.limits.max_body_bytes = 1024).await;
    let task = processing_tasks(&app, 1).await[0];
    let reporter = Reporter::new(app.url(""), KEY, fast_retries());
    let long = format!("https://cdn.example.com/{}.png", "x".repeat(2000));
    reporter.report(task, Update::completed(long));
    assert!(!reporter.flush(WAIT).await, "{:?}", reporter.stats());
    let stats = reporter.stats();
    assert_eq!(
        (stats.sent, stats.failed, stats.retried, stats.requests),
        (0, 1, 0, 1),
        "413 for the update itself is a refusal: {stats:?}"
    );
    assert_eq!(stored(&app, task).await["status"], "processing");
}

/// Runs a snippet's CLI; `None` (after saying so on stderr) when its interpreter is missing.
async fn run_snippet(interpreter: &str, script: &str, args: &[&str]) -> Option<(Output, Duration)> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(script);
    let started = Instant::now();
    let child = Command::new(interpreter)
        .arg(&path)
        .args(args)
        .env_remove("TASK_PROCESS_SECRET_KEY")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let child = match child {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("SKIPPED: `{interpreter}` is not installed, so {script} was not tested");
            return None;
        }
        other => other.expect("the interpreter starts"),
    };
    let output = tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{script} did not exit within {WAIT:?}"))
        .expect("the snippet runs");
    Some((output, started.elapsed()))
}

async fn snippet_walks_a_task_to_completed(kind: StoreKind, interpreter: &str, script: &str) {
    let app = spawn_app(kind).await;
    let task = app.create_task().await;
    let stage = format!("finished by {interpreter}");
    let (url, task_arg) = (app.url(""), task.to_string());
    let args = [
        "--url", &url, "--key", KEY, "--task", &task_arg, "--stage", &stage,
    ];
    let Some((output, took)) = run_snippet(interpreter, script, &args).await else {
        return;
    };
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{script} failed: {stderr}");
    let state = stored(&app, task).await;
    assert_eq!(state["status"], "completed", "{state}\n{stderr}");
    assert_eq!(state["stage"], stage.as_str());
    assert_eq!(state["progress"], 100.0);
    assert!(
        state["image_url"]
            .as_str()
            .is_some_and(|u| u.contains(&task_arg))
    );
    let stats: Value = serde_json::from_slice(&output.stdout).expect("stats as JSON on stdout");
    assert_eq!(stats["failed"], 0, "{stats}");
    eprintln!("{script} walked a task in {took:?}: {stats}");
}

async fn snippet_with_a_wrong_key_exits_0_quickly_and_notes_the_failure(
    interpreter: &str,
    script: &str,
) {
    let app = spawn_app(StoreKind::Memory).await;
    let task = app.create_task().await;
    let wrong = "wrong-key-0123456789abcdef0123456789";
    let (url, task_arg) = (app.url(""), task.to_string());
    let args = ["--url", &url, "--key", wrong, "--task", &task_arg];
    let Some((output, took)) = run_snippet(interpreter, script, &args).await else {
        return;
    };
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "fire-and-forget exits 0: {stderr}");
    assert!(
        took < Duration::from_secs(5),
        "a refused key is not retried: {took:?}"
    );
    assert!(
        stderr.contains("not delivered") && stderr.contains("401"),
        "{stderr}"
    );
    assert!(
        !stderr.contains(wrong),
        "the key must not be printed: {stderr}"
    );
    assert_eq!(
        stored(&app, task).await["version"],
        0,
        "nothing was applied"
    );
    eprintln!("{script} with a wrong key exited 0 in {took:?}");
}

#[tokio::test]
async fn the_python_snippet_with_a_wrong_key_exits_0_quickly_and_notes_the_failure() {
    let script = "clients/python/taskcast_reporter.py";
    snippet_with_a_wrong_key_exits_0_quickly_and_notes_the_failure("python3", script).await;
}

#[tokio::test]
async fn the_node_snippet_with_a_wrong_key_exits_0_quickly_and_notes_the_failure() {
    let script = "clients/node/taskcast_reporter.mjs";
    snippet_with_a_wrong_key_exits_0_quickly_and_notes_the_failure("node", script).await;
}
