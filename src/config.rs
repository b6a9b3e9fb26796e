//! The validated configuration the server runs on: [`Config::from_args`] checks what
//! [`crate::cli`] parsed (bounds, production refusals, origins, the database URL) and turns
//! it into [`Config`] and its [`Limits`].

use std::net::SocketAddr;
use std::time::Duration;

use crate::auth::jwks::{Jwks, JwksOptions};
use crate::auth::subscribe::SubscribeAuth;
use crate::auth::{MIN_KEY_CHARS, PushKey, Secret};
use crate::cli::{
    ServeArgs, default_max_connections, default_max_http_connections, defaults, open_file_limit,
};
use crate::domain::StatusMap;
use crate::store::NotifyOwnPushes;
use crate::store::connect::{PgTarget, SslMode, Verification};
use crate::writer::WriteMode;

/// Bounds on everything a client can make the server hold.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_batch_body_bytes: usize,
    pub max_batch_items: usize,
    pub max_ws_message_bytes: usize,
    pub max_subscriptions: usize,
    pub max_connections: usize,
    /// Plain HTTP connections (not yet, or never, WebSocket or SSE).
    pub max_http_connections: usize,
    /// From connect (or a later request's first byte) to the end of its header.
    pub header_timeout: Duration,
    /// From the end of the header to the end of the body.
    pub body_timeout: Duration,
    /// Between the end of a response and the next request's first byte.
    pub keep_alive_timeout: Duration,
    /// Request line plus headers; also hyper's read buffer bound.
    pub max_header_bytes: usize,
    pub max_subscribes_per_sec: u32,
    pub idle_timeout: Duration,
    pub max_batch: usize,
    pub writer_queue: usize,
    /// Least time between the starts of two commits (`TASKCAST_COMMIT_INTERVAL_MS`).
    pub commit_interval: Duration,
    pub db_pool_size: usize,
    pub db_timeout: Duration,
    pub ping_interval: Duration,
    pub pong_timeout: Duration,
    /// Finished tasks in a feed's snapshot (`TASKCAST_FEED_RECENT`).
    pub feed_recent: usize,
}

/// The longest commit interval accepted: each push may wait this long for its commit.
const MAX_COMMIT_INTERVAL_MS: u64 = 100;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: defaults::MAX_BODY_BYTES,
            max_batch_body_bytes: defaults::MAX_BATCH_BODY_BYTES,
            max_batch_items: defaults::MAX_BATCH_ITEMS,
            max_ws_message_bytes: defaults::MAX_WS_MESSAGE_BYTES,
            max_subscriptions: defaults::MAX_SUBSCRIPTIONS,
            max_connections: default_max_connections(),
            max_http_connections: default_max_http_connections(),
            header_timeout: Duration::from_secs(defaults::HEADER_TIMEOUT_SECS),
            body_timeout: Duration::from_secs(defaults::BODY_TIMEOUT_SECS),
            keep_alive_timeout: Duration::from_secs(defaults::KEEP_ALIVE_TIMEOUT_SECS),
            max_header_bytes: defaults::MAX_HEADER_BYTES,
            max_subscribes_per_sec: defaults::MAX_SUBSCRIBES_PER_SEC,
            idle_timeout: Duration::from_secs(defaults::IDLE_TIMEOUT_SECS),
            max_batch: defaults::MAX_BATCH,
            writer_queue: defaults::WRITER_QUEUE,
            commit_interval: Duration::from_millis(defaults::COMMIT_INTERVAL_MS),
            db_pool_size: defaults::DB_POOL_SIZE,
            db_timeout: Duration::from_millis(defaults::DB_TIMEOUT_MS),
            ping_interval: Duration::from_secs(defaults::PING_INTERVAL_SECS),
            pong_timeout: Duration::from_secs(defaults::PONG_TIMEOUT_SECS),
            feed_recent: defaults::FEED_RECENT,
        }
    }
}

