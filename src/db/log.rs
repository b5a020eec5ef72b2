//! Reads of the log and the market rows: the broadcaster's hot reads (the
//! hub's batched reads, replays), the writer's GETs, health probes, the
//! hub's reconcile, and the keys that verify signed notifications.
//!
//! The writer's reads ([`market`], [`markets`], [`markets_matching`],
//! [`trades_page`]) are unnamed statements (`query_typed`, one round trip,
//! nothing left on the server connection), so they survive transaction
//! pooling like the writes (`db::write`'s module doc). The broadcaster's hot
//! reads keep named statements prepared once per pooled connection: the
//! broadcaster connects directly (docs/OPERATIONS.md "Behind a pooler").

use super::rows::{self, MARKET_COLUMNS, TRADE_COLUMNS};
use super::DbError;
use crate::protocol::market::Market;
use crate::protocol::token::Patterns;
use crate::protocol::trade::{EncodedTrade, Trade};
use tokio_postgres::types::Type;

/// The keys of `marketcast_notify_keys` (sql/0005) as `(id, key)`: the
/// listener verifies signed notifications with them. 42P01 before that
/// migration, 42501 for a role that is not `marketcast_broadcaster`.
pub async fn notify_keys(client: &tokio_postgres::Client) -> Result<Vec<(i32, Vec<u8>)>, DbError> {
    Ok(client
        .query_typed("SELECT id, key FROM marketcast_notify_keys", &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

pub async fn market(client: &tokio_postgres::Client, id: &str) -> Result<Option<Market>, DbError> {
    let sql = format!("SELECT {MARKET_COLUMNS} FROM markets WHERE id = $1");
    Ok(client
        .query_typed_opt(&sql, &[(&id, Type::TEXT)])
        .await?
        .map(|r| rows::market(&r)))
}

/// Trades with `after < seq <= upto` (upto None: no upper bound), in seq order,
/// at most `limit`. The hot read of the broadcaster (hub and catch-up): its
/// statement is prepared once per pooled connection.
pub async fn trades_after(
    client: &deadpool_postgres::Client,
    market: &str,
    after: i64,
    upto: Option<i64>,
    limit: i64,
) -> Result<Vec<Trade>, DbError> {
    let found = trade_rows_after(client, market, after, upto, limit).await?;
    Ok(found.iter().map(rows::trade).collect())
}

/// [`trades_after`] as an unnamed statement (the writer's `GET
/// /v1/markets/{id}/trades`): a page that survives transaction pooling.
pub async fn trades_page(
    client: &tokio_postgres::Client,
    market: &str,
    after: i64,
    limit: i64,
) -> Result<Vec<Trade>, DbError> {
    let found = client
        .query_typed(
            &TRADES_AFTER,
            &[
                (&market, Type::TEXT),
                (&after, Type::INT8),
                (&i64::MAX, Type::INT8),
                (&limit, Type::INT8),
            ],
        )
        .await?;
    Ok(found.iter().map(rows::trade).collect())
}

/// [`trades_after`], each trade encoded into its WebSocket frame straight
/// from the row (replays).
pub async fn trade_frames_after(
    client: &deadpool_postgres::Client,
    market: &str,
    after: i64,
    upto: Option<i64>,
    limit: i64,
) -> Result<Vec<EncodedTrade>, DbError> {
    let found = trade_rows_after(client, market, after, upto, limit).await?;
    Ok(found.iter().map(|r| rows::trade_ref(r).encode()).collect())
}

/// `after < seq <= upto` of one market, at most `limit`, in seq order.
static TRADES_AFTER: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "SELECT {TRADE_COLUMNS} FROM trades WHERE market_id = $1 AND seq > $2 AND seq <= $3 ORDER BY seq LIMIT $4"
    )
});

async fn trade_rows_after(
    client: &deadpool_postgres::Client,
    market: &str,
    after: i64,
    upto: Option<i64>,
    limit: i64,
) -> Result<Vec<tokio_postgres::Row>, DbError> {
    let stmt = client.prepare_cached(&TRADES_AFTER).await?;
    Ok(client
        .query(&stmt, &[&market, &after, &upto.unwrap_or(i64::MAX), &limit])
        .await?)
}

/// For each `(markets[i], afters[i])`: trades with `seq > after`, in seq
/// order, at most `limit` per market; one query for all of them (the hub's
/// batched read), each encoded into its WebSocket frame straight from the
/// row. The result is aligned with `markets`; each market must appear once.
pub async fn trade_frames_after_many(
    client: &deadpool_postgres::Client,
    markets: &[String],
    afters: &[i64],
    limit: i64,
) -> Result<Vec<Vec<EncodedTrade>>, DbError> {
    static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "SELECT t.* FROM unnest($1::text[], $2::bigint[]) AS d(m, after) \
             CROSS JOIN LATERAL (SELECT {TRADE_COLUMNS} FROM trades \
               WHERE market_id = d.m AND seq > d.after ORDER BY seq LIMIT $3) t \
             ORDER BY t.market_id, t.seq"
        )
    });
    let stmt = client.prepare_cached(&SQL).await?;
    let found = client.query(&stmt, &[&markets, &afters, &limit]).await?;
    let at: std::collections::HashMap<&str, usize> = markets
        .iter()
        .enumerate()
        .map(|(i, m)| (m.as_str(), i))
        .collect();
    let mut out: Vec<Vec<EncodedTrade>> = markets.iter().map(|_| Vec::new()).collect();
    for r in &found {
        let t = rows::trade_ref(r);
        if let Some(&i) = at.get(t.market) {
            out[i].push(t.encode());
        }
    }
    Ok(out)
}

