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

use super::subscription::{Position, Pruned};
use super::{End, Session, Sub, SubId};
use crate::db::{self, DbError};
use crate::protocol::client::{self, ErrorReply};

impl Session {
    /// Check a subscribe op and start following the market. Err is the
    /// error reply; nothing was started.
    pub(super) async fn subscribe(
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
        let max = self.ctx.cfg.max_subscriptions;
        if self.subs.len() >= max {
            return Err(err(
                "too_many_subscriptions",
                format!("at most {max} subscriptions per connection"),
            ));
        }
        let unavailable =
            |e: DbError| err("unavailable", format!("database unavailable, retry: {e}"));
        let pool = &self.ctx.pool;
        let timeout = self.ctx.db_timeout;
        let m = db::with_connection(pool, timeout, async |c| db::log::market(c, market).await)
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
            if let Some(t) = &self.ctx.shard_url_template {
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
        // Everything the hub publishes from now on reaches `rx`; everything it
        // published before is at most shared.head() and is filled.
        let pos = Position::new(from_seq, head, shared.head());
        let next = pos.next();
        if next <= head
            && shared
                .ring
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .first_seq()
                .is_none_or(|f| f > next)
        {
            let earliest = db::with_connection(pool, timeout, async |c| {
                db::log::earliest_seq(c, market).await
            })
            .await
            .map_err(unavailable)?;
            let earliest = earliest.unwrap_or(head + 1);
            if earliest > next {
                return Err(err("history_unavailable", format!("trades before seq {earliest} of {market} were pruned; subscribe with from_seq >= {}", earliest - 1)).with("earliest_seq", earliest.into()));
            }
        }
        self.out.push(client::subscribed(&m, id));
        let sid = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        self.subs.insert(
            sid,
            Sub {
                market: market.to_string(),
                shared,
                pos,
            },
        );
        self.ids.insert(market.to_string(), sid);
        self.live.insert(sid, BroadcastStream::new(rx));
        metrics::gauge!("marketcast_subscriptions").increment(1.0);
        tracing::debug!(conn = self.conn_id, market, next, head, "subscribed");
        Ok(sid)
    }

    /// Send what subscription `sid` is owed from the ring or the log, a page
    /// at a time, flushing each page.
    pub(super) async fn fill(&mut self, sid: SubId) -> Result<(), End> {
        loop {
            if self.shutdown.is_cancelled() {
                return Err(End::Shutdown);
            }
            let Some(sub) = self.subs.get(&sid) else {
                return Ok(());
            };
            let Some((after, upto)) = sub.pos.gap() else {
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
                    let pool = &self.ctx.pool;
                    let read = db::with_connection(pool, self.ctx.db_timeout, async |c| {
                        db::log::trade_frames_after(c, market, after, Some(upto), page_cap as i64)
                            .await
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
            if let Err(Pruned { after, earliest }) =
                sub.pos.check_page(page.first().map(|t| t.seq), upto)
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
            let sub = self.subs.get_mut(&sid).expect("checked above");
            for t in page {
                if !sub.pos.take(t.seq) {
                    break; // contiguity checked per page start; defensive
                }
                self.out.push(t.frame);
            }
            self.flush().await?;
        }
    }
}
