//! The servers under test run as child processes, so that their CPU, memory,
//! descriptors and threads can be read from /proc apart from the load client,
//! and so that 15,000 connections fit: each end of a loopback WebSocket holds
//! one descriptor, and the open-files limit here (20,000) is per process.
//!
//! - marketcast: the real `marketcast broadcaster` / `marketcast writer`
//!   binaries next to this one (`target/release/`);
//! - the raw baseline: this binary again with `--serve-raw` (see `raw.rs`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::pgdev::PgDev;

/// A server child process: killed when dropped, whatever happened.
pub struct Server {
    child: Child,
    pub pid: u32,
    pub addr: SocketAddr,
    pub name: &'static str,
    wrapped: Option<PathBuf>,
}

/// A binary next to this one in the target directory.
pub fn sibling(name: &str) -> Result<PathBuf> {
    let me = std::env::current_exe().context("locating marketcast-bench")?;
    let p = me.with_file_name(name);
    if !p.exists() {
        bail!(
            "{} not found: build it first (`make bench` builds the product, then the bench)",
            p.display()
        );
    }
    Ok(p)
}

impl Server {
    /// Start `cmd` and wait for its first stdout line, `listening on HOST:PORT`.
    /// `wrapped`: the role's binary when `cmd` is a profiler running it.
    pub async fn spawn(
        name: &'static str,
        mut cmd: Command,
        wrapped: Option<PathBuf>,
    ) -> Result<Server> {
        let cmd_wrapped = wrapped.is_some();
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "warn");
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting the {name}"))?;
        let pid = child
            .id()
            .ok_or_else(|| anyhow!("the {name} exited at once"))?;
        let stdout = child.stdout.take().context("child stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        // The first line of the role is `listening on ...`; a profiler
        // wrapper (--server-wrapper) may print its own lines before it.
        let read = async {
            loop {
                match lines.next_line().await {
                    Ok(Some(l)) if l.starts_with("listening on ") => return Ok(l),
                    Ok(Some(l)) if cmd_wrapped => eprintln!("  {name}: {l}"),
                    Ok(Some(l)) => bail!("the {name} printed {l:?}, not `listening on ADDR`"),
                    Ok(None) => bail!("the {name} exited before listening"),
                    Err(e) => {
                        return Err(anyhow!(e).context(format!("reading the {name}'s stdout")))
                    }
                }
            }
        };
        let first = tokio::time::timeout(Duration::from_secs(30), read)
            .await
            .map_err(|_| anyhow!("the {name} printed nothing within 30 s"))??;
        let addr: SocketAddr = first
            .strip_prefix("listening on ")
            .and_then(|a| a.trim().parse().ok())
            .ok_or_else(|| anyhow!("the {name} printed {first:?}, not `listening on ADDR`"))?;
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Server {
            child,
            pid,
            addr,
            name,
            wrapped,
        })
    }

    pub fn stats(&self) -> ProcStats {
        ProcStats::of(self.pid)
    }

    /// SIGTERM (the roles close their sockets and exit 0), SIGKILL after 10 s.
    /// Under a profiler wrapper the SIGTERM goes to the role itself (heaptrack,
    /// say, does not forward it) and the wrapper gets a minute to write its
    /// output once the role is gone.
    pub async fn stop(mut self) {
        let (pids, wait) = match &self.wrapped {
            Some(exe) => {
                let exe = std::fs::canonicalize(exe).unwrap_or_else(|_| exe.clone());
                let role: Vec<u32> = descendants(self.pid)
                    .into_iter()
                    .filter(|p| {
                        std::fs::read_link(format!("/proc/{p}/exe")).ok().as_ref() == Some(&exe)
                    })
                    .collect();
                (role, Duration::from_secs(60))
            }
            None => (vec![self.pid], Duration::from_secs(10)),
        };
        let term = std::process::Command::new("kill")
            .arg("-TERM")
            .args(pids.iter().map(u32::to_string))
            .stderr(Stdio::null())
            .status();
        if term.is_ok() {
            match tokio::time::timeout(wait, self.child.wait()).await {
                Ok(Ok(s)) if s.success() => return,
                Ok(Ok(s)) => {
                    eprintln!("  the {} exited with {s}", self.name);
                    return;
                }
                _ => eprintln!("  the {} did not stop within 10 s; killing it", self.name),
            }
        }
        // Err: it is gone already.
        let _ = self.child.kill().await;
    }
}

