//! The trade feeds of S1, S2, S3, S6, the table workload and the soak:
//! trades at a fixed rate, on a fixed schedule, committed through plain SQL
//! (marketcast) or published by the raw baseline server (no database).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

use marketcast::db;

use crate::hist::Meter;
use crate::raw::RawControl;

/// Most rows in one INSERT of the SQL feed (it batches only when behind).
const FEED_BATCH_MAX: usize = 32;

/// Where the trades of a run go.
#[derive(Clone)]
pub enum Sink {
    Sql(Arc<SqlFeed>),
    Raw(Arc<RawControl>),
}

/// One feed run: `rate` trades/s spread round-robin over `markets`, slot k due
/// at `start + k/rate`, until `end`.
#[derive(Clone)]
pub struct Plan {
    pub markets: Arc<Vec<String>>,
    pub rate: f64,
    pub start: Instant,
    pub end: Instant,
    pub meter: Arc<Meter>,
    /// Ends the plan early (S6 stops once every client is live again).
    pub cut: CancellationToken,
}

impl Plan {
    fn due(&self, k: u64) -> Instant {
        self.start + Duration::from_secs_f64(k as f64 / self.rate)
    }
}

/// What a feed committed, by the meter's phases (by each trade's `ts`).
#[derive(Debug, Default)]
pub struct FeedOut {
    /// [phase][market] trades stamped in that phase.
    pub by_phase: Vec<Vec<u64>>,
    /// Highest seq per market.
    pub final_seq: Vec<i64>,
    pub committed: u64,
    pub statements: u64,
    pub errors: u64,
    pub first_error: Option<String>,
}

impl FeedOut {
    pub fn new(phases: usize, markets: usize) -> FeedOut {
        FeedOut {
            by_phase: vec![vec![0; markets]; phases],
            final_seq: vec![0; markets],
            ..Default::default()
        }
    }

    pub fn merge(&mut self, o: FeedOut) {
        for (a, b) in self.by_phase.iter_mut().zip(o.by_phase) {
            for (x, y) in a.iter_mut().zip(b) {
                *x += y;
            }
        }
        for (a, b) in self.final_seq.iter_mut().zip(o.final_seq) {
            *a = (*a).max(b);
        }
        self.committed += o.committed;
        self.statements += o.statements;
        self.errors += o.errors;
        if self.first_error.is_none() {
            self.first_error = o.first_error;
        }
    }

    fn count(&mut self, meter: &Meter, market: usize, seq: i64, ts_us: i64) {
        self.committed += 1;
        self.final_seq[market] = self.final_seq[market].max(seq);
        if let Some(p) = meter.phase(ts_us) {
            self.by_phase[p][market] += 1;
        }
    }

    pub fn phase_total(&self, phase: usize) -> u64 {
        self.by_phase[phase].iter().sum()
    }
}

pub fn random_trade() -> (&'static str, u32, i64) {
    let side = if fastrand::bool() { "yes" } else { "no" };
    (side, fastrand::u32(100..=9900), fastrand::i64(1..=100))
}

/// Run a plan on the feed runtime.
pub async fn feed(rt: Handle, sink: Sink, plan: Plan) -> Result<FeedOut> {
    let mut out = FeedOut::new(plan.meter.phases.len(), plan.markets.len());
    match sink {
        Sink::Sql(sql) => {
            let hs: Vec<_> = (0..sql.conns.len())
                .map(|w| rt.spawn(sql_feed_conn(sql.clone(), w, plan.clone())))
                .collect();
            for h in hs {
                out.merge(h.await.context("a feed task panicked")?);
            }
        }
        Sink::Raw(ctl) => {
            let o = rt
                .spawn(raw_feed(ctl.clone(), plan))
                .await
                .context("the raw feed panicked")??;
            out.merge(o);
        }
    }
    if let Some(e) = &out.first_error {
        eprintln!("  feed: {} trades failed, first: {e}", out.errors);
    }
    if out.committed == 0 {
        bail!(
            "the feed committed nothing: {}",
            out.first_error.as_deref().unwrap_or("?")
        );
    }
    Ok(out)
}

/// SQL connections committing trades for S1/S2, connected on the feed runtime.
pub struct SqlFeed {
    conns: Vec<(tokio_postgres::Client, tokio_postgres::Statement)>,
}

/// One statement for one or more trades: the rows are inserted in array order,
/// so market rows are locked in that order (sorted by id: no deadlocks).
const FEED_SQL: &str = "INSERT INTO trades (market_id, side, price, qty) \
     SELECT m, s, p::numeric, q FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[]) \
     WITH ORDINALITY AS u(m, s, p, q, o) ORDER BY o \
     RETURNING market_id, seq, (extract(epoch FROM created_at) * 1000000)::int8";

