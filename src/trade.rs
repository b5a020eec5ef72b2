//! The two records of the contract, as rows and as JSON: a market's state and a
//! trade. A trade is encoded exactly once per process that sends it: the writer
//! into its HTTP answer, the broadcaster into a complete WebSocket text frame
//! ([`EncodedTrade`]) whose bytes every subscriber then shares.

use bytes::Bytes;
use fastwebsockets::{Frame, Payload};
use serde::Serialize;
use tokio_postgres::Row;

/// Whether `id` is a market id: `^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$`
/// (PROTOCOL.md; the `markets` table has the same CHECK). The writer answers
/// 422 for anything else, and the listener drops doorbells naming anything
/// else: no such market can exist.
pub fn is_market_id(id: &str) -> bool {
    let b = id.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && b[0].is_ascii_alphanumeric()
        && b[1..]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || b"_.:-".contains(c))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trade {
    pub trade_id: i64,
    pub market: String,
    pub seq: i64,
    pub side: String,
    /// numeric(5,4) as Postgres prints it: always four places.
    pub price: String,
    pub qty: i64,
    /// Commit-side time in microseconds since the Unix epoch; sent as `ts`,
    /// RFC 3339 UTC with six fraction digits.
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
struct Rfc3339(i64);

impl Serialize for Rfc3339 {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_rfc3339_micros(unix_time(self.0)))
    }
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
    /// From a row selected with [`crate::db::TRADE_COLUMNS`].
    pub fn from_row(r: &'a Row) -> Self {
        let ts: PgTimestamp = r.get(6);
        TradeRef {
            trade_id: r.get(0),
            market: r.get(1),
            seq: r.get(2),
            side: r.get(3),
            price: r.get(4),
            qty: r.get(5),
            ts_micros: ts.unix_micros(),
        }
    }

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
            frame: Bytes::from(buf).slice(ROOM - n..),
        }
    }
}

impl Trade {
    /// From a row selected with [`crate::db::TRADE_COLUMNS`].
    pub fn from_row(r: &Row) -> Self {
        let t = TradeRef::from_row(r);
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

    fn as_ref(&self) -> TradeRef<'_> {
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

    pub fn encode(&self) -> EncodedTrade {
        self.as_ref().encode()
    }
}

/// A `timestamptz` in Postgres's binary form: microseconds since 2000-01-01 UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PgTimestamp(pub i64);

/// 2000-01-01T00:00:00Z in Unix microseconds.
const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

impl PgTimestamp {
    pub fn unix_micros(self) -> i64 {
        self.0 + PG_EPOCH_UNIX_MICROS
    }
}

impl<'a> tokio_postgres::types::FromSql<'a> for PgTimestamp {
    fn from_sql(
        _: &tokio_postgres::types::Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        let b: [u8; 8] = raw.try_into()?;
        Ok(PgTimestamp(i64::from_be_bytes(b)))
    }
    fn accepts(ty: &tokio_postgres::types::Type) -> bool {
        *ty == tokio_postgres::types::Type::TIMESTAMPTZ
    }
}

/// RFC 3339, UTC, exactly six fraction digits and `Z`, as the contract says.
pub fn format_ts(unix_micros: i64) -> String {
    humantime::format_rfc3339_micros(unix_time(unix_micros)).to_string()
}

fn unix_time(unix_micros: i64) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + std::time::Duration::from_micros(unix_micros.max(0) as u64)
}

/// A trade as the bytes of one server-to-client WebSocket text frame (header
/// included). Server frames are unmasked, so the same bytes are valid on every
/// connection; cloning is a reference-count increment.
#[derive(Debug, Clone)]
pub struct EncodedTrade {
    pub seq: i64,
    /// Commit-side timestamp, for the commit-to-send lag metric.
    pub ts_micros: i64,
    pub frame: Bytes,
}

/// Encode a complete unmasked text frame. Used for every server message, so
/// that the session writer deals only in ready-to-send bytes.
pub fn text_frame(payload: &[u8]) -> Bytes {
    let mut buf = Vec::with_capacity(payload.len() + 10);
    let n = Frame::text(Payload::Borrowed(payload))
        .write(&mut buf)
        .len();
    buf.truncate(n);
    Bytes::from(buf)
}

/// A control frame (close, ping, pong) as bytes.
pub fn control_frame(frame: Frame<'_>) -> Bytes {
    let mut frame = frame;
    let mut buf = Vec::with_capacity(frame.payload.len() + 10);
    let n = frame.write(&mut buf).len();
    buf.truncate(n);
    Bytes::from(buf)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Market {
    pub market: String,
    pub title: String,
    pub status: String,
    pub shard: i32,
    pub epoch: String,
    pub head_seq: i64,
    pub last_price: Option<String>,
    pub volume: i64,
}

impl Market {
    /// From a row selected with [`crate::db::MARKET_COLUMNS`].
    pub fn from_row(r: &Row) -> Self {
        Market {
            market: r.get(0),
            title: r.get(1),
            status: r.get(2),
            shard: r.get(3),
            epoch: r.get(4),
            head_seq: r.get(5),
            last_price: r.get(6),
            volume: r.get(7),
        }
    }
}

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
    fn timestamps_format_as_the_contract_says() {
        // 2026-11-27T05:31:02.123456Z
        let unix = 1_795_757_462_123_456;
        assert_eq!(format_ts(unix), "2026-11-27T05:31:02.123456Z");
        assert_eq!(
            format_ts(1_795_757_462_000_000),
            "2026-11-27T05:31:02.000000Z"
        );
        assert_eq!(PgTimestamp(unix - PG_EPOCH_UNIX_MICROS).unix_micros(), unix);
    }

    #[test]
    fn frames_carry_the_payload_unmasked() {
        let json = t().to_json();
        let f = t().encode().frame;
        assert_eq!(f[0], 0x81, "FIN + text opcode");
        // 126..=65535 bytes: 16-bit length, mask bit clear.
        assert_eq!(
            (f[1], u16::from_be_bytes([f[2], f[3]]) as usize),
            (126, json.len())
        );
        assert_eq!(&f[4..], &json[..]);
        let short = text_frame(b"hi");
        assert_eq!(&short[..], &[0x81, 2, b'h', b'i']);

        let long = vec![b'x'; 300];
        let f = text_frame(&long);
        assert_eq!((f[1], u16::from_be_bytes([f[2], f[3]])), (126, 300));
        assert_eq!(&f[4..], &long[..]);
    }
}
