//! The writer role: the stateless HTTP write API of PROTOCOL.md section 3.
//!
//! Requests are validated here (400 shape, 422 values) before anything touches
//! the database; the database then has the last word (unknown market 404, not
//! open 409, duplicate client_order_id 200 with the original trade).
//!
//! Trades go through [`Batcher`]: every notifying commit takes Postgres's
//! cluster-wide NOTIFY lock through its WAL flush, so commits of concurrent
//! requests are grouped into one transaction. Each request still gets exactly
//! the outcome it would have had alone: markets are locked first (sorted by id,
//! so two batches never deadlock), trades into unknown or closed markets and
//! retried client_order_ids are answered without joining the INSERT, and if the
//! one multi-row INSERT still fails (a plain-SQL writer raced us) the batch is
//! redone one trade per transaction.

use std::collections::{BTreeSet, HashMap};
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
use crate::db::{self, DbError, MARKET_COLUMNS, TRADE_COLUMNS};
use crate::http::{self, Body};
use crate::trade::{Market, Trade};

/// Default largest accepted request body (PROTOCOL.md: 413 above 16 KiB);
/// `--max-body-bytes`.
pub const MAX_BODY_BYTES: usize = 16 * 1024;
/// Largest page of `GET /v1/markets/{id}/trades`.
pub const MAX_TRADES_PAGE: i64 = 1000;
/// Longest accepted client_order_id and trader, in bytes.
pub const MAX_ID_BYTES: usize = 128;
/// Longest accepted market title, in bytes.
pub const MAX_TITLE_BYTES: usize = 1024;
/// Extra time a COMMIT may take past the request deadline.
const COMMIT_GRACE: Duration = Duration::from_millis(500);
/// Trade requests waiting for the batcher; when full, new ones get 503.
const QUEUE_CAPACITY: usize = 10_000;