/// What /proc says about one process.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcStats {
    pub at: Option<Instant>,
    pub rss_kib: u64,
    /// utime + stime, in clock ticks.
    pub cpu_ticks: u64,
    pub threads: u64,
    pub fds: u64,
}

impl ProcStats {
    pub fn of(pid: u32) -> ProcStats {
        let mut s = ProcStats {
            at: Some(Instant::now()),
            ..Default::default()
        };
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            for l in status.lines() {
                let num = || {
                    l.split_whitespace()
                        .nth(1)
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0)
                };
                if l.starts_with("VmRSS:") {
                    s.rss_kib = num();
                } else if l.starts_with("Threads:") {
                    s.threads = num();
                }
            }
        }
        s.cpu_ticks = cpu_ticks(pid).unwrap_or(0);
        s.fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count() as u64)
            .unwrap_or(0);
        s
    }

    pub fn rss_mib(&self) -> f64 {
        self.rss_kib as f64 / 1024.0
    }

    /// CPU used between two samples, in % of one core.
    pub fn cpu_pct_since(&self, before: &ProcStats) -> f64 {
        cpu_pct(before.at, before.cpu_ticks, self.at, self.cpu_ticks)
    }
}

fn cpu_pct(t0: Option<Instant>, c0: u64, t1: Option<Instant>, c1: u64) -> f64 {
    match (t0, t1) {
        (Some(a), Some(b)) if b > a => {
            let secs = (b - a).as_secs_f64();
            (c1.saturating_sub(c0)) as f64 / clk_tck() / secs * 100.0
        }
        _ => f64::NAN,
    }
}

/// utime + stime of a process (fields 14 and 15 of /proc/PID/stat, counted
/// after the command name, which may hold spaces).
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14, stime 15.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn ppid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// The direct children of `pid`.
pub fn children(pid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .filter(|&p| ppid(p) == Some(pid))
                .collect()
        })
        .unwrap_or_default()
}

/// Every process below `pid` (children first found, then theirs).
fn descendants(pid: u32) -> Vec<u32> {
    let all: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .filter_map(|p| Some((p, ppid(p)?)))
                .collect()
        })
        .unwrap_or_default();
    let mut out = Vec::new();
    let mut frontier = vec![pid];
    while let Some(p) = frontier.pop() {
        for &(c, parent) in &all {
            if parent == p {
                out.push(c);
                frontier.push(c);
            }
        }
    }
    out
}

/// CPU time of all of a process's live threads in ns, from
/// /proc/PID/task/*/schedstat (its first field, the time on a CPU): finer
/// than the 10 ms ticks of /proc/PID/stat. Threads that ended are not counted.
pub fn cpu_ns(pid: u32) -> u64 {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    dir.flatten()
        .filter_map(|t| {
            let s = std::fs::read_to_string(t.path().join("schedstat")).ok()?;
            s.split_whitespace().next()?.parse::<u64>().ok()
        })
        .sum()
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on Linux if that fails).
fn clk_tck() -> f64 {
    static TCK: OnceLock<f64> = OnceLock::new();
    *TCK.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// CPU of the throwaway cluster: the postmaster and all its children
/// (backends, WAL writer, checkpointer...). Backends that end between two
/// samples are not counted; the scenarios keep theirs open.
#[derive(Debug, Clone, Default)]
pub struct PgCpu {
    at: Option<Instant>,
    ticks: u64,
}

impl PgCpu {
    pub fn sample() -> PgCpu {
        let Some(pm) = PgDev::postmaster_pid() else {
            return PgCpu::default();
        };
        let mut ticks = cpu_ticks(pm).unwrap_or(0);
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for e in dir.flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                    continue;
                };
                if ppid(pid) == Some(pm) {
                    ticks += cpu_ticks(pid).unwrap_or(0);
                }
            }
        }
        PgCpu {
            at: Some(Instant::now()),
            ticks,
        }
    }

    pub fn pct_since(&self, before: &PgCpu) -> f64 {
        cpu_pct(before.at, before.ticks, self.at, self.ticks)
    }
}

