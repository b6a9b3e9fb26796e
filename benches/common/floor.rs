//! The floor: the least a WebSocket broadcaster can do on this machine with the same
//! libraries. tokio-tungstenite accepts `/ws/<topic>`; the push body becomes one frame
//! payload, shared (not copied) by every subscriber of the topic. No JSON, no auth, no
//! storage. Pushes arrive two ways:
//!
//! - HTTP: `POST /push/<topic>` on keep-alive HTTP/1.1 connections, the request head
//!   parsed with httparse (what hyper uses), answered `200` with an empty body: what any
//!   HTTP push path must pay, and nothing else.
//! - TCP: lines `<topic> <body>\n` on a plain connection, not answered: the floor under
//!   that floor, with no HTTP at all.
//!
//! It runs as its own process (the bench binary with `--floor-server`) so /proc shows its
//! cost exactly as it shows taskcast's. It prints `floor ws=<addr> push=<addr> tcp=<addr>`
//! when ready.

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio_tungstenite::accept_hdr_async_with_config;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use super::BoxError;

type Topics = Arc<Mutex<HashMap<String, broadcast::Sender<Utf8Bytes>>>>;

/// Frames a slow subscriber may fall behind by before it skips some.
const BACKLOG: usize = 64;

/// Runs the floor server until killed. Worker threads: one per core, like taskcast's.
pub fn run() -> Result<(), BoxError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let ws = TcpListener::bind("127.0.0.1:0").await?;
        let push = TcpListener::bind("127.0.0.1:0").await?;
        let lines = TcpListener::bind("127.0.0.1:0").await?;
        {
            let mut out = std::io::stdout().lock();
            writeln!(
                out,
                "floor ws={} push={} tcp={}",
                ws.local_addr()?,
                push.local_addr()?,
                lines.local_addr()?
            )?;
            out.flush()?;
        }
        let topics: Topics = Arc::default();
        let accept_pushes = tokio::spawn(accept(push, topics.clone(), |s, t| {
            tokio::spawn(pushes(s, t));
        }));
        let accept_lines = tokio::spawn(accept(lines, topics.clone(), |s, t| {
            tokio::spawn(line_pushes(s, t));
        }));
        accept(ws, topics, |s, t| {
            tokio::spawn(subscriber(s, t));
        })
        .await;
        accept_pushes.abort();
        accept_lines.abort();
        Ok(())
    })
}

async fn accept(listener: TcpListener, topics: Topics, handle: impl Fn(TcpStream, Topics)) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                handle(stream, topics.clone());
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
        }
    }
}

async fn subscriber(stream: TcpStream, topics: Topics) {
    let mut path = String::new();
    // The signature is tungstenite's, large error type included.
    #[allow(clippy::result_large_err)]
    let capture = |request: &Request, response: Response| {
        path = request.uri().path().to_string();
        Ok(response)
    };
    // The same small buffers as a tuned server would use.
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let Ok(mut ws) = accept_hdr_async_with_config(stream, capture, Some(config)).await else {
        return;
    };
    let topic = path.strip_prefix("/ws/").unwrap_or(&path).to_string();
    let mut frames = {
        let mut topics = topics.lock().expect("no panics while held");
        topics
            .entry(topic)
            .or_insert_with(|| broadcast::channel(BACKLOG).0)
            .subscribe()
    };
    if ws.send(Message::text("subscribed")).await.is_err() {
        return;
    }
    loop {
        tokio::select! {
            frame = frames.recv() => match frame {
                Ok(frame) => {
                    if ws.send(Message::Text(frame)).await.is_err() {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            },
            incoming = ws.next() => match incoming {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            },
        }
    }
}

/// Publishes `body` to `topic`'s subscribers, if it has any.
fn publish(topics: &Topics, topic: &[u8], body: bytes::Bytes) {
    let Ok(topic) = std::str::from_utf8(topic) else {
        return;
    };
    let sender = topics
        .lock()
        .expect("no panics while held")
        .get(topic)
        .cloned();
    if let (Some(sender), Ok(frame)) = (sender, Utf8Bytes::try_from(body)) {
        let _ = sender.send(frame);
    }
}

/// Answers `POST /push/<topic>` requests on one keep-alive connection.
async fn pushes(mut stream: TcpStream, topics: Topics) {
    let mut buffer = BytesMut::with_capacity(4096);
    loop {
        // Read until httparse has the whole head.
        let (head_len, length, topic) = loop {
            let mut headers = [httparse::EMPTY_HEADER; 16];
            let mut request = httparse::Request::new(&mut headers);
            match request.parse(&buffer) {
                Ok(httparse::Status::Complete(head_len)) => {
                    let length = request
                        .headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                        .and_then(|h| std::str::from_utf8(h.value).ok())
                        .and_then(|v| v.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    let path = request.path.unwrap_or_default();
                    let topic = path.strip_prefix("/push/").unwrap_or(path);
                    // The topic's place in the buffer, so the borrow ends here.
                    let start = topic.as_ptr() as usize - buffer.as_ptr() as usize;
                    break (head_len, length, start..start + topic.len());
                }
                Ok(httparse::Status::Partial) => {}
                Err(_) => return,
            }
            match stream.read_buf(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        };
        while buffer.len() < head_len + length {
            match stream.read_buf(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
        let mut request = buffer.split_to(head_len + length);
        let body = request.split_off(head_len).freeze();
        publish(&topics, &request[topic], body);
        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
        if stream.write_all(answer).await.is_err() {
            return;
        }
    }
}

/// Publishes each line `<topic> <body>` of one connection; answers nothing.
async fn line_pushes(mut stream: TcpStream, topics: Topics) {
    let mut buffer = BytesMut::with_capacity(8192);
    loop {
        while let Some(end) = buffer.iter().position(|&b| b == b'\n') {
            let mut line = buffer.split_to(end + 1);
            line.truncate(end);
            let Some(space) = line.iter().position(|&b| b == b' ') else {
                continue;
            };
            let body = line.split_off(space + 1).freeze();
            publish(&topics, &line[..space], body);
        }
        match stream.read_buf(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}
