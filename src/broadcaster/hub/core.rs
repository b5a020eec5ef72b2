//! The hub's ordering logic without IO: a plain struct that takes events
//! (a doorbell, a page read from the log, a reconcile) and returns what to
//! do (read the log after some seq, publish these trades).
//!
//! Two sources of trades reach a core: pages read from the log
//! ([`MarketCore::fetched`]) and verified signed notifications
//! ([`MarketCore::signed`]). Both go through one rule: a trade is published
//! only as `head + 1`, and publishing it makes it the head. So the two
//! may overlap freely: a read in flight when a signed trade is published
//! returns it again, at or below the head by then, and it is dropped as a
//! duplicate; a signed trade that a read already published is the same.

use std::collections::VecDeque;

use crate::protocol::trade::EncodedTrade;

/// Ask the IO side to read trades with `seq > after` from the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fetch {
    pub after: i64,
}

/// What to do with a verified signed notification for seq `s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signed {
    /// `s` is `head + 1`: publish the payload's trade now; the head is `s`.
    Publish,
    /// `s` is at or below the head: already published, drop it (a replay,
    /// or a read got there first).
    Duplicate,
    /// `s` is beyond `head + 1`: trades in between are not here yet (their
    /// notifications lost, or this market's read still running from before
    /// the join): treated as a doorbell, the log is read.
    Gap(Option<Fetch>),
}

/// What a page read from the log produced.
#[derive(Debug, Default)]
pub struct Applied {
    /// Trades to publish, in seq order, each exactly once.
    pub publish: Vec<EncodedTrade>,
    /// Rows at or below head (already published): dropped.
    pub duplicates: usize,
    /// Trades a repair read (a reconcile, a re-LISTEN) found that no
    /// doorbell had announced: notifications lost and repaired. A read a
    /// doorbell started that finds trades whose doorbells are still queued
    /// counts none: that is normal under load, not a loss.
    pub repaired: usize,
    /// Seqs missing from the log (pruned) that the hub moved past.
    pub skipped: usize,
    /// Read again right away.
    pub next: Option<Fetch>,
}

#[derive(Debug)]
pub struct MarketCore {
    /// Highest seq published; every seq up to it was published in order.
    head: i64,
    /// Highest seq any doorbell announced (for the lost-notification count).
    announced: i64,
    /// A read of the log is in flight; at most one per market.
    fetching: bool,
    /// A doorbell above head arrived while the read was in flight, so the
    /// read may have started before that trade committed: read once more.
    rang_while_fetching: bool,
    /// The head at which the last read found a hole in the log.
    hole_at: Option<i64>,
    /// The read in flight (or the next) was asked for by a repair.
    repair: bool,
}

impl MarketCore {
    pub fn new(head: i64) -> Self {
        MarketCore {
            head,
            announced: head,
            fetching: false,
            rang_while_fetching: false,
            hole_at: None,
            repair: false,
        }
    }

    pub fn head(&self) -> i64 {
        self.head
    }

    /// A doorbell saying `seq` committed. At or below head it is a
    /// duplicate (or a stale or forged one) and ignored.
    pub fn doorbell(&mut self, seq: i64) -> Option<Fetch> {
        if seq <= self.head {
            return None;
        }
        self.announced = self.announced.max(seq);
        self.poke()
    }

    /// A verified signed notification carrying the trade `seq` (the caller
    /// checked its MAC and its epoch). A read in flight is no reason to
    /// wait: whatever it returns up to the new head is dropped as a
    /// duplicate by [`MarketCore::fetched`], which accepts only `head + 1`.
    pub fn signed(&mut self, seq: i64) -> Signed {
        if seq <= self.head {
            return Signed::Duplicate;
        }
        if seq != self.head + 1 {
            return Signed::Gap(self.doorbell(seq));
        }
        self.head = seq;
        self.announced = self.announced.max(seq);
        Signed::Publish
    }

    /// Read the log because notifications may have been lost: after a
    /// LISTEN reconnect, or when a reconcile saw `markets.last_seq` ahead of
    /// head. What it finds unannounced counts as repaired.
    pub fn repair(&mut self) -> Option<Fetch> {
        self.repair = true;
        self.poke()
    }

