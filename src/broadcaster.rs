//! The broadcaster role: wires the LISTEN connection, the hub and the
//! WebSocket sessions behind `GET /ws`, plus `/healthz` and `/metrics`.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::BroadcasterConfig;
use crate::http::{self, Body};
use crate::hub::{self, HubConfig};
use crate::listener::{self, ListenerConfig};
use crate::session::{self, ErrorReply, Op, SessionCtx};
use crate::{db, shutdown};

/// Run a broadcaster on `tcp` until `shutdown` is cancelled.
pub async fn run(
    tcp: TcpListener,
    cfg: BroadcasterConfig,
    shutdown: CancellationToken,
) -> Result<()> {
    cfg.check()?;
    crate::metrics::install();
    let pool = db::pool(&cfg.db, "marketcast-broadcaster")?;
    let shards = match &cfg.shards {
        Some(s) => s.clone(),
        None => {
            let Some(n) = stored_shard_count(&pool, &shutdown).await else {
                return Ok(());
            };
            (0..n).collect::<BTreeSet<u32>>()
        }
    };
    tracing::info!(shards = ?shards, "serving shards");

    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let internal = shutdown.child_token();
    let (hub, hub_task) = hub::spawn(
        HubConfig {
            ring_size: cfg.ring_size,
            live_queue: cfg.live_queue,
            page: cfg.replay_page,
            reconcile_interval: cfg.reconcile_interval,
            notify_queue_warn: cfg.notify_queue_warn,
        },
        // Its own small pool: a storm of clients catching up from the log
        // (say after a restart) must not starve the reads that publish live
        // trades.
        db::pool(
            &crate::config::DbConfig {
                pool_size: cfg.hub_pool_size,
                ..cfg.db.clone()
            },
            "marketcast-hub",
        )?,
        events_rx,
        internal.clone(),
    );
    let listen_up = Arc::new(AtomicBool::new(false));
    let listener_task = tokio::spawn(listener::run(
        ListenerConfig {
            url: cfg.db.url.clone(),
            shards: shards.iter().copied().collect(),
            heartbeat: cfg.listen_heartbeat,
            reconnect_max: cfg.reconnect_max,
        },
        events_tx,
        listen_up.clone(),
        internal.clone(),
    ));

    let ctx = Arc::new(SessionCtx {
        cfg: cfg.clone(),
        pool: pool.clone(),
        hub,
        shards,
        connections: AtomicU64::new(0),
    });
    let sessions = TaskTracker::new();
    let state = Arc::new(State {
        ctx,
        sessions: sessions.clone(),
        listen_up,
        shutdown: shutdown.clone(),
        next_conn: AtomicU64::new(1),
    });
    http::serve(tcp, shutdown.clone(), move |req, peer| {
        let state = state.clone();
        async move { state.handle(req, peer).await }
    })
    .await;
    // Sessions saw the same token and are closing with 1001.
    sessions.close();
    if tokio::time::timeout(shutdown::DEADLINE, sessions.wait())
        .await
        .is_err()
    {
        tracing::warn!("some WebSocket sessions did not close before the shutdown deadline");
    }
    internal.cancel();
    let _ = tokio::join!(hub_task, listener_task); // both end on `internal`; a panic was already reported
    Ok(())
}

/// The shard count from the database, retried while Postgres is unreachable.
async fn stored_shard_count(
    pool: &deadpool_postgres::Pool,
    shutdown: &CancellationToken,
) -> Option<u32> {
    let mut wait = Duration::from_millis(200);
    loop {
        let read = async {
            let c = pool.get().await?;
            db::shard_count(&**c).await
        };
        // Cancel safety: dropping the read only abandons a connection attempt.
        let r = tokio::select! {
            r = read => r,
            _ = shutdown.cancelled() => return None,
        };
        match r {
            Ok(n) => return Some(n),
            Err(e) => tracing::warn!(error = %e, "cannot read the shard count yet; retrying"),
        }
        // Cancel safety: sleep and cancelled are cancel-safe.
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => return None,
        }
        wait = (wait * 2).min(Duration::from_secs(5));
    }
}

struct State {
    ctx: Arc<SessionCtx>,
    sessions: TaskTracker,
    listen_up: Arc<AtomicBool>,
    shutdown: CancellationToken,
    next_conn: AtomicU64,
}

