//! `marketcast subscribe`: the reference client. Prints each trade of one
//! market as a JSON line on stdout, resumes with `from_seq` after any
//! disconnect or close, and checks the delivery guarantee itself: a trade out
//! of sequence is a loud error (exit 1), never a silent skip.
//!
//! Only a [`Fatal`] error ends it; anything else (a refused connection, a
//! dropped socket, a retryable error reply) is retried with backoff.

use std::time::Duration;

use anyhow::{Context, Result};
use futures_util::StreamExt;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::config::SubscribeConfig;

/// Why the client stopped for good: retrying cannot help.
#[derive(Debug, thiserror::Error)]
pub enum Fatal {
    /// The server sent a trade out of sequence.
    #[error("delivery guarantee broken: got seq {got} after {last}")]
    Gap { last: i64, got: i64 },
    /// An error reply no retry can change (unknown market, pruned history...).
    #[error("server refused: {0}")]
    Refused(String),
}

/// While replaying a backlog, log progress every this many trades (stderr).
const PROGRESS_EVERY: i64 = 10_000;

/// Error codes after which retrying cannot help.
const FATAL: &[&str] = &[
    "unknown_market",
    "wrong_shard",
    "history_unavailable",
    "epoch_mismatch",
    "bad_request",
];

pub async fn run(
    cfg: SubscribeConfig,
    shutdown: CancellationToken,
    mut out: impl std::io::Write,
) -> Result<()> {
    let mut last: Option<i64> = cfg.from_seq;
    let mut printed: u64 = 0;
    let mut backoff = Backoff::new(Duration::from_millis(100), cfg.reconnect_max);
    let started = std::time::Instant::now();
    let mut catch_up: Option<i64> = None;
    loop {
        let mut url = url::Url::parse(&cfg.url).context("subscribe URL")?;
        url.query_pairs_mut()
            .clear()
            .append_pair("market", &cfg.market);
        if let Some(l) = last {
            url.query_pairs_mut()
                .append_pair("from_seq", &l.to_string());
        }
        let result: Result<bool> = async {
            let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str()).await.context("connecting")?;
            backoff.reset();
            loop {
                // Cancel safety: tungstenite's StreamExt::next and the token are cancel-safe.
                let msg = tokio::select! {
                    m = ws.next() => m,
                    _ = shutdown.cancelled() => {
                        let _ = ws.close(None).await; // leaving anyway
                        return Ok(true);
                    }
                };
                let Some(msg) = msg else { return Ok(false) };
                let text = match msg.context("reading")? {
                    Message::Text(t) => t,
                    Message::Close(c) => {
                        tracing::info!(close = ?c, "server closed the connection; resuming");
                        return Ok(false);
                    }
                    _ => continue,
                };
                let v: Value = serde_json::from_str(&text).context("server sent invalid JSON")?;
                match v.get("type").and_then(Value::as_str) {
                    Some("trade") => {
                        let seq = v.get("seq").and_then(Value::as_i64).context("trade without seq")?;
                        if let Some(l) = last {
                            // checked: a seq is the server's word, and i64::MAX + 1 must not panic.
                            if l.checked_add(1) != Some(seq) {
                                return Err(Fatal::Gap { last: l, got: seq }.into());
                            }
                        }
                        last = Some(seq);
                        if catch_up.is_some_and(|h| seq % PROGRESS_EVERY == 0 && seq < h) {
                            let h = catch_up.unwrap_or(seq);
                            let rate = printed as f64 / started.elapsed().as_secs_f64().max(1e-3);
                            tracing::info!(seq, head_seq = h, trades_per_sec = rate as u64, "replaying backlog");
                        }
                        writeln!(out, "{text}")?;
                        out.flush()?;
                        printed += 1;
                        if cfg.count.is_some_and(|c| printed >= c) {
                            let _ = ws.close(None).await; // done
                            return Ok(true);
                        }
                    }
                    Some("subscribed") => {
                        let head = v.get("head_seq").and_then(Value::as_i64);
                        if last.is_none() {
                            last = head;
                        }
                        // A backlog worth reporting progress on.
                        catch_up = head.filter(|h| h.saturating_sub(last.unwrap_or(*h)) > PROGRESS_EVERY);
                        tracing::info!(market = %cfg.market, head_seq = ?v.get("head_seq"), from = ?last, "subscribed");
                    }
                    Some("error") => {
                        let code = v.get("code").and_then(Value::as_str).unwrap_or("");
                        if FATAL.contains(&code) {
                            return Err(Fatal::Refused(text.to_string()).into());
                        }
                        tracing::warn!(%text, "server error; resuming");
                        return Ok(false);
                    }
                    _ => {}
                }
            }
        }
        .await;
        match result {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) if e.is::<Fatal>() => return Err(e),
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "connection failed; retrying"),
        }
        if !backoff.sleep(&shutdown).await {
            return Ok(());
        }
    }
}
