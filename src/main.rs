//! The `polysync` binary: command line, logging, then [`polysync::app`].

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use polysync::config::Config;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "polysync", version, about = "Change-data-capture sync daemon")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    Run {
        /// Config file.
        #[arg(long, short, env = "POLYSYNC_CONFIG", default_value = "config/polysync.toml")]
        config: PathBuf,
    },
    /// Validate the config and every pipeline (offline) and print the plan.
    Check {
        /// Config file.
        #[arg(long, short, env = "POLYSYNC_CONFIG", default_value = "config/polysync.toml")]
        config: PathBuf,
    },
}

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(2)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => {
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match polysync::app::check(&cfg) {
                Ok(pipelines) => {
                    println!("config {} is valid", cfg.path.display());
                    for (name, s) in &cfg.sources {
                        println!("source {name} ({})", s.kind());
                    }
                    for (name, s) in &cfg.sinks {
                        println!("sink {name} ({})", s.kind());
                    }
                    for p in &pipelines {
                        for line in p.describe() {
                            println!("{line}");
                        }
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Run { config } => {
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            polysync::telemetry::init_logging(&cfg.log);
            let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(polysync::app::run(cfg, CancellationToken::new())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "polysync failed");
                    eprintln!("polysync: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
