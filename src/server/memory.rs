//! Gives the memory of a connection flood back to the OS once the flood is over.
//!
//! Each connection's read buffer (up to TASKCAST_MAX_HEADER_BYTES) is freed when it closes,
//! but glibc keeps freed chunks inside its per-thread arenas: after 2,000 connections held
//! 31 KiB headers, RSS stayed at ~70 MiB of ~93 MiB once they closed (`cargo bench --bench
//! headers`). `malloc_trim(0)` returns the free pages of every arena. It runs only after the
//! number of open HTTP connections fell by [`FALL`] from its peak, so a steady server never
//! pays for it.

use std::time::Duration;

use tokio::sync::watch;

use super::Slots;

/// How often the open-connection count is checked.
const EVERY: Duration = Duration::from_secs(5);
/// A fall this large from the peak counts as the end of a flood.
const FALL: usize = 256;

/// Runs until `stop` changes (or its sender is dropped).
pub async fn trim_after_floods(slots: Slots, mut stop: watch::Receiver<()>) {
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let (peak, now) = slots.take_peak();
        if peak.saturating_sub(now) >= FALL {
            let trimmed = tokio::task::spawn_blocking(trim).await.unwrap_or(false);
            tracing::debug!(
                peak,
                now,
                trimmed,
                "returned freed connection memory to the OS"
            );
        }
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
