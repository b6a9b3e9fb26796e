//! Plain HTTP connections are bounded: header, body and keep-alive deadlines, a header
//! size limit, a connection cap that evicts idle connections before a push is kept out,
//! HTTP/1.1 only, and an accept loop that survives the open-file limit.

use std::time::Duration;

use serde_json::json;
use taskcast::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};

use crate::helpers::{KEY, StoreKind, TestApp, WAIT, spawn_app_with};
use crate::process::{start_command, taskcast};

const HEADER: Duration = Duration::from_millis(400);
const KEEP_ALIVE: Duration = Duration::from_millis(1500);
const BODY: Duration = Duration::from_millis(400);
/// Scheduling slack on a shared machine.
const SLACK: Duration = Duration::from_secs(2);

fn short_deadlines(config: &mut Config) {
    config.limits.header_timeout = HEADER;
    config.limits.keep_alive_timeout = KEEP_ALIVE;
    config.limits.body_timeout = BODY;
}

/// Reads until the server closes the connection (EOF or reset); everything it sent.
async fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return all,
            Ok(n) => all.extend_from_slice(&buf[..n]),
        }
    }
}

/// Reads until `needle` has arrived; everything read.
async fn read_until(stream: &mut TcpStream, needle: &str) -> String {
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    timeout(WAIT, async {
        while !String::from_utf8_lossy(&all).contains(needle) {
            let n = stream.read(&mut buf).await.expect("the connection is open");
            assert!(
                n > 0,
                "closed before {needle:?}: {}",
                String::from_utf8_lossy(&all)
            );
            all.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("the expected bytes arrive");
    String::from_utf8_lossy(&all).into_owned()
}

async fn connect(app: &TestApp) -> TcpStream {
    TcpStream::connect(app.addr).await.expect("connect")
}

/// Waits for the server to close `stream` and returns how long that took from `start`.
async fn closed_after(stream: &mut TcpStream, start: Instant, within: Duration) -> Duration {
    timeout(within, read_until_closed(stream))
        .await
        .expect("the server closed the connection in time");
    start.elapsed()
}

#[tokio::test]
async fn a_half_sent_request_header_is_closed_within_the_header_timeout() {
    let app = spawn_app_with(StoreKind::Memory, short_deadlines).await;
    let mut stream = connect(&app).await;
    let start = Instant::now();
    stream
        .write_all(b"POST /api/tasks/x/progress HTTP/1.1\r\nHost: t\r\nX-Slow: ")
        .await
        .unwrap();
    let took = closed_after(&mut stream, start, HEADER + SLACK).await;
    assert!(took >= HEADER * 3 / 4, "closed too early: {took:?}");
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed_within_the_header_timeout() {
    let app = spawn_app_with(StoreKind::Memory, short_deadlines).await;
    let start = Instant::now();
    let mut stream = connect(&app).await;
    let took = closed_after(&mut stream, start, HEADER + SLACK).await;
    assert!(took >= HEADER * 3 / 4, "closed too early: {took:?}");
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_keep_alive_timeout() {
    let app = spawn_app_with(StoreKind::Memory, short_deadlines).await;
    let mut stream = connect(&app).await;
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    read_until(&mut stream, r#"{"status":"ok"}"#).await;
    let answered = Instant::now();
    // Idle is not a slow header: the connection outlives twice the header timeout...
    let mut byte = [0u8; 1];
    assert!(
        timeout(HEADER * 2, stream.read(&mut byte)).await.is_err(),
        "an idle kept-alive connection was closed at the header timeout"
    );
    // ...and is closed at the keep-alive timeout.
    let took = closed_after(&mut stream, answered, KEEP_ALIVE + SLACK).await;
    assert!(took >= KEEP_ALIVE * 3 / 4, "closed too early: {took:?}");
}

#[tokio::test]
async fn a_body_that_does_not_arrive_in_time_gets_408() {
    let app = spawn_app_with(StoreKind::Memory, short_deadlines).await;
    let task = app.create_task().await;
    let mut stream = connect(&app).await;
    let head = format!(
        "POST /api/tasks/{task}/progress HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"progress\""
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let start = Instant::now();
    let response = timeout(BODY + SLACK, read_until_closed(&mut stream))
        .await
        .expect("answered and closed in time");
    let response = String::from_utf8_lossy(&response).to_lowercase();
    assert!(response.starts_with("http/1.1 408"), "{response}");
    assert!(
        response.contains(r#""error":"request_timeout""#),
        "{response}"
    );
    assert!(response.contains("connection: close"), "{response}");
    assert!(start.elapsed() >= BODY * 3 / 4, "answered too early");
}

#[tokio::test]
async fn a_header_beyond_max_header_bytes_gets_431_and_one_within_it_is_served() {
    let app = spawn_app_with(StoreKind::Memory, |c| c.limits.max_header_bytes = 16 * 1024).await;
    let request = |pad: usize| {
        format!(
            "GET /healthz HTTP/1.1\r\nHost: t\r\nX-Pad: {}\r\nConnection: close\r\n\r\n",
            "a".repeat(pad)
        )
    };
    let mut big = connect(&app).await;
    // Written in the background: the server may answer and close before it is all sent.
    let mut sending = tokio::spawn(async move {
        let _ = big.write_all(request(40 * 1024).as_bytes()).await;
        big
    });
    let mut big = timeout(WAIT, &mut sending).await.unwrap().unwrap();
    let response = timeout(WAIT, read_until_closed(&mut big)).await.unwrap();
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 431"), "{response}");

    let mut fits = connect(&app).await;
    fits.write_all(request(12 * 1024).as_bytes()).await.unwrap();
    let response = timeout(WAIT, read_until_closed(&mut fits)).await.unwrap();
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
}

#[tokio::test]
async fn plaintext_http2_prior_knowledge_is_refused() {
    let app = spawn_app_with(StoreKind::Memory, |_| {}).await;
    let mut stream = connect(&app).await;
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]); // an empty SETTINGS frame
    stream.write_all(&hello).await.unwrap();
    let answer = timeout(WAIT, read_until_closed(&mut stream))
        .await
        .expect("the connection is closed");
    // An HTTP/2 server answers with its own SETTINGS frame: type 4 at byte 3.
    assert!(
        !(answer.len() >= 9 && answer[3] == 4),
        "the server spoke HTTP/2: {answer:?}"
    );
    assert!(
        answer.is_empty() || answer.starts_with(b"HTTP/1.1 "),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
}

#[tokio::test]
async fn when_the_http_cap_is_full_of_idle_connections_the_oldest_is_evicted_for_a_push() {
    let app = spawn_app_with(StoreKind::Memory, |c| {
        c.limits.max_http_connections = 4;
        c.limits.header_timeout = Duration::from_secs(60);
    })
    .await;
    let task = app.create_task().await;
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(connect(&app).await);
    }
    let fresh = reqwest::Client::new();
    let pushed = timeout(
        WAIT,
        fresh
            .post(app.url(&format!("/api/tasks/{task}/progress")))
            .bearer_auth(KEY)
            .json(&json!({"progress": 10}))
            .send(),
    )
    .await
    .expect("the push is answered in time")
    .expect("the push reached the server");
    assert_eq!(pushed.status(), 200);
    // Slots were [create's pooled connection, idle 0..2]; idle 3 evicted the first, the
    // push evicted idle 0.
    let start = Instant::now();
    closed_after(&mut idle[0], start, WAIT).await;
}

#[tokio::test]
async fn when_every_http_slot_is_mid_request_a_new_connection_gets_503() {
    let app = spawn_app_with(StoreKind::Memory, |c| {
        c.limits.max_http_connections = 2;
        c.limits.body_timeout = Duration::from_secs(60);
    })
    .await;
    let task = app.create_task().await;
    let mut busy = Vec::new();
    for _ in 0..2 {
        let mut stream = connect(&app).await;
        let head = format!(
            "POST /api/tasks/{task}/progress HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {KEY}\r\n\
             Content-Length: 20\r\nExpect: 100-continue\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        // 100 Continue comes when the route reads the body: the request is in flight.
        read_until(&mut stream, "100 Continue").await;
        busy.push(stream);
    }
    let mut third = connect(&app).await;
    third
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let response = timeout(WAIT, read_until_closed(&mut third))
        .await
        .expect("refused quickly, not left hanging");
    let response = String::from_utf8_lossy(&response).to_lowercase();
    assert!(response.starts_with("http/1.1 503"), "{response}");
    assert!(response.contains("retry-after: 1"), "{response}");
    assert!(response.contains("connection: close"), "{response}");
    assert!(response.contains("max_http_connections"), "{response}");
}

#[tokio::test]
async fn websockets_and_sse_streams_do_not_hold_http_slots() {
    let app = spawn_app_with(StoreKind::Memory, |c| c.limits.max_http_connections = 1).await;
    let task = app.create_task().await;
    let sse = reqwest::Client::new()
        .get(app.url(&format!(
            "/api/tasks/{task}/events?token={}",
            app.token(&[task])
        )))
        .send()
        .await
        .expect("the stream opens");
    assert_eq!(sse.status(), 200);
    let mut sse = sse;
    let first = timeout(WAIT, sse.chunk()).await.unwrap().unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("\"snapshot\":true"));
    // With the stream holding the only slot, this upgrade would get 503.
    let mut socket = app.subscribe(task).await;
    let pushed = reqwest::Client::new()
        .post(app.url(&format!("/api/tasks/{task}/progress")))
        .bearer_auth(KEY)
        .json(&json!({"progress": 55}))
        .send()
        .await
        .expect("the push reached the server");
    assert_eq!(pushed.status(), 200);
    let states = socket.states_until_version(1).await;
    assert_eq!(
        states.last().expect("a state")["progress"].as_f64(),
        Some(55.0)
    );
    let next = timeout(WAIT, sse.chunk()).await.unwrap().unwrap().unwrap();
    assert!(String::from_utf8_lossy(&next).contains("\"progress\":55"));
}

/// `taskcast serve` with its open-file limit set to `files`.
fn taskcast_with_file_limit(files: u64, env: &[(&str, &str)]) -> tokio::process::Command {
    let mut command = taskcast(env, &["--listen", "127.0.0.1:0"]);
    // SAFETY: setrlimit is async-signal-safe, and the closure touches nothing else.
    unsafe {
        command.pre_exec(move || {
            let limit = libc::rlimit {
                rlim_cur: files,
                rlim_max: files,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    command
}

/// Opens `n` connections that send nothing, more than the server has descriptors for.
async fn flood(addr: &str, n: usize) -> Vec<TcpStream> {
    let mut idle = Vec::with_capacity(n);
    for _ in 0..n {
        if let Ok(Ok(stream)) = timeout(WAIT, TcpStream::connect(addr)).await {
            idle.push(stream);
        }
    }
    idle
}

/// A push through `addr` under `within`: create a task, then push to it.
async fn push_through(addr: &str) -> u16 {
    let http = reqwest::Client::builder()
        .timeout(WAIT)
        .build()
        .expect("a client");
    let created: serde_json::Value = http
        .post(format!("http://{addr}/api/tasks"))
        .bearer_auth(KEY)
        .json(&json!({"prompt": "under load"}))
        .send()
        .await
        .expect("the create reached the server")
        .json()
        .await
        .unwrap();
    let task = created["task_id"].as_str().expect("a task id");
    http.post(format!("http://{addr}/api/tasks/{task}/progress"))
        .bearer_auth(KEY)
        .json(&json!({"progress": 30}))
        .send()
        .await
        .expect("the push reached the server")
        .status()
        .as_u16()
}

#[tokio::test]
async fn with_the_open_file_limit_nearly_used_by_idle_connections_a_push_still_succeeds() {
    let server = start_command(taskcast_with_file_limit(
        256,
        &[("TASK_PROCESS_SECRET_KEY", KEY)],
    ))
    .await;
    let _idle = flood(&server.addr, 400).await;
    assert_eq!(push_through(&server.addr).await, 200, "{}", server.log());
    assert!(
        !server.log().contains("accept failed"),
        "the default caps keep the server under its open-file limit: {}",
        server.log()
    );
}

#[tokio::test]
async fn out_of_file_descriptors_the_accept_loop_evicts_and_logs_once_per_interval() {
    let server = start_command(taskcast_with_file_limit(
        256,
        &[
            ("TASK_PROCESS_SECRET_KEY", KEY),
            // A cap the descriptors cannot back: accept itself fails with EMFILE.
            ("TASKCAST_MAX_HTTP_CONNECTIONS", "5000"),
            ("TASKCAST_HEADER_TIMEOUT_SECS", "60"),
        ],
    ))
    .await;
    let _idle = flood(&server.addr, 400).await;
    assert_eq!(push_through(&server.addr).await, 200, "{}", server.log());
    let log = server.log();
    let lines = log.lines().filter(|l| l.contains("accept failed")).count();
    assert!(lines >= 1, "EMFILE was reached and reported: {log}");
    assert!(lines <= 3, "one line per interval, not per failure: {log}");
}