/// Run the writer until `shutdown` is cancelled.
pub async fn run(
    listener: tokio::net::TcpListener,
    cfg: WriterConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    crate::metrics::install();
    let pool = db::pool(&cfg.db, "marketcast-writer")?;
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
    let state = Arc::new(Writer {
        pool,
        token: cfg.write_token.clone(),
        trades: tx,
        timeout: cfg.db.timeout,
        in_flight: Arc::new(tokio::sync::Semaphore::new(cfg.max_concurrent_requests)),
        max_body_bytes: cfg.max_body_bytes,
        body_timeout: cfg.body_timeout,
    });
    http::serve(listener, shutdown, move |req, peer| {
        let state = state.clone();
        async move { state.handle(req, peer).await }
    })
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

/// A writer-side failure, answered as `{"error":{"code","message"}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
    fn bad_request(m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", m)
    }
    fn invalid(m: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", m)
    }
    fn unknown_market(id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "unknown_market",
            format!("no market named {id}"),
        )
    }
    fn unavailable(e: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!("database unavailable, nothing was committed: {e}"),
        )
    }
    fn response(&self) -> Response<Body> {
        http::error(self.status, self.code, self.message.clone())
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
            DbError::Sql { code, message, .. } => match code.as_str() {
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
        let monitoring = matches!(path.as_str(), "/healthz" | "/metrics");
        // Held until the response is built; dropped with it.
        let permit = match monitoring {
            true => None,
            false => self.in_flight.clone().try_acquire_owned().ok(),
        };
        let (route, resp) = if !monitoring && permit.is_none() {
            let mut r = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "too many requests in progress, nothing was committed; retry",
            )
            .response();
            r.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            ("overloaded", r)
        } else {
            match self.route(req).await {
                Ok((route, r)) => (route, r),
                Err((route, e)) => (route, e.response()),
            }
        };
        drop(permit);
        let status = resp.status().as_u16().to_string();
        metrics::counter!("marketcast_writer_requests_total", "route" => route, "status" => status)
            .increment(1);
        metrics::histogram!("marketcast_writer_request_seconds", "route" => route)
            .record(started.elapsed().as_secs_f64());
        tracing::debug!(%method, %path, status = resp.status().as_u16(), elapsed_ms = started.elapsed().as_millis() as u64, "request");
        resp
    }

    async fn route(
        &self,
        req: Request<Incoming>,
    ) -> Result<(&'static str, Response<Body>), (&'static str, ApiError)> {
        let path = req.uri().path().to_string();
        let method = req.method().clone();
        let not_allowed = |route| {
            Err((
                route,
                ApiError::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method_not_allowed",
                    format!("{method} is not allowed on {path}"),
                ),
            ))
        };
        match route_path(&path) {
            Route::Healthz => Ok(("healthz", self.healthz().await)),
            Route::Metrics => Ok(("metrics", http::metrics())),
            Route::Markets => match method {
                Method::GET => self
                    .list_markets()
                    .await
                    .map(|r| ("list_markets", r))
                    .map_err(|e| ("list_markets", e)),
                Method::POST => self
                    .create_market(req)
                    .await
                    .map(|r| ("create_market", r))
                    .map_err(|e| ("create_market", e)),
                _ => not_allowed("markets"),
            },
            Route::Market(id) => match method {
                Method::GET => self
                    .get_market(id)
                    .await
                    .map(|r| ("get_market", r))
                    .map_err(|e| ("get_market", e)),
                _ => not_allowed("market"),
            },
            Route::Trades(id) => match method {
                Method::GET => {
                    let q = req.uri().query().unwrap_or("").to_string();
                    self.list_trades(id, &q)
                        .await
                        .map(|r| ("list_trades", r))
                        .map_err(|e| ("list_trades", e))
                }
                Method::POST => {
                    let id = id.to_string();
                    self.post_trade(&id, req)
                        .await
                        .map(|r| ("post_trade", r))
                        .map_err(|e| ("post_trade", e))
                }
                _ => not_allowed("trades"),
            },
            Route::NotFound => Err((
                "not_found",
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    format!("no route for {path}"),
                ),
            )),
        }
    }

    async fn healthz(&self) -> Response<Body> {
        let probe = async {
            let c = self.pool.get().await?;
            c.simple_query("SELECT 1").await?;
            Ok::<_, DbError>(())
        };
        match tokio::time::timeout(self.timeout, probe).await {
            Ok(Ok(())) => http::json(StatusCode::OK, &json!({"status": "ok"})),
            Ok(Err(e)) => http::json(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({"status": "unavailable", "error": e.to_string()}),
            ),
            Err(_) => http::json(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({"status": "unavailable", "error": "timed out"}),
            ),
        }
    }

    /// Check the bearer token (when configured) and read a JSON object body.
    async fn read_json(&self, req: Request<Incoming>) -> Result<Map<String, Value>, ApiError> {
        if let Some(token) = &self.token {
            if !authorized(req.headers(), token) {
                return Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "missing or wrong bearer token",
                ));
            }
        }
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

    async fn list_markets(&self) -> Result<Response<Body>, ApiError> {
        let work = async {
            let c = self.pool.get().await?;
            let rows = c
                .query(
                    &format!("SELECT {MARKET_COLUMNS} FROM markets ORDER BY id"),
                    &[],
                )
                .await?;
            Ok::<_, DbError>(rows.iter().map(Market::from_row).collect::<Vec<_>>())
        };
        let markets = db::bounded(self.timeout, work).await?;
        Ok(http::json(StatusCode::OK, &json!({ "markets": markets })))
    }

    async fn get_market(&self, id: &str) -> Result<Response<Body>, ApiError> {
        let work = async {
            let c = self.pool.get().await?;
            db::market(&**c, id).await
        };
        match db::bounded(self.timeout, work).await? {
            Some(m) => Ok(http::json(StatusCode::OK, &m)),
            None => Err(ApiError::unknown_market(id)),
        }
    }

    async fn create_market(&self, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
        let body = self.read_json(req).await?;
        let NewMarket { id, title } = NewMarket::parse(&body)?;
        let work = async {
            let c = self.pool.get().await?;
            let sql = format!(
                "INSERT INTO markets (id, title) VALUES ($1, $2) RETURNING {MARKET_COLUMNS}"
            );
            match c.query_one(&sql, &[&id, &title]).await {
                Ok(r) => Ok(Market::from_row(&r)),
                Err(e) => Err(DbError::from(e)),
            }
        };
        match db::bounded(self.timeout, work).await {
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
        let work = async {
            let c = self.pool.get().await?;
            if db::market(&**c, id).await?.is_none() {
                return Ok(None);
            }
            db::trades_after(&c, id, after, None, limit).await.map(Some)
        };
        let trades = db::bounded(self.timeout, work)
            .await?
            .ok_or_else(|| ApiError::unknown_market(id))?;
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
        let outcome = match tokio::time::timeout(self.timeout * 3, rx).await {
            Ok(Ok(o)) => o,
            _ => Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "outcome_unknown",
                "the trade's outcome is unknown; retry with the same client_order_id",
            )),
        };
        let (status, trade) = outcome?;
        Ok(http::bytes_response(
            status,
            "application/json",
            Bytes::from(trade.to_json()),
        ))
    }
}

