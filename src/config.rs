//! Validated configuration. [`crate::cli`] holds raw strings; the `from_cli`
//! constructors here parse them into addresses, durations and shard sets and
//! check cross-field rules, so the rest of the crate never sees clap and tests
//! build configs directly with `..Default::default()`.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::cli;

/// Database access shared by every role.
#[derive(Debug, Clone)]
pub struct DbConfig {
    pub url: String,
    pub pool_size: usize,
    /// Bound on any single database step; see `--db-timeout`.
    pub timeout: Duration,
}

impl DbConfig {
    pub fn new(url: impl Into<String>) -> Self {
        DbConfig {
            url: url.into(),
            pool_size: 16,
            timeout: Duration::from_secs(5),
        }
    }

    pub fn from_cli(a: &cli::DbArgs) -> Result<Self> {
        if a.pool_size == 0 {
            bail!("--pool-size must be at least 1");
        }
        Ok(DbConfig {
            url: a.database_url.clone(),
            pool_size: a.pool_size,
            timeout: duration("--db-timeout", &a.db_timeout)?,
        })
    }
}

#[derive(Debug, Clone)]
pub struct WriterConfig {
    pub db: DbConfig,
    pub listen: SocketAddr,
    pub write_token: Option<String>,
    pub batch_max: usize,
    pub batch_linger: Duration,
    pub batch_workers: usize,
}

impl WriterConfig {
    pub fn new(db: DbConfig) -> Self {
        WriterConfig {
            db,
            listen: "127.0.0.1:0".parse().expect("literal address"),
            write_token: None,
            batch_max: 64,
            batch_linger: Duration::ZERO,
            batch_workers: 1,
        }
    }

    pub fn from_cli(a: &cli::WriterArgs) -> Result<Self> {
        if a.batch_max == 0 || a.batch_workers == 0 {
            bail!("--batch-max and --batch-workers must be at least 1");
        }
        Ok(WriterConfig {
            db: DbConfig::from_cli(&a.db)?,
            listen: addr("--listen", &a.listen)?,
            write_token: a.write_token.clone().filter(|t| !t.is_empty()),
            batch_max: a.batch_max,
            batch_linger: duration("--batch-linger", &a.batch_linger)?,
            batch_workers: a.batch_workers,
        })
    }
}

#[derive(Debug, Clone)]
pub struct BroadcasterConfig {
    pub db: DbConfig,
    pub listen: SocketAddr,
    /// None: every shard of the stored shard count.
    pub shards: Option<BTreeSet<u32>>,
    pub shard_url_template: Option<String>,
    pub max_connections: usize,
    pub max_subscriptions: usize,
    pub max_message_bytes: usize,
    pub rate_per_sec: u32,
    pub rate_burst: u32,
    pub ring_size: usize,
    pub replay_page: usize,
    pub live_queue: usize,
    pub write_timeout: Duration,
    pub ping_interval: Duration,
    pub idle_timeout: Duration,
    pub listen_heartbeat: Duration,
    pub reconcile_interval: Duration,
    pub reconnect_max: Duration,
    pub hub_pool_size: usize,
    /// `pg_notification_queue_usage()` (0..1) at or above which a warning is logged.
    pub notify_queue_warn: f64,
}

impl BroadcasterConfig {
    pub fn new(db: DbConfig) -> Self {
        BroadcasterConfig {
            db,
            listen: "127.0.0.1:0".parse().expect("literal address"),
            shards: None,
            shard_url_template: None,
            max_connections: 18_000,
            max_subscriptions: 100,
            max_message_bytes: 4096,
            rate_per_sec: 50,
            rate_burst: 100,
            ring_size: 4096,
            replay_page: 1000,
            live_queue: 1024,
            write_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(60),
            listen_heartbeat: Duration::from_secs(5),
            reconcile_interval: Duration::from_secs(2),
            reconnect_max: Duration::from_secs(5),
            hub_pool_size: 4,
            notify_queue_warn: 0.01,
        }
    }

    pub fn from_cli(a: &cli::BroadcasterArgs) -> Result<Self> {
        let c = BroadcasterConfig {
            db: DbConfig::from_cli(&a.db)?,
            listen: addr("--listen", &a.listen)?,
            shards: a.shards.as_deref().map(parse_shards).transpose()?,
            shard_url_template: a.shard_url_template.clone(),
            max_connections: a.max_connections,
            max_subscriptions: a.max_subscriptions,
            max_message_bytes: a.max_message_bytes,
            rate_per_sec: a.rate_per_sec,
            rate_burst: a.rate_burst,
            ring_size: a.ring_size,
            replay_page: a.replay_page,
            live_queue: a.live_queue,
            write_timeout: duration("--write-timeout", &a.write_timeout)?,
            ping_interval: duration("--ping-interval", &a.ping_interval)?,
            idle_timeout: duration("--idle-timeout", &a.idle_timeout)?,
            listen_heartbeat: duration("--listen-heartbeat", &a.listen_heartbeat)?,
            reconcile_interval: duration("--reconcile-interval", &a.reconcile_interval)?,
            reconnect_max: duration("--reconnect-max", &a.reconnect_max)?,
            hub_pool_size: a.hub_pool_size,
            notify_queue_warn: a.notify_queue_warn,
        };
        c.check()?;
        Ok(c)
    }

    /// Cross-field rules; also run by `broadcaster::run` for configs built in code.
    pub fn check(&self) -> Result<()> {
        for (name, v) in [
            ("--max-connections", self.max_connections),
            ("--max-subscriptions", self.max_subscriptions),
            ("--rate-burst", self.rate_burst as usize),
            ("--rate-per-sec", self.rate_per_sec as usize),
            ("--ring-size", self.ring_size),
            ("--replay-page", self.replay_page),
            ("--live-queue", self.live_queue),
            ("--hub-pool-size", self.hub_pool_size),
        ] {
            if v == 0 {
                bail!("{name} must be at least 1");
            }
        }
        // NaN fails this too.
        if !(self.notify_queue_warn > 0.0 && self.notify_queue_warn <= 1.0) {
            bail!("--notify-queue-warn must be a fraction in (0, 1]");
        }
        if self.max_message_bytes < 64 {
            bail!("--max-message-bytes must be at least 64");
        }
        if self.idle_timeout <= self.ping_interval {
            bail!("--idle-timeout must be longer than --ping-interval, or idle clients that answer pings are closed");
        }
        if self.listen_heartbeat.is_zero()
            || self.reconcile_interval.is_zero()
            || self.ping_interval.is_zero()
            || self.write_timeout.is_zero()
        {
            bail!("--listen-heartbeat, --reconcile-interval, --ping-interval and --write-timeout must be positive");
        }
        Ok(())
    }
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
    fn durations() {
        assert_eq!(duration("x", "250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(
            duration("x", "30d").unwrap(),
            Duration::from_secs(30 * 86400)
        );
        assert!(duration("x", "soon").is_err());
    }
}
