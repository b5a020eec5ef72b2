//! The fault suite (issue 6): while a load of trades flows to many
//! subscribers, break something, and prove afterwards that every client got
//! exactly the trades it was owed: from its start to the final committed head
//! of each of its markets, in order, no gap, no duplicate.
//!
//! One harness, [`Rig`], serves every case:
//! - the broadcaster is a real child process (`marketcast broadcaster`, port
//!   0, address from its `listening on` line), so it can be killed with
//!   SIGKILL and its `/metrics` and log lines are its own;
//! - trades come from plain SQL (multi-market transactions) and from the
//!   writer's HTTP API (in process), a few hundred per second over six
//!   markets; both keep trying through outages, as real producers would;
//! - thirty WebSocket clients (tokio-tungstenite) follow two markets each,
//!   some from seq 0, some from the middle of the log, some live from the
//!   head. Whenever a connection ends, a client reconnects and resubscribes
//!   with `from_seq` = the last seq it saw, as `marketcast subscribe` does,
//!   and it records every seq it receives;
//! - [`Rig::finish`] stops the load, reads each market's head from the
//!   database and waits until every client has reached it, then checks every
//!   recorded sequence exactly, and checks the writer's answers against the
//!   log (every 2xx trade is there once, no 503'd one is).
//!
//! Cases that stop or restart Postgres use a cluster of their own
//! ([`OwnCluster`]). Every wait polls for an event with a deadline; nothing
//! asserts a duration. docs/RELIABILITY.md describes what each case shows.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::support::*;

/// Bound on any one wait for an event in this suite (generous: the box is
/// shared, and a wait that succeeds returns as soon as the event happens).
const DEADLINE: Duration = Duration::from_secs(60);

/// Poll `f` every 50 ms until it returns Some, or panic after [`DEADLINE`].
async fn until<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let give_up = Instant::now() + DEADLINE;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < give_up, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ------------------------------------------------------------ the broadcaster

/// `marketcast broadcaster` as a child process (its metrics are its own,
/// not the test process's shared recorder; `isolation` uses it too).
pub(crate) struct ChildBroadcaster {
    child: tokio::process::Child,
    pub(crate) addr: SocketAddr,
    /// Its stderr (the log), line by line, read continuously so it never blocks.
    logs: Arc<Mutex<Vec<String>>>,
}

impl ChildBroadcaster {
    /// Start one and wait until it is healthy (database reachable, LISTEN up).
    pub(crate) async fn start(db_url: &str, args: &[String]) -> ChildBroadcaster {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_marketcast"))
            .arg("broadcaster")
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .env("DATABASE_URL", db_url)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn marketcast broadcaster");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let mut err = BufReader::new(child.stderr.take().unwrap()).lines();
        let sink = logs.clone();
        tokio::spawn(async move {
            while let Ok(Some(l)) = err.next_line().await {
                sink.lock().unwrap().push(l);
            }
        });
        // The contract's first stdout line: `listening on HOST:PORT`.
        let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = tokio::time::timeout(DEADLINE, out.next_line())
            .await
            .expect("the broadcaster prints its address in time")
            .unwrap();
        let Some(first) = first else {
            let st = child.wait().await;
            tokio::time::sleep(Duration::from_millis(100)).await; // let the log reader drain
            panic!(
                "the broadcaster exited ({st:?}) without an address:\n{}",
                logs.lock().unwrap().join("\n")
            );
        };
        let addr: SocketAddr = first
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
            .parse()
            .unwrap();
        tokio::spawn(async move { while let Ok(Some(_)) = out.next_line().await {} });
        let b = ChildBroadcaster { child, addr, logs };
        until("the broadcaster to become healthy", || b.health(200)).await;
        b
    }

