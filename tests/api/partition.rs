//! A silent database partition: packets vanish, nothing is reset. Every call answers 503
//! within the database timeout, no acknowledged push is lost, and subscribers converge on
//! the rows once the link is back.
//!
//! The partition starts while a push's batch is on the wire (a [`Tap`] holds it until the
//! link is silent), so that push must be answered "outcome unknown". Going silent at a
//! random instant proved nothing of the kind: when no batch was in flight, the next one
//! could find every pooled connection taken by the probers and the background queries
//! (place-in-line recount, sweeps), open a new connection that never completed, and be
//! answered a plain 503 (nothing was sent, so nothing may have committed): correct, but
//! then no push was told its outcome is unknown.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use taskcast::domain::TaskId;

use crate::helpers::{
    KEY, StoreKind, Subscriber, Tap, TestApp, TestDb, WAIT, spawn_app_on_with, spawn_app_with,
};
use crate::proxy::Proxy;

/// The database timeout of these tests.
const DB_TIMEOUT: Duration = Duration::from_secs(1);
/// The most any answer may take while the database is unreachable: the timeout + 0.5 s,
/// below twice the timeout, so a push that waited for a hung batch and then ran its own
/// would fail it.
const BOUND: Duration = Duration::from_millis(1500);
/// How long the partition lasts: longer than the listener's liveness check and timeout.
const PARTITION: Duration = Duration::from_secs(5);
/// The `seq` of the last push to each task, above any the pushers use.
const LAST_SEQ: i64 = 1_000_000;
/// The stage of the push whose batch is on the wire when the link goes silent.
const CUT: &str = "sent as the link went silent";

/// One answer taskcast gave.
#[derive(Debug, Clone)]
struct Answer {
    kind: &'static str,
    task: Option<usize>,
    started: Instant,
    took: Duration,
    /// 0: no answer at all (the client's own 10 s timeout, or a broken connection).
    status: u16,
    retry_after: bool,
    seq: Option<i64>,
    version: Option<i64>,
    message: String,
}

type Log = Arc<Mutex<Vec<Answer>>>;

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

