//! S8, scaling out (issue 15 item 6): N = 1, 2, 3 independent broadcasters
//! (every shard each, replicas of one another), each confined to its own CPU
//! budget, a cgroup v1 cpu group `marketcast-bench-<i>` with
//! `cpu.cfs_quota_us / cpu.cfs_period_us` = `--s8-quota-pct` % of one core.
//! The load client (this process) and Postgres stay outside the groups.
//!
//! Each broadcaster gets the same `--s8-subscribers`, round-robin over the
//! same markets, so a step offers every broadcaster the same trades and
//! frames whatever N (ideal scaling: N times one's frames). The trade rate
//! is raised step by step (frames/s offered = N x `--s8-start-frames`, then
//! x1.15 a step) until a step misses its rate or its p99 (frames not
//! delivered by the end of the step's drain gap counting as infinitely late)
//! exceeds the bound; the figure is the highest delivered frames/s of a
//! passing step. Beside it, at that step, what the N broadcasters cost
//! Postgres: their LISTEN backends and connections (pg_stat_activity, by
//! application_name), their log reads/s (`marketcast_log_reads_total`), the
//! CPU of their backends (schedstat of those pids) and of the whole cluster.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::feed::{feed, FeedOut, Plan};
use crate::fleet::{Checks, Fleet};
use crate::hist::{clocks, Meter};
use crate::procs::{cpu_ns, PgCpu, ProcStats};
use crate::report::{figures, num, Delivery};
use crate::{Env, Target, Up};

/// The cgroup v1 cpu controller's mount.
const CG_ROOT: &str = "/sys/fs/cgroup/cpu";
/// The pause after each step in which its frames may still arrive.
const GAP: Duration = Duration::from_secs(1);
/// Offered frames/s grow by this factor a step.
const STEP_FACTOR: f64 = 1.15;
const MAX_STEPS: usize = 30;
/// A step "reaches" its rate when at least this share of it was committed.
const RATE_REACHED: f64 = 0.9;
/// The broadcaster's connections to Postgres, by application_name.
const BROADCASTER_APPS: &str =
    "'marketcast-broadcaster','marketcast-hub','marketcast-listener','marketcast-head-seq'";

figures! {
    /// S8, one run at one N: its best passing step.
    pub struct S8Figures {
        broadcasters: median,
        subscribers: median,
        markets: median,
        quota_pct: median,
        best_frames_per_s: median,
        best_rate: median,
        best_p99_ms: median,
        fail_frames_per_s: median,
        broadcaster_cpu_pct_each: median,
        bench_cpu_pct: median,
        listen_backends: median,
        pg_conns_per_broadcaster: median,
        log_reads_per_s_each: median,
        log_reads_per_trade_each: median,
        pg_backend_cpu_pct_each: median,
        pg_cpu_pct: median,
        throttled_per_s_each: median,
        ..delivery: Delivery,
    }
}

/// A cgroup v1 cpu group with a CFS quota; removed on drop (its processes
/// moved back to the root group first).
pub struct CpuGroup {
    path: PathBuf,
}

impl CpuGroup {
    /// `quota_us` None: no cap. `shares`: the group's weight against the
    /// machine's other work (1024 = one ordinary process).
    pub fn create(
        name: &str,
        quota_us: Option<u64>,
        period_us: u64,
        shares: u64,
    ) -> Result<CpuGroup> {
        let root = PathBuf::from(CG_ROOT);
        if !root.join("cpu.cfs_quota_us").exists() {
            bail!("S8 needs the cgroup v1 cpu controller at {CG_ROOT} (and root)");
        }
        let path = root.join(name);
        if path.exists() {
            // A leftover of an interrupted run: empty it and reuse it.
            let g = CpuGroup { path: path.clone() };
            g.evacuate();
        } else {
            std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        }
        let g = CpuGroup { path };
        // Quota off first: a new period must not be refused against an old quota.
        g.write("cpu.cfs_quota_us", "-1")?;
        g.write("cpu.cfs_period_us", &period_us.to_string())?;
        if let Some(q) = quota_us {
            g.write("cpu.cfs_quota_us", &q.to_string())?;
        }
        g.write("cpu.shares", &shares.to_string())?;
        Ok(g)
    }

