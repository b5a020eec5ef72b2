//! The raw command line: clap derive and nothing else. Every option also reads
//! an environment variable. Values stay strings or plain numbers in the
//! clap structs; each role's `config()` below turns them into its checked
//! [`crate::config`] type, and nothing but `main` looks at these structs.
//! Every default is read from the configs' `Default` impls, so it is written
//! once; the arrow points one way (cli -> config).

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::{
    self, format_duration, BroadcasterConfig, DbConfig, DemoConfig, HttpConfig, HubConfig,
    ListenerConfig, ReplicaConfig, SessionConfig, SubscribeConfig, WriterConfig,
    DEFAULT_SHARD_COUNT,
};
use crate::config::{TokenConfig, DEFAULT_JWT_LEEWAY};
use crate::protocol::token::Verifier;

#[derive(Debug, Parser)]
#[command(
    name = "marketcast",
    version,
    about = "Stream database-committed trades from PostgreSQL to browsers over WebSockets."
)]
pub struct Cli {
    /// Log line format. The filter comes from RUST_LOG (default "info").
    #[arg(long, env = "MARKETCAST_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,

    /// Threads that run the role's tasks [default: the CPUs this process may
    /// use, tokio's own default]. Fewer than the cores when the role shares
    /// its machine with busy processes: on 2 cores shared with Postgres and
    /// the load client, one worker took the broadcaster's CPU per frame to
    /// 0.86x and its fan-out p99 to 0.74x (docs/OPERATIONS.md, "Worker
    /// threads").
    #[arg(long, env = "MARKETCAST_WORKER_THREADS", global = true, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub worker_threads: Option<u16>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

// Parsed once at start: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create or upgrade the schema (idempotent, safe to run concurrently).
    Migrate(MigrateArgs),
    /// Run the stateless HTTP write API.
    Writer(WriterArgs),
    /// Run a WebSocket broadcaster for some or all shards.
    Broadcaster(BroadcasterArgs),
    /// Reference client: print a market's trades as JSON lines, resuming after any disconnect.
    Subscribe(SubscribeArgs),
    /// Drop trades older than a bound, keeping each market's newest.
    Prune(PruneArgs),
    /// Everything in one process on a local throwaway Postgres, with a live market page.
    Demo(DemoArgs),
}

#[derive(Debug, Args, Clone)]
pub struct DbArgs {
    /// PostgreSQL connection URL, e.g. postgres://user@127.0.0.1:5432/marketcast.
    /// May carry the password; it is never logged (the environment variable's
    /// value is hidden from --help as well).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,

    /// Largest number of pooled connections (queries and writes; the LISTEN
    /// connection is separate); enough to keep a 2-core Postgres busy.
    #[arg(long, env = "MARKETCAST_POOL_SIZE", default_value_t = DbConfig::default().pool_size)]
    pub pool_size: usize,

    /// How long any database step may take before the caller is told the
    /// database is unavailable (pool wait, connect, statement): the
    /// writer's promised 503 bound.
    #[arg(long, env = "MARKETCAST_DB_TIMEOUT", default_value_t = format_duration(DbConfig::default().timeout))]
    pub db_timeout: String,
}

/// The bounds on sockets, for both server roles.
#[derive(Debug, Args, Clone)]
pub struct HttpArgs {
    /// A connection must send a complete request head within this time of
    /// being accepted, or of its previous response (keep-alive); else it is
    /// closed. Bounds silent and trickling sockets alike.
    #[arg(long, env = "MARKETCAST_HEADER_TIMEOUT", default_value_t = format_duration(HttpConfig::default().header_timeout))]
    pub header_timeout: String,

    /// Open TCP connections at once, WebSockets included; one more is closed
    /// at accept (`marketcast_connections_refused_total`). Keep it under the
    /// process's open-files limit, with room for database connections.
    #[arg(long, env = "MARKETCAST_MAX_OPEN_CONNECTIONS", default_value_t = HttpConfig::default().max_open_connections)]
    pub max_open_connections: usize,
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub db: DbArgs,

    /// Number of notification shards, stored on first migrate and read from the
    /// database by every role afterwards (it cannot change once stored).
    #[arg(long, env = "MARKETCAST_SHARD_COUNT", default_value_t = DEFAULT_SHARD_COUNT)]
    pub shard_count: u32,
}

#[derive(Debug, Args)]
pub struct WriterArgs {
    #[command(flatten)]
    pub db: DbArgs,

    #[command(flatten)]
    pub http: HttpArgs,

