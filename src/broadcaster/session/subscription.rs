//! The delivery rule of one subscription, without IO: per connection and
//! market, trades go out in strictly increasing seq, each once, without
//! gaps, starting at `from_seq + 1` (or `head_seq + 1`).
//!
//! A [`Position`] holds `next`, the next seq owed to the client, and `want`,
//! the highest seq known to exist that the client is owed. A live trade below
//! `next` is a duplicate and dropped; one equal to `next` is sent; one above
//! it raises `want` and is not sent itself: the gap `next..=want` is then
//! filled from the ring (which already holds the live trade) or the log, in
//! order, before anything later ([`super::replay`]).

use std::time::{Duration, Instant};

use crate::protocol::ticker::Fold;

/// What to do with a live trade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Live {
    /// Exactly the next seq owed: write it.
    Send,
    /// Already sent (by a fill): drop it.
    Drop,
    /// Ahead of what the client has: fill the gap first; the fill includes
    /// this trade.
    Fill,
}

/// A fill page that does not start at the seq owed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    /// The subscription's position: every seq up to it was sent.
    pub after: i64,
    /// The lowest seq the page did have (`upto + 1` for an empty page).
    pub earliest: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    next: i64,
    want: i64,
}

impl Position {
    /// A subscription starting after `from_seq` (None: at the market's
    /// `head` as the subscribe read it). `published` is the hub's head when
    /// the subscription joined: everything up to it was broadcast before the
    /// live receiver existed, so it is owed too (filled, never received live).
    pub fn new(from_seq: Option<i64>, head: i64, published: i64) -> Self {
        Position {
            next: from_seq.map_or(head + 1, |f| f + 1),
            want: head.max(published),
        }
    }

    /// The next seq owed to the client.
    pub fn next(&self) -> i64 {
        self.next
    }

    /// Whether a gap is waiting to be filled.
    pub fn owed(&self) -> bool {
        self.next <= self.want
    }

    /// Every seq up to `upto` exists and is owed (a live queue replaced:
    /// what was published on the new one before this subscription followed
    /// it is filled, never skipped).
    pub fn owe(&mut self, upto: i64) {
        self.want = self.want.max(upto);
    }

    /// A trade received live.
    pub fn live(&mut self, seq: i64) -> Live {
        if seq < self.next {
            return Live::Drop;
        }
        self.want = self.want.max(seq);
        if seq == self.next {
            self.next += 1;
            Live::Send
        } else {
            Live::Fill
        }
    }

    /// The gap to fill: seqs `after < seq <= upto`, read a page at a time.
    /// None when nothing is owed.
    pub fn gap(&self) -> Option<(i64, i64)> {
        self.owed().then_some((self.next - 1, self.want))
    }

    /// Check a fill page by its first seq before taking from it: a page that
    /// does not start at `next` means the log no longer has it (pruned
    /// meanwhile), and the guarantee cannot be kept for this subscription.
    pub fn check_page(&self, first: Option<i64>, upto: i64) -> Result<(), Pruned> {
        match first {
            Some(f) if f == self.next => Ok(()),
            other => Err(Pruned {
                after: self.next - 1,
                earliest: other.unwrap_or(upto + 1),
            }),
        }
    }

    /// The next trade of a checked fill page: true if it is the seq owed
    /// (send it; `next` moves on), false to stop taking from this page.
    pub fn take(&mut self, seq: i64) -> bool {
        let owed = seq == self.next;
        if owed {
            self.next += 1;
        }
        owed
    }
}

/// What to do with a ticker group's frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TickerStep {
    /// Already covered: drop it.
    Drop,
    /// Exactly the next span owed, and its time: write the shared bytes.
    SendShared,
    /// Folded into what is held; it goes out at [`TickerPosition::flush_at`]
    /// or with the next frame.
    Hold,
    /// Write this fold (encoded for this connection).
    Send(Fold),
    /// The frame does not start where the client is (it joined inside the
    /// group's span, or lagged): fold `after < seq <= upto` from the ring or
    /// the log and hand it to [`TickerPosition::filled`] with `at`.
    Fill { after: i64, upto: i64 },
}