/// The validated configuration the server runs on.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    /// `None` selects the in-memory store.
    pub database_url: Option<Secret>,
    pub push_key: PushKey,
    pub subscribe: SubscribeAuth,
    /// Lifetime of the token `POST /api/tasks` returns.
    pub token_ttl: Duration,
    /// Browser origins (`scheme://host[:port]`) allowed: NEXT_PUBLIC_APP_URL's,
    /// TASKCAST_PUBLIC_URL's and TASKCAST_ALLOWED_ORIGINS.
    pub allowed_origins: Vec<String>,
    /// Also allow loopback origins (localhost, 127.0.0.0/8, [::1]): outside production.
    pub allow_loopback_origins: bool,
    /// The NOTIFY channel the listener follows (Postgres only).
    pub notify_channel: String,
    /// When this node's pushes send the NOTIFY (TASKCAST_NOTIFY_OWN_PUSHES).
    pub notify_own_pushes: NotifyOwnPushes,
    pub write_mode: WriteMode,
    /// The app's status words (TASKCAST_STATUS_MAP).
    pub status_map: StatusMap,
    /// Serve the demo page and simulated generations (on by default with the in-memory
    /// store outside production).
    pub demo: bool,
    pub metrics_token: Option<Secret>,
    pub shutdown_timeout: Duration,
    pub limits: Limits,
    /// When processing tasks are marked stalled or failed (TASKCAST_STALL_SECS,
    /// TASKCAST_STALL_FAIL_SECS).
    pub stall: crate::stall::StallOptions,
    /// How places in line are recounted.
    pub queue: crate::queue::QueueOptions,
    /// After a cancel request, how long the generator has before the server marks the
    /// task cancelled; `None` (the default): never.
    pub cancel_grace: Option<Duration>,
}

impl Config {
    /// A config with default limits and a random subscribe secret, for embedding and tests.
    pub fn new(listen: SocketAddr, database_url: Option<String>, push_key: PushKey) -> Self {
        let in_memory = database_url.is_none();
        Config {
            listen,
            database_url: database_url.map(Secret::new),
            push_key,
            subscribe: SubscribeAuth::new(Some(random_secret()), None, false),
            token_ttl: Duration::from_secs(3600),
            allowed_origins: Vec::new(),
            allow_loopback_origins: true,
            notify_channel: crate::store::schema::DEFAULT_CHANNEL.to_string(),
            notify_own_pushes: NotifyOwnPushes::Auto,
            write_mode: WriteMode::Group,
            status_map: StatusMap::default(),
            demo: in_memory,
            metrics_token: None,
            shutdown_timeout: Duration::from_secs(10),
            limits: Limits::default(),
            stall: crate::stall::StallOptions::default(),
            queue: crate::queue::QueueOptions::default(),
            cancel_grace: None,
        }
    }

