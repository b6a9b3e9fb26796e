//! Other taskcast nodes on the same database, so that a node alone can skip notifying its
//! own pushes (see [`crate::store::Quiet`]).
//!
//! Two signals, either of which keeps a node notifying:
//! - another session named `taskcast-listener` in `pg_stat_activity` (every taskcast
//!   version's listener connects under that name), checked every [`super::LIVENESS_EVERY`];
//! - a message from another node on the notify channel within [`SILENCE`]: each node sends
//!   `taskcast:node:<id>` when its listener connects and with every check, which also
//!   reaches nodes whose sessions a connection pooler renames.
//!
//! A node that hears another node while it was quiet notifies from then on, waits for its
//! quiet commits in flight, and sends `taskcast:loud:<id>`; the nodes that hear it read
//! their subscribed tasks again, so a push committed quietly after another node started
//! listening still reaches that node's subscribers. Neither message holds a space, so an
//! older node's parser skips them like any other foreign payload.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::{Instant, timeout};

use super::Listener;

/// The other nodes' listener sessions on this database, older versions included.
pub const OTHER_LISTENERS: &str = "SELECT count(*) FROM pg_stat_activity \
     WHERE datname = current_database() AND application_name = 'taskcast-listener' \
       AND pid <> pg_backend_pid()";

/// A node heard from more recently than this counts as present.
pub const SILENCE: Duration = Duration::from_secs(6);

/// How long one check that found the node alone lets it stay quiet: three checks, so a
/// slow check does not end a spell, and a listener that stopped checking ends it soon.
pub const QUIET_SPELL: Duration = Duration::from_secs(6);

const NODE: &str = "taskcast:node:";
const LOUD: &str = "taskcast:loud:";

/// A message between nodes on the notify channel.
#[derive(Debug, PartialEq, Eq)]
pub enum Control {
    /// A node's listener is connected (sent on connect and with every check).
    Node(u64),
    /// A node that was quiet notifies again, and its quiet commits are done.
    Loud(u64),
}

impl Control {
    /// `None` for anything else (the trigger's id lists, foreign payloads).
    pub fn parse(payload: &str) -> Option<Control> {
        let id = |rest: &str| u64::from_str_radix(rest, 16).ok();
        if let Some(rest) = payload.strip_prefix(NODE) {
            id(rest).map(Control::Node)
        } else if let Some(rest) = payload.strip_prefix(LOUD) {
            id(rest).map(Control::Loud)
        } else {
            None
        }
    }
}

/// This node's identity and what it heard of the others. Cloning is shallow.
#[derive(Clone)]
pub struct Peers {
    inner: Arc<Inner>,
}

struct Inner {
    id: u64,
    /// When another node was last heard from.
    heard: Mutex<Option<Instant>>,
    /// The node stopped being quiet without telling the others (its listener was
    /// disconnected): it says so once connected again.
    owes_loud: AtomicBool,
}

impl Default for Peers {
    fn default() -> Self {
        Peers {
            inner: Arc::new(Inner {
                id: uuid::Uuid::new_v4().as_u128() as u64,
                heard: Mutex::new(None),
                owes_loud: AtomicBool::new(false),
            }),
        }
    }
}

impl Peers {
    /// This node's `taskcast:node:<id>`.
    pub fn hello(&self) -> String {
        format!("{NODE}{:x}", self.inner.id)
    }

    /// This node's `taskcast:loud:<id>`.
    pub fn loud(&self) -> String {
        format!("{LOUD}{:x}", self.inner.id)
    }

    /// Whether a message came from another node (a node hears its own too).
    pub fn is_other(&self, id: u64) -> bool {
        id != self.inner.id
    }

    /// Another node was heard from now.
    pub fn heard(&self) {
        *self.inner.heard.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }

    /// Whether another node was heard from within [`SILENCE`] before `at`.
    pub fn heard_recently(&self, at: Instant) -> bool {
        let heard = *self.inner.heard.lock().unwrap_or_else(|p| p.into_inner());
        heard.is_some_and(|heard| heard + SILENCE > at)
    }

