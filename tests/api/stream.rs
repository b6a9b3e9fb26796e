//! `POST /api/progress/stream`: pushes as lines of one long request, each answered by a
//! line once committed. The client here is a plain TCP socket speaking HTTP/1.1 with a
//! chunked body, so a test decides exactly which bytes leave when, and whether it reads.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use taskcast::config::Config;
use taskcast::domain::TaskId;

use crate::helpers::{
    KEY, StoreKind, Tap, TestApp, TestDb, spawn_app, spawn_app_on_with, spawn_app_with,
};

/// One push stream, as a generator would hold it.
struct PushStream {
    tcp: TcpStream,
    /// Bytes of the answer read and not yet taken.
    read: Vec<u8>,
    /// The answer's head, once read.
    head: Option<String>,
    /// Answer lines decoded from the chunks, not yet taken.
    lines: Vec<u8>,
    ended: bool,
}

impl PushStream {
    async fn open(addr: SocketAddr) -> PushStream {
        Self::open_with(addr, &format!("authorization: Bearer {KEY}\r\n")).await
    }

    async fn open_with(addr: SocketAddr, headers: &str) -> PushStream {
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        let head = format!(
            "POST /api/progress/stream HTTP/1.1\r\nhost: taskcast\r\n\
             content-type: application/x-ndjson\r\ntransfer-encoding: chunked\r\n{headers}\r\n"
        );
        tcp.write_all(head.as_bytes()).await.expect("send the head");
        PushStream {
            tcp,
            read: Vec::new(),
            head: None,
            lines: Vec::new(),
            ended: false,
        }
    }

    /// Sends `bytes` as one chunk of the body.
    async fn send(&mut self, bytes: &[u8]) {
        let chunk = [format!("{:x}\r\n", bytes.len()).as_bytes(), bytes, b"\r\n"].concat();
        self.tcp.write_all(&chunk).await.expect("send a chunk");
    }

    async fn send_line(&mut self, line: &Value) {
        self.send(format!("{line}\n").as_bytes()).await;
    }

    /// Ends the body.
    async fn finish(&mut self) {
        self.tcp
            .write_all(b"0\r\n\r\n")
            .await
            .expect("end the body");
    }

    async fn fill(&mut self) -> bool {
        let mut buf = [0u8; 16 * 1024];
        let n = self.tcp.read(&mut buf).await.unwrap_or(0);
        self.read.extend_from_slice(&buf[..n]);
        n > 0
    }

    /// The answer's head (status line and headers).
    async fn head(&mut self) -> String {
        while self.head.is_none() {
            if let Some(end) = self.read.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.read[..end]).to_string();
                self.read.drain(..end + 4);
                self.head = Some(head);
            } else {
                assert!(self.fill().await, "the connection closed before the head");
            }
        }
        self.head.clone().unwrap()
    }

    /// Decodes the chunks read so far into `lines`.
    fn decode(&mut self) {
        while !self.ended {
            let Some(end) = self.read.windows(2).position(|w| w == b"\r\n") else {
                return;
            };
            let size = usize::from_str_radix(std::str::from_utf8(&self.read[..end]).unwrap(), 16)
                .expect("a chunk size");
            if size == 0 {
                self.ended = true;
                return;
            }
            if self.read.len() < end + 2 + size + 2 {
                return;
            }
            self.lines
                .extend_from_slice(&self.read[end + 2..end + 2 + size]);
            self.read.drain(..end + 2 + size + 2);
        }
    }

    /// The next answer line, or `None` when the answer ended (or the connection closed).
    async fn next(&mut self) -> Option<Value> {
        self.head().await;
        loop {
            self.decode();
            if let Some(newline) = self.lines.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.lines.drain(..=newline).collect();
                return Some(serde_json::from_slice(&line).expect("an answer line is JSON"));
            }
            if self.ended || !self.fill().await {
                return None;
            }
        }
    }

    async fn answer(&mut self) -> Value {
        tokio::time::timeout(Duration::from_secs(10), self.next())
            .await
            .expect("an answer within 10 s")
            .expect("an answer line before the end")
    }
}

/// A node on the in-memory store, its configuration adjusted by `tune`, a task on it, and a
/// push stream open to it.
async fn memory_stream(tune: impl FnOnce(&mut Config)) -> (TestApp, TaskId, PushStream) {
    let app = spawn_app_with(StoreKind::Memory, tune).await;
    let task = app.create_task().await;
    let stream = PushStream::open(app.addr).await;
    (app, task, stream)
}

