//! S2 fan-out: M subscribers on one market, the trade rate raised every step
//! until p99 exceeds the bound or the rate is not reached; the figure is the
//! highest delivered frames/s of a passing step. Frames not delivered by the
//! end of a step's drain gap count as infinitely late.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use serde_json::{json, Value};

use crate::feed::{feed, FeedOut, Plan};
use crate::fleet::Fleet;
use crate::hist::{clocks, Meter};
use crate::procs::ProcStats;
use crate::report::{figures, json_num, num, round3, Delivery};
use crate::{Env, Target, Up};

/// The pause after each step in which its frames may still arrive.
const GAP: Duration = Duration::from_secs(1);
/// Frames/s of the first step; the rate ladder is base x 1, 2, 3, 4, 6, 8,
/// 12, 16, ... (steps of x1.5 and x1.33) up to MAX_FRAMES. Low enough that a
/// loaded machine still passes a step or two.
const BASE_FRAMES: u32 = 50_000;
const MAX_FRAMES: u64 = 20_000_000;
/// A step "reaches" its rate when at least this share of it was committed.
const RATE_REACHED: f64 = 0.9;

figures! {
    /// S2, one run: its best passing step.
    pub struct S2Figures {
        subscribers: median,
        step_s: median,
        bound_ms: median,
        best_rate: median,
        best_frames_per_s: median,
        best_p50_ms: median,
        best_p99_ms: median,
        fail_rate: median,
        ..delivery: Delivery,
    }
}

pub struct S2Result {
    pub rec: S2Figures,
    pub steps: Vec<Value>,
}

/// The ladder for `subscribers`; `coarse` (--quick) doubles every step instead.
pub fn rates(subscribers: usize, coarse: bool) -> Vec<u32> {
    let base = (BASE_FRAMES / subscribers.max(1) as u32).max(1);
    let mut rates: Vec<u32> = (0..20)
        .flat_map(|a| {
            if coarse {
                vec![1u32 << a]
            } else {
                vec![1u32 << a, 3u32 << a]
            }
        })
        .map(|f| f.saturating_mul(base))
        .filter(|r| *r as u64 * subscribers as u64 <= MAX_FRAMES)
        .collect();
    rates.sort_unstable();
    rates.dedup();
    rates
}

pub async fn run(env: &Env, run: usize, target: Target) -> Result<S2Result> {
    let up = env.start(target).await?;
    let r = measure(env, &up, run, target).await;
    up.stop().await;
    r
}

async fn measure(env: &Env, up: &Up, run: usize, target: Target) -> Result<S2Result> {
    let set = &env.set;
    let m = set.s2_subscribers;
    let markets = env
        .make_markets(up, &format!("s2-r{run}-{}", target.name()), 1)
        .await?;
    let rates = rates(m, set.quick);
    let period = set.s2_step + GAP;
    let meter = Arc::new(Meter::new(rates.len(), period));
    let fleet = Fleet::connect(
        &env.client_rt,
        env.fleet_cfg(up, meter.clone(), None, None),
        &markets,
        m,
        target.name(),
    )
    .await?;
    let lead = Duration::from_secs(1);
    let (now, now_us) = clocks();
    let start0 = now + lead;
    meter
        .t0_us
        .store(now_us + lead.as_micros() as i64, Ordering::Relaxed);
    let markets = Arc::new(markets);
    let mut total = FeedOut::new(rates.len(), 1);
    let mut steps = Vec::new();
    let mut best: Option<(f64, f64, f64, f64)> = None; // rate, frames/s, p50, p99
    let mut fail_rate = f64::NAN;
    let step_s = set.s2_step.as_secs_f64();
    for (k, &rate) in rates.iter().enumerate() {
        let start = start0 + period * k as u32;
        let plan = Plan {
            markets: markets.clone(),
            rate: rate as f64,
            start,
            end: start + set.s2_step,
            meter: meter.clone(),
            cut: Default::default(),
        };
        let me = || ProcStats::of(std::process::id());
        let (before, me0) = (up.server.stats(), me());
        let out = feed(env.feed_rt.clone(), env.sink(up), plan).await?;
        let cpu = up.server.stats().cpu_pct_since(&before);
        let bench_cpu = me().cpu_pct_since(&me0);
        let rows_per_insert = out.committed as f64 / out.statements.max(1) as f64;
        total.merge(out);
        tokio::time::sleep_until((start + period).into()).await;
        let committed = total.by_phase[k][0];
        let expected = committed * m as u64;
        let h = &meter.phases[k];
        let delivered = h.count();
        let undelivered = expected.saturating_sub(delivered);
        let (p50, p99) = (h.quantile(0.5, undelivered), h.quantile(0.99, undelivered));
        let achieved = committed as f64 / step_s;
        let fps = delivered as f64 / step_s;
        let rate_ok = achieved >= RATE_REACHED * rate as f64;
        let lat_ok = p99 <= set.s2_bound_us as f64;
        let pass = rate_ok && lat_ok;
        eprintln!(
            "  step {rate}/s: committed {achieved:.0}/s ({rows_per_insert:.1}/INSERT), {fps:.0} frames/s, p50 {} ms, p99 {} ms, server CPU {cpu:.0} %, load client CPU {bench_cpu:.0} %, undelivered {undelivered}{}",
            num(p50 / 1000.0),
            num(p99 / 1000.0),
            if pass { "" } else if !rate_ok { "  <- rate not reached" } else { "  <- p99 over the bound" }
        );
        steps.push(json!({
            "rate": rate,
            "committed_per_s": round3(achieved),
            "rows_per_insert": round3(rows_per_insert),
            "frames_per_s": round3(fps),
            "p50_ms": json_num(p50 / 1000.0),
            "p99_ms": json_num(p99 / 1000.0),
            "server_cpu_pct": json_num(cpu),
            "bench_cpu_pct": json_num(bench_cpu),
            "undelivered": undelivered,
            "pass": pass,
        }));
        if pass {
            best = Some((rate as f64, fps, p50 / 1000.0, p99 / 1000.0));
        } else {
            fail_rate = rate as f64;
            break;
        }
    }
    if !fleet.drain(&total.final_seq, Duration::from_secs(10)).await {
        eprintln!("  not every subscriber got the last trade within 10 s (after the failing step)");
    }
    let checks = fleet.finish(&total.final_seq).await;
    let (rate, fps, p50, p99) = best.unwrap_or((0.0, 0.0, f64::NAN, f64::NAN));
    let rec = S2Figures {
        subscribers: m as f64,
        step_s,
        bound_ms: set.s2_bound_us as f64 / 1000.0,
        best_rate: rate,
        best_frames_per_s: fps,
        best_p50_ms: p50,
        best_p99_ms: p99,
        fail_rate,
        delivery: Delivery::of(&[&checks], total.errors),
    };
    Ok(S2Result { rec, steps })
}
