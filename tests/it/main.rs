//! The integration suite: one test binary against a real PostgreSQL.
//!
//! `make test` starts a throwaway cluster with `bin/pg-dev` and exports
//! DATABASE_URL; each test gets its own database cloned from a migrated
//! template (see `support`), and every server binds 127.0.0.1:0. WebSocket
//! clients are tokio-tungstenite, independent of the server's fastwebsockets.
//!
//! Index:
//! - `contract`: the machine-readable contract (docs/asyncapi.yaml,
//!   docs/openapi.yaml): both files parse, every `$ref` resolves, the
//!   spec's examples validate; and the checks `support` runs on every
//!   WebSocket message and HTTP answer the suite receives.
//! - `sql`: the SQL surface: seq assignment, rollback, multi-market
//!   transactions, NOTIFY at commit with the doorbell payload, append-only,
//!   roles, migrate idempotency and concurrency, prune.
//! - `writer`: the HTTP write API, every error path, idempotency, outages,
//!   and tokens (contract 1.1 section 4.1: write claims, bound reads, 401s).
//! - `broadcaster`: the WebSocket surface and the delivery guarantee: replay,
//!   replay-to-live handoff, forged notifications, LISTEN loss, slow
//!   consumers, limits, shutdown.
//! - `feed`: contract 1.1's WebSocket read side (PROTOCOL-1.1.md §2): several
//!   markets in one op, the new `subscribed` fields and the order of checks,
//!   `recent`, heads (timing, the gap check), ticker frames folded against the
//!   log, the `?market=` URL forms, tokens (admission, `auth`, refresh, 4001).
//! - `signed`: signed notifications (sql/0005): a bad MAC, a replayed valid
//!   payload and another epoch's payload deliver only the log; the key's
//!   privileges; key rotation under flow; the oversize fallback; a
//!   payload's frame equals its row's; the fast path is taken.
//! - `props`: property tests of every parser of untrusted input against
//!   models written from PROTOCOL.md, and random client op sequences against
//!   a real broadcaster (the cargo-fuzz targets are in `fuzz/`).
//! - `promises`: documented promises that had no test of their own: a live
//!   queue overflow caught up, `?epoch=` end to end, the default limits.
//! - `reads`: the broadcaster's HTTP reads: SSE streams (an independent
//!   event-stream parser), catch-up and long-poll, caching, CORS, the order
//!   of checks, the shared connection limit.
//! - `registry`: the broadcaster registry and discovery (contract 1.1
//!   section 5): the writer's and `wrong_shard`'s `broadcasters`, leaving on
//!   SIGTERM, stale after SIGKILL, the registry's privileges, `registered`,
//!   and a client moved between two broadcasters of the same shards.
//! - `replica`: replays from a real streaming standby (contract 1.1
//!   section 5.4): served as far as it has the trades, the rest from the
//!   primary after `--replica-wait`; a stopped standby and other clusters
//!   not used.
//! - `pooler`: both roles behind a real PgBouncer in transaction mode:
//!   writer processes and plain SQL writers answer exactly what the log
//!   holds; a broadcaster refuses to start there (its LISTEN would be lost);
//!   the session check passes direct connections and session pools.
//! - `resilience`: a broadcaster replaced under the reference client.
//! - `faults`: the fault suite: many reconnecting clients under a flowing
//!   load while LISTEN is cut, Postgres restarts or goes away, the broadcaster
//!   is killed, a subscriber stalls, the NOTIFY queue is pinned; every
//!   sequence checked exactly (docs/RELIABILITY.md).
//! - `hostile`: what an anonymous client can make either role hold: silent
//!   and idle sockets, HTTP/2 prefaces, the open-connection cap.
//! - `logs`: what the real binary writes to stderr through a pipe: no
//!   colour escapes, structured values printed plainly.
//! - `isolation`: faults inside the broadcaster stay contained: a path to
//!   Postgres that freezes without closing.
//! - `rfc6455`: the WebSocket protocol driven with raw bytes: the opening
//!   handshake's rules and every frame rule, each with its exact code.
//! - `balancer`: a real HAProxy running deploy/haproxy.cfg in front of three
//!   broadcasters: routing by market (WebSocket and HTTP reads alike), one
//!   broadcaster SIGKILLed under load, its clients resuming elsewhere, every
//!   sequence checked exactly.
//! - `security`: secrets never in any output (the real binary at
//!   RUST_LOG=trace), what each role's login may and may not do, the Origin
//!   allowlist, the writer's request limits, client input that once panicked.
//!
//! The writer and the broadcaster under test connect as password-protected
//! login roles holding only `marketcast_writer` / `marketcast_broadcaster`
//! (`support::writer_config`, `support::broadcaster_config`); the superuser
//! of DATABASE_URL only creates, migrates and seeds the databases.

mod balancer;
mod broadcaster;
mod contract;
mod faults;
mod feed;
mod hostile;
mod isolation;
mod logs;
mod pooler;
mod promises;
mod props;
mod reads;
mod registry;
mod replica;
mod resilience;
mod rfc6455;
mod security;
mod signed;
mod sql;
mod support;
mod writer;
