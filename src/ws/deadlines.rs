//! When a WebSocket connection must act next: send a ping, give up on a silent client,
//! close for idleness, or end a subscription whose token expired.
//!
//! No I/O and no timer of its own: the connection asks for [`Deadlines::next`], sleeps
//! until then, and asks what is due at that instant. Every instant comes from the caller,
//! so the tests drive it with a paused tokio clock instead of sleeping.

use tokio::time::Instant;

use crate::subscribers::{SubscriberLimits, Target};

pub struct Deadlines {
    /// When each subscription's token expires (at most `max_subscriptions` entries, so a
    /// scan is cheap), and the earliest of them.
    expiries: Vec<(Target, Instant)>,
    next_expiry: Option<Instant>,
    /// When a connection with no subscription is closed.
    idle: Instant,
    /// When the next ping is due, and when the client was last heard from.
    next_ping: Instant,
    last_heard: Instant,
}

/// What the ping deadline asks for at a given instant.
#[derive(Debug, PartialEq, Eq)]
pub enum Ping {
    NotYet,
    Send,
    /// Nothing heard for the pong timeout: the client is gone.
    NoPong,
}

impl Deadlines {
    /// A connection opened at `now`, with no subscription yet.
    pub fn new(now: Instant, limits: &SubscriberLimits) -> Self {
        Deadlines {
            expiries: Vec::new(),
            next_expiry: None,
            idle: now + limits.idle_timeout,
            next_ping: now + limits.ping_interval,
            last_heard: now,
        }
    }

    /// The earliest of: the next ping, the idle close (only without subscriptions), the
    /// first token expiry.
    pub fn next(&self, subscribed: bool) -> Instant {
        let mut next = self.next_ping;
        if !subscribed {
            next = next.min(self.idle);
        }
        if let Some(expiry) = self.next_expiry {
            next = next.min(expiry);
        }
        next
    }

    /// Any frame from the client (a pong, a message) counts as an answer to our pings.
    pub fn heard(&mut self, now: Instant) {
        self.last_heard = now;
    }

    /// Whether a connection without subscriptions has been idle too long.
    pub fn is_idle(&self, now: Instant, subscribed: bool) -> bool {
        !subscribed && self.idle <= now
    }

    /// The subscriptions whose token has expired at `now`; each must be [`forget`]-ed.
    ///
    /// [`forget`]: Deadlines::forget
    pub fn expired(&self, now: Instant) -> Vec<Target> {
        if self.next_expiry.is_none_or(|at| at > now) {
            return Vec::new();
        }
        self.expiries
            .iter()
            .filter(|(_, at)| *at <= now)
            .map(|(task, _)| *task)
            .collect()
    }

    /// Whether a ping is due; when one is, the next is scheduled an interval after `now`.
    pub fn ping(&mut self, now: Instant, limits: &SubscriberLimits) -> Ping {
        if self.next_ping > now {
            return Ping::NotYet;
        }
        if now.duration_since(self.last_heard) >= limits.pong_timeout {
            return Ping::NoPong;
        }
        self.next_ping = now + limits.ping_interval;
        Ping::Send
    }

    /// A subscription started; its token (if any) expires at `expires_at`.
    pub fn watch(&mut self, task: Target, expires_at: Option<Instant>) {
        if let Some(at) = expires_at {
            // Room for exactly one more: a first push would reserve four entries (352
            // bytes), and most connections only ever watch one task.
            self.expiries.reserve_exact(1);
            self.expiries.push((task, at));
            self.next_expiry = self.expiries.iter().map(|(_, at)| *at).min();
        }
    }

