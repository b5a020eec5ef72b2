//! The guarantee across failures outside the broadcaster's control: a
//! Postgres restart, and a broadcaster killed and replaced while the reference
//! client (`marketcast subscribe`) follows a market.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};

use crate::support::*;

fn pg_dev() -> String {
    format!("{}/bin/pg-dev", env!("CARGO_MANIFEST_DIR"))
}

/// A cluster of its own (a restart must not disturb the other tests).
struct OwnCluster {
    dir: String,
    url: String,
}

impl OwnCluster {
    async fn start() -> OwnCluster {
        let dir = format!("/tmp/mc-restart-{}", std::process::id());
        let out = tokio::process::Command::new(pg_dev())
            .arg("start")
            .env("PGDEV_DIR", &dir)
            .stderr(Stdio::null())
            .output()
            .await
            .unwrap();
        assert!(out.status.success(), "pg-dev start");
        let stdout = String::from_utf8(out.stdout).unwrap();
        let url = stdout
            .lines()
            .last()
            .unwrap()
            .strip_prefix("DATABASE_URL=")
            .unwrap()
            .to_string();
        OwnCluster { dir, url }
    }
    async fn run(&self, cmd: &str) {
        let st = tokio::process::Command::new(pg_dev())
            .args(cmd.split(' '))
            .env("PGDEV_DIR", &self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .unwrap();
        assert!(st.success(), "pg-dev {cmd}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_loses_nothing() {
    let cluster = OwnCluster::start().await;
    let url = with_db(&cluster.url, "postgres");
    marketcast::db::migrate(&url, 4).await.unwrap();
    let db = TestDb {
        name: "postgres".into(),
        url: url.clone(),
    };
    db.market("PR").await;
    let b = broadcaster(broadcaster_config(&db)).await;
    let mut ws = connect_ws(&b.ws()).await;
    subscribe(&mut ws, "PR", Some(0)).await;
    db.trades("PR", 3).await;
    expect_trades(&mut ws, "PR", 1, 3).await;

    // Trades keep flowing through the restart: a writer that reconnects and
    // retries. Whatever committed (the log says) must reach the client.
    let wurl = url.clone();
    let writer = tokio::spawn(async move {
        let mut done = 0;
        let mut client: Option<tokio_postgres::Client> = None;
        while done < 60 {
            let Some(c) = &client else {
                if let Ok((c, conn)) = tokio_postgres::connect(&wurl, tokio_postgres::NoTls).await {
                    tokio::spawn(async move {
                        let _ = conn.await; // ends with the restart; we reconnect
                    });
                    client = Some(c);
                } else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                continue;
            };
            match c
                .execute(
                    "INSERT INTO trades (market_id, side, price, qty) VALUES ('PR', 'yes', 0.5, 1)",
                    &[],
                )
                .await
            {
                Ok(_) => done += 1,
                Err(_) => {
                    client = None;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    cluster.run("restart").await;
    tokio::time::timeout(WAIT * 2, writer)
        .await
        .expect("writer finishes")
        .unwrap();
    let last: i64 = db
        .client()
        .await
        .query_one("SELECT last_seq FROM markets WHERE id = 'PR'", &[])
        .await
        .unwrap()
        .get(0);
    assert!(last >= 63, "60 more committed, got last_seq {last}");
    expect_trades(&mut ws, "PR", 4, last).await;
    expect_silence(&mut ws, Duration::from_millis(300)).await;
    b.stop().await;
    cluster.run("stop --wipe").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_client_survives_a_broadcaster_replacement() {
    let db = TestDb::new().await;
    db.market("K").await;
    db.trades("K", 2).await;
    let b = broadcaster(broadcaster_config(&db)).await;
    let addr = b.addr;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_marketcast"))
        .args([
            "subscribe",
            &b.ws(),
            "--market",
            "K",
            "--from-seq",
            "0",
            "--count",
            "12",
            "--reconnect-max",
            "200ms",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seqs = Vec::new();
    for _ in 0..2 {
        seqs.push(next_seq(&mut lines).await);
    }
    db.trades("K", 3).await;
    for _ in 0..3 {
        seqs.push(next_seq(&mut lines).await);
    }
    // Kill the broadcaster; trades commit while none runs; a new one takes the port.
    b.stop().await;
    db.trades("K", 4).await;
    let l = tokio::net::TcpListener::bind(addr).await.unwrap();
    let cfg = broadcaster_config(&db);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(marketcast::broadcaster::run(l, cfg, shutdown.clone()));
    db.trades("K", 3).await;
    for _ in 0..7 {
        seqs.push(next_seq(&mut lines).await);
    }
    assert_eq!(
        seqs,
        (1..=12).collect::<Vec<i64>>(),
        "every trade once, in order, across the replacement"
    );
    let st = tokio::time::timeout(WAIT, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(st.success(), "subscribe exits 0 after --count trades");
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

async fn next_seq(lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>) -> i64 {
    let l = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .expect("a line in time")
        .unwrap()
        .expect("a line");
    let v: serde_json::Value = serde_json::from_str(&l).unwrap();
    v["seq"].as_i64().unwrap()
}
