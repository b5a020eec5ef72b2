//! Heads (docs/PROTOCOL.md, "Heads") and the session's timers.
//!
//! A subscription that asked for heads gets `{"type":"head"}` with the
//! newest seq the broadcaster knows for its market when three things hold:
//! the broadcaster is healthy, nothing naming the market went to the
//! connection for `--head-interval`, and the subscription is caught up (its
//! position is that seq). So a client can check its position against
//! `head_seq`, and a silence longer than twice the interval means a stale
//! feed, not a quiet market.
//!
//! Messages are not timed one by one (that would put a clock read on every
//! trade of the fan-out). Instead a check runs every quarter interval and
//! notices that the position moved since the last check: the message is
//! dated to that check, never earlier than it really went, so a head never
//! comes within the interval of the previous message, and at most 1.25
//! intervals after it (plus the check's own lateness).

use std::pin::Pin;
use std::time::{Duration, Instant};

use tokio::time::{Interval, Sleep};

use super::{End, Kind, Session};
use crate::protocol::client;

/// One subscription's head clock.
pub(super) struct Clock {
    /// The position at the previous check.
    seen: i64,
    /// When a message naming the market last went out (as far as the
    /// checks can tell: at or after the real time).
    quiet_since: Instant,
}

impl Clock {
    /// Starting now, at `position` (the `subscribed` just queued counts).
    pub(super) fn new(position: i64) -> Self {
        Clock {
            seen: position,
            quiet_since: Instant::now(),
        }
    }
}

/// What can wake a session besides its socket and its live streams.
pub(super) struct Timers {
    /// The heads check, every quarter `--head-interval`; None until a
    /// subscription asks for heads.
    heads: Option<Interval>,
    /// When the earliest held ticker fold goes out alone.
    flush: Pin<Box<Sleep>>,
    flush_armed: bool,
    /// When the connection's token stops being valid.
    expiry: Option<Pin<Box<Sleep>>>,
}

pub(super) enum Fired {
    Heads,
    Flush,
    Expired,
}

impl Timers {
    fn new() -> Self {
        Timers {
            heads: None,
            flush: Box::pin(tokio::time::sleep(Duration::ZERO)),
            flush_armed: false,
            expiry: None,
        }
    }

    /// The next timer that fires; never without timers (`select!` builds
    /// the future of a disabled branch too). Cancel safety: `Interval::tick`
    /// and a pinned `Sleep` are cancel-safe.
    pub(super) async fn next(timers: Option<&mut Timers>) -> Fired {
        let Some(this) = timers else {
            return std::future::pending().await;
        };
        this.fire().await
    }

    async fn fire(&mut self) -> Fired {
        let heads = self.heads.as_mut();
        let has_heads = heads.is_some();
        let expiry = self.expiry.as_mut();
        let has_expiry = expiry.is_some();
        tokio::select! {
            _ = async { heads.expect("guarded").tick().await }, if has_heads => Fired::Heads,
            _ = &mut self.flush, if self.flush_armed => Fired::Flush,
            _ = async { expiry.expect("guarded").await }, if has_expiry => Fired::Expired,
            else => std::future::pending().await,
        }
    }

    /// The token's deadline (a new token replaces the old one's).
    pub(super) fn arm_expiry(&mut self, at: Instant) {
        let at = tokio::time::Instant::from_std(at);
        match &mut self.expiry {
            Some(s) => s.as_mut().reset(at),
            None => self.expiry = Some(Box::pin(tokio::time::sleep_until(at))),
        }
    }

    pub(super) fn arm_flush(&mut self, at: Option<Instant>) {
        match at {
            Some(at) => {
                self.flush
                    .as_mut()
                    .reset(tokio::time::Instant::from_std(at));
                self.flush_armed = true;
            }
            None => self.flush_armed = false,
        }
    }
}

impl Session {
    pub(super) fn timers(&mut self) -> &mut Timers {
        self.timers.get_or_insert_with(|| Box::new(Timers::new()))
    }

    /// The heads check starts with the first subscription that asks.
    pub(super) fn start_heads(&mut self) {
        let every = self.ctx.cfg.head_interval / 4;
        let t = self.timers();
        if t.heads.is_none() {
            let mut i = tokio::time::interval(every);
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t.heads = Some(i);
        }
    }

    pub(super) async fn on_timer(&mut self, fired: Fired) -> Result<(), End> {
        match fired {
            Fired::Heads => self.check_heads(),
            Fired::Flush => self.flush_tickers(),
            // Every trade sent so far kept the guarantee; a client that
            // reconnects with a fresh token and from_seq loses nothing.
            Fired::Expired => {
                metrics::counter!("marketcast_token_expired_closes_total").increment(1);
                return Err(End::TokenExpired);
            }
        }
        Ok(())
    }

    fn check_heads(&mut self) {
        let now = Instant::now();
        let interval = self.ctx.cfg.head_interval;
        let healthy = self.ctx.health.ok();
        let mut sent = 0u64;
        for sub in self.subs.values_mut() {
            let position = sub.position();
            let holding = matches!(&sub.kind, Kind::Ticker { pos } if pos.holding());
            let owed = sub.owed();
            sub.known = sub.known.max(sub.shared.head());
            let Some(clock) = &mut sub.heads else {
                continue;
            };
            if position != clock.seen {
                clock.seen = position;
                clock.quiet_since = now;
                continue;
            }
            let caught_up = !owed && !holding && position >= sub.known;
            if healthy && caught_up && now.duration_since(clock.quiet_since) >= interval {
                clock.quiet_since = now;
                self.out
                    .push(client::head(&sub.market, sub.known, now_micros()));
                sent += 1;
            }
        }
        if sent > 0 {
            metrics::counter!("marketcast_heads_sent_total").increment(sent);
        }
    }
}

fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}
