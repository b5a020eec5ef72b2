//! Ticker mode's fold (docs/PROTOCOL.md, "Ticker mode"): a run of
//! consecutive trades `from_seq..=to_seq` summed up as one `ticker` frame.
//! Folds are associative: the hub folds each trade once per market and
//! interval and every subscriber of that interval shares the frame; a
//! subscriber whose position falls inside a shared span (just after it
//! joined) merges what it is owed instead ([`Fold::merge`]).

use bytes::Bytes;
use serde::Serialize;

use super::frame::text_frame;
use super::trade::Rfc3339;

/// A price in ten-thousandths: `"0.6300"` is 6300. Prices are numeric(5,4)
/// in (0, 1), so a u16 holds every one exactly and no float touches them.
pub type Bp = u16;

/// `price` as the log prints it (four places) in ten-thousandths; None for
/// anything else.
pub fn parse_bp(price: &str) -> Option<Bp> {
    let (int, frac) = price.split_once('.')?;
    if frac.len() != 4 || int.is_empty() || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let v = int.parse::<u32>().ok()? * 10_000 + frac.parse::<u32>().ok()?;
    Bp::try_from(v).ok().filter(|v| *v <= 10_000)
}

/// The YES price of a trade: `price` for side `yes`, `1 - price` for `no`
/// (as `markets.last_price`).
pub fn yes_bp(side: &str, price: Bp) -> Bp {
    if side == "no" {
        10_000u16.saturating_sub(price)
    } else {
        price
    }
}

/// `6300` as `"0.6300"`.
pub fn format_bp(bp: Bp) -> String {
    format!("{}.{:04}", bp / 10_000, bp % 10_000)
}

/// What ticker mode needs of one trade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tick {
    pub seq: i64,
    pub yes: Bp,
    pub qty: i64,
    /// The market's volume after this trade.
    pub volume: i64,
    pub ts_micros: i64,
}

/// The trades `from_seq..=to_seq`, folded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fold {
    pub from_seq: i64,
    pub to_seq: i64,
    pub qty: i64,
    /// The market's volume after trade `to_seq`.
    pub volume: i64,
    pub open: Bp,
    pub high: Bp,
    pub low: Bp,
    pub last: Bp,
    /// `ts` of trade `to_seq`.
    pub ts_micros: i64,
}

impl Fold {
    pub fn of(t: &Tick) -> Fold {
        Fold {
            from_seq: t.seq,
            to_seq: t.seq,
            qty: t.qty,
            volume: t.volume,
            open: t.yes,
            high: t.yes,
            low: t.yes,
            last: t.yes,
            ts_micros: t.ts_micros,
        }
    }

    pub fn count(&self) -> i64 {
        self.to_seq - self.from_seq + 1
    }

    /// Fold in the trade right after this run. False (and nothing changed)
    /// when `t` is not `to_seq + 1`: a fold never spans a gap.
    pub fn add(&mut self, t: &Tick) -> bool {
        self.merge(&Fold::of(t))
    }

    /// Append the run right after this one. False (and nothing changed)
    /// when `later` does not start at `to_seq + 1`.
    pub fn merge(&mut self, later: &Fold) -> bool {
        if later.from_seq != self.to_seq + 1 {
            return false;
        }
        self.to_seq = later.to_seq;
        self.qty = self.qty.saturating_add(later.qty);
        self.volume = later.volume;
        self.high = self.high.max(later.high);
        self.low = self.low.min(later.low);
        self.last = later.last;
        self.ts_micros = later.ts_micros;
        true
    }

    /// `a` then `b`, whichever may be empty.
    pub fn join(a: Option<Fold>, b: Fold) -> Option<Fold> {
        match a {
            None => Some(b),
            Some(mut a) => a.merge(&b).then_some(a),
        }
    }

    /// The `ticker` frame for `market`.
    pub fn encode(&self, market: &str) -> Bytes {
        #[derive(Serialize)]
        struct TickerJson<'a> {
            #[serde(rename = "type")]
            kind: &'static str,
            market: &'a str,
            from_seq: i64,
            to_seq: i64,
            count: i64,
            qty: i64,
            volume: i64,
            open: String,
            high: String,
            low: String,
            last_price: String,
            ts: Rfc3339,
        }
        let v = TickerJson {
            kind: "ticker",
            market,
            from_seq: self.from_seq,
            to_seq: self.to_seq,
            count: self.count(),
            qty: self.qty,
            volume: self.volume,
            open: format_bp(self.open),
            high: format_bp(self.high),
            low: format_bp(self.low),
            last_price: format_bp(self.last),
            ts: Rfc3339(self.ts_micros),
        };
        text_frame(&serde_json::to_vec(&v).expect("plain fields serialise"))
    }
}

