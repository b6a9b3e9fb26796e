//! A throwaway database: `bench_<uuid>` is created next to the admin URL's database,
//! migrated with `taskcast migrate`, and dropped at the end.

use std::time::Duration;

use tokio_postgres::NoTls;

use super::BoxError;
use super::server::taskcast_binary;

/// Loopback without TLS, as the figures of earlier rounds were measured (taskcast's
/// default `sslmode=prefer` would encrypt to a local server that offers TLS).
const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable";

/// TASKCAST_BENCH_DATABASE_URL, else the local default.
pub fn admin_url() -> String {
    std::env::var("TASKCAST_BENCH_DATABASE_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_ADMIN_URL.to_string())
}

/// The cluster's WAL flushes so far and the milliseconds they took (the time counts only
/// flushes made with track_wal_io_timing on); zeros when it cannot be read.
pub async fn wal_syncs(admin_url: &str) -> (f64, f64) {
    let read = async {
        let (client, connection) = tokio_postgres::connect(admin_url, NoTls).await.ok()?;
        tokio::spawn(connection);
        let row = (client.query_one(
            "SELECT wal_sync::float8, wal_sync_time::float8 FROM pg_stat_wal",
            &[],
        ))
        .await
        .ok()?;
        Some((row.get(0), row.get(1)))
    };
    (tokio::time::timeout(Duration::from_secs(2), read).await)
        .ok()
        .flatten()
        .unwrap_or((0.0, 0.0))
}

/// Whether the admin URL answers within two seconds.
pub async fn answers(admin_url: &str) -> bool {
    let connect = tokio_postgres::connect(admin_url, NoTls);
    match tokio::time::timeout(Duration::from_secs(2), connect).await {
        Ok(Ok((client, connection))) => {
            tokio::spawn(connection);
            client.simple_query("SELECT 1").await.is_ok()
        }
        _ => false,
    }
}

pub struct BenchDatabase {
    admin: tokio_postgres::Client,
    pub name: String,
    /// The URL of the fresh database.
    pub url: String,
}

impl BenchDatabase {
    /// Creates and migrates a fresh database.
    pub async fn create(admin_url: &str) -> Result<BenchDatabase, BoxError> {
        let (admin, connection) = tokio_postgres::connect(admin_url, NoTls)
            .await
            .map_err(|e| format!("connecting to {admin_url}: {e}"))?;
        tokio::spawn(connection);
        let name = format!("bench_{}", uuid::Uuid::new_v4().simple());
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await?;
        // Postgres times its WAL flushes (pg_stat_wal.wal_sync_time) only where
        // track_wal_io_timing is on: on for this throwaway database's sessions, so a slow
        // commit can be told from a slow disk. Needs a superuser; without one the bench
        // still runs and reports no fsync time.
        let _ = admin
            .batch_execute(&format!(
                "ALTER DATABASE {name} SET track_wal_io_timing = on"
            ))
            .await;
        let db = BenchDatabase {
            admin,
            url: with_database(admin_url, &name),
            name,
        };
        if let Err(e) = db.migrate().await {
            db.drop_database().await;
            return Err(e);
        }
        Ok(db)
    }

    async fn migrate(&self) -> Result<(), BoxError> {
        let output = tokio::process::Command::new(taskcast_binary()?)
            .arg("migrate")
            .env("DATABASE_URL", &self.url)
            .env("RUST_LOG", "warn")
            .output()
            .await?;
        if !output.status.success() {
            return Err(format!(
                "taskcast migrate failed: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            )
            .into());
        }
        Ok(())
    }

    /// A client of the bench database, for seeding and vacuuming.
    pub async fn connect(&self) -> Result<tokio_postgres::Client, BoxError> {
        let (client, connection) = tokio_postgres::connect(&self.url, NoTls).await?;
        tokio::spawn(connection);
        Ok(client)
    }

    /// Drops the database, closing whatever is still connected to it.
    pub async fn drop_database(self) {
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        if let Err(e) = self.admin.batch_execute(&sql).await {
            eprintln!("could not drop database {}: {e}", self.name);
        }
    }
}

/// `postgres://u@h:p/db?x` → `postgres://u@h:p/<name>?x`.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let (scheme, rest) = base.split_once("://").unwrap_or(("postgres", base));
    let authority = rest.split('/').next().unwrap_or_default();
    let query = if query.is_empty() {
        String::new()
    } else {
        format!("?{query}")
    };
    format!("{scheme}://{authority}/{name}{query}")
}
