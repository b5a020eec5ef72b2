//! `marketcast-bench`: the numbers behind `docs/BENCHMARKS.md` (`make bench`,
//! `make bench-quick`) and the soak of `docs/bench/soak.md` (`make soak`).
//! Issue 5 (S1..S6 and the table workload) and issue 6 item 4 (soak).
//!
//! Processes:
//! - **this one**: the load client (WebSocket subscribers, S5's HTTP and SQL
//!   clients) on one tokio runtime, the trade feed (SQL INSERTs, or requests
//!   to the raw baseline to publish) on another;
//! - **the server under test**, a child process started fresh for every run:
//!   the real `marketcast broadcaster` / `marketcast writer` binaries, the
//!   Node peer (`node bench/bridge/server.js`, see `bridge.rs`), or this
//!   binary again as the raw baseline (`--serve-raw`, see `raw.rs`). Its
//!   CPU, RSS, descriptors and threads are read from /proc/PID (`procs.rs`);
//! - **Postgres**: a throwaway cluster from `bin/pg-dev` in
//!   `/tmp/marketcast-bench-pg`, wiped at the end whatever happened.
//!
//! Modules follow the scenarios: `latency` (S1 and the table workload T),
//! `ramp` (S2), `conns` (S3), `replay` (S4), `writes` (S5), `storm` (S6),
//! `soak`; shared parts: `fleet` (subscribers and their delivery checks),
//! `ws` (the client's WebSocket reader), `feed` (trade producers), `hist`
//! (latency histograms), `procs` (child processes and /proc), `pgdev`,
//! `raw` (the baseline server), `bridge` (the Node peer), `report` and
//! `plot` (the outputs).
#![forbid(unsafe_code)]

mod bridge;
mod conns;
mod feed;
mod fleet;
mod hist;
mod latency;
mod pgdev;
mod plot;
mod procs;
mod ramp;
mod raw;
mod replay;
mod report;
mod s7;
mod s8;
mod s9;
mod soak;
mod storm;
mod writes;
mod ws;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::header::HOST;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::runtime::Handle;

use marketcast::db;

use crate::feed::{Sink, SqlFeed};
use crate::fleet::FleetCfg;
use crate::hist::Meter;
use crate::pgdev::PgDev;
use crate::procs::Server;
use crate::raw::RawControl;
use crate::report::{rec_line, Results};
use crate::ws::ClientKind;

/// Markets of S1 and S5.
pub const MARKETS: usize = 10;

const ALL: &str = "s1,s2,s3,s4,s5,s6,s7,s8,s9,table";