/// The fold of trades `after < seq <= upto` (ticker mode), in one
/// statement, so the market's volume and the trades are one snapshot. None
/// when the log does not hold every one of them (pruned).
pub async fn fold(
    client: &tokio_postgres::Client,
    market: &str,
    after: i64,
    upto: i64,
) -> Result<Option<crate::protocol::ticker::Fold>, DbError> {
    const SQL: &str = "WITH r AS ( \
           SELECT seq, qty, created_at, \
                  CASE WHEN side = 'no' THEN 1 - price ELSE price END AS yes \
           FROM trades WHERE market_id = $1 AND seq > $2 AND seq <= $3) \
         SELECT count(*), coalesce(sum(qty), 0)::bigint, \
           (SELECT yes::text FROM r ORDER BY seq LIMIT 1), \
           max(yes)::text, min(yes)::text, \
           (SELECT yes::text FROM r ORDER BY seq DESC LIMIT 1), \
           (SELECT created_at FROM r ORDER BY seq DESC LIMIT 1), \
           (SELECT volume FROM markets WHERE id = $1) \
             - coalesce((SELECT sum(qty) FROM trades WHERE market_id = $1 AND seq > $3), 0)::bigint \
         FROM r";
    let row = client.query_one(SQL, &[&market, &after, &upto]).await?;
    Ok(rows::fold(&row, after, upto))
}

/// The lowest seq still in the log for a market (None: no trade at all).
pub async fn earliest_seq(
    client: &tokio_postgres::Client,
    market: &str,
) -> Result<Option<i64>, DbError> {
    let row = client
        .query_one(
            "SELECT min(seq) FROM trades WHERE market_id = $1",
            &[&market],
        )
        .await?;
    Ok(row.get(0))
}

/// Markets with an id above `after` (None: from the first), by id, at most
/// `limit` (the writer's `GET /v1/markets`).
pub async fn markets(
    client: &tokio_postgres::Client,
    after: Option<&str>,
    limit: i64,
) -> Result<Vec<Market>, DbError> {
    let sql = format!(
        "SELECT {MARKET_COLUMNS} FROM markets WHERE $1::text IS NULL OR id > $1 ORDER BY id LIMIT $2"
    );
    Ok(client
        .query_typed(&sql, &[(&after, Type::TEXT), (&limit, Type::INT8)])
        .await?
        .iter()
        .map(rows::market)
        .collect())
}

/// As [`markets`], but only the markets `granted` matches (a token's
/// `markets` claim, contract 1.1 section 4.1): filtered before the `LIMIT`,
/// so paging by `after` works as it does without a token.
pub async fn markets_matching(
    client: &tokio_postgres::Client,
    after: Option<&str>,
    limit: i64,
    granted: &Patterns,
) -> Result<Vec<Market>, DbError> {
    let (ids, prefixes) = granted.ids_and_prefixes();
    // starts_with, not LIKE: `_` and `%` are market id characters.
    let sql = format!(
        "SELECT {MARKET_COLUMNS} FROM markets
         WHERE ($1::text IS NULL OR id > $1)
           AND (id = ANY($3) OR EXISTS (SELECT 1 FROM unnest($4::text[]) AS p(prefix)
                                        WHERE starts_with(id, p.prefix)))
         ORDER BY id LIMIT $2"
    );
    Ok(client
        .query_typed(
            &sql,
            &[
                (&after, Type::TEXT),
                (&limit, Type::INT8),
                (&ids, Type::TEXT_ARRAY),
                (&prefixes, Type::TEXT_ARRAY),
            ],
        )
        .await?
        .iter()
        .map(rows::market)
        .collect())
}

/// `markets.last_seq` of each of `ids` that exists (the hub's reconcile).
pub async fn heads(
    client: &tokio_postgres::Client,
    ids: &[String],
) -> Result<Vec<(String, i64)>, DbError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    Ok(client
        .query(
            "SELECT id, last_seq FROM markets WHERE id = ANY($1)",
            &[&ids],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// `pg_notification_queue_usage()`: the fraction of the cluster's NOTIFY
/// queue in use.
pub async fn notify_queue_usage(client: &tokio_postgres::Client) -> Result<f64, DbError> {
    Ok(client
        .query_one("SELECT pg_notification_queue_usage()", &[])
        .await?
        .get(0))
}

/// The cheapest round trip, for health checks.
pub async fn ping(client: &tokio_postgres::Client) -> Result<(), DbError> {
    client.simple_query("SELECT 1").await?;
    Ok(())
}

/// The YES price (basis points; 5000 before any trade) of every open market
/// (the demo's synthetic flow).
pub async fn open_market_prices(
    client: &tokio_postgres::Client,
) -> Result<Vec<(String, i64)>, DbError> {
    Ok(client
        .query(
            "SELECT id, coalesce(round(last_price * 10000), 5000)::int8 FROM markets \
             WHERE status = 'open' ORDER BY id",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}