    fn write(&self, file: &str, v: &str) -> Result<()> {
        let p = self.path.join(file);
        std::fs::write(&p, v).with_context(|| format!("writing {v} to {}", p.display()))
    }

    /// Move the process (all its threads) into the group.
    pub fn add(&self, pid: u32) -> Result<()> {
        self.write("cgroup.procs", &pid.to_string())
    }

    /// `throttled_time` of cpu.stat, ns.
    pub fn throttled_ns(&self) -> u64 {
        std::fs::read_to_string(self.path.join("cpu.stat"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("throttled_time "))
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0)
    }

    fn evacuate(&self) {
        if let Ok(procs) = std::fs::read_to_string(self.path.join("cgroup.procs")) {
            for pid in procs.split_whitespace() {
                let _ = std::fs::write(PathBuf::from(CG_ROOT).join("cgroup.procs"), pid);
            }
        }
    }
}

impl Drop for CpuGroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            self.evacuate();
            if std::fs::remove_dir(&self.path).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("marketcast-bench: could not remove {}", self.path.display());
    }
}

/// The N values of a run, in an order that changes from run to run (drift in
/// the machine's other load then hits no N always first or last).
pub fn order(max_n: usize, run: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (1..=max_n).collect();
    let k = (run - 1) % max_n;
    v.rotate_left(k);
    if run % 2 == 0 {
        v.reverse();
    }
    v
}

/// The weight of every S8 group: on a machine shared with other work a
/// broadcaster gets its whole quota, and the load client and Postgres (one
/// group, no quota) keep up.
const SHARES: u64 = 8192;

/// The load client (this process) and the throwaway Postgres, in a group
/// without a quota but with the broadcasters' weight, for S8's duration.
pub fn client_group() -> Result<CpuGroup> {
    let g = CpuGroup::create("marketcast-bench-client", None, 100_000, SHARES)?;
    g.add(std::process::id())?;
    if let Some(pm) = crate::pgdev::PgDev::postmaster_pid() {
        // The postmaster's children (its backends included) go with it;
        // backends forked later are born in the group.
        g.add(pm)?;
        for pid in crate::procs::children(pm) {
            // A backend may have exited since.
            let _ = g.add(pid);
        }
    }
    Ok(g)
}

pub async fn run(env: &Env, n: usize, run: usize) -> Result<S8Figures> {
    let set = &env.set;
    let quota = set.s8_period_us * set.s8_quota_pct / 100;
    let mut groups = Vec::with_capacity(n);
    for i in 0..n {
        groups.push(CpuGroup::create(
            &format!("marketcast-bench-{i}"),
            Some(quota),
            set.s8_period_us,
            SHARES,
        )?);
    }
    let mut ups = Vec::with_capacity(n);
    for g in &groups {
        let up = env.start(Target::Marketcast).await?;
        g.add(up.server.pid)?;
        ups.push(up);
    }
    let r = measure(env, &ups, &groups, n, run).await;
    for up in ups {
        up.stop().await;
    }
    drop(groups);
    r
}

/// Counters of one instant: per broadcaster (its CPU ns, log reads, throttled
/// ns), the broadcasters' backends' CPU ns, the cluster's CPU, ours.
struct Sample {
    bcast: Vec<ProcStats>,
    reads: Vec<f64>,
    throttled: Vec<u64>,
    backends_ns: u64,
    pg: PgCpu,
    me: ProcStats,
}

async fn backend_pids(env: &Env) -> Vec<u32> {
    let q = format!(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() \
         AND application_name IN ({BROADCASTER_APPS})"
    );
    match env.admin.query(&q, &[]).await {
        Ok(rows) => rows
            .iter()
            .filter_map(|r| r.try_get::<_, i32>(0).ok())
            .map(|p| p as u32)
            .collect(),
        Err(_) => Vec::new(),
    }
}

async fn sample(env: &Env, ups: &[Up], groups: &[CpuGroup], pids: &[u32]) -> Sample {
    let mut reads = Vec::with_capacity(ups.len());
    for up in ups {
        reads.push(env.metrics(up, &["marketcast_log_reads_total"]).await[0]);
    }
    Sample {
        bcast: ups.iter().map(|u| u.server.stats()).collect(),
        reads,
        throttled: groups.iter().map(CpuGroup::throttled_ns).collect(),
        backends_ns: pids.iter().map(|&p| cpu_ns(p)).sum(),
        pg: PgCpu::sample(),
        me: ProcStats::of(std::process::id()),
    }
}

