//! The SQL surface (PROTOCOL.md section 1), exercised with plain SQL clients
//! against a real PostgreSQL: seq assignment under concurrency, rollback,
//! multi-row and multi-market transactions, NOTIFY at commit with the doorbell
//! payload, append-only, prune, roles, migrate, shard assignment.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use marketcast::config::{DbConfig, WriterConfig};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, NoTls};

use crate::support::*;

/// How long "nothing arrives" is watched for.
const QUIET: Duration = Duration::from_millis(300);

/// A dedicated LISTEN session, driven like `src/listener.rs` drives its own.
struct Listener {
    /// Keeps the session open; dropping it ends the driver.
    _client: tokio_postgres::Client,
    /// (channel, payload) in delivery order.
    rx: mpsc::UnboundedReceiver<(String, String)>,
}

impl Listener {
    async fn new(url: &str, shards: impl IntoIterator<Item = i32>) -> Listener {
        let (client, mut conn) = tokio_postgres::connect(url, NoTls)
            .await
            .expect("connect the LISTEN connection");
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut msgs = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
            while let Some(m) = msgs.next().await {
                match m {
                    Ok(AsyncMessage::Notification(n)) => {
                        let note = (n.channel().to_string(), n.payload().to_string());
                        if tx.send(note).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        });
        let sql: String = shards
            .into_iter()
            .map(|k| format!("LISTEN marketcast_shard_{k};"))
            .collect();
        client.batch_execute(&sql).await.expect("LISTEN");
        Listener {
            _client: client,
            rx,
        }
    }

    /// All 16 shards of the test template.
    async fn all(url: &str) -> Listener {
        Self::new(url, 0..16).await
    }

    /// The next notification, parsed: (channel, market, seq). The payload must
    /// be exactly `{"m":..,"s":..}`, or that plus exactly the fields of a
    /// signed notification (sql/0005).
    async fn next(&mut self) -> (String, String, i64) {
        let (channel, payload) = tokio::time::timeout(WAIT, self.rx.recv())
            .await
            .expect("a notification in time")
            .expect("listener alive");
        let v: Value = serde_json::from_str(&payload).expect("doorbell is JSON");
        let m = v["m"].as_str().expect("m is a string").to_string();
        let s = v["s"].as_i64().expect("s is an integer");
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        keys.sort();
        assert!(
            keys == ["m", "s"] || keys == ["c", "d", "e", "h", "i", "k", "m", "p", "q", "s"],
            "a doorbell, plain or signed: {payload}"
        );
        (channel, m, s)
    }

    /// Assert nothing arrives for [`QUIET`].
    async fn quiet(&mut self) {
        if let Ok(n) = tokio::time::timeout(QUIET, self.rx.recv()).await {
            panic!("unexpected notification: {n:?}");
        }
    }
}

fn sqlstate(e: &tokio_postgres::Error) -> String {
    e.code()
        .unwrap_or_else(|| panic!("a server error, got {e:?}"))
        .code()
        .to_string()
}

fn db_message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_default()
}

async fn shard_of(c: &tokio_postgres::Client, market: &str) -> i32 {
    c.query_one("SELECT shard FROM markets WHERE id = $1", &[&market])
        .await
        .unwrap()
        .get(0)
}

/// (last_seq, volume, last_price as text)
async fn market_row(c: &tokio_postgres::Client, market: &str) -> (i64, i64, Option<String>) {
    let r = c
        .query_one(
            "SELECT last_seq, volume, last_price::text FROM markets WHERE id = $1",
            &[&market],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1), r.get(2))
}

/// `url` connecting as `user`, whose password is its name (bin/pg-dev asks
/// every role but `postgres` for its password).
fn as_user(url: &str, user: &str) -> String {
    as_role(url, user, user)
}

