//! The reference client (`marketcast subscribe`) across a broadcaster killed
//! and replaced while it follows a market, one or several, in trades or
//! ticker mode; its `--recent` start; its `--token` refusals, each ending it
//! with exit code 1 and the token nowhere in its output. Postgres restarts
//! and outages, under load, are in `faults`.

use std::future::Future;
use std::process::Stdio;

use marketcast::config::BroadcasterConfig;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_client_survives_a_broadcaster_replacement() {
    let db = TestDb::new().await;
    db.market("K").await;
    db.trades("K", 2).await;
    let b = broadcaster(broadcaster_config(&db)).await;
    let addr = b.addr;
    let (mut child, mut lines) = subscribe_cli(&b.ws(), "K", 12);
    let mut seqs = Vec::new();
    for _ in 0..2 {
        seqs.push(next_seq(&mut lines).await);
    }
    db.trades("K", 3).await;
    for _ in 0..3 {
        seqs.push(next_seq(&mut lines).await);
    }
    // Kill the broadcaster; trades commit while none runs; a new one takes the port.
    b.stop().await;
    db.trades("K", 4).await;
    let l = tokio::net::TcpListener::bind(addr).await.unwrap();
    let cfg = broadcaster_config(&db);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(marketcast::broadcaster::run(l, cfg, shutdown.clone()));
    db.trades("K", 3).await;
    for _ in 0..7 {
        seqs.push(next_seq(&mut lines).await);
    }
    assert_eq!(
        seqs,
        (1..=12).collect::<Vec<i64>>(),
        "every trade once, in order, across the replacement"
    );
    let st = tokio::time::timeout(WAIT, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(st.success(), "subscribe exits 0 after --count trades");
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

/// `marketcast subscribe URL --market M --from-seq 0 --count N`, its stdout
/// as lines.
fn subscribe_cli(url: &str, market: &str, count: u32) -> (tokio::process::Child, Lines) {
    let count = count.to_string();
    reference_client(
        url,
        &["--market", market, "--from-seq", "0", "--count", &count],
    )
}

type Lines = tokio::io::Lines<BufReader<tokio::process::ChildStdout>>;

/// `marketcast subscribe URL ARGS --reconnect-max 200ms`, its stdout as lines.
fn reference_client(url: &str, args: &[&str]) -> (tokio::process::Child, Lines) {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_marketcast"))
        .arg("subscribe")
        .arg(url)
        .args(args)
        .args(["--reconnect-max", "200ms"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    (child, lines)
}

/// The next stdout line of the reference client, as JSON.
async fn next_json(lines: &mut Lines) -> Value {
    let l = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .expect("a line in time")
        .unwrap()
        .expect("a line");
    serde_json::from_str(&l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))
}

async fn next_seq(lines: &mut Lines) -> i64 {
    let v = next_json(lines).await;
    assert_eq!(v["type"], "trade", "{v}");
    v["seq"].as_i64().unwrap()
}

/// Stop `b`, run `meanwhile` (trades committed while no broadcaster runs),
/// then start a broadcaster with `cfg` on the same port.
async fn replace(b: Server, cfg: BroadcasterConfig, meanwhile: impl Future<Output = ()>) -> Server {
    let addr = b.addr;
    b.stop().await;
    meanwhile.await;
    let l = tokio::net::TcpListener::bind(addr).await.unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(marketcast::broadcaster::run(l, cfg, shutdown.clone()));
    Server {
        addr,
        shutdown,
        task,
    }
}

/// Wait for the reference client to exit on its own; its exit status.
async fn exit_status(child: &mut tokio::process::Child) -> std::process::ExitStatus {
    tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("subscribe exits in time")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_client_survives_a_broadcaster_killed_with_sigkill() {
    let db = TestDb::new().await;
    db.market("K9").await;
    db.trades("K9", 2).await;
    // A child process, so that it can die the hard way: no Close frame, no
    // shutdown, its sockets closed by the kernel.
    let b = crate::faults::ChildBroadcaster::start(&db.broadcaster_url(), &[]).await;
    let addr = b.addr;
    let (mut child, mut lines) = subscribe_cli(&b.ws(), "K9", 9);
    let mut seqs = Vec::new();
    for _ in 0..2 {
        seqs.push(next_seq(&mut lines).await);
    }
    b.kill9().await;
    db.trades("K9", 4).await;
    let l = tokio::net::TcpListener::bind(addr).await.unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(marketcast::broadcaster::run(
        l,
        broadcaster_config(&db),
        shutdown.clone(),
    ));
    db.trades("K9", 3).await;
    for _ in 0..7 {
        seqs.push(next_seq(&mut lines).await);
    }
    assert_eq!(
        seqs,
        (1..=9).collect::<Vec<i64>>(),
        "every trade once, in order, across the kill"
    );
    let st = tokio::time::timeout(WAIT, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(st.success(), "subscribe exits 0 after --count trades");
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_client_follows_two_markets_gapless_across_a_replacement() {
    let db = TestDb::new().await;
    db.market("MA").await;
    db.market("MB").await;
    db.trades("MA", 2).await;
    db.trades("MB", 3).await;
    let b = broadcaster(broadcaster_config(&db)).await;
    // 8 trades of each market in all.
    let (mut child, mut lines) = reference_client(
        &b.ws(),
        &["--markets", "MA,MB", "--from-seq", "0", "--count", "16"],
    );
    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(next_json(&mut lines).await);
    }
    db.trades("MA", 2).await;
    db.trades("MB", 1).await;
    for _ in 0..3 {
        got.push(next_json(&mut lines).await);
    }
    let b = replace(b, broadcaster_config(&db), async {
        db.trades("MA", 3).await;
        db.trades("MB", 2).await;
    })
    .await;
    db.trades("MA", 1).await;
    db.trades("MB", 2).await;
    for _ in 0..8 {
        got.push(next_json(&mut lines).await);
    }
    for v in &got {
        assert_eq!(v["type"], "trade", "only trades are printed: {v}");
    }
    let seqs = |m: &str| -> Vec<i64> {
        got.iter()
            .filter(|v| v["market"] == m)
            .map(|v| v["seq"].as_i64().unwrap())
            .collect()
    };
    let want: Vec<i64> = (1..=8).collect();
    assert_eq!(seqs("MA"), want, "MA: every trade once, in order");
    assert_eq!(seqs("MB"), want, "MB: every trade once, in order");
    assert!(
        exit_status(&mut child).await.success(),
        "exit 0 after --count"
    );
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_client_ticker_spans_stay_contiguous_across_a_replacement() {
    let db = TestDb::new().await;
    db.market("TK").await;
    // The qty of each seq: `TestDb::trades` inserts qty 1..=n, all YES at 0.5.
    let mut qty: Vec<i64> = Vec::new();
    let mut commit = |n: i64| {
        qty.extend(1..=n);
        db.trades("TK", n)
    };
    commit(3).await;
    let b = broadcaster(broadcaster_config(&db)).await;
    let (mut child, mut lines) = reference_client(
        &b.ws(),
        &["--market", "TK", "--from-seq", "0", "--ticker", "100"],
    );
    let mut frames = Vec::new();
    read_frames_to(&mut lines, &mut frames, 3).await;
    commit(2).await;
    read_frames_to(&mut lines, &mut frames, 5).await;
    let b = replace(b, broadcaster_config(&db), commit(3)).await;
    commit(2).await;
    read_frames_to(&mut lines, &mut frames, 10).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "the client still runs: no span was out of sequence"
    );
    // Each frame folds exactly its span, and the spans tile 1..=10.
    let mut next = 1;
    for f in &frames {
        assert_eq!(f["type"], "ticker", "{f}");
        assert_eq!(f["market"], "TK", "{f}");
        let (from, to) = (
            f["from_seq"].as_i64().unwrap(),
            f["to_seq"].as_i64().unwrap(),
        );
        assert_eq!(from, next, "contiguous spans: {frames:?}");
        assert_eq!(f["count"], to - from + 1, "{f}");
        let span = &qty[(from - 1) as usize..to as usize];
        assert_eq!(f["qty"], span.iter().sum::<i64>(), "{f}");
        assert_eq!(f["volume"], qty[..to as usize].iter().sum::<i64>(), "{f}");
        for k in ["open", "high", "low", "last_price"] {
            assert_eq!(f[k], "0.5000", "{f}");
        }
        next = to + 1;
    }
    child.kill().await.unwrap();
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_client_recent_prints_the_last_n_then_resumes_live() {
    let db = TestDb::new().await;
    db.market("RC").await;
    db.trades("RC", 12).await;
    let b = broadcaster(broadcaster_config(&db)).await;
    let (mut child, mut lines) = reference_client(
        &b.ws(),
        &["--market", "RC", "--recent", "5", "--count", "9"],
    );
    let mut seqs = Vec::new();
    for _ in 0..5 {
        seqs.push(next_seq(&mut lines).await);
    }
    assert_eq!(seqs, (8..=12).collect::<Vec<i64>>(), "the newest 5");
    db.trades("RC", 2).await;
    for _ in 0..2 {
        seqs.push(next_seq(&mut lines).await);
    }
    // A reconnect resumes after the last seq: asking `recent` again would
    // repeat 10..=14 (a gap error, exit 1).
    let b = replace(b, broadcaster_config(&db), db.trades("RC", 1)).await;
    db.trades("RC", 1).await;
    for _ in 0..2 {
        seqs.push(next_seq(&mut lines).await);
    }
    assert_eq!(
        seqs,
        (8..=16).collect::<Vec<i64>>(),
        "then live, across a replacement"
    );
    assert!(
        exit_status(&mut child).await.success(),
        "exit 0 after --count"
    );
    b.stop().await;
}

/// The token rides on every upgrade, and tungstenite traces each request
/// whole at trace level: the client mutes it. A broadcaster without token
/// keys ignores the token (v1 and contract 1.1 §1.3 alike).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_client_never_prints_its_token_even_at_trace() {
    let db = TestDb::new().await;
    db.market("TT").await;
    db.trades("TT", 3).await;
    let b = broadcaster(broadcaster_config(&db)).await;
    let token = "tok-never-printed-4a1c9e";
    let out = client_output(
        &b.ws(),
        &["--market", "TT", "--from-seq", "0", "--count", "3"],
        token,
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    let seqs: Vec<i64> = stdout
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["seq"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert_eq!(seqs, vec![1, 2, 3]);
    assert!(stderr.contains("TRACE"), "the log ran at trace: {stderr}");
    assert!(
        !stdout.contains(token) && !stderr.contains(token),
        "{stderr}"
    );
    b.stop().await;
}

/// Read ticker frames into `frames` until one ends at seq `to`.
async fn read_frames_to(lines: &mut Lines, frames: &mut Vec<Value>, to: i64) {
    while frames.last().and_then(|f| f["to_seq"].as_i64()) != Some(to) {
        let f = next_json(lines).await;
        assert!(
            f["to_seq"].as_i64().is_some_and(|t| t <= to),
            "a span past seq {to}: {f}"
        );
        frames.push(f);
    }
}

/// Run the reference client to its end with `token` in MARKETCAST_TOKEN,
/// logging at trace.
async fn client_output(url: &str, args: &[&str], token: &str) -> std::process::Output {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_marketcast"))
        .arg("subscribe")
        .arg(url)
        .args(args)
        .args(["--reconnect-max", "200ms"])
        .env("MARKETCAST_TOKEN", token)
        .env("RUST_LOG", "trace")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .expect("subscribe exits in time")
        .unwrap()
}

/// The HS256 secret of the token tests' broadcasters (test-only, 32+ bytes).
const TEST_SECRET: &str = "resilience-test-only-hs256-secret-0123456789";

/// An HS256 token under `secret` for `markets`, expiring `ttl` seconds from now.
fn token(secret: &str, markets: &[&str], ttl: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({"sub": "resilience", "exp": now + ttl, "markets": markets}),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// A broadcaster child with token keys (contract 1.1 section 1).
async fn broadcaster_with_keys(db: &TestDb, leeway: &str) -> crate::faults::ChildBroadcaster {
    let args = ["--jwt-hs256-secret", TEST_SECRET, "--jwt-leeway", leeway].map(String::from);
    crate::faults::ChildBroadcaster::start(&db.broadcaster_url(), &args).await
}

/// The client cannot get a fresh token (contract 1.1 section 8): a token
/// refused at the upgrade (401) or for the market (`forbidden`) ends it with
/// exit code 1 and a message, having printed nothing, the token nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_ends_the_reference_client_with_exit_1() {
    let db = TestDb::new().await;
    db.market("TA").await;
    db.trades("TA", 2).await;
    let b = broadcaster_with_keys(&db, "30s").await;
    let args = ["--market", "TA", "--from-seq", "0"];
    let cases = [
        (
            "signed with another secret",
            token(
                "another-secret-of-at-least-32-bytes-9876543210",
                &["*"],
                3600,
            ),
            "the broadcaster refused the connection: HTTP 401 invalid_token",
        ),
        (
            "valid, for other markets",
            token(TEST_SECRET, &["OTHER-*"], 3600),
            "the token was refused: forbidden",
        ),
    ];
    for (what, tok, message) in cases {
        let out = client_output(&b.ws(), &args, &tok).await;
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert_eq!(out.status.code(), Some(1), "{what}: {stderr}");
        assert!(
            stderr.contains(message),
            "{what}: no {message:?} in {stderr}"
        );
        assert_eq!(stdout, "", "{what}: nothing printed");
        assert!(!stderr.contains(&tok), "{what}: the token is in the log");
    }
}

/// Close 4001 (the token expired) ends the client with exit code 1, after
/// every trade sent before it; any other close resumes (the tests above).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_ends_the_reference_client_at_close_4001() {
    let db = TestDb::new().await;
    db.market("TE").await;
    db.trades("TE", 2).await;
    let b = broadcaster_with_keys(&db, "0s").await;
    // Valid for the start of the binary and its upgrade; 4001 follows within
    // a second of the expiry.
    let tok = token(TEST_SECRET, &["TE"], 5);
    let out = client_output(&b.ws(), &["--market", "TE", "--from-seq", "0"], &tok).await;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let seqs: Vec<i64> = stdout
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["seq"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert_eq!(seqs, vec![1, 2], "the trades before the close");
    assert!(
        stderr.contains("the token expired (close 4001)"),
        "{stderr}"
    );
    assert!(!stderr.contains(&tok), "the token is in the log");
}
