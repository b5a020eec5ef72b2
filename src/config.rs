//! Validated configuration: what each role runs with, nested the way the
//! roles are (a [`BroadcasterConfig`] holds the listener's, the hub's and the
//! sessions' parts), with every default written once in a `Default` impl.
//! [`crate::cli`] reads the command line into these (its defaults come from
//! here, so this module imports nothing of the crate but the contract's
//! rules); the parsers of option values and the cross-field checks are here,
//! and tests build configs directly with `..Default::default()`.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::protocol::token::Verifier;

/// Database access shared by every role.
///
/// `Debug` is written by hand (as for [`WriterConfig`]): the URL may carry the
/// database password, and a derived `Debug` would print it wherever a config
/// is logged with `?`. See docs/SECURITY.md, "Secrets".
#[derive(Clone)]
pub struct DbConfig {
    /// May hold a password: never log it; [`redact_url`] it first.
    pub url: String,
    pub pool_size: usize,
    /// Bound on any single database step; see `--db-timeout`.
    pub timeout: Duration,
}

impl std::fmt::Debug for DbConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DbConfig")
            .field("url", &redact_url(&self.url))
            .field("pool_size", &self.pool_size)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// `url` with any password replaced by `***`, for messages and logs. A URL
/// that does not parse is replaced whole: its password cannot be located.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                // Fails only for URLs that cannot have credentials at all.
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        Err(_) => "<unparsable URL>".to_string(),
    }
}

impl Default for DbConfig {
    fn default() -> Self {
        DbConfig {
            url: String::new(),
            pool_size: 16,
            timeout: Duration::from_secs(5),
        }
    }
}

impl DbConfig {
    pub fn new(url: impl Into<String>) -> Self {
        DbConfig {
            url: url.into(),
            ..DbConfig::default()
        }
    }
}

/// The bounds every HTTP server of a role keeps ([`crate::http::serve`]).
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// A connection that has not sent a complete request head this long
    /// after accept, or after its previous response, is closed.
    pub header_timeout: Duration,
    /// Open TCP connections, WebSockets included; one more is closed at accept.
    pub max_open_connections: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            header_timeout: Duration::from_secs(10),
            // Under a 20000 open-files limit, with room left for the
            // database connections, the LISTEN connection and files.
            max_open_connections: 19_000,
        }
    }
}

impl HttpConfig {
    pub fn check(&self) -> Result<()> {
        if self.header_timeout.is_zero() || self.max_open_connections == 0 {
            bail!("--header-timeout must be positive and --max-open-connections at least 1");
        }
        Ok(())
    }
}

#[derive(Clone)]
pub struct WriterConfig {
    pub db: DbConfig,
    pub http: HttpConfig,
    /// Where `main` binds; `writer::run` takes a bound listener.
    pub listen: SocketAddr,
    /// A secret: never logged (the hand-written `Debug` prints only whether it is set).
    pub write_token: Option<String>,
    pub batch_max: usize,
    pub batch_linger: Duration,
    pub batch_workers: usize,
    /// Largest request body; 413 above it.
    pub max_body_bytes: usize,
    /// API requests handled at once; 503 `overloaded` above it.
    pub max_concurrent_requests: usize,
    /// Longest wait for a request body; 408 after it.
    pub body_timeout: Duration,
    /// Token keys and `--require-token` (contract 1.1 sections 1 and 4.1).
    pub tokens: TokenConfig,
}

impl std::fmt::Debug for WriterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriterConfig")
            .field("db", &self.db)
            .field("http", &self.http)
            .field("listen", &self.listen)
            .field(
                "write_token",
                &self.write_token.as_ref().map(|_| "<redacted>"),
            )
            .field("batch_max", &self.batch_max)
            .field("batch_linger", &self.batch_linger)
            .field("batch_workers", &self.batch_workers)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_concurrent_requests", &self.max_concurrent_requests)
            .field("body_timeout", &self.body_timeout)
            .field("tokens", &self.tokens)
            .finish()
    }
}

