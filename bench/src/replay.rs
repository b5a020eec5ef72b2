//! S4 replay: one market with N trades in the log (loaded once per
//! invocation, see `prepare`). One client subscribing with `from_seq=0`: trades/s until it
//! has seq N, every seq checked; then C clients at once, each with
//! `from_seq = N - tail`: their total trades/s until the last one has seq N.
//!
//! Baseline: the same rows read by one plain streaming `SELECT ... ORDER BY
//! seq` from this process (tokio-postgres, text decoding of each row): the
//! speed of getting the log out of Postgres at all, without WebSockets.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use futures_util::{pin_mut, TryStreamExt};

use crate::fleet::{Fleet, Probe};
use crate::hist::{unix_us, Meter};
use crate::procs::{PgCpu, ProcStats};
use crate::report::{figures, Delivery};
use crate::{Env, Target, Up};

/// The market whose log S4 replays.
pub struct Loaded {
    pub market: String,
    pub trades: i64,
    pub load_s: f64,
}

/// Load the market's log once, fast: in one transaction with the triggers
/// off (`session_replication_role = replica`, superuser only, as pg_restore
/// does), rows numbered 1..N by generate_series, then the market row set to
/// what the trigger would have left (last_seq, last_price, volume). The
/// trigger's own cost is S5's subject; through it, this load is linear but
/// takes about 90 us per row here (90 s for 1M), too long for the budget.
pub async fn prepare(env: &Env) -> Result<Loaded> {
    let n = env.set.s4_trades as i64;
    let market = "s4-replay".to_string();
    let t = Instant::now();
    env.admin
        .execute(
            "INSERT INTO markets (id, title) VALUES ($1, 'bench replay')",
            &[&market],
        )
        .await
        .context("creating the S4 market")?;
    env.admin
        .batch_execute("BEGIN; SET LOCAL session_replication_role = replica")
        .await?;
    let load = async {
        env.admin
            .execute(
                "INSERT INTO trades (market_id, seq, side, price, qty, created_at) \
                 SELECT $1, g, CASE WHEN g % 2 = 0 THEN 'yes' ELSE 'no' END, \
                        ((100 + g % 9800) / 10000.0)::numeric(5,4), 1 + g % 100, \
                        now() - interval '1 day' + g * interval '1 microsecond' \
                 FROM generate_series(1, $2::int8) AS g",
                &[&market, &n],
            )
            .await?;
        env.admin
            .execute(
                "UPDATE markets m SET last_seq = t.seq, \
                        last_price = CASE WHEN t.side = 'no' THEN 1 - t.price ELSE t.price END, \
                        volume = (SELECT sum(qty) FROM trades WHERE market_id = $1) \
                 FROM (SELECT seq, side, price FROM trades WHERE market_id = $1 \
                       ORDER BY seq DESC LIMIT 1) t \
                 WHERE m.id = $1",
                &[&market],
            )
            .await
    };
    match load.await {
        Ok(_) => env.admin.batch_execute("COMMIT").await?,
        Err(e) => {
            // Err: the connection is broken anyway; report the load's error.
            let _ = env.admin.batch_execute("ROLLBACK").await;
            return Err(anyhow::Error::from(e).context("loading the S4 log"));
        }
    }
    let last: i64 = env
        .admin
        .query_one("SELECT last_seq FROM markets WHERE id = $1", &[&market])
        .await?
        .try_get(0)?;
    if last != n {
        bail!("the S4 market has last_seq {last} after loading {n} trades");
    }
    // Fresh statistics for the planner (autovacuum may not have run yet).
    env.admin.batch_execute("VACUUM ANALYZE trades").await?;
    Ok(Loaded {
        market,
        trades: n,
        load_s: t.elapsed().as_secs_f64(),
    })
}

figures! {
    /// S4, one run.
    pub struct S4Figures {
        trades: median,
        one_s: median,
        one_trades_per_s: median,
        one_server_cpu_pct: median,
        one_bench_cpu_pct: median,
        one_postgres_cpu_pct: median,
        clients: median,
        tail: median,
        many_s: median,
        many_trades_per_s: median,
        many_server_cpu_pct: median,
        many_bench_cpu_pct: median,
        many_postgres_cpu_pct: median,
        server_rss_mib: median,
        ..delivery: Delivery,
    }
}

figures! {
    /// S4's baseline, one run: `lost` counts seq gaps in the rows read.
    pub struct SqlReadFigures {
        trades: median,
        one_s: median,
        one_trades_per_s: median,
        lost: worst,
    }
}