/// Whether the bearer token `given` is the configured `token`, in time that
/// does not depend on where the two first differ (subtle's `ct_eq`, which
/// the optimiser cannot turn back into an early exit), so a client cannot
/// guess the token byte by byte from response times. The *length* does leak:
/// `ct_eq` answers unequal lengths at once. That is accepted (docs/SECURITY.md):
/// a token's length is no secret worth protecting, and a random token of 32
/// or more characters is out of reach of guessing whatever its length.
fn token_matches(given: &[u8], token: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    bool::from(given.ct_eq(token))
}

/// The writer's routes, from the request path alone (the method is checked
/// per route). `{id}` is the raw segment: validated where it is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route<'a> {
    Healthz,
    Metrics,
    /// `/v1/markets`
    Markets,
    /// `/v1/markets/{id}`
    Market(&'a str),
    /// `/v1/markets/{id}/trades`
    Trades(&'a str),
    NotFound,
}

/// Route a request path; one trailing slash or more is ignored.
pub fn route_path(path: &str) -> Route<'_> {
    let segs: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    match segs.as_slice() {
        ["healthz"] => Route::Healthz,
        ["metrics"] => Route::Metrics,
        ["v1", "markets"] => Route::Markets,
        ["v1", "markets", id] => Route::Market(id),
        ["v1", "markets", id, "trades"] => Route::Trades(id),
        _ => Route::NotFound,
    }
}

/// Whether the request carries `Authorization: Bearer <token>`.
pub fn authorized(headers: &header::HeaderMap, token: &str) -> bool {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    given.is_some_and(|g| token_matches(g.as_bytes(), token.as_bytes()))
}

/// A request body: one JSON object, else 400.
pub fn parse_json_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::bad_request("body must be a JSON object")),
        Err(e) => Err(ApiError::bad_request(format!("malformed JSON: {e}"))),
    }
}

/// `?after_seq=N&limit=M` of `GET /v1/markets/{id}/trades`: (after, limit).
/// Unknown keys are ignored; after_seq or limit not an integer is 400, out
/// of range 422.
pub fn parse_trades_query(query: &str) -> Result<(i64, i64), ApiError> {
    let mut after: i64 = 0;
    let mut limit: i64 = 100;
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        if k != "after_seq" && k != "limit" {
            continue; // say a cache buster: not ours to judge
        }
        let n: i64 = v
            .parse()
            .map_err(|_| ApiError::bad_request(format!("{k} must be an integer")))?;
        match &*k {
            "after_seq" if n >= 0 => after = n,
            "after_seq" => return Err(ApiError::invalid("after_seq must be >= 0")),
            "limit" if (1..=MAX_TRADES_PAGE).contains(&n) => limit = n,
            "limit" => {
                return Err(ApiError::invalid(format!(
                    "limit must be between 1 and {MAX_TRADES_PAGE}"
                )))
            }
            _ => {}
        }
    }
    Ok((after, limit))
}

/// A validated `POST /v1/markets` body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMarket {
    pub id: String,
    /// Empty when absent or null.
    pub title: String,
}

impl NewMarket {
    /// Types are checked first (400), then values (422).
    pub fn parse(body: &Map<String, Value>) -> Result<NewMarket, ApiError> {
        let id = match body.get("id") {
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err(ApiError::bad_request("id must be a string")),
            None => return Err(ApiError::bad_request("missing field id")),
        };
        let title = match body.get("title") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err(ApiError::bad_request("title must be a string")),
        };
        validate_market_id(&id)?;
        if title.len() > MAX_TITLE_BYTES {
            return Err(ApiError::invalid(format!(
                "title is over {MAX_TITLE_BYTES} bytes"
            )));
        }
        // Valid JSON ("\u0000"), but Postgres text cannot hold NUL: left to the
        // database it is a 22021 error, answered 500 instead of 422.
        if title.contains('\0') {
            return Err(ApiError::invalid("title must not contain NUL"));
        }
        Ok(NewMarket { id, title })
    }
}

