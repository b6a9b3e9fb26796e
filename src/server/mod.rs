//! The accept loop: HTTP/1.1 with upgrades over the warp filter, `TCP_NODELAY` on every
//! connection, deadlines and a cap on plain HTTP connections, and a graceful stop.
//!
//! warp's own `serve` cannot set `TCP_NODELAY`, and a progress frame is a small write that
//! Nagle's algorithm would otherwise hold back behind an unacknowledged one.
//!
//! HTTP/1.1 only: plaintext HTTP/2 (h2c prior knowledge) is refused, because nothing in
//! front of taskcast needs it and each protocol is one more set of limits to get right.
//! The request line and headers are bounded by hyper's read buffer (`max_buf_size`),
//! which answers 431 when a header does not fit.

mod accept;
mod memory;
mod slots;
mod tracked;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use warp::filters::BoxedFilter;
use warp::hyper::server::conn::http1;
use warp::reply::Response;

use crate::error::Error;
use accept::AcceptErrors;
use slots::Lease;
pub use slots::Slots;
pub use tracked::{BoxFuture, Connection, Shortcut, StreamDeadline};
use tracked::{TrackedIo, TrackedService};

/// Connections over the cap that are being told 503 at once; more are closed unanswered.
const MAX_REFUSING: usize = 64;
/// How long the accept loop waits for evicted connections to close before refusing one.
const CLOSING_WAIT: Duration = Duration::from_secs(1);
/// How long a refused connection has to send its request header.
const REFUSE_WITHIN: Duration = Duration::from_secs(2);

/// The accept loop's bounds on plain HTTP connections.
#[derive(Clone, Debug)]
pub struct HttpOptions {
    /// Open connections that are not WebSockets or SSE streams.
    pub max_connections: usize,
    /// From connect, or from a later request's first byte, to the end of its header.
    pub header_timeout: Duration,
    /// From the end of a response to the next request's first byte.
    pub keep_alive_timeout: Duration,
    /// The request line and headers; hyper's read buffer (at least 8192).
    pub max_header_bytes: usize,
}

/// Serves `routes` until `shutdown` completes, then stops accepting and waits (at most
/// `grace`) for requests in flight. Upgraded WebSockets are detached from HTTP and are
/// stopped by their own shutdown signal.
pub async fn serve(
    listener: TcpListener,
    routes: BoxedFilter<(Response,)>,
    shortcut: Option<Arc<dyn Shortcut>>,
    options: HttpOptions,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    // Each connection holds a receiver; shutdown sends, then waits for them all to go.
    let (graceful, _) = watch::channel(());
    let slots = Slots::new(
        options.max_connections,
        options.header_timeout,
        options.keep_alive_timeout,
    );
    // hyper's http1 builder, not hyper-util's `auto`: `auto` serves HTTP/2 to a client
    // that opens with its preface even when told `http1_only`, once upgrades are on.
    // No timer and so no hyper header timeout: it would also cut idle kept-alive
    // connections at the header timeout. Each connection's `Track` keeps both deadlines.
    let mut builder = http1::Builder::new();
    builder.max_buf_size(options.max_header_bytes);
    tokio::spawn(memory::trim_after_floods(
        slots.clone(),
        graceful.subscribe(),
    ));
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    let mut errors = AcceptErrors::default();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let pause = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    errors.accepted();
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::debug!(error = %e, "could not set TCP_NODELAY");
                    }
                    match slots.admit_within(CLOSING_WAIT).await {
                        Some(lease) => {
                            let service = TowerToHyperService::new(warp::service(routes.clone()));
                            tokio::spawn(serve_one(
                                builder.clone(),
                                stream,
                                service,
                                shortcut.clone(),
                                lease,
                                graceful.subscribe(),
                            ));
                        }
                        None => match refusing.clone().try_acquire_owned() {
                            Ok(permit) => {
                                tokio::spawn(async move {
                                    refuse(stream).await;
                                    drop(permit);
                                });
                            }
                            Err(_) => drop(stream),
                        },
                    }
                    None
                }
                Err(e) => {
                    let backoff = errors.failed(tokio::time::Instant::now());
                    if let Some(failures) = backoff.report {
                        tracing::warn!(
                            error = %e,
                            failures,
                            open_http_connections = slots.len(),
                            "accept failed; backing off (one line per {}s)",
                            accept::LOG_EVERY.as_secs()
                        );
                    }
                    // Out of descriptors: the oldest idle connection gives its one up.
                    if accept::is_exhaustion(&e) {
                        slots.evict_oldest();
                    }
                    Some(backoff.pause)
                }
            },
            _ = &mut shutdown => break,
        };
        if let Some(pause) = pause {
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                _ = &mut shutdown => break,
            }
        }
    }
    drop(listener);
    let _ = graceful.send(());
    if tokio::time::timeout(grace, graceful.closed())
        .await
        .is_err()
    {
        tracing::warn!("some HTTP requests were still running when the grace period ended");
    }
}

/// Serves one connection until it ends, its deadline passes, or it is evicted. At
/// shutdown it finishes the request in flight and closes.
async fn serve_one<S>(
    builder: http1::Builder,
    stream: TcpStream,
    service: S,
    shortcut: Option<Arc<dyn Shortcut>>,
    lease: Lease,
    mut shutdown: watch::Receiver<()>,
) where
    S: warp::hyper::service::Service<
            warp::http::Request<warp::hyper::body::Incoming>,
            Response = Response,
        > + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    let track = lease.track();
    let io = TokioIo::new(TrackedIo::new(stream, track.clone()));
    let service = TrackedService::new(service, shortcut, track.clone());
    let connection = builder.serve_connection(io, service).with_upgrades();
    let mut connection = std::pin::pin!(connection);
    let mut stopping = false;
    loop {
        tokio::select! {
            ended = connection.as_mut() => {
                if let Err(e) = ended {
                    tracing::debug!(error = %e, "http connection ended with an error");
                }
                break;
            }
            changed = shutdown.changed(), if !stopping => {
                stopping = true;
                if changed.is_ok() {
                    connection.as_mut().graceful_shutdown();
                }
            }
            () = track.expired() => {
                tracing::debug!(
                    evicted = track.evicted(),
                    "closing an HTTP connection: deadline passed or slot needed"
                );
                break;
            }
        }
    }
    drop(lease);
}

/// Answers one request with 503 (Retry-After, Connection: close) when every slot holds a
/// request in flight, and closes.
async fn refuse(stream: TcpStream) {
    let mut builder = http1::Builder::new();
    builder
        .keep_alive(false)
        .max_buf_size(8192)
        .timer(TokioTimer::new())
        .header_read_timeout(REFUSE_WITHIN);
    let service = warp::hyper::service::service_fn(|_| async {
        let full = Error::Unavailable {
            what: "an HTTP connection slot (TASKCAST_MAX_HTTP_CONNECTIONS reached)",
            source: None,
        };
        Ok::<_, Infallible>(full.into_response())
    });
    let served = builder.serve_connection(TokioIo::new(stream), service);
    // The header timeout bounds the read; this bounds a client that does not read.
    let _ = tokio::time::timeout(REFUSE_WITHIN * 2, served).await;
}
