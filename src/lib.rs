//! taskcast: real-time task progress for an image-generation app.
//!
//! A generator pushes progress over authenticated HTTP; taskcast commits it to Postgres
//! and fans it out to browsers subscribed over WebSocket, so no browser polls.
//!
//! ```text
//! generator --POST /api/tasks/{id}/progress--> routes --> domain (parse once)
//!                                                |
//!                                                v
//!                                  writer: group commit, one UPDATE per batch --> store
//!                                                |  committed
//!                      +-------------------------+------------------------+
//!                      v                                                  v
//!            answer each pusher (2xx)                  hub.publish(state) if version is newer
//!                                                                         |
//! browser <--WS text frame (encoded once)-- ws connection <-- per-task watch channel
//! ```

pub mod auth;
pub mod cancel;
pub mod cli;
pub mod config;
pub mod demo;
pub mod doctor;
pub mod domain;
pub mod error;
pub mod eta;
pub mod hub;
pub mod listener;
pub mod origin;
pub mod query;
pub mod queue;
pub mod routes;
pub mod server;
pub mod shutdown;
pub mod sse;
pub mod stall;
pub mod store;
pub mod subscribers;
pub mod telemetry;
pub mod writer;
pub mod ws;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::error::Error;
use crate::hub::Hub;
use crate::listener::Listener;
use crate::origin::OriginPolicy;
use crate::routes::{AppState, BodyLimits};
use crate::shutdown::Shutdown;
use crate::store::{MemoryStore, PgStore, PoolOptions, Store};
use crate::subscribers::{SubscriberLimits, Subscribers};
use crate::writer::{Writer, WriterOptions};

/// A bound, not yet serving, server: the one seam shared by the binary and the tests.
pub struct App {
    listener: TcpListener,
    local_addr: SocketAddr,
    state: AppState,
    writer_task: JoinHandle<()>,
    notify_listener: Option<Listener>,
    shutdown: Shutdown,
    http: server::HttpOptions,
    shutdown_timeout: Duration,
    demo: bool,
    stall: stall::StallOptions,
    queue: queue::QueueOptions,
    /// The cancel grace sweep's options, when TASKCAST_CANCEL_GRACE_SECS is set.
    cancel_grace: Option<cancel::GraceOptions>,
}

