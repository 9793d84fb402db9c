//! The `polysync` binary: command line, logging, then [`polysync::app`].

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use polysync::app::Config;

/// mimalloc instead of the system allocator: decoding allocates and frees many small values per
/// change, and the profile of a backlog drain showed glibc's malloc/free among the top costs
/// (see docs/performance.md for the before/after figures).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
        /// Also connect to each PostgreSQL source: the writer, privileges, the slot against
        /// polysync's record, and failover readiness (read-only; exit 2 on what `run` refuses).
        #[arg(long)]
        online: bool,
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
    /// Re-read tables into a pipeline's sinks while the daemon keeps streaming: files a request
    /// in the source's signal table, which the running daemon picks up from the stream.
    Snapshot {
        /// Config file.
        #[arg(long, short, env = "POLYSYNC_CONFIG", default_value = "config/polysync.toml")]
        config: PathBuf,
        /// Pipeline whose sinks receive the rows.
        #[arg(long)]
        pipeline: String,
        /// One table (`schema.table`); default: every table the pipeline reads.
        #[arg(long)]
        table: Option<String>,
        /// Extra SQL condition on the rows (`--where "updated_at > now() - interval '1 day'"`).
        #[arg(long = "where")]
        filter: Option<String>,
        /// Wait and show progress until every table is done.
        #[arg(long)]
        wait: bool,
    },
    /// Show the daemon's state per source and sink: connection, lag, confirmed position,
    /// in-flight changes, sink health and backlog, the last reload, dead letters and snapshots
    /// (from the running daemon; from the state directory when none answers).
    Status {
        /// Config file.
        #[arg(long, short, env = "POLYSYNC_CONFIG", default_value = "config/polysync.toml")]
        config: PathBuf,
        /// Print JSON instead of lines.
        #[arg(long)]
        json: bool,
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
    /// Give dead letters up on purpose: recorded in `discarded.jsonl` (what, when, by whom),
    /// then no longer listed or replayed (`dlq list --all` shows them as discarded).
    Discard {
        /// Config file.
        #[arg(long, short, env = "POLYSYNC_CONFIG", default_value = "config/polysync.toml")]
        config: PathBuf,
        /// Only this pipeline (`-` for records that never reached a pipeline).
        #[arg(long)]
        pipeline: Option<String>,
        /// Only these entries (repeatable).
        #[arg(long)]
        id: Vec<String>,
        /// Only entries written before a time (RFC 3339) or age (`7d`: older than a week).
        #[arg(long)]
        before: Option<String>,
        /// Every open entry (required when no other selector is given).
        #[arg(long)]
        all: bool,
    },
}