#[derive(Parser, Debug)]
#[command(
    name = "marketcast-bench",
    about = "Benchmarks of issue 5 (S1..S6 and the table workload, each beside a raw baseline) and the soak of issue 6, against a throwaway Postgres"
)]
struct Args {
    /// Scenarios to run, comma-separated: s1, s2, s3, s4, s5, s6, s7 (1.1
    /// read side costs), s8 (N broadcasters under CPU quotas), s9 (NOTIFY
    /// throughput by LISTENers), table (issue 5's table workload), soak
    /// (issue 6; not in the default set).
    #[arg(long, value_delimiter = ',', default_value = ALL)]
    scenarios: Vec<String>,
    /// S1: seconds of measured load [default: 30, --quick 5].
    #[arg(long)]
    duration: Option<u64>,
    /// S1 subscribers, spread over 10 markets [default: 1000, --quick 200].
    #[arg(long)]
    subscribers: Option<usize>,
    /// S1 trade rate over all markets, trades/s [default: 2000, --quick 500].
    #[arg(long)]
    rate: Option<u32>,
    /// S2 subscribers on its one market [default: 5000, --quick 200].
    #[arg(long)]
    s2_subscribers: Option<usize>,
    /// Seconds per S2 rate step [default: 3, --quick 2].
    #[arg(long)]
    s2_step: Option<u64>,
    /// S2 latency bound: the ramp stops at the first step whose p99 exceeds it.
    #[arg(long, default_value_t = 100)]
    s2_bound_ms: u64,
    /// S3 idle subscribed connections [default: 15000, --quick 1000].
    #[arg(long)]
    s3_connections: Option<usize>,
    /// S4 trades in the replayed market's log [default: 1000000, --quick 100000].
    #[arg(long)]
    s4_trades: Option<usize>,
    /// S4 clients replaying at once [default: 100, --quick 10].
    #[arg(long)]
    s4_clients: Option<usize>,
    /// S4 newest trades each of those clients replays [default: 100000, --quick 10000].
    #[arg(long)]
    s4_tail: Option<usize>,
    /// S5 concurrent HTTP clients, and SQL connections beside them.
    #[arg(long, default_value_t = 32)]
    s5_clients: usize,
    /// S5 seconds per side [default: 10, --quick 5].
    #[arg(long)]
    s5_duration: Option<u64>,
    /// S6 subscribers [default: 5000, --quick 500].
    #[arg(long)]
    s6_subscribers: Option<usize>,
    /// S6 markets the subscribers are spread over.
    #[arg(long, default_value_t = 100)]
    s6_markets: usize,
    /// S6 trades/s over all its markets [default: 1000, --quick 200].
    #[arg(long)]
    s6_rate: Option<u32>,
    /// S7 subscribers on its one market, trade mode then ticker mode
    /// [default: 1000, --quick 200].
    #[arg(long)]
    s7_subscribers: Option<usize>,
    /// S7 trades/s on that market [default: 1000, --quick 200].
    #[arg(long)]
    s7_rate: Option<u32>,
    /// S7 seconds of measured load per mode [default: 10, --quick 5].
    #[arg(long)]
    s7_duration: Option<u64>,
    /// S7 WebSocket upgrades per side of the token cost [default: 2000, --quick 500].
    #[arg(long)]
    s7_connects: Option<usize>,
    /// S8: the largest N; N = 1..=this broadcasters, each in its own cgroup.
    #[arg(long, default_value_t = 3)]
    s8_broadcasters: usize,
    /// S8 subscribers of each broadcaster (N x this in all) [default: 500,
    /// --quick 100].
    #[arg(long)]
    s8_subscribers: Option<usize>,
    /// S8 markets (each broadcaster's subscribers round-robin over all).
    #[arg(long, default_value_t = 3)]
    s8_markets: usize,
    /// S8 CPU budget of each broadcaster, % of one core (cgroup v1 CFS quota).
    #[arg(long, default_value_t = 25)]
    s8_quota_pct: u64,
    /// S8 CFS period, µs (short, so that a throttled broadcaster waits at
    /// most period x (1 - quota) for its next slice).
    #[arg(long, default_value_t = 10_000)]
    s8_period_us: u64,
    /// S8 frames/s offered per broadcaster at the first step (x1.15 a step).
    #[arg(long, default_value_t = 15_000)]
    s8_start_frames: u64,
    /// Seconds per S8 rate step [default: 3, --quick 2].
    #[arg(long)]
    s8_step: Option<u64>,
    /// S8 latency bound, ms.
    #[arg(long, default_value_t = 100)]
    s8_bound_ms: u64,
    /// S9 idle LISTEN connections, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0,1,10,50")]
    s9_listeners: Vec<usize>,
    /// S9 SQL connections committing one-trade transactions.
    #[arg(long, default_value_t = 4)]
    s9_writers: usize,
    /// S9 seconds per K [default: 5, --quick 3].
    #[arg(long)]
    s9_duration: Option<u64>,
    /// Table workload subscribers, all on one market.
    #[arg(long, default_value_t = 200)]
    table_subscribers: usize,
    /// Table workload trades/s.
    #[arg(long, default_value_t = 500)]
    table_rate: u32,
    /// Table workload seconds of measured load [default: 20, --quick 5].
    #[arg(long)]
    table_duration: Option<u64>,
    /// Soak connections [default: 10000, --quick 1000].
    #[arg(long)]
    soak_connections: Option<usize>,
    /// Soak markets the connections are spread over.
    #[arg(long, default_value_t = 100)]
    soak_markets: usize,
    /// Soak trades/s over all its markets.
    #[arg(long, default_value_t = 200)]
    soak_rate: u32,
    /// Trades each soak market keeps in the broadcaster's ring (its
    /// `--ring-size`): small, so that the rings are full before the first
    /// sample and RSS is at its steady state from then on.
    #[arg(long, default_value_t = 64)]
    soak_ring_size: usize,
    /// Seconds of trades before the soak's first sample [default: 60, --quick 10].
    #[arg(long)]
    soak_warmup: Option<u64>,
    /// Soak seconds of trades after the first sample [default: 600, --quick 30].
    #[arg(long)]
    soak_duration: Option<u64>,
    /// Seconds between the soak's samples of the server [default: 30, --quick 5].
    #[arg(long)]
    soak_sample: Option<u64>,
    /// SQL connections committing the feed's trades.
    #[arg(long, default_value_t = 5)]
    sql_writers: usize,
    /// Repeat each marketcast scenario this many times and report the median
    /// of each figure (the maximum for lost/duplicated/reordered) [default: 3,
    /// --quick 1].
    #[arg(long)]
    runs: Option<usize>,
    /// Runs of each peer (the Node bridge, the raw baseline) in S1 and S3;
    /// in T and S2 every target runs --runs times.
    #[arg(long, default_value_t = 1)]
    baseline_runs: usize,
    /// Servers of S1, T, S2 and S3, comma-separated: marketcast, bridge (the
    /// Node peer, bench/bridge), raw (the raw baseline). The other scenarios
    /// are marketcast's alone.
    #[arg(long, value_delimiter = ',', default_value = "marketcast,bridge,raw")]
    targets: Vec<String>,
    /// Skip the Node bridge (no Node.js needed).
    #[arg(long)]
    no_bridge: bool,
    /// The load client's WebSocket implementation.
    #[arg(long, value_enum, default_value_t = ClientKind::Lean)]
    client: ClientKind,
    /// Small and fast: every scenario at a small size.
    #[arg(long)]
    quick: bool,
    /// Skip the peers: the Node bridge and the raw baseline.
    #[arg(long)]
    no_baseline: bool,
    /// Markdown report to write [default: docs/BENCHMARKS.md; with --quick
    /// target/bench-quick.md, so a quick run never replaces the full results].
    #[arg(long)]
    report: Option<PathBuf>,
    /// Where the soak's report goes [default: docs/bench/soak.md; with
    /// --quick target/bench-quick-soak.md].
    #[arg(long)]
    soak_report: Option<PathBuf>,
    /// Directory of the report's PNGs [default: docs/bench; with --quick
    /// target/bench-quick].
    #[arg(long)]
    plots: Option<PathBuf>,
    /// Run the broadcaster under this command, e.g. "heaptrack -o /tmp/hp" or
    /// "perf record -g -o /tmp/perf.data" (for profiles; /proc figures then
    /// describe the wrapper's process).
    #[arg(long)]
    server_wrapper: Option<String>,
    /// Internal: run as the raw baseline server (a child of the bench).
    #[arg(long, hide = true)]
    serve_raw: bool,
}

