//! Whether this node's pushes may skip the NOTIFY: while no other node listens on the
//! database, nobody needs them. The node publishes its own commits to its own subscribers
//! (the writer), so a notification of its own push only made Postgres wake the node's
//! listener, which then read it and dropped it: about 100–150 µs of Postgres CPU per
//! commit on the bench machine, a third of a 26-row commit.
//!
//! The listener decides (see [`crate::listener`]); the push statements carry the answer
//! (`set_config('taskcast.quiet', 'on', true)`), and the `taskcast_notify` trigger skips a
//! statement that set it. A quiet spell lasts [`Quiet::allow_for`] after the check that
//! found the node alone, so a listener that stops checking (a stuck connection) cannot
//! keep the node quiet. A quiet push whose outcome is not clean (an error, possibly after
//! the commit) is handed back to the listener to read again, as its notification would
//! have been.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::domain::TaskId;

/// `TASKCAST_NOTIFY_OWN_PUSHES`: when this node's pushes send the NOTIFY.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum NotifyOwnPushes {
    /// Only while another taskcast node listens on the database (the default).
    #[default]
    Auto,
    /// Always (for a non-taskcast program that LISTENs on the channel).
    Always,
}

/// Tasks held for a re-read before the listener is told to re-read everything instead.
const MAX_RECHECKS: usize = 10_000;

/// Shared between the store (reads it per statement) and the listener (sets it).
/// Cloning is shallow.
#[derive(Clone)]
pub struct Quiet {
    inner: Arc<Inner>,
}

struct Inner {
    /// `TASKCAST_NOTIFY_OWN_PUSHES=auto`; with `always` the node never goes quiet.
    enabled: bool,
    epoch: Instant,
    /// Quiet until this many ms after `epoch`; 0 when not quiet.
    until_ms: AtomicU64,
    rechecks: Mutex<Rechecks>,
    wake: Notify,
}

/// What the listener should read again: some tasks, or every subscribed one.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Rechecks {
    pub tasks: Vec<TaskId>,
    pub all: bool,
}

impl Quiet {
    /// `enabled` false: the node always notifies (`TASKCAST_NOTIFY_OWN_PUSHES=always`).
    pub fn new(enabled: bool) -> Self {
        Quiet {
            inner: Arc::new(Inner {
                enabled,
                epoch: Instant::now(),
                until_ms: AtomicU64::new(0),
                rechecks: Mutex::default(),
                wake: Notify::new(),
            }),
        }
    }

    pub fn enabled(&self) -> bool {
        self.inner.enabled
    }

    fn now_ms(&self) -> u64 {
        // +1: 0 means "not quiet", and a check in the first millisecond must not read so.
        self.inner.epoch.elapsed().as_millis() as u64 + 1
    }

    /// Whether a push statement started now may skip the NOTIFY. Read it after the
    /// commit is counted in flight ([`crate::writer::LocalCommits::start`]), so that
    /// [`Quiet::stop`] followed by a wait for those commits covers every quiet one.
    pub fn is_on(&self) -> bool {
        self.inner.enabled && self.now_ms() < self.inner.until_ms.load(Ordering::SeqCst)
    }

    /// The node was found alone when the check was sent at `checked`: quiet for `spell`
    /// from then (renewed by every later check that finds it alone).
    pub fn allow_for(&self, checked: Instant, spell: Duration) {
        if !self.inner.enabled {
            return;
        }
        let until = checked
            .saturating_duration_since(self.inner.epoch)
            .saturating_add(spell)
            .as_millis() as u64
            + 1;
        self.inner.until_ms.store(until, Ordering::SeqCst);
        metrics::gauge!(crate::telemetry::NOTIFY_QUIET).set(1.0);
    }

    /// Another node may be listening: notify from now on. True if the node went quiet
    /// since the last stop (its spell may have run out meanwhile: its quiet pushes are
    /// still unknown to the other node).
    pub fn stop(&self) -> bool {
        let was_quiet = self.inner.until_ms.swap(0, Ordering::SeqCst) != 0;
        if was_quiet {
            metrics::gauge!(crate::telemetry::NOTIFY_QUIET).set(0.0);
        }
        was_quiet
    }

    /// Pushes to `tasks` went out quiet and did not end cleanly: they may have committed
    /// without anyone being told. The listener reads them again.
    pub fn recheck(&self, tasks: impl IntoIterator<Item = TaskId>) {
        let mut rechecks = self
            .inner
            .rechecks
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if !rechecks.all {
            rechecks.tasks.extend(tasks);
            if rechecks.tasks.len() > MAX_RECHECKS {
                *rechecks = Rechecks {
                    tasks: Vec::new(),
                    all: true,
                };
            }
        }
        drop(rechecks);
        self.inner.wake.notify_one();
    }

    /// Resolves once [`Quiet::recheck`] was called (a stored permit: a call before this
    /// is not missed).
    pub async fn rechecks_waiting(&self) {
        self.inner.wake.notified().await
    }

    /// Takes what is to be read again, each task once.
    pub fn take_rechecks(&self) -> Rechecks {
        let mut taken = std::mem::take(
            &mut *self
                .inner
                .rechecks
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        let mut seen = HashSet::with_capacity(taken.tasks.len());
        taken.tasks.retain(|task| seen.insert(*task));
        taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(n: u32) -> TaskId {
        TaskId::from_stored(&format!("00000000-0000-0000-0000-{n:012}")).expect("a uuid")
    }

    #[tokio::test(start_paused = true)]
    async fn quiet_lasts_its_spell_from_the_check_and_no_longer() {
        let quiet = Quiet::new(true);
        assert!(!quiet.is_on(), "a node starts notifying");
        let checked = Instant::now();
        quiet.allow_for(checked, Duration::from_secs(6));
        assert!(quiet.is_on());
        tokio::time::advance(Duration::from_millis(5_990)).await;
        assert!(quiet.is_on());
        tokio::time::advance(Duration::from_millis(20)).await;
        assert!(!quiet.is_on(), "a spell not renewed by a later check ends");
    }

    #[tokio::test(start_paused = true)]
    async fn stop_ends_the_spell_and_says_whether_there_was_one() {
        let quiet = Quiet::new(true);
        assert!(!quiet.stop(), "not quiet yet");
        quiet.allow_for(Instant::now(), Duration::from_secs(6));
        assert!(quiet.stop());
        assert!(!quiet.is_on());
        assert!(!quiet.stop(), "already stopped");
    }

    #[tokio::test(start_paused = true)]
    async fn always_never_goes_quiet() {
        let quiet = Quiet::new(false);
        quiet.allow_for(Instant::now(), Duration::from_secs(6));
        assert!(!quiet.is_on());
    }

    #[tokio::test]
    async fn rechecks_are_taken_once_each_and_wake_the_listener() {
        let quiet = Quiet::new(true);
        quiet.recheck([task(1), task(2), task(1)]);
        // The permit was stored: this resolves at once.
        tokio::time::timeout(Duration::from_secs(5), quiet.rechecks_waiting())
            .await
            .expect("woken");
        assert_eq!(
            quiet.take_rechecks(),
            Rechecks {
                tasks: vec![task(1), task(2)],
                all: false
            }
        );
        assert_eq!(quiet.take_rechecks(), Rechecks::default());
    }

    #[test]
    fn too_many_rechecks_become_one_of_everything() {
        let quiet = Quiet::new(true);
        quiet.recheck((0..=MAX_RECHECKS as u32).map(task));
        let taken = quiet.take_rechecks();
        assert!(taken.all);
        assert!(taken.tasks.is_empty());
    }
}