/// The defaults of every writer option (`marketcast writer --help` shows
/// these; docs/OPERATIONS.md says why, checked by a test).
impl Default for WriterConfig {
    fn default() -> Self {
        WriterConfig {
            db: DbConfig::default(),
            http: HttpConfig::default(),
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            write_token: None,
            batch_max: 64,
            batch_linger: Duration::ZERO,
            batch_workers: 1,
            // The contract's 16 KiB.
            max_body_bytes: 16 * 1024,
            max_concurrent_requests: 1024,
            body_timeout: Duration::from_secs(10),
            tokens: TokenConfig::default(),
        }
    }
}

impl WriterConfig {
    pub fn new(db: DbConfig) -> Self {
        WriterConfig {
            db,
            ..WriterConfig::default()
        }
    }
}

#[derive(Debug, Clone)]
pub struct BroadcasterConfig {
    pub db: DbConfig,
    pub http: HttpConfig,
    /// Where `main` binds; `broadcaster::run` takes a bound listener.
    pub listen: SocketAddr,
    /// None: every shard of the stored shard count.
    pub shards: Option<BTreeSet<u32>>,
    pub shard_url_template: Option<String>,
    /// The broadcaster registry (contract 1.1 section 5.1).
    pub registry: RegistryConfig,
    /// Trades per page read from the log, by the hub and by replays.
    pub replay_page: usize,
    pub hub_pool_size: usize,
    /// WebSocket upgrades whose `Origin` is not in this set get 403 (see
    /// [`crate::broadcaster`]); None: any origin. Entries are normalised with
    /// [`normalize_origin`].
    pub allowed_origins: Option<BTreeSet<String>>,
    /// With an allowlist, also refuse upgrades that carry no `Origin` at all
    /// (non-browser clients). Ignored without an allowlist.
    pub require_origin: bool,
    /// Token keys and `--require-token` (contract 1.1 sections 1 and 2.1).
    pub tokens: TokenConfig,
    pub listener: ListenerConfig,
    pub hub: HubConfig,
    pub session: SessionConfig,
    /// `--replay-database-url`, `--replica-wait` (contract 1.1 section 5.4).
    pub replica: ReplicaConfig,
}

/// Replay reads from a hot standby ([`crate::broadcaster`]'s `replica.rs`).
/// `Debug` is written by hand: the URL may hold a password.
#[derive(Clone)]
pub struct ReplicaConfig {
    /// None: every read goes to the primary. May hold a password: never log it.
    pub url: Option<String>,
    /// How long a replay waits for the replica to have a trade it owes
    /// before reading it from the primary.
    pub wait: Duration,
}

impl std::fmt::Debug for ReplicaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaConfig")
            .field("url", &self.url.as_deref().map(redact_url))
            .field("wait", &self.wait)
            .finish()
    }
}

/// The broadcaster registry ([`crate::broadcaster::registry`]).
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// `--advertise-url`, checked by [`advertise_url`]; None: not registered (v1).
    pub advertise_url: Option<String>,
    /// Heartbeat period of its entry, and how often the live entries are
    /// re-read for `wrong_shard`.
    pub interval: Duration,
}

/// The LISTEN connection ([`crate::broadcaster::listener`]).
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// Probe interval; a probe must answer within half of it.
    pub heartbeat: Duration,
    /// Cap of the reconnect backoff (which starts at 100ms).
    pub reconnect_max: Duration,
}

/// Per-market state ([`crate::broadcaster::hub`]).
#[derive(Debug, Clone)]
pub struct HubConfig {
    pub ring_size: usize,
    pub live_queue: usize,
    pub reconcile_interval: Duration,
    /// Warn when `pg_notification_queue_usage()` (0..1) is at or above this.
    pub notify_queue_warn: f64,
}

/// One WebSocket connection's limits and timers ([`crate::broadcaster::session`]).
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub max_connections: usize,
    pub max_subscriptions: usize,
    pub max_message_bytes: usize,
    pub rate_per_sec: u32,
    pub rate_burst: u32,
    pub write_timeout: Duration,
    pub ping_interval: Duration,
    pub idle_timeout: Duration,
    /// `head` messages for subscriptions that ask for them; zero: none.
    pub head_interval: Duration,
    /// Upper bound of a subscribe's `recent`.
    pub max_recent: u32,
    /// Lower bound of a ticker subscription's `interval_ms`.
    pub min_ticker_interval: Duration,
    /// An SSE stream that wrote nothing this long gets a comment line.
    pub sse_keepalive: Duration,
    /// Upper bound of a long-poll's `wait_ms`.
    pub max_poll_wait: Duration,
}

