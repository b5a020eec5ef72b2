//! S6 reconnect storm: N subscribers over M markets while trades flow at R/s;
//! at once every client drops its connection (closes the socket, no close
//! handshake, as when a network path fails) and reconnects immediately with
//! `from_seq` = the last seq it saw. A client is live again when the first
//! trade committed after its new `subscribed` reaches it (so everything
//! before it was replayed, gapless); the figure is the time from the drop
//! until the last client is live again.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::feed::{feed, Plan};
use crate::fleet::Fleet;
use crate::hist::{clocks, Meter};
use crate::report::{figures, Delivery};
use crate::{Env, Target, Up};

/// Trades flowing before the storm.
const BEFORE: Duration = Duration::from_secs(3);
/// Longest wait for everyone to be live again.
const MAX_WAIT: Duration = Duration::from_secs(30);
/// Trades keep flowing this long after the last client is live again.
const AFTER: Duration = Duration::from_secs(1);

figures! {
    /// S6, one run.
    pub struct S6Figures {
        subscribers: median,
        markets: median,
        rate: median,
        all_live_s: median,
        p50_live_s: median,
        p99_live_s: median,
        not_live: worst,
        storm_server_cpu_pct: median,
        server_rss_mib: median,
        committed: median,
        ..delivery: Delivery,
    }
}

pub async fn run(env: &Env, run: usize) -> Result<S6Figures> {
    let up = env.start(Target::Marketcast).await?;
    let r = measure(env, &up, run).await;
    up.stop().await;
    r
}

async fn measure(env: &Env, up: &Up, run: usize) -> Result<S6Figures> {
    let set = &env.set;
    let n = set.s6_subscribers;
    let markets = env
        .make_markets(up, &format!("s6-r{run}"), set.s6_markets)
        .await?;
    // Latency is not recorded: the clients parse `ts` only to tell when they
    // are live again.
    let meter = Arc::new(Meter::new(1, Duration::from_secs(1)));
    let fleet = Fleet::connect(
        &env.client_rt,
        env.fleet_cfg(up, meter.clone(), None, None),
        &markets,
        n,
        "storm",
    )
    .await?;
    let (now, _) = clocks();
    let start = now + Duration::from_millis(500);
    let plan = Plan {
        markets: Arc::new(markets.clone()),
        rate: set.s6_rate as f64,
        start,
        end: start + BEFORE + MAX_WAIT + AFTER,
        meter,
        cut: Default::default(),
    };
    let cut = plan.cut.clone();
    let storm = async {
        tokio::time::sleep_until((start + BEFORE).into()).await;
        let before = up.server.stats();
        let at = fleet.storm();
        let t = Instant::now();
        let live = |f: &Fleet| -> Vec<i64> {
            f.probes
                .iter()
                .map(|(_, p)| p.live_us.load(Ordering::Relaxed))
                .collect()
        };
        let mut times = live(&fleet);
        while times.contains(&0) && t.elapsed() < MAX_WAIT {
            tokio::time::sleep(Duration::from_millis(5)).await;
            times = live(&fleet);
        }
        let after = up.server.stats();
        tokio::time::sleep(AFTER).await;
        cut.cancel();
        let mut secs: Vec<f64> = times
            .iter()
            .filter(|&&t| t != 0)
            .map(|&t| (t - at) as f64 / 1e6)
            .collect();
        secs.sort_by(f64::total_cmp);
        let not_live = times.iter().filter(|&&t| t == 0).count();
        (secs, not_live, after.cpu_pct_since(&before), after)
    };
    let (out, (secs, not_live, cpu, stats)) =
        tokio::join!(feed(env.feed_rt.clone(), env.sink(up), plan), storm);
    let out = out?;
    if !fleet.drain(&out.final_seq, Duration::from_secs(15)).await {
        eprintln!("  not every subscriber got the last trade within 15 s");
    }
    let checks = fleet.finish(&out.final_seq).await;
    let pick = |q: f64| {
        if not_live > 0 && q >= 1.0 {
            f64::INFINITY
        } else if secs.is_empty() {
            f64::NAN
        } else {
            secs[((q * secs.len() as f64).ceil() as usize).clamp(1, secs.len()) - 1]
        }
    };
    Ok(S6Figures {
        subscribers: n as f64,
        markets: markets.len() as f64,
        rate: set.s6_rate as f64,
        all_live_s: pick(1.0),
        p50_live_s: pick(0.5),
        p99_live_s: pick(0.99),
        not_live: not_live as f64,
        storm_server_cpu_pct: cpu,
        server_rss_mib: stats.rss_mib(),
        committed: out.committed as f64,
        delivery: Delivery::of(&[&checks], out.errors),
    })
}
