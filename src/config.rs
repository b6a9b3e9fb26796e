//! Command line and environment: every setting is a flag with an env var and a default.
//!
//! `Cli` is what clap parses; [`Config`] is the validated result the server runs on.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::auth::jwks::{Jwks, JwksOptions};
use crate::auth::subscribe::SubscribeAuth;
use crate::auth::{MIN_KEY_CHARS, PushKey, Secret};
use crate::domain::StatusMap;
use crate::store::connect::{PgTarget, SslMode, Verification};
use crate::telemetry::LogFormat;
use crate::writer::WriteMode;

#[derive(Parser, Debug)]
#[command(
    name = "taskcast",
    version,
    about = "Real-time task progress: authenticated pushes, committed to Postgres, fanned out over WebSocket",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// `serve` options, accepted without the subcommand name since it is the default.
    #[command(flatten)]
    pub serve: ServeArgs,
}

impl Cli {
    /// The command line as users see it in `--help`: `taskcast --help` lists the commands
    /// (the `serve` flags are still accepted there), `taskcast serve --help` groups the
    /// server's flags under headings, and no help shows an environment variable's value or
    /// a default that depends on this machine.
    pub fn command_shown() -> clap::Command {
        use clap::CommandFactory;
        let machine_dependent = ["max_connections", "max_http_connections"];
        Cli::command()
            .mut_args(|arg| arg.hide(true))
            .after_help(
                "The server's settings: `taskcast serve --help` (they are accepted here too, \
                 since serve is the default).",
            )
            .mut_subcommands(move |command| {
                command.mut_args(move |arg| {
                    let id = arg.get_id().as_str().to_owned();
                    let arg = arg
                        .hide_env_values(true)
                        .hide_default_value(machine_dependent.contains(&id.as_str()));
                    match serve_heading(&id) {
                        Some(heading) => arg.help_heading(heading),
                        None => arg,
                    }
                })
            })
    }

    /// Parses the process's arguments with [`Cli::command_shown`]'s help (exits on an error
    /// or a help request, as `Cli::parse` does).
    pub fn parse_shown() -> Cli {
        use clap::FromArgMatches;
        let matches = Self::command_shown().get_matches();
        Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
    }
}

/// The heading a `serve` flag is listed under; `None` for flags of the other commands.
fn serve_heading(id: &str) -> Option<&'static str> {
    let heading = match id {
        "push_key"
        | "push_key_previous"
        | "subscribe_secret"
        | "supabase_jwt_secret"
        | "supabase_url"
        | "public_subscribe"
        | "token_ttl_secs"
        | "allowed_origins"
        | "app_url"
        | "public_url"
        | "metrics_token" => "Who may push and watch",
        "database_url" | "db_pool_size" | "db_timeout_ms" | "notify_channel" | "status_map"
        | "write_mode" | "max_batch" | "writer_queue" => "Database",
        "listen" | "demo" | "log_format" | "shutdown_timeout_secs" => "Server",
        _ if id.starts_with("max_") || id.ends_with("_secs") => "Limits and timeouts",
        _ => return None,
    };
    Some(heading)
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve the HTTP and WebSocket API (the default).
    Serve(Box<ServeArgs>),
    /// Apply schema.sql to DATABASE_URL in one transaction, and print what changed.
    Migrate(MigrateArgs),
    /// Check a deployment: env vars, push key strength, subscriber auth, database, schema,
    /// and unsafe functions. Exits non-zero when any check fails.
    Doctor(DoctorArgs),
    /// Mint a subscribe token for testing (signed with TASKCAST_SUBSCRIBE_SECRET).
    Token(TokenArgs),
}

#[derive(Args, Debug, Clone)]
pub struct DoctorArgs {
    /// Print the checks as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct TokenArgs {
    /// The task the token lets its holder watch (repeat for several).
    #[arg(long = "task", required = true)]
    pub tasks: Vec<String>,
    /// How long the token is valid: e.g. 90s, 30m, 1h, 7d.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub ttl: Duration,
    /// The signing secret.
    #[arg(long, env = "TASKCAST_SUBSCRIBE_SECRET", hide_env_values = true)]
    pub subscribe_secret: String,
    /// Also grant the right to cancel the tasks (the `"cancel": true` claim).
    #[arg(long)]
    pub cancel: bool,
}