async fn record(
    log: &Log,
    kind: &'static str,
    task: Option<usize>,
    seq: Option<i64>,
    request: reqwest::RequestBuilder,
) {
    let started = Instant::now();
    let response = request.send().await;
    let (status, retry_after, body) = match response {
        Ok(r) => {
            let status = r.status().as_u16();
            let retry_after = r.headers().contains_key("retry-after");
            (
                status,
                retry_after,
                r.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
        Err(_) => (0, false, Value::Null),
    };
    log.lock().unwrap().push(Answer {
        kind,
        task,
        started,
        took: started.elapsed(),
        status,
        retry_after,
        seq,
        version: body["version"].as_i64(),
        message: body["message"].as_str().unwrap_or_default().to_string(),
    });
}

/// Pushes to `tasks[index]` with rising `seq` until `stop`.
fn spawn_pusher(
    app: &TestApp,
    tasks: &[TaskId],
    index: usize,
    log: Log,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    let url = app.url(&format!("/api/tasks/{}/progress", tasks[index]));
    tokio::spawn(async move {
        let http = client();
        let mut seq = 0;
        while !stop.load(Ordering::Relaxed) {
            seq += 1;
            let body = json!({"progress": seq % 100, "stage": format!("push {seq}"), "seq": seq});
            let request = http.post(&url).bearer_auth(KEY).json(&body);
            record(&log, "push", Some(index), Some(seq), request).await;
            // Pacing, so the pushers do not crowd the 2 shared cores.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
}

/// GETs `path` (with the push key) until `stop`.
fn spawn_prober(
    app: &TestApp,
    kind: &'static str,
    path: String,
    log: Log,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    let url = app.url(&path);
    tokio::spawn(async move {
        let http = client();
        while !stop.load(Ordering::Relaxed) {
            record(&log, kind, None, None, http.get(&url).bearer_auth(KEY)).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
}

/// Waits (bounded) until `log` holds an answer that satisfies `condition`.
async fn until_logged(log: &Log, what: &str, condition: impl Fn(&[Answer]) -> bool) {
    let deadline = Instant::now() + WAIT;
    while !condition(&log.lock().unwrap()) {
        assert!(Instant::now() < deadline, "{what}: not within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sets `stage` by plain SQL (not through the proxy) and returns the row's new version.
async fn sql_update(db: &TestDb, task: TaskId, stage: &str) -> i64 {
    db.client()
        .await
        .query_one(
            "UPDATE image_tasks SET stage = $2 WHERE id = $1 RETURNING taskcast_version",
            &[&task.as_uuid(), &stage],
        )
        .await
        .unwrap()
        .get(0)
}

/// `(taskcast_seq, taskcast_version, stage)` of a row, read directly.
async fn row(db: &TestDb, task: TaskId) -> (Option<i64>, i64, Option<String>) {
    let row = db
        .client()
        .await
        .query_one(
            "SELECT taskcast_seq, taskcast_version, stage FROM image_tasks WHERE id = $1",
            &[&task.as_uuid()],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

/// Reads states until the row's version; the last one must carry `stage`.
async fn converges(sub: &mut Subscriber, version: i64, stage: &str) {
    let seen = sub.states_until_version(version).await;
    let last = seen.last().unwrap();
    assert_eq!(last["version"], version, "{last}");
    assert_eq!(last["stage"], stage, "{last}");
}

fn percentile(mut took: Vec<Duration>, p: f64) -> Duration {
    took.sort();
    took[((took.len() - 1) as f64 * p).round() as usize]
}

/// An app on `db` through `proxy`, with the short database timeout.
async fn app_through(db: &TestDb, proxy: &Proxy) -> TestApp {
    app_on(db.url_via_port(proxy.port)).await
}

/// An app on `url`, with the short database timeout.
async fn app_on(url: String) -> TestApp {
    spawn_app_on_with(url, None, |config| {
        config.limits.db_timeout = DB_TIMEOUT;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_a_silent_partition_every_call_gets_a_bounded_503_and_no_acknowledged_push_is_lost()
{
    let db = TestDb::create().await;
    taskcast::store::schema::migrate(&db.url).await.unwrap();
    let proxy = Proxy::to(&db).await;
    let tap = Tap::to_port(proxy.port).await;
    let app = app_on(tap.url(&db)).await;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        tasks.push(app.create_task().await);
    }
    // Pushed once, as the link goes silent.
    let cut = app.create_task().await;
    // Changed only by plain SQL during the partition: reaches its subscriber only through
    // the listener.
    let quiet = app.create_task().await;
    let mut subs = Vec::new();
    for task in tasks.iter().chain([&quiet]) {
        let mut sub = app.subscribe(*task).await;
        sub.next_state().await;
        subs.push(sub);
    }
    let quiet_sub = subs.last_mut().unwrap();
    // The listener is up once a plain SQL change reaches a subscriber.
    let version = sql_update(&db, quiet, "before").await;
    converges(quiet_sub, version, "before").await;

    let log: Log = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers: Vec<_> = (0..tasks.len())
        .map(|i| spawn_pusher(&app, &tasks, i, log.clone(), stop.clone()))
        .collect();
    let get = format!("/api/tasks/{}", tasks[0]);
    workers.push(spawn_prober(&app, "get", get, log.clone(), stop.clone()));
    let readyz = "/readyz".to_string();
    workers.push(spawn_prober(
        &app,
        "readyz",
        readyz,
        log.clone(),
        stop.clone(),
    ));
    until_logged(&log, "3 pushes acknowledged per task", |answers| {
        (0..tasks.len()).all(|i| {
            answers
                .iter()
                .filter(|a| a.task == Some(i) && a.status == 200)
                .count()
                >= 3
        })
    })
    .await;

    // A push whose batch is on the wire when the link goes silent: the tap holds the
    // batch (its stage is a parameter) until the proxy forwards nothing.
    let armed = tap.catch(CUT.as_bytes());
    let cut_push = {
        let (log, url) = (log.clone(), app.url(&format!("/api/tasks/{cut}/progress")));
        tokio::spawn(async move {
            let request = client()
                .post(url)
                .bearer_auth(KEY)
                .json(&json!({"stage": CUT}));
            record(&log, "cut", None, None, request).await;
        })
    };
    let on_the_wire = armed.caught().await;
    proxy.blackhole();
    let partition = Instant::now();
    on_the_wire.release();
    let quiet_version = sql_update(&db, quiet, "changed during the partition").await;
    // The experiment's length, not a wait for a condition.
    tokio::time::sleep(PARTITION).await;
    proxy.come_back();
    let healed = Instant::now();
    until_logged(
        &log,
        "a push acknowledged per task after the partition",
        |answers| {
            (0..tasks.len()).all(|i| {
                answers
                    .iter()
                    .any(|a| a.task == Some(i) && a.status == 200 && a.started > healed)
            })
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.unwrap();
    }
    cut_push.await.unwrap();
    let answers = log.lock().unwrap().clone();

    // Every answer came, within the bound, before, during and after the partition.
    for a in &answers {
        assert!(a.status != 0, "no answer: {a:?}");
        assert!(a.took <= BOUND, "an answer took {:?}: {a:?}", a.took);
    }
    // Every call made and answered during the partition was a 503 with Retry-After.
    let during: Vec<&Answer> = answers
        .iter()
        .filter(|a| a.started > partition && a.started + a.took < healed)
        .collect();
    for a in &during {
        assert_eq!(a.status, 503, "during the partition: {a:?}");
        assert!(a.retry_after, "a 503 without Retry-After: {a:?}");
    }
    for kind in ["push", "get", "readyz"] {
        let n = during.iter().filter(|a| a.kind == kind).count();
        assert!(n >= 3, "only {n} {kind} answers during the partition");
    }
    // The batch that was on the wire as the link went silent is told its outcome is
    // unknown: it was sent, and no answer came.
    let cut_answer = answers.iter().find(|a| a.kind == "cut").unwrap();
    assert_eq!(cut_answer.status, 503, "{cut_answer:?}");
    assert!(cut_answer.retry_after, "{cut_answer:?}");
    assert!(
        cut_answer.message.contains("may or may not"),
        "the push sent as the link went silent: {cut_answer:?}"
    );
    let unknown = answers
        .iter()
        .filter(|a| a.status == 503 && a.message.contains("may or may not"))
        .count();
    assert!(unknown >= 1, "no push was told its outcome is unknown");

    // Every acknowledged push is in its row (a later push may have superseded it).
    for (i, task) in tasks.iter().enumerate() {
        let (seq, version, _) = row(&db, *task).await;
        for a in answers
            .iter()
            .filter(|a| a.task == Some(i) && a.status == 200)
        {
            assert!(
                seq >= a.seq && version >= a.version.unwrap(),
                "acknowledged {a:?}, row has seq {seq:?} version {version}"
            );
        }
    }
    // Subscribers converge on the rows: the last pushes, and the plain SQL change made
    // while the listener's link was silent.
    for task in &tasks {
        app.push_ok(*task, json!({"stage": "after", "seq": LAST_SEQ}))
            .await;
    }
    for (task, sub) in tasks.iter().zip(subs.iter_mut()) {
        let (_, version, stage) = row(&db, *task).await;
        assert_eq!(stage.as_deref(), Some("after"));
        converges(sub, version, "after").await;
    }
    let quiet_sub = subs.last_mut().unwrap();
    converges(quiet_sub, quiet_version, "changed during the partition").await;

    for kind in ["push", "get", "readyz"] {
        let took: Vec<Duration> = during
            .iter()
            .filter(|a| a.kind == kind)
            .map(|a| a.took)
            .collect();
        eprintln!(
            "partition {PARTITION:?}, db timeout {DB_TIMEOUT:?}: {} {kind} 503s, median {:?}, \
             slowest {:?}",
            took.len(),
            percentile(took.clone(), 0.5),
            percentile(took, 1.0),
        );
    }
    eprintln!("{unknown} pushes answered 'outcome unknown'");
    drop(app);
    drop(db);
}

/// Liveness check (2 s) + its timeout (1 s) + reconnect and resync, with room to spare.
const LISTENER_BOUND: Duration = Duration::from_secs(7);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_notices_a_silently_dead_link_within_seconds_and_resyncs() {
    let db = TestDb::create().await;
    taskcast::store::schema::migrate(&db.url).await.unwrap();
    let proxy = Proxy::to(&db).await;
    let app = app_through(&db, &proxy).await;
    let task = app.create_task().await;
    let mut sub = app.subscribe(task).await;
    sub.next_state().await;
    // The listener is up once a plain SQL change reaches the subscriber.
    let version = sql_update(&db, task, "before").await;
    converges(&mut sub, version, "before").await;

    // The listener's connection goes silent for good; a new one would work.
    proxy.lose_flows();
    let lost = Instant::now();
    let version = sql_update(&db, task, "after the link died").await;
    tokio::time::timeout(
        LISTENER_BOUND,
        converges(&mut sub, version, "after the link died"),
    )
    .await
    .expect("the listener reconnected and resynced in time");
    eprintln!(
        "listener: resynced {:?} after its link died",
        lost.elapsed()
    );
    drop(app);
    drop(db);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_connections_that_went_silent_are_discarded_and_pushes_recover() {
    let db = TestDb::create().await;
    taskcast::store::schema::migrate(&db.url).await.unwrap();
    let proxy = Proxy::to(&db).await;
    let app = app_through(&db, &proxy).await;
    let task = app.create_task().await;
    app.push_ok(task, json!({"progress": 1})).await;

    // Every pooled connection is now dead for good; new ones work. Each dead one may
    // cost one 503, then it must be gone from the pool.
    proxy.lose_flows();
    let lost = Instant::now();
    let mut refused = 0;
    loop {
        let started = Instant::now();
        let response = app.push(task, json!({"progress": 2})).await;
        let took = started.elapsed();
        assert!(took <= BOUND, "a push took {took:?}");
        if response.status() == 200 {
            break;
        }
        assert_eq!(response.status(), 503);
        refused += 1;
        assert!(
            lost.elapsed() < WAIT,
            "pushes still refused {:?} after the connections died ({refused} refused)",
            lost.elapsed()
        );
    }
    eprintln!(
        "dead pooled connections: {refused} pushes refused, recovered after {:?}",
        lost.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_stuck_behind_a_row_lock_gets_503_in_bounded_time_and_is_cancelled_on_the_server() {
    let app = spawn_app_with(StoreKind::Postgres, |config| {
        config.limits.db_timeout = DB_TIMEOUT;
    })
    .await;
    let db = app.db.as_ref().unwrap();
    let task = app.create_task().await;
    let mut locker = db.client().await;
    let lock = locker.transaction().await.unwrap();
    lock.execute(
        "SELECT 1 FROM image_tasks WHERE id = $1 FOR UPDATE",
        &[&task.as_uuid()],
    )
    .await
    .unwrap();

    let started = Instant::now();
    let response = app.push(task, json!({"stage": "blocked", "seq": 1})).await;
    let took = started.elapsed();
    assert_eq!(response.status(), 503);
    assert!(took <= BOUND, "the push took {took:?}");
    // Whichever stopped it first, taskcast (outcome unknown) or the server's
    // statement_timeout (not committed), the answer is a 503.
    // Nothing of taskcast's is left waiting for the lock.
    let watcher = db.client().await;
    let deadline = Instant::now() + BOUND;
    loop {
        let waiting: i64 = watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND application_name = 'taskcast' AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waiting == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{waiting} statements still wait for the lock"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    lock.rollback().await.unwrap();
    let (seq, _, stage) = row(db, task).await;
    assert_eq!((seq, stage), (None, None), "the timed-out push committed");
}
