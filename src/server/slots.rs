//! The plain-HTTP connection cap, and each connection's deadline.
//!
//! A connection is in one phase at a time, and the phase decides its deadline:
//!
//! ```text
//! accepted --first request's header--> busy --response--> idle --first byte--> head --header--> busy ...
//!   header timeout from connect          none             keep-alive timeout   header timeout
//!                                         |
//!                                         +--push stream--> stream (2 x keep-alive timeout
//!                                                           without a byte read or an answer sent)
//! ```
//!
//! A WebSocket (101) or an SSE stream leaves the cap ("detached"): it has its own cap,
//! TASKCAST_MAX_CONNECTIONS, and its own deadlines. When the cap is full, the oldest
//! connection that is not in the middle of a request is evicted, so idle or slow
//! connections can never keep a push out; a request in flight is never cut. A push stream
//! is a request in flight for as long as it moves, so the routes let at most a quarter of
//! the cap be push streams.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

const ACCEPTED: u8 = 0;
const HEAD: u8 = 1;
const BUSY: u8 = 2;
const IDLE: u8 = 3;
const DETACHED: u8 = 4;
const EVICTED: u8 = 5;
/// A request whose answer streams while its body is still read (the push stream): in
/// flight, so never evicted, but closed once neither side moved for a while.
const STREAM: u8 = 6;

/// The open plain-HTTP connections. Cloning is shallow.
#[derive(Clone)]
pub struct Slots {
    shared: Arc<Shared>,
}

struct Shared {
    cap: usize,
    header_timeout: Duration,
    keep_alive_timeout: Duration,
    epoch: Instant,
    next_id: AtomicU64,
    /// The most connections open at once since [`Slots::take_peak`].
    peak: AtomicUsize,
    /// Connections that left the cap so far (closed, detached or evicted), each once.
    left: AtomicU64,
    /// Evicted connections whose task has not yet closed the socket: their slot is free but
    /// their descriptor is not, so admitting by eviction stops at [`Shared::closing_cap`].
    closing: AtomicUsize,
    /// Notified when an evicted connection's socket closed.
    closed: Notify,
    /// Keyed by accept order, so the first evictable entry is the oldest.
    /// std Mutex, not tokio: nothing awaits while it is held.
    live: Mutex<BTreeMap<u64, Arc<Track>>>,
}

/// One connection's phase, shared by its IO, its service and its deadline watcher.
pub struct Track {
    id: u64,
    phase: AtomicU8,
    /// When the current phase started, in milliseconds after `Shared::epoch`.
    since_ms: AtomicU64,
    released: AtomicBool,
    /// Wakes the deadline watcher when the deadline moved earlier or went away.
    wake: Notify,
    shared: Arc<Shared>,
}

/// Why no slot was given.
enum NoSlot {
    /// Every slot holds a request in flight.
    Busy,
    /// Evicted connections still hold [`Shared::closing_cap`] descriptors.
    Closing,
}

impl Shared {
    /// Evicted sockets allowed to be still closing: a quarter of the cap, from 8 to 256.
    fn closing_cap(&self) -> usize {
        (self.cap / 4).clamp(8, 256)
    }
}

impl Slots {
    pub fn new(cap: usize, header_timeout: Duration, keep_alive_timeout: Duration) -> Self {
        Slots {
            shared: Arc::new(Shared {
                cap,
                header_timeout,
                keep_alive_timeout,
                epoch: Instant::now(),
                next_id: AtomicU64::new(0),
                peak: AtomicUsize::new(0),
                left: AtomicU64::new(0),
                closing: AtomicUsize::new(0),
                closed: Notify::new(),
                live: Mutex::new(BTreeMap::new()),
            }),
        }
    }

    /// A slot for a new connection, evicting the oldest evictable one if the cap is
    /// reached; `None` when every slot holds a request in flight, or when too many evicted
    /// connections are still closing (see [`Slots::admit_within`]).
    pub fn admit(&self) -> Option<Lease> {
        self.try_admit().ok()
    }

