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
//! # Signed notifications
//!
//! The trigger signs each payload (`sql/0005_signed_notifications.sql`,
//! [`crate::protocol::signed`]). The listener reads the verification keys
//! with this connection's own client on every (re)connect, before LISTEN,
//! and again when a payload names a key id it does not hold (a rotation),
//! at most once per [`KEY_RELOAD_EVERY`]: a flood of forged key ids costs
//! one small query a second. It verifies each payload in the driver task and
//! sends a verified trade, already encoded, as [`HubEvent::Signed`];
//! anything else that is a doorbell stays a [`HubEvent::Doorbell`], and the
//! hub reads the log for it as before. Keys that cannot be read (a database
//! before that migration, a role without the grant) leave the set empty:
//! every notification is then a doorbell, which is slower, never wrong.
//!
//! Loss of the connection is noticed by the driver (server closed it), by TCP
//! keepalives, or by the heartbeat: every `listen_heartbeat` an empty query
//! must answer within half that interval. Then: reconnect with exponential
//! backoff from 100ms to `reconnect_max`, with jitter so a fleet of
//! broadcasters does not reconnect in lockstep after a Postgres restart.
//!
//! A LISTEN belongs to a server session, so the URL must reach one session
//! of its own: Postgres directly, or a session-mode pool. Through a
//! transaction-mode pooler (PgBouncer's `pool_mode = transaction`) the
//! LISTEN stays on whichever server connection ran it and notifications are
//! lost without an error. Before every LISTEN, [`check_own_session`] looks
//! for that and, if found, the broadcaster refuses to run ([`Pooled`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, Result};
use futures_util::StreamExt;
use tokio::sync::{mpsc, Notify};
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_util::sync::CancellationToken;

use super::hub::HubEvent;
use crate::backoff::Backoff;
use crate::config::ListenerConfig;
use crate::protocol::doorbell::{channel, parse_doorbell};
use crate::protocol::signed::{self, NotifyKeys, Unsigned};

/// Least time between two reads of the notification keys asked for by
/// payloads that name an unknown key id. A rotation is picked up by the
/// first payload it signs (or the next one after this); until then its
/// payloads are read from the log.
pub const KEY_RELOAD_EVERY: Duration = Duration::from_secs(1);

/// The LISTEN connection's URL reaches no session of its own: a pooler
/// shares server sessions between clients, so a LISTEN would be lost.
#[derive(Debug, thiserror::Error)]
#[error(
    "the database URL leads through a transaction-pooling proxy (such as PgBouncer with \
     pool_mode = transaction): {evidence}; a LISTEN there would be lost without an error. \
     Point --database-url at PostgreSQL itself or at a session-mode pool \
     (docs/OPERATIONS.md, \"Behind a pooler\")"
)]
pub struct Pooled {
    evidence: String,
}