/// The ephemeral port range, for the connection-count checks.
pub fn ephemeral_ports() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut it = text.split_whitespace().map(|v| v.parse::<u64>().ok());
    let (lo, hi) = (it.next()??, it.next()??);
    Some(hi.saturating_sub(lo) + 1)
}

/// The soft RLIMIT_NOFILE, read from /proc (no libc in this crate).
pub fn open_files_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// utime + stime and cutime + cstime of a process, in clock ticks (fields
/// 14-17 of /proc/PID/stat): its own CPU, and that of its children it has
/// waited for.
fn cpu_and_children_ticks(pid: u32) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(4)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    (f.len() == 4).then(|| (f[0] + f[1], f[2] + f[3]))
}

/// One sample of the cluster's CPU by process, for the breakdown by backend
/// ([`PgBreakdown`]): every child of the postmaster by pid (schedstat, ns),
/// the postmaster itself, and what its children that already exited used
/// (its cutime + cstime: Postgres reaps every backend and worker it forks,
/// so a backend or autovacuum worker that ends inside the window is counted
/// there, in 10 ms ticks).
#[derive(Debug, Clone, Default)]
pub struct PgProcs {
    at: Option<Instant>,
    children_ns: std::collections::HashMap<u32, u64>,
    postmaster_ns: u64,
    reaped_ticks: u64,
}

impl PgProcs {
    pub fn sample() -> PgProcs {
        let Some(pm) = PgDev::postmaster_pid() else {
            return PgProcs::default();
        };
        // Reaped first: a child that exits during the scan is then counted
        // at most once (by its pid now, or in the next sample's reaped).
        let reaped_ticks = cpu_and_children_ticks(pm).map(|c| c.1).unwrap_or(0);
        let children_ns = children(pm).into_iter().map(|p| (p, cpu_ns(p))).collect();
        PgProcs {
            at: Some(Instant::now()),
            children_ns,
            postmaster_ns: cpu_ns(pm),
            reaped_ticks,
        }
    }
}

/// Where a Postgres process's CPU goes in the breakdown: by the
/// application_name its client set (src/db.rs and the callers of
/// `db::pool`/`db::connect`: the broadcaster's LISTEN connection is
/// `marketcast-listener`, its log reads `marketcast-hub`, its other pool
/// `marketcast-broadcaster`), else by backend_type.
pub const PG_PARTS: [(&str, &str); 12] = [
    (
        "bc_listen",
        "broadcaster: LISTEN connection (marketcast-listener)",
    ),
    (
        "bc_reads",
        "broadcaster: log reads per doorbell (pool marketcast-hub)",
    ),
    (
        "bc_pool",
        "broadcaster: main pool (marketcast-broadcaster: subscribe lookups, health probe, registry)",
    ),
    (
        "bc_other",
        "broadcaster: other connections (listener check, head-seq, replay)",
    ),
    (
        "bridge_listen",
        "Node bridge: LISTEN connection (marketcast-bridge-listen)",
    ),
    (
        "bridge_query",
        "Node bridge: head_seq queries (marketcast-bridge-query)",
    ),
    (
        "feed",
        "feed: the SQL connections committing trades (INSERT, triggers, NOTIFY, commit)",
    ),
    (
        "other_clients",
        "other client connections (the bench's admin connection)",
    ),
    ("walwriter", "walwriter"),
    (
        "background",
        "other background processes (checkpointer, bgwriter, autovacuum launcher, ...) and the postmaster",
    ),
    (
        "ended",
        "processes that ended in the window (autovacuum workers, short connections)",
    ),
    ("total", "whole cluster"),
];

