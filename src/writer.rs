//! The writer role: the stateless HTTP write API of docs/PROTOCOL.md ("HTTP
//! write API").
//!
//! A request goes: route (by path, then method) -> the bearer check, its own
//! step -> body parsed and checked ([`crate::protocol::write_api`]: 400
//! shape, 422 values) before anything touches the database -> for a trade,
//! the [`batcher`] -> [`crate::db::write`]. The database has the last word
//! (unknown market 404, not open 409, duplicate client_order_id 200 with the
//! original trade), and this module alone turns its decisions into HTTP.

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

use crate::config::WriterConfig;
use crate::db::write::{WriteError, Written};
use crate::db::{self, DbError};
use crate::http::{self, Body};
use crate::protocol::trade::Trade;
use crate::protocol::write_api::{
    authorized, parse_json_object, parse_markets_query, parse_trades_query, route_path,
    validate_market_id, ApiError, NewMarket, NewTrade, Route,
};

mod batcher;

use batcher::{Batcher, Job};

/// Trade requests waiting for the batcher; when full, new ones get 503.
const QUEUE_CAPACITY: usize = 10_000;

/// Run the writer until `shutdown` is cancelled.
pub async fn run(
    listener: tokio::net::TcpListener,
    cfg: WriterConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    crate::metrics::install();
    let pool = db::pool(
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
    let state = Arc::new(Writer {
        db_health,
        pool,
        token: cfg.write_token.clone(),
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

struct Writer {
    /// The database probe /healthz answers from.
    db_health: db::health::Health,
    pool: Pool,
    token: Option<String>,
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
                self.list_markets(req.uri().query().unwrap_or("")).await
            }
            (Route::Markets, &Method::POST) => {
                self.authorize(&req)?;
                self.create_market(req).await
            }
            (Route::Market(id), &Method::GET) => self.get_market(id).await,
            (Route::Trades(id), &Method::GET) => {
                self.list_trades(id, req.uri().query().unwrap_or("")).await
            }
            (Route::Trades(id), &Method::POST) => {
                self.authorize(&req)?;
                self.post_trade(id, req).await
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
            Ok(()) => http::json(StatusCode::OK, &json!({"status": "ok"})),
            Err(e) => http::json(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({"status": "unavailable", "error": e}),
            ),
        }
    }

    /// The bearer token, when one is configured: the first step of every
    /// POST, before its body is read.
    fn authorize<B>(&self, req: &Request<B>) -> Result<(), ApiError> {
        match &self.token {
            Some(token) if !authorized(req.headers(), token) => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing or wrong bearer token",
            )),
            _ => Ok(()),
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

    /// One page of markets in id order; `next_after` names the last one
    /// when the page is full (ask again with `?after=` it for the rest), and
    /// is absent otherwise, so a v1 client sees the body it always saw.
    async fn list_markets(&self, query: &str) -> Result<Response<Body>, ApiError> {
        let (after, limit) = parse_markets_query(query)?;
        let markets = db::with_connection(&self.pool, self.timeout, async |c| {
            db::log::markets(c, after.as_deref(), limit).await
        })
        .await?;
        let full = markets.len() as i64 == limit;
        let next_after = markets.last().filter(|_| full).map(|m| m.market.clone());
        let mut body = json!({ "markets": markets });
        if let Some(after) = next_after {
            body["next_after"] = after.into();
        }
        Ok(http::json(StatusCode::OK, &body))
    }

    async fn get_market(&self, id: &str) -> Result<Response<Body>, ApiError> {
        let found = db::with_connection(&self.pool, self.timeout, async |c| {
            db::log::market(c, id).await
        });
        match found.await? {
            Some(m) => Ok(http::json(StatusCode::OK, &m)),
            None => Err(ApiError::unknown_market(id)),
        }
    }

    async fn create_market(&self, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
        let body = self.read_json(req).await?;
        let NewMarket { id, title } = NewMarket::parse(&body)?;
        let created = db::with_connection(&self.pool, self.timeout, async |c| {
            db::write::create_market(c, &id, &title).await
        });
        match created.await {
            Ok(m) => Ok(http::json(StatusCode::CREATED, &m)),
            Err(e) if e.code() == Some("23505") => Err(ApiError::new(
                StatusCode::CONFLICT,
                "market_exists",
                format!("market {id} already exists"),
            )),
            Err(e) => Err(e.into()),
        }
    }

    async fn list_trades(&self, id: &str, query: &str) -> Result<Response<Body>, ApiError> {
        let (after, limit) = parse_trades_query(query)?;
        let page = db::with_connection(&self.pool, self.timeout, async |c| {
            if db::log::market(c, id).await?.is_none() {
                return Ok(None);
            }
            db::log::trades_after(c, id, after, None, limit)
                .await
                .map(Some)
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
    ) -> Result<Response<Body>, ApiError> {
        let body = self.read_json(req).await?;
        validate_market_id(id)?;
        let trade = NewTrade::parse(id, &body)?;
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
