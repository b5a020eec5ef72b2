//! The Node peer (issue 14): `bench/bridge/server.js`, a minimal `ws` 8 +
//! `pg` 8 LISTEN/NOTIFY bridge, run with `node` as a child process like the
//! other servers (its CPU and RSS are the node process's, from /proc).
//!
//! Its feed is marketcast's (SQL INSERTs into `trades`). For its rounds only,
//! the bench installs an `AFTER INSERT ... FOR EACH ROW` trigger on `trades`
//! whose `pg_notify` payload, on a channel of its own, is the exact `trade`
//! JSON marketcast sends (built in SQL, `bench/bridge/trigger.sql`, checked
//! against marketcast's own encoder by [`check_frame`]); the trigger is dropped when
//! the round ends, so marketcast's rounds do not pay for it. marketcast's own
//! doorbell trigger keeps firing in bridge rounds: one NOTIFY no one hears.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use tokio::process::Command;

use marketcast::protocol::trade::Trade;

/// The bridge's NOTIFY channel.
pub const CHANNEL: &str = "marketcast_bench_bridge";

/// The frame function and the trigger: marketcast's `trade` frame
/// (src/protocol/trade.rs) built in SQL, NOTIFYed on [`CHANNEL`] for every
/// row inserted into `trades`.
const TRIGGER_SQL: &str = include_str!("../bridge/trigger.sql");

const DROP_TRIGGER: &str = "DROP TRIGGER IF EXISTS marketcast_bench_bridge ON trades";

/// How to start the bridge.
#[derive(Debug, Clone)]
pub struct Bridge {
    pub node: PathBuf,
    pub script: PathBuf,
}

impl Bridge {
    /// `node` (`BENCH_NODE`, else from PATH) and `bench/bridge/server.js`
    /// with its `node_modules` (`npm ci --prefix bench/bridge`, which `make
    /// bench` runs).
    pub fn locate() -> Result<Bridge> {
        let dir = [
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("bridge"),
            PathBuf::from("bench/bridge"),
        ]
        .into_iter()
        .find(|d| d.join("server.js").exists())
        .context("bench/bridge/server.js not found (run from the repository root)")?;
        if !dir.join("node_modules/ws").exists() || !dir.join("node_modules/pg").exists() {
            bail!(
                "{}/node_modules is missing: run `npm ci --prefix bench/bridge` \
                 (make bench does), or pass --no-bridge",
                dir.display()
            );
        }
        let node = std::env::var_os("BENCH_NODE")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("node"));
        let v = std::process::Command::new(&node)
            .arg("--version")
            .output()
            .with_context(|| {
                format!(
                    "running {} --version (install nodejs, or pass --no-bridge)",
                    node.display()
                )
            })?;
        if !v.status.success() {
            bail!("{} --version failed", node.display());
        }
        Ok(Bridge {
            node,
            script: dir.join("server.js"),
        })
    }

    /// `node --version`, and the versions of ws and pg the lockfile installed.
    pub fn versions(&self) -> String {
        let node = std::process::Command::new(&self.node)
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_else(|_| "?".into());
        let dir = self.script.parent().unwrap_or(std::path::Path::new("."));
        let pkg = |name: &str| {
            std::fs::read_to_string(dir.join("node_modules").join(name).join("package.json"))
                .ok()
                .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
                .and_then(|v| v["version"].as_str().map(str::to_string))
                .unwrap_or_else(|| "?".into())
        };
        format!("Node {node}, ws {}, pg {}", pkg("ws"), pkg("pg"))
    }

    pub fn command(&self, url: &str) -> Command {
        let mut cmd = Command::new(&self.node);
        cmd.arg(&self.script)
            .args(["--port", "0", "--channel", CHANNEL])
            .env("DATABASE_URL", url);
        cmd
    }
}

/// Install the frame function and check it against marketcast's encoder
/// (once per invocation): the bridge must send byte for byte what
/// marketcast sends.
pub async fn check_frame(admin: &tokio_postgres::Client) -> Result<()> {
    install(admin).await?;
    uninstall(admin).await;
    let samples = [
        Trade {
            trade_id: 88123,
            market: "ELECTION-2028".into(),
            seq: 1042,
            side: "yes".into(),
            price: "0.6300".into(),
            qty: 25,
            ts_micros: 1_795_757_462_123_456,
        },
        Trade {
            trade_id: 1,
            market: "a.b:c_d-e".into(),
            seq: 1,
            side: "no".into(),
            price: "0.0001".into(),
            qty: 1_000_000_000,
            ts_micros: 1_795_757_462_000_000,
        },
    ];
    for t in samples {
        let row = admin
            .query_one(
                "SELECT marketcast_bench_bridge_frame($1, $2, $3, $4, $5::text::numeric(5,4), $6, \
                 to_timestamp(0) + $7::int8 * interval '1 microsecond')",
                &[
                    &t.market,
                    &t.seq,
                    &t.trade_id,
                    &t.side,
                    &t.price,
                    &t.qty,
                    &t.ts_micros,
                ],
            )
            .await
            .context("checking the bridge's frame function")?;
        let sql: String = row.try_get(0)?;
        let ours = String::from_utf8(t.to_json())?;
        if sql != ours {
            bail!("the bridge's trigger would send\n  {sql}\nwhere marketcast sends\n  {ours}");
        }
    }
    Ok(())
}

/// The trigger of a bridge round, and its frame function.
pub async fn install(admin: &tokio_postgres::Client) -> Result<()> {
    admin
        .batch_execute(TRIGGER_SQL)
        .await
        .context("installing the bridge's trigger")
}

/// Drop it (the end of a bridge round).
pub async fn uninstall(admin: &tokio_postgres::Client) {
    if let Err(e) = admin.batch_execute(DROP_TRIGGER).await {
        eprintln!("  dropping the bridge's trigger failed: {e}");
    }
}
