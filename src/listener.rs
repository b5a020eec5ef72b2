//! The LISTEN connection: one dedicated tokio-postgres connection per
//! broadcaster (never from the pool: a pooled connection's driver drops
//! notifications), LISTENing on `marketcast_shard_<k>` for every owned shard.
//!
//! Protocol with the hub: every notification becomes a [`HubEvent::Doorbell`]
//! on an *unbounded* channel, so the driver reads the socket without ever
//! waiting on fan-out (a listener that stops reading pins Postgres's
//! cluster-wide NOTIFY queue and eventually fails every writer). After each
//! successful LISTEN the listener sends [`HubEvent::ListenUp`]; the hub then
//! re-reads every market it serves, which fills whatever was committed while
//! no LISTEN was in place (notifications are never queued for a listener that
//! is not connected).
//!
//! Loss of the connection is noticed by the driver (server closed it), by TCP
//! keepalives, or by the heartbeat: every `listen_heartbeat` an empty query
//! must answer within half that interval. Then: reconnect with exponential
//! backoff from 100ms to `reconnect_max`, with jitter so a fleet of
//! broadcasters does not reconnect in lockstep after a Postgres restart.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use futures_util::StreamExt;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_util::sync::CancellationToken;

use crate::hub::HubEvent;

pub fn channel(shard: u32) -> String {
    format!("marketcast_shard_{shard}")
}

#[derive(Debug, Clone)]
pub struct ListenerConfig {
    pub url: String,
    pub shards: Vec<u32>,
    pub heartbeat: Duration,
    pub reconnect_max: Duration,
}

/// The doorbell payload written by the trigger: `{"m":"<market>","s":<seq>}`.
#[derive(Debug, Deserialize, PartialEq, Eq)]
pub struct Doorbell {
    pub m: String,
    pub s: i64,
}

/// Parse a payload; None for anything that is not a doorbell: a JSON object
/// whose `m` is a market id (PROTOCOL.md grammar) and `s` an integer >= 1.
/// Extra fields are ignored (a later trigger may add some).
pub fn parse_doorbell(payload: &str) -> Option<Doorbell> {
    // Objects only: a derived Deserialize also takes the array `["M",1]`.
    if !payload
        .trim_start_matches([' ', '\t', '\n', '\r'])
        .starts_with('{')
    {
        return None;
    }
    let d: Doorbell = serde_json::from_str(payload).ok()?;
    (d.s >= 1 && crate::trade::is_market_id(&d.m)).then_some(d)
}

/// Run until `shutdown`. `up` mirrors whether LISTEN is in place (for /healthz).
pub async fn run(
    cfg: ListenerConfig,
    events: mpsc::UnboundedSender<HubEvent>,
    up: Arc<AtomicBool>,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    let mut first = true;
    loop {
        if !first {
            metrics::counter!("marketcast_listen_reconnects_total").increment(1);
        }
        first = false;
        // Cancel safety: dropping `session` mid-connect or mid-query just
        // drops the connection; shutdown must not wait on an unreachable server.
        let r = tokio::select! {
            r = session(&cfg, &events, &up, &shutdown) => r,
            _ = shutdown.cancelled() => return,
        };
        match r {
            Ok(()) => return, // shutdown
            Err(e) => {
                let was_up = up.swap(false, Ordering::AcqRel);
                metrics::gauge!("marketcast_listen_up").set(0.0);
                if was_up {
                    backoff = Duration::from_millis(100);
                }
                tracing::warn!(error = %format!("{e:#}"), retry_in_ms = backoff.as_millis() as u64, "LISTEN connection lost");
            }
        }
        let jitter = backoff.mul_f64(fastrand::f64() * 0.5);
        // Cancel safety: sleep and cancelled are both cancel-safe.
        tokio::select! {
            _ = tokio::time::sleep(backoff + jitter) => {}
            _ = shutdown.cancelled() => return,
        }
        backoff = (backoff * 2).min(cfg.reconnect_max);
    }
}