    /// [`Slots::admit`], but while too many evicted connections are still closing, waits
    /// (up to `within`) for them to close rather than refusing. The accept loop waits here,
    /// so a flood is held in the kernel's backlog instead of in descriptors.
    pub async fn admit_within(&self, within: Duration) -> Option<Lease> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            // Registered before the check, so a close in between is not missed.
            let closed = self.shared.closed.notified();
            match self.try_admit() {
                Ok(lease) => return Some(lease),
                Err(NoSlot::Busy) => return None,
                Err(NoSlot::Closing) => {
                    tokio::time::timeout_at(deadline, closed).await.ok()?;
                }
            }
        }
    }

    fn try_admit(&self) -> Result<Lease, NoSlot> {
        let mut live = self.shared.live.lock().expect("slots lock poisoned");
        if live.len() >= self.shared.cap {
            // Under a flood, evicted sockets may not have closed yet: admitting more by
            // eviction would let descriptors in use outgrow the cap.
            if self.shared.closing.load(Ordering::Acquire) >= self.shared.closing_cap() {
                return Err(NoSlot::Closing);
            }
            if !evict_oldest(&mut live) {
                return Err(NoSlot::Busy);
            }
        }
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let track = Arc::new(Track {
            id,
            phase: AtomicU8::new(ACCEPTED),
            since_ms: AtomicU64::new(self.shared.now_ms()),
            released: AtomicBool::new(false),
            wake: Notify::new(),
            shared: self.shared.clone(),
        });
        live.insert(id, track.clone());
        self.shared.peak.fetch_max(live.len(), Ordering::Relaxed);
        Ok(Lease(track))
    }

    /// Closes the oldest connection not in the middle of a request, to free its file
    /// descriptor (the accept loop's answer to EMFILE). False if there is none.
    pub fn evict_oldest(&self) -> bool {
        let mut live = self.shared.live.lock().expect("slots lock poisoned");
        evict_oldest(&mut live)
    }

    /// Connections holding a slot now.
    pub fn len(&self) -> usize {
        self.shared.live.lock().expect("slots lock poisoned").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most connections open at once since the last call, and the number open now;
    /// the peak starts over from now.
    pub fn take_peak(&self) -> (usize, usize) {
        let now = self.len();
        (self.shared.peak.swap(now, Ordering::Relaxed), now)
    }

    /// How many connections have left the cap (closed, detached or evicted) since start.
    pub fn left(&self) -> u64 {
        self.shared.left.load(Ordering::Relaxed)
    }
}

fn evict_oldest(live: &mut BTreeMap<u64, Arc<Track>>) -> bool {
    let victim = live.values().find(|track| track.try_evict()).map(|t| t.id);
    match victim.and_then(|id| live.remove(&id)) {
        Some(track) => {
            track.shared.closing.fetch_add(1, Ordering::AcqRel);
            track.shared.left.fetch_add(1, Ordering::Relaxed);
            track.released.store(true, Ordering::Release);
            track.wake.notify_one();
            true
        }
        None => false,
    }
}

impl Shared {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }
}

impl Track {
    /// Bytes arrived: on an idle kept-alive connection they start the next request's
    /// header, whose deadline (usually shorter) replaces the keep-alive one.
    pub fn on_read(&self) {
        match self.phase.load(Ordering::Relaxed) {
            IDLE if self
                .phase
                .compare_exchange(IDLE, HEAD, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok() =>
            {
                self.since_ms.store(self.shared.now_ms(), Ordering::Release);
                self.wake.notify_one();
            }
            // The deadline moved later: the watcher finds that out when it wakes.
            STREAM => self.since_ms.store(self.shared.now_ms(), Ordering::Release),
            _ => {}
        }
    }

    /// The request's answer streams while its body is still being read: the connection
    /// stays in flight (never evicted), and closes once neither a byte arrived nor
    /// [`Track::stream_moved`] was called for twice the keep-alive timeout: a client that
    /// stops reading its answers cannot hold the connection forever.
    pub fn stream_started(&self) {
        self.since_ms.store(self.shared.now_ms(), Ordering::Release);
        if self
            .phase
            .compare_exchange(BUSY, STREAM, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            self.wake.notify_one();
        }
    }

    /// A streaming answer sent more of itself.
    pub fn stream_moved(&self) {
        self.since_ms.store(self.shared.now_ms(), Ordering::Release);
    }

    /// hyper parsed a whole request header. False if the connection was evicted first;
    /// the request must then not run.
    pub fn request_started(&self) -> bool {
        self.phase
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |phase| {
                matches!(phase, ACCEPTED | HEAD | IDLE).then_some(BUSY)
            })
            .is_ok()
    }

