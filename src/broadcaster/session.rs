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
//! The per-subscription rule that gives the delivery guarantee is the pure
//! [`subscription::Position`]; [`replay`] starts subscriptions and fills
//! their gaps, [`outbound`] writes, [`inbound`] reads, [`rate_limit`] bounds
//! client ops.
//!
//! A client whose socket does not accept a write within `write_timeout` is a
//! slow consumer and is closed with 4000; it reconnects with `from_seq` and
//! loses nothing. Memory per connection stays bounded whatever the client
//! does: the live queue is shared per market, and fills go a page at a time.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use deadpool_postgres::Pool;
use fastwebsockets::{Frame, OpCode, Payload};
use futures_util::FutureExt;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::{StreamExt, StreamMap};
use tokio_util::sync::CancellationToken;

use super::hub::{HubHandle, MarketShared};
use crate::config::SessionConfig;
use crate::protocol::client::{self, parse_op, Entry, ErrorReply, Limits, Op};
use crate::protocol::frame::control_frame;
use crate::protocol::token::Grant;

mod heads;
mod inbound;
mod live;
mod outbound;
mod rate_limit;
mod replay;
pub(crate) mod sse;
pub mod subscription;
mod ticker;

pub use inbound::{parse_head, FrameReader, Inbound, ReadError};
pub(crate) use live::{LiveItem, LiveStream};
use outbound::SentTally;
use rate_limit::RateLimit;
pub(crate) use replay::{open, Opened};
use subscription::{Live, Position, TickerPosition};

/// Frames queued before the session stops draining and writes. Bounds one
/// vectored write (the kernel takes at most 1024 slices anyway).
const WRITE_BATCH_FRAMES: usize = 512;

/// How long a closed connection keeps reading for the peer's Close reply.
const CLOSE_HANDSHAKE: Duration = Duration::from_secs(2);

/// After a protocol error, the raw bytes still arriving are discarded until
/// none has come for this long: what was in flight, not a stream the peer
/// keeps up to hold its slot.
const DRAIN_IDLE: Duration = Duration::from_millis(20);

/// ... and at most this many of them.
const DRAIN_MAX_BYTES: usize = 64 * 1024;

/// The session's fast path polls only live data; every this many turns it
/// also looks at ops, timers and shutdown (see `Session::run`).
const CONTROL_EVERY: u32 = 8;

/// How long a closing connection may take to get its Close frame out (a slow
/// consumer that starts reading again still learns why it was closed).
const CLOSE_LINGER: Duration = Duration::from_secs(10);

/// What every session shares.
pub(crate) struct SessionCtx {
    pub cfg: SessionConfig,
    /// `--replay-page`: most trades per fill page.
    pub replay_page: usize,
    /// `--db-timeout`: bound on each database step of a subscribe or fill.
    pub db_timeout: Duration,
    /// `--shard-url-template`, for `wrong_shard`'s `url`.
    pub shard_url_template: Option<String>,
    /// The live registry entries, for `wrong_shard`'s `broadcasters`.
    pub directory: crate::db::registry::Directory,
    pub pool: Pool,
    /// Where replays read the log: the replica as far as it has the trades,
    /// else this pool (contract 1.1 section 5.4).
    pub replay: Arc<super::replica::ReplayReads>,
    pub hub: HubHandle,
    pub shards: BTreeSet<u32>,
    /// Open connections, for the limit (1013) and the gauge.
    pub connections: AtomicU64,
    /// What ops are checked against (`--max-subscriptions`, `--max-recent`,
    /// `--min-ticker-interval`).
    pub limits: Limits,
    /// Token keys and `--require-token`: the `auth` op verifies with them.
    pub tokens: crate::config::TokenConfig,
    /// Whether the broadcaster is healthy (its /healthz would answer 200):
    /// heads are sent only then, so their silence means a stale feed.
    pub health: Health,
}

