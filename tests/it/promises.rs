//! Promises of the docs that had no test of their own: each asserts the
//! exact codes or the exact sequence (issue 11, item 7).

use serde_json::json;

use crate::support::*;

// One thread: the hub publishes the whole read before any session runs, so
// the overflow is certain, not a race.
#[tokio::test]
async fn a_live_queue_overflow_is_caught_up_without_a_close() {
    let db = TestDb::new().await;
    db.market("LQ").await;
    let mut cfg = broadcaster_config(&db);
    // Four live frames per market: one INSERT of 500 trades overflows every
    // subscriber's live queue at once.
    cfg.hub.live_queue = 4;
    let b = broadcaster(cfg).await;
    let mut ws = connect_ws(&format!("{}?market=LQ", b.ws())).await;
    assert_eq!(recv(&mut ws).await["type"], "subscribed");
    db.trades("LQ", 500).await;
    expect_trades(&mut ws, "LQ", 1, 500).await;
    db.trades("LQ", 1).await;
    expect_trades(&mut ws, "LQ", 501, 501).await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn epoch_on_the_url_is_checked_end_to_end() {
    let db = TestDb::new().await;
    db.market("EPU").await;
    db.trades("EPU", 2).await;
    let b = broadcaster(broadcaster_config(&db)).await;
    let mut probe = connect_ws(&b.ws()).await;
    let epoch = subscribe(&mut probe, "EPU", None).await["epoch"]
        .as_str()
        .unwrap()
        .to_string();

    let mut wrong = connect_ws(&format!(
        "{}?market=EPU&from_seq=0&epoch=not-{epoch}",
        b.ws()
    ))
    .await;
    let v = recv(&mut wrong).await;
    assert_eq!(
        (v["type"].as_str(), v["code"].as_str(), v["epoch"].as_str()),
        (Some("error"), Some("epoch_mismatch"), Some(epoch.as_str())),
        "{v}"
    );
    let mut right = connect_ws(&format!("{}?market=EPU&from_seq=0&epoch={epoch}", b.ws())).await;
    assert_eq!(recv(&mut right).await["type"], "subscribed");
    expect_trades(&mut right, "EPU", 1, 2).await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_limits_hold_at_their_defaults() {
    let db = TestDb::new().await;
    let c = db.client().await;
    c.execute(
        "INSERT INTO markets (id) SELECT 'DEF-' || g FROM generate_series(1, 101) g",
        &[],
    )
    .await
    .unwrap();
    // The defaults, but the test's fast LISTEN/reconcile timers.
    let b = broadcaster(broadcaster_config(&db)).await;
    let mut ws = connect_ws(&b.ws()).await;
    // 100 subscriptions per connection...
    for i in 1..=100 {
        send(
            &mut ws,
            json!({"op": "subscribe", "market": format!("DEF-{i}"), "id": i}),
        )
        .await;
        let v = recv(&mut ws).await;
        assert_eq!(
            (v["type"].as_str(), v["id"].as_i64()),
            (Some("subscribed"), Some(i)),
            "{v}"
        );
    }
    // ...and the 101st is refused.
    send(
        &mut ws,
        json!({"op": "subscribe", "market": "DEF-101", "id": 101}),
    )
    .await;
    let v = recv(&mut ws).await;
    assert_eq!(v["code"], "too_many_subscriptions", "{v}");

    // A burst of 100 ops at once is answered (the 101 above drew on the same
    // bucket, refilling at 50/s: use a fresh connection)...
    let mut ws = connect_ws(&b.ws()).await;
    for i in 0..101 {
        send(&mut ws, json!({"op": "ping", "id": i})).await;
    }
    for i in 0..100 {
        assert_eq!(
            recv(&mut ws).await,
            json!({"type": "pong", "id": i}),
            "op {i}"
        );
    }
    // ...the 101st sent at once is rate limited.
    let v = recv(&mut ws).await;
    assert_eq!(
        (v["code"].as_str(), v["id"].as_i64()),
        (Some("rate_limited"), Some(100)),
        "{v}"
    );
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_whose_trades_are_pruned_mid_replay_ends_with_history_unavailable() {
    let db = TestDb::new().await;
    db.market("PR").await;
    // Far more than the server's socket buffers can hold (tcp_wmem tops
    // out at 4 MiB here; a trade frame is about 140 bytes).
    const N: i64 = 30_000;
    db.trades("PR", N).await;
    let mut cfg = broadcaster_config(&db);
    cfg.replay_page = 10;
    cfg.session.write_timeout = std::time::Duration::from_secs(30);
    let b = broadcaster(cfg).await;
    // A client that asks for everything and reads nothing for a while: the
    // replay stops at a full socket, its next pages still to be read.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let tcp = sock.connect(b.addr).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(
        format!("{}?market=PR&from_seq=0", b.ws()),
        tokio_tungstenite::MaybeTlsStream::Plain(tcp),
    )
    .await
    .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    // Meanwhile the log is pruned (every trade but the newest).
    marketcast::db::prune(&db.url, std::time::Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(recv(&mut ws).await["type"], "subscribed");
    // Whatever had been sent arrives gapless from 1; then the subscription
    // ends, never a silent skip to the newest.
    let mut next = 1;
    let end = loop {
        let v = recv(&mut ws).await;
        match v["type"].as_str() {
            Some("trade") => {
                assert_eq!(v["seq"].as_i64(), Some(next), "gapless: {v}");
                next += 1;
            }
            _ => break v,
        }
    };
    assert!(next < N, "the replay cannot have finished before the prune");
    assert_eq!(
        (
            end["code"].as_str(),
            end["market"].as_str(),
            end["earliest_seq"].as_i64()
        ),
        (Some("history_unavailable"), Some("PR"), Some(N)),
        "{end}"
    );
    // The connection stays open: a new subscribe from the newest works.
    send(
        &mut ws,
        json!({"op": "subscribe", "market": "PR", "from_seq": N - 1, "id": 2}),
    )
    .await;
    let v = recv(&mut ws).await;
    assert_eq!(v["type"], "subscribed", "{v}");
    expect_trades(&mut ws, "PR", N, N).await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_is_503_when_only_listen_is_down() {
    let db = TestDb::new().await;
    // A login of this test's own, so that capping its connections disturbs
    // no other test.
    let role = "mc_listen_only_test";
    let admin = db.client().await;
    admin
        .batch_execute(&format!(
            "DO $$ BEGIN CREATE ROLE {role} LOGIN PASSWORD '{role}' IN ROLE marketcast_broadcaster;
             EXCEPTION WHEN duplicate_object THEN NULL; END $$;
             ALTER ROLE {role} CONNECTION LIMIT -1"
        ))
        .await
        .unwrap();
    let mut cfg = broadcaster_config(&db);
    cfg.db.url = as_role(&db.url, role, role);
    cfg.db.pool_size = 1;
    cfg.hub_pool_size = 1;
    let b = broadcaster(cfg).await;
    let healthz = format!("{}/healthz", b.http());
    // Warm both pools, then allow no new connection, and cut LISTEN: it
    // cannot come back, while the pooled connections still answer.
    let mut ws = connect_ws(&format!("{}?market=none", b.ws())).await;
    let _ = recv(&mut ws).await;
    admin
        .batch_execute(&format!(
            "ALTER ROLE {role} CONNECTION LIMIT 0;
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity
              WHERE usename = '{role}' AND application_name = 'marketcast-listener'"
        ))
        .await
        .unwrap();
    let down = tokio::time::timeout(WAIT, async {
        loop {
            let (st, body) = http("GET", &healthz, &[], None).await;
            if st == 503 {
                return body;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("/healthz reports LISTEN down");
    assert_eq!(
        (
            down["listen"].as_bool(),
            down["database"].as_bool(),
            down["hub"].as_bool()
        ),
        (Some(false), Some(true), Some(true)),
        "{down}"
    );
    // Connections allowed again: LISTEN comes back, and so does 200.
    admin
        .batch_execute(&format!("ALTER ROLE {role} CONNECTION LIMIT -1"))
        .await
        .unwrap();
    assert!(healthy_within(&b, WAIT).await, "/healthz never recovered");
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_move_to_a_grown_live_queue_without_a_gap() {
    let db = TestDb::new().await;
    db.market("GROW").await;
    // The default --live-queue: a market starts with a small queue that the
    // first burst replaces.
    let b = broadcaster(broadcaster_config(&db)).await;
    let mut early = connect_ws(&format!("{}?market=GROW", b.ws())).await;
    assert_eq!(recv(&mut early).await["type"], "subscribed");
    let mut other = connect_ws(&format!("{}?market=GROW", b.ws())).await;
    assert_eq!(recv(&mut other).await["type"], "subscribed");
    db.trades("GROW", 2).await;
    expect_trades(&mut early, "GROW", 1, 2).await;
    expect_trades(&mut other, "GROW", 1, 2).await;
    // A burst far over the first queue's 16 slots, then a trickle: both
    // subscribers follow the new queue, gapless.
    db.trades("GROW", 300).await;
    for i in 0..5 {
        db.trades("GROW", 1).await;
        let _ = i;
    }
    expect_trades(&mut early, "GROW", 3, 307).await;
    expect_trades(&mut other, "GROW", 3, 307).await;
    // One joining after the growth is on the new queue from the start.
    let mut late = connect_ws(&format!("{}?market=GROW", b.ws())).await;
    assert_eq!(recv(&mut late).await["type"], "subscribed");
    db.trades("GROW", 3).await;
    for ws in [&mut early, &mut other, &mut late] {
        expect_trades(ws, "GROW", 308, 310).await;
    }
    b.stop().await;
}
