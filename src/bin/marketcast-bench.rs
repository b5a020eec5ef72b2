//! `marketcast-bench`: the numbers behind `docs/BENCHMARKS.md` (`make bench`,
//! `make bench-quick`). Issue 5, scenarios S1, S2 and S5.
//!
//! One process runs everything, on three tokio runtimes so that the server
//! side and the load generator never share one scheduler:
//! - **server**: the broadcaster, the writer and the raw baseline server;
//! - **client**: the WebSocket subscribers and the S5 HTTP and SQL clients;
//! - **feed**: the trade producers (SQL INSERTs, or the baseline's synthetic
//!   trades), paced on a fixed schedule.
//!
//! Postgres is a throwaway cluster from `bin/pg-dev` in
//! `/tmp/marketcast-bench-pg`, wiped at the end whatever happened; a fresh
//! database is migrated in it.
//!
//! # What is measured
//!
//! - **S1 latency**: N subscribers over 10 markets, trades committed by plain
//!   SQL at R/s. Latency of each delivered frame = client receive time minus
//!   the trade's `ts` (set by the trigger, so it includes the commit). Every
//!   client checks gapless seq for its market: lost, duplicated and reordered
//!   frames must be 0.
//! - **S2 fan-out**: M subscribers on one market, the trade rate raised every
//!   step (50, 100, 150, 200, 300, 400, 600, ... trades/s) until p99 exceeds the
//!   bound (100 ms) or the rate is not reached; the
//!   figure is the highest delivered frames/s of a passing step. Frames not
//!   delivered by the end of a step's drain gap count as infinitely late.
//! - **Raw baseline** for S1 and S2: a minimal WebSocket fan-out with no
//!   database (hyper + fastwebsockets upgrade, each trade encoded once into a
//!   `Bytes` frame, `tokio::sync::broadcast`, one vectored write of everything
//!   queued), fed synthetic trades stamped with the current time, measured by
//!   the same clients.
//! - **S5 writes**: 32 keep-alive HTTP clients POSTing trades to the writer,
//!   beside 32 connections doing one-trade-per-transaction SQL INSERTs.
//!
//! The client receive time is taken on a loaded 2-core machine by a client
//! sharing the CPU with the server and Postgres: absolute numbers include the
//! load generator's own queueing, which is why each figure is also given as a
//! ratio to the raw baseline measured the same way.
#![forbid(unsafe_code)]

use std::collections::{BTreeSet, HashMap};
use std::convert::Infallible;
use std::io::IoSlice;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use clap::Parser;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::{broadcast, oneshot, Semaphore};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use marketcast::config::{BroadcasterConfig, DbConfig, WriterConfig};
use marketcast::trade::{control_frame, text_frame};
use marketcast::{broadcaster, db, writer};

/// The throwaway cluster's state dir (wiped at the end).
const PGDEV_DIR: &str = "/tmp/marketcast-bench-pg";
/// Where the report's hand-written notes start; kept across regenerations.
const NOTES_MARKER: &str = "<!-- notes below this line are kept when the report is regenerated -->";
/// Markets of S1 and S5.
const MARKETS: usize = 10;
/// S1 trades before the measured window (connections and caches settle).
const WARMUP: Duration = Duration::from_secs(2);
/// S2: the pause after each step in which its frames may still arrive.
const S2_GAP: Duration = Duration::from_secs(1);
/// S2: the rate ladder is S2_BASE_RATE x 1, 2, 3, 4, 6, 8, 12, 16, ... (steps
/// of x1.5 and x1.33) up to S2_MAX_RATE.
const S2_BASE_RATE: u32 = 50;
const S2_MAX_RATE: u32 = 51_200;
/// A step "reaches" its rate when at least this share of it was committed.
const RATE_REACHED: f64 = 0.9;
/// Most rows in one INSERT of the SQL feed (it batches only when behind).
const FEED_BATCH_MAX: usize = 32;
/// Subscribers connecting at once.
const CONNECT_CONCURRENCY: usize = 64;

#[derive(Parser, Debug)]
#[command(
    name = "marketcast-bench",
    about = "Benchmarks of issue 5 (S1 latency, S2 fan-out, S5 writes) against a throwaway Postgres, with a raw baseline"
)]
struct Args {
    /// Scenarios to run, comma-separated: s1, s2, s5.
    #[arg(long, value_delimiter = ',', default_value = "s1,s2,s5")]
    scenarios: Vec<String>,
    /// Seconds of measured load in S1 and per side of S5 [default: 20, --quick 5].
    #[arg(long)]
    duration: Option<u64>,
    /// S1 subscribers, spread over 10 markets [default: 1000, --quick 200].
    #[arg(long)]
    subscribers: Option<usize>,
    /// S1 trade rate over all markets, trades/s [default: 2000, --quick 500].
    #[arg(long)]
    rate: Option<u32>,
    /// S2 subscribers on its one market [default: 2000, --quick 200].
    #[arg(long)]
    s2_subscribers: Option<usize>,
    /// Seconds per S2 rate step [default: 5, --quick 2].
    #[arg(long)]
    s2_step: Option<u64>,
    /// S2 latency bound: the ramp stops at the first step whose p99 exceeds it.
    #[arg(long, default_value_t = 100)]
    s2_bound_ms: u64,
    /// S5 concurrent HTTP clients, and SQL connections beside them.
    #[arg(long, default_value_t = 32)]
    s5_clients: usize,
    /// SQL connections committing the S1/S2 trades.
    #[arg(long, default_value_t = 5)]
    sql_writers: usize,
    /// Repeat each scenario this many times and report the median of each figure
    /// (the maximum for lost/duplicated/reordered) [default: 3, --quick 1].
    #[arg(long)]
    runs: Option<usize>,
    /// Small and fast: 200 subscribers, 500 trades/s, 5 s.
    #[arg(long)]
    quick: bool,
    /// Skip the raw baseline of S1 and S2.
    #[arg(long)]
    no_baseline: bool,
    /// Markdown report to write [default: docs/BENCHMARKS.md; with --quick
    /// target/bench-quick.md, so a quick run never replaces the full results].
    #[arg(long)]
    report: Option<PathBuf>,
}

#[derive(Debug, Clone)]
struct Settings {
    s1: bool,
    s2: bool,
    s5: bool,
    duration: Duration,
    subscribers: usize,
    rate: u32,
    s2_subscribers: usize,
    s2_step: Duration,
    s2_bound_us: u64,
    s5_clients: usize,
    sql_writers: usize,
    runs: usize,
    quick: bool,
    baseline: bool,
    report: PathBuf,
}

impl Settings {
    fn from_args(a: &Args) -> Result<Settings> {
        let (mut s1, mut s2, mut s5) = (false, false, false);
        for s in &a.scenarios {
            match s.trim().to_ascii_lowercase().as_str() {
                "s1" => s1 = true,
                "s2" => s2 = true,
                "s5" => s5 = true,
                "" => {}
                other => bail!("--scenarios: unknown scenario {other:?} (known: s1, s2, s5)"),
            }
        }
        let q = a.quick;
        let set = Settings {
            s1,
            s2,
            s5,
            duration: Duration::from_secs(a.duration.unwrap_or(if q { 5 } else { 20 })),
            subscribers: a.subscribers.unwrap_or(if q { 200 } else { 1000 }),
            rate: a.rate.unwrap_or(if q { 500 } else { 2000 }),
            s2_subscribers: a.s2_subscribers.unwrap_or(if q { 200 } else { 2000 }),
            s2_step: Duration::from_secs(a.s2_step.unwrap_or(if q { 2 } else { 5 })),
            s2_bound_us: a.s2_bound_ms * 1000,
            s5_clients: a.s5_clients,
            sql_writers: a.sql_writers,
            runs: a.runs.unwrap_or(if q { 1 } else { 3 }),
            quick: q,
            baseline: !a.no_baseline,
            report: a.report.clone().unwrap_or_else(|| {
                PathBuf::from(if q {
                    "target/bench-quick.md"
                } else {
                    "docs/BENCHMARKS.md"
                })
            }),
        };
        if !(s1 || s2 || s5) {
            bail!("--scenarios: nothing to run");
        }
        if set.duration.is_zero() || set.s2_step.is_zero() {
            bail!("--duration and --s2-step must be at least 1 second");
        }
        if set.runs == 0 || set.rate == 0 || set.s5_clients == 0 || set.sql_writers == 0 {
            bail!("--runs, --rate, --s5-clients and --sql-writers must be at least 1");
        }
        if set.subscribers == 0 || set.s2_subscribers == 0 {
            bail!("--subscribers and --s2-subscribers must be at least 1");
        }
        // Both ends of every WebSocket live in this process: two descriptors each.
        let most = set.subscribers.max(set.s2_subscribers);
        if let Some(limit) = open_files_limit() {
            let need = 2 * most as u64 + 2 * set.s5_clients as u64 + 500;
            if need > limit {
                bail!(
                    "{most} subscribers need about {need} open files but the limit is {limit}; \
                     raise it (ulimit -n, at most 20000 here) or use fewer subscribers"
                );
            }
        }
        Ok(set)
    }
}

