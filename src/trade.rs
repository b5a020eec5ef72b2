//! The two records of the contract, as rows and as JSON: a market's state and a
//! trade. A trade is encoded exactly once per process that sends it: the writer
//! into its HTTP answer, the broadcaster into a complete WebSocket text frame
//! ([`EncodedTrade`]) whose bytes every subscriber then shares.

use bytes::Bytes;
use fastwebsockets::{Frame, Payload};
use serde::Serialize;
use tokio_postgres::Row;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trade {
    pub trade_id: i64,
    pub market: String,
    pub seq: i64,
    pub side: String,
    /// numeric(5,4) as Postgres prints it: always four places.
    pub price: String,
    pub qty: i64,
    /// RFC 3339 UTC with six fraction digits, formatted by Postgres.
    pub ts: String,
    /// The same instant in microseconds since the Unix epoch (for lag metrics; not sent).
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
    ts: &'a str,
}

impl Trade {
    /// From a row selected with [`crate::db::TRADE_COLUMNS`].
    pub fn from_row(r: &Row) -> Self {
        Trade {
            trade_id: r.get(0),
            market: r.get(1),
            seq: r.get(2),
            side: r.get(3),
            price: r.get(4),
            qty: r.get(5),
            ts: r.get(6),
            ts_micros: r.get(7),
        }
    }

    /// The `trade` message of the contract, identical for the WebSocket and
    /// the writer's HTTP answer.
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(160 + self.market.len());
        serde_json::to_writer(
            &mut out,
            &TradeJson {
                kind: "trade",
                market: &self.market,
                seq: self.seq,
                trade_id: self.trade_id,
                side: &self.side,
                price: &self.price,
                qty: self.qty,
                ts: &self.ts,
            },
        )
        .expect("serialising plain fields into a Vec cannot fail");
        out
    }

    pub fn encode(&self) -> EncodedTrade {
        EncodedTrade {
            seq: self.seq,
            ts_micros: self.ts_micros,
            frame: text_frame(&self.to_json()),
        }
    }
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
            ts: "2026-11-27T05:31:02.123456Z".into(),
            ts_micros: 0,
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
