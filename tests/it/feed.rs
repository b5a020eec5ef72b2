//! Contract 1.1's WebSocket read side (PROTOCOL-1.1.md §2): several markets
//! in one op, the new `subscribed` fields and the order of checks, `recent`,
//! heads, ticker mode, the `?market=` URL forms. Written from the contract,
//! independently of the implementation: every test asserts the exact replies
//! in order, the exact codes, and gapless spans checked against the log.

use std::collections::BTreeSet;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

// ---------------------------------------------------------------- helpers

/// Send `op` and return the next message.
async fn ask(ws: &mut Ws, op: Value) -> Value {
    send(ws, op).await;
    recv(ws).await
}

/// `v` is exactly an `error` with `code`, echoing `id`, naming `market` (or
/// carrying no `market` at all when `None`), with a human message.
#[track_caller]
fn assert_error(v: &Value, id: Value, market: Option<&str>, code: &str) {
    assert_eq!(
        (v["type"].as_str(), v["code"].as_str()),
        (Some("error"), Some(code)),
        "expected error {code}: {v}"
    );
    assert_eq!(v.get("id").cloned().unwrap_or(Value::Null), id, "id: {v}");
    match market {
        Some(m) => assert_eq!(v["market"], m, "market: {v}"),
        None => assert!(v.get("market").is_none(), "no market expected: {v}"),
    }
    assert!(v["message"].is_string(), "a message: {v}");
}

/// `v` is a `bad_request` echoing `id` for a single-form op about `market`:
/// whether such an error names the market is not said (§2.8 lists the
/// per-market checks, bad_request is not one), so only a wrong one fails.
#[track_caller]
fn assert_bad_request(v: &Value, id: Value, market: &str) {
    assert_eq!(
        (v["type"].as_str(), v["code"].as_str()),
        (Some("error"), Some("bad_request")),
        "expected bad_request: {v}"
    );
    assert_eq!(v.get("id").cloned().unwrap_or(Value::Null), id, "id: {v}");
    if let Some(m) = v.get("market") {
        assert_eq!(m, market, "{v}");
    }
}

/// `v` is a `subscribed` for `market` echoing `id`.
#[track_caller]
fn assert_subscribed(v: &Value, id: Value, market: &str) {
    assert_eq!(v["type"], "subscribed", "{v}");
    assert_eq!(v["market"], market, "{v}");
    assert_eq!(v.get("id").cloned().unwrap_or(Value::Null), id, "{v}");
    assert_eq!(v["protocol"], "1.1", "{v}");
}

/// A ping whose pong must be the very next message: proves that whatever
/// was asked before was answered by exactly the messages already read.
async fn nothing_else_pending(ws: &mut Ws, id: &str) {
    send(ws, json!({"op": "ping", "id": id})).await;
    assert_eq!(recv(ws).await, json!({"type": "pong", "id": id}));
}

/// The next text message, or `None` once `deadline` passes. Panics on close.
async fn recv_until(ws: &mut Ws, deadline: Instant) -> Option<Value> {
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return None,
            Ok(Some(Ok(Message::Text(t)))) => {
                let v: Value = serde_json::from_str(&t).expect("server sends JSON");
                crate::contract::check_ws(&v);
                return Some(v);
            }
            Ok(Some(Ok(Message::Close(c)))) => panic!("unexpected close: {c:?}"),
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(e))) => panic!("connection failed: {e}"),
            Ok(None) => panic!("connection ended"),
        }
    }
}

/// A connection whose receive buffer is `rcvbuf` bytes, so that a client
/// that stops reading stalls the server's writes quickly.
async fn connect_small(b: &Server, url: &str, rcvbuf: u32) -> Ws {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(rcvbuf).unwrap();
    let tcp = sock.connect(b.addr).await.unwrap();
    tokio::time::timeout(
        WAIT,
        tokio_tungstenite::client_async(url, tokio_tungstenite::MaybeTlsStream::Plain(tcp)),
    )
    .await
    .expect("ws connect in time")
    .expect("ws connect")
    .0
}

/// Trades with varied sides, prices and quantities: trade number `g` (1, 2,
/// ...) of a market is always the same, so folds test every field.
const VARIED: &str = "INSERT INTO trades (market_id, side, price, qty)
     SELECT $1, CASE WHEN g % 3 = 0 THEN 'no' ELSE 'yes' END,
            ((g * 37) % 9999 + 1) / 10000.0, 1 + (g * 7) % 50
       FROM generate_series($2::int8, $3::int8) g";

/// Insert varied trades number `first..first + n` into `market`, one transaction.
async fn varied_trades(c: &tokio_postgres::Client, market: &str, first: i64, n: i64) {
    c.execute(VARIED, &[&market, &first, &(first + n - 1)])
        .await
        .unwrap();
}