/// Whether `url` gives each connection a server session of its own, as
/// LISTEN needs. Err: the check could not run (unreachable); Ok(Err): it
/// found a pooler that shares sessions.
///
/// Two connections, `a` and `b`: `a` asks its backend's pid, then `b` opens
/// a transaction (which pins a server connection under any pooler) and asks
/// its own, then `a` asks again. Directly (or through a session-mode pool)
/// the three answers are two distinct, stable pids. A transaction pooler
/// hands `a`'s released server to `b` (PgBouncer reuses the most recently
/// released one; with a pool of one it has no other), and so `b`'s pid is
/// `a`'s, or else `a`'s second statement runs elsewhere.
/// Only simple queries, and no startup `options` (which PgBouncer refuses),
/// so that the check gets as far as the pooler.
pub async fn check_own_session(url: &str, timeout: Duration) -> Result<Result<(), Pooled>> {
    let pg = crate::db::pg_config(url, "marketcast-listener-check", timeout)?;
    let connect = async || -> Result<tokio_postgres::Client> {
        let (client, conn) = tokio::time::timeout(timeout, pg.connect(NoTls))
            .await
            .context("connecting timed out")??;
        tokio::spawn(async move {
            // Ends when the client is dropped; errors surface in the queries.
            let _ = conn.await;
        });
        Ok(client)
    };
    let pid = async |c: &tokio_postgres::Client| -> Result<String> {
        let msgs = tokio::time::timeout(timeout, c.simple_query("SELECT pg_backend_pid()"))
            .await
            .context("no answer")??;
        msgs.iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                _ => None,
            })
            .context("SELECT pg_backend_pid() returned no row")
    };
    let a = connect().await.context("checking the LISTEN session")?;
    let first = pid(&a).await.context("checking the LISTEN session")?;
    let b = connect().await.context("checking the LISTEN session")?;
    tokio::time::timeout(timeout, b.batch_execute("BEGIN"))
        .await
        .context("checking the LISTEN session: BEGIN timed out")??;
    let other = pid(&b).await.context("checking the LISTEN session")?;
    if other == first {
        return Ok(Err(Pooled {
            evidence: format!("two connections ran on the same server backend (pid {first})"),
        }));
    }
    // No answer here (a pooler with every server busy, or a database that
    // stalled or went away meanwhile) proves nothing: the check fails and is
    // retried, it never refuses on a guess.
    let again = pid(&a).await.context("checking the LISTEN session")?;
    // Dropping `b` ends its transaction; nothing was written.
    drop(b);
    if again != first {
        return Ok(Err(Pooled {
            evidence: format!(
                "one connection's statements ran on two server backends (pids {first} and {again})"
            ),
        }));
    }
    Ok(Ok(()))
}

/// Run until `shutdown`, LISTENing on `shards` of the database at `url`.
/// `up` mirrors whether LISTEN is in place (for /healthz). Err only when
/// the URL leads through a transaction pooler ([`check_own_session`]): the
/// broadcaster must not run without a LISTEN it can trust.
pub async fn run(
    cfg: ListenerConfig,
    url: String,
    shards: Vec<u32>,
    events: mpsc::UnboundedSender<HubEvent>,
    up: Arc<AtomicBool>,
    shutdown: CancellationToken,
) -> Result<(), Pooled> {
    let mut backoff = Backoff::new(Duration::from_millis(100), cfg.reconnect_max);
    // LISTEN was established before: the next success is a re-establishment.
    let mut established = false;
    loop {
        // Cancel safety: dropping `session` mid-connect or mid-query just
        // drops the connection; shutdown must not wait on an unreachable server.
        let r = tokio::select! {
            r = session(&cfg, &url, &shards, &events, &up, &shutdown, &mut established) => r,
            _ = shutdown.cancelled() => return Ok(()),
        };
        match r {
            Ok(()) => return Ok(()), // shutdown
            Err(e) => {
                let e = match e.downcast::<Pooled>() {
                    Ok(pooled) => return Err(pooled),
                    Err(e) => e,
                };
                let was_up = up.swap(false, Ordering::AcqRel);
                metrics::gauge!("marketcast_listen_up").set(0.0);
                if was_up {
                    backoff.reset();
                }
                tracing::warn!(error = %format!("{e:#}"), "LISTEN connection lost; reconnecting");
            }
        }
        if !backoff.sleep(&shutdown).await {
            return Ok(());
        }
    }
}

