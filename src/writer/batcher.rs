//! Groups concurrent trade requests into one transaction.
//!
//! Every notifying commit takes Postgres's cluster-wide NOTIFY lock through
//! its WAL flush, so commits of concurrent requests are grouped. Each request
//! still gets exactly the outcome it would have had alone: markets are locked
//! first (sorted by id, so two batches never deadlock), trades into unknown
//! or closed markets and retried client_order_ids are answered without
//! joining the INSERT, and if the one multi-row INSERT still fails (a
//! plain-SQL writer raced us) the batch is redone one trade per transaction
//! (`db::write`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use hyper::StatusCode;
use tokio::sync::{mpsc, oneshot};

use super::api_error;
use crate::db::write::{self, TradeResult, WriteError};
use crate::protocol::write_api::NewTrade;

/// A trade request waiting for its batch.
pub(crate) struct Job {
    pub trade: NewTrade,
    pub enqueued: Instant,
    /// The request's answer. Dropped unanswered only if the handler already
    /// gave up, which its own timeout reports.
    pub reply: oneshot::Sender<TradeResult>,
}

/// The queue's receiving end, shared by `--batch-workers` batchers; each
/// holds it only while taking a batch.
pub(crate) type Queue = Arc<tokio::sync::Mutex<mpsc::Receiver<Job>>>;

pub(crate) struct Batcher {
    pub pool: Pool,
    pub max: usize,
    pub linger: Duration,
    /// A request older than this when its batch starts is answered
    /// "unavailable" without touching the database (docs/PROTOCOL.md: 503
    /// within 5 s).
    pub timeout: Duration,
}

impl Batcher {
    pub async fn run(self: Arc<Self>, queue: Queue) {
        let mut batch = Vec::with_capacity(self.max);
        loop {
            // Hold the queue only while taking a batch, never while processing it.
            let mut rx = queue.lock().await;
            let Some(first) = rx.recv().await else { return };
            batch.push(first);
            if !self.linger.is_zero() && self.max > 1 {
                let until = tokio::time::Instant::now() + self.linger;
                while batch.len() < self.max {
                    match tokio::time::timeout_at(until, rx.recv()).await {
                        Ok(Some(j)) => batch.push(j),
                        _ => break,
                    }
                }
            }
            while batch.len() < self.max {
                match rx.try_recv() {
                    Ok(j) => batch.push(j),
                    Err(_) => break,
                }
            }
            drop(rx);
            self.process(std::mem::take(&mut batch)).await;
        }
    }

    async fn process(&self, jobs: Vec<Job>) {
        let budget = self.timeout.saturating_sub(Duration::from_millis(250));
        let (mut live, expired): (Vec<Job>, Vec<Job>) = jobs
            .into_iter()
            .partition(|j| j.enqueued.elapsed() < budget);
        for j in expired {
            let _ = j.reply.send(Err(WriteError::TimedOut(
                "timed out waiting for the database",
            ))); // The handler may have gone; nothing else to tell.
        }
        if live.is_empty() {
            return;
        }
        metrics::histogram!("marketcast_writer_batch_size").record(live.len() as f64);
        // Everything before COMMIT is bounded by the oldest request's deadline;
        // past it the statement is cancelled and the transaction rolls back.
        let deadline = live.iter().map(|j| j.enqueued).min().expect("non-empty") + budget;
        let trades: Vec<NewTrade> = live.iter().map(|j| j.trade.clone()).collect();
        let outcomes = if trades.len() == 1 {
            vec![write::insert_one(&self.pool, &trades[0], deadline).await]
        } else {
            match write::insert_many(&self.pool, &trades, deadline).await {
                Ok(o) => o,
                // Every request gets the batch's answer when it is the same
                // for each alone: "retry later" (nothing committed), or the
                // connection died during COMMIT, when the batch may well have
                // committed and redoing it one by one could commit every trade
                // without a client_order_id twice.
                Err(e) if answers_every_request(&e) => {
                    trades.iter().map(|_| Err(e.clone())).collect()
                }
                Err(e) => {
                    tracing::info!(error = %e, n = trades.len(), "batch insert failed, retrying one trade per transaction");
                    let mut out = Vec::with_capacity(trades.len());
                    for t in &trades {
                        out.push(write::insert_one(&self.pool, t, deadline).await);
                    }
                    out
                }
            }
        };
        for (j, o) in live.drain(..).zip(outcomes) {
            let _ = j.reply.send(o); // The handler may have gone; the outcome stands either way.
        }
    }
}

/// Whether a failed batch's error is also each of its trades' answer.
fn answers_every_request(e: &WriteError) -> bool {
    matches!(e, WriteError::OutcomeUnknown(_))
        || api_error(e.clone()).status == StatusCode::SERVICE_UNAVAILABLE
}