    /// Address to bind; port 0 picks a free port. The bound address is printed
    /// as the first stdout line, `listening on HOST:PORT`.
    #[arg(long, env = "MARKETCAST_LISTEN", default_value_t = WriterConfig::default().listen.to_string())]
    pub listen: String,

    /// When set, every POST needs `Authorization: Bearer <token>`. Prefer the
    /// environment variable: a command line is visible to every local user.
    #[arg(long, env = "MARKETCAST_WRITE_TOKEN", hide_env_values = true)]
    pub write_token: Option<String>,

    /// Largest request body in bytes; a bigger one is answered 413. The
    /// default is the contract's 16 KiB (a trade request is under 300 bytes).
    #[arg(long, env = "MARKETCAST_MAX_BODY_BYTES", default_value_t = WriterConfig::default().max_body_bytes)]
    pub max_body_bytes: usize,

    /// API requests handled at once (reading the body, waiting for the
    /// database); the next one is answered 503 `overloaded` with Retry-After.
    /// /healthz and /metrics are not counted.
    #[arg(long, env = "MARKETCAST_MAX_CONCURRENT_REQUESTS", default_value_t = WriterConfig::default().max_concurrent_requests)]
    pub max_concurrent_requests: usize,

    /// How long a client may take to send a request body; then 408. The
    /// default matches the 10s allowed for the headers.
    #[arg(long, env = "MARKETCAST_BODY_TIMEOUT", default_value_t = format_duration(WriterConfig::default().body_timeout))]
    pub body_timeout: String,

    /// Most trades grouped into one transaction. NOTIFY serialises commits
    /// cluster-wide, so grouping concurrent requests is what lets writes scale.
    /// 1 disables grouping.
    #[arg(long, env = "MARKETCAST_BATCH_MAX", default_value_t = WriterConfig::default().batch_max)]
    pub batch_max: usize,

    /// How long the first trade of a batch waits for others to join it. By
    /// default none: a batch is whatever arrived while the previous commit
    /// ran, which adds no latency when idle.
    #[arg(long, env = "MARKETCAST_BATCH_LINGER", default_value_t = format_duration(WriterConfig::default().batch_linger))]
    pub batch_linger: String,

    /// Batches in flight at once. NOTIFY serialises commits cluster-wide, so
    /// fewer, larger batches win; measured with 32 clients, 2 workers gave
    /// 7.0k trades/s against 7.8k with 1 (docs/BENCHMARKS.md).
    #[arg(long, env = "MARKETCAST_BATCH_WORKERS", default_value_t = WriterConfig::default().batch_workers)]
    pub batch_workers: usize,

    #[command(flatten)]
    pub tokens: TokenArgs,
}

#[derive(Debug, Args)]
pub struct BroadcasterArgs {
    #[command(flatten)]
    pub db: DbArgs,

    #[command(flatten)]
    pub http: HttpArgs,

    /// Address to bind; port 0 picks a free port. The bound address is printed
    /// as the first stdout line, `listening on HOST:PORT`.
    #[arg(long, env = "MARKETCAST_LISTEN", default_value_t = BroadcasterConfig::default().listen.to_string())]
    pub listen: String,

    /// Shards this process serves, e.g. `0-3,7`. Default: all shards.
    #[arg(long, env = "MARKETCAST_SHARDS")]
    pub shards: Option<String>,

    /// URL template for `wrong_shard` errors, `{shard}` replaced by the shard
    /// number, e.g. `ws://bcast-{shard}.internal:9001/ws`. Unset: no `url` field.
    #[arg(long, env = "MARKETCAST_SHARD_URL_TEMPLATE")]
    pub shard_url_template: Option<String>,

    /// Register this broadcaster in the registry under this URL (absolute
    /// `ws://` or `wss://`, path ending in `/ws`): clients and the writer are
    /// sent to it. Unset: not registered (v1).
    #[arg(long, env = "MARKETCAST_ADVERTISE_URL")]
    pub advertise_url: Option<String>,

    /// How often a registered broadcaster heartbeats its entry (it is live
    /// for 3 of these), and how often every broadcaster re-reads the live
    /// entries it names in `wrong_shard`.
    #[arg(long, env = "MARKETCAST_REGISTRY_INTERVAL", default_value_t = format_duration(BroadcasterConfig::default().registry.interval))]
    pub registry_interval: String,

