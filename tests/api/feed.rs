//! A user's feed, `user:<uuid>`: a snapshot of the user's unfinished tasks and latest
//! finished ones, then every change to any of the user's tasks (new ones included), from
//! this node, other nodes and plain SQL; never another user's; each task's versions only
//! growing. Refused (403) to anyone without the right.

use std::collections::HashMap;
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use taskcast::auth::Secret;
use taskcast::auth::subscribe::{SubscribeAuth, mint_user, now_unix};
use uuid::Uuid;

use crate::both_stores;
use crate::cluster::spawn_nodes;
use crate::helpers::{
    KEY, SUBSCRIBE_SECRET, StoreKind, Subscriber, Tap, TestApp, TestDb, spawn_app,
    spawn_app_on_with, spawn_app_with, wait_until,
};
use crate::sse::Events;
use taskcast::hub::MAX_PENDING_TASKS;
use taskcast::subscribers::FEED_MAX_UNFINISHED;

const SUPABASE_SECRET: &str = "supabase-jwt-secret-for-feed-tests-012345";

fn feed_token(user: Uuid) -> String {
    mint_user(
        &Secret::new(SUBSCRIBE_SECRET),
        user,
        Duration::from_secs(3600),
    )
}

fn supabase_session(user: Uuid) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": user.to_string(), "role": "authenticated", "aud": "authenticated",
                "exp": now_unix() + 600}),
        &EncodingKey::from_secret(SUPABASE_SECRET.as_bytes()),
    )
    .unwrap()
}

/// Creates a task owned by `user` through the API; returns its id.
async fn create_for(app: &TestApp, user: Uuid) -> String {
    let response = app
        .http
        .post(app.url("/api/tasks"))
        .bearer_auth(KEY)
        .json(&json!({"prompt": "a fox", "user_id": user.to_string()}))
        .send()
        .await
        .unwrap();
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, 201, "{body}");
    body["task_id"].as_str().unwrap().to_string()
}

