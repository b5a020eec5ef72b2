//! A subscription's start and its catch-up: the subscribe op's checks in the
//! contract's order, the join with the hub, and the fills that send what a
//! [`Position`] is owed from the ring or the log, a page at a time.
//!
//! A fill that fails because Postgres is down is retried every second by the
//! session loop; the connection stays open. A page that no longer starts at
//! the seq owed (pruned meanwhile) ends the subscription with
//! `history_unavailable`: never a silent skip.

use serde_json::Value;
use tokio_stream::wrappers::BroadcastStream;

use std::sync::Arc;

use super::live::LiveStream;
use super::subscription::{Position, Pruned};
use super::{End, Kind, Session, SessionCtx, Sub, SubId};
use crate::broadcaster::hub::{Joined, LiveRx, MarketShared, Want};
use crate::db::{self, DbError};
use crate::protocol::client::{self, Entry, ErrorReply, Mode, Start};
use crate::protocol::market::Market;

impl Session {
    /// Check a subscribe for one market, in the contract's order, and start
    /// following it: `subscribed` is queued, and for a ticker its backlog
    /// frame. Err is the error reply (with `market`); nothing was started.
    /// A trades subscription's replay is the caller's [`Session::fill`].
    pub(super) async fn subscribe(
        &mut self,
        e: &Entry,
        id: Option<Value>,
    ) -> Result<SubId, ErrorReply> {
        let market = e.market.as_str();
        let err = |code, msg: String| {
            ErrorReply::new(id.clone(), code, msg).with("market", market.into())
        };
        if self.ids.contains_key(market) {
            return Err(err(
                "already_subscribed",
                format!("already subscribed to {market}; unsubscribe first to change from_seq"),
            ));
        }
        let max = self.ctx.cfg.max_subscriptions;
        if self.subs.len() >= max {
            return Err(err(
                "too_many_subscriptions",
                format!("at most {max} subscriptions per connection"),
            ));
        }
        // Before any lookup: a token learns nothing of markets it may not read.
        if !self.may_read(market) {
            crate::http::count_auth_failure("forbidden");
            return Err(err(
                "forbidden",
                format!("this connection's token does not grant {market}"),
            ));
        }
        let opened = open(&self.ctx, e, &id).await?;
        Ok(self.attach(e, opened, id).await)
    }

    /// Start following a market [`open`] checked: `subscribed` is queued,
    /// and for a ticker its backlog frame.
    pub(super) async fn attach(&mut self, e: &Entry, o: Opened, id: Option<Value>) -> SubId {
        let Opened {
            market: m,
            after,
            shared,
            kind,
            stream,
            boundary,
        } = o;
        let market = m.market.as_str();
        let head = m.head_seq;
        let heads = self.ctx.cfg.head_interval;
        let heads = (e.heads && !heads.is_zero()).then_some(heads.as_millis() as u64);
        self.out
            .push(client::subscribed(&m, id, after, e.mode, heads));
        let sid = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        self.subs.insert(
            sid,
            Sub {
                market: market.to_string(),
                shared,
                kind,
                known: head,
                heads: heads.map(|_| super::heads::Clock::new(after)),
            },
        );
        self.ids.insert(market.to_string(), sid);
        self.live.insert(sid, stream);
        if heads.is_some() {
            self.start_heads();
        }
        metrics::gauge!("marketcast_subscriptions").increment(1.0);
        tracing::debug!(conn = self.conn_id, market, after, head, "subscribed");
        if let Some(boundary) = boundary {
            // The backlog frame, exactly after + 1 ..= head, at once; then
            // what the group had published before this subscription joined.
            if head > after {
                self.ticker_fill(sid, after, head, None).await;
            }
            if boundary > after.max(head) {
                self.ticker_fill(sid, after.max(head), boundary, None).await;
            }
            self.rearm_flush();
        }
        sid
    }
}