/// The soft RLIMIT_NOFILE, read from /proc (no libc in this crate).
fn open_files_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
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
    let server_rt = runtime("bench-server", 2)?;
    let client_rt = runtime("bench-client", 2)?;
    let feed_rt = runtime("bench-feed", 1)?;

    let pg = PgDev::start()?;
    let r = server_rt.block_on(async {
        // Cancel safety: on Ctrl-C the benchmark future is dropped; the cluster
        // is stopped by PgDev's Drop below either way.
        tokio::select! {
            r = bench(&set, &pg.url, client_rt.handle().clone(), feed_rt.handle().clone()) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
        }
    });
    client_rt.shutdown_timeout(Duration::from_secs(2));
    feed_rt.shutdown_timeout(Duration::from_secs(2));
    server_rt.shutdown_timeout(Duration::from_secs(2));
    drop(pg);
    r
}

// ------------------------------------------------------------------ pg-dev

/// The throwaway cluster; stopped and wiped on drop.
struct PgDev {
    script: PathBuf,
    url: String,
}

impl PgDev {
    fn start() -> Result<PgDev> {
        let local = PathBuf::from("bin/pg-dev");
        let script = if local.exists() {
            local
        } else {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("bin/pg-dev")
        };
        eprintln!("starting a throwaway Postgres in {PGDEV_DIR}");
        let out = Command::new(&script)
            .arg("start")
            .env("PGDEV_DIR", PGDEV_DIR)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {}", script.display()))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let url = stdout
            .lines()
            .last()
            .and_then(|l| l.strip_prefix("DATABASE_URL="))
            .map(str::to_string);
        match (out.status.success(), url) {
            (true, Some(url)) => Ok(PgDev { script, url }),
            _ => bail!(
                "{} start failed ({}):\n{}",
                script.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    }
}

impl Drop for PgDev {
    fn drop(&mut self) {
        let r = Command::new(&self.script)
            .args(["stop", "--wipe"])
            .env("PGDEV_DIR", PGDEV_DIR)
            .stdin(Stdio::null())
            .output();
        match r {
            Ok(o) if o.status.success() => eprintln!("stopped the throwaway Postgres"),
            Ok(o) => eprintln!(
                "marketcast-bench: pg-dev stop failed: {}",
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => eprintln!("marketcast-bench: pg-dev stop failed: {e}"),
        }
    }
}

// ------------------------------------------------------------------ histogram

/// Sub-buckets per power of two above 128 µs: about 1.6 % resolution.
const HIST_SUB: usize = 64;
/// Values are clamped below 2^40 µs (12 days), whose bucket index is < 35 * 64.
const HIST_BUCKETS: usize = 35 * HIST_SUB;

/// A log-linear histogram of microseconds, shared by all clients of a run
/// (relaxed atomics: counts are read only after the writers are done or as
/// a snapshot).
struct Hist {
    counts: Box<[AtomicU64]>,
    n: AtomicU64,
    max: AtomicU64,
}

fn bucket(v: u64) -> usize {
    let v = v.min((1 << 40) - 1);
    if v < 2 * HIST_SUB as u64 {
        return v as usize;
    }
    let msb = 63 - v.leading_zeros();
    let shift = msb - 6;
    (shift as usize + 1) * HIST_SUB + ((v >> shift) as usize - HIST_SUB)
}

/// The largest value that falls in bucket `i`.
fn bucket_high(i: usize) -> u64 {
    if i < 2 * HIST_SUB {
        return i as u64;
    }
    let shift = (i / HIST_SUB - 1) as u32;
    let sub = (i % HIST_SUB + HIST_SUB) as u64;
    ((sub + 1) << shift) - 1
}

impl Hist {
    fn new() -> Hist {
        Hist {
            counts: (0..HIST_BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            n: AtomicU64::new(0),
            max: AtomicU64::new(0),
        }
    }

    fn record(&self, us: u64) {
        self.counts[bucket(us)].fetch_add(1, Ordering::Relaxed);
        self.n.fetch_add(1, Ordering::Relaxed);
        self.max.fetch_max(us, Ordering::Relaxed);
    }

    fn count(&self) -> u64 {
        self.n.load(Ordering::Relaxed)
    }

    /// The q-quantile in µs, with `undelivered` more samples counted as
    /// infinitely late (infinity when the quantile falls among them, NaN when
    /// there is no sample at all).
    fn quantile(&self, q: f64, undelivered: u64) -> f64 {
        let n = self.count();
        let total = n + undelivered;
        if total == 0 {
            return f64::NAN;
        }
        let rank = ((q * total as f64).ceil() as u64).max(1);
        if rank > n {
            return f64::INFINITY;
        }
        let max = self.max.load(Ordering::Relaxed);
        let mut cum = 0;
        for (i, c) in self.counts.iter().enumerate() {
            cum += c.load(Ordering::Relaxed);
            if cum >= rank {
                return bucket_high(i).min(max) as f64;
            }
        }
        max as f64
    }

    fn max_us(&self) -> f64 {
        if self.count() == 0 {
            f64::NAN
        } else {
            self.max.load(Ordering::Relaxed) as f64
        }
    }
}

/// Latency histograms per phase, by the trade's `ts`: phase k holds the trades
/// stamped in `[t0 + k*period, t0 + (k+1)*period)`; earlier ones (warm-up) are
/// not recorded, later ones go to the last phase.
struct Meter {
    /// Unix µs; i64::MAX until the schedule is known (nothing is recorded).
    t0_us: AtomicI64,
    period_us: i64,
    phases: Vec<Hist>,
}

impl Meter {
    fn new(phases: usize, period: Duration) -> Meter {
        Meter {
            t0_us: AtomicI64::new(i64::MAX),
            period_us: period.as_micros() as i64,
            phases: (0..phases.max(1)).map(|_| Hist::new()).collect(),
        }
    }

    fn phase(&self, ts_us: i64) -> Option<usize> {
        let t0 = self.t0_us.load(Ordering::Relaxed);
        if ts_us < t0 {
            return None;
        }
        let k = ((ts_us - t0) / self.period_us.max(1)) as usize;
        Some(k.min(self.phases.len() - 1))
    }

    fn record(&self, ts_us: i64, now_us: i64) {
        if let Some(p) = self.phase(ts_us) {
            self.phases[p].record((now_us - ts_us).max(0) as u64);
        }
    }
}

fn unix_us(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// A monotonic instant and the wall clock at (nearly) the same moment.
fn clocks() -> (Instant, i64) {
    (Instant::now(), unix_us(SystemTime::now()))
}

// ------------------------------------------------------------------ environment

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Marketcast,
    Raw,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Marketcast => "marketcast",
            Target::Raw => "raw",
        }
    }
}

/// Everything a scenario needs, started once per invocation.
struct Env {
    set: Settings,
    url: String,
    admin: tokio_postgres::Client,
    ws: SocketAddr,
    writer: SocketAddr,
    raw: SocketAddr,
    raw_hub: Arc<RawHub>,
    sql_feed: Arc<SqlFeed>,
    client_rt: Handle,
    feed_rt: Handle,
}

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
    let admin = db::connect(&url, "marketcast-bench").await?;
    let pg_version: String = admin
        .query_one("SHOW server_version", &[])
        .await?
        .try_get(0)?;

    let stop = CancellationToken::new();
    let local: SocketAddr = ([127, 0, 0, 1], 0).into();
    let ws_l = TcpListener::bind(local).await?;
    let writer_l = TcpListener::bind(local).await?;
    let raw_l = TcpListener::bind(local).await?;
    let (ws, writer_addr, raw) = (
        ws_l.local_addr()?,
        writer_l.local_addr()?,
        raw_l.local_addr()?,
    );
    let bcfg = BroadcasterConfig::new(DbConfig::new(url.clone()));
    let wcfg = WriterConfig::new(DbConfig::new(url.clone()));
    let b_task = tokio::spawn(broadcaster::run(ws_l, bcfg, stop.clone()));
    let w_task = tokio::spawn(writer::run(writer_l, wcfg, stop.clone()));
    let raw_hub = Arc::new(RawHub::default());
    let raw_task = tokio::spawn(raw_serve(raw_l, raw_hub.clone(), stop.clone()));
    wait_healthy(ws, "broadcaster").await?;
    wait_healthy(writer_addr, "writer").await?;

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
        ws,
        writer: writer_addr,
        raw,
        raw_hub,
        sql_feed: Arc::new(sql_feed),
        client_rt,
        feed_rt,
    };
    let load_before = loadavg();
    let results = scenarios(&env).await;
    stop.cancel();
    for (name, h) in [("broadcaster", b_task), ("writer", w_task)] {
        match tokio::time::timeout(Duration::from_secs(15), h).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => eprintln!("marketcast-bench: {name} ended with an error: {e:#}"),
            Ok(Err(e)) => eprintln!("marketcast-bench: {name} panicked: {e}"),
            Err(_) => eprintln!("marketcast-bench: {name} did not stop within 15 s"),
        }
    }
    raw_task.abort(); // its sessions end with the runtime
    let results = results?;
    let ok = results.guarantee_held();
    let table = results.table(set);
    let lines = results.json_lines(set);
    println!();
    println!("{table}");
    for l in &lines {
        println!("{l}");
    }
    let mut machine = machine_info(&pg_version);
    machine.push((
        "load average (1/5/15 min) before / after",
        format!(
            "{load_before} / {}; other work on the machine skews results",
            loadavg()
        ),
    ));
    write_report(set, &machine, &table, &lines)?;
    println!("report written to {}", set.report.display());
    Ok(ok)
}