#[derive(Debug, Clone)]
pub struct Settings {
    s1: bool,
    s2: bool,
    s3: bool,
    s4: bool,
    s5: bool,
    s6: bool,
    s7: bool,
    s8: bool,
    s9: bool,
    table: bool,
    soak: bool,
    pub duration: Duration,
    pub subscribers: usize,
    pub rate: u32,
    pub s2_subscribers: usize,
    pub s2_step: Duration,
    pub s2_bound_us: u64,
    pub s3_connections: usize,
    pub s4_trades: usize,
    pub s4_clients: usize,
    pub s4_tail: usize,
    pub s5_clients: usize,
    pub s5_duration: Duration,
    pub s6_subscribers: usize,
    pub s6_markets: usize,
    pub s6_rate: u32,
    pub s7_subscribers: usize,
    pub s7_rate: u32,
    pub s7_duration: Duration,
    pub s7_connects: usize,
    pub s8_broadcasters: usize,
    pub s8_subscribers: usize,
    pub s8_markets: usize,
    pub s8_quota_pct: u64,
    pub s8_period_us: u64,
    pub s8_start_frames: u64,
    pub s8_step: Duration,
    pub s8_bound_ms: u64,
    pub s9_listeners: Vec<usize>,
    pub s9_writers: usize,
    pub s9_duration: Duration,
    pub table_subscribers: usize,
    pub table_rate: u32,
    pub table_duration: Duration,
    pub soak_connections: usize,
    pub soak_markets: usize,
    pub soak_rate: u32,
    pub soak_duration: Duration,
    pub soak_sample: Duration,
    pub soak_ring_size: usize,
    pub soak_warmup: Duration,
    pub server_wrapper: Vec<String>,
    pub sql_writers: usize,
    pub runs: usize,
    pub baseline_runs: usize,
    /// The servers of S1, T, S2 and S3, in the order of the first run.
    pub targets: Vec<Target>,
    pub client: ClientKind,
    pub quick: bool,
    pub report: PathBuf,
    pub soak_report: PathBuf,
    pub plots: PathBuf,
}

