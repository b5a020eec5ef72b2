//! Hostile clients: what an anonymous client can make either role hold
//! (docs/SECURITY.md, "What a client can make a server hold"). Each test
//! holds the attack open while a real client is served, and asserts the
//! bound that ends the attack.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

const TRADE: &str = r#"{"side":"yes","price":"0.5","qty":1}"#;

/// Wait up to `limit` for the peer to close `s` (EOF or reset), discarding
/// whatever it sends first; how long that took, or None if it stayed open.
async fn closed_within(s: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    let mut buf = [0u8; 1024];
    tokio::time::timeout(limit, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .ok()?;
    Some(t0.elapsed())
}

/// `n` TCP connections to `addr` that never send a byte.
async fn silent_sockets(addr: std::net::SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(TcpStream::connect(addr).await.expect("connect"));
    }
    out
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_sockets_are_closed_and_never_crowd_out_real_clients() {
    let db = TestDb::new().await;
    db.market("SIL").await;
    let header_timeout = Duration::from_secs(3);
    let mut wcfg = writer_config(&db);
    wcfg.http.header_timeout = header_timeout;
    let mut bcfg = broadcaster_config(&db);
    bcfg.http.header_timeout = header_timeout;
    let (w, b) = (writer(wcfg).await, broadcaster(bcfg).await);

    // 3,000 sockets that send nothing, against each role.
    let mut silent = silent_sockets(w.addr, 3000).await;
    silent.extend(silent_sockets(b.addr, 3000).await);
    let held = Instant::now();

    // While they are held, a new subscriber is served and a new trade
    // written, within 3 s.
    let t0 = Instant::now();
    let mut ws = connect_ws(&format!("{}?market=SIL", b.ws())).await;
    assert_eq!(recv(&mut ws).await["type"], "subscribed");
    let post = format!("{}/v1/markets/SIL/trades", w.http());
    let (st, body) = http("POST", &post, &[], Some(TRADE)).await;
    assert_eq!(st, 201, "{body}");
    expect_trades(&mut ws, "SIL", 1, 1).await;
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "served in {:?} under 6,000 silent sockets",
        t0.elapsed()
    );

    // Every silent socket is closed once the header timeout has passed.
    let deadline = header_timeout + Duration::from_secs(5);
    for s in &mut silent {
        let left = deadline.saturating_sub(held.elapsed());
        assert!(
            closed_within(s, left).await.is_some(),
            "a silent socket was still open {:?} after it connected",
            held.elapsed()
        );
    }
    // The WebSocket, upgraded long before, is not an idle HTTP connection:
    // it still follows the market.
    let (st, body) = http("POST", &post, &[], Some(TRADE)).await;
    assert_eq!(st, 201, "{body}");
    expect_trades(&mut ws, "SIL", 2, 2).await;
    w.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_preface_and_an_idle_keep_alive_connection_are_closed() {
    let db = TestDb::new().await;
    let header_timeout = Duration::from_secs(2);
    let mut wcfg = writer_config(&db);
    wcfg.http.header_timeout = header_timeout;
    let mut bcfg = broadcaster_config(&db);
    bcfg.http.header_timeout = header_timeout;
    let (w, b) = (writer(wcfg).await, broadcaster(bcfg).await);
    for addr in [w.addr, b.addr] {
        // HTTP/2 is not served: a cleartext preface, then silence, is
        // answered and closed at once, never held.
        let mut h2 = TcpStream::connect(addr).await.unwrap();
        h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        let took = closed_within(&mut h2, header_timeout + Duration::from_secs(3)).await;
        assert!(took.is_some(), "an HTTP/2 preface held a socket on {addr}");

        // A keep-alive connection idle after its response is closed once the
        // header timeout passes with no next request.
        let mut ka = TcpStream::connect(addr).await.unwrap();
        ka.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let took = closed_within(&mut ka, header_timeout + Duration::from_secs(3))
            .await
            .unwrap_or_else(|| panic!("an idle keep-alive connection was held on {addr}"));
        assert!(
            took >= header_timeout - Duration::from_millis(300),
            "closed after {took:?}: the response must come first, then the idle bound"
        );
    }
    w.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_connections_are_capped_at_accept_websockets_included() {
    let db = TestDb::new().await;
    db.market("CAP").await;
    let mut bcfg = broadcaster_config(&db);
    bcfg.http.max_open_connections = 4;
    let b = broadcaster(bcfg).await;
    let refused = |text: &str| metric(text, "marketcast_connections_refused_total");

    // Two WebSockets and two silent sockets fill the cap...
    let mut ws1 = connect_ws(&format!("{}?market=CAP", b.ws())).await;
    assert_eq!(recv(&mut ws1).await["type"], "subscribed");
    let mut ws2 = connect_ws(&format!("{}?market=CAP", b.ws())).await;
    assert_eq!(recv(&mut ws2).await["type"], "subscribed");
    let mut silent = silent_sockets(b.addr, 2).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = refused(&marketcast::metrics::render());

    // ...so the next connection is closed at accept, without a byte.
    let mut extra = TcpStream::connect(b.addr).await.unwrap();
    let took = closed_within(&mut extra, Duration::from_secs(2)).await;
    assert!(took.is_some(), "a connection over the cap was held");
    assert_eq!(refused(&marketcast::metrics::render()), before + 1.0);

    // What is open keeps working: the WebSockets still get their trades.
    db.trades("CAP", 1).await;
    expect_trades(&mut ws1, "CAP", 1, 1).await;
    expect_trades(&mut ws2, "CAP", 1, 1).await;

    // A slot freed is a slot to use again.
    drop(silent.pop());
    assert!(
        healthy_within(&b, WAIT).await,
        "the freed slot was never reused"
    );
    b.stop().await;
}

/// Transactions the database `db` has committed so far (Postgres flushes
/// these counters at least once a second).
async fn commits(db: &TestDb) -> i64 {
    db.client()
        .await
        .query_one(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthz_flood_costs_the_database_nothing_and_delays_no_trade() {
    let db = TestDb::new().await;
    db.market("HZ").await;
    let (w, b) = (
        writer(writer_config(&db)).await,
        broadcaster(broadcaster_config(&db)).await,
    );
    let mut ws = connect_ws(&format!("{}?market=HZ", b.ws())).await;
    assert_eq!(recv(&mut ws).await["type"], "subscribed");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = commits(&db).await;

    // 64 keep-alive connections asking /healthz as fast as they can, 32 on
    // each role, for 3 s, while trades flow.
    let stop = Instant::now() + Duration::from_secs(3);
    let mut flood = Vec::new();
    for i in 0..64 {
        let addr = if i % 2 == 0 { w.addr } else { b.addr };
        flood.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let mut buf = vec![0u8; 4096];
            let mut answered = 0u64;
            while Instant::now() < stop {
                s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
                    .await
                    .unwrap();
                // One response per request, small enough for one read.
                let n = s.read(&mut buf).await.unwrap();
                assert!(n > 0, "closed mid-flood");
                answered += 1;
            }
            answered
        }));
    }
    let post = format!("{}/v1/markets/HZ/trades", w.http());
    let mut seq = 0;
    while Instant::now() < stop {
        let (st, body) = http("POST", &post, &[], Some(TRADE)).await;
        assert_eq!(st, 201, "{body}");
        seq += 1;
        expect_trades(&mut ws, "HZ", seq, seq).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut answered = 0;
    for f in flood {
        answered += f.await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let spent = commits(&db).await - before;
    // The trades (written, then read by the hub), the probes (one a second
    // per role), the reconciles: nowhere near one query per health check,
    // which is what each used to cost.
    assert!(answered > 2000, "the flood was a flood: {answered} answers");
    assert!(
        (spent as u64) < answered / 20,
        "{spent} transactions for {answered} health checks and {seq} trades"
    );
    w.stop().await;
    b.stop().await;
}
