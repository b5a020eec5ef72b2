//! S3 connections: N idle subscribed connections on one market. The server's
//! RSS (VmRSS of its process) before any connection, once all are subscribed
//! and after one trade has reached them all, as KiB per connection; and the
//! time from that trade's commit (`ts`) to its arrival at the last client.
//! Then N/10 more connections, each on a market of its own: their RSS beyond
//! N/10 connections' worth is what a followed idle market costs the server
//! (its hub state and live queue).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};

use crate::fleet::Fleet;
use crate::hist::Meter;
use crate::report::{figures, Delivery};
use crate::{Env, Target, Up};

figures! {
    /// S3, one run.
    pub struct S3Figures {
        connections: median,
        connect_s: median,
        rss_before_mib: median,
        rss_subscribed_mib: median,
        rss_after_trade_mib: median,
        kib_per_conn: median,
        kib_per_conn_after_trade: median,
        fds: median,
        threads: median,
        reach_p50_ms: median,
        reach_p99_ms: median,
        reach_all_ms: median,
        kib_per_market: median,
        ..delivery: Delivery,
    }
}

/// Settle time before each RSS sample (allocator and kernel queues calm down).
const SETTLE: Duration = Duration::from_secs(2);

pub async fn run(env: &Env, run: usize, target: Target) -> Result<S3Figures> {
    let up = env.start(target).await?;
    let r = measure(env, &up, run, target).await;
    up.stop().await;
    r
}

async fn measure(env: &Env, up: &Up, run: usize, target: Target) -> Result<S3Figures> {
    let n = env.set.s3_connections;
    let markets = env
        .make_markets(up, &format!("s3-r{run}-{}", target.name()), 1)
        .await?;
    // One subscriber first, so that the market's state in the hub and the
    // server's pools exist before the baseline sample: what follows is the
    // cost of connections only.
    let meter = Arc::new(Meter::new(1, Duration::from_secs(3600)));
    meter.t0_us.store(0, std::sync::atomic::Ordering::Relaxed);
    let first = Fleet::connect(
        &env.client_rt,
        env.fleet_cfg(up, meter.clone(), None, None),
        &markets,
        1,
        target.name(),
    )
    .await?;
    tokio::time::sleep(SETTLE).await;
    let before = up.server.stats();
    let t = std::time::Instant::now();
    let fleet = Fleet::connect(
        &env.client_rt,
        env.fleet_cfg(up, meter.clone(), None, None),
        &markets,
        n - 1,
        target.name(),
    )
    .await?;
    let connect_s = t.elapsed().as_secs_f64();
    tokio::time::sleep(SETTLE).await;
    let subscribed = up.server.stats();
    let (seq, _ts) = env.publish_one(up, &markets[0]).await?;
    let all = first.drain(&[seq], Duration::from_secs(30)).await
        && fleet.drain(&[seq], Duration::from_secs(30)).await;
    if !all {
        eprintln!("  the trade did not reach every connection within 30 s");
    }
    tokio::time::sleep(SETTLE).await;
    let after = up.server.stats();
    let h = &meter.phases[0];
    if h.count() == 0 {
        bail!("no connection received the trade");
    }
    let undelivered = (n as u64).saturating_sub(h.count());
    let per_conn = |s: &crate::procs::ProcStats| {
        s.rss_kib.saturating_sub(before.rss_kib) as f64 / (n - 1) as f64
    };
    // Followed idle markets: one more connection on each, no trades.
    let k = (n / 10).max(1);
    let own = env
        .make_markets(up, &format!("s3m-r{run}-{}", target.name()), k)
        .await?;
    let followers = Fleet::connect(
        &env.client_rt,
        env.fleet_cfg(up, meter.clone(), None, None),
        &own,
        k,
        target.name(),
    )
    .await?;
    tokio::time::sleep(SETTLE).await;
    let with_markets = up.server.stats();
    let kib_per_market = with_markets.rss_kib.saturating_sub(after.rss_kib) as f64 / k as f64
        - per_conn(&subscribed);
    let c1 = first.finish(&[seq]).await;
    let c2 = fleet.finish(&[seq]).await;
    let no_trades = vec![0; k];
    let c3 = followers.finish(&no_trades).await;
    Ok(S3Figures {
        connections: n as f64,
        connect_s,
        rss_before_mib: before.rss_mib(),
        rss_subscribed_mib: subscribed.rss_mib(),
        rss_after_trade_mib: after.rss_mib(),
        kib_per_conn: per_conn(&subscribed),
        kib_per_conn_after_trade: per_conn(&after),
        fds: after.fds as f64,
        threads: after.threads as f64,
        reach_p50_ms: h.quantile(0.5, undelivered) / 1000.0,
        reach_p99_ms: h.quantile(0.99, undelivered) / 1000.0,
        reach_all_ms: h.quantile(1.0, undelivered) / 1000.0,
        kib_per_market,
        delivery: Delivery::of(&[&c1, &c2, &c3], 0),
    })
}