/// Parses `90s`, `30m`, `1h`, `7d`, or plain seconds.
pub fn parse_duration(raw: &str) -> Result<Duration, String> {
    let raw = raw.trim();
    let split = raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len());
    let (number, unit) = raw.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{raw:?} is not a duration such as 90s, 30m, 1h or 7d"))?;
    let factor = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{raw:?}: the unit must be s, m, h or d")),
    };
    n.checked_mul(factor)
        .filter(|&secs| secs > 0)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{raw:?} must be a positive duration"))
}

#[derive(Args, Debug, Clone)]
pub struct MigrateArgs {
    /// Postgres connection string.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// The channel the notify trigger sends on; must match the servers' setting.
    #[arg(long, env = "TASKCAST_NOTIFY_CHANNEL", default_value = "taskcast")]
    pub notify_channel: String,
    /// The app's status words (as for `serve`), for the report on the table.
    #[arg(long, env = "TASKCAST_STATUS_MAP", default_value = "")]
    pub status_map: String,
}

/// The default of every numeric `serve` setting: one definition, read by the flags and by
/// [`Limits::default`].
pub mod defaults {
    pub const TOKEN_TTL_SECS: u64 = 3600;
    pub const MAX_BODY_BYTES: usize = 16 * 1024;
    pub const MAX_WS_MESSAGE_BYTES: usize = 4 * 1024;
    pub const MAX_SUBSCRIPTIONS: usize = 64;
    pub const HEADER_TIMEOUT_SECS: u64 = 10;
    pub const BODY_TIMEOUT_SECS: u64 = 30;
    pub const KEEP_ALIVE_TIMEOUT_SECS: u64 = 60;
    pub const MAX_HEADER_BYTES: usize = 32 * 1024;
    pub const MAX_SUBSCRIBES_PER_SEC: u32 = 20;
    pub const IDLE_TIMEOUT_SECS: u64 = 30;
    pub const MAX_BATCH: usize = 500;
    pub const WRITER_QUEUE: usize = 8192;
    pub const DB_POOL_SIZE: usize = 8;
    pub const DB_TIMEOUT_MS: u64 = 2_000;
    pub const PING_INTERVAL_SECS: u64 = 20;
    pub const PONG_TIMEOUT_SECS: u64 = 40;
    pub const SHUTDOWN_TIMEOUT_SECS: u64 = 10;
    pub const MAX_BATCH_BODY_BYTES: usize = 1024 * 1024;
    pub const MAX_BATCH_ITEMS: usize = 1000;
}

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "TASKCAST_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Postgres connection string. Unset: an in-memory store (nothing survives a restart).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// The push key. Unset: INTERNAL_API_KEY, API_SECRET_KEY, then `development-key` outside
    /// production (never any part of OPENAI_API_KEY: its prefix is public).
    #[arg(long, env = "TASK_PROCESS_SECRET_KEY", hide_env_values = true)]
    pub push_key: Option<String>,
    /// The previous push key, also accepted while set (rotation without downtime).
    #[arg(long, env = "TASK_PROCESS_SECRET_KEY_PREVIOUS", hide_env_values = true)]
    pub push_key_previous: Option<String>,
    /// Secret (32+ characters) that signs subscribe tokens (JWT HS256, claims task_id or
    /// task_ids, and exp). Unset outside production: a random per-process secret.
    #[arg(long, env = "TASKCAST_SUBSCRIBE_SECRET", hide_env_values = true)]
    pub subscribe_secret: Option<String>,
    /// Supabase's JWT secret: lets a signed-in user (role `authenticated`) watch the tasks
    /// whose image_tasks.user_id is their `sub`.
    #[arg(long, env = "SUPABASE_JWT_SECRET", hide_env_values = true)]
    pub supabase_jwt_secret: Option<String>,
    /// The Supabase project URL (https://<project-ref>.supabase.co): verifies the project's
    /// ES256/RS256 session tokens with the keys it publishes (its JWKS). https in production.
    #[arg(long, env = "SUPABASE_URL")]
    pub supabase_url: Option<String>,
    /// Development only: anyone may subscribe without a token. Refused in production.
    #[arg(
        long,
        env = "TASKCAST_PUBLIC_SUBSCRIBE",
        value_parser = clap::builder::BoolishValueParser::new(),
        default_value = "false",
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub public_subscribe: bool,
    /// Lifetime of the subscribe token returned by POST /api/tasks, in seconds.
    #[arg(long, env = "TASKCAST_TOKEN_TTL_SECS", default_value_t = defaults::TOKEN_TTL_SECS)]
    pub token_ttl_secs: u64,
    /// More browser origins allowed besides NEXT_PUBLIC_APP_URL's (comma-separated).
    #[arg(long, env = "TASKCAST_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,
    /// The app's public URL; its origin is the one browsers connect from.
    #[arg(long, env = "NEXT_PUBLIC_APP_URL")]
    pub app_url: Option<String>,
    /// taskcast's own public URL (e.g. https://progress.example.com), when browsers load
    /// pages from taskcast itself (the demo page); its origin is allowed.
    #[arg(long, env = "TASKCAST_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Largest accepted request body, in bytes.
    #[arg(long, env = "TASKCAST_MAX_BODY_BYTES", default_value_t = defaults::MAX_BODY_BYTES)]
    pub max_body_bytes: usize,
    /// Largest accepted WebSocket message from a client, in bytes.
    #[arg(long, env = "TASKCAST_MAX_WS_MESSAGE_BYTES", default_value_t = defaults::MAX_WS_MESSAGE_BYTES)]
    pub max_ws_message_bytes: usize,
    /// Tasks one WebSocket connection may subscribe to at once.
    #[arg(long, env = "TASKCAST_MAX_SUBSCRIPTIONS", default_value_t = defaults::MAX_SUBSCRIPTIONS)]
    pub max_subscriptions: usize,
    /// Open WebSocket connections and SSE streams the server accepts; more get 503.
    /// Default: the open-file limit less TASKCAST_MAX_HTTP_CONNECTIONS' default and 256.
    #[arg(long, env = "TASKCAST_MAX_CONNECTIONS", default_value_t = default_max_connections())]
    pub max_connections: usize,
    /// Open plain HTTP connections (not WebSocket or SSE). When full, the oldest one not in
    /// the middle of a request is closed; if all are mid-request, new ones get 503.
    /// Default: an eighth of the open-file limit, from 64 to 4,096.
    #[arg(long, env = "TASKCAST_MAX_HTTP_CONNECTIONS", default_value_t = default_max_http_connections())]
    pub max_http_connections: usize,
    /// Seconds a client has to send a whole request header (from connect, or from the
    /// first byte of a later request on a kept-alive connection).
    #[arg(long, env = "TASKCAST_HEADER_TIMEOUT_SECS", default_value_t = defaults::HEADER_TIMEOUT_SECS)]
    pub header_timeout_secs: u64,
    /// Seconds a client has to send a whole request body; slower gets 408.
    #[arg(long, env = "TASKCAST_BODY_TIMEOUT_SECS", default_value_t = defaults::BODY_TIMEOUT_SECS)]
    pub body_timeout_secs: u64,
    /// Seconds a kept-alive HTTP connection may wait for its next request.
    #[arg(long, env = "TASKCAST_KEEP_ALIVE_TIMEOUT_SECS", default_value_t = defaults::KEEP_ALIVE_TIMEOUT_SECS)]
    pub keep_alive_timeout_secs: u64,
    /// Largest request line plus headers, in bytes (at least 8192); more gets 431.
    #[arg(long, env = "TASKCAST_MAX_HEADER_BYTES", default_value_t = defaults::MAX_HEADER_BYTES)]
    pub max_header_bytes: usize,
    /// Subscribe messages one connection may send per second; more get an error.
    #[arg(long, env = "TASKCAST_MAX_SUBSCRIBES_PER_SEC", default_value_t = defaults::MAX_SUBSCRIBES_PER_SEC)]
    pub max_subscribes_per_sec: u32,
    /// Seconds a WebSocket connection may stay open without any subscription.
    #[arg(long, env = "TASKCAST_IDLE_TIMEOUT_SECS", default_value_t = defaults::IDLE_TIMEOUT_SECS)]
    pub idle_timeout_secs: u64,
    /// Most pushes committed in one statement.
    #[arg(long, env = "TASKCAST_MAX_BATCH", default_value_t = defaults::MAX_BATCH)]
    pub max_batch: usize,
    /// Pushes waiting for the writer; when full, pushes get 503 with Retry-After.
    #[arg(long, env = "TASKCAST_WRITER_QUEUE", default_value_t = defaults::WRITER_QUEUE)]
    pub writer_queue: usize,
    /// Postgres connections in the pool.
    #[arg(long, env = "TASKCAST_DB_POOL_SIZE", default_value_t = defaults::DB_POOL_SIZE)]
    pub db_pool_size: usize,
    /// How long to wait for a database connection before answering 503, in milliseconds.
    #[arg(long, env = "TASKCAST_DB_TIMEOUT_MS", default_value_t = defaults::DB_TIMEOUT_MS)]
    pub db_timeout_ms: u64,
    /// Seconds between WebSocket pings.
    #[arg(long, env = "TASKCAST_PING_INTERVAL_SECS", default_value_t = defaults::PING_INTERVAL_SECS)]
    pub ping_interval_secs: u64,
    /// Seconds without a pong after which a WebSocket connection is closed.
    #[arg(long, env = "TASKCAST_PONG_TIMEOUT_SECS", default_value_t = defaults::PONG_TIMEOUT_SECS)]
    pub pong_timeout_secs: u64,
    /// Bearer token that GET /metrics requires; unset: /metrics is open.
    #[arg(long, env = "TASKCAST_METRICS_TOKEN", hide_env_values = true)]
    pub metrics_token: Option<String>,
    /// Bound on each of the three phases of a graceful shutdown (requests in flight,
    /// sockets and streams, the writer's drain), in seconds.
    #[arg(long, env = "TASKCAST_SHUTDOWN_TIMEOUT_SECS", default_value_t = defaults::SHUTDOWN_TIMEOUT_SECS)]
    pub shutdown_timeout_secs: u64,
    /// Serve the demo page at / and its simulated generations (on by default with the
    /// in-memory store outside production; refused in production).
    #[arg(
        long,
        env = "TASKCAST_DEMO",
        value_parser = clap::builder::BoolishValueParser::new(),
        default_value = "false",
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub demo: bool,
    /// `group` commits pushes together; `naive` does one UPDATE per push (a benchmark
    /// baseline only).
    #[arg(long, env = "TASKCAST_WRITE_MODE", value_enum, default_value = "group")]
    pub write_mode: WriteMode,
    /// Largest accepted body of the batch endpoint POST /api/progress, in bytes.
    #[arg(long, env = "TASKCAST_MAX_BATCH_BODY_BYTES", default_value_t = defaults::MAX_BATCH_BODY_BYTES)]
    pub max_batch_body_bytes: usize,
    /// Most updates in one POST /api/progress.
    #[arg(long, env = "TASKCAST_MAX_BATCH_ITEMS", default_value_t = defaults::MAX_BATCH_ITEMS)]
    pub max_batch_items: usize,
    /// The Postgres NOTIFY channel nodes listen on (one per deployment, not per task).
    #[arg(long, env = "TASKCAST_NOTIFY_CHANNEL", default_value = "taskcast")]
    pub notify_channel: String,
    /// The app's status words, as word:status pairs (e.g.
    /// `queued:pending,running:processing,done:completed`). Read case-insensitively beside
    /// built-in aliases; pushes write the first word given for a status.
    #[arg(long, env = "TASKCAST_STATUS_MAP", default_value = "")]
    pub status_map: String,
    /// Seconds a generator has to stop after a subscriber's cancel request before the
    /// server marks the task cancelled itself. Unset or 0: never (the generator decides).
    #[arg(long, env = "TASKCAST_CANCEL_GRACE_SECS")]
    pub cancel_grace_secs: Option<u64>,
    /// Log format; filter with RUST_LOG (default `info`).
    #[arg(long, env = "TASKCAST_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

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
    pub db_pool_size: usize,
    pub db_timeout: Duration,
    pub ping_interval: Duration,
    pub pong_timeout: Duration,
}

