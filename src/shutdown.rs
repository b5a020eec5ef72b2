//! One shutdown story for every role.
//!
//! `main` turns SIGINT or SIGTERM into the cancellation of one
//! [`CancellationToken`], which it hands to the role's `run`. On cancel:
//!
//! 0. A broadcaster with `--advertise-url` first deletes its registry entry
//!    (bounded by `--db-timeout`), so no client is sent to it any more; its
//!    server and sessions watch a token cancelled only after that
//!    (`broadcaster::registry`).
//!
//! 1. The server stops accepting (its listener is dropped) and in-flight HTTP
//!    requests get up to [`DEADLINE`] to finish (hyper-util's
//!    `GracefulShutdown`, in `http::serve`).
//! 2. At the same moment every WebSocket session, which watches the same
//!    token, queues Close 1001 after what it has queued and tries for 1 s to
//!    get it out, then reads up to 2 s for the peer's Close (hyper does not
//!    track upgraded connections, so the broadcaster tracks sessions in a
//!    `TaskTracker`). A replay in progress stops between pages.
//! 3. When step 1 is done, the broadcaster waits up to [`DEADLINE`] for the
//!    sessions still open, then stops the hub and the LISTEN connection; the
//!    writer waits up to [`DEADLINE`] for its batcher to answer every trade
//!    already queued.
//!
//! So a role exits within about 2 x [`DEADLINE`] whatever its clients do;
//! `main` then exits 0.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// The bound on each wait of a shutdown: for in-flight HTTP requests, then
/// for WebSocket sessions (broadcaster) or the trade batcher (writer).
pub const DEADLINE: Duration = Duration::from_secs(10);

/// A token cancelled by the first SIGINT or SIGTERM.
pub fn on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("signal received, shutting down");
        t.cancel();
    });
    token
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch SIGTERM; only Ctrl-C will stop this process");
            let _ = tokio::signal::ctrl_c().await; // An error here means no signal can ever arrive.
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await; // An error here means no signal can ever arrive.
}