/// A market checked and joined for a subscription, not yet attached to a
/// connection.
pub(crate) struct Opened {
    /// The market's row as the subscription starts.
    pub market: Market,
    /// The client's position: the first trade owed is `after + 1`.
    pub after: i64,
    shared: Arc<MarketShared>,
    kind: Kind,
    stream: LiveStream,
    /// A ticker's group boundary when it joined.
    boundary: Option<i64>,
}

impl Opened {
    /// The market's shared state and its live stream, for a caller that
    /// follows the market without a session (a long-poll's wait).
    pub(crate) fn follow(self) -> (Arc<MarketShared>, LiveStream) {
        (self.shared, self.stream)
    }
}

/// The checks of a subscribe that need the database, in the contract's
/// order after `forbidden` (`unknown_market`, `wrong_shard`,
/// `epoch_mismatch`, `history_unavailable`; `unavailable` whenever the
/// database does not answer), then the join with the hub. Shared by the
/// WebSocket and the SSE stream. Errors carry `market` and `id`.
pub(crate) async fn open(
    ctx: &SessionCtx,
    e: &Entry,
    id: &Option<Value>,
) -> Result<Opened, ErrorReply> {
    let market = e.market.as_str();
    let err =
        |code, msg: String| ErrorReply::new(id.clone(), code, msg).with("market", market.into());
    let unavailable = |e: DbError| err("unavailable", format!("database unavailable, retry: {e}"));
    let pool = &ctx.pool;
    let timeout = ctx.db_timeout;
    let m = db::with_connection(pool, timeout, async |c| db::log::market(c, market).await)
        .await
        .map_err(unavailable)?
        .ok_or_else(|| err("unknown_market", format!("no market named {market}")))?;
    if !ctx.shards.contains(&(m.shard as u32)) {
        let mut e = err(
            "wrong_shard",
            format!(
                "market {market} is on shard {} which this broadcaster does not serve",
                m.shard
            ),
        )
        .with("shard", m.shard.into());
        // Contract 1.1 section 5.2: the live registry entries serving the
        // shard; `url` from the template, else one of them, else absent.
        let urls = ctx.directory.urls_for(m.shard);
        let url = match &ctx.shard_url_template {
            Some(t) => Some(t.replace("{shard}", &m.shard.to_string())),
            None => urls.first().cloned(),
        };
        e = e.with("broadcasters", urls.into());
        if let Some(url) = url {
            e = e.with("url", url.into());
        }
        return Err(e);
    }
    if let Some(ep) = &e.epoch {
        if *ep != m.epoch {
            return Err(err(
                "epoch_mismatch",
                format!("market {market} is at epoch {}, not {ep}", m.epoch),
            )
            .with("epoch", m.epoch.clone().into()));
        }
    }
    let head = m.head_seq;
    let want = match e.mode {
        Mode::Trades => Want::Trades,
        Mode::Ticker { interval_ms } => Want::Ticker { interval_ms },
    };
    let Joined { shared, live } = ctx
        .hub
        .join(market, head, m.volume, &m.epoch, want)
        .await
        .ok_or_else(|| err("unavailable", "broadcaster shutting down".into()))?;
    let ring_from = |seq: i64| {
        let ring = shared.ring.read().unwrap_or_else(|p| p.into_inner());
        ring.first_seq().is_some_and(|f| f <= seq)
    };
    let earliest = async || {
        db::with_connection(pool, timeout, async |c| {
            db::log::earliest_seq(c, market).await
        })
        .await
        .map_err(unavailable)
    };
    // Where the client is: the first trade owed is `after + 1`.
    let after = match e.start {
        Start::Head => head,
        Start::After(f) => f,
        // As if from_seq were max(head - N, P), P the newest pruned seq
        // (every retained trade, if fewer than N): never
        // history_unavailable.
        Start::Recent(n) => {
            let want = (head - n as i64).max(0);
            match ring_from(want + 1) {
                true => want,
                false => want.max(earliest().await?.map_or(head, |e| e - 1)),
            }
        }
    };
    if after < head && !ring_from(after + 1) {
        let earliest = earliest().await?.unwrap_or(head + 1);
        if earliest > after + 1 {
            return Err(err("history_unavailable", format!("trades before seq {earliest} of {market} were pruned; subscribe with from_seq >= {}", earliest - 1)).with("earliest_seq", earliest.into()));
        }
    }
    // Everything the hub publishes from now on reaches `live`; everything
    // it published before is at most shared.head() (or the group's
    // boundary) and is filled.
    let (kind, stream, boundary) = match live {
        LiveRx::Trades(rx) => (
            Kind::Trades(Position::new(Some(after), head, shared.head())),
            LiveStream::Trades(BroadcastStream::new(rx)),
            None,
        ),
        LiveRx::Ticker { rx, boundary } => {
            let Mode::Ticker { interval_ms } = e.mode else {
                unreachable!("a ticker group answers a ticker join")
            };
            (
                Kind::Ticker {
                    pos: Box::new(super::ticker::position(after, interval_ms)),
                },
                LiveStream::Ticker(BroadcastStream::new(rx)),
                Some(boundary),
            )
        }
        LiveRx::VolumeUnknown => {
            return Err(err(
                "unavailable",
                format!("the ticker of {market} is not available right now, retry"),
            ))
        }
    };
    Ok(Opened {
        market: m,
        after,
        shared,
        kind,
        stream,
        boundary,
    })
}

