//! The broadcaster registry and discovery (PROTOCOL-1.1 sections 4.2, 5.1-5.3):
//! the writer's `broadcasters`, `wrong_shard`'s `broadcasters` and `url`,
//! registering, leaving on SIGTERM before 1001, turning stale after SIGKILL,
//! the registry's privileges, `/healthz`'s `registered`, `--advertise-url`'s
//! check, and a client moved between two broadcasters of the same shards.
//!
//! Entries advertise made-up URLs (`ws://feed-a.test/ws`) where only
//! discovery is checked: the registry stores a URL, it never dials it.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::Instant;

use crate::faults::ChildBroadcaster;
use crate::support::*;

/// Bound on any one wait for an event here.
const DEADLINE: Duration = Duration::from_secs(30);

/// Poll `f` every 20 ms until it returns Some, or panic after [`DEADLINE`].
async fn until<T, Fut>(what: &str, mut f: impl FnMut() -> Fut) -> T
where
    Fut: std::future::Future<Output = Option<T>>,
{
    let give_up = Instant::now() + DEADLINE;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < give_up, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn set(v: &Value) -> BTreeSet<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("an array, got {v}"))
        .iter()
        .map(|u| u.as_str().expect("a URL string").to_string())
        .collect()
}

fn urls(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// A market id that lands on `shard` (of 16), by the migration's formula.
async fn market_on(db: &TestDb, shard: i32, prefix: &str) -> String {
    let c = db.client().await;
    for i in 0.. {
        let id = format!("{prefix}-{i}");
        let s: i32 = c
            .query_one(
                "SELECT ((((hashtextextended($1, 0) % 16) + 16) % 16))::int",
                &[&id],
            )
            .await
            .unwrap()
            .get(0);
        if s == shard {
            return id;
        }
    }
    unreachable!()
}

/// The writer's `broadcasters` for market `id`.
async fn writer_lists(writer: &Server, id: &str) -> BTreeSet<String> {
    let (st, v) = http(
        "GET",
        &format!("{}/v1/markets/{id}", writer.http()),
        &[],
        None,
    )
    .await;
    assert_eq!(st, 200, "{v}");
    set(&v["broadcasters"])
}

fn advertised(db: &TestDb, shards: &[u32], url: &str) -> marketcast::config::BroadcasterConfig {
    let mut c = broadcaster_config(db);
    c.shards = Some(shards.iter().copied().collect());
    c.registry.advertise_url = Some(url.to_string());
    c.registry.interval = Duration::from_millis(200);
    c
}

/// Several entries on overlapping shards: the writer's market objects (GET
/// one, GET the list, POST's 201) and `wrong_shard` (WebSocket and HTTP 421)
/// of a broadcaster that is not registered name exactly the distinct live
/// URLs serving the market's shard; the unregistered one adds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_names_exactly_the_live_urls_serving_a_shard() {
    let db = TestDb::new().await;
    let (s, o) = (3, 11);
    let m = market_on(&db, s, "M").await;
    let n = market_on(&db, o, "N").await;
    db.market(&m).await;
    let (a, b, c) = (
        "ws://feed-a.test/ws",
        "wss://feed-b.test/s/1/ws",
        "ws://feed-c.test:9001/ws",
    );
    let writer = writer(writer_config(&db)).await;
    assert!(
        writer_lists(&writer, &m).await.is_empty(),
        "no registry entries yet: []"
    );

    let ba = broadcaster(advertised(&db, &[s as u32], a)).await;
    let bb = broadcaster(advertised(&db, &[s as u32, o as u32], b)).await;
    // The same URL twice (two processes behind one name) is listed once.
    let bb2 = broadcaster(advertised(&db, &[s as u32], b)).await;
    let bc = broadcaster(advertised(&db, &[o as u32], c)).await;
    // Not registered: serves shard o only, answers wrong_shard for m.
    let mut cfg = broadcaster_config(&db);
    cfg.shards = Some([o as u32].into());
    cfg.registry.interval = Duration::from_millis(200);
    let plain = broadcaster(cfg).await;

    // Each registers once healthy; one entry per registered run, none
    // without --advertise-url (the count never passes 4).
    let owner = db.client().await;
    until("4 live entries", || async {
        let n: i64 = owner
            .query_one("SELECT count(*) FROM broadcasters WHERE live", &[])
            .await
            .unwrap()
            .get(0);
        assert!(n <= 4, "{n} entries");
        (n == 4).then_some(())
    })
    .await;
    // The writer answers from the registry as it was at most 1 s earlier.
    let all_live = Instant::now();
    until("the writer to list a and b for m", || async {
        (writer_lists(&writer, &m).await == urls(&[a, b])).then_some(())
    })
    .await;
    let (st, list) = http("GET", &format!("{}/v1/markets", writer.http()), &[], None).await;
    assert_eq!(st, 200);
    let listed = list["markets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["market"] == m.as_str())
        .unwrap();
    assert_eq!(set(&listed["broadcasters"]), urls(&[a, b]));
    tokio::time::sleep_until(all_live + Duration::from_secs(1)).await;
    let (st, created) = http(
        "POST",
        &format!("{}/v1/markets", writer.http()),
        &[],
        Some(&json!({"id": n, "title": "n"}).to_string()),
    )
    .await;
    assert_eq!(st, 201, "{created}");
    assert_eq!(created["shard"], o);
    assert_eq!(set(&created["broadcasters"]), urls(&[b, c]));

    // wrong_shard from the unregistered broadcaster: within one interval.
    let want = urls(&[a, b]);
    let e = until("wrong_shard to name a and b", || async {
        let mut ws = connect_ws(&plain.ws()).await;
        send(&mut ws, json!({"op": "subscribe", "market": m, "id": 7})).await;
        let e = recv(&mut ws).await;
        assert_eq!(e["code"], "wrong_shard", "{e}");
        (set(&e["broadcasters"]) == want).then_some(e)
    })
    .await;
    assert_eq!(e["shard"], s);
    assert!(
        want.contains(e["url"].as_str().unwrap()),
        "url is one of them: {e}"
    );
    let (st, r) = http(
        "GET",
        &format!("{}/v1/markets/{m}/trades", plain.http()),
        &[],
        None,
    )
    .await;
    assert_eq!(st, 421, "{r}");
    assert_eq!(set(&r["error"]["broadcasters"]), want);
    assert!(want.contains(r["error"]["url"].as_str().unwrap()), "{r}");
    // A shard nobody serves: [] and no url.
    let lone = market_on(&db, 7, "L").await;
    db.market(&lone).await;
    let mut ws = connect_ws(&plain.ws()).await;
    send(&mut ws, json!({"op": "subscribe", "market": lone, "id": 8})).await;
    let e = recv(&mut ws).await;
    assert_eq!(
        (e["code"].as_str(), &e["broadcasters"]),
        (Some("wrong_shard"), &json!([])),
        "{e}"
    );
    assert!(e.get("url").is_none(), "{e}");
    // healthz: `registered` only with --advertise-url.
    let (_, h) = http("GET", &format!("{}/healthz", plain.http()), &[], None).await;
    assert!(h.get("registered").is_none(), "{h}");
    let (_, h) = http("GET", &format!("{}/healthz", ba.http()), &[], None).await;
    assert_eq!(h["registered"], true, "{h}");

    for srv in [ba, bb, bb2, bc, plain, writer] {
        srv.stop().await;
    }
    let left: i64 = db
        .client()
        .await
        .query_one("SELECT count(*) FROM broadcasters", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "every stopped broadcaster deleted its entry");
}

/// A SIGTERMed broadcaster's entry is gone before its clients see 1001; a
/// SIGKILLed one's stays but turns stale after 3 intervals and leaves the
/// answers then. The registered process exports the registry gauges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_leaves_at_once_and_sigkill_turns_stale_within_three_intervals() {
    let db = TestDb::new().await;
    let m = market_on(&db, 5, "K").await;
    db.market(&m).await;
    let (k, t) = ("ws://killed.test/ws", "ws://termed.test/ws");
    let child = |url: &str| {
        vec![
            "--advertise-url".to_string(),
            url.to_string(),
            "--registry-interval".to_string(),
            "500ms".to_string(),
        ]
    };
    ensure_roles(&server_url()).await;
    let bk = ChildBroadcaster::start(&db.broadcaster_url(), &child(k)).await;
    let bt = ChildBroadcaster::start(&db.broadcaster_url(), &child(t)).await;
    let writer = writer(writer_config(&db)).await;
    until("both listed", || async {
        (writer_lists(&writer, &m).await == urls(&[k, t])).then_some(())
    })
    .await;
    let live = until("the gauges", || async {
        let live = bk.metric("marketcast_registry_live_broadcasters").await?;
        (live == 2.0).then_some(live)
    })
    .await;
    assert_eq!(live, 2.0);
    assert_eq!(
        bk.metric("marketcast_registry_unserved_shards").await,
        Some(0.0),
        "both serve every shard"
    );

    // SIGTERM: the entry is deleted before the WebSockets close. While a
    // lock held here keeps the DELETE waiting (under the 5 s statement
    // timeout), the client sees no 1001; once it is released, the entry is
    // gone when the 1001 arrives.
    let owner = db.client().await;
    let mut ws = connect_ws(&bt.ws()).await;
    subscribe(&mut ws, &m, None).await;
    let mut locker = db.client().await;
    let lock = locker.transaction().await.unwrap();
    lock.execute(
        "SELECT 1 FROM marketcast_registry WHERE url = $1 FOR UPDATE",
        &[&t],
    )
    .await
    .unwrap();
    let term = tokio::spawn(bt.sigterm());
    expect_silence(&mut ws, Duration::from_millis(1500)).await;
    lock.commit().await.unwrap();
    assert_eq!(expect_close(&mut ws).await, Some(1001));
    let rows: i64 = owner
        .query_one("SELECT count(*) FROM broadcasters WHERE url = $1", &[&t])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 0, "deleted before the WebSockets closed");
    term.await.unwrap();
    until("the writer to drop t", || async {
        (writer_lists(&writer, &m).await == urls(&[k])).then_some(())
    })
    .await;

    // SIGKILL: nothing deletes the entry; it turns stale after 3 x 500ms.
    bk.kill9().await;
    until("the writer to drop k", || async {
        writer_lists(&writer, &m).await.is_empty().then_some(())
    })
    .await;
    let (present, live, late): (i64, bool, f64) = {
        let r = owner
            .query_one(
                "SELECT count(*), bool_or(live), max(extract(epoch FROM now() - (heartbeat_at + 3 * heartbeat_interval)))::float8
                   FROM broadcasters WHERE url = $1",
                &[&k],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1), r.get(2))
    };
    assert_eq!((present, live), (1, false), "still there, stale");
    // The writer's answer follows staleness within its 1 s bound (plus
    // slack for a loaded machine), not an hour later.
    assert!(late < 3.0, "dropped {late:.2}s after turning stale");
    writer.stop().await;
}

