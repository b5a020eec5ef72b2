//! The broadcaster role: wires the LISTEN connection ([`listener`]), the
//! per-market state and fan-out ([`hub`]) and the WebSocket connections
//! ([`session`]) behind `GET /ws`, plus `/healthz` and `/metrics`. A trade
//! meets them in that order: doorbell -> listener -> hub (read from the log,
//! encoded once) -> every session following the market -> socket.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use bytes::Bytes;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backoff::Backoff;
use crate::config::BroadcasterConfig;
use crate::http::{self, Body};
use crate::protocol::client::initial_op;
use crate::protocol::handshake::{self, Refusal};
use crate::protocol::token::{bearer, Grant};
use crate::{db, shutdown};

pub mod hub;
pub mod listener;
mod reads;
pub(crate) mod registry;
pub(crate) mod replica;
pub mod session;

use session::SessionCtx;

/// Run a broadcaster on `tcp` until `shutdown` is cancelled.
pub async fn run(
    tcp: TcpListener,
    cfg: BroadcasterConfig,
    shutdown: CancellationToken,
) -> Result<()> {
    cfg.check()?;
    crate::metrics::install();
    // A transaction pooler is refused before anything else (its refusal of
    // the pool's startup options would otherwise look like an outage). An
    // unreachable database is no answer: the listener checks again before
    // each LISTEN.
    if let Ok(Err(pooled)) = listener::check_own_session(&cfg.db.url, cfg.db.timeout).await {
        return Err(pooled.into());
    }
    let pool = db::pool(
        &cfg.db.url,
        cfg.db.pool_size,
        cfg.db.timeout,
        "marketcast-broadcaster",
    )?;
    let shards = match &cfg.shards {
        Some(s) => s.clone(),
        None => {
            let Some(n) = stored_shard_count(&pool, cfg.db.timeout, &shutdown).await else {
                return Ok(());
            };
            (0..n).collect::<BTreeSet<u32>>()
        }
    };
    tracing::info!(shards = ?shards, "serving shards");

    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let internal = shutdown.child_token();
    let (hub, hub_task) = hub::spawn(
        cfg.hub.clone(),
        hub::Reads {
            // Its own small pool: a storm of clients catching up from the log
            // (say after a restart) must not starve the reads that publish
            // live trades.
            pool: db::pool(
                &cfg.db.url,
                cfg.hub_pool_size,
                cfg.db.timeout,
                "marketcast-hub",
            )?,
            page: cfg.replay_page,
            timeout: cfg.db.timeout,
        },
        events_rx,
        internal.clone(),
    );
    // Not a child of `shutdown`: the registry task cancels it after leaving
    // the registry (see `registry`), so sessions close only then.
    let stop = CancellationToken::new();
    let (hub_task, hub_alive) = crash_only(hub_task, internal.clone(), stop.clone());
    let db_health = db::health::spawn_probe(pool.clone(), internal.clone());
    let listen_up = Arc::new(AtomicBool::new(false));
    let listening = listener::run(
        cfg.listener.clone(),
        cfg.db.url.clone(),
        shards.iter().copied().collect(),
        events_tx,
        listen_up.clone(),
        internal.clone(),
    );
    let listener_task = tokio::spawn({
        let stop = stop.clone();
        async move {
            let r = listening.await;
            if r.is_err() {
                stop.cancel(); // a LISTEN it cannot trust: the broadcaster stops with `r`
            }
            r
        }
    });

    let health = session::Health {
        listen_up: listen_up.clone(),
        hub_alive: hub_alive.clone(),
        db: db_health.clone(),
    };
    // Refreshed twice per interval: `wrong_shard` reflects the registry as
    // it was at most one --registry-interval earlier, read time included.
    let directory = db::registry::Directory::spawn(
        pool.clone(),
        cfg.registry.interval / 2,
        cfg.db.timeout,
        internal.clone(),
    );
    let (registered, registry_task) = registry::spawn(
        registry::Registrar {
            cfg: cfg.registry.clone(),
            pool: pool.clone(),
            db_timeout: cfg.db.timeout,
            shards: shards.clone(),
            health: health.clone(),
            directory: directory.clone(),
        },
        shutdown.clone(),
        stop.clone(),
    );
    let replay = Arc::new(match &cfg.replica.url {
        Some(url) => replica::ReplayReads::with_replica(
            pool.clone(),
            cfg.db.timeout,
            url,
            cfg.db.pool_size,
            cfg.replica.wait,
        )?,
        None => replica::ReplayReads::primary(pool.clone(), cfg.db.timeout),
    });
    replay.spawn_check(internal.clone());
    let ctx = Arc::new(SessionCtx {
        cfg: cfg.session.clone(),
        replay_page: cfg.replay_page,
        db_timeout: cfg.db.timeout,
        shard_url_template: cfg.shard_url_template.clone(),
        directory,
        pool: pool.clone(),
        replay,
        hub,
        shards,
        connections: AtomicU64::new(0),
        limits: cfg.op_limits(),
        tokens: cfg.tokens.clone(),
        health,
    });
    let sessions = TaskTracker::new();
    let sockets = http::Sockets::default();
    let state = Arc::new(State {
        sockets: sockets.clone(),
        ctx,
        origins: Origins {
            allowed: cfg.allowed_origins.clone(),
            required: cfg.require_origin,
        },
        sessions: sessions.clone(),
        listen_up,
        hub_alive: hub_alive.clone(),
        db_health,
        shutdown: stop.clone(),
        next_conn: AtomicU64::new(1),
        reads: reads::PageReads::default(),
        registered,
    });
    http::serve(tcp, &cfg.http, sockets, stop.clone(), move |req, peer| {
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
    let hub_died = !hub_alive.load(Ordering::Acquire);
    internal.cancel();
    // Each ends on `internal`, the registry task once `stop` was cancelled;
    // a panic was already reported. The listener's own error is the refusal
    // to LISTEN through a transaction pooler.
    let (_, listened, _) = tokio::join!(hub_task, listener_task, registry_task);
    if let Ok(Err(pooled)) = listened {
        return Err(pooled.into());
    }
    if hub_died {
        anyhow::bail!("the hub task ended while the broadcaster was running (see the panic above); exiting so that a supervisor restarts it");
    }
    Ok(())
}

/// Crash-only: if the hub task ends while the server runs (a bug made it
/// panic), nothing is published any more. The flag it returns turns false
/// (/healthz answers 503 at once) and `stop` is cancelled, so the server
/// stops and `run` fails: the process exits non-zero for its supervisor to
/// restart, and clients resume with from_seq. The hub ending on `internal`
/// (shutdown) is no death.
fn crash_only(
    hub_task: tokio::task::JoinHandle<()>,
    internal: CancellationToken,
    stop: CancellationToken,
) -> (tokio::task::JoinHandle<()>, Arc<AtomicBool>) {
    let alive = Arc::new(AtomicBool::new(true));
    let flag = alive.clone();
    let watcher = tokio::spawn(async move {
        let ended = hub_task.await;
        if !internal.is_cancelled() {
            tracing::error!(
                panicked = ended.is_err(),
                "the hub task ended while the broadcaster was running"
            );
            flag.store(false, Ordering::Release);
            stop.cancel();
        }
    });
    (watcher, alive)
}

/// The shard count from the database, retried while Postgres is unreachable.
async fn stored_shard_count(
    pool: &deadpool_postgres::Pool,
    timeout: Duration,
    shutdown: &CancellationToken,
) -> Option<u32> {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        let read = db::with_connection(pool, timeout, async |c| db::admin::shard_count(c).await);
        // Cancel safety: dropping the read only abandons a connection attempt.
        let r = tokio::select! {
            r = read => r,
            _ = shutdown.cancelled() => return None,
        };
        match r {
            Ok(n) => return Some(n),
            Err(e) => tracing::warn!(error = %e, "cannot read the shard count yet; retrying"),
        }
        if !backoff.sleep(shutdown).await {
            return None;
        }
    }
}

struct State {
    ctx: Arc<SessionCtx>,
    /// Open sockets of this server: an upgraded one keeps its slot.
    sockets: http::Sockets,
    origins: Origins,
    sessions: TaskTracker,
    listen_up: Arc<AtomicBool>,
    /// False once the hub task has ended: nothing is published any more.
    hub_alive: Arc<AtomicBool>,
    db_health: db::health::Health,
    shutdown: CancellationToken,
    next_conn: AtomicU64,
    /// The trades route's shared log reads.
    reads: reads::PageReads,
    /// With --advertise-url: whether its registry entry is live.
    registered: Option<registry::Registered>,
}

impl State {
    async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        match req.uri().path() {
            "/ws" => self.upgrade(req, peer),
            "/healthz" => self.healthz().await,
            "/metrics" => http::metrics(),
            p if p.starts_with("/v1/") => self.read(req).await,
            p => http::error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no route for {p}"),
            ),
        }
    }

    /// From state the broadcaster keeps: no query per request.
    async fn healthz(&self) -> Response<Body> {
        let listen = self.listen_up.load(Ordering::Acquire);
        let hub = self.hub_alive.load(Ordering::Acquire);
        let db_ok = self.db_health.status().await.is_ok();
        let status = if listen && db_ok && hub {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        let mut body = json!({
            "status": if status == StatusCode::OK { "ok" } else { "unavailable" },
            "database": db_ok,
            "listen": listen,
            "hub": hub,
            "connections": self.ctx.connections.load(Ordering::Relaxed),
            "protocol": crate::protocol::client::PROTOCOL_VERSION,
        });
        if let Some(r) = &self.registered {
            body["registered"] = r.live().into();
        }
        // Only with --replay-database-url; never part of the status.
        if let Some(up) = self.ctx.replay.replica_up() {
            body["replica"] = up.into();
        }
        http::json(status, &body)
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
        if let Err(refusal) = self.origins.check(&req) {
            metrics::counter!("marketcast_ws_origin_refused_total").increment(1);
            tracing::debug!(%peer, reason = %refusal, "WebSocket upgrade refused: origin");
            return http::error(StatusCode::FORBIDDEN, "origin_not_allowed", refusal);
        }
        match handshake::check(&req) {
            Ok(()) => {}
            Err(Refusal::Version) => {
                let mut r = http::error(
                    StatusCode::UPGRADE_REQUIRED,
                    "upgrade_required",
                    "this server speaks WebSocket version 13",
                );
                r.headers_mut().insert(
                    hyper::header::SEC_WEBSOCKET_VERSION,
                    hyper::header::HeaderValue::from_static(handshake::WEBSOCKET_VERSION),
                );
                return r;
            }
            Err(Refusal::Malformed(why)) => {
                return http::error(StatusCode::BAD_REQUEST, "bad_request", why);
            }
        }
        let grant = match self.admit(&req) {
            Ok(grant) => grant,
            Err(refusal) => return refusal.response(),
        };
        // Boxed, like the grant: the session task keeps what it was started
        // with for its whole life, so an inline op would cost every idle
        // connection its size three times over (S3).
        let initial = initial_op(req.uri().query().unwrap_or(""), &self.ctx.limits).map(Box::new);
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
        // Taken before the HTTP connection lets go of the socket.
        let slot = self.sockets.hold();
        let conn_id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        // The 101 must reach the client before the upgrade resolves: await it
        // in the tracked session task, never here.
        // No tracing span around the session: entering one on every poll
        // cost ~1% of the fan-out CPU; log lines carry `conn` instead.
        let task = async move {
            let _slot = slot;
            match fut.await {
                Ok(ws) => {
                    session::run(ws.into_inner(), ctx, grant, initial, shutdown, conn_id).await
                }
                Err(e) => {
                    tracing::debug!(conn = conn_id, %peer, error = %e, "WebSocket upgrade failed")
                }
            }
        };
        self.sessions.spawn(task);
        resp.map(|_| http::full(Bytes::new()))
    }
}

