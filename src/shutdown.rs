//! [`Shutdown`]: one signal that the server is stopping, and a count of who must finish
//! first (as mini-redis does with a broadcast and a drop-guard channel).
//!
//! The trigger sets a flag, then wakes every waiter; a waiter registers before it checks
//! the flag. That order lives here, so no caller has to know it.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::sync::Notify;

/// Cloning is shallow: every clone sees the same trigger and the same count.
#[derive(Clone, Default)]
pub struct Shutdown {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    triggered: AtomicBool,
    /// Wakes every [`Shutdown::wait`] once `triggered` is set.
    stopping: Notify,
    /// Live [`DoneGuard`]s, and a wake-up when the count falls to zero.
    running: AtomicUsize,
    finished: Notify,
}

/// Says one task is still running; dropping it says the task is done.
#[must_use = "the task counts as running only while the guard lives"]
pub struct DoneGuard {
    inner: Arc<Inner>,
}

impl Shutdown {
    pub fn new() -> Self {
        Shutdown::default()
    }

    /// Starts the shutdown: every [`Shutdown::wait`], past and future, completes.
    pub fn trigger(&self) {
        self.inner.triggered.store(true, Ordering::SeqCst);
        self.inner.stopping.notify_waiters();
    }

    pub fn is_triggered(&self) -> bool {
        self.inner.triggered.load(Ordering::SeqCst)
    }

    /// Completes once the shutdown is triggered. The future is one `Notified`, small
    /// enough to hold for a connection's whole life.
    pub fn wait(&self) -> impl Future<Output = ()> + Send + '_ {
        wait_for(&self.inner.stopping, || self.is_triggered())
    }

    /// Counts one more task that [`Shutdown::done`] waits for, until the guard is dropped.
    pub fn guard(&self) -> DoneGuard {
        self.inner.running.fetch_add(1, Ordering::SeqCst);
        DoneGuard {
            inner: self.inner.clone(),
        }
    }

    /// Completes once no [`DoneGuard`] is alive.
    pub async fn done(&self) {
        wait_for(&self.inner.finished, || {
            self.inner.running.load(Ordering::SeqCst) == 0
        })
        .await
    }
}

impl Drop for DoneGuard {
    fn drop(&mut self) {
        if self.inner.running.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.inner.finished.notify_waiters();
        }
    }
}

/// Waits on `notify` until `ready()`: registered before the check, so a `notify_waiters`
/// after the check still wakes it.
async fn wait_for(notify: &Notify, ready: impl Fn() -> bool) {
    loop {
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if ready() {
            return;
        }
        notified.await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_wait_started_before_or_after_the_trigger_completes() {
        let shutdown = Shutdown::new();
        let before = tokio::spawn({
            let shutdown = shutdown.clone();
            async move { shutdown.wait().await }
        });
        tokio::task::yield_now().await;
        assert!(!shutdown.is_triggered());
        shutdown.trigger();
        tokio::time::timeout(Duration::from_secs(5), before)
            .await
            .expect("the earlier wait completes")
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), shutdown.wait())
            .await
            .expect("a later wait completes at once");
    }

    #[tokio::test(start_paused = true)]
    async fn done_waits_for_every_guard_to_drop() {
        let shutdown = Shutdown::new();
        shutdown.done().await; // nobody running: at once
        let first = shutdown.guard();
        let second = shutdown.guard();
        drop(first);
        let waiting = tokio::time::timeout(Duration::from_secs(1), shutdown.done()).await;
        assert!(waiting.is_err(), "one guard is still alive");
        drop(second);
        tokio::time::timeout(Duration::from_secs(1), shutdown.done())
            .await
            .expect("done once the last guard drops");
    }
}
