//! Postgres access shared by every role: the connection pool and the
//! classification of database errors into "the database is unavailable"
//! versus "the database said no". The statements themselves live in the
//! submodules, one per job; this is the only module that writes SQL.
//!
//! The LISTEN connection is *not* here: it must never come from the pool (a
//! pooled connection's driver drops notifications), see
//! [`crate::broadcaster::listener`].

use std::time::Duration;

use anyhow::{Context, Result};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

pub mod admin;
pub mod health;
pub mod log;
pub mod registry;
pub(crate) mod rows;
pub mod write;

pub use admin::{migrate, prune};

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

/// A pool of at most `size` connections to `url` whose every wait is bounded
/// by `timeout` (`--db-timeout`), so that an unreachable database turns into
/// an error quickly instead of a hang. Creating it never touches the network.
///
/// For a role that needs its session to itself (the broadcaster: a direct
/// connection or a session-mode pool, see docs/OPERATIONS.md "Behind a
/// pooler"): each statement is bounded server-side by a startup parameter.
pub fn pool(url: &str, size: usize, timeout: Duration, application_name: &str) -> Result<Pool> {
    let mut pg = pg_config(url, application_name, timeout)?;
    // Server-side bound on each statement, including row-lock waits: a request
    // that outlives it is rolled back by Postgres itself.
    pg.options(format!("-c statement_timeout={}", timeout.as_millis()));
    build_pool(pg, size, timeout)
}

/// As [`pool`], for a role whose every statement survives transaction
/// pooling (the writer: PgBouncer in transaction mode): no startup
/// `options` (PgBouncer 1.18 refuses the connection: "unsupported startup
/// parameter: options"), so each write transaction sets its own bound
/// ([`write::with_bound`]); a read outside a transaction has only its
/// caller's deadline ([`with_connection`] closes its connection past it);
/// no named prepared statements (`query_typed` only); no other session
/// state.
pub fn transaction_pool(
    url: &str,
    size: usize,
    timeout: Duration,
    application_name: &str,
) -> Result<Pool> {
    build_pool(pg_config(url, application_name, timeout)?, size, timeout)
}

fn build_pool(pg: tokio_postgres::Config, size: usize, timeout: Duration) -> Result<Pool> {
    let mgr = Manager::from_config(
        pg,
        NoTls,
        ManagerConfig {
            // Fast: recycling sends nothing (Verified would run a statement
            // per checkout, one more round trip through a pooler too).
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(mgr)
        .max_size(size)
        .wait_timeout(Some(timeout))
        .create_timeout(Some(timeout))
        .recycle_timeout(Some(timeout))
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

/// Run `step` on a connection from `pool`, the wait for the connection
/// included, under `timeout`; running out of time is an outage like any
/// other ([`DbError::Unavailable`]).
///
/// A step that timed out leaves its connection in an unknown state: a
/// statement may still be running, or the network path to Postgres may have
/// frozen (a half-open connection that TCP has not noticed yet, behind a
/// stateful firewall, say). Such a connection is closed, never returned to
/// the pool, so that the next step gets a fresh one instead of hanging on the
/// same path for ever.
pub async fn with_connection<T>(
    pool: &Pool,
    timeout: Duration,
    step: impl AsyncFnOnce(&deadpool_postgres::Client) -> Result<T, DbError>,
) -> Result<T, DbError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let c = tokio::time::timeout_at(deadline, pool.get()).await??;
    match tokio::time::timeout_at(deadline, step(&c)).await {
        Ok(r) => r,
        Err(elapsed) => {
            drop(deadpool_postgres::Object::take(c));
            Err(elapsed.into())
        }
    }
}

/// Errors a caller branches on: the database could not be reached (retry
/// later, answer 503 / `unavailable`) versus it answered with an error.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DbError {
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("database not migrated: run marketcast migrate")]
    NotMigrated,
    #[error("database error {code}: {message}")]
    Sql { code: String, message: String },
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
                DbError::Sql { code, message } => {
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
