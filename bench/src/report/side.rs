//! The side-by-side part of the report (issue 14): S1, T, S2 and S3 for
//! marketcast, the Node bridge and the raw baseline, run in one invocation
//! with their rounds alternating; marketcast's ratio to each peer, and the
//! issues' targets, judged where a target is a bound or a ratio; then
//! Postgres's CPU by backend in T.

use serde_json::{json, Map, Value};

use super::{
    fmt, fmt_lrd, json_line, json_num, median, median_run, rec_json, Delivery, Figures, Fmt,
    Results,
};
use crate::conns::S3Figures;
use crate::latency::{LatencyFigures, LatencyRun};
use crate::procs::{PgBreakdown, PG_PARTS};
use crate::ramp::{S2Figures, S2Result};
use crate::{Settings, Target};

/// A bound on a figure of marketcast: on the figure itself, or on its ratio
/// to a peer's.
#[derive(Clone, Copy)]
enum Bound {
    AtMost(f64),
    AtLeast(f64),
}

impl Bound {
    /// None: nothing to judge (no figure, or no peer).
    fn holds(self, v: f64) -> Option<bool> {
        v.is_finite().then_some(match self {
            Bound::AtMost(x) => v <= x,
            Bound::AtLeast(x) => v >= x,
        })
    }
}

/// A target as the report prints it, and the bounds of issue 14 it judges.
#[derive(Clone, Copy, Default)]
struct Goal {
    text: &'static str,
    abs: Option<Bound>,
    bridge: Option<Bound>,
    raw: Option<Bound>,
}

impl Goal {
    fn text(text: &'static str) -> Goal {
        Goal {
            text,
            ..Default::default()
        }
    }

    /// The text, with "met" or "missed" when any bound could be judged.
    fn verdict(&self, mc: f64, vs_bridge: f64, vs_raw: f64) -> String {
        let checks: Vec<bool> = [
            self.abs.and_then(|b| b.holds(mc)),
            self.bridge.and_then(|b| b.holds(vs_bridge)),
            self.raw.and_then(|b| b.holds(vs_raw)),
        ]
        .into_iter()
        .flatten()
        .collect();
        if checks.is_empty() {
            self.text.to_string()
        } else if checks.iter().all(|&c| c) {
            format!("{}: met", self.text)
        } else {
            format!("{}: **missed**", self.text)
        }
    }
}