    /// Read the log regardless of doorbells (on joining, to retry a read
    /// that failed).
    pub fn poke(&mut self) -> Option<Fetch> {
        if self.fetching {
            self.rang_while_fetching = true;
            return None;
        }
        self.fetching = true;
        self.rang_while_fetching = false;
        Some(Fetch { after: self.head })
    }

    /// A page of the log read for [`Fetch`]: `rows` in seq order, and
    /// whether the page was full (more rows may follow).
    pub fn fetched(&mut self, rows: Vec<EncodedTrade>, page_full: bool) -> Applied {
        self.fetching = false;
        let repairing = std::mem::take(&mut self.repair);
        let mut out = Applied::default();
        let mut broken = false;
        for t in rows {
            if t.seq <= self.head {
                out.duplicates += 1;
                continue;
            }
            if t.seq != self.head + 1 {
                // Seq is gapless and commits in order, so a hole means
                // trades were pruned above our head. Read once more to be
                // sure; the same hole twice is permanent: move past it
                // (re-reading forever would stall the market). Sessions
                // still owed those trades find them missing in the log
                // and get `history_unavailable`: never a silent skip.
                if self.hole_at == Some(self.head) {
                    out.skipped += (t.seq - self.head - 1) as usize;
                    self.head = t.seq - 1;
                    self.hole_at = None;
                } else {
                    self.hole_at = Some(self.head);
                    broken = true;
                    break;
                }
            }
            self.head = t.seq;
            if repairing && t.seq > self.announced {
                out.repaired += 1;
            }
            out.publish.push(t);
        }
        self.announced = self.announced.max(self.head);
        if page_full || broken || self.rang_while_fetching {
            out.next = self.poke();
        }
        out
    }

    /// The read failed (database unavailable). The next doorbell or
    /// reconcile retries it.
    pub fn fetch_failed(&mut self) {
        self.fetching = false;
    }
}

/// The most recent trades of a market, oldest first, contiguous in seq.
#[derive(Debug)]
pub struct Ring {
    cap: usize,
    items: VecDeque<EncodedTrade>,
}

impl Ring {
    pub fn new(cap: usize) -> Self {
        Ring {
            cap: cap.max(1),
            items: VecDeque::new(),
        }
    }

    /// Append the next trade; a non-contiguous one restarts the ring.
    pub fn push(&mut self, t: EncodedTrade) {
        if self.items.back().is_some_and(|b| b.seq + 1 != t.seq) {
            self.items.clear();
        }
        if self.items.len() == self.cap {
            self.items.pop_front();
        }
        self.items.push_back(t);
    }

    pub fn first_seq(&self) -> Option<i64> {
        self.items.front().map(|t| t.seq)
    }

    /// The fold of trades `after < seq <= upto` (ticker mode), if the ring
    /// holds every one of them.
    pub fn fold(&self, after: i64, upto: i64) -> Option<crate::protocol::ticker::Fold> {
        let first = self.first_seq()?;
        if after + 1 < first || upto > self.items.back()?.seq || upto <= after {
            return None;
        }
        let mut trades = self.items.iter().skip((after + 1 - first) as usize);
        let mut fold = crate::protocol::ticker::Fold::of(&trades.next()?.tick());
        for t in trades.take_while(|t| t.seq <= upto) {
            if !fold.add(&t.tick()) {
                return None;
            }
        }
        (fold.from_seq == after + 1 && fold.to_seq == upto).then_some(fold)
    }