/// A fold as the hub shares it: encoded once, with when it was emitted (the
/// interval rule of every subscriber that takes it counts from then).
#[derive(Debug, Clone)]
pub struct TickerFrame {
    pub fold: Fold,
    pub emitted_at: std::time::Instant,
    pub frame: Bytes,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tick(seq: i64, yes: Bp, qty: i64, volume: i64) -> Tick {
        Tick {
            seq,
            yes,
            qty,
            volume,
            ts_micros: 1_795_757_462_123_456 + seq,
        }
    }

    #[test]
    fn prices_parse_exactly_and_no_is_one_minus_price() {
        assert_eq!(parse_bp("0.6300"), Some(6300));
        assert_eq!(parse_bp("0.0001"), Some(1));
        assert_eq!(parse_bp("1.0000"), Some(10_000));
        for bad in ["0.63", "x.6300", ".6300", "0.63000", "2.0000", "0.-100"] {
            assert_eq!(parse_bp(bad), None, "{bad}");
        }
        assert_eq!(yes_bp("no", 3700), 6300);
        assert_eq!(yes_bp("yes", 3700), 3700);
        assert_eq!(format_bp(6300), "0.6300");
        assert_eq!(format_bp(1), "0.0001");
    }

    #[test]
    fn a_fold_sums_up_exactly_its_trades() {
        let mut f = Fold::of(&tick(1042, 6200, 10, 110));
        assert!(f.add(&tick(1043, 6400, 5, 115)));
        assert!(f.add(&tick(1044, 6100, 1, 116)));
        assert!(f.add(&tick(1045, 6300, 4, 120)));
        assert_eq!(
            (f.from_seq, f.to_seq, f.count(), f.qty, f.volume),
            (1042, 1045, 4, 20, 120)
        );
        assert_eq!((f.open, f.high, f.low, f.last), (6200, 6400, 6100, 6300));
        assert_eq!(f.ts_micros, tick(1045, 0, 0, 0).ts_micros);
        assert!(!f.add(&tick(1047, 1, 1, 1)), "never across a gap");
        assert_eq!(f.to_seq, 1045);
    }

    #[test]
    fn merging_runs_equals_folding_their_trades() {
        let ticks: Vec<Tick> = (1..=9)
            .map(|s| tick(s, (s as u16 * 997) % 9999 + 1, s, s * (s + 1) / 2))
            .collect();
        let mut whole = Fold::of(&ticks[0]);
        for t in &ticks[1..] {
            assert!(whole.add(t));
        }
        for cut in 1..ticks.len() {
            let mut a = Fold::of(&ticks[0]);
            ticks[1..cut].iter().for_each(|t| assert!(a.add(t)));
            let mut b = Fold::of(&ticks[cut]);
            ticks[cut + 1..].iter().for_each(|t| assert!(b.add(t)));
            assert_eq!(Fold::join(Some(a), b), Some(whole), "cut at {cut}");
        }
        let later = Fold::of(&ticks[5]);
        assert_eq!(Fold::join(Some(Fold::of(&ticks[0])), later), None);
    }

    #[test]
    fn the_frame_is_the_contracts_ticker() {
        let mut f = Fold::of(&tick(1042, 6200, 300, 119_724));
        f.add(&tick(1050, 6300, 10, 120_034));
        let f = Fold {
            to_seq: 1050,
            qty: 310,
            volume: 120_034,
            high: 6400,
            low: 6100,
            last: 6300,
            ts_micros: 1_795_757_462_123_456,
            ..f
        };
        let b = f.encode("ELECTION-2028");
        let at = b.iter().position(|&c| c == b'{').unwrap();
        assert_eq!(
            std::str::from_utf8(&b[at..]).unwrap(),
            r#"{"type":"ticker","market":"ELECTION-2028","from_seq":1042,"to_seq":1050,"count":9,"qty":310,"volume":120034,"open":"0.6200","high":"0.6400","low":"0.6100","last_price":"0.6300","ts":"2026-11-27T05:31:02.123456Z"}"#
        );
    }
}
