//! The load balancer (issue 15): a real HAProxy running `deploy/haproxy.cfg`
//! (addresses substituted, `host-only` lines dropped) in front of three real
//! broadcasters (child processes), 300 WebSocket clients on 10 markets
//! connecting through it with `/ws?market=M&from_seq=N`, trades committed at
//! about 500 per second, and the busiest broadcaster killed with SIGKILL.
//!
//! What it shows:
//! - routing by market: every client of a market lands on the same
//!   broadcaster (`X-Marketcast-Broadcaster` on the 101), and the HTTP read
//!   `GET /v1/markets/M/trades` lands on that one too;
//! - failover: the killed broadcaster's clients reconnect through HAProxy
//!   with `from_seq` = the last seq they saw and land on a survivor, while
//!   the other markets stay where they were (consistent hashing);
//! - nothing lost: every client's sequence is exactly `1..=head` of its
//!   market at the end.
//!
//! `haproxy` must be on PATH (Debian 12: `apt-get install haproxy`; `.ci/run`
//! installs it).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::faults::ChildBroadcaster;
use crate::support::*;

const CLIENTS: usize = 300;
const MARKETS: usize = 10;
/// Trades committed per second.
const RATE: f64 = 500.0;
const HEADER: &str = "x-marketcast-broadcaster";

/// A free TCP port on 127.0.0.1 (bound, then released for HAProxy to take).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// deploy/haproxy.cfg for this test: the `global`, `defaults`, `frontend
/// feed` and `backend broadcasters` sections as written, without `host-only`
/// lines, the feed bound to `port` and the broadcasters' `server` lines
/// replaced by `servers` (name, host:port). The writer's sections are left out.
fn haproxy_config(port: u16, servers: &[(String, String)]) -> String {
    let src = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/haproxy.cfg"))
        .expect("read deploy/haproxy.cfg");
    let keep = [
        "global",
        "defaults",
        "frontend feed",
        "backend broadcasters",
    ];
    let mut out = String::new();
    let mut section = String::new();
    let (mut binds, mut dropped_servers) = (0, 0);
    for line in src.lines() {
        let header = !line.is_empty() && !line.starts_with([' ', '\t', '#']);
        if header {
            if section == "backend broadcasters" {
                for (name, addr) in servers {
                    out += &format!("    server {name} {addr}\n");
                }
            }
            section = line.trim().to_string();
        }
        if !keep.contains(&section.as_str()) || line.contains("# host-only") {
            continue;
        }
        let t = line.trim_start();
        if section == "frontend feed" && t.starts_with("bind ") {
            binds += 1;
            out += &format!("    bind 127.0.0.1:{port}\n");
        } else if section == "backend broadcasters" && t.starts_with("server ") {
            dropped_servers += 1;
        } else {
            out += line;
            out += "\n";
        }
    }
    if section == "backend broadcasters" {
        for (name, addr) in servers {
            out += &format!("    server {name} {addr}\n");
        }
    }
    assert_eq!(binds, 1, "deploy/haproxy.cfg: one bind in frontend feed");
    assert!(
        dropped_servers > 0,
        "deploy/haproxy.cfg: server lines in backend broadcasters"
    );
    out
}

/// `haproxy` in the foreground on `cfg`, its output kept for failure messages.
struct Haproxy {
    child: tokio::process::Child,
    log: Arc<Mutex<Vec<String>>>,
    cfg: std::path::PathBuf,
}