impl Session {
    /// Send what subscription `sid` is owed from the ring or the log, a page
    /// at a time, flushing each page.
    pub(super) async fn fill(&mut self, sid: SubId) -> Result<(), End> {
        // Replica lag is waited for once per fill, not once per page.
        let mut waited = crate::broadcaster::replica::Waited::default();
        loop {
            if self.shutdown.is_cancelled() {
                return Err(End::Shutdown);
            }
            let Some(sub) = self.subs.get(&sid) else {
                return Ok(());
            };
            let Kind::Trades(pos) = &sub.kind else {
                return Ok(());
            };
            let Some((after, upto)) = pos.gap() else {
                return Ok(());
            };
            let market = sub.market.clone();
            let market = market.as_str();
            let page_cap = self.ctx.replay_page;
            let from_ring = sub
                .shared
                .ring_range(after, upto.min(after + page_cap as i64));
            let (page, source) = match from_ring {
                Some(p) => (p, "memory"),
                None => {
                    let read = self
                        .ctx
                        .replay
                        .trade_frames(
                            market,
                            after,
                            Some(upto),
                            upto,
                            page_cap as i64,
                            &mut waited,
                        )
                        .await;
                    match read {
                        Ok(read) => read,
                        Err(e) => {
                            // Retried by the run loop every second; never skip.
                            tracing::debug!(conn = self.conn_id, market, error = %e, "fill deferred: database unavailable");
                            return Ok(());
                        }
                    }
                }
            };
            if let Err(Pruned { after, earliest }) =
                pos.check_page(page.first().map(|t| t.seq), upto)
            {
                self.end_sub(sid);
                self.reply_error(
                    ErrorReply::new(
                        None,
                        "history_unavailable",
                        format!(
                            "trades of {market} after seq {after} were pruned; subscription ended"
                        ),
                    )
                    .with("earliest_seq", earliest.into())
                    .with("market", market.into()),
                );
                return Ok(());
            }
            metrics::counter!("marketcast_replayed_trades_total", "source" => source)
                .increment(page.len() as u64);
            let Some(Kind::Trades(pos)) = self.subs.get_mut(&sid).map(|s| &mut s.kind) else {
                return Ok(());
            };
            for t in page {
                if !pos.take(t.seq) {
                    break; // contiguity checked per page start; defensive
                }
                self.out.push(t.frame);
            }
            self.flush().await?;
        }
    }
}