/// A task inserting `total` varied trades (numbered from `first`) into
/// `market` at `per_sec`, in small batches every 10 ms: by any moment t after
/// the start, `per_sec * t` have been committed (or all of them), whatever the
/// latency of one insert.
fn insert_trades_at_rate(
    url: &str,
    market: &str,
    first: i64,
    per_sec: u64,
    total: i64,
) -> tokio::task::JoinHandle<()> {
    let (url, market) = (url.to_string(), market.to_string());
    tokio::spawn(async move {
        let c = connect(&url).await;
        let start = Instant::now();
        let mut done = 0i64;
        while done < total {
            let due = ((start.elapsed().as_millis() as u64 * per_sec / 1000) as i64).min(total);
            if due > done {
                varied_trades(&c, &market, first + done, due - done).await;
                done = due;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
}

/// One trade of the log as a ticker folds it.
struct LogTrade {
    seq: i64,
    /// The YES price in ten-thousandths.
    yes: i64,
    qty: i64,
    /// The market's volume after this trade.
    volume: i64,
    /// `created_at` as the contract writes `ts`.
    ts: String,
}

/// A market's whole log (never pruned: index `i` holds seq `i + 1`).
async fn log_of(db: &TestDb, market: &str) -> Vec<LogTrade> {
    let rows = db
        .client()
        .await
        .query(
            "SELECT seq, side, price::text AS price, qty,
                    to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') AS ts
               FROM trades WHERE market_id = $1 ORDER BY seq",
            &[&market],
        )
        .await
        .unwrap();
    let mut volume = 0;
    let mut out = Vec::with_capacity(rows.len());
    for (i, r) in rows.iter().enumerate() {
        let seq: i64 = r.get("seq");
        assert_eq!(seq, i as i64 + 1, "log_of needs an unpruned log");
        let price: String = r.get("price");
        let ticks: i64 = price.replace('.', "").parse().unwrap();
        let side: String = r.get("side");
        let qty: i64 = r.get("qty");
        volume += qty;
        out.push(LogTrade {
            seq,
            yes: if side == "yes" { ticks } else { 10_000 - ticks },
            qty,
            volume,
            ts: r.get("ts"),
        });
    }
    out
}

fn price4(ticks: i64) -> String {
    format!("{}.{:04}", ticks / 10_000, ticks % 10_000)
}

/// The `ticker` frame that folds exactly `from..=to` of `log` (§2.6).
fn fold_from_log(log: &[LogTrade], market: &str, from: i64, to: i64) -> Value {
    assert!(
        1 <= from && from <= to && to as usize <= log.len(),
        "{from}..{to}"
    );
    let span = &log[from as usize - 1..to as usize];
    assert_eq!((span[0].seq, span[span.len() - 1].seq), (from, to));
    let last = &span[span.len() - 1];
    json!({
        "type": "ticker",
        "market": market,
        "from_seq": from,
        "to_seq": to,
        "count": to - from + 1,
        "qty": span.iter().map(|t| t.qty).sum::<i64>(),
        "volume": last.volume,
        "open": price4(span[0].yes),
        "high": price4(span.iter().map(|t| t.yes).max().unwrap()),
        "low": price4(span.iter().map(|t| t.yes).min().unwrap()),
        "last_price": price4(last.yes),
        "ts": last.ts,
    })
}

/// `frame` folds exactly what the log says for its span (fields beyond the
/// contract's are ignored).
#[track_caller]
fn assert_folds(frame: &Value, log: &[LogTrade], market: &str) {
    let from = frame["from_seq"].as_i64().expect("from_seq");
    let to = frame["to_seq"].as_i64().expect("to_seq");
    let want = fold_from_log(log, market, from, to);
    let got: serde_json::Map<String, Value> = want
        .as_object()
        .unwrap()
        .keys()
        .map(|k| (k.clone(), frame.get(k).cloned().unwrap_or(Value::Null)))
        .collect();
    assert_eq!(
        Value::Object(got),
        want,
        "frame {from}..{to} against the log"
    );
}

/// Read `ticker` frames of `market` (nothing else may arrive) until one
/// reaches `to_seq`; each with its arrival time.
async fn collect_tickers(ws: &mut Ws, market: &str, to_seq: i64) -> Vec<(Instant, Value)> {
    let mut out: Vec<(Instant, Value)> = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let v = recv(ws).await;
            let at = Instant::now();
            assert_eq!(
                (v["type"].as_str(), v["market"].as_str()),
                (Some("ticker"), Some(market)),
                "only ticker frames: {v}"
            );
            let to = v["to_seq"].as_i64().expect("to_seq");
            out.push((at, v));
            if to >= to_seq {
                break;
            }
        }
    })
    .await
    .expect("ticker frames up to the head in time");
    out
}

/// Spans are contiguous from `from_seq + 1` and `count` matches.
#[track_caller]
fn assert_contiguous(frames: &[(Instant, Value)], from_seq: i64, to_seq: i64) {
    let mut next = from_seq + 1;
    for (_, f) in frames {
        let (a, b) = (
            f["from_seq"].as_i64().unwrap(),
            f["to_seq"].as_i64().unwrap(),
        );
        assert_eq!(a, next, "contiguous spans: {f}");
        assert!(b >= a, "{f}");
        assert_eq!(f["count"].as_i64(), Some(b - a + 1), "{f}");
        next = b + 1;
    }
    assert_eq!(next - 1, to_seq, "the last frame ends at the head");
}

async fn head_of(db: &TestDb, market: &str) -> i64 {
    db.client()
        .await
        .query_one("SELECT last_seq FROM markets WHERE id = $1", &[&market])
        .await
        .unwrap()
        .get(0)
}

async fn epoch_of(db: &TestDb, market: &str) -> String {
    db.client()
        .await
        .query_one("SELECT epoch FROM markets WHERE id = $1", &[&market])
        .await
        .unwrap()
        .get(0)
}

/// A new market (`prefix` and a number) on a shard that none of `served` is
/// on, and that shard: a broadcaster serving every other shard answers it
/// `wrong_shard` and serves `served`.
async fn market_off_shards(db: &TestDb, prefix: &str, served: &[&str]) -> (String, u32) {
    let mut used = BTreeSet::new();
    for m in served {
        used.insert(shard_of(db, m).await);
    }
    for i in 0..200 {
        let id = format!("{prefix}{i}");
        db.market(&id).await;
        let s = shard_of(db, &id).await;
        if !used.contains(&s) {
            return (id, s);
        }
    }
    panic!("no free shard for {served:?}")
}

/// Every shard but `skip`.
fn all_shards_but(skip: u32) -> Option<BTreeSet<u32>> {
    Some((0..16).filter(|s| *s != skip).collect())
}

async fn shard_of(db: &TestDb, market: &str) -> u32 {
    let s: i32 = db
        .client()
        .await
        .query_one("SELECT shard FROM markets WHERE id = $1", &[&market])
        .await
        .unwrap()
        .get(0);
    s as u32
}

/// Prune every trade of `market` before seq `keep_from` (as the superuser,
/// through the maintenance function): the trades before it must have been
/// committed at least a millisecond earlier than it (see [`two_batches`]).
async fn prune_before(db: &TestDb, market: &str, keep_from: i64) {
    let c = db.client().await;
    c.query_one(
        "SELECT marketcast_prune((SELECT created_at FROM trades WHERE market_id = $1 AND seq = $2))",
        &[&market, &keep_from],
    )
    .await
    .unwrap();
    let earliest: i64 = c
        .query_one(
            "SELECT min(seq) FROM trades WHERE market_id = $1",
            &[&market],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        earliest, keep_from,
        "the prune kept exactly from {keep_from}"
    );
}

/// `first` trades, then (a few milliseconds later) `second` more, so that the
/// first batch can be pruned on its own.
async fn two_batches(db: &TestDb, market: &str, first: i64, second: i64) {
    db.trades(market, first).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    db.trades(market, second).await;
}

// ---------------------------------------------------------------- §2.4 several markets

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_market_subscribe_answers_each_entry_in_order() {
    let db = TestDb::new().await;
    db.market("MA").await;
    db.market("MB").await;
    db.market("MD").await;
    db.trades("MA", 10).await;
    db.trades("MB", 3).await;
    let b = broadcaster(broadcaster_config(&db)).await;
    let mut ws = connect_ws(&b.ws()).await;
    send(
        &mut ws,
        json!({"op": "subscribe", "markets": [{"market": "MA", "from_seq": 4}, {"market": "MB"}, {"market": "MC"}], "id": 1}),
    )
    .await;
    // Everything up to the three replies and MA's replay, in arrival order.
    let mut seen = Vec::new();
    let (mut replies, mut last_ma) = (0, 4);
    while replies < 3 || last_ma < 10 {
        let v = recv(&mut ws).await;
        if v["type"] == "trade" {
            assert_eq!(v["market"], "MA", "only MA owes trades: {v}");
            assert_eq!(v["seq"].as_i64(), Some(last_ma + 1), "gapless: {v}");
            last_ma += 1;
        } else {
            replies += 1;
        }
        seen.push(v);
    }
    let replies: Vec<&Value> = seen.iter().filter(|v| v["type"] != "trade").collect();
    assert_subscribed(replies[0], json!(1), "MA");
    assert_eq!(
        (
            replies[0]["head_seq"].as_i64(),
            replies[0]["from_seq"].as_i64()
        ),
        (Some(10), Some(4)),
        "{}",
        replies[0]
    );
    assert_subscribed(replies[1], json!(1), "MB");
    assert_eq!(
        (
            replies[1]["head_seq"].as_i64(),
            replies[1]["from_seq"].as_i64()
        ),
        (Some(3), Some(3)),
        "{}",
        replies[1]
    );
    assert_error(replies[2], json!(1), Some("MC"), "unknown_market");
    // MA's subscribed precedes its first trade.
    let first_trade = seen.iter().position(|v| v["type"] == "trade").unwrap();
    assert_eq!(seen[0]["market"], "MA");
    assert!(first_trade > 0);
    nothing_else_pending(&mut ws, "p1").await;

    // A market listed twice: the second entry is already_subscribed.
    send(
        &mut ws,
        json!({"op": "subscribe", "markets": [{"market": "MD"}, {"market": "MD", "from_seq": 0}], "id": "twice"}),
    )
    .await;
    assert_subscribed(&recv(&mut ws).await, json!("twice"), "MD");
    assert_error(
        &recv(&mut ws).await,
        json!("twice"),
        Some("MD"),
        "already_subscribed",
    );
    nothing_else_pending(&mut ws, "p2").await;

    // Live trades follow on every subscribed market.
    db.trades("MB", 2).await;
    expect_trades(&mut ws, "MB", 4, 5).await;

    // Several markets in one unsubscribe: one reply each, in order.
    send(
        &mut ws,
        json!({"op": "unsubscribe", "markets": ["MA", "MZ"], "id": 2}),
    )
    .await;
    let v = recv(&mut ws).await;
    assert_eq!(
        (v["type"].as_str(), v["id"].as_i64(), v["market"].as_str()),
        (Some("unsubscribed"), Some(2), Some("MA")),
        "{v}"
    );
    assert_error(&recv(&mut ws).await, json!(2), Some("MZ"), "not_subscribed");
    nothing_else_pending(&mut ws, "p3").await;
    // MA is gone, MB and MD stay.
    db.trades("MA", 1).await;
    db.trades("MD", 1).await;
    expect_trades(&mut ws, "MD", 1, 1).await;
    db.trades("MB", 1).await;
    expect_trades(&mut ws, "MB", 6, 6).await;
    expect_silence(&mut ws, Duration::from_millis(300)).await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_market_whole_op_checks_subscribe_nothing() {
    let db = TestDb::new().await;
    for m in ["WA", "WB", "WC"] {
        db.market(m).await;
    }
    let mut cfg = broadcaster_config(&db);
    cfg.session.max_subscriptions = 2;
    let b = broadcaster(cfg).await;
    let mut ws = connect_ws(&b.ws()).await;
    let bad = [
        json!({"op": "subscribe", "markets": [], "id": 10}),
        json!({"op": "subscribe", "markets": "WA", "id": 11}),
        json!({"op": "subscribe", "markets": {"market": "WA"}, "id": 12}),
        json!({"op": "subscribe", "markets": [{"market": "WA"}, 5], "id": 13}),
        json!({"op": "subscribe", "markets": [{"market": "WA"}, "WB"], "id": 14}),
        json!({"op": "subscribe", "markets": [{"market": "WA"}, {"from_seq": 1}], "id": 15}),
        json!({"op": "subscribe", "markets": [{"market": "WA"}, {"market": 7}], "id": 16}),
        json!({"op": "subscribe", "markets": [{"market": "WA"}, {"market": "WB", "from_seq": -1}], "id": 17}),
        json!({"op": "subscribe", "markets": [{"market": "WA"}, {"market": "WB", "mode": "foo"}], "id": 18}),
        json!({"op": "subscribe", "markets": [{"market": "WA"}, {"market": "WB", "heads": "yes"}], "id": 19}),
        json!({"op": "subscribe", "markets": [{"market": "WA"}, {"market": "WB", "recent": 0}], "id": 20}),
        json!({"op": "subscribe", "markets": [{"market": "WA"}, {"market": "WB", "mode": "ticker", "interval_ms": 10}], "id": 21}),
        // `markets` beside a top-level field of a single subscribe.
        json!({"op": "subscribe", "market": "WC", "markets": [{"market": "WA"}], "id": 22}),
        json!({"op": "subscribe", "from_seq": 0, "markets": [{"market": "WA"}], "id": 23}),
        json!({"op": "subscribe", "heads": true, "markets": [{"market": "WA"}], "id": 24}),
        json!({"op": "subscribe", "recent": 5, "markets": [{"market": "WA"}], "id": 25}),
        json!({"op": "subscribe", "mode": "trades", "markets": [{"market": "WA"}], "id": 26}),
    ];
    for op in bad {
        let id = op["id"].clone();
        let v = ask(&mut ws, op.clone()).await;
        assert_error(&v, id, None, "bad_request");
        nothing_else_pending(&mut ws, "one reply").await;
    }
    // More entries than --max-subscriptions: one too_many_subscriptions.
    let v = ask(
        &mut ws,
        json!({"op": "subscribe", "markets": [{"market": "WA"}, {"market": "WB"}, {"market": "WC"}], "id": 30}),
    )
    .await;
    assert_error(&v, json!(30), None, "too_many_subscriptions");
    nothing_else_pending(&mut ws, "one reply").await;
    // Nothing was subscribed by any of them: both single subscribes succeed
    // (the room is still 2) and trades of the third market never arrive.
    assert_subscribed(
        &ask(
            &mut ws,
            json!({"op": "subscribe", "market": "WA", "id": 31}),
        )
        .await,
        json!(31),
        "WA",
    );
    assert_subscribed(
        &ask(
            &mut ws,
            json!({"op": "subscribe", "market": "WB", "id": 32}),
        )
        .await,
        json!(32),
        "WB",
    );
    // The room is now 0: a one-entry op passes the whole-op checks and its
    // entry is refused for the connection's room.
    let v = ask(
        &mut ws,
        json!({"op": "subscribe", "markets": [{"market": "WC"}], "id": 33}),
    )
    .await;
    assert_error(&v, json!(33), Some("WC"), "too_many_subscriptions");
    // Whole-op checks of unsubscribe: 1..max_subscriptions strings.
    for op in [
        json!({"op": "unsubscribe", "markets": [], "id": 40}),
        json!({"op": "unsubscribe", "markets": "WA", "id": 41}),
        json!({"op": "unsubscribe", "markets": ["WA", 1], "id": 42}),
        json!({"op": "unsubscribe", "markets": ["WA", "WB", "WC"], "id": 43}),
        json!({"op": "unsubscribe", "market": "WA", "markets": ["WB"], "id": 44}),
    ] {
        let id = op["id"].clone();
        let v = ask(&mut ws, op.clone()).await;
        assert_error(&v, id, None, "bad_request");
        nothing_else_pending(&mut ws, "one reply").await;
    }
    // Still subscribed to exactly WA and WB.
    db.trades("WC", 1).await;
    db.trades("WA", 2).await;
    expect_trades(&mut ws, "WA", 1, 2).await;
    db.trades("WB", 1).await;
    expect_trades(&mut ws, "WB", 1, 1).await;
    expect_silence(&mut ws, Duration::from_millis(300)).await;
    b.stop().await;
}

// ---------------------------------------------------------------- §2.8 subscribed and errors

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribed_carries_the_1_1_fields_and_every_error_names_its_market() {
    let db = TestDb::new().await;
    for m in ["F1", "F2", "F3", "F4", "F5"] {
        db.market(m).await;
    }
    two_batches(&db, "F5", 5, 5).await;
    prune_before(&db, "F5", 6).await;
    db.trades("F1", 5).await;
    let (fw, fw_shard) = market_off_shards(&db, "FW", &["F1", "F2", "F3", "F4", "F5"]).await;
    let mut cfg = broadcaster_config(&db);
    cfg.shards = all_shards_but(fw_shard);
    cfg.session.max_subscriptions = 4;
    let b = broadcaster(cfg).await;
    let mut ws = connect_ws(&b.ws()).await;

    // from_seq as requested; mode, heads, protocol; no ticker or head fields.
    let v = ask(
        &mut ws,
        json!({"op": "subscribe", "market": "F1", "from_seq": 2, "id": 1}),
    )
    .await;
    assert_subscribed(&v, json!(1), "F1");
    assert_eq!(
        (
            v["head_seq"].as_i64(),
            v["from_seq"].as_i64(),
            v["mode"].as_str(),
            v["heads"].as_bool()
        ),
        (Some(5), Some(2), Some("trades"), Some(false)),
        "{v}"
    );
    assert!(v.get("head_interval_ms").is_none(), "{v}");
    assert!(v.get("interval_ms").is_none(), "{v}");
    expect_trades(&mut ws, "F1", 3, 5).await;
    // Without from_seq: from_seq is the head. heads:false is the default.
    let v = ask(
        &mut ws,
        json!({"op": "subscribe", "market": "F2", "heads": false, "id": "two"}),
    )
    .await;
    assert_subscribed(&v, json!("two"), "F2");
    assert_eq!(
        (
            v["head_seq"].as_i64(),
            v["from_seq"].as_i64(),
            v["heads"].as_bool()
        ),
        (Some(0), Some(0), Some(false)),
        "{v}"
    );
    assert!(v.get("head_interval_ms").is_none(), "{v}");
    // heads:true at the default --head-interval (5s).
    let v = ask(
        &mut ws,
        json!({"op": "subscribe", "market": "F3", "heads": true, "id": 3}),
    )
    .await;
    assert_subscribed(&v, json!(3), "F3");
    assert_eq!(
        (v["heads"].as_bool(), v["head_interval_ms"].as_i64()),
        (Some(true), Some(5000)),
        "{v}"
    );
    // (Resubscribed without heads, so that no head interrupts what follows.)
    let v = ask(
        &mut ws,
        json!({"op": "unsubscribe", "market": "F3", "id": 3}),
    )
    .await;
    assert_eq!(v["type"], "unsubscribed", "{v}");
    assert_subscribed(
        &ask(&mut ws, json!({"op": "subscribe", "market": "F3", "id": 3})).await,
        json!(3),
        "F3",
    );
    // Ticker: mode and the default interval.
    let v = ask(
        &mut ws,
        json!({"op": "subscribe", "market": "F4", "mode": "ticker", "id": 4}),
    )
    .await;
    assert_subscribed(&v, json!(4), "F4");
    assert_eq!(
        (
            v["mode"].as_str(),
            v["interval_ms"].as_i64(),
            v["heads"].as_bool()
        ),
        (Some("ticker"), Some(1000), Some(false)),
        "{v}"
    );

    // Every error answering a subscribe or unsubscribe names its market.
    let cases = [
        (
            json!({"op": "subscribe", "market": "F1", "id": 10}),
            "F1",
            "already_subscribed",
        ),
        (
            json!({"op": "subscribe", "market": "F5", "id": 11}),
            "F5",
            "too_many_subscriptions",
        ),
        (
            json!({"op": "unsubscribe", "market": "F5", "id": 12}),
            "F5",
            "not_subscribed",
        ),
    ];
    for (op, market, code) in cases {
        let id = op["id"].clone();
        assert_error(&ask(&mut ws, op).await, id, Some(market), code);
    }
    let v = ask(
        &mut ws,
        json!({"op": "unsubscribe", "market": "F4", "id": 13}),
    )
    .await;
    assert_eq!(
        (v["type"].as_str(), v["market"].as_str()),
        (Some("unsubscribed"), Some("F4")),
        "{v}"
    );
    let cases = [
        (
            json!({"op": "subscribe", "market": "NOPE", "id": 14}),
            "NOPE",
            "unknown_market",
        ),
        (
            json!({"op": "subscribe", "market": fw, "id": 15}),
            fw.as_str(),
            "wrong_shard",
        ),
        (
            json!({"op": "subscribe", "market": "F5", "epoch": "not-it", "id": 16}),
            "F5",
            "epoch_mismatch",
        ),
        (
            json!({"op": "subscribe", "market": "F5", "from_seq": 1, "id": 17}),
            "F5",
            "history_unavailable",
        ),
    ];
    for (op, market, code) in cases {
        let id = op["id"].clone();
        let v = ask(&mut ws, op).await;
        assert_error(&v, id, Some(market), code);
        match code {
            "wrong_shard" => assert_eq!(v["shard"], fw_shard, "{v}"),
            "epoch_mismatch" => assert_eq!(v["epoch"], epoch_of(&db, "F5").await, "{v}"),
            "history_unavailable" => assert_eq!(v["earliest_seq"], 6, "{v}"),
            _ => {}
        }
    }
    nothing_else_pending(&mut ws, "end").await;
    b.stop().await;

    // --head-interval 0: heads:true is accepted, and none will come.
    let mut cfg = broadcaster_config(&db);
    cfg.session.head_interval = Duration::ZERO;
    let b = broadcaster(cfg).await;
    let mut ws = connect_ws(&b.ws()).await;
    let v = ask(
        &mut ws,
        json!({"op": "subscribe", "market": "F2", "heads": true, "id": 1}),
    )
    .await;
    assert_subscribed(&v, json!(1), "F2");
    assert_eq!(v["heads"], false, "{v}");
    assert!(v.get("head_interval_ms").is_none(), "{v}");
    expect_silence(&mut ws, Duration::from_millis(500)).await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn for_one_market_the_first_failing_check_answers() {
    let db = TestDb::new().await;
    for m in ["O1", "O2", "OP"] {
        db.market(m).await;
    }
    two_batches(&db, "OP", 5, 5).await;
    prune_before(&db, "OP", 6).await;
    let (ow, ow_shard) = market_off_shards(&db, "OW", &["O1", "O2", "OP"]).await;
    let op_epoch = epoch_of(&db, "OP").await;
    let mut cfg = broadcaster_config(&db);
    cfg.shards = all_shards_but(ow_shard);
    cfg.session.max_subscriptions = 2;
    let b = broadcaster(cfg).await;
    let mut ws = connect_ws(&b.ws()).await;
    assert_subscribed(
        &ask(&mut ws, json!({"op": "subscribe", "market": "O1", "id": 1})).await,
        json!(1),
        "O1",
    );
    assert_subscribed(
        &ask(&mut ws, json!({"op": "subscribe", "market": "O2", "id": 2})).await,
        json!(2),
        "O2",
    );
    // The connection is full.
    let cases = [
        // already_subscribed before too_many_subscriptions (and epoch).
        (
            json!({"op": "subscribe", "market": "O1", "epoch": "x", "id": 3}),
            "O1",
            "already_subscribed",
        ),
        // too_many_subscriptions before unknown_market, wrong_shard,
        // epoch_mismatch, history_unavailable.
        (
            json!({"op": "subscribe", "market": "NOPE", "id": 4}),
            "NOPE",
            "too_many_subscriptions",
        ),
        (
            json!({"op": "subscribe", "market": ow, "id": 5}),
            ow.as_str(),
            "too_many_subscriptions",
        ),
        (
            json!({"op": "subscribe", "market": "OP", "epoch": "x", "from_seq": 1, "id": 6}),
            "OP",
            "too_many_subscriptions",
        ),
    ];
    for (op, market, code) in cases {
        let id = op["id"].clone();
        assert_error(&ask(&mut ws, op).await, id, Some(market), code);
    }
    // The same order entry by entry in a multi-market op.
    send(
        &mut ws,
        json!({"op": "subscribe", "markets": [{"market": "O2"}, {"market": "NOPE"}], "id": 7}),
    )
    .await;
    assert_error(
        &recv(&mut ws).await,
        json!(7),
        Some("O2"),
        "already_subscribed",
    );
    assert_error(
        &recv(&mut ws).await,
        json!(7),
        Some("NOPE"),
        "too_many_subscriptions",
    );
    // Room for one.
    let v = ask(
        &mut ws,
        json!({"op": "unsubscribe", "market": "O2", "id": 8}),
    )
    .await;
    assert_eq!(v["type"], "unsubscribed", "{v}");
    let cases = [
        // unknown_market before epoch_mismatch and history_unavailable.
        (
            json!({"op": "subscribe", "market": "NOPE", "epoch": "x", "from_seq": 1, "id": 9}),
            "NOPE",
            "unknown_market",
        ),
        // wrong_shard before epoch_mismatch.
        (
            json!({"op": "subscribe", "market": ow, "epoch": "x", "from_seq": 0, "id": 10}),
            ow.as_str(),
            "wrong_shard",
        ),
        // epoch_mismatch before history_unavailable.
        (
            json!({"op": "subscribe", "market": "OP", "epoch": "x", "from_seq": 1, "id": 11}),
            "OP",
            "epoch_mismatch",
        ),
        // history_unavailable last.
        (
            json!({"op": "subscribe", "market": "OP", "epoch": op_epoch, "from_seq": 1, "id": 12}),
            "OP",
            "history_unavailable",
        ),
    ];
    for (op, market, code) in cases {
        let id = op["id"].clone();
        assert_error(&ask(&mut ws, op).await, id, Some(market), code);
    }
    // None of them used the room.
    assert_subscribed(
        &ask(
            &mut ws,
            json!({"op": "subscribe", "market": "OP", "from_seq": 5, "id": 13}),
        )
        .await,
        json!(13),
        "OP",
    );
    expect_trades(&mut ws, "OP", 6, 10).await;
    nothing_else_pending(&mut ws, "end").await;
    b.stop().await;
}

// ---------------------------------------------------------------- §2.5 recent

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recent_replays_the_newest_trades_then_live() {
    let db = TestDb::new().await;
    db.market("RC").await;
    db.trades("RC", 30).await;
    let b = broadcaster(broadcaster_config(&db)).await;
    // More than there are: every trade from 1.
    let mut all = connect_ws(&b.ws()).await;
    let v = ask(
        &mut all,
        json!({"op": "subscribe", "market": "RC", "recent": 50, "id": 1}),
    )
    .await;
    assert_subscribed(&v, json!(1), "RC");
    assert_eq!(
        (v["head_seq"].as_i64(), v["from_seq"].as_i64()),
        (Some(30), Some(0)),
        "{v}"
    );
    expect_trades(&mut all, "RC", 1, 30).await;
    // Fewer than there are: the newest ten.
    let mut ten = connect_ws(&b.ws()).await;
    let v = ask(
        &mut ten,
        json!({"op": "subscribe", "market": "RC", "recent": 10, "id": 2}),
    )
    .await;
    assert_subscribed(&v, json!(2), "RC");
    assert_eq!(
        (v["head_seq"].as_i64(), v["from_seq"].as_i64()),
        (Some(30), Some(20)),
        "{v}"
    );
    expect_trades(&mut ten, "RC", 21, 30).await;
    // Then live, for both.
    db.trades("RC", 5).await;
    expect_trades(&mut all, "RC", 31, 35).await;
    expect_trades(&mut ten, "RC", 31, 35).await;
    // Exactly one: the head itself.
    let mut one = connect_ws(&b.ws()).await;
    let v = ask(
        &mut one,
        json!({"op": "subscribe", "market": "RC", "recent": 1, "id": 3}),
    )
    .await;
    assert_eq!(v["from_seq"], 34, "{v}");
    expect_trades(&mut one, "RC", 35, 35).await;
    // The bounds: 1..=--max-recent (1000); never with from_seq.
    for (i, bad) in [
        json!({"recent": 0}),
        json!({"recent": 1001}),
        json!({"recent": -1}),
        json!({"recent": "5"}),
        json!({"recent": 2.5}),
        json!({"recent": 5, "from_seq": 3}),
        json!({"recent": 5, "from_seq": 0}),
    ]
    .into_iter()
    .enumerate()
    {
        let mut op = json!({"op": "subscribe", "market": "RC", "id": 100 + i});
        op.as_object_mut()
            .unwrap()
            .extend(bad.as_object().unwrap().clone());
        let mut ws = connect_ws(&b.ws()).await;
        let v = ask(&mut ws, op.clone()).await;
        assert_bad_request(&v, json!(100 + i), "RC");
        // Nothing was subscribed.
        nothing_else_pending(&mut ws, "after").await;
        db.trades("RC", 1).await;
        expect_silence(&mut ws, Duration::from_millis(200)).await;
    }
    // null counts as absent.
    let head = head_of(&db, "RC").await;
    let mut ws = connect_ws(&b.ws()).await;
    let v = ask(
        &mut ws,
        json!({"op": "subscribe", "market": "RC", "recent": null, "from_seq": head - 2, "id": 7}),
    )
    .await;
    assert_subscribed(&v, json!(7), "RC");
    expect_trades(&mut ws, "RC", head - 1, head).await;
    // The largest allowed.
    let mut big = connect_ws(&b.ws()).await;
    let v = ask(
        &mut big,
        json!({"op": "subscribe", "market": "RC", "recent": 1000, "id": 9}),
    )
    .await;
    assert_eq!(v["from_seq"], 0, "{v}");
    expect_trades(&mut big, "RC", 1, head).await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recent_after_a_prune_starts_at_the_earliest_retained_and_is_never_history_unavailable() {
    let db = TestDb::new().await;
    db.market("RP").await;
    two_batches(&db, "RP", 20, 10).await;
    prune_before(&db, "RP", 21).await;
    let mut cfg = broadcaster_config(&db);
    cfg.session.max_recent = 25;
    let b = broadcaster(cfg).await;
    // from_seq into the pruned part is history_unavailable (v1)...
    let mut ws = connect_ws(&b.ws()).await;
    let v = ask(
        &mut ws,
        json!({"op": "subscribe", "market": "RP", "from_seq": 5, "id": 1}),
    )
    .await;
    assert_error(&v, json!(1), Some("RP"), "history_unavailable");
    assert_eq!(v["earliest_seq"], 21, "{v}");
    // ...recent never is: max(head - N, P) with P = 20.
    for (n, from) in [(25, 20), (11, 20), (10, 20), (9, 21), (3, 27)] {
        let mut ws = connect_ws(&b.ws()).await;
        let v = ask(
            &mut ws,
            json!({"op": "subscribe", "market": "RP", "recent": n, "id": n}),
        )
        .await;
        assert_subscribed(&v, json!(n), "RP");
        assert_eq!(
            (v["head_seq"].as_i64(), v["from_seq"].as_i64()),
            (Some(30), Some(from)),
            "recent {n}: {v}"
        );
        expect_trades(&mut ws, "RP", from + 1, 30).await;
        nothing_else_pending(&mut ws, "end").await;
    }
    // --max-recent is the configured bound.
    let v = ask(
        &mut ws,
        json!({"op": "subscribe", "market": "RP", "recent": 26, "id": 2}),
    )
    .await;
    assert_bad_request(&v, json!(2), "RP");
    nothing_else_pending(&mut ws, "end").await;
    b.stop().await;
}

// ---------------------------------------------------------------- §2.7 heads

/// Tolerance for "no head within --head-interval of the previous message",
/// measured on arrival at the client.
const EARLY: Duration = Duration::from_millis(50);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heads_mark_an_idle_market_at_the_head_interval() {
    let db = TestDb::new().await;
    db.market("HD").await;
    db.trades("HD", 5).await;
    let interval = Duration::from_millis(300);
    let mut cfg = broadcaster_config(&db);
    cfg.session.head_interval = interval;
    let b = broadcaster(cfg).await;
    let mut ws = connect_ws(&b.ws()).await;
    let v = ask(
        &mut ws,
        json!({"op": "subscribe", "market": "HD", "heads": true, "id": 1}),
    )
    .await;
    let mut prev = Instant::now();
    assert_subscribed(&v, json!(1), "HD");
    assert_eq!(
        (v["heads"].as_bool(), v["head_interval_ms"].as_i64()),
        (Some(true), Some(300)),
        "{v}"
    );
    // Idle: heads at the head, each at least an interval after the previous
    // message and (on a healthy broadcaster, read at once) at most two.
    for _ in 0..4 {
        let v = recv(&mut ws).await;
        let now = Instant::now();
        assert_eq!(
            (
                v["type"].as_str(),
                v["market"].as_str(),
                v["head_seq"].as_i64()
            ),
            (Some("head"), Some("HD"), Some(5)),
            "{v}"
        );
        let ts = v["ts"].as_str().expect("ts");
        assert!(
            ts.len() == 27 && ts.ends_with('Z') && ts.as_bytes()[19] == b'.',
            "{ts}"
        );
        let gap = now - prev;
        assert!(
            gap >= interval - EARLY,
            "a head {gap:?} after the previous message"
        );
        assert!(
            gap <= 2 * interval + Duration::from_millis(400),
            "a message at least every 2 x head-interval: {gap:?}"
        );
        prev = now;
    }
    // A trade is a message naming the market: the next head comes an interval
    // after it, at the new head.
    db.trades("HD", 1).await;
    let trade_at = loop {
        let v = recv(&mut ws).await;
        let now = Instant::now();
        if v["type"] == "trade" {
            assert_eq!(v["seq"], 6, "{v}");
            break now;
        }
        // A head that raced the insert is still about seq 5.
        assert_eq!(
            (v["type"].as_str(), v["head_seq"].as_i64()),
            (Some("head"), Some(5)),
            "{v}"
        );
        assert!(now - prev >= interval - EARLY);
        prev = now;
    };
    let v = recv(&mut ws).await;
    assert_eq!(
        (v["type"].as_str(), v["head_seq"].as_i64()),
        (Some("head"), Some(6)),
        "{v}"
    );
    assert!(Instant::now() - trade_at >= interval - EARLY);

    // from_seq above the head: heads carry the market's head, below the position.
    let mut ahead = connect_ws(&b.ws()).await;
    let v = ask(
        &mut ahead,
        json!({"op": "subscribe", "market": "HD", "from_seq": 100, "heads": true, "id": 2}),
    )
    .await;
    assert_eq!(v["from_seq"], 100, "{v}");
    let v = recv(&mut ahead).await;
    assert_eq!(
        (v["type"].as_str(), v["head_seq"].as_i64()),
        (Some("head"), Some(6)),
        "{v}"
    );
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_head_before_a_replayed_backlog_is_delivered() {
    let db = TestDb::new().await;
    db.market("HB").await;
    const N: i64 = 3000;
    db.trades("HB", N).await;
    let mut cfg = broadcaster_config(&db);
    cfg.session.head_interval = Duration::from_millis(300);
    cfg.replay_page = 100;
    let b = broadcaster(cfg).await;
    // A client that reads in bursts with pauses longer than the head
    // interval, its receive buffer small: the replay stalls on the socket
    // for longer than --head-interval, several times, without being caught up.
    let mut ws = connect_small(&b, &b.ws(), 4096).await;
    send(
        &mut ws,
        json!({"op": "subscribe", "market": "HB", "from_seq": 0, "heads": true, "id": 1}),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let v = recv(&mut ws).await;
    assert_subscribed(&v, json!(1), "HB");
    assert_eq!(v["head_seq"], N, "{v}");
    let mut next = 1;
    while next <= N {
        let to = (next + 499).min(N);
        // Only trades, exactly, until the last replayed one.
        expect_trades(&mut ws, "HB", next, to).await;
        next = to + 1;
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    let v = recv(&mut ws).await;
    assert_eq!(
        (v["type"].as_str(), v["head_seq"].as_i64()),
        (Some("head"), Some(N)),
        "{v}"
    );
    b.stop().await;
}

/// Reads until `deadline`, checking that every head equals the position
/// (the last seq or to_seq received, or subscribed.from_seq before any).
/// Returns (position, heads seen).
async fn follow_with_heads(ws: &mut Ws, market: &str, deadline: Instant) -> (i64, usize) {
    let sub = recv(ws).await;
    assert_subscribed(&sub, json!(1), market);
    assert_eq!(sub["heads"], true, "{sub}");
    let mut position = sub["from_seq"].as_i64().unwrap();
    let mut heads = 0;
    while let Some(v) = recv_until(ws, deadline).await {
        assert_eq!(v["market"], market, "{v}");
        match v["type"].as_str() {
            Some("trade") => {
                assert_eq!(v["seq"].as_i64(), Some(position + 1), "gapless: {v}");
                position += 1;
            }
            Some("ticker") => {
                assert_eq!(
                    v["from_seq"].as_i64(),
                    Some(position + 1),
                    "contiguous: {v}"
                );
                position = v["to_seq"].as_i64().unwrap();
            }
            Some("head") => {
                assert_eq!(
                    v["head_seq"].as_i64(),
                    Some(position),
                    "a head equals the client's position: {v}"
                );
                heads += 1;
            }
            _ => panic!("unexpected {v}"),
        }
    }
    (position, heads)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_head_equals_the_clients_position_while_trades_trickle() {
    let db = TestDb::new().await;
    db.market("HP").await;
    db.trades("HP", 3).await;
    let mut cfg = broadcaster_config(&db);
    cfg.session.head_interval = Duration::from_millis(300);
    let b = broadcaster(cfg).await;
    let mut trades = connect_ws(&b.ws()).await;
    send(
        &mut trades,
        json!({"op": "subscribe", "market": "HP", "from_seq": 0, "heads": true, "id": 1}),
    )
    .await;
    let mut ticker = connect_ws(&b.ws()).await;
    send(
        &mut ticker,
        json!({"op": "subscribe", "market": "HP", "from_seq": 1, "mode": "ticker", "interval_ms": 200, "heads": true, "id": 1}),
    )
    .await;
    // A low, uneven rate: some pauses shorter, some longer than the interval.
    let c = db.client().await;
    let deadline = Instant::now() + Duration::from_secs(7);
    let a = tokio::spawn(async move { follow_with_heads(&mut trades, "HP", deadline).await });
    let t = tokio::spawn(async move { follow_with_heads(&mut ticker, "HP", deadline).await });
    let mut n = 0;
    for (i, pause) in [100u64, 500, 800, 150, 900, 50, 400, 1000, 200, 700]
        .into_iter()
        .enumerate()
    {
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let k = 1 + i as i64 % 3;
        varied_trades(&c, "HP", 100 + n, k).await;
        n += k;
    }
    let head = 3 + n;
    let (pa, ha) = a.await.unwrap();
    let (pt, ht) = t.await.unwrap();
    assert_eq!((pa, pt), (head, head), "both caught up");
    assert!(
        ha >= 3 && ht >= 3,
        "heads came in the quiet spells: {ha} and {ht}"
    );
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_head_without_heads_true() {
    let db = TestDb::new().await;
    db.market("HN").await;
    db.trades("HN", 2).await;
    let mut cfg = broadcaster_config(&db);
    cfg.session.head_interval = Duration::from_millis(300);
    let b = broadcaster(cfg).await;
    // A v1 client.
    let mut v1 = connect_ws(&b.ws()).await;
    let sub = subscribe(&mut v1, "HN", Some(0)).await;
    assert_eq!(sub["heads"], false, "{sub}");
    expect_trades(&mut v1, "HN", 1, 2).await;
    // heads:false said out loud, and a ticker without heads.
    let mut no = connect_ws(&b.ws()).await;
    let v = ask(
        &mut no,
        json!({"op": "subscribe", "market": "HN", "heads": false, "id": 1}),
    )
    .await;
    assert_eq!(v["heads"], false, "{v}");
    let mut tk = connect_ws(&b.ws()).await;
    let v = ask(
        &mut tk,
        json!({"op": "subscribe", "market": "HN", "mode": "ticker", "interval_ms": 100, "id": 1}),
    )
    .await;
    assert_eq!(v["heads"], false, "{v}");
    expect_silence(&mut v1, Duration::from_millis(1500)).await;
    expect_silence(&mut no, Duration::from_millis(100)).await;
    expect_silence(&mut tk, Duration::from_millis(100)).await;
    b.stop().await;
}

// ---------------------------------------------------------------- §2.6 ticker

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ticker_frames_fold_the_log_exactly_under_load_and_resume_contiguously() {
    let db = TestDb::new().await;
    db.market("TK").await;
    varied_trades(&db.client().await, "TK", 1, 7).await;
    let b = broadcaster(broadcaster_config(&db)).await;
    let mut ws = connect_ws(&b.ws()).await;
    let sub = ask(
        &mut ws,
        json!({"op": "subscribe", "market": "TK", "mode": "ticker", "interval_ms": 200, "id": 1}),
    )
    .await;
    assert_subscribed(&sub, json!(1), "TK");
    assert_eq!(
        (
            sub["from_seq"].as_i64(),
            sub["mode"].as_str(),
            sub["interval_ms"].as_i64()
        ),
        (Some(7), Some("ticker"), Some(200)),
        "{sub}"
    );
    // 2,000 trades/s for 5 s.
    const TOTAL: i64 = 10_000;
    let load = insert_trades_at_rate(&db.url, "TK", 8, 2000, TOTAL);
    let head = 7 + TOTAL;
    let frames = collect_tickers(&mut ws, "TK", head).await;
    load.await.unwrap();
    assert_contiguous(&frames, 7, head);
    let log = log_of(&db, "TK").await;
    for (_, f) in &frames {
        assert_folds(f, &log, "TK");
    }
    for w in frames.windows(2) {
        let gap = w[1].0 - w[0].0;
        assert!(
            // Measured at the client: a frame delayed on a loaded 2-core
            // machine shortens the next gap, so allow a quarter of it.
            gap >= Duration::from_millis(150),
            "frames at least interval_ms apart: {gap:?} before {}",
            w[1].1
        );
    }
    assert!(
        frames.len() >= 10,
        "5 s of trades at 200 ms: {} frames",
        frames.len()
    );
    expect_silence(&mut ws, Duration::from_millis(500)).await;

    // Resume from a frame's to_seq on another connection: the first frame
    // folds exactly the backlog, then it matches the log too.
    let resume = frames[frames.len() / 2].1["to_seq"].as_i64().unwrap();
    let mut again = connect_ws(&b.ws()).await;
    let sub = ask(
        &mut again,
        json!({"op": "subscribe", "market": "TK", "from_seq": resume, "mode": "ticker", "interval_ms": 200, "id": 2}),
    )
    .await;
    assert_eq!(
        (sub["from_seq"].as_i64(), sub["head_seq"].as_i64()),
        (Some(resume), Some(head)),
        "{sub}"
    );
    let f = collect_tickers(&mut again, "TK", head).await;
    assert_eq!(f.len(), 1, "the backlog is one frame: {:?}", f);
    assert_contiguous(&f, resume, head);
    assert_folds(&f[0].1, &log, "TK");
    assert_eq!(f[0].1["volume"], sub["volume"]);
    // Live after the backlog.
    varied_trades(&db.client().await, "TK", 20_000, 3).await;
    let f = collect_tickers(&mut again, "TK", head + 3).await;
    assert_contiguous(&f, head, head + 3);
    let log = log_of(&db, "TK").await;
    for (_, frame) in &f {
        assert_folds(frame, &log, "TK");
    }
    b.stop().await;
}

/// Subscribers that join while trades flow (live, and from a seq behind
/// the head) land inside the group's span or behind it: each still gets
/// contiguous spans from its own `from_seq + 1`, every fold equal to the
/// log's, frames an interval apart. (Without the per-connection fill, a
/// joiner would get a shared frame that starts before or after its
/// position.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ticker_subscribers_joining_mid_stream_stay_contiguous() {
    let db = TestDb::new().await;
    db.market("TJ").await;
    varied_trades(&db.client().await, "TJ", 1, 5).await;
    let b = broadcaster(broadcaster_config(&db)).await;
    // The group exists before the joiners: one subscriber from the start.
    let mut first = connect_ws(&b.ws()).await;
    let sub = ask(
        &mut first,
        json!({"op": "subscribe", "market": "TJ", "mode": "ticker", "interval_ms": 300, "id": 1}),
    )
    .await;
    assert_subscribed(&sub, json!(1), "TJ");
    const TOTAL: i64 = 6_000;
    let head = 5 + TOTAL;
    let load = insert_trades_at_rate(&db.url, "TJ", 6, 2000, TOTAL);
    let mut joiners = Vec::new();
    for k in 0..6u64 {
        // Joins spread over the load, at phases that do not line up with
        // the group's frames.
        tokio::time::sleep(Duration::from_millis(230 + 37 * k)).await;
        let mut ws = connect_ws(&b.ws()).await;
        let mut op = json!({"op": "subscribe", "market": "TJ", "mode": "ticker", "interval_ms": 300, "id": k});
        if k % 2 == 1 {
            op["from_seq"] = json!(head_of(&db, "TJ").await.saturating_sub(40));
        }
        let sub = ask(&mut ws, op).await;
        assert_subscribed(&sub, json!(k), "TJ");
        let from = sub["from_seq"].as_i64().unwrap();
        // Read as the frames come, so arrival times mean something.
        joiners.push(tokio::spawn(async move {
            (from, collect_tickers(&mut ws, "TJ", head).await)
        }));
    }
    let frames = collect_tickers(&mut first, "TJ", head).await;
    load.await.unwrap();
    let log = log_of(&db, "TJ").await;
    assert_contiguous(&frames, 5, head);
    for j in joiners {
        let (from, f) = j.await.unwrap();
        assert_contiguous(&f, from, head);
        for (_, frame) in &f {
            assert_folds(frame, &log, "TJ");
        }
        for w in f.windows(2) {
            let gap = w[1].0 - w[0].0;
            assert!(
                // Client-side timing on a shared machine: a quarter's slack.
                gap >= Duration::from_millis(225),
                "joined after {from}: frames at least interval_ms apart: {gap:?} before {}",
                w[1].1
            );
        }
    }
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticker_backlog_is_one_frame_and_its_fields_are_checked() {
    let db = TestDb::new().await;
    for m in ["TB", "TC"] {
        db.market(m).await;
    }
    varied_trades(&db.client().await, "TB", 1, 500).await;
    let b = broadcaster(broadcaster_config(&db)).await;
    let mut ws = connect_ws(&b.ws()).await;
    let sub = ask(
        &mut ws,
        json!({"op": "subscribe", "market": "TB", "from_seq": 0, "mode": "ticker", "interval_ms": 1000, "id": 1}),
    )
    .await;
    assert_subscribed(&sub, json!(1), "TB");
    assert_eq!(
        (sub["from_seq"].as_i64(), sub["head_seq"].as_i64()),
        (Some(0), Some(500)),
        "{sub}"
    );
    let first = recv(&mut ws).await;
    let log = log_of(&db, "TB").await;
    assert_eq!(
        (first["from_seq"].as_i64(), first["to_seq"].as_i64()),
        (Some(1), Some(500)),
        "exactly 1..500: {first}"
    );
    assert_folds(&first, &log, "TB");
    assert_eq!(first["volume"], sub["volume"]);
    // No trades, no frame.
    expect_silence(&mut ws, Duration::from_millis(1300)).await;
    // More than an interval since the last frame: a trade goes out at once.
    varied_trades(&db.client().await, "TB", 501, 3).await;
    let f = collect_tickers(&mut ws, "TB", 503).await;
    assert_contiguous(&f, 500, 503);
    let log = log_of(&db, "TB").await;
    for (_, frame) in &f {
        assert_folds(frame, &log, "TB");
    }
    // End: trades held for the next frame are never sent after unsubscribed.
    varied_trades(&db.client().await, "TB", 504, 4).await;
    let v = ask(
        &mut ws,
        json!({"op": "unsubscribe", "market": "TB", "id": 2}),
    )
    .await;
    assert_eq!(
        (v["type"].as_str(), v["market"].as_str()),
        (Some("unsubscribed"), Some("TB")),
        "{v}"
    );
    expect_silence(&mut ws, Duration::from_millis(1500)).await;

    // Field checks: each is one bad_request, nothing subscribed.
    for (i, bad) in [
        json!({"mode": "ticker", "interval_ms": 99}),
        json!({"mode": "ticker", "interval_ms": 60001}),
        json!({"mode": "ticker", "interval_ms": 0}),
        json!({"mode": "ticker", "interval_ms": "200"}),
        json!({"mode": "ticker", "interval_ms": 150.5}),
        json!({"interval_ms": 200}),
        json!({"mode": "trades", "interval_ms": 200}),
        json!({"mode": "foo"}),
        json!({"mode": "Ticker"}),
        json!({"mode": 1}),
        json!({"heads": "true"}),
        json!({"heads": 1}),
    ]
    .into_iter()
    .enumerate()
    {
        let mut op = json!({"op": "subscribe", "market": "TC", "id": i});
        op.as_object_mut()
            .unwrap()
            .extend(bad.as_object().unwrap().clone());
        let v = ask(&mut ws, op.clone()).await;
        assert_bad_request(&v, json!(i), "TC");
        nothing_else_pending(&mut ws, "one reply").await;
    }
    // The bounds themselves are accepted.
    for interval in [100, 60000] {
        let mut w = connect_ws(&b.ws()).await;
        let v = ask(
            &mut w,
            json!({"op": "subscribe", "market": "TC", "mode": "ticker", "interval_ms": interval, "id": interval}),
        )
        .await;
        assert_subscribed(&v, json!(interval), "TC");
        assert_eq!(v["interval_ms"], interval, "{v}");
    }
    // null is absent.
    let mut w = connect_ws(&b.ws()).await;
    let v = ask(
        &mut w,
        json!({"op": "subscribe", "market": "TC", "mode": null, "interval_ms": null, "recent": null, "heads": null, "id": 3}),
    )
    .await;
    assert_subscribed(&v, json!(3), "TC");
    assert_eq!(
        (v["mode"].as_str(), v["heads"].as_bool()),
        (Some("trades"), Some(false)),
        "{v}"
    );
    assert!(v.get("interval_ms").is_none(), "{v}");
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_min_ticker_interval_is_the_lower_bound() {
    let db = TestDb::new().await;
    db.market("TM").await;
    let mut cfg = broadcaster_config(&db);
    cfg.session.min_ticker_interval = Duration::from_millis(250);
    let b = broadcaster(cfg).await;
    let mut ws = connect_ws(&b.ws()).await;
    let v = ask(
        &mut ws,
        json!({"op": "subscribe", "market": "TM", "mode": "ticker", "interval_ms": 249, "id": 1}),
    )
    .await;
    assert_bad_request(&v, json!(1), "TM");
    let v = ask(
        &mut ws,
        json!({"op": "subscribe", "market": "TM", "mode": "ticker", "interval_ms": 250, "id": 2}),
    )
    .await;
    assert_subscribed(&v, json!(2), "TM");
    assert_eq!(v["interval_ms"], 250, "{v}");
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticker_subscriber_that_stops_reading_is_not_a_slow_consumer() {
    let db = TestDb::new().await;
    db.market("TS").await;
    let mut cfg = broadcaster_config(&db);
    cfg.session.write_timeout = Duration::from_secs(2);
    cfg.session.ping_interval = Duration::from_secs(60);
    cfg.session.idle_timeout = Duration::from_secs(120);
    let b = broadcaster(cfg).await;
    // Two identical connections with small receive buffers; neither reads
    // for 10 s while trades commit. The rate is the one at which the
    // trades-mode control really stalls for --write-timeout: at 1,000/s
    // (1.2 MB in 10 s) the kernel's autotuned send buffer absorbed it all.
    let mut control = connect_small(&b, &b.ws(), 4096).await;
    let mut ticker = connect_small(&b, &b.ws(), 4096).await;
    let c = ask(
        &mut control,
        json!({"op": "subscribe", "market": "TS", "id": 1}),
    )
    .await;
    assert_subscribed(&c, json!(1), "TS");
    let t = ask(
        &mut ticker,
        json!({"op": "subscribe", "market": "TS", "mode": "ticker", "interval_ms": 500, "id": 1}),
    )
    .await;
    assert_subscribed(&t, json!(1), "TS");
    const RATE: u64 = 3000;
    const TOTAL: i64 = 12 * RATE as i64;
    let load = insert_trades_at_rate(&db.url, "TS", 1, RATE, TOTAL);
    tokio::time::sleep(Duration::from_secs(10)).await;
    // The control, in trades mode: a gapless prefix, then 4000.
    let mut last = 0;
    let code = loop {
        match next_event(&mut control).await {
            Event::Json(v) => {
                assert_eq!(
                    (v["type"].as_str(), v["seq"].as_i64()),
                    (Some("trade"), Some(last + 1)),
                    "{v}"
                );
                last += 1;
            }
            Event::Closed(c) => break c,
        }
    };
    assert_eq!(
        code,
        Some(4000),
        "the trades-mode control is a slow consumer"
    );
    assert!(last < TOTAL);
    // The ticker: still open, contiguous frames to the end.
    load.await.unwrap();
    let frames = collect_tickers(&mut ticker, "TS", TOTAL).await;
    assert_contiguous(&frames, 0, TOTAL);
    let log = log_of(&db, "TS").await;
    for (_, f) in &frames {
        assert_folds(f, &log, "TS");
    }
    nothing_else_pending(&mut ticker, "alive").await;
    b.stop().await;
}

// ---------------------------------------------------------------- §2.3 the URL form

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_url_subscribe_takes_the_new_fields_with_the_same_errors() {
    let db = TestDb::new().await;
    db.market("U").await;
    varied_trades(&db.client().await, "U", 1, 30).await;
    let mut cfg = broadcaster_config(&db);
    cfg.session.head_interval = Duration::from_millis(300);
    let b = broadcaster(cfg).await;
    let url = |q: &str| format!("{}?market=U&{q}", b.ws());

    let mut ws = connect_ws(&url("recent=5")).await;
    let v = recv(&mut ws).await;
    assert_subscribed(&v, Value::Null, "U");
    assert_eq!(v["from_seq"], 25, "{v}");
    expect_trades(&mut ws, "U", 26, 30).await;

    let mut ws = connect_ws(&url("from_seq=0&mode=ticker&interval_ms=200")).await;
    let v = recv(&mut ws).await;
    assert_subscribed(&v, Value::Null, "U");
    assert_eq!(
        (
            v["mode"].as_str(),
            v["interval_ms"].as_i64(),
            v["from_seq"].as_i64()
        ),
        (Some("ticker"), Some(200), Some(0)),
        "{v}"
    );
    let log = log_of(&db, "U").await;
    let f = recv(&mut ws).await;
    assert_eq!(
        (f["from_seq"].as_i64(), f["to_seq"].as_i64()),
        (Some(1), Some(30)),
        "{f}"
    );
    assert_folds(&f, &log, "U");

    let mut ws = connect_ws(&url("heads=true")).await;
    let v = recv(&mut ws).await;
    assert_eq!(
        (v["heads"].as_bool(), v["head_interval_ms"].as_i64()),
        (Some(true), Some(300)),
        "{v}"
    );
    let v = recv(&mut ws).await;
    assert_eq!(
        (v["type"].as_str(), v["head_seq"].as_i64()),
        (Some("head"), Some(30)),
        "{v}"
    );

    let mut ws = connect_ws(&url("heads=false&mode=trades")).await;
    let v = recv(&mut ws).await;
    assert_eq!(
        (v["heads"].as_bool(), v["mode"].as_str()),
        (Some(false), Some("trades")),
        "{v}"
    );
    expect_silence(&mut ws, Duration::from_millis(800)).await;

    for q in [
        "recent=0",
        "recent=1001",
        "recent=abc",
        "recent=5&from_seq=1",
        "mode=foo",
        "mode=ticker&interval_ms=99",
        "mode=ticker&interval_ms=60001",
        "mode=ticker&interval_ms=abc",
        "interval_ms=200",
        "mode=trades&interval_ms=200",
        "heads=yes",
        "heads=1",
    ] {
        let mut ws = connect_ws(&url(q)).await;
        let v = recv(&mut ws).await;
        assert_eq!(
            (v["type"].as_str(), v["code"].as_str()),
            (Some("error"), Some("bad_request")),
            "?{q}: {v}"
        );
        // The connection stays, with nothing subscribed.
        nothing_else_pending(&mut ws, q).await;
        expect_silence(&mut ws, Duration::from_millis(100)).await;
    }
    // Not subscribed by any of those: a trade reaches only live subscribers.
    let mut ws = connect_ws(&url("recent=abc")).await;
    assert_eq!(recv(&mut ws).await["code"], "bad_request");
    varied_trades(&db.client().await, "U", 31, 1).await;
    expect_silence(&mut ws, Duration::from_millis(300)).await;
    b.stop().await;
}

// ---------------------------------------------------------------- §1, §2.1, §2.2 tokens

/// The HS256 secret of every token test (at least 32 bytes).
const SECRET: &str = "marketcast-feed-tests-hs256-secret-0123456789";

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn unix_now_f64() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn sign_with(alg: jsonwebtoken::Algorithm, secret: &str, claims: &Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(alg),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// An HS256 token under [`SECRET`].
fn sign(claims: Value) -> String {
    sign_with(jsonwebtoken::Algorithm::HS256, SECRET, &claims)
}

/// A token with `"alg":"none"` and an empty signature.
fn unsigned(claims: Value) -> String {
    use base64::Engine;
    let b64 = |v: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    format!(
        "{}.{}.",
        b64(json!({"alg": "none", "typ": "JWT"})),
        b64(claims)
    )
}

/// The test broadcaster with HS256 token keys and `leeway`.
fn token_config(db: &TestDb, leeway: Duration) -> marketcast::config::BroadcasterConfig {
    let mut cfg = broadcaster_config(db);
    cfg.tokens = marketcast::config::TokenConfig {
        verifier: marketcast::protocol::token::Verifier::new(Some(SECRET), None, leeway)
            .expect("a valid secret"),
        require_token: false,
    };
    cfg
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// A 401 before any WebSocket: `WWW-Authenticate: Bearer` and the code.
#[track_caller]
fn assert_401(answer: &(u16, hyper::HeaderMap, Value), code: &str, what: &str) {
    let (status, headers, body) = answer;
    assert_eq!(*status, 401, "{what}: {body}");
    let www = headers
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    assert!(
        www == "Bearer" || www.starts_with("Bearer "),
        "{what}: WWW-Authenticate {www:?}"
    );
    assert_eq!(body["error"]["code"], code, "{what}: {body}");
    assert!(body["error"]["message"].is_string(), "{what}: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_binds_every_subscribe_to_its_markets() {
    let db = TestDb::new().await;
    for m in ["ELECTION-2028", "ELECTION-2032", "SPORTS-1", "XELECTION-1"] {
        db.market(m).await;
    }
    db.trades("ELECTION-2028", 3).await;
    db.trades("SPORTS-1", 3).await;
    let mut cfg = token_config(&db, Duration::from_secs(30));
    cfg.session.max_subscriptions = 2;
    let b = broadcaster(cfg).await;
    let t = sign(json!({"exp": unix_now() + 600, "markets": ["ELECTION-*"]}));

    let mut ws = connect_ws_with(&b.ws(), &[("authorization", &bearer(&t))]).await;
    let v = ask(
        &mut ws,
        json!({"op": "subscribe", "market": "ELECTION-2028", "from_seq": 0, "id": 1}),
    )
    .await;
    assert_subscribed(&v, json!(1), "ELECTION-2028");
    expect_trades(&mut ws, "ELECTION-2028", 1, 3).await;
    for (market, code) in [
        ("SPORTS-1", "forbidden"),
        ("XELECTION-1", "forbidden"),
        // forbidden comes before any lookup: a market the token may not
        // read is forbidden whether it exists or not.
        ("SPORTS-NOPE", "forbidden"),
        ("election-2028", "forbidden"),
        ("ELECTION-NOPE", "unknown_market"),
    ] {
        let v = ask(
            &mut ws,
            json!({"op": "subscribe", "market": market, "from_seq": 0, "id": market}),
        )
        .await;
        assert_error(&v, json!(market), Some(market), code);
    }
    // The same per entry of a multi-market op.
    send(
        &mut ws,
        json!({"op": "subscribe", "markets": [{"market": "SPORTS-1"}, {"market": "ELECTION-2032"}], "id": 2}),
    )
    .await;
    assert_error(
        &recv(&mut ws).await,
        json!(2),
        Some("SPORTS-1"),
        "forbidden",
    );
    assert_subscribed(&recv(&mut ws).await, json!(2), "ELECTION-2032");
    // Full: too_many_subscriptions comes before forbidden.
    let v = ask(
        &mut ws,
        json!({"op": "subscribe", "market": "SPORTS-1", "id": 3}),
    )
    .await;
    assert_error(&v, json!(3), Some("SPORTS-1"), "too_many_subscriptions");
    // Only the granted markets' trades arrive.
    db.trades("SPORTS-1", 1).await;
    db.trades("ELECTION-2028", 2).await;
    expect_trades(&mut ws, "ELECTION-2028", 4, 5).await;
    nothing_else_pending(&mut ws, "end").await;

    // The ?market= subscribe is bound too, with the token in the header or
    // in ?token=.
    for (url, headers) in [
        (
            format!("{}?market=SPORTS-1&from_seq=0", b.ws()),
            vec![("authorization", bearer(&t))],
        ),
        (
            format!("{}?market=SPORTS-1&from_seq=0&token={t}", b.ws()),
            vec![],
        ),
    ] {
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let mut ws = connect_ws_with(&url, &h).await;
        let v = recv(&mut ws).await;
        assert_error(&v, Value::Null, Some("SPORTS-1"), "forbidden");
        nothing_else_pending(&mut ws, "after").await;
    }
    let mut ws = connect_ws(&format!(
        "{}?market=ELECTION-2028&from_seq=4&token={t}",
        b.ws()
    ))
    .await;
    assert_subscribed(&recv(&mut ws).await, Value::Null, "ELECTION-2028");
    expect_trades(&mut ws, "ELECTION-2028", 5, 5).await;

    // Without a token (not required): any market, as in v1.
    let mut anon = connect_ws(&b.ws()).await;
    subscribe(&mut anon, "SPORTS-1", Some(3)).await;
    expect_trades(&mut anon, "SPORTS-1", 4, 4).await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_token_at_the_upgrade_is_401_invalid_token() {
    let db = TestDb::new().await;
    db.market("T401").await;
    let b = broadcaster(token_config(&db, Duration::from_secs(30))).await;
    let now = unix_now();
    let good = json!({"exp": now + 600, "markets": ["*"]});
    let invalid = [
        (
            "forged",
            sign_with(
                jsonwebtoken::Algorithm::HS256,
                "another-secret-of-at-least-32-bytes-long",
                &good,
            ),
        ),
        // Beyond the 30 s leeway.
        ("expired", sign(json!({"exp": now - 120, "markets": ["*"]}))),
        (
            "not yet valid",
            sign(json!({"exp": now + 600, "nbf": now + 120, "markets": ["*"]})),
        ),
        (
            "HS384",
            sign_with(jsonwebtoken::Algorithm::HS384, SECRET, &good),
        ),
        ("alg none", unsigned(good.clone())),
        ("no exp", sign(json!({"markets": ["*"]}))),
        (
            "bad pattern",
            sign(json!({"exp": now + 600, "markets": ["A*B"]})),
        ),
        ("garbage", "not.a.token".to_string()),
    ];
    for (what, t) in &invalid {
        let a = ws_upgrade(&b.ws(), &[("authorization", &bearer(t))]).await;
        assert_401(&a, "invalid_token", what);
        let a = ws_upgrade(&format!("{}?market=T401&token={t}", b.ws()), &[]).await;
        assert_401(&a, "invalid_token", what);
    }
    // Both places at once: 400 bad_request.
    let t = sign(good.clone());
    let (status, _, body) = ws_upgrade(
        &format!("{}?token={t}", b.ws()),
        &[("authorization", &bearer(&t))],
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("bad_request")),
        "{body}"
    );
    // The valid token, and another scheme (ignored): 101.
    let (status, _, _) = ws_upgrade(&b.ws(), &[("authorization", &bearer(&t))]).await;
    assert_eq!(status, 101);
    let (status, _, _) = ws_upgrade(&b.ws(), &[("authorization", "Basic dXNlcjpwdw==")]).await;
    assert_eq!(status, 101, "another scheme is ignored");
    b.stop().await;

    // --require-token: no token is 401 unauthorized; a valid one is admitted;
    // /healthz and /metrics need none.
    let mut cfg = token_config(&db, Duration::from_secs(30));
    cfg.tokens.require_token = true;
    cfg.allowed_origins = Some(BTreeSet::from(["https://ok.example".to_string()]));
    let b = broadcaster(cfg).await;
    // The Origin allowlist's 403 comes before the token.
    let (status, _, _) = ws_upgrade(&b.ws(), &[("origin", "https://evil.example")]).await;
    assert_eq!(status, 403, "origin first");
    let a = ws_upgrade(&b.ws(), &[("origin", "https://ok.example")]).await;
    assert_401(&a, "unauthorized", "allowed origin, no token");
    let a = ws_upgrade(&format!("{}?market=T401", b.ws()), &[]).await;
    assert_401(&a, "unauthorized", "no token");
    let a = ws_upgrade(&b.ws(), &[("authorization", "Basic dXNlcjpwdw==")]).await;
    assert_401(&a, "unauthorized", "another scheme only");
    let a = ws_upgrade(&b.ws(), &[("authorization", &bearer(&invalid[0].1))]).await;
    assert_401(&a, "invalid_token", "forged");
    let mut ws = connect_ws(&format!("{}?market=T401&token={t}", b.ws())).await;
    assert_subscribed(&recv(&mut ws).await, Value::Null, "T401");
    db.trades("T401", 1).await;
    expect_trades(&mut ws, "T401", 1, 1).await;
    assert_eq!(
        http("GET", &format!("{}/healthz", b.http()), &[], None)
            .await
            .0,
        200
    );
    let (status, _) = http_raw("GET", &format!("{}/metrics", b.http()), &[], None)
        .await
        .unwrap();
    assert_eq!(status, 200);
    b.stop().await;

    // Without token keys, tokens are ignored wherever they appear (v1).
    let b = broadcaster(broadcaster_config(&db)).await;
    let mut ws = connect_ws_with(
        &format!("{}?market=T401&from_seq=0&token=garbage", b.ws()),
        &[("authorization", "Bearer garbage")],
    )
    .await;
    assert_eq!(recv(&mut ws).await["type"], "subscribed");
    expect_trades(&mut ws, "T401", 1, 1).await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_auth_op_answers_authed_or_invalid_token_and_keeps_the_connection() {
    let db = TestDb::new().await;
    db.market("AU").await;
    let b = broadcaster(token_config(&db, Duration::from_secs(30))).await;
    // Admitted without a token; subscribed to AU.
    let mut ws = connect_ws(&b.ws()).await;
    subscribe(&mut ws, "AU", None).await;
    let exp = unix_now() + 600;
    let t = sign(json!({"sub": "user-81", "exp": exp, "markets": ["AU"]}));
    let v = ask(&mut ws, json!({"op": "auth", "token": t, "id": 3})).await;
    assert_eq!(
        (
            v["type"].as_str(),
            v["id"].as_i64(),
            v["exp"].as_i64(),
            v["sub"].as_str()
        ),
        (Some("authed"), Some(3), Some(exp), Some("user-81")),
        "{v}"
    );
    // Without sub, no sub.
    let t2 = sign(json!({"exp": exp + 1, "markets": ["AU", "B*"]}));
    let v = ask(&mut ws, json!({"op": "auth", "token": t2, "id": "x"})).await;
    assert_eq!(
        (v["type"].as_str(), v["id"].as_str(), v["exp"].as_i64()),
        (Some("authed"), Some("x"), Some(exp + 1)),
        "{v}"
    );
    assert!(v.get("sub").is_none(), "{v}");
    // Invalid tokens: invalid_token, and nothing changes.
    for (i, bad) in [
        sign_with(
            jsonwebtoken::Algorithm::HS256,
            "another-secret-of-at-least-32-bytes-long",
            &json!({"exp": exp}),
        ),
        sign(json!({"exp": unix_now() - 120, "markets": ["*"]})),
        sign_with(jsonwebtoken::Algorithm::HS384, SECRET, &json!({"exp": exp})),
        unsigned(json!({"exp": exp, "markets": ["*"]})),
        "garbage".to_string(),
        String::new(),
    ]
    .into_iter()
    .enumerate()
    {
        let v = ask(&mut ws, json!({"op": "auth", "token": bad, "id": i})).await;
        assert_error(&v, json!(i), None, "invalid_token");
    }
    // A token that is not a string, or none: bad_request.
    for (i, op) in [
        json!({"op": "auth", "token": 5, "id": 20}),
        json!({"op": "auth", "token": ["x"], "id": 21}),
        json!({"op": "auth", "id": 22}),
    ]
    .into_iter()
    .enumerate()
    {
        let v = ask(&mut ws, op).await;
        assert_eq!(
            (v["type"].as_str(), v["code"].as_str(), v["id"].as_u64()),
            (Some("error"), Some("bad_request"), Some(20 + i as u64)),
            "{v}"
        );
    }
    // Still subscribed, still bound by t2 (B* granted, C not).
    db.trades("AU", 2).await;
    expect_trades(&mut ws, "AU", 1, 2).await;
    let v = ask(
        &mut ws,
        json!({"op": "subscribe", "market": "C-1", "id": 30}),
    )
    .await;
    assert_error(&v, json!(30), Some("C-1"), "forbidden");
    nothing_else_pending(&mut ws, "end").await;
    b.stop().await;

    // Without token keys, auth is invalid_token and nothing else changes.
    let b = broadcaster(broadcaster_config(&db)).await;
    let mut ws = connect_ws(&b.ws()).await;
    subscribe(&mut ws, "AU", None).await;
    let v = ask(&mut ws, json!({"op": "auth", "token": t, "id": 4})).await;
    assert_error(&v, json!(4), None, "invalid_token");
    db.trades("AU", 1).await;
    expect_trades(&mut ws, "AU", 3, 3).await;
    b.stop().await;
}

/// Reads `ws` until `stop` returns true for a non-trade message or the
/// trades of `market` reach `until`; trades must be gapless from `*last + 1`.
/// Returns the non-trade messages in order.
async fn gapless_until(
    ws: &mut Ws,
    market: &str,
    last: &mut i64,
    until: i64,
    mut stop: impl FnMut(&Value) -> bool,
) -> Vec<Value> {
    let mut others = Vec::new();
    while *last < until {
        let v = recv(ws).await;
        if v["type"] == "trade" {
            assert_eq!(v["market"], market, "{v}");
            assert_eq!(v["seq"].as_i64(), Some(*last + 1), "gapless: {v}");
            *last += 1;
        } else {
            let done = stop(&v);
            others.push(v);
            if done {
                break;
            }
        }
    }
    others
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_refreshed_before_exp_keeps_the_stream_gapless() {
    let db = TestDb::new().await;
    db.market("RF").await;
    let b = broadcaster(token_config(&db, Duration::ZERO)).await;
    let exp1 = unix_now() + 3;
    let t1 = sign(json!({"exp": exp1, "markets": ["RF"]}));
    let mut ws = connect_ws(&format!("{}?market=RF&from_seq=0&token={t1}", b.ws())).await;
    assert_subscribed(&recv(&mut ws).await, Value::Null, "RF");
    // ~100 trades/s for 6 s: well past the first token's exp.
    const TOTAL: i64 = 600;
    let load = insert_trades_at_rate(&db.url, "RF", 1, 100, TOTAL);
    let mut last = 0;
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        let one_more = last + 1;
        gapless_until(&mut ws, "RF", &mut last, one_more, |v| panic!("{v}")).await;
    }
    let exp2 = unix_now() + 600;
    let t2 = sign(json!({"exp": exp2, "markets": ["RF"]}));
    send(&mut ws, json!({"op": "auth", "token": t2, "id": 9})).await;
    let others = gapless_until(&mut ws, "RF", &mut last, TOTAL, |v| v["type"] == "authed").await;
    assert_eq!(others.len(), 1, "{others:?}");
    assert_eq!(
        (others[0]["id"].as_i64(), others[0]["exp"].as_i64()),
        (Some(9), Some(exp2)),
        "{}",
        others[0]
    );
    // No close, nothing else: exactly every trade to the end.
    gapless_until(&mut ws, "RF", &mut last, TOTAL, |v| panic!("{v}")).await;
    load.await.unwrap();
    assert!(
        unix_now_f64() > exp1 as f64 + 1.5,
        "the stream outlived the first token"
    );
    expect_silence(&mut ws, Duration::from_millis(1000)).await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_closes_4001_and_a_fresh_one_resumes_without_loss() {
    let db = TestDb::new().await;
    db.market("EX").await;
    let b = broadcaster(token_config(&db, Duration::ZERO)).await;
    // A connection without a token, open across the expiry: never 4001.
    let mut anon = connect_ws(&b.ws()).await;
    let exp = unix_now() + 2;
    let t1 = sign(json!({"exp": exp, "markets": ["EX"]}));
    let mut ws = connect_ws_with(
        &format!("{}?market=EX&from_seq=0", b.ws()),
        &[("authorization", &bearer(&t1))],
    )
    .await;
    assert_subscribed(&recv(&mut ws).await, Value::Null, "EX");
    const TOTAL: i64 = 500;
    let load = insert_trades_at_rate(&db.url, "EX", 1, 100, TOTAL);
    let mut last = 0;
    let code = loop {
        match next_event(&mut ws).await {
            Event::Json(v) => {
                assert_eq!(
                    (v["type"].as_str(), v["seq"].as_i64()),
                    (Some("trade"), Some(last + 1)),
                    "gapless before the close: {v}"
                );
                last += 1;
            }
            Event::Closed(c) => break c,
        }
    };
    let closed_at = unix_now_f64();
    assert_eq!(code, Some(4001), "token expired");
    assert!(
        closed_at >= exp as f64 - 0.05,
        "not before exp: closed at {closed_at}, exp {exp}"
    );
    assert!(
        closed_at <= exp as f64 + 1.25,
        "within 1 s of exp: closed at {closed_at}, exp {exp}"
    );
    assert!(last < TOTAL, "closed while trades flowed");
    // Reconnect with a fresh token from the last seq seen: nothing lost.
    let t2 = sign(json!({"exp": unix_now() + 600, "markets": ["EX"]}));
    let mut again = connect_ws(&format!("{}?market=EX&from_seq={last}&token={t2}", b.ws())).await;
    let v = recv(&mut again).await;
    assert_subscribed(&v, Value::Null, "EX");
    assert_eq!(v["from_seq"], last, "{v}");
    load.await.unwrap();
    expect_trades(&mut again, "EX", last + 1, TOTAL).await;
    expect_silence(&mut again, Duration::from_millis(300)).await;
    nothing_else_pending(&mut anon, "still open").await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auth_that_drops_a_market_ends_only_that_subscription() {
    let db = TestDb::new().await;
    db.market("ELECTION-2028").await;
    db.market("SPORTS-1").await;
    let b = broadcaster(token_config(&db, Duration::from_secs(30))).await;
    let t1 = sign(json!({"exp": unix_now() + 600, "markets": ["ELECTION-*", "SPORTS-*"]}));
    let mut ws = connect_ws_with(&b.ws(), &[("authorization", &bearer(&t1))]).await;
    send(
        &mut ws,
        json!({"op": "subscribe", "markets": [{"market": "ELECTION-2028", "from_seq": 0}, {"market": "SPORTS-1", "from_seq": 0}], "id": 1}),
    )
    .await;
    assert_subscribed(&recv(&mut ws).await, json!(1), "ELECTION-2028");
    assert_subscribed(&recv(&mut ws).await, json!(1), "SPORTS-1");
    // Both flow at ~100/s for 4 s.
    const TOTAL: i64 = 400;
    let le = insert_trades_at_rate(&db.url, "ELECTION-2028", 1, 100, TOTAL);
    let ls = insert_trades_at_rate(&db.url, "SPORTS-1", 1, 100, TOTAL);
    let (mut e, mut s) = (0i64, 0i64);
    let next = |v: Value, e: &mut i64, s: &mut i64| -> Option<Value> {
        if v["type"] != "trade" {
            return Some(v);
        }
        let pos = match v["market"].as_str() {
            Some("ELECTION-2028") => e,
            Some("SPORTS-1") => s,
            _ => panic!("{v}"),
        };
        assert_eq!(v["seq"].as_i64(), Some(*pos + 1), "gapless: {v}");
        *pos += 1;
        None
    };
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        let v = recv(&mut ws).await;
        assert!(next(v, &mut e, &mut s).is_none());
    }
    assert!(s > 0, "SPORTS-1 trades arrived before the auth");
    let t2 = sign(json!({"exp": unix_now() + 600, "markets": ["ELECTION-*"]}));
    send(&mut ws, json!({"op": "auth", "token": t2, "id": 5})).await;
    // authed, then the unsolicited forbidden for SPORTS-1 (no id), trades of
    // both interleaved until then.
    let mut replies = Vec::new();
    while replies.len() < 2 {
        let v = recv(&mut ws).await;
        if let Some(r) = next(v, &mut e, &mut s) {
            replies.push(r);
        }
    }
    assert_eq!(
        (replies[0]["type"].as_str(), replies[0]["id"].as_i64()),
        (Some("authed"), Some(5)),
        "{}",
        replies[0]
    );
    assert_error(&replies[1], Value::Null, Some("SPORTS-1"), "forbidden");
    // Nothing more for SPORTS-1; ELECTION-2028 gapless to its end.
    le.await.unwrap();
    ls.await.unwrap();
    expect_trades(&mut ws, "ELECTION-2028", e + 1, TOTAL).await;
    expect_silence(&mut ws, Duration::from_millis(500)).await;
    // And a new subscribe to it is forbidden.
    let v = ask(
        &mut ws,
        json!({"op": "subscribe", "market": "SPORTS-1", "id": 6}),
    )
    .await;
    assert_error(&v, json!(6), Some("SPORTS-1"), "forbidden");
    b.stop().await;
}