    /// The response head is ready: the connection waits for the next request.
    pub fn response_ready(&self) {
        self.since_ms.store(self.shared.now_ms(), Ordering::Release);
        if self
            .phase
            .compare_exchange(BUSY, IDLE, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            self.wake.notify_one();
        }
    }

    /// The connection became a WebSocket or an SSE stream: it leaves the cap and its
    /// deadlines; its own cap and deadlines take over.
    pub fn detach(&self) {
        if self
            .phase
            .compare_exchange(BUSY, DETACHED, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            self.release();
            self.wake.notify_one();
        }
    }

    /// The connection is a WebSocket or an SSE stream now (final): nothing more to track.
    pub fn is_detached(&self) -> bool {
        self.phase.load(Ordering::Relaxed) == DETACHED
    }

    /// Completes when the connection must close: its deadline passed or it was evicted.
    pub async fn expired(&self) {
        loop {
            match self.deadline() {
                Some(at) if at <= Instant::now() => return,
                Some(at) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(at) => {}
                        () = self.wake.notified() => {}
                    }
                }
                None => self.wake.notified().await,
            }
        }
    }

    /// Whether the connection was closed to make room for another.
    pub fn evicted(&self) -> bool {
        self.phase.load(Ordering::Acquire) == EVICTED
    }

    fn deadline(&self) -> Option<Instant> {
        let timeout = match self.phase.load(Ordering::Acquire) {
            ACCEPTED | HEAD => self.shared.header_timeout,
            IDLE => self.shared.keep_alive_timeout,
            STREAM => self.shared.keep_alive_timeout * 2,
            EVICTED => return Some(self.shared.epoch),
            _ => return None,
        };
        let since = Duration::from_millis(self.since_ms.load(Ordering::Acquire));
        Some(self.shared.epoch + since + timeout)
    }

    fn try_evict(&self) -> bool {
        self.phase
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |phase| {
                matches!(phase, ACCEPTED | HEAD | IDLE).then_some(EVICTED)
            })
            .is_ok()
    }

    fn release(&self) {
        if !self.released.swap(true, Ordering::AcqRel) {
            self.shared
                .live
                .lock()
                .expect("slots lock poisoned")
                .remove(&self.id);
            self.shared.left.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A connection's slot; dropping it (the connection ended) frees the slot.
pub struct Lease(Arc<Track>);

impl Lease {
    pub fn track(&self) -> Arc<Track> {
        self.0.clone()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.0.evicted() {
            // Its slot was freed at eviction (EVICTED is final); now its socket is closed.
            self.0.shared.closing.fetch_sub(1, Ordering::AcqRel);
            self.0.shared.closed.notify_waiters();
        }
        self.0.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots(cap: usize) -> Slots {
        Slots::new(cap, Duration::from_secs(10), Duration::from_secs(60))
    }

    #[test]
    fn a_full_cap_evicts_the_oldest_connection_not_in_a_request() {
        let slots = slots(2);
        let first = slots.admit().expect("a free slot");
        let second = slots.admit().expect("a free slot");
        assert!(first.track().request_started());
        let third = slots
            .admit()
            .expect("the idle second connection is evicted");
        assert!(!first.track().evicted(), "a request in flight is never cut");
        assert!(second.track().evicted());
        assert!(
            !second.track().request_started(),
            "an evicted request must not run"
        );
        assert_eq!(slots.len(), 2);
        assert!(third.track().request_started());
        assert!(slots.admit().is_none(), "every slot is mid-request");
    }

    #[tokio::test]
    async fn admitting_by_eviction_waits_while_too_many_evicted_sockets_are_still_open() {
        let slots = slots(4);
        let mut open = vec![slots.admit().expect("a free slot")];
        // The cap is full; every further admit evicts one whose lease (socket) stays alive.
        for _ in 0..3 {
            open.push(slots.admit().expect("a free slot"));
        }
        let closing_cap = slots.shared.closing_cap();
        for _ in 0..closing_cap {
            open.push(slots.admit().expect("evicting the oldest idle connection"));
        }
        assert!(
            slots.admit().is_none(),
            "{closing_cap} evicted sockets are still open: no more evictions"
        );
        // The evicted connections close while an admit waits: it gets its slot.
        let evicted: Vec<Lease> = open.drain(..closing_cap).collect();
        assert!(evicted.iter().all(|lease| lease.track().evicted()));
        let waiting = slots.admit_within(Duration::from_secs(10));
        let mut waiting = std::pin::pin!(waiting);
        assert!(
            futures::poll!(&mut waiting).is_pending(),
            "waits for a close"
        );
        drop(evicted);
        let _next = waiting.await.expect("evicting works again");
        assert_eq!(slots.len(), 4);
        // That admit evicted one more (still open); fill the rest of the closing budget,
        // and a wait that sees no close ends at its deadline without a slot.
        let more: Vec<Lease> = (0..closing_cap).filter_map(|_| slots.admit()).collect();
        assert_eq!(more.len(), closing_cap - 1);
        assert!(
            slots
                .admit_within(Duration::from_millis(20))
                .await
                .is_none()
        );
    }

    #[test]
    fn a_detached_connection_and_a_dropped_lease_free_their_slots() {
        let slots = slots(1);
        let stream = slots.admit().expect("a free slot");
        assert!(stream.track().request_started());
        stream.track().detach();
        assert!(slots.is_empty());
        let next = slots.admit().expect("the detached stream left the cap");
        drop(next);
        assert!(slots.is_empty());
        drop(stream);
        assert!(slots.is_empty());
    }

    #[test]
    fn a_connection_counts_as_left_once_whether_detached_closed_or_evicted() {
        let slots = slots(1);
        let detached = slots.admit().expect("a free slot");
        assert!(detached.track().request_started());
        detached.track().detach();
        assert_eq!(slots.left(), 1, "detached");
        drop(detached);
        assert_eq!(
            slots.left(),
            1,
            "a detached stream's close is not counted again"
        );
        let closed = slots.admit().expect("a free slot");
        drop(closed);
        assert_eq!(slots.left(), 2, "closed");
        let evicted = slots.admit().expect("a free slot");
        let _next = slots.admit().expect("the idle one is evicted");
        assert!(evicted.track().evicted());
        assert_eq!(slots.left(), 3, "evicted");
        drop(evicted);
        assert_eq!(
            slots.left(),
            3,
            "an evicted socket's close is not counted again"
        );
    }

    /// A paused clock jumps straight to each deadline, so the times are exact up to the
    /// millisecond the phases are recorded in, however busy the machine.
    #[tokio::test(start_paused = true)]
    async fn deadlines_follow_the_phase() {
        let header = Duration::from_secs(10);
        let keep_alive = Duration::from_secs(40);
        let slots = Slots::new(4, header, keep_alive);
        let within = |took: Duration, expected: Duration| {
            took >= expected && took <= expected + Duration::from_millis(2)
        };

        let track = slots.admit().expect("a free slot").track();
        let start = Instant::now();
        track.expired().await;
        assert!(within(start.elapsed(), header), "header timeout");

        let track = slots.admit().expect("a free slot").track();
        assert!(track.request_started());
        track.response_ready();
        let start = Instant::now();
        track.expired().await;
        assert!(within(start.elapsed(), keep_alive), "keep-alive timeout");

        let track = slots.admit().expect("a free slot").track();
        assert!(track.request_started());
        track.response_ready();
        track.on_read();
        let start = Instant::now();
        track.expired().await;
        assert!(within(start.elapsed(), header), "a new header's timeout");
    }
}
