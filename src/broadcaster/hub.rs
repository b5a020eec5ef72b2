//! The hub: per-market state of one broadcaster, between the LISTEN connection
//! and the sessions.
//!
//! # The delivery guarantee and who upholds it
//!
//! Per connection and market, trades arrive in strictly increasing seq, each
//! once, without gaps, starting at `from_seq + 1` (or `head_seq + 1`).
//!
//! - Every trade delivered is in the log, exactly as the log holds it. A
//!   doorbell (`{"m","s"}` on a shard channel) only makes the hub read
//!   `seq > head` from the log, so a forged doorbell can cost a read but
//!   never put a trade in front of a client. A signed notification (the
//!   trigger's payload with the trade, its market's epoch and an
//!   HMAC-SHA256 under a key only the trigger and the broadcasters can read:
//!   `sql/0005_signed_notifications.sql`) is sent by Postgres only when the
//!   row it describes commits, so a payload whose MAC verifies
//!   ([`crate::protocol::signed`], in the listener) *is* a log row. The hub
//!   publishes it without a read only when the market is followed here, the
//!   epoch is the market's, and its seq is `head + 1`
//!   ([`core::MarketCore::signed`]); anything else (a gap, another epoch, a
//!   bad MAC, an unknown key, a plain doorbell) is a doorbell. A replayed
//!   valid payload is therefore at or below the head (dropped), or the very
//!   trade the log holds at `head + 1`.
//! - The hub publishes each market's trades in seq order with no gap: the
//!   [`core::MarketCore`] only accepts the row `head + 1`, and a read that
//!   returns fewer rows than asked for is complete as of its snapshot (seqs
//!   are assigned under the market's row lock and become visible in order, so
//!   a snapshot that sees `n` sees every seq below `n`).
//! - Before a trade is broadcast it is pushed into the market's ring and the
//!   published head is advanced, so a session that joins late or falls behind
//!   can always fetch what it missed from the ring, or else the log.
//! - Notifications can be lost (LISTEN connection dropped, Postgres restarted).
//!   On every (re)connect of the listener the hub re-reads every market it
//!   serves, and every `reconcile_interval` it compares `markets.last_seq` with
//!   its heads, so nothing committed stays unpublished.
//! - Sessions ([`super::session`]) apply the per-connection rule: drop seq below
//!   the next expected, fill anything above it from the ring or the log first.
//!
//! The hub runs as one task that owns the market map (no lock shared by all
//! markets); reads of the log run in spawned tasks, one at most per market
//! and at most one per hub connection, each covering every market rung while
//! the previous reads ran (one query for many markets under load). Markets without subscribers
//! leave the map at the next reconcile tick.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::config::HubConfig;

use crate::db;
use crate::protocol::ticker::TickerFrame;
use crate::protocol::trade::EncodedTrade;

pub mod core;
pub mod ticker;

/// Frames a ticker group's queue holds per subscriber: at most one frame
/// per interval goes in, so a subscriber this far behind has stopped
/// reading; it then lags and fills from the ring or the log.
const TICKER_QUEUE: usize = 16;

/// The part of a market sessions share with the hub task.
pub struct MarketShared {
    pub id: String,
    /// Recent trades. Write-locked only by the hub task for a push; sessions
    /// read-lock it to copy (refcount) a range when they fill a gap.
    pub ring: RwLock<core::Ring>,
    /// Highest seq pushed to the ring (and then broadcast).
    head: AtomicI64,
    /// Live trades. A receiver that falls further behind than the queue
    /// holds gets `Lagged` and its session fills the gap from the ring or
    /// the log, so a slow subscriber never blocks the hub or anyone else.
    ///
    /// Lazy: a market starts with [`FIRST_LIVE_QUEUE`] slots (a tokio
    /// broadcast channel allocates all of its slots at once: 1,024 of them
    /// made every followed market cost about 70 KiB with no traffic at all),
    /// and the first burst that would overflow them replaces the queue with
    /// one of `--live-queue` slots. Receivers of the old queue then get
    /// [`EncodedTrade::moved`] as its newest entry (never lost to a lag) and
    /// move over ([`MarketShared::subscribe`]), filling from the ring what
    /// was published before they did. Written only by the hub task.
    tx: RwLock<broadcast::Sender<EncodedTrade>>,
}

/// The live queue a market starts with; see `MarketShared::tx`.
pub const FIRST_LIVE_QUEUE: usize = 16;