/// One connection's life. Ok only on shutdown.
async fn session(
    cfg: &ListenerConfig,
    events: &mpsc::UnboundedSender<HubEvent>,
    up: &AtomicBool,
    shutdown: &CancellationToken,
) -> Result<()> {
    let mut pg = crate::db::pg_config(
        &cfg.url,
        "marketcast-listener",
        cfg.heartbeat.max(Duration::from_secs(2)),
    )?;
    // An idle LISTEN session *is* idle: a role-level idle_session_timeout must
    // not kill it.
    pg.options("-c idle_session_timeout=0");
    let (client, mut conn) = pg
        .connect(NoTls)
        .await
        .context("connecting the LISTEN connection")?;

    let driver_events = events.clone();
    let mut driver = tokio::spawn(async move {
        let mut msgs = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        static REJECTED: AtomicU64 = AtomicU64::new(0);
        while let Some(m) = msgs.next().await {
            match m {
                Ok(AsyncMessage::Notification(n)) => {
                    metrics::counter!("marketcast_notifications_total").increment(1);
                    match parse_doorbell(n.payload()) {
                        Some(d) => {
                            if driver_events
                                .send(HubEvent::Doorbell {
                                    market: d.m,
                                    seq: d.s,
                                })
                                .is_err()
                            {
                                return "the hub stopped".to_string();
                            }
                        }
                        None => {
                            metrics::counter!("marketcast_notifications_rejected_total")
                                .increment(1);
                            // Anyone can NOTIFY: log some, count all, never act.
                            let k = REJECTED.fetch_add(1, Ordering::Relaxed);
                            if k < 10 || k.is_power_of_two() {
                                tracing::warn!(channel = n.channel(), sender_pid = n.process_id(), payload = %truncate(n.payload(), 200), rejected_so_far = k + 1, "ignoring a notification that is not a marketcast doorbell");
                            }
                        }
                    }
                }
                Ok(_) => {} // notices; AsyncMessage is non_exhaustive
                Err(e) => return format!("{e:#}: {:?}", e.code()),
            }
        }
        "the server closed the connection".to_string()
    });

    let listen: String = cfg
        .shards
        .iter()
        .map(|s| format!("LISTEN {};", channel(*s)))
        .collect();
    // Autocommit: the LISTEN is committed before we read anything, the order
    // the LISTEN docs require for not missing notifications.
    tokio::time::timeout(cfg.heartbeat, client.batch_execute(&listen))
        .await
        .context("LISTEN timed out")?
        .context("LISTEN failed")?;
    up.store(true, Ordering::Release);
    metrics::gauge!("marketcast_listen_up").set(1.0);
    tracing::info!(shards = ?cfg.shards, "LISTEN established");
    if events.send(HubEvent::ListenUp).is_err() {
        return Ok(());
    }

    let mut beat = tokio::time::interval(cfg.heartbeat);
    beat.tick().await;
    loop {
        // Cancel safety: the driver JoinHandle, a tick and a token are all
        // cancel-safe; the heartbeat query runs inside its own arm to completion
        // or timeout.
        tokio::select! {
            _ = shutdown.cancelled() => {
                driver.abort();
                return Ok(());
            }
            r = &mut driver => {
                let why = r.unwrap_or_else(|e| format!("driver task failed: {e}"));
                anyhow::bail!("{why}");
            }
            _ = beat.tick() => {
                match tokio::time::timeout(cfg.heartbeat / 2, client.simple_query("")).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => { driver.abort(); anyhow::bail!("heartbeat failed: {e:#}"); }
                    Err(_) => { driver.abort(); anyhow::bail!("heartbeat got no answer within {:?}", cfg.heartbeat / 2); }
                }
            }
        }
    }
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doorbells() {
        assert_eq!(
            parse_doorbell(" \n{\"m\":\"A\",\"s\":1,\"x\":[]}"),
            Some(Doorbell {
                m: "A".into(),
                s: 1
            }),
            "whitespace and extra fields are fine"
        );
        assert_eq!(
            parse_doorbell(r#"{"m":"A","s":2,"x":1e869}"#),
            Some(Doorbell {
                m: "A".into(),
                s: 2
            }),
            "an extra field is skipped, even a number no f64 holds (valid JSON)"
        );
        assert_eq!(
            parse_doorbell(r#"{"m":"ELECTION-2028","s":1042}"#),
            Some(Doorbell {
                m: "ELECTION-2028".into(),
                s: 1042
            })
        );
        for bad in [
            "",
            "x",
            "{}",
            r#"{"m":"A"}"#,
            r#"{"m":"A","s":0}"#,
            r#"{"m":"A","s":"1"}"#,
            r#"{"m":"","s":1}"#,
            r#"[1]"#,
            // Found by the proptest model: a derived Deserialize takes arrays.
            r#"["A",1]"#,
            // Not a market id: no such market can exist.
            r#"{"m":"a b","s":1}"#,
            r#"{"m":"-x","s":1}"#,
            r#"{"m":"é","s":1}"#,
            r#"{"m":"A","s":1,"s":2}"#,
            r#"{"m":"A","s":1.0}"#,
            r#"{"m":"A","s":9223372036854775808}"#,
        ] {
            assert_eq!(parse_doorbell(bad), None, "{bad}");
        }
    }
}
