//! Soak (issue 6): N WebSocket connections over M markets with trades flowing
//! at R/s for a long time (10 minutes by default). The server's RSS, open
//! descriptors, threads and its own gauges (connections, subscriptions,
//! markets in the hub) are sampled after a warm-up, every `--soak-sample`
//! seconds and at the end (after the last trade has reached everyone,
//! connections still open); every client checks its seq stream, so any lost,
//! duplicated or reordered trade shows. The broadcaster runs with a small
//! `--ring-size` (64) so that every market's ring of recent trades is full
//! before the first sample: a growing ring is expected memory, not a leak,
//! and with the default ring (4096) at 2 trades/s per market it would still
//! be filling after 10 minutes.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::{json, Value};

use crate::feed::{feed, Plan};
use crate::fleet::Fleet;
use crate::hist::{clocks, Meter};
use crate::procs::{PgCpu, ProcStats};
use crate::report::{figures, json_num, Delivery};
use crate::{Env, Target, Up};

/// The broadcaster's gauges sampled beside /proc.
const GAUGES: [&str; 3] = [
    "marketcast_ws_connections",
    "marketcast_subscriptions",
    "marketcast_hub_markets",
];

figures! {
    /// The soak.
    pub struct SoakFigures {
        connections: median,
        markets: median,
        rate: median,
        duration_s: median,
        committed: median,
        frames: median,
        frames_per_s: median,
        p50_ms: median,
        p99_ms: median,
        p999_ms: median,
        max_ms: median,
        server_cpu_pct: median,
        postgres_cpu_pct: median,
        rss_start_mib: median,
        rss_end_mib: median,
        fds_start: median,
        fds_end: median,
        threads_start: median,
        threads_end: median,
        ws_connections_start: median,
        ws_connections_end: median,
        subscriptions_start: median,
        subscriptions_end: median,
        hub_markets_start: median,
        hub_markets_end: median,
        ..delivery: Delivery,
    }
}

pub struct SoakResult {
    pub rec: SoakFigures,
    /// One JSON object per sample: t_s, rss_mib, fds, threads, connections.
    pub samples: Vec<Value>,
}

pub async fn run(env: &Env) -> Result<SoakResult> {
    let ring = [
        "--ring-size".to_string(),
        env.set.soak_ring_size.to_string(),
    ];
    let up = env.start_with(Target::Marketcast, &ring).await?;
    let r = measure(env, &up).await;
    up.stop().await;
    r
}

fn sample(t0: Instant, s: &ProcStats, g: &[f64]) -> Value {
    json!({
        "t_s": (t0.elapsed().as_secs_f64() * 10.0).round() / 10.0,
        "rss_mib": json_num(s.rss_mib()),
        "fds": s.fds,
        "threads": s.threads,
        "connections": json_num(g[0]),
        "subscriptions": json_num(g[1]),
        "hub_markets": json_num(g[2]),
    })
}

async fn measure(env: &Env, up: &Up) -> Result<SoakResult> {
    let set = &env.set;
    let n = set.soak_connections;
    let d = set.soak_duration;
    let markets = env.make_markets(up, "soak", set.soak_markets).await?;
    let meter = Arc::new(Meter::new(1, d + Duration::from_secs(3600)));
    eprintln!("  connecting {n} subscribers");
    let fleet = Fleet::connect(
        &env.client_rt,
        env.fleet_cfg(up, meter.clone(), None, None),
        &markets,
        n,
        "soak",
    )
    .await?;
    let (now, now_us) = clocks();
    let start = now + Duration::from_millis(500);
    let warmup = set.soak_warmup;
    let t0 = start + warmup;
    meter.t0_us.store(
        now_us + (Duration::from_millis(500) + warmup).as_micros() as i64,
        Ordering::Relaxed,
    );
    let plan = Plan {
        markets: Arc::new(markets.clone()),
        rate: set.soak_rate as f64,
        start,
        end: t0 + d,
        meter: meter.clone(),
        cut: Default::default(),
    };
    let every = set.soak_sample;
    let sampler = async {
        tokio::time::sleep_until(t0.into()).await;
        let first = (
            up.server.stats(),
            env.metrics(up, &GAUGES).await,
            PgCpu::sample(),
        );
        let mut samples = vec![sample(t0, &first.0, &first.1)];
        let mut next = t0 + every;
        while next < t0 + d {
            tokio::time::sleep_until(next.into()).await;
            let s = up.server.stats();
            let g = env.metrics(up, &GAUGES).await;
            eprintln!(
                "  soak {:>4.0} s: RSS {:.1} MiB, {} fds, {} threads, {} connections, {} subscriptions, {} frames",
                t0.elapsed().as_secs_f64(),
                s.rss_mib(),
                s.fds,
                s.threads,
                g[0],
                g[1],
                meter.phases[0].count()
            );
            samples.push(sample(t0, &s, &g));
            next += every;
        }
        (first, samples)
    };
    let (out, ((s0, c0, pg0), mut samples)) =
        tokio::join!(feed(env.feed_rt.clone(), env.sink(up), plan), sampler);
    let out = out?;
    let last_sample = (up.server.stats(), PgCpu::sample());
    let drained = fleet.drain(&out.final_seq, Duration::from_secs(30)).await;
    if !drained {
        eprintln!("  not every subscriber got the last trade within 30 s");
    }
    let s1 = up.server.stats();
    let g1 = env.metrics(up, &GAUGES).await;
    samples.push(sample(t0, &s1, &g1));
    let checks = fleet.finish(&out.final_seq).await;
    let h = &meter.phases[0];
    let secs = d.as_secs_f64();
    let rec = SoakFigures {
        connections: n as f64,
        markets: markets.len() as f64,
        rate: set.soak_rate as f64,
        duration_s: secs,
        committed: out.committed as f64,
        frames: h.count() as f64,
        frames_per_s: h.count() as f64 / secs,
        p50_ms: h.quantile(0.5, 0) / 1000.0,
        p99_ms: h.quantile(0.99, 0) / 1000.0,
        p999_ms: h.quantile(0.999, 0) / 1000.0,
        max_ms: h.max_us() / 1000.0,
        server_cpu_pct: last_sample.0.cpu_pct_since(&s0),
        postgres_cpu_pct: last_sample.1.pct_since(&pg0),
        rss_start_mib: s0.rss_mib(),
        rss_end_mib: s1.rss_mib(),
        fds_start: s0.fds as f64,
        fds_end: s1.fds as f64,
        threads_start: s0.threads as f64,
        threads_end: s1.threads as f64,
        ws_connections_start: c0[0],
        ws_connections_end: g1[0],
        subscriptions_start: c0[1],
        subscriptions_end: g1[1],
        hub_markets_start: c0[2],
        hub_markets_end: g1[2],
        delivery: Delivery::of(&[&checks], out.errors),
    };
    Ok(SoakResult { rec, samples })
}
