//! Replay reads from a hot standby (`--replay-database-url`, contract 1.1
//! section 5.4): subscription fills, ticker catch-up folds and the catch-up
//! route read trades from the replica as far as it has them, so a storm of
//! clients catching up costs the primary little.
//!
//! The guarantee is unchanged because rows never differ between the two,
//! only how far each has got: a standby holds a prefix of the primary's
//! committed history. What a replay owes is bounded by the primary's head
//! (the hub's, or the market row read on the primary), so the one thing a
//! replica can do wrong is not have a trade yet. A replica answer that does
//! not reach the first trade owed is asked again until `--replica-wait` is
//! spent, then the primary answers (`marketcast_replica_fallbacks_total`):
//! lag costs at most that much, never a gap (the caller checks each page's
//! first seq as before) and never a stall. A replica that fails a read is treated as down
//! at once (the read goes to the primary) until the next check.
//!
//! Usable means: reachable, in recovery (`pg_is_in_recovery()`), and with
//! the primary's `system_identifier` (a standby of this cluster, not some
//! other server). Checked every [`RECHECK`], so a replica that becomes usable
//! is used again within 10 s; while it is not, `marketcast_replica_up` is 0,
//! every read goes to the primary, and a warning is logged on each change.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, Result};
use deadpool_postgres::Pool;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::db::{self, DbError};
use crate::protocol::ticker::Fold;
use crate::protocol::trade::EncodedTrade;

/// How often the replica's usability is checked (the contract: used again
/// within 10 s of becoming usable; a check takes at most [`CHECK_TIMEOUT`]).
pub(crate) const RECHECK: Duration = Duration::from_secs(5);
/// Bound on one check, connection included.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// Bound on one replica read (below `--db-timeout` when that is larger): a
/// frozen replica costs a replay this once, then it is down until checked.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// Between two asks of a lagging replica within `--replica-wait`.
const POLL: Duration = Duration::from_millis(20);

/// Which server answered a replay read: the label of
/// `marketcast_replayed_trades_total{source}` (`postgres` is the primary).
pub(crate) type Source = &'static str;
pub(crate) const FROM_REPLICA: Source = "replica";
pub(crate) const FROM_PRIMARY: Source = "postgres";

/// Where replay reads go: the primary's pool, and the replica when configured.
pub(crate) struct ReplayReads {
    primary: Pool,
    /// `--db-timeout`.
    timeout: Duration,
    replica: Option<Replica>,
}

struct Replica {
    pool: Pool,
    /// `--replica-wait`.
    wait: Duration,
    /// Written by the check task and by a read that failed; read by every
    /// replay read and `/healthz`.
    up: AtomicBool,
    /// Whether a verdict was recorded yet (the first "unusable" is logged).
    judged: AtomicBool,
    /// The primary's system identifier, learned once.
    primary_id: OnceLock<i64>,
}

impl ReplayReads {
    /// Reads from the primary only.
    pub(crate) fn primary(primary: Pool, timeout: Duration) -> ReplayReads {
        ReplayReads {
            primary,
            timeout,
            replica: None,
        }
    }

    /// Reads that use the replica at `url` while it is usable. Nothing is
    /// connected here; [`ReplayReads::spawn_check`] starts checking it.
    pub(crate) fn with_replica(
        primary: Pool,
        timeout: Duration,
        url: &str,
        pool_size: usize,
        wait: Duration,
    ) -> Result<ReplayReads> {
        let pool = db::pool(url, pool_size, timeout, "marketcast-replay")
            .context("--replay-database-url")?;
        metrics::gauge!("marketcast_replica_up").set(0.0);
        Ok(ReplayReads {
            primary,
            timeout,
            replica: Some(Replica {
                pool,
                wait,
                up: AtomicBool::new(false),
                judged: AtomicBool::new(false),
                primary_id: OnceLock::new(),
            }),
        })
    }

    /// None without a replica; else whether replays may read it now
    /// (`/healthz`'s `replica`).
    pub(crate) fn replica_up(&self) -> Option<bool> {
        self.replica.as_ref().map(|r| r.up.load(Ordering::Acquire))
    }

