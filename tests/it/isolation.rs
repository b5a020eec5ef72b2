//! Fault isolation inside the broadcaster: a path to Postgres that freezes
//! without closing (the worst failure a feed can have is a silent, permanent
//! stall) is noticed, reported by `/healthz`, and recovered from without any
//! client reconnecting (docs/RELIABILITY.md, "A frozen path to Postgres").

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::*;

/// A TCP proxy in front of Postgres whose existing connections can be
/// frozen: they stay open and forward nothing more (a half-open path, as
/// behind a stateful firewall that lost its state), while connections made
/// after the freeze forward normally.
struct FreezingProxy {
    port: u16,
    /// Connections numbered below this are frozen.
    frozen_below: Arc<AtomicU64>,
    next: Arc<AtomicU64>,
}

impl FreezingProxy {
    async fn start(to: String) -> FreezingProxy {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let frozen_below = Arc::new(AtomicU64::new(0));
        let next = Arc::new(AtomicU64::new(0));
        let (fb, nx) = (frozen_below.clone(), next.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = l.accept().await {
                let id = nx.fetch_add(1, Ordering::SeqCst);
                let Ok(server) = TcpStream::connect(&to).await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pipe(cr, sw, id, fb.clone()));
                tokio::spawn(pipe(sr, cw, id, fb.clone()));
            }
        });
        FreezingProxy {
            port,
            frozen_below,
            next,
        }
    }

    /// Freeze every connection open now.
    fn freeze(&self) {
        self.frozen_below
            .store(self.next.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

/// Copy `from` to `to` until connection `id` is frozen; then hold both
/// halves open and forward nothing.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    id: u64,
    frozen_below: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if id < frozen_below.load(Ordering::SeqCst) {
            // Frozen: the bytes are lost and the sockets stay open.
            std::future::pending::<()>().await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_path_to_postgres_is_reported_and_recovered_without_reconnects() {
    let db = TestDb::new().await;
    db.market("FRZ").await;
    let url = url::Url::parse(&db.broadcaster_url()).unwrap();
    let pg = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap());
    let proxy = FreezingProxy::start(pg).await;
    let mut via_proxy = url.clone();
    via_proxy.set_port(Some(proxy.port)).unwrap();

    let mut cfg = broadcaster_config(&db);
    cfg.db.url = via_proxy.to_string();
    cfg.db.timeout = Duration::from_secs(1);
    // One connection in each pool: a fresh connection made beside a frozen
    // one must not be what hides it; only closing the frozen one recovers.
    cfg.db.pool_size = 1;
    cfg.hub_pool_size = 1;
    let b = broadcaster(cfg).await;
    let mut ws = connect_ws(&format!("{}?market=FRZ", b.ws())).await;
    assert_eq!(recv(&mut ws).await["type"], "subscribed");
    db.trades("FRZ", 3).await;
    expect_trades(&mut ws, "FRZ", 1, 3).await;

    // Every connection the broadcaster has to Postgres freezes: LISTEN, the
    // hub's reads, the probe, the pool. Trades go on being committed.
    proxy.freeze();
    db.trades("FRZ", 5).await;

    // /healthz turns 503 within the documented bound (the probe's 1 s
    // period plus its 2 s timeout, or the LISTEN heartbeat)...
    let healthz = format!("{}/healthz", b.http());
    let t0 = Instant::now();
    let unhealthy = tokio::time::timeout(Duration::from_secs(6), async {
        loop {
            if let Ok((503, _)) = try_http("GET", &healthz, &[], None).await {
                return t0.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(unhealthy.is_ok(), "/healthz never reported the frozen path");

    // ...and every trade still reaches the subscriber, in order, on the
    // same connection: the frozen connections are closed, fresh ones made.
    expect_trades(&mut ws, "FRZ", 4, 8).await;
    db.trades("FRZ", 2).await;
    expect_trades(&mut ws, "FRZ", 9, 10).await;
    let healthy = tokio::time::timeout(WAIT, async {
        while !matches!(try_http("GET", &healthz, &[], None).await, Ok((200, _))) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(healthy.is_ok(), "/healthz never recovered");
    b.stop().await;
}
