//! A market's ticker group for one interval, without IO: the trades the hub
//! publishes are folded here once, and one frame per interval at most goes
//! to every ticker subscriber of that market and interval
//! (docs/PROTOCOL.md, "Ticker mode"). Subscribers share the frame's bytes as
//! they share trade frames; the per-connection rule that keeps their spans
//! contiguous is `session::subscription::TickerPosition`.
//!
//! Timing, the group's side: a frame goes out as soon as `interval` has
//! passed since the previous one, at once when it already has (a quiet
//! market's next trade is not held), and never with nothing in it.

use std::time::Duration;

use tokio::time::Instant;

use crate::protocol::ticker::{Fold, Tick};

/// What the group wants next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Send this frame now.
    Emit(Fold),
    /// Look again at this instant (a frame is pending).
    At(Instant),
    /// Nothing pending.
    Idle,
}

#[derive(Debug)]
pub struct Group {
    interval: Duration,
    /// Published trades after `boundary`, folded, not yet emitted.
    pending: Option<Fold>,
    /// `to_seq` of the last frame, or the market's head when the group began:
    /// the next frame starts at `boundary + 1`.
    boundary: i64,
    last_emit: Option<Instant>,
}

impl Group {
    pub fn new(interval: Duration, boundary: i64) -> Self {
        Group {
            interval,
            pending: None,
            boundary,
            last_emit: None,
        }
    }

    pub fn boundary(&self) -> i64 {
        self.boundary
    }

    /// Whether a frame is waiting for its time.
    pub fn pending(&self) -> bool {
        self.pending.is_some()
    }

    /// A trade the hub published (in seq order, each once). False when it
    /// does not follow what the group has: the group cannot go on (trades
    /// were skipped) and must be dropped.
    pub fn add(&mut self, t: &Tick) -> bool {
        match &mut self.pending {
            Some(f) => f.add(t),
            None if t.seq == self.boundary + 1 => {
                self.pending = Some(Fold::of(t));
                true
            }
            None => false,
        }
    }

    /// What to do at `now`.
    pub fn poll(&mut self, now: Instant) -> Next {
        if self.pending.is_none() {
            return Next::Idle;
        }
        if let Some(last) = self.last_emit {
            if now < last + self.interval {
                return Next::At(last + self.interval);
            }
        }
        let f = self.pending.take().expect("checked above");
        self.boundary = f.to_seq;
        self.last_emit = Some(now);
        Next::Emit(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tick(seq: i64) -> Tick {
        Tick {
            seq,
            yes: 5000,
            qty: 1,
            volume: seq,
            ts_micros: seq,
        }
    }

    #[test]
    fn frames_are_an_interval_apart_contiguous_and_a_quiet_markets_next_trade_goes_at_once() {
        let i = Duration::from_millis(250);
        let t0 = Instant::now();
        let mut g = Group::new(i, 10);
        assert_eq!(g.poll(t0), Next::Idle, "nothing pending, no frame");
        assert!(g.add(&tick(11)));
        let Next::Emit(f) = g.poll(t0) else {
            panic!("the first trade goes at once")
        };
        assert_eq!((f.from_seq, f.to_seq), (11, 11));
        assert!(g.add(&tick(12)) && g.add(&tick(13)));
        assert_eq!(
            g.poll(t0 + i / 2),
            Next::At(t0 + i),
            "held until the interval has passed"
        );
        let Next::Emit(f) = g.poll(t0 + i) else {
            panic!()
        };
        assert_eq!((f.from_seq, f.to_seq, f.count()), (12, 13, 2), "contiguous");
        // Quiet for a while: the next trade is not held.
        assert!(g.add(&tick(14)));
        let Next::Emit(f) = g.poll(t0 + 10 * i) else {
            panic!()
        };
        assert_eq!((f.from_seq, f.to_seq), (14, 14));
        assert_eq!(g.boundary(), 14);
    }

    #[test]
    fn a_trade_that_does_not_follow_stops_the_group() {
        let mut g = Group::new(Duration::from_millis(100), 10);
        assert!(!g.add(&tick(12)), "11 is missing");
        assert!(g.add(&tick(11)));
        assert!(!g.add(&tick(13)));
    }
}