impl Settings {
    fn from_args(a: &Args) -> Result<Settings> {
        let mut s = [false; 11];
        for name in &a.scenarios {
            let i = match name.trim().to_ascii_lowercase().as_str() {
                "s1" => 0,
                "s2" => 1,
                "s3" => 2,
                "s4" => 3,
                "s5" => 4,
                "s6" => 5,
                "table" => 6,
                "soak" => 7,
                "s7" => 8,
                "s8" => 9,
                "s9" => 10,
                "" => continue,
                other => bail!("--scenarios: unknown scenario {other:?} (known: {ALL},soak)"),
            };
            s[i] = true;
        }
        let q = a.quick;
        let secs = |v: Option<u64>, full: u64, quick: u64| {
            Duration::from_secs(v.unwrap_or(if q { quick } else { full }))
        };
        let n =
            |v: Option<usize>, full: usize, quick: usize| v.unwrap_or(if q { quick } else { full });
        let set = Settings {
            s1: s[0],
            s2: s[1],
            s3: s[2],
            s4: s[3],
            s5: s[4],
            s6: s[5],
            table: s[6],
            soak: s[7],
            s7: s[8],
            s8: s[9],
            s9: s[10],
            duration: secs(a.duration, 30, 5),
            subscribers: n(a.subscribers, 1000, 200),
            rate: a.rate.unwrap_or(if q { 500 } else { 2000 }),
            s2_subscribers: n(a.s2_subscribers, 5000, 200),
            s2_step: secs(a.s2_step, 3, 2),
            s2_bound_us: a.s2_bound_ms * 1000,
            s3_connections: n(a.s3_connections, 15_000, 1000),
            s4_trades: n(a.s4_trades, 1_000_000, 100_000),
            s4_clients: n(a.s4_clients, 100, 10),
            s4_tail: n(a.s4_tail, 100_000, 10_000),
            s5_clients: a.s5_clients,
            s5_duration: secs(a.s5_duration, 10, 5),
            s6_subscribers: n(a.s6_subscribers, 5000, 500),
            s6_markets: a.s6_markets,
            s6_rate: a.s6_rate.unwrap_or(if q { 200 } else { 1000 }),
            s7_subscribers: n(a.s7_subscribers, 1000, 200),
            s7_rate: a.s7_rate.unwrap_or(if q { 200 } else { 1000 }),
            s7_duration: secs(a.s7_duration, 10, 5),
            s7_connects: n(a.s7_connects, 2000, 500),
            s8_broadcasters: a.s8_broadcasters.max(1),
            s8_subscribers: n(a.s8_subscribers, 500, 100),
            s8_markets: a.s8_markets.max(1),
            s8_quota_pct: a.s8_quota_pct.clamp(1, 100),
            s8_period_us: a.s8_period_us.clamp(1000, 1_000_000),
            s8_start_frames: a.s8_start_frames.max(1),
            s8_step: secs(a.s8_step, 3, 2),
            s8_bound_ms: a.s8_bound_ms,
            s9_listeners: a.s9_listeners.clone(),
            s9_writers: a.s9_writers.max(1),
            s9_duration: secs(a.s9_duration, 5, 3),
            table_subscribers: a.table_subscribers,
            table_rate: a.table_rate,
            table_duration: secs(a.table_duration, 20, 5),
            soak_connections: n(a.soak_connections, 10_000, 1000),
            soak_markets: a.soak_markets,
            soak_rate: a.soak_rate,
            soak_duration: secs(a.soak_duration, 600, 30),
            soak_sample: secs(a.soak_sample, 30, 5),
            soak_ring_size: a.soak_ring_size,
            soak_warmup: secs(a.soak_warmup, 60, 10),
            server_wrapper: a
                .server_wrapper
                .as_deref()
                .unwrap_or("")
                .split_whitespace()
                .map(str::to_string)
                .collect(),
            sql_writers: a.sql_writers,
            runs: a.runs.unwrap_or(if q { 1 } else { 3 }),
            baseline_runs: a.baseline_runs,
            targets: parse_targets(a)?,
            client: a.client,
            quick: q,
            report: a.report.clone().unwrap_or_else(|| {
                PathBuf::from(if q {
                    "target/bench-quick.md"
                } else {
                    "docs/BENCHMARKS.md"
                })
            }),
            soak_report: a.soak_report.clone().unwrap_or_else(|| {
                PathBuf::from(if q {
                    "target/bench-quick-soak.md"
                } else {
                    "docs/bench/soak.md"
                })
            }),
            plots: a.plots.clone().unwrap_or_else(|| {
                PathBuf::from(if q {
                    "target/bench-quick"
                } else {
                    "docs/bench"
                })
            }),
        };
        if !s.contains(&true) {
            bail!("--scenarios: nothing to run");
        }
        if [
            set.duration,
            set.s2_step,
            set.s5_duration,
            set.table_duration,
            set.s7_duration,
            set.soak_duration,
            set.soak_sample,
        ]
        .contains(&Duration::ZERO)
        {
            bail!("durations must be at least 1 second");
        }
        if set.runs == 0 || set.rate == 0 || set.s5_clients == 0 || set.sql_writers == 0 {
            bail!("--runs, --rate, --s5-clients and --sql-writers must be at least 1");
        }
        let counts = [
            set.subscribers,
            set.s2_subscribers,
            set.s3_connections.saturating_sub(1),
            set.s4_trades,
            set.s4_clients,
            set.s4_tail,
            set.s6_subscribers,
            set.s6_markets,
            set.s6_rate as usize,
            set.table_subscribers,
            set.table_rate as usize,
            set.s7_subscribers,
            set.s7_rate as usize,
            set.s7_connects,
            set.soak_connections,
            set.soak_markets,
            set.soak_rate as usize,
        ];
        if counts.contains(&0) {
            bail!("subscriber, connection, market, trade and rate counts must be at least 1 (S3 at least 2 connections)");
        }
        // The servers run in child processes: this one holds the client end
        // of every WebSocket, each on its own ephemeral port of 127.0.0.1.
        let most = [
            (set.s1, set.subscribers),
            (set.s2, set.s2_subscribers),
            (set.s3, set.s3_connections),
            (set.s6, 2 * set.s6_subscribers), // old and new sockets during the storm
            (set.table, set.table_subscribers),
            (set.s7, set.s7_subscribers.max(set.s7_connects)),
            (set.s8, set.s8_subscribers * set.s8_broadcasters),
            (set.soak, set.soak_connections),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, n)| *n as u64)
        .max()
        .unwrap_or(0);
        if let Some(limit) = procs::open_files_limit() {
            let need = most + 2 * set.s5_clients as u64 + 500;
            if need > limit {
                bail!(
                    "{most} connections need about {need} open files in this process but the limit is {limit}; \
                     raise it (ulimit -n, at most 20000 here) or use fewer connections"
                );
            }
        }
        if let Some(ports) = procs::ephemeral_ports() {
            if most + 2000 > ports {
                bail!(
                    "{most} connections from 127.0.0.1 need more ephemeral ports than \
                     /proc/sys/net/ipv4/ip_local_port_range allows ({ports}); widen it"
                );
            }
        }
        Ok(set)
    }
}

/// --targets, less what --no-bridge and --no-baseline skip, in the fixed
/// order marketcast, bridge, raw.
fn parse_targets(a: &Args) -> Result<Vec<Target>> {
    let mut want = Vec::new();
    for name in &a.targets {
        let t = match name.trim().to_ascii_lowercase().as_str() {
            "marketcast" => Target::Marketcast,
            "bridge" => Target::Bridge,
            "raw" => Target::Raw,
            "" => continue,
            other => bail!("--targets: unknown target {other:?} (known: marketcast,bridge,raw)"),
        };
        want.push(t);
    }
    let out: Vec<Target> = [Target::Marketcast, Target::Bridge, Target::Raw]
        .into_iter()
        .filter(|t| want.contains(t))
        .filter(|t| !(a.no_bridge && *t == Target::Bridge))
        .filter(|t| !(a.no_baseline && *t != Target::Marketcast))
        .collect();
    if out.is_empty() {
        bail!("--targets: nothing to run");
    }
    Ok(out)
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    if args.serve_raw {
        return raw::serve_main();
    }
    let set = match Settings::from_args(&args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("marketcast-bench: {e:#}");
            return ExitCode::from(2);
        }
    };
    match run_all(set) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!(
                "marketcast-bench: marketcast lost, duplicated or reordered frames (see above)"
            );
            ExitCode::from(3)
        }
        Err(e) => {
            eprintln!("marketcast-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Start the cluster and the runtimes, run the scenarios, tear everything
/// down. Ok(false): the delivery guarantee was broken somewhere.
fn run_all(set: Settings) -> Result<bool> {
    let runtime = |name: &str, workers: usize| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name(name)
            .enable_all()
            .build()
            .with_context(|| format!("building the {name} runtime"))
    };
    let client_rt = runtime("bench-client", 2)?;
    let feed_rt = runtime("bench-feed", 1)?;

    let pg = PgDev::start()?;
    let r = feed_rt.block_on(async {
        // Cancel safety: on Ctrl-C the benchmark future is dropped: its child
        // servers are killed on drop and the cluster is stopped by PgDev's
        // Drop below.
        tokio::select! {
            r = bench(&set, &pg.url, client_rt.handle().clone(), Handle::current()) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
        }
    });
    client_rt.shutdown_timeout(Duration::from_secs(2));
    feed_rt.shutdown_timeout(Duration::from_secs(2));
    drop(pg);
    r
}

// ------------------------------------------------------------------ environment

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Marketcast,
    /// The Node peer: `bench/bridge/server.js` (`bridge.rs`).
    Bridge,
    Raw,
}

