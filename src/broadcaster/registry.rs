//! This broadcaster's entry in the registry (contract 1.1 section 5.1) and
//! the order of a shutdown around it.
//!
//! With `--advertise-url`, [`spawn`]'s task registers once the broadcaster is
//! healthy (database, LISTEN and hub up: a URL in the registry is one a
//! client can use at once), then every `--registry-interval` while healthy
//! sends a heartbeat, deletes entries stale for more than an hour, and
//! samples the registry gauges. While unhealthy it sends nothing, so its entry
//! turns stale after 3 intervals and discovery stops naming it.
//!
//! An entry that vanished is not recreated when it was live until then: an
//! operator deleted it by hand, and the broadcaster stays out until it is
//! restarted. Only an entry that had been stale for more than an hour (so
//! another broadcaster may have purged it) is registered again, under a new id.
//!
//! Shutdown: the task is the one that turns the process's `shutdown` (or the
//! hub's crash, `stop`) into `stop` for the server and the sessions, *after*
//! deleting its entry, so no client is sent here once the WebSockets start
//! closing with 1001. Without `--advertise-url` it forwards at once.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::session::Health;
use crate::config::RegistryConfig;
use crate::db::registry::{self as reg, Directory};
use crate::db::{self, DbError};

/// How long an entry may have been stale before any registered broadcaster
/// deletes it (the contract's hour).
const PURGE_AFTER: Duration = Duration::from_secs(3600);

/// Whether this broadcaster's entry is live, as `/healthz` reports it.
#[derive(Clone)]
pub(crate) struct Registered {
    /// When the entry was last known to exist with a fresh heartbeat; None
    /// before registering and once it is gone.
    last_ok: Arc<Mutex<Option<Instant>>>,
    /// An entry is live for 3 intervals after its heartbeat.
    live_for: Duration,
}

impl Registered {
    pub fn live(&self) -> bool {
        let last = *self.last_ok.lock().unwrap_or_else(|p| p.into_inner());
        last.is_some_and(|t| t.elapsed() < self.live_for)
    }

    fn set(&self, v: Option<Instant>) {
        *self.last_ok.lock().unwrap_or_else(|p| p.into_inner()) = v;
    }

    fn last(&self) -> Option<Instant> {
        *self.last_ok.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What the task needs besides its tokens.
pub(crate) struct Registrar {
    pub cfg: RegistryConfig,
    pub pool: Pool,
    pub db_timeout: Duration,
    pub shards: BTreeSet<u32>,
    pub health: Health,
    pub directory: Directory,
}

/// Start the task; returns the `/healthz` flag (Some with `--advertise-url`)
/// and the task, which ends once it has cancelled `stop`.
pub(crate) fn spawn(
    r: Registrar,
    shutdown: CancellationToken,
    stop: CancellationToken,
) -> (Option<Registered>, JoinHandle<()>) {
    let Some(url) = r.cfg.advertise_url.clone() else {
        let task = tokio::spawn(async move {
            // Cancel safety: tokens are cancel-safe.
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = stop.cancelled() => {}
            }
            stop.cancel();
        });
        return (None, task);
    };
    let registered = Registered {
        last_ok: Arc::new(Mutex::new(None)),
        live_for: 3 * r.cfg.interval,
    };
    let flag = registered.clone();
    let task = tokio::spawn(async move {
        let leaving = CancellationToken::new();
        let watch = {
            let (leaving, shutdown, stop) = (leaving.clone(), shutdown.clone(), stop.clone());
            async move {
                // Cancel safety: tokens are cancel-safe.
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = stop.cancelled() => {}
                }
                leaving.cancel();
            }
        };
        let watcher = tokio::spawn(watch);
        let id = r.keep(&url, &registered, &leaving).await;
        if let Some(id) = id {
            let left =
                db::with_connection(&r.pool, r.db_timeout, async |c| reg::leave(c, &id).await)
                    .await;
            registered.set(None);
            match left {
                Ok(_) => tracing::info!(id, "left the broadcaster registry"),
                Err(e) => {
                    tracing::warn!(id, error = %e, "cannot delete this broadcaster's registry entry; it turns stale within 3 intervals")
                }
            }
        }
        let _ = watcher.await; // it ended when `leaving` was cancelled; a panic was reported
        stop.cancel();
    });
    (Some(flag), task)
}