async fn push(app: &TestApp, task: &str, body: Value) -> Value {
    let response = app.push(task, body).await;
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

/// A socket subscribed to `user`'s feed with `token`.
async fn subscribe_feed(app: &TestApp, user: Uuid, token: &str) -> Subscriber {
    let mut sub = app.connect("").await;
    sub.send_json(json!({"type": "subscribe", "task_id": format!("user:{user}"), "token": token}))
        .await;
    sub
}

/// The snapshot's states, in order, up to and including `snapshot_complete`.
async fn read_snapshot(sub: &mut Subscriber, user: Uuid) -> Vec<Value> {
    let mut states = Vec::new();
    loop {
        let message = sub.next_message().await;
        assert_eq!(message["feed"], format!("user:{user}"), "{message}");
        if message["type"] == "snapshot_complete" {
            assert_eq!(message["tasks"], states.len(), "{message}");
            return states;
        }
        assert_eq!(message["type"], "state", "{message}");
        assert_eq!(message["snapshot"], true, "{message}");
        states.push(message);
    }
}

/// Each snapshot state's version by task: what live frames must be newer than.
fn versions_of(states: &[Value]) -> HashMap<String, i64> {
    states
        .iter()
        .map(|s| {
            let task = s["task_id"].as_str().unwrap().to_string();
            (task, s["version"].as_i64().unwrap())
        })
        .collect()
}

fn ids(states: &[Value]) -> Vec<String> {
    states
        .iter()
        .map(|s| s["task_id"].as_str().unwrap().to_string())
        .collect()
}

/// Reads live feed frames until `done` holds for one, checking every frame is `user`'s
/// feed, live, and newer than the last one of its task; returns them all.
async fn live_until(
    sub: &mut Subscriber,
    user: Uuid,
    versions: &mut HashMap<String, i64>,
    done: impl Fn(&Value) -> bool,
) -> Vec<Value> {
    let mut seen = Vec::new();
    loop {
        let state = sub.next_state().await;
        assert_eq!(state["feed"], format!("user:{user}"), "{state}");
        assert_eq!(state["snapshot"], false, "{state}");
        let task = state["task_id"].as_str().unwrap().to_string();
        let version = state["version"].as_i64().unwrap();
        let previous = versions.insert(task.clone(), version);
        assert!(
            previous.is_none_or(|p| p < version),
            "task {task} went from version {previous:?} to {version}"
        );
        let finished = done(&state);
        seen.push(state);
        if finished {
            return seen;
        }
    }
}

async fn a_feed_snapshot_holds_unfinished_tasks_then_the_latest_finished_newest_first(
    kind: StoreKind,
) {
    let app = spawn_app_with(kind, |c| c.limits.feed_recent = 2).await;
    let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
    let mut finished = Vec::new();
    for _ in 0..3 {
        let task = create_for(&app, alice).await;
        push(&app, &task, json!({"status": "completed"})).await;
        finished.push(task);
    }
    let older = create_for(&app, alice).await;
    let newer = create_for(&app, alice).await;
    // Touched last, so the older task is the most recently updated unfinished one.
    push(&app, &older, json!({"progress": 10})).await;
    let bobs = create_for(&app, bob).await;

    let mut sub = subscribe_feed(&app, alice, &feed_token(alice)).await;
    let snapshot = read_snapshot(&mut sub, alice).await;
    assert_eq!(
        ids(&snapshot),
        vec![
            older.clone(),
            newer.clone(),
            finished[2].clone(),
            finished[1].clone()
        ],
        "unfinished newest first, then the 2 latest finished (TASKCAST_FEED_RECENT)"
    );
    assert!(!ids(&snapshot).contains(&bobs));
    assert_eq!(snapshot[0]["progress"], 10.0);
    assert_eq!(snapshot[2]["status"], "completed");
}

async fn a_task_created_after_subscribing_and_every_change_appear_with_versions_growing_per_task(
    kind: StoreKind,
) {
    let app = spawn_app(kind).await;
    let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
    let first = create_for(&app, alice).await;
    let bobs = create_for(&app, bob).await;
    let mut sub = subscribe_feed(&app, alice, &feed_token(alice)).await;
    let snapshot = read_snapshot(&mut sub, alice).await;
    assert_eq!(ids(&snapshot), vec![first.clone()]);

    let second = create_for(&app, alice).await;
    let mut versions = versions_of(&snapshot);
    let created = live_until(&mut sub, alice, &mut versions, |s| s["task_id"] == second).await;
    assert_eq!(created.last().unwrap()["version"], 0);
    for i in 1..=5 {
        push(&app, &bobs, json!({"progress": i * 10})).await;
        push(&app, &first, json!({"progress": i * 10})).await;
        push(&app, &second, json!({"progress": i * 5})).await;
    }
    let last = push(&app, &second, json!({"status": "completed"})).await;
    let seen = live_until(&mut sub, alice, &mut versions, |s| {
        s["task_id"] == second && s["version"] == last["version"]
    })
    .await;
    assert!(
        seen.iter().all(|s| s["task_id"] != bobs.as_str()),
        "another user's task appeared"
    );
    assert_eq!(
        versions[&first], 5,
        "every change of the first task arrived"
    );
}

async fn a_feed_is_refused_with_403_to_anyone_but_its_user(kind: StoreKind) {
    let app = spawn_app_with(kind, |c| {
        c.subscribe = SubscribeAuth::new(
            Some(Secret::new(SUBSCRIBE_SECRET)),
            Some(Secret::new(SUPABASE_SECRET)),
            false,
        );
    })
    .await;
    let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
    let task = create_for(&app, alice).await;
    let task_token = app.token(&[taskcast::domain::TaskId::parse(&task).unwrap()]);
    for token in [feed_token(bob), supabase_session(bob), task_token] {
        let mut sub = subscribe_feed(&app, alice, &token).await;
        let refused = sub.next_message().await;
        assert_eq!(refused["type"], "error", "{refused}");
        assert_eq!(refused["code"], "forbidden", "{refused}");
        assert_eq!(refused["task_id"], format!("user:{alice}"));
        assert!(refused["message"].is_string() && refused["hint"].is_string());
        let sse = app
            .http
            .get(app.url(&format!("/api/tasks/user:{alice}/events?token={token}")))
            .send()
            .await
            .unwrap();
        assert_eq!(sse.status(), 403);
    }
    // A user token grants the feed, not the user's tasks one by one.
    let mut sub = app
        .connect(&format!("?task_id={task}&token={}", feed_token(alice)))
        .await;
    assert_eq!(sub.next_message().await["code"], "forbidden");
    // Bob's own session and token work for Bob's feed.
    for token in [feed_token(bob), supabase_session(bob)] {
        let mut sub = subscribe_feed(&app, bob, &token).await;
        assert!(read_snapshot(&mut sub, bob).await.is_empty());
    }
}

async fn a_supabase_session_watches_its_own_feed(kind: StoreKind) {
    let app = spawn_app_with(kind, |c| {
        c.subscribe = SubscribeAuth::new(None, Some(Secret::new(SUPABASE_SECRET)), false);
    })
    .await;
    let alice = Uuid::new_v4();
    let task = create_for(&app, alice).await;
    let mut sub = subscribe_feed(&app, alice, &supabase_session(alice)).await;
    assert_eq!(
        ids(&read_snapshot(&mut sub, alice).await),
        vec![task.clone()]
    );
    push(&app, &task, json!({"progress": 50})).await;
    let state = sub.next_state().await;
    assert_eq!(
        (state["task_id"].as_str(), state["progress"].as_f64()),
        (Some(task.as_str()), Some(50.0))
    );
}

async fn a_feed_id_that_is_not_user_and_a_uuid_is_a_400(kind: StoreKind) {
    let app = spawn_app(kind).await;
    let mut sub = app.connect("").await;
    sub.send_json(json!({"type": "subscribe", "task_id": "user:not-a-uuid"}))
        .await;
    let error = sub.next_message().await;
    assert_eq!(error["type"], "error");
    assert_eq!(error["code"], "invalid_input", "{error}");
    assert!(error["message"].as_str().unwrap().contains("user:<uuid>"));
    let sse = app
        .http
        .get(app.url("/api/tasks/user:42/events"))
        .send()
        .await
        .unwrap();
    assert_eq!(sse.status(), 400);
}

async fn a_feed_streams_over_sse_too(kind: StoreKind) {
    let app = spawn_app(kind).await;
    let alice = Uuid::new_v4();
    let task = create_for(&app, alice).await;
    let response = app
        .http
        .get(app.url(&format!(
            "/api/tasks/user:{alice}/events?token={}",
            feed_token(alice)
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut events = Events::new(response);
    let first = events.next().await;
    assert_eq!(
        (first["task_id"].as_str(), first["snapshot"].as_bool()),
        (Some(task.as_str()), Some(true))
    );
    assert_eq!(events.next().await["type"], "snapshot_complete");
    let later = create_for(&app, alice).await;
    let created = events.next().await;
    assert_eq!(created["task_id"], later.as_str());
    assert_eq!(created["feed"], format!("user:{alice}"));
}

async fn the_hub_forgets_a_feed_when_its_last_subscriber_leaves(kind: StoreKind) {
    let app = spawn_app(kind).await;
    let alice = Uuid::new_v4();
    let mut sub = subscribe_feed(&app, alice, &feed_token(alice)).await;
    read_snapshot(&mut sub, alice).await;
    assert!(app.hub.has_feeds());
    drop(sub);
    let hub = app.hub.clone();
    wait_until(move || !hub.has_feeds()).await;
}

async fn subscribing_while_tasks_change_never_sends_a_version_at_or_below_the_snapshots(
    kind: StoreKind,
) {
    let app = spawn_app(kind).await;
    let alice = Uuid::new_v4();
    let tasks = [create_for(&app, alice).await, create_for(&app, alice).await];
    const PUSHES: i64 = 60;
    let pushers: Vec<_> = tasks
        .iter()
        .map(|task| {
            let (http, url) = (
                app.http.clone(),
                app.url(&format!("/api/tasks/{task}/progress")),
            );
            tokio::spawn(async move {
                for i in 1..=PUSHES {
                    let response = http
                        .post(&url)
                        .bearer_auth(KEY)
                        .json(&json!({"progress": i}))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(response.status(), 200);
                }
            })
        })
        .collect();
    // Subscribed while the pushes run, so changes land before, during and after the read.
    let mut sub = subscribe_feed(&app, alice, &feed_token(alice)).await;
    let snapshot = read_snapshot(&mut sub, alice).await;
    let mut versions = versions_of(&snapshot);
    for pusher in pushers {
        pusher.await.unwrap();
    }
    for task in &tasks {
        if versions.get(task) != Some(&PUSHES) {
            live_until(&mut sub, alice, &mut versions, |s| {
                s["task_id"] == task.as_str() && s["version"] == PUSHES
            })
            .await;
        }
    }
}

both_stores!(
    subscribing_while_tasks_change_never_sends_a_version_at_or_below_the_snapshots,
    a_feed_snapshot_holds_unfinished_tasks_then_the_latest_finished_newest_first,
    a_task_created_after_subscribing_and_every_change_appear_with_versions_growing_per_task,
    a_feed_is_refused_with_403_to_anyone_but_its_user,
    a_supabase_session_watches_its_own_feed,
    a_feed_id_that_is_not_user_and_a_uuid_is_a_400,
    a_feed_streams_over_sse_too,
    the_hub_forgets_a_feed_when_its_last_subscriber_leaves,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_sql_inserts_and_updates_reach_the_feed() {
    let app = spawn_app(StoreKind::Postgres).await;
    let db = app.db.as_ref().unwrap().client().await;
    let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
    let mut sub = subscribe_feed(&app, alice, &feed_token(alice)).await;
    read_snapshot(&mut sub, alice).await;
    db.execute(
        "INSERT INTO public.image_tasks (user_id, prompt) VALUES ($1::text::uuid, 'bob')",
        &[&bob.to_string()],
    )
    .await
    .unwrap();
    let row = db
        .query_one(
            "INSERT INTO public.image_tasks (user_id, prompt) VALUES ($1::text::uuid, 'sql') \
             RETURNING id::text",
            &[&alice.to_string()],
        )
        .await
        .unwrap();
    let task: String = row.get(0);
    let mut versions = HashMap::new();
    live_until(&mut sub, alice, &mut versions, |s| {
        s["task_id"] == task.as_str()
    })
    .await;
    db.execute(
        "UPDATE public.image_tasks SET progress = 42, stage = 'from psql' WHERE id = $1::text::uuid",
        &[&task],
    )
    .await
    .unwrap();
    let seen = live_until(&mut sub, alice, &mut versions, |s| {
        s["stage"] == "from psql"
    })
    .await;
    let state = seen.last().unwrap();
    assert_eq!(
        (state["progress"].as_f64(), state["version"].as_i64()),
        (Some(42.0), Some(1))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feed_on_one_node_gets_tasks_created_and_pushed_on_another() {
    let (nodes, _) = spawn_nodes(2).await;
    let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
    let mut sub = subscribe_feed(&nodes[0], alice, &feed_token(alice)).await;
    read_snapshot(&mut sub, alice).await;
    let bobs = create_for(&nodes[1], bob).await;
    let task = create_for(&nodes[1], alice).await;
    let mut versions = HashMap::new();
    live_until(&mut sub, alice, &mut versions, |s| {
        s["task_id"] == task.as_str()
    })
    .await;
    push(&nodes[1], &bobs, json!({"progress": 1})).await;
    let mut last = Value::Null;
    for i in 1..=4 {
        last = push(&nodes[1], &task, json!({"progress": i * 25})).await;
    }
    let seen = live_until(&mut sub, alice, &mut versions, |s| {
        s["version"] == last["version"] && s["task_id"] == task.as_str()
    })
    .await;
    assert!(seen.iter().all(|s| s["task_id"] == task.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_offered_while_a_feed_snapshot_is_read_are_neither_lost_nor_sent_twice() {
    let db = TestDb::create().await;
    taskcast::store::schema::migrate(&db.url).await.unwrap();
    let tap = Tap::to_db(&db).await;
    let app = spawn_app_on_with(tap.url(&db), None, |_| {}).await;
    let alice = Uuid::new_v4();
    let (read_sees, read_misses) = (create_for(&app, alice).await, create_for(&app, alice).await);

    // From here on, the only query carrying Alice's id is her feed's snapshot read: the tap
    // holds it while the feed is registered and the read has not run.
    let armed = tap.catch(alice.to_string().as_bytes());
    let mut sub = subscribe_feed(&app, alice, &feed_token(alice)).await;
    let mut read = armed.caught().await;
    // Committed and offered to the feed before the read runs: the snapshot has it.
    let seen = push(&app, &read_sees, json!({"progress": 10})).await;
    read.run().await;
    // Committed and offered after the read ran, before its rows reach taskcast: the
    // snapshot lacks it, so only the feed can deliver it.
    let missed = push(&app, &read_misses, json!({"progress": 20})).await;
    read.release();

    let snapshot = read_snapshot(&mut sub, alice).await;
    let mut versions = versions_of(&snapshot);
    assert_eq!(versions[&read_sees], seen["version"], "{snapshot:?}");
    assert_eq!(versions[&read_misses], 0, "{snapshot:?}");
    // A last change, so the end of the stream is known. `live_until` fails on a version
    // at or below one already delivered (the change the snapshot held, sent again).
    let last = push(&app, &read_sees, json!({"progress": 30})).await;
    live_until(&mut sub, alice, &mut versions, |s| {
        s["task_id"] == read_sees.as_str() && s["version"] == last["version"]
    })
    .await;
    let latest = HashMap::from([
        (read_sees.clone(), last["version"].as_i64().unwrap()),
        (read_misses.clone(), missed["version"].as_i64().unwrap()),
    ]);
    assert_eq!(versions, latest, "each task ends at its latest version");
}

/// Bytes of one feed frame in the slow reader test (two 2 kB URLs), rounded down.
const SLOW_FRAME_BYTES: usize = 4_000;

/// How many times every one of `count` tasks must change while a feed reader reads
/// nothing: enough to fill the server's socket send buffer (at most the kernel's
/// `tcp_wmem` maximum; the reader's receive buffer is small), then two more, each of which
/// leaves all `count` tasks waiting.
fn rounds_to_fall_behind(count: usize) -> usize {
    let most_buffered = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|text| text.split_whitespace().nth(2)?.parse::<usize>().ok())
        .unwrap_or(4 << 20);
    most_buffered.div_ceil(count * SLOW_FRAME_BYTES) + 2
}

/// A WebSocket client with a small receive buffer, so a client that stops reading holds
/// up the server soon.
async fn slow_reader(app: &TestApp) -> Subscriber {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(app.addr).await.unwrap();
    let (socket, _) = tokio_tungstenite::client_async(
        app.ws_url(""),
        tokio_tungstenite::MaybeTlsStream::Plain(stream),
    )
    .await
    .unwrap();
    Subscriber { socket }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feed_reader_more_than_1024_tasks_behind_is_ended_with_limit_exceeded_and_forgotten() {
    let app = spawn_app_with(StoreKind::Postgres, |c| {
        // Ended by the feed's bound, not by the write deadline or a missing pong.
        c.limits.ping_interval = Duration::from_secs(60);
        c.limits.pong_timeout = Duration::from_secs(120);
    })
    .await;
    let alice = Uuid::new_v4();
    let count = MAX_PENDING_TASKS + 100;
    let rounds = rounds_to_fall_behind(count);
    let tasks: Vec<String> = app
        .db
        .as_ref()
        .unwrap()
        .client()
        .await
        .query(
            "INSERT INTO public.image_tasks (user_id, prompt) \
             SELECT $1::text::uuid, 'many' FROM generate_series(1, $2::int) RETURNING id::text",
            &[&alice.to_string(), &(count as i32)],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    let subscribe = json!({"type": "subscribe", "task_id": format!("user:{alice}"),
                           "token": feed_token(alice)});
    let mut sub = slow_reader(&app).await;
    sub.send_json(subscribe.clone()).await;
    read_snapshot(&mut sub, alice).await;

    // The reader stops reading while every task changes, round after round. Long URLs
    // make each frame about 4.5 kB, so a few rounds outgrow what the sockets buffer.
    let url = |kind: &str| format!("https://cdn.example.com/{kind}/{}.png", "x".repeat(2000));
    let (image_url, preview_url) = (url("image"), url("preview"));
    for round in 1..=rounds {
        for chunk in tasks.chunks(200) {
            let updates: Vec<Value> = (chunk.iter())
                .map(|task| {
                    json!({"task_id": task, "progress": round, "image_url": image_url,
                           "preview_url": preview_url})
                })
                .collect();
            let response = app
                .http
                .post(app.url("/api/progress"))
                .bearer_auth(KEY)
                .json(&json!({ "updates": updates }))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            let body: Value = response.json().await.unwrap();
            let results = body["results"].as_array().unwrap();
            assert!(results.iter().all(|r| r["status"] == 200), "{body}");
        }
    }

    // Reading again: what the sockets held, then the feed's end.
    let mut states = 0;
    let ended = loop {
        let message = sub.next_message().await;
        if message["type"] != "state" {
            break message;
        }
        states += 1;
    };
    assert_eq!(ended["type"], "error", "{ended}");
    assert_eq!(ended["code"], "limit_exceeded", "{ended}");
    assert_eq!(ended["task_id"], format!("user:{alice}"), "{ended}");
    assert!(
        states < rounds * count,
        "{states} states arrived: the reader was never behind"
    );
    // The hub forgets the feed, while the connection stays open ...
    let hub = app.hub.clone();
    wait_until(move || !hub.has_feeds()).await;
    // ... and on it the client subscribes again for a fresh snapshot, every task at its
    // last change.
    sub.send_json(subscribe).await;
    let fresh = read_snapshot(&mut sub, alice).await;
    assert_eq!(fresh.len(), FEED_MAX_UNFINISHED);
    assert!(
        fresh.iter().all(|s| s["progress"] == rounds as f64),
        "{:?}",
        fresh.first()
    );
    eprintln!(
        "slow feed reader: {states} states arrived before limit_exceeded, of {} changes \
         ({rounds} rounds)",
        rounds * count
    );
}
