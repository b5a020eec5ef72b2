//! `marketcast demo`: everything in one process, for a first look.
//!
//! Without a database URL it starts a throwaway cluster with `bin/pg-dev`
//! (state in [`DemoConfig::pg_dev_dir`], so markets and trades survive
//! between runs; [`crate::pgdev`]) and
//! stops it again on the way out. It migrates, creates a handful of demo
//! markets if they are missing, and runs in-process:
//!
//! - the writer ([`crate::writer::run`]) on an internal `127.0.0.1:0` port;
//! - the broadcaster ([`crate::broadcaster::run`]) on `--ws-listen`;
//! - a front server on `--listen` serving the market page at `/`, its
//!   `/config.json` (where the WebSocket is), the page's WebSocket client
//!   (clients/typescript) under `/client/`, and forwarding every other
//!   request to the writer. Forwarding keeps the page and the write API on one
//!   origin, so the writer needs no CORS. The page opens its WebSocket to the
//!   broadcaster directly (WebSockets are not subject to CORS);
//! - a synthetic trading flow of `--rate` plain-SQL INSERTs per second, which
//!   exercises the same trigger -> NOTIFY path as any SQL client.
//!
//! Stdout carries three product lines once all of it is up:
//! `listening on HOST:PORT` (the page and API), `page: http://HOST:PORT/` and
//! `ws: ws://HOST:PORT/ws`. SIGINT or SIGTERM stops every part, then the
//! cluster if the demo started it, and the process exits 0.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::{header, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{BroadcasterConfig, DbConfig, DemoConfig, WriterConfig, DEFAULT_SHARD_COUNT};
use crate::http::{self, Body};
use crate::pgdev::PgDev;
use crate::{broadcaster, db, writer};

mod flow;

/// The market page: plain HTML, CSS and JS, no build step.
const PAGE: &str = include_str!("demo/page/index.html");

/// The page's WebSocket client, marketcast-client (clients/typescript), as
/// committed in its `dist/` (`make ts-test` fails when that is stale), so the
/// Rust build needs no Node. Served under `/client/` with the relative import
/// between its two modules intact: `(path, source)`.
const CLIENT: &[(&str, &str)] = &[
    (
        "/client/index.js",
        include_str!("../clients/typescript/dist/index.js"),
    ),
    (
        "/client/core.js",
        include_str!("../clients/typescript/dist/core.js"),
    ),
];

/// Markets created on start when missing: `(id, title)`.
const MARKETS: &[(&str, &str)] = &[
    (
        "ELECTION-2028",
        "Will the incumbent party win the 2028 US presidential election?",
    ),
    (
        "FED-CUT-DEC",
        "Will the Fed cut rates at its December meeting?",
    ),
    ("BTC-100K", "Will Bitcoin close the year above $100k?"),
    ("RAIN-NYC", "Will it rain in New York City tomorrow?"),
    ("MARS-2030", "Will humans land on Mars before 2030?"),
];

/// Longest a forwarded request may take. The writer answers within its 5 s
/// database bound, so this only fires when the writer itself is stuck.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(15);

/// Largest writer response the front server relays (a full trades page is
/// about 150 KiB).
const FORWARD_MAX_BYTES: usize = 8 * 1024 * 1024;

/// Run the demo until `shutdown` is cancelled. A cluster started here is
/// stopped before returning, whatever happened in between.
pub async fn run(cfg: DemoConfig, shutdown: CancellationToken) -> Result<()> {
    let Some(url) = cfg.database_url.clone() else {
        tracing::info!(dir = %cfg.pg_dev_dir.display(), "starting a throwaway PostgreSQL");
        let pg = match PgDev::start(&cfg.pg_dev_dir).await {
            Ok(pg) => pg,
            // Ctrl-C while pg-dev was starting reaches pg-dev too, which then fails.
            Err(_) if shutdown.is_cancelled() => return Ok(()),
            Err(e) => {
                return Err(e.context(
                    "bin/pg-dev start failed; set --database-url to use an existing PostgreSQL",
                ))
            }
        };
        let r = if shutdown.is_cancelled() {
            Ok(())
        } else {
            serve(&cfg, &pg.url, shutdown).await
        };
        tracing::info!(dir = %pg.dir().display(), "stopping the throwaway PostgreSQL");
        if let Err(e) = pg.run(&["stop"]).await {
            tracing::error!(
                "{e:#}; stop it by hand: PGDEV_DIR={} bin/pg-dev stop",
                pg.dir().display()
            );
        }
        return r;
    };
    serve(&cfg, &url, shutdown).await
}