/// Poll `GET /healthz` until 200 (the broadcaster's LISTEN is up).
async fn wait_healthy(addr: SocketAddr, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = http_request(addr, get_request(addr, "/healthz")?).await;
        match r {
            Ok((StatusCode::OK, _)) => return Ok(()),
            _ if Instant::now() > deadline => {
                bail!("the {what} on {addr} did not become healthy within 30 s: {r:?}")
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Wait until the previous run's WebSocket sessions have ended on both servers.
async fn wait_idle(env: &Env) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mc = match http_request(
            env.ws,
            get_request(env.ws, "/healthz").expect("static request"),
        )
        .await
        {
            Ok((_, body)) => serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| v.get("connections").and_then(Value::as_u64))
                .unwrap_or(u64::MAX),
            Err(_) => u64::MAX,
        };
        let raw = env.raw_hub.connections.load(Ordering::Relaxed);
        if (mc == 0 && raw == 0) || Instant::now() > deadline {
            if mc != 0 || raw != 0 {
                eprintln!("  (still open: {mc} marketcast and {raw} raw sessions; going on)");
            }
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn get_request(addr: SocketAddr, path: &str) -> Result<Request<Full<Bytes>>> {
    Request::get(path)
        .header(HOST, addr.to_string())
        .body(Full::new(Bytes::new()))
        .context("building a request")
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

/// Create `n` markets named `{prefix}-m{i}` for the target.
async fn make_markets(env: &Env, target: Target, prefix: &str, n: usize) -> Result<Vec<String>> {
    let ids: Vec<String> = (0..n).map(|i| format!("{prefix}-m{i}")).collect();
    match target {
        Target::Marketcast => {
            env.admin
                .execute(
                    "INSERT INTO markets (id, title) SELECT id, 'bench' FROM unnest($1::text[]) AS id",
                    &[&ids],
                )
                .await
                .context("creating the bench markets")?;
        }
        Target::Raw => {
            for id in &ids {
                env.raw_hub.add(id);
            }
        }
    }
    Ok(ids)
}

// ------------------------------------------------------------------ trade feeds

/// One feed run: `rate` trades/s spread round-robin over `markets`, slot k due
/// at `start + k/rate`, until `end`.
#[derive(Clone)]
struct Plan {
    markets: Arc<Vec<String>>,
    rate: f64,
    start: Instant,
    end: Instant,
    meter: Arc<Meter>,
}

impl Plan {
    fn due(&self, k: u64) -> Instant {
        self.start + Duration::from_secs_f64(k as f64 / self.rate)
    }
}

/// What a feed committed, by the meter's phases (by each trade's `ts`).
#[derive(Debug, Default)]
struct FeedOut {
    /// [phase][market] trades stamped in that phase.
    by_phase: Vec<Vec<u64>>,
    /// Highest seq per market.
    final_seq: Vec<i64>,
    committed: u64,
    statements: u64,
    errors: u64,
    first_error: Option<String>,
}

impl FeedOut {
    fn new(phases: usize, markets: usize) -> FeedOut {
        FeedOut {
            by_phase: vec![vec![0; markets]; phases],
            final_seq: vec![0; markets],
            ..Default::default()
        }
    }

    fn merge(&mut self, o: FeedOut) {
        for (a, b) in self.by_phase.iter_mut().zip(o.by_phase) {
            for (x, y) in a.iter_mut().zip(b) {
                *x += y;
            }
        }
        for (a, b) in self.final_seq.iter_mut().zip(o.final_seq) {
            *a = (*a).max(b);
        }
        self.committed += o.committed;
        self.statements += o.statements;
        self.errors += o.errors;
        if self.first_error.is_none() {
            self.first_error = o.first_error;
        }
    }

    fn count(&mut self, meter: &Meter, market: usize, seq: i64, ts_us: i64) {
        self.committed += 1;
        self.final_seq[market] = self.final_seq[market].max(seq);
        if let Some(p) = meter.phase(ts_us) {
            self.by_phase[p][market] += 1;
        }
    }

    fn phase_total(&self, phase: usize) -> u64 {
        self.by_phase[phase].iter().sum()
    }
}

fn random_trade() -> (&'static str, u32, i64) {
    let side = if fastrand::bool() { "yes" } else { "no" };
    (side, fastrand::u32(100..=9900), fastrand::i64(1..=100))
}

/// Run a plan on the feed runtime.
async fn feed(env: &Env, target: Target, plan: Plan) -> Result<FeedOut> {
    let mut out = FeedOut::new(plan.meter.phases.len(), plan.markets.len());
    match target {
        Target::Marketcast => {
            let hs: Vec<_> = (0..env.sql_feed.conns.len())
                .map(|w| {
                    env.feed_rt
                        .spawn(sql_feed_conn(env.sql_feed.clone(), w, plan.clone()))
                })
                .collect();
            for h in hs {
                out.merge(h.await.context("a feed task panicked")?);
            }
        }
        Target::Raw => {
            let o = env
                .feed_rt
                .spawn(raw_feed(env.raw_hub.clone(), plan))
                .await
                .context("the raw feed panicked")??;
            out.merge(o);
        }
    }
    if let Some(e) = &out.first_error {
        eprintln!("  feed: {} trades failed, first: {e}", out.errors);
    }
    if out.committed == 0 {
        bail!(
            "the feed committed nothing: {}",
            out.first_error.as_deref().unwrap_or("?")
        );
    }
    Ok(out)
}

/// SQL connections committing trades for S1/S2, connected on the feed runtime.
struct SqlFeed {
    conns: Vec<(tokio_postgres::Client, tokio_postgres::Statement)>,
}

/// One statement for one or more trades: the rows are inserted in array order,
/// so market rows are locked in that order (sorted by id: no deadlocks).
const FEED_SQL: &str = "INSERT INTO trades (market_id, side, price, qty) \
     SELECT m, s, p::numeric, q FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[]) \
     WITH ORDINALITY AS u(m, s, p, q, o) ORDER BY o \
     RETURNING market_id, seq, (extract(epoch FROM created_at) * 1000000)::int8";

impl SqlFeed {
    async fn connect(url: &str, n: usize) -> Result<SqlFeed> {
        let mut conns = Vec::with_capacity(n);
        for _ in 0..n {
            let c = db::connect(url, "marketcast-bench-feed").await?;
            let st = c
                .prepare(FEED_SQL)
                .await
                .context("preparing the feed INSERT")?;
            conns.push((c, st));
        }
        Ok(SqlFeed { conns })
    }
}

/// Connection `w` of the SQL feed takes slots w, w+W, w+2W, ...: with 10
/// markets and 5 connections each connection owns two markets. When it falls
/// behind, every due slot goes into one INSERT (up to FEED_BATCH_MAX rows).
async fn sql_feed_conn(feed: Arc<SqlFeed>, w: usize, plan: Plan) -> FeedOut {
    let nw = feed.conns.len() as u64;
    let (client, stmt) = &feed.conns[w];
    let nm = plan.markets.len() as u64;
    let index: HashMap<&str, usize> = plan
        .markets
        .iter()
        .enumerate()
        .map(|(i, m)| (m.as_str(), i))
        .collect();
    let mut out = FeedOut::new(plan.meter.phases.len(), plan.markets.len());
    let mut k = w as u64;
    loop {
        let first = plan.due(k);
        if first >= plan.end {
            break;
        }
        tokio::time::sleep_until(first.into()).await;
        let now = Instant::now();
        let mut rows: Vec<(usize, &str, String, i64)> = Vec::new();
        while rows.len() < FEED_BATCH_MAX {
            let d = plan.due(k);
            if d > now || d >= plan.end {
                break;
            }
            let (side, ticks, qty) = random_trade();
            rows.push(((k % nm) as usize, side, format!("0.{ticks:04}"), qty));
            k += nw;
        }
        rows.sort_by(|a, b| plan.markets[a.0].cmp(&plan.markets[b.0]));
        let ms: Vec<&str> = rows.iter().map(|r| plan.markets[r.0].as_str()).collect();
        let sides: Vec<&str> = rows.iter().map(|r| r.1).collect();
        let prices: Vec<&str> = rows.iter().map(|r| r.2.as_str()).collect();
        let qtys: Vec<i64> = rows.iter().map(|r| r.3).collect();
        match client.query(stmt, &[&ms, &sides, &prices, &qtys]).await {
            Ok(rs) => {
                out.statements += 1;
                for r in rs {
                    let parsed: Result<(&str, i64, i64), _> =
                        (|| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))();
                    match parsed {
                        Ok((m, seq, ts)) => match index.get(m) {
                            Some(&i) => out.count(&plan.meter, i, seq, ts),
                            None => out.errors += 1,
                        },
                        Err(e) => {
                            let e: tokio_postgres::Error = e;
                            out.errors += 1;
                            out.first_error
                                .get_or_insert(format!("reading RETURNING: {e}"));
                        }
                    }
                }
            }
            Err(e) => {
                out.errors += rows.len() as u64;
                out.first_error
                    .get_or_insert_with(|| db::DbError::from(e).to_string());
            }
        }
    }
    out
}

/// The baseline's feed: one task publishing synthetic trades stamped now.
async fn raw_feed(hub: Arc<RawHub>, plan: Plan) -> Result<FeedOut> {
    let markets: Vec<Arc<RawMarket>> = plan
        .markets
        .iter()
        .map(|m| hub.get(m).ok_or_else(|| anyhow!("raw market {m} missing")))
        .collect::<Result<_>>()?;
    let nm = markets.len() as u64;
    let mut out = FeedOut::new(plan.meter.phases.len(), markets.len());
    let mut k = 0u64;
    loop {
        let first = plan.due(k);
        if first >= plan.end {
            break;
        }
        tokio::time::sleep_until(first.into()).await;
        let now = Instant::now();
        loop {
            let d = plan.due(k);
            if d > now || d >= plan.end {
                break;
            }
            let i = (k % nm) as usize;
            let (side, ticks, qty) = random_trade();
            let (seq, ts) = markets[i].publish(side, ticks, qty);
            out.statements += 1;
            out.count(&plan.meter, i, seq, ts);
            k += 1;
        }
    }
    Ok(out)
}

// ------------------------------------------------------------------ raw baseline server

/// The baseline's markets and its open connections.
#[derive(Default)]
struct RawHub {
    markets: RwLock<HashMap<String, Arc<RawMarket>>>,
    connections: AtomicU64,
}

struct RawMarket {
    id: String,
    /// Last seq published. Held while publishing and while subscribing, so a
    /// subscriber's head and its first live frame never overlap or leave a gap.
    seq: Mutex<i64>,
    /// Pre-encoded frames. Capacity 1024 (marketcast's live queue); a receiver
    /// that falls further behind is closed with 4000 (no history to refill from).
    tx: broadcast::Sender<Bytes>,
}

impl RawHub {
    fn add(&self, id: &str) {
        let m = Arc::new(RawMarket {
            id: id.to_string(),
            seq: Mutex::new(0),
            tx: broadcast::channel(1024).0,
        });
        self.markets
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string(), m);
    }

    fn get(&self, id: &str) -> Option<Arc<RawMarket>> {
        self.markets
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }
}

impl RawMarket {
    /// Publish one trade stamped now; returns its seq and ts (unix µs).
    fn publish(&self, side: &str, ticks: u32, qty: i64) -> (i64, i64) {
        let mut seq = self.seq.lock().unwrap_or_else(|p| p.into_inner());
        *seq += 1;
        let now = SystemTime::now();
        let json = format!(
            r#"{{"type":"trade","market":"{}","seq":{s},"trade_id":{s},"side":"{side}","price":"0.{ticks:04}","qty":{qty},"ts":"{}"}}"#,
            self.id,
            humantime::format_rfc3339_micros(now),
            s = *seq,
        );
        // An Err only means nobody is subscribed: nothing to deliver.
        let _ = self.tx.send(text_frame(json.as_bytes()));
        (*seq, unix_us(now))
    }

    fn subscribe(&self) -> (i64, broadcast::Receiver<Bytes>) {
        let seq = self.seq.lock().unwrap_or_else(|p| p.into_inner());
        (*seq, self.tx.subscribe())
    }
}

async fn raw_serve(listener: TcpListener, hub: Arc<RawHub>, stop: CancellationToken) {
    loop {
        // Cancel safety: accept() and cancelled() are cancel-safe.
        let tcp = tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    tracing::warn!(error = %e, "raw baseline: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "raw baseline: set_nodelay failed");
        }
        let (hub, stop) = (hub.clone(), stop.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let r = raw_upgrade(req, hub.clone(), stop.clone());
                async move { Ok::<_, Infallible>(r) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .with_upgrades();
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "raw baseline: http connection error");
            }
        });
    }
}

