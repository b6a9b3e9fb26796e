//! `spawn_app()` and friends: a real server on 127.0.0.1:0, a fresh database per test,
//! and real HTTP and WebSocket clients.

use std::net::SocketAddr;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use taskcast::App;
use taskcast::auth::subscribe::{SubscribeAuth, mint, now_unix};
use taskcast::auth::{PushKey, Secret};
use taskcast::config::Config;
use taskcast::domain::TaskId;
use taskcast::hub::Hub;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_postgres::NoTls;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use uuid::Uuid;

pub const KEY: &str = "test-push-key-0123456789abcdef0123";
pub const SUBSCRIBE_SECRET: &str = "test-subscribe-secret-0123456789abcdef";
/// How long any single expected event may take before a test fails.
pub const WAIT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreKind {
    Postgres,
    Memory,
}

/// Generates one test per store from an `async fn name(kind: StoreKind)`.
#[macro_export]
macro_rules! both_stores {
    ($($name:ident),* $(,)?) => {
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::helpers::StoreKind::Postgres).await
                }
            )*
        }
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::helpers::StoreKind::Memory).await
                }
            )*
        }
    };
}

/// The admin URL on which tests create their databases (set by scripts/test).
pub fn admin_url() -> String {
    std::env::var("TASKCAST_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

/// A fresh, empty database, dropped (with FORCE) when this value is dropped.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub async fn create() -> TestDb {
        let name = format!("test_{}", Uuid::new_v4().simple());
        let admin = admin_client().await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("CREATE DATABASE (is TASKCAST_TEST_DATABASE_URL an admin URL?)");
        let mut config: tokio_postgres::Config = admin_url().parse().expect("valid admin URL");
        config.dbname(&name);
        let url = pg_url(&config);
        TestDb { name, url }
    }

    /// The same database reached through another port on 127.0.0.1 (a proxy).
    pub fn url_via_port(&self, port: u16) -> String {
        let mut config: tokio_postgres::Config = self.url.parse().expect("a valid URL");
        config.host("127.0.0.1");
        let mut url = pg_url(&config);
        // pg_url takes the first host and port, so replace the port explicitly.
        url = url.replacen(
            &format!("port={}", config.get_ports()[0]),
            &format!("port={port}"),
            1,
        );
        url
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(&self.url, NoTls)
            .await
            .expect("connect to the test database");
        tokio::spawn(connection);
        client
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs inside the test's runtime; a separate thread with its own runtime can
        // block on the async client without stalling it.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime for dropping the test database");
            rt.block_on(async {
                let admin = admin_client().await;
                let _ = admin
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await;
            });
        })
        .join();
    }
}

async fn admin_client() -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(&admin_url(), NoTls)
        .await
        .expect("connect to TASKCAST_TEST_DATABASE_URL (run the tests with scripts/test)");
    tokio::spawn(connection);
    client
}

