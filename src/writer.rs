//! The writer role: the stateless HTTP write API of docs/PROTOCOL.md ("HTTP
//! write API").
//!
//! A request goes: route (by path, then method) -> the bearer check, its own
//! step -> body parsed and checked ([`crate::protocol::write_api`]: 400
//! shape, 422 values) before anything touches the database -> for a trade,
//! the [`batcher`] -> [`crate::db::write`]. The database has the last word
//! (unknown market 404, not open 409, duplicate client_order_id 200 with the
//! original trade), and this module alone turns its decisions into HTTP.
//!
//! Tokens (contract 1.1 section 4.1) split the bearer check in two. Who is
//! asking is settled first, before the body is read ([`Writer::authenticate`]:
//! 401 `unauthorized` without a token where one is needed, 401
//! `invalid_token` for a token that does not verify); what a valid token
//! grants is checked once the request names its market, after the body's
//! 400 and 422 and before the database's 404 ([`Access::permits`]: 403
//! `forbidden`). The v1 write token grants every market, as before.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use deadpool_postgres::Pool;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::{header, Method, Request, Response, StatusCode};
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::config::{TokenConfig, WriterConfig};
use crate::db::registry::Directory;
use crate::db::write::{WriteError, Written};
use crate::db::{self, DbError};
use crate::http::{self, Body};
use crate::protocol::market::Market;
use crate::protocol::token::{bearer, Grant};
use crate::protocol::trade::Trade;
use crate::protocol::write_api::{
    authorized, parse_json_object, parse_markets_query, parse_trades_query, route_path,
    validate_market_id, ApiError, NewMarket, NewTrade, Route,
};

mod batcher;

use batcher::{Batcher, Job};

/// A market as the writer answers it (contract 1.1 section 4.2): its state
/// and `broadcasters`, the distinct URLs of the live registry entries (section
/// 5.1) serving its shard, `[]` when there are none.
fn market_object(m: &Market, registry: &Directory) -> Value {
    let mut v = serde_json::to_value(m).expect("a market serialises");
    v["broadcasters"] = registry.urls_for(m.shard).into();
    v
}

/// How often the writer re-reads the live registry entries.
const REGISTRY_REFRESH: Duration = Duration::from_millis(500);

/// The oldest registry snapshot a market object is built from; an older one
/// (the refresh is failing or slow) is read again first. The contract's bound
/// is 1 s; a snapshot's age counts from the start of its read.
const REGISTRY_MAX_AGE: Duration = Duration::from_millis(900);

/// Trade requests waiting for the batcher; when full, new ones get 503.
const QUEUE_CAPACITY: usize = 10_000;

/// Run the writer until `shutdown` is cancelled.
pub async fn run(
    listener: tokio::net::TcpListener,
    cfg: WriterConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    crate::metrics::install();
    cfg.tokens.check()?;
    // Every statement of the writer survives transaction pooling (PgBouncer
    // in transaction mode): see `db::write`'s module doc.
    let pool = db::transaction_pool(
        &cfg.db.url,
        cfg.db.pool_size,
        cfg.db.timeout,
        "marketcast-writer",
    )?;
    let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
    let batcher = Arc::new(Batcher {
        pool: pool.clone(),
        max: cfg.batch_max,
        linger: cfg.batch_linger,
        timeout: cfg.db.timeout,
    });
    // `batch_workers` batchers share the queue (default 1: see the option's
    // help for the measurement). Batches lock their markets in id order, so
    // concurrent ones never deadlock.
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let batch_task = tokio::spawn({
        let workers: Vec<_> = (0..cfg.batch_workers)
            .map(|_| tokio::spawn(batcher.clone().run(rx.clone())))
            .collect();
        async move {
            for w in workers {
                let _ = w.await; // a panic was already reported by the runtime
            }
        }
    });
    let db_health = db::health::spawn_probe(pool.clone(), shutdown.child_token());
    let registry = Directory::spawn(
        pool.clone(),
        REGISTRY_REFRESH,
        cfg.db.timeout,
        shutdown.child_token(),
    );
    let state = Arc::new(Writer {
        db_health,
        registry,
        pool,
        write_token: cfg.write_token.clone(),
        tokens: cfg.tokens.clone(),
        trades: tx,
        timeout: cfg.db.timeout,
        in_flight: Arc::new(tokio::sync::Semaphore::new(cfg.max_concurrent_requests)),
        max_body_bytes: cfg.max_body_bytes,
        body_timeout: cfg.body_timeout,
    });
    http::serve(
        listener,
        &cfg.http,
        http::Sockets::default(),
        shutdown,
        move |req, peer| {
            let state = state.clone();
            async move { state.handle(req, peer).await }
        },
    )
    .await;
    // The handler closures (and with them the queue's senders) are gone once
    // serve returns, so the batcher finishes what is queued and ends.
    if tokio::time::timeout(crate::shutdown::DEADLINE, batch_task)
        .await
        .is_err()
    {
        tracing::warn!("trade batcher did not drain before the shutdown deadline");
    }
    Ok(())
}

