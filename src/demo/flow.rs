//! The demo's synthetic trading flow: plain-SQL INSERTs into random open
//! markets, as any SQL client would write trades.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio_util::sync::CancellationToken;

use crate::db;

/// Insert `rate` trades per second into random open markets through plain SQL,
/// each YES price a small random step from the market's last one. Reconnects
/// (once per tick at most) if the database goes away.
pub(super) async fn run(url: String, rate: f64, stop: CancellationToken) -> Result<()> {
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut client: Option<tokio_postgres::Client> = None;
    // YES price per market, in basis points.
    let mut prices: HashMap<String, i64> = HashMap::new();
    let mut failing = false;
    loop {
        // Cancel safety: tick() and cancelled() are both cancel-safe.
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return Ok(()),
        }
        let c = match &client {
            Some(c) if !c.is_closed() => c,
            _ => match load_prices(&url).await {
                Ok((c, p)) => {
                    prices = p;
                    client.insert(c)
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!("trade flow paused: {e:#}");
                        failing = true;
                    }
                    continue;
                }
            },
        };
        let ids: Vec<&String> = prices.keys().collect();
        if ids.is_empty() {
            continue;
        }
        let id = ids[fastrand::usize(..ids.len())].clone();
        let yes = prices.get(&id).copied().unwrap_or(5000);
        let next = (yes + fastrand::i64(-120..=120)).clamp(300, 9700);
        let buy_yes = fastrand::bool();
        let paid = if buy_yes { next } else { 10_000 - next };
        // Mostly small tickets, now and then a large one.
        let qty = if fastrand::u8(..10) == 0 {
            fastrand::i64(100..=2000)
        } else {
            fastrand::i64(1..=60)
        };
        let side = if buy_yes { "yes" } else { "no" };
        let r = db::write::insert_plain(c, &id, side, &bp_price(paid), qty).await;
        match r {
            Ok(_) => {
                prices.insert(id, next);
                if failing {
                    tracing::info!("trade flow resumed");
                    failing = false;
                }
            }
            Err(e) => {
                if !failing {
                    tracing::warn!("trade flow insert failed: {e}");
                    failing = true;
                }
                // A closed market or a dropped connection: re-read both.
                client = None;
            }
        }
    }
}

/// A fresh connection and the YES price (basis points) of every open market.
async fn load_prices(url: &str) -> Result<(tokio_postgres::Client, HashMap<String, i64>)> {
    let c = db::connect(url, "marketcast-demo-flow").await?;
    let prices = db::log::open_market_prices(&c)
        .await
        .context("reading open markets")?;
    Ok((c, prices.into_iter().collect()))
}

/// Basis points as the contract's decimal text: 6300 -> "0.6300".
fn bp_price(bp: i64) -> String {
    format!("0.{:04}", bp.clamp(1, 9999))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prices_in_basis_points() {
        assert_eq!(bp_price(6300), "0.6300");
        assert_eq!(bp_price(5), "0.0005");
        assert_eq!(bp_price(0), "0.0001");
        assert_eq!(bp_price(10_000), "0.9999");
    }
}
