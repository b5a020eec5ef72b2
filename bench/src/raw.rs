//! The raw baseline: the machine's ceiling for WebSocket fan-out. A minimal
//! server with no database (hyper + fastwebsockets upgrade, each trade
//! encoded once into a `Bytes` frame, `tokio::sync::broadcast`, one vectored
//! write of everything queued per connection), run as a child process
//! (`marketcast-bench --serve-raw`) like the broadcaster, and measured by the
//! same clients.
//!
//! Its control endpoints stand in for the database: `POST /markets` (one id
//! per line) creates markets, `POST /publish` (one market id per line)
//! publishes one synthetic trade per line stamped with the current time and
//! answers `seq ts_us` per line; `GET /healthz` answers `{"connections":N}`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::IoSlice;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::HOST;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;

use marketcast::protocol::frame::{control_frame, text_frame};

use crate::hist::unix_us;

/// The baseline's markets and its open connections.
#[derive(Default)]
struct RawHub {
    markets: RwLock<HashMap<String, Arc<RawMarket>>>,
    connections: AtomicU64,
}

struct RawMarket {
    id: String,
    /// Last seq published. Held while publishing and while subscribing, so a
    /// subscriber's head and its first live frame never overlap or leave a gap.
    seq: Mutex<i64>,
    /// Pre-encoded frames. Capacity 1024 (marketcast's live queue); a receiver
    /// that falls further behind is closed with 4000 (no history to refill from).
    tx: broadcast::Sender<Bytes>,
}

impl RawHub {
    fn add(&self, id: &str) {
        let m = Arc::new(RawMarket {
            id: id.to_string(),
            seq: Mutex::new(0),
            tx: broadcast::channel(1024).0,
        });
        self.markets
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string(), m);
    }

    fn get(&self, id: &str) -> Option<Arc<RawMarket>> {
        self.markets
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }
}

impl RawMarket {
    /// Publish one trade stamped now; returns its seq and ts (unix µs).
    fn publish(&self) -> (i64, i64) {
        let side = if fastrand::bool() { "yes" } else { "no" };
        let (ticks, qty) = (fastrand::u32(100..=9900), fastrand::i64(1..=100));
        let mut seq = self.seq.lock().unwrap_or_else(|p| p.into_inner());
        *seq += 1;
        let now = SystemTime::now();
        let json = format!(
            r#"{{"type":"trade","market":"{}","seq":{s},"trade_id":{s},"side":"{side}","price":"0.{ticks:04}","qty":{qty},"ts":"{}"}}"#,
            self.id,
            humantime::format_rfc3339_micros(now),
            s = *seq,
        );
        // An Err only means nobody is subscribed: nothing to deliver.
        let _ = self.tx.send(text_frame(json.as_bytes()));
        (*seq, unix_us(now))
    }

    fn subscribe(&self) -> (i64, broadcast::Receiver<Bytes>) {
        let seq = self.seq.lock().unwrap_or_else(|p| p.into_inner());
        (*seq, self.tx.subscribe())
    }
}

/// `marketcast-bench --serve-raw`: the baseline server's process. Two runtime
/// workers, like `marketcast broadcaster` on this 2-core machine.
pub fn serve_main() -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("raw-server")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("raw baseline: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let r: Result<()> = rt.block_on(async {
        let l = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        println!("listening on {}", l.local_addr()?);
        // Stops on SIGTERM from the bench, or Ctrl-C.
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = raw_serve(l, Arc::new(RawHub::default())) => {}
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        Ok(())
    });
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("raw baseline: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn raw_serve(listener: TcpListener, hub: Arc<RawHub>) {
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                tracing::warn!(error = %e, "raw baseline: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "raw baseline: set_nodelay failed");
        }
        let hub = hub.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let hub = hub.clone();
                async move { Ok::<_, Infallible>(route(req, hub).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .with_upgrades();
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "raw baseline: http connection error");
            }
        });
    }
}

fn respond(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r
}

async fn route(req: Request<Incoming>, hub: Arc<RawHub>) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/ws") => raw_upgrade(req, hub),
        (&Method::GET, "/healthz") => respond(
            StatusCode::OK,
            format!(
                r#"{{"connections":{}}}"#,
                hub.connections.load(Ordering::Relaxed)
            ),
        ),
        (&Method::POST, "/markets") | (&Method::POST, "/publish") => {
            let publish = req.uri().path() == "/publish";
            let body = match req.into_body().collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => return respond(StatusCode::BAD_REQUEST, "unreadable body"),
            };
            let text = String::from_utf8_lossy(&body);
            let mut out = String::new();
            for id in text.lines().filter(|l| !l.is_empty()) {
                if publish {
                    let Some(m) = hub.get(id) else {
                        return respond(StatusCode::NOT_FOUND, format!("unknown market {id}"));
                    };
                    let (seq, ts) = m.publish();
                    out.push_str(&format!("{seq} {ts}\n"));
                } else {
                    hub.add(id);
                }
            }
            respond(StatusCode::OK, out)
        }
        _ => respond(StatusCode::NOT_FOUND, "no such route"),
    }
}

