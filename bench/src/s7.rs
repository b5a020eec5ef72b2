//! S7, the costs of contract 1.1's read side in the broadcaster:
//!
//! (a) ticker mode: N subscribers on one market at a fixed trade rate, all in
//!     trade mode, then (a fresh broadcaster) all in ticker mode with
//!     `interval_ms` 1000. The broadcaster's CPU over the measured window
//!     (/proc), as % of a core and as µs per trade. Trade subscribers must get
//!     every trade gapless; ticker subscribers contiguous spans
//!     (`from_seq` = the previous `to_seq` + 1) up to the final head.
//! (b) token verification: N WebSocket upgrades (no subscribe) to a
//!     broadcaster with `--jwt-hs256-secret`, each presenting a valid HS256
//!     token in `Authorization: Bearer`, and to one without token keys and no
//!     token: the broadcaster's CPU per connect; the difference is what
//!     verifying a token costs.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use tokio::sync::Semaphore;

use crate::feed::{feed, Plan};
use crate::fleet::{Checks, Fleet};
use crate::hist::{clocks, Meter};
use crate::procs::{cpu_ns, ProcStats};
use crate::report::{figures, Delivery};
use crate::ws::Conn;
use crate::{Env, Target, Up};

/// Trades before the measured window (connections and caches settle).
const WARMUP: Duration = Duration::from_secs(2);
/// The ticker subscribers' interval.
pub const TICKER_INTERVAL_MS: u64 = 1000;
/// Upgrades in flight at once in (b).
const CONNECT_CONCURRENCY: usize = 64;
/// The HS256 secret of (b)'s broadcaster (32+ bytes).
const SECRET: &str = "marketcast-bench-s7-hs256-secret-0123456789";

figures! {
    /// S7, one run of each of its four sides.
    pub struct S7Figures {
        subscribers: median,
        rate: median,
        duration_s: median,
        trades: median,
        trade_cpu_pct: median,
        trade_us_per_trade: median,
        trade_frames: median,
        trade_frames_expected: median,
        ticker_cpu_pct: median,
        ticker_us_per_trade: median,
        ticker_frames: median,
        ticker_frames_per_sub_per_s: median,
        cpu_ratio_trade_to_ticker: median,
        connects: median,
        connect_plain_s: median,
        connect_token_s: median,
        connect_plain_cpu_us: median,
        connect_token_cpu_us: median,
        verify_cpu_us: median,
        connect_errors: worst,
        ..delivery: Delivery,
    }
}

struct Load {
    cpu_pct: f64,
    us_per_trade: f64,
    trades: u64,
    committed: u64,
    checks: Checks,
    feed_errors: u64,
}

struct Connects {
    secs: f64,
    cpu_us_per_connect: f64,
    errors: u64,
}

pub async fn run(env: &Env, run: usize) -> Result<S7Figures> {
    let set = &env.set;
    let (n, d) = (set.s7_subscribers, set.s7_duration);
    // Alternate which side goes first from run to run.
    let (trade, ticker) = if run % 2 == 1 {
        let a = load_fresh(env, run, false).await?;
        let b = load_fresh(env, run, true).await?;
        (a, b)
    } else {
        let b = load_fresh(env, run, true).await?;
        let a = load_fresh(env, run, false).await?;
        (a, b)
    };
    eprintln!(
        "  trade mode: {:.1} % CPU, {:.2} µs/trade; ticker mode: {:.1} % CPU, {:.2} µs/trade",
        trade.cpu_pct, trade.us_per_trade, ticker.cpu_pct, ticker.us_per_trade
    );
    let token_args = vec!["--jwt-hs256-secret".to_string(), SECRET.to_string()];
    let token = sign_token()?;
    let (plain, with_token) = if run % 2 == 1 {
        let a = connects_fresh(env, &[], None).await?;
        let b = connects_fresh(env, &token_args, Some(&token)).await?;
        (a, b)
    } else {
        let b = connects_fresh(env, &token_args, Some(&token)).await?;
        let a = connects_fresh(env, &[], None).await?;
        (a, b)
    };
    let secs = d.as_secs_f64();
    Ok(S7Figures {
        subscribers: n as f64,
        rate: set.s7_rate as f64,
        duration_s: secs,
        trades: trade.trades as f64,
        trade_cpu_pct: trade.cpu_pct,
        trade_us_per_trade: trade.us_per_trade,
        trade_frames: trade.checks.received as f64,
        trade_frames_expected: (trade.committed * n as u64) as f64,
        ticker_cpu_pct: ticker.cpu_pct,
        ticker_us_per_trade: ticker.us_per_trade,
        ticker_frames: ticker.checks.received as f64,
        ticker_frames_per_sub_per_s: ticker.checks.received as f64
            / n as f64
            / (secs + WARMUP.as_secs_f64()),
        cpu_ratio_trade_to_ticker: trade.cpu_pct / ticker.cpu_pct,
        connects: set.s7_connects as f64,
        connect_plain_s: plain.secs,
        connect_token_s: with_token.secs,
        connect_plain_cpu_us: plain.cpu_us_per_connect,
        connect_token_cpu_us: with_token.cpu_us_per_connect,
        verify_cpu_us: with_token.cpu_us_per_connect - plain.cpu_us_per_connect,
        connect_errors: (plain.errors + with_token.errors) as f64,
        delivery: Delivery::of(
            &[&trade.checks, &ticker.checks],
            trade.feed_errors + ticker.feed_errors,
        ),
    })
}

