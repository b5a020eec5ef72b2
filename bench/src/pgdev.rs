//! The benchmark's throwaway Postgres cluster: marketcast's one `bin/pg-dev`
//! wrapper ([`marketcast::pgdev`]) in a state dir of its own, stopped and
//! wiped on drop, whatever happened.

use std::path::Path;

use anyhow::Result;

/// The throwaway cluster's state dir (wiped at the end).
pub const PGDEV_DIR: &str = "/tmp/marketcast-bench-pg";

/// The throwaway cluster; stopped and wiped on drop.
pub struct PgDev {
    cluster: marketcast::pgdev::PgDev,
    pub url: String,
}

impl PgDev {
    pub fn start() -> Result<PgDev> {
        eprintln!("starting a throwaway Postgres in {PGDEV_DIR}");
        let cluster = marketcast::pgdev::PgDev::start_blocking(Path::new(PGDEV_DIR))?;
        Ok(PgDev {
            url: cluster.url.clone(),
            cluster,
        })
    }

    /// The postmaster's pid (for its CPU), while the cluster runs.
    pub fn postmaster_pid() -> Option<u32> {
        marketcast::pgdev::postmaster_pid(Path::new(PGDEV_DIR))
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