/// The delivery rule of one ticker subscription, without IO
/// (docs/PROTOCOL.md, "Ticker mode"): every trade owed lands in exactly one
/// frame, spans are contiguous from `from_seq + 1`, and two frames are at
/// least `interval` apart.
///
/// Frames are the market's group's, shared by every subscriber of the
/// interval. A subscriber's clock is the group's: a shared frame counts as
/// sent when the group emitted it (`emitted_at`), so once aligned a
/// subscriber takes every group frame as is. Only just after it joined (its
/// backlog frame, or a position inside the group's span) does it send folds
/// of its own, and a fold it holds goes out merged with the next group
/// frame, which re-aligns it; if no frame comes (the market went quiet), at
/// [`TickerPosition::flush_at`]. A trade is therefore held at most one
/// interval once aligned, and at most two intervals plus [`grace`] while a
/// new subscription aligns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TickerPosition {
    /// Every seq up to this went out in a frame (the client's position).
    sent: i64,
    /// Folded and owed, not yet sent: `sent + 1 ..= held.to_seq`.
    held: Option<Fold>,
    /// When the group emitted the last frame merged into `held`.
    held_at: Option<Instant>,
    /// When the last frame counts as sent.
    last: Option<Instant>,
    interval: Duration,
}

/// How long past the group's next frame a held fold waits for it before
/// going out alone: a group frame due at the same time arrives a little late
/// (the hub's timer, the hop to this task), and taking it re-aligns.
pub fn grace(interval: Duration) -> Duration {
    interval / 4
}

impl TickerPosition {
    /// A ticker subscription whose position is `after` (`from_seq`).
    pub fn new(after: i64, interval: Duration) -> Self {
        TickerPosition {
            sent: after,
            held: None,
            held_at: None,
            last: None,
            interval,
        }
    }

    /// The client's position: the last `to_seq` sent.
    pub fn sent(&self) -> i64 {
        self.sent
    }

    /// The last seq folded, sent or held.
    pub fn covered(&self) -> i64 {
        self.held.map_or(self.sent, |h| h.to_seq)
    }

    pub fn holding(&self) -> bool {
        self.held.is_some()
    }

    fn due(&self, at: Instant) -> bool {
        self.last.is_none_or(|l| at >= l + self.interval)
    }

    fn take(&mut self, at: Instant) -> Option<Fold> {
        let f = self.held.take()?;
        self.sent = f.to_seq;
        self.held_at = None;
        self.last = Some(at);
        Some(f)
    }

    /// A frame of the group, emitted at `emitted_at`.
    pub fn frame(&mut self, f: &Fold, emitted_at: Instant) -> TickerStep {
        let covered = self.covered();
        if f.to_seq <= covered {
            return TickerStep::Drop;
        }
        if f.from_seq != covered + 1 {
            return TickerStep::Fill {
                after: covered,
                upto: f.to_seq,
            };
        }
        if self.held.is_none() && self.due(emitted_at) {
            self.sent = f.to_seq;
            self.last = Some(emitted_at);
            return TickerStep::SendShared;
        }
        self.hold(*f, Some(emitted_at))
    }

    fn hold(&mut self, f: Fold, group_at: Option<Instant>) -> TickerStep {
        match Fold::join(self.held, f) {
            Some(h) => self.held = Some(h),
            // The caller folds from `covered()`; anything else is a bug,
            // and dropping the fold keeps the rule: it is filled again.
            None => return TickerStep::Drop,
        }
        if group_at.is_some() {
            self.held_at = group_at;
        }
        let at = group_at.unwrap_or_else(Instant::now);
        match self.due(at) {
            true => self.take(at).map_or(TickerStep::Drop, TickerStep::Send),
            false => TickerStep::Hold,
        }
    }

    /// A fold of `covered() + 1 ..` read from the ring or the log: for a
    /// frame of the group emitted at `group_at`, or (None) for the backlog
    /// or the catch-up of a new subscription, now.
    pub fn filled(&mut self, f: Fold, group_at: Option<Instant>) -> TickerStep {
        self.hold(f, group_at)
    }

    /// When a held fold goes out if no group frame takes it first.
    pub fn flush_at(&self) -> Option<Instant> {
        self.held?;
        let own = self.last.map_or_else(Instant::now, |l| l + self.interval);
        Some(match self.held_at {
            Some(g) => own.max(g + self.interval + grace(self.interval)),
            None => own,
        })
    }

