//! Administration: the embedded versioned migrations, pruning, the stored
//! shard count, and the demo's markets.

use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::{connect, DbError};

/// The migrations, in order. Each runs once, inside the migrate transaction.
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "trade_log", include_str!("../../sql/0001_trade_log.sql")),
    (
        2,
        "linear_bulk_inserts",
        include_str!("../../sql/0002_linear_bulk_inserts.sql"),
    ),
    (
        3,
        "least_privilege",
        include_str!("../../sql/0003_least_privilege.sql"),
    ),
    (4, "registry", include_str!("../../sql/0004_registry.sql")),
    (
        5,
        "signed_notifications",
        include_str!("../../sql/0005_signed_notifications.sql"),
    ),
];

/// Key of the advisory lock that serialises concurrent `migrate` runs on one database.
const MIGRATE_LOCK: i64 = 0x6d61_726b_6574_6361; // "marketca"

/// Bring the schema up to date. Idempotent, and safe when several processes
/// run it at once: everything happens in one transaction that first takes an
/// advisory lock, so a second runner waits and then finds nothing to do.
/// The shard count is stored on the first run only; returns the stored count.
pub async fn migrate(url: &str, shard_count: u32) -> Result<u32> {
    if shard_count == 0 || shard_count > 4096 {
        bail!("--shard-count must be between 1 and 4096");
    }
    let mut client = connect(url, "marketcast-migrate").await?;
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATE_LOCK])
        .await?;
    // "already exists, skipping" notices are expected on every re-run.
    tx.batch_execute("SET LOCAL client_min_messages = warning")
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS marketcast_migrations (
             version    int PRIMARY KEY,
             name       text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .await?;
    let applied: Vec<i32> = tx
        .query("SELECT version FROM marketcast_migrations", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for (version, name, sql) in MIGRATIONS {
        if applied.contains(version) {
            continue;
        }
        tracing::info!(version, name, "applying migration");
        tx.batch_execute(sql)
            .await
            .with_context(|| format!("migration {version} ({name}) failed"))?;
        tx.execute(
            "INSERT INTO marketcast_migrations (version, name) VALUES ($1, $2)",
            &[version, name],
        )
        .await?;
    }
    tx.execute(
        "INSERT INTO marketcast_config (shard_count) VALUES ($1) ON CONFLICT DO NOTHING",
        &[&(shard_count as i32)],
    )
    .await?;
    let stored: i32 = tx
        .query_one("SELECT shard_count FROM marketcast_config", &[])
        .await?
        .get(0);
    tx.commit().await?;
    if stored as u32 != shard_count {
        tracing::warn!(
            stored,
            requested = shard_count,
            "shard count is already stored and cannot change; keeping the stored value"
        );
    }
    Ok(stored as u32)
}

/// Drop trades created before `older_than` ago, keeping each market's newest
/// (the database function is the one path the append-only log allows).
pub async fn prune(url: &str, older_than: Duration) -> Result<u64> {
    let client = connect(url, "marketcast-prune").await?;
    let secs = older_than.as_secs_f64();
    let n: i64 = client
        .query_one(
            "SELECT marketcast_prune(now() - make_interval(secs => $1))",
            &[&secs],
        )
        .await
        .context("pruning")?
        .get(0);
    Ok(n as u64)
}

/// The stored shard count (migrate writes it once).
pub async fn shard_count(client: &tokio_postgres::Client) -> Result<u32, DbError> {
    let row = client
        .query_opt("SELECT shard_count FROM marketcast_config", &[])
        .await?;
    match row {
        Some(r) => Ok(r.get::<_, i32>(0) as u32),
        None => Err(DbError::NotMigrated),
    }
}

/// Create market `id` unless it exists (the demo's markets).
pub async fn ensure_market(
    client: &tokio_postgres::Client,
    id: &str,
    title: &str,
) -> Result<(), DbError> {
    client
        .execute(
            "INSERT INTO markets (id, title) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING",
            &[&id, &title],
        )
        .await?;
    Ok(())
}
