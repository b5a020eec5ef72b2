//! The INSERTs of the write path. Each function returns what the database
//! decided about each trade ([`Written`]) or why nothing is known to have
//! committed ([`WriteError`]); the writer turns both into HTTP answers.
//!
//! Every step before COMMIT is bounded by the caller's deadline: past it the
//! running statement is cancelled and the transaction rolls back, so the
//! answer "nothing committed" stays true. COMMIT itself gets a short grace
//! period; past that, or if the connection dies during it, the outcome is
//! unknown and said so ([`WriteError::OutcomeUnknown`]).
//!
//! Every statement here survives transaction pooling (PgBouncer in
//! transaction mode, docs/OPERATIONS.md "Behind a pooler"): each is
//! `query_typed`, an unnamed statement sent as one Parse/Bind/Execute/Sync,
//! never a named prepared statement that a later transaction (on another
//! server connection) would not find; the only setting is [`with_bound`]'s
//! `SET LOCAL`, which ends with its transaction. Every column is of a
//! built-in type, so decoding rows never runs tokio-postgres's (prepared)
//! type lookup either.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use super::rows::{self, MARKET_COLUMNS, TRADE_COLUMNS};
use super::DbError;
use crate::protocol::market::Market;
use crate::protocol::trade::Trade;
use crate::protocol::write_api::NewTrade;
use deadpool_postgres::Pool;
use tokio_postgres::types::Type;

/// Extra time a COMMIT may take past the request deadline.
const COMMIT_GRACE: Duration = Duration::from_millis(500);

/// How much later than the caller's deadline the server-side bound
/// ([`with_bound`]) fires: the client's own timeout (which cancels and answers
/// "timed out") normally comes first; the server's is the backstop for a
/// client that can no longer cancel.
const SERVER_BOUND_SLACK: Duration = Duration::from_millis(250);

/// What the database decided for one trade request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written {
    /// Inserted by this request.
    Created(Trade),
    /// Its client_order_id was used before: the original trade.
    Existing(Trade),
    /// No market with this id.
    UnknownMarket(String),
    /// The market exists but is not open (`status` is what it is).
    NotOpen { market: String, status: String },
    /// The client_order_id collided but the original trade is not visible.
    Conflict,
}