    /// Most WebSocket connections; the next one is closed with 1013. The
    /// default stays under a 20000 open-files limit.
    #[arg(long, env = "MARKETCAST_MAX_CONNECTIONS", default_value_t = BroadcasterConfig::default().session.max_connections)]
    pub max_connections: usize,

    /// Most subscriptions per connection (`too_many_subscriptions` above it).
    #[arg(long, env = "MARKETCAST_MAX_SUBSCRIPTIONS", default_value_t = BroadcasterConfig::default().session.max_subscriptions)]
    pub max_subscriptions: usize,

    /// Largest client message in bytes; a bigger one closes with 1009. A
    /// subscribe op is under 200 bytes.
    #[arg(long, env = "MARKETCAST_MAX_MESSAGE_BYTES", default_value_t = BroadcasterConfig::default().session.max_message_bytes)]
    pub max_message_bytes: usize,

    /// Sustained client ops per second before `rate_limited`.
    #[arg(long, env = "MARKETCAST_RATE_PER_SEC", default_value_t = BroadcasterConfig::default().session.rate_per_sec)]
    pub rate_per_sec: u32,

    /// Burst of client ops allowed above the sustained rate.
    #[arg(long, env = "MARKETCAST_RATE_BURST", default_value_t = BroadcasterConfig::default().session.rate_burst)]
    pub rate_burst: u32,

    /// Recent trades kept in memory per market, so resumes and slow clients
    /// catch up without touching Postgres. The default is about 1 MiB per
    /// active market.
    #[arg(long, env = "MARKETCAST_RING_SIZE", default_value_t = BroadcasterConfig::default().hub.ring_size)]
    pub ring_size: usize,

    /// Trades per page read from the log (the hub's reads and replays).
    #[arg(long, env = "MARKETCAST_REPLAY_PAGE", default_value_t = BroadcasterConfig::default().replay_page)]
    pub replay_page: usize,

    /// Live frames queued per market between the hub and its subscribers. A
    /// subscriber further behind than this catches up from the ring or the log
    /// instead.
    #[arg(long, env = "MARKETCAST_LIVE_QUEUE", default_value_t = BroadcasterConfig::default().hub.live_queue)]
    pub live_queue: usize,

    /// A socket write that cannot finish within this time marks a slow
    /// consumer: it is closed with 4000 (reconnect with from_seq).
    #[arg(long, env = "MARKETCAST_WRITE_TIMEOUT", default_value_t = format_duration(BroadcasterConfig::default().session.write_timeout))]
    pub write_timeout: String,

    /// How often the server pings each WebSocket.
    #[arg(long, env = "MARKETCAST_PING_INTERVAL", default_value_t = format_duration(BroadcasterConfig::default().session.ping_interval))]
    pub ping_interval: String,

    /// A connection that sends nothing (not even a pong) for this long is
    /// closed. The default is three missed pings.
    #[arg(long, env = "MARKETCAST_IDLE_TIMEOUT", default_value_t = format_duration(BroadcasterConfig::default().session.idle_timeout))]
    pub idle_timeout: String,

    /// How often the LISTEN connection is probed; a probe that does not answer
    /// within half this interval drops and re-establishes it.
    #[arg(long, env = "MARKETCAST_LISTEN_HEARTBEAT", default_value_t = format_duration(BroadcasterConfig::default().listener.heartbeat))]
    pub listen_heartbeat: String,

    /// How often markets with subscribers are compared with markets.last_seq,
    /// catching any notification that was lost.
    #[arg(long, env = "MARKETCAST_RECONCILE_INTERVAL", default_value_t = format_duration(BroadcasterConfig::default().hub.reconcile_interval))]
    pub reconcile_interval: String,

    /// Longest wait between LISTEN reconnect attempts (exponential backoff with
    /// jitter starts at 100ms).
    #[arg(long, env = "MARKETCAST_RECONNECT_MAX", default_value_t = format_duration(BroadcasterConfig::default().listener.reconnect_max))]
    pub reconnect_max: String,

    /// Connections reserved for the hub's reads of new trades, apart from the
    /// pool that serves subscribes and catch-up replays, so that a storm of
    /// replays cannot delay live trades (one read per market is in flight at
    /// most).
    #[arg(long, env = "MARKETCAST_HUB_POOL_SIZE", default_value_t = BroadcasterConfig::default().hub_pool_size)]
    pub hub_pool_size: usize,

