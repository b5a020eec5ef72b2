//! The throwaway Postgres cluster (`bin/pg-dev` in its own state dir) and the
//! CPU its processes use.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// The throwaway cluster's state dir (wiped at the end).
pub const PGDEV_DIR: &str = "/tmp/marketcast-bench-pg";

/// The throwaway cluster; stopped and wiped on drop.
pub struct PgDev {
    script: PathBuf,
    pub url: String,
}

impl PgDev {
    pub fn start() -> Result<PgDev> {
        // From the checkout's root (`make bench`), or else the checkout this
        // binary was built from: the bench package is its `bench/`.
        let local = PathBuf::from("bin/pg-dev");
        let script = if local.exists() {
            local
        } else {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../bin/pg-dev")
        };
        eprintln!("starting a throwaway Postgres in {PGDEV_DIR}");
        let out = Command::new(&script)
            .arg("start")
            .env("PGDEV_DIR", PGDEV_DIR)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {}", script.display()))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let url = stdout
            .lines()
            .last()
            .and_then(|l| l.strip_prefix("DATABASE_URL="))
            .map(str::to_string);
        match (out.status.success(), url) {
            (true, Some(url)) => Ok(PgDev { script, url }),
            _ => bail!(
                "{} start failed ({}):\n{}",
                script.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    }
}

impl Drop for PgDev {
    fn drop(&mut self) {
        let r = Command::new(&self.script)
            .args(["stop", "--wipe"])
            .env("PGDEV_DIR", PGDEV_DIR)
            .stdin(Stdio::null())
            .output();
        match r {
            Ok(o) if o.status.success() => eprintln!("stopped the throwaway Postgres"),
            Ok(o) => eprintln!(
                "marketcast-bench: pg-dev stop failed: {}",
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => eprintln!("marketcast-bench: pg-dev stop failed: {e}"),
        }
    }
}

impl PgDev {
    /// The postmaster's pid, from its pid file.
    pub fn postmaster_pid() -> Option<u32> {
        let text = std::fs::read_to_string(format!("{PGDEV_DIR}/data/postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }
}
