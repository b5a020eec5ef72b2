//! The broadcaster's HTTP read path (docs/PROTOCOL.md, "HTTP reads"):
//! `GET /v1/markets/{id}/stream` (Server-Sent Events, run by the session
//! code with an SSE transport) and `GET /v1/markets/{id}/trades` (catch-up
//! and long-poll), with their CORS preflight.
//!
//! Checks run in the contract's order: route 404, method 405, origin 403,
//! token (400, 401), parameters (400, then 422), `forbidden` 403, then,
//! past the connection limit (503 `overloaded`, before any database work),
//! market 404, shard 421, epoch 409, history 410. Every answer carries the
//! CORS headers; errors and anything that can change carry
//! `Cache-Control: no-store`, a full page of a named epoch is immutable.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::future::{BoxFuture, FutureExt, Shared};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};

use tokio_stream::StreamExt;

use super::session::{self, sse, LiveItem, SessionCtx};
use super::{Refused, State};
use crate::http::{self, Body};
use crate::protocol::client::{self, Entry, ErrorReply, Mode, Start, MAX_INTERVAL_MS};
use crate::protocol::market::is_market_id;
use crate::protocol::token::Grant;
use crate::protocol::trade::EncodedTrade;

/// The contract's fixed page size bound of `GET .../trades`.
const MAX_LIMIT: i64 = 1000;
const DEFAULT_LIMIT: i64 = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Route {
    Stream,
    Trades,
}

impl Route {
    fn label(self) -> &'static str {
        match self {
            Route::Stream => "stream",
            Route::Trades => "trades",
        }
    }
}

/// `/v1/markets/{id}/stream` or `/v1/markets/{id}/trades`.
pub(super) fn route(path: &str) -> Option<(Route, &str)> {
    let rest = path.strip_prefix("/v1/markets/")?;
    let (id, tail) = rest.rsplit_once('/')?;
    let route = match tail {
        "stream" => Route::Stream,
        "trades" => Route::Trades,
        _ => return None,
    };
    (!id.is_empty() && !id.contains('/')).then_some((route, id))
}

fn refused(status: StatusCode, code: &'static str, message: impl Into<String>) -> Refused {
    Refused {
        status,
        code,
        message: message.into(),
    }
}