impl MarketShared {
    pub fn head(&self) -> i64 {
        self.head.load(Ordering::Acquire)
    }

    /// A receiver of the market's current live queue. Whatever is published
    /// from now on reaches it; whatever was published before is at most
    /// [`MarketShared::head`] (stored before every send).
    pub fn subscribe(&self) -> broadcast::Receiver<EncodedTrade> {
        self.tx
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .subscribe()
    }

    fn receivers(&self) -> usize {
        self.tx
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .receiver_count()
    }

    /// Trades `after < seq <= upto` from memory, if the ring reaches back far enough.
    pub fn ring_range(&self, after: i64, upto: i64) -> Option<Vec<EncodedTrade>> {
        self.ring
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .range(after, upto)
    }
}

/// Events into the hub task.
#[derive(Debug)]
pub enum HubEvent {
    /// A doorbell from the LISTEN connection (already parsed, not trusted).
    Doorbell { market: String, seq: i64 },
    /// A signed notification whose MAC the listener verified: the trade,
    /// encoded exactly as its log row would be, and the epoch of the log it
    /// was written to.
    Signed {
        market: String,
        epoch: String,
        frame: EncodedTrade,
    },
    /// The LISTEN connection is (re)established and LISTENing: anything may
    /// have been missed while it was down, re-read every market.
    ListenUp,
}

/// A session's request to follow a market.
pub struct Join {
    pub market: String,
    /// The market's last_seq as the session just read it: the starting head
    /// when the market is new to the hub.
    pub head: i64,
    /// The market's volume in the same row as `head`: the hub keeps each
    /// market's volume from there on (every published trade carries the
    /// volume after it, for ticker folds).
    pub volume: i64,
    /// The market's epoch in the same row: signed notifications of another
    /// epoch are never published from their payload.
    pub epoch: String,
    pub want: Want,
    pub reply: oneshot::Sender<Joined>,
}

/// What a subscription follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// Every trade, on the market's live queue.
    Trades,
    /// The market's ticker group for this interval.
    Ticker { interval_ms: u32 },
}

/// The hub's answer to a [`Join`]: the market's shared state and a live
/// receiver subscribed before the reply.
pub struct Joined {
    pub shared: Arc<MarketShared>,
    pub live: LiveRx,
}

pub enum LiveRx {
    Trades(broadcast::Receiver<EncodedTrade>),
    /// The group's frames; every frame sent from now on starts after
    /// `boundary`, and everything up to `boundary` is published (in the ring).
    Ticker {
        rx: broadcast::Receiver<TickerFrame>,
        boundary: i64,
    },
    /// The hub does not know the market's volume right now (trades above
    /// its head were pruned): a ticker cannot start; retry.
    VolumeUnknown,
}

/// Cheap handle for sessions.
#[derive(Clone)]
pub struct HubHandle {
    /// Joins, bounded: a full queue makes the joining session wait, never the hub.
    joins: mpsc::Sender<Join>,
}

impl HubHandle {
    /// Follow `market` from its row's `head` and `volume`; None if the hub
    /// has stopped.
    pub async fn join(
        &self,
        market: &str,
        head: i64,
        volume: i64,
        epoch: &str,
        want: Want,
    ) -> Option<Joined> {
        let (reply, rx) = oneshot::channel();
        self.joins
            .send(Join {
                market: market.to_string(),
                head,
                volume,
                epoch: epoch.to_string(),
                want,
                reply,
            })
            .await
            .ok()?;
        rx.await.ok()
    }
}

/// While the NOTIFY queue stays above the threshold, repeat the warning this often.
const QUEUE_WARN_EVERY: Duration = Duration::from_secs(60);

struct Market {
    core: core::MarketCore,
    shared: Arc<MarketShared>,
    /// Slots of the current live queue.
    live_queue: usize,
    /// The live queue replaced by a larger one, kept while receivers remain.
    moved_from: Option<broadcast::Sender<EncodedTrade>>,
    /// The market's volume after `core.head()`; None once trades above the
    /// head were skipped (pruned), until a join reads the head again.
    volume: Option<i64>,
    /// Ticker groups by interval (few per market: clients pick from a handful).
    tickers: Vec<TickerSlot>,
    /// The epoch signed notifications must carry to be published from their
    /// payload: the one the first join read. None once a join read another
    /// (the market was reset under us): from then on every trade of this
    /// market is read from the log until it leaves the hub.
    epoch: Option<String>,
}

