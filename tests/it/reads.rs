//! The broadcaster's HTTP read path (contract 1.1 section 3): SSE streams
//! read by an independent SSE parser written here from the HTML standard's
//! event-stream rules (fields `id`, `event`, `data`, comments, a blank line
//! dispatches), and the catch-up / long-poll route, with the order of
//! checks, CORS and caching.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::Value;
use tokio::net::TcpStream;

use crate::support::*;

/// One dispatched event.
#[derive(Debug, Clone)]
struct Event {
    id: Option<String>,
    event: String,
    data: Value,
}

/// An SSE response being read.
struct Sse {
    status: u16,
    headers: hyper::HeaderMap,
    body: Option<Incoming>,
    buf: BytesMut,
    /// Comment lines seen (keep-alives).
    comments: usize,
}

/// GET `url` as an `EventSource` would (plus `headers`).
async fn sse(url: &str, headers: &[(&str, &str)]) -> Sse {
    let u = url::Url::parse(url).unwrap();
    let tcp = TcpStream::connect(format!("{}:{}", u.host_str().unwrap(), u.port().unwrap()))
        .await
        .unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let path = match u.query() {
        Some(q) => format!("{}?{q}", u.path()),
        None => u.path().to_string(),
    };
    let mut req = hyper::Request::builder()
        .uri(path)
        .header("host", u.host_str().unwrap())
        .header("accept", "text/event-stream");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = tokio::time::timeout(
        WAIT,
        sender.send_request(req.body(Full::new(Bytes::new())).unwrap()),
    )
    .await
    .expect("an answer in time")
    .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    Sse {
        status,
        headers,
        body: Some(resp.into_body()),
        buf: BytesMut::new(),
        comments: 0,
    }
}