fn raw_upgrade(mut req: Request<Incoming>, hub: Arc<RawHub>) -> Response<Full<Bytes>> {
    let market = url::form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
        .find(|(k, _)| k == "market")
        .and_then(|(_, v)| hub.get(&v));
    let Some(market) = market else {
        return respond(StatusCode::NOT_FOUND, "unknown market");
    };
    if !fastwebsockets::upgrade::is_upgrade_request(&req) {
        return respond(StatusCode::UPGRADE_REQUIRED, "websocket only");
    }
    let (resp, fut) = match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok(x) => x,
        Err(_) => return respond(StatusCode::BAD_REQUEST, "bad websocket handshake"),
    };
    tokio::spawn(async move {
        match fut.await {
            Ok(ws) => {
                hub.connections.fetch_add(1, Ordering::Relaxed);
                raw_session(ws.into_inner(), market).await;
                hub.connections.fetch_sub(1, Ordering::Relaxed);
            }
            Err(e) => tracing::debug!(error = %e, "raw baseline: upgrade failed"),
        }
    });
    resp.map(|_| Full::new(Bytes::new()))
}

/// Send `subscribed`, then every live frame, all queued frames in one
/// vectored write. Pings from the client are not answered and the server
/// sends none (no idle timeout), so the read half only watches for EOF.
async fn raw_session(io: TokioIo<hyper::upgrade::Upgraded>, market: Arc<RawMarket>) {
    let (head, mut rx) = market.subscribe();
    let (mut rd, mut wr) = tokio::io::split(io);
    let gone = tokio_util::sync::CancellationToken::new();
    let reader = tokio::spawn({
        let gone = gone.clone();
        async move {
            let mut buf = [0u8; 512];
            while let Ok(n) = rd.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
            gone.cancel();
        }
    });
    let hello = format!(
        r#"{{"type":"subscribed","market":"{}","epoch":"raw","head_seq":{head}}}"#,
        market.id
    );
    let mut batch = vec![text_frame(hello.as_bytes())];
    let mut lagged = false;
    loop {
        if !batch.is_empty() {
            let w =
                tokio::time::timeout(Duration::from_secs(10), write_all_vectored(&mut wr, &batch));
            if !matches!(w.await, Ok(Ok(()))) {
                break;
            }
            batch.clear();
        }
        if lagged {
            let close = control_frame(fastwebsockets::Frame::close(4000, b"slow consumer"));
            // Best effort: the connection ends either way.
            let _ = tokio::time::timeout(Duration::from_secs(1), wr.write_all(&close)).await;
            break;
        }
        // Cancel safety: recv() and cancelled() are cancel-safe.
        let first = tokio::select! {
            r = rx.recv() => r,
            _ = gone.cancelled() => break,
        };
        match first {
            Ok(f) => batch.push(f),
            Err(broadcast::error::RecvError::Lagged(_)) => lagged = true,
            Err(broadcast::error::RecvError::Closed) => break,
        }
        while batch.len() < 512 && !lagged {
            match rx.try_recv() {
                Ok(f) => batch.push(f),
                Err(broadcast::error::TryRecvError::Lagged(_)) => lagged = true,
                Err(_) => break,
            }
        }
    }
    reader.abort();
}

async fn write_all_vectored<W: AsyncWrite + Unpin>(
    w: &mut W,
    frames: &[Bytes],
) -> std::io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = frames.iter().map(|f| IoSlice::new(f)).collect();
    let mut bufs = &mut slices[..];
    while !bufs.is_empty() {
        let n = w.write_vectored(bufs).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut bufs, n);
    }
    Ok(())
}

// ------------------------------------------------------------------ control (bench side)

/// The bench's keep-alive connection to a raw server's control endpoints.
pub struct RawControl {
    addr: SocketAddr,
    sender: tokio::sync::Mutex<hyper::client::conn::http1::SendRequest<Full<Bytes>>>,
}

impl RawControl {
    pub async fn connect(addr: SocketAddr) -> Result<RawControl> {
        let tcp = TcpStream::connect(addr)
            .await
            .context("connecting to the raw server")?;
        tcp.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(async move {
            // Ends with the server or when the sender is dropped; failures
            // surface in send_request.
            let _ = conn.await;
        });
        Ok(RawControl {
            addr,
            sender: tokio::sync::Mutex::new(sender),
        })
    }

    async fn post(&self, path: &str, body: String) -> Result<String> {
        let req = Request::post(path)
            .header(HOST, self.addr.to_string())
            .body(Full::new(Bytes::from(body)))?;
        let mut s = self.sender.lock().await;
        s.ready()
            .await
            .context("the raw control connection closed")?;
        let resp = s.send_request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        let text = String::from_utf8_lossy(&body).into_owned();
        if status != StatusCode::OK {
            bail!("raw server {path}: {status} {text}");
        }
        Ok(text)
    }

    pub async fn add_markets(&self, ids: &[String]) -> Result<()> {
        self.post("/markets", ids.join("\n")).await.map(|_| ())
    }

    /// Publish one trade per id; returns (seq, ts_us) per trade, in order.
    pub async fn publish(&self, ids: &[&str]) -> Result<Vec<(i64, i64)>> {
        let text = self.post("/publish", ids.join("\n")).await?;
        text.lines()
            .map(|l| {
                let mut it = l.split(' ').map(str::parse::<i64>);
                match (it.next(), it.next()) {
                    (Some(Ok(s)), Some(Ok(t))) => Ok((s, t)),
                    _ => Err(anyhow!("raw server answered {l:?} to /publish")),
                }
            })
            .collect()
    }
}