    /// A subscription ended at `now`; when it was the last (`subscribed` is now false),
    /// the idle timeout starts over.
    pub fn forget(
        &mut self,
        task: Target,
        now: Instant,
        subscribed: bool,
        limits: &SubscriberLimits,
    ) {
        if let Some(at) = self.expiries.iter().position(|(t, _)| *t == task) {
            self.expiries.swap_remove(at);
            self.next_expiry = self.expiries.iter().map(|(_, at)| *at).min();
        }
        if !subscribed {
            self.idle = now + limits.idle_timeout;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::advance;

    use super::*;

    const IDLE: Duration = Duration::from_secs(30);
    const PING: Duration = Duration::from_secs(20);
    const PONG: Duration = Duration::from_secs(60);

    fn limits() -> SubscriberLimits {
        SubscriberLimits {
            max_connections: 10,
            max_subscriptions: 4,
            max_subscribes_per_sec: 10,
            max_ws_message_bytes: 4096,
            idle_timeout: IDLE,
            ping_interval: PING,
            pong_timeout: PONG,
            feed_recent: 20,
        }
    }

    fn task() -> Target {
        Target::Task(crate::domain::TaskId::from(uuid::Uuid::new_v4()))
    }

    /// Sleeps on the deadline the way the connection does: the paused clock jumps to it.
    async fn sleep_until_next(deadlines: &Deadlines, subscribed: bool) -> Instant {
        tokio::time::sleep_until(deadlines.next(subscribed)).await;
        Instant::now()
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_without_subscriptions_is_idle_after_the_idle_timeout() {
        let limits = limits();
        let opened = Instant::now();
        let mut d = Deadlines::new(opened, &limits);
        // The first ping comes before the idle close, and is not idleness.
        let now = sleep_until_next(&d, false).await;
        assert_eq!(now - opened, PING);
        assert!(!d.is_idle(now, false));
        assert_eq!(d.ping(now, &limits), Ping::Send);
        let now = sleep_until_next(&d, false).await;
        assert_eq!(now - opened, IDLE);
        assert!(d.is_idle(now, false));
        advance(Duration::from_millis(1)).await;
        assert!(
            d.is_idle(Instant::now(), false),
            "idleness does not wear off"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_subscribed_connection_is_never_idle_and_the_idle_clock_restarts_when_it_ends() {
        let limits = SubscriberLimits {
            idle_timeout: PING / 4,
            ..limits()
        };
        let opened = Instant::now();
        let mut d = Deadlines::new(opened, &limits);
        let t = task();
        d.watch(t, None);
        assert_eq!(d.next(false), opened + PING / 4);
        assert_eq!(
            d.next(true),
            opened + PING,
            "idleness is no deadline while subscribed"
        );
        advance(PING * 10).await;
        assert!(!d.is_idle(Instant::now(), true));
        // Unsubscribing long after opening gives a full idle period from then.
        let ended = Instant::now();
        d.forget(t, ended, false, &limits);
        advance(PING / 4 - Duration::from_millis(1)).await;
        assert!(!d.is_idle(Instant::now(), false));
        advance(Duration::from_millis(1)).await;
        assert!(d.is_idle(Instant::now(), false));
    }

    #[tokio::test(start_paused = true)]
    async fn pings_repeat_every_interval_while_the_client_answers() {
        let limits = limits();
        let opened = Instant::now();
        let mut d = Deadlines::new(opened, &limits);
        d.watch(task(), None);
        for n in 1..=10u32 {
            let now = sleep_until_next(&d, true).await;
            assert_eq!(now - opened, PING * n);
            assert_eq!(d.ping(now, &limits), Ping::Send);
            assert_eq!(d.ping(now, &limits), Ping::NotYet, "one ping per interval");
            d.heard(now); // the pong
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_never_answers_pings_is_given_up_after_the_pong_timeout() {
        let limits = limits();
        let opened = Instant::now();
        let mut d = Deadlines::new(opened, &limits);
        d.watch(task(), None);
        let mut pings = 0;
        let mut gone = None;
        // Bounded, so a connection that is never given up fails the test instead of
        // spinning on the paused clock.
        for _ in 0..10 {
            let now = sleep_until_next(&d, true).await;
            match d.ping(now, &limits) {
                Ping::Send => pings += 1,
                Ping::NoPong => {
                    gone = Some(now);
                    break;
                }
                Ping::NotYet => panic!("woken with nothing due"),
            }
        }
        let gone = gone.expect("a silent client is given up");
        // Pings at 20 s and 40 s; at 60 s nothing has been heard for the pong timeout.
        assert_eq!(pings, 2);
        assert_eq!(gone - opened, PONG);
    }

    #[tokio::test(start_paused = true)]
    async fn hearing_from_the_client_postpones_giving_up() {
        let limits = limits();
        let opened = Instant::now();
        let mut d = Deadlines::new(opened, &limits);
        d.watch(task(), None);
        advance(PONG - Duration::from_secs(1)).await;
        d.heard(Instant::now());
        advance(Duration::from_secs(1)).await;
        assert_eq!(d.ping(Instant::now(), &limits), Ping::Send);
    }

    #[test]
    fn a_watched_expiry_reserves_room_for_itself_only() {
        let mut d = Deadlines::new(Instant::now(), &limits());
        d.watch(task(), Some(Instant::now()));
        assert_eq!(
            d.expiries.capacity(),
            1,
            "an idle connection holds one entry"
        );
        d.watch(task(), Some(Instant::now()));
        assert_eq!(d.expiries.len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_expire_at_their_own_instant_and_a_renewed_one_replaces_the_old() {
        let limits = limits();
        let opened = Instant::now();
        let mut d = Deadlines::new(opened, &limits);
        let (a, b) = (task(), task());
        d.watch(a, Some(opened + Duration::from_secs(5)));
        d.watch(b, Some(opened + Duration::from_secs(8)));
        assert!(d.expired(Instant::now()).is_empty());
        let now = sleep_until_next(&d, true).await;
        assert_eq!(now - opened, Duration::from_secs(5));
        assert_eq!(d.expired(now), vec![a]);
        d.forget(a, now, true, &limits);
        // b is renewed before it expires: forget the old token, watch the new one.
        d.forget(b, now, false, &limits);
        d.watch(b, Some(opened + Duration::from_secs(15)));
        let now = sleep_until_next(&d, true).await;
        assert_eq!(now - opened, Duration::from_secs(15));
        assert_eq!(d.expired(now), vec![b]);
        d.forget(b, now, false, &limits);
        assert_eq!(d.next(true), opened + PING, "no expiry left to wait for");
    }
}
