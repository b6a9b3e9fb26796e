//! Raw WebSocket frames that break RFC 6455: the server answers each with the close code
//! that says why (1002 protocol error, 1007 invalid UTF-8) before it drops the TCP
//! connection, instead of dropping it silently.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{StoreKind, TestApp, WAIT, spawn_app};

const TEXT: u8 = 0x1;
const CLOSE: u8 = 0x8;
/// A data opcode RFC 6455 reserves for future use.
const RESERVED: u8 = 0x3;

/// A WebSocket opened by hand over TCP, so a test can write frames no client library would.
async fn handshake(app: &TestApp) -> TcpStream {
    let mut tcp = TcpStream::connect(app.addr).await.unwrap();
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        app.addr
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    // Byte by byte up to the blank line, so no frame byte is consumed with the headers.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let byte = tokio::time::timeout(WAIT, tcp.read_u8())
            .await
            .expect("the handshake answer in time")
            .unwrap();
        head.push(byte);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    tcp
}

/// One final frame as a client must send it: masked (with a fixed key).
fn masked(opcode: u8, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126, "short frames only");
    let key = [0x37, 0xfa, 0x21, 0x3d];
    let mut frame = vec![0x80 | opcode, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&key);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    frame
}

/// Reads server frames until a Close and returns its code, then checks that the server
/// ends the TCP connection. Fails the test if the connection ends without a Close.
async fn close_code(tcp: &mut TcpStream) -> u16 {
    let code = tokio::time::timeout(WAIT, async {
        loop {
            let mut header = [0u8; 2];
            tcp.read_exact(&mut header)
                .await
                .expect("a close frame before the connection ends");
            assert_eq!(header[1] & 0x80, 0, "server frames are not masked");
            let len = match header[1] & 0x7f {
                126 => u64::from(tcp.read_u16().await.unwrap()),
                127 => tcp.read_u64().await.unwrap(),
                n => u64::from(n),
            };
            let mut payload = vec![0u8; usize::try_from(len).unwrap()];
            tcp.read_exact(&mut payload).await.unwrap();
            if header[0] & 0x0f == CLOSE {
                assert!(payload.len() >= 2, "the close frame carries a code");
                return u16::from_be_bytes([payload[0], payload[1]]);
            }
        }
    })
    .await
    .expect("a close frame in time");
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut rest))
        .await
        .expect("the server drops the connection after its close frame")
        .unwrap();
    code
}

/// Sends `bytes` on a fresh connection and returns the close code the server answers with.
async fn answer_to(app: &TestApp, bytes: &[u8]) -> u16 {
    let mut tcp = handshake(app).await;
    tcp.write_all(bytes).await.unwrap();
    close_code(&mut tcp).await
}

#[tokio::test]
async fn protocol_violations_are_answered_with_close_1002() {
    let app = spawn_app(StoreKind::Memory).await;
    let unmasked = [0x80 | TEXT, 2, b'h', b'i'];
    assert_eq!(answer_to(&app, &unmasked).await, 1002, "an unmasked frame");
    assert_eq!(
        answer_to(&app, &masked(RESERVED, b"")).await,
        1002,
        "a reserved opcode"
    );
    assert_eq!(
        answer_to(&app, &masked(CLOSE, &[0x03])).await,
        1002,
        "a close payload of one byte"
    );
}

#[tokio::test]
async fn close_codes_a_client_may_not_send_are_answered_with_1002() {
    let app = spawn_app(StoreKind::Memory).await;
    for code in [1005u16, 999, 1006, 1015] {
        assert_eq!(
            answer_to(&app, &masked(CLOSE, &code.to_be_bytes())).await,
            1002,
            "a close with code {code}"
        );
    }
    // The control case: a valid close is echoed, not treated as a violation.
    assert_eq!(
        answer_to(&app, &masked(CLOSE, &1000u16.to_be_bytes())).await,
        1000
    );
}

#[tokio::test]
async fn invalid_utf8_is_answered_with_close_1007() {
    let app = spawn_app(StoreKind::Memory).await;
    assert_eq!(
        answer_to(&app, &masked(TEXT, &[b'{', 0xff, 0xfe, b'}'])).await,
        1007,
        "a text message"
    );
    let mut close = 1000u16.to_be_bytes().to_vec();
    close.extend_from_slice(&[0xc3, 0x28]);
    assert_eq!(
        answer_to(&app, &masked(CLOSE, &close)).await,
        1007,
        "a close reason"
    );
}