impl Target {
    /// In the report's column order.
    pub const ALL: [Target; 3] = [Target::Marketcast, Target::Bridge, Target::Raw];

    /// Its column, and its colour in the plots.
    pub fn index(self) -> usize {
        match self {
            Target::Marketcast => 0,
            Target::Bridge => 1,
            Target::Raw => 2,
        }
    }

    /// As the report names it.
    pub fn label(self) -> &'static str {
        match self {
            Target::Marketcast => "marketcast",
            Target::Bridge => "Node bridge",
            Target::Raw => "raw baseline",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Target::Marketcast => "marketcast",
            Target::Bridge => "bridge",
            Target::Raw => "raw",
        }
    }
}

/// Everything a scenario needs, set up once per invocation.
pub struct Env {
    pub set: Settings,
    pub url: String,
    pub admin: Arc<tokio_postgres::Client>,
    pub sql_feed: Arc<SqlFeed>,
    pub client_rt: Handle,
    pub feed_rt: Handle,
    marketcast_bin: PathBuf,
    /// How to start the Node peer (when it is a target).
    bridge: Option<bridge::Bridge>,
}

/// A server under test, running.
pub struct Up {
    pub server: Server,
    pub target: Target,
    raw: Option<Arc<RawControl>>,
    /// A bridge round: drops the bridge's trigger when the round ends.
    bridge_trigger: Option<Arc<tokio_postgres::Client>>,
}

impl Up {
    pub async fn stop(self) {
        drop(self.raw);
        self.server.stop().await;
        if let Some(admin) = &self.bridge_trigger {
            bridge::uninstall(admin).await;
        }
    }
}

impl Env {
    /// A fresh server process for one run.
    pub async fn start(&self, target: Target) -> Result<Up> {
        self.start_with(target, &[]).await
    }

    /// The same, with extra broadcaster options.
    pub async fn start_with(&self, target: Target, extra: &[String]) -> Result<Up> {
        let server = match target {
            Target::Marketcast => {
                let mut cmd = match self.set.server_wrapper.split_first() {
                    Some((w, args)) => {
                        let mut c = tokio::process::Command::new(w);
                        c.args(args).arg(&self.marketcast_bin);
                        c
                    }
                    None => tokio::process::Command::new(&self.marketcast_bin),
                };
                cmd.args(["broadcaster", "--listen", "127.0.0.1:0"])
                    .args(extra)
                    .env("DATABASE_URL", &self.url);
                Server::spawn(
                    "broadcaster",
                    cmd,
                    (!self.set.server_wrapper.is_empty()).then(|| self.marketcast_bin.clone()),
                )
                .await?
            }
            Target::Bridge => {
                let b = self
                    .bridge
                    .as_ref()
                    .context("the Node bridge is not a target of this run")?;
                bridge::install(&self.admin).await?;
                match Server::spawn("Node bridge", b.command(&self.url), None).await {
                    Ok(s) => s,
                    Err(e) => {
                        bridge::uninstall(&self.admin).await;
                        return Err(e);
                    }
                }
            }
            Target::Raw => {
                let me = std::env::current_exe().context("locating marketcast-bench")?;
                let mut cmd = tokio::process::Command::new(me);
                cmd.arg("--serve-raw");
                Server::spawn("raw baseline server", cmd, None).await?
            }
        };
        let bridge_trigger = (target == Target::Bridge).then(|| self.admin.clone());
        let up = Up {
            server,
            target,
            raw: None,
            bridge_trigger,
        };
        let ready = async {
            wait_healthy(up.server.addr, up.server.name).await?;
            match target {
                Target::Raw => Ok(Some(Arc::new(RawControl::connect(up.server.addr).await?))),
                Target::Marketcast | Target::Bridge => Ok::<_, anyhow::Error>(None),
            }
        };
        match ready.await {
            Ok(raw) => Ok(Up { raw, ..up }),
            Err(e) => {
                up.stop().await;
                Err(e)
            }
        }
    }

    pub async fn start_writer(&self) -> Result<Server> {
        let mut cmd = tokio::process::Command::new(&self.marketcast_bin);
        cmd.args(["writer", "--listen", "127.0.0.1:0"])
            .env("DATABASE_URL", &self.url);
        let s = Server::spawn("writer", cmd, None).await?;
        wait_healthy(s.addr, s.name).await?;
        Ok(s)
    }

    /// Create `n` markets named `{prefix}-m{i}` in the database.
    pub async fn create_markets(&self, prefix: &str, n: usize) -> Result<Vec<String>> {
        let ids: Vec<String> = (0..n).map(|i| format!("{prefix}-m{i}")).collect();
        self.admin
            .execute(
                "INSERT INTO markets (id, title) SELECT id, 'bench' FROM unnest($1::text[]) AS id",
                &[&ids],
            )
            .await
            .context("creating the bench markets")?;
        Ok(ids)
    }