/// Follow the progress file until every task of the request is done: a bar per table on a
/// terminal, a line every few seconds otherwise.
fn wait_snapshot(cfg: &Config, source: &str, prefix: &str) -> ExitCode {
    use polysync::checkpoint::snapshot::{SnapshotProgress, TaskState, progress_path};
    use std::io::IsTerminal;
    let path = progress_path(&cfg.state_dir, source);
    let tty = std::io::stderr().is_terminal();
    let bars = indicatif::MultiProgress::new();
    let mut shown: std::collections::HashMap<String, indicatif::ProgressBar> = Default::default();
    let style = indicatif::ProgressStyle::with_template("{msg:30} {wide_bar} {pos}/{len} rows {per_sec} eta {eta}")
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    let mut last_line = std::time::Instant::now();
    let started = std::time::Instant::now();
    loop {
        let tasks: Vec<_> = SnapshotProgress::load(&path)
            .map(|p| p.tasks.into_iter().filter(|t| t.id.starts_with(prefix)).collect())
            .unwrap_or_default();
        if tasks.is_empty() && started.elapsed() > std::time::Duration::from_secs(60) {
            eprintln!(
                "no answer from the daemon after 60 s: the request is filed, but no daemon running with this config has taken it up (is it running, with state_dir {}?)",
                cfg.state_dir.display()
            );
            return ExitCode::FAILURE;
        }
        for t in &tasks {
            if tty {
                let bar = shown.entry(t.id.clone()).or_insert_with(|| {
                    let b = bars.add(indicatif::ProgressBar::new(t.estimate.unwrap_or(0).max(1)));
                    b.set_style(style.clone());
                    b.set_message(t.relation.clone());
                    b
                });
                bar.set_length(t.estimate.unwrap_or(0).max(t.rows).max(1));
                bar.set_position(t.rows);
                if t.state == TaskState::Done {
                    bar.finish();
                }
            }
        }
        if !tty && last_line.elapsed() > std::time::Duration::from_secs(5) {
            for t in &tasks {
                eprintln!("{}", t.describe());
            }
            last_line = std::time::Instant::now();
        }
        if let Some(f) = tasks.iter().find(|t| t.state == TaskState::Failed) {
            eprintln!("snapshot failed: {}", f.describe());
            return ExitCode::FAILURE;
        }
        if !tasks.is_empty() && tasks.iter().all(|t| t.state == TaskState::Done) {
            for t in &tasks {
                println!("{}", t.describe());
            }
            return ExitCode::SUCCESS;
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| {
        eprintln!("cannot start the runtime: {e}");
        ExitCode::FAILURE
    })
}

fn dlq_discard(
    config: PathBuf,
    pipeline: Option<String>,
    ids: Vec<String>,
    before: Option<String>,
    all: bool,
) -> ExitCode {
    use polysync::app::dlq_replay::{Selection, discard, parse_since};
    if pipeline.is_none() && ids.is_empty() && before.is_none() && !all {
        eprintln!("dlq discard: say which entries (--pipeline, --id, --before), or --all for every open entry");
        return ExitCode::from(2);
    }
    let cfg = match load(&config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let before = match before.as_deref().map(parse_since).transpose() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("{}", e.replace("--since", "--before"));
            return ExitCode::from(2);
        }
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match rt.block_on(discard(&cfg, &Selection { pipeline, before, ids, ..Default::default() })) {
        Ok(done) => {
            for d in &done {
                println!("{}\t{}\t{}\tdiscarded\t{}", d.id, d.pipeline, d.sink, d.reason);
            }
            println!(
                "discarded {} dead letter(s), recorded in {}",
                done.len(),
                cfg.dlq_dir().join(polysync::dlq::DISCARDED).display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(2)
        }
    }
}

fn dlq(command: DlqCommand) -> ExitCode {
    use polysync::app::dlq_replay::{Selection, Standing, parse_since, replay, select_with_standing};
    let (config, pipeline, since, all, run_replay) = match command {
        DlqCommand::List { config, pipeline, since, all } => (config, pipeline, since, all, false),
        DlqCommand::Replay { config, pipeline, since } => (config, pipeline, since, false, true),
        DlqCommand::Discard { config, pipeline, id, before, all } => {
            return dlq_discard(config, pipeline, id, before, all);
        }
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
    let sel = Selection { pipeline, since, include_replayed: all, ..Default::default() };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    if !run_replay {
        return match rt.block_on(select_with_standing(&cfg, &sel)) {
            Ok(entries) => {
                for (e, standing) in &entries {
                    let standing = match standing {
                        Standing::Open => String::new(),
                        Standing::Replayed => "\treplayed".to_string(),
                        Standing::Discarded(d) => format!(
                            "\tdiscarded {}{}",
                            d.discarded_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                            d.by.as_deref().map(|b| format!(" by {b}")).unwrap_or_default()
                        ),
                    };
                    println!(
                        "{}\t{}\t{}\t{}\t{} {} [{}] at {}\t{}{standing}",
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

/// Signals are handled here and nowhere else: the first SIGTERM/SIGINT drains, a second one
/// abandons in-flight work, SIGHUP reloads. Handlers are installed before the daemon starts,
/// so a SIGHUP during start-up is never the default "terminate".
fn forward_signals(h: polysync::app::ControlHandles) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        let mut stops = 0;
        loop {
            tokio::select! {
                _ = term.recv() => stops += 1,
                _ = int.recv() => stops += 1,
                r = hup.recv() => {
                    if r.is_some() {
                        let _ = h.reload.try_send(());
                    }
                    continue;
                }
            }
            if stops == 1 {
                h.stop.cancel();
            } else {
                h.abandon.cancel();
            }
        }
    });
    Ok(())
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
        Command::Snapshot { config, pipeline, table, filter, wait } => {
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let rt = match runtime() {
                Ok(rt) => rt,
                Err(code) => return code,
            };
            let req = polysync::app::snapshot_request::request(&cfg, &pipeline, table.as_deref(), filter.as_deref());
            match rt.block_on(req) {
                Ok((source, id)) => {
                    println!("snapshot request {id} filed for pipeline {pipeline} (source {source})");
                    if wait { wait_snapshot(&cfg, &source, &format!("signal:{id}:")) } else { ExitCode::SUCCESS }
                }
                Err(e) => {
                    eprintln!("polysync: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Status { config, json } => {
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let rt = match runtime() {
                Ok(rt) => rt,
                Err(code) => return code,
            };
            let status = rt.block_on(polysync::app::status::gather(&cfg));
            if json {
                println!("{}", serde_json::to_string_pretty(&status).unwrap_or_default());
            } else {
                print!("{}", polysync::app::status::render(&status));
            }
            ExitCode::SUCCESS
        }
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
        Command::Check { config, online } => {
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
                    if !online {
                        return ExitCode::SUCCESS;
                    }
                    let rt = match runtime() {
                        Ok(rt) => rt,
                        Err(code) => return code,
                    };
                    let mut refused = false;
                    for (what, result) in rt.block_on(polysync::app::check_online(&cfg, &pipelines)) {
                        match result {
                            Ok(report) => {
                                for f in &report.facts {
                                    println!("{what}: {f}");
                                }
                                for w in &report.warnings {
                                    println!("{what}: warning: {w}");
                                }
                            }
                            Err(e) => {
                                refused = true;
                                eprintln!("{what}: {e}");
                            }
                        }
                    }
                    if refused { ExitCode::from(2) } else { ExitCode::SUCCESS }
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
            let (controls, handles) = polysync::app::Controls::new();
            let run = async move {
                if let Err(e) = forward_signals(handles) {
                    eprintln!("polysync: cannot install signal handlers: {e}");
                    return Err(std::process::ExitCode::FAILURE);
                }
                Ok(polysync::app::run(cfg, controls).await)
            };
            match rt.block_on(run) {
                Err(code) => code,
                Ok(Ok(stopped)) if stopped.clean => ExitCode::SUCCESS,
                Ok(Ok(_)) => {
                    eprintln!("polysync: stopped with in-flight changes abandoned (they replay on the next start)");
                    ExitCode::from(3)
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "polysync failed");
                    eprintln!("polysync: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