/// The contract version `/healthz` reports (contract 1.1 section 0).
const PROTOCOL_VERSION: &str = "1.1";

/// What a request asks for, which decides whether it needs a token and
/// which claim must grant its market.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    /// GETs: the token's `markets`.
    Read,
    /// POSTs: the token's `write`.
    Write,
}

/// What the request's credentials grant, once [`Writer::authenticate`] has
/// admitted it.
#[derive(Debug)]
enum Access {
    /// Every market: nothing is checked, the v1 write token was presented,
    /// or a read came without a token where none is required.
    Unbounded,
    /// A valid token: the markets its claims match.
    Token(Grant),
}

impl Access {
    /// 403 `forbidden` unless the claim `need` reads grants `market`.
    fn permits(&self, market: &str, need: Need) -> Result<(), ApiError> {
        let Access::Token(grant) = self else {
            return Ok(());
        };
        let (patterns, what) = match need {
            Need::Read => (&grant.markets, "reading"),
            Need::Write => (&grant.write, "writing"),
        };
        if patterns.matches(market) {
            return Ok(());
        }
        http::count_auth_failure("forbidden");
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("the token does not grant {what} market {market}"),
        ))
    }
}

/// The clock tokens are checked against: Unix seconds.
fn unix_now() -> i64 {
    let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    // Before 1970 only on a broken clock: every token then looks not yet valid.
    since_epoch.map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

struct Writer {
    /// The database probe /healthz answers from.
    db_health: db::health::Health,
    /// The live registry entries, for market objects' `broadcasters`.
    registry: Directory,
    pool: Pool,
    /// `--write-token`: grants every market (v1).
    write_token: Option<String>,
    /// Token keys and `--require-token` (contract 1.1 section 4.1).
    tokens: TokenConfig,
    /// Trade requests to the batcher. Bounded: when full the request is
    /// answered 503 at once rather than queued without limit.
    trades: mpsc::Sender<Job>,
    timeout: Duration,
    /// One permit per API request being handled (reading its body, waiting
    /// for the database or the batcher); `--max-concurrent-requests`. When
    /// none is left the request is answered 503 `overloaded` at once, so
    /// memory and queued work stay bounded whatever clients do. /healthz and
    /// /metrics take none: monitoring must still see an overloaded writer.
    in_flight: Arc<tokio::sync::Semaphore>,
    /// `--max-body-bytes`: 413 above it.
    max_body_bytes: usize,
    /// `--body-timeout`: a body not received within it is answered 408, so a
    /// client trickling its body cannot hold a request slot for ever.
    body_timeout: Duration,
}

fn respond(e: &ApiError) -> Response<Body> {
    http::error(e.status, e.code, e.message.clone())
}

/// The HTTP answer to a database decision about one trade.
fn written(w: Written) -> Result<(StatusCode, Trade), ApiError> {
    match w {
        Written::Created(t) => Ok((StatusCode::CREATED, t)),
        Written::Existing(t) => Ok((StatusCode::OK, t)),
        Written::UnknownMarket(id) => Err(ApiError::unknown_market(&id)),
        Written::NotOpen { market, status } => Err(ApiError::new(
            StatusCode::CONFLICT,
            "market_not_open",
            format!("market {market} is {status}, trades are accepted only while it is open"),
        )),
        Written::Conflict => Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            "client_order_id collided but the original trade is not visible; retry",
        )),
    }
}