    /// Create `n` markets for the server under test.
    pub async fn make_markets(&self, up: &Up, prefix: &str, n: usize) -> Result<Vec<String>> {
        match &up.raw {
            None => self.create_markets(prefix, n).await,
            Some(ctl) => {
                let ids: Vec<String> = (0..n).map(|i| format!("{prefix}-m{i}")).collect();
                ctl.add_markets(&ids).await?;
                Ok(ids)
            }
        }
    }

    pub fn sink(&self, up: &Up) -> Sink {
        match &up.raw {
            None => Sink::Sql(self.sql_feed.clone()),
            Some(ctl) => Sink::Raw(ctl.clone()),
        }
    }

    pub fn fleet_cfg(
        &self,
        up: &Up,
        meter: Arc<Meter>,
        from_seq: Option<i64>,
        target: Option<i64>,
    ) -> FleetCfg {
        FleetCfg {
            kind: self.set.client,
            addr: up.server.addr,
            meter,
            from_seq,
            target,
            query: String::new(),
            gaps: Default::default(),
        }
    }

    /// One trade now; its (seq, ts unix µs).
    pub async fn publish_one(&self, up: &Up, market: &str) -> Result<(i64, i64)> {
        match &up.raw {
            Some(ctl) => ctl
                .publish(&[market])
                .await?
                .pop()
                .ok_or_else(|| anyhow!("the raw server published nothing")),
            None => {
                let row = self
                    .admin
                    .query_one(
                        "INSERT INTO trades (market_id, side, price, qty) VALUES ($1, 'yes', 0.5, 1) \
                         RETURNING seq, (extract(epoch FROM created_at) * 1000000)::int8",
                        &[&market],
                    )
                    .await
                    .context("inserting one trade")?;
                Ok((row.try_get(0)?, row.try_get(1)?))
            }
        }
    }

    /// Unlabelled samples of the broadcaster's `/metrics` (Prometheus text),
    /// by name; NaN for any missing.
    pub async fn metrics(&self, up: &Up, names: &[&str]) -> Vec<f64> {
        let addr = up.server.addr;
        let text = match http_request(addr, get_request(addr, "/metrics")).await {
            Ok((_, body)) => String::from_utf8_lossy(&body).into_owned(),
            Err(_) => String::new(),
        };
        names
            .iter()
            .map(|n| {
                text.lines()
                    .filter_map(|l| l.split_once(' '))
                    .find(|(k, _)| k == n)
                    .and_then(|(_, v)| v.trim().parse().ok())
                    .unwrap_or(f64::NAN)
            })
            .collect()
    }
}