impl Haproxy {
    async fn start(cfg_text: &str) -> Haproxy {
        let missing = std::process::Command::new("haproxy")
            .arg("-v")
            .output()
            .is_err();
        assert!(
            !missing,
            "haproxy is not on PATH: this test runs a real HAProxy. Install it with \
             `apt-get install -y --no-install-recommends haproxy` (Debian 12; .ci/run does)"
        );
        let cfg = std::env::temp_dir().join(format!("mc-haproxy-{}.cfg", std::process::id()));
        std::fs::write(&cfg, cfg_text).unwrap();
        let check = std::process::Command::new("haproxy")
            .arg("-c")
            .arg("-f")
            .arg(&cfg)
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "haproxy -c rejects the generated config:\n{}\n{cfg_text}",
            String::from_utf8_lossy(&check.stderr)
        );
        let mut child = tokio::process::Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn haproxy");
        let log = Arc::new(Mutex::new(Vec::new()));
        for pipe in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn tokio::io::AsyncRead + Send + Unpin>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let sink = log.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(pipe).lines();
                while let Ok(Some(l)) = lines.next_line().await {
                    sink.lock().unwrap().push(l);
                }
            });
        }
        Haproxy { child, log, cfg }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_file(&self.cfg);
    }
}

/// What one client saw.
#[derive(Debug, Default)]
struct Report {
    market: String,
    seqs: Vec<i64>,
    /// The broadcaster (HAProxy's server name) behind each connection.
    served_by: Vec<String>,
    violations: Vec<String>,
    gave_up: bool,
}

/// Heads of every market once the load has stopped, and when to give up.
type Targets = Option<(HashMap<String, i64>, Instant)>;

