//! The writer HTTP surface (PROTOCOL.md section 3) against a real PostgreSQL:
//! markets, trades, idempotent retries, every error path, the write token,
//! paging, batching, health, outages and shutdown.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use marketcast::config::{DbConfig, WriterConfig};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::support::*;

async fn start(db: &TestDb) -> Server {
    writer(writer_config(db)).await
}

async fn get(s: &Server, path: &str) -> (u16, Value) {
    http("GET", &format!("{}{path}", s.http()), &[], None).await
}

async fn post(s: &Server, path: &str, body: &str) -> (u16, Value) {
    http("POST", &format!("{}{path}", s.http()), &[], Some(body)).await
}

async fn post_trade(s: &Server, market: &str, body: Value) -> (u16, Value) {
    post(
        s,
        &format!("/v1/markets/{market}/trades"),
        &body.to_string(),
    )
    .await
}

/// The contract's error: exactly `{"error":{"code","message"}}`.
#[track_caller]
fn assert_error(got: &(u16, Value), status: u16, code: &str) {
    let (st, body) = got;
    assert_eq!(*st, status, "{body}");
    assert_eq!(body.as_object().map(|o| o.len()), Some(1), "{body}");
    let e = &body["error"];
    assert_eq!(e.as_object().map(|o| o.len()), Some(2), "{body}");
    assert_eq!(e["code"], code, "{body}");
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

/// `2026-11-27T05:31:02.123456Z`, checked character by character.
#[track_caller]
fn assert_ts(ts: &str) {
    let b = ts.as_bytes();
    assert_eq!(b.len(), 27, "{ts}");
    for (i, &c) in b.iter().enumerate() {
        let ok = match i {
            4 | 7 => c == b'-',
            10 => c == b'T',
            13 | 16 => c == b':',
            19 => c == b'.',
            26 => c == b'Z',
            _ => c.is_ascii_digit(),
        };
        assert!(ok, "{ts}: byte {i}");
    }
}

/// The trade as the database holds it, in the contract's JSON.
async fn db_trade(c: &tokio_postgres::Client, market: &str, seq: i64) -> Value {
    let r = c
        .query_one(
            "SELECT trade_id, side, price::text, qty, \
             to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') \
             FROM trades WHERE market_id = $1 AND seq = $2",
            &[&market, &seq],
        )
        .await
        .unwrap();
    json!({
        "type": "trade",
        "market": market,
        "seq": seq,
        "trade_id": r.get::<_, i64>(0),
        "side": r.get::<_, String>(1),
        "price": r.get::<_, String>(2),
        "qty": r.get::<_, i64>(3),
        "ts": r.get::<_, String>(4),
    })
}

/// One raw HTTP/1.1 exchange (`Connection: close`), for requests the hyper
/// helper will not send: no Content-Type, chunked bodies.
async fn raw(addr: SocketAddr, head: &str, body: &[u8]) -> (u16, Value) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut req = head.replace('\n', "\r\n").into_bytes();
    req.extend_from_slice(body);
    // The server may answer and close before reading everything; that is fine.
    let _ = s.write_all(&req).await;
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
        .await
        .expect("a response in time")
        .ok();
    let text = String::from_utf8_lossy(&buf);
    let status: u16 = text
        .split(' ')
        .nth(1)
        .unwrap_or_else(|| panic!("no status line in {text:?}"))
        .parse()
        .unwrap();
    let body = text.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

#[tokio::test]
async fn markets_create_get_and_list() {
    let db = TestDb::new().await;
    let s = start(&db).await;
    let c = db.client().await;

    let got = post(
        &s,
        "/v1/markets",
        r#"{"id":"ELECTION-2028","title":"Who wins"}"#,
    )
    .await;
    assert_eq!(got.0, 201, "{}", got.1);
    let (shard, epoch): (i32, String) = {
        let r = c
            .query_one(
                "SELECT shard, epoch FROM markets WHERE id = 'ELECTION-2028'",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert!((0..16).contains(&shard));
    assert!(!epoch.is_empty());
    let created = json!({
        "market": "ELECTION-2028", "title": "Who wins", "status": "open", "shard": shard,
        "epoch": epoch, "head_seq": 0, "last_price": null, "volume": 0,
        // Contract 1.1 section 4.2: no registered broadcaster yet.
        "broadcasters": [],
    });
    assert_eq!(got.1, created);

    // Again: 409, and the first market is untouched.
    let again = post(
        &s,
        "/v1/markets",
        r#"{"id":"ELECTION-2028","title":"other"}"#,
    )
    .await;
    assert_error(&again, 409, "market_exists");
    assert_eq!(
        get(&s, "/v1/markets/ELECTION-2028").await,
        (200, created.clone())
    );

    for bad in [
        json!({"id": "bad id"}),
        json!({"id": "-x"}),
        json!({"id": ""}),
        json!({"id": "é"}),
        json!({"id": "a".repeat(65)}),
        json!({"id": "ok", "title": "t".repeat(1025)}),
    ] {
        assert_error(
            &post(&s, "/v1/markets", &bad.to_string()).await,
            422,
            "invalid",
        );
    }
    for bad in [
        json!({"title": "no id"}),
        json!({"id": 5}),
        json!({"id": null}),
        json!({"id": ["x"]}),
        json!({"id": "ok", "title": 5}),
    ] {
        assert_error(
            &post(&s, "/v1/markets", &bad.to_string()).await,
            400,
            "bad_request",
        );
    }

    // Title is optional; 64 characters is the longest id.
    let long = "Z".repeat(64);
    let got = post(&s, "/v1/markets", &json!({"id": long}).to_string()).await;
    assert_eq!(
        (got.0, &got.1["title"], &got.1["market"]),
        (201, &json!(""), &json!(long))
    );

    assert_error(&get(&s, "/v1/markets/nope").await, 404, "unknown_market");

    // State follows the log.
    c.execute(
        "INSERT INTO trades (market_id, side, price, qty) VALUES ('ELECTION-2028', 'yes', 0.61, 10), ('ELECTION-2028', 'no', 0.3, 5)",
        &[],
    )
    .await
    .unwrap();
    let mut state = created.clone();
    state["head_seq"] = json!(2);
    state["last_price"] = json!("0.7000");
    state["volume"] = json!(15);
    assert_eq!(
        get(&s, "/v1/markets/ELECTION-2028").await,
        (200, state.clone())
    );

    let (st, list) = get(&s, "/v1/markets").await;
    assert_eq!(st, 200);
    let mut long_market = got.1.clone();
    long_market["head_seq"] = json!(0);
    assert_eq!(
        list,
        json!({"markets": [state, long_market], "next": null}),
        "not a full page: next is null (1.1 section 4.3)"
    );
    // A trailing slash names the same resource.
    assert_eq!(get(&s, "/v1/markets/").await.1, list);
    s.stop().await;
}

#[tokio::test]
async fn post_trade_returns_the_trade_and_retries_are_idempotent() {
    let db = TestDb::new().await;
    db.market("ELECTION-2028").await;
    let s = start(&db).await;
    let c = db.client().await;

    let body = json!({"side":"yes","price":"0.63","qty":25,"client_order_id":"abc"});
    let (st, bytes) = http_raw(
        "POST",
        &format!("{}/v1/markets/ELECTION-2028/trades", s.http()),
        &[],
        Some(body.to_string().into()),
    )
    .await
    .unwrap();
    assert_eq!(st, 201);
    let first: Value = serde_json::from_slice(&bytes).unwrap();
    let want = db_trade(&c, "ELECTION-2028", 1).await;
    assert_eq!(first, want);
    assert_eq!(first["price"], "0.6300");
    assert_eq!(first["side"], "yes");
    assert_eq!(first["qty"], 25);
    assert_ts(first["ts"].as_str().unwrap());
    // Byte for byte the `trade` message, field order included.
    let exact = format!(
        r#"{{"type":"trade","market":"ELECTION-2028","seq":1,"trade_id":{},"side":"yes","price":"0.6300","qty":25,"ts":"{}"}}"#,
        want["trade_id"],
        want["ts"].as_str().unwrap()
    );
    assert_eq!(String::from_utf8(bytes.to_vec()).unwrap(), exact);

    // The same client_order_id: 200 with the original, even if the rest differs.
    assert_eq!(
        post_trade(&s, "ELECTION-2028", body.clone()).await,
        (200, first.clone())
    );
    let changed = json!({"side":"no","price":"0.10","qty":1,"client_order_id":"abc"});
    assert_eq!(
        post_trade(&s, "ELECTION-2028", changed).await,
        (200, first.clone())
    );
    let n: i64 = c
        .query_one(
            "SELECT count(*) FROM trades WHERE market_id = 'ELECTION-2028' AND client_order_id = 'abc'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    assert_eq!(seqs(&c, "ELECTION-2028").await, vec![1]);

    // Without client_order_id every POST is a new trade; numbers and short
    // decimals are accepted and normalised.
    let (st, t2) = post_trade(
        &s,
        "ELECTION-2028",
        json!({"side":"no","price":".25","qty":3}),
    )
    .await;
    assert_eq!(
        (st, &t2["seq"], &t2["price"], &t2["side"]),
        (201, &json!(2), &json!("0.2500"), &json!("no"))
    );
    assert_eq!(t2, db_trade(&c, "ELECTION-2028", 2).await);
    let (st, t3) = post_trade(
        &s,
        "ELECTION-2028",
        json!({"side":"yes","price":0.5,"qty":1,"trader":"alice"}),
    )
    .await;
    assert_eq!(
        (st, &t3["seq"], &t3["price"]),
        (201, &json!(3), &json!("0.5000"))
    );
    assert!(t3.get("trader").is_none(), "trader is never sent: {t3}");
    let (st, t4) = post_trade(
        &s,
        "ELECTION-2028",
        json!({"side":"yes","price":"0.0001","qty":1_000_000_000}),
    )
    .await;
    assert_eq!(
        (st, &t4["seq"], &t4["price"], &t4["qty"]),
        (201, &json!(4), &json!("0.0001"), &json!(1_000_000_000))
    );
    let (st, t5) = post_trade(
        &s,
        "ELECTION-2028",
        json!({"side":"no","price":"0.9999","qty":1,"client_order_id":null}),
    )
    .await;
    assert_eq!((st, &t5["seq"]), (201, &json!(5)));
    assert_eq!(seqs(&c, "ELECTION-2028").await, vec![1, 2, 3, 4, 5]);
    let (_, m) = get(&s, "/v1/markets/ELECTION-2028").await;
    assert_eq!(
        (&m["head_seq"], &m["last_price"], &m["volume"]),
        (&json!(5), &json!("0.0001"), &json!(1_000_000_030i64))
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_retries_commit_one_trade() {
    let db = TestDb::new().await;
    db.market("retry").await;
    let s = start(&db).await;
    let url = format!("{}/v1/markets/retry/trades", s.http());
    let body = r#"{"side":"yes","price":"0.42","qty":7,"client_order_id":"same"}"#;
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { http("POST", &url, &[], Some(body)).await })
        })
        .collect();
    let mut statuses = BTreeMap::new();
    let mut bodies = BTreeSet::new();
    for t in tasks {
        let (st, b) = t.await.unwrap();
        *statuses.entry(st).or_insert(0) += 1;
        bodies.insert(b.to_string());
    }
    assert_eq!(statuses, BTreeMap::from([(200, 19), (201, 1)]));
    assert_eq!(bodies.len(), 1, "{bodies:?}");
    let c = db.client().await;
    assert_eq!(seqs(&c, "retry").await, vec![1]);
    let only: Value = serde_json::from_str(bodies.first().unwrap()).unwrap();
    assert_eq!(only, db_trade(&c, "retry", 1).await);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_retries_across_two_writers_commit_one_trade() {
    // Two writer processes race on one client_order_id: the loser's batch
    // meets the unique check and must still answer with the original.
    let db = TestDb::new().await;
    db.market("retry2").await;
    let a = start(&db).await;
    let b = start(&db).await;
    let mut tasks = Vec::new();
    for round in 0..5 {
        for s in [&a, &b] {
            for _ in 0..4 {
                let url = format!("{}/v1/markets/retry2/trades", s.http());
                let body = format!(
                    r#"{{"side":"no","price":"0.3","qty":{},"client_order_id":"r{round}"}}"#,
                    round + 1
                );
                tasks.push((
                    round,
                    tokio::spawn(async move { http("POST", &url, &[], Some(&body)).await }),
                ));
            }
        }
    }
    let mut per_round: BTreeMap<i32, (Vec<u16>, BTreeSet<String>)> = BTreeMap::new();
    for (round, t) in tasks {
        let (st, body) = t.await.unwrap();
        let e = per_round.entry(round).or_default();
        e.0.push(st);
        e.1.insert(body.to_string());
    }
    let c = db.client().await;
    assert_eq!(seqs(&c, "retry2").await, vec![1, 2, 3, 4, 5]);
    let mut seen_seqs = BTreeSet::new();
    for (round, (mut sts, bodies)) in per_round {
        sts.sort();
        assert_eq!(sts, [vec![200; 7], vec![201]].concat(), "round {round}");
        assert_eq!(bodies.len(), 1, "round {round}: {bodies:?}");
        let t: Value = serde_json::from_str(bodies.first().unwrap()).unwrap();
        assert_eq!(t["qty"], round + 1);
        assert_eq!(t, db_trade(&c, "retry2", t["seq"].as_i64().unwrap()).await);
        seen_seqs.insert(t["seq"].as_i64().unwrap());
    }
    assert_eq!(seen_seqs, (1..=5).collect());
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn trade_request_errors() {
    let db = TestDb::new().await;
    db.market("err").await;
    let s = start(&db).await;
    let c = db.client().await;
    let path = "/v1/markets/err/trades";

    // 400: not JSON, not an object, wrong types, missing fields.
    for body in [
        r#"{"side":"#,
        "",
        "nope",
        "[1,2]",
        r#""a string""#,
        "null",
        "42",
    ] {
        assert_error(&post(&s, path, body).await, 400, "bad_request");
    }
    for body in [
        json!({"side": 1, "price": "0.5", "qty": 1}),
        json!({"side": "yes", "price": true, "qty": 1}),
        json!({"side": "yes", "price": null, "qty": 1}),
        json!({"side": "yes", "price": "0.5", "qty": "1"}),
        json!({"side": "yes", "price": "0.5", "qty": 1.5}),
        json!({"side": "yes", "price": "0.5", "qty": null}),
        json!({"side": "yes", "price": "0.5", "qty": 1, "client_order_id": 5}),
        json!({"side": "yes", "price": "0.5", "qty": 1, "trader": []}),
        json!({"price": "0.5", "qty": 1}),
        json!({"side": "yes", "qty": 1}),
        json!({"side": "yes", "price": "0.5"}),
    ] {
        assert_error(&post_trade(&s, "err", body).await, 400, "bad_request");
    }

    // 422: well-formed, invalid values.
    let mut invalid: Vec<Value> = [
        "1.5", "0", "1", "1.0", "0.0000", "0.00001", "0.63000", "-0.1", "abc", "", "0.5e1",
    ]
    .iter()
    .map(|p| json!({"side": "yes", "price": p, "qty": 1}))
    .collect();
    invalid.extend([
        json!({"side": "yes", "price": 1.0, "qty": 1}),
        json!({"side": "yes", "price": 0.12345, "qty": 1}),
        json!({"side": "yes", "price": "0.5", "qty": 0}),
        json!({"side": "yes", "price": "0.5", "qty": -1}),
        json!({"side": "yes", "price": "0.5", "qty": 1_000_000_001}),
        json!({"side": "yes", "price": "0.5", "qty": u64::MAX}),
        json!({"side": "maybe", "price": "0.5", "qty": 1}),
        json!({"side": "YES", "price": "0.5", "qty": 1}),
        json!({"side": "yes", "price": "0.5", "qty": 1, "client_order_id": ""}),
        json!({"side": "yes", "price": "0.5", "qty": 1, "client_order_id": "c".repeat(129)}),
        json!({"side": "yes", "price": "0.5", "qty": 1, "trader": "t".repeat(129)}),
    ]);
    for body in invalid {
        assert_error(&post_trade(&s, "err", body.clone()).await, 422, "invalid");
    }
    // An invalid market id in the path is a value error too.
    assert_error(
        &post_trade(&s, "-bad", json!({"side":"yes","price":"0.5","qty":1})).await,
        422,
        "invalid",
    );

    // 404 unknown market, 409 not open.
    let ok = json!({"side":"yes","price":"0.5","qty":1});
    assert_error(
        &post_trade(&s, "missing", ok.clone()).await,
        404,
        "unknown_market",
    );
    db.market("shut").await;
    c.execute(
        "UPDATE markets SET status = 'closed' WHERE id = 'shut'",
        &[],
    )
    .await
    .unwrap();
    assert_error(
        &post_trade(&s, "shut", ok.clone()).await,
        409,
        "market_not_open",
    );
    c.execute(
        "UPDATE markets SET status = 'resolved' WHERE id = 'shut'",
        &[],
    )
    .await
    .unwrap();
    assert_error(
        &post_trade(&s, "shut", ok.clone()).await,
        409,
        "market_not_open",
    );

    // Nothing above committed anything.
    let n: i64 = c
        .query_one("SELECT count(*) FROM trades", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
    let (st, t) = post_trade(&s, "err", ok).await;
    assert_eq!((st, &t["seq"]), (201, &json!(1)));
    s.stop().await;
}

#[tokio::test]
async fn http_level_errors() {
    let db = TestDb::new().await;
    db.market("h").await;
    let s = start(&db).await;
    let c = db.client().await;
    let url = format!("{}/v1/markets/h/trades", s.http());
    let trade = r#"{"side":"yes","price":"0.5","qty":1}"#;

    // 413: over 16 KiB, by Content-Length and by a chunked body; exactly 16 KiB is fine.
    let pad = |n: usize| format!("{trade:<n$}");
    assert_eq!(pad(16 * 1024).len(), 16 * 1024);
    let (st, _) = http("POST", &url, &[], Some(&pad(16 * 1024))).await;
    assert_eq!(st, 201);
    assert_error(
        &http("POST", &url, &[], Some(&pad(16 * 1024 + 1))).await,
        413,
        "too_large",
    );
    assert_error(
        &http(
            "POST",
            &format!("{}/v1/markets", s.http()),
            &[],
            Some(&format!("{{\"id\":\"{}\"}}", "x".repeat(17_000))),
        )
        .await,
        413,
        "too_large",
    );
    let big = pad(20 * 1024);
    let mut chunked = Vec::new();
    for part in big.as_bytes().chunks(4096) {
        chunked.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
        chunked.extend_from_slice(part);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let got = raw(
        s.addr,
        "POST /v1/markets/h/trades HTTP/1.1\nHost: x\nContent-Type: application/json\nTransfer-Encoding: chunked\nConnection: close\n\n",
        &chunked,
    )
    .await;
    assert_error(&got, 413, "too_large");

    // 415: not JSON, or no Content-Type at all; parameters are allowed.
    for ct in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "application/jsonx",
    ] {
        assert_error(
            &http("POST", &url, &[("content-type", ct)], Some(trade)).await,
            415,
            "unsupported_media_type",
        );
    }
    let head = format!(
        "POST /v1/markets/h/trades HTTP/1.1\nHost: x\nContent-Length: {}\nConnection: close\n\n",
        trade.len()
    );
    assert_error(
        &raw(s.addr, &head, trade.as_bytes()).await,
        415,
        "unsupported_media_type",
    );
    let (st, t) = http(
        "POST",
        &url,
        &[("content-type", "Application/JSON; charset=utf-8")],
        Some(trade),
    )
    .await;
    assert_eq!((st, &t["seq"]), (201, &json!(2)));

    // 405: wrong method on a known path.
    for (method, path) in [
        ("PUT", "/v1/markets/h/trades"),
        ("DELETE", "/v1/markets/h/trades"),
        ("POST", "/v1/markets/h"),
        ("DELETE", "/v1/markets/h"),
        ("PATCH", "/v1/markets"),
    ] {
        let got = http(method, &format!("{}{path}", s.http()), &[], Some("{}")).await;
        assert_error(&got, 405, "method_not_allowed");
    }

    // 404: unknown paths.
    for path in [
        "/",
        "/v2/markets",
        "/v1",
        "/v1/markets/h/trades/1",
        "/v1/trades",
    ] {
        assert_error(&get(&s, path).await, 404, "not_found");
    }

    assert_eq!(seqs(&c, "h").await, vec![1, 2]);
    s.stop().await;
}

#[tokio::test]
async fn write_token_guards_every_post() {
    let db = TestDb::new().await;
    let mut cfg = writer_config(&db);
    cfg.write_token = Some("s3cret".into());
    let s = writer(cfg).await;
    let markets = format!("{}/v1/markets", s.http());
    let trades = format!("{}/v1/markets/tok/trades", s.http());
    let market = r#"{"id":"tok"}"#;
    let trade = r#"{"side":"yes","price":"0.5","qty":1}"#;

    for headers in [
        vec![],
        vec![("authorization", "Bearer nope")],
        vec![("authorization", "Bearer s3cret2")],
        vec![("authorization", "Bearer S3CRET")],
        vec![("authorization", "Basic s3cret")],
        vec![("authorization", "s3cret")],
        vec![("authorization", "Bearer ")],
    ] {
        assert_error(
            &http("POST", &markets, &headers, Some(market)).await,
            401,
            "unauthorized",
        );
        assert_error(
            &http("POST", &trades, &headers, Some(trade)).await,
            401,
            "unauthorized",
        );
    }
    // The token is checked before anything else about the request.
    assert_error(
        &http(
            "POST",
            &trades,
            &[("content-type", "text/plain")],
            Some("x"),
        )
        .await,
        401,
        "unauthorized",
    );

    let auth = [("authorization", "Bearer s3cret")];
    let (st, _) = http("POST", &markets, &auth, Some(market)).await;
    assert_eq!(st, 201);
    let (st, t) = http("POST", &trades, &auth, Some(trade)).await;
    assert_eq!((st, &t["seq"]), (201, &json!(1)));
    let c = db.client().await;
    assert_eq!(seqs(&c, "tok").await, vec![1]);

    // Reads need no token.
    for path in [
        "/v1/markets",
        "/v1/markets/tok",
        "/v1/markets/tok/trades",
        "/healthz",
    ] {
        assert_eq!(get(&s, path).await.0, 200, "{path}");
    }
    let (st, _) = http_raw("GET", &format!("{}/metrics", s.http()), &[], None)
        .await
        .unwrap();
    assert_eq!(st, 200);
    s.stop().await;
}

#[tokio::test]
async fn list_trades_pages_in_seq_order() {
    let db = TestDb::new().await;
    db.market("pg").await;
    let s = start(&db).await;
    let c = db.client().await;
    // Five through the API (their answers must equal the list's entries), the
    // rest through SQL.
    let mut posted = Vec::new();
    for i in 0..5 {
        let (st, t) = post_trade(
            &s,
            "pg",
            json!({"side": if i % 2 == 0 {"yes"} else {"no"}, "price": "0.37", "qty": i + 1}),
        )
        .await;
        assert_eq!(st, 201);
        posted.push(t);
    }
    db.trades("pg", 145).await; // seqs 6..=150
    let page = |q: &'static str| {
        let s = &s;
        async move {
            let (st, v) = get(s, &format!("/v1/markets/pg/trades{q}")).await;
            assert_eq!(st, 200, "{q}: {v}");
            assert_eq!(v.as_object().unwrap().len(), 1, "{v}");
            v["trades"].as_array().unwrap().clone()
        }
    };
    let seq_list = |ts: &[Value]| {
        ts.iter()
            .map(|t| t["seq"].as_i64().unwrap())
            .collect::<Vec<_>>()
    };

    let first = page("").await;
    assert_eq!(
        seq_list(&first),
        (1..=100).collect::<Vec<_>>(),
        "default limit 100"
    );
    assert_eq!(&first[..5], &posted[..]);
    assert_eq!(
        seq_list(&page("?after_seq=0").await),
        (1..=100).collect::<Vec<_>>()
    );
    assert_eq!(
        seq_list(&page("?after_seq=10&limit=5").await),
        vec![11, 12, 13, 14, 15]
    );
    assert_eq!(seq_list(&page("?limit=1&after_seq=149").await), vec![150]);
    assert_eq!(seq_list(&page("?after_seq=150").await), Vec::<i64>::new());
    assert_eq!(seq_list(&page("?after_seq=9999").await), Vec::<i64>::new());
    assert_eq!(
        seq_list(&page("?limit=1000").await),
        (1..=150).collect::<Vec<_>>()
    );
    let all = page("?after_seq=100&limit=1000").await;
    assert_eq!(seq_list(&all), (101..=150).collect::<Vec<_>>());
    assert_eq!(all[49], db_trade(&c, "pg", 150).await);
    for t in &all {
        assert_ts(t["ts"].as_str().unwrap());
    }

    for q in ["?limit=1001", "?limit=0", "?limit=-1", "?after_seq=-1"] {
        assert_error(
            &get(&s, &format!("/v1/markets/pg/trades{q}")).await,
            422,
            "invalid",
        );
    }
    for q in ["?limit=abc", "?after_seq=1.5", "?after_seq="] {
        assert_error(
            &get(&s, &format!("/v1/markets/pg/trades{q}")).await,
            400,
            "bad_request",
        );
    }
    assert_error(
        &get(&s, "/v1/markets/none/trades").await,
        404,
        "unknown_market",
    );
    // An existing market without trades is an empty page, not a 404.
    db.market("empty").await;
    assert_eq!(
        get(&s, "/v1/markets/empty/trades").await,
        (200, json!({"trades": []}))
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_posts_get_gapless_seqs() {
    let db = TestDb::new().await;
    let markets = ["b-a", "b-b", "b-c", "b-d"];
    for m in markets {
        db.market(m).await;
    }
    let mut cfg = writer_config(&db);
    cfg.batch_max = 64;
    let s = writer(cfg).await;
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let url = format!("{}/v1/markets/{}/trades", s.http(), markets[i % 4]);
            let body = json!({"side": "yes", "price": "0.5", "qty": i + 1}).to_string();
            tokio::spawn(async move { (i, http("POST", &url, &[], Some(&body)).await) })
        })
        .collect();
    let mut got: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
    let c = db.client().await;
    let mut answers = Vec::new();
    for t in tasks {
        let (i, (st, t)) = t.await.unwrap();
        assert_eq!(st, 201, "{t}");
        assert_eq!(t["market"], markets[i % 4]);
        assert_eq!(t["qty"], i + 1);
        got.entry(markets[i % 4])
            .or_default()
            .push(t["seq"].as_i64().unwrap());
        answers.push(t);
    }
    for m in markets {
        let mut v = got[m].clone();
        v.sort();
        assert_eq!(v, (1..=16).collect::<Vec<_>>(), "{m}");
        assert_eq!(seqs(&c, m).await, (1..=16).collect::<Vec<_>>(), "{m}");
    }
    // Every answer is the trade exactly as committed.
    for t in answers {
        assert_eq!(
            t,
            db_trade(
                &c,
                t["market"].as_str().unwrap(),
                t["seq"].as_i64().unwrap()
            )
            .await
        );
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_burst_with_mixed_outcomes() {
    let db = TestDb::new().await;
    for m in ["mix-a", "mix-b", "mix-c"] {
        db.market(m).await;
    }
    let c = db.client().await;
    c.execute(
        "INSERT INTO trades (market_id, side, price, qty, client_order_id) VALUES ('mix-a', 'yes', 0.5, 100, 'dup-1')",
        &[],
    )
    .await
    .unwrap();
    c.execute(
        "UPDATE markets SET status = 'closed' WHERE id = 'mix-c'",
        &[],
    )
    .await
    .unwrap();
    let original = db_trade(&c, "mix-a", 1).await;
    let mut cfg = writer_config(&db);
    cfg.batch_max = 64;
    // Long enough that the whole burst lands in one batch (the outcomes must be
    // right however it is split).
    cfg.batch_linger = Duration::from_millis(300);
    let s = writer(cfg).await;

    #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
    enum Kind {
        A,
        B,
        Closed,
        Missing,
        Dup1,
        Dup2,
    }
    let mut plan = Vec::new();
    for _ in 0..10 {
        plan.push((
            Kind::A,
            "mix-a",
            json!({"side":"yes","price":"0.4","qty":1}),
        ));
        plan.push((Kind::B, "mix-b", json!({"side":"no","price":"0.4","qty":2})));
    }
    for _ in 0..3 {
        plan.push((
            Kind::Closed,
            "mix-c",
            json!({"side":"yes","price":"0.4","qty":3}),
        ));
        plan.push((
            Kind::Missing,
            "mix-z",
            json!({"side":"yes","price":"0.4","qty":4}),
        ));
        plan.push((
            Kind::Dup1,
            "mix-a",
            json!({"side":"yes","price":"0.4","qty":5,"client_order_id":"dup-1"}),
        ));
        plan.push((
            Kind::Dup2,
            "mix-a",
            json!({"side":"yes","price":"0.4","qty":6,"client_order_id":"dup-2"}),
        ));
    }
    let tasks: Vec<_> = plan
        .into_iter()
        .map(|(k, m, body)| {
            let url = format!("{}/v1/markets/{m}/trades", s.http());
            tokio::spawn(async move { (k, http("POST", &url, &[], Some(&body.to_string())).await) })
        })
        .collect();
    let mut by_kind: BTreeMap<Kind, Vec<(u16, Value)>> = BTreeMap::new();
    for t in tasks {
        let (k, r) = t.await.unwrap();
        by_kind.entry(k).or_default().push(r);
    }
    let created_seqs = |k: Kind| {
        by_kind[&k]
            .iter()
            .map(|(st, t)| {
                assert_eq!(*st, 201, "{k:?}: {t}");
                t["seq"].as_i64().unwrap()
            })
            .collect::<Vec<_>>()
    };
    let mut b = created_seqs(Kind::B);
    b.sort();
    assert_eq!(b, (1..=10).collect::<Vec<_>>());
    for r in &by_kind[&Kind::Closed] {
        assert_error(r, 409, "market_not_open");
    }
    for r in &by_kind[&Kind::Missing] {
        assert_error(r, 404, "unknown_market");
    }
    for r in &by_kind[&Kind::Dup1] {
        assert_eq!(r, &(200, original.clone()));
    }
    // dup-2 is new: one 201, the others 200 with that same trade.
    let dup2 = &by_kind[&Kind::Dup2];
    let mut sts: Vec<u16> = dup2.iter().map(|r| r.0).collect();
    sts.sort();
    assert_eq!(sts, vec![200, 200, 201]);
    assert!(dup2.iter().all(|r| r.1 == dup2[0].1), "{dup2:?}");
    let mut a = created_seqs(Kind::A);
    a.push(dup2[0].1["seq"].as_i64().unwrap());
    a.sort();
    assert_eq!(a, (2..=12).collect::<Vec<_>>());

    assert_eq!(seqs(&c, "mix-a").await, (1..=12).collect::<Vec<_>>());
    assert_eq!(seqs(&c, "mix-b").await, (1..=10).collect::<Vec<_>>());
    assert_eq!(seqs(&c, "mix-c").await, Vec::<i64>::new());
    assert_eq!(
        dup2[0].1,
        db_trade(&c, "mix-a", dup2[0].1["seq"].as_i64().unwrap()).await
    );
    s.stop().await;
}

#[tokio::test]
async fn healthz_and_metrics() {
    let db = TestDb::new().await;
    let s = start(&db).await;
    assert_eq!(
        get(&s, "/healthz").await,
        (200, json!({"status": "ok", "protocol": "1.1"}))
    );
    assert_error(&get(&s, "/v1/markets/none").await, 404, "unknown_market");
    let (st, body) = http_raw("GET", &format!("{}/metrics", s.http()), &[], None)
        .await
        .unwrap();
    assert_eq!(st, 200);
    let text = String::from_utf8(body.to_vec()).unwrap();
    assert!(text.contains("marketcast_writer_requests_total"), "{text}");
    assert!(text.contains("route=\"healthz\""), "{text}");
    s.stop().await;
}

/// A server that accepts TCP connections and never says a word: a database
/// that hangs rather than refuses.
async fn black_hole() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = l.accept().await {
            held.push(sock);
        }
    });
    (addr, task)
}

/// Every database-touching endpoint answers 503 `unavailable` within `bound`.
async fn assert_unavailable(s: &Server, bound: Duration) {
    let trade = r#"{"side":"yes","price":"0.5","qty":1,"client_order_id":"o1"}"#;
    let t0 = Instant::now();
    let (post_trade, post_market, get_market, list, health) = tokio::join!(
        post(s, "/v1/markets/m/trades", trade),
        post(s, "/v1/markets", r#"{"id":"m2"}"#),
        get(s, "/v1/markets/m"),
        get(s, "/v1/markets/m/trades"),
        get(s, "/healthz"),
    );
    let took = t0.elapsed();
    assert!(took < bound, "answered in {took:?}, bound {bound:?}");
    for r in [&post_trade, &post_market, &get_market, &list] {
        assert_error(r, 503, "unavailable");
    }
    assert_eq!(health.0, 503, "{}", health.1);
    assert_eq!(health.1["status"], "unavailable");
    // Requests keep being answered, not queued behind the outage.
    let t0 = Instant::now();
    assert_error(
        &post(s, "/v1/markets/m/trades", trade).await,
        503,
        "unavailable",
    );
    assert!(t0.elapsed() < bound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_refused_port_answers_503() {
    let s = writer(WriterConfig::new(DbConfig::new(
        "postgres://postgres@127.0.0.1:1/x",
    )))
    .await;
    assert_unavailable(&s, Duration::from_secs(6)).await;
    s.stop().await;

    let mut db = DbConfig::new("postgres://postgres@127.0.0.1:1/x");
    db.timeout = Duration::from_millis(500);
    let s = writer(WriterConfig::new(db)).await;
    assert_unavailable(&s, Duration::from_secs(2)).await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_hanging_database_answers_503_within_the_default_bound() {
    let (addr, hole) = black_hole().await;
    let url = format!("postgres://postgres@{addr}/x");
    // The default 5 s database timeout.
    let s = writer(WriterConfig::new(DbConfig::new(url.clone()))).await;
    assert_unavailable(&s, Duration::from_secs(6)).await;
    s.stop().await;

    let mut db = DbConfig::new(url);
    db.timeout = Duration::from_millis(500);
    let s = writer(WriterConfig::new(db)).await;
    assert_unavailable(&s, Duration::from_secs(2)).await;
    s.stop().await;
    hole.abort();
}

/// A write transaction that times out (here waiting for a market lock that
/// a SQL session holds) is rolled back before its connection is used again:
/// with a pool of one connection, every later request would otherwise land
/// in the aborted transaction and fail. Both paths: a batch (lock statement
/// first) and a lone trade (its INSERT waits in the trigger).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_transaction_leaves_its_connection_clean() {
    let db = TestDb::new().await;
    for m in ["lk-a", "lk-b"] {
        db.market(m).await;
    }
    let mut cfg = writer_config(&db);
    cfg.db.pool_size = 1;
    cfg.db.timeout = Duration::from_millis(1000);
    // Long enough that the first two requests below form one batch.
    cfg.batch_linger = Duration::from_millis(200);
    let s = writer(cfg).await;
    let mut holder = db.client().await;
    let lock = holder.transaction().await.unwrap();
    lock.execute("SELECT 1 FROM markets WHERE id = 'lk-a' FOR UPDATE", &[])
        .await
        .unwrap();
    let body = json!({"side": "yes", "price": "0.5", "qty": 1});
    // A batch of two, then a lone trade: each times out on the lock.
    let (a, b) = tokio::join!(
        post_trade(&s, "lk-a", body.clone()),
        post_trade(&s, "lk-b", body.clone())
    );
    assert_error(&a, 503, "unavailable");
    assert_error(&b, 503, "unavailable");
    assert_error(
        &post_trade(&s, "lk-a", body.clone()).await,
        503,
        "unavailable",
    );
    lock.rollback().await.unwrap();
    let c = db.client().await;
    for seq in 1..=3 {
        for m in ["lk-a", "lk-b"] {
            let (st, t) = post_trade(&s, m, body.clone()).await;
            assert_eq!(st, 201, "{m}: {t}");
            assert_eq!(t["seq"], seq, "{m}: {t}");
        }
    }
    // Nothing of the timed-out requests committed.
    assert_eq!(seqs(&c, "lk-a").await, vec![1, 2, 3]);
    assert_eq!(seqs(&c, "lk-b").await, vec![1, 2, 3]);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_clean() {
    let db = TestDb::new().await;
    db.market("sd").await;
    let s = start(&db).await;
    let (st, t) = post_trade(&s, "sd", json!({"side":"yes","price":"0.5","qty":1})).await;
    assert_eq!((st, &t["seq"]), (201, &json!(1)));
    s.stop().await;

    // Stopping under load: every request that was answered 201 committed
    // exactly what it said.
    let s = start(&db).await;
    let url = format!("{}/v1/markets/sd/trades", s.http());
    let tasks: Vec<_> = (0..30)
        .map(|i| {
            let url = url.clone();
            let body = json!({"side":"no","price":"0.5","qty":i + 2}).to_string();
            tokio::spawn(async move { try_http("POST", &url, &[], Some(&body)).await })
        })
        .collect();
    let (st, _) = post_trade(&s, "sd", json!({"side":"yes","price":"0.5","qty":1000})).await;
    assert_eq!(st, 201);
    s.stop().await;
    let c = db.client().await;
    let mut ok = 0;
    for t in tasks {
        if let Ok((201, t)) = t.await.unwrap() {
            ok += 1;
            assert_eq!(t, db_trade(&c, "sd", t["seq"].as_i64().unwrap()).await);
        }
    }
    let all = seqs(&c, "sd").await;
    assert_eq!(all, (1..=all.len() as i64).collect::<Vec<_>>());
    assert_eq!(all.len(), ok + 2, "every committed trade was answered 201");
}

#[tokio::test]
async fn nul_in_text_fields_is_invalid() {
    // Valid JSON, but Postgres text cannot hold NUL.
    let db = TestDb::new().await;
    db.market("nul").await;
    let s = start(&db).await;
    assert_error(
        &post(&s, "/v1/markets", r#"{"id":"n2","title":"a\u0000b"}"#).await,
        422,
        "invalid",
    );
    for field in ["client_order_id", "trader"] {
        let body = format!(r#"{{"side":"yes","price":"0.5","qty":1,"{field}":"a\u0000b"}}"#);
        assert_error(
            &post(&s, "/v1/markets/nul/trades", &body).await,
            422,
            "invalid",
        );
    }
    let c = db.client().await;
    assert_eq!(seqs(&c, "nul").await, Vec::<i64>::new());
    s.stop().await;
}

/// A TCP proxy to Postgres that, the first time it sees a COMMIT go by,
/// forwards it and then cuts the client off: the transaction commits, the
/// writer cannot know. The returned Notify fires once Postgres has answered
/// that COMMIT (so the test never races the commit it cut).
async fn commit_cutter(pg: SocketAddr) -> (SocketAddr, Arc<Notify>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let cut = Arc::new(AtomicBool::new(false));
    let committed = Arc::new(Notify::new());
    let done = committed.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = l.accept().await {
            let Ok(server) = TcpStream::connect(pg).await else {
                continue;
            };
            let (cut, done) = (cut.clone(), done.clone());
            let (mut cr, cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            let kill = tokio_util::sync::CancellationToken::new();
            let k = kill.clone();
            // Writer -> Postgres.
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match cr.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    let chunk = &buf[..n];
                    if sw.write_all(chunk).await.is_err() {
                        return;
                    }
                    if chunk.windows(6).any(|w| w == b"COMMIT") && !cut.swap(true, Ordering::SeqCst)
                    {
                        k.cancel();
                        // Hold both halves (the writer's socket stays half
                        // open, Postgres's stays open) until the test ends.
                        std::future::pending::<()>().await;
                    }
                }
            });
            // Postgres -> writer, until the cut; then only watch for the
            // COMMIT's CommandComplete.
            tokio::spawn(async move {
                let mut cw = Some(cw);
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    tokio::select! {
                        biased;
                        _ = kill.cancelled(), if cw.is_some() => {
                            cw = None; // the writer reads EOF
                        }
                        r = sr.read(&mut buf) => {
                            let n = match r {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            match cw.as_mut() {
                                Some(w) => {
                                    if w.write_all(&buf[..n]).await.is_err() {
                                        return;
                                    }
                                }
                                None => {
                                    if buf[..n].windows(6).any(|w| w == b"COMMIT") {
                                        done.notify_one();
                                        return;
                                    }
                                }
                            }
                        }
                    }
                }
            });
        }
    });
    (addr, committed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_lost_during_batch_commit_is_not_redone() {
    let db = TestDb::new().await;
    db.market("cut").await;
    let u = url::Url::parse(&db.writer_url()).unwrap();
    let pg: SocketAddr = format!("{}:{}", u.host_str().unwrap(), u.port().unwrap())
        .parse()
        .unwrap();
    let (proxy, committed) = commit_cutter(pg).await;
    let mut via = u.clone();
    via.set_port(Some(proxy.port())).unwrap();
    let mut cfg = WriterConfig::new(DbConfig::new(via.to_string()));
    cfg.batch_linger = Duration::from_millis(300);
    let s = writer(cfg).await;
    let tasks: Vec<_> = (0..5)
        .map(|i| {
            let url = format!("{}/v1/markets/cut/trades", s.http());
            let body = json!({"side":"yes","price":"0.5","qty":i + 1}).to_string();
            tokio::spawn(async move { http("POST", &url, &[], Some(&body)).await })
        })
        .collect();
    let mut unknown = 0;
    for t in tasks {
        let r = t.await.unwrap();
        if r.0 == 500 {
            assert_error(&r, 500, "outcome_unknown");
            unknown += 1;
        } else {
            assert_eq!(r.0, 201, "{}", r.1);
        }
    }
    tokio::time::timeout(WAIT, committed.notified())
        .await
        .expect("the cut COMMIT completed in Postgres");
    // Each trade committed exactly once: the cut batch was not redone.
    let c = db.client().await;
    assert_eq!(
        seqs(&c, "cut").await,
        vec![1, 2, 3, 4, 5],
        "{unknown} unknown"
    );
    assert!(unknown >= 1, "the cut COMMIT was reported as unknown");
    s.stop().await;
}

// ---------------------------------------------------------------- tokens
//
// Contract 1.1 section 4.1: tokens authorize writes per market and bind reads.

mod tokens {
    use std::time::Duration;

    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    use marketcast::protocol::token::Verifier;
    use serde_json::{json, Value};

    use super::{assert_error, get};
    use crate::support::*;

    const SECRET: &str = "test-only-writer-secret-of-32-bytes-or-more";
    const WRITE_TOKEN: &str = "static-write-token";
    const RSA_PUB: &str = include_str!("../keys/test-only-rsa-2048.pub.pem");
    const RSA_KEY: &str = include_str!("../keys/test-only-rsa-2048.key.pem");

    fn now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    fn sign(alg: Algorithm, key: &EncodingKey, claims: Value) -> String {
        jsonwebtoken::encode(&Header::new(alg), &claims, key).unwrap()
    }

    fn hs256(claims: Value) -> String {
        sign(
            Algorithm::HS256,
            &EncodingKey::from_secret(SECRET.as_bytes()),
            claims,
        )
    }

    /// A writer with the HS256 secret, the RSA public key and the write
    /// token, as `cfg` otherwise says.
    async fn writer_with_tokens(db: &TestDb, require_token: bool) -> Server {
        let mut cfg = writer_config(db);
        cfg.write_token = Some(WRITE_TOKEN.into());
        cfg.tokens.verifier =
            Verifier::new(Some(SECRET), Some(RSA_PUB), Duration::from_secs(30)).unwrap();
        cfg.tokens.require_token = require_token;
        writer(cfg).await
    }

    /// (status, WWW-Authenticate, body) of a request with `Authorization: auth`.
    async fn call(
        s: &Server,
        method: &str,
        path: &str,
        auth: Option<&str>,
        body: Option<&str>,
    ) -> (u16, Option<String>, Value) {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("authorization", a)).into_iter().collect();
        let (st, h, bytes) = http_response(
            method,
            &format!("{}{path}", s.http()),
            &headers,
            body.map(|b| b.to_string().into()),
        )
        .await
        .unwrap();
        let challenge = h
            .get("www-authenticate")
            .map(|v| v.to_str().unwrap().to_string());
        (
            st,
            challenge,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    /// A 401 with `WWW-Authenticate: Bearer` and the contract's error body.
    #[track_caller]
    fn assert_401(got: &(u16, Option<String>, Value), code: &str) {
        assert_eq!(got.1.as_deref(), Some("Bearer"), "{}", got.2);
        assert_error(&(got.0, got.2.clone()), 401, code);
    }

    /// `marketcast_auth_failures_total{reason}` as `/metrics` shows it (0
    /// before its first count). The recorder is shared by every test of the
    /// process, so tests compare it before and after, at least.
    async fn auth_failures(s: &Server, reason: &str) -> u64 {
        let (_, text) = http_raw("GET", &format!("{}/metrics", s.http()), &[], None)
            .await
            .unwrap();
        let prefix = format!("marketcast_auth_failures_total{{reason=\"{reason}\"}} ");
        String::from_utf8_lossy(&text)
            .lines()
            .find_map(|l| l.strip_prefix(&prefix).map(|v| v.parse().unwrap()))
            .unwrap_or(0)
    }

    const TRADE: &str = r#"{"side":"yes","price":"0.5","qty":1}"#;

    #[tokio::test]
    async fn a_write_claim_grants_only_its_markets() {
        let db = TestDb::new().await;
        for m in ["ELECTION-2028", "SPORTS-1"] {
            db.market(m).await;
        }
        let s = writer_with_tokens(&db, false).await;
        let c = db.client().await;
        let forbidden_before = auth_failures(&s, "forbidden").await;
        let token = hs256(json!({"exp": now() + 3600, "write": ["ELECTION-*"]}));
        let auth = format!("Bearer {token}");
        let post = |path: &'static str, body: &'static str| {
            let (s, auth) = (&s, auth.as_str());
            async move { call(s, "POST", path, Some(auth), Some(body)).await }
        };

        let (st, _, t) = post("/v1/markets/ELECTION-2028/trades", TRADE).await;
        assert_eq!((st, &t["seq"]), (201, &json!(1)), "{t}");
        let (st, challenge, body) = post("/v1/markets/SPORTS-1/trades", TRADE).await;
        assert_error(&(st, body), 403, "forbidden");
        assert_eq!(challenge, None, "a 403 is no authentication challenge");
        assert_eq!(seqs(&c, "SPORTS-1").await, Vec::<i64>::new());

        // POST /v1/markets: the market is the body's id.
        let (st, _, m) = post("/v1/markets", r#"{"id":"ELECTION-2032"}"#).await;
        assert_eq!((st, &m["market"]), (201, &json!("ELECTION-2032")), "{m}");
        let (st, _, body) = post("/v1/markets", r#"{"id":"SPORTS-2"}"#).await;
        assert_error(&(st, body), 403, "forbidden");
        let (st, _, body) = post("/v1/markets", r#"{"id":"election-2033"}"#).await;
        assert_error(&(st, body), 403, "forbidden");

        // The order of checks: 400 and 422 before 403, 403 before 404.
        let (st, _, body) = post("/v1/markets/SPORTS-1/trades", r#"{"side":"yes"}"#).await;
        assert_error(&(st, body), 400, "bad_request");
        let (st, _, body) = post(
            "/v1/markets/SPORTS-1/trades",
            r#"{"side":"yes","price":"0.5","qty":0}"#,
        )
        .await;
        assert_error(&(st, body), 422, "invalid");
        let (st, _, body) = post("/v1/markets/-bad/trades", TRADE).await;
        assert_error(&(st, body), 422, "invalid");
        let (st, _, body) = post("/v1/markets/SPORTS-404/trades", TRADE).await;
        assert_error(&(st, body), 403, "forbidden");
        let (st, _, body) = post("/v1/markets/ELECTION-404/trades", TRADE).await;
        assert_error(&(st, body), 404, "unknown_market");
        let (st, _, body) = post("/v1/markets", r#"{"id":"ELECTION-2028"}"#).await;
        assert_error(&(st, body), 409, "market_exists");

        // A token without a write claim writes nothing.
        let reader = format!(
            "Bearer {}",
            hs256(json!({"exp": now() + 3600, "markets": ["*"]}))
        );
        let (st, _, body) = call(
            &s,
            "POST",
            "/v1/markets/ELECTION-2028/trades",
            Some(&reader),
            Some(TRADE),
        )
        .await;
        assert_error(&(st, body), 403, "forbidden");

        assert_eq!(seqs(&c, "ELECTION-2028").await, vec![1]);
        assert_eq!(seqs(&c, "SPORTS-1").await, Vec::<i64>::new());
        let forbidden = auth_failures(&s, "forbidden").await - forbidden_before;
        assert!(forbidden >= 5, "{forbidden} forbidden counted");
        s.stop().await;
    }

    #[tokio::test]
    async fn refused_tokens_are_401_with_a_bearer_challenge() {
        let db = TestDb::new().await;
        db.market("ELECTION-2028").await;
        let s = writer_with_tokens(&db, false).await;
        let (invalid_before, expired_before, missing_before) = (
            auth_failures(&s, "invalid").await,
            auth_failures(&s, "expired").await,
            auth_failures(&s, "missing").await,
        );
        let grant = json!({"exp": now() + 3600, "write": ["*"]});
        let b64 = |v: &Value| URL_SAFE_NO_PAD.encode(v.to_string());
        let invalid = [
            (
                "forged",
                sign(
                    Algorithm::HS256,
                    &EncodingKey::from_secret(b"not-the-secret-but-just-as-long-as-it!!"),
                    grant.clone(),
                ),
            ),
            (
                "wrong alg",
                sign(
                    Algorithm::HS512,
                    &EncodingKey::from_secret(SECRET.as_bytes()),
                    grant.clone(),
                ),
            ),
            (
                "alg none",
                format!("{}.{}.", b64(&json!({"alg": "none"})), b64(&grant)),
            ),
            (
                "HS256 keyed with the public key",
                sign(
                    Algorithm::HS256,
                    &EncodingKey::from_secret(RSA_PUB.as_bytes()),
                    grant.clone(),
                ),
            ),
            (
                "a bad pattern",
                hs256(json!({"exp": now() + 3600, "write": ["EL*ECTION-2028"]})),
            ),
            ("garbage", "not-a-token".to_string()),
        ];
        let expired = [
            (
                "expired",
                hs256(json!({"exp": now() - 3600, "write": ["*"]})),
            ),
            (
                "not yet valid",
                hs256(json!({"exp": now() + 7200, "nbf": now() + 3600, "write": ["*"]})),
            ),
        ];
        for (what, token) in invalid.iter().chain(&expired) {
            let auth = format!("Bearer {token}");
            for (path, body) in [
                ("/v1/markets/ELECTION-2028/trades", TRADE),
                ("/v1/markets", r#"{"id":"ELECTION-2029"}"#),
            ] {
                let got = call(&s, "POST", path, Some(&auth), Some(body)).await;
                assert_eq!(got.0, 401, "{what}: {}", got.2);
                assert_401(&got, "invalid_token");
                let message = got.2["error"]["message"].as_str().unwrap();
                assert!(!message.contains(token.as_str()), "{what}: {message}");
            }
            // Before anything else about the request.
            let got = call(&s, "POST", "/v1/markets/x/trades", Some(&auth), Some("{")).await;
            assert_401(&got, "invalid_token");
        }
        for auth in [None, Some("Basic dXNlcjpwYXNz")] {
            let got = call(
                &s,
                "POST",
                "/v1/markets/ELECTION-2028/trades",
                auth,
                Some(TRADE),
            )
            .await;
            assert_401(&got, "unauthorized");
        }

        // What is accepted beside them: the write token, an RS256 token.
        let (st, _, t) = call(
            &s,
            "POST",
            "/v1/markets/ELECTION-2028/trades",
            Some(&format!("Bearer {WRITE_TOKEN}")),
            Some(TRADE),
        )
        .await;
        assert_eq!((st, &t["seq"]), (201, &json!(1)), "{t}");
        let rs256 = sign(
            Algorithm::RS256,
            &EncodingKey::from_rsa_pem(RSA_KEY.as_bytes()).unwrap(),
            grant.clone(),
        );
        let (st, _, t) = call(
            &s,
            "POST",
            "/v1/markets/ELECTION-2028/trades",
            Some(&format!("Bearer {rs256}")),
            Some(TRADE),
        )
        .await;
        assert_eq!((st, &t["seq"]), (201, &json!(2)), "{t}");
        let c = db.client().await;
        assert_eq!(seqs(&c, "ELECTION-2028").await, vec![1, 2]);

        // Each refusal counted by its reason (at least: tests share the recorder).
        let grew = |before: u64, after: u64, n: u64| after - before >= n;
        assert!(grew(invalid_before, auth_failures(&s, "invalid").await, 18));
        assert!(grew(expired_before, auth_failures(&s, "expired").await, 6));
        assert!(grew(missing_before, auth_failures(&s, "missing").await, 2));
        s.stop().await;
    }

    #[tokio::test]
    async fn reads_are_bound_by_the_markets_claim() {
        let db = TestDb::new().await;
        for m in ["A-1", "A-2", "A_3", "B-1", "C-1", "C-10"] {
            db.market(m).await;
        }
        db.trades("B-1", 2).await;
        let s = writer_with_tokens(&db, false).await;
        let token = hs256(json!({
            "exp": now() + 3600, "markets": ["A-*", "C-1"], "write": ["B-1"],
        }));
        let auth = format!("Bearer {token}");
        let read = |path: String| {
            let (s, auth) = (&s, auth.as_str());
            async move {
                let (st, _, body) = call(s, "GET", &path, Some(auth), None).await;
                (st, body)
            }
        };
        let ids = |body: &Value| -> Vec<String> {
            body["markets"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["market"].as_str().unwrap().to_string())
                .collect()
        };

        // The list holds only the granted markets, and pages over them alone.
        let (st, body) = read("/v1/markets".into()).await;
        assert_eq!(st, 200, "{body}");
        assert_eq!(ids(&body), ["A-1", "A-2", "C-1"]);
        assert_eq!(
            (body.get("next_after"), &body["next"]),
            (None, &Value::Null)
        );
        let (st, body) = read("/v1/markets?limit=2".into()).await;
        assert_eq!((st, ids(&body)), (200, vec!["A-1".into(), "A-2".into()]));
        assert_eq!(
            (&body["next_after"], &body["next"]),
            (&json!("A-2"), &json!("A-2"))
        );
        let (st, body) = read("/v1/markets?limit=2&after=A-2".into()).await;
        assert_eq!((st, ids(&body)), (200, vec!["C-1".to_string()]));
        assert_eq!(
            (body.get("next_after"), &body["next"]),
            (None, &Value::Null)
        );
        // Without a token (not required): every market, as in v1.
        let (st, body) = get(&s, "/v1/markets").await;
        assert_eq!(st, 200);
        assert_eq!(ids(&body), ["A-1", "A-2", "A_3", "B-1", "C-1", "C-10"]);

        for id in ["A-1", "C-1"] {
            let (st, body) = read(format!("/v1/markets/{id}")).await;
            assert_eq!((st, &body["market"]), (200, &json!(id)), "{body}");
            let (st, body) = read(format!("/v1/markets/{id}/trades")).await;
            assert_eq!((st, &body["trades"]), (200, &json!([])), "{body}");
        }
        // `write` grants no reading; 403 comes before 404 and after 400/422.
        for id in ["B-1", "C-10", "A_3", "Z-404"] {
            let (st, body) = read(format!("/v1/markets/{id}")).await;
            assert_error(&(st, body), 403, "forbidden");
            let (st, body) = read(format!("/v1/markets/{id}/trades")).await;
            assert_error(&(st, body), 403, "forbidden");
        }
        let (st, body) = read("/v1/markets/A-404".into()).await;
        assert_error(&(st, body), 404, "unknown_market");
        let (st, body) = read("/v1/markets/B-1/trades?limit=0".into()).await;
        assert_error(&(st, body), 422, "invalid");
        // Without a token B-1's trades are there (v1).
        let (st, body) = get(&s, "/v1/markets/B-1/trades").await;
        assert_eq!(
            (st, body["trades"].as_array().map(Vec::len)),
            (200, Some(2))
        );

        // A presented invalid token is refused even where none is needed.
        let expired = format!(
            "Bearer {}",
            hs256(json!({"exp": now() - 60, "markets": ["*"]}))
        );
        for path in ["/v1/markets", "/v1/markets/A-1", "/v1/markets/A-1/trades"] {
            for auth in [expired.as_str(), "Bearer x.y.z"] {
                assert_401(
                    &call(&s, "GET", path, Some(auth), None).await,
                    "invalid_token",
                );
            }
        }
        // Monitoring never needs a token, nor looks at one.
        for path in ["/healthz", "/metrics"] {
            let (st, _, _) = call(&s, "GET", path, Some("Bearer x.y.z"), None).await;
            assert_eq!(st, 200, "{path}");
        }
        s.stop().await;
    }

    #[tokio::test]
    async fn require_token_makes_reads_need_one() {
        let db = TestDb::new().await;
        db.market("A-1").await;
        let s = writer_with_tokens(&db, true).await;
        for path in ["/v1/markets", "/v1/markets/A-1", "/v1/markets/A-1/trades"] {
            assert_401(&call(&s, "GET", path, None, None).await, "unauthorized");
            let basic = call(&s, "GET", path, Some("Basic dXNlcjpwYXNz"), None).await;
            assert_401(&basic, "unauthorized");
            let token = hs256(json!({"exp": now() + 60, "markets": ["A-1"]}));
            let (st, _, body) = call(&s, "GET", path, Some(&format!("Bearer {token}")), None).await;
            assert_eq!(st, 200, "{path}: {body}");
            // The write token grants every market, reading included.
            let (st, _, body) = call(
                &s,
                "GET",
                path,
                Some(&format!("Bearer {WRITE_TOKEN}")),
                None,
            )
            .await;
            assert_eq!(st, 200, "{path}: {body}");
        }
        for path in ["/healthz", "/metrics"] {
            assert_eq!(call(&s, "GET", path, None, None).await.0, 200, "{path}");
        }
        s.stop().await;
    }
}
