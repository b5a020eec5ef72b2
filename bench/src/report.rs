//! Results: medians over runs, the Markdown table (with the issue's targets
//! beside each figure), one JSON record per scenario, and the report file
//! whose hand-written notes (below the marker) survive regeneration.
//!
//! Each scenario's figures are a struct declared with `figures!` beside the
//! scenario: a figure is named once, as a field, and a misspelt one does not
//! compile.

use std::path::Path;
use std::process::Command;
use std::time::SystemTime;

use anyhow::{Context, Result};
use serde_json::{json, Map, Value};

use crate::conns::S3Figures;
use crate::fleet::Checks;
use crate::latency::LatencyRun;
use crate::ramp::S2Result;
use crate::replay::{S4Figures, SqlReadFigures};
use crate::s7::{S7Figures, TICKER_INTERVAL_MS};
use crate::s8::S8Figures;
use crate::s9::S9Figures;
use crate::soak::{SoakFigures, SoakResult};
use crate::storm::S6Figures;
use crate::writes::S5Figures;
use crate::{Settings, Target};

mod side;

/// Where the report's hand-written notes start; kept across regenerations.
pub const NOTES_MARKER: &str =
    "<!-- notes below this line are kept when the report is regenerated -->";

/// One run's figures of a scenario, declared with [`figures!`]: each field is
/// an `f64` (non-finite values print as null), named as in the report.
pub trait Figures: Sized {
    /// (name, value) in report order.
    fn fields(&self) -> Vec<(&'static str, f64)>;
    /// Field-wise combination of runs, never called with none.
    fn combine(runs: &[&Self]) -> Self;
}

/// Declares a [`Figures`] struct: `f64` fields in report order, each with the
/// rule that combines runs, [`median`] or [`worst`] (one bad run is never
/// hidden), and optionally last `..name: Type,` a nested [`Figures`] record
/// whose fields follow the struct's own.
macro_rules! figures {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $($field:ident: $combine:ident,)*
            $(..$nested:ident: $nested_ty:ty,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone)]
        pub struct $name {
            $(pub $field: f64,)*
            $(pub $nested: $nested_ty,)?
        }

        impl $crate::report::Figures for $name {
            fn fields(&self) -> Vec<(&'static str, f64)> {
                #[allow(unused_mut)]
                let mut v = vec![$((stringify!($field), self.$field)),*];
                $(v.extend($crate::report::Figures::fields(&self.$nested));)?
                v
            }

            fn combine(runs: &[&Self]) -> Self {
                $name {
                    $($field: $crate::report::$combine(runs.iter().map(|r| r.$field)),)*
                    $($nested: $crate::report::Figures::combine(
                        &runs.iter().map(|r| &r.$nested).collect::<Vec<_>>(),
                    ),)?
                }
            }
        }
    };
}
pub(crate) use figures;

figures! {
    /// What the clients of a marketcast run checked. lost, duplicated and
    /// reordered must be 0.
    pub struct Delivery {
        lost: worst,
        duplicated: worst,
        reordered: worst,
        undrained: worst,
        reconnects: median,
        parse_errors: worst,
        errors: worst,
    }
}

impl Delivery {
    /// The sum of the fleets' checks, plus errors of the feed beside them.
    pub fn of(checks: &[&Checks], feed_errors: u64) -> Delivery {
        let sum = |f: fn(&Checks) -> u64| checks.iter().map(|c| f(c)).sum::<u64>() as f64;
        Delivery {
            lost: sum(|c| c.lost),
            duplicated: sum(|c| c.duplicated),
            reordered: sum(|c| c.reordered),
            undrained: sum(|c| c.undrained),
            reconnects: sum(|c| c.reconnects),
            parse_errors: sum(|c| c.parse_errors),
            errors: sum(|c| c.errors) + feed_errors as f64,
        }
    }
}

fn sorted(xs: impl Iterator<Item = f64>) -> Vec<f64> {
    let mut xs: Vec<f64> = xs.collect();
    xs.sort_by(f64::total_cmp);
    xs
}

/// The median of the runs (the upper one of an even count).
pub fn median(xs: impl Iterator<Item = f64>) -> f64 {
    let xs = sorted(xs);
    xs[xs.len() / 2]
}

/// The worst (largest) of the runs.
pub fn worst(xs: impl Iterator<Item = f64>) -> f64 {
    let xs = sorted(xs);
    xs[xs.len() - 1]
}

/// The runs combined, None without runs.
pub fn aggregate<F: Figures>(runs: &[&F]) -> Option<F> {
    (!runs.is_empty()).then(|| F::combine(runs))
}

/// The index of the run whose `fig` is the median (for the plots).
pub fn median_run<F>(runs: &[&F], fig: fn(&F) -> f64) -> Option<usize> {
    let mut idx: Vec<usize> = (0..runs.len()).collect();
    idx.sort_by(|&a, &b| fig(runs[a]).total_cmp(&fig(runs[b])));
    idx.get(idx.len() / 2).copied()
}

pub fn json_num(v: f64) -> Value {
    if v.is_finite() {
        json!(round3(v))
    } else {
        Value::Null
    }
}