async fn serve(cfg: &DemoConfig, url: &str, shutdown: CancellationToken) -> Result<()> {
    let shard_count = db::migrate(url, DEFAULT_SHARD_COUNT).await?;
    create_markets(url).await?;
    tracing::info!(
        shard_count,
        markets = MARKETS.len(),
        "schema and demo markets ready"
    );

    let front = TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("binding --listen {}", cfg.listen))?;
    let ws = TcpListener::bind(cfg.ws_listen)
        .await
        .with_context(|| format!("binding --ws-listen {}", cfg.ws_listen))?;
    let internal: SocketAddr = ([127, 0, 0, 1], 0).into();
    let api = TcpListener::bind(internal)
        .await
        .context("binding the internal writer port")?;
    let (front_addr, ws_addr, api_addr) =
        (front.local_addr()?, ws.local_addr()?, api.local_addr()?);

    // Any part that ends (an error, or the signal) ends the others too.
    let stop = shutdown.child_token();
    let db = DbConfig::new(url);
    let mut wcfg = WriterConfig::new(db.clone());
    wcfg.listen = api_addr;
    let mut bcfg = BroadcasterConfig::new(db);
    bcfg.listen = ws_addr;
    let mut parts: Vec<(&str, JoinHandle<Result<()>>)> = vec![
        (
            "writer",
            spawn_part(&stop, writer::run(api, wcfg, stop.clone())),
        ),
        (
            "broadcaster",
            spawn_part(&stop, broadcaster::run(ws, bcfg, stop.clone())),
        ),
    ];
    let state = Arc::new(Front {
        writer: api_addr,
        ws: ws_addr,
    });
    let front_stop = stop.clone();
    parts.push((
        "page server",
        spawn_part(&stop, async move {
            let limits = crate::config::HttpConfig::default();
            http::serve(
                front,
                &limits,
                http::Sockets::default(),
                front_stop,
                move |req, _peer| {
                    let state = state.clone();
                    async move { state.handle(req).await }
                },
            )
            .await;
            Ok(())
        }),
    ));
    if cfg.rate > 0.0 {
        parts.push((
            "trade flow",
            spawn_part(&stop, flow::run(url.to_string(), cfg.rate, stop.clone())),
        ));
    }

    // The product's own output (scripts and tests read it), not log lines.
    println!("listening on {front_addr}");
    println!("page: http://{}/", host_port(front_addr));
    println!("ws: ws://{}/ws", host_port(ws_addr));
    tracing::info!(page = %front_addr, ws = %ws_addr, writer = %api_addr, rate = cfg.rate, "demo running; Ctrl-C stops it");

    let mut first_err = None;
    for (name, h) in parts {
        let r = match h.await {
            Ok(r) => r,
            Err(e) => Err(anyhow::anyhow!("task panicked: {e}")),
        };
        if let Err(e) = r {
            tracing::error!("{name} failed: {e:#}");
            first_err.get_or_insert(e.context(format!("demo {name}")));
        }
    }
    match first_err {
        Some(e) => Err(e),
        None if !shutdown.is_cancelled() => bail!("a demo part stopped on its own"),
        None => Ok(()),
    }
}

/// Spawn one part of the demo; when it ends, for whatever reason, `stop` is
/// cancelled so the other parts end too.
fn spawn_part<F>(stop: &CancellationToken, fut: F) -> JoinHandle<Result<()>>
where
    F: std::future::Future<Output = Result<()>> + Send + 'static,
{
    let stop = stop.clone();
    tokio::spawn(async move {
        let r = fut.await;
        stop.cancel();
        r
    })
}

async fn create_markets(url: &str) -> Result<()> {
    let client = db::connect(url, "marketcast-demo").await?;
    for (id, title) in MARKETS {
        db::admin::ensure_market(&client, id, title)
            .await
            .with_context(|| format!("creating demo market {id}"))?;
    }
    Ok(())
}

