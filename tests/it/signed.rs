//! Signed notifications (`sql/0005_signed_notifications.sql`,
//! docs/GUARANTEES.md): the trigger's payload carries the trade and an
//! HMAC-SHA256, and the broadcaster publishes it without a log read only
//! when it verifies, names the market's epoch and is the next seq. Forged,
//! altered, replayed and other-epoch payloads still deliver nothing that is
//! not in the log; the key is hidden from every role but the broadcaster's;
//! rotation loses nothing; and the fast path is really taken.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, NoTls};

use marketcast::protocol::signed::sign;

use crate::support::*;

/// A LISTEN session of the test's own, to capture the trigger's payloads.
struct Capture {
    _client: tokio_postgres::Client,
    rx: mpsc::UnboundedReceiver<String>,
}

impl Capture {
    async fn new(url: &str, shard: i32) -> Capture {
        let (client, mut conn) = tokio_postgres::connect(url, NoTls).await.unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut msgs = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
            while let Some(Ok(m)) = msgs.next().await {
                if let AsyncMessage::Notification(n) = m {
                    if tx.send(n.payload().to_string()).is_err() {
                        return;
                    }
                }
            }
        });
        client
            .batch_execute(&format!("LISTEN marketcast_shard_{shard}"))
            .await
            .unwrap();
        Capture {
            _client: client,
            rx,
        }
    }

    async fn next(&mut self) -> String {
        tokio::time::timeout(WAIT, self.rx.recv())
            .await
            .expect("a notification in time")
            .unwrap()
    }
}

async fn shard_of(c: &tokio_postgres::Client, market: &str) -> i32 {
    c.query_one("SELECT shard FROM markets WHERE id = $1", &[&market])
        .await
        .unwrap()
        .get(0)
}

async fn notify(c: &tokio_postgres::Client, shard: i32, payload: &str) {
    c.execute(
        "SELECT pg_notify($1, $2)",
        &[&format!("marketcast_shard_{shard}"), &payload],
    )
    .await
    .unwrap();
}

/// One trade, its own transaction.
async fn trade(c: &tokio_postgres::Client, market: &str, price: &str) {
    c.execute(
        "INSERT INTO trades (market_id, side, price, qty) VALUES ($1, 'yes', $2::text::numeric, 1)",
        &[&market, &price],
    )
    .await
    .unwrap();
}

/// The body of a signed payload (everything before `,"h":"`).
fn body_of(payload: &str) -> &str {
    &payload[..payload.rfind(",\"h\":\"").expect("a signed payload")]
}

/// The signing key, read as the owner: (id, key).
async fn signing_key(c: &tokio_postgres::Client) -> (i32, Vec<u8>) {
    let r = c
        .query_one(
            "SELECT id, key FROM marketcast_notify_keys WHERE signing",
            &[],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1))
}

/// `marketcast_notification_outcomes_total{outcome}` as the broadcaster's
/// /metrics shows it (the recorder is shared by every server of the test
/// process: compare before and after, and expect at least).
async fn outcome(b: &Server, outcome: &str) -> u64 {
    let (status, body) = http_raw("GET", &format!("{}/metrics", b.http()), &[], None)
        .await
        .unwrap();
    assert_eq!(status, 200);
    let text = String::from_utf8_lossy(&body).to_string();
    let needle = format!("marketcast_notification_outcomes_total{{outcome=\"{outcome}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&needle))
        .map(|v| v.trim().parse::<f64>().unwrap() as u64)
        .unwrap_or(0)
}

/// (1) A payload claiming the next seq with another price and a MAC that does
/// not match (and one naming a key that does not exist) is read from the
/// log like a doorbell: nothing is delivered until the real trade commits,
/// and then the log's version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_mac_claiming_the_next_seq_delivers_only_the_log() {
    let db = TestDb::new().await;
    db.market("F").await;
    let c = db.client().await;
    let shard = shard_of(&c, "F").await;
    let mut cap = Capture::new(&db.url, shard).await;
    trade(&c, "F", "0.5").await;
    let genuine = cap.next().await;
    let b = broadcaster(broadcaster_config(&db)).await;
    let mut ws = connect_ws(&b.ws()).await;
    subscribe(&mut ws, "F", None).await;
    let bad_before = outcome(&b, "bad_mac").await;

    // seq 2 does not exist yet. Same MAC, altered body; then a MAC made
    // with a key of our own under the real key id and under an unknown one.
    let (kid, _) = signing_key(&c).await;
    let forged_body = body_of(&genuine)
        .replace("\"s\" : 1,", "\"s\" : 2,")
        .replace("\"i\" : ", "\"i\" : 9")
        .replace("0.5000", "0.9999");
    let kept_mac = format!("{forged_body}{}", &genuine[body_of(&genuine).len()..]);
    let own_key = sign(&[42u8; 32], &forged_body);
    let unknown = sign(
        &[42u8; 32],
        &forged_body.replace(&format!("\"k\" : {kid}"), "\"k\" : 7777"),
    );
    for p in [&kept_mac, &own_key, &unknown] {
        notify(&c, shard, p).await;
    }
    expect_silence(&mut ws, Duration::from_millis(700)).await;
    trade(&c, "F", "0.25").await;
    let got = expect_trades(&mut ws, "F", 2, 2).await;
    assert_eq!(got[0]["price"], "0.2500", "the log's trade: {}", got[0]);
    expect_silence(&mut ws, Duration::from_millis(300)).await;
    assert!(
        outcome(&b, "bad_mac").await >= bad_before + 2,
        "both bad MACs were counted"
    );
    b.stop().await;
}

