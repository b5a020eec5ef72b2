//! The broadcaster registry (contract 1.1 section 5.1, `sql/0004_registry.sql`):
//! a broadcaster's own entry through the SECURITY DEFINER functions, and the
//! [`Directory`], a cached read of the live entries that both roles answer
//! discovery from (`wrong_shard`'s `broadcasters`, the writer's market objects).

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;

use super::DbError;

/// A new entry for this run; returns its id (drawn by the database).
pub async fn register(
    client: &tokio_postgres::Client,
    url: &str,
    shards: &[i32],
    every: Duration,
) -> Result<String, DbError> {
    let secs = every.as_secs_f64();
    let row = client
        .query_one(
            "SELECT marketcast_registry_register($1, $2, make_interval(secs => $3))",
            &[&url, &shards, &secs],
        )
        .await?;
    Ok(row.get(0))
}

/// Refresh entry `id`; false when it no longer exists (deleted by hand, or
/// purged after an hour stale).
pub async fn heartbeat(client: &tokio_postgres::Client, id: &str) -> Result<bool, DbError> {
    let row = client
        .query_one("SELECT marketcast_registry_heartbeat($1)", &[&id])
        .await?;
    Ok(row.get(0))
}

/// Delete entry `id`; false when it was already gone.
pub async fn leave(client: &tokio_postgres::Client, id: &str) -> Result<bool, DbError> {
    let row = client
        .query_one("SELECT marketcast_registry_leave($1)", &[&id])
        .await?;
    Ok(row.get(0))
}

/// Delete the entries stale for more than an hour; returns how many.
pub async fn purge_stale(client: &tokio_postgres::Client) -> Result<i64, DbError> {
    let row = client
        .query_one("SELECT marketcast_registry_purge_stale()", &[])
        .await?;
    Ok(row.get(0))
}

/// One live entry, as discovery needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveEntry {
    pub id: String,
    pub url: String,
    /// Ascending.
    pub shards: Vec<i32>,
}

/// The live entries, read through the view the contract names. An unnamed
/// statement: the writer reads this too, and it must survive transaction
/// pooling (docs/OPERATIONS.md, "Behind a pooler").
pub async fn live(client: &tokio_postgres::Client) -> Result<Vec<LiveEntry>, DbError> {
    let rows = client
        .query_typed(
            "SELECT id, url, shards FROM broadcasters WHERE live ORDER BY id",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| LiveEntry {
            id: r.get("id"),
            url: r.get("url"),
            shards: r.get("shards"),
        })
        .collect())
}

/// The distinct urls of `entries` serving `shard`, sorted (pure).
pub fn urls_for(entries: &[LiveEntry], shard: i32) -> Vec<String> {
    let mut urls: Vec<String> = entries
        .iter()
        .filter(|e| e.shards.binary_search(&shard).is_ok())
        .map(|e| e.url.clone())
        .collect();
    urls.sort();
    urls.dedup();
    urls
}

/// How many of the shards `0..shard_count` no live entry serves (pure).
pub fn unserved(entries: &[LiveEntry], shard_count: u32) -> usize {
    (0..shard_count as i32)
        .filter(|s| !entries.iter().any(|e| e.shards.binary_search(s).is_ok()))
        .count()
}

/// The live entries as of the last successful read. The refresh task
/// ([`Directory::spawn`]) re-reads them every `every`, so an answer built
/// from it reflects the registry as it was at most `every` plus one read
/// earlier while the database answers; a failed read keeps the previous
/// snapshot (the answers it feeds need the database anyway).
#[derive(Clone, Default)]
pub struct Directory(Arc<RwLock<Snapshot>>);

#[derive(Default)]
struct Snapshot {
    entries: Vec<LiveEntry>,
    /// When the read that produced `entries` started; None before the first.
    taken: Option<Instant>,
}

impl Directory {
    /// Refresh from `pool` every `every` (the first read at once) until
    /// `shutdown`.
    pub fn spawn(
        pool: Pool,
        every: Duration,
        timeout: Duration,
        shutdown: CancellationToken,
    ) -> Directory {
        let dir = Directory::default();
        let d = dir.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                // Cancel safety: a tick and a token are cancel-safe.
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = shutdown.cancelled() => return,
                }
                if let Err(e) = d.refresh(&pool, timeout).await {
                    tracing::debug!(error = %e, "cannot read the broadcaster registry; keeping the last snapshot");
                }
            }
        });
        dir
    }

    /// Read the live entries now.
    pub async fn refresh(&self, pool: &Pool, timeout: Duration) -> Result<(), DbError> {
        let started = Instant::now();
        let entries = super::with_connection(pool, timeout, async |c| live(c).await).await?;
        let mut s = self.0.write().unwrap_or_else(|p| p.into_inner());
        s.entries = entries;
        s.taken = Some(started);
        Ok(())
    }

    /// The distinct urls of live entries serving `shard`.
    pub fn urls_for(&self, shard: i32) -> Vec<String> {
        urls_for(
            &self.0.read().unwrap_or_else(|p| p.into_inner()).entries,
            shard,
        )
    }

    /// A copy of the live entries.
    pub fn entries(&self) -> Vec<LiveEntry> {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .entries
            .clone()
    }

    /// How old the snapshot is; None before the first read.
    pub fn age(&self) -> Option<Duration> {
        let s = self.0.read().unwrap_or_else(|p| p.into_inner());
        s.taken.map(|t| t.elapsed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(id: &str, url: &str, shards: &[i32]) -> LiveEntry {
        LiveEntry {
            id: id.into(),
            url: url.into(),
            shards: shards.to_vec(),
        }
    }

    #[test]
    fn urls_are_distinct_and_only_those_serving_the_shard() {
        let all = [
            e("1", "ws://b/ws", &[0, 3]),
            e("2", "ws://a/ws", &[3]),
            e("3", "ws://b/ws", &[3, 5]),
            e("4", "ws://c/ws", &[1, 2]),
        ];
        assert_eq!(urls_for(&all, 3), ["ws://a/ws", "ws://b/ws"]);
        assert_eq!(urls_for(&all, 2), ["ws://c/ws"]);
        assert!(urls_for(&all, 4).is_empty());
        assert_eq!(unserved(&all, 6), 1, "only shard 4 is unserved");
        assert_eq!(unserved(&[], 6), 6);
    }
}
