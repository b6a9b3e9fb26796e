//! The listener: one dedicated Postgres connection per node that follows the notify
//! channel, so changes committed by other nodes (or by plain SQL) reach local subscribers.
//!
//! Pooled connections drop notifications, so this connection is its own, driven by
//! `Connection::poll_message`. A notification carries ids and versions; the listener reads
//! only the rows its hub has subscribers for and whose version is news. Notifications sent
//! while the connection is down are lost, so after every (re)connect it re-reads every
//! subscribed task; the hub's version rule makes the overlap harmless.
//!
//! It also finds out whether another node listens (see [`peers`]): while none does, this
//! node's pushes skip the NOTIFY ([`crate::store::Quiet`]).

use std::collections::{HashMap, HashSet};
use std::future::poll_fn;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{MissedTickBehavior, interval, sleep, timeout};
use tokio_postgres::AsyncMessage;

use crate::auth::Secret;
use crate::domain::{TaskId, TaskState, Unreadable};
use crate::error::Error;
use crate::hub::Hub;
use crate::shutdown::Shutdown;
use crate::store::PgStore;
use crate::store::connect::PgTarget;
use crate::writer::LocalCommits;

mod peers;
use peers::Control;
pub use peers::Peers;

const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Capped low: one connect attempt a second is cheap, and recovery after an outage is
/// then at most about a second late.
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// How often the connection proves it is alive with a query (the check for other nodes,
/// see [`peers`]), answered within the connect timeout: a link that went silent (a
/// partition sends no RST, and an idle LISTEN connection sends nothing) is noticed within
/// this plus that timeout, then the listener reconnects and resyncs.
const LIVENESS_EVERY: Duration = Duration::from_secs(2);
/// Finished tasks re-read per feed when catching up: the latest ones, where a change
/// missed while disconnected most likely is.
const FEED_RESYNC_FINISHED: usize = 20;
/// Rows read per query when catching up.
const RESYNC_CHUNK: usize = 1000;

/// Everything the listener needs. Cloning is shallow.
#[derive(Clone)]
pub struct Listener {
    pub database_url: Secret,
    pub channel: String,
    pub store: PgStore,
    pub hub: Hub,
    /// The writer's commits in flight, waited for before reading rows back.
    pub commits: LocalCommits,
    pub connect_timeout: Duration,
    /// Unreadable rows already logged, so a row is warned about once, not per change.
    pub reported: Reported,
    /// This node's id and what it heard of other nodes.
    pub peers: Peers,
}

