//! A trade, as the contract's JSON and as a ready WebSocket frame. A trade is
//! encoded exactly once per process that sends it: the writer into its HTTP
//! answer, the broadcaster into a complete text frame ([`EncodedTrade`])
//! whose bytes every subscriber then shares.

use bytes::Bytes;
use fastwebsockets::{Frame, Payload};
use serde::Serialize;

use super::ticker::{parse_bp, yes_bp, Bp, Tick};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trade {
    pub trade_id: i64,
    pub market: String,
    pub seq: i64,
    pub side: String,
    /// numeric(5,4) as Postgres prints it: always four places.
    pub price: String,
    pub qty: i64,
    /// The time the trigger stamped on the row (`created_at`), in
    /// microseconds since the Unix epoch; sent as `ts`, RFC 3339 UTC with six
    /// fraction digits.
    pub ts_micros: i64,
}

#[derive(Serialize)]
struct TradeJson<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    market: &'a str,
    seq: i64,
    trade_id: i64,
    side: &'a str,
    price: &'a str,
    qty: i64,
    ts: Rfc3339,
}

/// Serialised by formatting straight into the output: no String per trade.
pub(crate) struct Rfc3339(pub(crate) i64);

impl Serialize for Rfc3339 {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_rfc3339_micros(unix_time(self.0)))
    }
}

/// 9999-12-31T23:59:59.999999Z, the last instant RFC 3339 can write.
const MAX_TS_MICROS: i64 = 253_402_300_799_999_999;

/// A `ts` outside what RFC 3339 can write (before 1970, after 9999, or
/// Postgres's `infinity`: only the table's owner can store one) is sent
/// clamped to 1970-01-01T00:00:00Z ..= 9999-12-31T23:59:59.999999Z: one odd
/// row costs that row its timestamp, never the market its feed (it used to
/// panic the read that encoded it).
fn unix_time(unix_micros: i64) -> std::time::SystemTime {
    let clamped = unix_micros.clamp(0, MAX_TS_MICROS) as u64;
    std::time::UNIX_EPOCH + std::time::Duration::from_micros(clamped)
}

/// A trade borrowed from a log row. The broadcaster's hot paths (the hub's
/// reads, replays) encode rows through this, never copying a string out of
/// the row: a replay page of 1,000 trades made 7,000 allocations before
/// (perf: malloc and free were a fifth of a replay's CPU).
#[derive(Debug, Clone, Copy)]
pub struct TradeRef<'a> {
    pub trade_id: i64,
    pub market: &'a str,
    pub seq: i64,
    pub side: &'a str,
    pub price: &'a str,
    pub qty: i64,
    pub ts_micros: i64,
}

impl<'a> TradeRef<'a> {
    fn json(&self) -> TradeJson<'a> {
        TradeJson {
            kind: "trade",
            market: self.market,
            seq: self.seq,
            trade_id: self.trade_id,
            side: self.side,
            price: self.price,
            qty: self.qty,
            ts: Rfc3339(self.ts_micros),
        }
    }

    /// The complete WebSocket frame: the JSON is written after room for the
    /// frame header, which then goes right in front of it, so the frame is
    /// one allocation and no copy.
    pub fn encode(&self) -> EncodedTrade {
        const ROOM: usize = 10; // the longest header of an unmasked frame
        let mut buf = Vec::with_capacity(ROOM + 176 + self.market.len());
        buf.resize(ROOM, 0);
        serde_json::to_writer(&mut buf, &self.json())
            .expect("serialising plain fields into a Vec cannot fail");
        let mut head = [0u8; ROOM];
        let n = Frame::text(Payload::Borrowed(&buf[ROOM..])).fmt_head(&mut head);
        buf[ROOM - n..ROOM].copy_from_slice(&head[..n]);
        EncodedTrade {
            seq: self.seq,
            ts_micros: self.ts_micros,
            yes: yes_bp(self.side, parse_bp(self.price).unwrap_or(0)),
            qty: self.qty,
            volume: 0,
            frame: Bytes::from(buf).slice(ROOM - n..),
        }
    }
}

impl Trade {
    pub fn as_ref(&self) -> TradeRef<'_> {
        TradeRef {
            trade_id: self.trade_id,
            market: &self.market,
            seq: self.seq,
            side: &self.side,
            price: &self.price,
            qty: self.qty,
            ts_micros: self.ts_micros,
        }
    }

    /// The `trade` message of the contract, identical for the WebSocket and
    /// the writer's HTTP answer.
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(176 + self.market.len());
        serde_json::to_writer(&mut out, &self.as_ref().json())
            .expect("serialising plain fields into a Vec cannot fail");
        out
    }
}