    /// Check the replica now and every [`RECHECK`] until `shutdown`.
    pub(crate) fn spawn_check(self: &std::sync::Arc<Self>, shutdown: CancellationToken) {
        if self.replica.is_none() {
            return;
        }
        let reads = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(RECHECK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                // Cancel safety: a tick and a token are cancel-safe.
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = shutdown.cancelled() => return,
                }
                let verdict = reads.check().await;
                if let Some(r) = &reads.replica {
                    r.set_up(verdict);
                }
            }
        });
    }

    /// Ok when the replica is usable, else why not (no URL, no password).
    async fn check(&self) -> Result<(), String> {
        let Some(r) = &self.replica else {
            return Err("no replica".into());
        };
        let primary_id = match r.primary_id.get() {
            Some(id) => *id,
            None => {
                let (_, id) = db::with_connection(&self.primary, CHECK_TIMEOUT, async |c| {
                    db::health::identity(c).await
                })
                .await
                .map_err(|e| format!("the primary's system identifier is unknown: {e}"))?;
                *r.primary_id.get_or_init(|| id)
            }
        };
        let (recovering, id) = db::with_connection(&r.pool, CHECK_TIMEOUT, async |c| {
            db::health::identity(c).await
        })
        .await
        .map_err(|e| format!("unreachable: {e}"))?;
        if !recovering {
            return Err("not in recovery (pg_is_in_recovery() is false): not a standby".into());
        }
        if id != primary_id {
            return Err(format!(
                "not a standby of this database (system identifier {id}, the primary's {primary_id})"
            ));
        }
        Ok(())
    }

    /// `read` on the replica while it is usable and its answer is
    /// [`Answer::enough`]; asked again while `waited` allows, then `read`
    /// on the primary. Errors are the primary's: a replica that fails is
    /// skipped.
    async fn read(
        &self,
        read: &Read<'_>,
        waited: &mut Waited,
    ) -> Result<(Answer, Source), DbError> {
        if let Some(r) = self
            .replica
            .as_ref()
            .filter(|r| r.up.load(Ordering::Acquire))
        {
            let start = Instant::now();
            let deadline = start + r.wait.saturating_sub(waited.0);
            let attempt = self.timeout.min(ATTEMPT_TIMEOUT);
            loop {
                match db::with_connection(&r.pool, attempt, async |c| read.run(c).await).await {
                    Ok(a) if a.enough(read) => return Ok((a, FROM_REPLICA)),
                    Ok(_) if Instant::now() + POLL < deadline => {
                        tokio::time::sleep(POLL).await;
                    }
                    Ok(_) => break,
                    Err(e) => {
                        r.set_up(Err(format!("a replay read failed: {e}")));
                        break;
                    }
                }
            }
            waited.0 += start.elapsed();
            metrics::counter!("marketcast_replica_fallbacks_total").increment(1);
        }
        let a =
            db::with_connection(&self.primary, self.timeout, async |c| read.run(c).await).await?;
        Ok((a, FROM_PRIMARY))
    }
}

/// How long one replay has waited for the replica so far: `--replica-wait`
/// bounds the sum over all its pages, so a replay of many pages past a
/// lagging replica waits once, not once a page.
#[derive(Debug, Default)]
pub(crate) struct Waited(Duration);

/// A replay read, the same on either server.
enum Read<'a> {
    /// Trades `after < seq <= upto` (None: no bound), at most `limit`;
    /// `head` is the primary's.
    Page {
        market: &'a str,
        after: i64,
        upto: Option<i64>,
        head: i64,
        limit: i64,
    },
    /// [`db::log::fold`].
    Fold {
        market: &'a str,
        after: i64,
        upto: i64,
    },
}

enum Answer {
    Page(Vec<EncodedTrade>),
    Fold(Option<Fold>),
}

impl Read<'_> {
    async fn run(&self, c: &deadpool_postgres::Client) -> Result<Answer, DbError> {
        Ok(match *self {
            Read::Page {
                market,
                after,
                upto,
                limit,
                ..
            } => Answer::Page(db::log::trade_frames_after(c, market, after, upto, limit).await?),
            Read::Fold {
                market,
                after,
                upto,
            } => Answer::Fold(db::log::fold(c, market, after, upto).await?),
        })
    }
}

impl Answer {
    /// Whether a replica's answer serves: it reaches the first trade owed.
    /// Rows never differ between the servers, only how far each has got, so
    /// a page that starts the trades owed is as good as the primary's (the
    /// caller checks its first seq as ever). A fold the replica cannot give
    /// whole may be lag as well as pruning: the primary decides.
    fn enough(&self, read: &Read<'_>) -> bool {
        match (self, read) {
            (
                Answer::Page(page),
                &Read::Page {
                    after, upto, head, ..
                },
            ) => !page.is_empty() || head.min(upto.unwrap_or(head)) <= after,
            (Answer::Fold(fold), Read::Fold { .. }) => fold.is_some(),
            _ => false,
        }
    }
}

impl Replica {
    /// Record a check's verdict; a change is logged (a loss as a warning),
    /// and so is the first verdict when it is "unusable".
    fn set_up(&self, verdict: Result<(), String>) {
        let up = verdict.is_ok();
        metrics::gauge!("marketcast_replica_up").set(if up { 1.0 } else { 0.0 });
        let was = self.up.swap(up, Ordering::AcqRel);
        let first = !self.judged.swap(true, Ordering::AcqRel);
        match verdict {
            Ok(()) if !was => tracing::info!("replay replica usable: replays read it"),
            Err(why) if was || first => {
                tracing::warn!(reason = %why, "replay replica not used: replays read the primary")
            }
            _ => {}
        }
    }
}

impl ReplayReads {
    /// Trades `after < seq <= upto` (None: no bound) of `market`, at most
    /// `limit`, each encoded into its frame; `head` is the primary's head,
    /// how far the replica must reach.
    pub(crate) async fn trade_frames(
        &self,
        market: &str,
        after: i64,
        upto: Option<i64>,
        head: i64,
        limit: i64,
        waited: &mut Waited,
    ) -> Result<(Vec<EncodedTrade>, Source), DbError> {
        let read = Read::Page {
            market,
            after,
            upto,
            head,
            limit,
        };
        match self.read(&read, waited).await? {
            (Answer::Page(page), source) => Ok((page, source)),
            (Answer::Fold(_), _) => unreachable!("a page read answers a page"),
        }
    }

    /// The fold of `after < seq <= upto` ([`db::log::fold`]); None: pruned.
    pub(crate) async fn fold(
        &self,
        market: &str,
        after: i64,
        upto: i64,
    ) -> Result<(Option<Fold>, Source), DbError> {
        match self
            .read(
                &Read::Fold {
                    market,
                    after,
                    upto,
                },
                &mut Waited::default(),
            )
            .await?
        {
            (Answer::Fold(fold), source) => Ok((fold, source)),
            (Answer::Page(_), _) => unreachable!("a fold read answers a fold"),
        }
    }
}
