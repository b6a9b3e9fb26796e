//! Bounding every database call, so a database that stops answering turns into a 503
//! within `TASKCAST_DB_TIMEOUT_MS` instead of a hang.
//!
//! A partition (packets vanish, no RST) is invisible to a socket that only waits, so each
//! layer here covers what the others miss:
//! - [`run`]: one deadline for a whole call, the wait for a pooled connection included. A
//!   call that misses it has its query cancelled (a CancelRequest on a new connection, in
//!   its own task and itself bounded, since during a partition it hangs too) and its
//!   connection taken out of the pool: `RecyclingMethod::Fast` would hand a connection
//!   stuck mid-query to the next caller.
//! - [`session_settings`], sent once per connection: `statement_timeout` and
//!   `idle_in_transaction_session_timeout`, so the server itself stops a statement nobody
//!   waits for and releases the row locks of a transaction whose client vanished.
//! - [`tune_socket`]: keepalives and `TCP_USER_TIMEOUT`, so the kernel closes a dead link,
//!   idle or with data unacknowledged, and the pool's recycle check then sees it closed.

use std::time::Duration;

use deadpool_postgres::{Object, PoolError};
use tokio::time::{Instant, timeout, timeout_at};
use tokio_postgres::CancelToken;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::error::Error;

/// Bound on the CancelRequest sent for a call that missed its deadline.
const CANCEL_WITHIN: Duration = Duration::from_secs(5);

/// A call that missed its deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Late {
    /// No pooled connection by the deadline: nothing was sent.
    Connecting,
    /// The call was under way: a write may or may not have committed.
    Running,
}

impl Late {
    pub(super) fn describe(self, within: Duration) -> String {
        let ms = within.as_millis();
        match self {
            Late::Connecting => format!("no database connection within {ms} ms"),
            Late::Running => format!("no answer from the database within {ms} ms"),
        }
    }
}

/// Runs `op` on a pooled connection; waiting for the connection and `op` together end by
/// `deadline`. A late `op` is dropped, its query cancelled and its connection discarded.
pub(super) async fn run<T, E>(
    pool: &deadpool_postgres::Pool,
    tls: &MakeRustlsConnect,
    deadline: Instant,
    op: impl AsyncFnOnce(&mut Object) -> Result<T, E>,
) -> Result<T, E>
where
    E: From<Error> + From<Late>,
{
    let mut client = match timeout_at(deadline, pool.get()).await {
        Ok(Ok(client)) => client,
        Ok(Err(e)) => return Err(pool_error(e).into()),
        Err(_) => return Err(Late::Connecting.into()),
    };
    let cancel = client.cancel_token();
    match timeout_at(deadline, op(&mut client)).await {
        Ok(result) => result,
        Err(_) => {
            discard(client, cancel, tls.clone());
            Err(Late::Running.into())
        }
    }
}

/// Takes a connection out of the pool for good (dropping it aborts its driver task and
/// closes the socket) and asks the server to cancel what it was running.
fn discard(client: Object, cancel: CancelToken, tls: MakeRustlsConnect) {
    drop(Object::take(client));
    metrics::counter!(crate::telemetry::DB_TIMEOUTS).increment(1);
    tokio::spawn(async move {
        match timeout(CANCEL_WITHIN, cancel.cancel_query(tls)).await {
            Ok(Ok(())) => tracing::debug!("cancelled a query that missed its deadline"),
            Ok(Err(e)) => tracing::debug!(error = %e, "could not cancel a late query"),
            Err(_) => tracing::debug!("the cancel request for a late query timed out"),
        }
    });
}

/// Keepalives and `TCP_USER_TIMEOUT` for the pool's connections: an idle dead link is
/// closed after about 5 s + 3 × 1 s, and one with data unacknowledged for `timeout` (at
/// least 1 s) at once. A `tcp_user_timeout` in `DATABASE_URL` wins.
pub(super) fn tune_socket(config: &mut tokio_postgres::Config, timeout: Duration) {
    config
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(5))
        .keepalives_interval(Duration::from_secs(1))
        .keepalives_retries(3);
    if config.get_tcp_user_timeout().is_none() {
        config.tcp_user_timeout(timeout.max(Duration::from_secs(1)));
    }
}