async fn load_fresh(env: &Env, run: usize, ticker: bool) -> Result<Load> {
    let up = env.start(Target::Marketcast).await?;
    let r = load(env, &up, run, ticker).await;
    up.stop().await;
    r
}

/// `s7_subscribers` on one market, trade or ticker mode, `s7_rate` trades/s.
async fn load(env: &Env, up: &Up, run: usize, ticker: bool) -> Result<Load> {
    let set = &env.set;
    let mode = if ticker { "ticker" } else { "trades" };
    let markets = env
        .make_markets(up, &format!("s7-r{run}-{mode}"), 1)
        .await?;
    let d = set.s7_duration;
    // The clients' meter is never started: they record no latency (parsing
    // every trade's `ts` would only load this process). The feed's meter
    // counts the trades of the measured window.
    let client_meter = Arc::new(Meter::new(1, Duration::from_secs(3600)));
    let mut cfg = env.fleet_cfg(up, client_meter, None, None);
    if ticker {
        cfg.query = format!("&mode=ticker&interval_ms={TICKER_INTERVAL_MS}");
    }
    let fleet = Fleet::connect(&env.client_rt, cfg, &markets, set.s7_subscribers, mode).await?;
    let meter = Arc::new(Meter::new(1, d + Duration::from_secs(3600)));
    let lead = Duration::from_millis(500);
    let (now, now_us) = clocks();
    let start = now + lead;
    let t0 = start + WARMUP;
    meter.t0_us.store(
        now_us + (lead + WARMUP).as_micros() as i64,
        std::sync::atomic::Ordering::Relaxed,
    );
    let pid = up.server.pid;
    let sampler = env.feed_rt.spawn(async move {
        tokio::time::sleep_until(t0.into()).await;
        let a = ProcStats::of(pid);
        tokio::time::sleep_until((t0 + d).into()).await;
        (a, ProcStats::of(pid))
    });
    let plan = Plan {
        markets: Arc::new(markets.clone()),
        rate: set.s7_rate as f64,
        start,
        end: t0 + d,
        meter: meter.clone(),
        cut: Default::default(),
    };
    let out = feed(env.feed_rt.clone(), env.sink(up), plan).await?;
    let (s0, s1) = sampler.await?;
    // Ticker subscribers get the last span within one interval (two plus a
    // quarter while aligning).
    if !fleet.drain(&out.final_seq, Duration::from_secs(15)).await {
        eprintln!("  S7 {mode}: not every subscriber reached the last trade within 15 s");
    }
    let checks = fleet.finish(&out.final_seq).await;
    let cpu_pct = s1.cpu_pct_since(&s0);
    let trades = out.phase_total(0);
    let cpu_us = cpu_pct / 100.0 * d.as_secs_f64() * 1e6;
    Ok(Load {
        cpu_pct,
        us_per_trade: cpu_us / trades.max(1) as f64,
        trades,
        committed: out.committed,
        checks,
        feed_errors: out.errors,
    })
}

async fn connects_fresh(env: &Env, extra: &[String], token: Option<&str>) -> Result<Connects> {
    let up = env.start_with(Target::Marketcast, extra).await?;
    let r = connects(env, &up, token).await;
    up.stop().await;
    r
}

/// `s7_connects` upgrades to `/ws`, no subscribe, all held open until the
/// last is up; the broadcaster's CPU (schedstat, ns) from before the first to
/// after the last.
async fn connects(env: &Env, up: &Up, token: Option<&str>) -> Result<Connects> {
    let n = env.set.s7_connects;
    let (kind, addr) = (env.set.client, up.server.addr);
    // Let the fresh process settle (its start-up work is not a connect's).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sem = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let token: Option<Arc<str>> = token.map(Arc::from);
    let before = cpu_ns(up.server.pid);
    let t = Instant::now();
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let sem = sem.clone();
            let token = token.clone();
            env.client_rt.spawn(async move {
                let _permit = sem.acquire_owned().await;
                Conn::connect_auth(kind, addr, "/ws", token.as_deref()).await
            })
        })
        .collect();
    let mut conns = Vec::with_capacity(n);
    let mut errors = 0u64;
    let mut first_error = None;
    for h in handles {
        match h.await.context("a connect task panicked")? {
            Ok(c) => conns.push(c),
            Err(e) => {
                errors += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    let secs = t.elapsed().as_secs_f64();
    // Work the server does right after its 101 (the session's start) counts.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = cpu_ns(up.server.pid);
    if let Some(e) = first_error {
        eprintln!("  S7 connects: {errors} of {n} failed, first: {e}");
    }
    drop(conns);
    let cpu_us = after.saturating_sub(before) as f64 / 1000.0;
    Ok(Connects {
        secs,
        cpu_us_per_connect: cpu_us / n as f64,
        errors,
    })
}

/// A valid HS256 token for every market, an hour long.
fn sign_token() -> Result<String> {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .context("clock before 1970")?
        .as_secs();
    let claims = serde_json::json!({ "exp": now + 3600, "markets": ["*"], "sub": "bench" });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .context("signing the bench token")
}