/// Rebuilds a URL from a parsed config (host, port, user, password, dbname).
fn pg_url(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "127.0.0.1".to_string(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let mut url = format!("host={host} port={port}");
    if let Some(user) = config.get_user() {
        url.push_str(&format!(" user={user}"));
    }
    if let Some(pw) = config.get_password() {
        url.push_str(&format!(" password={}", String::from_utf8_lossy(pw)));
    }
    if let Some(db) = config.get_dbname() {
        url.push_str(&format!(" dbname={db}"));
    }
    url
}

/// A running server and what a test needs to talk to it.
pub struct TestApp {
    pub addr: SocketAddr,
    pub http: reqwest::Client,
    pub hub: Hub,
    pub db: Option<TestDb>,
    /// Whether the node's pushes skip the NOTIFY now (Postgres only).
    pub quiet: Option<taskcast::store::Quiet>,
    stop: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
}

pub async fn spawn_app(kind: StoreKind) -> TestApp {
    spawn_app_with(kind, |_| {}).await
}

/// Spawns an app whose configuration the test adjusts first.
pub async fn spawn_app_with(kind: StoreKind, tune: impl FnOnce(&mut Config)) -> TestApp {
    let db = match kind {
        StoreKind::Postgres => {
            let db = TestDb::create().await;
            taskcast::store::schema::migrate(&db.url)
                .await
                .expect("migrate the test database");
            Some(db)
        }
        StoreKind::Memory => None,
    };
    let url = db.as_ref().map(|d| d.url.clone());
    start(url, db, tune).await
}

/// Spawns an app on `database_url` as it is (no migration): for schema tests.
pub async fn spawn_app_on(database_url: String, db: Option<TestDb>) -> TestApp {
    start(Some(database_url), db, |_| {}).await
}

/// [`spawn_app_on`] with a configuration the test adjusts first.
pub async fn spawn_app_on_with(
    database_url: String,
    db: Option<TestDb>,
    tune: impl FnOnce(&mut Config),
) -> TestApp {
    start(Some(database_url), db, tune).await
}

async fn start(
    database_url: Option<String>,
    db: Option<TestDb>,
    tune: impl FnOnce(&mut Config),
) -> TestApp {
    let mut config = Config::new(
        "127.0.0.1:0".parse().expect("valid address"),
        database_url,
        PushKey::new(KEY),
    );
    config.subscribe = SubscribeAuth::new(Some(Secret::new(SUBSCRIBE_SECRET)), None, false);
    tune(&mut config);
    let app = App::build(config).await.expect("the app builds");
    let addr = app.local_addr();
    let hub = app.hub();
    let quiet = app.quiet();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until(async {
        let _ = stopped.await;
    }));
    TestApp {
        addr,
        http: reqwest::Client::new(),
        hub,
        db,
        quiet,
        stop: Some(stop),
        server: Some(server),
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn ws_url(&self, query: &str) -> String {
        format!("ws://{}/ws{}", self.addr, query)
    }

    /// Creates a task through the API and returns its id.
    pub async fn create_task(&self) -> TaskId {
        let body = self
            .create_task_with(json!({"prompt": "a lighthouse at dusk"}))
            .await;
        TaskId::parse(body["task_id"].as_str().expect("task_id")).expect("a UUID")
    }

    /// POSTs a push with the right key.
    pub async fn push(&self, task: impl std::fmt::Display, body: Value) -> reqwest::Response {
        self.http
            .post(self.url(&format!("/api/tasks/{task}/progress")))
            .bearer_auth(KEY)
            .json(&body)
            .send()
            .await
            .expect("POST progress")
    }

    /// A push that must succeed; returns the answered state.
    pub async fn push_ok(&self, task: TaskId, body: Value) -> Value {
        let response = self.push(task, body).await;
        let status = response.status();
        let body: Value = response.json().await.expect("JSON body");
        assert_eq!(status, 200, "push failed: {body}");
        body
    }

    /// GET /api/tasks/{id} as a server would: with the push key.
    pub async fn get_task(&self, task: impl std::fmt::Display) -> reqwest::Response {
        self.http
            .get(self.url(&format!("/api/tasks/{task}")))
            .bearer_auth(KEY)
            .send()
            .await
            .expect("GET task")
    }

    /// A subscribe token for `tasks`, valid for an hour.
    pub fn token(&self, tasks: &[TaskId]) -> String {
        mint(
            &Secret::new(SUBSCRIBE_SECRET),
            tasks,
            Duration::from_secs(3600),
        )
    }

    /// The subscribe message for `task`, with a token for it.
    pub fn subscribe_message(&self, task: TaskId) -> Value {
        json!({"type": "subscribe", "task_id": task.to_string(), "token": self.token(&[task])})
    }

    /// A WebSocket subscribed to `task` through the URL, with a token.
    pub async fn subscribe(&self, task: TaskId) -> Subscriber {
        let token = self.token(&[task]);
        self.connect(&format!("?task_id={task}&token={token}"))
            .await
    }

    pub async fn connect(&self, query: &str) -> Subscriber {
        let (socket, _) = tokio_tungstenite::connect_async(self.ws_url(query))
            .await
            .expect("WebSocket connects");
        Subscriber { socket }
    }

    /// Waits (bounded) until the hub holds no task.
    pub async fn wait_for_empty_hub(&self) {
        let hub = self.hub.clone();
        wait_until(move || hub.is_empty()).await;
    }
}

/// The legacy HS256 JWT secret of the Supabase project the auth tests stand in for.
pub const SUPABASE_SECRET: &str = "supabase-jwt-secret-for-tests-0123456789";

/// A Supabase access token for `user` with `role` (`authenticated` when signed in),
/// signed with [`SUPABASE_SECRET`] and valid for ten minutes.
pub fn supabase_token(user: Uuid, role: &str) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": user.to_string(), "role": role,
                "exp": now_unix() + 600, "aud": "authenticated"}),
        &jsonwebtoken::EncodingKey::from_secret(SUPABASE_SECRET.as_bytes()),
    )
    .expect("HS256 signing of plain claims")
}