/// One connection's life. Ok only on shutdown.
async fn session(
    cfg: &ListenerConfig,
    url: &str,
    shards: &[u32],
    events: &mpsc::UnboundedSender<HubEvent>,
    up: &AtomicBool,
    shutdown: &CancellationToken,
    established: &mut bool,
) -> Result<()> {
    let check_timeout = cfg.heartbeat.max(Duration::from_secs(2));
    check_own_session(url, check_timeout).await??;
    let mut pg = crate::db::pg_config(
        url,
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

    // The verification keys: written by this task (on connect and on a
    // reload), read by the driver for every notification.
    let keys = Arc::new(RwLock::new(NotifyKeys::default()));
    // Set by the driver when a payload names a key id it does not hold;
    // this task reloads the keys (at most once per KEY_RELOAD_EVERY). A
    // Notify keeps one pending request however many payloads ask.
    let reload_keys = Arc::new(Notify::new());

    let driver_events = events.clone();
    let (driver_keys, driver_reload) = (keys.clone(), reload_keys.clone());
    let mut driver = tokio::spawn(async move {
        let mut msgs = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        static REJECTED: AtomicU64 = AtomicU64::new(0);
        while let Some(m) = msgs.next().await {
            match m {
                Ok(AsyncMessage::Notification(n)) => {
                    metrics::counter!("marketcast_notifications_total").increment(1);
                    match parse_doorbell(n.payload()) {
                        Some(d) => {
                            let verified = {
                                let keys = driver_keys.read().unwrap_or_else(|p| p.into_inner());
                                signed::verify(n.payload(), &keys)
                            };
                            let ev = match verified {
                                Ok(s) => HubEvent::Signed {
                                    frame: s.trade.as_ref().encode(),
                                    market: s.trade.market,
                                    epoch: s.epoch,
                                },
                                Err(why) => {
                                    if let Unsigned::UnknownKey(_) = why {
                                        driver_reload.notify_one();
                                    }
                                    metrics::counter!("marketcast_notification_outcomes_total", "outcome" => why.label()).increment(1);
                                    HubEvent::Doorbell {
                                        market: d.m,
                                        seq: d.s,
                                    }
                                }
                            };
                            if driver_events.send(ev).is_err() {
                                return "the hub stopped".to_string();
                            }
                        }
                        None => {
                            metrics::counter!("marketcast_notifications_rejected_total")
                                .increment(1);
                            metrics::counter!("marketcast_notification_outcomes_total", "outcome" => "rejected").increment(1);
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

    // Before LISTEN: the first payloads are verified with these. An error
    // leaves the set empty (every notification is a doorbell), loudly.
    match load_keys(&client, cfg.heartbeat).await {
        Ok(k) => *keys.write().unwrap_or_else(|p| p.into_inner()) = k,
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "cannot read the notification keys (marketcast_notify_keys, sql/0005: run marketcast migrate, and grant marketcast_broadcaster to this login); every trade is read from the log")
        }
    }
    let mut keys_loaded_at = tokio::time::Instant::now();

    let listen: String = shards
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
    // Counted once LISTEN is back, not per attempt: a Postgres down for a
    // minute is one reconnect, not the number of tries it took.
    if std::mem::replace(established, true) {
        metrics::counter!("marketcast_listen_reconnects_total").increment(1);
    }
    tracing::info!(shards = ?shards, "LISTEN established");
    if events.send(HubEvent::ListenUp).is_err() {
        return Ok(());
    }

    let mut beat = tokio::time::interval(cfg.heartbeat);
    beat.tick().await;
    loop {
        // Cancel safety: the driver JoinHandle, a tick, a Notify and a token
        // are all cancel-safe; the heartbeat query and the key reload run
        // inside their own arms to completion or timeout.
        tokio::select! {
            _ = reload_keys.notified() => {
                if keys_loaded_at.elapsed() < KEY_RELOAD_EVERY {
                    continue; // Too soon: the next unknown key id asks again.
                }
                keys_loaded_at = tokio::time::Instant::now();
                match load_keys(&client, cfg.heartbeat / 2).await {
                    Ok(k) => {
                        tracing::info!(keys = ?k, "notification keys reloaded");
                        *keys.write().unwrap_or_else(|p| p.into_inner()) = k;
                    }
                    // Keep the keys we have; a dead connection is the heartbeat's to notice.
                    Err(e) => tracing::debug!(error = %format!("{e:#}"), "reloading the notification keys failed"),
                }
            }
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

/// The verification keys, read with the LISTEN connection's client.
async fn load_keys(client: &tokio_postgres::Client, timeout: Duration) -> Result<NotifyKeys> {
    let rows = tokio::time::timeout(timeout, crate::db::log::notify_keys(client))
        .await
        .context("reading the keys timed out")??;
    Ok(NotifyKeys::new(rows))
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}