/// A request refused before anything else happened: its status, code and
/// message, shaped into an answer by the route (a plain error before an
/// upgrade, one with CORS headers on the read routes).
pub(crate) struct Refused {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl Refused {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Refused {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn response(&self) -> Response<Body> {
        http::error(self.status, self.code, self.message.clone())
    }
}

impl State {
    /// Admission by token (docs/PROTOCOL.md, "Tokens"): the token from
    /// `Authorization: Bearer` or `?token=` (both: 400), checked now.
    /// Without token keys, tokens are ignored (v1). Ok(Some): the
    /// request is bound by that token.
    fn admit<B>(&self, req: &Request<B>) -> Result<Option<Box<Grant>>, Refused> {
        let tokens = &self.ctx.tokens;
        let Some(verifier) = &tokens.verifier else {
            return Ok(None);
        };
        let header = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| bearer(v.as_bytes()));
        let query = url::form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
            .find(|(k, _)| k == "token")
            .map(|(_, v)| v.into_owned());
        let token = match (header, query.as_deref()) {
            (Some(_), Some(_)) => {
                return Err(Refused::new(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "a token in both the Authorization header and ?token=; send one",
                ))
            }
            (Some(t), None) | (None, Some(t)) => t,
            (None, None) if tokens.require_token => {
                http::count_auth_failure("missing");
                return Err(Refused::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "this broadcaster needs a token: Authorization: Bearer or ?token=",
                ));
            }
            (None, None) => return Ok(None),
        };
        match verifier.verify(token, session::unix_now()) {
            Ok(grant) => Ok(Some(Box::new(grant))),
            Err(e) => {
                http::count_auth_failure(e.reason());
                Err(Refused::new(
                    StatusCode::UNAUTHORIZED,
                    "invalid_token",
                    e.to_string(),
                ))
            }
        }
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
struct Origins {
    /// `--allowed-origins`, normalised; None: any origin.
    allowed: Option<BTreeSet<String>>,
    /// `--require-origin`.
    required: bool,
}

impl Origins {
    fn check<B>(&self, req: &Request<B>) -> Result<(), String> {
        let Some(allowed) = &self.allowed else {
            return Ok(());
        };
        let Some(origin) = req.headers().get(hyper::header::ORIGIN) else {
            return match self.required {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_hub_that_dies_stops_the_server_and_one_that_is_stopped_does_not() {
        let (internal, stop) = (CancellationToken::new(), CancellationToken::new());
        let dying = tokio::spawn(async { panic!("a bug in the hub") });
        let (watcher, alive) = crash_only(dying, internal.clone(), stop.clone());
        watcher.await.unwrap();
        assert!(
            !alive.load(Ordering::Acquire),
            "/healthz must say the hub is gone"
        );
        assert!(stop.is_cancelled(), "the server must stop");

        let (internal, stop) = (CancellationToken::new(), CancellationToken::new());
        let hub = tokio::spawn({
            let internal = internal.clone();
            async move { internal.cancelled().await }
        });
        let (watcher, alive) = crash_only(hub, internal.clone(), stop.clone());
        internal.cancel();
        watcher.await.unwrap();
        assert!(
            alive.load(Ordering::Acquire) && !stop.is_cancelled(),
            "a shutdown is no death"
        );
    }
}
