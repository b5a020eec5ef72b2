//! One WebSocket connection of the broadcaster.
//!
//! One task per connection owns the socket and every subscription. In one
//! `select!` it reads client frames ([`inbound`], cancel-safe: partial frames
//! are kept in the reader, never in the future), enforces the size limit
//! (1009), binary frames (1008) and the op rate limit, answers ops, follows
//! each subscribed market's live broadcast, fills any gap from the ring or
//! the log before anything later, and writes whatever is queued in one
//! vectored write (pre-encoded frames, shared by refcount: no per-subscriber
//! JSON, no copy). One task, no channel, no buffer kept while idle: an idle
//! subscribed connection costs about 5 KiB (docs/BENCHMARKS.md, S3). While
//! the task writes (a replay, a slow socket) it does not read: the client's
//! frames wait in the kernel, which is the backpressure we want.
//!
//! The per-subscription rule that gives the delivery guarantee: `next` is the
//! next seq owed to the client. A live trade below `next` is a duplicate and
//! dropped; one equal to `next` is sent; one above it raises `want` and is not
//! sent itself: the gap `next..=want` is then filled from the ring (which
//! already holds the live trade) or the log, in order. A fill that fails
//! because Postgres is down is retried every second; the connection stays open.
//!
//! A client whose socket does not accept a write within `write_timeout` is a
//! slow consumer and is closed with 4000; it reconnects with `from_seq` and
//! loses nothing. Memory per connection stays bounded whatever the client
//! does: the live queue is shared per market, and fills go a page at a time.

use std::collections::{BTreeSet, HashMap};
use std::io::IoSlice;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use deadpool_postgres::Pool;
use fastwebsockets::{Frame, OpCode, Payload, WebSocket};
use futures_util::FutureExt;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use serde_json::{json, Map, Value};
use smallvec::SmallVec;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::{StreamExt, StreamMap};
use tokio_util::sync::CancellationToken;

use crate::config::BroadcasterConfig;
use crate::db;
use crate::hub::{HubHandle, MarketShared};
use crate::trade::{control_frame, text_frame, EncodedTrade};

mod inbound;
pub use inbound::{parse_head, FrameReader, Inbound, ReadError};

/// Frames queued before the session stops draining and writes. Bounds one
/// vectored write (the kernel takes at most 1024 slices anyway).
const WRITE_BATCH_FRAMES: usize = 512;

/// How long a closed connection keeps reading for the peer's Close reply.
const CLOSE_HANDSHAKE: Duration = Duration::from_secs(2);

/// The session's fast path polls only live data; every this many turns it
/// also looks at ops, timers and shutdown (see `Session::run`).
const CONTROL_EVERY: u32 = 8;

/// How long a closing connection may take to get its Close frame out (a slow
/// consumer that starts reading again still learns why it was closed).
const CLOSE_LINGER: Duration = Duration::from_secs(10);

// Handles resolved once: the `counter!` macro looks the metric up in the
// registry on every call, too slow for once-per-write. Only touched by
// sessions, which start after `metrics::install`.
static FRAMES_SENT: LazyLock<metrics::Counter> =
    LazyLock::new(|| metrics::counter!("marketcast_ws_frames_sent_total"));
static BYTES_SENT: LazyLock<metrics::Counter> =
    LazyLock::new(|| metrics::counter!("marketcast_ws_bytes_sent_total"));
static WRITES: LazyLock<metrics::Counter> =
    LazyLock::new(|| metrics::counter!("marketcast_ws_writes_total"));

/// This connection's frames, bytes and writes not yet added to the global
/// counters. Every flush adding to three atomics shared by all connections
/// made the two cores trade those cache lines thousands of times a second;
/// adding once per `SENT_EVERY` flushes (and at the end) keeps the totals
/// exact, just a little late.
#[derive(Default)]
struct SentTally {
    frames: u64,
    bytes: u64,
    writes: u64,
    flushes: u32,
}

const SENT_EVERY: u32 = 64;

impl SentTally {
    fn add(&mut self, frames: u64, bytes: u64, writes: u64) {
        self.frames += frames;
        self.bytes += bytes;
        self.writes += writes;
        self.flushes += 1;
        if self.flushes >= SENT_EVERY {
            self.publish();
        }
    }

    fn publish(&mut self) {
        if self.flushes > 0 {
            FRAMES_SENT.increment(self.frames);
            BYTES_SENT.increment(self.bytes);
            WRITES.increment(self.writes);
            *self = SentTally::default();
        }
    }
}