/// A client as `marketcast subscribe` behaves: connect with `?market=` and
/// `from_seq` = the last seq seen, record every trade, and reconnect (after
/// 100 ms) whenever the connection ends, until the market's head is reached.
async fn client(
    lb: String,
    market: String,
    mut targets: watch::Receiver<Targets>,
    ready: mpsc::UnboundedSender<()>,
) -> Report {
    let mut rep = Report {
        market: market.clone(),
        ..Report::default()
    };
    let mut last = 0i64;
    let mut ready = Some(ready);
    let done = |last: i64, t: &Targets| t.as_ref().is_some_and(|(h, _)| last >= h[&market]);
    loop {
        if done(last, &targets.borrow()) {
            return rep;
        }
        if let Some((_, give_up)) = &*targets.borrow() {
            if Instant::now() >= *give_up {
                rep.gave_up = true;
                return rep;
            }
        }
        let url = format!("ws://{lb}/ws?market={market}&from_seq={last}");
        let conn = tokio::time::timeout(
            Duration::from_secs(5),
            tokio_tungstenite::connect_async(url),
        )
        .await;
        let Ok(Ok((mut ws, resp))) = conn else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        rep.served_by.push(
            resp.headers()
                .get(HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("?")
                .to_string(),
        );
        loop {
            let give_up = targets.borrow().as_ref().map(|(_, g)| *g);
            tokio::select! {
                m = ws.next() => match m {
                    Some(Ok(Message::Text(t))) => {
                        let v: Value = match serde_json::from_str(&t) {
                            Ok(v) => v,
                            Err(_) => { rep.violations.push(format!("not JSON: {t}")); continue; }
                        };
                        match v["type"].as_str() {
                            Some("trade") if v["market"] == market.as_str() => {
                                let seq = v["seq"].as_i64().unwrap_or(-1);
                                rep.seqs.push(seq);
                                last = seq;
                            }
                            Some("subscribed") if v["market"] == market.as_str() => {
                                if let Some(r) = ready.take() {
                                    let _ = r.send(());
                                }
                            }
                            // Postgres busy or the like: drop and come back.
                            Some("error") if v["code"] == "unavailable" => break,
                            _ => rep.violations.push(format!("unexpected: {t}")),
                        }
                    }
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                    Some(Ok(_)) => {}
                },
                _ = targets.changed() => {}
                _ = tokio::time::sleep_until(give_up.unwrap_or_else(Instant::now)), if give_up.is_some() => {
                    rep.gave_up = true;
                    return rep;
                }
            }
            if done(last, &targets.borrow()) {
                let _ = ws.close(None).await;
                return rep;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// [`RATE`] trades per second: every 20 ms one transaction of what is due by
/// then (10 when commits keep up) over random markets, sorted as the writer
/// orders them. Returns the trades committed.
async fn load(url: String, markets: Vec<String>, stop: CancellationToken) -> u64 {
    let c = connect(&url).await;
    let mut rng = fastrand::Rng::with_seed(15);
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let t0 = Instant::now();
    let mut n = 0;
    while !stop.is_cancelled() {
        tick.tick().await;
        let due = (t0.elapsed().as_secs_f64() * RATE) as u64;
        let mut ms: Vec<String> = (n..due)
            .map(|_| markets[rng.usize(..markets.len())].clone())
            .collect();
        ms.sort();
        n += c
            .execute(
                "INSERT INTO trades (market_id, side, price, qty) SELECT m, 'yes', 0.5, 1 FROM unnest($1::text[]) m",
                &[&ms],
            )
            .await
            .expect("insert trades");
    }
    n
}

/// The broadcaster HAProxy sends a read of `market` to (a new connection).
async fn read_lands_on(lb: &str, market: &str) -> String {
    // HAProxy's own answers (its 503 while no server is up) are not ours:
    // unchecked against the contract.
    let (status, headers, _) = http_unchecked(
        "GET",
        &format!("http://{lb}/v1/markets/{market}/trades?limit=1"),
        &[],
        None,
    )
    .await
    .expect("GET through haproxy");
    assert_eq!(
        status, 200,
        "GET /v1/markets/{market}/trades through haproxy"
    );
    headers
        .get(HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("?")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_routes_by_market_and_fails_over_gaplessly() {
    let db = TestDb::new().await;
    let markets: Vec<String> = (0..MARKETS).map(|i| format!("LB-{i}")).collect();
    for m in &markets {
        db.market(m).await;
    }
    let args: Vec<String> = ["--reconcile-interval", "500ms", "--reconnect-max", "500ms"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut bcasts: BTreeMap<String, ChildBroadcaster> = BTreeMap::new();
    for name in ["b1", "b2", "b3"] {
        bcasts.insert(
            name.to_string(),
            ChildBroadcaster::start(&db.broadcaster_url(), &args).await,
        );
    }
    let port = free_port();
    let servers: Vec<(String, String)> = bcasts
        .iter()
        .map(|(n, b)| (n.clone(), b.addr.to_string()))
        .collect();
    let hap = Haproxy::start(&haproxy_config(port, &servers)).await;
    let lb = format!("127.0.0.1:{port}");

    // Up: the read route answers through it.
    let up = Instant::now() + Duration::from_secs(15);
    while !matches!(
        http_unchecked(
            "GET",
            &format!("http://{lb}/v1/markets/LB-0/trades"),
            &[],
            None
        )
        .await,
        Ok((200, _, _))
    ) {
        assert!(
            Instant::now() < up,
            "haproxy never answered:\n{}",
            hap.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Anything but the feed's routes is refused at the balancer.
    let (status, _) = http("GET", &format!("http://{lb}/metrics"), &[], None).await;
    assert_eq!(status, 404, "/metrics is not public");

    // 300 clients, 30 per market, all from the beginning of the log.
    let (targets_tx, targets_rx) = watch::channel::<Targets>(None);
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|i| {
            tokio::spawn(client(
                lb.clone(),
                markets[i % MARKETS].clone(),
                targets_rx.clone(),
                ready_tx.clone(),
            ))
        })
        .collect();
    drop(ready_tx);
    let all_in = Instant::now() + Duration::from_secs(30);
    for n in 0..CLIENTS {
        tokio::time::timeout_at(all_in, ready_rx.recv())
            .await
            .unwrap_or_else(|_| panic!("only {n} of {CLIENTS} clients subscribed through haproxy"));
    }

    let stop = CancellationToken::new();
    let load_started = Instant::now();
    let loader = tokio::spawn(load(db.url.clone(), markets.clone(), stop.clone()));
    tokio::time::sleep(Duration::from_secs(4)).await;

    // Where each market is: the read route agrees with the WebSockets.
    let mut home: BTreeMap<String, String> = BTreeMap::new();
    for m in &markets {
        home.insert(m.clone(), read_lands_on(&lb, m).await);
    }
    let per_server: BTreeMap<&String, usize> = home.values().fold(BTreeMap::new(), |mut a, s| {
        *a.entry(s).or_default() += 1;
        a
    });
    let victim = per_server
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(s, _)| (*s).clone())
        .unwrap();
    assert!(
        bcasts.contains_key(&victim),
        "reads answered by {victim:?}, not one of the test's broadcasters; X-Marketcast-Broadcaster missing?"
    );
    eprintln!("markets per broadcaster {per_server:?}; killing {victim}");
    let moved: BTreeSet<String> = home
        .iter()
        .filter(|(_, s)| **s == victim)
        .map(|(m, _)| m.clone())
        .collect();
    bcasts.remove(&victim).unwrap().kill9().await;
    tokio::time::sleep(Duration::from_secs(5)).await;

    // After the kill: the victim's markets are read elsewhere, the others
    // where they were.
    for m in &markets {
        let now = read_lands_on(&lb, m).await;
        if moved.contains(m) {
            assert_ne!(now, victim, "{m} still sent to the dead broadcaster");
        } else {
            assert_eq!(now, home[m], "{m} moved though its broadcaster is up");
        }
    }

    stop.cancel();
    let committed = loader.await.unwrap();
    let secs = load_started.elapsed().as_secs_f64();
    let heads: HashMap<String, i64> = connect(&db.url)
        .await
        .query(
            "SELECT market_id, max(seq) FROM trades GROUP BY market_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(heads.len(), MARKETS, "every market got trades");
    targets_tx
        .send(Some((
            heads.clone(),
            Instant::now() + Duration::from_secs(30),
        )))
        .unwrap();

    let mut failures = Vec::new();
    let (mut reconnected, mut delivered) = (0, 0);
    let mut landed: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for t in tasks {
        let r = t.await.unwrap();
        let head = heads[&r.market];
        let want: Vec<i64> = (1..=head).collect();
        delivered += r.seqs.len();
        if r.gave_up || r.seqs != want {
            let gaps = r.seqs.windows(2).filter(|w| w[1] != w[0] + 1).count();
            failures.push(format!(
                "{}: {} trades, want 1..={head}; {gaps} breaks; gave_up {}; served_by {:?}",
                r.market,
                r.seqs.len(),
                r.gave_up,
                r.served_by
            ));
        }
        failures.extend(r.violations.iter().map(|v| format!("{}: {v}", r.market)));
        let first = r.served_by.first().cloned().unwrap_or_default();
        if first != home[&r.market] {
            failures.push(format!(
                "{}: first connection on {first}, its market's reads on {}",
                r.market, home[&r.market]
            ));
        }
        if moved.contains(&r.market) {
            if r.served_by.len() < 2 {
                failures.push(format!("{}: never reconnected after the kill", r.market));
            }
            reconnected += 1;
            landed
                .entry(r.market.clone())
                .or_default()
                .insert(r.served_by.last().cloned().unwrap_or_default());
        } else if r.served_by.len() != 1 {
            failures.push(format!(
                "{}: reconnected though its broadcaster stayed up: {:?}",
                r.market, r.served_by
            ));
        }
    }
    for (m, on) in &landed {
        if on.contains(&victim) {
            failures.push(format!("{m}: a client ended on the dead broadcaster"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} problems:\n{}\nhaproxy:\n{}",
        failures.len(),
        failures.join("\n"),
        hap.log()
    );
    assert!(reconnected >= CLIENTS / MARKETS, "some clients failed over");
    eprintln!(
        "{committed} trades committed in {secs:.1} s, {delivered} delivered to {CLIENTS} clients; {reconnected} clients of {} markets failed over from {victim} to {landed:?}",
        moved.len()
    );
}