struct TickerSlot {
    interval_ms: u32,
    group: ticker::Group,
    tx: broadcast::Sender<TickerFrame>,
    /// The deadline already in the hub's heap for this group, so that
    /// every read published while a frame waits does not add another.
    armed: Option<tokio::time::Instant>,
}

enum Internal {
    /// One batched read: the markets asked for, and per market (same order)
    /// its page, encoded, and whether the page was full.
    Fetched {
        markets: Vec<String>,
        result: Result<Vec<(Vec<EncodedTrade>, bool)>, db::DbError>,
    },
    /// A reconcile's answer; Err when the database did not give one.
    Reconciled(Result<Reconciled, db::DbError>),
    /// The retry backoff after a failed read has passed.
    Retry,
}

struct Reconciled {
    heads: Vec<(String, i64)>,
    notify_queue_usage: f64,
}

/// Most rows one batched read may hold: the markets of one read are at most
/// this divided by `--replay-page` (16 at the default 1000), so a read's
/// memory stays bounded however many markets are rung at once; the rest wait
/// for the next free hub connection.
const MAX_ROWS_PER_READ: usize = 16_384;

/// How the hub reads the log.
pub struct Reads {
    /// Its own pool (`--hub-pool-size`): a storm of replays cannot starve it.
    pub pool: Pool,
    /// Most trades per market in one read (`--replay-page`).
    pub page: usize,
    /// Bound on one read or reconcile, connection wait included
    /// (`--db-timeout`); past it the connection is closed and the read is
    /// retried ([`db::with_connection`]).
    pub timeout: Duration,
}

/// Start the hub task. `events` comes from the listener (unbounded there, so
/// the LISTEN socket is always read; see `listener.rs`).
pub fn spawn(
    cfg: HubConfig,
    reads: Reads,
    events: mpsc::UnboundedReceiver<HubEvent>,
    shutdown: CancellationToken,
) -> (HubHandle, tokio::task::JoinHandle<()>) {
    let (joins_tx, joins_rx) = mpsc::channel(1024);
    let (results_tx, results_rx) = mpsc::unbounded_channel();
    let hub = Hub {
        cfg,
        reads,
        markets: HashMap::new(),
        pending: Vec::new(),
        reads_in_flight: 0,
        reconciling: false,
        retry: Vec::new(),
        retry_backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(2)),
        results_tx,
        queue_warned_at: None,
        deadlines: BinaryHeap::new(),
    };
    let task = tokio::spawn(hub.run(events, joins_rx, results_rx, shutdown));
    (HubHandle { joins: joins_tx }, task)
}

struct Hub {
    cfg: HubConfig,
    reads: Reads,
    markets: HashMap<String, Market>,
    /// Reads the cores asked for that wait for a free hub connection; each
    /// market at most once (its core allows one read outstanding).
    pending: Vec<(String, core::Fetch)>,
    /// Batched reads running, at most the hub pool's size.
    reads_in_flight: usize,
    /// A reconcile is running: a tick while one runs starts none, so a slow
    /// database never piles them up.
    reconciling: bool,
    /// Markets whose read failed, read again when the retry timer fires.
    retry: Vec<String>,
    /// From 100 ms up to 2 s; reset by a read that succeeds.
    retry_backoff: Backoff,
    /// Results of spawned reads and reconciles back into the hub task (the
    /// receiving end is polled by `run`). Unbounded: at most one read per hub
    /// connection plus one reconcile are ever in flight, and each sends one
    /// result, also when it fails or panics.
    results_tx: mpsc::UnboundedSender<Internal>,
    /// When the NOTIFY-queue warning was last logged; None while below the threshold.
    queue_warned_at: Option<tokio::time::Instant>,
    /// When a ticker group of (market, interval) wants to be looked at.
    /// Entries may be stale (the group emitted or left): polling is cheap.
    deadlines: BinaryHeap<Reverse<(tokio::time::Instant, String, u32)>>,
}

