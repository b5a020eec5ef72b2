//! The benchmark's throwaway Postgres cluster: marketcast's one `bin/pg-dev`
//! wrapper ([`marketcast::pgdev`]) in a state dir of its own, stopped and
//! wiped on drop, whatever happened.

use std::path::PathBuf;

use anyhow::Result;

/// The throwaway cluster's state dir (wiped at the end), unless
/// `BENCH_PGDEV_DIR` names another (two benches at once need two).
const PGDEV_DIR: &str = "/tmp/marketcast-bench-pg";

fn state_dir() -> PathBuf {
    std::env::var_os("BENCH_PGDEV_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(PGDEV_DIR))
}

/// The throwaway cluster; stopped and wiped on drop.
pub struct PgDev {
    cluster: marketcast::pgdev::PgDev,
    pub url: String,
}

impl PgDev {
    pub fn start() -> Result<PgDev> {
        let dir = state_dir();
        eprintln!("starting a throwaway Postgres in {}", dir.display());
        let cluster = marketcast::pgdev::PgDev::start_blocking(&dir)?;
        Ok(PgDev {
            url: cluster.url.clone(),
            cluster,
        })
    }

    /// The postmaster's pid (for its CPU), while the cluster runs.
    pub fn postmaster_pid() -> Option<u32> {
        marketcast::pgdev::postmaster_pid(&state_dir())
    }
}

impl Drop for PgDev {
    fn drop(&mut self) {
        match self.cluster.run_blocking(&["stop", "--wipe"]) {
            Ok(_) => eprintln!("stopped the throwaway Postgres"),
            Err(e) => eprintln!("marketcast-bench: pg-dev stop failed: {e:#}"),
        }
    }
}