    /// Log a warning when `pg_notification_queue_usage()` (sampled every
    /// reconcile interval, exported as `marketcast_notify_queue_usage`) is at
    /// or above this fraction. The default is 80 MiB of the 8 GiB queue: the
    /// queue only grows when some LISTEN session in the cluster stops reading,
    /// and when it is full every notifying commit (every trade) fails.
    #[arg(long, env = "MARKETCAST_NOTIFY_QUEUE_WARN", default_value_t = BroadcasterConfig::default().hub.notify_queue_warn)]
    pub notify_queue_warn: f64,

    /// Comma-separated origins (`https://app.example,https://b.example:8443`)
    /// whose pages may open WebSockets; an upgrade carrying any other `Origin`
    /// is answered 403. Unset: any origin (the feed is public).
    #[arg(long, env = "MARKETCAST_ALLOWED_ORIGINS")]
    pub allowed_origins: Option<String>,

    /// With --allowed-origins, also refuse upgrades without an `Origin`
    /// header (403). Browsers always send one; off by default so that
    /// non-browser clients (`marketcast subscribe`, servers) keep working.
    #[arg(long, env = "MARKETCAST_REQUIRE_ORIGIN", action = clap::ArgAction::SetTrue,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub require_origin: bool,

    /// How often a subscription that asked for heads (`"heads":true`) gets a
    /// `head` while nothing else names its market: the latest seq, so a
    /// client tells a quiet market from a stale feed. 0 disables heads.
    #[arg(long, env = "MARKETCAST_HEAD_INTERVAL", default_value_t = format_duration(BroadcasterConfig::default().session.head_interval))]
    pub head_interval: String,

    /// Upper bound of a subscribe's `recent` (the newest N trades, then
    /// live): each is one log read of up to N trades.
    #[arg(long, env = "MARKETCAST_MAX_RECENT", default_value_t = BroadcasterConfig::default().session.max_recent)]
    pub max_recent: u32,

    /// Lower bound of a ticker subscription's `interval_ms` (the upper
    /// bound, 60000, is the contract's): a ticker group emits at most one
    /// frame per interval per market.
    #[arg(long, env = "MARKETCAST_MIN_TICKER_INTERVAL", default_value_t = format_duration(BroadcasterConfig::default().session.min_ticker_interval))]
    pub min_ticker_interval: String,

    /// An SSE stream (`GET /v1/markets/{id}/stream`) that wrote nothing for
    /// this long gets a comment line, so proxies and browsers do not drop
    /// an idle stream.
    #[arg(long, env = "MARKETCAST_SSE_KEEPALIVE", default_value_t = format_duration(BroadcasterConfig::default().session.sse_keepalive))]
    pub sse_keepalive: String,

    /// Upper bound of a long-poll's `wait_ms` (`GET /v1/markets/{id}/trades`):
    /// a waiting request holds a connection slot this long at most.
    #[arg(long, env = "MARKETCAST_MAX_POLL_WAIT", default_value_t = format_duration(BroadcasterConfig::default().session.max_poll_wait))]
    pub max_poll_wait: String,

    #[command(flatten)]
    pub tokens: TokenArgs,

    #[command(flatten)]
    pub replica: ReplicaArgs,
}

/// Replay from a read replica (contract 1.1 section 5.4).
#[derive(Args, Clone)]
pub struct ReplicaArgs {
    /// A hot standby of DATABASE_URL that replays (from_seq, recent, ticker
    /// catch-up, SSE, GET .../trades) read trades from while it is usable.
    /// Unset: every read goes to the primary. May hold a password: prefer
    /// the env var.
    #[arg(long, env = "MARKETCAST_REPLAY_DATABASE_URL", hide_env_values = true)]
    pub replay_database_url: Option<String>,

    /// A trade a replay owes that the replica does not have yet is read from
    /// the primary after at most this long: the most replica lag adds.
    #[arg(long, env = "MARKETCAST_REPLICA_WAIT", default_value_t = format_duration(BroadcasterConfig::default().replica.wait))]
    pub replica_wait: String,
}

/// Written by hand: the URL may hold a password.
impl std::fmt::Debug for ReplicaArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaArgs")
            .field(
                "replay_database_url",
                &self.replay_database_url.as_deref().map(config::redact_url),
            )
            .field("replica_wait", &self.replica_wait)
            .finish()
    }
}

/// Token verification (contract 1.1 section 1), for both server roles: one
/// set of keys serves the writer and the broadcaster.
#[derive(Args, Clone)]
pub struct TokenArgs {
    /// Verify HS256 tokens with this secret, at least 32 bytes. A secret:
    /// pass it through the environment variable (a command line is visible
    /// to every local user); never logged, its value hidden from --help.
    #[arg(long, env = "MARKETCAST_JWT_HS256_SECRET", hide_env_values = true)]
    pub jwt_hs256_secret: Option<String>,