async fn insert_trade(
    c: &impl tokio_postgres::GenericClient,
    market: &str,
) -> Result<i64, tokio_postgres::Error> {
    c.query_one(
        "INSERT INTO trades (market_id, side, price, qty) VALUES ($1, 'yes', 0.5, 1) RETURNING seq",
        &[&market],
    )
    .await
    .map(|r| r.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seq_is_gapless_and_in_commit_order_under_concurrency() {
    const WRITERS: usize = 50;
    const PER_WRITER: usize = 20;
    let markets = ["conc-a", "conc-b", "conc-c"];
    let db = TestDb::new().await;
    for m in markets {
        db.market(m).await;
    }
    let mut listener = Listener::all(&db.url).await;

    // Every writer connects first, then all start together.
    let barrier = Arc::new(tokio::sync::Barrier::new(WRITERS));
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let url = db.url.clone();
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            let c = connect(&url).await;
            barrier.wait().await;
            for j in 0..PER_WRITER {
                let k = w * PER_WRITER + j;
                let market = markets[(w + j) % 3];
                let side = if k % 2 == 0 { "yes" } else { "no" };
                let ticks = (k * 37 % 9999 + 1) as i32; // 1..=9999
                let qty = k as i64 + 1; // unique: identifies the trade
                c.execute(
                    "INSERT INTO trades (market_id, side, price, qty) VALUES ($1, $2, $3::int / 10000.0, $4)",
                    &[&market, &side, &ticks, &qty],
                )
                .await
                .expect("insert");
            }
        }));
    }
    for t in tasks {
        tokio::time::timeout(WAIT * 4, t)
            .await
            .expect("writers finish")
            .unwrap();
    }

    // The plan, per market: the set of qtys (each trade's identity) and the volume.
    let mut planned: BTreeMap<&str, BTreeSet<i64>> = BTreeMap::new();
    for w in 0..WRITERS {
        for j in 0..PER_WRITER {
            let k = w * PER_WRITER + j;
            planned
                .entry(markets[(w + j) % 3])
                .or_default()
                .insert(k as i64 + 1);
        }
    }

    let c = db.client().await;
    let mut total = 0;
    let mut shard_channel = BTreeMap::new();
    for m in markets {
        let rows = c
            .query(
                "SELECT seq, side, price::text, qty FROM trades WHERE market_id = $1 ORDER BY seq",
                &[&m],
            )
            .await
            .unwrap();
        let n = planned[m].len() as i64;
        total += n;
        let got_seqs: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
        assert_eq!(got_seqs, (1..=n).collect::<Vec<_>>(), "{m}: gapless 1..=N");
        let qtys: BTreeSet<i64> = rows.iter().map(|r| r.get(3)).collect();
        assert_eq!(qtys, planned[m], "{m}: exactly the planned trades");
        let last = rows.last().unwrap();
        let (side, price): (String, String) = (last.get(1), last.get(2));
        let ticks: i32 = price.strip_prefix("0.").unwrap().parse().unwrap();
        let yes_ticks = if side == "no" { 10000 - ticks } else { ticks };
        let (last_seq, volume, last_price) = market_row(&c, m).await;
        assert_eq!(last_seq, n, "{m}");
        assert_eq!(volume, planned[m].iter().sum::<i64>(), "{m}");
        assert_eq!(last_price, Some(format!("0.{yes_ticks:04}")), "{m}");
        shard_channel.insert(m, format!("marketcast_shard_{}", shard_of(&c, m).await));
    }
    assert_eq!(total, (WRITERS * PER_WRITER) as i64);

    // Notifications arrive in commit order: per market exactly 1..=N, increasing.
    let mut heard: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for _ in 0..total {
        let (channel, m, s) = listener.next().await;
        assert_eq!(
            channel,
            shard_channel[m.as_str()],
            "{m} on its shard channel"
        );
        heard.entry(m).or_default().push(s);
    }
    for m in markets {
        let n = planned[m].len() as i64;
        assert_eq!(
            heard[m],
            (1..=n).collect::<Vec<_>>(),
            "{m}: doorbells in commit order"
        );
    }
    listener.quiet().await;
}