/// What the registry lets each group role do (contract 1.1 section 5.1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writer_cannot_touch_the_registry_and_the_broadcaster_only_through_its_functions() {
    let db = TestDb::new().await;
    ensure_roles(&server_url()).await;
    let owner = db.client().await;
    let id: String = owner
        .query_one(
            "SELECT marketcast_registry_register('ws://x.test/ws', '{1}', '5s')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let code = |e: tokio_postgres::Error| e.code().map(|c| c.code().to_string());
    let denied = Some("42501".to_string());

    let w = connect(&db.writer_url()).await;
    let n: i64 = w
        .query_one("SELECT count(*) FROM broadcasters", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1, "the writer reads the view");
    for sql in [
        "INSERT INTO marketcast_registry (id, url, shards, heartbeat_interval) VALUES ('w', 'ws://w.test/ws', '{1}', '5s')".to_string(),
        "UPDATE marketcast_registry SET heartbeat_at = now()".to_string(),
        "DELETE FROM marketcast_registry".to_string(),
        "SELECT * FROM marketcast_registry".to_string(),
        "UPDATE broadcasters SET url = 'ws://evil.test/ws'".to_string(),
        "DELETE FROM broadcasters".to_string(),
        "SELECT marketcast_registry_register('ws://w.test/ws', '{1}', '5s')".to_string(),
        format!("SELECT marketcast_registry_heartbeat('{id}')"),
        format!("SELECT marketcast_registry_leave('{id}')"),
        "SELECT marketcast_registry_purge_stale()".to_string(),
    ] {
        let e = w.batch_execute(&sql).await.unwrap_err();
        assert_eq!(code(e), denied, "writer: {sql}");
    }

    let b = connect(&db.broadcaster_url()).await;
    let mine: String = b
        .query_one(
            "SELECT marketcast_registry_register('wss://b.test/ws', '{4,2,2}', '1s')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_ne!(mine, id);
    let shards: Vec<i32> = b
        .query_one("SELECT shards FROM broadcasters WHERE id = $1", &[&mine])
        .await
        .unwrap()
        .get(0);
    assert_eq!(shards, [2, 4], "ascending, distinct");
    for (sql, want) in [
        (
            format!("SELECT marketcast_registry_heartbeat('{mine}')"),
            true,
        ),
        (format!("SELECT marketcast_registry_leave('{mine}')"), true),
        (
            format!("SELECT marketcast_registry_heartbeat('{mine}')"),
            false,
        ),
    ] {
        let got: bool = b.query_one(&sql, &[]).await.unwrap().get(0);
        assert_eq!(got, want, "broadcaster: {sql}");
    }
    b.batch_execute("SELECT marketcast_registry_purge_stale()")
        .await
        .unwrap();
    let e = b
        .batch_execute("SELECT marketcast_registry_register('http://b.test/', '{1}', '1s')")
        .await
        .unwrap_err();
    assert_eq!(code(e), Some("23514".into()), "a URL the contract refuses");
    db.market("BM").await;
    for sql in [
        "INSERT INTO marketcast_registry (id, url, shards, heartbeat_interval) VALUES ('b', 'ws://b.test/ws', '{1}', '5s')",
        "UPDATE marketcast_registry SET heartbeat_at = now() + interval '1 day'",
        "DELETE FROM marketcast_registry",
        "INSERT INTO markets (id, title) VALUES ('bm2', 'x')",
        "UPDATE markets SET title = 'y'",
        "INSERT INTO trades (market_id, side, price, qty) VALUES ('BM', 'yes', 0.5, 1)",
        "UPDATE marketcast_config SET shard_count = 2",
    ] {
        let e = b.batch_execute(sql).await.unwrap_err();
        assert_eq!(code(e), denied, "broadcaster: {sql}");
    }
}

/// `registered` is true once the entry is live, and false after it is deleted
/// by hand, which it does not undo. A registered broadcaster deletes entries
/// stale for more than an hour, and only those.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_registered_follows_the_entry() {
    let db = TestDb::new().await;
    let owner = db.client().await;
    // Stale for 2 hours minus 15 s, and for 30 minutes minus 15 s.
    owner
        .batch_execute(
            "INSERT INTO marketcast_registry (id, url, shards, heartbeat_at, heartbeat_interval) VALUES
                 ('old', 'ws://old.test/ws', '{0}', now() - interval '2 hours', '5s'),
                 ('recent', 'ws://recent.test/ws', '{0}', now() - interval '30 minutes', '5s')",
        )
        .await
        .unwrap();
    let url = "ws://h.test/ws";
    let b = broadcaster(advertised(&db, &[0, 1], url)).await;
    let healthz = format!("{}/healthz", b.http());
    until("registered", || async {
        let (_, h) = http("GET", &healthz, &[], None).await;
        (h["registered"] == true).then_some(())
    })
    .await;
    until("the hour-stale entry purged", || async {
        let left: Vec<String> = owner
            .query(
                "SELECT id FROM broadcasters WHERE url <> $1 ORDER BY id",
                &[&url],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        (left == ["recent"]).then_some(())
    })
    .await;
    owner
        .execute("DELETE FROM marketcast_registry WHERE id = 'recent'", &[])
        .await
        .unwrap();
    let gone = owner
        .execute("DELETE FROM marketcast_registry WHERE url = $1", &[&url])
        .await
        .unwrap();
    assert_eq!(gone, 1);
    until("registered false", || async {
        let (st, h) = http("GET", &healthz, &[], None).await;
        assert_eq!(st, 200, "{h}");
        (h["registered"] == false).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1000)).await; // 5 intervals: nothing may re-register
    let (_, h) = http("GET", &healthz, &[], None).await;
    assert_eq!(h["registered"], false, "{h}");
    let n: i64 = owner
        .query_one("SELECT count(*) FROM broadcasters", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "deleted by hand: not registered again");
    b.stop().await;
}

/// A bad --advertise-url: the real binary exits non-zero before binding,
/// naming the option.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_advertise_url_is_refused_at_start() {
    for bad in [
        "http://h.test/ws",
        "ws://h.test/feed",
        "wss://h.test/ws?x=1",
        "h.test/ws",
    ] {
        let out = tokio::time::timeout(
            DEADLINE,
            tokio::process::Command::new(env!("CARGO_BIN_EXE_marketcast"))
                .args([
                    "broadcaster",
                    "--listen",
                    "127.0.0.1:0",
                    "--advertise-url",
                    bad,
                ])
                .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
                .env_remove("MARKETCAST_ADVERTISE_URL")
                .output(),
        )
        .await
        .expect("exits in time")
        .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{bad}: {stderr}");
        assert!(stderr.contains("--advertise-url"), "{bad}: {stderr}");
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("listening on"),
            "{bad}: refused before binding"
        );
    }
}

