//! S1 (latency under load) and the table workload of issue 5 (200
//! subscribers on one market, 500 trades/s = 100k frames/s): subscribers
//! spread over markets, trades at a fixed rate, commit-to-client latency of
//! every frame, the delivery checks, and the server's CPU and RSS over the
//! measured window; Postgres's CPU over the same window, by backend
//! (`PgBreakdown`: which connection of which server, the feed, the WAL
//! writer...), for the servers fed through SQL.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;

use crate::feed::{feed, Plan};
use crate::fleet::Fleet;
use crate::hist::{clocks, Meter};
use crate::procs::{pg_activity, PgBreakdown, PgProcs, ProcStats};
use crate::report::{figures, Delivery};
use crate::{per_market, Env, Target};

/// Trades before the measured window (connections and caches settle).
const WARMUP: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct LatencyParams {
    pub key: &'static str,
    pub subscribers: usize,
    pub markets: usize,
    pub rate: u32,
    pub duration: Duration,
}

figures! {
    /// S1 or T, one run.
    pub struct LatencyFigures {
        subscribers: median,
        markets: median,
        rate: median,
        duration_s: median,
        committed_per_s: median,
        rows_per_insert: median,
        frames: median,
        frames_per_s: median,
        p50_ms: median,
        p99_ms: median,
        p999_ms: median,
        max_ms: median,
        server_cpu_pct: median,
        server_cpu_us_per_frame: median,
        server_rss_mib: median,
        postgres_cpu_pct: median,
        postgres_cpu_us_per_trade: median,
        bench_cpu_pct: median,
        ..delivery: Delivery,
    }
}

pub struct LatencyRun {
    pub rec: LatencyFigures,
    /// (quantile, ms) for the percentile plot.
    pub curve: Vec<(f64, f64)>,
    /// Postgres CPU by backend over the measured window (servers fed
    /// through SQL).
    pub pg: Option<PgBreakdown>,
}

pub async fn run(env: &Env, p: &LatencyParams, run: usize, target: Target) -> Result<LatencyRun> {
    let up = env.start(target).await?;
    let r = measure(env, &up, p, run, target).await;
    up.stop().await;
    r
}

async fn measure(
    env: &Env,
    up: &crate::Up,
    p: &LatencyParams,
    run: usize,
    target: Target,
) -> Result<LatencyRun> {
    let markets = env
        .make_markets(
            up,
            &format!("{}-r{run}-{}", p.key, target.name()),
            p.markets,
        )
        .await?;
    let d = p.duration;
    let meter = Arc::new(Meter::new(1, d + Duration::from_secs(3600)));
    let fleet = Fleet::connect(
        &env.client_rt,
        env.fleet_cfg(up, meter.clone(), None, None),
        &markets,
        p.subscribers,
        target.name(),
    )
    .await?;
    let lead = Duration::from_millis(500);
    let (now, now_us) = clocks();
    let start = now + lead;
    let t0 = start + WARMUP;
    meter.t0_us.store(
        now_us + (lead + WARMUP).as_micros() as i64,
        Ordering::Relaxed,
    );
    // The server's and Postgres's CPU over exactly the measured window;
    // Postgres's processes named (pg_stat_activity) just before it (every
    // connection is open by then: the warm-up's trades went through them)
    // and at its end (any started since).
    let pid = up.server.pid;
    let admin = env.admin.clone();
    let sampler = env.feed_rt.spawn(async move {
        tokio::time::sleep_until((t0 - Duration::from_millis(300)).into()).await;
        let mut activity = pg_activity(&admin).await;
        tokio::time::sleep_until(t0.into()).await;
        let me = std::process::id();
        let a = (ProcStats::of(pid), PgProcs::sample(), ProcStats::of(me));
        tokio::time::sleep_until((t0 + d).into()).await;
        let b = (ProcStats::of(pid), PgProcs::sample(), ProcStats::of(me));
        for (pid, x) in pg_activity(&admin).await {
            activity.entry(pid).or_insert(x);
        }
        (a, b, activity)
    });
    let plan = Plan {
        markets: Arc::new(markets.clone()),
        rate: p.rate as f64,
        start,
        end: t0 + d,
        meter: meter.clone(),
        cut: Default::default(),
    };
    let out = feed(env.feed_rt.clone(), env.sink(up), plan).await?;
    let ((s0, pg0, me0), (s1, pg1, me1), activity) = sampler.await?;
    if !fleet.drain(&out.final_seq, Duration::from_secs(15)).await {
        eprintln!("  not every subscriber got the last trade within 15 s");
    }
    let checks = fleet.finish(&out.final_seq).await;
    let subs = per_market(p.subscribers, markets.len());
    let expected: u64 = out.by_phase[0].iter().zip(&subs).map(|(t, s)| t * s).sum();
    let h = &meter.phases[0];
    let delivered = h.count();
    let undelivered = expected.saturating_sub(delivered);
    let secs = d.as_secs_f64();
    let committed = out.phase_total(0) as f64;
    let fed_by_sql = target != Target::Raw;
    let pg = PgBreakdown::between(&pg0, &pg1, &activity, committed);
    let server_cpu_pct = s1.cpu_pct_since(&s0);
    let rec = LatencyFigures {
        subscribers: p.subscribers as f64,
        markets: markets.len() as f64,
        rate: p.rate as f64,
        duration_s: secs,
        committed_per_s: committed / secs,
        rows_per_insert: out.committed as f64 / out.statements.max(1) as f64,
        frames: delivered as f64,
        frames_per_s: delivered as f64 / secs,
        p50_ms: h.quantile(0.50, undelivered) / 1000.0,
        p99_ms: h.quantile(0.99, undelivered) / 1000.0,
        p999_ms: h.quantile(0.999, undelivered) / 1000.0,
        max_ms: h.max_us() / 1000.0,
        server_cpu_pct,
        server_cpu_us_per_frame: server_cpu_pct / 100.0 * secs * 1e6 / delivered as f64,
        server_rss_mib: s1.rss_mib(),
        postgres_cpu_pct: pg.pct("total"),
        // The raw baseline commits nothing: its Postgres idles.
        postgres_cpu_us_per_trade: if fed_by_sql {
            pg.us_per_trade("total")
        } else {
            f64::NAN
        },
        bench_cpu_pct: me1.cpu_pct_since(&me0),
        delivery: Delivery::of(&[&checks], out.errors),
    };
    Ok(LatencyRun {
        rec,
        curve: h.curve(),
        pg: fed_by_sql.then_some(pg),
    })
}