/// What /healthz reports, readable without an await.
#[derive(Clone)]
pub(crate) struct Health {
    pub listen_up: Arc<std::sync::atomic::AtomicBool>,
    pub hub_alive: Arc<std::sync::atomic::AtomicBool>,
    pub db: crate::db::health::Health,
}

impl Health {
    pub fn ok(&self) -> bool {
        self.listen_up.load(Ordering::Acquire)
            && self.hub_alive.load(Ordering::Acquire)
            && self.db.ok_now()
    }
}

/// Unix time in whole seconds, for token checks.
pub(crate) fn unix_now() -> i64 {
    unix_now_f64().floor() as i64
}

fn unix_now_f64() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Run one SSE stream to its end: the subscription [`replay::open`]
/// checked (before the 200 went out) is attached and its backlog sent, then
/// it is followed like a WebSocket's until it ends, the token expires or the
/// server shuts down. The stream was counted against `--max-connections` by
/// the caller, before any database work; it is released here.
pub(crate) async fn run_sse(
    out: sse::SseOut,
    ctx: Arc<SessionCtx>,
    grant: Option<Box<Grant>>,
    entry: Entry,
    opened: Opened,
    shutdown: CancellationToken,
    conn_id: u64,
) {
    metrics::gauge!("marketcast_sse_streams").increment(1.0);
    let mut s = Session::new(Transport::Sse(out), ctx, shutdown.clone(), conn_id);
    s.bind(grant);
    let sid = s.attach(&entry, opened, None).await;
    match s.fill(sid).await {
        Ok(()) => s.run(None, shutdown).await,
        Err(End::Slow) => s.close_now(4000, "slow consumer").await,
        Err(End::Shutdown) => s.close_now(1001, "server shutting down").await,
        Err(End::Gone | End::TokenExpired) => {}
    }
}

impl Session {
    fn new(io: Transport, ctx: Arc<SessionCtx>, shutdown: CancellationToken, conn_id: u64) -> Self {
        Session {
            io,
            frames: FrameReader::new(ctx.cfg.max_message_bytes),
            rate: RateLimit::new(ctx.cfg.rate_per_sec, ctx.cfg.rate_burst, Instant::now()),
            refused: 0,
            deferred_pong: None,
            last_seen: Instant::now(),
            sent_close: false,
            peer_closed: false,
            sent: SentTally::default(),
            ctx,
            out: Vec::new(),
            subs: HashMap::new(),
            ids: HashMap::new(),
            live: StreamMap::new(),
            timers: None,
            grant: None,
            next_id: 0,
            conn_id,
            shutdown,
        }
    }
}

/// Run one upgraded connection to its end. `initial` is the subscribe from
/// the URL's query, handled as if it were the first op.
pub(crate) async fn run(
    // fastwebsockets did the handshake: its `WebSocket` is not kept (S3).
    io: TokioIo<Upgraded>,
    ctx: Arc<SessionCtx>,
    grant: Option<Box<Grant>>,
    initial: Option<Box<Result<Op, ErrorReply>>>,
    shutdown: CancellationToken,
    conn_id: u64,
) {
    let open = ctx.connections.fetch_add(1, Ordering::AcqRel) + 1;
    metrics::gauge!("marketcast_ws_connections").increment(1.0);
    let over_limit = open as usize > ctx.cfg.max_connections;

    // fastwebsockets did the handshake; from here frames are read by
    // `inbound` (no buffer kept while idle) and written pre-encoded, vectored.
    let mut s = Session::new(Transport::Ws(io), ctx, shutdown.clone(), conn_id);
    s.bind(grant);
    if over_limit {
        Box::pin(s.close_now(1013, "server overloaded: connection limit reached")).await;
    } else {
        s.run(initial, shutdown).await;
    }
    // The closing handshake: our Close is out; keep reading until the peer's
    // Close (or EOF) so that its last frames, a pong say, are not left
    // unread. Dropping a socket with unread input sends a RST, and the peer
    // may then lose our Close frame and never learn the code (RFC 6455
    // section 7.1.1).
    if s.sent_close && !s.peer_closed {
        // Boxed: the drain's state would otherwise be part of every idle
        // session's future (S3 measured 7.3 against 4.1 KiB per connection).
        let _ = tokio::time::timeout(CLOSE_HANDSHAKE, Box::pin(s.drain())).await;
        // Past the deadline the socket is dropped anyway.
    }
    // Slots, gauges and tallies are released by Session's Drop, on every
    // exit path, a panic included.
}

