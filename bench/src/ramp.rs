//! S2 fan-out: M subscribers on one market, the trade rate raised step by
//! step; the figure is the highest delivered frames/s of a passing step. A
//! step passes when at least 90 % of its rate was committed, its p99 is
//! within the bound (frames not delivered by the end of the step's drain gap
//! count as infinitely late) and no client lost any of its trades (a seq
//! skipped over: the peers have no replay).
//!
//! The ladder (issue 14: one noisy step must not decide the figure): coarse
//! steps (x1.33-x1.5) until the first failing one, then fine steps from the
//! last passing coarse step up (a quarter of that coarse interval, at most
//! 125k frames/s: 25 trades/s at 5,000 subscribers), until two fine steps
//! fail in a row. After a failing step the server gets time to recover (its
//! backlog delivered or dropped) before the next one. `--quick`: the coarse
//! doubling ladder alone, stopping at its first failing step.

use std::sync::Arc;
use std::time::{Duration, Instant};

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
/// Frames/s of the first step; the coarse ladder is base x 1, 2, 3, 4, 6, 8,
/// 12, 16, ... (steps of x1.5 and x1.33) up to MAX_FRAMES. Low enough that a
/// loaded machine, or the Node bridge, still passes a step or two.
const BASE_FRAMES: u32 = 50_000;
const MAX_FRAMES: u64 = 20_000_000;
/// The fine ladder's largest step, frames/s (25 trades/s at 5,000
/// subscribers).
const FINE_FRAMES: u64 = 125_000;
/// Fine steps per coarse interval, at least.
const FINE_PER_COARSE: f64 = 4.0;
/// Fine steps failing in a row that end the ladder.
const FINE_FAILS: usize = 2;
/// Steps of one run, at most.
const MAX_STEPS: usize = 60;
/// A step "reaches" its rate when at least this share of it was committed.
const RATE_REACHED: f64 = 0.9;
/// After a failing step: the longest wait for the server to recover, and
/// how long nothing must arrive for it to count as recovered when not every
/// client has the last trade (a peer that dropped frames never sends them).
const RECOVER_MAX: Duration = Duration::from_secs(20);
const QUIET: Duration = Duration::from_secs(1);

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
        best_server_cpu_pct: median,
        best_cpu_us_per_frame: median,
        fail_rate: median,
        fine_step_rate: median,
        steps: median,
        ..delivery: Delivery,
    }
}

pub struct S2Result {
    pub rec: S2Figures,
    pub steps: Vec<Value>,
}

/// The coarse ladder for `subscribers`; `coarse` (--quick) doubles every
/// step instead.
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

/// The rates of one run, decided step by step from each step's outcome.
struct Ladder {
    coarse: Vec<u32>,
    /// The next coarse step.
    i: usize,
    /// In the fine phase: its next rate and its step.
    fine: Option<(u32, u32)>,
    fine_fails: usize,
    coarse_only: bool,
    subscribers: usize,
    done: bool,
}

impl Ladder {
    fn new(subscribers: usize, coarse_only: bool) -> Ladder {
        Ladder {
            coarse: rates(subscribers, coarse_only),
            i: 0,
            fine: None,
            fine_fails: 0,
            coarse_only,
            subscribers,
            done: false,
        }
    }

    fn next(&self) -> Option<(u32, &'static str)> {
        if self.done {
            return None;
        }
        match self.fine {
            None => self.coarse.get(self.i).map(|&r| (r, "coarse")),
            Some((r, _)) => {
                (r as u64 * self.subscribers as u64 <= MAX_FRAMES).then_some((r, "fine"))
            }
        }
    }

    /// The step just run passed or not.
    fn record(&mut self, pass: bool) {
        match self.fine {
            None if pass => self.i += 1,
            None if self.coarse_only => self.done = true,
            None => {
                let fail = self.coarse[self.i];
                let from = if self.i == 0 {
                    0
                } else {
                    self.coarse[self.i - 1]
                };
                let cap = (FINE_FRAMES / self.subscribers.max(1) as u64).max(1) as u32;
                let quarter = ((fail - from) as f64 / FINE_PER_COARSE).round().max(1.0) as u32;
                let step = quarter.min(cap);
                self.fine = Some((from + step, step));
            }
            Some((r, step)) => {
                if pass {
                    self.fine_fails = 0;
                } else {
                    self.fine_fails += 1;
                    self.done = self.fine_fails >= FINE_FAILS;
                }
                self.fine = Some((r + step, step));
            }
        }
    }

