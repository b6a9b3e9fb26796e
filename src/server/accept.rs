//! What the accept loop does when `accept` fails: back off, and log once per interval
//! with a count rather than once per failure.
//!
//! Failing accepts are almost always the open-file limit (EMFILE, ENFILE) or memory
//! (ENOBUFS, ENOMEM); retrying at once would spin and log at the accept rate.

use std::io;
use std::time::Duration;

use tokio::time::Instant;

const FIRST_DELAY: Duration = Duration::from_millis(10);
const MAX_DELAY: Duration = Duration::from_millis(500);
/// At most one warning per interval while accepts keep failing.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// Backoff and log throttling for failed accepts.
#[derive(Debug, Default)]
pub struct AcceptErrors {
    delay: Duration,
    /// Failures not yet reported in a log line.
    unreported: u64,
    last_log: Option<Instant>,
}

/// What to do after a failed accept.
#[derive(Debug, PartialEq, Eq)]
pub struct Backoff {
    /// Wait this long before accepting again.
    pub pause: Duration,
    /// Log now, with this many failures since the last line.
    pub report: Option<u64>,
}

impl AcceptErrors {
    /// Records a failure at `now`: the delay doubles from 10 ms up to 500 ms.
    pub fn failed(&mut self, now: Instant) -> Backoff {
        self.delay = (self.delay * 2).clamp(FIRST_DELAY, MAX_DELAY);
        self.unreported += 1;
        let due = self
            .last_log
            .is_none_or(|last| now.duration_since(last) >= LOG_EVERY);
        let report = due.then(|| {
            self.last_log = Some(now);
            std::mem::take(&mut self.unreported)
        });
        Backoff {
            pause: self.delay,
            report,
        }
    }

    /// Records a successful accept: the next failure starts the backoff over. Failures
    /// not yet reported stay counted for the next line, so that accepts alternating with
    /// failures (each eviction frees one descriptor) still log once per interval.
    pub fn accepted(&mut self) {
        self.delay = Duration::ZERO;
    }
}

/// Out of file descriptors or kernel memory: closing a connection is what helps.
pub fn is_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_of_failures_logs_once_per_interval_with_a_count() {
        let mut errors = AcceptErrors::default();
        let start = Instant::now();
        assert_eq!(
            errors.failed(start).report,
            Some(1),
            "the first one is reported"
        );
        for _ in 0..999 {
            assert_eq!(errors.failed(start).report, None);
        }
        let later = start + LOG_EVERY;
        assert_eq!(errors.failed(later).report, Some(1000));
        errors.accepted();
        assert_eq!(
            errors.failed(later).report,
            None,
            "an accept does not reset the interval"
        );
        assert_eq!(errors.failed(later + LOG_EVERY).report, Some(2));
    }

    #[test]
    fn the_pause_doubles_up_to_a_bound_and_restarts_after_an_accept() {
        let mut errors = AcceptErrors::default();
        let now = Instant::now();
        let pauses: Vec<_> = (0..8).map(|_| errors.failed(now).pause).collect();
        assert_eq!(pauses[0], FIRST_DELAY);
        assert_eq!(pauses[1], FIRST_DELAY * 2);
        assert_eq!(pauses[7], MAX_DELAY);
        errors.accepted();
        assert_eq!(errors.failed(now).pause, FIRST_DELAY);
    }

    #[test]
    fn emfile_and_enfile_are_exhaustion_and_a_reset_is_not() {
        assert!(is_exhaustion(&io::Error::from_raw_os_error(libc::EMFILE)));
        assert!(is_exhaustion(&io::Error::from_raw_os_error(libc::ENFILE)));
        assert!(!is_exhaustion(&io::Error::from_raw_os_error(
            libc::ECONNABORTED
        )));
    }
}