pub fn validate_market_id(id: &str) -> Result<(), ApiError> {
    if crate::trade::is_market_id(id) {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "market id {id:?} must match ^[A-Za-z0-9][A-Za-z0-9_.:-]{{0,63}}$"
        )))
    }
}

/// A validated trade request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewTrade {
    pub market: String,
    pub side: &'static str,
    /// Four-place decimal text, e.g. "0.6300".
    pub price: String,
    pub qty: i64,
    pub trader: Option<String>,
    pub client_order_id: Option<String>,
}

impl NewTrade {
    /// Types are checked first (400), then values (422).
    pub fn parse(market: &str, body: &Map<String, Value>) -> Result<NewTrade, ApiError> {
        let side = match body.get("side") {
            Some(Value::String(s)) => s.as_str(),
            Some(_) => return Err(ApiError::bad_request("side must be a string")),
            None => return Err(ApiError::bad_request("missing field side")),
        };
        let price_text = match body.get("price") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            Some(_) => {
                return Err(ApiError::bad_request(
                    "price must be a decimal string such as \"0.63\"",
                ))
            }
            None => return Err(ApiError::bad_request("missing field price")),
        };
        let qty = match body.get("qty") {
            Some(Value::Number(n)) if n.is_i64() || n.is_u64() => n.as_i64(),
            Some(_) => return Err(ApiError::bad_request("qty must be an integer")),
            None => return Err(ApiError::bad_request("missing field qty")),
        };
        let opt_string = |k: &str| match body.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(ApiError::bad_request(format!("{k} must be a string"))),
        };
        let client_order_id = opt_string("client_order_id")?;
        let trader = opt_string("trader")?;

        let side = match side {
            "yes" => "yes",
            "no" => "no",
            other => {
                return Err(ApiError::invalid(format!(
                    "side must be \"yes\" or \"no\", not {other:?}"
                )))
            }
        };
        let price = normalize_price(&price_text)?;
        let qty = match qty {
            Some(q) if (1..=1_000_000_000).contains(&q) => q,
            _ => return Err(ApiError::invalid("qty must be between 1 and 1000000000")),
        };
        for (k, v) in [("client_order_id", &client_order_id), ("trader", &trader)] {
            if let Some(v) = v {
                if v.is_empty() || v.len() > MAX_ID_BYTES {
                    return Err(ApiError::invalid(format!(
                        "{k} must be 1 to {MAX_ID_BYTES} bytes"
                    )));
                }
                // Postgres text cannot hold NUL: refused here it is a 422 for
                // this request alone, instead of a 22021 that fails the whole
                // batch and then answers this request 500.
                if v.contains('\0') {
                    return Err(ApiError::invalid(format!("{k} must not contain NUL")));
                }
            }
        }
        Ok(NewTrade {
            market: market.to_string(),
            side,
            price,
            qty,
            trader,
            client_order_id,
        })
    }
}

/// "0.63" -> "0.6300". Exactly representable prices only: more than four
/// decimal places is refused rather than rounded.
pub fn normalize_price(s: &str) -> Result<String, ApiError> {
    let bad = || {
        ApiError::invalid(format!(
            "price {s:?} must be a decimal between 0.0001 and 0.9999 with at most 4 places"
        ))
    };
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if int.is_empty() && frac.is_empty() {
        return Err(bad());
    }
    if !int.bytes().all(|c| c == b'0')
        || frac.len() > 4
        || !frac.bytes().all(|c| c.is_ascii_digit())
    {
        return Err(bad());
    }
    let ticks: u32 = format!("{frac:0<4}").parse().map_err(|_| bad())?;
    if ticks == 0 {
        return Err(bad());
    }
    Ok(format!("0.{ticks:04}"))
}

type Outcome = Result<(StatusCode, Trade), ApiError>;

struct Job {
    trade: NewTrade,
    enqueued: Instant,
    /// The request's answer. Dropped unanswered only if the handler already
    /// gave up, which its own timeout reports.
    reply: oneshot::Sender<Outcome>,
}

/// Groups concurrent trade requests into one transaction (see the module doc).
struct Batcher {
    pool: Pool,
    max: usize,
    linger: Duration,
    /// A request older than this when its batch starts is answered 503
    /// without touching the database (PROTOCOL.md: 503 within 5 s).
    timeout: Duration,
}