/// An error reply of the subscribe checks as its HTTP answer: extra fields
/// go inside `error`.
fn from_reply(e: ErrorReply) -> Response<Body> {
    let status = match e.code {
        "unknown_market" => StatusCode::NOT_FOUND,
        "wrong_shard" => StatusCode::MISDIRECTED_REQUEST,
        "epoch_mismatch" => StatusCode::CONFLICT,
        "history_unavailable" => StatusCode::GONE,
        "forbidden" => StatusCode::FORBIDDEN,
        "bad_request" => StatusCode::BAD_REQUEST,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    let mut err = serde_json::Map::new();
    err.insert("code".into(), e.code.into());
    err.insert("message".into(), e.message.clone().into());
    for (k, v) in e.extra {
        if k != "market" {
            err.insert(k, v);
        }
    }
    let mut r = http::json(status, &serde_json::json!({ "error": err }));
    if status == StatusCode::SERVICE_UNAVAILABLE {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    r
}

impl State {
    /// A request under `/v1/`.
    pub(super) async fn read(&self, req: Request<hyper::body::Incoming>) -> Response<Body> {
        let Some((route, id)) = route(req.uri().path()) else {
            let r = http::error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no route for {}", req.uri().path()),
            );
            return self.cors(&req, r);
        };
        let id = id.to_string();
        let resp = match self.read_route(&req, route, &id).await {
            Ok(r) => r,
            Err(refused) => refused.response(),
        };
        metrics::counter!("marketcast_http_reads_total", "route" => route.label(), "status" => resp.status().as_str().to_string()).increment(1);
        self.cors(&req, resp)
    }

    async fn read_route<B>(
        &self,
        req: &Request<B>,
        route: Route,
        id: &str,
    ) -> Result<Response<Body>, Refused> {
        match *req.method() {
            Method::GET => {}
            Method::OPTIONS => return Ok(self.preflight(req)),
            _ => {
                let mut r = http::error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method_not_allowed",
                    "this route takes GET (and OPTIONS)",
                );
                r.headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static("GET, OPTIONS"));
                return Ok(r);
            }
        }
        self.origins
            .check(req)
            .map_err(|why| refused(StatusCode::FORBIDDEN, "origin_not_allowed", why))?;
        let grant = self.admit(req)?;
        let query = Query::parse(req.uri().query().unwrap_or(""))?;
        if !is_market_id(id) {
            return Err(invalid(
                "not a market id: 1 to 64 of A-Z a-z 0-9 _ . : -, starting with a letter or digit",
            ));
        }
        match route {
            Route::Stream => {
                let last_event_id = match req.headers().get("last-event-id") {
                    None => None,
                    Some(v) => Some(
                        v.to_str()
                            .ok()
                            .and_then(|s| s.trim().parse::<i64>().ok())
                            .and_then(client::from_seq)
                            .ok_or_else(|| {
                                refused(
                                    StatusCode::BAD_REQUEST,
                                    "bad_request",
                                    "Last-Event-ID must be an integer >= 0",
                                )
                            })?,
                    ),
                };
                let entry = query.entry(id, &self.ctx, last_event_id)?;
                forbid(&grant, id)?;
                Ok(self.stream(entry, grant).await)
            }
            Route::Trades => {
                let mut poll = query.poll(&self.ctx)?;
                poll.if_none_match = req
                    .headers()
                    .get_all(header::IF_NONE_MATCH)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .flat_map(|v| v.split(','))
                    .map(|t| t.trim().to_string())
                    .collect();
                forbid(&grant, id)?;
                Ok(self.trades(id, poll).await)
            }
        }
    }

    /// `OPTIONS`: the CORS preflight.
    fn preflight<B>(&self, req: &Request<B>) -> Response<Body> {
        if let Err(why) = self.origins.check(req) {
            return http::error(StatusCode::FORBIDDEN, "origin_not_allowed", why);
        }
        let mut r = Response::new(http::full(Bytes::new()));
        *r.status_mut() = StatusCode::NO_CONTENT;
        let h = r.headers_mut();
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("Authorization, Last-Event-ID, If-None-Match"),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
        r
    }

    /// The CORS headers every answer of the read path carries.
    fn cors<B>(&self, req: &Request<B>, mut r: Response<Body>) -> Response<Body> {
        let h = r.headers_mut();
        match &self.origins.allowed {
            None => {
                h.insert(
                    header::ACCESS_CONTROL_ALLOW_ORIGIN,
                    HeaderValue::from_static("*"),
                );
            }
            Some(_) => {
                if let Some(origin) = req.headers().get(header::ORIGIN) {
                    if self.origins.check(req).is_ok() {
                        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
                    }
                }
                h.append(header::VARY, HeaderValue::from_static("Origin"));
            }
        }
        h.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static("ETag, Marketcast-Head-Seq"),
        );
        r
    }

    /// A slot of `--max-connections` (WebSockets, SSE streams and waiting
    /// long-polls together), or 503 `overloaded`. The slot is given back by
    /// the [`ConnSlot`] (a stream hands it to its session, whose end frees it).
    fn slot(&self) -> Result<ConnSlot, Refused> {
        let open = self.ctx.connections.fetch_add(1, Ordering::AcqRel) + 1;
        let slot = ConnSlot(Some(self.ctx.clone()));
        if open as usize > self.ctx.cfg.max_connections {
            return Err(refused(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "connection limit reached; retry",
            ));
        }
        Ok(slot)
    }

    /// `GET /v1/markets/{id}/stream`: the subscription is checked and joined
    /// before the 200, then run by a session with an SSE transport.
    async fn stream(&self, entry: Entry, grant: Option<Box<Grant>>) -> Response<Body> {
        let slot = match self.slot() {
            Ok(s) => s,
            Err(r) => return overloaded(r),
        };
        let opened = match session::open(&self.ctx, &entry, &None).await {
            Ok(o) => o,
            Err(e) => return from_reply(e),
        };
        // From here the session's end frees the slot.
        slot.hand_over();
        let (out, body) = sse::channel();
        let conn_id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        self.sessions.spawn(session::run_sse(
            out,
            self.ctx.clone(),
            grant,
            entry,
            opened,
            self.shutdown.clone(),
            conn_id,
        ));
        use http_body_util::BodyExt;
        Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "text/event-stream")
            .header(header::CACHE_CONTROL, "no-store")
            .header("x-accel-buffering", "no")
            .body(body.boxed_unsync())
            .expect("static headers are valid")
    }

    /// `GET /v1/markets/{id}/trades`: a page after `after_seq`, at once when
    /// there are trades, else after waiting up to `wait_ms` for one.
    async fn trades(&self, id: &str, p: Poll) -> Response<Body> {
        let ctx = &self.ctx;
        let entry = Entry {
            epoch: p.epoch.clone(),
            ..Entry::v1(id, None)
        };
        // The checks of a subscribe (market, shard, epoch), and the hub's
        // ring and live queue for the page and the wait.
        let opened = match session::open(ctx, &entry, &None).await {
            Ok(o) => o,
            Err(e) => return from_reply(e),
        };
        let m = opened.market.clone();
        let (shared, mut live) = opened.follow();
        let mut page = match self.page(id, &shared, m.head_seq, p.after, p.limit).await {
            Ok(page) => page,
            Err(r) => return r,
        };
        if page.is_empty() && p.wait > Duration::ZERO {
            if let Ok(slot) = self.slot() {
                metrics::gauge!("marketcast_long_polls_waiting").increment(1.0);
                let deadline = tokio::time::Instant::now() + p.wait;
                // Cancel safety: a stream's next, a sleep and a token are
                // cancel-safe.
                loop {
                    if shared.head() > p.after {
                        break;
                    }
                    tokio::select! {
                        item = live.next() => match item {
                            Some(LiveItem::Trade(Ok(t))) if t.seq <= p.after => continue,
                            // A trade above the position, a lag (trades
                            // came), a moved queue or the end: read again.
                            _ => break,
                        },
                        _ = tokio::time::sleep_until(deadline) => break,
                        _ = self.shutdown.cancelled() => break,
                    }
                }
                metrics::gauge!("marketcast_long_polls_waiting").decrement(1.0);
                drop(slot);
                page = match self.page(id, &shared, m.head_seq, p.after, p.limit).await {
                    Ok(page) => page,
                    Err(r) => return r,
                };
            }
            // Over the limit: answered at once with what there is (none).
        }
        let last = page.last().map(|t| t.seq);
        let immutable = page.len() as i64 == p.limit && p.epoch.is_some();
        let head = match (immutable, last) {
            (true, Some(last)) => last,
            _ => m.head_seq.max(shared.head()).max(last.unwrap_or(0)),
        };
        let size = page.iter().map(|t| t.frame.len()).sum::<usize>();
        let mut body = BytesMut::with_capacity(32 + size);
        body.put_slice(b"{\"trades\":[");
        for (i, t) in page.iter().enumerate() {
            if i > 0 {
                body.put_u8(b',');
            }
            body.put_slice(trade_json(&t.frame));
        }
        body.put_slice(format!("],\"head_seq\":{head}}}").as_bytes());
        let mut r = http::bytes_response(StatusCode::OK, "application/json", body.freeze());
        let h = r.headers_mut();
        h.insert(
            "marketcast-head-seq",
            HeaderValue::from_str(&head.to_string()).expect("digits"),
        );
        if immutable {
            let tag = etag(id, &m.epoch, p.after, p.limit);
            let cc = if ctx.tokens.require_token {
                "private, max-age=31536000, immutable"
            } else {
                "public, max-age=31536000, immutable"
            };
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cc));
            h.insert(
                header::ETAG,
                HeaderValue::from_str(&tag).expect("an ETag is ASCII"),
            );
            if p.if_none_match.iter().any(|t| t == &tag || t == "*") {
                // 304: no body, the same ETag and Cache-Control.
                let mut n = Response::new(http::full(Bytes::new()));
                *n.status_mut() = StatusCode::NOT_MODIFIED;
                let nh = n.headers_mut();
                nh.insert(header::CACHE_CONTROL, HeaderValue::from_static(cc));
                nh.insert(header::ETAG, HeaderValue::from_str(&tag).expect("ASCII"));
                return n;
            }
        }
        r
    }

    /// Trades `after < seq <= after + limit`: from the ring when it holds
    /// `after + 1`, else one log read shared by identical concurrent
    /// requests. A page that does not start at `after + 1` while trades
    /// after it exist means they were pruned: 410.
    async fn page(
        &self,
        id: &str,
        shared: &super::hub::MarketShared,
        head: i64,
        after: i64,
        limit: i64,
    ) -> Result<Vec<EncodedTrade>, Response<Body>> {
        let head = head.max(shared.head());
        let page = match shared.ring_range(after, after + limit) {
            Some(p) if !p.is_empty() => {
                metrics::counter!("marketcast_replayed_trades_total", "source" => "memory")
                    .increment(p.len() as u64);
                p
            }
            _ => self
                .reads
                .read(&self.ctx, id, after, head, limit)
                .await
                .map_err(|e| {
                    from_reply(ErrorReply::new(
                        None,
                        "unavailable",
                        format!("database unavailable, retry: {e}"),
                    ))
                })?
                .to_vec(),
        };
        if let Some(first) = page.first() {
            if first.seq != after + 1 {
                return Err(from_reply(
                    ErrorReply::new(
                        None,
                        "history_unavailable",
                        format!("trades after seq {after} of {id} were pruned"),
                    )
                    .with("earliest_seq", first.seq.into()),
                ));
            }
        }
        Ok(page)
    }
}

