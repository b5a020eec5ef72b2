//! The reference client (`marketcast subscribe`) across a broadcaster killed
//! and replaced while it follows a market. Postgres restarts and outages,
//! under load, are in `faults`.

use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, BufReader};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_client_survives_a_broadcaster_replacement() {
    let db = TestDb::new().await;
    db.market("K").await;
    db.trades("K", 2).await;
    let b = broadcaster(broadcaster_config(&db)).await;
    let addr = b.addr;
    let (mut child, mut lines) = subscribe_cli(&b.ws(), "K", 12);
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

/// `marketcast subscribe URL --market M --from-seq 0 --count N`, its stdout
/// as lines.
fn subscribe_cli(
    url: &str,
    market: &str,
    count: u32,
) -> (
    tokio::process::Child,
    tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
) {
    let count = count.to_string();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_marketcast"))
        .args(["subscribe", url, "--market", market, "--from-seq", "0"])
        .args(["--count", &count, "--reconnect-max", "200ms"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    (child, lines)
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_client_survives_a_broadcaster_killed_with_sigkill() {
    let db = TestDb::new().await;
    db.market("K9").await;
    db.trades("K9", 2).await;
    // A child process, so that it can die the hard way: no Close frame, no
    // shutdown, its sockets closed by the kernel.
    let b = crate::faults::ChildBroadcaster::start(&db.broadcaster_url(), &[]).await;
    let addr = b.addr;
    let (mut child, mut lines) = subscribe_cli(&b.ws(), "K9", 9);
    let mut seqs = Vec::new();
    for _ in 0..2 {
        seqs.push(next_seq(&mut lines).await);
    }
    b.kill9().await;
    db.trades("K9", 4).await;
    let l = tokio::net::TcpListener::bind(addr).await.unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(marketcast::broadcaster::run(
        l,
        broadcaster_config(&db),
        shutdown.clone(),
    ));
    db.trades("K9", 3).await;
    for _ in 0..7 {
        seqs.push(next_seq(&mut lines).await);
    }
    assert_eq!(
        seqs,
        (1..=9).collect::<Vec<i64>>(),
        "every trade once, in order, across the kill"
    );
    let st = tokio::time::timeout(WAIT, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(st.success(), "subscribe exits 0 after --count trades");
    shutdown.cancel();
    task.await.unwrap().unwrap();
}