fn pg_part(app: &str, backend_type: &str) -> &'static str {
    match app {
        "marketcast-listener" => "bc_listen",
        "marketcast-hub" => "bc_reads",
        "marketcast-broadcaster" => "bc_pool",
        "marketcast-listener-check" | "marketcast-head-seq" | "marketcast-replay" => "bc_other",
        "marketcast-bridge-listen" => "bridge_listen",
        "marketcast-bridge-query" => "bridge_query",
        "marketcast-bench-feed" => "feed",
        _ if backend_type == "client backend" => "other_clients",
        _ if backend_type == "walwriter" => "walwriter",
        _ => "background",
    }
}

/// The cluster's processes: pid -> (application_name, backend_type), from
/// pg_stat_activity (every database, background processes included).
pub async fn pg_activity(
    admin: &tokio_postgres::Client,
) -> std::collections::HashMap<u32, (String, String)> {
    let q = "SELECT pid, coalesce(application_name, ''), coalesce(backend_type, '') \
             FROM pg_stat_activity";
    match admin.query(q, &[]).await {
        Ok(rows) => rows
            .iter()
            .filter_map(|r| {
                let pid: i32 = r.try_get(0).ok()?;
                Some((pid as u32, (r.try_get(1).ok()?, r.try_get(2).ok()?)))
            })
            .collect(),
        Err(e) => {
            eprintln!("  pg_stat_activity: {e}");
            Default::default()
        }
    }
}

/// Postgres CPU over one measured window, by part ([`PG_PARTS`]), in ns.
#[derive(Debug, Clone, Default)]
pub struct PgBreakdown {
    pub secs: f64,
    /// Trades committed in the window (for µs per trade).
    pub committed: f64,
    pub ns: std::collections::BTreeMap<&'static str, u64>,
}

impl PgBreakdown {
    /// The CPU between two samples, each process's part found in `activity`
    /// (pg_stat_activity read during the window). A process that started in
    /// the window counts from its start.
    pub fn between(
        a: &PgProcs,
        b: &PgProcs,
        activity: &std::collections::HashMap<u32, (String, String)>,
        committed: f64,
    ) -> PgBreakdown {
        let secs = match (a.at, b.at) {
            (Some(x), Some(y)) if y > x => (y - x).as_secs_f64(),
            _ => f64::NAN,
        };
        let mut ns: std::collections::BTreeMap<&'static str, u64> =
            PG_PARTS.iter().map(|(k, _)| (*k, 0)).collect();
        for (pid, &end) in &b.children_ns {
            let start = a.children_ns.get(pid).copied().unwrap_or(0);
            let part = activity
                .get(pid)
                .map(|(app, ty)| pg_part(app, ty))
                .unwrap_or("background");
            *ns.entry(part).or_default() += end.saturating_sub(start);
        }
        *ns.entry("background").or_default() += b.postmaster_ns.saturating_sub(a.postmaster_ns);
        let tick_ns = 1e9 / clk_tck();
        *ns.entry("ended").or_default() +=
            (b.reaped_ticks.saturating_sub(a.reaped_ticks) as f64 * tick_ns) as u64;
        let total = ns
            .iter()
            .filter(|(k, _)| **k != "total")
            .map(|(_, v)| v)
            .sum();
        ns.insert("total", total);
        PgBreakdown {
            secs,
            committed,
            ns,
        }
    }

    /// A part's CPU in % of one core.
    pub fn pct(&self, part: &str) -> f64 {
        self.ns.get(part).copied().unwrap_or(0) as f64 / 1e9 / self.secs * 100.0
    }

    /// A part's CPU per committed trade, µs.
    pub fn us_per_trade(&self, part: &str) -> f64 {
        if self.committed > 0.0 {
            self.ns.get(part).copied().unwrap_or(0) as f64 / 1e3 / self.committed
        } else {
            f64::NAN
        }
    }

    /// The parts with any CPU, for the log: `key pct% (µs/trade)`.
    pub fn line(&self) -> String {
        PG_PARTS
            .iter()
            .filter(|(k, _)| self.ns.get(k).copied().unwrap_or(0) > 0)
            .map(|(k, _)| {
                format!(
                    "{k} {:.1}% ({:.1} µs/trade)",
                    self.pct(k),
                    self.us_per_trade(k)
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}