/// One subscription.
struct Sub {
    market: String,
    shared: Arc<MarketShared>,
    /// Where the client is in the market's seq, and what it is owed.
    kind: Kind,
    /// The highest seq known to exist when it was last looked at (the
    /// subscribe's head, then the hub's): a `head` never says more.
    known: i64,
    /// Some when the subscription asked for heads and they are on.
    heads: Option<heads::Clock>,
}

enum Kind {
    Trades(Position),
    /// Boxed: a `TickerPosition` is seven times a `Position`, and every
    /// subscription of every connection would carry its size (the
    /// connection's map of subscriptions allocates four at once). S3
    /// measured 4.93 KiB per idle subscribed connection unboxed.
    Ticker {
        pos: Box<TickerPosition>,
    },
}

impl Sub {
    /// The client's position: the last seq (or `to_seq`) sent.
    fn position(&self) -> i64 {
        match &self.kind {
            Kind::Trades(p) => p.next() - 1,
            Kind::Ticker { pos } => pos.sent(),
        }
    }

    /// Whether something this subscription is owed waits for a fill.
    fn owed(&self) -> bool {
        match &self.kind {
            Kind::Trades(p) => p.owed(),
            Kind::Ticker { .. } => false,
        }
    }
}

enum End {
    /// The socket failed or the peer went away.
    Gone,
    /// A write did not finish within write_timeout.
    Slow,
    /// The server is shutting down (noticed between replay pages).
    Shutdown,
    /// The connection's token expired without a refresh: close 4001.
    TokenExpired,
}

/// One connection: a single task owns the socket, reads client frames and
/// writes everything else. Client frames are read in the same `select!` as
/// live trades, which is safe because [`FrameReader`] keeps every byte it
/// has read; one task and no channel keep an idle connection small
/// (`docs/BENCHMARKS.md`, S3).
struct Session {
    io: Transport,
    frames: FrameReader,
    rate: RateLimit,
    /// Ops and pings refused in a row by the rate limit.
    refused: u32,
    /// The pong to the latest ping refused by the rate limit, sent with the
    /// next server ping.
    deferred_pong: Option<Bytes>,
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
    live: StreamMap<SubId, LiveStream>,
    /// Heads, held ticker folds and the token's expiry: Some while
    /// something needs them (boxed: an idle v1 connection carries no timer).
    timers: Option<Box<heads::Timers>>,
    /// The connection's token: it binds subscribes to its `markets` and
    /// closes the connection with 4001 when it expires. None: no token (any
    /// market, never 4001).
    grant: Option<Box<Grant>>,
    next_id: SubId,
    conn_id: u64,
    /// Checked between replay pages, so a long replay never outlives shutdown.
    shutdown: CancellationToken,
}

type SubId = u32;

/// Where the session's frames go.
enum Transport {
    /// A WebSocket: frames are written as they are; client frames are read.
    Ws(TokioIo<Upgraded>),
    /// An SSE response: frames become events; nothing is read.
    Sse(sse::SseOut),
}

/// The next client frame; never, on an SSE stream. Cancel safety: as
/// [`FrameReader::next`].
async fn read_frame(frames: &mut FrameReader, io: &mut Transport) -> Result<Inbound, ReadError> {
    match io {
        Transport::Ws(io) => frames.next(io).await,
        Transport::Sse(_) => std::future::pending().await,
    }
}

/// What the op rate limit says of one client message.
enum Admit {
    Yes,
    /// Refused this time (`rate_limited`; a ping's pong waits).
    Later,
    /// A full burst refused in a row: close 1008.
    Never,
}

