//! The subscribers: one task per WebSocket client on the client runtime. Each
//! checks that its market's seq is gapless (lost, duplicated and reordered
//! trades are counted, never tolerated), records the latency of live trades,
//! and reconnects with `from_seq` = the last seq it saw whenever its
//! connection ends (as a real client does after a 4000 slow-consumer close),
//! or at once when the fleet's storm signal fires (S6).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Result};
use serde::Deserialize;
use tokio::runtime::Handle;
use tokio::sync::{oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::hist::{unix_us, Meter};
use crate::ws::{ClientKind, Conn, Event};

/// Subscribers connecting at once (each holds a permit until `subscribed`).
const CONNECT_CONCURRENCY: usize = 64;
/// A client gives up after this many reconnects in one run.
const MAX_RECONNECTS: u64 = 50;

/// What every client of a fleet shares.
pub struct FleetCfg {
    pub kind: ClientKind,
    pub addr: SocketAddr,
    /// Live latency by the trade's `ts`; a meter whose t0 is never set records
    /// nothing (replays, whose `ts` are old, skip parsing it).
    pub meter: Arc<Meter>,
    /// Subscribe with this `from_seq` (None: live from the head).
    pub from_seq: Option<i64>,
    /// Note the instant a client's seq reaches this (S4's "caught up").
    pub target: Option<i64>,
    /// Appended to every subscribe URL, e.g. `&mode=ticker&interval_ms=1000`
    /// (S7): `ticker` frames are then checked as contiguous spans.
    pub query: String,
    /// The seqs the clients skipped over, as ranges (first, last), as they
    /// notice them (a gap that a late frame fills later is listed too;
    /// marketcast never reorders): S2 fails a step whose trades any client
    /// lost.
    pub gaps: Arc<Mutex<Vec<(i64, i64)>>>,
}

impl FleetCfg {
    fn gap(&self, first: i64, last: i64) {
        self.gaps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((first, last));
    }
}

/// The fields of a server message the clients look at.
#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(rename = "type")]
    ty: &'a str,
    seq: Option<i64>,
    #[serde(borrow)]
    ts: Option<&'a str>,
    head_seq: Option<i64>,
    /// A `ticker` frame's span.
    from_seq: Option<i64>,
    to_seq: Option<i64>,
}

/// One client's progress, readable while it runs (unix µs; 0 = not yet).
#[derive(Default)]
pub struct Probe {
    /// Highest in-order seq seen (-1 until subscribed).
    pub last: AtomicI64,
    /// When the client reached `FleetCfg::target`.
    pub reached_us: AtomicI64,
    /// After a storm: when the first trade committed after the client's new
    /// `subscribed` arrived, i.e. it is back on the live stream with
    /// everything before it delivered.
    pub live_us: AtomicI64,
}

/// One subscriber's view of its market's seq stream.
#[derive(Debug, Default)]
pub struct ClientStats {
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
    /// S6: waiting for the first trade committed after this unix µs.
    live_after_us: Option<i64>,
}

