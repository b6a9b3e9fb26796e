//! The command line: every setting is a flag with an env var and a default, grouped for
//! `--help`. What clap parses here is turned into the validated [`crate::config::Config`]
//! by `Config::from_args`; nothing here checks values against each other.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

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
        "database_url" | "db_pool_size" | "db_timeout_ms" | "notify_channel"
        | "notify_own_pushes" | "status_map" | "write_mode" | "max_batch" | "writer_queue" => {
            "Database"
        }
        "listen" | "demo" | "log_format" | "shutdown_timeout_secs" => "Server",
        _ if id.starts_with("max_") || id.ends_with("_secs") || id == "feed_recent" => {
            "Limits and timeouts"
        }
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
    #[arg(
        long = "task",
        required_unless_present = "user",
        conflicts_with = "user"
    )]
    pub tasks: Vec<String>,
    /// Instead of tasks: the user (a UUID) whose feed `user:<id>` the token lets its
    /// holder watch (claim `user_id`).
    #[arg(long)]
    pub user: Option<uuid::Uuid>,
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
    pub const FEED_RECENT: usize = 20;
    pub const HEADER_TIMEOUT_SECS: u64 = 10;
    pub const BODY_TIMEOUT_SECS: u64 = 30;
    pub const KEEP_ALIVE_TIMEOUT_SECS: u64 = 60;
    pub const MAX_HEADER_BYTES: usize = 32 * 1024;
    pub const MAX_SUBSCRIBES_PER_SEC: u32 = 20;
    pub const IDLE_TIMEOUT_SECS: u64 = 30;
    pub const MAX_BATCH: usize = 500;
    pub const WRITER_QUEUE: usize = 8192;
    pub const COMMIT_INTERVAL_MS: u64 = 2;
    pub const DB_POOL_SIZE: usize = 8;
    pub const DB_TIMEOUT_MS: u64 = 2_000;
    pub const PING_INTERVAL_SECS: u64 = 20;
    pub const PONG_TIMEOUT_SECS: u64 = 40;
    pub const SHUTDOWN_TIMEOUT_SECS: u64 = 10;
    pub const MAX_BATCH_BODY_BYTES: usize = 1024 * 1024;
    pub const MAX_BATCH_ITEMS: usize = 1000;
    pub const STALL_SECS: u64 = 60;
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
    /// Finished tasks in the snapshot of a user's feed (`user:<id>`), newest first, after
    /// its unfinished ones (at most 200 of those); 0 to 200.
    #[arg(long, env = "TASKCAST_FEED_RECENT", default_value_t = defaults::FEED_RECENT)]
    pub feed_recent: usize,
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
    /// Least time between the starts of two commits, in milliseconds (0 to 100; 0: commit
    /// as soon as the last one ends). Under load the pushes of one interval share a commit;
    /// a push after a quiet spell is committed at once.
    #[arg(long, env = "TASKCAST_COMMIT_INTERVAL_MS", default_value_t = defaults::COMMIT_INTERVAL_MS)]
    pub commit_interval_ms: u64,
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
    /// When this node's pushes send the NOTIFY: `auto` only while another taskcast node
    /// listens on the database (alone, the node publishes its own pushes and nobody else
    /// needs them); `always` for a program of your own that LISTENs on the channel.
    #[arg(
        long,
        env = "TASKCAST_NOTIFY_OWN_PUSHES",
        value_enum,
        default_value = "auto"
    )]
    pub notify_own_pushes: crate::store::NotifyOwnPushes,
    /// The app's status words, as word:status pairs (e.g.
    /// `queued:pending,running:processing,done:completed`). Read case-insensitively beside
    /// built-in aliases; pushes write the first word given for a status.
    #[arg(long, env = "TASKCAST_STATUS_MAP", default_value = "")]
    pub status_map: String,
    /// Seconds without a change after which a processing task is marked stalled.
    #[arg(long, env = "TASKCAST_STALL_SECS", default_value_t = defaults::STALL_SECS)]
    pub stall_secs: u64,
    /// Seconds without a change after which a processing task becomes failed ("the
    /// generator stopped reporting"). Unset: stalled tasks are only marked.
    #[arg(long, env = "TASKCAST_STALL_FAIL_SECS")]
    pub stall_fail_secs: Option<u64>,
    /// Seconds a generator has to stop after a subscriber's cancel request before the
    /// server marks the task cancelled itself. Unset or 0: never (the generator decides).
    #[arg(long, env = "TASKCAST_CANCEL_GRACE_SECS")]
    pub cancel_grace_secs: Option<u64>,
    /// Log format; filter with RUST_LOG (default `info`).
    #[arg(long, env = "TASKCAST_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
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
    fn serve_is_the_default_subcommand_and_flags_parse() {
        let cli = Cli::try_parse_from(["taskcast", "--listen", "127.0.0.1:0"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.serve.listen.port(), 0);
        let cli = Cli::try_parse_from(["taskcast", "serve", "--max-batch", "7"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Serve(a)) if a.max_batch == 7));
    }
}
