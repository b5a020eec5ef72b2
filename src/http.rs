//! HTTP server plumbing shared by the writer and the broadcaster: the accept
//! loop on hyper-util's auto builder (HTTP/1.1 with upgrades, and h2), graceful
//! shutdown of in-flight requests, and small response helpers.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{header, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::shutdown::DEADLINE;

pub type Body = Full<Bytes>;

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

/// Serve `handler` on `listener` until `shutdown` is cancelled, then stop
/// accepting and give in-flight requests up to [`DEADLINE`]. Upgraded
/// (WebSocket) connections are not covered: hyper hands their IO over and
/// forgets them, so their owner tracks and closes them (see `shutdown.rs`).
pub async fn serve<F, Fut>(listener: TcpListener, shutdown: CancellationToken, handler: F)
where
    F: Fn(Request<Incoming>, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Without a timer, header_read_timeout does nothing (or panics).
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10));
    let graceful = GracefulShutdown::new();
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
            .serve_connection_with_upgrades(TokioIo::new(tcp), svc)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, %peer, "http connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(DEADLINE, graceful.shutdown())
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
        .body(Full::new(body))
        .expect("static headers are valid")
}

/// `{"error":{"code":...,"message":...}}`, the writer's error shape.
pub fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response<Body> {
    json(
        status,
        &serde_json::json!({"error": {"code": code, "message": message.into()}}),
    )
}

pub fn metrics() -> Response<Body> {
    bytes_response(
        StatusCode::OK,
        "text/plain; version=0.0.4",
        Bytes::from(crate::metrics::render()),
    )
}
