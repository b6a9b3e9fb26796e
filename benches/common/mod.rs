//! What the process benchmarks share: starting the release `taskcast` binary and reading
//! its CPU and memory from /proc, a throwaway Postgres database, the WebSocket and HTTP
//! load, the minimal broadcaster that serves as the floor, and the report (table, JSON,
//! hand-written SVG).
//!
//! Each bench binary includes this module and uses part of it.
#![allow(dead_code)]

pub mod floor;
pub mod load;
pub mod postgres;
pub mod proc;
pub mod report;
pub mod server;
pub mod stats;
pub mod svg;

use std::path::PathBuf;
use std::time::Duration;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The push key every bench server runs with (32+ characters, so it is not "weak").
pub const PUSH_KEY: &str = "bench-push-key-0123456789abcdef-0123456789";
/// The secret that signs subscribe tokens on every bench server.
pub const SUBSCRIBE_SECRET: &str = "bench-subscribe-secret-0123456789abcdef-0123456789";

/// A positive count from the environment, else `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().replace('_', "").parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(default)
}

/// A positive number of seconds from the environment (fractions allowed), else `default`.
pub fn env_secs(name: &str, default: f64) -> Duration {
    let secs = std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .unwrap_or(default);
    Duration::from_secs_f64(secs)
}

/// The cargo target directory: CARGO_TARGET_DIR, else `target/` beside Cargo.toml.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(dir)
            }
        }
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"),
    }
}

/// Where figures, plots and server logs go: `<target>/bench/`.
pub fn out_dir() -> Result<PathBuf, BoxError> {
    let dir = target_dir().join("bench");
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