/// Poll `GET /healthz` until 200 (the broadcaster's LISTEN is up).
async fn wait_healthy(addr: SocketAddr, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = http_request(addr, get_request(addr, "/healthz")).await;
        match r {
            Ok((StatusCode::OK, _)) => return Ok(()),
            _ if Instant::now() > deadline => {
                bail!("the {what} on {addr} did not become healthy within 30 s: {r:?}")
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

fn get_request(addr: SocketAddr, path: &str) -> Request<Full<Bytes>> {
    let mut r = Request::new(Full::new(Bytes::new()));
    *r.uri_mut() = hyper::Uri::try_from(path).unwrap_or_default();
    if let Ok(h) = addr.to_string().parse() {
        r.headers_mut().insert(HOST, h);
    }
    r
}

/// One request on a fresh connection.
async fn http_request(addr: SocketAddr, req: Request<Full<Bytes>>) -> Result<(StatusCode, Bytes)> {
    let tcp = TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(async move {
        // Ends when the response is read and the sender dropped; errors show
        // up in send_request below.
        let _ = conn.await;
    });
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

/// How many of `n` round-robin clients follow each of `markets` markets.
pub fn per_market(n: usize, markets: usize) -> Vec<u64> {
    (0..markets)
        .map(|m| (n / markets + usize::from(m < n % markets)) as u64)
        .collect()
}

// ------------------------------------------------------------------ the run

async fn bench(
    set: &Settings,
    cluster_url: &str,
    client_rt: Handle,
    feed_rt: Handle,
) -> Result<bool> {
    // A fresh database in the cluster. The first connection is retried for a
    // while: a just-started cluster has been seen to close it once.
    let mut tries = 0;
    let admin = loop {
        match db::connect(cluster_url, "marketcast-bench").await {
            Ok(c) => break c,
            Err(e) if tries < 20 => {
                tries += 1;
                tracing::debug!(error = %format!("{e:#}"), "cluster not ready yet");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => return Err(e.context(format!("connecting to {cluster_url}"))),
        }
    };
    admin
        .batch_execute("DROP DATABASE IF EXISTS marketcast_bench")
        .await
        .context("dropping the previous bench database")?;
    admin
        .batch_execute("CREATE DATABASE marketcast_bench")
        .await
        .context("creating the bench database")?;
    let mut u = url::Url::parse(cluster_url).context("pg-dev printed a bad DATABASE_URL")?;
    u.set_path("/marketcast_bench");
    let url = u.to_string();
    db::migrate(&url, 1).await.context("migrating")?;
    let admin = Arc::new(db::connect(&url, "marketcast-bench").await?);
    let bridge = if set.targets.contains(&Target::Bridge) {
        let b = bridge::Bridge::locate()?;
        bridge::check_frame(&admin).await?;
        eprintln!("the Node bridge: {} ({})", b.script.display(), b.versions());
        Some(b)
    } else {
        None
    };
    let pg_version: String = admin
        .query_one("SHOW server_version", &[])
        .await?
        .try_get(0)?;
    let sql_feed = {
        let (url, n) = (url.clone(), set.sql_writers);
        feed_rt
            .spawn(async move { SqlFeed::connect(&url, n).await })
            .await??
    };
    let env = Env {
        set: set.clone(),
        url,
        admin,
        sql_feed: Arc::new(sql_feed),
        client_rt,
        feed_rt,
        marketcast_bin: procs::sibling("marketcast")?,
        bridge: bridge.clone(),
    };
    let load_before = report::loadavg();
    let results = scenarios(&env).await?;
    let ok = results.guarantee_held();
    let mut machine = report::machine_info(&pg_version);
    if let Some(b) = &bridge {
        machine.push(("Node bridge (bench/bridge)", b.versions()));
    }
    machine.push((
        "load average (1/5/15 min) before / after",
        format!(
            "{load_before} / {}; other work on the machine skews results",
            report::loadavg()
        ),
    ));
    if let Some(soak) = &results.soak {
        let table = report::soak_table(set, soak);
        println!("\n{table}");
        let png = set.plots.join("soak.png");
        let plot = match plot::soak(&png, "Soak: server RSS and open descriptors", &soak.samples) {
            Ok(()) => Some(relative(&set.soak_report, &png)),
            Err(e) => {
                eprintln!("marketcast-bench: soak plot: {e:#}");
                None
            }
        };
        report::write_soak_report(set, &machine, soak, plot.as_deref())?;
        println!("soak report written to {}", set.soak_report.display());
    }
    if set.s1
        || set.s2
        || set.s3
        || set.s4
        || set.s5
        || set.s6
        || set.s7
        || set.s8
        || set.s9
        || set.table
    {
        let table = results.table(set);
        let lines = results.json_lines(set);
        println!("\n{table}");
        for l in &lines {
            println!("{l}");
        }
        let plots = write_plots(set, &results);
        report::write_report(set, &machine, &table, &lines, &plots)?;
        println!("report written to {}", set.report.display());
    }
    Ok(ok)
}

/// `file` as a link from the report `from`'s directory.
fn relative(from: &std::path::Path, file: &std::path::Path) -> String {
    let dir = from.parent().unwrap_or(std::path::Path::new(""));
    file.strip_prefix(dir)
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| {
            std::fs::canonicalize(file)
                .unwrap_or_else(|_| file.to_path_buf())
                .display()
                .to_string()
        })
}

/// The PNGs of this run: (title, link from the report). Each server in its
/// own colour: its median run (by p99; S2: by the highest passing step).
fn write_plots(set: &Settings, r: &Results) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if let Err(e) = std::fs::create_dir_all(&set.plots) {
        eprintln!("marketcast-bench: creating {}: {e}", set.plots.display());
        return out;
    }
    let mut lat = |runs: &report::ByTarget<latency::LatencyRun>, file: &str, title: String| {
        let curves: Vec<(Target, Vec<(f64, f64)>)> = Target::ALL
            .iter()
            .filter_map(|&t| {
                let v = runs.get(t);
                let recs: Vec<_> = v.iter().map(|x| &x.rec).collect();
                report::median_run(&recs, |r| r.p99_ms).map(|i| (t, v[i].curve.clone()))
            })
            .collect();
        if curves.is_empty() {
            return;
        }
        let labels: Vec<String> = curves
            .iter()
            .map(|(t, _)| format!("{} (median run by p99)", t.label()))
            .collect();
        let series: Vec<plot::Curve<'_>> = curves
            .iter()
            .zip(&labels)
            .map(|((t, c), l)| (l.as_str(), t.index(), c.as_slice()))
            .collect();
        let png = set.plots.join(file);
        match plot::percentiles(&png, &title, &series) {
            Ok(()) => out.push((title, relative(&set.report, &png))),
            Err(e) => eprintln!("marketcast-bench: {file}: {e:#}"),
        }
    };
    if !r.s1.is_empty() {
        lat(
            &r.s1,
            "s1-latency.png",
            format!(
                "S1 latency distribution: {} subscribers, {} markets, {} trades/s",
                set.subscribers, MARKETS, set.rate
            ),
        );
    }
    if !r.table.is_empty() {
        lat(
            &r.table,
            "table-latency.png",
            format!(
                "Table workload latency: {} subscribers, 1 market, {} trades/s",
                set.table_subscribers, set.table_rate
            ),
        );
    }
    if !r.s2.is_empty() {
        let steps: Vec<(Target, Vec<Value>)> = Target::ALL
            .iter()
            .filter_map(|&t| {
                let v = r.s2.get(t);
                let recs: Vec<_> = v.iter().map(|x| &x.rec).collect();
                report::median_run(&recs, |r| r.best_frames_per_s).map(|i| (t, v[i].steps.clone()))
            })
            .collect();
        let labels: Vec<String> = steps
            .iter()
            .map(|(t, _)| format!("{} (median run)", t.label()))
            .collect();
        let series: Vec<(&str, usize, &[Value])> = steps
            .iter()
            .zip(&labels)
            .map(|((t, v), l)| (l.as_str(), t.index(), v.as_slice()))
            .collect();
        let png = set.plots.join("s2-ramp.png");
        let title = format!(
            "S2 ramp: {} subscribers on one market, p99 bound {} ms",
            set.s2_subscribers,
            set.s2_bound_us / 1000
        );
        match plot::ramp(&png, &title, set.s2_bound_us as f64 / 1000.0, &series) {
            Ok(()) => out.push((title, relative(&set.report, &png))),
            Err(e) => eprintln!("marketcast-bench: s2-ramp.png: {e:#}"),
        }
    }
    out
}

/// The servers of run `run` (1-based) of a scenario, in the order they go:
/// the targets rotated by one every run, so that no server always follows
/// the same one (run i of each before run i+1 of any). `all`: every target
/// every run (T and S2); otherwise the peers only in the first
/// --baseline-runs runs (S1, S3).
fn targets(set: &Settings, run: usize, all: bool) -> Vec<Target> {
    let mut v: Vec<Target> = set
        .targets
        .iter()
        .copied()
        .filter(|&t| all || t == Target::Marketcast || run <= set.baseline_runs)
        .collect();
    if !v.is_empty() {
        let k = (run - 1) % v.len();
        v.rotate_left(k);
    }
    v
}

async fn scenarios(env: &Env) -> Result<Results> {
    let set = &env.set;
    let mut r = Results {
        runs: set.runs,
        baseline_runs: set.baseline_runs.min(set.runs),
        targets: set.targets.clone(),
        ..Default::default()
    };
    let s1 = latency::LatencyParams {
        key: "s1",
        subscribers: set.subscribers,
        markets: MARKETS,
        rate: set.rate,
        duration: set.duration,
    };
    let table = latency::LatencyParams {
        key: "t",
        subscribers: set.table_subscribers,
        markets: 1,
        rate: set.table_rate,
        duration: set.table_duration,
    };
    let log = if set.s4 {
        eprintln!("S4: loading {} trades into one market", set.s4_trades);
        let l = replay::prepare(env).await?;
        eprintln!("  loaded in {:.1} s", l.load_s);
        r.s4_load_s = Some(l.load_s);
        Some(l)
    } else {
        None
    };
    for run in 1..=set.runs {
        let n = set.runs;
        if set.s1 {
            for target in targets(set, run, false) {
                eprintln!("S1 run {run}/{n} ({})", target.name());
                let x = latency::run(env, &s1, run, target).await?;
                eprintln!("  {}", rec_line(&x.rec));
                r.s1.push(target, x);
            }
        }
        if set.table {
            for target in targets(set, run, true) {
                eprintln!("T (table workload) run {run}/{n} ({})", target.name());
                let x = latency::run(env, &table, run, target).await?;
                eprintln!("  {}", rec_line(&x.rec));
                if let Some(pg) = &x.pg {
                    eprintln!("  Postgres CPU by backend: {}", pg.line());
                }
                r.table.push(target, x);
            }
        }
        if set.s2 {
            for target in targets(set, run, true) {
                eprintln!("S2 run {run}/{n} ({})", target.name());
                let x = ramp::run(env, run, target).await?;
                eprintln!("  {}", rec_line(&x.rec));
                r.s2.push(target, x);
            }
        }
        if set.s3 {
            for target in targets(set, run, false) {
                eprintln!("S3 run {run}/{n} ({})", target.name());
                let x = conns::run(env, run, target).await?;
                eprintln!("  {}", rec_line(&x));
                r.s3.push(target, x);
            }
        }
        if let Some(log) = &log {
            eprintln!("S4 run {run}/{n}");
            let x = replay::run(env, log, Target::Marketcast).await?;
            eprintln!("  {}", rec_line(&x));
            r.s4.push(x);
            if run <= set.baseline_runs && set.targets.len() > 1 {
                eprintln!("S4 run {run}/{n} (baseline: plain SQL read)");
                let x = replay::sql_read(env, log).await?;
                eprintln!("  {}", rec_line(&x));
                r.s4_sql.push(x);
            }
        }
        if set.s5 {
            eprintln!("S5 run {run}/{n}");
            let x = writes::run(env, run).await?;
            eprintln!("  {}", rec_line(&x));
            r.s5.push(x);
        }
        if set.s6 {
            eprintln!("S6 run {run}/{n}");
            let x = storm::run(env, run).await?;
            eprintln!("  {}", rec_line(&x));
            r.s6.push(x);
        }
    }
    if set.s7 {
        // At least 3 runs whatever --runs says: its figures are medians.
        let n = set.runs.max(3);
        for run in 1..=n {
            eprintln!("S7 run {run}/{n} (1.1 read side costs)");
            let x = s7::run(env, run).await?;
            eprintln!("  {}", rec_line(&x));
            r.s7.push(x);
        }
    }
    if set.s8 {
        // At least 3 runs whatever --runs says (--quick: --runs): its
        // figures are medians.
        let n = if set.quick { set.runs } else { set.runs.max(3) };
        let _client = s8::client_group()?;
        for run in 1..=n {
            for b in s8::order(set.s8_broadcasters, run) {
                eprintln!(
                    "S8 run {run}/{n}: {b} broadcaster(s), {} % of a core each",
                    set.s8_quota_pct
                );
                let x = s8::run(env, b, run).await?;
                eprintln!("  {}", rec_line(&x));
                r.s8.push(x);
            }
        }
    }
    if set.s9 {
        let n = if set.quick { set.runs } else { set.runs.max(3) };
        for run in 1..=n {
            for k in s9::order(&set.s9_listeners, run) {
                eprintln!("S9 run {run}/{n}: {k} LISTEN connection(s)");
                let x = s9::run(env, k, run).await?;
                eprintln!("  {}", rec_line(&x));
                r.s9.push(x);
            }
        }
    }
    if set.soak {
        eprintln!(
            "soak: {} connections, {} trades/s, {} s",
            set.soak_connections,
            set.soak_rate,
            set.soak_duration.as_secs()
        );
        let x = soak::run(env).await?;
        eprintln!("  {}", rec_line(&x.rec));
        r.soak = Some(x);
    }
    Ok(r)
}
