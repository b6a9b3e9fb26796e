//! Command line and environment: every setting is a flag with an env var and a default.
//!
//! `Cli` is what clap parses; [`Config`] is the validated result the server runs on.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::auth::{PushKey, Secret};

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

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve the HTTP and WebSocket API (the default).
    Serve(ServeArgs),
    /// Apply schema.sql to DATABASE_URL in one transaction, and print what changed.
    Migrate(MigrateArgs),
}

#[derive(Args, Debug, Clone)]
pub struct MigrateArgs {
    /// Postgres connection string.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "TASKCAST_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Postgres connection string. Unset: an in-memory store (nothing survives a restart).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// The push key. Unset: INTERNAL_API_KEY, API_SECRET_KEY, OPENAI_API_KEY's first 8
    /// characters, then `development-key` outside production.
    #[arg(long, env = "TASK_PROCESS_SECRET_KEY", hide_env_values = true)]
    pub push_key: Option<String>,
    /// The app's public URL; its origin is the one browsers connect from.
    #[arg(long, env = "NEXT_PUBLIC_APP_URL")]
    pub app_url: Option<String>,
    /// Largest accepted request body, in bytes.
    #[arg(long, env = "TASKCAST_MAX_BODY_BYTES", default_value_t = 16 * 1024)]
    pub max_body_bytes: usize,
    /// Largest accepted WebSocket message from a client, in bytes.
    #[arg(long, env = "TASKCAST_MAX_WS_MESSAGE_BYTES", default_value_t = 4 * 1024)]
    pub max_ws_message_bytes: usize,
    /// Tasks one WebSocket connection may subscribe to at once.
    #[arg(long, env = "TASKCAST_MAX_SUBSCRIPTIONS", default_value_t = 64)]
    pub max_subscriptions: usize,
    /// Open WebSocket connections the server accepts; more get 503.
    #[arg(long, env = "TASKCAST_MAX_CONNECTIONS", default_value_t = 16_000)]
    pub max_connections: usize,
    /// Most pushes committed in one statement.
    #[arg(long, env = "TASKCAST_MAX_BATCH", default_value_t = 500)]
    pub max_batch: usize,
    /// Pushes waiting for the writer; when full, pushes get 503 with Retry-After.
    #[arg(long, env = "TASKCAST_WRITER_QUEUE", default_value_t = 8192)]
    pub writer_queue: usize,
    /// Postgres connections in the pool.
    #[arg(long, env = "TASKCAST_DB_POOL_SIZE", default_value_t = 8)]
    pub db_pool_size: usize,
    /// How long to wait for a database connection before answering 503, in milliseconds.
    #[arg(long, env = "TASKCAST_DB_TIMEOUT_MS", default_value_t = 2_000)]
    pub db_timeout_ms: u64,
    /// Seconds between WebSocket pings.
    #[arg(long, env = "TASKCAST_PING_INTERVAL_SECS", default_value_t = 20)]
    pub ping_interval_secs: u64,
    /// Seconds without a pong after which a WebSocket connection is closed.
    #[arg(long, env = "TASKCAST_PONG_TIMEOUT_SECS", default_value_t = 40)]
    pub pong_timeout_secs: u64,
    /// Log format; filter with RUST_LOG (default `info`).
    #[arg(long, env = "TASKCAST_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

/// Bounds on everything a client can make the server hold.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_ws_message_bytes: usize,
    pub max_subscriptions: usize,
    pub max_connections: usize,
    pub max_batch: usize,
    pub writer_queue: usize,
    pub db_pool_size: usize,
    pub db_timeout: Duration,
    pub ping_interval: Duration,
    pub pong_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 16 * 1024,
            max_ws_message_bytes: 4 * 1024,
            max_subscriptions: 64,
            max_connections: 16_000,
            max_batch: 500,
            writer_queue: 8192,
            db_pool_size: 8,
            db_timeout: Duration::from_secs(2),
            ping_interval: Duration::from_secs(20),
            pong_timeout: Duration::from_secs(40),
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
    /// The origin (`scheme://host[:port]`) of NEXT_PUBLIC_APP_URL.
    pub app_origin: Option<String>,
    pub limits: Limits,
}