    /// The held fold, if its time has come.
    pub fn flush(&mut self, now: Instant) -> Option<Fold> {
        match self.flush_at() {
            Some(at) if at <= now => self.take(now),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feed live seqs, answering each Fill with a fill of the whole gap, and
    /// return what the client received.
    fn deliver(p: &mut Position, live: &[i64]) -> Vec<i64> {
        let mut got = Vec::new();
        for &s in live {
            match p.live(s) {
                Live::Send => got.push(s),
                Live::Drop => {}
                Live::Fill => {
                    let (after, upto) = p.gap().expect("a gap is owed");
                    p.check_page(Some(after + 1), upto).unwrap();
                    for seq in after + 1..=upto {
                        assert!(p.take(seq));
                        got.push(seq);
                    }
                }
            }
        }
        got
    }

    #[test]
    fn from_seq_starts_right_after_it_and_the_head_right_after_the_head() {
        assert_eq!(Position::new(Some(5), 9, 9).next(), 6);
        assert_eq!(Position::new(None, 9, 9).next(), 10);
        assert!(Position::new(Some(5), 9, 9).owed(), "6..=9 is owed");
        assert!(!Position::new(None, 9, 9).owed());
    }

    #[test]
    fn live_trades_below_next_are_dropped_and_next_is_sent() {
        let mut p = Position::new(None, 3, 3);
        assert_eq!(p.live(3), Live::Drop);
        assert_eq!(p.live(4), Live::Send);
        assert_eq!(p.live(4), Live::Drop, "never twice");
        assert_eq!(p.next(), 5);
    }

    #[test]
    fn a_trade_ahead_is_never_sent_before_the_gap_is_filled() {
        let mut p = Position::new(None, 3, 3);
        assert_eq!(p.live(7), Live::Fill);
        assert_eq!(p.gap(), Some((3, 7)), "4..=7, the live trade included");
    }

    #[test]
    fn whatever_order_live_trades_come_in_the_client_gets_each_seq_once_in_order() {
        let mut p = Position::new(Some(0), 2, 2);
        let got = deliver(&mut p, &[1, 2, 5, 3, 4, 5, 6, 9, 7, 10]);
        assert_eq!(got, (1..=10).collect::<Vec<_>>());
    }

    #[test]
    fn trades_published_before_joining_are_owed_too() {
        // The subscribe read head 5, but the hub had already broadcast 6.
        let p = Position::new(None, 5, 6);
        assert_eq!(p.gap(), Some((5, 6)));
    }

    #[test]
    fn a_page_that_misses_the_seq_owed_ends_the_subscription_never_a_skip() {
        let p = Position::new(Some(10), 20, 20);
        assert_eq!(p.check_page(Some(11), 20), Ok(()));
        assert_eq!(
            p.check_page(Some(15), 20),
            Err(Pruned {
                after: 10,
                earliest: 15
            })
        );
        assert_eq!(
            p.check_page(None, 20),
            Err(Pruned {
                after: 10,
                earliest: 21
            })
        );
    }

    #[test]
    fn what_a_replaced_live_queue_carried_is_owed_and_filled() {
        let mut p = Position::new(None, 3, 3);
        assert_eq!(p.live(4), Live::Send);
        p.owe(9);
        assert_eq!(p.gap(), Some((4, 9)));
        p.owe(2);
        assert_eq!(p.gap(), Some((4, 9)), "owing less changes nothing");
    }

    #[test]
    fn a_page_is_taken_only_while_contiguous() {
        let mut p = Position::new(Some(0), 5, 5);
        assert!(p.take(1));
        assert!(p.take(2));
        assert!(!p.take(4), "3 missing: stop");
        assert_eq!(p.next(), 3);
    }

    mod ticker {
        use super::super::*;
        use crate::protocol::ticker::Tick;

        const I: Duration = Duration::from_millis(200);

        fn span(from: i64, to: i64) -> Fold {
            let mut f = Fold::of(&Tick {
                seq: from,
                yes: 5000,
                qty: 1,
                volume: from,
                ts_micros: 0,
            });
            for seq in from + 1..=to {
                f.add(&Tick {
                    seq,
                    yes: 5000,
                    qty: 1,
                    volume: seq,
                    ts_micros: 0,
                });
            }
            f
        }

        #[test]
        fn an_aligned_subscriber_takes_every_group_frame_as_is() {
            let t0 = Instant::now();
            let mut p = TickerPosition::new(10, I);
            assert_eq!(p.frame(&span(11, 15), t0), TickerStep::SendShared);
            assert_eq!(p.frame(&span(16, 16), t0 + I), TickerStep::SendShared);
            assert_eq!(
                p.frame(&span(16, 16), t0 + I),
                TickerStep::Drop,
                "never twice"
            );
            assert_eq!(p.sent(), 16);
        }

        #[test]
        fn joining_inside_a_span_or_behind_it_folds_from_the_position() {
            let t0 = Instant::now();
            let mut p = TickerPosition::new(12, I);
            assert_eq!(
                p.frame(&span(11, 15), t0),
                TickerStep::Fill {
                    after: 12,
                    upto: 15
                }
            );
            assert_eq!(
                p.filled(span(13, 15), Some(t0)),
                TickerStep::Send(span(13, 15))
            );
            assert_eq!(
                p.frame(&span(16, 20), t0 + I),
                TickerStep::SendShared,
                "aligned"
            );
            let mut lagged = TickerPosition::new(20, I);
            assert_eq!(
                lagged.frame(&span(31, 32), t0),
                TickerStep::Fill {
                    after: 20,
                    upto: 32
                },
                "21..=30 went by: filled, never skipped"
            );
        }

        #[test]
        fn after_a_backlog_frame_the_next_span_waits_and_goes_with_the_group_frame_after() {
            let t0 = Instant::now();
            let mut p = TickerPosition::new(0, I);
            // The backlog goes at once.
            assert_eq!(p.filled(span(1, 500), None), TickerStep::Send(span(1, 500)));
            let g1 = Instant::now() + I / 2;
            // The group's next frame comes too soon after it: held...
            assert_eq!(p.frame(&span(501, 510), g1), TickerStep::Hold);
            assert_eq!(p.sent(), 500);
            let flush = p.flush_at().unwrap();
            assert!(
                flush >= g1 + I + grace(I),
                "waits for the group's next frame"
            );
            // ...and goes out merged with the group frame after, which re-aligns.
            assert_eq!(
                p.frame(&span(511, 520), g1 + I),
                TickerStep::Send(span(501, 520))
            );
            assert_eq!(p.frame(&span(521, 521), g1 + 2 * I), TickerStep::SendShared);
            let _ = t0;
        }

        #[test]
        fn a_held_fold_goes_out_alone_when_the_market_goes_quiet() {
            let mut p = TickerPosition::new(0, I);
            assert!(matches!(p.filled(span(1, 5), None), TickerStep::Send(_)));
            let g1 = Instant::now() + I / 2;
            assert_eq!(p.frame(&span(6, 7), g1), TickerStep::Hold);
            assert_eq!(p.flush(g1 + I), None, "not before the group had its chance");
            let at = p.flush_at().unwrap();
            assert_eq!(p.flush(at), Some(span(6, 7)));
            assert_eq!(p.sent(), 7);
            assert!(!p.holding());
        }

        #[test]
        fn frames_of_one_subscription_are_never_closer_than_the_interval() {
            // Group frames every I with jitter; the subscriber joins with a
            // backlog at an arbitrary phase. Every send is >= I after the last.
            for phase_ms in [0u64, 1, 37, 99, 150, 199] {
                let start = Instant::now();
                let mut p = TickerPosition::new(0, I);
                let mut sends = vec![];
                let joined = start + Duration::from_millis(phase_ms);
                if let TickerStep::Send(_) = p.filled(span(1, 10), None) {
                    sends.push(Instant::now().max(joined));
                }
                let mut seq = 10;
                for k in 1..20u32 {
                    let at = start + I * k + Duration::from_millis((k as u64 * 7) % 3);
                    match p.frame(&span(seq + 1, seq + 3), at) {
                        TickerStep::SendShared | TickerStep::Send(_) => sends.push(at),
                        TickerStep::Hold | TickerStep::Drop => {}
                        TickerStep::Fill { .. } => panic!("contiguous frames need no fill"),
                    }
                    seq += 3;
                }
                assert_eq!(p.covered(), seq);
                for w in sends.windows(2).skip(1) {
                    assert!(w[1] - w[0] >= I, "phase {phase_ms}: {:?}", w[1] - w[0]);
                }
            }
        }
    }
}
