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