/// The HTTP answer to a trade without a decision.
fn api_error(e: WriteError) -> ApiError {
    match e {
        WriteError::Db(e) => e.into(),
        WriteError::TimedOut(why) => ApiError::unavailable(why),
        WriteError::OutcomeUnknown(m) => {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "outcome_unknown", m)
        }
        WriteError::Internal(m) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", m),
    }
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::Unavailable(m) => ApiError::unavailable(m),
            DbError::NotMigrated => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "database is not migrated",
            ),
            DbError::Sql { code, message } => match code.as_str() {
                "P0002" => ApiError::new(StatusCode::NOT_FOUND, "unknown_market", message),
                "55000" => ApiError::new(StatusCode::CONFLICT, "market_not_open", message),
                "23514" | "22P02" | "22003" => ApiError::invalid(message),
                // program_limit_exceeded: for a trade insert (small, validated
                // rows) this is "too many notifications in the NOTIFY queue",
                // raised at COMMIT when some other LISTEN session has stopped
                // reading and the cluster-wide queue is full. The server
                // answered, so the transaction rolled back: nothing committed.
                "54000" => {
                    tracing::warn!(%code, %message, "a write failed on a database limit (a full NOTIFY queue?); see marketcast_notify_queue_usage");
                    ApiError::unavailable(message)
                }
                _ => {
                    tracing::error!(%code, %message, "unexpected database error");
                    ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "internal",
                        format!("database error {code}"),
                    )
                }
            },
        }
    }
}