    /// A PEM file of one or more PUBLIC KEY blocks: RSA keys (at least 2048
    /// bits) verify RS256 tokens, Ed25519 keys EdDSA tokens. List several to
    /// rotate keys. Read once at start.
    #[arg(long, env = "MARKETCAST_JWT_PUBLIC_KEY", value_name = "FILE")]
    pub jwt_public_key: Option<std::path::PathBuf>,

    /// Clock skew allowed on a token's `exp` and `nbf`.
    #[arg(long, env = "MARKETCAST_JWT_LEEWAY", default_value_t = format_duration(DEFAULT_JWT_LEEWAY))]
    pub jwt_leeway: String,

    /// Refuse requests without a token (401 `unauthorized`): the writer's
    /// GETs, the broadcaster's upgrades and reads. Needs token keys. Off by
    /// default: v1 clients keep working.
    #[arg(long, env = "MARKETCAST_REQUIRE_TOKEN", action = clap::ArgAction::SetTrue,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub require_token: bool,
}

/// Written by hand: the secret must not reach a `{:?}`.
impl std::fmt::Debug for TokenArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenArgs")
            .field(
                "jwt_hs256_secret",
                &self.jwt_hs256_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("jwt_public_key", &self.jwt_public_key)
            .field("jwt_leeway", &self.jwt_leeway)
            .field("require_token", &self.require_token)
            .finish()
    }
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("follow").required(true).args(["market", "markets"])))]
pub struct SubscribeArgs {
    /// WebSocket URL of a broadcaster, e.g. ws://127.0.0.1:9001/ws (its query is dropped).
    #[arg(env = "MARKETCAST_URL", default_value_t = SubscribeConfig::default().url)]
    pub url: String,

    /// Market to follow (or --markets).
    #[arg(
        long,
        env = "MARKETCAST_MARKET",
        conflicts_with = "markets",
        required_unless_present = "markets"
    )]
    pub market: Option<String>,

    /// Markets to follow over one connection, comma-separated: A,B,C (or --market).
    #[arg(long, env = "MARKETCAST_MARKETS")]
    pub markets: Option<String>,

    /// Start after this seq in each market (replay); default: live from the current head.
    #[arg(long, env = "MARKETCAST_FROM_SEQ", conflicts_with = "recent")]
    pub from_seq: Option<u64>,

    /// Start with each market's newest N trades, then live. Only the first
    /// connect asks for them; a reconnect resumes after the last seq seen.
    #[arg(long, env = "MARKETCAST_RECENT", value_name = "N")]
    pub recent: Option<u32>,

    /// Print ticker frames, each folding up to MS milliseconds of a market's
    /// trades, instead of each trade.
    #[arg(long, env = "MARKETCAST_TICKER", value_name = "MS")]
    pub ticker: Option<u32>,

    /// Token (JWT) sent as `Authorization: Bearer` on every connect; never printed.
    #[arg(long, env = "MARKETCAST_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// Stop after printing this many trades or ticker frames (default: run until interrupted).
    #[arg(long, env = "MARKETCAST_COUNT")]
    pub count: Option<u64>,

    /// Longest wait between reconnect attempts.
    #[arg(long, env = "MARKETCAST_RECONNECT_MAX", default_value_t = format_duration(SubscribeConfig::default().reconnect_max))]
    pub reconnect_max: String,
}

#[derive(Debug, Args)]
pub struct PruneArgs {
    #[command(flatten)]
    pub db: DbArgs,

    /// Drop trades older than this (e.g. 30d, 12h); each market's newest trade stays.
    #[arg(long, env = "MARKETCAST_PRUNE_OLDER_THAN")]
    pub older_than: String,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// PostgreSQL URL; unset: start a throwaway cluster with bin/pg-dev.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// Address of the page and the write API.
    #[arg(long, env = "MARKETCAST_DEMO_LISTEN", default_value_t = DemoConfig::default().listen.to_string())]
    pub listen: String,

    /// Address of the WebSocket broadcaster.
    #[arg(long, env = "MARKETCAST_DEMO_WS_LISTEN", default_value_t = DemoConfig::default().ws_listen.to_string())]
    pub ws_listen: String,

    /// Synthetic trades per second across the demo markets; 0 turns the flow off.
    #[arg(long, env = "MARKETCAST_DEMO_RATE", default_value_t = DemoConfig::default().rate)]
    pub rate: f64,
}