impl Batcher {
    async fn run(self: Arc<Self>, queue: Arc<tokio::sync::Mutex<mpsc::Receiver<Job>>>) {
        let mut batch = Vec::with_capacity(self.max);
        loop {
            // Hold the queue only while taking a batch, never while processing it.
            let mut rx = queue.lock().await;
            let Some(first) = rx.recv().await else { return };
            batch.push(first);
            if !self.linger.is_zero() && self.max > 1 {
                let until = tokio::time::Instant::now() + self.linger;
                while batch.len() < self.max {
                    match tokio::time::timeout_at(until, rx.recv()).await {
                        Ok(Some(j)) => batch.push(j),
                        _ => break,
                    }
                }
            }
            while batch.len() < self.max {
                match rx.try_recv() {
                    Ok(j) => batch.push(j),
                    Err(_) => break,
                }
            }
            drop(rx);
            self.process(std::mem::take(&mut batch)).await;
        }
    }

    async fn process(&self, jobs: Vec<Job>) {
        let budget = self.timeout.saturating_sub(Duration::from_millis(250));
        let (mut live, expired): (Vec<Job>, Vec<Job>) = jobs
            .into_iter()
            .partition(|j| j.enqueued.elapsed() < budget);
        for j in expired {
            let _ = j.reply.send(Err(ApiError::unavailable(
                "timed out waiting for the database",
            ))); // The handler may have gone; nothing else to tell.
        }
        if live.is_empty() {
            return;
        }
        metrics::histogram!("marketcast_writer_batch_size").record(live.len() as f64);
        // Everything before COMMIT is bounded by the oldest request's deadline;
        // past it the statement is cancelled and the transaction rolls back.
        let deadline = live.iter().map(|j| j.enqueued).min().expect("non-empty") + budget;
        let trades: Vec<NewTrade> = live.iter().map(|j| j.trade.clone()).collect();
        let outcomes = if trades.len() == 1 {
            self.one(&trades[0], deadline).await
        } else {
            match self.many(&trades, deadline).await {
                Ok(o) => o,
                Err(
                    e @ ApiError {
                        status: StatusCode::SERVICE_UNAVAILABLE,
                        ..
                    },
                ) => trades.iter().map(|_| Err(e.clone())).collect(),
                // The connection died during COMMIT: the batch may well have
                // committed, so redoing it one by one could commit every trade
                // without a client_order_id twice. Tell each request the truth.
                Err(e) if e.code == "outcome_unknown" => {
                    trades.iter().map(|_| Err(e.clone())).collect()
                }
                Err(e) => {
                    tracing::info!(error = %e.message, n = trades.len(), "batch insert failed, retrying one trade per transaction");
                    let mut out = Vec::with_capacity(trades.len());
                    for t in &trades {
                        out.extend(self.one(t, deadline).await);
                    }
                    out
                }
            }
        };
        for (j, o) in live.drain(..).zip(outcomes) {
            let _ = j.reply.send(o); // The handler may have gone; the outcome stands either way.
        }
    }

    /// One trade in its own transaction: the reference behaviour the batch
    /// path must match, and the fallback when a batch fails as a whole.
    async fn one(&self, t: &NewTrade, deadline: Instant) -> Vec<Outcome> {
        let mut c = match self.connection(deadline).await {
            Ok(c) => c,
            Err(e) => return vec![Err(e)],
        };
        let cancel = c.cancel_token();
        let work = async {
            let tx = c.transaction().await?;
            let sql = format!(
                "INSERT INTO trades (market_id, side, price, qty, trader, client_order_id) \
                 VALUES ($1, $2, $3::text::numeric, $4, $5, $6) RETURNING {TRADE_COLUMNS}"
            );
            let res = tx
                .query_one(
                    &sql,
                    &[
                        &t.market,
                        &t.side,
                        &t.price,
                        &t.qty,
                        &t.trader,
                        &t.client_order_id,
                    ],
                )
                .await
                .map_err(DbError::from);
            Ok::<_, DbError>((tx, res.map(|row| Trade::from_row(&row))))
        };
        let timed = tokio::time::timeout_at(deadline.into(), work).await;
        let (tx, res) = match timed {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => return vec![Err(ApiError::from(e))],
            Err(_) => {
                cancel_in_background(cancel);
                return vec![Err(ApiError::unavailable("timed out"))];
            }
        };
        match res {
            Ok(trade) => match bounded_commit(tx, deadline).await {
                Ok(()) => vec![Ok((StatusCode::CREATED, trade))],
                Err(e) => vec![Err(e)],
            },
            Err(e) if e.code() == Some("23505") => {
                drop(tx); // rolls back
                vec![self.existing(t, deadline).await]
            }
            Err(e) => vec![Err(e.into())],
        }
    }