async fn measure(
    env: &Env,
    ups: &[Up],
    groups: &[CpuGroup],
    n: usize,
    run: usize,
) -> Result<S8Figures> {
    let set = &env.set;
    // The same subscribers per broadcaster whatever N: every step offers each
    // broadcaster the same trades and frames, so N broadcasters should
    // deliver N times one's frames.
    let per_b = set.s8_subscribers;
    let total_subs = per_b * n;
    let markets = env
        .create_markets(&format!("s8-r{run}-n{n}"), set.s8_markets)
        .await?;
    // Subscribers of each market over all broadcasters.
    let subs_of: Vec<u64> = crate::per_market(per_b, markets.len())
        .iter()
        .map(|x| x * n as u64)
        .collect();
    let frames_per_trade = total_subs as f64 / markets.len() as f64;
    let steps: Vec<f64> = (0..MAX_STEPS)
        .map(|k| set.s8_start_frames as f64 * n as f64 * STEP_FACTOR.powi(k as i32))
        .collect();
    let period = set.s8_step + GAP;
    let meter = Arc::new(Meter::new(steps.len(), period));
    let mut fleets = Vec::with_capacity(n);
    for up in ups {
        fleets.push(
            Fleet::connect(
                &env.client_rt,
                env.fleet_cfg(up, meter.clone(), None, None),
                &markets,
                per_b,
                "s8",
            )
            .await?,
        );
    }
    // Postgres connections and LISTEN backends of the N broadcasters, once
    // their fleets are up (pools grow lazily; counted again at the end).
    let lead = Duration::from_secs(1);
    let (now, now_us) = clocks();
    let start0 = now + lead;
    meter
        .t0_us
        .store(now_us + lead.as_micros() as i64, Ordering::Relaxed);
    let markets = Arc::new(markets);
    let mut total = FeedOut::new(steps.len(), markets.len());
    let step_s = set.s8_step.as_secs_f64();
    let bound_us = set.s8_bound_ms as f64 * 1000.0;
    let mut best: Option<S8Figures> = None;
    let mut fail_fps = f64::NAN;
    let nf = n as f64;
    for (k, &frames) in steps.iter().enumerate() {
        let rate = (frames / frames_per_trade).round().max(1.0);
        let start = start0 + period * k as u32;
        let plan = Plan {
            markets: markets.clone(),
            rate,
            start,
            end: start + set.s8_step,
            meter: meter.clone(),
            cut: Default::default(),
        };
        let pids = backend_pids(env).await;
        let a = sample(env, ups, groups, &pids).await;
        let out = feed(env.feed_rt.clone(), env.sink(&ups[0]), plan).await?;
        let b = sample(env, ups, groups, &pids).await;
        let secs = match (a.pg_at(), b.pg_at()) {
            (Some(x), Some(y)) => (y - x).as_secs_f64(),
            _ => step_s,
        };
        total.merge(out);
        tokio::time::sleep_until((start + period).into()).await;
        let committed: u64 = total.by_phase[k].iter().sum();
        let expected: u64 = total.by_phase[k]
            .iter()
            .zip(&subs_of)
            .map(|(c, s)| c * s)
            .sum();
        let h = &meter.phases[k];
        let delivered = h.count();
        let undelivered = expected.saturating_sub(delivered);
        let p99 = h.quantile(0.99, undelivered);
        let achieved = committed as f64 / step_s;
        let fps = delivered as f64 / step_s;
        let rate_ok = achieved >= RATE_REACHED * rate;
        let pass = rate_ok && p99 <= bound_us;
        let bcpu: f64 = b
            .bcast
            .iter()
            .zip(&a.bcast)
            .map(|(y, x)| y.cpu_pct_since(x))
            .sum::<f64>()
            / nf;
        let reads: f64 = b
            .reads
            .iter()
            .zip(&a.reads)
            .map(|(y, x)| y - x)
            .sum::<f64>()
            / nf
            / secs;
        let thr: f64 = b
            .throttled
            .iter()
            .zip(&a.throttled)
            .map(|(y, x)| y.saturating_sub(*x) as f64)
            .sum::<f64>()
            / nf
            / 1e6
            / secs;
        let backends_pct = b.backends_ns.saturating_sub(a.backends_ns) as f64 / 1e7 / secs / nf;
        let pg = b.pg.pct_since(&a.pg);
        let me = b.me.cpu_pct_since(&a.me);
        eprintln!(
            "  N={n} step {frames:.0} frames/s ({rate:.0} trades/s): committed {achieved:.0}/s, {fps:.0} frames/s, p99 {} ms, broadcaster CPU {bcpu:.0} % each (throttled {thr:.0} ms/s), log reads {reads:.0}/s each, their backends {backends_pct:.1} % each, Postgres {pg:.0} %, load client {me:.0} %, undelivered {undelivered}{}",
            num(p99 / 1000.0),
            if pass { "" } else if !rate_ok { "  <- rate not reached" } else { "  <- p99 over the bound" }
        );
        if pass {
            best = Some(S8Figures {
                broadcasters: nf,
                subscribers: total_subs as f64,
                markets: markets.len() as f64,
                quota_pct: set.s8_quota_pct as f64,
                best_frames_per_s: fps,
                best_rate: achieved,
                best_p99_ms: p99 / 1000.0,
                fail_frames_per_s: f64::NAN,
                broadcaster_cpu_pct_each: bcpu,
                bench_cpu_pct: me,
                listen_backends: f64::NAN,
                pg_conns_per_broadcaster: f64::NAN,
                log_reads_per_s_each: reads,
                log_reads_per_trade_each: reads / achieved.max(1e-9),
                pg_backend_cpu_pct_each: backends_pct,
                pg_cpu_pct: pg,
                throttled_per_s_each: thr,
                delivery: Delivery::of(&[], 0),
            });
        } else {
            fail_fps = frames;
            break;
        }
    }
    let (listen, conns) = pg_connections(env).await;
    for f in &fleets {
        if !f.drain(&total.final_seq, Duration::from_secs(10)).await {
            eprintln!("  not every S8 subscriber got the last trade within 10 s");
        }
    }
    let mut checks: Vec<Checks> = Vec::with_capacity(n);
    for f in fleets {
        checks.push(f.finish(&total.final_seq).await);
    }
    let delivery = Delivery::of(&checks.iter().collect::<Vec<_>>(), total.errors);
    let mut rec = best.unwrap_or(S8Figures {
        broadcasters: nf,
        subscribers: total_subs as f64,
        markets: markets.len() as f64,
        quota_pct: set.s8_quota_pct as f64,
        best_frames_per_s: 0.0,
        best_rate: 0.0,
        best_p99_ms: f64::NAN,
        fail_frames_per_s: f64::NAN,
        broadcaster_cpu_pct_each: f64::NAN,
        bench_cpu_pct: f64::NAN,
        listen_backends: f64::NAN,
        pg_conns_per_broadcaster: f64::NAN,
        log_reads_per_s_each: f64::NAN,
        log_reads_per_trade_each: f64::NAN,
        pg_backend_cpu_pct_each: f64::NAN,
        pg_cpu_pct: f64::NAN,
        throttled_per_s_each: f64::NAN,
        delivery: Delivery::of(&[], 0),
    });
    rec.fail_frames_per_s = fail_fps;
    rec.listen_backends = listen;
    rec.pg_conns_per_broadcaster = conns / nf;
    rec.delivery = delivery;
    Ok(rec)
}

impl Sample {
    fn pg_at(&self) -> Option<std::time::Instant> {
        self.me.at
    }
}

/// (LISTEN backends, all connections) of the broadcasters, now.
async fn pg_connections(env: &Env) -> (f64, f64) {
    let q = format!(
        "SELECT count(*) FILTER (WHERE application_name = 'marketcast-listener' \
                OR query ILIKE 'LISTEN%'), count(*) \
         FROM pg_stat_activity WHERE datname = current_database() \
         AND application_name IN ({BROADCASTER_APPS})"
    );
    match env.admin.query_one(&q, &[]).await {
        Ok(r) => (
            r.try_get::<_, i64>(0).map(|v| v as f64).unwrap_or(f64::NAN),
            r.try_get::<_, i64>(1).map(|v| v as f64).unwrap_or(f64::NAN),
        ),
        Err(e) => {
            eprintln!("  S8: pg_stat_activity: {e}");
            (f64::NAN, f64::NAN)
        }
    }
}
