//! Gives the memory of a connection flood back to the OS once the flood is over.
//!
//! Each connection's read buffer (up to TASKCAST_MAX_HEADER_BYTES) is freed when it closes,
//! but glibc keeps freed chunks inside its per-thread arenas: after 2,000 connections held
//! 31 KiB headers, RSS stayed at ~70 MiB of ~93 MiB once they closed (`cargo bench --bench
//! headers`). The same holds for the HTTP phase of a WebSocket or SSE stream (hyper's
//! buffers, the upgrade's boxes) once it detaches. `malloc_trim(0)` returns the free pages
//! of every arena. Once a second, [`Trimmer::tick`] decides. A flood is over, and memory
//! is trimmed, at the first quiet tick (fewer than [`QUIET`] connections left the HTTP
//! phase: closed, detached or evicted) after either
//!
//! - the open HTTP connections fell by [`FALL`] from their peak (then at the latest
//!   [`PATIENCE`] ticks after the last such fall, in case steady traffic is never quiet), or
//! - at least [`FALL`] connections left the HTTP phase since the last trim: a flood of
//!   WebSocket upgrades detaches each slot, so the open count never falls.
//!
//! So a steady server never pays: one whose connections stay open (or stay kept alive)
//! never trims, nor does one whose connections come and go at [`QUIET`] a second or more.
//! One where they come and go more slowly trims at most once per [`FALL`] of them.

use std::time::Duration;

use tokio::sync::watch;

use super::Slots;

/// How often the connection counts are checked.
const EVERY: Duration = Duration::from_secs(1);
/// A fall this large from the peak, or this many connections gone through the HTTP phase,
/// counts as a flood.
const FALL: usize = 256;
/// A tick in which fewer connections than this left the HTTP phase ends a flood.
const QUIET: u64 = 16;
/// Ticks a fall from the peak waits for a quiet one before it trims anyway.
const PATIENCE: u32 = 5;

/// Runs until `stop` changes (or its sender is dropped).
pub async fn trim_after_floods(slots: Slots, mut stop: watch::Receiver<()>) {
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut trimmer = Trimmer::new(slots.left());
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let (peak, now) = slots.take_peak();
        let left = slots.left();
        if trimmer.tick(peak, now, left) {
            let trimmed = tokio::task::spawn_blocking(trim).await.unwrap_or(false);
            tracing::debug!(
                peak,
                now,
                left,
                trimmed,
                "returned freed connection memory to the OS"
            );
        }
    }
}

/// The trim rule, kept apart from the clock and the allocator so it can be tested.
struct Trimmer {
    /// [`Slots::left`] at the last trim.
    left_at_trim: u64,
    /// [`Slots::left`] at the last tick.
    left_at_tick: u64,
    /// Ticks since the open connections last fell by [`FALL`] from their peak, while that
    /// fall waits for its trim.
    since_fall: Option<u32>,
}

impl Trimmer {
    fn new(left: u64) -> Self {
        Trimmer {
            left_at_trim: left,
            left_at_tick: left,
            since_fall: None,
        }
    }

    /// One tick's counts: the peak of open HTTP connections since the last tick, the number
    /// open now, and [`Slots::left`] now. True if memory should be trimmed now.
    fn tick(&mut self, peak: usize, open: usize, left: u64) -> bool {
        let this_tick = left.saturating_sub(self.left_at_tick);
        self.left_at_tick = left;
        let quiet = this_tick < QUIET;
        if peak.saturating_sub(open) >= FALL {
            self.since_fall = Some(0);
        } else if let Some(ticks) = self.since_fall.as_mut() {
            *ticks += 1;
        }
        let trim = match self.since_fall {
            Some(ticks) => quiet || ticks >= PATIENCE,
            None => quiet && left.saturating_sub(self.left_at_trim) >= FALL as u64,
        };
        if trim {
            self.left_at_trim = left;
            self.since_fall = None;
        }
        trim
    }
}

/// Returns free heap pages to the OS; true if any were.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() -> bool {
    // SAFETY: malloc_trim only walks the allocator's own free lists; it is thread-safe.
    unsafe { libc::malloc_trim(0) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUIET_TICK: u64 = QUIET - 1;

    #[test]
    fn a_steady_server_never_trims() {
        let mut trimmer = Trimmer::new(0);
        let mut left = 0;
        for _ in 0..1000 {
            // Connections stay open, and a few come and go each tick.
            left += QUIET;
            assert!(!trimmer.tick(500, 500, left));
        }
    }

    #[test]
    fn a_fall_of_256_from_the_peak_trims_at_the_next_quiet_tick() {
        let mut trimmer = Trimmer::new(0);
        let left = FALL as u64 - 1;
        assert!(!trimmer.tick(2000, 2000 - FALL + 1, left));
        assert!(!trimmer.tick(0, 0, left), "a fall of 255 is no flood");
        let left = left + FALL as u64;
        assert!(!trimmer.tick(2000, 2000 - FALL, left), "still falling");
        assert!(trimmer.tick(0, 0, left + QUIET_TICK));
    }

    #[test]
    fn a_fall_into_traffic_that_is_never_quiet_trims_5_ticks_later() {
        let mut trimmer = Trimmer::new(0);
        let mut left = 2000;
        assert!(!trimmer.tick(2100, 100, left));
        for _ in 1..PATIENCE {
            left += QUIET;
            assert!(!trimmer.tick(100, 100, left));
        }
        left += QUIET;
        assert!(trimmer.tick(100, 100, left));
        for _ in 0..100 {
            left += QUIET;
            assert!(
                !trimmer.tick(100, 100, left),
                "the traffic itself never trims"
            );
        }
    }

    #[test]
    fn a_quiet_tick_after_256_connections_went_through_trims() {
        let mut trimmer = Trimmer::new(0);
        // 256 browsers connect and upgrade in one tick: the open count never falls.
        assert!(!trimmer.tick(200, 0, FALL as u64), "the flood is still on");
        assert!(trimmer.tick(0, 0, FALL as u64 + QUIET_TICK));
    }

    #[test]
    fn a_quiet_tick_after_fewer_than_256_connections_does_not_trim() {
        let mut trimmer = Trimmer::new(0);
        assert!(!trimmer.tick(200, 0, FALL as u64 - 1));
        assert!(!trimmer.tick(0, 0, FALL as u64 - 1));
    }

    #[test]
    fn churn_that_goes_on_does_not_trim_until_a_quiet_tick() {
        let mut trimmer = Trimmer::new(0);
        let mut left = 0;
        for _ in 0..100 {
            left += QUIET;
            assert!(!trimmer.tick(100, 100, left));
        }
        assert!(trimmer.tick(100, 100, left));
    }

    #[test]
    fn after_a_trim_the_churn_starts_over() {
        let mut trimmer = Trimmer::new(0);
        let mut left = 10 * FALL as u64;
        assert!(!trimmer.tick(200, 0, left));
        assert!(trimmer.tick(0, 0, left));
        // Then connections trickle through, every tick a quiet one.
        let trimmed_at = left;
        loop {
            left += QUIET_TICK;
            let trimmed = trimmer.tick(0, 0, left);
            assert_eq!(trimmed, left - trimmed_at >= FALL as u64, "{left}");
            if trimmed {
                break;
            }
        }
    }
}