fn raw_response(status: StatusCode, msg: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(msg.as_bytes())));
    *r.status_mut() = status;
    r
}

fn raw_upgrade(
    mut req: Request<Incoming>,
    hub: Arc<RawHub>,
    stop: CancellationToken,
) -> Response<Full<Bytes>> {
    let market = url::form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
        .find(|(k, _)| k == "market")
        .and_then(|(_, v)| hub.get(&v));
    let Some(market) = market else {
        return raw_response(StatusCode::NOT_FOUND, "unknown market");
    };
    if !fastwebsockets::upgrade::is_upgrade_request(&req) {
        return raw_response(StatusCode::UPGRADE_REQUIRED, "websocket only");
    }
    let (resp, fut) = match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok(x) => x,
        Err(_) => return raw_response(StatusCode::BAD_REQUEST, "bad websocket handshake"),
    };
    tokio::spawn(async move {
        match fut.await {
            Ok(ws) => {
                hub.connections.fetch_add(1, Ordering::Relaxed);
                raw_session(ws.into_inner(), market, stop).await;
                hub.connections.fetch_sub(1, Ordering::Relaxed);
            }
            Err(e) => tracing::debug!(error = %e, "raw baseline: upgrade failed"),
        }
    });
    resp.map(|_| Full::new(Bytes::new()))
}

/// Send `subscribed`, then every live frame, all queued frames in one
/// vectored write. The client sends nothing this server needs (it answers no
/// pings because none are sent), so the read half only watches for EOF.
async fn raw_session(
    io: TokioIo<hyper::upgrade::Upgraded>,
    market: Arc<RawMarket>,
    stop: CancellationToken,
) {
    let (head, mut rx) = market.subscribe();
    let (mut rd, mut wr) = tokio::io::split(io);
    let gone = CancellationToken::new();
    let reader = tokio::spawn({
        let gone = gone.clone();
        async move {
            let mut buf = [0u8; 512];
            while let Ok(n) = rd.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
            gone.cancel();
        }
    });
    let hello = format!(
        r#"{{"type":"subscribed","market":"{}","epoch":"raw","head_seq":{head}}}"#,
        market.id
    );
    let mut batch = vec![text_frame(hello.as_bytes())];
    let mut lagged = false;
    loop {
        if !batch.is_empty() {
            let w =
                tokio::time::timeout(Duration::from_secs(10), write_all_vectored(&mut wr, &batch));
            if !matches!(w.await, Ok(Ok(()))) {
                break;
            }
            batch.clear();
        }
        if lagged {
            let close = control_frame(fastwebsockets::Frame::close(4000, b"slow consumer"));
            // Best effort: the connection ends either way.
            let _ = tokio::time::timeout(Duration::from_secs(1), wr.write_all(&close)).await;
            break;
        }
        // Cancel safety: recv() and cancelled() are cancel-safe.
        let first = tokio::select! {
            r = rx.recv() => r,
            _ = gone.cancelled() => break,
            _ = stop.cancelled() => break,
        };
        match first {
            Ok(f) => batch.push(f),
            Err(broadcast::error::RecvError::Lagged(_)) => lagged = true,
            Err(broadcast::error::RecvError::Closed) => break,
        }
        while batch.len() < 512 && !lagged {
            match rx.try_recv() {
                Ok(f) => batch.push(f),
                Err(broadcast::error::TryRecvError::Lagged(_)) => lagged = true,
                Err(_) => break,
            }
        }
    }
    reader.abort();
}

