//! marketcast streams trades committed to PostgreSQL to browsers over
//! WebSockets, gapless and exactly once per connection and market.
//!
//! # Data flow
//!
//! A writer (the [`writer`] HTTP role, or any SQL client) INSERTs into
//! `trades`. In the same transaction a trigger (`sql/0001_trade_log.sql`)
//! assigns the market's next gapless `seq` under the market's row lock, updates
//! the market row and `pg_notify`s the trade on the market's shard channel,
//! signed with an HMAC key only it and the broadcasters can read
//! (`sql/0005_signed_notifications.sql`), or a plain doorbell
//! `{"m":market,"s":seq}` when that would not fit. The database is the only
//! authority; the write path never passes through a broadcaster.
//!
//! A [`broadcaster`] holds one dedicated LISTEN connection for its shards
//! ([`broadcaster::listener`]) and feeds doorbells to the
//! [`broadcaster::hub`], which keeps, per market with subscribers, the head
//! seq already published and a ring of recent trades. A signed payload whose
//! MAC verifies and whose seq is the head's successor is published as it
//! is; anything else is a doorbell, never trusted as a trade: the hub reads
//! `seq > head` from the log. Each trade is encoded once into a WebSocket
//! frame and the shared bytes are published. Each
//! WebSocket [`broadcaster::session`] follows its markets from `from_seq`
//! (or the head), fills any gap from the ring or the log, and coalesces
//! queued frames into one socket write.
//!
//! ```text
//! INSERT -> trigger (seq, market row, NOTIFY) -> listener -> hub -> session -> socket
//!    ^                                   \-> log reads (replay, gaps) -/
//! writer (HTTP)
//! ```
//!
//! The contract all of it implements is docs/PROTOCOL.md. Arrows between
//! modules point one way: [`protocol`] imports nothing of the crate, [`db`]
//! only `protocol`, the roles import `db`, `protocol`, `http` and `config`,
//! and nothing but `main`, [`demo`] and the tests imports a role.
//!
//! # Layout
//!
//! In the order a trade meets the code:
//!
//! - `main.rs`: parse -> config -> the role's `run` -> exit code.
//! - [`cli`]: clap definitions, nothing else reads them; defaults come from the configs.
//! - [`config`]: validated, nested configuration built from the CLI or in code; every default.
//! - [`protocol`]: the contract as pure functions, no IO.
//!   - [`protocol::market`]: the market id grammar and a market's state.
//!   - [`protocol::trade`]: a trade, its JSON and its shared WebSocket frame.
//!   - [`protocol::frame`]: server -> client frames as bytes.
//!   - [`protocol::handshake`]: the opening handshake's rules (RFC 6455 section 4).
//!   - [`protocol::doorbell`]: the NOTIFY payload and shard channels.
//!   - [`protocol::signed`]: the signed NOTIFY payload: MAC check and the trade it carries.
//!   - [`protocol::client`]: WebSocket client ops (the `from_seq` rule once) and replies.
//!   - [`protocol::ticker`]: ticker mode's fold of consecutive trades and its frame.
//!   - [`protocol::write_api`]: the write API's routes, bearer check, bodies and `ApiError`.
//!   - [`protocol::token`]: when a JWT is valid and what it grants; the bearer header.
//! - [`db`]: the pool and error classification; the only module that writes SQL.
//!   - `db/rows.rs`: the only code that knows column positions.
//!   - [`db::admin`]: migrations (`sql/`), prune, the stored shard count.
//!   - [`db::log`]: reads of the log and the market rows, and the notification keys.
//!   - [`db::write`]: the INSERTs; database outcomes, never an HTTP status.
//!   - [`db::health`]: the probe each role's `/healthz` answers from.
//!   - [`db::registry`]: the broadcaster registry's functions and the cached live entries.
//! - [`writer`]: HTTP -> bearer check -> parse -> batch -> `db::write`.
//!   - `writer/batcher.rs`: groups concurrent trades into one transaction.
//! - [`broadcaster`]: wires the three below behind `GET /ws` and the HTTP reads.
//!   - [`broadcaster::listener`]: the dedicated LISTEN connection, reconnect, heartbeat.
//!   - [`broadcaster::hub`]: per-market state and fan-out; its pure core is [`broadcaster::hub::core`],
//!     and [`broadcaster::hub::ticker`] (pure) folds a market's trades for one ticker interval.
//!   - [`broadcaster::session`]: one WebSocket connection's task:
//!     [`broadcaster::session::subscription`] (pure: the delivery rule),
//!     `replay.rs` (subscribe and gap fills), `outbound.rs` (vectored writes),
//!     `inbound.rs` (the cancel-safe frame reader), `rate_limit.rs`, `live.rs` (a
//!     subscription's live stream: trades or ticker frames), `ticker.rs` (ticker
//!     subscriptions), `heads.rs` (heads and the session's timers), `sse.rs` (the
//!     session's SSE transport: frames as events).
//!   - [`broadcaster::registry`]: this broadcaster's registry entry, and leaving it first on shutdown.
//!   - `broadcaster/reads.rs`: the HTTP read routes: SSE streams, catch-up and
//!     long-poll, CORS.
//!   - `broadcaster/replica.rs`: where replays read the log: a hot standby as far
//!     as it has the trades (`--replay-database-url`), else the primary.
//! - [`subscribe`]: the reference client, with a typed fatal error.
//! - [`demo`]: `marketcast demo`: all roles in one process; `demo/flow.rs`
//!   (synthetic trades), `demo/page/` (the market page).
//! - [`http`]: server plumbing shared by both roles: the bounds on every socket.
//! - [`metrics`]: the Prometheus recorder and every metric's description.
//! - [`shutdown`]: signals, cancellation, the shutdown deadlines.
//! - [`backoff`]: the one retry schedule.
//! - [`pgdev`]: the one wrapper around `bin/pg-dev`.
//!
//! `bench/` (`make bench`, `make soak`) and `fuzz/` are packages of their
//! own beside this crate (docs/BENCHMARKS.md, docs/TESTING.md).
#![forbid(unsafe_code)]
// These docs are for the people who work on marketcast (`make lint` builds
// them with --document-private-items): a module doc may point at a private
// module.
#![allow(rustdoc::private_intra_doc_links)]

pub mod backoff;
pub mod broadcaster;
pub mod cli;
pub mod config;
pub mod db;
pub mod demo;
pub mod http;
pub mod metrics;
pub mod pgdev;
pub mod protocol;
pub mod shutdown;
pub mod subscribe;
pub mod writer;

/// Every Rust file under `src/`, for the tests that keep docs and code
/// from drifting apart.
#[cfg(test)]
fn rust_files() -> Vec<std::path::PathBuf> {
    let mut dirs = vec![std::path::PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/src"
    ))];
    let mut files = Vec::new();
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files
}

#[cfg(test)]
mod tests {
    /// The map above names every Rust file under `src/`: by its module path
    /// (`broadcaster::hub`), or by its file name where the map lists files.
    #[test]
    fn the_map_lists_every_file() {
        let map = include_str!("lib.rs");
        let root = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/src"));
        let mut missing = Vec::new();
        for path in super::rust_files() {
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let module = rel.trim_end_matches(".rs").replace('/', "::");
            let file = path.file_name().unwrap().to_string_lossy().into_owned();
            let named = map.contains(&format!("[`{module}`]"))
                || map.contains(&format!("`{rel}`"))
                || map.contains(&format!("`{file}`"));
            if !named && rel != "lib.rs" {
                missing.push(rel);
            }
        }
        assert!(
            missing.is_empty(),
            "src/lib.rs's map does not list {missing:?}"
        );
    }
}
