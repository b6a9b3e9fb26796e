//! This node's commits in flight: started and not yet published. The NOTIFY listener waits
//! for them ([`LocalCommits::settled`]) before it reads or tells other nodes anything.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

/// This node's commits in flight, for the NOTIFY listener: a notification of this node's
/// own commit can overtake the writer's publish, and waiting for that publish spares the
/// listener a query per push. Cloning is shallow.
#[derive(Clone, Default)]
pub struct LocalCommits {
    /// In a watch, so that `settled` can wait for a change; its lock is the only one
    /// taken, once when a commit starts and once when it ends.
    inner: Arc<watch::Sender<InFlight>>,
}

/// Commits are numbered as they start; they may end in any order (naive mode commits
/// concurrently), so `settled` waits for numbers, not for a count.
#[derive(Default)]
struct InFlight {
    /// The number the next commit takes.
    next: u64,
    /// The numbers of the commits started and not yet ended.
    running: BTreeSet<u64>,
}

/// Marks a local commit as in flight until dropped; drop it after publishing what the
/// commit applied. See [`LocalCommits::settled`].
pub struct CommitInFlight {
    commits: LocalCommits,
    number: u64,
}

impl Drop for CommitInFlight {
    fn drop(&mut self) {
        // Only the end of the lowest commit in flight can end a wait: wake waiters then.
        self.commits.inner.send_if_modified(|in_flight| {
            let was_lowest = in_flight.running.first() == Some(&self.number);
            in_flight.running.remove(&self.number);
            was_lowest
        });
    }
}

impl LocalCommits {
    /// Call before a local commit starts; keep the guard until its states are published.
    pub fn start(&self) -> CommitInFlight {
        let mut number = 0;
        // A start never ends a wait, so it wakes no one.
        self.inner.send_if_modified(|in_flight| {
            number = in_flight.next;
            in_flight.next += 1;
            in_flight.running.insert(number);
            false
        });
        CommitInFlight {
            commits: self.clone(),
            number,
        }
    }

    /// Waits, at most `limit`, until every local commit started before this call has
    /// published. Commits started after the call are not waited for.
    pub fn settled(&self, limit: Duration) -> impl Future<Output = ()> + Send + 'static {
        // Taken now, not when first polled: "before this call" is what the caller means.
        let mut in_flight = self.inner.subscribe();
        let until = in_flight.borrow().next;
        async move {
            let ended = in_flight.wait_for(|now| now.running.first().is_none_or(|&n| n >= until));
            let _ = tokio::time::timeout(limit, ended).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::{Pin, pin};

    use futures::FutureExt;
    use tokio::time::Instant;

    use super::*;

    const LIMIT: Duration = Duration::from_secs(5);

    /// Polls a wait once, without letting the (paused) clock move: true if it returned.
    fn returned(wait: Pin<&mut impl Future<Output = ()>>) -> bool {
        wait.now_or_never().is_some()
    }

    #[tokio::test(start_paused = true)]
    async fn a_commit_started_after_settled_that_finishes_first_does_not_end_the_wait() {
        let commits = LocalCommits::default();
        let earlier = commits.start();
        let mut settled = pin!(commits.settled(LIMIT));
        assert!(
            !returned(settled.as_mut()),
            "the earlier commit is in flight"
        );
        let later = commits.start();
        drop(later);
        assert!(
            !returned(settled.as_mut()),
            "a later commit ended while the earlier one is still in flight"
        );
        drop(earlier);
        assert!(returned(settled), "the earlier commit ended");
    }

    #[tokio::test(start_paused = true)]
    async fn settled_returns_at_once_with_nothing_in_flight() {
        let commits = LocalCommits::default();
        assert!(returned(pin!(commits.settled(LIMIT))), "none ever started");
        drop(commits.start());
        drop(commits.start());
        assert!(returned(pin!(commits.settled(LIMIT))), "both ended");
    }

    #[tokio::test(start_paused = true)]
    async fn settled_returns_when_the_earlier_commits_end_even_if_later_ones_stay_in_flight() {
        let commits = LocalCommits::default();
        let (first, second) = (commits.start(), commits.start());
        let mut settled = pin!(commits.settled(LIMIT));
        assert!(!returned(settled.as_mut()));
        let _later = commits.start();
        drop(second);
        assert!(!returned(settled.as_mut()), "the first commit is in flight");
        drop(first);
        assert!(
            returned(settled),
            "the commits started before the call ended; the later one is not waited for"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_limit_bounds_the_wait_for_a_commit_that_never_ends() {
        let commits = LocalCommits::default();
        let _stuck = commits.start();
        let called = Instant::now();
        commits.settled(LIMIT).await;
        assert_eq!(called.elapsed(), LIMIT);
    }
}
