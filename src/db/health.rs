//! The database's health as a role's `/healthz` reports it: one probe a
//! second on the role's pool, whatever the request rate, so a flood of
//! health checks costs the database nothing (each used to run a query). A
//! probe that does not answer within [`PROBE_TIMEOUT`] closes its connection
//! ([`super::with_connection`]), so a frozen path to Postgres shows as
//! unhealthy within [`PROBE_EVERY`] + [`PROBE_TIMEOUT`].

use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How often the database is probed.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);
/// How long a probe may take, connection wait included.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The last probe's answer: None before the first one, else Ok or why not
/// (the server's message or the connection error; never a password).
#[derive(Debug, Clone)]
pub struct Health(watch::Receiver<Option<Result<(), String>>>);

impl Health {
    /// The last probe's answer without waiting: false before the first.
    pub fn ok_now(&self) -> bool {
        matches!(*self.0.borrow(), Some(Ok(())))
    }

    /// The last probe's answer. Before the first probe has answered, waits
    /// for it (at most [`PROBE_TIMEOUT`]): a server just started is not
    /// reported down for want of a probe.
    pub async fn status(&self) -> Result<(), String> {
        let mut rx = self.0.clone();
        let first = tokio::time::timeout(PROBE_TIMEOUT, rx.wait_for(Option::is_some)).await;
        match first {
            Ok(Ok(v)) => v.clone().unwrap_or(Err("not probed yet".into())),
            _ => Err("not probed yet".into()),
        }
    }
}

/// Probe `pool` every [`PROBE_EVERY`] until `shutdown`.
pub fn spawn_probe(pool: Pool, shutdown: CancellationToken) -> Health {
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(PROBE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Cancel safety: a tick and a token are cancel-safe.
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            let r =
                super::with_connection(&pool, PROBE_TIMEOUT, async |c| super::log::ping(c).await)
                    .await;
            tx.send_replace(Some(r.map_err(|e| e.to_string())));
        }
    });
    Health(rx)
}

/// Whether the server `c` is connected to is a standby
/// (`pg_is_in_recovery()`), and its cluster's system identifier, which a
/// standby shares with its primary: how a replay replica is checked
/// (contract 1.1 section 5.4).
pub async fn identity(c: &tokio_postgres::Client) -> Result<(bool, i64), super::DbError> {
    let row = c
        .query_one(
            "SELECT pg_is_in_recovery(), (SELECT system_identifier FROM pg_control_system())",
            &[],
        )
        .await?;
    Ok((row.try_get(0)?, row.try_get(1)?))
}