/// One row of the side-by-side table, of records `R`.
enum Row<R> {
    /// Label, the figure, its format, the target.
    Fig(&'static str, fn(&R) -> f64, Fmt, Goal),
    /// A figure of Postgres: no ratio to the raw baseline, whose Postgres
    /// idles (it commits nothing).
    Pg(&'static str, fn(&R) -> f64, Fmt, Goal),
    /// Every run's figure, in run order.
    Each(&'static str, fn(&R) -> f64, Fmt),
    /// lost / duplicated / reordered (worst run), and a note as the target.
    Lrd(fn(&R) -> &Delivery, &'static str),
}

fn fmt_ratio(r: f64) -> String {
    if r.is_finite() {
        format!("{r:.2}x")
    } else {
        String::new()
    }
}

/// The rows of one scenario: `aggs` each server's combined runs, `runs`
/// each server's runs.
fn rows<R>(
    t: &mut String,
    name: &str,
    aggs: &[Option<R>; 3],
    runs: &[Vec<&R>; 3],
    rows: &[Row<R>],
) {
    for row in rows {
        let (label, cells, vb, vr, target) = match row {
            Row::Fig(label, fig, f, goal) | Row::Pg(label, fig, f, goal) => {
                let v = |i: usize| aggs[i].as_ref().map_or(f64::NAN, fig);
                let vb = v(0) / v(1);
                let vr = match row {
                    Row::Pg(..) => f64::NAN,
                    _ => v(0) / v(2),
                };
                let cells = aggs.each_ref().map(|a| fmt(*f, a.as_ref(), *fig));
                (
                    *label,
                    cells,
                    fmt_ratio(vb),
                    fmt_ratio(vr),
                    goal.verdict(v(0), vb, vr),
                )
            }
            Row::Each(label, fig, f) => {
                let cells = runs.each_ref().map(|v| {
                    if v.is_empty() {
                        "-".to_string()
                    } else {
                        v.iter()
                            .map(|r| fmt(*f, Some(*r), *fig))
                            .collect::<Vec<_>>()
                            .join(", ")
                    }
                });
                (*label, cells, String::new(), String::new(), String::new())
            }
            Row::Lrd(d, note) => {
                let cells = aggs
                    .each_ref()
                    .map(|a| a.as_ref().map_or("-".to_string(), |a| fmt_lrd(d(a))));
                let label = "lost / duplicated / reordered (worst run)";
                (label, cells, String::new(), String::new(), note.to_string())
            }
        };
        let [m, b, r] = cells;
        t.push_str(&format!(
            "| {name} | {label} | {m} | {b} | {r} | {vb} | {vr} | {target} |\n"
        ));
    }
}

fn recs<T, F>(by: &super::ByTarget<T>, rec: fn(&T) -> &F) -> [Vec<&F>; 3] {
    Target::ALL.map(|t| by.get(t).iter().map(rec).collect())
}

fn lat(x: &LatencyRun) -> &LatencyFigures {
    &x.rec
}

fn s2(x: &S2Result) -> &S2Figures {
    &x.rec
}

fn s3(x: &S3Figures) -> &S3Figures {
    x
}

fn latency_rows(s1: bool) -> Vec<Row<LatencyFigures>> {
    let p99 = if s1 {
        Goal::text("issue 5: <= 5")
    } else {
        Goal {
            text: "issue 14: <= 0.7x bridge and <= 1.3x raw",
            bridge: Some(Bound::AtMost(0.7)),
            raw: Some(Bound::AtMost(1.3)),
            ..Default::default()
        }
    };
    let p999 = if s1 {
        Goal::text("issue 5: <= 10")
    } else {
        Goal {
            text: "issue 14: <= 0.5x bridge (issue 5: <= 5)",
            bridge: Some(Bound::AtMost(0.5)),
            ..Default::default()
        }
    };
    let cpu = if s1 {
        Goal::default()
    } else {
        Goal {
            text: "issue 14: <= 0.5x bridge (issue 5: <= 25 %)",
            bridge: Some(Bound::AtMost(0.5)),
            ..Default::default()
        }
    };
    let pg = if s1 {
        Goal::default()
    } else {
        Goal {
            // docs/BENCHMARKS.md at 106ff5f: 34 % of a core at 500 trades/s.
            text: "issue 14: <= half of 106ff5f's 680 (34 % of a core at 500 trades/s)",
            abs: Some(Bound::AtMost(340.0)),
            ..Default::default()
        }
    };
    let mut v: Vec<Row<LatencyFigures>> = vec![
        Row::Fig("latency p50 (ms)", |r| r.p50_ms, Fmt::Ms, Goal::default()),
        Row::Fig("latency p99 (ms)", |r| r.p99_ms, Fmt::Ms, p99),
    ];
    if !s1 {
        v.push(Row::Each(
            "latency p99 (ms), each run",
            |r| r.p99_ms,
            Fmt::Ms,
        ));
    }
    v.extend::<[Row<LatencyFigures>; 4]>([
        Row::Fig("latency p99.9 (ms)", |r| r.p999_ms, Fmt::Ms, p999),
        Row::Fig("latency max (ms)", |r| r.max_ms, Fmt::Ms, Goal::default()),
        Row::Fig(
            "delivered frames/s",
            |r| r.frames_per_s,
            Fmt::Count,
            Goal::default(),
        ),
        Row::Fig(
            "server CPU (% of a core)",
            |r| r.server_cpu_pct,
            Fmt::Pct,
            cpu,
        ),
    ]);
    if !s1 {
        v.push(Row::Each(
            "server CPU (% of a core), each run",
            |r| r.server_cpu_pct,
            Fmt::Pct,
        ));
    }
    v.extend::<[Row<LatencyFigures>; 6]>([
        Row::Fig(
            "server CPU per delivered frame (µs)",
            |r| r.server_cpu_us_per_frame,
            Fmt::Ms,
            Goal::default(),
        ),
        Row::Fig(
            "server RSS (MiB)",
            |r| r.server_rss_mib,
            Fmt::Mib,
            if s1 {
                Goal::default()
            } else {
                Goal::text("(issue 5: alternatives 23-90)")
            },
        ),
        Row::Pg(
            "Postgres CPU (% of a core)",
            |r| r.postgres_cpu_pct,
            Fmt::Pct,
            Goal::default(),
        ),
        Row::Pg(
            "Postgres CPU per committed trade (µs)",
            |r| r.postgres_cpu_us_per_trade,
            Fmt::Ms,
            pg,
        ),
        Row::Fig(
            "load client CPU (% of a core)",
            |r| r.bench_cpu_pct,
            Fmt::Pct,
            Goal::default(),
        ),
        Row::Lrd(|r| &r.delivery, "marketcast: 0 / 0 / 0"),
    ]);
    v
}

fn s2_rows() -> Vec<Row<S2Figures>> {
    vec![
        Row::Fig(
            "highest delivered frames/s, p99 within the bound and nothing lost",
            |r| r.best_frames_per_s,
            Fmt::Count,
            Goal {
                text: "issue 14: >= 4x bridge and >= 0.8x raw",
                bridge: Some(Bound::AtLeast(4.0)),
                raw: Some(Bound::AtLeast(0.8)),
                ..Default::default()
            },
        ),
        Row::Each("same, each run", |r| r.best_frames_per_s, Fmt::Count),
        Row::Fig("at trades/s", |r| r.best_rate, Fmt::Count, Goal::default()),
        Row::Fig(
            "p50 at that step (ms)",
            |r| r.best_p50_ms,
            Fmt::Ms,
            Goal::default(),
        ),
        Row::Fig(
            "p99 at that step (ms)",
            |r| r.best_p99_ms,
            Fmt::Ms,
            Goal::default(),
        ),
        Row::Fig(
            "server CPU at that step (% of a core)",
            |r| r.best_server_cpu_pct,
            Fmt::Pct,
            Goal::default(),
        ),
        Row::Fig(
            "server CPU per delivered frame at that step (µs)",
            |r| r.best_cpu_us_per_frame,
            Fmt::Ms,
            Goal::default(),
        ),
        Row::Fig(
            "lowest failing step above it (trades/s)",
            |r| r.fail_rate,
            Fmt::Count,
            Goal::default(),
        ),
        Row::Fig(
            "fine step (trades/s)",
            |r| r.fine_step_rate,
            Fmt::Count,
            Goal::default(),
        ),
        Row::Fig("steps run", |r| r.steps, Fmt::Count, Goal::default()),
        Row::Lrd(
            |r| &r.delivery,
            "marketcast: 0 / 0 / 0 (the peers lose frames in overloaded steps)",
        ),
    ]
}

fn s3_rows() -> Vec<Row<S3Figures>> {
    vec![
        Row::Fig(
            "server RSS per connection (KiB)",
            |r| r.kib_per_conn,
            Fmt::Kib,
            Goal {
                text: "issue 14: <= 4 (issue 5: <= 5)",
                abs: Some(Bound::AtMost(4.0)),
                ..Default::default()
            },
        ),
        Row::Fig(
            "server RSS per followed idle market, beyond its connection (KiB)",
            |r| r.kib_per_market,
            Fmt::Kib,
            Goal::default(),
        ),
        Row::Fig(
            "same, after one trade reached all (KiB)",
            |r| r.kib_per_conn_after_trade,
            Fmt::Kib,
            Goal::default(),
        ),
        Row::Fig(
            "server RSS, all subscribed (MiB)",
            |r| r.rss_subscribed_mib,
            Fmt::Mib,
            Goal::default(),
        ),
        Row::Fig(
            "one trade to all: commit to last client (ms)",
            |r| r.reach_all_ms,
            Fmt::Ms,
            Goal::text("issue 5: < 150"),
        ),
        Row::Fig(
            "one trade: p50 over clients (ms)",
            |r| r.reach_p50_ms,
            Fmt::Ms,
            Goal::default(),
        ),
        Row::Fig(
            "time to connect and subscribe all (s)",
            |r| r.connect_s,
            Fmt::Secs,
            Goal::default(),
        ),
        Row::Lrd(|r| &r.delivery, "0 / 0 / 0"),
    ]
}

/// The side-by-side table (empty without S1, T, S2 or S3), and T's
/// Postgres breakdown after it.
pub(super) fn table(r: &Results, set: &Settings) -> String {
    let mut t = String::new();
    if r.s1.is_empty() && r.table.is_empty() && r.s2.is_empty() && r.s3.is_empty() {
        return t;
    }
    let peers: Vec<&str> = r
        .targets
        .iter()
        .filter(|&&t| t != Target::Marketcast)
        .map(|t| t.label())
        .collect();
    t.push_str(&format!(
        "**Side by side** (issue 14): T and S2 are medians of {} runs of each server, S1 and S3 \
         of {} marketcast runs and {} of each peer ({}); rounds alternate between the servers \
         (run i of each before run i+1 of any, the order rotated every run). \
         lost / duplicated / reordered: the worst run.\n\n",
        r.runs,
        r.runs,
        r.baseline_runs,
        if peers.is_empty() {
            "none in this run".to_string()
        } else {
            peers.join(", ")
        },
    ));
    t.push_str(
        "| scenario | figure | marketcast | Node bridge | raw baseline | marketcast / bridge | marketcast / raw | target |\n\
         |---|---|---:|---:|---:|---:|---:|---|\n",
    );
    if !r.s1.is_empty() {
        let name = format!(
            "S1: {} subs, {} markets, {} trades/s, {} s",
            set.subscribers,
            crate::MARKETS,
            set.rate,
            set.duration.as_secs()
        );
        rows(
            &mut t,
            &name,
            &r.s1.agg(lat),
            &recs(&r.s1, lat),
            &latency_rows(true),
        );
    }
    if !r.table.is_empty() {
        let name = format!(
            "T: {} subs, 1 market, {} trades/s, {} s",
            set.table_subscribers,
            set.table_rate,
            set.table_duration.as_secs()
        );
        rows(
            &mut t,
            &name,
            &r.table.agg(lat),
            &recs(&r.table, lat),
            &latency_rows(false),
        );
    }
    if !r.s2.is_empty() {
        let name = format!(
            "S2: {} subs, 1 market, p99 <= {} ms",
            set.s2_subscribers,
            set.s2_bound_us / 1000
        );
        rows(&mut t, &name, &r.s2.agg(s2), &recs(&r.s2, s2), &s2_rows());
    }
    if !r.s3.is_empty() {
        let name = format!("S3: {} idle subscribed connections", set.s3_connections);
        rows(&mut t, &name, &r.s3.agg(s3), &recs(&r.s3, s3), &s3_rows());
    }
    pg_table(&mut t, r);
    t
}

fn pg_of(v: &[LatencyRun]) -> Vec<&PgBreakdown> {
    v.iter().filter_map(|x| x.pg.as_ref()).collect()
}

/// Postgres's CPU by backend over T's measured windows, for the servers fed
/// through SQL: medians per row over runs (so rows need not add up to the
/// total's median), each marketcast run beside them.
fn pg_table(t: &mut String, r: &Results) {
    let (mc, br) = (pg_of(&r.table.mc), pg_of(&r.table.bridge));
    if mc.is_empty() && br.is_empty() {
        return;
    }
    t.push_str(
        "\n**Postgres CPU by backend in T** (the measured window of each run): every child \
         process of the postmaster, its CPU from `/proc/PID/task/*/schedstat`, named by \
         `pg_stat_activity` (the `application_name` each connection sets, else its \
         `backend_type`); the postmaster itself goes with the background processes, and \
         processes that ended in the window are counted from the postmaster's `cutime + cstime`. \
         Medians per row, so the rows need not add up to the total's median. µs per trade: \
         per trade committed in the window.\n\n",
    );
    t.push_str(
        "| Postgres process | marketcast: % of a core | marketcast: µs per trade | marketcast: µs per trade, each run | Node bridge: % of a core | Node bridge: µs per trade |\n\
         |---|---:|---:|---:|---:|---:|\n",
    );
    let med = |v: &[&PgBreakdown], f: &dyn Fn(&PgBreakdown) -> f64| {
        if v.is_empty() {
            "-".to_string()
        } else {
            format!("{:.2}", median(v.iter().map(|b| f(b))))
        }
    };
    for (key, label) in PG_PARTS {
        let used = mc
            .iter()
            .chain(&br)
            .any(|b| b.ns.get(key).copied().unwrap_or(0) > 0);
        if !used {
            continue;
        }
        let each = if mc.is_empty() {
            "-".to_string()
        } else {
            mc.iter()
                .map(|b| format!("{:.1}", b.us_per_trade(key)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let label = if key == "total" {
            format!("**{label}**")
        } else {
            label.to_string()
        };
        t.push_str(&format!(
            "| {label} | {} | {} | {each} | {} | {} |\n",
            med(&mc, &|b| b.pct(key)),
            med(&mc, &|b| b.us_per_trade(key)),
            med(&br, &|b| b.pct(key)),
            med(&br, &|b| b.us_per_trade(key)),
        ));
    }
}

/// `{"scenario":..,"runs":{..},"marketcast":{..},"bridge":{..},"raw":{..}}`
/// plus `extra`'s keys.
fn json3<T, F: Figures>(
    name: &str,
    by: &super::ByTarget<T>,
    rec: fn(&T) -> &F,
    extra: Value,
) -> Option<String> {
    if by.is_empty() {
        return None;
    }
    let aggs = by.agg(rec);
    let mut runs = Map::new();
    let mut v = json!({});
    for (t, a) in Target::ALL.iter().zip(&aggs) {
        runs.insert(t.name().into(), json!(by.get(*t).len()));
        if let Some(a) = a {
            v[t.name()] = rec_json(a);
        }
    }
    v["runs"] = Value::Object(runs);
    if let Value::Object(m) = extra {
        for (k, x) in m {
            v[k] = x;
        }
    }
    Some(json_line(name, v))
}

pub(super) fn json_lines(r: &Results) -> Vec<String> {
    let pg: Map<String, Value> = Target::ALL
        .iter()
        .filter_map(|&t| {
            let v: Vec<&PgBreakdown> = r
                .table
                .get(t)
                .iter()
                .filter_map(|x| x.pg.as_ref())
                .collect();
            (!v.is_empty()).then(|| {
                let parts: Map<String, Value> = PG_PARTS
                    .iter()
                    .map(|(k, _)| {
                        let us = median(v.iter().map(|b| b.us_per_trade(k)));
                        let pct = median(v.iter().map(|b| b.pct(k)));
                        (
                            k.to_string(),
                            json!({"pct": json_num(pct), "us_per_trade": json_num(us)}),
                        )
                    })
                    .collect();
                (t.name().to_string(), Value::Object(parts))
            })
        })
        .collect();
    let s2_steps: Map<String, Value> = Target::ALL
        .iter()
        .filter_map(|&t| {
            let v = r.s2.get(t);
            let recs: Vec<&S2Figures> = v.iter().map(|x| &x.rec).collect();
            median_run(&recs, |x| x.best_frames_per_s)
                .map(|i| (t.name().to_string(), json!(v[i].steps)))
        })
        .collect();
    [
        json3("S1", &r.s1, lat, json!({})),
        json3(
            "T",
            &r.table,
            lat,
            json!({ "postgres_by_backend_medians": Value::Object(pg) }),
        ),
        json3(
            "S2",
            &r.s2,
            s2,
            json!({ "steps_of_the_median_run": Value::Object(s2_steps) }),
        ),
        json3("S3", &r.s3, s3, json!({})),
    ]
    .into_iter()
    .flatten()
    .collect()
}
