//! A session's ticker subscriptions: the group's shared frames in, the
//! pure [`TickerPosition`] deciding, and the folds of its own that a
//! subscription needs just after it joins, read from the ring or the log.

use std::time::Instant;

use tokio_stream::wrappers::errors::BroadcastStreamRecvError;

use super::subscription::{TickerPosition, TickerStep};
use super::{End, Kind, Session, SubId};
use crate::db;
use crate::protocol::client::ErrorReply;
use crate::protocol::ticker::{Fold, TickerFrame};

impl Session {
    /// A frame of the subscription's ticker group (or a lag on its queue).
    pub(super) async fn on_ticker(
        &mut self,
        sid: SubId,
        item: Result<TickerFrame, BroadcastStreamRecvError>,
    ) -> Result<(), End> {
        // A lag: the next frame starts above the position and is filled.
        let Ok(frame) = item else { return Ok(()) };
        let Some(sub) = self.subs.get_mut(&sid) else {
            return Ok(());
        };
        let Kind::Ticker { pos } = &mut sub.kind else {
            return Ok(());
        };
        let step = pos.frame(&frame.fold, frame.emitted_at);
        match step {
            TickerStep::SendShared => {
                self.out.push(frame.frame);
                metrics::counter!("marketcast_ticker_frames_sent_total").increment(1);
            }
            TickerStep::Fill { after, upto } => {
                // Boxed: a fill may read the log, a large future that every
                // connection would otherwise carry inline while idle.
                Box::pin(self.ticker_fill(sid, after, upto, Some(frame.emitted_at))).await;
            }
            other => self.ticker_step(sid, other),
        }
        self.rearm_flush();
        Ok(())
    }

    /// Fold `after < seq <= upto` of the subscription's market from the ring
    /// or the log and hand it to its position. A fold the log cannot give
    /// whole (pruned) ends the subscription with `history_unavailable`; a
    /// database that does not answer leaves it owed until the next frame.
    pub(super) async fn ticker_fill(
        &mut self,
        sid: SubId,
        after: i64,
        upto: i64,
        group_at: Option<Instant>,
    ) {
        let Some(sub) = self.subs.get(&sid) else {
            return;
        };
        let market = sub.market.clone();
        let ring = sub
            .shared
            .ring
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .fold(after, upto);
        let fold = match ring {
            Some(f) => Ok(Some(f)),
            None => {
                let r = self.ctx.replay.fold(&market, after, upto).await;
                r.map(|(fold, source)| {
                    metrics::counter!("marketcast_replayed_trades_total", "source" => source)
                        .increment((upto - after).max(0) as u64);
                    fold
                })
            }
        };
        match fold {
            Ok(Some(f)) => {
                let step = match self.subs.get_mut(&sid).map(|s| &mut s.kind) {
                    Some(Kind::Ticker { pos }) => pos.filled(f, group_at),
                    _ => return,
                };
                self.ticker_step(sid, step);
            }
            Ok(None) => self.end_pruned(sid, &market, after).await,
            Err(e) => {
                tracing::debug!(conn = self.conn_id, market, error = %e, "ticker fill deferred: database unavailable");
            }
        }
    }

    /// The log no longer has every trade after `after`: end the
    /// subscription, never skip.
    async fn end_pruned(&mut self, sid: SubId, market: &str, after: i64) {
        let earliest = db::with_connection(&self.ctx.pool, self.ctx.db_timeout, async |c| {
            db::log::earliest_seq(c, market).await
        })
        .await
        .ok()
        .flatten()
        .unwrap_or(after + 1);
        self.end_sub(sid);
        self.reply_error(
            ErrorReply::new(
                None,
                "history_unavailable",
                format!("trades of {market} after seq {after} were pruned; subscription ended"),
            )
            .with("earliest_seq", earliest.into())
            .with("market", market.into()),
        );
    }

    /// Queue what a step says to send.
    pub(super) fn ticker_step(&mut self, sid: SubId, step: TickerStep) {
        if let TickerStep::Send(fold) = step {
            self.send_fold(sid, &fold);
        }
    }

    fn send_fold(&mut self, sid: SubId, fold: &Fold) {
        if let Some(sub) = self.subs.get(&sid) {
            self.out.push(fold.encode(&sub.market));
            metrics::counter!("marketcast_ticker_frames_sent_total").increment(1);
        }
    }

    /// Send the held folds whose time has come.
    pub(super) fn flush_tickers(&mut self) {
        let now = Instant::now();
        let due: Vec<(SubId, Fold)> = self
            .subs
            .iter_mut()
            .filter_map(|(sid, s)| match &mut s.kind {
                Kind::Ticker { pos } => pos.flush(now).map(|f| (*sid, f)),
                Kind::Trades(_) => None,
            })
            .collect();
        for (sid, f) in due {
            self.send_fold(sid, &f);
        }
        self.rearm_flush();
    }

    /// Point the flush timer at the earliest held fold.
    pub(super) fn rearm_flush(&mut self) {
        let at = self
            .subs
            .values()
            .filter_map(|s| match &s.kind {
                Kind::Ticker { pos } => pos.flush_at(),
                Kind::Trades(_) => None,
            })
            .min();
        if at.is_some() || self.timers.is_some() {
            self.timers().arm_flush(at);
        }
    }
}

/// A new ticker subscription's position.
pub(super) fn position(after: i64, interval_ms: u32) -> TickerPosition {
    TickerPosition::new(after, std::time::Duration::from_millis(interval_ms as u64))
}