/// (2) Genuine payloads captured and sent again, out of order, before and
/// after later trades: each trade arrives once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_valid_payloads_neither_duplicate_nor_reorder() {
    let db = TestDb::new().await;
    db.market("R").await;
    let c = db.client().await;
    let shard = shard_of(&c, "R").await;
    let b = broadcaster(broadcaster_config(&db)).await;
    let mut ws = connect_ws(&b.ws()).await;
    subscribe(&mut ws, "R", Some(0)).await;
    // Sessions drop seqs they already sent, so the trade stream alone would
    // not show a hub that republished a replay; the hub's running volume
    // (in its ticker frames) would.
    let mut tk = connect_ws(&b.ws()).await;
    send(
        &mut tk,
        serde_json::json!({"op": "subscribe", "market": "R", "mode": "ticker", "interval_ms": 100, "id": 2}),
    )
    .await;
    assert_eq!(recv(&mut tk).await["type"], "subscribed");
    let mut cap = Capture::new(&db.url, shard).await;
    let mut captured = Vec::new();
    for p in ["0.1", "0.2", "0.3"] {
        trade(&c, "R", p).await;
        captured.push(cap.next().await);
    }
    let first = expect_trades(&mut ws, "R", 1, 3).await;
    for p in captured.iter().rev().chain(captured.iter()) {
        notify(&c, shard, p).await;
    }
    expect_silence(&mut ws, Duration::from_millis(500)).await;
    trade(&c, "R", "0.4").await;
    trade(&c, "R", "0.5").await;
    for p in &captured {
        notify(&c, shard, p).await;
    }
    let later = expect_trades(&mut ws, "R", 4, 5).await;
    expect_silence(&mut ws, Duration::from_millis(500)).await;
    let prices: Vec<&str> = first
        .iter()
        .chain(&later)
        .map(|t| t["price"].as_str().unwrap())
        .collect();
    assert_eq!(prices, ["0.1000", "0.2000", "0.3000", "0.4000", "0.5000"]);
    // Folds up to seq 5: five trades of qty 1, whatever was replayed.
    let last = loop {
        let f = recv(&mut tk).await;
        assert_eq!(f["type"], "ticker", "{f}");
        if f["to_seq"] == 5 {
            break f;
        }
    };
    assert_eq!(last["volume"], 5, "{last}");
    b.stop().await;
}