// ------------------------------------------------------------------ to configs
//
// Each role's arguments become its validated config here: values parsed by
// `config`'s parsers, cross-field rules checked by the configs themselves.

impl DbArgs {
    /// The validated [`DbConfig`].
    pub fn config(&self) -> Result<DbConfig> {
        if self.pool_size == 0 {
            bail!("--pool-size must be at least 1");
        }
        Ok(DbConfig {
            url: self.database_url.clone(),
            pool_size: self.pool_size,
            timeout: config::duration("--db-timeout", &self.db_timeout)?,
        })
    }
}

impl HttpArgs {
    /// The validated [`HttpConfig`].
    pub fn config(&self) -> Result<HttpConfig> {
        let c = HttpConfig {
            header_timeout: config::duration("--header-timeout", &self.header_timeout)?,
            max_open_connections: self.max_open_connections,
        };
        c.check()?;
        Ok(c)
    }
}

impl TokenArgs {
    /// The validated [`TokenConfig`]; reads the `--jwt-public-key` file. An
    /// empty secret counts as unset (as an empty `--write-token` does).
    pub fn config(&self) -> Result<TokenConfig> {
        let leeway = config::duration("--jwt-leeway", &self.jwt_leeway)?;
        let pem = self
            .jwt_public_key
            .as_ref()
            .map(|path| {
                std::fs::read_to_string(path)
                    .with_context(|| format!("--jwt-public-key: cannot read {}", path.display()))
            })
            .transpose()?;
        let secret = self.jwt_hs256_secret.as_deref().filter(|s| !s.is_empty());
        let c = TokenConfig {
            verifier: Verifier::new(secret, pem.as_deref(), leeway)?,
            require_token: self.require_token,
        };
        c.check()?;
        Ok(c)
    }
}

impl WriterArgs {
    /// The validated [`WriterConfig`].
    pub fn config(&self) -> Result<WriterConfig> {
        if self.batch_max == 0 || self.batch_workers == 0 || self.max_concurrent_requests == 0 {
            bail!("--batch-max, --batch-workers and --max-concurrent-requests must be at least 1");
        }
        if self.max_body_bytes < 1024 {
            bail!("--max-body-bytes must be at least 1024");
        }
        let body_timeout = config::duration("--body-timeout", &self.body_timeout)?;
        if body_timeout.is_zero() {
            bail!("--body-timeout must be positive");
        }
        Ok(WriterConfig {
            db: self.db.config()?,
            http: self.http.config()?,
            listen: config::addr("--listen", &self.listen)?,
            write_token: self.write_token.clone().filter(|t| !t.is_empty()),
            batch_max: self.batch_max,
            batch_linger: config::duration("--batch-linger", &self.batch_linger)?,
            batch_workers: self.batch_workers,
            max_body_bytes: self.max_body_bytes,
            max_concurrent_requests: self.max_concurrent_requests,
            body_timeout,
            tokens: self.tokens.config()?,
        })
    }
}

impl BroadcasterArgs {
    /// The validated [`BroadcasterConfig`].
    pub fn config(&self) -> Result<BroadcasterConfig> {
        let c = BroadcasterConfig {
            db: self.db.config()?,
            http: self.http.config()?,
            listen: config::addr("--listen", &self.listen)?,
            shards: self
                .shards
                .as_deref()
                .map(config::parse_shards)
                .transpose()?,
            shard_url_template: self.shard_url_template.clone(),
            registry: config::RegistryConfig {
                advertise_url: self
                    .advertise_url
                    .as_deref()
                    .map(config::advertise_url)
                    .transpose()?,
                interval: config::duration("--registry-interval", &self.registry_interval)?,
            },
            replay_page: self.replay_page,
            hub_pool_size: self.hub_pool_size,
            allowed_origins: self
                .allowed_origins
                .as_deref()
                .map(config::parse_origins)
                .transpose()?,
            require_origin: self.require_origin,
            tokens: self.tokens.config()?,
            listener: ListenerConfig {
                heartbeat: config::duration("--listen-heartbeat", &self.listen_heartbeat)?,
                reconnect_max: config::duration("--reconnect-max", &self.reconnect_max)?,
            },
            hub: HubConfig {
                ring_size: self.ring_size,
                live_queue: self.live_queue,
                reconcile_interval: config::duration(
                    "--reconcile-interval",
                    &self.reconcile_interval,
                )?,
                notify_queue_warn: self.notify_queue_warn,
            },
            session: SessionConfig {
                max_connections: self.max_connections,
                max_subscriptions: self.max_subscriptions,
                max_message_bytes: self.max_message_bytes,
                rate_per_sec: self.rate_per_sec,
                rate_burst: self.rate_burst,
                write_timeout: config::duration("--write-timeout", &self.write_timeout)?,
                ping_interval: config::duration("--ping-interval", &self.ping_interval)?,
                idle_timeout: config::duration("--idle-timeout", &self.idle_timeout)?,
                head_interval: config::duration("--head-interval", &self.head_interval)?,
                max_recent: self.max_recent,
                min_ticker_interval: config::duration(
                    "--min-ticker-interval",
                    &self.min_ticker_interval,
                )?,
                sse_keepalive: config::duration("--sse-keepalive", &self.sse_keepalive)?,
                max_poll_wait: config::duration("--max-poll-wait", &self.max_poll_wait)?,
            },
            replica: ReplicaConfig {
                url: self
                    .replica
                    .replay_database_url
                    .clone()
                    .filter(|u| !u.trim().is_empty()),
                wait: config::duration("--replica-wait", &self.replica.replica_wait)?,
            },
        };
        if c.require_origin && c.allowed_origins.is_none() {
            bail!("--require-origin needs --allowed-origins");
        }
        c.check()?;
        Ok(c)
    }
}

