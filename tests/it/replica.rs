//! Replay from a read replica (contract 1.1 section 5.4) against a real
//! streaming standby: a test cluster of its own, copied with `pg_basebackup
//! -R` and started on another port. WAL replay paused on the standby makes
//! it lag on demand; stopping it makes it unreachable; another cluster is
//! a server that is no standby of the primary.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::*;

/// A hot standby of an [`OwnCluster`], stopped and deleted on drop.
struct Standby {
    dir: PathBuf,
    port: u16,
}

/// Run a server binary as the server's OS user (PostgreSQL refuses root).
fn as_server(bin: &str, args: &[&str]) -> std::process::Output {
    let bin = pg_bin().join(bin);
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    let mut c = if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(&bin);
        c
    } else {
        Command::new(&bin)
    };
    c.args(args)
        .current_dir("/tmp")
        .output()
        .expect("run a PostgreSQL binary")
}

/// PG_BIN, else the newest /usr/lib/postgresql/*/bin (as bin/pg-dev).
fn pg_bin() -> PathBuf {
    if let Ok(b) = std::env::var("PG_BIN") {
        return b.into();
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL server binaries in /usr/lib/postgresql")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|d| d.join("pg_ctl").exists())
        .collect();
    dirs.sort_by_key(|d| {
        let v = d.parent().and_then(|p| p.file_name());
        v.and_then(|v| v.to_str()?.parse::<u32>().ok()).unwrap_or(0)
    });
    dirs.pop().expect("a PostgreSQL bin directory")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn port_of(url: &str) -> u16 {
    url::Url::parse(url).unwrap().port().unwrap()
}

impl Standby {
    /// `pg_basebackup -R` of the cluster at `primary_url`, started.
    async fn of(primary_url: &str) -> Standby {
        let dir = PathBuf::from(format!("/tmp/mc-standby-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let out = as_server(
            "pg_basebackup",
            &[
                "-R",
                "-D",
                dir.to_str().unwrap(),
                "-h",
                "127.0.0.1",
                "-p",
                &port_of(primary_url).to_string(),
                "-U",
                "postgres",
                "-X",
                "stream",
            ],
        );
        assert!(
            out.status.success(),
            "pg_basebackup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let s = Standby {
            dir,
            port: free_port(),
        };
        s.start().await;
        s
    }

    fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    async fn start(&self) {
        let dir = self.dir.to_str().unwrap();
        // A hot standby needs max_connections at least the primary's (pg-dev's 500).
        let opts = format!(
            "-p {} -k {dir} -c listen_addresses=127.0.0.1 -c max_connections=500",
            self.port
        );
        let log = format!("{dir}/standby.log");
        let out = as_server(
            "pg_ctl",
            &["-D", dir, "-o", &opts, "-l", &log, "-w", "start"],
        );
        assert!(
            out.status.success(),
            "pg_ctl start: {}{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        // A standby: in recovery, and answering reads.
        let url = self.url("postgres");
        until("the standby answers in recovery", async || {
            let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .ok()?;
            tokio::spawn(conn);
            let r = c.query_one("SELECT pg_is_in_recovery()", &[]).await.ok()?;
            r.get::<_, bool>(0).then_some(())
        })
        .await;
    }

    fn stop(&self) {
        let out = as_server(
            "pg_ctl",
            &["-D", self.dir.to_str().unwrap(), "-m", "fast", "-w", "stop"],
        );
        assert!(out.status.success(), "pg_ctl stop: {out:?}");
    }
}

impl Drop for Standby {
    fn drop(&mut self) {
        let _ = as_server(
            "pg_ctl",
            &["-D", self.dir.to_str().unwrap(), "-m", "immediate", "stop"],
        );
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Poll `f` every 20ms until it is Some, for at most [`WAIT`].
async fn until<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    tokio::time::timeout(WAIT, async {
        loop {
            if let Some(t) = f().await {
                return t;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// A metric with these exact labels (`name{labels}` as rendered; `name` alone
/// when it has none); 0 when not exported yet.
async fn metric(s: &Server, series: &str) -> f64 {
    let (_, body) = http_raw("GET", &format!("{}/metrics", s.http()), &[], None)
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&body).into_owned();
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

const FROM_REPLICA: &str = r#"marketcast_replayed_trades_total{source="replica"}"#;
const FROM_PRIMARY: &str = r#"marketcast_replayed_trades_total{source="postgres"}"#;
const FALLBACKS: &str = "marketcast_replica_fallbacks_total";

async fn healthz(s: &Server) -> (u16, Value) {
    http("GET", &format!("{}/healthz", s.http()), &[], None).await
}

/// Wait until /healthz says `"replica": want` (status 200 either way).
async fn replica_is(s: &Server, want: bool, limit: Duration) {
    let t = Instant::now();
    let mut last = Value::Null;
    while t.elapsed() < limit {
        let (status, body) = healthz(s).await;
        assert_eq!(status, 200, "the replica never affects the status: {body}");
        if body["replica"] == want {
            return;
        }
        last = body;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("/healthz never said replica {want} within {limit:?}: {last}");
}

/// Until the standby holds `n` trades of `market`.
async fn replicated(standby_db: &str, market: &str, n: i64) {
    until("the standby to replay the trades", async || {
        let (c, conn) = tokio_postgres::connect(standby_db, tokio_postgres::NoTls)
            .await
            .ok()?;
        tokio::spawn(conn);
        (seqs(&c, market).await.len() as i64 == n).then_some(())
    })
    .await;
}

/// Subscribe from `from_seq` on a new connection and get exactly
/// `from+1..=to`; how long that took.
async fn replay(b: &Server, market: &str, from: i64, to: i64) -> Duration {
    let mut ws = connect_ws(&b.ws()).await;
    let t = Instant::now();
    let sub = subscribe(&mut ws, market, Some(from)).await;
    assert_eq!(
        sub["head_seq"], to,
        "head_seq comes from the primary: {sub}"
    );
    expect_trades(&mut ws, market, from + 1, to).await;
    let took = t.elapsed();
    expect_silence(&mut ws, Duration::from_millis(100)).await;
    took
}

/// A ticker subscription from `from`: its backlog frame covers exactly
/// `from+1..=to`, with the log's volume.
async fn ticker_backlog(b: &Server, market: &str, from: i64, to: i64) {
    let mut ws = connect_ws(&b.ws()).await;
    send(
        &mut ws,
        serde_json::json!({"op": "subscribe", "market": market, "from_seq": from,
                           "mode": "ticker", "interval_ms": 1000, "id": 1}),
    )
    .await;
    let sub = recv(&mut ws).await;
    assert_eq!(sub["type"], "subscribed", "{sub}");
    let f = recv(&mut ws).await;
    assert_eq!(
        (
            f["type"].as_str(),
            f["from_seq"].as_i64(),
            f["to_seq"].as_i64()
        ),
        (Some("ticker"), Some(from + 1), Some(to)),
        "{f}"
    );
    assert_eq!(f["volume"], sub["volume"], "{f}");
}

/// The replica serves replays as far as it has the trades; what it lacks
/// comes from the primary after --replica-wait; a stopped replica and one
/// of another cluster are not used, and none of it changes what a client
/// gets or /healthz's status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_read_a_standby_as_far_as_it_has_the_trades() {
    let primary = OwnCluster::start("replica-primary").await;
    let db = primary.test_db().await;
    for m in ["rep.a", "rep.b", "rep.c", "rep.d"] {
        db.market(m).await;
    }
    db.trades("rep.a", 50).await;
    let standby = Standby::of(&primary.url).await;
    let standby_db = standby.url(&db.name);
    let standby_su = connect(&standby.url("postgres")).await;

    let wait = Duration::from_millis(250);
    let mut cfg = broadcaster_config(&db);
    cfg.replica.url = Some(as_role(&standby_db, BROADCASTER_ROLE, BROADCASTER_PASSWORD));
    cfg.replica.wait = wait;
    // Small pages: a replay past the replica's end takes many.
    cfg.replay_page = 10;
    let b = broadcaster(cfg).await;
    replica_is(&b, true, Duration::from_secs(10)).await;

    // Caught up: the whole replay comes from the replica.
    replicated(&standby_db, "rep.a", 50).await;
    let (r0, f0) = (metric(&b, FROM_REPLICA).await, metric(&b, FALLBACKS).await);
    replay(&b, "rep.a", 0, 50).await;
    assert_eq!(metric(&b, FROM_REPLICA).await - r0, 50.0);
    assert_eq!(metric(&b, FALLBACKS).await, f0, "no lag, no fallback");
    ticker_backlog(&b, "rep.a", 0, 50).await;
    assert_eq!(metric(&b, FROM_REPLICA).await - r0, 100.0, "the fold too");
    assert_eq!(metric(&b, FALLBACKS).await, f0);

    // Lagging: replay paused on the standby after 20 trades of rep.b; the
    // 200 it lacks (20 pages) come from the primary after --replica-wait in
    // all (not per page), no gap.
    db.trades("rep.b", 20).await;
    replicated(&standby_db, "rep.b", 20).await;
    standby_su
        .batch_execute("SELECT pg_wal_replay_pause()")
        .await
        .unwrap();
    db.trades("rep.b", 200).await;
    let (r0, p0, f0) = (
        metric(&b, FROM_REPLICA).await,
        metric(&b, FROM_PRIMARY).await,
        metric(&b, FALLBACKS).await,
    );
    let took = replay(&b, "rep.b", 0, 220).await;
    assert_eq!(metric(&b, FROM_REPLICA).await - r0, 20.0, "what it has");
    assert_eq!(metric(&b, FROM_PRIMARY).await - p0, 200.0, "what it lacks");
    assert!(metric(&b, FALLBACKS).await > f0, "a fallback was counted");
    assert!(
        took < wait + Duration::from_millis(1500),
        "lag adds at most --replica-wait: {took:?}"
    );
    // A ticker's catch-up fold: the replica's is short, the primary's whole.
    let (p0, f0) = (metric(&b, FROM_PRIMARY).await, metric(&b, FALLBACKS).await);
    ticker_backlog(&b, "rep.b", 0, 220).await;
    assert_eq!(metric(&b, FROM_PRIMARY).await - p0, 220.0);
    assert!(metric(&b, FALLBACKS).await > f0);
    // The catch-up route too.
    let f0 = metric(&b, FALLBACKS).await;
    let (status, page) = http(
        "GET",
        &format!(
            "{}/v1/markets/rep.b/trades?after_seq=20&limit=100",
            b.http()
        ),
        &[],
        None,
    )
    .await;
    assert_eq!(status, 200, "{page}");
    let got: Vec<i64> = page["trades"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(got, (21..=120).collect::<Vec<_>>());
    assert!(metric(&b, FALLBACKS).await > f0, "the route fell back too");

    // Resumed: the standby catches up and serves the same replay.
    standby_su
        .batch_execute("SELECT pg_wal_replay_resume()")
        .await
        .unwrap();
    replicated(&standby_db, "rep.b", 220).await;
    let (r0, f0) = (metric(&b, FROM_REPLICA).await, metric(&b, FALLBACKS).await);
    replay(&b, "rep.b", 10, 220).await;
    assert_eq!(metric(&b, FROM_REPLICA).await - r0, 210.0);
    assert_eq!(metric(&b, FALLBACKS).await, f0);

    // Down: replays still gapless, from the primary; /healthz 200 with
    // replica false; used again within 10 s of coming back.
    standby.stop();
    db.trades("rep.c", 30).await;
    let r0 = metric(&b, FROM_REPLICA).await;
    replay(&b, "rep.c", 0, 30).await;
    assert_eq!(metric(&b, FROM_REPLICA).await, r0);
    replica_is(&b, false, Duration::from_secs(10)).await;
    assert_eq!(metric(&b, "marketcast_replica_up").await, 0.0);
    standby.start().await;
    replica_is(&b, true, Duration::from_secs(10)).await;
    assert_eq!(metric(&b, "marketcast_replica_up").await, 1.0);
    b.stop().await;

    // Not a standby of this database: another cluster, in recovery or not.
    let other = OwnCluster::start("replica-other").await;
    let other_db = other.test_db().await;
    other_db.market("rep.d").await;
    other_db.trades("rep.d", 10).await;
    // (a) a standby of another cluster, for a broadcaster on `other`.
    let mut cfg = broadcaster_config(&other_db);
    cfg.replica.url = Some(as_role(&standby_db, BROADCASTER_ROLE, BROADCASTER_PASSWORD));
    // (b) a primary, for a broadcaster on `primary`.
    let mut cfg_b = broadcaster_config(&db);
    cfg_b.replica.url = Some(as_role(
        &other_db.url,
        BROADCASTER_ROLE,
        BROADCASTER_PASSWORD,
    ));
    db.trades("rep.d", 10).await;
    for cfg in [cfg, cfg_b] {
        let b = broadcaster(cfg).await;
        let r0 = metric(&b, FROM_REPLICA).await;
        // The first check runs at start and takes at most 2 s.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (status, body) = healthz(&b).await;
        assert_eq!(
            (status, &body["replica"]),
            (200, &Value::Bool(false)),
            "{body}"
        );
        replay(&b, "rep.d", 0, 10).await;
        assert_eq!(metric(&b, FROM_REPLICA).await, r0, "never read");
        b.stop().await;
    }
}
