//! The only code that knows column positions: each SELECT list and the
//! function that reads a row of it sit side by side, so they cannot drift
//! apart.

use tokio_postgres::Row;

use crate::protocol::market::Market;
use crate::protocol::trade::{Trade, TradeRef};

/// The columns of a trade, in [`trade_ref`] order. Price comes as numeric's
/// own text form, which for numeric(5,4) always has four places (no float
/// ever touches a price); `created_at` comes binary and is formatted once in
/// Rust ([`PgTimestamp`]), which keeps the per-row work off the database.
pub const TRADE_COLUMNS: &str = "trade_id, market_id, seq, side, price::text, qty, created_at";

/// The columns of a market, in [`market`] order.
pub const MARKET_COLUMNS: &str =
    "id, title, status, shard, epoch, last_seq, last_price::text, volume";

/// A trade borrowed from a row selected with [`TRADE_COLUMNS`].
pub fn trade_ref(r: &Row) -> TradeRef<'_> {
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

/// An owned trade from a row selected with [`TRADE_COLUMNS`].
pub fn trade(r: &Row) -> Trade {
    trade_ref(r).into()
}

/// A market from a row selected with [`MARKET_COLUMNS`].
pub fn market(r: &Row) -> Market {
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

/// A fold of `after < seq <= upto` from the row of [`super::log::fold`]:
/// count, qty, open, high, low, last, ts of the last, volume after it. None
/// unless the log held every trade of the range.
pub fn fold(r: &Row, after: i64, upto: i64) -> Option<crate::protocol::ticker::Fold> {
    use crate::protocol::ticker::parse_bp;
    let count: i64 = r.get(0);
    if count != upto - after || count == 0 {
        return None;
    }
    let bp = |i: usize| r.get::<_, Option<&str>>(i).and_then(parse_bp);
    let ts: Option<PgTimestamp> = r.get(6);
    Some(crate::protocol::ticker::Fold {
        from_seq: after + 1,
        to_seq: upto,
        qty: r.get(1),
        volume: r.get::<_, Option<i64>>(7)?,
        open: bp(2)?,
        high: bp(3)?,
        low: bp(4)?,
        last: bp(5)?,
        ts_micros: ts?.unix_micros(),
    })
}

/// A `timestamptz` in Postgres's binary form: microseconds since 2000-01-01 UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PgTimestamp(pub i64);

/// 2000-01-01T00:00:00Z in Unix microseconds.
const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

impl PgTimestamp {
    /// Saturating: `infinity` is i64::MAX here, and must not overflow.
    pub fn unix_micros(self) -> i64 {
        self.0.saturating_add(PG_EPOCH_UNIX_MICROS)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_count_from_the_postgres_epoch() {
        // 2026-11-27T05:31:02.123456Z
        let unix = 1_795_757_462_123_456;
        assert_eq!(PgTimestamp(unix - PG_EPOCH_UNIX_MICROS).unix_micros(), unix);
        assert_eq!(PgTimestamp(0).unix_micros(), 946_684_800_000_000);
        assert_eq!(PgTimestamp(i64::MAX).unix_micros(), i64::MAX, "infinity");
    }
}