#[tokio::test]
async fn each_line_is_answered_in_order_after_its_commit_and_reaches_subscribers() {
    let app = spawn_app(StoreKind::Postgres).await;
    let (a, b) = (app.create_task().await, app.create_task().await);
    let mut sub = app.subscribe(a).await;
    assert_eq!(sub.next_state().await["version"], 0);
    let db = app.db.as_ref().unwrap().client().await;
    let mut stream = PushStream::open(app.addr).await;
    stream
        .send_line(&json!({"task_id": a.to_string(), "progress": 10, "stage": "one"}))
        .await;
    let head = stream.head().await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("application/x-ndjson"), "{head}");
    let first = stream.answer().await;
    assert_eq!(first["status"], 200, "{first}");
    assert_eq!(first["state"]["stage"], "one");
    // Acknowledged means committed: the row has it already.
    let row = db
        .query_one(
            "SELECT progress::float8 FROM image_tasks WHERE id = $1",
            &[&a.as_uuid()],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, Option<f64>>(0), Some(10.0));
    assert_eq!(sub.next_state().await["stage"], "one");

    // Several lines in one chunk, a line split over two chunks, a bad line between good
    // ones, and an empty line (nothing to answer): one answer per line, in order.
    let two = format!(
        "{}\n\nnot json\n{}\n",
        json!({"task_id": b.to_string(), "progress": 20}),
        json!({"task_id": a.to_string(), "progress": 30, "stage": "three"})
    );
    let split = json!({"task_id": b.to_string(), "stage": "split"}).to_string();
    stream.send(two.as_bytes()).await;
    stream.send(&split.as_bytes()[..10]).await;
    tokio::task::yield_now().await;
    stream.send(format!("{}\n", &split[10..]).as_bytes()).await;
    let answers = [
        stream.answer().await,
        stream.answer().await,
        stream.answer().await,
        stream.answer().await,
    ];
    assert_eq!(answers[0]["status"], 200, "{}", answers[0]);
    assert_eq!(answers[0]["state"]["task_id"], b.to_string());
    assert_eq!(answers[1]["status"], 400, "{}", answers[1]);
    assert!(
        answers[1]["message"]
            .as_str()
            .unwrap()
            .contains("not valid JSON"),
        "{}",
        answers[1]
    );
    assert_eq!(answers[2]["state"]["stage"], "three", "{}", answers[2]);
    assert_eq!(answers[3]["state"]["stage"], "split", "{}", answers[3]);
    assert_eq!(sub.next_state().await["stage"], "three");
    // A last line without its newline is a line; then the answer ends.
    stream
        .send(
            json!({"task_id": a.to_string(), "progress": 40})
                .to_string()
                .as_bytes(),
        )
        .await;
    stream.finish().await;
    assert_eq!(stream.answer().await["state"]["progress"], 40.0);
    assert_eq!(stream.next().await, None, "the answer ends with the body");
    assert!(
        stream.ended,
        "a clean end (the last chunk), not a cut connection"
    );
    assert_eq!(sub.next_state().await["progress"], 40.0);
}

#[tokio::test]
async fn a_stream_without_the_key_of_another_type_or_without_a_body_is_refused_before_any_line() {
    let app = spawn_app(StoreKind::Memory).await;
    let mut anonymous = PushStream::open_with(app.addr, "").await;
    let head = anonymous.head().await;
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    let mut wrong = PushStream::open_with(app.addr, "authorization: Bearer wrong-key\r\n").await;
    assert!(wrong.head().await.starts_with("HTTP/1.1 401"));
    let response = app
        .http
        .post(app.url("/api/progress/stream"))
        .bearer_auth(KEY)
        .header("content-type", "text/plain")
        .body("{}\n")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 415);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["hint"]
            .as_str()
            .unwrap()
            .contains("application/x-ndjson"),
        "{body}"
    );
    // No body at all: a 400 that says to send the lines chunked.
    let response = app
        .http
        .post(app.url("/api/progress/stream"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["message"].as_str().unwrap().contains("chunked"),
        "{body}"
    );
    // Not the plain form (a query string): told what to change, not a 404.
    let response = app
        .http
        .post(app.url("/api/progress/stream?x=1"))
        .bearer_auth(KEY)
        .body("{}\n")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["message"].as_str().unwrap().contains("plain POST"),
        "{body}"
    );
}

#[tokio::test]
async fn a_line_over_the_limit_is_answered_413_and_the_lines_after_it_are_served() {
    let (_app, task, mut stream) = memory_stream(|config| {
        config.limits.max_body_bytes = 1024;
    })
    .await;
    let long = json!({"task_id": task.to_string(), "stage": "x".repeat(3000)}).to_string();
    // The long line arrives in pieces, its newline in the same chunk as the next line.
    stream.send(&long.as_bytes()[..1500]).await;
    stream.send(&long.as_bytes()[1500..]).await;
    let next = json!({"task_id": task.to_string(), "progress": 50});
    stream.send(format!("\n{next}\n").as_bytes()).await;
    let refused = stream.answer().await;
    assert_eq!(refused["status"], 413, "{refused}");
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("TASKCAST_MAX_BODY_BYTES"),
        "{refused}"
    );
    let served = stream.answer().await;
    assert_eq!(served["status"], 200, "{served}");
    assert_eq!(served["state"]["progress"], 50.0);
    assert_eq!(
        served["state"]["version"], 1,
        "the long line changed nothing"
    );
}