    async fn connection(&self, deadline: Instant) -> Result<deadpool_postgres::Object, ApiError> {
        match tokio::time::timeout_at(deadline.into(), self.pool.get()).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(DbError::from(e).into()),
            Err(_) => Err(ApiError::unavailable("timed out waiting for a connection")),
        }
    }

    /// The original trade of a retried client_order_id.
    async fn existing(&self, t: &NewTrade, deadline: Instant) -> Outcome {
        let work = async {
            let c = self.pool.get().await?;
            let sql = format!(
                "SELECT {TRADE_COLUMNS} FROM trades WHERE market_id = $1 AND client_order_id = $2"
            );
            Ok::<_, DbError>(c.query_opt(&sql, &[&t.market, &t.client_order_id]).await?)
        };
        // A read: timing out here commits nothing, so 503 stays truthful.
        match tokio::time::timeout_at(deadline.into(), work)
            .await
            .map_err(DbError::from)?
        {
            Ok(Some(row)) => Ok((StatusCode::OK, Trade::from_row(&row))),
            Ok(None) => Err(ApiError::new(
                StatusCode::CONFLICT,
                "conflict",
                "client_order_id collided but the original trade is not visible; retry",
            )),
            Err(e) => Err(e.into()),
        }
    }

    /// Many trades, one transaction, one INSERT. Returns Err only when the
    /// whole batch failed and nothing committed.
    async fn many(&self, trades: &[NewTrade], deadline: Instant) -> Result<Vec<Outcome>, ApiError> {
        let mut outcomes: Vec<Option<Outcome>> = vec![None; trades.len()];
        let mut c = self.connection(deadline).await?;
        let cancel = c.cancel_token();
        let work = async {
            let tx = c.transaction().await?;
            // Lock every market row in id order first: the trigger's UPDATEs
            // then never wait, and two batches can never deadlock. Through the
            // SECURITY DEFINER function, because a plain SELECT ... FOR UPDATE
            // needs UPDATE privilege, which marketcast_writer does not have.
            let ids: Vec<&str> = trades
                .iter()
                .map(|t| t.market.as_str())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            let rows = tx
                .query(
                    "SELECT id, status FROM marketcast_lock_markets($1)",
                    &[&ids],
                )
                .await?;
            let status: HashMap<String, String> =
                rows.iter().map(|r| (r.get(0), r.get(1))).collect();
            // Retried client_order_ids, read after the locks so that a retry
            // racing its original sees it committed.
            let coids: Vec<(&str, &str)> = trades
                .iter()
                .filter_map(|t| t.client_order_id.as_deref().map(|c| (t.market.as_str(), c)))
                .collect();
            let mut existing: HashMap<(String, String), Trade> = HashMap::new();
            if !coids.is_empty() {
                let (m, c): (Vec<&str>, Vec<&str>) = coids.into_iter().unzip();
                let sql = format!(
                    "SELECT {TRADE_COLUMNS}, client_order_id FROM trades \
                     WHERE (market_id, client_order_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))"
                );
                for r in tx.query(&sql, &[&m, &c]).await? {
                    existing.insert((r.get(1), r.get(7)), Trade::from_row(&r));
                }
            }
            // Decide each trade's fate; `insert` keeps (index, trade) in arrival order.
            let mut insert: Vec<usize> = Vec::new();
            let mut first_of: HashMap<(String, String), usize> = HashMap::new();
            let mut dup_of: Vec<(usize, usize)> = Vec::new();
            for (i, t) in trades.iter().enumerate() {
                match status.get(&t.market).map(String::as_str) {
                    None => outcomes[i] = Some(Err(ApiError::unknown_market(&t.market))),
                    Some("open") => {}
                    Some(s) => {
                        outcomes[i] = Some(Err(ApiError::new(
                            StatusCode::CONFLICT,
                            "market_not_open",
                            format!(
                                "market {} is {s}, trades are accepted only while it is open",
                                t.market
                            ),
                        )))
                    }
                }
                if outcomes[i].is_some() {
                    continue;
                }
                if let Some(coid) = &t.client_order_id {
                    let key = (t.market.clone(), coid.clone());
                    if let Some(orig) = existing.get(&key) {
                        outcomes[i] = Some(Ok((StatusCode::OK, orig.clone())));
                        continue;
                    }
                    if let Some(&first) = first_of.get(&key) {
                        dup_of.push((i, first));
                        continue;
                    }
                    first_of.insert(key, i);
                }
                insert.push(i);
            }
            // Market-sorted, arrival order within a market: the trigger then
            // assigns each market's seqs in arrival order.
            insert.sort_by(|&a, &b| trades[a].market.cmp(&trades[b].market).then(a.cmp(&b)));
            if !insert.is_empty() {
                let col = |f: &dyn Fn(&NewTrade) -> Option<String>| {
                    insert.iter().map(|&i| f(&trades[i])).collect::<Vec<_>>()
                };
                let markets = col(&|t| Some(t.market.clone()));
                let sides = col(&|t| Some(t.side.to_string()));
                let prices = col(&|t| Some(t.price.clone()));
                let qtys: Vec<i64> = insert.iter().map(|&i| trades[i].qty).collect();
                let traders = col(&|t| t.trader.clone());
                let coids = col(&|t| t.client_order_id.clone());
                let sql = format!(
                    "INSERT INTO trades (market_id, side, price, qty, trader, client_order_id) \
                     SELECT m, s, p::numeric, q, tr, c FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[], $6::text[]) \
                     WITH ORDINALITY AS u(m, s, p, q, tr, c, n) ORDER BY n RETURNING {TRADE_COLUMNS}"
                );
                let rows = tx
                    .query(&sql, &[&markets, &sides, &prices, &qtys, &traders, &coids])
                    .await?;
                let mut inserted: Vec<Trade> = rows.iter().map(Trade::from_row).collect();
                // Match rows to requests by (market, seq): within a market seq
                // follows insertion order, whatever order RETURNING uses.
                inserted.sort_by(|a, b| a.market.cmp(&b.market).then(a.seq.cmp(&b.seq)));
                if inserted.len() != insert.len()
                    || inserted
                        .iter()
                        .zip(&insert)
                        .any(|(r, &i)| r.market != trades[i].market)
                {
                    return Err(DbError::Sql {
                        code: "XX000".into(),
                        message: "batch insert returned rows that do not match the request".into(),
                        constraint: None,
                    });
                }
                for (row, &i) in inserted.into_iter().zip(&insert) {
                    outcomes[i] = Some(Ok((StatusCode::CREATED, row)));
                }
            }
            Ok::<_, DbError>((tx, dup_of))
        };
        let timed = tokio::time::timeout_at(deadline.into(), work).await;
        let (tx, dup_of) = match timed {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => {
                cancel_in_background(cancel);
                return Err(ApiError::unavailable("timed out"));
            }
        };
        bounded_commit(tx, deadline).await?;
        for (i, first) in dup_of {
            outcomes[i] = Some(match &outcomes[first] {
                Some(Ok((_, t))) => Ok((StatusCode::OK, t.clone())),
                Some(Err(e)) => Err(e.clone()),
                None => Err(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "duplicate without an original",
                )),
            });
        }
        Ok(outcomes
            .into_iter()
            .map(|o| {
                o.unwrap_or_else(|| {
                    Err(ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "internal",
                        "trade left without an outcome",
                    ))
                })
            })
            .collect())
    }
}