pub fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

pub fn num(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else if v.is_infinite() {
        "inf".into()
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

pub fn rec_line(rec: &impl Figures) -> String {
    rec.fields()
        .iter()
        .map(|(k, v)| format!("{k}={}", num(*v)))
        .collect::<Vec<_>>()
        .join(" ")
}

fn rec_json(rec: &impl Figures) -> Value {
    Value::Object(
        rec.fields()
            .iter()
            .map(|(k, v)| (k.to_string(), json_num(*v)))
            .collect::<Map<_, _>>(),
    )
}

/// `{"scenario":"S1",...}`: the scenario first, then the record's keys.
fn json_line(scenario: &str, v: Value) -> String {
    let mut s = format!("{{\"scenario\":{}", json!(scenario));
    if let Value::Object(m) = v {
        for (k, v) in m {
            s.push_str(&format!(",{}:{v}", json!(k)));
        }
    }
    s.push('}');
    s
}

#[derive(Clone, Copy)]
enum Fmt {
    Ms,
    Secs,
    Count,
    Pct,
    /// % with one decimal.
    Pct1,
    Mib,
    Kib,
}

/// One figure of a record ("-" without the record).
fn fmt<R>(f: Fmt, rec: Option<&R>, fig: fn(&R) -> f64) -> String {
    let Some(rec) = rec else {
        return "-".into();
    };
    let v = fig(rec);
    if v.is_nan() {
        return "-".into();
    }
    if v.is_infinite() {
        return "not reached".into();
    }
    match f {
        Fmt::Ms | Fmt::Secs | Fmt::Kib => format!("{v:.2}"),
        Fmt::Count => thousands(v),
        Fmt::Pct => format!("{v:.0} %"),
        Fmt::Pct1 => format!("{v:.1} %"),
        Fmt::Mib => format!("{v:.1}"),
    }
}

/// lost / duplicated / reordered.
fn fmt_lrd(d: &Delivery) -> String {
    format!(
        "{} / {} / {}",
        num(d.lost),
        num(d.duplicated),
        num(d.reordered)
    )
}

fn thousands(v: f64) -> String {
    let s = format!("{:.0}", v.abs());
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if v < 0.0 {
        out.insert(0, '-');
    }
    out
}

/// One table row of a scenario whose marketcast records are `M` and whose
/// baseline records are `B`.
enum Row<M, B> {
    /// Label, the figure of the marketcast record, the baseline's (None: no
    /// baseline figure), format, the issue's target.
    Fig(
        &'static str,
        fn(&M) -> f64,
        Option<fn(&B) -> f64>,
        Fmt,
        &'static str,
    ),
    /// lost / duplicated / reordered of the marketcast record and of the
    /// baseline's (None: not shown); the target is 0 / 0 / 0.
    Lrd(fn(&M) -> &Delivery, Option<fn(&B) -> &Delivery>),
}

fn rows<M, B>(t: &mut String, name: &str, mc: &M, base: Option<&B>, rows: &[Row<M, B>]) {
    for row in rows {
        let (label, m, b, ratio, target) = match *row {
            Row::Fig(label, fig, bfig, f, target) => {
                let (b, ratio) = match (base, bfig) {
                    (Some(base), Some(bfig)) => {
                        let r = fig(mc) / bfig(base);
                        let ratio = if r.is_finite() {
                            format!("{r:.2}x")
                        } else {
                            "-".into()
                        };
                        (fmt(f, Some(base), bfig), ratio)
                    }
                    _ => ("-".into(), String::new()),
                };
                (label, fmt(f, Some(mc), fig), b, ratio, target)
            }
            Row::Lrd(d, bd) => {
                let b = match (base, bd) {
                    (Some(base), Some(bd)) => fmt_lrd(bd(base)),
                    _ => "-".into(),
                };
                let label = "lost / duplicated / reordered";
                (label, fmt_lrd(d(mc)), b, String::new(), "0 / 0 / 0")
            }
        };
        t.push_str(&format!(
            "| {name} | {label} | {m} | {b} | {ratio} | {target} |\n"
        ));
    }
}

/// One scenario's runs, by server.
pub struct ByTarget<T> {
    pub mc: Vec<T>,
    pub bridge: Vec<T>,
    pub raw: Vec<T>,
}

impl<T> Default for ByTarget<T> {
    fn default() -> Self {
        ByTarget {
            mc: Vec::new(),
            bridge: Vec::new(),
            raw: Vec::new(),
        }
    }
}

impl<T> ByTarget<T> {
    pub fn push(&mut self, t: Target, x: T) {
        match t {
            Target::Marketcast => self.mc.push(x),
            Target::Bridge => self.bridge.push(x),
            Target::Raw => self.raw.push(x),
        }
    }

    pub fn get(&self, t: Target) -> &[T] {
        match t {
            Target::Marketcast => &self.mc,
            Target::Bridge => &self.bridge,
            Target::Raw => &self.raw,
        }
    }

    pub fn is_empty(&self) -> bool {
        Target::ALL.iter().all(|&t| self.get(t).is_empty())
    }

    /// Each server's runs combined (None without runs), by `rec`.
    fn agg<F: Figures>(&self, rec: fn(&T) -> &F) -> [Option<F>; 3] {
        Target::ALL.map(|t| aggregate(&self.get(t).iter().map(rec).collect::<Vec<_>>()))
    }
}

#[derive(Default)]
pub struct Results {
    pub runs: usize,
    pub baseline_runs: usize,
    /// The servers of S1, T, S2 and S3.
    pub targets: Vec<Target>,
    pub s1: ByTarget<LatencyRun>,
    pub table: ByTarget<LatencyRun>,
    pub s2: ByTarget<S2Result>,
    pub s3: ByTarget<S3Figures>,
    pub s4: Vec<S4Figures>,
    pub s4_sql: Vec<SqlReadFigures>,
    pub s4_load_s: Option<f64>,
    pub s5: Vec<S5Figures>,
    pub s6: Vec<S6Figures>,
    pub s7: Vec<S7Figures>,
    /// Every (N, run) of S8.
    pub s8: Vec<S8Figures>,
    /// Every (K, run) of S9.
    pub s9: Vec<S9Figures>,
    pub soak: Option<SoakResult>,
}

/// One figure of S7's table: label, the figure, its format.
type S7Row = (&'static str, fn(&S7Figures) -> f64, Fmt);

fn agg<F: Figures>(v: &[F]) -> Option<F> {
    aggregate(&v.iter().collect::<Vec<_>>())
}

impl Results {
    /// No marketcast run lost, duplicated or reordered a frame.
    pub fn guarantee_held(&self) -> bool {
        let mut checks: Vec<&Delivery> = Vec::new();
        checks.extend(self.s1.mc.iter().map(|r| &r.rec.delivery));
        checks.extend(self.table.mc.iter().map(|r| &r.rec.delivery));
        checks.extend(self.s2.mc.iter().map(|r| &r.rec.delivery));
        checks.extend(self.s3.mc.iter().map(|r| &r.delivery));
        checks.extend(self.s4.iter().map(|r| &r.delivery));
        checks.extend(self.s6.iter().map(|r| &r.delivery));
        checks.extend(self.s7.iter().map(|r| &r.delivery));
        checks.extend(self.s8.iter().map(|r| &r.delivery));
        checks.extend(self.soak.iter().map(|s| &s.rec.delivery));
        let mut ok = true;
        for d in checks {
            for (k, v) in [
                ("lost", d.lost),
                ("duplicated", d.duplicated),
                ("reordered", d.reordered),
            ] {
                if v > 0.0 {
                    eprintln!("marketcast-bench: marketcast {k} = {v} in a run");
                    ok = false;
                }
            }
        }
        ok
    }

    pub fn table(&self, set: &Settings) -> String {
        let mut t = side::table(self, set);
        let runs = format!(
            "median of {} marketcast run{}, {} baseline run{}",
            self.runs,
            if self.runs == 1 { "" } else { "s" },
            self.baseline_runs,
            if self.baseline_runs == 1 { "" } else { "s" },
        );
        let mut u = String::new();
        u.push_str(&format!(
            "| scenario | figure ({runs}) | marketcast | baseline | marketcast / baseline | target (issue 5) |\n"
        ));
        u.push_str("|---|---|---:|---:|---:|---|\n");
        let header_len = u.len();
        if let Some(mc) = agg(&self.s4) {
            let name = format!(
                "S4: replay, log of {}; {} clients x newest {} (baseline: one plain SQL read)",
                thousands(set.s4_trades as f64),
                set.s4_clients,
                thousands(set.s4_tail as f64)
            );
            let base = agg(&self.s4_sql);
            let s4_rows: [Row<S4Figures, SqlReadFigures>; 11] = [
                Row::Fig(
                    "1 client from_seq=0: trades/s",
                    |r| r.one_trades_per_s,
                    Some(|r| r.one_trades_per_s),
                    Fmt::Count,
                    ">= 300,000",
                ),
                Row::Fig(
                    "1 client: seconds to catch up",
                    |r| r.one_s,
                    Some(|r| r.one_s),
                    Fmt::Secs,
                    "",
                ),
                Row::Fig(
                    "1 client: server CPU (% of a core)",
                    |r| r.one_server_cpu_pct,
                    None,
                    Fmt::Pct,
                    "",
                ),
                Row::Fig(
                    "1 client: load client CPU (% of a core)",
                    |r| r.one_bench_cpu_pct,
                    None,
                    Fmt::Pct,
                    "",
                ),
                Row::Fig(
                    "1 client: Postgres CPU (% of a core)",
                    |r| r.one_postgres_cpu_pct,
                    None,
                    Fmt::Pct,
                    "",
                ),
                Row::Fig(
                    "all clients at once: total trades/s",
                    |r| r.many_trades_per_s,
                    None,
                    Fmt::Count,
                    ">= 1,000,000",
                ),
                Row::Fig(
                    "all clients: seconds until all caught up",
                    |r| r.many_s,
                    None,
                    Fmt::Secs,
                    "",
                ),
                Row::Fig(
                    "all clients: server CPU (% of a core)",
                    |r| r.many_server_cpu_pct,
                    None,
                    Fmt::Pct,
                    "",
                ),
                Row::Fig(
                    "all clients: load client CPU (% of a core)",
                    |r| r.many_bench_cpu_pct,
                    None,
                    Fmt::Pct,
                    "",
                ),
                Row::Fig(
                    "all clients: Postgres CPU (% of a core)",
                    |r| r.many_postgres_cpu_pct,
                    None,
                    Fmt::Pct,
                    "",
                ),
                Row::Lrd(|r| &r.delivery, None),
            ];
            rows(&mut u, &name, &mc, base.as_ref(), &s4_rows);
        }
        if let Some(r) = agg(&self.s5) {
            let name = format!(
                "S5: {} clients, {} s (baseline: plain SQL, 1 trade/tx)",
                set.s5_clients,
                set.s5_duration.as_secs()
            );
            let s5_rows: [Row<S5Figures, S5Figures>; 2] = [
                Row::Fig(
                    "trades/s (writer HTTP vs SQL)",
                    |r| r.http_trades_per_s,
                    Some(|r| r.sql_trades_per_s),
                    Fmt::Count,
                    ">= 5x SQL",
                ),
                Row::Fig(
                    "p99 request latency (ms)",
                    |r| r.http_p99_ms,
                    Some(|r| r.sql_p99_ms),
                    Fmt::Ms,
                    "<= 20",
                ),
            ];
            rows(&mut u, &name, &r, Some(&r), &s5_rows);
        }
        if let Some(mc) = agg(&self.s6) {
            let name = format!(
                "S6: {} subs, {} markets, {} trades/s, all drop and reconnect",
                set.s6_subscribers, set.s6_markets, set.s6_rate
            );
            let s6_rows: [Row<S6Figures, S6Figures>; 4] = [
                Row::Fig(
                    "time until all live again (s)",
                    |r| r.all_live_s,
                    None,
                    Fmt::Secs,
                    "<= 5",
                ),
                Row::Fig(
                    "p50 client live again (s)",
                    |r| r.p50_live_s,
                    None,
                    Fmt::Secs,
                    "",
                ),
                Row::Fig(
                    "server CPU during the storm (% of a core)",
                    |r| r.storm_server_cpu_pct,
                    None,
                    Fmt::Pct,
                    "",
                ),
                Row::Lrd(|r| &r.delivery, None),
            ];
            rows(&mut u, &name, &mc, None, &s6_rows);
        }
        if u.len() > header_len {
            if !t.is_empty() {
                t.push_str("\n**marketcast alone, and against plain SQL**\n\n");
            }
            t.push_str(&u);
        }
        if let Some(mc) = agg(&self.s7) {
            self.s7_table(&mut t, set, &mc);
        }
        if !self.s8.is_empty() {
            self.s8_table(&mut t, set);
        }
        if !self.s9.is_empty() {
            self.s9_table(&mut t, set);
        }
        t
    }

    /// The S8 runs with `n` broadcasters.
    fn s8_at(&self, n: f64) -> Vec<&S8Figures> {
        self.s8.iter().filter(|r| r.broadcasters == n).collect()
    }

    /// S8 (N broadcasters under CPU quotas): one column per N.
    fn s8_table(&self, t: &mut String, set: &Settings) {
        let mut ns: Vec<f64> = self.s8.iter().map(|r| r.broadcasters).collect();
        ns.sort_by(f64::total_cmp);
        ns.dedup();
        let meds: Vec<(f64, Vec<&S8Figures>, S8Figures)> = ns
            .iter()
            .filter_map(|&n| {
                let runs = self.s8_at(n);
                aggregate(&runs).map(|m| (n, runs, m))
            })
            .collect();
        let one = meds
            .iter()
            .find(|(n, _, _)| *n == 1.0)
            .map(|(_, _, m)| m.best_frames_per_s);
        t.push_str(&format!(
            "\n**S8: N broadcasters, each in a cgroup v1 cpu group of {} % of a core** \
             (`cpu.cfs_quota_us` {} / `cpu.cfs_period_us` {}), the load client and Postgres \
             outside; {} subscribers on each broadcaster (N x that in all), round-robin over \
             the same {} markets, so every step offers each broadcaster the same load; the trade rate raised x1.15 a step ({} s \
             steps, from {} frames/s per broadcaster) until p99 > {} ms or the rate is missed. \
             Medians over runs (each run's figure beside it); Postgres figures at the best step.\n\n",
            set.s8_quota_pct,
            set.s8_period_us * set.s8_quota_pct / 100,
            set.s8_period_us,
            set.s8_subscribers,
            set.s8_markets,
            set.s8_step.as_secs(),
            set.s8_start_frames,
            set.s8_bound_ms,
        ));
        t.push_str("| figure |");
        for (n, _, _) in &meds {
            t.push_str(&format!(" N = {n} |"));
        }
        t.push_str("\n|---|");
        for _ in &meds {
            t.push_str("---:|");
        }
        t.push('\n');
        type Fig = fn(&S8Figures) -> f64;
        let figs: [(&str, Fig, Fmt); 13] = [
            (
                "delivered frames/s within p99 bound (median)",
                |r| r.best_frames_per_s,
                Fmt::Count,
            ),
            ("trades/s at that step", |r| r.best_rate, Fmt::Count),
            ("p99 at that step (ms)", |r| r.best_p99_ms, Fmt::Ms),
            (
                "first failing step (frames/s offered)",
                |r| r.fail_frames_per_s,
                Fmt::Count,
            ),
            (
                "CPU of each broadcaster (% of a core)",
                |r| r.broadcaster_cpu_pct_each,
                Fmt::Pct1,
            ),
            (
                "throttled time of each broadcaster (ms per s, summed over CPUs)",
                |r| r.throttled_per_s_each,
                Fmt::Ms,
            ),
            (
                "LISTEN backends (all broadcasters)",
                |r| r.listen_backends,
                Fmt::Count,
            ),
            (
                "Postgres connections per broadcaster",
                |r| r.pg_conns_per_broadcaster,
                Fmt::Ms,
            ),
            (
                "log reads/s of each broadcaster",
                |r| r.log_reads_per_s_each,
                Fmt::Ms,
            ),
            (
                "log reads per trade, each broadcaster",
                |r| r.log_reads_per_trade_each,
                Fmt::Ms,
            ),
            (
                "CPU of each broadcaster's Postgres backends (% of a core)",
                |r| r.pg_backend_cpu_pct_each,
                Fmt::Pct1,
            ),
            (
                "Postgres CPU, whole cluster (% of a core)",
                |r| r.pg_cpu_pct,
                Fmt::Pct1,
            ),
            (
                "load client CPU (% of a core)",
                |r| r.bench_cpu_pct,
                Fmt::Pct1,
            ),
        ];
        for (label, fig, f) in figs {
            t.push_str(&format!("| {label} |"));
            for (_, _, m) in &meds {
                t.push_str(&format!(" {} |", fmt(f, Some(m), fig)));
            }
            t.push('\n');
        }
        t.push_str("| delivered frames/s, each run |");
        for (_, runs, _) in &meds {
            let each: Vec<String> = runs
                .iter()
                .map(|r| thousands(r.best_frames_per_s))
                .collect();
            t.push_str(&format!(" {} |", each.join(", ")));
        }
        t.push_str("\n| ratio to N = 1 (medians; target for N = 3: >= 2.7x) |");
        for (_, _, m) in &meds {
            let r = one.map(|o| m.best_frames_per_s / o).unwrap_or(f64::NAN);
            t.push_str(&format!(
                " {} |",
                if r.is_finite() {
                    format!("{r:.2}x")
                } else {
                    "-".into()
                }
            ));
        }
        t.push_str("\n| lost / duplicated / reordered (worst run) |");
        for (_, _, m) in &meds {
            t.push_str(&format!(" {} |", fmt_lrd(&m.delivery)));
        }
        t.push('\n');
    }

    /// S9 (NOTIFY throughput by LISTENers): one row per K.
    fn s9_table(&self, t: &mut String, set: &Settings) {
        let mut ks: Vec<f64> = self.s9.iter().map(|r| r.listeners).collect();
        ks.sort_by(f64::total_cmp);
        ks.dedup();
        t.push_str(&format!(
            "\n**S9: NOTIFY throughput by LISTENing connections**: K idle connections \
             LISTEN on every shard channel and read their notifications; {} SQL \
             connections (a market each) commit one-trade transactions (`INSERT INTO \
             trades`, the trigger NOTIFYs) for {} s; no broadcaster runs. Medians over \
             runs, K order rotated from run to run.\n\n",
            set.s9_writers,
            set.s9_duration.as_secs(),
        ));
        t.push_str(
            "| LISTENers (K) | committed trades/s (median) | each run | vs the first K | p99 commit (ms) | Postgres CPU (% of a core) | notifications missing (worst) | errors |\n\
             |---:|---:|---|---:|---:|---:|---:|---:|\n",
        );
        let mut first = None;
        for k in ks {
            let runs: Vec<&S9Figures> = self.s9.iter().filter(|r| r.listeners == k).collect();
            let Some(m) = aggregate(&runs) else { continue };
            let base = *first.get_or_insert(m.trades_per_s);
            let each: Vec<String> = runs.iter().map(|r| thousands(r.trades_per_s)).collect();
            t.push_str(&format!(
                "| {} | {} | {} | {:.2}x | {} | {} | {} | {} |\n",
                num(k),
                thousands(m.trades_per_s),
                each.join(", "),
                m.trades_per_s / base,
                fmt(Fmt::Ms, Some(&m), |r| r.p99_commit_ms),
                fmt(Fmt::Pct1, Some(&m), |r| r.pg_cpu_pct),
                num(m.notifications_missing),
                num(m.errors),
            ));
        }
    }

    /// S7 (1.1 read side costs): its own table, each run beside the median.
    fn s7_table(&self, t: &mut String, set: &Settings, mc: &S7Figures) {
        let n = self.s7.len();
        t.push_str(&format!(
            "\n**S7: 1.1 read side costs** (median of {n} runs, each side on a fresh broadcaster, \
             sides alternating). (a) {} subscribers on one market, {} trades/s, {} s measured: \
             trade mode vs ticker mode (`interval_ms` {TICKER_INTERVAL_MS}). (b) {} WebSocket \
             upgrades, no subscribe: a valid HS256 token in `Authorization: Bearer` to a \
             broadcaster with `--jwt-hs256-secret`, vs no token and no token keys.\n\n",
            set.s7_subscribers,
            set.s7_rate,
            set.s7_duration.as_secs(),
            set.s7_connects,
        ));
        t.push_str("| figure | median |");
        for i in 1..=n {
            t.push_str(&format!(" run {i} |"));
        }
        t.push_str("\n|---|---:|");
        for _ in 0..n {
            t.push_str("---:|");
        }
        t.push('\n');
        let figs: [S7Row; 15] = [
            (
                "(a) trade mode: broadcaster CPU (% of a core)",
                |r| r.trade_cpu_pct,
                Fmt::Pct1,
            ),
            (
                "(a) trade mode: broadcaster CPU per trade (µs)",
                |r| r.trade_us_per_trade,
                Fmt::Ms,
            ),
            (
                "(a) trade mode: frames received",
                |r| r.trade_frames,
                Fmt::Count,
            ),
            (
                "(a) trade mode: frames expected (trades x subscribers)",
                |r| r.trade_frames_expected,
                Fmt::Count,
            ),
            (
                "(a) ticker mode: broadcaster CPU (% of a core)",
                |r| r.ticker_cpu_pct,
                Fmt::Pct1,
            ),
            (
                "(a) ticker mode: broadcaster CPU per trade (µs)",
                |r| r.ticker_us_per_trade,
                Fmt::Ms,
            ),
            (
                "(a) ticker mode: frames received",
                |r| r.ticker_frames,
                Fmt::Count,
            ),
            (
                "(a) ticker mode: frames per subscriber per second",
                |r| r.ticker_frames_per_sub_per_s,
                Fmt::Ms,
            ),
            (
                "(a) CPU ratio, trade mode / ticker mode",
                |r| r.cpu_ratio_trade_to_ticker,
                Fmt::Ms,
            ),
            (
                "(b) no token: time to open all (s)",
                |r| r.connect_plain_s,
                Fmt::Secs,
            ),
            (
                "(b) token: time to open all (s)",
                |r| r.connect_token_s,
                Fmt::Secs,
            ),
            (
                "(b) no token: broadcaster CPU per connect (µs)",
                |r| r.connect_plain_cpu_us,
                Fmt::Ms,
            ),
            (
                "(b) token: broadcaster CPU per connect (µs)",
                |r| r.connect_token_cpu_us,
                Fmt::Ms,
            ),
            (
                "(b) token verification: difference per connect (µs)",
                |r| r.verify_cpu_us,
                Fmt::Ms,
            ),
            (
                "(b) failed connects (worst run)",
                |r| r.connect_errors,
                Fmt::Count,
            ),
        ];
        for (label, fig, f) in figs {
            t.push_str(&format!("| {label} | {} |", fmt(f, Some(mc), fig)));
            for r in &self.s7 {
                t.push_str(&format!(" {} |", fmt(f, Some(r), fig)));
            }
            t.push('\n');
        }
        t.push_str(&format!(
            "| (a) lost / duplicated / reordered, undrained | {}, {} |",
            fmt_lrd(&mc.delivery),
            num(mc.delivery.undrained)
        ));
        for r in &self.s7 {
            t.push_str(&format!(
                " {}, {} |",
                fmt_lrd(&r.delivery),
                num(r.delivery.undrained)
            ));
        }
        t.push('\n');
    }

    /// `{"scenario":name,"runs":..,"marketcast":{..}}`, with the baseline's
    /// record if there is one and `extra`'s keys.
    fn json_both<M: Figures, B: Figures>(
        &self,
        name: &str,
        mc: &M,
        base: Option<&B>,
        extra: Value,
    ) -> String {
        let mut v = json!({ "runs": self.runs, "marketcast": rec_json(mc) });
        if let Some(base) = base {
            v["baseline_runs"] = json!(self.baseline_runs);
            v["baseline"] = rec_json(base);
        }
        if let Value::Object(m) = extra {
            for (k, x) in m {
                v[k] = x;
            }
        }
        json_line(name, v)
    }

    pub fn json_lines(&self, set: &Settings) -> Vec<String> {
        let mut out = Vec::new();
        out.extend(side::json_lines(self));
        if let Some(mc) = agg(&self.s4) {
            let base = agg(&self.s4_sql);
            out.push(self.json_both(
                "S4",
                &mc,
                base.as_ref(),
                json!({ "load_s": self.s4_load_s.map(json_num) }),
            ));
        }
        if let Some(r) = agg(&self.s5) {
            out.push(json_line(
                "S5",
                json!({
                    "runs": self.runs,
                    "clients": set.s5_clients,
                    "writer_http": {
                        "trades_per_s": json_num(r.http_trades_per_s),
                        "p50_ms": json_num(r.http_p50_ms),
                        "p99_ms": json_num(r.http_p99_ms),
                        "errors": json_num(r.http_errors),
                    },
                    "plain_sql": {
                        "trades_per_s": json_num(r.sql_trades_per_s),
                        "p50_ms": json_num(r.sql_p50_ms),
                        "p99_ms": json_num(r.sql_p99_ms),
                        "errors": json_num(r.sql_errors),
                    },
                    "ratio": json_num(r.http_trades_per_s / r.sql_trades_per_s),
                }),
            ));
        }
        if let Some(mc) = agg(&self.s6) {
            out.push(self.json_both("S6", &mc, None::<&S6Figures>, json!({})));
        }
        if let Some(mc) = agg(&self.s7) {
            let each: Vec<Value> = self.s7.iter().map(rec_json).collect();
            let mut v = json!({ "runs": self.s7.len(), "marketcast": rec_json(&mc) });
            v["each_run"] = json!(each);
            out.push(json_line("S7", v));
        }
        if !self.s8.is_empty() {
            let each: Vec<Value> = self.s8.iter().map(rec_json).collect();
            out.push(json_line("S8", json!({ "each_run": each })));
        }
        if !self.s9.is_empty() {
            let each: Vec<Value> = self.s9.iter().map(rec_json).collect();
            out.push(json_line("S9", json!({ "each_run": each })));
        }
        out
    }
}

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

pub fn machine_info(pg_version: &str) -> Vec<(&'static str, String)> {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get().to_string())
        .unwrap_or_else(|_| "?".into());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "?".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            let kb: f64 = s
                .lines()
                .find(|l| l.starts_with("MemTotal:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            Some(format!("{:.1} GiB", kb / 1024.0 / 1024.0))
        })
        .unwrap_or_else(|| "?".into());
    let kernel = Command::new("uname")
        .arg("-r")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "?".into());
    vec![
        ("CPUs (nproc)", cpus),
        ("CPU", model),
        ("memory", mem),
        ("kernel (uname -r)", kernel),
        (
            "PostgreSQL",
            format!("{pg_version} (bin/pg-dev: fsync=on, shared_buffers=256MB)"),
        ),
        (
            "date",
            humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        ),
    ]
}

fn command_line() -> String {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.is_empty() {
        "./target/release/marketcast-bench".to_string()
    } else {
        format!("./target/release/marketcast-bench {}", args.join(" "))
    }
}

fn write_file(path: &Path, text: &str) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// The notes below the marker of an existing report, or a placeholder.
fn kept_notes(path: &Path) -> String {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            s.split_once(NOTES_MARKER)
                .map(|(_, notes)| notes.to_string())
        })
        .unwrap_or_else(|| "\n\n_(no notes yet)_\n".to_string())
}