impl ClientStats {
    /// A `ticker` frame folding `from..=to`: contiguous spans only. A gap
    /// counts its seqs as lost, a span starting at or below the last seen one
    /// as duplicated.
    fn on_span(&mut self, from: i64, to: i64) {
        self.received += 1;
        if from == self.last + 1 && to >= from {
            self.last = to;
        } else if from > self.last + 1 {
            self.overflow += (from - self.last - 1) as u64;
            self.last = to.max(self.last);
        } else {
            self.duplicated += 1;
            self.last = to.max(self.last);
        }
    }

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
pub struct Fleet {
    cfg: Arc<FleetCfg>,
    /// Market index and progress per client.
    pub probes: Vec<(usize, Arc<Probe>)>,
    handles: Vec<tokio::task::JoinHandle<ClientStats>>,
    stop: CancellationToken,
    storm: watch::Sender<i64>,
}

/// The delivery checks of one run, summed over its clients.
#[derive(Debug, Default)]
pub struct Checks {
    /// Seqs skipped and never delivered.
    pub lost: u64,
    /// Trades not delivered by the end of the drain wait (late, or lost at the tail).
    pub undrained: u64,
    pub duplicated: u64,
    pub reordered: u64,
    pub reconnects: u64,
    pub parse_errors: u64,
    pub errors: u64,
    pub received: u64,
    pub first_error: Option<String>,
}

impl Fleet {
    /// Connect `n` subscribers, client i on market i % markets, and wait until
    /// every one has its `subscribed`.
    pub async fn connect(
        rt: &Handle,
        cfg: FleetCfg,
        markets: &[String],
        n: usize,
        what: &str,
    ) -> Result<Fleet> {
        let cfg = Arc::new(cfg);
        let sem = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
        let stop = CancellationToken::new();
        let (storm, storm_rx) = watch::channel(0i64);
        let mut fleet = Fleet {
            cfg: cfg.clone(),
            probes: Vec::with_capacity(n),
            handles: Vec::with_capacity(n),
            stop: stop.clone(),
            storm,
        };
        let mut readies = Vec::with_capacity(n);
        for i in 0..n {
            let mi = i % markets.len();
            let probe = Arc::new(Probe::default());
            probe.last.store(-1, Ordering::Relaxed);
            let (tx, rx) = oneshot::channel();
            fleet.handles.push(rt.spawn(client(
                cfg.clone(),
                markets[mi].clone(),
                probe.clone(),
                sem.clone(),
                tx,
                stop.clone(),
                storm_rx.clone(),
            )));
            fleet.probes.push((mi, probe));
            readies.push(rx);
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
        for (i, rx) in readies.into_iter().enumerate() {
            let r = tokio::time::timeout_at(deadline, rx).await;
            let err = match r {
                Ok(Ok(Ok(()))) => continue,
                Ok(Ok(Err(e))) => e,
                Ok(Err(_)) => "client task ended".to_string(),
                Err(_) => "timed out".to_string(),
            };
            stop.cancel();
            bail!("subscriber {i} of {n} ({what}) could not subscribe: {err}");
        }
        Ok(fleet)
    }

    /// Wait until every client has seen its market's final seq.
    pub async fn drain(&self, final_seq: &[i64], max: Duration) -> bool {
        let deadline = Instant::now() + max;
        loop {
            let done = self
                .probes
                .iter()
                .all(|(mi, p)| p.last.load(Ordering::Relaxed) >= final_seq[*mi]);
            if done {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Frames skipped over so far, over all clients, whose seq is in
    /// `after + 1 ..= upto` ([`FleetCfg::gaps`]).
    pub fn lost_in(&self, after: i64, upto: i64) -> u64 {
        self.cfg
            .gaps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|&(a, b)| (b.min(upto) - a.max(after + 1) + 1).max(0) as u64)
            .sum()
    }

    /// Every client has seen its market's final seq.
    pub fn drained(&self, final_seq: &[i64]) -> bool {
        self.probes
            .iter()
            .all(|(mi, p)| p.last.load(Ordering::Relaxed) >= final_seq[*mi])
    }

    /// The sum of every client's last seq: it stops moving when nothing
    /// more arrives.
    pub fn progress(&self) -> i64 {
        self.probes
            .iter()
            .map(|(_, p)| p.last.load(Ordering::Relaxed).max(0))
            .sum()
    }

    /// Every client drops its connection now and reconnects at once with
    /// `from_seq`. Returns the storm's unix µs.
    pub fn storm(&self) -> i64 {
        let now = unix_us(SystemTime::now());
        self.storm.send_replace(now);
        now
    }

    /// Stop the clients and sum up their checks.
    pub async fn finish(self, final_seq: &[i64]) -> Checks {
        self.stop.cancel();
        let mut c = Checks::default();
        for ((mi, _), h) in self.probes.iter().zip(self.handles) {
            match h.await {
                Ok(s) => {
                    c.lost += s.missing.len() as u64 + s.overflow;
                    c.undrained += (final_seq[*mi] - s.last).max(0) as u64;
                    c.duplicated += s.duplicated;
                    c.reordered += s.reordered;
                    c.reconnects += s.reconnects;
                    c.parse_errors += s.parse_errors;
                    c.received += s.received;
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

enum End {
    Stopped,
    Dropped(String),
    /// The storm signal: reconnect at once.
    Storm(i64),
}

/// One subscriber: connect, subscribe, check every trade, record latency,
/// reconnect with `from_seq` whenever the connection ends.
async fn client(
    cfg: Arc<FleetCfg>,
    market: String,
    probe: Arc<Probe>,
    sem: Arc<Semaphore>,
    ready: oneshot::Sender<Result<(), String>>,
    stop: CancellationToken,
    mut storm: watch::Receiver<i64>,
) -> ClientStats {
    let mut st = ClientStats {
        last: cfg.from_seq.unwrap_or(-1),
        ..Default::default()
    };
    if st.last >= 0 {
        probe.last.store(st.last, Ordering::Relaxed);
    }
    let mut ready = Some(ready);
    loop {
        let permit = match ready {
            Some(_) => sem.clone().acquire_owned().await.ok(),
            None => None,
        };
        let path = if st.last >= 0 {
            format!("/ws?market={market}&from_seq={}{}", st.last, cfg.query)
        } else {
            format!("/ws?market={market}{}", cfg.query)
        };
        let r = session(
            &cfg, &path, &probe, &mut st, &stop, &mut storm, &mut ready, permit,
        )
        .await;
        let why = match r {
            Ok(End::Stopped) => return st,
            _ if stop.is_cancelled() => return st,
            Ok(End::Storm(at)) => {
                st.live_after_us = Some(at);
                probe.live_us.store(0, Ordering::Relaxed);
                continue;
            }
            Ok(End::Dropped(why)) | Err(why) => why,
        };
        if let Some(tx) = ready.take() {
            // Err: the fleet gave up waiting; nothing to tell.
            let _ = tx.send(Err(why.clone()));
            st.error = Some(why);
            return st;
        }
        st.reconnects += 1;
        if st.reconnects > MAX_RECONNECTS {
            st.error = Some(format!(
                "gave up after {MAX_RECONNECTS} reconnects, last: {why}"
            ));
            return st;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[allow(clippy::too_many_arguments)]
async fn session(
    cfg: &FleetCfg,
    path: &str,
    probe: &Probe,
    st: &mut ClientStats,
    stop: &CancellationToken,
    storm: &mut watch::Receiver<i64>,
    ready: &mut Option<oneshot::Sender<Result<(), String>>>,
    mut permit: Option<OwnedSemaphorePermit>,
) -> Result<End, String> {
    let mut conn = tokio::select! {
        c = Conn::connect(cfg.kind, cfg.addr, path) => c?,
        _ = stop.cancelled() => return Ok(End::Stopped),
    };
    loop {
        // Cancel safety: Conn::next loses nothing when cancelled (see ws.rs);
        // cancelled() and changed() are cancel-safe.
        let ev = tokio::select! {
            ev = conn.next() => ev?,
            _ = stop.cancelled() => return Ok(End::Stopped),
            r = storm.changed() => match r {
                Ok(()) => return Ok(End::Storm(*storm.borrow_and_update())),
                // The fleet is gone: stop.
                Err(_) => return Ok(End::Stopped),
            },
        };
        let text = match ev {
            Event::Text(t) => t,
            Event::Close(why) => return Ok(End::Dropped(why)),
            Event::Eof => return Ok(End::Dropped("connection ended".into())),
        };
        let f: Frame<'_> = match serde_json::from_slice(text) {
            Ok(f) => f,
            Err(_) => {
                st.parse_errors += 1;
                continue;
            }
        };
        match f.ty {
            "trade" => {
                let Some(seq) = f.seq.filter(|_| st.last >= 0) else {
                    st.parse_errors += 1;
                    continue;
                };
                if seq > st.last + 1 {
                    cfg.gap(st.last + 1, seq - 1);
                }
                st.on_seq(seq);
                probe.last.store(st.last, Ordering::Relaxed);
                // The meter's schedule is set after the fleet connected.
                let timed = cfg.meter.t0_us.load(Ordering::Relaxed) != i64::MAX;
                if timed || st.live_after_us.is_some() {
                    let now = unix_us(SystemTime::now());
                    match f.ts.map(humantime::parse_rfc3339) {
                        Some(Ok(t)) => {
                            let ts = unix_us(t);
                            cfg.meter.record(ts, now);
                            if st.live_after_us.is_some_and(|after| ts >= after) {
                                st.live_after_us = None;
                                probe.live_us.store(now, Ordering::Relaxed);
                            }
                        }
                        _ => st.parse_errors += 1,
                    }
                }
                if cfg.target.is_some_and(|t| st.last >= t)
                    && probe.reached_us.load(Ordering::Relaxed) == 0
                {
                    probe
                        .reached_us
                        .store(unix_us(SystemTime::now()), Ordering::Relaxed);
                }
            }
            "ticker" => {
                let (Some(from), Some(to)) = (f.from_seq, f.to_seq) else {
                    st.parse_errors += 1;
                    continue;
                };
                if st.last < 0 {
                    st.parse_errors += 1;
                    continue;
                }
                if from > st.last + 1 {
                    cfg.gap(st.last + 1, from - 1);
                }
                st.on_span(from, to);
                probe.last.store(st.last, Ordering::Relaxed);
            }
            "subscribed" => {
                let Some(head) = f.head_seq else {
                    return Err(format!(
                        "subscribed without head_seq: {}",
                        String::from_utf8_lossy(text)
                    ));
                };
                if st.last < 0 {
                    st.last = head;
                    probe.last.store(head, Ordering::Relaxed);
                }
                if st.live_after_us.is_some() {
                    // Live again = the first trade committed after this.
                    st.live_after_us = Some(unix_us(SystemTime::now()));
                }
                permit.take();
                if let Some(tx) = ready.take() {
                    // Err: the fleet gave up waiting; the stop token ends us.
                    let _ = tx.send(Ok(()));
                }
            }
            "error" => return Err(format!("server error: {}", String::from_utf8_lossy(text))),
            _ => {}
        }
    }
}
