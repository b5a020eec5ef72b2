//! Postgres access shared by every role: the connection pool, the embedded
//! versioned migrations, the row readers for markets and trades, and the
//! classification of database errors into "the database is unavailable" versus
//! "the database said no".
//!
//! The LISTEN connection is *not* here: it must never come from the pool (a
//! pooled connection's driver drops notifications), see [`crate::listener`].

use std::time::Duration;

use anyhow::{bail, Context, Result};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

use crate::config::DbConfig;
use crate::trade::{EncodedTrade, Market, Trade, TradeRef};

/// The migrations, in order. Each runs once, inside the migrate transaction.
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "trade_log", include_str!("../sql/0001_trade_log.sql")),
    (
        2,
        "linear_bulk_inserts",
        include_str!("../sql/0002_linear_bulk_inserts.sql"),
    ),
    (
        3,
        "least_privilege",
        include_str!("../sql/0003_least_privilege.sql"),
    ),
];

/// Key of the advisory lock that serialises concurrent `migrate` runs on one database.
const MIGRATE_LOCK: i64 = 0x6d61_726b_6574_6361; // "marketca"

/// The columns of a trade, in [`Trade::from_row`] order. Price comes as
/// numeric's own text form, which for numeric(5,4) always has four places (no
/// float ever touches a price); `created_at` comes binary and is formatted once
/// in Rust ([`crate::trade::PgTimestamp`]), which keeps the per-row work off
/// the database.
pub const TRADE_COLUMNS: &str = "trade_id, market_id, seq, side, price::text, qty, created_at";

/// The columns of a market, in [`Market::from_row`] order.
pub const MARKET_COLUMNS: &str =
    "id, title, status, shard, epoch, last_seq, last_price::text, volume";

pub fn pg_config(
    url: &str,
    application_name: &str,
    timeout: Duration,
) -> Result<tokio_postgres::Config> {
    let mut pg: tokio_postgres::Config = url
        .parse()
        .context("DATABASE_URL is not a valid PostgreSQL URL")?;
    pg.application_name(application_name)
        .connect_timeout(timeout)
        .keepalives(true)
        // The default idle time before the first probe is 2 hours, far too long
        // to notice a dead peer.
        .keepalives_idle(Duration::from_secs(15))
        .keepalives_interval(Duration::from_secs(5))
        .keepalives_retries(3)
        .tcp_user_timeout(Duration::from_secs(30));
    Ok(pg)
}

/// A pool whose every wait is bounded by `cfg.timeout`, so that an
/// unreachable database turns into an error quickly instead of a hang.
/// Creating it never touches the network.
pub fn pool(cfg: &DbConfig, application_name: &str) -> Result<Pool> {
    let mut pg = pg_config(&cfg.url, application_name, cfg.timeout)?;
    // Server-side bound on each statement, including row-lock waits: a request
    // that outlives it is rolled back by Postgres itself.
    pg.options(format!("-c statement_timeout={}", cfg.timeout.as_millis()));
    let mgr = Manager::from_config(
        pg,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(mgr)
        .max_size(cfg.pool_size)
        .wait_timeout(Some(cfg.timeout))
        .create_timeout(Some(cfg.timeout))
        .recycle_timeout(Some(cfg.timeout))
        .runtime(Runtime::Tokio1)
        .build()
        .context("building the connection pool")
}

/// One-off connection for admin commands, driven in the background.
pub async fn connect(url: &str, application_name: &str) -> Result<tokio_postgres::Client> {
    let pg = pg_config(url, application_name, Duration::from_secs(10))?;
    let (client, conn) = pg
        .connect(NoTls)
        .await
        .context("connecting to PostgreSQL")?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "admin connection ended");
        }
    });
    Ok(client)
}

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
pub async fn shard_count(client: &impl tokio_postgres::GenericClient) -> Result<u32, DbError> {
    let row = client
        .query_opt("SELECT shard_count FROM marketcast_config", &[])
        .await?;
    match row {
        Some(r) => Ok(r.get::<_, i32>(0) as u32),
        None => Err(DbError::NotMigrated),
    }
}

pub async fn market(
    client: &impl tokio_postgres::GenericClient,
    id: &str,
) -> Result<Option<Market>, DbError> {
    let sql = format!("SELECT {MARKET_COLUMNS} FROM markets WHERE id = $1");
    Ok(client
        .query_opt(&sql, &[&id])
        .await?
        .map(|r| Market::from_row(&r)))
}

/// Trades with `after < seq <= upto` (upto None: no upper bound), in seq order,
/// at most `limit`. The hot read of the broadcaster (hub and catch-up): its
/// statement is prepared once per pooled connection.
pub async fn trades_after(
    client: &deadpool_postgres::Client,
    market: &str,
    after: i64,
    upto: Option<i64>,
    limit: i64,
) -> Result<Vec<Trade>, DbError> {
    let rows = trade_rows_after(client, market, after, upto, limit).await?;
    Ok(rows.iter().map(Trade::from_row).collect())
}

/// [`trades_after`], each trade encoded into its WebSocket frame straight
/// from the row (replays).
pub async fn trade_frames_after(
    client: &deadpool_postgres::Client,
    market: &str,
    after: i64,
    upto: Option<i64>,
    limit: i64,
) -> Result<Vec<EncodedTrade>, DbError> {
    let rows = trade_rows_after(client, market, after, upto, limit).await?;
    Ok(rows
        .iter()
        .map(|r| TradeRef::from_row(r).encode())
        .collect())
}