/// Which (task, column) problems were logged; bounded, forgotten wholesale when full.
#[derive(Clone, Default)]
pub struct Reported(Arc<Mutex<HashSet<(TaskId, &'static str)>>>);

/// Most problems remembered before the set starts over (and logs each once more).
const MAX_REPORTED: usize = 1024;

impl Reported {
    /// std Mutex, not tokio: nothing awaits while it is held.
    fn first_time(&self, task: TaskId, column: &'static str) -> bool {
        let mut seen = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if seen.len() >= MAX_REPORTED {
            seen.clear();
        }
        seen.insert((task, column))
    }
}

/// How one connection ended.
enum End {
    Shutdown,
    /// Lost after having listened (so the backoff starts over), or never established.
    Lost {
        listened: bool,
        why: String,
    },
}

impl Listener {
    /// Runs until `shutdown` is triggered, reconnecting with capped exponential backoff.
    pub fn spawn(self, shutdown: Shutdown) -> JoinHandle<()> {
        tokio::spawn(self.run(shutdown))
    }

    async fn run(self, shutdown: Shutdown) {
        let mut backoff = MIN_BACKOFF;
        let mut connections: u64 = 0;
        loop {
            let end = self.session(&shutdown, connections).await;
            // Deaf to other nodes until connected again: notify meanwhile, and tell them
            // once back (a node that started meanwhile missed the quiet pushes).
            if self.store.quiet().stop() {
                self.peers.owe_loud();
            }
            match end {
                End::Shutdown => return,
                End::Lost { listened, why } => {
                    if listened {
                        connections += 1;
                        metrics::counter!(crate::telemetry::LISTENER_RECONNECTS).increment(1);
                        backoff = MIN_BACKOFF;
                    }
                    tracing::warn!(error = %why, retry_in_ms = backoff.as_millis() as u64, "listener lost its connection");
                }
            }
            tokio::select! {
                _ = shutdown.wait() => return,
                _ = sleep(jitter(backoff)) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    async fn session(&self, shutdown: &Shutdown, connections: u64) -> End {
        let lost = |listened: bool| move |why: String| End::Lost { listened, why };
        let target = match PgTarget::parse(self.database_url.expose()) {
            Ok(target) => target,
            Err(e) => return lost(false)(e.to_string()),
        };
        let mut config = target.config;
        config
            .application_name("taskcast-listener")
            .connect_timeout(self.connect_timeout)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(5))
            .keepalives_interval(Duration::from_secs(1))
            .keepalives_retries(3)
            // The kernel closes the socket once sent data waits this long for an ACK.
            .tcp_user_timeout(self.connect_timeout);
        let connect = timeout(self.connect_timeout, config.connect(target.tls)).await;
        let (client, mut connection) = match connect {
            Ok(Ok(pair)) => pair,
            Ok(Err(e)) => return lost(false)(e.to_string()),
            Err(_) => return lost(false)("connect timed out".to_string()),
        };
        // Drives the connection: forwards notifications, ends when the connection does.
        let (tx, mut notifications) = mpsc::channel::<String>(1024);
        let driver = tokio::spawn(async move {
            while let Some(message) = poll_fn(|cx| connection.poll_message(cx)).await {
                match message {
                    Ok(AsyncMessage::Notification(n)) => {
                        if tx.send(n.payload().to_string()).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, "listener connection failed");
                        return;
                    }
                }
            }
        });
        let _abort = AbortOnDrop(driver);

        let listen = format!("LISTEN {}", self.channel);
        match timeout(self.connect_timeout, client.batch_execute(&listen)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return lost(false)(e.to_string()),
            Err(_) => return lost(false)("LISTEN timed out".to_string()),
        }
        tracing::info!(channel = %self.channel, reconnects = connections, "listening for changes");
        // Other nodes stop skipping the NOTIFY for their pushes once they hear this.
        if let Err(why) = self.say(&client, self.peers.hello()).await {
            return lost(true)(why);
        }
        if self.peers.take_owed_loud() {
            // Its quiet commits may still be in flight (each has up to the timeout).
            self.commits.settled(self.connect_timeout).await;
            if let Err(why) = self.say(&client, self.peers.loud()).await {
                self.peers.owe_loud();
                return lost(true)(why);
            }
        }
        // After LISTEN, so a change is either in what we read or in a later notification.
        if let Err(e) = self.resync().await {
            return lost(true)(e.chain());
        }
        let mut liveness = interval(LIVENESS_EVERY);
        liveness.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.wait() => {
                    // A node that heard another one while shutting down still tells it.
                    let _ = self.notify_again(&client).await;
                    return End::Shutdown;
                }
                payload = notifications.recv() => match payload {
                    Some(payload) => {
                        let done = match Control::parse(&payload) {
                            Some(Control::Node(id)) if self.peers.is_other(id) => {
                                self.peers.heard();
                                self.notify_again(&client).await
                            }
                            // Its quiet pushes are committed: read what they may have changed.
                            Some(Control::Loud(id)) if self.peers.is_other(id) => {
                                self.resync().await.map_err(|e| e.chain())
                            }
                            Some(_) => Ok(()),
                            None => self.apply(&payload).await.map_err(|e| e.chain()),
                        };
                        if let Err(why) = done {
                            return lost(true)(why);
                        }
                    }
                    None => return lost(true)("the connection closed".to_string()),
                },
                _ = self.store.quiet().rechecks_waiting() => {
                    if let Err(e) = self.recheck().await {
                        return lost(true)(e.chain());
                    }
                }
                _ = liveness.tick() => {
                    if let Err(why) = self.check_peers(&client).await {
                        return lost(true)(why);
                    }
                }
            }
        }
    }

    /// Reads again the tasks whose quiet pushes did not end cleanly (see
    /// [`crate::store::Quiet::recheck`]), as a notification of them would have.
    async fn recheck(&self) -> Result<(), Error> {
        let rechecks = self.store.quiet().take_rechecks();
        if rechecks.all {
            return self.resync().await;
        }
        let wanted: Vec<TaskId> = (rechecks.tasks.into_iter())
            .filter(|&task| self.hub.wants(task, i64::MAX))
            .collect();
        for chunk in wanted.chunks(RESYNC_CHUNK) {
            metrics::counter!(crate::telemetry::LISTENER_ROWS_READ).increment(chunk.len() as u64);
            let seen = self.held_versions(chunk);
            let rows = self.store.get_many(chunk).await?;
            self.publish(rows, &seen);
        }
        Ok(())
    }

    /// Reads the rows a notification names that local subscribers have not seen yet.
    async fn apply(&self, payload: &str) -> Result<(), Error> {
        // Any insert, delete or change may move places in line (see crate::queue).
        self.hub.queue_changed();
        let wanted: Vec<(TaskId, i64)> = parse_payload(payload)
            .filter(|&(task, version)| self.hub.wants(task, version))
            .collect();
        if wanted.is_empty() {
            return Ok(());
        }
        // This node's own commits are published by its writer; when the notification got
        // here first, wait for that rather than read the rows back.
        self.commits.settled(self.connect_timeout).await;
        let wanted: Vec<TaskId> = wanted
            .into_iter()
            .filter(|&(task, version)| self.hub.wants(task, version))
            .map(|(task, _)| task)
            .collect();
        if wanted.is_empty() {
            return Ok(());
        }
        metrics::counter!(crate::telemetry::LISTENER_ROWS_READ).increment(wanted.len() as u64);
        let seen = self.held_versions(&wanted);
        let rows = self.store.get_many(&wanted).await?;
        self.publish(rows, &seen);
        Ok(())
    }

    /// What the hub holds for each task before a read (see [`Hub::publish_notice`]).
    fn held_versions(&self, tasks: &[TaskId]) -> HashMap<TaskId, i64> {
        tasks
            .iter()
            .map(|&task| (task, self.hub.held_version(task)))
            .collect()
    }

    /// Publishes what was read; a row that cannot be read is reported for its own task
    /// (a warn line once, a counter, an error to its subscribers) and stops nothing else.
    fn publish(&self, rows: Vec<Result<TaskState, Unreadable>>, seen: &HashMap<TaskId, i64>) {
        for row in rows {
            match row {
                Ok(state) => self.hub.publish(&state),
                Err(unreadable) => self.report(unreadable, seen),
            }
        }
    }

    fn report(&self, unreadable: Unreadable, seen: &HashMap<TaskId, i64>) {
        metrics::counter!(crate::telemetry::UNREADABLE_ROWS).increment(1);
        let Some(task) = unreadable.task else {
            return;
        };
        if self.reported.first_time(task, unreadable.column) {
            tracing::warn!(
                task = %task,
                column = unreadable.column,
                held = unreadable.held,
                "a row of image_tasks cannot be read; its subscribers get an error, other tasks are unaffected"
            );
        }
        let error = Error::UnreadableRow {
            task: task.to_string(),
            column: unreadable.column,
            held: unreadable.held,
        };
        let seen = seen.get(&task).copied().unwrap_or(i64::MIN);
        self.hub
            .publish_notice(task, error.to_ws_json(Some(task.as_str())), seen);
    }

    /// Re-reads every task that has local subscribers.
    async fn resync(&self) -> Result<(), Error> {
        let tasks = self.hub.tasks();
        for chunk in tasks.chunks(RESYNC_CHUNK) {
            let seen = self.held_versions(chunk);
            let rows = self.store.get_many(chunk).await?;
            self.publish(rows, &seen);
        }
        if !tasks.is_empty() {
            tracing::info!(
                tasks = tasks.len(),
                "resynced subscribed tasks (after connecting, or another node's quiet pushes)"
            );
        }
        // Feeds: what a fresh subscriber's snapshot would hold (bounded), so a change
        // missed while disconnected still arrives; the hub drops what a feed already has.
        for user in self.hub.feed_users() {
            let rows = self
                .store
                .user_tasks(
                    user,
                    crate::subscribers::FEED_MAX_UNFINISHED,
                    FEED_RESYNC_FINISHED,
                )
                .await?;
            for state in rows.into_iter().flatten() {
                self.hub.publish(&state);
            }
        }
        Ok(())
    }
}

/// `"<uuid> <version>,<uuid> <version>"` as written by the `taskcast_notify` trigger;
/// malformed entries are skipped (a foreign writer on the same channel cannot break us).
pub fn parse_payload(payload: &str) -> impl Iterator<Item = (TaskId, i64)> + '_ {
    payload.split(',').filter_map(|entry| {
        let (id, version) = entry.trim().split_once(' ')?;
        Some((TaskId::from_stored(id)?, version.parse().ok()?))
    })
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Up to 25% random extra, so nodes that lost the database together do not reconnect in
/// lockstep.
fn jitter(base: Duration) -> Duration {
    let spread = base.as_millis() as u64 / 4;
    let random = uuid::Uuid::new_v4().as_u128() as u64;
    base + Duration::from_millis(if spread == 0 { 0 } else { random % spread })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_entries_parse_and_garbage_is_skipped() {
        let a = TaskId::random();
        let b = TaskId::random();
        let payload = format!("{a} 3,garbage,{b} 7,{a} x,42 9,{} 1", "x".repeat(64));
        let parsed: Vec<_> = parse_payload(&payload).collect();
        let int = TaskId::from_stored("42").unwrap();
        assert_eq!(parsed, vec![(a, 3), (b, 7), (int, 9)]);
    }

    #[test]
    fn jitter_stays_within_a_quarter() {
        for _ in 0..100 {
            let d = jitter(Duration::from_millis(400));
            assert!(d >= Duration::from_millis(400) && d < Duration::from_millis(500));
        }
    }
}
