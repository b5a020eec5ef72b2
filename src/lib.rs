//! marketcast streams trades committed to PostgreSQL to browsers over
//! WebSockets, gapless and exactly once per connection and market.
//!
//! # Data flow
//!
//! A writer (the [`writer`] HTTP role, or any SQL client) INSERTs into
//! `trades`. In the same transaction a trigger (`sql/0001_trade_log.sql`)
//! assigns the market's next gapless `seq` under the market's row lock, updates
//! the market row and `pg_notify`s a small doorbell `{"m":market,"s":seq}` on
//! the market's shard channel. The database is the only authority; the write
//! path never passes through a broadcaster.
//!
//! A broadcaster holds one dedicated LISTEN connection for its shards
//! ([`listener`]) and feeds doorbells to the [`hub`], which keeps, per market
//! with subscribers, the head seq already published and a ring of recent
//! trades. A doorbell is never trusted as a trade: the hub reads `seq > head`
//! from the log, encodes each trade once into a WebSocket frame
//! and publishes the shared bytes. Each WebSocket [`session`] follows its
//! markets from `from_seq` (or the head), fills any gap from the ring or the
//! log, and coalesces queued frames into one socket write.
//!
//! ```text
//! INSERT -> trigger (seq, market row, NOTIFY) -> listener -> hub -> session -> socket
//!    ^                                   \-> log reads (replay, gaps) -/
//! writer (HTTP)
//! ```
//!
//! # Layout
//!
//! - [`cli`]: clap definitions, nothing else reads them.
//! - [`config`]: validated configuration built from the CLI or in code.
//! - [`db`]: pool, embedded migrations, row readers, error classification.
//! - [`trade`]: the market and trade records, their JSON and frame encodings.
//! - [`writer`]: the HTTP write API with request batching.
//! - [`listener`]: the dedicated LISTEN connection, reconnect and heartbeat.
//! - [`hub`]: per-market state: pure core ([`hub::core`]) and its task.
//! - [`session`]: one WebSocket connection: ops, replay, live, limits.
//! - [`broadcaster`]: wires listener, hub and sessions behind `GET /ws`.
//! - [`subscribe`]: the reference client.
//! - [`demo`]: `marketcast demo`: all roles in one process, pg-dev, the market page (`src/page/`).
//! - [`http`]: server plumbing shared by both roles.
//! - [`metrics`]: the Prometheus recorder.
//! - [`shutdown`]: signals, cancellation, the shutdown deadline.
//!
//! `bench/` (the `marketcast-bench` package, its own workspace like `fuzz/`)
//! is `make bench` and `make soak`: its own Postgres, the roles as child
//! processes, a load client and a raw fan-out baseline (docs/BENCHMARKS.md).
#![forbid(unsafe_code)]

pub mod broadcaster;
pub mod cli;
pub mod config;
pub mod db;
pub mod demo;
pub mod http;
pub mod hub;
pub mod listener;
pub mod metrics;
pub mod session;
pub mod shutdown;
pub mod subscribe;
pub mod trade;
pub mod writer;
