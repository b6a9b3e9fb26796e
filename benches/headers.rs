//! Memory under a header flood: `BENCH_CONNECTIONS` connections each send a request header
//! of `BENCH_HEADER_KIB` KiB and never finish it (no key needed). Prints the release
//! server's RSS before the flood, while every connection is open (and its peak), and
//! `BENCH_SETTLE_SECS` (8) after they close.
//!
//! With the header bound (TASKCAST_MAX_HEADER_BYTES, 32 KiB) a header larger than it is
//! answered 431 and closed; a header just under it is held until the header timeout, the
//! worst case per connection. Run both:
//!
//! ```text
//! cargo bench --bench headers                          # 2,000 x 400 KiB (the issue's flood)
//! BENCH_HEADER_KIB=31 cargo bench --bench headers      # 2,000 x 31 KiB, held open
//! ```
//!
//! `TASKCAST_BIN=<path>` measures another build (e.g. one from before the bound).

mod common;

use std::time::Duration;

use common::proc::Sample;
use common::server::Server;
use common::{BoxError, env_secs, env_usize};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// How long one connection may take to send its header before it counts as stalled.
const SEND_WITHIN: Duration = Duration::from_secs(30);

fn main() -> Result<(), BoxError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run())
}

async fn run() -> Result<(), BoxError> {
    let connections = env_usize("BENCH_CONNECTIONS", 2000);
    let header_kib = env_usize("BENCH_HEADER_KIB", 400);
    let settle = env_secs("BENCH_SETTLE_SECS", 8.0);
    let server = Server::taskcast(
        "headers",
        &[
            // Hold every connection for the measurement: the cap above the flood, and
            // the header timeout longer than the bench.
            (
                "TASKCAST_MAX_HTTP_CONNECTIONS",
                (connections + 100).to_string(),
            ),
            ("TASKCAST_HEADER_TIMEOUT_SECS", "300".to_string()),
        ],
    )
    .await?;
    let before = server.sample()?;

    let mut sends = Vec::with_capacity(connections);
    for i in 0..connections {
        let addr = server.addr;
        sends.push(tokio::spawn(async move {
            let mut stream = TcpStream::connect(addr).await.ok()?;
            let sent = tokio::time::timeout(SEND_WITHIN, send_header(&mut stream, i, header_kib))
                .await
                .unwrap_or(Ok(false));
            Some((stream, sent.unwrap_or(false)))
        }));
    }
    let mut open = Vec::with_capacity(connections);
    let (mut whole, mut cut) = (0, 0);
    for send in sends {
        if let Some((stream, complete)) = send.await? {
            if complete {
                whole += 1;
            } else {
                cut += 1;
            }
            open.push(stream);
        }
    }
    // Let the server read what is in flight before sampling.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let during = server.sample()?;
    drop(open);
    tokio::time::sleep(settle).await;
    let after = server.sample()?;

    println!(
        "header flood: {connections} connections x {header_kib} KiB unfinished header \
         (the client wrote all of it on {whole}; the server closed {cut} first)"
    );
    print_row("before", &before);
    print_row("during (all open)", &during);
    print_row(&format!("after ({:.0} s)", settle.as_secs_f64()), &after);
    println!(
        "server RSS MiB: before {:.1}, during {:.1} (peak {:.1}), after {:.1}",
        mib(before.rss_kib),
        mib(during.rss_kib),
        mib(after.peak_kib),
        mib(after.rss_kib)
    );
    server.stop().await;
    Ok(())
}

/// Sends `kib` KiB of header lines without the blank line that would end the header.
/// False if the server closed the connection first (431).
async fn send_header(stream: &mut TcpStream, i: usize, kib: usize) -> std::io::Result<bool> {
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: bench\r\n")
        .await?;
    let line = format!("X-Pad-{i}: {}\r\n", "a".repeat(1000));
    let mut sent = 0;
    while sent < kib * 1024 {
        if stream.write_all(line.as_bytes()).await.is_err() {
            return Ok(false);
        }
        sent += line.len();
    }
    Ok(true)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn print_row(label: &str, sample: &Sample) {
    println!(
        "  {label:<20} RSS {:>8.1} MiB   peak {:>8.1} MiB",
        mib(sample.rss_kib),
        mib(sample.peak_kib)
    );
}