/// The defaults of every broadcaster option (`marketcast broadcaster
/// --help` shows these; docs/OPERATIONS.md says why, checked by a test).
impl Default for BroadcasterConfig {
    fn default() -> Self {
        BroadcasterConfig {
            db: DbConfig::default(),
            http: HttpConfig::default(),
            listen: SocketAddr::from(([127, 0, 0, 1], 9001)),
            shards: None,
            shard_url_template: None,
            registry: RegistryConfig {
                advertise_url: None,
                interval: Duration::from_secs(5),
            },
            replay_page: 1000,
            hub_pool_size: 4,
            allowed_origins: None,
            require_origin: false,
            tokens: TokenConfig::default(),
            listener: ListenerConfig {
                heartbeat: Duration::from_secs(5),
                reconnect_max: Duration::from_secs(5),
            },
            hub: HubConfig {
                ring_size: 4096,
                live_queue: 1024,
                reconcile_interval: Duration::from_secs(2),
                notify_queue_warn: 0.01,
            },
            session: SessionConfig {
                // Under this machine's 20000 open-files limit.
                max_connections: 18_000,
                max_subscriptions: 100,
                max_message_bytes: 4096,
                rate_per_sec: 50,
                rate_burst: 100,
                write_timeout: Duration::from_secs(10),
                ping_interval: Duration::from_secs(20),
                idle_timeout: Duration::from_secs(60),
                // The contract's defaults.
                head_interval: Duration::from_secs(5),
                max_recent: 1000,
                min_ticker_interval: Duration::from_millis(100),
                sse_keepalive: Duration::from_secs(15),
                max_poll_wait: Duration::from_secs(30),
            },
            replica: ReplicaConfig {
                url: None,
                // The contract's: lag adds at most this to a replay.
                wait: Duration::from_millis(250),
            },
        }
    }
}

impl BroadcasterConfig {
    /// What a client op is checked against.
    pub fn op_limits(&self) -> crate::protocol::client::Limits {
        let s = &self.session;
        crate::protocol::client::Limits {
            max_subscriptions: s.max_subscriptions,
            max_recent: s.max_recent,
            min_interval_ms: s.min_ticker_interval.as_millis().min(u32::MAX as u128) as u32,
        }
    }

    pub fn new(db: DbConfig) -> Self {
        BroadcasterConfig {
            db,
            ..BroadcasterConfig::default()
        }
    }

    /// Cross-field rules; also run by `broadcaster::run` for configs built in code.
    pub fn check(&self) -> Result<()> {
        self.http.check()?;
        self.tokens.check()?;
        let (s, h, l) = (&self.session, &self.hub, &self.listener);
        for (name, v) in [
            ("--max-connections", s.max_connections),
            ("--max-subscriptions", s.max_subscriptions),
            ("--rate-burst", s.rate_burst as usize),
            ("--rate-per-sec", s.rate_per_sec as usize),
            ("--ring-size", h.ring_size),
            ("--replay-page", self.replay_page),
            ("--live-queue", h.live_queue),
            ("--hub-pool-size", self.hub_pool_size),
        ] {
            if v == 0 {
                bail!("{name} must be at least 1");
            }
        }
        // NaN fails this too.
        if !(h.notify_queue_warn > 0.0 && h.notify_queue_warn <= 1.0) {
            bail!("--notify-queue-warn must be a fraction in (0, 1]");
        }
        if s.sse_keepalive < Duration::from_millis(100) {
            bail!("--sse-keepalive must be at least 100ms");
        }
        if s.max_recent == 0 {
            bail!("--max-recent must be at least 1");
        }
        let min_ticker = s.min_ticker_interval.as_millis();
        if !(1..=crate::protocol::client::MAX_INTERVAL_MS as u128).contains(&min_ticker) {
            bail!("--min-ticker-interval must be from 1ms to 60s");
        }
        if let Some(u) = &self.registry.advertise_url {
            advertise_url(u)?;
        }
        if self.registry.interval < Duration::from_millis(100) {
            bail!("--registry-interval must be at least 100ms");
        }
        if s.max_message_bytes < 64 {
            bail!("--max-message-bytes must be at least 64");
        }
        if s.idle_timeout <= s.ping_interval {
            bail!("--idle-timeout must be longer than --ping-interval, or idle clients that answer pings are closed");
        }
        if l.heartbeat.is_zero()
            || h.reconcile_interval.is_zero()
            || s.ping_interval.is_zero()
            || s.write_timeout.is_zero()
        {
            bail!("--listen-heartbeat, --reconcile-interval, --ping-interval and --write-timeout must be positive");
        }
        Ok(())
    }
}

