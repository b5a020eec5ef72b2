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