    fn fine_step(&self) -> Option<u32> {
        self.fine.map(|(_, s)| s)
    }
}

pub async fn run(env: &Env, run: usize, target: Target) -> Result<S2Result> {
    let up = env.start(target).await?;
    let r = measure(env, &up, run, target).await;
    up.stop().await;
    r
}

/// One step, as measured.
struct Step {
    rate: u32,
    phase: &'static str,
    /// Its trades are the seqs `seq_after + 1 ..= seq_upto`.
    seq_after: i64,
    seq_upto: i64,
    achieved: f64,
    rows_per_insert: f64,
    fps: f64,
    p50: f64,
    p99: f64,
    cpu: f64,
    bench_cpu: f64,
    undelivered: u64,
    rate_ok: bool,
    lat_ok: bool,
}

impl Step {
    fn pass(&self, lost: u64) -> bool {
        self.rate_ok && self.lat_ok && lost == 0
    }
}

/// After a failing step: wait until every client has the last trade, or
/// nothing has arrived for QUIET (what is missing is lost), at most
/// RECOVER_MAX. False: still delivering at the deadline.
async fn recover(fleet: &Fleet, final_seq: &[i64]) -> bool {
    let deadline = Instant::now() + RECOVER_MAX;
    let (mut seen, mut since) = (fleet.progress(), Instant::now());
    loop {
        if fleet.drained(final_seq) {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let p = fleet.progress();
        if p != seen {
            (seen, since) = (p, Instant::now());
        } else if since.elapsed() >= QUIET {
            return true;
        }
    }
}

async fn measure(env: &Env, up: &Up, run: usize, target: Target) -> Result<S2Result> {
    let set = &env.set;
    let m = set.s2_subscribers;
    let markets = env
        .make_markets(up, &format!("s2-r{run}-{}", target.name()), 1)
        .await?;
    let mut ladder = Ladder::new(m, set.quick);
    let period = set.s2_step + GAP;
    let meter = Arc::new(Meter::new(MAX_STEPS, period));
    let fleet = Fleet::connect(
        &env.client_rt,
        env.fleet_cfg(up, meter.clone(), None, None),
        &markets,
        m,
        target.name(),
    )
    .await?;
    let markets = Arc::new(markets);
    let mut total = FeedOut::new(MAX_STEPS, 1);
    let mut steps: Vec<Step> = Vec::new();
    let step_s = set.s2_step.as_secs_f64();
    let mut earliest = Instant::now() + Duration::from_secs(1);
    while let Some((rate, phase)) = ladder.next() {
        let k = steps.len();
        if k >= MAX_STEPS {
            eprintln!("  {MAX_STEPS} steps: the ladder ends here");
            break;
        }
        let (now, now_us) = clocks();
        let start = earliest.max(now + Duration::from_millis(100));
        meter.anchor(k, now_us + (start - now).as_micros() as i64);
        let seq_after = total.final_seq[0];
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
        earliest = start + period;
        let committed = total.by_phase[k][0];
        let expected = committed * m as u64;
        let h = &meter.phases[k];
        let delivered = h.count();
        let undelivered = expected.saturating_sub(delivered);
        let (p50, p99) = (h.quantile(0.5, undelivered), h.quantile(0.99, undelivered));
        let achieved = committed as f64 / step_s;
        let step = Step {
            rate,
            phase,
            seq_after,
            seq_upto: total.final_seq[0],
            achieved,
            rows_per_insert,
            fps: delivered as f64 / step_s,
            p50,
            p99,
            cpu,
            bench_cpu,
            undelivered,
            rate_ok: achieved >= RATE_REACHED * rate as f64,
            lat_ok: p99 <= set.s2_bound_us as f64,
        };
        let lost = fleet.lost_in(step.seq_after, step.seq_upto);
        let pass = step.pass(lost);
        eprintln!(
            "  {phase} step {rate}/s: committed {achieved:.0}/s ({rows_per_insert:.1}/INSERT), {:.0} frames/s, p50 {} ms, p99 {} ms, server CPU {cpu:.0} %, load client CPU {bench_cpu:.0} %, undelivered {undelivered}, lost {lost}{}",
            step.fps,
            num(p50 / 1000.0),
            num(p99 / 1000.0),
            if pass {
                ""
            } else if !step.rate_ok {
                "  <- rate not reached"
            } else if !step.lat_ok {
                "  <- p99 over the bound"
            } else {
                "  <- frames lost"
            }
        );
        steps.push(step);
        ladder.record(pass);
        if !pass && ladder.next().is_some() && !recover(&fleet, &total.final_seq).await {
            eprintln!(
                "  still delivering {} s after the failing step: the ladder ends here",
                RECOVER_MAX.as_secs()
            );
            break;
        }
    }
    if !fleet.drain(&total.final_seq, Duration::from_secs(10)).await {
        eprintln!("  not every subscriber got the last trade within 10 s (after the last step)");
    }
    // Judged again now that every loss is known (a client notices a gap
    // only when a later frame arrives, maybe after its step was judged):
    // the figure is the passing step with the highest rate.
    let lost: Vec<u64> = steps
        .iter()
        .map(|s| fleet.lost_in(s.seq_after, s.seq_upto))
        .collect();
    let checks = fleet.finish(&total.final_seq).await;
    let passed = |i: usize| steps[i].pass(lost[i]);
    let best = (0..steps.len()).filter(|&i| passed(i)).max_by(|&a, &b| {
        (steps[a].rate, steps[a].fps)
            .partial_cmp(&(steps[b].rate, steps[b].fps))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    let best_rate = best.map(|i| steps[i].rate).unwrap_or(0);
    let fail_rate = steps
        .iter()
        .enumerate()
        .filter(|&(i, s)| !passed(i) && s.rate > best_rate)
        .map(|(_, s)| s.rate as f64)
        .fold(f64::NAN, f64::min);
    let json_steps: Vec<Value> = steps
        .iter()
        .zip(&lost)
        .enumerate()
        .map(|(i, (s, &lost))| {
            json!({
                "rate": s.rate,
                "phase": s.phase,
                "committed_per_s": round3(s.achieved),
                "rows_per_insert": round3(s.rows_per_insert),
                "frames_per_s": round3(s.fps),
                "p50_ms": json_num(s.p50 / 1000.0),
                "p99_ms": json_num(s.p99 / 1000.0),
                "server_cpu_pct": json_num(s.cpu),
                "bench_cpu_pct": json_num(s.bench_cpu),
                "undelivered": s.undelivered,
                "lost": lost,
                "pass": passed(i),
            })
        })
        .collect();
    let b = best.map(|i| &steps[i]);
    let rec = S2Figures {
        subscribers: m as f64,
        step_s,
        bound_ms: set.s2_bound_us as f64 / 1000.0,
        best_rate: best_rate as f64,
        best_frames_per_s: b.map_or(0.0, |s| s.fps),
        best_p50_ms: b.map_or(f64::NAN, |s| s.p50 / 1000.0),
        best_p99_ms: b.map_or(f64::NAN, |s| s.p99 / 1000.0),
        best_server_cpu_pct: b.map_or(f64::NAN, |s| s.cpu),
        // % of a core over the step / frames per second of it.
        best_cpu_us_per_frame: b.map_or(f64::NAN, |s| s.cpu * 1e4 / s.fps),
        fail_rate,
        fine_step_rate: ladder.fine_step().map_or(f64::NAN, f64::from),
        steps: steps.len() as f64,
        delivery: Delivery::of(&[&checks], total.errors),
    };
    Ok(S2Result {
        rec,
        steps: json_steps,
    })
}