/// Issue 15 item 1 (contract 1.1 section 5.3): two broadcasters on the same
/// shards each deliver every trade exactly once in order, identical bytes for
/// identical seqs, and a client that leaves one mid-stream and resumes on the
/// other with from_seq sees an exactly gapless sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_moved_between_two_broadcasters_sees_a_gapless_sequence() {
    let db = TestDb::new().await;
    db.market("MOVE").await;
    let a = broadcaster(broadcaster_config(&db)).await;
    let b = broadcaster(broadcaster_config(&db)).await;
    let mut on_a = connect_ws(&a.ws()).await;
    let mut on_b = connect_ws(&b.ws()).await;
    let mut mover = connect_ws(&a.ws()).await;
    for ws in [&mut on_a, &mut on_b, &mut mover] {
        subscribe(ws, "MOVE", Some(0)).await;
    }
    const N: i64 = 300;
    // Trades keep committing, one transaction each, while the client moves.
    let feed = {
        let c = db.client().await;
        tokio::spawn(async move {
            for _ in 0..N {
                c.execute(
                    "INSERT INTO trades (market_id, side, price, qty) VALUES ('MOVE', 'yes', 0.5, 1)",
                    &[],
                )
                .await
                .unwrap();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let mut seen = expect_trades(&mut mover, "MOVE", 1, 100).await;
    drop(mover); // leaves mid-stream, without a close
    let mut mover = connect_ws(&b.ws()).await;
    subscribe(&mut mover, "MOVE", Some(100)).await;
    seen.extend(expect_trades(&mut mover, "MOVE", 101, N).await);
    let whole_a = expect_trades(&mut on_a, "MOVE", 1, N).await;
    let whole_b = expect_trades(&mut on_b, "MOVE", 1, N).await;
    feed.await.unwrap();
    assert_eq!(whole_a, whole_b, "the same log, the same trade messages");
    assert_eq!(
        seen, whole_a,
        "the moved client got each trade once, as everyone did"
    );
    expect_silence(&mut mover, Duration::from_millis(200)).await;
    a.stop().await;
    b.stop().await;
}