/// Token verification (contract 1.1 section 1), the same for the writer and
/// the broadcaster: one set of keys serves both.
///
/// `Debug` is derived: [`Verifier`]'s own prints no key material.
#[derive(Debug, Clone, Default)]
pub struct TokenConfig {
    /// None: token keys are not configured, tokens are not read (v1).
    pub verifier: Option<Verifier>,
    /// Refuse requests (broadcaster: upgrades) that carry no token; needs
    /// token keys.
    pub require_token: bool,
}

/// `--jwt-leeway`'s default: the clock skew allowed on `exp` and `nbf`,
/// generous for servers kept in sync by NTP, short beside a token's life.
pub const DEFAULT_JWT_LEEWAY: Duration = Duration::from_secs(30);

impl TokenConfig {
    /// Cross-field rules; also run by the roles for configs built in code.
    pub fn check(&self) -> Result<()> {
        if self.require_token && self.verifier.is_none() {
            bail!("--require-token needs token keys: --jwt-hs256-secret or --jwt-public-key");
        }
        Ok(())
    }
}

/// Shards `migrate` stores on a new database unless told otherwise (the
/// contract's default).
pub const DEFAULT_SHARD_COUNT: u32 = 16;

/// The reference client, `marketcast subscribe` ([`crate::subscribe`]).
///
/// `Debug` is written by hand: `token` is a secret (docs/SECURITY.md).
#[derive(Clone)]
pub struct SubscribeConfig {
    pub url: String,
    /// The markets followed over one connection: at least one, each once.
    pub markets: Vec<String>,
    /// Where each market starts on the first connect; reconnects resume
    /// from the last seq seen.
    pub start: SubscribeStart,
    /// `Some(ms)`: ticker frames folding `ms` milliseconds of trades
    /// (contract 1.1 §2.6) instead of each trade.
    pub ticker_ms: Option<u32>,
    /// A secret: sent as `Authorization: Bearer`, never logged or printed.
    pub token: Option<String>,
    /// Stop after printing this many trades or ticker frames.
    pub count: Option<u64>,
    pub reconnect_max: Duration,
}

/// Where the reference client starts in each market's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscribeStart {
    /// Live from the head (no `from_seq`).
    Live,
    /// After this seq (`from_seq`).
    FromSeq(i64),
    /// The newest N trades, then live (`recent`, contract 1.1 §2.5).
    Recent(u32),
}

/// The contract's fixed upper bound of a ticker's `interval_ms` (1.1 §2.3);
/// the lower bound is the broadcaster's `--min-ticker-interval`.
pub const MAX_TICKER_INTERVAL_MS: u32 = 60_000;

impl std::fmt::Debug for SubscribeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubscribeConfig")
            .field("url", &redact_url(&self.url))
            .field("markets", &self.markets)
            .field("start", &self.start)
            .field("ticker_ms", &self.ticker_ms)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("count", &self.count)
            .field("reconnect_max", &self.reconnect_max)
            .finish()
    }
}

impl Default for SubscribeConfig {
    fn default() -> Self {
        SubscribeConfig {
            url: "ws://127.0.0.1:9001/ws".into(),
            markets: Vec::new(),
            start: SubscribeStart::Live,
            ticker_ms: None,
            token: None,
            count: None,
            reconnect_max: Duration::from_secs(5),
        }
    }
}

