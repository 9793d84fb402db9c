//! Wiring: config → sinks → pipelines → lanes → sources, and the orderly way back down.
//!
//! Shutdown order matters for the delivery guarantee: sources stop reading first and wait
//! until everything they handed out is applied (or the deadline passes), then confirm; only
//! then are lanes and sinks closed. Work abandoned at the deadline is never acknowledged, so
//! it replays on the next start.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::checkpoint::AckWindow;
use crate::config::{Config, ConfigError};
use crate::dlq::DeadLetterQueue;
use crate::pipeline::lane::{self, LaneInputs};
use crate::pipeline::router::Router;
use crate::pipeline::template::Root;
use crate::pipeline::{Pipeline, PipelineSet, RunningPipeline, load};
use crate::sink::runner::{self, LaneContext, SinkHandle};
use crate::sink::{SinkConfig, SinkErrorKind};
use crate::source::postgres::PostgresSource;
use crate::source::{SourceConfig, SourceError};
use crate::telemetry::Health;

/// Why the daemon could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// Invalid config or pipelines.
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// A source refused to start or failed for good.
    #[error("{0}")]
    Source(#[from] SourceError),
    /// A sink could not be set up.
    #[error("{0}")]
    Sink(#[from] crate::sink::SinkError),
    /// Local state (DLQ, state dir, listener).
    #[error("{0}")]
    Local(String),
}

/// Load config and pipelines exactly as `run` does, without touching the network.
pub fn check(config: &Config) -> Result<Vec<Arc<Pipeline>>, ConfigError> {
    load::load_all(config)
}

/// Relation → (pipeline, column) pairs its templates read.
type ColumnUses = BTreeMap<String, Vec<(String, String)>>;

/// Tables each source's pipelines name, and the columns their templates read.
fn source_needs(pipelines: &[Arc<Pipeline>], source: &str) -> (BTreeSet<String>, ColumnUses) {
    let mut tables = BTreeSet::new();
    let mut columns = ColumnUses::new();
    for p in pipelines.iter().filter(|p| &*p.source == source) {
        for rel in p.exact_relations() {
            tables.insert(rel.to_string());
            for a in &p.actions {
                for path in a.action.paths() {
                    if path.root == Root::Event {
                        continue;
                    }
                    if let Some(col) = path.column() {
                        columns.entry(rel.to_string()).or_default().push((p.name.to_string(), col.to_string()));
                    }
                }
            }
        }
    }
    (tables, columns)
}

/// Connect a sink, retrying transient failures until it answers or `cancel` fires.
async fn build_sink(
    name: &str,
    cfg: &SinkConfig,
    health: &Health,
    cancel: &CancellationToken,
) -> Result<Option<Arc<dyn crate::sink::Sink>>, AppError> {
    let mut delays = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(10))
        .with_jitter()
        .without_max_times()
        .build();
    loop {
        match cfg.build(name).await {
            Ok(s) => return Ok(Some(s)),
            Err(e) if e.kind == SinkErrorKind::Transient => {
                let d = delays.next().unwrap_or(Duration::from_secs(10));
                health.set(&format!("sink {name}"), Err(e.msg.clone()));
                tracing::warn!(sink = name, error = %e, retry_in = ?d, "sink not reachable yet; retrying");
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(None),
                    _ = tokio::time::sleep(d) => {}
                }
            }
            Err(e) => return Err(AppError::Sink(e)),
        }
    }
}