impl SubscribeArgs {
    /// The validated [`SubscribeConfig`].
    pub fn config(&self) -> Result<SubscribeConfig> {
        let markets = match (&self.market, &self.markets) {
            (Some(m), None) => vec![m.clone()],
            (None, Some(list)) => list.split(',').map(|m| m.trim().to_string()).collect(),
            // clap already refuses both and neither; this is for other callers.
            _ => bail!("give exactly one of --market and --markets"),
        };
        for (i, m) in markets.iter().enumerate() {
            if m.is_empty() {
                bail!("--markets: an empty market id (write A,B,C)");
            }
            if markets[..i].contains(m) {
                bail!("--markets: {m} is listed twice");
            }
        }
        let start = match (self.from_seq, self.recent) {
            (Some(f), None) => config::SubscribeStart::FromSeq(
                i64::try_from(f)
                    .ok()
                    .and_then(crate::protocol::client::from_seq)
                    .context("--from-seq must be below 2^63-1")?,
            ),
            (None, Some(0)) => bail!("--recent must be at least 1"),
            (None, Some(n)) => config::SubscribeStart::Recent(n),
            (None, None) => config::SubscribeStart::Live,
            (Some(_), Some(_)) => bail!("--from-seq and --recent exclude each other"),
        };
        if let Some(ms) = self.ticker {
            if !(1..=config::MAX_TICKER_INTERVAL_MS).contains(&ms) {
                bail!(
                    "--ticker must be 1..={} ms (the broadcaster's --min-ticker-interval is its lower bound)",
                    config::MAX_TICKER_INTERVAL_MS
                );
            }
        }
        // Checked here, not at the first connect: the value never appears in the message.
        let token = self.token.clone().filter(|t| !t.is_empty());
        if token
            .as_ref()
            .is_some_and(|t| !t.bytes().all(|b| b.is_ascii_graphic()))
        {
            bail!("--token must be printable ASCII without spaces, as a JWT is");
        }
        Ok(SubscribeConfig {
            url: self.url.clone(),
            markets,
            start,
            ticker_ms: self.ticker,
            token,
            count: self.count,
            reconnect_max: config::duration("--reconnect-max", &self.reconnect_max)?,
        })
    }
}