/// `marketcast demo` ([`crate::demo`]).
#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// None: start a cluster with `bin/pg-dev` in `pg_dev_dir`.
    pub database_url: Option<String>,
    /// The page and the write API.
    pub listen: SocketAddr,
    /// The WebSocket broadcaster.
    pub ws_listen: SocketAddr,
    /// Synthetic trades per second; 0 turns the flow off.
    pub rate: f64,
    /// State dir of the throwaway cluster, so markets and trades survive
    /// between runs.
    pub pg_dev_dir: PathBuf,
}

/// Highest accepted demo `--rate`: more is a load test, not a demo.
pub const MAX_DEMO_RATE: f64 = 10_000.0;

impl Default for DemoConfig {
    fn default() -> Self {
        DemoConfig {
            database_url: None,
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            ws_listen: SocketAddr::from(([127, 0, 0, 1], 9001)),
            rate: 4.0,
            pg_dev_dir: PathBuf::from("/tmp/marketcast-demo-pg"),
        }
    }
}

/// Parse `https://a.example,https://b.example:8443` into normalised origins.
pub fn parse_origins(s: &str) -> Result<BTreeSet<String>> {
    let mut out = BTreeSet::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let o = normalize_origin(part).with_context(|| {
            format!("--allowed-origins: {part:?} is not an origin like https://app.example or https://app.example:8443")
        })?;
        out.insert(o);
    }
    if out.is_empty() {
        bail!("--allowed-origins: no origin given");
    }
    Ok(out)
}

/// The form browsers send in `Origin` (RFC 6454): `scheme://host[:port]`,
/// lowercase, the scheme's default port left out. None for anything else
/// (a path, credentials, an opaque origin such as `null`): such a value can
/// never equal an allowed origin.
pub fn normalize_origin(s: &str) -> Option<String> {
    let u = url::Url::parse(s.trim()).ok()?;
    let rest = u.path().trim_start_matches('/');
    if !rest.is_empty()
        || u.query().is_some()
        || u.fragment().is_some()
        || !u.username().is_empty()
        || u.password().is_some()
    {
        return None;
    }
    let o = u.origin();
    o.is_tuple().then(|| o.ascii_serialization())
}

/// `--advertise-url` as the contract allows it (section 5.1): an absolute
/// `ws://` or `wss://` URL whose path ends in `/ws`, without query, fragment
/// or credentials (clients are sent to it). Returned as given.
pub fn advertise_url(s: &str) -> Result<String> {
    let bad = || {
        anyhow::anyhow!(
            "--advertise-url: {s:?} is not an absolute ws:// or wss:// URL whose path ends in /ws"
        )
    };
    let u = url::Url::parse(s).map_err(|_| bad())?;
    if !matches!(u.scheme(), "ws" | "wss")
        || u.host_str().is_none_or(str::is_empty)
        || !u.path().ends_with("/ws")
        || u.query().is_some()
        || u.fragment().is_some()
        || !u.username().is_empty()
        || u.password().is_some()
        || s.chars().any(char::is_whitespace)
    {
        return Err(bad());
    }
    Ok(s.to_string())
}

/// Parse `0-3,7` into {0,1,2,3,7}.
pub fn parse_shards(s: &str) -> Result<BTreeSet<u32>> {
    let mut out = BTreeSet::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (part, part),
        };
        let lo: u32 = lo
            .parse()
            .with_context(|| format!("--shards: {part:?} is not a shard number or range"))?;
        let hi: u32 = hi
            .parse()
            .with_context(|| format!("--shards: {part:?} is not a shard number or range"))?;
        if lo > hi {
            bail!("--shards: range {part:?} runs backwards");
        }
        out.extend(lo..=hi);
    }
    if out.is_empty() {
        bail!("--shards: no shard given");
    }
    Ok(out)
}