/// File descriptors kept out of both connection caps: the database pool, the NOTIFY
/// listener, stdio, the runtime's own, and connections being told 503.
const RESERVED_FDS: usize = 256;

/// The process's soft open-file limit, if /proc says.
pub fn open_file_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .and_then(|line| line.split_whitespace().nth(3))
        .and_then(|soft| soft.parse::<usize>().ok())
}

/// An eighth of the open-file limit, from 64 to 4,096; 1,024 when it cannot be read.
pub fn default_max_http_connections() -> usize {
    open_file_limit().map_or(1024, |soft| (soft / 8).clamp(64, 4096))
}

/// The open-file limit less the HTTP cap and 256 reserved descriptors (at least 64), or
/// 10,000 when it cannot be read.
pub fn default_max_connections() -> usize {
    open_file_limit().map_or(10_000, |soft| {
        soft.saturating_sub(default_max_http_connections() + RESERVED_FDS)
            .max(64)
    })
}

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
            db_pool_size: defaults::DB_POOL_SIZE,
            db_timeout: Duration::from_millis(defaults::DB_TIMEOUT_MS),
            ping_interval: Duration::from_secs(defaults::PING_INTERVAL_SECS),
            pong_timeout: Duration::from_secs(defaults::PONG_TIMEOUT_SECS),
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
    pub write_mode: WriteMode,
    /// The app's status words (TASKCAST_STATUS_MAP).
    pub status_map: StatusMap,
    /// Serve the demo page and simulated generations (on by default with the in-memory
    /// store outside production).
    pub demo: bool,
    pub metrics_token: Option<Secret>,
    pub shutdown_timeout: Duration,
    pub limits: Limits,
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
            write_mode: WriteMode::Group,
            status_map: StatusMap::default(),
            demo: in_memory,
            metrics_token: None,
            shutdown_timeout: Duration::from_secs(10),
            limits: Limits::default(),
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
        if args.shutdown_timeout_secs == 0 {
            return Err("TASKCAST_SHUTDOWN_TIMEOUT_SECS must be at least 1".to_string());
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
                db_pool_size: args.db_pool_size,
                db_timeout: Duration::from_millis(args.db_timeout_ms),
                ping_interval: Duration::from_secs(args.ping_interval_secs),
                pong_timeout: Duration::from_secs(args.pong_timeout_secs),
            },
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

    #[test]
    fn help_is_short_at_the_top_grouped_for_serve_and_shows_no_values_of_this_machine() {
        let mut command = Cli::command_shown();
        command.build();
        let top = command.render_long_help().to_string();
        assert!(top.lines().count() < 30, "{top}");
        assert!(top.contains("taskcast serve --help"), "{top}");
        let serve = command
            .find_subcommand_mut("serve")
            .expect("serve")
            .render_long_help()
            .to_string();
        for heading in [
            "Server:",
            "Database:",
            "Who may push and watch:",
            "Limits and timeouts:",
        ] {
            assert!(serve.contains(heading), "{heading} missing:\n{serve}");
        }
        // `[env: NAME=value]` would show a value (or an empty `=]` when unset).
        assert!(
            !serve.contains("=]") && !serve.contains("[env: TASKCAST_LISTEN="),
            "{serve}"
        );
        for flag in ["--max-connections <", "--max-http-connections <"] {
            let block = serve.split(flag).nth(1).expect(flag);
            let block = block.split("\n\n      --").next().unwrap();
            assert!(
                !block.contains("[default:"),
                "{flag} shows a machine's number: {block}"
            );
        }
        // The serve flags are still accepted without the subcommand.
        let matches = Cli::command_shown()
            .try_get_matches_from(["taskcast", "--listen", "127.0.0.1:0"])
            .unwrap();
        let cli = <Cli as clap::FromArgMatches>::from_arg_matches(&matches).unwrap();
        assert_eq!(cli.serve.listen.to_string(), "127.0.0.1:0");
    }

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
    fn public_subscribe_accepts_the_usual_booleans() {
        for (value, expected) in [
            ("1", true),
            ("yes", true),
            ("TRUE", true),
            ("0", false),
            ("false", false),
        ] {
            let cli = Cli::try_parse_from(["taskcast", "--public-subscribe", value]).unwrap();
            assert_eq!(cli.serve.public_subscribe, expected, "for {value}");
        }
        let cli = Cli::try_parse_from(["taskcast", "--public-subscribe"]).unwrap();
        assert!(cli.serve.public_subscribe);
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
    fn serve_is_the_default_subcommand_and_flags_parse() {
        let cli = Cli::try_parse_from(["taskcast", "--listen", "127.0.0.1:0"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.serve.listen.port(), 0);
        let cli = Cli::try_parse_from(["taskcast", "serve", "--max-batch", "7"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Serve(a)) if a.max_batch == 7));
    }
}