/// Whatever way the session ends, its connection slot (`--max-connections`),
/// its gauges and its unpublished tallies go with it: a session that
/// panicked used to keep its slot for ever.
impl Drop for Session {
    fn drop(&mut self) {
        self.sent.publish();
        metrics::gauge!("marketcast_subscriptions").decrement(self.subs.len() as f64);
        self.ctx.connections.fetch_sub(1, Ordering::AcqRel);
        match self.io {
            Transport::Ws(_) => metrics::gauge!("marketcast_ws_connections").decrement(1.0),
            Transport::Sse(_) => metrics::gauge!("marketcast_sse_streams").decrement(1.0),
        }
    }
}

impl Session {
    async fn run(
        &mut self,
        initial: Option<Box<Result<Op, ErrorReply>>>,
        shutdown: CancellationToken,
    ) {
        // An SSE stream has no pings: the tick writes its keep-alive
        // comment instead, checked four times per --sse-keepalive.
        let keepalive = self.ctx.cfg.sse_keepalive;
        let mut ping = tokio::time::interval(match self.io {
            Transport::Sse(_) => keepalive / 4,
            Transport::Ws(_) => self.ctx.cfg.ping_interval,
        });
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
            match initial.map(|b| *b) {
                Some(Ok(op)) => Box::pin(self.on_op(op)).await?,
                Some(Err(e)) => self.reply_error(e),
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
                        Box::pin(self.close_now(1001, "server shutting down")).await;
                        return Ok(());
                    }
                    m = read_frame(&mut self.frames, &mut self.io) => {
                        if !Box::pin(self.on_inbound(m)).await? {
                            return Ok(());
                        }
                    }
                    Some((id, item)) = self.live.next(), if !self.live.is_empty() => {
                        self.on_live(id, item).await?;
                        self.coalesce().await?;
                    }
                    fired = heads::Timers::next(self.timers.as_deref_mut()), if self.timers.is_some() => {
                        Box::pin(self.on_timer(fired)).await?;
                    }
                    _ = retry.tick(), if self.subs.values().any(Sub::owed) => {
                        let pending: Vec<SubId> = self.subs.iter().filter(|(_, s)| s.owed()).map(|(k, _)| *k).collect();
                        for id in pending {
                            Box::pin(self.fill(id)).await?;
                        }
                    }
                    _ = ping.tick() => {
                        if let Transport::Sse(out) = &mut self.io {
                            // Not subject to --idle-timeout: nothing is read.
                            Box::pin(out.keepalive(keepalive, self.ctx.cfg.write_timeout))
                                .await
                                .map_err(|_stuck| End::Slow)?;
                            continue;
                        }
                        if self.last_seen.elapsed() > self.ctx.cfg.idle_timeout {
                            Box::pin(self.close_now(1000, "idle timeout")).await;
                            return Ok(());
                        }
                        self.out.extend(self.deferred_pong.take());
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
                Box::pin(self.close_now(4000, "slow consumer: reconnect with from_seq")).await;
            }
            Err(End::Shutdown) => Box::pin(self.close_now(1001, "server shutting down")).await,
            Err(End::TokenExpired) => Box::pin(self.close_now(4001, "token expired")).await,
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
                // A ping costs a token like an op: a client cannot make the
                // server answer without bound. Within the limit it is
                // answered at once; beyond it the pong waits for the next
                // server ping (only the latest: RFC 6455 section 5.5.3 lets
                // an endpoint answer just the most recent ping), and a
                // sustained flood is closed like any other.
                return Ok(match self.admit() {
                    Admit::Yes => {
                        self.deferred_pong = None;
                        self.out.push(pong);
                        true
                    }
                    Admit::Later => {
                        self.deferred_pong = Some(pong);
                        true
                    }
                    Admit::Never => {
                        self.close_now(1008, "rate limit exceeded").await;
                        false
                    }
                });
            }
            Inbound::Close(echo) => {
                // The closing handshake, peer first: echo its code and end.
                self.peer_closed = true;
                self.out.push(echo);
                self.flush().await?;
                if let Transport::Ws(io) = &mut self.io {
                    let _ = io.shutdown().await; // the peer may already be gone
                }
                return Ok(false);
            }
            Inbound::Binary => {
                self.close_now(1008, "binary frames are not accepted").await;
                return Ok(false);
            }
        };
        match self.admit() {
            Admit::Yes => match parse_op(&payload, &self.ctx.limits) {
                // Boxed: an op's future (subscribe, log reads) is large and
                // rare; inline, every idle connection would carry its state.
                Ok(op) => Box::pin(self.on_op(op)).await?,
                Err(e) => self.reply_error(e),
            },
            Admit::Later => {
                let id = client::message_id(&payload);
                self.reply_error(ErrorReply::new(
                    id,
                    "rate_limited",
                    "too many messages; slow down",
                ));
            }
            Admit::Never => {
                self.close_now(1008, "rate limit exceeded").await;
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The op rate limit, for ops and pings alike.
    fn admit(&mut self) -> Admit {
        if self.rate.allow(Instant::now()) {
            self.refused = 0;
            return Admit::Yes;
        }
        self.refused += 1;
        // Sustained abuse: a client still sending after a full burst of
        // refusals is not going to slow down.
        if self.refused > self.rate.burst as u32 {
            Admit::Never
        } else {
            Admit::Later
        }
    }

    /// After our Close: read until the peer's Close or EOF. Once the peer
    /// has broken the protocol (often why we closed) its frames cannot be
    /// parsed any more: discard raw bytes until EOF or until none have
    /// arrived for [`DRAIN_IDLE`], so that dropping the socket sends a FIN,
    /// not a reset that could destroy our Close before the peer reads it
    /// (RFC 6455 section 7.1.1). The caller bounds it all by CLOSE_HANDSHAKE.
    async fn drain(&mut self) {
        loop {
            let Transport::Ws(io) = &mut self.io else {
                return;
            };
            match self.frames.next(io).await {
                // A message over the size limit is not read, ever: that is
                // the limit's point (its payload may be any size).
                Ok(Inbound::Close(_)) | Err(ReadError::Gone(_) | ReadError::TooLarge) => return,
                Ok(_) => {}
                Err(_) => {
                    let mut scratch = vec![0u8; 4096];
                    let mut left = DRAIN_MAX_BYTES;
                    while left > 0 {
                        match tokio::time::timeout(DRAIN_IDLE, io.read(&mut scratch)).await {
                            Ok(Ok(n)) if n > 0 => left = left.saturating_sub(n),
                            _ => return,
                        }
                    }
                    return;
                }
            }
        }
    }

    async fn on_op(&mut self, op: Op) -> Result<(), End> {
        match op {
            Op::Ping { id } => self.out.push(client::pong(id)),
            Op::Auth { token, id } => self.on_auth(&token, id),
            Op::Unsubscribe { markets, id } => {
                for market in markets {
                    match self.ids.get(&market) {
                        Some(&sid) => {
                            self.end_sub(sid);
                            self.out.push(client::unsubscribed(&market, id.clone()));
                        }
                        None => self.reply_error(
                            ErrorReply::new(
                                id.clone(),
                                "not_subscribed",
                                format!("not subscribed to {market}"),
                            )
                            .with("market", market.into()),
                        ),
                    }
                }
            }
            // One entry at a time, each exactly as a single subscribe sent
            // at that point: one reply per entry, in order, and a market's
            // `subscribed` before its trades.
            Op::Subscribe { entries, id } => {
                for e in &entries {
                    match self.subscribe(e, id.clone()).await {
                        // The replay owed since from_seq. A socket failure here
                        // must end the connection (the frames taken by the failed
                        // write are gone while `next` moved past them), so it
                        // propagates.
                        Ok(sid) => self.fill(sid).await?,
                        Err(e) => self.reply_error(e),
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether this connection may read `market` (its token's `markets`;
    /// anything without a token).
    fn may_read(&self, market: &str) -> bool {
        self.grant
            .as_ref()
            .is_none_or(|g| g.markets.matches(market))
    }

    /// Bind the connection to a token: its markets from now on, and its
    /// expiry (4001 once `exp + leeway` has passed).
    fn bind(&mut self, grant: Option<Box<Grant>>) {
        let Some(grant) = grant else { return };
        let left = grant.valid_until as f64 - unix_now_f64();
        let at = Instant::now() + Duration::from_secs_f64(left.clamp(0.0, 1e9));
        self.timers().arm_expiry(at);
        self.grant = Some(grant);
    }

    /// `auth`: a valid token replaces the connection's; subscriptions it
    /// does not grant end with an unsolicited `forbidden`, the others go on
    /// untouched. An invalid one changes nothing.
    fn on_auth(&mut self, token: &str, id: Option<serde_json::Value>) {
        let Some(verifier) = &self.ctx.tokens.verifier else {
            return self.reply_error(ErrorReply::new(
                id,
                "invalid_token",
                "this broadcaster has no token keys",
            ));
        };
        let grant = match verifier.verify(token, unix_now()) {
            Ok(g) => g,
            Err(e) => {
                crate::http::count_auth_failure(e.reason());
                return self.reply_error(ErrorReply::new(id, "invalid_token", e.to_string()));
            }
        };
        self.out
            .push(client::authed(id, grant.exp, grant.sub.as_deref()));
        self.bind(Some(Box::new(grant)));
        let dropped: Vec<(String, SubId)> = self
            .ids
            .iter()
            .filter(|(m, _)| !self.may_read(m))
            .map(|(m, sid)| (m.clone(), *sid))
            .collect();
        for (market, sid) in dropped {
            self.end_sub(sid);
            crate::http::count_auth_failure("forbidden");
            self.reply_error(
                ErrorReply::new(
                    None,
                    "forbidden",
                    format!("the new token does not grant {market}; subscription ended"),
                )
                .with("market", market.into()),
            );
        }
    }

    /// Queue an `error` reply, counted by code.
    fn reply_error(&mut self, e: ErrorReply) {
        metrics::counter!("marketcast_client_errors_total", "code" => e.code).increment(1);
        self.out.push(e.frame());
    }

    fn end_sub(&mut self, sid: SubId) {
        if let Some(sub) = self.subs.remove(&sid) {
            self.ids.remove(&sub.market);
            self.live.remove(&sid);
            metrics::gauge!("marketcast_subscriptions").decrement(1.0);
        }
    }

    async fn on_live(&mut self, sid: SubId, item: LiveItem) -> Result<(), End> {
        let item = match item {
            LiveItem::Trade(t) => t,
            // Boxed: once per interval, and its state would otherwise be
            // part of every session's future, trade subscribers' included.
            LiveItem::Ticker(f) => return Box::pin(self.on_ticker(sid, f)).await,
        };
        let Some(sub) = self.subs.get_mut(&sid) else {
            return Ok(());
        };
        let Kind::Trades(pos) = &mut sub.kind else {
            return Ok(());
        };
        match item {
            Ok(t) if t.is_moved() => {
                // The market's live queue was replaced by a larger one:
                // follow the new one, then fill what was published on it
                // before this receiver existed.
                let rx = sub.shared.subscribe();
                pos.owe(sub.shared.head());
                self.live
                    .insert(sid, LiveStream::Trades(BroadcastStream::new(rx)));
                Box::pin(self.fill(sid)).await
            }
            Ok(t) => match pos.live(t.seq) {
                Live::Send => {
                    self.out.push(t.frame);
                    Ok(())
                }
                Live::Drop => Ok(()),
                // Boxed: a fill may read the log, a large future that every
                // connection would otherwise carry inline while idle.
                Live::Fill => Box::pin(self.fill(sid)).await,
            },
            // The live queue overflowed for this subscriber (it is slower than
            // the market). Nothing to do now: the next trade received is above
            // `next` and triggers a fill from the ring or the log.
            Err(_lagged) => Ok(()),
        }
    }
}