/// A duration as the options write it: whole seconds as `5s`, anything else
/// (zero included) in milliseconds, `250ms`. What `--help` shows as each
/// default, and what [`duration`] reads back.
pub fn format_duration(d: Duration) -> String {
    if d.is_zero() || d.subsec_millis() != 0 {
        format!("{}ms", d.as_millis())
    } else {
        format!("{}s", d.as_secs())
    }
}

pub fn duration(name: &str, s: &str) -> Result<Duration> {
    humantime::parse_duration(s.trim())
        .with_context(|| format!("{name}: {s:?} is not a duration like 250ms, 5s or 30d"))
}

pub fn addr(name: &str, s: &str) -> Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    s.to_socket_addrs()
        .with_context(|| format!("{name}: {s:?} is not HOST:PORT"))?
        .next()
        .with_context(|| format!("{name}: {s:?} resolves to no address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_lists() {
        assert_eq!(
            parse_shards("0-3,7")
                .unwrap()
                .into_iter()
                .collect::<Vec<_>>(),
            vec![0, 1, 2, 3, 7]
        );
        assert_eq!(
            parse_shards(" 5 ").unwrap().into_iter().collect::<Vec<_>>(),
            vec![5]
        );
        assert!(parse_shards("3-1").is_err());
        assert!(parse_shards("x").is_err());
        assert!(parse_shards("").is_err());
    }

    #[test]
    fn origins() {
        assert_eq!(
            normalize_origin("HTTPS://App.Example:443").as_deref(),
            Some("https://app.example")
        );
        assert_eq!(
            normalize_origin("http://a.example:8080/").as_deref(),
            Some("http://a.example:8080")
        );
        for bad in [
            "null",
            "a.example",
            "https://a.example/x",
            "https://u:p@a.example",
            "",
        ] {
            assert_eq!(normalize_origin(bad), None, "{bad}");
        }
        let set = parse_origins(" https://a.example, http://b.example:81 ,").unwrap();
        assert_eq!(
            set.into_iter().collect::<Vec<_>>(),
            vec!["http://b.example:81", "https://a.example"]
        );
        assert!(parse_origins(",").is_err());
        assert!(parse_origins("https://a.example/path").is_err());
    }

    #[test]
    fn secrets_stay_out_of_debug() {
        let mut w = WriterConfig::new(DbConfig::new("postgres://me:hunter2-pw@127.0.0.1:5432/db"));
        w.write_token = Some("tok-abcdef".into());
        let jwt_secret = "jwt-secret-value-of-at-least-32-bytes";
        w.tokens.verifier = Verifier::new(Some(jwt_secret), None, DEFAULT_JWT_LEEWAY).unwrap();
        let s = format!("{w:?}");
        assert!(!s.contains(jwt_secret) && s.contains("hs256: true"), "{s}");
        assert!(
            !s.contains("hunter2-pw") && !s.contains("tok-abcdef"),
            "{s}"
        );
        assert!(s.contains("postgres://me:***@127.0.0.1:5432/db"), "{s}");
        assert_eq!(redact_url("not a url hunter2"), "<unparsable URL>");
        assert_eq!(
            redact_url("postgres://me@h/db"),
            "postgres://me@h/db",
            "nothing to hide"
        );
    }

    #[test]
    fn advertise_urls() {
        for ok in [
            "ws://h:9001/ws",
            "wss://feed.example/s/3/ws",
            "ws://[::1]:9/ws",
        ] {
            assert_eq!(advertise_url(ok).unwrap(), ok);
        }
        for bad in [
            "http://h/ws",
            "ws://h/",
            "ws://h/wsx",
            "wss://h/ws?x=1",
            "wss://u:p@h/ws",
            "/ws",
            "h:9001/ws",
            "",
        ] {
            let e = advertise_url(bad).unwrap_err().to_string();
            assert!(e.contains("--advertise-url"), "{bad}: {e}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(duration("x", "250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(
            duration("x", "30d").unwrap(),
            Duration::from_secs(30 * 86400)
        );
        assert!(duration("x", "soon").is_err());
        for d in ["0ms", "250ms", "1500ms", "5s", "60s"] {
            assert_eq!(format_duration(duration("x", d).unwrap()), d);
        }
    }
}