/// Why a trade has no decision.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    /// The database could not be reached or said no; nothing committed.
    #[error(transparent)]
    Db(#[from] DbError),
    /// The deadline passed before COMMIT; rolled back, nothing committed.
    #[error("{0}")]
    TimedOut(&'static str),
    /// COMMIT was sent but not confirmed: the trade may or may not exist.
    #[error("{0}")]
    OutcomeUnknown(String),
    /// A bug guard: the batch left this trade without a decision.
    #[error("{0}")]
    Internal(&'static str),
}

pub type TradeResult = Result<Written, WriteError>;

/// `POST /v1/markets`: the new market, or the database's refusal (23505: it
/// exists).
pub async fn create_market(
    client: &tokio_postgres::Client,
    id: &str,
    title: &str,
) -> Result<Market, DbError> {
    let sql = format!("INSERT INTO markets (id, title) VALUES ($1, $2) RETURNING {MARKET_COLUMNS}");
    let row = client
        .query_typed_one(&sql, &[(&id, Type::TEXT), (&title, Type::TEXT)])
        .await?;
    Ok(rows::market(&row))
}

/// A trade INSERTed as any SQL client would (the demo's synthetic flow):
/// the trigger does the rest.
pub async fn insert_plain(
    client: &tokio_postgres::Client,
    market: &str,
    side: &str,
    price: &str,
    qty: i64,
) -> Result<(), DbError> {
    client
        .execute(
            "INSERT INTO trades (market_id, side, price, qty) VALUES ($1, $2, $3::text::numeric, $4)",
            &[&market, &side, &price, &qty],
        )
        .await?;
    Ok(())
}

/// A pooled connection by `deadline`.
async fn connection(
    pool: &Pool,
    deadline: Instant,
) -> Result<deadpool_postgres::Object, WriteError> {
    match tokio::time::timeout_at(deadline.into(), pool.get()).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(DbError::from(e).into()),
        Err(_) => Err(WriteError::TimedOut("timed out waiting for a connection")),
    }
}

/// One trade in its own transaction: the reference behaviour the batch path
/// must match, and the fallback when a batch fails as a whole.
pub async fn insert_one(pool: &Pool, t: &NewTrade, deadline: Instant) -> TradeResult {
    let mut c = connection(pool, deadline).await?;
    let cancel = c.cancel_token();
    let work = async {
        let tx = c.transaction().await?;
        let sql = format!(
            "INSERT INTO trades (market_id, side, price, qty, trader, client_order_id) \
             VALUES ($1, $2, $3::text::numeric, $4, $5, $6) RETURNING {TRADE_COLUMNS}"
        );
        let params: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 6] = [
            (&t.market, Type::TEXT),
            (&t.side, Type::TEXT),
            (&t.price, Type::TEXT),
            (&t.qty, Type::INT8),
            (&t.trader, Type::TEXT),
            (&t.client_order_id, Type::TEXT),
        ];
        let insert = tx.query_typed_one(&sql, &params);
        let res = with_bound(&tx, deadline, insert)
            .await
            .map_err(DbError::from);
        Ok::<_, DbError>((tx, res.map(|row| rows::trade(&row))))
    };
    let (tx, res) = match tokio::time::timeout_at(deadline.into(), work).await {
        Ok(x) => x?,
        Err(_) => {
            cancel_in_background(cancel);
            return Err(WriteError::TimedOut("timed out"));
        }
    };
    match res {
        Ok(trade) => {
            bounded_commit(tx, deadline).await?;
            Ok(Written::Created(trade))
        }
        Err(e) if e.code() == Some("23505") => {
            drop(tx); // rolls back
            existing(pool, t, deadline).await
        }
        Err(e) => Err(e.into()),
    }
}

/// The original trade of a retried client_order_id.
async fn existing(pool: &Pool, t: &NewTrade, deadline: Instant) -> TradeResult {
    let work = async {
        let c = pool.get().await?;
        let sql = format!(
            "SELECT {TRADE_COLUMNS} FROM trades WHERE market_id = $1 AND client_order_id = $2"
        );
        Ok::<_, DbError>(
            c.query_typed_opt(
                &sql,
                &[(&t.market, Type::TEXT), (&t.client_order_id, Type::TEXT)],
            )
            .await?,
        )
    };
    // A read: timing out here commits nothing, so "unavailable" stays truthful.
    let found = tokio::time::timeout_at(deadline.into(), work)
        .await
        .map_err(DbError::from)??;
    Ok(match found {
        Some(row) => Written::Existing(rows::trade(&row)),
        None => Written::Conflict,
    })
}