/// The dropped transaction queues a ROLLBACK behind whatever statement is
/// still running (say, waiting on a row lock); cancelling that statement lets
/// the rollback happen now and the connection go back to the pool clean.
fn cancel_in_background(cancel: tokio_postgres::CancelToken) {
    tokio::spawn(async move {
        if let Err(e) = cancel.cancel_query(tokio_postgres::NoTls).await {
            tracing::debug!(error = %e, "could not cancel a timed-out statement");
        }
    });
}

/// COMMIT, bounded too: "never a hang". Past the request deadline (plus a
/// grace period: a COMMIT is normally a WAL flush) the outcome is unknown, and
/// the answer says so rather than 503.
async fn bounded_commit(
    tx: deadpool_postgres::Transaction<'_>,
    deadline: Instant,
) -> Result<(), ApiError> {
    match tokio::time::timeout_at((deadline + COMMIT_GRACE).into(), tx.commit()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(commit_failed(e)),
        Err(_) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "outcome_unknown",
            "the database did not confirm the commit in time, the outcome is unknown; retry with the same client_order_id",
        )),
    }
}

/// A COMMIT that failed: if the server answered, nothing committed; if the
/// connection died mid-commit the outcome is unknown, and saying 503 ("nothing
/// committed") could be a lie.
fn commit_failed(e: tokio_postgres::Error) -> ApiError {
    if e.as_db_error().is_some() {
        ApiError::from(DbError::from(e))
    } else {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "outcome_unknown",
            format!("connection lost during commit, the outcome is unknown; retry with the same client_order_id ({e})"),
        )
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
            constraint: None,
        });
        assert_eq!(
            (e.status, e.code),
            (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
        );
        assert!(e.message.contains("nothing was committed"), "{}", e.message);
    }

    #[test]
    fn tokens_match_only_exactly() {
        assert!(token_matches(b"s3cret-token", b"s3cret-token"));
        for given in [
            &b"s3cret-tokeN"[..],
            b"s3cret-toke",
            b"s3cret-token!",
            b"",
            b"S3CRET-TOKEN",
        ] {
            assert!(!token_matches(given, b"s3cret-token"), "{given:?}");
        }
    }

    #[test]
    fn prices() {
        assert_eq!(normalize_price("0.63").unwrap(), "0.6300");
        assert_eq!(normalize_price(".5").unwrap(), "0.5000");
        assert_eq!(normalize_price("0.0001").unwrap(), "0.0001");
        assert_eq!(normalize_price("0.9999").unwrap(), "0.9999");
        for bad in [
            "0", "1", "1.0", "0.0000", "0.00001", "-0.5", "abc", "", ".", "0.5e1", " 0.5",
        ] {
            assert!(normalize_price(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn trade_page_queries() {
        assert_eq!(parse_trades_query("").unwrap(), (0, 100));
        assert_eq!(
            parse_trades_query("after_seq=5&limit=1000").unwrap(),
            (5, 1000)
        );
        // Found by the property test: unknown keys used to be parsed as
        // integers too, so `?_=abc` was a 400.
        assert_eq!(parse_trades_query("_=abc&limit=7").unwrap(), (0, 7));
        let status = |q| parse_trades_query(q).unwrap_err().status;
        assert_eq!(status("after_seq=x"), StatusCode::BAD_REQUEST);
        assert_eq!(status("after_seq=-1"), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(status("limit=0"), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(status("limit=1001"), StatusCode::UNPROCESSABLE_ENTITY);
    }

    #[test]
    fn market_ids() {
        assert!(validate_market_id("ELECTION-2028").is_ok());
        assert!(validate_market_id("a.b:c_d-e").is_ok());
        assert!(validate_market_id(&"a".repeat(64)).is_ok());
        for bad in ["", "-x", "a b", &"a".repeat(65), "é"] {
            assert!(validate_market_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn trade_requests() {
        let parse = |v: Value| NewTrade::parse("M", v.as_object().unwrap());
        let t = parse(json!({"side":"no","price":"0.25","qty":3,"client_order_id":"c1"})).unwrap();
        assert_eq!(
            (
                t.side,
                t.price.as_str(),
                t.qty,
                t.client_order_id.as_deref()
            ),
            ("no", "0.2500", 3, Some("c1"))
        );
        assert_eq!(
            parse(json!({"side":"yes","price":0.5,"qty":1}))
                .unwrap()
                .price,
            "0.5000"
        );
        let status = |v| parse(v).unwrap_err().status;
        assert_eq!(
            status(json!({"price":"0.5","qty":1})),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            status(json!({"side":1,"price":"0.5","qty":1})),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            status(json!({"side":"yes","price":"0.5","qty":"1"})),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            status(json!({"side":"yes","price":"0.5","qty":1.5})),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            status(json!({"side":"maybe","price":"0.5","qty":1})),
            StatusCode::UNPROCESSABLE_ENTITY
        );
        assert_eq!(
            status(json!({"side":"yes","price":"1.5","qty":1})),
            StatusCode::UNPROCESSABLE_ENTITY
        );
        assert_eq!(
            status(json!({"side":"yes","price":"0.5","qty":0})),
            StatusCode::UNPROCESSABLE_ENTITY
        );
        assert_eq!(
            status(json!({"side":"yes","price":"0.5","qty":1_000_000_001u64})),
            StatusCode::UNPROCESSABLE_ENTITY
        );
        assert_eq!(
            status(json!({"side":"yes","price":"0.5","qty":-1})),
            StatusCode::UNPROCESSABLE_ENTITY
        );
    }
}