async fn write_all_vectored<W: AsyncWrite + Unpin>(
    w: &mut W,
    frames: &[Bytes],
) -> std::io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = frames.iter().map(|f| IoSlice::new(f)).collect();
    let mut bufs = &mut slices[..];
    while !bufs.is_empty() {
        let n = w.write_vectored(bufs).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut bufs, n);
    }
    Ok(())
}

// ------------------------------------------------------------------ subscribers

/// The fields of a server message the clients look at.
#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(rename = "type")]
    ty: &'a str,
    seq: Option<i64>,
    #[serde(borrow)]
    ts: Option<&'a str>,
    head_seq: Option<i64>,
}

/// One subscriber's view of its market's seq stream.
#[derive(Debug, Default)]
struct ClientStats {
    /// Highest seq seen (or the head at subscribe).
    last: i64,
    received: u64,
    duplicated: u64,
    reordered: u64,
    /// Seqs skipped over and not (yet) seen.
    missing: BTreeSet<i64>,
    /// Gaps beyond what `missing` keeps.
    overflow: u64,
    reconnects: u64,
    parse_errors: u64,
    error: Option<String>,
}

impl ClientStats {
    fn on_seq(&mut self, s: i64) {
        self.received += 1;
        if s == self.last + 1 {
            self.last = s;
        } else if s > self.last + 1 {
            for x in self.last + 1..s {
                if self.missing.len() < 100_000 {
                    self.missing.insert(x);
                } else {
                    self.overflow += 1;
                }
            }
            self.last = s;
        } else if self.missing.remove(&s) {
            self.reordered += 1;
        } else {
            self.duplicated += 1;
        }
    }
}

/// The subscribers of one run.
struct Fleet {
    /// (market index, last in-order seq) per client, for the drain wait.
    lasts: Vec<(usize, Arc<AtomicI64>)>,
    handles: Vec<tokio::task::JoinHandle<ClientStats>>,
    stop: CancellationToken,
}