/// Many trades, one transaction, one INSERT; the decisions in request order.
/// Err only when the whole batch failed and nothing committed (or, for
/// [`WriteError::OutcomeUnknown`], nothing is known).
pub async fn insert_many(
    pool: &Pool,
    trades: &[NewTrade],
    deadline: Instant,
) -> Result<Vec<TradeResult>, WriteError> {
    let mut decided: Vec<Option<TradeResult>> = vec![None; trades.len()];
    let mut c = connection(pool, deadline).await?;
    let cancel = c.cancel_token();
    let work = async {
        let tx = c.transaction().await?;
        // Lock every market row in id order first: the trigger's UPDATEs
        // then never wait, and two batches can never deadlock. Through the
        // SECURITY DEFINER function, because a plain SELECT ... FOR UPDATE
        // needs UPDATE privilege, which marketcast_writer does not have.
        let ids: Vec<&str> = trades
            .iter()
            .map(|t| t.market.as_str())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let params: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 1] =
            [(&ids, Type::TEXT_ARRAY)];
        let lock = tx.query_typed(
            "SELECT id, status FROM marketcast_lock_markets($1)",
            &params,
        );
        let locked = with_bound(&tx, deadline, lock).await?;
        let status: HashMap<String, String> = locked.iter().map(|r| (r.get(0), r.get(1))).collect();
        // Retried client_order_ids, read after the locks so that a retry
        // racing its original sees it committed.
        let coids: Vec<(&str, &str)> = trades
            .iter()
            .filter_map(|t| t.client_order_id.as_deref().map(|c| (t.market.as_str(), c)))
            .collect();
        let mut existing: HashMap<(String, String), Trade> = HashMap::new();
        if !coids.is_empty() {
            let (m, c): (Vec<&str>, Vec<&str>) = coids.into_iter().unzip();
            let sql = format!(
                "SELECT {TRADE_COLUMNS}, client_order_id FROM trades \
                 WHERE (market_id, client_order_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))"
            );
            let found = tx
                .query_typed(&sql, &[(&m, Type::TEXT_ARRAY), (&c, Type::TEXT_ARRAY)])
                .await?;
            for r in found {
                let t = rows::trade(&r);
                existing.insert((t.market.clone(), r.get("client_order_id")), t);
            }
        }
        // Decide each trade's fate; `insert` keeps indexes in arrival order.
        let mut insert: Vec<usize> = Vec::new();
        let mut first_of: HashMap<(String, String), usize> = HashMap::new();
        let mut dup_of: Vec<(usize, usize)> = Vec::new();
        for (i, t) in trades.iter().enumerate() {
            match status.get(&t.market).map(String::as_str) {
                None => decided[i] = Some(Ok(Written::UnknownMarket(t.market.clone()))),
                Some("open") => {}
                Some(s) => {
                    decided[i] = Some(Ok(Written::NotOpen {
                        market: t.market.clone(),
                        status: s.to_string(),
                    }))
                }
            }
            if decided[i].is_some() {
                continue;
            }
            if let Some(coid) = &t.client_order_id {
                let key = (t.market.clone(), coid.clone());
                if let Some(orig) = existing.get(&key) {
                    decided[i] = Some(Ok(Written::Existing(orig.clone())));
                    continue;
                }
                if let Some(&first) = first_of.get(&key) {
                    dup_of.push((i, first));
                    continue;
                }
                first_of.insert(key, i);
            }
            insert.push(i);
        }
        // Market-sorted, arrival order within a market: the trigger then
        // assigns each market's seqs in arrival order.
        insert.sort_by(|&a, &b| trades[a].market.cmp(&trades[b].market).then(a.cmp(&b)));
        if !insert.is_empty() {
            let col = |f: &dyn Fn(&NewTrade) -> Option<String>| {
                insert.iter().map(|&i| f(&trades[i])).collect::<Vec<_>>()
            };
            let markets = col(&|t| Some(t.market.clone()));
            let sides = col(&|t| Some(t.side.to_string()));
            let prices = col(&|t| Some(t.price.clone()));
            let qtys: Vec<i64> = insert.iter().map(|&i| trades[i].qty).collect();
            let traders = col(&|t| t.trader.clone());
            let coids = col(&|t| t.client_order_id.clone());
            let sql = format!(
                "INSERT INTO trades (market_id, side, price, qty, trader, client_order_id) \
                 SELECT m, s, p::numeric, q, tr, c FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[], $6::text[]) \
                 WITH ORDINALITY AS u(m, s, p, q, tr, c, n) ORDER BY n RETURNING {TRADE_COLUMNS}"
            );
            let returned = tx
                .query_typed(
                    &sql,
                    &[
                        (&markets, Type::TEXT_ARRAY),
                        (&sides, Type::TEXT_ARRAY),
                        (&prices, Type::TEXT_ARRAY),
                        (&qtys, Type::INT8_ARRAY),
                        (&traders, Type::TEXT_ARRAY),
                        (&coids, Type::TEXT_ARRAY),
                    ],
                )
                .await?;
            let mut inserted: Vec<Trade> = returned.iter().map(rows::trade).collect();
            // Match rows to requests by (market, seq): within a market seq
            // follows insertion order, whatever order RETURNING uses.
            inserted.sort_by(|a, b| a.market.cmp(&b.market).then(a.seq.cmp(&b.seq)));
            if inserted.len() != insert.len()
                || inserted
                    .iter()
                    .zip(&insert)
                    .any(|(r, &i)| r.market != trades[i].market)
            {
                return Err(DbError::Sql {
                    code: "XX000".into(),
                    message: "batch insert returned rows that do not match the request".into(),
                });
            }
            for (row, &i) in inserted.into_iter().zip(&insert) {
                decided[i] = Some(Ok(Written::Created(row)));
            }
        }
        Ok::<_, DbError>((tx, dup_of))
    };
    let (tx, dup_of) = match tokio::time::timeout_at(deadline.into(), work).await {
        Ok(x) => x?,
        Err(_) => {
            cancel_in_background(cancel);
            return Err(WriteError::TimedOut("timed out"));
        }
    };
    bounded_commit(tx, deadline).await?;
    for (i, first) in dup_of {
        decided[i] = Some(match &decided[first] {
            Some(Ok(Written::Created(t))) => Ok(Written::Existing(t.clone())),
            Some(other) => other.clone(),
            None => Err(WriteError::Internal("duplicate without an original")),
        });
    }
    Ok(decided
        .into_iter()
        .map(|d| d.unwrap_or(Err(WriteError::Internal("trade left without an outcome"))))
        .collect())
}