/// What every session shares.
pub struct SessionCtx {
    pub cfg: BroadcasterConfig,
    pub pool: Pool,
    pub hub: HubHandle,
    pub shards: BTreeSet<u32>,
    /// Open connections, for the limit (1013) and the gauge.
    pub connections: AtomicU64,
}

/// A client op, parsed and checked.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    Subscribe {
        market: String,
        from_seq: Option<i64>,
        epoch: Option<String>,
        id: Option<Value>,
    },
    Unsubscribe {
        market: String,
        id: Option<Value>,
    },
    Ping {
        id: Option<Value>,
    },
}

/// An `error` reply.
#[derive(Debug, Clone, PartialEq)]
pub struct ErrorReply {
    pub id: Option<Value>,
    pub code: &'static str,
    pub message: String,
    pub extra: Map<String, Value>,
}

impl ErrorReply {
    pub fn new(id: Option<Value>, code: &'static str, message: impl Into<String>) -> Self {
        ErrorReply {
            id,
            code,
            message: message.into(),
            extra: Map::new(),
        }
    }
    fn with(mut self, k: &str, v: Value) -> Self {
        self.extra.insert(k.to_string(), v);
        self
    }
    pub fn frame(&self) -> Bytes {
        metrics::counter!("marketcast_client_errors_total", "code" => self.code).increment(1);
        let mut m = Map::new();
        m.insert("type".into(), "error".into());
        if let Some(id) = &self.id {
            m.insert("id".into(), id.clone());
        }
        m.insert("code".into(), self.code.into());
        m.insert("message".into(), self.message.clone().into());
        m.extend(self.extra.clone());
        json_frame(&Value::Object(m))
    }
}

fn json_frame(v: &Value) -> Bytes {
    text_frame(&serde_json::to_vec(v).expect("serialising a Value cannot fail"))
}

/// Parse one client message (PROTOCOL.md section 2). Types are checked
/// strictly: a wrong type is `bad_request`, never a guess.
pub fn parse_op(msg: &[u8]) -> Result<Op, ErrorReply> {
    let v: Value = serde_json::from_slice(msg)
        .map_err(|e| ErrorReply::new(None, "bad_request", format!("not JSON: {e}")))?;
    let Value::Object(o) = v else {
        return Err(ErrorReply::new(
            None,
            "bad_request",
            "a message must be a JSON object",
        ));
    };
    let id = match o.get("id") {
        None | Some(Value::Null) => None,
        Some(v @ Value::String(_)) => Some(v.clone()),
        Some(v @ Value::Number(n)) if n.is_i64() || n.is_u64() => Some(v.clone()),
        Some(_) => {
            return Err(ErrorReply::new(
                None,
                "bad_request",
                "id must be an integer or a string",
            ))
        }
    };
    let bad = |m: &str| ErrorReply::new(id.clone(), "bad_request", m.to_string());
    let op = match o.get("op") {
        Some(Value::String(s)) => s.as_str(),
        Some(_) => return Err(bad("op must be a string")),
        None => return Err(bad("missing field op")),
    };
    let market = || match o.get("market") {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(bad("market must be a string")),
        None => Err(bad("missing field market")),
    };
    match op {
        "subscribe" => {
            let market = market()?;
            let from_seq = match o.get("from_seq") {
                None | Some(Value::Null) => None,
                // i64::MAX is refused too: the first seq owed, from_seq + 1,
                // must exist as an i64 (it overflowed: a panic in debug builds).
                Some(Value::Number(n)) => match n.as_i64() {
                    Some(f) if (0..i64::MAX).contains(&f) => Some(f),
                    _ => return Err(bad("from_seq must be an integer >= 0")),
                },
                Some(_) => return Err(bad("from_seq must be an integer >= 0")),
            };
            let epoch = match o.get("epoch") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.clone()),
                Some(_) => return Err(bad("epoch must be a string")),
            };
            Ok(Op::Subscribe {
                market,
                from_seq,
                epoch,
                id,
            })
        }
        "unsubscribe" => Ok(Op::Unsubscribe {
            market: market()?,
            id,
        }),
        "ping" => Ok(Op::Ping { id }),
        other => Err(ErrorReply::new(
            id.clone(),
            "unknown_op",
            format!("unknown op {other:?}"),
        )),
    }
}