/// Connect `n` subscribers, client i on market i % markets, and wait until
/// every one has its `subscribed`.
async fn connect_fleet(
    env: &Env,
    target: Target,
    markets: &[String],
    n: usize,
    meter: Arc<Meter>,
) -> Result<Fleet> {
    let addr = match target {
        Target::Marketcast => env.ws,
        Target::Raw => env.raw,
    };
    let sem = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let stop = CancellationToken::new();
    let mut fleet = Fleet {
        lasts: Vec::with_capacity(n),
        handles: Vec::with_capacity(n),
        stop: stop.clone(),
    };
    let mut readies = Vec::with_capacity(n);
    for i in 0..n {
        let mi = i % markets.len();
        let url = format!("ws://{addr}/ws?market={}", markets[mi]);
        let last = Arc::new(AtomicI64::new(-1));
        let (tx, rx) = oneshot::channel();
        fleet.handles.push(env.client_rt.spawn(client(
            url,
            meter.clone(),
            sem.clone(),
            tx,
            last.clone(),
            stop.clone(),
        )));
        fleet.lasts.push((mi, last));
        readies.push(rx);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    for (i, rx) in readies.into_iter().enumerate() {
        let r = tokio::time::timeout_at(deadline, rx).await;
        let err = match r {
            Ok(Ok(Ok(()))) => continue,
            Ok(Ok(Err(e))) => e,
            Ok(Err(_)) => "client task ended".to_string(),
            Err(_) => "timed out".to_string(),
        };
        stop.cancel();
        bail!(
            "subscriber {i} of {n} ({}) could not subscribe: {err}",
            target.name()
        );
    }
    Ok(fleet)
}

impl Fleet {
    /// Wait until every client has seen its market's final seq.
    async fn drain(&self, final_seq: &[i64], max: Duration) -> bool {
        let deadline = Instant::now() + max;
        loop {
            let done = self
                .lasts
                .iter()
                .all(|(mi, l)| l.load(Ordering::Relaxed) >= final_seq[*mi]);
            if done {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stop the clients and sum up their checks.
    async fn finish(self, final_seq: &[i64]) -> Checks {
        self.stop.cancel();
        let mut c = Checks::default();
        for ((mi, _), h) in self.lasts.iter().zip(self.handles) {
            match h.await {
                Ok(s) => {
                    c.lost += s.missing.len() as u64 + s.overflow;
                    c.undrained += (final_seq[*mi] - s.last).max(0) as u64;
                    c.duplicated += s.duplicated;
                    c.reordered += s.reordered;
                    c.reconnects += s.reconnects;
                    c.parse_errors += s.parse_errors;
                    if let Some(e) = s.error {
                        c.errors += 1;
                        c.first_error.get_or_insert(e);
                    }
                }
                Err(e) => {
                    c.errors += 1;
                    c.first_error.get_or_insert(format!("client panicked: {e}"));
                }
            }
        }
        if let Some(e) = &c.first_error {
            eprintln!("  {} client errors, first: {e}", c.errors);
        }
        c
    }
}

/// The delivery checks of one run, summed over its clients.
#[derive(Debug, Default)]
struct Checks {
    /// Seqs skipped and never delivered.
    lost: u64,
    /// Trades not delivered by the end of the drain wait (late, or lost at the tail).
    undrained: u64,
    duplicated: u64,
    reordered: u64,
    reconnects: u64,
    parse_errors: u64,
    errors: u64,
    first_error: Option<String>,
}

enum End {
    Stopped,
    Dropped(String),
}

/// One subscriber: connect, subscribe, check every trade, record latency.
/// A connection that ends early (e.g. closed 4000 as a slow consumer) is
/// re-established with `from_seq` = the last seq seen, as a real client would.
async fn client(
    url: String,
    meter: Arc<Meter>,
    sem: Arc<Semaphore>,
    ready: oneshot::Sender<Result<(), String>>,
    last_pub: Arc<AtomicI64>,
    stop: CancellationToken,
) -> ClientStats {
    let mut st = ClientStats {
        last: -1,
        ..Default::default()
    };
    let mut ready = Some(ready);
    loop {
        let (url_now, permit) = match ready {
            Some(_) => (url.clone(), sem.clone().acquire_owned().await.ok()),
            None => (format!("{url}&from_seq={}", st.last), None),
        };
        let r = session(
            &url_now, &meter, &mut st, &last_pub, &stop, &mut ready, permit,
        )
        .await;
        let why = match r {
            Ok(End::Stopped) => return st,
            _ if stop.is_cancelled() => return st,
            Ok(End::Dropped(why)) | Err(why) => why,
        };
        if let Some(tx) = ready.take() {
            // Err: the fleet gave up waiting; nothing to tell.
            let _ = tx.send(Err(why.clone()));
            st.error = Some(why);
            return st;
        }
        st.reconnects += 1;
        if st.reconnects > 50 {
            st.error = Some(format!("gave up after 50 reconnects, last: {why}"));
            return st;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn session(
    url: &str,
    meter: &Meter,
    st: &mut ClientStats,
    last_pub: &AtomicI64,
    stop: &CancellationToken,
    ready: &mut Option<oneshot::Sender<Result<(), String>>>,
    mut permit: Option<tokio::sync::OwnedSemaphorePermit>,
) -> Result<End, String> {
    // Small buffers: thousands of clients, small frames.
    let cfg = WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .write_buffer_size(0);
    let connect = tokio_tungstenite::connect_async_with_config(url, Some(cfg), true);
    let (mut ws, _) = tokio::time::timeout(Duration::from_secs(30), connect)
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| format!("connect: {e}"))?;
    loop {
        // Cancel safety: the stream's next() keeps its state in the stream,
        // cancelled() is cancel-safe.
        let msg = tokio::select! {
            m = ws.next() => m,
            _ = stop.cancelled() => return Ok(End::Stopped),
        };
        let msg = match msg {
            None => return Ok(End::Dropped("connection ended".into())),
            Some(Err(e)) => return Err(format!("read: {e}")),
            Some(Ok(m)) => m,
        };
        let text = match &msg {
            Message::Text(t) => t.as_str(),
            Message::Close(cf) => {
                return Ok(End::Dropped(match cf {
                    Some(c) => format!("closed {} {}", u16::from(c.code), c.reason),
                    None => "closed".into(),
                }))
            }
            _ => continue,
        };
        let f: Frame<'_> = match serde_json::from_str(text) {
            Ok(f) => f,
            Err(_) => {
                st.parse_errors += 1;
                continue;
            }
        };
        match f.ty {
            "trade" => {
                let now = unix_us(SystemTime::now());
                match f.ts.map(humantime::parse_rfc3339) {
                    Some(Ok(t)) => meter.record(unix_us(t), now),
                    _ => st.parse_errors += 1,
                }
                match f.seq {
                    Some(seq) if st.last >= 0 => {
                        st.on_seq(seq);
                        last_pub.store(st.last, Ordering::Relaxed);
                    }
                    _ => st.parse_errors += 1,
                }
            }
            "subscribed" => {
                let Some(head) = f.head_seq else {
                    return Err(format!("subscribed without head_seq: {text}"));
                };
                if st.last < 0 {
                    st.last = head;
                    last_pub.store(head, Ordering::Relaxed);
                }
                permit.take();
                if let Some(tx) = ready.take() {
                    // Err: the fleet gave up waiting; the stop token ends us.
                    let _ = tx.send(Ok(()));
                }
            }
            "error" => return Err(format!("server error: {text}")),
            _ => {}
        }
    }
}

// ------------------------------------------------------------------ scenarios

/// One run's figures, in report order. Non-finite values print as null.
type Rec = Vec<(&'static str, f64)>;

fn get(rec: &Rec, key: &str) -> f64 {
    rec.iter()
        .find(|(k, _)| *k == key)
        .map(|(_, v)| *v)
        .unwrap_or(f64::NAN)
}

/// Field-wise median of the runs; counts of broken guarantees and errors take
/// the maximum instead, so one bad run is never hidden.
fn aggregate(runs: &[Rec]) -> Rec {
    let Some(first) = runs.first() else {
        return Vec::new();
    };
    first
        .iter()
        .map(|(k, _)| {
            let mut xs: Vec<f64> = runs.iter().map(|r| get(r, k)).collect();
            xs.sort_by(f64::total_cmp);
            let worst = [
                "lost",
                "duplicated",
                "reordered",
                "errors",
                "undrained",
                "parse_errors",
            ];
            let v = if worst.contains(k) {
                xs[xs.len() - 1]
            } else {
                xs[xs.len() / 2]
            };
            (*k, v)
        })
        .collect()
}

struct S2Result {
    rec: Rec,
    steps: Vec<Value>,
}

#[derive(Default)]
struct Results {
    runs: usize,
    s1: Vec<Rec>,
    s1_raw: Vec<Rec>,
    s2: Vec<S2Result>,
    s2_raw: Vec<S2Result>,
    s5: Vec<Rec>,
}

async fn scenarios(env: &Env) -> Result<Results> {
    let set = &env.set;
    let mut r = Results {
        runs: set.runs,
        ..Default::default()
    };
    for run in 1..=set.runs {
        if set.s1 {
            for target in targets(set) {
                wait_idle(env).await;
                eprintln!("S1 run {run}/{} ({})", set.runs, target.name());
                let rec = s1(env, run, target).await?;
                eprintln!("  {}", rec_line(&rec));
                match target {
                    Target::Marketcast => r.s1.push(rec),
                    Target::Raw => r.s1_raw.push(rec),
                }
            }
        }
        if set.s2 {
            for target in targets(set) {
                wait_idle(env).await;
                eprintln!("S2 run {run}/{} ({})", set.runs, target.name());
                let res = s2(env, run, target).await?;
                eprintln!("  {}", rec_line(&res.rec));
                match target {
                    Target::Marketcast => r.s2.push(res),
                    Target::Raw => r.s2_raw.push(res),
                }
            }
        }
        if set.s5 {
            wait_idle(env).await;
            eprintln!("S5 run {run}/{}", set.runs);
            let rec = s5(env, run).await?;
            eprintln!("  {}", rec_line(&rec));
            r.s5.push(rec);
        }
    }
    Ok(r)
}

fn targets(set: &Settings) -> Vec<Target> {
    if set.baseline {
        vec![Target::Marketcast, Target::Raw]
    } else {
        vec![Target::Marketcast]
    }
}

fn rec_line(rec: &Rec) -> String {
    rec.iter()
        .map(|(k, v)| format!("{k}={}", num(*v)))
        .collect::<Vec<_>>()
        .join(" ")
}

fn num(v: f64) -> String {
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

/// How many of `n` round-robin clients follow each of `markets` markets.
fn per_market(n: usize, markets: usize) -> Vec<u64> {
    (0..markets)
        .map(|m| (n / markets + usize::from(m < n % markets)) as u64)
        .collect()
}

async fn s1(env: &Env, run: usize, target: Target) -> Result<Rec> {
    let set = &env.set;
    let markets = make_markets(
        env,
        target,
        &format!("s1-r{run}-{}", target.name()),
        MARKETS,
    )
    .await?;
    let d = set.duration;
    let meter = Arc::new(Meter::new(1, d + Duration::from_secs(3600)));
    let fleet = connect_fleet(env, target, &markets, set.subscribers, meter.clone()).await?;
    let lead = Duration::from_millis(500);
    let (now, now_us) = clocks();
    let start = now + lead;
    let t0 = start + WARMUP;
    meter.t0_us.store(
        now_us + (lead + WARMUP).as_micros() as i64,
        Ordering::Relaxed,
    );
    let plan = Plan {
        markets: Arc::new(markets.clone()),
        rate: set.rate as f64,
        start,
        end: t0 + d,
        meter: meter.clone(),
    };
    let out = feed(env, target, plan).await?;
    if !fleet.drain(&out.final_seq, Duration::from_secs(15)).await {
        eprintln!("  not every subscriber got the last trade within 15 s");
    }
    let checks = fleet.finish(&out.final_seq).await;
    let subs = per_market(set.subscribers, markets.len());
    let expected: u64 = out.by_phase[0].iter().zip(&subs).map(|(t, s)| t * s).sum();
    let h = &meter.phases[0];
    let delivered = h.count();
    let undelivered = expected.saturating_sub(delivered);
    let secs = d.as_secs_f64();
    Ok(vec![
        ("subscribers", set.subscribers as f64),
        ("markets", markets.len() as f64),
        ("rate", set.rate as f64),
        ("duration_s", secs),
        ("committed_per_s", out.phase_total(0) as f64 / secs),
        (
            "rows_per_insert",
            out.committed as f64 / out.statements.max(1) as f64,
        ),
        ("frames", delivered as f64),
        ("frames_per_s", delivered as f64 / secs),
        ("p50_ms", h.quantile(0.50, undelivered) / 1000.0),
        ("p99_ms", h.quantile(0.99, undelivered) / 1000.0),
        ("p999_ms", h.quantile(0.999, undelivered) / 1000.0),
        ("max_ms", h.max_us() / 1000.0),
        ("lost", checks.lost as f64),
        ("duplicated", checks.duplicated as f64),
        ("reordered", checks.reordered as f64),
        ("undrained", checks.undrained as f64),
        ("reconnects", checks.reconnects as f64),
        ("parse_errors", checks.parse_errors as f64),
        ("errors", (checks.errors + out.errors) as f64),
    ])
}

/// The S2 ladder; `coarse` (--quick) doubles every step instead.
fn s2_rates(coarse: bool) -> Vec<u32> {
    let mut rates: Vec<u32> = (0..16)
        .flat_map(|a| {
            if coarse {
                vec![1u32 << a]
            } else {
                vec![1u32 << a, 3u32 << a]
            }
        })
        .map(|f| f * S2_BASE_RATE)
        .filter(|r| *r <= S2_MAX_RATE)
        .collect();
    rates.sort_unstable();
    rates.dedup();
    rates
}

async fn s2(env: &Env, run: usize, target: Target) -> Result<S2Result> {
    let set = &env.set;
    let m = set.s2_subscribers;
    let markets = make_markets(env, target, &format!("s2-r{run}-{}", target.name()), 1).await?;
    let rates = s2_rates(set.quick);
    let period = set.s2_step + S2_GAP;
    let meter = Arc::new(Meter::new(rates.len(), period));
    let fleet = connect_fleet(env, target, &markets, m, meter.clone()).await?;
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
        };
        let out = feed(env, target, plan).await?;
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
            "  step {rate}/s: committed {achieved:.0}/s ({rows_per_insert:.1}/INSERT), {fps:.0} frames/s, p50 {} ms, p99 {} ms, undelivered {undelivered}{}",
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
    let rec = vec![
        ("subscribers", m as f64),
        ("step_s", step_s),
        ("bound_ms", set.s2_bound_us as f64 / 1000.0),
        ("best_rate", rate),
        ("best_frames_per_s", fps),
        ("best_p50_ms", p50),
        ("best_p99_ms", p99),
        ("fail_rate", fail_rate),
        ("lost", checks.lost as f64),
        ("duplicated", checks.duplicated as f64),
        ("reordered", checks.reordered as f64),
        ("undrained", checks.undrained as f64),
        ("reconnects", checks.reconnects as f64),
        ("parse_errors", checks.parse_errors as f64),
        ("errors", (checks.errors + total.errors) as f64),
    ];
    Ok(S2Result { rec, steps })
}

async fn s5(env: &Env, run: usize) -> Result<Rec> {
    let set = &env.set;
    let markets = make_markets(env, Target::Marketcast, &format!("s5-r{run}"), MARKETS).await?;
    let d = set.duration;
    let n = set.s5_clients;

    // The writer over HTTP.
    let hist = Arc::new(Hist::new());
    let start = Instant::now();
    let deadline = start + d;
    let hs: Vec<_> = (0..n)
        .map(|i| {
            let market = markets[i % markets.len()].clone();
            env.client_rt
                .spawn(s5_http_client(env.writer, market, deadline, hist.clone()))
        })
        .collect();
    let (http_ok, http_err) = join_counts(hs, "writer client").await?;
    let http_secs = start.elapsed().as_secs_f64();

    // Plain SQL, one trade per transaction.
    let sql_hist = Arc::new(Hist::new());
    let start = Instant::now();
    let deadline = start + d;
    let hs: Vec<_> = (0..n)
        .map(|i| {
            let market = markets[i % markets.len()].clone();
            env.client_rt.spawn(s5_sql_client(
                env.url.clone(),
                market,
                deadline,
                sql_hist.clone(),
            ))
        })
        .collect();
    let (sql_ok, sql_err) = join_counts(hs, "SQL client").await?;
    let sql_secs = start.elapsed().as_secs_f64();

    let http_tps = http_ok as f64 / http_secs;
    let sql_tps = sql_ok as f64 / sql_secs;
    Ok(vec![
        ("clients", n as f64),
        ("duration_s", d.as_secs_f64()),
        ("http_trades_per_s", http_tps),
        ("http_p50_ms", hist.quantile(0.5, 0) / 1000.0),
        ("http_p99_ms", hist.quantile(0.99, 0) / 1000.0),
        ("http_errors", http_err as f64),
        ("sql_trades_per_s", sql_tps),
        ("sql_p50_ms", sql_hist.quantile(0.5, 0) / 1000.0),
        ("sql_p99_ms", sql_hist.quantile(0.99, 0) / 1000.0),
        ("sql_errors", sql_err as f64),
        ("ratio", http_tps / sql_tps),
    ])
}

type ClientResult = Result<(u64, u64, Option<String>)>;

async fn join_counts(
    hs: Vec<tokio::task::JoinHandle<ClientResult>>,
    what: &str,
) -> Result<(u64, u64)> {
    let (mut ok, mut err) = (0, 0);
    let mut first = None;
    for h in hs {
        let (o, e, f) = h.await.with_context(|| format!("a {what} panicked"))??;
        ok += o;
        err += e;
        if first.is_none() {
            first = f;
        }
    }
    if let Some(f) = first {
        eprintln!("  {what}s: {err} failed requests, first: {f}");
    }
    Ok((ok, err))
}

async fn s5_http_client(
    addr: SocketAddr,
    market: String,
    deadline: Instant,
    hist: Arc<Hist>,
) -> ClientResult {
    let tcp = TcpStream::connect(addr)
        .await
        .context("connecting to the writer")?;
    tcp.set_nodelay(true)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .context("HTTP handshake with the writer")?;
    tokio::spawn(async move {
        // Ends when the sender is dropped; failures surface in send_request.
        let _ = conn.await;
    });
    let path = format!("/v1/markets/{market}/trades");
    let host = addr.to_string();
    let (mut ok, mut err, mut first) = (0, 0, None);
    while Instant::now() < deadline {
        let (side, ticks, qty) = random_trade();
        let body = format!(r#"{{"side":"{side}","price":"0.{ticks:04}","qty":{qty}}}"#);
        let req = Request::post(&path)
            .header(HOST, &host)
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))?;
        let t = Instant::now();
        sender
            .ready()
            .await
            .context("the writer connection closed")?;
        let resp = sender.send_request(req).await.context("POST trade")?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .context("reading the writer's answer")?
            .to_bytes();
        hist.record(t.elapsed().as_micros() as u64);
        if status == StatusCode::CREATED {
            ok += 1;
        } else {
            err += 1;
            first.get_or_insert_with(|| format!("{status}: {}", String::from_utf8_lossy(&body)));
        }
    }
    Ok((ok, err, first))
}

async fn s5_sql_client(
    url: String,
    market: String,
    deadline: Instant,
    hist: Arc<Hist>,
) -> ClientResult {
    let c = db::connect(&url, "marketcast-bench-s5").await?;
    let st = c
        .prepare("INSERT INTO trades (market_id, side, price, qty) VALUES ($1, $2, $3::text::numeric, $4)")
        .await
        .context("preparing the S5 INSERT")?;
    let (mut ok, mut err, mut first) = (0, 0, None);
    while Instant::now() < deadline {
        let (side, ticks, qty) = random_trade();
        let price = format!("0.{ticks:04}");
        let t = Instant::now();
        match c.execute(&st, &[&market, &side, &price, &qty]).await {
            Ok(_) => {
                hist.record(t.elapsed().as_micros() as u64);
                ok += 1;
            }
            Err(e) => {
                err += 1;
                first.get_or_insert_with(|| db::DbError::from(e).to_string());
            }
        }
    }
    Ok((ok, err, first))
}

// ------------------------------------------------------------------ output

fn json_num(v: f64) -> Value {
    if v.is_finite() {
        json!(round3(v))
    } else {
        Value::Null
    }
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
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

fn rec_json(rec: &Rec) -> Value {
    Value::Object(
        rec.iter()
            .map(|(k, v)| (k.to_string(), json_num(*v)))
            .collect::<Map<_, _>>(),
    )
}

fn ms(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else if v.is_infinite() {
        "not delivered".into()
    } else {
        format!("{v:.2}")
    }
}

fn count(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.0}")
    } else {
        "-".into()
    }
}

fn ratio(a: f64, b: f64) -> String {
    let r = a / b;
    if r.is_finite() {
        format!("{r:.2}x")
    } else {
        "-".into()
    }
}

impl Results {
    /// No marketcast run lost, duplicated or reordered a frame.
    fn guarantee_held(&self) -> bool {
        let recs = self.s1.iter().chain(self.s2.iter().map(|s| &s.rec));
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

    fn table(&self, set: &Settings) -> String {
        let mut t = String::new();
        let runs = if self.runs > 1 {
            format!("median of {} runs", self.runs)
        } else {
            "1 run".to_string()
        };
        t.push_str(&format!(
            "| scenario | figure ({runs}) | marketcast | baseline | marketcast / baseline |\n"
        ));
        t.push_str("|---|---|---:|---:|---:|\n");
        let none = Vec::new();
        if !self.s1.is_empty() {
            let mc = aggregate(&self.s1);
            let raw = aggregate(&self.s1_raw);
            let raw = if raw.is_empty() { &none } else { &raw };
            let name = format!(
                "S1: {} subs, {} markets, {} trades/s, {} s",
                set.subscribers,
                MARKETS,
                set.rate,
                set.duration.as_secs()
            );
            for (label, key) in [
                ("latency p50 (ms)", "p50_ms"),
                ("latency p99 (ms)", "p99_ms"),
                ("latency p99.9 (ms)", "p999_ms"),
                ("latency max (ms)", "max_ms"),
            ] {
                let (a, b) = (get(&mc, key), get(raw, key));
                t.push_str(&format!(
                    "| {name} | {label} | {} | {} | {} |\n",
                    ms(a),
                    ms(b),
                    ratio(a, b)
                ));
            }
            let (a, b) = (get(&mc, "frames_per_s"), get(raw, "frames_per_s"));
            t.push_str(&format!(
                "| {name} | delivered frames/s | {} | {} | {} |\n",
                count(a),
                count(b),
                ratio(a, b)
            ));
            let (a, b) = (get(&mc, "committed_per_s"), get(raw, "committed_per_s"));
            t.push_str(&format!(
                "| {name} | trades committed/s | {} | {} | {} |\n",
                count(a),
                count(b),
                ratio(a, b)
            ));
            let lrd = |r: &Rec| {
                if r.is_empty() {
                    "-".to_string()
                } else {
                    format!(
                        "{} / {} / {}",
                        count(get(r, "lost")),
                        count(get(r, "duplicated")),
                        count(get(r, "reordered"))
                    )
                }
            };
            t.push_str(&format!(
                "| {name} | lost / duplicated / reordered | {} | {} | |\n",
                lrd(&mc),
                lrd(raw)
            ));
            t.push_str(&format!(
                "| {name} | reconnects (slow-consumer closes) | {} | {} | |\n",
                count(get(&mc, "reconnects")),
                count(get(raw, "reconnects"))
            ));
        }
        if !self.s2.is_empty() {
            let mc = aggregate(&self.s2.iter().map(|s| s.rec.clone()).collect::<Vec<_>>());
            let raw = aggregate(
                &self
                    .s2_raw
                    .iter()
                    .map(|s| s.rec.clone())
                    .collect::<Vec<_>>(),
            );
            let raw = if raw.is_empty() { &none } else { &raw };
            let name = format!(
                "S2: {} subs, 1 market, p99 <= {} ms",
                set.s2_subscribers,
                set.s2_bound_us / 1000
            );
            let (a, b) = (get(&mc, "best_frames_per_s"), get(raw, "best_frames_per_s"));
            t.push_str(&format!(
                "| {name} | highest delivered frames/s | {} | {} | {} |\n",
                count(a),
                count(b),
                ratio(a, b)
            ));
            let (a, b) = (get(&mc, "best_rate"), get(raw, "best_rate"));
            t.push_str(&format!(
                "| {name} | at trades/s | {} | {} | {} |\n",
                count(a),
                count(b),
                ratio(a, b)
            ));
            let (a, b) = (get(&mc, "best_p99_ms"), get(raw, "best_p99_ms"));
            t.push_str(&format!(
                "| {name} | p99 at that step (ms) | {} | {} | {} |\n",
                ms(a),
                ms(b),
                ratio(a, b)
            ));
            let (a, b) = (get(&mc, "fail_rate"), get(raw, "fail_rate"));
            t.push_str(&format!(
                "| {name} | first failing step (trades/s) | {} | {} | |\n",
                count(a),
                count(b)
            ));
        }
        if !self.s5.is_empty() {
            let r = aggregate(&self.s5);
            let name = format!(
                "S5: {} clients, {} s (baseline: plain SQL, 1 trade/tx)",
                set.s5_clients,
                set.duration.as_secs()
            );
            let (a, b) = (get(&r, "http_trades_per_s"), get(&r, "sql_trades_per_s"));
            t.push_str(&format!(
                "| {name} | trades/s (writer HTTP vs SQL) | {} | {} | {} |\n",
                count(a),
                count(b),
                ratio(a, b)
            ));
            let (a, b) = (get(&r, "http_p99_ms"), get(&r, "sql_p99_ms"));
            t.push_str(&format!(
                "| {name} | p99 request latency (ms) | {} | {} | {} |\n",
                ms(a),
                ms(b),
                ratio(a, b)
            ));
        }
        t
    }

    fn json_lines(&self, set: &Settings) -> Vec<String> {
        let mut out = Vec::new();
        let ratios = |mc: &Rec, raw: &Rec, keys: &[&str]| -> Value {
            Value::Object(
                keys.iter()
                    .map(|k| (k.to_string(), json_num(get(mc, k) / get(raw, k))))
                    .collect(),
            )
        };
        if !self.s1.is_empty() {
            let mc = aggregate(&self.s1);
            let raw = aggregate(&self.s1_raw);
            let mut v = json!({
                "runs": self.runs,
                "marketcast": rec_json(&mc),
            });
            if !raw.is_empty() {
                v["baseline"] = rec_json(&raw);
                v["ratio"] = ratios(
                    &mc,
                    &raw,
                    &["p50_ms", "p99_ms", "p999_ms", "max_ms", "frames_per_s"],
                );
            }
            out.push(json_line("S1", v));
        }
        if !self.s2.is_empty() {
            let mc = aggregate(&self.s2.iter().map(|s| s.rec.clone()).collect::<Vec<_>>());
            let raw = aggregate(
                &self
                    .s2_raw
                    .iter()
                    .map(|s| s.rec.clone())
                    .collect::<Vec<_>>(),
            );
            let mut v = json!({
                "runs": self.runs,
                "marketcast": rec_json(&mc),
                "marketcast_steps_last_run": self.s2.last().map(|s| s.steps.clone()),
            });
            if !raw.is_empty() {
                v["baseline"] = rec_json(&raw);
                v["baseline_steps_last_run"] = json!(self.s2_raw.last().map(|s| s.steps.clone()));
                v["ratio"] = ratios(
                    &mc,
                    &raw,
                    &["best_frames_per_s", "best_rate", "best_p99_ms"],
                );
            }
            out.push(json_line("S2", v));
        }
        if !self.s5.is_empty() {
            let r = aggregate(&self.s5);
            let v = json!({
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
            });
            out.push(json_line("S5", v));
        }
        out
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn machine_info(pg_version: &str) -> Vec<(&'static str, String)> {
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

fn write_report(
    set: &Settings,
    machine: &[(&str, String)],
    table: &str,
    lines: &[String],
) -> Result<()> {
    let path = &set.report;
    let kept = std::fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            s.split_once(NOTES_MARKER)
                .map(|(_, notes)| notes.to_string())
        })
        .unwrap_or_else(|| "\n\n_(no notes yet)_\n".to_string());
    let args: Vec<String> = std::env::args().skip(1).collect();
    let command = if args.is_empty() {
        "./target/release/marketcast-bench".to_string()
    } else {
        format!("./target/release/marketcast-bench {}", args.join(" "))
    };
    let mut s = String::new();
    s.push_str("# Benchmarks\n\n");
    s.push_str(
        "Generated by `marketcast-bench` (`make bench`; `make bench-quick` for a small run). \
         Everything above the notes marker is rewritten on every run.\n\n",
    );
    s.push_str(
        "**Quote medians of 3 runs** (`make bench` runs every scenario 3 times, \
         `--runs N` changes it); a single run on this shared 2-core machine moves \
         by tens of percent, and a factor of 2 or more when other work runs beside it.\n\n",
    );
    s.push_str("## Machine\n\n");
    for (k, v) in machine {
        s.push_str(&format!("- {k}: {v}\n"));
    }
    s.push_str(&format!("\n## Command\n\n```\n{command}\n```\n\n"));
    s.push_str(&format!(
        "Runs per scenario: {} (figures are medians; lost/duplicated/reordered are the worst run).\n\n",
        set.runs
    ));
    s.push_str("## Results\n\n");
    s.push_str(table);
    s.push_str("\nOne JSON record per scenario:\n\n```\n");
    for l in lines {
        s.push_str(l);
        s.push('\n');
    }
    s.push_str("```\n\n");
    s.push_str(METHOD);
    s.push('\n');
    s.push_str(NOTES_MARKER);
    s.push_str(&kept);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, s).with_context(|| format!("writing {}", path.display()))
}

const METHOD: &str = "## Method

- One process: the broadcaster, the writer and the raw baseline server on one
  tokio runtime (2 workers), the subscribers and S5 clients on another (2
  workers), the trade feed on a third (1 worker); Postgres from `bin/pg-dev`
  on the same machine. Server, load generator and database share the 2 CPUs,
  so absolute figures are pessimistic; the ratio to the baseline, measured
  the same way, is the figure to compare across changes.
- Latency = client receive time - the trade's `ts`, both from this machine's
  clock. For marketcast `ts` is stamped by the INSERT trigger, before the
  commit, so it includes the commit (fsync=on), NOTIFY, the hub's log read
  and the fan-out; for the baseline it is stamped when the synthetic trade is
  published. Histogram resolution about 1.6 %.
- S1: subscribers round-robin over 10 markets, each subscribed with
  `?market=` (live from the head). Trades committed by 5 SQL connections
  (each owns 2 markets), one trade per INSERT unless a connection falls
  behind its schedule, then up to 32 rows per INSERT. 2 s warm-up not
  measured. Each client checks seq is gapless per market: lost, duplicated
  and reordered must be 0. `undrained`: trades a client had not received 15 s
  after the feed stopped.
- S2: one market, the rate raised every step (50, 100, 150, 200, 300, 400,
  600, ... trades/s, 5 s each, 1 s gap between steps); a step passes
  when at least 90 % of its rate was committed and p99 (counting frames not
  delivered within the 1 s gap after the step as infinitely late) is within
  the bound. The figure is the passing step with the highest rate.
- Raw baseline: hyper + fastwebsockets upgrade, no database; each trade is
  encoded once into a `Bytes` frame, published on a `tokio::sync::broadcast`
  (capacity 1024), each connection writes everything queued with one
  vectored write; a receiver that lags is closed with 4000 (the baseline
  has no history to refill from).
- S5: keep-alive HTTP/1.1 clients POSTing one trade each to the writer (which
  batches concurrent requests into one transaction) vs the same number of SQL
  connections doing one INSERT per transaction (every notifying commit takes
  Postgres's NOTIFY lock through its WAL flush).
";