impl SqlFeed {
    pub async fn connect(url: &str, n: usize) -> Result<SqlFeed> {
        let mut conns = Vec::with_capacity(n);
        for _ in 0..n {
            let c = db::connect(url, "marketcast-bench-feed").await?;
            let st = c
                .prepare(FEED_SQL)
                .await
                .context("preparing the feed INSERT")?;
            conns.push((c, st));
        }
        Ok(SqlFeed { conns })
    }
}

/// Connection `w` of the SQL feed takes slots w, w+W, w+2W, ...: with 10
/// markets and 5 connections each connection owns two markets. When it falls
/// behind, every due slot goes into one INSERT (up to FEED_BATCH_MAX rows).
async fn sql_feed_conn(feed: Arc<SqlFeed>, w: usize, plan: Plan) -> FeedOut {
    let nw = feed.conns.len() as u64;
    let (client, stmt) = &feed.conns[w];
    let nm = plan.markets.len() as u64;
    let index: HashMap<&str, usize> = plan
        .markets
        .iter()
        .enumerate()
        .map(|(i, m)| (m.as_str(), i))
        .collect();
    let mut out = FeedOut::new(plan.meter.phases.len(), plan.markets.len());
    let mut k = w as u64;
    loop {
        let first = plan.due(k);
        if first >= plan.end {
            break;
        }
        // Cancel safety: both are cancel-safe.
        tokio::select! {
            _ = tokio::time::sleep_until(first.into()) => {}
            _ = plan.cut.cancelled() => break,
        }
        let now = Instant::now();
        let mut rows: Vec<(usize, &str, String, i64)> = Vec::new();
        while rows.len() < FEED_BATCH_MAX {
            let d = plan.due(k);
            if d > now || d >= plan.end {
                break;
            }
            let (side, ticks, qty) = random_trade();
            rows.push(((k % nm) as usize, side, format!("0.{ticks:04}"), qty));
            k += nw;
        }
        rows.sort_by(|a, b| plan.markets[a.0].cmp(&plan.markets[b.0]));
        let ms: Vec<&str> = rows.iter().map(|r| plan.markets[r.0].as_str()).collect();
        let sides: Vec<&str> = rows.iter().map(|r| r.1).collect();
        let prices: Vec<&str> = rows.iter().map(|r| r.2.as_str()).collect();
        let qtys: Vec<i64> = rows.iter().map(|r| r.3).collect();
        match client.query(stmt, &[&ms, &sides, &prices, &qtys]).await {
            Ok(rs) => {
                out.statements += 1;
                for r in rs {
                    let parsed: Result<(&str, i64, i64), _> =
                        (|| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))();
                    match parsed {
                        Ok((m, seq, ts)) => match index.get(m) {
                            Some(&i) => out.count(&plan.meter, i, seq, ts),
                            None => out.errors += 1,
                        },
                        Err(e) => {
                            let e: tokio_postgres::Error = e;
                            out.errors += 1;
                            out.first_error
                                .get_or_insert(format!("reading RETURNING: {e}"));
                        }
                    }
                }
            }
            Err(e) => {
                out.errors += rows.len() as u64;
                out.first_error
                    .get_or_insert_with(|| db::DbError::from(e).to_string());
            }
        }
    }
    out
}

/// The baseline's feed: one task asking the raw server to publish every due
/// slot (one request per tick of the schedule).
async fn raw_feed(ctl: Arc<RawControl>, plan: Plan) -> Result<FeedOut> {
    let nm = plan.markets.len() as u64;
    let mut out = FeedOut::new(plan.meter.phases.len(), plan.markets.len());
    let mut k = 0u64;
    loop {
        let first = plan.due(k);
        if first >= plan.end {
            break;
        }
        // Cancel safety: both are cancel-safe.
        tokio::select! {
            _ = tokio::time::sleep_until(first.into()) => {}
            _ = plan.cut.cancelled() => break,
        }
        let now = Instant::now();
        let mut due = Vec::new();
        loop {
            let d = plan.due(k);
            if d > now || d >= plan.end {
                break;
            }
            due.push((k % nm) as usize);
            k += 1;
        }
        let ids: Vec<&str> = due.iter().map(|&i| plan.markets[i].as_str()).collect();
        let published = ctl.publish(&ids).await?;
        if published.len() != due.len() {
            return Err(anyhow!(
                "the raw server published {} of {} trades",
                published.len(),
                due.len()
            ));
        }
        out.statements += 1;
        for (&i, (seq, ts)) in due.iter().zip(published) {
            out.count(&plan.meter, i, seq, ts);
        }
    }
    Ok(out)
}