impl Registrar {
    /// Register and heartbeat until `leaving`; returns the entry's id, if any.
    async fn keep(
        &self,
        url: &str,
        registered: &Registered,
        leaving: &CancellationToken,
    ) -> Option<String> {
        let shards: Vec<i32> = self.shards.iter().map(|&s| s as i32).collect();
        let every = self.cfg.interval;
        let mut id: Option<String> = None;
        // Deleted by hand: stay out until restarted.
        let mut evicted = false;
        let mut shard_count: Option<u32> = None;
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Cancel safety: a tick and a token are cancel-safe.
            tokio::select! {
                _ = tick.tick() => {}
                _ = leaving.cancelled() => return id,
            }
            if evicted {
                continue;
            }
            if !self.health.ok() {
                if id.is_some() {
                    metrics::counter!("marketcast_registry_heartbeat_failures_total").increment(1);
                }
                continue;
            }
            let step = self.step(url, &shards, &mut id, registered);
            // Cancel safety: dropping the step abandons its query; a register
            // cut short leaves at most an entry that turns stale.
            let r = tokio::select! {
                r = step => r,
                _ = leaving.cancelled() => return id,
            };
            match r {
                Ok(true) => {}
                Ok(false) => {
                    let long_stale = registered.last().is_some_and(|t| t.elapsed() > PURGE_AFTER);
                    registered.set(None);
                    let old = id.take();
                    if long_stale {
                        tracing::warn!(id = ?old, "this broadcaster's registry entry was purged while stale; registering again");
                    } else {
                        tracing::warn!(id = ?old, "this broadcaster's registry entry was deleted; not registering again until restarted");
                        evicted = true;
                    }
                }
                Err(e) => {
                    metrics::counter!("marketcast_registry_heartbeat_failures_total").increment(1);
                    tracing::warn!(error = %e, "registry heartbeat failed");
                }
            }
            self.sample(&mut shard_count).await;
        }
    }

    /// Register (no id yet) or heartbeat, then purge; Ok(false): the entry is gone.
    async fn step(
        &self,
        url: &str,
        shards: &[i32],
        id: &mut Option<String>,
        registered: &Registered,
    ) -> Result<bool, DbError> {
        let (pool, timeout) = (&self.pool, self.db_timeout);
        match id {
            None => {
                let every = self.cfg.interval;
                let new = db::with_connection(pool, timeout, async |c| {
                    reg::register(c, url, shards, every).await
                })
                .await?;
                tracing::info!(id = new, url, "registered in the broadcaster registry");
                *id = Some(new);
            }
            Some(id) => {
                let id = id.as_str();
                if !db::with_connection(pool, timeout, async |c| reg::heartbeat(c, id).await)
                    .await?
                {
                    return Ok(false);
                }
            }
        }
        registered.set(Some(Instant::now()));
        // The view the discovery answers come from now includes this entry.
        let _ = self.directory.refresh(pool, timeout).await; // a failure is retried by the directory's own task
        let purged =
            db::with_connection(pool, timeout, async |c| reg::purge_stale(c).await).await?;
        if purged > 0 {
            tracing::info!(
                purged,
                "deleted registry entries stale for more than an hour"
            );
        }
        Ok(true)
    }

    /// The registry gauges, from the directory's snapshot.
    async fn sample(&self, shard_count: &mut Option<u32>) {
        if shard_count.is_none() {
            *shard_count = db::with_connection(&self.pool, self.db_timeout, async |c| {
                db::admin::shard_count(c).await
            })
            .await
            .ok();
        }
        let entries = self.directory.entries();
        metrics::gauge!("marketcast_registry_live_broadcasters").set(entries.len() as f64);
        if let Some(n) = *shard_count {
            metrics::gauge!("marketcast_registry_unserved_shards")
                .set(reg::unserved(&entries, n) as f64);
        }
    }
}