#[tokio::test]
async fn a_line_that_stops_halfway_is_answered_408_and_the_stream_ends() {
    let (_app, task, mut stream) = memory_stream(|config| {
        config.limits.body_timeout = Duration::from_secs(1);
    })
    .await;
    stream
        .send_line(&json!({"task_id": task.to_string(), "progress": 5}))
        .await;
    assert_eq!(stream.answer().await["status"], 200);
    stream.send(br#"{"task_id":"#).await;
    let late = stream.answer().await;
    assert_eq!(late["status"], 408, "{late}");
    assert_eq!(stream.next().await, None, "the answer ends after the 408");
    assert!(
        stream.ended,
        "a clean end (the last chunk), not a cut connection"
    );
}

#[tokio::test]
async fn a_stream_with_no_line_for_the_keep_alive_timeout_ends_and_empty_lines_keep_it_open() {
    let (_app, task, mut stream) = memory_stream(|config| {
        config.limits.keep_alive_timeout = Duration::from_secs(2);
    })
    .await;
    // Empty lines every 400 ms for 3.2 s: past the timeout, and still open.
    for _ in 0..8 {
        stream.send(b"\n").await;
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    stream
        .send_line(&json!({"task_id": task.to_string(), "progress": 7}))
        .await;
    assert_eq!(stream.answer().await["state"]["progress"], 7.0);
    // Then nothing: the answer ends after about two seconds, cleanly (the last chunk).
    let started = std::time::Instant::now();
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("the stream ends by itself"),
        None
    );
    assert!(stream.ended, "a clean end, not a cut connection");
    // Counted by the server from its answer; this clock starts when the answer arrived.
    assert!(started.elapsed() >= Duration::from_millis(1500));
}

#[tokio::test]
async fn a_client_that_stops_reading_its_answers_is_read_no_further_and_cut_off() {
    let (app, task, mut stream) = memory_stream(|config| {
        config.limits.keep_alive_timeout = Duration::from_secs(1);
        config.limits.max_batch_items = 4;
    })
    .await;
    stream.head().await;
    // Lines carrying a large stage, so the answers fill the socket buffers; never read.
    let line = format!(
        "{}\n",
        json!({"task_id": task.to_string(), "stage": "s".repeat(8000)})
    );
    let sent = tokio::time::timeout(Duration::from_secs(30), async {
        let mut sent = 0usize;
        loop {
            let chunk = [
                format!("{:x}\r\n", line.len()).as_bytes(),
                line.as_bytes(),
                b"\r\n",
            ]
            .concat();
            match tokio::time::timeout(Duration::from_secs(3), stream.tcp.write_all(&chunk)).await {
                Ok(Ok(())) => sent += 1,
                // The server stopped reading (the write blocks) or closed the connection.
                Ok(Err(_)) | Err(_) => return sent,
            }
        }
    })
    .await
    .expect("the server stops reading a client that does not read");
    let version = app.get_task(task).await.json::<Value>().await.unwrap()["version"]
        .as_i64()
        .unwrap();
    assert!(
        (version as usize) < sent,
        "lines were left unread: {version} applied of {sent} sent"
    );
    // Neither side moves: the connection is closed within twice the keep-alive timeout.
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match stream.tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the server closed the stalled stream");
    // And the node serves others all along.
    let pushed = app.push(task, json!({"progress": 99})).await;
    assert_eq!(pushed.status(), 200);
}

#[tokio::test]
async fn while_a_commit_is_held_a_stream_reads_at_most_max_batch_items_lines_ahead() {
    let db = TestDb::create().await;
    taskcast::store::schema::migrate(&db.url).await.unwrap();
    let tap = Tap::to_db(&db).await;
    let app = spawn_app_on_with(tap.url(&db), None, |config| {
        config.limits.max_batch_items = 4;
        config.limits.db_timeout = Duration::from_secs(20);
    })
    .await;
    let task = app.create_task().await;
    let mut stream = PushStream::open(app.addr).await;
    let armed = tap.catch(b"held-line");
    stream
        .send_line(&json!({"task_id": task.to_string(), "stage": "held-line"}))
        .await;
    let caught = armed.caught().await;
    // The commit is held; the client goes on sending large lines. The server must stop
    // reading after a few: without a bound it would queue every line it can read.
    let line = format!(
        "{}\n",
        json!({"task_id": task.to_string(), "stage": "s".repeat(8000)})
    );
    let chunk = [
        format!("{:x}\r\n", line.len()).as_bytes(),
        line.as_bytes(),
        b"\r\n",
    ]
    .concat();
    let mut sent = 0;
    let blocked = loop {
        if sent == 4000 {
            break false;
        }
        match tokio::time::timeout(Duration::from_secs(2), stream.tcp.write_all(&chunk)).await {
            Ok(result) => {
                result.expect("the server keeps the connection");
                sent += 1;
            }
            Err(_) => break true,
        }
    };
    assert!(
        blocked,
        "the server read all {sent} lines (32 MB) behind a held commit"
    );
    caught.release();
    // Everything it read is answered in order once the commit goes through.
    let first = stream.answer().await;
    assert_eq!(first["status"], 200, "{first}");
    assert_eq!(first["state"]["stage"], "held-line");
}

#[tokio::test]
async fn at_shutdown_a_stream_answers_the_line_it_is_committing_then_ends_cleanly() {
    let db = TestDb::create().await;
    taskcast::store::schema::migrate(&db.url).await.unwrap();
    let tap = Tap::to_db(&db).await;
    let mut app = spawn_app_on_with(tap.url(&db), None, |config| {
        config.limits.db_timeout = Duration::from_secs(20);
    })
    .await;
    let task = app.create_task().await;
    let mut stream = PushStream::open(app.addr).await;
    let armed = tap.catch(b"in-flight-at-shutdown");
    stream
        .send_line(&json!({"task_id": task.to_string(), "stage": "in-flight-at-shutdown"}))
        .await;
    let caught = armed.caught().await;
    // The commit is held; the node starts shutting down (it stops accepting once the
    // shutdown is triggered), then the commit goes through.
    let stopped = app.begin_shutdown();
    tokio::time::timeout(Duration::from_secs(10), async {
        while TcpStream::connect(app.addr).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the node stops accepting at shutdown");
    caught.release();
    let answer = stream.answer().await;
    assert_eq!(answer["status"], 200, "{answer}");
    assert_eq!(answer["state"]["stage"], "in-flight-at-shutdown");
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("the stream ends at shutdown"),
        None
    );
    assert!(
        stream.ended,
        "a clean end (the last chunk), not a cut connection"
    );
    tokio::time::timeout(Duration::from_secs(15), stopped)
        .await
        .expect("the server stops")
        .unwrap();
}

#[tokio::test]
async fn push_streams_hold_at_most_a_quarter_of_the_http_connections() {
    let app = spawn_app_with(StoreKind::Memory, |config| {
        config.limits.max_http_connections = 8;
    })
    .await;
    let task = app.create_task().await;
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut stream = PushStream::open(app.addr).await;
        assert!(stream.head().await.starts_with("HTTP/1.1 200"));
        open.push(stream);
    }
    let mut third = PushStream::open(app.addr).await;
    let head = third.head().await;
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    assert!(head.to_ascii_lowercase().contains("retry-after"), "{head}");
    // The other connections stay for everything else.
    let pushed = app.push(task, json!({"progress": 3})).await;
    assert_eq!(pushed.status(), 200);
    // A slot frees when a stream ends (once the server has dropped it).
    let mut first = open.remove(0);
    first.finish().await;
    assert_eq!(first.next().await, None);
    let reopened = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let mut again = PushStream::open(app.addr).await;
            if again.head().await.starts_with("HTTP/1.1 200") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(reopened.is_ok(), "the ended stream's slot is free again");
}

#[tokio::test]
async fn in_naive_write_mode_a_stream_applies_its_lines_in_order() {
    let app = spawn_app_with(StoreKind::Postgres, |config| {
        config.write_mode = taskcast::writer::WriteMode::Naive;
    })
    .await;
    let task = app.create_task().await;
    let mut stream = PushStream::open(app.addr).await;
    // Naive commits run concurrently; without one line at a time, a later line's commit
    // can land first and an earlier one overwrite it.
    let mut lines = String::new();
    for n in 1..=40 {
        lines.push_str(&format!(
            "{}\n",
            json!({"task_id": task.to_string(), "progress": n})
        ));
    }
    stream.send(lines.as_bytes()).await;
    for n in 1..=40 {
        let answer = stream.answer().await;
        assert_eq!(answer["state"]["progress"], f64::from(n), "{answer}");
    }
    let state: Value = app.get_task(task).await.json().await.unwrap();
    assert_eq!(
        state["progress"], 40.0,
        "the last line is the state: {state}"
    );
}