async fn trade_rows_after(
    client: &deadpool_postgres::Client,
    market: &str,
    after: i64,
    upto: Option<i64>,
    limit: i64,
) -> Result<Vec<tokio_postgres::Row>, DbError> {
    static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "SELECT {TRADE_COLUMNS} FROM trades WHERE market_id = $1 AND seq > $2 AND seq <= $3 ORDER BY seq LIMIT $4"
        )
    });
    let stmt = client.prepare_cached(&SQL).await?;
    Ok(client
        .query(&stmt, &[&market, &after, &upto.unwrap_or(i64::MAX), &limit])
        .await?)
}

/// For each `(markets[i], afters[i])`: trades with `seq > after`, in seq
/// order, at most `limit` per market; one query for all of them (the hub's
/// batched read), each encoded into its WebSocket frame straight from the
/// row. The result is aligned with `markets`; each market must appear once.
pub async fn trade_frames_after_many(
    client: &deadpool_postgres::Client,
    markets: &[String],
    afters: &[i64],
    limit: i64,
) -> Result<Vec<Vec<EncodedTrade>>, DbError> {
    static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "SELECT t.* FROM unnest($1::text[], $2::bigint[]) AS d(m, after) \
             CROSS JOIN LATERAL (SELECT {TRADE_COLUMNS} FROM trades \
               WHERE market_id = d.m AND seq > d.after ORDER BY seq LIMIT $3) t \
             ORDER BY t.market_id, t.seq"
        )
    });
    let stmt = client.prepare_cached(&SQL).await?;
    let rows = client.query(&stmt, &[&markets, &afters, &limit]).await?;
    let at: std::collections::HashMap<&str, usize> = markets
        .iter()
        .enumerate()
        .map(|(i, m)| (m.as_str(), i))
        .collect();
    let mut out: Vec<Vec<EncodedTrade>> = markets.iter().map(|_| Vec::new()).collect();
    for r in &rows {
        let t = TradeRef::from_row(r);
        if let Some(&i) = at.get(t.market) {
            out[i].push(t.encode());
        }
    }
    Ok(out)
}

/// The lowest seq still in the log for a market (None: no trade at all).
pub async fn earliest_seq(
    client: &impl tokio_postgres::GenericClient,
    market: &str,
) -> Result<Option<i64>, DbError> {
    let row = client
        .query_one(
            "SELECT min(seq) FROM trades WHERE market_id = $1",
            &[&market],
        )
        .await?;
    Ok(row.get(0))
}

/// Run a database step under `timeout`; running out of time is an outage
/// like any other ([`DbError::Unavailable`]).
pub async fn bounded<T>(
    timeout: Duration,
    step: impl std::future::Future<Output = Result<T, DbError>>,
) -> Result<T, DbError> {
    tokio::time::timeout(timeout, step)
        .await
        .map_err(DbError::from)?
}

/// Errors a caller branches on: the database could not be reached (retry
/// later, answer 503 / `unavailable`) versus it answered with an error.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("database not migrated: run marketcast migrate")]
    NotMigrated,
    #[error("database error {code}: {message}")]
    Sql {
        code: String,
        message: String,
        constraint: Option<String>,
    },
}

impl DbError {
    pub fn code(&self) -> Option<&str> {
        match self {
            DbError::Sql { code, .. } => Some(code),
            _ => None,
        }
    }
}

impl From<tokio_postgres::Error> for DbError {
    fn from(e: tokio_postgres::Error) -> Self {
        match e.as_db_error() {
            // Errors a server raised while shutting down or that cancel our
            // statement because of the timeout are outages, not answers; so
            // are refusals to let us in at all (class 28: a wrong password or
            // user, 3D000: no such database, class 08: the connection failed)
            // and a server out of resources (class 53): nothing was done, and
            // the same request may succeed once the database is back or fixed.
            Some(db)
                if matches!(
                    db.code().code(),
                    "57P01" | "57P02" | "57P03" | "57014" | "3D000"
                ) || db
                    .code()
                    .code()
                    .get(..2)
                    .is_some_and(|class| ["08", "28", "53"].contains(&class)) =>
            {
                DbError::Unavailable(format!("{}: {}", db.code().code(), db.message()))
            }
            Some(db) => DbError::Sql {
                code: db.code().code().to_string(),
                message: db.message().to_string(),
                constraint: db.constraint().map(str::to_string),
            },
            // No server error: the connection failed or closed.
            None => DbError::Unavailable(format!("{e:#}")),
        }
    }
}

impl From<deadpool_postgres::PoolError> for DbError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            // Getting a pooled connection runs no statement (recycling is
            // `Fast`): whatever the server said, it was about connecting.
            deadpool_postgres::PoolError::Backend(e) => match DbError::from(e) {
                DbError::Sql { code, message, .. } => {
                    DbError::Unavailable(format!("{code}: {message}"))
                }
                other => other,
            },
            other => DbError::Unavailable(other.to_string()),
        }
    }
}

impl From<tokio::time::error::Elapsed> for DbError {
    fn from(_: tokio::time::error::Elapsed) -> Self {
        DbError::Unavailable("timed out".into())
    }
}