impl Hub {
    async fn run(
        mut self,
        mut events: mpsc::UnboundedReceiver<HubEvent>,
        mut joins: mpsc::Receiver<Join>,
        mut results_rx: mpsc::UnboundedReceiver<Internal>,
        shutdown: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(self.cfg.reconcile_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let ticker_due = self.deadlines.peek().map(|Reverse((at, _, _))| *at);
            // Cancel safety: every branch is an mpsc recv, a tick, a sleep or
            // a token, all cancel-safe; nothing is lost when another branch wins.
            tokio::select! {
                _ = shutdown.cancelled() => return,
                Some(ev) = events.recv() => self.on_event(ev),
                Some(j) = joins.recv() => self.on_join(j),
                Some(i) = results_rx.recv() => self.on_internal(i),
                _ = tick.tick() => self.on_tick(),
                _ = tokio::time::sleep_until(ticker_due.unwrap_or_else(tokio::time::Instant::now)), if ticker_due.is_some() => self.on_ticker_due(),
            }
        }
    }

    fn on_event(&mut self, ev: HubEvent) {
        match ev {
            HubEvent::Doorbell { market, seq } => {
                // Markets nobody follows here are not read at all.
                if let Some(m) = self.markets.get_mut(&market) {
                    if let Some(f) = m.core.doorbell(seq) {
                        self.fetch(&market, f);
                    }
                }
            }
            HubEvent::Signed {
                market,
                epoch,
                frame,
            } => {
                let seq = frame.seq;
                let (outcome, fetch, publish) = match self.markets.get_mut(&market) {
                    None => ("not_followed", None, false),
                    // Another epoch's payload (a replay from before a reset,
                    // or a join that saw the reset): the log decides.
                    Some(m) if m.epoch.as_ref() != Some(&epoch) => {
                        ("stale_epoch", m.core.doorbell(seq), false)
                    }
                    Some(m) => match m.core.signed(seq) {
                        core::Signed::Publish => ("published", None, true),
                        core::Signed::Duplicate => ("duplicate", None, false),
                        core::Signed::Gap(f) => ("gap", f, false),
                    },
                };
                if publish {
                    self.publish(&market, vec![frame]);
                }
                if let Some(f) = fetch {
                    self.fetch(&market, f);
                }
                metrics::counter!("marketcast_notification_outcomes_total", "outcome" => outcome)
                    .increment(1);
            }
            HubEvent::ListenUp => {
                let ids: Vec<String> = self.markets.keys().cloned().collect();
                for id in ids {
                    self.read(&id, core::MarketCore::repair);
                }
            }
        }
    }

    fn on_join(&mut self, j: Join) {
        let cfg = &self.cfg;
        let mut created = false;
        let m = self.markets.entry(j.market.clone()).or_insert_with(|| {
            created = true;
            let (tx, _) = broadcast::channel(FIRST_LIVE_QUEUE.min(cfg.live_queue));
            Market {
                core: core::MarketCore::new(j.head),
                shared: Arc::new(MarketShared {
                    id: j.market.clone(),
                    ring: RwLock::new(core::Ring::new(cfg.ring_size)),
                    head: AtomicI64::new(j.head),
                    tx: RwLock::new(tx),
                }),
                live_queue: FIRST_LIVE_QUEUE.min(cfg.live_queue),
                moved_from: None,
                volume: Some(j.volume),
                tickers: Vec::new(),
                epoch: Some(j.epoch.clone()),
            }
        });
        if m.epoch.as_ref().is_some_and(|e| *e != j.epoch) {
            m.epoch = None;
        }
        if m.volume.is_none() && m.core.head() == j.head {
            // The row the session read is at our head: its volume is ours.
            m.volume = Some(j.volume);
        }
        let live = match j.want {
            Want::Trades => LiveRx::Trades(m.shared.subscribe()),
            Want::Ticker { .. } if m.volume.is_none() => LiveRx::VolumeUnknown,
            Want::Ticker { interval_ms } => {
                let at = match m.tickers.iter().position(|t| t.interval_ms == interval_ms) {
                    Some(at) => at,
                    None => {
                        let (tx, _) = broadcast::channel(TICKER_QUEUE);
                        let interval = Duration::from_millis(interval_ms as u64);
                        m.tickers.push(TickerSlot {
                            interval_ms,
                            group: ticker::Group::new(interval, m.core.head()),
                            tx,
                            armed: None,
                        });
                        m.tickers.len() - 1
                    }
                };
                let slot = &m.tickers[at];
                LiveRx::Ticker {
                    rx: slot.tx.subscribe(),
                    boundary: slot.group.boundary(),
                }
            }
        };
        let shared = m.shared.clone();
        metrics::gauge!("marketcast_hub_markets").set(self.markets.len() as f64);
        // A doorbell that arrived before this market was followed was dropped;
        // one read now covers it.
        if created {
            self.poke(&j.market);
        }
        if j.reply.send(Joined { shared, live }).is_err() {
            // The session went away while waiting; its receiver is dropped and
            // the market leaves at the next tick if nobody else follows it.
        }
    }

