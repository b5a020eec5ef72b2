//! Results: medians over runs, the Markdown table (with the issue's targets
//! beside each figure), one JSON record per scenario, and the report file
//! whose hand-written notes (below the marker) survive regeneration.

use std::path::Path;
use std::process::Command;
use std::time::SystemTime;

use anyhow::{Context, Result};
use serde_json::{json, Map, Value};

use crate::latency::LatencyRun;
use crate::ramp::S2Result;
use crate::soak::SoakResult;
use crate::Settings;

/// Where the report's hand-written notes start; kept across regenerations.
pub const NOTES_MARKER: &str =
    "<!-- notes below this line are kept when the report is regenerated -->";

/// One run's figures, in report order. Non-finite values print as null.
pub type Rec = Vec<(&'static str, f64)>;

pub fn get(rec: &Rec, key: &str) -> f64 {
    rec.iter()
        .find(|(k, _)| *k == key)
        .map(|(_, v)| *v)
        .unwrap_or(f64::NAN)
}

/// Figures where the worst run is reported instead of the median, so one bad
/// run is never hidden.
const WORST: [&str; 7] = [
    "lost",
    "duplicated",
    "reordered",
    "errors",
    "undrained",
    "parse_errors",
    "not_live",
];

/// Field-wise median of the runs (the maximum for WORST).
pub fn aggregate(runs: &[&Rec]) -> Rec {
    let Some(first) = runs.first() else {
        return Vec::new();
    };
    first
        .iter()
        .map(|(k, _)| {
            let mut xs: Vec<f64> = runs.iter().map(|r| get(r, k)).collect();
            xs.sort_by(f64::total_cmp);
            let v = if WORST.contains(k) {
                xs[xs.len() - 1]
            } else {
                xs[xs.len() / 2]
            };
            (*k, v)
        })
        .collect()
}

/// The index of the run whose `key` is the median (for the plots).
pub fn median_run(runs: &[&Rec], key: &str) -> Option<usize> {
    let mut idx: Vec<usize> = (0..runs.len()).collect();
    idx.sort_by(|&a, &b| get(runs[a], key).total_cmp(&get(runs[b], key)));
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

pub fn rec_line(rec: &Rec) -> String {
    rec.iter()
        .map(|(k, v)| format!("{k}={}", num(*v)))
        .collect::<Vec<_>>()
        .join(" ")
}

fn rec_json(rec: &Rec) -> Value {
    Value::Object(
        rec.iter()
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
    Mib,
    Kib,
    /// lost / duplicated / reordered of the record.
    Lrd,
}

fn fmt(f: Fmt, rec: &Rec, key: &str) -> String {
    if rec.is_empty() {
        return "-".into();
    }
    let v = get(rec, key);
    if let Fmt::Lrd = f {
        return format!(
            "{} / {} / {}",
            num(get(rec, "lost")),
            num(get(rec, "duplicated")),
            num(get(rec, "reordered"))
        );
    }
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
        Fmt::Mib => format!("{v:.1}"),
        Fmt::Lrd => unreachable!("handled above"),
    }
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

/// One table row: label, key in the marketcast record, key in the baseline
/// record (None: no baseline figure), format, the issue's target.
type Row = (
    &'static str,
    &'static str,
    Option<&'static str>,
    Fmt,
    &'static str,
);

fn rows(t: &mut String, name: &str, mc: &Rec, base: &Rec, rows: &[Row]) {
    for &(label, key, bkey, f, target) in rows {
        let b = bkey.map(|k| fmt(f, base, k)).unwrap_or_else(|| "-".into());
        let ratio = match (bkey, f) {
            (Some(k), Fmt::Ms | Fmt::Secs | Fmt::Count | Fmt::Pct | Fmt::Mib | Fmt::Kib)
                if !base.is_empty() =>
            {
                let r = get(mc, key) / get(base, k);
                if r.is_finite() {
                    format!("{r:.2}x")
                } else {
                    "-".into()
                }
            }
            _ => String::new(),
        };
        t.push_str(&format!(
            "| {name} | {label} | {} | {b} | {ratio} | {target} |\n",
            fmt(f, mc, key)
        ));
    }
}

#[derive(Default)]
pub struct Results {
    pub runs: usize,
    pub baseline_runs: usize,
    pub s1: Vec<LatencyRun>,
    pub s1_raw: Vec<LatencyRun>,
    pub table: Vec<LatencyRun>,
    pub table_raw: Vec<LatencyRun>,
    pub s2: Vec<S2Result>,
    pub s2_raw: Vec<S2Result>,
    pub s3: Vec<Rec>,
    pub s3_raw: Vec<Rec>,
    pub s4: Vec<Rec>,
    pub s4_sql: Vec<Rec>,
    pub s4_load_s: Option<f64>,
    pub s5: Vec<Rec>,
    pub s6: Vec<Rec>,
    pub soak: Option<SoakResult>,
}

fn agg_lat(v: &[LatencyRun]) -> Rec {
    aggregate(&v.iter().map(|r| &r.rec).collect::<Vec<_>>())
}

fn agg_s2(v: &[S2Result]) -> Rec {
    aggregate(&v.iter().map(|r| &r.rec).collect::<Vec<_>>())
}

fn agg(v: &[Rec]) -> Rec {
    aggregate(&v.iter().collect::<Vec<_>>())
}

impl Results {
    /// No marketcast run lost, duplicated or reordered a frame.
    pub fn guarantee_held(&self) -> bool {
        let mut recs: Vec<&Rec> = Vec::new();
        recs.extend(self.s1.iter().map(|r| &r.rec));
        recs.extend(self.table.iter().map(|r| &r.rec));
        recs.extend(self.s2.iter().map(|r| &r.rec));
        recs.extend(self.s3.iter());
        recs.extend(self.s4.iter());
        recs.extend(self.s6.iter());
        recs.extend(self.soak.iter().map(|s| &s.rec));
        let mut ok = true;
        for r in recs {
            for k in ["lost", "duplicated", "reordered"] {
                if get(r, k) > 0.0 {
                    eprintln!("marketcast-bench: marketcast {k} = {} in a run", get(r, k));
                    ok = false;
                }
            }
        }
        ok
    }

    pub fn table(&self, set: &Settings) -> String {
        let mut t = String::new();
        let runs = format!(
            "median of {} marketcast run{}, {} baseline run{}",
            self.runs,
            if self.runs == 1 { "" } else { "s" },
            self.baseline_runs,
            if self.baseline_runs == 1 { "" } else { "s" },
        );
        t.push_str(&format!(
            "| scenario | figure ({runs}) | marketcast | baseline | marketcast / baseline | target (issue 5) |\n"
        ));
        t.push_str("|---|---|---:|---:|---:|---|\n");
        let lat_rows: [Row; 10] = [
            ("latency p50 (ms)", "p50_ms", Some("p50_ms"), Fmt::Ms, ""),
            ("latency p99 (ms)", "p99_ms", Some("p99_ms"), Fmt::Ms, ""),
            (
                "latency p99.9 (ms)",
                "p999_ms",
                Some("p999_ms"),
                Fmt::Ms,
                "",
            ),
            ("latency max (ms)", "max_ms", Some("max_ms"), Fmt::Ms, ""),
            (
                "delivered frames/s",
                "frames_per_s",
                Some("frames_per_s"),
                Fmt::Count,
                "",
            ),
            (
                "server CPU (% of a core)",
                "server_cpu_pct",
                Some("server_cpu_pct"),
                Fmt::Pct,
                "",
            ),
            (
                "server RSS (MiB)",
                "server_rss_mib",
                Some("server_rss_mib"),
                Fmt::Mib,
                "",
            ),
            (
                "Postgres CPU (% of a core)",
                "postgres_cpu_pct",
                None,
                Fmt::Pct,
                "",
            ),
            (
                "load client CPU (% of a core)",
                "bench_cpu_pct",
                Some("bench_cpu_pct"),
                Fmt::Pct,
                "",
            ),
            (
                "lost / duplicated / reordered",
                "lost",
                Some("lost"),
                Fmt::Lrd,
                "0 / 0 / 0",
            ),
        ];
        let with_targets = |targets: &[(&str, &'static str)]| -> Vec<Row> {
            lat_rows
                .iter()
                .map(|r| {
                    let tgt = targets
                        .iter()
                        .find(|(k, _)| *k == r.1)
                        .map(|(_, t)| *t)
                        .unwrap_or(r.4);
                    (r.0, r.1, r.2, r.3, tgt)
                })
                .collect()
        };
        if !self.s1.is_empty() {
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
                &agg_lat(&self.s1),
                &agg_lat(&self.s1_raw),
                &with_targets(&[("p99_ms", "<= 5"), ("p999_ms", "<= 10")]),
            );
        }
        if !self.table.is_empty() {
            let name = format!(
                "T: {} subs, 1 market, {} trades/s, {} s",
                set.table_subscribers,
                set.table_rate,
                set.table_duration.as_secs()
            );
            rows(
                &mut t,
                &name,
                &agg_lat(&self.table),
                &agg_lat(&self.table_raw),
                &with_targets(&[
                    ("p999_ms", "<= 5 (best alternative 3.2-6.1)"),
                    ("server_cpu_pct", "<= 25 % (alternatives 50-87 %)"),
                    ("server_rss_mib", "(alternatives 23-90)"),
                ]),
            );
        }
        if !self.s2.is_empty() {
            let name = format!(
                "S2: {} subs, 1 market, p99 <= {} ms",
                set.s2_subscribers,
                set.s2_bound_us / 1000
            );
            rows(
                &mut t,
                &name,
                &agg_s2(&self.s2),
                &agg_s2(&self.s2_raw),
                &[
                    (
                        "highest delivered frames/s",
                        "best_frames_per_s",
                        Some("best_frames_per_s"),
                        Fmt::Count,
                        ">= 1,000,000 and >= 0.70x baseline",
                    ),
                    (
                        "at trades/s",
                        "best_rate",
                        Some("best_rate"),
                        Fmt::Count,
                        "",
                    ),
                    (
                        "p99 at that step (ms)",
                        "best_p99_ms",
                        Some("best_p99_ms"),
                        Fmt::Ms,
                        "",
                    ),
                    (
                        "first failing step (trades/s)",
                        "fail_rate",
                        Some("fail_rate"),
                        Fmt::Count,
                        "",
                    ),
                    (
                        "lost / duplicated / reordered",
                        "lost",
                        Some("lost"),
                        Fmt::Lrd,
                        "0 / 0 / 0",
                    ),
                ],
            );
        }
        if !self.s3.is_empty() {
            let name = format!("S3: {} idle subscribed connections", set.s3_connections);
            rows(
                &mut t,
                &name,
                &agg(&self.s3),
                &agg(&self.s3_raw),
                &[
                    (
                        "server RSS per connection (KiB)",
                        "kib_per_conn",
                        Some("kib_per_conn"),
                        Fmt::Kib,
                        "<= 5 (Node bridge 5.4)",
                    ),
                    (
                        "same, after one trade reached all (KiB)",
                        "kib_per_conn_after_trade",
                        Some("kib_per_conn_after_trade"),
                        Fmt::Kib,
                        "",
                    ),
                    (
                        "server RSS, all subscribed (MiB)",
                        "rss_subscribed_mib",
                        Some("rss_subscribed_mib"),
                        Fmt::Mib,
                        "",
                    ),
                    (
                        "one trade to all: commit to last client (ms)",
                        "reach_all_ms",
                        Some("reach_all_ms"),
                        Fmt::Ms,
                        "< 150",
                    ),
                    (
                        "one trade: p50 over clients (ms)",
                        "reach_p50_ms",
                        Some("reach_p50_ms"),
                        Fmt::Ms,
                        "",
                    ),
                    (
                        "time to connect and subscribe all (s)",
                        "connect_s",
                        Some("connect_s"),
                        Fmt::Secs,
                        "",
                    ),
                    (
                        "lost / duplicated / reordered",
                        "lost",
                        Some("lost"),
                        Fmt::Lrd,
                        "0 / 0 / 0",
                    ),
                ],
            );
        }
        if !self.s4.is_empty() {
            let name = format!(
                "S4: replay, log of {}; {} clients x newest {} (baseline: one plain SQL read)",
                thousands(set.s4_trades as f64),
                set.s4_clients,
                thousands(set.s4_tail as f64)
            );
            rows(
                &mut t,
                &name,
                &agg(&self.s4),
                &agg(&self.s4_sql),
                &[
                    (
                        "1 client from_seq=0: trades/s",
                        "one_trades_per_s",
                        Some("one_trades_per_s"),
                        Fmt::Count,
                        ">= 300,000",
                    ),
                    (
                        "1 client: seconds to catch up",
                        "one_s",
                        Some("one_s"),
                        Fmt::Secs,
                        "",
                    ),
                    (
                        "1 client: server CPU (% of a core)",
                        "one_server_cpu_pct",
                        None,
                        Fmt::Pct,
                        "",
                    ),
                    (
                        "1 client: load client CPU (% of a core)",
                        "one_bench_cpu_pct",
                        None,
                        Fmt::Pct,
                        "",
                    ),
                    (
                        "1 client: Postgres CPU (% of a core)",
                        "one_postgres_cpu_pct",
                        None,
                        Fmt::Pct,
                        "",
                    ),
                    (
                        "all clients at once: total trades/s",
                        "many_trades_per_s",
                        None,
                        Fmt::Count,
                        ">= 1,000,000",
                    ),
                    (
                        "all clients: seconds until all caught up",
                        "many_s",
                        None,
                        Fmt::Secs,
                        "",
                    ),
                    (
                        "all clients: server CPU (% of a core)",
                        "many_server_cpu_pct",
                        None,
                        Fmt::Pct,
                        "",
                    ),
                    (
                        "all clients: load client CPU (% of a core)",
                        "many_bench_cpu_pct",
                        None,
                        Fmt::Pct,
                        "",
                    ),
                    (
                        "all clients: Postgres CPU (% of a core)",
                        "many_postgres_cpu_pct",
                        None,
                        Fmt::Pct,
                        "",
                    ),
                    (
                        "lost / duplicated / reordered",
                        "lost",
                        None,
                        Fmt::Lrd,
                        "0 / 0 / 0",
                    ),
                ],
            );
        }
        if !self.s5.is_empty() {
            let name = format!(
                "S5: {} clients, {} s (baseline: plain SQL, 1 trade/tx)",
                set.s5_clients,
                set.s5_duration.as_secs()
            );
            let r = agg(&self.s5);
            rows(
                &mut t,
                &name,
                &r,
                &r,
                &[
                    (
                        "trades/s (writer HTTP vs SQL)",
                        "http_trades_per_s",
                        Some("sql_trades_per_s"),
                        Fmt::Count,
                        ">= 5x SQL",
                    ),
                    (
                        "p99 request latency (ms)",
                        "http_p99_ms",
                        Some("sql_p99_ms"),
                        Fmt::Ms,
                        "<= 20",
                    ),
                ],
            );
        }
        if !self.s6.is_empty() {
            let name = format!(
                "S6: {} subs, {} markets, {} trades/s, all drop and reconnect",
                set.s6_subscribers, set.s6_markets, set.s6_rate
            );
            rows(
                &mut t,
                &name,
                &agg(&self.s6),
                &Vec::new(),
                &[
                    (
                        "time until all live again (s)",
                        "all_live_s",
                        None,
                        Fmt::Secs,
                        "<= 5",
                    ),
                    (
                        "p50 client live again (s)",
                        "p50_live_s",
                        None,
                        Fmt::Secs,
                        "",
                    ),
                    (
                        "server CPU during the storm (% of a core)",
                        "storm_server_cpu_pct",
                        None,
                        Fmt::Pct,
                        "",
                    ),
                    (
                        "lost / duplicated / reordered",
                        "lost",
                        None,
                        Fmt::Lrd,
                        "0 / 0 / 0",
                    ),
                ],
            );
        }
        t
    }

    pub fn json_lines(&self, set: &Settings) -> Vec<String> {
        let mut out = Vec::new();
        let both = |name: &str, mc: Rec, base: Rec, extra: Value| -> String {
            let mut v = json!({ "runs": self.runs, "marketcast": rec_json(&mc) });
            if !base.is_empty() {
                v["baseline_runs"] = json!(self.baseline_runs);
                v["baseline"] = rec_json(&base);
            }
            if let Value::Object(m) = extra {
                for (k, x) in m {
                    v[k] = x;
                }
            }
            json_line(name, v)
        };
        if !self.s1.is_empty() {
            out.push(both(
                "S1",
                agg_lat(&self.s1),
                agg_lat(&self.s1_raw),
                json!({}),
            ));
        }
        if !self.table.is_empty() {
            out.push(both(
                "T",
                agg_lat(&self.table),
                agg_lat(&self.table_raw),
                json!({}),
            ));
        }
        if !self.s2.is_empty() {
            let steps = |v: &[S2Result]| {
                let recs: Vec<&Rec> = v.iter().map(|r| &r.rec).collect();
                median_run(&recs, "best_frames_per_s").map(|i| v[i].steps.clone())
            };
            out.push(both(
                "S2",
                agg_s2(&self.s2),
                agg_s2(&self.s2_raw),
                json!({
                    "marketcast_steps_median_run": steps(&self.s2),
                    "baseline_steps_median_run": steps(&self.s2_raw),
                }),
            ));
        }
        if !self.s3.is_empty() {
            out.push(both("S3", agg(&self.s3), agg(&self.s3_raw), json!({})));
        }
        if !self.s4.is_empty() {
            out.push(both(
                "S4",
                agg(&self.s4),
                agg(&self.s4_sql),
                json!({ "load_s": self.s4_load_s.map(json_num) }),
            ));
        }
        if !self.s5.is_empty() {
            let r = agg(&self.s5);
            out.push(json_line(
                "S5",
                json!({
                    "runs": self.runs,
                    "clients": set.s5_clients,
                    "writer_http": {
                        "trades_per_s": json_num(get(&r, "http_trades_per_s")),
                        "p50_ms": json_num(get(&r, "http_p50_ms")),
                        "p99_ms": json_num(get(&r, "http_p99_ms")),
                        "errors": json_num(get(&r, "http_errors")),
                    },
                    "plain_sql": {
                        "trades_per_s": json_num(get(&r, "sql_trades_per_s")),
                        "p50_ms": json_num(get(&r, "sql_p50_ms")),
                        "p99_ms": json_num(get(&r, "sql_p99_ms")),
                        "errors": json_num(get(&r, "sql_errors")),
                    },
                    "ratio": json_num(get(&r, "http_trades_per_s") / get(&r, "sql_trades_per_s")),
                }),
            ));
        }
        if !self.s6.is_empty() {
            out.push(both("S6", agg(&self.s6), Vec::new(), json!({})));
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
         `--runs N` changes it); a single run on this shared 2-core machine moves \
         by tens of percent, and a factor of 2 or more when other work runs beside it.\n\n",
    );
    s.push_str("## Machine\n\n");
    for (k, v) in machine {
        s.push_str(&format!("- {k}: {v}\n"));
    }
    s.push_str(&format!("\n## Command\n\n```\n{}\n```\n\n", command_line()));
    s.push_str(&format!(
        "Runs per scenario: {} marketcast, {} baseline (figures are medians; lost/duplicated/reordered are the worst run). Load client: {}.\n\n",
        set.runs,
        set.baseline_runs,
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
    s.push_str(crate::METHOD);
    s.push('\n');
    s.push_str(NOTES_MARKER);
    s.push_str(&kept_notes(path));
    write_file(path, &s)
}

pub fn soak_table(set: &Settings, r: &SoakResult) -> String {
    let rec = &r.rec;
    let mut t = String::from("| figure | start | end |\n|---|---:|---:|\n");
    for (label, a, b, f) in [
        ("server RSS (MiB)", "rss_start_mib", "rss_end_mib", Fmt::Mib),
        (
            "server open file descriptors",
            "fds_start",
            "fds_end",
            Fmt::Count,
        ),
        ("server threads", "threads_start", "threads_end", Fmt::Count),
        (
            "WebSocket connections (marketcast_ws_connections)",
            "ws_connections_start",
            "ws_connections_end",
            Fmt::Count,
        ),
        (
            "subscriptions (marketcast_subscriptions)",
            "subscriptions_start",
            "subscriptions_end",
            Fmt::Count,
        ),
        (
            "markets in the hub (marketcast_hub_markets)",
            "hub_markets_start",
            "hub_markets_end",
            Fmt::Count,
        ),
    ] {
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
    for (label, k, f) in [
        ("trades committed", "committed", Fmt::Count),
        ("frames delivered", "frames", Fmt::Count),
        ("frames/s", "frames_per_s", Fmt::Count),
        ("latency p50 (ms)", "p50_ms", Fmt::Ms),
        ("latency p99 (ms)", "p99_ms", Fmt::Ms),
        ("latency p99.9 (ms)", "p999_ms", Fmt::Ms),
        ("latency max (ms)", "max_ms", Fmt::Ms),
        ("server CPU (% of a core)", "server_cpu_pct", Fmt::Pct),
        ("Postgres CPU (% of a core)", "postgres_cpu_pct", Fmt::Pct),
        ("lost / duplicated / reordered", "lost", Fmt::Lrd),
        ("reconnects", "reconnects", Fmt::Count),
        ("trades not delivered at the end", "undrained", Fmt::Count),
        ("client errors", "errors", Fmt::Count),
    ] {
        t.push_str(&format!("| {label} | {} |\n", fmt(f, rec, k)));
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