    /// Validates parsed arguments; `env` reads the fallback key variables and NODE_ENV/APP_ENV.
    /// In production (NODE_ENV or APP_ENV is `production`) unsafe settings are refused with
    /// a message that says what to set; in development they are loud warnings.
    pub fn from_args(
        args: ServeArgs,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, String> {
        let production = is_production(&env);
        let push_key = PushKey::resolve(args.push_key, args.push_key_previous, &env, production)?;
        report_push_key(&push_key);
        let subscribe = subscribe_auth(
            args.subscribe_secret,
            args.supabase_jwt_secret,
            supabase_jwks(args.supabase_url, production)?,
            args.public_subscribe,
            production,
        )?;
        let mut allowed_origins = Vec::new();
        for (name, url) in [
            ("NEXT_PUBLIC_APP_URL", &args.app_url),
            ("TASKCAST_PUBLIC_URL", &args.public_url),
        ] {
            if let Some(url) = url.as_deref().filter(|u| !u.trim().is_empty()) {
                allowed_origins.push(parse_origin(name, url)?);
            }
        }
        for origin in args.allowed_origins.iter().filter(|o| !o.trim().is_empty()) {
            allowed_origins.push(parse_origin("TASKCAST_ALLOWED_ORIGINS", origin)?);
        }
        for (name, value) in [
            ("TASKCAST_MAX_BODY_BYTES", args.max_body_bytes),
            ("TASKCAST_MAX_BATCH_BODY_BYTES", args.max_batch_body_bytes),
            ("TASKCAST_MAX_BATCH_ITEMS", args.max_batch_items),
            ("TASKCAST_MAX_WS_MESSAGE_BYTES", args.max_ws_message_bytes),
            ("TASKCAST_MAX_SUBSCRIPTIONS", args.max_subscriptions),
            ("TASKCAST_MAX_CONNECTIONS", args.max_connections),
            ("TASKCAST_MAX_HTTP_CONNECTIONS", args.max_http_connections),
            (
                "TASKCAST_HEADER_TIMEOUT_SECS",
                args.header_timeout_secs as usize,
            ),
            (
                "TASKCAST_BODY_TIMEOUT_SECS",
                args.body_timeout_secs as usize,
            ),
            (
                "TASKCAST_KEEP_ALIVE_TIMEOUT_SECS",
                args.keep_alive_timeout_secs as usize,
            ),
            (
                "TASKCAST_MAX_SUBSCRIBES_PER_SEC",
                args.max_subscribes_per_sec as usize,
            ),
            ("TASKCAST_MAX_BATCH", args.max_batch),
            ("TASKCAST_WRITER_QUEUE", args.writer_queue),
            ("TASKCAST_DB_POOL_SIZE", args.db_pool_size),
            ("TASKCAST_TOKEN_TTL_SECS", args.token_ttl_secs as usize),
            ("TASKCAST_DB_TIMEOUT_MS", args.db_timeout_ms as usize),
            ("TASKCAST_STALL_SECS", args.stall_secs as usize),
            (
                "TASKCAST_STALL_FAIL_SECS",
                args.stall_fail_secs.unwrap_or(1) as usize,
            ),
            (
                "TASKCAST_IDLE_TIMEOUT_SECS",
                args.idle_timeout_secs as usize,
            ),
        ] {
            if value == 0 {
                return Err(format!("{name} must be at least 1"));
            }
        }
        if args.max_header_bytes < 8192 {
            // hyper's smallest read buffer; it panics below it.
            return Err("TASKCAST_MAX_HEADER_BYTES must be at least 8192".to_string());
        }
        warn_if_over_file_limit(
            args.max_connections + args.max_http_connections + args.db_pool_size,
        );
        if args.max_ws_message_bytes < 256 {
            return Err("TASKCAST_MAX_WS_MESSAGE_BYTES must be at least 256".to_string());
        }
        if args.pong_timeout_secs <= args.ping_interval_secs || args.ping_interval_secs == 0 {
            return Err(
                "TASKCAST_PONG_TIMEOUT_SECS must be larger than TASKCAST_PING_INTERVAL_SECS, \
                 which must be at least 1"
                    .to_string(),
            );
        }
        crate::store::schema::validate_channel(&args.notify_channel).map_err(|e| e.to_string())?;
        if production && args.demo {
            return Err(
                "refusing to start in production with --demo (TASKCAST_DEMO): it lets \
                        anyone create tasks without the push key"
                    .to_string(),
            );
        }
        if args.feed_recent > crate::subscribers::FEED_MAX_RECENT {
            return Err(format!(
                "TASKCAST_FEED_RECENT must be at most {} (it bounds a feed's snapshot), got {}",
                crate::subscribers::FEED_MAX_RECENT,
                args.feed_recent
            ));
        }
        if args.shutdown_timeout_secs == 0 {
            return Err("TASKCAST_SHUTDOWN_TIMEOUT_SECS must be at least 1".to_string());
        }
        if args.commit_interval_ms.saturating_mul(2) > args.db_timeout_ms {
            return Err(format!(
                "TASKCAST_COMMIT_INTERVAL_MS ({}) must be at most half of TASKCAST_DB_TIMEOUT_MS \
                 ({}): a push may wait one interval for its commit, and the commit needs the \
                 rest of the timeout",
                args.commit_interval_ms, args.db_timeout_ms
            ));
        }
        if args.commit_interval_ms > MAX_COMMIT_INTERVAL_MS {
            return Err(format!(
                "TASKCAST_COMMIT_INTERVAL_MS must be at most {MAX_COMMIT_INTERVAL_MS} (it may \
                 delay each push by that much), got {}",
                args.commit_interval_ms
            ));
        }
        let status_map = StatusMap::parse(&args.status_map)?;
        let database_url = args.database_url.filter(|url| !url.trim().is_empty());
        if let Some(url) = &database_url {
            let target = PgTarget::parse(url).map_err(|e| e.to_string())?;
            if production {
                warn_unverified_database(&target);
            }
        }
        let in_memory = database_url.is_none();
        Ok(Config {
            listen: args.listen,
            database_url: database_url.map(|url| Secret::new(url.trim())),
            push_key,
            subscribe,
            token_ttl: Duration::from_secs(args.token_ttl_secs),
            allowed_origins,
            allow_loopback_origins: !production,
            notify_channel: args.notify_channel,
            notify_own_pushes: args.notify_own_pushes,
            write_mode: args.write_mode,
            status_map,
            // The in-memory store is the "try it" mode: it shows the demo, except in
            // production, where the demo (task creation without a key) is refused.
            demo: args.demo || (in_memory && !production),
            metrics_token: args
                .metrics_token
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
                .map(Secret::new),
            shutdown_timeout: Duration::from_secs(args.shutdown_timeout_secs),
            cancel_grace: args
                .cancel_grace_secs
                .filter(|&secs| secs > 0)
                .map(Duration::from_secs),
            limits: Limits {
                max_body_bytes: args.max_body_bytes,
                max_batch_body_bytes: args.max_batch_body_bytes,
                max_batch_items: args.max_batch_items,
                max_ws_message_bytes: args.max_ws_message_bytes,
                max_subscriptions: args.max_subscriptions,
                max_connections: args.max_connections,
                max_http_connections: args.max_http_connections,
                header_timeout: Duration::from_secs(args.header_timeout_secs),
                body_timeout: Duration::from_secs(args.body_timeout_secs),
                keep_alive_timeout: Duration::from_secs(args.keep_alive_timeout_secs),
                max_header_bytes: args.max_header_bytes,
                max_subscribes_per_sec: args.max_subscribes_per_sec,
                idle_timeout: Duration::from_secs(args.idle_timeout_secs),
                max_batch: args.max_batch,
                writer_queue: args.writer_queue,
                commit_interval: Duration::from_millis(args.commit_interval_ms),
                db_pool_size: args.db_pool_size,
                db_timeout: Duration::from_millis(args.db_timeout_ms),
                ping_interval: Duration::from_secs(args.ping_interval_secs),
                pong_timeout: Duration::from_secs(args.pong_timeout_secs),
                feed_recent: args.feed_recent,
            },
            stall: crate::stall::StallOptions {
                after: Duration::from_secs(args.stall_secs),
                fail_after: args.stall_fail_secs.map(Duration::from_secs),
            },
            queue: crate::queue::QueueOptions::default(),
        })
    }
}

/// Both connection caps and the pool must fit under the open-file limit, or the accept
/// loop runs out of descriptors before the caps can protect anything.
fn warn_if_over_file_limit(descriptors: usize) {
    let Some(limit) = open_file_limit() else {
        return;
    };
    let needed = descriptors + 64;
    if needed > limit {
        tracing::warn!(
            open_file_limit = limit,
            needed,
            "TASKCAST_MAX_CONNECTIONS + TASKCAST_MAX_HTTP_CONNECTIONS + TASKCAST_DB_POOL_SIZE \
             exceed the open-file limit: raise it (LimitNOFILE, ulimit -n) or lower the caps"
        );
    }
}

/// In production, a database on another machine reached without a verified certificate is
/// a loud warning, not a refusal: a private network or a TLS sidecar can make it safe, and
/// refusing would stop running deployments on upgrade. `taskcast doctor` says the same.
fn warn_unverified_database(target: &PgTarget) {
    if target.is_local() || target.verification == Verification::Full {
        return;
    }
    let mode = target.mode.as_str();
    match target.mode {
        SslMode::Disable | SslMode::Allow | SslMode::Prefer => tracing::warn!(
            "DATABASE_URL reaches a database on another machine without requiring TLS \
            (sslmode={mode}): pushes, tasks and the database password may cross the network \
            in the clear. Add sslmode=verify-full&sslrootcert=/path/to/ca.crt"
        ),
        _ => tracing::warn!(
            "DATABASE_URL uses TLS but does not verify the server's host name (sslmode={mode}): \
            a machine in the middle could pose as the database. Use sslmode=verify-full with \
            sslrootcert"
        ),
    }
}

/// Says where the push key came from and what is wrong with it; never the key itself.
fn report_push_key(key: &PushKey) {
    tracing::info!(
        source = key.source().describe(),
        previous_key_accepted = key.has_previous(),
        "push key loaded"
    );
    if key.was_trimmed() {
        tracing::warn!(
            source = key.source().describe(),
            "the push key had surrounding whitespace or a newline; it was trimmed. Fix the \
             value where it is set: a generator reading it untrimmed may fail to send it (HTTP \
             clients refuse a header value with a newline)"
        );
    }
    if let Some(weakness) = key.weakness() {
        tracing::warn!(
            "INSECURE PUSH KEY: it {weakness}. This is refused in production; set \
             TASK_PROCESS_SECRET_KEY to at least {MIN_KEY_CHARS} random characters \
             (`openssl rand -hex 16`)"
        );
    }
}

/// The JWKS cache for `SUPABASE_URL`, if set: an origin, https in production (the keys
/// decide who may watch, so they must not be fetched in the clear).
fn supabase_jwks(url: Option<String>, production: bool) -> Result<Option<Jwks>, String> {
    let Some(url) = url.filter(|u| !u.trim().is_empty()) else {
        return Ok(None);
    };
    let origin = parse_origin("SUPABASE_URL", &url)?;
    if production && !origin.starts_with("https://") {
        return Err(format!(
            "refusing to start in production with SUPABASE_URL={origin}: the signing keys \
             must be fetched over https (https://<project-ref>.supabase.co)"
        ));
    }
    tracing::info!(supabase_url = %origin, "Supabase sessions verified with the project's JWKS");
    Ok(Some(Jwks::new(&origin, JwksOptions::default())))
}

fn subscribe_auth(
    secret: Option<String>,
    supabase: Option<String>,
    jwks: Option<Jwks>,
    public: bool,
    production: bool,
) -> Result<SubscribeAuth, String> {
    let non_blank = |v: Option<String>| v.map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
    let secret = non_blank(secret);
    let supabase = non_blank(supabase);
    if production {
        if public {
            return Err("refusing to start in production with --public-subscribe \
                        (TASKCAST_PUBLIC_SUBSCRIBE): anyone could watch any task. Unset it and \
                        set TASKCAST_SUBSCRIBE_SECRET"
                .to_string());
        }
        if secret.is_none() && supabase.is_none() && jwks.is_none() {
            return Err(
                "refusing to start in production without subscriber auth: set \
                        TASKCAST_SUBSCRIBE_SECRET (e.g. `openssl rand -hex 32`) and/or \
                        SUPABASE_URL or SUPABASE_JWT_SECRET"
                    .to_string(),
            );
        }
        if secret
            .as_ref()
            .is_some_and(|s| s.chars().count() < MIN_KEY_CHARS)
        {
            return Err(format!(
                "refusing to start in production: TASKCAST_SUBSCRIBE_SECRET is shorter than \
                 {MIN_KEY_CHARS} characters (e.g. `openssl rand -hex 32`)"
            ));
        }
    }
    if public {
        tracing::warn!(
            "--public-subscribe is on: ANYONE who knows a task id can watch it (development only)"
        );
    }
    let tokens = match secret {
        Some(s) => Some(Secret::new(s)),
        // Supabase sessions only: no tokens are minted, rather than tokens that would stop
        // working on restart and on every other node.
        None if production => None,
        None => {
            tracing::warn!(
                "TASKCAST_SUBSCRIBE_SECRET is not set: using a random secret for this process \
                 (development only); tokens from POST /api/tasks stop working on restart"
            );
            Some(random_secret())
        }
    };
    tracing::info!(
        supabase_sessions = supabase.is_some() || jwks.is_some(),
        public = public,
        subscribe_tokens = tokens.is_some(),
        "subscriber auth"
    );
    let auth = SubscribeAuth::new(tokens, supabase.map(Secret::new), public);
    Ok(match jwks {
        Some(jwks) => auth.with_jwks(jwks),
        None => auth,
    })
}

fn random_secret() -> Secret {
    Secret::new(format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    ))
}

