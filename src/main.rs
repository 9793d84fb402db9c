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
    /// Exit 0 if the running daemon is ready (its /readyz answers 200), for container and
    /// load-balancer health checks; prints the reason otherwise.
    Healthcheck {
        /// Config file (for `metrics.listen`).
        #[arg(long, short, env = "POLYSYNC_CONFIG", default_value = "config/polysync.toml")]
        config: PathBuf,
        /// Address to probe instead of the config's (`127.0.0.1:9464`).
        #[arg(long)]
        addr: Option<String>,
        /// Check liveness (/healthz) instead of readiness (/readyz).
        #[arg(long)]
        live: bool,
    },
    /// Inspect or replay the dead-letter queue.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// List dead letters (not yet replayed unless --all).
    List {
        /// Config file.
        #[arg(long, short, env = "POLYSYNC_CONFIG", default_value = "config/polysync.toml")]
        config: PathBuf,
        /// Only this pipeline.
        #[arg(long)]
        pipeline: Option<String>,
        /// Only entries since a time (RFC 3339) or age (`2h`).
        #[arg(long)]
        since: Option<String>,
        /// Include entries already replayed.
        #[arg(long)]
        all: bool,
    },
    /// Deliver dead letters again through the current pipeline definitions.
    Replay {
        /// Config file.
        #[arg(long, short, env = "POLYSYNC_CONFIG", default_value = "config/polysync.toml")]
        config: PathBuf,
        /// Only this pipeline.
        #[arg(long)]
        pipeline: Option<String>,
        /// Only entries since a time (RFC 3339) or age (`2h`).
        #[arg(long)]
        since: Option<String>,
    },
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| {
        eprintln!("cannot start the runtime: {e}");
        ExitCode::FAILURE
    })
}

fn dlq(command: DlqCommand) -> ExitCode {
    use polysync::dlq::replay::{Selection, parse_since, replay, select};
    let (config, pipeline, since, all, run_replay) = match command {
        DlqCommand::List { config, pipeline, since, all } => (config, pipeline, since, all, false),
        DlqCommand::Replay { config, pipeline, since } => (config, pipeline, since, false, true),
    };
    let cfg = match load(&config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let since = match since.as_deref().map(parse_since).transpose() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let sel = Selection { pipeline, since, include_replayed: all };
    if !run_replay {
        return match select(&cfg, &sel) {
            Ok(entries) => {
                for e in &entries {
                    println!(
                        "{}\t{}\t{}\t{}\t{} {} [{}] at {}\t{}",
                        e.id,
                        e.at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                        e.pipeline,
                        e.sink,
                        e.change.op,
                        e.change.relation,
                        e.change.key_display(),
                        e.change.position,
                        e.reason
                    );
                }
                eprintln!("{} dead letter(s)", entries.len());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        };
    }
    polysync::telemetry::init_logging(&cfg.log);
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match rt.block_on(replay(&cfg, &sel)) {
        Ok(report) => {
            for (id, reason) in &report.failed {
                eprintln!("{id}: not delivered: {reason}");
            }
            println!("replayed {} dead letter(s), {} failed (still in the DLQ)", report.delivered, report.failed.len());
            if report.failed.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(2)
    })
}

fn main() -> ExitCode {
    // Two rustls crypto providers are linked (ring for our clients, aws-lc-rs via the AWS SDK
    // and reqwest); name the process default so no library has to guess.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    match cli.command {
        Command::Dlq { command } => dlq(command),
        Command::Healthcheck { config, addr, live } => {
            let addr = match addr {
                Some(a) => a,
                None => match load(&config) {
                    Ok(c) => c.metrics.listen.to_string(),
                    Err(code) => return code,
                },
            };
            let rt = match runtime() {
                Ok(rt) => rt,
                Err(code) => return code,
            };
            let path = if live { "/healthz" } else { "/readyz" };
            match rt.block_on(polysync::telemetry::http::probe(&addr, path, std::time::Duration::from_secs(3))) {
                Ok((200, body)) => {
                    print!("{body}");
                    ExitCode::SUCCESS
                }
                Ok((status, body)) => {
                    eprint!("not ready ({status}): {body}");
                    ExitCode::FAILURE
                }
                Err(e) => {
                    eprintln!("unhealthy: {e}");
                    ExitCode::FAILURE
                }
            }
        }
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
            let rt = match runtime() {
                Ok(rt) => rt,
                Err(code) => return code,
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
