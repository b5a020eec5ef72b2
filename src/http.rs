//! HTTP server plumbing shared by the writer and the broadcaster: the accept
//! loop (HTTP/1.1 with upgrades) with a bound on every socket before its
//! request arrives and on how many are open, graceful shutdown of in-flight
//! requests, and small response helpers.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::{header, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::HttpConfig;
use crate::shutdown::DEADLINE;

/// Every answer's body: whole (`full`) or streamed (SSE), boxed so that one
/// handler type serves both.
pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, BodyError>;

/// Why a streamed body stopped short (hyper then drops the connection).
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// A whole body.
pub fn full(b: impl Into<Bytes>) -> Body {
    use http_body_util::BodyExt;
    Full::new(b.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Bind and print the contract's first stdout line, `listening on HOST:PORT`.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    use anyhow::Context;
    let l = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let local = l.local_addr()?;
    // The product's own output (scripts and tests read it), not a log line.
    println!("listening on {local}");
    Ok(l)
}

/// Open TCP connections of one server, counted at `accept` against
/// `--max-open-connections`. A connection's task holds a [`SocketSlot`]; a
/// WebSocket session takes one of its own for the upgraded socket before the
/// HTTP connection lets go of it, so every open socket is counted, before the
/// upgrade and after.
#[derive(Debug, Clone, Default)]
pub struct Sockets(Arc<AtomicUsize>);

/// One open socket of [`Sockets`]; dropping it frees the slot.
#[derive(Debug)]
pub struct SocketSlot(Arc<AtomicUsize>);

impl Sockets {
    pub fn open(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }

    /// A slot for a socket just accepted, if fewer than `max` are open.
    fn try_take(&self, max: usize) -> Option<SocketSlot> {
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| self.slot())
    }

    /// A slot for a socket that is already counted (an upgrade taking over
    /// its connection's socket): never refused.
    pub fn hold(&self) -> SocketSlot {
        self.0.fetch_add(1, Ordering::AcqRel);
        self.slot()
    }

    fn slot(&self) -> SocketSlot {
        OPEN_SOCKETS.increment(1.0);
        SocketSlot(self.0.clone())
    }
}

impl Drop for SocketSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
        OPEN_SOCKETS.decrement(1.0);
    }
}

/// Resolved once; servers start after `metrics::install`.
static OPEN_SOCKETS: LazyLock<metrics::Gauge> =
    LazyLock::new(|| metrics::gauge!("marketcast_open_connections"));

/// Serve `handler` on `listener` until `shutdown` is cancelled, then stop
/// accepting and give in-flight requests up to [`DEADLINE`].
///
/// HTTP/1.1 only: nothing marketcast serves needs HTTP/2 (WebSockets upgrade
/// from HTTP/1.1, and a load balancer speaks HTTP/1.1 to its backends), and
/// hyper-util's HTTP/1-or-2 sniff runs without a timer (hyper#3756, #3962),
/// so a socket that sent nothing was held for ever. hyper's HTTP/1 header
/// timeout starts at accept and again whenever a keep-alive connection waits
/// for its next request: a socket that sends no complete request head within
/// `header_timeout` is closed, silent or trickling, first request or idle.
/// An HTTP/2 preface is answered 400 and closed.
///
/// Upgraded (WebSocket) connections are not covered: hyper hands their IO
/// over and forgets them, so their owner tracks and closes them (see
/// `shutdown.rs`).
pub async fn serve<F, Fut>(
    listener: TcpListener,
    cfg: &HttpConfig,
    sockets: Sockets,
    shutdown: CancellationToken,
    handler: F,
) where
    F: Fn(Request<Incoming>, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let mut builder = http1::Builder::new();
    // Without a timer, header_read_timeout does nothing (or panics).
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.header_timeout);
    let connections = TaskTracker::new();
    loop {
        // Cancel safety: accept() and cancelled() are both cancel-safe.
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Usually EMFILE: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let Some(slot) = sockets.try_take(cfg.max_open_connections) else {
            // Closed at once (dropped): the cap bounds descriptors whatever
            // clients do, and what is already open keeps working.
            metrics::counter!("marketcast_connections_refused_total").increment(1);
            tracing::debug!(%peer, "connection refused: --max-open-connections reached");
            continue;
        };
        // Small frames must go out at once; coalescing is done by the writers.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "set_nodelay failed");
        }
        let h = handler.clone();
        let svc = hyper::service::service_fn(move |req| {
            let fut = h(req, peer);
            async move { Ok::<_, Infallible>(fut.await) }
        });
        let conn = builder
            .serve_connection(TokioIo::new(tcp), svc)
            .with_upgrades();
        let stop = shutdown.clone();
        connections.spawn(async move {
            let _slot = slot;
            tokio::pin!(conn);
            // Cancel safety: the connection future is pinned here and polled
            // again after graceful_shutdown, never dropped mid-request.
            let r = tokio::select! {
                r = conn.as_mut() => r,
                _ = stop.cancelled() => {
                    // Finish the request in flight, then close; an idle
                    // connection closes at once.
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = r {
                tracing::debug!(error = %e, %peer, "http connection ended with an error");
            }
        });
    }
    drop(listener);
    connections.close();
    if tokio::time::timeout(DEADLINE, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!("in-flight HTTP requests did not finish before the shutdown deadline");
    }
}

pub fn json<T: Serialize>(status: StatusCode, body: &T) -> Response<Body> {
    let bytes = serde_json::to_vec(body).expect("serialising a response value cannot fail");
    bytes_response(status, "application/json", Bytes::from(bytes))
}

pub fn bytes_response(
    status: StatusCode,
    content_type: &'static str,
    body: Bytes,
) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CACHE_CONTROL, "no-store")
        .body(full(body))
        .expect("static headers are valid")
}

/// `{"error":{"code":...,"message":...}}`, the writer's error shape. A 401
/// carries `WWW-Authenticate: Bearer` (RFC 6750; contract 1.1 sections 2.1
/// and 4.1), whichever role answers it.
pub fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response<Body> {
    let mut r = json(
        status,
        &serde_json::json!({"error": {"code": code, "message": message.into()}}),
    );
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
    }
    r
}

/// Count a request, upgrade or op refused by a token check
/// (`marketcast_auth_failures_total`, contract 1.1 section 7.4), in either
/// role. `reason`: `missing` (a required token is absent), `expired` or
/// `invalid` ([`crate::protocol::token::TokenError::reason`]), `forbidden`
/// (a valid token that does not grant the market).
pub fn count_auth_failure(reason: &'static str) {
    metrics::counter!("marketcast_auth_failures_total", "reason" => reason).increment(1);
}

pub fn metrics() -> Response<Body> {
    bytes_response(
        StatusCode::OK,
        "text/plain; version=0.0.4",
        Bytes::from(crate::metrics::render()),
    )
}
