//! The one wrapper around `bin/pg-dev`, the throwaway PostgreSQL cluster
//! (its state in a directory of its own) that the demo, the integration
//! tests and the benchmark start. pg-dev prints `DATABASE_URL=...` as the
//! last stdout line of `start` and `restart`; its chatter goes to stderr,
//! which is kept and shown if a command fails.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{bail, Context, Result};

/// A cluster started by [`PgDev::start`]. Nothing stops it implicitly:
/// callers decide (the demo keeps its state between runs, tests and the
/// benchmark wipe theirs).
#[derive(Debug)]
pub struct PgDev {
    script: PathBuf,
    dir: PathBuf,
    pub url: String,
}

impl PgDev {
    /// `bin/pg-dev start` with its state in `dir`.
    pub async fn start(dir: &Path) -> Result<PgDev> {
        let mut pg = PgDev {
            script: script()?,
            dir: dir.to_path_buf(),
            url: String::new(),
        };
        pg.url = pg
            .run(&["start"])
            .await?
            .context("pg-dev start printed no DATABASE_URL")?;
        Ok(pg)
    }

    /// [`PgDev::start`] for callers outside a runtime (the benchmark).
    pub fn start_blocking(dir: &Path) -> Result<PgDev> {
        let mut pg = PgDev {
            script: script()?,
            dir: dir.to_path_buf(),
            url: String::new(),
        };
        let out = pg.command(&["start"]).output();
        pg.url = pg
            .checked("start", out)?
            .context("pg-dev start printed no DATABASE_URL")?;
        Ok(pg)
    }

    /// `bin/pg-dev <args>` on this cluster (`stop`, `restart`, `stop --wipe`,
    /// ...); the `DATABASE_URL` it printed, if any.
    pub async fn run(&self, args: &[&str]) -> Result<Option<String>> {
        let out = tokio::process::Command::from(self.command(args))
            .output()
            .await;
        self.checked(&args.join(" "), out)
    }

    /// [`PgDev::run`] for `Drop` impls and callers outside a runtime.
    pub fn run_blocking(&self, args: &[&str]) -> Result<Option<String>> {
        let out = self.command(args).output();
        self.checked(&args.join(" "), out)
    }

    /// The postmaster's pid, from its pid file.
    pub fn postmaster_pid(&self) -> Option<u32> {
        postmaster_pid(&self.dir)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.script);
        c.args(args)
            .env("PGDEV_DIR", &self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    fn checked(&self, what: &str, out: std::io::Result<Output>) -> Result<Option<String>> {
        let out = out.with_context(|| format!("running {} {what}", self.script.display()))?;
        if !out.status.success() {
            bail!(
                "{} {what} failed ({}):\n{}",
                self.script.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim_end()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .rev()
            .find_map(|l| l.trim().strip_prefix("DATABASE_URL="))
            .map(str::to_string))
    }
}

/// The postmaster's pid of the cluster whose state is in `dir`, from its pid
/// file; None while it is not running.
pub fn postmaster_pid(dir: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(dir.join("data/postmaster.pid")).ok()?;
    text.lines().next()?.trim().parse().ok()
}

/// `bin/pg-dev` under the current directory, beside the checkout the binary
/// was built in (`target/<profile>/marketcast` -> `../../bin`), or in the
/// checkout this crate was compiled from.
fn script() -> Result<PathBuf> {
    let mut tried = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        tried.push(cwd.join("bin/pg-dev"));
    }
    if let Ok(exe) = std::env::current_exe() {
        if let Some(root) = exe.parent().and_then(Path::parent).and_then(Path::parent) {
            tried.push(root.join("bin/pg-dev"));
        }
    }
    tried.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("bin/pg-dev"));
    match tried.iter().find(|p| p.is_file()) {
        Some(p) => Ok(p.clone()),
        None => bail!("bin/pg-dev not found (looked at {tried:?})"),
    }
}