/// Run the daemon until SIGTERM/SIGINT (or `stop`), then shut down in order.
pub async fn run(config: Config, stop: CancellationToken) -> Result<(), AppError> {
    let pipelines = load::load_all(&config)?;
    std::fs::create_dir_all(&config.state_dir)
        .map_err(|e| AppError::Local(format!("state_dir {}: {e}", config.state_dir.display())))?;
    let dlq = Arc::new(
        DeadLetterQueue::open(&config.dlq_dir(), config.dlq.max_file_bytes.0, config.dlq.max_total_bytes.0)
            .map_err(|e| AppError::Local(e.to_string()))?,
    );
    crate::telemetry::metrics().dlq_bytes.set(dlq.total_bytes() as i64);
    let health = Arc::new(Health::new());
    let cancel = CancellationToken::new(); // stop intake
    let hard_stop = CancellationToken::new(); // abandon work
    let http_stop = CancellationToken::new();
    let http = match config.metrics.enabled.then_some(config.metrics.listen) {
        Some(addr) => Some(
            crate::telemetry::http::serve(addr, Arc::clone(&health), http_stop.clone())
                .await
                .map_err(|e| AppError::Local(format!("metrics listener {addr}: {e}")))?,
        ),
        None => None,
    };

    // Signals: first SIGTERM/SIGINT drains, a second one abandons in-flight work at once.
    let signals = {
        let stop = stop.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
                return;
            };
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
            tracing::info!("shutdown requested; draining in-flight changes (send the signal again to exit at once)");
            stop.cancel();
        })
    };

    // Sinks used by pipelines.
    let lanes = config.runtime.lanes;
    let lane_ctx = LaneContext { dlq: Arc::clone(&dlq), health: Arc::clone(&health), hard_stop: hard_stop.clone() };
    let mut sinks: BTreeMap<String, Arc<SinkHandle>> = BTreeMap::new();
    let used: BTreeSet<String> =
        pipelines.iter().flat_map(|p| p.actions.iter().map(|a| a.target.to_string())).collect();
    for name in &used {
        let cfg = config.sinks.get(name).expect("pipeline load checked the target").clone();
        let Some(sink) = build_sink(name, &cfg, &health, &stop).await? else {
            return Ok(());
        };
        sinks.insert(
            name.clone(),
            Arc::new(runner::start(name, cfg, sink, lanes, config.runtime.lane_capacity, lane_ctx.clone())),
        );
    }
    let running: Vec<RunningPipeline> = pipelines
        .iter()
        .map(|p| RunningPipeline {
            def: Arc::clone(p),
            sinks: p.actions.iter().map(|a| Arc::clone(&sinks[&*a.target])).collect(),
        })
        .collect();
    let set = Arc::new(ArcSwap::from_pointee(PipelineSet::new(running)));

    // Pipeline lanes.
    let lane_tasks = TaskTracker::new();
    let mut senders = Vec::with_capacity(lanes);
    for index in 0..lanes {
        let (tx, rx) = mpsc::channel(config.runtime.lane_capacity);
        senders.push(tx);
        lane_tasks.spawn(lane::run(LaneInputs {
            index,
            rx,
            pipelines: Arc::clone(&set),
            dlq: Arc::clone(&dlq),
            hard_stop: hard_stop.clone(),
        }));
    }
    lane_tasks.close();
    let router = Router::new(senders);

    // Sources: every check passes before any starts streaming.
    let mut prepared = Vec::new();
    for (name, cfg) in &config.sources {
        if !pipelines.iter().any(|p| &*p.source == name) {
            tracing::warn!(source = %name, "no pipeline reads this source; it is not started");
            continue;
        }
        match cfg {
            SourceConfig::Postgres(pg) => {
                let (tables, columns) = source_needs(&pipelines, name);
                let mut delays = ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(200))
                    .with_max_delay(Duration::from_secs(10))
                    .with_jitter()
                    .without_max_times()
                    .build();
                // An unreachable database at start-up is waited for (not ready meanwhile);
                // anything that needs a person (auth, TLS, missing objects) refuses to start.
                let src = loop {
                    let attempt = tokio::select! {
                        r = PostgresSource::prepare(name, pg, &tables, &columns) => r,
                        _ = stop.cancelled() => return Ok(()),
                    };
                    match attempt {
                        Ok(src) => break src,
                        Err(SourceError::Connect { transient: true, ref msg, .. }) => {
                            let d = delays.next().unwrap_or(Duration::from_secs(10));
                            health.set(&format!("source {name}"), Err(format!("connecting: {msg}")));
                            tracing::warn!(source = %name, error = %msg, retry_in = ?d, "source not reachable yet; retrying");
                            tokio::select! {
                                _ = stop.cancelled() => return Ok(()),
                                _ = tokio::time::sleep(d) => {}
                            }
                        }
                        Err(e) => return Err(e.into()),
                    }
                };
                prepared.push(src);
            }
        }
    }
    let source_tasks = TaskTracker::new();
    let (fail_tx, mut fail_rx) = mpsc::channel::<SourceError>(prepared.len().max(1));
    for src in prepared {
        let window = AckWindow::new(src.name(), config.runtime.max_in_flight, 0);
        let emitter = router.emitter(window);
        let (health, cancel, hard_stop, fail_tx) =
            (Arc::clone(&health), cancel.clone(), hard_stop.clone(), fail_tx.clone());
        source_tasks.spawn(async move {
            if let Err(e) = src.run(emitter, health, cancel, hard_stop).await {
                let _ = fail_tx.send(e).await;
            }
        });
    }
    source_tasks.close();
    drop(fail_tx);
    tracing::info!(pipelines = pipelines.len(), sinks = sinks.len(), lanes, "polysync running");

    // Wait for a stop request or a fatal source error.
    let failure = tokio::select! {
        _ = stop.cancelled() => None,
        e = fail_rx.recv() => e,
    };
    if let Some(e) = &failure {
        tracing::error!(error = %e, "source failed; shutting down");
    }

    // Orderly shutdown with a deadline.
    let deadline = tokio::time::Instant::now() + config.runtime.shutdown_timeout;
    cancel.cancel();
    let second_signal = async {
        use tokio::signal::unix::{SignalKind, signal};
        if let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        } else {
            std::future::pending::<()>().await
        }
    };
    tokio::pin!(second_signal);
    let drained = tokio::select! {
        _ = source_tasks.wait() => true,
        _ = tokio::time::sleep_until(deadline) => false,
        _ = &mut second_signal => false,
    };
    if !drained {
        tracing::warn!(
            "shutdown deadline passed (or second signal); abandoning in-flight changes, they replay on restart"
        );
        hard_stop.cancel();
        source_tasks.wait().await;
    }
    // Close the lanes and the sinks behind them.
    drop(router);
    set.store(Arc::new(PipelineSet::new(Vec::new())));
    let sink_tasks: Vec<TaskTracker> = sinks.values().map(|s| s.tasks.clone()).collect();
    drop(sinks);
    let rest = async {
        lane_tasks.wait().await;
        for t in sink_tasks {
            t.wait().await;
        }
    };
    tokio::select! {
        _ = rest => {}
        _ = tokio::time::sleep(Duration::from_secs(5)) => { hard_stop.cancel(); }
    }
    signals.abort();
    http_stop.cancel();
    if let Some(h) = http {
        let _ = h.await;
    }
    tracing::info!(clean = drained, "polysync stopped");
    match failure {
        Some(e) => Err(AppError::Source(e)),
        None => Ok(()),
    }
}
