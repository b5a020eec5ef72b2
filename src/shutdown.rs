//! One shutdown story for every role.
//!
//! `main` turns SIGINT or SIGTERM into the cancellation of one
//! [`CancellationToken`], which it hands to the role's `run`. On cancel a
//! server: stops accepting (drops its listener), cancels a child token that
//! every WebSocket session watches (hyper does not track upgraded connections,
//! so sessions are tracked in a `TaskTracker` and each writes Close 1001 and
//! flushes), lets in-flight HTTP requests finish through hyper-util's
//! `GracefulShutdown`, and gives all of it [`DEADLINE`] before returning
//! anyway. `main` then exits 0.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How long a server waits for sessions and requests to finish after a signal.
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
