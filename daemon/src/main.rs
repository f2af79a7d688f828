//! The `sparkd` binary: parse flags, resolve the configuration, set up logging and signals, then
//! hand over to [`sparkd::Daemon`]. All behaviour lives in the library.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use sparkd::{Config, Daemon, Flags, InstanceError, RunError};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::prelude::*;

/// spark's per-user daemon. Normally started on demand by `sparkctl`; run it by hand to watch
/// its log in the foreground.
#[derive(Debug, Parser)]
#[command(name = "sparkd", version, about, long_about = None)]
struct Args {
    /// Exit after this many seconds with no client connected (0 = never).
    #[arg(long, value_name = "SECS")]
    idle_timeout: Option<u64>,
    /// Responses API endpoint (ws://, wss://, http:// or https://).
    #[arg(long, value_name = "URL")]
    provider_url: Option<String>,
    /// Model name sent to the provider.
    #[arg(long)]
    model: Option<String>,
    /// Log filter, e.g. `info` or `sparkd=debug`.
    #[arg(long, value_name = "FILTER")]
    log: Option<String>,
    /// Socket path (overrides SPARK_SOCKET).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Started by sparkctl: log only to the log file, and print `ready <pid>` on stdout once the
    /// socket accepts connections.
    #[arg(long, hide = true)]
    detached: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let flags = Flags {
        provider_url: args.provider_url.clone(),
        model: args.model.clone(),
        idle_timeout_secs: args.idle_timeout,
        log: args.log.clone(),
        socket: args.socket.clone(),
    };
    let config = match Config::resolve(
        |k| std::env::var_os(k),
        rustix::process::geteuid().as_raw(),
        &flags,
    ) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sparkd: error: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = init_logging(&config, args.detached) {
        eprintln!(
            "sparkd: error: cannot open log file {}: {e}",
            config.layout.log_file.display()
        );
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sparkd: error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    runtime.block_on(async_main(config, args.detached))
}

async fn async_main(config: Config, detached: bool) -> ExitCode {
    let log_file = config.layout.log_file.clone();
    let daemon = match Daemon::bind(config) {
        Ok(d) => d,
        // Printed, not logged: detached, stderr is the log file already.
        Err(RunError::Instance(e @ InstanceError::AlreadyRunning { .. })) => {
            eprintln!("sparkd: {e}");
            return ExitCode::from(1);
        }
        Err(e) => {
            eprintln!("sparkd: error: {e}");
            if !detached {
                eprintln!("hint: the log is {}", log_file.display());
            }
            return ExitCode::from(2);
        }
    };
    if detached {
        // The spawning client waits for exactly this line; nothing else is ever written to stdout.
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "ready {}", std::process::id());
        let _ = out.flush();
    }
    let shutdown = CancellationToken::new();
    tokio::spawn(watch_signals(shutdown.clone()));
    match daemon.serve(shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("sparkd: error: {e}");
            ExitCode::from(2)
        }
    }
}

/// SIGTERM and SIGINT start the same graceful shutdown as the `shutdown` request.
async fn watch_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; use `sparkctl stop` to stop the daemon");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    shutdown.cancel();
}

fn init_logging(config: &Config, detached: bool) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    // The log names repositories and prompts: keep it private like the rest of the state.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&config.layout.state_dir)?;
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&config.layout.log_file)?;
    let filter = || {
        tracing_subscriber::EnvFilter::try_new(&config.log)
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
    };
    let file_layer = tracing_subscriber::fmt::layer()
        .with_ansi(false)
        .with_writer(std::sync::Mutex::new(file))
        .with_filter(filter());
    // Started by hand: also log to the terminal. Detached, stderr already goes to the log file.
    let stderr_layer = (!detached).then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(filter())
    });
    tracing_subscriber::registry()
        .with(file_layer)
        .with(stderr_layer)
        .init();
    Ok(())
}