pub async fn run(env: &Env, log: &Loaded, target: Target) -> Result<S4Figures> {
    let up = env.start(target).await?;
    let r = measure(env, &up, log).await;
    up.stop().await;
    r
}

/// Connect `clients` replaying from `from_seq` and wait until all have the
/// last seq; returns (seconds, checks).
async fn replay(
    env: &Env,
    up: &Up,
    log: &Loaded,
    from_seq: i64,
    clients: usize,
) -> Result<(f64, crate::fleet::Checks)> {
    // Never timed: replayed trades carry their old `ts`.
    let meter = Arc::new(Meter::new(1, Duration::from_secs(1)));
    let t0 = unix_us(SystemTime::now());
    let fleet = Fleet::connect(
        &env.client_rt,
        env.fleet_cfg(up, meter, Some(from_seq), Some(log.trades)),
        std::slice::from_ref(&log.market),
        clients,
        "replay",
    )
    .await?;
    let deadline = Instant::now() + Duration::from_secs(300);
    let reached = |p: &Arc<Probe>| p.reached_us.load(Ordering::Relaxed);
    while fleet.probes.iter().any(|(_, p)| reached(p) == 0) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let last = fleet.probes.iter().map(|(_, p)| reached(p)).max();
    let all = fleet.probes.iter().all(|(_, p)| reached(p) != 0);
    let checks = fleet.finish(&[log.trades]).await;
    if !all {
        bail!(
            "not every replaying client reached seq {} within 300 s",
            log.trades
        );
    }
    let secs = (last.unwrap_or(t0) - t0) as f64 / 1e6;
    Ok((secs, checks))
}

async fn measure(env: &Env, up: &Up, log: &Loaded) -> Result<S4Figures> {
    let set = &env.set;
    let me = || ProcStats::of(std::process::id());
    let (before, me0, pg0) = (up.server.stats(), me(), PgCpu::sample());
    let (one_s, c1) = replay(env, up, log, 0, 1).await?;
    let (mid, me1, pg1) = (up.server.stats(), me(), PgCpu::sample());
    let from = (log.trades - set.s4_tail as i64).max(0);
    let (many_s, c2) = replay(env, up, log, from, set.s4_clients).await?;
    let (after, me2, pg2) = (up.server.stats(), me(), PgCpu::sample());
    let many_trades = (log.trades - from) as f64 * set.s4_clients as f64;
    Ok(S4Figures {
        trades: log.trades as f64,
        one_s,
        one_trades_per_s: log.trades as f64 / one_s,
        one_server_cpu_pct: mid.cpu_pct_since(&before),
        one_bench_cpu_pct: me1.cpu_pct_since(&me0),
        one_postgres_cpu_pct: pg1.pct_since(&pg0),
        clients: set.s4_clients as f64,
        tail: (log.trades - from) as f64,
        many_s,
        many_trades_per_s: many_trades / many_s,
        many_server_cpu_pct: after.cpu_pct_since(&mid),
        many_bench_cpu_pct: me2.cpu_pct_since(&me1),
        many_postgres_cpu_pct: pg2.pct_since(&pg1),
        server_rss_mib: after.rss_mib(),
        delivery: Delivery::of(&[&c1, &c2], 0),
    })
}

/// The baseline: one streaming SELECT of the whole log, each row decoded
/// (text columns), seq checked gapless.
pub async fn sql_read(env: &Env, log: &Loaded) -> Result<SqlReadFigures> {
    let t = Instant::now();
    let stream = env
        .admin
        .query_raw(
            "SELECT seq, trade_id, side, price::text, qty, created_at::text FROM trades \
             WHERE market_id = $1 ORDER BY seq",
            [&log.market],
        )
        .await?;
    pin_mut!(stream);
    let (mut n, mut expect, mut bad) = (0i64, 1i64, 0u64);
    while let Some(row) = stream.try_next().await? {
        let seq: i64 = row.try_get(0)?;
        let _: (i64, &str, &str, i64, &str) = (
            row.try_get(1)?,
            row.try_get(2)?,
            row.try_get(3)?,
            row.try_get(4)?,
            row.try_get(5)?,
        );
        if seq != expect {
            bad += 1;
        }
        expect = seq + 1;
        n += 1;
    }
    let secs = t.elapsed().as_secs_f64();
    Ok(SqlReadFigures {
        trades: n as f64,
        one_s: secs,
        one_trades_per_s: n as f64 / secs,
        lost: bad as f64,
    })
}