/// The first statement of a write transaction, sent together with the
/// transaction's server-side bound: `SET LOCAL statement_timeout` (the
/// caller's deadline plus [`SERVER_BOUND_SLACK`]) and `first`, pipelined in
/// one write, so the bound costs no round trip. `SET LOCAL` because a
/// session setting would outlive the transaction on a pooled server
/// connection (and a startup parameter does not pass PgBouncer, see
/// [`super::transaction_pool`]).
pub(crate) async fn with_bound<T>(
    tx: &deadpool_postgres::Transaction<'_>,
    deadline: Instant,
    first: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, tokio_postgres::Error> {
    // 0 would mean "no bound at all".
    let ms = (deadline.saturating_duration_since(Instant::now()) + SERVER_BOUND_SLACK)
        .as_millis()
        .max(1);
    let bound = format!("SET LOCAL statement_timeout = {ms}");
    // try_join polls in argument order, and each future sends its messages
    // on its first poll: the SET reaches the server before `first`.
    let ((), r) = tokio::try_join!(tx.batch_execute(&bound), first)?;
    Ok(r)
}

/// The dropped transaction queues a ROLLBACK behind whatever statement is
/// still running (say, waiting on a row lock); cancelling that statement lets
/// the rollback happen now and the connection go back to the pool clean.
fn cancel_in_background(cancel: tokio_postgres::CancelToken) {
    tokio::spawn(async move {
        if let Err(e) = cancel.cancel_query(tokio_postgres::NoTls).await {
            tracing::debug!(error = %e, "could not cancel a timed-out statement");
        }
    });
}

/// COMMIT, bounded too: "never a hang". Past the deadline plus
/// [`COMMIT_GRACE`] (a COMMIT is normally a WAL flush) the outcome is
/// unknown, and the answer says so rather than "nothing committed".
async fn bounded_commit(
    tx: deadpool_postgres::Transaction<'_>,
    deadline: Instant,
) -> Result<(), WriteError> {
    match tokio::time::timeout_at((deadline + COMMIT_GRACE).into(), tx.commit()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(commit_failed(e)),
        Err(_) => Err(WriteError::OutcomeUnknown(
            "the database did not confirm the commit in time, the outcome is unknown; retry with the same client_order_id".into(),
        )),
    }
}

/// A COMMIT that failed: if the server answered, nothing committed; if the
/// connection died mid-commit the outcome is unknown, and saying "nothing
/// committed" could be a lie.
fn commit_failed(e: tokio_postgres::Error) -> WriteError {
    if e.as_db_error().is_some() {
        DbError::from(e).into()
    } else {
        WriteError::OutcomeUnknown(format!(
            "connection lost during commit, the outcome is unknown; retry with the same client_order_id ({e})"
        ))
    }
}