    pub(crate) fn ws(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// Some(()) when /healthz answers `status`.
    async fn health(&self, status: u16) -> Option<()> {
        let url = format!("http://{}/healthz", self.addr);
        match try_http("GET", &url, &[], None).await {
            Ok((s, _)) if s == status => Some(()),
            _ => None,
        }
    }

    /// A metric's value, summed over its label sets; None if not exported yet.
    pub(crate) async fn metric(&self, name: &str) -> Option<f64> {
        let (_, body) = http_raw("GET", &format!("http://{}/metrics", self.addr), &[], None)
            .await
            .ok()?;
        let text = String::from_utf8_lossy(&body);
        let mut found = None;
        for l in text.lines() {
            let Some(rest) = l.strip_prefix(name) else {
                continue;
            };
            if rest.starts_with(' ') || rest.starts_with('{') {
                let v: f64 = rest.rsplit(' ').next()?.parse().ok()?;
                found = Some(found.unwrap_or(0.0) + v);
            }
        }
        found
    }

    fn logged(&self, needle: &str) -> bool {
        self.logs.lock().unwrap().iter().any(|l| l.contains(needle))
    }

    /// SIGTERM: the graceful shutdown; waits for the exit and asserts it is clean.
    pub(crate) async fn sigterm(mut self) {
        let pid = self.child.id().expect("still running").to_string();
        let st = tokio::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await
            .unwrap();
        assert!(st.success());
        let st = tokio::time::timeout(DEADLINE, self.child.wait())
            .await
            .expect("exits in time")
            .unwrap();
        assert!(st.success(), "a SIGTERM exits 0: {st:?}");
    }

    /// SIGKILL: no shutdown, no close frames, sockets reset by the kernel.
    pub(crate) async fn kill9(mut self) {
        self.child.start_kill().unwrap();
        let st = self.child.wait().await.unwrap();
        assert!(!st.success(), "killed, not exited: {st:?}");
    }
}

// ------------------------------------------------------------ the clients

/// A subscriber: the markets it follows and where it starts in each.
#[derive(Clone)]
struct ClientSpec {
    name: String,
    /// (market, from_seq); None: live from the head at the first subscribe.
    markets: Vec<(String, Option<i64>)>,
    /// A 4 KiB receive buffer, so that not reading fills the pipe quickly.
    small_rcvbuf: bool,
}

/// What one client received for one market.
#[derive(Debug, Default)]
struct Track {
    market: String,
    /// The first seq it is owed: from_seq + 1, or head_seq + 1 from its first `subscribed`.
    start: Option<i64>,
    /// The last seq seen (or from_seq / head_seq before any): the next from_seq.
    last: Option<i64>,
    seqs: Vec<i64>,
}

#[derive(Debug)]
struct ClientReport {
    name: String,
    tracks: Vec<Track>,
    /// WebSocket connections established (1 = never had to reconnect).
    connects: usize,
    /// How each connection ended: the close code, None if it just dropped.
    closes: Vec<Option<u16>>,
    /// `unavailable` answers to a subscribe (retried after 250 ms).
    unavailable: usize,
    /// Anything the protocol did not allow.
    violations: Vec<String>,
    /// It stopped at the deadline instead of reaching every head.
    gave_up: bool,
}

struct ClientHandle {
    name: String,
    pause: watch::Sender<bool>,
    task: JoinHandle<ClientReport>,
}

/// Set once the load has stopped: each market's final head, and when to give up.
type Targets = Option<(HashMap<String, i64>, Instant)>;

#[derive(Deserialize)]
struct Msg {
    #[serde(rename = "type")]
    ty: String,
    market: Option<String>,
    seq: Option<i64>,
    head_seq: Option<i64>,
    code: Option<String>,
    id: Option<usize>,
}

enum Ended {
    Done,
    GaveUp,
    Closed(Option<u16>),
}

async fn run_client(
    spec: ClientSpec,
    url: watch::Receiver<String>,
    mut targets: watch::Receiver<Targets>,
    mut pause: watch::Receiver<bool>,
    ready: mpsc::UnboundedSender<String>,
) -> ClientReport {
    let mut rep = ClientReport {
        name: spec.name.clone(),
        tracks: spec
            .markets
            .iter()
            .map(|(m, from)| Track {
                market: m.clone(),
                start: from.map(|f| f + 1),
                last: *from,
                seqs: Vec::new(),
            })
            .collect(),
        connects: 0,
        closes: Vec::new(),
        unavailable: 0,
        violations: Vec::new(),
        gave_up: false,
    };
    let mut ready = Some(ready);
    loop {
        if done(&rep.tracks, &targets.borrow()) {
            return rep;
        }
        if let Some((_, give_up)) = &*targets.borrow() {
            if Instant::now() >= *give_up {
                rep.gave_up = true;
                return rep;
            }
        }
        let u = url.borrow().clone();
        let Ok(mut ws) = open(&u, spec.small_rcvbuf).await else {
            // Refused (no broadcaster right now) or too slow: a real client backs off.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        rep.connects += 1;
        match session(&mut ws, &mut rep, &mut targets, &mut pause, &mut ready).await {
            Ended::Done => {
                let _ = ws.close(None).await;
                return rep;
            }
            Ended::GaveUp => {
                rep.gave_up = true;
                return rep;
            }
            Ended::Closed(code) => {
                rep.closes.push(code);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn open(url: &str, small_rcvbuf: bool) -> anyhow::Result<Ws> {
    let u = url::Url::parse(url)?;
    let addr: SocketAddr = format!("{}:{}", u.host_str().unwrap(), u.port().unwrap()).parse()?;
    let sock = tokio::net::TcpSocket::new_v4()?;
    if small_rcvbuf {
        // Before connect, so the advertised window stays small.
        sock.set_recv_buffer_size(4096)?;
    }
    let ws = tokio::time::timeout(Duration::from_secs(5), async {
        let tcp = sock.connect(addr).await?;
        let (ws, _) =
            tokio_tungstenite::client_async(url, tokio_tungstenite::MaybeTlsStream::Plain(tcp))
                .await?;
        anyhow::Ok(ws)
    })
    .await??;
    Ok(ws)
}

fn done(tracks: &[Track], targets: &Targets) -> bool {
    let Some((heads, _)) = targets else {
        return false;
    };
    tracks
        .iter()
        .all(|t| t.last.is_some_and(|l| l >= heads[&t.market]))
}

async fn subscribe_op(ws: &mut Ws, i: usize, t: &Track) -> bool {
    let mut op = json!({"op": "subscribe", "market": t.market, "id": i});
    if let Some(f) = t.last {
        op["from_seq"] = f.into();
    }
    ws.send(Message::Text(op.to_string().into())).await.is_ok()
}

/// One connection: subscribe to everything (resuming after `last`), then
/// record trades until the connection ends or every head is reached.
async fn session(
    ws: &mut Ws,
    rep: &mut ClientReport,
    targets: &mut watch::Receiver<Targets>,
    pause: &mut watch::Receiver<bool>,
    ready: &mut Option<mpsc::UnboundedSender<String>>,
) -> Ended {
    for i in 0..rep.tracks.len() {
        if !subscribe_op(ws, i, &rep.tracks[i]).await {
            return Ended::Closed(None);
        }
    }
    let mut pending: HashSet<usize> = (0..rep.tracks.len()).collect();
    let mut retry: Vec<usize> = Vec::new();
    let mut retry_at: Option<Instant> = None;
    loop {
        if *pause.borrow() {
            // Not reading at all: the socket buffers fill, the server's write stalls.
            let _ = pause.wait_for(|p| !*p).await;
        }
        let give_up = targets.borrow().as_ref().map(|(_, g)| *g);
        tokio::select! {
            m = ws.next() => match m {
                Some(Ok(Message::Text(t))) => {
                    let Ok(msg) = serde_json::from_str::<Msg>(&t) else {
                        rep.violations.push(format!("not a server message: {t}"));
                        continue;
                    };
                    match msg.ty.as_str() {
                        "trade" => {
                            let (Some(m), Some(seq)) = (msg.market, msg.seq) else {
                                rep.violations.push(format!("trade without market or seq: {t}"));
                                continue;
                            };
                            match rep.tracks.iter_mut().find(|x| x.market == m) {
                                Some(tr) if tr.start.is_some() => {
                                    tr.seqs.push(seq);
                                    tr.last = Some(seq);
                                }
                                _ => rep.violations.push(format!("trade of a market not subscribed: {t}")),
                            }
                        }
                        "subscribed" => {
                            let Some(i) = msg.id.filter(|i| *i < rep.tracks.len()) else {
                                rep.violations.push(format!("subscribed with a foreign id: {t}"));
                                continue;
                            };
                            let tr = &mut rep.tracks[i];
                            if tr.start.is_none() {
                                let Some(h) = msg.head_seq else {
                                    rep.violations.push(format!("subscribed without head_seq: {t}"));
                                    continue;
                                };
                                tr.start = Some(h + 1);
                                tr.last = Some(h);
                            }
                            pending.remove(&i);
                            if pending.is_empty() {
                                if let Some(r) = ready.take() {
                                    let _ = r.send(rep.name.clone());
                                }
                            }
                        }
                        "error" if msg.code.as_deref() == Some("unavailable") => {
                            // Postgres is down: the connection stays, ask again shortly.
                            rep.unavailable += 1;
                            if let Some(i) = msg.id.filter(|i| *i < rep.tracks.len()) {
                                retry.push(i);
                                retry_at.get_or_insert(Instant::now() + Duration::from_millis(250));
                            }
                        }
                        _ => rep.violations.push(format!("unexpected message: {t}")),
                    }
                }
                Some(Ok(Message::Close(c))) => return Ended::Closed(c.map(|c| u16::from(c.code))),
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return Ended::Closed(None),
            },
            _ = tokio::time::sleep_until(retry_at.unwrap_or_else(Instant::now)), if retry_at.is_some() => {
                retry_at = None;
                for i in std::mem::take(&mut retry) {
                    if !subscribe_op(ws, i, &rep.tracks[i]).await {
                        return Ended::Closed(None);
                    }
                }
            }
            _ = tokio::time::sleep_until(give_up.unwrap_or_else(Instant::now)), if give_up.is_some() => {
                return Ended::GaveUp;
            }
            _ = targets.changed() => {}
            _ = pause.changed() => {}
        }
        if done(&rep.tracks, &targets.borrow()) {
            return Ended::Done;
        }
    }
}

/// Exactly `start..=head`, or a description of what is wrong.
fn verify(client: &str, t: &Track, head: i64) -> Result<usize, String> {
    let Some(start) = t.start else {
        return Err(format!(
            "{client} {}: never subscribed (head {head})",
            t.market
        ));
    };
    let want: Vec<i64> = (start..=head).collect();
    if t.seqs == want {
        return Ok(want.len());
    }
    let at = t
        .seqs
        .iter()
        .zip(&want)
        .position(|(a, b)| a != b)
        .unwrap_or(t.seqs.len().min(want.len()));
    let dups = t.seqs.windows(2).filter(|w| w[1] <= w[0]).count();
    let gaps = t.seqs.windows(2).filter(|w| w[1] > w[0] + 1).count();
    Err(format!(
        "{client} {}: expected {start}..={head} ({} trades), got {}; first difference at index {at} (expected {:?}, got {:?}); {dups} duplicates or reorders, {gaps} gaps",
        t.market,
        want.len(),
        t.seqs.len(),
        want.get(at),
        t.seqs.get(at),
    ))
}

// ------------------------------------------------------------ the load

/// Plain SQL: every 20 ms one transaction of 1..=8 trades over random markets
/// (in market order, like the writer, so producers never deadlock). Reconnects
/// through outages. An in-flight statement always runs to its end, so when
/// this returns nothing it sent can still commit.
async fn sql_load(url: String, markets: Vec<String>, stop: CancellationToken) -> u64 {
    let mut rng = fastrand::Rng::with_seed(7);
    let mut client: Option<tokio_postgres::Client> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut committed = 0;
    while !stop.is_cancelled() {
        tick.tick().await;
        let c = match &client {
            Some(c) if !c.is_closed() => c,
            _ => {
                client = None;
                if let Ok(Ok((c, conn))) = tokio::time::timeout(
                    Duration::from_secs(5),
                    tokio_postgres::connect(&url, tokio_postgres::NoTls),
                )
                .await
                {
                    tokio::spawn(async move {
                        let _ = conn.await; // ends with an outage; we reconnect
                    });
                    client = Some(c);
                }
                continue;
            }
        };
        let n = rng.usize(1..=8);
        let mut ms: Vec<String> = (0..n)
            .map(|_| markets[rng.usize(..markets.len())].clone())
            .collect();
        ms.sort();
        if let Ok(k) = c
            .execute(
                "INSERT INTO trades (market_id, side, price, qty) SELECT m, 'yes', 0.5, 1 FROM unnest($1::text[]) m",
                &[&ms],
            )
            .await
        {
            committed += k;
        }
    }
    committed
}

/// What the writer answered.
#[derive(Debug, Default)]
struct WriterLog {
    /// client_order_ids answered 201 (or 200 to a retry).
    committed: Vec<String>,
    /// client_order_ids answered 503, never retried: must not be in the log.
    refused: Vec<String>,
    /// When each 2xx and each 503 arrived.
    ok_at: Vec<Instant>,
    refused_at: Vec<Instant>,
    /// Answers `outcome_unknown` (or no answer), resolved by retrying the same id.
    unknown: usize,
}

/// A trade posted to the writer: (client_order_id, URL, body).
type Post = (String, String, String);

enum Answer {
    Committed,
    Refused,
    Unknown,
}

/// Post once. `retry`: an earlier try's outcome is unknown, so a 503 now says
/// nothing about whether that one committed.
async fn post(p: &Post, retry: bool) -> Answer {
    match try_http("POST", &p.1, &[], Some(&p.2)).await {
        Ok((200 | 201, _)) => Answer::Committed,
        Ok((503, _)) if !retry => Answer::Refused,
        Ok((503, _)) => Answer::Unknown,
        Ok((500, v)) if v["error"]["code"] == "outcome_unknown" => Answer::Unknown,
        Ok((s, v)) => panic!("the writer answered {s} {v} to {}", p.0),
        Err(_) => Answer::Unknown, // no answer: it may have committed
    }
}

/// The writer's HTTP API: one new trade every 10 ms, round-robin over
/// markets, each with a fresh client_order_id. A 503 is final (nothing
/// committed, by contract; checked in `finish`). An unknown outcome is
/// retried with the same id, one retry per tick besides the new trade, until
/// the writer gives a definite answer, as its docs tell clients to.
async fn http_load(writer: String, markets: Vec<String>, stop: CancellationToken) -> WriterLog {
    let mut log = WriterLog::default();
    let mut unresolved: std::collections::VecDeque<Post> = Default::default();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n = 0usize;
    loop {
        let stopping = stop.is_cancelled();
        if stopping && unresolved.is_empty() {
            return log;
        }
        tick.tick().await;
        if let Some(p) = unresolved.pop_front() {
            match post(&p, true).await {
                Answer::Committed => {
                    log.committed.push(p.0);
                    log.ok_at.push(Instant::now());
                }
                _ => {
                    log.unknown += 1;
                    unresolved.push_back(p);
                }
            }
        }
        if stopping {
            continue;
        }
        n += 1;
        let coid = format!("w-{n}");
        let m = &markets[n % markets.len()];
        let body =
            json!({"side": "no", "price": "0.4", "qty": 2, "client_order_id": coid}).to_string();
        let p = (coid, format!("{writer}/v1/markets/{m}/trades"), body);
        match post(&p, false).await {
            Answer::Committed => {
                log.committed.push(p.0);
                log.ok_at.push(Instant::now());
            }
            Answer::Refused => {
                log.refused.push(p.0);
                log.refused_at.push(Instant::now());
            }
            Answer::Unknown => {
                log.unknown += 1;
                unresolved.push_back(p);
            }
        }
    }
}

// ------------------------------------------------------------ the rig

struct RigOpts {
    clients: usize,
    /// Trades per market before anything starts (replayed from the log).
    prefill: i64,
    /// Extra `marketcast broadcaster` arguments.
    bcast_args: Vec<String>,
}

impl Default for RigOpts {
    fn default() -> Self {
        RigOpts {
            clients: 30,
            prefill: 100,
            bcast_args: Vec::new(),
        }
    }
}

struct Rig {
    db_url: String,
    markets: Vec<String>,
    bcast: Option<ChildBroadcaster>,
    bcast_args: Vec<String>,
    url: watch::Sender<String>,
    targets: watch::Sender<Targets>,
    ready_tx: mpsc::UnboundedSender<String>,
    ready_rx: mpsc::UnboundedReceiver<String>,
    writer: Server,
    stop: CancellationToken,
    /// The two producers, started once every client is subscribed.
    load: Option<(JoinHandle<u64>, JoinHandle<WriterLog>)>,
    clients: Vec<ClientHandle>,
}

/// What `finish` found, for case-specific assertions.
struct Outcome {
    clients: Vec<ClientReport>,
    writer: WriterLog,
}

impl Outcome {
    fn client(&self, name: &str) -> &ClientReport {
        self.clients.iter().find(|c| c.name == name).unwrap()
    }

    /// The clients other than `except` never lost their connection.
    fn nobody_reconnected_except(&self, except: &[&str]) {
        for c in &self.clients {
            if !except.contains(&c.name.as_str()) {
                assert_eq!(
                    (c.connects, &c.closes),
                    (1, &Vec::new()),
                    "{} kept its one connection throughout",
                    c.name
                );
            }
        }
    }
}

impl Rig {
    /// Markets with a prefilled log, a broadcaster, a writer, every client
    /// subscribed, and then the load flowing.
    async fn start(db: &TestDb, opts: RigOpts) -> Rig {
        let markets: Vec<String> = (0..6).map(|i| format!("FM{i}")).collect();
        for m in &markets {
            db.market(m).await;
            db.trades(m, opts.prefill).await;
        }
        // Quick recovery for the test; a case's own arguments replace these.
        // (The LISTEN heartbeat keeps its default: a cut connection is noticed
        // at once anyway, and a short heartbeat on a busy box would drop
        // LISTEN by itself.)
        let mut bcast_args = opts.bcast_args;
        for (k, v) in [
            ("--reconcile-interval", "500ms"),
            ("--reconnect-max", "500ms"),
        ] {
            if !bcast_args.iter().any(|a| a == k) {
                bcast_args.extend([k.to_string(), v.to_string()]);
            }
        }
        let bcast = ChildBroadcaster::start(&db.broadcaster_url(), &bcast_args).await;
        let mut wcfg = writer_config(db);
        wcfg.db.timeout = Duration::from_secs(2);
        let writer = writer(wcfg).await;
        let (url, _) = watch::channel(bcast.ws());
        let (targets, _) = watch::channel(None);
        let (ready_tx, ready_rx) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let mut rig = Rig {
            db_url: db.url.clone(),
            markets: markets.clone(),
            bcast: Some(bcast),
            bcast_args,
            url,
            targets,
            ready_tx,
            ready_rx,
            load: None,
            writer,
            stop: stop.clone(),
            clients: Vec::new(),
        };
        // Client i follows markets i and i+2 (mod 6). By blocks of six: from
        // seq 0, live from the head, from the middle of the log; so each
        // market has subscribers of every kind.
        for i in 0..opts.clients {
            let from = match (i / 6) % 3 {
                0 => Some(0),
                1 => None,
                _ => Some(opts.prefill / 2),
            };
            let spec = ClientSpec {
                name: format!("c{i}"),
                markets: [i % 6, (i + 2) % 6]
                    .iter()
                    .map(|k| (markets[*k].clone(), from))
                    .collect(),
                small_rcvbuf: false,
            };
            rig.add_client(spec);
        }
        rig.wait_ready(opts.clients).await;
        rig.load = Some((
            tokio::spawn(sql_load(db.url.clone(), markets.clone(), stop.clone())),
            tokio::spawn(http_load(rig.writer.http(), markets, stop)),
        ));
        rig.wait_committed(100).await;
        rig
    }

    fn bcast(&self) -> &ChildBroadcaster {
        self.bcast.as_ref().unwrap()
    }

    fn add_client(&mut self, spec: ClientSpec) {
        let (pause, pause_rx) = watch::channel(false);
        let task = tokio::spawn(run_client(
            spec.clone(),
            self.url.subscribe(),
            self.targets.subscribe(),
            pause_rx,
            self.ready_tx.clone(),
        ));
        self.clients.push(ClientHandle {
            name: spec.name,
            pause,
            task,
        });
    }

    /// Wait until `n` more clients have every subscription confirmed.
    async fn wait_ready(&mut self, n: usize) {
        for _ in 0..n {
            tokio::time::timeout(DEADLINE, self.ready_rx.recv())
                .await
                .expect("clients subscribe in time");
        }
    }

    fn pause(&self, name: &str, paused: bool) {
        let c = self.clients.iter().find(|c| c.name == name).unwrap();
        c.pause.send_replace(paused);
    }

    async fn committed(&self) -> Option<i64> {
        let (c, conn) = tokio_postgres::connect(&self.db_url, tokio_postgres::NoTls)
            .await
            .ok()?;
        tokio::spawn(async move {
            let _ = conn.await; // one query
        });
        c.query_one(
            "SELECT sum(last_seq)::int8 FROM markets WHERE id = ANY($1)",
            &[&self.markets],
        )
        .await
        .ok()
        .map(|r| r.get(0))
    }

    /// Wait until `n` more trades have committed (the load flows, Postgres works).
    async fn wait_committed(&self, n: i64) {
        let from = until("the database to answer", || self.committed()).await;
        until(&format!("{n} more trades to commit"), || async {
            self.committed().await.filter(|c| *c >= from + n)
        })
        .await;
    }

    /// kill -9 the broadcaster; trades keep committing with none running;
    /// then a new one on a new port, which clients learn on their next
    /// reconnect (as from a load balancer).
    async fn kill9_and_replace(&mut self) {
        self.bcast.take().unwrap().kill9().await;
        self.wait_committed(50).await;
        let b = ChildBroadcaster::start(
            &as_role(&self.db_url, BROADCASTER_ROLE, BROADCASTER_PASSWORD),
            &self.bcast_args,
        )
        .await;
        self.url.send_replace(b.ws());
        self.bcast = Some(b);
    }

    /// Stop the load; read the heads; wait for every client to reach them;
    /// check every sequence and every writer answer against the log.
    async fn finish(self) -> Outcome {
        self.stop.cancel();
        let (sql, http) = self.load.expect("the load was started");
        let sql_committed = sql.await.unwrap();
        let writer = http.await.unwrap();
        assert!(sql_committed > 0, "the SQL load committed something");
        assert!(
            !writer.committed.is_empty(),
            "the writer committed something"
        );

        let c = connect(&self.db_url).await;
        let mut heads = HashMap::new();
        for r in c
            .query(
                "SELECT m.id, m.last_seq, count(t.seq), coalesce(max(t.seq), 0) FROM markets m LEFT JOIN trades t ON t.market_id = m.id WHERE m.id = ANY($1) GROUP BY m.id, m.last_seq",
                &[&self.markets],
            )
            .await
            .unwrap()
        {
            let (id, last, n, max): (String, i64, i64, i64) = (r.get(0), r.get(1), r.get(2), r.get(3));
            assert_eq!((n, max), (last, last), "{id}: the log is 1..=last_seq");
            heads.insert(id, last);
        }

        // The writer's answers against the log: every 2xx once, no 503.
        let in_log: HashMap<String, i64> = c
            .query(
                "SELECT client_order_id, count(*) FROM trades WHERE client_order_id LIKE 'w-%' GROUP BY 1",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        for coid in &writer.committed {
            assert_eq!(
                in_log.get(coid),
                Some(&1),
                "{coid} was answered 2xx: in the log once"
            );
        }
        for coid in &writer.refused {
            assert!(
                !in_log.contains_key(coid),
                "{coid} was answered 503 yet committed"
            );
        }
        assert_eq!(
            in_log.len(),
            writer.committed.len(),
            "nothing committed that was not answered 2xx"
        );

        let give_up = Instant::now() + DEADLINE;
        self.targets.send_replace(Some((heads.clone(), give_up)));
        let mut clients = Vec::new();
        for h in self.clients {
            let r = tokio::time::timeout(DEADLINE + Duration::from_secs(10), h.task)
                .await
                .unwrap_or_else(|_| panic!("{} ended", h.name))
                .unwrap();
            clients.push(r);
        }
        let mut failures = Vec::new();
        let mut delivered = 0;
        let mut from_zero: BTreeMap<&str, bool> = BTreeMap::new();
        for r in &clients {
            for v in &r.violations {
                failures.push(format!("{}: {v}", r.name));
            }
            if r.gave_up {
                failures.push(format!(
                    "{} did not reach the heads (closes {:?})",
                    r.name, r.closes
                ));
            }
            for t in &r.tracks {
                match verify(&r.name, t, heads[&t.market]) {
                    Ok(n) => delivered += n,
                    Err(e) => failures.push(e),
                }
                if t.start == Some(1) && t.seqs.len() as i64 == heads[&t.market] {
                    from_zero.insert(&t.market, true);
                }
            }
        }
        assert!(
            failures.is_empty(),
            "{} failures:\n{}",
            failures.len(),
            failures.join("\n")
        );
        // Every committed trade reached someone who follows its market from seq 1.
        for m in &self.markets {
            assert!(
                from_zero.get(m.as_str()).copied().unwrap_or(false),
                "{m}: every committed trade delivered to a subscriber from seq 1"
            );
        }
        eprintln!(
            "faults: {} clients, {} trades delivered, heads {:?}, writer: {} committed, {} refused (503), {} unknown-outcome retries",
            clients.len(),
            delivered,
            heads,
            writer.committed.len(),
            writer.refused.len(),
            writer.unknown
        );
        self.writer.stop().await;
        if let Some(b) = self.bcast {
            b.kill9().await;
        }
        Outcome { clients, writer }
    }
}

async fn listener_pids(c: &tokio_postgres::Client) -> Vec<i32> {
    c.query(
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'marketcast-listener' AND datname = current_database()",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

// ------------------------------------------------------------ the cases

/// (a) The LISTEN connection's backend is terminated five times while trades
/// flow. The periodic reconcile is off, so what committed while no LISTEN was
/// in place can only come from the re-read after each re-LISTEN. Clients
/// notice nothing: same connection, every trade.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listen_backend_terminated_repeatedly() {
    let db = TestDb::new().await;
    let rig = Rig::start(
        &db,
        RigOpts {
            bcast_args: vec!["--reconcile-interval".into(), "600s".into()],
            ..Default::default()
        },
    )
    .await;
    let c = db.client().await;
    let mut killed: Vec<i32> = Vec::new();
    for round in 1..=5 {
        // The listener is back (a new backend), then cut it again.
        let pid = until("a new LISTEN backend", || async {
            match listener_pids(&c).await[..] {
                [p] if !killed.contains(&p) => Some(p),
                _ => None,
            }
        })
        .await;
        let ok: bool = c
            .query_one("SELECT pg_terminate_backend($1)", &[&pid])
            .await
            .unwrap()
            .get(0);
        assert!(ok, "round {round}: terminated {pid}");
        killed.push(pid);
        rig.wait_committed(60).await;
    }
    until("LISTEN back up after the last cut", || async {
        (rig.bcast().metric("marketcast_listen_up").await == Some(1.0)).then_some(())
    })
    .await;
    let reconnects = rig
        .bcast()
        .metric("marketcast_listen_reconnects_total")
        .await
        .unwrap_or(0.0);
    assert!(reconnects >= 5.0, "a reconnect per cut: {reconnects}");
    assert!(rig.bcast().logged("LISTEN connection lost"));
    let out = rig.finish().await;
    out.nobody_reconnected_except(&[]);
}

/// (b) Postgres restarts (fast shutdown: every connection is cut) under load.
/// The writer answers 503 or `outcome_unknown` meanwhile and then commits
/// again, without a restart of its own; clients keep their connections and
/// get everything committed before, during and after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b_postgres_restart() {
    let cluster = OwnCluster::start("faults-restart").await;
    let db = cluster.test_db().await;
    let rig = Rig::start(&db, RigOpts::default()).await;
    cluster.run("restart").await;
    let back = Instant::now();
    rig.wait_committed(200).await;
    let out = rig.finish().await;
    out.nobody_reconnected_except(&[]);
    assert!(
        out.writer.ok_at.iter().any(|t| *t > back),
        "the writer commits again after the restart"
    );
}

/// (c) Postgres is down for 10 s. The writer answers 503 (and nothing it
/// refused is committed), then recovers by itself; the broadcaster's healthz
/// is 503 and then 200; subscribes during the outage get `unavailable` and
/// succeed once it is back; every client ends gapless.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_postgres_down_for_10s() {
    let cluster = OwnCluster::start("faults-outage").await;
    let db = cluster.test_db().await;
    let mut rig = Rig::start(&db, RigOpts::default()).await;
    let down_at = Instant::now();
    cluster.run("stop").await;
    let stopped = Instant::now();
    until("broadcaster healthz 503", || rig.bcast().health(503)).await;
    // A client arriving during the outage, from seq 0 of two markets.
    rig.add_client(ClientSpec {
        name: "late".into(),
        markets: vec![
            (rig.markets[1].clone(), Some(0)),
            (rig.markets[4].clone(), Some(0)),
        ],
        small_rcvbuf: false,
    });
    // The outage lasts 10 s (the scenario, not an assertion).
    tokio::time::sleep_until(down_at + Duration::from_secs(10)).await;
    let restarting = Instant::now();
    cluster.run("start").await;
    until("broadcaster healthz 200", || rig.bcast().health(200)).await;
    rig.wait_ready(1).await; // the late client got its subscriptions
    rig.wait_committed(200).await;
    let out = rig.finish().await;
    out.nobody_reconnected_except(&["late"]);
    let late = out.client("late");
    assert!(
        late.unavailable > 0,
        "subscribes during the outage answer unavailable"
    );
    assert!(
        out.writer
            .refused_at
            .iter()
            .any(|t| *t > stopped && *t < restarting),
        "the writer answered 503 during the outage"
    );
    assert!(
        out.writer.ok_at.iter().any(|t| *t > restarting),
        "the writer commits again after the outage, without a restart"
    );
}

/// (d) The broadcaster is killed with SIGKILL twice; trades commit while none
/// runs; a new process starts; clients reconnect with from_seq and miss nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d_broadcaster_killed_and_replaced() {
    let db = TestDb::new().await;
    let mut rig = Rig::start(&db, RigOpts::default()).await;
    for _ in 0..2 {
        rig.kill9_and_replace().await;
        rig.wait_committed(100).await;
    }
    let out = rig.finish().await;
    for c in &out.clients {
        assert!(c.connects >= 3, "{}: reconnected after each kill", c.name);
    }
}

/// (e) One subscriber stops reading. The broadcaster closes it with 4000 once
/// a write has been stuck for --write-timeout; it reconnects with from_seq
/// and ends gapless. Everyone else keeps their connection and every trade.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e_paused_subscriber() {
    let db = TestDb::new().await;
    let mut rig = Rig::start(
        &db,
        RigOpts {
            bcast_args: vec!["--write-timeout".into(), "1s".into()],
            ..Default::default()
        },
    )
    .await;
    // A market only the paused subscriber follows, for bursts that fill its
    // pipe without making everyone else parse them.
    db.market("FQ").await;
    rig.markets.push("FQ".into());
    let all: Vec<(String, Option<i64>)> =
        rig.markets.iter().map(|m| (m.clone(), Some(0))).collect();
    rig.add_client(ClientSpec {
        name: "paused".into(),
        markets: all,
        small_rcvbuf: true,
    });
    rig.wait_ready(1).await;
    rig.pause("paused", true);
    // Loopback socket buffers hold megabytes: bursts of trades on top of the
    // load fill them far sooner than the load alone would.
    let closes = || async {
        rig.bcast()
            .metric("marketcast_slow_consumer_closes_total")
            .await
            .unwrap_or(0.0)
    };
    let give_up = Instant::now() + DEADLINE;
    while closes().await < 1.0 {
        assert!(
            Instant::now() < give_up,
            "timed out waiting for the paused subscriber to be closed as a slow consumer"
        );
        db.trades("FQ", 10_000).await;
        // Give the write timeout (1 s) a chance before the next burst.
        for _ in 0..15 {
            if closes().await >= 1.0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    rig.pause("paused", false);
    rig.wait_committed(100).await;
    assert_eq!(
        rig.bcast()
            .metric("marketcast_slow_consumer_closes_total")
            .await,
        Some(1.0),
        "only the paused subscriber"
    );
    let out = rig.finish().await;
    out.nobody_reconnected_except(&["paused"]);
    let p = out.client("paused");
    assert_eq!(
        p.closes.first(),
        Some(&Some(4000)),
        "closed with 4000: {:?}",
        p.closes
    );
}

/// A LISTEN session that stops reading its socket: its backend blocks in
/// ClientWrite and the cluster-wide NOTIFY queue cannot be truncated past it.
struct StuckListener {
    pid: i32,
    _client: tokio_postgres::Client,
    _conn: std::pin::Pin<
        Box<tokio_postgres::Connection<tokio::net::TcpStream, tokio_postgres::tls::NoTlsStream>>,
    >,
}

impl StuckListener {
    async fn start(url: &str, channels: &[String]) -> StuckListener {
        let cfg: tokio_postgres::Config = url.parse().unwrap();
        let u = url::Url::parse(url).unwrap();
        let addr: SocketAddr = format!("{}:{}", u.host_str().unwrap(), u.port().unwrap())
            .parse()
            .unwrap();
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        let tcp = sock.connect(addr).await.unwrap();
        let (client, conn) = cfg.connect_raw(tcp, tokio_postgres::NoTls).await.unwrap();
        let mut conn = Box::pin(conn);
        let listen: String = channels.iter().map(|c| format!("LISTEN {c};")).collect();
        // The connection is driven only while these two run; never again after.
        let pid: i32 = drive(&mut conn, client.query_one("SELECT pg_backend_pid()", &[]))
            .await
            .unwrap()
            .get(0);
        drive(&mut conn, client.batch_execute(&listen))
            .await
            .unwrap();
        StuckListener {
            pid,
            _client: client,
            _conn: conn,
        }
    }
}

async fn drive<T>(
    conn: &mut std::pin::Pin<
        Box<tokio_postgres::Connection<tokio::net::TcpStream, tokio_postgres::tls::NoTlsStream>>,
    >,
    f: impl std::future::Future<Output = T>,
) -> T {
    tokio::pin!(f);
    tokio::select! {
        r = &mut f => r,
        r = conn.as_mut() => panic!("the connection ended: {r:?}"),
    }
}

async fn queue_usage(c: &tokio_postgres::Client) -> f64 {
    c.query_one("SELECT pg_notification_queue_usage()", &[])
        .await
        .unwrap()
        .get(0)
}

/// One transaction of 200 distinct 7000-byte notifications (about 1.4 MB of
/// queue) on a channel marketcast does not listen on.
async fn noise(c: &tokio_postgres::Client) {
    c.execute(
        "SELECT count(pg_notify('faults_noise', g || repeat('x', 7000))) FROM generate_series(1, 200) g",
        &[],
    )
    .await
    .unwrap();
}

/// (f) NOTIFY queue pressure. A foreign session LISTENs on our shard channels
/// (and a busy channel of its own) and stops reading. Its backend blocks, the
/// cluster-wide queue grows behind it: pg_notification_queue_usage() rises,
/// marketcast exports it and logs a warning above --notify-queue-warn. Trades
/// keep committing and flowing (the queue is far from full). Once the session
/// goes, the queue drains and the warning clears. What happens when the queue
/// is full is in docs/RELIABILITY.md (8 GiB cannot be filled in a test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f_notify_queue_pinned_by_a_stuck_listener() {
    let db = TestDb::new().await;
    let threshold = 1e-4; // about 105 pages of 8 KiB
    let rig = Rig::start(
        &db,
        RigOpts {
            bcast_args: vec!["--notify-queue-warn".into(), threshold.to_string()],
            ..Default::default()
        },
    )
    .await;
    let c = db.client().await;
    let mut channels: Vec<String> = c
        .query(
            "SELECT DISTINCT 'marketcast_shard_' || shard FROM markets WHERE id = ANY($1)",
            &[&rig.markets],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    channels.push("faults_noise".into());
    let stuck = StuckListener::start(&db.url, &channels).await;
    // Its socket buffers take a few MB on loopback; noise fills them.
    let mut blocked = false;
    for _ in 0..40 {
        noise(&c).await;
        let w: Option<String> = c
            .query_one(
                "SELECT wait_event FROM pg_stat_activity WHERE pid = $1",
                &[&stuck.pid],
            )
            .await
            .unwrap()
            .get(0);
        if w.as_deref() == Some("ClientWrite") {
            blocked = true;
            break;
        }
    }
    assert!(
        blocked,
        "the stuck listener's backend blocks in ClientWrite"
    );
    let before = queue_usage(&c).await;
    for _ in 0..3 {
        noise(&c).await;
    }
    rig.wait_committed(100).await; // trades still commit and notify
    let after = queue_usage(&c).await;
    eprintln!("faults: NOTIFY queue usage behind the stuck listener: {before} -> {after}");
    assert!(
        after >= before + 3e-4 && after >= threshold,
        "the queue grows behind the stuck listener: {before} -> {after}"
    );
    until(
        "marketcast_notify_queue_usage above the threshold",
        || async {
            rig.bcast()
                .metric("marketcast_notify_queue_usage")
                .await
                .filter(|u| *u >= threshold)
        },
    )
    .await;
    until("the warning log line", || async {
        rig.bcast()
            .logged("NOTIFY queue usage above --notify-queue-warn")
            .then_some(())
    })
    .await;

    // The stuck session goes away: the queue is truncated again.
    drop(stuck);
    until("the queue to drain", || async {
        (queue_usage(&c).await < threshold).then_some(())
    })
    .await;
    until("the gauge to follow and the warning to clear", || async {
        let u = rig.bcast().metric("marketcast_notify_queue_usage").await?;
        (u < threshold && rig.bcast().logged("NOTIFY queue usage back below")).then_some(())
    })
    .await;
    let out = rig.finish().await;
    out.nobody_reconnected_except(&[]);
}