/// The results above the marker, and below it what was there: the Method
/// section and the notes, hand-written in docs/BENCHMARKS.md.
pub fn write_report(
    set: &Settings,
    machine: &[(&str, String)],
    table: &str,
    lines: &[String],
    plots: &[(String, String)],
) -> Result<()> {
    let path = &set.report;
    let mut s = String::new();
    s.push_str("# Benchmarks\n\n");
    s.push_str(
        "Generated by `marketcast-bench` (`make bench`; `make bench-quick` for a small run; \
         `make soak` for the soak, reported in [bench/soak.md](bench/soak.md)). \
         Everything above the notes marker is rewritten on every run.\n\n",
    );
    s.push_str(
        "**Quote medians of 3 runs** (`make bench` runs every marketcast scenario 3 times, \
         and T and S2 3 times on each of the Node bridge and the raw baseline too, \
         `--runs N` changes it); a single run on this shared 2-core machine moves \
         by tens of percent, and a factor of 2 or more when other work runs beside it \
         (the single-threaded Node bridge first).\n\n",
    );
    s.push_str("## Machine\n\n");
    for (k, v) in machine {
        s.push_str(&format!("- {k}: {v}\n"));
    }
    s.push_str(&format!("\n## Command\n\n```\n{}\n```\n\n", command_line()));
    s.push_str(&format!(
        "Runs: T and S2 {} of each server ({}), rounds alternating; S1 and S3 {} marketcast, {} of each peer; the other scenarios {} marketcast (figures are medians; lost/duplicated/reordered are the worst run). Load client: {}.\n\n",
        set.runs,
        set.targets
            .iter()
            .map(|t| t.label())
            .collect::<Vec<_>>()
            .join(", "),
        set.runs,
        set.baseline_runs,
        set.runs,
        match set.client {
            crate::ws::ClientKind::Lean => "lean (raw frame reader)",
            crate::ws::ClientKind::Tungstenite => "tokio-tungstenite",
        }
    ));
    s.push_str("## Results\n\n");
    s.push_str(table);
    if !plots.is_empty() {
        s.push('\n');
        for (title, file) in plots {
            s.push_str(&format!("![{title}]({file})\n\n"));
        }
    }
    s.push_str("\nOne JSON record per scenario:\n\n```\n");
    for l in lines {
        s.push_str(l);
        s.push('\n');
    }
    s.push_str("```\n\n");
    s.push_str(NOTES_MARKER);
    s.push_str(&kept_notes(path));
    write_file(path, &s)
}