#[tokio::test]
async fn rollback_consumes_no_seq_and_notifies_nothing() {
    let db = TestDb::new().await;
    db.market("rb").await;
    let mut c = db.client().await;
    let shard = shard_of(&c, "rb").await;
    let mut listener = Listener::new(&db.url, [shard]).await;

    let tx = c.transaction().await.unwrap();
    assert_eq!(insert_trade(&tx, "rb").await.unwrap(), 1);
    tx.rollback().await.unwrap();
    assert_eq!(insert_trade(&c, "rb").await.unwrap(), 1);

    let tx = c.transaction().await.unwrap();
    for want in 2..=4 {
        assert_eq!(insert_trade(&tx, "rb").await.unwrap(), want);
    }
    drop(tx); // rolls back
    assert_eq!(insert_trade(&c, "rb").await.unwrap(), 2);

    assert_eq!(seqs(&c, "rb").await, vec![1, 2]);
    assert_eq!(
        market_row(&c, "rb").await,
        (2, 2, Some("0.5000".to_string()))
    );
    let chan = format!("marketcast_shard_{shard}");
    // A rolled-back doorbell would show up as an extra 1 (or 2, 3, 4) in between.
    assert_eq!(listener.next().await, (chan.clone(), "rb".into(), 1));
    assert_eq!(listener.next().await, (chan, "rb".into(), 2));
    listener.quiet().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_row_multi_market_transaction_notifies_at_commit() {
    let db = TestDb::new().await;
    db.market("mm-a").await;
    db.market("mm-b").await;
    let mut c = db.client().await;
    let chan_a = format!("marketcast_shard_{}", shard_of(&c, "mm-a").await);
    let chan_b = format!("marketcast_shard_{}", shard_of(&c, "mm-b").await);
    let mut listener = Listener::all(&db.url).await;

    let tx = c.transaction().await.unwrap();
    let first: Vec<(String, i64)> = tx
        .query(
            "INSERT INTO trades (market_id, side, price, qty) VALUES \
             ('mm-a', 'yes', 0.10, 1), ('mm-b', 'no', 0.20, 2), ('mm-a', 'no', 0.30, 3) \
             RETURNING market_id, seq",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let second: Vec<(String, i64)> = tx
        .query(
            "INSERT INTO trades (market_id, side, price, qty) VALUES \
             ('mm-b', 'yes', 0.40, 4), ('mm-a', 'yes', 0.55, 5) RETURNING market_id, seq",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut all = first;
    all.extend(second);
    let want = vec![
        ("mm-a".to_string(), 1),
        ("mm-b".to_string(), 1),
        ("mm-a".to_string(), 2),
        ("mm-b".to_string(), 2),
        ("mm-a".to_string(), 3),
    ];
    assert_eq!(all, want);

    // Nothing is sent before COMMIT ...
    listener.quiet().await;
    tx.commit().await.unwrap();
    // ... then every doorbell, in the order the transaction sent them.
    for (m, s) in want {
        let chan = if m == "mm-a" { &chan_a } else { &chan_b };
        assert_eq!(listener.next().await, (chan.clone(), m, s));
    }
    listener.quiet().await;

    assert_eq!(seqs(&c, "mm-a").await, vec![1, 2, 3]);
    assert_eq!(seqs(&c, "mm-b").await, vec![1, 2]);
    assert_eq!(
        market_row(&c, "mm-a").await,
        (3, 9, Some("0.5500".to_string()))
    );
    assert_eq!(
        market_row(&c, "mm-b").await,
        (2, 6, Some("0.4000".to_string()))
    );
}

#[tokio::test]
async fn no_side_sets_last_price_to_one_minus_price() {
    let db = TestDb::new().await;
    db.market("np").await;
    let c = db.client().await;
    c.execute(
        "INSERT INTO trades (market_id, side, price, qty) VALUES ('np', 'no', 0.2345, 7)",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(market_row(&c, "np").await, (1, 7, Some("0.7655".into())));
    c.execute(
        "INSERT INTO trades (market_id, side, price, qty) VALUES ('np', 'yes', 0.0001, 1)",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(market_row(&c, "np").await, (2, 8, Some("0.0001".into())));
}

#[tokio::test]
async fn client_supplied_seq_and_created_at_are_ignored() {
    let db = TestDb::new().await;
    db.market("cs").await;
    let c = db.client().await;
    for want in 1..=2i64 {
        let r = c
            .query_one(
                "INSERT INTO trades (market_id, seq, side, price, qty, created_at) \
                 VALUES ('cs', 999, 'yes', 0.5, 1, '2000-01-01T00:00:00Z') \
                 RETURNING seq, created_at >= now(), extract(year FROM created_at)::int",
                &[],
            )
            .await
            .unwrap();
        let (seq, fresh, year): (i64, bool, i32) = (r.get(0), r.get(1), r.get(2));
        assert_eq!(seq, want);
        assert!(fresh, "created_at is the database's clock");
        assert_ne!(year, 2000);
    }
    assert_eq!(seqs(&c, "cs").await, vec![1, 2]);
    assert_eq!(market_row(&c, "cs").await.0, 2);
}

#[tokio::test]
async fn missing_and_closed_markets_are_refused() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let e = insert_trade(&c, "nope").await.unwrap_err();
    assert_eq!(sqlstate(&e), "P0002");
    assert!(
        db_message(&e).contains("unknown market"),
        "{}",
        db_message(&e)
    );

    db.market("cl").await;
    assert_eq!(insert_trade(&c, "cl").await.unwrap(), 1);
    c.execute("UPDATE markets SET status = 'closed' WHERE id = 'cl'", &[])
        .await
        .unwrap();
    let e = insert_trade(&c, "cl").await.unwrap_err();
    assert_eq!(sqlstate(&e), "55000");
    assert!(db_message(&e).contains("closed"), "{}", db_message(&e));
    c.execute(
        "UPDATE markets SET status = 'resolved' WHERE id = 'cl'",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(
        sqlstate(&insert_trade(&c, "cl").await.unwrap_err()),
        "55000"
    );
    // Refused inserts took no seq; reopening continues at 2.
    assert_eq!(market_row(&c, "cl").await, (1, 1, Some("0.5000".into())));
    c.execute("UPDATE markets SET status = 'open' WHERE id = 'cl'", &[])
        .await
        .unwrap();
    assert_eq!(insert_trade(&c, "cl").await.unwrap(), 2);
    assert_eq!(seqs(&c, "cl").await, vec![1, 2]);

    // Market ids are checked by the database too.
    let e = c
        .execute("INSERT INTO markets (id) VALUES ('bad id')", &[])
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "23514");
    let e = c
        .execute("INSERT INTO markets (id) VALUES ($1)", &[&"a".repeat(65)])
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "23514");
}

#[tokio::test]
async fn duplicate_client_order_id_leaves_no_gap() {
    let db = TestDb::new().await;
    db.market("oc").await;
    db.market("oc2").await;
    let c = db.client().await;
    let mut listener = Listener::new(&db.url, [shard_of(&c, "oc").await]).await;
    let ins = |coid: &'static str, suffix: &'static str| {
        let c = &c;
        async move {
            c.query_one(
                &format!(
                    "INSERT INTO trades (market_id, side, price, qty, client_order_id) \
                     VALUES ('oc', 'yes', 0.5, 3, '{coid}') {suffix} RETURNING seq"
                ),
                &[],
            )
            .await
            .map(|r| r.get::<_, i64>(0))
        }
    };
    assert_eq!(ins("x", "").await.unwrap(), 1);
    for suffix in [
        "",
        "ON CONFLICT DO NOTHING",
        "ON CONFLICT (market_id, client_order_id) WHERE client_order_id IS NOT NULL DO NOTHING",
    ] {
        let e = ins("x", suffix).await.unwrap_err();
        assert_eq!(sqlstate(&e), "23505", "{suffix}");
        assert_eq!(
            e.as_db_error().unwrap().constraint(),
            Some("trades_client_order_id"),
            "{suffix}"
        );
    }
    assert_eq!(market_row(&c, "oc").await, (1, 3, Some("0.5000".into())));
    assert_eq!(ins("y", "").await.unwrap(), 2);
    assert_eq!(seqs(&c, "oc").await, vec![1, 2]);
    assert_eq!(market_row(&c, "oc").await, (2, 6, Some("0.5000".into())));
    let chan = format!("marketcast_shard_{}", shard_of(&c, "oc").await);
    assert_eq!(listener.next().await, (chan.clone(), "oc".into(), 1));
    assert_eq!(listener.next().await, (chan, "oc".into(), 2));

    // The same client_order_id is free in another market; NULLs never collide.
    let seq: i64 = c
        .query_one(
            "INSERT INTO trades (market_id, side, price, qty, client_order_id) \
             VALUES ('oc2', 'yes', 0.5, 1, 'x') RETURNING seq",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(seq, 1);
    for want in 2..=3 {
        assert_eq!(insert_trade(&c, "oc2").await.unwrap(), want);
    }
}

#[tokio::test]
async fn update_delete_truncate_are_refused_even_for_the_owner() {
    let db = TestDb::new().await;
    db.market("ao").await;
    db.trades("ao", 2).await;
    let c = db.client().await;
    let su: bool = c
        .query_one(
            "SELECT rolsuper FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(su, "the test connection is the owner (a superuser)");
    for sql in [
        "UPDATE trades SET qty = 99",
        "UPDATE trades SET seq = seq + 10 WHERE market_id = 'ao'",
        "DELETE FROM trades",
        "DELETE FROM trades WHERE seq = 1",
        "TRUNCATE trades",
        "TRUNCATE trades CASCADE",
    ] {
        let e = c.execute(sql, &[]).await.unwrap_err();
        assert_eq!(sqlstate(&e), "42501", "{sql}");
        assert!(
            db_message(&e).contains("append-only"),
            "{sql}: {}",
            db_message(&e)
        );
    }
    let rows: Vec<(i64, i64)> = c
        .query("SELECT seq, qty FROM trades ORDER BY seq", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(rows, vec![(1, 1), (2, 2)]);
}

#[tokio::test]
async fn prune_keeps_each_markets_newest_trade() {
    let db = TestDb::new().await;
    for m in ["p1", "p2", "p3"] {
        db.market(m).await;
    }
    db.trades("p1", 5).await;
    db.trades("p2", 1).await;
    let c = db.client().await;

    let removed = marketcast::db::prune(&db.url, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(removed, 4);
    assert_eq!(seqs(&c, "p1").await, vec![5]);
    assert_eq!(seqs(&c, "p2").await, vec![1]);
    assert_eq!(seqs(&c, "p3").await, Vec::<i64>::new());
    assert_eq!(market_row(&c, "p1").await, (5, 15, Some("0.5000".into())));

    // Directly, with a bound in the future: nothing more to remove.
    let n: i64 = c
        .query_one("SELECT marketcast_prune(now() + interval '1 hour')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);

    // The pruning flag does not outlive the function, even in its transaction.
    let mut c2 = db.client().await;
    let tx = c2.transaction().await.unwrap();
    tx.query_one("SELECT marketcast_prune(now() + interval '1 hour')", &[])
        .await
        .unwrap();
    let e = tx.execute("DELETE FROM trades", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&e), "42501");
    drop(tx);
    let e = c.execute("DELETE FROM trades", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&e), "42501");

    // The log continues after the kept head.
    assert_eq!(insert_trade(&c, "p1").await.unwrap(), 6);
    assert_eq!(seqs(&c, "p1").await, vec![5, 6]);
}

#[tokio::test]
async fn oversized_trade_commits_and_its_doorbell_resolves() {
    let db = TestDb::new().await;
    db.market("big").await;
    let c = db.client().await;
    let mut listener = Listener::new(&db.url, [shard_of(&c, "big").await]).await;
    let trader = "t".repeat(20_000);
    let coid = "c".repeat(100);
    let seq: i64 = c
        .query_one(
            "INSERT INTO trades (market_id, side, price, qty, trader, client_order_id) \
             VALUES ('big', 'yes', 0.42, 3, $1, $2) RETURNING seq",
            &[&trader, &coid],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(seq, 1);

    let (channel, payload) = tokio::time::timeout(WAIT, listener.rx.recv())
        .await
        .expect("doorbell in time")
        .unwrap();
    assert!(payload.len() < 8000, "payload is {} bytes", payload.len());
    assert_eq!(
        channel,
        format!("marketcast_shard_{}", shard_of(&c, "big").await)
    );
    // The trader and client_order_id are never broadcast, so even this row
    // fits a signed payload (sql/0005; its fallback is in tests/it/signed.rs).
    let v: Value = serde_json::from_str(&payload).unwrap();
    assert_eq!((&v["m"], &v["s"]), (&json!("big"), &json!(1)), "{v}");
    let r = c
        .query_one(
            "SELECT trader, client_order_id, price::text, qty FROM trades WHERE market_id = $1 AND seq = $2",
            &[&v["m"].as_str().unwrap(), &v["s"].as_i64().unwrap()],
        )
        .await
        .unwrap();
    let (t, co, p, q): (String, String, String, i64) = (r.get(0), r.get(1), r.get(2), r.get(3));
    assert_eq!((t.len(), co, p, q), (20_000, coid, "0.4200".to_string(), 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_roles_grant_exactly_their_jobs() {
    let db = TestDb::new().await;
    let admin = db.client().await;
    let w_role = format!("w_{}", db.name);
    let b_role = format!("b_{}", db.name);
    admin
        .batch_execute(&format!(
            "DROP ROLE IF EXISTS {w_role}; DROP ROLE IF EXISTS {b_role};
             CREATE ROLE {w_role} LOGIN PASSWORD '{w_role}' IN ROLE marketcast_writer;
             CREATE ROLE {b_role} LOGIN PASSWORD '{b_role}' IN ROLE marketcast_broadcaster;"
        ))
        .await
        .unwrap();
    let w_url = as_user(&db.url, &w_role);
    let b_url = as_user(&db.url, &b_role);

    // --- writer: insert markets and trades, read; no update, delete, prune.
    let w = connect(&w_url).await;
    let who: String = w
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(who, w_role);
    w.execute("INSERT INTO markets (id, title) VALUES ('rw', 'x')", &[])
        .await
        .unwrap();
    assert_eq!(insert_trade(&w, "rw").await.unwrap(), 1);
    assert_eq!(seqs(&w, "rw").await, vec![1]);
    assert_eq!(market_row(&w, "rw").await, (1, 1, Some("0.5000".into())));
    w.query_one("SELECT shard_count FROM marketcast_config", &[])
        .await
        .unwrap();
    for sql in [
        "UPDATE markets SET title = 'y'",
        "UPDATE markets SET last_seq = 0",
        "DELETE FROM markets",
        "UPDATE trades SET qty = 2",
        "DELETE FROM trades",
        "TRUNCATE trades",
        "UPDATE marketcast_config SET shard_count = 2",
        "SELECT marketcast_prune(now())",
    ] {
        let e = w.execute(sql, &[]).await.unwrap_err();
        assert_eq!(sqlstate(&e), "42501", "writer: {sql}");
    }
    // The batch path's market lock is open to the writer.
    let locked: Vec<(String, String)> = w
        .query(
            "SELECT id, status FROM marketcast_lock_markets(ARRAY['rw', 'none'])",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(locked, vec![("rw".to_string(), "open".to_string())]);
    // Setting the pruning flag by hand grants nothing.
    w.batch_execute("SET marketcast.pruning = 'on'")
        .await
        .unwrap();
    let e = w.execute("DELETE FROM trades", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&e), "42501");
    assert_eq!(seqs(&admin, "rw").await, vec![1]);

    // --- broadcaster: read and LISTEN; no writes.
    let b = connect(&b_url).await;
    b.query("SELECT * FROM markets", &[]).await.unwrap();
    b.query("SELECT * FROM trades", &[]).await.unwrap();
    b.query_one("SELECT shard_count FROM marketcast_config", &[])
        .await
        .unwrap();
    b.batch_execute("LISTEN marketcast_shard_0").await.unwrap();
    for sql in [
        "INSERT INTO markets (id) VALUES ('rb-x')",
        "INSERT INTO trades (market_id, side, price, qty) VALUES ('rw', 'yes', 0.5, 1)",
        "UPDATE markets SET title = 'z'",
        "DELETE FROM markets",
        "SELECT * FROM marketcast_lock_markets(ARRAY['rw'])",
    ] {
        let e = b.execute(sql, &[]).await.unwrap_err();
        assert_eq!(sqlstate(&e), "42501", "broadcaster: {sql}");
    }
    let mut heard = Listener::all(&b_url).await;
    assert_eq!(insert_trade(&w, "rw").await.unwrap(), 2);
    let (_, m, s) = heard.next().await;
    assert_eq!((m.as_str(), s), ("rw", 2));
    assert_eq!(seqs(&admin, "rw").await, vec![1, 2]);

    // --- the writer role of the binary, connected as the writer login role.
    let mut wcfg = WriterConfig::new(DbConfig::new(w_url.clone()));
    // Long enough that a concurrent burst shares a batch.
    wcfg.batch_linger = Duration::from_millis(300);
    let wsrv = writer(wcfg).await;
    let (st, body) = http(
        "POST",
        &format!("{}/v1/markets", wsrv.http()),
        &[],
        Some(r#"{"id":"rw-http","title":"t"}"#),
    )
    .await;
    assert_eq!(st, 201, "{body}");
    let (st, body) = http(
        "POST",
        &format!("{}/v1/markets/rw-http/trades", wsrv.http()),
        &[],
        Some(r#"{"side":"yes","price":"0.63","qty":25,"client_order_id":"r1"}"#),
    )
    .await;
    assert_eq!(st, 201, "{body}");
    assert_eq!(body["seq"], 1);
    // A burst goes through the batched path.
    let mut burst = Vec::new();
    for i in 0..8 {
        let url = format!("{}/v1/markets/rw-http/trades", wsrv.http());
        burst.push(tokio::spawn(async move {
            http(
                "POST",
                &url,
                &[],
                Some(&format!(
                    r#"{{"side":"no","price":"0.25","qty":{}}}"#,
                    i + 1
                )),
            )
            .await
        }));
    }
    let mut got = Vec::new();
    for t in burst {
        let (st, body) = t.await.unwrap();
        assert_eq!(st, 201, "{body}");
        got.push(body["seq"].as_i64().unwrap());
    }
    got.sort();
    assert_eq!(got, (2..=9).collect::<Vec<_>>());
    // Batched means some of them shared a transaction (same xmin); a writer
    // role that cannot lock its batch's markets would commit each alone.
    let txns: i64 = admin
        .query_one(
            "SELECT count(DISTINCT xmin::text) FROM trades WHERE market_id = 'rw-http' AND seq BETWEEN 2 AND 9",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(txns < 8, "8 concurrent trades took {txns} transactions");
    let (st, _) = http("GET", &format!("{}/healthz", wsrv.http()), &[], None).await;
    assert_eq!(st, 200);
    wsrv.stop().await;
    assert_eq!(seqs(&admin, "rw-http").await, (1..=9).collect::<Vec<_>>());

    // --- the broadcaster role of the binary, as the broadcaster login role.
    let mut bcfg = broadcaster_config(&db);
    bcfg.db = DbConfig::new(b_url.clone());
    let bs = broadcaster(bcfg).await; // asserts /healthz 200
    let mut sock = connect_ws(&bs.ws()).await;
    let sub = subscribe(&mut sock, "rw-http", Some(7)).await;
    assert_eq!(sub["head_seq"], 9);
    expect_trades(&mut sock, "rw-http", 8, 9).await;
    insert_trade(&admin, "rw-http").await.unwrap();
    expect_trades(&mut sock, "rw-http", 10, 10).await;
    drop(sock);
    bs.stop().await;

    drop((w, b, heard));
    // Best effort: the roles are cluster-wide; the database goes with the run.
    let _ = admin
        .batch_execute(&format!(
            "DROP ROLE IF EXISTS {w_role}; DROP ROLE IF EXISTS {b_role};"
        ))
        .await;
}

async fn migrations_recorded(url: &str) -> (i64, i64, i32) {
    let c = connect(url).await;
    let r = c
        .query_one(
            "SELECT (SELECT count(*) FROM marketcast_migrations WHERE version = 1), \
                    (SELECT count(*) FROM marketcast_config), \
                    (SELECT shard_count FROM marketcast_config)",
            &[],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1), r.get(2))
}

#[tokio::test]
async fn migrate_is_idempotent() {
    let db = TestDb::empty().await;
    assert_eq!(marketcast::db::migrate(&db.url, 16).await.unwrap(), 16);
    assert_eq!(marketcast::db::migrate(&db.url, 16).await.unwrap(), 16);
    assert_eq!(migrations_recorded(&db.url).await, (1, 1, 16));
    // And the schema works.
    db.market("mi").await;
    db.trades("mi", 3).await;
    let c = db.client().await;
    assert_eq!(seqs(&c, "mi").await, vec![1, 2, 3]);
    // A third run leaves data alone.
    assert_eq!(marketcast::db::migrate(&db.url, 16).await.unwrap(), 16);
    assert_eq!(seqs(&c, "mi").await, vec![1, 2, 3]);
    assert!(marketcast::db::migrate(&db.url, 0).await.is_err());
    assert!(marketcast::db::migrate(&db.url, 4097).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_migrations_all_succeed_once() {
    let db = TestDb::empty().await;
    let runs: Vec<_> = (0..4)
        .map(|_| {
            let url = db.url.clone();
            tokio::spawn(async move { marketcast::db::migrate(&url, 16).await })
        })
        .collect();
    for r in runs {
        let n = tokio::time::timeout(WAIT, r)
            .await
            .expect("migrate finishes")
            .unwrap()
            .expect("every concurrent migrate succeeds");
        assert_eq!(n, 16);
    }
    assert_eq!(migrations_recorded(&db.url).await, (1, 1, 16));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_count_is_stored_once() {
    let db = TestDb::empty().await;
    assert_eq!(marketcast::db::migrate(&db.url, 4).await.unwrap(), 4);
    assert_eq!(marketcast::db::migrate(&db.url, 16).await.unwrap(), 4);
    assert_eq!(migrations_recorded(&db.url).await, (1, 1, 4));
    let c = db.client().await;
    for i in 0..40 {
        c.execute(
            "INSERT INTO markets (id) VALUES ($1)",
            &[&format!("s4-{i}")],
        )
        .await
        .unwrap();
    }
    let shards: BTreeSet<i32> = c
        .query("SELECT shard FROM markets", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        shards,
        (0..4).collect(),
        "40 markets spread over all 4 shards"
    );

    // Racing first migrations with different counts agree on one stored value.
    let db = TestDb::empty().await;
    let runs: Vec<_> = [3u32, 5, 7, 9]
        .into_iter()
        .map(|n| {
            let url = db.url.clone();
            tokio::spawn(async move { marketcast::db::migrate(&url, n).await.unwrap() })
        })
        .collect();
    let mut stored = BTreeSet::new();
    for r in runs {
        stored.insert(tokio::time::timeout(WAIT, r).await.unwrap().unwrap());
    }
    assert_eq!(stored.len(), 1, "{stored:?}");
    let n = *stored.iter().next().unwrap();
    assert!([3, 5, 7, 9].contains(&n));
    assert_eq!(migrations_recorded(&db.url).await, (1, 1, n as i32));
}

#[tokio::test]
async fn shard_assignment_is_in_range_stable_and_not_client_supplied() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let ids: Vec<String> = (0..200).map(|i| format!("sh-{i}")).collect();
    for id in &ids {
        // Every client-supplied counter and the shard are overridden.
        c.execute(
            "INSERT INTO markets (id, shard, last_seq, volume, last_price) VALUES ($1, 9999, 50, 7, 0.5)",
            &[id],
        )
        .await
        .unwrap();
    }
    let rows = c
        .query(
            "SELECT id, shard, (((hashtextextended(id, 0) % 16) + 16) % 16)::int, \
                    last_seq, volume, last_price IS NULL FROM markets ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 200);
    let mut first: BTreeMap<String, i32> = BTreeMap::new();
    for r in &rows {
        let (id, shard, derived): (String, i32, i32) = (r.get(0), r.get(1), r.get(2));
        assert!((0..16).contains(&shard), "{id}: {shard}");
        assert_eq!(shard, derived, "{id}: derived from the id");
        assert_eq!(
            (r.get::<_, i64>(3), r.get::<_, i64>(4), r.get::<_, bool>(5)),
            (0, 0, true),
            "{id}: counters start at zero"
        );
        first.insert(id, shard);
    }
    let used: BTreeSet<i32> = first.values().copied().collect();
    assert_eq!(used, (0..16).collect(), "200 markets use every shard");

    // Stable: unchanged by trades, and the same id gets the same shard in
    // another database.
    db.trades("sh-0", 3).await;
    assert_eq!(shard_of(&c, "sh-0").await, first["sh-0"]);
    let other = TestDb::new().await;
    let c2 = other.client().await;
    for id in ["sh-0", "sh-1", "sh-2", "sh-199"] {
        other.market(id).await;
        assert_eq!(shard_of(&c2, id).await, first[id], "{id}");
    }
}