/// Production is `NODE_ENV=production` or `APP_ENV=production` (case-insensitive).
pub fn is_production(env: impl Fn(&str) -> Option<String>) -> bool {
    ["NODE_ENV", "APP_ENV"]
        .iter()
        .any(|var| env(var).is_some_and(|v| v.trim().eq_ignore_ascii_case("production")))
}

/// Reduces a URL to its origin, rejecting anything that is not http(s)://host[:port]; the
/// origin is normalized as [`crate::origin::normalize`] does (no default port).
/// `name` is the setting it came from, for the error message.
pub fn parse_origin(name: &str, url: &str) -> Result<String, String> {
    let url = url.trim().trim_end_matches('/');
    let bad =
        || format!("{name} must be an http(s) URL such as https://app.example.com, got {url:?}");
    let (scheme, rest) = url.split_once("://").ok_or_else(bad)?;
    let scheme = scheme.to_ascii_lowercase();
    if scheme != "http" && scheme != "https" {
        return Err(bad());
    }
    let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let valid_char = |c: char| c.is_ascii_alphanumeric() || "-.:[]".contains(c);
    if host.is_empty() || host.contains('@') || !host.chars().all(valid_char) {
        return Err(bad());
    }
    crate::origin::normalize(&format!("{scheme}://{host}")).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Cli;
    use clap::Parser;

    #[test]
    fn origin_keeps_scheme_host_and_port_only() {
        assert_eq!(
            parse_origin("X", "https://App.example.com:8443/path?q=1").unwrap(),
            "https://app.example.com:8443"
        );
        assert_eq!(
            parse_origin("X", "https://app.example.com:443/").unwrap(),
            "https://app.example.com",
            "the default port is dropped"
        );
        assert!(parse_origin("X", "app.example.com").is_err());
        assert!(parse_origin("X", "ftp://x").is_err());
        assert!(parse_origin("X", "https://user@host").is_err());
    }

    #[test]
    fn public_url_is_an_allowed_origin_and_loopback_only_outside_production() {
        let cli = Cli::try_parse_from([
            "taskcast",
            "--public-url",
            "https://progress.example.com:443/demo",
            "--subscribe-secret",
            &"s".repeat(40),
            "--push-key",
            &"k".repeat(40),
        ])
        .unwrap();
        let development = Config::from_args(cli.serve.clone(), |_| None).unwrap();
        assert_eq!(
            development.allowed_origins,
            vec!["https://progress.example.com".to_string()]
        );
        assert!(development.allow_loopback_origins);
        let production = Config::from_args(cli.serve, |k| {
            (k == "NODE_ENV").then(|| "production".into())
        })
        .unwrap();
        assert!(!production.allow_loopback_origins);
    }

    #[test]
    fn production_is_read_from_node_env_or_app_env() {
        assert!(is_production(
            |k: &str| (k == "APP_ENV").then(|| "Production".into())
        ));
        assert!(!is_production(
            |k: &str| (k == "NODE_ENV").then(|| "development".into())
        ));
    }

    #[test]
    fn http_limits_parse_and_a_header_bound_below_hypers_minimum_is_refused() {
        let parse = |args: &[&str]| {
            let cli = Cli::try_parse_from([&["taskcast"], args].concat()).unwrap();
            Config::from_args(cli.serve, |_| None)
        };
        let config = parse(&[
            "--header-timeout-secs",
            "5",
            "--body-timeout-secs",
            "20",
            "--keep-alive-timeout-secs",
            "90",
            "--max-http-connections",
            "100",
            "--max-header-bytes",
            "16384",
        ])
        .unwrap();
        assert_eq!(config.limits.header_timeout, Duration::from_secs(5));
        assert_eq!(config.limits.body_timeout, Duration::from_secs(20));
        assert_eq!(config.limits.keep_alive_timeout, Duration::from_secs(90));
        assert_eq!(config.limits.max_http_connections, 100);
        assert_eq!(config.limits.max_header_bytes, 16384);
        let refused = parse(&["--max-header-bytes", "4096"]).unwrap_err();
        assert!(refused.contains("TASKCAST_MAX_HEADER_BYTES"), "{refused}");
        let refused = parse(&["--header-timeout-secs", "0"]).unwrap_err();
        assert!(
            refused.contains("TASKCAST_HEADER_TIMEOUT_SECS"),
            "{refused}"
        );
    }

    #[test]
    fn a_commit_interval_over_half_the_database_timeout_is_refused() {
        let parse = |args: &[&str]| {
            let cli = Cli::try_parse_from([&["taskcast"], args].concat()).unwrap();
            Config::from_args(cli.serve, |_| None)
        };
        let config = parse(&["--commit-interval-ms", "5"]).unwrap();
        assert_eq!(config.limits.commit_interval, Duration::from_millis(5));
        let error = parse(&["--commit-interval-ms", "60", "--db-timeout-ms", "100"]).unwrap_err();
        assert!(
            error.contains("at most half of TASKCAST_DB_TIMEOUT_MS"),
            "{error}"
        );
        let error = parse(&["--commit-interval-ms", "101", "--db-timeout-ms", "5000"]).unwrap_err();
        assert!(error.contains("at most 100"), "{error}");
        assert!(parse(&["--commit-interval-ms", "0"]).is_ok());
    }
}