impl From<TradeRef<'_>> for Trade {
    fn from(t: TradeRef<'_>) -> Self {
        Trade {
            trade_id: t.trade_id,
            market: t.market.to_string(),
            seq: t.seq,
            side: t.side.to_string(),
            price: t.price.to_string(),
            qty: t.qty,
            ts_micros: t.ts_micros,
        }
    }
}

/// A trade as the bytes of one server-to-client WebSocket text frame (header
/// included). Cloning is a reference-count increment.
#[derive(Debug, Clone)]
pub struct EncodedTrade {
    pub seq: i64,
    /// The row's `created_at`, for the commit-to-send lag metric.
    pub ts_micros: i64,
    /// The YES price and the quantity, for ticker folds.
    pub yes: Bp,
    pub qty: i64,
    /// The market's volume after this trade. Known only for the trades the
    /// hub publishes (it keeps each market's volume: the ring and live
    /// queues); 0 on a trade a replay read from the log.
    pub volume: i64,
    pub frame: Bytes,
}

impl EncodedTrade {
    /// What a ticker fold needs of this trade.
    pub fn tick(&self) -> Tick {
        Tick {
            seq: self.seq,
            yes: self.yes,
            qty: self.qty,
            volume: self.volume,
            ts_micros: self.ts_micros,
        }
    }

    /// Not a trade: the broadcaster's notice, on a market's live queue,
    /// that the queue was replaced and its receivers must move to the new
    /// one (`broadcaster::hub::MarketShared`). Never sent to a client.
    pub fn moved() -> Self {
        EncodedTrade {
            seq: MOVED,
            ts_micros: 0,
            yes: 0,
            qty: 0,
            volume: 0,
            frame: Bytes::new(),
        }
    }

    pub fn is_moved(&self) -> bool {
        self.seq == MOVED
    }
}

/// The seq of [`EncodedTrade::moved`]: no trade has it (seqs start at 1).
const MOVED: i64 = i64::MIN;

#[cfg(test)]
mod tests {
    use super::*;

    fn t() -> Trade {
        Trade {
            trade_id: 88123,
            market: "ELECTION-2028".into(),
            seq: 1042,
            side: "yes".into(),
            price: "0.6300".into(),
            qty: 25,
            ts_micros: 1_795_757_462_123_456, // 2026-11-27T05:31:02.123456Z
        }
    }

    #[test]
    fn trade_json_matches_the_contract() {
        assert_eq!(
            String::from_utf8(t().to_json()).unwrap(),
            r#"{"type":"trade","market":"ELECTION-2028","seq":1042,"trade_id":88123,"side":"yes","price":"0.6300","qty":25,"ts":"2026-11-27T05:31:02.123456Z"}"#
        );
    }

    #[test]
    fn timestamps_keep_six_fraction_digits() {
        let whole = Trade {
            ts_micros: 1_795_757_462_000_000,
            ..t()
        };
        let json: serde_json::Value = serde_json::from_slice(&whole.to_json()).unwrap();
        assert_eq!(json["ts"], "2026-11-27T05:31:02.000000Z");
    }

    #[test]
    fn timestamps_outside_rfc3339_are_clamped_never_a_panic() {
        let ts = |micros| {
            let t = Trade {
                ts_micros: micros,
                ..t()
            };
            let json: serde_json::Value = serde_json::from_slice(&t.to_json()).unwrap();
            json["ts"].as_str().unwrap().to_string()
        };
        assert_eq!(ts(i64::MAX), "9999-12-31T23:59:59.999999Z");
        assert_eq!(ts(MAX_TS_MICROS + 1), "9999-12-31T23:59:59.999999Z");
        assert_eq!(ts(-1), "1970-01-01T00:00:00.000000Z");
        assert_eq!(ts(i64::MIN), "1970-01-01T00:00:00.000000Z");
    }

    #[test]
    fn frames_carry_the_json_unmasked() {
        let json = t().to_json();
        let f = t().as_ref().encode().frame;
        assert_eq!(f[0], 0x81, "FIN + text opcode");
        // 126..=65535 bytes: 16-bit length, mask bit clear.
        assert_eq!(
            (f[1], u16::from_be_bytes([f[2], f[3]]) as usize),
            (126, json.len())
        );
        assert_eq!(&f[4..], &json[..]);
    }
}