/// A server that lets subscribers in with a subscribe token ([`SUBSCRIBE_SECRET`]) or a
/// Supabase session ([`SUPABASE_SECRET`]).
pub async fn spawn_app_with_sessions(kind: StoreKind) -> TestApp {
    spawn_app_with(kind, |c| {
        c.subscribe = SubscribeAuth::new(
            Some(Secret::new(SUBSCRIBE_SECRET)),
            Some(Secret::new(SUPABASE_SECRET)),
            false,
        );
    })
    .await
}

impl TestApp {
    /// `POST /api/tasks` with `body` and the push key; returns the 201 answer (the task,
    /// and the subscribe token minted for it).
    pub async fn create_task_with(&self, body: Value) -> Value {
        let response = self
            .http
            .post(self.url("/api/tasks"))
            .bearer_auth(KEY)
            .json(&body)
            .send()
            .await
            .expect("POST /api/tasks");
        let status = response.status();
        let created: Value = response.json().await.expect("JSON body");
        assert_eq!(status, 201, "{created}");
        created
    }
}

impl TestApp {
    /// Starts the server's shutdown, as its signal would; the handle ends when it stopped.
    pub fn begin_shutdown(&mut self) -> tokio::task::JoinHandle<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.server.take().expect("the server runs")
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

/// Polls `condition` every few milliseconds until it holds; fails the test after [`WAIT`].
pub async fn wait_until(condition: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub struct Subscriber {
    pub socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Subscriber {
    /// The next text message as JSON, failing the test after [`WAIT`]. Place-in-line
    /// updates (`"derived": true`, see tests/api/queue.rs) are skipped: they re-send a
    /// state the subscriber has, and tests of other things do not expect them.
    pub async fn next_message(&mut self) -> Value {
        for _ in 0..1000 {
            let message = self.next_message_with_places().await;
            if message["derived"] != true {
                return message;
            }
        }
        panic!("only place-in-line updates arrived");
    }

    /// The next text message as JSON, place-in-line updates included.
    pub async fn next_message_with_places(&mut self) -> Value {
        loop {
            let message = tokio::time::timeout(WAIT, self.socket.next())
                .await
                .expect("a message within the wait")
                .expect("the socket is open")
                .expect("a valid frame");
            match message {
                Message::Text(text) => {
                    return serde_json::from_str(text.as_str()).expect("JSON message");
                }
                Message::Close(frame) => panic!("socket closed: {frame:?}"),
                _ => continue,
            }
        }
    }

    /// The next message, which must be a state.
    pub async fn next_state(&mut self) -> Value {
        let message = self.next_message().await;
        assert_eq!(message["type"], "state", "expected a state, got {message}");
        message
    }

    /// Reads states until one has `version`, checking that versions strictly increase.
    pub async fn states_until_version(&mut self, version: i64) -> Vec<Value> {
        let mut seen: Vec<Value> = Vec::new();
        loop {
            let state = self.next_state().await;
            let v = state["version"].as_i64().expect("version");
            if let Some(previous) = seen.last() {
                let pv = previous["version"].as_i64().expect("version");
                assert!(v > pv, "version went from {pv} to {v}");
            }
            seen.push(state);
            if v >= version {
                return seen;
            }
        }
    }

    pub async fn send_json(&mut self, value: Value) {
        self.socket
            .send(Message::text(value.to_string()))
            .await
            .expect("send a message");
    }
}

/// The shipped schema.sql, as the Supabase SQL editor would get it.
pub fn schema_sql() -> &'static str {
    taskcast::store::schema::SCHEMA_SQL
}

/// `public.image_tasks` as an app built from the original guide has it: no progress, no
/// stage, none of taskcast's columns.
pub const GUIDE_ERA_TABLE: &str = "CREATE TABLE public.image_tasks (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id uuid,
    prompt text,
    status text NOT NULL DEFAULT 'pending',
    image_url text,
    error text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
)";

// ---- A tap on a database link, to hold one query at a chosen moment ----

/// A TCP forwarder in front of a database port (Postgres itself or a
/// [`crate::proxy::Proxy`]) that can catch one query: once armed with [`Tap::catch`], the
/// first client message carrying the given bytes (a query parameter) is held before the
/// server sees it, and what the server answers on that connection after it is held too,
/// until the test lets each go. Every other byte flows. Connect through [`Tap::url`]: the
/// tap reads plain text, so the link has no TLS.
pub struct Tap {
    pub port: u16,
    trap: std::sync::Arc<std::sync::Mutex<Option<Trap>>>,
    accept: tokio::task::JoinHandle<()>,
}

struct Trap {
    marker: Vec<u8>,
    caught: oneshot::Sender<Caught>,
}

/// What [`Tap::catch`] returns: the query, once a client sends it.
pub struct Armed(oneshot::Receiver<Caught>);

/// A caught query, held. Dropping it lets the query and its answer go.
pub struct Caught {
    query: Option<oneshot::Sender<()>>,
    answered: Option<oneshot::Receiver<()>>,
    _answer: oneshot::Sender<()>,
}

/// The hold on the answers of the connection whose query was caught.
struct AnswerGate {
    answered: oneshot::Sender<()>,
    open: oneshot::Receiver<()>,
}

impl Tap {
    /// A tap forwarding to `127.0.0.1:port`.
    pub async fn to_port(port: u16) -> Tap {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let local = listener.local_addr().expect("bound").port();
        let trap = std::sync::Arc::new(std::sync::Mutex::new(None::<Trap>));
        let traps = trap.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(tap_connection(client, port, traps.clone()));
            }
        });
        Tap {
            port: local,
            trap,
            accept,
        }
    }

    /// A tap in front of `db`'s Postgres (on 127.0.0.1, as [`TestDb::url_via_port`] needs).
    pub async fn to_db(db: &TestDb) -> Tap {
        let config: tokio_postgres::Config = db.url.parse().expect("a valid URL");
        Tap::to_port(config.get_ports()[0]).await
    }

    /// The URL of `db` through this tap, without TLS: the tap reads the queries.
    pub fn url(&self, db: &TestDb) -> String {
        format!("{} sslmode=disable", db.url_via_port(self.port))
    }

    /// Arms the tap: the next client message that carries `marker` (at most 64 bytes) is
    /// caught.
    pub fn catch(&self, marker: &[u8]) -> Armed {
        assert!(marker.len() <= 64, "a marker of at most 64 bytes");
        let (caught, armed) = oneshot::channel();
        *self.trap.lock().expect("not poisoned") = Some(Trap {
            marker: marker.to_vec(),
            caught,
        });
        Armed(armed)
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl Armed {
    /// Waits (bounded) until the query is caught: sent by the client, not yet seen by the
    /// server.
    pub async fn caught(self) -> Caught {
        tokio::time::timeout(WAIT, self.0)
            .await
            .expect("the query was sent within the wait")
            .expect("the tap is running")
    }
}

impl Caught {
    /// Lets the query reach the server and waits (bounded) until the server has answered
    /// it; the answer stays held. So the query has run: a read took its snapshot.
    pub async fn run(&mut self) {
        drop(self.query.take());
        let answered = self.answered.take().expect("run once");
        tokio::time::timeout(WAIT, answered)
            .await
            .expect("the server answered within the wait")
            .expect("the connection is open");
    }

    /// Lets the answer (and the query, if still held) reach the client.
    pub fn release(self) {}
}

async fn tap_connection(
    client: TcpStream,
    upstream: u16,
    trap: std::sync::Arc<std::sync::Mutex<Option<Trap>>>,
) {
    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
        return;
    };
    let (from_client, to_client) = client.into_split();
    let (from_server, to_server) = server.into_split();
    let (gate, gated) = oneshot::channel();
    tokio::select! {
        _ = tap_queries(from_client, to_server, trap, gate) => {}
        _ = tap_answers(from_server, to_client, gated) => {}
    }
}