/// `HOST:PORT` for a URL: IPv6 in brackets (SocketAddr's Display does that).
fn host_port(a: SocketAddr) -> String {
    a.to_string()
}

// ------------------------------------------------------------------ front server

struct Front {
    /// The in-process writer every non-page request is forwarded to.
    writer: SocketAddr,
    /// The broadcaster, for `/config.json`.
    ws: SocketAddr,
}

impl Front {
    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let page = matches!(*req.method(), Method::GET | Method::HEAD);
        match req.uri().path() {
            "/" | "/index.html" if page => http::bytes_response(
                StatusCode::OK,
                "text/html; charset=utf-8",
                Bytes::from_static(PAGE.as_bytes()),
            ),
            "/config.json" if page => http::json(
                StatusCode::OK,
                &json!({"ws_url": self.ws_url(&req), "api_base": ""}),
            ),
            path if page && path.starts_with("/client/") => {
                match CLIENT.iter().find(|(p, _)| *p == path) {
                    Some((_, src)) => http::bytes_response(
                        StatusCode::OK,
                        "text/javascript; charset=utf-8",
                        Bytes::from_static(src.as_bytes()),
                    ),
                    None => http::error(StatusCode::NOT_FOUND, "not_found", "no such file"),
                }
            }
            _ => self.forward(req).await,
        }
    }

    /// The WebSocket URL as this browser can reach it: the broadcaster's bound
    /// IP, or, when it listens on every interface, the host the page was
    /// loaded from (so a phone on the LAN gets the LAN address).
    fn ws_url(&self, req: &Request<Incoming>) -> String {
        if !self.ws.ip().is_unspecified() {
            return format!("ws://{}/ws", host_port(self.ws));
        }
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(strip_port)
            .unwrap_or("127.0.0.1");
        format!("ws://{host}:{}/ws", self.ws.port())
    }

    async fn forward(&self, req: Request<Incoming>) -> Response<Body> {
        match tokio::time::timeout(FORWARD_TIMEOUT, forward(self.writer, req)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                tracing::warn!("forwarding to the writer failed: {e:#}");
                http::error(
                    StatusCode::BAD_GATEWAY,
                    "unavailable",
                    "the writer could not be reached",
                )
            }
            Err(_) => http::error(
                StatusCode::GATEWAY_TIMEOUT,
                "unavailable",
                "the writer did not answer in time",
            ),
        }
    }
}

/// The host part of a `Host` header value (`[::1]:8080`, `example:80`, `example`).
fn strip_port(h: &str) -> &str {
    if let Some(end) = h.find(']') {
        return &h[..=end];
    }
    h.rsplit_once(':').map_or(h, |(host, _)| host)
}

/// Relay one request to the writer on a fresh connection and buffer its
/// answer. A connection per request is plenty for a page on localhost.
async fn forward(to: SocketAddr, req: Request<Incoming>) -> Result<Response<Body>> {
    let tcp = TcpStream::connect(to).await?;
    tcp.set_nodelay(true)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "writer connection ended with an error");
        }
    });
    let (mut parts, body) = req.into_parts();
    parts.uri = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .parse()?;
    parts.version = hyper::Version::HTTP_11;
    let resp = sender
        .send_request(Request::from_parts(parts, body))
        .await?;
    let (mut parts, body) = resp.into_parts();
    let bytes = Limited::new(body, FORWARD_MAX_BYTES)
        .collect()
        .await
        .map_err(|e| anyhow::anyhow!("reading the writer's answer: {e}"))?
        .to_bytes();
    parts.headers.remove(header::TRANSFER_ENCODING);
    parts.headers.remove(header::CONNECTION);
    Ok(Response::from_parts(parts, http::full(bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_header_ports() {
        assert_eq!(strip_port("example.org:8080"), "example.org");
        assert_eq!(strip_port("example.org"), "example.org");
        assert_eq!(strip_port("[::1]:8080"), "[::1]");
        assert_eq!(strip_port("192.168.1.5:80"), "192.168.1.5");
    }
}