impl Config {
    /// A config with default limits, for embedding and tests.
    pub fn new(listen: SocketAddr, database_url: Option<String>, push_key: PushKey) -> Self {
        Config {
            listen,
            database_url: database_url.map(Secret::new),
            push_key,
            app_origin: None,
            limits: Limits::default(),
        }
    }

    /// Validates parsed arguments; `env` reads the fallback key variables and NODE_ENV/APP_ENV.
    pub fn from_args(
        args: ServeArgs,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, String> {
        let production = is_production(&env);
        let push_key = PushKey::resolve(args.push_key, &env, production)?;
        let app_origin = args.app_url.as_deref().map(parse_origin).transpose()?;
        for (name, value) in [
            ("TASKCAST_MAX_BODY_BYTES", args.max_body_bytes),
            ("TASKCAST_MAX_WS_MESSAGE_BYTES", args.max_ws_message_bytes),
            ("TASKCAST_MAX_SUBSCRIPTIONS", args.max_subscriptions),
            ("TASKCAST_MAX_CONNECTIONS", args.max_connections),
            ("TASKCAST_MAX_BATCH", args.max_batch),
            ("TASKCAST_WRITER_QUEUE", args.writer_queue),
            ("TASKCAST_DB_POOL_SIZE", args.db_pool_size),
        ] {
            if value == 0 {
                return Err(format!("{name} must be at least 1"));
            }
        }
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
        let database_url = args.database_url.filter(|url| !url.trim().is_empty());
        Ok(Config {
            listen: args.listen,
            database_url: database_url.map(|url| Secret::new(url.trim())),
            push_key,
            app_origin,
            limits: Limits {
                max_body_bytes: args.max_body_bytes,
                max_ws_message_bytes: args.max_ws_message_bytes,
                max_subscriptions: args.max_subscriptions,
                max_connections: args.max_connections,
                max_batch: args.max_batch,
                writer_queue: args.writer_queue,
                db_pool_size: args.db_pool_size,
                db_timeout: Duration::from_millis(args.db_timeout_ms.max(1)),
                ping_interval: Duration::from_secs(args.ping_interval_secs),
                pong_timeout: Duration::from_secs(args.pong_timeout_secs),
            },
        })
    }
}

/// Production is `NODE_ENV=production` or `APP_ENV=production` (case-insensitive).
pub fn is_production(env: impl Fn(&str) -> Option<String>) -> bool {
    ["NODE_ENV", "APP_ENV"]
        .iter()
        .any(|var| env(var).is_some_and(|v| v.trim().eq_ignore_ascii_case("production")))
}

/// Reduces NEXT_PUBLIC_APP_URL to its origin, rejecting anything that is not http(s)://host.
pub fn parse_origin(url: &str) -> Result<String, String> {
    let url = url.trim();
    let bad = || {
        format!(
            "NEXT_PUBLIC_APP_URL must be an http(s) URL such as https://app.example.com, got {url:?}"
        )
    };
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
    Ok(format!("{scheme}://{}", host.to_ascii_lowercase()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_keeps_scheme_host_and_port_only() {
        assert_eq!(
            parse_origin("https://App.example.com:8443/path?q=1").unwrap(),
            "https://app.example.com:8443"
        );
        assert!(parse_origin("app.example.com").is_err());
        assert!(parse_origin("ftp://x").is_err());
        assert!(parse_origin("https://user@host").is_err());
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
    fn serve_is_the_default_subcommand_and_flags_parse() {
        let cli = Cli::try_parse_from(["taskcast", "--listen", "127.0.0.1:0"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.serve.listen.port(), 0);
        let cli = Cli::try_parse_from(["taskcast", "serve", "--max-batch", "7"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Serve(a)) if a.max_batch == 7));
    }
}