impl State {
    async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        match req.uri().path() {
            "/ws" => self.upgrade(req, peer),
            "/healthz" => self.healthz().await,
            "/metrics" => http::metrics(),
            p => http::error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no route for {p}"),
            ),
        }
    }

    async fn healthz(&self) -> Response<Body> {
        let listen = self.listen_up.load(Ordering::Acquire);
        let pool = &self.ctx.pool;
        let db_ok = tokio::time::timeout(Duration::from_secs(2), async {
            let c = pool.get().await?;
            c.simple_query("SELECT 1").await?;
            Ok::<_, db::DbError>(())
        })
        .await
        .is_ok_and(|r| r.is_ok());
        let status = if listen && db_ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        http::json(
            status,
            &json!({
                "status": if status == StatusCode::OK { "ok" } else { "unavailable" },
                "database": db_ok,
                "listen": listen,
                "connections": self.ctx.connections.load(Ordering::Relaxed),
            }),
        )
    }

    fn upgrade(&self, mut req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        if req.method() != hyper::Method::GET {
            return http::error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "GET /ws upgrades to a WebSocket",
            );
        }
        if !fastwebsockets::upgrade::is_upgrade_request(&req) {
            return http::error(
                StatusCode::UPGRADE_REQUIRED,
                "upgrade_required",
                "GET /ws must be a WebSocket upgrade",
            );
        }
        if let Err(refusal) = check_origin(&self.ctx.cfg, &req) {
            metrics::counter!("marketcast_ws_origin_refused_total").increment(1);
            tracing::debug!(%peer, reason = %refusal, "WebSocket upgrade refused: origin");
            return http::error(StatusCode::FORBIDDEN, "origin_not_allowed", refusal);
        }
        let initial = initial_op(req.uri().query().unwrap_or(""));
        let (resp, fut) = match fastwebsockets::upgrade::upgrade(&mut req) {
            Ok(x) => x,
            Err(e) => {
                return http::error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    format!("bad WebSocket handshake: {e}"),
                )
            }
        };
        let ctx = self.ctx.clone();
        let shutdown = self.shutdown.clone();
        let conn_id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        // The 101 must reach the client before the upgrade resolves: await it
        // in the tracked session task, never here.
        // No tracing span around the session: entering one on every poll
        // cost ~1% of the fan-out CPU; log lines carry `conn` instead.
        let task = async move {
            match fut.await {
                Ok(ws) => session::run(ws, ctx, initial, shutdown, conn_id).await,
                Err(e) => {
                    tracing::debug!(conn = conn_id, %peer, error = %e, "WebSocket upgrade failed")
                }
            }
        };
        self.sessions.spawn(task);
        resp.map(|_| Full::new(Bytes::new()))
    }
}

/// The `Origin` allowlist (`--allowed-origins`), checked before the upgrade
/// so a refused page gets a plain HTTP 403 with a reason it can show, and no
/// WebSocket is ever opened for it.
///
/// It stops *browsers* on other sites from using this feed (a page's script
/// cannot choose the `Origin` its browser sends). It authenticates nobody: a
/// non-browser client can send any `Origin` it likes, so the feed is public
/// to anyone who can reach the port whatever this says (docs/SECURITY.md).
/// That is also why a missing `Origin` (which no browser omits on a
/// WebSocket handshake) is accepted unless `--require-origin` says otherwise.
fn check_origin<B>(cfg: &BroadcasterConfig, req: &Request<B>) -> Result<(), String> {
    let Some(allowed) = &cfg.allowed_origins else {
        return Ok(());
    };
    let Some(origin) = req.headers().get(hyper::header::ORIGIN) else {
        return match cfg.require_origin {
            true => Err("an Origin header is required".to_string()),
            false => Ok(()),
        };
    };
    let shown = String::from_utf8_lossy(origin.as_bytes());
    let shown: String = shown.chars().take(200).collect();
    match origin
        .to_str()
        .ok()
        .and_then(crate::config::normalize_origin)
    {
        Some(o) if allowed.contains(&o) => Ok(()),
        _ => Err(format!("origin {shown:?} is not allowed")),
    }
}

/// `?market=ID&from_seq=N&epoch=E`: a subscribe made at connect time. None
/// without `market`; a bad `from_seq` is the error a `subscribe` op would get.
pub fn initial_op(query: &str) -> Option<Result<Op, ErrorReply>> {
    let mut market = None;
    let mut from_seq = None;
    let mut epoch = None;
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        match &*k {
            "market" => market = Some(v.into_owned()),
            "from_seq" => match v.parse::<i64>() {
                // As in `session::parse_op`: from_seq + 1 must not overflow.
                Ok(n) if (0..i64::MAX).contains(&n) => from_seq = Some(n),
                _ => {
                    return Some(Err(ErrorReply::new(
                        None,
                        "bad_request",
                        "from_seq must be an integer >= 0",
                    )))
                }
            },
            "epoch" => epoch = Some(v.into_owned()),
            _ => {}
        }
    }
    let market = market?;
    Some(Ok(Op::Subscribe {
        market,
        from_seq,
        epoch,
        id: None,
    }))
}