pub fn soak_table(set: &Settings, r: &SoakResult) -> String {
    let rec = Some(&r.rec);
    let mut t = String::from("| figure | start | end |\n|---|---:|---:|\n");
    type Fig = fn(&SoakFigures) -> f64;
    let start_end: [(&str, Fig, Fig, Fmt); 6] = [
        (
            "server RSS (MiB)",
            |r| r.rss_start_mib,
            |r| r.rss_end_mib,
            Fmt::Mib,
        ),
        (
            "server open file descriptors",
            |r| r.fds_start,
            |r| r.fds_end,
            Fmt::Count,
        ),
        (
            "server threads",
            |r| r.threads_start,
            |r| r.threads_end,
            Fmt::Count,
        ),
        (
            "WebSocket connections (marketcast_ws_connections)",
            |r| r.ws_connections_start,
            |r| r.ws_connections_end,
            Fmt::Count,
        ),
        (
            "subscriptions (marketcast_subscriptions)",
            |r| r.subscriptions_start,
            |r| r.subscriptions_end,
            Fmt::Count,
        ),
        (
            "markets in the hub (marketcast_hub_markets)",
            |r| r.hub_markets_start,
            |r| r.hub_markets_end,
            Fmt::Count,
        ),
    ];
    for (label, a, b, f) in start_end {
        t.push_str(&format!(
            "| {label} | {} | {} |\n",
            fmt(f, rec, a),
            fmt(f, rec, b)
        ));
    }
    t.push_str(&format!(
        "\n| over the soak ({} connections, {} markets, {} trades/s, {} s after a {} s warm-up; broadcaster --ring-size {}) | value |\n|---|---:|\n",
        set.soak_connections,
        set.soak_markets,
        set.soak_rate,
        set.soak_duration.as_secs(),
        set.soak_warmup.as_secs(),
        set.soak_ring_size
    ));
    /// A line of the second table: a figure, or lost / duplicated / reordered.
    enum Line {
        Fig(&'static str, Fig, Fmt),
        Lrd,
    }
    let lines = [
        Line::Fig("trades committed", |r| r.committed, Fmt::Count),
        Line::Fig("frames delivered", |r| r.frames, Fmt::Count),
        Line::Fig("frames/s", |r| r.frames_per_s, Fmt::Count),
        Line::Fig("latency p50 (ms)", |r| r.p50_ms, Fmt::Ms),
        Line::Fig("latency p99 (ms)", |r| r.p99_ms, Fmt::Ms),
        Line::Fig("latency p99.9 (ms)", |r| r.p999_ms, Fmt::Ms),
        Line::Fig("latency max (ms)", |r| r.max_ms, Fmt::Ms),
        Line::Fig("server CPU (% of a core)", |r| r.server_cpu_pct, Fmt::Pct),
        Line::Fig(
            "Postgres CPU (% of a core)",
            |r| r.postgres_cpu_pct,
            Fmt::Pct,
        ),
        Line::Lrd,
        Line::Fig("reconnects", |r| r.delivery.reconnects, Fmt::Count),
        Line::Fig(
            "trades not delivered at the end",
            |r| r.delivery.undrained,
            Fmt::Count,
        ),
        Line::Fig("client errors", |r| r.delivery.errors, Fmt::Count),
    ];
    for line in lines {
        let (label, v) = match line {
            Line::Fig(label, fig, f) => (label, fmt(f, rec, fig)),
            Line::Lrd => ("lost / duplicated / reordered", fmt_lrd(&r.rec.delivery)),
        };
        t.push_str(&format!("| {label} | {v} |\n"));
    }
    t
}

pub fn write_soak_report(
    set: &Settings,
    machine: &[(&str, String)],
    r: &SoakResult,
    plot: Option<&str>,
) -> Result<()> {
    let path = &set.soak_report;
    let mut s = String::from("# Soak\n\n");
    s.push_str(
        "Generated by `marketcast-bench --scenarios soak` (`make soak`), issue 6 item 4. \
         Everything above the notes marker is rewritten on every run; the method is in \
         [../BENCHMARKS.md](../BENCHMARKS.md#method).\n\n## Machine\n\n",
    );
    for (k, v) in machine {
        s.push_str(&format!("- {k}: {v}\n"));
    }
    s.push_str(&format!(
        "\n## Command\n\n```\n{}\n```\n\n## Results\n\n",
        command_line()
    ));
    s.push_str(&soak_table(set, r));
    if let Some(p) = plot {
        s.push_str(&format!(
            "\n![server RSS and descriptors over the soak]({p})\n"
        ));
    }
    s.push_str("\nRecord and samples (t_s from the first sample; the last one is after the final drain):\n\n```\n");
    s.push_str(&json_line(
        "soak",
        json!({ "result": rec_json(&r.rec), "samples": r.samples }),
    ));
    s.push_str("\n```\n\n");
    s.push_str(NOTES_MARKER);
    s.push_str(&kept_notes(path));
    write_file(path, &s)
}
