//! Wiring: config → sinks → pipelines → lanes → sources, live reload, and the orderly way back
//! down.
//!
//! Shutdown order matters for the delivery guarantee: sources stop reading first and wait
//! until everything they handed out is applied (or the deadline passes), then confirm; only
//! then are lanes and sinks closed. Work abandoned at the deadline is never acknowledged, so
//! it replays on the next start.

pub mod reload;
pub mod topology;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

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
use crate::pipeline::{Pipeline, load};
use crate::sink::runner::LaneContext;
use crate::source::dynamodb::{DynamoSource, Images};
use crate::source::postgres::{ColumnUses, PgAdmin, PostgresSource};
use crate::source::{SourceConfig, SourceError};
use crate::telemetry::systemd::Notifier;
use crate::telemetry::{Health, metrics};
use reload::Trigger;
use topology::{Patience, Topology};

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

/// Tables each source's pipelines name, and the columns their templates read.
pub fn source_needs(pipelines: &[Arc<Pipeline>], source: &str) -> (BTreeSet<String>, ColumnUses) {
    let mut tables = BTreeSet::new();
    let mut columns = ColumnUses::new();
    for p in pipelines.iter().filter(|p| &*p.source == source) {
        for rel in p.exact_relations() {
            tables.insert(rel.to_string());
            for col in &p.text_columns {
                columns.entry(rel.to_string()).or_default().push((p.name.to_string(), col.to_string()));
            }
            if p.transform.is_some() {
                continue; // templates read the transformed event, not table columns
            }
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

fn backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(10))
        .with_jitter()
        .without_max_times()
        .build()
}

/// Connect and check a PostgreSQL source, waiting out an unreachable database; anything that
/// needs a person (auth, TLS, missing objects) is returned as an error.
async fn prepare_postgres(
    name: &str,
    cfg: &crate::source::postgres::PostgresSourceConfig,
    pipelines: &[Arc<Pipeline>],
    health: &Health,
    stop: &CancellationToken,
) -> Result<Option<PostgresSource>, AppError> {
    let (tables, columns) = source_needs(pipelines, name);
    let mut delays = backoff();
    loop {
        let attempt = tokio::select! {
            r = PostgresSource::prepare(name, cfg, &tables, &columns) => r,
            _ = stop.cancelled() => return Ok(None),
        };
        match attempt {
            Ok(src) => return Ok(Some(src)),
            Err(SourceError::Connect { transient: true, ref msg, .. }) => {
                let d = delays.next().unwrap_or(Duration::from_secs(10));
                health.set(&format!("source {name}"), Err(format!("connecting: {msg}")));
                tracing::warn!(source = %name, error = %msg, retry_in = ?d, "source not reachable yet; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return Ok(None),
                    _ = tokio::time::sleep(d) => {}
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

fn snapshot_plan(config: &Config, pipelines: &[Arc<Pipeline>], source: &str) -> crate::source::postgres::SnapshotPlan {
    crate::source::postgres::SnapshotPlan {
        state_dir: config.state_dir.clone(),
        pipelines: pipelines
            .iter()
            .filter(|p| &*p.source == source)
            .map(|p| (Arc::clone(&p.name), p.relations.clone(), p.snapshot_initial))
            .collect(),
    }
}

/// Which images DynamoDB pipelines read (a stream without them refuses to start).
fn images_needed(pipelines: &[Arc<Pipeline>], source: &str) -> Images {
    let mut needs = Images { new: false, old: false };
    for p in pipelines.iter().filter(|p| &*p.source == source && p.transform.is_none()) {
        for a in &p.actions {
            for path in a.action.paths() {
                match path.root {
                    Root::After | Root::Row => needs.new = true,
                    Root::Before => needs.old = true,
                    _ => {}
                }
            }
        }
    }
    needs
}

/// Everything a reload needs to validate and swap.
struct Reloader {
    config: Config,
    topology: Topology,
    admins: BTreeMap<String, PgAdmin>,
    running: BTreeSet<String>,
    health: Arc<Health>,
}

impl Reloader {
    /// Parse, compile and check the new set; swap it in only if everything succeeds.
    async fn reload(&mut self, trigger: Trigger, stop: &CancellationToken) {
        let result = self.try_reload(stop).await;
        let m = metrics();
        match result {
            Ok(summary) => {
                m.config_reloads.with_label_values(&["ok"]).inc();
                tracing::info!(?trigger, %summary, "reloaded");
            }
            Err(e) => {
                m.config_reloads.with_label_values(&["error"]).inc();
                for line in e.to_string().lines() {
                    tracing::error!(?trigger, error = %line, "reload failed; the previous pipelines keep running");
                }
            }
        }
    }

    async fn try_reload(&mut self, stop: &CancellationToken) -> Result<String, AppError> {
        let config = Config::load(&self.config.path)?;
        let pipelines = load::load_all(&config)?;
        // What a reload cannot change while running: say so instead of pretending.
        let mut notes = Vec::new();
        if config.sources != self.config.sources {
            notes.push("source settings changed (takes effect at restart)");
        }
        if config.runtime.lanes != self.config.runtime.lanes
            || config.runtime.max_in_flight != self.config.runtime.max_in_flight
            || config.runtime.lane_capacity != self.config.runtime.lane_capacity
        {
            notes.push("runtime limits changed (take effect at restart)");
        }
        if config.metrics.listen != self.config.metrics.listen || config.metrics.enabled != self.config.metrics.enabled
        {
            notes.push("metrics listener changed (takes effect at restart)");
        }
        for p in &pipelines {
            if !self.running.contains(&*p.source) {
                return Err(AppError::Local(format!(
                    "pipeline {} reads source {}, which is not running; sources start only with the daemon",
                    p.name, p.source
                )));
            }
        }
        for (name, admin) in &self.admins {
            let (tables, columns) = source_needs(&pipelines, name);
            admin.recheck(&tables, &columns).await?;
        }
        let plan = self
            .topology
            .plan(&config, &pipelines, &self.health, Patience::Once(Duration::from_secs(15)), stop)
            .await?
            .ok_or_else(|| AppError::Local("stopping".into()))?;
        let mut summary = plan.summary.clone();
        self.topology.install(plan);
        // Stop readiness checks of sinks no longer used.
        for name in self.config.sinks.keys() {
            if !self.topology.sinks.contains_key(name) {
                self.health.remove(&format!("sink {name}"));
            }
        }
        self.config = config;
        if !notes.is_empty() {
            summary.push_str("; ");
            summary.push_str(&notes.join("; "));
        }
        Ok(summary)
    }
}

/// Run the daemon until SIGTERM/SIGINT (or `stop`), then shut down in order.
pub async fn run(config: Config, stop: CancellationToken) -> Result<(), AppError> {
    let background = CancellationToken::new();
    let notifier = Notifier::from_env();
    let (reload_tx, mut reload_rx) = mpsc::channel::<Trigger>(1);
    let hup = reload::sighup(reload_tx.clone(), background.clone())
        .map_err(|e| AppError::Local(format!("SIGHUP handler: {e}")))?;
    // Watch files from the start: an edit made while sources connect (slot creation can take
    // seconds) is queued and served once running, never missed.
    let _watcher = if config.reload.watch {
        match reload::watch(&config.path, &config.pipelines_dir, reload_tx.clone(), background.clone()) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch config files; reload with SIGHUP only");
                None
            }
        }
    } else {
        None
    };
    let pipelines = load::load_all(&config)?;
    for w in crate::tls::plaintext_warnings(&config) {
        tracing::warn!("{w}");
    }
    std::fs::create_dir_all(&config.state_dir)
        .map_err(|e| AppError::Local(format!("state_dir {}: {e}", config.state_dir.display())))?;
    let mut dlq = DeadLetterQueue::open(&config.dlq_dir(), config.dlq.max_file_bytes.0, config.dlq.max_total_bytes.0)
        .map_err(|e| AppError::Local(e.to_string()))?;
    if let Some(tx) = crate::dlq::mirror::start(&config.dlq, background.clone()).await.map_err(AppError::Local)? {
        dlq.set_mirror(tx);
    }
    let dlq = Arc::new(dlq);
    metrics().dlq_bytes.set(dlq.total_bytes() as i64);
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

    // Sinks and pipelines.
    let lanes = config.runtime.lanes;
    let lane_ctx = LaneContext { dlq: Arc::clone(&dlq), health: Arc::clone(&health), hard_stop: hard_stop.clone() };
    let mut topology = Topology::new(lane_ctx, lanes, config.runtime.lane_capacity);
    let Some(plan) = topology.plan(&config, &pipelines, &health, Patience::UntilStopped, &stop).await? else {
        return Ok(());
    };
    topology.install(plan);

    // Pipeline lanes.
    let lane_tasks = TaskTracker::new();
    let mut senders = Vec::with_capacity(lanes);
    for index in 0..lanes {
        let (tx, rx) = mpsc::channel(config.runtime.lane_capacity);
        senders.push(tx);
        lane_tasks.spawn(lane::run(LaneInputs {
            index,
            rx,
            pipelines: Arc::clone(&topology.set),
            dlq: Arc::clone(&dlq),
            hard_stop: hard_stop.clone(),
        }));
    }
    lane_tasks.close();
    let router = Router::new(senders);

    // Sources: every check passes before any starts streaming.
    let mut prepared = Vec::new();
    let mut dynamo = Vec::new();
    for (name, cfg) in &config.sources {
        if !pipelines.iter().any(|p| &*p.source == name) {
            tracing::warn!(source = %name, "no pipeline reads this source; it is not started");
            continue;
        }
        match cfg {
            SourceConfig::Postgres(pg) => match prepare_postgres(name, pg, &pipelines, &health, &stop).await? {
                Some(src) => prepared.push(
                    src.with_snapshots(crate::source::postgres::SnapshotPlan {
                        state_dir: config.state_dir.clone(),
                        pipelines: pipelines
                            .iter()
                            .filter(|p| &*p.source == name)
                            .map(|p| (Arc::clone(&p.name), p.relations.clone(), p.snapshot_initial))
                            .collect(),
                    }),
                ),
                None => return Ok(()),
            },
            SourceConfig::Dynamodb(d) => {
                let needs = images_needed(&pipelines, name);
                let src = tokio::select! {
                    r = DynamoSource::prepare(name, d, &config.aws, &config.state_dir, needs, config.runtime.max_in_flight) => r?,
                    _ = stop.cancelled() => return Ok(()),
                };
                dynamo.push(src.with_backfill(snapshot_plan(&config, &pipelines, name)));
            }
        }
    }
    let admins: BTreeMap<String, PgAdmin> = prepared.iter().map(|s| (s.name().to_string(), s.admin())).collect();
    let running: BTreeSet<String> =
        prepared.iter().map(|s| s.name().to_string()).chain(dynamo.iter().map(|s| s.name().to_string())).collect();
    let total_sources = running.len();
    let source_tasks = TaskTracker::new();
    let (fail_tx, mut fail_rx) = mpsc::channel::<SourceError>(total_sources.max(1));
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
    for src in dynamo {
        let (router, health, cancel, hard_stop, fail_tx) =
            (router.clone(), Arc::clone(&health), cancel.clone(), hard_stop.clone(), fail_tx.clone());
        source_tasks.spawn(async move {
            if let Err(e) = src.run(router, health, cancel, hard_stop).await {
                let _ = fail_tx.send(e).await;
            }
        });
    }
    source_tasks.close();
    drop(fail_tx);
    tracing::info!(pipelines = pipelines.len(), sinks = topology.sinks.len(), lanes, "polysync running");
    // READY once every source streams and every sink answers; watchdog pings while running.
    {
        let (health, notifier, stop) = (Arc::clone(&health), notifier.clone(), background.clone());
        tokio::spawn(async move {
            loop {
                if health.readiness().is_ok() {
                    notifier.notify("READY=1\nSTATUS=streaming");
                    tracing::info!("ready: sources streaming, sinks answering");
                    return;
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
        });
    }
    if let Some(every) = Notifier::watchdog_interval() {
        let (notifier, stop) = (notifier.clone(), background.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every / 2);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => notifier.notify("WATCHDOG=1"),
                }
            }
        });
    }

    // Serve reloads until a stop request or a fatal source error.
    let mut reloader = Reloader { config: config.clone(), topology, admins, running, health: Arc::clone(&health) };
    let mut failed = 0;
    let failure = loop {
        tokio::select! {
            _ = stop.cancelled() => break None,
            Some(e) = fail_rx.recv() => {
                // A failed source stops alone; the daemon ends when none is left.
                failed += 1;
                tracing::error!(error = %e, "source stopped");
                if failed >= total_sources {
                    break Some(e);
                }
            }
            Some(trigger) = reload_rx.recv() => {
                notifier.notify(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
                tokio::select! {
                    _ = reloader.reload(trigger, &stop) => {}
                    _ = stop.cancelled() => break None,
                }
                notifier.notify("READY=1");
            }
        }
    };
    if failure.is_some() {
        tracing::error!("no source is left running; shutting down");
    }
    notifier.notify("STOPPING=1\nSTATUS=draining in-flight changes");
    background.cancel();
    hup.abort();

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
    let mut topology = reloader.topology;
    let trackers = std::mem::take(&mut topology.trackers);
    topology.clear();
    drop(topology);
    let rest = async {
        lane_tasks.wait().await;
        for t in trackers {
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