    fn poke(&mut self, market: &str) {
        self.read(market, core::MarketCore::poke);
    }

    /// Ask `market`'s core for a read (`poke` or `repair`) and queue it.
    fn read(&mut self, market: &str, ask: fn(&mut core::MarketCore) -> Option<core::Fetch>) {
        if let Some(m) = self.markets.get_mut(market) {
            if let Some(f) = ask(&mut m.core) {
                self.fetch(market, f);
            }
        }
    }

    /// Read `markets` again after the retry backoff (a read failed: the
    /// database is down, or the path to it froze). One timer at a time;
    /// markets that fail meanwhile join its list.
    fn retry_later(&mut self, markets: Vec<String>) {
        let arm = self.retry.is_empty();
        self.retry.extend(markets);
        if arm {
            let wait = self.retry_backoff.next_wait();
            let tx = self.results_tx.clone();
            tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                let _ = tx.send(Internal::Retry); // Fails only when the hub has stopped.
            });
        }
    }

    /// Queue a core's read. Reads are batched: while every hub connection
    /// is busy, the markets rung meanwhile wait here and then go together in
    /// one query (`db::log::trade_frames_after_many`). Under load that turns one query
    /// per trade into one per batch of markets; at light load a read starts
    /// at once, so nothing waits for a batch to fill.
    fn fetch(&mut self, market: &str, f: core::Fetch) {
        // A market dropped and followed again may still have its old read
        // queued: one entry, from the lower seq (the core drops duplicates).
        match self.pending.iter_mut().find(|(m, _)| m == market) {
            Some((_, queued)) => queued.after = queued.after.min(f.after),
            None => self.pending.push((market.to_string(), f)),
        }
        self.dispatch();
    }

    fn dispatch(&mut self) {
        let per_read = (MAX_ROWS_PER_READ / self.reads.page).max(1);
        while !self.pending.is_empty() && self.reads_in_flight < self.reads.pool.status().max_size {
            self.reads_in_flight += 1;
            metrics::counter!("marketcast_log_reads_total").increment(1);
            let take = per_read.min(self.pending.len());
            let (markets, afters): (Vec<String>, Vec<i64>) = self
                .pending
                .drain(..take)
                .map(|(m, f)| (m, f.after))
                .unzip();
            let pool = self.reads.pool.clone();
            let (timeout, page) = (self.reads.timeout, self.reads.page as i64);
            let tx = self.results_tx.clone();
            tokio::spawn(async move {
                let read = db::with_connection(&pool, timeout, async |c| {
                    db::log::trade_frames_after_many(c, &markets, &afters, page).await
                });
                let result = match caught(read).await {
                    // Encoded once here, shared by every subscriber.
                    Ok(pages) => Ok(pages
                        .into_iter()
                        .map(|rows| {
                            let full = rows.len() as i64 == page;
                            (rows, full)
                        })
                        .collect()),
                    Err(e) => Err(e),
                };
                let _ = tx.send(Internal::Fetched { markets, result }); // Fails only when the hub has stopped.
            });
        }
    }

    fn on_internal(&mut self, i: Internal) {
        match i {
            Internal::Fetched { markets, result } => {
                self.reads_in_flight -= 1;
                match result {
                    Ok(pages) => {
                        self.retry_backoff.reset();
                        for (market, (rows, full)) in markets.into_iter().zip(pages) {
                            self.apply(market, rows, full);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(markets = markets.len(), error = %e, "reading new trades failed; retrying with backoff");
                        for market in &markets {
                            if let Some(m) = self.markets.get_mut(market) {
                                m.core.fetch_failed();
                            }
                        }
                        self.retry_later(markets);
                        return self.dispatch();
                    }
                }
                self.dispatch();
            }
            Internal::Retry => {
                let markets: Vec<String> = std::mem::take(&mut self.retry);
                for market in markets {
                    self.poke(&market);
                }
            }
            Internal::Reconciled(r) => {
                self.reconciling = false;
                let Reconciled {
                    heads,
                    notify_queue_usage,
                } = match r {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::debug!(error = %e, "reconcile skipped: database unavailable");
                        return;
                    }
                };
                self.check_queue(notify_queue_usage);
                for (id, last_seq) in heads {
                    let behind = self
                        .markets
                        .get(&id)
                        .is_some_and(|m| last_seq > m.core.head());
                    if behind {
                        self.read(&id, core::MarketCore::repair);
                    }
                }
            }
        }
    }

    /// One market's page from a batched read: publish what the core accepts.
    fn apply(&mut self, market: String, rows: Vec<EncodedTrade>, full: bool) {
        let Some(m) = self.markets.get_mut(&market) else {
            return;
        };
        let applied = m.core.fetched(rows, full);
        if applied.skipped > 0 {
            tracing::warn!(%market, skipped = applied.skipped, head = m.core.head(), "trades above the head were pruned; subscribers still owed them get history_unavailable");
            // Their quantities are gone with them: the volume is unknown,
            // and no ticker span can cross the hole. Dropping the groups
            // ends their subscriptions, which were owed the pruned trades.
            m.volume = None;
            m.tickers.clear();
        }
        if applied.repaired > 0 {
            metrics::counter!("marketcast_gaps_repaired_total").increment(applied.repaired as u64);
        }
        self.publish(&market, applied.publish);
        if let Some(f) = applied.next {
            self.fetch(&market, f);
        }
    }

    /// Publish `market`'s trades that its core accepted (in seq order, each
    /// the head's successor): ring, head, live queue, ticker groups.
    fn publish(&mut self, market: &str, mut publish: Vec<EncodedTrade>) {
        let Some(m) = self.markets.get_mut(market) else {
            return;
        };
        for t in &mut publish {
            if let Some(v) = &mut m.volume {
                *v = v.saturating_add(t.qty);
                t.volume = *v;
            }
        }
        if !publish.is_empty() {
            metrics::counter!("marketcast_trades_published_total").increment(publish.len() as u64);
            {
                let mut ring = m.shared.ring.write().unwrap_or_else(|p| p.into_inner());
                for t in &publish {
                    ring.push(t.clone());
                }
            }
            m.shared.head.store(m.core.head(), Ordering::Release);
            // A burst that would overflow a small first queue: grow it now,
            // before publishing, so that its receivers move to the larger
            // one (they fill what they missed from the ring, stored above).
            if publish.len() > m.live_queue / 2 && m.live_queue < self.cfg.live_queue {
                let (bigger, _) = broadcast::channel(self.cfg.live_queue);
                let old = std::mem::replace(
                    &mut *m.shared.tx.write().unwrap_or_else(|p| p.into_inner()),
                    bigger,
                );
                // Err: no receiver on the old queue, nobody to tell.
                let _ = old.send(EncodedTrade::moved());
                m.moved_from = Some(old);
                m.live_queue = self.cfg.live_queue;
            }
            // Ticker groups fold each trade once, for all their subscribers.
            m.tickers
                .retain_mut(|slot| publish.iter().all(|t| slot.group.add(&t.tick())));
            let tx = m.shared.tx.read().unwrap_or_else(|p| p.into_inner());
            let now = now_micros();
            for t in publish {
                COMMIT_TO_SEND.record((now - t.ts_micros).max(0) as f64 / 1e6);
                // Err means no receiver right now: nobody to tell.
                let _ = tx.send(t);
            }
            drop(tx);
            self.poll_tickers(market);
        }
    }

    /// Emit what `market`'s ticker groups have due, and arm a deadline for
    /// what must wait.
    fn poll_tickers(&mut self, market: &str) {
        let Some(m) = self.markets.get_mut(market) else {
            return;
        };
        let now = tokio::time::Instant::now();
        for slot in &mut m.tickers {
            match slot.group.poll(now) {
                ticker::Next::Emit(fold) => {
                    slot.armed = None;
                    let frame = TickerFrame {
                        frame: fold.encode(market),
                        fold,
                        emitted_at: now.into_std(),
                    };
                    // Err means no receiver right now: nobody to tell.
                    let _ = slot.tx.send(frame);
                }
                ticker::Next::At(at) if slot.armed == Some(at) => {}
                ticker::Next::At(at) => {
                    slot.armed = Some(at);
                    self.deadlines
                        .push(Reverse((at, market.to_string(), slot.interval_ms)));
                }
                ticker::Next::Idle => {}
            }
        }
    }

    fn on_ticker_due(&mut self) {
        let now = tokio::time::Instant::now();
        let mut due = Vec::new();
        while let Some(Reverse((at, _, _))) = self.deadlines.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((at, market, interval_ms))) = self.deadlines.pop() else {
                break;
            };
            // Its entry is out of the heap: the group may arm again.
            if let Some(m) = self.markets.get_mut(&market) {
                for slot in m.tickers.iter_mut() {
                    if slot.interval_ms == interval_ms && slot.armed == Some(at) {
                        slot.armed = None;
                    }
                }
            }
            due.push(market);
        }
        due.sort();
        due.dedup();
        for market in due {
            // Every group of the market is looked at: a group whose frame is
            // not due yet arms again (a stale entry costs one poll).
            self.poll_tickers(&market);
        }
    }

    /// The cluster-wide NOTIFY queue only grows while some LISTEN session (any
    /// database, any channel) stops reading; when it is full every notifying
    /// commit, so every trade, fails. Our own listener never stops reading
    /// (see `listener.rs`), so the culprit is elsewhere: say so loudly, once
    /// a minute while it lasts.
    fn check_queue(&mut self, usage: f64) {
        let threshold = self.cfg.notify_queue_warn;
        if usage >= threshold {
            let due = self
                .queue_warned_at
                .is_none_or(|t| t.elapsed() >= QUEUE_WARN_EVERY);
            if due {
                self.queue_warned_at = Some(tokio::time::Instant::now());
                tracing::warn!(
                    usage,
                    threshold,
                    "NOTIFY queue usage above --notify-queue-warn: a LISTEN session in this cluster is not reading its notifications (look in pg_stat_activity for wait_event ClientWrite or idle in transaction); when the queue is full every trade's commit fails"
                );
            }
        } else if self.queue_warned_at.take().is_some() {
            tracing::info!(
                usage,
                threshold,
                "NOTIFY queue usage back below --notify-queue-warn"
            );
        }
    }

    /// Drop markets nobody follows, then compare the rest with the database
    /// (unless the previous comparison is still running).
    fn on_tick(&mut self) {
        self.markets.retain(|_, m| {
            // Receivers of a replaced live queue move over at their next
            // read; until all have, the old sender stays and they count.
            let behind = m.moved_from.as_ref().map_or(0, |old| old.receiver_count());
            if behind == 0 {
                m.moved_from = None;
            }
            // A group nobody follows any more leaves, its pending fold too:
            // the next subscriber starts a group from the head.
            m.tickers.retain(|t| t.tx.receiver_count() > 0);
            m.shared.receivers() + behind + m.tickers.len() > 0
        });
        metrics::gauge!("marketcast_hub_markets").set(self.markets.len() as f64);
        if self.reconciling {
            return;
        }
        self.reconciling = true;
        let ids: Vec<String> = self.markets.keys().cloned().collect();
        let pool = self.reads.pool.clone();
        let timeout = self.reads.timeout;
        let tx = self.results_tx.clone();
        tokio::spawn(async move {
            let r = caught(db::with_connection(&pool, timeout, async |c| {
                let usage = db::log::notify_queue_usage(c).await?;
                metrics::gauge!("marketcast_notify_queue_usage").set(usage);
                let heads = db::log::heads(c, &ids).await?;
                Ok(Reconciled {
                    heads,
                    notify_queue_usage: usage,
                })
            }))
            .await;
            let _ = tx.send(Internal::Reconciled(r)); // Fails only when the hub has stopped.
        });
    }
}

/// `step`, with a panic turned into an error: a read that panics (a bug, or
/// a row no code foresaw) must still report back, or its markets would wait
/// for it for ever.
async fn caught<T>(
    step: impl std::future::Future<Output = Result<T, db::DbError>>,
) -> Result<T, db::DbError> {
    use futures_util::FutureExt;
    match std::panic::AssertUnwindSafe(step).catch_unwind().await {
        Ok(r) => r,
        Err(panic) => {
            let why = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            tracing::error!(panic = %why, "a hub read panicked; its markets are read again");
            Err(db::DbError::Sql {
                code: "XX000".into(),
                message: format!("the read panicked: {why}"),
            })
        }
    }
}

/// Resolved once (the macro looks the metric up on every call); the hub starts
/// after `metrics::install`.
static COMMIT_TO_SEND: std::sync::LazyLock<metrics::Histogram> =
    std::sync::LazyLock::new(|| metrics::histogram!("marketcast_commit_to_send_seconds"));

fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}
