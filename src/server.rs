//! The accept loop: HTTP/1.1 with upgrades over the warp filter, `TCP_NODELAY` on every
//! connection, and a graceful stop.
//!
//! warp's own `serve` cannot set `TCP_NODELAY`, and a progress frame is a small write that
//! Nagle's algorithm would otherwise hold back behind an unacknowledged one.

use std::future::Future;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use warp::filters::BoxedFilter;
use warp::reply::Response;

/// Serves `routes` until `shutdown` completes, then stops accepting and waits (at most
/// `grace`) for requests in flight. Upgraded WebSockets are detached from HTTP and are
/// stopped by their own shutdown signal.
pub async fn serve(
    listener: TcpListener,
    routes: BoxedFilter<(Response,)>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::debug!(error = %e, "could not set TCP_NODELAY");
                    }
                    let service = TowerToHyperService::new(warp::service(routes.clone()));
                    let watcher = graceful.watcher();
                    tokio::spawn(async move {
                        let builder = auto::Builder::new(TokioExecutor::new());
                        let connection =
                            builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                        if let Err(e) = watcher.watch(connection.into_owned()).await {
                            tracing::debug!(error = %e, "http connection ended with an error");
                        }
                    });
                }
                Err(e) => {
                    // Out of file descriptors, most likely: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = &mut shutdown => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("some HTTP requests were still running when the grace period ended");
    }
}