/// Forwards client bytes; holds the chunk that completes the armed marker.
async fn tap_queries(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    trap: std::sync::Arc<std::sync::Mutex<Option<Trap>>>,
    gate: oneshot::Sender<AnswerGate>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut gate = Some(gate);
    let mut buf = vec![0u8; 16 * 1024];
    // The end of the previous chunk, so a marker split across two reads is still seen.
    let mut seen: Vec<u8> = Vec::new();
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let before = seen.len();
        seen.extend_from_slice(&buf[..n]);
        let sprung = {
            let mut trap = trap.lock().expect("not poisoned");
            // Only an occurrence that ends in this chunk: the kept end of the previous one
            // may hold the marker from before the tap was armed.
            let hit = trap.as_ref().is_some_and(|t| {
                let m = t.marker.len().max(1);
                seen[before.saturating_sub(m - 1)..]
                    .windows(m)
                    .any(|w| w == t.marker.as_slice())
            });
            if hit && gate.is_some() {
                trap.take()
            } else {
                None
            }
        };
        seen.drain(..seen.len().saturating_sub(63));
        if let Some(sprung) = sprung {
            let (query, go) = oneshot::channel();
            let (answered_tx, answered) = oneshot::channel();
            let (answer, open) = oneshot::channel();
            let _ = gate.take().expect("checked above").send(AnswerGate {
                answered: answered_tx,
                open,
            });
            let _ = sprung.caught.send(Caught {
                query: Some(query),
                answered: Some(answered),
                _answer: answer,
            });
            // Sent or dropped: either lets it go.
            let _ = go.await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Forwards server bytes; once this connection's query was caught, holds the next ones
/// until released.
async fn tap_answers(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut gated: oneshot::Receiver<AnswerGate>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if let Ok(gate) = gated.try_recv() {
            let _ = gate.answered.send(());
            let _ = gate.open.await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

// ---- The notify channel, seen from outside the nodes ----

/// A connection listening on the `taskcast` channel (not a taskcast node: its session is
/// not named `taskcast-listener`), and the payloads it receives. Keep the client: dropping
/// it ends the connection.
pub async fn listen(
    db: &TestDb,
) -> (
    tokio_postgres::Client,
    futures::channel::mpsc::UnboundedReceiver<String>,
) {
    let (listener, mut connection) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let (tx, rx) = futures::channel::mpsc::unbounded();
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = message {
                let _ = tx.unbounded_send(n.payload().to_string());
            }
        }
    });
    listener.batch_execute("LISTEN taskcast").await.unwrap();
    (listener, rx)
}

/// Ends every taskcast node's listener session on `client`'s database; how many there were.
pub async fn kill_listeners(client: &tokio_postgres::Client) -> usize {
    client
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = 'taskcast-listener' AND datname = current_database()",
            &[],
        )
        .await
        .expect("terminate the listeners")
        .len()
}
