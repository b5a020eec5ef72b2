//! The `marketcast` binary: parse, set up logging, run one role, map failure to
//! an exit code once.

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;
use marketcast::cli::{Cli, Command, LogFormat};
use marketcast::{broadcaster, db, demo, http, shutdown, subscribe, writer};

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(n) = cli.worker_threads {
        builder.worker_threads(n.into());
    }
    let rt = match builder.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("marketcast: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // What the runtime has, not what was asked: the one figure to check
    // when a role uses more or less CPU than expected.
    tracing::info!(
        worker_threads = rt.metrics().num_workers(),
        "runtime started"
    );
    match rt.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("marketcast: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Logs go to stderr: stdout carries the product's output (the
    // `listening on` line, subscribe's JSON lines). Colour only on a
    // terminal: escapes in a file or a log pipeline are noise to its parser.
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().init(),
    }
}

async fn run(cmd: Command) -> Result<()> {
    match cmd {
        Command::Migrate(a) => {
            let db = a.db.config()?;
            let n = db::migrate(&db.url, a.shard_count).await?;
            tracing::info!(shard_count = n, "schema is current");
            Ok(())
        }
        Command::Writer(a) => {
            let cfg = a.config()?;
            let listener = http::bind(cfg.listen).await?;
            writer::run(listener, cfg, shutdown::on_signals()).await
        }
        Command::Broadcaster(a) => {
            let cfg = a.config()?;
            let listener = http::bind(cfg.listen).await?;
            broadcaster::run(listener, cfg, shutdown::on_signals()).await
        }
        Command::Subscribe(a) => {
            let cfg = a.config()?;
            subscribe::run(cfg, shutdown::on_signals(), std::io::stdout().lock()).await
        }
        Command::Prune(a) => {
            let db = a.db.config()?;
            let older = marketcast::config::duration("--older-than", &a.older_than)?;
            let n = db::prune(&db.url, older).await?;
            tracing::info!(removed = n, "pruned");
            Ok(())
        }
        Command::Demo(a) => {
            let cfg = a.config()?;
            demo::run(cfg, shutdown::on_signals()).await
        }
    }
}
