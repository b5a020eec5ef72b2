//! A market: its id grammar and its state as the contract shows it.

use serde::Serialize;

/// Whether `id` is a market id: `^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$`
/// (docs/PROTOCOL.md; the `markets` table has the same CHECK). The writer
/// answers 422 for anything else, and the listener drops doorbells naming
/// anything else: no such market can exist.
pub fn is_market_id(id: &str) -> bool {
    let b = id.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && b[0].is_ascii_alphanumeric()
        && b[1..]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || b"_.:-".contains(c))
}

/// A market's state: the writer's `GET /v1/markets/{id}` body, and what a
/// `subscribed` reply reports.
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