/// 503 with `Retry-After: 1`.
fn overloaded(r: Refused) -> Response<Body> {
    let mut resp = r.response();
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    resp
}

fn forbid(grant: &Option<Box<Grant>>, id: &str) -> Result<(), Refused> {
    match grant {
        Some(g) if !g.markets.matches(id) => {
            http::count_auth_failure("forbidden");
            Err(refused(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("the token does not grant {id}"),
            ))
        }
        _ => Ok(()),
    }
}

/// A slot of `--max-connections`, given back when dropped unless handed
/// over to a session (whose end gives it back).
struct ConnSlot(Option<Arc<SessionCtx>>);

impl ConnSlot {
    fn hand_over(mut self) {
        self.0 = None;
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        if let Some(ctx) = &self.0 {
            ctx.connections.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// The JSON of a trade frame (the WebSocket `trade` message).
fn trade_json(frame: &Bytes) -> &[u8] {
    let at = match frame.get(1).map(|b| b & 0x7f) {
        Some(126) => 4,
        Some(127) => 10,
        _ => 2,
    };
    frame.get(at..).unwrap_or_default()
}

/// A strong ETag that depends only on the market, the epoch, `after_seq`
/// and `limit` (FNV-1a, so every broadcaster computes the same one).
fn etag(market: &str, epoch: &str, after: i64, limit: i64) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in market.bytes().chain([0]).chain(epoch.bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("\"{h:016x}-{after}-{limit}\"")
}

/// The query of a read route, typed: integers that are not integers are
/// 400, values out of range 422; unknown keys are ignored.
#[derive(Debug, Default)]
struct Query {
    from_seq: Option<i64>,
    recent: Option<i64>,
    epoch: Option<String>,
    mode: Option<String>,
    interval_ms: Option<i64>,
    after_seq: Option<i64>,
    limit: Option<i64>,
    wait_ms: Option<i64>,
}

/// A long-poll's parameters, checked.
#[derive(Debug)]
struct Poll {
    after: i64,
    limit: i64,
    wait: Duration,
    epoch: Option<String>,
    if_none_match: Vec<String>,
}

fn invalid(m: impl Into<String>) -> Refused {
    refused(StatusCode::UNPROCESSABLE_ENTITY, "invalid", m)
}

impl Query {
    fn parse(q: &str) -> Result<Query, Refused> {
        let mut out = Query::default();
        for (k, v) in url::form_urlencoded::parse(q.as_bytes()) {
            let int = || {
                v.parse::<i64>().map_err(|_| {
                    refused(
                        StatusCode::BAD_REQUEST,
                        "bad_request",
                        format!("{k} must be an integer"),
                    )
                })
            };
            match &*k {
                "from_seq" => out.from_seq = Some(int()?),
                "recent" => out.recent = Some(int()?),
                "interval_ms" => out.interval_ms = Some(int()?),
                "after_seq" => out.after_seq = Some(int()?),
                "limit" => out.limit = Some(int()?),
                "wait_ms" => out.wait_ms = Some(int()?),
                "epoch" => out.epoch = Some(v.into_owned()),
                "mode" => out.mode = Some(v.into_owned()),
                _ => {}
            }
        }
        Ok(out)
    }

    /// The stream's subscription; `Last-Event-ID` overrides `from_seq` and
    /// `recent` (a browser's `EventSource` reconnects to the same URL with it).
    fn entry(
        &self,
        id: &str,
        ctx: &SessionCtx,
        last_event_id: Option<i64>,
    ) -> Result<Entry, Refused> {
        let limits = &ctx.limits;
        let start = match (last_event_id, self.from_seq, self.recent) {
            (Some(l), _, _) => Start::After(l),
            (None, Some(_), Some(_)) => {
                return Err(refused(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "from_seq and recent exclude each other",
                ))
            }
            (None, Some(f), None) => {
                Start::After(client::from_seq(f).ok_or_else(|| invalid("from_seq must be >= 0"))?)
            }
            (None, None, Some(n)) if (1..=limits.max_recent as i64).contains(&n) => {
                Start::Recent(n as u32)
            }
            (None, None, Some(_)) => {
                return Err(invalid(format!(
                    "recent must be from 1 to {}",
                    limits.max_recent
                )))
            }
            (None, None, None) => Start::Head,
        };
        let mode = match (self.mode.as_deref(), self.interval_ms) {
            (None | Some("trades"), None) => Mode::Trades,
            (None | Some("trades"), Some(_)) => {
                return Err(refused(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "interval_ms is for mode=ticker only",
                ))
            }
            (Some("ticker"), ms) => {
                let ms = ms.unwrap_or(client::DEFAULT_INTERVAL_MS as i64);
                let lo = limits.min_interval_ms as i64;
                if !(lo..=MAX_INTERVAL_MS as i64).contains(&ms) {
                    return Err(invalid(format!(
                        "interval_ms must be from {lo} to {MAX_INTERVAL_MS}"
                    )));
                }
                Mode::Ticker {
                    interval_ms: ms as u32,
                }
            }
            (Some(_), _) => return Err(invalid("mode must be trades or ticker")),
        };
        Ok(Entry {
            market: id.to_string(),
            start,
            epoch: self.epoch.clone(),
            mode,
            // Heads are always on for SSE (when --head-interval > 0).
            heads: true,
        })
    }

    fn poll(&self, ctx: &SessionCtx) -> Result<Poll, Refused> {
        let after = self.after_seq.unwrap_or(0);
        if client::from_seq(after).is_none() {
            return Err(invalid("after_seq must be >= 0"));
        }
        let limit = self.limit.unwrap_or(DEFAULT_LIMIT);
        if !(1..=MAX_LIMIT).contains(&limit) {
            return Err(invalid(format!("limit must be from 1 to {MAX_LIMIT}")));
        }
        let max_wait = ctx.cfg.max_poll_wait.as_millis() as i64;
        let wait = self.wait_ms.unwrap_or(0);
        if !(0..=max_wait).contains(&wait) {
            return Err(invalid(format!("wait_ms must be from 0 to {max_wait}")));
        }
        Ok(Poll {
            after,
            limit,
            wait: Duration::from_millis(wait as u64),
            epoch: self.epoch.clone(),
            if_none_match: Vec::new(),
        })
    }
}

/// Log reads of the trades route, one per (market, after, limit) at a time:
/// identical concurrent requests share it (a page that many clients ask
/// for at once costs one read).
#[derive(Default)]
pub(super) struct PageReads(SingleFlight<PageKey, PageRead>);

/// (market, after_seq, limit).
type PageKey = (String, i64, i64);
type PageRead = Result<Arc<[EncodedTrade]>, String>;

impl PageReads {
    /// `head`: the primary's head, how far a replica must reach (the first
    /// load's, for every caller sharing it).
    async fn read(
        &self,
        ctx: &Arc<SessionCtx>,
        id: &str,
        after: i64,
        head: i64,
        limit: i64,
    ) -> Result<Arc<[EncodedTrade]>, String> {
        let (ctx, market) = (ctx.clone(), id.to_string());
        self.0
            .run((market.clone(), after, limit), move || {
                async move {
                    metrics::counter!("marketcast_log_reads_total").increment(1);
                    ctx.replay
                        .trade_frames(&market, after, None, head, limit, &mut Default::default())
                        .await
                        .map(|(rows, source)| {
                            metrics::counter!("marketcast_replayed_trades_total", "source" => source)
                                .increment(rows.len() as u64);
                            Arc::from(rows)
                        })
                    .map_err(|e| e.to_string())
                }
                .boxed()
            })
            .await
    }
}

/// One run of a load per key at a time: callers that ask for a key while
/// its load runs wait for that load and share its result. The entry goes
/// when any caller of it finishes or gives up (so keys never pile up,
/// whatever clients do); a caller after that loads afresh.
pub(super) struct SingleFlight<K, V: Clone> {
    inflight: Flights<K, V>,
}

type Flights<K, V> = Mutex<HashMap<K, Shared<BoxFuture<'static, V>>>>;

impl<K, V: Clone> Default for SingleFlight<K, V> {
    fn default() -> Self {
        SingleFlight {
            inflight: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: std::hash::Hash + Eq + Clone, V: Clone> SingleFlight<K, V> {
    pub(super) async fn run(&self, key: K, load: impl FnOnce() -> BoxFuture<'static, V>) -> V {
        let fut = self
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_insert_with(|| load().shared())
            .clone();
        let _leave = Leave {
            flights: &self.inflight,
            key,
        };
        fut.await
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.inflight.lock().unwrap().len()
    }
}

/// Removes a key from the flights when its caller finishes or is dropped.
struct Leave<'a, K: std::hash::Hash + Eq, V: Clone> {
    flights: &'a Flights<K, V>,
    key: K,
}

impl<K: std::hash::Hash + Eq, V: Clone> Drop for Leave<'_, K, V> {
    fn drop(&mut self) {
        self.flights
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[tokio::test]
    async fn identical_concurrent_loads_run_once_and_leave_nothing_behind() {
        let flights: Arc<SingleFlight<&'static str, usize>> = Arc::default();
        let loads = Arc::new(AtomicUsize::new(0));
        let load = |loads: Arc<AtomicUsize>| {
            move || {
                async move {
                    let n = loads.fetch_add(1, Ordering::SeqCst) + 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    n
                }
                .boxed()
            }
        };
        let callers: Vec<_> = (0..20)
            .map(|_| {
                let (f, l) = (flights.clone(), loads.clone());
                tokio::spawn(async move { f.run("page", load(l)).await })
            })
            .collect();
        for c in callers {
            assert_eq!(
                c.await.unwrap(),
                1,
                "every caller got the one load's result"
            );
        }
        assert_eq!(loads.load(Ordering::SeqCst), 1, "one load for 20 callers");
        assert_eq!(flights.len(), 0);
        assert_eq!(
            flights.run("page", load(loads.clone())).await,
            2,
            "later: a fresh load"
        );
        // A caller that gives up leaves no entry behind.
        let gone = tokio::time::timeout(
            Duration::from_millis(5),
            flights.run("other", load(loads.clone())),
        )
        .await;
        assert!(gone.is_err());
        assert_eq!(flights.len(), 0, "keys never pile up");
    }

    #[test]
    fn routes_and_etags() {
        assert_eq!(
            route("/v1/markets/M-1/stream"),
            Some((Route::Stream, "M-1"))
        );
        assert_eq!(route("/v1/markets/M/trades"), Some((Route::Trades, "M")));
        assert_eq!(route("/v1/markets//trades"), None);
        assert_eq!(route("/v1/markets/a/b/trades"), None);
        assert_eq!(route("/v1/markets/M/other"), None);
        let t = etag("M", "e1", 10, 100);
        assert_eq!(t, etag("M", "e1", 10, 100), "the same on every broadcaster");
        assert_ne!(t, etag("M", "e2", 10, 100));
        assert_ne!(etag("M", "", 1, 1), etag("", "M", 1, 1));
        assert!(t.starts_with('"') && t.ends_with("-10-100\""));
    }
}
