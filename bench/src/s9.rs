//! S9, what LISTENers cost the writers (issue 15 item 6): K idle connections
//! LISTEN on every shard channel (`marketcast_shard_<k>`), each driven so
//! that it reads its notifications (as a broadcaster's listener does), then
//! `--s9-writers` plain SQL connections commit one-trade transactions
//! (`INSERT INTO trades`, whose trigger NOTIFYs) as fast as they can for
//! `--s9-duration`; the figure is committed trades/s per K. No broadcaster
//! runs. Each writer has a market of its own, so the writers contend only on
//! Postgres's NOTIFY commit lock and the WAL flush, not on a market's seq.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures_util::StreamExt;
use tokio_postgres::{AsyncMessage, NoTls};

use marketcast::db;

use crate::feed::random_trade;
use crate::hist::Hist;
use crate::procs::PgCpu;
use crate::report::figures;
use crate::Env;

figures! {
    /// S9, one run at one K.
    pub struct S9Figures {
        listeners: median,
        writers: median,
        duration_s: median,
        trades_per_s: median,
        p99_commit_ms: median,
        pg_cpu_pct: median,
        notifications_per_listener: median,
        notifications_missing: worst,
        errors: worst,
    }
}

/// K values of a run, rotated from run to run.
pub fn order(ks: &[usize], run: usize) -> Vec<usize> {
    let mut v = ks.to_vec();
    let len = v.len();
    if len > 0 {
        v.rotate_left((run - 1) % len);
    }
    v
}

pub async fn run(env: &Env, k: usize, run: usize) -> Result<S9Figures> {
    let set = &env.set;
    let shards: i32 = env
        .admin
        .query_one("SELECT shard_count FROM marketcast_config", &[])
        .await
        .context("reading the shard count")?
        .try_get(0)?;
    let listen_sql: String = (0..shards)
        .map(|s| {
            format!(
                "LISTEN {};",
                marketcast::protocol::doorbell::channel(s as u32)
            )
        })
        .collect();
    // K listeners, each on its own connection and driver task.
    let received = Arc::new(AtomicU64::new(0));
    let mut listeners = Vec::with_capacity(k);
    for _ in 0..k {
        let (client, mut conn) = tokio_postgres::connect(&env.url, NoTls)
            .await
            .context("connecting an S9 listener")?;
        let rx = received.clone();
        let driver = env.client_rt.spawn(async move {
            let mut msgs = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
            while let Some(m) = msgs.next().await {
                match m {
                    Ok(AsyncMessage::Notification(_)) => {
                        rx.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        });
        client
            .batch_execute(&listen_sql)
            .await
            .context("LISTEN on an S9 listener")?;
        listeners.push((client, driver));
    }
    let markets = env
        .create_markets(&format!("s9-r{run}-k{k}"), set.s9_writers)
        .await?;
    let mut writers = Vec::with_capacity(markets.len());
    for m in &markets {
        let c = db::connect(&env.url, "marketcast-bench-s9").await?;
        let st = c
            .prepare(
                "INSERT INTO trades (market_id, side, price, qty) \
                 VALUES ($1, $2, $3::text::numeric, $4)",
            )
            .await
            .context("preparing the S9 INSERT")?;
        writers.push((c, st, m.clone()));
    }
    // Let the connections settle.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let d = set.s9_duration;
    let hist = Arc::new(Hist::new());
    let pg0 = PgCpu::sample();
    let seen0 = received.load(Ordering::Relaxed);
    let deadline = Instant::now() + d;
    let t0 = Instant::now();
    let hs: Vec<_> = writers
        .into_iter()
        .map(|(c, st, m)| {
            let hist = hist.clone();
            env.feed_rt.spawn(async move {
                let (mut ok, mut err) = (0u64, 0u64);
                while Instant::now() < deadline {
                    let (side, ticks, qty) = random_trade();
                    let price = format!("0.{ticks:04}");
                    let t = Instant::now();
                    match c.execute(&st, &[&m, &side, &price, &qty]).await {
                        Ok(_) => {
                            hist.record(t.elapsed().as_micros() as u64);
                            ok += 1;
                        }
                        Err(_) => err += 1,
                    }
                }
                (ok, err)
            })
        })
        .collect();
    let (mut ok, mut err) = (0u64, 0u64);
    for h in hs {
        let (o, e) = h.await.context("an S9 writer panicked")?;
        ok += o;
        err += e;
    }
    let secs = t0.elapsed().as_secs_f64();
    let pg = PgCpu::sample().pct_since(&pg0);
    // Every listener must get every notification: wait for the last ones.
    let want = ok * k as u64;
    let wait = Instant::now() + Duration::from_secs(5);
    while received.load(Ordering::Relaxed) - seen0 < want && Instant::now() < wait {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let got = received.load(Ordering::Relaxed) - seen0;
    for (client, driver) in listeners {
        drop(client);
        driver.abort();
    }
    Ok(S9Figures {
        listeners: k as f64,
        writers: set.s9_writers as f64,
        duration_s: secs,
        trades_per_s: ok as f64 / secs,
        p99_commit_ms: hist.quantile(0.99, 0) / 1000.0,
        pg_cpu_pct: pg,
        notifications_per_listener: if k == 0 {
            f64::NAN
        } else {
            got as f64 / k as f64
        },
        notifications_missing: want.saturating_sub(got) as f64,
        errors: err as f64,
    })
}