impl Writer {
    async fn handle(&self, req: Request<Incoming>, _peer: SocketAddr) -> Response<Body> {
        let started = Instant::now();
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let route = route_path(&path);
        // By the exact path: `/healthz/` is routed to /healthz too, but as
        // an API request.
        let monitoring = matches!(path.as_str(), "/healthz" | "/metrics");
        // Held until the response is built; dropped with it.
        let permit = match monitoring {
            true => None,
            false => self.in_flight.clone().try_acquire_owned().ok(),
        };
        let (label, resp) = if !monitoring && permit.is_none() {
            let mut r = respond(&ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "too many requests in progress, nothing was committed; retry",
            ));
            r.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            ("overloaded", r)
        } else {
            let label = route.label(&method);
            let resp = match self.route(route, req).await {
                Ok(r) => r,
                Err(e) => respond(&e),
            };
            (label, resp)
        };
        drop(permit);
        let status = resp.status().as_u16().to_string();
        metrics::counter!("marketcast_writer_requests_total", "route" => label, "status" => status)
            .increment(1);
        metrics::histogram!("marketcast_writer_request_seconds", "route" => label)
            .record(started.elapsed().as_secs_f64());
        tracing::debug!(%method, %path, status = resp.status().as_u16(), elapsed_ms = started.elapsed().as_millis() as u64, "request");
        resp
    }

    async fn route(
        &self,
        route: Route<'_>,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, ApiError> {
        let method = req.method().clone();
        match (route, &method) {
            (Route::Healthz, _) => Ok(self.healthz().await),
            (Route::Metrics, _) => Ok(http::metrics()),
            (Route::Markets, &Method::GET) => {
                let access = self.authenticate(&req, Need::Read)?;
                self.list_markets(req.uri().query().unwrap_or(""), &access)
                    .await
            }
            (Route::Markets, &Method::POST) => {
                let access = self.authenticate(&req, Need::Write)?;
                self.create_market(req, &access).await
            }
            (Route::Market(id), &Method::GET) => {
                let access = self.authenticate(&req, Need::Read)?;
                self.get_market(id, &access).await
            }
            (Route::Trades(id), &Method::GET) => {
                let access = self.authenticate(&req, Need::Read)?;
                self.list_trades(id, req.uri().query().unwrap_or(""), &access)
                    .await
            }
            (Route::Trades(id), &Method::POST) => {
                let access = self.authenticate(&req, Need::Write)?;
                self.post_trade(id, req, &access).await
            }
            (Route::NotFound, _) => Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no route for {}", req.uri().path()),
            )),
            _ => Err(ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{method} is not allowed on {}", req.uri().path()),
            )),
        }
    }

    /// From the probe's last answer: no query per request.
    async fn healthz(&self) -> Response<Body> {
        match self.db_health.status().await {
            Ok(()) => http::json(
                StatusCode::OK,
                &json!({"status": "ok", "protocol": PROTOCOL_VERSION}),
            ),
            Err(e) => http::json(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({"status": "unavailable", "error": e, "protocol": PROTOCOL_VERSION}),
            ),
        }
    }

    /// Who is asking, from the `Authorization` header alone: the first step
    /// of every API request, before its body or query is read. The table of
    /// contract 1.1 section 4.1; each refusal is counted by its reason.
    fn authenticate<B>(&self, req: &Request<B>, need: Need) -> Result<Access, ApiError> {
        let headers = req.headers();
        let Some(verifier) = &self.tokens.verifier else {
            // v1: reads are open; writes need the write token when one is set.
            return match (&self.write_token, need) {
                (Some(token), Need::Write) if !authorized(headers, token) => {
                    let given = headers.contains_key(header::AUTHORIZATION);
                    http::count_auth_failure(if given { "invalid" } else { "missing" });
                    Err(ApiError::new(
                        StatusCode::UNAUTHORIZED,
                        "unauthorized",
                        "missing or wrong bearer token",
                    ))
                }
                _ => Ok(Access::Unbounded),
            };
        };
        if let Some(token) = &self.write_token {
            if authorized(headers, token) {
                return Ok(Access::Unbounded);
            }
        }
        // Another scheme (a proxy's Basic) is no token at all.
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| bearer(v.as_bytes()));
        let Some(token) = presented else {
            if need == Need::Write || self.tokens.require_token {
                http::count_auth_failure("missing");
                return Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "this request needs Authorization: Bearer <token>",
                ));
            }
            return Ok(Access::Unbounded);
        };
        match verifier.verify(token, unix_now()) {
            Ok(grant) => Ok(Access::Token(grant)),
            Err(e) => {
                http::count_auth_failure(e.reason());
                // The message names the rule broken, never the token.
                Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "invalid_token",
                    e.to_string(),
                ))
            }
        }
    }

    /// Read a JSON object body (Content-Type, size and time limits).
    async fn read_json(&self, req: Request<Incoming>) -> Result<Map<String, Value>, ApiError> {
        let ct = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let mime = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if mime != "application/json" {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "Content-Type must be application/json",
            ));
        }
        let max = self.max_body_bytes;
        let too_large = || {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("body over {max} bytes"),
            )
        };
        if let Some(len) = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok())
        {
            if len > max {
                return Err(too_large());
            }
        }
        let read = tokio::time::timeout(
            self.body_timeout,
            Limited::new(req.into_body(), max).collect(),
        );
        let Ok(read) = read.await else {
            return Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!(
                    "the body did not arrive within {}",
                    humantime::format_duration(self.body_timeout)
                ),
            ));
        };
        let body: Bytes = match read {
            Ok(c) => c.to_bytes(),
            Err(e)
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some() =>
            {
                return Err(too_large())
            }
            Err(e) => {
                return Err(ApiError::bad_request(format!(
                    "could not read the body: {e}"
                )))
            }
        };
        parse_json_object(&body)
    }

    /// One page of markets in id order; `next` (contract 1.1 section 4.3)
    /// names the last one when the page is full (ask again with `?after=` it
    /// for the rest) and is null otherwise; `next_after`, what this writer
    /// sent before 1.1, still names it on a full page.
    ///
    /// A token lists only the markets its `markets` claim matches: the
    /// database filters before it pages, so a page holds up to `limit`
    /// granted markets and `next_after` is always one of them (never the id
    /// of a market the token may not see).
    async fn list_markets(&self, query: &str, access: &Access) -> Result<Response<Body>, ApiError> {
        let (after, limit) = parse_markets_query(query)?;
        let markets = db::with_connection(&self.pool, self.timeout, async |c| match access {
            Access::Unbounded => db::log::markets(c, after.as_deref(), limit).await,
            Access::Token(grant) => {
                db::log::markets_matching(c, after.as_deref(), limit, &grant.markets).await
            }
        })
        .await?;
        let full = markets.len() as i64 == limit;
        let next_after = markets.last().filter(|_| full).map(|m| m.market.clone());
        let registry = self.registry().await?;
        let markets: Vec<Value> = markets.iter().map(|m| market_object(m, registry)).collect();
        let mut body = json!({ "markets": markets, "next": next_after });
        if let Some(after) = next_after {
            body["next_after"] = after.into();
        }
        Ok(http::json(StatusCode::OK, &body))
    }

    /// The registry as of at most [`REGISTRY_MAX_AGE`] earlier.
    async fn registry(&self) -> Result<&Directory, DbError> {
        if self.registry.age().is_none_or(|a| a > REGISTRY_MAX_AGE) {
            self.registry.refresh(&self.pool, self.timeout).await?;
        }
        Ok(&self.registry)
    }

    async fn get_market(&self, id: &str, access: &Access) -> Result<Response<Body>, ApiError> {
        access.permits(id, Need::Read)?;
        let found = db::with_connection(&self.pool, self.timeout, async |c| {
            db::log::market(c, id).await
        });
        match found.await? {
            Some(m) => Ok(http::json(
                StatusCode::OK,
                &market_object(&m, self.registry().await?),
            )),
            None => Err(ApiError::unknown_market(id)),
        }
    }

    async fn create_market(
        &self,
        req: Request<Incoming>,
        access: &Access,
    ) -> Result<Response<Body>, ApiError> {
        let body = self.read_json(req).await?;
        let NewMarket { id, title } = NewMarket::parse(&body)?;
        access.permits(&id, Need::Write)?;
        // Read before the INSERT: a registry read that fails must not turn a
        // committed market into a 503 (the retry would get 409).
        let before = self.registry().await?;
        let created = db::with_connection(&self.pool, self.timeout, async |c| {
            db::write::create_market(c, &id, &title).await
        });
        match created.await {
            Ok(m) => {
                // Fresh again if the INSERT took long; else the read above.
                let registry = self.registry().await.unwrap_or(before);
                Ok(http::json(
                    StatusCode::CREATED,
                    &market_object(&m, registry),
                ))
            }
            Err(e) if e.code() == Some("23505") => Err(ApiError::new(
                StatusCode::CONFLICT,
                "market_exists",
                format!("market {id} already exists"),
            )),
            Err(e) => Err(e.into()),
        }
    }

    async fn list_trades(
        &self,
        id: &str,
        query: &str,
        access: &Access,
    ) -> Result<Response<Body>, ApiError> {
        let (after, limit) = parse_trades_query(query)?;
        access.permits(id, Need::Read)?;
        let page = db::with_connection(&self.pool, self.timeout, async |c| {
            if db::log::market(c, id).await?.is_none() {
                return Ok(None);
            }
            db::log::trades_page(c, id, after, limit).await.map(Some)
        });
        let trades = page.await?.ok_or_else(|| ApiError::unknown_market(id))?;
        // Each trade is already its contract JSON; splice them rather than re-parse.
        let mut out = Vec::with_capacity(16 + trades.len() * 180);
        out.extend_from_slice(b"{\"trades\":[");
        for (i, t) in trades.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(&t.to_json());
        }
        out.extend_from_slice(b"]}");
        Ok(http::bytes_response(
            StatusCode::OK,
            "application/json",
            Bytes::from(out),
        ))
    }

    async fn post_trade(
        &self,
        id: &str,
        req: Request<Incoming>,
        access: &Access,
    ) -> Result<Response<Body>, ApiError> {
        let body = self.read_json(req).await?;
        validate_market_id(id)?;
        let trade = NewTrade::parse(id, &body)?;
        access.permits(id, Need::Write)?;
        let (tx, rx) = oneshot::channel();
        let job = Job {
            trade,
            enqueued: Instant::now(),
            reply: tx,
        };
        if self.trades.try_send(job).is_err() {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "too many trades queued, nothing was committed; retry",
            ));
        }
        // The batcher answers every job it takes within its own deadline; this
        // bound only guards against a bug leaving a request hanging.
        let (status, trade) = match tokio::time::timeout(self.timeout * 3, rx).await {
            Ok(Ok(decided)) => written(decided.map_err(api_error)?)?,
            _ => {
                return Err(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "outcome_unknown",
                    "the trade's outcome is unknown; retry with the same client_order_id",
                ))
            }
        };
        Ok(http::bytes_response(
            status,
            "application/json",
            Bytes::from(trade.to_json()),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_notify_queue_is_503_nothing_committed() {
        let e = ApiError::from(DbError::Sql {
            code: "54000".into(),
            message: "too many notifications in the NOTIFY queue".into(),
        });
        assert_eq!(
            (e.status, e.code),
            (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
        );
        assert!(e.message.contains("nothing was committed"), "{}", e.message);
    }
}
