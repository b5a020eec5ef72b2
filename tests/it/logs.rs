//! What the real binary writes to stderr when it is not a terminal: no ANSI
//! colour escapes, and structured values printed plainly (`head_seq=3`, not
//! `head_seq=Some(3)` or `Some(Number(3))`), so that log pipelines can parse
//! them.

use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

use crate::support::*;

/// `marketcast subscribe` with stderr through a pipe: its `subscribed` line,
/// the trades, then the broadcaster going away (its close is logged) and a
/// failed reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_logs_plain_values_without_colour_through_a_pipe() {
    let db = TestDb::new().await;
    db.market("LG").await;
    db.trades("LG", 3).await;
    let b = broadcaster(broadcaster_config(&db)).await;

    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_marketcast"))
        .args(["subscribe", &b.ws(), "--market", "LG", "--from-seq", "0"])
        .args(["--reconnect-max", "200ms"])
        .env("RUST_LOG", "info")
        .env_remove("MARKETCAST_LOG_FORMAT")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run the marketcast binary");
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut err = child.stderr.take().unwrap();
    // Read stderr as it comes, so the child never blocks on a full pipe.
    let (err_tx, mut err_rx) = tokio::sync::watch::channel(String::new());
    let reader = tokio::spawn(async move {
        let mut buf = [0u8; 4096];
        while let Ok(n) = err.read(&mut buf).await {
            if n == 0 {
                break;
            }
            let chunk = String::from_utf8_lossy(&buf[..n]).into_owned();
            err_tx.send_modify(|s| s.push_str(&chunk));
        }
    });

    for seq in 1..=3 {
        let l = tokio::time::timeout(WAIT, out.next_line())
            .await
            .expect("a trade in time")
            .unwrap()
            .expect("a line");
        let v: serde_json::Value = serde_json::from_str(&l).unwrap();
        assert_eq!(v["seq"], seq, "{l}");
    }
    b.stop().await;
    tokio::time::timeout(
        WAIT,
        err_rx.wait_for(|s| s.contains("connection failed; retrying")),
    )
    .await
    .expect("the client logs its failed reconnect in time")
    .unwrap();
    child.kill().await.unwrap();
    tokio::time::timeout(WAIT, reader)
        .await
        .expect("stderr ends")
        .unwrap();
    let stderr = err_rx.borrow().clone();

    assert!(
        !stderr.contains("\x1b["),
        "ANSI escapes in piped stderr:\n{stderr:?}"
    );
    for debug in ["Some(", "None", "Number(", "String(", "CloseFrame"] {
        assert!(!stderr.contains(debug), "`{debug}` in stderr:\n{stderr}");
    }
    let line = |needle: &str| {
        stderr
            .lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no `{needle}` line in stderr:\n{stderr}"))
            .to_string()
    };
    let subscribed = line(" subscribed");
    assert!(
        subscribed.contains("market=LG") && subscribed.contains("head_seq=3"),
        "{subscribed}"
    );
    assert!(subscribed.contains("from=0"), "{subscribed}");
    let closed = line("server closed the connection");
    assert!(closed.contains("close_code=1001"), "{closed}");
}

/// `--worker-threads` sizes the runtime: the start line reports what the
/// runtime has (tokio's own count), so an option that was parsed but not
/// applied shows as this machine's default instead; 0 is refused by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_threads_size_the_runtime_and_zero_is_refused() {
    let db = TestDb::new().await;
    let run = |threads: &'static str| {
        let url = db.db_config().url.clone();
        async move {
            tokio::process::Command::new(env!("CARGO_BIN_EXE_marketcast"))
                .args(["--worker-threads", threads, "migrate"])
                .env("DATABASE_URL", url)
                .env("RUST_LOG", "info")
                .env_remove("MARKETCAST_WORKER_THREADS")
                .env_remove("TOKIO_WORKER_THREADS")
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .output()
                .await
                .expect("run the marketcast binary")
        }
    };
    // 3 and 5: neither is this 2-core machine's default, nor one another's.
    for n in ["3", "5"] {
        let out = tokio::time::timeout(WAIT, run(n))
            .await
            .expect("migrate in time");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        let line = stderr
            .lines()
            .find(|l| l.contains("runtime started"))
            .unwrap_or_else(|| panic!("no start line:\n{stderr}"));
        assert!(line.contains(&format!("worker_threads={n}")), "{line}");
    }
    let out = tokio::time::timeout(WAIT, run("0"))
        .await
        .expect("exit in time");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "a usage error: {stderr}");
    assert!(stderr.contains("--worker-threads"), "{stderr}");
}