    pub fn owe_loud(&self) {
        self.inner.owes_loud.store(true, Ordering::SeqCst);
    }

    /// True once after [`Peers::owe_loud`].
    pub fn take_owed_loud(&self) -> bool {
        self.inner.owes_loud.swap(false, Ordering::SeqCst)
    }
}

impl Listener {
    /// Sends `message` on the channel (to every node, this one included).
    pub(super) async fn say(
        &self,
        client: &tokio_postgres::Client,
        message: String,
    ) -> Result<(), String> {
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&self.channel, &message];
        let notify = client.execute("SELECT pg_notify($1, $2)", &params);
        match timeout(self.connect_timeout, notify).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("NOTIFY timed out".to_string()),
        }
    }

    /// Proves the connection alive, tells the other nodes this one is here, and lets this
    /// node's pushes skip the NOTIFY for a while if no other node listens.
    pub(super) async fn check_peers(&self, client: &tokio_postgres::Client) -> Result<(), String> {
        let sent = tokio::time::Instant::now();
        let query = format!("SELECT pg_notify($1, $2), ({OTHER_LISTENERS})");
        let hello = self.peers.hello();
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&self.channel, &hello];
        let check = client.query_one(&query, &params);
        let others: i64 = match timeout(self.connect_timeout, check).await {
            Ok(Ok(row)) => row.try_get(1).map_err(|e| e.to_string())?,
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("liveness query timed out".to_string()),
        };
        if others == 0 && !self.peers.heard_recently(sent) {
            self.store.quiet().allow_for(sent, QUIET_SPELL);
            Ok(())
        } else {
            self.notify_again(client).await
        }
    }

    /// Another node listens: this node's pushes notify again. If they were quiet, once the
    /// quiet ones in flight are committed and published, the other nodes are told to read
    /// their subscribed tasks again (a quiet push may have come after they listened).
    pub(super) async fn notify_again(&self, client: &tokio_postgres::Client) -> Result<(), String> {
        if !self.store.quiet().stop() {
            return Ok(());
        }
        tracing::info!("another node listens: this node's pushes notify again");
        self.commits.settled(self.connect_timeout).await;
        if let Err(why) = self.say(client, self.peers.loud()).await {
            self.peers.owe_loud();
            return Err(why);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_messages_read_back_and_nothing_else_reads_as_one() {
        let peers = Peers::default();
        let Some(Control::Node(id)) = Control::parse(&peers.hello()) else {
            panic!("hello reads back");
        };
        assert!(!peers.is_other(id), "a node knows its own hello");
        let Some(Control::Loud(loud)) = Control::parse(&peers.loud()) else {
            panic!("loud reads back");
        };
        assert_eq!(loud, id);
        assert!(Peers::default().is_other(id), "another node's id differs");
        for foreign in [
            "00000000-0000-0000-0000-000000000001 3",
            "taskcast:node:",
            "taskcast:node:xyz",
            "taskcast:quiet:1",
            "",
        ] {
            assert_eq!(Control::parse(foreign), None, "{foreign:?}");
        }
        // Older nodes split entries at ',' and ' ': a control message has neither.
        assert!(!peers.hello().contains([' ', ',']));
        assert!(!peers.loud().contains([' ', ',']));
    }

    #[tokio::test(start_paused = true)]
    async fn a_node_heard_counts_for_the_silence_and_no_longer() {
        let peers = Peers::default();
        assert!(!peers.heard_recently(Instant::now()), "nobody heard yet");
        peers.heard();
        assert!(peers.heard_recently(Instant::now()));
        tokio::time::advance(SILENCE - Duration::from_millis(10)).await;
        assert!(peers.heard_recently(Instant::now()));
        tokio::time::advance(Duration::from_millis(20)).await;
        assert!(!peers.heard_recently(Instant::now()));
    }

    #[test]
    fn a_loud_owed_is_taken_once() {
        let peers = Peers::default();
        assert!(!peers.take_owed_loud());
        peers.owe_loud();
        assert!(peers.take_owed_loud());
        assert!(!peers.take_owed_loud());
    }
}
