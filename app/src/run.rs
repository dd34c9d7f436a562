//! Running a balancer from a configuration until a signal stops it: the
//! runtime, logging and signal handling both `mqlb balance` (in `cli`) and
//! `mqlb demo` (in `demo`) use, in a module of its own so that those two
//! do not import each other.

use std::path::PathBuf;
use std::process::ExitCode;

use mqlb_config::Config;
use tokio_util::sync::CancellationToken;

/// Exit code for a bad configuration or usage (sysexits EX_USAGE).
pub const EXIT_USAGE: u8 = 64;

/// A multi-threaded runtime, or `None` (said on standard error).
pub(crate) fn runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => Some(rt),
        Err(e) => {
            eprintln!("cannot start runtime: {e}");
            None
        }
    }
}

/// Logs to standard error: `RUST_LOG` filters (default `info`); text
/// lines carry colour only when standard error is a terminal (not in
/// files or journald); JSON lines carry the connection span's fields
/// (peer, client ID, backend) with every event.
pub(crate) fn init_tracing(format: mqlb_config::LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Writing a log line that cannot be written (standard error closed: a
    // log pipe whose reader died) must not be reported with eprintln!,
    // which panics there: every task that logged would die with it.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .log_internal_errors(false);
    let _ = match format {
        mqlb_config::LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        mqlb_config::LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
}

pub(crate) fn run(config: Config, path: Option<PathBuf>) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut config = config;
    match mqlb_balancer::fdlimit::raise() {
        Ok(limit) => match mqlb_balancer::fdlimit::apply(&mut config, limit) {
            mqlb_balancer::fdlimit::Sized::Lowered(fits) => tracing::info!(
                limit,
                max_connections = fits,
                "open-file limit (max_connections sized to it)"
            ),
            mqlb_balancer::fdlimit::Sized::Short(warning) => tracing::warn!("{warning}"),
            mqlb_balancer::fdlimit::Sized::Fits => tracing::debug!(limit, "open-file limit"),
        },
        Err(e) => tracing::warn!(error = %e, "cannot read or raise the open-file limit"),
    }
    rt.block_on(async {
        let balancer = match mqlb_balancer::Balancer::bind(config).await {
            Ok(b) => b,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::FAILURE;
            }
        };
        let shutdown = shutdown_on_signals();
        let grace = balancer.shared().config().eviction.shutdown_grace;
        if let Some(path) = path {
            let shared = balancer.shared();
            shared.set_config_path(path);
            #[cfg(unix)]
            tokio::spawn(async move {
                use tokio::signal::unix::{signal, SignalKind};
                let Ok(mut hup) = signal(SignalKind::hangup()) else {
                    return;
                };
                while hup.recv().await.is_some() {
                    match shared.reload_from_file() {
                        Ok(_) => {}
                        Err(e) => tracing::error!("reload refused, configuration unchanged:\n{e}"),
                    }
                }
            });
        }
        balancer.serve(shutdown, grace).await;
        ExitCode::SUCCESS
    })
}

/// A token cancelled at the first SIGINT or SIGTERM (a graceful stop); the
/// second signal exits at once. Call inside the runtime.
pub(crate) fn shutdown_on_signals() -> CancellationToken {
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down gracefully; signal again to stop at once");
        signal.cancel();
        wait_for_signal().await;
        tracing::warn!("second signal: stopping at once");
        std::process::exit(130);
    });
    shutdown
}

/// Resolves at SIGINT (Ctrl-C) or SIGTERM.
async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
