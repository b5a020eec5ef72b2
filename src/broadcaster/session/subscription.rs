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
}