/// Token bucket for client ops.
#[derive(Debug)]
pub struct RateLimit {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimit {
    pub fn new(rate: u32, burst: u32, now: Instant) -> Self {
        RateLimit {
            rate: rate as f64,
            burst: burst as f64,
            tokens: burst as f64,
            last: now,
        }
    }
    pub fn allow(&mut self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Run one upgraded connection to its end. `initial` is the subscribe from
/// the URL's query, handled as if it were the first op.
pub async fn run(
    ws: WebSocket<TokioIo<Upgraded>>,
    ctx: Arc<SessionCtx>,
    initial: Option<Result<Op, ErrorReply>>,
    shutdown: CancellationToken,
    conn_id: u64,
) {
    let open = ctx.connections.fetch_add(1, Ordering::AcqRel) + 1;
    metrics::gauge!("marketcast_ws_connections").increment(1.0);
    let over_limit = open as usize > ctx.cfg.max_connections;

    // fastwebsockets did the handshake; from here frames are read by
    // `inbound` (no buffer kept while idle) and written pre-encoded, vectored.
    let mut s = Session {
        io: ws.into_inner(),
        frames: FrameReader::new(ctx.cfg.max_message_bytes),
        rate: RateLimit::new(ctx.cfg.rate_per_sec, ctx.cfg.rate_burst, Instant::now()),
        refused: 0,
        last_seen: Instant::now(),
        sent_close: false,
        peer_closed: false,
        sent: SentTally::default(),
        ctx: ctx.clone(),
        out: Vec::new(),
        subs: HashMap::new(),
        ids: HashMap::new(),
        live: StreamMap::new(),
        next_id: 0,
        conn_id,
        shutdown: shutdown.clone(),
    };
    if over_limit {
        s.close_now(1013, "server overloaded: connection limit reached")
            .await;
    } else {
        s.run(initial, shutdown).await;
    }
    // The closing handshake: our Close is out; keep reading until the peer's
    // Close (or EOF) so that its last frames, a pong say, are not left
    // unread. Dropping a socket with unread input sends a RST, and the peer
    // may then lose our Close frame and never learn the code.
    if s.sent_close && !s.peer_closed {
        let _ = tokio::time::timeout(CLOSE_HANDSHAKE, async {
            while let Ok(m) = s.frames.next(&mut s.io).await {
                if matches!(m, Inbound::Close(_)) {
                    break;
                }
            }
        })
        .await; // Past the deadline the socket is dropped anyway.
    }
    s.sent.publish();
    let subs = s.subs.len();
    metrics::gauge!("marketcast_subscriptions").decrement(subs as f64);
    ctx.connections.fetch_sub(1, Ordering::AcqRel);
    metrics::gauge!("marketcast_ws_connections").decrement(1.0);
}

/// One subscription's position.
struct Sub {
    market: String,
    shared: Arc<MarketShared>,
    /// Next seq owed to the client.
    next: i64,
    /// Highest seq known to exist that the client is owed (fill up to it).
    want: i64,
}

enum End {
    /// The socket failed or the peer went away.
    Gone,
    /// A write did not finish within write_timeout.
    Slow,
    /// The server is shutting down (noticed between replay pages).
    Shutdown,
}

/// One connection: a single task owns the socket, reads client frames and
/// writes everything else. Client frames are read in the same `select!` as
/// live trades, which is safe because [`FrameReader`] keeps every byte it
/// has read; one task and no channel keep an idle connection small
/// (`docs/BENCHMARKS.md`, S3).
struct Session {
    io: TokioIo<Upgraded>,
    frames: FrameReader,
    rate: RateLimit,
    /// Ops refused in a row by the rate limit.
    refused: u32,
    /// Last frame from the client (any frame: a pong counts), for idle_timeout.
    last_seen: Instant,
    /// Our Close frame went out: wait for the peer's before dropping.
    sent_close: bool,
    /// The peer sent its Close (we echoed it).
    peer_closed: bool,
    sent: SentTally,
    ctx: Arc<SessionCtx>,
    /// Frames waiting for the next write.
    out: Vec<Bytes>,
    /// Subscriptions by a small per-connection id: the live stream yields
    /// the key with every frame, and an integer costs nothing to copy.
    subs: HashMap<SubId, Sub>,
    /// Market name -> id, for ops.
    ids: HashMap<String, SubId>,
    live: StreamMap<SubId, BroadcastStream<EncodedTrade>>,
    next_id: SubId,
    conn_id: u64,
    /// Checked between replay pages, so a long replay never outlives shutdown.
    shutdown: CancellationToken,
}

type SubId = u32;

impl Session {
    async fn run(&mut self, initial: Option<Result<Op, ErrorReply>>, shutdown: CancellationToken) {
        let mut ping = tokio::time::interval(self.ctx.cfg.ping_interval);
        ping.tick().await;
        let mut retry = tokio::time::interval(Duration::from_secs(1));
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Created once: a fresh `cancelled()` per turn registers and
        // unregisters a waiter every time, which showed in profiles.
        let cancelled = shutdown.cancelled();
        tokio::pin!(cancelled);
        let mut turn: u32 = 0;
        let result: Result<(), End> = async {
            // The URL's subscribe is handled exactly like one sent as a
            // message, socket failures during its replay included.
            match initial {
                Some(Ok(op)) => Box::pin(self.on_op(op)).await?,
                Some(Err(e)) => self.out.push(e.frame()),
                None => {}
            }
            loop {
                if !self.out.is_empty() {
                    self.flush().await?;
                }
                turn = turn.wrapping_add(1);
                // Fast path: while live frames are ready, take them without
                // polling the control side; every CONTROL_EVERY-th turn (and
                // whenever nothing is ready) the full select below runs, so
                // client frames, pings and shutdown wait at most a few batches.
                if turn % CONTROL_EVERY != 0 && !self.live.is_empty() {
                    if let Some(Some((id, item))) = self.live.next().now_or_never() {
                        self.on_live(id, item).await?;
                        self.coalesce().await?;
                        continue;
                    }
                }
                // Cancel safety: FrameReader::next keeps its progress in
                // `self.frames`; StreamMap::next (a Stream), ticks and the
                // pinned token future are cancel-safe; no branch holds
                // partial state across an await.
                tokio::select! {
                    biased;
                    _ = &mut cancelled => {
                        self.close_now(1001, "server shutting down").await;
                        return Ok(());
                    }
                    m = self.frames.next(&mut self.io) => {
                        if !self.on_inbound(m).await? {
                            return Ok(());
                        }
                    }
                    Some((id, item)) = self.live.next(), if !self.live.is_empty() => {
                        self.on_live(id, item).await?;
                        self.coalesce().await?;
                    }
                    _ = retry.tick(), if self.subs.values().any(|s| s.next <= s.want) => {
                        let pending: Vec<SubId> = self.subs.iter().filter(|(_, s)| s.next <= s.want).map(|(k, _)| *k).collect();
                        for id in pending {
                            Box::pin(self.fill(id)).await?;
                        }
                    }
                    _ = ping.tick() => {
                        if self.last_seen.elapsed() > self.ctx.cfg.idle_timeout {
                            self.close_now(1000, "idle timeout").await;
                            return Ok(());
                        }
                        self.out.push(control_frame(Frame::new(true, OpCode::Ping, None, Payload::Borrowed(b"mc"))));
                    }
                }
            }
        }
        .await;
        match result {
            Err(End::Slow) => {
                metrics::counter!("marketcast_slow_consumer_closes_total").increment(1);
                tracing::info!(conn = self.conn_id, "closing a slow consumer (4000)");
                // `out` holds at most the tail of a half-written frame (see flush).
                self.close_now(4000, "slow consumer: reconnect with from_seq")
                    .await;
            }
            Err(End::Shutdown) => self.close_now(1001, "server shutting down").await,
            Ok(()) | Err(End::Gone) => {}
        }
    }

    /// A client frame, or the end of reading. `Ok(false)`: the connection
    /// is over (our Close is out, or the peer closed or vanished).
    async fn on_inbound(&mut self, m: Result<Inbound, ReadError>) -> Result<bool, End> {
        let m = match m {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(conn = self.conn_id, error = ?e, "websocket read ended");
                match e.close_code() {
                    Some((code, reason)) => self.close_now(code, reason).await,
                    // The peer is gone: whatever is queued has nowhere to go.
                    None => return Err(End::Gone),
                }
                return Ok(false);
            }
        };
        self.last_seen = Instant::now();
        let payload = match m {
            Inbound::Text(p) => p,
            Inbound::Pong => return Ok(true),
            Inbound::Ping(pong) => {
                self.out.push(pong);
                return Ok(true);
            }
            Inbound::Close(echo) => {
                // The closing handshake, peer first: echo its code and end.
                self.peer_closed = true;
                self.out.push(echo);
                self.flush().await?;
                let _ = self.io.shutdown().await; // the peer may already be gone
                return Ok(false);
            }
            Inbound::Binary => {
                self.close_now(1008, "binary frames are not accepted").await;
                return Ok(false);
            }
        };
        if self.rate.allow(Instant::now()) {
            self.refused = 0;
            match parse_op(&payload) {
                // Boxed: an op's future (subscribe, log reads) is large and
                // rare; inline, every idle connection would carry its state.
                Ok(op) => Box::pin(self.on_op(op)).await?,
                Err(e) => self.out.push(e.frame()),
            }
        } else {
            self.refused += 1;
            // Sustained abuse: a client still sending after a full burst of
            // refusals is not going to slow down.
            if self.refused > self.rate.burst as u32 {
                self.close_now(1008, "rate limit exceeded").await;
                return Ok(false);
            }
            let id = serde_json::from_slice::<Value>(&payload)
                .ok()
                .and_then(|v| v.get("id").cloned());
            self.out
                .push(ErrorReply::new(id, "rate_limited", "too many messages; slow down").frame());
        }
        Ok(true)
    }

    /// Take whatever live frames are already queued, up to one write's worth.
    async fn coalesce(&mut self) -> Result<(), End> {
        while self.out.len() < WRITE_BATCH_FRAMES {
            match self.live.next().now_or_never() {
                Some(Some((id, item))) => self.on_live(id, item).await?,
                _ => break,
            }
        }
        Ok(())
    }

    /// Write every queued frame, in order, in as few syscalls as the kernel
    /// allows. Bounded by write_timeout: past it the client is a slow consumer.
    async fn flush(&mut self) -> Result<(), End> {
        let frames = std::mem::take(&mut self.out);
        let bytes: usize = frames.iter().map(Bytes::len).sum();
        let mut written = 0;
        let fut = write_all_vectored(&mut self.io, &frames, &mut written);
        match tokio::time::timeout(self.ctx.cfg.write_timeout, fut).await {
            Ok(Ok(writes)) => {
                self.sent.add(frames.len() as u64, bytes as u64, writes);
                // Reuse the allocation unless a burst grew it.
                let mut frames = frames;
                frames.clear();
                if frames.capacity() <= WRITE_BATCH_FRAMES {
                    self.out = frames;
                }
                Ok(())
            }
            Ok(Err(_)) => Err(End::Gone),
            Err(_) => {
                // The write stopped mid-stream. The Close that follows must not
                // land inside a half-written frame: keep that frame's tail.
                self.out = partial_tail(&frames, written).into_iter().collect();
                Err(End::Slow)
            }
        }
    }

    /// Best effort: queue a Close after whatever is queued, try for a while
    /// to get it out (a slow consumer may still drain its socket), then shut
    /// down the write side.
    async fn close_now(&mut self, code: u16, reason: &str) {
        self.out
            .push(control_frame(Frame::close(code, reason.as_bytes())));
        let frames = std::mem::take(&mut self.out);
        let w = &mut self.io;
        self.sent_close = true;
        let mut written = 0;
        // A slow consumer may start reading again and deserves its code; at
        // shutdown the whole process waits, so the wait is short.
        let linger = if self.shutdown.is_cancelled() {
            Duration::from_secs(1)
        } else {
            CLOSE_LINGER
        };
        let _ = tokio::time::timeout(linger, async {
            write_all_vectored(w, &frames, &mut written).await?;
            w.shutdown().await
        })
        .await; // The peer may be gone or stuck; the connection ends either way.
    }

    async fn on_op(&mut self, op: Op) -> Result<(), End> {
        match op {
            Op::Ping { id } => {
                let mut m = Map::new();
                m.insert("type".into(), "pong".into());
                if let Some(id) = id {
                    m.insert("id".into(), id);
                }
                self.out.push(json_frame(&Value::Object(m)));
            }
            Op::Unsubscribe { market, id } => {
                if let Some(&sid) = self.ids.get(&market) {
                    self.end_sub(sid);
                    let mut m = json!({"type": "unsubscribed", "market": market});
                    if let Some(id) = id {
                        m["id"] = id;
                    }
                    self.out.push(json_frame(&m));
                } else {
                    self.out.push(
                        ErrorReply::new(
                            id,
                            "not_subscribed",
                            format!("not subscribed to {market}"),
                        )
                        .frame(),
                    );
                }
            }
            Op::Subscribe {
                market,
                from_seq,
                epoch,
                id,
            } => match self
                .subscribe(&market, from_seq, epoch.as_deref(), id.clone())
                .await
            {
                // The replay owed since from_seq. A socket failure here must
                // end the connection (the frames taken by the failed write are
                // gone while `next` moved past them), so it propagates.
                Ok(sid) => self.fill(sid).await?,
                Err(e) => self.out.push(e.frame()),
            },
        }
        Ok(())
    }

    async fn subscribe(
        &mut self,
        market: &str,
        from_seq: Option<i64>,
        epoch: Option<&str>,
        id: Option<Value>,
    ) -> Result<SubId, ErrorReply> {
        let err = |code, msg: String| ErrorReply::new(id.clone(), code, msg);
        if self.ids.contains_key(market) {
            return Err(err(
                "already_subscribed",
                format!("already subscribed to {market}; unsubscribe first to change from_seq"),
            ));
        }
        if self.subs.len() >= self.ctx.cfg.max_subscriptions {
            return Err(err(
                "too_many_subscriptions",
                format!(
                    "at most {} subscriptions per connection",
                    self.ctx.cfg.max_subscriptions
                ),
            ));
        }
        let unavailable =
            |e: db::DbError| err("unavailable", format!("database unavailable, retry: {e}"));
        let pool = &self.ctx.pool;
        let timeout = self.ctx.cfg.db.timeout;
        let m = db::bounded(timeout, async {
            let c = pool.get().await?;
            db::market(&**c, market).await
        })
        .await
        .map_err(unavailable)?
        .ok_or_else(|| err("unknown_market", format!("no market named {market}")))?;
        if !self.ctx.shards.contains(&(m.shard as u32)) {
            let mut e = err(
                "wrong_shard",
                format!(
                    "market {market} is on shard {} which this broadcaster does not serve",
                    m.shard
                ),
            )
            .with("shard", m.shard.into());
            if let Some(t) = &self.ctx.cfg.shard_url_template {
                e = e.with("url", t.replace("{shard}", &m.shard.to_string()).into());
            }
            return Err(e);
        }
        if let Some(ep) = epoch {
            if ep != m.epoch {
                return Err(err(
                    "epoch_mismatch",
                    format!("market {market} is at epoch {}, not {ep}", m.epoch),
                )
                .with("epoch", m.epoch.clone().into()));
            }
        }
        let head = m.head_seq;
        let (shared, rx) = self
            .ctx
            .hub
            .join(market, head)
            .await
            .ok_or_else(|| err("unavailable", "broadcaster shutting down".into()))?;
        let next = from_seq.map_or(head + 1, |f| f + 1);
        if next <= head
            && shared
                .ring
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .first_seq()
                .is_none_or(|f| f > next)
        {
            let earliest = db::bounded(timeout, async {
                let c = pool.get().await?;
                db::earliest_seq(&**c, market).await
            })
            .await
            .map_err(unavailable)?;
            let earliest = earliest.unwrap_or(head + 1);
            if earliest > next {
                return Err(err("history_unavailable", format!("trades before seq {earliest} of {market} were pruned; subscribe with from_seq >= {}", earliest - 1)).with("earliest_seq", earliest.into()));
            }
        }
        let mut reply = json!({
            "type": "subscribed",
            "market": market,
            "epoch": m.epoch,
            "head_seq": head,
            "last_price": m.last_price,
            "volume": m.volume,
        });
        if let Some(id) = id {
            reply["id"] = id;
        }
        self.out.push(json_frame(&reply));
        // Everything the hub publishes from now on reaches `rx`; everything it
        // published before is at most shared.head() and is filled below.
        let want = head.max(shared.head());
        let sid = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        self.subs.insert(
            sid,
            Sub {
                market: market.to_string(),
                shared,
                next,
                want,
            },
        );
        self.ids.insert(market.to_string(), sid);
        self.live.insert(sid, BroadcastStream::new(rx));
        metrics::gauge!("marketcast_subscriptions").increment(1.0);
        tracing::debug!(conn = self.conn_id, market, next, head, "subscribed");
        Ok(sid)
    }

    fn end_sub(&mut self, sid: SubId) {
        if let Some(sub) = self.subs.remove(&sid) {
            self.ids.remove(&sub.market);
            self.live.remove(&sid);
            metrics::gauge!("marketcast_subscriptions").decrement(1.0);
        }
    }

    async fn on_live(
        &mut self,
        sid: SubId,
        item: Result<EncodedTrade, tokio_stream::wrappers::errors::BroadcastStreamRecvError>,
    ) -> Result<(), End> {
        let Some(sub) = self.subs.get_mut(&sid) else {
            return Ok(());
        };
        match item {
            Ok(t) if t.seq < sub.next => Ok(()), // already sent (by a fill)
            Ok(t) if t.seq == sub.next => {
                sub.next += 1;
                sub.want = sub.want.max(t.seq);
                self.out.push(t.frame);
                Ok(())
            }
            Ok(t) => {
                // Ahead of what the client has: fill in order first; the ring
                // already holds this trade, so the fill includes it.
                sub.want = sub.want.max(t.seq);
                // Boxed: a fill may read the log, a large future that every
                // connection would otherwise carry inline while idle.
                Box::pin(self.fill(sid)).await
            }
            // The live queue overflowed for this subscriber (it is slower than
            // the market). Nothing to do now: the next trade received is above
            // `next` and triggers a fill from the ring or the log.
            Err(_lagged) => Ok(()),
        }
    }

    /// Send `next..=want` from the ring or the log, a page at a time.
    async fn fill(&mut self, sid: SubId) -> Result<(), End> {
        loop {
            if self.shutdown.is_cancelled() {
                return Err(End::Shutdown);
            }
            let Some(sub) = self.subs.get(&sid) else {
                return Ok(());
            };
            let market = sub.market.clone();
            let market = market.as_str();
            if sub.next > sub.want {
                return Ok(());
            }
            let (after, upto) = (sub.next - 1, sub.want);
            let page_cap = self.ctx.cfg.replay_page;
            let from_ring = sub
                .shared
                .ring_range(after, upto.min(after + page_cap as i64));
            let (page, source) = match from_ring {
                Some(p) => (p, "memory"),
                None => {
                    let pool = &self.ctx.pool;
                    let read = db::bounded(self.ctx.cfg.db.timeout, async {
                        let c = pool.get().await?;
                        db::trade_frames_after(&c, market, after, Some(upto), page_cap as i64).await
                    })
                    .await;
                    match read {
                        Ok(rows) => (rows, "postgres"),
                        Err(e) => {
                            // Retried by the run loop every second; never skip.
                            tracing::debug!(conn = self.conn_id, market, error = %e, "fill deferred: database unavailable");
                            return Ok(());
                        }
                    }
                }
            };
            if page.first().map(|t| t.seq) != Some(after + 1) {
                // The log no longer has `after + 1` (pruned meanwhile): the
                // guarantee cannot be kept for this subscription.
                let earliest = page.first().map(|t| t.seq).unwrap_or(upto + 1);
                self.end_sub(sid);
                self.out.push(
                    ErrorReply::new(
                        None,
                        "history_unavailable",
                        format!(
                            "trades of {market} after seq {after} were pruned; subscription ended"
                        ),
                    )
                    .with("earliest_seq", earliest.into())
                    .with("market", market.into())
                    .frame(),
                );
                return Ok(());
            }
            metrics::counter!("marketcast_replayed_trades_total", "source" => source)
                .increment(page.len() as u64);
            let sub = self.subs.get_mut(&sid).expect("checked above");
            for t in page {
                if t.seq != sub.next {
                    break; // contiguity checked per page start; defensive
                }
                sub.next += 1;
                self.out.push(t.frame);
            }
            self.flush().await?;
        }
    }
}

/// Most slices handed to one `writev` (Linux takes up to 1024). The array
/// is built on the stack inside each poll, never kept in the session's
/// future, so it costs an idle connection nothing; 256 frames of ~180 bytes
/// make one write of ~45 KiB, and a full batch (`WRITE_BATCH_FRAMES`) two.
const MAX_IOV: usize = 256;

/// Write all frames with vectored writes; returns the number of syscalls.
/// `written` counts bytes as they go out, so that a caller whose timeout
/// cancelled this future knows where the stream stopped.
async fn write_all_vectored<W: AsyncWrite + Unpin>(
    w: &mut W,
    frames: &[Bytes],
    written: &mut usize,
) -> std::io::Result<u64> {
    let (mut i, mut off) = (0, 0); // first frame not fully written, bytes of it written
    let mut writes = 0;
    while i < frames.len() {
        let n = std::future::poll_fn(|cx| {
            // SmallVec, not an array: only the slices used are written (an
            // initialised [IoSlice; 256] was a 4 KiB memset per poll, 3% of
            // the fan-out CPU in perf).
            let iov: SmallVec<[IoSlice<'_>; MAX_IOV]> = frames[i..]
                .iter()
                .take(MAX_IOV)
                .enumerate()
                .map(|(k, f)| IoSlice::new(if k == 0 { &f[off..] } else { f }))
                .collect();
            std::pin::Pin::new(&mut *w).poll_write_vectored(cx, &iov)
        })
        .await?;
        writes += 1;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        *written += n;
        let mut left = n;
        while left > 0 {
            let rest = frames[i].len() - off;
            if left >= rest {
                left -= rest;
                i += 1;
                off = 0;
            } else {
                off += left;
                left = 0;
            }
        }
    }
    Ok(writes)
}

/// The unwritten rest of the frame that `written` bytes ended inside, if any.
fn partial_tail(frames: &[Bytes], written: usize) -> Option<Bytes> {
    let mut start = 0;
    for f in frames {
        let end = start + f.len();
        if written < end {
            return (written > start).then(|| f.slice(written - start..));
        }
        start = end;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_parse_strictly() {
        assert_eq!(
            parse_op(br#"{"op":"subscribe","market":"M","from_seq":5,"epoch":"e1","id":7}"#)
                .unwrap(),
            Op::Subscribe {
                market: "M".into(),
                from_seq: Some(5),
                epoch: Some("e1".into()),
                id: Some(json!(7))
            }
        );
        assert_eq!(
            parse_op(br#"{"op":"ping","id":"x"}"#).unwrap(),
            Op::Ping {
                id: Some(json!("x"))
            }
        );
        assert_eq!(
            parse_op(br#"{"op":"unsubscribe","market":"M"}"#).unwrap(),
            Op::Unsubscribe {
                market: "M".into(),
                id: None
            }
        );
        let code = |m: &[u8]| parse_op(m).unwrap_err().code;
        assert_eq!(code(b"nope"), "bad_request");
        assert_eq!(code(b"[1]"), "bad_request");
        assert_eq!(code(br#"{"market":"M"}"#), "bad_request");
        assert_eq!(code(br#"{"op":"subscribe"}"#), "bad_request");
        assert_eq!(code(br#"{"op":"subscribe","market":1}"#), "bad_request");
        assert_eq!(
            code(br#"{"op":"subscribe","market":"M","from_seq":-1}"#),
            "bad_request"
        );
        assert_eq!(
            code(br#"{"op":"subscribe","market":"M","from_seq":"3"}"#),
            "bad_request"
        );
        assert_eq!(
            code(br#"{"op":"subscribe","market":"M","from_seq":1.5}"#),
            "bad_request"
        );
        assert_eq!(
            code(br#"{"op":"subscribe","market":"M","from_seq":9223372036854775807}"#),
            "bad_request",
            "from_seq + 1 must not overflow"
        );
        assert_eq!(code(br#"{"op":"ping","id":[1]}"#), "bad_request");
        assert_eq!(code(br#"{"op":"dance","id":3}"#), "unknown_op");
        assert_eq!(
            parse_op(br#"{"op":"dance","id":3}"#).unwrap_err().id,
            Some(json!(3))
        );
    }

    #[tokio::test]
    async fn vectored_writes_survive_short_writes() {
        // A writer that takes at most 7 bytes per call, across frame borders.
        struct Dribble(Vec<u8>);
        impl AsyncWrite for Dribble {
            fn poll_write(
                mut self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
                b: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                let n = b.len().min(7);
                self.0.extend_from_slice(&b[..n]);
                std::task::Poll::Ready(Ok(n))
            }
            fn poll_flush(
                self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::task::Poll::Ready(Ok(()))
            }
            fn poll_shutdown(
                self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::task::Poll::Ready(Ok(()))
            }
        }
        let frames: Vec<Bytes> = (0..100)
            .map(|i| Bytes::from(format!("frame-{i};")))
            .collect();
        let want: Vec<u8> = frames.iter().flat_map(|f| f.to_vec()).collect();
        let mut w = Dribble(Vec::new());
        let mut written = 0;
        write_all_vectored(&mut w, &frames, &mut written)
            .await
            .unwrap();
        assert_eq!(w.0, want);
        assert_eq!(written, want.len());
    }

    #[test]
    fn partial_tails() {
        let f = [Bytes::from_static(b"abc"), Bytes::from_static(b"defg")];
        assert_eq!(partial_tail(&f, 0), None);
        assert_eq!(partial_tail(&f, 3), None, "a frame boundary");
        assert_eq!(partial_tail(&f, 1), Some(Bytes::from_static(b"bc")));
        assert_eq!(partial_tail(&f, 5), Some(Bytes::from_static(b"fg")));
        assert_eq!(partial_tail(&f, 7), None);
    }

    #[test]
    fn rate_limit_allows_a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut rl = RateLimit::new(10, 5, t0);
        assert_eq!((0..10).filter(|_| rl.allow(t0)).count(), 5);
        assert!(
            rl.allow(t0 + Duration::from_millis(100)),
            "one token per 100ms"
        );
        assert!(!rl.allow(t0 + Duration::from_millis(100)));
    }
}