/// (3) A market's log reset (same id, new epoch, seqs from 1 again): a valid
/// payload captured from the old log for seq 1 is the next seq of the new
/// one, and must still not be published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_payload_of_another_epoch_is_not_published() {
    let db = TestDb::new().await;
    db.market("E").await;
    let c = db.client().await;
    let shard = shard_of(&c, "E").await;
    let mut cap = Capture::new(&db.url, shard).await;
    trade(&c, "E", "0.9").await;
    let old = cap.next().await;
    // The reset: only the owner, with the append-only triggers bypassed.
    c.batch_execute(
        "SET session_replication_role = replica;
         DELETE FROM trades WHERE market_id = 'E';
         DELETE FROM markets WHERE id = 'E';
         SET session_replication_role = DEFAULT;
         INSERT INTO markets (id) VALUES ('E');",
    )
    .await
    .unwrap();
    let b = broadcaster(broadcaster_config(&db)).await;
    let mut ws = connect_ws(&b.ws()).await;
    let sub = subscribe(&mut ws, "E", Some(0)).await;
    assert_eq!(sub["head_seq"], 0);
    assert!(!old.contains(sub["epoch"].as_str().unwrap()), "{old}");
    let stale_before = outcome(&b, "stale_epoch").await;
    notify(&c, shard, &old).await;
    expect_silence(&mut ws, Duration::from_millis(700)).await;
    assert!(outcome(&b, "stale_epoch").await > stale_before);
    trade(&c, "E", "0.1").await;
    let got = expect_trades(&mut ws, "E", 1, 1).await;
    assert_eq!(got[0]["price"], "0.1000", "the new log's trade: {}", got[0]);
    expect_silence(&mut ws, Duration::from_millis(300)).await;
    b.stop().await;
}

/// (4) Only the owner and marketcast_broadcaster read the keys; only the
/// owner rotates or prunes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_broadcaster_reads_the_keys() {
    let db = TestDb::new().await;
    ensure_roles(&server_url()).await;
    let code = |e: tokio_postgres::Error| e.code().map(|c| c.code().to_string());
    let denied = Some("42501".to_string());
    let w = connect(&db.writer_url()).await;
    for sql in [
        "SELECT key FROM marketcast_notify_keys",
        "SELECT count(*) FROM marketcast_notify_keys",
        "SELECT ipad FROM marketcast_notify_keys",
        "SELECT marketcast_rotate_notify_key()",
        "SELECT marketcast_prune_notify_keys()",
        "DELETE FROM marketcast_notify_keys",
        "INSERT INTO marketcast_notify_keys (key, ipad, opad, signing) VALUES ('\\x00', '\\x00', '\\x00', true)",
    ] {
        let e = w.batch_execute(sql).await.expect_err(sql);
        assert_eq!(code(e), denied, "writer: {sql}");
    }
    let b = connect(&db.broadcaster_url()).await;
    let n: i64 = b
        .query_one(
            "SELECT count(*) FROM marketcast_notify_keys WHERE octet_length(key) = 32",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1, "the broadcaster reads the key");
    for sql in [
        "SELECT ipad FROM marketcast_notify_keys",
        "SELECT marketcast_rotate_notify_key()",
        "SELECT marketcast_prune_notify_keys()",
        "UPDATE marketcast_notify_keys SET signing = false",
    ] {
        let e = b.batch_execute(sql).await.expect_err(sql);
        assert_eq!(code(e), denied, "broadcaster: {sql}");
    }
}

/// (5) The fast path is taken: trades committed one by one while a
/// subscriber follows are published from their payloads, counted as such.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trades_are_published_from_their_payloads() {
    let db = TestDb::new().await;
    db.market("P").await;
    let c = db.client().await;
    let b = broadcaster(broadcaster_config(&db)).await;
    let mut ws = connect_ws(&b.ws()).await;
    subscribe(&mut ws, "P", Some(0)).await;
    // The join's own read (from 0) is done before the first trade.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = outcome(&b, "published").await;
    for _ in 0..20 {
        trade(&c, "P", "0.5").await;
    }
    expect_trades(&mut ws, "P", 1, 20).await;
    let published = outcome(&b, "published").await - before;
    assert!(
        published >= 18,
        "{published} of 20 trades published from their payloads"
    );
    b.stop().await;
}