/// The statements sent on each new pooled connection: `statement_timeout` and
/// `idle_in_transaction_session_timeout` equal to `timeout`, each unless the URL's
/// `options` already sets it, and generic plans (below). Session settings rather than
/// startup options, which poolers (PgBouncer, Supabase's Supavisor) refuse; taskcast needs a
/// session connection anyway (the listener's `LISTEN`, the pool's prepared statements).
pub(super) fn session_settings(config: &tokio_postgres::Config, timeout: Duration) -> String {
    let given = config.get_options().unwrap_or_default();
    let ms = timeout.as_millis().max(1);
    let timeouts = ["statement_timeout", "idle_in_transaction_session_timeout"]
        .into_iter()
        .filter(|name| !given.contains(name))
        .map(|name| format!("SET {name} = {ms};"));
    // The push statement's plan does not depend on its arrays' contents, yet Postgres makes
    // a custom plan per execution whenever it guesses one is cheaper (always for the first
    // five): the push statement was re-planned on every commit, ~100 µs of Postgres CPU.
    // Only where the server has the setting (Postgres 12+) and nobody chose a value (the
    // role's or database's own setting, or the URL's, is kept).
    let plans = (!given.contains("plan_cache_mode")).then(|| {
        "SELECT set_config('plan_cache_mode', 'force_generic_plan', false) \
         WHERE current_setting('server_version_num')::int >= 120000 \
           AND current_setting('plan_cache_mode', true) = 'auto';"
            .to_string()
    });
    timeouts.chain(plans).collect()
}

pub(super) fn pool_error(e: PoolError) -> Error {
    match e {
        PoolError::Backend(pg) => Error::unavailable("the database", pg),
        other => Error::unavailable("the database", other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_settings_set_both_timeouts_unless_the_url_does() {
        let plain: tokio_postgres::Config = "host=db user=u".parse().expect("a valid URL");
        assert_eq!(
            session_settings(&plain, Duration::from_millis(1500)),
            "SET statement_timeout = 1500;SET idle_in_transaction_session_timeout = 1500;\
             SELECT set_config('plan_cache_mode', 'force_generic_plan', false) \
             WHERE current_setting('server_version_num')::int >= 120000 \
               AND current_setting('plan_cache_mode', true) = 'auto';"
        );
        let own: tokio_postgres::Config = "host=db options='-c statement_timeout=9000'"
            .parse()
            .expect("a valid URL");
        assert_eq!(
            session_settings(&own, Duration::from_millis(1500)),
            "SET idle_in_transaction_session_timeout = 1500;\
             SELECT set_config('plan_cache_mode', 'force_generic_plan', false) \
             WHERE current_setting('server_version_num')::int >= 120000 \
               AND current_setting('plan_cache_mode', true) = 'auto';"
        );
        let plans: tokio_postgres::Config = "host=db options='-c plan_cache_mode=auto'"
            .parse()
            .expect("a valid URL");
        assert!(!session_settings(&plans, Duration::from_millis(1500)).contains("plan_cache_mode"));
    }

    #[test]
    fn a_user_timeout_in_the_url_is_kept() {
        let mut config: tokio_postgres::Config =
            "host=db tcp_user_timeout=7".parse().expect("a valid URL");
        tune_socket(&mut config, Duration::from_millis(500));
        assert_eq!(config.get_tcp_user_timeout(), Some(&Duration::from_secs(7)));
        let mut plain: tokio_postgres::Config = "host=db".parse().expect("a valid URL");
        tune_socket(&mut plain, Duration::from_millis(500));
        assert_eq!(plain.get_tcp_user_timeout(), Some(&Duration::from_secs(1)));
    }
}