    /// Trades with `after < seq <= upto`, if the ring holds `after + 1`.
    /// None means the range starts outside the ring: before it (evicted),
    /// or after it (committed, and known to a session that read the head
    /// from the database, but not yet published here): read the log.
    pub fn range(&self, after: i64, upto: i64) -> Option<Vec<EncodedTrade>> {
        let first = self.first_seq()?;
        let last = self.items.back()?.seq;
        if after + 1 < first || after + 1 > last {
            return None;
        }
        let skip = (after + 1 - first) as usize;
        Some(
            self.items
                .iter()
                .skip(skip)
                .take_while(|t| t.seq <= upto)
                .cloned()
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn t(seq: i64) -> EncodedTrade {
        EncodedTrade {
            seq,
            ts_micros: seq,
            yes: (seq as u16 * 37) % 9999 + 1,
            qty: seq,
            volume: seq * (seq + 1) / 2,
            frame: Bytes::from(format!("t{seq}")),
        }
    }

    #[test]
    fn the_ring_folds_only_ranges_it_holds_whole() {
        let mut r = Ring::new(4);
        for s in 1..=6 {
            r.push(t(s));
        }
        let f = r.fold(3, 6).expect("3..=6 is held");
        assert_eq!((f.from_seq, f.to_seq, f.qty, f.volume), (4, 6, 15, 21));
        assert_eq!(r.fold(1, 6), None, "2 fell out");
        assert_eq!(r.fold(5, 7), None, "7 is not here yet");
        assert_eq!(r.fold(6, 6), None, "an empty range is no fold");
    }
    fn seqs(v: &[EncodedTrade]) -> Vec<i64> {
        v.iter().map(|t| t.seq).collect()
    }

    #[test]
    fn doorbells_at_or_below_head_are_ignored() {
        let mut m = MarketCore::new(10);
        assert_eq!(m.doorbell(10), None);
        assert_eq!(m.doorbell(3), None);
        assert_eq!(m.doorbell(11), Some(Fetch { after: 10 }));
    }

    #[test]
    fn one_read_in_flight_and_a_reread_when_rung_meanwhile() {
        let mut m = MarketCore::new(0);
        assert_eq!(m.doorbell(1), Some(Fetch { after: 0 }));
        assert_eq!(m.doorbell(2), None, "a read is already in flight");
        // The read started before 2 committed and only saw 1.
        let a = m.fetched(vec![t(1)], false);
        assert_eq!(seqs(&a.publish), vec![1]);
        assert_eq!(
            a.next,
            Some(Fetch { after: 1 }),
            "2 rang during the read: read again"
        );
        let a = m.fetched(vec![t(2)], false);
        assert_eq!(seqs(&a.publish), vec![2]);
        assert_eq!(a.next, None);
    }

    #[test]
    fn a_forged_doorbell_costs_one_read_and_delivers_nothing() {
        let mut m = MarketCore::new(5);
        assert_eq!(m.doorbell(1_000_000), Some(Fetch { after: 5 }));
        let a = m.fetched(vec![], false);
        assert!(a.publish.is_empty());
        assert_eq!(
            a.next, None,
            "no endless re-reading for a seq that does not exist"
        );
        assert_eq!(m.head(), 5);
    }

    #[test]
    fn duplicates_dropped_and_holes_never_skipped() {
        let mut m = MarketCore::new(3);
        m.poke();
        let a = m.fetched(vec![t(2), t(3), t(4), t(6), t(7)], false);
        assert_eq!(seqs(&a.publish), vec![4], "stops at the hole after 4");
        assert_eq!(a.duplicates, 2);
        assert_eq!(a.next, Some(Fetch { after: 4 }));
        let a = m.fetched(vec![t(5), t(6), t(7)], false);
        assert_eq!(seqs(&a.publish), vec![5, 6, 7]);
        assert_eq!(m.head(), 7);
    }

    #[test]
    fn a_permanent_hole_is_crossed_after_one_reread() {
        let mut m = MarketCore::new(3);
        m.poke();
        let a = m.fetched(vec![t(6), t(7)], false);
        assert!(a.publish.is_empty());
        assert_eq!(a.next, Some(Fetch { after: 3 }), "read again once");
        let a = m.fetched(vec![t(6), t(7)], false);
        assert_eq!((seqs(&a.publish), a.skipped, a.next), (vec![6, 7], 2, None));
        assert_eq!(m.head(), 7);
    }

    #[test]
    fn full_pages_keep_reading() {
        let mut m = MarketCore::new(0);
        assert_eq!(m.doorbell(2), Some(Fetch { after: 0 }));
        let a = m.fetched(vec![t(1), t(2), t(3)], true);
        assert_eq!(a.next, Some(Fetch { after: 3 }));
        let a = m.fetched(vec![], false);
        assert_eq!(a.next, None);
    }

    #[test]
    fn a_read_ahead_of_queued_doorbells_repairs_nothing() {
        let mut m = MarketCore::new(0);
        assert!(m.doorbell(1).is_some());
        // 2 and 3 committed; their doorbells are still on their way.
        let a = m.fetched(vec![t(1), t(2), t(3)], false);
        assert_eq!((seqs(&a.publish), a.repaired), (vec![1, 2, 3], 0));
        assert_eq!(m.doorbell(2), None, "late doorbells are duplicates");
    }

    #[test]
    fn a_repair_read_counts_the_trades_no_doorbell_announced() {
        let mut m = MarketCore::new(0);
        assert!(m.doorbell(1).is_some());
        let a = m.fetched(vec![t(1)], false);
        assert_eq!(a.repaired, 0);
        // A reconcile sees last_seq 4; doorbells 2 and 3 were lost, 4 came.
        assert_eq!(m.doorbell(4), Some(Fetch { after: 1 }));
        let a = m.fetched(vec![t(2), t(3), t(4)], false);
        assert_eq!(a.repaired, 0, "a doorbell started this read");
        assert_eq!(m.repair(), Some(Fetch { after: 4 }));
        let a = m.fetched(vec![t(5), t(6)], false);
        assert_eq!(a.repaired, 2, "5 and 6 were never announced");
        assert_eq!(m.repair(), Some(Fetch { after: 6 }));
        let a = m.fetched(vec![], false);
        assert_eq!(a.repaired, 0, "counted once");
    }

    #[test]
    fn signed_trades_publish_only_the_next_seq() {
        let mut m = MarketCore::new(5);
        assert_eq!(m.signed(6), Signed::Publish);
        assert_eq!(m.head(), 6);
        assert_eq!(m.signed(6), Signed::Duplicate, "a replay");
        assert_eq!(m.signed(2), Signed::Duplicate);
        assert_eq!(
            m.signed(9),
            Signed::Gap(Some(Fetch { after: 6 })),
            "7 and 8 are missing: read the log"
        );
        assert_eq!(m.head(), 6, "a gap publishes nothing");
        assert_eq!(m.signed(10), Signed::Gap(None), "one read in flight");
    }

    #[test]
    fn a_read_overlapping_signed_trades_publishes_each_once_in_order() {
        let mut m = MarketCore::new(0);
        assert_eq!(m.poke(), Some(Fetch { after: 0 }));
        // While the read runs, 1 and 2 come signed and are published.
        assert_eq!(m.signed(1), Signed::Publish);
        assert_eq!(m.signed(2), Signed::Publish);
        // The read's snapshot held 1..=3.
        let a = m.fetched(vec![t(1), t(2), t(3)], false);
        assert_eq!((seqs(&a.publish), a.duplicates), (vec![3], 2));
        assert_eq!(m.signed(3), Signed::Duplicate, "3's own payload, late");
        assert_eq!(m.signed(4), Signed::Publish);
        // A read that saw less than the signed head publishes nothing.
        assert_eq!(m.poke(), Some(Fetch { after: 4 }));
        assert_eq!(m.signed(5), Signed::Publish);
        let a = m.fetched(vec![], false);
        assert!(a.publish.is_empty());
        assert_eq!(m.head(), 5);
    }

    #[test]
    fn failed_reads_release_the_slot() {
        let mut m = MarketCore::new(0);
        assert!(m.doorbell(1).is_some());
        m.fetch_failed();
        assert_eq!(m.poke(), Some(Fetch { after: 0 }));
    }

    #[test]
    fn ring_serves_only_contiguous_ranges_it_holds() {
        let mut r = Ring::new(3);
        assert_eq!(r.range(0, 10).map(|v| seqs(&v)), None);
        for s in 1..=5 {
            r.push(t(s));
        }
        assert_eq!(r.first_seq(), Some(3));
        assert_eq!(r.range(1, 5).map(|v| seqs(&v)), None, "2 fell out");
        assert_eq!(r.range(2, 5).map(|v| seqs(&v)), Some(vec![3, 4, 5]));
        assert_eq!(r.range(3, 4).map(|v| seqs(&v)), Some(vec![4]));
        assert_eq!(
            r.range(4, 9).map(|v| seqs(&v)),
            Some(vec![5]),
            "partial: the rest comes from the log"
        );
        assert_eq!(
            r.range(5, 9).map(|v| seqs(&v)),
            None,
            "6 is not here yet: read the log, never an empty page"
        );
        r.push(t(9));
        assert_eq!(r.first_seq(), Some(9), "a jump restarts the ring");
    }
}