/// A verified payload encodes to exactly the bytes of its log row's frame,
/// for every price form and timestamp the trigger can write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_frame_is_the_log_row_frame() {
    use marketcast::protocol::signed::{verify, NotifyKeys};
    let db = TestDb::new().await;
    db.market("B").await;
    let c = db.client().await;
    let shard = shard_of(&c, "B").await;
    let mut cap = Capture::new(&db.url, shard).await;
    let (kid, key) = signing_key(&c).await;
    let keys = NotifyKeys::new([(kid, key)]);
    let prices = [
        "0.5", "0.1234", "0.0001", "0.9999", "0.12345", "0.00005", ".7", "0.10",
    ];
    for (i, p) in prices.iter().enumerate() {
        let side = if i % 2 == 0 { "yes" } else { "no" };
        c.execute(
            "INSERT INTO trades (market_id, side, price, qty, created_at) VALUES ('B', $1, $2::text::numeric, $3, '1999-01-01')",
            &[&side, p, &(i as i64 * 999_999 + 1)],
        )
        .await
        .unwrap();
    }
    let pool = marketcast::db::pool(
        &db.broadcaster_url(),
        1,
        Duration::from_secs(10),
        "test-read",
    )
    .unwrap();
    let pc = pool.get().await.unwrap();
    let rows = marketcast::db::log::trades_after(&pc, "B", 0, None, 100)
        .await
        .unwrap();
    assert_eq!(rows.len(), prices.len());
    for row in rows {
        let payload = cap.next().await;
        let signed = verify(&payload, &keys).expect("verifies");
        let from_payload = signed.trade.as_ref().encode().frame;
        let from_row = row.as_ref().encode().frame;
        assert_eq!(
            from_payload,
            from_row,
            "payload {payload} vs row {:?}",
            String::from_utf8_lossy(&row.to_json())
        );
    }
}

/// The contract's reference fallback: a payload that would exceed 7999
/// bytes (here through a market whose creator chose a long epoch) is the
/// plain doorbell, and the trade still arrives, read from the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_payload_falls_back_to_the_doorbell() {
    let db = TestDb::new().await;
    let c = db.client().await;
    c.execute(
        "INSERT INTO markets (id, epoch) VALUES ('BIGE', repeat('e', 8000))",
        &[],
    )
    .await
    .unwrap();
    let shard = shard_of(&c, "BIGE").await;
    let mut cap = Capture::new(&db.url, shard).await;
    let b = broadcaster(broadcaster_config(&db)).await;
    let mut ws = connect_ws(&b.ws()).await;
    subscribe(&mut ws, "BIGE", None).await;
    let plain_before = outcome(&b, "doorbell").await;
    trade(&c, "BIGE", "0.3").await;
    let p: Value = serde_json::from_str(&cap.next().await).unwrap();
    assert_eq!(p, serde_json::json!({"m": "BIGE", "s": 1}));
    let got = expect_trades(&mut ws, "BIGE", 1, 1).await;
    assert_eq!(got[0]["price"], "0.3000");
    assert!(outcome(&b, "doorbell").await > plain_before);
    b.stop().await;
}

/// A key rotation (and the prune of the old key) while trades flow and two
/// broadcasters serve them: every trade arrives once and in order, and the
/// fast path resumes under the new key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trades_keep_flowing_across_a_key_rotation() {
    let db = TestDb::new().await;
    db.market("K").await;
    let c = db.client().await;
    let b1 = broadcaster(broadcaster_config(&db)).await;
    let b2 = broadcaster(broadcaster_config(&db)).await;
    let mut w1 = connect_ws(&b1.ws()).await;
    let mut w2 = connect_ws(&b2.ws()).await;
    subscribe(&mut w1, "K", Some(0)).await;
    subscribe(&mut w2, "K", Some(0)).await;
    let writer_db = db.url.clone();
    let flow = tokio::spawn(async move {
        let c = connect(&writer_db).await;
        for _ in 0..300 {
            trade(&c, "K", "0.5").await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (old, _) = signing_key(&c).await;
    let new: i32 = c
        .query_one("SELECT marketcast_rotate_notify_key()", &[])
        .await
        .unwrap()
        .get(0);
    assert_ne!(old, new);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let pruned: i64 = c
        .query_one("SELECT marketcast_prune_notify_keys()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(pruned, 1);
    // After the old key is gone: the broadcasters reload on the first
    // payload naming the new key (at most once a second).
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let before = outcome(&b1, "published").await;
    flow.await.unwrap();
    expect_trades(&mut w1, "K", 1, 300).await;
    expect_trades(&mut w2, "K", 1, 300).await;
    expect_silence(&mut w1, Duration::from_millis(300)).await;
    let after = outcome(&b1, "published").await;
    assert!(after > before, "published from payloads under the new key");
    b1.stop().await;
    b2.stop().await;
}