impl DemoArgs {
    /// The validated [`DemoConfig`].
    pub fn config(&self) -> Result<DemoConfig> {
        if !self.rate.is_finite() || self.rate < 0.0 || self.rate > config::MAX_DEMO_RATE {
            bail!(
                "--rate must be between 0 and {} trades per second",
                config::MAX_DEMO_RATE
            );
        }
        Ok(DemoConfig {
            database_url: self.database_url.clone().filter(|u| !u.trim().is_empty()),
            listen: config::addr("--listen", &self.listen)?,
            ws_listen: config::addr("--ws-listen", &self.ws_listen)?,
            rate: self.rate,
            ..DemoConfig::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// docs/OPERATIONS.md lists every option, its environment variable and
    /// its default, as `--help` shows it (the default comes from the
    /// configs' `Default` impls: a changed default fails here until the
    /// docs follow).
    #[test]
    fn every_option_is_documented() {
        let doc = include_str!("../docs/OPERATIONS.md");
        let cli = super::Cli::command();
        let mut missing = Vec::new();
        let global = cli.get_arguments().map(|a| ("marketcast", a));
        let per_role = cli
            .get_subcommands()
            .flat_map(|sub| sub.get_arguments().map(move |a| (sub.get_name(), a)));
        for (role, arg) in global.chain(per_role) {
            let Some(long) = arg.get_long() else { continue };
            if matches!(long, "help" | "version") {
                continue;
            }
            let flag = format!("`--{long}");
            if !doc.contains(&flag) {
                missing.push(format!("{role} --{long}"));
            }
            if let Some(env) = arg.get_env() {
                let env = env.to_string_lossy();
                let short = env.rsplit('_').next().unwrap_or("");
                if !doc.contains(&*env) && !doc.contains(&format!("_{short}`")) {
                    missing.push(format!("{role} {env}"));
                }
            }
            for default in arg.get_default_values() {
                let default = match default.to_string_lossy() {
                    d if d == "false" => "off".to_string(),
                    d => d.into_owned(),
                };
                if !mentions(doc, &flag, &default) {
                    missing.push(format!("{role} --{long} default {default}"));
                }
            }
        }
        assert!(
            missing.is_empty(),
            "undocumented in docs/OPERATIONS.md: {missing:?}"
        );
    }

    /// The token options are checked before a server starts, for both
    /// roles, with messages that name the option and never the secret.
    #[test]
    fn token_options_are_checked_at_start() {
        use super::{Cli, Command};
        use clap::Parser;
        let key = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/keys/test-only-ed25519-a.pub.pem"
        );
        let secret = "a-secret-of-more-than-32-bytes-0123456789";
        for role in ["writer", "broadcaster"] {
            let tokens = |args: &[&str]| {
                let argv = ["marketcast", role, "--database-url", "postgres://u@h/db"];
                let cli = Cli::try_parse_from(argv.iter().chain(args)).unwrap();
                match cli.command {
                    Command::Writer(w) => w.config().map(|c| c.tokens),
                    Command::Broadcaster(b) => b.config().map(|c| c.tokens),
                    _ => unreachable!(),
                }
            };
            let refused = |args: &[&str], option: &str| {
                let e = format!("{:#}", tokens(args).unwrap_err());
                assert!(e.contains(option), "{role} {args:?}: {e}");
                e
            };
            let none = tokens(&[]).unwrap();
            assert!(none.verifier.is_none() && !none.require_token);
            refused(&["--require-token"], "--require-token");
            let short = refused(
                &["--jwt-hs256-secret", "short-s3cret"],
                "--jwt-hs256-secret",
            );
            assert!(!short.contains("short-s3cret"), "{short}");
            refused(
                &["--jwt-public-key", "/nonexistent/keys.pem"],
                "--jwt-public-key",
            );
            refused(&["--jwt-public-key", file!()], "--jwt-public-key");
            refused(
                &["--jwt-hs256-secret", secret, "--jwt-leeway", "soon"],
                "--jwt-leeway",
            );
            let set = tokens(&[
                "--jwt-public-key",
                key,
                "--require-token",
                "--jwt-leeway",
                "5s",
            ])
            .unwrap();
            let verifier = set.verifier.expect("token keys");
            assert!(set.require_token);
            assert_eq!(verifier.leeway(), std::time::Duration::from_secs(5));
            let argv = [
                "marketcast",
                role,
                "--database-url",
                "postgres://u@h/db",
                "--jwt-hs256-secret",
                secret,
            ];
            let debug = format!("{:?}", Cli::try_parse_from(argv).unwrap());
            assert!(!debug.contains(secret), "{debug}");
            assert!(tokens(&["--jwt-hs256-secret", secret])
                .unwrap()
                .verifier
                .is_some());
        }
    }

    /// Whether some place that names `flag` also says `default`: its table
    /// row, or in prose the text up to the next option.
    fn mentions(doc: &str, flag: &str, default: &str) -> bool {
        doc.match_indices(flag).any(|(at, _)| {
            let line_start = doc[..at].rfind('\n').map_or(0, |i| i + 1);
            let rest = &doc[at..];
            let end = if doc[line_start..].starts_with('|') {
                rest.find('\n')
            } else {
                rest[flag.len()..].find("`--").map(|i| i + flag.len())
            };
            rest[..end.unwrap_or(rest.len())].contains(default)
        })
    }
}