impl App {
    /// Opens the store, starts the writer and binds the listener (port 0 is allowed).
    pub async fn build(config: Config) -> Result<App, Error> {
        telemetry::metrics();
        let limits = config.limits.clone();
        let store = match &config.database_url {
            Some(url) => {
                let pool = PoolOptions {
                    size: limits.db_pool_size,
                    timeout: limits.db_timeout,
                    quiet_when_alone: config.notify_own_pushes
                        == crate::store::NotifyOwnPushes::Auto,
                };
                let pg = Store::Postgres(PgStore::connect(url, pool, config.status_map.clone())?);
                match pg.check_ready().await {
                    Ok(()) => {
                        tracing::info!("store: postgres, table can be served");
                        for hazard in pg.hazards().await {
                            tracing::warn!(
                                fix = hazard.fix.as_deref().unwrap_or_default(),
                                "DATABASE EXPOSED: {}",
                                hazard.message
                            );
                        }
                    }
                    Err(e) => tracing::warn!(
                        error = %e.chain(),
                        "store: postgres, not ready yet; pushes will fail until this is fixed"
                    ),
                }
                pg
            }
            None => {
                tracing::info!(
                    "DATABASE_URL is not set: using the in-memory store (nothing survives a restart)"
                );
                Store::Memory(MemoryStore::new())
            }
        };
        let hub = Hub::new();
        let shutdown = Shutdown::new();
        if let Some(jwks) = config.subscribe.jwks() {
            // Ends with the shutdown; a fetch in flight then is dropped.
            jwks.spawn_refresher(shutdown.clone());
        }
        let (writer, writer_task) = Writer::spawn(
            store.clone(),
            hub.clone(),
            WriterOptions {
                mode: config.write_mode,
                max_batch: limits.max_batch,
                queue: limits.writer_queue,
                commit_interval: limits.commit_interval,
            },
            shutdown.clone(),
        );
        let notify_listener = match (&store, &config.database_url) {
            (Store::Postgres(pg), Some(url)) => Some(Listener {
                database_url: url.clone(),
                channel: config.notify_channel.clone(),
                store: pg.clone(),
                hub: hub.clone(),
                commits: writer.commits(),
                connect_timeout: limits.db_timeout.max(Duration::from_secs(1)),
                reported: Default::default(),
                peers: Default::default(),
            }),
            _ => None,
        };
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| Error::unavailable("the listen address (TASKCAST_LISTEN)", e))?;
        let local_addr = listener
            .local_addr()
            .map_err(|e| Error::internal("reading the bound address", e))?;
        let state = AppState {
            writer,
            push_key: config.push_key.clone(),
            token_ttl: config.token_ttl,
            origins: OriginPolicy::new(
                config.allowed_origins.clone(),
                config.allow_loopback_origins,
            ),
            bodies: BodyLimits {
                max_body_bytes: limits.max_body_bytes,
                body_timeout: limits.body_timeout,
                max_batch_body_bytes: limits.max_batch_body_bytes,
                max_batch_items: limits.max_batch_items,
                keep_alive_timeout: limits.keep_alive_timeout,
            },
            metrics_token: config.metrics_token.clone(),
            streams: Arc::new(Semaphore::new(AppState::max_streams(
                limits.max_http_connections,
            ))),
            subscribers: Arc::new(Subscribers {
                hub: hub.clone(),
                store,
                auth: config.subscribe.clone(),
                connections: Arc::new(Semaphore::new(limits.max_connections)),
                limits: SubscriberLimits {
                    max_connections: limits.max_connections,
                    max_subscriptions: limits.max_subscriptions,
                    max_subscribes_per_sec: limits.max_subscribes_per_sec,
                    max_ws_message_bytes: limits.max_ws_message_bytes,
                    idle_timeout: limits.idle_timeout,
                    ping_interval: limits.ping_interval,
                    pong_timeout: limits.pong_timeout,
                    feed_recent: limits.feed_recent,
                },
                shutdown: shutdown.clone(),
            }),
        };
        Ok(App {
            listener,
            local_addr,
            state,
            writer_task,
            notify_listener,
            shutdown,
            http: server::HttpOptions {
                max_connections: limits.max_http_connections,
                header_timeout: limits.header_timeout,
                keep_alive_timeout: limits.keep_alive_timeout,
                max_header_bytes: limits.max_header_bytes,
            },
            shutdown_timeout: config.shutdown_timeout,
            demo: config.demo,
            stall: config.stall,
            queue: config.queue,
            cancel_grace: config
                .cancel_grace
                .map(|grace| cancel::GraceOptions { grace }),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The hub, for observing subscriptions (tests, metrics).
    pub fn hub(&self) -> Hub {
        self.state.subscribers.hub.clone()
    }

    /// Whether this node's pushes skip the NOTIFY now (Postgres only), for observing it.
    pub fn quiet(&self) -> Option<store::Quiet> {
        (self.notify_listener.as_ref()).map(|listener| listener.store.quiet().clone())
    }

    /// Serves until `shutdown` completes, then stops accepting, answers every push already
    /// accepted, sends each WebSocket a Close (1001), and returns.
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send + 'static) {
        let App {
            listener,
            local_addr,
            state,
            writer_task,
            notify_listener,
            shutdown: stop,
            http,
            shutdown_timeout,
            demo,
            stall,
            queue,
            cancel_grace,
            ..
        } = self;
        let listener_task = notify_listener.map(|l| l.spawn(stop.clone()));
        let (hub, store) = (
            state.subscribers.hub.clone(),
            state.subscribers.store.clone(),
        );
        let sweep_task = cancel_grace
            .map(|options| cancel::spawn(options, store.clone(), hub.clone(), stop.clone()));
        let derived_tasks = [
            queue::Queue {
                hub: hub.clone(),
                store: store.clone(),
                options: queue,
            }
            .spawn(stop.clone()),
            stall::Stall {
                hub,
                store,
                options: stall,
            }
            .spawn(stop.clone()),
        ];
        tracing::info!(%local_addr, store = state.subscribers.store.kind(), "taskcast listening");
        if demo {
            tracing::info!("demo: {}", demo_url(local_addr));
        }
        let demo = demo::routes(demo::Demo {
            enabled: demo,
            store: state.subscribers.store.clone(),
            writer: state.writer.clone(),
            hub: state.subscribers.hub.clone(),
            subscribe: state.subscribers.auth.clone(),
            token_ttl: state.token_ttl,
            shutdown: state.subscribers.shutdown.clone(),
        });
        let shortcut: Arc<dyn server::Shortcut> = routes::GeneratorWrites::new(state.clone());
        let routes = routes::routes(state, demo);
        let signal_stop = stop.clone();
        let signal = async move {
            shutdown.await;
            tracing::info!("shutting down");
            signal_stop.trigger();
        };
        server::serve(
            listener,
            routes,
            Some(shortcut),
            http,
            signal,
            shutdown_timeout,
        )
        .await;
        // HTTP requests are done; the routes (and their writer handles) are dropped, so
        // the writer drains its queue and ends. WebSockets and SSE streams got the signal
        // through `stop`, and each holds a guard of it until it has closed.
        if tokio::time::timeout(shutdown_timeout, stop.done())
            .await
            .is_err()
        {
            tracing::warn!("some WebSocket connections did not close in time");
        }
        if let Some(task) = listener_task {
            let _ = task.await;
        }
        for task in derived_tasks {
            // Each database call in them is bounded by TASKCAST_DB_TIMEOUT_MS.
            let _ = tokio::time::timeout(shutdown_timeout, task).await;
        }
        if let Some(task) = sweep_task {
            // A sweep in flight is bounded by TASKCAST_DB_TIMEOUT_MS.
            let _ = tokio::time::timeout(shutdown_timeout, task).await;
        }
        match tokio::time::timeout(shutdown_timeout, writer_task).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "the writer task failed"),
            Err(_) => {
                tracing::warn!("the writer did not drain in time; queued pushes were not answered")
            }
        }
        tracing::info!("stopped");
    }
}

/// The demo page's address as a browser opens it: an unspecified listen address
/// (`0.0.0.0`, `[::]`) is shown as loopback.
fn demo_url(addr: SocketAddr) -> String {
    let ip = match addr.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => std::net::Ipv4Addr::LOCALHOST.into(),
        ip if ip.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    format!("http://{}/", SocketAddr::new(ip, addr.port()))
}

#[cfg(test)]
mod tests {
    use super::demo_url;

    #[test]
    fn the_demo_url_is_one_a_browser_can_open() {
        assert_eq!(
            demo_url("0.0.0.0:8080".parse().unwrap()),
            "http://127.0.0.1:8080/"
        );
        assert_eq!(demo_url("[::]:80".parse().unwrap()), "http://[::1]:80/");
        assert_eq!(
            demo_url("10.0.0.5:8080".parse().unwrap()),
            "http://10.0.0.5:8080/"
        );
    }
}
