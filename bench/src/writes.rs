//! S5 writes: keep-alive HTTP/1.1 clients POSTing one trade each to the
//! writer role (`marketcast writer`, which groups concurrent requests into
//! one transaction), beside the same number of SQL connections doing one
//! INSERT per transaction (every notifying commit takes Postgres's NOTIFY
//! lock through its WAL flush).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use marketcast::db;

use crate::feed::random_trade;
use crate::hist::Hist;
use crate::report::figures;
use crate::{Env, MARKETS};

figures! {
    /// S5, one run: the writer over HTTP, then plain SQL.
    pub struct S5Figures {
        clients: median,
        duration_s: median,
        http_trades_per_s: median,
        http_p50_ms: median,
        http_p99_ms: median,
        http_errors: median,
        sql_trades_per_s: median,
        sql_p50_ms: median,
        sql_p99_ms: median,
        sql_errors: median,
        ratio: median,
    }
}

pub async fn run(env: &Env, run: usize) -> Result<S5Figures> {
    let writer = env.start_writer().await?;
    let r = measure(env, writer.addr, run).await;
    writer.stop().await;
    r
}

async fn measure(env: &Env, writer: SocketAddr, run: usize) -> Result<S5Figures> {
    let set = &env.set;
    let markets = env.create_markets(&format!("s5-r{run}"), MARKETS).await?;
    let d = set.s5_duration;
    let n = set.s5_clients;

    // The writer over HTTP.
    let hist = Arc::new(Hist::new());
    let start = Instant::now();
    let deadline = start + d;
    let hs: Vec<_> = (0..n)
        .map(|i| {
            let market = markets[i % markets.len()].clone();
            env.client_rt
                .spawn(s5_http_client(writer, market, deadline, hist.clone()))
        })
        .collect();
    let (http_ok, http_err) = join_counts(hs, "writer client").await?;
    let http_secs = start.elapsed().as_secs_f64();

    // Plain SQL, one trade per transaction.
    let sql_hist = Arc::new(Hist::new());
    let start = Instant::now();
    let deadline = start + d;
    let hs: Vec<_> = (0..n)
        .map(|i| {
            let market = markets[i % markets.len()].clone();
            env.client_rt.spawn(s5_sql_client(
                env.url.clone(),
                market,
                deadline,
                sql_hist.clone(),
            ))
        })
        .collect();
    let (sql_ok, sql_err) = join_counts(hs, "SQL client").await?;
    let sql_secs = start.elapsed().as_secs_f64();

    let http_tps = http_ok as f64 / http_secs;
    let sql_tps = sql_ok as f64 / sql_secs;
    Ok(S5Figures {
        clients: n as f64,
        duration_s: d.as_secs_f64(),
        http_trades_per_s: http_tps,
        http_p50_ms: hist.quantile(0.5, 0) / 1000.0,
        http_p99_ms: hist.quantile(0.99, 0) / 1000.0,
        http_errors: http_err as f64,
        sql_trades_per_s: sql_tps,
        sql_p50_ms: sql_hist.quantile(0.5, 0) / 1000.0,
        sql_p99_ms: sql_hist.quantile(0.99, 0) / 1000.0,
        sql_errors: sql_err as f64,
        ratio: http_tps / sql_tps,
    })
}

type ClientResult = Result<(u64, u64, Option<String>)>;

async fn join_counts(
    hs: Vec<tokio::task::JoinHandle<ClientResult>>,
    what: &str,
) -> Result<(u64, u64)> {
    let (mut ok, mut err) = (0, 0);
    let mut first = None;
    for h in hs {
        let (o, e, f) = h.await.with_context(|| format!("a {what} panicked"))??;
        ok += o;
        err += e;
        if first.is_none() {
            first = f;
        }
    }
    if let Some(f) = first {
        eprintln!("  {what}s: {err} failed requests, first: {f}");
    }
    Ok((ok, err))
}

async fn s5_http_client(
    addr: SocketAddr,
    market: String,
    deadline: Instant,
    hist: Arc<Hist>,
) -> ClientResult {
    let tcp = TcpStream::connect(addr)
        .await
        .context("connecting to the writer")?;
    tcp.set_nodelay(true)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .context("HTTP handshake with the writer")?;
    tokio::spawn(async move {
        // Ends when the sender is dropped; failures surface in send_request.
        let _ = conn.await;
    });
    let path = format!("/v1/markets/{market}/trades");
    let host = addr.to_string();
    let (mut ok, mut err, mut first) = (0, 0, None);
    while Instant::now() < deadline {
        let (side, ticks, qty) = random_trade();
        let body = format!(r#"{{"side":"{side}","price":"0.{ticks:04}","qty":{qty}}}"#);
        let req = Request::post(&path)
            .header(HOST, &host)
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))?;
        let t = Instant::now();
        sender
            .ready()
            .await
            .context("the writer connection closed")?;
        let resp = sender.send_request(req).await.context("POST trade")?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .context("reading the writer's answer")?
            .to_bytes();
        hist.record(t.elapsed().as_micros() as u64);
        if status == StatusCode::CREATED {
            ok += 1;
        } else {
            err += 1;
            first.get_or_insert_with(|| format!("{status}: {}", String::from_utf8_lossy(&body)));
        }
    }
    Ok((ok, err, first))
}

async fn s5_sql_client(
    url: String,
    market: String,
    deadline: Instant,
    hist: Arc<Hist>,
) -> ClientResult {
    let c = db::connect(&url, "marketcast-bench-s5").await?;
    let st = c
        .prepare("INSERT INTO trades (market_id, side, price, qty) VALUES ($1, $2, $3::text::numeric, $4)")
        .await
        .context("preparing the S5 INSERT")?;
    let (mut ok, mut err, mut first) = (0, 0, None);
    while Instant::now() < deadline {
        let (side, ticks, qty) = random_trade();
        let price = format!("0.{ticks:04}");
        let t = Instant::now();
        match c.execute(&st, &[&market, &side, &price, &qty]).await {
            Ok(_) => {
                hist.record(t.elapsed().as_micros() as u64);
                ok += 1;
            }
            Err(e) => {
                err += 1;
                first.get_or_insert_with(|| db::DbError::from(e).to_string());
            }
        }
    }
    Ok((ok, err, first))
}