impl Sse {
    /// The next event; None when the stream ended.
    async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(at) = find(&self.buf, b"\n\n") {
                let block = self.buf.split_to(at + 2);
                let text = std::str::from_utf8(&block).expect("UTF-8 events");
                let (mut id, mut event, mut data) = (None, "message".to_string(), String::new());
                let mut any = false;
                for line in text.lines() {
                    if line.is_empty() {
                        continue;
                    }
                    if line.starts_with(':') {
                        self.comments += 1;
                        continue;
                    }
                    any = true;
                    let (k, v) = line.split_once(':').unwrap_or((line, ""));
                    let v = v.strip_prefix(' ').unwrap_or(v);
                    match k {
                        "id" => id = Some(v.to_string()),
                        "event" => event = v.to_string(),
                        "data" => {
                            if !data.is_empty() {
                                data.push('\n');
                            }
                            data.push_str(v)
                        }
                        other => panic!("unknown field {other:?} in {text:?}"),
                    }
                }
                if !any {
                    continue;
                }
                let data = serde_json::from_str(&data).unwrap_or_else(|e| panic!("{e}: {data}"));
                // Every event must be one docs/asyncapi.yaml allows.
                crate::contract::check_sse(&event, &data);
                return Some(Event { id, event, data });
            }
            let body = self.body.as_mut()?;
            match tokio::time::timeout(WAIT, body.frame())
                .await
                .expect("an event in time")
            {
                Some(Ok(f)) => {
                    if let Ok(d) = f.into_data() {
                        self.buf.extend_from_slice(&d);
                    }
                }
                _ => {
                    self.body = None;
                    return None;
                }
            }
        }
    }

    /// The next event that is not a `head`.
    async fn next_non_head(&mut self) -> Option<Event> {
        loop {
            let e = self.next().await?;
            if e.event != "head" {
                return Some(e);
            }
        }
    }

    /// Trades `from..=to`, exactly, each with `id:` = its seq.
    async fn expect_trades(&mut self, market: &str, from: i64, to: i64) {
        for want in from..=to {
            let e = self.next_non_head().await.expect("the stream goes on");
            assert_eq!(e.event, "trade", "{e:?}");
            assert_eq!(e.data["market"], market);
            assert_eq!(e.data["seq"].as_i64(), Some(want), "gapless: {e:?}");
            assert_eq!(
                e.id.as_deref(),
                Some(want.to_string().as_str()),
                "id is the seq"
            );
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn stream_url(b: &Server, market: &str, query: &str) -> String {
    format!("{}/v1/markets/{market}/stream{query}", b.http())
}

async fn insert(db: &TestDb, market: &str, n: i64) {
    db.trades(market, n).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_replays_then_streams_live_with_ids_heads_and_resumes_by_last_event_id() {
    let db = TestDb::new().await;
    db.market("SE").await;
    insert(&db, "SE", 5).await;
    let mut cfg = broadcaster_config(&db);
    cfg.session.head_interval = Duration::from_millis(1500);
    cfg.session.sse_keepalive = Duration::from_millis(300);
    let b = broadcaster(cfg).await;
    let mut s = sse(&stream_url(&b, "SE", "?from_seq=2"), &[]).await;
    assert_eq!(s.status, 200);
    assert_eq!(s.headers["content-type"], "text/event-stream");
    assert_eq!(s.headers["cache-control"], "no-store");
    assert_eq!(s.headers["x-accel-buffering"], "no");
    assert_eq!(s.headers["access-control-allow-origin"], "*");
    let first = s.next().await.unwrap();
    assert_eq!(first.event, "subscribed");
    assert_eq!(first.id, None, "only trades and tickers carry id");
    assert_eq!(
        (
            first.data["from_seq"].as_i64(),
            first.data["head_seq"].as_i64(),
            first.data["heads"].as_bool()
        ),
        (Some(2), Some(5), Some(true)),
        "heads are on by default on SSE: {:?}",
        first.data
    );
    assert!(first.data.get("id").is_none());
    s.expect_trades("SE", 3, 5).await;
    insert(&db, "SE", 3).await;
    s.expect_trades("SE", 6, 8).await;
    // Idle: keep-alive comments while nothing is written, then a head at
    // the position.
    let t0 = Instant::now();
    let h = s.next().await.unwrap();
    assert_eq!(
        (h.event.as_str(), h.data["head_seq"].as_i64(), h.id),
        ("head", Some(8), None)
    );
    assert!(
        t0.elapsed() >= Duration::from_millis(1200),
        "{:?}",
        t0.elapsed()
    );
    assert!(
        s.comments >= 2,
        "keep-alive comments in 1.5 s of silence: {}",
        s.comments
    );
    drop(s);

    // An EventSource reconnects to the same URL with Last-Event-ID: it wins
    // over from_seq (and recent) in the URL.
    let mut again = sse(
        &stream_url(&b, "SE", "?from_seq=0"),
        &[("last-event-id", "8")],
    )
    .await;
    let sub = again.next().await.unwrap();
    assert_eq!(sub.data["from_seq"].as_i64(), Some(8));
    insert(&db, "SE", 2).await;
    again.expect_trades("SE", 9, 10).await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_ends_with_an_end_event_and_a_resume_elsewhere_loses_nothing() {
    let db = TestDb::new().await;
    db.market("SK").await;
    insert(&db, "SK", 3).await;
    let a = broadcaster(broadcaster_config(&db)).await;
    let mut s = sse(&stream_url(&a, "SK", "?from_seq=0"), &[]).await;
    assert_eq!(s.next().await.unwrap().event, "subscribed");
    s.expect_trades("SK", 1, 3).await;
    let writer = {
        let db_url = db.url.clone();
        tokio::spawn(async move {
            let c = connect(&db_url).await;
            for _ in 0..20 {
                c.batch_execute(
                    "INSERT INTO trades (market_id, side, price, qty) VALUES ('SK', 'yes', 0.5, 1)",
                )
                .await
                .unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let mut last = 3;
    // Read a few live trades, then the broadcaster shuts down.
    for _ in 0..3 {
        let e = s.next_non_head().await.unwrap();
        assert_eq!(e.data["seq"].as_i64(), Some(last + 1));
        last += 1;
    }
    let b = broadcaster(broadcaster_config(&db)).await;
    a.shutdown.cancel();
    loop {
        let e = s
            .next_non_head()
            .await
            .expect("an end event before the stream ends");
        match e.event.as_str() {
            "trade" => {
                assert_eq!(e.data["seq"].as_i64(), Some(last + 1), "gapless to the end");
                last += 1;
            }
            "end" => {
                assert_eq!(e.data["code"], "shutting_down", "{e:?}");
                break;
            }
            other => panic!("unexpected {other}: {e:?}"),
        }
    }
    assert!(s.next().await.is_none(), "the stream ends after end");
    writer.await.unwrap();
    // Resume on another broadcaster with Last-Event-ID: exactly the rest.
    let mut r = sse(
        &stream_url(&b, "SK", ""),
        &[("last-event-id", &last.to_string())],
    )
    .await;
    assert_eq!(
        r.next().await.unwrap().data["from_seq"].as_i64(),
        Some(last)
    );
    r.expect_trades("SK", last + 1, 23).await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_ticker_ids_are_to_seqs() {
    let db = TestDb::new().await;
    db.market("ST").await;
    insert(&db, "ST", 40).await;
    let b = broadcaster(broadcaster_config(&db)).await;
    let mut s = sse(
        &stream_url(&b, "ST", "?from_seq=10&mode=ticker&interval_ms=200"),
        &[],
    )
    .await;
    let sub = s.next().await.unwrap();
    assert_eq!(
        (sub.data["mode"].as_str(), sub.data["interval_ms"].as_i64()),
        (Some("ticker"), Some(200))
    );
    let f = s.next_non_head().await.unwrap();
    assert_eq!(f.event, "ticker");
    assert_eq!(
        (f.data["from_seq"].as_i64(), f.data["to_seq"].as_i64()),
        (Some(11), Some(40))
    );
    assert_eq!(f.id.as_deref(), Some("40"), "id is to_seq");
    insert(&db, "ST", 5).await;
    let f = s.next_non_head().await.unwrap();
    assert_eq!(
        (
            f.data["from_seq"].as_i64(),
            f.data["to_seq"].as_i64(),
            f.id.as_deref()
        ),
        (Some(41), Some(45), Some("45"))
    );
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_routes_answer_in_the_contracts_order_with_cors_and_no_store() {
    let db = TestDb::new().await;
    db.market("RO").await;
    insert(&db, "RO", 5).await;
    let epoch = {
        let c = db.client().await;
        c.query_one("SELECT epoch FROM markets WHERE id = 'RO'", &[])
            .await
            .unwrap()
            .get::<_, String>(0)
    };
    // A market on a shard this broadcaster does not serve.
    let shards: i64 = db
        .client()
        .await
        .query_one("SELECT shard_count::bigint FROM marketcast_config", &[])
        .await
        .unwrap()
        .get(0);
    let ro_shard: i32 = db
        .client()
        .await
        .query_one("SELECT shard FROM markets WHERE id = 'RO'", &[])
        .await
        .unwrap()
        .get(0);
    let mut other = None;
    for i in 0..500 {
        let id = format!("OT{i}");
        db.market(&id).await;
        let s: i32 = db
            .client()
            .await
            .query_one("SELECT shard FROM markets WHERE id = $1", &[&id])
            .await
            .unwrap()
            .get(0);
        if s != ro_shard {
            other = Some(id);
            break;
        }
    }
    let other = other.expect("a market on another shard");
    let mut cfg = broadcaster_config(&db);
    cfg.shards = Some([ro_shard as u32].into_iter().collect());
    let _ = shards;
    let b = broadcaster(cfg).await;
    let base = b.http();
    let check = |status: u16, code: &str, got: (u16, hyper::HeaderMap, Bytes)| {
        let (s, h, body) = got;
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (status, Some(code)),
            "{v}"
        );
        assert_eq!(h["cache-control"], "no-store", "errors are not cached");
        assert_eq!(
            h["access-control-allow-origin"], "*",
            "CORS on every answer"
        );
        (h, v)
    };
    let get = |path: String| {
        let url = format!("{base}{path}");
        async move { http_full("GET", &url, &[], None).await.unwrap() }
    };
    let base2 = b.http();
    check(404, "not_found", get("/v1/markets/RO/nope".into()).await);
    let (h, _) = check(
        405,
        "method_not_allowed",
        http_full("POST", &format!("{base2}/v1/markets/RO/stream"), &[], None)
            .await
            .unwrap(),
    );
    assert_eq!(h["allow"], "GET, OPTIONS");
    check(
        400,
        "bad_request",
        get("/v1/markets/RO/trades?limit=x".into()).await,
    );
    check(
        422,
        "invalid",
        get("/v1/markets/RO/trades?limit=1001".into()).await,
    );
    check(
        422,
        "invalid",
        get("/v1/markets/RO/trades?after_seq=-1".into()).await,
    );
    check(
        422,
        "invalid",
        get("/v1/markets/RO/trades?wait_ms=30001".into()).await,
    );
    check(422, "invalid", get("/v1/markets/-bad/trades".into()).await);
    check(
        400,
        "bad_request",
        get("/v1/markets/RO/stream?from_seq=1&recent=2".into()).await,
    );
    check(
        400,
        "bad_request",
        get("/v1/markets/RO/stream?interval_ms=300".into()).await,
    );
    check(
        422,
        "invalid",
        get("/v1/markets/RO/stream?mode=ticker&interval_ms=5".into()).await,
    );
    check(
        400,
        "bad_request",
        http_full(
            "GET",
            &format!("{base2}/v1/markets/RO/stream"),
            &[("last-event-id", "x")],
            None,
        )
        .await
        .unwrap(),
    );
    check(
        404,
        "unknown_market",
        get("/v1/markets/NOPE/trades".into()).await,
    );
    check(
        404,
        "unknown_market",
        get("/v1/markets/NOPE/stream".into()).await,
    );
    let (_, v) = check(
        421,
        "wrong_shard",
        get(format!("/v1/markets/{other}/trades")).await,
    );
    assert!(
        v["error"]["shard"].is_number() && v["error"]["broadcasters"].is_array(),
        "{v}"
    );
    let (_, v) = check(
        409,
        "epoch_mismatch",
        get("/v1/markets/RO/trades?epoch=nope".into()).await,
    );
    assert_eq!(v["error"]["epoch"], epoch.as_str());
    check(
        409,
        "epoch_mismatch",
        get("/v1/markets/RO/stream?epoch=nope".into()).await,
    );
    // Preflight.
    let (s, h, _) = http_full(
        "OPTIONS",
        &format!("{base2}/v1/markets/RO/stream"),
        &[],
        None,
    )
    .await
    .unwrap();
    assert_eq!(s, 204);
    assert_eq!(h["access-control-allow-methods"], "GET");
    assert_eq!(
        h["access-control-allow-headers"],
        "Authorization, Last-Event-ID, If-None-Match"
    );
    assert_eq!(h["access-control-max-age"], "600");
    assert_eq!(
        h["access-control-expose-headers"],
        "ETag, Marketcast-Head-Seq"
    );
    b.stop().await;

    // History: pruned trades are 410 with earliest_seq, never a skip.
    let c = db.client().await;
    c.query_one(
        "SELECT marketcast_prune((SELECT created_at FROM trades WHERE market_id = 'RO' AND seq = 3))",
        &[],
    )
    .await
    .unwrap();
    let b = broadcaster(broadcaster_config(&db)).await;
    let base = b.http();
    let (s, h, body) = http_full(
        "GET",
        &format!("{base}/v1/markets/RO/trades?after_seq=0"),
        &[],
        None,
    )
    .await
    .unwrap();
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (
            s,
            v["error"]["code"].as_str(),
            v["error"]["earliest_seq"].as_i64()
        ),
        (410, Some("history_unavailable"), Some(3)),
        "{v}"
    );
    assert_eq!(h["cache-control"], "no-store");
    let (s, _, _) = http_full(
        "GET",
        &format!("{base}/v1/markets/RO/stream?from_seq=0"),
        &[],
        None,
    )
    .await
    .unwrap();
    assert_eq!(s, 410, "a stream that would skip is refused too");
    let (s, _, body) = http_full(
        "GET",
        &format!("{base}/v1/markets/RO/trades?after_seq=2"),
        &[],
        None,
    )
    .await
    .unwrap();
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!((s, v["trades"][0]["seq"].as_i64()), (200, Some(3)));
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origins_and_tokens_guard_the_read_routes() {
    let db = TestDb::new().await;
    db.market("RG").await;
    insert(&db, "RG", 2).await;
    let mut cfg = broadcaster_config(&db);
    cfg.allowed_origins = Some(["https://app.example".to_string()].into_iter().collect());
    let b = broadcaster(cfg).await;
    let url = format!("{}/v1/markets/RG/trades", b.http());
    let (s, h, _) = http_full("GET", &url, &[("origin", "https://evil.example")], None)
        .await
        .unwrap();
    assert_eq!(s, 403);
    assert_eq!(
        h.get("access-control-allow-origin"),
        None,
        "never echo a refused origin"
    );
    let (s, h, _) = http_full("GET", &url, &[("origin", "https://app.example")], None)
        .await
        .unwrap();
    assert_eq!(s, 200);
    assert_eq!(h["access-control-allow-origin"], "https://app.example");
    assert_eq!(h["vary"], "Origin");
    let (s, _, _) = http_full("OPTIONS", &url, &[("origin", "https://evil.example")], None)
        .await
        .unwrap();
    assert_eq!(s, 403, "a preflight from a refused origin");
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catch_up_pages_are_contiguous_and_full_pages_of_a_named_epoch_are_immutable() {
    let db = TestDb::new().await;
    db.market("PG").await;
    insert(&db, "PG", 7).await;
    let epoch: String = db
        .client()
        .await
        .query_one("SELECT epoch FROM markets WHERE id = 'PG'", &[])
        .await
        .unwrap()
        .get(0);
    let b = broadcaster(broadcaster_config(&db)).await;
    let url = |q: &str| format!("{}/v1/markets/PG/trades{q}", b.http());
    let seqs = |v: &Value| -> Vec<i64> {
        v["trades"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["seq"].as_i64().unwrap())
            .collect()
    };

    // Defaults: after_seq 0, limit 100: everything, head_seq 7, no-store.
    let (s, h, body) = http_full("GET", &url(""), &[], None).await.unwrap();
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (s, seqs(&v), v["head_seq"].as_i64()),
        (200, (1..=7).collect::<Vec<_>>(), Some(7))
    );
    assert_eq!(h["marketcast-head-seq"], "7");
    assert_eq!(h["cache-control"], "no-store");
    assert!(h.get("etag").is_none());
    assert_eq!(
        v["trades"][0]["type"], "trade",
        "the WebSocket trade message"
    );

    // A full page without epoch: not immutable.
    let (_, h, body) = http_full("GET", &url("?after_seq=2&limit=3"), &[], None)
        .await
        .unwrap();
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(seqs(&v), vec![3, 4, 5]);
    assert_eq!(
        v["head_seq"].as_i64(),
        Some(7),
        "the head, not the page's end"
    );
    assert_eq!(h["cache-control"], "no-store");
    assert!(h.get("etag").is_none());

    // With the current epoch: immutable, head_seq = its last trade, strong ETag, 304.
    let q = format!("?after_seq=2&limit=3&epoch={epoch}");
    let (_, h, body) = http_full("GET", &url(&q), &[], None).await.unwrap();
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!((seqs(&v), v["head_seq"].as_i64()), (vec![3, 4, 5], Some(5)));
    assert_eq!(h["cache-control"], "public, max-age=31536000, immutable");
    assert_eq!(h["marketcast-head-seq"], "5");
    let tag = h["etag"].to_str().unwrap().to_string();
    assert!(tag.starts_with('"') && tag.ends_with('"'), "strong: {tag}");
    insert(&db, "PG", 3).await;
    let (_, h2, body2) = http_full("GET", &url(&q), &[], None).await.unwrap();
    assert_eq!(
        (body2, h2["etag"].to_str().unwrap()),
        (body, tag.as_str()),
        "byte-identical later"
    );
    let (s, h, body) = http_full(
        "GET",
        &url(&q),
        &[("if-none-match", &format!("\"x\", {tag}"))],
        None,
    )
    .await
    .unwrap();
    assert_eq!((s, body.len()), (304, 0));
    assert_eq!(
        (
            h["etag"].to_str().unwrap(),
            h["cache-control"].to_str().unwrap()
        ),
        (tag.as_str(), "public, max-age=31536000, immutable")
    );
    // A page that is not full is never immutable.
    let (_, h, _) = http_full(
        "GET",
        &url(&format!("?after_seq=8&limit=3&epoch={epoch}")),
        &[],
        None,
    )
    .await
    .unwrap();
    assert_eq!(h["cache-control"], "no-store");
    // Above the head: not an error, an empty page.
    let (s, _, body) = http_full("GET", &url("?after_seq=99"), &[], None)
        .await
        .unwrap();
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!((s, seqs(&v)), (200, vec![]));
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_returns_on_the_next_trade_or_at_the_end_of_its_wait() {
    let db = TestDb::new().await;
    db.market("LP").await;
    insert(&db, "LP", 2).await;
    let b = broadcaster(broadcaster_config(&db)).await;
    let url = format!("{}/v1/markets/LP/trades?after_seq=2&wait_ms=5000", b.http());
    let t0 = Instant::now();
    let poll = tokio::spawn(async move { http_full("GET", &url, &[], None).await.unwrap() });
    tokio::time::sleep(Duration::from_millis(400)).await;
    insert(&db, "LP", 1).await;
    let (s, _, body) = poll.await.unwrap();
    let waited = t0.elapsed();
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (
            s,
            v["trades"][0]["seq"].as_i64(),
            v["trades"].as_array().unwrap().len()
        ),
        (200, Some(3), 1)
    );
    assert!(
        waited >= Duration::from_millis(400) && waited < Duration::from_secs(3),
        "{waited:?}"
    );

    let url = format!("{}/v1/markets/LP/trades?after_seq=3&wait_ms=300", b.http());
    let t0 = Instant::now();
    let (s, _, body) = http_full("GET", &url, &[], None).await.unwrap();
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (
            s,
            v["trades"].as_array().unwrap().len(),
            v["head_seq"].as_i64()
        ),
        (200, 0, Some(3))
    );
    assert!(t0.elapsed() >= Duration::from_millis(300));

    // Shutdown answers a waiting poll at once.
    let url = format!(
        "{}/v1/markets/LP/trades?after_seq=3&wait_ms=20000",
        b.http()
    );
    let t0 = Instant::now();
    let poll = tokio::spawn(async move { http_full("GET", &url, &[], None).await.unwrap() });
    tokio::time::sleep(Duration::from_millis(300)).await;
    b.shutdown.cancel();
    let (s, _, _) = poll.await.unwrap();
    assert_eq!(s, 200);
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_and_waiting_polls_share_the_connection_limit() {
    let db = TestDb::new().await;
    db.market("CL").await;
    let mut cfg = broadcaster_config(&db);
    cfg.session.max_connections = 1;
    let b = broadcaster(cfg).await;
    let mut s = sse(&stream_url(&b, "CL", ""), &[]).await;
    assert_eq!(s.status, 200);
    assert_eq!(s.next().await.unwrap().event, "subscribed");
    let (st, h, body) = http_full("GET", &stream_url(&b, "CL", ""), &[], None)
        .await
        .unwrap();
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!((st, v["error"]["code"].as_str()), (503, Some("overloaded")));
    assert_eq!(h["retry-after"], "1");
    drop(s);
    // The slot comes back when the stream ends.
    let t0 = Instant::now();
    loop {
        let mut s = sse(&stream_url(&b, "CL", ""), &[]).await;
        if s.status == 200 {
            assert_eq!(s.next().await.unwrap().event, "subscribed");
            break;
        }
        assert!(t0.elapsed() < WAIT, "the slot was never freed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    b.stop().await;
}

const SECRET: &str = "marketcast-reads-tests-hs256-secret-0123456789";

fn token(markets: &[&str], exp_in_secs: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({"exp": now + exp_in_secs, "markets": markets}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_bind_the_read_routes_and_an_expired_one_ends_a_stream() {
    let db = TestDb::new().await;
    db.market("TA").await;
    db.market("TB").await;
    insert(&db, "TA", 2).await;
    let mut cfg = broadcaster_config(&db);
    cfg.tokens = marketcast::config::TokenConfig {
        verifier: marketcast::protocol::token::Verifier::new(Some(SECRET), None, Duration::ZERO)
            .unwrap(),
        require_token: true,
    };
    let b = broadcaster(cfg).await;
    let url = |m: &str, q: &str| format!("{}/v1/markets/{m}/trades{q}", b.http());
    let code = |got: (u16, hyper::HeaderMap, Bytes)| {
        let v: Value = serde_json::from_slice(&got.2).unwrap_or(Value::Null);
        let challenge = got
            .1
            .get("www-authenticate")
            .map(|h| h.to_str().unwrap().to_string());
        (
            got.0,
            v["error"]["code"].as_str().unwrap_or("").to_string(),
            challenge,
        )
    };
    let ok = token(&["TA"], 60);
    let bearer = format!("Bearer {ok}");
    assert_eq!(
        code(http_full("GET", &url("TA", ""), &[], None).await.unwrap()),
        (401, "unauthorized".into(), Some("Bearer".into()))
    );
    assert_eq!(
        code(
            http_full("GET", &url("TA", "?token=nope"), &[], None)
                .await
                .unwrap()
        ),
        (401, "invalid_token".into(), Some("Bearer".into()))
    );
    assert_eq!(
        code(
            http_full(
                "GET",
                &url("TA", &format!("?token={ok}")),
                &[("authorization", &bearer)],
                None
            )
            .await
            .unwrap()
        )
        .0,
        400,
        "two tokens"
    );
    assert_eq!(
        code(
            http_full("GET", &url("TB", ""), &[("authorization", &bearer)], None)
                .await
                .unwrap()
        ),
        (403, "forbidden".into(), None)
    );
    assert_eq!(
        code(
            http_full("GET", &url("NOPE", &format!("?token={ok}")), &[], None)
                .await
                .unwrap()
        )
        .1,
        "forbidden",
        "forbidden before any lookup"
    );
    assert_eq!(
        code(
            http_full(
                "GET",
                &url("TA", &format!("?token={ok}&limit=0")),
                &[],
                None
            )
            .await
            .unwrap()
        )
        .1,
        "invalid",
        "parameters before forbidden"
    );
    let (s, h, _) = http_full("GET", &url("TA", ""), &[("authorization", &bearer)], None)
        .await
        .unwrap();
    assert_eq!(s, 200);
    let epoch: String = db
        .client()
        .await
        .query_one("SELECT epoch FROM markets WHERE id = 'TA'", &[])
        .await
        .unwrap()
        .get(0);
    let (_, h2, _) = http_full(
        "GET",
        &url("TA", &format!("?limit=2&epoch={epoch}")),
        &[("authorization", &bearer)],
        None,
    )
    .await
    .unwrap();
    assert_eq!(
        h2["cache-control"], "private, max-age=31536000, immutable",
        "with --require-token, never public"
    );
    let _ = h;

    // A stream whose token expires ends with `end` token_expired (within a second).
    let short = token(&["TA"], 2);
    let mut s = sse(
        &format!("{}/v1/markets/TA/stream?token={short}", b.http()),
        &[],
    )
    .await;
    assert_eq!(s.status, 200);
    assert_eq!(s.next().await.unwrap().event, "subscribed");
    let t0 = Instant::now();
    let end = loop {
        let e = s.next().await.expect("an end event");
        if e.event == "end" {
            break e;
        }
    };
    assert_eq!(end.data["code"], "token_expired");
    assert!(t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());
    assert!(s.next().await.is_none());
    // Reconnecting with the expired token: 401, as an EventSource would get.
    let again = sse(
        &format!("{}/v1/markets/TA/stream?token={short}", b.http()),
        &[],
    )
    .await;
    assert_eq!(again.status, 401);
    b.stop().await;
}
