//! Command line: `mqlb balance` and `mqlb config check`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use mqlb_config::Config;
use tokio_util::sync::CancellationToken;

/// Exit code for a bad configuration or usage (sysexits EX_USAGE).
pub const EXIT_USAGE: u8 = 64;

/// mqlb: an MQTT-aware load balancer.
#[derive(Debug, Parser)]
#[command(name = "mqlb", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the balancer, from flags or from a config file.
    Balance(BalanceArgs),
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Debug, clap::Args)]
struct BalanceArgs {
    /// TOML configuration file. Cannot be combined with --listen/--backend.
    #[arg(long, conflicts_with_all = ["listen", "backend"])]
    config: Option<PathBuf>,
    /// Address to listen on (repeatable).
    #[arg(long)]
    listen: Vec<String>,
    /// Backend broker as ADDR or NAME=ADDR (repeatable). Without a name the
    /// address is the placement identity.
    #[arg(long)]
    backend: Vec<String>,
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate a configuration file; exits 0 if valid, 64 if not.
    Check {
        /// The file to check.
        file: PathBuf,
    },
}

/// Process entry point.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    match cli.command {
        Command::Config {
            command: ConfigCommand::Check { file },
        } => match Config::load(&file) {
            Ok(c) => {
                println!(
                    "{}: ok ({} listener(s), {} backend(s))",
                    file.display(),
                    c.listeners.len(),
                    c.backends.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(EXIT_USAGE)
            }
        },
        Command::Balance(args) => {
            let config = match &args.config {
                Some(path) => Config::load(path),
                None => Config::from_flags(&args.listen, &args.backend),
            };
            let config = match config {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(EXIT_USAGE);
                }
            };
            run(config)
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn run(config: Config) -> ExitCode {
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
    rt.block_on(async {
        let balancer = match crate::Balancer::bind(config).await {
            Ok(b) => b,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::FAILURE;
            }
        };
        let shutdown = CancellationToken::new();
        let signal = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutting down");
            signal.cancel();
        });
        balancer.serve(shutdown, Duration::from_secs(5)).await;
        ExitCode::SUCCESS
    })
}

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
